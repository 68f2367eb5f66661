"""``treeq demo``: quantize the shipped digits DiT uniformly and show what each precision loses.

For FP and each uniform precision (default W8A8, W4A8, W4A4, W3A3: every block linear at that format, the
embedders' linears and the final layer at W8A8, fake-quantized by the format oracle), it samples the same
class-conditional batch from the same seed and reports:

    eps-MSE   ε-prediction MSE against FP on a fixed probe of noised held-out digits over 10 timesteps
    PSNR/SSIM of the samples against FP's samples (same seeds)
    Frechet   distance to the held-out real digits in the shipped classifier's feature space
    acc       class accuracy of the samples by the shipped classifier

plus two reference rows: real training digits (the Fréchet noise floor at this sample count) and FP. It writes
``samples.png`` (one row per config, same seeds in every column), ``results.json`` and prints the table.
Heavy imports happen inside :func:`run`, so ``treeq --help`` stays fast.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

DEFAULT_CONFIGS = ("W8A8", "W4A8", "W4A4", "W3A3")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="out/demo", help="output directory (default: out/demo)")
    p.add_argument("--seed", type=int, default=0, help="sampling and probe seed (default: 0)")
    p.add_argument("--samples", type=int, default=50, help="samples per config, classes cycling 0..9 (default: 50)")
    p.add_argument("--steps", type=int, default=20, help="sampling steps (default: 20)")
    p.add_argument("--cfg-scale", type=float, default=1.5, help="classifier-free guidance scale (default: 1.5)")
    p.add_argument("--sampler", choices=["ddpm", "ddim"], default="ddpm", help="sampler (default: ddpm)")
    p.add_argument("--configs", default=",".join(DEFAULT_CONFIGS),
                   help=f"comma-separated uniform precisions WxAy (default: {','.join(DEFAULT_CONFIGS)})")
    p.add_argument("--model", default=None, help="digits DiT .safetensors (default: the shipped one)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default: 1; the demo's tensors are small, and on a shared machine more "
                        "threads mostly wait on each other)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def parse_config(label: str) -> tuple[int, int]:
    """``"W4A8"`` -> ``(4, 8)`` (``plan.parse_wa``; a ``ValueError`` otherwise)."""
    from .plan import parse_wa

    return parse_wa(label)


def uniform_plan(model: Any, w_bits: int, a_bits: int, edge_bits: tuple[int, int] = (8, 8)):
    """Every block linear at ``W{w_bits}A{a_bits}``, every other linear (embedders, final layer) at
    ``edge_bits``."""
    from .plan import QuantPlan

    return QuantPlan.block_uniform(model, w_bits, a_bits, edge_bits=edge_bits, model_name="DiT-digits")


def pick_real(train_y: Any, labels: Any, seed: int) -> Any:
    """Indices of training images with the given ``labels``, drawn without replacement per class (cycling when
    a class runs out)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    idx = torch.empty(labels.shape[0], dtype=torch.long)
    for c in labels.unique().tolist():
        pool = (train_y == c).nonzero().flatten()
        where = (labels == c).nonzero().flatten()
        if pool.numel() == 0:
            raise ValueError(f"no training image of class {c}")
        perm = torch.randperm(pool.numel(), generator=gen)
        idx[where] = pool[perm[torch.arange(where.numel()) % pool.numel()]]
    return idx


