"""Fragment layout v1 (the CUDA GEMMs' weight operand), on the CPU: it round-trips to layout v1 exactly, and the
registers the kernels' own unpack code builds from it hold the elements the PTX ISA fragment tables name."""
import itertools

import pytest
import torch

from treeq_engine import core
from treeq_engine.format import QuantSpec, pack
from treeq_engine.kernels import PackedWeight
from treeq_engine.kernels import cuda_layout as fl

pytestmark = pytest.mark.skipif(not core.available(), reason="treeq_engine._C is not built")

BITS = (2, 3, 4, 8)


def _codes(n, k, bits, gen):
    return torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (n, k), generator=gen, dtype=torch.int8)


def _field(q: torch.Tensor, bits: int) -> torch.Tensor:
    """What the kernels multiply: the code's byte at 8 bits, offset binary u = q + 2^(bits-1) below."""
    q = q.to(torch.int64)
    return q & 0xFF if bits == 8 else q + (1 << (bits - 1))


# ---- the PTX ISA tables, written out independently of csrc/treeq/frag.h -----------------------------------

def mma_m16n8k32_a(lane: int, reg: int, byte: int) -> tuple[int, int]:
    """PTX ISA 'Matrix Fragments for mma.m16n8k32', A (.s8/.u8): element a_i, i = 4·reg + byte, is at
    row = groupID for i < 4 or 8 ≤ i < 12 else groupID + 8; col = 4·threadID_in_group + (i & 3), + 16 if i ≥ 8."""
    i = 4 * reg + byte
    g, t = lane >> 2, lane % 4
    row = g if (i < 4 or 8 <= i < 12) else g + 8
    col = t * 4 + (i & 3) + (16 if i >= 8 else 0)
    return row, col


