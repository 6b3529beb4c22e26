"""Case-days resampled once to the 3D grid, so a training patch is a plain read.

Cutting a 3D patch from the native-size cache means resizing every slice the patch spans
(80 of them for the GPU recipe) and unpacking their masks to float before cropping: 124-199 ms
per patch on one CPU core, fewer patches per second than a GPU consumes. Here each case-day is
resized once, beside its :class:`~gitract.data.cache.VolumeCache` entry (the same key, so a
changed source rebuilds it): the normalised image as float16 (its 11-bit mantissa is finer
than the resize's own error) and the class flags as one uint8 per voxel, resized with nearest
neighbour like the float masks were. A patch then reads only its own voxels.

Disk: ``D x gH x gW x 3`` bytes per case-day: ~4.6 GB for the 274 real case-days on a 256 x 256
grid, beside the ~3 GB of the native cache.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
from tqdm.auto import tqdm

from gitract.atomic import atomic_path, remove_stale_temps, write_text_atomic
from gitract.data.cache import VolumeCache, VolumeInfo, unpack_mask

__all__ = ["GridVolumes", "resize_plane", "unpack"]


def resize_plane(plane: np.ndarray, grid_hw: tuple[int, int], nearest: bool) -> np.ndarray:
    """One (H, W) or (H, W, C) plane to ``grid_hw``: area averaging when shrinking (no
    aliasing of the noise), bilinear when enlarging, nearest neighbour for masks and flags."""
    height, width = plane.shape[:2]
    if (height, width) == tuple(grid_hw):
        return plane
    if nearest:
        mode = cv2.INTER_NEAREST
    elif grid_hw[0] <= height and grid_hw[1] <= width:
        mode = cv2.INTER_AREA
    else:
        mode = cv2.INTER_LINEAR
    return cv2.resize(plane, (int(grid_hw[1]), int(grid_hw[0])), interpolation=mode)


class GridVolumes:
    """The case-days of ``cache`` (``ids``: case_day -> slice ids in slice order) on the grid
    ``grid_hw``, built on creation where missing. Pickles as paths (DataLoader workers)."""

    def __init__(
        self,
        cache: VolumeCache,
        ids: dict[str, list[str]],
        grid_hw: tuple[int, int],
        progress: bool = True,
    ) -> None:
        self.grid = (int(grid_hw[0]), int(grid_hw[1]))
        self.stems: dict[str, str] = {}  # case_day -> path of its files without the suffix
        bar = tqdm(ids.items(), desc="3D grid cache", unit="vol", disable=not progress, leave=False)
        for case_day, slice_ids in bar:
            info = cache.volumes[case_day]
            stem = f"{info.image_file.removesuffix('.npy')}.grid{self.grid[0]}x{self.grid[1]}"
            if not Path(f"{stem}.json").exists():
                _build(cache, info, slice_ids, self.grid, stem)
            self.stems[case_day] = stem

    def image(self, case_day: str, z: slice, y: slice, x: slice) -> np.ndarray:
        """float32 (z, y, x) block of the case-day's normalised image."""
        volume = np.load(f"{self.stems[case_day]}.npy", mmap_mode="r")
        return volume[z, y, x].astype(np.float32)

    def flags(self, case_day: str, z: slice | int, y: slice, x: slice) -> np.ndarray:
        """uint8 class flags (bit c: class c) of a block, or of one slice with an int ``z``."""
        volume = np.load(f"{self.stems[case_day]}.mask.npy", mmap_mode="r")
        return np.array(volume[z, y, x])


def _build(
    cache: VolumeCache,
    info: VolumeInfo,
    slice_ids: list[str],
    grid: tuple[int, int],
    stem: str,
) -> None:
    """Resize the case-day's slices and flags to ``grid`` into ``stem``'s two .npy files; the
    JSON, written last, marks the entry complete."""
    remove_stale_temps(Path(stem).parent, Path(stem).name)
    image = np.empty((len(slice_ids), *grid), dtype=np.float16)
    flags = np.empty((len(slice_ids), *grid), dtype=np.uint8)
    for z, slice_id in enumerate(slice_ids):
        plane = cache.image_stack(slice_id, [0])[..., 0]
        image[z] = resize_plane(plane, grid, nearest=False)
        _, position = cache.locate(slice_id)
        flags[z] = resize_plane(info.plane(position, mask=True), grid, nearest=True)
    for suffix, array in ((".npy", image), (".mask.npy", flags)):
        with atomic_path(Path(f"{stem}{suffix}")) as tmp, open(tmp, "wb") as handle:
            np.save(handle, array)
    write_text_atomic(Path(f"{stem}.json"), json.dumps({"depth": len(slice_ids)}))


def unpack(flags: np.ndarray) -> np.ndarray:
    """(3, *flags.shape) float32 0/1 masks from packed flags (channel c: bit c)."""
    return np.moveaxis(unpack_mask(flags), -1, 0).astype(np.float32)
