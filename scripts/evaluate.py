"""Score a submission locally with the competition metric, or tune post-processing on OOF.

    python scripts/evaluate.py --submission S [--labels L] [--data-dir D]
                               [--metric kaggle|mlebench|all]
    python scripts/evaluate.py --tune --runs R [--data-dir D] [--metric kaggle|mlebench]
                               [--workers N] [--sweeps N] [--out FILE]
                               [--thresholds T ...] [--min-sizes N ...]

Prints one JSON object. Scoring: score, dice, hausdorff, per-class terms and the classic
metrics (pixel accuracy, mean pixel accuracy, IoU) under --metric (default kaggle: our reading
of the documented metric; mlebench: what openai/mle-bench's grader computes), and
score_<profile> for each profile scored (both with --metric all; the plain keys are then
kaggle's). Without --labels the truth is the data's train.csv, restricted to the case-days
the submission covers; --labels takes Kaggle's layout or mle-bench's answers (test.csv with
image sizes). Tuning searches every post-processing step per class on R/oof_probs for the
profile and writes R/postprocess.json (or --out), which infer.py then uses.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from gitract.cli import run_main
from gitract.config import PostprocessConfig
from gitract.data.layout import load_train_table, resolve_data_dir
from gitract.inference.submission import OOF_PROBS_DIR
from gitract.postprocess.steps import POSTPROCESS_FILE, save_postprocess
from gitract.postprocess.tuning import (
    DEFAULT_GRID,
    DEFAULT_MIN_SIZES,
    DEFAULT_SWEEPS,
    DEFAULT_THRESHOLDS,
    tune_postprocess,
)
from gitract.scoring.files import score_profiles
from gitract.scoring.metrics import PROFILES


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--submission", help="id,class,predicted CSV to score")
    parser.add_argument("--labels", help="truth CSV (default: train.csv); mle-bench answers too")
    parser.add_argument("--data-dir", help="competition data folder (images give slice sizes)")
    parser.add_argument(
        "--metric", default="kaggle", choices=[*PROFILES, "all"],
        help="metric profile (default kaggle); all: every profile (not with --tune)",
    )  # fmt: skip
    parser.add_argument("--tune", action="store_true", help="tune post-processing on OOF of --runs")
    parser.add_argument("--runs", help="with --tune: the runs folder holding oof_probs/")
    parser.add_argument("--out", help=f"with --tune: where to write (default R/{POSTPROCESS_FILE})")
    parser.add_argument("--workers", type=int, help="with --tune: processes (default: CPU count)")
    parser.add_argument(
        "--sweeps", type=int, default=DEFAULT_SWEEPS,
        help=f"with --tune: coordinate-descent sweeps (default {DEFAULT_SWEEPS})",
    )  # fmt: skip
    parser.add_argument(
        "--thresholds", type=float, nargs="+", default=DEFAULT_THRESHOLDS,
        help=f"with --tune: thresholds to try (default {' '.join(map(str, DEFAULT_THRESHOLDS))})",
    )  # fmt: skip
    parser.add_argument(
        "--min-sizes", type=int, nargs="+", default=DEFAULT_MIN_SIZES,
        help="with --tune: 2D minimum component sizes to try "
        f"(default {' '.join(map(str, DEFAULT_MIN_SIZES))})",
    )  # fmt: skip
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args()
    if args.tune != bool(args.runs) or args.tune == bool(args.submission):
        parser.error("give either --submission S, or --tune with --runs R")
    if args.tune and args.metric == "all":
        parser.error("--tune tunes for one profile: --metric kaggle or --metric mlebench")
    if args.workers is not None and args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    if args.sweeps < 1:
        parser.error(f"--sweeps must be >= 1, got {args.sweeps}")
    return args


def main() -> None:
    args = parse_args()
    data_dir = resolve_data_dir(args.data_dir)
    if args.tune:
        runs = Path(args.runs)
        out = Path(args.out) if args.out else runs / POSTPROCESS_FILE
        table = load_train_table(data_dir, exclude=())
        grid = {
            **DEFAULT_GRID,
            "threshold": tuple(args.thresholds),
            "min_size": tuple(args.min_sizes),
        }
        result = tune_postprocess(
            runs / OOF_PROBS_DIR, table, args.metric, grid, sweeps=args.sweeps,
            workers=args.workers, progress=not args.no_progress,
        )  # fmt: skip
        save_postprocess(PostprocessConfig.model_validate(result["classes"]), out)
        result["written_to"] = str(out)
    else:
        profiles = list(PROFILES) if args.metric == "all" else [args.metric]
        labels = Path(args.labels) if args.labels else None
        scored = score_profiles(Path(args.submission), data_dir, labels, profiles)
        result = {"profile": args.metric, **scored[profiles[0]]}
        for profile, values in scored.items():
            for key in ("score", "dice", "hausdorff"):
                result[f"{key}_{profile}"] = values[key]
    print(json.dumps(result))


if __name__ == "__main__":
    run_main(main)
