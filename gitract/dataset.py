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

__all__ = ["SliceDataset", "build_train_transform", "slice_offsets"]


def slice_offsets(n_slices: int, stride: int) -> list[int]:
    """Channel offsets along z: 3 slices at stride 2 give [-2, 0, 2]."""
    half = n_slices // 2
    return [stride * k for k in range(-half, half + 1)]


def build_train_transform(train: TrainConfig) -> A.Compose:
    """Augmentations on the canvas; masks follow every geometric step with nearest neighbour."""
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
                A.GridDistortion(num_steps=5, distort_limit=0.1, **border),
                A.ElasticTransform(alpha=1.0, sigma=50, **border),
            ],
            p=train.aug_distort,
        ),
        A.RandomBrightnessContrast(0.1, 0.1, p=train.aug_brightness),
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
        item: dict[str, Any] = {
            "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
            "id": slice_id,
            "orig_hw": torch.tensor(self.hw[index]),
            "index": index,
        }
        if mask is not None:
            item["mask"] = torch.from_numpy(np.ascontiguousarray(mask.transpose(2, 0, 1))).float()
        return item
