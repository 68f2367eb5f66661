"""Closed-loop selection: choose the plan among the root front's in-budget plans by whole sampling trajectories.

TSS scores candidates by one teacher-forced step: the model's output on calibration inputs taken from the FP
trajectory. An error that shifts the trajectory, and then compounds over the following steps, is under-weighted
there. On the digits DiT at W3A3 the plan with the lowest one-step MSE had 11 W2 layers and lost the samples
(Fréchet 521 against 248 for the IP baseline, docs/search.md). Scoring whole trajectories for all of TSS's
``(n − 1)·K²`` candidates would cost tens of times more; scoring the few plans the root's front holds within
the budget costs a few sampling runs. So the tree keeps its cheap metric, and the last choice -- which of the
front's plans to return -- is made closed loop.

Metric: ``samples`` class-conditional samples drawn from the same noise and labels by the FP model and by the
plan's model (``steps`` sampler steps, guidance ``cfg_scale``), MSE of the final samples against FP's (pixel or
latent space, whatever the model generates), mean over samples. Candidates: the front's plans that meet the
budget, lowest one-step MSE first, at most ``max_plans``. Needs a model ``treeq_engine.models.sample`` can
sample (the project's ``DiT``: ``config``, ``forward_with_cfg``).

Under ``torchrun`` rank 0 scores and the others receive the scores (``distributed.all_sum``), so every process
returns the same plan.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..nn import QuantLinear, apply_plan
from . import distributed
from .costs import Budget, CostModel
from .space import SearchSpace
from .tree import Node

SAMPLERS = ("ddpm", "ddim")


@dataclasses.dataclass(frozen=True)
class ClosedLoopConfig:
    """How the front's plans are sampled and compared (see the module docstring)."""

    samples: int = 32
    steps: int = 25
    sampler: str = "ddpm"
    cfg_scale: float = 1.5
    seed: int = 0
    max_plans: int = 8

    def __post_init__(self) -> None:
        if self.samples <= 0 or self.steps <= 0 or self.max_plans <= 0:
            raise ValueError(f"closed loop: samples, steps and max_plans must be positive, got {self}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"closed loop: sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if not self.cfg_scale >= 1.0:
            raise ValueError(f"closed loop: cfg_scale must be >= 1, got {self.cfg_scale}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def in_budget_candidates(front: Node, cost: CostModel, budget: Budget, max_plans: int) -> np.ndarray:
    """Indices into ``front`` of the plans meeting ``budget``, lowest one-step MSE first (ties: cheaper, then
    index), at most ``max_plans``."""
    total = cost.offset + front.cost
    ok = np.flatnonzero(cost.fits(total, budget))
    mse = np.where(np.isnan(front.mse[ok]), np.inf, front.mse[ok])
    order = ok[np.lexsort((ok, total[ok].sum(axis=1), mse))]
    return order[:max_plans]


class TrajectoryJudge:
    """Samples a working copy of a (converted) model under plans and compares each plan's samples with FP's.

    The copy leaves the search's model untouched: its layers are reset to single configs at full quantization
    error (no candidate groups, λ = 1) and re-configured per plan with ``apply_plan``."""

    def __init__(self, model: nn.Module, config: ClosedLoopConfig) -> None:
        from ..models.sample import sample

        if not (hasattr(model, "config") and hasattr(model, "forward_with_cfg")):
            raise TypeError(f"closed-loop selection samples the model, which needs a treeq_engine DiT "
                            f"(config, forward_with_cfg); got {type(model).__name__}")
        self.config = config
        # float32: the sampler feeds float32 noise, and the judge's numbers should not depend on the search dtype
        self.model = copy.deepcopy(model).float().eval()
        self._layers = [m for m in self.model.modules() if isinstance(m, QuantLinear)]
        for m in self._layers:
            m.set_group_configs(None)
            m.set_noise_scale(1.0)
        n_cls = int(self.model.config.num_classes)
        self.labels = torch.arange(config.samples) % n_cls
        self._sample = lambda: sample(self.model, self.labels, steps=config.steps, sampler=config.sampler,
                                      cfg_scale=config.cfg_scale, seed=config.seed).float()
        for m in self._layers:
            m.set_config(None)
        with torch.no_grad():
            self.reference = self._sample()

    @torch.no_grad()
    def score(self, plan) -> dict[str, float]:
        """Closed-loop MSE and PSNR (dB, range 2) of ``plan``'s samples against FP's."""
        from ..eval.metrics import psnr

        for m in self._layers:
            m.set_config(None)
        apply_plan(self.model, plan)
        s = self._sample()
        mse = float(((s - self.reference) ** 2).mean())
        p = psnr(s, self.reference)
        p = p[torch.isfinite(p)]
        return {"closed_loop_mse": mse, "psnr": float(p.mean()) if p.numel() else float("inf")}


def select(judge: TrajectoryJudge | None, space: SearchSpace, front: Node, cost: CostModel, budget: Budget,
           max_plans: int, *, progress: bool = True) -> tuple[int, list[dict[str, Any]]]:
    """Score the front's in-budget plans closed loop; returns (the chosen plan's index into ``front``, one row
    per scored plan: front index, one-step MSE, costs, closed-loop MSE and PSNR), the chosen one the lowest
    closed-loop MSE (ties: the earlier row, i.e. the lower one-step MSE). ``judge``: rank 0's; ``None`` on the
    other ranks of a distributed search, which receive rank 0's scores."""
    idx = in_budget_candidates(front, cost, budget, max_plans)
    if not len(idx):
        raise ValueError(f"closed-loop selection: no plan on the root's front meets {budget.label}")
    rank, _ = distributed.rank_world()
    if (judge is None) == (rank == 0):
        raise ValueError("closed-loop selection: rank 0 (only) must hold the judge")
    scores = np.zeros((len(idx), 2), dtype=np.float64)
    if judge is not None:
        for r, i in enumerate(tqdm(idx, desc="closed loop", disable=not progress)):
            s = judge.score(space.plan(front.configs[i]))
            scores[r] = (s["closed_loop_mse"], s["psnr"])
    scores = distributed.all_sum(scores)
    rows = [{"front_index": int(i), "one_step_mse": float(front.mse[i]),
             "cost": (cost.offset + front.cost[i]).tolist(), "closed_loop_mse": float(s[0]), "psnr": float(s[1])}
            for i, s in zip(idx, scores)]
    best = int(np.argmin(scores[:, 0]))
    return int(idx[best]), rows
