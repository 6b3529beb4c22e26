"""Post-processing: per-class thresholds, and removal of small 8-connected components."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from scipy import ndimage

from gitract.postprocess.steps import (
    ClassPostprocess,
    binarize,
    drop_short_runs,
    fill_gaps,
    postprocess_class,
    postprocess_volume,
    quantize,
    remove_small_components,
    remove_small_volumes,
    small_components,
)


def _blobs() -> np.ndarray:
    """A 12x12 mask: a single pixel (1), a diagonal pair (2 under 8-connectivity, two 1-pixel
    parts under 4-connectivity), a 2x2 square (4) and a 3x4 block (12)."""
    mask = np.zeros((12, 12), dtype=np.uint8)
    mask[0, 0] = 1
    mask[3, 3] = mask[4, 4] = 1
    mask[0, 8:10] = mask[1, 8:10] = 1
    mask[8:11, 6:10] = 1
    return mask


def _one_slice(probs: np.ndarray, params: list[ClassPostprocess]) -> np.ndarray:
    """The 2D steps alone on one slice: (C, H, W) probabilities -> (C, H, W) uint8 masks."""
    return postprocess_volume(quantize(probs)[None], params)[0].astype(np.uint8)


def test_each_class_gets_its_own_threshold() -> None:
    probs = np.stack([np.full((4, 5), 0.45, np.float32)] * 3)
    probs[:, 0, 0] = 0.9
    probs[:, 1, 1] = 0.3
    masks = _one_slice(probs, [ClassPostprocess(threshold=t) for t in (0.2, 0.5, 0.4)])
    assert masks.dtype == np.uint8 and masks.shape == (3, 4, 5)
    assert masks[0].all()  # 0.3 and 0.45 are above 0.2
    assert masks[1].sum() == 1 and masks[1, 0, 0] == 1  # only 0.9 passes 0.5
    assert masks[2].sum() == 4 * 5 - 1 and masks[2, 1, 1] == 0  # all but the 0.3 pixel
    # Strictly greater: a probability equal to the threshold (0.4 = 102 / 255) stays background.
    at = np.full((1, 3, 2, 2), 102, np.uint8)
    assert not postprocess_volume(at, [ClassPostprocess(threshold=0.4)] * 3).any()


def test_each_class_gets_its_own_min_size() -> None:
    probs = np.stack([_blobs().astype(np.float32)] * 3)
    masks = _one_slice(probs, [ClassPostprocess(min_size=m) for m in (0, 3, 5)])
    assert masks[0].sum() == _blobs().sum()  # nothing removed
    assert masks[1].sum() == 4 + 12  # pixel and diagonal pair gone
    assert masks[2].sum() == 12  # only the block is left


def test_a_wrong_number_of_class_settings_is_rejected() -> None:
    probs = np.zeros((1, 3, 4, 4), np.uint8)
    with pytest.raises(ValueError, match=r"needs \(D, 2, H, W\) for 2 class settings"):
        postprocess_volume(probs, [ClassPostprocess()] * 2)


@pytest.mark.parametrize(
    ("min_size", "kept"),
    [(0, 1 + 2 + 4 + 12), (1, 1 + 2 + 4 + 12), (2, 2 + 4 + 12), (3, 4 + 12), (4, 4 + 12),
     (5, 12), (12, 12), (13, 0)],
)  # fmt: skip
def test_remove_small_components_drops_only_those_below_min_size(min_size, kept) -> None:
    mask = _blobs()
    out = remove_small_components(mask, min_size)
    assert out.dtype == np.uint8 and out.shape == mask.shape
    assert int(out.sum()) == kept
    assert not (out & ~mask.astype(bool)).any()  # never adds a pixel
    if min_size == 2:
        # 8-connectivity: the diagonal pair is one component of 2 pixels, so it survives.
        assert out[3, 3] == 1 and out[4, 4] == 1 and out[0, 0] == 0


def test_remove_small_components_leaves_empty_masks_alone() -> None:
    empty = np.zeros((5, 7), np.uint8)
    assert np.array_equal(remove_small_components(empty, 10), empty)


def _per_slice(masks: np.ndarray, min_size: int) -> np.ndarray:
    """remove_small_components by definition: OpenCV's labelling of each slice alone."""
    expected = np.zeros_like(masks)
    for z, plane in enumerate(masks.view(np.uint8)):
        _, labels, stats, _ = cv2.connectedComponentsWithStats(plane, connectivity=8)
        keep = stats[:, cv2.CC_STAT_AREA] >= min_size
        keep[0] = False
        expected[z] = keep[labels]
    return expected


def _random_stacks(seed: int, count: int):
    """Random bool stacks whose components touch the stack's edges and neighbouring slices."""
    rng = np.random.default_rng(seed)
    for _ in range(count):
        shape = tuple(int(n) for n in rng.integers(1, 14, 3))
        yield rng, rng.random(shape) < rng.uniform(0.05, 0.6)


