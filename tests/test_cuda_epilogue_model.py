"""A CPU model of the CUDA GEMMs' data flow at the level of threads and fragments, checked against the oracle.

No GPU runs here, so the index arithmetic of csrc/treeq/gemm_common.cuh (u-domain zero-point corrections, the
masked Monarch-branch mma passes with their bf16-pair offsets, the tile row map, the output staging) and the
kernels' fragment maps (which thread holds which accumulator), the sm_80 main loop's shared-memory addressing
(cp.async swizzle, ldmatrix lanes) and the activation kernel's stage-1 fragments (csrc/act_quant.cu) are
transliterated below, line for line, with the warp-level MMAs evaluated from the PTX ISA fragment tables. Agreement with the oracle shows the formulas are
consistent; it does not prove the CUDA compiles to them (the GPU tests do).
"""
import pytest
import torch
import torch.nn.functional as F

from cuda_expect import epilogue_expect
from treeq_engine import core
from treeq_engine.branches import MonarchShape
from treeq_engine.format import QuantSpec
from treeq_engine.kernels import PackedWeight, reference
from treeq_engine.kernels import cuda_layout as fl

pytestmark = pytest.mark.skipif(not core.available(), reason="treeq_engine._C is not built")

TILE_C, TILE_T = 256, 128


LANE = torch.arange(32)
G, T = LANE >> 2, LANE & 3


def mma_m16n8k16(a_regs: torch.Tensor, b_regs: torch.Tensor) -> torch.Tensor:
    """Warp-level mma.m16n8k16 (bf16 → f32) from per-lane registers, by the PTX fragment tables, for a batch of
    n8 blocks. a_regs (32, 4, 2): lane, register, half — row g (+8 for odd registers), k 2t + half (+8 for
    registers 2, 3); b_regs (NB, 32, 2, 2): lane, register (k 2t / 2t+8), half, column g. Returns D (NB, 32, 4):
    i = 0, 1 row g, i = 2, 3 row g+8, column 2t + (i & 1)."""
    r, h = torch.arange(4)[None, :, None], torch.arange(2)[None, None, :]
    A = torch.zeros(16, 16, dtype=torch.float64)
    A[(G[:, None, None] + 8 * (r & 1)).expand(32, 4, 2), (2 * T[:, None, None] + h + 8 * (r >> 1)).expand(32, 4, 2)] = a_regs
    nb = b_regs.shape[0]
    B = torch.zeros(nb, 16, 8, dtype=torch.float64)
    rb = torch.arange(2)[None, :, None]
    krow = (2 * T[:, None, None] + h + 8 * rb).expand(32, 2, 2)
    col = G[:, None, None].expand(32, 2, 2)
    B[:, krow, col] = b_regs
    D = A @ B  # (NB, 16, 8)
    i = torch.arange(4)[None, :]
    return D[:, (G[:, None] + 8 * (i >> 1)), (2 * T[:, None] + (i & 1))]


