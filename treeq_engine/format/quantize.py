"""Reference quantizers (the oracle): quantize, dequantize and fake-quantize with a straight-through gradient.

All arithmetic is float32, in this order, and every kernel reproduces it:

    symmetric   amax  = clip * max|x|                        (per row)
                scale = amax / qmax            (1.0 where that is 0: amax == 0, or it underflows)
                zp    = 0
    asymmetric  lo    = clip * min(min x, 0);  hi = clip * max(max x, 0)
                scale = (hi - lo) / (qmax - qmin)   (1.0 where that is 0, as above)
                zp    = clamp(round(qmin - lo / scale), qmin, qmax)
    codes       q     = clamp(round(x / scale) + zp, qmin, qmax)     (round half to even; true division)
    value       x_hat = scale * (q - zp)

Rows are the last-dim vectors: output channels of a weight ``(N, K)``, tokens of an activation ``(..., K)``.

Calibrated weights. PTQ chooses each output channel's clip ratio (or its scale and zero point) by measuring output
error; ``row_qparams(..., clip=)`` takes a per-row clip, and ``quantize_with_qparams`` /
``fake_quantize_with_qparams`` quantize with given per-row parameters by the same code rule. The latter is also
differentiable in ``scale`` (the LSQ gradient), for fine-tuning quantizer scales.

Non-finite input. A weight holding NaN/Inf is always an error. For activations, ``nonfinite="raise"`` (the
default) raises a ``ValueError`` naming the rows; ``"propagate"`` gives such rows scale NaN, zero point 0 and
codes 0, so their outputs come out NaN (the documented behaviour of the kernels, which cannot raise). A finite row
whose range overflows float32 (``hi - lo`` = inf, asymmetric only) is an error where non-finite values are.
"""
from __future__ import annotations

import dataclasses
from typing import Literal

import torch

from .spec import QuantSpec, Role

NonFinite = Literal["raise", "propagate"]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@dataclasses.dataclass(frozen=True)
class QuantizedTensor:
    """Integer codes plus per-row (scale, zero point). ``codes``: int8 ``(R, K)``; ``scale``: float32 ``(R,)``;
    ``zero_point``: int32 ``(R,)``. Activations keep their leading dims in ``codes`` ``(..., K)``."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    spec: QuantSpec

    @property
    def rows(self) -> int:
        return self.scale.numel()

    def row_sums(self) -> torch.Tensor:
        """Σ_k q[r, k] as int32 ``(R,)``: the zero-point correction of the other operand needs it."""
        # (K from the codes' last dim, not -1: zero rows have no size to infer it from)
        return self.codes.reshape(self.rows, self.codes.shape[-1]).sum(dim=1, dtype=torch.int64).to(torch.int32)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self, dtype)


def _check_float(x: torch.Tensor, what: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{what} must be a floating tensor (float32/float16/bfloat16/float64), got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"{what} must have a non-empty last (K) dimension, got shape {tuple(x.shape)}")


def _nonfinite_rows(x2: torch.Tensor) -> torch.Tensor:
    return ~torch.isfinite(x2).all(dim=1)


def row_qparams(x2: torch.Tensor, spec: QuantSpec, clip: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (scale float32 (R,), zero_point int32 (R,)) of a float32 ``(R, K)`` matrix, by the rules above.
    ``clip`` (float32 ``(R,)``, each in (0, 1]) replaces ``spec.clip_ratio`` row by row."""
    qmin, qmax = float(spec.qmin), float(spec.qmax)
    if clip is None:
        clip = spec.clip_ratio
    else:
        if not isinstance(clip, torch.Tensor) or clip.shape != (x2.shape[0],):
            raise ValueError(f"per-row clip must be a tensor of shape ({x2.shape[0]},), got "
                             f"{tuple(clip.shape) if isinstance(clip, torch.Tensor) else type(clip).__name__}")
        clip = clip.to(device=x2.device, dtype=torch.float32)
        if not bool(((clip > 0) & (clip <= 1)).all()):
            raise ValueError("per-row clip ratios must lie in (0, 1]")
    # Divide by a tensor on the rows' device, never by a Python number: CUDA computes tensor / CPU-scalar as
    # a · (1/b), which differs from IEEE division in the last bit for most rows, while CPU torch and every kernel
    # divide exactly. The oracle must give the same scales on either device.
    if spec.symmetric:
        amax = x2.abs().amax(dim=1) * clip
        scale = amax / amax.new_full((), qmax)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zp = torch.zeros_like(scale, dtype=torch.int32)
    else:
        lo = x2.amin(dim=1).clamp(max=0.0) * clip
        hi = x2.amax(dim=1).clamp(min=0.0) * clip
        rng = hi - lo
        scale = rng / rng.new_full((), qmax - qmin)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zp = torch.round(qmin - lo / scale).clamp(qmin, qmax).to(torch.int32)
    return scale, zp


