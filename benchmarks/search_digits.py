"""TSS against uniform, integer-programming and random plans on the digits DiT, and the ENG λ sweep.

    python benchmarks/search_digits.py --out out/search_digits                   # the full study (hours on 2 CPUs)
    python benchmarks/search_digits.py --budgets W4A4 --lams 1 --samples 20 --calib-trajectories 2 --keep 4
    python benchmarks/search_digits.py --out out/search_digits --lams 1 --select closed-loop   # same trees, plan
                                                                    # chosen by whole trajectories (keys _cl)

For each budget (default average W4A4 and W3A3) and each λ (default 1, 0.5, 0), it runs ``search`` on the same
calibration set (the FP sampler's inputs: ``--calib-trajectories`` samples × ``--calib-timesteps`` steps ×
2 for guidance) with K = ``--keep``; at λ = 1 also the baselines (uniform, IP over per-layer sensitivities, best
of 20 random plans) and, with ``--ablation``, TSS without the environment-uniform elite. Every plan is then
judged the same way, on data the search never saw:

    ε-MSE     ε-prediction MSE against FP on held-out real digits noised at 10 timesteps (EpsProbe)
    Fréchet   distance of ``--samples`` class-conditional samples to the held-out digits (classifier features)
    acc       class accuracy of those samples by the shipped classifier
    PSNR      of the samples against FP's samples from the same seeds

A finished run (``report.json`` present) is reused, so a killed study picks up where it stopped. Results go
to ``OUT/results.json`` and ``OUT/results.md`` (the tables in docs/search.md).
"""
from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="out/search_digits")
    p.add_argument("--model", default=None, help="digits DiT .safetensors (default: the shipped one)")
    p.add_argument("--budgets", default="W4A4,W3A3")
    p.add_argument("--lams", default="1,0.5,0")
    p.add_argument("--keep", type=int, default=16)
    p.add_argument("--calib-trajectories", type=int, default=10)
    p.add_argument("--calib-timesteps", type=int, default=4)
    p.add_argument("--steps", type=int, default=25, help="sampling steps (calibration and judging)")
    p.add_argument("--cfg-scale", type=float, default=1.5)
    p.add_argument("--metric", default="sampler", choices=["sampler", "eps"], help="MSE weighting (see calibration)")
    p.add_argument("--samples", type=int, default=100, help="samples judged per plan (classes cycled)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ablation", action="store_true", help="also TSS without the uniform elite (λ = 1)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--warm-start", default="", help="TSS warm start (SearchConfig.elites), e.g. 'ip'")
    p.add_argument("--env-plan", default=None, help="ENG environment plan (SearchConfig.env_plan), e.g. 'ip'")
    p.add_argument("--select", default="one-step", choices=["one-step", "closed-loop", "closed-loop-root"],
                   help="closed-loop: choose among the root's in-budget plans by whole trajectories (runs "
                        "keyed _cl; a finished one-step run's tree is reused)")
    p.add_argument("--closed-loop-samples", type=int, default=32)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from treeq_engine.eval.metrics import DigitsJudge, EpsProbe, compare_samples
    from treeq_engine.models.digits import digits_split, load_digits_dit
    from treeq_engine.models.sample import sample
    from treeq_engine.nn import convert
    from treeq_engine.plan import QuantPlan
    from treeq_engine.search import Budget, DiTRunner
    from treeq_engine.search.calibration import CalibrationConfig, load_or_collect
    from treeq_engine.search.closed_loop import ClosedLoopConfig
    from treeq_engine.search.run import SearchConfig, search

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fp = load_digits_dit(args.model)
    judge = DigitsJudge()
    probe = EpsProbe.build(fp, digits_split().test_x, timesteps=10, seed=args.seed + 1)
    labels = torch.arange(args.samples) % 10
    sample_kw = dict(steps=args.steps, cfg_scale=args.cfg_scale, seed=args.seed)
    fp_samples = sample(fp, labels, **sample_kw)
    calib = load_or_collect(fp, CalibrationConfig(args.calib_trajectories, args.steps, args.calib_timesteps,
                                                  args.cfg_scale, seed=args.seed), out / "cache")
    results: dict[str, Any] = {"setup": {**vars(args), "calibration_samples": len(calib),
                                         "fp": {"frechet": judge.frechet(fp_samples),
                                                "acc": judge.accuracy(fp_samples, labels)}}, "runs": {}}
    if (out / "results.json").exists():   # runs of earlier invocations (other budgets, λ or selection) stay
        results["runs"] = json.loads((out / "results.json").read_text()).get("runs", {})

    def judge_plan(plan: QuantPlan) -> dict[str, float]:
        q = convert(copy.deepcopy(fp), plan)
        s = sample(q, labels, **sample_kw)
        return {"eps_mse": probe.mse(q), "frechet": judge.frechet(s), "acc": judge.accuracy(s, labels),
                "psnr": compare_samples(s, fp_samples)["psnr"]}

    def save() -> None:
        (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        (out / "results.md").write_text(tables(results) + "\n")

    for btext in args.budgets.split(","):
        budget = Budget.parse(btext)
        runs = [(float(lam), True) for lam in args.lams.split(",")] + ([(1.0, False)] if args.ablation else [])
        for lam, anchor in runs:
            warm = tuple(e for e in args.warm_start.split(",") if e)
            base = (f"{budget.label}_lam{lam:g}" + ("" if anchor else "_noanchor")
                    + ("" if args.metric == "sampler" else f"_{args.metric}")
                    + "".join(f"_warm{Path(e).stem}" for e in warm)
                    + (f"_env{Path(args.env_plan).stem}" if args.env_plan else ""))
            key = base + {"one-step": "", "closed-loop": "_cl", "closed-loop-root": "_clroot"}[args.select]
            run_dir = out / key
            # closed loop changes only the last choice: the one-step run's finished tree is the same tree
            # (another seed than the judge's samples, so that selection and judging do not share noise)
            closed = None if args.select == "one-step" else ClosedLoopConfig(
                samples=args.closed_loop_samples, steps=args.steps, cfg_scale=args.cfg_scale, seed=args.seed + 100)
            if args.select == "closed-loop" and not (run_dir / "tss_state.json").exists() and \
                    (out / base / "tss_state.json").exists():
                run_dir.mkdir(parents=True, exist_ok=True)
                shutil.copy(out / base / "tss_state.json", run_dir / "tss_state.json")
            if not (run_dir / "report.json").exists():
                t0 = time.perf_counter()
                cfg = SearchConfig(budget, lam=lam, keep=args.keep, anchor=anchor, closed_loop=closed,
                                   closed_loop_root=args.select == "closed-loop-root", elites=warm,
                                   env_plan=args.env_plan,
                                   baselines=("uniform", "ip", "random") if lam == 1.0 and anchor else ())
                m = copy.deepcopy(fp)
                search(m, DiTRunner(m, output_fn=lambda o: o[:, :1]), calib.inputs(), cfg,
                       weights=calib.weights(args.metric), out_dir=run_dir,
                       resume=True, progress=False, model_name="DiT-digits")
                print(f"{key}: searched in {time.perf_counter() - t0:.0f} s", flush=True)
            report = json.loads((run_dir / "report.json").read_text())
            entry = {"report": {k: report.get(k) for k in ("tss", "baselines", "env", "calibration_samples",
                                                           "closed_loop")},
                     "judged": {"tss": judge_plan(QuantPlan.load(run_dir / "plan.json"))}}
            for name in report["baselines"]:
                entry["judged"][name] = judge_plan(QuantPlan.load(run_dir / f"plan_{name}.json"))
            results["runs"][key] = entry
            save()
            print(tables(results), flush=True)
    return 0


def tables(results: dict[str, Any]) -> str:
    """The comparison table per budget (λ = 1) and the λ sweep, as markdown."""
    fp = results["setup"]["fp"]
    lines = [f"FP: Fréchet {fp['frechet']:.2f}, accuracy {fp['acc']:.3f}; calibration "
             f"{results['setup']['calibration_samples']} samples; K = {results['setup']['keep']}", ""]
    head = ("| budget | plan | search MSE | ε-MSE (held out) | Fréchet | acc | PSNR dB | avg W | avg A | "
            "evaluations | wall s |")
    lines += [head, "|" + "---|" * 11]
    for key, run in results["runs"].items():
        if "_lam1" not in key or "_noanchor" in key:
            continue
        budget = key.split("_")[0] + ("" if key.endswith("_lam1") else " (" + key.split("_lam1_")[1] + ")")
        rep = run["report"]
        rows = [("TSS", rep["tss"])] + ([] if key.endswith(("_cl", "_clroot")) else list(rep["baselines"].items()))
        for name, r in rows:
            j = run["judged"]["tss" if name == "TSS" else name]
            label = name if name != "uniform" else f"uniform {r.get('label', '')}"
            lines.append(f"| {budget} | {label} | {r['mse']:.3e} | {j['eps_mse']:.3e} | {j['frechet']:.2f} | "
                         f"{j['acc']:.3f} | {j['psnr']:.1f} | {r['costs']['w_bits']:.3f} | "
                         f"{r['costs']['a_bits']:.3f} | {r.get('evaluations_total', r['evaluations'])} | "
                         f"{r.get('wall_s_total', r['wall_s']):.0f} |")
    lines += ["", "| budget | λ | elite | PTQ MSE (calib) | ε-MSE (held out) | Fréchet | acc | avg W | avg A | "
              "wall s |", "|" + "---|" * 10]
    for key, run in results["runs"].items():
        budget, lam = key.split("_")[0] + (" (eps)" if "eps" in key.split("_") else ""), key.split("_")[1][3:]
        r, j = run["report"]["tss"], run["judged"]["tss"]
        lines.append(f"| {budget} | {lam} | {'no' if '_noanchor' in key else 'yes'} | {r['mse']:.3e} | "
                     f"{j['eps_mse']:.3e} | {j['frechet']:.2f} | {j['acc']:.3f} | {r['costs']['w_bits']:.3f} | "
                     f"{r['costs']['a_bits']:.3f} | {r['wall_s']:.0f} |")
    cl = {k: v for k, v in results["runs"].items() if k.endswith("_cl") and v["report"].get("closed_loop")}
    if cl:
        lines += ["", "Closed-loop selection: the root's in-budget plans, one-step MSE (the search's metric) "
                  "against the closed-loop MSE of whole trajectories (samples vs FP's from the same noise)", "",
                  "| run | plan (layers per config) | one-step MSE | closed-loop MSE | PSNR dB | chosen |",
                  "|---|---|---|---|---|---|"]
        for key, run in cl.items():
            closed, rep = run["report"]["closed_loop"], run["report"]
            best = min(r["closed_loop_mse"] for r in closed["plans"])
            for r in closed["plans"]:
                mix = " ".join(f"{k}×{v}" for k, v in r["mix"].items())
                lines.append(f"| {key} | {mix} | {r['one_step_mse']:.3e} | "
                             f"{r['closed_loop_mse']:.3e} | {r['psnr']:.2f} | {'yes' if r['closed_loop_mse'] == best else ''} |")
            for name, b in rep["baselines"].items():
                if "closed_loop_mse" in b:
                    lines.append(f"| {key} | {name} | {b['mse']:.3e} | {b['closed_loop_mse']:.3e} | {b['psnr']:.2f} | |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
