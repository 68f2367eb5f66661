"""Fused Cosmos 3 layers (`runtime/cosmos3_fused.py`): the fused model equals the unfused packed one (float32, the
reference backend: each stream's RMSNorm and its weight in the quantization kernels of its projections and of its
MLP's first projections, each MLP's residual in its down_proj's epilogue, the attention the processor's own on the
kernels' projections), for the Qwen3 (SiLU) and the Nemotron (relu², its own RMSNorm) backbones; the fused kernels
run, and what the fused path cannot reproduce runs diffusers' own forward."""
import copy

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="diffusers is an optional dependency (requirements-dev.txt)")
c3 = pytest.importorskip("diffusers.models.transformers.transformer_cosmos3", reason="diffusers before Cosmos 3")

from diffusers_zoo import CASES  # noqa: E402
from test_mmdit_fused import another_processor_and_training, count_kernels, half_agrees, pair  # noqa: E402
from test_zimage_fused import close, hooks_cost  # noqa: E402
from tiny_diffusers import perturbed  # noqa: E402
from tinydit import one_thread  # noqa: E402,F401

from treeq_engine.plan import BranchConfig, LayerConfig, QuantPlan  # noqa: E402
from treeq_engine.runtime import quantize  # noqa: E402
from treeq_engine.runtime.cosmos3_fused import FusedCosmos3VLTextMoTDecoderLayer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
# two layers, each per stream one RMSNorm-fused quantization for its projections and one for its MLP; an MLP
# residual per stream in down_proj's epilogue
PER_FORWARD = {"ln": 2 * 2 * 2, "gelu": 0, "residual": 2 * 2, "codes_out": 0}


def tiny(act="silu"):
    """The zoo's Cosmos 3 Omni (two layers, grouped-query heads), with its Qwen3 MLP (SiLU) or Nemotron's (relu²,
    Nemotron RMSNorms); random weights."""
    torch.manual_seed(0)
    return perturbed(c3.Cosmos3OmniTransformer(
        head_dim=8, hidden_size=16, intermediate_size=32, latent_channel=4, latent_patch_size=2,
        num_attention_heads=2, num_hidden_layers=2, num_key_value_heads=1, patch_latent_dim=16, vocab_size=32,
        rope_axes_dim=(2, 1, 1), unified_3d_mrope_temporal_modality_margin=16, hidden_act=act).eval())


def call(seed=0, dtype=torch.float32):
    """The zoo's call: 8 text tokens, a 2x4x4 latent video (8 tokens), its timesteps."""
    g = torch.Generator().manual_seed(seed)
    kw = CASES["Cosmos3"][1](lambda *s: torch.randn(*s, generator=g))
    kw["vision_tokens"] = [t.to(dtype) for t in kw["vision_tokens"]]
    return kw


def sample(model, kw):
    with torch.no_grad():
        out = model(**kw).sample
    return torch.cat([t.flatten() for t in out]) if isinstance(out, (list, tuple)) else out


def mixed(model):
    plan = QuantPlan.block_uniform(model, 4, 8)
    return plan.with_layer("layers.0.self_attn.to_k", LayerConfig(16, 16)) \
        .with_layer("layers.0.mlp_moe_gen.down_proj", LayerConfig(16, 16)) \
        .with_layer("layers.1.self_attn.add_q_proj", LayerConfig(4, 4)) \
        .with_layer("layers.1.mlp.up_proj", LayerConfig(16, 16)) \
        .with_layer("layers.0.mlp.up_proj", LayerConfig(8, 8, branch=BranchConfig("monarch", 2)))


