import json

import pytest

from tinydit import TinyDiT, calibration, eps, one_thread  # noqa: F401
from treeq_engine.plan import LayerConfig, PlanError, QuantPlan
from treeq_engine.search import Budget, BudgetError, DiTRunner, SearchSpace, describe
from treeq_engine.search.run import SearchConfig, load_plan, search, validate_plan

pytestmark = pytest.mark.usefixtures("one_thread")


def test_search_writes_a_valid_plan_report_plot_and_baselines(tmp_path):
    model = TinyDiT(depth=2, d=16, tokens=4, seed=21)
    inputs = calibration(model, n=8, seed=22)
    cfg = SearchConfig(Budget.parse("W3A4"), lam=1.0, keep=4, batch=8, group=8,
                       baselines=("uniform", "ip", "random"), random_count=4)
    out = search(model, DiTRunner(model, output_fn=eps), inputs, cfg, out_dir=tmp_path, progress=False,
                 model_name="tiny")
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["pareto.png", "plan.json", "plan_ip.json", "plan_random.json", "plan_uniform.json",
                     "report.json", "tss_state.json"]
    assert (tmp_path / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plan = load_plan(tmp_path / "plan.json")
    assert plan == out.plan and plan.meta["budget"]["label"] == "W3A4" and plan.meta["env"] == "W3A4"
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["tss"]["mse"] == out.ptq_mse == plan.meta["ptq_mse"]
    assert report["tss"]["costs"]["w_bits"] <= 3 + 1e-9 and report["tss"]["costs"]["a_bits"] <= 4 + 1e-9
    assert set(report["baselines"]) == {"uniform", "ip", "random"}
    assert report["baselines"]["ip"]["evaluations"] == 10 * 12 + 1
    assert out.ptq_mse <= report["baselines"]["uniform"]["mse"]    # the anchor: never worse than uniform at λ = 1
    assert report["front"] and all(len(p["cost"]) == 2 for p in report["front"])

    space = SearchSpace.build(model, [t[:2] for t in inputs])
    validate_plan(plan, model, space, Budget.parse("W3A4"))
    with pytest.raises(BudgetError, match="violates the budget W2.5A4"):
        validate_plan(plan, model, space, Budget.parse("W2.5A4"))
    with pytest.raises(PlanError, match="does not have"):
        validate_plan(plan.with_layer("blocks.9.attn.qkv", LayerConfig(4, 4)), model, space)
    # a bytes budget counts the fixed layers as the plan has them: left out (bf16) they cost more than at W8A8
    full = describe(space, space.assignment(plan))["bytes"]
    validate_plan(plan, model, space, Budget("bytes", (full,)))
    d = plan.to_dict()
    for leaf, _ in space.fixed:
        del d["layers"][leaf.name]
    with pytest.raises(BudgetError, match=r"violates the budget .*: bytes = "):
        validate_plan(QuantPlan.from_dict(d), model, space, Budget("bytes", (full,)))
    with pytest.raises(PlanError, match="unsupported weight bit-width 5"):
        QuantPlan.from_dict({**plan.to_dict(), "layers": {"blocks.0.attn.qkv": {"w_bits": 5, "a_bits": 4}}})
    with pytest.raises(PlanError, match="does not exist"):
        load_plan(tmp_path / "nope.json")


def test_search_with_lambda_reports_ptq_separately(tmp_path):
    model = TinyDiT(depth=1, d=16, tokens=4, seed=23)
    inputs = calibration(model, n=4, seed=24)
    out = search(model, DiTRunner(model, output_fn=eps), inputs,
                 SearchConfig(Budget.parse("W4"), lam=0.0, keep=4, batch=4), progress=False)
    assert out.plan.meta["lambda"] == 0.0 and out.plan.meta["env"] == "W4A8"
    assert out.ptq_mse > out.plan.meta["search_mse"] > 0     # λ = 0: the root was scored in an FP environment
    with pytest.raises(ValueError, match="unknown baseline"):
        SearchConfig(Budget.parse("W4"), baselines=("greedy",))


def test_search_warm_started_from_ip_is_never_worse_than_ip(tmp_path):
    """``elites=("ip",)``: the IP plan is computed first (and reused as the IP baseline), reaches the root and
    bounds the answer; its evaluations are reported; a plan file works as a warm start too."""
    model = TinyDiT(depth=2, d=16, tokens=4, seed=31)
    inputs = calibration(model, n=8, seed=32)
    runner = DiTRunner(model, output_fn=eps)
    cfg = SearchConfig(Budget.parse("W3A4"), keep=2, batch=8, group=8, baselines=("ip",), elites=("ip",))
    out = search(model, runner, inputs, cfg, out_dir=tmp_path / "a", progress=False)
    ip = out.baselines["ip"]
    assert out.ptq_mse <= ip.mse * (1 + 1e-9)
    space = SearchSpace.build(model, [t[:2] for t in inputs])
    assert (out.result.root.configs == ip.assignment).all(axis=1).any()
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert report["tss"]["warm_start"]["ip"] == {"evaluations": 10 * 12 + 1, "wall_s": ip.wall_s, "reused": False}
    assert report["tss"]["evaluations_total"] == out.result.evaluations + 121 and report["elites"] == ["ip"]
    # a resumed search reads the IP plan back instead of recomputing it, and ends identically
    from treeq_engine.search import baselines as bl
    calls = []
    real = bl.sensitivities
    bl.sensitivities = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        resumed = search(model, runner, inputs, cfg, out_dir=tmp_path / "a", resume=True, progress=False)
    finally:
        bl.sensitivities = real
    assert not calls and resumed.plan.layers == out.plan.layers and resumed.ptq_mse == out.ptq_mse
    assert json.loads((tmp_path / "a" / "report.json").read_text())["tss"]["warm_start"]["ip"]["reused"]
    assert out.plan.meta["elites"] == ["ip"]
    # the IP plan as a file, without the IP baseline: the same tree
    space.plan(ip.assignment).save(tmp_path / "ip.json")
    again = search(model, runner, inputs, SearchConfig(Budget.parse("W3A4"), keep=2, batch=8, group=8,
                                                       elites=(str(tmp_path / "ip.json"),)), progress=False)
    assert again.baselines == {} and again.ptq_mse == out.ptq_mse
    assert space.assignment(again.plan).tolist() == space.assignment(out.plan).tolist()
    with pytest.raises(BudgetError, match="violates the budget W2.5A4"):
        search(model, runner, inputs, SearchConfig(Budget.parse("W2.5A4"), keep=2, batch=8, group=8,
                                                   elites=(str(tmp_path / "ip.json"),)), progress=False)
    with pytest.raises(ValueError, match="elites and env_plan must be"):
        SearchConfig(Budget.parse("W4"), elites=("",))
    with pytest.raises(ValueError, match="got the string 'ip'"):
        SearchConfig(Budget.parse("W4"), elites="ip")
    # IP's plan as the environment: nodes are scored inside it; it is kept, so the answer is never worse
    env = search(model, runner, inputs, SearchConfig(Budget.parse("W3A4"), keep=2, batch=8, group=8, env_plan="ip"),
                 progress=False)
    assert env.plan.meta["env"] == "plan:ip" and env.plan.meta["env_plan"] == "ip"
    assert env.report["env"]["source"] == "plan:ip" and env.report["env"]["plan"]
    assert env.ptq_mse <= ip.mse * (1 + 1e-9)
    assert (env.result.root.configs == ip.assignment).all(axis=1).any()


@pytest.mark.parametrize("kind", ["bytes", "latency"])
def test_search_with_byte_and_latency_budgets(kind):
    from treeq_engine.search import cost_model

    model = TinyDiT(depth=1, d=16, tokens=4, seed=25)
    inputs = calibration(model, n=4, seed=26)
    space = SearchSpace.build(model, [t[:2] for t in inputs])
    cm = cost_model(space, kind)
    w4 = cm.total(space.uniform(LayerConfig(4, 8)))[0]
    w8 = cm.total(space.uniform(LayerConfig(8, 8)))[0]
    budget = Budget(kind, ((w4 + w8) / 2,))            # between uniform W4A8 and W8A8
    out = search(model, DiTRunner(model, output_fn=eps), inputs,
                 SearchConfig(budget, keep=4, batch=4, baselines=("uniform",)), space=space, progress=False)
    assert out.plan.meta["env"] == "W4A8"             # the dearest uniform config within the budget
    spent = out.plan.meta["costs"]["bytes" if kind == "bytes" else "us"]
    assert spent <= budget.limits[0] * (1 + 1e-9)
    assert out.ptq_mse <= out.baselines["uniform"].mse
