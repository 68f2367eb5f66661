"""The evaluator against a brute-force oracle: convert a fresh copy of the model with the node at the candidate
and everything else at the environment, run the whole forward, take the MSE against the FP model."""
import copy

import numpy as np
import pytest
import torch

import tinydit
from tinydit import eps, one_thread  # noqa: F401
from treeq_engine.nn import convert, quant_layers
from treeq_engine.plan import LayerConfig, PlanError, QuantPlan
from treeq_engine.search import DiTRunner, Environment, Evaluator, SearchSpace
from treeq_engine.search.space import candidate_configs

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup():
    return tinydit.setup(depth=3, d=24, tokens=6, seed=3, n=10)


def brute_mse(model, inputs, space, env, lo, hi, row):
    m = copy.deepcopy(model)
    with torch.no_grad():
        fp = eps(m(*inputs)).double()
    fixed = {leaf.name: cfg for leaf, cfg in space.fixed}
    layers = {}
    for i, leaf in enumerate(space.leaves):
        outside = env.config if env.plan is None else env.plan[i]
        layers[leaf.name] = space.candidates[row[i - lo]] if lo <= i < hi else outside
    layers.update(fixed)
    convert(m, QuantPlan(layers))
    node = set(space.names[lo:hi])
    for name, q in quant_layers(m).items():
        q.set_noise_scale(1.0 if name in node else env.lam)
    with torch.no_grad():
        out = eps(m(*inputs)).double()
    return float(((out - fp) ** 2).mean())


def test_space_leaves_follow_the_forward_order(setup):
    model, inputs, space = setup
    names = space.names
    assert len(names) == 15 and names[:5] == ("blocks.0.adaLN_modulation.1", "blocks.0.attn.qkv",
                                             "blocks.0.attn.proj", "blocks.0.mlp.fc1", "blocks.0.mlp.fc2")
    assert [leaf.name for leaf, _ in space.fixed] == ["x_embedder.proj", "t_embedder.mlp.0", "t_embedder.mlp.2",
                                                      "final_layer.adaLN_modulation.1", "final_layer.linear"]
    assert all(cfg == LayerConfig(8, 8) for _, cfg in space.fixed)
    leaf = space.leaves[3]
    assert (leaf.n, leaf.k, leaf.tokens) == (48, 24, 6)
    mlp_only = SearchSpace.build(model, [t[:2] for t in inputs], include=r"mlp\.fc", fixed_config=None)
    assert len(mlp_only.leaves) == 6 and all(cfg is None for _, cfg in mlp_only.fixed)
    plan = space.plan(space.uniform(LayerConfig(3, 4)))
    assert list(plan.layers)[:2] == list(names[:2]) and plan.layers["final_layer.linear"] == LayerConfig(8, 8)
    assert (space.assignment(plan) == space.uniform(LayerConfig(3, 4))).all()
    with pytest.raises(PlanError, match="one candidate index per leaf"):
        space.plan([0, 1])
    with pytest.raises(PlanError, match=r"candidate indices must be in \[0, 12\)"):
        space.plan(np.full(15, 12))
    with pytest.raises(PlanError, match="W16A16 is not a candidate"):
        space.assignment(plan.with_layer(names[0], LayerConfig(16, 16)))
    with pytest.raises(PlanError, match="no leaves"):
        SearchSpace.build(model, [t[:2] for t in inputs], include="nothing-matches")


