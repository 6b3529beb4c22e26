"""Blend selection on out-of-fold evidence: the greedy search against a brute-force search on
hand-made probabilities, and the written ensemble file reproducing the reported scores
through infer.py --ensemble exactly, pooled and per fold."""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from gitract.config import PostprocessConfig, config_to_dict, load_config
from gitract.data.layout import load_train_table
from gitract.errors import DataError
from gitract.inference.blend import (
    BlendSpec,
    MemberSpec,
    blend_spec,
    read_ensemble,
    write_ensemble,
)
from gitract.inference.submission import OOF_PROBS_DIR, infer_oof
from gitract.postprocess.selection import greedy_weights, select_blend
from gitract.postprocess.steps import (
    POSTPROCESS_FILE,
    ClassPostprocess,
    load_postprocess,
    quantize,
    save_postprocess,
)
from gitract.postprocess.tuning import OofSearch, case_day_folds
from gitract.scoring.files import score_profiles

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo_cpu.yaml"
CPU = torch.device("cpu")
FAST_2D = ["data.img_size=[32, 32]", "data.num_workers=0", "infer.batch_size=16"]
LAYOUT = [(1, 0, 4, 48, 40), (2, 0, 3, 44, 44), (3, 1, 5, 40, 40), (4, 2, 1, 40, 40)]


def _write_member(tiny, folder: Path, make) -> Path:
    """A run's OOF files: ``make(truth, rng)`` gives each case-day's float probabilities."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(len(folder.parts))
    for case, day, n, _, _ in LAYOUT:
        ids = [f"case{case}_day{day}_slice_{z:04d}" for z in range(1, n + 1)]
        truth = np.stack([tiny.masks[i].transpose(2, 0, 1) for i in ids]).astype(np.float32)
        probs = np.clip(make(truth, rng), 0, 1)
        np.savez_compressed(folder / f"case{case}_day{day}.npz", probs=quantize(probs), ids=ids)
    return folder


def _half_sure(truth: np.ndarray, left: bool) -> np.ndarray:
    """0.9 on the organ, 0.45 on its left (or right) half and on a false blob in a corner
    (top-left or bottom-right), 0.05 elsewhere."""
    width = truth.shape[-1]
    columns = np.arange(width) < width // 2
    half = truth * (columns if left else ~columns)
    probs = 0.05 + 0.85 * truth - 0.45 * half
    blob = (slice(None), slice(None), slice(1, 5), slice(1, 5))
    if not left:
        blob = (slice(None), slice(None), slice(-5, -1), slice(-5, -1))
    probs[blob] = np.maximum(probs[blob], 0.45)
    return probs


def _brute_force(search: OofSearch, max_weight: int) -> tuple[float, set]:
    """Every integer weight vector of sum <= max_weight, thresholds tuned: the best score and
    the weight shares that reach it."""
    n = len(search.member_dirs)
    start = [ClassPostprocess()] * 3
    scores = {}
    for weights in itertools.product(range(max_weight + 1), repeat=n):
        if not 0 < sum(weights) <= max_weight:
            continue
        share = _share(weights)
        if share in scores:
            continue
        search.blend(weights)
        sweeps = 1 if search.profile == "kaggle" else 2
        scores[share] = search.search(start, ["threshold"], sweeps)[1]
    best = max(scores.values())
    return best, {s for s, v in scores.items() if v >= best - 1e-12}


def _share(weights) -> tuple:
    return tuple(round(w / sum(weights), 9) for w in weights)


@pytest.mark.parametrize(
    ("case", "profile"),
    [("complementary", "kaggle"), ("one_is_best", "kaggle"), ("complementary", "mlebench")],
)
def test_greedy_selection_picks_what_brute_force_picks(make_tiny_kaggle, tmp_path, case, profile):
    """Two members with independent errors (their blend beats either) and a poor third; or one
    good member against two that only hurt it. The greedy search (with replacement) lands on a
    blend the exhaustive search over every weight vector also finds best."""
    tiny = make_tiny_kaggle("select", layout=LAYOUT, test_layout=[])
    if case == "complementary":
        # Each of the first two is unsure of one half of the organ and as unsure of a false
        # blob of its own: alone, no threshold keeps the half without the blob; blended, the
        # halves add up and the blobs halve. The third is noise.
        makers = [
            lambda t, r: _half_sure(t, left=True),
            lambda t, r: _half_sure(t, left=False),
            lambda t, r: 0.3 * t + r.normal(0.3, 0.25, t.shape),
        ]
    else:
        makers = [
            lambda t, r: 0.8 * t + r.normal(0.05, 0.08, t.shape),
            lambda t, r: 0.8 * np.roll(t, 6, axis=-1) + 0.1,  # the organ in the wrong place
            lambda t, r: 0.6 * (1 - t),  # everything but the organ
        ]
    dirs = [
        _write_member(tiny, tmp_path / f"run{k}" / OOF_PROBS_DIR, m) for k, m in enumerate(makers)
    ]
    table = load_train_table(tiny.root, exclude=())
    with OofSearch(dirs, table, profile, workers=1) as search:
        searched, original = [], search.search

        def recorded(*args, **kwargs):
            searched.append(_share(search.weights))
            return original(*args, **kwargs)

        search.search = recorded
        weights, history, alone = greedy_weights(search, max_weight=4, progress=False)
        search.search = original
        best, best_shares = _brute_force(search, max_weight=4)
    # Each blend is searched once: adding a run to itself alone is the same blend.
    assert len(searched) == len(set(searched)) and len(searched) >= 5
    assert history[0]["score"] == max(alone)
    assert history[-1]["score"] == pytest.approx(best, abs=1e-12)
    assert _share(weights) in best_shares
    if case == "complementary":
        assert weights[2] == 0 and weights[0] > 0 and weights[1] > 0
        assert best > max(alone) + 0.005  # the blend is worth having
    else:
        assert weights == [1, 0, 0] and best == max(alone)


# --------------------------------------------------------------------------- round trip


def _random_run(cfg, runs: Path, seed: int, folds=(0, 1)) -> Path:
    """A run of the demo's U-Net with random weights per fold, as engine saves checkpoints."""
    from gitract.models.smp2d import build_model

    model = build_model(cfg.model, in_channels=cfg.data.in_channels)
    for fold in folds:
        torch.manual_seed(seed + fold)
        for p in model.parameters():
            nn.init.normal_(p, std=0.2)
        (runs / f"fold{fold}").mkdir(parents=True)
        ckpt = {"model": model.state_dict(), "config": config_to_dict(cfg), "meta": {"fold": fold}}
        torch.save(ckpt, runs / f"fold{fold}" / "best.pt")
    return runs


