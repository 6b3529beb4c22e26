"""Training on synthetic data (CPU): it learns, it resumes after a kill, it scales out, and
its outputs follow the train.py contract."""

from __future__ import annotations

import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import needs_torchrun, run_torchrun

from gitract.config import load_config
from gitract.data.folds import load_folds
from gitract.data.layout import CLASSES, load_train_table
from gitract.errors import TrainingError
from gitract.training.engine import fit, lr_at

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo_cpu.yaml"
# Small and quick: 64x64 canvas, no workers (tests run side by side on 2 cores).
FAST = ["data.img_size=[64, 64]", "data.num_workers=0", "train.batch_size=8"]


def _train_cmd(synthetic_set, out_dir: Path, *overrides: str, fold: int = 0) -> list[str]:
    return [
        "scripts/train.py", "--fold", str(fold), "--config", str(DEMO),
        "--data-dir", str(synthetic_set.root), "--folds-csv", str(synthetic_set.folds_csv),
        "--out-dir", str(out_dir), "--no-progress", "--set", *FAST, *overrides,
    ]  # fmt: skip


def _empty_prediction_dice(synthetic_set, fold: int) -> float:
    """Per-image Dice of predicting nothing: the share of (slice, class) pairs that are empty."""
    table = load_folds(synthetic_set.folds_csv, load_train_table(synthetic_set.root))
    val = table[table["fold"] == fold]
    return float((val[list(CLASSES)] == "").to_numpy().mean())


@pytest.fixture(scope="module")
def trained_run(synthetic_set, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    cfg = load_config(DEMO, [*FAST, "train.epochs=10", "train.lr=3e-3"])
    return fit(cfg, 0, synthetic_set.root, synthetic_set.folds_csv, out, progress=False)


def test_training_learns_held_out_cases(trained_run: Path, synthetic_set) -> None:
    history = pd.read_csv(trained_run / "history.csv")
    assert history["epoch"].tolist() == list(range(1, 11))
    assert history["train_loss"].iloc[-1] < 0.6 * history["train_loss"].iloc[0]
    assert history["val_loss"].iloc[-1] < history["val_loss"].iloc[0]
    baseline = _empty_prediction_dice(synthetic_set, fold=0)
    best = history["val_dice"].max()
    assert best > history["val_dice"].iloc[0]
    assert best >= baseline + 0.15, (best, baseline)
    for name in CLASSES:
        assert history[f"val_dice_{name}"].max() > 0.5


def test_run_folder_follows_the_contract(trained_run: Path) -> None:
    assert trained_run.parts[-2:] == ("demo_cpu", "fold0")
    for name in ("best.pt", "last.pt", "history.csv", "config.yaml", "curves.png"):
        assert (trained_run / name).is_file(), name
    assert not [p for p in trained_run.iterdir() if p.name.startswith(".")]  # no temp files left
    history = pd.read_csv(trained_run / "history.csv")
    columns = ("epoch", "train_loss", "val_loss", "val_dice", "val_iou", "lr", "seconds")
    for column in (*columns, "val_score", "val_hausdorff", "skipped"):
        assert column in history
    best = torch.load(trained_run / "best.pt", map_location="cpu", weights_only=True)
    assert best["config"]["model"]["encoder_name"] == load_config(DEMO).model.encoder_name
    # best.pt follows the competition score (train.select_by: score), not the Dice.
    assert best["meta"]["select_by"] == "score"
    assert best["meta"]["val_score"] == pytest.approx(history["val_score"].max())
    assert history["val_hausdorff"].min() >= 0 and history["val_hausdorff"].max() <= 1
    last = torch.load(trained_run / "last.pt", map_location="cpu", weights_only=True)
    assert last["epoch"] == 10 and {"optimizer", "scaler", "scheduler", "rng"} <= set(last)
    assert load_config(trained_run / "config.yaml").train.epochs == 10


def test_learning_rate_warms_up_then_decays_to_min() -> None:
    lrs = [lr_at(s, 100, 10, 1e-3, 1e-5) for s in range(101)]
    assert lrs[0] == pytest.approx(1e-5)
    assert lrs[10] == pytest.approx(1e-3)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11], strict=True))
    assert all(a >= b for a, b in zip(lrs[10:-1], lrs[11:], strict=True))
    assert lrs[100] == pytest.approx(1e-5)


