"""Score several submissions side by side, per metric profile, beside their out-of-fold scores.

    python scripts/compare_submissions.py --labels L --data-dir D [--selection REPORT]
        NAME=PREFIX [NAME=PREFIX ...]

Each ``NAME=PREFIX`` is scored from ``PREFIX_<profile>.csv`` (tuned for that profile) under
that profile. ``--selection`` takes the JSON report of ``evaluate.py --select --metric all``
(its last line): each run's tuned OOF score is shown beside its test score (NAME = the run's
folder name), and ``selected`` gets the selected blend's. Prints a table, then one line per
profile saying whether the selected blend beat every run on the test set (it may not: the OOF
evidence is a few case-days here), and last one JSON object.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from gitract.cli import run_main
from gitract.data.layout import resolve_data_dir
from gitract.errors import ConfigError, DataError
from gitract.scoring.files import score_profiles
from gitract.scoring.metrics import PROFILES


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labels", required=True, help="truth CSV of the test set")
    parser.add_argument("--data-dir", help="competition data folder (images give slice sizes)")
    parser.add_argument("--selection", help="evaluate.py --select --metric all report (JSON)")
    parser.add_argument("entries", nargs="+", metavar="NAME=PREFIX")
    return parser.parse_args()


def read_selection(path: Path) -> dict[str, dict[str, float]]:
    """profile -> {run folder name or "selected": tuned OOF score} from a selection report."""
    try:
        lines = path.read_text(encoding="utf-8").strip().splitlines()
        report = json.loads(lines[-1])
    except (OSError, IndexError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: not a selection report ({err})") from None
    oof: dict[str, dict[str, float]] = {}
    for profile, result in report.items():
        if not isinstance(result, dict) or "members" not in result:
            raise DataError(f"{path}: not a selection report (no members under {profile!r})")
        scores = {
            Path(run).name: member["full"]["score"]
            for run, member in zip(result["runs"], result["members"], strict=True)
        }
        scores["selected"] = result["score"]
        oof[profile] = scores
    return oof


def main() -> None:
    args = parse_args()
    data_dir = resolve_data_dir(args.data_dir)
    oof = read_selection(Path(args.selection)) if args.selection else {}
    test: dict[str, dict[str, float]] = {profile: {} for profile in PROFILES}
    for entry in args.entries:
        name, sep, prefix = entry.partition("=")
        if not sep or not name or not prefix:
            raise ConfigError(f"{entry!r}: expected NAME=PREFIX")
        for profile in PROFILES:
            path = Path(f"{prefix}_{profile}.csv")
            scored = score_profiles(path, data_dir, Path(args.labels), [profile])
            test[profile][name] = scored[profile]["score"]
    print(f"{'':24s}" + "".join(f"{p + ' OOF':>14s}{p + ' test':>14s}" for p in PROFILES))
    for name in test[PROFILES[0]]:
        cells = ""
        for profile in PROFILES:
            known = oof.get(profile, {}).get(name)
            cells += f"{'-' if known is None else f'{known:.5f}':>14s}{test[profile][name]:>14.5f}"
        print(f"{name:24s}{cells}")
    for profile in PROFILES:
        scores = test[profile]
        if "selected" not in scores or len(scores) < 2:
            continue
        best = max((n for n in scores if n != "selected"), key=scores.__getitem__)
        selected = scores["selected"]
        gap = selected - scores[best]
        verdict = "beats" if gap > 0 else "equals" if gap == 0 else "does NOT beat"
        print(
            f"{profile}: on the test set the selected blend ({selected:.5f}) {verdict} "
            f"the best run alone ({best}, {scores[best]:.5f})"
        )
    print(json.dumps({"oof": oof, "test": test}))


if __name__ == "__main__":
    run_main(main)
