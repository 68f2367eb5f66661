#!/usr/bin/env python3
"""Latency-aware bit budgeting end to end: profile, search at a latency budget, quantize, measure.

    python benchmarks/latency_budget.py                   # DiT-XL/2 (random weights) on a GPU, batch 8
    python benchmarks/latency_budget.py --batch 1 --fractions 0.6,0.8 --lut lut.json
    python benchmarks/latency_budget.py --smoke           # CPU: DiT-test through every step (numbers meaningless)

In one process on one device:

1. **Latency table.** ``--lut`` or profiled now (``treeq_engine.runtime.profile``): every linear shape of the
   model × the candidate formats and W16A16 × the GEMM rows it runs at (``tokens · batch``; one row per image
   for adaLN), each a CUDA-graph replay of the whole quantized linear (activation quantization + GEMM).
2. **bf16 forward** measured (CUDA-graph replay of the whole DiT), ``T_bf16``; the table's bf16 linears sum to
   ``L_bf16``; ``R = T_bf16 − L_bf16`` is what quantization does not change (attention, norms, embedders).
3. **Search** (TSS, K = ``--keep``, on ``--samples`` random calibration inputs) with the latency budget
   ``fraction × (the searched linears' bf16 µs)`` for each ``--fractions`` entry (``mid``: halfway between the
   cheapest and the dearest plan by the table, a budget that always has plans). A fraction below the cheapest
   plan's is reported as infeasible with that floor, not searched.
4. **Predicted** end-to-end time of the plan: ``R − F + Σ table(plan's linears)``, where ``F`` is what the fused
   DiT blocks fold away: per fused block, the two bf16 LayerNorm + modulate (now inside qkv's and fc1's
   quantization) and fc1's GELU (now in its epilogue), and per gated residual fused into proj's or fc2's epilogue
   the bf16 ``x + gate·y`` (two passes) less one read of ``x`` (what the epilogue adds: half a copy), and per
   adaLN linear reading SiLU(c)'s codes another block quantized the quantization its table entry counts, measured
   here as the model runs them;
   **measured**: the plan quantized with ``treeq_engine.quantize`` (fastest backend) and replayed as a CUDA
   graph. Their ratio says how far a table of isolated linears predicts the model (L2 reuse between layers and
   launch gaps are what it cannot see; the table's entries run with cold weights).

Writes a JSON record (``--json``) and, on a GPU, the table between the ``latency_budget`` markers of
``benchmarks/RESULTS.md``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from treeq_engine.plan import LayerConfig, QuantPlan  # noqa: E402
from treeq_engine.runtime import memory_report, quantize  # noqa: E402
from treeq_engine.runtime.dit_fused import FusedDiTBlock  # noqa: E402
from treeq_engine.runtime.profile import profile_layers  # noqa: E402
from treeq_engine.runtime.timing import time_graph_ms  # noqa: E402
from treeq_engine.plan import PlanError  # noqa: E402
from treeq_engine.search import Budget, BudgetError, DiTRunner, SearchSpace, cost_model  # noqa: E402
from treeq_engine.search.cli import random_dit  # noqa: E402
from treeq_engine.search.costs import LatencyTable  # noqa: E402
from treeq_engine.search.run import SearchConfig, search  # noqa: E402
from treeq_engine.search.space import candidate_configs, parse_bits  # noqa: E402

from record import RESULTS, git_commit, save_json, write_section  # noqa: E402  (benchmarks/record.py)

BEGIN, END = "<!-- latency_budget:begin -->", "<!-- latency_budget:end -->"


def linears(space: SearchSpace) -> list[tuple]:
    """Every linear the model runs: ``(leaf, searched)`` for the searched leaves and the fixed layers."""
    return [(p, True) for leaf in space.leaves for p in leaf.parts] + [(leaf, False) for leaf, _ in space.fixed]


def linear_us(lut: LatencyTable, space: SearchSpace, batch: int, plan: QuantPlan | None) -> dict[str, float]:
    """Summed table µs of the model's linears at ``plan`` (``None``: all bf16), split searched / fixed."""
    out = {"searched": 0.0, "fixed": 0.0}
    for leaf, searched in linears(space):
        cfg = None if plan is None else plan.layers.get(leaf.name)
        w, a = (16, 16) if cfg is None else (cfg.w_bits, cfg.a_bits)
        out["searched" if searched else "fixed"] += lut.lookup(leaf.k, leaf.n, leaf.tokens * batch, w, a,
                                                                None if cfg is None else cfg.branch)
    return out


