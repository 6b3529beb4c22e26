"""A 2.5D run's folds as one predictor: sigmoid probabilities averaged over folds and flip TTA
on the model's canvas, each slice taken back to its own H x W."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from gitract.config import Config, DataConfig
from gitract.data.cache import VolumeCache
from gitract.data.slices import SliceDataset
from gitract.errors import CheckpointError, ConfigError
from gitract.models.checkpoint import load_checkpoint
from gitract.models.smp2d import load_model_from_checkpoint

__all__ = ["FLIP_DIMS", "INPUT_KEYS", "Ensemble", "predict_slices"]

# The input settings every model of an ensemble must share: they decide what a sample is.
INPUT_KEYS = ("n_slices", "slice_stride", "img_size", "resize_mode", "z_channel")
# TTA views: the tensor dimensions each flip reverses (on (N, C, H, W)).
FLIP_DIMS = {"hflip": (-1,), "vflip": (-2,)}


@dataclass
class Ensemble:
    """Models of one recipe's folds; ``predict`` averages their sigmoid outputs over TTA."""

    models: list[nn.Module]
    configs: list[Config]
    device: torch.device
    tta_flips: tuple[str, ...] = ()
    amp: bool = False
    channels_last: bool = False

    def __post_init__(self) -> None:
        self.tta_flips = tuple(self.tta_flips)
        unknown = [name for name in self.tta_flips if name not in FLIP_DIMS]
        if unknown:
            raise ConfigError(
                f"infer.tta_flips: unknown flip {unknown[0]!r}; expected some of {list(FLIP_DIMS)}"
            )
        if not self.models or len(self.models) != len(self.configs):
            raise CheckpointError(
                f"an ensemble needs at least one model and one config per model; got "
                f"{len(self.models)} models and {len(self.configs)} configs"
            )

    @classmethod
    def load(
        cls, paths: Sequence[Path], device: torch.device, tta_flips: Sequence[str] = ()
    ) -> Ensemble:
        """Each model is rebuilt from the config stored in its own checkpoint."""

        if not paths:
            raise CheckpointError("no checkpoints to ensemble")
        models, configs = [], []
        for path in paths:
            model, cfg = load_model_from_checkpoint(load_checkpoint(path), source=str(path))
            models.append(model.to(device).eval())
            configs.append(cfg)
        first = {k: getattr(configs[0].data, k) for k in INPUT_KEYS}
        for path, cfg in zip(paths, configs, strict=True):
            other = {k: getattr(cfg.data, k) for k in INPUT_KEYS}
            if other != first:
                raise CheckpointError(
                    f"{path}: input settings {other} differ from {paths[0]}'s {first}; "
                    "ensemble only folds of one recipe"
                )
        on_cuda = device.type == "cuda"
        channels_last = on_cuda and configs[0].train.channels_last
        if channels_last:
            models = [m.to(memory_format=torch.channels_last) for m in models]
        amp = on_cuda and configs[0].train.amp
        return cls(models, configs, device, tuple(tta_flips), amp, channels_last)

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
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        images = images.to(self.device, non_blocking=True, memory_format=memory_format)
        views = [()] + [FLIP_DIMS[name] for name in self.tta_flips]
        batch = torch.cat([images.flip(flip) if flip else images for flip in views])
        batch = batch.contiguous(memory_format=memory_format)
        total, presence, with_presence = None, None, 0
        for model in self.models:
            with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
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
