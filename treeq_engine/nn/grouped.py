"""Per-group activation fake-quantization: G groups of token rows, each under its own spec, in one pass.

The search scores many candidate configurations of the same layers at once by stacking them along the batch
(``QuantLinear.set_group_configs``). Group ``g`` of an input ``(G, R, K)`` is fake-quantized per token with
``specs[g]``; the arithmetic is the oracle's (``treeq_engine.format.quantize``) with ``qmin``, ``qmax``, the
clip ratio and the symmetric switch turned into per-group float32 tensors, so every group's result is
bit-identical to ``fake_quantize(x[g], specs[g], nonfinite="propagate")`` (float32 ops in the same order; IEEE
division and rounding do not care whether an operand was a scalar or a tensor element). A ``None`` spec or a
bf16 (16-bit) spec leaves its group unchanged.

No host synchronisation: non-finite rows are handled branch-free (they come out NaN, as the kernels do).
"""
from __future__ import annotations

import functools
from typing import Sequence, cast

import torch

from ..format import QuantSpec


def group_params(specs: Sequence[QuantSpec | None], device: torch.device | str) -> tuple[torch.Tensor, ...]:
    """Per-group (qmin, qmax, clip, symmetric, quantized), each float32/bool ``(G, 1)`` on ``device``. Build it
    once per set of specs: it is a host-to-device copy."""
    qmin, qmax, clip, sym, on = [], [], [], [], []
    for s in specs:
        q = s is not None and s.is_quantized
        qs = cast(QuantSpec, s)   # read only where q, so never None there
        qmin.append(float(qs.qmin) if q else -128.0)
        qmax.append(float(qs.qmax) if q else 127.0)
        clip.append(qs.clip_ratio if q else 1.0)
        sym.append(bool(q and qs.symmetric))
        on.append(q)
    f = lambda v: torch.tensor(v, dtype=torch.float32, device=device)[:, None]  # noqa: E731
    b = lambda v: torch.tensor(v, dtype=torch.bool, device=device)[:, None]  # noqa: E731
    return f(qmin), f(qmax), f(clip), b(sym), b(on)


def _fake_quantize_core(x2: torch.Tensor, qmin: torch.Tensor, qmax: torch.Tensor, clip: torch.Tensor,
                        sym: torch.Tensor, any_sym: bool, bounds: tuple[float, float] | None) -> torch.Tensor:
    """The arithmetic on ``x2 (G, R, K)`` (in float32, returned in ``x2``'s dtype) with per-group parameters
    ``(G, 1)``; ``bounds``: the common ``(qmin, qmax)`` when every group has the same bits (a scalar clamp is much
    cheaper than a tensor one)."""
    # A row holding NaN/Inf has a non-finite min or max (both propagate NaN): its scale is set to NaN, so the
    # whole row comes out NaN, as in the oracle's "propagate" mode, without a full pass to find it.
    out_dtype, x2 = x2.dtype, x2.to(torch.float32)  # inside, so a compiled core fuses the casts too
    raw_lo, raw_hi = x2.amin(dim=2), x2.amax(dim=2)                       # (G, R)
    bad = ~(torch.isfinite(raw_lo) & torch.isfinite(raw_hi))
    # asymmetric: lo = clip·min(min x, 0), hi = clip·max(max x, 0), scale = (hi − lo)/(qmax − qmin)
    lo = raw_lo.clamp(max=0.0) * clip
    hi = raw_hi.clamp(min=0.0) * clip
    rng = hi - lo
    scale = rng / (qmax - qmin)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))   # 0 where the range is 0 or underflows
    zp = torch.round(qmin - lo / scale).clamp(qmin, qmax)
    if any_sym:
        # symmetric: amax = clip·max|x| = clip·max(−min x, max x), scale = amax / qmax, zp = 0
        amax = torch.maximum(-raw_lo, raw_hi) * clip
        s_scale = amax / qmax
        s_scale = torch.where(s_scale > 0, s_scale, torch.ones_like(s_scale))
        scale = torch.where(sym, s_scale, scale)
        zp = torch.where(sym, torch.zeros_like(zp), zp)
    scale = scale.masked_fill(bad, float("nan"))
    scale3, zp3 = scale[..., None], zp[..., None]
    # q = clamp(round(x / scale) + zp, qmin, qmax); x_hat = (q − zp)·scale, in place after the first op
    q = (x2 / scale3).round_().add_(zp3)
    q = q.clamp_(*bounds) if bounds is not None else q.clamp_(min=qmin[..., None], max=qmax[..., None])
    return q.sub_(zp3).mul_(scale3).to(out_dtype)


_core = _fake_quantize_core


def use_compiled(enabled: bool = True) -> None:
    """Run the arithmetic through ``torch.compile`` (one fused reduction and one fused elementwise kernel on a
    GPU, instead of about eight passes over the activations). Opt-in: compiled code may reassociate or use
    approximate division, so it is close to, not bit-identical with, the oracle (``test_nn_grouped`` bounds it
    on CUDA); the eager path is the reference."""
    global _core
    _core = torch.compile(_fake_quantize_core, dynamic=True) if enabled else _fake_quantize_core


def is_compiled() -> bool:
    """Whether :func:`use_compiled` is on."""
    return _core is not _fake_quantize_core


@functools.lru_cache(maxsize=256)
def _plan(specs: tuple[QuantSpec | None, ...], device: torch.device) -> tuple:
    """Everything about ``specs`` that does not depend on ``x``, built once per (specs, device) and only read
    afterwards: the per-group tensors (a host-to-device copy), whether any group is symmetric, the common clamp
    bounds when every group has the same bits, and whether every group is quantized."""
    quantized = [s is not None and s.is_quantized for s in specs]
    # (the casts: where q holds, s is not None)
    bits = {cast(QuantSpec, s).bits for s, q in zip(specs, quantized) if q}
    b = next(iter(bits)) if len(bits) == 1 else None
    bounds = None if b is None else (float(-(1 << (b - 1))), float((1 << (b - 1)) - 1))
    any_sym = any(q and cast(QuantSpec, s).symmetric for s, q in zip(specs, quantized))
    return group_params(specs, device), any_sym, bounds, any(quantized), all(quantized)


def fake_quantize_groups(x: torch.Tensor, specs: Sequence[QuantSpec | None],
                         params: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
    """Fake-quantize activations ``x (G, R, K)`` per token, group ``g`` with ``specs[g]``; returns ``x``'s
    dtype and shape. ``params``: ``group_params(specs, x.device)``; by default the cached ones for these specs
    on this device. Inference only (no straight-through gradient)."""
    if x.dim() != 3 or x.shape[0] != len(specs):
        raise ValueError(f"fake_quantize_groups: x must be (G={len(specs)}, R, K), got {tuple(x.shape)}")
    cached, any_sym, bounds, any_on, all_on = _plan(tuple(specs), x.device)
    if not any_on:
        return x
    qmin, qmax, clip, sym, on = params if params is not None else cached
    if _core is not _fake_quantize_core:
        bounds = None  # Python-float bounds are guards for torch.compile: one recompile per bit-width
    x_hat = _core(x.detach(), qmin, qmax, clip, sym, any_sym, bounds)
    return x_hat if all_on else torch.where(on[..., None], x_hat, x)