@pytest.mark.parametrize("kind", ["W8A8", "W4A8", "mixed"])
@pytest.mark.parametrize("act", ["silu", "relu2"])
def test_fused_equals_unfused(act, kind):
    model = tiny(act)
    plan = mixed(model) if kind == "mixed" else QuantPlan.block_uniform(model, int(kind[1]), int(kind[3]))
    unfused, fused = pair(model, plan)
    assert all(type(b) is FusedCosmos3VLTextMoTDecoderLayer for b in fused.layers)
    assert fused.state_dict().keys() == unfused.state_dict().keys()
    for seed in (0, 1):
        got, want, fp = sample(fused, call(seed)), sample(unfused, call(seed)), sample(model, call(seed))
        close(got, want, bound=1e-5)
        assert 0 < float((got - fp).norm() / fp.norm()) < 0.3
    if kind != "mixed":
        assert count_kernels(fused, call())[0] == PER_FORWARD


def test_both_streams_reach_the_output():
    """The understanding stream's layers change the generated sample (the generation pathway attends to its keys):
    a fused path that dropped the text's projections or residuals would move the output."""
    model = tiny()
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    kw = call()
    other = dict(kw, input_ids=torch.arange(8).flip(0))
    a, b = sample(fused, kw), sample(fused, other)
    close(b, sample(unfused, other), bound=1e-5)
    assert not torch.allclose(a, b)


def test_what_the_fused_path_cannot_run_runs_diffusers_forward():
    model = tiny()
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    kw = call()
    with torch.no_grad():
        want = unfused(**kw).sample   # (a list: a sample per vision item)
    full = PER_FORWARD["ln"]
    hooks_cost(fused, [(f"layers.0.{p}", 4) for p in ("input_layernorm", "input_layernorm_moe_gen",
                                                        "post_attention_layernorm", "self_attn", "self_attn.to_q",
                                                        "self_attn.add_k_proj")]
               + [(f"layers.0.{p}", 1) for p in ("mlp", "mlp.gate_proj", "mlp.act_fn", "mlp_moe_gen.up_proj",
                                                 "mlp_moe_gen.down_proj")]
               + [(f"layers.0.{p}", 0) for p in ("self_attn.to_out", "self_attn.to_add_out", "self_attn.norm_q")],
               kw, want, full, close)
    another_processor_and_training(fused, fused.layers[0].self_attn, c3.Cosmos3AttnProcessor, kw, want, full - 4)

    quantized = copy.deepcopy(model)
    quantize(quantized, QuantPlan.block_uniform(model, 4, 8), dtype=torch.float32, fuse=False)
    quantized.layers[0].post_attention_layernorm = torch.nn.LayerNorm(16)   # (not an RMSNorm)
    with pytest.raises(ValueError, match="FusedCosmos3VLTextMoTDecoderLayer handles Cosmos3VLTextMoTDecoderLayer"):
        FusedCosmos3VLTextMoTDecoderLayer(quantized.layers[0])


def test_the_block_registry_entry():
    """The fused layer takes diffusers' entry for the original: the generation stream is the rows, the text the
    encoder's (FirstBlockCache compares the generation stream)."""
    from diffusers.hooks._helpers import TransformerBlockRegistry

    fused, original = (TransformerBlockRegistry.get(c) for c in (FusedCosmos3VLTextMoTDecoderLayer,
                                                                c3.Cosmos3VLTextMoTDecoderLayer))
    for field in ("return_hidden_states_index", "return_encoder_hidden_states_index", "hidden_states_argument_name",
                  "encoder_hidden_states_argument_name"):
        assert getattr(fused, field) == getattr(original, field), field
    assert (fused.return_hidden_states_index, fused.hidden_states_argument_name) == (1, "gen_seq")


@pytest.mark.parametrize("act", ["silu", "relu2"])
def test_bf16(act):
    half_agrees(tiny(act).to(torch.bfloat16), call(dtype=torch.bfloat16), per_forward=PER_FORWARD)


@pytest.mark.gpu
def test_fused_equals_unfused_on_gpu():
    from test_mmdit_fused import gpu_fused_matches

    gpu_fused_matches(tiny(), call(dtype=torch.bfloat16), PER_FORWARD)
