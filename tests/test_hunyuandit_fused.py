"""Fused Hunyuan-DiT blocks (`runtime/hunyuandit_fused.py`): what they compute equals the unfused packed model
(float32, the reference backend: the float32 LayerNorms with their affine folded into the quantization kernel's
modulate, the skip join's LayerNorm in skip_linear's, the residuals in the epilogues, the attentions the
processor's with the rotary embedding), the fused kernels run, and what the fused path cannot reproduce runs
diffusers' own forward: hooks on the norms or the attentions, another processor, training, a chunked feed-forward,
a broadcast temb."""
import copy

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="diffusers is an optional dependency (requirements-dev.txt)")

from test_mmdit_fused import count_kernels, gpu_fused_matches, half_agrees, pair  # noqa: E402
from test_zimage_fused import another_processor_then_training, close, exact, hooks_cost  # noqa: E402
from tiny_diffusers import perturbed  # noqa: E402
from tinydit import one_thread  # noqa: E402,F401

from treeq_engine.plan import BranchConfig, LayerConfig, QuantPlan  # noqa: E402
from treeq_engine.runtime import quantize  # noqa: E402
from treeq_engine.runtime.hunyuandit_fused import FusedHunyuanDiTBlock  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def agree(got, want):
    """Fused and unfused agree to float rounding (``close``), within 5e-3 relative: the kernel adds LN_1's bias and
    the shift in another order than diffusers, so a code on a rounding tie may go the other way, and in a model of
    width 16 one such code moves the output by 1e-3 (measured: most cases 1e-7, the worst 1.2e-3); a lost affine,
    bias or rotary embedding moves it by 4e-2 or more."""
    close(got, want, bound=5e-3)
# four blocks, the last joining the long skip: per block one LayerNorm-fused quantization for q/k/v, one for the
# cross-attention's q, one for the feed-forward (and one for the skip join), GELU and fc2's codes in fc1's epilogue,
# three residuals
PER_FORWARD = {"ln": 4 * 3 + 1, "gelu": 4, "residual": 4 * 3, "codes_out": 4}


def tiny():
    """Four blocks (random weights, perturbed off diffusers' zero initialisations; the LayerNorms' affines too)."""
    torch.manual_seed(0)
    return perturbed(diffusers.HunyuanDiT2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=4, attention_head_dim=8, num_attention_heads=2,
        cross_attention_dim=16, cross_attention_dim_t5=8, pooled_projection_dim=8, hidden_size=16, text_len=6,
        text_len_t5=4).eval())


