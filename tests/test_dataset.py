"""The volume cache and the 2.5D dataset, checked against the PNGs and masks on disk."""

from __future__ import annotations

import os
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import pytest

from gitract.config import load_config
from gitract.data.cache import PERCENTILES, VolumeCache
from gitract.data.layout import load_train_table
from gitract.data.slices import (
    IntensityJitter,
    RandomWarp,
    SliceDataset,
    build_train_transform,
    slice_offsets,
)

ROOT = Path(__file__).resolve().parents[1]


def _data_cfg(*overrides: str):
    return load_config(ROOT / "configs" / "demo_cpu.yaml", list(overrides)).data


@pytest.fixture
def cache(tiny_kaggle, tmp_path: Path) -> VolumeCache:
    return VolumeCache(load_train_table(tiny_kaggle.root), tmp_path / "cache", progress=False)


def test_slice_offsets() -> None:
    assert slice_offsets(3, 2) == [-2, 0, 2]
    assert slice_offsets(5, 1) == [-2, -1, 0, 1, 2]
    assert slice_offsets(1, 2) == [0]


def test_stack_is_the_neighbours_clamped_at_volume_ends(tiny_kaggle, cache) -> None:
    ids = tiny_kaggle.ids("case1_day0")  # 4 slices, 360 wide x 310 high
    info, _ = cache.locate(ids[0])
    assert (info.height, info.width, info.depth) == (310, 360, 4)
    volume = np.stack([tiny_kaggle.images[i] for i in ids]).astype(np.float32)
    lo, hi = np.percentile(volume[:, ::2, ::2], PERCENTILES)
    assert (info.lo, info.hi) == pytest.approx((lo, hi))
    expected_neighbours = {0: [0, 0, 2], 1: [0, 1, 3], 3: [1, 3, 3]}
    for z, zs in expected_neighbours.items():
        stack = cache.image_stack(ids[z], slice_offsets(3, 2))
        assert stack.shape == (310, 360, 3) and stack.dtype == np.float32
        for channel, k in enumerate(zs):
            raw = np.clip((volume[k] - lo) / (hi - lo), 0, 1)
            np.testing.assert_allclose(stack[..., channel], raw, rtol=1e-5, atol=1e-6)


def test_cached_masks_equal_the_annotations(tiny_kaggle, cache) -> None:
    for slice_id, mask in tiny_kaggle.masks.items():
        if slice_id.startswith("case7_day0"):  # excluded by default
            continue
        np.testing.assert_array_equal(cache.mask(slice_id), mask)


def test_cache_is_built_once_and_rebuilt_when_data_change(tiny_kaggle, tmp_path: Path) -> None:
    table = load_train_table(tiny_kaggle.root)
    VolumeCache(table, tmp_path / "c", progress=False)
    files = sorted((tmp_path / "c").iterdir())
    stamps = [f.stat().st_mtime_ns for f in files]
    VolumeCache(table, tmp_path / "c", progress=False)
    assert sorted((tmp_path / "c").iterdir()) == files
    assert [f.stat().st_mtime_ns for f in files] == stamps
    # A slice rewritten on disk changes its case-day's key: that volume alone is rebuilt.
    path = tiny_kaggle.paths[tiny_kaggle.ids("case2_day0")[1]]
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    VolumeCache(table, tmp_path / "c", progress=False)
    new = sorted(set((tmp_path / "c").iterdir()) - set(files))
    assert [f.name.split("-")[0] for f in new] == ["case2_day0"] * 3


def test_dataset_items_on_the_canvas(tiny_kaggle, cache) -> None:
    table = load_train_table(tiny_kaggle.root)
    data = _data_cfg("data.img_size=[128, 160]")
    ds = SliceDataset(table, cache, data)
    assert len(ds) == len(table)
    for index in range(len(ds)):
        item = ds[index]
        assert item["image"].shape == (3, 128, 160) and item["mask"].shape == (3, 128, 160)
        assert item["id"] == table["id"].iloc[index]
        row = table.iloc[index]
        assert tuple(item["orig_hw"].tolist()) == (row["height"], row["width"])
        assert set(np.unique(item["mask"].numpy())) <= {0.0, 1.0}
        # The mask comes back to the slice's own size through the letterbox's inverse.
        back = ds.letterbox(index).invert(item["mask"].numpy())
        truth = tiny_kaggle.masks[item["id"]].transpose(2, 0, 1)
        assert np.mean((back > 0.5) == truth) > 0.98


