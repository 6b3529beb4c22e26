"""From per-class probabilities to the binary masks that get RLE-encoded.

A whole case-day is post-processed at once, (D, C, H, W) probabilities at the slices' own size,
so that steps can look along z. Each step is per class and off unless set (or tuned):

1. pixel threshold: ``p > threshold``;
2. 2D minimum component size: 8-connected components of fewer pixels are dropped per slice;
3. slice gate: a class stays on a slice only if the slice's largest probability is
   ``>= gate_prob``, its predicted area ``>= gate_area`` pixels and, where the models have a
   classification head, its "organ present" probability ``>= gate_cls``;
4. z-continuity of the per-slice presence flags: gaps of ``<= fill_gaps`` slices between two
   present slices are filled (a filled slice gets back its step-2 mask: this undoes a gate
   that dropped a weak slice inside an organ), then runs shorter than ``min_run`` slices are
   dropped (an organ spans many 3 mm slices; a 1-slice run is a stray);
5. 3D connected components over the case-day: components of fewer than ``min_volume`` voxels
   are dropped, or only the largest is kept (``keep_largest``: the stomach is one organ).
   Slices are 3 mm apart against ~1.5 mm pixels, so a voxel joins the next slice only through
   the same (row, column) (face neighbours along z), while in-plane it is 8-connected.

Probabilities go through :func:`quantize` (``rint(p * 255)`` as uint8) first, the form the OOF
files keep: a threshold ``t`` then reads ``k > t * 255`` on both paths, so settings tuned on the
OOF files give bit-identical masks at inference.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import cv2
import numpy as np
from scipy import ndimage

from gitract.data.layout import CLASSES

__all__ = [
    "STEP_NAMES",
    "ClassPostprocess",
    "binarize",
    "default_params",
    "drop_short_runs",
    "fill_gaps",
    "postprocess_class",
    "postprocess_volume",
    "quantize",
    "remove_small_components",
    "remove_small_volumes",
    "slice_flags",
    "threshold_class",
]

# In-plane 8-connectivity; along z only the same pixel of the neighbouring slice.
_STRUCTURE_3D = np.zeros((3, 3, 3), dtype=bool)
_STRUCTURE_3D[1] = True
_STRUCTURE_3D[0, 1, 1] = _STRUCTURE_3D[2, 1, 1] = True


def _shown(value: object) -> str:
    """repr for an error message, a numpy scalar (a grid from np.linspace) as its plain value."""
    return repr(value.item() if isinstance(value, np.generic) else value)


@dataclass(frozen=True)
class ClassPostprocess:
    """One class's post-processing; the defaults switch every step but the threshold off."""

    threshold: float = 0.5
    min_size: int = 0
    gate_prob: float = 0.0
    gate_area: int = 0
    gate_cls: float = 0.0
    fill_gaps: int = 0
    min_run: int = 0
    min_volume: int = 0
    keep_largest: bool = False

    def __post_init__(self) -> None:
        if not 0 < self.threshold < 1:
            raise ValueError(f"threshold must be in (0, 1), got {_shown(self.threshold)}")
        for name in ("gate_prob", "gate_cls"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {_shown(getattr(self, name))}")
        for name in ("min_size", "gate_area", "fill_gaps", "min_run", "min_volume"):
            value = getattr(self, name)
            if isinstance(value, bool) or int(value) != value or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {_shown(value)}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping) -> ClassPostprocess:
        """Build from a mapping; unknown keys are a ValueError naming them."""
        unknown = sorted(set(values) - set(STEP_NAMES))
        if unknown:
            raise ValueError(f"unknown post-processing key(s) {unknown}; known: {list(STEP_NAMES)}")
        kwargs = {}
        for name, value in values.items():
            floats = {"threshold": float, "gate_prob": float, "gate_cls": float}
            kind = {**floats, "keep_largest": bool}.get(name, int)
            if kind is bool and not isinstance(value, bool):
                raise ValueError(f"{name} must be true or false, got {_shown(value)}")
            kwargs[name] = kind(value)
        return cls(**kwargs)


STEP_NAMES = tuple(f.name for f in dataclasses.fields(ClassPostprocess))


def quantize(probs: np.ndarray) -> np.ndarray:
    """Probabilities in [0, 1] -> uint8 ``rint(p * 255)``, as the OOF files store them."""
    return np.rint(np.clip(probs, 0.0, 1.0) * 255).astype(np.uint8)


def _level(value: float) -> float:
    """A probability threshold on the uint8 scale: ``k > t`` for the quantised ``k``."""
    return value * 255


def remove_small_components(mask: np.ndarray, min_size: int) -> np.ndarray:
    """Drop 8-connected components of fewer than ``min_size`` pixels from a 2D 0/1 mask.

    Isolated specks are a common false positive on slices with no organ, and cost the most in
    the Hausdorff term (one stray voxel sets the distance for its whole volume)."""
    if min_size <= 1 or not mask.any():
        return mask
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), 8)
    keep = stats[:, cv2.CC_STAT_AREA] >= min_size
    keep[0] = False  # label 0 is the background
    return keep[labels].astype(np.uint8)


def fill_gaps(flags: np.ndarray, max_gap: int) -> np.ndarray:
    """Per-slice presence flags with every run of ``<= max_gap`` absent slices between two
    present ones set present (the volume's ends are not gaps)."""
    flags = np.asarray(flags, dtype=bool).copy()
    present = np.flatnonzero(flags)
    if max_gap <= 0 or present.size < 2:
        return flags
    for lo, hi in zip(present[:-1], present[1:], strict=True):
        if 1 < hi - lo <= max_gap + 1:
            flags[lo + 1 : hi] = True
    return flags


