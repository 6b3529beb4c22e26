"""A synthetic data set in the exact Kaggle layout, so the pipeline runs end to end offline.

Each case-day is a 3D volume rendered with numpy on a coordinate grid: an elliptical body on a
dark background, a stomach (a lobed ellipsoid in the upper part of the volume), a large bowel
(a thick tube along a frame-like path around the abdomen) and a cluster of small-bowel loops
(thinner tubes in the centre), plus liver, kidneys and spine as distractors. Organs move
smoothly from slice to slice, differ between cases (anatomy) and days (jitter, filling), and
are confined to the middle of the volume, so that about half the slices show no organ at all,
as in the real data. Intensities are 16-bit like the real MRI (body a few thousand, maximum
~10,000-16,000) under a smooth multiplicative bias field and Rician noise.

Shapes are signed distance fields evaluated on a coarse grid (a third of the resolution) and
upsampled bilinearly: boundaries come out smooth, and the label masks (field < 0) and the image
(blended by the same field) agree to the pixel. The layout, the file names (width first), the
CSV formats and the 1-indexed row-major RLE are the competition's (README.md, "The data").
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from scipy.interpolate import CubicSpline

from gitract.atomic import write_text_atomic
from gitract.data.layout import CLASSES, DEFAULT_EXCLUDE
from gitract.data.rle import rle_encode
from gitract.errors import ConfigError, DataError

__all__ = [
    "DEFAULT_CASES",
    "DEFAULT_SEED",
    "DEFAULT_SLICES",
    "MARKER",
    "SIZES",
    "SyntheticSummary",
    "generate",
    "short_day_slices",
]

DEFAULT_CASES = 10
DEFAULT_SLICES = 32
DEFAULT_SEED = 42
MIN_SLICES = 8
# Written into the data folder; only a folder holding it is wiped and rewritten on a rerun, so
# pointing --out at a real Kaggle download can never delete it.
MARKER = ".gitract_synthetic.json"

# The real data's image sizes: (width, height, pixel spacing in mm).
SIZES: tuple[tuple[int, int, float], ...] = (
    (266, 266, 1.50),
    (360, 310, 1.50),
    (276, 276, 1.63),
    (234, 234, 1.50),
)
# Size pattern cycled over case-days (266x266 is the commonest size in the real data). The
# test pattern starts with the non-square size: only it can catch a transposed RLE.
_TRAIN_SIZE_PATTERN = (0, 1, 0, 2, 3)
_TEST_SIZE_PATTERN = (1, 0, 2, 0, 3)
_SHORT_PATTERN = (False, True, False)  # about one day in three is a short day (80 vs 144 slices)

_COARSE = 3  # fields are evaluated on a grid this many times coarser, then upsampled
_Z_SCALE = 1.6  # one unit of normalized depth t is this many body half-widths
_FAR = np.float32(1.0)  # field value "far outside" (in body half-widths)
_MIN_AREA = 30  # pixels: smaller pieces of an organ in a slice are removed
_OVERLAP = 0.015  # width of the band where two organs' masks overlap (in body half-widths)
_PNG_PARAMS = [cv2.IMWRITE_PNG_COMPRESSION, 1]  # fast; explicit so the bytes do not drift


def short_day_slices(n_slices: int) -> int:
    """Slices of a short day: the real data has days of 144 and of 80 slices."""
    return round(n_slices * 80 / 144)


# ----------------------------------------------------------------------------------------------
# Anatomy: per case, then jittered per day. Coordinates (u, v, t): u, v in body half-widths
# (u to the image right = patient left, v down = posterior), t in [0, 1] along the slices.
# ----------------------------------------------------------------------------------------------

# Large bowel: rectum -> sigmoid -> descending -> transverse (anterior) -> ascending -> caecum.
_LARGE_BOWEL = np.array(
    [
        (0.00, 0.45, 0.29),
        (0.10, 0.40, 0.30),
        (0.38, 0.28, 0.32),
        (0.60, 0.12, 0.34),
        (0.64, -0.02, 0.44),
        (0.62, -0.15, 0.55),
        (0.52, -0.35, 0.63),
        (0.25, -0.48, 0.60),
        (-0.05, -0.52, 0.57),
        (-0.35, -0.46, 0.59),
        (-0.58, -0.25, 0.60),
        (-0.64, -0.05, 0.50),
        (-0.60, 0.08, 0.38),
        (-0.50, 0.16, 0.33),
    ],
    dtype=np.float64,
)


@dataclass
class _Tube:
    """A tube as a densely sampled centre line with a radius per sample."""

    points: np.ndarray  # (N, 3) float32: u, v, t
    radii: np.ndarray  # (N,) float32


@dataclass
class _Anatomy:
    """What a case keeps across its days."""

    body_mm: tuple[float, float]  # body half-axes (x, y) in mm, before fitting the image
    large_bowel: np.ndarray  # (K, 3) control points
    lb_radius: float
    small_bowel: list[tuple[np.ndarray, float]]  # control points and radius per loop
    stomach: dict[str, float]
    gains: dict[str, float]  # per-case intensity factors per tissue
    phases: np.ndarray  # random phases of slow variations along the slices


def _case_anatomy(rng: np.random.Generator) -> _Anatomy:
    scale = rng.uniform(0.92, 1.08)
    lb = _LARGE_BOWEL * [scale, scale, 1.0]
    lb = lb + rng.normal(0.0, [0.04, 0.04, 0.012], size=lb.shape)
    loops = []
    for _ in range(int(rng.integers(5, 8))):
        centre = np.array(
            [rng.uniform(-0.30, 0.30), rng.uniform(-0.20, 0.28), rng.uniform(0.37, 0.49)]
        )
        n_points = int(rng.integers(5, 8))
        angle = rng.uniform(0, 2 * np.pi) + np.cumsum(rng.uniform(0.8, 1.4, n_points))
        radius = rng.uniform(0.12, 0.22)
        ctrl = np.stack(
            [
                centre[0] + radius * np.cos(angle),
                centre[1] + radius * np.sin(angle),
                centre[2] + np.linspace(-0.08, 0.08, n_points) * rng.choice([-1, 1]),
            ],
            axis=1,
        )
        loops.append((ctrl, float(rng.uniform(0.085, 0.105))))
    stomach = {  # centre; radii across and half-height; drift with depth; 2- and 3-fold lobes
        "u": rng.uniform(0.28, 0.40), "v": rng.uniform(-0.30, -0.18), "t": rng.uniform(0.56, 0.59),
        "ru": rng.uniform(0.27, 0.33), "rv": rng.uniform(0.20, 0.26), "ht": rng.uniform(0.10, 0.12),
        "tilt_u": rng.uniform(-0.12, 0.12), "tilt_v": rng.uniform(-0.08, 0.08),
        "a2": rng.uniform(0.05, 0.12), "p2": rng.uniform(0, 2 * np.pi),
        "a3": rng.uniform(0.03, 0.08), "p3": rng.uniform(0, 2 * np.pi),
    }  # fmt: skip
    gains = {name: rng.uniform(0.92, 1.08) for name in ("body", "lb", "sb", "st", "other")}
    return _Anatomy(
        body_mm=(rng.uniform(150, 175), rng.uniform(112, 132)),
        large_bowel=lb,
        lb_radius=float(rng.uniform(0.12, 0.14)),
        small_bowel=loops,
        stomach=stomach,
        gains=gains,
        phases=rng.uniform(0, 2 * np.pi, size=4),
    )


def _spline_tube(
    ctrl: np.ndarray, radius: float, rng: np.random.Generator, bulge: float, step: float = 0.03
) -> _Tube:
    """Sample a smooth centre line through ``ctrl`` every ``step`` (in the (u, v, s*t) metric).

    The radius swells and narrows along the tube (``bulge``), like haustra or bowel loops.
    """
    metric = ctrl * [1.0, 1.0, _Z_SCALE]
    chord = np.r_[0.0, np.cumsum(np.linalg.norm(np.diff(metric, axis=0), axis=1))]
    spline = CubicSpline(chord, ctrl, axis=0)
    n = max(int(math.ceil(chord[-1] / step)) + 1, 2)
    s = np.linspace(0.0, chord[-1], n)
    points = spline(s)
    wavelength, phase = rng.uniform(0.3, 0.45), rng.uniform(0, 2 * np.pi)
    radii = radius * (1.0 + bulge * np.sin(2 * np.pi * s / wavelength + phase))
    return _Tube(points.astype(np.float32), radii.astype(np.float32))


@dataclass
class _Day:
    """A case-day's geometry and acquisition: where everything is, and how it is imaged."""

    large_bowel: _Tube
    small_bowel: list[_Tube]
    stomach: dict[str, float]
    shift: np.ndarray  # (du, dv) of the whole abdomen
    bias: np.ndarray  # coefficients of the smooth bias field
    noise: float
    gain: float


