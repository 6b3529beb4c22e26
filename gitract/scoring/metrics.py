"""Metrics: Dice / IoU for training, and the competition score (Dice + 3D Hausdorff).

Training metrics (torch, batched): Dice and IoU per (image, class) on binarised predictions, a
pair where truth and prediction are both empty scoring 1 as in the competition, then the mean
over images and classes. :class:`SegMetricAccumulator` keeps sums and a count so that batches
and ranks add up exactly.

Competition metric (numpy; the ``kaggle`` profile, README.md "Metric profiles")::

    score = 0.4 * dice + 0.6 * (1 - hausdorff)

- dice: mean over (id, class) rows; a row where both masks are empty scores 1.
- hausdorff: per (case_day, class) 3D volume, slices stacked in slice order, voxel coordinates
  (slice, row, col) divided by the volume's (D, H, W), symmetric Hausdorff distance divided by
  sqrt(3) so it lies in [0, 1]; volumes where both are empty are skipped, one empty scores 1.

The Hausdorff distance is computed exactly from distance transforms on the bounding box of the
two masks, not from pairwise point distances: OpenCV's per-slice transform plus a slice-to-slice
pass at the query voxels when rows and columns share a spacing (H == W, most scans), scipy's 3D
feature transform otherwise.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Iterator, Sequence

import cv2
import numpy as np
import pandas as pd
import torch
from scipy import ndimage

from gitract.data.layout import CLASSES
from gitract.data.rle import rle_decode
from gitract.errors import ConfigError, DataError, RLEError

__all__ = [
    "N_TERMS",
    "PROFILES",
    "bounding_box",
    "SegMetricAccumulator",
    "VolumeScoreAccumulator",
    "check_profile",
    "class_terms",
    "classic_metrics",
    "competition_score",
    "hausdorff_mlebench",
    "mlebench_view",
    "terms_summary",
    "volume_terms",
    "dice_2d",
    "dice_terms",
    "directed_distance",
    "row_counts",
    "slice_counts",
    "union_terms",
    "dice_iou_per_class",
    "hausdorff_3d",
]

_ID_RE = re.compile(r"^case(\d+)_day(\d+)_slice_(\d{4})$")
_SQRT3 = math.sqrt(3.0)
# Metric profiles: "kaggle" is our reading of the documented metric (the formula above),
# "mlebench" what openai/mle-bench's grader for this competition computes.
PROFILES = ("kaggle", "mlebench")


# --------------------------------------------------------------------------------------------
# Training metrics (torch)
# --------------------------------------------------------------------------------------------


def _binarize(x: torch.Tensor, threshold: float) -> torch.Tensor:
    return x if x.dtype == torch.bool else x > threshold


def dice_iou_per_class(
    probs: torch.Tensor, targets: torch.Tensor, threshold: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dice and IoU per (image, class), each of shape (N, C), float32 on the inputs' device.

    ``probs`` are probabilities (binarised with ``> threshold``) or already binary masks (bool,
    or 0/1 values, which any threshold in [0, 1) keeps as they are); ``targets`` are binarised
    with ``> 0.5``. A pair where truth and prediction are both empty scores 1 for both Dice and
    IoU (the competition's convention); one empty and the other not scores 0.
    """
    if probs.ndim != 4 or probs.shape != targets.shape:
        raise ValueError(
            "dice_iou_per_class needs probs and targets of the same shape (N, C, H, W); got "
            f"probs {tuple(probs.shape)} and targets {tuple(targets.shape)}"
        )
    pred = _binarize(probs, threshold).flatten(2)
    true = _binarize(targets, 0.5).flatten(2)
    # float32 counts are exact up to 2**24 pixels per (image, class): far beyond a slice.
    inter = (pred & true).sum(-1, dtype=torch.float32)
    total = pred.sum(-1, dtype=torch.float32) + true.sum(-1, dtype=torch.float32)
    union = total - inter
    empty = total == 0
    one = torch.ones_like(total)
    # Counts are integers, so clamping at 1 only touches the both-empty pairs replaced below.
    dice = torch.where(empty, one, 2.0 * inter / total.clamp_min(1.0))
    iou = torch.where(empty, one, inter / union.clamp_min(1.0))
    return dice, iou


