"""Plain-Triton packed GEMM with the fused epilogue: the portable path (Ampere, Ada, Hopper, the interpreter).

Math (docs/format.md), for int8 activation codes ``qa (M, K)`` and weight codes ``qw (N, K)`` unpacked from
layout v1 in registers:

    acc[m,n]  = Σ_k qa[m,k]·qw[n,k]                                            exact int32 (tl.dot s8×s8→s32)
    corr[m,n] = acc − zw[n]·ra[m] − za[m]·cw[n] + K·za[m]·zw[n]                 exact int32 (wrapping arithmetic,
                                                                               final value fits for K ≤ MAX_K)
    y[m,n]    = corr·sa[m]·sw[n]  [+ Σ_c w2[j, l, c]·z[m, j, c]]  [+ bias[n]]  [GELU(tanh)]    float32
                                  └ Monarch stage 2, for n = j·Nb + l ┘
    out[m,n]  = y  rounded to the output type, or with a gated residual (a DiT block's ``x + gate ⊙ proj(·)``)
                res[m,n] + gate[m // R, n]·ŷ,  ŷ = y rounded to the output type, read back as float32; the
                product and the sum each rounded (never contracted into an FMA), then rounded to the output type

Weights: 8-bit rows are loaded as they are; 2/4-bit fields come from word ``k // (32/bits)`` at bit
``bits·(k mod 32/bits)``; 3-bit from the two low planes and the high plane of group ``k // 32``. Fields are
offset binary (code = field − 2^(bits−1)). Padding and masked lanes need no care on the weight side: the
activation tile is masked to 0 outside K.

Tiles ``BM × BN × BK`` (tokens × channels × K), channels contiguous. The Monarch branch's output blocks are
contiguous too (``Nb`` channels each, branches/monarch.py), so a channel tile overlaps only the blocks
``j = n₀ // Nb … (n₀ + BN − 1) // Nb``; stage 2 is one 2-D dot per overlapped block,
``z[:, j, :] (BM × b·r) · w2[j]ᵀ`` with the columns of channels outside block j masked to zero (bf16 on
tensor cores, fp32 accumulate; fp32 under the interpreter). That is ``b·r`` MACs per output per overlapped
block (1–2 blocks for the DiT-XL/2 shapes at b = 32 and ``BN ≤ Nb``), and the tile reads z only for its own
blocks.

Split-K (small M): ``SPLIT_K`` programs share a tile; each adds its int32 partial into a workspace with atomics
(exact, order-free), the last to arrive (per-tile counter, acq_rel) takes the sum with ``atomic_xchg(ws, 0)``,
which also leaves the workspace zeroed for the next call (safe to replay in a CUDA graph), resets the counter
and runs the epilogue. Program order is grouped along M (``GROUP_M``) so a wave reuses weight tiles from L2.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .kernel_math import add_rn, gelu_tanh, mul_rn, to_out
from . import runtime
from .runtime import INTERPRET, check_device, next_pow2


@triton.jit
def _weight_tile(w_ptr, o, nmask, kt, K, KW, BK: tl.constexpr, BITS: tl.constexpr):
    """int8 weight codes ``(BK, BN)`` of K-step ``kt`` for channels ``o``, unpacked from layout v1. Packed words
    are loaded once (``(BK·bits/32, BN)`` int32) and expanded in registers: a reshape of ``(words, fields)`` is
    exactly v1's order ``k = word·(32/bits) + field``."""
    row = o.to(tl.int64)[None, :] * KW
    if BITS == 8:
        ks = kt * BK + tl.arange(0, BK)
        return tl.load(w_ptr + row + ks[:, None], mask=(ks < K)[:, None] & nmask[None, :], other=0)
    elif BITS == 3:  # per 32-code group: two 2-bit low planes (codes 0-15, 16-31) and one high-bit plane
        G: tl.constexpr = BK // 32
        g = kt * G + tl.arange(0, G)
        gmask = (g * 3 < KW)[:, None] & nmask[None, :]
        h = tl.arange(0, 2)
        lw = tl.load(w_ptr + row[None, :, :] + (g * 3)[:, None, None] + h[None, :, None],
                     mask=gmask[:, None, :], other=0)  # (G, 2, BN)
        hw = tl.load(w_ptr + row + (g * 3 + 2)[:, None], mask=gmask, other=0)  # (G, BN)
        low = (lw[:, :, None, :] >> (tl.arange(0, 16) * 2)[None, None, :, None]) & 3  # (G, 2, 16, BN)
        high = (hw[:, None, :] >> tl.arange(0, 32)[None, :, None]) & 1  # (G, 32, BN)
        u = tl.reshape(low, (BK, lw.shape[2])) | (tl.reshape(high, (BK, hw.shape[1])) << 2)
        return (u - 4).to(tl.int8)
    else:
        PER: tl.constexpr = 32 // BITS
        WK: tl.constexpr = BK // PER
        kw = kt * WK + tl.arange(0, WK)
        wd = tl.load(w_ptr + row + kw[:, None], mask=(kw < KW)[:, None] & nmask[None, :], other=0)  # (WK, BN)
        u = (wd[:, None, :] >> (tl.arange(0, PER) * BITS)[None, :, None]) & ((1 << BITS) - 1)  # (WK, PER, BN)
        return (tl.reshape(u, (BK, wd.shape[1])) - (1 << (BITS - 1))).to(tl.int8)