def _day_geometry(anatomy: _Anatomy, rng: np.random.Generator) -> _Day:
    jitter = np.array([0.025, 0.025, 0.008])
    lb_ctrl = anatomy.large_bowel + rng.normal(0.0, jitter, size=anatomy.large_bowel.shape)
    lb_ctrl[:, 2] += rng.normal(0.0, 0.01)
    lb = _spline_tube(lb_ctrl, anatomy.lb_radius * rng.uniform(0.93, 1.07), rng, bulge=0.15)
    loops = []
    for ctrl, radius in anatomy.small_bowel:
        moved = ctrl + rng.normal(0.0, [0.04, 0.04, 0.01], size=(1, 3))
        moved = moved + rng.normal(0.0, [0.02, 0.02, 0.005], size=ctrl.shape)
        loops.append(_spline_tube(moved, radius * rng.uniform(0.9, 1.1), rng, bulge=0.1))
    stomach = dict(anatomy.stomach)
    fill = rng.uniform(0.85, 1.15)  # the stomach is fuller on some days than others
    stomach["ru"] *= fill
    stomach["rv"] *= fill
    stomach["ht"] *= rng.uniform(0.92, 1.08)
    stomach["u"] += rng.normal(0.0, 0.03)
    stomach["v"] += rng.normal(0.0, 0.03)
    stomach["t"] += rng.normal(0.0, 0.01)
    return _Day(
        large_bowel=lb,
        small_bowel=loops,
        stomach=stomach,
        shift=rng.normal(0.0, 0.03, size=2),
        bias=rng.uniform(-1.0, 1.0, size=4),
        noise=float(rng.uniform(90, 160)),
        gain=float(rng.uniform(0.95, 1.12)),
    )