def _test_set_of_fold(data: Path, folds_csv: Path, fold: int, out: Path) -> Path:
    """A data folder whose test/ is fold ``fold``'s train cases (copies) and whose
    sample_submission.csv lists their slices: what inference then predicts is the OOF."""
    (out / "test").mkdir(parents=True)
    folds = pd.read_csv(folds_csv)
    rows = folds[folds["fold"] == fold]
    for case in sorted(rows["case"].unique()):
        shutil.copytree(data / "train" / f"case{case}", out / "test" / f"case{case}")
    shutil.copy(data / "train.csv", out / "train.csv")
    ids = rows.sort_values(["case", "day", "slice"])["id"]
    sample = pd.DataFrame(
        [(i, c, "") for i in ids for c in ("large_bowel", "small_bowel", "stomach")],
        columns=["id", "class", "predicted"],
    )
    sample.to_csv(out / "sample_submission.csv", index=False)
    return out


def _script(name: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / name), *args],
        cwd=cwd, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def test_selected_ensemble_reproduces_its_oof_scores_through_infer(synthetic_set, tmp_path):
    """Two runs predicted out of fold on two folds; --select writes an ensemble file and the
    blend's postprocess.json; infer.py --ensemble on each fold's cases (as a test set, with
    that fold's models) gives exactly the reported per-fold scores, and both folds together
    exactly the pooled one."""
    cfg = load_config(DEMO, FAST_2D)
    runs = [_random_run(cfg, tmp_path / "runs" / f"r{k}", seed=10 * k) for k in range(2)]
    for run in runs:
        infer_oof(cfg, synthetic_set.root, blend_spec([run]), synthetic_set.folds_csv, [0, 1],
                  device=CPU, progress=False)  # fmt: skip
    out = tmp_path / "ensembles" / "pick.yaml"
    done = _script(
        "evaluate.py", "--select", "--runs", *map(str, runs), "--data-dir",
        str(synthetic_set.root), "--folds-csv", str(synthetic_set.folds_csv), "--out", str(out),
        "--no-progress", "--workers", "1", "--thresholds", "0.3", "0.5", "0.7", cwd=tmp_path,
    )  # fmt: skip
    report = json.loads(done.stdout.strip().splitlines()[-1])["kaggle"]
    assert report["ensemble_file"] == str(out)
    spec = read_ensemble(out, base=tmp_path)
    assert spec.dir == tmp_path / "runs" / "pick"
    assert (spec.dir / POSTPROCESS_FILE).is_file()
    kept = [r for r, w in zip(runs, report["weights"], strict=True) if w > 0]
    assert [m.run for m in spec.members] == kept
    assert [m.weight for m in spec.members] == [w for w in report["weights"] if w > 0]
    assert _chosen(report)["full"]["score"] == report["score"]
    assert report["score"] >= max(m["full"]["score"] for m in report["members"])
    assert set(report["selected"]["full"]["per_fold"]) == {"0", "1"}
    assert report["n_case_days"] == sum(1 for _ in (runs[0] / OOF_PROBS_DIR).glob("*.npz"))

    subs = []
    for fold in (0, 1):
        data = _test_set_of_fold(synthetic_set.root, synthetic_set.folds_csv, fold,
                                 tmp_path / f"fold{fold}_as_test")  # fmt: skip
        sub = _infer(out, fold, data, tmp_path)
        # The truth: train.csv's rows of the case-days the submission covers.
        scored = score_profiles(sub, synthetic_set.root, None, ["kaggle"])["kaggle"]
        assert scored["score"] == _chosen(report)["full"]["per_fold"][str(fold)]
        subs.append(pd.read_csv(sub, dtype=str, keep_default_na=False))
    both = tmp_path / "both.csv"
    pd.concat(subs).to_csv(both, index=False)
    scored = score_profiles(both, synthetic_set.root, None, ["kaggle"])
    assert scored["kaggle"]["score"] == report["score"]
    params = load_postprocess(spec.dir, cfg.postprocess).model_dump()
    assert params == report["classes"] == _chosen(report)["classes"]

    # Every reported trial is reproducible, a true blend too: the equal-weight one, as an
    # ensemble file with its own tuned settings, on fold 0.
    equal = report["equal_blend"]
    blend = BlendSpec(tuple(MemberSpec(r, 1.0) for r in runs), tmp_path / "runs" / "equal")
    save_postprocess(
        PostprocessConfig.model_validate(equal["classes"]), blend.dir / POSTPROCESS_FILE
    )
    write_ensemble(blend, tmp_path / "equal.yaml")
    sub = _infer(tmp_path / "equal.yaml", 0, tmp_path / "fold0_as_test", tmp_path)
    scored = score_profiles(sub, synthetic_set.root, None, ["kaggle"])["kaggle"]
    assert scored["score"] == equal["full"]["per_fold"]["0"]


