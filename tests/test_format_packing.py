import pytest
import torch

from treeq_engine.format import GROUP, LAYOUT_VERSION, pack, packed_shape, unpack
from treeq_engine.format.packing import PACKABLE_BITS

KS = [1, 7, 31, 32, 33, 64, 100, 203]


def _codes(rows, k, bits, gen):
    return torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (rows, k), generator=gen, dtype=torch.int8)


@pytest.mark.parametrize("bits", PACKABLE_BITS)
@pytest.mark.parametrize("k", KS)
def test_roundtrip(bits, k, gen):
    codes = _codes(5, k, bits, gen)
    p = pack(codes, bits)
    assert tuple(p.shape) == packed_shape(5, k, bits)
    assert p.dtype == (torch.int8 if bits == 8 else torch.int32)
    assert torch.equal(unpack(p, bits, k), codes)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_dense_size(bits):
    # b bits per code, padded to 32 codes: (ceil(K/32) * b) int32 words
    assert packed_shape(3, 100, bits) == (3, 4 * bits)
    assert packed_shape(3, 96, bits) == (3, 3 * bits)


def _field(q, bits):
    return q + (1 << (bits - 1))


def test_layout_v1_bit_positions():
    """Pin the documented layout, not just self-consistency: kernels depend on these exact positions."""
    assert LAYOUT_VERSION == 1
    k = 32
    for bits in (2, 4):
        per = 32 // bits
        codes = torch.zeros(1, k, dtype=torch.int8)
        codes[0, per + 3] = 1  # word 1, slot 3
        w = pack(codes, bits)[0].to(torch.int64) & 0xFFFFFFFF
        pad = _field(0, bits)
        expect = [sum(pad << (bits * j) for j in range(per)) for _ in range(bits)]
        expect[1] = expect[1] - (pad << (bits * 3)) + (_field(1, bits) << (bits * 3))
        assert w.tolist() == expect
    # 3-bit planes: code 17 = -4 (field 0b000), code 2 = 3 (field 0b111), others 0 (field 0b100)
    codes = torch.zeros(1, k, dtype=torch.int8)
    codes[0, 2], codes[0, 17] = 3, -4
    w = (pack(codes, 3)[0].to(torch.int64) & 0xFFFFFFFF).tolist()
    assert w[0] == 0b11 << 4  # low plane codes 0..15: only code 2 has low bits 11
    assert w[1] == 0  # codes 16..31: low bits all 00
    assert w[2] == (0xFFFFFFFF & ~(1 << 17))  # high plane: every field has bit 2 set except code 17


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_padding_is_code_zero(bits, gen):
    k = 33
    codes = _codes(2, k, bits, gen)
    p = pack(codes, bits)
    full = unpack(p, bits, GROUP * (p.shape[1] // bits))  # unpack including the pad
    assert torch.equal(full[:, :k], codes)
    assert bool((full[:, k:] == 0).all())


def test_pack_errors(gen):
    with pytest.raises(ValueError, match="unsupported bit-width 5"):
        pack(torch.zeros(2, 4, dtype=torch.int8), 5)
    with pytest.raises(ValueError, match=r"out of range for 4-bit: found \[-8, 8\]"):
        pack(torch.tensor([[-8, 8]], dtype=torch.int8), 4)
    with pytest.raises(TypeError, match="int8"):
        pack(torch.zeros(2, 4, dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="contiguous"):
        pack(torch.zeros(4, 6, dtype=torch.int8).T, 4)
    with pytest.raises(ValueError, match="2-D"):
        pack(torch.zeros(4, dtype=torch.int8), 4)


def test_unpack_errors(gen):
    p = pack(_codes(3, 40, 4, gen), 4)
    with pytest.raises(ValueError, match=r"K=70 must have shape \(3, 12\), got \(3, 8\)"):
        unpack(p, 4, 70)
    with pytest.raises(TypeError, match="must be torch.int32"):
        unpack(p.to(torch.int64), 4, 40)
    with pytest.raises(ValueError, match="positive int"):
        unpack(p, 4, 0)
