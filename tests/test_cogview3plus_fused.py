"""Fused CogView3-Plus blocks (`runtime/cogview4_fused.py`): what they compute equals the unfused packed model
(float32, the reference backend: each stream's LayerNorm + modulate in the quantization kernel, GELU and the gated
residuals in the epilogues, the attention CogVideoX's processor's), the fused kernels run, and what the fused path
cannot reproduce runs diffusers' own forward: hooks on the norms or on anything the two streams share, another
processor, training, a text or emb of another batch or dtype."""
import copy

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="diffusers is an optional dependency (requirements-dev.txt)")

from test_cogview4_fused import mixed  # noqa: E402   (the same layer names: the plan of CogView4's test)
from test_mmdit_fused import count_kernels, gpu_fused_matches, half_agrees, pair  # noqa: E402
from test_zimage_fused import another_processor_then_training, exact, hooks_cost  # noqa: E402
from tiny_diffusers import perturbed  # noqa: E402
from tinydit import one_thread  # noqa: E402,F401

from treeq_engine.plan import QuantPlan  # noqa: E402
from treeq_engine.runtime import quantize  # noqa: E402
from treeq_engine.runtime.cogview4_fused import FusedCogView3PlusTransformerBlock  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
# per block and stream (image, text): one LayerNorm-fused quantization for q/k/v and one for the feed-forward, GELU
# and the next layer's codes in the feed-forward's first epilogue, two gated residuals
PER_FORWARD = {"ln": 2 * 2 * 2, "gelu": 2 * 2, "residual": 2 * 2 * 2, "codes_out": 2 * 2}


def tiny():
    torch.manual_seed(0)
    return perturbed(diffusers.CogView3PlusTransformer2DModel(
        patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2, out_channels=4,
        text_embed_dim=8, time_embed_dim=8, condition_dim=2, pos_embed_max_size=8, sample_size=8).eval())


def call(n=2, hw=(8, 12), text=6, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(n, 4, *hw, generator=g).to(dtype),
                encoder_hidden_states=torch.randn(n, text, 8, generator=g).to(dtype),
                timestep=torch.tensor([500, 20, 900][:n]), original_size=torch.tensor([[64, 64]] * n),
                target_size=torch.tensor([[64, 96]] * n), crop_coords=torch.zeros(n, 2, dtype=torch.long))


@pytest.mark.parametrize("kind", ["W8A8", "W4A8", "mixed"])
def test_fused_equals_unfused(kind):
    model = tiny()
    plan = mixed(model) if kind == "mixed" else QuantPlan.block_uniform(model, int(kind[1]), int(kind[3]))
    unfused, fused = pair(model, plan)
    assert all(type(b) is FusedCogView3PlusTransformerBlock for b in fused.transformer_blocks)
    assert fused.state_dict().keys() == unfused.state_dict().keys()
    for kw in (call(), call(n=3, hw=(12, 8), text=5, seed=1)):
        with torch.no_grad():
            want, got, fp = unfused(**kw).sample, fused(**kw).sample, model(**kw).sample
        exact(got, want)
        assert 0 < float((got - fp).norm() / fp.norm()) < 0.15
    if kind == "W4A8":
        assert count_kernels(fused, call())[0] == PER_FORWARD
        assert count_kernels(unfused, call())[0] == {"ln": 0, "gelu": 0, "residual": 0, "codes_out": 0}


def test_both_streams_of_a_block():
    """The model drops the last block's text output: a block's two outputs compared directly."""
    model = tiny()
    unfused, fused = pair(model, mixed(model))
    g = torch.Generator().manual_seed(5)
    h, c, emb = torch.randn(2, 24, 16, generator=g), torch.randn(2, 6, 16, generator=g), torch.randn(2, 8, generator=g)
    with torch.no_grad():
        for i in (0, 1):
            for a, b in zip(fused.transformer_blocks[i](h, c, emb), unfused.transformer_blocks[i](h, c, emb),
                            strict=True):
                exact(a, b)


def test_what_the_fused_path_cannot_run_runs_diffusers_forward():
    from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0

    model = tiny()
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    kw = call()
    with torch.no_grad():
        want = unfused(**kw).sample
    full = PER_FORWARD["ln"]
    # (a hook on a norm, the attention or what diffusers runs on the joined rows (the projections, the feed-forward):
    # that block runs diffusers' forward; on the adaLN linear, run as the module: none)
    hooks_cost(fused, [(f"transformer_blocks.0.{p}", full // 2) for p in (
        "norm1", "norm1.norm_x", "norm1.norm_c", "norm2_context", "attn1", "ff", "ff.net.0", "attn1.to_k",
        "attn1.to_out.0", "ff.net.2")] + [(f"transformer_blocks.0.norm1.{p}", 0) for p in ("linear", "silu")],
        kw, want, full, exact)
    block, plain = fused.transformer_blocks[0], unfused.transformer_blocks[0]
    g = torch.Generator().manual_seed(6)
    h, c, emb = torch.randn(2, 24, 16, generator=g), torch.randn(2, 6, 16, generator=g), torch.randn(2, 8, generator=g)
    calls = []
    with pytest.MonkeyPatch.context() as mp, torch.no_grad():
        mp.setattr("treeq_engine.runtime.cogview4_fused._cogvideox_attention", lambda *a: calls.append(1))
        # (diffusers broadcasts an emb or a text batch of 1 over the latents'; a float16 emb's modulation is float16)
        for args in ((h, c, emb[:1]), (h, c[:1], emb), (h, c, emb.half())):
            got, want_block = block(*args), plain(*args)
            assert [t.shape for t in got] == [h.shape, c.shape]
            for a, b in zip(got, want_block, strict=True):
                assert a.dtype == b.dtype
                exact(a, b)
    assert not calls
    another_processor_then_training(fused, block.attn1, CogVideoXAttnProcessor2_0, kw, want, full, full // 2)

    quantized = copy.deepcopy(model)
    quantize(quantized, QuantPlan.block_uniform(model, 4, 8), dtype=torch.float32, fuse=False)
    quantized.transformer_blocks[0].norm2 = torch.nn.LayerNorm(16)   # (an affine LayerNorm: not the structure)
    with pytest.raises(ValueError, match="FusedCogView3PlusTransformerBlock handles CogView3PlusTransformerBlock"):
        FusedCogView3PlusTransformerBlock(quantized.transformer_blocks[0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half(dtype):
    half_agrees(tiny().to(dtype), call(dtype=dtype), dtype=dtype)


@pytest.mark.gpu
def test_fused_equals_unfused_on_gpu():
    gpu_fused_matches(tiny(), call(dtype=torch.bfloat16), PER_FORWARD)
