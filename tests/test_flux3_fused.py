"""Fused FLUX.3 blocks (`runtime/flux3_fused.py`): what they compute equals the unfused packed model (float32, the
reference backend: LayerNorm + modulate in the quantization kernel per stream, the gated sum of the attention and
the feed-forward in two epilogues), text to image and with a reference image; the per-token tables reach the
kernels as one modulation group per run of tokens; the fused kernels actually run; and everything the fused path
cannot reproduce runs diffusers' own forward: hooks, training, another attention processor."""
import copy

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="diffusers is an optional dependency (requirements-dev.txt)")

from test_mmdit_fused import count_kernels, gpu_fused_matches, half_agrees, hooked_parts_fall_back, pair  # noqa: E402
from test_zimage_fused import close  # noqa: E402
from tiny_diffusers import perturbed  # noqa: E402
from tinydit import one_thread  # noqa: E402,F401

from treeq_engine.plan import BranchConfig, LayerConfig, QuantPlan  # noqa: E402
from treeq_engine.runtime import quantize  # noqa: E402
from treeq_engine.runtime.flux3_fused import FusedFlux3ModeTransformerBlock, FusedFlux3SingleTransformerBlock  # noqa

pytestmark = pytest.mark.usefixtures("one_thread")


def per_forward(cond=True):
    """A mode block: one LayerNorm-fused quantization (q/k/v and linear_in), the gated sum in to_out's and
    linear_out's epilogues; a joint block: the same per stream. Two blocks per mode (the reference image's run only
    with one), two joint blocks."""
    mode = 2 * (3 if cond else 2)
    return {"ln": mode + 2 * 2, "gelu": 0, "residual": 2 * mode + 2 * 4, "codes_out": 0}


def tiny_flux3():
    torch.manual_seed(0)
    return perturbed(diffusers.Flux3Transformer2DModel(
        in_channels=4, cond_in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, timestep_channels=256, axes_dims_rope=(4, 4, 4, 4)).eval())


def _ids(*sizes, last=None):
    ids = torch.cartesian_prod(*map(torch.arange, sizes)).float()
    if last is not None:
        ids[:, -1] = last
    return ids


def call(n=2, seed=0, cond=True, dtype=torch.float32):
    """The pipeline's call: 4x4 image tokens, 8 text tokens, with ``cond`` a 2x4 reference image (its ids at l = -1),
    a timestep per sample."""
    g = torch.Generator().manual_seed(seed)
    kw = dict(hidden_states=torch.randn(n, 16, 4, generator=g).to(dtype),
              encoder_hidden_states=torch.randn(n, 8, 32, generator=g).to(dtype),
              timestep=torch.tensor([0.5, 0.2, 0.9][:n]).to(dtype), img_ids=_ids(1, 4, 4, 1), txt_ids=_ids(1, 1, 1, 8))
    if cond:
        kw.update(image_cond_hidden_states=torch.randn(n, 8, 4, generator=g).to(dtype),
                  image_cond_ids=_ids(1, 2, 4, 1, last=-1))
    return kw


def mixed(model):
    """Block layers at assorted formats: W16 (the float paths: a float to_k, and a float linear_out leaves the gated
    sum to torch), a branch (its own quantization call), to_q at another activation spec than to_k/to_v (no shared
    call), the rest W4A8."""
    plan = QuantPlan.block_uniform(model, 4, 8)
    return plan.with_layer("mode_blocks.image.0.attn.to_k", LayerConfig(16, 16)) \
        .with_layer("txt_mode_blocks.1.ff.linear_out", LayerConfig(16, 16)) \
        .with_layer("single_transformer_blocks.0.attn.to_q", LayerConfig(4, 4)) \
        .with_layer("single_transformer_blocks.1.ff.linear_in", LayerConfig(4, 8, branch=BranchConfig("monarch", 2))) \
        .with_layer("mode_blocks.image_cond.0.attn.to_out.0", LayerConfig(16, 16)) \
        .with_layer("single_transformer_blocks.1.attn.to_k", LayerConfig(16, 16))


def blocks(model):
    return [m for m in model.modules() if isinstance(m, (FusedFlux3ModeTransformerBlock,
                                                         FusedFlux3SingleTransformerBlock))]


@pytest.mark.parametrize("kind", ["W8A8", "W4A8", "mixed"])
def test_fused_equals_unfused(kind):
    model = tiny_flux3()
    plan = mixed(model) if kind == "mixed" else QuantPlan.block_uniform(model, int(kind[1]), int(kind[3]))
    unfused, fused = pair(model, plan)
    assert len(blocks(fused)) == 3 * 2 + 2
    assert fused.state_dict().keys() == unfused.state_dict().keys()
    for kw in (call(), call(n=3, seed=1, cond=False), call(n=1, seed=2)):
        with torch.no_grad():
            want, got, fp = unfused(**kw).sample, fused(**kw).sample, model(**kw).sample
        # (measured: 1e-7 relative but in one case of nine, 3.7e-6: an activation code within an ulp of a rounding
        # boundary takes the next code; a dropped gate, norm or modulation moves the output by far more)
        close(got, want, bound=1e-4)
        assert 0 < float((got - fp).norm() / fp.norm()) < 0.1


