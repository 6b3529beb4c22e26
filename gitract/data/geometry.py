"""Fitting a slice onto the model's fixed input canvas, and the exact way back.

Real slices come in four sizes (266x266, 310x360, 276x276, 234x234 as H x W). The default
canvas of 320x384 holds every one of them, so ``"pad"`` mode centres a slice on the canvas at
native resolution and the inverse is a plain crop: no resampling of images or masks at all.
A smaller canvas (the CPU demo) scales the slice down first, keeping its aspect ratio.
``"resize"`` stretches to the canvas, as many public notebooks did and as the 1st place's 2D
models did on a 640 x 640 canvas (``configs/recipe_1st_2d.yaml``), which may then be trained on
random windows of the canvas (``data.train_crop``, a training transform: the canvas and this
inverse are the same with or without it).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

__all__ = ["Letterbox"]


@dataclass(frozen=True)
class Letterbox:
    """Where a slice of ``orig_hw`` lies on a ``target_hw`` canvas: scaled to ``scaled_hw`` at
    ``offset`` (top, left)."""

    orig_hw: tuple[int, int]
    target_hw: tuple[int, int]
    scaled_hw: tuple[int, int]
    offset: tuple[int, int]

    @classmethod
    def fit(cls, orig_hw: tuple[int, int], target_hw: tuple[int, int], mode: str) -> Letterbox:
        """Place a slice on the canvas: ``"pad"`` keeps the aspect ratio and never upsamples,
        ``"resize"`` stretches to fill."""
        (h, w), (th, tw) = orig_hw, target_hw
        if mode == "resize":
            return cls((h, w), (th, tw), (th, tw), (0, 0))
        if mode != "pad":
            raise ValueError(f"unknown resize mode {mode!r}; expected 'pad' or 'resize'")
        scale = min(1.0, th / h, tw / w)
        sh, sw = min(th, round(h * scale)), min(tw, round(w * scale))
        return cls((h, w), (th, tw), (sh, sw), ((th - sh) // 2, (tw - sw) // 2))

    def apply(self, array: np.ndarray, nearest: bool = False) -> np.ndarray:
        """Put an (H, W) or (H, W, C) array on the canvas; zeros around it.

        Images: area averaging when shrinking (no aliasing of the noise), bilinear when
        enlarging (``"resize"`` to a larger canvas, e.g. 640). Masks go with ``nearest=True``
        so they stay binary, by cv2's INTER_NEAREST_EXACT: it samples at pixel centres like
        the image's interpolation and :meth:`invert`'s bilinear does, where plain INTER_NEAREST
        samples at pixel corners and shifts the mask by up to half a native pixel off the
        image. With it a mask enlarged to the canvas comes back exactly (``invert``, then
        ``> 0.5``) for every real slice size on a 640 x 640 canvas (tests/test_geometry.py)."""
        if array.shape[:2] != self.orig_hw:
            raise ValueError(f"array of shape {array.shape[:2]} does not match {self.orig_hw}")
        if self.scaled_hw != self.orig_hw:
            shrink = all(s <= o for s, o in zip(self.scaled_hw, self.orig_hw, strict=True))
            interpolation = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
            if nearest:
                interpolation = cv2.INTER_NEAREST_EXACT
            resized = cv2.resize(array, self.scaled_hw[::-1], interpolation=interpolation)
            # cv2 drops a trailing channel axis of size 1; put it back.
            array = resized.reshape(*self.scaled_hw, *array.shape[2:])
        canvas = np.zeros((*self.target_hw, *array.shape[2:]), dtype=array.dtype)
        (top, left), (sh, sw) = self.offset, self.scaled_hw
        canvas[top : top + sh, left : left + sw] = array
        return canvas

    def invert(self, canvas: np.ndarray) -> np.ndarray:
        """Take a (C, tH, tW) canvas of probabilities back to (C, H, W) at the slice's size.

        Probabilities are resized before any threshold (bilinear), so a down-scaled prediction
        comes back with smooth boundaries rather than blocky nearest-neighbour steps."""
        (top, left), (sh, sw) = self.offset, self.scaled_hw
        crop = canvas[:, top : top + sh, left : left + sw]
        if self.scaled_hw == self.orig_hw:
            return np.ascontiguousarray(crop)
        hwc = np.ascontiguousarray(crop.transpose(1, 2, 0))
        resized = cv2.resize(hwc, self.orig_hw[::-1], interpolation=cv2.INTER_LINEAR)
        return resized.reshape(*self.orig_hw, -1).transpose(2, 0, 1)
