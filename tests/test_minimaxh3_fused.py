"""Fused MiniMax-H3 blocks (`runtime/minimaxh3_fused.py`): the fused model equals the unfused packed one (float32, the
reference backend: the RMSNorms, their weights and the per-token modulation (the kernels once per run of tokens
selecting one (timestep, modality) pair) in the quantization kernels of to_q/k/v and of the SwiGLU's projection,
the feed-forward's gated residual in ff.net[2]'s epilogue, the attention the block's own processor on the kernels'
projections), the fused kernels run, and what the fused path cannot reproduce runs diffusers' own forward."""
import copy
from types import SimpleNamespace

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="diffusers is an optional dependency (requirements-dev.txt)")
h3 = pytest.importorskip("diffusers.models.transformers.transformer_minimax_h3", reason="diffusers before MiniMax-H3")

from diffusers_zoo import CASES  # noqa: E402
from test_mmdit_fused import count_kernels, half_agrees, pair  # noqa: E402
from test_zimage_fused import close, hooks_cost  # noqa: E402
from tiny_diffusers import perturbed  # noqa: E402
from tinydit import one_thread  # noqa: E402,F401

from treeq_engine.plan import BranchConfig, LayerConfig, QuantPlan  # noqa: E402
from treeq_engine.runtime import quantize  # noqa: E402
from treeq_engine.runtime.linear import TreeQLinear  # noqa: E402
from treeq_engine.runtime.minimaxh3_fused import FusedMiniMaxH3TransformerBlock  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
# two main blocks, the zoo's sequence three runs of one modulation pair (text, video, audio), batch 1: per run, one
# RMSNorm-fused quantization for q/k/v and one for the SwiGLU's projection, the FFN's residual
RUNS = 3
PER_FORWARD = {"ln": 2 * 2 * RUNS, "gelu": 0, "residual": 2 * RUNS, "codes_out": 0}


def tiny():
    """The zoo's MiniMax-H3: two main blocks over a packed [text; video; audio] sequence (random weights)."""
    torch.manual_seed(0)
    return perturbed(CASES["MiniMaxH3"][0]().eval())


def call(seed=0, dtype=torch.float32):
    """The zoo's packed call: 8 text tokens, a 2x4x4 latent video, 6 audio frames, their per-row timesteps."""
    g = torch.Generator().manual_seed(seed)
    kw = CASES["MiniMaxH3"][1](lambda *s: torch.randn(*s, generator=g))
    return {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() and k != "timestep" else v
            for k, v in kw.items()}


def sample(model, kw):
    with torch.no_grad():
        out = model(**kw).sample
    return torch.cat([t.flatten() for t in out]) if isinstance(out, (list, tuple)) else out


def mixed(model):
    plan = QuantPlan.block_uniform(model, 4, 8)
    return plan.with_layer("transformer_blocks.0.attn.to_k", LayerConfig(16, 16)) \
        .with_layer("transformer_blocks.0.ff.net.2", LayerConfig(16, 16)) \
        .with_layer("transformer_blocks.1.attn.to_q", LayerConfig(4, 4)) \
        .with_layer("transformer_blocks.1.ff.net.0.proj", LayerConfig(8, 8, branch=BranchConfig("monarch", 2)))


@pytest.mark.parametrize("kind", ["W8A8", "W4A8", "mixed"])
def test_fused_equals_unfused(kind):
    model = tiny()
    plan = mixed(model) if kind == "mixed" else QuantPlan.block_uniform(model, int(kind[1]), int(kind[3]))
    unfused, fused = pair(model, plan)
    assert all(type(b) is FusedMiniMaxH3TransformerBlock for b in fused.transformer_blocks)
    for seed in (0, 1):
        got, want, fp = sample(fused, call(seed)), sample(unfused, call(seed)), sample(model, call(seed))
        close(got, want, bound=1e-5)
        assert 0 < float((got - fp).norm() / fp.norm()) < 0.3
    if kind == "W4A8":
        assert count_kernels(fused, call())[0] == PER_FORWARD


def test_the_kernels_run_once_per_run_of_tokens_sharing_a_modulation():
    """Each RMSNorm-fused quantization reads one modulation group, for one run of tokens selecting one pair: the table
    the kernels read never grows with the sequence, and the runs tile each sample's tokens in order."""
    model = tiny()
    _, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    seen = []
    orig = TreeQLinear.quantize_input
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(TreeQLinear, "quantize_input", lambda self, x2, **k: (seen.append(
            (x2.shape[0], k["scale"].shape[0])) if k.get("rms_norm") else None) or orig(self, x2, **k))
        sample(fused, call())
    rows = [r for r, _ in seen]
    assert all(groups == 1 for _, groups in seen) and len(seen) == 2 * 2 * RUNS and min(rows) > 1
    assert rows == rows[:RUNS] * 2 * 2 and sum(rows[:RUNS]) == call()["token_tags"].shape[0]


