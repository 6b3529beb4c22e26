"""Training Dice/IoU and the competition score (Dice + normalised 3D Hausdorff)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from gitract.data.layout import CLASSES
from gitract.data.rle import rle_encode
from gitract.errors import DataError
from gitract.scoring import metrics
from gitract.scoring.metrics import (
    SegMetricAccumulator,
    competition_score,
    dice_2d,
    dice_iou_per_class,
    hausdorff_3d,
)

SQRT3 = math.sqrt(3.0)
REAL = Path(__file__).resolve().parents[1].parent / "shared" / "real"
REAL_CSV = REAL / "uwmgi_annotations_subset.csv"


# ------------------------------------------------------------------------------------------
# Training metrics
# ------------------------------------------------------------------------------------------


def _hand_made_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """One image, 3 classes on 4x4: both empty / one empty / half overlap."""
    pred = torch.zeros(1, 3, 4, 4)
    true = torch.zeros(1, 3, 4, 4)
    # class 0: both empty -> Dice 1, IoU 1
    # class 1: prediction only -> 0, 0
    pred[0, 1, 0, 0] = 1
    # class 2: 4 predicted, 4 true, 2 shared -> Dice 2*2/8 = 0.5, IoU 2/6 = 1/3
    pred[0, 2, 0, 0:4] = 1
    true[0, 2, 0, 2:4] = 1
    true[0, 2, 1, 2:4] = 1
    return pred, true


def test_dice_iou_per_class_on_hand_made_masks():
    pred, true = _hand_made_batch()
    dice, iou = dice_iou_per_class(pred, true)
    assert dice.shape == iou.shape == (1, 3)
    torch.testing.assert_close(dice, torch.tensor([[1.0, 0.0, 0.5]]))
    torch.testing.assert_close(iou, torch.tensor([[1.0, 0.0, 1.0 / 3.0]]))
    # Truth only (the other "one empty" case) is 0 as well.
    dice, iou = dice_iou_per_class(true, pred)
    assert dice[0, 1] == 0 and iou[0, 1] == 0


def test_probabilities_are_thresholded_and_bool_masks_accepted():
    pred, true = _hand_made_batch()
    probs = pred * 0.6 + 0.2  # 0.8 where predicted, 0.2 elsewhere
    expected = dice_iou_per_class(pred, true)
    for got in (dice_iou_per_class(probs, true), dice_iou_per_class(pred.bool(), true.bool())):
        torch.testing.assert_close(got[0], expected[0])
        torch.testing.assert_close(got[1], expected[1])
    # A threshold above every probability predicts nothing: class 2 drops to 0, class 1 to 1.
    dice, _ = dice_iou_per_class(probs, true, threshold=0.9)
    torch.testing.assert_close(dice, torch.tensor([[1.0, 1.0, 0.0]]))


def test_iou_is_dice_over_two_minus_dice():
    gen = torch.Generator().manual_seed(0)
    probs = torch.rand(6, 3, 10, 12, generator=gen)
    true = (torch.rand(6, 3, 10, 12, generator=gen) > 0.6).float()
    true[0] = 0
    probs[0, 0] = 0  # one both-empty pair: 1 = 1 / (2 - 1)
    dice, iou = dice_iou_per_class(probs, true)
    torch.testing.assert_close(iou, dice / (2 - dice))


def test_dice_iou_per_class_rejects_mismatched_shapes_naming_both():
    with pytest.raises(ValueError, match=r"\(2, 3, 4, 4\).*\(2, 3, 4, 5\)"):
        dice_iou_per_class(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 5))


def test_accumulator_means_over_images_and_classes():
    pred, true = _hand_made_batch()
    acc = SegMetricAccumulator()
    acc.update(pred, true)
    acc.update(true, true)  # a perfect image: all ones
    out = acc.compute()
    expected_keys = {"dice", "iou"} | {f"{m}_{c}" for m in ("dice", "iou") for c in CLASSES}
    assert set(out) == expected_keys
    assert out["dice_large_bowel"] == pytest.approx(1.0)
    assert out["dice_small_bowel"] == pytest.approx(0.5)
    assert out["dice_stomach"] == pytest.approx(0.75)
    assert out["iou_stomach"] == pytest.approx((1 / 3 + 1) / 2)
    assert out["dice"] == pytest.approx((1.0 + 0.5 + 0.75) / 3)
    assert out["iou"] == pytest.approx((1.0 + 0.5 + 2 / 3) / 3)


def test_accumulator_batches_and_merged_shards_equal_one_pass():
    gen = torch.Generator().manual_seed(1)
    probs = torch.rand(10, 3, 8, 8, generator=gen)
    true = (torch.rand(10, 3, 8, 8, generator=gen) > 0.5).float()
    whole = SegMetricAccumulator()
    whole.update(probs, true)

    first, second = SegMetricAccumulator(), SegMetricAccumulator()
    first.update(probs[:3], true[:3])
    first.update(probs[3:6], true[3:6])
    second.update(probs[6:], true[6:])
    # What an all_reduce(SUM) of the states does across ranks:
    reduced = SegMetricAccumulator()
    reduced.load_state(first.state() + second.state())

    assert whole.state().dtype == torch.float64
    assert whole.state().shape == (7,)
    for acc in (reduced,):
        assert acc.count == 10
        for key, value in whole.compute().items():
            assert acc.compute()[key] == pytest.approx(value, abs=1e-12)


def test_accumulator_before_update_is_nan_and_reset_forgets():
    acc = SegMetricAccumulator()
    assert all(math.isnan(v) for v in acc.compute().values())
    acc.update(torch.ones(1, 3, 2, 2), torch.ones(1, 3, 2, 2))
    assert acc.compute()["dice"] == 1.0
    acc.reset()
    assert acc.count == 0 and math.isnan(acc.compute()["dice"])


def test_accumulator_rejects_wrong_channel_count_and_bad_state():
    acc = SegMetricAccumulator()
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\).*\(2, 2, 4, 4\)"):
        acc.update(torch.zeros(2, 2, 4, 4), torch.zeros(2, 2, 4, 4))
    with pytest.raises(ValueError, match="state of 5 values does not fit 3 classes"):
        acc.load_state(torch.zeros(5))


# ------------------------------------------------------------------------------------------
# Competition metric: Dice and 3D Hausdorff
# ------------------------------------------------------------------------------------------


def test_dice_2d():
    a = np.zeros((3, 5), dtype=bool)
    b = np.zeros((3, 5), dtype=bool)
    assert dice_2d(a, b) == 1.0
    a[0, :4] = True
    assert dice_2d(a, b) == 0.0
    b[0, 2:] = True  # |a| = 4, |b| = 3, shared 2
    assert dice_2d(a, b) == pytest.approx(4 / 7)
    assert dice_2d(a.astype(np.uint8), b.astype(np.uint8)) == pytest.approx(4 / 7)
    with pytest.raises(ValueError, match=r"\(3, 5\) and \(5, 3\)"):
        dice_2d(a, b.T)


def _brute_hausdorff(a: np.ndarray, b: np.ndarray) -> float:
    """All-pairs reference: normalised coordinates, max of the two directed distances."""
    scale = np.array(a.shape, dtype=np.float64)
    pa = np.argwhere(a) / scale
    pb = np.argwhere(b) / scale
    dist = np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1))
    return max(dist.min(1).max(), dist.min(0).max()) / SQRT3


@pytest.mark.parametrize(
    ("shape", "density", "seed"),
    [
        ((7, 9, 13), 0.05, 0),
        ((7, 9, 13), 0.3, 1),
        ((5, 12, 4), 0.02, 2),
        ((10, 6, 6), 0.1, 3),
        ((1, 8, 11), 0.1, 4),
        ((12, 3, 17), 0.01, 5),
        # Square slices (H == W): the OpenCV per-slice path; the others use scipy's.
        ((7, 11, 11), 0.05, 6),
        ((9, 13, 13), 0.01, 7),
        ((4, 10, 10), 0.4, 8),
        ((1, 8, 8), 0.1, 9),
        ((15, 1, 1), 0.2, 10),
    ],
)
def test_hausdorff_3d_equals_brute_force(shape, density, seed):
    rng = np.random.default_rng(seed)
    a = rng.random(shape) < density
    b = rng.random(shape) < density
    a.flat[rng.integers(a.size)] = True  # never empty
    b.flat[rng.integers(b.size)] = True
    expected = _brute_hausdorff(a, b)
    assert hausdorff_3d(a, b) == pytest.approx(expected, abs=1e-9)
    assert hausdorff_3d(a, b, crop=False) == pytest.approx(expected, abs=1e-9)
    assert hausdorff_3d(b, a) == pytest.approx(expected, abs=1e-9)  # symmetric


@pytest.mark.parametrize("path", ["_max_distance_planar", "_max_distance_ft"])
def test_both_distance_paths_equal_brute_force_on_many_random_masks(path):
    """Each path on its own (the public function picks one by the shape), including masks
    differing by one voxel and slices holding no voxel of the target."""
    max_distance = getattr(metrics, path)
    rng = np.random.default_rng(11)
    for _ in range(60):
        side = int(rng.integers(1, 12))
        shape = (int(rng.integers(1, 9)), side, side)
        density = 10 ** rng.uniform(-2, -0.3)
        a = rng.random(shape) < density
        b = rng.random(shape) < density
        if rng.random() < 0.3:
            b = a.copy()
            b[tuple(rng.integers(shape))] ^= True
        b.flat[rng.integers(b.size)] = True
        points = np.nonzero(a & ~b)
        if points[0].size == 0:
            continue
        spacing = tuple(1.0 / n for n in shape)
        pa = np.argwhere(a & ~b) * spacing
        pb = np.argwhere(b) * spacing
        expected = np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1)).min(1).max()
        assert max_distance(b, points, spacing) == pytest.approx(expected, abs=1e-12)


def test_directed_distance_above_a_floor_is_exact_and_below_it_stays_below():
    """``at_least`` (a distance the caller already has) and the ``planes`` cache: the result
    is the brute-force distance when that exceeds the floor, else at most the floor; the
    cache, filled by earlier masks, changes nothing."""
    rng = np.random.default_rng(12)
    planes: dict = {}
    for k in range(120):
        # Wider slices too, where a floor spans many pixels (the points it rules out are
        # filtered by a dilation before any distance is taken).
        side = int(rng.integers(2, 12) if k % 2 else rng.integers(12, 48))
        shape = (int(rng.integers(1, 9)), side, side)
        a = rng.random(shape) < 10 ** rng.uniform(-2, -0.3)
        b = rng.random(shape) < 10 ** rng.uniform(-2, -0.3)
        a.flat[rng.integers(a.size)] = b.flat[rng.integers(b.size)] = True
        spacing = tuple(1.0 / n for n in shape)
        pa = np.argwhere(a & ~b) * spacing
        pb = np.argwhere(b) * spacing
        true = np.sqrt(((pa[:, None] - pb[None]) ** 2).sum(-1)).min(1).max() if len(pa) else 0.0
        for floor in (0.0, true * 0.5, true, true * 1.5):
            got = metrics.directed_distance(a, b, spacing, planes, at_least=floor)
            if true > floor:
                assert got == pytest.approx(true, abs=1e-12)
            else:
                assert got <= floor + 1e-12
        if len(planes) > 200:
            planes.clear()


def test_a_floor_rules_out_only_points_surely_within_it():
    """A point k pixels from b's only voxel along rows and columns (k * sqrt(2) away) or along
    rows only (k away): a floor just below its distance must not rule it out, one above may;
    up to squares wider than the dilation's cap."""
    spacing = (1 / 3, 1 / 48, 1 / 48)
    for k in range(1, 24):
        for dy, dx in ((k, k), (k, 0)):
            a, b = np.zeros((2, 3, 48, 48), dtype=bool)
            b[1, 5, 5] = a[1, 5 + dy, 5 + dx] = True
            true = math.hypot(dy, dx) / 48
            got = metrics.directed_distance(a, b, spacing, at_least=true * (1 - 1e-6))
            assert got == pytest.approx(true, abs=1e-12), (dy, dx)
            assert metrics.directed_distance(a, b, spacing, at_least=true * 1.01) <= true * 1.01