def test_small_components_of_a_stack_are_those_of_each_slice() -> None:
    """A (D, H, W) stack is cleaned slice by slice: equal to OpenCV's labelling of each slice
    alone."""
    for rng, masks in _random_stacks(3, 100):
        min_size = int(rng.integers(2, 9))
        got = remove_small_components(masks, min_size)
        assert got.dtype == bool and np.array_equal(got, _per_slice(masks, min_size))


def test_one_labelling_gives_every_smaller_min_size() -> None:
    """small_components' pixels, smallest components first: the first ones below ``min_size``
    are what min_size removes, for every min_size up to the labelled bound (the tuner labels
    each threshold once)."""
    for _, masks in _random_stacks(4, 60):
        pixels, sizes = small_components(masks, 9)
        assert (np.diff(sizes) >= 0).all() and (sizes < 9).all()
        for min_size in range(10):
            cut = masks.copy()
            cut.ravel()[pixels[: np.searchsorted(sizes, min_size)]] = False
            assert np.array_equal(cut, _per_slice(masks, min_size)), min_size


# --------------------------------------------------------------------------- 3D steps


def _volume(d: int = 8, h: int = 12, w: int = 12) -> np.ndarray:
    return np.zeros((d, h, w), dtype=np.uint8)


def test_quantize_matches_the_oof_files() -> None:
    probs = np.array([0.0, 0.5, 0.501, 1.0, 1.2, -0.1], dtype=np.float32)
    assert quantize(probs).tolist() == [0, 128, 128, 255, 255, 0]


def test_fill_gaps_and_drop_short_runs() -> None:
    flags = np.array([1, 0, 1, 0, 0, 1, 0, 0, 0, 1, 1, 0], dtype=bool)
    assert fill_gaps(flags, 0).tolist() == flags.tolist()
    assert fill_gaps(flags, 1).astype(int).tolist() == [1, 1, 1, 0, 0, 1, 0, 0, 0, 1, 1, 0]
    assert fill_gaps(flags, 2).astype(int).tolist() == [1, 1, 1, 1, 1, 1, 0, 0, 0, 1, 1, 0]
    assert drop_short_runs(flags, 2).astype(int).tolist() == [0] * 9 + [1, 1, 0]
    assert drop_short_runs(flags, 3).sum() == 0
    assert drop_short_runs(flags, 1).tolist() == flags.tolist()


def test_slice_gate_needs_both_confidence_and_area() -> None:
    probs = _volume(3)
    probs[0, :2, :2] = 200  # confident, 4 px
    probs[1, :5, :5] = 140  # weak, 25 px
    probs[2, :5, :5] = 250  # confident, 25 px
    kept = postprocess_class(probs, ClassPostprocess(gate_prob=0.7, gate_area=10))
    assert kept.any(axis=(1, 2)).tolist() == [False, False, True]
    assert kept[2].sum() == 25
    # Filling the 1-slice gap brings the weak middle slice back between two kept ones.
    probs[0, :5, :5] = 250
    kept = postprocess_class(probs, ClassPostprocess(gate_prob=0.7, fill_gaps=1))
    assert kept.any(axis=(1, 2)).tolist() == [True, True, True]


def test_classifier_gate_reads_the_presence_probabilities() -> None:
    probs = _volume(3)
    probs[:, :5, :5] = 250  # the segmentation is sure on every slice
    presence = np.array([240, 60, 200], dtype=np.uint8)  # the classifier doubts slice 1
    kept = postprocess_class(probs, ClassPostprocess(gate_cls=0.5), presence)
    assert kept.any(axis=(1, 2)).tolist() == [True, False, True]
    assert postprocess_class(probs, ClassPostprocess(), presence).any(axis=(1, 2)).all()
    with pytest.raises(ValueError, match="gate_cls is set but there are no presence"):
        postprocess_class(probs, ClassPostprocess(gate_cls=0.5))
    # In a whole volume each class reads its own column of the (D, C) presence.
    volume = np.stack([probs, probs, probs], axis=1)
    columns = np.stack([presence, np.full(3, 255, np.uint8), presence], axis=1)
    out = postprocess_volume(volume, [ClassPostprocess(gate_cls=0.5)] * 3, columns)
    assert out.any(axis=(2, 3)).tolist() == [[True] * 3, [False, True, False], [True] * 3]


def test_min_run_drops_an_organ_seen_on_one_slice_only() -> None:
    probs = _volume(6)
    probs[0, 1:4, 1:4] = 255  # one-slice stray
    probs[2:6, 5:9, 5:9] = 255  # a 4-slice organ
    kept = postprocess_class(probs, ClassPostprocess(min_run=2))
    assert kept.any(axis=(1, 2)).tolist() == [False, False, True, True, True, True]


