"""Fused blocks for diffusers' copies of FLUX.1's blocks (`runtime/mmdit_fused.py`): LongCat-Image's and Bria's
(Flux's classes but for the names; Bria's blocks name the attention's keyword arguments ``attention_kwargs``). Each
equals the unfused packed model (float32, the reference backend), the fused kernels run, and what the fused path
cannot reproduce runs diffusers' own forward."""
import copy

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="diffusers is an optional dependency (requirements-dev.txt)")
pytest.importorskip("diffusers.models.transformers.transformer_longcat_image", reason="diffusers before LongCat-Image")
pytest.importorskip("diffusers.models.transformers.transformer_bria", reason="diffusers before Bria")

from test_mmdit_fused import (another_processor_and_training, count_kernels, flux_style_parts_fall_back,  # noqa: E402
                              gpu_fused_matches, half_agrees, mixed, pair)
from test_mmdit_fused import flux as flux_model  # noqa: E402
from test_search_mmdit import call as flux_call  # noqa: E402
from tiny_diffusers import perturbed  # noqa: E402
from tinydit import one_thread  # noqa: E402,F401

from treeq_engine.plan import LayerConfig, QuantPlan  # noqa: E402
from treeq_engine.runtime import mmdit_fused, quantize  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = ["LongCatImage", "Bria"]
# per double block a LayerNorm-fused quantization per stream for q/k/v and per feed-forward, GELU and the next
# layer's codes in each feed-forward's first epilogue, four gated residuals; per single block one quantization, GELU
# in proj_mlp's epilogue, the gated residual in proj_out's (as Flux's: test_mmdit_fused.py)
PER_FORWARD = {"ln": 2 * 4 + 2 * 1, "gelu": 2 * 2 + 2 * 1, "residual": 2 * 4 + 2 * 1, "codes_out": 2 * 2}


def tiny(name):
    torch.manual_seed(0)
    common = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=8,
                  num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=[2, 2, 4])
    if name == "LongCatImage":
        return perturbed(diffusers.LongCatImageTransformer2DModel(pooled_projection_dim=16, **common)).eval()
    return perturbed(diffusers.BriaTransformer2DModel(pooled_projection_dim=None, guidance_embeds=False,
                                                      **common)).eval()


def call(n=2, seed=0, hw=(4, 4), text=8):
    g = torch.Generator().manual_seed(seed)
    image = hw[0] * hw[1]
    ids = torch.cartesian_prod(torch.zeros(1), torch.arange(hw[0]).float(), torch.arange(hw[1]).float())
    return dict(hidden_states=torch.randn(n, image, 16, generator=g),
                encoder_hidden_states=torch.randn(n, text, 16, generator=g), timestep=torch.tensor([0.5, 0.2][:n]),
                img_ids=ids, txt_ids=torch.zeros(text, 3))


@pytest.mark.parametrize("kind", ["W4A8", "mixed"])
@pytest.mark.parametrize("name", NAMES)
def test_fused_equals_unfused(name, kind):
    model = tiny(name)
    plan = mixed(model) if kind == "mixed" else QuantPlan.block_uniform(model, 4, 8)
    unfused, fused = pair(model, plan)
    assert [type(b).__name__ for b in [*fused.transformer_blocks, *fused.single_transformer_blocks]] == \
        [f"Fused{name}TransformerBlock"] * 2 + [f"Fused{name}SingleTransformerBlock"] * 2
    assert fused.state_dict().keys() == unfused.state_dict().keys()
    for seed, hw in ((0, (4, 4)), (1, (3, 5))):
        kw = call(seed=seed, hw=hw)
        with torch.no_grad():
            want, got, fp = unfused(**kw).sample, fused(**kw).sample, model(**kw).sample
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert 0 < float((got - fp).norm() / fp.norm()) < 0.15
    if kind == "W4A8":
        assert count_kernels(fused, call())[0] == PER_FORWARD
        assert count_kernels(unfused, call())[0] == {"ln": 0, "gelu": 0, "residual": 0, "codes_out": 0}


