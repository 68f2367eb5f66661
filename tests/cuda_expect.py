"""Expected results for the CUDA kernels, computed on the CPU from the oracle (shared by the GPU tests and by the
CPU tests that check these helpers themselves).

The CUDA backend's documented differences from the reference (treeq_engine/kernels/cuda_backend.py) are modelled
here exactly where they are deliberate (the Monarch branch's bf16 operands) and bounded where they are rounding
(float32 accumulation order): each helper returns the expected values and an elementwise tolerance.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from treeq_engine.branches import monarch
from treeq_engine.format import int_gemm, zero_point_correction
from treeq_engine.kernels import PackedWeight, QuantizedActivation
from treeq_engine.kernels import reference

BF16_EPS = 2.0 ** -8  # unit roundoff of bf16 (8 significant bits)


def bf16_round(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).to(torch.float64)


def corr_exact(act: QuantizedActivation, weight: PackedWeight) -> torch.Tensor:
    """The zero-point-corrected integer accumulator Σ_k (qa − za)(qw − zw), int32 (M, N), on the CPU."""
    acc = int_gemm(act.codes.cpu(), weight.codes().cpu())
    return zero_point_correction(acc, weight.k, act.zero_point.cpu(), act.row_sum.cpu(), weight.zero_point.cpu(),
                                 weight.col_sum.cpu())


def stage1_expect(v: torch.Tensor, w1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """z of the CUDA kernel from the preprocessed rows ``v (M, K)`` (float32): bf16 operands, exact sum here.
    Returns (expected (M, b, b·r) float64, tolerance): the kernel's float32 accumulation and bf16 output rounding
    (≤ 2 bf16 ulps of the magnitude sum), plus one bf16 ulp of each v (the kernel's v may differ by float32 ulps
    under LayerNorm, which can flip a bf16 rounding)."""
    vb, wb = bf16_round(v), bf16_round(w1)
    want = monarch.stage1(vb, wb)
    mag = monarch.stage1(vb.abs(), wb.abs())
    return want, 3 * BF16_EPS * mag + 1e-30


def epilogue_expect(act: QuantizedActivation, weight: PackedWeight, *, bias: torch.Tensor | None = None,
                    w2: torch.Tensor | None = None, gelu: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """float32-path output of the CUDA packed_linear: (corr·sa)·sw in float32 (the oracle's order), + the bf16
    branch (bf16 z and w2, exact sum here), + bias, GELU(tanh). Returns (expected float64 (M, N), tolerance)."""
    corr = corr_exact(act, weight).to(torch.float32)
    y_main = (corr * act.scale.cpu()[:, None] * weight.scale.cpu()[None, :]).to(torch.float64)
    y, mag = y_main.clone(), y_main.abs()
    if w2 is not None:
        zb, wb = bf16_round(act.z.cpu().float()), bf16_round(w2.cpu())
        y = y + monarch.stage2(zb, wb, weight.n)
        mag = mag + monarch.stage2(zb.abs(), wb.abs(), weight.n)
    if bias is not None:
        y = y + bias.cpu().to(torch.float64)
        mag = mag + bias.cpu().to(torch.float64).abs()
    tol = 4e-6 * mag + 1e-30  # float32 accumulation of the branch, the bias add
    if gelu:
        y = F.gelu(y, approximate="tanh")
        tol = 1.2 * tol + 2e-7 * y.abs() + 1e-7  # GELU's slope ≤ 1.13; tanhf vs torch tanh
    return y, tol


def reference_linear(act: QuantizedActivation, weight: PackedWeight, **kw) -> torch.Tensor:
    """The reference backend on CPU copies of the operands (true-division semantics of CPU torch)."""
    cpu_act = QuantizedActivation(act.codes.cpu(), act.scale.cpu(), act.zero_point.cpu(), act.row_sum.cpu(),
                                  act.bits, None if act.z is None else act.z.cpu().float())
    kw = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    return reference.packed_linear(cpu_act, weight.to("cpu"), **kw)
