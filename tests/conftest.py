"""Shared fixtures: a tiny data set in the exact Kaggle layout, written with numpy + cv2 only.

It does not use the synthetic generator, so data and folds tests pin the Kaggle format itself
(real 16-bit PNGs, width-first file names, a 360 wide x 310 high slice, row-major RLE) rather
than whatever the generator happens to write.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from gitract.data.layout import CLASSES
from gitract.data.rle import rle_encode

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")
needs_torchrun = pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed")


def run_torchrun(
    script: str | Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=2 script args`` from the project root, one
    thread a process (2 processes on 2 cores), output captured."""
    cmd = [str(TORCHRUN), "--standalone", "--nproc_per_node=2", str(script), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)


# ../shared/real/ from the project root; absent in a user's fresh clone, so its tests skip.
REAL_ANNOTATIONS = (
    Path(__file__).resolve().parents[1].parent / "shared" / "real" / "uwmgi_annotations_subset.csv"
)


@dataclass(frozen=True)
class CaseDay:
    """One case-day of the tiny data set: its slices share one size and pixel spacing."""

    case: int
    day: int
    n_slices: int
    width: int
    height: int
    spacing: float = 1.5


# Sizes of the real data: 266x266 (most), 360 wide x 310 high, 276x276 (spacing 1.63), 234x234.
# case7_day0 is in DEFAULT_EXCLUDE, so the default table drops it.
TINY_LAYOUT: tuple[CaseDay, ...] = (
    CaseDay(1, 0, 4, 360, 310),
    CaseDay(1, 2, 3, 266, 266),
    CaseDay(2, 0, 3, 276, 276, 1.63),
    CaseDay(3, 5, 2, 234, 234),
    CaseDay(7, 0, 2, 266, 266),
)
TINY_TEST_LAYOUT: tuple[CaseDay, ...] = (CaseDay(99, 0, 2, 360, 310),)


@dataclass
class TinyKaggle:
    """What write_tiny_kaggle wrote, so tests can compare what the code reads with the truth."""

    root: Path
    images: dict[str, np.ndarray] = field(default_factory=dict)  # id -> uint16 (H, W)
    masks: dict[str, np.ndarray] = field(default_factory=dict)  # id -> uint8 (H, W, 3)
    paths: dict[str, Path] = field(default_factory=dict)  # id -> PNG path (train and test)
    test_ids: list[str] = field(default_factory=list)

    @property
    def train_csv(self) -> Path:
        return self.root / "train.csv"

    def ids(self, case_day: str | None = None) -> list[str]:
        """Labelled ids in file order, optionally of one case-day ("case1_day0")."""
        return [i for i in self.masks if case_day is None or i.startswith(case_day + "_")]


