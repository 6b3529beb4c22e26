"""Pictures: overlays colour exactly the masked pixels; the script writes a PNG per case-day."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from gitract.scoring.visualize import COLOURS, overlay

ROOT = Path(__file__).resolve().parents[1]


def test_overlay_colours_only_masked_pixels() -> None:
    image = np.tile(np.arange(40, dtype=np.uint16) * 300, (30, 1))
    masks = np.zeros((30, 40, 3), np.uint8)
    masks[5:10, 5:10, 2] = 1  # stomach
    rgb = overlay(image, masks, alpha=0.5)
    assert rgb.shape == (30, 40, 3)
    outside = rgb[20:, :, :]
    assert np.allclose(outside[..., 0], outside[..., 1])  # still grey
    inside = rgb[5:10, 5:10]
    red_shift = inside[..., 0] - inside[..., 1]
    assert (red_shift > 0.2).all()
    assert COLOURS[2][0] > COLOURS[2][1]


def test_script_draws_truth_and_prediction_for_a_case_day(tiny_kaggle, tmp_path: Path) -> None:
    labels = pd.read_csv(tiny_kaggle.train_csv, keep_default_na=False)
    sub = labels.rename(columns={"segmentation": "predicted"})
    sub.loc[sub["class"] == "stomach", "predicted"] = ""  # a miss to show
    sub.to_csv(tmp_path / "sub.csv", index=False)
    cmd = [
        sys.executable, "scripts/visualize.py", "--submission", str(tmp_path / "sub.csv"),
        "--data-dir", str(tiny_kaggle.root), "--case-day", "case1_day0",
        "--out-dir", str(tmp_path / "pics"),
    ]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    path = tmp_path / "pics" / "case1_day0.png"
    assert f"picture: {path}" in done.stdout
    picture = cv2.imread(str(path))
    assert picture is not None and picture.shape[0] > 500 and picture.shape[1] > 300

    bad = subprocess.run([*cmd[:-4], "--case-day", "case5_day9"], cwd=ROOT, capture_output=True,
                         text=True)  # fmt: skip
    assert bad.returncode == 2 and "no images of case-day 'case5_day9'" in bad.stderr
    assert "Traceback" not in bad.stderr
