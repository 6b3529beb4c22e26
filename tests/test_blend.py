"""Blends of runs: the weighted mean per case-day, ensemble files, aux-head presence, and a 2.5D +
3D blend end to end (test submission, blended OOF probabilities that the tuner reads).

The runs are random-initialised networks saved in the checkpoint format engine writes: what
they predict does not matter, only that the blend is the weighted mean of what each predicts.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from gitract.config import config_to_dict, load_config
from gitract.data.cache import VolumeCache
from gitract.data.layout import CLASSES, load_train_table, scan_images
from gitract.data.rle import rle_decode, rle_encode
from gitract.errors import CheckpointError, ConfigError
from gitract.inference.blend import (
    BlendSpec,
    DayPrediction,
    MemberSpec,
    blend_days,
    blend_spec,
    load_member,
    read_ensemble,
)
from gitract.inference.submission import OOF_PROBS_DIR, encode_volume, infer_oof, infer_test
from gitract.models.kind2d import Ensemble
from gitract.postprocess.steps import ClassPostprocess, blend_quantized, quantize

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo_cpu.yaml"
CPU = torch.device("cpu")
FAST_2D = ["data.img_size=[32, 32]", "data.num_workers=0", "infer.batch_size=16"]
# A tiny 3D recipe: MONAI UNet of 4 filters on a 32 x 32 grid, windows of 16 slices.
TINY_3D = [
    "model.kind=3d", "model.arch=UNet", "model.init_filters=4", "data.grid_hw=[32, 32]",
    "data.patch_size=[16, 32, 32]", "data.num_workers=0", "infer.sw_overlap=0.25",
]  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------- fake members


class _FakeMember:
    """Yields fixed probabilities per case-day and records how far it was consumed."""

    def __init__(self, name, weight, days, presence=None, log=None):
        self.name, self.weight, self._days = name, weight, days
        self._presence, self.log = presence, log if log is not None else []

    def days(self, table, cache, progress=True) -> Iterator[DayPrediction]:
        for case_day, probs in self._days:
            self.log.append((self.name, case_day))
            ids = [f"{case_day}_slice_{z:04d}" for z in range(1, len(probs) + 1)]
            presence = None if self._presence is None else self._presence[case_day]
            yield DayPrediction(case_day, ids, probs, presence)


def _day(value: float) -> np.ndarray:
    return np.full((2, 3, 4, 5), value, np.float32)


def test_blend_is_the_weighted_mean_per_case_day_in_lockstep() -> None:
    """Each member is quantised as its OOF files keep it, then the weighted mean of those is
    quantised again (what selection forms from OOF files); presence the same, over the members
    that have one."""
    rng = np.random.default_rng(0)
    a = {cd: rng.random((2, 3, 4, 5), dtype=np.float32) for cd in ("case1_day0", "case2_day0")}
    b = {cd: rng.random((2, 3, 4, 5), dtype=np.float32) for cd in a}
    pres = {cd: rng.random((2, 3), dtype=np.float32) for cd in a}
    log: list = []
    members = [
        _FakeMember("a", 3.0, list(a.items()), log=log),
        _FakeMember("b", 1.0, list(b.items()), presence=pres, log=log),
    ]
    stream = blend_days(members, pd.DataFrame(), cache=None)
    first = next(stream)
    assert first.case_day == "case1_day0" and first.probs.dtype == np.uint8

    def want(day: str) -> np.ndarray:
        mean = (3 * quantize(a[day]).astype(np.float64) + quantize(b[day])) / 4
        return np.rint(mean).astype(np.uint8)

    # Weights 3 and 1: every float32 step is exact, so the blend is the exact rounded mean.
    np.testing.assert_array_equal(first.probs, want("case1_day0"))
    # Presence: the weighted mean over the members that have one (here only b).
    np.testing.assert_array_equal(first.presence, quantize(pres["case1_day0"]))
    assert log == [("a", "case1_day0"), ("b", "case1_day0")]  # nothing of day 2 yet
    second = next(stream)
    np.testing.assert_array_equal(second.probs, want("case2_day0"))
    assert next(stream, None) is None

    plain = [_FakeMember("a", 1.0, [("case1_day0", _day(0.2))])]
    (only,) = blend_days(plain, pd.DataFrame(), None)
    assert only.presence is None and (only.probs == quantize(_day(0.2))).all()


def test_blend_quantized_is_exact_and_leaves_out_zero_weights() -> None:
    """Integer weights: the float32 sums are exact, so the blend is the correctly rounded
    weighted mean; a member of weight 0 changes nothing; one member passes through."""
    rng = np.random.default_rng(1)
    q = [rng.integers(0, 256, (4, 3, 5, 6), dtype=np.uint8) for _ in range(3)]
    got = blend_quantized(q, [2, 1, 0])
    exact = (2 * q[0].astype(np.int64) + q[1]) / 3  # never a .5 tie with a divisor of 3
    np.testing.assert_array_equal(got, np.rint(exact).astype(np.uint8))
    np.testing.assert_array_equal(got, blend_quantized(q[:2], [2, 1]))
    np.testing.assert_array_equal(got, blend_quantized(q[:2], [4, 2]))  # the same shares
    assert blend_quantized(q, [0, 5, 0]) is q[1]
    with pytest.raises(ValueError, match="weight > 0"):
        blend_quantized(q, [0, 0, 0])


def test_blend_refuses_members_out_of_step() -> None:
    members = [
        _FakeMember("a", 1.0, [("case1_day0", _day(0.2))]),
        _FakeMember("b", 1.0, [("case2_day0", _day(0.4))]),
    ]
    with pytest.raises(CheckpointError, match=r"member b predicted case2_day0 while a"):
        list(blend_days(members, pd.DataFrame(), None))
    other_size = np.full((2, 3, 6, 5), 0.4, np.float32)
    members[1] = _FakeMember("b", 1.0, [("case1_day0", other_size)])
    with pytest.raises(CheckpointError, match=r"case1_day0: member b gave \(2, 3, 6, 5\)"):
        list(blend_days(members, pd.DataFrame(), None))


# --------------------------------------------------------------------------- ensemble files


def test_ensemble_file_and_blend_spec(tmp_path) -> None:
    path = tmp_path / "b7_3d.yaml"
    path.write_text(
        "members:\n  - run: runs/b7\n    weight: 0.6\n  - run: runs/seg3d\n    weight: 0.4\n"
    )
    spec = read_ensemble(path, base=tmp_path)
    assert spec.members == (
        MemberSpec(tmp_path / "runs" / "b7", 0.6),
        MemberSpec(tmp_path / "runs" / "seg3d", 0.4),
    )
    assert spec.dir == tmp_path / "runs" / "b7_3d"
    path.write_text('{"dir": "out/blend", "members": [{"run": "r1"}]}')  # JSON is YAML too
    assert read_ensemble(path, base=tmp_path) == BlendSpec(
        (MemberSpec(tmp_path / "r1", 1.0),), tmp_path / "out" / "blend"
    )
    path.write_text("members:\n  - run: r1\n  - run: r2\n    weight: -1\n")
    with pytest.raises(ConfigError, match=rf"{path}: members\[1\]: weight must be a number > 0"):
        read_ensemble(path)
    path.write_text("members:\n  - run: r1\n    wieght: 2\n")
    with pytest.raises(ConfigError, match=r"members\[0\]: unknown key 'wieght'"):
        read_ensemble(path)
    path.write_text("runs: [a, b]\n")
    with pytest.raises(ConfigError, match=rf"{path}: needs 'members:'"):
        read_ensemble(path)

    spec = blend_spec(["runs/a", "runs/b"], [2, 1])
    assert spec.dir == Path("runs/blend_a+b") and [m.weight for m in spec.members] == [2.0, 1.0]
    assert blend_spec(["runs/a"]).dir == Path("runs/a")
    with pytest.raises(ConfigError, match=r"--weights: 1 weight\(s\) for 2 run\(s\)"):
        blend_spec(["runs/a", "runs/b"], [1])
    with pytest.raises(ConfigError, match=r"a run is listed twice"):
        blend_spec(["runs/a", "runs/a"])


# --------------------------------------------------------------------------- aux head


class _WithAux(nn.Module):
    """Mask logits with a ramp along W (no flip symmetry) and presence logits from the mean
    intensity, like an smp model built with aux_params."""

    def forward(self, x: torch.Tensor):
        ramp = torch.linspace(-2, 2, x.shape[-1])
        return x[:, :3] + ramp, x[:, :3].mean((-1, -2)) * 4 - 1


class _NoAux(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :3] * 2


def test_ensemble_handles_an_aux_head_and_averages_presence() -> None:
    cfg = load_config(DEMO, FAST_2D)
    x = torch.rand(2, 3, 8, 12)
    aux = _WithAux()
    ens = Ensemble([aux, _NoAux()], [cfg, cfg], CPU, ("hflip",))
    probs, presence = ens.predict_with_presence(x)
    mask_logits, presence_logits = aux(x)
    flipped = torch.sigmoid(aux(x.flip(-1))[0]).flip(-1)
    want = (torch.sigmoid(mask_logits) + flipped + 2 * torch.sigmoid(_NoAux()(x))) / 4
    assert torch.allclose(probs, want, atol=1e-6)
    assert torch.allclose(ens.predict(x), want, atol=1e-6)
    # Presence: mean of the aux model's views only (a flip does not change the mean).
    assert presence.shape == (2, 3)
    assert torch.allclose(presence, torch.sigmoid(presence_logits), atol=1e-6)
    assert Ensemble([_NoAux()], [cfg], CPU).predict_with_presence(x)[1] is None


def test_presence_reaches_the_post_processing() -> None:
    """The aux head's quantised presence drives the gate_cls step: a low presence vetoes a
    slice that the masks alone keep."""
    ids = ["case1_day0_slice_0001", "case1_day0_slice_0002"]
    probs = quantize(np.full((2, 3, 6, 6), 0.9, np.float32))
    params = [ClassPostprocess(gate_cls=0.5)] * 3
    presence = quantize(np.array([[0.9, 0.9, 0.9], [0.9, 0.1, 0.9]], np.float32))
    got = encode_volume(ids, probs, params, presence)
    assert got[(ids[1], "small_bowel")] == "" and got[(ids[0], "small_bowel")] != ""
    assert got[(ids[1], "stomach")] != ""
    with pytest.raises(ValueError, match="gate_cls"):
        encode_volume(ids, probs, params)


# --------------------------------------------------------------------------- 2.5D + 3D end to end


def _save_run(cfg, model: nn.Module, runs: Path, folds=(0, 1, 2)) -> Path:
    """runs/fold<N>/best.pt as engine writes it ({"model", "config", "meta"}), one seed each."""
    for fold in folds:
        torch.manual_seed(100 + fold)
        for p in model.parameters():
            nn.init.normal_(p, std=0.2)
        (runs / f"fold{fold}").mkdir(parents=True)
        ckpt = {"model": model.state_dict(), "config": config_to_dict(cfg), "meta": {"fold": fold}}
        torch.save(ckpt, runs / f"fold{fold}" / "best.pt")
    return runs


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """A 2.5D run (demo U-Net at 32x32) and a 3D run (MONAI UNet), 3 folds each."""
    pytest.importorskip(
        "gitract.models.monai3d", reason="3D members need gitract.models.monai3d (branch model3d)"
    )
    from gitract.models.monai3d import build_model3d
    from gitract.models.smp2d import build_model

    base = tmp_path_factory.mktemp("blend_runs")
    cfg2 = load_config(DEMO, FAST_2D)
    model2 = build_model(cfg2.model, in_channels=cfg2.data.in_channels)
    cfg3 = load_config(DEMO, TINY_3D)
    model3 = build_model3d(cfg3.model)
    return (
        _save_run(cfg2, model2, base / "runs" / "tiny2d"),
        _save_run(cfg3, model3, base / "runs" / "tiny3d"),
    )


def test_a_2d_3d_blend_is_the_weighted_mean_and_a_valid_submission(
    two_runs, synthetic_set, tmp_path
) -> None:
    run2, run3 = two_runs
    spec = blend_spec([run2, run3], [0.75, 0.25], tmp_path / "blend")
    members = [load_member(m, CPU) for m in spec.members]
    assert [type(m.predictor).__name__ for m in members] == ["Predictor2D", "Predictor3D"]
    assert len(members[0].predictor.ensemble.models) == 3
    assert len(members[1].predictor.models) == 3

    images = scan_images(synthetic_set.root / "test")
    table = images.sort_values(["case", "day", "slice"], kind="stable")
    cache = VolumeCache(table, None, with_masks=False, progress=False)
    singles = [list(m.days(table, cache, progress=False)) for m in members]
    blended = list(blend_days(members, table, cache, progress=False))
    assert [d.case_day for d in blended] == list(dict.fromkeys(table["case_day"]))
    for day, a, b in zip(blended, *singles, strict=True):
        height, width = table.loc[table["case_day"] == day.case_day, ["height", "width"]].iloc[0]
        assert a.probs.shape == b.probs.shape == (len(day.ids), 3, height, width)
        mean = 0.75 * quantize(a.probs).astype(np.float64) + 0.25 * quantize(b.probs)
        np.testing.assert_array_equal(day.probs, np.rint(mean))  # 0.75, 0.25: exact in float32
        assert np.abs(a.probs - b.probs).max() > 0.05  # the members do differ

    # The blend's tuned post-processing is read from its own folder.
    spec.dir.mkdir()
    (spec.dir / "postprocess.json").write_text(
        json.dumps(dict.fromkeys(CLASSES, {"threshold": 0.3}))
    )
    cfg = load_config(DEMO, FAST_2D)
    out = infer_test(cfg, synthetic_set.root, spec, out=tmp_path / "sub.csv", device=CPU,
                     progress=False)  # fmt: skip
    sub = pd.read_csv(out, dtype=str, keep_default_na=False)
    sample = pd.read_csv(synthetic_set.root / "sample_submission.csv", dtype=str)
    assert sub[["id", "class"]].equals(sample[["id", "class"]])
    shapes = images.set_index("id")
    by_day = {d.case_day: d for d in blended}
    painted = 0
    for row in sub.itertuples():
        hw = (int(shapes.at[row.id, "height"]), int(shapes.at[row.id, "width"]))
        mask = rle_decode(row.predicted, hw)
        assert rle_encode(mask) == row.predicted
        day = by_day[shapes.at[row.id, "case_day"]]
        z, c = day.ids.index(row.id), CLASSES.index(row[2])
        # Thresholded at the tuned 0.3 (no other step is on): exactly the blend's pixels.
        assert np.array_equal(mask.astype(bool), day.probs[z, c] > np.rint(0.3 * 255))
        painted += int(mask.any())
    assert painted > 0


def test_blend_oof_writes_what_the_tuner_reads(two_runs, synthetic_set, tmp_path) -> None:
    from gitract.postprocess.tuning import tune_postprocess

    run2, run3 = two_runs
    spec = blend_spec([run2, run3], [1, 1], tmp_path / "blend")
    cfg = load_config(DEMO, FAST_2D)
    out = infer_oof(cfg, synthetic_set.root, spec, synthetic_set.folds_csv, [0], device=CPU,
                    progress=False)  # fmt: skip
    assert out == spec.dir / "oof.csv"
    saved = sorted((spec.dir / OOF_PROBS_DIR).glob("*.npz"))
    assert saved and not (run2 / OOF_PROBS_DIR).exists() and not (run3 / OOF_PROBS_DIR).exists()
    with np.load(saved[0]) as npz:
        assert npz["probs"].dtype == np.uint8 and set(npz.files) == {"probs", "ids"}
    table = load_train_table(synthetic_set.root, exclude=())
    result = tune_postprocess(
        spec.dir / OOF_PROBS_DIR, table, "kaggle", {"threshold": (0.3, 0.5), "min_size": (0,)},
        sweeps=1, workers=1, progress=False,
    )  # fmt: skip
    assert result["score"] >= result["baseline_score"]
