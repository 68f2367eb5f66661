"""Sampler weights for a diffusers pipeline's schedule: how much an ε error at timestep ``t`` moves the sampler.

Our DiT's search and PEFT weigh each calibration sample by ``c(t)²`` (``models.diffusion.sampler_weights``): the
factor by which an error in the predicted noise moves the next sampler state. A diffusers pipeline brings its own
scheduler, so the factor is read off it when its calls are captured (``treeq capture`` stores it in the
calibration file), from the schedule's ``ᾱ`` and the step each timestep goes to (``ᾱ_prev``; the last step goes to
the clean sample, ``ᾱ = 1``):

    DDPMScheduler (ancestral)   c = β / (√α · √(1 − ᾱ_t)),   α = ᾱ_t / ᾱ_prev, β = 1 − α   (as our sampler)
    every other ε scheduler     c = √(1 − ᾱ_prev) − √ᾱ_prev · √(1 − ᾱ_t) / √ᾱ_t          (the DDIM step)

The DDIM coefficient is the exact one for DDIM and for a first-order DPM-Solver step; multistep solvers
(DPM-Solver++ 2M, UniPC, …) mix in the previous step's ε, so there it is the leading term. Both weights are tiny
for the last step (``t ≈ 0``, which plain ε-MSE is dominated by) and order one at high noise. They are normalised to
mean 1 over the schedule, as ours are. A scheduler without a ``ᾱ`` schedule (flow matching) or predicting other
than ε has none: ``scheduler_weights`` says why, and the search then takes the plain ε-MSE.
"""
from __future__ import annotations

import json
import math
from typing import Any, Callable, Mapping, Sequence

import torch

METADATA_KEY = "sampler_weights"   # in the calibration file: JSON [[timestep, weight], ...]
SCHEDULER_KEY = "scheduler"        # in the calibration file: "<class> <steps> steps"


def scheduler_weights(scheduler: Any, steps: int | None = None) -> dict[float, float]:
    """``{timestep: c(t)²}`` over the distinct timesteps ``scheduler`` visits in ``steps`` steps (it calls
    ``scheduler.set_timesteps(steps)``; ``None``: the schedule it holds now), normalised to mean 1 (see the module
    docstring). A ``ValueError`` names why a scheduler has none."""
    name = type(scheduler).__name__
    abar = getattr(scheduler, "alphas_cumprod", None)
    if abar is None:
        raise ValueError(f"{name} has no ᾱ schedule (alphas_cumprod): no ε sampler weights for it")
    prediction = getattr(getattr(scheduler, "config", None), "prediction_type", "epsilon")
    if prediction != "epsilon":
        raise ValueError(f"{name} predicts {prediction!r}, not the noise: the ε sampler weights do not apply")
    if steps is not None:
        if steps <= 0:
            raise ValueError(f"steps must be positive, got {steps}")
        scheduler.set_timesteps(steps)
    if getattr(scheduler, "timesteps", None) is None:
        raise ValueError(f"{name} holds no schedule: give steps")
    abar = torch.as_tensor(abar, dtype=torch.float64).cpu()
    order: list[float] = []
    for v in torch.as_tensor(scheduler.timesteps).flatten().tolist():   # multistep schedules may repeat one
        if float(v) not in order:
            order.append(float(v))

    def at(t: float) -> float:
        i = min(max(int(round(t)), 0), len(abar) - 1)   # fractional timesteps (Karras sigmas): the nearest step
        return float(abar[i])

    ddpm = name == "DDPMScheduler"
    out: dict[float, float] = {}
    for k, t in enumerate(order):
        a_t = at(t)
        a_prev = at(order[k + 1]) if k + 1 < len(order) else 1.0
        if not 0.0 < a_t < 1.0 or not 0.0 < a_prev <= 1.0 or a_prev < a_t:
            raise ValueError(f"{name}: timestep {t:g} has ᾱ {a_t:.3g} after ᾱ {a_prev:.3g}; not a denoising "
                             "schedule")
        if ddpm:
            alpha = a_t / a_prev
            c = (1.0 - alpha) / (math.sqrt(alpha) * math.sqrt(1.0 - a_t))
        else:
            c = math.sqrt(1.0 - a_prev) - math.sqrt(a_prev) * math.sqrt(1.0 - a_t) / math.sqrt(a_t)
        out[t] = c * c
    mean = sum(out.values()) / len(out)
    if not mean > 0.0:
        raise ValueError(f"{name}: every step's ε weight is zero")
    return {t: w / mean for t, w in out.items()}


def to_metadata(weights: Mapping[float, float], scheduler: str) -> dict[str, str]:
    """The calibration file's metadata entries for ``weights`` (``scheduler``: what made them, for people)."""
    return {METADATA_KEY: json.dumps([[float(t), float(w)] for t, w in weights.items()]), SCHEDULER_KEY: scheduler}


def from_metadata(meta: Mapping[str, str], where: str) -> dict[float, float] | None:
    """The weights a calibration file's metadata holds, or None when it holds none; a malformed entry is an error."""
    text = meta.get(METADATA_KEY)
    if text is None:
        return None
    try:
        pairs = json.loads(text)
        out = {float(t): float(w) for t, w in pairs}
    except (ValueError, TypeError) as e:
        raise ValueError(f"{where}: malformed {METADATA_KEY} metadata ({e})") from None
    if not out or any(not (math.isfinite(w) and w >= 0.0) for w in out.values()):
        raise ValueError(f"{where}: {METADATA_KEY} must be non-negative finite weights, got {text[:80]}")
    return out


def per_sample(weights: Mapping[float, float], timesteps: torch.Tensor, where: str) -> torch.Tensor:
    """``(N,)`` float64: each sample's weight by its timestep; a timestep without one is an error."""
    values = [float(v) for v in timesteps.detach().flatten().cpu().tolist()]
    missing = sorted({v for v in values if v not in weights}, reverse=True)
    if missing:
        raise ValueError(f"{where}: no sampler weight for timestep(s) {missing[:5]} (weights for "
                         f"{sorted(weights, reverse=True)[:5]}…)")
    return torch.tensor([weights[v] for v in values], dtype=torch.float64)


def batch_weights(weights: Mapping[float, float], timestep_index: int,
                  where: str) -> Callable[[Sequence[torch.Tensor]], torch.Tensor]:
    """``batch -> (B,)`` float32 sample weights for PEFT (``finetune(sample_weight=...)``) on input tuples whose
    timestep is at ``timestep_index``."""
    def weight(batch: Sequence[torch.Tensor]) -> torch.Tensor:
        return per_sample(weights, batch[timestep_index], where).float()

    return weight
