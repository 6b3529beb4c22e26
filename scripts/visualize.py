"""Draw truth and prediction overlays side by side, with the per-slice Dice along z.

    python scripts/visualize.py --submission S [--labels L] [--data-dir D]
                                [--case-day case123_day20 | --ids ID ...] [--out-dir DIR]

Without --case-day or --ids, the first case-day of the submission is drawn. Labels default to
the data's train.csv (right for out-of-fold submissions); pass the test labels for a test set.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from gitract.cli import run_main
from gitract.data.layout import read_csv_file, resolve_data_dir, scan_images
from gitract.errors import DataError
from gitract.scoring.visualize import plot_slices, rle_table


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--submission", required=True, help="id,class,predicted CSV")
    parser.add_argument("--labels", help="id,class,segmentation CSV (default: train.csv)")
    parser.add_argument("--data-dir", help="competition data folder (the images)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--case-day", help="e.g. case123_day20")
    which.add_argument("--ids", nargs="+", help="slice ids to draw")
    parser.add_argument("--out-dir", default="submissions/pictures", help="where PNGs go")
    parser.add_argument("--max-panels", type=int, default=4, help="slices drawn per picture")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    data_dir = resolve_data_dir(args.data_dir)
    submission = read_csv_file(Path(args.submission), ("id", "class", "predicted"))
    labels_path = Path(args.labels) if args.labels else data_dir / "train.csv"
    labels = read_csv_file(labels_path, ("id", "class", "segmentation"))
    images = pd.concat([scan_images(data_dir / "train"), scan_images(data_dir / "test")])
    if args.ids:
        slices = images[images["id"].isin(args.ids)]
        unknown = sorted(set(args.ids) - set(slices["id"]))
        if unknown:
            raise DataError(f"no image under {data_dir} for id(s) {', '.join(unknown[:3])}")
        name, panels = slices["case_day"].iloc[0] + "_ids", len(args.ids)
    else:
        case_day = args.case_day or submission["id"].iloc[0].rsplit("_slice_", 1)[0]
        slices = images[images["case_day"] == case_day]
        if slices.empty:
            raise DataError(f"no images of case-day {case_day!r} under {data_dir}")
        name, panels = case_day, args.max_panels
    ids = slices["id"].tolist()
    path = plot_slices(
        slices,
        truth=rle_table(labels, "segmentation", ids),
        pred=rle_table(submission, "predicted", ids),
        path=Path(args.out_dir) / f"{name}.png",
        max_panels=panels,
        title=f"{name}: truth | prediction ({Path(args.submission).name})",
    )
    print(f"picture: {path}")


if __name__ == "__main__":
    run_main(main)
