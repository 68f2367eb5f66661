"""Fused blocks for diffusers' copies of Wan's block (`runtime/wan_fused.py`): ChronoEdit's and Wan-Animate's (Wan's
classes to the line, in their own modules) and SkyReels-V2's (its self-attention takes the block's mask: diffusion
forcing's causal one between blocks of frames; a timestep per frame arrives as a (B, 6, S, D) table). Each equals
the unfused packed model (float32, the reference backend), the fused kernels run, and what the fused path cannot
reproduce runs diffusers' own forward, mask and all."""
import copy

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="diffusers is an optional dependency (requirements-dev.txt)")
pytest.importorskip("diffusers.models.transformers.transformer_skyreels_v2", reason="diffusers before SkyReels-V2")
pytest.importorskip("diffusers.models.transformers.transformer_chronoedit", reason="diffusers before ChronoEdit")

from test_mmdit_fused import (another_processor_and_training, count_kernels, gpu_fused_matches,  # noqa: E402
                              half_agrees, pair)
from test_wan_fused import mixed  # noqa: E402
from tiny_diffusers import perturbed  # noqa: E402
from tinydit import one_thread  # noqa: E402,F401

from treeq_engine.plan import LayerConfig, QuantPlan  # noqa: E402
from treeq_engine.runtime import wan_fused  # noqa: E402
from treeq_engine.runtime.diffusers_fused import per_token_modulation  # noqa: E402
from treeq_engine.runtime.linear import TreeQLinear  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

PER_FORWARD = {"ln": 2 * 2, "gelu": 2, "residual": 2 * 2, "codes_out": 2}   # (two blocks, as Wan's)


def _wan_like(cls, **extra):
    return cls(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
               text_dim=16, freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True,
               qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=32, **extra)


def tiny(name, causal=False, **extra):
    torch.manual_seed(0)
    if name == "ChronoEdit":
        return perturbed(_wan_like(diffusers.ChronoEditTransformer3DModel, **extra)).eval()
    return perturbed(_wan_like(diffusers.SkyReelsV2Transformer3DModel,
                               **({"num_frame_per_block": 2} if causal else {}), **extra)).eval()


def call(n=2, frames=4, seed=0, per_frame=False):
    """A call on (n, 4, frames, 8, 6) latents (frames x 4 x 3 tokens); ``per_frame``: SkyReels-V2's diffusion
    forcing, a timestep per latent frame (frames in pairs share one)."""
    g = torch.Generator().manual_seed(seed)
    kw = dict(hidden_states=torch.randn(n, 4, frames, 8, 6, generator=g),
              encoder_hidden_states=torch.randn(n, 12, 16, generator=g), timestep=torch.tensor([500, 20][:n]))
    if per_frame:
        steps = torch.tensor([[900, 900, 600, 600, 300, 300][:frames], [800, 800, 400, 400, 10, 10][:frames]][:n])
        kw.update(timestep=steps, enable_diffusion_forcing=True)
    return kw


def fused_class(name):
    return getattr(wan_fused, "FusedChronoEditTransformerBlock" if name == "ChronoEdit" else
                   "FusedSkyReelsV2TransformerBlock")


@pytest.mark.parametrize("kind", ["W4A8", "mixed"])
@pytest.mark.parametrize("name", ["ChronoEdit", "SkyReelsV2"])
def test_fused_equals_unfused(name, kind):
    model = tiny(name)
    plan = mixed(model) if kind == "mixed" else QuantPlan.block_uniform(model, 4, 8)
    unfused, fused = pair(model, plan)
    assert all(type(b) is fused_class(name) for b in fused.blocks)
    assert fused.state_dict().keys() == unfused.state_dict().keys()
    for seed, frames in ((0, 4), (1, 2)):
        kw = call(seed=seed, frames=frames)
        with torch.no_grad():
            want, got, fp = unfused(**kw).sample, fused(**kw).sample, model(**kw).sample
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert 0 < float((got - fp).norm() / fp.norm()) < 0.15
    if kind == "W4A8":
        calls, _ = count_kernels(fused, call())
        assert calls == PER_FORWARD


