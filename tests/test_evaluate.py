"""Local scoring (scripts/evaluate.py) against a brute-force reference of the competition metric,
and the post-processing search on out-of-fold probabilities."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from gitract.config import PostprocessConfig
from gitract.data.layout import CLASSES, load_train_table
from gitract.data.rle import rle_encode
from gitract.errors import ConfigError, DataError
from gitract.inference.submission import encode_volume
from gitract.postprocess import tuning
from gitract.postprocess.steps import (
    ClassPostprocess,
    load_postprocess,
    postprocess_volume,
    quantize,
    save_postprocess,
    threshold_class,
)
from gitract.postprocess.tuning import DEFAULT_GRID, tune_postprocess
from gitract.scoring.files import score_profiles
from gitract.scoring.metrics import competition_score, slice_counts, terms_summary, volume_terms

ROOT = Path(__file__).resolve().parents[1]
# Small volumes keep the all-pairs reference fast: (case, day, slices, width, height).
LAYOUT = [(1, 0, 4, 48, 40), (2, 0, 3, 44, 44), (3, 1, 5, 40, 40), (4, 2, 1, 40, 40)]
TEST_LAYOUT = [(99, 0, 3, 40, 30)]


def _score(path, data_dir, labels=None) -> dict:
    """The kaggle profile's result for a submission (what evaluate.py prints for it)."""
    return score_profiles(path, data_dir, labels, ["kaggle"])["kaggle"]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "scripts/evaluate.py", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


# --------------------------------------------------------------------------- reference


def _brute_hausdorff(pred: np.ndarray, truth: np.ndarray) -> float | None:
    """All-pairs symmetric Hausdorff on (z/D, y/H, x/W) coordinates, / sqrt(3)."""
    if not pred.any() and not truth.any():
        return None
    if not pred.any() or not truth.any():
        return 1.0
    scale = np.asarray(pred.shape, dtype=float)
    p = np.argwhere(pred) / scale
    t = np.argwhere(truth) / scale
    dist = np.sqrt(((p[:, None, :] - t[None, :, :]) ** 2).sum(-1))
    return max(dist.min(1).max(), dist.min(0).max()) / math.sqrt(3)


def _brute_dice(pred: np.ndarray, truth: np.ndarray) -> float:
    total = pred.sum() + truth.sum()
    return 1.0 if total == 0 else 2.0 * (pred & truth).sum() / total


def _reference(
    pred: dict[tuple[str, str], np.ndarray], truth: dict[tuple[str, str], np.ndarray]
) -> dict[str, float]:
    """The score by definition: Dice per (id, class); Hausdorff per (case_day, class) volume."""
    dice = {c: [] for c in CLASSES}
    hd = {c: [] for c in CLASSES}
    days = sorted({i.rsplit("_slice_", 1)[0] for i, _ in truth})
    for day in days:
        ids = sorted({i for i, _ in truth if i.rsplit("_slice_", 1)[0] == day})
        for c in CLASSES:
            p = np.stack([pred[(i, c)] for i in ids]).astype(bool)
            t = np.stack([truth[(i, c)] for i in ids]).astype(bool)
            dice[c] += [_brute_dice(a, b) for a, b in zip(p, t, strict=True)]
            distance = _brute_hausdorff(p, t)
            if distance is not None:
                hd[c].append(distance)
    all_dice = np.mean([d for c in CLASSES for d in dice[c]])
    all_hd = [h for c in CLASSES for h in hd[c]]
    mean_hd = float(np.mean(all_hd)) if all_hd else 0.0
    out = {"score": 0.4 * all_dice + 0.6 * (1 - mean_hd), "dice": all_dice, "hausdorff": mean_hd}
    for c in CLASSES:
        out[f"dice_{c}"] = float(np.mean(dice[c]))
        out[f"hausdorff_{c}"] = float(np.mean(hd[c])) if hd[c] else 0.0
    out["n_volumes"] = len(all_hd)
    return out


