"""Fused Allegro blocks (`runtime/allegro_fused.py`): what they compute equals the unfused packed model (float32, the
reference backend: LayerNorm (its affine folded in) + modulate in the quantization kernels, GELU and the residuals in
the epilogues, the attentions the processor's with the 3D rotary embedding and the masks), the fused kernels run,
and what the fused path cannot reproduce runs diffusers' own forward: hooks on the norms or the attentions, another
processor, training, a temb or text of another batch or dtype."""
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
from treeq_engine.runtime.allegro_fused import FusedAllegroTransformerBlock  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
# per block: one LayerNorm-fused quantization for q/k/v and one for the feed-forward, GELU and fc2's codes in fc1's
# epilogue, three residuals
PER_FORWARD = {"ln": 2 * 2, "gelu": 2, "residual": 2 * 3, "codes_out": 2}


def tiny(affine=False):
    """Two blocks; ``affine``: LayerNorms with an affine (``norm_elementwise_affine``, perturbed off 1 and 0)."""
    torch.manual_seed(0)
    return perturbed(diffusers.AllegroTransformer3DModel(
        num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4, num_layers=2,
        cross_attention_dim=24, sample_width=8, sample_height=8, sample_frames=8, caption_channels=8,
        norm_elementwise_affine=affine).eval())


def rotary(frames, hw):
    """The pipeline's 3D rotary table for a latent of ``frames`` × ``hw`` (patch 2)."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed_allegro

    grid = (hw[0] // 2, hw[1] // 2)
    ft, fh, fw, gt, gh, gw = get_3d_rotary_pos_embed_allegro(12, ((0, 0), grid), grid, frames)
    pos = torch.cartesian_prod(gt.long(), gh.long(), gw.long()).reshape(-1, 3).transpose(0, 1).reshape(3, 1, -1)
    return (ft, fh, fw), tuple(pos)


def call(n=2, frames=2, hw=(8, 12), seed=0, dtype=torch.float32, masked=False):
    """The pipeline's call, with its rotary table; ``masked``: the first sample's last two caption tokens padding."""
    g = torch.Generator().manual_seed(seed)
    kw = dict(hidden_states=torch.randn(n, 4, frames, *hw, generator=g).to(dtype),
              encoder_hidden_states=torch.randn(n, 6, 8, generator=g).to(dtype),
              timestep=torch.tensor([500, 20, 900][:n]), image_rotary_emb=rotary(frames, hw))
    if masked:
        mask = torch.ones(n, 6)
        mask[0, -2:] = 0
        kw["encoder_attention_mask"] = mask
    return kw


def mixed(model):
    plan = QuantPlan.block_uniform(model, 4, 8)
    return plan.with_layer("transformer_blocks.0.attn1.to_k", LayerConfig(16, 16)) \
        .with_layer("transformer_blocks.0.ff.net.2", LayerConfig(16, 16)) \
        .with_layer("transformer_blocks.0.attn2.to_q", LayerConfig(16, 16)) \
        .with_layer("transformer_blocks.1.attn1.to_q", LayerConfig(4, 4)) \
        .with_layer("transformer_blocks.1.attn2.to_v", LayerConfig(8, 8, branch=BranchConfig("monarch", 2))) \
        .with_layer("transformer_blocks.1.attn1.to_out.0", LayerConfig(8, 8, branch=BranchConfig("monarch", 2))) \
        .with_layer("transformer_blocks.1.ff.net.0.proj", LayerConfig(4, 8, branch=BranchConfig("monarch", 2)))


@pytest.mark.parametrize("kind", ["W8A8", "W4A8", "mixed", "affine"])
def test_fused_equals_unfused(kind):
    """Float32: within 1e-5 without a LayerNorm affine; with one (folded into the modulate, rounded once more) within
    ``close``'s 1e-3."""
    model = tiny(affine=kind == "affine")
    plan = mixed(model) if kind in ("mixed", "affine") else QuantPlan.block_uniform(model, int(kind[1]), int(kind[3]))
    unfused, fused = pair(model, plan)
    assert all(type(b) is FusedAllegroTransformerBlock for b in fused.transformer_blocks)
    assert fused.state_dict().keys() == unfused.state_dict().keys()
    for kw in (call(), call(n=3, frames=3, hw=(12, 8), seed=1, masked=True)):
        with torch.no_grad():
            want, got, fp = unfused(**kw).sample, fused(**kw).sample, model(**kw).sample
        (close if kind == "affine" else exact)(got, want)
        assert 0 < float((got - fp).norm() / fp.norm()) < 0.15
    if kind == "W4A8":
        assert count_kernels(fused, call())[0] == PER_FORWARD
        assert count_kernels(unfused, call())[0] == {"ln": 0, "gelu": 0, "residual": 0, "codes_out": 0}


