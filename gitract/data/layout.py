"""The competition's file layout: scan image folders, join ``train.csv``, read slices and masks.

Everything downstream (folds, datasets, inference) works from one table with a row per slice,
so this module is where a bad Kaggle download is caught: each problem raises a one-line
:class:`~gitract.errors.DataError` naming the file, row or id, instead of a numpy traceback an
hour into training.

Two facts of the data shape the code: image file names carry the size
WIDTH first (``slice_0001_360_310_1.50_1.50.png`` is an array of shape (310, 360)), and the
images are 16-bit grayscale PNGs that must be read with ``cv2.IMREAD_UNCHANGED``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from gitract.data.rle import bad_rle_rows, rle_decode, rle_tokens
from gitract.errors import DataError, RLEError

__all__ = [
    "CLASSES",
    "DEFAULT_EXCLUDE",
    "KAGGLE_INPUT",
    "SCAN_COLUMNS",
    "DataError",
    "SliceInfo",
    "load_train_table",
    "parse_slice_path",
    "read_csv_file",
    "read_slice",
    "resolve_data_dir",
    "scan_images",
    "slice_mask",
]

CLASSES: tuple[str, str, str] = ("large_bowel", "small_bowel", "stomach")
# The two case-days the hosts flagged as badly annotated; nearly every public solution drops them.
DEFAULT_EXCLUDE: tuple[str, ...] = ("case7_day0", "case81_day30")
KAGGLE_INPUT = Path("/kaggle/input/uw-madison-gi-tract-image-segmentation")
SYNTHETIC_DIR = Path("data/synthetic")

# scan_images' columns and their dtypes: a slice's ids, its file, and size and pixel spacing
# from the file's name.
_SCAN_DTYPES: dict[str, object] = {
    "id": object, "case": "int64", "day": "int64", "case_day": object, "slice": "int64",
    "path": object, "height": "int64", "width": "int64", "spacing_h": "float64",
    "spacing_w": "float64",
}  # fmt: skip
SCAN_COLUMNS: tuple[str, ...] = tuple(_SCAN_DTYPES)
_CSV_COLUMNS = ("id", "class", "segmentation")
_FIRST_FEW = 3  # how many offending ids an error message names

_FILE_RE = re.compile(
    r"slice_(?P<slice>\d{4})_(?P<w>\d+)_(?P<h>\d+)_(?P<pw>\d+(?:\.\d+)?)_(?P<ph>\d+(?:\.\d+)?)\.png"
)
_CASE_DAY_RE = re.compile(r"case(?P<case>\d+)_day(?P<day>\d+)")
_ID_RE = r"case\d+_day\d+_slice_\d{4}"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_TRAILER = b"IEND\xaeB`\x82"  # the IEND chunk type and its CRC: the last 8 bytes of a PNG


def resolve_data_dir(cli: str | Path | None = None, cfg_root: str | Path | None = None) -> Path:
    """Pick the data root: ``--data-dir`` > env ``GITRACT_DATA_DIR`` > config ``data.root`` >
    the Kaggle input folder if it exists > ``data/synthetic``.

    The Kaggle fallback is what lets the same command run unchanged inside a Kaggle kernel.
    """
    for candidate in (cli, os.environ.get("GITRACT_DATA_DIR"), cfg_root):
        if candidate is not None and str(candidate).strip():
            return Path(candidate)
    if KAGGLE_INPUT.is_dir():
        return KAGGLE_INPUT
    return SYNTHETIC_DIR


@dataclass(frozen=True)
class SliceInfo:
    """What an image's path says about it: ids, size (from the name, width first) and spacing."""

    case: int
    day: int
    slice: int
    width: int
    height: int
    spacing_w: float
    spacing_h: float
    id: str


