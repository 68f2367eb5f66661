#!/usr/bin/env python3
"""CUDA packed-GEMM benchmark on the DiT-XL/2 linears, with the peers in the same run (one command on the H100):

    python benchmarks/bench_cuda.py --write          # full table, appended to benchmarks/RESULTS.md
    python benchmarks/bench_cuda.py --quick          # a few shapes, printed only

Rows: M tokens × (K, N) for qkv (1152, 3456), proj (1152, 1152), fc1 (1152, 4608), fc2 (4608, 1152).
Columns (µs, CUDA-graph replays, median; ratios are bf16 time / this time):
  bf16        cuBLAS ``F.linear`` on bf16 (the baseline)
  fp8         ``torch._scaled_mm`` e4m3, row-wise scales, activations already quantized
  fp8+q       the same with its dynamic per-token quantization in torch ops
  int8        ``torch._int_mm`` (no scaling)
  triton      the Triton backend's W4A8 quantize + GEMM, when that backend is registered
  cuda W8A8 / W4A8 / W4A4   this repo's activation quantization + packed GEMM (wgmma on sm_90), quantization
              included; ``+gmb`` adds the Monarch branch (b = 32, r = 1, the default GMB size) fused into both
  cuda W4A8 gemm  the GEMM alone on pre-quantized activations; ``sm80`` the mma.sync kernel on the same device
Floors per format: operations / 1979 TOPS (dense int8/fp8 peak), minimum bytes / 3.35 TB/s. Each CUDA row is
spot-checked against the reference backend before it is timed ("WRONG" instead of a time if it fails).
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from treeq_engine.branches import MonarchShape  # noqa: E402
from treeq_engine.format import QuantSpec  # noqa: E402
from treeq_engine.kernels import PackedWeight, backends, reference  # noqa: E402

from record import git_commit, save_json, write_section  # noqa: E402  (benchmarks/record.py)

PEAK_OPS = 1979e12   # H100 SXM dense int8 / fp8
PEAK_BW = 3.35e12    # H100 SXM HBM3
SHAPES = {"qkv": (1152, 3456), "proj": (1152, 1152), "fc1": (1152, 4608), "fc2": (4608, 1152)}
MS = (256, 1024, 2048, 4096, 8192, 16384)


def bench(fn, rep_ms: int = 25) -> float:
    """Median µs of CUDA-graph replays over about ``rep_ms`` ms (triton.testing.do_bench_cudagraph), or of 100
    timed launches without it."""
    fn()
    torch.cuda.synchronize()
    try:
        from triton.testing import do_bench_cudagraph

        return 1e3 * do_bench_cudagraph(fn, rep=rep_ms, return_mode="median")
    except ImportError:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(100):
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3)
        times.sort()
        return times[len(times) // 2]


def floors(m: int, k: int, n: int, a_bytes: float, w_bytes: float) -> tuple[float, float]:
    ops = 2 * m * n * k / PEAK_OPS * 1e6
    byt = (m * k * a_bytes + n * k * w_bytes + m * n * 2) / PEAK_BW * 1e6
    return ops, byt


def fp8_rowwise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    amax = x.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12)
    scale = amax / 448.0
    return (x.float() / scale).to(torch.float8_e4m3fn), scale


def sass_evidence() -> str:
    """Counts of tensor-core instructions in the built core's SASS (cuobjdump), if the tool is present."""
    tool = shutil.which("cuobjdump")
    import treeq_engine._C as C

    if tool is None:
        return "cuobjdump not found: SASS evidence not collected"
    out = subprocess.run([tool, "-sass", C.__file__], capture_output=True, text=True).stdout
    lines, kernel, counts = [], None, {}
    for line in out.splitlines():
        if "Function :" in line:
            kernel = line.split("Function :")[-1].strip()
        for op in ("IGMMA", "HGMMA", "QGMMA", "IMMA", "HMMA"):
            if op in line and kernel:
                counts.setdefault(kernel, {}).setdefault(op, 0)
                counts[kernel][op] += 1
    for kname, c in sorted(counts.items()):
        short = kname[:90]
        lines.append(f"  {short}: " + ", ".join(f"{op} ×{v}" for op, v in sorted(c.items())))
    return "\n".join(lines) if lines else "no tensor-core instructions found in SASS"


