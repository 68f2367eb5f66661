"""``treeq ptq`` and ``treeq peft``: calibrate a DiT for a plan, then fine-tune its branches.

    treeq ptq  --bits W4A4 --branch monarch --branch-params 4 --out out/ptq_w4a4_monarch
    treeq peft --ptq out/ptq_w4a4_monarch --steps 400 --out out/peft_w4a4_monarch

The model is the shipped digits DiT unless ``--model`` names a DiT checkpoint (.pt or .safetensors, its config
inferred from the weights, else the digits config), or a local diffusers transformer the search cuts (the README's
table of models says which) with ``--diffusers PATH --calib-inputs FILE`` (``treeq capture``'s inputs: the
calibration set, and PEFT's distillation data). Both commands resume when rerun with the same ``--out``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Callable

import torch

from ..nn.pointwise import layer_dims
from ..plan import BranchConfig, PlanError, QuantPlan, is_block_layer, parse_wa


def _load_model(path: str | None, device: str):
    """The shipped digits DiT, or the DiT at ``path``: with a ``.json`` config beside it (what ``treeq train`` and
    the digits assets write), that config; else an official-layout checkpoint (.pt or .safetensors, its config
    inferred from the weights) or a digits-shaped one (the digits config)."""
    from ..models.digits import load_any_dit, load_digits_dit

    if path is None or path == "digits":   # ("digits" names it as --model does for search, quantize and sample)
        return load_digits_dit(device=device)
    if not Path(path).is_file():
        raise SystemExit(f"--model {path}: no such file")
    return load_any_dit(path, device=device)


def _diffusers_model(args: argparse.Namespace, with_inputs: bool = True, dtype: torch.dtype = torch.float32):
    """``--diffusers PATH``: the transformer in ``dtype``; and its captured inputs as batches of ``--calib-batch``
    samples (their floats in the model's dtype)."""
    from ..models.diffusers_transformers import load_transformer
    from ..search.diffusers_runner import load_inputs, make_runner

    if args.model:
        raise SystemExit("give --model or --diffusers, not both")
    if not args.calib_inputs:
        raise SystemExit("--diffusers needs --calib-inputs FILE (from `treeq capture`)")
    if args.calib_batch <= 0:
        raise SystemExit(f"--calib-batch must be positive, got {args.calib_batch}")
    try:
        model, _ = load_transformer(args.diffusers, dtype, device=args.device)
        if not with_inputs:
            return model, None
        # (padding rules: for the calibration statistics ptq and SmoothQuant take, not peft's loss)
        inputs = load_inputs(args.calib_inputs, make_runner(model), padding=args.command == "ptq")
    except (ValueError, ImportError, OSError) as e:
        raise SystemExit(f"treeq {args.command}: {e}") from None
    n = inputs[0].shape[0]   # (load_inputs gives float inputs at the model's dtype, timesteps as captured)
    batches = [tuple(t[i:i + args.calib_batch].to(args.device) for t in inputs) for i in range(0, n, args.calib_batch)]
    return model, batches


def _diffusers_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--diffusers", default=None, metavar="PATH",
                   help="instead of --model: a local diffusers transformer (or pipeline) directory the search cuts "
                        "(the README's table of models says which)")
    p.add_argument("--calib-inputs", default=None, metavar="FILE",
                   help="with --diffusers: the inputs `treeq capture` wrote (replace the sampled trajectories)")
    p.add_argument("--calib-batch", type=int, default=16, help="with --diffusers: captured samples per batch")


def parse_bits(text: str) -> tuple[int, int]:
    """``plan.parse_wa`` for argparse."""
    try:
        return parse_wa(text)
    except PlanError:
        raise argparse.ArgumentTypeError(f"bits must look like W4A4, got {text!r}") from None


