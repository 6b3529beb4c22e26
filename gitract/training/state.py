"""A training run's state in one object, saved to ``last.pt`` and restored from it as a whole.

The network, its EMA, optimizer, AMP scaler, schedule position, best score so far and every
rank's random streams live here, so a feature that adds state adds a field and its lines in
:meth:`TrainState.checkpoint` / :meth:`TrainState.restore` instead of an argument to every
function of the loop.

Resuming is strict about the recipe: a changed ``train.epochs`` or ``train.batch_size`` would
silently put the saved step on another learning-rate schedule, so :func:`check_resumable` names
every key of the model, data and train sections that differs (paths, worker counts and cache
folders excepted).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gitract.config import Config, config_from_dict, config_to_dict
from gitract.errors import CheckpointError
from gitract.training.ema import ModelEma

__all__ = ["RESUME_FREE_KEYS", "TrainState", "capture_rng", "check_resumable", "restore_rng"]

#: Keys that may change between a run and its resume: where things are, how fast they load.
RESUME_FREE_KEYS = frozenset(
    {
        "data.root",
        "data.folds_csv",
        "data.num_workers",
        "data.cache_dir",
        "train.out_dir",
        "train.compile",
        "train.val_every",
    }
)


def _flat(cfg: dict[str, Any], sections: tuple[str, ...]) -> dict[str, Any]:
    return {f"{s}.{k}": v for s in sections for k, v in cfg[s].items()}


def check_resumable(saved: dict[str, Any], cfg: Config, source: Path) -> None:
    """CheckpointError naming every recipe key of ``cfg`` that differs from the checkpoint's.

    The saved config goes through :func:`config_from_dict` first, so a checkpoint written before
    a key existed compares as that key's default."""
    try:
        old = config_to_dict(config_from_dict(saved, source=f"{source} config"))
    except Exception as e:  # a checkpoint from an incompatible version
        raise CheckpointError(f"{source}: cannot read its config ({e})") from e
    sections = ("model", "data", "train")
    before, now = _flat(old, sections), _flat(config_to_dict(cfg), sections)
    changed = [k for k in now if k not in RESUME_FREE_KEYS and before.get(k) != now[k]]
    if changed:
        diffs = ", ".join(f"{k} {before.get(k)!r} -> {now[k]!r}" for k in changed)
        raise CheckpointError(
            f"{source}: cannot resume with a changed recipe ({diffs}); use the checkpoint's "
            f"values or train into a new --out-dir"
        )


def capture_rng() -> dict[str, Any]:
    """This process's random streams (torch CPU and CUDA, Python). Augmentations draw from
    generators seeded from these, so each rank must get its own back on resume."""
    # The current device's CUDA stream only: the one this rank draws from. Every visible
    # device's would not restore where fewer devices are visible (CUDA_VISIBLE_DEVICES=3).
    return {
        "torch": torch.get_rng_state(),
        "cuda": [torch.cuda.get_rng_state()] if torch.cuda.is_available() else [],
        "python": random.getstate(),
    }


def restore_rng(saved: list[dict[str, Any]], rank: int, world_size: int, reseed: int) -> str | None:
    """Restore rank ``rank``'s streams from a checkpoint's ``rng`` entry (one dict per rank).

    A checkpoint of another world size cannot give every rank its own streams: those ranks are
    seeded afresh with ``reseed + rank`` (distinct per rank) and a note saying so is returned."""
    states = saved
    if len(states) != world_size:
        torch.manual_seed(reseed + rank)
        random.seed(reseed + rank)
        return (
            f"random streams were saved by {len(states)} rank(s) and this run has {world_size}: "
            "each rank was seeded afresh"
        )
    state = states[rank]
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():  # the saving rank's device's stream
        torch.cuda.set_rng_state(state["cuda"][0])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    return None


@dataclass
class TrainState:
    """What ``last.pt`` holds: enough to continue a killed run exactly where it stopped."""

    model: nn.Module  # the bare network, never its DDP or torch.compile wrapper
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    ema: ModelEma | None = None  # moving average of the weights (train.ema_decay)
    epoch: int = 0  # last finished epoch
    step: int = 0  # optimizer steps taken: the learning-rate schedule's position
    best: float = -math.inf  # best value of the selection metric (train.select_by)
    skipped_steps: int = 0  # non-finite steps skipped so far
    notes: list[str] = field(default_factory=list)  # what restore had to adapt, for the log

    @property
    def eval_model(self) -> nn.Module:
        """The weights that are validated and go into best.pt: the EMA's when there is one."""
        return self.ema.module if self.ema is not None else self.model

    def checkpoint(
        self, config: dict[str, Any], meta: dict[str, Any], rng: list[dict[str, Any]]
    ) -> dict[str, Any]:
        """The ``last.pt`` dict (``weights_only``-loadable); ``rng`` has one entry per rank."""
        ema = {"ema": self.ema.module.state_dict()} if self.ema is not None else {}
        return {
            **ema,
            "model": self.model.state_dict(),
            "config": config,
            "meta": meta,
            "epoch": self.epoch,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "scheduler": {"step": self.step},
            "best": self.best,
            "skipped_steps": self.skipped_steps,
            "rng": rng,
        }

    def restore(self, ckpt: dict[str, Any], rank: int, world_size: int, seed: int) -> None:
        """Load ``ckpt`` (a ``last.pt`` of the same recipe) into this state, in place."""
        self.model.load_state_dict(ckpt["model"])
        if self.ema is not None:
            # A run that turned EMA on at resume starts its average from the current weights.
            self.ema.module.load_state_dict(ckpt.get("ema", ckpt["model"]))
        # The optimizer's settings (fused, foreach) are this run's: the checkpoint may come
        # from a version that built it differently, and only its state is wanted.
        settings = [
            {k: g[k] for k in ("fused", "foreach") if k in g} for g in self.optimizer.param_groups
        ]
        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except ValueError as e:  # e.g. written before unused encoder modules were dropped
            raise CheckpointError(
                f"last.pt: its optimizer state does not fit this model ({e}); it was written by "
                "another gitract version: start a new run (without --resume)"
            ) from e
        for group, own in zip(self.optimizer.param_groups, settings, strict=True):
            group.update(own)
        saved_scaler = ckpt.get("scaler") or {}
        if self.scaler.is_enabled() and saved_scaler:
            self.scaler.load_state_dict(saved_scaler)
        elif self.scaler.is_enabled():
            # Saved by a CPU or fp32/bf16 run: its (disabled) scaler had no state.
            self.notes.append("the checkpoint has no fp16 loss-scaler state: starting a fresh one")
        self.epoch = int(ckpt["epoch"])
        self.step = int(ckpt["scheduler"]["step"])
        self.best = float(ckpt["best"])
        self.skipped_steps = int(ckpt["skipped_steps"])
        note = restore_rng(ckpt["rng"], rank, world_size, reseed=seed + 1000 * self.epoch)
        if note:
            self.notes.append(note)
