"""Fused AnyFlow blocks (`runtime/anyflow_fused.py`): Wan's block under a per-token modulation, the self-attention
its processor's own on the kernels' projections (AnyFlow's bidirectional one, FAR's causal one). The fused model
equals the unfused packed one (float32, the reference backend), the fused kernels run, and what the fused path
cannot reproduce runs diffusers' own forward: hooks, another processor, training."""
import copy

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="diffusers is an optional dependency (requirements-dev.txt)")
pytest.importorskip("diffusers.models.transformers.transformer_anyflow_far", reason="diffusers before AnyFlow")

from test_mmdit_fused import (another_processor_and_training, count_kernels, gpu_fused_matches,  # noqa: E402
                              half_agrees, pair)
from test_zimage_fused import exact, hooks_cost  # noqa: E402
from tiny_diffusers import perturbed  # noqa: E402
from tinydit import one_thread  # noqa: E402,F401

from treeq_engine.plan import QuantPlan  # noqa: E402
from treeq_engine.runtime import anyflow_fused, quantize  # noqa: E402
from treeq_engine.runtime.linear import TreeQLinear  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
# per block one LayerNorm-fused quantization for q/k/v and one for the feed-forward, GELU and the next layer's codes
# in the feed-forward's first epilogue, its gated residual in the second's (the attention's is added in float32)
PER_FORWARD = {"ln": 2 * 2, "gelu": 2, "residual": 2, "codes_out": 2}
COMMON = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
              text_dim=16, freq_dim=256, ffn_dim=32, num_layers=2, rope_max_seq_len=32)


def tiny(far=False):
    torch.manual_seed(0)
    if far:
        return perturbed(diffusers.AnyFlowFARTransformer3DModel(
            compressed_patch_size=(1, 4, 4), full_chunk_limit=1, chunk_partition=(1, 1), **COMMON).eval())
    return perturbed(diffusers.AnyFlowTransformer3DModel(**COMMON).eval())


def call(far=False, seed=0, dtype=torch.float32):
    """Latents (B, frames, C, H, W) with a timestep and a flow-map target timestep per frame (FAR: its first frame
    the clean context, a chunk each)."""
    g = torch.Generator().manual_seed(seed)
    if far:
        return dict(hidden_states=torch.randn(3, 2, 4, 8, 8, generator=g).to(dtype),
                    timestep=torch.tensor([[0.0, 800.0], [0.0, 500.0], [0.0, 200.0]]),
                    r_timestep=torch.tensor([[0.0, 600.0], [0.0, 300.0], [0.0, 100.0]]),
                    encoder_hidden_states=torch.randn(3, 12, 16, generator=g).to(dtype), chunk_partition=[1, 1])
    return dict(hidden_states=torch.randn(2, 3, 4, 8, 8, generator=g).to(dtype),
                timestep=torch.tensor([[800.0, 800.0, 400.0], [600.0, 300.0, 300.0]]),
                r_timestep=torch.tensor([[600.0, 600.0, 200.0], [300.0, 100.0, 100.0]]),
                encoder_hidden_states=torch.randn(2, 12, 16, generator=g).to(dtype))


@pytest.mark.parametrize("far", [False, True])
def test_fused_equals_unfused(far):
    model = tiny(far)
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    name = "FusedAnyFlowFARTransformerBlock" if far else "FusedAnyFlowTransformerBlock"
    assert [type(b).__name__ for b in fused.blocks] == [name] * 2
    assert fused.state_dict().keys() == unfused.state_dict().keys()
    for seed in (0, 1):
        kw = call(far, seed)
        calls, got = count_kernels(fused, kw)
        assert calls == PER_FORWARD
        with torch.no_grad():
            want, fp = unfused(**kw).sample, model(**kw).sample
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert 0 < float((got - fp).norm() / fp.norm()) < 0.15