def call(n=2, hw=(8, 8), seed=0, dtype=torch.float32, rotary=True):
    """The pipeline's call: latents, the timestep, both text encoders' states and masks, the size and style
    conditions, and the 2D rotary table the pipeline computes for the latents' grid."""
    from diffusers.models.embeddings import get_2d_rotary_pos_embed

    g = torch.Generator().manual_seed(seed)
    grid = (hw[0] // 2, hw[1] // 2)
    kw = dict(hidden_states=torch.randn(n, 4, *hw, generator=g).to(dtype),
              timestep=torch.tensor([500.0, 20, 900][:n]).to(dtype),   # (the pipeline's: in the latents' dtype)
              encoder_hidden_states=torch.randn(n, 6, 16, generator=g).to(dtype), text_embedding_mask=torch.ones(n, 6),
              encoder_hidden_states_t5=torch.randn(n, 4, 8, generator=g).to(dtype),
              text_embedding_mask_t5=torch.ones(n, 4), image_meta_size=torch.tensor([[64.0, 64, 64, 64, 0, 0]] * n),
              style=torch.zeros(n, dtype=torch.long), image_rotary_emb=None)
    if rotary:
        kw["image_rotary_emb"] = get_2d_rotary_pos_embed(8, ((0, 0), grid), grid, output_type="pt")
    return kw


def mixed(model):
    """Block layers at assorted formats: W16 (the float paths), branches (their own quantization calls), to_q at
    another activation spec than to_k/to_v, the rest W4A8."""
    plan = QuantPlan.block_uniform(model, 4, 8)
    return plan.with_layer("blocks.0.attn1.to_k", LayerConfig(16, 16)) \
        .with_layer("blocks.0.ff.net.2", LayerConfig(16, 16)) \
        .with_layer("blocks.1.attn1.to_q", LayerConfig(4, 4)) \
        .with_layer("blocks.1.attn2.to_v", LayerConfig(16, 16)) \
        .with_layer("blocks.2.attn2.to_q", LayerConfig(16, 16)) \
        .with_layer("blocks.2.attn1.to_out.0", LayerConfig(8, 8, branch=BranchConfig("monarch", 2))) \
        .with_layer("blocks.3.skip_linear", LayerConfig(4, 8, branch=BranchConfig("monarch", 2))) \
        .with_layer("blocks.3.ff.net.0.proj", LayerConfig(4, 8, branch=BranchConfig("monarch", 2)))


@pytest.mark.parametrize("kind", ["W8A8", "W4A8", "mixed", "W16 skip"])
def test_fused_equals_unfused(kind):
    model = tiny()
    plan = (mixed(model) if kind == "mixed" else QuantPlan.block_uniform(model, 4, 8).with_layer(
        "blocks.3.skip_linear", LayerConfig(16, 16)) if kind == "W16 skip"
            else QuantPlan.block_uniform(model, int(kind[1]), int(kind[3])))
    unfused, fused = pair(model, plan)
    assert all(type(b) is FusedHunyuanDiTBlock for b in fused.blocks)
    assert fused.state_dict().keys() == unfused.state_dict().keys()
    for kw in (call(), call(n=3, hw=(8, 12), seed=1), call(rotary=False)):
        with torch.no_grad():
            want, got, fp = unfused(**kw).sample, fused(**kw).sample, model(**kw).sample
        agree(got, want)
        assert 0 < float((got - fp).norm() / fp.norm()) < 0.15
    if kind == "W4A8":
        assert count_kernels(fused, call())[0] == PER_FORWARD
        assert count_kernels(unfused, call())[0] == {"ln": 0, "gelu": 0, "residual": 0, "codes_out": 0}


def test_each_block_on_its_own():
    """A block's output compared directly (the skip-joining block and a plain one, with and without the rotary
    table, a text of another length): within 1e-5, no earlier block's rounding to amplify."""
    from diffusers.models.embeddings import get_2d_rotary_pos_embed

    model = tiny()
    unfused, fused = pair(model, mixed(model))
    g = torch.Generator().manual_seed(5)
    h, c = torch.randn(2, 24, 16, generator=g), torch.randn(2, 7, 16, generator=g)
    temb, skip = torch.randn(2, 16, generator=g), torch.randn(2, 24, 16, generator=g)
    rotary = get_2d_rotary_pos_embed(8, ((0, 0), (4, 6)), (4, 6), output_type="pt")
    with torch.no_grad():
        for i, kw in ((3, {"skip": skip}), (1, {})):
            for r in (rotary, None):
                exact(fused.blocks[i](h, c, temb, r, **kw), unfused.blocks[i](h, c, temb, r, **kw))


def test_what_the_fused_path_cannot_run_runs_diffusers_forward():
    model = tiny()
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    kw = call()
    with torch.no_grad():
        want = unfused(**kw).sample
    full = PER_FORWARD["ln"]
    # (a hook on a norm, an attention or a packed projection: the block runs diffusers' forward; on the feed-forward
    # or a packed part of it: the feed-forward runs as the module, one quantization less)
    hooks_cost(fused, [(f"blocks.3.{p}", 4) for p in (
        "norm1", "norm1.norm", "norm2", "norm3", "skip_norm", "skip_linear", "attn1", "attn2", "attn1.to_v",
        "attn2.to_q", "attn2.to_k", "attn2.to_out.0")]
        + [(f"blocks.1.{p}", 1) for p in ("ff", "ff.net.0", "ff.net.2")], kw, want, full, agree)
    block = fused.blocks[3]
    h, c, temb, skip = torch.randn(2, 16, 16), torch.randn(2, 10, 16), torch.randn(2, 16), torch.randn(2, 16, 16)
    calls = []
    with pytest.MonkeyPatch.context() as mp, torch.no_grad():
        mp.setattr("treeq_engine.runtime.hunyuandit_fused._sdpa", lambda *a: calls.append(1))
        assert block(h, c, temb[:1], skip=skip).shape == h.shape   # (a temb broadcast over the batch)
        block.set_chunk_feed_forward(2)
        assert block(h, c, temb, skip=skip).shape == h.shape
        block.set_chunk_feed_forward(None)
        unfused_forward = []
        mp.setattr(diffusers.models.transformers.hunyuan_transformer_2d.HunyuanDiTBlock, "forward",
                   lambda *a, **k: unfused_forward.append(1))
        block(h, c, temb)   # (no skip for a block that joins one: diffusers' forward, whose error it is)
        assert unfused_forward == [1]
    assert not calls
    another_processor_then_training(fused, fused.blocks[0].attn2, diffusers.models.attention_processor.
                                    HunyuanAttnProcessor2_0, kw, want, full, 3)

    quantized = copy.deepcopy(model)
    quantize(quantized, QuantPlan.block_uniform(model, 4, 8), dtype=torch.float32, fuse=False)
    quantized.blocks[0].norm3 = torch.nn.LayerNorm(16)   # (not the float32 LayerNorm diffusers builds)
    with pytest.raises(ValueError, match="FusedHunyuanDiTBlock handles HunyuanDiTBlock"):
        FusedHunyuanDiTBlock(quantized.blocks[0])


def test_broadcast_batches_and_promoted_dtypes_run_diffusers_forward():
    """A temb batch of 1 for latents of 2 (diffusers broadcasts it): diffusers' forward and its output, the shift's
    linear run once per call, as unfused; a text batch of 1 (the processor takes the batch from the text), a float32
    temb, text or skip for bf16 rows (diffusers promotes the block's rows): diffusers' forward and its error."""
    model = tiny()
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    g = torch.Generator().manual_seed(7)
    h, c = torch.randn(2, 24, 16, generator=g), torch.randn(2, 7, 16, generator=g)
    temb, skip = torch.randn(2, 16, generator=g), torch.randn(2, 24, 16, generator=g)
    outs = []
    for m in (fused, unfused):
        seen = []
        hook = m.blocks[3].norm1.linear.register_forward_pre_hook(lambda *a: seen.append(1))
        calls = []
        with pytest.MonkeyPatch.context() as mp, torch.no_grad():
            mp.setattr("treeq_engine.runtime.hunyuandit_fused._sdpa", lambda *a: calls.append(1))
            outs.append(m.blocks[3](h, c, temb[:1], None, skip))
            with pytest.raises(RuntimeError, match="must match the size"):
                m.blocks[3](h, c[:1], temb, None, skip)
        hook.remove()
        assert len(seen) == 2 and not calls
    exact(*outs)

    # (promoted rows meet the bf16 q/k LayerNorms, which refuse float32 rows on the CPU: diffusers' error)
    model = tiny().to(torch.bfloat16)
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 8, 8), dtype=torch.bfloat16)
    h, c, skip, temb = h.bfloat16(), c.bfloat16(), skip.bfloat16(), temb.bfloat16()
    with pytest.MonkeyPatch.context() as mp, torch.no_grad():
        mp.setattr("treeq_engine.runtime.hunyuandit_fused._sdpa", lambda *a: calls.append(1))
        for args in ((h, c.float(), temb, None, skip), (h, c, temb.float(), None, skip),
                     (h, c, temb, None, skip.float())):
            for m in (fused, unfused):
                seen = []
                hook = m.blocks[3].norm1.linear.register_forward_pre_hook(lambda *a: seen.append(1))
                with pytest.raises(RuntimeError, match="mixed dtype"):
                    m.blocks[3](*args)
                hook.remove()
                assert len(seen) == 1   # (the shift's linear once, as diffusers runs it)
    assert not calls


def test_bf16():
    half_agrees(tiny().to(torch.bfloat16), call(dtype=torch.bfloat16))


@pytest.mark.gpu
def test_fused_equals_unfused_on_gpu():
    gpu_fused_matches(tiny(), call(dtype=torch.bfloat16), PER_FORWARD)
