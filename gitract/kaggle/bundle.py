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
"""

from __future__ import annotations

import fnmatch
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from gitract.atomic import disk_full, out_of_space
from gitract.config import Config
from gitract.errors import CheckpointError, GitractError
from gitract.postprocess.steps import POSTPROCESS_FILE

# torch and the gitract modules that import it (inference, blend, models) are imported inside
# the functions that use them: the module loads, and bad input fails, without torch.
if TYPE_CHECKING:
    from gitract.inference.blend import BlendSpec

__all__ = [
    "BUNDLED_WHEELS",
    "COMPETITION",
    "ENSEMBLE_FILE",
    "MANIFEST",
    "WHEELS_3D",
    "BundleInfo",
    "build_bundle",
    "build_gitract_wheel",
    "collect_runs",
    "dataset_metadata",
    "fetch_wheel",
    "kernel_metadata",
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
#: Wheels added only when a 3D run is in the blend (pure Python too).
WHEELS_3D: dict[str, str] = {
    "monai": "not in Kaggle images; the 3D networks and sliding-window inference come from it",
}
#: The blend's description in a bundle of several runs (read by the kernel).
ENSEMBLE_FILE = "ensemble.json"
PLACEHOLDER_USER = "YOUR_KAGGLE_USERNAME"
_RUN_FILES = ("best.pt", "config.yaml")


@dataclass(frozen=True)
class BundleInfo:
    """What :func:`build_bundle` wrote."""

    dataset_dir: Path
    kernel_dir: Path
    wheels: list[Path]
    folds: list[str]  # <run name>/<fold folder>
    ensemble: Path  # ensemble.json: the members, their weights, the blend's folder


# --------------------------------------------------------------------------- wheels


def _normalise(name: str) -> str:
    """PEP 503/427 name as it appears in a wheel file name: lower case, runs of -_. -> _."""
    return re.sub(r"[-_.]+", "_", name).lower()


def _last_line(text: str) -> str:
    """pip's last non-empty output line: where it states the error."""
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
            f"({_last_line(result.stderr or result.stdout)}); put it in {cache_dir} by hand"
        )
    return found[0]


def _matches(filename: str, pattern: str) -> bool:
    """Glob match on the normalised wheel file name (``timm-1.0.31-py3-none-any.whl``)."""
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
                f"({_last_line(result.stderr or result.stdout)})"
            )
        target = out_dir / wheels[0].name
        shutil.copy2(wheels[0], target)
    return target


# --------------------------------------------------------------------------- runs


def collect_runs(runs: Path, dest: Path) -> list[str]:
    """Copy the trained folds of ``runs`` (each ``fold<N>/`` or ``full/`` with a best.pt: its
    best.pt and config.yaml) and its ``postprocess.json`` into ``dest``; returns the fold
    folders.

    last.pt (optimizer state, twice the size) and OOF probabilities are left out."""
    if not runs.is_dir():
        raise CheckpointError(f"{runs}: runs folder not found (train first, or pass --runs)")
    fold_dirs = sorted(p.parent for p in runs.glob("*/best.pt"))
    if not fold_dirs:
        raise CheckpointError(
            f"{runs}: no <fold>/best.pt inside; point --runs at runs/<config name> "
            "after training (python scripts/train.py --fold 0)"
        )
    dest.mkdir(parents=True, exist_ok=True)
    for fold_dir in fold_dirs:
        (dest / fold_dir.name).mkdir()
        for name in _RUN_FILES:
            if (fold_dir / name).is_file():
                shutil.copy2(fold_dir / name, dest / fold_dir.name / name)
    if (runs / POSTPROCESS_FILE).is_file():
        shutil.copy2(runs / POSTPROCESS_FILE, dest / POSTPROCESS_FILE)
    return [p.name for p in fold_dirs]


def run_config(runs: Path) -> Config:
    """The resolved config of a runs folder: that of its first fold (``run_config_of``)."""
    from gitract.models.checkpoint import find_checkpoints, run_config_of

    return run_config_of(find_checkpoints(runs)[0])


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


def _is_3d(run: Path) -> bool:
    """Whether the run's model kind needs MONAI's wheel in the bundle."""
    from gitract.models.kinds import kind_of  # torch and the model stack: see the top

    return "monai" in kind_of(run_config(run)).extra_wheels


