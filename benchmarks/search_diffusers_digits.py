"""The search through diffusers on a trained model: the digits DiT converted to diffusers' DiTTransformer2DModel
(``models.diffusers_transformers.dit_to_diffusers``) and searched with ``DiffusersRunner`` (to_q/to_k/to_v tied),
against the same search on our DiT with ``DiTRunner``: same calibration set, sampler weights, budget, K and λ.

    python benchmarks/search_diffusers_digits.py --out out/search_diffusers --threads 1     # K = 16, W4A4

The two models compute the same function (the converter is exact on the digits DiT), so the two searches should
score the same plans alike and return the same plan; the script reports both reports' MSEs, the per-leaf
configs side by side, evaluation counts and wall times, into OUT/results.json and OUT/results.md.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="out/search_diffusers")
    p.add_argument("--budget", default="W4A4")
    p.add_argument("--keep", type=int, default=16)
    p.add_argument("--lam", type=float, default=1.0)
    p.add_argument("--calib-trajectories", type=int, default=5)
    p.add_argument("--calib-timesteps", type=int, default=4)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--cfg-scale", type=float, default=1.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from treeq_engine.models.diffusers_transformers import dit_to_diffusers
    from treeq_engine.models.digits import load_digits_dit
    from treeq_engine.search import Budget, DiffusersRunner, DiTRunner
    from treeq_engine.search.calibration import CalibrationConfig, load_or_collect
    from treeq_engine.search.run import SearchConfig, search

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fp = load_digits_dit()
    calib = load_or_collect(fp, CalibrationConfig(args.calib_trajectories, args.steps, args.calib_timesteps,
                                                  args.cfg_scale, seed=args.seed), out / "cache")
    inputs, weights = calib.inputs(), calib.weights("sampler")
    converted = dit_to_diffusers(fp)
    with torch.no_grad():
        probe = tuple(t[:16] for t in inputs)
        gap = float((converted(*probe).sample - fp(*probe)).abs().max())
    cfg = SearchConfig(Budget.parse(args.budget), lam=args.lam, keep=args.keep)
    runs = {}
    for name, model, make in (("ours", copy.deepcopy(fp), lambda m: DiTRunner(m, output_fn=lambda o: o[:, :1])),
                              ("diffusers", converted, DiffusersRunner)):
        t0 = time.perf_counter()
        res = search(model, make(model), inputs, cfg, weights=weights, out_dir=out / name, resume=True,
                     progress=False, model_name=f"DiT-digits ({name})")
        runs[name] = {"mse": res.report["tss"]["search_mse"], "evaluations": res.report["tss"]["evaluations"],
                      "wall_s": round(time.perf_counter() - t0, 1), "leaves": res.report["leaves"],
                      "labels": [res.plan.layers[n].label for n in _leaf_names(res)]}
        print(f"{name}: MSE {runs[name]['mse']:.4e}, {runs[name]['evaluations']} evaluations, "
              f"{runs[name]['wall_s']} s", flush=True)
    same = runs["ours"]["labels"] == runs["diffusers"]["labels"]
    doc = {"setup": {**vars(args), "samples": len(calib), "max_abs_output_gap": gap}, "runs": runs,
           "same_plan": same}
    (out / "results.json").write_text(json.dumps(doc, indent=2) + "\n")
    rows = ["| path | leaves | search MSE | evaluations | wall s |", "|---|---|---|---|---|"]
    rows += [f"| {k} | {r['leaves']} | {r['mse']:.4e} | {r['evaluations']} | {r['wall_s']} |" for k, r in runs.items()]
    rows.append(f"\nsame plan: {same}; converted model's largest output difference on 16 inputs: {gap:.2e}")
    (out / "results.md").write_text("\n".join(rows) + "\n")
    print("\n".join(rows))
    return 0


def _leaf_names(res) -> list[str]:
    """The searched leaves' layer names in forward order (a tied leaf by its first layer): the block linears of the
    plan, without the embedders diffusers keeps in every block and the tied to_k/to_v."""
    return [n for n in res.plan.layers if n.startswith(("blocks.", "transformer_blocks."))
            and ".emb." not in n and not n.endswith(("attn1.to_k", "attn1.to_v"))]


if __name__ == "__main__":
    sys.exit(main())
