"""Fused LTX-Video blocks (`runtime/ltx_fused.py`): what they compute equals the unfused packed model (float32, the
reference backend: RMSNorm + modulate in the quantization kernel, GELU and the gated residuals in the epilogues),
the fused kernels actually run, and everything the fused path cannot reproduce runs diffusers' own forward (or, for
a feed-forward or output projection, diffusers' computation of that part): hooks, training, another attention
processor, a per-token timestep, layers left in 16 bits."""
import copy

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="diffusers is an optional dependency (requirements-dev.txt)")

from test_mmdit_fused import another_processor_and_training, count_kernels, half_agrees, pair  # noqa: E402
from test_search_ltx import call  # noqa: E402
from tiny_diffusers import tiny_ltx  # noqa: E402
from tinydit import one_thread  # noqa: E402,F401

from treeq_engine.plan import BranchConfig, LayerConfig, QuantPlan  # noqa: E402
from treeq_engine.runtime import quantize  # noqa: E402
from treeq_engine.runtime.linear import TreeQLinear  # noqa: E402
from treeq_engine.runtime.ltx_fused import FusedLTXVideoTransformerBlock  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def mixed(model):
    """Block layers at assorted formats: W16 (the float paths: block 0's first feed-forward linear, block 1's
    second), a branch (its own quantization call), to_q at another activation spec than to_k/to_v (no shared call),
    the rest W4A8."""
    plan = QuantPlan.block_uniform(model, 4, 8)
    return plan.with_layer("transformer_blocks.0.attn1.to_k", LayerConfig(16, 16)) \
        .with_layer("transformer_blocks.0.attn1.to_out.0", LayerConfig(16, 16)) \
        .with_layer("transformer_blocks.0.ff.net.0.proj", LayerConfig(16, 16)) \
        .with_layer("transformer_blocks.1.ff.net.2", LayerConfig(16, 16)) \
        .with_layer("transformer_blocks.1.attn1.to_q", LayerConfig(4, 4)) \
        .with_layer("transformer_blocks.1.ff.net.0.proj", LayerConfig(4, 8, branch=BranchConfig("monarch", 2))) \
        .with_layer("transformer_blocks.1.attn1.to_v", LayerConfig(8, 8, branch=BranchConfig("monarch", 2)))


@pytest.mark.parametrize("kind", ["W8A8", "W4A8", "mixed"])
def test_fused_equals_unfused(kind):
    model = tiny_ltx()
    plan = mixed(model) if kind == "mixed" else QuantPlan.block_uniform(model, int(kind[1]), int(kind[3]))
    unfused, fused = pair(model, plan)
    assert all(isinstance(b, FusedLTXVideoTransformerBlock) for b in fused.transformer_blocks)
    assert fused.state_dict().keys() == unfused.state_dict().keys()
    for kw in (call(), call(n=3, video=(3, 2, 2), seed=1)):
        with torch.no_grad():
            want, got, fp = unfused(**kw).sample, fused(**kw).sample, model(**kw).sample
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert 0 < float((got - fp).norm() / fp.norm()) < 0.15


def test_the_fused_kernels_run():
    """Per block: one RMSNorm-fused quantization for q/k/v and one for the feed-forward, GELU and the next layer's
    codes in the feed-forward's first epilogue, two gated residuals (to_out, ff.net[2])."""
    model = tiny_ltx()
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    kw = call()
    calls, _ = count_kernels(fused, kw, rms=True)
    assert calls == {"ln": 2 * 2, "gelu": 2, "residual": 2 * 2, "codes_out": 2, "rms": 2 * 2}
    calls, _ = count_kernels(unfused, kw)
    assert calls == {"ln": 0, "gelu": 0, "residual": 0, "codes_out": 0}


