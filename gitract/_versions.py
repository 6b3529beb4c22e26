"""The oldest version of each dependency whose API gitract uses, checked at ``import gitract``.

pip honours the same floors in pyproject.toml, but Kaggle images and hand-made environments
bring their own packages; an old one would otherwise fail deep inside a training step (e.g.
``torch.amp.GradScaler("cuda")`` is torch >= 2.3) instead of with one line at start-up.
Versions are read from the installed distributions' metadata: nothing is imported.
"""

from __future__ import annotations

import re
from importlib import metadata

__all__ = ["MINIMUM", "check_versions"]

#: distribution name(s) -> (oldest version, what of it gitract needs, where one API sets it;
#: else the floor the project is tested from). The first installed of several names counts
#: (OpenCV ships under four).
MINIMUM: dict[tuple[str, ...], tuple[str, str]] = {
    ("torch",): ("2.3", 'torch.amp.GradScaler("cuda")'),
    ("segmentation-models-pytorch",): ("0.5", "Hugging Face weights, timm- to tu- mapping"),
    ("timm",): ("1.0", ""),
    ("albumentations",): ("2.0", "fill/fill_mask, Compose.set_random_seed"),
    ("pydantic",): ("2.9", "v2 models: the run config"),
    ("numpy",): ("1.24", ""),
    ("pandas",): ("2.0", ""),
    (
        "opencv-python-headless",
        "opencv-python",
        "opencv-contrib-python-headless",
        "opencv-contrib-python",
    ): ("4.8", ""),
    ("scipy",): ("1.10", ""),
    ("scikit-learn",): ("1.3", ""),
}


def _numbers(version: str) -> tuple[int, ...]:
    """(2, 15, 0) from '2.15.0+cu132', (2, 0) from '2.0rc1': the leading numeric release."""
    found = re.match(r"\d+(?:\.\d+)*", version)
    return tuple(int(part) for part in found[0].split(".")) if found else ()


def _installed(names: tuple[str, ...]) -> tuple[str, str] | None:
    for name in names:
        try:
            return name, metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None  # not installed at all: its own import will say so


def check_versions() -> None:
    """ImportError naming the first installed dependency older than gitract needs."""
    for names, (floor, why) in MINIMUM.items():
        found = _installed(names)
        if found is None:
            continue
        name, version = found
        if _numbers(version) < _numbers(floor):
            because = f" ({why})" if why else ""
            raise ImportError(
                f"gitract needs {name}>={floor}{because}, found {version}: "
                f"pip install -U '{name}>={floor}'"
            )
