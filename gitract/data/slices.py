"""The torch Dataset of 2.5D samples and its albumentations pipelines.

A sample is a slice with its neighbours ``z - k*stride ... z + k*stride`` as channels (clamped at
the volume's ends), intensity-normalised per case-day, placed on the model's canvas
(:class:`~gitract.data.geometry.Letterbox`), augmented in training, with its (3, H, W) float mask.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import albumentations as A
import cv2
import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from gitract.config import DataConfig, TrainConfig
from gitract.data.cache import VolumeCache
from gitract.data.geometry import Letterbox

__all__ = [
    "IntensityJitter",
    "RandomWarp",
    "SliceDataset",
    "build_train_transform",
    "slice_offsets",
]


def slice_offsets(n_slices: int, stride: int) -> list[int]:
    """Channel offsets along z: 3 slices at stride 2 give [-2, 0, 2]."""
    half = n_slices // 2
    return [stride * k for k in range(-half, half + 1)]


class RandomWarp(A.DualTransform):
    """Shift-scale-rotate (probability ``p_affine``) and elastic deformation (``p_elastic``),
    drawn independently and applied as ONE warp of the image (linear) and the mask (nearest).

    One warp instead of two halves the cost when both are drawn, and a warp without the
    elastic part is a plain ``cv2.warpAffine``. The elastic field is Simard et al.'s smooth
    random displacement without its full-size Gaussian blur (albumentations' ElasticTransform
    costs ~26 ms at 320x384, and at alpha=1, sigma=50 moves pixels by 0.005 px): each point of
    a ``grid`` x ``grid`` lattice moves by up to ``max_shift`` of the shorter side, cubic-
    interpolated in between. Random numbers come from the Compose's seeded generators, so
    ``Compose.set_random_seed`` makes it repeatable.
    """

    def __init__(
        self,
        p_affine: float = 0.5,
        p_elastic: float = 0.25,
        scale: tuple[float, float] = (0.9, 1.1),
        translate: float = 0.0625,
        rotate: float = 15.0,
        grid: int = 4,
        max_shift: float = 0.02,
    ) -> None:
        super().__init__(p=1.0 if max(p_affine, p_elastic) > 0 else 0.0)
        if grid < 2 or not 0 <= max_shift < 0.5:
            raise ValueError(f"RandomWarp: need grid >= 2, 0 <= max_shift < 0.5, got {grid}, "
                             f"{max_shift}")  # fmt: skip
        self.p_affine, self.p_elastic = p_affine, p_elastic
        self.scale, self.translate, self.rotate = scale, translate, rotate
        self.grid, self.max_shift = grid, max_shift

    def get_params_dependent_on_data(
        self, params: dict[str, Any], data: dict[str, Any]
    ) -> dict[str, Any]:
        height, width = params["shape"][:2]
        rnd = self.py_random
        matrix = None
        if rnd.random() < self.p_affine:
            matrix = cv2.getRotationMatrix2D(
                ((width - 1) / 2, (height - 1) / 2),
                rnd.uniform(-self.rotate, self.rotate),
                rnd.uniform(*self.scale),
            )
            matrix[:, 2] += (
                rnd.uniform(-self.translate, self.translate) * width,
                rnd.uniform(-self.translate, self.translate) * height,
            )
        if rnd.random() >= self.p_elastic:
            return {"matrix": matrix, "maps": None}
        limit = self.max_shift * min(height, width)
        coarse = self.random_generator.uniform(-limit, limit, (2, self.grid, self.grid))
        # Cubic to a 16x16 lattice, then linear to full size: smooth, and far cheaper than one
        # cubic resize of the coarse grid straight to the image size.
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
        if matrix is not None:  # output pixel -> elastic -> inverse affine -> source pixel
            inv = cv2.invertAffineTransform(matrix).astype(np.float32)
            dx, dy = (
                inv[0, 0] * dx + inv[0, 1] * dy + inv[0, 2],
                inv[1, 0] * dx + inv[1, 1] * dy + inv[1, 2],
            )
        return {"matrix": None, "maps": (dx, dy)}

    @staticmethod
    def _warp(array: np.ndarray, matrix: Any, maps: Any, interpolation: int) -> np.ndarray:
        border = {"borderMode": cv2.BORDER_CONSTANT, "borderValue": 0}
        if maps is not None:
            out = cv2.remap(array, maps[0], maps[1], interpolation, **border)
        elif matrix is not None:
            height, width = array.shape[:2]
            out = cv2.warpAffine(array, matrix, (width, height), flags=interpolation, **border)
        else:
            return array
        return out[..., None] if out.ndim < array.ndim else out

    def apply(self, img: np.ndarray, matrix: Any = None, maps: Any = None, **params: Any):
        return self._warp(img, matrix, maps, cv2.INTER_LINEAR)

    def apply_to_mask(self, mask: np.ndarray, matrix: Any = None, maps: Any = None, **params):
        return self._warp(mask, matrix, maps, cv2.INTER_NEAREST)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("p_affine", "p_elastic", "scale", "translate", "rotate", "grid", "max_shift")


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


def build_train_transform(train: TrainConfig, crop_hw: Sequence[int] | None = None) -> A.Compose:
    """Augmentations on the canvas; masks follow every geometric step with nearest neighbour.

    Chosen to be cheap on one CPU core (well under 1 ms a sample on average at 320x384, see
    ``scripts/benchmark.py``) and to act: shift-scale-rotate (``aug_ssr``) and elastic
    deformation (``aug_distort``: pixels move by ~4 px on average; tests/test_dataset.py
    measures it) share one warp; brightness/contrast jitter works on the float image.

    ``crop_hw`` (``data.train_crop``): last, a random (H, W) window of the augmented canvas,
    the same window of image and mask, every offset equally likely. The crop is part of the
    training transform only, so validation and inference see the whole canvas and go back to
    each slice's own size through the unchanged :meth:`Letterbox.invert`; being a step of the
    Compose, it draws from the stream that the per-item seeds reseed.
    """
    steps = [
        A.HorizontalFlip(p=train.aug_hflip),
        A.VerticalFlip(p=train.aug_vflip),
        RandomWarp(p_affine=train.aug_ssr, p_elastic=train.aug_distort),
        IntensityJitter(brightness=0.1, contrast=0.1, p=train.aug_brightness),
    ]
    if crop_hw is not None:
        height, width = (int(s) for s in crop_hw)
        steps.append(A.RandomCrop(height=height, width=width, p=1.0))
    return A.Compose([s for s in steps if s.p > 0])


class SliceDataset(Dataset):
    """2.5D samples for the slices of ``table``, in its row order.

    Each item is a dict: ``image`` (data.in_channels, tH, tW) float32: the slices, then with
    ``data.z_channel`` the slice's relative position in its case-day (index / depth, constant over
    the canvas and untouched by augmentation); ``mask`` (3, tH, tW) float32 when the cache has
    masks; ``id``; ``orig_hw`` (2,) long, which inference needs to go back to the slice's own
    size; ``index`` into ``table``. The arrays are the canvas's size (tH, tW), or a training
    transform's crop of it (``data.train_crop``, :func:`build_train_transform`).
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
        self.z_channel = data.z_channel
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
        if self.z_channel:
            info, z = self.cache.locate(slice_id)
            where = np.full((*image.shape[:2], 1), z / info.depth, dtype=np.float32)
            image = np.concatenate([image, where], axis=-1)
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
