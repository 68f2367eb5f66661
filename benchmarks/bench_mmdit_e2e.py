#!/usr/bin/env python3
"""End-to-end forward latency of a FLUX.1-dev-, FLUX.2-dev-, SD3.5-large-, Qwen-Image-, Sana- or Wan2.1-shaped
transformer: bf16 eager against TreeQ.

The published architecture (``diffusers_memory.MODELS``) with random weights, one image at ``--side`` pixels
(FLUX.1-dev at 1024 px: 4096 image and 512 text tokens) or one video of ``--video F,H,W`` (Wan at 81 frames of
480×832: 32 760 video and 512 text tokens), every variant a CUDA-graph replay of one whole forward
(``treeq_engine.runtime.timing``), median of ``--reps``, in the same run: bf16 eager, then TreeQ W8A8 and W4A8
(uniform plans: block linears at the format, the rest at W8A8; blocks fused by ``quantize``). Reported: ms per
forward, ratio to bf16 eager, the model's weight bytes and the peak memory of the replay.

Floors (H100, FLUX.1-dev at 1024 px, B = 1, 4608 tokens; ``search_floor.py`` counts 74.4 TFLOP per forward, of
which the attention's QKᵀ and AV are about 15 TFLOP, 4·S²·D per block): 75 ms at the dense bf16 peak (989
TFLOP/s); with the linears at the int8 peak (1979 TOPS, 30 ms) and the attention in bf16 (15 ms), 45 ms. The
weights stream once per forward: 22.2 GiB / 3.35 TB/s = 7 ms in bf16, 1.8 ms at W4: compute-bound. Prediction,
before any run: if the packed GEMMs reach the 1.24–1.40× over cuBLAS bf16 that a plain Triton W8A8 GEMM reached at
M = 2048–8192 (docs/sources.md), with 80 % of the FLOPs in the linears, the forward gains about
1.2–1.3× (Amdahl), W4A8 no more than W8A8 (Hopper has no 4-bit tensor-core MMA).

    python benchmarks/bench_mmdit_e2e.py                       # GPU: FLUX.1-dev at 1024 px into RESULTS.md
    python benchmarks/bench_mmdit_e2e.py --model SD3.5-large
    python benchmarks/bench_mmdit_e2e.py --blocks 4,8          # fewer blocks at full width (ratios per block)
    python benchmarks/bench_mmdit_e2e.py --model Qwen-Image --blocks 12        # 12 of its 60 blocks at 1024 px
    python benchmarks/bench_mmdit_e2e.py --model "Sana 1600M 1024px"                 # the whole model at 1024 px
    python benchmarks/bench_mmdit_e2e.py --model FLUX.2-dev --blocks 2,8         # 2 + 8 of its 8 + 48 blocks
    python benchmarks/bench_mmdit_e2e.py --model Wan2.1-T2V-1.3B --video 33,480,832
    python benchmarks/bench_mmdit_e2e.py --smoke               # CPU: a tiny Flux through every code path
    python benchmarks/bench_mmdit_e2e.py --smoke --model Wan2.1-T2V-1.3B   # ... a tiny Wan

Wan's floors (H100, Wan2.1-1.3B, B = 1; ``search_floor.py`` counts the FLOPs; the self-attention's QKᵀ and AV
are 4·S²·D per block, D = 1536, 30 blocks):

* 81 frames of 480×832 (S = 32 760): 283 TFLOP, of which self-attention 198, linears 82, cross-attention 3; 286 ms
  at the dense bf16 peak, 244 ms with the linears at the int8 peak (41 ms): at most 1.17×. Prediction, before any
  run: 1.06–1.09× for W8A8 (Amdahl with the linears 1.24–1.40× faster).
* 33 frames of 480×832 (S = 14 040, what the GPU session runs): 72.9 TFLOP, linears 35.3, self-attention 36.3,
  cross-attention 1.3; 74 ms at the bf16 peak, 56 ms floor: at most 1.32×. Prediction: 1.10–1.16×.
* 17 frames of 416×240 (S = 1950): 5.9 TFLOP, attention 0.7: linear-bound like Flux, about its 1.2–1.3×.

Qwen-Image at 1024 px (S = 4096 image + 256 text tokens, D = 3072, 60 blocks): 73.1 TFLOP, of which attention 14.0
and linears 59.1; 74 ms at the bf16 peak, 44 ms with the linears at the int8 peak: at most 1.68×. Prediction:
1.2–1.3× for W8A8 (the session's run: ``--blocks 12``, the per-block ratio).

Sana-1600M at 1024 px (DC-AE factor 32: S = 1024 image tokens, a 300-token caption; D = 2240, 20 blocks): 2.97
TFLOP per forward, of which the linears and 1×1 convolutions are 2.89 (per block: self-attention q/k/v/out 41 GFLOP,
cross-attention 27, the feed-forward's inverted and point convolutions 51 and 26) and the linear attention, the
cross-attention's scores and the depthwise 3×3 convolution under 0.1: 3.0 ms at the bf16 peak, 1.5 ms with the
linears at the int8 peak (at most 2×). The 3.0 GiB of bf16 weights take 0.96 ms to stream once (0.25 ms at W4), and
the unfused elementwise work between the GEMMs (SiLU, the depthwise convolution and gating on 11 200 channels, the
float32 linear attention) is memory-bound: a few hundred µs. GEMMs of M = 1024 rows sit below the sizes where the
plain Triton W8A8 GEMM was measured. Prediction, before any run: 1.1–1.2× for W8A8, W4A8 a little more (weights
streamed at a quarter).

FLUX.2-dev at 1024 px (S = 4096 image + 512 text tokens, D = 6144; 8 double and 48 single blocks, 32.2 B
parameters): 282.6 TFLOP, of which the attention's QKᵀ and AV 4·S²·D per block, 29.2, and the linears 253 (90 %);
286 ms at the bf16 peak, 157 ms with the linears at the int8 peak (128 ms) and the attention in bf16: at most 1.8×.
The 60.0 GiB of bf16 weights stream in 19 ms (4.9 ms at W4): compute-bound. Prediction, before any run: 1.2–1.35×
for W8A8 (Amdahl with the linears 1.24–1.40× faster), W4A8 no more. The session's run is ``--blocks 2,8`` (the
per-block ratio; the whole model does not fit beside its packed copy's build on one H100).

Each row also says how many blocks ran fused (0 means the packed linears ran unfused: an older diffusers, or a
structure the fused classes do not take) and how far the output lies from the bf16 model's (random weights:
a sanity bound, not a quality measure).

Packing repacks every quantized weight into the CUDA kernels' fragment layout on the CPU (0.5 s per 38 M
weights here): about 2.5 min per quantized variant of the whole 12 B-parameter model. ``--blocks`` builds fewer
blocks at full width (the GPU session uses 4 double and 8 single Flux blocks); the per-block ratios are what the
whole model sees.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from diffusers_memory import MODELS  # noqa: E402
from record import RESULTS, git_commit, save_json, write_section  # noqa: E402

BEGIN, END = "<!-- bench_mmdit_e2e:begin -->", "<!-- bench_mmdit_e2e:end -->"
# Wan's and Qwen-Image's timings keep their own RESULTS.md sections
SECTIONS = {"wan": ("<!-- bench_wan_e2e:begin -->", "<!-- bench_wan_e2e:end -->"),
            "qwen": ("<!-- bench_qwen_e2e:begin -->", "<!-- bench_qwen_e2e:end -->"),
            "sana": ("<!-- bench_sana_e2e:begin -->", "<!-- bench_sana_e2e:end -->"),
            "flux2": ("<!-- bench_flux2_e2e:begin -->", "<!-- bench_flux2_e2e:end -->")}
SANA = "Sana 1600M 1024px"


def section(model: str) -> tuple[str, str]:
    """The RESULTS.md markers of ``--model``'s table."""
    if model.startswith("Wan"):
        return SECTIONS["wan"]
    if model == "FLUX.2-dev":
        return SECTIONS["flux2"]
    return SECTIONS["qwen"] if model == "Qwen-Image" else SECTIONS["sana"] if model == SANA else (BEGIN, END)


