"""Letterbox: slices onto the canvas and back, for every real slice size."""

from __future__ import annotations

import numpy as np
import pytest

from gitract.data.geometry import Letterbox

REAL_SIZES = [(266, 266), (310, 360), (276, 276), (234, 234)]  # (H, W)


@pytest.mark.parametrize("hw", REAL_SIZES)
def test_pad_mode_on_default_canvas_is_exact_round_trip(hw: tuple[int, int]) -> None:
    box = Letterbox.fit(hw, (320, 384), "pad")
    assert box.scaled_hw == hw  # every real size fits: no resampling at all
    rng = np.random.default_rng(0)
    probs = rng.random((*hw, 3)).astype(np.float32)
    canvas = box.apply(probs)
    assert canvas.shape == (320, 384, 3)
    back = box.invert(canvas.transpose(2, 0, 1))
    np.testing.assert_array_equal(back, probs.transpose(2, 0, 1))
    # Everything off the slice is zero padding, split evenly around it.
    top, left = box.offset
    assert canvas[:top].sum() == 0 and canvas[:, :left].sum() == 0
    assert abs((320 - hw[0]) - 2 * top) <= 1 and abs((384 - hw[1]) - 2 * left) <= 1


def test_pad_mode_scales_down_keeping_aspect_ratio() -> None:
    box = Letterbox.fit((310, 360), (128, 128), "pad")
    assert box.scaled_hw == (110, 128)
    assert box.offset == (9, 0)
    mask = np.zeros((310, 360), np.uint8)
    mask[100:200, 50:300] = 1
    small = box.apply(mask, nearest=True)
    assert set(np.unique(small)) == {0, 1}
    back = box.invert(small[None].astype(np.float32))[0]
    assert back.shape == (310, 360)
    # Down and up again: the region comes back, up to a pixel or so at its border.
    assert np.mean((back > 0.5) == mask) > 0.99


def test_resize_mode_stretches_to_canvas() -> None:
    box = Letterbox.fit((310, 360), (384, 384), "resize")
    assert box.scaled_hw == (384, 384) and box.offset == (0, 0)
    out = box.apply(np.ones((310, 360, 5), np.float32))
    assert out.shape == (384, 384, 5) and out.min() == 1.0
    assert box.invert(out.transpose(2, 0, 1)).shape == (5, 310, 360)


def test_shape_mismatch_and_unknown_mode_are_errors() -> None:
    box = Letterbox.fit((266, 266), (320, 384), "pad")
    with pytest.raises(ValueError, match="does not match"):
        box.apply(np.zeros((100, 100), np.float32))
    with pytest.raises(ValueError, match="unknown resize mode 'crop'"):
        Letterbox.fit((266, 266), (320, 384), "crop")
