"""``treeq search``: search a mixed-precision plan for a DiT at a budget.

    treeq search --budget W4A4 --out out/w4a4                        # the shipped digits DiT, TSS + plan.json
    treeq search --budget W3A3 --lam 0.5 --baselines uniform,ip,random --out out/w3a3
    treeq search --budget 250us --latency-table lut.json --out out/lat
    treeq search --budget W4A4 --out out/w4a4 --resume               # continue a killed search
    torchrun --nproc-per-node 2 -m treeq_engine search --budget W4A4 --out out/dist
    treeq search --check out/w4a4/plan.json --budget W4A4            # validate a plan against model and budget

Models: ``--model digits`` (default, the shipped checkpoint), ``--model PATH`` (a DiT checkpoint, with
``--config NAME`` when its shape is ambiguous), or ``--random-config NAME`` (random weights, for timing).
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path
from typing import Any

import torch

from ..models.diffusers_transformers import EXPERTS
from ..plan import LayerConfig, PlanError, parse_wa
from .closed_loop import ClosedLoopConfig, PipelineJudge
from .costs import Budget, BudgetError, LatencyTable
from .run import BASELINES, SearchConfig, load_plan, search, validate_plan
from .space import DEFAULT_A_BITS, DEFAULT_W_BITS, SearchSpace, candidate_configs, parse_bits


CALIB_TRAJECTORIES, CALIB_TIMESTEPS = 32, 8   # our DiT's calibration set (refused with --diffusers)


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default="digits", help="'digits' (shipped) or a DiT checkpoint path")
    g.add_argument("--config", default=None, help="DiT config name for a checkpoint (e.g. DiT-XL/2)")
    g.add_argument("--random-config", default=None, help="a DiT config with random weights (timing runs)")
    g.add_argument("--diffusers", default=None, metavar="PATH",
                   help="a local diffusers transformer (or pipeline) directory the search cuts (the README's "
                        "table of models says which), searched on the inputs of --calib-inputs (from `treeq capture`)")
    g.add_argument("--transformer", default=None, choices=EXPERTS,
                   help="with a two-expert pipeline directory (Wan 2.2 A14B) as --diffusers: the expert searched "
                        "(closed-loop selection samples the pipeline, the other expert in full precision)")
    g.add_argument("--device", default=None, help="cpu / cuda (default: cuda when present)")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    g = p.add_argument_group("budget and search")
    g.add_argument("--budget", required=True, help="W4A4, W3.5, A4, 12MB, 350us ...")
    g.add_argument("--lam", type=float, default=1.0, help="ENG λ in [0, 1] (1: PTQ-aligned, 0: fine-tuning)")
    g.add_argument("--keep", type=int, default=16, help="K, configs kept per node")
    g.add_argument("--env", default=None, help="ENG environment config, e.g. W4A4 (default: from the budget)")
    g.add_argument("--w-bits", default=",".join(map(str, DEFAULT_W_BITS)), help="candidate weight bits")
    g.add_argument("--a-bits", default=",".join(map(str, DEFAULT_A_BITS)), help="candidate activation bits")
    g.add_argument("--layers", default=None, help="regex of the searched linears (default: the block linears)")
    g.add_argument("--untie", action="store_true",
                   help="--diffusers: search the linears reading one input (to_q/to_k/to_v, cross-attention's "
                        "to_k/to_v, MMDiT's add_q/k/v_proj, Flux single blocks' q/k/v with proj_mlp) as separate "
                        "leaves instead of one each")
    g.add_argument("--fixed-bits", default="W8A8", help="config of the other linears, or 'fp'")
    g.add_argument("--latency-table", default=None, help="latency lookup table JSON (default: roofline)")
    g.add_argument("--serve-batch", type=int, default=1, help="samples per GEMM for latency costs")
    g.add_argument("--baselines", default="", help=f"comma-separated, of {','.join(BASELINES)}")
    g.add_argument("--random-plans", type=int, default=20, help="plans drawn by the random baseline")
    g.add_argument("--warm-start", default="",
                   help="comma-separated plans every tree node keeps its slice of, so the search cannot end worse "
                        "than them on its metric: 'ip' (the integer-programming baseline, n·C evaluations more) "
                        "and/or plan JSON files")
    g.add_argument("--env-plan", default=None,
                   help="ENG environment as a plan instead of uniform bits: 'ip' or a plan JSON file; every node is "
                        "scored inside it, and it is kept as a warm start")
    g.add_argument("--select", default="one-step", choices=["one-step", "closed-loop", "closed-loop-root"],
                   help="how the plan is chosen among the root's in-budget plans: the lowest one-step MSE "
                        "(the search's metric) or the lowest error of whole sampling trajectories; "
                        "closed-loop-root scores the tree's whole last merge that way (up to K² sampling runs)")
    g.add_argument("--closed-loop-samples", type=int, default=32,
                   help="samples per closed-loop score (with --closed-loop-prompts: one per prompt)")
    g.add_argument("--closed-loop-steps", type=int, default=None, help="sampler steps (default: --calib-steps)")
    g.add_argument("--closed-loop-plans", type=int, default=16,
                   help="plans scored closed loop, at most (plus the uniform plan)")
    g.add_argument("--closed-loop-labels", default=None,
                   help="--diffusers DiT: the class labels sampled (default: --closed-loop-samples of them, cycled)")
    g.add_argument("--closed-loop-prompts", default=None, metavar="FILE",
                   help="--diffusers, a text-conditioned model: the prompts sampled, one per line")
    g.add_argument("--closed-loop-height", type=int, default=None,
                   help="--diffusers, a text-conditioned model: the image height closed-loop samples are drawn at "
                        "(default: the pipeline's; FLUX.1-dev's is 1024)")
    g.add_argument("--closed-loop-width", type=int, default=None,
                   help="--diffusers, a text-conditioned model: the width (default: the pipeline's)")
    g.add_argument("--closed-loop-frames", type=int, default=None,
                   help="--diffusers Wan, LTX-Video: frames per closed-loop video (default: the pipeline's, 81 for "
                        "Wan, 161 for LTX-Video: large)")
    g = p.add_argument_group("calibration and batching")
    g.add_argument("--calib-trajectories", type=int, default=CALIB_TRAJECTORIES)
    g.add_argument("--calib-steps", type=int, default=50)
    g.add_argument("--calib-timesteps", type=int, default=CALIB_TIMESTEPS)
    g.add_argument("--cfg-scale", type=float, default=1.0)
    g.add_argument("--metric", default=None, choices=["sampler", "eps"],
                   help="per-sample weights of the output MSE: the sampler's step factor c(t)² (default; with "
                        "--diffusers, the pipeline scheduler's that `treeq capture` stored, else none) or none")
    g.add_argument("--calib-cache", default=None, help="directory caching calibration sets (default: OUT)")
    g.add_argument("--calib-inputs", default=None, metavar="FILE",
                   help="with --diffusers: the calibration inputs `treeq capture` wrote (and its scheduler's "
                        "sampler weights)")
    g.add_argument("--batch", type=int, default=64, help="calibration samples per forward")
    g.add_argument("--group", type=int, default=16, help="candidates stacked per forward")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--compile", action="store_true",
                   help="fuse the candidates' activation fake-quant with torch.compile (GPU speed; near-exact)")
    g = p.add_argument_group("output")
    g.add_argument("--out", default=None, help="output directory (plan.json, report.json, pareto.png, state)")
    g.add_argument("--resume", action="store_true", help="continue from OUT/tss_state.json")
    g.add_argument("--no-progress", action="store_true")
    g.add_argument("--check", default=None, metavar="PLAN", help="only validate PLAN against model and budget")


def parse_config(text: str) -> LayerConfig:
    try:
        w, a = parse_wa(text)
    except PlanError:
        raise PlanError(f"a layer config is written WxAy with integer bits, got {text!r}") from None
    return LayerConfig(w, a)


def random_dit(name: str, seed: int = 0) -> torch.nn.Module:
    """A DiT of config ``name`` with every weight random: ``N(0, 1/fan_in)`` weights and ``N(0, 0.02²)`` biases,
    adaLN and final layer included (the reference zero-initialises those, which would make every block an
    identity), so that every layer affects the output, as in a trained model. The positional table is kept."""
    from ..models import DiT, dit_config

    model = DiT(dit_config(name))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n == "pos_embed":
                continue
            std = 0.02 if p.dim() == 1 else p[0].numel() ** -0.5
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def load_model(args: argparse.Namespace) -> tuple[torch.nn.Module, str]:
    if args.random_config:
        try:
            return random_dit(args.random_config, args.seed), f"{args.random_config} (random)"
        except KeyError as e:   # (a KeyError's text prints in quotes)
            raise ValueError(f"--random-config: {e.args[0] if e.args else e}") from None
    if args.model == "digits":
        from ..models.digits import load_digits_dit

        return load_digits_dit(), "DiT-digits"
    from ..models.digits import load_any_dit

    return load_any_dit(args.model, args.config), str(args.model)


def _inputs(model: torch.nn.Module, args: argparse.Namespace, progress: bool) -> tuple[tuple[torch.Tensor, ...],
                                                                                       torch.Tensor | None]:
    """The calibration set; under torchrun rank 0 collects and caches it while the others wait, then read it."""
    from . import distributed
    from .calibration import CalibrationConfig, load_or_collect

    cfg = CalibrationConfig(args.calib_trajectories, args.calib_steps, args.calib_timesteps, args.cfg_scale,
                            seed=args.seed)
    first = distributed.rank_world()[0] == 0
    if not first:
        distributed.barrier()
    calib = load_or_collect(model, cfg, args.calib_cache or args.out, progress=progress)
    if first:
        distributed.barrier()
    return calib.inputs(), calib.weights(args.metric or "sampler")


def _diffusers_setup(args: argparse.Namespace, device: str, rank: int) -> tuple[Any, str, Any,
                                                                              tuple[torch.Tensor, ...],
                                                                              torch.Tensor | None, Any]:
    """``--diffusers PATH --calib-inputs FILE``: the transformer, its runner, the captured inputs, their sampler
    weights (``--metric``; the file's, see ``diffusers_schedule``), and for closed-loop selection ``(pipeline or
    None, call, source)``: rank 0 loads the pipeline under PATH (at ``--dtype``) and samples; every rank knows
    what is sampled (the resume fingerprint holds it)."""
    from ..models.diffusers_transformers import load_transformer
    from .diffusers_runner import load_inputs, load_weights, make_runner, schedule_drift
    from .diffusers_schedule import per_sample

    if not args.calib_inputs:
        raise ValueError("--diffusers needs --calib-inputs FILE: record the pipeline's transformer calls with "
                         "`treeq capture --pipeline DIR ... --out FILE`")
    other = [f for f, v in (("--model", args.model != "digits"), ("--config", args.config),
                            ("--random-config", args.random_config)) if v]
    if other:
        raise ValueError(f"--diffusers names the model; {', '.join(other)} cannot be given with it")
    ours = [f for f, v in (("--calib-trajectories", args.calib_trajectories != CALIB_TRAJECTORIES),
                           ("--calib-timesteps", args.calib_timesteps != CALIB_TIMESTEPS),
                           ("--calib-cache", args.calib_cache)) if v]
    if ours:
        raise ValueError(f"{', '.join(ours)}: our DiT's calibration sampler; --diffusers reads --calib-inputs")
    closed = None
    index = Path(args.diffusers) / "model_index.json"   # (a pipeline directory's)
    meta = json.loads(index.read_text()) if index.is_file() else None
    expert = args.transformer or "transformer"
    if args.transformer and meta is None:
        raise ValueError("--transformer names an expert of a pipeline directory: --diffusers must be one "
                         "(model_index.json)")
    if args.transformer and meta is not None and meta.get(expert) in (None, [None, None]):
        raise ValueError(f"--transformer {expert}: {meta.get('_class_name')} has none (model_index.json)")
    source = str(Path(args.diffusers) / expert) if args.transformer else args.diffusers   # (the searched model's)
    if args.select == "one-step" or rank != 0:
        model, desc = load_transformer(source, device=device)
    if args.select != "one-step":   # the pipeline samples each plan: its transformer is the one searched
        if meta is None:
            raise ValueError(f"--select {args.select} samples the pipeline: --diffusers must be a pipeline directory "
                             "(model_index.json), not a transformer's")
        from ..models.diffusers_transformers import pipeline_refusal

        refusal = pipeline_refusal(args.diffusers, f"--select {args.select}", takes_images=False,
                                   one_transformer=args.transformer is None,
                                   choose="give --transformer transformer or transformer_2 (the expert searched)")
        if refusal:
            raise ValueError(refusal)
        pipe = None
        if rank == 0:
            from ..models.diffusers_transformers import describe, load_pipeline

            pipe = load_pipeline(args.diffusers, getattr(torch, args.dtype), device)
            model = getattr(pipe, expert)   # (model_index.json names it: checked above)
            desc = describe(model, source=source)
        call = _closed_loop_call(args, model)
        closed = (pipe, call, PipelineJudge.describe(meta["_class_name"], meta["scheduler"][1], call,
                                                     component=expert))
    elif args.closed_loop_labels or args.closed_loop_prompts or args.closed_loop_height or args.closed_loop_width \
            or args.closed_loop_frames:
        raise ValueError("--closed-loop-labels / --closed-loop-prompts / --closed-loop-height / --closed-loop-width / "
                         "--closed-loop-frames are for --select closed-loop[-root]")
    runner = make_runner(model)
    inputs = tuple(t.to(device) for t in load_inputs(args.calib_inputs, runner, padding=False))   # (no PTQ stats)
    weights = None
    if args.metric != "eps" and not args.check:   # (a plan check scores nothing)
        table = load_weights(args.calib_inputs, runner)
        if table is None and args.metric == "sampler":
            raise ValueError(f"--metric sampler: {args.calib_inputs} holds no sampler weights (its pipeline's "
                             "scheduler has none, or it was captured without them); use --metric eps")
        if table is None:
            if rank == 0:
                print(f"treeq search: note: {args.calib_inputs} holds no sampler weights; the metric is the plain "
                      "MSE of the prediction (ε, or a flow model's velocity)", file=sys.stderr)
        else:
            weights = per_sample(table, inputs[runner.input_names.index("timestep")], args.calib_inputs)
            drift = schedule_drift(args.calib_inputs, args.diffusers) if meta is not None else None
            if rank == 0 and drift:
                print(f"treeq search: note: {drift}", file=sys.stderr)
    return model, f"{desc['class']} ({source})", runner, inputs, weights, closed


def _closed_loop_call(args: argparse.Namespace, model: Any) -> dict[str, Any]:
    """The pipeline inputs the closed-loop judge samples: class labels (DiT) or prompts (every other model),
    and the image size (and Wan's frame count) when given."""
    from .diffusers_runner import DIT, VIDEO_ARCHS, diffusers_arch

    size = {side: v for side, v in (("height", args.closed_loop_height), ("width", args.closed_loop_width))
            if v is not None}
    if any(v <= 0 for v in size.values()):
        raise ValueError(f"--closed-loop-height / --closed-loop-width must be positive pixel counts, got {size}")
    if args.closed_loop_frames is not None:
        arch = diffusers_arch(model) or ""
        if arch not in VIDEO_ARCHS and not arch.startswith("generic:"):   # (the generic cut: the pipeline says)
            raise ValueError(f"--closed-loop-frames is for a video model; {type(model).__name__} makes images")
        if args.closed_loop_frames <= 0:
            raise ValueError(f"--closed-loop-frames must be a positive number of frames, got {args.closed_loop_frames}")
        size["num_frames"] = args.closed_loop_frames
    if diffusers_arch(model) == DIT:
        if args.closed_loop_prompts:
            raise ValueError("a DiT pipeline samples --closed-loop-labels, not prompts")
        if size:   # (num_frames was refused above)
            raise ValueError("a DiT pipeline samples at its transformer's size: give it without "
                             "--closed-loop-height / --closed-loop-width")
        classes = int(model.config.num_embeds_ada_norm)
        text = args.closed_loop_labels or ",".join(str(i % classes) for i in range(args.closed_loop_samples))
        try:
            labels = [int(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise ValueError(f"--closed-loop-labels must be comma-separated integers, got {text!r}") from None
        if not labels or min(labels) < 0 or max(labels) >= classes:
            raise ValueError(f"--closed-loop-labels must be class indices in [0, {classes - 1}], got {text!r}")
        return {"class_labels": labels}
    if not args.closed_loop_prompts:
        raise ValueError(f"closed-loop selection on a text-to-image model ({type(model).__name__}) samples "
                         "--closed-loop-prompts FILE (one prompt per line)")
    from ..models.diffusers_transformers import read_prompts

    prompts = read_prompts(args.closed_loop_prompts)
    if not prompts:
        raise ValueError(f"{args.closed_loop_prompts}: no prompts")
    return {"prompt": prompts, **size}


def run(args: argparse.Namespace) -> int:
    from . import distributed
    from .evaluator import DiTRunner, run_segments

    try:
        if not 0.0 <= args.lam <= 1.0:   # (before the model loads and the calibration set is sampled)
            raise ValueError(f"--lam: ENG λ must be in [0, 1], got {args.lam}")
        for flag, v in (("--keep", args.keep), ("--batch", args.batch), ("--group", args.group),
                        ("--random-plans", args.random_plans), ("--serve-batch", args.serve_batch)):
            if v <= 0:
                raise ValueError(f"{flag} must be positive, got {v}")
        if args.out and not args.check:
            from ..calib.store import RUN_FILES

            other = next((f for f, _ in RUN_FILES if f != "tss_state.json" and (Path(args.out) / f).exists()), None)
            if other:   # its plan.json is that run's own: a search would replace it under the run that used it
                raise ValueError(f"--out {args.out} holds another command's output ({other}); search writes its "
                                 "plan.json there: use another --out")
        distributed.init_from_env()
        rank, _ = distributed.rank_world()
        if args.compile:
            from ..nn import grouped

            grouped.use_compiled(True)
        budget = Budget.parse(args.budget)
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device == "cuda" and distributed.is_active():
            device = f"cuda:{torch.cuda.current_device()}"
        judge_fn, samples, source = None, args.closed_loop_samples, ""   # (a diffusers pipeline brings its own)
        fixed = None if args.fixed_bits.lower() == "fp" else parse_config(args.fixed_bits)
        if fixed is not None and fixed.w_bits == 16 and (fixed.a_bits != 16 or fixed.branch is not None):
            raise ValueError(f"--fixed-bits {args.fixed_bits}: 16-bit weights run unquantized (nn.Linear), so their "
                             "activations cannot be quantized; give W16A16 (or 'fp') or quantized weights")
        cands = candidate_configs(parse_bits(args.w_bits, "--w-bits"), parse_bits(args.a_bits, "--a-bits"))
        progress = not args.no_progress and rank == 0
        dtype = getattr(torch, args.dtype)
        if args.diffusers:
            model, name, runner, inputs, weights, closed_call = _diffusers_setup(args, device, rank)
            if closed_call is not None:
                pipe, call, source = closed_call
                judge_fn = functools.partial(PipelineJudge, pipe, call, component=args.transformer or "transformer") \
                    if pipe is not None else None
                samples = len(next(iter(call.values())))
            probe = tuple(t[:2] for t in inputs)
        else:
            if args.calib_inputs or args.closed_loop_labels or args.closed_loop_prompts or args.transformer:
                raise ValueError("--calib-inputs / --closed-loop-labels / --closed-loop-prompts / --transformer are for "
                                 "--diffusers models; a DiT collects its calibration set and samples its own labels")
            model, name = load_model(args)
            model = model.to(device).eval()
            in_ch = model.config.in_channels
            runner = DiTRunner(model, output_fn=lambda o: o[:, :in_ch])
            c = model.config   # the space needs shapes and rows per sample only: any two inputs will do
            probe = (torch.zeros(2, c.in_channels, c.input_size, c.input_size, device=device),
                     torch.zeros(2, dtype=torch.long, device=device), torch.zeros(2, dtype=torch.long, device=device))
        tie = None if args.untie else getattr(runner, "tie", None)
        space = SearchSpace.build(model, probe, include=args.layers, candidates=cands, fixed_config=fixed,
                                  model_name=name, forward=lambda *xs: run_segments(runner, xs), tie=tie)
        if args.check:
            lut = LatencyTable.load(args.latency_table) if args.latency_table else None
            validate_plan(load_plan(args.check), model, space, budget, lut, args.serve_batch)
            print(f"{args.check}: valid for {name}, within {budget.label}")
            return 0
        if not args.diffusers:
            inputs, weights = _inputs(model, args, progress)
        from ..models.diffusers_transformers import cast_keeping_fp32

        model = cast_keeping_fp32(model, dtype)   # (a diffusers class's float32-kept modules stay so; else .to)
        # float timesteps (and what else the runner needs exact) stay as stored
        keep = {runner.input_names.index(n) for n in getattr(runner, "exact_inputs", ("timestep",))
                if n in runner.input_names} if args.diffusers else set()
        inputs = tuple(t.to(device, dtype) if torch.is_floating_point(t) and i not in keep else t.to(device)
                       for i, t in enumerate(inputs))
        closed = None if args.select == "one-step" else ClosedLoopConfig(
            samples=samples, source=source,
            steps=args.closed_loop_steps or args.calib_steps,
            cfg_scale=args.cfg_scale, seed=args.seed, max_plans=args.closed_loop_plans)
        config = SearchConfig(budget, lam=args.lam, keep=args.keep, closed_loop=closed,
                              closed_loop_root=args.select == "closed-loop-root",
                              env=parse_config(args.env) if args.env else None, batch=args.batch, group=args.group,
                              baselines=tuple(b for b in args.baselines.split(",") if b),
                              random_count=args.random_plans, seed=args.seed, latency_table=args.latency_table,
                              serve_batch=args.serve_batch,
                              elites=tuple(e for e in args.warm_start.split(",") if e), env_plan=args.env_plan)
        if args.resume and rank == 0 and not args.out:
            print("treeq search: note: --resume without --out: there is no state to resume; starting from the "
                  "beginning", file=sys.stderr)
        if not args.out and rank == 0 and not args.check:
            print("treeq search: note: no --out, so the plan, report and Pareto plot are not saved (only the table "
                  "below is printed)", file=sys.stderr)
        out = search(model, runner, inputs, config, weights=weights, space=space, out_dir=args.out,
                     resume=args.resume, progress=progress, model_name=name,
                     judge_fn=judge_fn, note=lambda text: print(f"treeq search: note: {text}", file=sys.stderr))
    except (PlanError, BudgetError, ValueError, KeyError, ImportError, FileNotFoundError) as e:
        print(f"treeq search: error: {e}", file=sys.stderr)
        return 2
    if rank == 0:
        print(summary(out.report))
    return 0


def summary(report: dict[str, Any]) -> str:
    """The report as a small table: plan, MSE, costs, evaluations, wall time."""
    rows = [("tss", report["tss"])] + list(report["baselines"].items())
    lines = [f"{report['model']}  budget {report['budget']['label']}  λ={report['lambda']:g}  K={report['keep']}  "
             f"env {report['env'].get('source', report['env']['label'])}  {report['leaves']} leaves, "
             f"{report['calibration_samples']} samples",
             f"{'plan':8s} {'PTQ MSE':>11s} {'W bits':>7s} {'A bits':>7s} {'MB':>8s} {'µs':>9s} {'evals':>7s} "
             f"{'wall s':>8s}"]
    for k, r in rows:   # the search's cost includes its warm start's (the IP baseline's when it ran as one)
        c = r["costs"]
        lines.append(f"{k:8s} {r['mse']:11.4e} {c['w_bits']:7.3f} {c['a_bits']:7.3f} {c['bytes'] / 1e6:8.3f} "
                     f"{c['us']:9.1f} {r.get('evaluations_total', r['evaluations']):7d} "
                     f"{r.get('wall_s_total', r['wall_s']):8.1f}")
    closed = report.get("closed_loop")
    tss = report["tss"]
    if not closed and "closed_loop_mse" in tss:   # --select closed-loop-root: the root's front ranked closed loop
        lines.append(f"selected closed loop at the root: closed-loop MSE {tss['closed_loop_mse']:.4e}"
                     + (f", PSNR {tss['psnr']:.2f} dB" if "psnr" in tss else ""))
    if closed:
        lines.append(f"closed-loop selection ({closed['config']['samples']} samples, {closed['config']['steps']} "
                     "steps): the root's plans within the budget")
        lines.append(f"{'one-step MSE':>13s} {'closed-loop MSE':>16s} {'PSNR dB':>8s}  mix")
        best = min(r["closed_loop_mse"] for r in closed["plans"])
        for r in closed["plans"]:
            mark = "  <- chosen" if r["closed_loop_mse"] == best else ""
            mix = " ".join(f"{k}x{v}" for k, v in r["mix"].items())
            lines.append(f"{r['one_step_mse']:13.4e} {r['closed_loop_mse']:16.4e} {r['psnr']:8.2f}  {mix}{mark}")
    return "\n".join(lines)
