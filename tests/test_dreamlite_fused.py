"""Fused DreamLite blocks (`runtime/dreamlite_fused.py`): the fused model equals the unfused packed one (float32, the
reference backend: each LayerNorm and its affine in the quantization kernel of the projections it feeds, the
feed-forward's residual in its second linear's epilogue, the attentions the processor's own on the kernels'
projections), the fused kernels run, and what the fused path cannot reproduce runs diffusers' own forward."""
import copy

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="diffusers is an optional dependency (requirements-dev.txt)")
dl = pytest.importorskip("diffusers.models.transformers.transformer_2d_dreamlite", reason="diffusers before DreamLite")

from test_mmdit_fused import another_processor_and_training, count_kernels, half_agrees, pair  # noqa: E402
from test_zimage_fused import close, hooks_cost  # noqa: E402
from tiny_diffusers import perturbed  # noqa: E402
from tinydit import one_thread  # noqa: E402,F401

from treeq_engine.plan import BranchConfig, LayerConfig, QuantPlan  # noqa: E402
from treeq_engine.runtime import quantize  # noqa: E402
from treeq_engine.runtime.dreamlite_fused import FusedBasicTransformerBlockDreamLite  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
# two blocks, each a LayerNorm-fused quantization for q/k/v, one for the cross-attention's query (without a
# self-attention: none for q/k/v) and one for the feed-forward; the feed-forward's residual in its second linear
PER_FORWARD = {"ln": 2 * 3, "gelu": 0, "residual": 2, "codes_out": 0}
NO_SELF = {"ln": 2 * 2, "gelu": 0, "residual": 2, "codes_out": 0}


def tiny(self_attention=True, affine=True, activation="geglu"):
    """The zoo's DreamLite transformer (two blocks, q/k RMSNorms; LayerNorms with an affine), random weights."""
    torch.manual_seed(0)
    return perturbed(dl.DreamLiteTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=16, num_layers=2, norm_num_groups=4,
        cross_attention_dim=16, use_linear_projection=True, qk_norm="rms_norm", ff_mult=2,
        use_self_attention=self_attention, norm_elementwise_affine=affine, activation_fn=activation).eval())


def call(seed=0, dtype=torch.float32, n=2):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(n, 16, 8, 8, generator=g).to(dtype),
                encoder_hidden_states=torch.randn(n, 8, 16, generator=g).to(dtype))


def sample(model, kw):
    with torch.no_grad():
        return model(**kw).sample


def mixed(model):
    plan = QuantPlan.block_uniform(model, 4, 8)
    return plan.with_layer("transformer_blocks.0.attn1.to_k", LayerConfig(16, 16)) \
        .with_layer("transformer_blocks.0.ff.net.2", LayerConfig(16, 16)) \
        .with_layer("transformer_blocks.1.attn2.to_q", LayerConfig(4, 4)) \
        .with_layer("transformer_blocks.1.ff.net.0.proj", LayerConfig(8, 8, branch=BranchConfig("monarch", 2)))


@pytest.mark.parametrize("kind", ["W8A8", "W4A8", "mixed"])
@pytest.mark.parametrize("variant", ["dreamlite", "no self-attention", "no affine", "gelu"])
def test_fused_equals_unfused(variant, kind):
    model = tiny(self_attention=variant != "no self-attention", affine=variant != "no affine",
                 activation="gelu" if variant == "gelu" else "geglu")
    plan = mixed(model) if kind == "mixed" and variant != "no self-attention" else \
        QuantPlan.block_uniform(model, int(kind[1]), int(kind[3])) if kind != "mixed" else \
        QuantPlan.block_uniform(model, 4, 8).with_layer("transformer_blocks.0.ff.net.2", LayerConfig(16, 16))
    unfused, fused = pair(model, plan)
    assert all(type(b) is FusedBasicTransformerBlockDreamLite for b in fused.transformer_blocks)
    assert fused.state_dict().keys() == unfused.state_dict().keys()
    for kw in (call(0), call(1, n=1)):
        got, want, fp = sample(fused, kw), sample(unfused, kw), sample(model, kw)
        close(got, want)   # (the LayerNorm's affine folded into the kernel's modulate: codes on a tie may flip)
        assert 0 < float((got - fp).norm() / fp.norm()) < 0.3
    if kind != "mixed":
        expected = NO_SELF if variant == "no self-attention" else PER_FORWARD
        assert count_kernels(fused, call())[0] == expected