class Layer:
    """One linear at one format: weights, Monarch factors, inputs (bf16 rows)."""

    def __init__(self, m: int, k: int, n: int, w_bits: int, a_bits: int, gen: torch.Generator):
        self.m, self.k, self.n = m, k, n
        self.w = torch.randn(n, k, generator=gen) * 0.02
        self.pw = PackedWeight.from_float(self.w, QuantSpec.weight(w_bits)).to("cuda")
        self.spec = QuantSpec.activation(a_bits)
        s = MonarchShape.matching_lowrank(n, k, 32, 1)
        self.w1 = (torch.randn(s.w1_shape, generator=gen) * 0.02).cuda()
        self.w2 = (torch.randn(s.w2_shape, generator=gen) * 0.02).cuda()
        self.x = (torch.randn(m, k, generator=gen)).cuda().to(torch.bfloat16)
        self.bias = torch.randn(n, generator=gen).cuda()


def check(layer: Layer, cb, gmb: bool, arch: int = 0) -> bool:
    """The CUDA result on the first 256 rows against the reference backend (bf16 output, bf16 branch)."""
    x = layer.x[:256]
    a = cb.quantize_activation(x, layer.spec, monarch_w1=layer.w1 if gmb else None)
    y = cb.packed_linear(a, layer.pw, bias=layer.bias, monarch_w2=layer.w2 if gmb else None, arch=arch)
    ra = reference.quantize_activation(x.cpu(), layer.spec, monarch_w1=layer.w1.cpu() if gmb else None)
    ry = reference.packed_linear(ra, layer.pw.to("cpu"), bias=layer.bias.cpu(),
                                 monarch_w2=layer.w2.cpu() if gmb else None, out_dtype=torch.float32)
    err = (y.float().cpu() - ry).abs().max().item()
    return err <= 0.02 * ry.abs().max().item() + 1e-3


