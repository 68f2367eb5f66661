#!/usr/bin/env python
"""GMB ablation on the digits DiT: no branch / low rank / Monarch at equal parameters, after PTQ and after PEFT.

For each uniform setting (W4A4, W3A3 by default) and each branch variant, the script calibrates (``calibrate``)
and fine-tunes (``finetune``) the shipped digits DiT, and measures against the FP model:

    ε-MSE      mean (ε_q − ε_fp)² over the ε channels, on held-out FP sampling trajectories (teacher-forced)
    PSNR       of the quantized model's samples against the FP model's samples from the same seeds and labels
    FD         Fréchet distance of the samples to the held-out real digits, in the digits classifier's features
    acc        the classifier's accuracy on the samples (w.r.t. the labels they were drawn for)

plus the branch's parameters (and the plan's average weight bits with and without the branch) and the PTQ / PEFT
wall time. Every run is resumable: calibrations and fine-tunings live in ``--work`` and finished rows in
``--work/results.json``; rerunning the same command continues. CPU, single thread by default.

    python benchmarks/gmb_ablation.py --work out/gmb_ablation [--bits W4A4 W3A3] [--params 4] [--peft-steps 300]
        [--plans tss_w4a4=out/search/plan.json]
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import subprocess
import time
from pathlib import Path

import torch

from treeq_engine.branches import plan_weight_bits
from treeq_engine.calib.cli import branch_for, calibration_batches, parse_bits, uniform_plan, with_branch
from treeq_engine.calib.data import sampler_loss_weights
from treeq_engine.calib.peft import PEFTConfig, finetune, load_finetuned
from treeq_engine.calib.ptq import PTQConfig, calibrate, load_calibration
from treeq_engine.demo import pick_real
from treeq_engine.eval.metrics import DigitsJudge, EpsProbe, compare_samples
from treeq_engine.models.digits import digits_split, load_digits_dit
from treeq_engine.models.sample import sample
from treeq_engine.nn import convert, quant_layers
from treeq_engine.plan import QuantPlan

VARIANTS = ("none", "lowrank", "monarch")


class Judge:
    """The fixed evaluation (the demo's protocol): FP samples from one seed, the ε probe on noised held-out
    digits over 10 timesteps, the classifier's features of the held-out digits."""

    def __init__(self, fp, n_samples: int, steps: int, cfg_scale: float, seed: int = 0) -> None:
        self.fp, self.steps, self.cfg_scale, self.seed = fp, steps, cfg_scale, seed
        split = digits_split()
        self.digits = DigitsJudge(real=split.test_x)
        self.probe = EpsProbe.build(fp, split.test_x, timesteps=10, seed=seed)
        self.labels = torch.arange(n_samples) % fp.config.num_classes
        t0 = time.perf_counter()
        self.fp_samples = self.samples(fp)
        self.fp_sample_s = time.perf_counter() - t0
        real = split.train_x[pick_real(split.train_y, self.labels, seed)]
        self.floor = {"fd": self.digits.frechet(real), "acc": self.digits.accuracy(real, self.labels)}

    def samples(self, model, seed: int | None = None) -> torch.Tensor:
        return sample(model, self.labels, steps=self.steps, sampler="ddpm", cfg_scale=self.cfg_scale,
                      seed=self.seed if seed is None else seed)

    @torch.no_grad()
    def __call__(self, model) -> dict:
        t0 = time.perf_counter()
        imgs = self.samples(model)
        secs = time.perf_counter() - t0
        same = compare_samples(imgs, self.fp_samples)
        return {"eps_mse": self.probe.mse(model), "psnr": same["psnr"], "ssim": same["ssim"],
                "fd": self.digits.frechet(imgs), "acc": self.digits.accuracy(imgs, self.labels),
                "sample_s": round(secs, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", required=True)
    ap.add_argument("--bits", nargs="*", type=parse_bits, default=[(4, 4), (3, 3)],
                    help="uniform settings (none: --plans only)")
    ap.add_argument("--params", type=int, default=4, help="branch budget b·r (rank of the equal low-rank branch)")
    ap.add_argument("--plans", nargs="*", default=[], metavar="NAME=PLAN.json",
                    help="also searched plans (e.g. from `treeq search`), each with every --variants branch")
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    ap.add_argument("--no-peft", action="store_true", help="PTQ rows only")
    ap.add_argument("--branch-init", choices=("weight", "residual"), default="weight")
    ap.add_argument("--smooth-alphas", type=float, nargs="*", default=[])
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--peft-steps", type=int, default=300)
    ap.add_argument("--peft-batch", type=int, default=16)
    ap.add_argument("--lr-branch", type=float, default=1e-3)
    ap.add_argument("--none-lora-rank", type=int, default=None,
                    help="no-branch PEFT: the rank of the LoRA merged into the codes (default: --params)")
    ap.add_argument("--lr-lora", type=float, default=1e-3)
    ap.add_argument("--lr-w-scale", type=float, default=0.0, help="also train the weight scales (all variants)")
    ap.add_argument("--peft-loss-weights", choices=("uniform", "sampler"), default="uniform",
                    help="PEFT's per-sample loss weights (rows and directories of 'sampler' say so)")
    ap.add_argument("--eval-samples", type=int, default=500)
    ap.add_argument("--steps", type=int, default=25, help="DDPM sampling steps (evaluation, calibration, PEFT)")
    ap.add_argument("--cfg-scale", type=float, default=1.5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    res_path = work / "results.json"
    results = json.loads(res_path.read_text()) if res_path.exists() else {"rows": {}}

    def save() -> None:
        res_path.write_text(json.dumps(results, indent=1) + "\n")

    fp = load_digits_dit()
    judge = Judge(fp, args.eval_samples, args.steps, args.cfg_scale)
    batches = calibration_batches(fp, args.calib_samples, args.steps, seed=1, cfg_scale=args.cfg_scale)
    results["meta"] = {"args": {k: (v if not isinstance(v, list) else [list(x) if isinstance(x, tuple) else x
                                                                        for x in v]) for k, v in vars(args).items()},
                       "fp_sample_s": round(judge.fp_sample_s, 1), "torch": torch.__version__,
                       "machine": platform.machine(), "threads": torch.get_num_threads(),
                       "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                                text=True).stdout.strip()}
    if "FP" not in results["rows"]:
        results["rows"]["real"] = {"bits": "real digits", "variant": "-", "stage": "-", "eps_mse": None,
                                   "psnr": None, "ssim": None, **judge.floor}
        results["rows"]["FP"] = {"bits": "FP", "variant": "-", "stage": "-", **judge(fp)}
        save()
    if "FP seed 1" not in results["rows"]:  # the sampling noise of FD/acc: the FP model from another seed
        other = judge.samples(fp, seed=judge.seed + 1)
        results["rows"]["FP seed 1"] = {"bits": "FP (other seed)", "variant": "-", "stage": "-", "eps_mse": None,
                                        "psnr": None, "ssim": None, "fd": judge.digits.frechet(other),
                                        "acc": judge.digits.accuracy(other, judge.labels)}
        save()
    shapes = {n: tuple(m.weight.shape) for n, m in fp.named_modules() if isinstance(m, torch.nn.Linear)}
    settings = [(f"W{b[0]}A{b[1]}", uniform_plan(fp, b, None)) for b in args.bits]
    for spec in args.plans:
        name, sep, path = spec.rpartition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--plans takes NAME=PLAN.json, got {spec!r}")
        plan = QuantPlan.load(path)
        plan.validate(fp)
        settings.append((name, plan))
    for label, base in settings:
        key = f"{label} rtn"
        if key not in results["rows"]:  # round-to-nearest, no calibration, no branch
            rtn = convert(copy.deepcopy(fp), base)
            results["rows"][key] = {"bits": label, "variant": "none", "stage": "RTN", **judge(rtn)}
            save()
        for variant in args.variants:
            plan = with_branch(base, fp, branch_for(variant, args.params))
            ptq_dir = work / f"{label}_{variant}_ptq"
            key = f"{label} {variant} PTQ"
            model = copy.deepcopy(fp)
            t0 = time.perf_counter()
            if (ptq_dir / "plan.json").exists():
                load_calibration(model, ptq_dir)
            else:
                calibrate(model, plan, batches, PTQConfig(branch_init=args.branch_init,
                                                           smooth_alphas=tuple(args.smooth_alphas)), out_dir=ptq_dir)
            ptq_s = time.perf_counter() - t0
            params = sum(m.branch.params for m in quant_layers(model).values() if m.branch is not None)
            cost = {"branch_params": params,
                    "w_bits_no_branch": round(plan_weight_bits(plan, shapes, count_branch=False), 3),
                    "w_bits_with_branch": round(plan_weight_bits(plan, shapes, count_branch=True), 3)}
            if key not in results["rows"]:
                results["rows"][key] = {"bits": label, "variant": variant, "stage": "PTQ", **cost,
                                        "ptq_s": round(ptq_s, 1), **judge(model)}
                save()
            tag = "" if args.peft_loss_weights == "uniform" else " sampler-weighted"
            key = f"{label} {variant} PEFT{tag}"
            if key in results["rows"] or args.no_peft:
                continue
            lora = (args.params if args.none_lora_rank is None else args.none_lora_rank) if variant == "none" else 0
            cfg = PEFTConfig(steps=args.peft_steps, lr_branch=args.lr_branch, lora_rank=lora, lr_lora=args.lr_lora,
                             lr_w_scale=args.lr_w_scale, checkpoint_every=50, loss_weights=args.peft_loss_weights)
            if variant == "none" and cfg.lora_rank == 0 and cfg.lr_w_scale == 0:
                continue  # nothing to train without a branch
            peft_dir = work / (f"{label}_{variant}_peft" + ("" if not tag else "_sampler"))

            def trajectory(r: int) -> list:
                return calibration_batches(fp, args.peft_batch, args.steps, seed=10_000 + r, cfg_scale=args.cfg_scale)

            t0 = time.perf_counter()
            done = (peft_dir / "peft.json").exists() and json.loads((peft_dir / "peft.json").read_text())[
                "step"] == cfg.steps
            if done:
                load_finetuned(model, peft_dir)
            else:
                finetune(model, fp, trajectory, cfg, out_dir=peft_dir,
                         sample_weight=sampler_loss_weights(args.steps) if tag else None)
            peft_s = time.perf_counter() - t0
            trained = sum(p.numel() for n, p in model.named_parameters()
                          if ".branch." in n or ".lora." in n or (n.endswith("w_scale") and cfg.lr_w_scale > 0))
            results["rows"][key] = {"bits": label, "variant": variant + (f" + LoRA {lora}" if lora else ""),
                                    "stage": "PEFT" + tag, **cost,
                                    "trained_params": trained, "peft_s": round(peft_s, 1),
                                    "peft_steps": cfg.steps, **judge(model)}
            save()
    print(table(results))


def table(results: dict) -> str:
    head = ("| setting | branch | stage | branch params | W bits (w/o / with branch) | ε-MSE | PSNR dB | SSIM | FD "
            "| acc | PTQ s | PEFT s |")
    lines = [head, "|---" * (head.count("|") - 1) + "|"]

    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    for r in results["rows"].values():
        bits = "-" if "w_bits_no_branch" not in r else f"{r['w_bits_no_branch']:.2f} / {r['w_bits_with_branch']:.2f}"
        lines.append(f"| {r['bits']} | {r['variant']} | {r['stage']} | {r.get('branch_params', '-')} | {bits} "
                     f"| {f(r['eps_mse'], '.2e')} | {f(r['psnr'], '.2f')} | {f(r['ssim'], '.3f')} | {r['fd']:.2f} "
                     f"| {r['acc']:.1%} | {r.get('ptq_s', '-')} | {r.get('peft_s', '-')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
