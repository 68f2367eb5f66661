"""Fused Kandinsky 6 blocks (`runtime/kandinsky6_fused.py`): the super-resolution transformer's blocks and Kandinsky
6's text and joint video/audio blocks equal the unfused packed model (float32, the reference backend: LayerNorm +
modulate in the quantization kernels, the feed-forwards' gated residuals in their second linears' epilogues, the
attentions the processor's own on the kernels' projections: NABLA sparse attention, a text padding mask, the
cross-modal attentions), the fused kernels run, and what the fused path cannot reproduce runs diffusers' own
forward: hooks, another processor, training."""
import copy

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="diffusers is an optional dependency (requirements-dev.txt)")
k6 = pytest.importorskip("diffusers.models.transformers.transformer_kandinsky6", reason="diffusers before Kandinsky 6")
k6sr = pytest.importorskip("diffusers.models.transformers.transformer_kandinsky6_sr",
                           reason="diffusers before Kandinsky 6")

from diffusers_zoo import CASES  # noqa: E402
from test_mmdit_fused import another_processor_and_training, count_kernels, pair  # noqa: E402
from test_zimage_fused import hooks_cost  # noqa: E402
from tiny_diffusers import perturbed  # noqa: E402
from tinydit import one_thread  # noqa: E402,F401

from treeq_engine.plan import BranchConfig, LayerConfig, QuantPlan  # noqa: E402
from treeq_engine.runtime import quantize  # noqa: E402
from treeq_engine.runtime.kandinsky6_fused import (FusedKandinsky6JointBlock,  # noqa: E402
                                                   FusedKandinsky6SRTransformerBlock,
                                                   FusedKandinsky6TransformerEncoderBlock)

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")]
# SR: two blocks; Kandinsky 6: a video and an audio text block: each one LayerNorm-fused quantization for q/k/v
# and one for the feed-forward, a gated residual in the feed-forward's second linear; and two joint blocks, each per
# stream one for q/k/v, one for the text attention's query, one for the cross-modal query, one for the feed-forward
PER_FORWARD = {"sr": {"ln": 2 * 2, "gelu": 0, "residual": 2, "codes_out": 0},
               "k6": {"ln": 2 * 2 + 2 * 2 * 4, "gelu": 0, "residual": 2 + 2 * 2, "codes_out": 0}}
PER_FORWARD["k6-plain"] = PER_FORWARD["k6"]
BLOCKS = {"sr": "visual_transformer_blocks", "k6": "video_text_transformer_blocks"}
KINDS = ["sr", "k6", "k6-plain"]


def tiny(kind="sr"):
    """The zoo's Kandinsky 6 SR transformer (two blocks) or Kandinsky 6 (a text block per modality, two joint
    video/audio blocks; the zoo's with the cross-modal rotary embedding, cross gates and fixed modulation, "k6-plain"
    without them), random weights perturbed off diffusers' zero initialisations."""
    torch.manual_seed(0)
    if kind == "k6-plain":
        return perturbed(k6.Kandinsky6Transformer3DModel(
            in_visual_dim=4, out_visual_dim=4, in_text_dim=16, in_text_dim2=8, time_dim=16, patch_size=(1, 2, 2),
            model_dim=16, ff_dim=32, num_text_blocks=1, num_visual_blocks=2, axes_dims=(4, 2, 2), visual_cond=True,
            in_audio_dim=4, out_audio_dim=4, text_token_padding=True).eval())
    return perturbed(CASES["Kandinsky6SR" if kind == "sr" else "Kandinsky6"][0]().eval())


def call(kind="sr", seed=0):
    """The zoo's call: SR latents (2, 2, 8, 8, 9) at two timesteps; Kandinsky 6 with audio and a padded prompt."""
    g = torch.Generator().manual_seed(seed)
    return CASES["Kandinsky6SR" if kind == "sr" else "Kandinsky6"][1](lambda *s: torch.randn(*s, generator=g))


def outputs(model, kw):
    """The video and, where there is one, the audio prediction."""
    with torch.no_grad():
        out = model(**kw)
    return [t for t in (out.sample, getattr(out, "audio_sample", None)) if t is not None]


