"""Does the scheduler-measured sampler weighting (``search.diffusers_schedule``) pick better plans for a diffusers
sampler than the plain ε-MSE? The digits DiT, converted to diffusers (``dit_to_diffusers``, exact), sampled the way
``DiTPipeline`` samples (classifier-free guidance on the ε channels, the scheduler's ``step``) with a diffusers
scheduler, DPM-Solver++ 2M by default (PixArt's; the digits model's linear β schedule):

1. calibration: the FP model's calls while it samples ``--calib-labels`` labels, captured with ``capture_calls``
   and kept at ``--calib-timesteps`` of the schedule's timesteps (as ``treeq capture`` does);
2. two searches on those inputs at one budget, the same K and λ, with the IP baseline: one weighted by the
   scheduler's ``c(t)²``, one by none;
3. every plan (TSS and IP of each, uniform) is fake-quantized and samples ``--eval-labels`` labels from fixed seeds
   through the same scheduler; scored against FP's samples from the same seeds (MSE, PSNR) and by the shipped
   digits classifier (class accuracy, Fréchet distance to held-out real digits).

    python benchmarks/search_diffusers_scheduler_digits.py --out out/sched_digits --threads 1

Results into OUT/results.json and OUT/results.md (a table per plan). Pixel space: the digits DiT has no VAE, so the
samples are the images.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

SCHEDULERS = ("DPMSolverMultistepScheduler", "DDIMScheduler", "EulerDiscreteScheduler")


def make_scheduler(name: str):
    import diffusers

    # the digits DiT's training schedule: 1000 linear β from 1e-4 to 0.02 (models.diffusion)
    return getattr(diffusers, name)(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4,
                                    beta_end=0.02, **({"clip_sample": False} if name == "DDIMScheduler" else {}))


@torch.no_grad()
def sample(model, scheduler_name: str, labels: list[int], steps: int, cfg: float, seed: int) -> torch.Tensor:
    """``DiTPipeline``'s loop without its VAE: guidance on the ε channels, the scheduler's step. ``(N, 1, H, W)``."""
    sched = make_scheduler(scheduler_name)
    sched.set_timesteps(steps)
    cfg_ = model.config
    g = torch.Generator().manual_seed(seed)
    n = len(labels)
    x = torch.randn(n, cfg_.in_channels, cfg_.sample_size, cfg_.sample_size, generator=g) * sched.init_noise_sigma
    y = torch.tensor(labels + [int(cfg_.num_embeds_ada_norm)] * n)   # [cond; null class]
    c = cfg_.in_channels
    for t in sched.timesteps:
        xin = sched.scale_model_input(torch.cat([x, x]), t)
        out = model(xin, timestep=t.expand(2 * n), class_labels=y).sample[:, :c]
        cond, uncond = out.chunk(2)
        x = sched.step(uncond + cfg * (cond - uncond), t, x).prev_sample
    return x.clamp(-1, 1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="out/sched_digits")
    p.add_argument("--scheduler", default=SCHEDULERS[0], choices=SCHEDULERS)
    p.add_argument("--budget", default="W4A4")
    p.add_argument("--keep", type=int, default=8)
    p.add_argument("--lam", type=float, default=1.0)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=1.5)
    p.add_argument("--calib-labels", type=int, default=8)
    p.add_argument("--calib-timesteps", type=int, default=5)
    p.add_argument("--eval-labels", type=int, default=200)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--only", choices=("weighted", "plain"), default=None,
                   help="run one of the two searches (two processes can share the work); then --report")
    p.add_argument("--report", action="store_true", help="only evaluate the searches' saved plans")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from treeq_engine.eval.metrics import DigitsJudge, compare_samples
    from treeq_engine.models.diffusers_transformers import dit_to_diffusers
    from treeq_engine.models.digits import load_digits_dit
    from treeq_engine.nn import convert
    from treeq_engine.plan import QuantPlan
    from treeq_engine.search import Budget, DiffusersRunner, capture_calls
    from treeq_engine.search.diffusers_runner import select_timesteps
    from treeq_engine.search.diffusers_schedule import per_sample, scheduler_weights
    from treeq_engine.search.run import SearchConfig, search

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fp = dit_to_diffusers(load_digits_dit())
    runner = DiffusersRunner(fp)
    sched = make_scheduler(args.scheduler)
    sched.set_timesteps(args.steps)
    keep = select_timesteps(sched.timesteps, args.calib_timesteps)
    classes = int(fp.config.num_embeds_ada_norm)
    with capture_calls(runner, keep=keep) as calls:
        sample(fp, args.scheduler, [i % classes for i in range(args.calib_labels)], args.steps, args.cfg, seed=1)
    inputs = calls.inputs()
    table = scheduler_weights(make_scheduler(args.scheduler), args.steps)
    t_index = runner.input_names.index("timestep")
    weights = per_sample(table, inputs[t_index], "calibration")
    cfg = SearchConfig(Budget.parse(args.budget), lam=args.lam, keep=args.keep, baselines=("uniform", "ip"))
    runs = {}
    for name, w in (("weighted", weights), ("plain", None)):
        if args.report or (args.only and args.only != name):
            continue
        t0 = time.perf_counter()
        model = copy.deepcopy(fp)
        res = search(model, DiffusersRunner(model), inputs, cfg, weights=w, out_dir=out / name, resume=True,
                     progress=False, model_name=f"DiT-digits (diffusers, {name})")   # plan.json, plan_ip.json
        runs[name] = {"search_mse": res.report["tss"]["search_mse"], "evaluations": res.report["tss"]["evaluations"],
                      "wall_s": round(time.perf_counter() - t0, 1),
                      "one_step_mse": {"tss": res.ptq_mse, **{k: b.mse for k, b in res.baselines.items()}}}
        print(f"{name}: search MSE {runs[name]['search_mse']:.4e}, {runs[name]['evaluations']} evaluations, "
              f"{runs[name]['wall_s']} s", flush=True)
        (out / name / "run.json").write_text(json.dumps(runs[name], indent=2) + "\n")
    if args.only:
        return 0

    # evaluate every plan by sampling through the scheduler from fixed seeds
    labels = [i % classes for i in range(args.eval_labels)]
    ref = sample(fp, args.scheduler, labels, args.steps, args.cfg, seed=123)
    judge = DigitsJudge()
    plans = {"uniform": QuantPlan.block_uniform(fp, *_bits(args.budget))}
    for name in ("weighted", "plain"):
        for kind, file in (("tss", "plan.json"), ("ip", "plan_ip.json")):
            if (out / name / file).exists():
                plans[f"{kind} ({name})"] = QuantPlan.load(out / name / file)
    rows = {"FP": _score(ref, ref, labels, judge, compare_samples)}
    for name, plan in plans.items():
        q = convert(copy.deepcopy(fp), plan)
        rows[name] = _score(sample(q, args.scheduler, labels, args.steps, args.cfg, seed=123), ref, labels, judge,
                            compare_samples)
        print(name, rows[name], flush=True)
    searches = {n: json.loads((out / n / "run.json").read_text()) for n in ("weighted", "plain")
                if (out / n / "run.json").exists()}
    doc = {"setup": {**vars(args), "calibration_samples": int(inputs[0].shape[0]),
                     "weights": {f"{t:g}": round(w, 4) for t, w in table.items()}},
           "searches": searches, "plans": rows}
    (out / "results.json").write_text(json.dumps(doc, indent=2) + "\n")
    md = [f"{args.scheduler}, {args.steps} steps, cfg {args.cfg}, {args.budget}, K = {args.keep}, λ = {args.lam}; "
          f"{int(inputs[0].shape[0])} calibration samples ({args.calib_labels} labels × {args.calib_timesteps} "
          f"timesteps × 2 guidance halves); {args.eval_labels} evaluation samples",
          "", "| plan | closed-loop MSE vs FP | PSNR dB | class acc | Fréchet |", "|---|---|---|---|---|"]
    md += [f"| {k} | {r['mse']:.4e} | {r['psnr']:.2f} | {r['accuracy']:.3f} | {r['frechet']:.1f} |"
           for k, r in rows.items()]
    if searches:   # each search's own (one-step) metric of its plan and its baselines
        md += ["", "| search metric | " + " | ".join(next(iter(searches.values()))["one_step_mse"]) + " |",
               "|---|" + "---|" * len(next(iter(searches.values()))["one_step_mse"])]
        md += [f"| {n} | " + " | ".join(f"{v:.4e}" for v in r["one_step_mse"].values()) + " |"
               for n, r in searches.items()]
    (out / "results.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


def _bits(budget: str) -> tuple[int, int]:
    from treeq_engine.plan import parse_wa

    return parse_wa(budget)


def _score(x: torch.Tensor, ref: torch.Tensor, labels: list[int], judge, compare) -> dict[str, float]:
    y = torch.tensor(labels)
    cmp = compare(x, ref)
    return {"mse": float(((x - ref) ** 2).mean()), "psnr": cmp["psnr"], "accuracy": judge.accuracy(x, y),
            "frechet": judge.frechet(x)}


if __name__ == "__main__":
    sys.exit(main())
