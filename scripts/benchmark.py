"""Measure gitract against naive baselines, side by side in one process; print ratios.

    python scripts/benchmark.py [--quick] [--json FILE] [--keep DIR]

Each result is a ratio, so it means the same on a slow or a busy machine:

- rle_decode_speedup: gitract.data.rle.rle_decode vs a decoder looping over runs in Python, on the
  real annotations (../shared/real/uwmgi_annotations_subset.csv; synthetic masks if absent).
- loader_speedup: 2.5D training samples/s (train augmentations on, default.yaml's data and
  train sections: 320x384) of SliceDataset over VolumeCache vs a loader that reads the three
  PNGs of every sample; one process, one thread: samples/s per core.
- data_wait_fraction: share of a demo_cpu training epoch spent waiting for batches with the
  default num_workers.
- inference_efficiency: end-to-end slices/s of gitract.inference.submission.infer_test (reading,
  resizing, TTA, RLE, CSV) / model-only slices/s (Ensemble.predict on pre-built batches).
- metric_speedup: gitract.scoring.metrics.hausdorff_3d vs pairwise scipy directed_hausdorff on
  synthetic OOF-like volumes (values must agree).
- tuning_seconds_real_scale: wall seconds of the default post-processing search
  (gitract.postprocess.tuning.tune_postprocess, kaggle profile, every CPU core) on synthetic OOF
  probabilities of the real data's size: 274 case-days of 144 or 80 slices, 266x266.
- selection_seconds_real_scale: wall seconds of blend selection (evaluate.py --select's
  gitract.postprocess.selection.select_blend: greedy search, then the full tuning of each run
  alone, the equal blend and the selection, scored exactly, per fold) over 3 runs' synthetic
  OOF probabilities of that size (compressed, as infer.py writes them), every CPU core.
- memory_growth: peak RSS of a demo_cpu training epoch (scripts/train.py, fresh process) on
  4N slices / on N slices.
- patch_loader_speedup: 3D training patches/s per core (default_3d.yaml's 256x256 grid and
  80x160x160 patch) of PatchDataset, cut from the case-days resampled once to the grid, vs
  resizing every slice a patch spans (NaivePatchDataset, the same patches); one thread.
- val3d_seconds_per_case_day_before / _after: seconds to validate one 144 x 266 x 266 case-day
  (default_3d.yaml's sliding windows and flip TTA, a SegResNet of 8 filters, the CPU): the
  prediction, timed once (the same code and values on both sides), plus the scoring of it by
  the validation before (numpy probabilities, loss and Dice/IoU on the host; kept here as
  _validate_volumes_before) and now (gitract.training.engine.validate_volumes: on the model's
  device, here also the CPU). val3d_scoring_speedup: the two scorings' ratio.
- ema_step_ratio: milliseconds per training step (forward, backward, AdamW) of default.yaml's
  B7 U-Net with its weights' moving average over without one; ema_step_ratio_timm: the same
  with timm's ModelEmaV3, which rebuilds two state dicts at every step.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest.mock import patch

import cv2
import numpy as np
import pandas as pd
import torch
from naive_baselines import (  # scripts/
    NaivePatchDataset,
    NaiveSliceDataset,
    naive_hausdorff_3d,
    naive_rle_decode,
)
from timm.utils.model_ema import ModelEmaV3

from gitract.atomic import write_text_atomic
from gitract.cli import run_main
from gitract.config import load_config
from gitract.data.cache import VolumeCache
from gitract.data.folds import create_folds_file
from gitract.data.layout import CLASSES, load_train_table, scan_images
from gitract.data.patches import PatchDataset
from gitract.data.rle import rle_decode, rle_decode_many, rle_encode
from gitract.data.slices import SliceDataset, build_train_transform
from gitract.data.synthetic import generate
from gitract.inference.submission import infer_test
from gitract.models.checkpoint import find_checkpoints
from gitract.models.kind import DayPrediction
from gitract.models.kind2d import Ensemble
from gitract.models.kind3d import Kind3D, Predictor3D
from gitract.models.smp2d import build_model
from gitract.postprocess.selection import select_blend
from gitract.postprocess.steps import quantize
from gitract.postprocess.tuning import tune_postprocess
from gitract.scoring.metrics import SegMetricAccumulator, VolumeScoreAccumulator, hausdorff_3d
from gitract.training.distributed import DistContext
from gitract.training.ema import ModelEma
from gitract.training.engine import Loop, build_loop, validate_volumes

ROOT = Path(__file__).resolve().parents[1]
REAL_ANNOTATIONS = ROOT.parent / "shared" / "real" / "uwmgi_annotations_subset.csv"
DEFAULT_CFG = ROOT / "configs" / "default.yaml"
DEMO_CFG = ROOT / "configs" / "demo_cpu.yaml"

# Target per key, and whether a result must be at least (">=") or at most ("<=") the target.
TARGETS: dict[str, tuple[str, float]] = {
    "rle_decode_speedup": (">=", 5.0),
    "loader_speedup": (">=", 3.0),
    "data_wait_fraction": ("<=", 0.05),
    "inference_efficiency": (">=", 0.85),
    "metric_speedup": (">=", 10.0),
    "memory_growth": ("<=", 1.3),
    "tuning_seconds_real_scale": ("<=", 600.0),
    "patch_loader_speedup": (">=", 3.0),
    "selection_seconds_real_scale": ("<=", 900.0),
}


@dataclass(frozen=True)
class Sizes:
    """How big each measurement is; ``--quick`` shrinks everything."""

    rle_rounds: int
    loader_cases: int
    loader_slices: int
    loader_samples: int
    train_cases: int  # N slices ~ train_cases x train_slices x 2.3 days; 4N uses 4x the cases
    train_slices: int
    metric_volumes: int
    metric_shape: tuple[int, int, int]
    tuning_days: int = 274
    tuning_shape: tuple[int, int] = (266, 266)
    train_overrides: tuple[str, ...] = ()
    patch_slices: int = 80  # one 80-slice case-day per case: a whole patch deep
    patch_items: int = 8
    patch_overrides: tuple[str, ...] = ()
    ema_config: Path = ROOT / "configs" / "default.yaml"
    val3d_slices: int = 144  # a long case-day; QUICK uses the patch grid of patch_overrides


FULL = Sizes(5, 3, 32, 120, 4, 32, 274, (144, 266, 266))
QUICK = Sizes(
    2, 2, 12, 16, 3, 8, 12, (48, 96, 96), 4, (64, 64), ("data.img_size=[64, 64]",),
    16, 4, ("data.grid_hw=[64, 64]", "data.patch_size=[16, 48, 48]"),
    ROOT / "configs" / "demo_cpu.yaml", 16,
)  # fmt: skip


def best_rates(fns: Sequence[Callable[[], int]], rounds: int) -> list[float]:
    """Items per second of each ``fn`` (which returns how many items it did), best of
    ``rounds``: the best is the least disturbed by whatever else the machine is doing. The
    rounds interleave the functions, so every one sees the same background load."""
    best = [0.0] * len(fns)
    for _ in range(rounds):
        for k, fn in enumerate(fns):
            start = time.perf_counter()
            n = fn()
            best[k] = max(best[k], n / (time.perf_counter() - start))
    return best


def each(fn: Callable[..., Any], calls: Sequence[tuple]) -> Callable[[], int]:
    """A timed body: ``fn(*args)`` for every ``args`` in ``calls``; returns how many."""

    def go() -> int:
        for args in calls:
            fn(*args)
        return len(calls)

    return go


@contextmanager
def single_thread() -> Iterator[None]:
    """One core's worth of work: no intra-op threads in torch or OpenCV."""
    torch_threads, cv_threads = torch.get_num_threads(), cv2.getNumThreads()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    try:
        yield
    finally:
        torch.set_num_threads(torch_threads)
        cv2.setNumThreads(cv_threads)


