import copy
import itertools
import json

import numpy as np
import pytest

import tinydit
from tinydit import eps, one_thread  # noqa: F401
from treeq_engine.plan import LayerConfig
from treeq_engine.search import (Budget, BudgetError, DiTRunner, Environment, Evaluator, SearchSpace, cost_model,
                                 tree_search)
from treeq_engine.search.space import candidate_configs

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    return tinydit.setup(depth=2, d=16, tokens=4, seed=5, n=8)


def make(tiny, env=LayerConfig(4, 4), lam=1.0, space=None, group=16):
    model = copy.deepcopy(tiny[0])
    space = space or tiny[2]
    return Evaluator(model, DiTRunner(model, output_fn=eps), space, tiny[1], Environment(env, lam), batch=8,
                     group=group)


def test_without_drops_the_root_front_is_the_exhaustive_front(tiny):
    """Three candidates on 5 leaves and K = 243 ≥ 3⁵: nothing is dropped, so the root holds every plan, each
    scored as a whole plan, and the best plan at any budget is the brute-force best."""
    model, inputs, big = tiny
    space = SearchSpace(big.leaves[:5], candidate_configs((2, 4, 8), (8,)), big.fixed[:0], 0)
    ev = make(tiny, env=LayerConfig(4, 8), space=space)
    cost = cost_model(space, "w")
    res = tree_search(ev, cost, keep=243, progress=False)
    assert len(res.root.mse) == 243 and res.evaluations == 9 + 9 + 81 + 243   # (01), (23); ((01)(23)); (…)(4)
    everything = np.array(list(itertools.product(range(3), repeat=5)))
    brute = ev.evaluate_plans(everything)
    order = np.lexsort(everything.T[::-1])
    root = res.root.configs[np.lexsort(res.root.configs.T[::-1])]
    np.testing.assert_array_equal(root, everything[order])
    for text in ("W3", "W4", "W5.5"):
        b = Budget.parse(text)
        ok = cost.fits(np.array([cost.total(a) for a in everything]), b)
        a, _, mse = res.best(b, cost)
        assert mse == pytest.approx(brute[ok].min(), rel=1e-6)
        assert cost.fits(cost.total(a), b)


def test_one_leaf_and_a_node_that_scores_only_nan(tiny):
    """One leaf is scored as the whole tree (its bound counts it); a node whose every config scores NaN (the
    quantized model overflows there) is an error naming its leaves, not a plan chosen among NaNs."""
    model, inputs, big = tiny
    space = SearchSpace(big.leaves[:1], big.candidates, big.fixed[:0], 0)
    ev = make(tiny, space=space)
    res = tree_search(ev, cost_model(space, "wa"), keep=16, progress=False)
    assert res.evaluations == len(space.candidates) == res.evaluation_bound
    ev = make(tiny)
    ev.evaluate = lambda lo, hi, rows: np.full(len(rows), np.nan)
    with pytest.raises(ValueError, match=r"every config of leaves 0\.\.0 \(blocks\.0\.\S+ \.\. .*scored NaN"):
        tree_search(ev, cost_model(ev.space, "wa"), keep=4, progress=False)


def test_counts_pruning_and_the_uniform_anchor(tiny):
    ev = make(tiny)
    space = ev.space
    cost = cost_model(space, "wa")
    b = Budget.parse("W4A4")
    res = tree_search(ev, cost, keep=4, budget=b, progress=False)
    n = len(space.leaves)
    c = len(space.candidates)
    assert res.evaluation_bound == (n - 1) * 16 + n * c   # the merges, and the leaves scored once (C = 12 > K)
    per_level = [lv["evaluations"] for lv in res.levels]
    assert per_level[0] > 0                      # 12 candidates > K = 4: leaves are scored and dropped first
    assert sum(per_level) == res.evaluations == ev.evaluations
    assert per_level[0] <= n * c and sum(per_level[1:]) <= (n - 1) * 16
    assert res.evaluations <= res.evaluation_bound
    totals = cost.offset + res.root.cost
    assert cost.fits(totals, b).all()            # pruning: every plan that reached the root meets the budget
    env = space.candidates.index(LayerConfig(4, 4))
    assert (res.root.configs == env).all(axis=1).any()       # the environment-uniform plan survived
    uniform = ev.evaluate_plans(space.uniform(LayerConfig(4, 4))[None])[0]
    a, total, mse = res.best(b, cost)
    assert mse <= uniform
    assert mse == pytest.approx(ev.evaluate_plans(a[None])[0], rel=1e-9)   # λ = 1: the root's score is PTQ's
    kept = np.array(res.root_candidates["kept"])
    assert kept.sum() == 4 and len(kept) == len(res.root_candidates["mse"])
    with pytest.raises(BudgetError, match="no plan on the root.s front meets W1.9A3"):
        res.best(Budget.parse("W1.9A3"), cost)
    with pytest.raises(BudgetError, match="budget kind 'w' does not match"):
        tree_search(ev, cost, budget=Budget.parse("W4"), progress=False)