class SegMetricAccumulator:
    """Sums of per-(image, class) Dice and IoU over batches, and ranks.

    ``compute()`` gives ``dice`` and ``iou`` (means over images and classes) and
    ``dice_<class>``, ``iou_<class>`` per class; NaN everywhere before any update.

    Distributed use: every rank accumulates its own shard, then::

        state = acc.state().to(device)
        torch.distributed.all_reduce(state)  # SUM
        acc.load_state(state)

    ``state()`` is a float64 vector ``[dice sums (C), iou sums (C), image count]``, so sums of
    states are the state of the union.
    """

    def __init__(self, classes: Sequence[str] = CLASSES, threshold: float = 0.5) -> None:
        self.classes = tuple(classes)
        self.threshold = float(threshold)
        self.reset()

    def reset(self) -> None:
        """Forget everything accumulated so far."""
        n = len(self.classes)
        self.dice_sum = torch.zeros(n, dtype=torch.float64)
        self.iou_sum = torch.zeros(n, dtype=torch.float64)
        self.count = 0

    def update(self, probs: torch.Tensor, targets: torch.Tensor) -> None:
        """Add a batch: probabilities (or binary masks) and targets, both (N, C, H, W)."""
        if probs.ndim != 4 or probs.shape[1] != len(self.classes):
            raise ValueError(
                f"SegMetricAccumulator expects (N, {len(self.classes)}, H, W) for classes "
                f"{self.classes}; got probs {tuple(probs.shape)}, targets {tuple(targets.shape)}"
            )
        dice, iou = dice_iou_per_class(probs.detach(), targets.detach(), self.threshold)
        self.dice_sum += dice.double().sum(0).cpu()
        self.iou_sum += iou.double().sum(0).cpu()
        self.count += int(dice.shape[0])

    def state(self) -> torch.Tensor:
        """Float64 CPU vector ``[dice sums, iou sums, count]``; summing states merges them."""
        return torch.cat(
            [self.dice_sum, self.iou_sum, torch.tensor([float(self.count)], dtype=torch.float64)]
        )

    def load_state(self, state: torch.Tensor) -> None:
        """Replace the sums with ``state`` (as :meth:`state` returns it, e.g. after all_reduce)."""
        n = len(self.classes)
        state = state.detach().to(device="cpu", dtype=torch.float64).reshape(-1)
        if state.numel() != 2 * n + 1:
            raise ValueError(
                f"state of {state.numel()} values does not fit {n} classes (needs {2 * n + 1})"
            )
        self.dice_sum = state[:n].clone()
        self.iou_sum = state[n : 2 * n].clone()
        self.count = round(float(state[2 * n]))

    def compute(self) -> dict[str, float]:
        """Means so far: ``dice``, ``iou``, ``dice_<class>``, ``iou_<class>``."""
        count = self.count or float("nan")  # nothing added yet: NaN everywhere
        dice, iou = self.dice_sum / count, self.iou_sum / count
        out = {"dice": float(dice.mean()), "iou": float(iou.mean())}
        for i, name in enumerate(self.classes):
            out[f"dice_{name}"], out[f"iou_{name}"] = float(dice[i]), float(iou[i])
        return out


# --------------------------------------------------------------------------------------------
# Competition metric (numpy)
# --------------------------------------------------------------------------------------------


