"""Time the tree search on a DiT-XL/2-shaped model with random weights, and extrapolate the whole search.

    python benchmarks/bench_search.py                                  # DiT-XL/2, bf16 on CUDA when present
    python benchmarks/bench_search.py --config DiT-S/2 --samples 4 --levels 2 --device cpu --dtype float32

What it does:
1. Builds the model (every weight random, see ``treeq_engine.search.cli.random_dit``), ``--samples`` random
   calibration inputs (x ~ N(0, I), t uniform over the 1000 steps, random labels), the search space (140 leaves
   for XL/2, 12 candidates each) and the evaluator, and times the setup (FP reference, environment caches).
2. Lays out the search's work without budget pruning (an upper bound): level 0 scores the leaves only when they
   have more than K candidates, level 1 scores C² per merge, later levels up to K², cut into the units the
   search runs (``--group`` candidates stacked per forward).
3. Times units whose node starts at several depths, fits ``seconds = a + b · segments run`` by least squares,
   and sums the prediction over every planned unit: the whole search's time on this device.
4. With ``--levels L`` it also runs the real search for its first L levels and prints measured against
   predicted time for them, a check of the extrapolation.

Prints a JSON record (device, shapes, K, G, samples, fitted a and b, predicted total, levels run) for
benchmarks/RESULTS.md.

``--predict`` (CPU, no model built) writes the floors and a prediction for an H100 into RESULTS.md instead: the
planned work (sample·block evaluations, from the same unit layout), its bf16 FLOPs over the dense peak and the
bytes of the activation fake-quant over the bandwidth, and a time per sample·block taken from the recorded bf16
eager DiT-XL/2 forward plus the fake-quant passes (eager or compiled).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch

from record import git_commit, write_section  # benchmarks/record.py

PBEGIN, PEND = "<!-- bench_search:predictions:begin -->", "<!-- bench_search:predictions:end -->"
BF16_PEAK = 989e12        # H100 SXM dense bf16 FLOP/s
BANDWIDTH = 3.35e12       # H100 SXM HBM3 bytes/s (the floor)
COPY_RATE = 3.0e12        # device-to-device copy as measured on our H100 (the prediction's elementwise rate)
# bytes per activation element of one fake-quant (bf16 in and out): eager = the ~10 passes of
# nn/grouped.py's arithmetic (to float32, min, max, divide, round, add, clamp, subtract, multiply, to bf16),
# compiled = one reduction and one elementwise pass (read, read, write)
FQ_BYTES = {"eager": 6 + 4 + 4 + 8 + 8 + 8 + 8 + 8 + 8 + 6, "compiled": 2 + 2 + 2}


def planned_units(leaf_segment: list[int], segments: int, cands: int, keep: int, group: int) -> list[list[tuple]]:
    """Per level, the units ``(rows, segments run)`` of a search without pruning (sizes are upper bounds)."""
    nodes = [(i, cands) for i in range(len(leaf_segment))]          # (first leaf, configs held)
    levels = [[]]                                                    # level 0: leaves scored only if > K
    if cands > keep:
        levels[0] = [(min(group, cands - s), segments - leaf_segment[lo])
                     for lo, c in nodes for s in range(0, c, group)]
        nodes = [(lo, keep) for lo, _ in nodes]
    while len(nodes) > 1:
        units, merged = [], []
        for j in range(0, len(nodes) - 1, 2):
            (lo, a), (_, b) = nodes[j], nodes[j + 1]
            m = a * b
            units += [(min(group, m - s), segments - leaf_segment[lo]) for s in range(0, m, group)]
            merged.append((lo, min(keep, m)))
        if len(nodes) % 2:
            merged.append(nodes[-1])
        levels.append(units)
        nodes = merged
    return levels


def block_costs(cfg) -> tuple[float, float, int]:
    """Per sample and DiT block: (bf16 FLOPs, activation elements fake-quantized, weight parameters)."""
    d, t, h = cfg.hidden_size, cfg.num_tokens, int(cfg.hidden_size * cfg.mlp_ratio)
    params = d * 3 * d + d * d + d * h + h * d              # qkv, proj, fc1, fc2 (adaLN: one row per sample)
    flops = 2.0 * t * params + 2.0 * d * 6 * d + 4.0 * t * t * d   # linears, adaLN, QKᵀ and AV
    return flops, t * (d + d + d + h) + d, params + 6 * d * d


def predict(args: argparse.Namespace) -> str:
    """The floors and predicted time of the whole search on an H100, from the planned work alone."""
    from treeq_engine.models import dit_config
    from treeq_engine.search.space import candidate_configs

    cfg = dit_config(args.config)
    per_block = 5                                            # adaLN, qkv, proj, fc1, fc2 in forward order
    leaf_segment = [b + 1 for b in range(cfg.depth) for _ in range(per_block)]
    segs, nc = cfg.depth + 2, len(candidate_configs())
    levels = planned_units(leaf_segment, segs, nc, args.keep, args.group)
    # a unit of r candidate rows runs its node's block to the last one (the final layer is negligible), each on
    # every calibration sample
    sample_blocks = sum(r * (s - 1) for lv in levels for r, s in lv) * args.samples
    evals = sum(r for lv in levels for r, _ in lv)
    flops, fq_elems, wparams = block_costs(cfg)
    floor_flop = sample_blocks * flops / BF16_PEAK
    from bench_e2e import RECORDED_MS   # the recorded DiT-XL/2 forwards (docs/sources.md)

    eager_ms = RECORDED_MS[32][0]                            # bf16 eager at batch 32, CUDA graph
    eager_us = eager_ms * 1e3 / (32 * cfg.depth)            # µs per sample·block, the model's own eager forward
    # a unit's grouped layers stack G fake-quantized weights per forward: written once, read by the bmm
    stack_us = 2 * 2 * wparams / COPY_RATE * 1e6 / args.samples   # per sample·block, amortized over the samples
    rows, fit = [], {}
    for mode in ("compiled", "eager"):
        fq_us = fq_elems * FQ_BYTES[mode] / COPY_RATE * 1e6
        floor_bytes = sample_blocks * fq_elems * FQ_BYTES[mode] / BANDWIDTH
        total = sample_blocks * (eager_us + fq_us + stack_us) / 1e6
        fit[mode] = 20 * 60 / total * args.samples          # samples that fill 20 min (linear in N)
        rows.append(f"| {mode} | {fq_us:.1f} | {floor_bytes / 60:.1f} min | {eager_us:.1f} + {fq_us:.1f} + "
                    f"{stack_us:.1f} = {eager_us + fq_us + stack_us:.1f} | **{total / 60:.1f} min** |")
    lines = [PBEGIN, f"### Floors and prediction for {args.config} on an H100 (written before any GPU run)", "",
             f"Written by `python benchmarks/bench_search.py --predict` (CPU) at commit {git_commit()}. Planned work "
             f"without budget pruning (an upper bound), from the unit layout the timing run uses: {len(leaf_segment)} "
             f"leaves, {nc} candidates, K = {args.keep}, G = {args.group}: {evals:,} candidate evaluations, "
             f"**{sample_blocks / 1e6:.1f} M sample·block evaluations** at N = {args.samples} calibration samples "
             f"(one DiT block on one sample: {flops / 1e9:.2f} GFLOP in bf16, {fq_elems / 1e6:.2f} M activation "
             f"elements fake-quantized).", "",
             f"FLOP floor (bf16 dense peak {BF16_PEAK / 1e12:.0f} TFLOP/s): **{floor_flop / 60:.1f} min**. Per "
             f"sample·block the prediction adds the bf16 eager forward as recorded on our H100 in "
             f"docs/sources.md (a peer baseline, not a TreeQ run: {eager_ms} ms for "
             f"DiT-XL/2 at batch 32: {eager_us:.1f} µs per sample·block, norms, attention and elementwise included; "
             f"the search runs G·N = {args.group * args.samples} samples per forward, so its GEMMs are at least as "
             f"efficient), the activation fake-quant at the measured copy rate (3.0 TB/s), and the stacked candidate weights (at most: "
             "only a node's own layers are stacked):", "",
             "| fake-quant | its µs per sample·block | its bytes floor | predicted µs per sample·block | predicted "
             "search |", "|---|---|---|---|---|", *rows, "",
             "The target, the whole DiT-XL/2 search in 20 min on one H100, is predicted met with the compiled fake-quant (`--compile`, what "
             "tools/gpu_session.sh runs) and marginal without it, where ten float32 passes over every linear's "
             "input cost more than the forward itself. The time is linear in the calibration samples N: 20 min "
             f"holds up to N ≈ {fit['compiled']:.0f} compiled ({fit['eager']:.0f} eager) — the search CLI's default "
             "set (32 trajectories × 8 timesteps = 256 samples) is for small models; at DiT-XL/2 pass fewer "
             "(`--calib-trajectories`, `--calib-timesteps`) or shard the levels over GPUs (`torchrun`).", PEND]
    return "\n".join(lines)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="DiT-XL/2")
    p.add_argument("--samples", type=int, default=32, help="calibration samples")
    p.add_argument("--batch", type=int, default=None, help="samples per forward (default: all)")
    p.add_argument("--group", type=int, default=16)
    p.add_argument("--keep", type=int, default=16)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--depths", type=int, default=4, help="start depths timed for the fit")
    p.add_argument("--repeats", type=int, default=2, help="timed units per depth")
    p.add_argument("--levels", type=int, default=0,
                   help="also run the real search for this many levels that score merges")
    p.add_argument("--threads", type=int, default=None, help="CPU intra-op threads")
    p.add_argument("--compile", action="store_true", help="fuse the activation fake-quant with torch.compile")
    p.add_argument("--predict", action="store_true",
                   help="CPU: floors and predicted H100 time from the planned work, written to RESULTS.md")
    args = p.parse_args(argv)
    if args.predict:
        block = predict(args)
        print(block)
        write_section(block, PBEGIN, PEND)
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.compile:
        from treeq_engine.nn import grouped

        grouped.use_compiled(True)

    from treeq_engine.plan import LayerConfig
    from treeq_engine.search import DiTRunner, Environment, Evaluator, SearchSpace, cost_model, tree_search
    from treeq_engine.search.cli import random_dit

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    t0 = time.perf_counter()
    model = random_dit(args.config).to(device)
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    n = args.samples
    x = torch.randn(n, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    y = torch.randint(0, cfg.num_classes, (n,), generator=g)
    space = SearchSpace.build(model, [x[:2].to(device), t[:2].to(device), y[:2].to(device)],
                              model_name=args.config)
    model = model.to(dtype)
    inputs = (x.to(device, dtype), t.to(device), y.to(device))
    ev = Evaluator(model, DiTRunner(model, output_fn=lambda o: o[:, :cfg.in_channels]), space, inputs,
                   Environment(LayerConfig(4, 4), 1.0), batch=args.batch or n, group=args.group)
    ev.reference()
    ev.states()
    sync(device)
    t_setup = time.perf_counter() - t0

    rng = np.random.default_rng(0)
    nl, nc, segs = len(space.leaves), len(space.candidates), ev.runner.num_segments
    ev.evaluate(0, 2, rng.integers(0, nc, (args.group, 2)))          # warm-up: kernels, every layer's weight cache
    starts = np.linspace(0, nl - 2, args.depths).round().astype(int)
    xs, ys = [], []
    for lo in starts:
        for _ in range(args.repeats):
            sync(device)
            t1 = time.perf_counter()
            ev.evaluate(int(lo), int(lo) + 2, rng.integers(0, nc, (args.group, 2)))
            xs.append(segs - ev.leaf_segment[lo])
            ys.append(time.perf_counter() - t1)
    a, b = np.linalg.lstsq(np.stack([np.ones(len(xs)), xs], 1), np.array(ys), rcond=None)[0]

    levels = planned_units(ev.leaf_segment, segs, nc, args.keep, args.group)
    full = lambda u: u[0] / args.group * (a + b * u[1])  # noqa: E731  (a short last unit: proportionally)
    per_level = [sum(full(u) for u in lv) for lv in levels]
    evals = [sum(u[0] for u in lv) for lv in levels]
    record = {
        "config": args.config, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(), "compiled": args.compile, "dtype": str(dtype).replace("torch.", ""),
        "leaves": nl,
        "candidates": nc, "keep": args.keep, "group": args.group, "samples": n, "tokens": space.leaves[1].tokens,
        "setup_s": round(t_setup, 2), "fit_a_s": float(a), "fit_b_s_per_segment": float(b),
        "planned_evaluations": int(sum(evals)), "bound_(n-1)K^2": (nl - 1) * args.keep ** 2,
        "predicted_s": round(sum(per_level), 1), "predicted_min": round(sum(per_level) / 60, 2),
        "predicted_level_s": [round(v, 2) for v in per_level],
    }
    record["commit"] = git_commit()
    print(json.dumps(record, indent=2), flush=True)  # the fit and prediction, before the (long) real levels
    if args.levels:
        class Stop(Exception):
            pass

        t2 = time.perf_counter()
        measured = []

        with_work = []

        def level_done(level: int) -> None:  # level 0 scores nothing when every leaf has ≤ K candidates
            measured.append(time.perf_counter() - t2 - sum(measured))
            print(f"level {level}: {measured[-1]:.1f} s measured, {per_level[level]:.1f} s predicted", flush=True)
            if per_level[level] > 0:
                with_work.append(level)
            if len(with_work) >= args.levels:
                raise Stop

        try:
            tree_search(ev, cost_model(space, "wa"), keep=args.keep, progress=False, anchor=False,
                        on_level=level_done)
        except Stop:
            pass
        record["measured_level_s"] = [round(v, 2) for v in measured]
        record["measured_vs_predicted"] = [round(m / p_, 3) if p_ else None
                                          for m, p_ in zip(measured, per_level)]
        print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
