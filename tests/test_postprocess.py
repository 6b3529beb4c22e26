"""Post-processing: per-class thresholds, and removal of small 8-connected components."""

from __future__ import annotations

import numpy as np
import pytest

from gitract.postprocess import binarize, remove_small_components


def _blobs() -> np.ndarray:
    """A 12x12 mask: a single pixel (1), a diagonal pair (2 under 8-connectivity, two 1-pixel
    parts under 4-connectivity), a 2x2 square (4) and a 3x4 block (12)."""
    mask = np.zeros((12, 12), dtype=np.uint8)
    mask[0, 0] = 1
    mask[3, 3] = mask[4, 4] = 1
    mask[0, 8:10] = mask[1, 8:10] = 1
    mask[8:11, 6:10] = 1
    return mask


def test_binarize_applies_each_class_its_own_threshold() -> None:
    probs = np.stack([np.full((4, 5), 0.45, np.float32)] * 3)
    probs[:, 0, 0] = 0.9
    probs[:, 1, 1] = 0.3
    masks = binarize(probs, [0.2, 0.5, 0.4], [0, 0, 0])
    assert masks.dtype == np.uint8 and masks.shape == (3, 4, 5)
    assert masks[0].all()  # 0.3 and 0.45 are above 0.2
    assert masks[1].sum() == 1 and masks[1, 0, 0] == 1  # only 0.9 passes 0.5
    assert masks[2].sum() == 4 * 5 - 1 and masks[2, 1, 1] == 0  # all but the 0.3 pixel
    # Strictly greater: a probability equal to the threshold stays background.
    assert not binarize(np.full((3, 2, 2), 0.5, np.float32), [0.5] * 3, [0] * 3).any()


def test_binarize_applies_each_class_its_own_min_size() -> None:
    probs = np.stack([_blobs().astype(np.float32)] * 3)
    masks = binarize(probs, [0.5] * 3, [0, 3, 5])
    assert masks[0].sum() == _blobs().sum()  # nothing removed
    assert masks[1].sum() == 4 + 12  # pixel and diagonal pair gone
    assert masks[2].sum() == 12  # only the block is left


def test_binarize_rejects_a_wrong_number_of_settings() -> None:
    probs = np.zeros((3, 4, 4), np.float32)
    with pytest.raises(ValueError, match="3 classes but 2 thresholds and 3 minimum sizes"):
        binarize(probs, [0.5, 0.5], [0, 0, 0])


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