def test_diffusion_forcing_runs_its_mask_and_a_group_per_frame():
    """SkyReels-V2 with blocks of two frames and a timestep per frame: the self-attention gets the causal mask
    (between blocks of frames), the (B, 6, S, D) modulation reaches the kernels one group per run of equal
    timesteps (two frames of 12 tokens), and the fused model equals the unfused one, with or without a hook
    (diffusers' forward then runs, handed the mask)."""
    model = tiny("SkyReelsV2", causal=True)
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    kw = call(per_frame=True)
    masks, scales = [], []
    attention, quantize_input = wan_fused._self_attention, TreeQLinear.quantize_input
    with pytest.MonkeyPatch.context() as mp, torch.no_grad():
        mp.setattr(wan_fused, "_self_attention", lambda *a: masks.append(a[-1]) or attention(*a))
        mp.setattr(TreeQLinear, "quantize_input",
                   lambda self, x2, **k: scales.append(getattr(k.get("scale"), "shape", None))
                   or quantize_input(self, x2, **k))
        got = fused(**kw).sample
        want = unfused(**kw).sample
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    tokens = 4 * 4 * 3
    assert len(masks) == 2 and all(m is not None and m.shape[-2:] == (tokens, tokens) and not m.all() for m in masks)
    assert scales.count((2 * 2, 16)) == 2 * 2   # (q/k/v and the feed-forward of both blocks: 2 samples x 2 groups)
    _, unmasked = pair(tiny("SkyReelsV2"), QuantPlan.block_uniform(model, 4, 8))   # (the same weights, no mask)
    with torch.no_grad():   # (the mask and the timesteps both matter)
        assert float((got - unmasked(**kw).sample).norm() / got.norm()) > 1e-2
        assert float((got - fused(**call()).sample).norm() / got.norm()) > 1e-2
    seen = []
    h = fused.blocks[0].norm1.register_forward_hook(lambda *a: seen.append(1))
    calls, again = count_kernels(fused, kw)
    h.remove()
    assert seen and calls["ln"] == 2
    torch.testing.assert_close(again, want, rtol=1e-5, atol=1e-5)


def test_what_the_fused_path_cannot_run_runs_diffusers_forward():
    """Another processor, training, a table the fused path does not read (chunks broadcast along the tokens):
    diffusers' forward, the same output. A block of one family is not taken by another family's fused class."""
    from diffusers.models.transformers.transformer_skyreels_v2 import SkyReelsV2AttnProcessor

    model = tiny("SkyReelsV2", causal=True)
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    kw = call(per_frame=True)
    with torch.no_grad():
        want = unfused(**kw).sample
    another_processor_and_training(fused, fused.blocks[0].attn1, SkyReelsV2AttnProcessor, kw, want, 2)

    fused.eval()
    block, plain = fused.blocks[1], unfused.blocks[1]
    g = torch.Generator().manual_seed(3)
    h, text = torch.randn(2, 48, 16, generator=g), torch.randn(2, 12, 16, generator=g)
    temb = torch.randn(2, 6, 1, 16, generator=g)   # (B, 6, 1, D): diffusers broadcasts it over the tokens
    calls = []
    with pytest.MonkeyPatch.context() as mp, torch.no_grad():
        mp.setattr(wan_fused, "per_token_modulation", lambda *a, **k: calls.append(1))
        torch.testing.assert_close(block(h, text, temb, None, None), plain(h, text, temb, None, None),
                                   rtol=1e-5, atol=1e-5)
    assert not calls

    chrono = tiny("ChronoEdit")
    quantized = copy.deepcopy(chrono)
    from treeq_engine.runtime import quantize
    quantize(quantized, QuantPlan.block_uniform(chrono, 4, 8), dtype=torch.float32, fuse=False)
    with pytest.raises(ValueError, match="FusedWanTransformerBlock handles .*transformer_wan.WanTransformerBlock"):
        wan_fused.FusedWanTransformerBlock(quantized.blocks[0])   # (ChronoEdit's own copy of the class)
    with pytest.raises(ValueError, match="token_dim 3"):
        per_token_modulation(lambda i: h, 96, runs_of=temb, token_dim=3)


def _image(n=2):
    return torch.randn(n, 5, 16, generator=torch.Generator().manual_seed(7))


