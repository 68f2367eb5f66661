"""Sampler weights for a diffusers pipeline's schedule: how much an ε error at timestep ``t`` moves the sampler.

Our DiT's search and PEFT weigh each calibration sample by ``c(t)²`` (``models.diffusion.sampler_weights``): the
factor by which an error in the predicted noise moves the next sampler state. A diffusers pipeline brings its own
scheduler, and schedulers differ (DDPM's posterior mean, DDIM's step to ``t − T/N``, DPM-Solver++ and PLMS mixing
this call's prediction with earlier ones, Heun calling twice per step...), so no formula is assumed: the factor is
measured on the scheduler's own ``step`` (``scheduler_weights``): a copy runs through its schedule fed model
output 0, and at every call two copies of it step from the same state, one with output 0 and one with 1; the
difference of their next states, brought to the scale the model sees (``scale_model_input``: Euler-type
schedulers keep ``x/√ᾱ``), is ``c``. DDPM, DDIM, Euler and first-order DPM-Solver get exactly their closed forms;
on ``DDPMScheduler`` that is our sampler's ``β/(√α·√(1 − ᾱ_t))`` (a test holds them equal on the same timesteps).
``c`` is what this call's prediction does to the next state, as ours is. A multistep solver also feeds the
prediction into the next call through its history, which is not charged to this call: DPM-Solver++ 2M puts about
1.47× the first-order coefficient on the current prediction in its second-order steps (its first and last steps
are first-order), PLMS's warm-up swings 0.6–2.3×. Holding the error at every call instead (two histories, fed 0
and 1) was tried and rejected: in 2M's data-prediction extrapolation a constant ε error shrinks, and its first
call came out 18× the next.

A step is measured this way only where it is linear in the model output. Sample clipping and dynamic
thresholding are the switches that make it not (a clipped element's coefficient depends on the data); the copies
turn them off, so the weights are the unclipped steps'. Every call is also stepped from a random state with a
random output and two random ±1 directions, and a step whose response is not the same multiple of every
element, twice over, is refused. Stochastic steps get the same noise in every copy. The arguments the pipeline
gives ``step`` (``eta``) are passed through (``step_kwargs``).

A timestep the schedule visits more than once (Heun's two roles, repeats in Karras schedules) gets the mean of its
calls' ``c²``: the captured samples at it cannot be told apart either. The weights are normalised to mean 1 over
the schedule's calls, as ours are. A scheduler without a ``ᾱ`` schedule (flow matching), predicting other than ε,
whose first visited step is at zero SNR, or whose step needs what a probe cannot give (a learned variance) has
none: ``scheduler_weights`` says why, and the search then takes the plain ε-MSE.
"""
from __future__ import annotations

import copy
import inspect
import json
import math
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from .evaluator import sample_timesteps

METADATA_KEY = "sampler_weights"   # in the calibration file: JSON [[timestep, weight], ...]
SCHEDULER_KEY = "scheduler"        # in the calibration file: "<class> <steps> steps"
CONFIG_KEY = "scheduler_config"    # in the calibration file: JSON of ``config_of`` (class and settings)
_NONLINEAR = ("clip_sample", "thresholding")   # config switches that make a step depend on the data


def _schedule(probe: Any, scheduler: Any, steps: int | None, name: str) -> None:
    """Set ``probe`` (a copy) to the schedule: ``steps`` steps, or the one ``scheduler`` holds."""
    if steps is not None:
        if steps <= 0:
            raise ValueError(f"steps must be positive, got {steps}")
        probe.set_timesteps(steps)
        return
    n = getattr(scheduler, "num_inference_steps", None)
    custom = bool(getattr(scheduler, "custom_timesteps", False))
    if not n and not custom:
        raise ValueError(f"{name} holds no inference schedule (set_timesteps was not called): give steps")
    held = torch.as_tensor(scheduler.timesteps).cpu().double()

    def same() -> bool:
        again = torch.as_tensor(probe.timesteps).cpu().double()
        return held.shape == again.shape and torch.equal(held, again)

    if n:
        probe.set_timesteps(n)
    if (not n or not same()) and bool((held == held.round()).all()):   # custom integer timesteps, where taken
        try:
            probe.set_timesteps(timesteps=[int(v) for v in held.tolist()])
        except (TypeError, ValueError):
            pass
    if not same():
        raise ValueError(f"{name} holds a schedule that set_timesteps does not give again: give steps (and "
                         "measure before the pipeline runs with the same schedule)")


