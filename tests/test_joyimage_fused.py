"""Fused JoyImage blocks (`runtime/joyimage_fused.py`): JoyImage-Edit's and JoyImage-Edit+'s double-stream blocks.
The fused model equals the unfused packed one (float32, the reference backend: each stream's float32 LayerNorm +
modulate in its qkv projection's and feed-forward's quantization kernel, the attention the block's own processor on
the kernels' projections, its text mask included), the fused kernels run, and what the fused path cannot reproduce
runs diffusers' own forward."""
import copy

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="diffusers is an optional dependency (requirements-dev.txt)")
joy = pytest.importorskip("diffusers.models.transformers.transformer_joyimage", reason="diffusers before JoyImage")
plus = pytest.importorskip("diffusers.models.transformers.transformer_joyimage_edit_plus", reason="diffusers before "
                           "JoyImage-Edit+")

from test_mmdit_fused import count_kernels, gpu_fused_matches, half_agrees, pair  # noqa: E402
from test_zimage_fused import another_processor_then_training, exact, hooks_cost  # noqa: E402
from tiny_diffusers import perturbed  # noqa: E402
from tinydit import one_thread  # noqa: E402,F401

from treeq_engine.plan import BranchConfig, LayerConfig, QuantPlan  # noqa: E402
from treeq_engine.runtime import quantize  # noqa: E402
from treeq_engine.runtime.joyimage_fused import (FusedJoyImageEditPlusTransformerBlock,  # noqa: E402
                                                 FusedJoyImageTransformerBlock)

pytestmark = pytest.mark.usefixtures("one_thread")
# two blocks, per stream: one LayerNorm-fused quantization for the qkv projection and one for the feed-forward, GELU
# and the second linear's codes in the first's epilogue, the feed-forward's gated residual (the attention's output
# projections run in the processor)
PER_FORWARD = {"ln": 2 * 2 * 2, "gelu": 2 * 2, "residual": 2 * 2, "codes_out": 2 * 2}
KINDS = {"edit": (joy.JoyImageEditTransformer3DModel, FusedJoyImageTransformerBlock),
         "edit+": (plus.JoyImageEditPlusTransformer3DModel, FusedJoyImageEditPlusTransformerBlock)}


def tiny(kind="edit"):
    torch.manual_seed(0)
    return perturbed(KINDS[kind][0](patch_size=[1, 2, 2], in_channels=4, out_channels=4, hidden_size=16,
                                    num_attention_heads=2, text_dim=16, mlp_width_ratio=2.0, num_layers=2,
                                    rope_dim_list=[2, 2, 4]).eval())


