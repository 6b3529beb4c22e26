"""Case-day volumes on a fixed in-plane grid, and random 3D training patches cut from them.

The 3D network sees a case-day as one (D, gH, gW) volume: every slice, in slice order, resized
from its native H x W (266x266, 310x360, ...) to the grid ``data.grid_hw``, with the same
per-case-day intensity normalisation as the 2.5D samples (:class:`~gitract.data.cache.VolumeCache`).
Resizing to one grid (rather than padding) lets all case-days share one patch size and puts the
organs at similar pixel scales; :func:`gitract.models.kind3d.predict_volume3d` resizes back.

Training patches are cut from the case-days resampled once to the grid
(:class:`~gitract.data.grid.GridVolumes`, on disk beside the volume cache): an item reads only
its own voxels, nothing is held in RAM between items and the dataset pickles to DataLoader
workers as metadata. With ``fg_fraction`` of the patches centred on an organ voxel, the
network sees the organs more often than uniform positions (about half of a volume's slices
show no organ) would give it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from gitract.config import DataConfig
from gitract.data.cache import VolumeCache
from gitract.data.grid import GridVolumes, resize_plane, unpack
from gitract.data.layout import CLASSES
from gitract.errors import DataError

__all__ = ["PatchDataset", "case_day_ids", "load_volume"]


def load_volume(
    cache: VolumeCache, ids: list[str], grid_hw: tuple[int, int], with_mask: bool
) -> tuple[np.ndarray, np.ndarray | None]:
    """One case-day (its slice ids in slice order) from the volume cache, resampled in-plane to
    ``grid_hw``: image float32 (D, gH, gW) normalised like the 2.5D samples, and the mask as
    float32 (3, D, gH, gW) of 0/1 (nearest neighbour), or None without ``with_mask``.

    ``ids`` may be any run of a case-day's slices (a patch reads only its own)."""
    grid_hw = (int(grid_hw[0]), int(grid_hw[1]))
    image = np.empty((len(ids), *grid_hw), dtype=np.float32)
    mask = np.empty((len(CLASSES), len(ids), *grid_hw), dtype=np.float32) if with_mask else None
    for z, slice_id in enumerate(ids):
        plane = cache.image_stack(slice_id, [0])[..., 0]
        image[z] = resize_plane(plane, grid_hw, nearest=False)
        if mask is not None:
            flags = resize_plane(cache.mask(slice_id), grid_hw, nearest=True)
            mask[:, z] = flags.transpose(2, 0, 1)
    return image, mask


def case_day_ids(table: pd.DataFrame) -> dict[str, list[str]]:
    """case_day -> its slice ids in slice order (case-days sorted by name)."""
    ordered = table.sort_values(["case_day", "slice"])
    return {cd: group["id"].tolist() for cd, group in ordered.groupby("case_day", sort=True)}


class PatchDataset(Dataset):
    """Random 3D patches for training: item ``{"image": (1, pD, pH, pW) float32,
    "mask": (3, pD, pH, pW) float32, "case_day": str}``.

    ``len`` is ``n_case_days * patches_per_volume``; item ``i`` is a patch of case-day
    ``i // patches_per_volume``. Volumes shorter than ``pD`` are zero-padded along z (at a
    random depth in training, at the end otherwise). With ``train``, a fraction ``fg_fraction``
    of the patches is centred on a random organ voxel of a random organ slice (the rest lie
    uniformly at random), and the patch is flipped left-right with probability ``hflip``
    (anatomically plausible for bowel loops); ``vflip`` (anterior-posterior) defaults to 0,
    since the anatomy is not symmetric that way, and no flip along z is offered at all (the
    stomach lies above the bowel). Without ``train``, each index gives the same patch every
    time (seeded by ``seed`` and the index) and nothing is flipped.

    Random state: ``transform`` is the dataset itself, so the engine's
    ``dataset.transform.set_random_seed(seed)`` (in each DataLoader worker and at set-up) reseeds
    the dataset's own numpy generator.
    """

    def __init__(
        self,
        table: pd.DataFrame,
        cache: VolumeCache,
        data_cfg: DataConfig,
        patches_per_volume: int = 4,
        train: bool = True,
        seed: int = 0,
        *,
        fg_fraction: float = 0.5,
        hflip: float = 0.5,
        vflip: float = 0.0,
        progress: bool = False,
    ) -> None:
        if not cache.with_masks:
            raise DataError("PatchDataset: the volume cache was built without masks")
        if patches_per_volume < 1:
            raise ValueError(f"patches_per_volume must be >= 1, got {patches_per_volume}")
        # The config checked them (gitract.config: the patch fits in the grid).
        self.patch = tuple(int(s) for s in data_cfg.patch_size)
        self.grid = (int(data_cfg.grid_hw[0]), int(data_cfg.grid_hw[1]))
        self.cache = cache
        self.patches_per_volume = patches_per_volume
        self.train = train
        self.seed = seed
        self.fg_fraction = fg_fraction
        self.hflip = hflip
        self.vflip = vflip
        volumes = case_day_ids(table)
        self.case_days = list(volumes)
        self.ids = [volumes[cd] for cd in self.case_days]
        self.volumes = GridVolumes(cache, volumes, self.grid, progress)
        # Positions of the slices with any organ, from the RLE columns (no image read needed).
        organ = table.set_index("id")[list(CLASSES)].ne("").any(axis=1)
        self.organ_z = [np.flatnonzero(organ.loc[ids].to_numpy()) for ids in self.ids]
        self.transform = self
        self.set_random_seed(seed)

    def set_random_seed(self, seed: int) -> None:
        """Reseed the generator of patch positions and flips (training items)."""
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.ids) * self.patches_per_volume

    def _start(self, rng: np.random.Generator, size: int, length: int, centre: int | None) -> int:
        """Start of a window of ``length`` in ``size``: around ``centre`` or uniform."""
        last = max(size - length, 0)
        if centre is None:
            return int(rng.integers(0, last + 1))
        return int(np.clip(centre - length // 2, 0, last))

    def __getitem__(self, index: int) -> dict[str, Any]:
        volume = index // self.patches_per_volume
        rng = self.rng if self.train else np.random.default_rng((self.seed, index))
        ids, organ_z = self.ids[volume], self.organ_z[volume]
        (pd_, ph, pw), depth = self.patch, len(ids)
        on_organ = len(organ_z) > 0 and rng.random() < self.fg_fraction
        z_centre = int(rng.choice(organ_z)) if on_organ else None
        z0 = self._start(rng, depth, pd_, z_centre)
        case_day, depth_window = self.case_days[volume], slice(z0, z0 + pd_)
        centre: tuple[int | None, int | None] = (None, None)
        if z_centre is not None:
            whole = slice(None)
            ys, xs = np.nonzero(self.volumes.flags(case_day, z_centre, whole, whole))
            if len(ys):  # the organ may vanish in the resize (a few pixels): then uniform
                k = int(rng.integers(len(ys)))
                centre = (int(ys[k]), int(xs[k]))
        y0 = self._start(rng, self.grid[0], ph, centre[0])
        x0 = self._start(rng, self.grid[1], pw, centre[1])
        window = (depth_window, slice(y0, y0 + ph), slice(x0, x0 + pw))
        image = self.volumes.image(case_day, *window)
        mask = unpack(self.volumes.flags(case_day, *window))
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
