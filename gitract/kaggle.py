"""The same code on a Kaggle kernel: the offline bundle, and what inference will cost there.

Kaggle kernels of this competition run with the internet off. Everything the kernel needs and a
stock Kaggle image may lack is therefore shipped as a Kaggle *dataset* (the bundle):

    kaggle-dataset/
      dataset-metadata.json       for `kaggle datasets create`
      gitract_bundle.json         manifest: what is inside and how it was built
      wheels/                     gitract + the third-party wheels of BUNDLED_WHEELS
      runs/<name>/fold<N>/        best.pt + config.yaml of each trained fold
      runs/<name>/postprocess.json  tuned thresholds, when `evaluate.py --tune` wrote them
    kaggle-kernel/
      kaggle_kernel.py            the kernel (scripts/kaggle_kernel.py, stdlib until installed)
      kaggle_kernel.ipynb         the same code as a one-cell notebook
      kernel-metadata.json        for `kaggle kernels push`

The kernel installs with ``pip install --no-index --no-deps``: only the bundled wheels, never
the network, and never a second torch pulled in by a dependency resolver.

The runtime estimate times the real inference path (:class:`gitract.inference.Ensemble`) on the
device at hand and scales it to the hidden test: folds x views x slices forward passes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from gitract.errors import CheckpointError, GitractError

__all__ = [
    "BUNDLED_WHEELS",
    "COMPETITION",
    "MANIFEST",
    "BundleInfo",
    "RuntimeEstimate",
    "build_bundle",
    "build_gitract_wheel",
    "collect_runs",
    "dataset_metadata",
    "estimate_runtime",
    "fetch_wheel",
    "format_estimate",
    "kernel_metadata",
    "measure_throughput",
    "notebook_from_script",
    "run_config",
]

COMPETITION = "uw-madison-gi-tract-image-segmentation"
MANIFEST = "gitract_bundle.json"
KERNEL_FILE = "kaggle_kernel.py"
NOTEBOOK_FILE = "kaggle_kernel.ipynb"
#: Third-party wheels shipped beside gitract's, with why. All are pure Python (py3-none-any),
#: so they fit whatever Python the Kaggle image has.
BUNDLED_WHEELS: dict[str, str] = {
    "segmentation-models-pytorch": "not in Kaggle images; the network is built with it",
    "timm": (
        "in Kaggle images, but older images carry timm 0.9 (gitract needs >= 1.0); the kernel "
        "installs it only when the image's timm is missing or older"
    ),
}
PLACEHOLDER_USER = "YOUR_KAGGLE_USERNAME"
_RUN_FILES = ("best.pt", "config.yaml")


@dataclass(frozen=True)
class BundleInfo:
    """What :func:`build_bundle` wrote."""

    dataset_dir: Path
    kernel_dir: Path
    wheels: list[Path]
    runs: Path
    folds: list[str]


# --------------------------------------------------------------------------- wheels


def _normalise(name: str) -> str:
    """PEP 503/427 name as it appears in a wheel file name: lower case, runs of -_. -> _."""
    return re.sub(r"[-_.]+", "_", name).lower()


def _first_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else "no output"


def fetch_wheel(name: str, version: str, cache_dir: Path) -> Path:
    """The wheel of ``name==version`` in ``cache_dir``, downloaded (``pip download --no-deps``)
    only when it is not there yet, so a rebuild needs no network."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    pattern = f"{_normalise(name)}-{version}-*.whl"
    found = sorted(p for p in cache_dir.iterdir() if _matches(p.name, pattern))
    if found:
        return found[0]
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:"]
    cmd += ["--dest", str(cache_dir), f"{name}=={version}"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(p for p in cache_dir.iterdir() if _matches(p.name, pattern))
    if result.returncode != 0 or not found:
        raise GitractError(
            f"could not download the wheel of {name}=={version} "
            f"({_first_line(result.stderr or result.stdout)}); put it in {cache_dir} by hand"
        )
    return found[0]


def _matches(filename: str, pattern: str) -> bool:
    """Glob match on the normalised wheel file name (``timm-1.0.31-py3-none-any.whl``)."""
    import fnmatch

    head, _, rest = filename.partition("-")
    return fnmatch.fnmatch(f"{_normalise(head)}-{rest}", pattern)


def build_gitract_wheel(source: Path, out_dir: Path) -> Path:
    """Build gitract's wheel from the source tree, offline.

    The package is copied to a temp folder first so the build leaves no ``build/`` or
    ``*.egg-info`` behind in the checkout, and it is built with the venv's own setuptools
    (``--no-build-isolation``: an isolated build would download setuptools)."""
    pyproject = source / "pyproject.toml"
    if not pyproject.is_file() or not (source / "gitract").is_dir():
        raise GitractError(
            f"{source}: not a gitract source checkout (no pyproject.toml + gitract/); "
            "build the bundle from the repository"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gitract-wheel-") as tmp:
        tree = Path(tmp) / "src"
        tree.mkdir()
        for name in ("pyproject.toml", "README.md", "LICENSE", "setup.cfg", "MANIFEST.in"):
            if (source / name).is_file():
                shutil.copy2(source / name, tree / name)
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
        shutil.copytree(source / "gitract", tree / "gitract", ignore=ignore)
        built = Path(tmp) / "wheel"
        cmd = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-index"]
        cmd += ["--no-build-isolation", "--wheel-dir", str(built), str(tree)]
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(built.glob("gitract-*.whl"))
        if result.returncode != 0 or not wheels:
            raise GitractError(
                f"could not build the gitract wheel from {source} "
                f"({_first_line(result.stderr or result.stdout)})"
            )
        target = out_dir / wheels[0].name
        shutil.copy2(wheels[0], target)
    return target


# --------------------------------------------------------------------------- runs


def collect_runs(runs: Path, dest: Path) -> list[str]:
    """Copy the trained folds of ``runs`` (each ``fold<N>/`` or ``full/`` with a best.pt: its
    best.pt and config.yaml) and ``postprocess.json`` into ``dest``; returns the fold folders.

    last.pt (optimizer state, twice the size) and OOF probabilities are left out."""
    if not runs.is_dir():
        raise CheckpointError(f"{runs}: runs folder not found (train first, or pass --runs)")
    fold_dirs = sorted(p.parent for p in runs.glob("*/best.pt"))
    if not fold_dirs:
        raise CheckpointError(
            f"{runs}: no <fold>/best.pt inside; point --runs at runs/<config name> "
            "after training (python scripts/train.py --fold 0)"
        )
    from gitract.inference import POSTPROCESS_FILE  # torch: only once there is work to do

    dest.mkdir(parents=True, exist_ok=True)
    for fold_dir in fold_dirs:
        (dest / fold_dir.name).mkdir()
        for name in _RUN_FILES:
            if (fold_dir / name).is_file():
                shutil.copy2(fold_dir / name, dest / fold_dir.name / name)
    if (runs / POSTPROCESS_FILE).is_file():
        shutil.copy2(runs / POSTPROCESS_FILE, dest / POSTPROCESS_FILE)
    return [p.name for p in fold_dirs]


def run_config(runs: Path):  # -> gitract.config.Config (lazy import: torch-free module top)
    """The resolved config of a runs folder: its first fold's ``config.yaml``, else the config
    stored in that fold's checkpoint."""
    from gitract.config import config_from_dict, load_config
    from gitract.inference import find_checkpoints
    from gitract.model import load_checkpoint

    first = find_checkpoints(runs)[0]
    if (first.parent / "config.yaml").is_file():
        return load_config(first.parent / "config.yaml")
    return config_from_dict(load_checkpoint(first)["config"], source=f"checkpoint {first}")


# --------------------------------------------------------------------------- metadata


def dataset_metadata(user: str, slug: str, title: str | None = None) -> dict:
    """``dataset-metadata.json`` for ``kaggle datasets create -p <dir> --dir-mode zip``."""
    return {
        "title": title or slug.replace("-", " "),
        "id": f"{user}/{slug}",
        "licenses": [{"name": "CC0-1.0"}],
    }


def kernel_metadata(user: str, kernel_slug: str, dataset_slug: str) -> dict:
    """``kernel-metadata.json`` for ``kaggle kernels push``: the competition's data and the
    bundle as inputs, internet off (required to submit), a GPU on."""
    return {
        "id": f"{user}/{kernel_slug}",
        "title": kernel_slug.replace("-", " "),
        "code_file": NOTEBOOK_FILE,
        "language": "python",
        "kernel_type": "notebook",
        "is_private": True,
        "enable_gpu": True,
        "enable_internet": False,
        "dataset_sources": [f"{user}/{dataset_slug}"],
        "competition_sources": [COMPETITION],
        "kernel_sources": [],
        "model_sources": [],
    }


def notebook_from_script(source: str) -> dict:
    """A one-cell notebook (nbformat 4) holding ``source`` as it is."""
    lines = source.splitlines(keepends=True)
    return {
        "cells": [
            {
                "cell_type": "code",
                "execution_count": None,
                "metadata": {},
                "outputs": [],
                "source": lines,
            }
        ],
        "metadata": {
            "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
            "language_info": {"name": "python"},
        },
        "nbformat": 4,
        "nbformat_minor": 5,
    }


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _replace_dir(staged: Path, target: Path) -> None:
    """Put ``staged`` at ``target``, dropping an older ``target``: a failed build never leaves a
    half-written bundle where a complete one was."""
    if target.exists():
        old = target.with_name(f".{target.name}.old.{os.getpid()}")
        os.replace(target, old)
        os.replace(staged, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staged, target)


# --------------------------------------------------------------------------- the bundle


def build_bundle(
    runs: Path,
    dataset_dir: Path,
    kernel_dir: Path,
    kernel_script: Path,
    wheel_cache: Path,
    source: Path,
    user: str | None = None,
    dataset_slug: str = "gitract-bundle",
    kernel_slug: str = "gitract-submission",
) -> BundleInfo:
    """Write the Kaggle dataset (wheels, runs, metadata) and the kernel folder.

    Third-party wheels are the installed versions of :data:`BUNDLED_WHEELS`, taken from
    ``wheel_cache`` (downloaded there once); gitract's is built from ``source``."""
    user = user or os.environ.get("KAGGLE_USERNAME") or PLACEHOLDER_USER
    if not kernel_script.is_file():
        raise GitractError(f"{kernel_script}: kernel script not found")
    for folder in (dataset_dir, kernel_dir):
        folder.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=f".{dataset_dir.name}.", dir=dataset_dir.parent))
    staged_kernel = Path(tempfile.mkdtemp(prefix=f".{kernel_dir.name}.", dir=kernel_dir.parent))
    try:
        run_dest = staged / "runs" / runs.resolve().name
        folds = collect_runs(runs, run_dest)
        wheels_dir = staged / "wheels"
        wheels = [build_gitract_wheel(source, wheels_dir)]
        for name in BUNDLED_WHEELS:
            try:
                version = importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                raise GitractError(f"{name} is not installed here: cannot bundle it") from None
            cached = fetch_wheel(name, version, wheel_cache)
            shutil.copy2(cached, wheels_dir / cached.name)
            wheels.append(wheels_dir / cached.name)
        manifest = {
            "gitract": importlib.metadata.version("gitract"),
            "run": run_dest.name,
            "folds": folds,
            "wheels": {w.name: _sha256(w) for w in wheels},
            "bundled_because": BUNDLED_WHEELS,
            "install": "pip install --no-index --no-deps --find-links wheels "
            "gitract segmentation-models-pytorch",
        }
        _write_json(staged / MANIFEST, manifest)
        _write_json(staged / "dataset-metadata.json", dataset_metadata(user, dataset_slug))

        script = kernel_script.read_text(encoding="utf-8")
        (staged_kernel / KERNEL_FILE).write_text(script, encoding="utf-8")
        _write_json(staged_kernel / NOTEBOOK_FILE, notebook_from_script(script))
        _write_json(
            staged_kernel / "kernel-metadata.json",
            kernel_metadata(user, kernel_slug, dataset_slug),
        )
        _replace_dir(staged, dataset_dir)
        _replace_dir(staged_kernel, kernel_dir)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
        shutil.rmtree(staged_kernel, ignore_errors=True)
    return BundleInfo(
        dataset_dir,
        kernel_dir,
        [dataset_dir / "wheels" / w.name for w in wheels],
        dataset_dir / "runs" / run_dest.name,
        folds,
    )


