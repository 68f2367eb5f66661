"""Fused Qwen-Image blocks (`runtime/qwen_fused.py`): what they compute equals the unfused packed model (float32,
the reference backend: LayerNorm + modulate in the quantization kernel, GELU and the gated residuals in the
epilogues), the fused kernels actually run, and everything the fused path cannot reproduce runs diffusers' own
forward: hooks, training, another attention processor, the edit models' per-token modulation."""
import copy

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="diffusers is an optional dependency (requirements-dev.txt)")

from test_mmdit_fused import count_kernels  # noqa: E402
from test_search_qwen import call  # noqa: E402
from tiny_diffusers import tiny_qwen  # noqa: E402
from tinydit import one_thread  # noqa: E402,F401

from treeq_engine.plan import BranchConfig, LayerConfig, QuantPlan  # noqa: E402
from treeq_engine.runtime import quantize  # noqa: E402
from treeq_engine.runtime.qwen_fused import FusedQwenImageTransformerBlock  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def mixed(model):
    """Block layers at assorted formats: W16 (the float paths), branches (their own quantization calls), to_q at
    another activation spec than to_k/to_v (no shared call), the rest W4A8."""
    plan = QuantPlan.block_uniform(model, 4, 8)
    return plan.with_layer("transformer_blocks.0.attn.to_k", LayerConfig(16, 16)) \
        .with_layer("transformer_blocks.0.img_mlp.net.2", LayerConfig(16, 16)) \
        .with_layer("transformer_blocks.0.attn.to_add_out", LayerConfig(16, 16)) \
        .with_layer("transformer_blocks.1.attn.to_q", LayerConfig(4, 4)) \
        .with_layer("transformer_blocks.1.txt_mlp.net.0.proj", LayerConfig(4, 8, branch=BranchConfig("monarch", 2))) \
        .with_layer("transformer_blocks.1.attn.add_v_proj", LayerConfig(8, 8, branch=BranchConfig("monarch", 2)))


def pair(model, plan, dtype=torch.float32):
    unfused, fused = copy.deepcopy(model), copy.deepcopy(model)
    quantize(unfused, plan, dtype=dtype, fuse=False)
    quantize(fused, plan, dtype=dtype)
    return unfused, fused


@pytest.mark.parametrize("kind", ["W8A8", "W4A8", "mixed"])
def test_fused_equals_unfused(kind):
    model = tiny_qwen()
    plan = mixed(model) if kind == "mixed" else QuantPlan.block_uniform(model, int(kind[1]), int(kind[3]))
    unfused, fused = pair(model, plan)
    assert all(isinstance(b, FusedQwenImageTransformerBlock) for b in fused.transformer_blocks)
    assert fused.state_dict().keys() == unfused.state_dict().keys()
    for kw in (call(n=2, seed=0), call(n=3, text=9, hw=(2, 8), seed=1), dict(call(n=2), encoder_hidden_states_mask=None)):
        with torch.no_grad():
            want, got, fp = unfused(**kw).sample, fused(**kw).sample, model(**kw).sample
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert 0 < float((got - fp).norm() / fp.norm()) < 0.1


def test_the_fused_kernels_run():
    """Per block and stream: one LayerNorm-fused quantization for q/k/v and one for the feed-forward, GELU and the
    next layer's codes in the feed-forward's first epilogue, two gated residuals."""
    model = tiny_qwen()
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    kw = call(n=2)
    calls, _ = count_kernels(fused, kw)
    assert calls == {"ln": 2 * 4, "gelu": 2 * 2, "residual": 2 * 4, "codes_out": 2 * 2}
    calls, _ = count_kernels(unfused, kw)
    assert calls == {"ln": 0, "gelu": 0, "residual": 0, "codes_out": 0}


def test_what_the_fused_path_cannot_run_runs_diffusers_forward():
    from diffusers.models.transformers.transformer_qwenimage import QwenDoubleStreamAttnProcessor2_0

    model = tiny_qwen()
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    kw = call(n=2)
    with torch.no_grad():
        want = unfused(**kw).sample
    seen = []
    for part, ln in (("img_norm1", 4), ("txt_mod", 4), ("attn.to_out.1", 4), ("attn.add_k_proj", 4)):
        h = fused.transformer_blocks[0].get_submodule(part).register_forward_pre_hook(lambda *a: seen.append(1))
        calls, got = count_kernels(fused, kw)
        h.remove()
        assert seen and calls["ln"] == ln, part   # block 0 runs diffusers' forward, block 1 stays fused
        seen.clear()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    h = fused.transformer_blocks[1].txt_mlp.register_forward_hook(lambda *a: seen.append(1))
    calls, got = count_kernels(fused, kw)   # a hooked feed-forward runs as a module, the rest stays fused
    h.remove()
    assert seen and calls["ln"] == 2 * 4 - 1
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    class OtherProcessor(QwenDoubleStreamAttnProcessor2_0):   # a subclass computes what it likes
        pass

    fused.transformer_blocks[0].attn.set_processor(OtherProcessor())
    calls, got = count_kernels(fused, kw)
    assert calls["ln"] == 4
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    fused.train()
    calls, got = count_kernels(fused, kw)
    assert calls["ln"] == 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    fused.eval()
    fused.transformer_blocks[1].attn.fused_projections = True   # (as fuse_projections leaves it: a dense copy)
    with pytest.raises(RuntimeError, match="call it before quantize"), torch.no_grad():
        fused(**kw)


def test_bf16_and_a_cache_hook():
    """In bf16 the fused model agrees with the unfused one to bf16's rounding; diffusers' FirstBlockCache finds the
    fused class in its block registry."""
    model = tiny_qwen().to(torch.bfloat16)
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 8, 8), dtype=torch.bfloat16)
    kw = {k: v.to(torch.bfloat16) if isinstance(v, torch.Tensor) and v.is_floating_point() and k != "timestep"
          else v for k, v in call(n=2).items()}
    with torch.no_grad():
        want, got = unfused(**kw).sample.float(), fused(**kw).sample.float()
    assert float((got - want).norm() / want.norm()) < 2e-2
    fused.enable_cache(diffusers.FirstBlockCacheConfig(threshold=0.05))
    with torch.no_grad(), fused.cache_context("test"):
        first = fused(**kw).sample.float()
    assert torch.isfinite(first).all()


@pytest.mark.gpu
def test_fused_equals_unfused_on_gpu():
    """The same on the GPU's kernels (CUDA or Triton, whichever the dispatcher picks), bf16, layers in the fragment
    layout (bound as for the DiT blocks: test_diffusers_fused.py's reasoning)."""
    model = tiny_qwen()
    plan = QuantPlan.block_uniform(model, 4, 8)
    unfused = quantize(copy.deepcopy(model).cuda(), plan, dtype=torch.bfloat16, fuse=False).to(torch.bfloat16)
    fused = quantize(copy.deepcopy(model).cuda(), plan, dtype=torch.bfloat16).to(torch.bfloat16)
    assert all(isinstance(b, FusedQwenImageTransformerBlock) for b in fused.transformer_blocks)
    kw = {k: (v.cuda().to(torch.bfloat16) if v.is_floating_point() and k != "timestep" else v.cuda())
          if isinstance(v, torch.Tensor) else v for k, v in call(n=2).items()}
    with torch.no_grad():
        a, b = unfused(**kw).sample.float(), fused(**kw).sample.float()
    assert torch.isfinite(b).all()
    assert (b - a).norm() <= 0.08 * a.norm(), f"relative error {float((b - a).norm() / a.norm()):.3g}"
