"""Any diffusers model packs: SD3, Flux and Sana transformers (tiny random configs, offline) take a uniform plan
through `treeq quantize --diffusers`, load back from the artifact, and sample in their pipeline; a model the search
cannot cut (an autoencoder) is refused by search and PTQ with a message that says what it cuts."""
import copy
import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
diffusers = pytest.importorskip("diffusers", reason="diffusers is an optional dependency (requirements-dev.txt)")

from tiny_diffusers import pack_only_models, tiny_flux_pipeline, tiny_wan_pipeline  # noqa: E402

from cli_refusal import refused  # noqa: E402
from treeq_engine.cli import main  # noqa: E402
from treeq_engine.models.diffusers_transformers import load_transformer, rebuild  # noqa: E402
from treeq_engine.plan import QuantPlan, is_block_layer  # noqa: E402
from treeq_engine.runtime import TreeQPointwiseConv, artifact, quantize, treeq_layers  # noqa: E402
from treeq_engine.runtime.cli import describe_fusion  # noqa: E402
from treeq_engine.runtime.convert import fusion_report  # noqa: E402

MODELS = pack_only_models()


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("name", sorted(MODELS))
def test_uniform_plan_packs_and_loads(name, tmp_path, capsys):
    model, kw = MODELS[name]
    d = tmp_path / name
    model.save_pretrained(d)
    with torch.no_grad():
        fp = model(**kw).sample
    plan = QuantPlan.block_uniform(model, 4, 8, pointwise_convs=True)   # what `treeq quantize --uniform` packs
    blocks = [n for n in plan.layers if is_block_layer(n)]
    assert blocks and all(plan.layers[n].label == "W4A8" for n in blocks)
    assert all(plan.layers[n].label == "W8A8" for n in plan.layers if n not in blocks)
    if name == "flux":   # the single-stream blocks are blocks too, not edges
        assert any(n.startswith("single_transformer_blocks.1.") for n in blocks)
        assert "single_transformer_blocks.0.proj_mlp" in blocks
    if name == "sana":   # the feed-forward's pointwise convolutions are block layers, the 1x1 patch embedding an edge
        assert {"transformer_blocks.1.ff.conv_inverted", "transformer_blocks.1.ff.conv_point"} <= set(blocks)
        assert plan.layers["patch_embed.proj"].label == "W8A8"

    art = tmp_path / "art"
    assert main(["quantize", "--diffusers", str(d), "--uniform", "W4A8", "--dtype", "bfloat16", "--out", str(art)]) == 0
    said = capsys.readouterr().out   # (which blocks run fused, which layers outside them)
    fused = quantize(copy.deepcopy(model), plan)
    report = fusion_report(fused)
    assert report["blocks"] and report["packed"] == len(plan.layers) and describe_fusion(report) in said
    assert all(not is_block_layer(n) for n in report["outside"])   # (the blocks' layers all run in fused blocks)
    man = artifact.read_manifest(art)
    assert man["model_config"]["class"] == type(model).__name__
    loaded = artifact.load(art, rebuild(man["model_config"]))
    assert len(treeq_layers(loaded)) == len(plan.layers)
    if hasattr(loaded, "fuse_qkv_projections"):   # a loaded artifact refuses a dense copy of its projections too
        try:
            loaded.fuse_qkv_projections()   # (Sana's attention is not one diffusers fuses: nothing happens)
        except RuntimeError as e:
            assert "leave the projections unfused" in str(e) and name != "sana"
        assert not any(getattr(m, "fused_projections", False) for m in loaded.modules())
    if name == "sana":
        assert isinstance(loaded.transformer_blocks[0].ff.conv_inverted, TreeQPointwiseConv)
    # what quantize makes of the bf16-loaded weights (the rest of the model back in float32, as rebuild has it)
    direct = load_transformer(d, torch.bfloat16)[0].float()   # (as the command: SD3 in bf16 too)
    quantize(direct, plan)
    with torch.no_grad():
        got, want = loaded(**kw).sample, direct(**kw).sample
    assert torch.equal(got, want)   # the artifact is what quantize made
    assert 0 < rel(got, fp) < 0.2   # W4A8 in bf16: close to FP, not equal (tiny random models: loose)
    with torch.no_grad():   # W8A8, float32: much closer
        m8 = type(model).from_pretrained(d).eval()
        quantize(m8, QuantPlan.block_uniform(m8, 8, 8, pointwise_convs=True), dtype=torch.float32)
        assert rel(m8(**kw).sample, fp) < 0.03