def test_a_text_mask_reaches_the_cross_attention():
    """The prompt's padding mask: hiding the second prompt's last tokens changes its sample (not the first's), the
    fused model as the unfused one."""
    model = tiny()
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    kw = call()
    masked = dict(kw, encoder_attention_mask=(torch.arange(8)[None] < torch.tensor([[8], [3]])).float())
    a, b = sample(fused, kw), sample(fused, masked)
    close(b, sample(unfused, masked))
    assert torch.allclose(a[0], b[0]) and not torch.allclose(a[1], b[1], atol=1e-3)


def test_a_cross_attention_without_a_text_reads_the_normalized_rows():
    """attn2 without encoder_hidden_states attends to the block's own normalized rows: its keys and values come from
    the kernel too (one quantization for all three), equal to the unfused block."""
    model = tiny()
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 64, 16, generator=g)
    seen = []
    from treeq_engine.runtime.linear import TreeQLinear

    orig = TreeQLinear.quantize_input
    with pytest.MonkeyPatch.context() as mp, torch.no_grad():
        mp.setattr(TreeQLinear, "quantize_input", lambda self, x2, **k: (seen.append(1) if k.get("ln_eps")
                                                                         else None) or orig(self, x2, **k))
        got = fused.transformer_blocks[0](x)
        want = unfused.transformer_blocks[0](x)
    close(got, want)
    assert len(seen) == 3


def test_what_the_fused_path_cannot_run_runs_diffusers_forward():
    model = tiny()
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    kw = call()
    want = sample(unfused, kw)
    full = PER_FORWARD["ln"]
    hooks_cost(fused, [(f"transformer_blocks.0.{p}", 3) for p in ("norm1", "norm2", "norm3", "attn1", "attn1.to_k",
                                                                  "attn2.to_q", "attn2")]
               + [(f"transformer_blocks.0.{p}", 1) for p in ("ff", "ff.net.0", "ff.net.0.proj", "ff.net.1",
                                                             "ff.net.2")]
               + [(f"transformer_blocks.0.{p}", 0) for p in ("attn1.to_out.0", "attn2.to_k", "attn1.norm_q")],
               kw, want, full, close)
    from diffusers.models.attention_processor import AttnProcessor2_0

    another_processor_and_training(fused, fused.transformer_blocks[0].attn2, AttnProcessor2_0, kw, want, full - 3)

    # a chunked feed-forward: diffusers' forward
    fused.eval()
    fused.transformer_blocks[0].set_chunk_feed_forward(8, 1)
    calls, got = count_kernels(fused, kw)
    assert calls["ln"] == full - 3
    close(got, want)

    quantized = copy.deepcopy(model)
    quantize(quantized, QuantPlan.block_uniform(model, 4, 8), dtype=torch.float32, fuse=False)
    quantized.transformer_blocks[0].norm_type = "ada_norm"
    with pytest.raises(ValueError, match="FusedBasicTransformerBlockDreamLite handles BasicTransformerBlockDreamLite"):
        FusedBasicTransformerBlockDreamLite(quantized.transformer_blocks[0])


def test_bf16():
    half_agrees(tiny().to(torch.bfloat16), call(dtype=torch.bfloat16), per_forward=PER_FORWARD)


@pytest.mark.gpu
def test_fused_equals_unfused_on_gpu():
    from test_mmdit_fused import gpu_fused_matches

    gpu_fused_matches(tiny(), call(dtype=torch.bfloat16), PER_FORWARD)
