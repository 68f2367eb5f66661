"""Fused Wan blocks (`runtime/wan_fused.py`): what they compute equals the unfused packed model (float32, the
reference backend: LayerNorm + modulate in the quantization kernel, GELU and the gated residuals in the
epilogues), the fused kernels actually run, and everything the fused path cannot reproduce runs diffusers' own
forward (or, for a feed-forward or output projection, diffusers' computation of that part): hooks, training,
another attention processor, layers left in 16 bits."""
import copy

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="diffusers is an optional dependency (requirements-dev.txt)")

from test_mmdit_fused import another_processor_and_training, count_kernels, half_agrees, pair  # noqa: E402
from test_search_wan import call, tiny_wan  # noqa: E402
from tiny_diffusers import perturbed  # noqa: E402
from tinydit import one_thread  # noqa: E402,F401

from treeq_engine.plan import BranchConfig, LayerConfig, QuantPlan  # noqa: E402
from treeq_engine.runtime import quantize  # noqa: E402
from treeq_engine.runtime.linear import TreeQLinear  # noqa: E402
from treeq_engine.runtime.wan_fused import FusedWanTransformerBlock  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def mixed(model):
    """Block layers at assorted formats: W16 (the float paths), a branch (its own quantization call), to_q at
    another activation spec than to_k/to_v (no shared call), the rest W4A8."""
    plan = QuantPlan.block_uniform(model, 4, 8)
    return plan.with_layer("blocks.0.attn1.to_k", LayerConfig(16, 16)) \
        .with_layer("blocks.0.attn1.to_out.0", LayerConfig(16, 16)) \
        .with_layer("blocks.0.ffn.net.2", LayerConfig(16, 16)) \
        .with_layer("blocks.1.attn1.to_q", LayerConfig(4, 4)) \
        .with_layer("blocks.1.ffn.net.0.proj", LayerConfig(4, 8, branch=BranchConfig("monarch", 2))) \
        .with_layer("blocks.1.attn1.to_v", LayerConfig(8, 8, branch=BranchConfig("monarch", 2)))


@pytest.mark.parametrize("kind", ["W8A8", "W4A8", "mixed"])
@pytest.mark.parametrize("image", [False, True])
def test_fused_equals_unfused(kind, image):
    model = perturbed(tiny_wan(image))
    plan = mixed(model) if kind == "mixed" else QuantPlan.block_uniform(model, int(kind[1]), int(kind[3]))
    unfused, fused = pair(model, plan)
    assert all(isinstance(b, FusedWanTransformerBlock) for b in fused.blocks)
    assert fused.state_dict().keys() == unfused.state_dict().keys()
    for seed, fhw in ((0, (3, 8, 6)), (1, (2, 4, 10))):
        kw = call(model, n=2, seed=seed, fhw=fhw)
        with torch.no_grad():
            want, got, fp = unfused(**kw).sample, fused(**kw).sample, model(**kw).sample
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert 0 < float((got - fp).norm() / fp.norm()) < 0.15


def test_the_fused_kernels_run():
    """Per block: one LayerNorm-fused quantization for q/k/v and one for the feed-forward, GELU and the next
    layer's codes in the feed-forward's first epilogue, two gated residuals (to_out, ffn.net[2])."""
    model = perturbed(tiny_wan())
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    kw = call(model, n=2)
    calls, _ = count_kernels(fused, kw)
    assert calls == {"ln": 2 * 2, "gelu": 2, "residual": 2 * 2, "codes_out": 2}
    calls, _ = count_kernels(unfused, kw)
    assert calls == {"ln": 0, "gelu": 0, "residual": 0, "codes_out": 0}


