"""Fused Motif-Video blocks (`runtime/hunyuan_fused.py`): diffusers' copies of HunyuanVideo's double- and
single-stream blocks with an attention class of their own (the same projections and computation) and an optional
text cross-attention (run as diffusers' module inside the fused blocks). The fused model equals the unfused packed
one (float32, the reference backend: the image tokens first, the rotary embedding on them only, the prompt's padding
masked), the fused kernels run, and what the fused path cannot reproduce runs diffusers' own forward."""
import copy

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="diffusers is an optional dependency (requirements-dev.txt)")
motif = pytest.importorskip("diffusers.models.transformers.transformer_motif_video", reason="diffusers before "
                            "Motif-Video")

from test_hunyuan_fused import PER_FORWARD, blocks  # noqa: E402
from test_mmdit_fused import (another_processor_and_training, count_kernels, flux_style_parts_fall_back,  # noqa: E402
                              gpu_fused_matches, half_agrees, pair)
from tiny_diffusers import perturbed  # noqa: E402
from tinydit import one_thread  # noqa: E402,F401

from treeq_engine.plan import BranchConfig, LayerConfig, QuantPlan  # noqa: E402
from treeq_engine.runtime import hunyuan_fused, quantize  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**config):
    """One double-stream and two single-stream blocks (HunyuanVideo's test model's shape: PER_FORWARD holds)."""
    torch.manual_seed(0)
    config = dict(in_channels=9, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
                  num_single_layers=2, mlp_ratio=2.0, patch_size=2, patch_size_t=1, text_embed_dim=16,
                  rope_axes_dim=(2, 2, 4)) | config
    return perturbed(motif.MotifVideoTransformer3DModel(**config).eval())