def parse_slice_path(path: Path) -> SliceInfo:
    """Parse ``.../case{N}/case{N}_day{D}/scans/slice_{ZZZZ}_{W}_{H}_{PW}_{PH}.png``.

    The case and day come from the ``case{N}_day{D}`` folder, as in the Kaggle layout; a file
    that does not fit the layout raises :class:`DataError` naming it.
    """
    path = Path(path)
    name = _FILE_RE.fullmatch(path.name)
    if name is None:
        raise DataError(
            f"{path}: image file name does not match slice_ZZZZ_W_H_PW_PH.png "
            "(e.g. slice_0001_266_266_1.50_1.50.png)"
        )
    scans, case_day_dir = path.parent, path.parent.parent
    case_day = _CASE_DAY_RE.fullmatch(case_day_dir.name)
    if scans.name != "scans" or case_day is None:
        raise DataError(f"{path}: image is not in a case{{N}}_day{{D}}/scans/ folder")
    case, day = int(case_day["case"]), int(case_day["day"])
    case_dir = case_day_dir.parent.name
    if case_dir.startswith("case") and case_dir != f"case{case}":
        raise DataError(f"{path}: folder {case_day_dir.name} is inside {case_dir}, not case{case}")
    width, height = int(name["w"]), int(name["h"])
    if width == 0 or height == 0:
        raise DataError(f"{path}: image file name gives a zero size {width}x{height}")
    number = int(name["slice"])
    return SliceInfo(
        case=case,
        day=day,
        slice=number,
        width=width,
        height=height,
        spacing_w=float(name["pw"]),
        spacing_h=float(name["ph"]),
        id=f"case{case}_day{day}_slice_{number:04d}",
    )


def _first_few(values: Iterable[str]) -> str:
    values = list(values)
    shown = ", ".join(values[:_FIRST_FEW])
    return shown + (", ..." if len(values) > _FIRST_FEW else "")


def scan_images(image_dir: Path) -> pd.DataFrame:
    """One row per PNG under ``image_dir`` (``train/`` or ``test/``), sorted by case, day, slice.

    A missing or empty folder gives an empty frame with the same columns: the public Kaggle
    kernel's ``test/`` is empty, and inference must still run.
    """
    image_dir = Path(image_dir)
    paths = image_dir.rglob("*.png") if image_dir.is_dir() else []
    rows = []
    for path in paths:
        info = parse_slice_path(path)
        rows.append(
            {**asdict(info), "case_day": f"case{info.case}_day{info.day}", "path": str(path)}
        )
    frame = pd.DataFrame(rows, columns=list(SCAN_COLUMNS)).astype(_SCAN_DTYPES)
    dup = frame["id"].duplicated(keep=False)
    if dup.any():
        first = frame.loc[dup, "id"].iloc[0]
        paths = sorted(frame.loc[frame["id"] == first, "path"])
        raise DataError(
            f"{image_dir}: {int(dup.sum())} image files share a slice id, e.g. {first}: "
            + " and ".join(paths[:2])
        )
    return frame.sort_values(["case", "day", "slice"], ignore_index=True)


