"""Fused Chroma blocks (`runtime/chroma_fused.py`): what they compute equals the unfused packed model (float32, the
reference backend: LayerNorm + modulate in the quantization kernel, GELU and the gated residuals in the
epilogues, the pipeline's mask in the attention), the fused kernels actually run, and everything the fused path
cannot reproduce runs diffusers' own forward: hooks, training, another attention processor, attention kwargs."""
import copy

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="diffusers is an optional dependency (requirements-dev.txt)")

from test_mmdit_fused import (another_processor_and_training, count_kernels,  # noqa: E402
                             flux_style_parts_fall_back, fused_kernels_run, gpu_fused_matches, half_agrees, pair)
from test_search_chroma import call  # noqa: E402
from tiny_diffusers import tiny_chroma  # noqa: E402
from tinydit import one_thread  # noqa: E402,F401

from treeq_engine.plan import BranchConfig, LayerConfig, QuantPlan  # noqa: E402
from treeq_engine.runtime import quantize  # noqa: E402
from treeq_engine.runtime.chroma_fused import (FusedChromaSingleTransformerBlock,  # noqa: E402
                                               FusedChromaTransformerBlock)

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:`FluxPosEmbed` is deprecated:FutureWarning")]
PER_FORWARD = {"ln": 1 * 4 + 3 * 1, "gelu": 1 * 2 + 3 * 1, "residual": 1 * 4 + 3 * 1, "codes_out": 1 * 2}


def mixed(model):
    """Block layers at assorted formats: W16 (the float paths), branches (their own quantization calls), to_q at
    another activation spec than to_k/to_v (no shared call), the rest W4A8."""
    plan = QuantPlan.block_uniform(model, 4, 8)
    return plan.with_layer("transformer_blocks.0.attn.to_k", LayerConfig(16, 16)) \
        .with_layer("transformer_blocks.0.ff.net.2", LayerConfig(16, 16)) \
        .with_layer("transformer_blocks.0.attn.to_add_out", LayerConfig(16, 16)) \
        .with_layer("single_transformer_blocks.2.attn.to_q", LayerConfig(4, 4)) \
        .with_layer("transformer_blocks.0.ff_context.net.0.proj", LayerConfig(4, 8, branch=BranchConfig("monarch",
                                                                                                        2))) \
        .with_layer("single_transformer_blocks.0.proj_mlp", LayerConfig(16, 16)) \
        .with_layer("single_transformer_blocks.1.proj_out", LayerConfig(8, 8, branch=BranchConfig("monarch", 2)))


def blocks(model):
    return list(model.transformer_blocks) + list(model.single_transformer_blocks)


@pytest.mark.parametrize("kind", ["W8A8", "W4A8", "mixed"])
def test_fused_equals_unfused(kind):
    model = tiny_chroma()
    plan = mixed(model) if kind == "mixed" else QuantPlan.block_uniform(model, int(kind[1]), int(kind[3]))
    unfused, fused = pair(model, plan)
    assert [type(b) for b in blocks(fused)] == [FusedChromaTransformerBlock] + [FusedChromaSingleTransformerBlock] * 3
    assert fused.state_dict().keys() == unfused.state_dict().keys()
    for kw in (call(), call(n=3, hw=(4, 2), text=7, seed=1, masked=False)):   # the pipeline's mask, and none
        with torch.no_grad():
            want, got, fp = unfused(**kw).sample, fused(**kw).sample, model(**kw).sample
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert 0 < float((got - fp).norm() / fp.norm()) < 0.1
    kw = call()
    kw["attention_mask"][0, :3] = 0   # (a mask the fused path must read: hiding the first sample's prompt changes it)
    with torch.no_grad():
        masked, want = fused(**kw).sample, unfused(**kw).sample
    torch.testing.assert_close(masked, want, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        assert not torch.allclose(masked[0], fused(**call()).sample[0])


def test_the_fused_kernels_run():
    """Per double block and stream: one LayerNorm-fused quantization for q/k/v and one for the feed-forward, GELU and
    the next layer's codes in each feed-forward's first epilogue, two gated residuals per stream; per single block one
    quantization for proj_mlp + q/k/v, GELU in proj_mlp's epilogue, the gated residual in proj_out's."""
    fused_kernels_run(tiny_chroma(), call(), PER_FORWARD)


def test_what_the_fused_path_cannot_run_runs_diffusers_forward():
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    model = tiny_chroma()
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    kw = call()
    with torch.no_grad():
        want = unfused(**kw).sample
    # a hook on a double block's norm, its attention or a packed projection: that block runs diffusers' forward
    flux_style_parts_fall_back(fused, kw, want, PER_FORWARD["ln"])
    # a hooked feed-forward runs as a module (one fused quantization fewer), the rest of its block stays fused
    seen = []
    h = fused.transformer_blocks[0].ff_context.register_forward_hook(lambda *a: seen.append(1))
    calls, got = count_kernels(fused, kw)
    h.remove()
    assert seen and calls["ln"] == PER_FORWARD["ln"] - 1
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    another_processor_and_training(fused, fused.single_transformer_blocks[0].attn, FluxAttnProcessor, kw, want,
                                   PER_FORWARD["ln"] - 1)


def test_only_blocks_with_something_to_fuse_are_swapped():
    model = tiny_chroma()
    fused = quantize(copy.deepcopy(model), QuantPlan.block_uniform(model, 4, 16), dtype=torch.float32)
    assert not any(type(b).__name__.startswith("Fused") for b in blocks(fused))   # weight-only: nothing to fuse
    plan = QuantPlan.block_uniform(model, 4, 8)
    for n in ("proj_mlp", "attn.to_q", "attn.to_k", "attn.to_v", "proj_out"):
        plan = plan.with_layer(f"single_transformer_blocks.1.{n}", LayerConfig(4, 16))
    fused = quantize(copy.deepcopy(model), plan, dtype=torch.float32)
    assert type(fused.single_transformer_blocks[1]).__name__ == "ChromaSingleTransformerBlock"
    assert isinstance(fused.single_transformer_blocks[0], FusedChromaSingleTransformerBlock)


def test_bf16_fp16_and_the_block_registry():
    """In bf16 and fp16 the fused model agrees with the unfused one to the dtype's rounding; diffusers' block-level
    hooks find the fused classes in its registry."""
    for dtype in (torch.bfloat16, torch.float16):
        half_agrees(tiny_chroma().to(dtype), call(dtype=dtype), dtype)
    from diffusers.hooks._helpers import TransformerBlockRegistry

    for cls, index in ((FusedChromaTransformerBlock, (1, 0)), (FusedChromaSingleTransformerBlock, (0, None))):
        meta = TransformerBlockRegistry.get(cls)
        assert (meta.return_hidden_states_index, meta.return_encoder_hidden_states_index) == index


@pytest.mark.gpu
def test_fused_equals_unfused_on_gpu():
    """The same on the GPU's kernels (CUDA or Triton, whichever the dispatcher picks), bf16, the mask included."""
    gpu_fused_matches(tiny_chroma(), call(dtype=torch.bfloat16), PER_FORWARD)