def test_what_the_fused_path_cannot_run_runs_diffusers_forward():
    from diffusers.models.transformers.transformer_ltx import LTXVideoAttnProcessor

    model = tiny_ltx()
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    kw = call()
    with torch.no_grad():
        want = unfused(**kw).sample
    seen = []
    block = fused.transformer_blocks[0]
    # a hook on a norm, the self-attention, its dropout or a packed projection the kernels would run: that block runs
    # diffusers' forward
    for part in ("norm1", "norm2", "attn1", "attn1.to_out.1", "attn1.to_v", "attn1.to_out.0"):
        h = block.get_submodule(part).register_forward_pre_hook(lambda *a: seen.append(1))
        calls, got = count_kernels(fused, kw)
        h.remove()
        assert seen and calls["ln"] == 2, part
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        seen.clear()
    # a hook on the feed-forward or its parts: it runs as a module, the self-attention stays fused
    for part in ("ff", "ff.net.1", "ff.net.0"):
        h = block.get_submodule(part).register_forward_hook(lambda *a: seen.append(1))
        calls, got = count_kernels(fused, kw)
        h.remove()
        assert seen and calls["ln"] == 2 + 1 and calls["residual"] == 2 + 1, part
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        seen.clear()
    # the cross-attention runs as a module, fused or not: a hook on it sees its call
    h = block.attn2.register_forward_hook(lambda *a: seen.append(1))
    calls, got = count_kernels(fused, kw)
    h.remove()
    assert seen and calls["ln"] == 4
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    another_processor_and_training(fused, block.attn1, LTXVideoAttnProcessor, kw, want, 2)


