"""The 3D model's pieces: the MONAI network, case-day volumes on the grid, random patches,
sliding-window prediction with flip TTA back at the native slice size, and that it learns."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from gitract.config import (
    CONFIG_DIR,
    DataConfig,
    InferConfig,
    ModelConfig,
    config_from_dict,
    load_config,
)
from gitract.data.cache import VolumeCache
from gitract.data.folds import load_folds
from gitract.data.layout import load_train_table
from gitract.data.patches import PatchDataset, case_day_ids, load_volume
from gitract.errors import ConfigError, DataError
from gitract.models.kind3d import predict_volume3d
from gitract.models.monai3d import build_model3d
from gitract.models.precision import Precision

CPU = torch.device("cpu")
FP32 = Precision(CPU)
EPOCHS = 4  # of the learning test


def _soft_dice_bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """0.5 BCE + 0.5 soft Dice per class over the batch (the recipe's loss, for 5D tensors)."""
    probs = torch.sigmoid(logits)
    dims = (0, 2, 3, 4)
    dice = (2 * (probs * target).sum(dims) + 1) / (probs.sum(dims) + target.sum(dims) + 1)
    return 0.5 * F.binary_cross_entropy_with_logits(logits, target) + 0.5 * (1 - dice).mean()


# --------------------------------------------------------------------------- network


@pytest.mark.parametrize("arch", ["SegResNet", "unet"])
def test_network_forward_backward(arch: str) -> None:
    torch.manual_seed(0)
    model = build_model3d(ModelConfig(kind="3d", arch=arch, init_filters=8))
    x = torch.rand(2, 1, 16, 32, 48)
    logits = model(x)
    assert logits.shape == (2, 3, 16, 32, 48) and logits.dtype == torch.float32
    _soft_dice_bce(logits, (torch.rand_like(logits) > 0.7).float()).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_network_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"model.arch: unknown 3D architecture 'SegResNt'.*"
                       r"did you mean 'SegResNet'"):  # fmt: skip
        build_model3d(ModelConfig(kind="3d", arch="SegResNt"))
    with pytest.raises(ConfigError, match=r"model.init_filters: SegResNet needs a multiple of 8"):
        config_from_dict({"model": {"kind": "3d", "arch": "SegResNet", "init_filters": 12}})
    segresnet = {"kind": "3d", "arch": "SegResNet"}
    config_from_dict({"model": segresnet, "data": {"patch_size": [80, 160, 160]}})
    with pytest.raises(ConfigError, match=r"data.patch_size: .*multiples of 16 for model.arch"):
        unet = {"kind": "3d", "arch": "UNet"}
        config_from_dict({"model": unet, "data": {"patch_size": [24, 64, 64]}})


