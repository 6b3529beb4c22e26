"""The 3D model (model.kind: 3d) through the same training loop: it learns held-out cases,
and it trains under torchrun with EMA and resumes, like the 2.5D model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from conftest import needs_torchrun, run_torchrun

from gitract.config import load_config
from gitract.data.folds import load_folds
from gitract.data.layout import CLASSES, load_train_table
from gitract.data.rle import rle_decode
from gitract.scoring.metrics import VolumeScoreAccumulator
from gitract.training.engine import fit

ROOT = Path(__file__).resolve().parents[1]
DEMO_3D = ROOT / "configs" / "demo_cpu_3d.yaml"
# A coarser grid than the demo's, to keep the suite quick on 2 cores.
FAST_3D = ["data.grid_hw=[32, 32]", "data.patch_size=[16, 32, 32]", "data.num_workers=0"]


def _empty_prediction_score(synthetic_set, fold: int) -> float:
    """The competition score of predicting nothing on the fold's case-days."""
    table = load_folds(synthetic_set.folds_csv, load_train_table(synthetic_set.root))
    acc = VolumeScoreAccumulator("kaggle")
    for _, day in table[table["fold"] == fold].groupby("case_day"):
        hw = (int(day["height"].iloc[0]), int(day["width"].iloc[0]))
        truth = np.stack(
            [[rle_decode(r[c], hw) for c in CLASSES] for r in day.to_dict("records")]
        ).astype(bool)
        acc.add(np.zeros_like(truth), truth)
    return acc.compute()["score"]


def test_3d_model_learns_held_out_cases(synthetic_set, tmp_path: Path) -> None:
    cfg = load_config(DEMO_3D, [*FAST_3D, "train.epochs=15"])
    run_dir = fit(cfg, 0, synthetic_set.root, synthetic_set.folds_csv, tmp_path, progress=False)
    history = pd.read_csv(run_dir / "history.csv")
    assert history["train_loss"].iloc[-1] < 0.6 * history["train_loss"].iloc[0]
    assert history["val_loss"].iloc[-1] < history["val_loss"].iloc[0]
    # Per-slice Dice (both empty counts 1, as in the competition) above predicting nothing,
    # and the competition score well above it.
    table = load_folds(synthetic_set.folds_csv, load_train_table(synthetic_set.root))
    empty_dice = float((table.loc[table["fold"] == 0, list(CLASSES)] == "").to_numpy().mean())
    assert history["val_dice"].max() > empty_dice, (history["val_dice"].max(), empty_dice)
    baseline = _empty_prediction_score(synthetic_set, fold=0)
    assert history["val_score"].max() > baseline + 0.2, (history["val_score"].max(), baseline)
    best = torch.load(run_dir / "best.pt", weights_only=True)
    assert best["meta"]["kind"] == "3d" and best["config"]["model"]["kind"] == "3d"


@needs_torchrun
def test_3d_model_under_torchrun_with_ema_resumes(synthetic_set, tmp_path: Path) -> None:
    args = [
        "scripts/train.py", "--fold", "0", "--config", str(DEMO_3D),
        "--data-dir", str(synthetic_set.root), "--folds-csv", str(synthetic_set.folds_csv),
        "--out-dir", str(tmp_path), "--no-progress",
        "--set", *FAST_3D, "train.epochs=2", "train.ema_decay=0.9",
    ]  # fmt: skip
    first = run_torchrun(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    run_dir = tmp_path / "demo_cpu_3d" / "fold0"
    last = torch.load(run_dir / "last.pt", weights_only=True)
    assert {"ema", "model"} <= set(last) and len(last["rng"]) == 2
    # As if killed after epoch 1.
    last["epoch"], last["scheduler"]["step"] = 1, last["scheduler"]["step"] // 2
    torch.save(last, run_dir / "last.pt")
    done = run_torchrun(*args, "--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming {run_dir} after epoch 1" in done.stdout
    history = pd.read_csv(run_dir / "history.csv")
    assert history["epoch"].tolist() == [1, 2] and history["val_score"].notna().all()
