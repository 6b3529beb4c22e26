"""Training one fold: ``train_one_epoch`` / ``validate`` return metric dicts, ``fit`` drives them.

``fit`` writes ``<out_dir>/<config name>/fold<N>/``: ``best.pt`` (best validation score, or mean
Dice with ``train.select_by: dice``), ``last.pt`` (every epoch: the whole
:class:`~gitract.training.state.TrainState`, so ``resume`` continues where a killed run stopped),
``history.csv``, ``config.yaml``, ``curves.png`` and, when tensorboard is installed, ``tb/``.
Under torchrun it trains with DistributedDataParallel and only rank 0 writes.

A non-finite step (an fp16 overflow, a bad batch) is skipped, not fatal: the flag is all-reduced
so every rank skips the same step, and the run stops with a clear error only after
``train.max_bad_steps`` of them in a row. The loop reads nothing back from the device between
its progress updates: losses, flags and counters stay device tensors until then.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, get_worker_info
from tqdm.auto import tqdm

from gitract import __version__
from gitract.atomic import atomic_path
from gitract.config import Config, config_to_dict, save_config
from gitract.data.cache import VolumeCache
from gitract.data.folds import load_folds
from gitract.data.layout import CLASSES, load_train_table, resolve_data_dir
from gitract.data.slices import SliceDataset
from gitract.errors import CheckpointError, ConfigError, DataError, TrainingError
from gitract.models.checkpoint import load_checkpoint, save_checkpoint
from gitract.models.kinds import kind_of
from gitract.models.losses import build_loss
from gitract.models.precision import Precision
from gitract.scoring.metrics import SegMetricAccumulator, VolumeScoreAccumulator
from gitract.training.distributed import (
    DistContext,
    all_gather_objects,
    all_reduce_max,
    all_reduce_sum,
    barrier,
    cleanup_distributed,
    init_distributed,
    launch_env,
    resolve_num_workers,
)
from gitract.training.ema import ModelEma
from gitract.training.plots import plot_curves
from gitract.training.sampling import SeededItems, SeededSampler
from gitract.training.state import TrainState, capture_rng, check_resumable
from gitract.training.validation import VolumeScorer, shard_case_days

__all__ = [
    "Loop",
    "build_loop",
    "fit",
    "lr_at",
    "run_dir_for",
    "split_outputs",
    "train_one_epoch",
    "validate",
]

#: Optimizer steps between host reads of the running loss and the non-finite-step counters.
SYNC_EVERY = 10
# Fused AdamW has a CPU kernel from torch 2.4 (the declared floor is 2.3).
TORCH_VERSION = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])


def lr_at(step: int, total_steps: int, warmup_steps: int, lr: float, min_lr: float) -> float:
    """Linear warm-up from lr/100 to ``lr``, then cosine decay to ``min_lr`` at the last step.

    A pure function of the step, so resuming needs only the step number."""
    if step < warmup_steps:
        return lr * (0.01 + 0.99 * step / warmup_steps)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def run_dir_for(cfg: Config, fold: int, out_dir: str | Path | None = None) -> Path:
    """``<out_dir>/<config name>/fold<N>``; ``full`` for a model trained on every fold."""
    root = Path(out_dir if out_dir is not None else cfg.train.out_dir) / cfg.name
    return root / (f"fold{fold}" if fold >= 0 else "full")


@dataclass
class Loop:
    """What stays fixed while a run trains: the wrapped network and how each step runs."""

    cfg: Config
    ctx: DistContext
    net: nn.Module  # the network as called: DDP and/or torch.compile around TrainState.model
    loss_fn: nn.Module
    schedule: Callable[[int], float]
    precision: Precision
    progress: bool = True

    def to_device(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.precision.to_input(batch["image"])
        return image, batch["mask"].to(self.ctx.device, non_blocking=True)


def split_outputs(out: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(mask logits, presence logits or None): a network with a classification head
    (``model.aux_head``) returns both, one without returns the masks alone."""
    return (out[0], out[1]) if isinstance(out, (tuple, list)) else (out, None)


def _presence_target(mask: torch.Tensor) -> torch.Tensor:
    """(N, C) 1 where the class has a pixel on the slice."""
    return mask.amax(dim=(2, 3))