# ----------------------------------------------------------------------------------------------
# Fields on the coarse grid of one slice (signed distances in body half-widths: < 0 inside).
# ----------------------------------------------------------------------------------------------


def _tube_field(tube: _Tube, u: np.ndarray, v: np.ndarray, t: float) -> np.ndarray:
    """Distance to a swept-sphere tube, cut by the slice at depth ``t``.

    ``u`` (w,) and ``v`` (h,) are the grid's (ascending) coordinates. Only the centre-line
    samples that reach the slice count, and only the grid cells near them are computed: the
    rest is "far outside", which keeps this cheap for long tubes and many loops.
    """
    out = np.full((v.size, u.size), _FAR, dtype=np.float32)
    dz = _Z_SCALE * (tube.points[:, 2] - t)
    near = np.abs(dz) < tube.radii + 0.08
    if not near.any():
        return out
    pts, radii, dz = tube.points[near], tube.radii[near], dz[near]
    reach = float(radii.max()) + 0.08
    c0, c1 = np.searchsorted(u, [pts[:, 0].min() - reach, pts[:, 0].max() + reach])
    r0, r1 = np.searchsorted(v, [pts[:, 1].min() - reach, pts[:, 1].max() + reach])
    if c0 == c1 or r0 == r1:
        return out
    du2 = (u[c0:c1, None] - pts[:, 0]) ** 2  # (w', K)
    dv2 = (v[r0:r1, None] - pts[:, 1]) ** 2 + dz**2  # (h', K)
    dist = np.sqrt(dv2[:, None, :] + du2[None, :, :])
    out[r0:r1, c0:c1] = (dist - radii).min(axis=-1)
    return out


