"""The synthetic generator writes the exact Kaggle layout, with organ-like, learnable content.

One small data set is generated once per module (a few seconds) and read by most tests;
determinism and the script get their own, smaller runs.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from gitract.data.layout import CLASSES, parse_slice_path
from gitract.data.rle import rle_decode
from gitract.data.synthetic import MARKER, SIZES, generate, short_day_slices
from gitract.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "make_synthetic.py"
CASES, SLICES, SEED = 4, 16, 7
FILE_RE = re.compile(r"slice_(\d{4})_(\d+)_(\d+)_(\d+\.\d\d)_(\d+\.\d\d)\.png")


def _read_csv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def _images(split_dir: Path) -> dict[str, Path]:
    """id -> PNG path of every image under ``train/`` or ``test/``."""
    return {parse_slice_path(p).id: p for p in sorted(split_dir.rglob("*.png"))}


def _masks(table: pd.DataFrame, images: dict[str, Path]) -> dict[str, np.ndarray]:
    """id -> bool (H, W, 3) masks decoded from a train.csv-format table."""
    out = {}
    for sid, rows in table.groupby("id", sort=False):
        info = parse_slice_path(images[sid])
        out[sid] = np.stack(
            [
                rle_decode(seg, (info.height, info.width)).astype(bool)
                for seg in rows["segmentation"]
            ],
            axis=-1,
        )
    return out


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * (a & b).sum() / max(a.sum() + b.sum(), 1)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> dict:
    base = tmp_path_factory.mktemp("synthetic")
    summary = generate(base / "data", base / "labels", CASES, SLICES, SEED, workers=1)
    data = base / "data"
    train_images, test_images = _images(data / "train"), _images(data / "test")
    train = _read_csv(data / "train.csv")
    return {
        "data": data,
        "labels": base / "labels" / "test_labels.csv",
        "summary": summary,
        "train": train,
        "train_images": train_images,
        "test_images": test_images,
        "masks": _masks(train, train_images),
    }


# --------------------------------------------------------------------------------------------
# Layout
# --------------------------------------------------------------------------------------------


def test_layout_file_names_sizes_and_uint16(dataset: dict) -> None:
    data = dataset["data"]
    paths = sorted(data.rglob("*.png"))
    assert paths
    seen_sizes = set()
    for path in paths:
        match = FILE_RE.fullmatch(path.name)
        assert match, path.name
        _, width, height, pw, ph = match.groups()
        case_day = path.parent.parent.name
        assert path.parent.name == "scans"
        assert path.parent.parent.parent.name == case_day.split("_")[0]
        assert path.parts[-5] in ("train", "test")
        assert pw == ph
        image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        assert image.dtype == np.uint16
        # Width first in the name: a 360x310 file holds an array of shape (310, 360).
        assert image.shape == (int(height), int(width))
        seen_sizes.add((int(width), int(height), float(pw)))
    assert seen_sizes <= set(SIZES)
    non_square = [p for p in paths if "_360_310_1.50_1.50" in p.name]
    assert {p.parts[-5] for p in non_square} == {"train", "test"}


def test_train_csv_ids_match_images_one_to_one(dataset: dict) -> None:
    train, images = dataset["train"], dataset["train_images"]
    assert list(train.columns) == ["id", "class", "segmentation"]
    ids = train["id"].drop_duplicates().tolist()
    assert sorted(ids) == sorted(images)
    assert len(train) == 3 * len(images)
    # Three rows per slice, in class order, each id's rows together.
    assert train["class"].tolist() == list(CLASSES) * len(ids)
    assert (train["id"].to_numpy().reshape(-1, 3) == np.array(ids)[:, None]).all()
    assert all(re.fullmatch(r"case\d+_day\d+_slice_\d{4}", i) for i in ids)


def test_day_lengths_and_slice_numbers(dataset: dict) -> None:
    per_day: dict[str, list[int]] = {}
    for sid in list(dataset["train_images"]) + list(dataset["test_images"]):
        case_day, number = sid.rsplit("_slice_", 1)
        per_day.setdefault(case_day, []).append(int(number))
    lengths = {len(v) for v in per_day.values()}
    assert lengths <= {SLICES, short_day_slices(SLICES)}
    assert lengths == {SLICES, short_day_slices(SLICES)}
    for numbers in per_day.values():
        assert sorted(numbers) == list(range(1, len(numbers) + 1))  # 1-based, no gaps
    assert short_day_slices(144) == 80
    assert short_day_slices(32) == 18


def test_train_and_test_cases_are_disjoint(dataset: dict) -> None:
    summary = dataset["summary"]
    train_cases = {parse_slice_path(p).case for p in dataset["train_images"].values()}
    test_cases = {parse_slice_path(p).case for p in dataset["test_images"].values()}
    assert train_cases and test_cases
    assert not train_cases & test_cases
    assert len(train_cases) + len(test_cases) == CASES
    assert sorted(train_cases) == list(summary.train_cases)
    assert sorted(test_cases) == list(summary.test_cases)
    # No case-day the pipeline drops by default (case7_day0, case81_day30).
    assert not train_cases & {7, 81}
    assert not (dataset["data"] / "test_labels.csv").exists()


# --------------------------------------------------------------------------------------------
# Content
# --------------------------------------------------------------------------------------------


def test_masks_are_the_organs_in_the_image(dataset: dict) -> None:
    masks, images = dataset["masks"], dataset["train_images"]
    inside = {name: [] for name in CLASSES}
    roughness = {name: [] for name in CLASSES}
    body = []
    for sid, mask in masks.items():
        image = cv2.imread(str(images[sid]), cv2.IMREAD_UNCHANGED).astype(np.float64)
        any_organ = mask.any(axis=-1)
        tissue = (image > 1500) & ~any_organ  # the body around the organs, not the air
        body.append(np.median(image[tissue]))
        for k, name in enumerate(CLASSES):
            only = mask[..., k] & (mask.sum(axis=-1) == 1)
            if only.sum() > 50:
                inside[name].append(image[only].mean() / body[-1])
                roughness[name].append(image[only].std() / image[only].mean())
    for name in CLASSES:
        assert len(inside[name]) > 5, name
        # Every organ is clearly brighter than the body around it ...
        assert np.median(inside[name]) > 1.5, name
    # ... and the three differ from each other (small bowel brightest, large bowel darkest).
    medians = {name: np.median(v) for name, v in inside.items()}
    assert medians["small_bowel"] > medians["stomach"] > medians["large_bowel"]
    # Not just a brightness each: the large bowel's mottled content is rougher than the rest.
    assert np.median(roughness["large_bowel"]) > 1.5 * np.median(roughness["small_bowel"])
    maxima = [cv2.imread(str(p), cv2.IMREAD_UNCHANGED).max() for p in images.values()]
    assert 8_000 < max(maxima) < 20_000
    assert 1_000 < np.median(body) < 6_000


def test_organs_are_reasonably_sized_and_smooth(dataset: dict) -> None:
    areas: dict[str, list[int]] = {name: [] for name in CLASSES}
    kernel = np.ones((3, 3), np.uint8)
    for sid, mask in dataset["masks"].items():
        for k, name in enumerate(CLASSES):
            m = mask[..., k].astype(np.uint8)
            if not m.any():
                continue
            areas[name].append(int(m.sum()))
            # No stray specks: every piece of an organ is at least a few dozen pixels ...
            _, _, stats, _ = cv2.connectedComponentsWithStats(m)
            assert stats[1:, cv2.CC_STAT_AREA].min() >= 25, (sid, name)
            # ... with a smooth outline: opening and closing with a 3x3 square change little.
            smooth = cv2.morphologyEx(
                cv2.morphologyEx(m, cv2.MORPH_OPEN, kernel), cv2.MORPH_CLOSE, kernel
            )
            assert (smooth != m).sum() <= 0.1 * m.sum() + 4, (sid, name)
    for name, values in areas.items():
        assert np.median(values) > 400, name  # pixels at native resolution


def test_empty_slices_at_the_volume_ends(dataset: dict) -> None:
    by_day: dict[str, list[tuple[int, bool]]] = {}
    for sid, mask in dataset["masks"].items():
        case_day, number = sid.rsplit("_slice_", 1)
        by_day.setdefault(case_day, []).append((int(number), bool(mask.any())))
    share = []
    for case_day, items in by_day.items():
        has = [h for _, h in sorted(items)]
        n = len(has)
        assert not any(has[: max(1, n // 6)]), case_day  # first slices: no organ
        assert not any(has[-max(1, n // 6) :]), case_day  # last slices: no organ
        assert any(has), case_day
        share.append(sum(has) / n)
    assert 0.3 < np.mean(share) < 0.7
    summary = dataset["summary"]
    assert 0.3 < summary.n_slices_with_organ / summary.n_slices < 0.7


def test_structures_move_smoothly_between_slices(dataset: dict) -> None:
    by_day: dict[str, list[tuple[int, np.ndarray]]] = {}
    for sid, mask in dataset["masks"].items():
        case_day, number = sid.rsplit("_slice_", 1)
        by_day.setdefault(case_day, []).append((int(number), mask))
    scores = {name: [] for name in CLASSES}
    union_scores = []
    for items in by_day.values():
        stack = [m for _, m in sorted(items, key=lambda x: x[0])]
        for a, b in zip(stack[:-1], stack[1:], strict=True):
            for k, name in enumerate(CLASSES):
                if a[..., k].any() and b[..., k].any():
                    scores[name].append(_dice(a[..., k], b[..., k]))
            if a.any() and b.any():
                union_scores.append(_dice(a.any(axis=-1), b.any(axis=-1)))
    for name, values in scores.items():
        assert len(values) > 5, name
        assert np.median(values) > 0.5, (name, np.median(values))
    assert np.median(union_scores) > 0.6


def test_days_and_cases_differ(dataset: dict) -> None:
    masks = dataset["masks"]
    by_day: dict[str, np.ndarray] = {}
    for sid in masks:
        case_day = sid.rsplit("_slice_", 1)[0]
        by_day.setdefault(case_day, 0)
        by_day[case_day] += masks[sid].any(axis=-1).sum()
    # Organ volumes (in pixels) are not all the same: the anatomy changes.
    assert len(set(by_day.values())) == len(by_day)


# --------------------------------------------------------------------------------------------
# Submission and hidden labels
# --------------------------------------------------------------------------------------------


def test_sample_submission_and_test_labels(dataset: dict) -> None:
    data, test_images = dataset["data"], dataset["test_images"]
    sub = _read_csv(data / "sample_submission.csv")
    labels = _read_csv(dataset["labels"])
    assert list(sub.columns) == ["id", "class", "predicted"]
    assert (sub["predicted"] == "").all()
    assert len(sub) == 3 * len(test_images)
    assert set(sub["id"]) == set(test_images)
    for _, rows in sub.groupby("id"):
        assert sorted(rows["class"]) == sorted(CLASSES)
    # Rows in a shuffled order: inference must follow the file, not sort it.
    keys = list(zip(sub["id"], sub["class"], strict=True))
    assert keys != sorted(keys)
    ordered = sorted(test_images)
    assert sub["id"].drop_duplicates().tolist() != ordered
    # The hidden labels: train.csv's format, for exactly the test ids.
    assert list(labels.columns) == ["id", "class", "segmentation"]
    assert labels["class"].tolist() == list(CLASSES) * len(test_images)
    assert sorted(labels["id"].drop_duplicates()) == ordered
    assert set(zip(labels["id"], labels["class"], strict=True)) == set(keys)
    test_masks = _masks(labels, test_images)
    assert any(m.any() for m in test_masks.values())
    assert any(not m.any() for m in test_masks.values())


# --------------------------------------------------------------------------------------------
# Determinism, reruns, errors, the script
# --------------------------------------------------------------------------------------------


def _csv_bytes(data: Path, labels: Path) -> list[bytes]:
    names = [data / "train.csv", data / "sample_submission.csv", labels / "test_labels.csv"]
    return [p.read_bytes() for p in names]


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    generate(tmp_path / "a", tmp_path / "la", 2, 8, 3, workers=1)
    generate(tmp_path / "b", tmp_path / "lb", 2, 8, 3, workers=2)  # parallel: same bytes
    generate(tmp_path / "c", tmp_path / "lc", 2, 8, 4, workers=1)
    a = _csv_bytes(tmp_path / "a", tmp_path / "la")
    assert a == _csv_bytes(tmp_path / "b", tmp_path / "lb")
    pngs_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.png"))
    pngs_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*.png"))
    assert pngs_a == pngs_b
    for rel in pngs_a:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
    c = _csv_bytes(tmp_path / "c", tmp_path / "lc")
    assert all(x != y for x, y in zip(a, c, strict=True))


def test_rerun_replaces_the_data_set(tmp_path: Path) -> None:
    data, labels = tmp_path / "data", tmp_path / "labels"
    generate(data, labels, 2, 8, 1, workers=1)
    generate(data, labels, 2, 8, 2, workers=1)
    csv_ids = set(_read_csv(data / "train.csv")["id"])
    assert csv_ids == set(_images(data / "train"))  # nothing left from the first run
    sub_ids = set(_read_csv(data / "sample_submission.csv")["id"])
    assert sub_ids == set(_images(data / "test"))
    assert (data / MARKER).is_file()
    assert not [p for p in data.iterdir() if p.name.startswith(".synthetic-")]
    assert not [p for p in data.iterdir() if p.suffix == ".tmp"]


def test_refuses_to_overwrite_a_foreign_data_set(tmp_path: Path) -> None:
    data = tmp_path / "kaggle"
    (data / "train").mkdir(parents=True)
    (data / "train.csv").write_text("id,class,segmentation\n")
    with pytest.raises(DataError, match=r"kaggle.*not made by this generator"):
        generate(data, tmp_path / "labels", 2, 8, 0)
    assert (data / "train.csv").read_text() == "id,class,segmentation\n"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_cases": 1}, "cases must be an integer >= 2"),
        ({"n_slices": 4}, "slices must be an integer >= 8, got 4"),
        ({"seed": -1}, "seed must be a non-negative integer, got -1"),
        ({"workers": 0}, "workers must be a positive integer, got 0"),
    ],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict, message: str) -> None:
    args = {"n_cases": 2, "n_slices": 8, "seed": 0} | kwargs
    with pytest.raises(ConfigError, match=re.escape(message)):
        generate(tmp_path / "data", tmp_path / "labels", **args)
    assert not (tmp_path / "data").exists()


def test_out_that_is_a_file_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "data"
    out.write_text("not a folder")
    with pytest.raises(DataError, match=r"data: exists and is not a folder"):
        generate(out, tmp_path / "labels", 2, 8, 0)


def test_labels_inside_data_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="inside the data folder"):
        generate(tmp_path / "data", tmp_path / "data" / "labels", 2, 8, 0)


def test_script_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "synthetic"
    cmd = [sys.executable, str(SCRIPT), "--out", str(out), "--cases", "2", "--slices", "8"]
    result = subprocess.run(cmd + ["--seed", "5"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "case-days" in result.stdout and "with an organ" in result.stdout
    assert "360x310@1.50" in result.stdout
    labels = tmp_path / "synthetic_labels" / "test_labels.csv"  # default: <out>_labels
    assert labels.is_file()
    ids = set(_read_csv(out / "train.csv")["id"])
    assert ids == set(_images(out / "train"))
    assert set(_read_csv(labels)["id"]) == set(_read_csv(out / "sample_submission.csv")["id"])


def test_script_bad_argument_is_one_clean_line(tmp_path: Path) -> None:
    cmd = [sys.executable, str(SCRIPT), "--out", str(tmp_path / "d"), "--cases", "1"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "cases" in lines[0] and "got 1" in lines[0]
