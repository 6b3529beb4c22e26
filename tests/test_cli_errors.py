"""Bad inputs through the scripts a user runs: one line naming the culprit, exit code 2, no
traceback, and nothing half-written left behind (no run folder, output CSV or temp file).

Most cases run the script in-process (``runpy`` with a patched ``sys.argv``: the same
``run_main`` path, without paying ~5 s of torch import per case); a few go through a real
subprocess so the exit code and stderr are the ones a shell sees.
"""

from __future__ import annotations

import runpy
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from gitract.data.folds import create_folds_file

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo_cpu.yaml"
FAST = ["data.img_size=[32, 32]", "data.num_workers=0", "train.epochs=1"]


def _files(root: Path, skip: Path | None = None) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file() and (skip is None or skip not in p.parents)}


def _run_in_process(
    script: str, args: list[str], monkeypatch: pytest.MonkeyPatch, capsys
) -> tuple[int, str]:
    """Run ``scripts/<script>`` as ``__main__``; return its exit code and stderr."""
    monkeypatch.setattr(sys, "argv", [str(ROOT / "scripts" / script), *args])
    with pytest.raises(SystemExit) as exited:
        runpy.run_path(str(ROOT / "scripts" / script), run_name="__main__")
    return exited.value.code, capsys.readouterr().err


def _run_subprocess(script: str, args: list[str], cwd: Path) -> tuple[int, str]:
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / script), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return done.returncode, done.stderr


