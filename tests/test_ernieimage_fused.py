"""Fused ERNIE-Image blocks (`runtime/ernieimage_fused.py`): the fused model equals the unfused packed one (float32,
the reference backend: the RMSNorms, their weights and the modulation in the quantization kernels of to_q/k/v and of
the feed-forward's gate and up projections, on the sequence-first rows transposed to sample order; the feed-forward's
gated residual in linear_fc2's epilogue; the attention the block's own processor on the kernels' projections), the
kernels take a modulation group per sample (per run of tokens where the tables vary along the sequence), and what the
fused path cannot reproduce runs diffusers' own forward."""
import copy

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="diffusers is an optional dependency (requirements-dev.txt)")
ernie = pytest.importorskip("diffusers.models.transformers.transformer_ernie_image",
                            reason="diffusers before ERNIE-Image")

from diffusers_zoo import CASES  # noqa: E402
from test_mmdit_fused import another_processor_and_training, count_kernels, half_agrees, pair  # noqa: E402
from test_zimage_fused import close, hooks_cost  # noqa: E402
from tiny_diffusers import perturbed  # noqa: E402
from tinydit import one_thread  # noqa: E402,F401

from treeq_engine.plan import BranchConfig, LayerConfig, QuantPlan  # noqa: E402
from treeq_engine.runtime import ernieimage_fused, quantize  # noqa: E402
from treeq_engine.runtime.ernieimage_fused import FusedErnieImageSharedAdaLNBlock  # noqa: E402
from treeq_engine.runtime.linear import TreeQLinear  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
# two blocks: one RMSNorm-fused quantization for q/k/v and one for the feed-forward's gate and up, the FFN's residual
PER_FORWARD = {"ln": 2 * 2, "gelu": 0, "residual": 2, "codes_out": 0}


def tiny():
    """The zoo's ERNIE-Image: two blocks of width 32 (random weights)."""
    torch.manual_seed(0)
    return perturbed(CASES["ErnieImage"][0]().eval())


def call(seed=0, dtype=torch.float32, lens=(6, 3)):
    """Two 8x8 latents, prompts of ``lens`` tokens (padded to 6), two timesteps."""
    g = torch.Generator().manual_seed(seed)
    kw = CASES["ErnieImage"][1](lambda *s: torch.randn(*s, generator=g))
    kw["text_lens"] = torch.tensor(lens)
    return {k: v.to(dtype) if v.is_floating_point() and k != "timestep" else v for k, v in kw.items()}


def sample(model, kw):
    with torch.no_grad():
        return model(**kw).sample


def mixed(model):
    plan = QuantPlan.block_uniform(model, 4, 8)
    return plan.with_layer("layers.0.self_attention.to_k", LayerConfig(16, 16)) \
        .with_layer("layers.0.mlp.linear_fc2", LayerConfig(16, 16)) \
        .with_layer("layers.1.self_attention.to_q", LayerConfig(4, 4)) \
        .with_layer("layers.1.mlp.up_proj", LayerConfig(16, 16)) \
        .with_layer("layers.0.mlp.gate_proj", LayerConfig(8, 8, branch=BranchConfig("monarch", 2)))


def block_args(model, kw):
    """What the model hands its first block: x (S, B, D), the rotary table, the six tables, the mask."""
    seen = {}
    h = model.layers[0].register_forward_pre_hook(lambda m, a: seen.setdefault("args", a))
    sample(model, kw)
    h.remove()
    return seen["args"]


@pytest.mark.parametrize("kind", ["W8A8", "W4A8", "mixed"])
def test_fused_equals_unfused(kind):
    model = tiny()
    plan = mixed(model) if kind == "mixed" else QuantPlan.block_uniform(model, int(kind[1]), int(kind[3]))
    unfused, fused = pair(model, plan)
    assert all(type(b) is FusedErnieImageSharedAdaLNBlock for b in fused.layers)
    assert fused.state_dict().keys() == unfused.state_dict().keys()
    for kw in (call(0), call(1, lens=(2, 5))):
        got, want, fp = sample(fused, kw), sample(unfused, kw), sample(model, kw)
        close(got, want, bound=1e-5)
        assert 0 < float((got - fp).norm() / fp.norm()) < 0.3
    if kind != "mixed":
        assert count_kernels(fused, call())[0] == PER_FORWARD