def _perturb(truth: dict[str, np.ndarray]) -> dict[tuple[str, str], np.ndarray]:
    """A prediction with every kind of error: shifted, missing slices, stray specks, a class
    absent from a whole volume, and a speck in a volume whose truth is empty."""
    pred = {}
    for sid, mask in truth.items():
        day, number = sid.rsplit("_slice_", 1)
        number = int(number)
        for k, c in enumerate(CLASSES):
            m = mask[..., k].copy()
            if c == "large_bowel":
                m = np.roll(m, (2, -3), axis=(0, 1))
            elif c == "small_bowel":
                if number == 2:
                    m[:] = 0
                if number == 3:
                    m[-2, -2] = 1  # a far-away speck
            elif day == "case2_day0":
                m[:] = 0  # stomach missed in a whole volume: Hausdorff 1
            elif day == "case3_day1":
                m = cv2.dilate(m, np.ones((3, 3), np.uint8))
            if day == "case4_day2" and c == "stomach":
                m[5, 7] = 1  # truth is empty there
            pred[(sid, c)] = m
    return pred


@pytest.fixture
def scored(make_tiny_kaggle, tmp_path):
    """A tiny data set and a shuffled, imperfect submission for all its train slices."""
    tiny = make_tiny_kaggle("ev", layout=LAYOUT, test_layout=TEST_LAYOUT)
    pred = _perturb(tiny.masks)
    rows = [(i, c, rle_encode(m)) for (i, c), m in pred.items()]
    sub = pd.DataFrame(rows, columns=["id", "class", "predicted"]).sample(frac=1, random_state=3)
    path = tmp_path / "sub.csv"
    sub.to_csv(path, index=False)
    truth = {(i, c): tiny.masks[i][..., k] for i in tiny.masks for k, c in enumerate(CLASSES)}
    return tiny, path, pred, truth


# --------------------------------------------------------------------------- scoring


def test_evaluate_script_matches_the_brute_force_reference(scored) -> None:
    tiny, path, pred, truth = scored
    result = _run("--submission", str(path), "--data-dir", str(tiny.root))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1  # one JSON object, nothing else on stdout
    got = json.loads(lines[0])
    want = _reference(pred, truth)
    for key in ("score", "dice", "hausdorff") + tuple(
        f"{m}_{c}" for m in ("dice", "hausdorff") for c in CLASSES
    ):
        assert got[key] == pytest.approx(want[key], abs=1e-9), key
    # 12 volumes; case4_day2 (one empty slice) has two that are empty on both sides.
    assert got["n_volumes"] == want["n_volumes"] == 10
    assert got["n_rows"] == 3 * len(tiny.masks)
    # Every kind of error costs something, and the pieces add up to the score.
    assert 0 < got["hausdorff"] < 1 and 0 < got["dice"] < 1
    assert got["score"] == pytest.approx(0.4 * got["dice"] + 0.6 * (1 - got["hausdorff"]))


def test_perfect_submission_scores_one(tiny_kaggle, tmp_path) -> None:
    train = pd.read_csv(tiny_kaggle.train_csv, dtype=str, keep_default_na=False)
    path = tmp_path / "perfect.csv"
    train.rename(columns={"segmentation": "predicted"}).to_csv(path, index=False)
    assert _score(path, tiny_kaggle.root)["score"] == pytest.approx(1.0)


def test_oof_style_submission_is_scored_on_its_case_days_only(scored, tmp_path) -> None:
    tiny, _, pred, truth = scored
    ids = tiny.ids("case3_day1")
    part = tmp_path / "one_day.csv"
    rows = [(i, c, rle_encode(pred[(i, c)])) for i in ids for c in CLASSES]
    pd.DataFrame(rows, columns=["id", "class", "predicted"]).to_csv(part, index=False)
    got = _score(part, tiny.root)
    want = _reference(
        {k: v for k, v in pred.items() if k[0] in ids},
        {k: v for k, v in truth.items() if k[0] in ids},
    )
    assert got["n_rows"] == 3 * len(ids)
    assert got["score"] == pytest.approx(want["score"], abs=1e-9)