# ------------------------------------------------------------------------------------ RLE


def _synthetic_annotations(n: int = 3000) -> dict[tuple[int, int], list[str]]:
    """Elliptical masks of the real sizes: their RLE strings per (height, width)."""
    rng = np.random.default_rng(0)
    by_shape: dict[tuple[int, int], list[str]] = {}
    for _ in range(n):
        h, w = (310, 360) if rng.random() < 0.2 else (266, 266)
        yy, xx = np.ogrid[:h, :w]
        cy, cx, ry, rx = (
            rng.uniform(0.3, 0.7) * h,
            rng.uniform(0.3, 0.7) * w,
            *rng.uniform(8, 40, 2),
        )
        mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        by_shape.setdefault((h, w), []).append(rle_encode(mask))
    return by_shape


def _annotation_groups() -> tuple[list[tuple[list[str], tuple[int, int]]], str]:
    """The masks as the data path decodes them: one (case-day, class) column at a time, empty
    slices included, each group with its slice size."""
    if REAL_ANNOTATIONS.is_file():
        frame = pd.read_csv(REAL_ANNOTATIONS, dtype={"segmentation": str}, keep_default_na=False)
        frame["case_day"] = frame["id"].str.rsplit("_slice_", n=1).str[0]
        groups = [
            (g["segmentation"].tolist(), (int(g["height"].iloc[0]), int(g["width"].iloc[0])))
            for _, g in frame.groupby(["case_day", "class"], sort=False)
        ]
        return groups, f"real ({REAL_ANNOTATIONS.name})"
    groups = [(rles[i : i + 64], shape) for shape, rles in _synthetic_annotations().items()
              for i in range(0, len(rles), 64)]  # fmt: skip
    return groups, "synthetic (real annotations absent)"


