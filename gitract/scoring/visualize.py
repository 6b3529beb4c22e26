"""Pictures for eyeballing predictions: truth and prediction overlays side by side, and the
per-slice Dice along z of a case-day."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from gitract.atomic import atomic_path
from gitract.data.layout import CLASSES, read_slice
from gitract.data.rle import rle_decode
from gitract.errors import DataError
from gitract.scoring.metrics import dice_2d

__all__ = ["COLOURS", "overlay", "plot_slices", "rle_table", "save_figure"]

# One colour per organ, in CLASSES order (RGB in [0, 1]).
COLOURS = np.array([[1.0, 0.85, 0.1], [0.1, 0.8, 0.3], [0.9, 0.2, 0.2]])


def save_figure(fig: Figure, path: str | Path) -> None:
    """Write a figure atomically.

    Figures here are plain ``Figure`` objects, not pyplot's: nothing global (no backend, no
    figure registry to close them in), so drawing works on a server and frees itself."""
    path = Path(path)
    with atomic_path(path, suffix=path.suffix) as tmp:  # savefig reads the format from it
        fig.savefig(tmp, dpi=100, bbox_inches="tight")


def overlay(image: np.ndarray, masks: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """An RGB picture of a 16-bit slice (contrast-stretched) with (H, W, 3) organ masks
    blended on top, each in its own colour."""
    lo, hi = np.percentile(image, (0.5, 99.5))
    grey = np.clip((image.astype(np.float32) - lo) / max(hi - lo, 1.0), 0, 1)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    for c in range(masks.shape[-1]):
        on = masks[..., c].astype(bool)
        rgb[on] = (1 - alpha) * rgb[on] + alpha * COLOURS[c]
    return rgb


def _masks(table: pd.DataFrame, slice_id: str, shape: tuple[int, int]) -> np.ndarray:
    rles = table.loc[slice_id] if slice_id in table.index else None
    planes = [rle_decode(None if rles is None else rles.get(c), shape) for c in CLASSES]
    return np.stack(planes, axis=-1)


def plot_slices(
    slices: pd.DataFrame,
    truth: pd.DataFrame,
    pred: pd.DataFrame,
    path: Path,
    max_panels: int = 4,
    title: str = "",
) -> Path:
    """Write one PNG for ``slices`` (rows of one case-day's scan table: id, path, height,
    width, slice): up to ``max_panels`` slices as truth | prediction overlays, the ones with
    the most organ spread along z, and the per-slice Dice along z (mean and per class).

    ``truth`` and ``pred`` are indexed by id with one RLE column per class."""
    if slices.empty:
        raise DataError("no slices to draw")
    slices = slices.sort_values("slice")
    dice = np.ones((len(slices), len(CLASSES)))
    area = np.zeros(len(slices))
    for k, row in enumerate(slices.itertuples(index=False)):
        shape = (int(row.height), int(row.width))
        t, p = _masks(truth, row.id, shape), _masks(pred, row.id, shape)
        dice[k] = [dice_2d(p[..., c], t[..., c]) for c in range(len(CLASSES))]
        area[k] = t.sum()
    organ = np.flatnonzero(area > 0)
    candidates = organ if organ.size else np.arange(len(slices))
    picks = np.unique(candidates[np.linspace(0, candidates.size - 1, max_panels).astype(int)])

    fig = Figure(figsize=(7, 3.2 * len(picks) + 2.8), layout="constrained")
    grid = fig.add_gridspec(len(picks) + 1, 2, height_ratios=[3.2] * len(picks) + [2.4])
    for r, k in enumerate(picks):
        row = slices.iloc[k]
        image = read_slice(row["path"])
        shape = image.shape
        for col, (name, table) in enumerate((("truth", truth), ("prediction", pred))):
            ax = fig.add_subplot(grid[r, col])
            ax.imshow(overlay(image, _masks(table, row["id"], shape)))
            ax.set_title(f"{row['id']}  {name}", fontsize=8)
            ax.axis("off")
    ax = fig.add_subplot(grid[-1, :])
    z = slices["slice"].to_numpy()
    ax.plot(z, dice.mean(axis=1), "k-", lw=2, label="mean")
    for c, name in enumerate(CLASSES):
        ax.plot(z, dice[:, c], "--", color=COLOURS[c], label=name)
    ax.set(xlabel="slice", ylabel="Dice", ylim=(-0.02, 1.02), title="per-slice Dice along z")
    ax.grid(alpha=0.3)
    # The overlays use the curves' colours: one legend serves both.
    handles = [Patch(color=COLOURS[c], label=n) for c, n in enumerate(CLASSES)]
    ax.legend(handles=[*ax.get_lines()[:1], *handles], loc="lower left", ncol=4, fontsize=8)
    if title:
        fig.suptitle(title)
    save_figure(fig, path)  # makes the folder
    return path


def rle_table(frame: pd.DataFrame, column: str, ids: Sequence[str] | None = None) -> pd.DataFrame:
    """Long ``id,class,<column>`` rows -> one row per id with one RLE column per class."""
    if ids is not None:
        frame = frame[frame["id"].isin(set(ids))]
    return frame.pivot(index="id", columns="class", values=column).fillna("")