def test_z_channel_is_the_relative_position_and_escapes_augmentation(tiny_kaggle, cache) -> None:
    cfg = load_config(
        ROOT / "configs" / "demo_cpu.yaml",
        ["data.z_channel=true", "train.aug_brightness=1.0", "train.aug_ssr=1.0"],
    )
    assert cfg.data.in_channels == 4
    table = load_train_table(tiny_kaggle.root)
    ds = SliceDataset(table, cache, cfg.data, build_train_transform(cfg.train))
    ds.transform.set_random_seed(0)
    plain = SliceDataset(table, cache, _data_cfg())
    for index in range(len(ds)):
        image = ds[index]["image"].numpy()
        row = table.iloc[index]
        depth = int((table["case_day"] == row["case_day"]).sum())
        position = list(table.loc[table["case_day"] == row["case_day"], "id"]).index(row["id"])
        assert image.shape[0] == 4
        np.testing.assert_array_equal(image[3], np.float32(position / depth))
        assert image[:3].shape == plain[index]["image"].shape


def test_train_transform_moves_image_and_mask_together(tiny_kaggle, cache) -> None:
    cfg = load_config(ROOT / "configs" / "demo_cpu.yaml", ["train.aug_hflip=1.0"])
    table = load_train_table(tiny_kaggle.root)
    plain = SliceDataset(table, cache, cfg.data)
    flipped = SliceDataset(table, cache, cfg.data, build_train_transform(cfg.train))
    flipped.transform.set_random_seed(0)
    index = table.index[table["id"] == tiny_kaggle.ids("case1_day0")[2]][0]
    a, b = plain[index], flipped[index]
    # Every transform but the certain flip is random; with a fixed seed, compare their masks'
    # mass, which no flip, shift or rotation by small amounts changes much.
    assert b["mask"].sum() == pytest.approx(a["mask"].sum().item(), rel=0.25)
    only_flip = load_config(
        ROOT / "configs" / "demo_cpu.yaml",
        ["train.aug_hflip=1.0", "train.aug_ssr=0", "train.aug_brightness=0"],
    )
    ds = SliceDataset(table, cache, cfg.data, build_train_transform(only_flip.train))
    c = ds[index]
    np.testing.assert_array_equal(c["mask"].numpy(), a["mask"].numpy()[..., ::-1])
    np.testing.assert_allclose(c["image"].numpy(), a["image"].numpy()[..., ::-1])


# ------------------------------------------------------------------ augmentations that act


