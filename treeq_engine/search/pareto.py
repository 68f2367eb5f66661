"""Pareto drop: keep K of a node's scored candidates by non-dominated sorting on (cost, MSE).

    keep = pareto_drop(cost (m,), mse (m,), k, always=i)      # indices into the m candidates

1. Non-dominated sort on ``(cost, MSE)``, both minimised: front 0 is the Pareto front, front 1 the front of what
   remains, and so on. A NaN MSE counts as +inf (worst).
2. Fill K from the fronts in order. When a front holds more than the slots left, thin it evenly along cost: the
   points nearest ``r`` equally spaced targets from the front's cheapest to its dearest point, so the kept set
   spans the whole cost range as in the paper's figure (its kept points run from 3.45 to 3.93 average bits).
3. ``always``: one candidate kept whatever its rank (the tree search passes the node's environment-uniform
   config, so the uniform plan at ENG's setting survives to the root and the search cannot end worse than it).
4. Ties go to the cheaper point, then the lower MSE, then the lower index: the result is deterministic.

Costs with two dimensions (a WxAy budget) are reduced to one axis before this (``CostModel.axis``): a
non-dominated sort in (W, A, MSE) keeps so many points that thinning them to 16 spreads them over a plane and
leaves few near the budget (measured on the stand-in model: worse than uniform W4A4 in 2 of 3 seeds, while the
reduced axis beat it in 3 of 3; ``docs/search.md``).
"""
from __future__ import annotations

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


def pareto_drop(cost: np.ndarray, mse: np.ndarray, keep: int, always: int | None = None) -> np.ndarray:
    """Indices of the ``keep`` candidates kept, in ascending (cost, MSE, index) order; rules above."""
    cost = np.asarray(cost, dtype=np.float64)
    mse = np.asarray(mse, dtype=np.float64)
    if cost.ndim != 1 or mse.shape != cost.shape:
        raise ValueError(f"cost and mse must both be (m,), got {cost.shape} and {mse.shape}")
    if keep <= 0:
        raise ValueError(f"keep must be positive, got {keep}")
    if always is not None and not 0 <= always < len(mse):
        raise ValueError(f"always={always} is not a candidate index (m = {len(mse)})")
    mse = np.where(np.isnan(mse), np.inf, mse)
    kept = _drop(cost, mse, keep)
    if always is not None and always not in kept:
        kept = _drop(cost, mse, keep - 1) if keep > 1 else []
        if always not in kept:
            kept.append(always)
    out = np.array(kept, dtype=np.int64)
    return out[np.lexsort((out, mse[out], cost[out]))]
