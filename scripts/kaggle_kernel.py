"""gitract on a Kaggle kernel: install the bundle offline, predict the test set, write
/kaggle/working/submission.csv. Paste this file into a notebook's single cell, or push
dist/kaggle-kernel/ (made by `make kaggle`) with `kaggle kernels push`.

    python kaggle_kernel.py                                  # the submission
    python kaggle_kernel.py --estimate [--slices 25000] [--runs R [R2 ...] | --config C]

Every bundle (build_kaggle.py --runs A [B ...] / --ensemble FILE) holds an ensemble.json: the
kernel blends its members with their weights, a single run being a blend of one (the monai
wheel is installed when one is 3D). --estimate times each 2.5D member on this device and counts
every member's forward passes and FLOPs against the limit.

Inputs: the competition data, and the bundle dataset (any name; found by its gitract wheel)
under <root>/input/. <root> is /kaggle unless $GITRACT_KAGGLE_ROOT names another. The
standard library only until gitract is installed: `pip install --no-index --no-deps` from the
bundle's wheels, so nothing is ever fetched from the network.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

COMPETITION = "uw-madison-gi-tract-image-segmentation"
# Always installed from the bundle; timm only when the image's is missing or older than 1.0.
REQUIRED = ("gitract", "segmentation-models-pytorch")
MIN_TIMM = (1, 0)
SEARCH_DEPTH = 4  # input/<dataset>/[<zip folder>/]wheels/gitract-*.whl
ENSEMBLE_FILE = "ensemble.json"  # gitract.kaggle.bundle.ENSEMBLE_FILE


class KernelError(Exception):
    """Something about the kernel's inputs the user can fix; printed on one line."""


def kaggle_root() -> Path:
    return Path(os.environ.get("GITRACT_KAGGLE_ROOT") or "/kaggle")


def find_bundle(input_dir: Path) -> Path:
    """The folder of the bundle's wheels: the one holding a gitract-*.whl in some dataset
    under ``input_dir`` (any dataset name, up to a few folders deep)."""
    if not input_dir.is_dir():
        raise KernelError(f"{input_dir}: input folder not found")
    found = []
    for dataset in sorted(input_dir.iterdir()):
        if not dataset.is_dir() or dataset.name == COMPETITION:
            continue
        for depth in range(SEARCH_DEPTH):
            found += dataset.glob("/".join(["*"] * depth + ["gitract-*.whl"]))
    folders = sorted({p.parent for p in found})
    if not folders:
        raise KernelError(
            f"no gitract-*.whl in any dataset under {input_dir}: add the bundle dataset "
            "(dist/kaggle-dataset, made by `make kaggle`) to this notebook's inputs"
        )
    if len(folders) > 1:
        raise KernelError(
            f"several gitract bundles under {input_dir}: {', '.join(map(str, folders))}; "
            "attach only one"
        )
    return folders[0]


def find_blend(bundle: Path) -> tuple[Path | None, list[Path]]:
    """(ensemble.json or None, every runs folder of the bundle): build_kaggle.py writes an
    ensemble.json into every bundle; runs without one are blended with equal weights."""
    runs = sorted({p.parent.parent for p in bundle.rglob("best.pt")})
    if not runs:
        raise KernelError(f"{bundle}: no trained folds (<fold>/best.pt) in the bundle")
    ensembles = sorted(bundle.rglob(ENSEMBLE_FILE))
    if len(ensembles) > 1:
        raise KernelError(f"{bundle}: several {ENSEMBLE_FILE} ({', '.join(map(str, ensembles))})")
    return (ensembles[0] if ensembles else None), runs


def _timm_too_old() -> bool:
    try:
        version = importlib.metadata.version("timm")
    except importlib.metadata.PackageNotFoundError:
        return True
    parts = []
    for piece in version.split(".")[:2]:
        digits = "".join(c for c in piece if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts) < MIN_TIMM


def install(wheels: Path) -> None:
    """pip install gitract + smp (+ timm if needed) from ``wheels`` only.

    --no-index: never the network. --no-deps: the image's torch, numpy, opencv... are used as
    they are; a resolver must not try to replace them. Pip's own config files and PIP_*
    variables are ignored, so nothing adds another index or find-links."""
    packages = list(REQUIRED)
    if _timm_too_old() and any(wheels.glob("timm-*.whl")):
        packages.append("timm")
    if any(wheels.glob("monai-*.whl")):  # bundled only for a blend with a 3D run
        packages.append("monai")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps"]
    cmd += ["--find-links", str(wheels), *packages]
    print("$", " ".join(cmd), flush=True)
    result = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines() or ["no output"]
        raise KernelError(f"offline install from {wheels} failed: {lines[-1]}")
    importlib.invalidate_caches()


