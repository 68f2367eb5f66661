"""Fused EasyAnimate blocks (`runtime/easyanimate_fused.py`): what they compute equals the unfused packed model
(float32, the reference backend: each stream's float32 LayerNorm (its affine folded in) + modulate in the
quantization kernel, GELU and the gated residuals in the epilogues, the attention the processor's with the rotary
embedding), for the MMDiT blocks and the blocks whose streams share their modules; the fused kernels run, and what
the fused path cannot reproduce runs diffusers' own forward: hooks, another processor, training, a text or temb of
another batch or dtype."""
import copy

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="diffusers is an optional dependency (requirements-dev.txt)")

from test_mmdit_fused import count_kernels, gpu_fused_matches, half_agrees, pair  # noqa: E402
from test_zimage_fused import another_processor_then_training, close, hooks_cost  # noqa: E402
from tiny_diffusers import perturbed  # noqa: E402
from tinydit import one_thread  # noqa: E402,F401

from treeq_engine.plan import BranchConfig, LayerConfig, QuantPlan  # noqa: E402
from treeq_engine.runtime import quantize  # noqa: E402
from treeq_engine.runtime.easyanimate_fused import FusedEasyAnimateTransformerBlock  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
# two MMDiT blocks and one shared block, per stream: one LayerNorm-fused quantization for q/k/v and one for the
# feed-forward, GELU and the next layer's codes in the feed-forward's first epilogue; gated residuals: to_out's,
# to_add_out's (not in the shared block: its text has no output projection), and the feed-forwards'
PER_FORWARD = {"ln": 3 * 2 * 2, "gelu": 3 * 2, "residual": 2 * 4 + 3, "codes_out": 3 * 2}


def tiny():
    """Two MMDiT blocks then one with shared projections (random weights, the LayerNorms' affines perturbed too)."""
    torch.manual_seed(0)
    return perturbed(diffusers.EasyAnimateTransformer3DModel(
        attention_head_dim=16, num_attention_heads=2, in_channels=4, mmdit_layers=2, num_layers=3, out_channels=4,
        patch_size=2, sample_height=60, sample_width=90, text_embed_dim=16, time_embed_dim=8,
        time_position_encoding_type="3d_rope", timestep_activation_fn="silu").eval())


def call(n=2, frames=2, hw=(8, 12), text=6, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(n, 4, frames, *hw, generator=g).to(dtype),
                encoder_hidden_states=torch.randn(n, text, 16, generator=g).to(dtype),
                timestep=torch.tensor([500, 20, 900][:n]))


def mixed(model):
    plan = QuantPlan.block_uniform(model, 4, 8)
    return plan.with_layer("transformer_blocks.0.attn1.to_k", LayerConfig(16, 16)) \
        .with_layer("transformer_blocks.0.txt_ff.net.2", LayerConfig(16, 16)) \
        .with_layer("transformer_blocks.1.attn1.add_q_proj", LayerConfig(4, 4)) \
        .with_layer("transformer_blocks.1.attn1.to_out.0", LayerConfig(8, 8, branch=BranchConfig("monarch", 2))) \
        .with_layer("transformer_blocks.2.attn1.to_v", LayerConfig(16, 16)) \
        .with_layer("transformer_blocks.2.ff.net.0.proj", LayerConfig(4, 8, branch=BranchConfig("monarch", 2)))


@pytest.mark.parametrize("kind", ["W8A8", "W4A8", "mixed"])
def test_fused_equals_unfused(kind):
    """Float32, within ``close``'s 1e-3 (the LayerNorms' affine folded into the modulate rounds once more)."""
    model = tiny()
    plan = mixed(model) if kind == "mixed" else QuantPlan.block_uniform(model, int(kind[1]), int(kind[3]))
    unfused, fused = pair(model, plan)
    assert all(type(b) is FusedEasyAnimateTransformerBlock for b in fused.transformer_blocks)
    assert fused.state_dict().keys() == unfused.state_dict().keys()
    for kw in (call(), call(n=3, frames=1, hw=(12, 8), text=5, seed=1)):
        with torch.no_grad():
            want, got, fp = unfused(**kw).sample, fused(**kw).sample, model(**kw).sample
        close(got, want)
        assert 0 < float((got - fp).norm() / fp.norm()) < 0.15
    if kind == "W4A8":
        assert count_kernels(fused, call())[0] == PER_FORWARD
        assert count_kernels(unfused, call())[0] == {"ln": 0, "gelu": 0, "residual": 0, "codes_out": 0}


def test_both_streams_of_each_kind_of_block():
    """The model drops the last block's text output: each block's two outputs compared directly, with the rotary
    table and without."""
    model = tiny()
    unfused, fused = pair(model, mixed(model))
    g = torch.Generator().manual_seed(5)
    h, c, temb = torch.randn(2, 48, 32, generator=g), torch.randn(2, 6, 32, generator=g), torch.randn(2, 8, generator=g)
    rotary = model.rope_embedding(torch.zeros(2, 4, 2, 8, 12))
    with torch.no_grad():
        for i in (0, 2):
            for r in (rotary, None):
                got, want = fused.transformer_blocks[i](h, c, temb, r), unfused.transformer_blocks[i](h, c, temb, r)
                for a, b in zip(got, want, strict=True):
                    close(a, b)


