import copy
import itertools

import numpy as np
import pytest

from tinydit import TinyDiT, calibration, eps, one_thread  # noqa: F401
from treeq_engine.plan import LayerConfig
from treeq_engine.search import Budget, BudgetError, CostModel, DiTRunner, Environment, Evaluator, SearchSpace
from treeq_engine.search import cost_model
from treeq_engine.search.baselines import (ip_baseline, random_baseline, random_plans, sensitivities, solve_ip,
                                           uniform_baseline)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("kind,limits", [("w", (3.1,)), ("wa", (3.4, 5.0)), ("bytes", (7.0,))])
def test_ip_is_exact_against_brute_force(kind, limits):
    rng = np.random.default_rng(len(kind))
    n, c, d = 6, 4, len(limits)
    table = rng.uniform(0.2, 1.2, (n, c, d))
    sens = rng.uniform(0, 1, (n, c))
    cost = CostModel(kind, table, np.zeros(d))
    b = Budget(kind, limits)
    a = solve_ip(sens, cost, b)
    best = min((sens[np.arange(n), p].sum(), p) for p in itertools.product(range(c), repeat=n)
               if cost.fits(cost.total(np.array(p)), b))
    assert sens[np.arange(n), a].sum() == pytest.approx(best[0])
    assert cost.fits(cost.total(a), b)
    with pytest.raises(BudgetError, match="no solution"):
        solve_ip(sens, cost, Budget(kind, tuple(0.1 for _ in limits)))
    with pytest.raises(ValueError, match="every per-layer sensitivity is NaN/Inf"):
        solve_ip(np.full_like(sens, np.nan), cost, b)


def test_random_plans_meet_the_budget_and_are_reproducible():
    rng = np.random.default_rng(0)
    cost = CostModel("wa", rng.uniform(0.1, 1.0, (30, 12, 2)), np.zeros(2))
    b = Budget("wa", (12.0, 14.0))
    p = random_plans(cost, b, 20, seed=3)
    totals = np.array([cost.total(a) for a in p])
    assert cost.fits(totals, b).all()
    assert len({tuple(a) for a in p}) == 20
    assert (totals / b.limits).max(axis=1).min() > 0.9          # repaired just inside the budget, not far below
    for a, total in zip(p, totals):   # and filled: no leaf can move to a dearer candidate that still fits
        delta = cost.table - cost.table[np.arange(30), a][:, None, :]
        up = (delta <= np.asarray(b.limits) - total).all(axis=-1) & ((delta / b.limits).sum(axis=-1) > 1e-12)
        assert not up.any()
    # on a grid of bits (every W with every A), each limited dimension is spent up to one step of one leaf
    grid = np.stack(np.broadcast_arrays(np.array([2.0, 3, 4, 8])[:, None], np.array([3.0, 4, 8])[None]), -1)
    bits = CostModel("wa", np.broadcast_to(grid.reshape(1, 12, 2) / 40, (40, 12, 2)).copy(), np.zeros(2))
    for limits in [(4.0, 8.0), (8.0, 4.0), (4.0, 4.0), (3.0, 3.0)]:
        spent = np.array([bits.total(a) for a in random_plans(bits, Budget("wa", limits), 10)])
        assert (spent <= np.array(limits) + 1e-9).all() and (spent >= np.array(limits) - 4 / 40 - 1e-9).all()
    np.testing.assert_array_equal(p, random_plans(cost, b, 20, seed=3))
    assert not np.array_equal(p, random_plans(cost, b, 20, seed=4))
    with pytest.raises(BudgetError, match="no plan meets"):
        random_plans(cost, Budget("wa", (1.0, 1.0)), 2)


def test_baselines_on_a_model():
    model = TinyDiT(depth=2, d=16, tokens=4, seed=7)
    inputs = calibration(model, n=6, seed=8)
    space = SearchSpace.build(model, [t[:2] for t in inputs])
    runner = DiTRunner(model, output_fn=eps)
    ptq = Evaluator(model, runner, space, inputs, Environment(LayerConfig(4, 4), 1.0), batch=6)
    alone = Evaluator(model, runner, space, inputs, Environment(LayerConfig(4, 4), 0.0), batch=6,
                      reference=ptq.reference())
    cost = cost_model(space, "wa")
    b = Budget.parse("W4A4")

    uni = uniform_baseline(ptq, cost, b)
    feasible = [c for c in space.candidates if c.w_bits <= 4 and c.a_bits <= 4]
    assert uni.detail["labels"] == [c.label for c in feasible]
    assert uni.mse == min(ptq.evaluate_plans(np.stack([space.uniform(c) for c in feasible])))
    assert uni.evaluations == len(feasible)

    sens = sensitivities(alone)
    assert sens.shape == (10, 12) and (sens > 0).all()
    one = copy.deepcopy(model)
    fp_env = Evaluator(one, DiTRunner(one, output_fn=eps), space, inputs, Environment(LayerConfig(4, 4), 0.0))
    np.testing.assert_allclose(sens[4], fp_env.evaluate(4, 5, np.arange(12)[:, None]), rtol=1e-6)
    ip = ip_baseline(alone, ptq, cost, b)
    assert ip.evaluations == 10 * 12 + 1 and cost.fits(ip.cost, b)
    assert ip.mse == pytest.approx(ptq.evaluate_plans(ip.assignment[None])[0])

    rnd = random_baseline(ptq, cost, b, count=5, seed=1)
    assert rnd.evaluations == 5 and rnd.mse == min(rnd.detail["all_mse"]) and cost.fits(rnd.cost, b)
