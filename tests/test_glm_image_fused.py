"""Fused GLM-Image blocks (`runtime/cogview4_fused.py`): what they compute equals the unfused packed model (float32,
the reference backend: each stream's LayerNorm + modulate in the projections' quantization kernel, the attention
GLM-Image's own processor on the kernels' projections, its text mask and KV cache included; the feed-forward's
GELU and gated residual in the epilogues), the fused kernels run, and what the fused path cannot reproduce runs
diffusers' own forward: hooks on the norms or the attention, another processor, training, attention kwargs."""
import copy

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="diffusers is an optional dependency (requirements-dev.txt)")
glm = pytest.importorskip("diffusers.models.transformers.transformer_glm_image", reason="this diffusers has no "
                          "GLM-Image")

from test_cogview4_fused import mixed  # noqa: E402   (the same layer names: the plan of CogView4's test)
from test_mmdit_fused import count_kernels, gpu_fused_matches, half_agrees, pair  # noqa: E402
from test_zimage_fused import another_processor_then_training, exact, hooks_cost  # noqa: E402
from tiny_diffusers import perturbed  # noqa: E402
from tinydit import one_thread  # noqa: E402,F401

from treeq_engine.plan import QuantPlan  # noqa: E402
from treeq_engine.runtime import quantize  # noqa: E402
from treeq_engine.runtime.cogview4_fused import FusedGlmImageTransformerBlock  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
# per block and stream (image, text): one LayerNorm-fused quantization for q/k/v and one for the feed-forward, GELU
# and the next layer's codes in the feed-forward's first epilogue, the feed-forward's gated residual (the
# attention's is diffusers' sum: the processor runs to_out on the joined rows)
PER_FORWARD = {"ln": 2 * 2 * 2, "gelu": 2 * 2, "residual": 2 * 2, "codes_out": 2 * 2}


def tiny():
    torch.manual_seed(0)
    return perturbed(diffusers.GlmImageTransformer2DModel(
        patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        text_embed_dim=8, time_embed_dim=16, condition_dim=8, prior_vq_quantizer_codebook_size=16).eval())