def _ellipsoid_field(
    u: np.ndarray, v: np.ndarray, t: float, centre: Sequence[float], radii: Sequence[float]
) -> np.ndarray:
    """Approximate signed distance to an axis-aligned ellipsoid (t radius in t units)."""
    r = np.sqrt(
        ((u - centre[0]) / radii[0]) ** 2
        + ((v - centre[1]) / radii[1]) ** 2
        + ((t - centre[2]) / radii[2]) ** 2
    )
    return (r - 1.0) * min(radii[0], radii[1])


def _stomach_fields(
    st: dict[str, float], u: np.ndarray, v: np.ndarray, t: float
) -> tuple[np.ndarray, np.ndarray]:
    """The stomach's distance field, and a -1..1 gradient across it (fluid settles posteriorly).

    A lobed ellipsoid whose blunt (4th power) ends keep its cross-sections large until near
    the top and bottom; its centre drifts with depth and its lobes twist.
    """
    dt = (t - st["t"]) / st["ht"]
    cu = st["u"] + st["tilt_u"] * dt
    cv = st["v"] + st["tilt_v"] * dt
    x, y = (u - cu) / st["ru"], (v - cv) / st["rv"]
    theta = np.arctan2(y, x)
    lobes = (
        1.0
        + st["a2"] * np.cos(2 * theta + st["p2"])
        + st["a3"] * np.cos(3 * theta + st["p3"] + 1.5 * dt)
    )
    r = np.sqrt(x**2 + y**2 + dt**4)
    return (r / lobes - 1.0) * min(st["ru"], st["rv"]), np.clip(y, -1.0, 1.0)


# ----------------------------------------------------------------------------------------------
# Rendering a case-day.
# ----------------------------------------------------------------------------------------------


def _soft(field_: np.ndarray, pixel: float) -> np.ndarray:
    """Partial-volume weight of a shape: 1 inside, 0 outside, a one-pixel ramp at the border."""
    return np.clip(0.5 - field_ / pixel, 0.0, 1.0)


def _drop_specks(field_: np.ndarray, pixel: float) -> np.ndarray:
    """Remove the pieces of a shape smaller than ``_MIN_AREA`` pixels, from image and mask.

    The tip of a tube grazing a slice would otherwise leave a label of a pixel or two, noise
    that no model (and no annotator) would reproduce.
    """
    inside = (field_ < 0).astype(np.uint8)
    if not inside.any():
        return field_
    _, labels, stats, _ = cv2.connectedComponentsWithStats(inside, connectivity=8)
    small = np.flatnonzero(stats[1:, cv2.CC_STAT_AREA] < _MIN_AREA) + 1
    if small.size == 0:
        return field_
    specks = cv2.dilate(np.isin(labels, small).astype(np.uint8), np.ones((3, 3), np.uint8))
    return np.where(specks > 0, np.maximum(field_, np.float32(pixel)), field_)