@pytest.mark.parametrize("shape", [(9, 15, 15), (9, 15, 17)])
def test_hausdorff_3d_farthest_voxel_can_lie_inside_the_mask(shape):
    """A solid ball inside a hollow shell: the ball's centre is its voxel farthest from the
    shell, so looking only at the ball's surface would be wrong."""
    z, y, x = np.indices(shape)
    r = np.sqrt((z - 4) ** 2 + (y - 7) ** 2 + (x - 7) ** 2)
    ball, shell = r <= 2, (r >= 3.5) & (r <= 4.2)
    expected = _brute_hausdorff(ball, shell)
    assert hausdorff_3d(ball, shell) == pytest.approx(expected, abs=1e-9)
    assert hausdorff_3d(shell, ball) == pytest.approx(expected, abs=1e-9)


def test_hausdorff_3d_crop_gives_the_same_value_on_small_far_apart_blobs():
    rng = np.random.default_rng(7)
    for _ in range(5):
        a = np.zeros((20, 24, 30), dtype=bool)
        b = np.zeros_like(a)
        z, y, x = rng.integers(0, 15), rng.integers(0, 18), rng.integers(0, 24)
        a[z : z + 3, y : y + 4, x : x + 5] = True
        z, y, x = rng.integers(0, 15), rng.integers(0, 18), rng.integers(0, 24)
        b[z : z + 5, y : y + 2, x : x + 6] = True
        cropped, full = hausdorff_3d(a, b), hausdorff_3d(a, b, crop=False)
        assert cropped == pytest.approx(full, abs=1e-12)
        assert cropped == pytest.approx(_brute_hausdorff(a, b), abs=1e-9)


