"""Fused Krea 2 blocks (`runtime/krea2_fused.py`): the fused model equals the unfused packed one (float32, the
reference backend: the zero-centred RMSNorm, its weight and the modulation in the quantization kernel shared by
to_q/to_k/to_v/to_gate and in the one the feed-forward's gate and up share, the feed-forward's gated residual in
down's epilogue, the attention Krea 2's own processor on the kernels' projections, its text mask included), the fused
kernels run, and what the fused path cannot reproduce runs diffusers' own forward."""
import copy

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="diffusers is an optional dependency (requirements-dev.txt)")
krea2 = pytest.importorskip("diffusers.models.transformers.transformer_krea2", reason="diffusers before Krea 2")

from test_mmdit_fused import count_kernels, gpu_fused_matches, half_agrees, pair  # noqa: E402
from test_zimage_fused import another_processor_then_training, close, hooks_cost  # noqa: E402
from tiny_diffusers import perturbed  # noqa: E402
from tinydit import one_thread  # noqa: E402,F401

from treeq_engine.plan import BranchConfig, LayerConfig, QuantPlan  # noqa: E402
from treeq_engine.runtime import quantize  # noqa: E402
from treeq_engine.runtime.krea2_fused import FusedKrea2TransformerBlock  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
# per main block: one RMSNorm-fused quantization for to_q/k/v/gate and one for gate/up, the feed-forward's residual
PER_FORWARD = {"ln": 2 * 2, "gelu": 0, "residual": 2, "codes_out": 0}


def tiny():
    torch.manual_seed(0)
    return perturbed(krea2.Krea2Transformer2DModel(
        in_channels=16, num_layers=2, attention_head_dim=8, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=48, timestep_embed_dim=32, text_hidden_dim=16, num_text_layers=3,
        text_num_attention_heads=2, text_num_key_value_heads=2, text_intermediate_size=32,
        num_layerwise_text_blocks=1, num_refiner_text_blocks=1, axes_dims_rope=(2, 2, 4)).eval())


def call(n=2, hw=(4, 4), text=8, seed=0, dtype=torch.float32, padded=True):
    """Latents as tokens (the pipeline's packing), the text encoder's three layers, the timestep, the rotary
    coordinates (text rows zero), the text mask (the first sample's last three tokens padding)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(n, text, dtype=torch.bool)
    if padded:
        mask[0, text - 3:] = False
    ids = torch.cat([torch.zeros(text, 3), torch.cartesian_prod(*map(torch.arange, (1, *hw))).float()])
    return dict(hidden_states=torch.randn(n, hw[0] * hw[1], 16, generator=g).to(dtype),
                encoder_hidden_states=torch.randn(n, text, 3, 16, generator=g).to(dtype),
                timestep=torch.tensor([0.5, 0.2, 0.9][:n]), position_ids=ids, encoder_attention_mask=mask)


def mixed(model):
    plan = QuantPlan.block_uniform(model, 4, 8)
    return plan.with_layer("transformer_blocks.0.attn.to_k", LayerConfig(16, 16)) \
        .with_layer("transformer_blocks.0.ff.up", LayerConfig(4, 4)) \
        .with_layer("transformer_blocks.1.attn.to_gate", LayerConfig(8, 8, branch=BranchConfig("monarch", 2))) \
        .with_layer("transformer_blocks.1.ff.down", LayerConfig(16, 16)) \
        .with_layer("transformer_blocks.1.ff.gate", LayerConfig(16, 16))


def blocks(model):
    return list(model.transformer_blocks)


@pytest.mark.parametrize("kind", ["W8A8", "W4A8", "mixed"])
def test_fused_equals_unfused(kind):
    """Float32, within 1e-5 relative (measured 2e-7: the kernel multiplies by (1 + w)(1 + scale) once where diffusers
    multiplies twice; a norm's epsilon ten times too large moves it by 1e-3)."""
    model = tiny()
    plan = mixed(model) if kind == "mixed" else QuantPlan.block_uniform(model, int(kind[1]), int(kind[3]))
    unfused, fused = pair(model, plan)
    assert all(type(b) is FusedKrea2TransformerBlock for b in blocks(fused))
    assert fused.state_dict().keys() == unfused.state_dict().keys()
    for kw in (call(), call(n=3, hw=(4, 6), text=5, seed=1, padded=False)):
        with torch.no_grad():
            want, got, fp = unfused(**kw).sample, fused(**kw).sample, model(**kw).sample
        close(got, want, bound=1e-5)
        assert 0 < float((got - fp).norm() / fp.norm()) < 0.3
    if kind == "W4A8":
        assert count_kernels(fused, call())[0] == PER_FORWARD
        assert count_kernels(unfused, call())[0] == {"ln": 0, "gelu": 0, "residual": 0, "codes_out": 0}


def test_the_text_mask_is_read():
    model = tiny()
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    with torch.no_grad():
        got, plain = fused(**call()).sample, fused(**call(padded=False)).sample
        close(got, unfused(**call()).sample)
    assert float((got - plain).norm() / got.norm()) > 1e-3


def test_what_the_fused_path_cannot_run_runs_diffusers_forward():
    model = tiny()
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    kw = call()
    with torch.no_grad():
        want = unfused(**kw).sample
    full = PER_FORWARD["ln"]
    hooks_cost(fused, [(f"transformer_blocks.0.{p}", 2) for p in ("norm1", "norm2", "attn", "attn.to_gate")]
               + [(f"transformer_blocks.0.{p}", 1) for p in ("ff", "ff.up", "ff.down")]
               + [(f"transformer_blocks.0.{p}", 0) for p in ("attn.to_out.0", "attn.norm_q")], kw, want, full, close)
    another_processor_then_training(fused, fused.transformer_blocks[0].attn, krea2.Krea2AttnProcessor, kw, want,
                                    full, 2)

    quantized = copy.deepcopy(model)
    quantize(quantized, QuantPlan.block_uniform(model, 4, 8), dtype=torch.float32, fuse=False)
    quantized.transformer_blocks[0].norm2 = torch.nn.RMSNorm(32)   # (not Krea 2's zero-centred RMSNorm)
    with pytest.raises(ValueError, match="FusedKrea2TransformerBlock handles Krea2TransformerBlock"):
        FusedKrea2TransformerBlock(quantized.transformer_blocks[0])


def test_bf16():
    """bf16 as the checkpoint loads (``_keep_in_fp32_modules``: the RMSNorms' weights stay float32)."""
    model = tiny().to(torch.bfloat16)
    for m in model.modules():
        if isinstance(m, krea2.Krea2RMSNorm):
            m.float()
    half_agrees(model, call(dtype=torch.bfloat16))


@pytest.mark.gpu
def test_fused_equals_unfused_on_gpu():
    gpu_fused_matches(tiny(), call(dtype=torch.bfloat16), PER_FORWARD)
