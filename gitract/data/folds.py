"""Cross-validation folds: StratifiedGroupKFold grouped by case, saved as a column in a CSV.

Grouping by case keeps every day of a patient in one fold: days of one case are scans of the
same anatomy, so splitting them would leak the validation patient into training and inflate
the score. Folds are data (``folds/folds.csv``), made once and reused by every run, so all
models of an ensemble agree on which slices each one never saw.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from gitract.atomic import atomic_path
from gitract.data.layout import CLASSES, DEFAULT_EXCLUDE, load_train_table, read_csv_file
from gitract.errors import DataError

__all__ = [
    "EMPTY_COLUMNS",
    "FOLD_COLUMNS",
    "create_folds_file",
    "fold_summary",
    "load_folds",
    "make_folds",
    "organ_label",
    "write_folds",
]

EMPTY_COLUMNS: tuple[str, ...] = tuple(f"empty_{c}" for c in CLASSES)
FOLD_COLUMNS: tuple[str, ...] = ("id", "case", "day", "slice", "fold", *EMPTY_COLUMNS)
_KEY_COLUMNS = ("id", "case", "day", "slice")


def _empty_flags(table: pd.DataFrame) -> pd.DataFrame:
    """True where a class's RLE is empty ("" or NaN, how an empty CSV cell may come back)."""
    flags = {}
    for name, column in zip(EMPTY_COLUMNS, CLASSES, strict=True):
        rle = table[column].fillna("").astype(str).str.strip()
        flags[name] = rle.eq("")
    return pd.DataFrame(flags, index=table.index)


def organ_label(table: pd.DataFrame) -> np.ndarray:
    """Per-slice stratification label: a bitmask of the non-empty classes, 0..7.

    Why this label: what a slice looks like to the model is which organs it shows together
    (none at all for ~57% of slices; the stomach mostly with bowel in upper slices, ...).
    Encoding the combination, rather than one class, balances all three classes and their
    co-occurrence at once, and 8 values stay few enough that every fold sees each common one.
    Bit k is set when ``CLASSES[k]`` is non-empty.
    """
    flags = ~_empty_flags(table).to_numpy()
    return (flags * (1 << np.arange(len(CLASSES)))).sum(axis=1).astype(np.int64)


def make_folds(table: pd.DataFrame, n_splits: int = 5, seed: int = 42) -> pd.DataFrame:
    """Assign each slice of ``table`` (load_train_table's output) to one of ``n_splits`` folds.

    Returns id, case, day, slice, fold and ``empty_<class>`` flags, sorted by case, day, slice.
    The input is sorted first, so the result depends only on the data and the seed.
    """
    missing = [c for c in (*_KEY_COLUMNS, *CLASSES) if c not in table.columns]
    if missing:
        raise DataError(f"slice table lacks column(s) {', '.join(missing)} needed for folds")
    if table.empty:
        raise DataError("slice table is empty: no labelled slices to split into folds")
    if isinstance(n_splits, bool) or not isinstance(n_splits, (int, np.integer)) or n_splits < 2:
        raise DataError(f"n_splits must be an integer >= 2, got {n_splits!r}")
    n_cases = int(table["case"].nunique())
    if n_splits > n_cases:
        raise DataError(
            f"n_splits={n_splits} exceeds the number of cases ({n_cases}): "
            "each fold needs at least one case"
        )
    if table["id"].duplicated().any():
        first = table.loc[table["id"].duplicated(), "id"].iloc[0]
        raise DataError(f"slice table has duplicated id {first}")

    table = table.sort_values(["case", "day", "slice"], ignore_index=True)
    labels = organ_label(table)
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    fold = np.full(len(table), -1, dtype=np.int64)
    with warnings.catch_warnings():
        # Rare organ combinations have fewer members than folds; with groups that is expected
        # and harmless (they are spread as well as the cases allow), so the warning is noise.
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        for k, (_, val_idx) in enumerate(splitter.split(table, labels, groups=table["case"])):
            fold[val_idx] = k
    return pd.concat([table[list(_KEY_COLUMNS)].assign(fold=fold), _empty_flags(table)], axis=1)