def test_hausdorff_3d_hand_made_cases():
    empty = np.zeros((6, 8, 10), dtype=bool)
    blob = empty.copy()
    blob[1:3, 2:5, 3:7] = True
    assert hausdorff_3d(empty, empty) is None
    assert hausdorff_3d(blob, empty) == 1.0
    assert hausdorff_3d(empty, blob) == 1.0
    assert hausdorff_3d(blob, blob) == 0.0
    for k in (1, 3):
        assert hausdorff_3d(blob, np.roll(blob, k, axis=0)) == pytest.approx(k / 6 / SQRT3)
        assert hausdorff_3d(blob, np.roll(blob, k, axis=1)) == pytest.approx(k / 8 / SQRT3)
        assert hausdorff_3d(blob, np.roll(blob, k, axis=2)) == pytest.approx(k / 10 / SQRT3)
    # Opposite corners: the largest distance there is, just under 1.
    a, b = empty.copy(), empty.copy()
    a[0, 0, 0] = b[-1, -1, -1] = True
    assert hausdorff_3d(a, b) == pytest.approx(
        math.sqrt((5 / 6) ** 2 + (7 / 8) ** 2 + 0.81) / SQRT3
    )


def test_hausdorff_3d_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\(2, 3, 4\) and \(2, 4, 3\)"):
        hausdorff_3d(np.ones((2, 3, 4)), np.ones((2, 4, 3)))
    with pytest.raises(ValueError, match=r"\(3, 4\)"):
        hausdorff_3d(np.ones((3, 4)), np.ones((3, 4)))


