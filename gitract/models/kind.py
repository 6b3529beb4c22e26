"""What every model kind (2.5D smp, 3D MONAI, ...) provides: the one interface the training
loop, inference, the blend and the Kaggle estimate call instead of switching on
``model.kind``. A kind is one module implementing :class:`ModelKind` and one line in
:data:`gitract.models.kinds.KINDS`."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import Dataset

from gitract.config import Config, config_from_dict
from gitract.data.cache import VolumeCache
from gitract.errors import CheckpointError, ConfigError
from gitract.models.checkpoint import load_checkpoint, state_mismatch, strip_prefix
from gitract.models.precision import Precision

__all__ = [
    "FLIP_DIMS",
    "DayPrediction",
    "DeviceDayPrediction",
    "ForwardPlan",
    "ModelKind",
    "Predictor",
    "flip_views",
]

#: Flip TTA views: the dimensions each flip reverses, the same on (N, C, H, W) and
#: (N, C, D, H, W): hflip flips W (left-right), vflip flips H.
FLIP_DIMS: dict[str, tuple[int, ...]] = {"hflip": (-1,), "vflip": (-2,)}


def flip_views(tta_flips: Sequence[str]) -> list[tuple[int, ...]]:
    """The identity plus the views of ``tta_flips``, as the dimensions each reverses."""
    unknown = [name for name in tta_flips if name not in FLIP_DIMS]
    if unknown:
        raise ConfigError(
            f"infer.tta_flips: unknown flip {unknown[0]!r}; expected some of {list(FLIP_DIMS)}"
        )
    return [()] + [FLIP_DIMS[name] for name in tta_flips]


@dataclass
class DayPrediction:
    """One case-day: slice ids in slice order, float32 (D, 3, H, W) probabilities at the
    slices' own size, and the per-slice presence probability (D, 3) or None."""

    case_day: str
    ids: list[str]
    probs: np.ndarray
    presence: np.ndarray | None = None


@dataclass
class DeviceDayPrediction:
    """One case-day as whole-volume validation scores it: slice ids in slice order and float32
    (D, 3, H, W) probabilities at the slices' own size, left on the device that predicted them
    (a ~120 MB volume need not go to the host and back to be scored there)."""

    case_day: str
    ids: list[str]
    probs: torch.Tensor


class Predictor(Protocol):
    """One run's folds predicting the slices of a table (sorted by case, day, slice): one
    :class:`DayPrediction` per case-day, in that order."""

    def days(
        self, table: pd.DataFrame, cache: VolumeCache, progress: bool = True
    ) -> Iterator[DayPrediction]: ...


@dataclass(frozen=True)
class ForwardPlan:
    """The forward passes a kind runs over a test set, for the FLOP estimate: the input of one
    pass (batch 1), passes per TTA view, what a pass covers, and the network's name."""

    input_shape: tuple[int, ...]
    passes: int
    unit: str
    label: str


