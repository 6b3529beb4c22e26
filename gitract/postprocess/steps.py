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

import json
import math
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
from pydantic import ValidationError
from scipy import ndimage

from gitract.atomic import write_text_atomic
from gitract.config import ClassPostprocess, PostprocessConfig, one_line_error
from gitract.errors import DataError
from gitract.scoring.metrics import bounding_box, slice_counts

__all__ = [
    "PIXEL_STEPS",
    "POSTPROCESS_FILE",
    "STEP_NAMES",
    "ClassPostprocess",
    "binarize",
    "blend_quantized",
    "drop_short_runs",
    "fill_gaps",
    "load_postprocess",
    "postprocess_class",
    "postprocess_volume",
    "quantize",
    "remove_small_components",
    "remove_small_volumes",
    "save_postprocess",
    "slice_flags",
    "slice_peaks",
    "small_components",
    "threshold_class",
]

STEP_NAMES = tuple(ClassPostprocess.model_fields)
#: The settings steps 1-2 (:func:`threshold_class`) read: equal ones give equal 2D masks.
PIXEL_STEPS = ("threshold", "min_size")
# Written by ``evaluate.py --tune`` into the runs folder; inference prefers it to the config.
POSTPROCESS_FILE = "postprocess.json"

# In-plane 8-connectivity; along z only the same pixel of the neighbouring slice.
_STRUCTURE_3D = np.zeros((3, 3, 3), dtype=bool)
_STRUCTURE_3D[1] = True
_STRUCTURE_3D[0, 1, 1] = _STRUCTURE_3D[2, 1, 1] = True


def quantize(probs: np.ndarray) -> np.ndarray:
    """Probabilities in [0, 1] -> uint8 ``rint(p * 255)``, as the OOF files store them."""
    return np.rint(np.clip(probs, 0.0, 1.0) * 255).astype(np.uint8)


