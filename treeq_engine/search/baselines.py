"""The baselines TSS is compared with, at the same budget, calibration set and metric.

* ``uniform_baseline``: every leaf at one candidate config; the lowest-MSE one that meets the budget.
* ``ip_baseline``: integer programming over summed per-layer sensitivities (HAWQ-V3 / MixDQ style). Each
  leaf's sensitivity to each candidate is the end-to-end output MSE with that leaf alone quantized and every
  other layer in full precision (an evaluator whose environment has λ = 0); the plan minimising the sum of
  sensitivities under the budget is solved exactly by scipy's MILP (HiGHS). ``n·C`` evaluations.
* ``random_baseline``: the best of N random plans at the budget. A plan draws each leaf's candidate uniformly,
  then, while it overspends, moves a random overspending leaf to a random cheaper candidate; then, while any
  leaf can move to a dearer candidate that still fits, moves a random such leaf to a random such candidate: plans
  end up spending the budget in every limited dimension, up to one step of one leaf, as a searched plan does.

Every plan is finally scored by the same plan evaluator (λ = 1: the PTQ error), so the MSEs compare directly.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np

from .costs import Budget, BudgetError, CostModel
from .evaluator import Evaluator


@dataclasses.dataclass
class BaselineResult:
    name: str
    assignment: np.ndarray
    cost: np.ndarray
    mse: float              # PTQ MSE of the plan on the calibration set
    evaluations: int
    wall_s: float
    detail: dict[str, Any] = dataclasses.field(default_factory=dict)


def _best(name: str, plans: np.ndarray, evaluator: Evaluator, cost: CostModel, t0: float, evals: int,
          **detail: Any) -> BaselineResult:
    mse = evaluator.evaluate_plans(plans)
    i = int(np.argmin(np.where(np.isnan(mse), np.inf, mse)))
    return BaselineResult(name, plans[i], cost.total(plans[i]), float(mse[i]), evals + len(plans),
                          time.perf_counter() - t0, {**detail, "all_mse": mse.tolist()})


def uniform_baseline(evaluator: Evaluator, cost: CostModel, budget: Budget) -> BaselineResult:
    """The best uniform plan within ``budget``."""
    t0 = time.perf_counter()
    space = evaluator.space
    plans = [space.uniform(c) for c in space.candidates]
    plans = np.array([p for p in plans if cost.fits(cost.total(p), budget)], dtype=np.int64)
    if not len(plans):
        raise BudgetError(f"no uniform plan meets the budget {budget.label}")
    res = _best("uniform", plans, evaluator, cost, t0, 0,
                labels=[space.candidates[int(p[0])].label for p in plans])
    res.detail["label"] = space.candidates[int(res.assignment[0])].label
    return res


def sensitivities(evaluator: Evaluator, progress: bool = False) -> np.ndarray:
    """``(n_leaves, n_cands)``: each leaf's end-to-end MSE at each candidate, alone (use an evaluator whose
    environment has λ = 0, i.e. every other layer in full precision)."""
    from tqdm.auto import tqdm

    n, c = len(evaluator.space.leaves), len(evaluator.space.candidates)
    every = np.arange(c, dtype=np.int64)[:, None]
    return np.stack([evaluator.evaluate(i, i + 1, every)
                     for i in tqdm(range(n), desc="IP sensitivities", disable=not progress, leave=False)])


def solve_ip(sens: np.ndarray, cost: CostModel, budget: Budget) -> np.ndarray:
    """``argmin Σ_i sens[i, a_i]`` s.t. the budget, one candidate per leaf, exactly (scipy.optimize.milp)."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    n, c = sens.shape
    if n and not np.isfinite(sens).any():
        raise ValueError("every per-layer sensitivity is NaN/Inf: the quantized model's output is not finite, so "
                         "the integer program has nothing to rank")
    d = cost.table.shape[-1]
    lim = np.asarray(budget.limits, dtype=np.float64)
    pick = np.kron(np.eye(n), np.ones((1, c)))                         # Σ_c x[i, c] = 1
    spend = (cost.table.reshape(n * c, d) / lim).T                     # rows scaled to O(1) for the solver
    room = (lim - cost.offset) / lim
    constraints = [LinearConstraint(pick, 1, 1)]
    for shrink in (0.0, 1e-7, 1e-5):      # tighten if the solver's feasibility tolerance let a plan overspend
        constraints_j = constraints + [LinearConstraint(spend, -np.inf, room - shrink)]
        res = milp(np.nan_to_num(sens.reshape(-1), nan=1e30, posinf=1e30), constraints=constraints_j,
                   integrality=np.ones(n * c), bounds=Bounds(0, 1))
        if res.x is None:
            raise BudgetError(f"the integer program has no solution for {budget.label}: {res.message}")
        a = res.x.reshape(n, c).argmax(axis=1)
        if cost.fits(cost.total(a), budget):
            return a.astype(np.int64)
    raise BudgetError(f"the integer program's plans overspend {budget.label} after tightening")


