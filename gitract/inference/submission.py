"""Fold-ensemble inference: probabilities averaged over folds and flip TTA, masks back at each
slice's own size, RLE, and exactly the rows of ``sample_submission.csv``.

Probabilities are averaged on the model's canvas, taken back to the slice's H x W *before*
the threshold (bilinear when the canvas was scaled; a plain crop for the default 320x384 pad),
quantised to uint8 as the OOF files keep them, and post-processed one whole case-day at a time
(gitract.postprocess.steps: threshold, 2D and 3D component filters, slice gate, z-continuity). Each
case-day is encoded to RLE as soon as its last slice is predicted, so memory holds one volume,
whatever the size of the test set.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from gitract.atomic import atomic_path
from gitract.config import Config
from gitract.data.cache import VolumeCache
from gitract.data.layout import CLASSES, KAGGLE_INPUT, load_train_table, read_csv_file, scan_images
from gitract.data.rle import rle_encode
from gitract.errors import DataError
from gitract.models.checkpoint import find_checkpoints
from gitract.postprocess.steps import (
    ClassPostprocess,
    load_postprocess,
    postprocess_volume,
)

if TYPE_CHECKING:  # imported where used, see below
    from gitract.inference.blend import BlendSpec

__all__ = [
    "OOF_PROBS_DIR",
    "default_output_path",
    "encode_volume",
    "infer_oof",
    "infer_test",
    "read_sample_submission",
    "write_submission",
]

# Where ``infer.py --oof`` leaves each case-day's probabilities for ``evaluate.py --tune``.
OOF_PROBS_DIR = "oof_probs"
KAGGLE_WORKING = Path("/kaggle/working")
# gitract.inference.blend (the smp, timm and albumentations stack: ~3 s) and sklearn are imported
# where they are used: the empty public re-run and bad-input errors then answer in the time torch
# alone takes to import.


def default_output_path(kaggle_root: Path = KAGGLE_WORKING) -> Path:
    """``/kaggle/working/submission.csv`` in a Kaggle kernel, else ``submissions/``."""
    if kaggle_root.is_dir() and KAGGLE_INPUT.parent.is_dir():
        return kaggle_root / "submission.csv"
    return Path("submissions/submission.csv")


def encode_volume(
    ids: Sequence[str],
    probs: np.ndarray,
    params: Sequence[ClassPostprocess],
    presence: np.ndarray | None = None,
) -> dict[tuple[str, str], str]:
    """Post-process one case-day's quantised probabilities (with the aux head's quantised
    per-slice presence probabilities uint8 (D, 3), when there are some: the ``gate_cls`` step)
    and RLE-encode every slice: ``{(id, class): rle}``."""
    masks = postprocess_volume(probs, params, presence=presence)
    return {
        (slice_id, name): rle_encode(masks[z, c])
        for z, slice_id in enumerate(ids)
        for c, name in enumerate(CLASSES)
    }


def read_sample_submission(path: Path) -> pd.DataFrame:
    """``sample_submission.csv`` checked: columns, known classes, no duplicated rows."""
    frame = read_csv_file(path, ("id", "class"))
    unknown = sorted(set(frame["class"]) - set(CLASSES))
    if unknown:
        line = int(np.flatnonzero(~frame["class"].isin(CLASSES))[0]) + 2
        raise DataError(
            f"{path}: line {line}: unknown class {unknown[0]!r} (expected one of {list(CLASSES)})"
        )
    duplicated = frame.duplicated(["id", "class"])
    if duplicated.any():
        line = int(np.flatnonzero(duplicated)[0]) + 2
        row = frame.iloc[line - 2]
        raise DataError(
            f"{path}: line {line}: duplicated row (id {row['id']}, class {row['class']}); "
            f"{int(duplicated.sum())} duplicates in all"
        )
    return frame


def write_submission(
    sample: pd.DataFrame, predictions: dict[tuple[str, str], str], out: Path
) -> pd.DataFrame:
    """Fill ``sample``'s rows, in its order, and write ``id,class,predicted`` atomically."""
    submission = sample[["id", "class"]].copy()
    submission["predicted"] = [
        predictions[key] for key in zip(submission["id"], submission["class"], strict=True)
    ]
    with atomic_path(out) as tmp:
        submission.to_csv(tmp, index=False)
    return submission


