"""``treeq profile``: measure every (layer shape × format × tokens) on this machine's GPU into the latency lookup
table the search reads (schema ``treeq-latency-lut`` v1, see ``treeq_engine/search/costs.py``).

One entry times the whole quantized linear as it runs in the model — activation quantization (with the Monarch
stage 1 where there is a branch) plus the packed GEMM with its epilogue — replayed as a CUDA graph; W16A16 entries
time the bf16 ``F.linear``. Timings on a CPU are written too (useful only to test the pipeline), marked with the
device.
"""
from __future__ import annotations

import argparse
import itertools
import json
import platform
from pathlib import Path
from typing import Iterable, Sequence

import torch
import torch.nn as nn
from tqdm import tqdm

from ..format import quantize as quantize_tensor
from ..plan import BranchConfig, LayerConfig
from .linear import TreeQLinear
from .timing import time_graph_ms

LUT_SCHEMA, LUT_VERSION = "treeq-latency-lut", 1


def layer_shapes(model: nn.Module, include=None) -> list[tuple[int, int]]:
    """Distinct ``(K, N)`` of the model's linears (optionally only names passing ``include``)."""
    from ..nn import quantizable_linears

    shapes = []
    for name in quantizable_linears(model, include=include):
        m = model.get_submodule(name)
        if (m.in_features, m.out_features) not in shapes:
            shapes.append((m.in_features, m.out_features))
    return shapes


def time_linear(k: int, n: int, tokens: int, w_bits: int, a_bits: int, branch: BranchConfig | None, *,
                device: str, reps: int, gen: torch.Generator) -> float:
    """Median µs of one linear of this format on ``tokens`` rows."""
    x = torch.randn(tokens, k, generator=gen).to(device=device, dtype=torch.bfloat16)
    w = torch.randn(n, k, generator=gen) / k**0.5
    bias = torch.randn(n, generator=gen)
    if w_bits == 16:
        lin = nn.Linear(k, n).to(device=device, dtype=torch.bfloat16)
        return 1e3 * time_graph_ms(lambda: lin(x), reps=reps)
    cfg = LayerConfig(w_bits, a_bits, branch=branch)
    factors = None
    if branch is not None:
        from ..branches import MonarchShape

        shp = MonarchShape(n=n, k=k, blocks=branch.blocks, rank=branch.rank)
        factors = (torch.randn(shp.w1_shape, generator=gen) * 0.02, torch.randn(shp.w2_shape, generator=gen) * 0.02)
    mod = TreeQLinear.from_weights(quantize_tensor(w, cfg.weight_spec()), cfg, bias, factors).to(device)
    return 1e3 * time_graph_ms(lambda: mod(x), reps=reps)


def backend_on(device: str) -> str:
    """The backend the packed GEMM dispatches to on ``device`` (what the table's timings measured)."""
    from ..kernels import PackedWeight, quantize_activation
    from ..kernels.ops import selected_backend
    from ..format import QuantSpec

    w = PackedWeight.from_float(torch.randn(64, 64), QuantSpec.weight(4)).to(device)
    act = quantize_activation(torch.randn(16, 64, device=device), QuantSpec.activation(8))
    return selected_backend("packed_linear", act, w)


def profile(shapes: Sequence[tuple[int, int]], formats: Iterable[tuple[int, int]], tokens: Sequence[int], *,
            branches: Sequence[BranchConfig | None] = (None,), device: str = "cuda", reps: int = 50,
            seed: int = 0, progress: bool = True) -> dict:
    gen = torch.Generator().manual_seed(seed)
    jobs = list(itertools.product(shapes, list(formats), tokens, branches))
    entries = []
    for (k, n), (wb, ab), m, br in tqdm(jobs, desc="profile", disable=not progress):
        if wb == 16 and br is not None:
            continue
        us = time_linear(k, n, m, wb, ab, br, device=device, reps=reps, gen=gen)
        entries.append({"k": k, "n": n, "tokens": m, "w_bits": wb, "a_bits": ab,
                        "branch": None if br is None else {"kind": br.kind, "blocks": br.blocks, "rank": br.rank},
                        "us": round(us, 3)})
    dev = torch.cuda.get_device_name() if device.startswith("cuda") else f"cpu ({platform.processor() or 'host'})"
    return {"schema": LUT_SCHEMA, "version": LUT_VERSION, "device": dev, "backend": backend_on(device),
            "entries": entries}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="digits", help="'digits' or a DiT checkpoint; its linear shapes are profiled")
    p.add_argument("--config", default=None, help="DiT config name instead of a checkpoint (e.g. DiT-XL/2: random "
                                                  "weights, real shapes)")
    p.add_argument("--formats", default="W16A16,W8A8,W4A8,W4A4,W3A4,W3A3,W2A8,W2A4",
                   help="comma-separated WxAy formats")
    p.add_argument("--tokens", default="256,512,2048,8192", help="comma-separated token counts (GEMM M)")
    p.add_argument("--branch", action="append", default=[], metavar="monarch:B:R|lowrank:R",
                   help="also profile with this branch (repeatable)")
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", required=True, help="latency table JSON to write")


def parse_branch(s: str) -> BranchConfig:
    parts = s.split(":")
    try:
        if parts[0] == "monarch" and len(parts) == 3:
            return BranchConfig("monarch", int(parts[1]), int(parts[2]))
        if parts[0] == "lowrank" and len(parts) == 2:
            return BranchConfig("lowrank", 1, int(parts[1]))
    except ValueError:
        pass
    raise SystemExit(f"--branch must be monarch:BLOCKS:RANK or lowrank:RANK, got {s!r}")


def run(args: argparse.Namespace) -> int:
    from .cli import load_fp_model, parse_wa

    if args.config:
        from ..models import DiT, dit_config

        with torch.device("meta"):
            model = DiT(dit_config(args.config))
    else:
        model = load_fp_model(args.model)[0]
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available (use --device cpu to test the pipeline)")
    formats = [parse_wa(f) for f in args.formats.split(",") if f.strip()]
    try:
        tokens = [int(t) for t in args.tokens.split(",") if t.strip()]
    except ValueError:
        raise SystemExit(f"--tokens must be comma-separated integers, got {args.tokens!r}") from None
    branches = [None] + [parse_branch(b) for b in args.branch]
    lut = profile(layer_shapes(model), formats, tokens, branches=branches, device=args.device, reps=args.reps)
    Path(args.out).write_text(json.dumps(lut, indent=1) + "\n")
    print(f"wrote {len(lut['entries'])} entries for {lut['device']} ({lut['backend']} backend) to {args.out}")
    return 0