def read_csv_file(
    path: str | Path, columns: Sequence[str], what: str = "file", hint: str = ""
) -> pd.DataFrame:
    """Read a CSV the user handed us, every cell a string (an empty cell stays ``""``, which
    is how train.csv and submissions spell an empty mask).

    A missing, empty or unparsable file, or a missing column, is a one-line DataError naming
    the file; ``what`` names the kind of file and ``hint`` says how to get a right one."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: {what} not found{hint}")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: {what} is empty (expected columns {','.join(columns)})") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{path}: cannot parse {what} as CSV: {detail}") from None
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        # Without a header line the first row's cells (an RLE string...) become the names.
        shown = ", ".join(_shorten(str(c)) for c in frame.columns)
        no_header = not set(columns) & set(map(str, frame.columns))
        raise DataError(
            f"{path}: missing column(s) {', '.join(missing)} "
            f"(has: {shown}; expected {','.join(columns)})"
            + ("; is its header line missing?" if no_header else "")
        )
    return frame


def _shorten(text: str, limit: int = 24) -> str:
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def _read_annotations(csv_path: Path) -> pd.DataFrame:
    """``train.csv``'s rows; an empty file, malformed ids, unknown classes and duplicates are
    refused, naming the CSV line (header = 1)."""
    ann = read_csv_file(csv_path, _CSV_COLUMNS, hint=" (is the data dir right?)")
    if ann.empty:
        raise DataError(f"{csv_path}: no rows under the header (an empty train.csv)")
    line = ann.index.to_numpy() + 2
    bad_id = ~ann["id"].str.fullmatch(_ID_RE)
    if bad_id.any():
        i = int(np.flatnonzero(bad_id.to_numpy())[0])
        raise DataError(
            f"{csv_path}: line {line[i]}: malformed id {ann['id'].iloc[i]!r} "
            f"(expected case{{N}}_day{{D}}_slice_{{ZZZZ}}; {int(bad_id.sum())} bad id(s) in all)"
        )
    bad_class = ~ann["class"].isin(CLASSES)
    if bad_class.any():
        i = int(np.flatnonzero(bad_class.to_numpy())[0])
        raise DataError(
            f"{csv_path}: line {line[i]} (id {ann['id'].iloc[i]}): unknown class "
            f"{ann['class'].iloc[i]!r}; expected one of {', '.join(CLASSES)}"
        )
    dup = ann.duplicated(["id", "class"], keep="first")
    if dup.any():
        i = int(np.flatnonzero(dup.to_numpy())[0])
        raise DataError(
            f"{csv_path}: {int(dup.sum())} duplicated (id, class) row(s), first at line "
            f"{line[i]}: ({ann['id'].iloc[i]}, {ann['class'].iloc[i]})"
        )
    bad_rle = bad_rle_rows(ann["segmentation"].tolist())
    if bad_rle.any():
        i = int(np.flatnonzero(bad_rle)[0])
        try:
            rle_tokens(ann["segmentation"].iloc[i])
            detail = "not pairs of numbers"  # not reached: the parser names the bad token
        except RLEError as err:
            detail = str(err)
        raise DataError(
            f"{csv_path}: line {line[i]} (id {ann['id'].iloc[i]}, class "
            f"{ann['class'].iloc[i]}): bad RLE: {detail}"
        )
    return ann[list(_CSV_COLUMNS)]


def _check_exclude(exclude: Sequence[str]) -> set[str]:
    if isinstance(exclude, str):  # a lone string would otherwise be read letter by letter
        exclude = [exclude]
    for entry in exclude:
        if not _CASE_DAY_RE.fullmatch(str(entry)):
            raise DataError(f"exclude entry {entry!r} is not a case-day like case7_day0")
    return set(map(str, exclude))


def load_train_table(data_dir: Path, exclude: Sequence[str] = DEFAULT_EXCLUDE) -> pd.DataFrame:
    """Join ``train.csv`` with the images under ``train/``: one row per slice.

    Columns: the :data:`SCAN_COLUMNS` then one column per class in :data:`CLASSES` order holding
    the RLE string (``""`` for an empty mask). Case-days in ``exclude`` are dropped before
    anything is matched, so a faulty excluded case-day cannot fail the checks.
    """
    data_dir = Path(data_dir)
    csv_path = data_dir / "train.csv"
    excluded = _check_exclude(exclude)
    ann = _read_annotations(csv_path)

    # The long format (3 rows per slice) becomes one row per slice with a column per class.
    wide = ann.pivot(index="id", columns="class", values="segmentation")
    wide = wide.reindex(columns=list(CLASSES))
    lacking = wide.isna()
    if lacking.to_numpy().any():
        rows = lacking.any(axis=1)
        first = rows.idxmax()
        missing = [c for c in CLASSES if lacking.at[first, c]]
        raise DataError(
            f"{csv_path}: {int(rows.sum())} id(s) lack a row for some class, e.g. {first} "
            f"has no {', '.join(missing)} row (every slice needs one row per class)"
        )
    wide.columns.name = None
    wide = wide.reset_index()
    wide_case_day = wide["id"].str.replace(r"_slice_\d{4}$", "", regex=True)
    wide = wide[~wide_case_day.isin(excluded)]

    image_dir = data_dir / "train"
    images = scan_images(image_dir)
    images = images[~images["case_day"].isin(excluded)]

    no_image = sorted(set(wide["id"]) - set(images["id"]))
    if no_image:
        raise DataError(
            f"{csv_path}: {len(no_image)} id(s) have no image under {image_dir}: "
            f"{_first_few(no_image)}"
        )
    no_label = images.loc[~images["id"].isin(wide["id"]), "path"].tolist()
    if no_label:
        raise DataError(
            f"{image_dir}: {len(no_label)} image(s) have no annotation in {csv_path}: "
            f"{_first_few(no_label)}"
        )
    table = images.merge(wide, on="id", how="inner", validate="one_to_one")
    return table.sort_values(["case", "day", "slice"], ignore_index=True)


def _png_framing(data: np.ndarray) -> str | None:
    """What is wrong with a file's first and last bytes for a PNG, or None if nothing."""
    if data.size == 0:
        return "image file is empty (0 bytes)"
    if data[: len(_PNG_SIGNATURE)].tobytes() != _PNG_SIGNATURE:
        return "unreadable image (not a PNG: wrong file signature)"
    if data[-len(_PNG_TRAILER) :].tobytes() != _PNG_TRAILER:
        return f"truncated PNG ({data.size} bytes, no IEND chunk at the end); re-download it"
    return None


