import itertools

import numpy as np
import pytest

from treeq_engine.search.pareto import nondominated_fronts, pareto_drop, thin_evenly


def brute_fronts(obj):
    left, fronts = set(range(len(obj))), []
    while left:
        f = sorted(i for i in left if not any(np.all(obj[j] <= obj[i]) and np.any(obj[j] < obj[i]) for j in left))
        fronts.append(f)
        left -= set(f)
    return fronts


@pytest.mark.parametrize("seed", range(4))
def test_nondominated_fronts_match_brute_force(seed):
    rng = np.random.default_rng(seed)
    obj = rng.integers(0, 6, size=(40, 2 + seed % 2)).astype(float)   # many ties and duplicates
    got = [f.tolist() for f in nondominated_fronts(obj)]
    assert got == brute_fronts(obj)
    assert sorted(itertools.chain(*got)) == list(range(40))


def test_nan_mse_is_worst():
    fronts = nondominated_fronts(np.array([[2.5, np.nan], [2.0, 5.0], [3.0, 4.0]]))
    assert [f.tolist() for f in fronts] == [[1, 2], [0]]


def test_pareto_drop_keeps_the_front_then_fills_from_the_next():
    rng = np.random.default_rng(0)
    cost = rng.uniform(2, 8, 200)
    mse = np.exp(-cost) + rng.uniform(0, 0.05, 200)
    fronts = nondominated_fronts(np.stack([cost, mse], 1))
    k = len(fronts[0]) + 3
    kept = pareto_drop(cost, mse, k)
    assert len(kept) == k == len(set(kept.tolist()))
    assert set(fronts[0].tolist()) <= set(kept.tolist())
    assert set(kept.tolist()) - set(fronts[0].tolist()) <= set(fronts[1].tolist())
    assert np.all(np.diff(cost[kept]) >= 0)                      # returned in cost order


def test_thinning_is_even_along_cost_and_spans_the_front():
    cost = np.linspace(2, 8, 101)                                 # one front: MSE falls as cost rises
    mse = 1 / cost
    kept = pareto_drop(cost, mse, 16)
    assert cost[kept][0] == 2 and cost[kept][-1] == 8
    # each kept point lies within half a grid step (0.03) of its target, so gaps are 0.4 ± 0.06
    np.testing.assert_allclose(np.diff(cost[kept]), 0.4, atol=0.061)
    assert pareto_drop(cost, mse, 1).tolist() == [50]             # one slot: the median-cost point
    shuffled = np.random.default_rng(1).permutation(101)
    again = pareto_drop(cost[shuffled], mse[shuffled], 16)
    assert sorted(shuffled[again].tolist()) == sorted(kept.tolist())     # order of the input does not matter


def test_always_keeps_the_anchor_and_small_sets_pass_through():
    cost = np.linspace(2, 8, 50)
    mse = 1 / cost
    mse[20] = 10.0                                                # dominated by far: never kept on merit
    assert 20 not in pareto_drop(cost, mse, 8)
    kept = pareto_drop(cost, mse, 8, always=20)
    assert len(kept) == 8 and 20 in kept
    assert pareto_drop(cost[:5], mse[:5], 16).tolist() == [0, 1, 2, 3, 4]
    assert thin_evenly(cost, mse, np.arange(50), 2) == [0, 49]


def test_several_elites_share_the_k_slots_and_one_elite_behaves_as_before():
    cost = np.linspace(2, 8, 50)
    mse = 1 / cost
    mse[[5, 20, 33]] = 10.0                                       # all three dominated by far
    kept = pareto_drop(cost, mse, 8, always=[20, 5, 33, 20])
    assert len(kept) == 8 and {5, 20, 33} <= set(kept.tolist())
    rest = [i for i in kept.tolist() if i not in (5, 20, 33)]
    assert len(rest) == 5 and all(mse[i] < 1 for i in rest)      # the other slots go to the front, on merit
    # an elite the drop keeps on merit costs no slot
    assert pareto_drop(cost, 1 / cost, 8, always=[0]).tolist() == pareto_drop(cost, 1 / cost, 8).tolist()
    assert pareto_drop(cost, mse, 8, always=[20]).tolist() == pareto_drop(cost, mse, 8, always=20).tolist()
    assert pareto_drop(cost, mse, 2, always=[5, 20, 33]).tolist() == [5, 20, 33]   # more elites than K


def test_pareto_drop_errors():
    with pytest.raises(ValueError, match="both be"):
        pareto_drop(np.zeros((3, 2)), np.zeros(3), 2)
    with pytest.raises(ValueError, match="keep must be positive"):
        pareto_drop(np.zeros(3), np.zeros(3), 0)
    with pytest.raises(ValueError, match=r"always=\[7\]"):
        pareto_drop(np.zeros(3), np.zeros(3), 2, always=7)
