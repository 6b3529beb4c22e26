"""Whole-volume validation of a 3D model scores on the model's device: the same loss, Dice/IoU
and competition score as the earlier host computation on the predictor's numpy probabilities,
with no float volume copied to the host on the way."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from gitract.config import Config, load_config
from gitract.data.cache import VolumeCache
from gitract.data.folds import load_folds
from gitract.data.layout import CLASSES, load_train_table
from gitract.models.kind import DayPrediction, ModelKind
from gitract.models.kind3d import Kind3D
from gitract.models.kinds import kind_of
from gitract.scoring.metrics import SegMetricAccumulator, VolumeScoreAccumulator
from gitract.training.distributed import DistContext
from gitract.training.engine import Loop, build_loop, validate_volumes
from gitract.training.validation import shard_case_days

ROOT = Path(__file__).resolve().parents[1]
DEMO_3D = ROOT / "configs" / "demo_cpu_3d.yaml"
FAST_3D = ["data.grid_hw=[32, 32]", "data.patch_size=[16, 32, 32]", "data.num_workers=0"]
CPU = torch.device("cpu")


def _host_reference(
    loop: Loop, model: torch.nn.Module, table: pd.DataFrame, cache: VolumeCache
) -> dict[str, float]:
    """validate_volumes as it was: the predictor's numpy days, scored on the host."""
    cfg = loop.cfg
    acc = SegMetricAccumulator(CLASSES, threshold=cfg.train.threshold)
    scorer = VolumeScoreAccumulator(cfg.train.select_metric)
    loss_sum, n_seen = 0.0, 0
    with torch.inference_mode():
        for day in kind_of(cfg).predictor([model], cfg, loop.precision).days(table, cache):
            ids, probs = day.ids, day.probs
            truth = np.stack([cache.mask(i).transpose(2, 0, 1) for i in ids]).astype(np.float32)
            p, t = torch.from_numpy(probs), torch.from_numpy(truth)
            logits = torch.logit(p.clamp(1e-6, 1 - 1e-6))
            loss_sum += loop.loss_fn(logits, t).item() * len(ids)
            n_seen += len(ids)
            acc.update(p, t)
            scorer.add(probs > cfg.train.threshold, truth.astype(bool))
    metrics = {"val_loss": loss_sum / n_seen}
    metrics.update({f"val_{k}": v for k, v in acc.compute().items()})
    result = scorer.compute()
    metrics["val_score"], metrics["val_hausdorff"] = result["score"], result["hausdorff"]
    return metrics


@pytest.fixture(scope="module")
def setup(synthetic_set) -> tuple[Config, Loop, torch.nn.Module, pd.DataFrame, VolumeCache]:
    torch.manual_seed(0)
    cfg = load_config(DEMO_3D, FAST_3D)
    loop, state = build_loop(cfg, DistContext(0, 1, 0, CPU), 10, progress=False)
    model = state.model.eval()
    with torch.no_grad():  # spread the untrained network's probabilities around 0.5
        for param in model.parameters():
            param.mul_(3.0)
    table = load_folds(synthetic_set.folds_csv, load_train_table(synthetic_set.root))
    val = shard_case_days(table[table["fold"] == 0], 0, 1)
    cache = VolumeCache(val, None, with_masks=True, progress=False)
    return cfg, loop, model, val, cache


def test_validation_on_the_device_matches_the_host_computation(setup, monkeypatch) -> None:
    cfg, loop, model, val, cache = setup
    reference = _host_reference(loop, model, val, cache)
    # Every tensor that reaches numpy during validation: only bool masks and small sums.
    to_numpy, seen = torch.Tensor.numpy, []

    def spy(self: torch.Tensor, *args, **kwargs) -> np.ndarray:
        seen.append((self.dtype, self.numel()))
        return to_numpy(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "numpy", spy)
    metrics = validate_volumes(loop, val, cache, model)
    monkeypatch.undo()
    assert set(metrics) == set(reference)
    assert 0.0 < reference["val_dice"] < 1.0 and 0.0 < reference["val_hausdorff"] < 1.0
    for key, value in reference.items():
        assert metrics[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    assert any(dtype is torch.bool for dtype, _ in seen)  # the prediction, for the Hausdorff
    floats = [(dtype, n) for dtype, n in seen if dtype.is_floating_point and n > 64]
    assert not floats, floats


def test_validation_days_are_the_predictors_days(setup) -> None:
    """The device tensors validation scores hold exactly what inference's days() yields."""
    cfg, loop, model, val, cache = setup
    kind = kind_of(cfg)
    with torch.inference_mode():
        host = list(kind.predictor([model], cfg, loop.precision).days(val, cache))
        device = list(kind.validation_days([model], cfg, loop.precision, val, cache))
    assert [d.case_day for d in device] == [d.case_day for d in host]
    for a, b in zip(device, host, strict=True):
        assert a.ids == b.ids and a.probs.device == loop.precision.device
        assert a.probs.dtype is torch.float32
        assert np.array_equal(a.probs.cpu().numpy(), b.probs)


_RAMP = np.linspace(0, 1, 2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)


class _HostOnlyKind(Kind3D):
    """A kind whose predictor yields numpy days only: it takes the interface's default."""

    validation_days = ModelKind.validation_days

    def predictor(self, models, cfg, precision, *, batch_size=None, num_workers=0):
        class Fixed:
            def days(self, table, cache, progress=True) -> Iterator[DayPrediction]:
                yield DayPrediction("case1_day1", ["a", "b"], _RAMP)

        return Fixed()


def test_the_default_validation_days_move_numpy_days_to_the_device(setup) -> None:
    cfg, loop, model, val, cache = setup
    (day,) = _HostOnlyKind().validation_days([model], cfg, loop.precision, val, cache)
    assert day.case_day == "case1_day1" and day.ids == ["a", "b"]
    assert day.probs.device == loop.precision.device and day.probs.shape == (2, 3, 4, 5)
    assert np.array_equal(day.probs.cpu().numpy(), _RAMP)


def test_quick_val3d_benchmark_agrees_and_reports_both_paths(tmp_path: Path) -> None:
    """scripts/benchmark.py's val3d part at tiny sizes: the old and the device scoring agree
    (the benchmark asserts it) and both timings are reported."""
    out = tmp_path / "bench.json"
    # This tree's gitract first, whichever checkout the environment has installed.
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--quick", "--only", "val3d",
         "--json", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": path},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    for key in ("before", "after"):
        seconds = results[f"val3d_seconds_per_case_day_{key}"]
        assert seconds > results["val3d_predict_seconds"] > 0, key
    assert results["val3d_case_day"][0] == 16
