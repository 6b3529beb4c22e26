"""gitract.data.folds and scripts/make_folds.py: group by case, stratify on organs, check it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from gitract.data.folds import (
    EMPTY_COLUMNS,
    FOLD_COLUMNS,
    create_folds_file,
    fold_summary,
    load_folds,
    make_folds,
    organ_label,
    write_folds,
)
from gitract.data.layout import CLASSES, DataError, load_train_table

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "make_folds.py"
# Largest allowed gap between a fold's share of non-empty slices (per class, and "any organ")
# and the overall share. Cases are whole units of 80-430 slices, so folds cannot match exactly:
# on the 85-case table below the stratified folds stay within ~0.015, while label-blind random
# case splits miss by 0.04-0.11 (checked over 20 seeds), so 0.03 tells the two apart.
SHARE_TOLERANCE = 0.03


def slice_table(n_cases: int = 85, seed: int = 0) -> pd.DataFrame:
    """A load_train_table-like table without images: 1-3 days a case, 80 or 144 slices a day.

    Organs occupy bands of slices whose position and extent vary per case-day (like the real
    scans, where about half the slices show no organ), and some cases miss an organ entirely,
    so cases differ in their organ mix and a label-blind split would unbalance the folds.
    """
    rng = np.random.default_rng(seed)
    parts = []
    for case in range(1, n_cases + 1):
        absent = rng.random(3) < 0.3
        for day in sorted(rng.choice(40, size=int(rng.integers(1, 4)), replace=False)):
            n = int(rng.choice([80, 144]))
            z = np.arange(n) / n + rng.uniform(-0.15, 0.15)
            scale = rng.uniform(0.4, 1.3, size=3)
            bands = {
                "large_bowel": (z > 0.15) & (z < 0.15 + 0.45 * scale[0]),
                "small_bowel": (z > 0.25) & (z < 0.25 + 0.35 * scale[1]),
                "stomach": (z > 0.50) & (z < 0.50 + 0.25 * scale[2]),
            }
            for k, cls in enumerate(CLASSES):
                bands[cls] &= not absent[k]
            number = np.arange(1, n + 1)
            parts.append(
                pd.DataFrame(
                    {
                        "id": [f"case{case}_day{day}_slice_{s:04d}" for s in number],
                        "case": case,
                        "day": int(day),
                        "case_day": f"case{case}_day{day}",
                        "slice": number,
                        **{c: np.where(bands[c], "1 5", "") for c in CLASSES},
                    }
                )
            )
    return pd.concat(parts, ignore_index=True)


@pytest.fixture(scope="module")
def table() -> pd.DataFrame:
    return slice_table()


@pytest.fixture(scope="module")
def folds(table) -> pd.DataFrame:
    return make_folds(table, n_splits=5, seed=42)


def test_columns_and_flags(table, folds):
    assert list(folds.columns) == list(FOLD_COLUMNS)
    merged = table.merge(folds, on=["id", "case", "day", "slice"])
    for name, cls in zip(EMPTY_COLUMNS, CLASSES, strict=True):
        assert folds[name].dtype == bool
        assert (merged[name] == (merged[cls] == "")).all()


def test_every_slice_exactly_once(table, folds):
    assert len(folds) == len(table)
    assert not folds["id"].duplicated().any()
    assert set(folds["id"]) == set(table["id"])
    assert sorted(folds["fold"].unique()) == [0, 1, 2, 3, 4]


def test_no_case_in_two_folds(folds):
    # Every day of a case lands in one fold (days of a patient would leak otherwise).
    assert folds.groupby("case")["fold"].nunique().eq(1).all()
    assert folds.groupby(["case", "day"])["fold"].nunique().eq(1).all()


def test_folds_are_stratified_on_organ_presence(folds):
    nonempty = ~folds[list(EMPTY_COLUMNS)]
    nonempty["any"] = nonempty.any(axis=1)
    gap = (nonempty.groupby(folds["fold"]).mean() - nonempty.mean()).abs()
    assert gap.to_numpy().max() < SHARE_TOLERANCE, gap
    # The tolerance means something: a label-blind split of the same cases breaks it.
    cases = folds["case"].unique()
    np.random.default_rng(0).shuffle(cases)
    blind = folds["case"].map(dict(zip(cases, np.arange(len(cases)) % 5, strict=True)))
    blind_gap = (nonempty.groupby(blind).mean() - nonempty.mean()).abs()
    assert blind_gap.to_numpy().max() > SHARE_TOLERANCE
    # Folds hold about the same number of slices as well.
    sizes = folds.groupby("fold").size()
    assert sizes.max() / sizes.min() < 1.25


def test_deterministic_for_a_seed(table, folds):
    pd.testing.assert_frame_equal(make_folds(table, n_splits=5, seed=42), folds)
    # The row order of the input does not matter either.
    shuffled = table.sample(frac=1.0, random_state=1)
    pd.testing.assert_frame_equal(make_folds(shuffled, n_splits=5, seed=42), folds)


def test_other_seed_other_folds_where_possible():
    # sklearn's StratifiedGroupKFold can only shuffle groups with the same label spread, so
    # the seed matters where cases look alike: here 20 identical cases.
    one = slice_table(n_cases=1, seed=5)
    cases = []
    for case in range(1, 21):
        copy = one.assign(case=case)
        copy["id"] = copy["id"].str.replace(r"^case\d+_", f"case{case}_", regex=True)
        cases.append(copy)
    alike = pd.concat(cases, ignore_index=True)
    a = make_folds(alike, n_splits=4, seed=0)
    b = make_folds(alike, n_splits=4, seed=1)
    assert not a["fold"].equals(b["fold"])
    assert b.groupby("case")["fold"].nunique().eq(1).all()


def test_organ_label_is_a_bitmask():
    frame = pd.DataFrame(
        {
            "large_bowel": ["", "1 2", "", "1 2", ""],
            "small_bowel": ["", "", "3 1", "3 1", np.nan],
            "stomach": ["", "", "", "9 9", " "],
        }
    )
    assert organ_label(frame).tolist() == [0, 1, 2, 7, 0]


def test_too_many_splits_names_both_numbers(table):
    small = table[table["case"] <= 3]
    with pytest.raises(DataError, match=r"n_splits=5 exceeds the number of cases \(3\)"):
        make_folds(small, n_splits=5)


@pytest.mark.parametrize("bad", [1, 0, 2.5, True])
def test_bad_n_splits(table, bad):
    with pytest.raises(DataError, match="n_splits must be an integer >= 2"):
        make_folds(table, n_splits=bad)


def test_make_folds_input_errors(table):
    with pytest.raises(DataError, match="lacks column.s. stomach"):
        make_folds(table.drop(columns="stomach"))
    with pytest.raises(DataError, match="slice table is empty"):
        make_folds(table.iloc[:0])
    with pytest.raises(DataError, match="duplicated id case1_day"):
        make_folds(pd.concat([table, table.iloc[:1]]))


def test_fold_summary(folds):
    summary = fold_summary(folds)
    assert list(summary.columns) == ["cases", "slices", *CLASSES]
    assert summary.index.tolist() == ["0", "1", "2", "3", "4", "all"]
    assert summary.loc["all", "cases"] == folds["case"].nunique() == summary["cases"][:-1].sum()
    assert summary.loc["all", "slices"] == len(folds) == summary["slices"][:-1].sum()
    assert summary.loc["all", "stomach"] == (~folds["empty_stomach"]).sum()


# --- folds.csv ---------------------------------------------------------------------------------


def test_write_and_load_folds_roundtrip(tmp_path, table, folds):
    path = tmp_path / "out" / "folds.csv"
    write_folds(folds, path)
    assert os.listdir(path.parent) == ["folds.csv"]  # no temp file left behind
    loaded = load_folds(path, table)
    assert list(loaded.columns) == [*table.columns, "fold"]
    assert loaded["id"].tolist() == table["id"].tolist()  # the table's order is kept
    expected = folds.set_index("id")["fold"]
    assert (loaded["fold"].to_numpy() == expected.loc[loaded["id"]].to_numpy()).all()
    assert loaded["fold"].dtype == np.int64


def test_load_folds_ids_missing_from_file(tmp_path, table, folds):
    path = tmp_path / "folds.csv"
    write_folds(folds[folds["case"] != 1], path)
    n_missing = int((table["case"] == 1).sum())
    with pytest.raises(DataError) as exc:
        load_folds(path, table)
    message = str(exc.value)
    assert "\n" not in message
    assert f"{n_missing} of the data set's {len(table)} slices are missing" in message
    assert "e.g. case1_day" in message and "make_folds.py" in message and str(path) in message


def test_load_folds_ids_not_in_table(tmp_path, table, folds):
    path = tmp_path / "folds.csv"
    write_folds(folds, path)
    with pytest.raises(DataError, match=r"(\d+) id\(s\) are not in the data set .* e\.g\. case2_"):
        load_folds(path, table[table["case"] != 2])


def test_load_folds_missing_fold_column(tmp_path, table, folds):
    path = tmp_path / "folds.csv"
    write_folds(folds.drop(columns="fold"), path)
    with pytest.raises(DataError, match=rf"{path}: missing column\(s\) fold \(has: id, case"):
        load_folds(path, table)


def test_load_folds_file_errors(tmp_path, table, folds):
    path = tmp_path / "folds.csv"
    with pytest.raises(DataError, match="folds file not found; make it with"):
        load_folds(path, table)
    path.write_text("")
    with pytest.raises(DataError, match="folds file is empty"):
        load_folds(path, table)
    bad = folds.astype({"fold": object})
    bad.loc[3, "fold"] = "x"
    write_folds(bad, path)
    with pytest.raises(DataError, match=r"line 5 \(id case1_day\S+\): fold 'x' is not a non-neg"):
        load_folds(path, table)
    write_folds(pd.concat([folds, folds.iloc[:2]]), path)
    with pytest.raises(DataError, match=r"2 duplicated id\(s\)"):
        load_folds(path, table)


def test_load_folds_rejects_a_case_split_over_folds(tmp_path, table, folds):
    path = tmp_path / "folds.csv"
    leaky = folds.copy()
    first = leaky.index[leaky["case"] == 4][0]
    leaky.loc[first, "fold"] = (leaky.loc[first, "fold"] + 1) % 5
    write_folds(leaky, path)
    with pytest.raises(DataError, match="case4 is split over several folds"):
        load_folds(path, table)


# --- on the Kaggle-layout files, and the script ------------------------------------------------


def test_create_folds_file_on_kaggle_layout(tiny_kaggle, tmp_path):
    out = tmp_path / "folds" / "folds.csv"
    folds = create_folds_file(tiny_kaggle.root, out, n_splits=3, seed=0)
    table = load_train_table(tiny_kaggle.root)
    assert len(folds) == len(table)  # case7_day0 excluded by default
    loaded = load_folds(out, table)
    assert loaded.groupby("case")["fold"].nunique().eq(1).all()
    assert sorted(loaded["fold"].unique()) == [0, 1, 2]  # 3 cases, 3 folds: one case each


def _run(*args: str, env: dict | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        timeout=120,
    )


def test_script_end_to_end(tiny_kaggle, tmp_path):
    out = tmp_path / "f" / "folds.csv"
    proc = _run("--data-dir", str(tiny_kaggle.root), "--out", str(out), "--n-splits", "2")
    assert proc.returncode == 0, proc.stderr
    folds = pd.read_csv(out)
    assert list(folds.columns) == list(FOLD_COLUMNS)
    assert len(folds) == len(tiny_kaggle.ids()) - 2  # without case7_day0
    assert folds.groupby("case")["fold"].nunique().eq(1).all()
    # The summary table: one line per fold and a total, with cases/slices/classes columns.
    lines = proc.stdout.splitlines()
    assert lines[0].startswith(f"wrote {out} (12 slices, 2 folds)")
    assert "cases" in lines[1] and "slices" in lines[1] and "small_bowel" in lines[1]
    total = lines[-1].split()
    assert total[0] == "all" and total[1:3] == ["3", "12"]

    # The data dir can come from the environment, and --exclude with no value keeps all.
    proc = _run(
        "--out",
        str(out),
        "--n-splits",
        "2",
        "--exclude",
        env={"GITRACT_DATA_DIR": str(tiny_kaggle.root)},
    )
    assert proc.returncode == 0, proc.stderr
    assert len(pd.read_csv(out)) == len(tiny_kaggle.ids())


def test_script_too_many_splits(tiny_kaggle, tmp_path):
    out = tmp_path / "folds.csv"
    proc = _run("--data-dir", str(tiny_kaggle.root), "--out", str(out), "--n-splits", "10")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: n_splits=10 exceeds the number of cases (3): each fold needs at least one case"
    ]
    assert not out.exists()