def infer_test(
    cfg: Config,
    data_dir: Path,
    spec: BlendSpec,
    folds: Sequence[int] | None = None,
    out: Path | None = None,
    device: torch.device | None = None,
    num_workers: int = 0,
    progress: bool = True,
    tuned_file: Path | None = None,
) -> Path:
    """Predict ``data_dir/test`` for the rows of ``data_dir/sample_submission.csv``.

    ``spec``: the runs and weights (one run is a blend of one); each member is rebuilt from
    its own checkpoints with its own config's TTA and batch size, and the members'
    probabilities are averaged with the weights on each slice's own grid. The volume cache
    goes to ``cfg.data.cache_dir``.

    Post-processing: ``tuned_file``, else ``postprocess.json`` in the blend's folder (a single
    run's own folder), else ``cfg``'s ``postprocess`` section (gitract.postprocess.steps).

    An empty sample submission (Kaggle's public re-run, where ``test/`` is empty) gives a
    header-only submission at once, without loading any model."""
    out = Path(out) if out is not None else default_output_path()
    sample_path = data_dir / "sample_submission.csv"
    sample = read_sample_submission(sample_path)
    if sample.empty:
        write_submission(sample, {}, out)
        return out
    from gitract.inference.blend import blend_days, load_member  # ~3 s: see the top

    images = scan_images(data_dir / "test")
    wanted = sample["id"].drop_duplicates()
    missing = wanted[~wanted.isin(images["id"])]
    if len(missing):
        raise DataError(
            f"{sample_path}: {len(missing)} id(s) have no image under {data_dir / 'test'}, "
            f"e.g. {', '.join(missing.iloc[:3])}"
        )
    # Whole case-days go into the cache: a 2.5D sample needs its neighbours too.
    days = images.loc[images["id"].isin(wanted), "case_day"].unique()
    table = images[images["case_day"].isin(days)]
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    members = [load_member(m, device, folds, num_workers) for m in spec.members]
    params = load_postprocess(spec.dir, cfg.postprocess, tuned_file).per_class()
    cache = VolumeCache(table, cfg.data.cache_dir, with_masks=False, progress=progress)
    # Slice order within each case-day: the 3D steps see the volume as the metric stacks it.
    targets = table[table["id"].isin(wanted)].sort_values(["case", "day", "slice"], kind="stable")
    predictions: dict[tuple[str, str], str] = {}
    for day in blend_days(members, targets, cache, progress):
        predictions.update(encode_volume(day.ids, day.probs, params, day.presence))
    write_submission(sample, predictions, out)
    return out


def _save_volume_probs(
    folder: Path,
    case_day: str,
    ids: list[str],
    stacked: np.ndarray,
    presence: np.ndarray | None = None,
) -> None:
    """One case-day's quantised probabilities, uint8 (D, 3, H, W), in a compressed .npz, with
    the quantised per-slice presence probabilities uint8 (D, 3) as ``presence`` when there are
    some (what gitract.postprocess.tuning reads for the ``gate_cls`` step)."""
    extra = {} if presence is None else {"presence": presence}
    # The temp name does not end in .npz: a leftover is never taken for a volume by the tuner.
    with atomic_path(folder / f"{case_day}.npz") as tmp, open(tmp, "wb") as handle:
        np.savez_compressed(handle, probs=stacked, ids=np.asarray(ids), **extra)


def infer_oof(
    cfg: Config,
    data_dir: Path,
    spec: BlendSpec,
    folds_csv: Path,
    folds: Sequence[int] | None = None,
    out: Path | None = None,
    device: torch.device | None = None,
    num_workers: int = 0,
    progress: bool = True,
) -> Path:
    """Out-of-fold predictions: fold N's validation slices by every member's fold-N model,
    blended as on the test set (a single run: its fold-N model alone).

    Writes an ``id,class,predicted`` CSV (default ``<folder>/oof.csv``) and each case-day's
    probabilities under ``<folder>/oof_probs/``, which ``evaluate.py --tune`` searches;
    ``<folder>`` is the blend's folder (a single run's own)."""
    from gitract.data.folds import load_folds  # sklearn: imported only when OOF needs it
    from gitract.inference.blend import blend_days, load_member  # ~3 s: see the top

    table = load_folds(folds_csv, load_train_table(data_dir, cfg.data.exclude))
    known = sorted(table["fold"].unique().tolist())
    folds = list(folds) if folds else known
    unknown = [f for f in folds if f not in known]
    if unknown:
        raise DataError(f"{folds_csv}: there is no fold {unknown[0]}; its folds are {known}")
    folder = spec.dir
    for member in spec.members:  # every checkpoint there, before any work
        for fold in folds:
            find_checkpoints(member.run, [fold])
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # Always the config's post-processing, never the tuned one: thresholds tuned on these very
    # predictions would make the OOF score optimistic (evaluate.py --tune reports that score).
    params = cfg.postprocess.per_class()
    # The training cache has the masks too; reusing it avoids decoding the PNGs again.
    cache = VolumeCache(table, cfg.data.cache_dir, with_masks=True, progress=progress)
    probs_dir = folder / OOF_PROBS_DIR
    probs_dir.mkdir(parents=True, exist_ok=True)
    table = table.sort_values(["case", "day", "slice"], kind="stable")
    predictions: dict[tuple[str, str], str] = {}
    for fold in folds:
        members = [load_member(m, device, [fold], num_workers) for m in spec.members]
        val = table[table["fold"] == fold]
        # Slices arrive in slice order, one case-day after the other: each day's probabilities
        # are saved, then encoded, then dropped, so memory holds one volume at a time.
        for day in blend_days(members, val, cache, progress):
            _save_volume_probs(probs_dir, day.case_day, day.ids, day.probs, day.presence)
            predictions.update(encode_volume(day.ids, day.probs, params, day.presence))
    rows = table[table["fold"].isin(folds)]
    sample = pd.DataFrame(
        [(i, name) for i in rows["id"] for name in CLASSES], columns=["id", "class"]
    )
    out = out or folder / "oof.csv"
    write_submission(sample, predictions, out)
    return out
