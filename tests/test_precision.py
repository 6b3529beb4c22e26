"""The one precision policy: its decisions per device and config, fp16 and bf16 training steps
through the engine on the CPU (the code a GPU runs), and the checkpoint's record of what ran."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gitract.config import load_config
from gitract.data.folds import create_folds_file
from gitract.data.synthetic import generate
from gitract.errors import ConfigError
from gitract.models.precision import Precision
from gitract.training.distributed import DistContext
from gitract.training.engine import build_loop, fit, train_one_epoch

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo_cpu.yaml"
CPU = torch.device("cpu")
SMALL = ["data.img_size=[32, 32]", "data.num_workers=0", "train.batch_size=2"]


def _train(*overrides: str):
    return load_config(DEMO, [*SMALL, *overrides]).train


@pytest.mark.parametrize(
    ("overrides", "dims", "dtype", "scaler", "channels_last", "record"),
    [
        (["train.amp=false"], 2, None, False, False, {"dtype": "fp32", "channels_last": False}),
        (["train.amp=true", "train.channels_last=true"], 2, torch.float16, True, True,
         {"dtype": "fp16", "channels_last": True}),
        (["train.amp=true", "train.amp_dtype=bf16"], 2, torch.bfloat16, False, False,
         {"dtype": "bf16", "channels_last": False}),
        (["train.amp=true", "train.channels_last=true"], 3, torch.float16, True, False,
         {"dtype": "fp16", "channels_last": False}),  # channels-last is a 2D layout
    ],
)  # fmt: skip
def test_the_cpu_runs_what_the_config_asks(overrides, dims, dtype, scaler, channels_last, record):
    policy = Precision.build(_train(*overrides), CPU, dims)
    assert policy.dtype is dtype and policy.channels_last is channels_last
    assert policy.scaler().is_enabled() is scaler and policy.note is None
    assert policy.record() == record
    with policy.autocast():
        out = torch.nn.Linear(4, 4)(torch.rand(2, 4))
    assert out.dtype == (dtype or torch.float32)


def test_bf16_on_a_gpu_without_it(monkeypatch) -> None:
    """Training refuses in one line; inference runs the bf16 run in fp16 and says so."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla T4")
    cuda = torch.device("cuda")
    bf16 = _train("train.amp=true", "train.amp_dtype=bf16")
    with pytest.raises(ConfigError, match=r"^train.amp_dtype: bf16 needs a GPU with bf16 sup"):
        Precision.build(bf16, cuda)
    policy = Precision.build(bf16, cuda, training=False)
    assert policy.dtype is torch.float16 and "Tesla T4 has no bf16" in policy.note
    assert "\n" not in policy.note


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_a_mixed_precision_step_through_the_engine(dtype: str) -> None:
    """The engine's own steps on the CPU with autocast, the scaler (fp16), channels-last, an
    aux head, EMA and accumulation: the weights move. fp16's scaler starts at 2 ** 16, so its
    first steps overflow and are skipped while it backs off, as on a GPU."""
    torch.manual_seed(0)
    cfg = load_config(DEMO, [
        *SMALL, "train.amp=true", f"train.amp_dtype={dtype}", "train.channels_last=true",
        "model.aux_head=true", "train.ema_decay=0.9", "train.accumulate=2",
    ])  # fmt: skip
    loop, state = build_loop(cfg, DistContext(0, 1, 0, CPU), 10, progress=False)
    assert loop.precision.dtype is {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    assert state.scaler.is_enabled() is (dtype == "fp16")
    before = [p.detach().clone() for p in state.model.parameters()]
    batches = [
        {"image": torch.rand(2, 3, 32, 32), "mask": (torch.rand(2, 3, 32, 32) > 0.7).float()}
        for _ in range(20)
    ]
    row = train_one_epoch(loop, state, batches, epoch=1)
    assert state.step == 10 and row["skipped"] < 10
    if dtype == "fp16":
        assert state.scaler.get_scale() == 2.0 ** (16 - row["skipped"])
    else:
        assert row["skipped"] == 0
    assert torch.isfinite(torch.tensor(row["train_loss"]))
    assert any(not torch.equal(a, p) for a, p in zip(before, state.model.parameters(), strict=True))


def test_the_checkpoint_records_what_ran(tmp_path: Path) -> None:
    generate(tmp_path / "data", tmp_path / "labels", n_cases=3, n_slices=8, seed=3, workers=1)
    create_folds_file(tmp_path / "data", tmp_path / "folds.csv", n_splits=2, seed=0)
    cfg = load_config(DEMO, [*SMALL, "train.epochs=1", "train.amp=true", "train.amp_dtype=bf16"])
    run = fit(cfg, 0, tmp_path / "data", tmp_path / "folds.csv", tmp_path / "runs", progress=False)
    for name in ("best.pt", "last.pt"):
        meta = torch.load(run / name, weights_only=True)["meta"]
        assert meta["precision"] == {"dtype": "bf16", "channels_last": False}