def wgmma_m64k32_a(thread: int, reg: int, byte: int) -> tuple[int, int]:
    """CUTLASS SM90 GMMA ALayout_64x32 (8-bit A in registers, the wgmma m64nNk32 fragment): thread shape
    (4, 8, 4) strides (256, 1, 16), value shape (4, 2, 2) strides (64, 8, 1024) into the column-major 64 × 32
    (M × K) tile, value index = 4·reg + byte."""
    t0, t1, t2 = thread % 4, (thread // 4) % 8, thread // 32
    v = 4 * reg + byte
    v0, v1, v2 = v % 4, (v // 4) % 2, v // 8
    idx = 256 * t0 + t1 + 16 * t2 + 64 * v0 + 8 * v1 + 1024 * v2
    return idx % 64, idx // 64  # (m, k)


def test_ptx_tables_agree_per_warp():
    """One slot layout serves both kernels: each warp of a wgmma warpgroup holds the m16n8k32 A fragment of its
    16-row slice."""
    for thread, reg, byte in itertools.product(range(128), range(4), range(4)):
        m, k = wgmma_m64k32_a(thread, reg, byte)
        row, col = mma_m16n8k32_a(thread % 32, reg, byte)
        assert (m, k) == (16 * (thread // 32) + row, col)


# ---- layout round trip --------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("n,k", [(1, 1), (7, 33), (256, 128), (300, 200), (513, 129)])
def test_repack_round_trip(bits, n, k, gen):
    codes = _codes(n, k, bits, gen)
    words, row_chan = fl.repack(pack(codes, bits), bits, n, k)
    assert words.dtype == torch.int32 and words.shape == (fl.total_words(n, k, bits),)
    assert torch.equal(fl.unrepack(words, row_chan, bits, n, k), codes)


def test_unrepack_rejects_nonzero_padding(gen):
    codes = _codes(5, 40, 4, gen)
    words, row_chan = fl.repack(pack(codes, 4), 4, 5, 40)
    bad = words.clone()
    bad[-1] ^= 1  # the tile's last word belongs to row block 15 (rows 240..255): padding for N = 5
    with pytest.raises(ValueError, match="padding"):
        fl.unrepack(bad, row_chan, 4, 5, 40)


@pytest.mark.parametrize("n", [300, 256, 40, 1000])
def test_tile_rows_in_channel_order(n):
    rc = fl.tile_rows(n)
    assert rc.shape == (fl.channel_tiles(n) * 256,)
    want = torch.arange(fl.channel_tiles(n) * 256, dtype=torch.int32)
    assert torch.equal(rc, torch.where(want < n, want, -1))


# ---- the kernels' registers against the PTX tables ----------------------------------------------------------

@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("n,k", [(37, 300), (300, 130)])
def test_registers_match_ptx_fragment_table(bits, n, k, gen):
    codes = _codes(n, k, bits, gen)
    words, row_chan = fl.repack(pack(codes, bits), bits, n, k)
    regs = fl.registers(words, bits, n, k)  # (ct, kt, 16, 32, 4 k-steps, 4 regs)
    nct, nkt = fl.channel_tiles(n), fl.k_tiles(k)
    assert regs.shape == (nct, nkt, 16, 32, 4, 4)
    # expected byte of every (ct, kt, m16, lane, s, reg, byte) from the PTX table and the row order
    lane, reg, byte = torch.meshgrid(torch.arange(32), torch.arange(4), torch.arange(4), indexing="ij")
    rc = torch.tensor([[mma_m16n8k32_a(l, r, b) for b in range(4)] for l in range(32) for r in range(4)])
    row16, col32 = rc[..., 0].reshape(32, 4, 4), rc[..., 1].reshape(32, 4, 4)
    padded = torch.zeros(nct * 256 + 1, nkt * 128, dtype=torch.int8)  # last row: the padding row (-1)
    padded[row_chan[row_chan >= 0].long(), :k] = codes[row_chan[row_chan >= 0].long()]
    fields = _field(padded, bits)
    chan = torch.where(row_chan >= 0, row_chan, torch.tensor(nct * 256))
    for ct, kt, m16, s in itertools.product(range(nct), range(nkt), range(16), range(4)):
        rows = chan[ct * 256 + 16 * m16 + row16].long()  # original channel (or the padding row)
        cols = kt * 128 + 32 * s + col32
        want = fields[rows, cols]  # (lane, reg, byte)
        got = (regs[ct, kt, m16, :, s, :, None] >> (8 * torch.arange(4))) & 0xFF
        assert torch.equal(got, want), (ct, kt, m16, s)


def test_registers_hand_computed_positions():
    """Spot checks computed by hand from the PTX table (4-bit, offset-binary fields u = q + 8)."""
    n, k = 20, 64
    codes = torch.zeros(n, k, dtype=torch.int8)
    codes[1, 55] = 5    # lane 5 (g=1, t=1), k-step 1, register 2 (row g, k 16+4t+p), byte 3: 32 + 16 + 4 + 3 = 55
    codes[9, 3] = -7    # row 9 = g + 8 with g = 1: reg 1 (row g+8, k < 16); k 3 = 4·0 + 3: lane 4, byte 3
    codes[14, 62] = 7   # row 14 = 6 + 8: g = 6, reg 3 (row g+8, k ≥ 16); k 62 = 32 + 16 + 4·3 + 2: lane 27, byte 2
    words, row_chan = fl.repack(pack(codes, 4), 4, n, k)
    regs = fl.registers(words, 4, n, k)[0, 0, 0]  # tile (0, 0), row block 0: (lane, k-step, reg)

    def byte(lane, s, r, p):
        return int((regs[lane, s, r] >> (8 * p)) & 0xFF)

    assert byte(5, 1, 2, 3) == 5 + 8
    assert byte(4, 0, 1, 3) == -7 + 8
    assert byte(27, 1, 3, 2) == 7 + 8
    # everything else is code 0 (field 8)
    nonzero = [(l, s, r, p) for l in range(32) for s in range(4) for r in range(4) for p in range(4)
               if byte(l, s, r, p) != 8]
    assert sorted(nonzero) == sorted([(5, 1, 2, 3), (4, 0, 1, 3), (27, 1, 3, 2)])


def test_cuda_operands_cached_and_u_domain(gen):
    w = torch.randn(70, 90, generator=gen)
    pw = PackedWeight.from_float(w, QuantSpec.weight(3))
    ops = fl.cuda_operands(pw)
    assert fl.cuda_operands(pw) is ops
    codes = pw.codes().to(torch.int64)
    assert torch.equal(ops.uzp.to(torch.int64), pw.zero_point.to(torch.int64) + 4)
    assert torch.equal(ops.ucs.to(torch.int64), codes.sum(1) + 4 * 90)
    assert torch.equal(fl.unrepack(ops.words, ops.row_chan, 3, 70, 90), pw.codes())
    # an in-place update of the weight (a state_dict loaded into module buffers) invalidates the cache
    other = PackedWeight.from_float(torch.randn(70, 90, generator=gen), QuantSpec.weight(3))
    pw.packed.copy_(other.packed)
    pw.col_sum.copy_(other.col_sum)
    fresh = fl.cuda_operands(pw)
    assert fresh is not ops and torch.equal(fl.unrepack(fresh.words, fresh.row_chan, 3, 70, 90), other.codes())


def test_errors(gen):
    codes = _codes(4, 40, 4, gen)
    with pytest.raises(ValueError, match="unsupported weight bit-width 5"):
        fl.repack(pack(codes, 4), 5, 4, 40)
    with pytest.raises(ValueError, match=r"must be torch.int32 \(4, 12\)"):
        fl.repack(pack(codes, 4), 4, 4, 70)
    with pytest.raises(ValueError, match="positive"):
        fl.tile_rows(0)
    with pytest.raises(ValueError, match="total_words"):
        core.load().frag_unrepack(torch.zeros(3, dtype=torch.int32).numpy(), fl.tile_rows(4).numpy(), 4, 4, 40)
