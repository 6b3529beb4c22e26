"""Post-processing search on out-of-fold probabilities, for a chosen metric profile.

``infer.py --oof`` leaves each case-day's quantised probabilities in ``<runs>/oof_probs/``.
The search is coordinate descent, one class and one step at a time over DEFAULT_GRID's values,
the others held; a value is taken only if it raises the score. A candidate is a
:class:`~gitract.config.ClassPostprocess` (the config's and postprocess.json's schema), run
through the same step functions as inference (:mod:`gitract.postprocess.steps`). Three
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
and one distance pass from the truth to the prediction. Each threshold's small 2D components are
labelled once per blend, for every minimum size; equal masks are never scored twice, and
(kaggle) candidates whose steps 1-4 keep the same slices of the same step-2 masks, with the
same 3D step, share one mask: it is made and scored once.
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
from gitract.data.layout import CLASSES, read_csv_file, slice_mask
from gitract.errors import ConfigError, DataError
from gitract.postprocess.steps import (
    PIXEL_STEPS,
    STEP_NAMES,
    ClassPostprocess,
    binarize,
    blend_quantized,
    postprocess_volume,
    remove_small_volumes,
    slice_flags,
    slice_peaks,
    small_components,
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
    slice_counts,
    terms_summary,
    union_terms,
    volume_terms,
)

__all__ = [
    "DEFAULT_GRID",
    "OofSearch",
    "case_day_folds",
    "section",
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


def _day_order(path: Path | str) -> tuple[int, int]:
    """(case, day) of a ``case<N>_day<D>`` name or ``.npz`` file, to sort case-days by."""
    match = _CASE_DAY_RE.match(Path(path).stem)
    if not match:
        raise DataError(f"{path}: not a case<N>_day<D>.npz probabilities file")
    return int(match.group(1)), int(match.group(2))


def _has_presence(path: Path) -> bool:
    with np.load(path) as saved:
        return "presence" in saved.files


def _read_probs(path: Path, rows: pd.DataFrame) -> tuple[np.ndarray, list[str], np.ndarray | None]:
    """Quantised probabilities (D, C, H, W), the slice ids and the quantised (D, C) presence
    probabilities (None without a classification head) of one case-day's OOF file."""
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
    return probs, ids, presence


def _truth(ids: Sequence[str], rows: pd.DataFrame) -> np.ndarray:
    """The (D, C, H, W) bool truth of the slices ``ids``."""
    truth = np.stack([slice_mask(rows.loc[i]) for i in ids]).astype(bool)  # (D, H, W, C)
    return np.ascontiguousarray(truth.transpose(0, 3, 1, 2))


def _load_members(
    paths: Sequence[Path], rows: pd.DataFrame
) -> tuple[list[np.ndarray], list[np.ndarray | None], np.ndarray]:
    """One case-day's OOF files, one per member (the same slices in the same order): their
    probabilities, their presence (or None) and the truth."""
    loaded = [_read_probs(path, rows) for path in paths]
    probs, ids, _ = loaded[0]
    for path, (other, other_ids, _) in zip(paths[1:], loaded[1:], strict=True):
        if other_ids != ids or other.shape != probs.shape:
            raise DataError(
                f"{path}: not the slices of {paths[0]} ({len(other_ids)} slices of "
                f"{other.shape[2:]} against {len(ids)} of {probs.shape[2:]}); run "
                "scripts/infer.py --oof for both runs on the same folds file"
            )
    return [p for p, _, _ in loaded], [pr for _, _, pr in loaded], _truth(ids, rows)


def _blend_presence(
    presence: Sequence[np.ndarray | None], weights: Sequence[float]
) -> np.ndarray | None:
    """The blend's presence: the weighted mean over the weighted members that have one."""
    have = [(pr, w) for pr, w in zip(presence, weights, strict=True) if pr is not None and w > 0]
    return blend_quantized(*zip(*have, strict=True)) if have else None


