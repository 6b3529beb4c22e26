"""Inference: fold ensembles and flip TTA, the submission contract (Kaggle's shuffled sample,
its empty public re-run, one-line errors), and the out-of-fold -> score -> tune -> infer loop.

Models are trained once per module: 5 folds of the CPU demo recipe at 32x32 for one epoch.
What they predict does not matter here, only where it goes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from gitract.config import PostprocessConfig, load_config
from gitract.data.cache import VolumeCache
from gitract.data.folds import create_folds_file, load_folds
from gitract.data.layout import CLASSES, load_train_table, parse_slice_path, scan_images
from gitract.data.rle import rle_decode, rle_encode
from gitract.errors import CheckpointError, ConfigError, DataError
from gitract.inference import submission as inference
from gitract.inference.blend import blend_spec
from gitract.inference.submission import (
    default_output_path,
    encode_volume,
    infer_test,
    read_sample_submission,
    write_submission,
)
from gitract.models import kind2d
from gitract.models.checkpoint import find_checkpoints
from gitract.models.kind2d import Ensemble, Kind2D, predict_slices
from gitract.postprocess.steps import ClassPostprocess, load_postprocess, quantize
from gitract.training.engine import fit

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo_cpu.yaml"
FAST = ["data.img_size=[32, 32]", "data.num_workers=0", "train.batch_size=32", "train.epochs=1"]
CPU = torch.device("cpu")
# One torch thread: these models are tiny, and on 2 cores shared with other test processes
# two threads per process made training and inference 5-10x slower (spinning OpenMP threads).
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _infer(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "scripts/infer.py", "--config", str(DEMO), "--no-progress", *args]
    return subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=ONE_THREAD
    )


def _evaluate(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "scripts/evaluate.py", *args]
    return subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=ONE_THREAD
    )


def _read(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False)


# --------------------------------------------------------------------------- ensembling


class _Skewed(nn.Module):
    """Logits that depend on the pixel position (a ramp along W and H): no flip symmetry, so a
    TTA view that is not flipped back gives a visibly different answer."""

    def __init__(self, scale: float, tilt: float) -> None:
        super().__init__()
        self.scale, self.tilt = scale, tilt

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        ramp = torch.linspace(-2, 2, w) + self.tilt * torch.linspace(-1, 1, h)[:, None]
        return self.scale * x[:, :3] + ramp


@pytest.fixture(scope="module")
def demo_cfg():
    return load_config(DEMO, FAST)


def _ensemble(models, cfg, flips=()) -> Ensemble:
    return Ensemble(list(models), [cfg] * len(models), CPU, tuple(flips))


def test_tta_views_are_flipped_back(demo_cfg) -> None:
    torch.manual_seed(0)
    x = torch.rand(2, 3, 8, 12)
    model = _Skewed(1.5, 0.7)
    sig = torch.sigmoid
    plain = sig(model(x))
    assert torch.allclose(_ensemble([model], demo_cfg).predict(x), plain)

    got = _ensemble([model], demo_cfg, ["hflip"]).predict(x)
    want = (plain + sig(model(x.flip(-1))).flip(-1)) / 2
    wrong = (plain + sig(model(x.flip(-1)))) / 2  # the view left un-flipped
    assert torch.allclose(got, want, atol=1e-6)
    assert (got - wrong).abs().max() > 0.05

    got = _ensemble([model], demo_cfg, ["hflip", "vflip"]).predict(x)
    want = (plain + sig(model(x.flip(-1))).flip(-1) + sig(model(x.flip(-2))).flip(-2)) / 3
    assert torch.allclose(got, want, atol=1e-6)
    assert got.dtype == torch.float32 and got.shape == (2, 3, 8, 12)

    batches: list[int] = []
    model.register_forward_hook(lambda _m, inputs, _out: batches.append(len(inputs[0])))
    _ensemble([model], demo_cfg, ["hflip", "vflip"]).predict(x)
    assert batches == [6]  # the three views in one forward pass


def test_ensemble_is_the_mean_of_its_models(demo_cfg) -> None:
    x = torch.rand(2, 3, 8, 12)
    a, b = _Skewed(1.0, 0.5), _Skewed(-2.0, -1.0)
    for flips in ((), ("hflip",)):
        both = _ensemble([a, b], demo_cfg, flips).predict(x)
        single = [_ensemble([m], demo_cfg, flips).predict(x) for m in (a, b)]
        assert torch.allclose(both, (single[0] + single[1]) / 2, atol=1e-6)
        assert (both - single[0]).abs().max() > 0.05


def test_unknown_flip_is_a_config_error(demo_cfg) -> None:
    with pytest.raises(ConfigError, match=r"infer.tta_flips: unknown flip 'rot90'"):
        _ensemble([_Skewed(1, 0)], demo_cfg, ["hflip", "rot90"])


# --------------------------------------------------------------------------- small contracts


def test_default_output_path(tmp_path, monkeypatch) -> None:
    working, kaggle_input = tmp_path / "working", tmp_path / "input" / "uw-madison"
    working.mkdir()
    monkeypatch.setattr(inference, "KAGGLE_INPUT", kaggle_input)
    # Outside a Kaggle kernel (no /kaggle/input): the repository's submissions/ folder.
    assert default_output_path(working) == Path("submissions/submission.csv")
    kaggle_input.mkdir(parents=True)
    assert default_output_path(working) == working / "submission.csv"
    assert default_output_path(tmp_path / "absent") == Path("submissions/submission.csv")


def test_write_submission_keeps_the_sample_order_and_is_atomic(tmp_path, monkeypatch) -> None:
    sample = pd.DataFrame(
        {"id": ["b", "a", "b"], "class": ["stomach", "large_bowel", "large_bowel"]}
    )
    predictions = {("a", "large_bowel"): "1 2", ("b", "large_bowel"): "", ("b", "stomach"): "3 1"}
    out = tmp_path / "sub" / "submission.csv"
    write_submission(sample, predictions, out)
    text = "id,class,predicted\nb,stomach,3 1\na,large_bowel,1 2\nb,large_bowel,\n"
    assert out.read_text() == text

    # A write that dies half-way leaves the previous file whole and no temp file beside it.
    def die(frame, path, **kwargs):
        Path(path).write_text("id,class,pred")
        raise OSError("disk full")

    monkeypatch.setattr(pd.DataFrame, "to_csv", die)
    with pytest.raises(OSError, match="disk full"):
        write_submission(sample, predictions, out)
    assert out.read_text() == text
    assert [p.name for p in out.parent.iterdir()] == ["submission.csv"]
    monkeypatch.undo()
    # So does a missing prediction (a bug: every sample row must have been predicted).
    del predictions[("b", "stomach")]
    with pytest.raises(KeyError):
        write_submission(sample, predictions, tmp_path / "other" / "submission.csv")
    assert not (tmp_path / "other").exists()


def test_find_checkpoints_names_what_is_missing(tmp_path) -> None:
    with pytest.raises(CheckpointError, match=rf"no best.pt under {tmp_path}"):
        find_checkpoints(tmp_path)
    (tmp_path / "fold0").mkdir()
    (tmp_path / "fold0" / "best.pt").write_bytes(b"")
    assert find_checkpoints(tmp_path) == [tmp_path / "fold0" / "best.pt"]
    with pytest.raises(CheckpointError, match=r"requested folds: .*fold1/best.pt"):
        find_checkpoints(tmp_path, [0, 1])


def test_read_sample_submission_rejects_an_empty_file(tmp_path) -> None:
    path = tmp_path / "sample_submission.csv"
    path.write_text("")
    with pytest.raises(DataError, match=r"sample_submission.csv: file is empty"):
        read_sample_submission(path)


def _pairs(params) -> tuple[list[float], list[int]]:
    return [p.threshold for p in params], [p.min_size for p in params]


def test_load_postprocess_prefers_the_tuned_file_and_checks_it(tmp_path, demo_cfg) -> None:
    assert load_postprocess(tmp_path, demo_cfg.postprocess) == PostprocessConfig()
    # The file holds the config section's schema: every step per class name.
    steps = {"threshold": 0.4, "gate_prob": 0.8, "fill_gaps": 1, "keep_largest": True}
    (tmp_path / "postprocess.json").write_text(json.dumps(dict.fromkeys(CLASSES, steps)))
    tuned = load_postprocess(tmp_path, demo_cfg.postprocess)
    assert tuned.per_class() == (ClassPostprocess(**steps),) * 3
    # The older forms (thresholds and 2D sizes only; "classes") are not read any more.
    older = {"thresholds": [0.3, 0.4, 0.6], "min_component_size": [0, 25, 100]}
    for bad in (older, {"thresholds": [0.3, 0.4]}, {"classes": {"stomach": steps}}, [1, 2]):
        (tmp_path / "postprocess.json").write_text(json.dumps(bad))
        with pytest.raises(DataError, match=r"postprocess.json: not a tuned post-processing file"):
            load_postprocess(tmp_path, demo_cfg.postprocess)


def test_config_postprocess_section_is_one_setting_per_class(demo_cfg) -> None:
    settings = ["postprocess.small_bowel={min_run: 2}", "postprocess.stomach={threshold: 0.6}"]
    params = load_config(DEMO, settings).postprocess.per_class()
    assert _pairs(params) == ([0.5, 0.5, 0.6], [0, 0, 0])
    assert [p.min_run for p in params] == [0, 2, 0]
    # The thresholds live in the postprocess section only.
    with pytest.raises(ConfigError, match=r"unknown key 'infer.thresholds'"):
        load_config(DEMO, ["infer.thresholds=[0.3,0.4,0.6]"])
    with pytest.raises(
        ConfigError, match=r"'postprocess.small_bowel.gate_prob' must be in \[0, 1\]"
    ):
        load_config(DEMO, ["postprocess.small_bowel={gate_prob: 2}"])


@pytest.fixture(scope="module")
def five_folds(synthetic_set, tmp_path_factory):
    """5 folds of the synthetic train cases, each trained for one epoch at 32x32."""
    base = tmp_path_factory.mktemp("five_folds")
    folds_csv = base / "folds5.csv"
    folds = create_folds_file(synthetic_set.root, folds_csv, n_splits=5, seed=0)
    cfg = load_config(DEMO, FAST)
    for fold in range(5):
        run = fit(cfg, fold, synthetic_set.root, folds_csv, base / "runs", progress=False)
    return SimpleNamespace(runs=run.parent, folds_csv=folds_csv, folds=folds, cfg=cfg)


def _test_copy(synthetic_set, dest: Path, sample: pd.DataFrame | None = None) -> Path:
    """A data folder with the synthetic test/ images and ``sample`` (default: the synthetic
    sample_submission.csv) as its sample submission."""
    shutil.copytree(synthetic_set.root / "test", dest / "test")
    if sample is None:
        sample = _read(synthetic_set.root / "sample_submission.csv")
    sample.to_csv(dest / "sample_submission.csv", index=False)
    return dest


def test_fold_ensemble_of_checkpoints_is_the_mean_of_single_folds(five_folds) -> None:
    paths = find_checkpoints(five_folds.runs, [0, 1])
    x = torch.rand(4, 3, 32, 32)
    both = Ensemble.load(paths, CPU, ["hflip"]).predict(x)
    single = [Ensemble.load([p], CPU, ["hflip"]).predict(x) for p in paths]
    assert torch.allclose(both, (single[0] + single[1]) / 2, atol=1e-6)
    assert not torch.allclose(single[0], single[1], atol=1e-3)


def test_five_fold_submission_follows_a_shuffled_sample(
    five_folds, synthetic_set, tmp_path, monkeypatch
) -> None:
    sample = _read(synthetic_set.root / "sample_submission.csv").sample(frac=1, random_state=5)
    data = _test_copy(synthetic_set, tmp_path / "data", sample)
    loaded: list[Ensemble] = []
    predictor = Kind2D.predictor

    def spy(self, *args, **kwargs):
        made = predictor(self, *args, **kwargs)
        loaded.append(made.ensemble)
        return made

    monkeypatch.setattr(Kind2D, "predictor", spy)
    out = tmp_path / "sub" / "submission.csv"
    got = infer_test(
        five_folds.cfg,
        data,
        blend_spec([five_folds.runs]),
        out=out,
        device=CPU,
        num_workers=0,
        progress=False,
    )
    assert got == out
    assert len(find_checkpoints(five_folds.runs)) == 5
    assert len(loaded) == 1 and len(loaded[0].models) == 5  # every fold in the ensemble
    assert loaded[0].tta_flips == ("hflip",)

    sub = _read(out)
    assert list(sub.columns) == ["id", "class", "predicted"]
    assert sub[["id", "class"]].equals(sample[["id", "class"]].reset_index(drop=True))
    shapes = {row.id: (row.height, row.width) for row in scan_images(data / "test").itertuples()}
    for path in (data / "test").rglob("*.png"):  # the H x W of the file name, width first
        info = parse_slice_path(path)
        assert shapes[info.id] == (info.height, info.width)
    painted = 0
    for row in sub.itertuples():
        mask = rle_decode(row.predicted, shapes[row.id])
        assert rle_encode(mask) == row.predicted  # canonical: sorted, no overlapping runs
        painted += int(mask.any())
    assert painted > 0  # not trivially empty
    assert not [p for p in out.parent.iterdir() if p.name != "submission.csv"]


def test_empty_public_test_gives_a_header_only_submission_without_models(tmp_path) -> None:
    """Kaggle's public re-run: test/ empty, sample_submission.csv only a header."""
    data = tmp_path / "data"
    (data / "test").mkdir(parents=True)
    (data / "sample_submission.csv").write_text("id,class,predicted\n")
    (tmp_path / "no_runs").mkdir()  # any model load would fail: there is none
    out = tmp_path / "submission.csv"
    start = time.monotonic()
    result = _infer(
        "--data-dir", str(data), "--runs", str(tmp_path / "no_runs"), "--out", str(out),
        timeout=60,
    )  # fmt: skip
    seconds = time.monotonic() - start
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert out.read_text() == "id,class,predicted\n"
    assert seconds < 30, seconds


