"""SmoothQuant-style channel balancing for a DiT, folded into the model so that runtime and kernels are unchanged.

A linear ``y = x·Wᵀ`` is rewritten ``y = (x/s)·(W·diag(s))ᵀ`` with, per input channel k,

    s_k = max|X_k|^α / max_n |W[n, k]|^(1−α)

which moves activation outliers (hard for a per-token quantizer) into the weight (easy for a per-channel one).
The division by ``s`` must cost nothing at run time, so it is folded into the op that produces ``x``. In a DiT
block (the facebookresearch layout) three of the four block linears allow that exactly:

    attn.qkv   x = LN(h)·(1 + scale_msa) + shift_msa   ->  rows of adaLN_modulation.1 for shift_msa/scale_msa
    mlp.fc1    x = LN(h)·(1 + scale_mlp) + shift_mlp   ->  rows of adaLN_modulation.1 for shift_mlp/scale_mlp
    attn.proj  x = softmax(q·kᵀ)·v                    ->  the v rows of attn.qkv (attention is linear in v)

(``shift/s`` is a row scaling; ``(1 + scale)/s − 1`` a row scaling plus a bias change.) ``mlp.fc2``'s input is
GELU's output, which nothing linear precedes, so it is left alone. The folded model computes the same function
in floating point. Per layer, ``α`` is chosen from a grid — or no smoothing — by the calibrated layer-output
error on the FP model's inputs (``calibrate_layer``), so smoothing is applied only where it measurably helps.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from ..plan import QuantPlan
from .capture import CalibBatch, StageRunner

TARGETS = ("attn.qkv", "attn.proj", "mlp.fc1")


def smoothing_factors(x: torch.Tensor, w: torch.Tensor, alpha: float) -> torch.Tensor:
    """``s (K,)`` for inputs ``x (M, K)`` and weight ``w (N, K)``."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"smoothing alpha must be in [0, 1], got {alpha}")
    xa = x.detach().abs().amax(0).float().clamp(min=1e-5)
    wa = w.detach().abs().amax(0).float().clamp(min=1e-5)
    return (xa ** alpha / wa ** (1 - alpha)).clamp(min=1e-5, max=1e5)


def _linear(model: nn.Module, name: str) -> nn.Module:
    try:
        mod = model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"smoothing folds into the DiT block layout; the model has no {name!r}") from None
    if getattr(mod, "is_frozen", False):
        raise ValueError(f"{name} is already calibrated (frozen); smooth the FP model before calibration")
    if not isinstance(getattr(mod, "weight", None), torch.Tensor):
        raise ValueError(f"{name} has no weight to fold a smoothing factor into")
    return mod


def targets(model: nn.Module, plan: QuantPlan) -> list[str]:
    """The block linears of ``plan`` that smoothing can fold into ``model`` (quantized activations only)."""
    out = []
    for name, cfg in plan.layers.items():
        if any(name.endswith("." + t) for t in TARGETS) and cfg.act_spec().is_quantized:
            out.append(name)
    return out


@torch.no_grad()
def fold(model: nn.Module, name: str, s: torch.Tensor) -> None:
    """Rewrite ``model`` so that layer ``name`` (``<block>.attn.qkv|attn.proj|mlp.fc1``) sees ``x/s`` and has
    weight ``W·diag(s)``; the model's function is unchanged."""
    parent, _, leaf = name.rpartition(".")
    block, _, sub = parent.rpartition(".")
    kind = f"{sub}.{leaf}"
    pre = f"{block}." if block else ""
    if kind not in TARGETS:
        raise ValueError(f"cannot fold smoothing for {name!r}: only {TARGETS} of a DiT block")
    target = _linear(model, name)
    d = target.weight.shape[1]
    s = s.to(target.weight.device, torch.float32)
    if s.shape != (d,) or not bool((torch.isfinite(s) & (s > 0)).all()):
        raise ValueError(f"{name}: smoothing factors must be positive and finite, shape ({d},)")
    if kind == "attn.proj":
        qkv = _linear(model, f"{pre}attn.qkv")
        rows = slice(2 * d, 3 * d)  # v in the (3, heads, head_dim) layout, in proj's input order
        qkv.weight[rows] /= s[:, None].to(qkv.weight.dtype)
        if qkv.bias is not None:
            qkv.bias[rows] /= s.to(qkv.bias.dtype)
    else:
        ada = _linear(model, f"{pre}adaLN_modulation.1")
        if ada.weight.shape[0] != 6 * d:
            raise ValueError(f"{pre}adaLN_modulation.1 has {ada.weight.shape[0]} outputs; a DiT block has 6·{d}")
        first = 0 if kind == "attn.qkv" else 3  # chunks: shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate
        shift, scale = slice(first * d, (first + 1) * d), slice((first + 1) * d, (first + 2) * d)
        inv = (1.0 / s).to(ada.weight.dtype)
        ada.weight[shift] *= inv[:, None]
        ada.weight[scale] *= inv[:, None]
        if ada.bias is not None:
            ada.bias[shift] *= inv
            ada.bias[scale] = (1.0 + ada.bias[scale]) * inv - 1.0
    target.weight *= s[None, :].to(target.weight.dtype)


@torch.no_grad()
def choose(model: nn.Module, plan: QuantPlan, batches: Sequence[CalibBatch], alphas: Sequence[float],
           config) -> tuple[dict[str, torch.Tensor], dict[str, float | None]]:
    """Per target layer, the ``α`` of ``alphas`` (or none) with the least calibrated layer error on the FP
    model's inputs; returns ``(factors, chosen alpha per layer)``. ``config`` is the ``PTQConfig`` used."""
    from .ptq import calibrate_layer

    names = targets(model, plan)
    factors: dict[str, torch.Tensor] = {}
    chosen: dict[str, float | None] = {}
    if not names:
        return factors, chosen
    runner = StageRunner(model, batches, names)
    for stage in range(runner.num_stages):
        for name in [n for n in names if runner.stage_of[n] == stage]:
            x = runner.capture(name, config.max_tokens, seed=config.seed)
            w = _linear(model, name).weight.detach().float()
            cfg = plan.layers[name]
            best_err, best_a, best_s = calibrate_layer(w, x, cfg, config).err, None, None
            for a in alphas:
                s = smoothing_factors(x, w, a)
                err = calibrate_layer(w * s, x / s, cfg, config).err
                if err < best_err:
                    best_err, best_a, best_s = err, a, s
            chosen[name] = best_a
            if best_s is not None:
                factors[name] = best_s
        if any(runner.stage_of[n] > stage for n in names):
            runner.advance()
    return factors, chosen