def scheduler_weights(scheduler: Any, steps: int | None = None, *, step_kwargs: Mapping[str, Any] | None = None,
                      shape: Sequence[int] = (1, 4, 4, 4)) -> dict[float, float]:
    """``{timestep: c(t)²}`` over the timesteps ``scheduler`` visits in ``steps`` steps (``None``: the schedule
    ``set_timesteps`` gave it), measured on copies (see the module docstring; ``scheduler`` itself is not touched),
    normalised to mean 1 over its calls. ``step_kwargs``: what the pipeline passes to ``step`` besides the
    generator (e.g. ``eta``). A ``ValueError`` names why a scheduler has none."""
    name = type(scheduler).__name__
    abar = getattr(scheduler, "alphas_cumprod", None)
    if abar is None:
        raise ValueError(f"{name} has no ᾱ schedule (alphas_cumprod): no ε sampler weights for it")
    abar = torch.as_tensor(abar, dtype=torch.float64).cpu()
    prediction = getattr(getattr(scheduler, "config", None), "prediction_type", "epsilon")
    if prediction != "epsilon":
        raise ValueError(f"{name} predicts {prediction!r}, not the noise: the ε sampler weights do not apply")
    extra = {k: v for k, v in dict(step_kwargs or {}).items() if k not in ("generator", "return_dict")}
    zero_hist = copy.deepcopy(scheduler)   # runs the schedule, fed model output 0
    off = {k: False for k in _NONLINEAR if getattr(zero_hist.config, k, False)}
    if off:
        zero_hist.register_to_config(**off)
    try:
        _schedule(zero_hist, scheduler, steps, name)
    except ValueError as e:
        raise ValueError(e if str(e).startswith(name) or "steps must" in str(e) else f"{name}: {e}") from None
    first = float(torch.as_tensor(zero_hist.timesteps)[0])
    a_first = float(abar[min(max(int(round(first)), 0), len(abar) - 1)])
    if a_first <= 1e-6:
        raise ValueError(f"{name}'s schedule starts at zero SNR (ᾱ = {a_first:.2g} at timestep {first:g}): the "
                         "noise is all there is at its first step and c(t)² degenerates there; no ε sampler "
                         "weights for it")
    takes_generator = "generator" in inspect.signature(zero_hist.step).parameters

    def step(sched: Any, eps: torch.Tensor, t: Any, x: torch.Tensor) -> torch.Tensor:
        kw = {"generator": torch.Generator().manual_seed(0)} if takes_generator else {}
        return sched.step(eps, t, x, return_dict=False, **extra, **kw)[0].double()

    g = torch.Generator().manual_seed(0)
    zero = torch.zeros(tuple(shape), dtype=torch.float64)
    calls: list[tuple[float, float]] = []
    try:
        for t in list(zero_hist.timesteps):
            zero_hist.scale_model_input(zero, t)   # Euler-type schedulers find their step index here
            # linear in the model output? From a random state and output, two random ±1 steps along u
            x0, e0 = torch.randn(zero.shape, generator=g, dtype=torch.float64), \
                torch.randn(zero.shape, generator=g, dtype=torch.float64)
            u = torch.randint(0, 2, zero.shape, generator=g).double() * 2 - 1
            ys = [step(copy.deepcopy(zero_hist), e0 + k * u, t, x0) for k in range(3)]
            d1, d2 = (ys[1] - ys[0]) * u, (ys[2] - ys[1]) * u
            tol = 1e-6 * (float(d1.abs().max()) + float(ys[0].abs().max()))   # (some steps round in float32)
            if float((d1 - d1.mean()).abs().max()) > tol or float((d2 - d1).abs().max()) > tol:
                raise ValueError(f"{name}'s step at timestep {float(t):g} is not linear in the model output (a "
                                 "clipping or thresholding switch this probe does not know?)")
            # the coefficient: this call's output 1 (on a copy) or 0 (the run itself, which goes on from there),
            # one history, one state
            probe = copy.deepcopy(zero_hist)
            diff = step(probe, zero + 1.0, t, zero) - step(zero_hist, zero, t, zero)
            diff = probe.scale_model_input(diff, t)   # to the scale the model sees at the next call
            c = float(diff.mean())
            if not math.isfinite(c):
                raise ValueError(f"{name}'s step at timestep {float(t):g} gives a non-finite state (its own "
                                 "arithmetic: too many steps for this schedule?)")
            calls.append((float(t), c * c))
    except ValueError as e:
        raise ValueError(e if str(e).startswith(name) else f"{name}: {e}") from None
    except Exception as e:   # a scheduler whose step needs what a probe cannot give (e.g. a learned variance)
        raise ValueError(f"{name}: its step could not be measured ({type(e).__name__}: {e})") from None
    mean = sum(w for _, w in calls) / len(calls)
    if not mean > 0.0:
        raise ValueError(f"{name}: every step's ε weight is zero")
    grouped: dict[float, list[float]] = {}
    for t, w in calls:
        grouped.setdefault(t, []).append(w)
    return {t: sum(ws) / len(ws) / mean for t, ws in grouped.items()}