def dice_2d(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two binary masks of the same shape; 1.0 when both are empty."""
    pred = np.asarray(pred).astype(bool, copy=False)
    truth = np.asarray(truth).astype(bool, copy=False)
    if pred.shape != truth.shape:
        raise ValueError(f"dice_2d needs equal shapes; got {pred.shape} and {truth.shape}")
    total = int(pred.sum()) + int(truth.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(pred, truth).sum()) / total


def bounding_box(*masks: np.ndarray) -> tuple[slice, ...] | None:
    """The (z, y, x) slices of the smallest box holding every True voxel of the (D, H, W)
    ``masks``; None when all are empty. Only the z-range reads whole volumes (one any() pass
    each); y and x come from the footprint of that slab, for an organ a small part of it."""
    zs = np.flatnonzero(np.logical_or.reduce([m.any(axis=(1, 2)) for m in masks]))
    if zs.size == 0:
        return None
    z = slice(int(zs[0]), int(zs[-1]) + 1)
    foot = np.logical_or.reduce([m[z].any(axis=0) for m in masks])
    ys, xs = np.flatnonzero(foot.any(axis=1)), np.flatnonzero(foot.any(axis=0))
    return z, slice(int(ys[0]), int(ys[-1]) + 1), slice(int(xs[0]), int(xs[-1]) + 1)


# OpenCV returns float32 distances; squaring and rounding gives back the exact integer squared
# pixel distance only while float32 rounding error stays below 0.5, i.e. for squared distances
# well under 2**22 (slices up to ~1400 px across, far beyond any scan).
_CV_MAX_SQUARED = 2**22
# The largest square (pixels each side of a voxel) _beyond_floor dilates by: a 30-case-day
# selection spent least time in distances with 10-16 (with 2: 68% more, with none: 35% more).
_MAX_RADIUS = 12


def _max_distance_planar(
    b: np.ndarray,
    points: tuple[np.ndarray, ...],
    spacing: tuple[float, ...],
    planes: dict[tuple, np.ndarray] | None = None,
    at_least: float = 0.0,
) -> float:
    """Largest distance from ``points`` to the nearest voxel of ``b``; rows and columns must
    share one spacing. ``planes`` and ``at_least``: see :func:`directed_distance`.

    The squared distance separates: d2(p) = min over slices z' of (dz * (z_p - z'))^2 +
    dy^2 * e(z', y_p, x_p), where e is the squared in-plane pixel distance to b within slice
    z'. e comes from OpenCV's exact 2D transform (an integer, recovered by rounding), taken
    only for the slices that can matter: the points of one z visit b's slices nearest first
    and stop once the z term alone reaches their current minima (no farther slice can lower
    one) or those minima can no longer raise the answer. Exact: every slice left out would
    give each point a value at least its minimum.
    """
    dz, dy = spacing[0], spacing[1]
    not_b = (~b).view(np.uint8)
    slices = np.flatnonzero(b.any(axis=(1, 2)))  # a slice without b is at infinite distance
    done: dict[int, np.ndarray] = {}

    def in_plane(z: int) -> np.ndarray:
        """dy^2 * e of slice z, flat, computed once (and with ``planes`` once per content)."""
        if z not in done:
            key = None if planes is None else (b.shape[1:], dy, np.packbits(not_b[z]).tobytes())
            squared = None if key is None else planes.get(key)
            if squared is None:
                dist = cv2.distanceTransform(not_b[z], cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
                squared = np.square(dist.ravel(), dtype=np.float64)
                np.rint(squared, out=squared)
                squared *= dy * dy
                if key is not None:
                    planes[key] = squared
            done[z] = squared
        return done[z]

    # Each run of one z shares its slice-to-slice terms.
    zq, flat = points[0], points[1] * b.shape[2] + points[2]
    # Points nearer than at_least cannot matter; the margin keeps every point whose distance
    # could round above at_least (the squares carry ~1e-16 relative error).
    best = at_least * at_least * (1.0 - 1e-9)
    for start, stop in _slice_runs(zq):
        to_slices = np.square((slices - zq[start]) * dz)
        nearest: np.ndarray | None = None
        for k in np.argsort(to_slices, kind="stable"):
            if nearest is not None:
                worst = float(nearest.max())
                if to_slices[k] >= worst or worst <= best:
                    break
            d2 = in_plane(int(slices[k]))[flat[start:stop]] + to_slices[k]
            nearest = d2 if nearest is None else np.minimum(nearest, d2, out=nearest)
        best = max(best, float(nearest.max()))
    return math.sqrt(best)


def _slice_runs(zs: np.ndarray) -> Iterator[tuple[int, int]]:
    """(start, stop) of each run of one slice in points' z coordinates, which np.nonzero
    (and unravelled np.flatnonzero) list slice by slice."""
    return itertools.pairwise([0, *(np.flatnonzero(np.diff(zs)) + 1).tolist(), zs.size])


def _max_distance_ft(
    b: np.ndarray, points: tuple[np.ndarray, ...], spacing: tuple[float, ...]
) -> float:
    """Largest distance from ``points`` to the nearest voxel of ``b``, any spacing.

    scipy's feature transform gives each voxel its nearest voxel of b; distances are formed
    only at the query points (scipy's own distance output would build several float arrays
    the size of the box).
    """
    nearest = ndimage.distance_transform_edt(
        ~b, sampling=spacing, return_distances=False, return_indices=True
    )
    d2 = np.zeros(points[0].size)
    for axis, coords in enumerate(points):
        diff = (nearest[axis][points] - coords) * spacing[axis]
        d2 += diff * diff
    return math.sqrt(float(d2.max()))


def directed_distance(
    a: np.ndarray,
    b: np.ndarray,
    spacing: tuple[float, ...],
    planes: dict[tuple, np.ndarray] | None = None,
    at_least: float = 0.0,
) -> float:
    """Directed Hausdorff distance a -> b of two non-empty masks (max over a of the distance
    to b). Voxels of a inside b are at distance 0, so only a \\ b is searched. Every voxel of
    a must be looked at, not just a's surface: a's voxel farthest from b can lie inside a
    (b a hollow shell around a).

    ``planes``: a cache of b's in-plane distance transforms by slice content (with its shape
    and spacing), for a caller that measures many b sharing most slices (the tuner's
    candidates); the caller empties it. Used where rows and columns share one spacing.
    ``at_least``: for a caller that takes the max with a distance it already has: the result
    is exact when it exceeds ``at_least`` and otherwise some value not above it, so points
    nearer than that are not searched further."""
    flat = np.flatnonzero(a & ~b)  # ~10x faster than np.nonzero on a 3D mask
    if flat.size == 0:
        return 0.0
    points = np.unravel_index(flat, a.shape)
    _, h, w = b.shape
    if spacing[1] == spacing[2] and (h - 1) ** 2 + (w - 1) ** 2 < _CV_MAX_SQUARED:
        points = _beyond_floor(b, points, spacing[1], at_least)
        if points[0].size == 0:
            return 0.0
        return _max_distance_planar(b, points, spacing, planes, at_least)
    return _max_distance_ft(b, points, spacing)


def _beyond_floor(
    b: np.ndarray, points: tuple[np.ndarray, ...], step: float, at_least: float
) -> tuple[np.ndarray, ...]:
    """``points`` less those surely within ``at_least`` of ``b``: a point with a voxel of b in
    its own slice at most r pixels away along rows and along columns is at most r * sqrt(2)
    pixels from b. One dilation of b's slices by the largest such r then leaves only the
    points that can matter: with a floor of a few pixels (the other direction's distance,
    which a stray false positive makes large) most slices keep none, and their in-plane
    transforms are never taken. ``step``: the rows' and columns' spacing."""
    # The margin keeps every point whose distance could round above at_least. Past
    # _MAX_RADIUS, a wider square costs more to dilate than it saves.
    r = min(math.floor(at_least / (step * math.sqrt(2.0)) * (1.0 - 1e-9)), _MAX_RADIUS)
    if r < 1:
        return points
    zs = points[0]
    keep = np.ones(zs.size, dtype=bool)
    square = cv2.getStructuringElement(cv2.MORPH_RECT, (2 * r + 1, 2 * r + 1))
    b8 = b.view(np.uint8)
    for start, stop in _slice_runs(zs):
        z = int(zs[start])
        if not b8[z].any():
            continue  # no voxel of b in the slice: no bound from it
        near = cv2.dilate(b8[z], square, borderType=cv2.BORDER_CONSTANT, borderValue=0)
        keep[start:stop] = near[points[1][start:stop], points[2][start:stop]] == 0
    return tuple(axis[keep] for axis in points)


def hausdorff_3d(pred: np.ndarray, truth: np.ndarray, crop: bool = True) -> float | None:
    """Normalised symmetric Hausdorff distance of two (D, H, W) masks, in [0, 1].

    Voxel (z, y, x) sits at (z / D, y / H, x / W); the distance is divided by sqrt(3). Returns
    None when both are empty (the competition skips such volumes) and 1.0 when exactly one is.

    Exact, from distance transforms rather than pairwise point distances
    (:func:`directed_distance`). With ``crop`` both masks are first cut to the bounding box of
    their union: every voxel of A and of B lies inside it, so the distances are unchanged (the
    sampling still comes from the full shape) and the transforms run on far fewer voxels.
    """
    pred = np.asarray(pred).astype(bool, copy=False)
    truth = np.asarray(truth).astype(bool, copy=False)
    if pred.ndim != 3 or pred.shape != truth.shape:
        raise ValueError(
            f"hausdorff_3d needs two (D, H, W) masks of the same shape; got {pred.shape} and "
            f"{truth.shape}"
        )
    box_pred, box_truth = bounding_box(pred), bounding_box(truth)
    if box_pred is None and box_truth is None:
        return None
    if box_pred is None or box_truth is None:
        return 1.0
    spacing = tuple(1.0 / n for n in pred.shape)
    if crop:
        box = tuple(
            slice(min(a.start, b.start), max(a.stop, b.stop))
            for a, b in zip(box_pred, box_truth, strict=True)
        )
        pred, truth = pred[box], truth[box]
    to_truth = directed_distance(pred, truth, spacing)
    return max(to_truth, directed_distance(truth, pred, spacing, at_least=to_truth)) / _SQRT3


def _check_columns(frame: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataError(
            f"{what} lacks column(s) {missing}; has {list(frame.columns)}, needs {list(columns)}"
        )


def _check_unique(frame: pd.DataFrame, keys: list[str], what: str) -> None:
    dup = frame.duplicated(keys, keep=False)
    if dup.any():
        first = frame.loc[dup, keys].iloc[0].tolist()
        raise DataError(f"{what} has {int(dup.sum())} duplicated {keys} rows, e.g. {first}")


def _describe(ids: Sequence[str], n: int = 3) -> str:
    shown = ", ".join(sorted(ids)[:n])
    return f"{len(ids)} (e.g. {shown})"


def _decode(rle: object, shape: tuple[int, int], what: str, id_: str, cls: str) -> np.ndarray:
    try:
        return rle_decode(rle, shape).astype(bool)
    except RLEError as err:
        raise DataError(f"{what}: id {id_} class {cls}: {err}") from err


# --------------------------------------------------------------------------------------------
# Metric profiles: whole case-day volumes -> sums of score terms
# --------------------------------------------------------------------------------------------

# Layout of the per-volume term vector (float64), with C = len(CLASSES):
#   [0, C)      Dice sum over the rows (slice, class) that count, per class
#   [C, 2C)     number of rows that count, per class
#   [2C, 3C)    Hausdorff sum over counted (case-day, class) volumes, per class (kaggle)
#   [3C, 4C)    number of counted volumes, per class (kaggle)
#   4C, 4C + 1  Hausdorff of the union of the classes, and 1 if it counts (mlebench)
#   then TP, FP, FN, TN pixel counts, C each (the classic metrics; the same in both profiles)
_C = len(CLASSES)
_DICE, _ROWS, _HD, _VOLS = (slice(k * _C, (k + 1) * _C) for k in range(4))
_UNION = 4 * _C
_TP, _FP, _FN, _TN = (slice(_UNION + 2 + k * _C, _UNION + 2 + (k + 1) * _C) for k in range(4))
N_TERMS = _UNION + 2 + 4 * _C


def check_profile(profile: str) -> str:
    """``profile`` if it is one of PROFILES, else a ConfigError naming it."""
    if profile not in PROFILES:
        raise ConfigError(f"unknown metric profile {profile!r}; expected one of {list(PROFILES)}")
    return profile


def mlebench_view(masks: np.ndarray) -> np.ndarray:
    """(..., H, W) masks as mle-bench's grader sees them after encoding them row-major.

    Its decoder lays the run positions out with ``reshape((W, H)).T`` (column-major): pixel
    (i, j) of what it scores is pixel number ``j * H + i`` of the row-major string. It does the
    same to the answers, so a square slice is only transposed (no change to any score), but a
    360x310 one is scrambled, and its 3D Hausdorff differs from the row-major one."""
    *lead, h, w = masks.shape
    return masks.reshape(*lead, h * w).reshape(*lead, w, h).swapaxes(-1, -2)


def hausdorff_mlebench(pred: np.ndarray, truth: np.ndarray) -> float | None:
    """mle-bench's per-case-day Hausdorff of two (D, H, W) masks: None (NaN there) when both
    are empty, 0 when identical, 1 when one is empty or ``pred`` has more than 10x the truth's
    voxels, else the normalised symmetric Hausdorff (the same value as ``hausdorff_3d``)."""
    n_pred, n_truth = int(np.count_nonzero(pred)), int(np.count_nonzero(truth))
    if n_pred == 0 and n_truth == 0:
        return None
    if np.array_equal(pred, truth):
        return 0.0
    if n_pred == 0 or n_truth == 0 or n_pred > 10 * n_truth:
        return 1.0
    return hausdorff_3d(pred, truth)


def _check_volume(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(pred).astype(bool, copy=False)
    truth = np.asarray(truth).astype(bool, copy=False)
    if pred.ndim != 4 or pred.shape != truth.shape or pred.shape[1] != _C:
        raise ValueError(
            f"a case-day volume is (D, {_C}, H, W) for classes {CLASSES}, the same for "
            f"prediction and truth; got {pred.shape} and {truth.shape}"
        )
    return pred, truth


def slice_counts(masks: np.ndarray) -> np.ndarray:
    """True pixels per slice of a (D, H, W) mask, a (D,) int64 array: one count_nonzero per
    slice, several times faster than ``count_nonzero(axis=...)`` (which sums)."""
    return np.fromiter((np.count_nonzero(m) for m in masks), dtype=np.int64, count=len(masks))


def row_counts(
    pred: np.ndarray, truth: np.ndarray, n_true: np.ndarray | None = None
) -> tuple[np.ndarray, ...]:
    """Per slice of two (D, H, W) masks: predicted, true and common pixels (three (D,) arrays).
    ``n_true``: the truth's, where the caller keeps them (the tuner measures thousands of
    predictions against one truth)."""
    n_true = slice_counts(truth) if n_true is None else n_true
    return slice_counts(pred), n_true, slice_counts(pred & truth)


def dice_terms(
    n_pred: np.ndarray, n_true: np.ndarray, inter: np.ndarray, profile: str
) -> tuple[float, float]:
    """The Dice sum and the number of rows it is over, from :func:`row_counts`: kaggle counts
    every row, a both-empty one scoring 1; mle-bench leaves both-empty rows out (NaN there)."""
    total = n_pred + n_true
    dice = 2.0 * inter / np.maximum(total, 1)
    if profile == "kaggle":
        return float(np.where(total == 0, 1.0, dice).sum()), float(len(total))
    return float(dice[total > 0].sum()), float(np.count_nonzero(total > 0))


def class_terms(c: int, dice_sum: float, rows: float, hausdorff: float | None = None) -> np.ndarray:
    """A term vector holding class ``c``'s Dice sum over ``rows`` rows and, unless None (a
    volume empty on both sides, or the mlebench profile), its volume's Hausdorff."""
    terms = np.zeros(N_TERMS)
    terms[_DICE][c], terms[_ROWS][c] = dice_sum, rows
    if hausdorff is not None:
        terms[_HD][c], terms[_VOLS][c] = hausdorff, 1.0
    return terms


