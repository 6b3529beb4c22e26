"""Training one fold: ``train_one_epoch`` / ``evaluate`` return metric dicts, ``fit`` drives them.

``fit`` writes ``<out_dir>/<config name>/fold<N>/``: ``best.pt`` (best mean val Dice),
``last.pt`` (every epoch, with optimizer, AMP scaler, schedule position and RNG state, so
``resume`` continues where a killed run stopped), ``history.csv``, ``config.yaml`` and
``curves.png``. Under torchrun it trains with DistributedDataParallel and only rank 0 writes.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset, get_worker_info
from tqdm.auto import tqdm

from gitract import __version__
from gitract.atomic import atomic_path
from gitract.checkpoint import save_checkpoint
from gitract.config import Config, config_to_dict, save_config
from gitract.data import CLASSES, load_train_table, resolve_data_dir
from gitract.dataset import SliceDataset, build_train_transform
from gitract.distributed import (
    DistContext,
    all_reduce_sum,
    barrier,
    cleanup_distributed,
    init_distributed,
)
from gitract.errors import CheckpointError, DataError, TrainingError
from gitract.folds import load_folds
from gitract.losses import build_loss
from gitract.metrics import SegMetricAccumulator
from gitract.model import build_model, load_checkpoint
from gitract.plots import plot_curves
from gitract.volumes import VolumeCache

__all__ = ["evaluate", "fit", "lr_at", "run_dir_for", "train_one_epoch"]


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


def _autocast(ctx: DistContext, amp: bool) -> torch.autocast:
    # fp16 autocast on CUDA only: CPU autocast (bf16) is slower than fp32 on most CPUs.
    return torch.autocast(device_type=ctx.device.type, dtype=torch.float16, enabled=amp)


def _to_device(batch: dict[str, Any], ctx: DistContext, channels_last: bool) -> tuple:
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    image = batch["image"].to(ctx.device, non_blocking=True, memory_format=memory_format)
    mask = batch["mask"].to(ctx.device, non_blocking=True)
    return image, mask


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    ctx: DistContext,
    cfg: Config,
    epoch: int,
    start_step: int,
    schedule: Callable[[int], float],
    progress: bool = True,
) -> dict[str, float]:
    """One pass over ``loader``; returns train_loss, lr (last), data_wait (share of the epoch
    spent waiting for batches) and the global step reached."""
    model.train()
    amp = cfg.train.amp and ctx.device.type == "cuda"
    channels_last = cfg.train.channels_last and ctx.device.type == "cuda"
    loss_sum = torch.zeros((), dtype=torch.float64)
    n_seen = 0
    step = start_step
    wait = 0.0
    bar = tqdm(loader, desc=f"epoch {epoch} train", leave=False, disable=not progress)
    started = tick = time.perf_counter()
    for i, batch in enumerate(bar):
        wait += time.perf_counter() - tick
        image, mask = _to_device(batch, ctx, channels_last)
        lr = schedule(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with _autocast(ctx, amp):
            logits = model(image)
        loss = loss_fn(logits.float(), mask)
        if not torch.isfinite(loss):
            raise TrainingError(
                f"non-finite training loss ({loss.item()}) at epoch {epoch}, batch {i} "
                f"(global step {step}); try a lower train.lr, train.grad_clip, or train.amp=false"
            )
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if cfg.train.grad_clip:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        step += 1
        loss_sum += loss.detach().double().cpu() * image.shape[0]
        n_seen += image.shape[0]
        if progress and i % 10 == 0:
            bar.set_postfix(loss=f"{loss_sum.item() / n_seen:.4f}", lr=f"{lr:.2e}")
        tick = time.perf_counter()
    elapsed = time.perf_counter() - started
    totals = all_reduce_sum(torch.tensor([loss_sum.item(), n_seen, wait, elapsed]), ctx)
    return {
        "train_loss": float(totals[0] / max(totals[1], 1)),
        "lr": lr if n_seen else schedule(step),
        "data_wait": float(totals[2] / max(totals[3], 1e-9)),
        "step": step,
    }


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    loss_fn: nn.Module,
    ctx: DistContext,
    cfg: Config,
    progress: bool = True,
) -> dict[str, float]:
    """Validation loss and per-image Dice/IoU (both empty counts as 1), summed over ranks."""
    model.eval()
    amp = cfg.train.amp and ctx.device.type == "cuda"
    channels_last = cfg.train.channels_last and ctx.device.type == "cuda"
    acc = SegMetricAccumulator(CLASSES, threshold=cfg.train.threshold)
    loss_sum, n_seen = 0.0, 0
    for batch in tqdm(loader, desc="validate", leave=False, disable=not progress):
        image, mask = _to_device(batch, ctx, channels_last)
        with _autocast(ctx, amp):
            logits = model(image)
        logits = logits.float()
        loss_sum += loss_fn(logits, mask).item() * image.shape[0]
        n_seen += image.shape[0]
        acc.update(torch.sigmoid(logits), mask)
    acc.load_state(all_reduce_sum(acc.state(), ctx))
    totals = all_reduce_sum(torch.tensor([loss_sum, n_seen], dtype=torch.float64), ctx)
    metrics = {"val_loss": float(totals[0] / max(totals[1], 1))}
    metrics.update({f"val_{k}": v for k, v in acc.compute().items()})
    return metrics


def _seed_worker(worker_id: int) -> None:
    """Distinct, reproducible random streams per DataLoader worker (numpy and albumentations
    would otherwise repeat the parent's stream in every forked worker)."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    info = get_worker_info()
    dataset = info.dataset if info else None
    if isinstance(dataset, Subset):
        dataset = dataset.dataset
    if dataset is not None and getattr(dataset, "transform", None) is not None:
        dataset.transform.set_random_seed(seed)


def _rng_state() -> dict[str, Any]:
    # Augmentation randomness lives in the transforms' own generators, seeded per epoch and
    # worker; these are the process-wide streams (dropout, anything torch samples).
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def _split(table: pd.DataFrame, fold: int, folds_csv: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    if fold < 0:
        return table, table.iloc[:0]
    table = load_folds(folds_csv, table)
    known = sorted(table["fold"].unique())
    if fold not in known:
        raise DataError(f"{folds_csv}: there is no fold {fold}; its folds are {known}")
    return table[table["fold"] != fold], table[table["fold"] == fold]


def _loaders(
    cfg: Config, train_df: pd.DataFrame, val_df: pd.DataFrame, cache: VolumeCache, ctx: DistContext
) -> tuple[DataLoader, DataLoader | None, DistributedSampler]:
    train_ds = SliceDataset(train_df, cache, cfg.data, build_train_transform(cfg.train))
    train_ds.transform.set_random_seed(cfg.train.seed + ctx.rank)
    # DistributedSampler with an explicit rank also serves the single-process case: it gives
    # a reproducible shuffle per epoch (set_epoch), which is what resuming relies on.
    sampler = DistributedSampler(
        train_ds, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=cfg.train.seed
    )
    workers = cfg.data.num_workers
    common = {
        "num_workers": workers,
        "pin_memory": ctx.device.type == "cuda",
        "persistent_workers": workers > 0,
        "worker_init_fn": _seed_worker,
    }
    drop_last = len(train_ds) // ctx.world_size > cfg.train.batch_size
    train_loader = DataLoader(
        train_ds, cfg.train.batch_size, sampler=sampler, drop_last=drop_last, **common
    )
    val_loader = None
    if len(val_df):
        # Each rank takes every world_size-th slice, without the padding DistributedSampler
        # adds, so the summed metrics count every validation slice exactly once.
        val_ds = SliceDataset(val_df, cache, cfg.data)
        shard = Subset(val_ds, range(ctx.rank, len(val_ds), ctx.world_size))
        val_loader = DataLoader(shard, cfg.train.batch_size * 2, shuffle=False, **common)
    return train_loader, val_loader, sampler


def _model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    inner = model.module if isinstance(model, DistributedDataParallel) else model
    return inner.state_dict()


def fit(
    cfg: Config,
    fold: int,
    data_dir: str | Path | None = None,
    folds_csv: str | Path | None = None,
    out_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
) -> Path:
    """Train ``fold`` (validate on it, train on the others; ``-1``: train on everything) and
    return the run folder."""
    ctx = init_distributed()
    try:
        return _fit(cfg, fold, data_dir, folds_csv, out_dir, resume, progress, ctx)
    finally:
        cleanup_distributed(ctx)


def _fit(
    cfg: Config,
    fold: int,
    data_dir: str | Path | None,
    folds_csv: str | Path | None,
    out_dir: str | Path | None,
    resume: bool,
    progress: bool,
    ctx: DistContext,
) -> Path:
    progress = progress and ctx.is_main
    torch.manual_seed(cfg.train.seed + ctx.rank)
    random.seed(cfg.train.seed + ctx.rank)
    data_dir = resolve_data_dir(data_dir, cfg.data.root)
    folds_csv = Path(folds_csv if folds_csv is not None else cfg.data.folds_csv)
    run_dir = run_dir_for(cfg, fold, out_dir)

    table = load_train_table(data_dir, cfg.data.exclude)
    train_df, val_df = _split(table, fold, folds_csv)
    # Rank 0 builds the volume cache; the others wait, then find every entry already there.
    if ctx.is_main:
        cache = VolumeCache(table, cfg.data.cache_dir, with_masks=True, progress=progress)
    barrier(ctx)
    if not ctx.is_main:
        cache = VolumeCache(table, cfg.data.cache_dir, with_masks=True, progress=False)
    train_loader, val_loader, sampler = _loaders(cfg, train_df, val_df, cache, ctx)

    last_path = run_dir / "last.pt"
    ckpt = load_checkpoint(last_path) if resume and last_path.exists() else None
    # Resuming loads every weight from last.pt: no need to fetch pretrained encoder weights.
    model_cfg = replace(cfg.model, encoder_weights=None) if ckpt else cfg.model
    model = build_model(model_cfg, in_channels=cfg.data.n_slices, classes=len(CLASSES))
    model = model.to(ctx.device)
    if cfg.train.channels_last and ctx.device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay
    )
    scaler = torch.amp.GradScaler("cuda", enabled=cfg.train.amp and ctx.device.type == "cuda")
    loss_fn = build_loss(cfg.train)

    steps_per_epoch = len(train_loader)
    total_steps = steps_per_epoch * cfg.train.epochs
    warmup_steps = int(steps_per_epoch * cfg.train.warmup_epochs)

    def schedule(step: int) -> float:
        return lr_at(step, total_steps, warmup_steps, cfg.train.lr, cfg.train.min_lr)

    start_epoch, step, best_dice, history = 1, 0, -1.0, []
    if ckpt is not None:
        if ckpt["config"]["model"] != config_to_dict(cfg)["model"]:
            raise CheckpointError(
                f"{last_path}: its model config {ckpt['config']['model']} differs from this "
                f"run's {config_to_dict(cfg)['model']}; resume with the same config"
            )
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        start_epoch, step = ckpt["epoch"] + 1, ckpt["scheduler"]["step"]
        best_dice = ckpt["best_dice"]
        _set_rng_state(ckpt["rng"])
        if (run_dir / "history.csv").exists():
            old = pd.read_csv(run_dir / "history.csv")
            history = old[old["epoch"] < start_epoch].to_dict("records")
        if ctx.is_main:
            print(f"resuming {run_dir} after epoch {ckpt['epoch']} (best val Dice {best_dice:.4f})")
    elif resume and ctx.is_main:
        print(f"nothing to resume in {run_dir}: starting from scratch")

    if ctx.enabled:
        model = DistributedDataParallel(
            model, device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None
        )
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        print(
            f"training {cfg.name} fold {fold} on {ctx.device} x{ctx.world_size}: "
            f"{len(train_df)} train / {len(val_df)} val slices, {steps_per_epoch} steps/epoch"
        )

    for epoch in range(start_epoch, cfg.train.epochs + 1):
        started = time.perf_counter()
        sampler.set_epoch(epoch)
        row: dict[str, Any] = {"epoch": epoch}
        stats = train_one_epoch(
            model, train_loader, loss_fn, optimizer, scaler, ctx, cfg, epoch, step, schedule,
            progress,
        )  # fmt: skip
        step = stats.pop("step")
        row.update(stats)
        if val_loader is not None:
            row.update(evaluate(model, val_loader, loss_fn, ctx, cfg, progress))
        row["seconds"] = time.perf_counter() - started
        history.append(row)
        val_dice = row.get("val_dice", float("nan"))
        # With no validation set (fold -1) the latest weights are the best we know.
        improved = math.isnan(val_dice) or val_dice > best_dice
        if improved and not math.isnan(val_dice):
            best_dice = val_dice
        if ctx.is_main:
            _write_outputs(
                run_dir, cfg, fold, epoch, step, best_dice, improved, row, history, model,
                optimizer, scaler,
            )  # fmt: skip
            print(_epoch_line(row, cfg.train.epochs, improved))
        barrier(ctx)
    return run_dir


def _epoch_line(row: dict[str, Any], epochs: int, improved: bool) -> str:
    text = f"epoch {row['epoch']}/{epochs}  train_loss {row['train_loss']:.4f}"
    if "val_loss" in row:
        text += f"  val_loss {row['val_loss']:.4f}  val_dice {row['val_dice']:.4f}"
        text += f"  val_iou {row['val_iou']:.4f}"
    text += f"  lr {row['lr']:.2e}  {row['seconds']:.1f}s"
    return text + ("  *best*" if improved else "")


def _write_outputs(
    run_dir: Path,
    cfg: Config,
    fold: int,
    epoch: int,
    step: int,
    best_dice: float,
    improved: bool,
    row: dict[str, Any],
    history: list[dict[str, Any]],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
) -> None:
    """Rank 0's files after an epoch. best.pt is written before last.pt, so a run killed
    between the two resumes from the previous epoch and simply redoes this one."""
    weights = _model_state(model)
    meta = {
        "fold": fold,
        "epoch": epoch,
        "val_dice": float(row.get("val_dice", float("nan"))),
        "classes": list(CLASSES),
        "in_channels": cfg.data.n_slices,
        "gitract_version": __version__,
        "torch_version": str(torch.__version__),  # a str subclass: not weights_only-safe
    }
    config = config_to_dict(cfg)
    if improved:
        save_checkpoint({"model": weights, "config": config, "meta": meta}, run_dir / "best.pt")
    state = {
        "model": weights,
        "config": config,
        "meta": meta,
        "epoch": epoch,
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "scheduler": {"step": step},
        "best_dice": best_dice,
        "rng": _rng_state(),
    }
    save_checkpoint(state, run_dir / "last.pt")
    frame = pd.DataFrame(history)
    with atomic_path(run_dir / "history.csv") as tmp:
        frame.to_csv(tmp, index=False, float_format="%.6g")
    if "val_loss" in frame:
        plot_curves(frame, run_dir / "curves.png")
