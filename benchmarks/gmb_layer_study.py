#!/usr/bin/env python
"""Layer-level measurements behind the GMB/PTQ design choices, on the digits DiT (CPU, about a minute).

For every block linear of the FP digits DiT, on its inputs captured along FP sampling trajectories, the
relative output error ‖out − X·Wᵀ‖² / ‖X·Wᵀ‖² of:

    rtn            round-to-nearest, full range (the format's data rule), no branch
    ptq            + per-channel weight clip and per-layer activation clip (calibrate_layer)
    ptq+smooth α   the same after SmoothQuant balancing X/s, W·s with s_k = max|X_k|^α / max|W_k|^(1−α)
    <kind> (R) <init>  ptq with a branch of b·r = R parameters per (K + N) (lowrank: rank R; monarch b×r: b
                   blocks of rank r), closed-form init "weight" (B = Π(W), quantize W − B) or "residual"
                   (B = Π(W − Q(W)), quantize W)

averaged per layer kind (qkv, proj, fc1, fc2, adaLN) over the blocks. Usage:

    python benchmarks/gmb_layer_study.py [--bits W4A4 W3A3] [--params 4 16] [--json out/gmb/layer_study.json]
"""
from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import torch

from treeq_engine.calib.capture import StageRunner
from treeq_engine.calib.cli import branch_for, calibration_batches, parse_bits
from treeq_engine.calib.ptq import PTQConfig, calibrate_layer
from treeq_engine.calib.smooth import smoothing_factors
from treeq_engine.models.digits import load_digits_dit
from treeq_engine.nn import quantizable_linears
from treeq_engine.plan import LayerConfig, is_block_layer


def kind_of(name: str) -> str:
    return {"qkv": "qkv", "proj": "proj", "fc1": "fc1", "fc2": "fc2", "1": "adaLN"}[name.rsplit(".", 1)[1]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bits", nargs="+", type=parse_bits, default=[(4, 4), (3, 3)])
    ap.add_argument("--params", nargs="+", type=int, default=[4, 16], help="branch budgets b·r")
    ap.add_argument("--alphas", nargs="+", type=float, default=[0.25, 0.5, 0.75])
    ap.add_argument("--monarch-ranks", nargs="+", type=int, default=[1, 2], help="Monarch per-block ranks r")
    ap.add_argument("--inits", nargs="+", default=["weight", "residual"])
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--cfg-scale", type=float, default=1.5)
    ap.add_argument("--max-tokens", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (shared CPUs: 1 is fastest)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    fp = load_digits_dit()
    batches = calibration_batches(fp, args.samples, args.steps, seed=1, cfg_scale=args.cfg_scale)
    names = [n for n in quantizable_linears(fp) if is_block_layer(n)]
    runner = StageRunner(fp, batches, names)   # one walk over the stages, capturing each layer in its stage
    inputs = {}
    for stage in range(runner.num_stages):
        for n in [n for n in names if runner.stage_of[n] == stage]:
            inputs[n] = runner.capture(n, args.max_tokens, seed=names.index(n))
        if any(runner.stage_of[n] > stage for n in names):
            runner.advance()
    cfg = PTQConfig(max_tokens=args.max_tokens)
    rtn = PTQConfig(w_clip_grid=(1.0,), a_clip_grid=(1.0,), rounds=1)
    results: dict = {}
    t0 = time.perf_counter()
    for bits in args.bits:
        rows: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        for n in names:
            w, x, k = fp.get_submodule(n).weight.detach(), inputs[n], kind_of(n)
            lc = LayerConfig(*bits)
            rows[k]["rtn"].append(calibrate_layer(w, x, lc, rtn).err)
            rows[k]["ptq"].append(calibrate_layer(w, x, lc, cfg).err)
            for a in args.alphas:
                sf = smoothing_factors(x, w, a)   # SmoothQuant: (W·s, X/s), the product unchanged
                rows[k][f"ptq+smooth {a:g}"].append(calibrate_layer(w * sf, x / sf, lc, cfg).err)
            for p in args.params:
                shapes = [("lowrank", 1)] + [("monarch", r) for r in args.monarch_ranks if p % r == 0 and p // r > 1]
                for kind, r in shapes:
                    br = branch_for(kind, p, r)
                    if br.blocks > min(w.shape):
                        continue
                    label = "lowrank" if kind == "lowrank" else f"monarch {br.blocks}x{br.rank}"
                    for init in args.inits:
                        res = calibrate_layer(w, x, lc.replace(branch=br), PTQConfig(
                            max_tokens=args.max_tokens, branch_init=init))
                        rows[k][f"{label} ({p}) {init}"].append(res.err)
        label = f"W{bits[0]}A{bits[1]}"
        results[label] = {k: {c: sum(v) / len(v) for c, v in cols.items()} for k, cols in rows.items()}
    seconds = time.perf_counter() - t0
    for label, table in results.items():
        cols = list(next(iter(table.values())).keys())
        print(f"\n### {label}: mean relative layer output error (lower is better)\n")
        print("| layer | " + " | ".join(cols) + " |")
        print("|---|" + "---|" * len(cols))
        for k, vals in table.items():
            print(f"| {k} | " + " | ".join(f"{vals[c]:.4f}" for c in cols) + " |")
    print(f"\n{len(names)} layers, {args.samples} samples × {args.steps} steps, {args.max_tokens} rows per layer; "
          f"{seconds:.0f} s")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"results": results, "seconds": seconds, "args": vars(args)},
                                              indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