def test_test_submission_is_scored_against_explicit_labels(scored, tmp_path) -> None:
    """Test slices (360x310-like, non-square 40 wide x 30 high) get their sizes from test/."""
    tiny, _, _, _ = scored
    rng = np.random.default_rng(1)
    truth, pred = {}, {}
    for i in tiny.test_ids:
        for c in CLASSES:
            t = np.zeros((30, 40), np.uint8)
            t[5:12, 20:35] = 1
            truth[(i, c)] = t
            pred[(i, c)] = np.roll(t, int(rng.integers(-3, 4)), axis=1)
    labels, sub = tmp_path / "test_labels.csv", tmp_path / "test_sub.csv"
    rows = [(i, c, rle_encode(m)) for (i, c), m in truth.items()]
    pd.DataFrame(rows, columns=["id", "class", "segmentation"]).to_csv(labels, index=False)
    rows = [(i, c, rle_encode(m)) for (i, c), m in pred.items()]
    pd.DataFrame(rows, columns=["id", "class", "predicted"]).to_csv(sub, index=False)
    got = _score(sub, tiny.root, labels)
    assert got["score"] == pytest.approx(_reference(pred, truth)["score"], abs=1e-9)
    # Without labels a test submission cannot be scored: say so, and how to fix it.
    with pytest.raises(DataError, match=r"none of its case-days is in .*train\.csv.*--labels"):
        _score(sub, tiny.root)


@pytest.mark.parametrize("fault", ["bad_rle", "missing_row"])
def test_evaluate_script_bad_submission_is_a_one_line_error(scored, tmp_path, fault) -> None:
    tiny, path, _, _ = scored
    sub = pd.read_csv(path, dtype=str, keep_default_na=False)
    if fault == "bad_rle":
        row = sub.index[sub["predicted"] != ""][0]
        sub.loc[row, "predicted"] = "5 x"
        culprit = [sub.loc[row, "id"], sub.loc[row, "class"]]
    else:
        culprit = ["lacks 1 labelled", sub["id"].iloc[0]]
        sub = sub.iloc[1:]
    bad = tmp_path / f"{fault}.csv"
    sub.to_csv(bad, index=False)
    result = _run("--submission", str(bad), "--data-dir", str(tiny.root))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert str(bad) in lines[0]
    for word in culprit:
        assert word in lines[0]


def test_unreadable_submission_names_the_file(tmp_path, tiny_kaggle) -> None:
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(DataError, match=r"empty\.csv: file is empty"):
        _score(empty, tiny_kaggle.root)
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("id,class,segmentation\n")
    with pytest.raises(DataError, match=r"wrong\.csv: missing column\(s\) predicted \(has: "):
        _score(wrong, tiny_kaggle.root)


# --------------------------------------------------------------------------- tuning


TRUTH_P, RING_P, SPECK_P = 0.45, 0.35, 0.9


def _oof_probs(tiny, folder: Path) -> None:
    """Probabilities where only threshold 0.4 with a minimum size is perfect: the truth at
    0.45, a one-pixel ring around it at 0.35, and a 4-pixel speck at 0.9 on each empty
    first slice. Saved the way infer.py --oof saves them (uint8 of p * 255)."""
    folder.mkdir()
    for case, day, n, _, _ in LAYOUT:
        ids = [f"case{case}_day{day}_slice_{z:04d}" for z in range(1, n + 1)]
        vol = []
        for sid in ids:
            truth = tiny.masks[sid].transpose(2, 0, 1).astype(np.float32)  # (3, H, W)
            ring = np.stack([cv2.dilate(t, np.ones((3, 3), np.uint8)) for t in truth]) - truth
            p = TRUTH_P * truth + RING_P * ring
            if not truth.any():
                p[:, 0:2, 0:2] = SPECK_P
            vol.append(np.rint(p * 255).astype(np.uint8))
        np.savez_compressed(folder / f"case{case}_day{day}.npz", probs=np.stack(vol), ids=ids)
    (folder / ".case9_day9.npz.123.tmp").write_bytes(b"partial")  # a crashed write: ignored


