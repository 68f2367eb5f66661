#!/usr/bin/env python3
"""Compile-check every CUDA source in csrc/ for each target architecture, without a GPU.

For each ``csrc/*.cu`` and each arch (default sm_90a and sm_80) this runs nvcc through ptxas with ``-v`` and
fails on any compile or ptxas error. It reports registers, shared memory and spills per kernel, and enforces
instruction markers written in the source:

    // treeq-ptx-requires(sm_90a): wgmma.mma_async

means "the PTX generated for sm_90a must contain wgmma.mma_async" (proof that the tensor-core path was really
emitted, not compiled away). ``--no-spills`` turns spill warnings into failures.

With ``cuobjdump`` at hand (on PATH, in ``$CUDA_HOME/bin``, or the copy bundled with Triton) it also reads the SASS
ptxas produced and reports, per kernel, the tensor-core instructions (IGMMA/HGMMA: wgmma; IMMA/HMMA: mma.sync)
and the local-memory ones (STL/LDL), saying whether any local-memory access lies inside the main loop (between
the kernel's first and last integer MMA), where a spill would cost every K-step rather than once per tile.

    // treeq-sass-requires(sm_90a): IGMMA

makes the instruction mandatory in that arch's SASS (the machine code, so nothing downstream of PTX dropped it),
and a kernel with a local-memory access inside its main loop fails the check.
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
SASS_MARKER = re.compile(r"//\s*treeq-sass-requires\((sm_\w+)\):\s*(\S+)")
TENSOR_OPS = ("IGMMA", "HGMMA", "IMMA", "HMMA")
LOCAL_OPS = ("STL", "LDL")
FLAGS = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-DTREEQ_CUDA_ARCHS=\"80,90a\"", f"-I{ROOT / 'csrc'}"]


def find_cuobjdump() -> str | None:
    found = shutil.which("cuobjdump")
    if found:
        return found
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    if os.access(Path(home) / "bin" / "cuobjdump", os.X_OK):
        return str(Path(home) / "bin" / "cuobjdump")
    import importlib.util

    spec = importlib.util.find_spec("triton")  # Triton ships cuobjdump beside its ptxas
    if spec and spec.submodule_search_locations:
        cand = Path(list(spec.submodule_search_locations)[0]) / "backends" / "nvidia" / "bin" / "cuobjdump"
        if os.access(cand, os.X_OK):
            return str(cand)
    return None


def sass_kernels(sass: str) -> dict[str, dict]:
    """Per function of ``cuobjdump -sass`` output: instruction counts of interest and local-memory accesses
    inside the main loop (between the first and last integer MMA)."""
    out: dict[str, dict] = {}
    for chunk in re.split(r"\n\s*Function : ", sass)[1:]:
        name, _, body = chunk.partition("\n")
        ops = [m.group(1) for m in re.finditer(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", body)]
        counts = {op: sum(o == op for o in ops) for op in (*TENSOR_OPS, *LOCAL_OPS)}
        mma = [i for i, o in enumerate(ops) if o in ("IGMMA", "IMMA")]
        in_loop = sum(o in LOCAL_OPS for o in ops[mma[0]:mma[-1] + 1]) if mma else 0
        out[name.strip()] = {**counts, "local_in_main_loop": in_loop}
    return out


def sass_report(cuobjdump: str, obj: Path, src: Path, arch: str) -> tuple[bool, list[str]]:
    r = subprocess.run([cuobjdump, "-sass", str(obj)], capture_output=True, text=True)
    if r.returncode != 0:
        return False, [f"  cuobjdump failed: {r.stderr.strip()[:200]}"]
    kernels = sass_kernels(r.stdout)
    ok, lines = True, []
    for name, c in kernels.items():
        tc = ", ".join(f"{c[op]} {op}" for op in TENSOR_OPS if c[op]) or "no tensor-core ops"
        local = c["STL"] + c["LDL"]
        where = ("none" if not local else
                 f"{local} STL/LDL, {c['local_in_main_loop']} inside the main loop" if c["local_in_main_loop"] else
                 f"{local} STL/LDL, none inside the main loop")
        lines.append(f"  SASS {short_name(name)}: {tc}; local memory: {where}")
        ok = ok and c["local_in_main_loop"] == 0
    for _, instr in (m for m in SASS_MARKER.findall(src.read_text()) if m[0] == arch):
        n = sum(c.get(instr, 0) for c in kernels.values()) if instr in (*TENSOR_OPS, *LOCAL_OPS) else \
            len(re.findall(rf"\b{re.escape(instr)}\b", r.stdout))
        ok = ok and n > 0
        lines.append(f"  requires '{instr}' in {arch} SASS: {'found ' + str(n) if n else 'MISSING'}")
    if not ok:
        lines.append("  SASS check FAILED (a required instruction is missing or the main loop touches local memory)")
    return ok, lines


def short_name(mangled: str) -> str:
    """``_ZN5treeq…16gemm_sm90_kernelILi4EEEv…`` → ``gemm_sm90_kernel<4>``: the innermost name and its integer
    template arguments, enough to tell the instances apart."""
    i, name = (3, "") if mangled.startswith("_ZN") else (2, "")
    while i < len(mangled) and mangled[i].isdigit():
        j = i
        while mangled[j].isdigit():
            j += 1
        n = int(mangled[i:j])
        name, i = mangled[j:j + n], j + n
    args = re.findall(r"Li(-?\d+)E", mangled[i:i + 60]) if mangled[i:i + 1] == "I" else []
    return (name or mangled[:60]) + (f"<{','.join(args)}>" if args else "")


def compile_one(nvcc: str, src: Path, arch: str, tmp: Path, cuobjdump: str | None = None) -> tuple[bool, str]:
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
    if ok and cuobjdump:
        sass_ok, lines = sass_report(cuobjdump, out, src, arch)
        ok = ok and sass_ok
        report += lines
    return ok, "\n".join(report)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", action="append", choices=sorted(ARCHS), help="architectures (default: all)")
    ap.add_argument("--no-spills", action="store_true", help="fail when ptxas reports spill stores/loads")
    ap.add_argument("--no-sass", action="store_true", help="skip the SASS report even where cuobjdump exists")
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
    cuobjdump = None if args.no_sass else find_cuobjdump()
    print(f"check_cuda: SASS report {'from ' + cuobjdump if cuobjdump else 'skipped (no cuobjdump)'}")
    ok_all = True
    with tempfile.TemporaryDirectory() as tmp, cf.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        jobs = [pool.submit(compile_one, nvcc, s, a, Path(tmp), cuobjdump) for s in sources for a in archs]
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
