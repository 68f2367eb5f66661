"""Fused OmniGen blocks (`runtime/omnigen_fused.py`): the fused model equals the unfused packed one (float32, the
reference backend: the RMSNorms and their weights in the quantization kernels of to_q/to_k/to_v and of
gate_up_proj, the feed-forward's residual in down_proj's epilogue, the attention OmniGen's own processor on the
kernels' projections, the model's mask included), the fused kernels run, and what the fused path cannot reproduce
runs diffusers' own forward."""
import copy

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="diffusers is an optional dependency (requirements-dev.txt)")
omnigen = pytest.importorskip("diffusers.models.transformers.transformer_omnigen", reason="diffusers before OmniGen")

from test_mmdit_fused import count_kernels, gpu_fused_matches, half_agrees, pair  # noqa: E402
from test_zimage_fused import another_processor_then_training, close, hooks_cost  # noqa: E402
from tiny_diffusers import perturbed  # noqa: E402
from tinydit import one_thread  # noqa: E402,F401

from treeq_engine.plan import BranchConfig, LayerConfig, QuantPlan  # noqa: E402
from treeq_engine.runtime import quantize  # noqa: E402
from treeq_engine.runtime.omnigen_fused import FusedOmniGenBlock  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
# per block: one RMSNorm-fused quantization for to_q/k/v and one for gate_up_proj, the feed-forward's residual
PER_FORWARD = {"ln": 2 * 2, "rms": 2 * 2, "gelu": 0, "residual": 2, "codes_out": 0}


def tiny():
    """Two blocks, two query heads sharing one key/value head (grouped-query attention)."""
    torch.manual_seed(0)
    return perturbed(omnigen.OmniGenTransformer2DModel(
        in_channels=4, patch_size=2, hidden_size=16, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=32, num_layers=2, pad_token_id=0, vocab_size=32,
        rope_scaling={"short_factor": [1.0] * 4, "long_factor": [1.0] * 4}, pos_embed_max_size=8,
        time_step_dim=16).eval())


def call(seed=0, dtype=torch.float32, masked=False):
    """Two samples: a prompt of 8 tokens with an input image each, the latents; ``masked``: the second sample's first
    two text tokens hidden from every query (the model's mask, as the processor adds it)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(2, 25, 25)
    if masked:
        mask[1, :, :2] = 0
    return dict(hidden_states=torch.randn(2, 4, 8, 8, generator=g).to(dtype), timestep=torch.tensor([500.0, 20.0]),
                input_ids=torch.arange(1, 17).view(2, 8),
                input_img_latents=[torch.randn(1, 4, 4, 4, generator=g).to(dtype),
                                   torch.randn(1, 4, 4, 4, generator=g).to(dtype)],
                input_image_sizes={0: [(2, 6)], 1: [(2, 6)]}, attention_mask=mask,
                position_ids=torch.arange(25).expand(2, 25))


def mixed(model):
    plan = QuantPlan.block_uniform(model, 4, 8)
    return plan.with_layer("layers.0.self_attn.to_k", LayerConfig(16, 16)) \
        .with_layer("layers.0.mlp.down_proj", LayerConfig(16, 16)) \
        .with_layer("layers.1.self_attn.to_q", LayerConfig(4, 4)) \
        .with_layer("layers.1.mlp.gate_up_proj", LayerConfig(8, 8, branch=BranchConfig("monarch", 2)))


@pytest.mark.parametrize("kind", ["W8A8", "W4A8", "mixed"])
def test_fused_equals_unfused(kind):
    model = tiny()
    plan = mixed(model) if kind == "mixed" else QuantPlan.block_uniform(model, int(kind[1]), int(kind[3]))
    unfused, fused = pair(model, plan)
    assert all(type(b) is FusedOmniGenBlock for b in fused.layers)
    assert fused.state_dict().keys() == unfused.state_dict().keys()
    for kw in (call(), call(seed=1, masked=True), dict(call(seed=2), attention_mask=None)):
        with torch.no_grad():
            want, got, fp = unfused(**kw).sample, fused(**kw).sample, model(**kw).sample
        close(got, want, bound=1e-5)
        assert 0 < float((got - fp).norm() / fp.norm()) < 0.3
    if kind == "W4A8":
        assert count_kernels(fused, call(), rms=True)[0] == PER_FORWARD
        assert count_kernels(unfused, call())[0] == {"ln": 0, "gelu": 0, "residual": 0, "codes_out": 0}


def test_the_mask_is_read():
    model = tiny()
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    with torch.no_grad():
        got, plain = fused(**call(masked=True)).sample, fused(**call()).sample
        close(got, unfused(**call(masked=True)).sample, bound=1e-5)
    assert float((got - plain).norm() / got.norm()) > 1e-4


def test_what_the_fused_path_cannot_run_runs_diffusers_forward():
    model = tiny()
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    kw = call()
    with torch.no_grad():
        want = unfused(**kw).sample
    full = PER_FORWARD["ln"]
    hooks_cost(fused, [(f"layers.0.{p}", 2) for p in ("input_layernorm", "post_attention_layernorm", "self_attn",
                                                       "self_attn.to_k")]
               + [(f"layers.0.{p}", 1) for p in ("mlp", "mlp.gate_up_proj", "mlp.down_proj", "mlp.activation_fn")]
               + [("layers.0.self_attn.to_out.0", 0)], kw, want, full, close)
    another_processor_then_training(fused, fused.layers[0].self_attn, omnigen.OmniGenAttnProcessor2_0, kw, want,
                                    full, 2)

    quantized = copy.deepcopy(model)
    quantize(quantized, QuantPlan.block_uniform(model, 4, 8), dtype=torch.float32, fuse=False)
    quantized.layers[0].post_attention_layernorm = torch.nn.LayerNorm(16)   # (not an RMSNorm)
    with pytest.raises(ValueError, match="FusedOmniGenBlock handles OmniGenBlock"):
        FusedOmniGenBlock(quantized.layers[0])


def test_bf16():
    half_agrees(tiny().to(torch.bfloat16), call(dtype=torch.bfloat16))


def test_norms_in_another_dtype_run_diffusers_forward():
    """float32 norm weights in a bf16 model: diffusers' RMSNorm promotes the rows to float32, and so the block's
    output; the fused block leaves that to diffusers' forward (its output, its dtype)."""
    model = tiny().to(torch.bfloat16)
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 8, 8), dtype=torch.bfloat16)
    for m in (unfused, fused):
        for block in m.layers:
            block.input_layernorm.float()
            block.post_attention_layernorm.float()
    g = torch.Generator().manual_seed(3)
    h = torch.randn(2, 10, 16, generator=g).bfloat16()
    rotary = fused.rope(h, torch.arange(10).expand(2, 10))
    calls, seen = count_kernels_of(fused.layers[0], h, rotary)
    got, want = seen, unfused.layers[0](h, None, rotary)
    assert calls == 0 and got.dtype == want.dtype == torch.float32
    close(got, want, bound=1e-5)


def count_kernels_of(block, h, rotary):
    from treeq_engine.runtime.linear import TreeQLinear

    calls = []
    orig = TreeQLinear.quantize_input
    with pytest.MonkeyPatch.context() as mp, torch.no_grad():
        mp.setattr(TreeQLinear, "quantize_input", lambda self, x2, **k: calls.append(k.get("ln_eps")) or orig(
            self, x2, **k))
        out = block(h, None, rotary)
    return sum(e is not None for e in calls), out


@pytest.mark.gpu
def test_fused_equals_unfused_on_gpu():
    gpu_fused_matches(tiny(), call(dtype=torch.bfloat16), PER_FORWARD)
