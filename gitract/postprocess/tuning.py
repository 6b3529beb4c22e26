"""Post-processing search on out-of-fold probabilities, for a chosen metric profile.

``infer.py --oof`` leaves each case-day's quantised probabilities in ``<runs>/oof_probs/``.
The search is coordinate descent, one class and one step at a time over DEFAULT_GRID's values,
the others held; a value is taken only if it raises the score. A candidate is a
:class:`~gitract.config.ClassPostprocess` (the config's and postprocess.json's schema), run
through the same :func:`~gitract.postprocess.steps.postprocess_class` as inference. Three
results are reported, each scored exactly as inference reproduces it (``postprocess_volume``
on the whole case-days, then the profile's VolumeScoreAccumulator in (case, day) order, the
order ``evaluate.py`` adds them in):

- ``untuned``: threshold 0.5, every other step off;
- ``thresholds_only``: threshold and 2D minimum component size searched;
- ``full``: every step searched, starting from ``thresholds_only``.

Speed. The case-days are split over worker processes that load their share once and keep, per
class, only the box that can ever hold a prediction or the truth (probabilities above the
lowest threshold of the grid, and the truth): the steps give the same masks there, nothing
outside can pass a threshold. The truth's distance transform is taken once, at the voxels a
prediction can reach; a candidate then costs its post-processing on the box, the Dice counts
and one distance pass from the truth to the prediction. Equal masks are never scored twice.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import multiprocessing as mp
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage
from tqdm.auto import tqdm

from gitract.config import PostprocessConfig
from gitract.data.layout import CLASSES, slice_mask
from gitract.errors import ConfigError, DataError
from gitract.postprocess.steps import (
    PIXEL_STEPS,
    STEP_NAMES,
    ClassPostprocess,
    postprocess_class,
    postprocess_volume,
    threshold_class,
)
from gitract.scoring.metrics import (
    N_TERMS,
    VolumeScoreAccumulator,
    bounding_box,
    check_profile,
    class_terms,
    dice_terms,
    directed_distance,
    hausdorff_mlebench,
    mlebench_view,
    row_counts,
    terms_summary,
    union_terms,
    volume_terms,
)

__all__ = [
    "DEFAULT_GRID",
    "DEFAULT_MIN_SIZES",
    "DEFAULT_THRESHOLDS",
    "THRESHOLD_STEPS",
    "tune_postprocess",
]

DEFAULT_THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)
DEFAULT_MIN_SIZES = (0, 25, 50, 100)
# The default search: every step's values (the first of each is "off", except the threshold).
DEFAULT_GRID: dict[str, tuple] = {
    "threshold": DEFAULT_THRESHOLDS,
    "min_size": DEFAULT_MIN_SIZES,
    "gate_prob": (0.0, 0.6, 0.7, 0.8, 0.9),
    "gate_area": (0, 25, 50, 100, 200),
    "fill_gaps": (0, 1, 2, 3),
    "min_run": (0, 2, 3, 5),
    "min_volume": (0, 50, 200, 1000, 3000),
    "keep_largest": (False, True),
    # Searched only where the OOF files carry a classification head's presence probabilities.
    "gate_cls": (0.0, 0.2, 0.35, 0.5, 0.65, 0.8),
}
THRESHOLD_STEPS = ("threshold", "min_size")
DEFAULT_SWEEPS = 2
_C = len(CLASSES)
_SQRT3 = math.sqrt(3.0)
_CASE_DAY_RE = re.compile(r"^case(\d+)_day(\d+)$")


def _day_order(path: Path) -> tuple[int, int]:
    match = _CASE_DAY_RE.match(path.stem)
    if not match:
        raise DataError(f"{path}: not a case<N>_day<D>.npz probabilities file")
    return int(match.group(1)), int(match.group(2))


def _has_presence(path: Path) -> bool:
    with np.load(path) as saved:
        return "presence" in saved.files


def _load(
    path: Path, rows: pd.DataFrame
) -> tuple[np.ndarray, np.ndarray, list[str], np.ndarray | None]:
    """Quantised probabilities (D, C, H, W), truth (D, C, H, W) bool, the slice ids and the
    quantised (D, C) presence probabilities (None without a classification head) of one
    case-day."""
    with np.load(path) as saved:
        probs, ids = saved["probs"], saved["ids"].tolist()
        presence = saved["presence"] if "presence" in saved.files else None
    missing = [i for i in ids if i not in rows.index]
    if missing:
        raise DataError(f"{path}: ids not in train.csv, e.g. {missing[0]}")
    if probs.dtype != np.uint8 or probs.ndim != 4 or probs.shape[:2] != (len(ids), _C):
        raise DataError(
            f"{path}: probs must be uint8 (D, {_C}, H, W); got {probs.dtype} {probs.shape}"
        )
    if presence is not None and (presence.dtype != np.uint8 or presence.shape != (len(ids), _C)):
        raise DataError(
            f"{path}: presence must be uint8 (D, {_C}); got {presence.dtype} {presence.shape}"
        )
    truth = np.stack([slice_mask(rows.loc[i]) for i in ids]).astype(bool)  # (D, H, W, C)
    return probs, np.ascontiguousarray(truth.transpose(0, 3, 1, 2)), ids, presence


class _Target:
    """One truth volume (a class, or mle-bench's union) cut to a box, with its distance
    transform taken once, kept only at the voxels a prediction can reach."""

    def __init__(self, truth: np.ndarray, reach: np.ndarray, shape: tuple[int, ...]) -> None:
        self.shape = shape
        self.box = bounding_box(truth, reach)
        self.n_truth = int(np.count_nonzero(truth))
        if self.box is None:
            return
        self.truth = np.ascontiguousarray(truth[self.box])
        self.reach_idx = np.flatnonzero(reach[self.box])
        if self.n_truth:
            spacing = tuple(1.0 / n for n in shape)
            dist = ndimage.distance_transform_edt(~self.truth, sampling=spacing)
            self.dist_at_reach = dist.ravel()[self.reach_idx]

    def hausdorff(self, pred: np.ndarray, mlebench: bool) -> float | None:
        """The (profile's) Hausdorff of ``pred`` (cut to the same box) against the truth."""
        n_pred = int(np.count_nonzero(pred)) if self.box is not None else 0
        if n_pred == 0 and self.n_truth == 0:
            return None
        if mlebench and n_pred == self.n_truth and np.array_equal(pred, self.truth):
            return 0.0
        if n_pred == 0 or self.n_truth == 0 or (mlebench and n_pred > 10 * self.n_truth):
            return 1.0
        to_truth = float(self.dist_at_reach[pred.ravel()[self.reach_idx]].max())
        spacing = tuple(1.0 / n for n in self.shape)
        to_pred = directed_distance(self.truth, pred, spacing)
        return max(to_truth, to_pred) / _SQRT3


class _CaseDay:
    """What a worker keeps of one case-day: per class the box of reachable or true voxels."""

    def __init__(self, path: Path, rows: pd.DataFrame, profile: str, low: float) -> None:
        probs, truth, _, presence = _load(path, rows)
        self.path, self.profile = path, profile
        self.depth, _, self.height, self.width = probs.shape
        shape = (self.depth, self.height, self.width)
        reach = probs > low * 255
        self.classes = []
        for c in range(_C):
            target = _Target(truth[:, c], reach[:, c], shape)
            box, box_probs, box_presence = target.box, None, None
            if box is not None:
                box_probs = np.ascontiguousarray(probs[:, c][box])
                if presence is not None:
                    box_presence = np.ascontiguousarray(presence[box[0], c])
            self.classes.append((target, box_probs, box_presence))
        self.union = None
        if profile == "mlebench":
            self.square = self.height == self.width
            any_reach, any_truth = reach.any(axis=1), truth.any(axis=1)
            if self.square:
                # A square slice is only transposed by the grader's decoding: same distances.
                self.union = _Target(any_truth, any_reach, shape)
            else:
                self.union_truth = mlebench_view(any_truth)
        self.current: list[ClassPostprocess | None] = [None] * _C
        self.masks: list[np.ndarray | None] = [None] * _C
        self.memo: dict[tuple, np.ndarray] = {}
        # Steps 1-2 (threshold, 2D sizes) of the last few settings: the other steps' candidates
        # all start from the same step-2 masks.
        self.stage2: dict[tuple, np.ndarray] = {}
        # Scores of masks already measured, by content: most candidates of a step change
        # nothing on most case-days.
        self.by_mask: dict[tuple, np.ndarray | float | None] = {}

    def _class_mask(self, c: int, params: ClassPostprocess) -> np.ndarray | None:
        """postprocess_class on the box (exact: nothing outside it can pass the threshold),
        with steps 1-2 shared by the candidates that differ only in later steps."""
        _, box_probs, box_presence = self.classes[c]
        if box_probs is None:
            return None
        key = (c, *(getattr(params, name) for name in PIXEL_STEPS))
        if key not in self.stage2:
            if len(self.stage2) >= 2 * _C:
                self.stage2.pop(next(iter(self.stage2)))
            self.stage2[key] = threshold_class(box_probs, params)
        return postprocess_class(box_probs, params, box_presence, self.stage2[key])

    @staticmethod
    def _digest(mask: np.ndarray) -> bytes:
        return hashlib.blake2b(np.packbits(mask).tobytes(), digest_size=16).digest()

    def _class_terms(self, c: int) -> np.ndarray:
        """Class c's Dice and (kaggle) Hausdorff terms at its current mask, as volume_terms
        adds them; by the mask's content, since most candidates change nothing on a day."""
        target, mask = self.classes[c][0], self.masks[c]
        if target.box is None:  # nothing true, nothing predicted: every row both empty
            rows = self.depth if self.profile == "kaggle" else 0.0
            return class_terms(c, rows, rows)
        key = (c, self._digest(mask))
        if key not in self.by_mask:
            self.by_mask[key] = self._measure(c, mask)
        return self.by_mask[key]

    def _measure(self, c: int, mask: np.ndarray) -> np.ndarray:
        target = self.classes[c][0]
        dice, rows = dice_terms(*row_counts(mask, target.truth), self.profile)
        if self.profile == "mlebench":
            return class_terms(c, dice, rows)
        outside = self.depth - len(mask)  # slices outside the box: both empty, 1 each
        return class_terms(c, dice + outside, rows + outside, target.hausdorff(mask, False))

    def _union_terms(self) -> np.ndarray:
        """mle-bench's union term from the current masks of all three classes."""
        full = np.zeros((self.depth, self.height, self.width), dtype=bool)
        for (target, _, _), mask in zip(self.classes, self.masks, strict=True):
            if target.box is not None:
                full[target.box] |= mask
        key = ("union", self._digest(full))
        if key not in self.by_mask:
            if self.square:
                target = self.union
                pred = full[target.box] if target.box is not None else full[:0]
                self.by_mask[key] = target.hausdorff(pred, mlebench=True)
            else:
                self.by_mask[key] = hausdorff_mlebench(mlebench_view(full), self.union_truth)
        return union_terms(self.by_mask[key])

    def set(self, c: int, params: ClassPostprocess) -> None:
        """Class c's current setting and its masks on the box."""
        self.current[c] = params
        self.masks[c] = self._class_mask(c, params)

    def terms(self, c: int, params: ClassPostprocess) -> np.ndarray:
        """The case-day's terms with class c set to ``params`` and the others as they are
        (mle-bench's union term from every class's mask: keyed by all the settings)."""
        key = (c, params) if self.profile == "kaggle" else (c, params, tuple(self.current))
        if key not in self.memo:
            saved = self.current[c], self.masks[c]
            self.set(c, params)
            terms = self._class_terms(c)
            if self.profile == "mlebench":
                terms = terms + self._union_terms()
            self.current[c], self.masks[c] = saved
            self.memo[key] = terms
        return self.memo[key] + sum((self._own_terms(k) for k in range(_C) if k != c), 0)

    def _own_terms(self, k: int) -> np.ndarray:
        """Class k's own terms at its current setting (no union term)."""
        key = ("class", k, self.current[k])
        if key not in self.memo:
            self.memo[key] = self._class_terms(k)
        return self.memo[key]

    def exact(self, settings: Sequence[Sequence[ClassPostprocess]], rows: pd.DataFrame) -> list:
        """Terms of each setting as inference makes them: the whole case-day again."""
        probs, truth, _, presence = _load(self.path, rows)
        terms = [
            volume_terms(postprocess_volume(probs, s, presence), truth, self.profile)
            for s in settings
        ]
        return len(probs), terms


def _worker(conn, paths: list[Path], rows: pd.DataFrame, profile: str, low: float) -> None:
    """Serve requests on ``conn`` for a shard of case-days kept in memory."""
    try:
        days = [_CaseDay(p, rows, profile, low) for p in paths]
        conn.send(("ok", len(days)))
        while True:
            command, *args = conn.recv()
            if command == "stop":
                break
            if command == "set":
                for day in days:
                    for c, params in enumerate(args[0]):
                        if day.current[c] != params:
                            day.set(c, params)
                conn.send(("ok", None))
            elif command == "eval":
                c, candidates = args
                sums = np.zeros((len(candidates), N_TERMS))
                for day in days:
                    for k, params in enumerate(candidates):
                        sums[k] += day.terms(c, params)
                conn.send(("ok", sums))
            elif command == "exact":
                out = [(day.path, day.exact(args[0], rows)) for day in days]
                conn.send(("ok", out))
    except Exception as err:  # reported to the parent, which raises it there
        conn.send(("error", err))
    finally:
        conn.close()


class _Pool:
    """Worker processes, each holding its shard of case-days between requests."""

    def __init__(self, files, rows, profile, low, workers: int) -> None:
        ctx = mp.get_context("fork")
        self.conns, self.procs = [], []
        for shard in (files[k::workers] for k in range(workers)):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(child, shard, rows, profile, low), daemon=True)
            proc.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(proc)
        self._gather()

    def _gather(self) -> list:
        out = []
        for conn in self.conns:
            status, value = conn.recv()
            if status == "error":
                self.close()
                raise value
            out.append(value)
        return out

    def ask(self, *message) -> list:
        for conn in self.conns:
            conn.send(message)
        return self._gather()

    def close(self) -> None:
        for conn in self.conns:
            with contextlib.suppress(BrokenPipeError, OSError):
                conn.send(("stop",))
        for proc in self.procs:
            proc.join(timeout=10)


def _check_grid(grid: Mapping[str, Sequence]) -> dict[str, tuple]:
    """The grid's values as ClassPostprocess validates them (plain Python values, also from
    np.arange, so the result is JSON), or a ConfigError naming the step and the value."""
    unknown = sorted(set(grid) - set(STEP_NAMES))
    if unknown:
        raise ConfigError(f"tuning grid: unknown step(s) {unknown}; known: {list(STEP_NAMES)}")
    out = {}
    for name, values in grid.items():
        if not len(values):
            raise ConfigError(f"tuning grid: no values for {name}")
        try:
            out[name] = tuple(getattr(ClassPostprocess(**{name: v}), name) for v in values)
        except ValueError as err:
            raise ConfigError(f"tuning grid: {name}: {err}") from None
    if "threshold" not in out:
        raise ConfigError("tuning grid: needs threshold values")
    return out


def _descend(pool: _Pool, profile: str, start: list, grid: dict, steps, sweeps: int, bar) -> list:
    """Coordinate descent from ``start`` over ``steps``; returns the per-class settings."""
    current = list(start)
    pool.ask("set", tuple(current))
    for _ in range(sweeps):
        changed = False
        for c in range(_C):
            for name in steps:
                candidates = [current[c].model_copy(update={name: v}) for v in grid[name]]
                if current[c] not in candidates:
                    candidates.append(current[c])
                sums = np.sum(pool.ask("eval", c, candidates), axis=0)
                scores = [terms_summary(s, profile)["score"] for s in sums]
                now = scores[candidates.index(current[c])]
                best = int(np.nanargmax(scores))
                if scores[best] > now + 1e-12:
                    current[c] = candidates[best]
                    pool.ask("set", tuple(current))
                    changed = True
                bar.update(1)
        if not changed:
            break
    return current


def tune_postprocess(
    probs_dir: Path,
    table: pd.DataFrame,
    profile: str = "kaggle",
    grid: Mapping[str, Sequence] | None = None,
    sweeps: int = DEFAULT_SWEEPS,
    workers: int | None = None,
    progress: bool = True,
) -> dict:
    """Search the per-class post-processing on the OOF probabilities for ``profile``.

    ``table`` is the train slice table (``load_train_table``) holding the truth; ``grid``
    maps step names to the values to try (default DEFAULT_GRID; a step left out stays off).
    Returns ``classes`` (the full search's settings: a ``postprocess`` section, as
    postprocess.json holds it), ``thresholds_only`` (the same after the first search),
    ``profile``, ``scores`` ({untuned, thresholds_only, full} -> {score, dice, hausdorff}),
    ``score`` (the full one), ``baseline_score`` (the untuned one), ``n_case_days`` and
    ``n_slices``."""
    check_profile(profile)
    grid = _check_grid(DEFAULT_GRID if grid is None else grid)
    files = sorted(
        (p for p in probs_dir.glob("*.npz") if not p.name.startswith(".")), key=_day_order
    )
    if not files:
        raise DataError(f"{probs_dir}: no OOF probabilities; run scripts/infer.py --oof first")
    with_presence = [_has_presence(p) for p in files]
    if any(with_presence) and not all(with_presence):
        odd = files[with_presence.index(not with_presence[0])]
        raise DataError(f"{odd}: presence probabilities in some OOF files but not in all")
    if not with_presence[0]:
        grid.pop("gate_cls", None)  # no classification head: nothing to gate on
    rows = table.set_index("id")
    workers = max(1, min(workers or os.cpu_count() or 1, len(files)))
    low = min(*grid["threshold"], ClassPostprocess().threshold)  # the untuned start too
    untuned = [ClassPostprocess()] * _C
    threshold_steps = [s for s in THRESHOLD_STEPS if s in grid]
    all_steps = list(grid)
    n_rounds = sweeps * _C * (len(threshold_steps) + len(all_steps))
    pool = _Pool(files, rows, profile, low, workers)
    try:
        with tqdm(total=n_rounds, desc="tune", unit="step", disable=not progress) as bar:
            thresholds_only = _descend(pool, profile, untuned, grid, threshold_steps, sweeps, bar)
            full = _descend(pool, profile, thresholds_only, grid, all_steps, sweeps, bar)
        settings = [tuple(untuned), tuple(thresholds_only), tuple(full)]
        per_day = [pair for shard in pool.ask("exact", settings) for pair in shard]
    finally:
        pool.close()
    # Add the case-days up in (case, day) order, as evaluate.py does: the same float sums.
    per_day.sort(key=lambda pair: _day_order(pair[0]))
    scores = {}
    for k, name in enumerate(("untuned", "thresholds_only", "full")):
        acc = VolumeScoreAccumulator(profile)
        for _, (_, terms) in per_day:
            acc.add_terms(terms[k])
        scores[name] = acc.compute()
    n_slices = sum(depth for _, (depth, _) in per_day)
    return {
        "profile": profile,
        "classes": _section(full).model_dump(),
        "thresholds_only": _section(thresholds_only).model_dump(),
        "scores": scores,
        "score": scores["full"]["score"],
        "baseline_score": scores["untuned"]["score"],
        "n_case_days": len(files),
        "n_slices": n_slices,
    }


def _section(per_class: Sequence[ClassPostprocess]) -> PostprocessConfig:
    return PostprocessConfig(**dict(zip(CLASSES, per_class, strict=True)))
