"""Fused PRX blocks (`runtime/prx_fused.py`): the fused model equals the unfused packed one (float32, the reference
backend: LayerNorm + modulate in img_qkv_proj's quantization kernel and in the one gate_proj and up_proj share,
GELU(tanh) in gate_proj's epilogue, the MLP's gated residual in down_proj's, the attention the block's own processor
on the kernels' projection, its text mask included), the fused kernels run, and what the fused path cannot reproduce
runs diffusers' own forward."""
import copy

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="diffusers is an optional dependency (requirements-dev.txt)")
prx = pytest.importorskip("diffusers.models.transformers.transformer_prx", reason="diffusers before PRX")

from test_mmdit_fused import count_kernels, gpu_fused_matches, half_agrees, pair  # noqa: E402
from test_zimage_fused import another_processor_then_training, exact, hooks_cost  # noqa: E402
from tiny_diffusers import perturbed  # noqa: E402
from tinydit import one_thread  # noqa: E402,F401

from treeq_engine.plan import BranchConfig, LayerConfig, QuantPlan  # noqa: E402
from treeq_engine.runtime import quantize  # noqa: E402
from treeq_engine.runtime.prx_fused import FusedPRXBlock  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
# per block: one LayerNorm-fused quantization for img_qkv_proj and one for gate_proj/up_proj, GELU in gate_proj's
# epilogue, the MLP's gated residual in down_proj's
PER_FORWARD = {"ln": 2 * 2, "gelu": 2, "residual": 2, "codes_out": 0}


def tiny():
    torch.manual_seed(0)
    return perturbed(prx.PRXTransformer2DModel(in_channels=16, patch_size=2, context_in_dim=16, hidden_size=32,
                                               mlp_ratio=3.5, num_heads=2, depth=2, axes_dim=[8, 8],
                                               theta=10_000).eval())


def call(n=2, hw=(8, 12), text=8, seed=0, dtype=torch.float32, padded=True):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(n, text, dtype=torch.bool)
    if padded:
        mask[0, text - 3:] = False
    return dict(hidden_states=torch.randn(n, 16, *hw, generator=g).to(dtype),
                encoder_hidden_states=torch.randn(n, text, 16, generator=g).to(dtype),
                timestep=torch.tensor([0.5, 0.2, 0.9][:n]), attention_mask=mask)


def mixed(model):
    plan = QuantPlan.block_uniform(model, 4, 8)
    return plan.with_layer("blocks.0.attention.img_qkv_proj", LayerConfig(16, 16)) \
        .with_layer("blocks.0.up_proj", LayerConfig(4, 4)) \
        .with_layer("blocks.0.down_proj", LayerConfig(16, 16)) \
        .with_layer("blocks.1.gate_proj", LayerConfig(16, 16)) \
        .with_layer("blocks.1.up_proj", LayerConfig(16, 16)) \
        .with_layer("blocks.1.down_proj", LayerConfig(8, 8, branch=BranchConfig("monarch", 2)))


@pytest.mark.parametrize("kind", ["W8A8", "W4A8", "mixed"])
def test_fused_equals_unfused(kind):
    model = tiny()
    plan = mixed(model) if kind == "mixed" else QuantPlan.block_uniform(model, int(kind[1]), int(kind[3]))
    unfused, fused = pair(model, plan)
    assert all(type(b) is FusedPRXBlock for b in fused.blocks)
    assert fused.state_dict().keys() == unfused.state_dict().keys()
    unmasked = dict(call(seed=2), attention_mask=None)
    for kw in (call(), call(n=3, hw=(12, 8), text=5, seed=1, padded=False), unmasked):
        with torch.no_grad():
            want, got, fp = unfused(**kw).sample, fused(**kw).sample, model(**kw).sample
        exact(got, want)
        assert 0 < float((got - fp).norm() / fp.norm()) < 0.3
    if kind == "W4A8":
        assert count_kernels(fused, call())[0] == PER_FORWARD
        assert count_kernels(unfused, call())[0] == {"ln": 0, "gelu": 0, "residual": 0, "codes_out": 0}


def test_a_timestep_of_batch_1_broadcasts_and_fuses():
    """Without guidance the pipeline passes one timestep for all its images: diffusers broadcasts its modulation, and
    so do the fused blocks, their kernels running."""
    model = tiny()
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    kw = dict(call(), timestep=torch.tensor([0.4]))
    calls, got = count_kernels(fused, kw)
    with torch.no_grad():
        exact(got, unfused(**kw).sample)
    assert calls == PER_FORWARD


def test_the_text_mask_is_read():
    model = tiny()
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    with torch.no_grad():
        got, plain = fused(**call()).sample, fused(**call(padded=False)).sample
        exact(got, unfused(**call()).sample)
    assert float((got - plain).norm() / got.norm()) > 1e-4


def test_what_the_fused_path_cannot_run_runs_diffusers_forward():
    model = tiny()
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    kw = call()
    with torch.no_grad():
        want = unfused(**kw).sample
    full = PER_FORWARD["ln"]
    hooks_cost(fused, [(f"blocks.0.{p}", 2) for p in (
        "img_pre_norm", "post_attention_layernorm", "modulation", "mlp_act", "attention", "attention.img_qkv_proj",
        "gate_proj", "down_proj")]
        + [(f"blocks.0.{p}", 0) for p in ("attention.txt_kv_proj", "attention.to_out.0",
                                                      "attention.norm_q", "modulation.lin")], kw, want, full, exact)
    another_processor_then_training(fused, fused.blocks[0].attention, prx.PRXAttnProcessor2_0, kw, want,
                                    full, 2)

    quantized = copy.deepcopy(model)
    quantize(quantized, QuantPlan.block_uniform(model, 4, 8), dtype=torch.float32, fuse=False)
    quantized.blocks[0].mlp_act = torch.nn.GELU()   # (the exact GELU: not the structure)
    with pytest.raises(ValueError, match="FusedPRXBlock handles PRXBlock"):
        FusedPRXBlock(quantized.blocks[0])


def test_bf16():
    half_agrees(tiny().to(torch.bfloat16), call(dtype=torch.bfloat16))


@pytest.mark.gpu
def test_fused_equals_unfused_on_gpu():
    gpu_fused_matches(tiny(), call(dtype=torch.bfloat16), PER_FORWARD)