def union_terms(hausdorff: float | None) -> np.ndarray:
    """A term vector holding mle-bench's Hausdorff of a case-day's union of the classes (none
    when it is None: both empty, skipped)."""
    terms = np.zeros(N_TERMS)
    if hausdorff is not None:
        terms[_UNION], terms[_UNION + 1] = hausdorff, 1.0
    return terms


def volume_terms(
    pred: np.ndarray,
    truth: np.ndarray,
    profile: str = "kaggle",
    classes: Sequence[int] | None = None,
) -> np.ndarray:
    """The score terms of one case-day (a float64 vector of N_TERMS; see the layout above).

    ``pred`` and ``truth`` are (D, C, H, W) masks, slices in slice order, at the slices' own
    size. ``classes`` (indices into CLASSES, default all) are the classes that have rows: the
    others add nothing. The vectors of several case-days add up to the terms of all of them.
    """
    check_profile(profile)
    pred, truth = _check_volume(pred, truth)
    classes = list(range(_C)) if classes is None else list(classes)
    terms = np.zeros(N_TERMS)
    n_pixels = pred.shape[2] * pred.shape[3]
    for c in classes:
        p, t = pred[:, c], truth[:, c]
        n_p, n_t, inter = row_counts(p, t)
        distance = hausdorff_3d(p, t) if profile == "kaggle" else None
        terms += class_terms(c, *dice_terms(n_p, n_t, inter, profile), distance)
        tp, n_pred, n_true = int(inter.sum()), int(n_p.sum()), int(n_t.sum())
        terms[_TP][c] = tp
        terms[_FP][c] = n_pred - tp
        terms[_FN][c] = n_true - tp
        terms[_TN][c] = len(p) * n_pixels - n_pred - n_true + tp
    if profile == "mlebench" and classes:
        union_pred = mlebench_view(pred[:, classes].any(axis=1))
        union_truth = mlebench_view(truth[:, classes].any(axis=1))
        terms += union_terms(hausdorff_mlebench(union_pred, union_truth))
    return terms


