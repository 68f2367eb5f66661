"""Pareto drop: keep K of a node's scored candidates by non-dominated sorting on (cost, MSE).

    keep = pareto_drop(cost (m,), mse (m,), k, always=[i, j])      # indices into the m candidates

1. Non-dominated sort on ``(cost, MSE)``, both minimised: front 0 is the Pareto front, front 1 the front of what
   remains, and so on. A NaN MSE counts as +inf (worst).
2. Fill K from the fronts in order. When a front holds more than the slots left, thin it evenly along cost: the
   points nearest ``r`` equally spaced targets from the front's cheapest to its dearest point, so the kept set
   spans the whole cost range as in the paper's figure (its kept points run from 3.45 to 3.93 average bits).
3. ``always``: candidates kept whatever their rank, the *elites* (the tree search passes the node's slice of the
   environment-uniform plan, so that plan survives to the root and the search cannot end worse than it, and the
   slices of any warm-start plans). The rest of the K slots are filled by rules 1–2: K is the largest r for
   which the r-point drop plus the elites it missed still fit in K. With more elites than K, only the elites.
4. Ties go to the cheaper point, then the lower MSE, then the lower index: the result is deterministic.

Costs with two dimensions (a WxAy budget) are reduced to one axis before this (``CostModel.axis``): a
non-dominated sort in (W, A, MSE) keeps so many points that thinning them to 16 spreads them over a plane and
leaves few near the budget (measured on the stand-in model: worse than uniform W4A4 in 2 of 3 seeds, while the
reduced axis beat it in 3 of 3; ``docs/search.md``).
"""
from __future__ import annotations

from typing import Sequence, cast

import numpy as np


def nondominated_fronts(objectives: np.ndarray) -> list[np.ndarray]:
    """Fronts of ``objectives (m, q)`` (minimised), each an index array sorted ascending."""
    obj = np.asarray(objectives, dtype=np.float64)
    if obj.ndim != 2:
        raise ValueError(f"objectives must be (m, q), got shape {obj.shape}")
    obj = np.where(np.isnan(obj), np.inf, obj)
    le = np.all(obj[:, None, :] <= obj[None, :, :], axis=-1)
    lt = np.any(obj[:, None, :] < obj[None, :, :], axis=-1)
    dominates = le & lt                          # dominates[i, j]: i dominates j
    count = dominates.sum(axis=0)                # how many dominate j
    fronts, remaining = [], np.ones(len(obj), dtype=bool)
    while remaining.any():
        front = np.flatnonzero(remaining & (count == 0))
        fronts.append(front)
        remaining[front] = False
        count = count - dominates[front].sum(axis=0)
        count[~remaining] = -1
    return fronts


def thin_evenly(cost: np.ndarray, mse: np.ndarray, idx: np.ndarray, r: int) -> list[int]:
    """``r`` of the points ``idx``: nearest to equally spaced cost targets from the cheapest to the dearest
    (one point: the median-cost one)."""
    c = cost[idx]
    order = np.lexsort((idx, mse[idx], c))       # by cost, then MSE, then index
    idx, c = idx[order], c[order]
    if r == 1:
        return [int(idx[(len(idx) - 1) // 2])]
    free = np.ones(len(idx), dtype=bool)
    out = []
    for t in np.linspace(c[0], c[-1], r):
        j = int(np.argmin(np.where(free, np.abs(c - t), np.inf)))   # first minimum: cheaper, lower MSE, index
        free[j] = False
        out.append(int(idx[j]))
    return out


def _drop(cost: np.ndarray, mse: np.ndarray, keep: int) -> list[int]:
    if len(mse) <= keep:
        return list(range(len(mse)))
    kept: list[int] = []
    for front in nondominated_fronts(np.stack([cost, mse], axis=1)):
        room = keep - len(kept)
        kept.extend(int(i) for i in front) if len(front) <= room else kept.extend(thin_evenly(cost, mse, front, room))
        if len(kept) == keep:
            break
    return kept


def pareto_drop(cost: np.ndarray, mse: np.ndarray, keep: int,
                always: int | Sequence[int] | None = None) -> np.ndarray:
    """Indices of the candidates kept (``keep`` of them, more only when there are more elites), in ascending
    (cost, MSE, index) order; rules above."""
    cost = np.asarray(cost, dtype=np.float64)
    mse = np.asarray(mse, dtype=np.float64)
    if cost.ndim != 1 or mse.shape != cost.shape:
        raise ValueError(f"cost and mse must both be (m,), got {cost.shape} and {mse.shape}")
    if keep <= 0:
        raise ValueError(f"keep must be positive, got {keep}")
    # np.ndim, not isinstance: a numpy integer is a scalar too; the casts only tell mypy which branch holds what.
    elites = [] if always is None else sorted({int(cast(int, always))} if np.ndim(always) == 0
                                              else {int(i) for i in cast(Sequence[int], always)})
    bad = [i for i in elites if not 0 <= i < len(mse)]
    if bad:
        raise ValueError(f"always={bad} is not a candidate index (m = {len(mse)})")
    mse = np.where(np.isnan(mse), np.inf, mse)
    r = keep
    while True:   # the widest drop that leaves room for the elites it misses (r = keep when it misses none)
        kept = _drop(cost, mse, r) if r > 0 else []
        missed = [i for i in elites if i not in kept]
        if len(kept) + len(missed) <= keep or r == 0:
            break
        r -= 1
    out = np.array(kept + missed, dtype=np.int64)
    return out[np.lexsort((out, mse[out], cost[out]))]
