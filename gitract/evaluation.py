"""Scoring a submission file against labels on disk with the competition metric."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from gitract.data import read_csv_file, scan_images
from gitract.errors import DataError
from gitract.metrics import competition_score

__all__ = ["evaluate_submission"]


def _case_day(ids: pd.Series) -> pd.Series:
    return ids.str.rsplit("_slice_", n=1).str[0]


def evaluate_submission(
    submission_path: Path, data_dir: Path, labels_path: Path | None = None
) -> dict[str, float | int]:
    """The competition score of ``submission_path``.

    Labels default to ``data_dir/train.csv`` restricted to the case-days the submission covers
    (so an out-of-fold submission is scored on its fold); explicit ``labels_path`` must be
    covered whole. Slice sizes come from the images under ``data_dir`` (train/ and test/)."""
    submission = read_csv_file(submission_path, ("id", "class", "predicted"))
    if labels_path is None:
        labels = read_csv_file(data_dir / "train.csv", ("id", "class", "segmentation"))
        labels = labels[_case_day(labels["id"]).isin(set(_case_day(submission["id"])))]
        if labels.empty:
            raise DataError(
                f"{submission_path}: none of its case-days is in {data_dir / 'train.csv'}; "
                "give --labels for a test submission"
            )
    else:
        labels = read_csv_file(labels_path, ("id", "class", "segmentation"))
    shapes = pd.concat([scan_images(data_dir / "train"), scan_images(data_dir / "test")])
    try:
        return competition_score(submission, labels, shapes[["id", "height", "width"]])
    except DataError as err:
        raise DataError(f"{submission_path}: {err}") from err