def bench_rle(sizes: Sizes) -> dict[str, Any]:
    groups, source = _annotation_groups()
    rows = [(rle, shape) for rles, shape in groups for rle in rles]
    for rles, shape in groups[:20]:  # same masks, or the comparison means nothing
        naive_stack = np.stack([naive_rle_decode(rle, shape) for rle in rles])
        assert np.array_equal(rle_decode_many(rles, shape), naive_stack)

    def per_column() -> int:
        for rles, shape in groups:
            rle_decode_many(rles, shape)
        return len(rows)  # masks, as the per-mask decoders count

    decoders = [per_column, each(rle_decode, rows), each(naive_rle_decode, rows)]
    many, single, naive = best_rates(decoders, sizes.rle_rounds)
    masks = [rle_decode(rle, shape) for rle, shape in rows]
    pixels = sum(m.size for m in masks)
    [encode] = best_rates([each(rle_encode, [(m,) for m in masks])], sizes.rle_rounds)
    non_empty = [rle for rle, _ in rows if rle]
    return {
        # What the data path uses: a (case-day, class) column at once (rle_decode_many).
        "rle_decode_speedup": many / naive,
        "rle_decode_single_speedup": single / naive,
        "rle_decode_per_s": many,
        "rle_decode_single_per_s": single,
        "rle_decode_naive_per_s": naive,
        "rle_encode_per_s": encode,
        "rle_encode_mpix_per_s": encode * pixels / len(masks) / 1e6,
        "rle_masks": len(rows),
        "rle_masks_non_empty": len(non_empty),
        "rle_mean_runs": float(np.mean([len(r.split()) / 2 for r in non_empty])),
        "rle_source": source,
    }


# --------------------------------------------------------------------------------- loader


def bench_loader(sizes: Sizes, work: Path) -> dict[str, Any]:
    data = work / "loader_data"
    generate(data, work / "loader_labels", sizes.loader_cases, sizes.loader_slices, seed=11)
    cfg = load_config(DEFAULT_CFG, ["model.encoder_weights=null"])
    table = load_train_table(data, cfg.data.exclude)
    start = time.perf_counter()
    cache = VolumeCache(table, work / "loader_cache", with_masks=True, progress=False)
    build_s = time.perf_counter() - start
    fast_ds = SliceDataset(table, cache, cfg.data, build_train_transform(cfg.train))
    naive_ds = NaiveSliceDataset(table, cfg.data, build_train_transform(cfg.train))
    fast_ds.transform.set_random_seed(0)
    naive_ds.transform.set_random_seed(0)
    rng = random.Random(0)
    picks = [(rng.randrange(len(table)),) for _ in range(sizes.loader_samples)]
    loaders = [each(fast_ds.__getitem__, picks), each(naive_ds.__getitem__, picks)]
    with single_thread():
        fast, naive = best_rates(loaders, 3)
        # The same without augmentations: what the loaders themselves cost.
        fast_ds.transform = naive_ds.transform = None
        fast_plain, naive_plain = best_rates(loaders, 2)
    return {
        "loader_speedup_without_aug": fast_plain / naive_plain,
        "loader_samples_per_s_per_core_without_aug": fast_plain,
        "loader_naive_samples_per_s_per_core_without_aug": naive_plain,
        "loader_speedup": fast / naive,
        "loader_samples_per_s_per_core": fast,
        "loader_naive_samples_per_s_per_core": naive,
        "loader_img_size": list(cfg.data.img_size),
        "loader_cache_build_s": build_s,
        "loader_slices": len(table),
    }


# ------------------------------------------------------------------ training (subprocesses)


def _peak_rss_run(cmd: list[str], env: dict[str, str]) -> tuple[int, float]:
    """Run ``cmd``; return its peak RSS in bytes and its wall time. The peak is wait4's
    ``ru_maxrss`` of that child: the largest process of its tree (DataLoader workers
    included), and of this child only, unlike RUSAGE_CHILDREN. A failure stops the benchmark."""
    start = time.perf_counter()
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        elapsed = time.perf_counter() - start
        if proc.returncode != 0:
            err.seek(0)
            tail = err.read().decode(errors="replace")[-2000:]
            raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{tail}")
    return usage.ru_maxrss * 1024, elapsed