def drop_short_runs(flags: np.ndarray, min_run: int) -> np.ndarray:
    """Per-slice presence flags without the runs of fewer than ``min_run`` present slices."""
    flags = np.asarray(flags, dtype=bool).copy()
    if min_run <= 1 or not flags.any():
        return flags
    edges = np.diff(np.concatenate([[0], flags.view(np.int8), [0]]))
    starts, stops = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    for start, stop in zip(starts, stops, strict=True):
        if stop - start < min_run:
            flags[start:stop] = False
    return flags


def remove_small_volumes(mask: np.ndarray, min_volume: int, keep_largest: bool) -> np.ndarray:
    """A (D, H, W) mask without its 3D components (in-plane 8-connected, face-connected along
    z) of fewer than ``min_volume`` voxels; with ``keep_largest`` only the largest one (the
    first of equal ones in label order) is kept."""
    if (min_volume <= 1 and not keep_largest) or not mask.any():
        return mask
    labels, count = ndimage.label(mask, structure=_STRUCTURE_3D)
    if count <= 1 and min_volume <= 1:
        return mask
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    sizes[0] = 0
    keep = sizes >= max(min_volume, 1)
    if keep_largest:
        keep &= np.arange(count + 1) == int(np.argmax(sizes))
    keep[0] = False
    return keep[labels]


def slice_flags(
    probs: np.ndarray,
    masks: np.ndarray,
    params: ClassPostprocess,
    presence: np.ndarray | None = None,
) -> np.ndarray:
    """Steps 3 and 4: which slices keep their mask (a (D,) bool array). ``presence``: the
    classification head's quantised (D,) "organ present" probabilities, needed by gate_cls."""
    areas = np.count_nonzero(masks.reshape(len(masks), -1), axis=1)
    flags = areas > 0
    if params.gate_prob > 0:
        flags &= probs.reshape(len(probs), -1).max(axis=1) >= _level(params.gate_prob)
    if params.gate_area > 0:
        flags &= areas >= params.gate_area
    if params.gate_cls > 0:
        if presence is None:
            raise ValueError(
                "gate_cls is set but there are no presence probabilities (no model of the "
                "ensemble has a classification head: model.aux_head)"
            )
        flags &= presence >= _level(params.gate_cls)
    flags = fill_gaps(flags, params.fill_gaps)
    flags &= areas > 0  # a filled slice without pixels stays absent (it cannot join a run)
    return drop_short_runs(flags, params.min_run)


def threshold_class(probs: np.ndarray, params: ClassPostprocess) -> np.ndarray:
    """Steps 1 and 2 on one class's quantised (D, H, W) probabilities: bool masks."""
    masks = probs > _level(params.threshold)
    if params.min_size > 1:
        for z in np.flatnonzero(masks.any(axis=(1, 2))):
            masks[z] = remove_small_components(masks[z].view(np.uint8), params.min_size)
    return masks


def postprocess_class(
    probs: np.ndarray, params: ClassPostprocess, presence: np.ndarray | None = None
) -> np.ndarray:
    """One class of one case-day: quantised (D, H, W) uint8 probabilities (and optionally the
    (D,) quantised presence probabilities) -> bool masks."""
    if probs.dtype != np.uint8 or probs.ndim != 3:
        raise ValueError(
            f"postprocess_class needs (D, H, W) uint8; got {probs.dtype} {probs.shape}"
        )
    masks = threshold_class(probs, params)
    flags = slice_flags(probs, masks, params, presence)
    masks[~flags] = False
    return remove_small_volumes(masks, params.min_volume, params.keep_largest)


def postprocess_volume(
    probs: np.ndarray, params: Sequence[ClassPostprocess], presence: np.ndarray | None = None
) -> np.ndarray:
    """A whole case-day: quantised (D, C, H, W) uint8 probabilities -> (D, C, H, W) bool;
    ``presence``: quantised (D, C) slice-level probabilities of a classification head."""
    if probs.ndim != 4 or probs.shape[1] != len(params):
        raise ValueError(
            f"postprocess_volume needs (D, {len(params)}, H, W) for {len(params)} class "
            f"settings; got {probs.shape}"
        )
    out = np.empty(probs.shape, dtype=bool)
    for c, class_params in enumerate(params):
        flags = None if presence is None else presence[:, c]
        out[:, c] = postprocess_class(np.ascontiguousarray(probs[:, c]), class_params, flags)
    return out


def binarize(
    probs: np.ndarray, thresholds: Sequence[float], min_sizes: Sequence[int]
) -> np.ndarray:
    """(C, H, W) probabilities -> (C, H, W) uint8 masks, with a threshold and a minimum
    component size per class (the 2D steps alone, on one slice)."""
    if len(thresholds) != probs.shape[0] or len(min_sizes) != probs.shape[0]:
        raise ValueError(
            f"{probs.shape[0]} classes but {len(thresholds)} thresholds and "
            f"{len(min_sizes)} minimum sizes"
        )
    masks = (probs > np.asarray(thresholds, dtype=probs.dtype)[:, None, None]).astype(np.uint8)
    for c, min_size in enumerate(min_sizes):
        masks[c] = remove_small_components(masks[c], int(min_size))
    return masks


def default_params(n: int = len(CLASSES)) -> tuple[ClassPostprocess, ...]:
    """Every step off, threshold 0.5, for ``n`` classes."""
    return tuple(ClassPostprocess() for _ in range(n))
