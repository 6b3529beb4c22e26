"""Predict a submission with the ensemble of trained folds, or a blend of several runs.

    python scripts/infer.py [--config C] [--data-dir D] [--runs R] [--folds 0 1] [--out FILE]
                            [--postprocess FILE]
    python scripts/infer.py --runs A B [--weights 0.6 0.4] [--blend-dir DIR] ...   # a blend
    python scripts/infer.py --ensemble ensembles/b7_3d.yaml ...                     # the same
    python scripts/infer.py --oof [--fold N] [--runs A B | --ensemble FILE]   # out of fold

A single run is a blend of one. A blend averages each run's (folds-averaged) probabilities
with the weights on every slice's own grid before post-processing; each run is rebuilt from
its own checkpoints' config (2.5D or 3D), with that config's TTA and batch size. Its folder
(--blend-dir, the ensemble file's dir:, else the run's own for one run, runs/blend_A+B for
several) holds the blend's oof.csv, oof_probs/ and postprocess.json.
Post-processing: --postprocess FILE, else <runs or blend folder>/postprocess.json
(evaluate.py --tune), else the config's postprocess section. The submission has exactly
sample_submission.csv's rows in its order; it goes to submissions/submission.csv, or
/kaggle/working/submission.csv in a Kaggle kernel.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from gitract.cli import run_main
from gitract.config import load_config
from gitract.data.layout import resolve_data_dir
from gitract.inference.blend import add_spec_arguments, resolve_spec
from gitract.inference.submission import infer_oof, infer_test
from gitract.training.distributed import resolve_num_workers


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/default.yaml", help="YAML config (infer:)")
    parser.add_argument("--data-dir", help="competition data folder")
    add_spec_arguments(parser, "trained folds (default: runs/<config name>); several: a blend")
    parser.add_argument("--folds", type=int, nargs="+", help="folds to ensemble (default: all)")
    parser.add_argument("--out", help="output CSV")
    parser.add_argument(
        "--postprocess", help="tuned post-processing JSON (default: <runs>/postprocess.json)"
    )
    parser.add_argument("--oof", action="store_true", help="out-of-fold predictions instead")
    parser.add_argument("--fold", type=int, help="with --oof: only this fold")
    parser.add_argument("--folds-csv", help="with --oof: folds file (default: data.folds_csv)")
    parser.add_argument(
        "--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args()
    if args.oof and args.postprocess:
        parser.error("--postprocess is for test inference; OOF uses the config's settings")
    if not args.oof and (args.fold is not None or args.folds_csv):
        parser.error("--fold and --folds-csv go with --oof (to ensemble some folds: --folds)")
    return args


def main() -> None:
    args = parse_args()
    cfg = load_config(args.config, args.overrides)
    data_dir = resolve_data_dir(args.data_dir, cfg.data.root)
    default = Path(cfg.train.out_dir) / cfg.name
    spec = resolve_spec(args.runs, args.weights, args.blend_dir, args.ensemble, default)
    out = Path(args.out) if args.out else (Path(cfg.infer.out) if cfg.infer.out else None)
    progress = not args.no_progress
    workers = resolve_num_workers(cfg.data.num_workers)  # 0: slices read in the main process
    if args.oof:
        folds = [args.fold] if args.fold is not None else args.folds
        folds_csv = Path(args.folds_csv or cfg.data.folds_csv)
        path = infer_oof(
            cfg, data_dir, spec, folds_csv, folds, out, num_workers=workers, progress=progress
        )
    else:
        path = infer_test(
            cfg, data_dir, spec, args.folds, out, num_workers=workers, progress=progress,
            tuned_file=Path(args.postprocess) if args.postprocess else None,
        )  # fmt: skip
    print(f"wrote {path}")


if __name__ == "__main__":
    run_main(main)
