"""Write a synthetic data set in the exact Kaggle layout (what ``make data`` runs).

    python scripts/make_synthetic.py --out data/synthetic [--labels-out data/synthetic_labels]
        [--cases N] [--slices S] [--seed X] [--workers W]

``--out`` gets train/ and test/ (16-bit PNGs), train.csv and sample_submission.csv. The hidden
test labels go OUTSIDE it (default: ``<out>_labels/test_labels.csv``), so nothing that reads the
data folder can peek at them. About a fifth of the cases (at least one) are test cases; each
case has 2-3 days. The same arguments give byte-identical files; rerunning replaces the data set.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from gitract.cli import run_main
from gitract.data.synthetic import DEFAULT_CASES, DEFAULT_SEED, DEFAULT_SLICES, generate


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("data/synthetic"),
        help="data folder (default: %(default)s)",
    )
    parser.add_argument(
        "--labels-out",
        type=Path,
        help="folder for test_labels.csv, outside --out (default: <out>_labels)",
    )
    parser.add_argument(
        "--cases", type=int, default=DEFAULT_CASES, help="cases, >= 2 (default: %(default)s)"
    )
    parser.add_argument(
        "--slices",
        type=int,
        default=DEFAULT_SLICES,
        help="slices of a long day, >= 8; short days have round(S*80/144) (default: %(default)s)",
    )
    parser.add_argument(
        "--seed", type=int, default=DEFAULT_SEED, help="random seed, >= 0 (default: %(default)s)"
    )
    parser.add_argument("--workers", type=int, help="processes (default: one per CPU)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    labels = args.labels_out or args.out.parent / f"{args.out.name}_labels"
    summary = generate(args.out, labels, args.cases, args.slices, args.seed, workers=args.workers)
    print(summary.format())
    return 0


if __name__ == "__main__":
    run_main(main)