def _optimizer_step(state: TrainState, bad: torch.Tensor) -> None:
    """Step unless ``bad`` (a 0-dim device flag, equal on every rank) is set; no host sync.

    With fp16 the GradScaler finds the same inf/NaN in the unscaled gradients (DDP has made
    them equal on every rank) and skips; otherwise the fused AdamW takes the flag as its
    ``found_inf`` and skips on the device. A non-fused optimizer needs one host read."""
    optimizer = state.optimizer
    if state.scaler.is_enabled():
        state.scaler.step(optimizer)
        state.scaler.update()
    elif getattr(optimizer, "_step_supports_amp_scaling", False):
        optimizer.grad_scale, optimizer.found_inf = None, bad.float()
        try:
            optimizer.step()
        finally:
            del optimizer.grad_scale, optimizer.found_inf
    elif not bad.item():
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _micro_batches(loader: DataLoader, accumulate: int) -> Iterator[tuple[dict, bool, int]]:
    """``(batch, ends_step, group)``: every ``accumulate``-th batch, and the epoch's last, ends
    an optimizer step; ``group`` is the number of batches of this one's step (the epoch's last
    step may have fewer than ``accumulate``: its gradient is their mean all the same)."""
    n = len(loader)
    last_group = n % accumulate or accumulate
    for i, batch in enumerate(loader):
        group = accumulate if i < n - last_group else last_group
        yield batch, (i + 1) % accumulate == 0 or i + 1 == n, group


class _StatsGuard:
    """Keeps BatchNorm statistics and the weights' moving average finite.

    A NaN or inf in a forward pass (a bad input batch, an fp16 overflow) is written into the
    BatchNorm running statistics before its step is skipped; train-mode losses stay finite
    (they use batch statistics), so nothing else would notice until validation predicted
    nothing. At each progress update (no extra per-step host sync) the float buffers of the
    model and its EMA, and the EMA's weights, are checked on the device; finite ones are kept
    as the last good copy (buffers only: a few MB), non-finite ones are put back from it."""

    def __init__(self, state: TrainState) -> None:
        models = [state.model] + ([state.ema.module] if state.ema is not None else [])
        self.buffers = [b for m in models for b in m.buffers() if b.is_floating_point()]
        ema_weights = [] if state.ema is None else list(state.ema.module.parameters())
        self.watched = self.buffers + ema_weights
        self.good = [b.clone() for b in self.buffers]
        self.good_step = state.step

    def flag(self) -> torch.Tensor:
        """1.0 on the device when a watched tensor holds a NaN or inf, else 0.0."""
        if not self.watched:
            return torch.zeros(())
        norms = torch.stack(torch._foreach_norm([t.float() for t in self.watched]))
        return (~torch.isfinite(norms)).any().float()

    def keep(self, step: int) -> None:
        for good, buffer in zip(self.good, self.buffers, strict=True):
            good.copy_(buffer)
        self.good_step = step

    def restore(self) -> None:
        for good, buffer in zip(self.good, self.buffers, strict=True):
            buffer.copy_(good)


