"""Fused Z-Image blocks (`runtime/zimage_fused.py`): what they compute equals the unfused packed model (float32, the
reference backend: RMSNorm, its weight and the modulation in the quantization kernel) up to float rounding, the
fused kernels actually run, and everything the fused path cannot reproduce runs diffusers' own forward (or, for a
feed-forward, diffusers' computation of it): hooks, training, another attention processor, Omni's per-token
modulation."""
import copy

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="diffusers is an optional dependency (requirements-dev.txt)")

from test_mmdit_fused import count_kernels, pair  # noqa: E402
from test_search_zimage import call  # noqa: E402
from tiny_diffusers import tiny_zimage  # noqa: E402
from tinydit import one_thread  # noqa: E402,F401

from treeq_engine.plan import BranchConfig, LayerConfig, QuantPlan  # noqa: E402
from treeq_engine.runtime import quantize  # noqa: E402
from treeq_engine.runtime.linear import TreeQLinear  # noqa: E402
from treeq_engine.runtime.zimage_fused import FusedZImageTransformerBlock  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

BLOCKS = ("noise_refiner.0", "context_refiner.0", "layers.0", "layers.1")


def blocks(model):
    return [model.get_submodule(n) for n in BLOCKS]


def mixed(model):
    """Block layers at assorted formats: W16 (the float paths), a branch (its own quantization call), to_q at
    another activation spec than to_k/to_v (no shared call), the rest W4A8."""
    plan = QuantPlan.block_uniform(model, 4, 8)
    return plan.with_layer("layers.0.attention.to_k", LayerConfig(16, 16)) \
        .with_layer("layers.0.feed_forward.w3", LayerConfig(16, 16)) \
        .with_layer("layers.1.attention.to_q", LayerConfig(4, 4)) \
        .with_layer("layers.1.feed_forward.w1", LayerConfig(4, 8, branch=BranchConfig("monarch", 2))) \
        .with_layer("context_refiner.0.attention.to_v", LayerConfig(8, 8, branch=BranchConfig("monarch", 2)))


def output(model, kw):
    with torch.no_grad():
        return torch.stack(model(**kw).sample)


def close(got, want, bound=1e-3):
    """Fused and unfused agree to float rounding: the kernel scales the normed row by w·(1 + scale) in one multiply
    where diffusers uses two, so a code sitting on a rounding tie may go the other way. Measured: most cases agree to
    1e-7 (relative), the worst to 4e-4; a dropped gate, norm or modulation moves the output by far more."""
    got, want = (torch.stack(t) if isinstance(t, list) else t for t in (got, want))   # (Z-Image returns a list)
    err = float((got - want).norm() / want.norm())
    assert err < bound, f"relative error {err:.3g}"


def hooks_cost(fused, parts, kw, want, full, check=close):
    """A hook on each of ``parts`` in turn, ``(module name in fused, fused quantizations it costs)``: the hook fires,
    one forward makes ``full`` less that many norm-fused quantizations, and the output stays ``want`` (``check``)."""
    seen = []
    for part, fewer in parts:
        h = fused.get_submodule(part).register_forward_pre_hook(lambda *a: seen.append(1))
        calls, got = count_kernels(fused, kw)
        h.remove()
        assert seen and calls["ln"] == full - fewer, part
        check(got, want)
        seen.clear()


def exact(got, want):
    """Fused and unfused equal within 1e-5 (the blocks whose fused path rounds as diffusers does)."""
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def another_processor_then_training(fused, attn, processor, kw, want, full, fewer):
    """``attn`` given a subclass of ``processor`` (which computes what it likes): its block runs diffusers' forward
    (``fewer`` norm-fused quantizations less than ``full``); in training mode none are left; the output stays
    ``want`` (``close``)."""
    attn.set_processor(type("OtherProcessor", (processor,), {})())
    calls, got = count_kernels(fused, kw)
    assert calls["ln"] == full - fewer
    close(got, want)
    fused.train()
    calls, got = count_kernels(fused, kw)
    assert calls["ln"] == 0
    close(got, want)


@pytest.mark.parametrize("kind", ["W8A8", "W4A8", "mixed"])
def test_fused_equals_unfused(kind):
    model = tiny_zimage()
    plan = mixed(model) if kind == "mixed" else QuantPlan.block_uniform(model, int(kind[1]), int(kind[3]))
    unfused, fused = pair(model, plan)
    assert all(isinstance(b, FusedZImageTransformerBlock) for b in blocks(fused))
    assert fused.state_dict().keys() == unfused.state_dict().keys()
    for lens, hw, seed in (((7, 40, 3), (8, 12), 0), ((5, 5, 5), (10, 6), 1)):   # padded captions, then none
        kw = call(lens, hw, seed)
        want, got, fp = output(unfused, kw), output(fused, kw), output(model, kw)
        close(got, want)
        assert 0 < float((got - fp).norm() / fp.norm()) < 0.4