def test_runner_composes_to_the_model(setup):
    model, inputs, _ = setup
    runner = DiTRunner(model, output_fn=eps)
    state = inputs
    for s in range(runner.num_segments):
        state = runner.run(s, state)
    with torch.no_grad():
        torch.testing.assert_close(runner.output(state), eps(model(*inputs)), rtol=0, atol=0)
    assert runner.segment_of("blocks.2.mlp.fc1") == 3 and runner.segment_of("final_layer.linear") == 4
    assert runner.segment_of("t_embedder.mlp.0") == 0
    with pytest.raises(TypeError, match="needs model.embed"):
        DiTRunner(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("lam", [1.0, 0.5, 0.0])
def test_evaluate_matches_brute_force(setup, lam, gen):
    model, inputs, space = setup
    model = copy.deepcopy(model)
    env = Environment(LayerConfig(4, 4), lam)
    ev = Evaluator(model, DiTRunner(model, output_fn=eps), space, inputs, env, batch=4, group=3)
    got, want = [], []
    for lo, hi in [(0, 2), (6, 9), (14, 15), (0, 15)]:
        rows = torch.randint(0, len(space.candidates), (4, hi - lo), generator=gen).numpy()
        got += list(ev.evaluate(lo, hi, rows))
        want += [brute_mse(setup[0], inputs, space, env, lo, hi, r) for r in rows]
    tinydit.assert_scores_close(got, want)
    assert ev.evaluations == 16


@pytest.mark.parametrize("lam", [1.0, 0.5])
def test_an_environment_plan_scores_nodes_inside_that_plan(setup, lam, gen):
    """With an environment plan, every layer outside the node runs at the plan's config for it (errors scaled by
    λ): brute force agrees, the plan's own slice scores as the whole plan does at λ = 1, and a plan of the wrong
    length is refused."""
    model, inputs, space = setup
    model = copy.deepcopy(model)
    n = len(space.leaves)
    a = torch.randint(0, len(space.candidates), (n,), generator=gen).numpy()
    env = Environment(LayerConfig(4, 4), lam, plan=tuple(space.candidates[i] for i in a))
    ev = Evaluator(model, DiTRunner(model, output_fn=eps), space, inputs, env, batch=4, group=3)
    for lo, hi in [(0, 2), (6, 9), (14, 15)]:
        rows = np.concatenate([a[None, lo:hi], torch.randint(0, len(space.candidates), (2, hi - lo),
                                                             generator=gen).numpy()])
        got = ev.evaluate(lo, hi, rows)
        want = [brute_mse(setup[0], inputs, space, env, lo, hi, r) for r in rows]
        np.testing.assert_allclose(got, want, rtol=1e-5)
        if lam == 1.0:
            np.testing.assert_allclose(got[0], ev.evaluate_plans(a[None])[0], rtol=1e-6)
    assert env.to_dict()["plan"][0] == space.candidates[a[0]].to_dict()
    assert "plan" not in Environment(LayerConfig(4, 4), lam).to_dict()      # earlier fingerprints unchanged
    with pytest.raises(PlanError, match="3 configs for 15 searched leaves"):
        Evaluator(model, DiTRunner(model, output_fn=eps), space, inputs,
                  Environment(LayerConfig(4, 4), plan=env.plan[:3]), batch=4)
    with pytest.raises(PlanError, match="environment plan must be"):
        Environment(LayerConfig(4, 4), plan=("W4A4",))


def test_candidate_batching_does_not_change_scores(setup, gen):
    model, inputs, space = setup
    model = copy.deepcopy(model)
    runner = DiTRunner(model, output_fn=eps)
    rows = torch.randint(0, len(space.candidates), (7, 5), generator=gen).numpy()
    scores = [Evaluator(model, runner, space, inputs, Environment(LayerConfig(3, 8)), batch=b, group=g)
              .evaluate(5, 10, rows) for b, g in [(10, 1), (3, 7), (4, 2)]]
    tinydit.assert_scores_close(scores[1], scores[0])
    tinydit.assert_scores_close(scores[2], scores[0])
    again = Evaluator(model, runner, space, inputs, Environment(LayerConfig(3, 8)), batch=3, group=7)
    np.testing.assert_array_equal(again.evaluate(5, 10, rows), scores[1])      # deterministic


def test_per_sample_weights(setup, gen):
    model, inputs, space = copy.deepcopy(setup[0]), setup[1], setup[2]
    runner = DiTRunner(model, output_fn=eps)
    w = torch.rand(10, generator=gen, dtype=torch.float64)
    w[3] = 0.0
    env = Environment(LayerConfig(4, 4), 1.0)
    plain = Evaluator(model, runner, space, inputs, env, batch=3, group=4)
    weighted = Evaluator(model, runner, space, inputs, env, batch=3, group=4, weights=w)
    ones = Evaluator(model, runner, space, inputs, env, batch=3, group=4, weights=torch.ones(10))
    rows = torch.randint(0, len(space.candidates), (5, 3), generator=gen).numpy()
    np.testing.assert_allclose(ones.evaluate(4, 7, rows), plain.evaluate(4, 7, rows), rtol=1e-12)
    # brute force: per-sample MSEs, weighted mean
    per_sample = np.stack([Evaluator(model, runner, space, [t[i:i + 1] for t in inputs], env).evaluate(4, 7, rows)
                           for i in range(10)], axis=1)
    want = per_sample @ w.numpy() / w.sum().item()
    np.testing.assert_allclose(weighted.evaluate(4, 7, rows), want, rtol=1e-6)
    assert plain.fingerprint() != weighted.fingerprint()
    for bad in (torch.ones(9), -torch.ones(10), torch.zeros(10), torch.full((10,), float("nan"))):
        with pytest.raises(ValueError, match="weights must be"):
            Evaluator(model, runner, space, inputs, env, weights=bad)


def test_full_precision_candidates_score_zero_and_errors(setup):
    model, inputs, space = copy.deepcopy(setup[0]), setup[1], setup[2]
    fp_space = SearchSpace(space.leaves, candidate_configs((16, 4), (16,)), space.fixed, space.other_params)
    ev = Evaluator(model, DiTRunner(model, output_fn=eps), fp_space, inputs, Environment(LayerConfig(16, 16), 0.0))
    assert ev.evaluate_plans(np.zeros((1, 15), dtype=np.int64))[0] == 0.0   # all bf16 "16 bits", edges FP (λ=0)
    assert ev.evaluate_plans(np.ones((1, 15), dtype=np.int64))[0] > 0
    with pytest.raises(ValueError, match=r"leaves \[3, 2\)"):
        ev.evaluate(3, 2, np.zeros((1, 1), dtype=np.int64))
    with pytest.raises(ValueError, match="candidate indices"):
        ev.evaluate(0, 1, np.full((1, 1), 9))
    with pytest.raises(ValueError, match="batch and group"):
        Evaluator(model, DiTRunner(model), space, inputs, Environment(LayerConfig(4, 4)), group=0)
    with pytest.raises(PlanError, match="λ must be in"):
        Environment(LayerConfig(4, 4), 1.5)
    x, t, y = (v.clone() for v in inputs)
    x[1] = float("inf")   # every MSE against a non-finite reference would be NaN: an error, not a silent plan
    ev = Evaluator(model, DiTRunner(model, output_fn=eps), space, (x, t, y), Environment(LayerConfig(4, 4)))
    with pytest.raises(ValueError, match=r"full-precision model's output on the calibration inputs is not finite"):
        ev.evaluate(0, 1, np.zeros((1, 1), dtype=np.int64))


def test_tensor_summary_is_exact_and_order_free():
    """The fingerprints' content summary: the same whatever the thread count (integer sums), different after a
    one-ulp change of one element, and defined for every dtype."""
    import torch

    from treeq_engine.search.calibration import tensor_summary

    t = torch.randn(1_000_003, generator=torch.Generator().manual_seed(0))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = tensor_summary(t)
        torch.set_num_threads(max(2, threads))
        assert tensor_summary(t) == one
    finally:
        torch.set_num_threads(threads)
    u = t.clone()
    u[123_456] = torch.nextafter(u[123_456], torch.tensor(float("inf")))
    assert tensor_summary(u) != one
    for dt in (torch.bfloat16, torch.float16, torch.float64, torch.int8):
        assert tensor_summary(t[:11].to(dt)).startswith(f"(11,):{dt}")
