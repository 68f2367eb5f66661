"""Gluon (sm_90) packed GEMM: low-bit weights as the *register* operand of ``warpgroup_mma``.

Hopper has no int4 MMA; every format runs on ``wgmma.mma_async.s32.s8.s8``. Plain Triton feeds a tl.dot
operand computed in registers back through shared memory, which broke every W4 layout tried
(docs/sources.md). Here the weight tile is the A operand in registers ("RS" wgmma): weights on the
MMA's M side (output channels), tokens on N, activation codes through shared memory.

Math: as gemm.py, with the weight codes fed *in offset binary* ``u = q + 2^(b−1) ∈ [0, 2^b)`` (b < 8): a byte of
packed fields becomes int8 MMA lanes with one shift and one AND, and the offset is folded into the zero point:
``Σ (qa − za)(u − zw') = corr`` with ``zw' = zw + 2^(b−1)``, ``cw' = cw + 2^(b−1)·K`` (per channel, offline).

Weight layout ("fragment layout", derived offline from layout v1 by ``fragment_pack``, cached per weight):
per output row, per K-step of ``BK = 128`` codes, ``BK·b/8`` bytes. With ``c = 8/b`` fields per byte, byte
``p = (q·W + w)·4 + i`` (``q`` ∈ 0..3, ``w`` ∈ 0..W−1, ``i`` ∈ 0..3, ``W = BK/(16c)``) holds in its field ``s``
(bits ``[s·b, s·b + b)``) the code of K index ``(w·c + s)·16 + q·4 + i``. That is exactly the wgmma A fragment for
s8 (``k_width = 4``): thread lane ``4r + q`` owns K ``16β + 4q + [0, 4)`` of rows ``r`` and ``r + 8`` for every
16-block ``β``, so one contiguous load per row gives it all its codes of the K-step (16 bytes at 4 bits, 2 × 16
at 8, 8 at 2), and field plane ``s`` of a 32-bit word *is* the register for block ``β = w·c + s``. The kernel
writes the unpack as semantic ops (load bytes → per-plane shift/AND as inline PTX on packed registers → join →
reshape/permute to true K order) and ``convert_layout(..., assert_trivial=True)`` proves at compile time that
this lands in the dot-operand layout with no data movement. 8-bit weights use the same byte order (``c = 1``), no unpack.

Tiles: ``BW = 16·num_warps`` contiguous channels (8 warps: two warpgroups of 64) × ``BT = 128`` tokens ×
``BK = 128``.
Pipeline: persistent CTAs (grid = #SMs) walk a flattened (tile, K-step) sequence; activation tiles arrive by TMA
into a ring of ``STAGES`` shared buffers, each with an mbarrier; weight bytes are loaded from global (L2)
two K-steps ahead into registers; one wgmma stays in flight (``warpgroup_mma_wait(1)``), after which the ring
slot it read is refilled. Epilogue (in registers, mma layout): zero-point correction, per-token × per-channel
scales, Monarch stage 2 accumulated into the tile by bf16 ``mma_v2``, one masked ``(BW × b·r) × (b·r × BT)``
product per Monarch block the tile overlaps (output blocks are contiguous, ``Nb`` channels: 1–3 blocks per
tile on the DiT-XL/2 shapes at b = 32, 4–5 on the 1152-wide ones), bias, GELU(tanh), store (16-byte runs along
channels).

Gated residual (``HAS_RESIDUAL``, ``HAS_GATE``; a DiT block's ``x + gate ⊙ f(x)``), in the store layout:

    ŷ[m,n]   = out_dtype(y[m,n])                                  what the unfused layer stores
    out[m,n] = out_dtype( float(residual[m,n]) ⊕ (gate[m // (M/G), n] ⊗ float(ŷ[m,n])) )

with ⊗, ⊕ float32 multiply and add, each rounded (``mul.rn.f32`` / ``add.rn.f32`` as inline PTX, which neither
LLVM nor ptxas contracts into an FMA; see ``_MUL_RN``), so the fused output equals
``reference.gated_residual`` of the unfused output bit for bit. Without gate, ``residual ⊕ ŷ``. The residual has
the output's (token, channel) indexing, read with the same 16-byte runs along channels; the gate row of a token
is ``t // RPG`` (``RPG = M // G`` tokens per sample, a runtime integer).
"""
from __future__ import annotations

import functools

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from ...format.packing import unpack
from ..derived import derived
from . import runtime
from .gemm import splitk_workspace
from .runtime import INTERPRET, next_pow2

BK = 128  # codes per K-step; the fragment layout is defined for this step
BT = 128  # tokens per tile (wgmma N; 8-bit wgmma allows N ≤ 224)
STAGES = 4
NUM_WARPS = 8
GLUON_BITS = (2, 4, 8)  # 3-bit weights (two bit planes) run on the plain Triton kernel
_BK = gl.constexpr(BK)  # the same, visible inside kernels
_BT = gl.constexpr(BT)


# ---------------------------------------------------------------------------------------------------------------
# Offline: the fragment layout
# ---------------------------------------------------------------------------------------------------------------

def fields_per_byte(bits: int) -> int:
    if bits not in GLUON_BITS:
        raise ValueError(f"the Gluon kernel takes {GLUON_BITS}-bit weights, got {bits}")
    return 8 // bits


