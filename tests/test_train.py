"""Training on synthetic data (CPU): it learns, it resumes after a kill, it scales out, and
its outputs follow the train.py contract."""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from gitract.config import load_config
from gitract.data import CLASSES, load_train_table
from gitract.engine import fit, lr_at
from gitract.errors import TrainingError
from gitract.folds import load_folds

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo_cpu.yaml"
# Small and quick: 64x64 canvas, no workers (tests run side by side on 2 cores).
FAST = ["data.img_size=[64, 64]", "data.num_workers=0", "train.batch_size=8"]


def _train_cmd(synthetic_set, out_dir: Path, *overrides: str, fold: int = 0) -> list[str]:
    return [
        "scripts/train.py", "--fold", str(fold), "--config", str(DEMO),
        "--data-dir", str(synthetic_set.root), "--folds-csv", str(synthetic_set.folds_csv),
        "--out-dir", str(out_dir), "--no-progress", "--set", *FAST, *overrides,
    ]  # fmt: skip


def _empty_prediction_dice(synthetic_set, fold: int) -> float:
    """Per-image Dice of predicting nothing: the share of (slice, class) pairs that are empty."""
    table = load_folds(synthetic_set.folds_csv, load_train_table(synthetic_set.root))
    val = table[table["fold"] == fold]
    return float((val[list(CLASSES)] == "").to_numpy().mean())


@pytest.fixture(scope="module")
def trained_run(synthetic_set, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    cfg = load_config(DEMO, [*FAST, "train.epochs=10", "train.lr=3e-3"])
    return fit(cfg, 0, synthetic_set.root, synthetic_set.folds_csv, out, progress=False)


def test_training_learns_held_out_cases(trained_run: Path, synthetic_set) -> None:
    history = pd.read_csv(trained_run / "history.csv")
    assert history["epoch"].tolist() == list(range(1, 11))
    assert history["train_loss"].iloc[-1] < 0.6 * history["train_loss"].iloc[0]
    assert history["val_loss"].iloc[-1] < history["val_loss"].iloc[0]
    baseline = _empty_prediction_dice(synthetic_set, fold=0)
    best = history["val_dice"].max()
    assert best > history["val_dice"].iloc[0]
    assert best >= baseline + 0.15, (best, baseline)
    for name in CLASSES:
        assert history[f"val_dice_{name}"].max() > 0.5


def test_run_folder_follows_the_contract(trained_run: Path) -> None:
    assert trained_run.parts[-2:] == ("demo_cpu", "fold0")
    for name in ("best.pt", "last.pt", "history.csv", "config.yaml", "curves.png"):
        assert (trained_run / name).is_file(), name
    assert not [p for p in trained_run.iterdir() if p.name.startswith(".")]  # no temp files left
    history = pd.read_csv(trained_run / "history.csv")
    for column in ("epoch", "train_loss", "val_loss", "val_dice", "val_iou", "lr", "seconds"):
        assert column in history
    best = torch.load(trained_run / "best.pt", map_location="cpu", weights_only=True)
    assert best["config"]["model"]["encoder_name"] == load_config(DEMO).model.encoder_name
    assert best["meta"]["val_dice"] == pytest.approx(history["val_dice"].max())
    last = torch.load(trained_run / "last.pt", map_location="cpu", weights_only=True)
    assert last["epoch"] == 10 and {"optimizer", "scaler", "scheduler", "rng"} <= set(last)
    assert load_config(trained_run / "config.yaml").train.epochs == 10


def test_learning_rate_warms_up_then_decays_to_min() -> None:
    lrs = [lr_at(s, 100, 10, 1e-3, 1e-5) for s in range(101)]
    assert lrs[0] == pytest.approx(1e-5)
    assert lrs[10] == pytest.approx(1e-3)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11], strict=True))
    assert all(a >= b for a, b in zip(lrs[10:-1], lrs[11:], strict=True))
    assert lrs[100] == pytest.approx(1e-5)


def test_killed_run_resumes_to_the_planned_epochs(synthetic_set, tmp_path: Path) -> None:
    cmd = [sys.executable, *_train_cmd(synthetic_set, tmp_path, "train.epochs=3")]
    run_dir = tmp_path / "demo_cpu" / "fold0"
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while not (run_dir / "last.pt").exists():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "no checkpoint within 240 s"
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)  # mid-epoch 2: no chance to clean up
    finally:
        proc.kill()
        proc.wait()
    killed_after = torch.load(run_dir / "last.pt", weights_only=True)["epoch"]
    assert killed_after < 3

    done = subprocess.run([*cmd, "--resume"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert f"resuming {run_dir} after epoch {killed_after}" in done.stdout
    history = pd.read_csv(run_dir / "history.csv")
    assert history["epoch"].tolist() == [1, 2, 3]
    last = torch.load(run_dir / "last.pt", weights_only=True)
    assert last["epoch"] == 3
    best = torch.load(run_dir / "best.pt", weights_only=True)
    assert best["meta"]["val_dice"] == pytest.approx(history["val_dice"].max())


@pytest.mark.skipif(shutil.which("torchrun") is None and not Path(sys.executable).with_name(
    "torchrun").exists(), reason="torchrun not installed")  # fmt: skip
def test_torchrun_two_processes_write_one_set_of_outputs(synthetic_set, tmp_path: Path) -> None:
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [
        str(torchrun), "--standalone", "--nproc_per_node=2",
        *_train_cmd(synthetic_set, tmp_path, "train.epochs=1"),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("training demo_cpu fold 0 on cpu x2") == 1
    run_dir = tmp_path / "demo_cpu" / "fold0"
    names = sorted(p.name for p in run_dir.iterdir())
    assert names == ["best.pt", "config.yaml", "curves.png", "history.csv", "last.pt"]
    history = pd.read_csv(run_dir / "history.csv")
    assert len(history) == 1 and not math.isnan(history["val_dice"].iloc[0])


def test_non_finite_loss_stops_with_the_step(synthetic_set, tmp_path: Path, monkeypatch) -> None:
    import gitract.engine as engine

    class NaNLoss(torch.nn.Module):
        def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            return logits.mean() * float("nan")

    monkeypatch.setattr(engine, "build_loss", lambda _: NaNLoss())
    cfg = load_config(DEMO, [*FAST, "train.epochs=1"])
    with pytest.raises(
        TrainingError, match=r"non-finite training loss \(nan\) at epoch 1, batch 0"
    ):
        fit(cfg, 0, synthetic_set.root, synthetic_set.folds_csv, tmp_path, progress=False)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.epoch=3", "unknown key 'train.epoch' (did you mean 'train.epochs'?)"),
        ("train.epochs=three", "'train.epochs' must be int"),
    ],
)
def test_config_errors_are_one_line(synthetic_set, tmp_path: Path, override, message) -> None:
    cmd = [sys.executable, *_train_cmd(synthetic_set, tmp_path, override)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2
    assert message in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "demo_cpu").exists()
