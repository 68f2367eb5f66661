"""Fused NucleusMoE blocks (`runtime/nucleusmoe_fused.py`): the fused model equals the unfused packed one (float32, the
reference backend: LayerNorm + modulate in the quantization kernels of to_q/k/v and, in a dense block, of the SwiGLU's
projection, whose gated residual runs in the second linear's epilogue; a mixture-of-experts MLP as the module; the
attention the processor's own on the kernels' projections), the fused kernels run, and what the fused path cannot
reproduce runs diffusers' own forward."""
import copy

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="diffusers is an optional dependency (requirements-dev.txt)")
nm = pytest.importorskip("diffusers.models.transformers.transformer_nucleusmoe_image",
                         reason="diffusers before NucleusMoE")

from diffusers_zoo import CASES  # noqa: E402
from test_mmdit_fused import another_processor_and_training, count_kernels, half_agrees, pair  # noqa: E402
from test_zimage_fused import close, hooks_cost  # noqa: E402
from tiny_diffusers import perturbed  # noqa: E402
from tinydit import one_thread  # noqa: E402,F401

from treeq_engine.plan import BranchConfig, LayerConfig, QuantPlan  # noqa: E402
from treeq_engine.runtime import quantize  # noqa: E402
from treeq_engine.runtime.nucleusmoe_fused import FusedNucleusMoEImageTransformerBlock  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
# a dense block (one LayerNorm-fused quantization for q/k/v, one for the SwiGLU, its gated residual in the second
# linear) and a mixture-of-experts block (one for q/k/v; the MLP the module's)
PER_FORWARD = {"ln": 2 + 1, "gelu": 0, "residual": 1, "codes_out": 0}


def tiny():
    """The zoo's NucleusMoE: a dense block, then a block of four experts and a shared one (random weights)."""
    torch.manual_seed(0)
    return perturbed(CASES["NucleusMoEImage"][0]().eval())


def call(seed=0, n=2, dtype=torch.float32):
    """n 4x4-token images, prompts of 8 and 5 tokens (the second padded), timesteps."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.arange(8)[None] < torch.tensor([[8], [5]])[:n]
    return dict(hidden_states=torch.randn(n, 16, 16, generator=g).to(dtype), img_shapes=[(1, 4, 4)] * n,
                encoder_hidden_states=torch.randn(n, 8, 16, generator=g).to(dtype), encoder_hidden_states_mask=mask,
                timestep=torch.tensor([0.3, 0.8])[:n])


def sample(model, kw):
    with torch.no_grad():
        return model(**kw).sample


def mixed(model):
    plan = QuantPlan.block_uniform(model, 4, 8)
    return plan.with_layer("transformer_blocks.0.attn.to_k", LayerConfig(16, 16)) \
        .with_layer("transformer_blocks.0.img_mlp.net.2", LayerConfig(16, 16)) \
        .with_layer("transformer_blocks.1.attn.to_q", LayerConfig(4, 4)) \
        .with_layer("transformer_blocks.0.img_mlp.net.0.proj", LayerConfig(8, 8, branch=BranchConfig("monarch", 2)))


@pytest.mark.parametrize("kind", ["W8A8", "W4A8", "mixed"])
def test_fused_equals_unfused(kind):
    model = tiny()
    plan = mixed(model) if kind == "mixed" else QuantPlan.block_uniform(model, int(kind[1]), int(kind[3]))
    unfused, fused = pair(model, plan)
    assert all(type(b) is FusedNucleusMoEImageTransformerBlock for b in fused.transformer_blocks)
    assert [b.moe_enabled for b in fused.transformer_blocks] == [False, True]
    assert fused.state_dict().keys() == unfused.state_dict().keys()
    for kw in (call(0), call(1, n=1)):
        got, want, fp = sample(fused, kw), sample(unfused, kw), sample(model, kw)
        close(got, want, bound=1e-5)
        assert 0 < float((got - fp).norm() / fp.norm()) < 0.3
    if kind != "mixed":
        assert count_kernels(fused, call())[0] == PER_FORWARD


def test_gates_beyond_the_clamp():
    """Gates past diffusers' clamp to [-2, 2] (before the tanh): the fused blocks clamp them as diffusers does."""
    model = tiny()
    with torch.no_grad():
        for block in model.transformer_blocks:
            bias = block.img_mod[1].bias.view(4, -1)
            bias[1] += 4.0   # (gate1)
            bias[3] -= 4.0   # (gate2)
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    close(sample(fused, call()), sample(unfused, call()), bound=1e-5)