def _submission_from_probs(folder: Path, days, params) -> pd.DataFrame:
    """What inference writes for these quantised probabilities and per-class settings."""
    predictions = {}
    for case, day, *_ in days:
        with np.load(folder / f"case{case}_day{day}.npz") as saved:
            probs, ids = saved["probs"], saved["ids"].tolist()
        predictions.update(encode_volume(ids, probs, params))
    return pd.DataFrame(
        [(i, c, rle) for (i, c), rle in predictions.items()], columns=["id", "class", "predicted"]
    )


def test_tuning_finds_the_threshold_and_min_size_that_score_best(make_tiny_kaggle, tmp_path):
    tiny = make_tiny_kaggle("tune", layout=LAYOUT, test_layout=[])
    _oof_probs(tiny, tmp_path / "oof_probs")
    table = load_train_table(tiny.root, exclude=())
    result = tune_postprocess(tmp_path / "oof_probs", table, workers=2, progress=False)
    assert [result["classes"][c]["threshold"] for c in CLASSES] == [0.4, 0.4, 0.4]
    # 25 removes the specks; 100 would also remove small_bowel's ellipses (< 100 pixels).
    only = [result["thresholds_only"][c] for c in CLASSES]
    assert only[1]["min_size"] == 25 and all(o["min_size"] in (25, 50, 100) for o in only)
    assert result["score"] == pytest.approx(1.0)
    assert result["scores"]["thresholds_only"]["score"] == pytest.approx(1.0)
    assert result["n_case_days"] == len(LAYOUT) and result["n_slices"] == len(tiny.masks)

    # The baseline (0.5, no removal) is exactly what the metric gives those masks.
    labels = pd.read_csv(tiny.train_csv, dtype=str, keep_default_na=False)
    shapes = table[["id", "height", "width"]]
    sub = _submission_from_probs(tmp_path / "oof_probs", LAYOUT, PostprocessConfig().per_class())
    baseline = competition_score(sub, labels, shapes)["score"]
    assert result["baseline_score"] == baseline
    assert result["baseline_score"] < result["score"]

    # A grid without 0.5 still reports the same baseline, and picks only from the grid.
    grid = {"threshold": [0.3, 0.6], "min_size": [25]}
    small = tune_postprocess(tmp_path / "oof_probs", table, grid=grid, progress=False)
    assert {small["classes"][c]["threshold"] for c in CLASSES} <= {0.3, 0.6}
    assert [small["classes"][c]["min_size"] for c in CLASSES] == [25, 25, 25]
    assert small["baseline_score"] == baseline
    with pytest.raises(ConfigError, match=r"threshold: threshold must be in \(0, 1\)"):
        tune_postprocess(tmp_path / "oof_probs", table, grid={"threshold": [0.5, 1.5]})
    with pytest.raises(ConfigError, match=r"must be in \(0, 1\), got 1.5$") as bad:
        tune_postprocess(tmp_path / "oof_probs", table, grid={"threshold": np.array([0.5, 1.5])})
    assert "np." not in str(bad.value)
    with pytest.raises(ConfigError, match="unknown metric profile 'kagle'"):
        tune_postprocess(tmp_path / "oof_probs", table, "kagle")


def _oof_with_strays(tiny, folder: Path, seed: int = 0) -> None:
    """Noisy probabilities around the truth, plus what the 3D steps are for: a whole stray
    slice past the organ's end, a faint slice inside it, and confident specks."""
    rng = np.random.default_rng(seed)
    folder.mkdir()
    for case, day, n, _, _ in LAYOUT:
        ids = [f"case{case}_day{day}_slice_{z:04d}" for z in range(1, n + 1)]
        truth = np.stack([tiny.masks[i].transpose(2, 0, 1) for i in ids]).astype(np.float32)
        p = np.clip(0.75 * truth + rng.normal(0.1, 0.12, truth.shape), 0, 1)
        p[0, 2, 30:36, 30:36] = 0.95  # a stomach blob on the first slice
        p[-1, 0, 1:3, 1:3] = 0.9
        np.savez_compressed(folder / f"case{case}_day{day}.npz", probs=quantize(p), ids=ids)


