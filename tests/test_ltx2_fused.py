"""Fused LTX-2 blocks (`runtime/ltx2_fused.py`): what they compute equals the unfused packed model (float32, the
reference backend: each stream's RMSNorm + modulate in the quantization kernel, GELU and the gated residuals in the
epilogues, the cross-attentions as diffusers runs them), with the cross-attention adaLN, the split rotary embedding
and a timestep per token too; the fused kernels actually run; and everything the fused path cannot reproduce runs
diffusers' own forward: gated attention, spatio-temporal guidance, hooks, training, another processor."""
import copy

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="diffusers is an optional dependency (requirements-dev.txt)")
if not hasattr(diffusers, "LTX2VideoTransformer3DModel"):
    pytest.skip("this diffusers has no LTX-2", allow_module_level=True)

from test_mmdit_fused import count_kernels, on_gpu, pair  # noqa: E402
from tiny_diffusers import perturbed  # noqa: E402
from tinydit import one_thread  # noqa: E402,F401

from treeq_engine.plan import BranchConfig, LayerConfig, QuantPlan  # noqa: E402
from treeq_engine.runtime import quantize  # noqa: E402
from treeq_engine.runtime.ltx2_fused import FusedLTX2VideoTransformerBlock  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
# per block and stream (video, audio): q/k/v and the feed-forward quantize with the RMSNorm, GELU and codes in fc1's
# epilogue, the gated residuals in to_out's and fc2's
PER_FORWARD = {"ln": 2 * 2 * 2, "gelu": 2 * 2, "residual": 2 * 2 * 2, "codes_out": 2 * 2}


def tiny_ltx2(**config):
    """An LTX-2 transformer of two blocks (random weights, perturbed off diffusers' zero initialisations)."""
    torch.manual_seed(0)
    return perturbed(diffusers.LTX2VideoTransformer3DModel(
        in_channels=4, out_channels=4, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=8,
        cross_attention_dim=16, audio_in_channels=4, audio_out_channels=4, audio_num_attention_heads=2,
        audio_attention_head_dim=4, audio_cross_attention_dim=8, num_layers=2, caption_channels=16,
        rope_double_precision=False, **config).eval())


