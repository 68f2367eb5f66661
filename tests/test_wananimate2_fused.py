"""Fused Wan-Animate-2 blocks (`runtime/wananimate2_fused.py`): the fused model equals the unfused packed one
(float32, the reference backend: the float32 LayerNorm + modulate in the quantization kernels of to_q/k/v and
ffn[0], GELU(tanh) and ffn[2]'s codes in ffn[0]'s epilogue, the feed-forward's gated residual in ffn[2]'s, the
self-attention the block's own processor on the kernels' projections) in the reference pass, which writes the KV
cache, and in the generation pass, which reads it; the fused kernels run, and what the fused path cannot reproduce
runs diffusers' own forward."""
import copy

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="diffusers is an optional dependency (requirements-dev.txt)")
wa2 = pytest.importorskip("diffusers.models.transformers.transformer_wan_animate_2", reason="diffusers before "
                          "Wan-Animate-2")

from test_mmdit_fused import count_kernels, pair  # noqa: E402
from test_zimage_fused import close  # noqa: E402
from tiny_diffusers import perturbed  # noqa: E402
from tinydit import one_thread  # noqa: E402,F401

from treeq_engine.plan import BranchConfig, LayerConfig, QuantPlan  # noqa: E402
from treeq_engine.runtime import quantize  # noqa: E402
from treeq_engine.runtime.wananimate2_fused import FusedWanAnimate2TransformerBlock  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
# per block: one LayerNorm-fused quantization for q/k/v and one for ffn[0], GELU and ffn[2]'s codes in ffn[0]'s
# epilogue, the feed-forward's gated residual
PER_FORWARD = {"ln": 2 * 2, "gelu": 2, "residual": 2, "codes_out": 2}


def tiny(**config):
    torch.manual_seed(0)
    return perturbed(wa2.WanAnimate2Transformer3DModel(**dict(
        patch_size=(1, 2, 2), text_len=12, in_dim=12, dim=24, ffn_dim=32, freq_dim=256, text_dim=16, out_dim=4,
        num_heads=2, num_layers=2) | config).eval())


def passes(seed=0, dtype=torch.float32):
    """The reference pass's call (it writes the KV cache) and the generation pass's (it reads it), one cache."""
    g = torch.Generator().manual_seed(seed)

    def r(*s):
        return torch.randn(*s, generator=g).to(dtype)

    cache = wa2.WanAnimate2KVCache(2)
    common = dict(encoder_hidden_states=[r(10, 16)], encoder_hidden_states_image=r(1, 4, 1280), kv_cache=cache)
    reference = dict(common, hidden_states=[r(4, 2, 4, 4)], timestep=torch.tensor([500.0]),
                     condition_latents=[r(8, 2, 4, 4)], kv_cache_mode="extract", seq_len=8,
                     offset_grid_sizes=torch.tensor([[2, 2, 2]]))
    generation = dict(common, hidden_states=[r(4, 2, 4, 4)], timestep=torch.tensor([500.0]),
                      condition_latents=[r(8, 2, 4, 4)], kv_cache_mode="cached", seq_len=8,
                      reference_grid_sizes=torch.tensor([[2, 2, 2]]), origin_len=4, origin_area=[32, 32])
    return reference, generation


def sample(model, kw):
    with torch.no_grad():
        return torch.cat([t.flatten() for t in model(**kw).sample])


class Flat:
    """A model whose ``.sample`` is its list of videos flattened into one tensor (what count_kernels reads)."""

    def __init__(self, model):
        self.m = model

    def __call__(self, **kw):
        return type("Out", (), {"sample": sample(self.m, kw)})()


def mixed(model):
    plan = QuantPlan.block_uniform(model, 4, 8)
    return plan.with_layer("blocks.0.self_attn.to_k", LayerConfig(16, 16)) \
        .with_layer("blocks.0.ffn.2", LayerConfig(16, 16)) \
        .with_layer("blocks.1.self_attn.to_q", LayerConfig(4, 4)) \
        .with_layer("blocks.1.ffn.0", LayerConfig(8, 8, branch=BranchConfig("monarch", 2)))


@pytest.mark.parametrize("kind", ["W8A8", "W4A8", "mixed"])
def test_both_passes_equal_the_unfused_model(kind):
    model = tiny()
    plan = mixed(model) if kind == "mixed" else QuantPlan.block_uniform(model, int(kind[1]), int(kind[3]))
    unfused, fused = pair(model, plan)
    assert all(type(b) is FusedWanAnimate2TransformerBlock for b in fused.blocks)
    for seed in (0, 1):
        (ref_u, gen_u), (ref_f, gen_f) = passes(seed), passes(seed)
        close(sample(fused, ref_f), sample(unfused, ref_u))   # (the reference pass: the caches written)
        for cu, cf in zip(ref_u["kv_cache"].layer_caches, ref_f["kv_cache"].layer_caches, strict=True):
            close(cf.key, cu.key)
        got, want = sample(fused, gen_f), sample(unfused, gen_u)
        close(got, want)
        fp = sample(model, passes(seed)[1] | {"kv_cache": ref_u["kv_cache"]})
        assert 0 < float((got - fp).norm() / fp.norm()) < 0.3
    if kind == "W4A8":
        ref, gen = passes()
        assert count_kernels(fused, ref)[0] == PER_FORWARD
        assert count_kernels(fused, gen)[0] == PER_FORWARD