def fragment_pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Fragment layout (module docstring) of int8 codes ``(N, K)``: ``(N, Kp·bits/8)`` uint8 for bits < 8, int8
    for 8 (signed codes). ``Kp`` = K rounded up to ``BK``; padding holds code 0 (the activation tile is zero
    there anyway, TMA fills out-of-range columns with zeros)."""
    c = fields_per_byte(bits)
    n, k = codes.shape
    kp = -(-k // BK) * BK
    w = BK // (16 * c)
    off = 0 if bits == 8 else 1 << (bits - 1)
    u = torch.full((n, kp), off, dtype=torch.int32, device=codes.device)
    u[:, :k] = codes.to(torch.int32) + off
    # true K within a step = ((w·c + s)·4 + q)·4 + i  ->  fields F[n, step, w, s, q, i]
    f = u.view(n, kp // BK, w, c, 4, 4).permute(0, 1, 4, 2, 5, 3)  # (n, step, q, w, i, s)
    if bits == 8:
        return f.reshape(n, kp).to(torch.int8).contiguous()
    shifts = torch.arange(c, device=codes.device, dtype=torch.int32) * bits
    byte = (f << shifts).sum(dim=-1)  # disjoint fields: sum == or
    return byte.reshape(n, kp // c).to(torch.uint8).contiguous()


def fragment_unpack_reference(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """The kernel's unpack, step for step in torch (per-plane shift/mask, join, reshape, permute): int8 codes
    ``(N, k)`` from a fragment-layout tensor. Tests hold it against layout v1 (``fragment_pack``'s inverse)."""
    c = fields_per_byte(bits)
    n = packed.shape[0]
    kp = packed.shape[1] * c
    w = BK // (16 * c)
    b = packed.to(torch.int32) & 0xFF
    if bits == 8:
        planes = (b - ((b & 0x80) << 1))[..., None]  # int8 bytes are the codes
    else:
        mask = (1 << bits) - 1
        planes = torch.stack([(b >> (s * bits)) & mask for s in range(c)], dim=-1) - (1 << (bits - 1))
    # bytes (n, step, q, w, i) x planes s  ->  true K order (step, w, s, q, i)
    x = planes.view(n, kp // BK, 4, w, 4, c).permute(0, 1, 3, 5, 2, 4).reshape(n, kp)
    return x[:, :k].to(torch.int8).contiguous()


def fragment_weights(packed: torch.Tensor, bits: int, n: int, k: int, zw: torch.Tensor, cw: torch.Tensor,
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(fragment-layout weight, zw', cw')`` for a layout-v1 packed weight, derived once and cached beside it
    (:mod:`treeq_engine.kernels.derived`). Layout v1 stays what artifacts store."""
    off = 0 if bits == 8 else 1 << (bits - 1)

    def build() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (fragment_pack(unpack(packed, bits, k), bits), (zw + off).to(torch.int32).contiguous(),
                (cw + off * k).to(torch.int32).contiguous())

    return derived(packed, ("gluon_frag", bits, n, k), (packed, zw, cw), build)


# ---------------------------------------------------------------------------------------------------------------
# Kernel pieces
# ---------------------------------------------------------------------------------------------------------------

@gluon.constexpr_function
def _word_layout3(bw, c, num_warps):
    """Layout of the weight bytes viewed as ``(BW, words, 4)``: byte ``i`` of a 32-bit word is register bit
    0–1, a thread's ``W`` words of a row are contiguous (one vector load), rows ``r, r + 8`` by register, lanes
    and warps as the wgmma A fragment (module docstring). The words themselves take ``SliceLayout(2, ·)``."""
    w = BK // (16 * c)
    reg = [[0, 0, 1], [0, 0, 2]] + [[0, 1 << j, 0] for j in range(w.bit_length() - 1)] + [[8, 0, 0]]
    lane = [[0, w, 0], [0, 2 * w, 0], [1, 0, 0], [2, 0, 0], [4, 0, 0]]
    warp = [[16 << j, 0, 0] for j in range(num_warps.bit_length() - 1)]
    return gl.DistributedLinearLayout(reg, lane, warp, [], [bw, BK // (4 * c), 4])


@gluon.constexpr_function
def _plane_asm(shift, mask):
    # one 32-bit word in (the other three operands are the same word, broadcast), four int8 MMA lanes out:
    # one shift and one AND per plane
    return f"{{ .reg .b32 t; shr.b32 t, $1, {shift}; and.b32 $0, t, {mask}; }}"


@gluon.jit
def _plane(w3, S: gl.constexpr, BITS: gl.constexpr):
    MASK: gl.constexpr = ((1 << BITS) - 1) * 0x01010101
    asm: gl.constexpr = _plane_asm(S * BITS, MASK)
    return gl.inline_asm_elementwise(asm, "=r,r,r,r,r", [w3], dtype=gl.int8, is_pure=True, pack=4)


@gluon.jit
def _unpack(words, BW: gl.constexpr, BITS: gl.constexpr, dot_layout: gl.constexpr, num_warps: gl.constexpr):
    """Weight words ``(BW, BK/(4c))`` int32 (fragment layout) → int8 MMA operand ``(BW, BK)`` in ``dot_layout``.
    Words travel through the loop packed (an int8 tensor would be carried byte by byte)."""
    C: gl.constexpr = 8 // BITS
    W: gl.constexpr = _BK // (16 * C)
    L3: gl.constexpr = _word_layout3(BW, C, num_warps)
    w3 = gl.broadcast(gl.expand_dims(words, 2), gl.full([BW, _BK // (4 * C), 4], 0, gl.int32, layout=L3))[0]
    if BITS == 8:
        # a real (identity) byte permute: a plain mov lets ptxas alias the load registers with the wgmma operand
        # and serialize the wgmma pipeline (C7513)
        x = gl.inline_asm_elementwise("prmt.b32 $0, $1, 0, 0x3210;", "=r,r,r,r,r", [w3], dtype=gl.int8, is_pure=True,
                                      pack=4)
        x = x.reshape(BW, 4, W, 4).permute(0, 2, 1, 3)
    elif BITS == 4:
        x = gl.join(_plane(w3, 0, BITS), _plane(w3, 1, BITS))  # (BW, words, 4, s)
        x = x.reshape(BW, 4, W, 4, 2).permute(0, 2, 4, 1, 3)
    else:  # 2-bit: the join tree gives (.., s0, s1) with s = 2·s1 + s0
        x = gl.join(gl.join(_plane(w3, 0, BITS), _plane(w3, 1, BITS)),
                    gl.join(_plane(w3, 2, BITS), _plane(w3, 3, BITS)))
        x = x.reshape(BW, 4, W, 4, 2, 2).permute(0, 2, 5, 4, 1, 3)
    return gl.convert_layout(x.reshape(BW, _BK), dot_layout, assert_trivial=True)


@gluon.jit
def _work_coords(work, n_tiles_w, BW: gl.constexpr, SPLIT: gl.constexpr, PER):
    """(first token, first channel, first K-step) of a persistent work item (a tile's K-slice of ``PER``
    steps); channel tiles vary fastest, then the split."""
    tile = work // SPLIT
    return (tile // n_tiles_w) * _BT, (tile % n_tiles_w) * BW, (work % SPLIT) * PER


@gluon.jit
def _cursor(work, n_tiles_w, BW: gl.constexpr, SPLIT: gl.constexpr, PER):
    t0, n0, kb = _work_coords(work, n_tiles_w, BW, SPLIT, PER)
    return 0, work, t0, n0, kb


@gluon.jit
def _step(k, work, t0, n0, kb, PER, nprog, n_tiles_w, BW: gl.constexpr, SPLIT: gl.constexpr):
    """Advance a (K-step, work item) cursor by one step; new coordinates only when it moves to its next item."""
    k += 1
    if k == PER:
        k = 0
        work += nprog
        t0, n0, kb = _work_coords(work, n_tiles_w, BW, SPLIT, PER)
    return k, work, t0, n0, kb


@gluon.jit
def _channels(n0, N, BW: gl.constexpr, layout: gl.constexpr):
    """Channel index of each tile row and its validity, in ``layout`` (1-D)."""
    o = n0 + gl.arange(0, BW, layout=layout)
    return o, o < N


@gluon.jit
def _load_weight_words(w_ptr, n0, ki, N, K, BW: gl.constexpr, BITS: gl.constexpr, num_warps: gl.constexpr):
    """int32 words ``(BW, BK/(4c))`` of K-step ``ki`` for the tile's channels. The row length (``KW`` words) is
    computed here from the constexpr words per K-step, so the compiler knows each row starts 16-byte aligned and
    vectorizes the loads (passed in as an integer, 72 words at 2 bits and K = 1152, it did not)."""
    C: gl.constexpr = 8 // BITS
    KW = gl.cdiv(K, _BK) * (_BK // (4 * C))
    lw: gl.constexpr = gl.SliceLayout(2, _word_layout3(BW, C, num_warps))
    o, ok = _channels(n0, N, BW, gl.SliceLayout(1, lw))
    cols = ki * (_BK // (4 * C)) + gl.arange(0, _BK // (4 * C), layout=gl.SliceLayout(0, lw))
    ptrs = w_ptr + o.to(gl.int64)[:, None] * KW + cols[None, :]
    return gl.load(ptrs, mask=ok[:, None] & (cols < KW)[None, :], other=0)


@gluon.jit
def _branch_add(y, n0, rows_t, tmask, z_ptr, w2_ptr, N, NBLK, NB, BR, BW: gl.constexpr, BRC: gl.constexpr,
                mma2: gl.constexpr, ld: gl.constexpr, ldt: gl.constexpr):
    """``y (BW, BT)`` (f32, ``mma2`` layout) plus Monarch stage 2 of the tile's channels ``o = n₀ + row``
    (``o = j·Nb + l``, so w2's row ``(j, l)`` is row ``o`` of w2 viewed as ``(b·Nb, b·r)``): for each block j the
    tile overlaps, the tile's w2 rows of block j (others masked to zero) times ``z[tokens, j, :]ᵀ``."""
    a_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma2, k_width=2)
    b_l: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma2, k_width=2)
    o = n0 + gl.arange(0, BW, layout=gl.SliceLayout(1, ld))
    ca = gl.arange(0, BRC, layout=gl.SliceLayout(0, ld))
    cb = gl.arange(0, BRC, layout=gl.SliceLayout(1, ldt))
    tb = gl.convert_layout(rows_t, gl.SliceLayout(0, ldt))
    tmb = gl.convert_layout(tmask, gl.SliceLayout(0, ldt))
    for j in range(n0 // NB, (gl.minimum(n0 + BW, N) - 1) // NB + 1):  # b·Nb ≥ N: j stays below b
        sel = (o < N) & (o >= j * NB) & (o < (j + 1) * NB)
        for c0 in range(0, BR, BRC):
            am = sel[:, None] & ((c0 + ca) < BR)[None, :]
            a = gl.load(w2_ptr + o.to(gl.int64)[:, None] * BR + (c0 + ca)[None, :], mask=am, other=0.0)
            bm = ((c0 + cb) < BR)[:, None] & tmb[None, :]
            b = gl.load(z_ptr + tb.to(gl.int64)[None, :] * (NBLK * BR) + j * BR + (c0 + cb)[:, None], mask=bm,
                        other=0.0)
            y = mma_v2(gl.convert_layout(a.to(gl.bfloat16), a_l), gl.convert_layout(b.to(gl.bfloat16), b_l), y)
    return y


# The gated residual's float32 arithmetic as explicit round-to-nearest PTX instructions. Plain ``res + g * y`` is
# contracted into one FFMA under Triton's default ``enable_fp_fusion=True`` (sm_90a AOT: all 64 per thread were),
# which rounds once instead of twice and so can differ from the oracle (reference.gated_residual: product and sum
# each rounded to float32) in the last bit; with a float32 output even ``res + y`` could absorb the epilogue's
# last multiply (the GELU's or the scales'). ``mul.rn``/``add.rn`` are never fused by ptxas (PTX ISA: an explicit
# rounding modifier makes the optimizer treat the instruction conservatively), inline asm is opaque to LLVM, and
# without ``.ftz`` denormals are kept, as in PyTorch. ``enable_fp_fusion=False`` is no alternative: it is
# kernel-wide, so it would also change the rest of the epilogue (the GELU's contractions) and the fused output
# would no longer be the unfused one's gated residual bit for bit. So exact, no 1-ulp tolerance.
_MUL_RN = gl.constexpr("mul.rn.f32 $0, $1, $2;")
_ADD_RN = gl.constexpr("add.rn.f32 $0, $1, $2;")


@gluon.jit
def _gated_residual(y, t_s, o_s, ok_s, res_ptr, gate_ptr, M, N, RPG, HAS_GATE: gl.constexpr):
    """``round(float(residual[t, o]) + gate[t // RPG, o] · float(y))`` for a store tile ``y (BW, BT)`` already
    rounded to the out dtype (what the unfused layer stores), channels ``o_s`` (valid ``ok_s``) × tokens ``t_s``;
    the residual has out's indexing (token-major rows of N channels). The product comes first and the residual
    is loaded after it, so gate and residual tiles are not live together (sm_90a, W4 + Monarch + gate: 24 bytes
    of epilogue spills instead of 72; none in the K-loop)."""
    m_s = ok_s[:, None] & (t_s < M)[None, :]
    yf = y.to(gl.float32)
    if HAS_GATE:
        g = gl.load(gate_ptr + (t_s // RPG).to(gl.int64)[None, :] * N + o_s[:, None], mask=m_s, other=0.0)
        yf = gl.inline_asm_elementwise(_MUL_RN, "=f,f,f", [g, yf], dtype=gl.float32, is_pure=True, pack=1)
    res = gl.load(res_ptr + t_s.to(gl.int64)[None, :] * N + o_s[:, None], mask=m_s, other=0.0).to(gl.float32)
    s = gl.inline_asm_elementwise(_ADD_RN, "=f,f,f", [res, yf], dtype=gl.float32, is_pure=True, pack=1)
    return s.to(y.dtype)


@gluon.jit
def _epilogue(acc, t0, n0, sa_ptr, za_ptr, ra_ptr, sw_ptr, zw_ptr, cw_ptr, bias_ptr, z_ptr, w2_ptr, res_ptr,
              gate_ptr, out_ptr, M, N, K, NBLK, NB, BR, RPG, mma: gl.constexpr, BW: gl.constexpr, BRC: gl.constexpr,
              HAS_BIAS: gl.constexpr, HAS_BRANCH: gl.constexpr, GELU: gl.constexpr, HAS_RESIDUAL: gl.constexpr,
              HAS_GATE: gl.constexpr, num_warps: gl.constexpr):
    o, ok = _channels(n0, N, BW, gl.SliceLayout(1, mma))
    rows_t = t0 + gl.arange(0, _BT, layout=gl.SliceLayout(0, mma))
    tmask = rows_t < M
    zw = gl.load(zw_ptr + o, mask=ok, other=0)
    cw = gl.load(cw_ptr + o, mask=ok, other=0)
    sw = gl.load(sw_ptr + o, mask=ok, other=0.0)
    za = gl.load(za_ptr + rows_t, mask=tmask, other=0)
    ra = gl.load(ra_ptr + rows_t, mask=tmask, other=0)
    sa = gl.load(sa_ptr + rows_t, mask=tmask, other=0.0)
    corr = acc - zw[:, None] * ra[None, :] - cw[:, None] * za[None, :] + K * zw[:, None] * za[None, :]
    y = corr.to(gl.float32) * sa[None, :] * sw[:, None]
    # from here on, rows along channels: a thread holds 8 consecutive tile rows of one token (16-byte stores)
    st: gl.constexpr = gl.BlockedLayout([8, 1], [4, 8], [1, num_warps], [0, 1])
    if HAS_BRANCH:
        # Monarch stage 2 accumulates into the tile itself: y moves (once, through shared memory) to the mma_v2
        # layout, the bf16 products of the overlapped blocks add into it, and it moves on to the store layout.
        WM: gl.constexpr = min(BW // 32, num_warps)
        mma2: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[WM, num_warps // WM],
                                                       instr_shape=[16, 8])
        ld: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])  # (BW, BRC), c fastest
        ldt: gl.constexpr = gl.BlockedLayout([8, 1], [4, 8], [1, num_warps], [0, 1])  # (BRC, BT), c fastest
        y = _branch_add(gl.convert_layout(y, mma2), n0, rows_t, tmask, z_ptr, w2_ptr, N, NBLK, NB, BR, BW, BRC,
                        mma2, ld, ldt)
    y = gl.convert_layout(y, st)
    o_s, ok_s = _channels(n0, N, BW, gl.SliceLayout(1, st))
    if HAS_BIAS:
        y = y + gl.load(bias_ptr + o_s, mask=ok_s, other=0.0)[:, None]
    if GELU:
        u = 0.7978845608028654 * (y + 0.044715 * y * y * y)
        u = gl.minimum(gl.maximum(u, -15.0), 15.0)
        y = 0.5 * y * (2.0 - 2.0 / (gl.exp(2.0 * u) + 1.0))
    t_s = t0 + gl.arange(0, _BT, layout=gl.SliceLayout(0, st))
    if HAS_RESIDUAL:  # from y as the unfused layer stores it (rounded to the out dtype); the store's .to is a no-op
        y = _gated_residual(y.to(out_ptr.dtype.element_ty), t_s, o_s, ok_s, res_ptr, gate_ptr, M, N, RPG, HAS_GATE)
    gl.store(out_ptr + t_s.to(gl.int64)[None, :] * N + o_s[:, None], y.to(out_ptr.dtype.element_ty),
             mask=ok_s[:, None] & (t_s < M)[None, :])


@gluon.jit
def _finish(acc, t0, n0, sa_ptr, za_ptr, ra_ptr, sw_ptr, zw_ptr, cw_ptr, bias_ptr, z_ptr, w2_ptr, res_ptr,
            gate_ptr, out_ptr, M, N, K, NBLK, NB, BR, RPG, mma: gl.constexpr, BW: gl.constexpr, BRC: gl.constexpr,
            HAS_BIAS: gl.constexpr, HAS_BRANCH: gl.constexpr, GELU: gl.constexpr, HAS_RESIDUAL: gl.constexpr,
            HAS_GATE: gl.constexpr, EPILOGUE: gl.constexpr, num_warps: gl.constexpr):
    """The epilogue, or for the probe ``bf16(acc)`` stored as it is."""
    if EPILOGUE:
        _epilogue(acc, t0, n0, sa_ptr, za_ptr, ra_ptr, sw_ptr, zw_ptr, cw_ptr, bias_ptr, z_ptr, w2_ptr, res_ptr,
                  gate_ptr, out_ptr, M, N, K, NBLK, NB, BR, RPG, mma, BW, BRC, HAS_BIAS, HAS_BRANCH, GELU,
                  HAS_RESIDUAL, HAS_GATE, num_warps)
    else:
        st: gl.constexpr = gl.BlockedLayout([8, 1], [4, 8], [1, num_warps], [0, 1])
        y = gl.convert_layout(acc.to(gl.float32).to(gl.bfloat16), st)
        o_s, ok_s = _channels(n0, N, BW, gl.SliceLayout(1, st))
        t_s = t0 + gl.arange(0, _BT, layout=gl.SliceLayout(0, st))
        gl.store(out_ptr + t_s.to(gl.int64)[None, :] * N + o_s[:, None], y, mask=ok_s[:, None] & (t_s < M)[None, :])


@gluon.jit
def _split_k_finish(acc, tile, t0, n0, ws_ptr, cnt_ptr, sa_ptr, za_ptr, ra_ptr, sw_ptr, zw_ptr, cw_ptr, bias_ptr,
                    z_ptr, w2_ptr, res_ptr, gate_ptr, out_ptr, M, N, K, NBLK, NB, BR, RPG, mma: gl.constexpr,
                    BW: gl.constexpr, BRC: gl.constexpr, SPLIT: gl.constexpr, HAS_BIAS: gl.constexpr,
                    HAS_BRANCH: gl.constexpr, GELU: gl.constexpr, HAS_RESIDUAL: gl.constexpr,
                    HAS_GATE: gl.constexpr, EPILOGUE: gl.constexpr, num_warps: gl.constexpr):
    """Split-K as gemm.py: add the int32 partial into the workspace (exact, order-free); the last of the tile's
    SPLIT work items (acq_rel counter) takes the sum with ``atomic_xchg(ws, 0)`` (leaving it zeroed), resets
    the counter and finishes the tile."""
    o, ok = _channels(n0, N, BW, gl.SliceLayout(1, mma))
    rows_t = t0 + gl.arange(0, _BT, layout=gl.SliceLayout(0, mma))
    m2 = ok[:, None] & (rows_t < M)[None, :]
    ws = ws_ptr + rows_t.to(gl.int64)[None, :] * N + o[:, None]
    gl.atomic_add(ws, acc, mask=m2, sem="relaxed")
    gl.thread_barrier()
    arrived = gl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel")
    if arrived == SPLIT - 1:
        gl.thread_barrier()
        total = gl.atomic_xchg(ws, gl.zeros_like(acc), mask=m2, sem="acq_rel")
        gl.atomic_xchg(cnt_ptr + tile, 0)
        _finish(total, t0, n0, sa_ptr, za_ptr, ra_ptr, sw_ptr, zw_ptr, cw_ptr, bias_ptr, z_ptr, w2_ptr, res_ptr,
                gate_ptr, out_ptr, M, N, K, NBLK, NB, BR, RPG, mma, BW, BRC, HAS_BIAS, HAS_BRANCH, GELU,
                HAS_RESIDUAL, HAS_GATE, EPILOGUE, num_warps)


@gluon.jit
def _gluon_gemm_kernel(a_desc, w_ptr, sa_ptr, za_ptr, ra_ptr, sw_ptr, zw_ptr, cw_ptr, bias_ptr, z_ptr, w2_ptr,
                       res_ptr, gate_ptr, out_ptr, ws_ptr, cnt_ptr, M, N, K, NBLK, NB, BR, RPG,
                       BITS: gl.constexpr, BRC: gl.constexpr, STAGES: gl.constexpr,
                       SPLIT: gl.constexpr,
                       HAS_BIAS: gl.constexpr, HAS_BRANCH: gl.constexpr, GELU: gl.constexpr,
                       HAS_RESIDUAL: gl.constexpr, HAS_GATE: gl.constexpr, EPILOGUE: gl.constexpr,
                       num_warps: gl.constexpr):
    """``EPILOGUE=False`` is the probe: the main loop alone, storing ``bf16(acc)`` (no scales, no branch).
    ``HAS_RESIDUAL`` (``res_ptr``, out's dtype and indexing) and ``HAS_GATE`` (``gate_ptr`` float32 ``(G, N)``,
    ``RPG = M // G`` tokens per gate row) fuse the gated residual into the store."""
    BW: gl.constexpr = 16 * num_warps
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                  instr_shape=[16, _BT, 32])
    dot: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=4)

    a_smem = gl.allocate_shared_memory(gl.int8, [STAGES, _BT, _BK], a_desc.layout)
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(bars.index(i), count=1)

    n_tiles_w = gl.cdiv(N, BW)
    n_tiles = gl.cdiv(M, _BT) * n_tiles_w
    n_work = n_tiles * SPLIT
    pid = gl.program_id(0)
    nprog = gl.num_programs(0)
    PER = gl.cdiv(K, _BK) // SPLIT  # K-steps per work item (the host makes SPLIT divide the K-steps)
    total = gl.cdiv(n_work - pid, nprog) * PER  # this program's (work item, K-step) sequence

    # Two cursors run ahead of the MMA over that sequence: the TMA ring (STAGES − 1 steps ahead) and the weight
    # registers (2 steps ahead). They step without divisions: coordinates are recomputed only when a cursor
    # moves to its next work item.
    ka, wka, ta, na, kba = _cursor(pid, n_tiles_w, BW, SPLIT, PER)
    for s in gl.static_range(STAGES - 1):  # fill the ring
        mbarrier.expect(bars.index(s), _BT * _BK, pred=s < total)
        tma.async_copy_global_to_shared(a_desc, [ta, (kba + ka) * _BK], bars.index(s), a_smem.index(s),
                                        pred=s < total)
        ka, wka, ta, na, kba = _step(ka, wka, ta, na, kba, PER, nprog, n_tiles_w, BW, SPLIT)
    kw, wkw, tw, nw, kbw = _cursor(pid, n_tiles_w, BW, SPLIT, PER)
    wb0 = _load_weight_words(w_ptr, nw, kbw + kw, N, K, BW, BITS, num_warps)
    kw, wkw, tw, nw, kbw = _step(kw, wkw, tw, nw, kbw, PER, nprog, n_tiles_w, BW, SPLIT)
    wb1 = _load_weight_words(w_ptr, nw, kbw + kw, N, K, BW, BITS, num_warps)
    kw, wkw, tw, nw, kbw = _step(kw, wkw, tw, nw, kbw, PER, nprog, n_tiles_w, BW, SPLIT)

    acc = gl.zeros([BW, _BT], gl.int32, layout=mma)
    it = 0
    for work in range(pid, n_work, nprog):
        t0, n0, kb = _work_coords(work, n_tiles_w, BW, SPLIT, PER)
        for ki in range(PER):
            wb2 = _load_weight_words(w_ptr, nw, kbw + kw, N, K, BW, BITS, num_warps)
            kw, wkw, tw, nw, kbw = _step(kw, wkw, tw, nw, kbw, PER, nprog, n_tiles_w, BW, SPLIT)
            wd = _unpack(wb0, BW, BITS, dot, num_warps)
            slot = it % STAGES
            mbarrier.wait(bars.index(slot), (it // STAGES) & 1)
            acc = warpgroup_mma(wd, a_smem.index(slot).permute((1, 0)), acc, use_acc=ki > 0, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
            # the previous wgmma is done: its ring slot takes the load STAGES−1 steps ahead
            sn = (it + STAGES - 1) % STAGES
            more = it + STAGES - 1 < total
            mbarrier.expect(bars.index(sn), _BT * _BK, pred=more)
            tma.async_copy_global_to_shared(a_desc, [ta, (kba + ka) * _BK], bars.index(sn), a_smem.index(sn),
                                            pred=more)
            ka, wka, ta, na, kba = _step(ka, wka, ta, na, kba, PER, nprog, n_tiles_w, BW, SPLIT)
            wb0 = wb1
            wb1 = wb2
            it += 1
        # unconditional at the end of a work item, so every path reaches the next wgmma in the same state (a
        # wait under a branch makes ptxas inject a full wait in every iteration)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        if SPLIT > 1:
            _split_k_finish(acc, work // SPLIT, t0, n0, ws_ptr, cnt_ptr, sa_ptr, za_ptr, ra_ptr, sw_ptr, zw_ptr,
                            cw_ptr, bias_ptr, z_ptr, w2_ptr, res_ptr, gate_ptr, out_ptr, M, N, K, NBLK, NB, BR, RPG,
                            mma, BW, BRC, SPLIT, HAS_BIAS, HAS_BRANCH, GELU, HAS_RESIDUAL, HAS_GATE, EPILOGUE,
                            num_warps)
        else:
            _finish(acc, t0, n0, sa_ptr, za_ptr, ra_ptr, sw_ptr, zw_ptr, cw_ptr, bias_ptr, z_ptr, w2_ptr, res_ptr,
                    gate_ptr, out_ptr, M, N, K, NBLK, NB, BR, RPG, mma, BW, BRC, HAS_BIAS, HAS_BRANCH, GELU,
                    HAS_RESIDUAL, HAS_GATE, EPILOGUE, num_warps)
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(bars.index(i))


# ---------------------------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.lru_cache(maxsize=None)
def _is_sm90(index: int) -> bool:
    return torch.cuda.get_device_capability(index) == (9, 0)


def usable(codes: torch.Tensor, bits: int) -> bool:
    """The Gluon kernel runs: compiled mode, an sm_90 device, a supported bit-width, TMA-aligned rows (K and
    the base address multiples of 16 bytes)."""
    return (not INTERPRET and codes.is_cuda and bits in GLUON_BITS and codes.shape[1] > 0
            and codes.shape[1] % 16 == 0 and codes.data_ptr() % 16 == 0 and codes.shape[0] > 0
            and _is_sm90(codes.device.index or 0))


def split_k(n_tiles: int, k_steps: int, sms: int, min_steps: int = 3) -> int:
    """Split-K factor: the divisor ``s`` of the K-steps (keeping ≥ ``min_steps`` per work item, as the ring needs
    a few to fill) that minimises the critical path of the persistent grid: ``⌈tiles·s / SMs⌉`` waves of
    ``steps / s`` K-steps plus about one step of ring fill per item, and one step for the fix-up when split;
    ties go to the smaller ``s`` (fewer atomics). 1 when the tiles alone fill the GPU. Example, fc2 at M = 256
    (18 tiles, 36 steps, 132 SMs): s = 9 would make 162 items, two waves of 4 steps; s = 6 makes 108 items, one
    wave of 6."""
    if n_tiles >= sms:
        return 1

    def path(s: int) -> float:
        return -(-n_tiles * s // sms) * (k_steps / s + 1) + (1 if s > 1 else 0)

    cands = [s for s in range(1, k_steps + 1) if k_steps % s == 0 and (s == 1 or k_steps // s >= min_steps)]
    return min(cands, key=lambda s: (path(s), s))


def _act_descriptor(codes: torch.Tensor) -> TensorDescriptor:
    layout = gl.NVMMASharedLayout.get_default_for([BT, BK], gl.int8)
    return TensorDescriptor.from_tensor(codes, [BT, BK], layout)


def packed_gemm(codes: torch.Tensor, sa: torch.Tensor, za: torch.Tensor, ra: torch.Tensor, packed: torch.Tensor,
                bits: int, n: int, sw: torch.Tensor, zw: torch.Tensor, cw: torch.Tensor, *,
                bias: torch.Tensor | None = None, z: torch.Tensor | None = None, w2: torch.Tensor | None = None,
                gelu: bool = False, out_dtype: torch.dtype = torch.bfloat16, epilogue: bool = True,
                split: int | None = None, residual: torch.Tensor | None = None,
                gate: torch.Tensor | None = None) -> torch.Tensor:
    """Same contract as ``gemm.packed_gemm`` (layout-v1 weight in; its fragment layout is derived and cached).
    ``epilogue=False`` runs the probe (main loop only; the output is ``bf16(Σ qa·u)``). ``split`` overrides the
    split-K choice (it must divide the number of 128-deep K-steps).

    ``residual`` (contiguous ``(M, N)`` in ``out_dtype``) and ``gate`` (contiguous float32 ``(G, N)``, ``G``
    dividing M; token ``m`` takes gate row ``m // (M // G)``) fuse the gated residual into the store:
    ``out = out_dtype(float(residual) + gate · float(y))`` with ``y`` the usual output already rounded to
    ``out_dtype``, the product and the sum each rounded to float32 (``reference.gated_residual``, bit for bit;
    without ``gate``, ``residual + y``). ``residual`` is only read."""
    m, k = codes.shape
    if out_dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"out_dtype must be bfloat16, float16 or float32, got {out_dtype}")
    rpg = _check_residual(residual, gate, m, n, out_dtype, epilogue, codes.device)
    frag, zw2, cw2 = fragment_weights(packed, bits, n, k, zw, cw)
    out = runtime.empty((m, n), out_dtype if epilogue else torch.bfloat16, codes.device)
    nblk, nb, br = 1, n, 1
    if w2 is not None:
        nblk, nb, br = w2.shape
        if z is None or z.shape != (m, nblk, br):
            raise ValueError(f"z must be (M={m}, b={nblk}, b·r={br}) for w2 {tuple(w2.shape)}")
        z, w2 = z.contiguous(), w2.contiguous()
    n_tiles = triton.cdiv(m, BT) * triton.cdiv(n, 16 * NUM_WARPS)
    sms = _sm_count(codes.device.index or 0)
    split = split_k(n_tiles, triton.cdiv(k, BK), sms) if split is None else split
    if triton.cdiv(k, BK) % split:
        raise ValueError(f"split={split} must divide the {triton.cdiv(k, BK)} K-steps")
    ws, cnt = splitk_workspace(codes.device, m * n if split > 1 else 1, n_tiles)
    grid = (min(n_tiles * split, sms),)
    dummy = sa
    _gluon_gemm_kernel[grid](
        _act_descriptor(codes), frag.view(torch.int32), sa, za, ra, sw, zw2, cw2, bias if bias is not None else dummy,
        z if z is not None else dummy, w2 if w2 is not None else dummy,
        residual if residual is not None else dummy, gate if gate is not None else dummy, out, ws, cnt, m, n, k,
        nblk, nb, br, rpg, BITS=bits, BRC=min(max(16, next_pow2(br)), 32), STAGES=STAGES, SPLIT=split,
        HAS_BIAS=bias is not None, HAS_BRANCH=w2 is not None, GELU=bool(gelu),
        HAS_RESIDUAL=residual is not None, HAS_GATE=gate is not None, EPILOGUE=epilogue, num_warps=NUM_WARPS)
    return out


def _check_residual(residual: torch.Tensor | None, gate: torch.Tensor | None, m: int, n: int,
                    out_dtype: torch.dtype, epilogue: bool, device: torch.device) -> int:
    """Rows per gate row (``M // G``; 1 when unused) after checking what the kernel reads as raw rows
    (``ops.packed_linear`` checks the same for its callers; this guards direct calls from reading out of
    bounds)."""
    if residual is None:
        if gate is not None:
            raise ValueError("gate needs residual")
        return 1
    if not epilogue:
        raise ValueError("the probe (epilogue=False) stores the raw accumulator: no residual")
    if (residual.shape != (m, n) or residual.dtype != out_dtype or not residual.is_contiguous()
            or residual.device != device):
        raise ValueError(f"residual must be contiguous ({m}, {n}) {out_dtype} on {device}, got "
                         f"{tuple(residual.shape)} {residual.dtype} on {residual.device}")
    if gate is None:
        return 1
    if (gate.dim() != 2 or gate.shape[1] != n or gate.shape[0] < 1 or m % gate.shape[0]
            or gate.dtype != torch.float32 or not gate.is_contiguous() or gate.device != device):
        raise ValueError(f"gate must be contiguous float32 (G, {n}) with G dividing M={m}, on {device}, got "
                         f"{tuple(gate.shape)} {gate.dtype} on {gate.device}")
    return m // gate.shape[0]


def aot_builds():
    """Specializations for ``aot.py``: the probe (W4A8, no epilogue), the full kernel per bit-width, and the
    gated residual (a DiT block's attention projection / fc2: bias, no GELU, one gate row per sample)."""
    from .aot import KernelBuild

    m, k, n = 2048, 1152, 4608
    codes = torch.empty(m, k, dtype=torch.int8)
    desc = _act_descriptor(codes)
    f32, i32 = torch.empty(m, dtype=torch.float32), torch.empty(m, dtype=torch.int32)
    fn, inn = torch.empty(n, dtype=torch.float32), torch.empty(n, dtype=torch.int32)
    z = torch.empty(m, 32, 32, dtype=torch.bfloat16)
    w2 = torch.empty(32, n // 32, 32, dtype=torch.float32)
    out = torch.empty(m, n, dtype=torch.bfloat16)
    gate = torch.empty(8, n, dtype=torch.float32)  # 8 samples of 256 tokens
    # name, bits, epilogue, branch, split, gated residual
    cases = [("gluon_probe[W4A8 main loop, no epilogue]", 4, False, False, 1, False),
             ("gluon_gemm[W4, bias + gelu]", 4, True, False, 1, False),
             ("gluon_gemm[W4, monarch b=32 r=1 + bias + gelu]", 4, True, True, 1, False),
             ("gluon_gemm[W8, monarch b=32 r=1 + bias + gelu, split-K 3]", 8, True, True, 3, False),
             ("gluon_gemm[W2, bias + gelu]", 2, True, False, 1, False),
             ("gluon_gemm[W4, bias + gated residual]", 4, True, False, 1, True)]
    for name, bits, epi, branch, split, gated in cases:
        c = fields_per_byte(bits)
        frag = torch.empty(n, k // c // 4, dtype=torch.int32)
        yield KernelBuild(name, _gluon_gemm_kernel,
                          dict(a_desc=desc, w_ptr=frag, sa_ptr=f32, za_ptr=i32, ra_ptr=i32, sw_ptr=fn, zw_ptr=inn,
                               cw_ptr=inn, bias_ptr=fn, z_ptr=z, w2_ptr=w2, res_ptr=out,
                               gate_ptr=gate if gated else f32, out_ptr=out, ws_ptr=inn, cnt_ptr=inn,
                               M=m, N=n, K=k,
                               NBLK=32 if branch else 1, NB=n // 32 if branch else n,
                               BR=32 if branch else 1, RPG=m // gate.shape[0] if gated else 1),
                          dict(BITS=bits, BRC=32, STAGES=STAGES, SPLIT=split,
                               HAS_BIAS=epi, HAS_BRANCH=branch, GELU=epi and not gated, HAS_RESIDUAL=gated,
                               HAS_GATE=gated, EPILOGUE=epi, num_warps=NUM_WARPS),
                          num_warps=NUM_WARPS, num_stages=1, gluon=True, quick=name != "gluon_gemm[W4, bias + gelu]"), (90,)