def call(kind="edit", seed=0, dtype=torch.float32, padded=True):
    """JoyImage-Edit: one sample's target and reference image (a 2-item video); JoyImage-Edit+: two samples of
    differently sized items, the second's prompt padded (``padded``)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "edit":
        return dict(hidden_states=torch.randn(1, 2, 4, 1, 8, 8, generator=g).to(dtype), timestep=torch.tensor([500.0]),
                    encoder_hidden_states=torch.randn(1, 12, 16, generator=g).to(dtype))
    mask = torch.ones(2, 8, dtype=torch.bool)
    if padded:
        mask[1, 5:] = False
    return dict(hidden_states=torch.randn(2, 24, 4, 1, 2, 2, generator=g).to(dtype),
                timestep=torch.tensor([500.0, 20.0]), encoder_hidden_states_mask=mask,
                encoder_hidden_states=torch.randn(2, 8, 16, generator=g).to(dtype),
                shape_list=[[(1, 4, 4), (1, 2, 4)], [(1, 4, 4), (1, 2, 2)]])


def mixed(model):
    plan = QuantPlan.block_uniform(model, 4, 8)
    return plan.with_layer("double_blocks.0.attn.txt_attn_qkv", LayerConfig(16, 16)) \
        .with_layer("double_blocks.0.img_mlp.net.2", LayerConfig(16, 16)) \
        .with_layer("double_blocks.1.attn.img_attn_qkv", LayerConfig(8, 8, branch=BranchConfig("monarch", 2))) \
        .with_layer("double_blocks.1.txt_mlp.net.0.proj", LayerConfig(4, 4))


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("plan", ["W4A8", "mixed"])
def test_fused_equals_unfused(kind, plan):
    model = tiny(kind)
    unfused, fused = pair(model, mixed(model) if plan == "mixed" else QuantPlan.block_uniform(model, 4, 8))
    assert all(type(b) is KINDS[kind][1] for b in fused.double_blocks)
    assert fused.state_dict().keys() == unfused.state_dict().keys()
    for kw in (call(kind), call(kind, seed=1, padded=False)):
        with torch.no_grad():
            want, got, fp = unfused(**kw).sample, fused(**kw).sample, model(**kw).sample
        exact(got, want)
        assert 0 < float((got - fp).norm() / fp.norm()) < 0.3
    if plan == "W4A8":
        assert count_kernels(fused, call(kind))[0] == PER_FORWARD
        assert count_kernels(unfused, call(kind))[0] == {"ln": 0, "gelu": 0, "residual": 0, "codes_out": 0}


def test_the_text_mask_is_read():
    model = tiny("edit+")
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    with torch.no_grad():
        got, plain = fused(**call("edit+")).sample, fused(**call("edit+", padded=False)).sample
        exact(got, unfused(**call("edit+")).sample)
    assert float((got - plain).norm() / got.norm()) > 1e-4


def test_what_the_fused_path_cannot_run_runs_diffusers_forward():
    model = tiny()
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    kw = call()
    with torch.no_grad():
        want = unfused(**kw).sample
    full = PER_FORWARD["ln"]
    hooks_cost(fused, [(f"double_blocks.0.{p}", 4) for p in (
        "img_norm1", "txt_norm2", "img_mod", "txt_mod", "attn", "attn.img_attn_qkv")]
        + [(f"double_blocks.0.{p}", 1) for p in ("img_mlp", "txt_mlp.net.2")]
        + [(f"double_blocks.0.{p}", 0) for p in ("attn.img_attn_proj", "attn.txt_attn_q_norm")], kw, want, full,
        exact)
    another_processor_then_training(fused, fused.double_blocks[0].attn, joy.JoyImageAttnProcessor, kw, want, full, 4)

    quantized = copy.deepcopy(model)
    quantize(quantized, QuantPlan.block_uniform(model, 4, 8), dtype=torch.float32, fuse=False)
    quantized.double_blocks[0].img_norm2 = torch.nn.LayerNorm(16)   # (not the float32 LayerNorm diffusers builds)
    with pytest.raises(ValueError, match="FusedJoyImageTransformerBlock handles .*JoyImageTransformerBlock"):
        FusedJoyImageTransformerBlock(quantized.double_blocks[0])


def test_a_block_takes_the_timestep_projection_in_any_of_its_shapes():
    """JoyImage's modulation adds (B, 6, D) as it is and a (B, D) or (B, 1, D) one broadcast over the six rows of its
    table: a block's two outputs equal the unfused block's for each."""
    model = tiny()
    unfused, fused = pair(model, mixed(model))
    g = torch.Generator().manual_seed(4)
    h, c = torch.randn(2, 32, 16, generator=g), torch.randn(2, 6, 16, generator=g)
    rotary = fused.get_rotary_pos_embed(vis_rope_size=[2, 4, 4], txt_rope_size=None)
    with torch.no_grad():
        for temb in (torch.randn(2, 6, 16, generator=g), torch.randn(2, 16, generator=g),
                     torch.randn(2, 1, 16, generator=g)):
            calls = count_kernels_of(fused.double_blocks[0], h, c, temb, rotary)
            got, want = fused.double_blocks[0](h, c, temb, rotary), unfused.double_blocks[0](h, c, temb, rotary)
            assert calls > 0
            for a, b in zip(got, want, strict=True):
                exact(a, b)


def count_kernels_of(block, *args):
    """The norm-fused quantizations one call of ``block`` makes."""
    from treeq_engine.runtime.linear import TreeQLinear

    calls = []
    orig = TreeQLinear.quantize_input
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(TreeQLinear, "quantize_input", lambda self, x2, **k: calls.append(k.get("ln_eps")) or orig(
            self, x2, **k))
        block(*args)
    return sum(e is not None for e in calls)


def test_a_float_feed_forward_rounds_as_diffusers_in_bf16():
    """A feed-forward left 16-bit runs diffusers' computation: its float32 LayerNorm's output (in the rows' dtype)
    modulated in bf16, as JoyImage's block modulates it, bit for bit (``fp32_rows=False``; Wan's float32 rows
    round otherwise)."""
    from treeq_engine.runtime.diffusers_fused import _ff

    model = tiny().to(torch.bfloat16)
    plan = QuantPlan.block_uniform(model, 8, 8)
    for n in ("double_blocks.0.img_mlp.net.0.proj", "double_blocks.0.img_mlp.net.2"):
        plan = plan.with_layer(n, LayerConfig(16, 16))
    _, fused = pair(model, plan, dtype=torch.bfloat16)
    block = fused.double_blocks[0]
    g = torch.Generator().manual_seed(5)
    h, mod = torch.randn(2, 32, 16, generator=g).bfloat16(), torch.randn(2, 6, 16, generator=g).bfloat16()
    with torch.no_grad():   # (diffusers' step: hidden_states + img_mlp(img_norm2(h)·(1 + scale2) + shift2)·gate2)
        want = h + block.img_mlp(block.img_norm2(h) * (1 + mod[:, 4:5]) + mod[:, 3:4]) * mod[:, 5:6]
        got = [_ff(block.img_mlp, block.img_norm2, h.reshape(64, 16), 2, mod, mod.float().transpose(0, 1).contiguous(),
                   fp32_rows=f).view(2, 32, 16) for f in (False, True)]
    torch.testing.assert_close(got[0], want, rtol=0, atol=0)
    assert not torch.equal(got[1], want)
    seen = []   # (and the block asks _ff for that rounding, both streams)
    with pytest.MonkeyPatch.context() as mp, torch.no_grad():
        mp.setattr("treeq_engine.runtime.joyimage_fused._ff", lambda *a, **k: seen.append(k["fp32_rows"]) or _ff(
            *a, **k))
        fused(**call(dtype=torch.bfloat16))
    assert seen == [False] * 4


@pytest.mark.parametrize("kind", list(KINDS))
def test_bf16(kind):
    half_agrees(tiny(kind).to(torch.bfloat16), call(kind, dtype=torch.bfloat16))


@pytest.mark.gpu
def test_fused_equals_unfused_on_gpu():
    gpu_fused_matches(tiny("edit+"), call("edit+", dtype=torch.bfloat16), PER_FORWARD)
