"""The 3D kind (``model.kind: 3d``): MONAI networks on whole case-day volumes.

Prediction of a case-day: the volume on the grid (:func:`gitract.data.patches.load_volume`) is
covered by windows of the training patch size (``monai.inferers.sliding_window_inference``,
Gaussian-weighted blending of the overlaps, so window borders, where the network saw the least
context, count least). The flip views go through as one batch per model, each flipped back
before averaging, and the mean probability is resized per slice from the grid to the slice's
own H x W (bilinear: the submission thresholds probabilities, not labels, so nothing is lost to
nearest-neighbour steps).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from gitract.config import Config, DataConfig, InferConfig
from gitract.data.cache import VolumeCache
from gitract.data.layout import CLASSES
from gitract.data.patches import PatchDataset, load_volume
from gitract.errors import DataError
from gitract.models.kind import (
    DayPrediction,
    DeviceDayPrediction,
    ForwardPlan,
    ModelKind,
    flip_views,
)
from gitract.models.monai3d import build_model3d
from gitract.models.precision import Precision

__all__ = ["KIND_3D", "PATCHES_PER_VOLUME", "Kind3D", "Predictor3D", "predict_volume3d",
           "predict_volume3d_tensor", "sliding_window_tiles"]  # fmt: skip

#: Random patches drawn from each training case-day per epoch.
PATCHES_PER_VOLUME = 4


def predict_volume3d(
    models: Sequence[nn.Module],
    image: np.ndarray,
    native_hw: tuple[int, int],
    data_cfg: DataConfig,
    infer_cfg: InferConfig,
    precision: Precision,
) -> np.ndarray:
    """(D, gH, gW) normalised image -> float32 (D, 3, H, W) numpy probabilities at
    ``native_hw``: :func:`predict_volume3d_tensor`'s, copied to the host."""
    probs = predict_volume3d_tensor(models, image, native_hw, data_cfg, infer_cfg, precision)
    return probs.cpu().numpy().astype(np.float32, copy=False)


@torch.inference_mode()
def predict_volume3d_tensor(
    models: Sequence[nn.Module],
    image: np.ndarray,
    native_hw: tuple[int, int],
    data_cfg: DataConfig,
    infer_cfg: InferConfig,
    precision: Precision,
) -> torch.Tensor:
    """(D, gH, gW) normalised image -> float32 (D, 3, H, W) probabilities at ``native_hw``, an
    inference-mode tensor on ``precision.device`` (validation scores it there).

    The mean of the sigmoid over ``models`` (used as they are: put them in eval mode first) and
    over the identity plus the views of ``infer_cfg.tta_flips``, each flipped back. Windows are
    ``data_cfg.patch_size`` (a volume smaller than a window is padded for the network and
    cropped back), overlapping by ``infer_cfg.sw_overlap``, ``infer_cfg.sw_batch_size`` per
    forward pass, on ``precision``'s device and in its autocast dtype.
    """
    from monai.inferers import sliding_window_inference  # MONAI imports slowly

    if not models:
        raise ValueError("predict_volume3d needs at least one model")
    if image.ndim != 3:
        raise ValueError(f"predict_volume3d needs a (D, H, W) image, got shape {image.shape}")
    views = flip_views(infer_cfg.tta_flips)
    volume = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
    volume = volume.to(precision.device)[None, None]
    batch = torch.cat([volume.flip(dims) if dims else volume for dims in views])
    total: torch.Tensor | None = None
    for model in models:

        def predictor(x: torch.Tensor, model: nn.Module = model) -> torch.Tensor:
            with precision.autocast():
                return model(x).float()

        logits = sliding_window_inference(
            batch,
            roi_size=[int(s) for s in data_cfg.patch_size],
            sw_batch_size=infer_cfg.sw_batch_size,
            predictor=predictor,
            overlap=infer_cfg.sw_overlap,
            mode="gaussian",
        )
        if hasattr(logits, "as_tensor"):  # a MONAI MetaTensor: keep the plain tensor
            logits = logits.as_tensor()
        probs = torch.sigmoid(logits.float())
        for dims, view in zip(views, probs, strict=True):
            view = view.flip(dims) if dims else view
            total = view if total is None else total + view
    assert total is not None
    mean = total / (len(models) * len(views))  # (3, D, gH, gW)
    slices = mean.permute(1, 0, 2, 3)  # (D, 3, gH, gW): each slice resized on its own
    if tuple(slices.shape[-2:]) != tuple(native_hw):
        size = (int(native_hw[0]), int(native_hw[1]))
        slices = F.interpolate(slices, size=size, mode="bilinear", align_corners=False)
    return slices.clamp_(0.0, 1.0)


