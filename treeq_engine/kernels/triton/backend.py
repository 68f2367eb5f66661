"""The ``triton`` kernel backend: torch custom ops over the Triton kernels, and their registration.

``quantize_activation`` → ``treeq_triton::quantize_activation`` (act_quant.py). ``packed_linear`` →
``treeq_triton::packed_linear``, which runs the Gluon kernel on sm_90 where it supports the format
(gluon_gemm.py) and the plain-Triton kernel everywhere else (gemm.py). Both ops are real custom ops with fake
(meta) implementations, so CUDA graphs and ``torch.compile`` see them as opaque nodes of known shape.

Dispatch: chosen automatically for CUDA tensors; on CPU only when forced (``backend="triton"``) and Triton runs
interpreted (``TRITON_INTERPRET=1``), which is how the CPU tests run it.

What the backend returns differs from the reference only where the contract leaves room: on CUDA the Monarch
stage-1 output ``z`` is bfloat16 (it is read by every channel tile of the GEMM; bf16 halves that traffic and
the stage-2 product runs on bf16 tensor cores anyway); on CPU it is float32. ``out_spec`` runs as the GEMM
writing ``out_dtype`` rows, then the row quantizer, as the oracle defines it: a per-token scale needs the whole
output row, which no GEMM tile owns.
"""
from __future__ import annotations

from typing import Optional

import torch

from ...format import QuantSpec
from ..derived import derived
from ..ops import Backend, register
from ..types import PackedWeight, QuantizedActivation
from . import act_quant as _aq
from . import gemm as _gemm
from .runtime import INTERPRET, on_device, runs_on

_EMPTY = (0,)


