"""Calibration and distillation data for a class-conditional DiT: the inputs its own sampler visits.

    batches = dit_trajectory(fp_model, labels, steps=25)      # [(x_t, t, y) for every sampling step]

Each entry is one sampling step's model input for the whole batch (with guidance, the doubled
``[cond; uncond]`` batch the model really ran on), so PTQ sees the activation statistics of every timestep
and PEFT distils along the FP model's own trajectory (EfficientDM). Deterministic by ``seed``.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from .capture import CalibBatch


@torch.no_grad()
def dit_trajectory(model: nn.Module, labels: torch.Tensor, *, steps: int | str = 25, sampler: str = "ddpm",
                   cfg_scale: float = 1.0, seed: int = 0) -> list[CalibBatch]:
    """The ``(x_t, t, y)`` model inputs of every step of one sampling run of ``model`` for ``labels (N,)``."""
    from ..models.sample import sample

    rec: list[CalibBatch] = []

    def keep(step) -> None:  # the SampleStep of each step
        rec.append((step.x.detach().clone(), step.t_model.detach().clone(), step.model_kwargs["y"].detach().clone()))

    sample(model, labels, steps=steps, sampler=sampler, cfg_scale=cfg_scale, seed=seed, callback=keep)
    return rec


def random_labels(n: int, num_classes: int, seed: int) -> torch.Tensor:
    """``n`` class labels, balanced (each class ``n // classes`` times, the rest drawn), shuffled by ``seed``."""
    g = torch.Generator().manual_seed(seed)
    base = torch.arange(num_classes).repeat(n // num_classes)
    extra = torch.randint(0, num_classes, (n - base.numel(),), generator=g)
    labels = torch.cat([base, extra])
    return labels[torch.randperm(n, generator=g)]


def eps_channels(model: nn.Module, batch: CalibBatch) -> torch.Tensor:
    """The model's ε prediction only (the first ``in_channels`` of a learned-variance DiT's output)."""
    return model(*batch)[:, : model.in_channels]


def sampler_loss_weights(steps: int | str, diffusion_steps: int = 1000) -> Callable[[CalibBatch], torch.Tensor]:
    """``batch -> (B,)`` float32: the sampler weight ``c(t)²`` of each sample's step for a trajectory sampled with
    ``steps`` respaced steps (``dit_trajectory(steps=...)``), normalised to mean 1 over that schedule. The batch's
    ``t`` are model timesteps; a timestep the schedule does not visit is an error."""
    from ..models.diffusion import create_diffusion, sampler_weights

    diffusion = create_diffusion(str(steps), diffusion_steps=diffusion_steps)
    w = sampler_weights(diffusion, torch.arange(len(diffusion.timestep_map)))
    w = (w / w.mean()).float()
    index = {int(t): i for i, t in enumerate(diffusion.timestep_map.tolist())}

    def weight(batch: CalibBatch) -> torch.Tensor:
        t = batch[1].detach().long().cpu().tolist()
        missing = sorted({v for v in t if v not in index})
        if missing:
            raise ValueError(f"timestep(s) {missing[:5]} are not steps of the {steps}-step schedule")
        return w[[index[v] for v in t]]

    return weight
