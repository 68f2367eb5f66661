"""Closed-loop selection among the root front's plans: candidates, the trajectory judge, the search and CLI."""
import copy
import json

import numpy as np
import pytest
import torch

from tinydit import TinyDiT, one_thread  # noqa: F401
from treeq_engine.cli import main
from treeq_engine.nn import QuantLinear, convert
from treeq_engine.plan import LayerConfig, QuantPlan
from treeq_engine.search import Budget, SearchSpace, cost_model
from treeq_engine.search.cli import random_dit
from treeq_engine.search.closed_loop import (ClosedLoopConfig, TrajectoryJudge, candidate_pool,
                                             in_budget_candidates, select)
from treeq_engine.search.tree import Node, SearchResult

pytestmark = pytest.mark.usefixtures("one_thread")

BASE = ["search", "--random-config", "DiT-test", "--calib-trajectories", "3", "--calib-steps", "4",
        "--calib-timesteps", "2", "--keep", "4", "--batch", "6", "--group", "8", "--no-progress"]


def _space(model):
    c = model.config
    probe = (torch.zeros(2, c.in_channels, c.input_size, c.input_size), torch.zeros(2, dtype=torch.long),
             torch.zeros(2, dtype=torch.long))
    return SearchSpace.build(model, probe)


def test_candidates_are_the_in_budget_plans_by_one_step_mse():
    model = random_dit("DiT-test", seed=3)
    space = _space(model)
    cm = cost_model(space, "wa")
    plans = [space.uniform(LayerConfig(w, a)) for w, a in [(8, 8), (4, 4), (3, 4), (4, 3), (2, 3), (3, 3)]]
    configs = np.stack(plans)
    costs = np.stack([cm.leaf_costs(0, len(p), p[None])[0] for p in plans])
    mse = np.array([0.1, 0.5, 0.4, np.nan, 0.9, 0.4])
    pool = Node(0, len(plans[0]), configs, costs, mse)
    got = in_budget_candidates(pool, cm, Budget.parse("W4A4"), max_plans=8)
    # W8A8 is over budget; W3A4 and W3A3 tie on MSE, the cheaper first; an unscored plan (NaN) comes last
    assert got.tolist() == [5, 2, 1, 4, 3]
    assert in_budget_candidates(pool, cm, Budget.parse("W4A4"), max_plans=2).tolist() == [5, 2]
    # the environment-uniform plan is added when cut, never when over budget or absent
    assert in_budget_candidates(pool, cm, Budget.parse("W4A4"), 2, always=plans[1]).tolist() == [5, 2, 1]
    assert in_budget_candidates(pool, cm, Budget.parse("W4A4"), 2, always=plans[0]).tolist() == [5, 2]
    assert in_budget_candidates(pool, cm, Budget.parse("W4A4"), 3, always=plans[1]).tolist() == [5, 2, 1]
    assert in_budget_candidates(pool, cm, Budget.parse("W2A3"), max_plans=8).tolist() == [4]
    with pytest.raises(ValueError, match="no plan among the root's meets W2A2"):
        select(None, space, pool, cm, Budget.parse("W2A2"), 4)
    with pytest.raises(ValueError, match="rank 0"):
        select(None, space, pool, cm, Budget.parse("W4A4"), 4)


def test_pool_is_the_front_then_the_roots_other_plans():
    a = np.array([[0, 1], [1, 1], [2, 2]])
    front = Node(0, 2, a[:2], np.ones((2, 1)), np.array([0.1, 0.2]))
    root = Node(0, 2, a[1:], 2 * np.ones((2, 1)), np.array([0.2, 0.3]))
    pool = candidate_pool(SearchResult(root, front, {}, [], 0, 0.0, 2, "w", None))
    assert pool.configs.tolist() == a.tolist() and pool.mse.tolist() == [0.1, 0.2, 0.3]
    assert pool.cost[:, 0].tolist() == [1, 1, 2]


def test_judge_scores_plans_on_a_copy_deterministically():
    model = random_dit("DiT-test", seed=4)
    fp = copy.deepcopy(model)
    space = _space(model)
    convert(model, space.plan(space.uniform(LayerConfig(4, 4))))
    layer = model.blocks[0].attn.qkv
    assert isinstance(layer, QuantLinear)
    layer.set_noise_scale(0.5)                   # the search leaves its model in some state: not the judge's
    cfg = ClosedLoopConfig(samples=4, steps=5, cfg_scale=1.5, seed=2)
    judge = TrajectoryJudge(model, cfg)
    w8 = judge.score(space.plan(space.uniform(LayerConfig(8, 8))))
    w2 = judge.score(space.plan(space.uniform(LayerConfig(2, 3))))
    assert 0 < w8["closed_loop_mse"] < w2["closed_loop_mse"] and w8["psnr"] > w2["psnr"]
    assert judge.score(space.plan(space.uniform(LayerConfig(8, 8)))) == w8
    assert layer.noise_scale == 0.5 and layer.config == LayerConfig(4, 4)     # the search's model untouched
    # the reference is the FP model's samples from the same noise and labels
    from treeq_engine.models.sample import sample

    ref = sample(fp, torch.arange(4) % 10, steps=5, cfg_scale=1.5, seed=2)
    torch.testing.assert_close(judge.reference, ref, rtol=0, atol=0)
    fake = QuantPlan({"blocks.0.mlp.fc1": LayerConfig(8, 8)})
    assert judge.score(fake)["closed_loop_mse"] < w8["closed_loop_mse"]      # one layer quantized, the rest FP


