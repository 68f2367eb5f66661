"""Scalar math shared by the Triton kernels, written to reproduce the oracle's float32 arithmetic exactly.

* ``round_half_even``: ``(u + 1.5·2²³) − 1.5·2²³`` rounds a float32 ``|u| < 2²²`` to the nearest integer, ties
  to even, by the FPU's own rounding (interpreter-safe; libdevice ``rint`` is not available there). Callers
  clamp ``u`` first; the final code clamp makes that harmless.
* ``mul_rn`` / ``add_rn``: on the GPU, LLVM fuses ``a*b + c`` into one FMA (one rounding instead of two); the
  oracle (PyTorch, separate ops) rounds twice. ``mul.rn.f32``/``add.rn.f32`` are never contracted; they are
  inline PTX because libdevice's ``__nv_fmul_rn`` is built flushing denormals to zero here.
* ``to_out``: float32 → the output type, rounded to nearest even. Compiled Triton does that; the interpreter
  truncates float32 → bfloat16 (and its "rtne" mode rounds ties up), so there it is done on the bits.
* ``gelu_tanh``: ``0.5·x·(1 + tanh(√(2/π)(x + 0.044715x³)))`` with ``tanh(u) = 1 − 2/(e^{2u} + 1)`` on
  ``u`` clamped to ±15 (float32 tanh is ±1 there), so ``exp`` never overflows.
"""
import triton
import triton.language as tl

_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2**23
_SAFE = tl.constexpr(4194304.0)  # 2**22


@triton.jit
def round_half_even(u):
    u = tl.minimum(tl.maximum(u, -_SAFE), _SAFE)
    return (u + _MAGIC) - _MAGIC


@triton.jit
def mul_rn(a, b, INTERP: tl.constexpr):
    if INTERP:
        return a * b
    else:
        return tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.float32,
                                         is_pure=True, pack=1)


@triton.jit
def add_rn(a, b, INTERP: tl.constexpr):
    if INTERP:
        return a + b
    else:
        return tl.inline_asm_elementwise("add.rn.f32 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.float32,
                                         is_pure=True, pack=1)


@triton.jit
def gelu_tanh(x):
    u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    u = tl.minimum(tl.maximum(u, -15.0), 15.0)
    t = 1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0)
    return 0.5 * x * (1.0 + t)


@triton.jit
def to_out(y, DT: tl.constexpr, INTERP: tl.constexpr):
    if INTERP and DT == tl.bfloat16:
        u = y.to(tl.uint32, bitcast=True)
        u = u + (0x7FFF + ((u >> 16) & 1))   # carries into the exponent round up to the next binade / inf
        h = tl.where(y != y, 0x7FC0, u >> 16).to(tl.uint16)
        return h.to(tl.bfloat16, bitcast=True)
    else:
        return y.to(DT)