def codes_from_qparams(x2: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Integer codes (int8) of float32 rows under given per-row parameters."""
    q = torch.round(x2 / scale[:, None]) + zp[:, None].to(torch.float32)
    return q.clamp(spec.qmin, spec.qmax).to(torch.int8)


def quantize(x: torch.Tensor, spec: QuantSpec, *, nonfinite: NonFinite = "raise") -> QuantizedTensor:
    """Quantize a weight ``(N, K)`` per output channel or an activation ``(..., K)`` per token."""
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"spec must be a QuantSpec, got {type(spec).__name__}")
    what = spec.role.value
    _check_float(x, what)
    if not spec.is_quantized:
        raise ValueError(f"{what}: spec {spec} keeps bf16; there is nothing to quantize")
    if spec.role is Role.WEIGHT and x.dim() != 2:
        raise ValueError(f"weight must be 2-D (N, K), got shape {tuple(x.shape)}")
    if nonfinite not in ("raise", "propagate"):
        raise ValueError(f"nonfinite must be 'raise' or 'propagate', got {nonfinite!r}")

    x2 = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)
    bad = _nonfinite_rows(x2)
    if spec.role is Role.WEIGHT or nonfinite == "raise":
        if bool(bad.any()):  # a host sync, paid only where an error is wanted
            rows = bad.nonzero().flatten()
            raise ValueError(f"{what} contains NaN/Inf in {rows.numel()} of {x2.shape[0]} rows "
                             f"(first at row {int(rows[0])})")
        scale, zp = row_qparams(x2, spec)
        wide = ~torch.isfinite(scale)   # finite values whose range hi − lo overflows float32
        if bool(wide.any()):
            rows = wide.nonzero().flatten()
            raise ValueError(f"{what} has a range beyond float32 (max − min overflows) in {rows.numel()} of "
                             f"{x2.shape[0]} rows (first at row {int(rows[0])}): its scale would be inf")
        return QuantizedTensor(codes_from_qparams(x2, scale, zp, spec).reshape(x.shape), scale, zp, spec)
    # propagate: branch-free, so it never synchronizes with the device
    x2 = torch.where(bad[:, None], torch.zeros_like(x2), x2)
    scale, zp = row_qparams(x2, spec)
    codes = codes_from_qparams(x2, scale, zp, spec)
    scale = torch.where(bad, torch.full_like(scale, float("nan")), scale)
    zp = torch.where(bad, torch.zeros_like(zp), zp)
    codes = torch.where(bad[:, None], torch.zeros_like(codes), codes)
    return QuantizedTensor(codes.reshape(x.shape), scale, zp, spec)


def dequantize(qt: QuantizedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``scale * (q - zp)`` in float32, cast to ``dtype``."""
    shape = qt.codes.shape
    q2 = qt.codes.reshape(qt.rows, shape[-1]).to(torch.float32)   # not -1: zero rows leave it unknown
    x2 = (q2 - qt.zero_point[:, None].to(torch.float32)) * qt.scale[:, None]
    return x2.reshape(shape).to(dtype)


def fake_quantize(x: torch.Tensor, spec: QuantSpec, *, nonfinite: NonFinite = "raise") -> torch.Tensor:
    """``dequantize(quantize(x))`` in ``x``'s dtype, differentiable by the clipped straight-through estimator:
    the gradient passes unchanged where ``x`` lies inside the quantizer's range and is zero where it was
    clipped. Scales and zero points are treated as constants. ``bits == 16`` returns ``x`` itself."""
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"spec must be a QuantSpec, got {type(spec).__name__}")
    if not spec.is_quantized:
        return x
    qt = quantize(x, spec, nonfinite=nonfinite)
    x_hat = dequantize(qt, torch.float32)
    if not x.requires_grad:
        return x_hat.to(x.dtype)
    # In range iff the unclamped code lies within [qmin - 1/2, qmax + 1/2].
    x2 = x.detach().reshape(qt.rows, x.shape[-1]).to(torch.float32)
    u = x2 / qt.scale[:, None] + qt.zero_point[:, None].to(torch.float32)
    inside = ((u >= spec.qmin - 0.5) & (u <= spec.qmax + 0.5)).reshape(x.shape)
    return (x_hat.to(x.dtype).detach() + (x - x.detach()) * inside.to(x.dtype))


