"""The two kernel ops composed from the format oracle: the reference backend every other backend must match.

``quantize_activation``: [LayerNorm or RMSNorm] → [adaLN modulate] → Monarch stage 1 (unquantized) → per-token
quantization.
``packed_linear``: exact int32 GEMM → zero-point corrections and scales → + Monarch stage 2 → + bias →
[GELU(tanh)] → bf16 out, or per-token quantization for the next layer, or the gated residual
``residual + gate ⊙ out`` (float32 from the rounded output, rounded once more).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..branches import monarch
from ..format import QuantSpec, int_gemm, quantize, zero_point_correction
from .derived import derived
from .types import PackedWeight, QuantizedActivation


def preprocess(x: torch.Tensor, *, ln_eps: float | None = None, shift: torch.Tensor | None = None,
               scale: torch.Tensor | None = None, rms_norm: bool = False) -> torch.Tensor:
    """float32 rows after the optional norm without affine and modulate ``x·(1 + scale) + shift``. The norm, where
    ``ln_eps`` is given: LayerNorm (as DiT), or with ``rms_norm`` RMSNorm ``x·rsqrt(mean(x²) + eps)`` (as Z-Image and
    LTX-Video). ``shift``/``scale`` are ``(G, K)``: row ``m`` uses group ``m // (M // G)`` (one group per sample)."""
    xf = x.float()
    if rms_norm and ln_eps is None:
        raise ValueError("rms_norm needs ln_eps (the RMSNorm's epsilon)")
    if ln_eps is not None and rms_norm:
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + ln_eps)
    elif ln_eps is not None:
        xf = F.layer_norm(xf, (xf.shape[-1],), eps=ln_eps)
    if (shift is None) != (scale is None):
        raise ValueError("modulate needs both shift and scale")
    if shift is not None:
        assert scale is not None   # (both or neither: checked above)
        g = shift.shape[0]
        if x.shape[0] % g:
            raise ValueError(f"modulate groups: M={x.shape[0]} is not a multiple of G={g}")
        rep = x.shape[0] // g
        xf = xf * (1 + scale.float().repeat_interleave(rep, 0)) + shift.float().repeat_interleave(rep, 0)
    return xf


def quantize_activation(x: torch.Tensor, spec: QuantSpec, *, ln_eps: float | None = None,
                        shift: torch.Tensor | None = None, scale: torch.Tensor | None = None,
                        monarch_w1: torch.Tensor | None = None, rms_norm: bool = False) -> QuantizedActivation:
    xf = preprocess(x, ln_eps=ln_eps, shift=shift, scale=scale, rms_norm=rms_norm)
    z = None if monarch_w1 is None else monarch.stage1(xf, monarch_w1.float())
    qt = quantize(xf, spec, nonfinite="propagate")
    return QuantizedActivation(qt.codes, qt.scale, qt.zero_point, qt.row_sums(), spec.bits, z)


def packed_linear(act: QuantizedActivation, weight: PackedWeight, *, bias: torch.Tensor | None = None,
                  monarch_w2: torch.Tensor | None = None, gelu: bool = False, out_dtype: torch.dtype = torch.bfloat16,
                  out_spec: QuantSpec | None = None, residual: torch.Tensor | None = None,
                  gate: torch.Tensor | None = None) -> torch.Tensor | QuantizedActivation:
    codes = derived(weight.anchor, "codes", (weight.anchor,), weight.codes)  # unpack once per weight
    acc = int_gemm(act.codes, codes)
    corr = zero_point_correction(acc, weight.k, act.zero_point, act.row_sum, weight.zero_point, weight.col_sum)
    y = corr.float() * act.scale[:, None] * weight.scale[None, :]
    if monarch_w2 is not None:
        if act.z is None:
            raise ValueError("monarch_w2 given but the activation carries no stage-1 output z")
        y = y + monarch.stage2(act.z.float(), monarch_w2.float(), weight.n)
    if bias is not None:
        y = y + bias.float()
    if gelu:
        y = F.gelu(y, approximate="tanh")
    if out_spec is not None:  # what the next layer would read had this one written out_dtype rows
        return quantize_activation(y.to(out_dtype), out_spec)
    if residual is not None:
        return gated_residual(y.to(out_dtype), residual, gate)
    return y.to(out_dtype)


def gated_residual(y: torch.Tensor, residual: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
    """``residual + gate ⊙ y`` in float32 (product and sum each rounded, as two separate float32 operations),
    rounded to ``y``'s dtype; ``gate (G, N)``: row ``m`` takes gate row ``m // (M // G)``."""
    yf = y.float()
    if gate is not None:
        yf = gate.float().repeat_interleave(y.shape[0] // gate.shape[0], 0) * yf
    return (residual.float() + yf).to(y.dtype)
