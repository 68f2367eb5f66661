"""Fused Qwen-Image 2.1 blocks (`runtime/qwenimage21_fused.py`): what they compute equals the unfused packed model
(float32, the reference backend: LayerNorm + modulate in the quantization kernel, the per-token modulation of a
causal condition as groups of runs, the feed-forward's gated residual in an epilogue, the processor's own attention
handed the kernels' projections), without and with the prefix KV cache (prefill, extract, cached decode); the fused
kernels actually run; and everything the fused path cannot reproduce runs diffusers' own forward: hooks, training,
another processor."""

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
# per block: one LayerNorm-fused quantization for q/k/v and one for gate_layer/proj; the feed-forward's gated
# residual in out's epilogue (the attention's to_out runs inside the processor)
PER_FORWARD = {"ln": 2 * 2, "gelu": 0, "residual": 2, "codes_out": 0}


def tiny_qwenimage21(causal_condition=True):
    torch.manual_seed(0)
    ctor = CASES["QwenImage21"][0]
    model = ctor()
    if not causal_condition:   # (a keyword override: a dict would keep the class default for it)
        model = type(model).from_config(model.config, causal_condition=False)
        assert not model.config.causal_condition
    return perturbed(model.eval())


def call(n=2, seed=0, dtype=torch.float32):
    """The zoo's call for ``n`` samples of their own latents, text and timesteps."""
    calls = []
    for i in range(n):
        g = torch.Generator().manual_seed(seed + i)
        calls.append(CASES["QwenImage21"][1](lambda *shape: torch.randn(*shape, generator=g)))
    kw = {k: torch.cat([c[k] for c in calls]) if isinstance(calls[0][k], torch.Tensor) else calls[0][k] * n
          for k in calls[0]}
    kw["timestep"] = torch.tensor([0.5, 0.2, 0.9][:n])
    return {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in kw.items()}


def mixed(model):
    plan = QuantPlan.block_uniform(model, 4, 8)
    return plan.with_layer("transformer_blocks.0.attn.to_k", LayerConfig(16, 16)) \
        .with_layer("transformer_blocks.0.img_mlp.out", LayerConfig(16, 16)) \
        .with_layer("transformer_blocks.1.attn.to_q", LayerConfig(4, 4)) \
        .with_layer("transformer_blocks.1.img_mlp.gate_layer", LayerConfig(4, 8, branch=BranchConfig("monarch", 2)))


def output(model, kw):
    with torch.no_grad():
        return model(**kw).sample


@pytest.mark.parametrize("kind", ["W8A8", "W4A8", "mixed"])
@pytest.mark.parametrize("causal", [True, False])
def test_fused_equals_unfused(kind, causal):
    from treeq_engine.runtime.qwenimage21_fused import FusedQwenImage21TransformerBlock

    model = tiny_qwenimage21(causal)
    plan = mixed(model) if kind == "mixed" else QuantPlan.block_uniform(model, int(kind[1]), int(kind[3]))
    unfused, fused = pair(model, plan)
    assert [type(b) for b in fused.transformer_blocks] == [FusedQwenImage21TransformerBlock] * 2
    assert fused.state_dict().keys() == unfused.state_dict().keys()
    for kw in (call(), call(n=1, seed=5)):
        want, got, fp = output(unfused, kw), output(fused, kw), output(model, kw)
        close(got, want)
        assert 0 < float((got - fp).norm() / fp.norm()) < 0.4


def test_the_prefix_kv_cache():
    """Prefill (extracting the prefix's keys and values), then the cached decode of the target image: the fused
    model fills and reads its cache as diffusers' does."""
    from diffusers.models.transformers.transformer_qwenimage21 import QwenImage21KVCache

    model = tiny_qwenimage21()
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    kw = call()
    outs = {}
    for name, m in (("unfused", unfused), ("fused", fused)):
        cache = QwenImage21KVCache(len(m.transformer_blocks))
        outs[name] = [output(m, dict(kw, kv_cache=cache, kv_cache_mode=mode)) for mode in ("extract", "cached")]
    for got, want in zip(outs["fused"], outs["unfused"]):
        close(got, want)


