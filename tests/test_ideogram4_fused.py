"""Fused Ideogram 4 blocks (`runtime/ideogram4_fused.py`): what they compute equals the unfused packed model
(float32, the reference backend: RMSNorm, its weight and the modulation in the quantization kernel) up to float
rounding, with the segment mask and the multimodal rotary embedding; the fused kernels actually run; and everything
the fused path cannot reproduce runs diffusers' own forward (or, for a feed-forward, diffusers' computation of it):
hooks, training, another attention processor, a timestep per token."""

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="diffusers is an optional dependency (requirements-dev.txt)")

from diffusers_zoo import CASES  # noqa: E402
from test_mmdit_fused import (count_kernels, gpu_fused_matches, pair,  # noqa: E402
                             unswapped_weight_only_and_bf16)
from test_zimage_fused import another_processor_then_training, close, hooks_cost  # noqa: E402
from tiny_diffusers import perturbed  # noqa: E402
from tinydit import one_thread  # noqa: E402,F401

from treeq_engine.plan import BranchConfig, LayerConfig, QuantPlan  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
# per block: one RMSNorm-fused quantization for q/k/v and one for w1/w3; nothing in an epilogue (sandwich norms)
PER_FORWARD = {"ln": 2 * 2, "gelu": 0, "residual": 0, "codes_out": 0}


def tiny_ideogram4():
    """The zoo's Ideogram 4 (two blocks), random weights perturbed off diffusers' zero initialisations, the
    attention's and the feed-forward's input RMSNorms at epsilons of their own (1e-2, 3e-2)."""
    torch.manual_seed(0)
    model = perturbed(CASES["Ideogram4"][0]().eval())
    for block in model.layers:
        block.attention_norm1.eps, block.ffn_norm1.eps = 1e-2, 3e-2
    return model


def call(n=2, seed=0, dtype=torch.float32):
    """The zoo's call (2 padding, 6 text and 16 image tokens in their segments), for ``n`` samples of their own
    latents and text, and their own timesteps."""
    calls = []
    for i in range(n):
        g = torch.Generator().manual_seed(seed + i)
        calls.append(CASES["Ideogram4"][1](lambda *shape: torch.randn(*shape, generator=g)))
    kw = {k: torch.cat([c[k] for c in calls]) for k in calls[0]}
    kw["timestep"] = torch.tensor([0.4, 0.7, 0.1][:n])
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in kw.items()}


def mixed(model):
    plan = QuantPlan.block_uniform(model, 4, 8)
    return plan.with_layer("layers.0.attention.to_k", LayerConfig(16, 16)) \
        .with_layer("layers.0.feed_forward.w3", LayerConfig(16, 16)) \
        .with_layer("layers.1.attention.to_q", LayerConfig(4, 4)) \
        .with_layer("layers.1.feed_forward.w1", LayerConfig(4, 8, branch=BranchConfig("monarch", 2)))


def output(model, kw):
    with torch.no_grad():
        return model(**kw).sample


@pytest.mark.parametrize("kind", ["W8A8", "W4A8", "mixed"])
def test_fused_equals_unfused(kind):
    from treeq_engine.runtime.ideogram4_fused import FusedIdeogram4TransformerBlock

    model = tiny_ideogram4()
    plan = mixed(model) if kind == "mixed" else QuantPlan.block_uniform(model, int(kind[1]), int(kind[3]))
    unfused, fused = pair(model, plan)
    assert [type(b) for b in fused.layers] == [FusedIdeogram4TransformerBlock] * 2
    assert fused.state_dict().keys() == unfused.state_dict().keys()
    for kw in (call(), call(n=1, seed=5)):
        want, got, fp = output(unfused, kw), output(fused, kw), output(model, kw)
        close(got, want)
        assert 0 < float((got - fp).norm() / fp.norm()) < 0.4


def test_the_fused_kernels_run_and_what_they_cannot_run_runs_diffusers_forward():
    from diffusers.models.transformers.transformer_ideogram4 import Ideogram4AttnProcessor

    model = tiny_ideogram4()
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    kw = call()
    assert count_kernels(fused, kw, rms=True)[0] == dict(PER_FORWARD, rms=PER_FORWARD["ln"])
    assert count_kernels(unfused, kw)[0] == {k: 0 for k in PER_FORWARD}
    want = output(unfused, kw)
    full = PER_FORWARD["ln"]
    hooks_cost(fused, [(f"layers.0.{p}", fewer) for p, fewer in (
        ("attention_norm1", 2), ("ffn_norm1", 2), ("attention", 2), ("attention.to_q", 2), ("attention.to_k", 2),
        ("attention.to_v", 2), ("feed_forward", 1), ("feed_forward.w1", 1), ("attention_norm2", 0), ("ffn_norm2", 0),
        ("attention.to_out.0", 0), ("attention.norm_k", 0), ("feed_forward.w2", 0), ("adaln_modulation", 0))],
        kw, want, full)
    another_processor_then_training(fused, fused.layers[0].attention, Ideogram4AttnProcessor, kw, want, full, 2)


def test_a_timestep_per_token_or_for_the_batch_runs_diffusers_forward():
    """A timestep per token makes a modulation per token, one timestep for the batch one diffusers broadcasts:
    diffusers' forward, the same output."""
    model = tiny_ideogram4()
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    for timestep in (torch.rand(2, 24, generator=torch.Generator().manual_seed(3)), torch.tensor([0.3])):
        kw = dict(call(), timestep=timestep)
        calls, got = count_kernels(fused, kw)
        assert calls["ln"] == 0
        torch.testing.assert_close(got, output(unfused, kw), rtol=0, atol=0)


def test_only_blocks_with_something_to_fuse_are_swapped_and_bf16():
    from treeq_engine.runtime.ideogram4_fused import FusedIdeogram4TransformerBlock

    unswapped_weight_only_and_bf16(tiny_ideogram4, call, FusedIdeogram4TransformerBlock, PER_FORWARD)


@pytest.mark.gpu
def test_fused_equals_unfused_on_gpu():
    """The same on the GPU's kernels (CUDA or Triton, whichever the dispatcher picks), bf16."""
    gpu_fused_matches(tiny_ideogram4(), call(dtype=torch.bfloat16), PER_FORWARD)
