"""The ``cuda`` backend of the kernel ops: the torch-free CUDA kernels of ``treeq_engine._C`` (``csrc/act_quant.cu``,
``csrc/gemm_sm90.cu`` — wgmma on H100/H200 —, ``csrc/gemm_sm80.cu`` — mma.sync on Ampere/Ada and as a fallback),
wrapped as torch custom ops (``torch.ops.treeq.cuda_quantize_activation`` / ``cuda_packed_linear``) with fake
implementations, so CUDA graphs and ``torch.compile`` see them as single nodes.

Semantics are the reference backend's (``kernels/reference.py``, docs/format.md), with these stated differences:

* the Monarch branch runs in bf16 × bf16 with float32 accumulation (stage 1 rounds the modulated rows and ``w1``
  to bf16; ``z`` is stored as bf16; stage 2 rounds ``w2`` to bf16); everything else is float32 in the oracle's
  order, and the integer GEMM and zero-point corrections are exact;
* with a LayerNorm, mean and variance are summed in another order than torch's, so a code can differ by one
  where a value lies within rounding of a .5 tie; without one, codes, scales and zero points are bit-exact;
* ``out_spec`` (next-layer quantization) writes the ``out_dtype`` output once and quantizes it with the
  row-owning kernel, as the oracle does: a per-token scale needs the whole row, which one GEMM tile does not
  hold, so the fusion is in the API only (the same codes and bytes as the two calls).

The gated residual (``residual``, ``gate``) is fused into the GEMM's store: ``residual + gate ⊙ y`` from ``y``
rounded to ``out_dtype``, product and sum each rounded to float32, exactly the oracle's arithmetic (given the same
``y``, bit for bit).

A weight held in layout v1 is repacked once into fragment layout v1 (``cuda_layout``) on the CPU and cached;
call an op once before capturing a CUDA graph so that caches are warm. A weight that carries its fragment layout
(``PackedWeight.frag``: the runtime's packed layers on the CUDA path) is used as it is.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

from .. import core
from ..format import MAX_K, QuantSpec, Role
from . import cuda_layout
from .derived import derived
from .ops import Backend, register
from .types import PackedWeight, QuantizedActivation

TOKEN_TILE = 128  # the GEMM's token tile: z is padded to a multiple of it
_X_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_OUT_KINDS = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2, torch.int32: 3}


@torch.compiler.assume_constant_result   # (torch.compile takes the answer as is, and does not trace the cache)
def available() -> bool:
    """Core built with CUDA, and a CUDA device present to torch and to the core."""
    return _available()


@functools.lru_cache(maxsize=None)
def _available() -> bool:
    if not core.available() or not torch.cuda.is_available():
        return False
    c = core.load()
    return bool(c.build_info()["cuda"]) and c.cuda_device_count() > 0


def _capability_ok(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device)[0] >= 8


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _round_up(v: int, m: int) -> int:
    return -(-v // m) * m


# ---- cached conversions of parameters ------------------------------------------------------------------------

def _cached(t: torch.Tensor, key: tuple, build) -> torch.Tensor:
    """``build(t)`` cached per tensor and key (``derived``: rebuilt when ``t``'s contents may have changed)."""
    return derived(t, key, (t,), lambda: build(t))


def _bf16(t: torch.Tensor) -> torch.Tensor:
    if t.dtype == torch.bfloat16 and t.is_contiguous():
        return t  # the runtime stores branch factors in bf16: no second copy
    return _cached(t, ("bf16",), lambda u: u.detach().to(torch.bfloat16).contiguous())


def _aligned(t: torch.Tensor, n: int, *, fresh: bool) -> bool:
    """``t``'s data starts on an ``n``-byte boundary. Under ``torch.compile``, which cannot read addresses, what
    ``fresh`` says: true for a custom op's output (a whole allocation, which the caching allocator aligns to 512
    bytes), false for a buffer (loaded with ``assign=True`` it may be a view into a checkpoint's storage at any
    offset: copied, to be safe)."""
    return fresh if torch.compiler.is_compiling() else t.data_ptr() % n == 0


def _w2_padded(w2: torch.Tensor, brp: int) -> torch.Tensor:
    if w2.dtype == torch.bfloat16 and w2.shape[2] == brp and w2.is_contiguous() and _aligned(w2, 4, fresh=False):
        return w2

    def build(u: torch.Tensor) -> torch.Tensor:
        b, nb, br = u.shape
        out = torch.zeros(b, nb, brp, dtype=torch.bfloat16, device=u.device)
        out[:, :, :br] = u.detach()
        return out

    return _cached(w2, ("w2", brp), build)


# z views handed out by quantize_activation -> their zero-padded (rows, b, brp) buffers
_Z_BASE: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _z_padded(z: torch.Tensor, m: int, brp: int) -> torch.Tensor:
    base = None if torch.compiler.is_compiling() else _Z_BASE.get(z)   # (under compile: padded anew)
    rows = _round_up(m, TOKEN_TILE)
    if base is not None and base.shape[0] >= rows and base.shape[2] == brp:
        return base
    _, b, br = z.shape
    out = torch.zeros(rows, b, brp, dtype=torch.bfloat16, device=z.device)
    out[:m, :, :br] = z
    return out


# ---- raw launchers (fill given outputs; used by the custom ops and by tests with poisoned outputs) -----------

def launch_quantize_activation(x: torch.Tensor, spec: QuantSpec, codes: torch.Tensor, scale: torch.Tensor,
                               zp: torch.Tensor, row_sum: torch.Tensor, z: torch.Tensor | None = None, *,
                               ln_eps: float | None = None, shift: torch.Tensor | None = None,
                               mod_scale: torch.Tensor | None = None, w1: torch.Tensor | None = None,
                               rank: int = 0, rms_norm: bool = False) -> None:
    """Quantize ``x (M, K)`` into the given outputs: codes int8 (M, K), scale f32 (M,), zp and row_sum int32 (M,),
    z bf16 (≥ M rows, b, brp) when ``w1`` (bf16 (b, b·r, Kb)) is given. The norm, where ``ln_eps`` is given:
    LayerNorm, or RMSNorm with ``rms_norm``."""
    if x.dim() != 2 or x.dtype not in _X_DTYPES or not x.is_contiguous():
        raise ValueError(f"x must be a contiguous 2-D float32/float16/bfloat16 tensor, got {x.dtype} "
                         f"{tuple(x.shape)}")
    m, k = x.shape
    if (shift is None) != (mod_scale is None):
        raise ValueError("modulate needs both shift and scale")
    if rms_norm and ln_eps is None:
        raise ValueError("rms_norm needs ln_eps (the RMSNorm's epsilon)")
    for name, t in (("shift", shift), ("scale", mod_scale)):
        if t is not None and (t.dtype != torch.float32 or not t.is_contiguous() or t.dim() != 2
                              or t.shape[1] != k or t.shape[0] == 0 or m % t.shape[0]):
            raise ValueError(f"{name} must be a contiguous float32 (G, K={k}) tensor with G dividing M={m}, got "
                             f"{t.dtype} {tuple(t.shape)}")
    b = w1.shape[0] if w1 is not None else 0
    if w1 is not None and (w1.dtype != torch.bfloat16 or not w1.is_contiguous() or w1.dim() != 3
                           or rank <= 0 or w1.shape[1] != b * rank):
        raise ValueError(f"w1 must be a contiguous bf16 (b, b·r, Kb) tensor with b·r = b·rank (rank={rank}), got "
                         f"{w1.dtype} {tuple(w1.shape)}")
    if w1 is not None and z is None:
        raise ValueError("w1 given without a z buffer")
    # the outputs: the kernel writes through raw pointers, so a short or mistyped buffer would be written past
    if codes.dtype != torch.int8 or tuple(codes.shape) != (m, k) or not codes.is_contiguous():
        raise ValueError(f"codes must be a contiguous int8 ({m}, {k}) buffer, got {codes.dtype} {tuple(codes.shape)}")
    for name, t, dt in (("scale", scale, torch.float32), ("zp", zp, torch.int32), ("row_sum", row_sum, torch.int32)):
        if t.dtype != dt or tuple(t.shape) != (m,) or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous {dt} ({m},) buffer, got {t.dtype} {tuple(t.shape)}")
    if z is not None and (w1 is None or z.dtype != torch.bfloat16 or not z.is_contiguous() or z.dim() != 3
                          or z.shape[0] < m or z.shape[1] != b or z.shape[2] < b * rank):
        raise ValueError(f"z must be a contiguous bf16 (≥ {m}, {b}, ≥ {b * rank}) buffer beside w1, got "
                         f"{z.dtype} {tuple(z.shape)}")
    for name, t in (("shift", shift), ("scale", mod_scale), ("w1", w1), ("z", z), ("codes", codes),
                    ("scale", scale), ("zp", zp), ("row_sum", row_sum)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device}, x on {x.device}")
    with torch.cuda.device(x.device):
        core.load().cuda_quantize_activation(
            x=x.data_ptr(), x_dtype=_X_DTYPES[x.dtype], m=m, k=k,
            norm=0 if ln_eps is None else 2 if rms_norm else 1,
            ln_eps=float(ln_eps or 0.0), shift=_ptr(shift), mod_scale=_ptr(mod_scale),
            groups=0 if shift is None else shift.shape[0], bits=spec.bits, symmetric=spec.symmetric,
            clip=spec.clip_ratio, w1=_ptr(w1), blocks=b, rank=rank, kb=0 if w1 is None else w1.shape[2],
            brp=0 if z is None else z.shape[2], codes=codes.data_ptr(), scale=scale.data_ptr(), zp=zp.data_ptr(),
            row_sum=row_sum.data_ptr(), z=_ptr(z), z_rows=0 if z is None else z.shape[0], stream=_stream(x.device))


def plan(m: int, n: int, k: int, bits: int, arch: int = 0, splits: int = 0) -> dict:
    """Kernel (``arch`` 90: wgmma, 80: mma.sync), split-K and workspace sizes on the current device."""
    return dict(core.load().cuda_plan_packed_linear(m, n, k, bits, arch, splits))


def launch_packed_linear(out: torch.Tensor, codes: torch.Tensor, a_scale: torch.Tensor, a_zp: torch.Tensor,
                         a_rowsum: torch.Tensor, w: cuda_layout.FragWeight, *, k: int,
                         bias: torch.Tensor | None = None, z: torch.Tensor | None = None,
                         w2: torch.Tensor | None = None, gelu: bool = False, arch: int = 0, splits: int = 0,
                         residual: torch.Tensor | None = None, gate: torch.Tensor | None = None) -> None:
    """``out (M, N)`` of bf16/fp16/fp32 (or int32: the corrected integer accumulator) from int8 ``codes (M, ≥K)``
    with a row stride and column count that are multiples of 16 (columns past K are never read), and the weight's
    CUDA operands ``w``. ``residual`` (contiguous ``(M, N)`` of ``out``'s float dtype; ``out`` itself works in
    place) and ``gate`` (contiguous float32 ``(G, N)``, G dividing M) make it ``out = residual + gate ⊙ y``. Every
    operand is checked here (sizes, dtypes, device): the kernels read raw pointers."""
    m = codes.shape[0]
    dev = codes.device
    _check_launch(out, codes, a_scale, a_zp, a_rowsum, w, k, bias, z, w2, residual, gate)
    with torch.cuda.device(dev):
        pl = plan(m, w.n, k, w.bits, arch, splits)
        partials = counters = None
        if pl["splits"] > 1:
            partials = torch.empty(pl["partial_ints"], dtype=torch.int32, device=dev)
            counters = torch.zeros(pl["counter_ints"], dtype=torch.int32, device=dev)
        core.load().cuda_packed_linear(
            act=codes.data_ptr(), lda=codes.stride(0) if m > 1 else codes.shape[1], k_act=codes.shape[1],
            a_scale=a_scale.data_ptr(),
            a_zp=a_zp.data_ptr(), a_rowsum=a_rowsum.data_ptr(), wfrag=w.words.data_ptr(),
            row_chan=w.row_chan.data_ptr(), bits=w.bits, w_scale=w.scale.data_ptr(), w_uzp=w.uzp.data_ptr(),
            w_ucs=w.ucs.data_ptr(), bias=_ptr(bias), z=_ptr(z), w2=_ptr(w2),
            blocks=0 if w2 is None else w2.shape[0], brp=0 if w2 is None else w2.shape[2],
            nb=0 if w2 is None else w2.shape[1], out=out.data_ptr(), out_kind=_OUT_KINDS[out.dtype], gelu=gelu,
            m=m, n=w.n, k=k, arch=pl["arch"], splits=pl["splits"], partials=_ptr(partials),
            counters=_ptr(counters), stream=_stream(dev), residual=_ptr(residual), gate=_ptr(gate),
            gate_rows=0 if gate is None else m // gate.shape[0])


def _check_launch(out, codes, a_scale, a_zp, a_rowsum, w, k, bias, z, w2, residual=None, gate=None) -> None:
    """What the GEMM's raw-pointer launch needs, as clear errors (a wrong size here would be an out-of-bounds
    access on the device, not an exception)."""
    def need(ok: bool, what: str) -> None:
        if not ok:
            raise ValueError(f"cuda packed_linear: {what}")

    dev = codes.device
    need(codes.dtype == torch.int8 and codes.dim() == 2 and codes.stride(1) == 1, "codes must be int8 (M, ≥K) rows")
    m, k_act = codes.shape
    need(w.k == k and 0 < k <= k_act and k_act % 16 == 0 and (m == 1 or codes.stride(0) % 16 == 0),
         f"codes (M={m}, {k_act} columns, row stride {codes.stride(0)}) must hold K={k} (the weight's K={w.k}) "
         "columns, with the column count and row stride multiples of 16")
    for name, t, dt in (("a_scale", a_scale, torch.float32), ("a_zp", a_zp, torch.int32),
                        ("a_rowsum", a_rowsum, torch.int32)):
        need(t.dtype == dt and t.is_contiguous() and t.numel() >= m, f"{name} must be contiguous {dt} with ≥ {m} "
             f"entries, got {t.dtype} {tuple(t.shape)}")
    n = w.n
    w.check()
    need(out.dim() == 2 and tuple(out.shape) == (m, n) and out.is_contiguous() and out.dtype in _OUT_KINDS,
         f"out must be a contiguous ({m}, {n}) tensor of {list(_OUT_KINDS)}, got {out.dtype} {tuple(out.shape)}")
    need(bias is None or (bias.dtype == torch.float32 and bias.is_contiguous() and bias.numel() == n),
         f"bias must be contiguous float32 ({n},)")
    need((z is None) == (w2 is None), "the branch needs both z and w2")
    if w2 is not None:
        blocks, nb, brp = w2.shape
        need(w2.dtype == torch.bfloat16 and w2.is_contiguous() and blocks * nb >= n and brp % 16 == 0,
             f"w2 must be contiguous bf16 (b, Nb, b·r padded to 16) covering N={n}, got {tuple(w2.shape)}")
        need(z.dtype == torch.bfloat16 and z.is_contiguous() and z.dim() == 3 and z.shape[0] >= _round_up(m, TOKEN_TILE)
             and tuple(z.shape[1:]) == (blocks, brp), f"z must be contiguous bf16 (≥ {_round_up(m, TOKEN_TILE)}, "
             f"{blocks}, {brp}), got {z.dtype} {tuple(z.shape)}")
    need(gate is None or residual is not None, "gate scales the output before the residual add: it needs residual")
    if residual is not None:
        need(out.dtype != torch.int32, "int32 output is the bare corrected accumulator: no residual")
        need(residual.dtype == out.dtype and residual.is_contiguous() and tuple(residual.shape) == (m, n),
             f"residual must be a contiguous ({m}, {n}) tensor of out's dtype {out.dtype}, got {residual.dtype} "
             f"{tuple(residual.shape)}{'' if residual.is_contiguous() else ' (not contiguous)'}")
        need(residual.data_ptr() == out.data_ptr() or not _overlap(residual, out),
             "residual partly overlaps out: pass out itself (in place) or a separate tensor")
    if gate is not None:
        need(gate.dtype == torch.float32 and gate.is_contiguous() and gate.dim() == 2 and gate.shape[1] == n
             and gate.shape[0] >= 1 and m % gate.shape[0] == 0,
             f"gate must be a contiguous float32 (G, N={n}) tensor with G dividing M={m}, got {gate.dtype} "
             f"{tuple(gate.shape)}{'' if gate.is_contiguous() else ' (not contiguous)'}")
    tensors = [out, codes, a_scale, a_zp, a_rowsum, w.words, w.row_chan, w.scale, w.uzp, w.ucs, bias, z, w2,
               residual, gate]
    need(all(t is None or t.device == dev for t in tensors), f"every operand must be on {dev}")
    need(dev.type == "cuda", f"the operands are on {dev}, not a CUDA device")


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two contiguous tensors share any byte."""
    a0, b0 = a.data_ptr(), b.data_ptr()
    return a0 < b0 + b.numel() * b.element_size() and b0 < a0 + a.numel() * a.element_size()


# ---- custom ops ------------------------------------------------------------------------------------------------

@torch.library.custom_op("treeq::cuda_quantize_activation", mutates_args=())
def _quantize_activation_op(x: torch.Tensor, bits: int, symmetric: bool, clip: float, ln_eps: Optional[float],
                            shift: Optional[torch.Tensor], mod_scale: Optional[torch.Tensor],
                            w1: Optional[torch.Tensor], rank: int, rms_norm: bool = False
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    m, k = x.shape
    dev = x.device
    codes = torch.empty(m, k, dtype=torch.int8, device=dev)
    scale = torch.empty(m, dtype=torch.float32, device=dev)
    zp = torch.empty(m, dtype=torch.int32, device=dev)
    row_sum = torch.empty(m, dtype=torch.int32, device=dev)
    if w1 is not None:
        b = w1.shape[0]
        z = torch.empty(_round_up(m, TOKEN_TILE), b, _round_up(w1.shape[1], 16), dtype=torch.bfloat16, device=dev)
    else:
        z = torch.empty(0, dtype=torch.bfloat16, device=dev)
    spec = QuantSpec.activation(bits, symmetric=symmetric, clip_ratio=clip)
    launch_quantize_activation(x, spec, codes, scale, zp, row_sum, z if w1 is not None else None, ln_eps=ln_eps,
                               shift=shift, mod_scale=mod_scale, w1=w1, rank=rank, rms_norm=rms_norm)
    return codes, scale, zp, row_sum, z


@_quantize_activation_op.register_fake
def _(x, bits, symmetric, clip, ln_eps, shift, mod_scale, w1, rank, rms_norm=False):
    m, k = x.shape
    z_shape = (0,) if w1 is None else (_round_up(m, TOKEN_TILE), w1.shape[0], _round_up(w1.shape[1], 16))
    return (x.new_empty((m, k), dtype=torch.int8), x.new_empty((m,), dtype=torch.float32),
            x.new_empty((m,), dtype=torch.int32), x.new_empty((m,), dtype=torch.int32),
            x.new_empty(z_shape, dtype=torch.bfloat16))


@torch.library.custom_op("treeq::cuda_packed_linear", mutates_args=())
def _packed_linear_op(codes: torch.Tensor, a_scale: torch.Tensor, a_zp: torch.Tensor, a_rowsum: torch.Tensor,
                      words: torch.Tensor, row_chan: torch.Tensor, w_scale: torch.Tensor, w_uzp: torch.Tensor,
                      w_ucs: torch.Tensor, bias: Optional[torch.Tensor], z: Optional[torch.Tensor],
                      w2: Optional[torch.Tensor], bits: int, n: int, k: int, gelu: bool, out_kind: int, arch: int,
                      splits: int, residual: Optional[torch.Tensor] = None,
                      gate: Optional[torch.Tensor] = None) -> torch.Tensor:
    dtype = {v: d for d, v in _OUT_KINDS.items()}[out_kind]
    out = torch.empty(codes.shape[0], n, dtype=dtype, device=codes.device)  # never the residual: inputs stay as given
    w = cuda_layout.FragWeight(words, row_chan, w_scale, w_uzp, w_ucs, bits, n, k)
    launch_packed_linear(out, codes, a_scale, a_zp, a_rowsum, w, k=k, bias=bias, z=z, w2=w2, gelu=gelu,
                         arch=arch, splits=splits, residual=residual, gate=gate)
    return out


@_packed_linear_op.register_fake
def _(codes, a_scale, a_zp, a_rowsum, words, row_chan, w_scale, w_uzp, w_ucs, bias, z, w2, bits, n, k, gelu,
      out_kind, arch, splits, residual=None, gate=None):
    dtype = {v: d for d, v in _OUT_KINDS.items()}[out_kind]
    return codes.new_empty((codes.shape[0], n), dtype=dtype)


# ---- the backend's op implementations ---------------------------------------------------------------------------

def quantize_activation(x: torch.Tensor, spec: QuantSpec, *, ln_eps: float | None = None,
                        shift: torch.Tensor | None = None, scale: torch.Tensor | None = None,
                        monarch_w1: torch.Tensor | None = None, rms_norm: bool = False) -> QuantizedActivation:
    """``ops.quantize_activation`` on CUDA; ``z`` (when ``monarch_w1`` is given) is bf16 ``(M, b, b·r)``."""
    if (shift is None) != (scale is None):
        raise ValueError("modulate needs both shift and scale")
    m, k = x.shape
    if shift is not None and m % shift.shape[0]:
        raise ValueError(f"modulate groups: M={m} is not a multiple of G={shift.shape[0]}")
    x = x.contiguous()
    shift = None if shift is None else shift.to(torch.float32).contiguous()
    scale = None if scale is None else scale.to(torch.float32).contiguous()
    w1, rank = None, 0
    if monarch_w1 is not None:
        b, br, kb = monarch_w1.shape
        if br % b or b * kb < k:
            raise ValueError(f"monarch_w1 must be (b, b·r, Kb) covering K={k}, got {tuple(monarch_w1.shape)}")
        w1, rank = _bf16(monarch_w1), br // b
    codes, s, zp, rs, zfull = torch.ops.treeq.cuda_quantize_activation(
        x, spec.bits, spec.symmetric, spec.clip_ratio, ln_eps, shift, scale, w1, rank, rms_norm)
    z = None
    if w1 is not None:
        z = zfull[:m, :, :w1.shape[1]]
        if not torch.compiler.is_compiling():   # (a lookup table is no graph op: _z_padded pads anew there)
            _Z_BASE[z] = zfull
    return QuantizedActivation(codes, s, zp, rs, spec.bits, z)


def packed_linear(act: QuantizedActivation, weight: PackedWeight, *, bias: torch.Tensor | None = None,
                  monarch_w2: torch.Tensor | None = None, gelu: bool = False,
                  out_dtype: torch.dtype = torch.bfloat16, out_spec: QuantSpec | None = None,
                  residual: torch.Tensor | None = None, gate: torch.Tensor | None = None, arch: int = 0,
                  splits: int = 0, out: torch.Tensor | None = None) -> torch.Tensor | QuantizedActivation:
    """``ops.packed_linear`` on CUDA, the gated residual (``residual``, ``gate``) fused into the GEMM's store.
    Extra keywords (tests, benchmarks): ``arch`` 90/80 picks the wgmma or the mma.sync kernel (0: best for the
    device), ``splits`` forces split-K, ``out`` fills a given (M, N) tensor instead of allocating (bypassing the
    custom op; ``out=residual`` adds in place), and ``out_dtype=torch.int32`` returns the exact
    zero-point-corrected integer accumulator (no branch, bias, GELU or residual)."""
    m, k, n = act.m, act.k, weight.n
    if out_dtype not in _OUT_KINDS:
        raise ValueError(f"out_dtype must be one of {list(_OUT_KINDS)}, got {out_dtype}")
    if out_dtype == torch.int32 and (bias is not None or monarch_w2 is not None or gelu or out_spec is not None
                                     or residual is not None):
        raise ValueError("int32 output is the bare corrected accumulator: no branch, bias, GELU, out_spec or "
                         "residual")
    if gate is not None and residual is None:
        raise ValueError("gate scales the layer's output before the residual add: it needs residual")
    if residual is not None and out_spec is not None:
        raise ValueError("residual and out_spec cannot be fused together: the next layer's per-token scale needs "
                         "the whole summed row")
    z, w2 = None, None
    if monarch_w2 is not None:
        if act.z is None:
            raise ValueError("monarch_w2 given but the activation carries no stage-1 output z")
        blocks, _, br = monarch_w2.shape
        if tuple(act.z.shape) != (m, blocks, br):
            raise ValueError(f"z {tuple(act.z.shape)} does not match monarch_w2 {tuple(monarch_w2.shape)} "
                             f"for M={m}")
        brp = _round_up(br, 16)
        w2 = _w2_padded(monarch_w2, brp)
        z = _z_padded(act.z if act.z.dtype == torch.bfloat16 else act.z.to(torch.bfloat16), m, brp)
    w = cuda_layout.cuda_operands(weight)
    codes = act.codes
    k_act = _round_up(k, 16)
    if k_act != k or not codes.is_contiguous() or not _aligned(codes, 16, fresh=True):
        codes = F.pad(codes, (0, k_act - k)).contiguous()
    f32 = lambda t: t.to(torch.float32).contiguous()  # noqa: E731
    i32 = lambda t: t.to(torch.int32).contiguous()  # noqa: E731
    a_scale, a_zp, a_rs = f32(act.scale), i32(act.zero_point), i32(act.row_sum)
    bias_f = None if bias is None else f32(bias)
    kind = _OUT_KINDS[out_dtype]
    if out is not None:
        if out.shape != (m, n) or out.dtype != out_dtype or not out.is_contiguous() or out.device != codes.device:
            raise ValueError(f"out must be a contiguous {out_dtype} ({m}, {n}) tensor on {codes.device}")
        launch_packed_linear(out, codes, a_scale, a_zp, a_rs, w, k=k, bias=bias_f, z=z, w2=w2, gelu=gelu,
                             arch=arch, splits=splits, residual=residual, gate=gate)
        y = out
    else:
        y = torch.ops.treeq.cuda_packed_linear(codes, a_scale, a_zp, a_rs, w.words, w.row_chan, w.scale, w.uzp,
                                               w.ucs, bias_f, z, w2, w.bits, n, k, gelu, kind, arch, splits,
                                               residual, gate)
    if out_spec is not None:
        return quantize_activation(y, out_spec)
    return y


# ---- registration ---------------------------------------------------------------------------------------------

def runs_weight(device: torch.device, k: int) -> bool:
    """Whether this backend runs a packed weight of depth ``k`` held on ``device`` (the runtime keeps such weights
    in fragment layout only)."""
    device = torch.device(device)
    return device.type == "cuda" and available() and k <= MAX_K and _capability_ok(device)


def _all_cuda(*ts: torch.Tensor | None) -> bool:
    return all(t is None or (isinstance(t, torch.Tensor) and t.is_cuda) for t in ts)


def can_run(op: str, args: tuple, kwargs: dict) -> bool:
    """CUDA tensors on a device of compute capability ≥ 8.0, with the core built with CUDA."""
    if not available():
        return False
    if op == "quantize_activation":
        x, spec = args
        return (_all_cuda(x, kwargs.get("shift"), kwargs.get("scale"), kwargs.get("monarch_w1"))
                and x.dtype in _X_DTYPES and spec.role is Role.ACTIVATION and _capability_ok(x.device))
    act, weight = args
    out_dtype = kwargs.get("out_dtype", torch.bfloat16)
    frag = () if weight.frag is None else (weight.frag.row_chan, weight.frag.scale, weight.frag.uzp, weight.frag.ucs)
    return (_all_cuda(act.codes, act.scale, act.zero_point, act.row_sum, act.z, weight.anchor, weight.scale,
                      weight.zero_point, weight.col_sum, *frag, kwargs.get("bias"), kwargs.get("monarch_w2"),
                      kwargs.get("residual"), kwargs.get("gate"))
            and out_dtype in (torch.bfloat16, torch.float16, torch.float32) and runs_weight(act.codes.device, act.k))


register(Backend("cuda", 100, {"quantize_activation": quantize_activation, "packed_linear": packed_linear}, can_run))