def _assert_one_line_error(code: int, err: str, *culprits: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for culprit in culprits:
        assert culprit in lines[0], (culprit, lines[0])


def _rewrite_csv(path: Path, edit: Callable[[pd.DataFrame], pd.DataFrame]) -> None:
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    edit(frame).to_csv(path, index=False)


def _set_cell(row: int, column: str, value: str) -> Callable[[pd.DataFrame], pd.DataFrame]:
    def edit(frame: pd.DataFrame) -> pd.DataFrame:
        frame.loc[row, column] = value
        return frame

    return edit


# ------------------------------------------------------------------- train.csv -> make_folds


@pytest.mark.parametrize(
    ("corrupt", "culprits"),
    [
        pytest.param(
            lambda csv: _rewrite_csv(csv, lambda f: f.drop(columns=["segmentation"])),
            ["train.csv", "missing column(s) segmentation"],
            id="missing-column",
        ),
        pytest.param(
            # Data row 4 is line 6 of the file (the header is line 1).
            lambda csv: _rewrite_csv(csv, _set_cell(4, "id", "case1_day0_slice_2")),
            ["train.csv", "line 6", "'case1_day0_slice_2'"],
            id="malformed-id",
        ),
        pytest.param(
            lambda csv: _rewrite_csv(csv, _set_cell(7, "class", "liver")),
            ["train.csv", "line 9", "'liver'"],
            id="unknown-class",
        ),
        pytest.param(
            lambda csv: csv.write_text(""),
            ["train.csv", "file is empty"],
            id="empty-file",
        ),
        pytest.param(
            lambda csv: csv.write_text("id,class,segmentation\n"),
            ["train.csv", "no rows"],
            id="header-only",
        ),
        pytest.param(
            lambda csv: _rewrite_csv(csv, _set_cell(5, "segmentation", "12 5 x 3")),
            ["train.csv", "line 7 (id ", "bad RLE: non-integer token 'x'"],
            id="rle-token-with-line",
        ),
        pytest.param(
            lambda csv: _rewrite_csv(csv, _set_cell(2, "segmentation", "-5 3")),
            ["train.csv", "line 4 (id ", "negative number '-5' in RLE"],
            id="rle-negative",
        ),
        pytest.param(
            lambda csv: _rewrite_csv(csv, _set_cell(3, "segmentation", "1 2 3")),
            ["train.csv", "line 5 (id ", "odd number of tokens (3)"],
            id="rle-odd",
        ),
        pytest.param(
            lambda csv: csv.write_text("\n".join(csv.read_text().splitlines()[1:]) + "\n"),
            ["train.csv", "missing column(s) id, class, segmentation", "header line missing?"],
            id="no-header",
        ),
    ],
)
def test_make_folds_names_the_bad_train_csv_row(
    tiny_kaggle, tmp_path: Path, monkeypatch, capsys, corrupt, culprits
) -> None:
    corrupt(tiny_kaggle.train_csv)
    monkeypatch.chdir(tmp_path)
    before = _files(tmp_path)
    out = tmp_path / "folds" / "folds.csv"
    code, err = _run_in_process(
        "make_folds.py",
        ["--data-dir", str(tiny_kaggle.root), "--out", str(out)],
        monkeypatch,
        capsys,
    )
    _assert_one_line_error(code, err, *culprits)
    assert _files(tmp_path) == before  # no folds.csv, no temp file


def test_make_folds_subprocess_malformed_id(tiny_kaggle, tmp_path: Path) -> None:
    _rewrite_csv(tiny_kaggle.train_csv, _set_cell(10, "id", "case1-day0-slice-0003"))
    before = _files(tmp_path)
    code, err = _run_subprocess(
        "make_folds.py",
        ["--data-dir", str(tiny_kaggle.root), "--out", str(tmp_path / "folds.csv")],
        cwd=tmp_path,
    )
    _assert_one_line_error(code, err, "train.csv", "line 12", "'case1-day0-slice-0003'")
    assert _files(tmp_path) == before


# --------------------------------------------------------------- images, RLE -> train.py


@pytest.fixture
def train_setup(tiny_kaggle, tmp_path: Path, monkeypatch):
    """The tiny data set with its folds, a private volume cache, and a cwd outside the repo."""
    folds_csv = tmp_path / "folds.csv"
    create_folds_file(tiny_kaggle.root, folds_csv, n_splits=2, seed=0)
    cache = tmp_path / "cache"
    monkeypatch.setenv("GITRACT_CACHE_DIR", str(cache))
    monkeypatch.chdir(tmp_path)
    return tiny_kaggle, folds_csv, cache


def _train_args(data: Path, folds_csv: Path, out: Path, config: Path = DEMO) -> list[str]:
    return [
        "--fold", "0", "--config", str(config), "--data-dir", str(data),
        "--folds-csv", str(folds_csv), "--out-dir", str(out), "--no-progress", "--set", *FAST,
    ]  # fmt: skip


def _assert_cache_clean(cache: Path) -> None:
    """No temp files, and no cache entry without the JSON that marks it complete."""
    if not cache.exists():
        return
    names = [p.name for p in cache.iterdir()]
    assert not [n for n in names if n.startswith(".") or n.endswith(".tmp")], names
    complete = {n[: -len(".json")] for n in names if n.endswith(".json")}
    orphans = [n for n in names if n.split(".")[0] not in complete]
    assert not orphans, f"half-written cache entries: {orphans}"


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _eight_bit(path: Path) -> None:
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert cv2.imwrite(str(path), (image >> 8).astype(np.uint8))


def _wrong_size(path: Path) -> None:
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert cv2.imwrite(str(path), np.ascontiguousarray(image[:200]))


IMAGE_FAULTS = {
    "truncated-png": (_truncate, ["truncated PNG"]),
    "8-bit-png": (_eight_bit, ["expected a 16-bit grayscale PNG, got 8-bit"]),
    "size-contradicts-name": (
        _wrong_size,
        ["image is 200 high x 266 wide but its file name says 266 high x 266 wide"],
    ),
}


@pytest.mark.parametrize("fault", ["8-bit-png", "size-contradicts-name"])
def test_train_names_the_bad_image(train_setup, tmp_path, monkeypatch, capsys, fault) -> None:
    kaggle, folds_csv, cache = train_setup
    corrupt, culprits = IMAGE_FAULTS[fault]
    # A slice of case1_day2 (266x266): case1_day0 is cached completely before it fails.
    bad = kaggle.paths["case1_day2_slice_0002"]
    corrupt(bad)
    before = _files(tmp_path, skip=cache)
    code, err = _run_in_process(
        "train.py", _train_args(kaggle.root, folds_csv, tmp_path / "runs"), monkeypatch, capsys
    )
    _assert_one_line_error(code, err, str(bad), *culprits)
    assert _files(tmp_path, skip=cache) == before  # no run folder
    _assert_cache_clean(cache)


def test_train_subprocess_truncated_png(train_setup, tmp_path: Path) -> None:
    kaggle, folds_csv, cache = train_setup
    bad = kaggle.paths["case1_day2_slice_0003"]
    _truncate(bad)
    before = _files(tmp_path, skip=cache)
    code, err = _run_subprocess(
        "train.py", _train_args(kaggle.root, folds_csv, tmp_path / "runs"), cwd=tmp_path
    )
    _assert_one_line_error(code, err, str(bad), "truncated PNG")
    assert _files(tmp_path, skip=cache) == before
    _assert_cache_clean(cache)


def test_train_names_the_bad_rle(train_setup, tmp_path, monkeypatch, capsys) -> None:
    kaggle, folds_csv, cache = train_setup
    frame = pd.read_csv(kaggle.train_csv, dtype=str, keep_default_na=False)
    k = int(np.flatnonzero((frame["id"] == "case1_day2_slice_0002").to_numpy())[1])
    assert frame.loc[k, "class"] == "small_bowel"
    _rewrite_csv(kaggle.train_csv, _set_cell(k, "segmentation", "12 5 x 3"))
    before = _files(tmp_path, skip=cache)
    code, err = _run_in_process(
        "train.py", _train_args(kaggle.root, folds_csv, tmp_path / "runs"), monkeypatch, capsys
    )
    _assert_one_line_error(code, err, "case1_day2_slice_0002", "small_bowel", "'x'")
    assert _files(tmp_path, skip=cache) == before


def test_bad_rle_leaves_no_half_written_cache_entry(
    train_setup, tmp_path, monkeypatch, capsys
) -> None:
    kaggle, folds_csv, cache = train_setup
    frame = pd.read_csv(kaggle.train_csv, dtype=str, keep_default_na=False)
    k = int(np.flatnonzero((frame["id"] == "case1_day2_slice_0002").to_numpy())[1])
    _rewrite_csv(kaggle.train_csv, _set_cell(k, "segmentation", "12 5 x 3"))
    code, _ = _run_in_process(
        "train.py", _train_args(kaggle.root, folds_csv, tmp_path / "runs"), monkeypatch, capsys
    )
    assert code == 2
    _assert_cache_clean(cache)


def test_train_refuses_folds_of_another_data_set(
    train_setup, make_tiny_kaggle, tmp_path, monkeypatch, capsys
) -> None:
    kaggle, _, cache = train_setup
    other = make_tiny_kaggle("other", layout=[(11, 0, 3, 266, 266), (12, 1, 3, 266, 266)])
    other_folds = tmp_path / "other_folds.csv"
    create_folds_file(other.root, other_folds, n_splits=2, seed=0)
    before = _files(tmp_path, skip=cache)
    code, err = _run_in_process(
        "train.py", _train_args(kaggle.root, other_folds, tmp_path / "runs"), monkeypatch, capsys
    )
    _assert_one_line_error(
        code, err, str(other_folds), "missing from the folds file", "scripts/make_folds.py"
    )
    assert _files(tmp_path, skip=cache) == before


def test_train_names_the_missing_fold_with_plain_values(
    train_setup, tmp_path, monkeypatch, capsys
) -> None:
    kaggle, folds_csv, cache = train_setup
    args = _train_args(kaggle.root, folds_csv, tmp_path / "runs")
    args[args.index("--fold") + 1] = "7"
    before = _files(tmp_path, skip=cache)
    code, err = _run_in_process("train.py", args, monkeypatch, capsys)
    _assert_one_line_error(code, err, str(folds_csv), "no fold 7; its folds are [0, 1]")
    assert "np." not in err
    assert _files(tmp_path, skip=cache) == before


@pytest.mark.parametrize(
    ("edit", "culprits"),
    [
        pytest.param(
            ("  epochs: 15", "  epochs: 15\n  epoch: 3"),
            ["unknown key 'train.epoch'", "did you mean 'train.epochs'"],
            id="unknown-key",
        ),
        pytest.param(
            ("  epochs: 15", "  epochs: fifteen"),
            ["'train.epochs' must be int", "fifteen"],
            id="wrong-type",
        ),
    ],
)
def test_train_names_the_bad_config_key(
    train_setup, tmp_path, monkeypatch, capsys, edit, culprits
) -> None:
    kaggle, folds_csv, cache = train_setup
    text = DEMO.read_text()
    assert edit[0] in text
    config = tmp_path / "my_config.yaml"
    config.write_text(text.replace(edit[0], edit[1], 1))
    before = _files(tmp_path, skip=cache)
    args = _train_args(kaggle.root, folds_csv, tmp_path / "runs", config=config)
    code, err = _run_in_process("train.py", args, monkeypatch, capsys)
    _assert_one_line_error(code, err, str(config), *culprits)
    assert _files(tmp_path, skip=cache) == before


# ------------------------------------------------------------ sample_submission -> infer.py


def test_infer_refuses_duplicated_sample_submission_rows(tiny_kaggle, tmp_path: Path) -> None:
    sample = tiny_kaggle.root / "sample_submission.csv"
    frame = pd.read_csv(sample, dtype=str, keep_default_na=False)
    pd.concat([frame, frame.iloc[[1]]]).to_csv(sample, index=False)
    duplicate_line = len(frame) + 2
    out = tmp_path / "submission.csv"
    before = _files(tmp_path)
    code, err = _run_subprocess(
        "infer.py",
        ["--config", str(DEMO), "--data-dir", str(tiny_kaggle.root),
         "--runs", str(tmp_path / "runs"), "--out", str(out), "--no-progress"],
        cwd=tmp_path,
    )  # fmt: skip
    row = frame.iloc[1]
    _assert_one_line_error(
        code,
        err,
        "sample_submission.csv",
        f"line {duplicate_line}",
        f"id {row['id']}, class {row['class']}",
    )
    assert _files(tmp_path) == before  # no submission, no temp file


@pytest.mark.parametrize(("script", "args"), [("train.py", ["--fold", "0"]), ("infer.py", [])])
def test_an_empty_config_is_one_line_not_the_b7_defaults(
    script, args, tmp_path, monkeypatch, capsys
):
    """An empty file used to mean every default: training then failed on an unrelated weight
    download and inference ran without a word."""
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    monkeypatch.chdir(tmp_path)
    code, err = _run_in_process(script, [*args, "--config", str(empty)], monkeypatch, capsys)
    _assert_one_line_error(code, err, str(empty), "the config file is empty")
    assert _files(tmp_path) == {empty}