def test_the_text_mask_reaches_the_attention():
    """The model's joint mask (handed to the blocks in attention_kwargs): hiding more of the second prompt changes
    its sample, not the first's, the fused model as the unfused one."""
    model = tiny()
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    kw = call()
    kw2 = dict(kw, encoder_hidden_states_mask=torch.arange(8)[None] < torch.tensor([[8], [2]]))
    a, b = sample(fused, kw), sample(fused, kw2)
    close(b, sample(unfused, kw2), bound=1e-5)
    assert torch.allclose(a[0], b[0]) and not torch.allclose(a[1], b[1], atol=1e-4)


def test_diffusers_text_kv_cache():
    """diffusers' TextKVCache hands the blocks the text's keys and values (``cached_txt_key``/``_value``) after the
    first step: the fused blocks take them as the processor does (no text projection then), equal to the unfused
    model, their kernels still running."""
    from diffusers.hooks.text_kv_cache import TextKVCacheConfig, apply_text_kv_cache

    model = tiny()
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    for m in (unfused, fused):
        apply_text_kv_cache(m, TextKVCacheConfig())
    kw = call()
    close(sample(fused, kw), sample(unfused, kw), bound=1e-5)   # (the first step fills the caches)
    projected = []
    hook = fused.transformer_blocks[0].encoder_proj.register_forward_pre_hook(lambda *a: projected.append(1))
    calls, got = count_kernels(fused, kw)
    hook.remove()
    close(got, sample(unfused, kw), bound=1e-5)
    assert calls == PER_FORWARD and not projected


def test_what_the_fused_path_cannot_run_runs_diffusers_forward():
    model = tiny()
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    kw = call()
    want = sample(unfused, kw)
    full = PER_FORWARD["ln"]
    hooks_cost(fused, [(f"transformer_blocks.0.{p}", 2) for p in ("pre_attn_norm", "pre_mlp_norm", "img_mod", "attn",
                                                                  "attn.to_v")]
               + [(f"transformer_blocks.0.{p}", 1) for p in ("img_mlp", "img_mlp.net.0", "img_mlp.net.0.proj",
                                                             "img_mlp.net.1", "img_mlp.net.2")]
               + [(f"transformer_blocks.1.{p}", 1) for p in ("pre_mlp_norm", "attn.to_q")]
               + [(f"transformer_blocks.1.{p}", 0) for p in ("img_mlp", "img_mlp.gate", "img_mlp.shared_expert")]
               + [(f"transformer_blocks.0.{p}", 0) for p in ("attn.to_out.0", "attn.add_k_proj", "attn.norm_q",
                                                             "encoder_proj", "img_mod.1")],
               kw, want, full, close)
    another_processor_and_training(fused, fused.transformer_blocks[0].attn, nm.NucleusMoEAttnProcessor2_0, kw, want,
                                   full - 2)

    # attention arguments the fused path does not know: diffusers' forward (its Attention warns and drops them)
    fused.eval()
    block, ref = fused.transformer_blocks[0], unfused.transformer_blocks[0]
    seen = {}
    hook = ref.register_forward_pre_hook(lambda m, a, k: seen.setdefault("k", dict(k)) and None, with_kwargs=True)
    sample(unfused, kw)
    hook.remove()
    args = dict(seen["k"], attention_kwargs=dict(seen["k"]["attention_kwargs"], other=1))
    calls, got = count_kernels(lambda **k: type("O", (), {"sample": block(**k)}), args)
    assert calls["ln"] == 0
    with torch.no_grad():
        close(got, ref(**args), bound=1e-5)

    quantized = copy.deepcopy(model)
    quantize(quantized, QuantPlan.block_uniform(model, 4, 8), dtype=torch.float32, fuse=False)
    quantized.transformer_blocks[0].pre_mlp_norm = torch.nn.LayerNorm(32)   # (with an affine)
    with pytest.raises(ValueError, match="handles NucleusMoEImageTransformerBlock in the structure"):
        FusedNucleusMoEImageTransformerBlock(quantized.transformer_blocks[0])


def test_bf16():
    half_agrees(tiny().to(torch.bfloat16), call(dtype=torch.bfloat16), per_forward=PER_FORWARD)


@pytest.mark.gpu
def test_fused_equals_unfused_on_gpu():
    from test_mmdit_fused import gpu_fused_matches

    gpu_fused_matches(tiny(), call(dtype=torch.bfloat16), PER_FORWARD)
