"""The tree search's FLOP floor on diffusers transformers at their published sizes (no weights, no GPU).

For each model: built on the meta device from its published architecture (``diffusers_memory.MODELS``), cut by
the search's runner (``make_runner``), its search space built with the default ties and candidates, and

1. the bf16 FLOPs of every segment on one sample at the given resolution, counted by ``FlopCounterMode`` (matmuls
   and attention: what the tensor cores do), on meta tensors;
2. the search's work laid out without budget pruning (an upper bound; ``bench_search.planned_units``, the layout
   the DiT-XL/2 timing run uses): every unit of ``r`` stacked candidates runs its node's segments to the end on
   every calibration sample;
3. the floor: those FLOPs over the H100's dense bf16 peak (989 TFLOP/s).

A floor, not a prediction: on DiT-XL/2 the prediction from the recorded eager forward and the compiled fake-quant
is about 4× its floor (RESULTS.md, "Floors and prediction for DiT-XL/2"). The search shards its tree levels over
GPUs (``torchrun``), so the time divides by the GPU count.

    python benchmarks/search_floor.py                  # table to stdout and benchmarks/RESULTS.md
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")   # (its note on casting a meta model to bf16)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_search import BF16_PEAK, planned_units  # noqa: E402
from diffusers_memory import MODELS  # noqa: E402
from record import RESULTS, git_commit, write_section  # noqa: E402

BEGIN, END = "<!-- search-floor:begin -->", "<!-- search-floor:end -->"
# (model in diffusers_memory.MODELS, image side in pixels, or a video's (frames, height, width))
Size = int | tuple[int, int, int]
CASES: list[tuple[str, Size]] = [
    ("DiT-XL/2 256px", 256), ("PixArt-α XL-2 1024px", 1024), ("SD3-medium", 1024), ("SD3.5-large", 1024),
    ("FLUX.1-dev", 512), ("FLUX.1-dev", 1024), ("Qwen-Image", 1024), ("Sana 1600M 1024px", 1024),
    ("FLUX.2-dev", 1024), ("Chroma1-HD", 1024), ("Z-Image-Turbo", 1024),
    ("LTX-Video 2B", (121, 512, 768)), ("Wan2.1-T2V-1.3B", (17, 240, 416)), ("Wan2.1-T2V-1.3B", (81, 480, 832)),
    ("Wan2.1-T2V-14B", (17, 240, 416)), ("HunyuanVideo", (17, 240, 416)), ("CogVideoX-5B", (49, 480, 720)),
    ("LTX-2 (video and audio)", (121, 512, 768))]


def size_label(size: Size) -> str:
    return f"{size} px" if isinstance(size, int) else f"{size[2]}×{size[1]}, {size[0]} frames"


def meta_inputs(runner: Any, size: Size) -> tuple[torch.Tensor, ...]:
    """One sample's runner inputs at ``size`` (VAE factor 8, Sana's DC-AE 32; Wan's VAE also 4x in time, its first
    frame alone), on the meta device."""
    m, cfg = runner.model, runner.model.config
    if runner.arch == "generic:HunyuanVideoTransformer3DModel":   # its VAE: 8x in space, 4x in time after the first
        assert not isinstance(size, int)                         # frame; a 256-token Llama prompt, CLIP's pooled
        frames, height, width = size
        with torch.device("meta"):
            inputs = runner.inputs(hidden_states=torch.empty(1, cfg.in_channels, (frames - 1) // 4 + 1, height // 8,
                                                             width // 8),
                                   timestep=torch.zeros(1), encoder_hidden_states=torch.empty(1, 256, cfg.text_embed_dim),
                                   pooled_projections=torch.empty(1, cfg.pooled_projection_dim),
                                   encoder_attention_mask=torch.ones(1, 256), guidance=torch.zeros(1))
        return inputs
    if runner.arch == "generic:CogVideoXTransformer3DModel":   # its VAE: 8x in space, 4x in time after the first
        assert not isinstance(size, int)                        # frame; 226 T5 tokens; the rotary table of the
        frames, height, width = size                            # video's 2x2 patches
        f, h, w = (frames - 1) // 4 + 1, height // 8, width // 8
        tokens = f * (h // cfg.patch_size) * (w // cfg.patch_size)
        with torch.device("meta"):
            return runner.inputs(hidden_states=torch.empty(1, f, cfg.in_channels, h, w),
                                 encoder_hidden_states=torch.empty(1, cfg.max_text_seq_length, cfg.text_embed_dim),
                                 timestep=torch.zeros(1), image_rotary_emb=(torch.empty(tokens, cfg.attention_head_dim),
                                                                            torch.empty(tokens, cfg.attention_head_dim)))
    if runner.arch == "generic:LTX2VideoTransformer3DModel":   # its VAE: 32x in space, 8x in time after the first
        assert not isinstance(size, int)                       # frame; the audio's latents at 25 per second of
        frames, height, width = size                           # 24 fps video; 1024-token prompts (the pipeline's
        f, h, w = (frames - 1) // 8 + 1, height // 32, width // 32   # max_sequence_length) for both
        audio = round(frames / 24 * 25)
        with torch.device("meta"):
            return runner.inputs(hidden_states=torch.empty(1, f * h * w, cfg.in_channels),
                                 audio_hidden_states=torch.empty(1, audio, cfg.audio_in_channels),
                                 encoder_hidden_states=torch.empty(1, 1024, cfg.caption_channels),
                                 audio_encoder_hidden_states=torch.empty(1, 1024, cfg.caption_channels),
                                 timestep=torch.zeros(1), encoder_attention_mask=torch.ones(1, 1024),
                                 audio_encoder_attention_mask=torch.ones(1, 1024), num_frames=f, height=h, width=w,
                                 audio_num_frames=audio, fps=24.0)
    if runner.arch == "ltx":   # its VAE: 32x in space, 8x in time after the first frame; a 128-token caption
        assert not isinstance(size, int)
        frames, height, width = size
        f, h, w = (frames - 1) // 8 + 1, height // 32, width // 32
        with torch.device("meta"):
            return runner.inputs(torch.empty(1, f * h * w, cfg.in_channels), torch.empty(1, 128, cfg.caption_channels),
                                 torch.zeros(1), torch.ones(1, 128), num_frames=f, height=h, width=w,
                                 rope_interpolation_scale=(8 / 25, 32, 32))
    if runner.arch == "wan":
        assert not isinstance(size, int)
        frames, height, width = size
        with torch.device("meta"):
            return runner.inputs(torch.empty(1, cfg.in_channels, (frames - 1) // 4 + 1, height // 8, width // 8),
                                 torch.zeros(1), torch.empty(1, 512, cfg.text_dim))
    assert isinstance(size, int)
    lat = size // 8
    if runner.arch == "sana":   # a 300-token caption (the pipeline's max_sequence_length)
        with torch.device("meta"):
            return runner.inputs(torch.empty(1, cfg.in_channels, size // 32, size // 32),
                                 torch.empty(1, 300, cfg.caption_channels), torch.zeros(1),
                                 encoder_attention_mask=torch.ones(1, 300))
    if runner.arch == "flux2":   # 2x2 latent patches packed (128 channels); the pipeline's 512-token prompt
        side = lat // 2
        with torch.device("meta"):
            return runner.inputs(torch.empty(1, side * side, cfg.in_channels),
                                 torch.empty(1, 512, cfg.joint_attention_dim), torch.zeros(1),
                                 torch.zeros(side * side, 4), torch.zeros(512, 4), torch.ones(1))
    if runner.arch == "chroma":   # 2x2 latent patches packed; the pipeline's 512 T5 tokens, masked to the prompt
        side = lat // 2
        with torch.device("meta"):
            return runner.inputs(torch.empty(1, side * side, cfg.in_channels),
                                 torch.empty(1, 512, cfg.joint_attention_dim), torch.zeros(1),
                                 torch.zeros(side * side, 3), torch.zeros(512, 3), torch.ones(1, 512 + side * side))
    if runner.arch == "z-image":   # a 128-token prompt (with the chat template the pipeline wraps it in)
        with torch.device("meta"):
            return runner.inputs([torch.empty(cfg.in_channels, 1, lat, lat)], torch.zeros(1),
                                 [torch.empty(128, cfg.cap_feat_dim)])
    if runner.arch == "qwen-image":   # 2x2 latent patches packed; a 256-token prompt
        side = lat // 2
        with torch.device("meta"):
            return runner.inputs(torch.empty(1, side * side, cfg.in_channels), torch.empty(1, 256, cfg.joint_attention_dim),
                                 torch.ones(1, 256, dtype=torch.long), torch.zeros(1), [[(1, side, side)]],
                                 check_values=False)
    with torch.device("meta"):
        if runner.arch == "dit":
            return runner.inputs(torch.empty(1, cfg.in_channels, lat, lat), torch.zeros(1), torch.zeros(1,
                                 dtype=torch.long), check_values=False)
        if runner.arch == "pixart":
            cond = {"resolution": torch.empty(1, 2), "aspect_ratio": torch.empty(1, 1)}
            return runner.inputs(torch.empty(1, cfg.in_channels, lat, lat), torch.zeros(1),
                                 encoder_hidden_states=torch.empty(1, 120, cfg.caption_channels),
                                 encoder_attention_mask=torch.ones(1, 120), added_cond_kwargs=cond)
        text = torch.empty(1, 333 if runner.arch == "sd3" else 512, cfg.joint_attention_dim)   # SD3: 77 + 256
        pooled = torch.empty(1, cfg.pooled_projection_dim)
        if runner.arch == "sd3":
            return runner.inputs(torch.empty(1, cfg.in_channels, lat, lat), text, pooled, torch.zeros(1))
        tokens = (lat // 2) ** 2   # Flux packs 2x2 latent patches
        return runner.inputs(torch.empty(1, tokens, cfg.in_channels), text, pooled, torch.zeros(1),
                             torch.zeros(tokens, 3), torch.zeros(512, 3),
                             torch.zeros(1) if m.config.guidance_embeds else None)


def measure(name: str, side: Size, samples: int, keeps: tuple[int, ...], group: int) -> dict[str, Any]:
    import diffusers
    from torch.utils.flop_counter import FlopCounterMode

    from treeq_engine.search import SearchSpace, make_runner
    from treeq_engine.search.evaluator import run_segments

    cls_name, config = MODELS[name]
    with torch.device("meta"):
        model = getattr(diffusers, cls_name)(**config).to(torch.bfloat16).eval()
    runner = make_runner(model)
    raw = meta_inputs(runner, side)   # (first: the generic cut learns its input names from the call)
    exact = getattr(runner, "exact_inputs", ("timestep",))   # (as the search CLI: LTX's rope scale stays float64)
    inputs = tuple(t.to(torch.bfloat16) if t.is_floating_point() and n not in exact else t
                   for n, t in zip(runner.input_names, raw))
    if hasattr(runner, "check"):   # (the generic cut's trace: on meta tensors, without the value comparison)
        runner.check(inputs)
    flops = []
    state = inputs
    with torch.no_grad():
        for s in range(runner.num_segments):
            with FlopCounterMode(display=False) as fc:
                state = runner.run(s, state)
            flops.append(fc.get_total_flops())
        space = SearchSpace.build(model, inputs, forward=lambda *xs: run_segments(runner, xs), tie=runner.tie)
    segs = runner.num_segments
    leaf_segment = [runner.segment_of(leaf.layer_names[0]) for leaf in space.leaves]
    suffix = [sum(flops[s:]) for s in range(segs)]
    row: dict[str, Any] = {"tokens": max(leaf.tokens for leaf in space.leaves), "leaves": len(space.leaves),
                           "forward_tflop": sum(flops) / 1e12, "samples": samples}
    for keep in keeps:
        levels = planned_units(leaf_segment, segs, len(space.candidates), keep, group)
        work = sum(r * suffix[segs - ran] for lv in levels for r, ran in lv) * samples   # FLOPs of the search
        row[keep] = {"evaluations": sum(r for lv in levels for r, _ in lv), "floor_min": work / BF16_PEAK / 60}
    return row


def _time(minutes: float) -> str:
    return f"{minutes:.1f} min" if minutes < 120 else f"{minutes / 60:.1f} h"


def render(rows: list[tuple[str, Size, dict[str, Any]]], keeps: tuple[int, ...], group: int, samples: int) -> str:
    k0, k1 = keeps
    lines = [BEGIN, "## The search's FLOP floor on diffusers transformers (`benchmarks/search_floor.py`)", "",
             f"Counted on the meta device (no weights, no GPU), commit {git_commit()}. Whole search without budget "
             f"pruning (an upper bound), G = {group}, N = {samples} calibration samples, default ties and the 12 "
             "default candidates; bf16 FLOPs over the H100's dense peak (989 TFLOP/s). A floor: on DiT-XL/2 the "
             "prediction is about 4× it. Time divides by the GPUs the levels are sharded over (`torchrun`) and "
             f"scales with N; a smaller K (`--keep`) cuts the merges' K² products.", "",
             f"| model | image or video | tokens (longest leaf input) | leaves | TFLOP per forward | evaluations, K = {k0} | "
             f"FLOP floor, K = {k0}, 1 H100 | evaluations, K = {k1} | FLOP floor, K = {k1}, 1 H100 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, side, r in rows:
        lines.append(f"| {name} | {size_label(side)} | {r['tokens']} | {r['leaves']} | {r['forward_tflop']:.2f} | "
                     f"{r[k0]['evaluations']:,} | **{_time(r[k0]['floor_min'])}** | {r[k1]['evaluations']:,} | "
                     f"**{_time(r[k1]['floor_min'])}** |")
    lines.append(END)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--samples", type=int, default=32, help="calibration samples N")
    p.add_argument("--keep", type=int, nargs=2, default=[16, 8], help="two K values to compare")
    p.add_argument("--group", type=int, default=16)
    p.add_argument("--no-write", action="store_true", help="print only, leave benchmarks/RESULTS.md alone")
    args = p.parse_args(argv)
    keeps = (args.keep[0], args.keep[1])
    rows = [(name, side, measure(name, side, args.samples, keeps, args.group)) for name, side in CASES]
    block = render(rows, keeps, args.group, args.samples)
    print(block)
    if not args.no_write:
        write_section(block, BEGIN, END, RESULTS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