def model_tile(p, tc, tt, acc_raw, row0, tok0, MB, NB, warps):
    """Everything the epilogue computes for tile (tc, tt), per (warp, lane) as in gemm_common.cuh; returns the
    stored outputs as (tokens, channels, values)."""
    c_base, t_base = tc * TILE_C, tt * TILE_T
    tok_all = t_base + torch.arange(TILE_T)
    ok = tok_all < p["m"]
    tclamp = tok_all.clamp(max=p["m"] - 1)
    sa = torch.where(ok, p["a_scale"][tclamp], torch.zeros(()))           # the staged token vectors
    za = torch.where(ok, p["a_zp"][tclamp].long(), torch.zeros((), dtype=torch.long))
    rk = torch.where(ok, p["a_rowsum"][tclamp].long(), torch.zeros((), dtype=torch.long)) - p["k"] * za
    toks, chans, vals = [], [], []
    i4 = torch.arange(4)
    for w in range(warps):
        rows = torch.stack([row0(w, mb) + G[:, None] + 8 * torch.arange(2)[None, :] for mb in range(MB)], 1)
        chan = p["row_chan"][c_base + rows].long()                            # (32, MB, 2)
        cok = chan >= 0
        cc = chan.clamp(min=0)
        uzp = torch.where(cok, p["w_uzp"][cc].long(), 0)
        ucs = torch.where(cok, p["w_ucs"][cc].long(), 0)
        sw = torch.where(cok, p["w_scale"][cc], 0.0)
        tl = torch.stack([tok0(w, nb) + 2 * T[:, None] + (i4[None, :] & 1) for nb in range(NB)], 1)  # (32, NB, 4)
        hh = i4 >> 1
        ch_i = chan[:, :, None, :].expand(32, MB, NB, 2)[..., hh]              # (32, MB, NB, 4)
        tl_i = tl[:, None].expand(32, MB, NB, 4)
        acc = torch.where(ch_i >= 0, acc_raw[(t_base + tl_i).clamp(max=acc_raw.shape[0] - 1), ch_i.clamp(min=0)], 0)
        acc = torch.where(t_base + tl_i < p["m"], acc, 0)
        corr = acc - uzp[:, :, None, hh] * rk[tl_i] - za[tl_i] * ucs[:, :, None, hh]
        corr = (corr + 2**31) % 2**32 - 2**31                                 # int32 wrap-around (uint32 math)
        y = ((corr.to(torch.float32) * sa[tl_i]) * sw[:, :, None, hh]).double()
        if p["z"] is not None:  # Monarch stage 2, as the kernel: masked passes per j over bf16 words
            b, brp, nbl = p["blocks"], p["brp"], p["nb"]
            z, w2 = p["z"], p["w2"]  # flat float64 views of the bf16 buffers; word x = values 2x, 2x + 1
            for mb in range(MB):
                jr = torch.where(cok[:, mb], chan[:, mb] // nbl, -1)          # (32, 2)
                lr = torch.where(cok[:, mb], chan[:, mb] % nbl, 0)
                if not cok[:, mb].any():
                    continue
                jlo, jhi = int(jr[cok[:, mb]].min()), int(jr[cok[:, mb]].max())
                for j in range(jlo, jhi + 1):
                    w_off = ((j * nbl + lr) * brp) // 2 + T[:, None]            # (32, 2)
                    z_off = ((t_base + G) * b + j) * (brp // 2) + T             # (32,)
                    z_step = 8 * b * (brp // 2)
                    for c0 in range(0, brp, 16):
                        cw = c0 // 2
                        a = torch.zeros(32, 4, 2, dtype=torch.float64)
                        for q in range(4):
                            h = q & 1
                            word = w_off[:, h] + cw + 4 * (q >> 1)
                            val = torch.stack([w2[2 * word], w2[2 * word + 1]], -1)
                            a[:, q] = torch.where((jr[:, h] == j)[:, None], val, 0.0)
                        zp = z_off[None, :] + torch.tensor([tok0(w, nb) // 8 for nb in range(NB)])[:, None] * z_step + cw
                        breg = torch.stack([torch.stack([z[2 * zp], z[2 * zp + 1]], -1),
                                            torch.stack([z[2 * (zp + 4)], z[2 * (zp + 4) + 1]], -1)], 2)
                        y[:, mb] += mma_m16n8k16(a, breg).permute(1, 0, 2)
        if p["bias"] is not None:
            y = y + torch.where(ch_i >= 0, p["bias"][ch_i.clamp(min=0)].double(), 0.0)
        if p["gelu"]:
            y = F.gelu(y, approximate="tanh")
        tok = t_base + tl_i
        keep = (ch_i >= 0) & (tok < p["m"])
        assert ((ch_i[ch_i >= 0] - c_base >= 0) & (ch_i[ch_i >= 0] - c_base < TILE_C)).all()  # staging columns
        toks.append(tok[keep]), chans.append(ch_i[keep]), vals.append(y[keep])
    return torch.cat(toks), torch.cat(chans), torch.cat(vals)


SM90 = dict(MB=2, NB=16, warps=8, row0=lambda w, mb: 16 * (8 * (w // 4) + 4 * mb + w % 4), tok0=lambda w, nb: 8 * nb)
SM80 = dict(MB=2, NB=8, warps=16, row0=lambda w, mb: 32 * (w >> 1) + 16 * mb, tok0=lambda w, nb: 64 * (w & 1) + 8 * nb)
KERNELS = {"sm90": SM90, "sm80": SM80}  # the fragment maps of gemm_sm90.cu (consumer warps) and gemm_sm80.cu


@pytest.mark.parametrize("kernel", ["sm90", "sm80"])
@pytest.mark.parametrize("blocks,rank,bits", [(1, 32, 4), (32, 1, 3), (3, 5, 2)])
def test_epilogue_model_matches_oracle(kernel, blocks, rank, bits, gen):
    m, n, k = 140, 300, 70   # two token tiles (the second ragged), two channel tiles (the second ragged)
    km = KERNELS[kernel]
    s = MonarchShape(n=n, k=k, blocks=blocks, rank=rank)
    w1, w2 = torch.randn(s.w1_shape, generator=gen) * 0.1, torch.randn(s.w2_shape, generator=gen) * 0.1
    act = reference.quantize_activation(torch.randn(m, k, generator=gen), QuantSpec.activation(4), monarch_w1=w1)
    act = type(act)(act.codes, act.scale, act.zero_point, act.row_sum, act.bits, act.z.to(torch.bfloat16))
    w = PackedWeight.from_float(torch.randn(n, k, generator=gen) * 0.1, QuantSpec.weight(bits))
    bias = torch.randn(n, generator=gen)
    ops = fl.build_operands(w, torch.device("cpu"))
    br, brp = blocks * rank, -(-blocks * rank // 16) * 16
    zpad = torch.zeros(-(-m // 128) * 128, blocks, brp)
    zpad[:m, :, :br] = act.z.float()
    w2pad = torch.zeros(blocks, s.nb, brp)
    w2pad[:, :, :br] = w2.to(torch.bfloat16).float()
    # the raw u-domain accumulator Σ_k qa · u, u = q + offset: what the tensor cores produce
    u = w.codes().to(torch.int64) + fl.field_offset(bits)
    acc_raw = act.codes.to(torch.int64) @ u.T
    p = dict(m=m, k=k, a_scale=act.scale, a_zp=act.zero_point, a_rowsum=act.row_sum, row_chan=ops.row_chan,
             w_uzp=ops.uzp, w_ucs=ops.ucs, w_scale=ops.scale, bias=bias, gelu=True, blocks=blocks, brp=brp,
             nb=s.nb, z=zpad.double().flatten(), w2=w2pad.double().flatten())
    toks, chans, vals = [], [], []
    for tc in range(fl.channel_tiles(n)):
        for tt in range(-(-m // 128)):
            a, c, v = model_tile(p, tc, tt, acc_raw, km["row0"], km["tok0"], km["MB"], km["NB"], km["warps"])
            toks.append(a), chans.append(c), vals.append(v)
    toks, chans, vals = torch.cat(toks), torch.cat(chans), torch.cat(vals)
    flat = toks * n + chans
    assert flat.numel() == m * n and flat.unique().numel() == m * n, "every output written exactly once"
    y = torch.zeros(m * n, dtype=torch.float64)
    y[flat] = vals
    y = y.view(m, n)
    want, tol = epilogue_expect(act, w, bias=bias, w2=w2, gelu=True)
    assert ((y - want).abs() <= tol).all()



# ---- the sm_80 main loop: cp.async swizzle → ldmatrix → mma.m16n8k32 ---------------------------------------------

def ldmatrix_x4(smem: torch.Tensor, addr: torch.Tensor) -> torch.Tensor:
    """ldmatrix.x4.b16 from a byte image of shared memory: lane l supplies the address of row l & 7 of matrix
    l >> 3; lane L receives, for matrix i, the 32-bit word L & 3 of row L >> 2. Returns (32, 4 regs, 4 bytes)."""
    rows = smem[addr[:, None] + torch.arange(16)]                      # (32 supplied rows, 16 bytes)
    i = torch.arange(4)[None, :, None]
    byte = torch.arange(4)[None, None, :]
    return rows[8 * i + (LANE >> 2)[:, None, None], 4 * (LANE & 3)[:, None, None] + byte]


# A fragment of mma.m16n8k32 (PTX table): register r, byte p of lane (g, t) is element (g + 8(r&1), 4t + p + 16(r>>1))
_R, _P = torch.arange(4)[None, :, None], torch.arange(4)[None, None, :]
A_ROW = (G[:, None, None] + 8 * (_R & 1)).expand(32, 4, 4)
A_COL = (4 * T[:, None, None] + _P + 16 * (_R >> 1)).expand(32, 4, 4)
# B fragment: register r, byte p of lane (g, t) is element (k = 4t + p + 16r, n = g); C: (g + 8(i>>1), 2t + (i&1))
B_ROW = (4 * T[:, None, None] + _P + 16 * torch.arange(2)[None, :, None]).expand(32, 2, 4)
B_COL = G[:, None, None].expand(32, 2, 4)
_I = torch.arange(4)[None, :]
C_ROW, C_COL = G[:, None] + 8 * (_I >> 1), 2 * T[:, None] + (_I & 1)


def test_sm80_main_loop_model(gen):
    """One CTA tile over two K stages, addressed as gemm_sm80.cu does (cp.async XOR swizzle, ldmatrix lane
    addresses, the B registers each n8 block takes), equals Σ_k qa · u."""
    bits, m, n, k = 4, 128, 256, 256
    qa = torch.randint(-128, 128, (m, k), generator=gen, dtype=torch.int8)
    qw = torch.randint(-8, 8, (n, k), generator=gen, dtype=torch.int8)
    from treeq_engine.format import pack

    words, _ = fl.repack(pack(qw, bits), bits, n, k)
    regs = fl.registers(words, bits, n, k)  # (1, 2, 16, 32, 4, 4): A registers, by the kernels' unpack code
    a_vals = (regs[..., None] >> (8 * torch.arange(4))) & 0xFF  # .u8 fields
    want = qa.long() @ (qw.long() + fl.field_offset(bits)).T
    acc = torch.zeros(16, 2, 8, 32, 4, dtype=torch.long)  # (warp, row block, n8 block, lane, i)
    r = torch.arange(128)[:, None]
    ch = torch.arange(8)[None, :]
    for kt in range(2):
        # load_stage: 16-byte chunk ch of token row r lands at r·128 + ((ch ^ (r & 7)) << 4); the image holds the
        # .s8 values themselves
        smem = torch.zeros(128 * 128, dtype=torch.long)
        dst = (r * 128 + ((ch ^ (r & 7)) << 4))[..., None] + torch.arange(16)
        smem[dst] = qa[:, kt * 128:(kt + 1) * 128].long().view(128, 8, 16)
        for warp in range(16):
            wc, wt = warp >> 1, warp & 1
            for s in range(4):
                A = torch.zeros(2, 16, 32, dtype=torch.long)
                for mb in range(2):
                    A[mb, A_ROW, A_COL] = a_vals[0, kt, 2 * wc + mb, :, s]
                for pr in range(4):
                    mat = LANE >> 3
                    tok = 64 * wt + 16 * pr + (LANE & 7) + 8 * (mat >> 1)
                    kc = 2 * s + (mat & 1)
                    b = ldmatrix_x4(smem, tok * 128 + ((kc ^ (tok & 7)) << 4))  # (32, 4 regs, 4 bytes)
                    for half, nb in ((0, 2 * pr), (1, 2 * pr + 1)):
                        B = torch.zeros(32, 8, dtype=torch.long)
                        B[B_ROW, B_COL] = b[:, 2 * half:2 * half + 2]
                        D = A @ B  # (2, 16, 8)
                        acc[warp, :, nb] += D[:, C_ROW, C_COL]
    for warp in range(16):
        wc, wt = warp >> 1, warp & 1
        for mb in range(2):
            for nb in range(8):
                row = 32 * wc + 16 * mb + C_ROW   # channel (identity row map, b = 1)
                tok = 64 * wt + 8 * nb + C_COL
                assert torch.equal(acc[warp, mb, nb], want[tok, row])


# ---- the activation kernel's Monarch stage 1 (act_quant.cu, phase 2) ---------------------------------------------

@pytest.mark.parametrize("m,k,blocks,rank", [(40, 70, 4, 1), (32, 130, 3, 5), (20, 64, 1, 70)])
def test_act_quant_stage1_model(m, k, blocks, rank, gen):
    """Warp w takes row block w & 1 and input blocks ≡ w >> 1 (mod 4); A from v (rows g, g+8; inputs 2t, 2t+1,
    +8), B from w1 (outputs c0 + 8·nt + g), D stored as z[row, c / r, kblk·r + c % r]."""
    from treeq_engine.branches import monarch

    v = torch.randn(m, k, generator=gen)
    s = MonarchShape(n=k, k=k, blocks=blocks, rank=rank)
    w1 = torch.randn(s.w1_shape, generator=gen)
    vb, wb = v.to(torch.bfloat16).double(), w1.to(torch.bfloat16).double()
    kb, br = s.kb, blocks * rank
    z = torch.full((m, blocks, br), float("nan"), dtype=torch.float64)
    for row_base in range(0, m, 32):  # CTAs of 32 rows
        for warp in range(8):
            rb = warp & 1
            r_lo = rb * 16 + G
            for kblk in range(warp >> 1, blocks, 4):
                for c0 in range(0, br, 64):
                    acc = torch.zeros(8, 32, 4, dtype=torch.float64)
                    for i0 in range(0, kb, 16):
                        va = torch.zeros(32, 8, dtype=torch.float64)
                        for q in range(8):
                            rl = r_lo + (8 if q & 2 else 0)
                            row = row_base + rl
                            i = i0 + 2 * T + (q & 1) + 8 * (q >> 2)
                            col = i * blocks + kblk
                            okq = (row < m) & (i < kb) & (col < k)
                            va[:, q] = torch.where(okq, vb[row.clamp(max=m - 1), col.clamp(max=k - 1)], 0.0)
                        a = va.view(32, 4, 2)  # a[r] = pack(va[2r], va[2r + 1])
                        for nt in range(8):
                            if c0 + 8 * nt >= br:
                                break
                            c = c0 + 8 * nt + G
                            breg = torch.zeros(32, 2, 2, dtype=torch.float64)
                            for h in range(2):
                                i = i0 + 2 * T + 8 * h
                                for e in range(2):
                                    okb = (c < br) & (i + e < kb)
                                    breg[:, h, e] = torch.where(
                                        okb, wb[kblk, c.clamp(max=br - 1), (i + e).clamp(max=kb - 1)], 0.0)
                            acc[nt] += mma_m16n8k16(a, breg[None])[0]
                    for nt in range(8):
                        for i in range(4):
                            c = c0 + 8 * nt + 2 * T + (i & 1)
                            row = row_base + (r_lo + 8 * (i >> 1))
                            keep = (c < br) & (row < m)
                            j, sr = c // rank, c % rank
                            z[row[keep], j[keep], kblk * rank + sr[keep]] = acc[nt, keep, i]
    want = monarch.stage1(vb, wb)
    assert not z.isnan().any(), "every z element written"
    torch.testing.assert_close(z, want, rtol=1e-12, atol=1e-9)