def mixed(model, kind):
    """Block layers at assorted formats: W16, branches (their own quantization calls), to_query at another
    activation spec than to_key/to_value, the rest W4A8."""
    a, b = (f"{BLOCKS[kind]}.0", f"{BLOCKS[kind]}.1") if kind == "sr" else ("video_text_transformer_blocks.0",
                                                                            "audio_text_transformer_blocks.0")
    attn = "self_attention" if kind == "sr" else "attn"
    plan = QuantPlan.block_uniform(model, 4, 8).with_layer(f"{a}.{attn}.to_key", LayerConfig(16, 16)) \
        .with_layer(f"{a}.feed_forward.net.2", LayerConfig(16, 16)) \
        .with_layer(f"{b}.{attn}.to_query", LayerConfig(4, 4)) \
        .with_layer(f"{b}.feed_forward.net.0.proj", LayerConfig(8, 8, branch=BranchConfig("monarch", 2)))
    if kind == "sr":
        return plan
    j0, j1 = "visual_transformer_blocks.0", "visual_transformer_blocks.1"
    return plan.with_layer(f"{j0}.va_cross_attention.to_query", LayerConfig(16, 16)) \
        .with_layer(f"{j0}.video_dec_block.self_attention.to_key", LayerConfig(4, 4)) \
        .with_layer(f"{j0}.audio_dec_block.cross_attention.to_query", LayerConfig(4, 8, branch=BranchConfig("monarch",
                                                                                                          2))) \
        .with_layer(f"{j1}.av_cross_attention.to_query", LayerConfig(8, 8, branch=BranchConfig("monarch", 2))) \
        .with_layer(f"{j1}.audio_dec_block.feed_forward.net.0.proj", LayerConfig(16, 16)) \
        .with_layer(f"{j1}.video_dec_block.feed_forward.net.2", LayerConfig(4, 4))


def _fused_blocks(model):
    return [type(m) for m in model.modules() if type(m).__name__.startswith("Fused")]