@pytest.mark.parametrize("profile", ["kaggle", "mlebench"])
def test_tuned_score_is_exactly_what_inference_reproduces(make_tiny_kaggle, tmp_path, profile):
    tiny = make_tiny_kaggle("exact", layout=LAYOUT, test_layout=[])
    _oof_with_strays(tiny, tmp_path / "oof_probs")
    table = load_train_table(tiny.root, exclude=())
    result = tune_postprocess(tmp_path / "oof_probs", table, profile, progress=False)
    save_postprocess(PostprocessConfig(**result["classes"]), tmp_path / "postprocess.json")
    params = load_postprocess(tmp_path, PostprocessConfig()).per_class()
    assert [p.model_dump() for p in params] == [result["classes"][c] for c in CLASSES]
    labels = pd.read_csv(tiny.train_csv, dtype=str, keep_default_na=False)
    shapes = table[["id", "height", "width"]]
    sub = _submission_from_probs(tmp_path / "oof_probs", LAYOUT, params)
    scored = competition_score(sub, labels, shapes, profile)
    assert scored["score"] == result["score"]  # exactly: same masks, same sums in same order
    scores = result["scores"]
    assert scores["full"]["score"] >= scores["thresholds_only"]["score"]
    assert scores["thresholds_only"]["score"] >= scores["untuned"]["score"]


def test_tuning_searches_the_classifier_gate_when_presence_is_saved(make_tiny_kaggle, tmp_path):
    """A classification head that knows where the organs are: its presence probability gate
    removes the stray slices the pixel probabilities alone leave, and the tuned score is what
    inference reproduces with the same presence arrays."""
    tiny = make_tiny_kaggle("gate", layout=LAYOUT, test_layout=[])
    _oof_with_strays(tiny, tmp_path / "oof_probs")
    table = load_train_table(tiny.root, exclude=())
    for path in sorted((tmp_path / "oof_probs").glob("*.npz")):
        with np.load(path) as saved:
            probs, ids = saved["probs"], saved["ids"]
        truth = np.stack([tiny.masks[i].any(axis=(0, 1)) for i in ids])  # (D, 3)
        presence = quantize(np.where(truth, 0.9, 0.1))
        np.savez_compressed(path, probs=probs, ids=ids, presence=presence)
    # The gate alone beside the threshold: what it is worth, not what other steps also reach.
    grid = {"threshold": (0.5,), "gate_cls": DEFAULT_GRID["gate_cls"]}
    result = tune_postprocess(tmp_path / "oof_probs", table, "kaggle", grid, progress=False)
    gates = [result["classes"][c]["gate_cls"] for c in CLASSES]
    assert any(g > 0 for g in gates)
    assert result["scores"]["full"]["score"] > result["scores"]["thresholds_only"]["score"]
    params = [ClassPostprocess(**result["classes"][c]) for c in CLASSES]
    predictions = {}
    for path in sorted((tmp_path / "oof_probs").glob("*.npz")):
        with np.load(path) as saved:
            masks = postprocess_volume(saved["probs"], params, saved["presence"])
            for z, slice_id in enumerate(saved["ids"].tolist()):
                for c, name in enumerate(CLASSES):
                    predictions[(slice_id, name)] = rle_encode(masks[z, c])
    sub = pd.DataFrame(
        [(i, c, rle) for (i, c), rle in predictions.items()], columns=["id", "class", "predicted"]
    )
    labels = pd.read_csv(tiny.train_csv, dtype=str, keep_default_na=False)
    scored = competition_score(sub, labels, table[["id", "height", "width"]])
    assert scored["score"] == result["score"]


def test_tuning_without_oof_probabilities_says_what_to_run(tmp_path, tiny_kaggle) -> None:
    table = load_train_table(tiny_kaggle.root, exclude=())
    with pytest.raises(DataError, match=r"no OOF probabilities; run scripts/infer.py --oof"):
        tune_postprocess(tmp_path / "nothing", table, progress=False)


