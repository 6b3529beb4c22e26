"""Check a recipe (2.5D or 3D) on a real GPU: training and TTA inference speed and peak memory.

    python scripts/gpu_check.py [--config configs/default.yaml] [--batch-sizes 8 16 32]
        [--steps 10] [--img-size H W] [--ddp | --no-ddp] [--nproc N] [--json FILE]

On a CUDA machine it measures, per batch size, on a small synthetic data set (made in a temp
folder):

- train: images/s (3D: patches/s) of the training loop's own steps
  (``gitract.training.engine.build_loop`` and ``train_one_epoch``, as ``fit`` runs them: random
  init, fused AdamW, the config's loss, aux head, EMA, accumulation, and the run's precision
  policy), after a warm-up step, and the peak GPU memory (``torch.cuda.max_memory_allocated``);
- inference: images/s and peak memory of ``gitract.models.kind2d.Ensemble.predict`` (one model
  in eval mode, the config's flip TTA, the run's precision);
- whether batch 16 at 320x384 fits in 16 GiB (a Kaggle T4/P100): its peak against 16 GiB;
- ``--ddp`` (default on CUDA): one short epoch of ``scripts/train.py`` under
  ``torchrun --standalone --nproc_per_node=<visible GPUs>`` on the same data; its exit code.
  With one process there is no process group to check: "not run", and why.

A batch size that runs out of memory is reported as OOM and the others still run. Batches are
drawn from a DataLoader before the clock starts, so the numbers are the model's, not the
loader's (``scripts/benchmark.py`` measures the loader). With no CUDA GPU it says so in one line
and exits 0; ``--device cpu`` runs the same measurements on the CPU (for tests, at tiny sizes).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from gitract.atomic import write_text_atomic
from gitract.cli import run_main
from gitract.config import Config, load_config
from gitract.errors import ConfigError
from gitract.models.kinds import kind_of
from gitract.models.precision import Precision

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CFG = ROOT / "configs" / "default.yaml"
NO_GPU_LINE = "no CUDA GPU: nothing was measured (use --device cpu to run the check on the CPU)"
# The question the check answers: does the default batch at the default size fit a 16 GB card?
FIT_BATCH = 16
FIT_IMG_SIZE = (320, 384)
FIT_LIMIT_GIB = 16.0
GIB = 1024**3
# Distinct batches drawn per batch size; the timed steps cycle over them.
POOL_BATCHES = 4


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


# --------------------------------------------------------------------------- data


def make_data(work: Path, cases: int, slices: int, seed: int = 0) -> Path:
    """A small synthetic data set in the Kaggle layout under ``work/data``; its folder."""
    from gitract.data.synthetic import generate

    generate(work / "data", work / "labels", n_cases=cases, n_slices=slices, seed=seed)
    return work / "data"


def build_dataset(cfg: Config, data_dir: Path, cache_dir: Path) -> Any:
    """The model kind's training dataset of ``data_dir`` at the config's size, with its
    augmentations."""
    from gitract.data.cache import VolumeCache
    from gitract.data.layout import load_train_table

    kind = kind_of(cfg)
    table = kind.train_table(cfg, load_train_table(data_dir, cfg.data.exclude))
    cache = VolumeCache(table, cache_dir, with_masks=True, progress=False)
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


def _precision(cfg: Config, device: torch.device) -> Precision:
    return kind_of(cfg).precision(cfg, device)


def measure_train(
    cfg: Config, batches: Sequence[tuple[torch.Tensor, torch.Tensor]], steps: int,
    device: torch.device,
) -> dict[str, Any]:  # fmt: skip
    """Images/s and peak memory of ``steps`` optimizer steps (after a warm-up step) on
    ``batches`` (cycled): the training loop's own ``train_one_epoch`` over the loop
    ``build_loop`` makes for ``cfg`` (``train.accumulate`` batches a step)."""
    from gitract.training.distributed import DistContext
    from gitract.training.engine import build_loop, train_one_epoch

    _reset_memory(device)
    loop, state = build_loop(
        cfg, DistContext(0, 1, 0, device), steps, pretrained=False, progress=False
    )
    items = [{"image": image, "mask": mask} for image, mask in batches]
    accumulate = cfg.train.accumulate

    def epoch(n_batches: int) -> None:
        train_one_epoch(loop, state, [items[k % len(items)] for k in range(n_batches)], epoch=1)

    epoch(accumulate)  # warm-up: one step
    _sync(device)
    start = time.perf_counter()
    epoch(accumulate * steps)
    _sync(device)
    seconds = time.perf_counter() - start
    batch_size = batches[0][0].shape[0]
    return {
        "images_per_s": batch_size * accumulate * steps / seconds,
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
    kind, precision = kind_of(cfg), _precision(cfg, device)
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
) -> list[dict[str, Any]]:  # fmt: skip
    """``measure`` at each batch size; a CUDA out-of-memory error is that size's result
    ("oom": true), not the end of the check. Memory is freed between sizes."""
    rows = []
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


# --------------------------------------------------------------------------- torchrun


def make_folds(data_dir: Path, out: Path) -> Path:
    """3 folds (fewer with fewer train cases) of the synthetic set, for scripts/train.py."""
    from gitract.data.folds import create_folds_file
    from gitract.data.layout import load_train_table

    n_cases = load_train_table(data_dir)["case"].nunique()
    create_folds_file(data_dir, out, n_splits=min(3, n_cases))
    return out


def run_ddp(
    config: Path, data_dir: Path, work: Path, nproc: int, img_size: Sequence[int],
    timeout: float = 900.0,
) -> dict[str, Any]:  # fmt: skip
    """One epoch of fold 0 with ``scripts/train.py`` under ``torchrun --standalone`` on
    ``nproc`` processes; returns its exit code, wall time and, on failure, its last lines.
    One process forms no process group, so nothing of DDP would be checked: not run (``ok``
    None, ``reason`` says why)."""
    if nproc < 2:
        reason = f"{nproc} process: no process group, nothing of DDP to check"
        return {"nproc": nproc, "returncode": None, "ok": None, "reason": reason}
    folds_csv = make_folds(data_dir, work / "folds.csv")
    torchrun = Path(sys.executable).with_name("torchrun")
    launcher = (
        [str(torchrun)] if torchrun.exists() else [sys.executable, "-m", "torch.distributed.run"]
    )
    h, w = img_size
    cmd = [
        *launcher, "--standalone", f"--nproc_per_node={nproc}",
        str(ROOT / "scripts" / "train.py"), "--fold", "0", "--config", str(config),
        "--data-dir", str(data_dir), "--folds-csv", str(folds_csv),
        "--out-dir", str(work / "runs"), "--no-progress",
        "--set", "model.encoder_weights=null", "--set", "train.epochs=1",
        "--set", f"data.img_size=[{h},{w}]", "--set", f"data.cache_dir={work / 'cache'}",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    start = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
        returncode, stdout, stderr = done.returncode, done.stdout, done.stderr
    except subprocess.TimeoutExpired as e:
        returncode, stdout, stderr = None, str(e.stdout or ""), f"timed out after {timeout:.0f} s"
    seconds = time.perf_counter() - start
    wrote = [p.name for p in (work / "runs").rglob("history.csv")]
    out: dict[str, Any] = {
        "nproc": nproc,
        "returncode": returncode,
        # Every rank in one process group: train.py names the world size it trained with.
        "ok": returncode == 0 and bool(wrote) and f" x{nproc}:" in stdout,
        "seconds": seconds,
        "command": " ".join(cmd),
    }
    if not out["ok"]:
        out["log_tail"] = (stdout + "\n" + stderr).strip().splitlines()[-15:]
    return out


# --------------------------------------------------------------------------- report


def _num(value: float | None, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def format_report(report: dict[str, Any]) -> str:
    """The report as a small table and a few lines for the terminal."""
    h, w = report["img_size"]
    lines = [
        f"gpu_check on {report['device_name']} (torch {report['torch']}): {report['config']}, "
        f"{report['model']}, input {'x'.join(map(str, report.get('input', [h, w])))}, "
        f"amp {report['amp']}, channels_last "
        f"{report['channels_last']}, {report['steps']} timed steps per size",
        f"{'batch':>5}  {'train img/s':>11}  {'train peak GiB':>14}  "
        f"{'infer img/s':>11}  {'infer peak GiB':>14}",
    ]
    infer = {r["batch_size"]: r for r in report["inference"]}
    for row in report["train"]:
        cells = [f"{row['batch_size']:>5}"]
        for r in (row, infer.get(row["batch_size"])):
            if r is None:
                cells += [f"{'-':>11}", f"{'-':>14}"]
            elif r["oom"]:
                cells += [f"{'OOM':>11}", f"{'OOM':>14}"]
            else:
                cells += [f"{r['images_per_s']:>11.1f}", f"{_num(r['peak_gib'], '.2f'):>14}"]
        lines.append("  ".join(cells))
    lines.append(f"inference TTA flips: {report['tta_flips'] or 'none'}")
    fit = report["fit_16gib"]
    what = f"batch {fit['batch_size']} at {fit['img_size'][0]}x{fit['img_size'][1]}"
    if fit["fits"] is None:
        lines.append(f"{what} in {fit['limit_gib']:.0f} GiB: not measured")
    else:
        verdict = "fits" if fit["fits"] else "does NOT fit"
        peak = _num(fit["peak_gib"], ".2f")
        how = "out of memory, peak before it" if fit["oom"] else "peak allocated"
        lines.append(
            f"{what} {verdict} in {fit['limit_gib']:.0f} GiB: training {how} {peak} GiB "
            f"vs {fit['limit_gib']:.0f} GiB (CUDA context and allocator cache not counted)"
        )
    ddp = report["ddp"]
    if ddp is None or ddp["ok"] is None:
        reason = "" if ddp is None else f" ({ddp['reason']})"
        lines.append(f"torchrun: not run{reason}")
    else:
        status = "ok" if ddp["ok"] else "FAILED"
        lines.append(
            f"torchrun on {ddp['nproc']} processes, 1 epoch of scripts/train.py: {status} "
            f"(exit code {ddp['returncode']}, {ddp['seconds']:.0f} s)"
        )
        lines += [f"  | {line}" for line in ddp.get("log_tail", [])]
    return "\n".join(lines)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} ({props.total_memory / GIB:.1f} GiB) x{torch.cuda.device_count()}"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto (CUDA if any), cuda, cuda:N, cpu")
    parser.add_argument("--config", type=Path, default=DEFAULT_CFG, help="YAML config")
    parser.add_argument(
        "--img-size", type=int, nargs=2, metavar=("H", "W"), help="default: the config's"
    )
    parser.add_argument(
        "--batch-sizes", type=int, nargs="+", default=[8, 16, 32], help="default: %(default)s"
    )
    parser.add_argument(
        "--steps", type=int, default=10, help="timed steps per size (default: %(default)s)"
    )
    parser.add_argument(
        "--ddp",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also run one epoch of scripts/train.py under torchrun (default: on CUDA only)",
    )
    parser.add_argument("--nproc", type=int, help="torchrun processes (default: the visible GPUs)")
    parser.add_argument(
        "--cases", type=int, default=4, help="synthetic cases (default: %(default)s)"
    )
    parser.add_argument(
        "--slices", type=int, default=12, help="slices of a long day (default: %(default)s)"
    )
    parser.add_argument("--json", type=Path, help="also write the results here (JSON)")
    return parser.parse_args(argv)


def _check_args(args: argparse.Namespace) -> Config:
    """The run's config with ``--img-size`` applied (the config's own rule checks it), once the
    other arguments are known to be sane."""
    if args.steps < 1:
        raise ConfigError(f"--steps must be >= 1, got {args.steps}")
    bad = [b for b in args.batch_sizes if b < 1]
    if bad:
        raise ConfigError(f"--batch-sizes must be >= 1, got {bad[0]}")
    if args.nproc is not None and args.nproc < 1:
        raise ConfigError(f"--nproc must be >= 1, got {args.nproc}")
    size = [f"data.img_size=[{', '.join(map(str, args.img_size))}]"] if args.img_size else []
    return load_config(args.config, size)


def run_check(args: argparse.Namespace, cfg: Config, device: torch.device) -> dict[str, Any]:
    """Every measurement of the check on ``device``; the report as a JSON-ready dict."""
    ddp = device.type == "cuda" if args.ddp is None else args.ddp
    precision = _precision(cfg, device)
    kind = kind_of(cfg)
    plan = kind.forward_plan(cfg, 1, 1)
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        work = Path(tmp)
        data_dir = make_data(work, args.cases, args.slices)
        dataset = build_dataset(cfg, data_dir, work / "cache")
        train = measure_sizes(measure_train, cfg, dataset, args.batch_sizes, args.steps, device)
        infer = measure_sizes(measure_inference, cfg, dataset, args.batch_sizes, args.steps, device)
        ddp_result = None
        if ddp:
            nproc = args.nproc or (torch.cuda.device_count() if device.type == "cuda" else 1)
            ddp_result = run_ddp(args.config, data_dir, work, nproc, cfg.data.img_size)
    return {
        "device": str(device),
        "device_name": _device_name(device),
        "torch": torch.__version__,
        "config": str(args.config),
        "model": kind.describe(cfg),
        "input": list(plan.input_shape[1:]),  # of one sample: (C, H, W) or (C, D, H, W)
        "img_size": list(cfg.data.img_size),
        "amp": precision.dtype is not None,
        "precision": precision.record(),
        "channels_last": precision.channels_last,
        "tta_flips": list(cfg.infer.tta_flips),
        "steps": args.steps,
        "train": train,
        "inference": infer,
        "fit_16gib": fit_check(train, cfg.data.img_size),
        "ddp": ddp_result,
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = _check_args(args)
    device = pick_device(args.device)
    if device is None:
        print(NO_GPU_LINE)
        return 0
    report = run_check(args, cfg, device)
    print(format_report(report))
    if args.json:
        write_text_atomic(args.json, json.dumps(report, indent=2) + "\n")
    ddp = report["ddp"]
    return 1 if ddp is not None and ddp["ok"] is False else 0


if __name__ == "__main__":
    run_main(main)
