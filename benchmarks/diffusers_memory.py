"""Weight memory of packed diffusers transformers at their published sizes, exact from shapes (no weights, no GPU).

Each model is built on the meta device from its published architecture (the hyper-parameters below, as the hub's
``config.json`` files give them; nothing is downloaded), its linears and pointwise convolutions swapped for empty
packed modules by ``runtime.skeleton`` with a uniform plan (block layers at the named format, embedders, context
and output projections at W8A8), and every byte counted: packed codes, per-channel scales, zero points, column
sums, biases and every parameter left unquantized (norms, embeddings, positional tables), in bf16. The parameter count is the
check that the architecture is the published one.

    python benchmarks/diffusers_memory.py            # table to stdout and benchmarks/RESULTS.md
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
from record import RESULTS, git_commit, write_section  # noqa: E402  (benchmarks/record.py)

BEGIN, END = "<!-- diffusers-memory:begin -->", "<!-- diffusers-memory:end -->"
FORMATS = ("W8A8", "W4A8", "W4A4", "W3A4")

# the published architectures (hub config.json values); the parameter counts printed check them
MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "DiT-XL/2 256px": ("DiTTransformer2DModel", dict(
        num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28, sample_size=32,
        patch_size=2, num_embeds_ada_norm=1000, norm_type="ada_norm_zero")),
    "PixArt-α XL-2 1024px": ("PixArtTransformer2DModel", dict(
        num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
        cross_attention_dim=1152, caption_channels=4096, sample_size=128, patch_size=2, norm_type="ada_norm_single",
        use_additional_conditions=True)),
    "Sana 1600M 1024px": ("SanaTransformer2DModel", dict(
        in_channels=32, out_channels=32, num_attention_heads=70, attention_head_dim=32, num_layers=20,
        num_cross_attention_heads=20, cross_attention_head_dim=112, cross_attention_dim=2240, caption_channels=2304,
        mlp_ratio=2.5, sample_size=32, patch_size=1)),
    "SD3-medium": ("SD3Transformer2DModel", dict(
        sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
        joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
        pos_embed_max_size=192)),
    "SD3.5-large": ("SD3Transformer2DModel", dict(
        sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64, num_attention_heads=38,
        joint_attention_dim=4096, caption_projection_dim=2432, pooled_projection_dim=2048, out_channels=16,
        pos_embed_max_size=192, qk_norm="rms_norm")),
    "FLUX.1-dev": ("FluxTransformer2DModel", dict(
        patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
        axes_dims_rope=(16, 56, 56))),
    "Qwen-Image": ("QwenImageTransformer2DModel", dict(
        patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128, num_attention_heads=24,
        joint_attention_dim=3584, axes_dims_rope=(16, 56, 56))),
    "FLUX.2-dev": ("Flux2Transformer2DModel", dict(
        patch_size=1, in_channels=128, num_layers=8, num_single_layers=48, attention_head_dim=128,
        num_attention_heads=48, joint_attention_dim=15360, timestep_guidance_channels=256, mlp_ratio=3.0,
        axes_dims_rope=(32, 32, 32, 32), rope_theta=2000, guidance_embeds=True)),
    "Chroma1-HD": ("ChromaTransformer2DModel", dict(
        patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, axes_dims_rope=(16, 56, 56), approximator_num_channels=64,
        approximator_hidden_dim=5120, approximator_layers=5)),
    "Z-Image-Turbo": ("ZImageTransformer2DModel", dict(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=3840, n_layers=30, n_refiner_layers=2,
        n_heads=30, n_kv_heads=30, norm_eps=1e-5, qk_norm=True, cap_feat_dim=2560, rope_theta=256.0, t_scale=1000.0,
        axes_dims=[32, 48, 48])),
    "LTX-Video 2B": ("LTXVideoTransformer3DModel", dict(
        in_channels=128, out_channels=128, num_attention_heads=32, attention_head_dim=64, cross_attention_dim=2048,
        num_layers=28, caption_channels=4096, qk_norm="rms_norm_across_heads")),
    "Wan2.1-T2V-1.3B": ("WanTransformer3DModel", dict(
        patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
        text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)),
    "HunyuanVideo": ("HunyuanVideoTransformer3DModel", dict(   # (searched by the generic cut)
        in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128, num_layers=20,
        num_single_layers=40, num_refiner_layers=2, mlp_ratio=4.0, patch_size=2, patch_size_t=1, qk_norm="rms_norm",
        guidance_embeds=True, text_embed_dim=4096, pooled_projection_dim=768, rope_theta=256.0,
        rope_axes_dim=(16, 56, 56))),
    "Wan2.1-T2V-14B": ("WanTransformer3DModel", dict(
        patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16,
        text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)),
    "CogVideoX-5B": ("CogVideoXTransformer3DModel", dict(   # (searched by the generic cut; these below too)
        num_attention_heads=48, attention_head_dim=64, in_channels=16, out_channels=16, time_embed_dim=512,
        text_embed_dim=4096, num_layers=42, sample_width=90, sample_height=60, sample_frames=49, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=226, use_rotary_positional_embeddings=True)),
    "HunyuanVideo-1.5 480p": ("HunyuanVideo15Transformer3DModel", dict(
        in_channels=65, out_channels=32, num_attention_heads=16, attention_head_dim=128, num_layers=54,
        num_refiner_layers=2, mlp_ratio=4.0, patch_size=1, patch_size_t=1, qk_norm="rms_norm", text_embed_dim=3584,
        text_embed_2_dim=1472, image_embed_dim=1152, rope_axes_dim=(16, 56, 56), target_size=640, task_type="t2v")),
    "LTX-2 (video and audio)": ("LTX2VideoTransformer3DModel", dict()),   # (diffusers' defaults are LTX-2's)
    "Mochi 1": ("MochiTransformer3DModel", dict()),   # (diffusers' defaults are mochi-1-preview's: 10.0 B)
    "Lumina-Image 2.0": ("Lumina2Transformer2DModel", dict()),   # (diffusers' defaults are Lumina-Image 2.0's: 2.6 B)
    "FLUX.3 (diffusers' defaults)": ("Flux3Transformer2DModel", dict()),   # (no pipeline in diffusers 0.42 to check)
}


def measure(cls_name: str, config: dict[str, Any]) -> dict[str, Any]:
    """Parameters, bf16 bytes and packed bytes per format of one architecture, on the meta device."""
    import diffusers

    from treeq_engine.nn import packable_layers
    from treeq_engine.plan import QuantPlan, parse_wa
    from treeq_engine.runtime import skeleton

    def build() -> torch.nn.Module:
        with torch.device("meta"):
            return getattr(diffusers, cls_name)(**config).to(torch.bfloat16)

    fp = build()
    params = sum(p.numel() for p in fp.parameters())
    packable = sum(fp.get_submodule(n).weight.numel() for n in packable_layers(fp))
    row: dict[str, Any] = {"params": params, "packable_share": packable / params, "bf16": 2 * params}
    for fmt in FORMATS:
        model = build()
        skeleton(model, QuantPlan.block_uniform(model, *parse_wa(fmt), pointwise_convs=True), dtype=torch.bfloat16,
                 fuse=False)
        row[fmt] = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return row


def render(rows: dict[str, dict[str, Any]]) -> str:
    gib = 2.0 ** 30
    head = "| model | params | packable | bf16 GiB | " + " | ".join(f"{f} GiB (×bf16)" for f in FORMATS) + " |"
    lines = [BEGIN, "## Packed weight memory of diffusers transformers (`benchmarks/diffusers_memory.py`)", "",
             f"Exact from shapes on the meta device (no weights, no GPU), commit {git_commit()}. Whole model: packed "
             "linears (codes, scales, zero points, column sums, biases) plus every unquantized parameter in bf16. "
             "Uniform plans: block linears and pointwise convolutions at the format, embedders, context and output "
             "projections at W8A8. "
             "*Packable*: the share of parameters in linears and pointwise convolutions (Sana's feed-forward).", "",
             head, "|" + "---|" * (4 + len(FORMATS))]
    for name, r in rows.items():
        cells = " | ".join(f"{r[f] / gib:.2f} ({r[f] / r['bf16']:.3f})" for f in FORMATS)
        lines.append(f"| {name} | {r['params'] / 1e9:.2f} B | {100 * r['packable_share']:.1f} % | "
                     f"{r['bf16'] / gib:.2f} | {cells} |")
    lines.append(END)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated names from the table")
    p.add_argument("--no-write", action="store_true", help="print only, leave benchmarks/RESULTS.md alone")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}; known: {list(MODELS)}")
    rows = {n: measure(*MODELS[n]) for n in names}
    block = render(rows)
    print(block)
    if not args.no_write:
        write_section(block, BEGIN, END, RESULTS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
