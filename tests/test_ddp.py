"""DistributedDataParallel (torchrun, gloo on CPU) with the encoder families the shipped configs
use: smp's EfficientNet (default.yaml's efficientnet-b7, here its small sibling b0) and timm's
MobileNetV3 (demo_cpu.yaml). DDP without unused-parameter search fails at the second step when
the encoder keeps modules its forward never calls; these runs take several steps."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
from conftest import needs_torchrun, run_torchrun

from gitract.data.folds import create_folds_file, load_folds
from gitract.data.layout import load_train_table
from gitract.data.synthetic import generate

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo_cpu.yaml"


@pytest.fixture(scope="module")
def ddp_set(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(data root, folds.csv): 3 cases of 8-slice days in 2 folds, a few steps per rank."""
    base = tmp_path_factory.mktemp("ddp")
    generate(base / "data", base / "labels", n_cases=3, n_slices=8, seed=3, workers=1)
    create_folds_file(base / "data", base / "folds.csv", n_splits=2, seed=0)
    return base / "data", base / "folds.csv"


@needs_torchrun
@pytest.mark.parametrize("encoder", ["efficientnet-b0", "tu-mobilenetv3_small_100"])
def test_torchrun_trains_several_steps(ddp_set: tuple[Path, Path], tmp_path: Path, encoder: str):
    data, folds_csv = ddp_set
    table = load_folds(folds_csv, load_train_table(data))
    n_train = int((table["fold"] != 0).sum())
    # At least 3 optimizer steps on each of the 2 ranks at batch 2: the crash came at the second.
    assert n_train // (2 * 2) >= 3, f"only {n_train} training slices"
    done = run_torchrun(
        "scripts/train.py", "--fold", "0", "--config", str(DEMO),
        "--data-dir", str(data), "--folds-csv", str(folds_csv),
        "--out-dir", str(tmp_path), "--no-progress", "--set",
        f"model.encoder_name={encoder}", "data.img_size=[64, 64]", "data.num_workers=0",
        "train.batch_size=2", "train.epochs=1",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("training demo_cpu fold 0 on cpu x2") == 1
    run_dir = tmp_path / "demo_cpu" / "fold0"
    assert {"best.pt", "last.pt", "history.csv", "config.yaml"} <= {
        p.name for p in run_dir.iterdir()
    }
    history = pd.read_csv(run_dir / "history.csv")
    assert len(history) == 1 and math.isfinite(history["train_loss"].iloc[0])
