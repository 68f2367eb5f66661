"""Fused Ovis-Image blocks (`runtime/ovis_fused.py`): FLUX.1's double and single blocks with SwiGLU feed-forwards.
The fused model equals the unfused packed one (float32, the reference backend), the fused kernels run, and what the
fused path cannot reproduce runs diffusers' own forward: hooks, another processor, training."""
import copy

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="diffusers is an optional dependency (requirements-dev.txt)")
pytest.importorskip("diffusers.models.transformers.transformer_ovis_image", reason="diffusers before Ovis-Image")

from test_mmdit_fused import (another_processor_and_training, count_kernels, flux_style_parts_fall_back,  # noqa: E402
                              gpu_fused_matches, half_agrees, mixed, pair)
from test_zimage_fused import exact, hooks_cost  # noqa: E402
from tiny_diffusers import perturbed  # noqa: E402
from tinydit import one_thread  # noqa: E402,F401

from treeq_engine.plan import QuantPlan  # noqa: E402
from treeq_engine.runtime import mmdit_fused, ovis_fused, quantize  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
# per double block a LayerNorm-fused quantization per stream for q/k/v and per feed-forward, two gated residuals per
# stream; per single block one quantization for proj_mlp and q/k/v, the gated residual in proj_out's; SwiGLU runs
# between the kernels (no GELU epilogue, no next layer's codes)
PER_FORWARD = {"ln": 2 * 4 + 2 * 1, "gelu": 0, "residual": 2 * 4 + 2 * 1, "codes_out": 0}


def tiny():
    torch.manual_seed(0)
    return perturbed(diffusers.OvisImageTransformer2DModel(
        patch_size=1, in_channels=4, out_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(2, 2, 4)).eval())


def call(n=2, seed=0, hw=(4, 4), text=8, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    ids = torch.cartesian_prod(torch.zeros(1), torch.arange(hw[0]).float(), torch.arange(hw[1]).float())
    return dict(hidden_states=torch.randn(n, hw[0] * hw[1], 4, generator=g).to(dtype),
                encoder_hidden_states=torch.randn(n, text, 16, generator=g).to(dtype),
                timestep=torch.tensor([0.5, 0.2][:n]).to(dtype), img_ids=ids, txt_ids=torch.zeros(text, 3))


@pytest.mark.parametrize("kind", ["W8A8", "W4A8", "mixed"])
def test_fused_equals_unfused(kind):
    model = tiny()
    plan = mixed(model) if kind == "mixed" else QuantPlan.block_uniform(model, int(kind[1]), int(kind[3]))
    unfused, fused = pair(model, plan)
    assert [type(b).__name__ for b in [*fused.transformer_blocks, *fused.single_transformer_blocks]] == \
        ["FusedOvisImageTransformerBlock"] * 2 + ["FusedOvisImageSingleTransformerBlock"] * 2
    assert fused.state_dict().keys() == unfused.state_dict().keys()
    for seed, hw, n in ((0, (4, 4), 2), (1, (3, 5), 1)):
        kw = call(n=n, seed=seed, hw=hw)
        with torch.no_grad():
            want, got, fp = unfused(**kw).sample, fused(**kw).sample, model(**kw).sample
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert 0 < float((got - fp).norm() / fp.norm()) < 0.15
    if kind != "mixed":
        assert count_kernels(fused, call())[0] == PER_FORWARD
        assert count_kernels(unfused, call())[0] == {"ln": 0, "gelu": 0, "residual": 0, "codes_out": 0}


def test_what_the_fused_path_cannot_run_runs_diffusers_forward():
    """Hooks on a block's parts (a hooked feed-forward or its SwiGLU runs as diffusers computes it), another
    processor, training: the same output. Flux's fused classes do not take Ovis-Image's blocks."""
    model = tiny()
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    kw = call()
    with torch.no_grad():
        want = unfused(**kw).sample
    flux_style_parts_fall_back(fused, kw, want, PER_FORWARD["ln"])
    # (a hooked feed-forward runs as diffusers computes it: one norm-fused quantization fewer)
    hooks_cost(fused, [(f"transformer_blocks.1.{p}", 1) for p in ("ff", "ff_context.net.0", "ff.net.0.activation",
                                                                  "ff.net.0.proj", "ff_context.net.2")],
               kw, want, PER_FORWARD["ln"], exact)
    attention = type(fused.transformer_blocks[0].attn.processor)
    another_processor_and_training(fused, fused.transformer_blocks[0].attn, attention, kw, want,
                                   PER_FORWARD["ln"] - 4)

    # the attention's keyword arguments: diffusers' forward (the fused path would fail: it must not run)
    block, plain = fused.single_transformer_blocks[0], unfused.single_transformer_blocks[0]
    g = torch.Generator().manual_seed(3)
    h, text, temb = torch.randn(2, 16, 16, generator=g), torch.randn(2, 8, 16, generator=g), torch.randn(2, 16)
    with pytest.MonkeyPatch.context() as mp, torch.no_grad():
        mp.setattr(mmdit_fused, "flux_single", None)
        mp.setattr(ovis_fused, "flux_single", None)
        for a, b in zip(block(h, text, temb, None, {"unknown": 1}), plain(h, text, temb, None)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)

    quantized = copy.deepcopy(model)
    quantize(quantized, QuantPlan.block_uniform(model, 4, 8), dtype=torch.float32, fuse=False)
    for cls, block in ((mmdit_fused.FusedFluxTransformerBlock, quantized.transformer_blocks[0]),
                       (mmdit_fused.FusedFluxSingleTransformerBlock, quantized.single_transformer_blocks[0]),
                       (ovis_fused.FusedOvisImageSingleTransformerBlock, quantized.transformer_blocks[0]),
                       (ovis_fused.FusedOvisImageTransformerBlock, quantized.single_transformer_blocks[0])):
        with pytest.raises(ValueError, match=f"{cls.__name__} handles"):
            cls(block)


def test_half_precision():
    """bf16 and float16 within their rounding; in float16 the single block's output clips to float16's range, as
    diffusers' does (rows near float16's largest value and gates of ten or so: unclipped, the sums overflow)."""
    half_agrees(tiny().to(torch.bfloat16), call(dtype=torch.bfloat16))
    half_agrees(tiny().to(torch.float16), call(dtype=torch.float16), dtype=torch.float16)
    model = tiny().to(torch.float16)
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 8, 8), dtype=torch.float16)
    g = torch.Generator().manual_seed(1)
    h, text = ((6.5e4 * torch.randn(2, n, 16, generator=g)).clamp(-65504, 65504).half() for n in (16, 8))
    temb = (10 * torch.randn(2, 16, generator=g)).half()
    with torch.no_grad():
        got = fused.single_transformer_blocks[0](h, text, temb, None)
        want = unfused.single_transformer_blocks[0](h, text, temb, None)
    assert any((w.abs() == 65504).any() for w in want)   # (diffusers clipped something)
    for a, b in zip(got, want):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


@pytest.mark.gpu
def test_fused_equals_unfused_on_gpu():
    gpu_fused_matches(tiny(), call(dtype=torch.bfloat16), PER_FORWARD)