def _shapes(rng: np.random.Generator, height: int, width: int, index: int) -> np.ndarray:
    """Asymmetric organ-like masks; slice 0 of each case-day is empty (like most real slices)."""
    mask = np.zeros((height, width, len(CLASSES)), dtype=np.uint8)
    if index == 0:
        return mask
    # large_bowel: a wide, flat bar in the top right (a transpose would move it to the left).
    top = int(rng.integers(5, 20))
    mask[top : top + 15, width // 2 : width - 5, 0] = 1
    # small_bowel: a filled ellipse off-centre, on every other slice. (cv2 draws only into
    # contiguous arrays, so draw into a plane and copy it in.)
    if index % 2 == 1:
        plane = np.zeros((height, width), dtype=np.uint8)
        centre = (int(width * 0.3), int(height * 0.6))
        cv2.ellipse(plane, centre, (width // 8, height // 12), 20, 0, 360, 1, -1)
        mask[..., 1] = plane
    # stomach: a triangle near the bottom left, on slices after the first two.
    if index >= 2:
        plane = np.zeros((height, width), dtype=np.uint8)
        pts = np.array([[10, height - 10], [width // 3, height - 10], [10, height // 2]])
        cv2.fillPoly(plane, [pts.astype(np.int32)], 1)
        mask[..., 2] = plane
    return mask


def write_png16(path: Path, image: np.ndarray) -> None:
    """Write a 2D uint16 array as a 16-bit grayscale PNG, creating folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), image):
        raise OSError(f"cv2 could not write {path}")


def slice_path(root: Path, split: str, cd: CaseDay, number: int) -> Path:
    """The Kaggle path of a slice: width first in the file name."""
    name = f"slice_{number:04d}_{cd.width}_{cd.height}_{cd.spacing:.2f}_{cd.spacing:.2f}.png"
    return root / split / f"case{cd.case}" / f"case{cd.case}_day{cd.day}" / "scans" / name


def write_tiny_kaggle(
    root: Path,
    layout: Sequence[CaseDay] = TINY_LAYOUT,
    test_layout: Sequence[CaseDay] = TINY_TEST_LAYOUT,
    seed: int = 0,
) -> TinyKaggle:
    """Write ``train/``, ``test/``, ``train.csv`` and ``sample_submission.csv`` under ``root``.

    Layout entries are :class:`CaseDay` or plain tuples ``(case, day, n_slices, width, height
    [, spacing])``.
    """
    layout = [cd if isinstance(cd, CaseDay) else CaseDay(*cd) for cd in layout]
    test_layout = [cd if isinstance(cd, CaseDay) else CaseDay(*cd) for cd in test_layout]
    rng = np.random.default_rng(seed)
    out = TinyKaggle(root=Path(root))
    rows = []
    for cd in layout:
        for index in range(cd.n_slices):
            number = index + 1
            sid = f"case{cd.case}_day{cd.day}_slice_{number:04d}"
            image = rng.integers(0, 15866, size=(cd.height, cd.width), dtype=np.uint16)
            path = slice_path(out.root, "train", cd, number)
            write_png16(path, image)
            mask = _shapes(rng, cd.height, cd.width, index)
            out.images[sid], out.masks[sid], out.paths[sid] = image, mask, path
            rows += [(sid, c, rle_encode(mask[..., k])) for k, c in enumerate(CLASSES)]
    pd.DataFrame(rows, columns=["id", "class", "segmentation"]).to_csv(out.train_csv, index=False)

    sub = []
    for cd in test_layout:
        for number in range(1, cd.n_slices + 1):
            sid = f"case{cd.case}_day{cd.day}_slice_{number:04d}"
            image = rng.integers(0, 15866, size=(cd.height, cd.width), dtype=np.uint16)
            path = slice_path(out.root, "test", cd, number)
            write_png16(path, image)
            out.images[sid], out.paths[sid] = image, path
            out.test_ids.append(sid)
            sub += [(sid, c, "") for c in CLASSES]
    pd.DataFrame(sub, columns=["id", "class", "predicted"]).to_csv(
        out.root / "sample_submission.csv", index=False
    )
    return out


@pytest.fixture
def tiny_kaggle(tmp_path: Path) -> TinyKaggle:
    """A fresh tiny Kaggle-layout data set in ``tmp_path/kaggle`` (TINY_LAYOUT, seed 0)."""
    return write_tiny_kaggle(tmp_path / "kaggle")


@pytest.fixture
def make_tiny_kaggle(tmp_path: Path) -> Callable[..., TinyKaggle]:
    """Factory: ``make_tiny_kaggle(name="x", layout=[(case, day, n, w, h), ...], test_layout=...,
    seed=...)`` writes a data set in ``tmp_path/name`` and returns its :class:`TinyKaggle`."""

    def make(name: str = "custom", **kwargs) -> TinyKaggle:
        return write_tiny_kaggle(tmp_path / name, **kwargs)

    return make


@pytest.fixture
def real_annotations() -> pd.DataFrame:
    """Real train.csv rows (id,class,segmentation,width,height); skips where the file is absent."""
    if not REAL_ANNOTATIONS.is_file():
        pytest.skip(f"real annotations not found at {REAL_ANNOTATIONS}")
    return pd.read_csv(REAL_ANNOTATIONS, dtype={"segmentation": str}, keep_default_na=False)


@pytest.fixture(autouse=True, scope="session")
def _volume_cache_in_tmp(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Keep the volume cache of every test (and the scripts they start) out of ~/.cache."""
    import os

    os.environ["GITRACT_CACHE_DIR"] = str(tmp_path_factory.mktemp("volume_cache"))


@dataclass(frozen=True)
class SyntheticSet:
    """A small synthetic competition data set with its folds, shared by a whole test session."""

    root: Path
    labels_csv: Path
    folds_csv: Path


@pytest.fixture(scope="session")
def synthetic_set(tmp_path_factory: pytest.TempPathFactory) -> SyntheticSet:
    """8 cases (6 train, 2 test) of 20-slice days, and 3 folds: ~450 slices in all."""
    from gitract.data.folds import create_folds_file
    from gitract.data.synthetic import generate

    base = tmp_path_factory.mktemp("synthetic")
    summary = generate(base / "data", base / "labels", n_cases=8, n_slices=20, seed=7)
    folds_csv = base / "folds.csv"
    create_folds_file(base / "data", folds_csv, n_splits=3, seed=0)
    return SyntheticSet(base / "data", summary.labels_csv, folds_csv)