def test_a_modulation_group_per_frame():
    """A timestep per frame reaches the kernels as one modulation group per run of tokens that every sample
    repeats: sample 0's frames at (800, 800, 400), sample 1's at (600, 300, 300), so a frame of 12 tokens each,
    2 x 3 groups (not a row per token)."""
    model = tiny()
    _, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    scales = []
    orig = TreeQLinear.quantize_input
    with pytest.MonkeyPatch.context() as mp, torch.no_grad():
        mp.setattr(TreeQLinear, "quantize_input",
                   lambda self, x2, **k: scales.append(getattr(k.get("scale"), "shape", None)) or orig(self, x2, **k))
        fused(**call())
    assert scales.count((2 * 3, 24)) == 2 * 2   # (q/k/v and the feed-forward of both blocks)


def test_far_s_kv_cache_is_filled_as_diffusers_fills_it():
    """FAR's cache step: a block handed a KV cache computes the same rows and stores the same keys and values (the
    kernels' projections, through the causal processor) as the unfused block."""
    model = tiny(far=True)
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    seen = {}
    h = unfused.blocks[0].register_forward_pre_hook(lambda m, a: seen.update(args=a))
    with torch.no_grad():
        unfused(**call(far=True))
    h.remove()
    args = seen["args"]   # (the block's rows, the text, the per-token timestep table, the rotary tables, the mask)
    b, s, d = args[0].shape
    caches = [{name: torch.zeros(2, b, 2, 64, d // 2) for name in ("compressed_cache", "full_cache")}
              for _ in range(2)]
    flag = {"is_cache_step": True, "num_compressed_tokens": 0, "num_full_tokens": s}
    norm_fused = []
    orig = TreeQLinear.quantize_input
    with pytest.MonkeyPatch.context() as mp, torch.no_grad():
        want = unfused.blocks[0](*args, kv_cache=caches[0], kv_cache_flag=flag)
        mp.setattr(TreeQLinear, "quantize_input",
                   lambda self, x2, **k: norm_fused.append(k.get("ln_eps") is not None) or orig(self, x2, **k))
        got = fused.blocks[0](*args, kv_cache=caches[1], kv_cache_flag=flag)
    assert sum(norm_fused) == 2   # (the fused path ran: q/k/v's and the feed-forward's norm-fused quantizations)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert caches[0]["full_cache"].abs().max() > 0
    torch.testing.assert_close(caches[1]["full_cache"], caches[0]["full_cache"], rtol=1e-5, atol=1e-5)


def test_what_the_fused_path_cannot_run_runs_diffusers_forward():
    model = tiny()
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    kw = call()
    with torch.no_grad():
        want = unfused(**kw).sample
    block = fused.blocks[0]
    hooks_cost(fused, [(f"blocks.0.{p}", fewer) for p, fewer in (("norm1", 2), ("attn1", 2), ("attn1.to_k", 2),
                                                                 ("ffn", 1))], kw, want, PER_FORWARD["ln"], exact)
    another_processor_and_training(fused, block.attn1, type(block.attn1.processor), kw, want, PER_FORWARD["ln"] - 2)

    quantized = copy.deepcopy(model)
    quantize(quantized, QuantPlan.block_uniform(model, 4, 8), dtype=torch.float32, fuse=False)
    with pytest.raises(ValueError, match="FusedAnyFlowFARTransformerBlock handles .*transformer_anyflow_far"):
        anyflow_fused.FusedAnyFlowFARTransformerBlock(quantized.blocks[0])


@pytest.mark.parametrize("far", [False, True])
def test_inference_mode(far):
    """Under torch.inference_mode (its tensors keep no version counter) the fused model runs and equals the unfused
    one, the per-token modulation's runs still found once per forward."""
    model = tiny(far)
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    with torch.inference_mode():
        kw = call(far)
        torch.testing.assert_close(fused(**kw).sample, unfused(**kw).sample, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("far", [False, True])
def test_bf16(far):
    half_agrees(tiny(far).to(torch.bfloat16), call(far, dtype=torch.bfloat16))


@pytest.mark.gpu
@pytest.mark.parametrize("far", [False, True])
def test_fused_equals_unfused_on_gpu(far):
    gpu_fused_matches(tiny(far), call(far, dtype=torch.bfloat16), PER_FORWARD)
