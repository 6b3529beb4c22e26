"""The first-GPU acceptance run: one command, at most 9 minutes on one GPU, one JSON object out.

    python scripts/gpu_check.py [--device auto|cuda|cpu] [--budget 540] [--json FILE]
        [--stages NAME ...] [--stage-budget NAME=SECONDS ...] [--config C] [--config-3d C]
        [--set key=value ...] [--set-3d key=value ...] [--img-size H W]
        [--batch-sizes 16 32] [--batch-sizes-3d 2 4 8] [--steps N] [--volume D H W]
        [--compile-backend inductor] [--cases N] [--slices N]

It runs named stages, in this order, on a small synthetic data set made in a temp folder:

- ``environment``: torch, CUDA, cuDNN and NCCL versions, the GPUs (name, memory), bf16 support;
- ``fused_adamw``: the engine's own optimizer (fused AdamW) skips a step with an inf gradient,
  through the GradScaler (parameters unchanged, scale lowered) and through the ``found_inf``
  flag the engine passes without a scaler;
- ``recipe_fp16_nan_resume``: ``--config`` (default.yaml: B7, AMP) trained by the real
  ``gitract.training.engine.fit`` for 2 epochs in fp16 with a NaN loss injected into one batch,
  stopped after epoch 1 and resumed: it finishes, the NaN step is skipped, best.pt is finite;
- ``recipe_bf16``: the same in bf16 (skipped, with why, where the device has no bf16);
- ``b7_throughput``: training and flip-TTA inference images/s and peak GiB of ``--config``'s
  network per ``--batch-sizes`` (a size that runs out of memory is OOM), and whether batch 16
  at 320x384 fits in 16 GiB;
- ``recipe_3d``: ``--config-3d``'s network: step time and peak GiB per ``--batch-sizes-3d``,
  then two epochs through its real DataLoader: patches/s against ``data_wait`` (the share of the
  epoch the loop waited for batches, as the engine logs it);
- ``sliding_window``: seconds per case-day of the 3D predictor (``predict_volume3d``: sliding
  windows, flip TTA, back to the native size) on a synthetic case-day of ``--volume``;
- ``ddp``: one epoch of ``scripts/train.py`` under torchrun: NCCL across the GPUs when there are
  several, two gloo ranks sharing the GPU when there is one, two gloo ranks on the CPU;
- ``compile``: ``torch.compile`` of the 2.5D training step: compile seconds and the speed-up
  over eager, with whatever is left of the budget.

Each stage runs in a time box (``--stage-budget``, defaults in :data:`BUDGETS`, out of
``--budget`` seconds in all). A stage whose box no longer fits in what is left, or whose
prerequisites are missing, is ``{"status": "skipped", "why": ...}``; one that raises is
``{"status": "failed", "error": <one line>}``; one that runs past its box is stopped and is
``{"status": "timeout", "why": ...}`` with what it measured so far; the other stages run
either way. Progress goes to stderr, the report to stdout as its last line (one JSON object)
and, with ``--json``, to a file written atomically. Exit code 1 when a stage failed.

With no CUDA GPU and ``--device auto`` it says so in one line and exits 0; ``--device cpu``
runs every stage on the CPU (the tests do, at tiny sizes).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gitract.atomic import write_text_atomic
from gitract.cli import run_main
from gitract.config import Config, load_config
from gitract.errors import ConfigError
from gitract.models.kinds import kind_of
from gitract.models.precision import Precision

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CFG = ROOT / "configs" / "default.yaml"
DEFAULT_CFG_3D = ROOT / "configs" / "default_3d.yaml"
NO_GPU_LINE = "no CUDA GPU: nothing was measured (use --device cpu to run the check on the CPU)"
# The question b7_throughput answers too: does the default batch at the default size fit a
# 16 GB card (a Kaggle T4/P100)?
FIT_BATCH = 16
FIT_IMG_SIZE = (320, 384)
FIT_LIMIT_GIB = 16.0
GIB = 1024**3
# Distinct batches drawn per batch size; the timed steps cycle over them.
POOL_BATCHES = 4
#: The whole run's default time, in seconds: 9 minutes.
TOTAL_BUDGET = 540.0
#: Each stage's time box in seconds (None: whatever is left, at least COMPILE_MIN_S). They add
#: up to 405 s, which leaves compile at least 135 s, more when stages finish early.
BUDGETS: dict[str, float | None] = {
    "environment": 5,
    "fused_adamw": 10,
    "recipe_fp16_nan_resume": 70,
    "recipe_bf16": 60,
    "b7_throughput": 80,
    "recipe_3d": 70,
    "sliding_window": 40,
    "ddp": 70,
    "compile": None,
}
#: Below this many seconds left, compile is not started: a B7 compile takes a minute or more.
COMPILE_MIN_S = 60.0
#: The training loss (1-based, counting only losses computed with gradients) made NaN.
NAN_AT_LOSS = 1


class Skip(Exception):
    """A stage cannot run here (no CUDA, no bf16, one GPU, no torchrun): its message says why."""


class CheckFailed(Exception):
    """A stage ran and what it checks did not hold (a step not skipped, a non-finite best.pt)."""


class StageTimeout(BaseException):
    """A stage ran past its time box. A BaseException, so no ``except Exception`` inside the
    stage (the engine's, a library's) can swallow it."""


def require(condition: bool, message: str) -> None:
    """CheckFailed(message) unless ``condition``."""
    if not condition:
        raise CheckFailed(message)


# --------------------------------------------------------------------------- device and memory


def pick_device(name: str) -> torch.device | None:
    """The device to measure on; ``auto`` gives None when there is no CUDA GPU."""
    if name == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else None
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: torch sees no CUDA GPU here")
    try:
        return torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"--device {name}: not a torch device ({e})") from e


def _sync(device: torch.device) -> None:
    """Wait for queued GPU work, so the clock reads finished work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_memory(device: torch.device) -> None:
    """Free what earlier measurements left and start a new peak-memory count."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float | None:
    """Peak memory allocated by tensors since the last reset, in GiB; None off CUDA."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / GIB


