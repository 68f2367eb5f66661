"""Reference integer GEMM and its float epilogue (the oracle every kernel is held to).

With activation codes ``qa (M, K)``, zero points ``za (M,)``, scales ``sa (M,)`` and weight codes
``qw (N, K)``, ``zw (N,)``, ``sw (N,)``, the dequantized product is

    y[m, n] = sa[m] * sw[n] * Σ_k (qa[m,k] - za[m]) (qw[n,k] - zw[n])  + bias[n]
            = sa[m] * sw[n] * ( acc[m,n] - zw[n]·ra[m] - za[m]·cw[n] + K·za[m]·zw[n] ) + bias[n]

where ``acc = qa · qwᵀ`` is the int32 accumulation of raw codes, ``ra[m] = Σ_k qa[m,k]`` (computed with the
activation quantization) and ``cw[n] = Σ_k qw[n,k]`` (computed offline with the weight packing). The bracket is
an exact integer; kernels form it in int32, which is exact while ``K · 255² < 2**31`` (``K ≤ MAX_K``).
The float part is ``float32(corr) * sa[m] * sw[n] + bias[n]`` in float32; kernels may reassociate the two
scale products, which is why float outputs are compared within a tolerance and the integer part exactly.
"""
from __future__ import annotations

import torch

from .quantize import QuantizedTensor, quantize, NonFinite
from .spec import QuantSpec, Role

MAX_K = (2**31 - 1) // (255 * 255)  # 33025: the int32 zero-point-corrected accumulator cannot overflow


def _check_codes2d(q: torch.Tensor, what: str) -> None:
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(q).__name__}")
    if q.dtype != torch.int8:
        raise TypeError(f"{what} must be int8 codes, got {q.dtype}")
    if q.dim() != 2:
        raise ValueError(f"{what} must be 2-D, got shape {tuple(q.shape)}")


def int_gemm(qa: torch.Tensor, qw: torch.Tensor) -> torch.Tensor:
    """``acc[m, n] = Σ_k qa[m,k]·qw[n,k]`` exactly, int32 ``(M, N)``, from int8 ``qa (M, K)`` and ``qw (N, K)``."""
    _check_codes2d(qa, "activation codes qa")
    _check_codes2d(qw, "weight codes qw")
    if qa.shape[1] != qw.shape[1]:
        raise ValueError(f"K mismatch: activation codes are {tuple(qa.shape)}, weight codes {tuple(qw.shape)}")
    if qa.shape[1] > MAX_K:
        raise ValueError(f"K={qa.shape[1]} exceeds MAX_K={MAX_K}, where int32 accumulation could overflow")
    # float64 holds every partial sum exactly (|sum| ≤ K·2**14 < 2**53), and BLAS makes it fast.
    return (qa.to(torch.float64) @ qw.to(torch.float64).T).to(torch.int32)


def zero_point_correction(acc: torch.Tensor, k: int, za: torch.Tensor, ra: torch.Tensor,
                          zw: torch.Tensor, cw: torch.Tensor) -> torch.Tensor:
    """The exact integer ``Σ_k (qa - za)(qw - zw)`` from the raw accumulator, int32 ``(M, N)``."""
    m, n = acc.shape
    for t, name, size in ((za, "za", m), (ra, "ra", m), (zw, "zw", n), (cw, "cw", n)):
        if t.shape != (size,):
            raise ValueError(f"{name} must have shape ({size},), got {tuple(t.shape)}")
    za64, ra64, zw64, cw64 = (t.to(torch.int64) for t in (za, ra, zw, cw))
    corr = (acc.to(torch.int64) - zw64[None, :] * ra64[:, None] - za64[:, None] * cw64[None, :]
            + k * za64[:, None] * zw64[None, :])
    return corr.to(torch.int32)


def epilogue(acc: torch.Tensor, k: int, act: QuantizedTensor, weight: QuantizedTensor,
             bias: torch.Tensor | None = None, *, weight_col_sums: torch.Tensor | None = None) -> torch.Tensor:
    """float32 ``(M, N)`` output of the quantized linear from the raw int32 accumulator."""
    m, n = acc.shape
    if act.rows != m or weight.rows != n:
        raise ValueError(f"accumulator {tuple(acc.shape)} does not match {act.rows} tokens × {weight.rows} channels")
    cw = weight.row_sums() if weight_col_sums is None else weight_col_sums
    corr = zero_point_correction(acc, k, act.zero_point, act.row_sums(), weight.zero_point, cw)
    y = corr.to(torch.float32) * act.scale[:, None] * weight.scale[None, :]
    if bias is not None:
        if bias.shape != (n,):
            raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
        y = y + bias.to(torch.float32)[None, :]
    return y


def quantized_linear(x: torch.Tensor, weight: QuantizedTensor, act_spec: QuantSpec,
                     bias: torch.Tensor | None = None, *, nonfinite: NonFinite = "raise") -> torch.Tensor:
    """The whole reference W·A linear: per-token quantization of ``x (..., K)``, integer GEMM, epilogue.
    Returns float32 ``(..., N)``. Equal to ``dequant(qa) @ dequant(qw)ᵀ + bias`` up to float rounding."""
    if weight.spec.role is not Role.WEIGHT:
        raise ValueError(f"weight must be quantized with a weight spec, got {weight.spec}")
    k = weight.codes.shape[1]
    if x.shape[-1] != k:
        raise ValueError(f"input has K={x.shape[-1]} but the weight {tuple(weight.codes.shape)} expects K={k}")
    lead = x.shape[:-1]
    act = quantize(x.reshape(-1, k), act_spec, nonfinite=nonfinite)
    acc = int_gemm(act.codes, weight.codes)
    return epilogue(acc, k, act, weight, bias).reshape(*lead, weight.rows)
