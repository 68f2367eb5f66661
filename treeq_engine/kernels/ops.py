"""The kernel ops' public entry points, with input checks and backend dispatch.

Backends register themselves (``register``) with a predicate saying whether they can run given inputs; the
dispatcher takes the first that can, in priority order (CUDA, then Triton, then the reference). Pass
``backend=`` to force one. A backend may also say it should not be picked automatically for some inputs
(``auto``; the Triton interpreter runs on CPU tensors only when asked for). Every backend is tested against
``reference``.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import torch

from ..format import MAX_K, QuantSpec, Role
from . import reference
from .types import PackedWeight, QuantizedActivation

OPS = ("quantize_activation", "packed_linear")


@dataclasses.dataclass(frozen=True)
class Backend:
    name: str
    priority: int  # higher runs first
    fns: dict[str, Callable[..., Any]]
    can_run: Callable[[str, tuple, dict], bool]  # (op, args, kwargs) -> bool
    auto: Callable[[str, tuple, dict], bool] = lambda op, a, kw: True  # may the dispatcher pick it unasked?


_BACKENDS: dict[str, Backend] = {}


def register(backend: Backend) -> None:
    unknown = set(backend.fns) - set(OPS)
    if unknown:
        raise ValueError(f"backend {backend.name}: unknown op(s) {sorted(unknown)}")
    _BACKENDS[backend.name] = backend


register(Backend("reference", 0, {"quantize_activation": reference.quantize_activation,
                                  "packed_linear": reference.packed_linear}, lambda op, a, kw: True))


def backends() -> list[str]:
    return [b.name for b in sorted(_BACKENDS.values(), key=lambda b: -b.priority)]


def _choose(op: str, backend: str | None, args: tuple, kwargs: dict) -> Backend:
    if backend is not None:
        if backend not in _BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; available: {backends()}")
        b = _BACKENDS[backend]
        if op not in b.fns:
            raise ValueError(f"backend {backend!r} does not implement {op}")
        if not b.can_run(op, args, kwargs):
            hint = {"cuda": "; it needs treeq_engine._C built with CUDA, a CUDA device (sm_80 or newer) and the "
                            "inputs on it (`treeq info` says what this machine has)",
                    "triton": "; it needs the inputs on a CUDA device (or TRITON_INTERPRET=1 set before import)"}
            raise RuntimeError(f"backend {backend!r} cannot run {op} on these inputs (device, dtype, shape or weight "
                               f"layout){hint.get(backend, '')}")
        return b
    for b in sorted(_BACKENDS.values(), key=lambda b: -b.priority):
        if op in b.fns and b.auto(op, args, kwargs) and b.can_run(op, args, kwargs):
            return b
    raise RuntimeError(f"no backend can run {op}")  # unreachable: reference always can


def _pick(op: str, backend: str | None, args: tuple, kwargs: dict) -> Callable[..., Any]:
    return _choose(op, backend, args, kwargs).fns[op]


def selected_backend(op: str, *args: Any, **kwargs: Any) -> str:
    """The name of the backend the dispatcher would run ``op`` on for these inputs."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; ops: {OPS}")
    return _choose(op, kwargs.pop("backend", None), args, kwargs).name


def _check_x(x: torch.Tensor, what: str = "x") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{what} must be 2-D (tokens M, features K), got shape {tuple(x.shape)}")
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"{what} must be bfloat16, float16 or float32, got {x.dtype}")
    if not x.is_contiguous():
        raise ValueError(f"{what} must be contiguous")