def call(n=2, frames=2, hw=(8, 8), text=12, seed=0, dtype=torch.float32, padded=True):
    """Latents with the image-to-video condition channels (zero: text to video), the timestep, a prompt whose first
    sample's last three tokens are padding."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(n, text, dtype=torch.bool)
    if padded:
        mask[0, text - 3:] = False
    latents = torch.cat([torch.randn(n, 4, frames, *hw, generator=g), torch.zeros(n, 5, frames, *hw)], 1)
    return dict(hidden_states=latents.to(dtype), timestep=torch.tensor([500.0, 20.0, 900.0][:n]).to(dtype),
                encoder_hidden_states=torch.randn(n, text, 16, generator=g).to(dtype), encoder_attention_mask=mask)


def mixed(model):
    plan = QuantPlan.block_uniform(model, 4, 8)
    return plan.with_layer("transformer_blocks.0.attn.to_k", LayerConfig(16, 16)) \
        .with_layer("transformer_blocks.0.ff.net.2", LayerConfig(16, 16)) \
        .with_layer("single_transformer_blocks.1.attn.to_q", LayerConfig(4, 4)) \
        .with_layer("transformer_blocks.0.ff_context.net.0.proj",
                    LayerConfig(4, 8, branch=BranchConfig("monarch", 2))) \
        .with_layer("single_transformer_blocks.0.proj_mlp", LayerConfig(16, 16))


@pytest.mark.parametrize("kind", ["W4A8", "mixed"])
def test_fused_equals_unfused(kind):
    model = tiny()
    plan = mixed(model) if kind == "mixed" else QuantPlan.block_uniform(model, 4, 8)
    unfused, fused = pair(model, plan)
    assert [type(b).__name__ for b in blocks(fused)] == ["FusedMotifVideoTransformerBlock"] + \
        ["FusedMotifVideoSingleTransformerBlock"] * 2
    assert fused.state_dict().keys() == unfused.state_dict().keys()
    for kw in (call(), call(n=3, frames=1, hw=(8, 12), text=7, seed=1, padded=False)):
        with torch.no_grad():
            want, got, fp = unfused(**kw).sample, fused(**kw).sample, model(**kw).sample
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert 0 < float((got - fp).norm() / fp.norm()) < 0.15
    kw = call()
    kw["encoder_attention_mask"][0, :5] = False   # (more of the first prompt hidden: its sample moves)
    with torch.no_grad():
        masked = fused(**kw).sample
        torch.testing.assert_close(masked, unfused(**kw).sample, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(masked[0], fused(**call()).sample[0])
    if kind == "W4A8":
        assert count_kernels(fused, call())[0] == PER_FORWARD
        assert count_kernels(unfused, call())[0] == {"ln": 0, "gelu": 0, "residual": 0, "codes_out": 0}


def cross(**config):
    """Motif-Video-2B's layout in small: the text cross-attention in the double and the encoder's single blocks,
    a decoder single block without it; an image embedder for image to video."""
    return tiny(num_single_layers=3, num_decoder_layers=1, enable_text_cross_attention_dual=True,
                enable_text_cross_attention_single=True, image_embed_dim=8, **config)


@pytest.mark.parametrize("kind", ["W4A8", "mixed"])
def test_blocks_with_the_text_cross_attention(kind):
    """The text cross-attention (on the double block's projected attention output, the single blocks' raw one, and
    the normalized text) runs as diffusers' module inside the fused blocks: every block fuses, fused equals unfused
    for text and image to video (the image embedding's tokens before the text), the kernels counted, and the
    cross-attention matters (zeroing its output projection moves the output)."""
    model = cross()
    plan = QuantPlan.block_uniform(model, 4, 8)
    if kind == "mixed":
        plan = mixed(model).with_layer("transformer_blocks.0.attn.to_out.0", LayerConfig(16, 16)) \
            .with_layer("transformer_blocks.0.cross_attn.to_q", LayerConfig(16, 16))
    unfused, fused = pair(model, plan)
    assert [type(b).__name__ for b in blocks(fused)] == ["FusedMotifVideoTransformerBlock"] + \
        ["FusedMotifVideoSingleTransformerBlock"] * 3
    g = torch.Generator().manual_seed(5)
    image = dict(call(seed=2), image_embeds=torch.randn(2, 3, 8, generator=g))
    for kw in (call(), call(n=3, frames=1, hw=(8, 12), text=7, seed=1, padded=False), image):
        with torch.no_grad():
            want, got, fp = unfused(**kw).sample, fused(**kw).sample, model(**kw).sample
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert 0 < float((got - fp).norm() / fp.norm()) < 0.15
    if kind == "W4A8":
        per_forward = {"ln": 1 * 4 + 3 * 1, "gelu": 1 * 2 + 3 * 1, "residual": 1 * 3 + 3 * 1, "codes_out": 1 * 2}
        calls, got = count_kernels(fused, image)   # (the double block's to_out without its residual epilogue)
        assert calls == per_forward
        for m in (unfused, fused):
            for b in (m.transformer_blocks[0], m.single_transformer_blocks[0]):
                b.cross_attn.to_out[0] = torch.nn.Linear(16, 16)
                for t in b.cross_attn.to_out[0].parameters():
                    torch.nn.init.zeros_(t)
        with torch.no_grad():
            dropped = fused(**image).sample
            torch.testing.assert_close(dropped, unfused(**image).sample, rtol=1e-5, atol=1e-5)
        assert float((dropped - got).norm() / got.norm()) > 1e-3


def test_the_cross_attention_runs_as_the_module():
    """A hook on a cross-attention fires as often as in diffusers, on inputs of the same shapes, while its block
    stays fused; a hooked double-block norm runs that block's diffusers forward."""
    model = cross()
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    kw = call()
    seen = {"unfused": [], "fused": []}
    for name, m in (("unfused", unfused), ("fused", fused)):
        hooks = [b.cross_attn.register_forward_pre_hook(
            lambda mod, a, k, name=name: seen[name].append(tuple(k["hidden_states"].shape)), with_kwargs=True)
            for b in (m.transformer_blocks[0], *m.single_transformer_blocks[:2])]
        calls, out = count_kernels(m, kw)
        for h in hooks:
            h.remove()
    assert seen["fused"] == seen["unfused"] and len(seen["fused"]) == 3 and calls["ln"] == 7
    h = fused.transformer_blocks[0].norm2.register_forward_pre_hook(lambda *a: None)
    calls, got = count_kernels(fused, kw)
    h.remove()
    assert calls["ln"] == 7 - 4
    torch.testing.assert_close(got, out, rtol=1e-5, atol=1e-5)


def test_what_the_fused_path_cannot_run_runs_diffusers_forward():
    model = tiny()
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    kw = call()
    with torch.no_grad():
        want = unfused(**kw).sample
    flux_style_parts_fall_back(fused, kw, want, PER_FORWARD["ln"])
    other = type("OtherProcessor", (motif.MotifVideoAttnProcessor2_0,), {})
    fused.transformer_blocks[0].attn.set_processor(other())
    calls, got = count_kernels(fused, kw)
    assert calls["ln"] == PER_FORWARD["ln"] - 4
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    fused.transformer_blocks[0].attn.set_processor(motif.MotifVideoAttnProcessor2_0())
    another_processor_and_training(fused, fused.single_transformer_blocks[0].attn, motif.MotifVideoAttnProcessor2_0,
                                   kw, want, PER_FORWARD["ln"] - 1)

    quantized = copy.deepcopy(model)
    quantize(quantized, QuantPlan.block_uniform(model, 4, 8), dtype=torch.float32, fuse=False)
    for cls, block in ((hunyuan_fused.FusedHunyuanVideoTransformerBlock, quantized.transformer_blocks[0]),
                       (hunyuan_fused.FusedHunyuanVideoSingleTransformerBlock, quantized.single_transformer_blocks[0])):
        with pytest.raises(ValueError, match=f"{cls.__name__} handles .*transformer_hunyuan_video.HunyuanVideo"):
            cls(block)


def test_bf16():
    half_agrees(tiny().to(torch.bfloat16), call(dtype=torch.bfloat16))
    half_agrees(cross().to(torch.bfloat16), call(dtype=torch.bfloat16),
                per_forward={"ln": 7, "gelu": 5, "residual": 6, "codes_out": 2})


@pytest.mark.gpu
def test_fused_equals_unfused_on_gpu():
    gpu_fused_matches(tiny().to(torch.bfloat16), call(dtype=torch.bfloat16), PER_FORWARD)