def _bad_checkpoint(five_folds, dest: Path) -> Path:
    """fold0/best.pt whose config names another encoder than the weights it holds."""
    ckpt = torch.load(five_folds.runs / "fold0" / "best.pt", map_location="cpu", weights_only=True)
    ckpt["config"]["model"]["encoder_name"] = "resnet18"
    (dest / "fold0").mkdir(parents=True)
    torch.save(ckpt, dest / "fold0" / "best.pt")
    return dest / "fold0" / "best.pt"


@pytest.mark.parametrize(
    "fault", ["missing_image", "no_checkpoint", "config_mismatch", "unknown_class", "duplicate"]
)
def test_infer_script_bad_input_is_a_one_line_error(
    fault, five_folds, synthetic_set, tmp_path
) -> None:
    sample = _read(synthetic_set.root / "sample_submission.csv")
    runs = five_folds.runs
    if fault == "missing_image":
        extra = pd.DataFrame({"id": ["case999_day0_slice_0001"] * 3, "class": list(CLASSES)})
        sample = pd.concat([sample, extra.assign(predicted="")], ignore_index=True)
        culprit = ["case999_day0_slice_0001", "sample_submission.csv", "no image"]
    elif fault == "no_checkpoint":
        runs = tmp_path / "empty_runs"
        runs.mkdir()
        culprit = [str(runs), "best.pt"]
    elif fault == "config_mismatch":
        bad = _bad_checkpoint(five_folds, tmp_path / "bad_runs")
        runs = bad.parent.parent
        culprit = [str(bad), "resnet18", "do not match"]
    elif fault == "unknown_class":
        sample.loc[4, "class"] = "liver"
        culprit = ["sample_submission.csv", "line 6", "'liver'"]
    else:
        sample = pd.concat([sample, sample.iloc[[7]]], ignore_index=True)
        row = sample.iloc[7]
        culprit = ["sample_submission.csv", "duplicated", row["id"], row["class"]]
    data = _test_copy(synthetic_set, tmp_path / "data", sample)
    out = tmp_path / "out" / "submission.csv"
    result = _infer("--data-dir", str(data), "--runs", str(runs), "--out", str(out))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for word in culprit:
        assert word in lines[0], (word, lines[0])
    assert not out.exists() and not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- OOF and tuning