def _check_qparams(x: torch.Tensor, spec: QuantSpec, scale: torch.Tensor, zero_point: torch.Tensor) -> int:
    """Validate per-row parameters for ``x (..., K)``; returns the row count R."""
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"spec must be a QuantSpec, got {type(spec).__name__}")
    _check_float(x, spec.role.value)
    if not spec.is_quantized:
        raise ValueError(f"{spec.role.value}: spec {spec} keeps bf16; there is nothing to quantize")
    rows = x.numel() // x.shape[-1]
    for name, t, dt in (("scale", scale, torch.float32), ("zero_point", zero_point, torch.int32)):
        if not isinstance(t, torch.Tensor) or t.shape != (rows,) or t.dtype != dt:
            got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be {dt} ({rows},) for {rows} rows of {tuple(x.shape)}, got {got}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but the tensor is on {x.device}")
    if not bool((torch.isfinite(scale) & (scale > 0)).all()):
        raise ValueError("scale must be finite and positive in every row")
    if bool(((zero_point < spec.qmin) | (zero_point > spec.qmax)).any()):
        raise ValueError(f"zero_point must lie in [{spec.qmin}, {spec.qmax}] for {spec}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{spec.role.value} contains NaN/Inf")
    return rows


def quantize_with_qparams(x: torch.Tensor, spec: QuantSpec, scale: torch.Tensor,
                          zero_point: torch.Tensor) -> QuantizedTensor:
    """Quantize the rows of ``x (..., K)`` with given per-row ``scale`` float32 ``(R,)`` and ``zero_point`` int32
    ``(R,)`` (calibrated elsewhere) by the format's code rule. With the parameters ``row_qparams`` would compute,
    this equals :func:`quantize` exactly."""
    rows = _check_qparams(x, spec, scale, zero_point)
    x2 = x.detach().reshape(rows, x.shape[-1]).to(torch.float32)
    codes = codes_from_qparams(x2, scale, zero_point, spec)
    return QuantizedTensor(codes.reshape(x.shape), scale, zero_point, spec)


def fake_quantize_with_qparams(x: torch.Tensor, spec: QuantSpec, scale: torch.Tensor,
                               zero_point: torch.Tensor) -> torch.Tensor:
    """``dequantize(quantize_with_qparams(x, ...))`` in ``x``'s dtype, differentiable: in ``x`` by the clipped
    straight-through estimator (as :func:`fake_quantize`), in ``scale`` by LSQ's rule
    (``∂x̂/∂s = round(x/s) − x/s`` inside the range, ``q_clamp − zp`` where clipped). ``zero_point`` is a constant."""
    rows = _check_qparams(x, spec, scale.detach(), zero_point)
    if not (x.requires_grad or scale.requires_grad):
        return dequantize(quantize_with_qparams(x, spec, scale, zero_point), torch.float32).to(x.dtype)
    x2 = x.reshape(rows, x.shape[-1]).to(torch.float32)
    s = scale[:, None]
    v = x2 / s
    # v + (round(v) − v) is exactly round(v) in float32 for |v| < 2^22 (the difference is exact), so the
    # forward values are the oracle's codes while the gradient of the rounding is 1.
    r = v + (torch.round(v) - v).detach()
    zp = zero_point[:, None].to(torch.float32)
    q = torch.clamp(r + zp, spec.qmin, spec.qmax)
    return (s * (q - zp)).reshape(x.shape).to(x.dtype)
