"""Fused Sana-Video blocks (`runtime/sana_fused.py`): what they compute equals the unfused packed model (float32, the
reference backend: LayerNorm + modulate in the quantization kernels of q/k/v and of the feed-forward's inverted 1x1
convolution, the gated residual in to_out's epilogue, the rotary linear attention the processor's, the temporal
convolution after the point convolution), with a timestep per sample and per token (image to video), the fused
kernels run, and what the fused path cannot reproduce runs diffusers' own forward: hooks, training, another
processor, a timestep of another dtype or batch."""
import copy

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="diffusers is an optional dependency (requirements-dev.txt)")
pytest.importorskip("diffusers.models.transformers.transformer_sana_video", reason="this diffusers has no Sana-Video")

from test_mmdit_fused import count_kernels, gpu_fused_matches, half_agrees, pair  # noqa: E402
from test_zimage_fused import another_processor_then_training, exact, hooks_cost  # noqa: E402
from tiny_diffusers import perturbed  # noqa: E402
from tinydit import one_thread  # noqa: E402,F401

from treeq_engine.plan import BranchConfig, LayerConfig, QuantPlan  # noqa: E402
from treeq_engine.runtime import quantize  # noqa: E402
from treeq_engine.runtime.sana_fused import FusedSanaVideoTransformerBlock  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
# per block: one LayerNorm-fused quantization for q/k/v and one for the inverted convolution, to_out's gated residual
PER_FORWARD = {"ln": 2 * 2, "gelu": 0, "residual": 2, "codes_out": 0}


def tiny():
    torch.manual_seed(0)
    return perturbed(diffusers.SanaVideoTransformer3DModel(
        in_channels=16, out_channels=16, num_attention_heads=2, attention_head_dim=12, num_layers=2,
        num_cross_attention_heads=2, cross_attention_head_dim=12, cross_attention_dim=24, caption_channels=16,
        mlp_ratio=2.5, sample_size=8, patch_size=(1, 2, 2), norm_elementwise_affine=False, norm_eps=1e-6,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32).eval())


