"""Closed-loop selection: choose the returned plan among the root's plans by whole sampling trajectories.

TSS scores candidates by one teacher-forced step: the model's output on calibration inputs taken from the FP
trajectory. An error that shifts the trajectory, and then compounds over the following steps, is under-weighted
there. On the digits DiT at W3A3 the plan with the lowest one-step MSE had 11 W2 layers and lost the samples
(Fréchet 521 against 248 for the IP baseline, docs/search.md). Scoring whole trajectories for all of TSS's
``(n − 1)·K²`` candidates would cost tens of times more; scoring the few whole plans the root holds costs a few
sampling runs. So the tree keeps its cheap metric, and the last choice -- which plan to return -- can be made
closed loop.

Pool: the root front's plans (non-dominated in cost and one-step MSE) and the root's kept plans (K, spread
along cost, the environment-uniform plan among them), without repeats. The front alone is not enough: at W3A3
every in-budget front plan leaned on W2 layers, the one-step metric having dominated the plans that do not.
Candidates: the pool's plans meeting the budget, lowest one-step MSE first, at most ``max_plans``, plus the
environment-uniform plan and the warm-start elites (``SearchConfig.elites``) whenever they are in the pool (so the
choice is never worse than uniform, or than a warm-start plan such as IP's, on this metric).

Metric: ``samples`` class-conditional samples drawn from the same noise and labels by the FP model and by the
plan's model (``steps`` sampler steps, guidance ``cfg_scale``), MSE of the final samples against FP's (pixel or
latent space, whatever the model generates), mean over samples. ``TrajectoryJudge`` samples our ``DiT``
(``config``, ``forward_with_cfg``) with ``treeq_engine.models.sample``; ``PipelineJudge`` samples a diffusers
transformer through the user's own pipeline.

Under ``torchrun`` rank 0 scores and the others receive the scores (``distributed.all_sum``), so every process
returns the same plan.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..nn import QuantLinear, apply_plan
from ..plan import QuantPlan
from . import distributed
from .costs import Budget, CostModel
from .space import SearchSpace
from .tree import Node, SearchResult

SAMPLERS = ("ddpm", "ddim")


@dataclasses.dataclass(frozen=True)
class ClosedLoopConfig:
    """How plans are sampled and compared (see the module docstring)."""

    samples: int = 32
    steps: int = 25
    sampler: str = "ddpm"
    cfg_scale: float = 1.5
    seed: int = 0
    max_plans: int = 16
    source: str = ""   # what a pipeline judge samples (PipelineJudge.describe): pipeline, scheduler, inputs

    def __post_init__(self) -> None:
        if self.samples <= 0 or self.steps <= 0 or self.max_plans <= 0:
            raise ValueError(f"closed loop: samples, steps and max_plans must be positive, got {self}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"closed loop: sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if not self.cfg_scale >= 1.0:
            raise ValueError(f"closed loop: cfg_scale must be >= 1, got {self.cfg_scale}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if not self.source:   # (so that states and reports from before the field read the same)
            del d["source"]
        return d


def candidate_pool(result: SearchResult) -> Node:
    """The root front's plans, then the root's kept plans that are not on it."""
    both = Node(result.front.lo, result.front.hi, np.concatenate([result.front.configs, result.root.configs]),
                np.concatenate([result.front.cost, result.root.cost]), np.concatenate([result.front.mse,
                                                                                      result.root.mse]))
    _, first = np.unique(both.configs, axis=0, return_index=True)
    return both.take(np.sort(first))


def in_budget_candidates(pool: Node, cost: CostModel, budget: Budget, max_plans: int,
                         always: np.ndarray | Sequence[np.ndarray] | None = None) -> np.ndarray:
    """Indices into ``pool`` of the plans meeting ``budget``, lowest one-step MSE first (ties: cheaper, then
    index), at most ``max_plans``; each plan in ``always`` (one assignment ``(n,)`` or several ``(s, n)``: the
    elites) is added when it is in the pool, meets the budget and was cut."""
    total = cost.offset + pool.cost
    ok = np.flatnonzero(cost.fits(total, budget))
    mse = np.where(np.isnan(pool.mse[ok]), np.inf, pool.mse[ok])
    order = ok[np.lexsort((ok, total[ok].sum(axis=1), mse))]
    chosen = order[:max_plans]
    if always is not None and len(always):
        for plan in np.atleast_2d(np.asarray(always)):
            hit = order[(pool.configs[order] == plan[None]).all(axis=1)]
            if len(hit) and hit[0] not in chosen:
                chosen = np.append(chosen, hit[0])
    return chosen


class TrajectoryJudge:
    """Samples a working copy of a (converted) model under plans and compares each plan's samples with FP's.

    The copy leaves the search's model untouched: its layers are reset to single configs at full quantization
    error (no candidate groups, λ = 1) and re-configured per plan with ``apply_plan``."""

    def __init__(self, model: nn.Module, config: ClosedLoopConfig) -> None:
        if not (hasattr(model, "config") and hasattr(model, "forward_with_cfg")):
            raise TypeError(f"closed-loop selection samples the model, which needs a treeq_engine DiT "
                            f"(config, forward_with_cfg); got {type(model).__name__}")
        self.config = config
        self.labels = torch.arange(config.samples) % int(model.config.num_classes)
        # float32: the sampler feeds float32 noise, and the judge's numbers should not depend on the search dtype
        self._copy(model, torch.float32)

    def _copy(self, model: nn.Module, dtype: torch.dtype | None) -> None:
        """The working copy, every layer at full precision; then the FP reference samples."""
        self.model = copy.deepcopy(model).eval()
        if dtype is not None:   # (a diffusers model's float32-kept modules stay so, as the pipeline loaded them)
            from ..models.diffusers_transformers import cast_keeping_fp32

            self.model = cast_keeping_fp32(self.model, dtype)
        self._layers = [m for m in self.model.modules() if isinstance(m, QuantLinear)]
        for m in self._layers:
            m.set_group_configs(None)
            m.set_noise_scale(1.0)
            m.set_config(None)
        self.reference = self._sample()

    @torch.no_grad()
    def _sample(self) -> torch.Tensor:
        from ..models.sample import sample

        c = self.config
        return sample(self.model, self.labels, steps=c.steps, sampler=c.sampler, cfg_scale=c.cfg_scale,
                      seed=c.seed).float()

    @torch.no_grad()
    def score(self, plan: QuantPlan) -> dict[str, float]:
        """Closed-loop MSE and PSNR (dB, range 2) of ``plan``'s samples against FP's; a plan whose samples are
        not finite scores MSE = inf and PSNR = -inf."""
        from ..eval.metrics import psnr

        apply_plan(self.model, plan)   # layers the plan does not name run in full precision
        s = self._sample()
        mse = float(((s - self.reference) ** 2).mean())
        if not math.isfinite(mse):   # non-finite samples: the worst score on both (not PSNR = inf, "identical")
            return {"closed_loop_mse": math.inf, "psnr": -math.inf}
        p = psnr(s, self.reference)
        p = p[torch.isfinite(p)]
        return {"closed_loop_mse": mse, "psnr": float(p.mean()) if p.numel() else float("inf")}


class PipelineJudge(TrajectoryJudge):
    """Closed-loop scores through a diffusers pipeline: the pipeline samples as it would (its scheduler and
    resolution; guidance ``config.cfg_scale``) from one seeded noise, with its transformer swapped for the
    judge's working copy of the searched one (at the pipeline's dtype, the VAE's), under each plan; the final
    latents (or images in [−1, 1], for DiT's pipeline, which always decodes) are compared with the FP copy's, so a
    PixArt's PSNR is on latents. ``call``: the pipeline's inputs (``class_labels=[...]`` or ``prompt=[...]``);
    ``config.steps``, ``cfg_scale`` and ``seed`` (its ``sampler`` and ``samples`` are the pipeline's and the
    call's), and ``config.source`` must be ``PipelineJudge.describe(...)`` of this pipeline and call, so that a
    resumed search does not reuse scores of other samples. Pipelines with offloading hooks are refused.
    ``component``: the pipeline's transformer the plans go into (a two-expert pipeline's ``transformer_2``: the other
    expert samples in full precision)."""

    def __init__(self, pipe: Any, call: dict[str, Any], model: nn.Module, config: ClosedLoopConfig, *,
                 component: str = "transformer") -> None:
        want = self.describe(type(pipe).__name__, type(pipe.scheduler).__name__, call, component=component)
        if config.source != want:
            raise ValueError(f"closed loop through a pipeline: ClosedLoopConfig.source must be {want!r} "
                             "(PipelineJudge.describe of this pipeline, scheduler and call), got "
                             f"{config.source!r}")
        hooked = [n for n, m in pipe.components.items() if isinstance(m, nn.Module) and
                  any(hasattr(sub, "_hf_hook") for sub in m.modules())]
        if hooked or getattr(pipe, "_all_hooks", None):
            raise ValueError(f"closed loop through a pipeline: offloading hooks on {hooked or 'the pipeline'}; "
                             "sample without enable_model_cpu_offload / group offloading")
        import diffusers

        self.pipe, self.call, self.config, self.component = pipe, dict(call), config, component
        self.decodes = isinstance(pipe, diffusers.DiTPipeline)   # DiT's pipeline has no latent output
        vae = getattr(pipe, "vae", None)
        self.calls = 0   # (the last sampling's calls of the searched transformer)
        self._copy(model, vae.dtype if vae is not None else pipe.dtype)
        if not self.calls:   # (a two-expert pipeline whose steps all fall to the other expert: every plan scores 0)
            raise ValueError(f"closed loop through the pipeline: its {config.steps} steps never call its {component}; "
                             "give more --closed-loop-steps")

    @staticmethod
    def describe(pipeline: str, scheduler: str, call: dict[str, Any], *, component: str = "transformer") -> str:
        """``Pipeline/Scheduler:digest`` of what is sampled (the call's labels or prompts), and ``/transformer_2``
        when the plans go into that expert."""
        from ..calib.store import digest

        return f"{pipeline}/{scheduler}:{digest(dict(call))}" + ("" if component == "transformer" else f"/{component}")

    @torch.no_grad()
    def _sample(self) -> torch.Tensor:
        c = self.config
        own = getattr(self.pipe, self.component)
        counted = [0]
        handle = self.model.register_forward_pre_hook(lambda *a: counted.__setitem__(0, counted[0] + 1))
        try:
            setattr(self.pipe, self.component, self.model)
            from ..models.diffusers_transformers import area_kwargs, guidance_kwargs, steps_kwargs

            out = self.pipe(**self.call, **area_kwargs(self.pipe, self.call), **steps_kwargs(self.pipe, c.steps),
                            **guidance_kwargs(self.pipe, c.cfg_scale),
                            generator=torch.Generator(device="cpu").manual_seed(c.seed),
                            output_type="pt" if self.decodes else "latent")
        finally:
            setattr(self.pipe, self.component, own)
            handle.remove()
            self.calls = counted[0]
        images = out.images if hasattr(out, "images") else out[0]
        if self.decodes:
            return images.float() * 2 - 1   # images in [−1, 1]: PSNR's range 2
        # Flux's latents come packed, (N, tokens, channels): one image-shaped plane each for the metrics; Wan's
        # are videos, (N, C, F, H, W): the frames stacked in height
        if images.dim() == 5:
            return images.float().flatten(2, 3)
        return images.float() if images.dim() == 4 else images.float()[:, None]


class RootScorer:
    """The tree's last merge scored closed loop (``tree_search(root_scorer=...)``): every whole plan the root's
    product holds (at most K²) gets a sampling run, so the root's front, and the plan returned, rank by the
    closed-loop MSE. Rank 0 scores; ``judge`` is ``None`` on the other ranks."""

    def __init__(self, judge: TrajectoryJudge | None, space: SearchSpace, config: ClosedLoopConfig,
                 progress: bool = True) -> None:
        self.judge, self.space, self.progress = judge, space, progress
        self.tag = {"closed_loop": config.to_dict()}

    def __call__(self, assignments: np.ndarray) -> np.ndarray:
        if self.judge is None:
            raise ValueError("closed-loop root: only rank 0 scores (it holds the judge)")
        return np.array([self.judge.score(self.space.plan(a))["closed_loop_mse"]
                         for a in tqdm(assignments, desc="closed-loop root", disable=not self.progress)])


def select(judge: TrajectoryJudge | None, space: SearchSpace, pool: Node, cost: CostModel, budget: Budget,
           max_plans: int, *, always: np.ndarray | Sequence[np.ndarray] | None = None,
           progress: bool = True) -> tuple[int, list[dict[str, Any]]]:
    """Score the pool's in-budget plans closed loop (``in_budget_candidates``); returns (the chosen plan's index
    into ``pool``, one row per scored plan: pool index, its mix of configs, one-step MSE, cost, closed-loop MSE
    and PSNR), the chosen one the lowest closed-loop MSE (ties: the earlier row, the lower one-step MSE).
    ``judge``: rank 0's; ``None`` on the other ranks of a distributed search, which receive rank 0's scores."""
    idx = in_budget_candidates(pool, cost, budget, max_plans, always)
    if not len(idx):
        raise ValueError(f"closed-loop selection: no plan among the root's meets {budget.label}")
    rank, _ = distributed.rank_world()
    if (judge is None) == (rank == 0):
        raise ValueError("closed-loop selection: rank 0 (only) must hold the judge")
    scores = np.zeros((len(idx), 2), dtype=np.float64)
    if judge is not None:
        for r, i in enumerate(tqdm(idx, desc="closed loop", disable=not progress)):
            s = judge.score(space.plan(pool.configs[i]))
            scores[r] = (s["closed_loop_mse"], s["psnr"])
    scores = distributed.all_sum(scores)
    rows = []
    for i, s in zip(idx, scores):
        labels = [space.candidates[int(c)].label for c in pool.configs[i]]
        rows.append({"index": int(i), "mix": {lab: labels.count(lab) for lab in sorted(set(labels))},
                     "one_step_mse": float(pool.mse[i]), "cost": (cost.offset + pool.cost[i]).tolist(),
                     "closed_loop_mse": float(s[0]), "psnr": float(s[1])})
    best = int(np.argmin(scores[:, 0]))
    return int(idx[best]), rows
