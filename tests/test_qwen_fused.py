"""Fused Qwen-Image blocks (`runtime/qwen_fused.py`): what they compute equals the unfused packed model (float32,
the reference backend: LayerNorm + modulate in the quantization kernel, GELU and the gated residuals in the
epilogues), the fused kernels actually run, and everything the fused path cannot reproduce runs diffusers' own
forward: hooks, training, another attention processor, the edit models' per-token modulation."""
import copy

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="diffusers is an optional dependency (requirements-dev.txt)")

from test_mmdit_fused import count_kernels, pair  # noqa: E402
from test_search_qwen import call  # noqa: E402
from tiny_diffusers import tiny_qwen  # noqa: E402
from tinydit import one_thread  # noqa: E402,F401

from treeq_engine.plan import BranchConfig, LayerConfig, QuantPlan  # noqa: E402
from treeq_engine.runtime import quantize  # noqa: E402
from treeq_engine.runtime.linear import TreeQLinear  # noqa: E402
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
    for part, ln in (("img_norm1", 4), ("img_norm2", 4), ("txt_norm2", 4), ("txt_mod", 4), ("attn.to_out.1", 4),
                     ("attn.add_k_proj", 4), ("attn.to_out.0", 4), ("attn.to_add_out", 4)):
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
    fused.transformer_blocks[0].attn.set_processor(QwenDoubleStreamAttnProcessor2_0())
    kw_block = dict(hidden_states=torch.randn(2, 24, 32), encoder_hidden_states=torch.randn(2, 7, 32),
                    encoder_hidden_states_mask=None, temb=torch.randn(2, 32), image_rotary_emb=None)
    with pytest.MonkeyPatch.context() as mp, torch.no_grad():   # attention kwargs: diffusers' forward
        n = {"ln": 0}
        orig = type(fused.transformer_blocks[0].attn.to_q).quantize_input
        mp.setattr(type(fused.transformer_blocks[0].attn.to_q), "quantize_input",
                   lambda self, x2, **k: (n.__setitem__("ln", n["ln"] + (k.get("ln_eps") is not None)),
                                          orig(self, x2, **k))[1])
        a = fused.transformer_blocks[0](**kw_block, joint_attention_kwargs={"unused": 1})
        b = unfused.transformer_blocks[0](**kw_block, joint_attention_kwargs={"unused": 1})
        assert n["ln"] == 0
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
    # fusing packed projections would build a dense copy (Qwen's processor would not even read it): refused
    with pytest.raises(RuntimeError, match="leave the projections unfused"):
        fused.transformer_blocks[1].attn.fuse_projections()
    calls, got = count_kernels(fused, kw)
    assert calls["ln"] == 2 * 4
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_the_mixed_plan_runs_fused():
    model = tiny_qwen()
    unfused, fused = pair(model, mixed(model))
    calls, got = count_kernels(fused, call(n=2))
    # block 0: to_k W16 (q, v share one call), img fc2 W16; block 1: to_q at A4 (its own call), branches
    assert calls["ln"] == 10