def test_what_the_fused_path_cannot_run_runs_diffusers_forward():
    from diffusers.models.transformers.transformer_easyanimate import EasyAnimateAttnProcessor2_0

    model = tiny()
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    kw = call()
    with torch.no_grad():
        want = unfused(**kw).sample
    full = PER_FORWARD["ln"]
    # (a hook on a norm, the attention or a packed projection: the block runs diffusers' forward; a hooked
    # feed-forward runs as the module, one quantization less per stream it serves (the shared block's serves both))
    hooks_cost(fused, [(f"transformer_blocks.0.{p}", 4) for p in (
        "norm1", "norm1.norm", "norm2.norm", "attn1", "attn1.to_k", "attn1.add_v_proj", "attn1.to_out.0",
        "attn1.to_add_out")]
        + [(f"transformer_blocks.1.{p}", 1) for p in ("ff", "txt_ff.net.2")]
        + [(f"transformer_blocks.2.{p}", 4) for p in ("attn1", "attn1.to_q")]
        + [(f"transformer_blocks.2.{p}", 2) for p in ("ff", "ff.net.0")], kw, want, full, close)
    block, plain = fused.transformer_blocks[0], unfused.transformer_blocks[0]
    g = torch.Generator().manual_seed(6)
    h, c, temb = torch.randn(2, 48, 32, generator=g), torch.randn(2, 6, 32, generator=g), torch.randn(2, 8, generator=g)
    calls = []
    with pytest.MonkeyPatch.context() as mp, torch.no_grad():
        mp.setattr("treeq_engine.runtime.easyanimate_fused._attention", lambda *a: calls.append(1))
        # (diffusers broadcasts a temb or a text batch of 1 over the latents'; a float16 temb: another dtype)
        for args in ((h, c, temb[:1]), (h, c[:1], temb), (h, c, temb.half())):
            seen = []
            hooks = [m.norm1.linear.register_forward_pre_hook(lambda *a: seen.append(1)) for m in (block, plain)]
            got, want_block = block(*args), plain(*args)
            for hook in hooks:
                hook.remove()
            assert len(seen) == 2 and [t.shape for t in got] == [t.shape for t in want_block]
            for a, b in zip(got, want_block, strict=True):
                assert a.dtype == b.dtype
                close(a, b)
    assert not calls
    another_processor_then_training(fused, block.attn1, EasyAnimateAttnProcessor2_0, kw, want, full, 4)

    quantized = copy.deepcopy(model)
    quantize(quantized, QuantPlan.block_uniform(model, 4, 8), dtype=torch.float32, fuse=False)
    quantized.transformer_blocks[0].norm3 = torch.nn.LayerNorm(32)   # (after_norm: not handled)
    with pytest.raises(ValueError, match="FusedEasyAnimateTransformerBlock handles EasyAnimateTransformerBlock"):
        FusedEasyAnimateTransformerBlock(quantized.transformer_blocks[0])


def test_bf16():
    half_agrees(tiny().to(torch.bfloat16), call(dtype=torch.bfloat16))


def test_a_float_feed_forward_rounds_as_diffusers_in_bf16():
    """A feed-forward left 16-bit runs diffusers' computation: its float32 LayerNorm's output modulated in bf16, as
    EasyAnimate's block modulates it, bit for bit (``fp32_rows=False``; Wan's float32 rows round otherwise)."""
    from treeq_engine.runtime.diffusers_fused import _ff

    model = tiny().to(torch.bfloat16)
    plan = QuantPlan.block_uniform(model, 8, 8)
    for n in ("transformer_blocks.0.ff.net.0.proj", "transformer_blocks.0.ff.net.2"):
        plan = plan.with_layer(n, LayerConfig(16, 16))
    _, fused = pair(model, plan, dtype=torch.bfloat16)
    block = fused.transformer_blocks[0]
    g = torch.Generator().manual_seed(5)
    h, mod = torch.randn(2, 48, 32, generator=g).bfloat16(), torch.randn(2, 6, 32, generator=g).bfloat16()
    m32 = mod.float().transpose(0, 1).contiguous()
    with torch.no_grad():
        want = h + mod[:, 5:6] * block.ff(block.norm2.norm(h) * (1 + mod[:, 4:5]) + mod[:, 3:4])   # (diffusers')
        got = [_ff(block.ff, block.norm2.norm, h.reshape(96, 32), 2, mod, m32, fp32_rows=f).view(2, 48, 32)
               for f in (False, True)]
    torch.testing.assert_close(got[0], want, rtol=0, atol=0)
    assert not torch.equal(got[1], want)
    seen = []   # (and the blocks ask _ff for that rounding, both streams)
    with pytest.MonkeyPatch.context() as mp, torch.no_grad():
        mp.setattr("treeq_engine.runtime.easyanimate_fused._ff", lambda *a, **k: seen.append(k["fp32_rows"]) or _ff(
            *a, **k))
        fused(**call(dtype=torch.bfloat16))
    assert seen == [False] * 6


@pytest.mark.gpu
def test_fused_equals_unfused_on_gpu():
    gpu_fused_matches(tiny(), call(dtype=torch.bfloat16), PER_FORWARD)
