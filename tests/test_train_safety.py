"""Training that cannot go silently wrong, through the code a GPU runs (CPU autocast in fp16
with GradScaler("cpu") or bf16, channels-last, EMA, an aux head, accumulation): a non-finite
loss is skipped, a non-finite input batch cannot poison BatchNorm's statistics, the EMA or
best.pt, and a non-finite validation is an error, never an improvement."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
import torch

from gitract.config import load_config
from gitract.data.folds import create_folds_file
from gitract.data.synthetic import generate
from gitract.errors import TrainingError
from gitract.training import engine, state
from gitract.training.engine import Loop, fit

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo_cpu.yaml"
GPU_RECIPE = [
    "data.img_size=[32, 32]", "data.num_workers=0", "train.batch_size=4", "train.epochs=2",
    "train.amp=true", "train.channels_last=true", "train.ema_decay=0.9",
    "model.aux_head=true", "train.accumulate=2",
]  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("safety")
    generate(root / "data", root / "labels", n_cases=3, n_slices=10, seed=4, workers=1)
    create_folds_file(root / "data", root / "folds.csv", n_splits=2, seed=0)
    return root / "data", root / "folds.csv"


def _finite(path: Path) -> bool:
    weights = torch.load(path, weights_only=True)["model"]
    return all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())


def _nan_loss_at(monkeypatch, k: int) -> None:
    """The ``k``-th training loss (1-based) is NaN: its step must be skipped."""
    build, calls = engine.build_loss, {"n": 0}

    def poisoned_loss(train_cfg):
        loss = build(train_cfg)
        forward = loss.forward

        def nan_at_k(*args, **kwargs):
            calls["n"] += 1
            out = forward(*args, **kwargs)
            return out * float("nan") if calls["n"] == k else out

        loss.forward = nan_at_k
        return loss

    monkeypatch.setattr(engine, "build_loss", poisoned_loss)


def _nan_pixel_in_batch(monkeypatch, k: int) -> None:
    """One NaN pixel in the ``k``-th training batch: its forward writes NaN into BatchNorm's
    running statistics before the step is skipped."""
    to_device, calls = Loop.to_device, {"n": 0}

    def poisoned_batch(self, batch):
        image, mask = to_device(self, batch)
        calls["n"] += 1
        if calls["n"] == k and self.net.training:
            image = image.clone()
            image[0, 0, 0, 0] = float("nan")
        return image, mask

    monkeypatch.setattr(Loop, "to_device", poisoned_batch)


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("fault", ["loss", "input"])
def test_the_gpu_recipe_survives_a_non_finite_batch(
    data, tmp_path, monkeypatch, capsys, dtype, fault
):
    data_dir, folds_csv = data
    cfg = load_config(DEMO, [*GPU_RECIPE, f"train.amp_dtype={dtype}"])
    if fault == "loss":
        _nan_loss_at(monkeypatch, 5)
    else:
        _nan_pixel_in_batch(monkeypatch, 5)
    run = fit(cfg, 0, data_dir, folds_csv, tmp_path / "runs", progress=False)

    out = capsys.readouterr().out
    history = pd.read_csv(run / "history.csv")
    assert list(history["epoch"]) == [1, 2]  # the run finished
    assert history["skipped"].sum() >= 1  # the poisoned step was skipped
    assert history[["train_loss", "val_loss", "val_dice", "val_score"]].notna().all().all()
    assert _finite(run / "best.pt") and _finite(run / "last.pt")
    last = torch.load(run / "last.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in last["ema"].values() if v.is_floating_point())
    assert last["meta"]["precision"] == {"dtype": dtype, "channels_last": True}
    if fault == "input":
        assert "non-finite BatchNorm statistics by global step" in out
        assert "put back those of step" in out
    else:
        assert "non-finite BatchNorm statistics" not in out


def test_without_the_guard_the_input_fault_would_poison_validation(data, tmp_path, monkeypatch):
    """The defect the guard fixes, reproduced: with the guard off, the same NaN pixel leaves
    NaN running statistics, validation (eval mode) predicts nothing (val_loss NaN) and, being
    non-finite, it is now an error instead of a silent "improvement"."""
    monkeypatch.setattr(engine._StatsGuard, "flag", lambda self: torch.zeros(()))
    _nan_pixel_in_batch(monkeypatch, 5)
    data_dir, folds_csv = data
    cfg = load_config(DEMO, [*GPU_RECIPE[:4], "train.epochs=1"])
    with pytest.raises(
        TrainingError, match=r"epoch 1: validation gave val_score [\d.]+, val_loss nan"
    ):
        fit(cfg, 0, data_dir, folds_csv, tmp_path / "runs", progress=False)
    assert not (tmp_path / "runs" / "demo_cpu" / "fold0" / "best.pt").exists()


def test_a_non_finite_validation_is_an_error_and_keeps_best(data, tmp_path, monkeypatch):
    data_dir, folds_csv = data
    cfg = load_config(DEMO, GPU_RECIPE[:4])
    validate = engine.validate
    calls = {"n": 0}

    def second_is_nan(*args, **kwargs):
        calls["n"] += 1
        metrics = validate(*args, **kwargs)
        return {**metrics, "val_score": math.nan} if calls["n"] == 2 else metrics

    monkeypatch.setattr(engine, "validate", second_is_nan)
    with pytest.raises(
        TrainingError, match=r"^epoch 2: validation gave val_score nan, .*best\.pt is kept"
    ):
        fit(cfg, 0, data_dir, folds_csv, tmp_path / "runs", progress=False)
    best = torch.load(tmp_path / "runs" / "demo_cpu" / "fold0" / "best.pt", weights_only=True)
    assert best["meta"]["epoch"] == 1


def test_fold_minus_one_saves_every_epoch_as_best(data, tmp_path) -> None:
    data_dir, folds_csv = data
    cfg = load_config(DEMO, GPU_RECIPE[:4])
    run = fit(cfg, -1, data_dir, folds_csv, tmp_path / "runs", progress=False)
    assert torch.load(run / "best.pt", weights_only=True)["meta"]["epoch"] == 2


def test_a_short_last_accumulation_group_is_a_mean() -> None:
    groups = [g for _, _, g in engine._micro_batches(list(range(5)), 2)]
    ends = [e for _, e, _ in engine._micro_batches(list(range(5)), 2)]
    assert groups == [2, 2, 2, 2, 1] and ends == [False, True, False, True, True]
    assert [g for _, _, g in engine._micro_batches(list(range(4)), 2)] == [2, 2, 2, 2]


@pytest.mark.parametrize(("version", "fused"), [((2, 3), False), ((2, 4), True)])
def test_fused_adamw_on_the_cpu_only_where_torch_has_it(monkeypatch, version, fused) -> None:
    monkeypatch.setattr(engine, "TORCH_VERSION", version)
    cfg = load_config(DEMO)
    optimizer = engine._optimizer(torch.nn.Linear(2, 2), cfg, torch.device("cpu"))
    assert bool(optimizer.defaults.get("fused")) is fused


def test_rng_state_of_the_current_cuda_device_only(monkeypatch) -> None:
    """Saved on an 8-GPU machine, resumed with CUDA_VISIBLE_DEVICES=3 (one device): each rank
    keeps and gets back its own device's stream (a mocked CUDA)."""
    streams = {k: torch.tensor([k], dtype=torch.uint8) for k in range(8)}
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": streams[5])
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device="cuda": restored.append(s))
    saved = state.capture_rng()
    assert len(saved["cuda"]) == 1 and torch.equal(saved["cuda"][0], streams[5])
    assert state.restore_rng([saved], rank=0, world_size=1, reseed=0) is None
    assert len(restored) == 1 and torch.equal(restored[0], streams[5])


def test_val_every_validates_every_nth_epoch_and_the_last(data, tmp_path) -> None:
    data_dir, folds_csv = data
    cfg = load_config(DEMO, [*GPU_RECIPE[:3], "train.epochs=3", "train.val_every=2"])
    run = fit(cfg, 0, data_dir, folds_csv, tmp_path / "runs", progress=False)
    history = pd.read_csv(run / "history.csv")
    assert history["val_score"].isna().tolist() == [True, False, False]
    assert torch.load(run / "best.pt", weights_only=True)["meta"]["epoch"] in (2, 3)