class _Target:
    """One truth volume (a class, or mle-bench's union) cut to a box, with its distance
    transform taken once, kept only at the voxels a prediction can reach."""

    def __init__(self, truth: np.ndarray, reach: np.ndarray, shape: tuple[int, ...]) -> None:
        self.shape = shape
        self.box = bounding_box(truth, reach)
        # Predictions' in-plane distance planes by slice content, while one step's candidates
        # are measured (they share most slices); _CaseDay.forget_planes empties it.
        self.planes: dict[tuple, np.ndarray] = {}
        self.n_truth = int(np.count_nonzero(truth))
        if self.box is None:
            return
        self.truth = np.ascontiguousarray(truth[self.box])
        self.truth_counts = slice_counts(self.truth)
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
        to_pred = directed_distance(self.truth, pred, spacing, self.planes, to_truth)
        return max(to_truth, to_pred) / _SQRT3


class _CaseDay:
    """What a worker keeps of one case-day: per class the box of voxels that are true or that
    some member's probability can take past the lowest threshold, with each member's
    probabilities at those voxels only, and the blend of the current weights on the box."""

    def __init__(
        self, paths: Sequence[Path], rows: pd.DataFrame, profile: str, low: float, below: int
    ) -> None:
        members, presence, truth = _load_members(paths, rows)
        self.paths, self.profile, self.below = tuple(paths), profile, below
        self.depth, _, self.height, self.width = members[0].shape
        shape = (self.depth, self.height, self.width)
        reach = np.zeros(members[0].shape, dtype=bool)
        for probs in members:
            reach |= binarize(probs, low)
        # Per class: its target, and on its box each member's values at the reachable voxels
        # (the target's reach_idx; a blend is below the lowest threshold wherever every member
        # is, so the other voxels of the box are 0 for the steps) and their slices.
        self.members: list[tuple[_Target, np.ndarray | None, np.ndarray | None, list]] = []
        for c in range(_C):
            target = _Target(truth[:, c], reach[:, c], shape)
            slices = values = None
            box_presence: list[np.ndarray | None] = [None] * len(members)
            if target.box is not None:
                index = target.reach_idx
                values = np.stack([probs[:, c][target.box].ravel()[index] for probs in members])
                slices = index // target.truth[0].size
                box_presence = [
                    None if pr is None else np.ascontiguousarray(pr[target.box[0], c])
                    for pr in presence
                ]
            self.members.append((target, values, slices, box_presence))
        self.union = None
        if profile == "mlebench":
            self.square = self.height == self.width
            any_reach, any_truth = reach.any(axis=1), truth.any(axis=1)
            if self.square:
                # A square slice is only transposed by the grader's decoding: same distances.
                self.union = _Target(any_truth, any_reach, shape)
            else:
                self.union_truth = mlebench_view(any_truth)
        # Scores of masks already measured, by content: most candidates of a step change
        # nothing on most case-days (whatever the blend: a mask's terms depend on it alone).
        self.by_mask: dict[tuple, np.ndarray | float | None] = {}
        self.blend([1.0] + [0.0] * (len(members) - 1))

    def blend(self, weights: Sequence[float]) -> None:
        """Take the blend of the members with ``weights`` (as inference forms it) on every
        class's box; no class has a setting yet."""
        self.weights = tuple(weights)
        self.classes, self.peaks = [], []
        # Per class: the blend at the reachable voxels, to count a threshold's pixels per
        # slice without reading the whole box.
        self.reached: list[np.ndarray | None] = []
        for target, values, _, box_presence in self.members:
            box_probs = presence = reached = None
            if target.box is not None:
                box_probs = np.zeros(target.truth.shape, dtype=np.uint8)
                reached = blend_quantized(values, weights)
                box_probs.ravel()[target.reach_idx] = reached
                presence = _blend_presence(box_presence, weights)
            self.classes.append((target, box_probs, presence))
            self.peaks.append(None if box_probs is None else slice_peaks(box_probs))
            self.reached.append(reached)
        self.current: list[ClassPostprocess | None] = [None] * _C
        self.masks: list[np.ndarray | None] = [None] * _C
        self.memo: dict[tuple, np.ndarray] = {}
        # Steps 1-2 (threshold, 2D sizes) of the last few settings, with each slice's pixel
        # count: the other steps' candidates all start from the same step-2 masks.
        self.stage2: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
        # Per (class, threshold): its small components (small_components), labelled once for
        # every minimum size of the grid; a few pixels each, where stage2 holds whole masks.
        self.small: dict[tuple[int, float], tuple[np.ndarray, np.ndarray]] = {}

    def _slices(
        self, c: int, params: ClassPostprocess
    ) -> tuple[np.ndarray, np.ndarray | None, tuple]:
        """Steps 1-4 on class c's box (exact: nothing outside it can pass the threshold), not
        yet applied: steps 1-2's masks (shared by the candidates equal there), the slices
        steps 3-4 keep (per-slice numbers only; None: every slice that has pixels) and a key
        naming the result in this blend."""
        key = (c, *(getattr(params, name) for name in PIXEL_STEPS))
        if key not in self.stage2:
            if len(self.stage2) >= 2 * _C:
                self.stage2.pop(next(iter(self.stage2)))
            self.stage2[key] = self._threshold(c, params)
        masks, areas = self.stage2[key]
        keep = slice_flags(self.peaks[c], areas, params, self.classes[c][2])
        if np.array_equal(keep, areas > 0):  # no slice with pixels dropped: 1-2's masks
            keep = None
        return masks, keep, (key, None if keep is None else keep.tobytes())

    def _threshold(self, c: int, params: ClassPostprocess) -> tuple[np.ndarray, np.ndarray]:
        """threshold_class on class c's box, and its pixels per slice: the thresholded masks
        less the components that min_size removes, read from the threshold's small
        components (counted from the reachable voxels: nothing else of the box can pass)."""
        box_probs = self.classes[c][1]
        if params.min_size > self.below:  # beyond the labelled sizes (not a grid value)
            masks = threshold_class(box_probs, params)
            return masks, slice_counts(masks)
        masks = binarize(box_probs, params.threshold)
        slices = self.members[c][2]
        areas = np.bincount(
            slices[binarize(self.reached[c], params.threshold)], minlength=len(masks)
        )
        if params.min_size > 1:
            key = (c, params.threshold)
            if key not in self.small:
                self.small[key] = small_components(masks, self.below)
            pixels, sizes = self.small[key]
            removed = pixels[: np.searchsorted(sizes, params.min_size)]
            masks.ravel()[removed] = False
            areas -= np.bincount(removed // masks[0].size, minlength=len(masks))
        return masks, areas

    def _class_mask(self, c: int, params: ClassPostprocess) -> np.ndarray | None:
        """postprocess_class on the box (None: the class has no box)."""
        if self.classes[c][1] is None:
            return None
        return self._volume(*self._slices(c, params)[:2], params)

    @staticmethod
    def _volume(masks: np.ndarray, keep: np.ndarray | None, params: ClassPostprocess) -> np.ndarray:
        """Steps 3-4's slices applied to :meth:`_slices`' masks (a copy: the step-2 masks are
        shared), then step 5."""
        if keep is not None:
            masks = masks.copy()
            masks[~keep] = False
        return remove_small_volumes(masks, params.min_volume, params.keep_largest)

    @staticmethod
    def _digest(mask: np.ndarray) -> bytes:
        return hashlib.blake2b(np.packbits(mask).tobytes(), digest_size=16).digest()

    def _class_terms(self, c: int, mask: np.ndarray | None) -> np.ndarray:
        """Class c's Dice and (kaggle) Hausdorff terms at ``mask`` (on its box), as
        volume_terms adds them; by the mask's content, since most candidates change nothing
        on a day."""
        target = self.classes[c][0]
        if target.box is None:  # nothing true, nothing predicted: every row both empty
            rows = self.depth if self.profile == "kaggle" else 0.0
            return class_terms(c, rows, rows)
        key = (c, self._digest(mask))
        if key not in self.by_mask:
            self.by_mask[key] = self._measure(c, mask)
        return self.by_mask[key]

    def _measure(self, c: int, mask: np.ndarray) -> np.ndarray:
        target = self.classes[c][0]
        counts = row_counts(mask, target.truth, target.truth_counts)
        dice, rows = dice_terms(*counts, self.profile)
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

    def forget_planes(self) -> None:
        """Empty the targets' distance-plane caches (kept only while one step's candidates
        are measured on this case-day: they would fill the memory across case-days)."""
        for target, _, _ in self.classes:
            target.planes.clear()
        if self.union is not None:
            self.union.planes.clear()

    def set(self, c: int, params: ClassPostprocess) -> None:
        """Class c's current setting and (for mle-bench's union term) its masks on the box."""
        self.current[c] = params
        if self.profile == "mlebench":
            self.masks[c] = self._class_mask(c, params)

    def terms(self, c: int, params: ClassPostprocess) -> np.ndarray:
        """The case-day's terms with class c set to ``params`` and the others as they are
        (mle-bench's union term from every class's mask: keyed by all the settings)."""
        if self.profile == "kaggle":
            key = (c, params)
            if key not in self.memo:
                self.memo[key] = self._kaggle_terms(c, params)
        else:
            key = (c, params, tuple(self.current))
            if key not in self.memo:
                saved = self.current[c], self.masks[c]
                self.set(c, params)
                self.memo[key] = self._class_terms(c, self.masks[c]) + self._union_terms()
                self.current[c], self.masks[c] = saved
        return self.memo[key] + sum((self._own_terms(k) for k in range(_C) if k != c), 0)

    def _kaggle_terms(self, c: int, params: ClassPostprocess) -> np.ndarray:
        """Class c's kaggle terms at ``params``, by what steps 1-4 keep and step 5's values:
        candidates equal there (most of a step's candidates on most case-days) share one
        mask, made and scored once."""
        if self.classes[c][1] is None:
            return self._class_terms(c, None)
        masks, keep, key = self._slices(c, params)
        key = ("steps", key, params.min_volume, params.keep_largest)
        if key not in self.memo:
            self.memo[key] = self._class_terms(c, self._volume(masks, keep, params))
        return self.memo[key]

    def _own_terms(self, k: int) -> np.ndarray:
        """Class k's own terms at its current setting (no union term)."""
        key = ("class", k, self.current[k])
        if key not in self.memo:
            if self.profile == "kaggle":
                self.memo[key] = self._kaggle_terms(k, self.current[k])
            else:
                self.memo[key] = self._class_terms(k, self.masks[k])
        return self.memo[key]

    def exact(self, trials: Sequence[tuple[Sequence[float], Sequence[ClassPostprocess]]], rows):
        """Terms of each (weights, settings) trial as inference makes them: the members'
        whole case-day blended, then post-processed."""
        members, presence, truth = _load_members(self.paths, rows)
        terms, blended, probs = [], None, None
        for weights, settings in trials:
            if weights != blended:  # consecutive trials of one blend share it
                blended, probs = weights, blend_quantized(members, weights)
            masks = postprocess_volume(probs, settings, _blend_presence(presence, weights))
            terms.append(volume_terms(masks, truth, self.profile))
        return len(truth), terms


def _worker(
    conn,
    paths: list[tuple[Path, ...]],
    rows: pd.DataFrame,
    profile: str,
    low: float,
    below: int,
) -> None:
    """Serve requests on ``conn`` for a shard of case-days kept in memory."""
    try:
        days = [_CaseDay(p, rows, profile, low, below) for p in paths]
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
                    day.forget_planes()
                conn.send(("ok", sums))
            elif command == "blend":
                for day in days:
                    day.blend(args[0])
                conn.send(("ok", None))
            elif command == "exact":
                out = [(day.paths[0], day.exact(args[0], rows)) for day in days]
                conn.send(("ok", out))
    except Exception as err:  # reported to the parent, which raises it there
        conn.send(("error", err))
    finally:
        conn.close()


def _shards(files: Sequence[tuple[Path, ...]], workers: int) -> list[list[tuple[Path, ...]]]:
    """The case-days split over ``workers``, the biggest first, each to the least loaded shard
    so far: a request waits for the slowest worker. The size of a case-day's files stands in
    for its work; it follows the slices and their size (real case-days have 80 or 144 slices
    of 234x234 to 360x310 pixels, which a round robin can pile on one worker), not the
    organs'."""
    sizes = [sum(path.stat().st_size for path in paths) for paths in files]
    shards: list[list[tuple[Path, ...]]] = [[] for _ in range(workers)]
    loads = [0] * workers
    for k in sorted(range(len(files)), key=lambda k: -sizes[k]):
        least = loads.index(min(loads))
        shards[least].append(files[k])
        loads[least] += sizes[k]
    return shards


class _Pool:
    """Worker processes, each holding its shard of case-days between requests."""

    def __init__(self, files, rows, profile, low, below, workers: int) -> None:
        ctx = mp.get_context("fork")
        self.conns, self.procs = [], []
        for shard in _shards(files, workers):
            parent, child = ctx.Pipe()
            args = (child, shard, rows, profile, low, below)
            proc = ctx.Process(target=_worker, args=args, daemon=True)
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


def _descend(
    pool: _Pool, profile: str, start: list, grid: dict, steps, sweeps: int, bar
) -> tuple[list[ClassPostprocess], float]:
    """Coordinate descent from ``start`` over ``steps``: the per-class settings and their
    score (the search's, which the exact pass reproduces)."""
    current = list(start)
    pool.ask("set", tuple(current))
    score = math.nan
    for _ in range(sweeps):
        changed = False
        for c in range(_C):
            for name in steps:
                candidates = [current[c].model_copy(update={name: v}) for v in grid[name]]
                if current[c] not in candidates:
                    candidates.append(current[c])
                sums = np.sum(pool.ask("eval", c, candidates), axis=0)
                scores = [terms_summary(s, profile)["score"] for s in sums]
                score = scores[candidates.index(current[c])]
                best = int(np.nanargmax(scores))
                if scores[best] > score + 1e-12:
                    current[c], score = candidates[best], scores[best]
                    pool.ask("set", tuple(current))
                    changed = True
                if bar is not None:
                    bar.update(1)
        if not changed:
            break
    return current, score


def case_day_folds(folds_csv: Path) -> dict[str, int]:
    """``case<N>_day<D>`` -> fold, from a folds file (scripts/make_folds.py's)."""
    folds = read_csv_file(folds_csv, ("case", "day", "fold"), "folds file")
    fold = pd.to_numeric(folds["fold"], errors="coerce")
    if fold.isna().any():
        line = int(np.flatnonzero(fold.isna().to_numpy())[0])
        raise DataError(
            f"{folds_csv}: line {line + 2}: fold {folds['fold'].iloc[line]!r} is not an integer"
        )
    days = "case" + folds["case"] + "_day" + folds["day"]
    return dict(zip(days, fold.astype(int), strict=True))


class OofSearch:
    """The out-of-fold probabilities of one or more runs (the *members*: ``oof_probs/``
    folders), held by worker processes, where post-processing settings and blend weights are
    searched without re-running any model.

    Only the case-days every member has are used. :meth:`blend` takes the members' weighted
    blend (exactly as inference forms it: :func:`~gitract.postprocess.steps.blend_quantized`),
    :meth:`search` runs a coordinate descent on it, :meth:`exact` scores (weights, settings)
    trials as inference reproduces them, pooled and per fold. Use it as a context manager: it
    owns processes."""

    def __init__(
        self,
        member_dirs: Sequence[Path],
        table: pd.DataFrame,
        profile: str = "kaggle",
        grid: Mapping[str, Sequence] | None = None,
        workers: int | None = None,
        folds: Mapping[str, int] | None = None,
    ) -> None:
        check_profile(profile)
        self.profile, self.grid = profile, _check_grid(DEFAULT_GRID if grid is None else grid)
        self.member_dirs = [Path(d) for d in member_dirs]
        per_member = [_oof_files(d) for d in self.member_dirs]
        shared = set.intersection(*(set(files) for files in per_member))
        self.case_days = sorted(shared, key=_day_order)
        if not self.case_days:
            raise DataError(
                f"{', '.join(map(str, self.member_dirs))}: no case-day has OOF probabilities "
                "of every run; run scripts/infer.py --oof for each run on the same folds"
            )
        self.left_out = sum(len(files) for files in per_member) - len(per_member) * len(shared)
        self.with_presence = [
            _has_presence(d / f"{self.case_days[0]}.npz") for d in self.member_dirs
        ]
        for directory, has in zip(self.member_dirs, self.with_presence, strict=True):
            odd = [cd for cd in self.case_days if _has_presence(directory / f"{cd}.npz") != has]
            if odd:
                raise DataError(
                    f"{directory / odd[0]}.npz: presence probabilities in some OOF files of "
                    "this run but not in all"
                )
        self.folds = None
        if folds is not None:
            unknown = [cd for cd in self.case_days if cd not in folds]
            if unknown:
                raise DataError(
                    f"{unknown[0]}: OOF probabilities of a case-day that no fold holds; use "
                    "the folds file the OOF predictions were made with"
                )
            self.folds = {cd: int(folds[cd]) for cd in self.case_days}
        self.rows = table.set_index("id")
        files = [tuple(d / f"{cd}.npz" for d in self.member_dirs) for cd in self.case_days]
        workers = max(1, min(workers or os.cpu_count() or 1, len(files)))
        self.low = min(*self.grid["threshold"], ClassPostprocess().threshold)  # untuned too
        below = max(self.grid.get("min_size", (0,)))  # the largest 2D size the search tries
        self.pool = _Pool(files, self.rows, profile, self.low, below, workers)
        self.weights: tuple[float, ...] = (1.0,) + (0.0,) * (len(member_dirs) - 1)

    def __enter__(self) -> OofSearch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.pool.close()

    def blend(self, weights: Sequence[float]) -> None:
        """Search on the blend of the members with ``weights`` (0: left out) from now on."""
        if len(weights) != len(self.member_dirs) or not any(w > 0 for w in weights):
            raise ValueError(f"one weight per member, some > 0: got {list(weights)}")
        weights = tuple(float(w) for w in weights)
        if weights != self.weights:  # re-blending every case-day is the costly part
            self.weights = weights
            self.pool.ask("blend", self.weights)

    def steps(self, names: Sequence[str]) -> list[str]:
        """The grid's steps among ``names`` that apply to the current blend (``gate_cls`` only
        where a weighted member has a classification head)."""
        presence = any(h and w > 0 for h, w in zip(self.with_presence, self.weights, strict=True))
        return [n for n in names if n in self.grid and (presence or n != "gate_cls")]

    def search(
        self, start: Sequence[ClassPostprocess], steps: Sequence[str], sweeps: int, bar=None
    ) -> tuple[list[ClassPostprocess], float]:
        """Coordinate descent on the current blend from ``start`` over ``steps``."""
        return _descend(self.pool, self.profile, list(start), self.grid, steps, sweeps, bar)

    def tune(self, sweeps: int = DEFAULT_SWEEPS, bar=None) -> tuple[list, list]:
        """The tuner's two searches on the current blend: (thresholds_only, full) settings."""
        untuned = [ClassPostprocess()] * _C
        thresholds_only, _ = self.search(untuned, self.steps(THRESHOLD_STEPS), sweeps, bar)
        full, _ = self.search(thresholds_only, self.steps(STEP_NAMES), sweeps, bar)
        return thresholds_only, full

    def rounds(self, sweeps: int) -> int:
        """Progress-bar steps of one :meth:`tune` at most."""
        return sweeps * _C * (len(self.steps(THRESHOLD_STEPS)) + len(self.steps(STEP_NAMES)))

    def exact(
        self, trials: Sequence[tuple[Sequence[float], Sequence[ClassPostprocess]]]
    ) -> list[dict]:
        """Each (weights, settings) trial scored exactly as inference reproduces it: the whole
        case-days blended and post-processed, the profile's VolumeScoreAccumulator adding them
        in (case, day) order as ``evaluate.py`` does. Per trial: score, dice, hausdorff and,
        with folds, ``per_fold`` {fold: score}; every file read once for all trials."""
        trials = [(tuple(float(w) for w in weights), tuple(s)) for weights, s in trials]
        # Equal trials (the selected blend can be the equal-weight one) are made once.
        position = {trial: k for k, trial in enumerate(dict.fromkeys(trials))}
        per_day = [pair for shard in self.pool.ask("exact", list(position)) for pair in shard]
        per_day.sort(key=lambda pair: _day_order(pair[0]))
        out = []
        for trial in trials:
            k = position[trial]
            pooled, by_fold = VolumeScoreAccumulator(self.profile), {}
            for path, (_, terms) in per_day:
                pooled.add_terms(terms[k])
                if self.folds is not None:
                    fold = self.folds[path.stem]
                    by_fold.setdefault(fold, VolumeScoreAccumulator(self.profile))
                    by_fold[fold].add_terms(terms[k])
            result = pooled.compute()
            if self.folds is not None:
                result["per_fold"] = {f: by_fold[f].compute()["score"] for f in sorted(by_fold)}
            out.append(result)
        self.n_slices = sum(depth for _, (depth, _) in per_day)
        return out


def _oof_files(directory: Path) -> list[str]:
    """The case-days of a run's ``oof_probs/`` folder (temp files left out)."""
    files = [p for p in Path(directory).glob("*.npz") if not p.name.startswith(".")]
    if not files:
        raise DataError(f"{directory}: no OOF probabilities; run scripts/infer.py --oof first")
    return [p.stem for p in sorted(files, key=_day_order)]


def tune_postprocess(
    probs_dir: Path,
    table: pd.DataFrame,
    profile: str = "kaggle",
    grid: Mapping[str, Sequence] | None = None,
    sweeps: int = DEFAULT_SWEEPS,
    workers: int | None = None,
    progress: bool = True,
    folds: Mapping[str, int] | None = None,
) -> dict:
    """Search the per-class post-processing on the OOF probabilities for ``profile``.

    ``table`` is the train slice table (``load_train_table``) holding the truth; ``grid``
    maps step names to the values to try (default DEFAULT_GRID; a step left out stays off);
    ``folds`` (case-day -> fold, :func:`case_day_folds`) adds each fold's score.
    Returns ``classes`` (the full search's settings: a ``postprocess`` section, as
    postprocess.json holds it), ``thresholds_only`` (the same after the first search),
    ``profile``, ``scores`` ({untuned, thresholds_only, full} -> {score, dice, hausdorff, and
    with folds per_fold}), ``score`` (the full one), ``baseline_score`` (the untuned one),
    ``n_case_days`` and ``n_slices``."""
    with OofSearch([probs_dir], table, profile, grid, workers, folds) as search:
        untuned = [ClassPostprocess()] * _C
        with tqdm(
            total=search.rounds(sweeps), desc="tune", unit="step", disable=not progress
        ) as bar:
            thresholds_only, full = search.tune(sweeps, bar)
        names = ("untuned", "thresholds_only", "full")
        trials = [((1.0,), s) for s in (untuned, thresholds_only, full)]
        scores = dict(zip(names, search.exact(trials), strict=True))
    return {
        "profile": profile,
        "classes": section(full).model_dump(),
        "thresholds_only": section(thresholds_only).model_dump(),
        "scores": scores,
        "score": scores["full"]["score"],
        "baseline_score": scores["untuned"]["score"],
        "n_case_days": len(search.case_days),
        "n_slices": search.n_slices,
    }


def section(per_class: Sequence[ClassPostprocess]) -> PostprocessConfig:
    """Per-class settings as a ``postprocess`` section (postprocess.json's schema)."""
    return PostprocessConfig(**dict(zip(CLASSES, per_class, strict=True)))
