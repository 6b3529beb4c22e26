"""Make ``folds/folds.csv``: StratifiedGroupKFold by case over the data set's train.csv.

Usage: python scripts/make_folds.py [--data-dir D] [--out F] [--n-splits K] [--seed S]
                                    [--exclude CASE_DAY ...]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from gitract.cli import run_main
from gitract.data.folds import create_folds_file, fold_summary
from gitract.data.layout import DEFAULT_EXCLUDE, resolve_data_dir


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data-dir",
        help="data root (default: env GITRACT_DATA_DIR, Kaggle input, or data/synthetic)",
    )
    parser.add_argument("--out", default="folds/folds.csv", help="folds CSV to write")
    parser.add_argument("--n-splits", type=int, default=5, help="number of folds (default 5)")
    parser.add_argument("--seed", type=int, default=42, help="shuffle seed (default 42)")
    parser.add_argument(
        "--exclude",
        nargs="*",
        default=list(DEFAULT_EXCLUDE),
        metavar="CASE_DAY",
        help=f"case-days to drop (default: {' '.join(DEFAULT_EXCLUDE)}; give none to keep all)",
    )
    args = parser.parse_args()
    data_dir = resolve_data_dir(args.data_dir)
    out = Path(args.out)
    folds = create_folds_file(data_dir, out, args.n_splits, args.seed, args.exclude)
    print(f"wrote {out} ({len(folds)} slices, {args.n_splits} folds) from {data_dir}")
    print(fold_summary(folds).to_string())
    return 0


if __name__ == "__main__":
    run_main(main)