def _ratio(num: float, den: float, empty: float) -> float:
    return float(num / den) if den else empty


def terms_summary(terms: np.ndarray, profile: str = "kaggle") -> dict[str, float]:
    """Score, Dice and Hausdorff of summed ``terms`` under ``profile``.

    kaggle: Dice the mean over rows (both-empty rows score 1), Hausdorff the mean over
    (case-day, class) volumes not empty on both sides (0.0 when there is none). mlebench: Dice
    the mean over rows not empty on both sides, Hausdorff the mean over case-days whose union
    is not empty on both sides; NaN when there is none (the grader's nanmean of nothing)."""
    check_profile(profile)
    terms = np.asarray(terms, dtype=np.float64)
    nan = float("nan")
    dice = _ratio(terms[_DICE].sum(), terms[_ROWS].sum(), nan)
    if profile == "kaggle":
        hausdorff = _ratio(terms[_HD].sum(), terms[_VOLS].sum(), 0.0)
    else:
        hausdorff = _ratio(terms[_UNION], terms[_UNION + 1], nan)
    return {"score": 0.4 * dice + 0.6 * (1.0 - hausdorff), "dice": dice, "hausdorff": hausdorff}


def classic_metrics(terms: np.ndarray) -> dict[str, float]:
    """Pixel accuracy, mean pixel accuracy and IoU per class over the whole set, and averaged.

    Each class is a binary segmentation (organ vs background) over every pixel of the set:
    pixel accuracy (TP + TN) / N; mean pixel accuracy the mean of the organ's and the
    background's recall, (TP / (TP + FN) + TN / (TN + FP)) / 2; IoU TP / (TP + FP + FN).
    ``pixel_accuracy``, ``mean_pixel_accuracy`` and ``miou`` average the classes. A ratio over
    no pixels (e.g. IoU of a class absent from both) is NaN and left out of the average."""
    terms = np.asarray(terms, dtype=np.float64)
    tp, fp, fn, tn = terms[_TP], terms[_FP], terms[_FN], terms[_TN]
    out: dict[str, float] = {}
    per: dict[str, list[float]] = {"pixel_accuracy": [], "mean_pixel_accuracy": [], "iou": []}
    nan = float("nan")
    for c, name in enumerate(CLASSES):
        n = tp[c] + fp[c] + fn[c] + tn[c]
        if n == 0:
            continue
        recalls = [_ratio(tp[c], tp[c] + fn[c], nan), _ratio(tn[c], tn[c] + fp[c], nan)]
        recalls = [r for r in recalls if not math.isnan(r)]
        values = {
            "pixel_accuracy": float((tp[c] + tn[c]) / n),
            "mean_pixel_accuracy": float(np.mean(recalls)),
            "iou": _ratio(tp[c], tp[c] + fp[c] + fn[c], nan),
        }
        for key, value in values.items():
            out[f"{key}_{name}"] = value
            per[key].append(value)
    for key, values in per.items():
        kept = [v for v in values if not math.isnan(v)]
        out["miou" if key == "iou" else key] = float(np.mean(kept)) if kept else nan
    return out