def measured(r: dict, key: str, fn) -> None:
    """``r[key] = fn()``; a failure is recorded in its cell ("ERR …") and the rest of the table still runs."""
    try:
        r[key] = fn()
    except Exception as e:  # noqa: BLE001 - one broken column must not lose the others
        r[key] = f"ERR {type(e).__name__}"
        print(f"{r['layer']} M={r['M']} {key}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)


def run(ms, shapes, quick: bool, on_row=lambda rows: None) -> list[dict]:
    from treeq_engine.kernels import cuda_backend as cb

    gen = torch.Generator().manual_seed(0)
    rows = []
    for name, (k, n) in shapes.items():
        for m in ms:
            r = {"layer": name, "M": m, "K": k, "N": n}
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            wb = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
            measured(r, "bf16", lambda: bench(lambda: F.linear(x, wb)))
            x8, sx = fp8_rowwise(x)
            w8, sw = fp8_rowwise(wb)
            measured(r, "fp8", lambda: bench(lambda: torch._scaled_mm(x8, w8.t(), scale_a=sx, scale_b=sw.t(),
                                                                      out_dtype=torch.bfloat16)))

            def fp8q():
                xq, s = fp8_rowwise(x)
                return torch._scaled_mm(xq, w8.t(), scale_a=s, scale_b=sw.t(), out_dtype=torch.bfloat16)

            measured(r, "fp8+q", lambda: bench(fp8q))
            xi = torch.randint(-128, 127, (m, k), device="cuda", dtype=torch.int8)
            wi = torch.randint(-128, 127, (n, k), device="cuda", dtype=torch.int8)
            # B column-major ("TN"): cuBLAS on CUDA 13 does not support the all-row-major int8 case
            measured(r, "int8", lambda: bench(lambda: torch._int_mm(xi, wi.t())))
            for fmt, (wbits, abits) in {"W8A8": (8, 8), "W4A8": (4, 8), "W4A4": (4, 4)}.items():
                layer = Layer(m, k, n, wbits, abits, gen)
                for gmb in (False, True):
                    key = f"cuda {fmt}" + ("+gmb" if gmb else "")
                    if quick and gmb and fmt != "W4A8":
                        continue
                    w1, w2 = (layer.w1, layer.w2) if gmb else (None, None)

                    def timed(gmb=gmb, w1=w1, w2=w2):
                        if not check(layer, cb, gmb):
                            return "WRONG"
                        return bench(lambda: cb.packed_linear(
                            cb.quantize_activation(layer.x, layer.spec, monarch_w1=w1), layer.pw, bias=layer.bias,
                            monarch_w2=w2))

                    measured(r, key, timed)
                if fmt == "W4A8":
                    def gemm_only(arch=0):
                        a = cb.quantize_activation(layer.x, layer.spec)
                        if arch and not check(layer, cb, False, arch=arch):
                            return "WRONG"
                        return bench(lambda: cb.packed_linear(a, layer.pw, bias=layer.bias, arch=arch))

                    measured(r, "cuda W4A8 gemm", gemm_only)
                    if name in ("proj", "fc2"):   # the layers whose output joins the residual stream
                        residual_ab(r, layer, cb)
                    if torch.cuda.get_device_capability() == (9, 0):
                        measured(r, "cuda W4A8 gemm sm80", lambda: gemm_only(80))
                    if "triton" in backends():
                        from treeq_engine.kernels import packed_linear, quantize_activation

                        measured(r, "triton W4A8", lambda: bench(lambda: packed_linear(
                            quantize_activation(layer.x, layer.spec, backend="triton"), layer.pw, bias=layer.bias,
                            backend="triton")))
            r["floor W4A8"] = floors(m, k, n, 1, 0.5)
            r["floor W4A4"] = floors(m, k, n, 0.5, 0.5)
            r["floor bf16"] = floors(m, k, n, 2, 2)
            rows.append(r)
            print(fmt_row(r), flush=True)
            on_row(rows)
    return rows


def residual_ab(r: dict, layer, cb) -> None:
    """The DiT block's gated residual ``x + gate ⊙ layer(·)`` (one gate row per 256-token image) fused into the
    GEMM's store against the GEMM followed by the multiply and add the unfused block runs, quantization included
    in both. The fused result must equal the oracle's gated residual of the GEMM's own output, bit for bit."""
    from treeq_engine.kernels.reference import gated_residual

    m, n = layer.x.shape[0], layer.pw.n
    images = max(1, m // 256)
    res = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    gate = torch.randn(images, n, device="cuda")
    gate16 = gate.to(torch.bfloat16)

    def fused():
        return cb.packed_linear(cb.quantize_activation(layer.x, layer.spec), layer.pw, bias=layer.bias, residual=res,
                                gate=gate)

    def unfused():
        y = cb.packed_linear(cb.quantize_activation(layer.x, layer.spec), layer.pw, bias=layer.bias)
        return res.view(images, -1, n) + gate16.unsqueeze(1) * y.view(images, -1, n)

    def timed(fn):
        y = cb.packed_linear(cb.quantize_activation(layer.x, layer.spec), layer.pw, bias=layer.bias)
        if not torch.equal(fused().cpu(), gated_residual(y.cpu(), res.cpu(), gate.cpu())):
            return "WRONG"
        return bench(fn)

    measured(r, "cuda W4A8 +residual", lambda: timed(fused))
    measured(r, "cuda W4A8, residual unfused", lambda: timed(unfused))


COLUMNS = ["bf16", "fp8", "fp8+q", "int8", "triton W4A8", "cuda W4A8 gemm", "cuda W4A8 gemm sm80", "cuda W8A8",
           "cuda W4A8", "cuda W4A4", "cuda W8A8+gmb", "cuda W4A8+gmb", "cuda W4A4+gmb", "cuda W4A8 +residual",
           "cuda W4A8, residual unfused"]


def fmt_cell(r: dict, c: str) -> str:
    v = r.get(c)
    if v is None:
        return "–"
    if isinstance(v, str):
        return v
    if c == "bf16" or not isinstance(r.get("bf16"), float) or math.isnan(v):
        return f"{v:.1f}"
    return f"{v:.1f} ({r['bf16'] / v:.2f}×)"


def fmt_row(r: dict) -> str:
    ops = 2 * r["M"] * r["N"] * r["K"]
    fo, fb = r["floor W4A8"]
    cells = [r["layer"], str(r["M"])] + [fmt_cell(r, c) for c in COLUMNS]
    best = min((v for c, v in r.items() if c.startswith("cuda W4A") and "residual" not in c and isinstance(v, float)),
               default=None)
    tops = f"{ops / best / 1e6:.0f}" if best else "–"
    return "| " + " | ".join(cells + [f"{fo:.1f} / {fb:.1f}", tops]) + " |"


def table(rows: list[dict]) -> str:
    head = ["layer", "M"] + COLUMNS + ["W4A8 floor ops/bytes µs", "best W4 TOPS"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += [fmt_row(r) for r in rows]
    return "\n".join(lines)


def targets(rows: list[dict]) -> str:
    """The issue's targets, W4A8 and W4A4 with the branch and quantization fused."""
    out = []
    for r in rows:
        for fmt in ("W4A8", "W4A4"):
            v = r.get(f"cuda {fmt}+gmb")
            if not isinstance(v, float) or not isinstance(r.get("bf16"), float):
                continue
            sp = r["bf16"] / v
            need = 2.0 if r["M"] <= 256 else 1.8 if r["M"] >= 2048 else None
            fp8q = r.get("fp8+q")
            have_fp8 = isinstance(fp8q, float) and not math.isnan(fp8q)
            ok = (need is None or sp >= need) and (not have_fp8 or v < fp8q)
            out.append(f"{r['layer']} M={r['M']} {fmt}+gmb: {sp:.2f}× bf16"
                       + (f" (target {need}×)" if need else "")
                       + (f", fp8+q {fp8q:.1f} µs vs {v:.1f} µs" if have_fp8 else ", fp8+q not measured")
                       + (": met" if ok else ": MISSED"))
    return "\n".join(out)


BEGIN, END = "<!-- bench_cuda:begin -->", "<!-- bench_cuda:end -->"


def render(rows: list[dict], sass: str) -> str:
    dev = torch.cuda.get_device_name()
    head = (f"## CUDA kernels: {dev}, commit {git_commit()}, {datetime.date.today()}\n\n"
            f"torch {torch.__version__}, CUDA {torch.version.cuda}; µs (CUDA-graph replays, median), "
            f"(× = bf16 time / this time). Floors: ops / 1979 TOPS, bytes / 3.35 TB/s.\n")
    return "\n".join([BEGIN, head, table(rows), "", "Targets:", "```", targets(rows), "```", "", "SASS:", "```",
                      sass, "```", END])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="M in (256, 2048), qkv and fc1 only, fewer columns")
    ap.add_argument("--m", type=int, nargs="*", help="token counts (default: all, or --quick's)")
    ap.add_argument("--shapes", nargs="*", choices=sorted(SHAPES), help="layers (default: all, or --quick's)")
    ap.add_argument("--write", action="store_true",
                    help="write the table into benchmarks/RESULTS.md (after every row, so a cut-off run keeps it)")
    ap.add_argument("--json", type=Path, default=None, help="also write the raw rows as JSON (after every row)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_cuda: no CUDA device; this benchmark runs on a GPU machine (see benchmarks/RESULTS.md)",
              file=sys.stderr)
        return 2
    from treeq_engine.kernels import cuda_backend as cb

    if not cb.available():
        print("bench_cuda: treeq_engine._C was built without CUDA; rebuild with TREEQ_CUDA=1", file=sys.stderr)
        return 2
    ms = tuple(args.m) if args.m else (256, 2048) if args.quick else MS
    names = args.shapes or (("qkv", "fc1") if args.quick else tuple(SHAPES))
    shapes = {k: SHAPES[k] for k in names}
    try:
        sass = sass_evidence()
    except Exception as e:  # noqa: BLE001 - evidence is optional, the timings are not
        sass = f"SASS evidence not collected: {type(e).__name__}: {e}"

    def on_row(rows: list[dict]) -> None:
        if args.json:
            save_json(args.json, rows)
        if args.write:
            write_section(render(rows, sass), BEGIN, END)

    rows = run(ms, shapes, args.quick, on_row)
    print(render(rows, sass))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