# --------------------------------------------------------------------------- runtime estimate


@dataclass(frozen=True)
class RuntimeEstimate:
    """Forward passes of the hidden test and the wall time they take at the measured speed."""

    slices: int
    folds: int
    views: int
    images_per_second: float
    device: str
    batch_size: int
    img_size: tuple[int, int]
    model: str

    @property
    def forward_passes(self) -> int:
        return self.slices * self.folds * self.views

    @property
    def seconds(self) -> float:
        return self.forward_passes / self.images_per_second


def measure_throughput(ensemble, batch_size: int, batches: int = 3) -> float:
    """Images per second of ``ensemble.predict`` (one model, no TTA: one forward pass per
    image) on random inputs of the configured size, after one warm-up batch."""
    import torch

    data = ensemble.data_config
    height, width = data.img_size
    images = torch.rand(batch_size, data.in_channels, height, width)
    ensemble.predict(images)  # warm-up: cuDNN autotuning, lazy allocations
    if ensemble.device.type == "cuda":
        torch.cuda.synchronize(ensemble.device)
    start = time.perf_counter()
    for _ in range(batches):
        ensemble.predict(images)
    if ensemble.device.type == "cuda":
        torch.cuda.synchronize(ensemble.device)
    return batch_size * batches / (time.perf_counter() - start)


