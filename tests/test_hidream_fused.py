"""Fused HiDream-I1 blocks (`runtime/hidream_fused.py`): the fused model equals the unfused packed one (float32, the
reference backend: LayerNorm + modulate in the quantization kernels of each stream's q/k/v and of the SwiGLU
feed-forwards' w1 and w3, their gated residuals in w2's epilogue, the mixture-of-experts feed-forward the module's,
the attention the processor's own on the kernels' projections), for a mixture-of-experts model and a dense one; the
fused kernels run, and what the fused path cannot reproduce runs diffusers' own forward."""
import copy

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="diffusers is an optional dependency (requirements-dev.txt)")
hd = pytest.importorskip("diffusers.models.transformers.transformer_hidream_image", reason="diffusers before HiDream")

from diffusers_zoo import CASES  # noqa: E402
from test_mmdit_fused import another_processor_and_training, count_kernels, half_agrees, pair  # noqa: E402
from test_zimage_fused import close, hooks_cost  # noqa: E402
from tiny_diffusers import perturbed  # noqa: E402
from tinydit import one_thread  # noqa: E402,F401

from treeq_engine.plan import BranchConfig, LayerConfig, QuantPlan  # noqa: E402
from treeq_engine.runtime import quantize  # noqa: E402
from treeq_engine.runtime.hidream_fused import (FusedHiDreamImageSingleTransformerBlock,  # noqa: E402
                                                FusedHiDreamImageTransformerBlock)

pytestmark = pytest.mark.usefixtures("one_thread")
# a double block (q/k/v per stream, the text's SwiGLU; with dense experts the image's too) and a single block (q/k/v;
# dense: the SwiGLU): one LayerNorm-fused quantization each, a gated residual per SwiGLU feed-forward
PER_FORWARD = {"moe": {"ln": 3 + 1, "gelu": 0, "residual": 1, "codes_out": 0},
               "dense": {"ln": 4 + 2, "gelu": 0, "residual": 2 + 1, "codes_out": 0}}


def tiny(kind="moe"):
    """The zoo's HiDream-I1 (a double and a single block; two routed experts, or with ``dense`` none), random
    weights."""
    torch.manual_seed(0)
    return perturbed(hd.HiDreamImageTransformer2DModel(
        patch_size=2, in_channels=4, out_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=4, caption_channels=[8, 4], text_emb_dim=8, num_routed_experts=2 if kind == "moe" else 0,
        num_activated_experts=2, axes_dims_rope=(4, 2, 2), max_resolution=(32, 32), llama_layers=(0, 1),
        force_inference_output=True).eval())


def call(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    kw = CASES["HiDreamImage"][1](lambda *s: torch.randn(*s, generator=g))
    return {k: v.to(dtype) if v.is_floating_point() and k != "timesteps" else v for k, v in kw.items()}


def sample(model, kw):
    with torch.no_grad():
        return model(**kw).sample


def mixed(model):
    plan = QuantPlan.block_uniform(model, 4, 8)
    return plan.with_layer("double_stream_blocks.0.block.attn1.to_k", LayerConfig(16, 16)) \
        .with_layer("double_stream_blocks.0.block.ff_t.w2", LayerConfig(16, 16)) \
        .with_layer("double_stream_blocks.0.block.attn1.to_q_t", LayerConfig(4, 4)) \
        .with_layer("single_stream_blocks.0.block.attn1.to_v", LayerConfig(8, 8, branch=BranchConfig("monarch", 2)))


@pytest.mark.parametrize("plan", ["W8A8", "W4A8", "mixed"])
@pytest.mark.parametrize("kind", ["moe", "dense"])
def test_fused_equals_unfused(kind, plan):
    model = tiny(kind)
    layers = mixed(model) if plan == "mixed" else QuantPlan.block_uniform(model, int(plan[1]), int(plan[3]))
    unfused, fused = pair(model, layers)
    assert type(fused.double_stream_blocks[0].block) is FusedHiDreamImageTransformerBlock
    assert type(fused.single_stream_blocks[0].block) is FusedHiDreamImageSingleTransformerBlock
    assert fused.state_dict().keys() == unfused.state_dict().keys()
    for seed in (0, 1):
        got, want, fp = sample(fused, call(seed)), sample(unfused, call(seed)), sample(model, call(seed))
        close(got, want, bound=1e-5)
        assert 0 < float((got - fp).norm() / fp.norm()) < 0.3
    if plan != "mixed":
        assert count_kernels(fused, call())[0] == PER_FORWARD[kind]


@pytest.mark.parametrize("kind", ["moe", "dense"])
def test_what_the_fused_path_cannot_run_runs_diffusers_forward(kind):
    model = tiny(kind)
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    kw = call()
    want = sample(unfused, kw)
    full = PER_FORWARD[kind]["ln"]
    double = 4 if kind == "dense" else 3
    hooks_cost(fused, [(f"double_stream_blocks.0.block.{p}", double) for p in (
        "norm1_i", "norm3_t", "adaLN_modulation", "attn1", "attn1.to_k_t", "attn1.to_q")]
        + [("double_stream_blocks.0.block.ff_t", 1), ("double_stream_blocks.0.block.ff_t.w1", 1),
           ("double_stream_blocks.0.block.ff_t.w2", 1)]
        + [(f"single_stream_blocks.0.block.{p}", full - double) for p in ("norm1_i", "attn1.to_v")]
        + [(f"double_stream_blocks.0.block.{p}", 0) for p in ("attn1.to_out", "attn1.q_rms_norm",
                                                              "adaLN_modulation.1")],
        kw, want, full, close)
    another_processor_and_training(fused, fused.double_stream_blocks[0].block.attn1, hd.HiDreamAttnProcessor, kw,
                                   want, full - double)

    quantized = copy.deepcopy(model)
    quantize(quantized, QuantPlan.block_uniform(model, 4, 8), dtype=torch.float32, fuse=False)
    quantized.double_stream_blocks[0].block.norm3_t = torch.nn.LayerNorm(32)   # (with an affine)
    with pytest.raises(ValueError, match="handles HiDreamImageTransformerBlock in the structure"):
        FusedHiDreamImageTransformerBlock(quantized.double_stream_blocks[0].block)


@pytest.mark.parametrize("kind", ["moe", "dense"])
def test_bf16(kind):
    half_agrees(tiny(kind).to(torch.bfloat16), call(dtype=torch.bfloat16), per_forward=PER_FORWARD[kind])


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["moe", "dense"])
def test_fused_equals_unfused_on_gpu(kind):
    from test_mmdit_fused import gpu_fused_matches

    gpu_fused_matches(tiny(kind), call(dtype=torch.bfloat16), PER_FORWARD[kind])
