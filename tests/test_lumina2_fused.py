"""Fused Lumina2 blocks (`runtime/lumina2_fused.py`): what they compute equals the unfused packed model (float32, the
reference backend: RMSNorm, its weight and the modulation in the quantization kernel) up to float rounding, in
the main blocks and both refiners (the context refiner without a modulation), with grouped-query attention and padded
prompts; the fused kernels actually run; and everything the fused path cannot reproduce runs diffusers' own forward
(or, for a feed-forward, diffusers' computation of it): hooks, training, another attention processor."""
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
from treeq_engine.runtime.lumina2_fused import FusedLumina2TransformerBlock  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

BLOCKS = ("context_refiner.0", "noise_refiner.0", "layers.0", "layers.1")
# per block: one RMSNorm-fused quantization for q/k/v and one for linear_1/linear_3; nothing in an epilogue
PER_FORWARD = {"ln": 4 * 2, "gelu": 0, "residual": 0, "codes_out": 0}


def tiny_lumina2():
    """A Lumina2 transformer: two main blocks and a refiner of each kind, four query heads on two key/value heads,
    random weights perturbed off diffusers' zero initialisations; the attention's and the feed-forward's input
    RMSNorms at epsilons of their own (1e-2, 3e-2: an epsilon the kernel takes from the wrong norm shows)."""
    torch.manual_seed(0)
    model = perturbed(diffusers.Lumina2Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, hidden_size=32, num_layers=2, num_refiner_layers=1,
        num_attention_heads=4, num_kv_heads=2, multiple_of=2, ffn_dim_multiplier=None, norm_eps=1e-5,
        scaling_factor=1.0, axes_dim_rope=(4, 2, 2), axes_lens=(128, 128, 128), cap_feat_dim=32).eval())
    for block in blocks(model):
        (block.norm1.norm if block.modulation else block.norm1).eps = 1e-2
        block.ffn_norm1.eps = 3e-2
    return model


def blocks(model):
    return [model.get_submodule(n) for n in BLOCKS]


