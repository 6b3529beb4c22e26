"""Scoring a submission file against labels on disk, under one or more metric profiles."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from gitract.data.layout import read_csv_file, scan_images
from gitract.errors import DataError
from gitract.scoring.metrics import PROFILES, check_profile, competition_score

__all__ = ["SUBMISSION_COLUMNS", "read_labels", "score_profiles"]

SUBMISSION_COLUMNS = ("id", "class", "predicted")

# mle-bench's answers (private/test.csv): the truth in ``predicted``, and each slice's size.
_ANSWER_SIZE = ("image_height", "image_width")


def _case_day(ids: pd.Series) -> pd.Series:
    return ids.str.rsplit("_slice_", n=1).str[0]


def read_labels(path: Path) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """Labels as ``id,class,segmentation``, and slice shapes when the file carries them.

    Reads Kaggle's ``train.csv`` layout, and mle-bench's answers file (``id, class, predicted,
    image_width, image_height``: its truth column is named like a submission's)."""
    header = read_csv_file(path, ("id", "class"))
    if "segmentation" not in header.columns and "predicted" in header.columns:
        labels = header.rename(columns={"predicted": "segmentation"})
    else:
        labels = read_csv_file(path, ("id", "class", "segmentation"))
    shapes = None
    if all(col in labels.columns for col in _ANSWER_SIZE):
        sizes = labels[["id", *_ANSWER_SIZE]].drop_duplicates("id")
        try:
            shapes = pd.DataFrame(
                {
                    "id": sizes["id"],
                    "height": sizes["image_height"].astype(float).astype(int),
                    "width": sizes["image_width"].astype(float).astype(int),
                }
            )
        except ValueError as err:
            raise DataError(f"{path}: image_height/image_width must be integers ({err})") from None
    return labels, shapes


def score_profiles(
    submission_path: Path,
    data_dir: Path,
    labels_path: Path | None = None,
    profiles: Sequence[str] = PROFILES,
) -> dict[str, dict[str, float | int]]:
    """The score of ``submission_path`` under each profile: ``{profile: result}``.

    Labels default to ``data_dir/train.csv`` restricted to the case-days the submission covers
    (so an out-of-fold submission is scored on its fold); explicit ``labels_path`` (Kaggle's
    layout or mle-bench's answers) must be covered whole. Slice sizes come from the labels
    when they carry them (mle-bench's answers), else from the images under ``data_dir``."""
    for profile in profiles:
        check_profile(profile)
    submission = read_csv_file(submission_path, SUBMISSION_COLUMNS)
    extra = [str(c) for c in submission.columns if c not in SUBMISSION_COLUMNS]
    if extra:  # Kaggle's scorer would not read them: a wrong file, or a wrong column name
        raise DataError(
            f"{submission_path}: unexpected column(s) {', '.join(extra)}; a submission has "
            f"exactly {','.join(SUBMISSION_COLUMNS)}"
        )
    shapes = None
    if labels_path is None:
        labels = read_csv_file(data_dir / "train.csv", ("id", "class", "segmentation"))
        labels = labels[_case_day(labels["id"]).isin(set(_case_day(submission["id"])))]
        if labels.empty:
            raise DataError(
                f"{submission_path}: none of its case-days is in {data_dir / 'train.csv'}; "
                "give --labels for a test submission"
            )
    else:
        labels, shapes = read_labels(labels_path)
    if shapes is None:
        shapes = pd.concat([scan_images(data_dir / "train"), scan_images(data_dir / "test")])
    out = {}
    for profile in profiles:
        try:
            out[profile] = competition_score(
                submission, labels, shapes[["id", "height", "width"]], profile
            )
        except DataError as err:
            raise DataError(f"{submission_path}: {err}") from err
    return out
