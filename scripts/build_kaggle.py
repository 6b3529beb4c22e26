"""Build the offline Kaggle bundle (a dataset) and the kernel that uses it.

    python scripts/build_kaggle.py [--runs runs/default] [--out dist] [--user NAME]

Writes dist/kaggle-dataset/ (gitract + bundled wheels, the trained folds, dataset-metadata.json)
and dist/kaggle-kernel/ (kaggle_kernel.py/.ipynb, kernel-metadata.json). Third-party wheels are
downloaded once into dist/wheel-cache/ and reused after that.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from gitract.cli import run_main
from gitract.kaggle import build_bundle

REPO = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="runs/default", help="trained folds: runs/<name>")
    parser.add_argument("--out", default="dist", help="output folder")
    parser.add_argument("--wheel-cache", help="downloaded wheels (default: <out>/wheel-cache)")
    parser.add_argument(
        "--user",
        default=os.environ.get("KAGGLE_USERNAME"),
        help="Kaggle user name for the metadata (default: $KAGGLE_USERNAME, else a placeholder)",
    )
    parser.add_argument("--dataset-slug", default="gitract-bundle", help="dataset name")
    parser.add_argument("--kernel-slug", default="gitract-submission", help="kernel name")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    out = Path(args.out)
    info = build_bundle(
        runs=Path(args.runs),
        dataset_dir=out / "kaggle-dataset",
        kernel_dir=out / "kaggle-kernel",
        kernel_script=REPO / "scripts" / "kaggle_kernel.py",
        wheel_cache=Path(args.wheel_cache) if args.wheel_cache else out / "wheel-cache",
        source=REPO,
        user=args.user,
        dataset_slug=args.dataset_slug,
        kernel_slug=args.kernel_slug,
    )
    print(f"wrote {info.dataset_dir} (runs {info.runs.name}: {', '.join(info.folds)})")
    for wheel in info.wheels:
        print(f"  wheels/{wheel.name}")
    print(f"wrote {info.kernel_dir}")
    if not args.user:
        print("note: set --user / $KAGGLE_USERNAME, or edit the two *-metadata.json files")


if __name__ == "__main__":
    run_main(main)