CHOICES = ("FLUX.1-dev", "FLUX.2-dev", "SD3.5-large", "SD3-medium", "Qwen-Image", SANA, "Wan2.1-T2V-1.3B",
           "Wan2.1-T2V-14B")
TINY = ("FluxTransformer2DModel", dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2,
                                       attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                       pooled_projection_dim=8, axes_dims_rope=(2, 2, 4), guidance_embeds=True))
TINY_QWEN = ("QwenImageTransformer2DModel", dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                                                attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                                                axes_dims_rope=(8, 4, 4)))
TINY_SANA = ("SanaTransformer2DModel", dict(patch_size=1, in_channels=4, out_channels=4, num_layers=2,
                                            num_attention_heads=2, attention_head_dim=8, num_cross_attention_heads=2,
                                            cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=16,
                                            sample_size=16))
TINY_FLUX2 = ("Flux2Transformer2DModel", dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2,
                                              attention_head_dim=8, num_attention_heads=2, joint_attention_dim=24,
                                              timestep_guidance_channels=16, axes_dims_rope=(2, 2, 2, 2)))
TINY_WAN = ("WanTransformer3DModel", dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8,
                                          in_channels=4, out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32,
                                          num_layers=2, rope_max_seq_len=32))


def call_kwargs(model: Any, side: int | tuple[int, int, int], batch: int, device: torch.device,
                dtype: torch.dtype) -> dict[str, Any]:
    """One forward's arguments at ``side`` pixels (VAE factor 8, Sana's DC-AE 32; Wan's video ``(frames, height,
    width)``, its VAE also 4x in time after the first frame), as the pipelines pass them."""
    cfg = model.config
    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device, dtype)

    if type(model).__name__ == "WanTransformer3DModel":
        assert not isinstance(side, int)
        frames, height, width = side
        text = 512 if height >= 64 else 5
        return dict(hidden_states=rand(batch, cfg.in_channels, (frames - 1) // 4 + 1, height // 8, width // 8),
                    encoder_hidden_states=rand(batch, text, cfg.text_dim),
                    timestep=torch.full((batch,), 500.0, device=device))
    assert isinstance(side, int)
    if type(model).__name__ == "SanaTransformer2DModel":   # a 300-token caption (max_sequence_length)
        text = 300 if side >= 256 else 6
        return dict(hidden_states=rand(batch, cfg.in_channels, side // 32, side // 32),
                    encoder_hidden_states=rand(batch, text, cfg.caption_channels),
                    encoder_attention_mask=torch.ones(batch, text, device=device),
                    timestep=torch.full((batch,), 500.0, device=device))
    lat = side // 8
    if type(model).__name__ == "QwenImageTransformer2DModel":   # 2x2 latent patches packed; a 256-token prompt
        h = lat // 2
        text = 256 if side >= 256 else 5
        return dict(hidden_states=rand(batch, h * h, cfg.in_channels),
                    encoder_hidden_states=rand(batch, text, cfg.joint_attention_dim),
                    encoder_hidden_states_mask=torch.ones(batch, text, dtype=torch.long, device=device),
                    timestep=torch.full((batch,), 0.5, device=device, dtype=dtype), img_shapes=[[(1, h, h)]] * batch)

    if type(model).__name__ == "Flux2Transformer2DModel":   # 2x2 latent patches packed; 4-axis ids; 512 tokens
        h = lat // 2
        text = 512 if side >= 256 else 5
        ids = torch.zeros(h, h, 4)
        ids[..., 1] += torch.arange(h)[:, None]
        ids[..., 2] += torch.arange(h)[None, :]
        kw2 = dict(hidden_states=rand(batch, h * h, cfg.in_channels),
                   encoder_hidden_states=rand(batch, text, cfg.joint_attention_dim),
                   timestep=torch.full((batch,), 0.5, device=device, dtype=dtype),
                   img_ids=ids.reshape(-1, 4).to(device), txt_ids=torch.zeros(text, 4, device=device))
        if cfg.guidance_embeds:
            kw2["guidance"] = torch.full((batch,), 4.0, device=device, dtype=dtype)
        return kw2
    if type(model).__name__ == "SD3Transformer2DModel":
        return dict(hidden_states=rand(batch, cfg.in_channels, lat, lat),
                    encoder_hidden_states=rand(batch, 333, cfg.joint_attention_dim),   # 77 CLIP + 256 T5 tokens
                    pooled_projections=rand(batch, cfg.pooled_projection_dim),
                    timestep=torch.full((batch,), 500.0, device=device))
    h = w = lat // 2   # Flux packs 2x2 latent patches
    ids = torch.zeros(h, w, 3)
    ids[..., 1] += torch.arange(h)[:, None]
    ids[..., 2] += torch.arange(w)[None, :]
    text = 512 if side >= 256 else 5
    kw = dict(hidden_states=rand(batch, h * w, cfg.in_channels), encoder_hidden_states=rand(batch, text,
              cfg.joint_attention_dim), pooled_projections=rand(batch, cfg.pooled_projection_dim),
              timestep=torch.full((batch,), 0.5, device=device, dtype=dtype), img_ids=ids.reshape(-1, 3).to(device),
              txt_ids=torch.zeros(text, 3, device=device))
    if cfg.guidance_embeds:
        kw["guidance"] = torch.full((batch,), 3.5, device=device, dtype=dtype)
    return kw


def measure(spec: tuple[str, dict[str, Any]], variant: str, side: int | tuple[int, int, int], batch: int, device: torch.device,
            reps: int) -> dict[str, Any]:
    """Build the model on ``device`` (random weights), quantize it for ``variant`` (``bf16`` / ``WxAy``) and time
    one forward."""
    import diffusers

    from treeq_engine.plan import QuantPlan, parse_wa
    from treeq_engine.runtime import quantize
    from treeq_engine.runtime.timing import time_graph_ms

    cls_name, config = spec
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)   # built in bf16 on the device: no float32 copy of 12 B parameters
    try:
        with torch.device(device):
            model = getattr(diffusers, cls_name)(**config).to(torch.bfloat16).eval()
    finally:
        torch.set_default_dtype(default)
    if variant != "bf16":
        plan = QuantPlan.block_uniform(model, *parse_wa(variant), pointwise_convs=True)
        quantize(model, plan, dtype=torch.bfloat16)
    weight_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    kw = call_kwargs(model, side, batch, device, torch.bfloat16)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)

    def forward() -> torch.Tensor:
        return model(**kw, return_dict=False)[0]

    with torch.no_grad():
        ms = time_graph_ms(forward, reps=reps, device=device)
        out = forward()
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    finite = bool(torch.isfinite(out.float()).all())
    fused = sum(type(m).__name__.startswith("Fused") for m in model.modules())
    out = out.float().cpu()
    if variant == "bf16":
        _BASELINE[spec[0]] = out
    base = _BASELINE.get(spec[0])
    rel = float((out - base).norm() / base.norm()) if base is not None and base.shape == out.shape else float("nan")
    return {"variant": variant, "ms": ms, "weight_gib": weight_bytes / 2**30, "peak_gib": peak / 2**30,
            "finite": finite, "fused_blocks": fused, "rel_err_vs_bf16": rel}


