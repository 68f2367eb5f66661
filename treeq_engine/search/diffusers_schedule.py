"""Sampler weights for a diffusers pipeline's schedule: how much an ε error at timestep ``t`` moves the sampler.

Our DiT's search and PEFT weigh each calibration sample by ``c(t)²`` (``models.diffusion.sampler_weights``): the
factor by which an error in the predicted noise moves the next sampler state. A diffusers pipeline brings its own
scheduler, and schedulers differ (DDPM's posterior mean, DDIM's step to ``t − T/N``, DPM-Solver++'s second-order
mix of this step's and the last step's predictions, Heun's two calls per step...), so the factor is not computed
from a formula but measured on the scheduler itself: ``scheduler_weights`` replays its schedule on a copy and, at
every call, steps once with the model output ``ε`` and once with ``ε + 1``; the difference of the two next states,
brought to the scale the model sees (``scale_model_input``: Euler-type schedulers keep ``x/√ᾱ``), is ``c``. That
is exact wherever the step is linear in the model output, which is every ε scheduler with sample clipping and
dynamic thresholding off; the copy turns them off (with ``clip_sample`` a clipped element's coefficient depends
on the data; the weights are the unclipped ones), and a step that is still not linear is refused. Stochastic
steps get the same noise in both. On ``DDPMScheduler`` this is exactly our sampler's ``β/(√α·√(1 − ᾱ_t))`` (a
test holds them equal on the same timesteps).

A timestep the schedule visits more than once (Heun's two roles, repeats in Karras schedules) gets the mean of its
calls' ``c²``: the captured samples at it cannot be told apart either. The weights are normalised to mean 1 over
the schedule's calls, as ours are. A scheduler without a ``ᾱ`` schedule (flow matching), predicting other than ε,
or ending at zero terminal SNR has none: ``scheduler_weights`` says why, and the search then takes the plain
ε-MSE.
"""
from __future__ import annotations

import copy
import inspect
import json
import math
from typing import Any, Callable, Mapping, Sequence

import torch

METADATA_KEY = "sampler_weights"   # in the calibration file: JSON [[timestep, weight], ...]
SCHEDULER_KEY = "scheduler"        # in the calibration file: "<class> <steps> steps"
_NONLINEAR = ("clip_sample", "thresholding")   # config switches that make a step depend on the data


def scheduler_weights(scheduler: Any, steps: int | None = None, *, shape: Sequence[int] = (1, 4, 4, 4)
                      ) -> dict[float, float]:
    """``{timestep: c(t)²}`` over the timesteps ``scheduler`` visits in ``steps`` steps (``None``: the schedule it
    holds now, which must accept ``set_timesteps(timesteps=...)``), measured on a copy (see the module docstring;
    ``scheduler`` itself is not touched), normalised to mean 1 over its calls. A ``ValueError`` names why a
    scheduler has none."""
    name = type(scheduler).__name__
    abar = getattr(scheduler, "alphas_cumprod", None)
    if abar is None:
        raise ValueError(f"{name} has no ᾱ schedule (alphas_cumprod): no ε sampler weights for it")
    prediction = getattr(getattr(scheduler, "config", None), "prediction_type", "epsilon")
    if prediction != "epsilon":
        raise ValueError(f"{name} predicts {prediction!r}, not the noise: the ε sampler weights do not apply")
    last = float(torch.as_tensor(abar, dtype=torch.float64)[-1])
    if last <= 1e-6:
        raise ValueError(f"{name}'s schedule ends at zero terminal SNR (ᾱ_T = {last:.2g}): the noise is all there "
                         "is at its first step and c(t)² degenerates there; no ε sampler weights for it")
    if steps is not None and steps <= 0:
        raise ValueError(f"steps must be positive, got {steps}")
    probe = copy.deepcopy(scheduler)
    off = {k: False for k in _NONLINEAR if getattr(probe.config, k, False)}
    if off:
        probe.register_to_config(**off)
    try:
        if steps is not None:
            probe.set_timesteps(steps)
        else:
            held = getattr(scheduler, "timesteps", None)
            if held is None:
                raise ValueError(f"{name} holds no schedule: give steps")
            probe.set_timesteps(timesteps=[int(v) for v in torch.as_tensor(held).tolist()])
    except TypeError as e:
        raise ValueError(f"{name} cannot replay its schedule without steps ({e}): give steps") from None
    takes_generator = "generator" in inspect.signature(probe.step).parameters

    def step(sched: Any, eps: torch.Tensor, t: Any, x: torch.Tensor) -> torch.Tensor:
        kw = {"generator": torch.Generator().manual_seed(0)} if takes_generator else {}
        return sched.step(eps, t, x, return_dict=False, **kw)[0]

    # every call from the state 0 with ε = 0 (the coefficient of a linear step does not depend on them, and the
    # state stays small, so float rounding stays far below the smallest c), the history advanced the same way
    zero = torch.zeros(tuple(shape), dtype=torch.float64)
    calls: list[tuple[float, float]] = []
    try:
        for t in list(probe.timesteps):
            probe.scale_model_input(zero, t)   # Euler-type schedulers find their step index here
            a, b = copy.deepcopy(probe), copy.deepcopy(probe)
            diff = step(b, zero + 1.0, t, zero).double() - step(a, zero, t, zero).double()
            diff = b.scale_model_input(diff, t)   # to the scale the model sees at the next call
            c = float(diff.mean())
            if float((diff - c).abs().max()) > 1e-4 * max(abs(c), 1e-3):
                raise ValueError(f"{name}'s step at timestep {float(t):g} is not linear in the model output")
            calls.append((float(t), c * c))
            step(probe, zero, t, zero)
    except ValueError:
        raise
    except Exception as e:   # a scheduler whose step needs what a probe cannot give (e.g. a learned variance)
        raise ValueError(f"{name}: its step could not be measured ({type(e).__name__}: {e})") from None
    mean = sum(w for _, w in calls) / len(calls)
    if not mean > 0.0:
        raise ValueError(f"{name}: every step's ε weight is zero")
    grouped: dict[float, list[float]] = {}
    for t, w in calls:
        grouped.setdefault(t, []).append(w)
    return {t: sum(ws) / len(ws) / mean for t, ws in grouped.items()}


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
