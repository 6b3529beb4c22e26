"""scripts/gpu_check.py on the CPU: the no-GPU answer, every stage at tiny sizes through the
command line (one JSON object on stdout's last line and in --json), the time boxes (a stage
that no longer fits is skipped with why, one that raises is failed and the others run, one that
runs past its box is stopped with what it measured), an out-of-memory batch size reported as
OOM, the 16 GiB verdict, and how the DDP stage picks its ranks and backend."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gitract.config import load_config
from gitract.training import distributed

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.py"
DEMO = ROOT / "configs" / "demo_cpu.yaml"
DEMO_3D = ROOT / "configs" / "demo_cpu_3d.yaml"
# Every stage's sizes shrunk to what 2 busy CPU cores do in seconds.
TINY = [
    "--device", "cpu", "--config", str(DEMO), "--config-3d", str(DEMO_3D),
    "--img-size", "32", "32", "--set", "train.batch_size=4", "--set", "data.num_workers=0",
    "--set-3d", "data.num_workers=1", "--set-3d", "train.batch_size=2",
    "--set-3d", "data.patch_size=[16, 32, 32]",
    "--set-3d", "data.grid_hw=[32, 32]", "--batch-sizes", "2", "4", "--batch-sizes-3d", "1", "2",
    "--steps", "2", "--volume", "20", "40", "40", "--compile-backend", "eager",
    "--cases", "3", "--slices", "8", "--budget", "600",
]  # fmt: skip


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # its dataclasses look their module up by name
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("gpu_check", None)


def _run(tmp_path: Path, *stages: str) -> tuple[dict, dict]:
    """The script on the CPU at tiny sizes with ``stages``; (stdout's JSON, --json's JSON)."""
    out = tmp_path / "report.json"
    cmd = [sys.executable, str(SCRIPT), *TINY, "--json", str(out), "--stages", *stages]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]  # nothing else left
    assert list(report["stages"]) == list(stages)
    for name in stages:
        assert f"gpu_check {name}: ok" in done.stderr
    return report, json.loads(out.read_text())


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


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--img-size", "64", "50"], "'data.img_size' must be [H, W], two positive multiples"),
        (["--stages", "warp"], "--stages: unknown stage 'warp'; expected some of ['environment'"),
        (["--stage-budget", "ddp=x"], "--stage-budget 'ddp=x': expected NAME=SECONDS"),
        (["--batch-sizes-3d", "0"], "--batch-sizes-3d must be >= 1, got 0"),
        (["--slices", "6"], "--cases must be >= 2 and --slices >= 8 (the synthetic data's"),
    ],
)
def test_bad_arguments_are_one_line_errors(gpu_check, capsys, args, message) -> None:
    with pytest.raises(SystemExit) as exited:
        gpu_check.run_main(lambda: gpu_check.main(["--config", str(DEMO), *args]))
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and message in err


def test_measuring_stages_run_on_the_cpu(tmp_path: Path) -> None:
    stages = ("environment", "fused_adamw", "b7_throughput", "recipe_3d", "sliding_window",
              "compile")  # fmt: skip
    report, written = _run(tmp_path, *stages)
    assert written == report and report["device"] == "cpu" and report["ok"] is True
    s = report["stages"]
    for name in stages:
        assert s[name]["status"] == "ok" and s[name]["seconds"] <= s[name]["budget_s"]
    env = s["environment"]
    assert env["torch"] == torch.__version__ and env["device"] == "cpu" and env["bf16"] is True
    assert env["gpu_count"] == len(env["gpus"])
    adamw = s["fused_adamw"]
    assert adamw["fused"] and adamw["scaler_step_skipped"] and adamw["found_inf_step_skipped"]
    assert adamw["scale_after"] < adamw["scale_before"] and adamw["finite_step_taken"]
    b7 = s["b7_throughput"]
    assert b7["img_size"] == [32, 32] and b7["tta_flips"] == ["hflip"]
    for part in ("train", "inference"):
        assert [r["batch_size"] for r in b7[part]] == [2, 4]
        for r in b7[part]:
            assert r["oom"] is False and r["images_per_s"] > 0 and r["peak_gib"] is None
    assert b7["fit_16gib"]["fits"] is None  # another size: not measured
    d3 = s["recipe_3d"]
    assert [r["batch_size"] for r in d3["train"]] == [1, 2]
    assert all(r["step_s"] > 0 and r["images_per_s"] > 0 for r in d3["train"])
    loader = d3["loader"]
    assert loader["num_workers"] == 1 and loader["patches_per_s"] > 0
    assert 0 <= loader["data_wait"] <= 1 and loader["model_only_patches_per_s"] > 0
    assert 0 <= loader["data_wait_s"] <= loader["seconds"]
    window = s["sliding_window"]
    assert window["grid"] == [20, 32, 32] and window["windows"] >= 2
    assert window["tta_views"] == 2 and window["seconds_per_case_day"] > 0
    comp = s["compile"]
    assert comp["backend"] == "eager" and comp["compile_s"] >= 0 and comp["speedup"] > 0
    assert comp["budget_s"] > 300  # compile's box is what is left of the budget


@pytest.mark.slow  # ~90 s on 2 busy cores: four short fits and a torchrun epoch
def test_training_stages_run_on_the_cpu(tmp_path: Path) -> None:
    report, _ = _run(tmp_path, "recipe_fp16_nan_resume", "recipe_bf16", "ddp")
    for dtype, name in (("fp16", "recipe_fp16_nan_resume"), ("bf16", "recipe_bf16")):
        r = report["stages"][name]
        assert r["status"] == "ok" and r["precision"]["dtype"] == dtype
        assert r["stopped_after_epoch"] == 1 and r["resumed"] and r["epochs"] == [1, 2]
        assert r["nan_injected"] == 1 and r["skipped_steps"] >= 1
        assert r["best_finite"] and r["last_finite"]
    ddp = report["stages"]["ddp"]
    assert ddp["status"] == "ok" and ddp["ok"] and ddp["returncode"] == 0
    assert ddp["nproc"] == 2 and ddp["backend"] == "gloo"
    assert "--nproc_per_node=2" in ddp["command"] and "model.encoder_weights=null" in ddp["command"]


# --------------------------------------------------------------------------- time boxes


def _check(gpu_check):
    args = argparse.Namespace(config=DEMO, config_3d=DEMO_3D, img_size=None, set=[], set_3d=[])
    return gpu_check.Check(args, torch.device("cpu"), Path("."))


def test_a_failing_stage_is_failed_and_the_others_still_run(gpu_check) -> None:
    def boom(check, out):
        out["partial"] = 1
        raise RuntimeError("kernel exploded\nsecond line")

    ran = []
    stages = [
        gpu_check.Stage("first", boom, 5),
        gpu_check.Stage("second", lambda check, out: ran.append(out.update(x=2)), 5),
    ]
    lines = []
    results = gpu_check.run_stages(stages, _check(gpu_check), 60, lambda n, r: lines.append(n))
    assert results["first"]["status"] == "failed" and results["first"]["partial"] == 1
    assert results["first"]["error"] == "RuntimeError: kernel exploded"
    assert results["second"]["status"] == "ok" and results["second"]["x"] == 2
    assert lines == ["first", "second"]
    line = gpu_check.stage_line("first", results["first"])
    assert line.startswith("gpu_check first: failed (") and "RuntimeError: kernel exploded" in line


def test_a_stage_that_does_not_fit_the_time_left_is_skipped_with_why(gpu_check) -> None:
    def slow(check, out):
        time.sleep(0.3)

    stages = [
        gpu_check.Stage("a", slow, 0.9),
        gpu_check.Stage("b", slow, 5),  # 5 s box, under 1 s left
        gpu_check.Stage("rest", slow, None, min_s=3),  # what is left, needs 3 s
        gpu_check.Stage("c", lambda check, out: None, 0.1),
    ]
    results = gpu_check.run_stages(stages, _check(gpu_check), 1.0)
    assert results["a"]["status"] == "ok"
    assert results["b"]["status"] == "skipped" and results["b"]["budget_s"] == 5
    assert results["b"]["why"].startswith("its 5 s time box does not fit in the 0.")
    assert results["b"]["why"].endswith(" s left") and "seconds" not in results["b"]
    assert results["rest"]["status"] == "skipped" and "needs at least 3 s" in results["rest"]["why"]
    assert results["c"]["status"] == "ok"


def test_a_stage_past_its_time_box_is_stopped_and_keeps_what_it_measured(gpu_check) -> None:
    def endless(check, out):
        out["rows"] = []
        for i in range(1000):
            out["rows"].append(i)
            time.sleep(0.05)

    stage = gpu_check.Stage("endless", endless, 0.3)
    started = time.perf_counter()
    result = gpu_check.run_stage(stage, _check(gpu_check), 60)
    assert time.perf_counter() - started < 5
    assert result["status"] == "timeout" and "ran past its 0.3 s time box; stopped" in result["why"]
    assert 1 <= len(result["rows"]) < 1000


def test_a_stage_that_cannot_run_here_is_skipped_with_why(gpu_check, monkeypatch) -> None:
    from gitract.training import engine

    monkeypatch.setattr(engine, "TORCH_VERSION", (2, 3))  # no fused AdamW on the CPU
    result = gpu_check.run_stage(gpu_check.default_stages()[1], _check(gpu_check), 60)
    assert result["status"] == "skipped" and result["fused"] is False
    assert result["why"] == f"torch {torch.__version__} has no fused AdamW on cpu"
    monkeypatch.setattr(gpu_check, "bf16_why_not", lambda cfg, device: "no bf16 on this GPU")
    stage = next(s for s in gpu_check.default_stages() if s.name == "recipe_bf16")
    result = gpu_check.run_stage(stage, _check(gpu_check), 600)
    assert result["status"] == "skipped" and result["why"] == "no bf16 on this GPU"


def test_the_report_is_strict_json(gpu_check) -> None:
    value = {"a": float("nan"), "b": [1.0, float("inf")], "c": {"d": 2}}
    assert gpu_check.finite_json(value) == {"a": None, "b": [1.0, None], "c": {"d": 2}}


# --------------------------------------------------------------------------- ddp plan


@pytest.mark.parametrize(
    ("device", "gpus", "plan"),
    [
        ("cuda", 4, (4, "nccl", {})),
        ("cuda", 1, (2, "gloo", {"GITRACT_DIST_BACKEND": "gloo"})),
        ("cpu", 0, (2, "gloo", {"CUDA_VISIBLE_DEVICES": "", "GITRACT_DIST_BACKEND": "gloo"})),
    ],
)
def test_ddp_runs_nccl_across_gpus_and_gloo_on_one(gpu_check, device, gpus, plan) -> None:
    assert gpu_check.ddp_plan(torch.device(device), gpus) == plan


def test_the_backend_variable_chooses_gloo_on_cuda(monkeypatch) -> None:
    monkeypatch.delenv(distributed.BACKEND_ENV, raising=False)
    assert distributed.pick_backend(True) == "nccl" and distributed.pick_backend(False) == "gloo"
    monkeypatch.setenv(distributed.BACKEND_ENV, "gloo")
    assert distributed.pick_backend(True) == "gloo"
    monkeypatch.setenv(distributed.BACKEND_ENV, "mpi")
    with pytest.raises(ValueError, match=r"GITRACT_DIST_BACKEND='mpi': expected gloo or nccl"):
        distributed.pick_backend(True)


# --------------------------------------------------------------------------- OOM and 16 GiB


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
    verdict = gpu_check.fit_line(fit)
    assert verdict.startswith("batch 16 at 320x384")
    if fits is None:
        assert "not measured" in verdict
    else:
        assert ("does NOT fit" in verdict) is (not fits)
        assert f"{row['peak_gib']:.2f} GiB vs 16 GiB" in verdict