def _train_set(work: Path, name: str, cases: int, slices: int) -> tuple[Path, Path, int]:
    data = work / name
    summary = generate(data, work / f"{name}_labels", cases, slices, seed=5)
    folds_csv = work / f"{name}_folds.csv"
    n_splits = min(4, len(summary.train_cases))
    folds = create_folds_file(data, folds_csv, n_splits=n_splits, seed=0)
    return data, folds_csv, len(folds)


def bench_training(sizes: Sizes, work: Path) -> dict[str, Any]:
    """memory_growth and data_wait_fraction from two demo_cpu epochs in fresh processes; the
    larger run's model is what the inference benchmark loads."""
    results: dict[str, Any] = {}
    runs = {}
    for label, factor in (("n", 1), ("4n", 4)):
        data, folds_csv, n_slices = _train_set(
            work, f"train_{label}", sizes.train_cases * factor, sizes.train_slices
        )
        out = work / f"runs_{label}"
        cmd = [
            sys.executable, str(ROOT / "scripts" / "train.py"), "--fold", "0",
            "--config", str(DEMO_CFG), "--data-dir", str(data), "--folds-csv", str(folds_csv),
            "--out-dir", str(out), "--no-progress",
            "--set", "train.epochs=1", *sizes.train_overrides,
        ]  # fmt: skip
        env = {**os.environ, "GITRACT_CACHE_DIR": str(work / f"cache_{label}")}
        rss, seconds = _peak_rss_run(cmd, env)
        history = pd.read_csv(out / "demo_cpu" / "fold0" / "history.csv")
        results[f"train_{label}_slices"] = n_slices
        results[f"train_{label}_peak_rss_mb"] = rss / 2**20
        results[f"train_{label}_seconds"] = seconds
        results[f"train_{label}_data_wait"] = float(history["data_wait"].iloc[0])
        runs[label] = (data, out / "demo_cpu")
    results["memory_growth"] = results["train_4n_peak_rss_mb"] / results["train_n_peak_rss_mb"]
    # The bigger epoch: worker start-up is a smaller share of it, as in a real epoch.
    results["data_wait_fraction"] = results["train_4n_data_wait"]
    results["data_wait_num_workers"] = load_config(DEMO_CFG).data.num_workers
    results["_runs"] = runs
    return results


# ------------------------------------------------------------------------------ inference


