"""Ahead-of-time compilation of the Triton kernels for a named GPU target, without a GPU.

Triton compiles for a target given by ``GPUTarget("cuda", 90, 32)`` through TTIR → TTGIR → LLVM IR → PTX →
cubin (its bundled ptxas), and its bundled ``cuobjdump`` disassembles the cubin. This proves on a CPU-only
machine what the interpreter cannot: that the kernels pass the real compiler's shape and layout rules, which
tensor-core instructions they use (``wgmma.mma_async`` → ``IGMMA`` on sm_90a, ``mma.sync`` → ``IMMA`` on
sm_80), their register and spill counts and shared memory. Run as ``treeq triton-aot`` (or
``python -m treeq_engine.kernels.triton.aot``) in a process where ``TRITON_INTERPRET`` is unset.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
from typing import Any, Callable, Iterator

import torch

from .runtime import INTERPRET


@dataclasses.dataclass(frozen=True)
class KernelBuild:
    """One kernel specialization to compile: example arguments fix the signature, ``constexprs`` the rest."""

    name: str
    kernel: Any  # a triton JITFunction (or Gluon JIT function)
    args: dict[str, Any]
    constexprs: dict[str, Any]
    num_warps: int = 4
    num_stages: int = 3
    gluon: bool = False
    quick: bool = True  # part of the quick check (one build per kernel family)


def _signature(build: KernelBuild) -> tuple[dict[str, str], dict]:
    from triton.runtime.jit import mangle_type

    sig, attrs = {}, {}
    for i, name in enumerate(build.kernel.arg_names):
        if name in build.constexprs:
            sig[name] = "constexpr"
            continue
        if name not in build.args:
            raise ValueError(f"{build.name}: no example argument for {name!r}")
        v = build.args[name]
        sig[name] = mangle_type(v)
        divisible = (isinstance(v, torch.Tensor) and v.data_ptr() % 16 == 0) or \
            (isinstance(v, int) and not isinstance(v, bool) and v % 16 == 0 and v != 0)
        if divisible:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


def compile_build(build: KernelBuild, capability: int = 90):
    """``triton.compile`` the build for ``sm_<capability>`` (90 → sm_90a, Triton's Hopper target)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if INTERPRET:
        raise RuntimeError("ahead-of-time compilation needs TRITON_INTERPRET unset (kernels are interpreted now)")
    sig, attrs = _signature(build)
    if build.gluon:
        from triton.experimental.gluon._runtime import GluonASTSource as Source
    else:
        Source = ASTSource
    src = Source(build.kernel, sig, build.constexprs, attrs)
    return triton.compile(src, target=GPUTarget("cuda", capability, 32),
                          options=dict(num_warps=build.num_warps, num_stages=build.num_stages))


def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def cubin_report(cubin: bytes) -> dict[str, Any]:
    """Registers, spills and the tensor-core SASS opcodes of a cubin (bundled ``cuobjdump``)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        res = subprocess.run([_tool("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+)", res)
    stack = re.search(r"STACK:(\d+)", res)
    ops: dict[str, int] = {}
    for op in re.findall(r"\b(IGMMA|HGMMA|QGMMA|IMMA|HMMA|LDL|STL)\b[.\w]*", sass):
        ops[op] = ops.get(op, 0) + 1
    return {"registers": int(regs.group(1)) if regs else None, "stack_bytes": int(stack.group(1)) if stack else None,
            "sass_ops": ops}


def report(build: KernelBuild, capability: int = 90) -> dict[str, Any]:
    ck = compile_build(build, capability)
    ptx = ck.asm["ptx"]
    out = {"kernel": build.name, "target": f"sm_{capability}{'a' if capability == 90 else ''}",
           "shared_bytes": ck.metadata.shared, "num_warps": build.num_warps,
           "ptx_wgmma": len(re.findall(r"wgmma\.mma_async", ptx)), "ptx_mma_sync": len(re.findall(r"\bmma\.sync", ptx)),
           "ptx_ld_shared": len(re.findall(r"\bld\.shared", ptx)), "ptx_st_shared": len(re.findall(r"\bst\.shared", ptx))}
    out.update(cubin_report(ck.asm["cubin"]))
    return out


def default_builds() -> Iterator[tuple[KernelBuild, tuple[int, ...]]]:
    """The specializations the checks compile, with their target capabilities: the plain kernels for Ampere and
    Hopper, the Gluon kernels for Hopper only."""
    from . import act_quant, autotune, gemm

    m, k, n = 2048, 1152, 4608
    x = torch.empty(m, k, dtype=torch.bfloat16)
    codes = torch.empty(m, k, dtype=torch.int8)
    f32 = torch.empty(m, dtype=torch.float32)
    i32 = torch.empty(m, dtype=torch.int32)
    w1 = torch.empty(32, 32, k // 32, dtype=torch.float32)
    z = torch.empty(m, 32, 32, dtype=torch.bfloat16)
    yield KernelBuild("act_quant[ln+modulate+monarch b=32,r=1 -> int8]", act_quant._act_quant_kernel,
                      dict(x_ptr=x, shift_ptr=x, mscale_ptr=x, w1_ptr=w1, codes_ptr=codes, scale_ptr=f32, zp_ptr=i32,
                           rsum_ptr=i32, z_ptr=z, M=m, K=k, rows_per_group=256, ln_eps=1e-6, clip=1.0,
                           KB=k // 32, NBLK=32, BR=32, R=1),
                      dict(QMIN=-128, QMAX=127, SYM=False, HAS_LN=True, HAS_MOD=True, HAS_MONARCH=True, RMS=False,
                           BM=16, BK=1024, BKB=act_quant.stage1_chunk(k // 32, 32), BRP=32, Z_BF16=True,
                           DOT_PREC="tf32x3", INTERP=False)), (90, 80)
    # the low-rank branch: one input block holding all of K (a single tile of it needed 786 KB of shared memory)
    yield KernelBuild("act_quant[ln+modulate+lowrank r=32 -> int8]", act_quant._act_quant_kernel,
                      dict(x_ptr=x, shift_ptr=x, mscale_ptr=x, w1_ptr=torch.empty(1, 32, k, dtype=torch.float32),
                           codes_ptr=codes, scale_ptr=f32, zp_ptr=i32, rsum_ptr=i32,
                           z_ptr=torch.empty(m, 1, 32, dtype=torch.bfloat16), M=m, K=k, rows_per_group=256,
                           ln_eps=1e-6, clip=1.0, KB=k, NBLK=1, BR=32, R=32),
                      dict(QMIN=-8, QMAX=7, SYM=False, HAS_LN=True, HAS_MOD=True, HAS_MONARCH=True, RMS=False,
                           BM=16, BK=1024, BKB=act_quant.stage1_chunk(k, 32), BRP=32, Z_BF16=True,
                           DOT_PREC="tf32x3", INTERP=False)), (90,)
    # RMSNorm (Z-Image, LTX-Video) + modulate, no branch: the mean pass compiled out
    yield KernelBuild("act_quant[rms+modulate -> int4]", act_quant._act_quant_kernel,
                      dict(x_ptr=x, shift_ptr=x, mscale_ptr=x, w1_ptr=x, codes_ptr=codes, scale_ptr=f32, zp_ptr=i32,
                           rsum_ptr=i32, z_ptr=x, M=m, K=k, rows_per_group=256, ln_eps=1e-6, clip=1.0, KB=1, NBLK=1,
                           BR=1, R=1),
                      dict(QMIN=-8, QMAX=7, SYM=False, HAS_LN=True, HAS_MOD=True, HAS_MONARCH=False, RMS=True,
                           BM=16, BK=1024, BKB=16, BRP=16, Z_BF16=False, DOT_PREC="tf32x3", INTERP=False)), (90,)
    for bits in (8, 4, 3, 2):
        packed = torch.empty(n, k if bits == 8 else k // 32 * bits, dtype=torch.int8 if bits == 8 else torch.int32)
        fn = torch.empty(n, dtype=torch.float32)
        inn = torch.empty(n, dtype=torch.int32)
        w2 = torch.empty(32, n // 32, 32, dtype=torch.float32)
        out = torch.empty(m, n, dtype=torch.bfloat16)
        res_rows = torch.empty(m, n, dtype=torch.bfloat16)
        gate = torch.empty(m // 256, n, dtype=torch.float32)
        for i, (cfg, branch, res) in enumerate(((autotune.heuristic_config(m, n, k, True), True, False),
                                                (autotune.heuristic_config(m, n, k), False, False),
                                                (autotune.heuristic_config(256, 1152, 1152), False, False),  # split-K
                                                (autotune.heuristic_config(m, n, k), False, True))):
            name = f"packed_gemm[W{bits}, BM={cfg.bm} BN={cfg.bn} BK={cfg.bk} split={cfg.split_k}" \
                   f"{', monarch b=32 r=1 + bias + gelu' if branch else ''}{', gated residual' if res else ''}]"
            yield KernelBuild(name, gemm._packed_gemm_kernel,
                              dict(a_ptr=codes, w_ptr=packed, sa_ptr=f32, za_ptr=i32, ra_ptr=i32, sw_ptr=fn, zw_ptr=inn,
                                   cw_ptr=inn, bias_ptr=fn, z_ptr=z, w2_ptr=w2, out_ptr=out, res_ptr=res_rows,
                                   gate_ptr=gate, ws_ptr=inn, cnt_ptr=inn,
                                   M=m, N=n, K=k, KW=packed.shape[1], NBLK=32 if branch else 1,
                                   NB=n // 32 if branch else n, BR=32 if branch else 1, GATE_ROWS=256, M_BUCKET=m),
                              dict(BITS=bits, HAS_BIAS=branch or res, HAS_BRANCH=branch, GELU=branch, HAS_RES=res,
                                   HAS_GATE=res, BRC=32, BRANCH_F32=False, BM=cfg.bm,
                                   BN=cfg.bn, BK=cfg.bk, SPLIT_K=cfg.split_k, GROUP_M=cfg.group_m),
                              num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                              quick=(bits, i) in ((4, 0), (8, 1), (8, 2), (4, 3))), (80, 90)
    try:
        from . import gluon_gemm
    except ImportError:  # this Triton has no Gluon
        return
    yield from gluon_gemm.aot_builds()


def run_checks(select: Callable[[str], bool] = lambda name: True, quick: bool = False) -> list[dict[str, Any]]:
    rows = []
    for build, caps in default_builds():
        if not select(build.name) or (quick and not build.quick):
            continue
        for cap in caps:
            try:
                rows.append(report(build, cap))
            except Exception as e:  # report every failure, not just the first
                rows.append({"kernel": build.name, "target": f"sm_{cap}", "error": f"{type(e).__name__}: {e}"[:2000]})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="treeq triton-aot", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return run(p.parse_args(argv))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--filter", default="", help="compile only kernels whose name contains this")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--quick", action="store_true", help="one specialization per kernel family")


def run(args: argparse.Namespace) -> int:
    rows = run_checks(lambda name: args.filter.lower() in name.lower(), args.quick)
    if not rows:
        raise SystemExit(f"--filter {args.filter!r} matches no kernel (names hold act_quant, packed_gemm, gluon_probe, "
                         "gluon_gemm and their bit-widths)")
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        for r in rows:
            if "error" in r:
                print(f"{r['target']:8s} {r['kernel']}\n         ERROR {r['error']}")
            else:
                print(f"{r['target']:8s} {r['kernel']}\n         regs {r['registers']} stack {r['stack_bytes']} "
                      f"smem {r['shared_bytes']} wgmma {r['ptx_wgmma']} mma.sync {r['ptx_mma_sync']} "
                      f"sass {r['sass_ops']}")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