def call(n=2, seed=0, dtype=torch.float32, padded=True):
    """The pipeline's call: latents (N, 4, 16, 16), a 16-token prompt (with ``padded``, the first sample's last five
    tokens masked), a timestep per sample."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(n, 16, dtype=torch.bool)
    if padded:
        mask[0, 11:] = False
    return dict(hidden_states=torch.randn(n, 4, 16, 16, generator=g).to(dtype),
                encoder_hidden_states=torch.randn(n, 16, 32, generator=g).to(dtype),
                timestep=torch.tensor([0.5, 0.1, 0.9][:n]).to(dtype), encoder_attention_mask=mask)


def mixed(model):
    """Block layers at assorted formats: W16 (the float paths), a branch (its own quantization call), to_q at
    another activation spec than to_k/to_v (no shared call), the rest W4A8."""
    plan = QuantPlan.block_uniform(model, 4, 8)
    return plan.with_layer("layers.0.attn.to_k", LayerConfig(16, 16)) \
        .with_layer("layers.0.feed_forward.linear_3", LayerConfig(16, 16)) \
        .with_layer("layers.1.attn.to_q", LayerConfig(4, 4)) \
        .with_layer("layers.1.feed_forward.linear_1", LayerConfig(4, 8, branch=BranchConfig("monarch", 2))) \
        .with_layer("context_refiner.0.attn.to_v", LayerConfig(8, 8, branch=BranchConfig("monarch", 2)))


def output(model, kw):
    with torch.no_grad():
        return model(**kw).sample


@pytest.mark.parametrize("kind", ["W8A8", "W4A8", "mixed"])
def test_fused_equals_unfused(kind):
    model = tiny_lumina2()
    plan = mixed(model) if kind == "mixed" else QuantPlan.block_uniform(model, int(kind[1]), int(kind[3]))
    unfused, fused = pair(model, plan)
    assert [type(b) for b in blocks(fused)] == [FusedLumina2TransformerBlock] * 4
    assert not fused.context_refiner[0].modulation
    assert fused.state_dict().keys() == unfused.state_dict().keys()
    for kw in (call(), call(n=3, seed=1, padded=False), call(n=1, seed=2)):
        want, got, fp = output(unfused, kw), output(fused, kw), output(model, kw)
        close(got, want)
        assert 0 < float((got - fp).norm() / fp.norm()) < 0.4


def test_the_fused_kernels_run_and_what_they_cannot_run_runs_diffusers_forward():
    from diffusers.models.transformers.transformer_lumina2 import Lumina2AttnProcessor2_0

    model = tiny_lumina2()
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    kw = call()
    assert count_kernels(fused, kw, rms=True)[0] == dict(PER_FORWARD, rms=PER_FORWARD["ln"])
    assert count_kernels(unfused, kw)[0] == {k: 0 for k in PER_FORWARD}
    want = output(unfused, kw)
    # a hook on a norm the kernel computes, on the attention or on a projection the kernels run: diffusers' forward
    # (2 fewer); on the feed-forward, or a first linear: it runs as a module, the attention stays fused (1 fewer); on
    # what the fused path calls as modules (the sandwich norms, to_out, linear_2, the SiLU): seen, nothing fewer
    full = PER_FORWARD["ln"]
    hooks_cost(fused, [(f"layers.0.{p}", 2) for p in ("norm1", "norm1.norm", "ffn_norm1", "attn", "attn.to_q",
                                                      "attn.to_k", "attn.to_v")] + [("context_refiner.0.norm1", 2)]
               + [(f"layers.0.{p}", 1) for p in ("feed_forward", "feed_forward.linear_1", "feed_forward.linear_3")]
               + [(f"layers.0.{p}", 0) for p in ("norm2", "ffn_norm2", "attn.to_out.0", "attn.to_out.1", "attn.norm_q",
                                                 "feed_forward.linear_2", "feed_forward.silu")], kw, want, full)
    another_processor_then_training(fused, fused.layers[0].attn, Lumina2AttnProcessor2_0, kw, want, full, 2)


def test_a_timestep_batch_the_fused_path_does_not_take_runs_diffusers_forward():
    """diffusers broadcasts a timestep embedding of batch 1 over the block's batch: the fused block runs diffusers'
    forward there (and its adaLN linear once)."""
    model = tiny_lumina2()
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    g = torch.Generator().manual_seed(3)
    x, temb = torch.randn(2, 10, 32, generator=g), torch.randn(1, 32, generator=g)
    seen = []
    hook = fused.layers[0].norm1.linear.register_forward_hook(lambda *a: seen.append(1))
    with torch.no_grad():
        want = unfused.layers[0](x, None, None, temb)
        got = fused.layers[0](x, None, None, temb)
    hook.remove()
    assert seen == [1]
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_only_blocks_with_something_to_fuse_are_swapped_and_bf16():
    model = tiny_lumina2()
    weight_only = quantize(copy.deepcopy(model), QuantPlan.block_uniform(model, 4, 16), dtype=torch.float32)
    assert not any(isinstance(b, FusedLumina2TransformerBlock) for b in blocks(weight_only))
    plan = QuantPlan.block_uniform(model, 4, 8)
    for n in ("attn.to_q", "attn.to_k", "attn.to_v", "feed_forward.linear_1", "feed_forward.linear_3"):
        plan = plan.with_layer(f"layers.0.{n}", LayerConfig(4, 16))
    fused = quantize(copy.deepcopy(model), plan, dtype=torch.float32)
    assert type(fused.layers[0]).__name__ == "Lumina2TransformerBlock"
    assert isinstance(fused.layers[1], FusedLumina2TransformerBlock)
    fused = half_agrees(tiny_lumina2().to(torch.bfloat16), call(dtype=torch.bfloat16))
    assert count_kernels(fused, call(dtype=torch.bfloat16))[0] == PER_FORWARD


@pytest.mark.gpu
def test_fused_equals_unfused_on_gpu():
    """The same on the GPU's kernels (CUDA or Triton, whichever the dispatcher picks), bf16."""
    gpu_fused_matches(tiny_lumina2(), call(dtype=torch.bfloat16), PER_FORWARD)