def read_slice(path: str | Path, expected_hw: tuple[int, int] | None = None) -> np.ndarray:
    """Read a slice as its raw uint16 (H, W) array, refusing anything else.

    ``IMREAD_UNCHANGED`` keeps the 16-bit values (the default flag would cut them to 8 bits).
    ``expected_hw`` is the (height, width) from the file name; a mismatch means the name or
    the file is wrong, and masks decoded at the named size would not line up.
    """
    path = Path(path)
    try:
        buffer = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        if not path.exists():
            raise DataError(f"{path}: image not found") from None
        if path.is_dir():
            raise DataError(f"{path}: is a folder, not an image") from None
        raise DataError(f"{path}: cannot open image ({exc.strerror or exc})") from None
    # libpng reports a truncated file on stderr itself ("libpng error: Read Error"), which
    # would break the one-line error: check the PNG's first and last bytes before decoding.
    problem = _png_framing(buffer)
    image = None if problem else cv2.imdecode(buffer, cv2.IMREAD_UNCHANGED)
    if image is None:
        raise DataError(f"{path}: {problem or 'unreadable image (corrupt PNG data)'}")
    if image.dtype != np.uint16 or image.ndim != 2:
        channels = "grayscale" if image.ndim == 2 else f"{image.shape[2]}-channel"
        raise DataError(
            f"{path}: expected a 16-bit grayscale PNG, got {image.dtype.itemsize * 8}-bit "
            f"{channels} ({image.dtype}, shape {image.shape})"
        )
    if expected_hw is not None and tuple(image.shape) != tuple(expected_hw):
        raise DataError(
            f"{path}: image is {image.shape[0]} high x {image.shape[1]} wide but its file name "
            f"says {expected_hw[0]} high x {expected_hw[1]} wide"
        )
    return image


def slice_mask(row: Mapping) -> np.ndarray:
    """Decode a table row's three RLE columns into a uint8 (H, W, 3) mask in CLASSES order."""
    shape = (int(row["height"]), int(row["width"]))
    mask = np.zeros((*shape, len(CLASSES)), dtype=np.uint8)
    for channel, name in enumerate(CLASSES):
        try:
            mask[..., channel] = rle_decode(row[name], shape)
        except RLEError as exc:
            raise DataError(f"{row.get('id', '?')} {name}: bad RLE: {exc}") from None
    return mask