def test_the_fused_kernels_run_and_what_they_cannot_run_runs_diffusers_forward():
    from diffusers.models.transformers.transformer_qwenimage21 import QwenImage21AttnProcessor

    model = tiny_qwenimage21()
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    kw = call()
    assert count_kernels(fused, kw)[0] == PER_FORWARD
    assert count_kernels(unfused, kw)[0] == {k: 0 for k in PER_FORWARD}
    want = output(unfused, kw)
    full = PER_FORWARD["ln"]
    hooks_cost(fused, [(f"transformer_blocks.0.{p}", fewer) for p, fewer in (
        ("img_norm1", 2), ("img_norm2", 2), ("attn", 2), ("attn.to_k", 2), ("img_mlp", 2), ("img_mlp.out", 2),
        ("img_mlp.activation_fn", 2), ("attn.to_out.0", 0), ("attn.norm_q", 0))], kw, want, full)
    another_processor_then_training(fused, fused.transformer_blocks[0].attn, QwenImage21AttnProcessor, kw, want, full,
                                    2)


def test_the_attention_is_never_changed_while_its_processor_runs(monkeypatch):
    """The processor is handed the kernels' projections through a view of the attention: the attention's own
    modules stay as they are throughout (a call in another thread meanwhile sees them unchanged)."""
    from diffusers.models.transformers.transformer_qwenimage21 import QwenImage21AttnProcessor

    model = tiny_qwenimage21()
    _, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    attns = [b.attn for b in fused.transformer_blocks]
    seen, original = [], QwenImage21AttnProcessor.__call__

    def call_checking(self, attn, *args, **kwargs):
        seen.append(attn is not attns[len(seen) % 2]
                    and all("forward" not in getattr(a, n).__dict__ for a in attns for n in ("to_q", "to_k", "to_v")))
        return original(self, attn, *args, **kwargs)

    monkeypatch.setattr(QwenImage21AttnProcessor, "__call__", call_checking)
    output(fused, call())
    assert seen == [True, True]


def test_the_runs_of_a_causal_condition_are_found_once_per_forward(monkeypatch):
    """The text and condition tokens read the t = 0 row, the target image its sample's: per sample 8 + 16 rows in
    groups of 8, found once for both blocks, from the mask."""
    from treeq_engine.runtime import qwenimage21_fused

    model = tiny_qwenimage21()
    _, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    groups, original = [], qwenimage21_fused.per_token_modulation

    def recording(*args, **kwargs):
        m32 = original(*args, **kwargs)
        groups.append(m32.shape[1])
        return m32

    monkeypatch.setattr(qwenimage21_fused, "per_token_modulation", recording)
    output(fused, call())
    assert groups == [2 * 3]


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_the_flex_processor():
    """The flex attention processor (its block mask) runs fused as the default one does."""
    from diffusers.models.transformers.transformer_qwenimage21 import QwenImage21FlexAttnProcessor

    model = tiny_qwenimage21()
    for b in model.transformer_blocks:
        b.attn.set_processor(QwenImage21FlexAttnProcessor())
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    kw = call()
    calls, got = count_kernels(fused, kw)
    assert calls == PER_FORWARD
    close(got, output(unfused, kw))


def test_only_blocks_with_something_to_fuse_are_swapped_and_bf16():
    from treeq_engine.runtime.qwenimage21_fused import FusedQwenImage21TransformerBlock

    unswapped_weight_only_and_bf16(tiny_qwenimage21, call, FusedQwenImage21TransformerBlock, PER_FORWARD)


@pytest.mark.gpu
def test_fused_equals_unfused_on_gpu():
    """The same on the GPU's kernels (CUDA or Triton, whichever the dispatcher picks), bf16."""
    gpu_fused_matches(tiny_qwenimage21(), call(dtype=torch.bfloat16), PER_FORWARD)
