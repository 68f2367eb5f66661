import json

import numpy as np
import pytest
import torch

from tinydit import TinyDiT, calibration
from treeq_engine.kernels import PackedWeight
from treeq_engine.plan import BranchConfig, LayerConfig, PlanError
from treeq_engine.search import Budget, BudgetError, LatencyTable, SearchSpace, candidate_configs, check_budget
from treeq_engine.search import cost_model, describe, environment_config
from treeq_engine.search.costs import linear_bytes, roofline_us
from treeq_engine.search.space import Leaf


@pytest.fixture(scope="module")
def space():
    m = TinyDiT(depth=2, d=32, tokens=8)
    x, t, y = calibration(m, n=3)
    return SearchSpace.build(m, (x, t, y))


@pytest.mark.parametrize("text,kind,limits", [
    ("W4A4", "wa", (4, 4)), ("w3.5a4", "wa", (3.5, 4)), ("W4", "w", (4,)), ("A3", "a", (3,)),
    ("12MB", "bytes", (12e6,)), ("3.5MiB", "bytes", (3.5 * 2 ** 20,)), ("800kB", "bytes", (8e5,)),
    ("123456B", "bytes", (123456,)), ("350us", "latency", (350,)), ("1.2ms", "latency", (1200,))])
def test_budget_parse(text, kind, limits):
    b = Budget.parse(text)
    assert b.kind == kind and b.limits == pytest.approx(limits)
    assert Budget.parse(b.label).kind == kind


@pytest.mark.parametrize("text", ["W4B4", "4", "W", "12 parsecs", "W-1", "W0A4", ""])
def test_budget_parse_errors(text):
    with pytest.raises(BudgetError):
        Budget.parse(text)


def test_average_bits_are_parameter_and_mac_weighted(space, gen):
    cands = space.candidates
    a = torch.randint(0, len(cands), (len(space.leaves),), generator=gen).numpy()
    w = sum(leaf.params * cands[i].w_bits for leaf, i in zip(space.leaves, a)) / sum(l.params for l in space.leaves)
    act = sum(leaf.macs * cands[i].a_bits for leaf, i in zip(space.leaves, a)) / sum(l.macs for l in space.leaves)
    assert cost_model(space, "w").total(a) == pytest.approx([w])
    assert cost_model(space, "a").total(a) == pytest.approx([act])
    assert cost_model(space, "wa").total(a) == pytest.approx([w, act])
    # adaLN sees one row per sample, the token linears eight: MAC weights differ from parameter weights
    assert {leaf.tokens for leaf in space.leaves} == {1, 8}
    d = describe(space, a)
    assert d["w_bits"] == pytest.approx(w) and d["a_bits"] == pytest.approx(act)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_linear_bytes_match_a_packed_weight(bits, gen):
    n, k = 19, 45
    pw = PackedWeight.from_float(torch.randn(n, k, generator=gen), LayerConfig(bits, 8).weight_spec())
    stored = sum(t.numel() * t.element_size() for t in (pw.packed, pw.scale, pw.zero_point, pw.col_sum))
    leaf = Leaf("x", n, k, tokens=4, bias=True)
    assert linear_bytes(leaf, LayerConfig(bits, 8)) == stored + 2 * n
    assert linear_bytes(Leaf("x", n, k, 4, bias=False), None) == 2 * n * k
    with_branch = linear_bytes(leaf, LayerConfig(bits, 8, branch=BranchConfig("monarch", 3, 1)))
    assert with_branch - linear_bytes(leaf, LayerConfig(bits, 8)) == 2 * (3 * 3 * 15 + 3 * 7 * 3)


def test_model_bytes_include_fixed_layers_and_other_parameters(space):
    cm = cost_model(space, "bytes")
    a = space.uniform(LayerConfig(4, 4))
    leaves = sum(linear_bytes(leaf, LayerConfig(4, 4)) for leaf in space.leaves)
    fixed = sum(linear_bytes(leaf, cfg) for leaf, cfg in space.fixed)
    assert cm.total(a)[0] == leaves + fixed + 2 * space.other_params
    assert space.other_params > 0     # the label table and the positional embedding


def test_roofline_is_memory_bound_for_few_tokens_and_compute_bound_for_many():
    small4, small8 = roofline_us(1152, 4608, 1, 4, 8), roofline_us(1152, 4608, 1, 8, 8)
    assert small4 < small8                                     # fewer weight bytes, faster
    big4, big8 = roofline_us(1152, 4608, 65536, 4, 8), roofline_us(1152, 4608, 65536, 8, 8)
    assert big4 == pytest.approx(big8, rel=0.05)               # compute-bound: bits hardly matter
    assert big4 == pytest.approx(2 * 65536 * 4608 * 1152 / 1979e12 * 1e6 + 3.0, rel=0.05)
    assert roofline_us(64, 64, 1, 4, 4) >= 3.0                 # the launch floor


