"""Per-token activation quantization, fused with LayerNorm or RMSNorm, adaLN modulate and the Monarch branch's
stage 1.

Math (docs/format.md; all float32, in the oracle's order of operations), for each row ``m`` of ``x (M, K)``:

    x̂     = x                                       [ LayerNorm, no affine:  (x − mean)·rstd,
                                                         or RMSNorm, no affine:  x·rstd with mean = 0 ]
    x̂     = x̂·(1 + scale[g]) + shift[g]              [ adaLN modulate, g = m // (M/G) ]
    z      = P₁·BD₁·x̂                                 [ Monarch stage 1, on the unquantized row ]
    asym:  lo = clip·min(min x̂, 0), hi = clip·max(max x̂, 0), s = (hi − lo)/(qmax − qmin),
           zp = clamp(round(qmin − lo/s))
    sym:   s = clip·max|x̂| / qmax, zp = 0
    q      = clamp(round(x̂/s) + zp, qmin, qmax)      round half to even, true division (``div_rn``)
    rsum   = Σ_k q                                    (the weight zero point's correction)

Monarch stage 1 (branches/monarch.py): ``z[m, j, k·r + s] = Σ_i w1[k, j·r + s, i]·x̂[m, i·b + k]``: per input
block ``k`` a ``(BM, Kb) × (Kb, b·r)`` product over the stride-b gather of the row, accumulated over chunks of
``BKB`` gathered columns (at most 128, fewer when b·r is wide: with one block, the low-rank branch, Kb is all of
K, and a single tile of it would need megabytes of shared memory), whose column ``c = j·r + s`` is stored at
``z[m, c // r, k·r + c % r]`` (P₁ is only the store index).

Tiles: one program owns ``BM`` whole rows and walks K in chunks of ``BK`` columns: [LN: two passes for mean and
variance; RMS: one for the mean square] → one pass for the range and the non-finite flag (with the branch, this pass
walks the ``b`` input blocks instead, ``Kb`` gathered columns each, and computes z on the way) → one pass writing
codes and row sums. Re-reading x costs L2 traffic, not HBM, and keeps registers at ``BM × BK``. Codes are stored one
per byte: the GEMM's MMA reads int8 from shared memory, and nibble-packed activations would need an unpack between
TMA and the MMA (the register round trip that made every plain-Triton W4 layout slower than bf16,
docs/sources.md).

Non-finite rows (after preprocessing) get scale NaN, zero point 0, codes 0 and row sum 0, as the oracle's
``nonfinite="propagate"``; their z holds the NaNs stage 1 produces.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .kernel_math import add_rn, mul_rn, round_half_even
from . import runtime
from .runtime import INTERPRET, check_device, next_pow2


@triton.jit
def _preprocessed(x_ptr, shift_ptr, mscale_ptr, rows, rmask, cols, cmask, K, rows_per_group, mean, rstd,
                  HAS_LN: tl.constexpr, HAS_MOD: tl.constexpr, INTERP: tl.constexpr):
    """float32 ``(BM, BK)`` chunk of x̂; zero outside the valid rows/columns."""
    m2 = rmask[:, None] & cmask[None, :]
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * K + cols[None, :], mask=m2, other=0.0).to(tl.float32)
    if HAS_LN:
        x = (x - mean[:, None]) * rstd[:, None]
    if HAS_MOD:
        goff = (rows // rows_per_group).to(tl.int64)[:, None] * K + cols[None, :]
        sc = tl.load(mscale_ptr + goff, mask=m2, other=0.0).to(tl.float32)
        sh = tl.load(shift_ptr + goff, mask=m2, other=0.0).to(tl.float32)
        x = add_rn(mul_rn(x, 1.0 + sc, INTERP), sh, INTERP)
    return tl.where(m2, x, 0.0)


@triton.jit
def _centred(x_ptr, rows, rmask, cols, K, mean):
    """float32 ``x − mean`` of a ``(BM, BK)`` chunk, zero outside the valid rows/columns."""
    m2 = rmask[:, None] & (cols < K)[None, :]
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * K + cols[None, :], mask=m2, other=0.0)
    return tl.where(m2, x.to(tl.float32) - mean[:, None], 0.0)


@triton.jit
def _range(xh, lo, hi, nbad):
    """Running row minimum, maximum and count of non-finite values over one more chunk."""
    finite = tl.abs(xh) <= 3.4028234663852886e38  # false for NaN and ±inf
    nbad += tl.sum(tl.where(finite, 0, 1), axis=1)
    return tl.minimum(lo, tl.min(xh, axis=1)), tl.maximum(hi, tl.max(xh, axis=1)), nbad


@triton.jit
def _act_quant_kernel(x_ptr, shift_ptr, mscale_ptr, w1_ptr,
                      codes_ptr, scale_ptr, zp_ptr, rsum_ptr, z_ptr,
                      M, K, rows_per_group, ln_eps, clip,
                      KB, NBLK, BR, R,
                      QMIN: tl.constexpr, QMAX: tl.constexpr, SYM: tl.constexpr,
                      HAS_LN: tl.constexpr, HAS_MOD: tl.constexpr, HAS_MONARCH: tl.constexpr,
                      RMS: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, BKB: tl.constexpr, BRP: tl.constexpr,
                      Z_BF16: tl.constexpr, DOT_PREC: tl.constexpr, INTERP: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    rmask = rows < M
    lane = tl.arange(0, BK)
    nchunks = tl.cdiv(K, BK)
    zero_row = tl.zeros([BM], dtype=tl.float32)

    mean = zero_row
    rstd = zero_row
    if HAS_LN:  # two passes (mean, then centred variance): F.layer_norm's biased variance; RMS: mean 0, one pass
        kf = zero_row + K  # float32 K, also when Triton passes K = 1 as a constant
        if not RMS:
            acc = zero_row
            for c in range(nchunks):
                acc += tl.sum(_centred(x_ptr, rows, rmask, c * BK + lane, K, zero_row), axis=1)
            mean = tl.math.div_rn(acc, kf)
        acc = zero_row
        for c in range(nchunks):
            d = _centred(x_ptr, rows, rmask, c * BK + lane, K, mean)
            acc += tl.sum(d * d, axis=1)
        var = tl.math.div_rn(acc, kf)
        rstd = tl.math.div_rn(tl.full([BM], 1.0, tl.float32), tl.sqrt_rn(var + ln_eps))

    # Range and non-finite flag in one pass; with the branch, that pass walks the input blocks (min and max
    # do not care about order) and computes Monarch stage 1 from the same loads.
    lo = zero_row
    hi = zero_row
    nbad = tl.zeros([BM], dtype=tl.int32)
    if HAS_MONARCH:
        lane_b = tl.arange(0, BKB)
        cc = tl.arange(0, BRP)
        for c in range(NBLK):
            u = tl.zeros([BM, BRP], dtype=tl.float32)
            for i0 in range(0, KB, BKB):
                ib = i0 + lane_b
                cols = ib * NBLK + c  # input block c: the row at stride b
                cmask = (ib < KB) & (cols < K)
                xh = _preprocessed(x_ptr, shift_ptr, mscale_ptr, rows, rmask, cols, cmask, K, rows_per_group,
                                   mean, rstd, HAS_LN, HAS_MOD, INTERP)
                lo, hi, nbad = _range(xh, lo, hi, nbad)
                wmask = (cc[:, None] < BR) & (ib[None, :] < KB)
                w1 = tl.load(w1_ptr + (c * BR + cc[:, None]).to(tl.int64) * KB + ib[None, :], mask=wmask,
                             other=0.0)
                u = tl.dot(xh, tl.trans(w1.to(tl.float32)), u, input_precision=DOT_PREC)  # (BM, BRP)
            zoff = rows[:, None].to(tl.int64) * (NBLK * BR) + (cc // R)[None, :] * BR + c * R + (cc % R)[None, :]
            zmask = rmask[:, None] & (cc[None, :] < BR)
            if Z_BF16:
                tl.store(z_ptr + zoff, u.to(tl.bfloat16), mask=zmask)
            else:
                tl.store(z_ptr + zoff, u, mask=zmask)
    else:
        for c in range(nchunks):
            cols = c * BK + lane
            xh = _preprocessed(x_ptr, shift_ptr, mscale_ptr, rows, rmask, cols, cols < K, K, rows_per_group,
                               mean, rstd, HAS_LN, HAS_MOD, INTERP)
            lo, hi, nbad = _range(xh, lo, hi, nbad)
    bad = nbad > 0

    if SYM:
        amax = mul_rn(tl.maximum(-lo, hi), clip, INTERP)
        scale = tl.where(amax > 0, tl.math.div_rn(amax, tl.full([BM], QMAX, tl.float32)), 1.0)
        scale = tl.where(scale > 0, scale, 1.0)  # a tiny range's scale underflows to 0: 1, the oracle's rule
        zpf = zero_row
    else:
        lo_c = mul_rn(lo, clip, INTERP)
        rng = mul_rn(hi, clip, INTERP) - lo_c
        scale = tl.where(rng > 0, tl.math.div_rn(rng, tl.full([BM], QMAX - QMIN, tl.float32)), 1.0)
        scale = tl.where(scale > 0, scale, 1.0)   # (after the first where: ptxas then needs no stack on sm_90a)
        zpf = round_half_even(QMIN - tl.math.div_rn(lo_c, scale))
        zpf = tl.minimum(tl.maximum(zpf, QMIN), QMAX)

    rsum = tl.zeros([BM], dtype=tl.int32)
    for c in range(nchunks):
        cols = c * BK + lane
        cmask = cols < K
        m2 = rmask[:, None] & cmask[None, :]
        xh = _preprocessed(x_ptr, shift_ptr, mscale_ptr, rows, rmask, cols, cmask, K, rows_per_group, mean, rstd,
                           HAS_LN, HAS_MOD, INTERP)
        q = round_half_even(tl.math.div_rn(xh, scale[:, None])) + zpf[:, None]
        q = tl.minimum(tl.maximum(q, QMIN), QMAX)
        q = tl.where(bad[:, None] | ~m2, 0.0, q).to(tl.int32)
        rsum += tl.sum(q, axis=1)
        tl.store(codes_ptr + rows[:, None].to(tl.int64) * K + cols[None, :], q.to(tl.int8), mask=m2)

    tl.store(scale_ptr + rows, tl.where(bad, float("nan"), scale), mask=rmask)
    tl.store(zp_ptr + rows, tl.where(bad, 0.0, zpf).to(tl.int32), mask=rmask)
    tl.store(rsum_ptr + rows, rsum, mask=rmask)


def stage1_chunk(kb: int, br: int) -> int:
    """Gathered columns per step of stage 1: the whole input block where it is small (one step for b = 32 on
    the DiT shapes), else 128, or fewer so that the ``(b·r, chunk)`` float32 tile of w1 stays ≤ 32 KB."""
    brp = max(16, next_pow2(br))
    return max(16, min(next_pow2(kb), 128, 8192 // brp))


def act_quant(x: torch.Tensor, bits: int, symmetric: bool, clip_ratio: float, *, ln_eps: float | None = None,
              shift: torch.Tensor | None = None, scale: torch.Tensor | None = None,
              monarch_w1: torch.Tensor | None = None, z_dtype: torch.dtype | None = None, rms_norm: bool = False
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Launch the kernel. ``x (M, K)`` contiguous float; ``shift``/``scale (G, K)``; ``monarch_w1 (b, b·r, Kb)``.
    Returns ``codes int8 (M, K)``, ``scale f32 (M,)``, ``zero_point i32 (M,)``, ``row_sum i32 (M,)``,
    ``z (M, b, b·r)`` or None. ``z_dtype`` defaults to float32 (bfloat16 halves its traffic on the GPU).
    ``rms_norm``: the norm (``ln_eps`` given) is RMSNorm, not LayerNorm."""
    if x.dim() != 2 or not x.is_contiguous():
        raise ValueError(f"x must be a contiguous (M, K) tensor, got shape {tuple(x.shape)}")
    m, k = x.shape
    if (shift is None) != (scale is None):
        raise ValueError("modulate needs both shift and scale")
    check_device(x, shift, scale, monarch_w1)
    dev = x.device
    rows_per_group = 1
    if shift is not None:
        assert scale is not None   # (both or neither: checked above)
        g = shift.shape[0]
        if scale.shape != shift.shape or shift.shape[1] != k:
            raise ValueError(f"shift and scale must both be (G, K={k}), got {tuple(shift.shape)}, {tuple(scale.shape)}")
        if g == 0 or m % g:
            raise ValueError(f"modulate groups: M={m} is not a multiple of G={g}")
        rows_per_group = m // g
        shift, scale = shift.contiguous(), scale.contiguous()
    qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    codes = runtime.empty((m, k), torch.int8, dev)
    sa = runtime.empty((m,), torch.float32, dev)
    za = runtime.empty((m,), torch.int32, dev)
    ra = runtime.empty((m,), torch.int32, dev)
    z = None
    kb = nblk = br = r = 1
    if monarch_w1 is not None:
        if monarch_w1.dim() != 3 or monarch_w1.shape[1] % monarch_w1.shape[0]:
            raise ValueError(f"monarch_w1 must be (b, b·r, Kb), got {tuple(monarch_w1.shape)}")
        nblk, br, kb = monarch_w1.shape
        if nblk * kb < k:
            raise ValueError(f"monarch_w1 {tuple(monarch_w1.shape)} covers {nblk * kb} < K={k} inputs")
        r = br // nblk
        monarch_w1 = monarch_w1.contiguous()
        z = runtime.empty((m, nblk, br), z_dtype or torch.float32, dev)
    if m == 0:
        return codes, sa, za, ra, z
    bk = min(max(16, next_pow2(k)), 4096 if INTERPRET else 1024)
    bm = 16
    dummy = codes  # never dereferenced: the constexpr flags switch the loads off
    grid = (triton.cdiv(m, bm),)
    _act_quant_kernel[grid](
        x, shift if shift is not None else dummy, scale if scale is not None else dummy,
        monarch_w1 if monarch_w1 is not None else dummy,
        codes, sa, za, ra, z if z is not None else dummy,
        m, k, rows_per_group, float(ln_eps or 0.0), float(clip_ratio),
        kb, nblk, br, r,
        QMIN=qmin, QMAX=qmax, SYM=bool(symmetric),
        HAS_LN=ln_eps is not None, HAS_MOD=shift is not None, HAS_MONARCH=monarch_w1 is not None,
        RMS=bool(rms_norm), BM=bm, BK=bk, BKB=stage1_chunk(kb, br), BRP=max(16, next_pow2(br)),
        Z_BF16=z is not None and z.dtype == torch.bfloat16,
        DOT_PREC="ieee" if INTERPRET else "tf32x3", INTERP=INTERPRET,
        num_warps=4)
    return codes, sa, za, ra, z
