"""Case-days resampled once to the 3D grid: the same voxels the per-patch resize gave."""

from __future__ import annotations

import glob
import os

import numpy as np

from gitract.config import DataConfig
from gitract.data.cache import VolumeCache
from gitract.data.grid import GridVolumes, unpack
from gitract.data.layout import load_train_table
from gitract.data.patches import PatchDataset, case_day_ids, load_volume


def test_grid_volumes_hold_the_resized_image_and_masks(make_tiny_kaggle) -> None:
    kaggle = make_tiny_kaggle("grid", layout=[(1, 0, 6, 360, 310), (2, 1, 5, 266, 266)])
    table = load_train_table(kaggle.root)
    cache = VolumeCache(table, progress=False)
    ids = case_day_ids(table)
    grid = GridVolumes(cache, ids, (40, 48), progress=False)
    whole = slice(None)
    for case_day, slice_ids in ids.items():
        image, mask = load_volume(cache, slice_ids, (40, 48), with_mask=True)
        stored = grid.image(case_day, whole, whole, whole)
        assert stored.dtype == np.float32 and stored.shape == image.shape
        assert np.abs(stored - image).max() < 1e-3  # float16 on disk, values in [0, 1]
        assert np.array_equal(unpack(grid.flags(case_day, whole, whole, whole)), mask)
        # A block is the same voxels as the whole volume cropped.
        block = grid.image(case_day, slice(1, 4), slice(5, 20), slice(8, 40))
        assert np.array_equal(block, stored[1:4, 5:20, 8:40])

    # Built once: a second object reads the same files, and a new grid gets its own entries.
    files = sorted(glob.glob(str(cache.cache_dir / "*.grid40x48.*")))
    assert len(files) == 3 * len(ids)
    mtimes = [os.stat(f).st_mtime_ns for f in files]
    GridVolumes(cache, ids, (40, 48), progress=False)
    assert [os.stat(f).st_mtime_ns for f in files] == mtimes
    GridVolumes(cache, ids, (32, 32), progress=False)
    assert len(glob.glob(str(cache.cache_dir / "*.grid32x32.*"))) == 3 * len(ids)


def test_patches_are_cut_from_the_grid_volumes(make_tiny_kaggle) -> None:
    """Every validation patch is a block of the resized case-day (image within float16's
    rounding, masks exactly)."""
    kaggle = make_tiny_kaggle("grid_patch", layout=[(1, 0, 6, 360, 310)])
    table = load_train_table(kaggle.root)
    cache = VolumeCache(table, progress=False)
    cfg = DataConfig().model_copy(update={"grid_hw": [32, 40], "patch_size": [4, 16, 16]})
    ds = PatchDataset(table, cache, cfg, patches_per_volume=6, train=False)
    image, mask = load_volume(cache, case_day_ids(table)["case1_day0"], (32, 40), True)
    for index in range(len(ds)):
        item = ds[index]
        patch, patch_mask = item["image"][0].numpy(), item["mask"].numpy()
        found = [
            (z, y, x)
            for z in range(6 - 4 + 1)
            for y in range(32 - 16 + 1)
            for x in range(40 - 16 + 1)
            if np.array_equal(mask[:, z : z + 4, y : y + 16, x : x + 16], patch_mask)
            and np.abs(image[z : z + 4, y : y + 16, x : x + 16] - patch).max() < 1e-3
        ]
        assert found, index