@dataclass
class Predictor3D:
    """A 3D run: its folds' networks on whole case-day volumes (:func:`predict_volume3d`)."""

    models: list[nn.Module]
    config: Config
    precision: Precision

    def days(
        self, table: pd.DataFrame, cache: VolumeCache, progress: bool = True
    ) -> Iterator[DayPrediction]:
        """Each case-day of ``table`` (sorted by case, day, slice) as numpy probabilities."""
        for day in self.device_days(table, cache):
            probs = day.probs.cpu().numpy().astype(np.float32, copy=False)
            yield DayPrediction(day.case_day, day.ids, probs, None)

    def device_days(self, table: pd.DataFrame, cache: VolumeCache) -> Iterator[DeviceDayPrediction]:
        """Each case-day of ``table`` (sorted by case, day, slice) as probabilities left on the
        device (:func:`predict_volume3d_tensor`); a case-day's slices must share one size."""
        grid = (int(self.config.data.grid_hw[0]), int(self.config.data.grid_hw[1]))
        for case_day, rows in itertools.groupby(
            table[["id", "case_day", "height", "width"]].itertuples(index=False),
            key=lambda row: row.case_day,
        ):
            rows = list(rows)
            sizes = {(int(r.height), int(r.width)) for r in rows}
            if len(sizes) != 1:
                raise DataError(
                    f"{case_day}: slices of several sizes {sorted(sizes)}; a 3D member needs one"
                )
            ids = [r.id for r in rows]
            image, _ = load_volume(cache, ids, grid, with_mask=False)
            probs = predict_volume3d_tensor(
                self.models, image, sizes.pop(), self.config.data, self.config.infer,
                self.precision,
            )  # fmt: skip
            yield DeviceDayPrediction(case_day, ids, probs)


def sliding_window_tiles(shape: tuple[int, ...], patch: tuple[int, ...], overlap: float) -> int:
    """Windows MONAI's ``sliding_window_inference`` runs over a volume of ``shape``: per axis,
    a stride of ``int(patch * (1 - overlap))`` (at least 1; the whole patch where the axis
    equals it) and as many windows as it takes for the last to reach the end (one where the
    axis is no longer than the patch: the volume is padded)."""
    tiles = 1
    for size, roi in zip(shape, patch, strict=True):
        if size <= roi:
            continue
        stride = max(int(roi * (1 - overlap)), 1)
        tiles *= math.ceil((size - roi) / stride) + 1
    return tiles


class Kind3D(ModelKind):
    """3D: a MONAI SegResNet or UNet on (1, D, H, W) patches of case-days on the grid."""

    name = "3d"
    spatial_dims = 3
    slice_wise = False
    input_keys = ("grid_hw", "patch_size")
    extra_wheels = ("monai",)

    def in_channels(self, cfg: Config) -> int:
        return 1

    def build(self, cfg: Config, pretrained: bool = True) -> nn.Module:
        return build_model3d(cfg.model, classes=len(CLASSES))

    def describe(self, cfg: Config) -> str:
        return f"{cfg.model.arch} {cfg.model.init_filters} filters"

    def train_dataset(self, cfg: Config, table: pd.DataFrame, cache: VolumeCache) -> Dataset:
        return PatchDataset(
            table, cache, cfg.data, PATCHES_PER_VOLUME, train=True,
            hflip=cfg.train.aug_hflip, vflip=cfg.train.aug_vflip,
        )  # fmt: skip

    def predictor(
        self, models: Sequence[nn.Module], cfg: Config, precision: Precision, *,
        batch_size: int | None = None, num_workers: int = 0,
    ) -> Predictor3D:  # fmt: skip
        return Predictor3D(list(models), cfg, precision)

    def validation_days(
        self, models: Sequence[nn.Module], cfg: Config, precision: Precision,
        table: pd.DataFrame, cache: VolumeCache,
    ) -> Iterator[DeviceDayPrediction]:  # fmt: skip
        # The predictor's own tensors: the same values days() copies to the host.
        return Predictor3D(list(models), cfg, precision).device_days(table, cache)

    def forward_plan(self, cfg: Config, slices: int, case_days: int) -> ForwardPlan:
        patch = tuple(int(s) for s in cfg.data.patch_size)
        depth = math.ceil(slices / case_days)
        grid = (depth, int(cfg.data.grid_hw[0]), int(cfg.data.grid_hw[1]))
        passes = case_days * sliding_window_tiles(grid, patch, cfg.infer.sw_overlap)
        return ForwardPlan((1, 1, *patch), passes, "tiles", self.describe(cfg))


KIND_3D = Kind3D()