def save_grid(rows: dict[str, Any], path: Path, columns: int = 20, scale: int = 3) -> None:
    """A PNG with one labelled row per entry of ``rows`` (images ``(N, 1, H, W)`` in [−1, 1])."""
    from PIL import Image, ImageDraw

    first = next(iter(rows.values()))
    h, w = first.shape[-2] * scale, first.shape[-1] * scale
    cols = min(columns, first.shape[0])
    label_w, pad = 64, 2
    canvas = Image.new("L", (label_w + cols * (w + pad), len(rows) * (h + pad)), color=255)
    draw = ImageDraw.Draw(canvas)
    for r, (name, imgs) in enumerate(rows.items()):
        y0 = r * (h + pad)
        draw.text((4, y0 + h // 2 - 6), name, fill=0)
        arr = ((imgs[:cols, 0].clamp(-1, 1) + 1) * 127.5).round().byte().cpu().numpy()
        for c in range(cols):
            tile = Image.fromarray(arr[c], mode="L").resize((w, h), Image.NEAREST)
            canvas.paste(tile, (label_w + c * (w + pad), y0))
    canvas.save(path)


def format_table(results: list[dict[str, Any]]) -> str:
    head = ["config", "eps-MSE vs FP", "PSNR vs FP (dB)", "SSIM vs FP", "Frechet vs real", "class acc"]

    def cell(v: Any, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in results:
        lines.append("| " + " | ".join([r["config"], cell(r.get("eps_mse"), ".3e"), cell(r.get("psnr"), ".2f"),
                                        cell(r.get("ssim"), ".4f"), cell(r.get("frechet"), ".2f"),
                                        cell(r.get("accuracy"), ".1%")]) + " |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    import torch

    t_start = time.time()
    if args.threads < 1:
        raise SystemExit(f"treeq demo: --threads must be >= 1, got {args.threads}")
    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args, t_start)
    finally:
        torch.set_num_threads(threads_before)


def _run(args: argparse.Namespace, t_start: float) -> int:
    import copy
    import json

    import torch
    from tqdm.auto import tqdm

    from .eval.metrics import DigitsJudge, EpsProbe, compare_samples
    from .models.digits import digits_split, load_digits_dit
    from .models.sample import sample
    from .nn import apply_plan, convert

    from .plan import LayerConfig, check_runnable

    configs = [c.strip().upper() for c in args.configs.split(",") if c.strip()]
    try:
        bits = {c: parse_config(c) for c in configs}
        for name, (w, a) in bits.items():
            check_runnable(LayerConfig(w, a), name)  # the format's bit-widths, and what a packed model runs
    except ValueError as e:
        raise SystemExit(f"treeq demo: --configs: {e}") from None
    if args.steps < 1:
        raise SystemExit(f"--steps must be >= 1, got {args.steps}")
    if args.samples < 2:
        raise SystemExit("treeq demo: --samples must be at least 2 (the Fréchet distance needs a covariance)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    fp = load_digits_dit(None if args.model == "digits" else args.model)
    split = digits_split()
    judge = DigitsJudge(real=split.test_x)
    labels = torch.arange(args.samples) % fp.config.num_classes
    probe = EpsProbe.build(fp, split.test_x, timesteps=10, seed=args.seed)

    total = (1 + len(configs)) * args.steps
    bar = tqdm(total=total, desc="demo", unit="step", disable=args.no_progress, dynamic_ncols=True)

    def draw(model: Any, name: str) -> torch.Tensor:
        bar.set_postfix_str(name)
        return sample(model, labels, steps=args.steps, sampler=args.sampler, cfg_scale=args.cfg_scale,
                      seed=args.seed, callback=lambda s: bar.update(1))

    # The real-data floor: training digits with the same labels, against the held-out ones.
    real = split.train_x[pick_real(split.train_y, labels, args.seed)]
    results: list[dict[str, Any]] = [{"config": "real (train)", "frechet": judge.frechet(real),
                                      "accuracy": judge.accuracy(real, labels)}]
    timings: dict[str, float] = {}

    t0 = time.time()
    fp_samples = draw(fp, "FP")
    timings["FP"] = time.time() - t0
    results.append({"config": "FP", "eps_mse": 0.0, "frechet": judge.frechet(fp_samples),
                    "accuracy": judge.accuracy(fp_samples, labels)})
    grid = {"FP": fp_samples}

    qmodel = copy.deepcopy(fp)
    for i, name in enumerate(configs):
        plan = uniform_plan(qmodel, *bits[name])
        if i == 0:
            convert(qmodel, plan)
        else:
            apply_plan(qmodel, plan)
        t0 = time.time()
        s = draw(qmodel, name)
        timings[name] = time.time() - t0
        results.append({"config": name, "eps_mse": probe.mse(qmodel), **compare_samples(s, fp_samples),
                        "frechet": judge.frechet(s), "accuracy": judge.accuracy(s, labels)})
        grid[name] = s
    bar.close()

    save_grid(grid, out / "samples.png")
    wall = time.time() - t_start
    settings = {"samples": args.samples, "steps": args.steps, "sampler": args.sampler, "cfg_scale": args.cfg_scale,
                "seed": args.seed, "threads": torch.get_num_threads()}
    (out / "results.json").write_text(json.dumps({"settings": settings, "results": results,
                                                  "sampling_seconds": timings, "wall_seconds": wall}, indent=1) + "\n")
    print(f"digits DiT, {args.samples} samples, {args.steps} {args.sampler} steps, cfg {args.cfg_scale}, seed "
          f"{args.seed}; blocks at WxAy, embedders and final layer at W8A8")
    print(format_table(results))
    print(f"samples: {out / 'samples.png'}   results: {out / 'results.json'}   wall time {wall:.0f} s")
    return 0
