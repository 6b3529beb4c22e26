"""Training curves as a PNG: loss and Dice per epoch, overall and per class."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from gitract.data.layout import CLASSES
from gitract.scoring.visualize import save_figure

__all__ = ["plot_curves"]


def plot_curves(history: pd.DataFrame, path: str | Path) -> None:
    """Left: train and val loss; right: val Dice overall and per class, per epoch."""
    fig = Figure(figsize=(11, 4))
    ax_loss, ax_dice = fig.subplots(1, 2)
    epochs = history["epoch"]
    ax_loss.plot(epochs, history["train_loss"], "o-", label="train")
    ax_loss.plot(epochs, history["val_loss"], "o-", label="val")
    ax_loss.set(xlabel="epoch", ylabel="Dice + BCE loss", title="loss")
    ax_loss.legend()
    ax_dice.plot(epochs, history["val_dice"], "o-", color="black", lw=2, label="mean")
    for name in CLASSES:
        if f"val_dice_{name}" in history:
            ax_dice.plot(epochs, history[f"val_dice_{name}"], ".--", label=name)
    ax_dice.set(xlabel="epoch", ylabel="Dice", title="validation Dice", ylim=(0, 1.02))
    ax_dice.legend(loc="lower right")
    for ax in (ax_loss, ax_dice):
        ax.grid(alpha=0.3)
    save_figure(fig, path)