def test_3d_components_count_voxels_across_slices() -> None:
    probs = _volume(4)
    probs[0:4, 0:2, 0:2] = 255  # 16 voxels, one column of squares through every slice
    probs[1, 8, 8] = probs[2, 9, 9] = 255  # 2 voxels, only diagonally adjacent along z
    probs[0:2, 10, 0:3] = 255  # 6 voxels
    out = postprocess_class(probs, ClassPostprocess(min_volume=3))
    assert out.sum() == 16 + 6 and not out[1, 8, 8]  # the diagonal pair is two 1-voxel parts
    out = postprocess_class(probs, ClassPostprocess(keep_largest=True))
    assert out.sum() == 16 and out[:, 0:2, 0:2].all()


def _volumes_reference(mask: np.ndarray, min_volume: int, keep_largest: bool) -> np.ndarray:
    """Step 5 labelled on the whole volume (no bounding box), as the definition reads."""
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = True
    structure[0, 1, 1] = structure[2, 1, 1] = True
    labels, count = ndimage.label(mask, structure=structure)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    sizes[0] = 0
    keep = sizes >= max(min_volume, 1)
    if keep_largest and count:
        keep &= np.arange(count + 1) == int(np.argmax(sizes))
    keep[0] = False
    return keep[labels]


def test_3d_step_on_the_bounding_box_equals_the_whole_volume() -> None:
    """Labelling only the mask's bounding box keeps the same components, and keep_largest
    the same one among equal sizes (raster order): random sparse masks, many ties."""
    rng = np.random.default_rng(5)
    for _ in range(200):
        shape = tuple(int(n) for n in rng.integers(2, 12, 3))
        mask = np.zeros(shape, dtype=bool)
        inner = tuple(slice(int(rng.integers(0, n // 2 + 1)), n) for n in shape)
        mask[inner] = rng.random(mask[inner].shape) < rng.uniform(0.02, 0.4)
        for min_volume, keep_largest in [(0, True), (2, False), (3, True), (1, False)]:
            expected = _volumes_reference(mask, min_volume, keep_largest)
            if min_volume <= 1 and not keep_largest:
                expected = mask
            got = remove_small_volumes(mask, min_volume, keep_largest)
            assert np.array_equal(got, expected)


def test_threshold_reads_the_quantised_scale_and_steps_compose() -> None:
    probs = _volume(2)
    probs[0, 0, 0] = 127  # 0.498 -> below 0.5
    probs[0, 5, 5] = 128  # 0.502 -> above
    assert postprocess_class(probs, ClassPostprocess()).sum() == 1
    stack = np.stack([probs, probs, probs], axis=1)
    params = (ClassPostprocess(), ClassPostprocess(threshold=0.4), ClassPostprocess(min_size=2))
    out = postprocess_volume(stack, params)
    assert out.shape == stack.shape and out.dtype == bool
    assert out[:, 0].sum() == 1 and out[:, 1].sum() == 2 and out[:, 2].sum() == 0


def test_binarize_compares_the_quantised_scale_exactly() -> None:
    # Every uint8 value against thresholds whose t * 255 is just below, at or above an integer
    # in floating point (0.6 * 255 = 152.99999999999997): the integer comparison must give
    # the float one's mask; other dtypes keep the float comparison.
    values = np.arange(256, dtype=np.uint8).reshape(1, 16, 16)
    for threshold in [0.0, 0.2, 0.3, 0.5, 0.6, 0.7, 1 / 255, 51 / 255, 0.999, 1.0]:
        assert np.array_equal(binarize(values, threshold), values > threshold * 255), threshold
    wide = values.astype(np.float32)
    assert np.array_equal(binarize(wide, 0.5), values > 127)


def test_class_settings_round_trip_and_reject_bad_values() -> None:
    params = ClassPostprocess(threshold=0.4, min_volume=50, keep_largest=True)
    assert ClassPostprocess(**params.model_dump()) == params
    assert ClassPostprocess(**{"threshold": 0.3}) == ClassPostprocess(threshold=0.3)
    with pytest.raises(ValueError, match="unknown post-processing key"):
        ClassPostprocess(**{"treshold": 0.3})
    with pytest.raises(ValueError, match="min_run must be an integer >= 0"):
        ClassPostprocess(min_run=-1)
    with pytest.raises(ValueError, match=r"threshold must be in \(0, 1\)"):
        ClassPostprocess(threshold=1.0)


def test_bad_numpy_settings_are_reported_as_plain_values() -> None:
    """A grid made with numpy (np.linspace, np.arange) names the value, not its numpy repr."""
    with pytest.raises(ValueError, match=r"threshold must be in \(0, 1\), got 1.5$") as bad:
        ClassPostprocess(threshold=np.float64(1.5))
    assert "np." not in str(bad.value)
    with pytest.raises(ValueError, match="min_size must be an integer >= 0, got -25$") as bad:
        ClassPostprocess(min_size=np.int64(-25))
    assert "np." not in str(bad.value)