def test_the_fused_kernels_run():
    """Per block: one RMSNorm-fused quantization for q/k/v and one for w1/w3 (the context refiner's without a
    modulation); to_out and w2 quantize their own inputs; no epilogue fusions."""
    model = tiny_zimage()
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    kw = call()
    calls, _ = count_kernels(fused, kw, rms=True)
    assert calls == {"ln": 4 * 2, "gelu": 0, "residual": 0, "codes_out": 0, "rms": 4 * 2}
    calls, _ = count_kernels(unfused, kw)
    assert calls == {"ln": 0, "gelu": 0, "residual": 0, "codes_out": 0}


def test_what_the_fused_path_cannot_run_runs_diffusers_forward():
    from diffusers.models.transformers.transformer_z_image import ZSingleStreamAttnProcessor

    model = tiny_zimage()
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    kw = call()
    want = output(unfused, kw)
    seen = []
    layer = fused.layers[0]
    # a hook on a norm the kernel computes, on the attention or on a projection the kernels run: diffusers' forward
    for part in ("attention_norm1", "ffn_norm1", "attention", "attention.to_k"):
        h = layer.get_submodule(part).register_forward_pre_hook(lambda *a: seen.append(1))
        calls, got = count_kernels(fused, kw)
        h.remove()
        assert seen and calls["ln"] == 8 - 2, part
        close(got, want)
        seen.clear()
    # a hook on the feed-forward, or on w3: it runs as a module, the attention stays fused
    for part in ("feed_forward", "feed_forward.w3"):
        h = layer.get_submodule(part).register_forward_hook(lambda *a: seen.append(1))
        calls, got = count_kernels(fused, kw)
        h.remove()
        assert seen and calls["ln"] == 8 - 1, part
        close(got, want)
        seen.clear()
    # hooks on what the fused path calls as modules (the sandwich norms, to_out, w2) see their calls, fused or not
    for part in ("attention_norm2", "ffn_norm2", "attention.to_out.0", "feed_forward.w2"):
        h = layer.get_submodule(part).register_forward_hook(lambda *a: seen.append(1))
        calls, got = count_kernels(fused, kw)
        h.remove()
        assert seen and calls["ln"] == 8, part
        close(got, want)
        seen.clear()

    class OtherProcessor(ZSingleStreamAttnProcessor):   # a subclass computes what it likes: not the fused path's
        pass

    layer.attention.set_processor(OtherProcessor())
    calls, got = count_kernels(fused, kw)
    assert calls["ln"] == 8 - 2
    close(got, want)
    fused.train()
    calls, got = count_kernels(fused, kw)
    assert calls["ln"] == 0
    close(got, want)


def test_per_token_modulation_fuses():
    """Z-Image Omni modulates noisy and clean tokens apart (``noise_mask``): the fused block runs its kernels with a
    modulation group per run of tokens sharing one (here the first half of each sample noisy: 2 groups a sample; a
    random mask: a group a token; samples whose runs differ: groups the gcd of every run's bounds long; all noisy: one
    a sample) and returns what the unfused block returns; the global modulation fuses too."""
    model = tiny_zimage()
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    g = torch.Generator().manual_seed(3)
    b, s, d = 2, 10, 32
    x = torch.randn(b, s, d, generator=g)
    mask = torch.ones(b, s, dtype=torch.bool)
    freqs = torch.polar(torch.ones(b, s, 8), torch.randn(b, s, 8, generator=g))
    halves = torch.zeros(b, s, dtype=torch.long)
    halves[:, : s // 2] = 1
    noisy, clean = torch.randn(b, 32, generator=g), torch.randn(b, 32, generator=g)
    orig = TreeQLinear.quantize_input
    apart = torch.zeros(b, s, dtype=torch.bool)   # (each sample its own runs: 4 clean then noisy; 6 noisy then clean)
    apart[0, 4:], apart[1, :6] = True, True
    for noise_mask, groups in ((halves, 2 * b), ((torch.rand(b, s, generator=g) > 0.5).long(), b * s),
                               (apart, b * 5), (torch.ones(b, s, dtype=torch.long), b)):
        args = (x, mask, freqs, None, noise_mask, noisy, clean)
        calls = []
        with pytest.MonkeyPatch.context() as mp, torch.no_grad():
            mp.setattr(TreeQLinear, "quantize_input", lambda self, x2, **k: calls.append(k) or orig(self, x2, **k))
            got = fused.layers[0](*args)
            want = unfused.layers[0](*args)
        fused_calls = [k for k in calls if k.get("rms_norm")]
        assert len(fused_calls) == 2 and all(k["scale"].shape == (groups, d) for k in fused_calls)
        close(got, want)
    with torch.no_grad():
        close(fused.layers[0](x, mask, freqs, noisy), unfused.layers[0](x, mask, freqs, noisy))


def test_fallbacks_on_an_older_diffusers_and_strided_rows(monkeypatch):
    """diffusers before 0.37 has no Omni arguments in the block's forward: the fallback passes only what it takes. A
    batch-1 input whose rows are strided (a transposed view) runs, as the unfused block does. An RMSNorm with eps 0
    (which the kernel does not take) leaves its block unfused."""
    from diffusers.models.transformers.transformer_z_image import ZImageTransformerBlock

    model = tiny_zimage()
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 32, 10, generator=g).transpose(1, 2)   # (1, 10, 32), strided rows
    freqs = torch.polar(torch.ones(1, 10, 8), torch.randn(1, 10, 8, generator=g))
    t = torch.randn(1, 32, generator=g)
    with torch.no_grad():
        want = unfused.layers[0](x, None, freqs, t)
        close(fused.layers[0](x, None, freqs, t), want)
    original = ZImageTransformerBlock.forward

    def forward_036(self, x, attn_mask, freqs_cis, adaln_input=None):   # diffusers 0.36's signature
        return original(self, x, attn_mask, freqs_cis, adaln_input)

    monkeypatch.setattr(ZImageTransformerBlock, "forward", forward_036)
    fused.train()   # (falls back to the block's own forward)
    with torch.no_grad():
        assert torch.equal(fused.layers[0](x, None, freqs, t), want)
    small = tiny_zimage()
    small.layers[0].ffn_norm1.eps = 0.0
    plan = QuantPlan.block_uniform(small, 4, 8)
    q = quantize(copy.deepcopy(small), plan, dtype=torch.float32)
    assert type(q.layers[0]).__name__ == "ZImageTransformerBlock" and isinstance(q.layers[1],
                                                                                 FusedZImageTransformerBlock)