def bf16_why_not(cfg: Config, device: torch.device) -> str | None:
    """None when a bf16 run of ``cfg`` can train on ``device``, else why not (the precision
    policy's own rule decides, not a second copy of it)."""
    train = cfg.train.model_copy(update={"amp": True, "amp_dtype": "bf16"})
    try:
        Precision.build(train, device)
    except ConfigError as e:
        return str(e)
    return None


# --------------------------------------------------------------------------- the run's context


@dataclass
class Check:
    """What every stage shares: the arguments, the device, a temp folder and the synthetic data
    (made on first use, so a run of a few stages pays only for what they need)."""

    args: argparse.Namespace
    device: torch.device
    work: Path
    _data_dir: Path | None = None
    _folds_csv: Path | None = None

    def cfg2d(self, *extra: str) -> Config:
        """``--config`` with ``--img-size``, ``--set`` and ``extra`` applied, random init,
        the volume cache in the temp folder."""
        size = self.args.img_size
        # A canvas of its own: a crop sized for the config's canvas may no longer fit in it.
        overrides = (
            [f"data.img_size=[{size[0]}, {size[1]}]", "data.train_crop=null"] if size else []
        )
        return load_config(
            self.args.config, [*overrides, *self.common_overrides(), *self.args.set, *extra]
        )

    def cfg3d(self, *extra: str) -> Config:
        """``--config-3d`` with ``--set-3d`` and ``extra`` applied, its cache in the temp folder."""
        return load_config(
            self.args.config_3d, [*self.common_overrides(), *self.args.set_3d, *extra]
        )

    def common_overrides(self) -> list[str]:
        """What every stage sets: random init (nothing to download), the cache in the temp
        folder."""
        return ["model.encoder_weights=null", f"data.cache_dir={self.work / 'cache'}"]

    @property
    def data_dir(self) -> Path:
        if self._data_dir is None:
            from gitract.data.synthetic import generate

            generate(
                self.work / "data", self.work / "labels", n_cases=self.args.cases,
                n_slices=self.args.slices, seed=0, workers=1,
            )  # fmt: skip
            self._data_dir = self.work / "data"
        return self._data_dir

    @property
    def folds_csv(self) -> Path:
        if self._folds_csv is None:
            self._folds_csv = make_folds(self.data_dir, self.work / "folds.csv")
        return self._folds_csv

    @property
    def ctx(self) -> Any:
        """A single process's DistContext on the device."""
        from gitract.training.distributed import DistContext

        return DistContext(0, 1, 0, self.device)


def make_folds(data_dir: Path, out: Path) -> Path:
    """3 folds (fewer with fewer train cases) of the synthetic set, for training."""
    from gitract.data.folds import create_folds_file
    from gitract.data.layout import load_train_table

    n_cases = load_train_table(data_dir)["case"].nunique()
    create_folds_file(data_dir, out, n_splits=min(3, n_cases))
    return out


def build_dataset(cfg: Config, data_dir: Path) -> Any:
    """The model kind's training dataset of ``data_dir`` at the config's size, with its
    augmentations."""
    from gitract.data.cache import VolumeCache
    from gitract.data.layout import load_train_table

    kind = kind_of(cfg)
    table = kind.train_table(cfg, load_train_table(data_dir, cfg.data.exclude))
    cache = VolumeCache(table, cfg.data.cache_dir, with_masks=True, progress=False)
    return kind.train_dataset(cfg, table, cache)


def draw_batches(dataset: Any, batch_size: int, n_batches: int, device: torch.device) -> list:
    """``n_batches`` batches of ``batch_size`` from a DataLoader (sampling with replacement, so
    a batch may be larger than the data set), held in (pinned) CPU memory."""
    from torch.utils.data import DataLoader, RandomSampler

    sampler = RandomSampler(dataset, replacement=True, num_samples=batch_size * n_batches)
    loader = DataLoader(
        dataset, batch_size, sampler=sampler, num_workers=0, pin_memory=device.type == "cuda"
    )
    return [(batch["image"], batch["mask"]) for batch in loader]


# --------------------------------------------------------------------------- measurements


def _timed(run_step: Callable[[int], None], steps: int, device: torch.device) -> float:
    """Seconds for ``steps`` calls of ``run_step(i)`` after one untimed warm-up call."""
    run_step(0)
    _sync(device)
    start = time.perf_counter()
    for i in range(1, steps + 1):
        run_step(i)
    _sync(device)
    return time.perf_counter() - start