def test_what_the_fused_path_cannot_run_runs_diffusers_forward():
    model = tiny()
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    ref, gen = passes()
    sample(unfused, ref)
    kw = dict(gen, kv_cache=ref["kv_cache"])
    want = sample(unfused, kw)
    full = PER_FORWARD["ln"]

    flat = Flat(fused)
    for part, fewer in [("blocks.0.norm1", 2), ("blocks.0.self_attn", 2), ("blocks.0.self_attn.to_v", 2),
                        ("blocks.0.ffn", 1), ("blocks.0.ffn.1", 1), ("blocks.0.ffn.2", 1),
                        ("blocks.0.cross_attn", 0), ("blocks.0.self_attn.to_out.0", 0)]:
        seen = []
        hook = fused.get_submodule(part).register_forward_pre_hook(lambda *a: seen.append(1))
        calls, got = count_kernels(flat, kw)
        hook.remove()
        assert seen and calls["ln"] == full - fewer, part
        close(got, want)
    fused.train()   # (diffusers' forward in training mode)
    calls, got = count_kernels(flat, kw)
    assert calls["ln"] == 0
    close(got, want)

    quantized = copy.deepcopy(model)
    quantize(quantized, QuantPlan.block_uniform(model, 4, 8), dtype=torch.float32, fuse=False)
    quantized.blocks[0].ffn[1] = torch.nn.GELU()   # (the exact GELU: not the structure)
    with pytest.raises(ValueError, match="FusedWanAnimate2TransformerBlock handles WanAnimate2TransformerBlock"):
        FusedWanAnimate2TransformerBlock(quantized.blocks[0])


def test_a_strided_reference_and_bf16_as_the_model_loads():
    """The reference tokens on a strided time axis (``refer_stride``: the rotary strides of both passes), in float32;
    then bf16 with the modules diffusers keeps in float32 (the modulation, the norms, the time embedding): the fused
    kernels run in both passes and agree with the unfused model within 2 %; an activation swapped in after fusing
    runs as the module."""
    from treeq_engine.runtime.wananimate2_fused import _feed_forward

    model = tiny(refer_stride=2)
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    (ref_u, gen_u), (ref_f, gen_f) = passes(), passes()
    close(sample(fused, ref_f), sample(unfused, ref_u))
    close(sample(fused, gen_f), sample(unfused, gen_u))

    model16 = tiny().to(torch.bfloat16)
    for name in ("time_embedding", "time_projection"):
        model16.get_submodule(name).float()
    for block in model16.blocks:
        block.modulation.data = block.modulation.data.float()
    unfused, fused = pair(model16, QuantPlan.block_uniform(model16, 8, 8), dtype=torch.bfloat16)
    (ref_u, gen_u), (ref_f, gen_f) = passes(dtype=torch.bfloat16), passes(dtype=torch.bfloat16)
    for (fu, u), (ff, f) in (((unfused, ref_u), (fused, ref_f)), ((unfused, gen_u), (fused, gen_f))):
        want = sample(fu, u).float()
        calls, got = count_kernels(Flat(ff), f)
        assert calls == PER_FORWARD
        assert float((got.float() - want).norm() / want.norm()) < 2e-2
    block = fused.blocks[0]
    block.ffn[1] = torch.nn.SiLU()   # (no GELU(tanh) for the epilogue any more)
    h = torch.randn(1, 8, 24).bfloat16()
    mod = block.modulation + torch.randn(1, 6, 24)
    with torch.no_grad():
        got = _feed_forward(block, h, mod, mod.transpose(0, 1).contiguous())
        want = (h.float() + block.ffn(((block.norm2(h.float()) * (1 + mod[:, 4:5]) + mod[:, 3:4]).type_as(h)))
                .float() * mod[:, 5:6]).type_as(h)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.gpu
def test_fused_equals_unfused_on_gpu():
    """On the GPU's kernels, bf16, W4A8: the reference pass fused (its kernel calls counted) within 8 % of unfused."""
    from test_mmdit_fused import on_gpu

    model = tiny()
    plan = QuantPlan.block_uniform(model, 4, 8)
    unfused = quantize(copy.deepcopy(model).cuda(), plan, dtype=torch.bfloat16, fuse=False).to(torch.bfloat16)
    fused = quantize(copy.deepcopy(model).cuda(), plan, dtype=torch.bfloat16).to(torch.bfloat16)
    ref, _ = passes(dtype=torch.bfloat16)
    kw = on_gpu(ref)
    calls, got = count_kernels(Flat(fused), kw)
    assert calls == PER_FORWARD
    want = sample(unfused, kw).float()
    assert torch.isfinite(got).all() and (got.float() - want).norm() <= 0.08 * want.norm()