def test_a_batch_and_runs_in_any_order():
    """A batch of 2 over a sequence whose runs of one modulation pair come back (a pair in two runs, runs of one
    token): the block equals the unfused one, one norm-fused quantization per run and sample."""
    model = tiny()
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    got, want = fused.transformer_blocks[1], unfused.transformer_blocks[1]
    g = torch.Generator().manual_seed(3)
    indices = torch.tensor([4, 4, 4, 0, 1, 1, 4, 5, 5, 5, 5, 2])
    d, t = want.norm1.weight.shape[0], want.adaln_proj.linear.in_features
    kw = dict(hidden_states=torch.randn(2, indices.shape[0], d, generator=g), temb=torch.randn(2, t, generator=g),
              adaln_indices=indices, rotary_emb=None)
    calls, out = count_kernels(lambda **k: SimpleNamespace(sample=got(**k)), kw)
    with torch.no_grad():
        close(out, want(**kw), bound=1e-5)
    assert calls["ln"] == 2 * 2 * 6 and calls["residual"] == 2 * 6


def test_a_cuda_graph_capture_and_an_empty_batch_run_diffusers_forward(monkeypatch):
    """While a CUDA graph is captured (simulated: the capture refuses any read of a device value) the runs cannot be
    found: the block runs diffusers' forward, no kernel and no read. An empty batch: diffusers' forward too."""
    from treeq_engine.runtime import minimaxh3_fused

    model = tiny()
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    kw = call()
    want = sample(unfused, kw)

    def refused(*a, **k):
        raise RuntimeError("a device read while capturing")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(minimaxh3_fused, "_capturing", lambda device: True)
        mp.setattr(torch.Tensor, "tolist", refused)
        mp.setattr(torch, "nonzero", refused)
        calls, got = count_kernels(fused, kw)
    assert calls["ln"] == 0
    close(got, want)
    block, ref = fused.transformer_blocks[0], unfused.transformer_blocks[0]
    d, t = ref.norm1.weight.shape[0], ref.adaln_proj.linear.in_features
    args = (torch.zeros(0, 5, d), torch.randn(1, t), torch.zeros(5, dtype=torch.long), None)
    with torch.no_grad():
        assert block(*args).shape == ref(*args).shape == (0, 5, d)


def test_what_the_fused_path_cannot_run_runs_diffusers_forward():
    model = tiny()
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    kw = call()
    want = unfused(**kw).sample
    full = PER_FORWARD["ln"]
    hooks_cost(fused, [(f"transformer_blocks.0.{p}", 2 * RUNS) for p in ("norm1", "norm2", "adaln_proj", "attn",
                                                                   "attn.to_v")]
               + [(f"transformer_blocks.0.{p}", RUNS) for p in ("ff", "ff.net.0", "ff.net.0.proj", "ff.net.2")]
               + [(f"transformer_blocks.0.{p}", 0) for p in ("attn.to_out.0", "attn.norm_q", "adaln_proj.linear")],
               kw, want, full, close)
    fused.transformer_blocks[0].attn.set_processor(type("Other", (h3.MiniMaxH3AttnProcessor,), {})())
    calls, got = count_kernels(fused, kw)
    assert calls["ln"] == full - 2 * RUNS
    close(got, want)
    fused.train()
    assert count_kernels(fused, kw)[0]["ln"] == 0

    quantized = copy.deepcopy(model)
    quantize(quantized, QuantPlan.block_uniform(model, 4, 8), dtype=torch.float32, fuse=False)
    quantized.transformer_blocks[0].norm2 = torch.nn.LayerNorm(24)   # (not an RMSNorm)
    with pytest.raises(ValueError, match="FusedMiniMaxH3TransformerBlock handles MiniMaxH3TransformerBlock"):
        FusedMiniMaxH3TransformerBlock(quantized.transformer_blocks[0])


def test_bf16():
    half_agrees(tiny().to(torch.bfloat16), call(dtype=torch.bfloat16), per_forward=PER_FORWARD)


@pytest.mark.gpu
def test_fused_equals_unfused_on_gpu():
    from test_mmdit_fused import gpu_fused_matches

    gpu_fused_matches(tiny(), call(dtype=torch.bfloat16), PER_FORWARD)
