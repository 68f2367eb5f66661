"""Why a TSS plan loses to a baseline: two diagnostics on a finished digits study (``search_digits.py``).

    python benchmarks/search_diagnostics.py trace  --run out/search_digits/W4A4_lam1 [--against ip]
    python benchmarks/search_diagnostics.py fresh  --run out/search_digits/W3A3_lam1

``trace`` reruns the run's tree search (same calibration set, budget, λ, K) and follows the baseline's plan through
it: at every merge where the plan's slice of the node is not among the kept configs, it scores that slice as TSS
scores a node (the node's layers at the slice, everything else at ENG's environment) and says whether a kept
config dominates it (cheaper on the axis and lower MSE). Only first drops are printed (a dropped slice is absent
from every ancestor too). Costs one search.

``fresh`` scores the run's plans (TSS and every baseline) on fresh calibration sets (other seeds, and a larger
one) with both metrics: if TSS's lead on its own calibration set were over-fitting it would vanish here.
Seconds.
"""
from __future__ import annotations

import argparse
import copy
import json
import tempfile
from pathlib import Path

import numpy as np
import torch


def _setup(run: Path, seed: int | None = None, trajectories: int | None = None, timesteps: int | None = None):
    from treeq_engine.models.digits import load_digits_dit
    from treeq_engine.search import Budget, DiTRunner
    from treeq_engine.search.calibration import CalibrationConfig, load_or_collect
    from treeq_engine.search.costs import cost_model
    from treeq_engine.search.eng import Environment
    from treeq_engine.search.evaluator import Evaluator
    from treeq_engine.search.space import SearchSpace
    from treeq_engine.plan import LayerConfig

    study = json.loads((run.parent / "results.json").read_text())["setup"]
    report = json.loads((run / "report.json").read_text())
    fp = load_digits_dit(study.get("model"))
    cfg = CalibrationConfig(trajectories or study["calib_trajectories"], study["steps"],
                            timesteps or study["calib_timesteps"], study["cfg_scale"],
                            seed=study["seed"] if seed is None else seed)
    calib = load_or_collect(fp, cfg, run.parent / "cache")
    model = copy.deepcopy(fp).eval()
    inputs = calib.inputs()
    space = SearchSpace.build(model, [t[:2] for t in inputs], model_name="DiT-digits")
    budget = Budget.parse(report["budget"]["label"])
    cost = cost_model(space, budget.kind)
    env = Environment(LayerConfig.from_dict(report["env"]["config"]), float(report["env"]["lam"]))

    def evaluator(metric: str) -> Evaluator:
        return Evaluator(model, DiTRunner(model, output_fn=lambda o: o[:, :1]), space, inputs, env,
                         weights=calib.weights(metric))

    return study, report, space, budget, cost, evaluator, len(calib)


def trace(run: Path, against: str) -> None:
    from treeq_engine.plan import QuantPlan
    from treeq_engine.search.tree import Node, tree_search

    study, report, space, budget, cost, evaluator, _ = _setup(run)
    ev = evaluator(study.get("metric", "sampler"))
    base = space.assignment(QuantPlan.load(run / f"plan_{against}.json"))
    print(f"{against}: cost {cost.total(base).round(4).tolist()}, MSE {ev.evaluate_plans(base[None])[0]:.4e}")
    states: dict[int, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp) / "state.json"
        tree_search(ev, cost, keep=report["keep"], budget=budget, anchor=report["anchor"], state_path=state,
                    progress=False, on_level=lambda level: states.__setitem__(level, json.loads(state.read_text())))
    dropped: list[tuple[int, int]] = []
    for level, st in sorted(states.items()):
        for d in st["nodes"]:
            nd = Node.from_dict(d)
            if (nd.configs == base[nd.lo:nd.hi]).all(axis=1).any() or any(
                    lo >= nd.lo and hi <= nd.hi for lo, hi in dropped):
                continue
            dropped.append((nd.lo, nd.hi))
            sl = base[nd.lo:nd.hi][None]
            mse = float(ev.evaluate(nd.lo, nd.hi, sl)[0])
            ax = float(cost.axis(cost.leaf_costs(nd.lo, nd.hi, sl), budget, (nd.lo, nd.hi))[0])
            kax = cost.axis(nd.cost, budget, (nd.lo, nd.hi))
            dom = bool(((kax <= ax) & (nd.mse <= mse)).any())
            print(f"level {level} node [{nd.lo},{nd.hi}): {against}'s slice dropped; axis {ax:.3f} MSE {mse:.3e}; "
                  f"kept: axis {kax.min():.3f}..{kax.max():.3f}, MSE {np.nanmin(nd.mse):.3e}..{np.nanmax(nd.mse):.3e}"
                  f"; dominated by a kept config: {dom}")


def fresh(run: Path) -> None:
    from treeq_engine.plan import QuantPlan

    report = json.loads((run / "report.json").read_text())
    names = ["tss"] + list(report["baselines"])
    for seed, traj, steps in [(None, None, None), (1, None, None), (2, 20, 8)]:
        _, _, space, _, _, evaluator, n = _setup(run, seed, traj, steps)
        plans = np.stack([space.assignment(QuantPlan.load(run / ("plan.json" if k == "tss" else f"plan_{k}.json")))
                          for k in names])
        row = {metric: dict(zip(names, evaluator(metric).evaluate_plans(plans).round(6).tolist()))
               for metric in ("sampler", "eps")}
        print(f"calibration seed {'study' if seed is None else seed} ({n} samples): {json.dumps(row)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("what", choices=("trace", "fresh"))
    p.add_argument("--run", required=True, help="a search_digits.py run directory (e.g. OUT/W4A4_lam1)")
    p.add_argument("--against", default="ip", help="trace: the baseline plan to follow")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    trace(Path(args.run), args.against) if args.what == "trace" else fresh(Path(args.run))


if __name__ == "__main__":
    main()
