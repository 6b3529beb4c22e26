"""The 2.5D kind (``model.kind: 2.5d``): smp networks on a stack of neighbouring slices.

A run's folds predict as one :class:`Ensemble`: sigmoid probabilities averaged over folds and
flip TTA on the model's canvas, each slice taken back to its own H x W
(:func:`predict_slices`), grouped into case-days by :class:`Predictor2D`.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from gitract.config import Config, DataConfig
from gitract.data.cache import VolumeCache
from gitract.data.layout import CLASSES
from gitract.data.slices import SliceDataset, build_train_transform
from gitract.errors import CheckpointError
from gitract.models.kind import DayPrediction, ForwardPlan, ModelKind, flip_views
from gitract.models.precision import Precision
from gitract.models.smp2d import build_model, without_dropped

__all__ = ["KIND_2D", "Ensemble", "Kind2D", "Predictor2D", "predict_slices"]


@dataclass
class Ensemble:
    """Models of one recipe's folds; ``predict`` averages their sigmoid outputs over TTA, in
    ``precision`` (default: float32, contiguous)."""

    models: list[nn.Module]
    configs: list[Config]
    device: torch.device
    tta_flips: tuple[str, ...] = ()
    precision: Precision | None = None

    def __post_init__(self) -> None:
        self.tta_flips = tuple(self.tta_flips)
        self.views = flip_views(self.tta_flips)
        if not self.models or len(self.models) != len(self.configs):
            raise CheckpointError(
                f"an ensemble needs at least one model and one config per model; got "
                f"{len(self.models)} models and {len(self.configs)} configs"
            )
        if self.precision is None:
            self.precision = Precision(self.device)

    @classmethod
    def load(
        cls, paths: Sequence[Path], device: torch.device, tta_flips: Sequence[str] = ()
    ) -> Ensemble:
        """Each model is rebuilt from the config stored in its own checkpoint, in the run's
        precision."""
        models, cfg, precision = KIND_2D.load_folds(paths, device)
        return cls(models, [cfg] * len(models), device, tuple(tta_flips), precision)

    @property
    def data_config(self) -> DataConfig:
        return self.configs[0].data

    @torch.inference_mode()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Mean sigmoid probability over models and views (identity plus each flip, each
        flipped back), as float32 (N, 3, H, W) on the ensemble's device.

        The views go through each model as one batch: one forward pass per model, which keeps
        a GPU busier than a pass per view (and costs the views' activations in memory)."""
        return self.predict_with_presence(images)[0]

    @torch.inference_mode()
    def predict_with_presence(
        self, images: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`predict`, plus the per-slice organ presence probability (N, 3) of the models
        built with an aux head (``model.aux_head``: they return ``(mask_logits,
        presence_logits)``), averaged over those models and the views; None when none has one."""
        precision, views = self.precision, self.views
        assert precision is not None  # set by __post_init__
        images = precision.to_input(images)
        batch = torch.cat([images.flip(flip) if flip else images for flip in views])
        batch = batch.contiguous(memory_format=precision.memory_format)
        total, presence, with_presence = None, None, 0
        for model in self.models:
            with precision.autocast():
                output = model(batch)
            logits = output
            if isinstance(output, (tuple, list)):
                logits = output[0]
                if len(output) > 1 and output[1] is not None:
                    # A flip leaves "is the organ on this slice" unchanged: mean of the views.
                    views_presence = torch.sigmoid(output[1].float()).chunk(len(views))
                    mean = torch.stack(views_presence).mean(0)
                    presence = mean if presence is None else presence + mean
                    with_presence += 1
            for flip, probs in zip(
                views, torch.sigmoid(logits.float()).chunk(len(views)), strict=True
            ):
                probs = probs.flip(flip) if flip else probs
                total = probs if total is None else total + probs
        mean_presence = None if presence is None else presence / with_presence
        return total / (len(self.models) * len(views)), mean_presence


def predict_slices(
    ensemble: Ensemble,
    table: pd.DataFrame,
    cache: VolumeCache,
    batch_size: int,
    num_workers: int = 0,
    progress: bool = True,
) -> Iterator[tuple[str, np.ndarray, np.ndarray | None]]:
    """Yield ``(id, probabilities, presence)`` for every slice of ``table`` in its order, batch
    by batch: float32 (3, H, W) at the slice's own size, and the aux head's float32 (3,)
    presence probability or None (:meth:`Ensemble.predict_with_presence`)."""

    dataset = SliceDataset(table, cache, ensemble.data_config)
    loader = DataLoader(
        dataset,
        batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=ensemble.device.type == "cuda",
    )
    for batch in tqdm(loader, desc="predict", unit="batch", disable=not progress):
        probs, presence = ensemble.predict_with_presence(batch["image"])
        probs = probs.cpu().numpy()
        presence = None if presence is None else presence.cpu().numpy()
        for k, index in enumerate(batch["index"].tolist()):
            slice_presence = None if presence is None else presence[k]
            yield dataset.ids[index], dataset.letterbox(index).invert(probs[k]), slice_presence


@dataclass
class Predictor2D:
    """A 2.5D run's :class:`Ensemble`, its slice batches grouped into case-days."""

    ensemble: Ensemble
    batch_size: int = 32
    num_workers: int = 0

    def days(
        self, table: pd.DataFrame, cache: VolumeCache, progress: bool = True
    ) -> Iterator[DayPrediction]:
        day_of = dict(zip(table["id"], table["case_day"], strict=True))
        stream = predict_slices(
            self.ensemble, table, cache, self.batch_size, self.num_workers, progress
        )
        for case_day, group in itertools.groupby(stream, key=lambda item: day_of[item[0]]):
            ids, probs, presence = zip(*group, strict=True)
            stacked = None if presence[0] is None else np.stack(presence).astype(np.float32)
            yield DayPrediction(case_day, list(ids), np.stack(probs), stacked)


class Kind2D(ModelKind):
    """2.5D: one slice and its neighbours as channels, any smp architecture and encoder."""

    name = "2.5d"
    spatial_dims = 2
    slice_wise = True
    input_keys = ("n_slices", "slice_stride", "img_size", "resize_mode", "z_channel")

    def in_channels(self, cfg: Config) -> int:
        return cfg.data.in_channels

    def build(self, cfg: Config, pretrained: bool = True) -> nn.Module:
        model_cfg = cfg.model
        if not pretrained:
            model_cfg = model_cfg.model_copy(update={"encoder_weights": None})
        return build_model(model_cfg, in_channels=cfg.data.in_channels, classes=len(CLASSES))

    def describe(self, cfg: Config) -> str:
        return f"{cfg.model.arch}/{cfg.model.encoder_name}"

    def fit_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> dict:
        # smp-hub files and checkpoints of undropped encoders hold the dropped modules' weights.
        return without_dropped(model, state)

    def train_table(self, cfg: Config, table: pd.DataFrame) -> pd.DataFrame:
        if cfg.data.train_slices == "positive":  # only slices where some organ is drawn
            return table[(table[list(CLASSES)] != "").any(axis=1)]
        return table

    def train_dataset(self, cfg: Config, table: pd.DataFrame, cache: VolumeCache) -> Dataset:
        # data.train_crop: training items are random windows of the canvas; validation and
        # prediction (predict_slices) build their datasets without it, on the whole canvas.
        transform = build_train_transform(cfg.train, cfg.data.train_crop)
        return SliceDataset(table, cache, cfg.data, transform)

    def predictor(
        self, models: Sequence[nn.Module], cfg: Config, precision: Precision, *,
        batch_size: int | None = None, num_workers: int = 0,
    ) -> Predictor2D:  # fmt: skip
        ensemble = Ensemble(
            list(models), [cfg] * len(models), precision.device, tuple(cfg.infer.tta_flips),
            precision,
        )  # fmt: skip
        return Predictor2D(ensemble, batch_size or cfg.infer.batch_size, num_workers)

    def forward_plan(self, cfg: Config, slices: int, case_days: int) -> ForwardPlan:
        shape = (1, cfg.data.in_channels, *(int(s) for s in cfg.data.img_size))
        return ForwardPlan(shape, slices, "slices", self.describe(cfg))


KIND_2D = Kind2D()
