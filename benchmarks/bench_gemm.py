"""GEMM benchmark on the DiT-XL/2 linear shapes; writes its section of benchmarks/RESULTS.md.

One command on a GPU machine (CUDA-graph timing, ``triton.testing.do_bench_cudagraph``, peers in the same run):

    python benchmarks/bench_gemm.py                 # every shape and M (resumable: --resume)
    python benchmarks/bench_gemm.py --quick         # M ∈ {256, 2048, 8192}
    python benchmarks/bench_gemm.py --probe         # the Gluon W4A8 main-loop probe against bf16 only

Implementations, per (K, N) ∈ DiT-XL/2 and tokens M:
  bf16            cuBLAS ``F.linear``
  fp8             ``torch._scaled_mm`` rowwise, activations already quantized
  fp8+q           the same with its dynamic per-token quantization (torch ops)
  int_mm          ``torch._int_mm`` (int8 × int8 → int32, no epilogue)
  unfused W8A8    Triton row quantizer, Triton GEMM (no branch), Monarch branch as torch bmm, add
  plain WxAy      quantization with Monarch stage 1 (one kernel) + plain-Triton GEMM with the fused branch
  gluon WxAy      the same with the Gluon sm_90 GEMM
  plain/gluon WxAy gemm   the GEMM alone (codes given, no branch): the number to hold against fp8 / int_mm
  gluon W4A8 probe        the Gluon main loop alone (no epilogue)

``--predict`` (no GPU needed) writes the floors and a stated model's predicted ratios instead.

The branch is the default GMB size (``MonarchShape.matching_lowrank``: b = 32 blocks, rank 1). Reported: µs
(median of CUDA-graph replays), TOPS = 2MNK / t, ratio to bf16 (> 1 is faster), and the two floors
(ops / 1979 TOPS, bytes / 3.35 TB/s with bytes = M·K·a + N·K·w + M·N·2). Without a GPU it says so and exits.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from record import git_commit, save_json, write_section  # noqa: E402  (benchmarks/record.py)

SHAPES = [(1152, 3456, "qkv"), (1152, 1152, "proj"), (1152, 4608, "fc1"), (4608, 1152, "fc2"),
          (1152, 6912, "adaLN")]
MS = [256, 512, 1024, 2048, 4096, 8192, 16384, 32768]
QUICK_MS = [256, 2048, 8192]
PEAK_OPS = 1979e12  # H100 SXM dense int8 / fp8
PEAK_BW = 3.35e12  # H100 SXM HBM3
BEGIN, END = "<!-- bench_gemm:begin -->", "<!-- bench_gemm:end -->"
PBEGIN, PEND = "<!-- bench_gemm:predictions:begin -->", "<!-- bench_gemm:predictions:end -->"
QBEGIN, QEND = "<!-- bench_gemm:probe:begin -->", "<!-- bench_gemm:probe:end -->"

# The prediction model (not a measurement). Calibrated on docs/sources.md: cuBLAS bf16 reaches
# ~650 TFLOP/s on these shapes plus ~3 µs of latency/tail (7.0 / 33.9 / 134 µs at M = 256 / 2048 / 8192 for
# K = 1152, N = 4608 are reproduced within 5 %); a plain-Triton int8 GEMM ran 1.24–1.40× bf16 (~860 TOPS).
MODEL = dict(bf16_tops=650e12, plain_int8_tops=860e12, plain_w4_tops=400e12, gluon_int8_tops=1100e12,
             tail_us=3.0, hbm=3.0e12, l2=7.0e12, branch_tops=500e12)


def floors_us(m: int, k: int, n: int, a_bytes: float, w_bytes: float) -> tuple[float, float]:
    ops = 2.0 * m * n * k / PEAK_OPS * 1e6
    mem = (m * k * a_bytes + n * k * w_bytes + m * n * 2) / PEAK_BW * 1e6
    return ops, mem


def _rowwise_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    amax = x.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12)
    scale = amax / 448.0
    return (x.float() / scale).to(torch.float8_e4m3fn), scale


def build_cases(m: int, k: int, n: int, probe_only: bool = False) -> dict[str, tuple[Callable[[], object], float, float]]:
    """name -> (fn, activation bytes/elt, weight bytes/elt) on fresh random DiT-like operands."""
    from treeq_engine.branches import MonarchShape, monarch
    from treeq_engine.format import QuantSpec
    from treeq_engine.kernels import PackedWeight
    from treeq_engine.kernels.triton import backend, gemm, gluon_gemm

    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(m, k, device=dev, generator=g).to(torch.bfloat16)
    w = (torch.randn(n, k, device=dev, generator=g) * 0.05).to(torch.bfloat16)
    sm90 = torch.cuda.get_device_capability() == (9, 0)
    cases: dict[str, tuple[Callable[[], object], float, float]] = {}
    cases["bf16"] = (lambda: F.linear(x, w), 2, 2)
    pw = {b: PackedWeight.from_float(w.float(), QuantSpec.weight(b)) for b in (8, 4)}

    def gemm_only(impl, bits, abits, epilogue=True):
        act = backend.quantize_activation(x, QuantSpec.activation(abits))
        p = pw[bits]
        fn = gemm.packed_gemm if impl == "plain" else gluon_gemm.packed_gemm
        kw = {} if impl == "plain" else {"epilogue": epilogue}
        return lambda: fn(act.codes, act.scale, act.zero_point, act.row_sum, p.packed, bits, n, p.scale,
                          p.zero_point, p.col_sum, **kw)

    if sm90:
        cases["gluon W4A8 probe"] = (gemm_only("gluon", 4, 8, epilogue=False), 1, 0.5)
    if probe_only:
        return cases

    if hasattr(torch, "_scaled_mm") and torch.cuda.get_device_capability() >= (8, 9):
        a8, sa = _rowwise_fp8(x)
        b8, sb = _rowwise_fp8(w)
        sbt = sb.reshape(1, n).contiguous()
        cases["fp8"] = (lambda: torch._scaled_mm(a8, b8.t(), scale_a=sa, scale_b=sbt, out_dtype=torch.bfloat16),
                        1, 1)

        def fp8q():
            qa, s = _rowwise_fp8(x)
            return torch._scaled_mm(qa, b8.t(), scale_a=s, scale_b=sbt, out_dtype=torch.bfloat16)

        cases["fp8+q"] = (fp8q, 2, 1)
    ai = torch.randint(-128, 128, (m, k), device=dev, dtype=torch.int8)
    wi = torch.randint(-128, 128, (n, k), device=dev, dtype=torch.int8)
    cases["int_mm"] = (lambda: torch._int_mm(ai, wi.t()), 1, 1)

    shp = MonarchShape.matching_lowrank(n, k)
    w1 = torch.randn(shp.w1_shape, device=dev, generator=g) * 0.05
    w2 = torch.randn(shp.w2_shape, device=dev, generator=g) * 0.05
    w1b, w2b = w1.to(torch.bfloat16), w2.to(torch.bfloat16)
    bias = torch.randn(n, device=dev, generator=g)

    def unfused():
        act = backend.quantize_activation(x, QuantSpec.activation(8))
        p = pw[8]
        y = gemm.packed_gemm(act.codes, act.scale, act.zero_point, act.row_sum, p.packed, 8, n, p.scale,
                             p.zero_point, p.col_sum, bias=bias)
        return y + monarch.forward(x, w1b, w2b, n)

    cases["unfused W8A8"] = (unfused, 2, 1)

    def fused(impl, bits, abits):
        p = pw[bits]
        fn = gemm.packed_gemm if impl == "plain" else gluon_gemm.packed_gemm

        def run():
            act = backend.quantize_activation(x, QuantSpec.activation(abits), monarch_w1=w1)
            return fn(act.codes, act.scale, act.zero_point, act.row_sum, p.packed, bits, n, p.scale, p.zero_point,
                      p.col_sum, bias=bias, z=act.z, w2=w2)

        return run

    for bits, abits in ((8, 8), (4, 8), (4, 4)):
        cases[f"plain W{bits}A{abits}"] = (fused("plain", bits, abits), 2, bits / 8)
        if sm90:
            cases[f"gluon W{bits}A{abits}"] = (fused("gluon", bits, abits), 2, bits / 8)
    cases["plain W8A8 gemm"] = (gemm_only("plain", 8, 8), 1, 1)
    cases["plain W4A8 gemm"] = (gemm_only("plain", 4, 8), 1, 0.5)
    if sm90:
        cases["gluon W8A8 gemm"] = (gemm_only("gluon", 8, 8), 1, 1)
        cases["gluon W4A8 gemm"] = (gemm_only("gluon", 4, 8), 1, 0.5)
    return cases


def time_us(fn: Callable[[], object]) -> float:
    import triton.testing

    fn()  # compile / autotune / caches outside the graph
    torch.cuda.synchronize()
    return float(triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median")) * 1e3


def predict_us(impl: str, m: int, k: int, n: int) -> float:
    """Predicted µs of one implementation under MODEL (see RESULTS.md for the reasoning)."""
    from treeq_engine.branches import MonarchShape

    md = MODEL
    ops = 2.0 * m * n * k
    if impl == "bf16":
        return max(ops / md["bf16_tops"], (2 * m * k + 2 * n * k + 2 * m * n) / md["hbm"]) * 1e6 + md["tail_us"]
    bits = int(impl.split("W")[1][0])
    tops = md["gluon_int8_tops"] if impl.startswith("gluon") else \
        md["plain_int8_tops"] if bits == 8 else md["plain_w4_tops"]
    gemm = max(ops / tops, (m * k + n * k * bits / 8 + 2 * m * n) / md["hbm"]) * 1e6 + md["tail_us"]
    if impl.endswith("gemm"):
        return gemm
    if impl.endswith("no branch"):
        return gemm + (3 * m * k) / md["hbm"] * 1e6 + md["tail_us"]
    s = MonarchShape.matching_lowrank(n, k)
    zw = s.z_width  # b·b·r values per token, bf16
    quant = (2 * m * k + m * k + 2 * m * zw) / md["hbm"] * 1e6 + md["tail_us"]  # x in, codes + z out
    blocks_read = tile_block_overlaps(n, s.nb, 128)  # Σ over 128-channel tiles of the blocks each overlaps
    z_reads = m * blocks_read * s.blocks * s.rank * 2  # each tile reads z[:, j, :] of its own blocks
    macs = m * blocks_read * 128 * s.blocks * s.rank  # one masked (tile × b·r) product per overlapped block
    branch = (z_reads / md["l2"] + 2.0 * macs / md["branch_tops"]) * 1e6
    return quant + gemm + branch


def tile_block_overlaps(n: int, nb: int, tile: int) -> int:
    """Σ over the ``tile``-channel tiles of N of the Monarch output blocks (``nb`` contiguous channels) each
    tile overlaps: the z slices a fused epilogue reads per token."""
    return sum((min(n, t + tile) - 1) // nb - t // nb + 1 for t in range(0, n, tile))


def render_predictions() -> str:
    impls = ["plain W8A8", "plain W4A8", "gluon W4A8", "gluon W4A8 no branch", "gluon W4A8 gemm"]
    out = [PBEGIN, "## GEMM on the DiT-XL/2 shapes: floors and predictions (no GPU measurement yet)", "",
           "Written by `python benchmarks/bench_gemm.py --predict` (CPU). **Predictions, not measurements**: a "
           "roofline-style model calibrated on the H100 peers of `docs/sources.md`: cuBLAS bf16 "
           f"{MODEL['bf16_tops'] / 1e12:.0f} TFLOP/s + {MODEL['tail_us']:.0f} µs tail; plain-Triton int8 "
           f"{MODEL['plain_int8_tops'] / 1e12:.0f} TOPS for 8-bit weights (measured 1.24–1.40× bf16 there), "
           f"{MODEL['plain_w4_tops'] / 1e12:.0f} TOPS for unpacked 4-bit weights (three such layouts measured "
           "0.35–0.88× bf16 there); Gluon RS-wgmma int8 "
           f"{MODEL['gluon_int8_tops'] / 1e12:.0f} TOPS (56 % of the 1979 TOPS peak; the compiled main loop issues "
           "~150 instructions per warp per 128-deep K-step against 512 tensor-core cycles, so it should be "
           f"MMA-bound, but nothing here is measured); HBM {MODEL['hbm'] / 1e12:.1f} TB/s, L2 "
           f"{MODEL['l2'] / 1e12:.0f} TB/s. The fused rows include the activation-quantization kernel (reads bf16 "
           "x, writes int8 codes and the bf16 Monarch stage-1 output z of b·b·r = 1024 values per token for the "
           "default b = 32, r = 1 branch) and the branch's stage 2 in the GEMM epilogue (each 128-channel tile "
           "reads from L2 the z slices, b·r values per token, of the 1–5 contiguous output blocks it overlaps, "
           "and multiplies each on bf16 tensor cores). W4A4 costs what W4A8 "
           "does (activation codes are int8 either way on Hopper). `no branch` is quantization (no z) + GEMM; "
           "`gemm` the GEMM alone.", "",
           "Floors per implementation: ops / 1979 TOPS and bytes / 3.35 TB/s (bytes = M·K·1 + N·K·w/8 + M·N·2, "
           "GEMM operands only). Targets (issue 10): W8A8 plain ≥ 1.3× bf16 at M ≥ 2048; W4A8 and W4A4 (Gluon) "
           "≥ 1.5× at M ≥ 2048 and ≥ 1.3× at M = 256, branch fused and quantization included.", ""]
    for k, n, label in SHAPES:
        out += [f"### {label}: K = {k}, N = {n}", "",
                "| M | floor ops µs | floor bytes µs (W8 / W4) | bf16 µs (model) | " + " | ".join(
                    f"{i} ×bf16" for i in impls) + " |",
                "|---|---|---|---|" + "---|" * len(impls)]
        for m in MS:
            fo, f8 = floors_us(m, k, n, 1, 1)
            _, f4 = floors_us(m, k, n, 1, 0.5)
            b = predict_us("bf16", m, k, n)
            cells = " | ".join(f"{b / predict_us(i, m, k, n):.2f}" for i in impls)
            out.append(f"| {m} | {fo:.1f} | {f8:.1f} / {f4:.1f} | {b:.1f} | {cells} |")
        out.append("")
    out.append(PEND)
    return "\n".join(out)


def device_line() -> str:
    p = torch.cuda.get_device_properties(0)
    clocks = ""
    try:
        clocks = subprocess.run(["nvidia-smi", "--query-gpu=clocks.max.sm,power.limit,driver_version",
                                 "--format=csv,noheader"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    import triton

    return (f"{p.name} ({p.multi_processor_count} SMs, sm_{p.major}{p.minor}) {clocks}; torch {torch.__version__}, "
            f"triton {triton.__version__}")


def render(rows: list[dict], header: str, probe: bool = False) -> str:
    title = "## Gluon W4A8 main-loop probe (measured)" if probe else "## GEMM on the DiT-XL/2 shapes (measured)"
    out = [QBEGIN if probe else BEGIN, title, "", header, "",
           "µs: median CUDA-graph replay. ×bf16 > 1 is faster than cuBLAS bf16 in the same run. Floors: ops / 1979 "
           "TOPS and bytes / 3.35 TB/s (bytes = M·K·a + N·K·w + M·N·2 for the implementation's operand widths).",
           ""]
    for k, n, label in SHAPES:
        sel = [r for r in rows if r["k"] == k and r["n"] == n]
        if not sel:
            continue
        out += [f"### {label}: K = {k}, N = {n}", "", "| M | implementation | µs | TOPS | ×bf16 | floor ops µs | "
                "floor bytes µs |", "|---|---|---|---|---|---|---|"]
        for r in sorted(sel, key=lambda r: (r["m"], r["order"])):
            if "error" in r:
                out.append(f"| {r['m']} | {r['impl']} | error: {r['error'][:80]} | | | | |")
                continue
            out.append(f"| {r['m']} | {r['impl']} | {r['us']:.1f} | {r['tops']:.0f} | {r['ratio']:.2f} | "
                       f"{r['floor_ops']:.1f} | {r['floor_mem']:.1f} |")
        out.append("")
    out.append(QEND if probe else END)
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help=f"M ∈ {QUICK_MS}")
    p.add_argument("--probe", action="store_true", help="only the Gluon W4A8 main-loop probe against bf16")
    p.add_argument("--m", type=int, nargs="*", help="token counts (default: all)")
    p.add_argument("--shapes", nargs="*", help="shape labels (qkv proj fc1 fc2 adaLN)")
    p.add_argument("--resume", action="store_true", help="skip points already in the JSON record")
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "bench_gemm.json")
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    p.add_argument("--predict", action="store_true", help="write the floors and the model's predictions (no GPU)")
    args = p.parse_args(argv)
    if args.predict:
        write_section(render_predictions(), PBEGIN, PEND, args.results)
        print(render_predictions())
        return 0
    if not torch.cuda.is_available():
        print("bench_gemm: no CUDA device here; the GEMM benchmark needs a GPU (nothing measured or written).")
        return 2
    from tqdm import tqdm

    ms = args.m or (QUICK_MS if args.quick or args.probe else MS)
    shapes = [s for s in SHAPES if not args.shapes or s[2] in args.shapes]
    dev, rev = device_line(), git_commit()
    header = (f"Device: {dev}. Commit {rev}. Command: `python benchmarks/bench_gemm.py "
              f"{' '.join(argv if argv is not None else sys.argv[1:])}`. Autotune: "
              f"{'off (heuristic configs)' if os.environ.get('TREEQ_TRITON_AUTOTUNE') == '0' else 'on'}.")
    rows: list[dict] = []
    if args.resume and args.json.exists():
        rows = [r for r in json.loads(args.json.read_text()) if r.get("device") == dev]
    done = {(r["k"], r["n"], r["m"], r["impl"]) for r in rows if "error" not in r}  # failed ones run again
    points = [(k, n, m) for k, n, _ in shapes for m in ms]
    for k, n, m in tqdm(points, desc="shapes × M"):
        cases = build_cases(m, k, n, probe_only=args.probe)
        ref_us = None
        for order, (name, (fn, ab, wb)) in enumerate(cases.items()):
            if (k, n, m, name) in done and name != "bf16":
                continue
            row = dict(k=k, n=n, m=m, impl=name, order=order, device=dev, commit=rev, time=time.time())
            try:
                us = time_us(fn)
                ref_us = us if name == "bf16" else ref_us
                fo, fm = floors_us(m, k, n, ab, wb)
                row.update(us=us, tops=2.0 * m * n * k / us / 1e6, ratio=(ref_us or float("nan")) / us,
                           floor_ops=fo, floor_mem=fm)
            except Exception as e:  # one failing peer (e.g. no FP8 here) must not lose the table
                row["error"] = f"{type(e).__name__}: {e}"
            rows = [r for r in rows if (r["k"], r["n"], r["m"], r["impl"]) != (k, n, m, name)] + [row]
        # after every point, so a run cut off by a time limit keeps its record and its table
        save_json(args.json, rows)
        write_section(render(rows, header, args.probe), *((QBEGIN, QEND) if args.probe else (BEGIN, END)),
                      args.results)
        del cases
        torch.cuda.empty_cache()
    print(render(rows, header, args.probe))
    return 0


if __name__ == "__main__":
    sys.exit(main())