def blend_quantized(volumes: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """The weighted mean of quantised probabilities, quantised again: ``rint(sum(w_i * q_i) /
    sum(w_i))`` as uint8, summed in float32 in the members' order.

    Inference blends its members' quantised probabilities with it, and blend selection blends
    the members' stored OOF files with it: one function, so a blend formed from OOF files is
    bit for bit what inference forms from the same predictions. Members of weight 0 are left
    out (they add nothing, and need not be there). One member passes through unchanged."""
    pairs = [(v, float(w)) for v, w in zip(volumes, weights, strict=True) if w > 0]
    if not pairs:
        raise ValueError(f"a blend needs a weight > 0; got {list(weights)}")
    if len(pairs) == 1:
        return pairs[0][0]
    total = np.zeros(pairs[0][0].shape, dtype=np.float32)
    term = np.empty_like(total)
    for volume, weight in pairs:
        total += np.multiply(volume, np.float32(weight), out=term, dtype=np.float32)
    total /= np.float32(sum(w for _, w in pairs))
    return np.rint(total, out=total).astype(np.uint8)


def _level(value: float) -> float:
    """A probability threshold on the uint8 scale: ``k > t`` for the quantised ``k``."""
    return value * 255


def small_components(mask: np.ndarray, below: int) -> tuple[np.ndarray, np.ndarray]:
    """The pixels of the 8-connected components of fewer than ``below`` pixels in each slice
    of a (D, H, W) 0/1 mask (slices never join): their flat indices in ``mask`` and their
    component's size, smallest components first. So the pixels that any ``min_size <=
    below`` removes are a prefix: the tuner labels a thresholded stack once for all its
    minimum sizes."""
    nothing = np.empty(0, dtype=np.intp), np.empty(0, dtype=np.int32)
    box = bounding_box(mask) if below > 1 else None
    if box is None:
        return nothing
    # The boxed slices one above the other with a background row between them: one labelling
    # for the whole stack (a row apart, no pixels of two slices touch).
    boxed = mask[box]
    d, h, w = boxed.shape
    tall = np.zeros((d, h + 1, w), dtype=np.uint8)
    tall[:, :h] = boxed
    _, labels, stats, _ = cv2.connectedComponentsWithStats(tall.reshape(-1, w), connectivity=8)
    sizes = stats[:, cv2.CC_STAT_AREA]
    small = sizes < below
    small[0] = False  # label 0 is the background (and every separating row)
    if not small.any():
        return nothing
    picked = np.flatnonzero(small[labels])
    pixel_sizes = sizes[labels.ravel()[picked]]
    at = np.unravel_index(picked, (d, h + 1, w))
    corner = (box[0].start, box[1].start, box[2].start)
    flat = np.ravel_multi_index([i + o for i, o in zip(at, corner, strict=True)], mask.shape)
    order = np.argsort(pixel_sizes, kind="stable")
    return flat[order], pixel_sizes[order]


def remove_small_components(mask: np.ndarray, min_size: int) -> np.ndarray:
    """Drop the 8-connected components of fewer than ``min_size`` pixels from a 2D 0/1 mask,
    or from each slice of a (D, H, W) one (slices never join); same shape and dtype, the
    mask itself when nothing is dropped.

    Isolated specks are a common false positive on slices with no organ, and cost the most in
    the Hausdorff term (one stray voxel sets the distance for its whole volume)."""
    stack = mask[None] if mask.ndim == 2 else mask
    pixels, _ = small_components(stack, min_size)
    if pixels.size == 0:
        return mask
    out = np.array(stack, order="C")
    out.ravel()[pixels] = 0
    return out[0] if mask.ndim == 2 else out


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
    if min_volume <= 1 and not keep_largest:
        return mask
    box = bounding_box(mask)
    if box is None:
        return mask
    # Labelled in the mask's bounding box only: every component lies inside it, and the
    # labels come in the same (raster) order as on the whole volume.
    labels, count = ndimage.label(mask[box], structure=_STRUCTURE_3D)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    sizes[0] = 0
    keep = sizes >= max(min_volume, 1)
    if keep_largest:
        keep &= np.arange(count + 1) == int(np.argmax(sizes))
    keep[0] = False
    if keep[1:].all():  # nothing removed
        return mask
    out = np.zeros_like(mask)
    out[box] = keep[labels]
    return out


def slice_peaks(probs: np.ndarray) -> np.ndarray:
    """Each slice's highest quantised probability (a (D,) array): what gate_prob reads."""
    return probs.reshape(len(probs), -1).max(axis=1)


def slice_flags(
    peaks: np.ndarray,
    areas: np.ndarray,
    params: ClassPostprocess,
    presence: np.ndarray | None = None,
) -> np.ndarray:
    """Steps 3 and 4: which slices keep their mask (a (D,) bool array), from each slice's
    :func:`slice_peaks` and its pixel count after steps 1-2 (:func:`slice_counts`): per-slice
    numbers only, so the tuner decides a candidate's slices without touching its pixels.
    ``presence``: the classification head's quantised (D,) "organ present" probabilities,
    needed by gate_cls."""
    flags = areas > 0
    if params.gate_prob > 0:
        flags &= peaks >= _level(params.gate_prob)
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


def binarize(probs: np.ndarray, threshold: float) -> np.ndarray:
    """Step 1: quantised probabilities -> bool masks of the pixels above ``threshold``.

    uint8 probabilities are compared as integers: an integer k is above t * 255 exactly when
    it is above floor(t * 255), and a uint8 comparison is ~7x faster than one that promotes
    the volume to float (the tuner makes thousands of such masks)."""
    level = math.floor(_level(threshold))
    if probs.dtype != np.uint8 or not 0 <= level <= 255:
        return probs > _level(threshold)
    return probs > np.uint8(level)


def threshold_class(probs: np.ndarray, params: ClassPostprocess) -> np.ndarray:
    """Steps 1 and 2 on one class's quantised (D, H, W) probabilities: bool masks. Reads only
    PIXEL_STEPS (the tuner shares its result between candidates equal there)."""
    return remove_small_components(binarize(probs, params.threshold), params.min_size)


def postprocess_class(
    probs: np.ndarray, params: ClassPostprocess, presence: np.ndarray | None = None
) -> np.ndarray:
    """One class of one case-day: quantised (D, H, W) uint8 probabilities (and optionally the
    (D,) quantised presence probabilities) -> bool masks, steps 1 to 5 in order."""
    if probs.dtype != np.uint8 or probs.ndim != 3:
        raise ValueError(
            f"postprocess_class needs (D, H, W) uint8; got {probs.dtype} {probs.shape}"
        )
    masks = threshold_class(probs, params)
    masks[~slice_flags(slice_peaks(probs), slice_counts(masks), params, presence)] = False
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


def load_postprocess(
    folder: Path | None, section: PostprocessConfig, tuned_file: Path | None = None
) -> PostprocessConfig:
    """The post-processing to run: ``tuned_file`` (which must exist), else
    ``folder/postprocess.json`` if ``evaluate.py --tune`` wrote one, else the config's
    ``section``. A file that does not hold the section's schema is a one-line DataError."""
    if tuned_file is not None and not Path(tuned_file).is_file():
        raise DataError(
            f"{tuned_file}: no such post-processing file (evaluate.py --tune writes one)"
        )
    path = tuned_file or (None if folder is None else Path(folder) / POSTPROCESS_FILE)
    if path is None or not Path(path).is_file():
        return section
    try:
        saved = json.loads(Path(path).read_text())
        if not isinstance(saved, dict):
            raise ValueError(f"a JSON object expected, got {type(saved).__name__}")
        return PostprocessConfig.model_validate(saved)
    except (ValueError, ValidationError) as err:
        detail = one_line_error(err, PostprocessConfig) if isinstance(err, ValidationError) else err
        raise DataError(
            f"{path}: not a tuned post-processing file ({detail}); delete it or rerun "
            "scripts/evaluate.py --tune"
        ) from None


def save_postprocess(section: PostprocessConfig, path: Path) -> None:
    """Write ``section`` as ``postprocess.json`` (its model_dump, atomically)."""
    write_text_atomic(path, json.dumps(section.model_dump(), indent=2) + "\n")
