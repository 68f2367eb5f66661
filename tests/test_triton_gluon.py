"""The Gluon sm_90 kernel: its offline fragment layout (CPU), its ahead-of-time compilation for sm_90a (CPU, no
GPU needed), and its numerics at full DiT size (GPU only)."""
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton.experimental.gluon", reason="this Triton has no Gluon")

from treeq_engine.format import QuantSpec, int_gemm, quantize, unpack, zero_point_correction  # noqa: E402
from treeq_engine.kernels import PackedWeight  # noqa: E402
from treeq_engine.kernels.triton import gluon_gemm  # noqa: E402


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("n,k", [(7, 130), (16, 256), (3, 1)])
def test_fragment_layout_round_trip(bits, n, k, gen):
    """fragment_pack (from layout v1 codes) and the kernel's unpack, replayed in torch, are inverse."""
    pw = PackedWeight.from_float(torch.randn(n, k, generator=gen), QuantSpec.weight(bits))
    codes = pw.codes()
    frag = gluon_gemm.fragment_pack(codes, bits)
    kp = -(-k // gluon_gemm.BK) * gluon_gemm.BK
    assert frag.shape == (n, kp * bits // 8) and frag.is_contiguous()
    assert torch.equal(gluon_gemm.fragment_unpack_reference(frag, bits, k), codes)
    # the fragment property: word q·W + w of a row's K-step holds, in field plane s, K indices (w·c+s)·16 + 4q + i
    c, bk = 8 // bits, gluon_gemm.BK
    words = frag[:, : bk * bits // 8].contiguous().view(torch.int32) if kp == bk else None
    if words is not None and bits < 8:
        w_per_q = bk // (16 * c)
        q, w, i, s = 1, w_per_q - 1, 2, c - 1
        byte = (words[:, q * w_per_q + w] >> (8 * i)) & 0xFF
        field = (byte >> (s * bits)) & ((1 << bits) - 1)
        kk = (w * c + s) * 16 + 4 * q + i
        expect = codes[:, kk].int() + (1 << (bits - 1)) if kk < k else torch.full((n,), 1 << (bits - 1))
        assert torch.equal(field.int(), expect.int())


def test_zero_point_folding_identity(gen):
    """The kernel multiplies offset-binary fields u = q + 2^(b−1); zw' = zw + 2^(b−1), cw' = cw + 2^(b−1)·K give
    the same exact integer as the oracle's correction."""
    m, n, k = 9, 12, 77
    pw = PackedWeight.from_float(torch.randn(n, k, generator=gen), QuantSpec.weight(4))
    act = quantize(torch.randn(m, k, generator=gen), QuantSpec.activation(8))
    frag, zw2, cw2 = gluon_gemm.fragment_weights(pw.packed, 4, n, k, pw.zero_point, pw.col_sum)
    u = pw.codes().to(torch.int32) + 8
    acc_u = (act.codes.double() @ u.double().T).to(torch.int32)
    ra = act.row_sums()
    corr_u = zero_point_correction(acc_u, k, act.zero_point, ra, zw2, cw2)
    corr = zero_point_correction(int_gemm(act.codes, pw.codes()), k, act.zero_point, ra, pw.zero_point, pw.col_sum)
    assert torch.equal(corr_u, corr)
    assert torch.equal(cw2, u.sum(1, dtype=torch.int32))


def test_fragment_cache_follows_in_place_writes(gen):
    w = PackedWeight.from_float(torch.randn(8, 64, generator=gen), QuantSpec.weight(4))
    a = gluon_gemm.fragment_weights(w.packed, 4, 8, 64, w.zero_point, w.col_sum)
    assert gluon_gemm.fragment_weights(w.packed, 4, 8, 64, w.zero_point, w.col_sum)[0] is a[0]
    other = PackedWeight.from_float(torch.randn(8, 64, generator=gen), QuantSpec.weight(4))
    w.packed.copy_(other.packed)  # e.g. load_state_dict into a live module
    b = gluon_gemm.fragment_weights(w.packed, 4, 8, 64, w.zero_point, w.col_sum)
    assert b[0] is not a[0]
    assert torch.equal(gluon_gemm.fragment_unpack_reference(b[0], 4, 64), unpack(other.packed, 4, 64))


def test_split_k_choice():
    """Split-K only where the tiles leave SMs idle; it divides the K-steps, keeps ≥ 3 per work item, and counts
    waves: items beyond one per SM run after the first wave."""
    from treeq_engine.kernels.triton.gluon_gemm import split_k

    assert split_k(144, 9, 132) == 1  # M = 2048-class grids fill the GPU
    assert split_k(18, 9, 132) == 3  # M = 256, K = N = 1152: 3 × 3 steps
    assert split_k(18, 36, 132) == 6  # K = 4608: 108 items of 6 steps in one wave, not 162 of 4 in two
    for tiles, steps in ((1, 9), (5, 36), (40, 18), (7, 5)):
        s = split_k(tiles, steps, 132)
        assert steps % s == 0 and (s == 1 or steps // s >= 3)


def test_unsupported_bits_are_rejected():
    with pytest.raises(ValueError, match="Gluon kernel takes"):
        gluon_gemm.fragment_pack(torch.zeros(2, 32, dtype=torch.int8), 3)


def test_residual_argument_checks():
    """What the kernel reads as raw rows is checked before launch (direct calls bypass ops.packed_linear): the
    residual exactly (M, N), contiguous, in the out dtype; the gate float32 (G, N), contiguous, G dividing M. The
    kernel gets the rows per gate row, M // G (1 when unused)."""
    m, n, dev = 12, 8, torch.device("cpu")
    res = torch.zeros(m, n, dtype=torch.bfloat16)
    check = gluon_gemm._check_residual
    assert check(None, None, m, n, torch.bfloat16, True, dev) == 1
    assert check(res, None, m, n, torch.bfloat16, True, dev) == 1
    assert check(res, torch.zeros(1, n), m, n, torch.bfloat16, True, dev) == 12
    assert check(res, torch.zeros(3, n), m, n, torch.bfloat16, True, dev) == 4
    assert check(res.float(), torch.zeros(m, n), m, n, torch.float32, True, dev) == 1
    with pytest.raises(ValueError, match="gate needs residual"):
        check(None, torch.zeros(1, n), m, n, torch.bfloat16, True, dev)
    with pytest.raises(ValueError, match="probe"):
        check(res, None, m, n, torch.bfloat16, False, dev)
    for bad in (res.float(), res[:, :4], torch.zeros(n, m, dtype=torch.bfloat16).T, torch.zeros(m + 1, n,
                                                                                                  dtype=torch.bfloat16)):
        with pytest.raises(ValueError, match="residual must be"):
            check(bad, None, m, n, torch.bfloat16, True, dev)
    for bad in (torch.zeros(5, n), torch.zeros(2, n, dtype=torch.bfloat16), torch.zeros(n, 2).T, torch.zeros(2, n + 1),
                torch.zeros(n), torch.zeros(0, n)):
        with pytest.raises(ValueError, match="gate must be"):
            check(res, bad, m, n, torch.bfloat16, True, dev)


def _aot(*flags: str) -> list[dict]:
    """Compile in a fresh process: the plain kernels are interpreted in this one."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-m", "treeq_engine.kernels.triton.aot", "--json", *flags],
                       capture_output=True, text=True, env=env, timeout=900)
    import json

    start = r.stdout.find("[")
    assert start >= 0, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads(r.stdout[start:])


@pytest.fixture(scope="module")
def aot_reports():
    """One specialization per kernel family (a few seconds each on a cold Triton cache)."""
    return _aot("--quick")


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("TREEQ_SLOW") != "1", reason="slow (about a minute): set TREEQ_SLOW=1")
def test_aot_every_specialization():
    """Every bit-width and tile configuration the checks know, for sm_80 and sm_90a (about a minute)."""
    rows = _aot()
    errors = [f"{r['target']} {r['kernel']}: {r['error'][-500:]}" for r in rows if "error" in r]
    assert not errors, "\n".join(errors)


def _pick(reports, name_part, target):
    rows = [r for r in reports if name_part in r["kernel"] and r["target"] == target]
    assert rows, f"no build matching {name_part!r} for {target}"
    return rows


def test_aot_compiles_everything(aot_reports):
    errors = [f"{r['target']} {r['kernel']}: {r['error'][-500:]}" for r in aot_reports if "error" in r]
    assert not errors, "\n".join(errors)


def test_aot_gluon_uses_register_operand_wgmma(aot_reports):
    """sm_90a SASS of the Gluon kernels holds IGMMA (s8 wgmma) fed from registers; the unpack into the wgmma
    fragment is register-only (compilation itself asserts the layout conversion is trivial); the probe and the
    branch-free kernels do not spill."""
    for r in _pick(aot_reports, "gluon", "sm_90a"):
        assert r["sass_ops"].get("IGMMA", 0) >= 4 and r["ptx_wgmma"] >= 4, r
        if "split" not in r["kernel"]:  # the split-K fix-up (small M only) spills its atomic addresses
            assert r["stack_bytes"] == 0, r
        else:
            assert r["sass_ops"].get("HMMA", 0) > 0, r  # the branch runs on bf16 tensor cores


def test_aot_plain_kernels(aot_reports):
    """Plain Triton: s8 wgmma on sm_90a, IMMA on sm_80; the Monarch branch product on tensor cores."""
    for r in _pick(aot_reports, "packed_gemm", "sm_90a"):
        assert r["sass_ops"].get("IGMMA", 0) > 0, r
        if "monarch" in r["kernel"]:  # bf16 wgmma or mma.sync, as Triton picks
            assert r["sass_ops"].get("HGMMA", 0) + r["sass_ops"].get("HMMA", 0) > 0, r
    for r in _pick(aot_reports, "packed_gemm", "sm_80"):
        assert r["sass_ops"].get("IMMA", 0) > 0, r
    for r in _pick(aot_reports, "act_quant", "sm_90a"):
        assert r["stack_bytes"] == 0, r
        if "monarch" in r["kernel"] or "lowrank" in r["kernel"]:   # (the RMSNorm build has no branch)
            assert r["sass_ops"].get("HMMA", 0) > 0, r  # stage 1 on tensor cores (tf32x3)
        assert r["shared_bytes"] <= 64 * 1024, r  # stage 1 in chunks: low rank (one block of all K) fits too


_GATED_BUILD_SCRIPT = """
import json, re, subprocess, tempfile
from treeq_engine.kernels.triton import aot, gluon_gemm
rows = {}
for build, _ in gluon_gemm.aot_builds():
    if build.name not in ("gluon_gemm[W4, bias + gated residual]", "gluon_gemm[W4, bias + gelu]"):
        continue
    ck = aot.compile_build(build, 90)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(ck.asm["cubin"])
        f.flush()
        sass = subprocess.run([aot._tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True).stdout
    ptx = ck.asm["ptx"]
    rows[build.name] = dict(mul_rn=len(re.findall(r"mul\\.rn\\.f32", ptx)),
                            add_rn=len(re.findall(r"add\\.rn\\.f32", ptx)),
                            ffma=len(re.findall(r"\\bFFMA\\b", sass)), **aot.cubin_report(ck.asm["cubin"]))
print(json.dumps(rows))
"""


def test_aot_gated_residual_is_not_contracted():
    """The gated residual's product and sum stay two float32 roundings in the sm_90a machine code: the PTX has
    one ``mul.rn``/``add.rn`` pair per stored element (a thread stores 64 of the 128 × 128 tile), and that
    specialization's SASS has no FFMA at all (its float epilogue is scales, bias and the residual: nothing else
    for ptxas to fuse). Without the flag the code is absent (the residual sits behind a constexpr), and neither
    build spills."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _GATED_BUILD_SCRIPT], capture_output=True, text=True, env=env,
                       timeout=900)
    import json

    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = json.loads(r.stdout.strip().splitlines()[-1])
    gated, plain = rows["gluon_gemm[W4, bias + gated residual]"], rows["gluon_gemm[W4, bias + gelu]"]
    per_thread = gluon_gemm.BT * 16 * gluon_gemm.NUM_WARPS // (32 * gluon_gemm.NUM_WARPS)
    assert gated["mul_rn"] == gated["add_rn"] == per_thread, gated
    assert gated["ffma"] == 0, gated
    assert plain["mul_rn"] == plain["add_rn"] == 0, plain
    for row in (gated, plain):
        assert row["stack_bytes"] == 0 and row["sass_ops"].get("IGMMA", 0) >= 4, row
