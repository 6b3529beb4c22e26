"""The competition score of the validation case-days, computed while training validates.

Per-slice Dice says little about the 3D Hausdorff term (60% of the score), which is decided by
whole slices predicted beyond an organ's extent and by stray specks. So validation also takes
each slice's thresholded prediction back to its native H x W (as inference does), assembles
each case-day's volume as its slices arrive, scores the volume once it is whole, and frees it:
memory holds one volume per case-day in flight, not the validation set.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from gitract.data.cache import VolumeCache
from gitract.data.slices import SliceDataset
from gitract.scoring.metrics import VolumeScoreAccumulator

__all__ = ["VolumeScorer", "shard_case_days"]


def shard_case_days(table: pd.DataFrame, rank: int, world_size: int) -> pd.DataFrame:
    """This rank's whole case-days (every ``world_size``-th), in case, day, slice order: a
    volume is scored where all of its slices are."""
    table = table.sort_values(["case", "day", "slice"], kind="stable")
    days = list(dict.fromkeys(table["case_day"]))
    return table[table["case_day"].isin(days[rank::world_size])]


class VolumeScorer:
    """Score terms of the volumes of ``dataset`` (built over a :func:`shard_case_days` table),
    fed batch by batch with canvas probabilities."""

    def __init__(
        self, dataset: SliceDataset, table: pd.DataFrame, cache: VolumeCache, profile: str,
        threshold: float,
    ) -> None:  # fmt: skip
        self.dataset = dataset
        self.cache = cache
        self.profile = profile
        self.threshold = threshold
        self.day_of: list[str] = table["case_day"].tolist()
        self.depth: dict[str, int] = table.groupby("case_day").size().to_dict()
        self.reset()

    def reset(self) -> None:
        """Start a new validation pass."""
        self.accumulator = VolumeScoreAccumulator(self.profile)
        self.pending: dict[str, dict[int, np.ndarray]] = {}

    def update(self, probs: torch.Tensor, indices: Sequence[int]) -> None:
        """Add a batch: (N, 3, tH, tW) probabilities of the dataset items ``indices``."""
        batch = probs.float().cpu().numpy()
        for k, index in enumerate(indices):
            native = self.dataset.letterbox(index).invert(batch[k])
            day = self.day_of[index]
            slices = self.pending.setdefault(day, {})
            slices[index] = native > self.threshold
            if len(slices) == self.depth[day]:
                self._score(day)

    def _score(self, day: str) -> None:
        slices = self.pending.pop(day)
        order = sorted(slices)  # dataset order is slice order within a case-day
        pred = np.stack([slices[i] for i in order])
        truth = np.stack([self.cache.mask(self.dataset.ids[i]).transpose(2, 0, 1) for i in order])
        self.accumulator.add(pred, truth.astype(bool))

    def state(self) -> torch.Tensor:
        """Sums to all-reduce across ranks; every volume must be complete by now."""
        if self.pending:
            raise RuntimeError(f"validation volumes left incomplete: {sorted(self.pending)}")
        return self.accumulator.state()

    def load_state(self, state: torch.Tensor) -> None:
        self.accumulator.load_state(state)

    def compute(self) -> dict[str, float]:
        """``score``, ``dice`` and ``hausdorff`` of the volumes seen."""
        return self.accumulator.compute()