def test_what_no_cut_takes_is_refused(tmp_path):
    """A diffusers model the search cannot cut at all (no timestep argument: an autoencoder) is named by search and
    PTQ; any diffusers class is found in a pipeline directory; an unknown class is named as such."""
    from treeq_engine.models.diffusers_transformers import transformer_dir

    model = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                                    up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,),
                                    layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=8)
    d = tmp_path / "vae"
    model.save_pretrained(d)
    for cmd in ("search", "ptq"):
        refused("other diffusers transformers with block lists and a timestep argument; got AutoencoderKL",
                [cmd, "--diffusers", str(d), "--calib-inputs", str(tmp_path / "c.safetensors"),
                 *(["--budget", "W4A8"] if cmd == "search" else ["--out", str(tmp_path / "ptq")])])
    pipe = tmp_path / "pipe"
    model.save_pretrained(pipe / "transformer")
    assert transformer_dir(pipe) == pipe / "transformer"
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "_class_name": "NoSuchModel"}))
    refused("is not a diffusers model class",
            ["quantize", "--diffusers", str(d), "--uniform", "W4A8", "--out", str(tmp_path / "a")])
    refused("--dtype is for --diffusers",
            ["quantize", "--uniform", "W4A8", "--dtype", "bfloat16", "--out", str(tmp_path / "a")])
    with pytest.raises(ValueError, match="not a diffusers model description"):
        rebuild({"arch": "diffusers", "class": "os", "config": {}})


def test_flux_pipeline_samples_quantized(tmp_path):
    """`treeq sample --pipeline` runs a Flux pipeline, FP and with the packed transformer (same seed: close)."""
    import numpy as np
    from PIL import Image

    pipe_dir = tmp_path / "flux"
    tiny_flux_pipeline().save_pretrained(pipe_dir)
    art = tmp_path / "art"
    assert main(["quantize", "--diffusers", str(pipe_dir), "--uniform", "W8A8", "--out", str(art)]) == 0
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cat\na blue house on the hill\n")
    common = ["--prompts", str(prompts), "--steps", "2", "--height", "16", "--width", "16", "--device", "cpu"]
    for tag, extra in (("fp", []), ("q", ["--artifact", str(art)])):
        out = str(tmp_path / f"{tag}.png")
        assert main(["sample", "--pipeline", str(pipe_dir), *extra, *common, "--out", out]) == 0
    fp_img, q_img = (np.asarray(Image.open(tmp_path / f"{t}.png"), dtype=np.float64) for t in ("fp", "q"))
    assert fp_img.shape == q_img.shape == (16, 32, 3)
    assert 0 < np.abs(fp_img - q_img).mean() < 16   # W8A8 (bf16 packed): near FP's image, not equal
    refused("samples --prompts, not --labels",
            ["sample", "--pipeline", str(pipe_dir), "--labels", "1,2", "--device", "cpu"])
    refused("needs --device cuda",   # (graphed on CUDA: test_graphed_diffusers.py)
            ["sample", "--pipeline", str(pipe_dir), *common[:2], "--graph", "--device", "cpu"])
    refused("--height must be a positive",
            ["sample", "--pipeline", str(pipe_dir), *common[:2], "--height", "0", "--device", "cpu"])


