"""Score a submission locally with the competition metric, or tune post-processing on OOF.

    python scripts/evaluate.py --submission S [--labels L] [--data-dir D]
    python scripts/evaluate.py --tune --runs R [--data-dir D] [--thresholds T ...]
                               [--min-sizes N ...]

Prints one JSON object (score, dice, hausdorff, per-class dice and hausdorff). Without
--labels the truth is the data's train.csv, restricted to the case-days the submission covers
(an out-of-fold submission covers one fold); with --labels every labelled row must be there.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from gitract.cli import run_main
from gitract.data import load_train_table, resolve_data_dir
from gitract.evaluation import evaluate_submission
from gitract.inference import OOF_PROBS_DIR, POSTPROCESS_FILE
from gitract.tuning import (
    DEFAULT_MIN_SIZES,
    DEFAULT_THRESHOLDS,
    save_postprocess,
    tune_postprocess,
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--submission", help="id,class,predicted CSV to score")
    parser.add_argument("--labels", help="id,class,segmentation CSV (default: train.csv)")
    parser.add_argument("--data-dir", help="competition data folder (images give slice sizes)")
    parser.add_argument("--tune", action="store_true", help="tune thresholds on OOF of --runs")
    parser.add_argument("--runs", help="with --tune: the runs folder holding oof_probs/")
    parser.add_argument(
        "--thresholds", type=float, nargs="+", default=list(DEFAULT_THRESHOLDS),
        help=f"with --tune: thresholds to try (default: {' '.join(map(str, DEFAULT_THRESHOLDS))})",
    )  # fmt: skip
    parser.add_argument(
        "--min-sizes", type=int, nargs="+", default=list(DEFAULT_MIN_SIZES),
        help="with --tune: minimum component sizes in pixels to try "
        f"(default: {' '.join(map(str, DEFAULT_MIN_SIZES))})",
    )  # fmt: skip
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args()
    if args.tune != bool(args.runs) or args.tune == bool(args.submission):
        parser.error("give either --submission S, or --tune with --runs R")
    return args


def main() -> None:
    args = parse_args()
    data_dir = resolve_data_dir(args.data_dir)
    if args.tune:
        runs = Path(args.runs)
        table = load_train_table(data_dir, exclude=())
        result = tune_postprocess(
            runs / OOF_PROBS_DIR, table, args.thresholds, args.min_sizes, not args.no_progress
        )
        save_postprocess(result, runs / POSTPROCESS_FILE)
        result["written_to"] = str(runs / POSTPROCESS_FILE)
    else:
        labels = Path(args.labels) if args.labels else None
        result = evaluate_submission(Path(args.submission), data_dir, labels)
    print(json.dumps(result))


if __name__ == "__main__":
    run_main(main)