class VolumeScoreAccumulator:
    """Competition-score terms summed over whole case-day volumes, for one profile.

    ``add`` takes one case-day's prediction and truth as (D, C, H, W) masks (slices in slice
    order, the slices' own H x W, classes in CLASSES order). For ``mlebench`` the masks are
    scored as the grader sees them after its column-major decoding of row-major strings
    (:func:`mlebench_view`), so the number equals ``evaluate.py --metric mlebench`` on a
    submission of these masks. Distributed use, as with :class:`SegMetricAccumulator`::

        state = acc.state().to(device)
        torch.distributed.all_reduce(state)  # SUM
        acc.load_state(state)
    """

    def __init__(self, profile: str = "kaggle") -> None:
        self.profile = check_profile(profile)
        self.reset()

    def reset(self) -> None:
        """Forget every volume added so far."""
        self.terms = np.zeros(N_TERMS)

    def add(self, pred: np.ndarray, truth: np.ndarray) -> None:
        """Add one case-day: (D, C, H, W) bool or 0/1 prediction and truth."""
        self.add_terms(volume_terms(pred, truth, self.profile))

    def add_terms(self, terms: np.ndarray) -> None:
        """Add one case-day's :func:`volume_terms` computed elsewhere (e.g. in a worker)."""
        self.terms = self.terms + np.asarray(terms, dtype=np.float64)

    def state(self) -> torch.Tensor:
        """1-D float64 CPU tensor of the sums; summing states merges accumulators."""
        return torch.from_numpy(self.terms.copy())

    def load_state(self, state: torch.Tensor) -> None:
        """Replace the sums with ``state`` (as :meth:`state` returns it, e.g. after all_reduce)."""
        values = state.detach().to(device="cpu", dtype=torch.float64).reshape(-1).numpy()
        if values.size != N_TERMS:
            raise ValueError(f"state of {values.size} values; a {self.profile} state has {N_TERMS}")
        self.terms = values.copy()

    def compute(self) -> dict[str, float]:
        """``score``, ``dice`` and ``hausdorff`` of the volumes added (see terms_summary)."""
        return terms_summary(self.terms, self.profile)

    def per_class(self) -> dict[str, float]:
        """``dice_<class>`` and (kaggle) ``hausdorff_<class>``, NaN for a class without rows."""
        out: dict[str, float] = {}
        nan = float("nan")
        for c, name in enumerate(CLASSES):
            rows = self.terms[_ROWS][c]
            out[f"dice_{name}"] = _ratio(self.terms[_DICE][c], rows, nan)
            if self.profile == "kaggle":
                vols = self.terms[_VOLS][c]
                hd = _ratio(self.terms[_HD][c], vols, 0.0)
                out[f"hausdorff_{name}"] = hd if rows or vols else nan
        return out

    def counts(self) -> dict[str, int]:
        """``n_rows`` (rows in the Dice mean) and ``n_volumes`` (volumes in the Hausdorff)."""
        vols = self.terms[_VOLS].sum() if self.profile == "kaggle" else self.terms[_UNION + 1]
        return {"n_rows": int(self.terms[_ROWS].sum()), "n_volumes": int(vols)}