def test_latency_table(tmp_path, space):
    entries = [{"k": leaf.k, "n": leaf.n, "tokens": t, "w_bits": c.w_bits, "a_bits": c.a_bits, "branch": None,
                "us": float(leaf.n * c.w_bits + t)}
               for leaf in space.leaves for c in space.candidates for t in (1, 16)]
    entries.append({"k": 32, "n": 96, "tokens": 8, "w_bits": 4, "a_bits": 4,
                    "branch": {"kind": "monarch", "blocks": 4, "rank": 1}, "us": 99.0})
    p = tmp_path / "lut.json"
    p.write_text(json.dumps({"schema": "treeq-latency-lut", "version": 1, "device": "test", "entries": entries}))
    lut = LatencyTable.load(p)
    assert lut.lookup(32, 96, 16, 4, 4) == 96 * 4 + 16
    assert lut.lookup(32, 96, 8, 4, 4) == pytest.approx(96 * 4 + 8)         # interpolated in tokens
    assert lut.lookup(32, 96, 8, 4, 4, BranchConfig("monarch", 4, 1)) == 99.0
    cm = cost_model(space, "latency", latency_table=lut)
    a = space.uniform(LayerConfig(4, 4))
    assert cm.total(a)[0] == pytest.approx(sum(leaf.n * 4 + leaf.tokens for leaf in space.leaves))
    with pytest.raises(PlanError, match="no entry for K=32, N=96, W5A4"):
        lut.lookup(32, 96, 8, 5, 4)
    with pytest.raises(PlanError, match="outside the profiled range"):
        lut.lookup(32, 96, 17, 4, 4)
    bad = tmp_path / "bad.json"
    for doc, msg in [({"schema": "x"}, "not a latency table"),
                     ({"schema": "treeq-latency-lut", "version": 2, "entries": []}, "version 2"),
                     ({"schema": "treeq-latency-lut", "version": 1, "entries": [{"k": 1}]}, "entry 0 is malformed")]:
        bad.write_text(json.dumps(doc))
        with pytest.raises(PlanError, match=msg):
            LatencyTable.load(bad)


def test_check_budget_and_environment(space):
    cm = cost_model(space, "wa")
    b = Budget.parse("W4A4")
    check_budget(space, space.uniform(LayerConfig(4, 4)), b)
    with pytest.raises(BudgetError, match=r"violates the budget W4A4: a_bits = 8 > 4"):
        check_budget(space, space.uniform(LayerConfig(4, 8)), b)
    with pytest.raises(BudgetError, match=r"w_bits = 8 > 4; a_bits = 8 > 4"):
        check_budget(space, space.uniform(LayerConfig(8, 8)), b)
    assert environment_config(space, b, cm) == LayerConfig(4, 4)
    assert environment_config(space, Budget.parse("W4")) == LayerConfig(4, 8)   # no A limit: the most bits
    assert environment_config(space, Budget.parse("W3.5A3.9")) == LayerConfig(3, 3)
    with pytest.raises(BudgetError, match="no plan meets the budget W1.5"):
        environment_config(space, Budget.parse("W1.5"))
    # a measured table need not grow with the bits (here 2-bit weights are the slowest): the environment is
    # still the most precise uniform config within the budget, not the dearest
    entries = [{"k": leaf.k, "n": leaf.n, "tokens": leaf.tokens, "w_bits": c.w_bits, "a_bits": c.a_bits,
                "us": {2: 9.0, 3: 3.0, 4: 2.0, 8: 4.0}[c.w_bits]} for leaf in space.leaves for c in space.candidates]
    lat = cost_model(space, "latency", latency_table=LatencyTable(entries))
    n = len(space.leaves)
    assert environment_config(space, Budget("latency", (3.0 * n,)), lat) == LayerConfig(4, 8)
    assert environment_config(space, Budget("latency", (9.0 * n,)), lat) == LayerConfig(8, 8)
    assert cm.axis(np.array([[4.0, 4.0], [3.0, 5.0], [2.0, 4.0]]), b).tolist() == [1.0, 1.25, 1.0]
    assert cm.axis(np.array([[3.0, 4.0]]), Budget.parse("W3A4")).tolist() == [1.0]
    # a node: limits scaled by its share of parameters (W) and MACs (A); uniform W4A4 sits at 1 anywhere
    n = cm.table.shape[0]
    for lo, hi in [(0, 1), (1, n - 1), (0, n)]:
        node = cm.leaf_costs(lo, hi, np.array([space.uniform(LayerConfig(4, 4))[lo:hi],
                                               space.uniform(LayerConfig(2, 8))[lo:hi]]))
        assert np.allclose(cm.axis(node, b, (lo, hi)), [1.0, 2.0])


def test_candidate_configs_errors():
    assert [c.label for c in candidate_configs((2, 4), (8,))] == ["W2A8", "W4A8"]
    with pytest.raises(PlanError, match=r"weight bit-width\(s\) \[5\]"):
        candidate_configs((2, 5), (8,))
    with pytest.raises(PlanError, match="repeat"):
        candidate_configs((4, 4), (8,))
    with pytest.raises(PlanError, match="no candidate activation"):
        candidate_configs((4,), ())