def test_killed_run_resumes_to_the_planned_epochs(synthetic_set, tmp_path: Path) -> None:
    cmd = [sys.executable, *_train_cmd(synthetic_set, tmp_path, "train.epochs=3")]
    run_dir = tmp_path / "demo_cpu" / "fold0"
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while not (run_dir / "last.pt").exists():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "no checkpoint within 240 s"
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)  # mid-epoch 2: no chance to clean up
    finally:
        proc.kill()
        proc.wait()
    killed_after = torch.load(run_dir / "last.pt", weights_only=True)["epoch"]
    assert killed_after < 3

    done = subprocess.run([*cmd, "--resume"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert f"resuming {run_dir} after epoch {killed_after}" in done.stdout
    history = pd.read_csv(run_dir / "history.csv")
    assert history["epoch"].tolist() == [1, 2, 3]
    last = torch.load(run_dir / "last.pt", weights_only=True)
    assert last["epoch"] == 3
    best = torch.load(run_dir / "best.pt", weights_only=True)
    assert best["meta"]["val_score"] == pytest.approx(history["val_score"].max())


def test_resume_refuses_a_changed_recipe(synthetic_set, tmp_path: Path) -> None:
    cmd = [sys.executable, *_train_cmd(synthetic_set, tmp_path, "train.epochs=1")]
    assert subprocess.run(cmd, cwd=ROOT, capture_output=True).returncode == 0
    last = tmp_path / "demo_cpu" / "fold0" / "last.pt"
    before = last.read_bytes()
    changed = [*cmd, "train.epochs=3", "data.num_workers=1", "--resume"]
    done = subprocess.run(changed, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2
    # One line naming the recipe key; a changed worker count is not a recipe change.
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "cannot resume with a changed recipe (train.epochs 1 -> 3)" in done.stderr
    assert last.read_bytes() == before


def test_resume_on_amp_after_a_run_without_a_scaler(synthetic_set, tmp_path: Path) -> None:
    """A CPU (or amp: false) run's last.pt has an empty scaler state; an fp16 run resuming it
    starts a fresh scaler instead of dying in GradScaler.load_state_dict."""
    from gitract.models.smp2d import build_model
    from gitract.training.state import TrainState

    cfg = load_config(DEMO, FAST)
    model = build_model(cfg.model, in_channels=3)
    saved = TrainState(
        model, torch.optim.AdamW(model.parameters()), torch.amp.GradScaler("cpu", enabled=False)
    )
    saved.epoch, saved.step = 2, 17
    ckpt = saved.checkpoint({}, {}, [])
    state = TrainState(model, torch.optim.AdamW(model.parameters()), torch.amp.GradScaler("cpu"))
    state.restore(ckpt, rank=0, world_size=1, seed=0)
    assert (state.epoch, state.step) == (2, 17)
    assert any("fresh" in note for note in state.notes)


@needs_torchrun
def test_torchrun_two_processes_write_one_set_of_outputs(synthetic_set, tmp_path: Path) -> None:
    done = run_torchrun(*_train_cmd(synthetic_set, tmp_path, "train.epochs=1"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("training demo_cpu fold 0 on cpu x2") == 1
    run_dir = tmp_path / "demo_cpu" / "fold0"
    names = sorted(p.name for p in run_dir.iterdir() if p.name != "tb")  # tb: TensorBoard's
    assert names == ["best.pt", "config.yaml", "curves.png", "history.csv", "last.pt"]
    history = pd.read_csv(run_dir / "history.csv")
    assert len(history) == 1 and not math.isnan(history["val_dice"].iloc[0])


def test_non_finite_steps_are_skipped_then_stop_the_run(
    synthetic_set, tmp_path: Path, monkeypatch
) -> None:
    """Every step NaN: the first ones are skipped (weights untouched), and the run stops with
    one clear error once train.max_bad_steps of them come in a row."""
    import gitract.training.engine as engine

    class NaNLoss(torch.nn.Module):
        def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            return logits.mean() * float("nan")

    monkeypatch.setattr(engine, "build_loss", lambda _: NaNLoss())
    cfg = load_config(DEMO, [*FAST, "train.epochs=1", "train.max_bad_steps=2"])
    with pytest.raises(
        TrainingError, match=r"consecutive non-finite training steps in epoch 1 .*max_bad_steps=2"
    ):
        fit(cfg, 0, synthetic_set.root, synthetic_set.folds_csv, tmp_path, progress=False)


def test_a_non_finite_step_is_skipped_and_training_goes_on(
    synthetic_set, tmp_path: Path, monkeypatch, capsys
) -> None:
    import gitract.training.engine as engine

    real = engine.build_loss

    def nan_on_second_call(train_cfg):
        loss_fn, calls = real(train_cfg), []

        def forward(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            calls.append(1)
            value = loss_fn(logits, targets)
            return value * float("nan") if len(calls) == 2 else value

        return forward

    monkeypatch.setattr(engine, "build_loss", nan_on_second_call)
    cfg = load_config(DEMO, [*FAST, "train.epochs=1"])
    run_dir = fit(cfg, 0, synthetic_set.root, synthetic_set.folds_csv, tmp_path, progress=False)
    history = pd.read_csv(run_dir / "history.csv")
    assert history["skipped"].tolist() == [1]
    assert math.isfinite(history["train_loss"].iloc[0])
    last = torch.load(run_dir / "last.pt", weights_only=True)
    assert last["skipped_steps"] == 1
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())
    assert "skipped 1 non-finite step(s) by global step" in capsys.readouterr().out


PROBE = ROOT / "tests" / "probes" / "train_probe.py"


def _torchrun(synthetic_set, out_dir: Path, *overrides: str, env: dict | None = None, resume=False):
    """scripts/train.py through the test probe, on 2 processes."""
    args = _train_cmd(synthetic_set, out_dir, *overrides)[1:]
    return run_torchrun(PROBE, *args, *(["--resume"] if resume else []), env=env)


@needs_torchrun
def test_torchrun_skips_a_nan_on_one_rank_on_every_rank(synthetic_set, tmp_path: Path) -> None:
    """Rank 0 alone sees a NaN loss at its 2nd step: both ranks skip that step (the flag is
    all-reduced), nobody hangs in a collective, and the run finishes (3+ steps) and says so."""
    # smp's EfficientNet: the encoder family of the default recipe, whose unused head once
    # broke DDP at its second step.
    overrides = ("train.epochs=1", "train.batch_size=4", "model.encoder_name=efficientnet-b0")
    done = _torchrun(synthetic_set, tmp_path, *overrides, env={"GITRACT_PROBE_NAN_AT": "2"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "skipped 1 non-finite step(s)" in done.stdout + done.stderr
    run_dir = tmp_path / "demo_cpu" / "fold0"
    last = torch.load(run_dir / "last.pt", weights_only=True)
    assert last["skipped_steps"] == 1 and last["scheduler"]["step"] >= 3
    assert len(last["rng"]) == 2  # each rank's own random streams


@needs_torchrun
def test_resumed_ranks_draw_different_augmentations(synthetic_set, tmp_path: Path) -> None:
    """Every rank is fed the same slices (the probe's sampler); each item's augmentations are
    drawn from a seed of (train.seed, rank, epoch, position): after a resume the first batches
    of the ranks still differ (not rank 0's streams everywhere)."""
    overrides = ("train.batch_size=4", "data.num_workers=1", "train.aug_hflip=0.5",
                 "train.aug_brightness=1.0")  # fmt: skip
    first = _torchrun(synthetic_set, tmp_path, "train.epochs=2", *overrides)
    assert first.returncode == 0, first.stderr[-3000:]
    # As if killed after epoch 1: the resume then trains epoch 2 again.
    last_path = tmp_path / "demo_cpu" / "fold0" / "last.pt"
    last = torch.load(last_path, weights_only=True)
    last["epoch"], last["scheduler"]["step"] = 1, last["scheduler"]["step"] // 2
    torch.save(last, last_path)
    probe = tmp_path / "probe"
    probe.mkdir()
    done = _torchrun(synthetic_set, tmp_path, "train.epochs=2", *overrides, resume=True,
                     env={"GITRACT_PROBE_SAME_SAMPLES": str(probe)})  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming" in done.stdout
    sums = [(probe / f"rank{r}.txt").read_text() for r in (0, 1)]
    assert sums[0] != sums[1]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.epoch=3", "unknown key 'train.epoch' (did you mean 'train.epochs'?)"),
        ("train.epochs=three", "'train.epochs' must be int"),
    ],
)
def test_config_errors_are_one_line(synthetic_set, tmp_path: Path, override, message) -> None:
    cmd = [sys.executable, *_train_cmd(synthetic_set, tmp_path, override)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2
    assert message in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "demo_cpu").exists()


def test_each_process_builds_its_share_of_the_cache_before_the_process_group(
    synthetic_set, tmp_path: Path, monkeypatch
) -> None:
    """No rank may sit in a collective while the (real-data: ~8 GB) cache is written, or NCCL's
    watchdog kills it: every process builds its share, then opens the whole cache, all before
    the process group exists."""
    import gitract.training.engine as engine

    built: list[list[str]] = []

    class Recording(engine.VolumeCache):
        def __init__(self, table, *args, **kwargs) -> None:
            built.append(sorted(table["case_day"].unique()))
            super().__init__(table, *args, **kwargs)

    class Joined(Exception):
        pass

    def init_distributed():
        raise Joined(built)

    monkeypatch.setattr(engine, "VolumeCache", Recording)
    monkeypatch.setattr(engine, "init_distributed", init_distributed)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    cfg = load_config(DEMO, [*FAST, f"data.cache_dir={tmp_path / 'cache'}"])
    with pytest.raises(Joined):
        fit(cfg, 0, synthetic_set.root, synthetic_set.folds_csv, tmp_path, progress=False)
    days = sorted(load_train_table(synthetic_set.root)["case_day"].unique())
    assert built == [days[1::2], days]


def test_accumulated_steps_and_tensorboard_log(synthetic_set, tmp_path: Path) -> None:
    """train.accumulate=2 takes one optimizer step per two batches (the schedule counts steps),
    and the per-epoch metrics and learning rate reach TensorBoard when it is installed."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = load_config(DEMO, [*FAST, "train.epochs=1", "train.accumulate=2"])
    run_dir = fit(cfg, 0, synthetic_set.root, synthetic_set.folds_csv, tmp_path, progress=False)
    table = load_folds(synthetic_set.folds_csv, load_train_table(synthetic_set.root))
    batches = int((table["fold"] != 0).sum()) // cfg.train.batch_size  # drop_last
    last = torch.load(run_dir / "last.pt", weights_only=True)
    assert last["scheduler"]["step"] == math.ceil(batches / 2)
    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train_loss", "lr", "val_loss", "val_dice", "val_score"} <= tags
    history = pd.read_csv(run_dir / "history.csv")
    logged = events.Scalars("val_score")[0]
    assert (logged.step, logged.value) == (1, pytest.approx(history["val_score"].iloc[0], 1e-5))


@needs_torchrun
def test_ema_weights_are_validated_saved_and_resumed_under_torchrun(
    synthetic_set, tmp_path: Path
) -> None:
    """With train.ema_decay, best.pt holds the EMA weights (the ones validated), last.pt both,
    and a two-process run killed after epoch 1 resumes with its average intact."""
    overrides = ("train.batch_size=4", "train.ema_decay=0.9")
    first = _torchrun(synthetic_set, tmp_path, "train.epochs=2", *overrides)
    assert first.returncode == 0, first.stderr[-3000:]
    run_dir = tmp_path / "demo_cpu" / "fold0"
    last = torch.load(run_dir / "last.pt", weights_only=True)
    assert set(last["ema"]) == set(last["model"])
    differs = [k for k, v in last["model"].items() if not torch.equal(v, last["ema"][k])]
    assert differs  # an average, not a copy
    # As if killed after epoch 1 (its best score included).
    last["epoch"], last["scheduler"]["step"] = 1, last["scheduler"]["step"] // 2
    last["best"] = float(pd.read_csv(run_dir / "history.csv")["val_score"].iloc[0])
    torch.save(last, run_dir / "last.pt")
    done = _torchrun(synthetic_set, tmp_path, "train.epochs=2", *overrides, resume=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming" in done.stdout
    resumed = torch.load(run_dir / "last.pt", weights_only=True)
    history = pd.read_csv(run_dir / "history.csv")
    assert history["epoch"].tolist() == [1, 2]
    best = torch.load(run_dir / "best.pt", weights_only=True)
    if history["val_score"].idxmax() == 1:  # epoch 2 was the best: best.pt is its EMA
        assert all(torch.equal(v, resumed["ema"][k]) for k, v in best["model"].items())
    assert not all(torch.equal(v, resumed["model"][k]) for k, v in best["model"].items())


def test_positive_slices_only_when_asked(synthetic_set) -> None:
    import gitract.training.engine as engine
    from gitract.data.cache import VolumeCache
    from gitract.training.distributed import DistContext

    table = load_folds(synthetic_set.folds_csv, load_train_table(synthetic_set.root))
    train_df, val_df = table[table["fold"] != 0], table[table["fold"] == 0]
    cache = VolumeCache(table, synthetic_set.root.parent / "cache_pos", progress=False)
    ctx = DistContext(0, 1, 0, torch.device("cpu"))
    positive = (train_df[list(CLASSES)] != "").any(axis=1)
    assert 0 < positive.sum() < len(train_df)
    for which, expected in (("all", len(train_df)), ("positive", int(positive.sum()))):
        cfg = load_config(DEMO, [*FAST, f"data.train_slices={which}"])
        data = engine._data(cfg, train_df, val_df, cache, ctx)
        assert len(data.train_loader.dataset) == expected == data.n_train
        assert len(data.val_loader.dataset) == len(val_df)  # validation keeps every slice


def test_aux_head_learns_which_slices_hold_an_organ(synthetic_set, tmp_path: Path) -> None:
    """model.aux_head: the per-slice "organ present" head trains beside the masks (BCE on slice
    presence) and beats always answering the majority on held-out cases."""
    from gitract.models.checkpoint import load_checkpoint
    from gitract.models.kind2d import KIND_2D

    cfg = load_config(
        DEMO, [*FAST, "train.epochs=4", "model.aux_head=true", "train.aux_weight=0.5"]
    )
    run_dir = fit(cfg, 0, synthetic_set.root, synthetic_set.folds_csv, tmp_path, progress=False)
    history = pd.read_csv(run_dir / "history.csv")
    table = load_folds(synthetic_set.folds_csv, load_train_table(synthetic_set.root))
    present = (table.loc[table["fold"] == 0, list(CLASSES)] != "").to_numpy()
    majority = max(present.mean(), 1 - present.mean())
    assert history["val_presence_acc"].max() > majority
    model, _ = KIND_2D.load(load_checkpoint(run_dir / "best.pt"))
    masks, presence = model(torch.rand(2, 3, 64, 64))
    assert masks.shape == (2, 3, 64, 64) and presence.shape == (2, 3)


def test_each_rank_gets_its_own_random_streams_back() -> None:
    from gitract.training.state import capture_rng, restore_rng

    states = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        states.append(capture_rng())
    for rank in (0, 1):
        assert restore_rng(states, rank, world_size=2, reseed=0) is None
        torch.manual_seed(rank + 1)
        want = torch.rand(3)
        restore_rng(states, rank, world_size=2, reseed=0)
        assert torch.equal(torch.rand(3), want)
    # Saved by 2 ranks, resumed on 3: no rank may share another's stream.
    draws = []
    for rank in range(3):
        assert "seeded afresh" in restore_rng(states, rank, world_size=3, reseed=7)
        draws.append(torch.rand(3))
    assert len({tuple(d.tolist()) for d in draws}) == 3