PER_SAMPLE_RUNS = torch.tensor([[900, 800, 700, 600], [900, 900, 900, 900]])   # (runs that differ by sample)
VARIANTS = {   # name: (model, call)
    "SkyReelsV2, a causal mask, a timestep per sample": (lambda: tiny("SkyReelsV2", causal=True), lambda: call()),
    "SkyReelsV2, runs of timesteps that differ by sample": (
        lambda: tiny("SkyReelsV2", causal=True), lambda: {**call(per_frame=True), "timestep": PER_SAMPLE_RUNS}),
    "SkyReelsV2, fps": (lambda: tiny("SkyReelsV2", inject_sample_info=True), lambda: {**call(), "fps": [1]}),
    "SkyReelsV2, fps, diffusion forcing": (lambda: tiny("SkyReelsV2", causal=True, inject_sample_info=True),
                                           lambda: {**call(per_frame=True), "fps": [1]}),
    "SkyReelsV2, image to video, diffusion forcing": (
        lambda: tiny("SkyReelsV2", causal=True, image_dim=16, added_kv_proj_dim=16),
        lambda: {**call(per_frame=True), "encoder_hidden_states": torch.randn(2, 512, 16),
                 "encoder_hidden_states_image": _image()}),
    "ChronoEdit, a timestep per token": (
        lambda: tiny("ChronoEdit"), lambda: {**call(), "timestep": torch.tensor([[0] * 12 + [500] * 36,
                                                                                 [0] * 12 + [20] * 36])}),
    "ChronoEdit, image to video": (
        lambda: tiny("ChronoEdit", image_dim=16, added_kv_proj_dim=16),
        lambda: {**call(), "encoder_hidden_states": torch.randn(2, 512, 16), "encoder_hidden_states_image": _image()}),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_the_models_variants(variant):
    """The calls and configurations these models take besides the plain one (diffusion forcing's samples, fps,
    image to video's image tokens, a timestep per token): fused equals unfused, every block fused."""
    build, make = VARIANTS[variant]
    model = build()
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    assert all(type(b).__name__.startswith("Fused") for b in fused.blocks)
    kw = make()
    with torch.no_grad():
        torch.testing.assert_close(fused(**kw).sample, unfused(**kw).sample, rtol=1e-5, atol=1e-5)


def test_a_parametrized_block_and_the_block_registry():
    """A block that torch's parametrize subclasses at run time still finds its family; diffusers' FirstBlockCache
    takes the unfused, the fused and a partly fused SkyReels-V2 alike (diffusers has no entry for its block: the
    fused class's is given to the original too) and runs on them."""
    from diffusers.hooks import apply_first_block_cache
    from diffusers.hooks.hooks import CacheContext, _set_cache_context
    from torch.nn.utils import parametrize

    class Same(torch.nn.Module):
        def forward(self, x):
            return x

    model = tiny("SkyReelsV2", causal=True)
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    kw = call(per_frame=True)
    for m in (unfused, fused):
        parametrize.register_parametrization(m.blocks[0], "scale_shift_table", Same())
    with torch.no_grad():
        torch.testing.assert_close(fused(**kw).sample, unfused(**kw).sample, rtol=1e-5, atol=1e-5)

    plan = QuantPlan.block_uniform(model, 4, 8)
    for n in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ffn.net.0.proj", "ffn.net.2"):
        plan = plan.with_layer(f"blocks.1.{n}", LayerConfig(4, 16))
    _, partly = pair(model, plan)
    assert [type(b).__name__ for b in partly.blocks] == ["FusedSkyReelsV2TransformerBlock",
                                                         "SkyReelsV2TransformerBlock"]
    for m in (pair(model, plan)[0], partly, pair(model, QuantPlan.block_uniform(model, 4, 8))[1]):
        apply_first_block_cache(m, diffusers.FirstBlockCacheConfig(threshold=0.05))
        _set_cache_context(m, CacheContext("test"))   # (what a CacheMixin's cache_context does)
        with torch.no_grad():
            first, again = m(**kw).sample, m(**kw).sample
        assert torch.isfinite(first).all() and float((again - first).norm() / first.norm()) < 2e-2


def tiny_animate():
    """Wan-Animate: two Wan blocks (its own copy of the classes), the motion and face encoders, a face adapter after
    every block."""
    torch.manual_seed(0)
    return perturbed(diffusers.WanAnimateTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=12, latent_channels=4,
        out_channels=4, text_dim=16, freq_dim=256, ffn_dim=32, num_layers=2, image_dim=16, rope_max_seq_len=32,
        motion_encoder_channel_sizes={"4": 8, "8": 8}, motion_encoder_size=8, motion_style_dim=16, motion_dim=4,
        motion_encoder_dim=16, face_encoder_hidden_dim=16, face_encoder_num_heads=2,
        inject_face_latents_blocks=1)).eval()


def call_animate(seed=0, dtype=torch.float32):
    """Latents with the reference and mask channels (2·4 + 4), the text, the image embedding, the pose latents (a
    frame fewer) and the face crops."""
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(2, 12, 2, 8, 8, generator=g).to(dtype), timestep=torch.tensor([500, 20]),
                encoder_hidden_states=torch.randn(2, 12, 16, generator=g).to(dtype),
                encoder_hidden_states_image=torch.randn(2, 4, 16, generator=g).to(dtype),
                pose_hidden_states=torch.randn(2, 4, 1, 8, 8, generator=g).to(dtype),
                face_pixel_values=torch.randn(2, 3, 1, 8, 8, generator=g).to(dtype))