def measure_train(
    cfg: Config, batches: Sequence[tuple[torch.Tensor, torch.Tensor]], steps: int,
    device: torch.device, wrap: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Images/s (3D: patches/s), seconds a step and peak memory of ``steps`` optimizer steps on
    ``batches`` (cycled), after a warm-up step whose seconds are ``first_step_s``: the training
    loop's own ``train_one_epoch`` over the loop ``build_loop`` makes for ``cfg``
    (``train.accumulate`` batches a step); ``wrap`` (e.g. torch.compile) wraps its network."""
    from gitract.training.distributed import DistContext
    from gitract.training.engine import build_loop, train_one_epoch

    _reset_memory(device)
    loop, state = build_loop(
        cfg, DistContext(0, 1, 0, device), steps, pretrained=False, progress=False
    )
    if wrap is not None:
        loop = dataclasses.replace(loop, net=wrap(loop.net))
    items = [{"image": image, "mask": mask} for image, mask in batches]
    accumulate = cfg.train.accumulate

    def epoch(n_batches: int) -> float:
        _sync(device)
        start = time.perf_counter()
        train_one_epoch(loop, state, [items[k % len(items)] for k in range(n_batches)], epoch=1)
        _sync(device)
        return time.perf_counter() - start

    first = epoch(accumulate)  # warm-up: one step (a compiled network compiles here)
    seconds = epoch(accumulate * steps)
    batch_size = batches[0][0].shape[0]
    return {
        "images_per_s": batch_size * accumulate * steps / seconds,
        "step_s": seconds / steps,
        "first_step_s": first,
        "peak_gib": _peak_gib(device),
    }


def measure_inference(
    cfg: Config, batches: Sequence[tuple[torch.Tensor, torch.Tensor]], steps: int,
    device: torch.device,
) -> dict[str, Any]:  # fmt: skip
    """Images/s and peak memory of ``Ensemble.predict`` (one model in eval mode, the config's
    flip TTA, in the run's precision) on ``batches`` (cycled)."""
    from gitract.models.kind2d import Ensemble

    _reset_memory(device)
    kind = kind_of(cfg)
    precision = kind.precision(cfg, device)
    model = precision.to_model(kind.build(cfg, pretrained=False)).eval()
    ensemble = Ensemble([model], [cfg], device, tuple(cfg.infer.tta_flips), precision)

    def step(i: int) -> None:
        ensemble.predict(batches[i % len(batches)][0])

    seconds = _timed(step, steps, device)
    batch_size = batches[0][0].shape[0]
    return {"images_per_s": batch_size * steps / seconds, "peak_gib": _peak_gib(device)}


def measure_sizes(
    measure: Callable[..., dict[str, Any]], cfg: Config, dataset: Any,
    batch_sizes: Sequence[int], steps: int, device: torch.device,
    rows: list[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:  # fmt: skip
    """``measure`` at each batch size, each row appended to ``rows`` as soon as it is measured
    (a stage stopped by its time box keeps them); a CUDA out-of-memory error is that size's
    result ("oom": true), not the end of the check. Memory is freed between sizes."""
    rows = [] if rows is None else rows
    for batch_size in batch_sizes:
        batches = draw_batches(dataset, batch_size, min(POOL_BATCHES, steps + 1), device)
        row: dict[str, Any] = {"batch_size": batch_size, "oom": False}
        try:
            row.update(measure(cfg, batches, steps, device))
        except torch.cuda.OutOfMemoryError:  # older torch has only this name
            # The peak is what was reached before the failed allocation.
            row.update(oom=True, images_per_s=None, peak_gib=_peak_gib(device))
        del batches
        _reset_memory(device)  # outside the except block: the traceback's tensors are gone
        rows.append(row)
    return rows


def fit_check(train_rows: Sequence[dict[str, Any]], img_size: Sequence[int]) -> dict[str, Any]:
    """Whether training batch 16 at 320x384 stays under 16 GiB of peak allocated memory.

    ``fits`` is None when that case was not measured (another size, batch 16 not in the list,
    or no memory figures off CUDA)."""
    out: dict[str, Any] = {
        "batch_size": FIT_BATCH,
        "img_size": list(FIT_IMG_SIZE),
        "limit_gib": FIT_LIMIT_GIB,
        "peak_gib": None,
        "oom": False,
        "fits": None,
    }
    row = next((r for r in train_rows if r["batch_size"] == FIT_BATCH), None)
    if tuple(img_size) != FIT_IMG_SIZE or row is None:
        return out
    out["peak_gib"], out["oom"] = row["peak_gib"], row["oom"]
    if row["oom"]:
        out["fits"] = False
    elif row["peak_gib"] is not None:
        out["fits"] = row["peak_gib"] < FIT_LIMIT_GIB
    return out


def fit_line(fit: dict[str, Any]) -> str:
    """The 16 GiB verdict in one line, both numbers side by side."""
    what = f"batch {fit['batch_size']} at {fit['img_size'][0]}x{fit['img_size'][1]}"
    limit = f"{fit['limit_gib']:.0f} GiB"
    if fit["fits"] is None:
        return f"{what} in {limit}: not measured"
    verdict = "fits" if fit["fits"] else "does NOT fit"
    how = "out of memory, peak before it" if fit["oom"] else "peak allocated"
    return (
        f"{what} {verdict} in {limit}: training {how} {fit['peak_gib']:.2f} GiB vs {limit} "
        "(CUDA context and allocator cache not counted)"
    )


# --------------------------------------------------------------------------- stage: environment


def stage_environment(check: Check, out: dict[str, Any]) -> None:
    """Versions, GPUs and bf16 support: what the numbers of the other stages were measured on."""
    out.update(
        python=platform.python_version(),
        torch=torch.__version__,
        cuda=torch.version.cuda,
        cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        nccl=_nccl_version(),
        device=str(check.device),
        cpu_threads=torch.get_num_threads(),
    )
    gpus = []
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            gpus.append({
                "name": props.name,
                "total_gib": round(props.total_memory / GIB, 2),
                "capability": f"{props.major}.{props.minor}",
            })  # fmt: skip
    out.update(gpu_count=len(gpus), gpus=gpus)
    why = bf16_why_not(check.cfg2d(), check.device)
    out.update(bf16=why is None, bf16_why_not=why)


def _nccl_version() -> str | None:
    """NCCL's version as torch reports it, or None (a CPU build, no NCCL)."""
    try:
        version = torch.cuda.nccl.version()
    except Exception:  # CPU builds raise from the missing library, in more than one way
        return None
    if isinstance(version, tuple):
        return ".".join(map(str, version))
    return str(version)


# --------------------------------------------------------------------------- stage: fused_adamw


def stage_fused_adamw(check: Check, out: dict[str, Any]) -> None:
    """An inf gradient must not move the weights: through the GradScaler (fp16: the step is
    skipped and the scale lowered) and through the ``found_inf`` flag the engine hands the
    fused AdamW itself (bf16/fp32: no scaler), with the engine's own optimizer and step."""
    from gitract.training import engine
    from gitract.training.state import TrainState

    device, cfg = check.device, check.cfg2d()
    model = torch.nn.Linear(8, 4).to(device)
    optimizer = engine._optimizer(model, cfg, device)
    out["fused"] = bool(optimizer.defaults.get("fused"))
    if not out["fused"]:
        raise Skip(f"torch {torch.__version__} has no fused AdamW on {device.type}")

    scaler = torch.amp.GradScaler(device.type, init_scale=2.0**16)
    state = TrainState(model, optimizer, scaler, None)
    before, scale = _weights(model), scaler.get_scale()
    _backward(model, scaler, poison=True)
    scaler.unscale_(optimizer)
    engine._optimizer_step(state, torch.ones((), device=device))
    out["scaler_step_skipped"] = _same(before, _weights(model))
    out["scale_before"], out["scale_after"] = scale, scaler.get_scale()
    require(out["scaler_step_skipped"], "GradScaler: an inf gradient moved the weights")
    require(out["scale_after"] < scale, "GradScaler: the scale was not lowered after an inf")

    state.scaler = torch.amp.GradScaler(device.type, enabled=False)
    for flag, name in ((1.0, "found_inf_step_skipped"), (0.0, "finite_step_taken")):
        before = _weights(model)
        _backward(model, state.scaler, poison=False)
        engine._optimizer_step(state, torch.tensor(flag, device=device))
        moved = not _same(before, _weights(model))
        out[name] = moved if flag == 0.0 else not moved
    require(out["found_inf_step_skipped"], "fused AdamW stepped although found_inf was set")
    require(out["finite_step_taken"], "fused AdamW did not step with found_inf clear")


def _weights(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _same(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def _backward(model: torch.nn.Module, scaler: torch.amp.GradScaler, poison: bool) -> None:
    """Gradients of a small loss; with ``poison``, of a loss scaled by inf (inf/NaN gradients)."""
    device = next(model.parameters()).device
    loss = model(torch.randn(16, 8, device=device)).square().mean()
    if poison:
        loss = loss * float("inf")
    scaler.scale(loss).backward()


# --------------------------------------------------------------------------- stage: recipes


class _Stopped(Exception):
    """Raised in place of an epoch: the run is 'killed' there and resumed."""


@contextlib.contextmanager
def nan_loss_at(k: int) -> Iterator[dict[str, int]]:
    """While open, the ``k``-th training loss (1-based; losses computed without gradients, i.e.
    validation's, are not counted) of runs built by the engine is NaN, as the training-safety
    tests inject it: ``engine.build_loss`` is wrapped, nothing in the engine is edited. Yields
    the counts (``losses``, ``poisoned``)."""
    from gitract.training import engine

    build, seen = engine.build_loss, {"losses": 0, "poisoned": 0}

    def poisoned_loss(train_cfg: Any) -> torch.nn.Module:
        loss = build(train_cfg)
        forward = loss.forward

        def nan_at_k(*args: Any, **kwargs: Any) -> torch.Tensor:
            value = forward(*args, **kwargs)
            if torch.is_grad_enabled():
                seen["losses"] += 1
                if seen["losses"] == k:
                    seen["poisoned"] += 1
                    return value * float("nan")
            return value

        loss.forward = nan_at_k
        return loss

    engine.build_loss = poisoned_loss
    try:
        yield seen
    finally:
        engine.build_loss = build


@contextlib.contextmanager
def stop_after_epoch(n: int) -> Iterator[None]:
    """While open, a run stops (raises :class:`_Stopped`) when it would start epoch ``n + 1``,
    with epoch ``n``'s files written: a kill between epochs."""
    from gitract.training import engine

    real = engine._epoch

    def stopping(loop: Any, state: Any, data: Any, epoch: int, out: Any) -> None:
        if epoch > n:
            raise _Stopped(f"stopped before epoch {epoch}")
        real(loop, state, data, epoch, out)

    engine._epoch = stopping
    try:
        yield
    finally:
        engine._epoch = real


def run_recipe(check: Check, dtype: str, out: dict[str, Any]) -> None:
    """``--config`` in ``dtype`` trained by ``fit`` for 2 epochs with a NaN loss at the first
    training batch, stopped after epoch 1 and resumed; what it left behind, checked."""
    import pandas as pd

    from gitract.training.engine import fit, run_dir_for

    cfg = check.cfg2d("train.epochs=2", "train.amp=true", f"train.amp_dtype={dtype}")
    runs = check.work / f"runs_{dtype}"
    data_dir, folds_csv = check.data_dir, check.folds_csv
    out.update(model=kind_of(cfg).describe(cfg), img_size=list(cfg.data.img_size),
               batch_size=cfg.train.batch_size, nan_at_loss=NAN_AT_LOSS)  # fmt: skip
    log = _Tee()
    with nan_loss_at(NAN_AT_LOSS) as seen, contextlib.redirect_stdout(log):
        with stop_after_epoch(1), contextlib.suppress(_Stopped):
            fit(cfg, 0, data_dir, folds_csv, runs, progress=False)
        out["stopped_after_epoch"] = _saved_epoch(run_dir_for(cfg, 0, runs) / "last.pt")
        run = fit(cfg, 0, data_dir, folds_csv, runs, resume=True, progress=False)
    history = pd.read_csv(run / "history.csv")
    last = torch.load(run / "last.pt", weights_only=True)
    out.update(
        resumed="resuming" in log.text,
        epochs=[int(e) for e in history["epoch"]],
        nan_injected=seen["poisoned"],
        skipped_steps=int(history["skipped"].sum()),
        best_finite=_finite_weights(run / "best.pt"),
        last_finite=_finite_weights(run / "last.pt"),
        precision=last["meta"]["precision"],
        val_score=float(history["val_score"].iloc[-1]) if "val_score" in history else None,
    )
    require(out["stopped_after_epoch"] == 1, "the run was not stopped after epoch 1")
    require(out["resumed"], "the second fit did not resume from last.pt")
    require(out["epochs"] == [1, 2], f"history epochs {out['epochs']}, expected [1, 2]")
    require(out["nan_injected"] == 1, "the NaN loss was never injected")
    require(out["skipped_steps"] >= 1, "the NaN step was not skipped")
    require(out["best_finite"] and out["last_finite"], "best.pt or last.pt is not finite")
    require(out["precision"]["dtype"] == dtype, f"trained in {out['precision']}, not {dtype}")


class _Tee:
    """A stdout stand-in that keeps what is written and passes it on to stderr (progress)."""

    def __init__(self) -> None:
        self.parts: list[str] = []

    def write(self, text: str) -> int:
        self.parts.append(text)
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()

    @property
    def text(self) -> str:
        return "".join(self.parts)


def _saved_epoch(path: Path) -> int | None:
    return int(torch.load(path, weights_only=True)["meta"]["epoch"]) if path.exists() else None


def _finite_weights(path: Path) -> bool:
    weights = torch.load(path, weights_only=True)["model"]
    return all(bool(torch.isfinite(v).all()) for v in weights.values() if v.is_floating_point())


def stage_recipe_fp16(check: Check, out: dict[str, Any]) -> None:
    """The default recipe in fp16 (GradScaler) with a NaN, stopped and resumed."""
    run_recipe(check, "fp16", out)


def stage_recipe_bf16(check: Check, out: dict[str, Any]) -> None:
    """The same in bf16 (no scaler: the engine's found_inf path), where the device has it."""
    why = bf16_why_not(check.cfg2d(), check.device)
    if why is not None:
        raise Skip(why)
    run_recipe(check, "bf16", out)


# --------------------------------------------------------------------------- stage: throughput


def stage_b7_throughput(check: Check, out: dict[str, Any]) -> None:
    """Training and flip-TTA inference images/s and peak GiB per ``--batch-sizes``."""
    cfg, args = check.cfg2d(), check.args
    precision = kind_of(cfg).precision(cfg, check.device)
    out.update(model=kind_of(cfg).describe(cfg), img_size=list(cfg.data.img_size),
               precision=precision.record(), tta_flips=list(cfg.infer.tta_flips),
               steps=args.steps, train=[], inference=[])  # fmt: skip
    dataset = build_dataset(cfg, check.data_dir)
    measure_sizes(measure_train, cfg, dataset, args.batch_sizes, args.steps, check.device,
                  out["train"])  # fmt: skip
    out["fit_16gib"] = fit_check(out["train"], cfg.data.img_size)
    measure_sizes(measure_inference, cfg, dataset, args.batch_sizes, args.steps, check.device,
                  out["inference"])  # fmt: skip


def stage_recipe_3d(check: Check, out: dict[str, Any]) -> None:
    """The 3D network's step time and peak GiB per ``--batch-sizes-3d``, then its real
    DataLoader (the engine's, at the config's batch size and workers): patches/s of two
    epochs, the second timed, against ``data_wait``."""
    cfg, args = check.cfg3d(), check.args
    out.update(model=kind_of(cfg).describe(cfg), patch_size=list(cfg.data.patch_size),
               grid_hw=list(cfg.data.grid_hw), steps=args.steps, train=[])  # fmt: skip
    dataset = build_dataset(cfg, check.data_dir)
    measure_sizes(measure_train, cfg, dataset, args.batch_sizes_3d, args.steps, check.device,
                  out["train"])  # fmt: skip
    out["loader"] = measure_loader(check, cfg)
    model_row = next(
        (r for r in out["train"] if r["batch_size"] == cfg.train.batch_size and not r["oom"]),
        None,
    )
    out["loader"]["model_only_patches_per_s"] = model_row["images_per_s"] if model_row else None


def measure_loader(check: Check, cfg: Config) -> dict[str, Any]:
    """Two epochs of ``train_one_epoch`` over the DataLoader ``fit`` builds (its sampler,
    workers, pinning); patches/s and ``data_wait`` of the second (the first starts workers
    and tunes kernels)."""
    from gitract.data.cache import VolumeCache
    from gitract.data.layout import load_train_table
    from gitract.training import engine

    device = check.device
    _reset_memory(device)
    table = load_train_table(check.data_dir, cfg.data.exclude)
    cache = VolumeCache(table, cfg.data.cache_dir, with_masks=True, progress=False)
    data = engine._data(cfg, table, table.iloc[:0], cache, check.ctx)
    loader = data.train_loader
    loop, state = engine.build_loop(cfg, check.ctx, len(loader), pretrained=False, progress=False)
    patches = min(len(loader) * cfg.train.batch_size, len(data.sampler))
    result: dict[str, Any] = {"batch_size": cfg.train.batch_size,
                              "num_workers": loader.num_workers, "patches": patches}  # fmt: skip
    for epoch in (1, 2):
        data.sampler.set_epoch(epoch)
        _sync(device)
        start = time.perf_counter()
        metrics = engine.train_one_epoch(loop, state, loader, epoch)
        _sync(device)
        seconds = time.perf_counter() - start
    wait = metrics["data_wait"]  # a share of the epoch, as history.csv logs it
    result.update(seconds=seconds, patches_per_s=patches / seconds, data_wait=wait,
                  data_wait_s=wait * seconds, peak_gib=_peak_gib(device))  # fmt: skip
    return result


def stage_sliding_window(check: Check, out: dict[str, Any]) -> None:
    """Seconds per case-day of ``predict_volume3d`` on a random case-day of ``--volume`` (depth,
    native height and width; the predictor runs on the config's grid): the first call (kernel
    tuning included) and a second."""
    from gitract.models.kind3d import predict_volume3d, sliding_window_tiles

    cfg, device = check.cfg3d(), check.device
    kind = kind_of(cfg)
    precision = kind.precision(cfg, device, training=False)
    depth, height, width = check.args.volume
    grid = (depth, int(cfg.data.grid_hw[0]), int(cfg.data.grid_hw[1]))
    patch = tuple(int(s) for s in cfg.data.patch_size)
    out.update(model=kind.describe(cfg), volume=[depth, height, width], grid=list(grid),
               patch_size=list(patch), overlap=cfg.infer.sw_overlap,
               windows=sliding_window_tiles(grid, patch, cfg.infer.sw_overlap),
               tta_views=1 + len(cfg.infer.tta_flips), precision=precision.record())  # fmt: skip
    _reset_memory(device)
    model = precision.to_model(kind.build(cfg, pretrained=False)).eval()
    image = np.random.default_rng(0).standard_normal(grid).astype(np.float32)
    for key in ("first_s", "seconds_per_case_day"):
        start = time.perf_counter()
        probs = predict_volume3d([model], image, (height, width), cfg.data, cfg.infer, precision)
        out[key] = time.perf_counter() - start  # the result is on the host: work is done
    require(probs.shape == (depth, 3, height, width), f"probabilities of shape {probs.shape}")
    out["peak_gib"] = _peak_gib(device)


# --------------------------------------------------------------------------- stage: ddp


def ddp_plan(device: torch.device, gpus: int) -> tuple[int, str, dict[str, str]]:
    """(processes, backend, extra environment) of the DDP check on ``device`` with ``gpus``
    visible: NCCL across several GPUs, two gloo ranks sharing one GPU, two gloo ranks on the
    CPU (no GPU visible to them)."""
    if device.type == "cuda" and gpus >= 2:
        return gpus, "nccl", {}
    if device.type == "cuda":
        return 2, "gloo", {"GITRACT_DIST_BACKEND": "gloo"}
    return 2, "gloo", {"CUDA_VISIBLE_DEVICES": "", "GITRACT_DIST_BACKEND": "gloo"}


def stage_ddp(check: Check, out: dict[str, Any]) -> None:
    """One epoch of fold 0 with ``scripts/train.py`` under ``torchrun --standalone``; every rank
    must have joined one process group (train.py names the world size it trained with)."""
    torchrun = Path(sys.executable).with_name("torchrun")
    launcher = (
        [str(torchrun)] if torchrun.exists() else [sys.executable, "-m", "torch.distributed.run"]
    )
    gpus = torch.cuda.device_count() if check.device.type == "cuda" else 0
    nproc, backend, env_extra = ddp_plan(check.device, gpus)
    cfg = check.cfg2d()
    h, w = cfg.data.img_size
    crop = cfg.data.train_crop
    sets = [
        *check.common_overrides(),
        *check.args.set,
        "train.epochs=1",
        f"data.img_size=[{h},{w}]",
        "data.train_crop=" + ("null" if crop is None else f"[{crop[0]},{crop[1]}]"),
    ]
    cmd = [
        *launcher, "--standalone", f"--nproc_per_node={nproc}",
        str(ROOT / "scripts" / "train.py"), "--fold", "0", "--config", str(check.args.config),
        "--data-dir", str(check.data_dir), "--folds-csv", str(check.folds_csv),
        "--out-dir", str(check.work / "runs_ddp"), "--no-progress",
        *[part for s in sets for part in ("--set", s)],
    ]  # fmt: skip
    out.update(nproc=nproc, backend=backend, command=" ".join(cmd))
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), **env_extra}
    start = time.perf_counter()
    returncode, log = _run_group(cmd, env)
    out.update(returncode=returncode, seconds=time.perf_counter() - start)
    wrote = list((check.work / "runs_ddp").rglob("history.csv"))
    out["ok"] = returncode == 0 and bool(wrote) and f" x{nproc}:" in log
    if not out["ok"]:
        out["log_tail"] = log.strip().splitlines()[-15:]
        last = out["log_tail"][-1] if out["log_tail"] else "no output"
        raise CheckFailed(f"torchrun on {nproc} {backend} ranks: exit code {returncode}: {last}")


def _run_group(cmd: Sequence[str], env: dict[str, str]) -> tuple[int, str]:
    """Run ``cmd`` in its own process group; (exit code, stdout + stderr). If anything stops
    the wait (the stage's time box), the whole group, torchrun's ranks included, is killed."""
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(
            list(cmd), stdout=log, stderr=subprocess.STDOUT, env=env, text=True,
            start_new_session=True,
        )  # fmt: skip
        try:
            returncode = proc.wait()
        finally:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.seek(0)
        return returncode, log.read()


# --------------------------------------------------------------------------- stage: compile


def stage_compile(check: Check, out: dict[str, Any]) -> None:
    """``torch.compile`` (``--compile-backend``) of the 2.5D training step at the first of
    ``--batch-sizes``: the first compiled step's seconds less the first eager step's (the
    compile time), and compiled over eager images/s."""
    cfg, args, device = check.cfg2d(), check.args, check.device
    batch_size = args.batch_sizes[0]
    out.update(backend=args.compile_backend, batch_size=batch_size, steps=args.steps)
    dataset = build_dataset(cfg, check.data_dir)
    batches = draw_batches(dataset, batch_size, min(POOL_BATCHES, args.steps + 1), device)
    out["eager"] = measure_train(cfg, batches, args.steps, device)
    torch._dynamo.reset()

    def compiled(net: torch.nn.Module) -> torch.nn.Module:
        return torch.compile(net, backend=args.compile_backend)

    out["compiled"] = measure_train(cfg, batches, args.steps, device, wrap=compiled)
    eager, fast = out["eager"], out["compiled"]
    out["compile_s"] = max(0.0, fast["first_step_s"] - eager["first_step_s"])
    out["speedup"] = fast["images_per_s"] / eager["images_per_s"]


# --------------------------------------------------------------------------- stages and time boxes


@dataclass(frozen=True)
class Stage:
    """A named part of the check: ``run(check, out)`` fills ``out`` as it goes; ``budget`` is
    its time box in seconds (None: whatever is left, when at least ``min_s``)."""

    name: str
    run: Callable[[Check, dict[str, Any]], None]
    budget: float | None
    min_s: float = 0.0


def default_stages(budgets: dict[str, float | None] | None = None) -> list[Stage]:
    """The acceptance run's stages in order, with :data:`BUDGETS` updated by ``budgets``."""
    box = {**BUDGETS, **(budgets or {})}
    runs: dict[str, Callable[[Check, dict[str, Any]], None]] = {
        "environment": stage_environment,
        "fused_adamw": stage_fused_adamw,
        "recipe_fp16_nan_resume": stage_recipe_fp16,
        "recipe_bf16": stage_recipe_bf16,
        "b7_throughput": stage_b7_throughput,
        "recipe_3d": stage_recipe_3d,
        "sliding_window": stage_sliding_window,
        "ddp": stage_ddp,
        "compile": stage_compile,
    }
    min_s = {"compile": COMPILE_MIN_S}  # used only while its box is "what is left"
    return [Stage(name, run, box[name], min_s.get(name, 0.0)) for name, run in runs.items()]


@contextlib.contextmanager
def time_box(seconds: float) -> Iterator[None]:
    """Raise :class:`StageTimeout` in this (main) thread after ``seconds``. Where there is no
    SIGALRM (Windows) or off the main thread, the box is not enforced."""
    usable = hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
    if not usable:
        yield
        return

    def on_alarm(signum: int, frame: Any) -> None:
        raise StageTimeout

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1e-3))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def one_line(error: BaseException) -> str:
    """``Type: first line of the message``, at most 300 characters."""
    lines = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def run_stage(stage: Stage, check: Check, left: float) -> dict[str, Any]:
    """One stage in its time box, given ``left`` seconds of the whole budget; its result with
    ``status`` (ok, skipped, failed, timeout), ``seconds`` and ``budget_s``."""
    box = left if stage.budget is None else stage.budget
    if stage.budget is not None and stage.budget > left:
        why = f"its {stage.budget:.3g} s time box does not fit in the {left:.3g} s left"
        return {"status": "skipped", "why": why, "budget_s": stage.budget}
    if stage.budget is None and left < stage.min_s:
        why = f"{left:.3g} s left, it needs at least {stage.min_s:.3g} s"
        return {"status": "skipped", "why": why, "budget_s": None}
    out: dict[str, Any] = {}
    status: dict[str, Any] = {"status": "ok"}
    start = time.perf_counter()
    try:
        with time_box(box):
            stage.run(check, out)
    except StageTimeout:
        status = {"status": "timeout", "why": f"ran past its {box:.3g} s time box; stopped"}
    except Skip as e:
        status = {"status": "skipped", "why": str(e)}
    except Exception as e:  # any stage's error is its own result; the others still run
        status = {"status": "failed", "error": one_line(e)}
    finally:
        _reset_memory(check.device)
    seconds = time.perf_counter() - start
    return {**status, "seconds": round(seconds, 3), "budget_s": round(box, 1), **out}


def run_stages(
    stages: Sequence[Stage], check: Check, budget: float,
    report: Callable[[str, dict[str, Any]], None] | None = None,
) -> dict[str, dict[str, Any]]:  # fmt: skip
    """Every stage in order within ``budget`` seconds in all; name -> result. ``report`` is
    called after each stage (progress)."""
    started = time.perf_counter()
    results: dict[str, dict[str, Any]] = {}
    for stage in stages:
        left = budget - (time.perf_counter() - started)
        results[stage.name] = run_stage(stage, check, left)
        if report is not None:
            report(stage.name, results[stage.name])
    return results


def stage_line(name: str, result: dict[str, Any]) -> str:
    """A stage's result in one line for the terminal."""
    status = result["status"]
    text = f"gpu_check {name}: {status}"
    if "seconds" in result:
        text += f" ({result['seconds']:.1f} s of {result['budget_s']:.0f} s)"
    if status in ("skipped", "timeout"):
        text += f": {result['why']}"
    elif status == "failed":
        text += f": {result['error']}"
    if name == "b7_throughput" and "fit_16gib" in result:
        text += f"; {fit_line(result['fit_16gib'])}"
    return text


def finite_json(value: Any) -> Any:
    """``value`` with every NaN or infinity replaced by None: the report is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--device", default="auto", help="auto (CUDA if any), cuda, cuda:N, cpu")
    add("--budget", type=float, default=TOTAL_BUDGET, help="seconds in all (default: %(default)s)")
    add("--stages", nargs="+", metavar="NAME", help=f"only these, in order (of {list(BUDGETS)})")
    add(
        "--stage-budget",
        action="append",
        default=[],
        metavar="NAME=SECONDS",
        help="a stage's time box (default: BUDGETS in the script; compile: what is left)",
    )
    add("--config", type=Path, default=DEFAULT_CFG, help="the 2.5D recipe (default: %(default)s)")
    add("--config-3d", type=Path, default=DEFAULT_CFG_3D, help="the 3D recipe")
    add("--set", action="append", default=[], metavar="KEY=VALUE", help="2.5D config override")
    add("--set-3d", action="append", default=[], metavar="KEY=VALUE", help="3D config override")
    add("--img-size", type=int, nargs=2, metavar=("H", "W"), help="2.5D canvas, no crop")
    add("--batch-sizes", type=int, nargs="+", default=[16, 32], help="2.5D (default: %(default)s)")
    add("--batch-sizes-3d", type=int, nargs="+", default=[2, 4, 8], help="(default: %(default)s)")
    add("--steps", type=int, default=5, help="timed steps per size (default: %(default)s)")
    add(
        "--volume",
        type=int,
        nargs=3,
        default=[144, 266, 266],
        metavar=("D", "H", "W"),
        help="the sliding-window case-day: slices, native height, width (default: %(default)s)",
    )
    add("--compile-backend", default="inductor", help="torch.compile backend (%(default)s)")
    add("--cases", type=int, default=4, help="synthetic cases (default: %(default)s)")
    add("--slices", type=int, default=24, help="slices of a long day (default: %(default)s)")
    add("--json", type=Path, help="also write the report here (JSON, atomically)")
    return parser.parse_args(argv)


def _check_args(args: argparse.Namespace) -> dict[str, float | None]:
    """The ``--stage-budget`` overrides, once every argument is known to be sane; the configs
    are loaded once here, so a bad override is the config's one-line error before anything
    runs."""
    if args.steps < 1:
        raise ConfigError(f"--steps must be >= 1, got {args.steps}")
    for name, sizes in (
        ("--batch-sizes", args.batch_sizes),
        ("--batch-sizes-3d", args.batch_sizes_3d),
    ):
        bad = [b for b in sizes if b < 1]
        if bad:
            raise ConfigError(f"{name} must be >= 1, got {bad[0]}")
    from gitract.data.synthetic import MIN_SLICES

    if args.cases < 2 or args.slices < MIN_SLICES:
        raise ConfigError(
            f"--cases must be >= 2 and --slices >= {MIN_SLICES} (the synthetic data's minimum), "
            f"got {args.cases} and {args.slices}"
        )
    if min(args.volume) < 1:
        raise ConfigError(f"--volume must be positive, got {args.volume}")
    if args.budget <= 0:
        raise ConfigError(f"--budget must be > 0 seconds, got {args.budget}")
    unknown = [s for s in args.stages or [] if s not in BUDGETS]
    if unknown:
        raise ConfigError(f"--stages: unknown stage {unknown[0]!r}; expected some of "
                          f"{list(BUDGETS)}")  # fmt: skip
    budgets: dict[str, float | None] = {}
    for item in args.stage_budget:
        name, _, seconds = item.partition("=")
        try:
            value = float(seconds)
        except ValueError:
            value = -1.0
        if name not in BUDGETS or value <= 0:
            raise ConfigError(f"--stage-budget {item!r}: expected NAME=SECONDS with NAME one "
                              f"of {list(BUDGETS)} and SECONDS > 0")  # fmt: skip
        budgets[name] = value
    check = Check(args, torch.device("cpu"), Path("."))
    check.cfg2d()
    check.cfg3d()
    return budgets


def run_check(args: argparse.Namespace, device: torch.device, budgets: dict) -> dict[str, Any]:
    """Every selected stage on ``device`` in a temp folder; the report as a JSON-ready dict."""
    stages = default_stages(budgets)
    if args.stages:
        stages = [s for s in stages if s.name in args.stages]
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as fit sets it: every stage times tuned kernels
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        check = Check(args, device, Path(tmp))
        with contextlib.redirect_stdout(sys.stderr):  # stdout carries the report alone
            results = run_stages(stages, check, args.budget,
                                 lambda n, r: print(stage_line(n, r), flush=True))  # fmt: skip
    return finite_json({
        "device": str(device),
        "config": str(args.config),
        "config_3d": str(args.config_3d),
        "budget_s": args.budget,
        "seconds": round(time.perf_counter() - started, 1),
        "ok": all(r["status"] != "failed" for r in results.values()),
        "stages": results,
    })  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    budgets = _check_args(args)
    device = pick_device(args.device)
    if device is None:
        print(NO_GPU_LINE)
        return 0
    report = run_check(args, device, budgets)
    if args.json:
        write_text_atomic(args.json, json.dumps(report, indent=2) + "\n")
    print(json.dumps(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    run_main(main)
