"""``treeq selfcheck``: prove the format and the build on this machine in a few seconds.

For every (weight bits, activation bits) pair it quantizes random data, packs the weight, runs the integer
GEMM through the oracle and through the C++ core (and the naive CUDA kernel where a GPU is present), and
compares the epilogue against dequantize-then-matmul in float64.
"""
from __future__ import annotations

import argparse

import torch

from . import core
from .format import (ACT_BITS, WEIGHT_BITS, QuantSpec, dequantize, epilogue, int_gemm, pack, quantize,
                     unpack)
from .info import build_info


def run(m: int = 37, n: int = 45, k: int = 203, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    w = torch.randn(n, k, generator=g) * 0.05
    bias = torch.randn(n, generator=g)
    rows = []
    for wb in WEIGHT_BITS:
        wq = quantize(w, QuantSpec.weight(wb))
        packed = pack(wq.codes, wb)
        roundtrip = bool(torch.equal(unpack(packed, wb, k), wq.codes))
        for ab in ACT_BITS:
            aq = quantize(x, QuantSpec.activation(ab))
            acc = int_gemm(aq.codes, wq.codes)
            row: dict[str, int | float | bool] = {"w_bits": wb, "a_bits": ab, "pack_roundtrip": roundtrip}
            if core.available():
                row["cpp_exact"] = bool(torch.equal(core.packed_gemm(aq.codes, core.pack(wq.codes, wb), wb, k), acc))
            y = epilogue(acc, k, aq, wq, bias).double()
            ref = dequantize(aq, torch.float64) @ dequantize(wq, torch.float64).T + bias.double()
            row["epilogue_rel_err"] = float((y - ref).norm() / ref.norm())
            row["quant_rel_err"] = float((ref - (x.double() @ w.double().T + bias.double())).norm() / ref.norm())
            rows.append(row)
    return rows


def main() -> int:
    info = build_info()
    print("build:", ", ".join(f"{k}={v}" for k, v in info.items()))
    rows = run()
    ok = all(r["pack_roundtrip"] and r.get("cpp_exact", True) and r["epilogue_rel_err"] < 1e-5 for r in rows)
    print(f"{'W':>2} {'A':>2} | pack ok | C++ int GEMM exact | epilogue rel err | W·A quantization rel err")
    for r in rows:
        cpp = {True: "yes", False: "NO", None: "n/a (no core)"}[r.get("cpp_exact")]
        print(f"{r['w_bits']:>2} {r['a_bits']:>2} | {str(r['pack_roundtrip']):>7} | {cpp:>18} | "
              f"{r['epilogue_rel_err']:16.2e} | {r['quant_rel_err']:.4f}")
    print("selfcheck:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``treeq selfcheck`` takes no options."""


def run_cli(args: argparse.Namespace) -> int:
    return main()
