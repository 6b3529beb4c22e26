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


# ------------------------------------------------------- 1st place's input: 640 canvas, 448 crops


@pytest.mark.parametrize("hw", REAL_SIZES)
def test_resize_to_640_and_back_returns_a_mask_exactly(hw: tuple[int, int]) -> None:
    # configs/recipe_1st_2d.yaml stretches every slice to 640 x 640 and predicts on that whole
    # canvas: a mask taken onto it and back (probabilities, then > 0.5) must be the native mask
    # pixel for pixel, even salt-and-pepper noise, the hardest case for a resampling round trip.
    box = Letterbox.fit(hw, (640, 640), "resize")
    rng = np.random.default_rng(hw[0])
    noise = (rng.random((*hw, 3)) > 0.5).astype(np.uint8)
    blob = np.zeros((*hw, 3), np.uint8)
    blob[hw[0] // 4 : hw[0] // 2, hw[1] // 3 : hw[1] - 5, 1] = 1
    for mask in (noise, blob):
        canvas = box.apply(mask, nearest=True)
        assert canvas.shape == (640, 640, 3) and set(np.unique(canvas)) <= {0, 1}
        back = box.invert(canvas.transpose(2, 0, 1).astype(np.float32))
        assert back.shape == (3, *hw)
        np.testing.assert_array_equal(back > 0.5, mask.transpose(2, 0, 1).astype(bool))


@pytest.mark.parametrize("hw", [(310, 360), (234, 234)])
def test_resized_mask_stays_on_its_image(hw: tuple[int, int]) -> None:
    # The mask's nearest neighbour samples at pixel centres like the image's bilinear: a mask
    # drawn from a thresholded image still matches that image after both are enlarged.
    box = Letterbox.fit(hw, (640, 640), "resize")
    yy, xx = np.mgrid[: hw[0], : hw[1]]
    image = ((xx // 7 + yy // 5) % 2).astype(np.float32)  # a checkerboard of 7 x 5 px cells
    mask = box.apply(image.astype(np.uint8), nearest=True)
    enlarged = box.apply(image)
    assert np.mean((enlarged > 0.5) == (mask > 0)) > 0.995


def _crop_only(crop_hw: tuple[int, int]):
    """The training transform with every augmentation off but the crop."""
    from gitract.config import TrainConfig
    from gitract.data.slices import build_train_transform

    off = {f"aug_{name}": 0.0 for name in ("hflip", "vflip", "ssr", "distort", "brightness")}
    return build_train_transform(TrainConfig(**off), crop_hw)


def test_train_crop_is_a_window_of_the_canvas_and_covers_it() -> None:
    import random

    canvas_hw, crop_hw = (96, 128), (64, 64)
    yy, xx = np.mgrid[: canvas_hw[0], : canvas_hw[1]].astype(np.float32)
    image = np.stack([yy, xx, np.ones_like(xx)], axis=-1)  # each pixel knows where it was
    mask = (np.random.default_rng(0).random((*canvas_hw, 3)) > 0.5).astype(np.uint8)
    transform = _crop_only(crop_hw)
    offsets, covered = set(), np.zeros(canvas_hw, bool)
    for seed in range(200):
        # What training's per-item seeds do (gitract.training.sampling.SeededItems).
        transform.set_random_state(np.random.default_rng(seed), random.Random(seed))
        out = transform(image=image, mask=mask)
        assert out["image"].shape == (*crop_hw, 3) and out["mask"].shape == (*crop_hw, 3)
        top, left = int(out["image"][0, 0, 0]), int(out["image"][0, 0, 1])
        window = (slice(top, top + crop_hw[0]), slice(left, left + crop_hw[1]))
        np.testing.assert_array_equal(out["image"], image[window])
        np.testing.assert_array_equal(out["mask"], mask[window])  # the same window
        offsets.add((top, left))
        covered[window] = True
    # Every offset is possible and the draws spread: all rows and columns of the canvas seen.
    tops, lefts = {t for t, _ in offsets}, {left for _, left in offsets}
    assert min(tops) == 0 and max(tops) == canvas_hw[0] - crop_hw[0]
    assert min(lefts) == 0 and max(lefts) == canvas_hw[1] - crop_hw[1]
    assert len(offsets) > 150 and covered.any(axis=0).all() and covered.any(axis=1).all()
    assert covered.mean() > 0.95  # only the corners need a draw of an extreme offset
    # The same seed draws the same window (a resumed run crops what the first one did).
    windows = []
    for _ in range(2):
        transform.set_random_state(np.random.default_rng(7), random.Random(7))
        windows.append(transform(image=image, mask=mask)["image"][0, 0, :2].tolist())
    assert windows[0] == windows[1]


def test_train_crop_of_the_whole_canvas_is_the_canvas() -> None:
    image = np.random.default_rng(1).random((64, 96, 3)).astype(np.float32)
    out = _crop_only((64, 96))(image=image, mask=np.zeros((64, 96, 3), np.uint8))
    np.testing.assert_array_equal(out["image"], image)
