"""The torch Dataset of 2.5D samples and its albumentations pipelines.

A sample is a slice with its neighbours ``z - k*stride ... z + k*stride`` as channels (clamped at
the volume's ends), intensity-normalised per case-day, placed on the model's canvas
(:class:`~gitract.geometry.Letterbox`), augmented in training, with its (3, H, W) float mask.
"""

from __future__ import annotations

from typing import Any

import albumentations as A
import cv2
import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from gitract.config import DataConfig, TrainConfig
from gitract.geometry import Letterbox
from gitract.volumes import VolumeCache

__all__ = [
    "CoarseElastic",
    "IntensityJitter",
    "SliceDataset",
    "build_train_transform",
    "slice_offsets",
]


def slice_offsets(n_slices: int, stride: int) -> list[int]:
    """Channel offsets along z: 3 slices at stride 2 give [-2, 0, 2]."""
    half = n_slices // 2
    return [stride * k for k in range(-half, half + 1)]


class CoarseElastic(A.DualTransform):
    """Elastic (soft-tissue) deformation from a coarse grid of random displacements, cubic-
    interpolated to every pixel, then one ``cv2.remap``; masks follow with nearest neighbour.

    The smooth field of Simard et al.'s elastic transform without its full-size Gaussian blur
    (albumentations' ElasticTransform costs ~26 ms at 320x384, and at alpha=1, sigma=50 moves
    pixels by 0.03 px): each of the ``grid`` x ``grid`` control points moves by up to
    ``max_shift`` of the image's shorter side. Random numbers come from the Compose's seeded
    generator, so ``Compose.set_random_seed`` makes it repeatable.
    """

    def __init__(self, grid: int = 4, max_shift: float = 0.02, p: float = 0.5) -> None:
        super().__init__(p=p)
        if grid < 2 or not 0 < max_shift < 0.5:
            raise ValueError(f"CoarseElastic: need grid >= 2, 0 < max_shift < 0.5, got {grid}, "
                             f"{max_shift}")  # fmt: skip
        self.grid, self.max_shift = grid, max_shift

    def get_params_dependent_on_data(
        self, params: dict[str, Any], data: dict[str, Any]
    ) -> dict[str, Any]:
        height, width = params["shape"][:2]
        limit = self.max_shift * min(height, width)
        coarse = self.random_generator.uniform(-limit, limit, (2, self.grid, self.grid))
        # Cubic to a 16x16 grid, then linear to full size: smooth, and ~50x cheaper than one
        # cubic resize of the 4x4 grid straight to the image size.
        dx, dy = (
            cv2.resize(
                cv2.resize(c.astype(np.float32), (16, 16), interpolation=cv2.INTER_CUBIC),
                (width, height),
                interpolation=cv2.INTER_LINEAR,
            )
            for c in coarse
        )
        dx += np.arange(width, dtype=np.float32)[None, :]
        dy += np.arange(height, dtype=np.float32)[:, None]
        return {"map_x": dx, "map_y": dy}

    def apply(self, img: np.ndarray, map_x: np.ndarray, map_y: np.ndarray, **params: Any):
        return _remap(img, map_x, map_y, cv2.INTER_LINEAR)

    def apply_to_mask(self, mask: np.ndarray, map_x: np.ndarray, map_y: np.ndarray, **params):
        return _remap(mask, map_x, map_y, cv2.INTER_NEAREST)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("grid", "max_shift")


def _remap(array: np.ndarray, map_x: np.ndarray, map_y: np.ndarray, interpolation: int):
    """``cv2.remap`` with zero fill that keeps a trailing channel axis of any length."""
    out = cv2.remap(array, map_x, map_y, interpolation, borderMode=cv2.BORDER_CONSTANT,
                    borderValue=0)  # fmt: skip
    return out[..., None] if out.ndim < array.ndim else out