@dataclass
class _Tally:
    """An epoch's counts, kept on the device and read on the host only by :meth:`report`:
    ``sums`` is [loss x n, n] over finite batches; ``run`` and ``worst`` the current and longest
    stretch of non-finite steps; ``skipped`` all of them, of which ``reported`` were logged."""

    sums: torch.Tensor
    run: torch.Tensor
    worst: torch.Tensor
    skipped: torch.Tensor
    reported: int = 0

    @classmethod
    def zeros(cls, device: torch.device) -> _Tally:
        zero = torch.zeros((), device=device)
        sums = torch.zeros(2, dtype=torch.float64, device=device)
        return cls(sums, zero.clone(), zero.clone(), zero.clone())

    def add_batch(self, loss: torch.Tensor, n: int) -> None:
        finite = torch.isfinite(loss)
        self.sums += torch.stack([torch.where(finite, loss, 0.0) * n, finite * n]).double()

    def end_step(self, bad: torch.Tensor) -> None:
        self.run = (self.run + 1) * bad
        self.worst = torch.maximum(self.worst, self.run)
        self.skipped += bad

    def report(
        self, loop: Loop, state: TrainState, guard: _StatsGuard, bar: tqdm, epoch: int, lr: float
    ) -> None:
        """The loop's one host read: progress, newly skipped steps, the statistics' guard and
        the stop rule. The flags are equal on every rank, so every rank stops (or restores) at
        the same step and none is left waiting in a collective."""
        poisoned = all_reduce_max(guard.flag().to(self.worst.device), loop.ctx)
        loss_sum, n_good = self.sums.tolist()
        flags = torch.stack([self.worst, self.skipped, poisoned]).tolist()
        longest, total, bad_stats = (int(v) for v in flags)
        if bad_stats:
            guard.restore()
            if int(guard.flag().item()):
                raise TrainingError(
                    f"epoch {epoch}, by global step {state.step}: the weights' moving average "
                    "is not finite and cannot be put back; resume from last.pt with a lower "
                    "train.lr, train.grad_clip, or train.amp=false"
                )
            if loop.ctx.is_main:
                tqdm.write(
                    f"epoch {epoch}: non-finite BatchNorm statistics by global step "
                    f"{state.step} (a non-finite input batch, or an overflow in a forward pass);"
                    f" put back those of step {guard.good_step}"
                )
        else:
            guard.keep(state.step)
        if total > self.reported:
            state.skipped_steps += total - self.reported
            if loop.ctx.is_main:
                tqdm.write(
                    f"epoch {epoch}: skipped {total - self.reported} non-finite step(s) by "
                    f"global step {state.step} ({state.skipped_steps} in this run)"
                )
            self.reported = total
        limit = loop.cfg.train.max_bad_steps
        if longest >= limit:
            raise TrainingError(
                f"{longest} consecutive non-finite training steps in epoch {epoch} (by global "
                f"step {state.step}; train.max_bad_steps={limit}); try a lower train.lr, "
                "train.grad_clip, or train.amp=false"
            )
        if n_good:
            bar.set_postfix(loss=f"{loss_sum / n_good:.4f}", lr=f"{lr:.2e}", refresh=False)


def train_one_epoch(
    loop: Loop, state: TrainState, loader: DataLoader, epoch: int
) -> dict[str, float]:
    """One pass over ``loader``; returns train_loss (finite steps), lr (last), data_wait (share
    of the epoch spent waiting for batches) and skipped (non-finite steps skipped)."""
    cfg, ctx = loop.cfg.train, loop.ctx
    loop.net.train()
    tally = _Tally.zeros(ctx.device)
    guard = _StatsGuard(state)
    step_bad = torch.zeros((), device=ctx.device)  # 1.0 once a micro-batch of the step is bad
    lr = loop.schedule(state.step)
    wait = 0.0
    bar = tqdm(
        total=len(loader), desc=f"epoch {epoch} train", leave=False, disable=not loop.progress
    )
    started = tick = time.perf_counter()
    for batch, ends_step, group in _micro_batches(loader, cfg.accumulate):
        wait += time.perf_counter() - tick
        image, mask = loop.to_device(batch)
        # DDP all-reduces gradients on the micro-batch that ends a step, not on the others.
        no_sync = ctx.enabled and not ends_step
        with loop.net.no_sync() if no_sync else contextlib.nullcontext():
            with loop.precision.autocast():
                logits, presence = split_outputs(loop.net(image))
            loss = loop.loss_fn(logits.float(), mask)
            if presence is not None:
                target = _presence_target(mask)
                aux = F.binary_cross_entropy_with_logits(presence.float(), target)
                loss = loss + cfg.aux_weight * aux
            state.scaler.scale(loss / group).backward()
        step_bad = torch.maximum(step_bad, (~torch.isfinite(loss.detach())).float())
        tally.add_batch(loss.detach(), len(image))
        bar.update()
        if ends_step:
            lr = loop.schedule(state.step)
            for group in state.optimizer.param_groups:
                group["lr"] = lr
            state.scaler.unscale_(state.optimizer)
            norm = nn.utils.clip_grad_norm_(state.model.parameters(), cfg.grad_clip or math.inf)
            step_bad = all_reduce_max(torch.maximum(step_bad, (~torch.isfinite(norm)).float()), ctx)
            _optimizer_step(state, step_bad)
            state.step += 1
            if state.ema is not None:  # a skipped step leaves the average as it was
                state.ema.update(state.step, skipped=step_bad)
            tally.end_step(step_bad)
            step_bad = torch.zeros_like(step_bad)
            if state.step % SYNC_EVERY == 0:
                tally.report(loop, state, guard, bar, epoch, lr)
        tick = time.perf_counter()
    tally.report(loop, state, guard, bar, epoch, lr)
    bar.close()
    elapsed = time.perf_counter() - started
    loss_sum, n_good = all_reduce_sum(tally.sums.cpu(), ctx).tolist()
    timing = all_reduce_sum(torch.tensor([wait, elapsed], dtype=torch.float64), ctx).tolist()
    return {
        "train_loss": loss_sum / n_good if n_good else float("nan"),
        "lr": lr,
        "data_wait": timing[0] / max(timing[1], 1e-9),
        "skipped": tally.reported,
    }


