"""Fused Helios blocks (`runtime/helios_fused.py`): what they compute equals the unfused packed model (float32, the
reference backend: LayerNorm + modulate in the quantization kernel under the per-token modulation of the history and
new frames, GELU and the feed-forward's gated residual in epilogues, the self-attention's own processor handed the
kernels' projections), with the history's timestep zeroed or not, its keys amplified or not; the fused kernels
actually run; and everything the fused path cannot reproduce runs diffusers' own forward: hooks, training, another
processor."""

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="diffusers is an optional dependency (requirements-dev.txt)")

from diffusers_zoo import CASES  # noqa: E402
from test_mmdit_fused import (count_kernels, gpu_fused_matches, pair,  # noqa: E402
                             unswapped_weight_only_and_bf16)
from test_zimage_fused import another_processor_then_training, close, hooks_cost  # noqa: E402
from tiny_diffusers import perturbed  # noqa: E402
from tinydit import one_thread  # noqa: E402,F401

from treeq_engine.plan import BranchConfig, LayerConfig, QuantPlan  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
# per block: one LayerNorm-fused quantization for q/k/v and one for the feed-forward; GELU and fc2's codes in fc1's
# epilogue, the feed-forward's gated residual in fc2's (the self-attention's to_out runs inside its processor)
PER_FORWARD = {"ln": 2 * 2, "gelu": 2, "residual": 2, "codes_out": 2}


def tiny_helios(**config):
    """The zoo's Helios (two blocks; ``config`` overrides), random weights perturbed off diffusers' zero
    initialisations."""
    torch.manual_seed(0)
    model = CASES["Helios"][0]()
    if config:   # (keyword overrides: a dict would keep the class defaults for the keys the zoo left at theirs)
        model = type(model).from_config(model.config, **config)
        assert all(getattr(model.config, k) == v for k, v in config.items())
    return perturbed(model.eval())


def call(n=2, seed=0, dtype=torch.float32, history=("short", "mid", "long")):
    """The zoo's call (two new frames after short, mid and long history; ``history``: the kinds kept) for ``n``
    samples of their own latents, history and text, and their own timesteps."""
    calls = []
    for i in range(n):
        g = torch.Generator().manual_seed(seed + i)
        calls.append(CASES["Helios"][1](lambda *shape: torch.randn(*shape, generator=g)))
    kw = {k: torch.cat([c[k] for c in calls]) for k in calls[0]
          if not any(k.endswith(f"history_{t}") for t in {"short", "mid", "long"} - set(history))}
    kw["timestep"] = torch.tensor([500.0, 200.0, 900.0][:n])
    return {k: v.to(dtype) if v.is_floating_point() and k != "timestep" else v for k, v in kw.items()}


def mixed(model):
    plan = QuantPlan.block_uniform(model, 4, 8)
    return plan.with_layer("blocks.0.attn1.to_k", LayerConfig(16, 16)) \
        .with_layer("blocks.0.ffn.net.2", LayerConfig(16, 16)) \
        .with_layer("blocks.1.attn1.to_q", LayerConfig(4, 4)) \
        .with_layer("blocks.1.ffn.net.0.proj", LayerConfig(4, 8, branch=BranchConfig("monarch", 2)))


def output(model, kw):
    with torch.no_grad():
        return model(**kw).sample


@pytest.mark.parametrize("kind", ["W8A8", "W4A8", "mixed", "float-fc1"])
@pytest.mark.parametrize("config", [{}, {"zero_history_timestep": False, "is_amplify_history": True},
                                    {"guidance_cross_attn": False, "cross_attn_norm": True, "is_amplify_history": True,
                                     "history_scale_mode": "scalar"}])
def test_fused_equals_unfused(kind, config):
    from treeq_engine.runtime.helios_fused import FusedHeliosTransformerBlock

    model = tiny_helios(**config)
    plan = mixed(model) if kind == "mixed" else QuantPlan.block_uniform(model, 4, 8).with_layer(
        "blocks.1.ffn.net.0.proj", LayerConfig(16, 16)) if kind == "float-fc1" else \
        QuantPlan.block_uniform(model, int(kind[1]), int(kind[3]))
    unfused, fused = pair(model, plan)
    assert [type(b) for b in fused.blocks] == [FusedHeliosTransformerBlock] * 2
    assert fused.state_dict().keys() == unfused.state_dict().keys()
    for kw in (call(), call(n=1, seed=5)):
        want, got, fp = output(unfused, kw), output(fused, kw), output(model, kw)
        close(got, want, bound=1e-5)
        assert 0 < float((got - fp).norm() / fp.norm()) < 0.4


def test_the_runs_are_found_once_per_forward(monkeypatch):
    """The history's tokens at timestep 0 and the new frames' at the step's: one scan of the projections every
    block is handed, per forward, not per block; the kernels take a group per run (32 short-history tokens, then 32
    new ones: groups of 32; with the mid and long history too, 69 tokens, a group per row)."""
    from treeq_engine.runtime import diffusers_fused, helios_fused

    model = tiny_helios()
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    scans, groups = [], []
    run_length, per_token = diffusers_fused.run_length, helios_fused.per_token_modulation
    monkeypatch.setattr(diffusers_fused, "run_length", lambda tables: scans.append(1) or run_length(tables))
    monkeypatch.setattr(helios_fused, "per_token_modulation",
                        lambda *a, **k: groups.append(per_token(*a, **k).shape[1]) or per_token(*a, **k))
    for history, want_groups in ((("short",), 2 * 2), (("short", "mid", "long"), 2 * 69)):
        scans.clear(), groups.clear()
        kw = call(history=history)
        close(output(fused, kw), output(unfused, kw), bound=1e-5)
        assert scans == [1] and groups == [want_groups] * 2, history


def test_the_fused_kernels_run_and_what_they_cannot_run_runs_diffusers_forward():
    from diffusers.models.transformers.transformer_helios import HeliosAttnProcessor

    model = tiny_helios()
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    kw = call()
    assert count_kernels(fused, kw)[0] == PER_FORWARD
    assert count_kernels(unfused, kw)[0] == {k: 0 for k in PER_FORWARD}
    want = output(unfused, kw)
    full = PER_FORWARD["ln"]
    hooks_cost(fused, [(f"blocks.0.{p}", fewer) for p, fewer in (
        ("norm1", 2), ("norm3", 2), ("attn1", 2), ("attn1.to_k", 2), ("ffn", 1), ("attn1.to_out.0", 0),
        ("attn1.norm_q", 0), ("attn2", 0), ("norm2", 0))], kw, want, full)
    another_processor_then_training(fused, fused.blocks[0].attn1, HeliosAttnProcessor, kw, want, full, 2)


def test_only_blocks_with_something_to_fuse_are_swapped_and_bf16():
    from treeq_engine.runtime.helios_fused import FusedHeliosTransformerBlock

    unswapped_weight_only_and_bf16(tiny_helios, call, FusedHeliosTransformerBlock, PER_FORWARD)


@pytest.mark.gpu
def test_fused_equals_unfused_on_gpu():
    """The same on the GPU's kernels (CUDA or Triton, whichever the dispatcher picks), bf16."""
    gpu_fused_matches(tiny_helios(), call(dtype=torch.bfloat16), PER_FORWARD)
