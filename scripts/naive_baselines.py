"""Straightforward baselines that ``scripts/benchmark.py`` measures gitract against.

They are what a first notebook would write: an RLE decoder that loops over the runs in Python,
a loader that reads the three PNGs of every 2.5D sample from disk and decodes its masks on the
fly, a 3D patch that resizes every slice it spans, and a Hausdorff distance from pairwise point
distances. They are correct (the benchmark
checks that they agree with gitract) but are only the benchmark's yardstick: they live beside it
in scripts/, outside the gitract package and so outside the wheel shipped to Kaggle.
"""

from __future__ import annotations

import math
from typing import Any

import albumentations as A
import cv2
import numpy as np
import pandas as pd
import torch
from scipy.spatial.distance import directed_hausdorff
from torch.utils.data import Dataset

from gitract.config import DataConfig
from gitract.data.geometry import Letterbox
from gitract.data.layout import CLASSES
from gitract.data.patches import PatchDataset, load_volume
from gitract.data.slices import slice_offsets


def naive_rle_decode(rle: str, shape: tuple[int, int]) -> np.ndarray:
    """Decode a row-major, 1-indexed RLE string with one Python iteration per run."""
    height, width = shape
    mask = np.zeros(height * width, dtype=np.uint8)
    tokens = str(rle).split() if isinstance(rle, str) else []
    for start, length in zip(tokens[0::2], tokens[1::2], strict=True):
        begin = int(start) - 1
        mask[begin : begin + int(length)] = 1
    return mask.reshape(height, width)


class NaiveSliceDataset(Dataset):
    """The same 2.5D samples as :class:`gitract.data.slices.SliceDataset`, the naive way.

    Every item reads its ``n_slices`` PNGs with ``cv2.imread`` (neighbours clamped at the
    case-day's ends), scales them by the stack's own min and max (a naive loader has no
    per-volume statistics), decodes the three RLE strings, letterboxes and augments exactly as
    SliceDataset does. ``table`` is a slice table with the RLE columns (``load_train_table``).
    """

    def __init__(self, table: pd.DataFrame, data: DataConfig, transform: A.Compose | None = None):
        table = table.sort_values(["case_day", "slice"]).reset_index(drop=True)
        self.rows = table.to_dict("records")
        self.offsets = slice_offsets(data.n_slices, data.slice_stride)
        self.target_hw = (int(data.img_size[0]), int(data.img_size[1]))
        self.resize_mode = data.resize_mode
        self.transform = transform
        # Rows are sorted by case-day then slice, so the groups come in row order.
        self.neighbours: list[list[int]] = []
        for indices in table.groupby("case_day", sort=False).indices.values():
            last = len(indices) - 1
            for z in range(len(indices)):
                self.neighbours.append(
                    [int(indices[min(max(z + k, 0), last)]) for k in self.offsets]
                )

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.rows[index]
        hw = (int(row["height"]), int(row["width"]))
        planes = [
            cv2.imread(self.rows[k]["path"], cv2.IMREAD_UNCHANGED) for k in self.neighbours[index]
        ]
        stack = np.stack(planes, axis=-1).astype(np.float32)
        low, high = float(stack.min()), float(stack.max())
        stack = (stack - low) / max(high - low, 1.0)
        mask = np.stack([naive_rle_decode(row[name], hw) for name in CLASSES], axis=-1)
        box = Letterbox.fit(hw, self.target_hw, self.resize_mode)
        image, mask = box.apply(stack), box.apply(mask, nearest=True)
        if self.transform is not None:
            out = self.transform(image=image, mask=mask)
            image, mask = out["image"], out["mask"]
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
            "mask": torch.from_numpy(np.ascontiguousarray(mask.transpose(2, 0, 1))).float(),
            "id": row["id"],
        }


def naive_hausdorff_3d(pred: np.ndarray, truth: np.ndarray) -> float | None:
    """The competition's normalised 3D Hausdorff distance from pairwise point distances.

    Voxel (z, y, x) sits at (z / D, y / H, x / W); the symmetric distance is the larger of
    scipy's two directed distances, divided by sqrt(3). None when both masks are empty (the
    competition skips such volumes), 1.0 when exactly one is.
    """
    scale = 1.0 / np.asarray(pred.shape, dtype=np.float64)
    a = np.argwhere(pred) * scale
    b = np.argwhere(truth) * scale
    if len(a) == 0 and len(b) == 0:
        return None
    if len(a) == 0 or len(b) == 0:
        return 1.0
    forward = directed_hausdorff(a, b, seed=0)[0]
    backward = directed_hausdorff(b, a, seed=0)[0]
    return max(forward, backward) / math.sqrt(3.0)


class NaivePatchDataset(PatchDataset):
    """3D patches as gitract cut them before the grid volumes: every slice the patch spans
    resized whole to the grid and its masks unpacked to float, then the patch cropped. The
    same random draws as :class:`PatchDataset`, so both give the same patches."""

    def __getitem__(self, index: int) -> dict[str, Any]:
        volume = index // self.patches_per_volume
        rng = self.rng if self.train else np.random.default_rng((self.seed, index))
        ids, organ_z = self.ids[volume], self.organ_z[volume]
        (pd_, ph, pw), depth = self.patch, len(ids)
        on_organ = len(organ_z) > 0 and rng.random() < self.fg_fraction
        z_centre = int(rng.choice(organ_z)) if on_organ else None
        z0 = self._start(rng, depth, pd_, z_centre)
        image, mask = load_volume(self.cache, ids[z0 : z0 + pd_], self.grid, with_mask=True)
        centre: tuple[int | None, int | None] = (None, None)
        if z_centre is not None:
            ys, xs = np.nonzero(mask[:, z_centre - z0].any(axis=0))
            if len(ys):
                k = int(rng.integers(len(ys)))
                centre = (int(ys[k]), int(xs[k]))
        y0 = self._start(rng, self.grid[0], ph, centre[0])
        x0 = self._start(rng, self.grid[1], pw, centre[1])
        image = image[:, y0 : y0 + ph, x0 : x0 + pw]
        mask = mask[:, :, y0 : y0 + ph, x0 : x0 + pw]
        if len(image) < pd_:
            before = int(rng.integers(0, pd_ - len(image) + 1)) if self.train else 0
            after = pd_ - len(image) - before
            image = np.pad(image, ((before, after), (0, 0), (0, 0)))
            mask = np.pad(mask, ((0, 0), (before, after), (0, 0), (0, 0)))
        if self.train and rng.random() < self.hflip:
            image, mask = image[..., ::-1], mask[..., ::-1]
        if self.train and rng.random() < self.vflip:
            image, mask = image[..., ::-1, :], mask[..., ::-1, :]
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image[None])),
            "mask": torch.from_numpy(np.ascontiguousarray(mask)),
            "case_day": self.case_days[volume],
        }
