"""`make clean` deletes what make generated and nothing a user made: trained runs and the
Kaggle data unzipped into data/ stay."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from gitract.data.synthetic import MARKER

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make not installed")

# What make generated (data, test, kaggle targets): cheap to regenerate, so clean removes it.
GENERATED = [
    f"data/synthetic/{MARKER}",
    "data/synthetic/train.csv",
    "data/synthetic/train/case1/case1_day0/scans/slice_0001_266_266_1.50_1.50.png",
    "data/synthetic_labels/test_labels.csv",
    ".pytest_cache/v/cache/lastfailed",
    "dist/kaggle-dataset/gitract/best.pt",
    "dist/kaggle-kernel/kernel.py",
]
# What a user made or trained: clean must leave every one of them.
KEPT = [
    "data/uw-madison-gi-tract-image-segmentation/train.csv",
    "data/uw-madison-gi-tract-image-segmentation/train/case2/case2_day1/scans/slice_0001.png",
    "runs/default/fold0/best.pt",
    "runs/default/fold0/history.csv",
    "runs/demo_cpu/fold0/last.pt",  # demo_cpu on real data looks just like the demo's run
    "submissions/submission.csv",
    "folds/folds.csv",
    "dist/wheel-cache/torch-2.3.0-cp311-none-any.whl",
]


def _make_clean(tree: Path, files: list[str]) -> subprocess.CompletedProcess:
    shutil.copy(ROOT / "Makefile", tree / "Makefile")
    for name in files:
        path = tree / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    done = subprocess.run(["make", "-C", str(tree), "clean"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done


def test_clean_removes_generated_files_and_keeps_user_files(tmp_path: Path) -> None:
    _make_clean(tmp_path, GENERATED + KEPT)
    for name in KEPT:
        assert (tmp_path / name).read_bytes() == b"x", f"make clean deleted {name}"
    for name in GENERATED:
        assert not (tmp_path / name).exists(), f"make clean left {name}"
    assert not (tmp_path / "data" / "synthetic").exists()
    assert not (tmp_path / "data" / "synthetic_labels").exists()


def test_clean_keeps_a_synthetic_folder_the_generator_did_not_write(tmp_path: Path) -> None:
    mine = "data/synthetic/train.csv"  # a user's folder of that name, without the marker
    _make_clean(tmp_path, [mine])
    assert (tmp_path / mine).exists()


def test_clean_ignores_data_dir_pointing_at_real_data(tmp_path: Path) -> None:
    real = "data/uw-madison-gi-tract-image-segmentation/train.csv"
    shutil.copy(ROOT / "Makefile", tmp_path / "Makefile")
    (tmp_path / real).parent.mkdir(parents=True)
    (tmp_path / real).write_text("id,class,segmentation\n")
    cmd = ["make", "-C", str(tmp_path), "clean", f"DATA_DIR={Path(real).parent}"]
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    assert (tmp_path / real).exists()


def test_clean_on_a_fresh_clone_is_a_no_op(tmp_path: Path) -> None:
    done = _make_clean(tmp_path, [])
    assert "kept: runs/" in done.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Makefile"]
