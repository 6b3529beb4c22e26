"""RLE codec: round trips, orientation, the real annotations, and every malformed case."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from gitract.data.rle import RLEError, rle_decode, rle_decode_many, rle_encode

ROOT = Path(__file__).resolve().parents[1]
REAL_CSV = ROOT.parent / "shared" / "real" / "uwmgi_annotations_subset.csv"


@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (310, 360), (266, 266), (40, 3)])
@pytest.mark.parametrize("density", [0.0, 0.05, 0.5, 1.0])
def test_round_trip_random_masks(shape: tuple[int, int], density: float) -> None:
    rng = np.random.default_rng(hash((shape, density)) % 2**32)
    mask = (rng.random(shape) < density).astype(np.uint8)
    rle = rle_encode(mask)
    decoded = rle_decode(rle, shape)
    assert decoded.dtype == np.uint8
    assert decoded.shape == shape
    np.testing.assert_array_equal(decoded, mask)


def test_empty_mask_encodes_to_empty_string_and_back() -> None:
    assert rle_encode(np.zeros((5, 4), np.uint8)) == ""
    for empty in ("", "   ", None, float("nan")):
        assert not rle_decode(empty, (5, 4)).any()


def test_orientation_is_row_major_one_indexed_on_non_square_slice() -> None:
    # 360 wide x 310 high, as the file name slice_0001_360_310_1.50_1.50.png says.
    shape = (310, 360)
    assert np.argwhere(rle_decode("2 1", shape)).tolist() == [[0, 1]]
    assert np.argwhere(rle_decode("361 1", shape)).tolist() == [[1, 0]]
    mask = np.zeros(shape, np.uint8)
    mask[309, 359] = 1
    assert rle_encode(mask) == f"{310 * 360} 1"


def test_runs_crossing_row_ends_wrap_to_next_row() -> None:
    mask = rle_decode("3 4", (2, 4))
    np.testing.assert_array_equal(mask, [[0, 0, 1, 1], [1, 1, 0, 0]])


def test_adjacent_runs_decode_as_one_region() -> None:
    np.testing.assert_array_equal(rle_decode("1 2 3 2", (1, 5)), [[1, 1, 1, 1, 0]])


@pytest.mark.skipif(not REAL_CSV.exists(), reason="../shared/real annotations not present")
def test_every_real_annotation_round_trips_to_identical_string() -> None:
    df = pd.read_csv(REAL_CSV, keep_default_na=False)
    assert len(df) == 4479
    non_empty = 0
    for row in df.itertuples(index=False):
        mask = rle_decode(row.segmentation, (row.height, row.width))
        assert rle_encode(mask) == row.segmentation, row.id
        non_empty += bool(row.segmentation)
    assert non_empty > 1000


@pytest.mark.skipif(not REAL_CSV.exists(), reason="../shared/real annotations not present")
def test_real_non_square_stomach_is_one_piece_only_in_row_major() -> None:
    import cv2

    df = pd.read_csv(REAL_CSV, keep_default_na=False)
    rows = df[(df["class"] == "stomach") & (df.width == 360) & (df.segmentation != "")]
    assert len(rows) > 50
    pieces = []
    for row in rows.itertuples(index=False):
        mask = rle_decode(row.segmentation, (row.height, row.width))
        pieces.append(cv2.connectedComponents(mask)[0] - 1)
    assert np.median(pieces) == 1


@pytest.mark.parametrize(
    ("rle", "message"),
    [
        ("1 2 3", "odd number of tokens (3)"),
        ("1 2 x 4", "non-integer token 'x'"),
        ("1 2 3.5 4", "non-integer token '3.5'"),
        ("1 2 -3 4", "negative number '-3' in RLE (runs start at pixel 1)"),
        ("0 2", "start 0 < 1"),
        ("5 0", "length 0 < 1"),
        ("18 4", "run '18 4' ends at pixel 21, past the end of a 4x5 image (20 pixels)"),
        ("10 2 3 1", "run '3 1' is out of order"),
        ("1 5 4 2", "run '4 2' is out of order or overlaps the run before it ('1 5')"),
    ],
)
def test_malformed_rle_raises_named_error(rle: str, message: str) -> None:
    with pytest.raises(RLEError) as info:
        rle_decode(rle, (4, 5))
    assert message in str(info.value)
    assert isinstance(info.value, ValueError)
    assert "\n" not in str(info.value)


def test_encode_rejects_non_2d_mask() -> None:
    with pytest.raises(RLEError, match="2D mask"):
        rle_encode(np.zeros((2, 2, 3), np.uint8))


def test_decode_many_equals_one_by_one() -> None:
    rng = np.random.default_rng(3)
    shape = (31, 17)
    masks = [(rng.random(shape) < d).astype(np.uint8) for d in (0.0, 0.1, 0.6, 1.0, 0.3)]
    rles: list[object] = [rle_encode(m) for m in masks] + [float("nan"), None, ""]
    stack = rle_decode_many(rles, shape)
    assert stack.shape == (8, 31, 17) and stack.dtype == np.uint8
    for got, rle in zip(stack, rles, strict=True):
        np.testing.assert_array_equal(got, rle_decode(rle, shape))
    assert rle_decode_many([], shape).shape == (0, 31, 17)
    # Unusual spacing takes the one-by-one path and still decodes.
    np.testing.assert_array_equal(rle_decode_many([" 1  2\t"], (1, 4)), [[[1, 1, 0, 0]]])


@pytest.mark.parametrize(
    ("rles", "message"),
    [
        (["1 2", "19 3"], "run '19 3' ends at pixel 21, past the end"),  # would spill over
        (["1 2", "5 1 2 1"], "run '2 1' is out of order"),
        (["1 2", "0 1"], "start 0 < 1"),
        (["1 2", "1 2 3"], "odd number of tokens (3)"),
        (["1 x"], "non-integer token 'x'"),
        (["1 2"] * 1500 + ["1 x"], "non-integer token 'x'"),  # long: the byte-level check
        (["1 2"] * 1500 + ["1 +2"], "non-integer token '+2'"),
    ],
)
def test_decode_many_names_the_bad_string(rles: list[str], message: str) -> None:
    with pytest.raises(RLEError) as info:
        rle_decode_many(rles, (4, 5))
    assert message in str(info.value)
