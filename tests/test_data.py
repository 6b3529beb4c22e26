"""gitract.data.layout: the Kaggle layout, the slice table, and every bad-download error."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from gitract.data import layout as data
from gitract.data.layout import (
    CLASSES,
    SCAN_COLUMNS,
    DataError,
    SliceInfo,
    load_train_table,
    parse_slice_path,
    read_slice,
    resolve_data_dir,
    scan_images,
    slice_mask,
)
from gitract.data.rle import rle_encode

TABLE_COLUMNS = [*SCAN_COLUMNS, *CLASSES]


def _csv(tk) -> pd.DataFrame:
    return pd.read_csv(tk.train_csv, dtype=str, keep_default_na=False)


def _write_csv(tk, frame: pd.DataFrame) -> None:
    frame.to_csv(tk.train_csv, index=False)


def _one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


# --- file names and scanning -------------------------------------------------------------------


def test_parse_slice_path_reads_width_first():
    path = Path("/x/train/case123/case123_day20/scans/slice_0007_360_310_1.50_1.63.png")
    info = parse_slice_path(path)
    assert info == SliceInfo(
        case=123,
        day=20,
        slice=7,
        width=360,
        height=310,
        spacing_w=1.5,
        spacing_h=1.63,
        id="case123_day20_slice_0007",
    )


@pytest.mark.parametrize(
    ("rel", "expected"),
    [
        ("case1/case1_day0/scans/slice_01_266_266_1.50_1.50.png", "does not match"),
        ("case1/case1_day0/scans/slice_0001_266_266.png", "does not match"),
        ("case1/case1_day0/scans/image_0001_266_266_1.50_1.50.png", "does not match"),
        ("case1/case1_day0/slice_0001_266_266_1.50_1.50.png", "scans/ folder"),
        ("case1/day0/scans/slice_0001_266_266_1.50_1.50.png", "scans/ folder"),
        ("case2/case1_day0/scans/slice_0001_266_266_1.50_1.50.png", "inside case2, not case1"),
        ("case1/case1_day0/scans/slice_0001_0_266_1.50_1.50.png", "zero size"),
    ],
)
def test_parse_slice_path_rejects_bad_names(rel, expected):
    path = Path("/data/train") / rel
    with pytest.raises(DataError, match=expected) as exc:
        parse_slice_path(path)
    assert str(path) in _one_line(exc)


def test_scan_images(tiny_kaggle):
    frame = scan_images(tiny_kaggle.root / "train")
    assert list(frame.columns) == list(SCAN_COLUMNS)
    assert frame["id"].tolist() == tiny_kaggle.ids()  # TINY_LAYOUT is in case/day/slice order
    row = frame.set_index("id").loc["case1_day0_slice_0002"]
    assert (row["height"], row["width"]) == (310, 360)
    assert row["case_day"] == "case1_day0"
    assert (row["case"], row["day"], row["slice"]) == (1, 0, 2)
    assert Path(row["path"]) == tiny_kaggle.paths["case1_day0_slice_0002"]
    assert frame.set_index("id").loc["case2_day0_slice_0001", "spacing_h"] == pytest.approx(1.63)
    assert frame[["case", "day", "slice", "height", "width"]].dtypes.eq("int64").all()


def test_scan_images_sorts_numerically(make_tiny_kaggle):
    tk = make_tiny_kaggle(layout=[(10, 0, 1, 8, 6), (2, 11, 1, 8, 6), (2, 3, 12, 8, 6)])
    frame = scan_images(tk.root / "train")
    assert frame[["case", "day"]].drop_duplicates().values.tolist() == [[2, 3], [2, 11], [10, 0]]
    assert frame["slice"].tolist()[:12] == list(range(1, 13))


@pytest.mark.parametrize("make_dir", [False, True])
def test_scan_images_missing_or_empty_folder(tmp_path, make_dir):
    folder = tmp_path / "test"
    if make_dir:
        folder.mkdir()
    frame = scan_images(folder)
    assert frame.empty
    assert list(frame.columns) == list(SCAN_COLUMNS)


def test_scan_images_rejects_two_files_for_one_slice(tiny_kaggle):
    original = tiny_kaggle.paths["case1_day2_slice_0001"]
    clash = original.with_name("slice_0001_234_234_1.50_1.50.png")
    clash.write_bytes(original.read_bytes())
    with pytest.raises(DataError, match="share a slice id, e.g. case1_day2_slice_0001") as exc:
        scan_images(tiny_kaggle.root / "train")
    _one_line(exc)


def test_scan_images_names_a_badly_named_file(tiny_kaggle):
    bad = tiny_kaggle.root / "train/case1/case1_day0/scans/slice_1_360_310.png"
    bad.write_bytes(b"")
    with pytest.raises(DataError, match="slice_1_360_310.png"):
        scan_images(tiny_kaggle.root / "train")


# --- the train table ---------------------------------------------------------------------------


def test_load_train_table(tiny_kaggle):
    table = load_train_table(tiny_kaggle.root)
    assert list(table.columns) == TABLE_COLUMNS
    # case7_day0 is in DEFAULT_EXCLUDE; everything else is there, once, in case/day/slice order.
    expected = [i for i in tiny_kaggle.ids() if not i.startswith("case7_day0")]
    assert table["id"].tolist() == expected
    assert table.index.tolist() == list(range(len(expected)))
    for row in table.itertuples():
        mask = tiny_kaggle.masks[row.id]
        for k, name in enumerate(CLASSES):
            assert getattr(row, name) == rle_encode(mask[..., k])
    empty = table.set_index("id").loc["case1_day0_slice_0001", list(CLASSES)]
    assert empty.tolist() == ["", "", ""]


def test_load_train_table_exclude(tiny_kaggle):
    assert "case7_day0" in set(load_train_table(tiny_kaggle.root, exclude=())["case_day"])
    table = load_train_table(tiny_kaggle.root, exclude=["case1_day0", "case7_day0"])
    assert set(table["case_day"]) == {"case1_day2", "case2_day0", "case3_day5"}


def test_excluded_case_day_may_be_broken(tiny_kaggle):
    # A faulty excluded case-day (here: an image gone) must not fail the default load.
    tiny_kaggle.paths["case7_day0_slice_0002"].unlink()
    assert len(load_train_table(tiny_kaggle.root)) == len(tiny_kaggle.ids()) - 2
    with pytest.raises(DataError, match="case7_day0_slice_0002"):
        load_train_table(tiny_kaggle.root, exclude=())


def test_load_train_table_rejects_bad_exclude(tiny_kaggle):
    with pytest.raises(DataError, match="exclude entry 'case7-day0' is not a case-day"):
        load_train_table(tiny_kaggle.root, exclude=["case7-day0"])


def test_load_train_table_vectorized_order_independent(tiny_kaggle):
    # Rows of train.csv in any order give the same table (the join is a pivot, not a loop).
    ann = _csv(tiny_kaggle)
    before = load_train_table(tiny_kaggle.root)
    _write_csv(tiny_kaggle, ann.sample(frac=1.0, random_state=3))
    pd.testing.assert_frame_equal(load_train_table(tiny_kaggle.root), before)


def test_missing_train_csv(tiny_kaggle):
    tiny_kaggle.train_csv.unlink()
    with pytest.raises(DataError, match=r"train\.csv: file not found \(is the data dir") as e:
        load_train_table(tiny_kaggle.root)
    assert str(tiny_kaggle.train_csv) in _one_line(e)


def test_missing_column(tiny_kaggle):
    _write_csv(tiny_kaggle, _csv(tiny_kaggle).drop(columns=["segmentation"]))
    with pytest.raises(DataError, match=r"missing column\(s\) segmentation \(has: id, class") as e:
        load_train_table(tiny_kaggle.root)
    _one_line(e)


def test_a_missing_header_is_named_without_pasting_the_rle(tiny_kaggle):
    """Without its header line, the first row's cells (a long RLE among them) become the
    column names: the message shortens them and says what is likely wrong."""
    rle = " ".join(str(k) for k in range(1, 401))
    tiny_kaggle.train_csv.write_text(f"case1_day0_slice_0001,stomach,{rle}\n")
    with pytest.raises(DataError, match=r"missing column\(s\) id, class, segmentation") as e:
        load_train_table(tiny_kaggle.root)
    message = _one_line(e)
    assert message.endswith("; is its header line missing?")
    assert rle not in message and "stomach, 1 2 3 4 5 6 7 8 9 10 ...;" in message


def test_empty_train_csv(tiny_kaggle):
    tiny_kaggle.train_csv.write_text("")
    with pytest.raises(DataError, match="train.csv: file is empty"):
        load_train_table(tiny_kaggle.root)
    tiny_kaggle.train_csv.write_text("id,class,segmentation\n")
    with pytest.raises(DataError, match="no rows under the header"):
        load_train_table(tiny_kaggle.root)


def test_malformed_id_names_the_line(tiny_kaggle):
    ann = _csv(tiny_kaggle)
    ann.loc[4, "id"] = "case1_day0_slice_2"
    _write_csv(tiny_kaggle, ann)
    # Row 4 of the frame is line 6 of the file: the header is line 1.
    with pytest.raises(DataError, match=r"line 6: malformed id 'case1_day0_slice_2'") as exc:
        load_train_table(tiny_kaggle.root)
    assert "1 bad id(s)" in _one_line(exc)


def test_unknown_class_names_the_line(tiny_kaggle):
    ann = _csv(tiny_kaggle)
    ann.loc[7, "class"] = "liver"
    _write_csv(tiny_kaggle, ann)
    with pytest.raises(
        DataError, match=r"line 9 \(id case1_day0_slice_0003\): unknown class 'liver'"
    ):
        load_train_table(tiny_kaggle.root)


def test_duplicated_id_class_rows(tiny_kaggle):
    ann = _csv(tiny_kaggle)
    _write_csv(tiny_kaggle, pd.concat([ann, ann.iloc[[3]]], ignore_index=True))
    with pytest.raises(
        DataError,
        match=r"1 duplicated \(id, class\) row\(s\).*\(case1_day0_slice_0002, large_bowel\)",
    ):
        load_train_table(tiny_kaggle.root)


def test_id_missing_a_class_row(tiny_kaggle):
    ann = _csv(tiny_kaggle)
    drop = ann.index[(ann["id"] == "case2_day0_slice_0002") & (ann["class"] == "stomach")]
    _write_csv(tiny_kaggle, ann.drop(index=drop))
    with pytest.raises(DataError, match="1 id.*e.g. case2_day0_slice_0002 has no stomach row"):
        load_train_table(tiny_kaggle.root)


def test_ids_without_image(tiny_kaggle):
    for sid in ("case1_day2_slice_0001", "case3_day5_slice_0001", "case3_day5_slice_0002"):
        tiny_kaggle.paths[sid].unlink()
    tiny_kaggle.paths["case1_day0_slice_0004"].unlink()
    with pytest.raises(DataError, match="4 id.s. have no image under") as exc:
        load_train_table(tiny_kaggle.root)
    # The first few are named, the rest elided.
    assert "case1_day0_slice_0004, case1_day2_slice_0001, case3_day5_slice_0001, ..." in str(
        exc.value
    )


def test_images_without_annotation(tiny_kaggle):
    ann = _csv(tiny_kaggle)
    _write_csv(tiny_kaggle, ann[ann["id"] != "case2_day0_slice_0003"])
    with pytest.raises(DataError, match="1 image.s. have no annotation in") as exc:
        load_train_table(tiny_kaggle.root)
    assert str(tiny_kaggle.paths["case2_day0_slice_0003"]) in _one_line(exc)


# --- reading slices ----------------------------------------------------------------------------


def test_read_slice_is_raw_uint16_height_by_width(tiny_kaggle):
    sid = "case1_day0_slice_0002"
    table = load_train_table(tiny_kaggle.root).set_index("id")
    row = table.loc[sid]
    image = read_slice(row["path"], (row["height"], row["width"]))
    assert image.dtype == np.uint16
    assert image.shape == (310, 360)  # the name says 360 wide x 310 high
    np.testing.assert_array_equal(image, tiny_kaggle.images[sid])
    assert image.max() > 255  # 16-bit values survive (the default imread flag would cut them)


def test_slice_mask_orientation_on_non_square_slice(tiny_kaggle):
    sid = "case1_day0_slice_0003"  # index 2: large bowel and stomach, no small bowel
    row = load_train_table(tiny_kaggle.root).set_index("id").loc[sid]
    mask = slice_mask({**row.to_dict(), "id": sid})
    assert mask.dtype == np.uint8
    assert mask.shape == (310, 360, 3)
    np.testing.assert_array_equal(mask, tiny_kaggle.masks[sid])
    # The large bowel bar lies in the right half of the top rows: wider than the image is high,
    # so a column-major (transposed) decode could not have put it there.
    rows, cols = np.nonzero(mask[..., 0])
    assert cols.max() > 310 and rows.max() < 60
    assert mask[..., 2].sum() > 0 and mask[..., 1].sum() == 0
    image = read_slice(row["path"], (row["height"], row["width"]))
    assert image.shape == mask.shape[:2]


def test_slice_mask_empty_row():
    row = {"id": "x", "height": 4, "width": 6, **dict.fromkeys(CLASSES, "")}
    assert slice_mask(row).shape == (4, 6, 3)
    assert not slice_mask(row).any()


def test_slice_mask_bad_rle_names_id_and_class():
    row = {"id": "case1_day0_slice_0001", "height": 4, "width": 6, **dict.fromkeys(CLASSES, "")}
    row["small_bowel"] = "20 10"
    with pytest.raises(
        DataError, match="case1_day0_slice_0001 small_bowel: bad RLE: .*past the end"
    ):
        slice_mask(row)


def test_slice_mask_real_annotations_are_row_major(real_annotations):
    # Real 360x310 stomachs decode to one connected piece; this pins the orientation against
    # annotations nobody here wrote.
    real = real_annotations
    sel = real[(real["width"] == 360) & (real["class"] == "stomach") & (real["segmentation"] != "")]
    ids = sel["id"].unique()[:20]
    assert len(ids) > 0
    wide = real[real["id"].isin(ids)].pivot(index="id", columns="class", values="segmentation")
    pieces = []
    for sid, rles in wide.iterrows():
        mask = slice_mask({"id": sid, "height": 310, "width": 360, **rles.to_dict()})
        assert mask.shape == (310, 360, 3)
        pieces.append(cv2.connectedComponents(mask[..., 2])[0] - 1)
    assert np.median(pieces) == 1


def test_read_slice_wrong_shape_names_both(tiny_kaggle):
    path = tiny_kaggle.paths["case1_day0_slice_0001"]
    with pytest.raises(
        DataError, match="is 310 high x 360 wide but its file name says 360 high"
    ) as e:
        read_slice(path, (360, 310))
    assert str(path) in _one_line(e)


def test_read_slice_rejects_8_bit_png(tmp_path):
    path = tmp_path / "slice_0001_8_6_1.50_1.50.png"
    cv2.imwrite(str(path), np.full((6, 8), 200, dtype=np.uint8))
    with pytest.raises(DataError, match=r"expected a 16-bit grayscale PNG, got 8-bit grayscale"):
        read_slice(path)


def test_read_slice_rejects_colour_png(tmp_path):
    path = tmp_path / "rgb.png"
    cv2.imwrite(str(path), np.zeros((6, 8, 3), dtype=np.uint16))
    with pytest.raises(DataError, match="got 16-bit 3-channel"):
        read_slice(path)


def test_read_slice_truncated_png(tiny_kaggle):
    path = tiny_kaggle.paths["case1_day0_slice_0003"]
    data_bytes = path.read_bytes()
    path.write_bytes(data_bytes[: len(data_bytes) // 2])
    with pytest.raises(DataError, match="truncated PNG .*no IEND chunk") as exc:
        read_slice(path)
    assert str(path) in _one_line(exc)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "image not found"),
        (b"", "image file is empty"),
        (b"not a png at all", "not a PNG"),
        (b"\x89PNG\r\n\x1a\n" + b"\0" * 40 + b"IEND\xaeB`\x82", "corrupt PNG data"),
    ],
)
def test_read_slice_unreadable(tmp_path, content, expected):
    path = tmp_path / "slice_0001_8_6_1.50_1.50.png"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError, match=expected) as exc:
        read_slice(path)
    assert str(path) in _one_line(exc)


# --- data root ---------------------------------------------------------------------------------


def test_resolve_data_dir_precedence(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "KAGGLE_INPUT", tmp_path / "kaggle_input_absent")
    monkeypatch.delenv("GITRACT_DATA_DIR", raising=False)
    assert resolve_data_dir() == Path("data/synthetic")
    assert resolve_data_dir(cfg_root="cfg") == Path("cfg")
    monkeypatch.setenv("GITRACT_DATA_DIR", str(tmp_path / "env"))
    assert resolve_data_dir(cfg_root="cfg") == tmp_path / "env"
    assert resolve_data_dir("cli", cfg_root="cfg") == Path("cli")
    monkeypatch.setenv("GITRACT_DATA_DIR", "")  # set but empty counts as unset
    assert resolve_data_dir() == Path("data/synthetic")


def test_resolve_data_dir_prefers_kaggle_input_when_present(tmp_path, monkeypatch):
    kaggle = tmp_path / "uw-madison-gi-tract-image-segmentation"
    kaggle.mkdir()
    monkeypatch.setattr(data, "KAGGLE_INPUT", kaggle)
    monkeypatch.delenv("GITRACT_DATA_DIR", raising=False)
    assert resolve_data_dir() == kaggle
    assert resolve_data_dir(cfg_root="cfg") == Path("cfg")
