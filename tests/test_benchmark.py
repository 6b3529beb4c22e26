"""Smoke test of scripts/benchmark.py at tiny sizes: it runs, agrees with its references and
writes the JSON the README table is made from. (The training parts take minutes; they run in
the full benchmark only.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_benchmark_writes_ratios(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--quick",
         "--only", "rle", "loader", "metric", "patches", "ema", "selection", "--json", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    for key in ("rle_decode_speedup", "loader_speedup", "metric_speedup", "patch_loader_speedup"):
        assert results[key] > 0, key
        assert key in done.stdout and key in results["met"]
    assert results["rle_encode_per_s"] > 0
    assert results["metric_max_abs_diff"] < 1e-9
    assert results["loader_img_size"] == [320, 384]
    assert results["ema_step_ratio"] > 0 and results["ema_step_ratio_timm"] > 0
    assert results["machine"]["cores"] >= 1
    # Selection picks a blend at least as good as its best run alone (pooled OOF score).
    scores = results["selection_scores"]
    assert results["selection_seconds_real_scale"] > 0 and results["selection_members"] == 3
    assert scores["chosen"] >= max(scores["members"])
    assert not [p for p in tmp_path.iterdir() if p.name != "bench.json"]
