"""No path of any script overwrites a trained model without being asked, and a checkpoint of
another model kind is named before any network is built."""

from __future__ import annotations

import runpy
import sys
import time
from pathlib import Path

import pytest
import torch

from gitract.config import config_to_dict, load_config
from gitract.data.folds import create_folds_file
from gitract.data.synthetic import generate
from gitract.errors import CheckpointError
from gitract.inference.blend import MemberSpec, load_member
from gitract.models.checkpoint import save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
FAST = ["data.img_size=[32, 32]", "data.num_workers=0", "train.batch_size=4", "train.epochs=1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("lost")
    generate(root / "data", root / "labels", n_cases=3, n_slices=8, seed=6, workers=1)
    create_folds_file(root / "data", root / "folds.csv", n_splits=2, seed=0)
    return root / "data", root / "folds.csv"


def _train(data, out: Path, monkeypatch, capsys, *flags: str) -> tuple[int, str]:
    data_dir, folds_csv = data
    argv = ["train.py", "--fold", "0", "--config", str(ROOT / "configs" / "demo_cpu.yaml"),
            "--data-dir", str(data_dir), "--folds-csv", str(folds_csv), "--out-dir", str(out),
            "--no-progress", *flags, "--set", *FAST]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exited:
        runpy.run_path(str(ROOT / "scripts" / "train.py"), run_name="__main__")
    return exited.value.code, capsys.readouterr().err


def test_a_trained_fold_is_never_replaced_unless_asked(data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "runs"
    fold = out / "demo_cpu" / "fold0"
    assert _train(data, out, monkeypatch, capsys)[0] == 0
    best, history = (fold / "best.pt").read_bytes(), (fold / "history.csv").read_bytes()

    # Again without a flag: refused, nothing touched.
    code, err = _train(data, out, monkeypatch, capsys)
    assert code == 2 and err.strip() == (
        f"error: {fold}: holds a trained model (best.pt, last.pt, history.csv); continue it "
        "with --resume, or replace it with --fresh"
    )
    # --resume without last.pt (deleted to save space): refused, best.pt kept.
    (fold / "last.pt").unlink()
    code, err = _train(data, out, monkeypatch, capsys, "--resume")
    assert code == 2 and err.strip() == (
        f"error: {fold / 'last.pt'}: not found, so --resume would train afresh and replace "
        "best.pt and history.csv; copy last.pt back, or train afresh with --fresh"
    )
    assert (fold / "best.pt").read_bytes() == best
    assert (fold / "history.csv").read_bytes() == history

    # --fresh is asking: a new run replaces the folder's files (the same bytes: training is
    # deterministic on the CPU).
    written = (fold / "best.pt").stat().st_mtime_ns
    assert _train(data, out, monkeypatch, capsys, "--fresh")[0] == 0
    assert (fold / "last.pt").exists() and (fold / "best.pt").stat().st_mtime_ns > written
    assert (fold / "best.pt").read_bytes() == best
    code, err = _train(data, out, monkeypatch, capsys, "--fresh", "--resume")
    assert code == 2 and "give one of them" in err


def _fake_run(folder: Path, kinds: list[str]) -> None:
    """Checkpoints with a config and metadata but no weights: enough for the kind check,
    which must come before any network is built."""
    for fold, kind in enumerate(kinds):
        name = "demo_cpu_3d" if kind == "3d" else "demo_cpu"
        cfg = load_config(ROOT / "configs" / f"{name}.yaml")
        ckpt = {"model": {}, "config": config_to_dict(cfg), "meta": {"kind": kind}}
        save_checkpoint(ckpt, folder / f"fold{fold}" / "best.pt")


def test_a_checkpoint_of_another_kind_is_named_before_any_network_is_built(
    tmp_path, monkeypatch
) -> None:
    _fake_run(tmp_path / "runs" / "mixed", ["2.5d", "3d"])
    from gitract.models.kind import ModelKind

    def no_build(*args, **kwargs):
        raise AssertionError("a network was built before the kinds were checked")

    monkeypatch.setattr(ModelKind, "load", no_build)
    started = time.perf_counter()
    with pytest.raises(CheckpointError) as caught:
        load_member(MemberSpec(tmp_path / "runs" / "mixed"), torch.device("cpu"))
    assert time.perf_counter() - started < 10
    assert str(caught.value) == (
        f"{tmp_path / 'runs' / 'mixed' / 'fold1' / 'best.pt'} is a 3d checkpoint; this run's "
        "fold0 is 2.5d; the run folder mixes kinds (3d, 2.5d)"
    )


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resumed_run_ends_with_the_uninterrupted_runs_weights(
    data, tmp_path, monkeypatch, workers
) -> None:
    """Killed after epoch 1 and resumed, a run ends bit-identical to one never interrupted
    (on the CPU; augmentations, shuffle, EMA, optimizer and random streams all restored)."""
    from gitract.training import engine

    data_dir, folds_csv = data
    overrides = [*FAST[:-1], "train.epochs=2", f"data.num_workers={workers}"]
    cfg = load_config(ROOT / "configs" / "demo_cpu.yaml", [*overrides, "train.ema_decay=0.9"])
    whole = engine.fit(cfg, 0, data_dir, folds_csv, tmp_path / "whole", progress=False)
    real_epoch = engine._epoch

    def killed_in_epoch_2(loop, state, run_data, epoch, out):
        if epoch == 2:
            raise KeyboardInterrupt
        return real_epoch(loop, state, run_data, epoch, out)

    monkeypatch.setattr(engine, "_epoch", killed_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        engine.fit(cfg, 0, data_dir, folds_csv, tmp_path / "killed", progress=False)
    monkeypatch.setattr(engine, "_epoch", real_epoch)
    resumed = engine.fit(
        cfg, 0, data_dir, folds_csv, tmp_path / "killed", resume=True, progress=False
    )
    a = torch.load(whole / "last.pt", weights_only=True)
    b = torch.load(resumed / "last.pt", weights_only=True)
    assert a["meta"]["epoch"] == b["meta"]["epoch"] == 2
    for part in ("model", "ema"):
        for key, value in a[part].items():
            assert torch.equal(value, b[part][key]), (part, key)


def test_per_item_seeds_keep_the_augmentations_independent() -> None:
    """Reseeded for every item, albumentations' transforms must still draw from one shared
    stream: with a generator each (its set_random_seed), every transform's first draw is the
    same number, so the items' "apply with p" decisions would be tied together (the 2.5D
    training test's held-out Dice fell below its bar that way)."""
    import numpy as np

    from gitract.data.slices import build_train_transform
    from gitract.training.sampling import SeededItems

    train_cfg = load_config(ROOT / "configs" / "demo_cpu.yaml").train
    image = np.linspace(0, 1, 32 * 32 * 3, dtype=np.float32).reshape(32, 32, 3)

    class Items:
        transform = build_train_transform(train_cfg)

        def __len__(self) -> int:
            return 1

        def __getitem__(self, index: int):
            return self.transform(image=image, mask=np.zeros((32, 32, 3), np.uint8))["image"]

    items = SeededItems(Items())
    first = items[(0, 7)]
    compose = Items.transform
    streams = {id(t.random_generator) for t in compose.transforms}
    assert streams == {id(compose.random_generator)}  # one stream for all its transforms
    assert np.array_equal(items[(0, 7)], first)  # an item is a function of its seed
    assert any(not np.array_equal(items[(0, seed)], first) for seed in range(8, 12))