def test_norm_and_act_options_build_those_layers() -> None:
    # The 1st place's SegResNets: BatchNorm, PReLU, widths 12 / 20 / 32 (not multiples of 8,
    # which only GroupNorm of 8 groups needs).
    cfg = config_from_dict(
        {"model": {"kind": "3d", "arch": "SegResNet", "init_filters": 12, "norm": "batch",
                   "act": "prelu"}, "data": {"patch_size": [16, 32, 32]}}
    )  # fmt: skip
    torch.manual_seed(0)
    model = build_model3d(cfg.model)
    kinds = {type(m) for m in model.modules()}
    assert nn.BatchNorm3d in kinds and nn.PReLU in kinds
    assert nn.GroupNorm not in kinds and nn.ReLU not in kinds
    logits = model(torch.rand(2, 1, 16, 32, 32))
    _soft_dice_bce(logits, (torch.rand_like(logits) > 0.7).float()).backward()
    assert all(p.grad is not None for p in model.parameters())
    # null keeps each network's own layers (and older checkpoints' configs rebuild as before).
    default = {
        type(m)
        for m in build_model3d(ModelConfig(kind="3d", arch="SegResNet", init_filters=8)).modules()
    }
    assert nn.GroupNorm in default and nn.ReLU in default and nn.PReLU not in default
    unet = {type(m) for m in build_model3d(ModelConfig(kind="3d", arch="UNet", init_filters=4))
            .modules()}  # fmt: skip
    assert nn.InstanceNorm3d in unet and nn.PReLU in unet


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ({"norm": "batch"}, "'model.norm' must be null for a 2.5D model (a 3D option"),
        ({"act": "prelu"}, "'model.act' must be null for a 2.5D model (a 3D option"),
        ({"kind": "3d", "norm": "layer"}, "'model.norm' must be 'group' | 'batch' | 'instance'"),
        ({"kind": "3d", "arch": "UNet", "norm": "group", "init_filters": 12},
         "model.init_filters: UNet needs a multiple of 8 (GroupNorm of 8 groups; model.norm "
         "batch or instance takes any width), got 12"),
    ],
)  # fmt: skip
def test_norm_and_act_errors(model: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        config_from_dict({"model": model}, source="x.yaml")
    assert message in str(err.value)


@pytest.mark.parametrize("name", ["default_3d", "demo_cpu_3d"])
def test_3d_configs_load_and_fit_the_network(name: str) -> None:
    cfg = load_config(CONFIG_DIR / f"{name}.yaml")
    assert cfg.name == name and cfg.model.kind == "3d"  # its patch size checked by the config
    assert cfg.data.patch_size[1] <= cfg.data.grid_hw[0]
    assert cfg.data.patch_size[2] <= cfg.data.grid_hw[1]
    build_model3d(cfg.model)


# --------------------------------------------------------------------------- volumes, patches


@pytest.fixture
def tiny_volumes(make_tiny_kaggle):
    """A tiny data set: one 6-slice 360 wide x 310 high case-day, one 5-slice 266x266."""
    kaggle = make_tiny_kaggle("vol3d", layout=[(1, 0, 6, 360, 310), (2, 1, 5, 266, 266)])
    table = load_train_table(kaggle.root)
    return kaggle, table, VolumeCache(table, progress=False)


def test_load_volume_resamples_image_and_mask_to_the_grid(tiny_volumes) -> None:
    kaggle, table, cache = tiny_volumes
    ids = case_day_ids(table)["case1_day0"]
    assert ids == kaggle.ids("case1_day0")  # slice order
    image, mask = load_volume(cache, ids, (40, 48), with_mask=True)
    assert image.shape == (6, 40, 48) and image.dtype == np.float32
    assert mask is not None and mask.shape == (3, 6, 40, 48) and mask.dtype == np.float32
    assert set(np.unique(mask)) <= {0.0, 1.0}
    assert image.min() >= 0.0 and image.max() <= 1.0
    # The 2.5D normalisation, then resized: the grid's mean matches the slice's.
    native = cache.image_stack(ids[2], [0])[..., 0]
    assert abs(float(image[2].mean()) - float(native.mean())) < 0.01
    # The large-bowel bar lies in the top right quarter of the slice, and stays there.
    truth = kaggle.masks[ids[1]][..., 0]
    rows, cols = np.nonzero(mask[0, 1])
    assert rows.max() < 40 / 2 and cols.min() >= 48 / 2 - 1
    assert abs(mask[0, 1].mean() - truth.mean()) < 0.02
    none_image, none_mask = load_volume(cache, ids, (40, 48), with_mask=False)
    assert none_mask is None and np.array_equal(none_image, image)


def _data_cfg(**kw) -> DataConfig:
    return DataConfig().model_copy(update=kw)


def test_patch_dataset_items_pad_and_stay_aligned(tiny_volumes) -> None:
    _, table, cache = tiny_volumes
    cfg = _data_cfg(grid_hw=[32, 40], patch_size=[8, 32, 32])
    ds = PatchDataset(table, cache, cfg, patches_per_volume=3, train=True, seed=1, hflip=0.0)
    assert len(ds) == 2 * 3 and ds.transform is ds
    plain = ds[0]
    assert plain["image"].shape == (1, 8, 32, 32) and plain["image"].dtype == torch.float32
    assert plain["mask"].shape == (3, 8, 32, 32) and plain["mask"].dtype == torch.float32
    # 6 slices in a patch 8 deep: two zero slices of padding somewhere, image and mask alike.
    empty = (plain["image"][0].abs().sum((1, 2)) == 0).numpy()
    assert empty.sum() == 2 and (plain["mask"][:, empty] == 0).all()

    # With the same seed and position, hflip=1 gives the mirror image of both, together.
    ds.set_random_seed(5)
    a = ds[3]
    flipped = PatchDataset(table, cache, cfg, 3, train=True, seed=1, hflip=1.0)
    flipped.set_random_seed(5)
    b = flipped[3]
    assert torch.equal(b["image"], a["image"].flip(-1))
    assert torch.equal(b["mask"], a["mask"].flip(-1))
    assert not torch.equal(b["mask"], a["mask"])  # the organs are asymmetric


def test_patch_dataset_validation_items_are_fixed_and_unflipped(tiny_volumes) -> None:
    _, table, cache = tiny_volumes
    cfg = _data_cfg(grid_hw=[32, 40], patch_size=[4, 16, 16])
    ds = PatchDataset(table, cache, cfg, patches_per_volume=2, train=False, hflip=1.0)
    for index in range(len(ds)):
        assert torch.equal(ds[index]["image"], ds[index]["image"])
    # Foreground bias: half the patches (on average) centred on an organ voxel.
    biased = PatchDataset(table, cache, cfg, 40, train=True, seed=0, fg_fraction=1.0)
    assert np.mean([biased[i]["mask"].any().item() for i in range(len(biased))]) == 1.0
    uniform = PatchDataset(table, cache, cfg, 40, train=True, seed=0, fg_fraction=0.0)
    assert np.mean([uniform[i]["mask"].any().item() for i in range(len(uniform))]) < 1.0


def test_patch_dataset_needs_masks_and_fitting_sizes(tiny_volumes) -> None:
    _, table, cache = tiny_volumes
    with pytest.raises(ConfigError, match=r"data.patch_size: .* must fit in data.grid_hw"):
        data = {"grid_hw": [32, 32], "patch_size": [8, 64, 32]}
        config_from_dict({"model": {"kind": "3d", "arch": "SegResNet"}, "data": data})
    no_masks = VolumeCache(table, with_masks=False, progress=False)
    with pytest.raises(DataError, match="without masks"):
        PatchDataset(table, no_masks, _data_cfg(grid_hw=[32, 32], patch_size=[8, 32, 32]))


def test_patch_dataset_pickles_without_volumes(tiny_volumes) -> None:
    import pickle

    _, table, cache = tiny_volumes
    ds = PatchDataset(table, cache, _data_cfg(grid_hw=[32, 40], patch_size=[4, 16, 16]))
    assert len(pickle.dumps(ds)) < 20_000
    loader = DataLoader(ds, batch_size=2, num_workers=1)
    batch = next(iter(loader))
    assert batch["image"].shape == (2, 1, 4, 16, 16) and batch["mask"].shape == (2, 3, 4, 16, 16)


# --------------------------------------------------------------------------- prediction


class _Skewed3d(nn.Module):
    """Position-dependent logits: an asymmetric 3D convolution of the input, for every class."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 3, 3, padding=1, bias=False)
        with torch.no_grad():
            kernel = torch.arange(27, dtype=torch.float32).reshape(3, 3, 3) / 10 - 1.3
            self.conv.weight.copy_(torch.stack([kernel, kernel.transpose(1, 2), -kernel])[:, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) * 3


def test_predict_volume3d_flip_views_are_flipped_back() -> None:
    torch.manual_seed(0)
    image = torch.rand(8, 16, 24)
    model = _Skewed3d()
    data = _data_cfg(grid_hw=[16, 24], patch_size=[8, 16, 24])  # one window: no blending
    x = image[None, None]

    def probs(flip: tuple[int, ...]) -> torch.Tensor:
        view = x.flip(flip) if flip else x
        out = torch.sigmoid(model(view))
        return (out.flip(flip) if flip else out)[0].permute(1, 0, 2, 3)  # (D, 3, H, W)

    def predict(flips: list[str]) -> np.ndarray:
        infer = InferConfig().model_copy(update={"tta_flips": flips})
        return predict_volume3d([model], image.numpy(), (16, 24), data, infer, FP32)

    with torch.no_grad():
        plain, h, v = probs(()), probs((-1,)), probs((-2,))
        wrong = (plain + torch.sigmoid(model(x.flip(-1)))[0].permute(1, 0, 2, 3)) / 2
    np.testing.assert_allclose(predict([]), plain.numpy(), atol=1e-5)
    got = predict(["hflip"])
    np.testing.assert_allclose(got, ((plain + h) / 2).numpy(), atol=1e-5)
    assert np.abs(got - wrong.numpy()).max() > 0.05
    np.testing.assert_allclose(
        predict(["hflip", "vflip"]), ((plain + h + v) / 3).numpy(), atol=1e-5
    )
    with pytest.raises(ConfigError, match=r"infer.tta_flips: unknown flip 'rot90'"):
        predict(["rot90"])


class _Bright(nn.Module):
    """Logits from the input alone: class c is 'on' where the input exceeds 0.5."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.repeat(1, 3, 1, 1, 1) - 0.5) * 40


def test_predict_volume3d_native_size_windows_and_ensemble_mean() -> None:
    depth, grid = 11, (32, 32)
    image = np.zeros((depth, *grid), dtype=np.float32)
    image[:, :16, :8] = 1.0  # top-left: rows 0-15 of 32, columns 0-7 of 32
    data = _data_cfg(grid_hw=list(grid), patch_size=[8, 16, 16])  # several overlapping windows
    infer = InferConfig().model_copy(update={"tta_flips": ["hflip"], "sw_overlap": 0.5})
    out = predict_volume3d([_Bright()], image, (310, 360), data, infer, FP32)
    assert out.shape == (depth, 3, 310, 360) and out.dtype == np.float32
    on = out[:, 0] > 0.5
    # H is the first in-plane axis: the bright block is in rows < 155 and columns < 90.
    assert on[:, :150, :85].all() and not on[:, 160:].any() and not on[:, :, 95:].any()
    # Two models: the mean of their probabilities.
    zero = _Skewed3d()
    with torch.no_grad():
        zero.conv.weight.zero_()
    both = predict_volume3d([_Bright(), zero], image, (310, 360), data, infer, FP32)
    np.testing.assert_allclose(both, (out + 0.5) / 2, atol=1e-5)


# --------------------------------------------------------------------------- learning


def test_demo_recipe_learns_the_synthetic_data(synthetic_set) -> None:
    """demo_cpu_3d's network and settings on a coarser grid (32 x 32, patches 16 x 32 x 32, to
    keep the test short), a plain loop: the loss falls, and on held-out case-days the organs are
    found (voxel Dice per class at the native slice size, where an all-empty prediction scores
    0 and predicting each organ everywhere about 0.1). About 110 s on 2 cores under a load of 8
    (measured); expect a third of that on idle cores."""
    start = time.perf_counter()
    torch.manual_seed(0)
    cfg = load_config(
        CONFIG_DIR / "demo_cpu_3d.yaml", ["data.grid_hw=[32, 32]", "data.patch_size=[16, 32, 32]"]
    )
    table = load_folds(synthetic_set.folds_csv, load_train_table(synthetic_set.root))
    cache = VolumeCache(table, progress=False)
    train, val = table[table["fold"] != 0], table[table["fold"] == 0]
    ds = PatchDataset(train, cache, cfg.data, patches_per_volume=8, seed=0)
    loader = DataLoader(ds, cfg.train.batch_size, shuffle=True, drop_last=True)
    model = build_model3d(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), cfg.train.lr, weight_decay=cfg.train.weight_decay)
    losses = []
    for _ in range(EPOCHS):
        for batch in loader:
            loss = _soft_dice_bce(model(batch["image"]), batch["mask"])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    k = max(len(losses) // 4, 1)
    assert np.mean(losses[-k:]) < 0.7 * np.mean(losses[:k])

    model.eval()
    inter, total, organ, voxels = np.zeros(3), np.zeros(3), np.zeros(3), 0
    for ids in case_day_ids(val).values():
        image, _ = load_volume(cache, ids, tuple(cfg.data.grid_hw), with_mask=False)
        info, _ = cache.locate(ids[0])
        probs = predict_volume3d(
            [model], image, (info.height, info.width), cfg.data, cfg.infer, FP32
        )
        assert probs.shape == (len(ids), 3, info.height, info.width)
        pred = probs > 0.5
        truth = np.stack([cache.mask(i).transpose(2, 0, 1) for i in ids]).astype(bool)
        inter += (pred & truth).sum((0, 2, 3))
        total += pred.sum((0, 2, 3)) + truth.sum((0, 2, 3))
        organ += truth.sum((0, 2, 3))
        voxels += truth[:, 0].size
    dice = 2 * inter / np.maximum(total, 1)
    everywhere = 2 * organ / (voxels + organ)  # the Dice of predicting every organ everywhere
    print(f"3D demo recipe: held-out Dice {np.round(dice, 3)} (everywhere "
          f"{np.round(everywhere, 3)}), {len(losses)} steps, "
          f"{time.perf_counter() - start:.0f} s")  # fmt: skip
    assert dice.mean() > max(0.25, 2 * everywhere.mean())
    assert (dice > everywhere).all()