@torch.inference_mode()
def validate(
    loop: Loop,
    loader: DataLoader,
    scorer: VolumeScorer | None = None,
    model: nn.Module | None = None,
) -> dict[str, float]:
    """Validation loss, per-image Dice/IoU (both empty counts as 1) and, with a ``scorer``, the
    competition score of the whole validation volumes; all summed over ranks. ``model``: the
    network to validate (the EMA's), else the loop's."""
    net = model if model is not None else loop.net
    net.eval()
    acc = SegMetricAccumulator(CLASSES, threshold=loop.cfg.train.threshold)
    if scorer is not None:
        scorer.reset()
    loss_sum, n_seen, score_seconds = 0.0, 0, 0.0
    presence_hits = torch.zeros(2, dtype=torch.float64, device=loop.ctx.device)  # [right, all]
    for batch in tqdm(loader, desc="validate", leave=False, disable=not loop.progress):
        image, mask = loop.to_device(batch)
        with loop.precision.autocast():
            logits, presence = split_outputs(net(image))
        logits = logits.float()
        if presence is not None:
            right = (presence.float() > 0) == (_presence_target(mask) > 0)
            presence_hits[0] += right.sum()
            presence_hits[1] += right.numel()
        loss_sum += loop.loss_fn(logits, mask).item() * image.shape[0]
        n_seen += image.shape[0]
        probs = torch.sigmoid(logits)
        acc.update(probs, mask)
        if scorer is not None:
            started = time.perf_counter()
            scorer.update(probs, batch["index"].tolist())
            score_seconds += time.perf_counter() - started
    acc.load_state(all_reduce_sum(acc.state(), loop.ctx))
    totals = all_reduce_sum(torch.tensor([loss_sum, n_seen], dtype=torch.float64), loop.ctx)
    metrics = {"val_loss": float(totals[0] / max(totals[1], 1))}
    metrics.update({f"val_{k}": v for k, v in acc.compute().items()})
    presence_hits = all_reduce_sum(presence_hits, loop.ctx).cpu()
    if presence_hits[1] > 0:
        metrics["val_presence_acc"] = float(presence_hits[0] / presence_hits[1])
    if scorer is not None:
        scorer.load_state(all_reduce_sum(scorer.state(), loop.ctx))
        result = scorer.compute()
        metrics["val_score"] = result["score"]
        metrics["val_hausdorff"] = result["hausdorff"]
        metrics["score_seconds"] = score_seconds
    return metrics


@torch.inference_mode()
def validate_volumes(
    loop: Loop, table: pd.DataFrame, cache: VolumeCache, model: nn.Module
) -> dict[str, float]:
    """Validation of whole case-days (``table``: this rank's, sorted by case, day, slice), each
    predicted by the kind's own predictor as at inference (a 3D model: sliding windows, flip
    TTA, back to the native size); loss, per-slice Dice/IoU and the competition score of the
    volumes, summed over ranks.

    The loss and Dice/IoU run where the probabilities are, on the model's device (a 144-slice
    case-day at native size is ~30M voxels over its 3 classes: ~1-2 s of CPU work). Only bool
    masks cross between host and device: the truth, read on the host, goes up; the thresholded
    prediction comes down for the 3D Hausdorff (scipy/OpenCV, on the host).

    The loss is that of the prediction scored, the flip-averaged probability at native size:
    a mean of sigmoids has no logit of its own, so the loss takes ``logit(p)`` with ``p``
    clamped to [1e-6, 1 - 1e-6], exact to float32 rounding except that a voxel's BCE is
    capped at -log(1e-6) = 13.8 (float32 sigmoids reach exactly 1). The network's logits
    before the flip mean and the resize would be exact, but the loss of another prediction."""
    cfg = loop.cfg
    device = loop.ctx.device
    model.eval()
    acc = SegMetricAccumulator(CLASSES, threshold=cfg.train.threshold)
    scorer = VolumeScoreAccumulator(cfg.train.select_metric)
    loss_sum, n_seen = 0.0, 0
    days = kind_of(cfg).validation_days([model], cfg, loop.precision, table, cache)
    n_days = table["case_day"].nunique()
    for day in tqdm(days, total=n_days, desc="validate", leave=False, disable=not loop.progress):
        probs = day.probs.to(device)  # float32 (D, C, H, W); already there, so no copy
        truth_host = np.stack([cache.mask(i).transpose(2, 0, 1) for i in day.ids]) != 0
        truth = torch.from_numpy(truth_host).to(device)
        pred = probs > cfg.train.threshold
        logits = torch.logit(probs, eps=1e-6)  # clamps to [eps, 1 - eps] in the same pass
        loss_sum += loop.loss_fn(logits, truth.float()).item() * len(day.ids)
        n_seen += len(day.ids)
        acc.update(pred, truth)  # bool masks: the same binarisation, not done twice
        scorer.add(pred.cpu().numpy(), truth_host)
    acc.load_state(all_reduce_sum(acc.state(), loop.ctx))
    scorer.load_state(all_reduce_sum(scorer.state(), loop.ctx))
    totals = all_reduce_sum(torch.tensor([loss_sum, n_seen], dtype=torch.float64), loop.ctx)
    metrics = {"val_loss": float(totals[0] / max(totals[1], 1))}
    metrics.update({f"val_{k}": v for k, v in acc.compute().items()})
    result = scorer.compute()
    metrics["val_score"], metrics["val_hausdorff"] = result["score"], result["hausdorff"]
    return metrics


