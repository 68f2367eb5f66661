"""Fused FLUX.2 blocks (`runtime/flux2_fused.py`): what they compute equals the unfused packed model (float32, the
reference backend: LayerNorm + modulate in the quantization kernel, the gated residuals in the epilogues), the
fused kernels actually run, and everything the fused path cannot reproduce runs diffusers' own forward: hooks,
training, another attention processor, attention kwargs."""
import copy

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="diffusers is an optional dependency (requirements-dev.txt)")

from test_mmdit_fused import count_kernels, pair  # noqa: E402
from test_search_flux2 import call  # noqa: E402
from tiny_diffusers import tiny_flux2  # noqa: E402
from tinydit import one_thread  # noqa: E402,F401

from treeq_engine.plan import BranchConfig, LayerConfig, QuantPlan  # noqa: E402
from treeq_engine.runtime import quantize  # noqa: E402
from treeq_engine.runtime.flux2_fused import FusedFlux2SingleTransformerBlock, FusedFlux2TransformerBlock  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def mixed(model):
    """Block layers at assorted formats: W16 (the float paths), branches (their own quantization calls), to_q at
    another activation spec than to_k/to_v (no shared call), the rest W4A8."""
    plan = QuantPlan.block_uniform(model, 4, 8)
    return plan.with_layer("transformer_blocks.0.attn.to_k", LayerConfig(16, 16)) \
        .with_layer("transformer_blocks.0.ff.linear_out", LayerConfig(16, 16)) \
        .with_layer("transformer_blocks.0.attn.to_add_out", LayerConfig(16, 16)) \
        .with_layer("transformer_blocks.1.attn.to_q", LayerConfig(4, 4)) \
        .with_layer("transformer_blocks.1.ff_context.linear_in", LayerConfig(4, 8, branch=BranchConfig("monarch", 2))) \
        .with_layer("single_transformer_blocks.0.attn.to_qkv_mlp_proj", LayerConfig(16, 16)) \
        .with_layer("single_transformer_blocks.1.attn.to_out", LayerConfig(8, 8, branch=BranchConfig("monarch", 2)))


@pytest.mark.parametrize("kind", ["W8A8", "W4A8", "mixed"])
@pytest.mark.parametrize("guidance", [False, True])
def test_fused_equals_unfused(kind, guidance):
    model = tiny_flux2(guidance)
    plan = mixed(model) if kind == "mixed" else QuantPlan.block_uniform(model, int(kind[1]), int(kind[3]))
    unfused, fused = pair(model, plan)
    assert all(isinstance(b, FusedFlux2TransformerBlock) for b in fused.transformer_blocks)
    assert all(isinstance(b, FusedFlux2SingleTransformerBlock) for b in fused.single_transformer_blocks)
    assert fused.state_dict().keys() == unfused.state_dict().keys()
    for kw in (call(seed=0, guidance=guidance), call(n=3, tokens=20, text=9, seed=1, guidance=guidance)):
        with torch.no_grad():
            want, got, fp = unfused(**kw).sample, fused(**kw).sample, model(**kw).sample
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert 0 < float((got - fp).norm() / fp.norm()) < 0.1


def test_the_fused_kernels_run():
    """Per double block and stream: one LayerNorm-fused quantization for q/k/v and one for the feed-forward, three
    gated residuals... two per stream (the attention output, the feed-forward); per single block one of each."""
    model = tiny_flux2()
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    kw = call()
    calls, _ = count_kernels(fused, kw)
    assert calls == {"ln": 2 * 4 + 2 * 1, "gelu": 0, "residual": 2 * 4 + 2 * 1, "codes_out": 0}
    calls, _ = count_kernels(unfused, kw)
    assert calls == {"ln": 0, "gelu": 0, "residual": 0, "codes_out": 0}


