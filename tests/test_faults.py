"""Faults: a kill in the middle of a checkpoint write, and checkpoints that carry code.

A killed and resumed training run reaching its planned epochs is already covered by
``tests/test_train.py::test_killed_run_resumes_to_the_planned_epochs``.
"""

from __future__ import annotations

import ast
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gitract.config import config_to_dict, load_config
from gitract.models.checkpoint import find_checkpoints

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo_cpu.yaml"

# Writes checkpoint after checkpoint onto one path, saying "writing <i>" before each. 32 MB of
# weights take long enough to write (and fsync) that a kill lands mid-write most of the time.
WRITER = """
import sys, torch
from gitract.models.checkpoint import save_checkpoint
path, start = sys.argv[1], int(sys.argv[2])
weights = torch.randn(8 * 2**20)
for i in range(start, start + 10**6):
    print(f"writing {i}", flush=True)
    save_checkpoint({"model": {"w": weights}, "meta": {"step": i}}, path)
"""


def test_kill_during_checkpoint_write_keeps_the_previous_one(tmp_path: Path) -> None:
    run_dir = tmp_path / "runs" / "demo_cpu" / "fold0"
    run_dir.mkdir(parents=True)
    path = run_dir / "best.pt"
    rng = random.Random(0)
    step = 0
    for _kill in range(3):
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path), str(step)],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            # Wait for the second write to start (the first may be the very first checkpoint),
            # then kill at a random moment of it.
            for _ in range(2 if path.exists() else 3):
                line = proc.stdout.readline()
                assert line.startswith("writing"), line
            time.sleep(rng.uniform(0.0, 0.15))
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL

        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        assert ckpt["model"]["w"].shape == (8 * 2**20,)
        assert ckpt["meta"]["step"] >= step  # a complete checkpoint, the last one finished
        step = ckpt["meta"]["step"] + 1
        # A temp file the kill left behind is never taken for a checkpoint.
        assert find_checkpoints(tmp_path / "runs" / "demo_cpu") == [path]
        assert find_checkpoints(tmp_path / "runs" / "demo_cpu", [0]) == [path]
        strays = [p.name for p in run_dir.iterdir() if p != path]
        assert all(name.startswith(".best.pt.") and name.endswith(".tmp") for name in strays)

    # The next complete save sweeps away what the killed writers left (one planted for sure).
    from gitract.models.checkpoint import save_checkpoint

    (run_dir / ".best.pt.99999.tmp").write_bytes(b"half a checkpoint")
    save_checkpoint({"meta": {"step": step}}, path)
    assert [p.name for p in run_dir.iterdir()] == ["best.pt"]


def _torch_load_calls(path: Path) -> list[tuple[int, bool]]:
    """(line, has weights_only=True) for every ``torch.load(...)`` call in a source file."""
    calls = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if not (isinstance(func, ast.Attribute) and func.attr == "load"):
            continue
        if not (isinstance(func.value, ast.Name) and func.value.id == "torch"):
            continue
        safe = any(
            k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
            for k in node.keywords
        )
        calls.append((node.lineno, safe))
    return calls


def test_every_torch_load_uses_weights_only() -> None:
    sources = sorted([*(ROOT / "gitract").rglob("*.py"), *(ROOT / "scripts").rglob("*.py")])
    found, unsafe = 0, []
    for source in sources:
        for line, safe in _torch_load_calls(source):
            found += 1
            if not safe:
                unsafe.append(f"{source.relative_to(ROOT)}:{line}")
        # ``from torch import load`` would hide a call from the check above.
        assert "from torch import load" not in source.read_text(), source
    assert found >= 1  # the checkpoint loader itself: the check is not vacuous
    assert not unsafe, f"torch.load without weights_only=True at {', '.join(unsafe)}"


class _RunsCode:
    """Unpickling this calls os.system: what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_infer_refuses_a_checkpoint_that_carries_code(tiny_kaggle, tmp_path: Path) -> None:
    runs = tmp_path / "runs" / "demo_cpu"
    bad = runs / "fold0" / "best.pt"
    bad.parent.mkdir(parents=True)
    marker = tmp_path / "pwned"
    config = config_to_dict(load_config(DEMO))
    torch.save({"model": {}, "config": config, "hook": _RunsCode(marker)}, bad)
    out = tmp_path / "submission.csv"
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "infer.py"), "--config", str(DEMO),
         "--data-dir", str(tiny_kaggle.root), "--runs", str(runs), "--out", str(out),
         "--no-progress"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert str(bad) in lines[0] and "refused" in lines[0] and "system" in lines[0], lines[0]
    assert not marker.exists()  # the pickled call never ran
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("payload", ["callable", "code"])
def test_load_checkpoint_refuses_pickled_objects_in_process(tmp_path: Path, payload) -> None:
    from gitract.errors import CheckpointError
    from gitract.models.checkpoint import load_checkpoint

    marker = tmp_path / "pwned"
    hook = os.system if payload == "callable" else _RunsCode(marker)
    path = tmp_path / "best.pt"
    torch.save({"model": {}, "hook": hook}, path)
    with pytest.raises(CheckpointError, match=r"refused: it holds pickled objects") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    assert not marker.exists()