_BASELINE: dict[str, torch.Tensor] = {}   # the bf16 output per model class (same seed: the same random weights)


def render(name: str, side: int | tuple[int, int, int], batch: int, rows: list[dict[str, Any]], device: str,
           markers: tuple[str, str] = (BEGIN, END)) -> str:
    base = next(r["ms"] for r in rows if r["variant"] == "bf16")
    size = f"{side} px" if isinstance(side, int) else f"{side[0]} frames of {side[2]}×{side[1]}"
    begin, end = markers
    lines = [begin, f"## End to end: {name} at {size}, batch {batch} (`benchmarks/bench_mmdit_e2e.py`)", "",
             f"Measured on {device}, commit {git_commit()}: random weights, real shapes, one whole forward "
             "replayed as a CUDA graph (median). TreeQ plans are uniform (block linears at the format, the rest at "
             "W8A8); the blocks `quantize` fused are counted.", "",
             "| variant | ms per forward | vs bf16 (diffusers, unfused) | weights GiB | peak GiB | fused blocks | "
             "output vs bf16 (rel.) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['ms']:.2f} | {base / r['ms']:.2f}× | {r['weight_gib']:.2f} | "
                     f"{r['peak_gib']:.2f} | {r['fused_blocks']} | {r['rel_err_vs_bf16']:.3g} |")
    lines.append(end)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="FLUX.1-dev", choices=CHOICES)
    p.add_argument("--side", type=int, default=1024, help="image side in pixels")
    p.add_argument("--video", default="81,480,832", metavar="F,H,W",
                   help="Wan: frames, height and width of the video (default: Wan's 81 frames at 480x832)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--blocks", default=None, metavar="D[,S]",
                   help="build D joint blocks (and, for Flux, S single-stream blocks) instead of the published depth")
    p.add_argument("--variants", default="bf16,W8A8,W4A8", help="comma-separated: bf16 and TreeQ WxAy formats")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--smoke", action="store_true",
                   help="CPU: a tiny Flux (or, with a Wan --model, a tiny Wan) through every code path (no numbers)")
    p.add_argument("--json", default=None, help="also write the rows here")
    p.add_argument("--no-write", action="store_true", help="print only, leave benchmarks/RESULTS.md alone")
    args = p.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if "bf16" not in variants:
        raise SystemExit("--variants must include bf16 (the baseline of the ratios)")
    wan = args.model.startswith("Wan")
    side: int | tuple[int, int, int] = args.side
    if wan:
        try:
            frames, height, width = (int(v) for v in args.video.split(","))
        except ValueError:
            frames = height = width = 0
        if min(frames, height, width) < 1 or height % 16 or width % 16:
            raise SystemExit(f"--video must be F,H,W: positive frames, height and width multiples of 16, got "
                             f"{args.video!r}")
        side = (frames, height, width)
    if args.smoke:
        if args.blocks:
            raise SystemExit("--blocks is for the published models; --smoke builds its own tiny model")
        device = torch.device("cpu")
        spec, side, name = ((TINY_WAN, (5, 32, 48), "tiny Wan (smoke)") if wan else
                            (TINY_QWEN, 64, "tiny Qwen-Image (smoke)") if args.model == "Qwen-Image" else
                            (TINY_SANA, 256, "tiny Sana (smoke)") if args.model == SANA else
                            (TINY_FLUX2, 64, "tiny FLUX.2 (smoke)") if args.model == "FLUX.2-dev" else
                            (TINY, 64, "tiny Flux (smoke)"))
    else:
        if not torch.cuda.is_available():
            raise SystemExit("a GPU benchmark: no CUDA device (use --smoke on the CPU)")
        device, spec, name = torch.device("cuda"), MODELS[args.model], args.model
        if args.blocks:
            cls_name, config = spec
            flux = "num_single_layers" in config
            try:
                depth = [int(v) for v in args.blocks.split(",")]
            except ValueError:
                depth = []
            if len(depth) != (2 if flux else 1) or min(depth, default=0) < 1:
                raise SystemExit(f"--blocks for {args.model}: {'D,S (joint, single-stream)' if flux else 'D'} "
                                 f"positive block counts, got {args.blocks!r}")
            config = {**config, "num_layers": depth[0]}
            if flux:
                config["num_single_layers"] = depth[1]
            spec = (cls_name, config)
            name = f"{args.model}, {depth[0]}" + (f" + {depth[1]}" if flux else "") + " blocks"
    rows = []
    for v in variants:
        rows.append(measure(spec, v, side, args.batch, device, 2 if args.smoke else args.reps))
        print(json.dumps(rows[-1]), flush=True)
        if args.json:   # as each variant is measured: a run cut off by its limit keeps what it measured
            save_json(Path(args.json), {"model": name, "side": side, "batch": args.batch, "rows": rows})
        gc.collect()   # the variant's model (12 B parameters) goes before the next is built
        if device.type == "cuda":
            torch.cuda.empty_cache()
    block = render(name, side, args.batch, rows, torch.cuda.get_device_name() if device.type == "cuda" else "CPU",
                   section(args.model))
    print(block)
    if not args.no_write and not args.smoke:
        write_section(block, *section(args.model), RESULTS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
