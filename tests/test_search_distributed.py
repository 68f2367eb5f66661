"""Two gloo processes on CPU split every tree level's evaluations and must reach the single-process plan."""
import json

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tinydit import TinyDiT, calibration, eps
from treeq_engine.plan import LayerConfig
from treeq_engine.search import Budget, DiTRunner, Environment, Evaluator, SearchSpace, cost_model, tree_search
from treeq_engine.search import distributed


class _PlanScore:
    """A deterministic whole-plan score standing in for the closed-loop judge (which needs a sampleable DiT)."""

    tag = {"test": "plan score"}

    def __init__(self, rank=0):
        self.rank, self.calls = rank, 0

    def __call__(self, assignments):
        assert self.rank == 0, "only rank 0 scores the root"
        self.calls += len(assignments)
        a = np.asarray(assignments, dtype=np.float64)
        return np.cos(a @ np.arange(1, a.shape[1] + 1)) + 2.0


def _search(state_path=None, root_scorer=None):
    torch.set_num_threads(1)
    model = TinyDiT(depth=2, d=16, tokens=4, seed=11)
    inputs = calibration(model, n=8, seed=12)
    space = SearchSpace.build(model, [t[:2] for t in inputs])
    ev = Evaluator(model, DiTRunner(model, output_fn=eps), space, inputs, Environment(LayerConfig(4, 4)), batch=8,
                   group=5)
    b = Budget.parse("W4A4")
    res = tree_search(ev, cost_model(space, "wa"), keep=6, budget=b, progress=False, state_path=state_path,
                      root_scorer=root_scorer)
    return res, ev.evaluations


def _worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        res, own = _search(state_path=f"{out_dir}/state.json")
        (out_dir / f"rank{rank}.json").write_text(json.dumps({
            "configs": res.front.configs.tolist(), "mse": res.front.mse.tolist(), "root": res.root.configs.tolist(),
            "evaluations": res.evaluations, "own": own}))
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_give_the_single_process_plan(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), tmp_path), nprocs=2, join=True)
    threads = torch.get_num_threads()
    try:
        single, _ = _search()      # one thread, as each worker: the same kernels, the same bits
    finally:
        torch.set_num_threads(threads)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for got in ranks:
        np.testing.assert_array_equal(np.array(got["configs"]), single.front.configs)
        np.testing.assert_array_equal(np.array(got["mse"]), single.front.mse)      # bit-identical scores
        np.testing.assert_array_equal(np.array(got["root"]), single.root.configs)
        assert got["evaluations"] == single.evaluations
    # the work was shared: each process scored part of it, together all of it
    assert ranks[0]["own"] > 0 and ranks[1]["own"] > 0
    assert ranks[0]["own"] + ranks[1]["own"] == single.evaluations
    assert json.loads((tmp_path / "state.json").read_text())["evaluations"] == single.evaluations


def _root_worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        scorer = _PlanScore(rank)
        res, _ = _search(root_scorer=scorer)
        (out_dir / f"root{rank}.json").write_text(json.dumps({
            "configs": res.front.configs.tolist(), "mse": res.front.mse.tolist(), "calls": scorer.calls}))
    finally:
        dist.destroy_process_group()


def test_a_root_scorer_runs_on_rank_0_and_every_process_gets_its_scores(tmp_path):
    mp.spawn(_root_worker, args=(2, str(tmp_path / "init"), tmp_path), nprocs=2, join=True)
    threads = torch.get_num_threads()
    try:
        scorer = _PlanScore()
        single, _ = _search(root_scorer=scorer)
    finally:
        torch.set_num_threads(threads)
    np.testing.assert_array_equal(single.front.mse, _PlanScore()(single.front.configs))   # the root's own scores
    ranks = [json.loads((tmp_path / f"root{r}.json").read_text()) for r in range(2)]
    for got in ranks:
        np.testing.assert_array_equal(np.array(got["configs"]), single.front.configs)
        np.testing.assert_array_equal(np.array(got["mse"]), single.front.mse)
    assert ranks[0]["calls"] == scorer.calls > 0 and ranks[1]["calls"] == 0


def _warm_search():
    from treeq_engine.search.run import SearchConfig, search

    torch.set_num_threads(1)
    model = TinyDiT(depth=2, d=16, tokens=4, seed=13)
    inputs = calibration(model, n=8, seed=14)
    out = search(model, DiTRunner(model, output_fn=eps), inputs,
                 SearchConfig(Budget.parse("W3A4"), lam=0.5, keep=3, batch=8, group=5, elites=("ip",),
                              env_plan="ip", baselines=("ip",)), progress=False)
    return out


def _warm_worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        out = _warm_search()
        (out_dir / f"warm{rank}.json").write_text(json.dumps({
            "layers": {k: v.label for k, v in out.plan.layers.items()}, "ptq": out.ptq_mse,
            "front": out.result.front.mse.tolist(), "baselines": sorted(out.baselines)}))
    finally:
        dist.destroy_process_group()


def test_an_ip_warm_start_and_environment_plan_give_the_single_process_plan(tmp_path):
    """Rank 0 computes the IP plan, every process receives it (warm start and environment), and the two
    processes end on the single-process plan with bit-identical scores; only rank 0 reports baselines."""
    mp.spawn(_warm_worker, args=(2, str(tmp_path / "init"), tmp_path), nprocs=2, join=True)
    threads = torch.get_num_threads()
    try:
        single = _warm_search()
    finally:
        torch.set_num_threads(threads)
    ranks = [json.loads((tmp_path / f"warm{r}.json").read_text()) for r in range(2)]
    for got in ranks:
        assert got["layers"] == {k: v.label for k, v in single.plan.layers.items()}
        assert got["ptq"] == single.ptq_mse
        np.testing.assert_array_equal(np.array(got["front"]), single.result.front.mse)
    assert ranks[0]["baselines"] == ["ip"] and ranks[1]["baselines"] == []


def test_assign_balances_largest_first():
    owner = distributed.assign([5, 1, 4, 2, 3, 3], 2)
    loads = [sum(c for c, o in zip([5, 1, 4, 2, 3, 3], owner) if o == r) for r in range(2)]
    assert sorted(loads) == [9, 9]
    assert distributed.assign([1.0, 1.0, 1.0], 1) == [0, 0, 0]
    assert not distributed.is_active() and distributed.rank_world() == (0, 1)
    assert distributed.all_sum(np.arange(3.0)).tolist() == [0.0, 1.0, 2.0]


def test_init_from_env_without_torchrun(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.init_from_env() is False