# ------------------------------------------------------------------------------------------
# competition_score
# ------------------------------------------------------------------------------------------


def _mask(shape: tuple[int, int], *pixels: tuple[int, int]) -> str:
    mask = np.zeros(shape, dtype=np.uint8)
    for r, c in pixels:
        mask[r, c] = 1
    return rle_encode(mask)


def _tiny_case() -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Two volumes with known Dice and Hausdorff (see test_competition_score_known_value)."""
    shapes = {"case1_day0": (4, 6), "case2_day3": (5, 3)}
    ids = {
        "case1_day0": ["case1_day0_slice_0001", "case1_day0_slice_0002"],
        # Unsorted and with gaps: the volume is stacked by slice number, D = 3.
        "case2_day3": ["case2_day3_slice_0010", "case2_day3_slice_0002", "case2_day3_slice_0005"],
    }
    truth: dict[tuple[str, str], str] = {}
    pred: dict[tuple[str, str], str] = {}
    hw = shapes["case1_day0"]
    truth["case1_day0_slice_0001", "large_bowel"] = _mask(hw, (1, 1))
    pred["case1_day0_slice_0001", "large_bowel"] = _mask(hw, (1, 1))
    truth["case1_day0_slice_0001", "small_bowel"] = _mask(hw, (0, 0))
    pred["case1_day0_slice_0001", "small_bowel"] = _mask(hw, (0, 3))  # 3 of 6 columns away
    hw = shapes["case2_day3"]
    truth["case2_day3_slice_0002", "stomach"] = _mask(hw, (0, 0))
    pred["case2_day3_slice_0010", "stomach"] = _mask(hw, (0, 0))  # 2 of 3 slices away

    label_rows, sub_rows, shape_rows = [], [], []
    for case_day, slice_ids in ids.items():
        height, width = shapes[case_day]
        for id_ in slice_ids:
            shape_rows.append({"id": id_, "height": height, "width": width})
            for cls in CLASSES:
                label_rows.append(
                    {"id": id_, "class": cls, "segmentation": truth.get((id_, cls), "")}
                )
                sub_rows.append({"id": id_, "class": cls, "predicted": pred.get((id_, cls), "")})
    sub = pd.DataFrame(sub_rows).sample(frac=1.0, random_state=0)  # row order must not matter
    return sub, pd.DataFrame(label_rows), pd.DataFrame(shape_rows)


def test_competition_score_known_value():
    sub, labels, shapes = _tiny_case()
    out = competition_score(sub, labels, shapes)
    hd_small = 0.5 / SQRT3  # 3 columns of 6
    hd_stomach = (2 / 3) / SQRT3  # 2 slices of 3
    dice = 12 / 15  # wrong rows: small_bowel slice 1, stomach slices 2 and 10
    hausdorff = (0.0 + hd_small + hd_stomach) / 3
    assert out["n_rows"] == 15
    assert out["n_volumes"] == 3  # 6 volumes, 3 of them empty on both sides
    assert out["dice"] == pytest.approx(dice)
    assert out["hausdorff"] == pytest.approx(hausdorff)
    assert out["score"] == pytest.approx(0.4 * dice + 0.6 * (1 - hausdorff))
    assert out["dice_large_bowel"] == pytest.approx(1.0)
    assert out["dice_small_bowel"] == pytest.approx(0.8)
    assert out["dice_stomach"] == pytest.approx(0.6)
    assert out["hausdorff_large_bowel"] == pytest.approx(0.0)
    assert out["hausdorff_small_bowel"] == pytest.approx(hd_small)
    assert out["hausdorff_stomach"] == pytest.approx(hd_stomach)
    expected_keys = {"score", "dice", "hausdorff", "n_rows", "n_volumes"} | {
        f"{m}_{c}" for m in ("dice", "hausdorff") for c in CLASSES
    }
    classic = {"pixel_accuracy", "mean_pixel_accuracy", "miou"} | {
        f"{m}_{c}" for m in ("pixel_accuracy", "mean_pixel_accuracy", "iou") for c in CLASSES
    }
    assert set(out) == expected_keys | classic


def test_competition_score_perfect_and_nan_cells():
    sub, labels, shapes = _tiny_case()
    perfect = labels.rename(columns={"segmentation": "predicted"})
    perfect["predicted"] = perfect["predicted"].replace("", np.nan)  # how pandas reads ""
    out = competition_score(perfect, labels, shapes)
    assert out["score"] == 1.0 and out["dice"] == 1.0 and out["hausdorff"] == 0.0


def test_competition_score_all_empty_has_no_hausdorff_volumes():
    _, labels, shapes = _tiny_case()
    labels["segmentation"] = ""
    sub = labels.rename(columns={"segmentation": "predicted"})
    out = competition_score(sub, labels, shapes)
    assert out["n_volumes"] == 0
    assert out["score"] == 1.0 and out["hausdorff_stomach"] == 0.0


def test_missing_ids_raise_naming_count_and_example():
    sub, labels, shapes = _tiny_case()
    sub = sub[sub["id"] != "case2_day3_slice_0005"]
    with pytest.raises(DataError, match=r"lacks 3 labelled .*case2_day3_slice_0005"):
        competition_score(sub, labels, shapes)


def test_extra_ids_raise_naming_count_and_example():
    sub, labels, shapes = _tiny_case()
    extra = pd.DataFrame([{"id": "case9_day1_slice_0001", "class": "stomach", "predicted": ""}])
    with pytest.raises(DataError, match=r"has 1 \(id, class\) rows not in the labels.*case9_day1"):
        competition_score(pd.concat([sub, extra]), labels, shapes)


def _drop_one_label(sub, lab, shapes):
    gone = (lab["id"] == "case1_day0_slice_0002") & (lab["class"] == "stomach")
    return sub, lab[~gone], shapes


BAD_TABLES = {
    "no predicted": (
        lambda sub, lab, shp: (sub.drop(columns="predicted"), lab, shp),
        r"submission lacks column.*predicted",
    ),
    "no class": (
        lambda sub, lab, shp: (sub, lab.rename(columns={"class": "c"}), shp),
        r"labels lacks column.*class",
    ),
    "no width": (
        lambda sub, lab, shp: (sub, lab, shp.drop(columns="width")),
        r"slice shapes lacks column.*width",
    ),
    "no labels": (lambda sub, lab, shp: (sub, lab.iloc[:0], shp), "labels have no rows"),
    "no shape": (
        lambda sub, lab, shp: (sub, lab, shp.iloc[1:]),
        r"slice shapes lack ids: 1 \(e.g. case1_day0_slice_0001",
    ),
    "duplicate": (
        lambda sub, lab, shp: (pd.concat([sub, sub.iloc[:1]]), lab, shp),
        r"submission has 2 duplicated \['id', 'class'\] rows",
    ),
    "bad class": (
        lambda sub, lab, shp: (sub, lab.replace({"class": {"stomach": "liver"}}), shp),
        r"labels has class\(es\) \['liver'\]",
    ),
    "incomplete labels": (
        _drop_one_label,
        r"labels: ids without a row for each of .*case1_day0_slice_0002",
    ),
}


@pytest.mark.parametrize("case", list(BAD_TABLES))
def test_bad_tables_raise_data_error(case):
    change, message = BAD_TABLES[case]
    sub, labels, shapes = change(*_tiny_case())
    with pytest.raises(DataError, match=message):
        competition_score(sub, labels, shapes)


def test_malformed_ids_and_mixed_sizes_raise():
    sub, labels, shapes = _tiny_case()
    rename = {"case1_day0_slice_0001": "case1_day0_s1"}
    with pytest.raises(DataError, match=r"not of the form.*case1_day0_s1"):
        competition_score(sub.replace(rename), labels.replace(rename), shapes.replace(rename))
    shapes.loc[shapes["id"] == "case1_day0_slice_0002", "width"] = 7
    with pytest.raises(DataError, match=r"case1_day0: slices of different sizes"):
        competition_score(sub, labels, shapes)


def test_bad_rle_in_submission_names_id_and_class():
    sub, labels, shapes = _tiny_case()
    row = (sub["id"] == "case1_day0_slice_0002") & (sub["class"] == "small_bowel")
    sub.loc[row, "predicted"] = "5 x"
    with pytest.raises(DataError, match=r"submission: id case1_day0_slice_0002 class small_bowel"):
        competition_score(sub, labels, shapes)
    sub.loc[row, "predicted"] = "20 10"  # past the end of a 4x6 slice
    with pytest.raises(DataError, match=r"past the end of a 4x6 image"):
        competition_score(sub, labels, shapes)


@pytest.mark.skipif(not REAL_CSV.exists(), reason="real annotations (../shared/real) absent")
def test_competition_score_on_real_annotations():
    real = pd.read_csv(REAL_CSV)
    shapes = real[["id", "height", "width"]]
    labels = real[["id", "class", "segmentation"]]
    perfect = labels.rename(columns={"segmentation": "predicted"})
    out = competition_score(perfect, labels, shapes)
    assert out["score"] == pytest.approx(1.0)
    assert out["n_rows"] == len(real)

    # An all-empty submission: Dice is the share of empty rows, every counted volume scores 1.
    empty = perfect.assign(predicted="")
    out = competition_score(empty, labels, shapes)
    assert out["dice"] == pytest.approx(real["segmentation"].isna().mean())
    assert out["hausdorff"] == 1.0
    assert out["n_volumes"] > 0