@triton.jit
def _dot_f32(a, b, acc, BRANCH_F32: tl.constexpr):
    if BRANCH_F32:  # the interpreter computes bf16 dots wrongly
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), acc)


@triton.jit
def _monarch_stage2(y, z_ptr, w2_ptr, rows, mmask, o, nmask, n0, N, NBLK, NB, BR, BN: tl.constexpr,
                    BRC: tl.constexpr, BRANCH_F32: tl.constexpr):
    """``y + Σ_c w2[j, l, c]·z[m, j, c]`` over the tile's channels ``o = n₀ … n₀ + BN − 1`` (``o = j·Nb + l``, so
    w2's row ``(j, l)`` is row ``o`` of w2 viewed as ``(b·Nb, b·r)``): one masked 2-D dot per Monarch block the
    tile overlaps."""
    cc = tl.arange(0, BRC)
    for j in range(n0 // NB, (tl.minimum(n0 + BN, N) - 1) // NB + 1):  # b·Nb ≥ N: j stays below b
        sel = nmask & (o >= j * NB) & (o < (j + 1) * NB)  # this tile's channels of block j
        for c0 in range(0, BR, BRC):
            cz = c0 + cc
            z2 = tl.load(z_ptr + rows.to(tl.int64)[:, None] * (NBLK * BR) + j * BR + cz[None, :],
                         mask=mmask[:, None] & (cz < BR)[None, :], other=0.0)
            w2t = tl.load(w2_ptr + o.to(tl.int64)[None, :] * BR + cz[:, None],
                          mask=(cz < BR)[:, None] & sel[None, :], other=0.0)
            y = _dot_f32(z2, w2t, y, BRANCH_F32)
    return y


@triton.jit
def _epilogue(acc, rows, mmask, o, nmask, n0,
              sa_ptr, za_ptr, ra_ptr, sw_ptr, zw_ptr, cw_ptr, bias_ptr, z_ptr, w2_ptr, out_ptr, res_ptr, gate_ptr,
              N, K, NBLK, NB, BR, GATE_ROWS,
              HAS_BIAS: tl.constexpr, HAS_BRANCH: tl.constexpr, GELU: tl.constexpr, HAS_RES: tl.constexpr,
              HAS_GATE: tl.constexpr, BN: tl.constexpr, BRC: tl.constexpr, BRANCH_F32: tl.constexpr):
    za = tl.load(za_ptr + rows, mask=mmask, other=0)
    ra = tl.load(ra_ptr + rows, mask=mmask, other=0)
    sa = tl.load(sa_ptr + rows, mask=mmask, other=0.0)
    zw = tl.load(zw_ptr + o, mask=nmask, other=0)
    cw = tl.load(cw_ptr + o, mask=nmask, other=0)
    sw = tl.load(sw_ptr + o, mask=nmask, other=0.0)
    corr = acc - zw[None, :] * ra[:, None] - za[:, None] * cw[None, :] + K * za[:, None] * zw[None, :]
    y = corr.to(tl.float32) * sa[:, None] * sw[None, :]
    if HAS_BRANCH:
        y = _monarch_stage2(y, z_ptr, w2_ptr, rows, mmask, o, nmask, n0, N, NBLK, NB, BR, BN, BRC, BRANCH_F32)
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + o, mask=nmask, other=0.0).to(tl.float32)[None, :]
    if GELU:
        y = gelu_tanh(y)
    off = rows.to(tl.int64)[:, None] * N + o[None, :]
    m2 = mmask[:, None] & nmask[None, :]
    DT: tl.constexpr = out_ptr.dtype.element_ty
    y = to_out(y, DT, BRANCH_F32)   # BRANCH_F32 doubles as "interpreted" (it is set exactly then)
    if HAS_RES:
        yr = y.to(tl.float32)
        if HAS_GATE:
            g = tl.load(gate_ptr + (rows // GATE_ROWS).to(tl.int64)[:, None] * N + o[None, :], mask=m2, other=0.0)
            yr = mul_rn(g, yr, BRANCH_F32)
        r = tl.load(res_ptr + off, mask=m2, other=0.0).to(tl.float32)
        y = to_out(add_rn(r, yr, BRANCH_F32), DT, BRANCH_F32)
    tl.store(out_ptr + off, y, mask=m2)


@triton.jit(do_not_specialize=["M_BUCKET"])  # an autotune key only: no recompile per bucket
def _packed_gemm_kernel(a_ptr, w_ptr, sa_ptr, za_ptr, ra_ptr, sw_ptr, zw_ptr, cw_ptr,
                        bias_ptr, z_ptr, w2_ptr, out_ptr, res_ptr, gate_ptr, ws_ptr, cnt_ptr,
                        M, N, K, KW, NBLK, NB, BR, GATE_ROWS, M_BUCKET,
                        BITS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_BRANCH: tl.constexpr, GELU: tl.constexpr,
                        HAS_RES: tl.constexpr, HAS_GATE: tl.constexpr, BRC: tl.constexpr, BRANCH_F32: tl.constexpr,
                        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT_K: tl.constexpr,
                        GROUP_M: tl.constexpr):
    n_tiles_n = tl.cdiv(N, BN)
    n_tiles_m = tl.cdiv(M, BM)
    pid = tl.program_id(0)
    in_group = GROUP_M * n_tiles_n
    first_m = (pid // in_group) * GROUP_M
    gsize = tl.minimum(n_tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % gsize
    pid_n = (pid % in_group) // gsize

    n0 = pid_n * BN
    o = n0 + tl.arange(0, BN)
    nmask = o < N
    rows = pid_m * BM + tl.arange(0, BM)
    mmask = rows < M

    k_tiles = tl.cdiv(K, BK)
    per_split = tl.cdiv(k_tiles, SPLIT_K)
    kt0 = tl.program_id(1) * per_split
    kt1 = tl.minimum(kt0 + per_split, k_tiles)
    acc = tl.zeros([BM, BN], dtype=tl.int32)
    lane_k = tl.arange(0, BK)
    for kt in range(kt0, kt1):
        ks = kt * BK + lane_k
        a = tl.load(a_ptr + rows.to(tl.int64)[:, None] * K + ks[None, :], mask=mmask[:, None] & (ks < K)[None, :],
                    other=0)
        w = _weight_tile(w_ptr, o, nmask, kt, K, KW, BK, BITS)
        acc = tl.dot(a, w, acc, out_dtype=tl.int32)

    if SPLIT_K > 1:
        m2 = mmask[:, None] & nmask[None, :]
        ws = ws_ptr + rows.to(tl.int64)[:, None] * N + o[None, :]
        tl.atomic_add(ws, acc, mask=m2, sem="relaxed")
        tl.debug_barrier()
        tile = pid_m * n_tiles_n + pid_n
        arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:  # the last split: collect, clean up, finish
            tl.debug_barrier()
            acc = tl.atomic_xchg(ws, tl.zeros([BM, BN], dtype=tl.int32), mask=m2, sem="acq_rel")
            tl.atomic_xchg(cnt_ptr + tile, 0)
            _epilogue(acc, rows, mmask, o, nmask, n0, sa_ptr, za_ptr, ra_ptr, sw_ptr, zw_ptr, cw_ptr, bias_ptr,
                      z_ptr, w2_ptr, out_ptr, res_ptr, gate_ptr, N, K, NBLK, NB, BR, GATE_ROWS, HAS_BIAS, HAS_BRANCH, GELU,
                      HAS_RES, HAS_GATE, BN, BRC, BRANCH_F32)
    else:
        _epilogue(acc, rows, mmask, o, nmask, n0, sa_ptr, za_ptr, ra_ptr, sw_ptr, zw_ptr, cw_ptr, bias_ptr,
                  z_ptr, w2_ptr, out_ptr, res_ptr, gate_ptr, N, K, NBLK, NB, BR, GATE_ROWS, HAS_BIAS, HAS_BRANCH, GELU,
                      HAS_RES, HAS_GATE, BN, BRC, BRANCH_F32)


_WORKSPACE: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
# Outgrown workspaces stay allocated: a CUDA graph captured before the growth still adds into (and re-zeroes) the
# old buffers on every replay, so freeing them would let the allocator hand that memory to another tensor.
_RETIRED: list[tuple[torch.Tensor, torch.Tensor]] = []


def splitk_workspace(device: torch.device, numel: int, tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zeroed int32 accumulator and tile counters, grown on demand and kept per device. The kernel leaves both
    zeroed, so one allocation serves every later call and CUDA-graph replays (allocate during warm-up). One
    workspace per device serves one stream at a time: split-K GEMMs on concurrent streams would share it."""
    ws, cnt = _WORKSPACE.get(device, (None, None))
    if ws is None or ws.numel() < numel or cnt.numel() < tiles:
        if ws is not None:
            _RETIRED.append((ws, cnt))
        ws = torch.zeros(max(numel, 0 if ws is None else ws.numel()), dtype=torch.int32, device=device)
        cnt = torch.zeros(max(tiles, 0 if cnt is None else cnt.numel()), dtype=torch.int32, device=device)
        _WORKSPACE[device] = (ws, cnt)
    return ws, cnt


def packed_gemm(codes: torch.Tensor, sa: torch.Tensor, za: torch.Tensor, ra: torch.Tensor,
                packed: torch.Tensor, bits: int, n: int, sw: torch.Tensor, zw: torch.Tensor, cw: torch.Tensor, *,
                bias: torch.Tensor | None = None, z: torch.Tensor | None = None, w2: torch.Tensor | None = None,
                gelu: bool = False, out_dtype: torch.dtype = torch.bfloat16, residual: torch.Tensor | None = None,
                gate: torch.Tensor | None = None, config=None) -> torch.Tensor:
    """``y (M, N)`` in ``out_dtype`` from activation codes ``(M, K)`` and a layout-v1 packed weight ``(N, ·)``.
    ``z (M, b, b·r)`` and ``w2 (b, Nb, b·r)`` fuse Monarch stage 2; ``residual (M, N)`` (``out_dtype``) and
    ``gate`` (float32 ``(G, N)``) the gated residual (checked by ``kernels.ops``). ``config`` (a ``GemmConfig``)
    overrides the tuned choice."""
    from . import autotune

    check_device(codes, packed, z, w2, bias, residual, gate)
    m, k = codes.shape
    if out_dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"out_dtype must be bfloat16, float16 or float32, got {out_dtype}")
    out = runtime.empty((m, n), out_dtype, codes.device)
    if m == 0 or n == 0:
        return out
    nblk, nb, br = 1, n, 1
    if w2 is not None:
        if z is None:
            raise ValueError("monarch_w2 given but no stage-1 output z")
        nblk, nb, br = w2.shape
        if z.shape != (m, nblk, br):
            raise ValueError(f"z must be (M={m}, b={nblk}, b·r={br}) for w2 {tuple(w2.shape)}, got {tuple(z.shape)}")
        z, w2 = z.contiguous(), w2.contiguous()
    brc = min(max(16, next_pow2(br)), 32)
    dummy = sa
    from ..ops import _check_residual   # direct callers too: the kernel reads them as raw rows

    _check_residual(residual, gate, m, n, out_dtype, None, codes.device)
    gate_rows = m // gate.shape[0] if gate is not None else 1
    args = (codes, packed, sa, za, ra, sw, zw, cw,
            bias if bias is not None else dummy, z if z is not None else dummy, w2 if w2 is not None else dummy, out,
            residual if residual is not None else out, gate if gate is not None else dummy)
    meta = dict(BITS=bits, HAS_BIAS=bias is not None, HAS_BRANCH=w2 is not None, GELU=bool(gelu),
                HAS_RES=residual is not None, HAS_GATE=gate is not None, BRC=brc, BRANCH_F32=INTERPRET)
    sizes = (m, n, k, packed.shape[1], nblk, nb, br, gate_rows, next_pow2(m))

    def tiles(bm: int, bn: int) -> int:
        return triton.cdiv(m, bm) * triton.cdiv(n, bn)

    cfg = config or autotune.gemm_config(m, n, k, bits, w2 is not None)
    if cfg is None:  # GPU autotuning over the candidate list (the kernel is wrapped by triton.autotune)
        # split-K configs survive pruning only up to SPLITK_MAX_M rows: no accumulator is needed above that
        ws, cnt = splitk_workspace(codes.device, m * n if m <= autotune.SPLITK_MAX_M else 1, tiles(16, 16))
        autotune.tuned_gemm_kernel()[lambda c: (tiles(c["BM"], c["BN"]), c["SPLIT_K"])](
            *args, ws, cnt, *sizes, **meta)
        return out
    ws, cnt = splitk_workspace(codes.device, m * n if cfg.split_k > 1 else 1, tiles(cfg.bm, cfg.bn))
    _packed_gemm_kernel[(tiles(cfg.bm, cfg.bn), cfg.split_k)](
        *args, ws, cnt, *sizes, **meta, BM=cfg.bm, BN=cfg.bn, BK=cfg.bk, SPLIT_K=cfg.split_k, GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out
