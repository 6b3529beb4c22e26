"""Post-processing search on out-of-fold probabilities, for the competition score.

``infer.py --oof`` leaves each case-day's probabilities in ``<runs>/oof_probs/``. For every
class and every (threshold, minimum component size) on a small grid we compute, once, that
class's Dice sum over slices and Hausdorff sum over volumes; a class's setting only changes its
own rows and volumes, so every combination of the three classes is then scored exactly from
those sums, without touching a volume again.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from gitract.atomic import write_text_atomic
from gitract.data import CLASSES, slice_mask
from gitract.errors import ConfigError, DataError
from gitract.metrics import hausdorff_3d
from gitract.postprocess import remove_small_components

__all__ = ["DEFAULT_MIN_SIZES", "DEFAULT_THRESHOLDS", "save_postprocess", "tune_postprocess"]

DEFAULT_THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)
DEFAULT_MIN_SIZES = (0, 25, 100)


def _masks(probs: np.ndarray, threshold: float, min_size: int) -> np.ndarray:
    """(D, H, W) bool masks of one class, as inference would make them from these probs."""
    # The saved probabilities are rint(p * 255): k / 255 > t is what inference's p > t becomes.
    masks = probs > threshold * 255
    if min_size > 1:
        masks = np.stack([remove_small_components(m.astype(np.uint8), min_size) for m in masks])
    return masks.astype(bool, copy=False)


def _class_stats(masks: np.ndarray, truth: np.ndarray) -> tuple[float, float, int]:
    """(Dice sum over slices, Hausdorff of the volume or 0, 1 if the volume counts else 0)."""
    inter = (masks & truth).sum(axis=(1, 2))
    total = masks.sum(axis=(1, 2)) + truth.sum(axis=(1, 2))
    # Per slice as metrics.dice_2d: 2|A & B| / (|A| + |B|), and 1 where both are empty.
    dice = np.where(total == 0, 1.0, 2.0 * inter / np.maximum(total, 1)).sum()
    distance = hausdorff_3d(masks, truth)
    return float(dice), distance or 0.0, int(distance is not None)


def tune_postprocess(
    probs_dir: Path,
    table: pd.DataFrame,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    min_sizes: Sequence[int] = DEFAULT_MIN_SIZES,
    progress: bool = True,
) -> dict:
    """Best per-class threshold and minimum component size on the OOF probabilities.

    ``table`` is the train slice table (``load_train_table``) holding the truth. Returns the
    chosen ``thresholds``, ``min_component_size``, their ``score`` and the ``baseline_score``
    at threshold 0.5 with no component removal, for comparison."""
    if not thresholds or not all(0 < t < 1 for t in thresholds):
        raise ConfigError(f"tuning thresholds must be values in (0, 1), got {list(thresholds)}")
    if not min_sizes or any(m < 0 for m in min_sizes):
        raise ConfigError(f"tuning minimum sizes must be values >= 0, got {list(min_sizes)}")
    files = sorted(p for p in probs_dir.glob("*.npz") if not p.name.startswith("."))
    if not files:
        raise DataError(f"{probs_dir}: no OOF probabilities; run scripts/infer.py --oof first")
    rows = table.set_index("id")
    grid = list(itertools.product((float(t) for t in thresholds), (int(m) for m in min_sizes)))
    n_choices = len(grid)  # the baseline is scored too, even when it is not a choice
    if (0.5, 0) not in grid:
        grid.append((0.5, 0))
    # stats[c][g] = [dice sum, hausdorff sum, counted volumes] for class c at grid point g.
    stats = np.zeros((len(CLASSES), len(grid), 3))
    n_slices = 0
    for path in tqdm(files, desc="tune", unit="vol", disable=not progress):
        with np.load(path) as saved:
            probs, ids = saved["probs"], saved["ids"].tolist()
        missing = [i for i in ids if i not in rows.index]
        if missing:
            raise DataError(f"{path}: ids not in train.csv, e.g. {missing[0]}")
        truth = np.stack([slice_mask(rows.loc[i]) for i in ids]).astype(bool)  # (D, H, W, 3)
        n_slices += len(ids)
        for c in range(len(CLASSES)):
            # Grid points often give the same masks (no component that small, no probability
            # in between two thresholds): their stats are computed once.
            done: dict[bytes, tuple[float, float, int]] = {}
            for g, (threshold, min_size) in enumerate(grid):
                masks = _masks(probs[:, c], threshold, min_size)
                key = np.packbits(masks).tobytes()
                if key not in done:
                    done[key] = _class_stats(masks, truth[..., c])
                stats[c, g] += done[key]

    def score(choice: tuple[int, ...]) -> float:
        picked = stats[np.arange(len(CLASSES)), list(choice)]  # (C, 3)
        dice = picked[:, 0].sum() / (n_slices * len(CLASSES))
        volumes = picked[:, 2].sum()
        hausdorff = picked[:, 1].sum() / volumes if volumes else 0.0
        return 0.4 * dice + 0.6 * (1.0 - hausdorff)

    best = max(itertools.product(range(n_choices), repeat=len(CLASSES)), key=score)
    baseline = grid.index((0.5, 0))
    return {
        "thresholds": [float(grid[g][0]) for g in best],
        "min_component_size": [int(grid[g][1]) for g in best],
        "score": float(score(best)),
        "baseline_score": float(score((baseline,) * len(CLASSES))),
        "n_case_days": len(files),
        "n_slices": n_slices,
    }


def save_postprocess(result: dict, path: Path) -> None:
    """Write the tuned settings as JSON (atomically) where infer.py looks for them."""
    write_text_atomic(path, json.dumps(result, indent=2) + "\n")