def _infer(ensemble: Path, fold: int, data: Path, tmp_path: Path) -> Path:
    """infer.py --ensemble with fold ``fold``'s models on ``data``'s test set."""
    sub = tmp_path / f"sub_{ensemble.stem}_{fold}.csv"
    _script(
        "infer.py", "--ensemble", str(ensemble), "--folds", str(fold), "--data-dir", str(data),
        "--out", str(sub), "--no-progress", "--config", str(DEMO), "--set", *FAST_2D,
        cwd=tmp_path,
    )  # fmt: skip
    return sub


def _chosen(report: dict) -> dict:
    """The report's trial of the chosen blend (the selected one, or a run alone)."""
    name = report["chosen"]
    if name in ("selected", "equal_blend"):
        return report[name]
    return report["members"][int(name.split()[1])]


def test_case_day_folds_and_select_errors(tmp_path, make_tiny_kaggle) -> None:
    folds = tmp_path / "folds.csv"
    folds.write_text("id,case,day,slice,fold\ncase1_day0_slice_0001,1,0,1,2\n")
    assert case_day_folds(folds) == {"case1_day0": 2}
    folds.write_text("id,case,day,slice,fold\ncase1_day0_slice_0001,1,0,1,x\n")
    with pytest.raises(DataError, match=r"folds.csv: line 2: fold 'x' is not an integer"):
        case_day_folds(folds)
    tiny = make_tiny_kaggle("errors", layout=LAYOUT, test_layout=[])
    table = load_train_table(tiny.root, exclude=())
    a = _write_member(tiny, tmp_path / "a" / OOF_PROBS_DIR, lambda t, r: t)
    empty = tmp_path / "b" / OOF_PROBS_DIR
    empty.mkdir(parents=True)
    with pytest.raises(DataError, match=r"b/oof_probs: no OOF probabilities; run scripts/infer.py"):
        select_blend([a, empty], table, progress=False)
    with pytest.raises(
        DataError, match=r"case2_day0: OOF probabilities of a case-day that no fold holds"
    ):
        select_blend([a], table, folds={"case1_day0": 0}, progress=False)