def test_the_kernels_take_a_group_per_run_of_tokens(monkeypatch):
    """The joint blocks' content table repeats the image tokens' row and the reference tokens' row: 16 + 8 rows
    per sample run in groups of 8 (3 per sample); the text's and each mode's table one group per sample."""
    from treeq_engine.runtime import flux3_fused

    model = tiny_flux3()
    _, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    groups, original = [], flux3_fused.per_token_modulation
    monkeypatch.setattr(flux3_fused, "per_token_modulation",
                        lambda chunk, rows, chunks: groups.append(original(chunk, rows, chunks).shape[1]) or
                        original(chunk, rows, chunks))
    with torch.no_grad():
        fused(**call(n=2))
    assert groups == [2] * 6 + [2 * 3, 2] * 2   # (the mode blocks, then per joint block the content's and the text's)


def test_the_fused_kernels_run_and_what_they_cannot_run_runs_diffusers_forward():
    from diffusers.models.transformers.transformer_flux3 import Flux3AttnProcessor

    model = tiny_flux3()
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    for cond in (True, False):
        assert count_kernels(fused, call(cond=cond))[0] == per_forward(cond)
        assert count_kernels(unfused, call(cond=cond))[0] == {k: 0 for k in per_forward()}
    kw = call()
    with torch.no_grad():
        want = unfused(**kw).sample
    full = per_forward()["ln"]
    # a hook on the norm, the attention, the feed-forward or its SwiGLU, or a linear the kernels run: diffusers'
    # forward for that block
    hooked_parts_fall_back(fused, fused.mode_blocks["image"][0], ("norm", "attn", "attn.to_k", "attn.to_out.1", "ff",
                                                                  "ff.act_fn", "ff.linear_in", "ff.linear_out"),
                           kw, want, full - 1)
    hooked_parts_fall_back(fused, fused.single_transformer_blocks[1], ("norm", "attn.to_v", "attn.to_out.0"), kw,
                           want, full - 2)
    block = fused.txt_mode_blocks[0]
    block.attn.set_processor(type("OtherProcessor", (Flux3AttnProcessor,), {})())   # (computes what it likes)
    calls, got = count_kernels(fused, kw)
    assert calls["ln"] == full - 1
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    fused.train()
    calls, got = count_kernels(fused, kw)
    assert calls["ln"] == 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_float_linears_run_as_modules():
    """A float to_out and linear_out (W16) run as modules, hooks and all (the joint block's once per stream), and
    the gated sum as diffusers computes it; the block's other linears stay fused."""
    model = tiny_flux3()
    plan = QuantPlan.block_uniform(model, 4, 8)
    for n in ("to_out.0", "linear_out"):
        plan = plan.with_layer(f"single_transformer_blocks.0.{'attn.' if n == 'to_out.0' else 'ff.'}{n}",
                               LayerConfig(16, 16))
    unfused, fused = pair(model, plan)
    kw = call()
    seen = []
    block = fused.single_transformer_blocks[0]
    hooks = [block.get_submodule(n).register_forward_hook(lambda *a: seen.append(1))
             for n in ("attn.to_out.0", "ff.linear_out")]
    calls, got = count_kernels(fused, kw)
    for h in hooks:
        h.remove()
    assert len(seen) == 4 and calls["ln"] == per_forward()["ln"]
    assert calls["residual"] == per_forward()["residual"] - 4
    with torch.no_grad():
        torch.testing.assert_close(got, unfused(**kw).sample, rtol=1e-5, atol=1e-5)


def test_only_blocks_with_something_to_fuse_are_swapped_and_bf16():
    model = tiny_flux3()
    weight_only = quantize(copy.deepcopy(model), QuantPlan.block_uniform(model, 4, 16), dtype=torch.float32)
    assert not blocks(weight_only)
    fused = half_agrees(tiny_flux3().to(torch.bfloat16), call(dtype=torch.bfloat16))
    assert count_kernels(fused, call(dtype=torch.bfloat16))[0] == per_forward()


@pytest.mark.gpu
def test_fused_equals_unfused_on_gpu():
    """The same on the GPU's kernels (CUDA or Triton, whichever the dispatcher picks), bf16, with a reference
    image."""
    gpu_fused_matches(tiny_flux3(), call(dtype=torch.bfloat16), per_forward())
