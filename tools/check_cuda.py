#!/usr/bin/env python3
"""Compile-check every CUDA source in csrc/ for each target architecture, without a GPU.

For each ``csrc/*.cu`` and each arch (default sm_90a and sm_80) this runs nvcc through ptxas with ``-v`` and
fails on any compile or ptxas error. It reports registers, shared memory and spills per kernel, and enforces
instruction markers written in the source:

    // treeq-ptx-requires(sm_90a): wgmma.mma_async

means "the PTX generated for sm_90a must contain wgmma.mma_async" (proof that the tensor-core path was really
emitted, not compiled away). ``--no-spills`` turns spill warnings into failures.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARCHS = {"sm_90a": "arch=compute_90a,code=sm_90a", "sm_80": "arch=compute_80,code=sm_80"}
MARKER = re.compile(r"//\s*treeq-ptx-requires\((sm_\w+)\):\s*(\S+)")
FLAGS = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-DTREEQ_CUDA_ARCHS=\"80,90a\"", f"-I{ROOT / 'csrc'}"]


def compile_one(nvcc: str, src: Path, arch: str, tmp: Path) -> tuple[bool, str]:
    out = tmp / f"{src.stem}.{arch}.o"
    cmd = [nvcc, "-c", str(src), "-o", str(out), f"-gencode={ARCHS[arch]}", "-Xptxas", "-v", *FLAGS]
    r = subprocess.run(cmd, capture_output=True, text=True)
    log = r.stdout + r.stderr
    ok = r.returncode == 0
    report = [f"{src.name} [{arch}]: {'ok' if ok else 'FAILED'}"]
    for line in log.splitlines():
        if "Compiling entry function" in line:
            report.append("  " + line.split("ptxas info    :")[-1].strip())
        elif re.search(r"Used \d+ registers", line) or "spill" in line or "error" in line.lower():
            report.append("    " + line.strip())
    markers = [m for m in MARKER.findall(src.read_text()) if m[0] == arch]
    if ok and markers:
        ptx = tmp / f"{src.stem}.{arch}.ptx"
        r = subprocess.run([nvcc, "-ptx", str(src), "-o", str(ptx), f"-arch={arch}", *FLAGS],
                           capture_output=True, text=True)
        text = ptx.read_text() if r.returncode == 0 else ""
        for _, instr in markers:
            n = text.count(instr)
            ok = ok and n > 0
            report.append(f"  requires '{instr}' in {arch} PTX: {'found ' + str(n) if n else 'MISSING'}")
    return ok, "\n".join(report)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", action="append", choices=sorted(ARCHS), help="architectures (default: all)")
    ap.add_argument("--no-spills", action="store_true", help="fail when ptxas reports spill stores/loads")
    ap.add_argument("sources", nargs="*", type=Path, help="default: csrc/*.cu")
    args = ap.parse_args()
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        print("check_cuda: nvcc not found on PATH", file=sys.stderr)
        return 1
    sources = args.sources or sorted((ROOT / "csrc").glob("*.cu"))
    if not sources:
        print("check_cuda: no CUDA sources found", file=sys.stderr)
        return 1
    archs = args.arch or list(ARCHS)
    ok_all = True
    with tempfile.TemporaryDirectory() as tmp, cf.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        jobs = [pool.submit(compile_one, nvcc, s, a, Path(tmp)) for s in sources for a in archs]
        for job in jobs:
            ok, report = job.result()
            print(report)
            if args.no_spills and re.search(r"[1-9]\d* bytes spill", report):
                print("  spills are not allowed (--no-spills)")
                ok = False
            ok_all &= ok
    print(f"check_cuda: {len(sources)} source(s) x {len(archs)} arch(s): {'PASS' if ok_all else 'FAIL'}")
    return 0 if ok_all else 1


if __name__ == "__main__":
    sys.exit(main())