def test_only_blocks_with_something_to_fuse_are_swapped():
    model = tiny_zimage()
    fused = quantize(copy.deepcopy(model), QuantPlan.block_uniform(model, 4, 16), dtype=torch.float32)
    assert not any(isinstance(b, FusedZImageTransformerBlock) for b in blocks(fused))   # weight-only: nothing to fuse
    plan = QuantPlan.block_uniform(model, 4, 8)
    for n in ("attention.to_q", "attention.to_k", "attention.to_v", "feed_forward.w1", "feed_forward.w3"):
        plan = plan.with_layer(f"layers.0.{n}", LayerConfig(4, 16))
    fused = quantize(copy.deepcopy(model), plan, dtype=torch.float32)
    assert type(fused.layers[0]).__name__ == "ZImageTransformerBlock"
    assert isinstance(fused.layers[1], FusedZImageTransformerBlock)
    assert "FusedZImageTransformerBlock" in fused._repeated_blocks   # (compile_repeated_blocks finds them)


def test_bf16_and_the_block_registry():
    """In bf16 the fused model is as close to the float32 packed model as the unfused bf16 model is (this random
    tiny model's bf16 rounding moves either by about 3 %, and the two by 2 % from each other: the kernel keeps the
    normed rows in float32 where diffusers rounds them to bf16 twice); diffusers' block hooks find the fused class
    in their registry under the original's entry."""
    from diffusers.hooks._helpers import TransformerBlockRegistry

    plan = QuantPlan.block_uniform(tiny_zimage(), 8, 8)
    ref, _ = pair(tiny_zimage(), plan)
    model = tiny_zimage().to(torch.bfloat16)
    unfused, fused = pair(model, plan, dtype=torch.bfloat16)
    want = output(ref, call())
    a, b = output(unfused, call(dtype=torch.bfloat16)), output(fused, call(dtype=torch.bfloat16))
    assert b.dtype == torch.bfloat16
    err_a, err_b = (float((t.float() - want).norm() / want.norm()) for t in (a, b))
    assert err_b < 1.25 * err_a and err_b < 0.05, (err_a, err_b)
    assert TransformerBlockRegistry.get(FusedZImageTransformerBlock).return_hidden_states_index == 0


@pytest.mark.gpu
def test_fused_equals_unfused_on_gpu():
    """The same on the GPU's kernels (CUDA or Triton, whichever the dispatcher picks), bf16, layers in the fragment
    layout: the RMSNorm + weight + modulate kernel shared by q/k/v and by w1/w3 (bound as for the Wan blocks: a
    dropped gate, norm or modulation moves the output by half its norm or more)."""
    model = tiny_zimage()
    plan = QuantPlan.block_uniform(model, 4, 8)
    unfused = quantize(copy.deepcopy(model).cuda(), plan, dtype=torch.bfloat16, fuse=False).to(torch.bfloat16)
    fused = quantize(copy.deepcopy(model).cuda(), plan, dtype=torch.bfloat16).to(torch.bfloat16)
    assert all(isinstance(b, FusedZImageTransformerBlock) for b in blocks(fused))
    kw = call(dtype=torch.bfloat16)
    kw = {"x": [t.cuda() for t in kw["x"]], "t": kw["t"].cuda(), "cap_feats": [t.cuda() for t in kw["cap_feats"]]}
    a, b = output(unfused, kw).float(), output(fused, kw).float()
    assert torch.isfinite(b).all()
    assert (b - a).norm() <= 0.08 * a.norm(), f"relative error {float((b - a).norm() / a.norm()):.3g}"