def branch_for(kind: str, params: int, rank: int = 1) -> BranchConfig | None:
    """``params`` is ``b·r``: the branch has the parameters of a rank-``params`` low-rank branch; a Monarch
    branch has ``params // rank`` blocks of rank ``rank``."""
    if kind == "none":
        return None
    for flag, v in (("--branch-params", params), ("--branch-rank", rank)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{flag} must be a positive int, got {v!r}")
    if kind == "lowrank":
        return BranchConfig("lowrank", 1, params)
    if params % rank:
        raise ValueError(f"branch params {params} must be a multiple of the Monarch rank {rank}")
    return BranchConfig("monarch", params // rank, rank)


def uniform_plan(model: torch.nn.Module, bits: tuple[int, int], branch: BranchConfig | None,
                 edge_bits: tuple[int, int] = (8, 8), model_name: str = "DiT") -> QuantPlan:
    """Block linears at ``bits``, the other linears at ``edge_bits`` (``QuantPlan.block_uniform``), with
    ``branch`` beside every block linear (``with_branch``); the plan names the model ``model_name``."""
    plan = QuantPlan.block_uniform(model, *bits, edge_bits=edge_bits, model_name=model_name)
    label = f"uniform W{bits[0]}A{bits[1]}"
    if branch is not None:
        label += f" + {branch.kind} {branch.blocks}x{branch.rank}"
    return with_branch(dataclasses.replace(plan, meta={"kind": label}), model, branch)


def with_branch(plan: QuantPlan, model: torch.nn.Module, branch: BranchConfig | None) -> QuantPlan:
    """``plan`` with ``branch`` on every block linear (its blocks capped to the layer's smaller side), keeping
    each layer's bits; the other layers keep their configs. ``None`` removes the block layers' branches."""
    layers = dict(plan.layers)
    for n, cfg in plan.layers.items():
        if not is_block_layer(n):
            continue
        br = branch
        if br is not None and br.kind == "lowrank":   # (one block: its rank is what a side caps)
            br = BranchConfig("lowrank", 1, min(br.rank, *layer_dims(model.get_submodule(n))))
        elif br is not None:
            br = BranchConfig(br.kind, min(br.blocks, *layer_dims(model.get_submodule(n))), br.rank)
        layers[n] = cfg.replace(branch=br)
    return dataclasses.replace(plan, layers=layers)


def calibration_batches(fp, n: int, steps: int, seed: int, cfg_scale: float = 1.0) -> list:
    from .data import dit_trajectory, random_labels

    labels = random_labels(n, fp.num_classes, seed)
    return dit_trajectory(fp, labels, steps=steps, sampler="ddpm", cfg_scale=cfg_scale, seed=seed)


def add_ptq_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="a DiT checkpoint (.pt or .safetensors; default: the shipped digits DiT)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--plan", default=None, help="a QuantPlan JSON (e.g. from the search)")
    g.add_argument("--bits", type=parse_bits, default="W4A4", help="uniform plan: block linears at WxAy")
    p.add_argument("--branch", choices=("none", "monarch", "lowrank", "plan"), default="monarch",
                   help="the branch beside every block linear (with --plan too, keeping its bits); 'plan' keeps the "
                        "branches --plan names")
    p.add_argument("--branch-params", type=int, default=32,
                   help="branch size as b·r: the parameters of a rank-R low-rank branch (default 32)")
    p.add_argument("--branch-rank", type=int, default=1, help="Monarch per-block rank r (blocks b = params / r)")
    p.add_argument("--branch-init", choices=("weight", "residual"), default="weight")
    p.add_argument("--calib-samples", type=int, default=64, help="images sampled for calibration")
    p.add_argument("--max-tokens", type=int, default=4096, help="input rows per layer for the searches")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="with --diffusers: the dtype the model loads and runs in (bfloat16 halves the memory of a "
                        "large model; statistics and clip searches stay float32); `treeq peft` and `treeq quantize "
                        "--ptq` follow it")
    p.add_argument("--smooth-alphas", type=float, nargs="*", default=[],
                   help="SmoothQuant α candidates folded into the model where they help (none: off); our DiT, and "
                        "the blocks of every diffusers transformer the search cuts (sites: docs/gmb.md)")
    _diffusers_args(p)
    p.add_argument("--untie", action="store_true",
                   help="with --diffusers: calibrate the linears reading one input apart (to_q/to_k/to_v, "
                        "cross-attention's to_k/to_v, MMDiT's add_q/k/v_proj, Flux single blocks' q/k/v with "
                        "proj_mlp); by "
                        "default such a group is calibrated as one, like our DiT's qkv, when it has no branch "
                        "(--branch none)")
    _common_args(p, "calibration")