class ModelKind(ABC):
    """A family of networks and how it is trained, validated and predicted."""

    name: ClassVar[str]  # the ``model.kind`` value
    spatial_dims: ClassVar[int]  # 2 or 3: what memory format the policy may use
    # One forward pass per slice (True): validation scores slice batches on the canvas and the
    # runtime estimate times slices. Else (a volume model) validation predicts whole case-days
    # as inference does.
    slice_wise: ClassVar[bool]
    # The data settings that decide what a sample is: every fold of a run must share them.
    input_keys: ClassVar[tuple[str, ...]]
    # Packages beyond the 2.5D stack an offline Kaggle kernel must install for this kind.
    extra_wheels: ClassVar[tuple[str, ...]] = ()

    def precision(self, cfg: Config, device: torch.device, training: bool = True) -> Precision:
        """The run's precision policy on ``device``."""
        return Precision.build(cfg.train, device, self.spatial_dims, training=training)

    @abstractmethod
    def in_channels(self, cfg: Config) -> int:
        """The network's input channels."""

    @abstractmethod
    def build(self, cfg: Config, pretrained: bool = True) -> nn.Module:
        """The network of ``cfg``; without ``pretrained`` nothing is downloaded or read
        (weights come from a checkpoint, or speed is all that is measured)."""

    @abstractmethod
    def describe(self, cfg: Config) -> str:
        """The network in a few words (``Unet/efficientnet-b7``), for messages and reports."""

    def fit_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> dict:
        """A checkpoint's state dict adapted to ``model`` before the strict load (as is)."""
        return state

    def load(self, ckpt: Mapping[str, Any], source: str = "checkpoint") -> tuple[nn.Module, Config]:
        """The network rebuilt from ``ckpt["config"]`` (nothing downloaded: the checkpoint has
        every weight), ``ckpt["model"]`` loaded strictly, in eval mode, and that config.
        ``source`` (usually the file's path) is what the CheckpointErrors name."""
        where = f"checkpoint {source}" if source != "checkpoint" else "checkpoint"
        for key in ("config", "model"):
            if key not in ckpt:
                raise CheckpointError(
                    f"{where}: no '{key}' entry (keys: {', '.join(map(str, ckpt))})"
                )
        try:
            cfg = config_from_dict(ckpt["config"], source=f"{where} config")
        except ConfigError as e:
            raise CheckpointError(str(e)) from e
        if not isinstance(ckpt["model"], Mapping):
            raise CheckpointError(f"{where}: 'model' is not a state dict")
        try:
            model = self.build(cfg, pretrained=False)
        except ConfigError as e:
            raise CheckpointError(f"{where}: {e}") from e
        state = self.fit_state(model, strip_prefix(ckpt["model"]))
        problem = state_mismatch(model, state)
        if problem:
            raise CheckpointError(
                f"{where}: weights do not match its config ({self.describe(cfg)}): {problem}"
            )
        model.load_state_dict(state, strict=True)
        return model.eval(), cfg

    def train_table(self, cfg: Config, table: pd.DataFrame) -> pd.DataFrame:
        """The slices of ``table`` a run trains on (all of them, unless the kind selects)."""
        return table

    @abstractmethod
    def train_dataset(self, cfg: Config, table: pd.DataFrame, cache: VolumeCache) -> Dataset:
        """The training samples of ``table`` (a :meth:`train_table`; items ``{"image", "mask",
        ...}``); its
        ``transform.set_random_seed`` reseeds the augmentations."""

    @abstractmethod
    def predictor(
        self, models: Sequence[nn.Module], cfg: Config, precision: Precision, *,
        batch_size: int | None = None, num_workers: int = 0,
    ) -> Predictor:  # fmt: skip
        """``models`` (one run's folds, of ``cfg``'s recipe) as one predictor of case-days at
        native size: the mean over folds and ``cfg.infer.tta_flips``."""

    def validation_days(
        self, models: Sequence[nn.Module], cfg: Config, precision: Precision,
        table: pd.DataFrame, cache: VolumeCache,
    ) -> Iterator[DeviceDayPrediction]:  # fmt: skip
        """The case-days of ``table`` predicted exactly as :meth:`predictor`'s ``days`` predicts
        them, each as a tensor on ``precision.device``: what whole-volume validation scores.

        This default moves each day's numpy probabilities to the device once; a kind whose
        predictor already holds them there overrides it to skip the trip through the host."""
        device = precision.device
        for day in self.predictor(models, cfg, precision).days(table, cache, progress=False):
            yield DeviceDayPrediction(day.case_day, day.ids, torch.from_numpy(day.probs).to(device))

    @abstractmethod
    def forward_plan(self, cfg: Config, slices: int, case_days: int) -> ForwardPlan:
        """The forward passes over a test of ``slices`` slices in ``case_days`` case-days."""

    def load_folds(
        self, paths: Sequence[Path], device: torch.device
    ) -> tuple[list[nn.Module], Config, Precision]:
        """Each fold rebuilt from its own checkpoint, on ``device`` in the run's own precision
        (its note, if any, printed once); the first fold's config. The folds must share
        :attr:`input_keys`."""
        if not paths:
            raise CheckpointError("no checkpoints to ensemble")
        ckpts = [load_checkpoint(path) for path in paths]
        # Every fold's kind, from its own metadata, before any network is built (a B7 takes a
        # minute to build only to find that its weights belong to a 3D network).
        kinds = [_kind_in(ckpt) for ckpt in ckpts]
        for path, kind in zip(paths, kinds, strict=True):
            if kind is not None and kind != self.name:
                others = sorted({k for k in kinds if k is not None} - {kind})
                run = f"this run's {paths[0].parent.name} is {self.name}"
                mixed = f"; the run folder mixes kinds ({', '.join([kind, *others])})"
                raise CheckpointError(
                    f"{path} is a {kind} checkpoint; {run}" + (mixed if others else "")
                )
        models, configs = [], []
        for path, ckpt in zip(paths, ckpts, strict=True):
            model, cfg = self.load(ckpt, source=str(path))
            models.append(model)
            configs.append(cfg)
        first = {k: getattr(configs[0].data, k) for k in self.input_keys}
        for path, cfg in zip(paths, configs, strict=True):
            other = {k: getattr(cfg.data, k) for k in self.input_keys}
            if other != first:
                raise CheckpointError(
                    f"{path}: input settings {other} differ from {paths[0]}'s {first}; "
                    "ensemble only folds of one recipe"
                )
        precision = self.precision(configs[0], device, training=False)
        if precision.note:
            print(f"note: {precision.note}")
        return [precision.to_model(m).eval() for m in models], configs[0], precision

    def load_predictor(
        self, paths: Sequence[Path], device: torch.device, num_workers: int = 0
    ) -> Predictor:
        """The folds of ``paths`` as one :class:`Predictor`, with the run's own config's TTA
        flips and batch size."""
        models, cfg, precision = self.load_folds(paths, device)
        return self.predictor(models, cfg, precision, num_workers=num_workers)


def _kind_in(ckpt: Mapping[str, Any]) -> str | None:
    """A checkpoint's model kind, from its metadata (else its config's model section)."""
    meta, config = ckpt.get("meta"), ckpt.get("config")
    if isinstance(meta, Mapping) and isinstance(meta.get("kind"), str):
        return meta["kind"]
    model = config.get("model") if isinstance(config, Mapping) else None
    kind = model.get("kind", "2.5d") if isinstance(model, Mapping) else None
    return kind if isinstance(kind, str) else None