def call(n=2, frames=3, hw=(8, 12), seed=0, dtype=torch.float32, i2v=False, ragged=False):
    """The pipeline's call; ``i2v``: image to video's timestep per token, 0 on the first (conditioning) frame;
    ``ragged``: per token, 0 on the first half of the first frame's tokens (runs that are not whole frames)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.tensor([500.0, 20, 900][:n])
    if i2v or ragged:
        mask = torch.zeros(n, 1, frames, hw[0] // 2, hw[1] // 2)
        if ragged:
            mask[:, :, 0, : hw[0] // 4] = 1
        else:
            mask[:, :, 0] = 1
        t = t.view(n, 1, 1, 1, 1) * (1 - mask)
    return dict(hidden_states=torch.randn(n, 16, frames, *hw, generator=g).to(dtype),
                encoder_hidden_states=torch.randn(n, 5, 16, generator=g).to(dtype), timestep=t.to(dtype))


def mixed(model):
    """Block layers at assorted formats: W16 (the float paths), branches (their own quantization calls), to_q at
    another activation spec than to_k/to_v, the rest W4A8."""
    plan = QuantPlan.block_uniform(model, 4, 8)
    return plan.with_layer("transformer_blocks.0.attn1.to_k", LayerConfig(16, 16)) \
        .with_layer("transformer_blocks.0.ff.conv_inverted", LayerConfig(16, 16)) \
        .with_layer("transformer_blocks.0.attn1.to_out.0", LayerConfig(16, 16)) \
        .with_layer("transformer_blocks.1.ff.conv_point", LayerConfig(4, 16)) \
        .with_layer("transformer_blocks.1.attn1.to_q", LayerConfig(4, 4)) \
        .with_layer("transformer_blocks.1.ff.conv_inverted", LayerConfig(4, 8, branch=BranchConfig("monarch", 2))) \
        .with_layer("transformer_blocks.1.attn1.to_v", LayerConfig(8, 8, branch=BranchConfig("monarch", 2)))


@pytest.mark.parametrize("kind", ["W8A8", "W4A8", "mixed"])
def test_fused_equals_unfused(kind):
    model = tiny()
    plan = mixed(model) if kind == "mixed" else QuantPlan.block_uniform(model, int(kind[1]), int(kind[3]))
    unfused, fused = pair(model, plan)
    assert all(type(b) is FusedSanaVideoTransformerBlock for b in fused.transformer_blocks)
    assert fused.state_dict().keys() == unfused.state_dict().keys()
    for kw in (call(), call(n=3, frames=2, hw=(12, 8), seed=1), call(i2v=True), call(ragged=True)):
        with torch.no_grad():
            want, got, fp = unfused(**kw).sample, fused(**kw).sample, model(**kw).sample
        exact(got, want)
        assert 0 < float((got - fp).norm() / fp.norm()) < 0.15
    if kind == "W4A8":
        for kw in (call(), call(i2v=True)):
            assert count_kernels(fused, kw)[0] == PER_FORWARD
            assert count_kernels(unfused, kw)[0] == {"ln": 0, "gelu": 0, "residual": 0, "codes_out": 0}


def test_a_timestep_per_token_takes_a_group_per_run_of_tokens():
    """Image to video: the first frame's tokens at timestep 0, the rest at t: the kernels read a modulation group per
    frame (the runs of equal rows), and the first frame's differ from the others'."""
    from treeq_engine.runtime.linear import TreeQLinear

    model = tiny()
    _, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    groups = []
    orig = TreeQLinear.quantize_input

    def spy(self, x2, **k):
        if k.get("shift") is not None:
            groups.append(k["shift"])
        return orig(self, x2, **k)

    with pytest.MonkeyPatch.context() as mp, torch.no_grad():
        mp.setattr(TreeQLinear, "quantize_input", spy)
        fused(**call(i2v=True))
    assert groups and all(g.shape == (2 * 3, 24) for g in groups)   # (2 samples × 3 frames: 4 × 6 tokens each)
    assert not torch.equal(groups[0][0], groups[0][1]) and torch.equal(groups[0][1], groups[0][2])


def test_what_the_fused_path_cannot_run_runs_diffusers_forward():
    from diffusers.models.transformers.transformer_sana_video import SanaLinearAttnProcessor3_0

    model = tiny()
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    kw = call()
    with torch.no_grad():
        want = unfused(**kw).sample
    full = PER_FORWARD["ln"]
    # (the depthwise and temporal convolutions and the SiLU run as modules in the fused path: hooked, it stays)
    hooks_cost(fused, [(f"transformer_blocks.0.{p}", 2) for p in (
        "norm1", "norm2", "attn1", "attn1.to_out.1", "attn1.to_k", "attn1.to_out.0", "ff", "ff.conv_point",
        "ff.conv_inverted")] + [(f"transformer_blocks.0.ff.{p}", 0) for p in ("conv_depth", "nonlinearity",
                                                                              "conv_temp")], kw, want, full, exact)
    block = fused.transformer_blocks[0]
    h, c = torch.randn(2, 72, 24), torch.randn(2, 5, 24)
    rotary = fused.rope(kw["hidden_states"])
    calls = []
    with pytest.MonkeyPatch.context() as mp, torch.no_grad():
        mp.setattr("treeq_engine.runtime.sana_fused._rotary_linear_attention", lambda *a: calls.append(1))
        t = torch.randn(2, 1, 6 * 24)
        for m in (block, unfused.transformer_blocks[0]):   # (a timestep batch of 1: diffusers' reshape refuses it)
            with pytest.raises(RuntimeError, match="must match the size"):
                m(h, None, c, None, t[:1], 3, 4, 6, rotary)
        # (a float32 timestep for bf16 rows: diffusers promotes the rows to float32, which its bf16 depthwise
        # convolution then refuses)
        model16 = tiny().to(torch.bfloat16)
        for m in pair(model16, QuantPlan.block_uniform(model16, 8, 8), dtype=torch.bfloat16):
            with pytest.raises(RuntimeError, match="Input type .float. and bias type .c10::BFloat16."):
                m.transformer_blocks[0](h.bfloat16(), None, c.bfloat16(), None, t, 3, 4, 6, rotary)
    assert not calls
    another_processor_then_training(fused, block.attn1, SanaLinearAttnProcessor3_0, kw, want, full, 2)

    quantized = copy.deepcopy(model)
    quantize(quantized, QuantPlan.block_uniform(model, 4, 8), dtype=torch.float32, fuse=False)
    quantized.transformer_blocks[0].norm2 = torch.nn.LayerNorm(24)   # (an affine LayerNorm: not the structure)
    with pytest.raises(ValueError, match="FusedSanaVideoTransformerBlock handles SanaVideoTransformerBlock"):
        FusedSanaVideoTransformerBlock(quantized.transformer_blocks[0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half(dtype):
    """Within 2 % of the unfused model; no clip (Sana's image processor clips float16, Sana-Video's does not)."""
    half_agrees(tiny().to(dtype), call(dtype=dtype, i2v=True), dtype=dtype)


def test_layerwise_casting_keeps_the_blocks_fused():
    """diffusers' layerwise casting (bf16 storage, float32 compute) hooks the convolutions it leaves unpacked, which
    the fused path calls as modules: the blocks stay fused and agree with the unfused model under the same casting;
    a rotary table as a list (not the model's tuple) runs diffusers' forward, with its output."""
    model = tiny()
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    for m in (unfused, fused):
        m.enable_layerwise_casting(storage_dtype=torch.bfloat16, compute_dtype=torch.float32)
    kw = call(i2v=True)
    calls, got = count_kernels(fused, kw)
    assert calls == PER_FORWARD
    with torch.no_grad():
        exact(got, unfused(**kw).sample)
        h, c, t = torch.randn(2, 72, 24), torch.randn(2, 5, 24), torch.randn(2, 1, 6 * 24)
        rotary = list(fused.rope(kw["hidden_states"]))
        exact(fused.transformer_blocks[0](h, None, c, None, t, 3, 4, 6, rotary),
              unfused.transformer_blocks[0](h, None, c, None, t, 3, 4, 6, rotary))


@pytest.mark.gpu
def test_fused_equals_unfused_on_gpu():
    gpu_fused_matches(tiny(), call(dtype=torch.bfloat16, i2v=True), PER_FORWARD)
