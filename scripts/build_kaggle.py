"""Build the offline Kaggle bundle (a dataset) and the kernel that uses it.

    python scripts/build_kaggle.py [--runs runs/default] [--out dist] [--user NAME]
    python scripts/build_kaggle.py --runs runs/a runs/b [--weights 0.6 0.4] [--postprocess F]
    python scripts/build_kaggle.py --ensemble ensembles/b7_3d.yaml     # a blend, as infer.py

Writes dist/kaggle-dataset/ (gitract + bundled wheels, the trained folds, dataset-metadata.json)
and dist/kaggle-kernel/ (kaggle_kernel.py/.ipynb, kernel-metadata.json). Third-party wheels are
downloaded once into dist/wheel-cache/ and reused after that.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from gitract.cli import run_main
from gitract.inference.blend import blend_spec, read_ensemble
from gitract.kaggle.bundle import build_bundle

REPO = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--runs", nargs="+", default=["runs/default"], help="trained folds: runs/<name> ..."
    )
    parser.add_argument("--weights", type=float, nargs="+", help="blend weights, one per run")
    parser.add_argument("--ensemble", help="ensemble file (as infer.py --ensemble)")
    parser.add_argument(
        "--postprocess", help="the blend's postprocess.json (default: the blend folder's)"
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
    args = parser.parse_args()
    if args.weights and len(args.weights) != len(args.runs):
        parser.error(f"--weights: give one per --runs entry ({len(args.runs)})")
    return args


def main() -> None:
    args = parse_args()
    if args.ensemble:
        runs = read_ensemble(args.ensemble)
    elif len(args.runs) > 1 or args.weights:
        runs = blend_spec([Path(r) for r in args.runs], args.weights)
    else:
        runs = Path(args.runs[0])
    info = build_bundle(
        runs,
        Path(args.out),
        REPO,
        wheel_cache=Path(args.wheel_cache) if args.wheel_cache else None,
        user=args.user,
        dataset_slug=args.dataset_slug,
        kernel_slug=args.kernel_slug,
        postprocess=Path(args.postprocess) if args.postprocess else None,
    )
    print(f"wrote {info.dataset_dir} (runs {info.runs.name}: {', '.join(info.folds)})")
    for wheel in info.wheels:
        print(f"  wheels/{wheel.name}")
    print(f"wrote {info.kernel_dir}")
    if not args.user:
        print("note: set --user / $KAGGLE_USERNAME, or edit the two *-metadata.json files")


if __name__ == "__main__":
    run_main(main)