def fusable_ms(cfg, batch: int, device: str, dtype: torch.dtype, reps: int) -> tuple[float, float, float]:
    """What a fused DiT block folds into its kernels, as the bf16 model runs it (ms): per block, LayerNorm +
    modulate of qkv's and of fc1's input and fc1's GELU; per gated residual fused into an epilogue, the separate
    multiply and add less the epilogue's extra read of the residual (half a copy of it); per adaLN linear whose
    input codes another block computed (the fused blocks share SiLU(c)'s), the quantization of SiLU(c) the
    table's adaLN entry includes (8-bit: its time is launch latency whatever the bits)."""
    from treeq_engine.format import QuantSpec
    from treeq_engine.kernels import quantize_activation
    from treeq_engine.models.dit import modulate

    d, t = cfg.hidden_size, cfg.num_tokens
    g = torch.Generator().manual_seed(2)
    x = torch.randn(batch, t, d, generator=g).to(device, dtype)
    hid = torch.randn(batch, t, int(d * cfg.mlp_ratio), generator=g).to(device, dtype)
    shift, scale = (torch.randn(batch, d, generator=g).to(device, dtype) for _ in range(2))
    norm = torch.nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
    gelu = torch.nn.GELU(approximate="tanh")

    y = torch.randn_like(x)

    def block_ops():
        modulate(norm(x), shift, scale)
        modulate(norm(x), shift, scale)
        gelu(hid)

    with torch.no_grad():
        per_block = time_graph_ms(block_ops, reps=reps, device=device)
        residual = time_graph_ms(lambda: x + shift.unsqueeze(1) * y, reps=reps, device=device)
        read = time_graph_ms(lambda: y.clone(), reps=reps, device=device) / 2
        c = torch.randn(batch, d, generator=g).to(device, dtype)
        ada_quant = time_graph_ms(lambda: quantize_activation(torch.nn.functional.silu(c), QuantSpec.activation(8)),
                                  reps=reps, device=device)
    return per_block, max(residual - read, 0.0), ada_quant


def shared_adaln_inputs(blocks: list) -> int:
    """How many fused blocks' adaLN linears reuse SiLU(c)'s codes another block computed (one quantization per
    activation spec per forward; a layer with a branch quantizes its own)."""
    ada = [b.adaLN_modulation[1] for b in blocks if b.ada_fused and b.adaLN_modulation[1].monarch_w1 is None]
    return len(ada) - len({a.act_spec for a in ada})