def test_a_warm_start_plan_reaches_the_root_and_bounds_the_result(tiny):
    """An elite plan (here: the worst of 40 random plans at the budget, which the Pareto drop would not keep on
    merit) keeps its slice at every node, is scored whole at the root, and the search's answer is at least as
    good; the K slots stay K; bad elites are refused."""
    from treeq_engine.search.baselines import random_plans

    ev = make(tiny)
    space, cost, b = ev.space, cost_model(ev.space, "wa"), Budget.parse("W4A4")
    plans = random_plans(cost, b, 40, seed=3)
    worst = plans[int(np.argmax(ev.evaluate_plans(plans)))]
    plain = tree_search(ev, cost, keep=4, budget=b, progress=False)
    assert not (plain.root.configs == worst).all(axis=1).any()
    res = tree_search(ev, cost, keep=4, budget=b, progress=False, elites=worst[None])
    assert len(res.root.mse) == 4
    assert (res.root.configs == worst).all(axis=1).any()
    assert (res.root.configs == space.uniform(LayerConfig(4, 4))).all(axis=1).any()   # the anchor still holds
    _, _, mse = res.best(b, cost)
    assert mse <= ev.evaluate_plans(worst[None])[0]
    best_random = plans[int(np.argmin(ev.evaluate_plans(plans)))]
    seeded = tree_search(ev, cost, keep=4, budget=b, progress=False, elites=np.stack([best_random, worst]))
    assert seeded.best(b, cost)[2] <= ev.evaluate_plans(best_random[None])[0] * (1 + 1e-9)
    with pytest.raises(ValueError, match="shape"):
        tree_search(ev, cost, keep=4, budget=b, progress=False, elites=worst[:-1][None])
    with pytest.raises(ValueError, match="outside"):
        tree_search(ev, cost, keep=4, budget=b, progress=False, elites=np.full((1, len(worst)), 99))
    with pytest.raises(BudgetError, match="do not meet the budget W4A4"):
        tree_search(ev, cost, keep=4, budget=b, progress=False, elites=space.uniform(LayerConfig(8, 8))[None])


def test_resume_after_a_kill_gives_the_identical_result(tiny, tmp_path):
    cost = cost_model(tiny[2], "w")
    b = Budget.parse("W3")
    full = tree_search(make(tiny, LayerConfig(3, 8)), cost, keep=6, budget=b, progress=False)

    class Killed(Exception):
        pass

    def kill_at(level):
        def hook(lv):
            if lv == level:
                raise Killed
        return hook

    state = tmp_path / "state.json"
    with pytest.raises(Killed):
        tree_search(make(tiny, LayerConfig(3, 8)), cost, keep=6, budget=b, state_path=state, progress=False,
                    on_level=kill_at(2))
    assert json.loads(state.read_text())["level"] == 2
    ev = make(tiny, LayerConfig(3, 8))
    resumed = tree_search(ev, cost, keep=6, budget=b, state_path=state, resume=True, progress=False)
    assert 0 < ev.evaluations < full.evaluations                 # only the levels after 2 ran again
    assert resumed.evaluations == full.evaluations
    for a, c in [(resumed.root, full.root), (resumed.front, full.front)]:
        np.testing.assert_array_equal(a.configs, c.configs)
        np.testing.assert_array_equal(a.mse, c.mse)
        np.testing.assert_array_equal(a.cost, c.cost)
    assert resumed.root_candidates == full.root_candidates
    assert [lv["evaluations"] for lv in resumed.levels] == [lv["evaluations"] for lv in full.levels]
    # a finished state resumes to the same answer with no work; another search's state is refused
    ev2 = make(tiny, LayerConfig(3, 8))
    again = tree_search(ev2, cost, keep=6, budget=b, state_path=state, resume=True, progress=False)
    assert ev2.evaluations == 0 and np.array_equal(again.root.configs, full.root.configs)
    with pytest.raises(ValueError, match="belongs to a different search"):
        tree_search(make(tiny, LayerConfig(3, 8)), cost, keep=5, budget=b, state_path=state, resume=True,
                    progress=False)
    with pytest.raises(ValueError, match="belongs to a different search"):
        tree_search(make(tiny, LayerConfig(3, 8), lam=0.5), cost, keep=6, budget=b, state_path=state,
                    resume=True, progress=False)
    with pytest.raises(ValueError, match="belongs to a different search"):   # only the budget differs
        tree_search(make(tiny, LayerConfig(3, 8)), cost, keep=6, budget=Budget.parse("W4"), state_path=state,
                    resume=True, progress=False)
    doc = json.loads(state.read_text())
    del doc["fingerprint_scheme"]   # a state from before exact fingerprints: refused with the reason
    state.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="earlier TreeQ whose search fingerprints"):
        tree_search(make(tiny, LayerConfig(3, 8)), cost, keep=6, budget=b, state_path=state, resume=True,
                    progress=False)
    state.write_text(state.read_text()[:100])   # a truncated state names the file
    with pytest.raises(ValueError, match="cannot be read as a TSS state file"):
        tree_search(make(tiny, LayerConfig(3, 8)), cost, keep=6, budget=b, state_path=state, resume=True,
                    progress=False)


def test_lambda_changes_the_environment_not_the_node(tiny):
    """At λ = 0 a node is scored inside the FP model: a one-leaf node's score is its error alone."""
    ev0 = make(tiny, lam=0.0)
    evfp = make(tiny, env=LayerConfig(16, 16), lam=1.0,
                space=SearchSpace(tiny[2].leaves, tiny[2].candidates + (LayerConfig(16, 16),), (), 0))
    rows = np.arange(12)[:, None]
    alone = ev0.evaluate(3, 4, rows)
    assert np.all(alone > 0)
    # the environment at bf16 "16 bits" with the fixed layers dropped from the space (left FP) is the same
    np.testing.assert_allclose(evfp.evaluate(3, 4, rows), alone, rtol=1e-6)
    assert not np.allclose(make(tiny, lam=1.0).evaluate(3, 4, rows), alone, rtol=1e-2)