def ip_baseline(sens_evaluator: Evaluator, plan_evaluator: Evaluator, cost: CostModel,
                budget: Budget, progress: bool = False) -> BaselineResult:
    """HAWQ-V3 / MixDQ-style integer program over per-layer sensitivities."""
    t0 = time.perf_counter()
    sens = sensitivities(sens_evaluator, progress)
    t_sens = time.perf_counter() - t0
    a = solve_ip(sens, cost, budget)
    return _best("ip", a[None], plan_evaluator, cost, t0, sens.size, sensitivity_s=t_sens,
                 predicted=float(sens[np.arange(len(a)), a].sum()))


def random_plans(cost: CostModel, budget: Budget, count: int, seed: int = 0) -> np.ndarray:
    """``(count, n_leaves)`` random plans within ``budget`` (see the module docstring)."""
    rng = np.random.default_rng(seed)
    n, c, _ = cost.table.shape
    lim = np.asarray(budget.limits, dtype=np.float64)
    floor = cost.offset + cost.min_costs().sum(axis=0)
    if not cost.fits(floor, budget):
        raise BudgetError(f"no plan meets the budget {budget.label}")
    plans = np.empty((count, n), dtype=np.int64)
    for p in range(count):
        a = rng.integers(0, c, n)
        while True:
            total = cost.total(a)
            over = total > lim * (1 + 1e-9)
            if not over.any():
                break
            spend = (cost.table[:, :, over] / lim[over]).sum(axis=-1)          # (n, c) in the overspent dims
            now = spend[np.arange(n), a]
            movable = np.flatnonzero((spend < now[:, None] - 1e-12).any(axis=1))
            i = int(rng.choice(movable))
            cheaper = np.flatnonzero(spend[i] < now[i] - 1e-12)
            a[i] = int(rng.choice(cheaper))
        while True:   # then spend what the reduction (or the draw) left: each move raises the spend, so it ends
            room = lim * (1 + 1e-9) - cost.total(a)
            delta = cost.table - cost.table[np.arange(n), a][:, None, :]            # (n, c, d)
            up = (delta <= room).all(axis=-1) & ((delta / lim).sum(axis=-1) > 1e-12)
            movable = np.flatnonzero(up.any(axis=1))
            if not len(movable):
                break
            i = int(rng.choice(movable))
            a[i] = int(rng.choice(np.flatnonzero(up[i])))
        plans[p] = a
    return plans


def random_baseline(evaluator: Evaluator, cost: CostModel, budget: Budget, count: int = 20,
                    seed: int = 0) -> BaselineResult:
    """The best of ``count`` random plans at the budget."""
    t0 = time.perf_counter()
    return _best("random", random_plans(cost, budget, count, seed), evaluator, cost, t0, 0, count=count, seed=seed)