def cache_dir(root: Path) -> Path:
    """Where the volume cache goes: <root>/tmp (beside working/, whose files Kaggle keeps as
    the kernel's output), else the system temp folder; never the read-only input."""
    import tempfile

    for candidate in (root / "tmp" / "gitract_cache", Path(tempfile.gettempdir()) / "gitract"):
        try:
            candidate.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(candidate, os.W_OK):
            return candidate
    raise KernelError(f"no writable folder for the volume cache under {root} or the temp folder")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--runs", nargs="+", help="trained folds (default: the bundle's); several: a blend"
    )
    parser.add_argument("--weights", type=float, nargs="+", help="blend weights, one per run")
    parser.add_argument("--estimate", action="store_true", help="estimate the run time instead")
    parser.add_argument("--slices", type=int, default=25000, help="hidden test size (estimate)")
    parser.add_argument(
        "--case-days", type=int, default=170, help="hidden test case-days (estimate, 3D tiles)"
    )
    parser.add_argument("--tflops-2d", type=float, help="estimate: assumed 2.5D TFLOP/s")
    parser.add_argument("--tflops-3d", type=float, help="estimate: assumed 3D TFLOP/s")
    parser.add_argument("--config", help="estimate for a config's model (random init) instead")
    parser.add_argument("--folds", type=int, help="estimate: number of folds (default: runs')")
    parser.add_argument("--batch-size", type=int, help="estimate: batch size to time")
    parser.add_argument("--batches", type=int, default=3, help="estimate: batches to time")
    parser.add_argument("--num-workers", type=int, help="DataLoader workers (default: config)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    # parse_known_args: in a notebook cell, sys.argv holds ipykernel's own arguments.
    args, _ = parser.parse_known_args()
    return args


def ensure_gitract(root: Path, force: bool) -> Path | None:
    """Install from the bundle (always in a kernel; for --estimate only when gitract is not
    importable yet). Returns the bundle's wheels folder, or None when none was needed."""
    if not force and importlib.util.find_spec("gitract") is not None:
        return None
    wheels = find_bundle(root / "input")
    install(wheels)
    return wheels


def resolve_runs(args: argparse.Namespace, bundle: Path | None):
    """What to predict with, always a BlendSpec (a single run is a blend of one): --runs A
    [B ...] [--weights], else the bundle's ensemble.json, else its runs with equal weights."""
    from gitract.inference.blend import blend_spec, read_ensemble

    if args.runs:
        return blend_spec([Path(r) for r in args.runs], args.weights)
    if bundle is None:
        raise KernelError("no bundle and no --runs")
    ensemble, runs = find_blend(bundle)
    if ensemble is not None:
        return read_ensemble(ensemble, base=ensemble.parent)
    return blend_spec(runs, None, runs[0] if len(runs) == 1 else bundle)


def predict(args: argparse.Namespace, root: Path) -> Path:
    """Install, then gitract's own inference with every path given explicitly."""
    start = time.perf_counter()
    data_dir = root / "input" / COMPETITION
    if not (data_dir / "sample_submission.csv").is_file():
        raise KernelError(f"{data_dir}: no sample_submission.csv (add the competition's data)")
    # The volume cache must not go to the read-only input nor into the kernel's saved output.
    os.environ["GITRACT_CACHE_DIR"] = str(cache_dir(root))
    wheels = ensure_gitract(root, force=True)
    spec = resolve_runs(args, wheels.parent)

    from gitract.inference.submission import infer_test
    from gitract.kaggle.bundle import run_config
    from gitract.training.distributed import resolve_num_workers

    cfg = run_config(spec.members[0].run)
    workers = args.num_workers
    if workers is None:
        workers = resolve_num_workers(cfg.data.num_workers)
    out = root / "working" / "submission.csv"
    described = " + ".join(f"{m.run} x {m.weight:g}" for m in spec.members)
    print(f"runs {described}, data {data_dir}, cache {os.environ['GITRACT_CACHE_DIR']}", flush=True)
    cfg.data.cache_dir = os.environ["GITRACT_CACHE_DIR"]
    infer_test(cfg, data_dir, spec, out=out, num_workers=workers, progress=not args.no_progress)
    print(f"wrote {out} in {time.perf_counter() - start:.1f} s", flush=True)
    return out


def estimate(args: argparse.Namespace, root: Path) -> None:
    """A config's model timed here (random init); else every 2.5D member of the runs timed
    here, then the whole blend's forward passes and FLOPs at assumed speeds."""
    wheels = ensure_gitract(root, force=False)

    from gitract.kaggle.bundle import run_config
    from gitract.kaggle.estimate import (
        estimate_blend,
        estimate_runtime,
        format_blend_estimate,
        format_estimate,
    )
    from gitract.models.kinds import kind_of

    timing = {"folds": args.folds, "batch_size": args.batch_size, "batches": args.batches}
    if args.config:
        est = estimate_runtime(args.slices, None, Path(args.config), **timing)
        print(format_estimate(est), flush=True)
        return
    bundle = None if args.runs else (wheels or find_bundle(root / "input")).parent
    spec = resolve_runs(args, bundle)
    for member in spec.members:  # the slice-wise (2.5D) ones: timed on this device
        if kind_of(run_config(member.run)).slice_wise:
            est = estimate_runtime(args.slices, member.run, **timing)
            print(format_estimate(est), flush=True)
    tflops = {k: v for k, v in (("2.5d", args.tflops_2d), ("3d", args.tflops_3d)) if v}
    members = estimate_blend(spec.members, args.slices, args.case_days, args.folds)
    print(format_blend_estimate(members, args.slices, args.case_days, tflops), flush=True)


def main() -> None:
    args = parse_args()
    root = kaggle_root()
    # Internet is off: albumentations would look up its latest version on PyPI at import, and
    # nothing may ask the Hugging Face hub for weights (the checkpoints hold them all).
    os.environ["NO_ALBUMENTATIONS_UPDATE"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"
    if args.estimate:
        estimate(args, root)
    else:
        predict(args, root)


def run() -> None:
    """main() with one-line errors: KernelError before gitract is importable, GitractError
    after."""
    try:
        main()
    except KernelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except Exception as exc:
        errors = sys.modules.get("gitract.errors")
        if errors is not None and isinstance(exc, errors.GitractError):
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)
        raise


if __name__ == "__main__":
    run()