@pytest.mark.parametrize("plan", ["W8A8", "W4A8", "mixed"])
@pytest.mark.parametrize("kind", KINDS)
def test_fused_equals_unfused(kind, plan):
    model = tiny(kind)
    layers = mixed(model, kind) if plan == "mixed" else QuantPlan.block_uniform(model, int(plan[1]), int(plan[3]))
    unfused, fused = pair(model, layers)
    cls = FusedKandinsky6SRTransformerBlock if kind == "sr" else FusedKandinsky6TransformerEncoderBlock
    assert _fused_blocks(fused) == [cls, cls] + ([] if kind == "sr" else [FusedKandinsky6JointBlock] * 2)
    assert fused.state_dict().keys() == unfused.state_dict().keys()
    for seed in (0, 1):
        kw = call(kind, seed)
        for got, want, fp in zip(outputs(fused, kw), outputs(unfused, kw), outputs(model, kw), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            assert 0 < float((got - fp).norm() / fp.norm()) < 0.15
    if plan != "mixed":
        assert count_kernels(fused, call(kind))[0] == PER_FORWARD[kind]
        assert count_kernels(unfused, call(kind))[0] == {"ln": 0, "gelu": 0, "residual": 0, "codes_out": 0}


def test_the_joint_blocks_fuse_without_text_blocks():
    """A Kandinsky 6 without text blocks: its joint blocks fuse on their own (the model's blocks are found by their
    class names, the joint block's among them)."""
    torch.manual_seed(0)
    model = perturbed(k6.Kandinsky6Transformer3DModel(
        in_visual_dim=4, out_visual_dim=4, in_text_dim=16, in_text_dim2=8, time_dim=16, patch_size=(1, 2, 2),
        model_dim=16, ff_dim=32, num_text_blocks=0, num_visual_blocks=2, axes_dims=(4, 2, 2), visual_cond=True,
        in_audio_dim=4, out_audio_dim=4, text_token_padding=True).eval())
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    assert _fused_blocks(fused) == [FusedKandinsky6JointBlock] * 2
    for got, want in zip(outputs(fused, call("k6")), outputs(unfused, call("k6")), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["k6", "k6-plain"])
def test_video_without_audio(kind):
    """Without audio the joint blocks run their video stream alone (no cross-modal step): per block the video
    stream's three quantizations, as diffusers skips the audio path."""
    model = tiny(kind)
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    kw = {k: v for k, v in call(kind).items() if k != "audio_hidden_states"}
    calls, got = count_kernels(fused, kw)
    with torch.no_grad():
        torch.testing.assert_close(got, unfused(**kw).sample, rtol=1e-5, atol=1e-5)
    assert calls == {"ln": 2 * 2 + 2 * 3, "gelu": 0, "residual": 2 + 2, "codes_out": 0}


def test_a_text_padding_mask_reaches_the_attention():
    """Kandinsky 6's text blocks hand the prompt's padding mask to the processor: a mask that hides more of the
    second prompt changes the fused output as it changes the unfused one."""
    model = tiny("k6")
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    kw = call("k6")
    kw2 = dict(kw, encoder_attention_mask=torch.arange(12)[None] < torch.tensor([[12], [5]]))
    with torch.no_grad():
        a, b = fused(**kw).sample, fused(**kw2).sample
        torch.testing.assert_close(b, unfused(**kw2).sample, rtol=1e-5, atol=1e-5)
    assert torch.equal(a[0], b[0]) and not torch.allclose(a[1], b[1])


@pytest.mark.parametrize("kind", ["sr", "k6"])
def test_what_the_fused_path_cannot_run_runs_diffusers_forward(kind):
    """The SR block and the text blocks."""
    model = tiny(kind)
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    kw = call(kind)
    with torch.no_grad():
        want = unfused(**kw).sample
    attn, norm, mod = (("self_attention", "self_attention_norm", "visual_modulation") if kind == "sr"
                       else ("attn", "attn_norm", "text_modulation"))
    block = fused.get_submodule(f"{BLOCKS[kind]}.0")
    # a hook on a norm, the modulation, the attention or a projection the kernels run: the block runs diffusers'
    # forward (its two norm-fused quantizations gone); on the feed-forward or a part of it: that part runs as
    # diffusers computes it; on a part the processor runs itself: nothing changes
    hooks_cost(fused, [(f"{BLOCKS[kind]}.0.{p}", fewer) for p, fewer in (
        (norm, 2), ("feed_forward_norm", 2), (mod, 2), (attn, 2), (f"{attn}.to_value", 2), (f"{attn}.to_query", 2),
        ("feed_forward", 1), ("feed_forward.net.0", 1), ("feed_forward.net.0.proj", 1), ("feed_forward.net.1", 1),
        ("feed_forward.net.2", 1), (f"{attn}.out_layer", 0), (f"{attn}.query_norm", 0), (f"{mod}.out_layer", 0))],
        kw, want, PER_FORWARD[kind]["ln"])
    processor = k6sr.Kandinsky6SRAttnProcessor if kind == "sr" else k6.Kandinsky6AttnProcessor
    another_processor_and_training(fused, block.get_submodule(attn), processor, kw, want,
                                   PER_FORWARD[kind]["ln"] - 2)

    quantized = copy.deepcopy(model)
    quantize(quantized, QuantPlan.block_uniform(model, 4, 8), dtype=torch.float32, fuse=False)
    original = quantized.get_submodule(f"{BLOCKS[kind]}.0")
    original.feed_forward_norm = torch.nn.LayerNorm(16)   # (with an affine)
    cls = FusedKandinsky6SRTransformerBlock if kind == "sr" else FusedKandinsky6TransformerEncoderBlock
    with pytest.raises(ValueError, match=f"handles {cls.__mro__[1].__name__}"):
        cls(original)


def test_a_time_embedding_of_another_rank_runs_diffusers_forward_once():
    """A (B, 1, time_dim) time embedding, which diffusers' forward broadcasts: the SR block runs that forward, its
    modulation once (not once for a fused attempt and again)."""
    model = tiny("sr")
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    args = {}
    hook = unfused.visual_transformer_blocks[0].register_forward_pre_hook(lambda m, a: args.setdefault("a", a))
    outputs(unfused, call("sr"))
    hook.remove()
    x, temb, rope, sparse = args["a"]
    got = []
    for model_ in (unfused, fused):
        block = model_.visual_transformer_blocks[0]
        ran = []
        h = block.visual_modulation.out_layer.register_forward_pre_hook(lambda *a: ran.append(1))
        with torch.no_grad():
            got.append(block(x, temb[:, None], rope, sparse))
        h.remove()
        assert len(ran) == 1
    torch.testing.assert_close(got[1], got[0])


def test_what_the_joint_block_cannot_run_runs_diffusers_forward():
    """A hook on a norm, a modulation, an attention or a projection the kernels run: the joint block runs diffusers'
    forward (its eight norm-fused quantizations gone); on a feed-forward or a part of it: that part runs as
    diffusers computes it; on a part the processors run themselves: nothing changes. Audio and video output alike."""
    model = tiny("k6")
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    kw = call("k6")
    with torch.no_grad():
        want = unfused(**kw).sample
    block = "visual_transformer_blocks.0"
    whole = ("video_dec_block.self_attention_norm", "video_dec_block.cross_attention_norm",
             "audio_dec_block.feed_forward_norm", "video_dec_block.visual_modulation",
             "audio_dec_block.visual_modulation", "va_modulation", "av_normalization", "va_normalization",
             "va_cross_attention", "av_cross_attention.to_query", "audio_dec_block.self_attention.to_value",
             "video_dec_block.cross_attention.to_query", "audio_dec_block.cross_attention")
    part = ("video_dec_block.feed_forward", "audio_dec_block.feed_forward.net.0", "video_dec_block.feed_forward.net.2",
            "audio_dec_block.feed_forward.net.1")
    none = ("va_cross_attention.to_key", "av_cross_attention.to_value", "video_dec_block.cross_attention.to_key",
            "audio_dec_block.self_attention.out_layer", "va_modulation.out_layer",
            "video_dec_block.self_attention.key_norm")
    hooks_cost(fused, [(f"{block}.{p}", 8) for p in whole] + [(f"{block}.{p}", 1) for p in part]
               + [(f"{block}.{p}", 0) for p in none], kw, want, PER_FORWARD["k6"]["ln"])
    with torch.no_grad():
        for got, ref in zip(outputs(fused, kw), outputs(unfused, kw), strict=True):
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    joint = fused.get_submodule(block)
    another_processor_and_training(fused, joint.av_cross_attention, k6.Kandinsky6AttnProcessor, kw, want,
                                   PER_FORWARD["k6"]["ln"] - 8)

    quantized = copy.deepcopy(model)
    quantize(quantized, QuantPlan.block_uniform(model, 4, 8), dtype=torch.float32, fuse=False)
    original = quantized.get_submodule(block)
    original.av_normalization = torch.nn.LayerNorm(16)   # (with an affine)
    with pytest.raises(ValueError, match="handles Kandinsky6FusedTransformerDecoderBlock"):
        FusedKandinsky6JointBlock(original)


@pytest.mark.parametrize("kind", KINDS)
def test_bf16(kind):
    model = tiny(kind).to(torch.bfloat16)
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 8, 8), dtype=torch.bfloat16)
    kw = {k: v.to(torch.bfloat16) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
          for k, v in call(kind).items()}
    calls, _ = count_kernels(fused, kw)
    assert calls == PER_FORWARD[kind]
    for got, want in zip(outputs(fused, kw), outputs(unfused, kw), strict=True):
        assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
        assert float((got.float() - want.float()).norm() / want.float().norm()) < 2e-2


def test_the_block_registry_entry():
    """The fused SR block takes diffusers' entry for the original (or the one given the original where diffusers
    has none): a block-level cache hook finds it as it finds the original."""
    from diffusers.hooks._helpers import TransformerBlockRegistry

    fused, original = (TransformerBlockRegistry.get(c) for c in (FusedKandinsky6SRTransformerBlock,
                                                                k6sr.Kandinsky6SRTransformerBlock))
    for field in ("return_hidden_states_index", "return_encoder_hidden_states_index", "hidden_states_argument_name",
                  "encoder_hidden_states_argument_name"):
        assert getattr(fused, field) == getattr(original, field), field
    assert fused.return_hidden_states_index == 0 and fused.return_encoder_hidden_states_index is None


@pytest.mark.gpu
@pytest.mark.parametrize("kind", KINDS)
def test_fused_equals_unfused_on_gpu(kind):
    from test_mmdit_fused import gpu_fused_matches

    kw = {k: v.to(torch.bfloat16) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
          for k, v in call(kind).items()}
    gpu_fused_matches(tiny(kind), kw, PER_FORWARD[kind])