def fold_summary(folds: pd.DataFrame) -> pd.DataFrame:
    """Per fold: number of cases, slices and non-empty slices of each class (plus a total row)."""
    organs = folds[["case"]].assign(
        **{c: ~folds[e].astype(bool) for c, e in zip(CLASSES, EMPTY_COLUMNS, strict=True)}
    )

    def counts(part: pd.DataFrame) -> dict[str, int]:
        return {"cases": part["case"].nunique(), "slices": len(part), **part[list(CLASSES)].sum()}

    rows = {str(fold): counts(part) for fold, part in organs.groupby(folds["fold"])}
    summary = pd.DataFrame.from_dict({**rows, "all": counts(organs)}, orient="index")
    summary.index.name = "fold"
    return summary.astype("int64")


def write_folds(folds: pd.DataFrame, path: Path) -> None:
    """Write ``folds`` as CSV atomically (temp file in the same folder, then os.replace)."""
    with atomic_path(path) as tmp:
        folds.to_csv(tmp, index=False)


def create_folds_file(
    data_dir: Path,
    out: Path,
    n_splits: int = 5,
    seed: int = 42,
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
) -> pd.DataFrame:
    """Load the data set's train table, make folds and write them to ``out``; return the folds."""
    table = load_train_table(Path(data_dir), exclude=exclude)
    folds = make_folds(table, n_splits=n_splits, seed=seed)
    write_folds(folds, Path(out))
    return folds


def load_folds(path: Path, table: pd.DataFrame) -> pd.DataFrame:
    """Read ``folds.csv`` and return ``table`` with its ``fold`` column.

    The file must describe exactly the table's slices: a folds file from another data set (or
    made with another ``exclude`` list) would silently train on validation slices or skip some,
    so any mismatch is an error that says how to fix it.
    """
    path = Path(path)
    folds = read_csv_file(
        path, ("id", "fold"), "folds file", "; make it with scripts/make_folds.py"
    )
    fold = pd.to_numeric(folds["fold"], errors="coerce")
    bad = fold.isna() | (fold < 0) | (fold != fold.round())
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataError(
            f"{path}: line {i + 2} (id {folds['id'].iloc[i]}): fold {folds['fold'].iloc[i]!r} "
            "is not a non-negative integer"
        )
    folds = folds.assign(fold=fold.astype("int64"))
    dup = folds["id"].duplicated()
    if dup.any():
        raise DataError(
            f"{path}: {int(dup.sum())} duplicated id(s), e.g. {folds.loc[dup, 'id'].iloc[0]}"
        )

    hint = "regenerate it with scripts/make_folds.py for this data set"
    in_table = set(table["id"])
    in_folds = set(folds["id"])
    not_in_folds = sorted(in_table - in_folds)
    if not_in_folds:
        raise DataError(
            f"{path}: {len(not_in_folds)} of the data set's {len(in_table)} slices are missing "
            f"from the folds file, e.g. {not_in_folds[0]}; {hint}"
        )
    not_in_table = sorted(in_folds - in_table)
    if not_in_table:
        raise DataError(
            f"{path}: {len(not_in_table)} id(s) are not in the data set "
            f"({len(in_table)} slices), e.g. {not_in_table[0]}; {hint}"
        )

    merged = table.drop(columns=["fold"], errors="ignore").merge(
        folds[["id", "fold"]], on="id", how="left", validate="one_to_one"
    )
    per_case = merged.groupby("case")["fold"].nunique()
    if (per_case > 1).any():
        case = per_case.index[per_case.to_numpy() > 1][0]
        raise DataError(
            f"{path}: case{case} is split over several folds (leaks validation data); {hint}"
        )
    return merged