def quantize_activation(x: torch.Tensor, spec: QuantSpec, *, ln_eps: float | None = None,
                        shift: torch.Tensor | None = None, scale: torch.Tensor | None = None,
                        monarch_w1: torch.Tensor | None = None, backend: str | None = None,
                        rms_norm: bool = False) -> QuantizedActivation:
    """Per-token quantization of ``x (M, K)`` after an optional norm without affine (LayerNorm with epsilon
    ``ln_eps``; RMSNorm instead with ``rms_norm``) and modulate, with the Monarch stage 1 ``z = P₁·BD₁·x`` of the
    unquantized rows."""
    _check_x(x)
    if not isinstance(spec, QuantSpec) or spec.role is not Role.ACTIVATION or not spec.is_quantized:
        raise ValueError(f"quantize_activation needs a quantized activation spec, got {spec}")
    m, k = x.shape
    if k == 0:
        raise ValueError("x has K = 0 features: nothing to quantize")
    if ln_eps is not None and (isinstance(ln_eps, bool) or not isinstance(ln_eps, (int, float))
                               or not math.isfinite(ln_eps) or ln_eps <= 0):
        raise ValueError(f"ln_eps must be a positive finite number (LayerNorm's epsilon), got {ln_eps!r}")
    if not isinstance(rms_norm, bool):
        raise TypeError(f"rms_norm must be a bool, got {type(rms_norm).__name__}")
    if rms_norm and ln_eps is None:
        raise ValueError("rms_norm needs ln_eps (the RMSNorm's epsilon)")
    if (shift is None) != (scale is None):
        raise ValueError("modulate needs both shift and scale")
    for name, t in (("shift", shift), ("scale", scale)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor (G, K={k}), got {type(t).__name__}")
        if t.dim() != 2 or t.shape[1] != k or t.device != x.device or not t.is_floating_point():
            raise ValueError(f"{name} must be a float (G, K={k}) tensor on {x.device}, got {t.dtype} "
                             f"{tuple(t.shape)} on {t.device}")
        if t.shape[0] == 0 or m % t.shape[0]:
            raise ValueError(f"modulate groups: M={m} is not a multiple of G={t.shape[0]} ({name}'s rows, one per "
                             "sample)")
    if shift is not None:
        assert scale is not None   # (both or neither: checked above)
        if shift.shape != scale.shape:
            raise ValueError(f"shift {tuple(shift.shape)} and scale {tuple(scale.shape)} must have one shape")
    if monarch_w1 is not None and (not isinstance(monarch_w1, torch.Tensor) or monarch_w1.dim() != 3
                                   or monarch_w1.shape[0] * monarch_w1.shape[2] < k
                                   or monarch_w1.shape[1] % monarch_w1.shape[0] or monarch_w1.shape[1] == 0
                                   or not monarch_w1.is_floating_point()):
        got = tuple(monarch_w1.shape) if isinstance(monarch_w1, torch.Tensor) else type(monarch_w1).__name__
        raise ValueError(f"monarch_w1 (b, b·r, Kb) must cover K={k}, be float, and b·r a multiple of b; got {got}")
    if monarch_w1 is not None and monarch_w1.device != x.device:
        raise ValueError(f"monarch_w1 is on {monarch_w1.device}, x on {x.device}")
    kw = dict(ln_eps=ln_eps, shift=shift, scale=scale, monarch_w1=monarch_w1, rms_norm=rms_norm)
    return _pick("quantize_activation", backend, (x, spec), kw)(x, spec, **kw)


def packed_linear(act: QuantizedActivation, weight: PackedWeight, *, bias: torch.Tensor | None = None,
                  monarch_w2: torch.Tensor | None = None, gelu: bool = False, out_dtype: torch.dtype = torch.bfloat16,
                  out_spec: QuantSpec | None = None, residual: torch.Tensor | None = None,
                  gate: torch.Tensor | None = None, backend: str | None = None) -> torch.Tensor | QuantizedActivation:
    """``act × weightᵀ`` with the integer epilogue, Monarch stage 2, bias, optional GELU; bf16 ``(M, N)`` out, or
    the next layer's quantized activation when ``out_spec`` is given (the ``out_dtype`` rows quantized per
    token: the same codes as the two calls).

    ``residual`` ``(M, N)`` in ``out_dtype`` (and ``gate`` float32 ``(G, N)``, row ``m`` using gate row
    ``m // (M // G)``: one per sample) fuse a DiT block's gated residual into the store:
    ``out = residual + gate ⊙ y``, computed in float32 from ``y`` rounded to ``out_dtype`` (as the unfused layer
    would write it), the product and the sum each rounded to float32 (no fused multiply-add), then rounded to
    ``out_dtype`` once. It saves the separate multiply and add passes over ``(M, N)`` (and one rounding)."""
    if not isinstance(act, QuantizedActivation) or not isinstance(weight, PackedWeight):
        raise TypeError("packed_linear takes a QuantizedActivation and a PackedWeight")
    _check_act(act)
    if out_dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"out_dtype must be a float type (bfloat16, float16 or float32), got {out_dtype}")
    if act.k != weight.k:
        raise ValueError(f"K mismatch: activation has K={act.k}, weight (N={weight.n}, K={weight.k})")
    if act.k > MAX_K:   # every backend: the kernels' int32 accumulator would wrap silently
        raise ValueError(f"K={act.k} exceeds MAX_K={MAX_K}, where the int32 accumulation could overflow")
    if act.codes.device != weight.device:
        raise ValueError(f"activation on {act.codes.device} but weight on {weight.device}")
    for name, t in (("bias", bias), ("monarch_w2", monarch_w2)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
        if t is not None and t.device != weight.device:
            raise ValueError(f"{name} is on {t.device}, the weight on {weight.device}")
    if bias is not None and bias.shape != (weight.n,):
        raise ValueError(f"bias must be ({weight.n},), got {tuple(bias.shape)}")
    if monarch_w2 is not None and (monarch_w2.dim() != 3 or monarch_w2.shape[0] * monarch_w2.shape[1] < weight.n):
        raise ValueError(f"monarch_w2 (b, Nb, b·r) must cover N={weight.n}, got {tuple(monarch_w2.shape)}")
    z = act.z
    if monarch_w2 is not None:
        want = (act.m, monarch_w2.shape[0], monarch_w2.shape[2])
        if z is None:
            raise ValueError("monarch_w2 given but the activation carries no stage-1 output z (quantize_activation "
                             "with monarch_w1 gives it)")
        if not isinstance(z, torch.Tensor) or tuple(z.shape) != want or z.device != weight.device:
            got = f"{tuple(z.shape)} on {z.device}" if isinstance(z, torch.Tensor) else type(z).__name__
            raise ValueError(f"z must be (M, b, b·r) = {want} on {weight.device} for monarch_w2 "
                             f"{tuple(monarch_w2.shape)}, got {got}")
    if out_spec is not None and (not isinstance(out_spec, QuantSpec) or out_spec.role is not Role.ACTIVATION
                                 or not out_spec.is_quantized):
        raise ValueError(f"out_spec must be a quantized activation spec, got {out_spec}")
    if out_spec is not None and out_dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"out_spec quantizes the {out_dtype} rows the layer writes: out_dtype must be a float "
                         f"type")
    _check_residual(residual, gate, act.m, weight.n, out_dtype, out_spec, weight.device)
    kw = dict(bias=bias, monarch_w2=monarch_w2, gelu=gelu, out_dtype=out_dtype, out_spec=out_spec,
              residual=residual, gate=gate)
    return _pick("packed_linear", backend, (act, weight), kw)(act, weight, **kw)