def forward_ms(model: torch.nn.Module, batch: int, device: str, dtype: torch.dtype, reps: int) -> tuple[float, float]:
    c = model.config
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, c.in_channels, c.input_size, c.input_size, generator=g).to(device, dtype)
    t = torch.randint(0, 1000, (batch,), generator=g).to(device)
    y = torch.randint(0, c.num_classes, (batch,), generator=g).to(device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        ms = time_graph_ms(lambda: model(x, t, y), reps=reps, device=device)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    return ms, peak


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="DiT-XL/2")
    p.add_argument("--batch", type=int, default=8, help="images per forward (GEMM rows = 256 · batch)")
    p.add_argument("--fractions", default="0.5,0.75,mid",
                   help="budgets: fractions of the searched linears' bf16 µs; 'mid': halfway between the cheapest "
                        "and the dearest plan")
    p.add_argument("--lut", default=None, help="a latency table from `treeq profile` (default: profile now)")
    p.add_argument("--w-bits", default="2,3,4,8")
    p.add_argument("--a-bits", default="3,4,8")
    p.add_argument("--keep", type=int, default=8)
    p.add_argument("--samples", type=int, default=8, help="random calibration inputs of the search")
    p.add_argument("--group", type=int, default=16)
    p.add_argument("--lam", type=float, default=1.0)
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--out", default="out/latency_budget", help="directory: lut.json, plans, record.json")
    p.add_argument("--smoke", action="store_true", help="CPU: DiT-test, 2 reps, no table written")
    args = p.parse_args(argv)
    if args.smoke:
        args.config, args.batch, args.reps, args.keep, args.samples = "DiT-test", 2, 2, 4, 4
        args.fractions = "0.01,mid"   # CPU timings: one budget below the floor, one halfway up the plans
        device = "cpu"
    elif not torch.cuda.is_available():
        print("latency_budget: no CUDA device; run on a GPU machine (or --smoke to exercise the code on CPU)")
        return 2
    else:
        device = "cuda"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        fractions = [f.strip() if f.strip() == "mid" else float(f) for f in args.fractions.split(",") if f.strip()]
    except ValueError:
        raise SystemExit(f"--fractions must be comma-separated numbers or 'mid', got {args.fractions!r}") from None
    if args.batch <= 0 or args.samples <= 0 or args.keep <= 0 or args.reps <= 0:
        raise SystemExit("--batch, --samples, --keep and --reps must be positive")
    cands = candidate_configs(parse_bits(args.w_bits, "--w-bits"), parse_bits(args.a_bits, "--a-bits"))

    model = random_dit(args.config).to(device)
    c = model.config
    g = torch.Generator().manual_seed(0)
    n = args.samples
    inputs = (torch.randn(n, c.in_channels, c.input_size, c.input_size, generator=g),
              torch.randint(0, 1000, (n,), generator=g), torch.randint(0, c.num_classes, (n,), generator=g))
    space = SearchSpace.build(model, [t_[:2].to(device) for t_ in inputs], candidates=cands,
                              fixed_config=LayerConfig(8, 8), model_name=args.config)
    record = {"config": args.config, "batch": args.batch, "device": torch.cuda.get_device_name() if device == "cuda"
              else "cpu", "commit": git_commit(), "torch": torch.__version__, "keep": args.keep,
              "samples": n, "lambda": args.lam, "leaves": len(space.leaves), "reps": args.reps}

    # 1. the latency table
    t0 = time.perf_counter()
    if args.lut:
        lut_path = Path(args.lut)
    else:
        layers = sorted({(leaf.k, leaf.n, leaf.tokens * args.batch) for leaf, _ in linears(space)})
        formats = [(16, 16), (8, 8)] + [(cf.w_bits, cf.a_bits) for cf in cands]
        lut_path = out / "lut.json"
        lut_path.write_text(json.dumps(profile_layers(layers, formats, device=device, reps=args.reps), indent=1))
    lut = LatencyTable.load(lut_path)
    lut.check_device()
    record["lut"] = {"path": str(lut_path), "device": lut.device, "profile_s": round(time.perf_counter() - t0, 1)}

    # 2. bf16 forward and what the linears take of it
    bf16 = random_dit(args.config).to(device=device, dtype=dtype).eval()
    t_bf16, peak_bf16 = forward_ms(bf16, args.batch, device, dtype, args.reps)
    del bf16
    try:
        lin_bf16 = linear_us(lut, space, args.batch, None)
    except PlanError as e:
        raise SystemExit(f"latency_budget: {e}") from None
    rest_ms = t_bf16 - (lin_bf16["searched"] + lin_bf16["fixed"]) / 1e3
    fuse_ms, resid_ms, ada_ms = fusable_ms(c, args.batch, device, dtype, args.reps)
    record["bf16"] = {"ms": t_bf16, "peak_gib": peak_bf16, "linears_us": lin_bf16, "rest_ms": rest_ms,
                      "fusable_ms_per_block": fuse_ms, "fusable_ms_per_residual": resid_ms,
                      "fusable_ms_per_shared_adaln_input": ada_ms}
    print(f"bf16 forward {t_bf16:.3f} ms; its linears {sum(lin_bf16.values()) / 1e3:.3f} ms by the table "
          f"(searched {lin_bf16['searched'] / 1e3:.3f}); the rest {rest_ms:.3f} ms, of which a fused block folds "
          f"away {fuse_ms:.4f} ms and a fused gated residual {resid_ms:.4f} ms")
    if rest_ms < 0:
        record["bf16"]["warning"] = "the table's linears sum to more than the whole forward"
        print(f"warning: {record['bf16']['warning']} (a table from another device or load?)")

    # 3-4. a search per budget, then predicted against measured
    cm = cost_model(space, "latency", latency_table=lut, serve_batch=args.batch)
    floor_us = float((cm.offset + cm.min_costs().sum(axis=0))[0])
    top_us = float((cm.offset + cm.table.max(axis=1).sum(axis=0))[0])   # the dearest plan
    model = model.to(dtype)
    calib = tuple(t_.to(device, dtype) if torch.is_floating_point(t_) else t_.to(device) for t_ in inputs)
    runs = []
    record["runs"] = runs

    def save() -> None:  # after every step, so a run cut off by a time limit keeps what it measured
        save_json(out / "record.json", record)

    save()
    for label in fractions:
        f = label
        if label == "mid":
            f = (floor_us + 0.5 * (top_us - floor_us)) / lin_bf16["searched"]
        limit = f * lin_bf16["searched"]
        row = {"budget": f"{label:g}" if label != "mid" else "mid", "fraction": f, "budget_us": limit,
               "floor_us": floor_us}
        if limit < floor_us:
            row["infeasible"] = f"the cheapest plan's searched linears take {floor_us:.1f} µs = " \
                                f"{floor_us / lin_bf16['searched']:.3f} of bf16"
            print(f"budget {row['budget']}: {row['infeasible']}")
            runs.append(row)
            continue
        cfg = SearchConfig(Budget("latency", (limit,)), lam=args.lam, keep=args.keep, batch=n, group=args.group,
                           latency_table=str(lut_path), serve_batch=args.batch)
        t1 = time.perf_counter()
        try:
            res = search(model, DiTRunner(model, output_fn=lambda o: o[:, :c.in_channels]), calib, cfg,
                         space=space, out_dir=out / f"search_{row['budget']}", progress=not args.smoke,
                         model_name=args.config)
        except BudgetError as e:
            row["infeasible"] = str(e)
            runs.append(row)
            continue
        row["search_s"] = round(time.perf_counter() - t1, 1)
        plan = res.plan
        lin = linear_us(lut, space, args.batch, plan)
        q = quantize(random_dit(args.config).to(device=device, dtype=dtype).eval(), plan, dtype=dtype)
        fused = [b for b in q.blocks if isinstance(b, FusedDiTBlock)]   # as the runtime fused them
        row["fused_blocks"] = len(fused)
        row["fused_residuals"] = sum(b.proj_residual + b.fc2_residual for b in fused)
        row["shared_adaln_inputs"] = shared_adaln_inputs(fused)
        row["predicted_unfused_ms"] = rest_ms + (lin["searched"] + lin["fixed"]) / 1e3
        row["predicted_ms"] = (row["predicted_unfused_ms"] - row["fused_blocks"] * fuse_ms
                               - row["fused_residuals"] * resid_ms - row["shared_adaln_inputs"] * ada_ms)
        row["plan_linears_us"] = lin
        row["search_costs"] = plan.meta["costs"]
        row["ptq_mse"] = res.ptq_mse
        labels = [plan.layers[leaf.name].label for leaf in space.leaves]
        row["mix"] = {lab: labels.count(lab) for lab in sorted(set(labels))}
        row["measured_ms"], row["peak_gib"] = forward_ms(q, args.batch, device, dtype, args.reps)
        row["weight_ratio"] = memory_report(q)["ratio"]
        row["measured_over_predicted"] = row["measured_ms"] / row["predicted_ms"]
        row["speedup_vs_bf16"] = t_bf16 / row["measured_ms"]
        del q
        if device == "cuda":
            torch.cuda.empty_cache()
        print(f"budget {row['budget']} ({f:.3f}): {limit:.1f} µs, plan W{row['search_costs']['w_bits']:.2f}"
              f"A{row['search_costs']['a_bits']:.2f}, predicted {row['predicted_ms']:.3f} ms, measured "
              f"{row['measured_ms']:.3f} ms ({row['measured_over_predicted']:.3f}×), "
              f"{row['speedup_vs_bf16']:.2f}× bf16 eager")
        runs.append(row)
        save()
    save()
    if not args.smoke:
        write_table(record)
    return 0