def test_per_token_timesteps_fuse():
    """Image to video takes a timestep per token (``temb`` (B, S, 6·D): LTX's image-to-video pipeline sets the
    conditioning frame's to 0): the modulation reaches the kernels one group per frame, and the fused block equals the
    unfused one, as a block and in the whole model; a ``temb`` of another shape runs diffusers' forward."""
    model = tiny_ltx()
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    g = torch.Generator().manual_seed(2)
    b, s, d = 2, 12, 16
    x, text = torch.randn(b, s, d, generator=g), torch.randn(b, 5, d, generator=g)
    temb = torch.randn(b, s, 6 * d, generator=g) * 0.2
    calls = []
    orig = TreeQLinear.quantize_input
    with pytest.MonkeyPatch.context() as mp, torch.no_grad():
        mp.setattr(TreeQLinear, "quantize_input", lambda self, x2, **k: calls.append(k) or orig(self, x2, **k))
        got = fused.transformer_blocks[0](x, text, temb)
        fused_calls = [k for k in calls if k.get("rms_norm")]
        assert len(fused_calls) == 2 and all(k["scale"].shape == (b * s, d) for k in fused_calls)
        torch.testing.assert_close(got, unfused.transformer_blocks[0](x, text, temb), rtol=1e-5, atol=1e-5)
        calls.clear()
        odd = temb[:, :3]   # (neither one row per sample nor one per token)
        with pytest.raises(RuntimeError):   # (diffusers' own forward cannot broadcast it either)
            fused.transformer_blocks[0](x, text, odd)
        assert not any(k.get("rms_norm") for k in calls)
        kw = call()
        s_all = kw["hidden_states"].shape[1]
        first = torch.zeros(2, s_all)
        first[:, :24] = 1   # (the first latent frame: the conditioning image, at timestep 0)
        kw["timestep"] = torch.full((2, 1), 500.0) * (1 - first)
        torch.testing.assert_close(fused(**kw).sample, unfused(**kw).sample, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(fused(**kw).sample, fused(**call()).sample)   # (the per-token steps are read)


def test_an_image_to_video_pipeline_samples_fused():
    """LTX's image-to-video pipeline (a timestep per token) with the fused packed transformer: its latents equal the
    unfused packed transformer's, and the RMSNorm-fused kernels ran on per-token modulations."""
    pytest.importorskip("transformers", reason="LTX-Video's pipeline needs transformers (T5)")
    import numpy as np
    from PIL import Image
    from tiny_diffusers import tiny_ltx_pipeline

    t2v = tiny_ltx_pipeline()
    pipe = diffusers.LTXImageToVideoPipeline(**t2v.components)
    model = pipe.transformer
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    out, scales = {}, []
    orig = TreeQLinear.quantize_input
    for name, transformer in (("unfused", unfused), ("fused", fused)):
        pipe.transformer = transformer
        with pytest.MonkeyPatch.context() as mp, torch.no_grad():
            mp.setattr(TreeQLinear, "quantize_input",
                       lambda self, x2, **k: scales.append((name, k.get("rms_norm"), x2.shape[0],
                                                            getattr(k.get("scale"), "shape", None)))
                       or orig(self, x2, **k))
            out[name] = pipe(image=image, prompt="a red cat", height=32, width=32, num_frames=9,
                             num_inference_steps=2, output_type="latent", generator=torch.Generator().manual_seed(0),
                             guidance_scale=1.0).frames
    torch.testing.assert_close(out["fused"], out["unfused"], rtol=1e-4, atol=1e-4)
    fused_calls = [(rows, shape) for name, rms, rows, shape in scales if rms]
    # per token, grouped by frame: 1280 rows, 5 latent frames of 256 tokens, the first (the image's) at 0
    assert len(fused_calls) == 2 * 2 * 2 and all(rows == 1280 and shape == (5, 16) for rows, shape in fused_calls)
    assert all(name == "fused" for name, rms, _, _ in scales if rms)


def test_only_ltx_blocks_with_something_to_fuse_are_swapped():
    model = tiny_ltx()
    fused = quantize(copy.deepcopy(model), QuantPlan.block_uniform(model, 4, 16), dtype=torch.float32)
    assert not any(isinstance(b, FusedLTXVideoTransformerBlock) for b in fused.transformer_blocks)
    plan = QuantPlan.block_uniform(model, 4, 8)
    for n in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ff.net.0.proj", "ff.net.2"):
        plan = plan.with_layer(f"transformer_blocks.0.{n}", LayerConfig(4, 16))
    fused = quantize(copy.deepcopy(model), plan, dtype=torch.float32)
    assert type(fused.transformer_blocks[0]).__name__ == "LTXVideoTransformerBlock"
    assert isinstance(fused.transformer_blocks[1], FusedLTXVideoTransformerBlock)
    assert "FusedLTXVideoTransformerBlock" in fused._repeated_blocks
    # what the kernels cannot compute stays diffusers' block: RMSNorms with a weight, exact GELU, eps 0
    for make in (lambda: diffusers.LTXVideoTransformer3DModel(
                     in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
                     num_layers=2, caption_channels=16, norm_elementwise_affine=True),
                 lambda: diffusers.LTXVideoTransformer3DModel(
                     in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
                     num_layers=2, caption_channels=16, activation_fn="gelu")):
        other = make().eval()
        q = quantize(copy.deepcopy(other), QuantPlan.block_uniform(other, 4, 8), dtype=torch.float32)
        assert not any(isinstance(b, FusedLTXVideoTransformerBlock) for b in q.transformer_blocks)
    model.transformer_blocks[0].norm2.eps = 0.0
    q = quantize(copy.deepcopy(model), QuantPlan.block_uniform(model, 4, 8), dtype=torch.float32)
    assert [isinstance(b, FusedLTXVideoTransformerBlock) for b in q.transformer_blocks] == [False, True]


def test_bf16_and_a_cache_hook():
    """In bf16 the fused model agrees with the unfused one to bf16's rounding; diffusers' FirstBlockCache finds the
    fused class in its block registry."""
    kw = call(dtype=torch.bfloat16)
    fused = half_agrees(tiny_ltx().to(torch.bfloat16), kw)
    fused.enable_cache(diffusers.FirstBlockCacheConfig(threshold=0.05))
    with torch.no_grad(), fused.cache_context("test"):
        first = fused(**kw).sample.float()
    assert torch.isfinite(first).all()


@pytest.mark.gpu
def test_fused_equals_unfused_on_gpu():
    """The same on the GPU's kernels (CUDA or Triton, whichever the dispatcher picks), bf16, layers in the fragment
    layout: the RMSNorm + modulate kernel, the shared q/k/v codes, GELU and fc2's codes in fc1's epilogue, the gated
    residuals in to_out's and fc2's (bound as for the Wan blocks: a dropped gate or residual moves the output by
    half its norm or more); with a timestep per sample and per token (one modulation group per frame)."""
    model = tiny_ltx()
    plan = QuantPlan.block_uniform(model, 4, 8)
    unfused = quantize(copy.deepcopy(model).cuda(), plan, dtype=torch.bfloat16, fuse=False).to(torch.bfloat16)
    fused = quantize(copy.deepcopy(model).cuda(), plan, dtype=torch.bfloat16).to(torch.bfloat16)
    assert all(isinstance(b, FusedLTXVideoTransformerBlock) for b in fused.transformer_blocks)
    kw = {k: v.cuda() if torch.is_tensor(v) else v for k, v in call(dtype=torch.bfloat16).items()}
    first = torch.zeros(2, kw["hidden_states"].shape[1], device="cuda")
    first[:, :24] = 1
    for timestep in (kw["timestep"], 500.0 * (1 - first)):
        kw["timestep"] = timestep
        with torch.no_grad():
            a, b = unfused(**kw).sample.float(), fused(**kw).sample.float()
        assert torch.isfinite(b).all()
        assert (b - a).norm() <= 0.08 * a.norm(), f"relative error {float((b - a).norm() / a.norm()):.3g}"
