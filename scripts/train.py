"""Train one fold: ``python scripts/train.py --fold 0 [--config configs/default.yaml]``.

Writes ``<out-dir>/<config name>/fold<N>/`` (best.pt, last.pt, history.csv, config.yaml,
curves.png). ``--fold -1`` trains on every slice (no validation) into ``.../full/``.
Under ``torchrun --nproc_per_node=N`` the same command trains with DistributedDataParallel.
"""

from __future__ import annotations

import argparse

from gitract.cli import run_main
from gitract.config import load_config
from gitract.training.engine import fit


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fold", type=int, required=True, help="validation fold; -1: all data")
    parser.add_argument("--config", default="configs/default.yaml", help="YAML config")
    parser.add_argument("--data-dir", help="competition data folder (train.csv, train/)")
    parser.add_argument("--folds-csv", help="folds file (default: the config's data.folds_csv)")
    parser.add_argument("--out-dir", help="runs folder (default: the config's train.out_dir)")
    parser.add_argument("--resume", action="store_true", help="continue from last.pt")
    parser.add_argument(
        "--fresh", action="store_true", help="replace a trained model in the run folder"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        nargs="+",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        help="override config values, e.g. --set train.epochs=3 data.num_workers=0",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    cfg = load_config(args.config, args.overrides)
    run_dir = fit(
        cfg,
        args.fold,
        data_dir=args.data_dir,
        folds_csv=args.folds_csv,
        out_dir=args.out_dir,
        resume=args.resume,
        progress=not args.no_progress,
        fresh=args.fresh,
    )
    print(f"run folder: {run_dir}")


if __name__ == "__main__":
    run_main(main)
