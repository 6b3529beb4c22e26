"""Build the offline Kaggle bundle (a dataset) and the kernel that uses it.

    python scripts/build_kaggle.py [--runs runs/default] [--out dist] [--user NAME]
    python scripts/build_kaggle.py --runs runs/a runs/b [--weights 0.6 0.4] [--postprocess F]
    python scripts/build_kaggle.py --ensemble ensembles/b7_3d.yaml     # a blend, as infer.py

A single run is a blend of one: every bundle holds ensemble.json (members, weights and the
folder of the post-processing the kernel uses), exactly as infer.py reads --runs/--ensemble.

Writes dist/kaggle-dataset/ (gitract + bundled wheels, the trained folds, dataset-metadata.json)
and dist/kaggle-kernel/ (kaggle_kernel.py/.ipynb, kernel-metadata.json). Third-party wheels are
downloaded once into dist/wheel-cache/ and reused after that.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from gitract.cli import run_main
from gitract.inference.blend import add_spec_arguments, resolve_spec
from gitract.kaggle.bundle import build_bundle

REPO = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_spec_arguments(parser, "trained folds (default: runs/default); several: a blend")
    parser.add_argument(
        "--postprocess", help="tuned postprocess.json (default: the blend folder's, if any)"
    )
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
    spec = resolve_spec(
        args.runs, args.weights, args.blend_dir, args.ensemble, Path("runs/default")
    )
    info = build_bundle(
        spec,
        Path(args.out),
        REPO,
        wheel_cache=Path(args.wheel_cache) if args.wheel_cache else None,
        user=args.user,
        dataset_slug=args.dataset_slug,
        kernel_slug=args.kernel_slug,
        postprocess=Path(args.postprocess) if args.postprocess else None,
    )
    print(f"wrote {info.dataset_dir} (folds {', '.join(info.folds)})")
    for wheel in info.wheels:
        print(f"  wheels/{wheel.name}")
    print(f"wrote {info.kernel_dir}")
    if not args.user:
        print("note: set --user / $KAGGLE_USERNAME, or edit the two *-metadata.json files")


if __name__ == "__main__":
    run_main(main)