def write_table(rec: dict) -> None:
    b = rec["bf16"]
    lines = [BEGIN, f"## Latency-budgeted search: {rec['config']}, batch {rec['batch']}, predicted vs measured", "",
             f"Device {rec['device']}, torch {rec['torch']}, commit {rec['commit']}; `python "
             f"benchmarks/latency_budget.py --batch {rec['batch']}`; TSS K = {rec['keep']}, {rec['samples']} "
             f"random calibration inputs, λ = {rec['lambda']:g}; CUDA-graph replay, median of {rec['reps']}. "
             f"bf16 eager forward {b['ms']:.3f} ms, of which the table's linears "
             f"{sum(b['linears_us'].values()) / 1e3:.3f} ms; the rest {b['rest_ms']:.3f} ms is held fixed in the "
             f"prediction, less {1e3 * b['fusable_ms_per_block']:.1f} µs per fused block (the bf16 LayerNorm + "
             "modulate ×2 and GELU that the fused blocks fold into their kernels) and "
             f"{1e3 * b.get('fusable_ms_per_residual', 0.0):.1f} µs per gated residual fused into an epilogue (the "
             "bf16 multiply and add, less the epilogue's read of the residual) and "
             f"{1e3 * b.get('fusable_ms_per_shared_adaln_input', 0.0):.1f} µs per adaLN linear reading SiLU(c)'s "
             "codes another block quantized. 'mid': halfway between the "
             "cheapest and the dearest plan by the table.", "",
             "| budget (× bf16 searched linears) | plan avg W/A | searched µs (table) | predicted ms | measured ms | "
             "measured / predicted | × bf16 eager | weights vs bf16 | peak GiB | search s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rec["runs"]:
        if "infeasible" in r:
            lines.append(f"| {r['budget']} ({r['budget_us']:.0f} µs) | infeasible: {r['infeasible']} "
                         "| | | | | | | | |")
            continue
        sc = r["search_costs"]
        lines.append(f"| {r['budget']} = {r['fraction']:.3f} ({r['budget_us']:.0f} µs) | "
                     f"W{sc['w_bits']:.2f}A{sc['a_bits']:.2f} | "
                     f"{r['plan_linears_us']['searched']:.0f} | {r['predicted_ms']:.3f} | {r['measured_ms']:.3f} | "
                     f"{r['measured_over_predicted']:.3f} | {r['speedup_vs_bf16']:.2f} | {r['weight_ratio']:.3f}× | "
                     f"{r['peak_gib']:.2f} | {r['search_s']:.0f} |")
    lines.append(END)
    write_section("\n".join(lines), BEGIN, END, RESULTS)
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    sys.exit(main())