def bench_inference(data: Path, runs: Path, work: Path, device: torch.device) -> dict[str, Any]:
    cfg = load_config(DEMO_CFG)
    checkpoints = find_checkpoints(runs, [0])
    sample = pd.read_csv(data / "sample_submission.csv")
    n_slices = sample["id"].nunique()
    suffix = "" if device.type == "cpu" else f"_{device.type}"

    def end_to_end(run: int) -> float:
        # A fresh cache each time: reading and decoding the PNGs is part of the work.
        start = time.perf_counter()
        cfg.data.cache_dir = str(work / f"infer_cache{suffix}_{run}")
        out = infer_test(
            cfg, data, runs, [0], work / f"submission{suffix}.csv", device=device, progress=False
        )
        rate = n_slices / (time.perf_counter() - start)
        assert len(pd.read_csv(out)) == len(sample)
        return rate

    # The first run pays the process's one-off costs (thread pools, kernel selection), which
    # the model-only timing below does not; the later runs compare like with like.
    cold = end_to_end(0)
    warm = max(end_to_end(1), end_to_end(2))

    # Model only: the same slices, batched beforehand, through Ensemble.predict.
    ensemble = Ensemble.load(checkpoints, device, cfg.infer.tta_flips)
    images = scan_images(data / "test")
    cache = VolumeCache(images, work / f"infer_cache{suffix}_1", with_masks=False, progress=False)
    dataset = SliceDataset(images, cache, ensemble.data_config)
    stack = torch.stack([dataset[i]["image"] for i in range(len(dataset))])
    batches = list(stack.split(cfg.infer.batch_size))
    ensemble.predict(batches[0])  # warm-up (allocator, first-call overheads)

    def forward() -> int:
        for batch in batches:
            ensemble.predict(batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return len(stack)

    [model_only] = best_rates([forward], 2)
    return {
        f"inference_efficiency{suffix}": warm / model_only,
        f"inference_efficiency_cold{suffix}": cold / model_only,
        f"inference_slices_per_s{suffix}": warm,
        f"inference_model_slices_per_s{suffix}": model_only,
        f"inference_slices{suffix}": n_slices,
    }


# --------------------------------------------------------------------------------- metric


def _ellipsoid(shape: tuple[int, int, int], centre: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """A filled ellipsoid, computed only inside its bounding box."""
    mask = np.zeros(shape, dtype=bool)
    lo = np.maximum(np.floor(centre - radii).astype(int), 0)
    hi = np.minimum(np.ceil(centre + radii).astype(int) + 1, shape)
    if np.any(hi <= lo):
        return mask
    grids = np.ogrid[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    inside = sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, radii, strict=True)) <= 1
    mask[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = inside
    return mask


def _oof_volumes(n: int, shape: tuple[int, int, int], seed: int) -> Iterator[tuple]:
    """(truth, prediction) pairs like OOF ones. A truth organ is 1-3 overlapping ellipsoid
    lobes of real organ sizes (a few tens of slices deep, 15-50 px across); the prediction is
    each lobe shifted, grown or shrunk, sometimes with a stray blob (a far false positive),
    sometimes empty (a missed organ)."""
    rng = np.random.default_rng(seed)
    dims = np.asarray(shape, dtype=float)
    for _ in range(n):
        truth = np.zeros(shape, dtype=bool)
        pred = np.zeros(shape, dtype=bool)
        missed = rng.random() < 0.05
        centre = dims * rng.uniform(0.3, 0.7, 3)
        for _lobe in range(int(rng.integers(1, 4))):
            centre = centre + dims * rng.normal(0, 0.05, 3)
            radii = dims * rng.uniform([0.08, 0.06, 0.06], [0.2, 0.15, 0.15])
            truth |= _ellipsoid(shape, centre, radii)
            if not missed:
                shift = rng.normal(0, 2.0, 3)
                pred |= _ellipsoid(shape, centre + shift, radii * rng.uniform(0.85, 1.15, 3))
        if not missed and rng.random() < 0.2:
            pred |= _ellipsoid(shape, dims * rng.uniform(0.1, 0.9, 3), dims * 0.02)
        yield truth, pred


def bench_metric(sizes: Sizes) -> dict[str, Any]:
    fast_s = naive_s = 0.0
    max_diff = 0.0
    for truth, pred in _oof_volumes(sizes.metric_volumes, sizes.metric_shape, seed=3):
        start = time.perf_counter()
        fast = hausdorff_3d(pred, truth)
        mid = time.perf_counter()
        naive = naive_hausdorff_3d(pred, truth)
        naive_s += time.perf_counter() - mid
        fast_s += mid - start
        assert (fast is None) == (naive is None)
        if fast is not None:
            max_diff = max(max_diff, abs(fast - naive))
    assert max_diff < 1e-9, f"hausdorff_3d disagrees with the pairwise reference by {max_diff}"
    return {
        "metric_speedup": naive_s / fast_s,
        "metric_volumes": sizes.metric_volumes,
        "metric_volume_shape": list(sizes.metric_shape),
        "metric_seconds": fast_s,
        "metric_naive_seconds": naive_s,
        "metric_max_abs_diff": max_diff,
    }


def _tuning_set(sizes: Sizes, work: Path, members: int = 1) -> pd.DataFrame:
    """OOF probability files (as infer.py --oof writes them) and the slice table holding the
    truth, for ``sizes.tuning_days`` case-days of 144 or 80 slices: per class an organ from
    _oof_volumes, probabilities high inside the predicted organ, a faint noise floor, and
    what post-processing is for: weak stray slices and confident specks. In ``oof_probs/``
    (one run), or with ``members`` > 1 in ``run<k>/oof_probs/``: run 0 as above, each other run
    its organs shifted by up to 2 voxels along each axis and its own specks (compressed, as
    infer.py writes them)."""
    folders = [work / "oof_probs"] if members == 1 else [
        work / f"run{k}" / "oof_probs" for k in range(members)
    ]  # fmt: skip
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    h, w = sizes.tuning_shape
    rows = []
    for k in range(sizes.tuning_days):
        depth = 144 if k % 3 else 80
        if sizes.tuning_days < 10:
            depth = depth // 4
        case_day = f"case{k // 3 + 1}_day{k % 3}"
        truth = np.zeros((depth, len(CLASSES), h, w), dtype=bool)
        probs = np.zeros((depth, len(CLASSES), h, w), dtype=np.float32)
        for c in range(len(CLASSES)):
            seed = int(rng.integers(1 << 31))
            t, p = next(_oof_volumes(1, (depth, h, w), seed))
            truth[:, c] = t
            probs[:, c] = np.where(p, rng.uniform(0.55, 0.95), 0.0)
            z = int(rng.integers(0, depth))
            y, x = rng.integers(0, h - 8), rng.integers(0, w - 8)
            probs[z, c, y : y + 6, x : x + 6] = 0.9  # a confident speck
        # A background floor below the lowest threshold the search tries (0.3).
        probs += rng.uniform(0, 0.25, probs.shape).astype(np.float32) * (
            rng.random(probs.shape) < 0.002
        )
        ids = [f"{case_day}_slice_{z + 1:04d}" for z in range(depth)]
        quantised = quantize(probs)
        for m, folder in enumerate(folders):
            volume = quantised
            if m:
                volume = np.roll(quantised, tuple(rng.integers(-2, 3, 3)), axis=(0, 2, 3))
                z, c = int(rng.integers(0, depth)), int(rng.integers(0, len(CLASSES)))
                y, x = rng.integers(0, h - 8), rng.integers(0, w - 8)
                volume[z, c, y : y + 6, x : x + 6] = 230
            save = np.savez if members == 1 else np.savez_compressed
            with open(folder / f"{case_day}.npz", "wb") as handle:
                save(handle, probs=volume, ids=np.asarray(ids))
        for z, id_ in enumerate(ids):
            row = {"id": id_, "height": h, "width": w}
            for c, name in enumerate(CLASSES):
                row[name] = rle_encode(truth[z, c])
            rows.append(row)
    return pd.DataFrame(rows)


def bench_tuning(sizes: Sizes, work: Path) -> dict[str, Any]:
    """The default post-processing search at the real data's size, every core."""
    table = _tuning_set(sizes, work / "tuning")
    start = time.perf_counter()
    result = tune_postprocess(work / "tuning" / "oof_probs", table, "kaggle", progress=False)
    seconds = time.perf_counter() - start
    return {
        "tuning_seconds_real_scale": seconds,
        "tuning_seconds_per_case_day": seconds / sizes.tuning_days,
        "tuning_case_days": sizes.tuning_days,
        "tuning_slices": int(result["n_slices"]),
        "tuning_cores": _cores(),
        "tuning_scores": {k: round(v["score"], 5) for k, v in result["scores"].items()},
    }


def bench_selection(sizes: Sizes, work: Path) -> dict[str, Any]:
    """Blend selection (greedy search + the full tuning of the trials it reports) over three
    runs' OOF probabilities at the real data's size, every core, kaggle profile."""
    table = _tuning_set(sizes, work / "selection", members=3)
    dirs = [work / "selection" / f"run{k}" / "oof_probs" for k in range(3)]
    folds = {f"case{k // 3 + 1}_day{k % 3}": (k // 3) % 5 for k in range(sizes.tuning_days)}
    start = time.perf_counter()
    result = select_blend(dirs, table, "kaggle", folds, progress=False)
    seconds = time.perf_counter() - start
    return {
        "selection_seconds_real_scale": seconds,
        "selection_case_days": result["n_case_days"],
        "selection_members": len(dirs),
        "selection_weights": result["weights"],
        "selection_rounds": len(result["history"]),
        "selection_scores": {
            "members": [round(m["full"]["score"], 5) for m in result["members"]],
            "equal_blend": round(result["equal_blend"]["full"]["score"], 5),
            "selected": round(result["selected"]["full"]["score"], 5),
            "chosen": round(result["score"], 5),
        },
    }


# ---------------------------------------------------------------------------------- report


# -------------------------------------------------------------------------- 3D patches, EMA


def bench_patches(sizes: Sizes, work: Path) -> dict[str, Any]:
    data = work / "patch_data"
    generate(data, work / "patch_labels", 2, sizes.patch_slices, seed=13)
    cfg = load_config(ROOT / "configs" / "default_3d.yaml", list(sizes.patch_overrides))
    table = load_train_table(data, cfg.data.exclude)
    cache = VolumeCache(table, work / "patch_cache", progress=False)
    start = time.perf_counter()
    fast = PatchDataset(table, cache, cfg.data, patches_per_volume=4, train=True, seed=0)
    build_s = time.perf_counter() - start
    naive = NaivePatchDataset(table, cache, cfg.data, patches_per_volume=4, train=True, seed=0)
    for index in range(len(fast)):  # the same patches, from either path
        fast.set_random_seed(index)
        naive.set_random_seed(index)
        a, b = fast[index], naive[index]
        assert torch.equal(a["mask"], b["mask"]), index
        assert float((a["image"] - b["image"]).abs().max()) < 1e-3, index
    rng = random.Random(0)
    picks = [(rng.randrange(len(fast)),) for _ in range(sizes.patch_items)]
    with single_thread():
        new, old = best_rates([each(fast.__getitem__, picks), each(naive.__getitem__, picks)], 3)
    return {
        "patch_loader_speedup": new / old,
        "patch_per_s_per_core": new,
        "patch_naive_per_s_per_core": old,
        "patch_size": list(cfg.data.patch_size),
        "patch_grid_hw": list(cfg.data.grid_hw),
        "patch_grid_build_s": build_s,
    }


def bench_ema(sizes: Sizes, steps: int = 3) -> dict[str, Any]:
    cfg = load_config(sizes.ema_config, ["model.encoder_weights=null"])
    torch.manual_seed(0)
    model = build_model(cfg.model, in_channels=cfg.data.in_channels)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    image = torch.randn(2, cfg.data.in_channels, 64, 64)
    ours, timms = ModelEma(model, 0.999), ModelEmaV3(model, decay=0.999, use_warmup=True)
    updates = {
        "none": lambda step: None,
        "ours": ours.update,
        "timm": lambda step: timms.update(model, step=step),
    }

    def trainer(update: Callable[[int], None]) -> Callable[[], int]:
        def go() -> int:
            for step in range(1, steps + 1):
                optimizer.zero_grad(set_to_none=True)
                model(image).float().mean().backward()
                optimizer.step()
                update(step)
            return steps

        return go

    rates = best_rates([trainer(u) for u in updates.values()], 2)
    ms = {name: 1000 / rate for name, rate in zip(updates, rates, strict=True)}
    return {
        "ema_step_ratio": ms["ours"] / ms["none"],
        "ema_step_ratio_timm": ms["timm"] / ms["none"],
        "ema_step_ms_without": ms["none"],
        "ema_update_ms": ms["ours"] - ms["none"],
        "ema_update_ms_timm": ms["timm"] - ms["none"],
        "ema_model": f"{cfg.model.arch}/{cfg.model.encoder_name}",
    }


def _validate_volumes_before(
    loop: Loop, days: Sequence[DayPrediction], cache: VolumeCache
) -> dict[str, float]:
    """validate_volumes' scoring as it was before it moved to the model's device: each day's
    numpy probabilities (copied to the host by the predictor) scored on the CPU, the truth in
    float32, the loss from their logits, Dice/IoU and the thresholds on the float volumes."""
    cfg = loop.cfg
    acc = SegMetricAccumulator(CLASSES, threshold=cfg.train.threshold)
    scorer = VolumeScoreAccumulator(cfg.train.select_metric)
    loss_sum, n_seen = 0.0, 0
    for day in days:
        ids, probs = day.ids, day.probs
        truth = np.stack([cache.mask(i).transpose(2, 0, 1) for i in ids]).astype(np.float32)
        p, t = torch.from_numpy(probs), torch.from_numpy(truth)
        logits = torch.logit(p.clamp(1e-6, 1 - 1e-6))
        loss_sum += loop.loss_fn(logits, t).item() * len(ids)
        n_seen += len(ids)
        acc.update(p, t)
        scorer.add(probs > cfg.train.threshold, truth.astype(bool))
    metrics = {"val_loss": loss_sum / max(n_seen, 1)}
    metrics.update({f"val_{k}": v for k, v in acc.compute().items()})
    result = scorer.compute()
    metrics["val_score"], metrics["val_hausdorff"] = result["score"], result["hausdorff"]
    return metrics


def bench_val3d(sizes: Sizes, work: Path, rounds: int = 5) -> dict[str, Any]:
    """Validation of one long case-day before and after its scoring moved to the device.

    The prediction (sliding windows, the bulk of the time on a CPU) is the same code with the
    same values on both sides (the old path only added a host copy, free on the CPU), so it is
    run once and its seconds added to each side's scoring, which is timed on that prediction
    (best of ``rounds``, interleaved)."""
    data = work / "val3d_data"
    generate(data, work / "val3d_labels", 2, sizes.val3d_slices, seed=0)
    overrides = ["model.init_filters=8", "train.amp=false", "data.num_workers=0"]
    cfg = load_config(ROOT / "configs" / "default_3d.yaml", [*overrides, *sizes.patch_overrides])
    table = load_train_table(data, cfg.data.exclude)
    depth = table.groupby("case_day")["slice"].transform("size")
    longest = table[depth == depth.max()]
    pick = longest.sort_values(["height", "case", "day"]).iloc[0]["case_day"]  # 266 x 266 first
    day = table[table["case_day"] == pick].sort_values(["case", "day", "slice"])
    cache = VolumeCache(day, work / "val3d_cache", with_masks=True, progress=False)
    torch.manual_seed(0)
    loop, state = build_loop(cfg, DistContext(0, 1, 0, torch.device("cpu")), 1, progress=False)
    model = state.model.eval()
    with torch.inference_mode():
        start = time.perf_counter()
        (device_day,) = Predictor3D([model], cfg, loop.precision).device_days(day, cache)
        predict_s = time.perf_counter() - start
    # What the predictor's days() yields: the same tensor, as numpy on the host.
    host_day = DayPrediction(pick, device_day.ids, device_day.probs.cpu().numpy())

    def after() -> int:
        with patch.object(Kind3D, "validation_days", lambda *args: iter([device_day])):
            results["after"] = validate_volumes(loop, day, cache, model)
        return 1

    def before() -> int:
        results["before"] = _validate_volumes_before(loop, [host_day], cache)
        return 1

    results: dict[str, dict[str, float]] = {}
    new, old = best_rates([after, before], rounds)
    for key, value in results["before"].items():
        assert math.isclose(results["after"][key], value, rel_tol=1e-6, abs_tol=1e-9), key
    return {
        "val3d_seconds_per_case_day_before": predict_s + 1 / old,
        "val3d_seconds_per_case_day_after": predict_s + 1 / new,
        "val3d_predict_seconds": predict_s,
        "val3d_scoring_seconds_before": 1 / old,
        "val3d_scoring_seconds_after": 1 / new,
        "val3d_scoring_speedup": new / old,
        "val3d_case_day": [len(day), int(day["height"].iloc[0]), int(day["width"].iloc[0])],
        "val3d_threads": torch.get_num_threads(),
    }


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def machine() -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": _cores(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "numpy": np.__version__,
    }


def verdicts(results: dict[str, Any]) -> dict[str, bool]:
    met = {}
    for key, (op, target) in TARGETS.items():
        if key in results:
            value = results[key]
            met[key] = bool(value >= target if op == ">=" else value <= target)
    return met


def table(results: dict[str, Any]) -> str:
    lines = [f"{'measure':<30} {'result':>9}  {'target':>8}  met", "-" * 56]
    for key, (op, target) in TARGETS.items():
        if key in results:
            ok = "yes" if results["met"][key] else "NO"
            lines.append(f"{key:<30} {results[key]:>9.3f}  {op}{target:>6g}  {ok}")
    return "\n".join(lines)


PARTS = ["rle", "loader", "patches", "ema", "val3d", "training", "metric", "tuning", "selection"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run)")
    parser.add_argument("--json", type=Path, help="write the results to this JSON file")
    parser.add_argument("--keep", type=Path, help="work folder to keep (default: a temp one)")
    parser.add_argument(
        "--only",
        nargs="+",
        choices=PARTS,
        help="run only these parts (inference needs training)",
    )
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    sizes = QUICK if args.quick else FULL
    parts = set(args.only or PARTS)
    results: dict[str, Any] = {"quick": args.quick, "machine": machine()}
    with tempfile.TemporaryDirectory(prefix="gitract-bench-") as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        if "rle" in parts:
            results.update(bench_rle(sizes))
        if "loader" in parts:
            results.update(bench_loader(sizes, work))
        if "patches" in parts:
            results.update(bench_patches(sizes, work))
        if "ema" in parts:
            results.update(bench_ema(sizes))
        results["seconds_rle_loader"] = time.perf_counter() - started
        if "val3d" in parts:
            results.update(bench_val3d(sizes, work))
        if "training" in parts:
            training = bench_training(sizes, work)
            data, runs = training.pop("_runs")["4n"]
            results.update(training)
            results.update(bench_inference(data, runs, work, torch.device("cpu")))
            if torch.cuda.is_available():
                results.update(bench_inference(data, runs, work, torch.device("cuda")))
        if "metric" in parts:
            results.update(bench_metric(sizes))
        if "tuning" in parts:
            results.update(bench_tuning(sizes, work))
        if "selection" in parts:
            results.update(bench_selection(sizes, work))
        results["seconds"] = time.perf_counter() - started
    results["targets"] = {k: f"{op} {t:g}" for k, (op, t) in TARGETS.items()}
    results["met"] = verdicts(results)
    results = {k: (round(v, 4) if isinstance(v, float) and math.isfinite(v) else v)
               for k, v in results.items()}  # fmt: skip
    print(table(results))
    if args.json:
        write_text_atomic(args.json, json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    run_main(main)
