"""Which runs to blend, and with which weights, chosen on out-of-fold evidence.

Greedy forward selection with replacement (Caruana et al., 2004), on the runs' stored OOF
probabilities (``infer.py --oof --runs R`` for each run), over every case-day they all have:

1. each run alone is scored with per-class thresholds tuned; the best one starts the blend
   with weight 1;
2. every round tries adding each run once more (a run may come back: its weight grows by 1)
   and keeps the addition that raises the thresholds-tuned score most; it stops when none
   does, or at ``max_weight`` additions in all;
3. the full post-processing search (:meth:`OofSearch.tune`) then runs on the selected blend,
   on each run alone and on the equal-weight blend, and each is scored exactly as inference
   reproduces it, pooled and per fold.

The blend is formed from the quantised files as inference forms it (``blend_quantized``, the
integer weights as they are written to the ensemble file), so every reported score is what
``infer.py --ensemble`` gives on those case-days. The result ``chosen`` is the fully tuned
trial of best pooled score among the greedy blend, the equal-weight blend and each run alone
(the greedy blend is chosen on thresholds only, and full tuning can reverse the order): the
chosen blend never scores below the best single run on the OOF case-days.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from gitract.postprocess.steps import ClassPostprocess
from gitract.postprocess.tuning import DEFAULT_SWEEPS, OofSearch, section

__all__ = ["DEFAULT_MAX_WEIGHT", "greedy_weights", "select_blend"]

# Additions of the greedy search at most (its weights sum to at most this): enough for weights
# in steps of 0.1 between two runs, few enough to keep the search minutes long at real scale.
DEFAULT_MAX_WEIGHT = 10
_UNTUNED = [ClassPostprocess()] * 3


def _unit(k: int, n: int) -> list[int]:
    return [int(i == k) for i in range(n)]


def _threshold_score(
    search: OofSearch, weights: Sequence[int], sweeps: int, seen: dict[tuple[float, ...], float]
) -> float:
    """The blend's score with per-class thresholds tuned (the greedy search's criterion), kept
    in ``seen`` by the weights' shares: integer weights of equal shares form the same blend
    bit for bit (their sums are exact in float32), so e.g. a run added to itself alone is not
    searched again."""
    share = _share(weights)
    if share not in seen:
        search.blend(weights)
        seen[share] = search.search(_UNTUNED, ["threshold"], sweeps)[1]
    return seen[share]


def greedy_weights(
    search: OofSearch,
    max_weight: int = DEFAULT_MAX_WEIGHT,
    progress: bool = True,
    seen: dict[tuple[float, ...], float] | None = None,
) -> tuple[list[int], list[dict], list[float]]:
    """Greedy forward selection with replacement: integer weights per member, the rounds'
    history ({weights, score} per accepted step, the start included) and each member's score
    alone (all with per-class thresholds tuned). ``seen``: blends' scores by share, filled
    for the caller (who may score more blends)."""
    n = len(search.member_dirs)
    sweeps = _threshold_sweeps(search.profile)
    seen = {} if seen is None else seen
    with tqdm(desc="select", unit="blend", disable=not progress) as bar:
        alone = []
        for k in range(n):
            alone.append(_threshold_score(search, _unit(k, n), sweeps, seen))
            bar.update(1)
        weights = _unit(int(np.argmax(alone)), n)
        score = max(alone)
        history = [{"weights": list(weights), "score": score}]
        while sum(weights) < max_weight:
            trials = []
            for k in range(n):
                trial = [w + int(i == k) for i, w in enumerate(weights)]
                trials.append(_threshold_score(search, trial, sweeps, seen))
                bar.update(1)
            best = int(np.argmax(trials))
            if trials[best] <= score + 1e-12:
                break
            weights[best] += 1
            score = trials[best]
            history.append({"weights": list(weights), "score": score})
    return weights, history, alone


def _threshold_sweeps(profile: str) -> int:
    # Kaggle's score is a sum over classes: one sweep finds each class's best threshold.
    # mle-bench's union term ties the classes: a second sweep can still move them.
    return 1 if profile == "kaggle" else DEFAULT_SWEEPS


def _share(weights: Sequence[int]) -> tuple[float, ...]:
    """Weights as shares of their sum: equal shares are the same blend."""
    return tuple(w / sum(weights) for w in weights)


def select_blend(
    member_dirs: Sequence[Path],
    table: pd.DataFrame,
    profile: str = "kaggle",
    folds: Mapping[str, int] | None = None,
    grid: Mapping[str, Sequence] | None = None,
    sweeps: int = DEFAULT_SWEEPS,
    max_weight: int = DEFAULT_MAX_WEIGHT,
    workers: int | None = None,
    progress: bool = True,
) -> dict:
    """Select a blend of the runs whose OOF probabilities are in ``member_dirs`` and tune its
    post-processing, for ``profile``.

    Returns ``weights`` (the chosen integer weight per member, 0: not in the blend),
    ``classes`` (its tuned ``postprocess`` section), ``score`` (its exact tuned score),
    ``chosen`` (``"selected"``, or ``"equal_blend"`` or ``"member <k>"`` where that scores
    higher once fully tuned), ``history`` (the greedy rounds), ``gain`` (the chosen blend's
    score minus the best run's alone, pooled and per fold) and the trials ``members`` (one
    per run), ``equal_blend`` and ``selected``, each with ``weights``, ``thresholds`` (the
    greedy criterion), ``full`` (the exact score after the full search: score, dice,
    hausdorff and, with ``folds``, per_fold) and ``classes`` (that search's settings);
    ``selected`` also has ``untuned`` and ``thresholds_only``. Plus ``n_case_days``,
    ``n_slices`` and ``left_out`` (case-day files that only some runs have)."""
    n = len(member_dirs)
    with OofSearch(member_dirs, table, profile, grid, workers, folds) as search:
        seen: dict[tuple[float, ...], float] = {}
        selected, history, _ = greedy_weights(search, max_weight, progress, seen)
        named = {f"member {k}": _unit(k, n) for k in range(n)}
        named["equal_blend"] = [1] * n
        named["selected"] = selected
        # The greedy criterion of each: the members' and the selection's are already seen.
        criterion = _threshold_sweeps(profile)
        thresholds: dict[str, float] = {}
        tuned: dict[tuple[float, ...], tuple[list, list]] = {}
        with tqdm(total=len(named), desc="tune", unit="blend", disable=not progress) as bar:
            for name, weights in named.items():
                thresholds[name] = _threshold_score(search, weights, criterion, seen)
                if _share(weights) not in tuned:  # e.g. the selected blend is one run
                    search.blend(weights)
                    tuned[_share(weights)] = search.tune(sweeps)
                bar.update(1)
        full = {name: tuned[_share(w)][1] for name, w in named.items()}
        trials = [(named[name], full[name]) for name in named]
        trials += [(selected, _UNTUNED), (selected, tuned[_share(selected)][0])]
        exact = dict(zip([*named, "untuned", "thresholds_only"], search.exact(trials), strict=True))
    report = {
        name: {
            "weights": named[name],
            "thresholds": thresholds[name],
            "full": exact[name],
            "classes": section(full[name]).model_dump(),
        }
        for name in named
    }
    report["selected"]["untuned"] = exact["untuned"]
    report["selected"]["thresholds_only"] = exact["thresholds_only"]
    candidates = ["selected", "equal_blend", *(f"member {k}" for k in range(n))]
    chosen = max(candidates, key=lambda name: report[name]["full"]["score"])
    best_member = max(range(n), key=lambda k: report[f"member {k}"]["full"]["score"])
    return {
        "profile": profile,
        "runs": [str(d) for d in member_dirs],
        "chosen": chosen,
        "weights": named[chosen],
        "classes": section(full[chosen]).model_dump(),
        "score": report[chosen]["full"]["score"],
        "gain": _gain(report[chosen]["full"], report[f"member {best_member}"]["full"]),
        "best_member": best_member,
        "history": history,
        "members": [report[f"member {k}"] for k in range(n)],
        "equal_blend": report["equal_blend"],
        "selected": report["selected"],
        "n_case_days": len(search.case_days),
        "n_slices": search.n_slices,
        "left_out": search.left_out,
    }


def _gain(chosen: dict, best: dict) -> dict:
    """The chosen blend's score minus the best run's, pooled and (with folds) per fold: a gain
    smaller than its spread over the folds is not evidence."""
    gain = {"pooled": chosen["score"] - best["score"]}
    if "per_fold" in chosen:
        gain["per_fold"] = {
            fold: chosen["per_fold"][fold] - best["per_fold"][fold] for fold in chosen["per_fold"]
        }
    return gain