def config_of(scheduler: Any) -> dict[str, Any]:
    """A scheduler's class and settings as plain JSON values (``_``-prefixed bookkeeping such as the diffusers
    version left out): what its weights depend on, compared by ``config_drift``."""
    config = {k: v for k, v in dict(getattr(scheduler, "config", {}) or {}).items() if not k.startswith("_")}
    return json.loads(json.dumps({"_class_name": type(scheduler).__name__, **config}, sort_keys=True, default=str))


def pipeline_scheduler_config(directory: str | Path) -> dict[str, Any] | None:
    """``config_of`` the scheduler a saved pipeline directory names (its ``model_index.json`` and
    ``scheduler/scheduler_config.json``, defaults filled in as loading would); None where the directory is not
    a pipeline's or its scheduler is not one of diffusers' own."""
    root = Path(directory)
    try:
        _, cls = json.loads((root / "model_index.json").read_text())["scheduler"]
        settings = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
    except (OSError, ValueError, KeyError, TypeError):
        return None
    import diffusers

    factory = getattr(diffusers, str(cls), None)
    if factory is None or not hasattr(factory, "from_config"):
        return None
    try:
        return config_of(factory.from_config(settings))
    except Exception:   # a config this diffusers version cannot read: nothing to compare
        return None


def config_drift(stored: Mapping[str, Any], now: Mapping[str, Any]) -> str | None:
    """What differs between the scheduler settings the weights were measured on and the pipeline's now, for a
    note (None when nothing does)."""
    if stored.get("_class_name") != now.get("_class_name"):
        return f"{stored.get('_class_name')} became {now.get('_class_name')}"
    keys = sorted(k for k in set(stored) | set(now) if stored.get(k) != now.get(k))
    if not keys:
        return None
    shown = ", ".join(f"{k} {stored.get(k)!r} -> {now.get(k)!r}" for k in keys[:4])
    more = f" (+{len(keys) - 4} more)" if len(keys) > 4 else ""
    return f"{now.get('_class_name')} settings changed: {shown}{more}"


def to_metadata(weights: Mapping[float, float], scheduler: str,
                config: Mapping[str, Any] | None = None) -> dict[str, str]:
    """The calibration file's metadata entries for ``weights`` (``scheduler``: what made them, for people;
    ``config``: its ``config_of``, so that a later change to the pipeline's scheduler is noticed)."""
    meta = {METADATA_KEY: json.dumps([[float(t), float(w)] for t, w in weights.items()]), SCHEDULER_KEY: scheduler}
    if config is not None:
        meta[CONFIG_KEY] = json.dumps(dict(config), sort_keys=True)
    return meta


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
    """``(N,)`` float64: each sample's weight by its timestep (of per-token timesteps ``(N, S)``, the sample's
    largest: ``evaluator.sample_timesteps``); a timestep without one is an error."""
    values = [float(v) for v in sample_timesteps(timesteps.detach()).cpu().tolist()]
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