def test_what_the_fused_path_cannot_run_runs_diffusers_forward():
    from diffusers.models.transformers.transformer_flux2 import Flux2AttnProcessor

    model = tiny_flux2()
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    kw = call()
    with torch.no_grad():
        want = unfused(**kw).sample
    seen = []
    # a hook on block 0's part: that block runs diffusers' forward (4 fewer fused quantizations), the rest fused
    for part in ("norm1", "norm2_context", "attn", "attn.to_out.1", "attn.add_k_proj", "attn.to_out.0",
                 "attn.to_add_out"):
        h = fused.transformer_blocks[0].get_submodule(part).register_forward_pre_hook(lambda *a: seen.append(1))
        calls, got = count_kernels(fused, kw)
        h.remove()
        assert seen and calls["ln"] == 2 * 4 + 2 - 4, part
        seen.clear()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for part in ("norm", "attn", "attn.to_qkv_mlp_proj", "attn.to_out", "attn.mlp_act_fn"):
        h = fused.single_transformer_blocks[1].get_submodule(part).register_forward_pre_hook(
            lambda *a: seen.append(1))
        calls, got = count_kernels(fused, kw)
        h.remove()
        assert seen and calls["ln"] == 2 * 4 + 2 - 1, part
        seen.clear()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # a hooked feed-forward runs as a module (one fused quantization fewer), the rest of its block stays fused
    h = fused.transformer_blocks[1].ff.register_forward_hook(lambda *a: seen.append(1))
    calls, got = count_kernels(fused, kw)
    h.remove()
    assert seen and calls["ln"] == 2 * 4 + 2 - 1
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # another processor, training: diffusers' forward
    other = copy.deepcopy(fused)

    class Other(Flux2AttnProcessor):
        pass

    other.transformer_blocks[1].attn.set_processor(Other())
    calls, got = count_kernels(other, kw)
    assert calls["ln"] == 2 * 4 + 2 - 4
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    fused.train()
    calls, got = count_kernels(fused, kw)
    assert calls["ln"] == 0
    fused.eval()


def test_bf16_fp16_and_the_block_registry():
    """In bf16 the fused model agrees with the unfused one to bf16's rounding, in fp16 it clips the residual streams
    as diffusers does; diffusers' block-level hooks find the fused classes in its block registry under the
    originals' entries. (FirstBlockCache itself fails on FLUX.2 in diffusers 0.42, fused or not: it subtracts the
    double block's tuple from the single block's tensor.)"""
    for dtype in (torch.bfloat16, torch.float16):
        model = tiny_flux2().to(dtype)
        unfused, fused = pair(model, QuantPlan.block_uniform(model, 8, 8), dtype=dtype)
        kw = call(dtype=dtype)
        with torch.no_grad():
            want, got = unfused(**kw).sample.float(), fused(**kw).sample.float()
        assert torch.isfinite(got).all() and float((got - want).norm() / want.norm()) < 2e-2
    from diffusers.hooks._helpers import TransformerBlockRegistry

    for cls, index in ((FusedFlux2TransformerBlock, (1, 0)), (FusedFlux2SingleTransformerBlock, (0, None))):
        meta = TransformerBlockRegistry.get(cls)
        assert (meta.return_hidden_states_index, meta.return_encoder_hidden_states_index) == index


@pytest.mark.gpu
def test_fused_equals_unfused_on_gpu():
    """The same on the GPU's kernels (CUDA or Triton, whichever the dispatcher picks), bf16."""
    model = tiny_flux2()
    plan = QuantPlan.block_uniform(model, 4, 8)
    unfused = quantize(copy.deepcopy(model).cuda(), plan, dtype=torch.bfloat16, fuse=False).to(torch.bfloat16)
    fused = quantize(copy.deepcopy(model).cuda(), plan, dtype=torch.bfloat16).to(torch.bfloat16)
    assert all(isinstance(b, FusedFlux2TransformerBlock) for b in fused.transformer_blocks)
    kw = {k: (v.cuda().to(torch.bfloat16) if v.is_floating_point() and k != "timestep" else v.cuda())
          if isinstance(v, torch.Tensor) else v for k, v in call().items()}
    calls, b = count_kernels(fused, kw)
    assert calls["ln"] == 2 * 4 + 2 * 1 and calls["residual"] == 2 * 4 + 2 * 1   # fused on the GPU too
    with torch.no_grad():
        a = unfused(**kw).sample.float()
    b = b.float()
    assert torch.isfinite(b).all()
    assert (b - a).norm() <= 0.08 * a.norm(), f"relative error {float((b - a).norm() / a.norm()):.3g}"