def call(n=2, hw=(8, 8), text=6, seed=0, dtype=torch.float32, padded=False):
    """The pipeline's call: latents, the glyph text, the prior tokens (a 4 × 4 grid of the 8 × 8 latents' patches),
    the timestep and sizes; ``padded``: the first sample's last two text tokens marked padding."""
    g = torch.Generator().manual_seed(seed)
    tokens = (hw[0] // 2) * (hw[1] // 2)
    kw = dict(hidden_states=torch.randn(n, 4, *hw, generator=g).to(dtype),
              encoder_hidden_states=torch.randn(n, text, 8, generator=g).to(dtype),
              prior_token_id=torch.randint(0, 16, (n, tokens), generator=g),
              prior_token_drop=torch.zeros(n, tokens, dtype=torch.bool), timestep=torch.tensor([999.0, 20, 500][:n]),
              target_size=torch.tensor([[64.0, 64.0]] * n), crop_coords=torch.zeros(n, 2))
    if padded:
        mask = torch.ones(n, text)
        mask[0, -2:] = 0
        kw["attention_mask"] = mask
    return kw


@pytest.mark.parametrize("kind", ["W8A8", "W4A8", "mixed"])
def test_fused_equals_unfused(kind):
    model = tiny()
    plan = mixed(model) if kind == "mixed" else QuantPlan.block_uniform(model, int(kind[1]), int(kind[3]))
    unfused, fused = pair(model, plan)
    assert all(type(b) is FusedGlmImageTransformerBlock for b in fused.transformer_blocks)
    assert fused.state_dict().keys() == unfused.state_dict().keys()
    for kw in (call(), call(n=3, hw=(8, 12), text=5, seed=1, padded=True)):
        with torch.no_grad():
            want, got, fp = unfused(**kw).sample, fused(**kw).sample, model(**kw).sample
        exact(got, want)
        assert 0 < float((got - fp).norm() / fp.norm()) < 0.15
    if kind == "W4A8":
        assert count_kernels(fused, call())[0] == PER_FORWARD
        assert count_kernels(unfused, call())[0] == {"ln": 0, "gelu": 0, "residual": 0, "codes_out": 0}


def test_the_kv_cache_is_the_processor_s():
    """Image editing as the pipeline runs it: each condition image written to the KV cache with an empty text (those
    calls run diffusers' forward: no text), then the prompt's call reading it (fused: its kernels run): fused and
    unfused store and read the same, and the cache changes the output."""
    model = tiny()
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    outs = []
    for m in (unfused, fused):
        caches = glm.GlmImageKVCache(2)
        caches.set_mode("write")
        with torch.no_grad():
            for seed in (3, 4):   # (two condition images of one sample: its cache grows)
                image = call(n=1, seed=seed)
                image["encoder_hidden_states"] = image["encoder_hidden_states"][:, :0]
                m(**image, kv_caches=caches)
            caches.set_mode("read")
            kernels, edited = count_kernels(m, dict(call(n=1), kv_caches=caches))
            outs.append([edited, m(**call(n=1)).sample, caches[1].k_caches[0], caches[0].v_caches[0]])
        assert kernels["ln"] == (PER_FORWARD["ln"] if m is fused else 0)
    for a, b in zip(*outs, strict=True):
        exact(b, a)
    assert outs[1][2].shape[1] == 2 * 16   # (both images' 16 tokens)
    assert float((outs[1][0] - outs[1][1]).norm() / outs[1][1].norm()) > 1e-3


def test_what_the_fused_path_cannot_run_runs_diffusers_forward():
    model = tiny()
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    kw = call(padded=True)
    with torch.no_grad():
        want = unfused(**kw).sample
    full = PER_FORWARD["ln"]
    # (a hook on a norm, the attention or a packed projection: that block runs diffusers' forward; on the feed-forward
    # or a packed part of it: each stream's feed-forward runs as the module; on the adaLN linear or the output
    # projection, which run as modules: none)
    hooks_cost(fused, [(f"transformer_blocks.0.{p}", full // 2) for p in (
        "norm1", "norm1.norm", "norm1.norm_context", "norm2_context", "attn1", "attn1.to_k")]
        + [(f"transformer_blocks.0.{p}", 2) for p in ("ff", "ff.net.2")]
        + [(f"transformer_blocks.0.{p}", 0) for p in ("norm1.linear", "attn1.to_out.0")], kw, want, full, exact)
    block = fused.transformer_blocks[0]
    h, c, temb = torch.randn(2, 16, 16), torch.randn(2, 6, 16), torch.randn(2, 16)
    calls = []
    with pytest.MonkeyPatch.context() as mp, torch.no_grad():
        mp.setattr("treeq_engine.runtime.cogview4_fused._project", lambda *a, **k: calls.append(1))
        assert block(h, c, temb, attention_kwargs={"unknown": 1})[0].shape == h.shape   # (diffusers logs it ignores)
    assert not calls
    another_processor_then_training(fused, block.attn1, glm.GlmImageAttnProcessor, kw, want, full, full // 2)

    quantized = copy.deepcopy(model)
    quantize(quantized, QuantPlan.block_uniform(model, 4, 8), dtype=torch.float32, fuse=False)
    quantized.transformer_blocks[0].norm2 = torch.nn.LayerNorm(16)   # (an affine LayerNorm: not the structure)
    with pytest.raises(ValueError, match="FusedGlmImageTransformerBlock handles GlmImageTransformerBlock"):
        FusedGlmImageTransformerBlock(quantized.transformer_blocks[0])


def test_bf16():
    half_agrees(tiny().to(torch.bfloat16), call(dtype=torch.bfloat16, padded=True))


def test_the_float_paths_round_as_diffusers_in_bf16():
    """A fused block over 16-bit layers (built directly: ``quantize`` swaps no block without a packed layer to fuse)
    computes as diffusers' forward does, bit for bit in bf16, a padded text's mask included: the processor on the
    modulated float rows, the attention's gated sums and the feed-forward's float path in the rows' dtype."""
    torch.manual_seed(0)
    block = tiny().to(torch.bfloat16).transformer_blocks[0]
    fused = FusedGlmImageTransformerBlock(copy.deepcopy(block))
    g = torch.Generator().manual_seed(5)
    h, c, temb = (torch.randn(*s, generator=g).bfloat16() for s in ((2, 16, 16), (2, 6, 16), (2, 16)))
    mask = torch.ones(2, 6)
    mask[1, 4:] = 0
    with torch.no_grad():
        calls = []
        with pytest.MonkeyPatch.context() as mp:   # (the fused forward, not diffusers': the processor handed a view)
            mp.setattr(glm.GlmImageTransformerBlock, "forward", lambda *a, **k: calls.append(1))
            got = fused(h, c, temb, None, mask)
        assert not calls
        for a, b in zip(got, block(h, c, temb, None, mask), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.gpu
def test_fused_equals_unfused_on_gpu():
    gpu_fused_matches(tiny(), call(dtype=torch.bfloat16, padded=True), PER_FORWARD)
