"""The search as one function: TSS at a budget, its plan checked and saved, the baselines, the report and plot.

    outcome = search(model, DiTRunner(model), calib.inputs(), SearchConfig(Budget.parse("W4A4")), out_dir="out")
    outcome.plan.save("plan.json")

``out_dir`` receives ``plan.json`` (the TSS plan), ``plan_<baseline>.json``, ``report.json`` (every number:
costs, MSEs, evaluation counts, wall times, the root's front), ``pareto.png`` and ``tss_state.json`` (the
per-level state a killed search resumes from). Under ``torchrun`` every process searches its share and only
rank 0 runs the baselines and writes files.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence, cast

import numpy as np
import torch
import torch.nn as nn

from ..calib.store import digest, write_json
from ..plan import LayerConfig, PlanError, QuantPlan
from . import distributed
from .baselines import BaselineResult, ip_baseline, random_baseline, uniform_baseline
from .closed_loop import ClosedLoopConfig, RootScorer, TrajectoryJudge, candidate_pool, select
from .costs import Budget, LatencyTable, check_budget, cost_model, describe, environment_config
from .eng import Environment
from .evaluator import Evaluator, SegmentRunner, run_segments
from .space import SearchSpace
from .tree import SearchResult, tree_search

BASELINES = ("uniform", "ip", "random")


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    """Everything a search run is told. ``env``: ENG's environment config (default: the uniform candidate
    with the most bits within the budget). ``batch``: calibration samples per forward; ``group``: candidates
    stacked per forward. ``serve_batch``: samples per GEMM for latency costs. ``closed_loop``: choose the plan
    among the root's in-budget plans by whole sampling trajectories (``closed_loop``) instead of the lowest
    one-step MSE."""

    budget: Budget
    lam: float = 1.0
    keep: int = 16
    env: LayerConfig | None = None
    batch: int = 64
    group: int = 16
    baselines: tuple[str, ...] = ()
    random_count: int = 20
    seed: int = 0
    latency_table: str | None = None
    serve_batch: int = 1
    anchor: bool = True          # keep each node's environment-uniform config (off only for ablations)
    closed_loop: ClosedLoopConfig | None = None
    closed_loop_root: bool = False   # score the tree's last merge closed loop (K² sampling runs), not only the pick
    elites: tuple[str, ...] = ()     # warm-start plans every node keeps: "ip" (the IP baseline's plan) or plan files
    env_plan: str | None = None      # ENG environment as a plan ("ip" or a plan file) instead of uniform bits

    def __post_init__(self) -> None:
        if not 0.0 <= self.lam <= 1.0:   # (here too: a run refused before it touches its --out)
            raise PlanError(f"ENG λ must be in [0, 1], got {self.lam}")
        bad = [b for b in self.baselines if b not in BASELINES]
        if bad:
            raise ValueError(f"unknown baseline(s) {bad}: expected some of {BASELINES}")
        for name in ("keep", "batch", "group", "random_count", "serve_batch"):
            if getattr(self, name) <= 0:
                raise ValueError(f"SearchConfig.{name} must be positive, got {getattr(self, name)}")
        if self.closed_loop_root and self.closed_loop is None:
            raise ValueError("closed_loop_root needs a closed_loop config (how plans are sampled)")
        if isinstance(self.elites, str):
            raise ValueError(f"elites must be a tuple of 'ip' or plan file paths, got the string {self.elites!r}")
        if any(not e for e in self.elites) or self.env_plan == "":
            raise ValueError(f"elites and env_plan must be 'ip' or plan file paths, got {self.elites}, "
                             f"{self.env_plan!r}")


@dataclasses.dataclass
class SearchOutcome:
    plan: QuantPlan
    result: SearchResult
    ptq_mse: float
    baselines: dict[str, BaselineResult]
    report: dict[str, Any]


def validate_plan(plan: QuantPlan, model: nn.Module, space: SearchSpace, budget: Budget | None = None,
                  latency_table: LatencyTable | None = None, serve_batch: int = 1) -> None:
    """Names must be the model's linears (of the recorded shapes: ``QuantPlan.validate``), bits the format's
    (checked when the plan is read), every searched layer a candidate config, and the budget met; each failure is
    a :class:`PlanError` saying which."""
    plan.validate(model)
    a = space.assignment(plan)
    if budget is not None and budget.kind == "bytes":
        # the fixed layers' bytes as the plan has them (absent: bf16), not as this search would have fixed them
        space = dataclasses.replace(space, fixed=tuple((leaf, plan.layers.get(leaf.name)) for leaf, _ in space.fixed))
    if budget is not None:
        check_budget(space, a, budget, latency_table=latency_table, serve_batch=serve_batch)


def _plan_entry(space: SearchSpace, a: np.ndarray, mse: float, **kw: Any) -> dict[str, Any]:
    labels = [space.candidates[int(i)].label for i in a]
    return {"mse": mse, "costs": describe(space, a, **kw),
            "mix": {lab: labels.count(lab) for lab in sorted(set(labels))}}


def search(model: nn.Module, runner: SegmentRunner, inputs: Sequence[torch.Tensor], config: SearchConfig, *,
           weights: torch.Tensor | None = None, space: SearchSpace | None = None, out_dir: str | Path | None = None,
           resume: bool = False, progress: bool = True, model_name: str = "",
           judge_fn: Callable[[nn.Module, ClosedLoopConfig], TrajectoryJudge] | None = None,
           note: Callable[[str], None] | None = None) -> SearchOutcome:
    """Search a plan for ``model`` at ``config.budget``; see the module docstring. ``weights``: per-sample MSE
    weights of the calibration inputs (``CalibrationSet.weights(metric)``; ``None``: plain MSE). ``judge_fn``:
    makes the closed-loop judge from the converted model and ``config.closed_loop`` (default: ``TrajectoryJudge``, our
    DiT's sampler; for a diffusers transformer, ``functools.partial(PipelineJudge, pipe, call)``)."""
    t_start = time.perf_counter()
    model.eval()
    rank, _ = distributed.rank_world()
    if space is None:
        space = SearchSpace.build(model, [t[:2] for t in inputs], model_name=model_name,
                                  forward=lambda *xs: run_segments(runner, xs), tie=getattr(runner, "tie", None))
    lut = LatencyTable.load(config.latency_table) if config.latency_table else None
    cost_kw: dict[str, Any] = {"latency_table": lut, "serve_batch": config.serve_batch}
    budget = config.budget
    cost = cost_model(space, budget.kind, **cost_kw)
    if lut is not None:
        lut.check_device()
        if budget.kind != "latency":   # the plan's report reads it after the search: a gap must show now
            cost_model(space, "latency", **cost_kw)
    env = Environment(config.env or environment_config(space, budget, cost), config.lam)
    ev = Evaluator(model, runner, space, inputs, env, batch=config.batch, group=config.group, weights=weights)
    out = Path(out_dir) if out_dir is not None else None
    if out is not None and rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    distributed.barrier()

    ptq_ev = ev if env.lam == 1.0 else Evaluator(model, runner, space, inputs, Environment(env.config, 1.0),
                                                 batch=config.batch, group=config.group, reference=ev.reference(),
                                                 weights=weights)

    def ip() -> BaselineResult:
        sens_ev = Evaluator(model, runner, space, inputs, Environment(env.config, 0.0), batch=config.batch,
                            group=config.group, reference=ev.reference(), weights=weights)
        return ip_baseline(sens_ev, ptq_ev, cost, budget, progress)

    baselines: dict[str, BaselineResult] = {}
    warm_start: dict[str, Any] = {}

    ip_cache = None if out is None else out / "warm_start_ip.json"
    ip_key = None

    def resolve(source: str) -> np.ndarray:
        """A warm-start or environment plan: "ip" (computed once, on rank 0, given to every process; a resumed
        search reads it back from ``warm_start_ip.json``) or a plan file."""
        nonlocal ip_key
        if source != "ip":
            p = load_plan(source)
            validate_plan(p, model, space, budget, **cost_kw)
            return space.assignment(p)
        a_ip = np.zeros(len(space.leaves))
        if rank == 0:
            if "ip" not in baselines:
                if ip_key is None:   # what the IP plan depends on: evaluator (model, inputs, space), budget, costs
                    ip_key = digest({"evaluator": ev.fingerprint(), "budget": budget.to_dict(), "cost": cost.kind,
                                     "table": cost.table.tolist()})
                cached = _read_baseline(ip_cache, ip_key) if resume and ip_cache is not None else None
                baselines["ip"] = cached or ip()
                if cached is None and ip_cache is not None:
                    _write_baseline(ip_cache, ip_key, baselines["ip"])
                warm_start["ip"] = {"evaluations": baselines["ip"].evaluations, "wall_s": baselines["ip"].wall_s,
                                    "reused": cached is not None}
            a_ip[:] = baselines["ip"].assignment
        return distributed.all_sum(a_ip).astype(np.int64)

    elites = [resolve(e) for e in config.elites]
    if config.env_plan is not None:   # score every node inside this plan (kept as an elite, like uniform's)
        a_env = resolve(config.env_plan)
        env = Environment(env.config, env.lam, plan=tuple(space.candidates[int(i)] for i in a_env))
        ev = Evaluator(model, runner, space, inputs, env, batch=config.batch, group=config.group,
                       reference=ev.reference(), weights=weights)
        if config.anchor:
            elites.append(a_env)

    judge = None
    if config.closed_loop is not None and rank == 0:
        judge = TrajectoryJudge(model, config.closed_loop) if judge_fn is None else judge_fn(model, config.closed_loop)
    # (the cast: SearchConfig refuses closed_loop_root without a closed_loop)
    root_scorer = (RootScorer(judge, space, cast(ClosedLoopConfig, config.closed_loop), progress)
                   if config.closed_loop_root else None)
    result = tree_search(ev, cost, keep=config.keep, budget=budget, resume=resume, progress=progress,
                         anchor=config.anchor, state_path=None if out is None else out / "tss_state.json",
                         root_scorer=root_scorer, elites=np.array(elites, dtype=np.int64) if elites else None,
                         note=note)
    a, total, mse = result.best(budget, cost)
    closed: dict[str, Any] | None = None
    closed_scores: dict[str, float] = {}
    if root_scorer is not None:   # the root already ranks by the closed-loop MSE: ``mse`` is that
        closed_scores = {"closed_loop_mse": mse}
    elif config.closed_loop is not None:
        pool = candidate_pool(result)
        always = ([space.uniform(env.config)] if env.config in space.candidates else []) + elites
        i, rows = select(judge, space, pool, cost, budget, config.closed_loop.max_plans, always=always,
                         progress=progress)
        closed = {"config": config.closed_loop.to_dict(), "one_step_choice": a.tolist(), "plans": rows}
        a, total, mse = pool.configs[i], cost.offset + pool.cost[i], float(pool.mse[i])
        chosen = next(r for r in rows if r["index"] == i)
        closed_scores = {"closed_loop_mse": chosen["closed_loop_mse"], "psnr": chosen["psnr"]}
    # at λ = 1 a whole plan's score does not depend on the environment (uniform bits or a plan)
    ptq = mse if env.lam == 1.0 and root_scorer is None else float(ptq_ev.evaluate_plans(a[None])[0])
    env_label = env.config.label if env.plan is None else f"plan:{config.env_plan}"
    meta = {"search": "tss", "budget": budget.to_dict(), "lambda": env.lam, "keep": config.keep,
            "env": env_label, "search_mse": mse, "ptq_mse": ptq, "evaluations": result.evaluations,
            # what search_mse measures: with a closed-loop root, the tree's last merge ranked whole trajectories
            "search_metric": "closed-loop MSE" if root_scorer is not None else "one-step MSE",
            "selected_by": "closed-loop root" if root_scorer is not None else
            "one-step" if closed is None else "closed-loop", "elites": list(config.elites),
            "env_plan": config.env_plan,
            "wall_s": round(result.wall_s, 3), "costs": describe(space, a, **cost_kw)}
    plan = space.plan(a, meta=meta)
    validate_plan(plan, model, space, budget, **cost_kw)

    if rank == 0:
        for name in config.baselines:
            if name == "uniform":
                baselines[name] = uniform_baseline(ptq_ev, cost, budget)
            elif name == "random":
                baselines[name] = random_baseline(ptq_ev, cost, budget, config.random_count, config.seed)
            elif name not in baselines:
                baselines[name] = ip()
        baselines = {k: baselines[k] for k in config.baselines}   # without an IP computed only as a warm start
        if judge is not None:   # the same closed-loop judge for the baselines, for comparison
            for b in baselines.values():
                b.detail.update(judge.score(space.plan(b.assignment)))

    report = {
        "model": model_name, "budget": budget.to_dict(), "lambda": env.lam, "keep": config.keep,
        "anchor": config.anchor,
        "env": {**env.to_dict(), "source": env_label}, "elites": list(config.elites), "env_plan": config.env_plan,
        "leaves": len(space.leaves), "candidates": [c.label for c in space.candidates],
        "calibration_samples": ev.num_samples, "weighted": weights is not None,
        "tss": {**_plan_entry(space, a, ptq, **cost_kw), "search_mse": mse, "search_metric": meta["search_metric"],
                "evaluations": result.evaluations,
                "evaluation_bound": result.evaluation_bound, "wall_s": result.wall_s, "levels": result.levels,
                "warm_start": warm_start,   # what the warm start (IP) cost on top of the tree
                "evaluations_total": result.evaluations + sum(w["evaluations"] for w in warm_start.values()),
                "wall_s_total": result.wall_s + sum(w["wall_s"] for w in warm_start.values()), **closed_scores},
        "closed_loop": closed,
        "baselines": {k: {**_plan_entry(space, b.assignment, b.mse, **cost_kw), "evaluations": b.evaluations,
                          "wall_s": b.wall_s, **{kk: vv for kk, vv in b.detail.items() if kk != "all_mse"}}
                      for k, b in baselines.items()},
        "front": [{"cost": (cost.offset + c).tolist(), "mse": float(m)} for c, m in zip(result.front.cost,
                                                                                       result.front.mse)],
        "total_wall_s": time.perf_counter() - t_start,
    }
    if out is not None and rank == 0:
        plan.save(out / "plan.json")
        for k, b in baselines.items():
            space.plan(b.assignment, meta={"search": k, "budget": budget.to_dict(), "ptq_mse": b.mse}).save(
                out / f"plan_{k}.json")
        tmp = out / "report.json.tmp"   # atomic: a kill leaves the previous report, not half of one
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        os.replace(tmp, out / "report.json")
        if result.root_candidates:
            from .plot import plot_front

            ax = lambda c: float(cost.axis(np.asarray(c, dtype=np.float64), budget))  # noqa: E731
            plot_front(out / "pareto.png", result.root_candidates, kind=budget.kind,
                       budget_axis=ax(budget.limits),
                       chosen=(ax(total), mse),
                       baselines=({k: (ax(b.cost), b.detail["closed_loop_mse"]) for k, b in baselines.items()}
                                  if root_scorer is not None else
                                  {k: (ax(b.cost), b.mse) for k, b in baselines.items()} if env.lam == 1.0 else None),
                       title=f"TSS root merge, {budget.label}, λ={env.lam:g}, K={config.keep}"
                             + (", closed-loop MSE" if root_scorer is not None else ""))
    return SearchOutcome(plan, result, ptq, baselines, report)


def _write_baseline(path: Path, key: str, b: BaselineResult) -> None:
    write_json(path, {"key": key, "name": b.name, "assignment": b.assignment.tolist(),
                      "cost": np.asarray(b.cost).tolist(), "mse": b.mse, "evaluations": b.evaluations,
                      "wall_s": b.wall_s, "detail": b.detail})


def _read_baseline(path: Path, key: str) -> BaselineResult | None:
    """The baseline saved by an earlier run of the same search, or None (absent, unreadable or another search)."""
    try:
        d = json.loads(path.read_text())
        if d.get("key") != key:
            return None
        return BaselineResult(d["name"], np.array(d["assignment"], dtype=np.int64), np.array(d["cost"]),
                              float(d["mse"]), int(d["evaluations"]), float(d["wall_s"]), dict(d["detail"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def load_plan(path: str | Path) -> QuantPlan:
    """Read a plan file with a clear error for a missing or malformed file."""
    p = Path(path)
    if not p.is_file():
        raise PlanError(f"plan file {p} does not exist")
    return QuantPlan.load(p)