def _check_act(act: QuantizedActivation) -> None:
    """Shapes, dtypes and devices every backend relies on (the dataclass does not check itself; the kernels also
    need the vectors contiguous, which their backends check)."""
    codes = act.codes
    if not isinstance(codes, torch.Tensor) or codes.dim() != 2 or codes.dtype != torch.int8 \
            or not codes.is_contiguous():
        got = f"{codes.dtype} {tuple(codes.shape)}" if isinstance(codes, torch.Tensor) else type(codes).__name__
        raise ValueError(f"activation codes must be contiguous int8 (M, K), got {got}")
    m = codes.shape[0]
    for name, t, dt in (("scale", act.scale, torch.float32), ("zero_point", act.zero_point, torch.int32),
                        ("row_sum", act.row_sum, torch.int32)):
        if not isinstance(t, torch.Tensor) or t.dtype != dt or t.shape != (m,) or t.device != codes.device:
            got = f"{t.dtype} {tuple(t.shape)} on {t.device}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"activation {name} must be {dt} ({m},) on {codes.device}, got {got}")


def _check_residual(residual: torch.Tensor | None, gate: torch.Tensor | None, m: int, n: int,
                    out_dtype: torch.dtype, out_spec: QuantSpec | None, device: torch.device) -> None:
    """The gated residual's operands: the kernels read them as raw rows, so shapes, dtypes and layout must be
    exactly what they assume."""
    if residual is None:
        if gate is not None:
            raise ValueError("gate scales the layer's output before the residual add: it needs residual")
        return
    if out_spec is not None:
        raise ValueError("residual and out_spec cannot be fused together: the next layer's per-token scale needs "
                         "the whole summed row (quantize the sum in its own call)")
    if out_dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"residual is added to the {out_dtype} output: out_dtype must be a float type")
    if not isinstance(residual, torch.Tensor) or residual.shape != (m, n):
        got = tuple(residual.shape) if isinstance(residual, torch.Tensor) else type(residual).__name__
        raise ValueError(f"residual must be (M={m}, N={n}), got {got}")
    if residual.dtype != out_dtype or not residual.is_contiguous():
        raise ValueError(f"residual must be contiguous {out_dtype} (the output's dtype), got "
                         f"{residual.dtype}{'' if residual.is_contiguous() else ', not contiguous'}")
    if residual.device != device:
        raise ValueError(f"residual is on {residual.device}, the weight on {device}")
    if gate is None:
        return
    if not isinstance(gate, torch.Tensor) or gate.dim() != 2 or gate.shape[1] != n or gate.shape[0] < 1:
        got = tuple(gate.shape) if isinstance(gate, torch.Tensor) else type(gate).__name__
        raise ValueError(f"gate must be (G, N={n}) with G ≥ 1 (one row per sample), got {got}")
    if m % gate.shape[0]:
        raise ValueError(f"gate groups: M={m} is not a multiple of G={gate.shape[0]}")
    if gate.dtype != torch.float32 or not gate.is_contiguous():
        raise ValueError(f"gate must be contiguous float32, got {gate.dtype}"
                         f"{'' if gate.is_contiguous() else ', not contiguous'}")
    if gate.device != device:
        raise ValueError(f"gate is on {gate.device}, the weight on {device}")