class IntensityJitter(A.ImageOnlyTransform):
    """``image * contrast + brightness`` on the normalised float image (scanner and windowing
    differences): contrast in 1 +- ``contrast``, brightness in +- ``brightness``.

    One multiply-add (~0.1 ms at 320x384); albumentations' RandomBrightnessContrast costs ~13 ms
    a sample on float32. Nothing is clipped: the image is already float and 0 stays 0 under
    the contrast factor, so the letterbox padding only moves with the brightness.
    """

    def __init__(self, brightness: float = 0.1, contrast: float = 0.1, p: float = 0.5) -> None:
        super().__init__(p=p)
        self.brightness, self.contrast = brightness, contrast

    def get_params(self) -> dict[str, float]:
        return {
            "alpha": 1.0 + self.py_random.uniform(-self.contrast, self.contrast),
            "beta": self.py_random.uniform(-self.brightness, self.brightness),
        }

    def apply(self, img: np.ndarray, alpha: float, beta: float, **params: Any) -> np.ndarray:
        out = np.multiply(img, np.float32(alpha), dtype=np.float32)
        out += np.float32(beta)
        return out

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("brightness", "contrast")


def build_train_transform(train: TrainConfig) -> A.Compose:
    """Augmentations on the canvas; masks follow every geometric step with nearest neighbour.

    Every step is chosen to be cheap on one CPU core (a few ms at 320x384 in all, see
    ``scripts/benchmark.py``) and to do something visible: the distortions move pixels by
    several pixels (tests/test_dataset.py measures it).
    """
    border = {"border_mode": cv2.BORDER_CONSTANT, "fill": 0, "fill_mask": 0}
    steps = [
        A.HorizontalFlip(p=train.aug_hflip),
        A.VerticalFlip(p=train.aug_vflip),
        A.Affine(
            scale=(0.9, 1.1),
            translate_percent=(-0.0625, 0.0625),
            rotate=(-15, 15),
            mask_interpolation=cv2.INTER_NEAREST,
            p=train.aug_ssr,
            **border,
        ),
        A.OneOf(
            [
                A.GridDistortion(
                    num_steps=5, distort_limit=0.1, mask_interpolation=cv2.INTER_NEAREST, **border
                ),
                CoarseElastic(grid=4, max_shift=0.02),
            ],
            p=train.aug_distort,
        ),
        IntensityJitter(brightness=0.1, contrast=0.1, p=train.aug_brightness),
    ]
    return A.Compose([s for s in steps if s.p > 0])


class SliceDataset(Dataset):
    """2.5D samples for the slices of ``table``, in its row order.

    Each item is a dict: ``image`` (n_slices, tH, tW) float32; ``mask`` (3, tH, tW) float32 when
    the cache has masks; ``id``; ``orig_hw`` (2,) long, which inference needs to go back to the
    slice's own size; ``index`` into ``table``.
    """

    def __init__(
        self,
        table: pd.DataFrame,
        cache: VolumeCache,
        data: DataConfig,
        transform: A.Compose | None = None,
    ) -> None:
        self.ids = table["id"].tolist()
        self.hw = list(zip(table["height"].astype(int), table["width"].astype(int), strict=True))
        self.cache = cache
        self.offsets = slice_offsets(data.n_slices, data.slice_stride)
        self.target_hw = (int(data.img_size[0]), int(data.img_size[1]))
        self.resize_mode = data.resize_mode
        self.transform = transform

    def __len__(self) -> int:
        return len(self.ids)

    def letterbox(self, index: int) -> Letterbox:
        """Where sample ``index`` lies on the canvas (inference inverts this)."""
        return Letterbox.fit(self.hw[index], self.target_hw, self.resize_mode)

    def __getitem__(self, index: int) -> dict[str, Any]:
        slice_id = self.ids[index]
        box = self.letterbox(index)
        image = box.apply(self.cache.image_stack(slice_id, self.offsets))
        mask = box.apply(self.cache.mask(slice_id), nearest=True) if self.cache.with_masks else None
        if self.transform is not None:
            targets = {"image": image} if mask is None else {"image": image, "mask": mask}
            out = self.transform(**targets)
            image, mask = out["image"], out.get("mask")
        # (C, H, W) views of the (H, W, C) arrays, not copies: the DataLoader's collate copies
        # every sample into the batch anyway.
        item: dict[str, Any] = {
            "image": torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1),
            "id": slice_id,
            "orig_hw": torch.tensor(self.hw[index]),
            "index": index,
        }
        if mask is not None:
            item["mask"] = torch.from_numpy(np.ascontiguousarray(mask)).permute(2, 0, 1).float()
        return item