@pytest.mark.parametrize("kind", ["W4A8", "mixed"])
def test_edit_models_fuse_with_their_per_token_modulation(kind):
    """Qwen-Image-Edit-2511 (``zero_cond_t``): the condition images' tokens are modulated at timestep 0, the
    target's at t; the image stream's modulation reaches the kernels one group per run of rows. Fused equals unfused
    (float32) on edit calls with one and two condition images; the 2509-style call (no ``zero_cond_t``) fuses as
    before."""
    from test_search_qwen import _zero_cond, edit_call

    model = _zero_cond(tiny_qwen())
    plan = mixed(model) if kind == "mixed" else QuantPlan.block_uniform(model, 4, 8)
    unfused, fused = pair(model, plan)
    assert all(type(b).__name__ == "FusedQwenImageTransformerBlock" for b in fused.transformer_blocks)
    scales = []
    orig = TreeQLinear.quantize_input
    for kw in (edit_call(), edit_call(n=1, seed=1, conditions=((2, 4), (4, 2)))):
        with pytest.MonkeyPatch.context() as mp, torch.no_grad():
            mp.setattr(TreeQLinear, "quantize_input",
                       lambda self, x2, **k: scales.append(getattr(k.get("scale"), "shape", None))
                       or orig(self, x2, **k))
            got = fused(**kw).sample
        with torch.no_grad():
            want, fp = unfused(**kw).sample, model(**kw).sample
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert 0 < float((got - fp).norm() / fp.norm()) < 0.15
    # (per-token modulation of the image stream: the first call's two samples of 24 target and 8 condition tokens,
    # grouped by the runs they repeat, 8 rows each)
    assert (2 * (24 + 8) // 8, 32) in scales
    # an edit pipeline's several images per prompt give one img_shapes entry for the batch (a (1, T) modulate
    # index), and a batch-1 timestep: broadcast as diffusers broadcasts them, still fused
    base, _ = count_kernels(fused, edit_call())
    for change in (dict(img_shapes=edit_call()["img_shapes"][:1]), dict(timestep=edit_call()["timestep"][:1])):
        kw = {**edit_call(), **change}
        calls, got = count_kernels(fused, kw)
        assert calls == base and base["ln"] > 0, change
        with torch.no_grad():
            torch.testing.assert_close(got, unfused(**kw).sample, rtol=1e-5, atol=1e-5)
    plain = tiny_qwen()   # 2509-style: the same edit call, one modulation per sample
    unfused, fused = pair(plain, QuantPlan.block_uniform(plain, 4, 8))
    calls, got = count_kernels(fused, edit_call())
    assert calls["ln"] == 2 * 4
    with torch.no_grad():
        torch.testing.assert_close(got, unfused(**edit_call()).sample, rtol=1e-5, atol=1e-5)


def test_a_negative_prompt_call_and_regional_compile_names():
    """The pipeline's negative-prompt call (one text for the batch, no mask) runs fused and as diffusers broadcasts
    it; diffusers finds the fused blocks by name for compile_repeated_blocks and device maps."""
    model = tiny_qwen()
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    kw = call(n=3)
    kw = dict(kw, encoder_hidden_states=kw["encoder_hidden_states"][:1], encoder_hidden_states_mask=None)
    calls, got = count_kernels(fused, kw)
    assert calls["ln"] == 2 * 4
    with torch.no_grad():
        torch.testing.assert_close(got, unfused(**kw).sample, rtol=1e-5, atol=1e-5)

    assert "FusedQwenImageTransformerBlock" in fused._repeated_blocks
    assert "FusedQwenImageTransformerBlock" in fused._no_split_modules


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
    fused.enable_cache(diffusers.FirstBlockCacheConfig(threshold=0.5))
    with torch.no_grad(), fused.cache_context("test"):
        first = fused(**kw).sample.float()
        again = fused(**kw).sample.float()   # the same input: the cache's hit path (the first block's residual)
    assert torch.isfinite(first).all() and torch.isfinite(again).all()
    assert float((again - first).norm() / first.norm()) < 2e-2


@pytest.mark.gpu
@pytest.mark.parametrize("edit", [False, True], ids=["t2i", "edit-2511"])
def test_fused_equals_unfused_on_gpu(edit):
    """The same on the GPU's kernels (CUDA or Triton, whichever the dispatcher picks), bf16, layers in the fragment
    layout (bound as for the DiT blocks: test_diffusers_fused.py's reasoning); and Qwen-Image-Edit-2511's per-token
    modulation on an edit call (a smoke test there: reading the target's modulation for every token moves this tiny
    model by only 2.6 %; the kernels' per-token groups are held exactly by the G = M cases of the kernel tests)."""
    from test_search_qwen import _zero_cond, edit_call

    model = _zero_cond(tiny_qwen()) if edit else tiny_qwen()
    plan = QuantPlan.block_uniform(model, 4, 8)
    unfused = quantize(copy.deepcopy(model).cuda(), plan, dtype=torch.bfloat16, fuse=False).to(torch.bfloat16)
    fused = quantize(copy.deepcopy(model).cuda(), plan, dtype=torch.bfloat16).to(torch.bfloat16)
    assert all(isinstance(b, FusedQwenImageTransformerBlock) for b in fused.transformer_blocks)
    kw = {k: (v.cuda().to(torch.bfloat16) if v.is_floating_point() and k != "timestep" else v.cuda())
          if isinstance(v, torch.Tensor) else v for k, v in (edit_call() if edit else call(n=2)).items()}
    calls, b = count_kernels(fused, kw)
    assert calls == {"ln": 2 * 4, "gelu": 2 * 2, "residual": 2 * 4, "codes_out": 2 * 2}   # fused on the GPU too
    with torch.no_grad():
        a = unfused(**kw).sample.float()
    b = b.float()
    assert torch.isfinite(b).all()
    assert (b - a).norm() <= 0.08 * a.norm(), f"relative error {float((b - a).norm() / a.norm()):.3g}"


def test_a_diffusers_before_0_39_leaves_qwen_blocks_unfused(monkeypatch):
    """Before diffusers 0.39 Qwen's processor ignored the text mask (0.36) or took it through attention kwargs
    (0.37, 0.38): the fused forward, which builds it as 0.39 does, is not swapped in."""
    from treeq_engine.runtime import convert

    monkeypatch.setattr(convert, "_diffusers_version", lambda: (0, 38))
    model = tiny_qwen()
    with pytest.warns(UserWarning, match="Qwen-Image blocks stay unfused.*>= 0.39"):
        quantize(model, QuantPlan.block_uniform(model, 4, 8), dtype=torch.float32)
    assert type(model.transformer_blocks[0]).__name__ == "QwenImageTransformerBlock"


def test_fp16_residuals_clip_as_diffusers_clips_them():
    """In float16, Qwen-Image clips each block's residual streams to fp16's range; the fused block does too. A
    feed-forward blown up past 65504 saturates both streams at the limit, and the fused model still agrees with
    the unfused one (without the clip its next LayerNorm reads inf and the output is NaN)."""
    model = tiny_qwen().to(torch.float16)
    with torch.no_grad():
        for b in model.transformer_blocks:   # (open the gates: diffusers zero-inits the modulation)
            b.img_mod[1].bias.add_(2.0)
            b.txt_mod[1].bias.add_(2.0)
        model.transformer_blocks[0].img_mlp.net[2].weight.mul_(1e4)
        model.transformer_blocks[0].txt_mlp.net[2].weight.mul_(1e4)
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 8, 8), dtype=torch.float16)
    kw = {k: v.to(torch.float16) if isinstance(v, torch.Tensor) and v.is_floating_point() and k != "timestep"
          else v for k, v in call(n=2).items()}
    peaks = []
    fused.transformer_blocks[0].register_forward_hook(lambda mod, args, out: peaks.extend(o.abs().max() for o in out))
    with torch.no_grad():
        want, got = unfused(**kw).sample.float(), fused(**kw).sample.float()
    assert [float(p) for p in peaks] == [65504.0, 65504.0]   # both streams saturated, not inf
    assert torch.isfinite(got).all()
    assert float((got - want).norm() / want.norm()) < 3e-2   # (fp16 rounding, W8A8)