def test_judge_and_config_errors():
    with pytest.raises(TypeError, match="needs a treeq_engine DiT"):
        TrajectoryJudge(TinyDiT(depth=1, d=16, tokens=4), ClosedLoopConfig(samples=2, steps=2))
    with pytest.raises(ValueError, match="sampler must be one of"):
        ClosedLoopConfig(sampler="euler")
    with pytest.raises(ValueError, match="must be positive"):
        ClosedLoopConfig(samples=0)
    with pytest.raises(ValueError, match="cfg_scale must be >= 1"):
        ClosedLoopConfig(cfg_scale=0.5)


def test_cli_closed_loop_selection_resumes_a_finished_search(tmp_path, capsys):
    out = tmp_path / "w3a4"
    assert main(BASE + ["--budget", "W3A4", "--out", str(out)]) == 0
    one_step = json.loads((out / "report.json").read_text())
    layers = json.loads((out / "plan.json").read_text())["layers"]
    capsys.readouterr()
    assert main(BASE + ["--budget", "W3A4", "--out", str(out), "--resume", "--baselines", "uniform",
                        "--select", "closed-loop", "--closed-loop-samples", "3", "--closed-loop-plans", "3"]) == 0
    text = capsys.readouterr().out
    assert "closed-loop selection" in text and "<- chosen" in text
    report = json.loads((out / "report.json").read_text())
    closed = report["closed_loop"]
    assert report["tss"]["evaluations"] == one_step["tss"]["evaluations"]       # the tree was not searched again
    assert closed["config"] == {"samples": 3, "steps": 4, "sampler": "ddpm", "cfg_scale": 1.0, "seed": 0,
                                "max_plans": 3}
    rows = closed["plans"]
    assert 1 <= len(rows) <= 4                     # at most 3, plus the uniform W3A4 plan if it was cut
    assert any(r["mix"] == {"W3A4": 10} for r in rows)
    assert all(sum(r["mix"].values()) == 10 for r in rows)
    assert [r["one_step_mse"] for r in rows[:3]] == sorted(r["one_step_mse"] for r in rows[:3])
    assert all(r["cost"][0] <= 3 + 1e-9 and r["cost"][1] <= 4 + 1e-9 for r in rows)
    chosen = min(rows, key=lambda r: r["closed_loop_mse"])
    assert report["tss"]["closed_loop_mse"] == chosen["closed_loop_mse"]
    plan = json.loads((out / "plan.json").read_text())
    assert plan["meta"]["selected_by"] == "closed-loop"
    assert plan["meta"]["search_mse"] == chosen["one_step_mse"]
    labels = [c["w_bits"] * 10 + c["a_bits"] for n, c in plan["layers"].items() if n.startswith("blocks.")]
    assert {f"W{v // 10}A{v % 10}": labels.count(v) for v in set(labels)} == chosen["mix"]
    if chosen is rows[0]:       # the one-step choice won: the same plan as before
        assert plan["layers"] == layers
    assert report["baselines"]["uniform"]["closed_loop_mse"] > 0


def test_cli_closed_loop_root_scores_the_last_merge_closed_loop(tmp_path, capsys):
    out = tmp_path / "root"
    args = BASE + ["--budget", "W3A4", "--out", str(out), "--select", "closed-loop-root", "--closed-loop-samples",
                   "2", "--closed-loop-steps", "2", "--baselines", "uniform"]
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    plan = json.loads((out / "plan.json").read_text())
    assert plan["meta"]["selected_by"] == "closed-loop root"
    # the root's scores are closed-loop MSEs: the plan's is the front's lowest in budget, and the one-step PTQ
    # MSE is reported beside it
    assert report["tss"]["closed_loop_mse"] == plan["meta"]["search_mse"] == min(
        p["mse"] for p in report["front"] if p["cost"][0] <= 3 + 1e-9 and p["cost"][1] <= 4 + 1e-9)
    assert report["tss"]["mse"] == plan["meta"]["ptq_mse"] != plan["meta"]["search_mse"]
    state = json.loads((out / "tss_state.json").read_text())
    assert state["levels"][-1]["evaluations"] == len(state["root_candidates"]["mse"]) >= len(report["front"])
    # a finished closed-loop-root state resumes only into the same kind of search
    capsys.readouterr()
    assert main(BASE + ["--budget", "W3A4", "--out", str(out), "--resume"]) == 2
    assert "belongs to a different search" in capsys.readouterr().err
    assert main(args + ["--resume"]) == 0
    assert json.loads((out / "plan.json").read_text())["layers"] == plan["layers"]