def _render_day(
    anatomy: _Anatomy,
    day: _Day,
    size: tuple[int, int, float],
    n_slices: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Render a case-day: uint16 images (D, H, W) and bool masks (D, H, W, 3) in CLASSES order."""
    width, height, spacing = size
    # Body half-axes in mm, shrunk to fit small fields of view.
    a_mm = min(anatomy.body_mm[0], 0.45 * width * spacing)
    b_mm = min(anatomy.body_mm[1], 0.40 * height * spacing)
    pixel = spacing / a_mm  # one pixel in body half-widths
    hc, wc = math.ceil(height / _COARSE), math.ceil(width / _COARSE)
    # Centres of the coarse cells in full-resolution pixel coordinates, as cv2.resize maps them.
    xs = (np.arange(wc) + 0.5) * width / wc - 0.5
    ys = (np.arange(hc) + 0.5) * height / hc - 0.5
    u1 = ((xs - (width - 1) / 2) * spacing / a_mm).astype(np.float32)
    v1 = ((ys - (height - 1) / 2) * spacing / b_mm - 0.04).astype(np.float32)
    u, v = np.meshgrid(u1, v1)
    ua1, va1 = u1 - np.float32(day.shift[0]), v1 - np.float32(day.shift[1])
    ua, va = np.meshgrid(ua1, va1)  # abdominal organs move with the day's shift
    b = day.bias
    g = anatomy.gains

    images = np.empty((n_slices, height, width), dtype=np.uint16)
    masks = np.zeros((n_slices, height, width, len(CLASSES)), dtype=bool)
    for k in range(n_slices):
        t = (k + 0.5) / n_slices
        body_r = 1.0 + 0.03 * math.sin(2 * math.pi * t + anatomy.phases[0])
        body = (np.sqrt(u**2 + (v * 1.02) ** 2) - body_r).astype(np.float32)
        lb = _tube_field(day.large_bowel, ua1, va1, t)
        sb = np.minimum.reduce([_tube_field(loop, ua1, va1, t) for loop in day.small_bowel])
        st, st_grad = _stomach_fields(day.stomach, ua, va, t)
        # Organs push each other aside rather than interpenetrate: the stomach displaces the
        # bowels, the large bowel the small bowel. A thin band of overlap is left, so the
        # masks are multi-label as in the real data, without hiding one organ under another.
        lb = np.maximum(lb, -(st + _OVERLAP))
        sb = np.maximum(sb, -(np.minimum(st, lb) + _OVERLAP))
        liver = _ellipsoid_field(ua, va, t, (-0.42, -0.12, 0.72), (0.48, 0.45, 0.18))
        kidneys = np.minimum(
            _ellipsoid_field(ua, va, t, (-0.42, 0.50, 0.50), (0.14, 0.20, 0.12)),
            _ellipsoid_field(ua, va, t, (0.42, 0.50, 0.52), (0.14, 0.20, 0.12)),
        )
        spine = np.sqrt(u**2 + (v - 0.66) ** 2) - 0.13
        canal = np.sqrt(u**2 + (v - 0.84) ** 2) - 0.045
        bias = np.exp(
            0.12 * (b[0] * u + b[1] * v + 0.5 * b[2] * (u**2 + v**2 - 0.5) + b[3] * (t - 0.5))
        )
        tex_smooth = cv2.GaussianBlur(rng.standard_normal((hc, wc), dtype=np.float32), (0, 0), 1.2)
        tex_smooth /= tex_smooth.std() + 1e-6
        tex_mottle = rng.standard_normal((hc, wc), dtype=np.float32)
        coarse = np.stack(
            [body, lb, sb, st, st_grad, liver, kidneys, spine, canal, bias, tex_smooth, tex_mottle],
            axis=-1,
        ).astype(np.float32)
        (body, lb, sb, st, st_grad, liver, kidneys, spine, canal, bias, tex_s, tex_m) = np.moveaxis(
            cv2.resize(coarse, (width, height), interpolation=cv2.INTER_LINEAR), -1, 0
        )
        lb, sb, st = (_drop_specks(f, pixel) for f in (lb, sb, st))

        img = np.full((height, width), 30.0, dtype=np.float32)
        fat = np.maximum(body, -(body + 0.07))  # a ring of subcutaneous fat under the skin
        layers = (  # painted in this order: organs last, so they show where they overlap
            (body, 3000 * g["body"] * (1 + 0.06 * tex_s)),
            (fat, 5200 * g["body"] * (1 + 0.05 * tex_s)),
            (liver, 4300 * g["other"] * (1 + 0.05 * tex_s)),
            (kidneys, 6800 * g["other"] * (1 + 0.05 * tex_s)),
            (spine, 5000 * g["other"] * (1 + 0.08 * tex_m)),
            (canal, 9000 * g["other"]),
            (sb, 9800 * g["sb"] * (1 + 0.07 * tex_s)),
            (lb, 6300 * g["lb"] * (1 + 0.22 * tex_m)),
            (st, 7400 * g["st"] * (1 + 0.12 * st_grad + 0.05 * tex_s)),
        )
        for shape, value in layers:
            alpha = _soft(shape, pixel)
            img += alpha * (value - img)

        img *= bias * day.gain
        noise = rng.standard_normal((2, height, width), dtype=np.float32) * day.noise
        img = np.sqrt((img + noise[0]) ** 2 + noise[1] ** 2)  # Rician, as in magnitude MRI
        images[k] = np.clip(np.rint(img), 0, 65535).astype(np.uint16)
        masks[k, ..., 0] = lb < 0
        masks[k, ..., 1] = sb < 0
        masks[k, ..., 2] = st < 0
    return images, masks


# ----------------------------------------------------------------------------------------------
# The data set: which cases, days, sizes and splits; then files.
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _CaseDay:
    case: int
    day: int
    split: str  # "train" or "test"
    size: tuple[int, int, float]  # width, height, spacing
    n_slices: int

    @property
    def name(self) -> str:
        return f"case{self.case}_day{self.day}"


@dataclass(frozen=True)
class SyntheticSummary:
    """What :func:`generate` wrote, for the script's printout and for tests."""

    out_dir: Path
    labels_csv: Path
    train_cases: tuple[int, ...]
    test_cases: tuple[int, ...]
    n_train_case_days: int
    n_test_case_days: int
    slices_per_day: tuple[int, ...]  # distinct day lengths, long first
    n_slices: int  # images written, train and test
    n_slices_with_organ: int
    sizes: dict[str, int]  # "WxH@spacing" -> case-days
    seconds: float

    def format(self) -> str:
        """A few lines for the terminal."""
        share = self.n_slices_with_organ / max(self.n_slices, 1)
        sizes = ", ".join(f"{k}: {n}" for k, n in self.sizes.items())
        return "\n".join(
            [
                f"synthetic data in {self.out_dir} (test labels: {self.labels_csv})",
                f"  cases: {len(self.train_cases)} train, {len(self.test_cases)} test "
                f"(test cases {', '.join(map(str, self.test_cases))})",
                f"  case-days: {self.n_train_case_days} train, {self.n_test_case_days} test; "
                f"slices per day: {' or '.join(map(str, self.slices_per_day))}",
                f"  slices: {self.n_slices}, with an organ: {self.n_slices_with_organ} "
                f"({share:.0%})",
                f"  sizes (W x H @ mm, case-days): {sizes}",
                f"  took {self.seconds:.1f} s",
            ]
        )


def _tiled(pattern: Sequence, n: int, rng: np.random.Generator) -> list:
    """``n`` values cycling through ``pattern`` (each appears once n >= len), in random order."""
    values = [pattern[i % len(pattern)] for i in range(n)]
    return [values[i] for i in rng.permutation(n)]


def _plan(n_cases: int, n_slices: int, seed: int) -> list[_CaseDay]:
    """Cases, days, sizes and splits, all drawn from ``seed``."""
    rng = np.random.default_rng([seed, 0])
    # Case numbers look like the real ones; the hosts' faulty case-days are never produced
    # (the pipeline drops them by default), so the cases holding them are skipped altogether.
    skip = {int(cd.split("_")[0][4:]) for cd in DEFAULT_EXCLUDE}
    pool = np.array([c for c in range(1, max(160, 2 * n_cases + len(skip))) if c not in skip])
    cases = np.sort(rng.choice(pool, size=n_cases, replace=False))
    n_test = max(1, round(n_cases / 5))
    test = set(rng.choice(cases, size=n_test, replace=False).tolist())
    days = {
        int(c): np.sort(rng.choice(41, size=int(rng.integers(2, 4)), replace=False)).tolist()
        for c in cases
    }
    plan: list[_CaseDay] = []
    for split, size_pattern in (("train", _TRAIN_SIZE_PATTERN), ("test", _TEST_SIZE_PATTERN)):
        keys = [(c, d) for c in days for d in days[c] if (c in test) == (split == "test")]
        sizes = _tiled([SIZES[i] for i in size_pattern], len(keys), rng)
        short = _tiled(_SHORT_PATTERN, len(keys), rng)
        for (case, day), size, is_short in zip(keys, sizes, short, strict=True):
            depth = short_day_slices(n_slices) if is_short else n_slices
            plan.append(_CaseDay(case, int(day), split, size, depth))
    return plan


def _labels_csv(rows: list[tuple[str, str, str]], header: str) -> str:
    return header + "\n" + "".join(f"{i},{c},{s}\n" for i, c, s in rows)


def _int_at_least(value: object, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _check_args(
    out_dir: Path, labels_dir: Path, n_cases: int, n_slices: int, seed: int, workers: int | None
) -> None:
    if not _int_at_least(n_cases, 2):
        raise ConfigError(
            f"cases must be an integer >= 2 (one for train, one for test), got {n_cases!r}"
        )
    if not _int_at_least(n_slices, MIN_SLICES):
        raise ConfigError(f"slices must be an integer >= {MIN_SLICES}, got {n_slices!r}")
    if not _int_at_least(seed, 0):
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
    if workers is not None and not _int_at_least(workers, 1):
        raise ConfigError(f"workers must be a positive integer, got {workers!r}")
    out, labels = out_dir.resolve(), labels_dir.resolve()
    if labels == out or out in labels.parents:
        raise ConfigError(
            f"labels folder {labels_dir} is inside the data folder {out_dir}: the hidden test "
            "labels must live outside it"
        )
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"{out_dir}: exists and is not a folder")
    dataset_files = ("train", "test", "train.csv", "sample_submission.csv")
    if any((out_dir / f).exists() for f in dataset_files) and not (out_dir / MARKER).is_file():
        raise DataError(
            f"{out_dir}: holds a data set not made by this generator (no {MARKER}); "
            "refusing to overwrite it, choose another --out"
        )


def _available_cpus() -> int:
    """CPUs this process may use (a container may see more than it is allowed), at most 8."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        n = os.cpu_count() or 1
    return max(1, min(n, 8))


def _write_case_day(job: tuple[_CaseDay, int, Path]) -> tuple[list[tuple[str, str, str]], int]:
    """Render one case-day and write its PNGs under ``root``; return its CSV rows and how many
    of its slices show an organ. Seeded by (seed, case, day) alone, so the result does not
    depend on which process renders it or in what order."""
    cd, seed, root = job
    anatomy = _case_anatomy(np.random.default_rng([seed, 1, cd.case]))
    rng = np.random.default_rng([seed, 2, cd.case, cd.day])
    day = _day_geometry(anatomy, rng)
    images, masks = _render_day(anatomy, day, cd.size, cd.n_slices, rng)
    width, height, spacing = cd.size
    scans = root / cd.split / f"case{cd.case}" / cd.name / "scans"
    scans.mkdir(parents=True, exist_ok=True)
    rows = []
    for index in range(cd.n_slices):
        number = index + 1
        path = scans / f"slice_{number:04d}_{width}_{height}_{spacing:.2f}_{spacing:.2f}.png"
        if not cv2.imwrite(str(path), images[index], _PNG_PARAMS):
            raise DataError(f"{path}: cv2 could not write the image")
        sid = f"{cd.name}_slice_{number:04d}"
        rows += [(sid, name, rle_encode(masks[index, ..., k])) for k, name in enumerate(CLASSES)]
    return rows, int(masks.any(axis=(1, 2, 3)).sum())


def generate(
    out_dir: Path,
    labels_dir: Path,
    n_cases: int = DEFAULT_CASES,
    n_slices: int = DEFAULT_SLICES,
    seed: int = DEFAULT_SEED,
    workers: int | None = None,
) -> SyntheticSummary:
    """Write a synthetic data set in the Kaggle layout under ``out_dir``; return a summary.

    ``out_dir`` gets ``train/`` and ``test/`` (16-bit PNGs), ``train.csv`` and
    ``sample_submission.csv`` (test ids x 3 classes, rows in a seeded random order);
    ``labels_dir`` (outside ``out_dir``) gets ``test_labels.csv``, the hidden answers in the
    ``train.csv`` format. About a fifth of the cases (at least one) are test cases; each case
    has 2-3 days of ``n_slices`` or :func:`short_day_slices` slices. The same arguments give
    byte-identical files, whatever ``workers`` (processes rendering case-days in parallel;
    default: one per CPU). A previous synthetic data set in ``out_dir`` is replaced; a folder
    holding anything else that looks like a data set is refused (:class:`DataError`).
    """
    start = time.perf_counter()
    out_dir, labels_dir = Path(out_dir), Path(labels_dir)
    _check_args(out_dir, labels_dir, n_cases, n_slices, seed, workers)
    plan = _plan(n_cases, n_slices, seed)

    out_dir.mkdir(parents=True, exist_ok=True)
    params = {"cases": n_cases, "slices": n_slices, "seed": seed}
    write_text_atomic(out_dir / MARKER, json.dumps(params, sort_keys=True) + "\n")
    staging = Path(tempfile.mkdtemp(prefix=".synthetic-", dir=out_dir))
    try:
        rows: dict[str, list[tuple[str, str, str]]] = {"train": [], "test": []}
        with_organ = 0
        jobs = [(cd, seed, staging) for cd in plan]
        n_workers = min(workers or _available_cpus(), len(plan))
        if n_workers > 1:
            with ProcessPoolExecutor(n_workers) as pool:
                results = list(pool.map(_write_case_day, jobs))
        else:
            results = [_write_case_day(job) for job in jobs]
        for cd, (day_rows, day_with_organ) in zip(plan, results, strict=True):
            rows[cd.split] += day_rows
            with_organ += day_with_organ

        # Swap the new images in, then the CSVs (each atomically).
        for split in ("train", "test"):
            target = out_dir / split
            if target.exists():
                shutil.rmtree(target)
            (staging / split).mkdir(exist_ok=True)
            os.replace(staging / split, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    write_text_atomic(out_dir / "train.csv", _labels_csv(rows["train"], "id,class,segmentation"))
    submission = [(i, c, "") for i, c, _ in rows["test"]]
    order = np.random.default_rng([seed, 3]).permutation(len(submission))
    write_text_atomic(
        out_dir / "sample_submission.csv",
        _labels_csv([submission[i] for i in order], "id,class,predicted"),
    )
    labels_csv = labels_dir / "test_labels.csv"
    write_text_atomic(labels_csv, _labels_csv(rows["test"], "id,class,segmentation"))

    per_size = Counter(cd.size for cd in plan)
    return SyntheticSummary(
        out_dir=out_dir,
        labels_csv=labels_csv,
        train_cases=tuple(sorted({cd.case for cd in plan if cd.split == "train"})),
        test_cases=tuple(sorted({cd.case for cd in plan if cd.split == "test"})),
        n_train_case_days=sum(cd.split == "train" for cd in plan),
        n_test_case_days=sum(cd.split == "test" for cd in plan),
        slices_per_day=tuple(sorted({cd.n_slices for cd in plan}, reverse=True)),
        n_slices=sum(cd.n_slices for cd in plan),
        n_slices_with_organ=with_organ,
        sizes={f"{w}x{h}@{s:.2f}": per_size[w, h, s] for w, h, s in SIZES},
        seconds=time.perf_counter() - start,
    )