@pytest.mark.parametrize("name", NAMES)
def test_what_the_fused_path_cannot_run_runs_diffusers_forward(name):
    """Hooks on a block's parts, another processor, training, keyword arguments for the attention: diffusers'
    forward, the same output. A block of a copy is not taken by Flux's fused class."""
    model = tiny(name)
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    kw = call()
    with torch.no_grad():
        want = unfused(**kw).sample
    flux_style_parts_fall_back(fused, kw, want, PER_FORWARD["ln"])

    block, plain = fused.single_transformer_blocks[0], unfused.single_transformer_blocks[0]
    g = torch.Generator().manual_seed(3)
    h, text, temb = torch.randn(2, 16, 16, generator=g), torch.randn(2, 8, 16, generator=g), torch.randn(2, 16)
    keyword = "joint_attention_kwargs" if name == "LongCatImage" else "attention_kwargs"
    with pytest.MonkeyPatch.context() as mp, torch.no_grad():   # (diffusers logs that it ignores them)
        mp.setattr(mmdit_fused, "flux_single", None)   # (the fused path would fail: it must not run)
        for a, b in zip(block(h, text, temb, None, **{keyword: {"unknown": 1}}), plain(h, text, temb, None)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)

    attention = type(fused.transformer_blocks[0].attn.processor)
    another_processor_and_training(fused, fused.transformer_blocks[0].attn, attention, kw, want,
                                   PER_FORWARD["ln"] - 4)

    quantized = copy.deepcopy(model)
    quantize(quantized, QuantPlan.block_uniform(model, 4, 8), dtype=torch.float32, fuse=False)
    with pytest.raises(ValueError, match="FusedFluxTransformerBlock handles .*transformer_flux.FluxTransformerBlock"):
        mmdit_fused.FusedFluxTransformerBlock(quantized.transformer_blocks[0])


@pytest.mark.parametrize("name", NAMES)
def test_a_block_cache_on_a_partly_fused_model(name):
    """diffusers' FirstBlockCache on a model with one double block left unfused (weight-only) and on a fully fused
    one: the second, cached call of the same input returns the first's output. (diffusers 0.42's registry entry for
    Bria's double block names the wrong output; quantize mends it, or the unfused block's output would be read as
    the hidden states: a 95 % error, silently.)"""
    from diffusers.hooks import apply_first_block_cache
    from diffusers.hooks.hooks import CacheContext, _set_cache_context

    model = tiny(name)
    plan = QuantPlan.block_uniform(model, 4, 8)
    for n in ("attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
              "attn.to_out.0", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
              "ff_context.net.2"):
        plan = plan.with_layer(f"transformer_blocks.1.{n}", LayerConfig(4, 16))
    _, partly = pair(model, plan)
    assert type(partly.transformer_blocks[1]).__name__ == f"{name}TransformerBlock"
    kw = call()
    for m in (partly, pair(model, QuantPlan.block_uniform(model, 4, 8))[1]):
        apply_first_block_cache(m, diffusers.FirstBlockCacheConfig(threshold=0.5))
        _set_cache_context(m, CacheContext("test"))   # (what a CacheMixin's cache_context does)
        with torch.no_grad():
            first, again = m(**kw).sample, m(**kw).sample
        torch.testing.assert_close(again, first, rtol=1e-5, atol=1e-5)


def test_an_attention_without_a_processor_falls_back():
    """An attention swapped after quantize for a module without a processor (a wrapper, say): diffusers' forward
    runs it, in Flux's blocks and the copies'."""
    class Wrapped(torch.nn.Module):
        def __init__(self, attn):
            super().__init__()
            self.inner = attn

        def forward(self, *a, **k):
            return self.inner(*a, **k)

    for model in (flux_model(), tiny("Bria")):
        unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
        for m in (unfused, fused):
            for b in (m.transformer_blocks[0], m.single_transformer_blocks[0]):
                b.attn = Wrapped(b.attn)
        kw = flux_call(model, n=2) if model.__class__.__name__.startswith("Flux") else call()
        with torch.no_grad():
            torch.testing.assert_close(fused(**kw).sample, unfused(**kw).sample, rtol=1e-5, atol=1e-5)


def tiny_fibo():
    """Bria FIBO: two double blocks (Flux's) and two single blocks (Flux's on the joint rows, the legacy Attention
    running Bria's processor), each block handed its own text encoder layer."""
    torch.manual_seed(0)
    return perturbed(diffusers.BriaFiboTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, axes_dims_rope=[2, 2, 4], text_encoder_dim=16).eval())


