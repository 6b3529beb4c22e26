"""Score a submission locally with the competition metric, or tune post-processing on OOF.

    python scripts/evaluate.py --submission S [--labels L] [--data-dir D]
                               [--metric kaggle|mlebench|all]
    python scripts/evaluate.py --tune --runs R [--data-dir D] [--metric kaggle|mlebench]
                               [--workers N] [--sweeps N] [--out FILE] [--folds-csv F]
                               [--thresholds T ...] [--min-sizes N ...]
    python scripts/evaluate.py --select --runs A B ... [--metric kaggle|mlebench|all]
                               [--out ensembles/NAME.yaml] [--max-weight N] (and the above)

Prints one JSON object. Scoring: score, dice, hausdorff, per-class terms and the classic
metrics (pixel accuracy, mean pixel accuracy, IoU) under --metric (default kaggle: our reading
of the documented metric; mlebench: what openai/mle-bench's grader computes), and
score_<profile> for each profile scored (both with --metric all; the plain keys are then
kaggle's). Without --labels the truth is the data's train.csv, restricted to the case-days
the submission covers; --labels takes Kaggle's layout or mle-bench's answers (test.csv with
image sizes). Tuning searches every post-processing step per class on R/oof_probs for the
profile and writes R/postprocess.json (or --out), which infer.py then uses.

Selection (--select) chooses a blend of the runs from their OOF probabilities (infer.py --oof
--runs R for each run first): greedy forward selection with replacement, then the full tuning
(gitract.postprocess.selection). It writes the ensemble file (--out, default
ensembles/<A>+<B>....yaml; with mle-bench's profile _mlebench is added to the name) whose dir:
holds the tuned postprocess.json, for infer.py --ensemble and build_kaggle.py --ensemble.
Tuning and selection score each fold beside the pooled score (folds from --folds-csv, default
folds/folds.csv when it exists). The report is one JSON object on the last line.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from gitract.cli import run_main
from gitract.config import PostprocessConfig
from gitract.data.layout import load_train_table, resolve_data_dir
from gitract.errors import ConfigError
from gitract.inference.blend import BlendSpec, MemberSpec, write_ensemble
from gitract.inference.submission import OOF_PROBS_DIR
from gitract.postprocess.selection import DEFAULT_MAX_WEIGHT, select_blend
from gitract.postprocess.steps import POSTPROCESS_FILE, save_postprocess
from gitract.postprocess.tuning import (
    DEFAULT_GRID,
    DEFAULT_MIN_SIZES,
    DEFAULT_SWEEPS,
    DEFAULT_THRESHOLDS,
    case_day_folds,
    tune_postprocess,
)
from gitract.scoring.files import score_profiles
from gitract.scoring.metrics import PROFILES

DEFAULT_FOLDS = Path("folds/folds.csv")
ENSEMBLES = Path("ensembles")


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
    parser.add_argument("--select", action="store_true", help="select a blend of --runs on OOF")
    parser.add_argument(
        "--runs", nargs="+",
        help="--tune: the runs folder holding oof_probs/; --select: the candidate runs",
    )  # fmt: skip
    parser.add_argument(
        "--out",
        help=f"--tune: where to write (default R/{POSTPROCESS_FILE}); --select: the ensemble file",
    )
    parser.add_argument(
        "--folds-csv", help="folds file for per-fold scores (default folds/folds.csv if present)"
    )
    parser.add_argument(
        "--max-weight", type=int, default=DEFAULT_MAX_WEIGHT,
        help=f"with --select: greedy additions at most (default {DEFAULT_MAX_WEIGHT})",
    )  # fmt: skip
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
    searching = args.tune or args.select
    if args.tune and args.select:
        parser.error("--select tunes the blend it selects: give --tune or --select, not both")
    if searching != bool(args.runs) or searching == bool(args.submission):
        parser.error("give either --submission S, or --tune/--select with --runs")
    if args.tune and len(args.runs) != 1:
        parser.error("--tune takes one runs folder (a blend: infer.py --oof into its folder)")
    if args.tune and args.metric == "all":
        parser.error("--tune tunes for one profile: --metric kaggle or --metric mlebench")
    if args.max_weight < 1:
        parser.error(f"--max-weight must be >= 1, got {args.max_weight}")
    if args.workers is not None and args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    if args.sweeps < 1:
        parser.error(f"--sweeps must be >= 1, got {args.sweeps}")
    return args


def _folds(folds_csv: str | None) -> dict[str, int] | None:
    """Case-day -> fold from ``--folds-csv``, else folds/folds.csv when it exists."""
    if folds_csv is None and not DEFAULT_FOLDS.is_file():
        return None
    return case_day_folds(Path(folds_csv or DEFAULT_FOLDS))


def _ensemble_path(args: argparse.Namespace, profile: str, runs: list[Path]) -> Path:
    """--out for the first profile asked for; other profiles (and mle-bench's by default) add
    ``_<profile>`` to the name, so a selection per profile never overwrites another."""
    first = profile == (PROFILES[0] if args.metric == "all" else args.metric)
    if args.out:
        out = Path(args.out)
        return out if first else out.with_name(f"{out.stem}_{profile}{out.suffix}")
    stem = "+".join(run.name for run in runs)
    return ENSEMBLES / (stem + ("" if profile == PROFILES[0] else f"_{profile}") + ".yaml")


def select(args: argparse.Namespace, table, grid: dict) -> dict:
    """Select, tune and write one blend per profile asked for; the report per profile."""
    runs = [Path(r) for r in args.runs]
    if len(set(r.resolve() for r in runs)) != len(runs):
        raise ConfigError(f"--runs: a run is listed twice ({' '.join(map(str, runs))})")
    folds = _folds(args.folds_csv)
    profiles = list(PROFILES) if args.metric == "all" else [args.metric]
    report = {}
    for profile in profiles:
        result = select_blend(
            [r / OOF_PROBS_DIR for r in runs], table, profile, folds, grid, args.sweeps,
            args.max_weight, args.workers, progress=not args.no_progress,
        )  # fmt: skip
        result["runs"] = [str(r) for r in runs]
        path = _ensemble_path(args, profile, runs)
        members = tuple(
            MemberSpec(r, w) for r, w in zip(runs, result["weights"], strict=True) if w > 0
        )
        spec = BlendSpec(members, Path("runs") / path.stem)
        save_postprocess(
            PostprocessConfig.model_validate(result["classes"]), spec.dir / POSTPROCESS_FILE
        )
        write_ensemble(
            spec, path,
            f"Selected by scripts/evaluate.py --select --metric {profile} from "
            f"{', '.join(map(str, runs))}:\nOOF score {result['score']:.5f} on "
            f"{result['n_case_days']} case-days ({result['chosen']}).",
        )  # fmt: skip
        result["ensemble_file"] = str(path)
        result["postprocess_file"] = str(spec.dir / POSTPROCESS_FILE)
        report[profile] = result
    return report


def main() -> None:
    args = parse_args()
    data_dir = resolve_data_dir(args.data_dir)
    if args.tune or args.select:
        table = load_train_table(data_dir, exclude=())
        grid = {
            **DEFAULT_GRID,
            "threshold": tuple(args.thresholds),
            "min_size": tuple(args.min_sizes),
        }
    if args.select:
        result = select(args, table, grid)
    elif args.tune:
        runs = Path(args.runs[0])
        out = Path(args.out) if args.out else runs / POSTPROCESS_FILE
        result = tune_postprocess(
            runs / OOF_PROBS_DIR, table, args.metric, grid, sweeps=args.sweeps,
            workers=args.workers, progress=not args.no_progress, folds=_folds(args.folds_csv),
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