def test_wan_video_pipeline_samples_quantized(tmp_path):
    """A text-to-video pipeline (Wan) samples FP and packed: `--frames` videos, written as one row of frames per
    video (PNG) or as an animation of the videos side by side (GIF); the packed videos are near FP's."""
    pytest.importorskip("accelerate", reason="diffusers loads Wan (float32-kept modules) only with accelerate")
    import numpy as np
    from PIL import Image, ImageSequence

    pipe_dir = tmp_path / "wan"
    tiny_wan_pipeline().save_pretrained(pipe_dir)
    art = tmp_path / "art"
    assert main(["quantize", "--diffusers", str(pipe_dir), "--uniform", "W8A8", "--out", str(art)]) == 0
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cat\na blue house on the hill\n")
    common = ["--prompts", str(prompts), "--steps", "2", "--height", "16", "--width", "16", "--frames", "5",
              "--device", "cpu"]
    for tag, extra in (("fp", []), ("q", ["--artifact", str(art)])):
        for ext in ("png", "gif"):
            assert main(["sample", "--pipeline", str(pipe_dir), *extra, *common, "--out",
                         str(tmp_path / f"{tag}.{ext}")]) == 0
    grid = {t: np.asarray(Image.open(tmp_path / f"{t}.png"), dtype=np.float64) for t in ("fp", "q")}
    assert grid["fp"].shape == grid["q"].shape == (2 * 16, 5 * 16, 3)   # a row of 5 frames per prompt
    assert 0 < np.abs(grid["fp"] - grid["q"]).mean() < 16   # W8A8 (bf16 packed): near FP's video, not equal
    anim = [np.asarray(f.convert("RGB"), dtype=np.float64) for f in ImageSequence.Iterator(Image.open(tmp_path / "fp.gif"))]
    assert len(anim) == 5 and anim[0].shape == (16, 2 * 16, 3)   # frame t of both videos side by side
    # the GIF's frame t is the grid's column t (GIF palettes quantize colours: close, not equal)
    assert np.abs(anim[3][:, :16] - grid["fp"][:16, 48:64]).mean() < 12
    refused("--frames must be a positive",
            ["sample", "--pipeline", str(pipe_dir), *common[:2], "--frames", "0", "--device", "cpu"])


def test_video_options_on_an_image_pipeline_and_loading_without_accelerate(tmp_path, monkeypatch):
    """`--frames` or an animation name for an image pipeline is a clear error; and a model that keeps modules in
    float32 says that it needs accelerate (diffusers' own message names an argument the user never passed)."""
    pipe_dir = tmp_path / "flux"
    tiny_flux_pipeline().save_pretrained(pipe_dir)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cat\n")
    base = ["sample", "--pipeline", str(pipe_dir), "--prompts", str(prompts), "--steps", "1", "--device", "cpu"]
    refused("--frames is for a text-to-video pipeline; FluxPipeline makes images", [*base, "--frames", "3"])
    refused("an animation is for a video pipeline", [*base, "--out", str(tmp_path / "x.gif")])

    import diffusers.models.modeling_utils as mu
    import diffusers.pipelines.pipeline_utils as pu

    monkeypatch.setattr(mu, "_LOW_CPU_MEM_USAGE_DEFAULT", False)   # what diffusers decides without accelerate
    monkeypatch.setattr(pu, "_LOW_CPU_MEM_USAGE_DEFAULT", False)
    wan = tmp_path / "wan"
    tiny_wan_pipeline().transformer.save_pretrained(wan)
    with pytest.raises(ValueError, match="keeps some modules in float32.*pip install accelerate"):
        load_transformer(wan)


TINY_CONFIGS = {
    "SD3Transformer2DModel": dict(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                  num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                  pooled_projection_dim=8, out_channels=4, pos_embed_max_size=16),
    "SanaTransformer2DModel": dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                   num_layers=2, num_cross_attention_heads=2, cross_attention_head_dim=8,
                                   cross_attention_dim=16, caption_channels=16, sample_size=8),
}


@pytest.mark.parametrize("cls_name", sorted(TINY_CONFIGS))
def test_memory_benchmark_counts_what_quantize_stores(cls_name):
    """benchmarks/diffusers_memory.py counts bytes on the meta device; on tiny SD3 and Sana models (Sana's
    pointwise convolutions packed) they equal the state a real quantize stores, byte for byte."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import diffusers_memory

    config, cls = TINY_CONFIGS[cls_name], getattr(diffusers, cls_name)
    row = diffusers_memory.measure(cls_name, config)
    for fmt in ("W8A8", "W4A4"):
        model = cls(**config).to(torch.bfloat16)
        plan = QuantPlan.block_uniform(model, int(fmt[1]), int(fmt[3]), pointwise_convs=True)
        quantize(model, plan, dtype=torch.bfloat16, fuse=False)
        assert row[fmt] == sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert row["params"] == sum(p.numel() for p in cls(**config).parameters())
    fp = cls(**config)
    linear_share = sum(m.weight.numel() for m in fp.modules() if isinstance(m, torch.nn.Linear)) / row["params"]
    if cls_name == "SanaTransformer2DModel":   # its pointwise convolutions count
        assert row["packable_share"] > linear_share + 0.2
    else:
        assert row["packable_share"] == linear_share