def test_the_masks_and_the_rotary_table_are_read():
    """A masked caption token and the rotary table each change the output, fused as unfused; a block handed a
    self-attention mask (the model's bias for padded video latents) matches diffusers'."""
    model = tiny()
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    with torch.no_grad():
        plain = fused(**call()).sample
        for kw in (call(masked=True), dict(call(), image_rotary_emb=None)):
            got = fused(**kw).sample
            exact(got, unfused(**kw).sample)
            assert float((got - plain).norm() / got.norm()) > 1e-4
        g = torch.Generator().manual_seed(3)
        h, c, temb = torch.randn(2, 48, 24, generator=g), torch.randn(2, 6, 24, generator=g), torch.randn(2, 144)
        bias = torch.zeros(2, 1, 48)
        bias[1, :, -8:] = -10000.0
        r = rotary(2, (8, 12))
        exact(fused.transformer_blocks[0](h, c, temb, bias, None, r), unfused.transformer_blocks[0](h, c, temb, bias,
                                                                                                     None, r))


def test_what_the_fused_path_cannot_run_runs_diffusers_forward():
    from diffusers.models.attention_processor import AllegroAttnProcessor2_0

    model = tiny()
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    kw = call()
    with torch.no_grad():
        want = unfused(**kw).sample
    full = PER_FORWARD["ln"]
    hooks_cost(fused, [(f"transformer_blocks.0.{p}", 2) for p in (
        "norm1", "norm2", "attn1", "attn2", "attn1.to_v", "attn2.to_q", "attn2.to_k", "attn2.to_out.0")]
        + [(f"transformer_blocks.1.{p}", 1) for p in ("ff", "ff.net.0", "ff.net.2")], kw, want, full, exact)
    block, plain = fused.transformer_blocks[0], unfused.transformer_blocks[0]
    g = torch.Generator().manual_seed(6)
    h, c, temb = torch.randn(2, 48, 24, generator=g), torch.randn(2, 6, 24, generator=g), torch.randn(2, 144)
    calls = []
    with pytest.MonkeyPatch.context() as mp, torch.no_grad():
        mp.setattr("treeq_engine.runtime.allegro_fused._self_attention", lambda *a: calls.append(1))
        # (a text batch of 1: diffusers' processor takes the batch from the text; a temb batch of 1: its reshape
        # refuses it; a float16 temb is promoted to the table's float32: the fused path runs that one)
        for args in ((h, c[:1], temb), (h, c, temb[:1])):
            for m in (block, plain):
                with pytest.raises(RuntimeError):
                    m(*args)
    assert not calls
    another_processor_then_training(fused, block.attn1, AllegroAttnProcessor2_0, kw, want, full, 2)

    quantized = copy.deepcopy(model)
    quantize(quantized, QuantPlan.block_uniform(model, 4, 8), dtype=torch.float32, fuse=False)
    quantized.transformer_blocks[0].norm2 = torch.nn.RMSNorm(24)   # (not a LayerNorm)
    with pytest.raises(ValueError, match="FusedAllegroTransformerBlock handles AllegroTransformerBlock"):
        FusedAllegroTransformerBlock(quantized.transformer_blocks[0])


def test_bf16():
    half_agrees(tiny().to(torch.bfloat16), call(dtype=torch.bfloat16, masked=True))


@pytest.mark.gpu
def test_fused_equals_unfused_on_gpu():
    gpu_fused_matches(tiny(), call(dtype=torch.bfloat16, masked=True), PER_FORWARD)