def call(n=2, seed=0, dtype=torch.float32, text=6):
    """The pipeline's call: video latents (2 frames of 8x8), audio latents (9 frames), the prompt's two embeddings
    (the first sample's last two tokens masked), the timestep and sigma (LTX-2.3's prompt adaLN reads it)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(n, text, dtype=torch.bool)
    mask[0, text - 2:] = False

    def r(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    timestep = torch.tensor([500.0, 20.0, 900.0][:n]).to(dtype)
    return dict(hidden_states=r(n, 128, 4), audio_hidden_states=r(n, 9, 4), encoder_hidden_states=r(n, text, 16),
                audio_encoder_hidden_states=r(n, text, 16), timestep=timestep, sigma=timestep / 1000,
                encoder_attention_mask=mask, num_frames=2, height=8, width=8, audio_num_frames=9, fps=25.0)


def output(model, kw):
    with torch.no_grad():
        video, audio = model(**kw, return_dict=False)[:2]
    return torch.cat([video.flatten(1), audio.flatten(1)], 1)


def mixed(model):
    plan = QuantPlan.block_uniform(model, 4, 8)
    return plan.with_layer("transformer_blocks.0.attn1.to_k", LayerConfig(16, 16)) \
        .with_layer("transformer_blocks.0.ff.net.2", LayerConfig(16, 16)) \
        .with_layer("transformer_blocks.1.audio_attn1.to_out.0", LayerConfig(16, 16)) \
        .with_layer("transformer_blocks.1.attn1.to_q", LayerConfig(4, 4)) \
        .with_layer("transformer_blocks.1.audio_ff.net.0.proj", LayerConfig(4, 8, branch=BranchConfig("monarch", 2)))


@pytest.mark.parametrize("kind", ["W8A8", "W4A8", "mixed"])
@pytest.mark.parametrize("config", [{}, {"cross_attn_mod": True, "audio_cross_attn_mod": True, "rope_type": "split"},
                                    {"cross_attn_mod": True, "audio_cross_attn_mod": True,
                                     "use_prompt_adaln_single": False}],
                         ids=["ltx2", "adaln-split", "adaln-table"])
def test_fused_equals_unfused(kind, config):
    model = tiny_ltx2(**config)
    plan = mixed(model) if kind == "mixed" else QuantPlan.block_uniform(model, int(kind[1]), int(kind[3]))
    unfused, fused = pair(model, plan)
    assert [type(b) for b in fused.transformer_blocks] == [FusedLTX2VideoTransformerBlock] * 2
    assert fused.state_dict().keys() == unfused.state_dict().keys()
    for kw in (call(), call(n=3, seed=1, text=4), {**call(n=1, seed=2), "isolate_modalities": True}):
        want, got, fp = output(unfused, kw), output(fused, kw), output(model, kw)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert 0 < float((got - fp).norm() / fp.norm()) < 0.1


def test_a_timestep_per_token():
    """Image to video passes a timestep per video token (the conditioning frame's at 0), and the audio may have one
    per token too: one modulation group per frame in the kernels."""
    model = tiny_ltx2()
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    kw = call()
    first = torch.zeros(2, 128)
    first[:, :64] = 1
    kw["audio_timestep"], kw["timestep"] = kw["timestep"], 500.0 * (1 - first)   # (the audio's per sample)
    want, got = output(unfused, kw), output(fused, kw)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, output(fused, call()))
    kw["audio_timestep"] = torch.linspace(0, 900, 9).expand(2, 9)   # (and the audio's per token)
    torch.testing.assert_close(output(fused, kw), output(unfused, kw), rtol=1e-5, atol=1e-5)


def test_the_fused_kernels_run_and_what_they_cannot_run_runs_diffusers_forward():
    from diffusers.models.transformers.transformer_ltx2 import LTX2AudioVideoAttnProcessor

    model = tiny_ltx2()
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    kw = call()
    calls = count_ltx2(fused, kw)
    assert calls == PER_FORWARD and count_ltx2(unfused, kw) == {"ln": 0, "gelu": 0, "residual": 0, "codes_out": 0}
    want = output(unfused, kw)
    torch.testing.assert_close(output(fused, kw), want, rtol=1e-5, atol=1e-5)
    for part in ("norm1", "audio_norm3", "attn1", "audio_attn1.to_v", "attn1.to_out.0"):
        seen = []
        h = fused.transformer_blocks[0].get_submodule(part).register_forward_pre_hook(lambda *a: seen.append(1))
        assert count_ltx2(fused, kw)["ln"] == PER_FORWARD["ln"] // 2 and seen, part
        h.remove()
        torch.testing.assert_close(output(fused, kw), want, rtol=1e-5, atol=1e-5)
    shapes = []   # (a float layer the fused path runs as a module sees (B, S, ·), as diffusers gives it)
    plan = QuantPlan.block_uniform(model, 4, 8).with_layer("transformer_blocks.0.audio_ff.net.2", LayerConfig(16, 16)) \
        .with_layer("transformer_blocks.0.attn1.to_out.0", LayerConfig(16, 16))
    _, fused16 = pair(model, plan)
    for name in ("audio_ff.net.2", "attn1.to_out.0"):
        fused16.transformer_blocks[0].get_submodule(name).register_forward_pre_hook(
            lambda mod, args: shapes.append(args[0].dim()))
    assert count_ltx2(fused16, kw)["ln"] == PER_FORWARD["ln"] and shapes == [3, 3]
    other = type("OtherProcessor", (LTX2AudioVideoAttnProcessor,), {})
    fused.transformer_blocks[1].audio_attn1.set_processor(other())
    assert count_ltx2(fused, kw)["ln"] == PER_FORWARD["ln"] // 2
    torch.testing.assert_close(output(fused, kw), want, rtol=1e-5, atol=1e-5)
    fused.train()
    assert count_ltx2(fused, kw)["ln"] == 0
    fused.eval()


def test_gated_attention_and_guidance():
    """LTX-2.3's gated attention (a gate per head from the self-attention's input: its linear shares q/k/v's
    quantization) fuses, and so do blocks with the perturbed processor that are not perturbed; a block spatio-temporal
    guidance perturbs (some samples, or all) runs diffusers' forward. Each agrees with the unfused model."""
    model = tiny_ltx2(gated_attn=True, audio_gated_attn=True, perturbed_attn=True)
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    assert fused.transformer_blocks[0].attn1.to_gate_logits is not None
    kw = call()
    assert count_ltx2(fused, kw) == PER_FORWARD
    torch.testing.assert_close(output(fused, kw), output(unfused, kw), rtol=1e-5, atol=1e-5)
    for mask in (torch.tensor([1.0, 0.0]), torch.zeros(2)):   # (the second sample perturbed; both)
        kw = {**call(), "spatio_temporal_guidance_blocks": [1], "perturbation_mask": mask}
        assert count_ltx2(fused, kw)["ln"] == PER_FORWARD["ln"] // 2
        torch.testing.assert_close(output(fused, kw), output(unfused, kw), rtol=1e-5, atol=1e-5)


def count_ltx2(model, kw):
    """``count_kernels`` of a model whose output is a tuple (video, audio)."""
    class Sampled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, **k):
            return type("Out", (), {"sample": output(self.inner, k)})()

    return count_kernels(Sampled(), kw)[0]


def test_bf16_and_only_blocks_with_something_to_fuse():
    model = tiny_ltx2().to(torch.bfloat16)
    kw = call(dtype=torch.bfloat16)
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 8, 8), dtype=torch.bfloat16)
    want, got = output(unfused, kw), output(fused, kw)
    assert got.dtype == torch.bfloat16 and count_ltx2(fused, kw) == PER_FORWARD
    assert torch.isfinite(got).all() and float((got.float() - want.float()).norm() / want.float().norm()) < 2e-2
    weight_only = quantize(copy.deepcopy(model), QuantPlan.block_uniform(model, 4, 16), dtype=torch.bfloat16)
    assert not any(isinstance(b, FusedLTX2VideoTransformerBlock) for b in weight_only.transformer_blocks)


@pytest.mark.gpu
def test_fused_equals_unfused_on_gpu():
    """The same on the GPU's kernels (CUDA or Triton, whichever the dispatcher picks), bf16."""
    model = tiny_ltx2()
    plan = QuantPlan.block_uniform(model, 4, 8)
    unfused = quantize(copy.deepcopy(model).cuda(), plan, dtype=torch.bfloat16, fuse=False).to(torch.bfloat16)
    fused = quantize(copy.deepcopy(model).cuda(), plan, dtype=torch.bfloat16).to(torch.bfloat16)
    kw = on_gpu(call(dtype=torch.bfloat16))
    assert count_ltx2(fused, kw) == PER_FORWARD
    a, b = output(unfused, kw).float(), output(fused, kw).float()
    assert torch.isfinite(b).all()
    assert (b - a).norm() <= 0.08 * a.norm(), f"relative error {float((b - a).norm() / a.norm()):.3g}"