def build_bundle(
    spec: BlendSpec,
    out: Path,
    source: Path,
    *,
    wheel_cache: Path | None = None,
    user: str | None = None,
    dataset_slug: str = "gitract-bundle",
    kernel_slug: str = "gitract-submission",
    postprocess: Path | None = None,
) -> BundleInfo:
    """Write ``out/kaggle-dataset`` (wheels, runs, metadata) and ``out/kaggle-kernel`` (the
    kernel ``source/scripts/kaggle_kernel.py`` as script and notebook).

    ``spec``: the runs and weights (a single run is a blend of one). Every member's folds go
    under ``runs/<name>/`` and ``ensemble.json`` names them with their weights and the folder
    of the blend's ``postprocess.json`` (``postprocess``, else the one in the spec's folder):
    a single run keeps its own (``dir: runs/<name>``), a blend of several has it at the top.
    Third-party wheels are the installed versions of :data:`BUNDLED_WHEELS`, plus
    :data:`WHEELS_3D` when a run is 3D, downloaded once into ``wheel_cache`` (default
    ``out/wheel-cache``); gitract's is built from ``source``."""
    dataset_dir, kernel_dir = out / "kaggle-dataset", out / "kaggle-kernel"
    kernel_script = source / "scripts" / KERNEL_FILE
    wheel_cache = wheel_cache or out / "wheel-cache"
    user = user or os.environ.get("KAGGLE_USERNAME") or PLACEHOLDER_USER
    if not kernel_script.is_file():
        raise GitractError(f"{kernel_script}: kernel script not found")
    names = [m.run.resolve().name for m in spec.members]
    if len(set(names)) != len(names):
        raise GitractError(f"blend: two runs share a folder name ({', '.join(names)})")
    if postprocess is not None and not Path(postprocess).is_file():
        raise GitractError(f"{postprocess}: no such post-processing file")
    if postprocess is None and (spec.dir / POSTPROCESS_FILE).is_file():
        postprocess = spec.dir / POSTPROCESS_FILE
    # The blend's folder inside the bundle: a member's own folder when the spec's is one.
    own = [
        name
        for member, name in zip(spec.members, names, strict=True)
        if member.run.resolve() == spec.dir.resolve()
    ]
    blend_dir = f"runs/{own[0]}" if own else "."
    out.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=f".{dataset_dir.name}.", dir=out))
    staged_kernel = Path(tempfile.mkdtemp(prefix=f".{kernel_dir.name}.", dir=out))
    try:
        folds = []
        for member, name in zip(spec.members, names, strict=True):
            folds += [f"{name}/{f}" for f in collect_runs(member.run, staged / "runs" / name)]
        ensemble = {
            "members": [
                {"run": f"runs/{name}", "weight": m.weight}
                for m, name in zip(spec.members, names, strict=True)
            ],
            "dir": blend_dir,
        }
        _write_json(staged / ENSEMBLE_FILE, ensemble)
        if postprocess is not None:
            shutil.copy2(postprocess, staged / blend_dir / POSTPROCESS_FILE)
        with_3d = any(_is_3d(m.run) for m in spec.members)
        wheels_dir = staged / "wheels"
        wheels = [build_gitract_wheel(source, wheels_dir)]
        third_party = {**BUNDLED_WHEELS, **(WHEELS_3D if with_3d else {})}
        for name in third_party:
            try:
                version = importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                raise GitractError(f"{name} is not installed here: cannot bundle it") from None
            cached = fetch_wheel(name, version, wheel_cache)
            shutil.copy2(cached, wheels_dir / cached.name)
            wheels.append(wheels_dir / cached.name)
        packages = "gitract segmentation-models-pytorch" + (" monai" if with_3d else "")
        manifest = {
            "gitract": importlib.metadata.version("gitract"),
            "runs": names,
            "folds": folds,
            "ensemble": ENSEMBLE_FILE,
            "wheels": {w.name: _sha256(w) for w in wheels},
            "bundled_because": third_party,
            "install": f"pip install --no-index --no-deps --find-links wheels {packages}",
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
    except OSError as err:
        if out_of_space(err):
            raise disk_full(dataset_dir) from None
        raise
    finally:
        shutil.rmtree(staged, ignore_errors=True)
        shutil.rmtree(staged_kernel, ignore_errors=True)
    return BundleInfo(
        dataset_dir,
        kernel_dir,
        [dataset_dir / "wheels" / w.name for w in wheels],
        folds,
        dataset_dir / ENSEMBLE_FILE,
    )