def test_a_submission_with_an_extra_column_is_refused(tiny_kaggle, tmp_path) -> None:
    """Kaggle's scorer reads id,class,predicted only: an extra column means a wrong file."""
    train = pd.read_csv(tiny_kaggle.train_csv, dtype=str, keep_default_na=False)
    path = tmp_path / "extra.csv"
    sub = train.rename(columns={"segmentation": "predicted"}).assign(score="0.9")
    sub.to_csv(path, index=False)
    result = _run("--submission", str(path), "--data-dir", str(tiny_kaggle.root))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (
        f"error: {path}: unexpected column(s) score; a submission has exactly id,class,predicted"
    )


@pytest.mark.parametrize("profile", ["kaggle", "mlebench"])
def test_the_tuners_terms_are_what_the_pipeline_and_metric_give(
    make_tiny_kaggle, tmp_path, profile
):
    """Candidate by candidate, on its boxes, the tuner scores what postprocess_volume and
    volume_terms give the whole case-day, whichever class changed last (mle-bench's union term
    follows every class's current masks), and a repeated candidate scores the same again."""
    tiny = make_tiny_kaggle("boxes", layout=LAYOUT, test_layout=[])
    _oof_with_strays(tiny, tmp_path / "oof_probs")
    rows = load_train_table(tiny.root, exclude=()).set_index("id")
    moves = [
        (0, ClassPostprocess(threshold=0.3, min_volume=50)),
        (2, ClassPostprocess(threshold=0.6, keep_largest=True)),
        (1, ClassPostprocess(gate_prob=0.8, fill_gaps=2, min_run=3)),
        (0, ClassPostprocess(threshold=0.3, min_volume=50)),
        (0, ClassPostprocess(threshold=0.7, min_size=25)),
        (1, ClassPostprocess(threshold=0.4, min_size=50)),  # beyond the labelled sizes
        (2, ClassPostprocess(threshold=0.4, min_size=40, gate_area=25)),
    ]
    for path in sorted((tmp_path / "oof_probs").glob("*.npz")):
        probs, ids, _ = tuning._read_probs(path, rows)
        truth = tuning._truth(ids, rows)
        day = tuning._CaseDay([path], rows, profile, low=0.3, below=40)
        current = [ClassPostprocess()] * 3
        for c in range(3):
            day.set(c, current[c])
        for c, params in moves * 2:
            trial = [params if k == c else current[k] for k in range(3)]
            whole = volume_terms(postprocess_volume(probs, trial), truth, profile)
            want = terms_summary(whole, profile)
            got = terms_summary(day.terms(c, params), profile)
            for key in ("score", "dice", "hausdorff"):
                assert got[key] == pytest.approx(want[key], abs=1e-12, nan_ok=True), (path, c)
            day.set(c, params)
            current[c] = params


def test_the_tuners_step_2_masks_are_threshold_class_s_for_every_min_size(
    make_tiny_kaggle, tmp_path
):
    """Each threshold's small components, labelled once, give threshold_class's masks (and
    their pixels per slice) for every minimum size up to the labelled bound, and beyond it
    (threshold_class itself)."""
    tiny = make_tiny_kaggle("boxes", layout=LAYOUT, test_layout=[])
    _oof_with_strays(tiny, tmp_path / "oof_probs")
    rows = load_train_table(tiny.root, exclude=()).set_index("id")
    removed = 0
    for path in sorted((tmp_path / "oof_probs").glob("*.npz")):
        day = tuning._CaseDay([path], rows, "kaggle", low=0.3, below=40)
        for c, (_, box_probs, _) in enumerate(day.classes):
            if box_probs is None:
                continue
            for threshold in (0.3, 0.5, 0.7):
                plain = box_probs > threshold * 255
                for min_size in range(60):
                    params = ClassPostprocess(threshold=threshold, min_size=min_size)
                    got, areas = day._threshold(c, params)
                    assert np.array_equal(got, threshold_class(box_probs, params)), min_size
                    assert np.array_equal(areas, slice_counts(got)), min_size
                    removed += int(np.count_nonzero(plain & ~got))
    assert removed > 0  # the strays are small components