@pytest.fixture(scope="module")
def oof(five_folds, synthetic_set, tmp_path_factory):
    """infer.py --oof for the fold with the fewest slices, in a runs folder holding that fold
    and one other (so the wrong model would be at hand)."""
    counts = five_folds.folds["fold"].value_counts()
    fold = int(counts.idxmin())
    other = (fold + 1) % 5
    runs = tmp_path_factory.mktemp("oof") / "demo_cpu"
    for k in (fold, other):
        (runs / f"fold{k}").mkdir(parents=True)
        shutil.copy(five_folds.runs / f"fold{k}" / "best.pt", runs / f"fold{k}" / "best.pt")
    result = _infer(
        "--oof", "--fold", str(fold), "--data-dir", str(synthetic_set.root), "--runs", str(runs),
        "--folds-csv", str(five_folds.folds_csv), "--set", "data.num_workers=0",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"wrote {runs / 'oof.csv'}"
    return SimpleNamespace(runs=runs, fold=fold, other=other, csv=runs / "oof.csv")


def test_oof_predicts_the_folds_validation_slices_with_its_own_model(
    oof, five_folds, synthetic_set
) -> None:
    table = load_folds(five_folds.folds_csv, load_train_table(synthetic_set.root))
    val = table[table["fold"] == oof.fold]
    sub = _read(oof.csv)
    expected = [(i, c) for i in val["id"] for c in CLASSES]
    assert list(zip(sub["id"], sub["class"], strict=True)) == expected
    for row in sub.itertuples():
        rle_decode(row.predicted, tuple(val.set_index("id").loc[row.id, ["height", "width"]]))

    # One probability file per validation case-day, and it holds fold N's model's output.
    saved = sorted(p.stem for p in (oof.runs / "oof_probs").iterdir())
    assert saved == sorted(val["case_day"].unique())
    day = saved[0]
    with np.load(oof.runs / "oof_probs" / f"{day}.npz") as npz:
        probs, ids = npz["probs"].astype(int), npz["ids"].tolist()
    day_rows = val[val["case_day"] == day]
    assert ids == day_rows["id"].tolist()
    cache = VolumeCache(table, with_masks=True, progress=False)

    def predicted(fold: int) -> np.ndarray:
        ensemble = Ensemble.load(find_checkpoints(oof.runs, [fold]), CPU, ["hflip"])
        stream = predict_slices(ensemble, day_rows, cache, batch_size=32, progress=False)
        return np.stack([np.rint(p * 255) for _, p, _ in stream]).astype(int)

    assert np.abs(predicted(oof.fold) - probs).max() <= 1
    assert np.abs(predicted(oof.other) - probs).max() > 5


def test_evaluate_script_scores_the_oof_submission(oof, synthetic_set) -> None:
    result = _evaluate("--submission", str(oof.csv), "--data-dir", str(synthetic_set.root))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1
    scores = json.loads(lines[0])
    for key in ("score", "dice", "hausdorff", *(f"{m}_{c}" for m in ("dice", "hausdorff")
                                                for c in CLASSES)):  # fmt: skip
        assert 0.0 <= scores[key] <= 1.0, key
    assert scores["score"] == pytest.approx(0.4 * scores["dice"] + 0.6 * (1 - scores["hausdorff"]))
    assert scores["n_rows"] == len(_read(oof.csv))  # scored on the fold's case-days only


@pytest.fixture(scope="module")
def tuned(oof, synthetic_set):
    """evaluate.py --tune on the OOF probabilities (a small grid, to stay quick)."""
    result = _evaluate(
        "--tune", "--runs", str(oof.runs), "--data-dir", str(synthetic_set.root), "--no-progress",
        "--thresholds", "0.3", "0.5", "--min-sizes", "0", "25",
        "--folds-csv", str(synthetic_set.folds_csv),  # not the repo's folds/ of a real set
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1
    return json.loads(lines[0])


def test_tuned_thresholds_are_written_and_used_by_infer(
    tuned, oof, five_folds, synthetic_set, tmp_path
) -> None:
    path = oof.runs / "postprocess.json"
    assert tuned["written_to"] == str(path)
    saved = PostprocessConfig.model_validate_json(path.read_text())
    thresholds, min_sizes = _pairs(saved.per_class())
    assert set(thresholds) <= {0.3, 0.5} and set(min_sizes) <= {0, 25}
    assert tuned["score"] >= tuned["baseline_score"]
    assert load_postprocess(oof.runs, five_folds.cfg.postprocess) == saved

    # One test case-day, through infer.py with the tuned file...
    sample = _read(synthetic_set.root / "sample_submission.csv")
    day = sample["id"].str.rsplit("_slice_", n=1).str[0]
    sample = sample[day == day.iloc[0]]
    data = _test_copy(synthetic_set, tmp_path / "data", sample)
    tuned_out = tmp_path / "tuned.csv"
    result = _infer(
        "--data-dir", str(data), "--runs", str(oof.runs), "--out", str(tuned_out),
        "--set", "data.num_workers=0",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    # ... and with a far lower threshold (same models, same minimum sizes).
    low = tmp_path / "low_runs"
    for fold_dir in oof.runs.glob("fold*"):
        shutil.copytree(fold_dir, low / fold_dir.name)
    low_settings = {
        c: {"threshold": 0.02, "min_size": m} for c, m in zip(CLASSES, min_sizes, strict=True)
    }
    (low / "postprocess.json").write_text(json.dumps(low_settings))
    low_out = infer_test(
        five_folds.cfg,
        data,
        blend_spec([low]),
        out=tmp_path / "low.csv",
        device=CPU,
        progress=False,
    )
    high_sub, low_sub = _read(tuned_out), _read(low_out)
    assert high_sub[["id", "class"]].equals(low_sub[["id", "class"]])
    assert not high_sub["predicted"].equals(low_sub["predicted"])
    shapes = scan_images(data / "test").set_index("id")
    more = 0
    for high, lower in zip(high_sub.itertuples(), low_sub.itertuples(), strict=True):
        hw = tuple(shapes.loc[high.id, ["height", "width"]])
        a, b = rle_decode(high.predicted, hw), rle_decode(lower.predicted, hw)
        assert not (a & ~b.astype(bool)).any()  # a lower threshold only adds pixels
        more += int(b.sum()) - int(a.sum())
    assert more > 0


def test_oof_only_flags_without_oof_are_refused() -> None:
    done = subprocess.run(
        [sys.executable, "scripts/infer.py", "--fold", "0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2
    assert "--fold and --folds-csv go with --oof" in done.stderr


def test_test_inference_streams_one_case_day_at_a_time(monkeypatch) -> None:
    """Test inference holds one case-day: the first volume comes out before a slice of the
    next case-day has been predicted."""
    ids = [f"case1_day0_slice_{z:04d}" for z in (1, 2)]
    ids += [f"case2_day0_slice_{z:04d}" for z in (1, 2)]
    table = pd.DataFrame({"id": ids, "case_day": [i.rsplit("_slice_", 1)[0] for i in ids]})
    consumed: list[str] = []

    def stream(*args, **kwargs):
        for i in ids:
            consumed.append(i)
            yield i, np.full((3, 4, 5), 0.6, np.float32), None

    monkeypatch.setattr(kind2d, "predict_slices", stream)
    volumes = kind2d.Predictor2D(ensemble=None).days(table, cache=None, progress=False)
    day = next(volumes)
    assert (day.case_day, day.ids) == ("case1_day0", ids[:2])
    probs = quantize(day.probs)
    assert probs.dtype == np.uint8 and probs.shape == (2, 3, 4, 5) and (probs == 153).all()
    assert consumed == ids[:3]  # one slice ahead to see the day end, no further
    assert next(volumes).case_day == "case2_day0"
    assert encode_volume(ids[:2], probs, PostprocessConfig().per_class())[(ids[0], "stomach")] != ""
