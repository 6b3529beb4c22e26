"""mle-bench's prepared layout end to end: make_folds, train.py, infer.py and
``evaluate.py --metric mlebench`` on a folder built the way mle-bench's prepare.py builds it
(openai/mle-bench, mlebench/competitions/uw-madison-gi-tract-image-segmentation/prepare.py)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from sklearn.model_selection import train_test_split
from test_profiles import _reference_mlebench

ROOT = Path(__file__).resolve().parents[1]
FAST = ["data.img_size=[32, 32]", "data.num_workers=0", "train.batch_size=32", "train.epochs=1"]
# 11 cases of one short day, and case 12 with six days: mle-bench moves its days after the 4th.
RAW_LAYOUT = [(c, 0, 2, 40, 32) if c % 2 else (c, 0, 2, 36, 36) for c in range(1, 12)] + [
    (12, d, 2, 40, 32) for d in (1, 2, 3, 4, 10, 11)
]


def _prepare_like_mlebench(raw: Path, public: Path, private: Path) -> pd.DataFrame:
    """The split and files of mle-bench's prepare.py: 10% of the cases (train_test_split,
    random_state 42) and every day after a training case's 4th go to test/; train.csv keeps
    the rest; test.csv lists ids and classes; sample_submission.csv holds ``1 1 5 2``; the
    answers (private/test.csv) carry the truth as ``predicted`` and the image sizes."""
    old = pd.read_csv(raw / "train.csv", dtype=str, keep_default_na=False)
    parts = old["id"].str.split("_")
    old["case"], old["day"], old["slice"] = parts.str[0], parts.str[1], parts.str[-1]
    cases = old["case"].unique()
    train_cases, _ = train_test_split(cases, test_size=0.1, random_state=42)
    old["set"] = ["train" if c in train_cases else "test" for c in old["case"]]
    for case, days in old[old["set"] == "train"].groupby("case")["day"]:
        ordered = sorted(set(days), key=lambda d: int(d[3:]))
        if len(ordered) > 4:
            old.loc[old["case"].eq(case) & old["day"].isin(ordered[4:]), "set"] = "test"
    for case in cases:
        split = "train" if case in train_cases else "test"
        shutil.copytree(raw / "train" / case, public / split / case)
    for case, day in old.loc[old["set"] == "test", ["case", "day"]].drop_duplicates().values:
        source = public / "train" / case / f"{case}_{day}"
        if source.exists():
            (public / "test" / case).mkdir(parents=True, exist_ok=True)
            shutil.move(source, public / "test" / case / f"{case}_{day}")
    new_train = old[old["set"] == "train"].copy()
    new_test = old[old["set"] == "test"].copy()
    sizes = []
    for case, day, number in new_test[["case", "day", "slice"]].values:
        (path,) = (raw / "train" / case / f"{case}_{day}" / "scans").glob(f"slice_{number}_*.png")
        sizes.append([int(v) for v in path.stem.split("_")[2:4]])
    new_test["image_width"] = [w for w, _ in sizes]
    new_test["image_height"] = [h for _, h in sizes]
    drop = ["set", "case", "day", "slice"]
    new_train, new_test = new_train.drop(columns=drop), new_test.drop(columns=drop)
    sample = new_test.drop(columns=["image_height", "image_width"])
    sample = sample.assign(segmentation="1 1 5 2").rename(columns={"segmentation": "predicted"})
    sample.to_csv(public / "sample_submission.csv", index=False)
    answers = new_test.rename(columns={"segmentation": "predicted"})
    private.mkdir(parents=True)
    answers.to_csv(private / "test.csv", index=False)
    new_train.to_csv(public / "train.csv", index=False)
    answers[["id", "class"]].to_csv(public / "test.csv", index=False)
    return answers


def _script(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, f"scripts/{name}", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def test_mlebench_prepared_folder_runs_end_to_end(make_tiny_kaggle, tmp_path) -> None:
    raw = make_tiny_kaggle("raw", layout=RAW_LAYOUT, test_layout=[]).root
    public, private = tmp_path / "public", tmp_path / "private"
    answers = _prepare_like_mlebench(raw, public, private)
    moved = set(answers["id"].str.rsplit("_slice_", n=1).str[0])
    assert {"case12_day10", "case12_day11"} <= moved  # days after the 4th
    assert any(not d.startswith("case12_") for d in moved)  # a whole test case
    assert not (public / "train" / "case12" / "case12_day10").exists()

    folds = tmp_path / "folds.csv"
    done = _script(
        "make_folds.py", "--data-dir", str(public), "--out", str(folds), "--n-splits", "2"
    )
    assert done.returncode == 0, done.stderr
    assert not set(pd.read_csv(folds)["id"]) & set(answers["id"])  # test ids never in folds
    runs = tmp_path / "runs"
    common = ["--config", "configs/demo_cpu.yaml", "--data-dir", str(public)]
    done = _script(
        "train.py", "--fold", "0", *common, "--folds-csv", str(folds), "--out-dir", str(runs),
        "--set", *FAST,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    sub_path = tmp_path / "submission.csv"
    done = _script(
        "infer.py", *common, "--runs", str(runs / "demo_cpu"), "--out", str(sub_path),
        "--no-progress", "--set", "data.num_workers=0",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    sub = pd.read_csv(sub_path, dtype=str, keep_default_na=False)
    sample = pd.read_csv(public / "sample_submission.csv", dtype=str)
    assert sub[["id", "class"]].equals(sample[["id", "class"]])

    done = _script(
        "evaluate.py", "--submission", str(sub_path), "--labels", str(private / "test.csv"),
        "--data-dir", str(public), "--metric", "mlebench",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    answers = pd.read_csv(private / "test.csv", dtype=str, keep_default_na=False)
    assert result["score_mlebench"] == pytest.approx(_reference_mlebench(sub, answers), abs=1e-9)