def competition_score(
    submission: pd.DataFrame,
    labels: pd.DataFrame,
    slice_shapes: pd.DataFrame,
    profile: str = "kaggle",
) -> dict[str, float | int]:
    """The competition score of ``submission`` against ``labels`` under ``profile``.

    ``submission``: id, class, predicted (RLE); ``labels``: id, class, segmentation (RLE);
    ``slice_shapes``: id, height, width (extra rows ignored). Every (id, class) of the labels must
    be predicted, and nothing else (DataError naming how many and an example otherwise). A
    case-day's slices are its ids in the labels, stacked by slice number; case-days are scored
    one at a time, in (case, day) order, through :class:`VolumeScoreAccumulator`.

    Returns ``score``, ``dice``, ``hausdorff``, ``dice_<class>`` and, for kaggle,
    ``hausdorff_<class>`` (NaN for a class without rows, 0.0 for a class whose volumes are all
    empty on both sides), ``n_rows`` (rows in the Dice mean), ``n_volumes`` (volumes in the
    Hausdorff mean), and the classic metrics of :func:`classic_metrics`.
    """
    check_profile(profile)
    _check_columns(submission, ("id", "class", "predicted"), "submission")
    _check_columns(labels, ("id", "class", "segmentation"), "labels")
    _check_columns(slice_shapes, ("id", "height", "width"), "slice shapes")
    if labels.empty:
        raise DataError("labels have no rows: nothing to score")
    sub = submission[["id", "class", "predicted"]].astype({"id": str, "class": str})
    lab = labels[["id", "class", "segmentation"]].astype({"id": str, "class": str})
    for frame, what in ((sub, "submission"), (lab, "labels")):
        bad = sorted(set(frame["class"]) - set(CLASSES))
        if bad:
            raise DataError(f"{what} has class(es) {bad} outside {list(CLASSES)}")
        _check_unique(frame, ["id", "class"], what)

    # Each labelled id must carry every class the labels use: a volume needs all its slices.
    classes = [c for c in CLASSES if c in set(lab["class"])]
    per_id = lab.groupby("id")["class"].nunique()
    incomplete = per_id.index[per_id < len(classes)].tolist()
    if incomplete:
        raise DataError(f"labels: ids without a row for each of {classes}: {_describe(incomplete)}")

    lab_keys = set(zip(lab["id"], lab["class"], strict=True))
    sub_keys = set(zip(sub["id"], sub["class"], strict=True))
    missing = lab_keys - sub_keys
    if missing:
        raise DataError(
            f"submission lacks {len(missing)} labelled (id, class) rows, e.g. {min(missing)}"
        )
    extra = sub_keys - lab_keys
    if extra:
        raise DataError(
            f"submission has {len(extra)} (id, class) rows not in the labels, e.g. {min(extra)}"
        )

    shapes = slice_shapes[["id", "height", "width"]].astype({"id": str}).drop_duplicates("id")
    shapes = shapes.set_index("id")
    ids = pd.Index(sorted(set(lab["id"])))
    no_shape = ids.difference(shapes.index)
    if len(no_shape):
        raise DataError(f"slice shapes lack ids: {_describe(no_shape.tolist())}")
    bad_ids = [i for i in ids if not _ID_RE.match(i)]
    if bad_ids:
        raise DataError(
            f"labels have ids not of the form case<N>_day<D>_slice_<ZZZZ>: {_describe(bad_ids)}"
        )

    parts = ids.str.extract(_ID_RE.pattern).astype(int)
    meta = pd.DataFrame(
        {
            "id": ids,
            "case": parts[0].to_numpy(),
            "day": parts[1].to_numpy(),
            "slice": parts[2].to_numpy(),
            "height": shapes.loc[ids, "height"].to_numpy(),
            "width": shapes.loc[ids, "width"].to_numpy(),
        }
    ).sort_values(["case", "day", "slice"])

    # Plain dicts: a pandas .loc per (id, class) would dominate the run time on the full data.
    predicted = sub.set_index(["id", "class"])["predicted"].to_dict()
    segmentation = lab.set_index(["id", "class"])["segmentation"].to_dict()
    present = [CLASSES.index(c) for c in classes]
    acc = VolumeScoreAccumulator(profile)

    for (case, day), volume in meta.groupby(["case", "day"], sort=False):
        case_day = f"case{case}_day{day}"
        sizes = volume[["height", "width"]].drop_duplicates()
        if len(sizes) != 1:
            raise DataError(
                f"{case_day}: slices of different sizes {sizes.to_numpy().tolist()} in one volume"
            )
        height, width = (int(v) for v in sizes.iloc[0])
        slice_ids = volume["id"].tolist()
        pred = np.zeros((len(slice_ids), _C, height, width), dtype=bool)
        truth = np.zeros_like(pred)
        for z, id_ in enumerate(slice_ids):
            for c in present:
                key = (id_, CLASSES[c])
                pred[z, c] = _decode(predicted[key], (height, width), "submission", id_, key[1])
                truth[z, c] = _decode(segmentation[key], (height, width), "labels", id_, key[1])
        acc.add_terms(volume_terms(pred, truth, profile, present))

    out: dict[str, float | int] = dict(acc.compute())
    out.update(acc.per_class())
    out.update(acc.counts())
    out.update(classic_metrics(acc.terms))
    return out