def test_a_modulation_group_per_sample_found_once_per_forward(monkeypatch):
    """The model's tables are per-sample vectors expanded over the sequence: the kernels read one group per sample,
    and the runs are found once per forward, not once per block."""
    model = tiny()
    _, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    groups, found = [], []
    orig_q, orig_r = TreeQLinear.quantize_input, ernieimage_fused.run_length
    monkeypatch.setattr(TreeQLinear, "quantize_input", lambda self, x2, **k: (groups.append(
        k["scale"].shape[0]) if k.get("rms_norm") else None) or orig_q(self, x2, **k))
    monkeypatch.setattr(ernieimage_fused, "run_length", lambda t: found.append(1) or orig_r(t))
    sample(fused, call())
    assert groups == [2] * PER_FORWARD["ln"] and len(found) == 1


def test_tables_that_vary_along_the_sequence():
    """Tables that change every 5 tokens (a caller's own per-token modulation): a group per run of 5 tokens, equal
    to the unfused block; the output is an (S, B, D) view of sample-ordered rows (the next block's transpose is
    free)."""
    model = tiny()
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    x, rope, temb, mask = block_args(unfused, call())
    s, b, d = x.shape
    assert s % 5 == 0
    g = torch.Generator().manual_seed(7)
    tables = [(0.3 * torch.randn(s // 5, b, d, generator=g)).repeat_interleave(5, dim=0) for _ in temb]
    groups = []
    orig = TreeQLinear.quantize_input
    with pytest.MonkeyPatch.context() as mp, torch.no_grad():
        mp.setattr(TreeQLinear, "quantize_input", lambda self, x2, **k: (groups.append(
            k["scale"].shape[0]) if k.get("rms_norm") else None) or orig(self, x2, **k))
        got = fused.layers[0](x, rope, tables, mask)
    with torch.no_grad():
        close(got, unfused.layers[0](x, rope, tables, mask), bound=1e-5)
    assert groups == [b * s // 5] * 2
    assert got.shape == (s, b, d) and got.transpose(0, 1).is_contiguous()


def test_what_the_fused_path_cannot_run_runs_diffusers_forward():
    model = tiny()
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    kw = call()
    want = sample(unfused, kw)
    hooks_cost(fused, [(f"layers.0.{p}", 2) for p in ("adaLN_sa_ln", "adaLN_mlp_ln", "self_attention",
                                                        "self_attention.to_v")]
               + [(f"layers.0.{p}", 1) for p in ("mlp", "mlp.gate_proj", "mlp.up_proj", "mlp.linear_fc2")]
               + [(f"layers.0.{p}", 0) for p in ("self_attention.to_out.0", "self_attention.norm_q")],
               kw, want, PER_FORWARD["ln"], close)
    another_processor_and_training(fused, fused.layers[0].self_attention, ernie.ErnieImageSingleStreamAttnProcessor,
                                   kw, want, PER_FORWARD["ln"] - 2)

    # tables that are not six of the rows' shape (diffusers broadcasts a (1, B, D) table): diffusers' forward
    fused.eval()
    x, rope, temb, mask = block_args(unfused, kw)
    short = [t[:1] for t in temb]
    calls, got = count_kernels(lambda **k: type("O", (), {"sample": fused.layers[0](**k)}),
                               dict(x=x, rotary_pos_emb=rope, temb=short, attention_mask=mask))
    with torch.no_grad():
        close(got, unfused.layers[0](x, rope, short, mask))
    assert calls["ln"] == 0

    quantized = copy.deepcopy(model)
    quantize(quantized, QuantPlan.block_uniform(model, 4, 8), dtype=torch.float32, fuse=False)
    quantized.layers[0].adaLN_mlp_ln = torch.nn.LayerNorm(32)   # (not an RMSNorm)
    with pytest.raises(ValueError, match="FusedErnieImageSharedAdaLNBlock handles ErnieImageSharedAdaLNBlock"):
        FusedErnieImageSharedAdaLNBlock(quantized.layers[0])


def test_bf16():
    half_agrees(tiny().to(torch.bfloat16), call(dtype=torch.bfloat16), per_forward=PER_FORWARD)


@pytest.mark.gpu
def test_fused_equals_unfused_on_gpu():
    from test_mmdit_fused import gpu_fused_matches

    gpu_fused_matches(tiny(), call(dtype=torch.bfloat16), PER_FORWARD)