def _seed_worker(worker_id: int) -> None:
    """Distinct, reproducible random streams per DataLoader worker (numpy and albumentations
    would otherwise repeat the parent's stream in every forked worker). The base seed comes
    from the rank's own torch stream, so ranks differ, also after a resume."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    info = get_worker_info()
    dataset = info.dataset if info else None
    if dataset is not None and getattr(dataset, "transform", None) is not None:
        dataset.transform.set_random_seed(seed)


def _split(table: pd.DataFrame, fold: int, folds_csv: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    if fold < 0:
        return table, table.iloc[:0]
    table = load_folds(folds_csv, table)
    known = [int(f) for f in sorted(table["fold"].unique())]
    if fold not in known:
        raise DataError(f"{folds_csv}: there is no fold {fold}; its folds are {known}")
    return table[table["fold"] != fold], table[table["fold"] == fold]


def _build_cache(table: pd.DataFrame, cache_dir: str | None, progress: bool) -> VolumeCache:
    """Every rank's cache, built before the process group exists, so no rank waits in a
    collective (NCCL's watchdog would kill it) while the ~8 GB real-data cache is written.

    Each process on a machine first builds its own share of the case-days, then opens the
    whole cache, building whatever another process has not finished yet (entries are written
    atomically, so two builders of one entry are harmless)."""
    _, _, local_rank, local_world = launch_env()
    if local_world > 1:
        days = sorted(table["case_day"].unique())
        share = table[table["case_day"].isin(days[local_rank::local_world])]
        VolumeCache(share, cache_dir, with_masks=True, progress=progress)
    return VolumeCache(table, cache_dir, with_masks=True, progress=progress)


@dataclass
class _Data:
    train_loader: DataLoader
    sampler: SeededSampler
    val_loader: DataLoader | None
    scorer: VolumeScorer | None
    val_volumes: pd.DataFrame | None  # whole case-days validated (this rank's), else None
    cache: VolumeCache
    n_train: int
    n_val: int


def _data(
    cfg: Config, train_df: pd.DataFrame, val_df: pd.DataFrame, cache: VolumeCache,
    ctx: DistContext,
) -> _Data:  # fmt: skip
    kind = kind_of(cfg)
    train_df = kind.train_table(cfg, train_df)
    train_ds = SeededItems(kind.train_dataset(cfg, train_df, cache))
    # A reproducible shuffle per epoch (set_epoch) and a seed per item (sampling.py): what an
    # epoch draws does not depend on what came before, which is what resuming relies on. The
    # same sampler serves the single-process case.
    sampler = SeededSampler(train_ds, cfg.train.seed, ctx.rank, ctx.world_size)
    _, _, _, local_world = launch_env()
    workers = resolve_num_workers(cfg.data.num_workers, local_world)
    common = {
        "num_workers": workers,
        "pin_memory": ctx.device.type == "cuda",
        "persistent_workers": workers > 0,
        "worker_init_fn": _seed_worker,
    }
    drop_last = len(train_ds) // ctx.world_size > cfg.train.batch_size
    # Its own generator: the workers' base seed is not drawn from the global torch stream,
    # whose state last.pt restores for the network's own draws (dropout, drop-path).
    loader_rng = torch.Generator().manual_seed(cfg.train.seed + ctx.rank)
    train_loader = DataLoader(
        train_ds, cfg.train.batch_size, sampler=sampler, drop_last=drop_last,
        generator=loader_rng, **common,
    )  # fmt: skip
    val_loader, scorer, volumes = None, None, None
    if len(val_df) and not kind.slice_wise:
        # Whole case-days, one at a time, predicted like at inference.
        volumes = shard_case_days(val_df, ctx.rank, ctx.world_size)
    elif len(val_df):
        # Each rank takes whole case-days, so each volume is scored where all its slices are;
        # the summed metrics count every validation slice exactly once.
        shard = shard_case_days(val_df, ctx.rank, ctx.world_size)
        val_ds = SliceDataset(shard, cache, cfg.data)
        val_loader = DataLoader(val_ds, cfg.train.batch_size * 2, shuffle=False, **common)
        if cfg.train.select_by == "score":
            profile, threshold = cfg.train.select_metric, cfg.train.threshold
            scorer = VolumeScorer(val_ds, shard, cache, profile, threshold)
    n_train = len(train_df)
    return _Data(train_loader, sampler, val_loader, scorer, volumes, cache, n_train, len(val_df))


def _optimizer(model: nn.Module, cfg: Config, device: torch.device) -> torch.optim.Optimizer:
    """AdamW, fused where the device has the kernel: one launch per step, and it can skip a
    non-finite step on the device (see _optimizer_step)."""
    fused = device.type == "cuda" or (device.type == "cpu" and TORCH_VERSION >= (2, 4))
    return torch.optim.AdamW(
        model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, fused=fused
    )


def _wrap(model: nn.Module, cfg: Config, ctx: DistContext) -> nn.Module:
    """The network as the loop calls it: DDP across ranks, then torch.compile if asked."""
    net = model
    if ctx.enabled:
        net = DistributedDataParallel(
            net, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None
        )
    if cfg.train.compile:
        net = torch.compile(net)
    return net


def _tensorboard(run_dir: Path) -> Any:
    """A SummaryWriter on ``run_dir/tb`` when tensorboard is installed, else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch raises it when the tensorboard package is missing
        return None
    return SummaryWriter(log_dir=str(run_dir / "tb"))


def fit(
    cfg: Config,
    fold: int,
    data_dir: str | Path | None = None,
    folds_csv: str | Path | None = None,
    out_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    fresh: bool = False,
) -> Path:
    """Train ``fold`` (validate on it, train on the others; ``-1``: train on everything) and
    return the run folder. A folder that already holds a trained model is continued with
    ``resume`` or replaced with ``fresh``; without either it is refused (:func:`check_run_dir`)."""
    run_dir = run_dir_for(cfg, fold, out_dir)
    check_run_dir(run_dir, resume, fresh)
    rank = launch_env()[0]
    data_dir = resolve_data_dir(data_dir, cfg.data.root)
    folds_csv = Path(folds_csv if folds_csv is not None else cfg.data.folds_csv)
    table = load_train_table(data_dir, cfg.data.exclude)
    train_df, val_df = _split(table, fold, folds_csv)
    cache = _build_cache(table, cfg.data.cache_dir, progress and rank == 0)
    ctx = init_distributed()
    try:
        return _fit(cfg, fold, run_dir, (train_df, val_df, cache),
                    resume, progress and ctx.is_main, ctx)  # fmt: skip
    finally:
        cleanup_distributed(ctx)


def check_run_dir(run_dir: Path, resume: bool, fresh: bool) -> None:
    """No training overwrites a trained model unless asked. ``resume`` needs ``last.pt`` when
    the folder holds ``best.pt`` or ``history.csv`` (retraining from scratch would replace
    them after one epoch); without ``resume`` a folder with a model is refused unless
    ``fresh``, which clears it first."""
    if resume and fresh:
        raise ConfigError("--resume continues a run, --fresh replaces it: give one of them")
    done = [name for name in ("best.pt", "last.pt", "history.csv") if (run_dir / name).exists()]
    if resume and done and "last.pt" not in done:
        raise CheckpointError(
            f"{run_dir / 'last.pt'}: not found, so --resume would train afresh and replace "
            f"{' and '.join(done)}; copy last.pt back, or train afresh with --fresh"
        )
    if not resume and not fresh and {"best.pt", "last.pt"} & set(done):
        raise CheckpointError(
            f"{run_dir}: holds a trained model ({', '.join(done)}); continue it with --resume, "
            "or replace it with --fresh"
        )
    if fresh and launch_env()[0] == 0:
        for name in done:
            (run_dir / name).unlink(missing_ok=True)


def build_loop(
    cfg: Config, ctx: DistContext, steps_per_epoch: int, *, pretrained: bool = True,
    progress: bool = True,
) -> tuple[Loop, TrainState]:  # fmt: skip
    """A run's loop and fresh state, as :func:`fit` trains them and ``scripts/gpu_check.py``
    times them: the kind's network in the run's precision, fused AdamW, the loss scaler, the
    EMA, the schedule over ``steps_per_epoch`` optimizer steps an epoch, DDP/compile.
    ``pretrained=False`` fetches no encoder weights (a resume loads them all from last.pt)."""
    kind = kind_of(cfg)
    precision = kind.precision(cfg, ctx.device)
    model = precision.to_model(kind.build(cfg, pretrained))
    ema = None
    if cfg.train.ema_decay is not None:
        # Built on the bare model before DDP wraps it; every rank averages the same weights.
        ema = ModelEma(model, cfg.train.ema_decay)
    state = TrainState(model, _optimizer(model, cfg, ctx.device), precision.scaler(), ema)
    total_steps = steps_per_epoch * cfg.train.epochs
    warmup_steps = int(steps_per_epoch * cfg.train.warmup_epochs)

    def schedule(step: int) -> float:
        return lr_at(step, total_steps, warmup_steps, cfg.train.lr, cfg.train.min_lr)

    net = _wrap(model, cfg, ctx)
    return Loop(cfg, ctx, net, build_loss(cfg.train), schedule, precision, progress), state


def _fit(
    cfg: Config, fold: int, run_dir: Path, split: tuple[pd.DataFrame, pd.DataFrame, VolumeCache],
    resume: bool, progress: bool, ctx: DistContext,
) -> Path:  # fmt: skip
    torch.manual_seed(cfg.train.seed + ctx.rank)
    random.seed(cfg.train.seed + ctx.rank)
    if ctx.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # one fixed canvas: the tuned kernels are reused
    data = _data(cfg, *split, ctx)

    last_path = run_dir / "last.pt"
    ckpt = load_checkpoint(last_path) if resume and last_path.exists() else None
    if ckpt is not None:
        check_resumable(ckpt["config"], cfg, last_path)
    steps_per_epoch = math.ceil(len(data.train_loader) / cfg.train.accumulate)
    loop, state = build_loop(cfg, ctx, steps_per_epoch, pretrained=ckpt is None, progress=progress)

    out = _RunFiles(run_dir, fold, loop.precision.record())
    if ckpt is not None:
        state.restore(ckpt, ctx.rank, ctx.world_size, cfg.train.seed)
        if (run_dir / "history.csv").exists():
            old = pd.read_csv(run_dir / "history.csv")
            out.history = old[old["epoch"] <= state.epoch].to_dict("records")
        if ctx.is_main:
            print(f"resuming {run_dir} after epoch {state.epoch} (best {state.best:.4f})")
            for note in state.notes:
                print(f"note: {note}")
    elif resume and ctx.is_main:
        print(f"nothing to resume in {run_dir}: starting from scratch")

    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        out.writer = _tensorboard(run_dir)
        print(
            f"training {cfg.name} fold {fold} on {ctx.device} x{ctx.world_size}: "
            f"{data.n_train} train / {data.n_val} val slices, {steps_per_epoch} steps/epoch"
        )
    try:
        for epoch in range(state.epoch + 1, cfg.train.epochs + 1):
            _epoch(loop, state, data, epoch, out)
    finally:
        if out.writer is not None:
            out.writer.close()
    return run_dir


@dataclass
class _RunFiles:
    """What rank 0 writes for a fold: its folder, the epochs' rows and a TensorBoard writer."""

    run_dir: Path
    fold: int
    precision: dict[str, Any]  # what ran (Precision.record), for the checkpoints' metadata
    history: list[dict[str, Any]] = field(default_factory=list)
    writer: Any = None  # a SummaryWriter when tensorboard is installed

    def write(
        self, cfg: Config, state: TrainState, improved: bool, row: dict[str, Any], rng: list
    ) -> None:
        """The files after an epoch. last.pt is written last: a run killed before it resumes
        from the previous epoch and simply redoes this one (history.csv's extra row is
        dropped on resume), and once last.pt names an epoch, best.pt and history.csv have it."""
        meta = {
            "fold": self.fold,
            "epoch": state.epoch,
            "val_dice": float(row.get("val_dice", float("nan"))),
            "val_score": float(row.get("val_score", float("nan"))),
            "select_by": cfg.train.select_by,
            "classes": list(CLASSES),
            "in_channels": kind_of(cfg).in_channels(cfg),
            "kind": cfg.model.kind,
            "precision": self.precision,
            "gitract_version": __version__,
            "torch_version": str(torch.__version__),  # a str subclass: not weights_only-safe
        }
        config = config_to_dict(cfg)
        last = state.checkpoint(config, meta, rng)
        if improved:  # the validated weights: the EMA's when there is one
            best = {"model": last.get("ema", last["model"]), "config": config, "meta": meta}
            save_checkpoint(best, self.run_dir / "best.pt")
        frame = pd.DataFrame(self.history)
        with atomic_path(self.run_dir / "history.csv") as tmp:
            frame.to_csv(tmp, index=False, float_format="%.6g")
        if "val_loss" in frame:
            plot_curves(frame, self.run_dir / "curves.png")
        if self.writer is not None:
            for name, number in row.items():
                if name != "epoch" and isinstance(number, (int, float)):
                    self.writer.add_scalar(name, number, state.epoch)
            self.writer.flush()
        save_checkpoint(last, self.run_dir / "last.pt")


def _epoch(loop: Loop, state: TrainState, data: _Data, epoch: int, out: _RunFiles) -> None:
    """Train, validate, select, and (rank 0) write one epoch's outputs."""
    started = time.perf_counter()
    data.sampler.set_epoch(epoch)
    row: dict[str, Any] = {"epoch": epoch}
    row.update(train_one_epoch(loop, state, data.train_loader, epoch))
    train_cfg = loop.cfg.train
    has_validation = data.val_loader is not None or data.val_volumes is not None
    validating = has_validation and (epoch % train_cfg.val_every == 0 or epoch == train_cfg.epochs)
    if validating and data.val_loader is not None:
        row.update(validate(loop, data.val_loader, data.scorer, state.eval_model))
    elif validating:
        row.update(validate_volumes(loop, data.val_volumes, data.cache, state.eval_model))
    row["seconds"] = time.perf_counter() - started
    out.history.append(row)
    key = "val_score" if loop.cfg.train.select_by == "score" else "val_dice"
    if not has_validation:
        improved = True  # no validation set (fold -1): the latest weights are the best we know
    elif not validating:
        improved = False  # train.val_every: not this epoch
    else:
        value = float(row[key])
        if not math.isfinite(value) or not math.isfinite(row["val_loss"]):
            raise TrainingError(
                f"epoch {epoch}: validation gave {key} {value:g}, val_loss "
                f"{row['val_loss']:g} (non-finite weights or statistics); best.pt is kept as "
                "it was; try a lower train.lr, train.grad_clip, or train.amp=false"
            )
        improved = value > state.best
        if improved:
            state.best = value
    state.epoch = epoch
    rng = all_gather_objects(capture_rng(), loop.ctx)  # every rank's own streams
    if loop.ctx.is_main:
        out.write(loop.cfg, state, improved, row, rng)
        print(_epoch_line(row, loop.cfg.train.epochs, improved))
    barrier(loop.ctx)


def _epoch_line(row: dict[str, Any], epochs: int, improved: bool) -> str:
    text = f"epoch {row['epoch']}/{epochs}  train_loss {row['train_loss']:.4f}"
    if "val_loss" in row:
        text += f"  val_loss {row['val_loss']:.4f}  val_dice {row['val_dice']:.4f}"
        text += f"  val_iou {row['val_iou']:.4f}"
    if "val_score" in row:
        text += f"  val_score {row['val_score']:.4f}"
    if row.get("skipped"):
        text += f"  skipped {row['skipped']}"
    text += f"  lr {row['lr']:.2e}  {row['seconds']:.1f}s"
    return text + ("  *best*" if improved else "")