@torch.library.custom_op("treeq_triton::quantize_activation", mutates_args=())
def _quantize_activation_op(x: torch.Tensor, bits: int, symmetric: bool, clip_ratio: float, ln_eps: Optional[float],
                            shift: Optional[torch.Tensor], scale: Optional[torch.Tensor],
                            monarch_w1: Optional[torch.Tensor], z_bf16: bool, rms_norm: bool = False
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    with on_device(x):
        codes, sa, za, ra, z = _aq.act_quant(x, bits, symmetric, clip_ratio, ln_eps=ln_eps, shift=shift,
                                             scale=scale, monarch_w1=monarch_w1,
                                             z_dtype=torch.bfloat16 if z_bf16 else torch.float32, rms_norm=rms_norm)
    if z is None:
        z = x.new_empty(_EMPTY, dtype=torch.float32)
    return codes, sa, za, ra, z


@_quantize_activation_op.register_fake
def _(x, bits, symmetric, clip_ratio, ln_eps, shift, scale, monarch_w1, z_bf16, rms_norm=False):
    m, k = x.shape
    z = x.new_empty(_EMPTY, dtype=torch.float32) if monarch_w1 is None else \
        x.new_empty((m, monarch_w1.shape[0], monarch_w1.shape[1]), dtype=torch.bfloat16 if z_bf16 else torch.float32)
    return (x.new_empty((m, k), dtype=torch.int8), x.new_empty((m,), dtype=torch.float32),
            x.new_empty((m,), dtype=torch.int32), x.new_empty((m,), dtype=torch.int32), z)


@torch.library.custom_op("treeq_triton::packed_linear", mutates_args=())
def _packed_linear_op(codes: torch.Tensor, sa: torch.Tensor, za: torch.Tensor, ra: torch.Tensor,
                      z: Optional[torch.Tensor], packed: torch.Tensor, bits: int, n: int, sw: torch.Tensor,
                      zw: torch.Tensor, cw: torch.Tensor, bias: Optional[torch.Tensor], w2: Optional[torch.Tensor],
                      gelu: bool, out_dtype: torch.dtype, residual: Optional[torch.Tensor] = None,
                      gate: Optional[torch.Tensor] = None) -> torch.Tensor:
    from . import gluon_gemm

    args = (codes, sa, za, ra, packed, bits, n, sw, zw, cw)
    kw = dict(bias=bias, z=z, w2=w2, gelu=gelu, out_dtype=out_dtype, residual=residual, gate=gate)
    with on_device(codes):
        if gluon_gemm.usable(codes, bits):
            return gluon_gemm.packed_gemm(*args, **kw)
        return _gemm.packed_gemm(*args, **kw)


@_packed_linear_op.register_fake
def _(codes, sa, za, ra, z, packed, bits, n, sw, zw, cw, bias, w2, gelu, out_dtype, residual=None, gate=None):
    return codes.new_empty((codes.shape[0], n), dtype=out_dtype)


def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.to(torch.float32).contiguous()


def _branch_factor(t: torch.Tensor | None) -> torch.Tensor | None:
    """Monarch factors as float32: those stored in another dtype (a bf16 runtime model's) through a cached copy.
    The kernels are compiled and register-tuned for float32 factors (loading bf16 ones spilled registers in the
    Gluon epilogue and in stage 1), and a per-call conversion would add a launch to every layer."""
    if t is None:
        return None
    if t.dtype == torch.float32:
        return t.contiguous()
    return derived(t, "f32", (t,), lambda: t.detach().to(torch.float32).contiguous())


def quantize_activation(x: torch.Tensor, spec: QuantSpec, *, ln_eps: float | None = None,
                        shift: torch.Tensor | None = None, scale: torch.Tensor | None = None,
                        monarch_w1: torch.Tensor | None = None, rms_norm: bool = False) -> QuantizedActivation:
    """Backend implementation of ``kernels.quantize_activation`` (inputs already checked by ops.py)."""
    codes, sa, za, ra, z = _quantize_activation_op(
        x, spec.bits, spec.symmetric, spec.clip_ratio, ln_eps, shift, scale, _branch_factor(monarch_w1),
        x.device.type == "cuda", rms_norm)
    return QuantizedActivation(codes, sa, za, ra, spec.bits, z if monarch_w1 is not None else None)


def _check_act(act: QuantizedActivation) -> None:
    """Beyond what ops.py checks for every backend (dtypes, shapes, devices, contiguous codes): the kernel reads
    the per-row vectors as raw memory too, so they must be contiguous."""
    for name, t in (("scale", act.scale), ("zero_point", act.zero_point), ("row_sum", act.row_sum)):
        if not t.is_contiguous():
            raise ValueError(f"activation {name} must be contiguous, got {t.dtype} {tuple(t.shape)} strides "
                             f"{t.stride()}")


def packed_linear(act: QuantizedActivation, weight: PackedWeight, *, bias: torch.Tensor | None = None,
                  monarch_w2: torch.Tensor | None = None, gelu: bool = False, out_dtype: torch.dtype = torch.bfloat16,
                  out_spec: QuantSpec | None = None, residual: torch.Tensor | None = None,
                  gate: torch.Tensor | None = None) -> torch.Tensor | QuantizedActivation:
    """Backend implementation of ``kernels.packed_linear`` (inputs already checked by ops.py)."""
    _check_act(act)
    if monarch_w2 is not None and act.z is None:
        raise ValueError("monarch_w2 given but the activation carries no stage-1 output z")
    y = _packed_linear_op(act.codes, act.scale, act.zero_point, act.row_sum,
                          act.z if monarch_w2 is not None else None, weight.packed, weight.bits, weight.n,
                          weight.scale, weight.zero_point, weight.col_sum, _f32(bias), _branch_factor(monarch_w2),
                          bool(gelu), out_dtype, residual, gate)
    if out_spec is not None:
        return quantize_activation(y, out_spec)
    return y


def _tensors(args: tuple, kwargs: dict):
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            yield a
        elif isinstance(a, QuantizedActivation):
            yield a.codes
        elif isinstance(a, PackedWeight):
            yield a.anchor


def can_run(op: str, args: tuple, kwargs: dict) -> bool:
    """Tensors where Triton runs, and weights in layout v1 (what these kernels read and derive theirs from)."""
    if any(isinstance(a, PackedWeight) and a.packed is None for a in args):
        return False
    return all(runs_on(t) for t in _tensors(args, kwargs))


def auto_select(op: str, args: tuple, kwargs: dict) -> bool:
    """Pick Triton by itself only for compiled CUDA runs; the interpreter is for tests, by request."""
    return not INTERPRET and all(t.device.type == "cuda" for t in _tensors(args, kwargs))


BACKEND = Backend("triton", 10, {"quantize_activation": quantize_activation, "packed_linear": packed_linear},
                  can_run, auto_select)
register(BACKEND)