def estimate_runtime(
    slices: int,
    runs: Path | None = None,
    config: Path | None = None,
    folds: int | None = None,
    batch_size: int | None = None,
    batches: int = 3,
    device=None,
) -> RuntimeEstimate:
    """Time one model of ``runs`` (or, random-init, of ``config``) and scale to ``slices``
    x folds x TTA views. Folds: ``folds``, else the runs' count, else 5 for a config. The batch
    is the config's ``infer.batch_size`` on a GPU, 2 on a CPU (a B7 batch of 32 takes minutes)."""
    import torch

    from gitract.config import load_config
    from gitract.inference import Ensemble, find_checkpoints
    from gitract.model import build_model, load_checkpoint, load_model_from_checkpoint

    if slices < 1 or batches < 1:
        raise GitractError(f"--slices and --batches must be >= 1, got {slices}, {batches}")
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if runs is not None:
        paths = find_checkpoints(runs)
        model, cfg = load_model_from_checkpoint(load_checkpoint(paths[0]), source=str(paths[0]))
        n_folds = folds or len(paths)
    elif config is not None:
        cfg = load_config(config)
        model_cfg = dataclasses.replace(cfg.model, encoder_weights=None)
        model = build_model(model_cfg, in_channels=cfg.data.in_channels).eval()
        n_folds = folds or 5
    else:
        raise GitractError("estimate: give --runs (trained folds) or --config")
    model = model.to(device).eval()
    on_cuda = device.type == "cuda"
    channels_last = on_cuda and cfg.train.channels_last
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    ensemble = Ensemble([model], [cfg], device, (), on_cuda and cfg.train.amp, channels_last)
    batch = batch_size or (cfg.infer.batch_size if on_cuda else 2)
    speed = measure_throughput(ensemble, batch, batches)
    name = f"{cfg.model.arch}/{cfg.model.encoder_name}"
    if on_cuda:
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = f"cpu ({torch.get_num_threads()} threads)"
    return RuntimeEstimate(
        slices,
        n_folds,
        1 + len(cfg.infer.tta_flips),
        speed,
        device_name,
        batch,
        (cfg.data.img_size[0], cfg.data.img_size[1]),
        name,
    )


def format_estimate(est: RuntimeEstimate, limit_hours: float = 9.0) -> str:
    """Human-readable estimate, with the arithmetic spelled out and the 9-hour limit checked."""
    hours = est.seconds / 3600
    verdict = "fits" if hours <= limit_hours else "does NOT fit"
    h, w = est.img_size
    return "\n".join(
        [
            f"model            {est.model} at {h}x{w}, batch {est.batch_size}, on {est.device}",
            f"measured         {est.images_per_second:.2f} images/s (one forward pass each)",
            f"forward passes   {est.slices} slices x {est.folds} folds x {est.views} views "
            f"= {est.forward_passes}",
            f"expected time    {est.forward_passes} / {est.images_per_second:.2f} = "
            f"{est.seconds:.0f} s = {hours:.2f} h (model only; PNG decoding and RLE overlap "
            "with it in DataLoader workers)",
            f"kaggle limit     {limit_hours:g} h: {verdict}",
        ]
    )