def _coordinate_image(height: int, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A float image whose channels are each pixel's x, its y, and 1 (0 marks the fill)."""
    yy, xx = np.mgrid[:height, :width].astype(np.float32)
    return np.stack([xx, yy, np.ones_like(xx)], axis=-1), xx, yy


def _displacements(transform: A.BasicTransform, runs: int = 8) -> np.ndarray:
    """Mean displacement (px) of the pixels that stay inside, one value per run, at 320x384."""
    image, xx, yy = _coordinate_image(320, 384)
    mask = np.zeros((320, 384, 3), dtype=np.uint8)
    pipeline = A.Compose([transform])
    pipeline.set_random_seed(0)
    means = []
    for _ in range(runs):
        out = pipeline(image=image, mask=mask)["image"]
        inside = out[..., 2] > 0.999  # linear interpolation of x and y is exact there
        means.append(np.hypot(out[..., 0] - xx, out[..., 1] - yy)[inside].mean())
    return np.asarray(means)


def _warp_of_default_pipeline() -> RandomWarp:
    cfg = load_config(ROOT / "configs" / "default.yaml")
    warps = [t for t in build_train_transform(cfg.train).transforms if isinstance(t, RandomWarp)]
    assert len(warps) == 1
    return warps[0]


@pytest.mark.parametrize("part", ["elastic", "affine", "both"])
def test_each_distortion_visibly_deforms(part: str) -> None:
    warp = _warp_of_default_pipeline()
    assert warp.p_affine > 0 and warp.p_elastic > 0  # default.yaml turns both on
    warp.p_affine = 1.0 if part in ("affine", "both") else 0.0
    warp.p_elastic = 1.0 if part in ("elastic", "both") else 0.0
    moved = _displacements(warp)
    # Visible, yet anatomy stays anatomy: a few pixels on average for the elastic field (the
    # affine moves them more). albumentations' ElasticTransform(alpha=1, sigma=50): 0.005 px.
    assert moved.min() > 1.5, f"{part} moves pixels by {moved} px only"
    assert moved.max() < (8 if part == "elastic" else 60)
    assert moved.std() > 0  # a different field each time


def test_albumentations_default_elastic_would_fail_the_displacement_check() -> None:
    """The check above can fail: the old ElasticTransform(alpha=1, sigma=50) barely moves."""
    old = A.ElasticTransform(alpha=1.0, sigma=50, border_mode=cv2.BORDER_CONSTANT, p=1.0)
    assert _displacements(old, runs=2).max() < 0.1


@pytest.mark.parametrize("p_affine", [0.0, 1.0])
def test_warp_moves_mask_with_image_and_is_seeded(p_affine: float) -> None:
    image, _, _ = _coordinate_image(96, 128)
    mask = np.zeros((96, 128, 3), dtype=np.uint8)
    mask[30:60, 40:90, 1] = 1
    image[..., 0] = mask[..., 1]  # channel 0: the mask, interpolated linearly

    def run() -> dict:
        warp = RandomWarp(p_affine=p_affine, p_elastic=1.0, max_shift=0.05)
        return A.Compose([warp], seed=3)(image=image, mask=mask)

    first, again = run(), run()
    np.testing.assert_array_equal(first["mask"], again["mask"])
    assert first["mask"].dtype == np.uint8 and set(np.unique(first["mask"])) <= {0, 1}
    assert first["mask"].shape == mask.shape
    assert not np.array_equal(first["mask"], mask)  # it moved...
    # ...and the image moved the same way: the warped mask is where the warped channel is.
    agree = (first["image"][..., 0] > 0.5) == (first["mask"][..., 1] == 1)
    assert agree.mean() > 0.99


def test_intensity_jitter_scales_and_shifts_float_images() -> None:
    rng = np.random.default_rng(0)
    image = rng.random((64, 80, 3), dtype=np.float32)
    pipeline = A.Compose([IntensityJitter(brightness=0.1, contrast=0.1, p=1.0)], seed=0)
    outs = [pipeline(image=image)["image"] for _ in range(6)]
    for out in outs:
        assert out.dtype == np.float32 and out.shape == image.shape
        # out = image * a + b with a in [0.9, 1.1], b in [-0.1, 0.1]: fit a and b.
        a, b = np.polyfit(image.ravel(), out.ravel(), 1)
        assert 0.9 <= a <= 1.1 and -0.1 <= b <= 0.1
        np.testing.assert_allclose(out, image * a + b, atol=1e-5)
    assert len({round(float(o.mean()), 6) for o in outs}) == len(outs)


def test_train_crop_items_are_windows_of_the_validation_canvas(tiny_kaggle, cache) -> None:
    # data.train_crop: training items (built as train.py builds them, reseeded per item) are
    # random windows of the canvas, the same window of image and mask; validation and
    # prediction items keep the whole canvas, whose inverse goes back to each slice's size.
    from gitract.models.kind2d import KIND_2D
    from gitract.training.sampling import SeededItems

    no_aug = [f"train.aug_{name}=0" for name in ("hflip", "vflip", "ssr", "distort", "brightness")]
    size = ["data.img_size=[128, 160]", "data.resize_mode=resize"]
    crop = "data.train_crop=[64, 96]"
    cfg = load_config(ROOT / "configs" / "demo_cpu.yaml", [*size, crop, *no_aug])
    table = load_train_table(tiny_kaggle.root)
    train = SeededItems(KIND_2D.train_dataset(cfg, table, cache))
    full = SliceDataset(table, cache, cfg.data)  # what validation and predict_slices build
    index = int(np.argmax([tiny_kaggle.masks[i].sum() for i in table["id"]]))
    whole = full[index]
    assert whole["image"].shape == (3, 128, 160) and whole["mask"].shape == (3, 128, 160)
    truth = tiny_kaggle.masks[whole["id"]].transpose(2, 0, 1)
    back = full.letterbox(index).invert(whole["mask"].numpy())
    assert back.shape == truth.shape  # scaled down here: exact on 640 (test_geometry.py)
    assert np.mean((back > 0.5) == truth) > 0.98
    image, mask = whole["image"].numpy(), whole["mask"].numpy()
    offsets = set()
    for seed in range(12):
        item = train[index, seed]
        crop, crop_mask = item["image"].numpy(), item["mask"].numpy()
        assert crop.shape == (3, 64, 96) and crop_mask.shape == (3, 64, 96)
        found = [
            (top, left)
            for top in range(128 - 64 + 1)
            for left in range(160 - 96 + 1)
            if np.array_equal(image[:, top : top + 64, left : left + 96], crop)
        ]
        assert found, "the crop is not a window of the canvas"
        assert any(
            np.array_equal(mask[:, t : t + 64, left : left + 96], crop_mask) for t, left in found
        )
        offsets.add(found[0])
    assert len(offsets) > 6  # the windows vary from one item seed to the next


def test_first_place_2d_recipe_trains_on_448_windows_of_the_640_canvas(tiny_kaggle, cache) -> None:
    from gitract.models.kind2d import KIND_2D

    cfg = load_config(ROOT / "configs" / "recipe_1st_2d.yaml", ["data.num_workers=0"])
    table = load_train_table(tiny_kaggle.root).iloc[:2]
    train = KIND_2D.train_dataset(cfg, table, cache)
    train.transform.set_random_seed(0)
    item = train[0]
    assert item["image"].shape == (3, 448, 448) and item["mask"].shape == (3, 448, 448)
    whole = SliceDataset(table, cache, cfg.data)[0]  # validation and prediction
    assert whole["image"].shape == (3, 640, 640) and whole["mask"].shape == (3, 640, 640)