def _common_args(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--sample-steps", type=int, default=25, help=f"DDPM steps of the {what} trajectories")
    p.add_argument("--cfg-scale", type=float, default=1.5, help=f"guidance of the {what} trajectories")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", required=True, help="output directory (resumed when it exists)")


def _fingerprint(model) -> str:
    from ..search.calibration import model_fingerprint

    return model_fingerprint(model)[:16]


def run_ptq(args: argparse.Namespace) -> int:
    from ..search.diffusers_runner import inputs_digest
    from .ptq import PTQConfig, calibrate

    if args.branch == "plan" and not args.plan:
        raise SystemExit("treeq ptq: --branch plan needs --plan")
    if not args.diffusers and args.calib_samples <= 0:
        raise SystemExit(f"--calib-samples must be positive, got {args.calib_samples}")
    out = Path(args.out)
    if (out / "plan.json").exists() and not (out / "ptq.json").exists():   # e.g. the search's, given as --plan
        raise SystemExit(f"--out {out} holds a plan.json that is not a ptq run's (a search's?); ptq writes its "
                         "calibrated plan.json there: use another --out")
    if args.diffusers:
        fp, batches = _diffusers_model(args, dtype=getattr(torch, args.dtype))
    else:
        if args.dtype != "float32":
            raise SystemExit("--dtype is for --diffusers models (ours calibrate in float32)")
        fp = _load_model(args.model, args.device)   # only read until calibrate converts it in place
    branch = None if args.branch == "plan" else branch_for(args.branch, args.branch_params, args.branch_rank)
    if args.plan:
        plan = QuantPlan.load(args.plan)
        plan.validate(fp)   # names the layers the model lacks before anything reads them
        plan = plan if args.branch == "plan" else with_branch(plan, fp, branch)
    else:
        name = f"{type(fp).__name__} ({args.diffusers})" if args.diffusers else "DiT"   # (as the search names it)
        plan = uniform_plan(fp, args.bits, branch, model_name=name)
    if args.diffusers:
        data = {"model": args.diffusers, "model_fingerprint": _fingerprint(fp),
                "calib_inputs": inputs_digest(args.calib_inputs), "calib_batch": args.calib_batch}
        if args.dtype != "float32":   # (absent for float32, so that earlier directories resume as they were)
            data["dtype"] = args.dtype
    else:
        data = {"model": args.model or "digits", "model_fingerprint": _fingerprint(fp),
                "samples": args.calib_samples, "sample_steps": args.sample_steps, "cfg_scale": args.cfg_scale}
        batches = calibration_batches(fp, args.calib_samples, args.sample_steps, args.seed, args.cfg_scale)
    cfg = PTQConfig(rounds=args.rounds, branch_init=args.branch_init, max_tokens=args.max_tokens,
                    smooth_alphas=tuple(args.smooth_alphas), seed=args.seed)
    if args.untie and not args.diffusers:
        raise SystemExit("--untie is for --diffusers models (our DiT's qkv is one linear)")
    tie = None
    if args.diffusers:
        from ..search.diffusers_runner import make_runner

        runner = make_runner(fp)
        tie = None if args.untie else runner.tie
        traced = {n for rules in getattr(runner, "_padding", {}).values() for n in rules}
        if traced:   # (the generic cut's padding rules: what the statistics leave out, said before the long work)
            print(f"treeq ptq: the prompt padding the output never reads stays out of the statistics of "
                  f"{len(traced)} linears (traced on every calibration sample)")
    calibrated = calibrate(fp, plan, batches, cfg, out_dir=args.out, data=data, tie=tie)
    state = json.loads((Path(args.out) / "ptq.json").read_text())
    errs = [(v["err_rtn"], v["err"]) for v in state["layers"].values()]
    print(f"calibrated {len(calibrated.layers)} layers into {args.out}; mean relative layer error "
          f"{sum(e[0] for e in errs) / len(errs):.3e} (round-to-nearest) -> {sum(e[1] for e in errs) / len(errs):.3e}")
    return 0


def add_peft_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ptq", required=True, help="a treeq ptq output directory to start from")
    p.add_argument("--model", default=None, help="the FP DiT checkpoint the calibration was made from")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--lr-branch", type=float, default=1e-3)
    p.add_argument("--lora-rank", type=int, default=0, help="a LoRA merged into the low-bit weights (0: none)")
    p.add_argument("--lr-lora", type=float, default=1e-3)
    p.add_argument("--lr-w-scale", type=float, default=0.0,
                   help="train the per-channel weight scales (0: frozen); far below --lr-branch (1e-5 or so: a scale "
                        "step moves a whole output channel)")
    p.add_argument("--warmup", type=int, default=0)
    p.add_argument("--schedule", choices=("cosine", "constant"), default="cosine")
    p.add_argument("--batch", type=int, default=16, help="images per distillation trajectory")
    p.add_argument("--checkpoint-every", type=int, default=50)
    p.add_argument("--loss-weights", choices=("uniform", "sampler"), default="uniform",
                   help="per-sample loss weights: none, or the sampler's c(t)² (damps the t≈0 step; with "
                        "--diffusers, the pipeline scheduler's that `treeq capture` stored)")
    _diffusers_args(p)
    _common_args(p, "distillation")


def run_peft(args: argparse.Namespace) -> int:
    from ..search.diffusers_runner import inputs_digest
    from .peft import PEFTConfig, finetune
    from .ptq import diffusers_dtype, diffusers_source, load_calibration, ptq_digest
    from .store import not_a_run

    why = not_a_run(args.ptq, "ptq")
    if why:
        raise SystemExit(f"--ptq {args.ptq}: expected a `treeq ptq` output directory (with ptq.json); {why}")
    if not args.diffusers and args.batch <= 0:
        raise SystemExit(f"--batch must be positive, got {args.batch}")
    made_with = diffusers_source(args.ptq)
    if made_with is not None and not args.diffusers:
        raise SystemExit(f"--ptq {args.ptq} was calibrated on the diffusers model {made_with}: pass --diffusers "
                         f"{made_with} (and its --calib-inputs)")
    weight: Callable[[tuple], torch.Tensor] | None = None   # finetune's sample_weight: batch -> (B,)
    fp: torch.nn.Module | None
    if args.diffusers:
        dtype = diffusers_dtype(args.ptq)   # the calibration's (its fingerprint was taken in it)
        # one copy of the weights: the teacher is the model itself run in full precision (finetune's fp_model=None)
        model, batches = _diffusers_model(args, dtype=dtype)
        fp, fingerprint = None, _fingerprint(model)
        if args.loss_weights == "sampler":   # the pipeline scheduler's c(t)², stored by `treeq capture`
            from ..search.diffusers_runner import load_weights, make_runner, schedule_drift
            from ..search.diffusers_schedule import batch_weights

            runner = make_runner(model)
            try:
                table = load_weights(args.calib_inputs, runner)
                drift = schedule_drift(args.calib_inputs, args.diffusers)
            except ValueError as e:
                raise SystemExit(f"treeq peft: {e}") from None
            if drift:
                print(f"treeq peft: note: {drift}", file=sys.stderr)
            if table is None:
                raise SystemExit(f"--loss-weights sampler: {args.calib_inputs} holds no sampler weights (its "
                                 "pipeline's scheduler has none, or it was captured without them)")
            weight = batch_weights(table, runner.input_names.index("timestep"), args.calib_inputs)
    else:   # (the FP model also samples the distillation trajectories)
        fp = _load_model(args.model, args.device)
        model = _load_model(args.model, args.device)
        fingerprint = _fingerprint(fp)
    load_calibration(model, args.ptq)
    ptq_state = json.loads((Path(args.ptq) / "ptq.json").read_text())
    made_from = ptq_digest(ptq_state)
    if args.diffusers:
        data = {"model": args.diffusers, "model_fingerprint": fingerprint, "ptq": made_from,
                "calib_inputs": inputs_digest(args.calib_inputs), "calib_batch": args.calib_batch}
    else:
        data = {"model": args.model or "digits", "model_fingerprint": fingerprint, "ptq": made_from,
                "batch": args.batch, "sample_steps": args.sample_steps, "cfg_scale": args.cfg_scale}
    cfg = PEFTConfig(steps=args.steps, lr_branch=args.lr_branch, lora_rank=args.lora_rank, lr_lora=args.lr_lora,
                     lr_w_scale=args.lr_w_scale, warmup=args.warmup, schedule=args.schedule,
                     checkpoint_every=args.checkpoint_every, seed=args.seed, loss_weights=args.loss_weights)

    def trajectory(r: int) -> list:  # a fresh batch per round, seeded apart from the calibration set
        if args.diffusers:   # the captured calls, every round (each round visits them in a new order)
            return batches
        return calibration_batches(fp, args.batch, args.sample_steps, seed=10_000 + args.seed * 1000 + r,
                                   cfg_scale=args.cfg_scale)

    if args.loss_weights == "sampler" and not args.diffusers:
        from .data import sampler_loss_weights

        weight = sampler_loss_weights(args.sample_steps)
    kw: dict[str, Any] = {}
    if args.diffusers:
        from ..search.diffusers_runner import diffusers_eps

        kw["eps_fn"] = diffusers_eps
    res = finetune(model, fp, trajectory, cfg, out_dir=args.out, sample_weight=weight, data=data, **kw)
    tail = res.losses[-min(20, len(res.losses)):]
    print(f"fine-tuned {res.trainable_params} parameters for {res.step} steps into {args.out}; "
          f"loss (last {len(tail)} steps) {sum(tail) / max(1, len(tail)):.3e}")
    return 0