def test_what_the_fused_path_cannot_run_runs_diffusers_forward():
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    model = perturbed(tiny_wan())
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    kw = call(model, n=2)
    with torch.no_grad():
        want = unfused(**kw).sample
    seen = []
    # a hook on a norm: the whole block runs as modules (the hook sees its call)
    h = fused.blocks[0].norm1.register_forward_hook(lambda *a: seen.append(1))
    calls, got = count_kernels(fused, kw)
    h.remove()
    assert seen and calls["ln"] == 2
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # a hook on the feed-forward: it runs as a module, the self-attention stays fused
    seen.clear()
    h = fused.blocks[1].ffn.register_forward_hook(lambda *a: seen.append(1))
    calls, got = count_kernels(fused, kw)
    h.remove()
    assert seen and calls["ln"] == 2 + 1 and calls["residual"] == 2 + 1
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # a hook on a packed projection the kernels would run: that block runs diffusers' forward
    h = fused.blocks[1].attn1.to_q.register_forward_pre_hook(lambda *a: seen.append(2))
    calls, got = count_kernels(fused, kw)
    h.remove()
    assert 2 in seen and calls["ln"] == 2
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    another_processor_and_training(fused, fused.blocks[0].attn1, WanAttnProcessor, kw, want, 2)


def test_per_token_timesteps_fuse():
    """Wan 2.2 TI2V passes a timestep per token (its first latent frame at 0): the block's (B, S, 6, D) modulation
    reaches the kernels one group per latent frame, and the fused model equals the unfused one."""
    model = perturbed(tiny_wan())
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    kw = call(model, n=2)
    tokens = 3 * 4 * 3   # (3x8x6 latents in 1x2x2 patches)
    first = torch.zeros(2, tokens)
    first[:, :12] = 1   # (the first latent frame's tokens: the conditioning image)
    kw["timestep"] = kw["timestep"][:, None] * (1 - first)
    scales = []
    orig = TreeQLinear.quantize_input
    with pytest.MonkeyPatch.context() as mp, torch.no_grad():
        mp.setattr(TreeQLinear, "quantize_input",
                   lambda self, x2, **k: scales.append(getattr(k.get("scale"), "shape", None)) or orig(self, x2, **k))
        got = fused(**kw).sample
    with torch.no_grad():
        torch.testing.assert_close(got, unfused(**kw).sample, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(got, fused(**call(model, n=2)).sample)
    # (q/k/v and the feed-forward of both blocks, per token: a group per latent frame of 12 tokens, 2 x 3 of them)
    assert scales.count((2 * 3, 16)) == 2 * 2


def test_only_wan_blocks_with_something_to_fuse_are_swapped():
    model = perturbed(tiny_wan())
    plan = QuantPlan.block_uniform(model, 4, 16)   # weight-only: no quantized activations to fuse
    fused = quantize(copy.deepcopy(model), plan, dtype=torch.float32)
    assert not any(isinstance(b, FusedWanTransformerBlock) for b in fused.blocks)
    plan = QuantPlan.block_uniform(model, 4, 8)
    for n in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ffn.net.0.proj", "ffn.net.2"):
        plan = plan.with_layer(f"blocks.0.{n}", LayerConfig(4, 16))
    fused = quantize(copy.deepcopy(model), plan, dtype=torch.float32)
    assert type(fused.blocks[0]).__name__ == "WanTransformerBlock"
    assert isinstance(fused.blocks[1], FusedWanTransformerBlock)


def test_bf16_and_a_cache_hook():
    """In bf16 the fused model agrees with the unfused one to bf16's rounding; diffusers' FirstBlockCache finds the
    fused class in its block registry."""
    model = perturbed(tiny_wan()).to(torch.bfloat16)
    kw = {k: v.to(torch.bfloat16) if v.is_floating_point() and k != "timestep" else v
          for k, v in call(model, n=2).items()}
    fused = half_agrees(model, kw)
    fused.enable_cache(diffusers.FirstBlockCacheConfig(threshold=0.05))
    with torch.no_grad(), fused.cache_context("test"):
        first = fused(**kw).sample.float()
    assert torch.isfinite(first).all()


def test_an_older_diffusers_leaves_wan_blocks_unfused(monkeypatch):
    """diffusers before 0.35 lacks what the fused Wan forward calls: quantize packs and warns, the blocks run
    unfused."""
    import builtins
    import sys

    real_import = builtins.__import__

    def failing(name, globals=None, locals=None, fromlist=(), level=0):
        if level and name == "wan_fused" or name.endswith("runtime.wan_fused"):
            raise ImportError("cannot import name 'WanAttention' (stand-in for diffusers 0.34)")
        return real_import(name, globals, locals, fromlist, level)

    monkeypatch.delitem(sys.modules, "treeq_engine.runtime.wan_fused", raising=False)
    monkeypatch.setattr(builtins, "__import__", failing)
    model = perturbed(tiny_wan())
    with pytest.warns(UserWarning, match="Wan blocks stay unfused.*>= 0.35"):
        quantize(model, QuantPlan.block_uniform(model, 4, 8), dtype=torch.float32)
    assert type(model.blocks[0]).__name__ == "WanTransformerBlock"


def test_more_fallbacks_and_a_partly_packed_feed_forward():
    """A hook on a Dropout the fused path would skip runs that part as a module; a feed-forward whose first linear
    is packed and second left in 16 bits keeps its fused LayerNorm + modulate and the model's dtype;
    fuse_qkv_projections() after quantize (a dense copy of packed layers) is an error, not a silent float run."""
    model = perturbed(tiny_wan())
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    kw = call(model, n=2)
    with torch.no_grad():
        want = unfused(**kw).sample
    for part in ("attn1.to_out.1", "ffn.net.1"):
        seen = []
        h = fused.blocks[0].get_submodule(part).register_forward_hook(lambda *a: seen.append(1))
        calls, got = count_kernels(fused, kw)
        h.remove()
        assert seen, part
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    bf16 = perturbed(tiny_wan()).to(torch.bfloat16)
    plan = QuantPlan.block_uniform(bf16, 4, 8).with_layer("blocks.0.ffn.net.2", LayerConfig(16, 16))
    unfused, fused = pair(bf16, plan, dtype=torch.bfloat16)
    kwb = {k: v.to(torch.bfloat16) if v.is_floating_point() and k != "timestep" else v for k, v in kw.items()}
    calls, got = count_kernels(fused, kwb)
    assert calls["ln"] == 4 and got.dtype == torch.bfloat16   # block 0's fc1 still LayerNorm-fused
    with torch.no_grad():
        want = unfused(**kwb).sample.float()
    assert float((got.float() - want).norm() / want.norm()) < 2e-2

    with pytest.raises(RuntimeError, match="leave the projections unfused"):
        fused.fuse_qkv_projections()   # (refused: a dense copy of packed layers)


@pytest.mark.gpu
def test_fused_equals_unfused_on_gpu():
    """The same on the GPU's kernels (CUDA or Triton, whichever the dispatcher picks), bf16, layers in the fragment
    layout: the (6, B, D) float32 modulation in the LayerNorm + modulate kernel, the shared q/k/v codes, GELU and
    fc2's codes in fc1's epilogue, the gated residuals in to_out's and fc2's (bound as for the DiT blocks:
    test_diffusers_fused.py's reasoning; a dropped gate or residual moves the output by half its norm or more)."""
    model = perturbed(tiny_wan())
    plan = QuantPlan.block_uniform(model, 4, 8)
    unfused = quantize(copy.deepcopy(model).cuda(), plan, dtype=torch.bfloat16, fuse=False).to(torch.bfloat16)
    fused = quantize(copy.deepcopy(model).cuda(), plan, dtype=torch.bfloat16).to(torch.bfloat16)
    assert all(isinstance(b, FusedWanTransformerBlock) for b in fused.blocks)
    kw = {k: v.cuda().to(torch.bfloat16) if v.is_floating_point() and k != "timestep" else v.cuda()
          for k, v in call(model, n=2).items()}
    with torch.no_grad():
        a, b = unfused(**kw).sample.float(), fused(**kw).sample.float()
    assert torch.isfinite(b).all()
    assert (b - a).norm() <= 0.08 * a.norm(), f"relative error {float((b - a).norm() / a.norm()):.3g}"
