"""scripts/gpu_check.py on the CPU: the no-GPU answer, the same measuring code at tiny sizes
(train and TTA inference images/s, the JSON report, one torchrun epoch on 2 gloo processes),
an out-of-memory batch size reported as OOM, and the 16 GiB verdict."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gitract.config import load_config

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.py"
DEMO = ROOT / "configs" / "demo_cpu.yaml"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_without_a_gpu_it_says_so_and_exits_0(tmp_path: Path) -> None:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no GPU even on a machine with one
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--json", str(tmp_path / "out.json")],
        cwd=tmp_path, capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1 and "no CUDA GPU" in lines[0] and "nothing was measured" in lines[0]
    assert not list(tmp_path.iterdir())  # nothing measured, nothing written


def test_a_bad_img_size_is_the_configs_one_line_error(gpu_check, capsys) -> None:
    with pytest.raises(SystemExit) as exited:
        gpu_check.run_main(
            lambda: gpu_check.main(["--config", str(DEMO), "--img-size", "64", "50"])
        )
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "'data.img_size' must be [H, W], two positive multiples of 32" in err


def test_cpu_run_measures_every_batch_size_and_torchrun(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    cmd = [
        sys.executable, str(SCRIPT), "--device", "cpu", "--config", str(DEMO),
        "--img-size", "64", "64", "--batch-sizes", "2", "4", "--steps", "2",
        "--cases", "3", "--slices", "8", "--ddp", "--nproc", "2", "--json", str(out),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["img_size"] == [64, 64]
    assert report["amp"] is False and report["channels_last"] is False  # CUDA only
    assert report["tta_flips"] == ["hflip"]
    for part in ("train", "inference"):
        rows = report[part]
        assert [r["batch_size"] for r in rows] == [2, 4]
        for r in rows:
            assert r["oom"] is False and r["images_per_s"] > 0
            assert r["peak_gib"] is None  # no GPU memory to count on the CPU
    assert report["fit_16gib"]["fits"] is None  # another size: not measured
    ddp = report["ddp"]
    assert ddp["nproc"] == 2 and ddp["returncode"] == 0 and ddp["ok"] is True
    assert "--nproc_per_node=2" in ddp["command"] and "model.encoder_weights=null" in ddp["command"]
    # The table holds the same numbers, and nothing but the JSON is left behind.
    table = done.stdout
    assert f"{report['train'][1]['images_per_s']:.1f}" in table
    assert f"{report['inference'][0]['images_per_s']:.1f}" in table
    assert "torchrun on 2 processes" in table and "ok (exit code 0" in table
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_out_of_memory_is_reported_for_its_size_only(gpu_check) -> None:
    cfg = load_config(DEMO, ["data.img_size=[32,32]"])
    dataset = [
        {"image": torch.rand(3, 32, 32), "mask": (torch.rand(3, 32, 32) > 0.5).float()}
        for _ in range(5)
    ]
    device = torch.device("cpu")
    seen = []

    def measure(cfg, batches, steps, device):
        seen.append(batches[0][0].shape[0])
        if seen[-1] == 4:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return gpu_check.measure_inference(cfg, batches, steps, device)

    rows = gpu_check.measure_sizes(measure, cfg, dataset, [2, 4, 8], 1, device)
    assert seen == [2, 4, 8]  # batches of the asked size, larger than the data set too
    assert [r["oom"] for r in rows] == [False, True, False]
    assert rows[1]["images_per_s"] is None
    assert rows[0]["images_per_s"] > 0 and rows[2]["images_per_s"] > 0

    report = {
        "device_name": "test", "torch": torch.__version__, "config": "c", "model": "m",
        "img_size": [32, 32], "amp": False, "channels_last": False, "steps": 1,
        "tta_flips": [], "train": rows, "inference": [], "ddp": None,
        "fit_16gib": gpu_check.fit_check(rows, [32, 32]),
    }  # fmt: skip
    line = next(s for s in gpu_check.format_report(report).splitlines() if s.split()[0] == "4")
    assert "OOM" in line


@pytest.mark.parametrize(
    ("row", "img_size", "fits"),
    [
        ({"batch_size": 16, "oom": False, "peak_gib": 9.5}, [320, 384], True),
        ({"batch_size": 16, "oom": False, "peak_gib": 17.25}, [320, 384], False),
        ({"batch_size": 16, "oom": True, "peak_gib": 15.9}, [320, 384], False),
        ({"batch_size": 16, "oom": False, "peak_gib": 9.5}, [256, 256], None),
        ({"batch_size": 8, "oom": False, "peak_gib": 4.0}, [320, 384], None),
    ],
)
def test_batch_16_fit_verdict_names_both_numbers(gpu_check, row, img_size, fits) -> None:
    fit = gpu_check.fit_check([row], img_size)
    assert fit["fits"] is fits and fit["limit_gib"] == 16.0
    report = {
        "device_name": "test", "torch": "x", "config": "c", "model": "m", "img_size": img_size,
        "amp": True, "channels_last": True, "steps": 1, "tta_flips": ["hflip"],
        "train": [{**row, "images_per_s": None if row["oom"] else 10.0}], "inference": [],
        "ddp": None, "fit_16gib": fit,
    }  # fmt: skip
    text = gpu_check.format_report(report)
    verdict = next(s for s in text.splitlines() if s.startswith("batch 16 at 320x384"))
    if fits is None:
        assert "not measured" in verdict
    else:
        assert ("does NOT fit" in verdict) is (not fits)
        assert f"{row['peak_gib']:.2f} GiB vs 16 GiB" in verdict