def call_fibo(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    kw = call(seed=seed)
    kw["text_encoder_layers"] = [torch.randn(2, 8, 16, generator=g) for _ in range(4)]
    return {k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else
                [t.to(dtype) for t in v] if isinstance(v, list) else v) for k, v in kw.items()}


def test_bria_fibo():
    """Bria FIBO's double and single blocks fuse: fused equals unfused, the kernels counted, a hooked single block
    norm or another processor on its legacy Attention runs diffusers' forward there, bf16 within its rounding."""
    from diffusers.models.transformers.transformer_bria import BriaAttnProcessor

    model = tiny_fibo()
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    assert [type(b).__name__ for b in fused.transformer_blocks] == ["FusedBriaFiboTransformerBlock"] * 2
    assert [type(b).__name__ for b in fused.single_transformer_blocks] == ["FusedBriaFiboSingleTransformerBlock"] * 2
    assert fused.state_dict().keys() == unfused.state_dict().keys()
    for seed in (0, 1):
        kw = call_fibo(seed)
        calls, got = count_kernels(fused, kw)
        assert calls == PER_FORWARD
        with torch.no_grad():
            want, fp = unfused(**kw).sample, model(**kw).sample
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert 0 < float((got - fp).norm() / fp.norm()) < 0.15
    kw = call_fibo()
    with torch.no_grad():
        want = unfused(**kw).sample
    seen = []
    hook = fused.single_transformer_blocks[1].norm.register_forward_pre_hook(lambda *a: seen.append(1))
    calls, got = count_kernels(fused, kw)
    hook.remove()
    assert seen and calls["ln"] == PER_FORWARD["ln"] - 1
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    another_processor_and_training(fused, fused.single_transformer_blocks[0].attn, BriaAttnProcessor, kw, want,
                                   PER_FORWARD["ln"] - 1)
    fused.eval()
    fused.single_transformer_blocks[0].attn.set_processor(BriaAttnProcessor())

    # the pipeline's padding mask (a prompt shorter than the other's), handed to every block's attention: fused too
    mask = torch.ones(2, 8 + 16, dtype=torch.bool)
    mask[0, 5:8] = False
    masked = dict(kw, joint_attention_kwargs={"attention_mask": mask[:, None, None, :]})
    calls, got = count_kernels(fused, masked)
    with torch.no_grad():
        want = unfused(**masked).sample
    assert calls == PER_FORWARD
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert float((got - fused(**kw).sample).norm() / got.norm()) > 1e-3   # (the mask matters)
    calls, got = count_kernels(fused, dict(kw, joint_attention_kwargs={"ip_hidden_states": None}))
    assert calls["ln"] == 0   # (other keyword arguments: diffusers' forward)
    with torch.no_grad():
        torch.testing.assert_close(got, unfused(**kw).sample, rtol=1e-5, atol=1e-5)
    half_agrees(tiny_fibo().to(torch.bfloat16), call_fibo(dtype=torch.bfloat16), per_forward=PER_FORWARD)


@pytest.mark.parametrize("name", ["Flux"] + NAMES)
def test_a_single_block_handed_no_text_raises_as_diffusers(name):
    """Only Bria FIBO's single blocks take the joint rows alone; Flux's and its copies' raise on no text, fused or
    not (the fused path does not read the image rows as joint ones)."""
    model = flux_model(True) if name == "Flux" else tiny(name)
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    args = (torch.randn(2, 24, 16), None, torch.randn(2, 16))
    for m in (unfused, fused):
        with pytest.raises(AttributeError, match="NoneType"), torch.no_grad():
            m.single_transformer_blocks[0](*args)


@pytest.mark.parametrize("name", NAMES)
def test_bf16(name):
    model = tiny(name).to(torch.bfloat16)
    kw = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in call().items()}
    half_agrees(model, kw)


@pytest.mark.gpu
def test_bria_fibo_on_gpu():
    gpu_fused_matches(tiny_fibo(), call_fibo(dtype=torch.bfloat16), PER_FORWARD)


@pytest.mark.gpu
@pytest.mark.parametrize("name", NAMES)
def test_fused_equals_unfused_on_gpu(name):
    kw = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in call().items()}
    gpu_fused_matches(tiny(name).to(torch.bfloat16), kw, PER_FORWARD)