def test_wan_animate():
    """Wan-Animate's blocks (its copy of Wan's; the image cross-attention and the face adapters between blocks stay
    diffusers' own): fused equals unfused, the kernels counted, bf16 within its rounding."""
    model = tiny_animate()
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    assert [type(b).__name__ for b in fused.blocks] == ["FusedWanAnimateTransformerBlock"] * 2
    for seed in (0, 1):
        kw = call_animate(seed)
        calls, got = count_kernels(fused, kw)
        assert calls == PER_FORWARD
        with torch.no_grad():
            want, fp = unfused(**kw).sample, model(**kw).sample
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert 0 < float((got - fp).norm() / fp.norm()) < 0.15
    half_agrees(tiny_animate().to(torch.bfloat16), call_animate(dtype=torch.bfloat16))


def tiny_vace(**extra):
    """WanVACE: two Wan blocks, each with a VACE block beside it (the first with its input projection)."""
    torch.manual_seed(0)
    return perturbed(_wan_like(diffusers.WanVACETransformer3DModel, vace_layers=[0, 1], vace_in_channels=12,
                               **extra)).eval()


def call_vace(n=2, seed=0, dtype=torch.float32):
    """``call``'s latents, text and timestep, and the control latents (12 channels, as many frames)."""
    g = torch.Generator().manual_seed(seed + 10)
    kw = call(n=n, seed=seed)
    kw["control_hidden_states"] = torch.randn(n, 12, 4, 8, 6, generator=g)
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in kw.items()}


def test_wan_vace():
    """WanVACE's control blocks (Wan's block on the control rows; the first VACE block's input projection and every
    block's hint projection run as diffusers' modules) fuse beside the main blocks: fused equals unfused for uniform
    and mixed plans, the kernels counted, a hook on a control block's norm or another processor runs its diffusers
    forward, and bf16 agrees within its rounding."""
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    model = tiny_vace()
    plan = mixed(model).with_layer("vace_blocks.0.attn1.to_v", LayerConfig(16, 16)) \
        .with_layer("vace_blocks.1.ffn.net.2", LayerConfig(4, 4)).with_layer("vace_blocks.0.proj_in", LayerConfig(4, 4))
    for p in (QuantPlan.block_uniform(model, 4, 8), plan):
        unfused, fused = pair(model, p)
        assert [type(b).__name__ for b in fused.vace_blocks] == ["FusedWanVACETransformerBlock"] * 2
        assert fused.state_dict().keys() == unfused.state_dict().keys()
        for seed in (0, 1):
            kw = call_vace(seed=seed)
            with torch.no_grad():
                want, got, fp = unfused(**kw).sample, fused(**kw).sample, model(**kw).sample
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            assert 0 < float((got - fp).norm() / fp.norm()) < 0.15
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    kw = call_vace()
    calls, want = count_kernels(fused, kw)
    assert calls == {k: 2 * v for k, v in PER_FORWARD.items()}   # (the main blocks' and the control blocks')
    seen = []
    hooks = [fused.vace_blocks[1].norm3.register_forward_pre_hook(lambda *a: seen.append(1)),
             fused.vace_blocks[0].proj_in.register_forward_pre_hook(lambda *a: seen.append(2)),
             fused.vace_blocks[1].proj_out.register_forward_pre_hook(lambda *a: seen.append(3))]
    calls, got = count_kernels(fused, kw)
    for h in hooks:
        h.remove()
    assert sorted(seen) == [1, 2, 3] and calls["ln"] == 2 * PER_FORWARD["ln"] - 2
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    another_processor_and_training(fused, fused.vace_blocks[0].attn1, WanAttnProcessor, kw, want,
                                   2 * PER_FORWARD["ln"] - 2)
    half_agrees(tiny_vace().to(torch.bfloat16), call_vace(dtype=torch.bfloat16),
                per_forward={k: 2 * v for k, v in PER_FORWARD.items()})


@pytest.mark.parametrize("name", ["ChronoEdit", "SkyReelsV2"])
def test_bf16(name):
    model = tiny(name).to(torch.bfloat16)
    kw = {k: v.to(torch.bfloat16) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
          for k, v in call(per_frame=name == "SkyReelsV2").items()}
    half_agrees(model, kw)


@pytest.mark.gpu
def test_wan_vace_on_gpu():
    gpu_fused_matches(tiny_vace(), call_vace(dtype=torch.bfloat16), {k: 2 * v for k, v in PER_FORWARD.items()})


@pytest.mark.gpu
def test_wan_animate_on_gpu():
    gpu_fused_matches(tiny_animate(), call_animate(dtype=torch.bfloat16), PER_FORWARD)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["ChronoEdit", "SkyReelsV2"])
def test_fused_equals_unfused_on_gpu(name):
    model = tiny(name, causal=name == "SkyReelsV2")
    kw = {k: v.to(torch.bfloat16) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
          for k, v in call(per_frame=name == "SkyReelsV2").items()}
    gpu_fused_matches(model.to(torch.bfloat16), kw, PER_FORWARD)
