"""The compiled core's CPU ops equal the oracle bit for bit; its CUDA entry points fail clearly without a GPU."""
import itertools

import pytest
import torch

from treeq_engine import build_info, core
from treeq_engine.format import WEIGHT_BITS, int_gemm, pack, unpack
from treeq_engine.format.packing import PACKABLE_BITS

pytestmark = pytest.mark.skipif(not core.available(), reason="treeq_engine._C is not built")

SHAPES = [(1, 1, 1), (4, 3, 31), (26, 37, 13), (257, 13, 11), (8, 64, 96), (33, 17, 200)]


def _codes(rows, k, bits, gen):
    return torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (rows, k), generator=gen, dtype=torch.int8)


@pytest.mark.parametrize("bits", PACKABLE_BITS)
@pytest.mark.parametrize("k", [1, 5, 32, 33, 95, 200])
def test_pack_unpack_equal_oracle(bits, k, gen):
    codes = _codes(7, k, bits, gen)
    p = core.pack(codes, bits)
    assert torch.equal(p, pack(codes, bits))
    assert torch.equal(core.unpack(p, bits, k), codes)
    assert torch.equal(core.unpack(pack(codes, bits), bits, k), unpack(pack(codes, bits), bits, k))


@pytest.mark.parametrize("w_bits,shape", list(itertools.product(WEIGHT_BITS, SHAPES)))
def test_packed_gemm_equal_oracle(w_bits, shape, gen):
    m, n, k = shape
    a = _codes(m, k, 8, gen)
    w = _codes(n, k, w_bits, gen)
    acc = core.packed_gemm(a, pack(w, w_bits), w_bits, k)
    assert acc.dtype == torch.int32
    assert torch.equal(acc, int_gemm(a, w))


def test_extreme_codes_no_overflow():
    k = 4096
    a = torch.full((2, k), -128, dtype=torch.int8)
    w = torch.full((3, k), -128, dtype=torch.int8)
    assert int(core.packed_gemm(a, pack(w, 8), 8, k)[0, 0]) == 128 * 128 * k


def test_errors(gen):
    codes = _codes(3, 40, 4, gen)
    with pytest.raises(ValueError, match="out of range for 2-bit"):
        core.pack(codes, 2)
    with pytest.raises(ValueError, match="unsupported bit-width 6"):
        core.unpack(pack(codes, 4), 6, 40)
    with pytest.raises(TypeError, match="must be torch.int32"):
        core.unpack(pack(codes, 4).to(torch.int64), 4, 40)
    with pytest.raises(ValueError, match="must have shape"):
        core.unpack(pack(codes, 4), 4, 80)
    a = _codes(2, 40, 8, gen)
    with pytest.raises(ValueError, match="K=40, but the weight was packed with K=41"):
        core.packed_gemm(a, pack(codes, 4), 4, 41)
    with pytest.raises(ValueError, match="contiguous"):
        core.packed_gemm(_codes(40, 2, 8, gen).T, pack(codes, 4), 4, 40)
    # the raw module guards itself too
    with pytest.raises(ValueError, match="unsupported bit-width"):
        core.load().cpu_pack(codes.numpy(), 7)


def test_build_info_reports_core():
    info = build_info()
    assert info["cxx_core"] is True
    assert info["layout_version"] == core.load().LAYOUT_VERSION == 1
    if info["cuda_built"]:
        assert "90a" in info["cuda_archs"] and "80" in info["cuda_archs"]
        assert info["cuda_runtime_version"].startswith("13.")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error path")
def test_cuda_entry_points_fail_clearly_without_gpu():
    c = core.load()
    assert c.cuda_device_count() == 0
    with pytest.raises(RuntimeError, match="no CUDA device available|built without CUDA"):
        c.cuda_check_runnable()
    with pytest.raises(RuntimeError, match="no CUDA device available|built without CUDA"):
        c.cuda_packed_gemm_naive(0, 0, 0, 4, 4, 4, 4, 0)
    # the GEMM binding: 29 positional arguments (act … stream), then the gated residual's keywords
    with pytest.raises(RuntimeError, match="no CUDA device available|built without CUDA"):
        c.cuda_packed_linear(*[0] * 29)
    with pytest.raises(RuntimeError, match="no CUDA device available|built without CUDA"):
        c.cuda_packed_linear(*[0] * 29, residual=0, gate=0, gate_rows=0)


@pytest.mark.gpu
def test_cuda_backend_is_live():
    """On a GPU machine the CUDA kernels must be usable: without this, a core built without CUDA or a driver too
    old for it would skip every test of tests/test_cuda_kernels.py and the run would still look green."""
    from treeq_engine.kernels import cuda_backend

    assert build_info()["cuda_built"], build_info()
    assert cuda_backend.available(), build_info()


@pytest.mark.gpu
@pytest.mark.parametrize("w_bits", WEIGHT_BITS)
def test_cuda_naive_packed_gemm_equal_oracle(w_bits, gen):
    if not build_info()["cuda_built"]:
        pytest.skip("core built without CUDA")
    m, n, k = 37, 45, 203
    a = _codes(m, k, 8, gen)
    w = _codes(n, k, w_bits, gen)
    wp = pack(w, w_bits).cuda()
    ad = a.cuda()
    acc = torch.full((m, n), -7, dtype=torch.int32, device="cuda")  # poisoned output
    core.load().cuda_packed_gemm_naive(ad.data_ptr(), wp.data_ptr(), acc.data_ptr(), m, n, k, w_bits,
                                       torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    assert torch.equal(acc.cpu(), int_gemm(a, w))
    with pytest.raises(RuntimeError, match="not a CUDA device pointer"):
        core.load().cuda_packed_gemm_naive(a.data_ptr(), wp.data_ptr(), acc.data_ptr(), m, n, k, w_bits,
                                           torch.cuda.current_stream().cuda_stream)


def test_core_is_built_from_these_sources():
    """The digest CMake compiled into the core equals the one computed here from csrc/ (the same recipe on both
    sides), so a core left over from older sources is reported (``treeq info``, a warning on import, the GPU
    runbook rebuilds it) instead of being called with arguments it does not know."""
    from treeq_engine import core

    if not core.available():
        pytest.skip("the C++ core is not built")
    got = core.load().build_info().get("source_digest")
    assert got == core.source_digest(), core.stale_reason()
    assert core.stale_reason() is None
    assert len(got) == 16 and int(got, 16) >= 0


def test_source_digest_follows_every_source(tmp_path):
    from treeq_engine import core

    (tmp_path / "treeq").mkdir()
    (tmp_path / "a.cu").write_text("x")
    (tmp_path / "treeq" / "b.cuh").write_text("y")
    (tmp_path / "notes.txt").write_text("ignored")
    d = core.source_digest(tmp_path)
    (tmp_path / "notes.txt").write_text("still ignored")
    assert core.source_digest(tmp_path) == d
    (tmp_path / "treeq" / "b.cuh").write_text("z")
    assert core.source_digest(tmp_path) != d
    assert core.source_digest(tmp_path / "missing") is None
