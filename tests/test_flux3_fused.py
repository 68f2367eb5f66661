"""Fused FLUX.3 blocks (`runtime/flux3_fused.py`): what they compute equals the unfused packed model (float32, the
reference backend: LayerNorm + modulate in the quantization kernel per stream, the gated sum of the attention and
the feed-forward in two epilogues), text to image and with a reference image; the per-token tables reach the
kernels as one modulation group per run of tokens; the fused kernels actually run; and everything the fused path
cannot reproduce runs diffusers' own forward: hooks, training, another attention processor."""
import copy
import weakref

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="diffusers is an optional dependency (requirements-dev.txt)")

from test_mmdit_fused import count_kernels, gpu_fused_matches, half_agrees, hooked_parts_fall_back, pair  # noqa: E402
from test_zimage_fused import close  # noqa: E402
from tiny_diffusers import perturbed  # noqa: E402
from tinydit import one_thread  # noqa: E402,F401

from treeq_engine.plan import BranchConfig, LayerConfig, QuantPlan  # noqa: E402
from treeq_engine.runtime import quantize  # noqa: E402
from treeq_engine.runtime.flux3_fused import FusedFlux3ModeTransformerBlock, FusedFlux3SingleTransformerBlock  # noqa

pytestmark = pytest.mark.usefixtures("one_thread")


def per_forward(cond=True):
    """A block: one LayerNorm-fused quantization (q/k/v and linear_in), the gated sum in to_out's and linear_out's
    epilogues (the joint block's on [text; content] as one). Two blocks per mode (the reference image's run only with
    one), two joint blocks."""
    blocks = 2 * (3 if cond else 2) + 2
    return {"ln": blocks, "gelu": 0, "residual": 2 * blocks, "codes_out": 0}


def tiny_flux3(flow_map=False):
    torch.manual_seed(0)
    return perturbed(diffusers.Flux3Transformer2DModel(
        in_channels=4, cond_in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, timestep_channels=256, axes_dims_rope=(4, 4, 4, 4),
        flow_map=flow_map).eval())


def _ids(*sizes, last=None):
    ids = torch.cartesian_prod(*map(torch.arange, sizes)).float()
    if last is not None:
        ids[:, -1] = last
    return ids


def call(n=2, seed=0, cond=True, dtype=torch.float32, cond_rows=2, target=False):
    """The pipeline's call: 4x4 image tokens, 8 text tokens, with ``cond`` a ``cond_rows``x4 reference image (its
    ids at l = -1), a timestep per sample (and with ``target`` the flow map's target timestep)."""
    g = torch.Generator().manual_seed(seed)
    kw = dict(hidden_states=torch.randn(n, 16, 4, generator=g).to(dtype),
              encoder_hidden_states=torch.randn(n, 8, 32, generator=g).to(dtype),
              timestep=torch.tensor([0.5, 0.2, 0.9][:n]).to(dtype), img_ids=_ids(1, 4, 4, 1), txt_ids=_ids(1, 1, 1, 8))
    if cond:
        kw.update(image_cond_hidden_states=torch.randn(n, 4 * cond_rows, 4, generator=g).to(dtype),
                  image_cond_ids=_ids(1, cond_rows, 4, 1, last=-1))
    if target:
        kw["target_timestep"] = torch.tensor([0.3, 0.1, 0.6][:n]).to(dtype)
    return kw


def mixed(model):
    """Block layers at assorted formats: W16 (the float paths: a float to_k, and a float linear_out leaves the gated
    sum to torch), a branch (its own quantization call), to_q at another activation spec than to_k/to_v (no shared
    call), the rest W4A8."""
    plan = QuantPlan.block_uniform(model, 4, 8)
    return plan.with_layer("mode_blocks.image.0.attn.to_k", LayerConfig(16, 16)) \
        .with_layer("txt_mode_blocks.1.ff.linear_out", LayerConfig(16, 16)) \
        .with_layer("single_transformer_blocks.0.attn.to_q", LayerConfig(4, 4)) \
        .with_layer("single_transformer_blocks.1.ff.linear_in", LayerConfig(4, 8, branch=BranchConfig("monarch", 2))) \
        .with_layer("mode_blocks.image_cond.0.attn.to_out.0", LayerConfig(16, 16)) \
        .with_layer("single_transformer_blocks.1.attn.to_k", LayerConfig(16, 16))


def blocks(model):
    return [m for m in model.modules() if isinstance(m, (FusedFlux3ModeTransformerBlock,
                                                         FusedFlux3SingleTransformerBlock))]


@pytest.mark.parametrize("kind", ["W8A8", "W4A8", "mixed"])
def test_fused_equals_unfused(kind):
    model = tiny_flux3()
    plan = mixed(model) if kind == "mixed" else QuantPlan.block_uniform(model, int(kind[1]), int(kind[3]))
    unfused, fused = pair(model, plan)
    assert len(blocks(fused)) == 3 * 2 + 2
    assert fused.state_dict().keys() == unfused.state_dict().keys()
    for kw in (call(), call(n=3, seed=1, cond=False), call(n=1, seed=2)):
        with torch.no_grad():
            want, got, fp = unfused(**kw).sample, fused(**kw).sample, model(**kw).sample
        # (measured: 1e-7 relative but in one case of nine, 3.7e-6: an activation code within an ulp of a rounding
        # boundary takes the next code; a dropped gate, norm or modulation moves the output by far more)
        close(got, want, bound=1e-4)
        assert 0 < float((got - fp).norm() / fp.norm()) < 0.1


def recorded_groups(monkeypatch):
    """The modulation groups of each kernel table the fused blocks build, in order (a list filled as they run)."""
    from treeq_engine.runtime import flux3_fused

    groups, original = [], flux3_fused.per_token_modulation

    def recording(chunk, rows, chunks):
        m32 = original(chunk, rows, chunks)
        groups.append(m32.shape[1])
        return m32

    monkeypatch.setattr(flux3_fused, "per_token_modulation", recording)
    return groups


def test_a_flow_map_and_runs_of_other_lengths():
    """A flow map (the target timestep's embedding added to every mode's) and a reference image of 12 tokens: the
    joint rows [8; 16; 12] per sample run in groups of 4."""
    model = tiny_flux3(flow_map=True)
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    for kw in (call(target=True, cond_rows=3), call(n=1, target=True, cond=False)):
        with torch.no_grad():
            close(fused(**kw).sample, unfused(**kw).sample, bound=1e-4)


def test_the_kernels_take_a_group_per_run_of_tokens(monkeypatch):
    """Each mode's table repeats one row per sample: one group per sample. The joint blocks' rows, [8 text; 16 image;
    8 reference] per sample, run in groups of 8 (4 per sample). Each is found once per forward, not per block."""
    model = tiny_flux3()
    _, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    groups = recorded_groups(monkeypatch)
    with torch.no_grad():
        fused(**call(n=2))
    assert groups == [2, 2, 2, 2 * 4]   # (the text's mode, the image's, the reference image's, the joint blocks')


def test_the_fused_kernels_run_and_what_they_cannot_run_runs_diffusers_forward():
    from diffusers.models.transformers.transformer_flux3 import Flux3AttnProcessor

    model = tiny_flux3()
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    for cond in (True, False):
        assert count_kernels(fused, call(cond=cond))[0] == per_forward(cond)
        assert count_kernels(unfused, call(cond=cond))[0] == {k: 0 for k in per_forward()}
    kw = call()
    with torch.no_grad():
        want = unfused(**kw).sample
    full = per_forward()["ln"]
    # a hook on the norm, the attention, the feed-forward or its SwiGLU, or a linear the kernels run: diffusers'
    # forward for that block
    hooked_parts_fall_back(fused, fused.mode_blocks["image"][0], ("norm", "attn", "attn.to_k", "attn.to_out.1", "ff",
                                                                  "ff.act_fn", "ff.linear_in", "ff.linear_out"),
                           kw, want, full - 1)
    hooked_parts_fall_back(fused, fused.single_transformer_blocks[1], ("norm", "attn.to_v", "attn.to_out.0"), kw,
                           want, full - 1)
    block = fused.txt_mode_blocks[0]
    block.attn.set_processor(type("OtherProcessor", (Flux3AttnProcessor,), {})())   # (computes what it likes)
    calls, got = count_kernels(fused, kw)
    assert calls["ln"] == full - 1
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    fused.train()
    calls, got = count_kernels(fused, kw)
    assert calls["ln"] == 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_while_a_cuda_graph_is_captured_the_kernels_take_a_row_per_group(monkeypatch):
    """A capture cannot read the runs off the values (nor may a replay's timesteps keep them): a group per row, and
    the same output."""
    from treeq_engine.runtime import diffusers_fused

    model = tiny_flux3()
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    groups = recorded_groups(monkeypatch)
    monkeypatch.setattr(diffusers_fused, "_capturing", lambda device: True)
    kw = call()
    with torch.no_grad():
        close(fused(**kw).sample, unfused(**kw).sample, bound=1e-4)
    assert groups == [2 * 8, 2 * 16, 2 * 8, 2 * 32]   # (every row of the text's, image's, reference's, joint tables)


def test_the_kernel_tables_are_found_once_per_forward_and_never_for_other_tensors():
    """The cache of the kernels' tables answers only for the very tables it was computed from, unmodified: not for
    a new table at a dead one's address (CPython reuses ids), nor for one changed in place."""
    from treeq_engine.runtime.flux3_fused import _kernel_tables
    from treeq_engine.runtime.diffusers_fused import per_token_modulation

    def fresh(t):
        return per_token_modulation(lambda i: t[..., 8 * i:8 * (i + 1)], t.shape[0] * t.shape[1], chunks=3)

    g = torch.Generator().manual_seed(0)
    t = torch.randn(2, 4, 24, generator=g)
    assert _kernel_tables([t], 8) is _kernel_tables([t], 8)
    t.add_(1.0)   # (in place: its version moves)
    torch.testing.assert_close(_kernel_tables([t], 8), fresh(t), rtol=0, atol=0)
    # What the cache holds when a dead table's address is given to a new one (CPython reuses ids, though not on
    # cue, so the state is planted): the entry under the new table's id, whose weak reference is dead.
    from treeq_engine.runtime import diffusers_fused
    dead = torch.randn(2, 4, 24, generator=g)
    ref = weakref.ref(dead)
    del dead
    assert ref() is None
    t = torch.randn(2, 4, 24, generator=g)
    diffusers_fused._ONCE[(id(t),)] = ([ref], [t._version], torch.zeros(3, 8, 8))
    torch.testing.assert_close(_kernel_tables([t], 8), fresh(t), rtol=0, atol=0)
    with torch.inference_mode():   # (tensors without a version counter: cached while they live)
        u = torch.randn(2, 4, 24, generator=g)
        assert _kernel_tables([u], 8) is _kernel_tables([u], 8)
        torch.testing.assert_close(_kernel_tables([u], 8), fresh(u), rtol=0, atol=0)
    for _ in range(5):   # (and unplanted, whatever addresses the allocator hands out)
        del t
        t = torch.randn(2, 4, 24, generator=g)
        torch.testing.assert_close(_kernel_tables([t], 8), fresh(t), rtol=0, atol=0)
    # the tables are let go when their tensors die (a forward's end), not held until the next computation
    key = (id(t),)
    assert key in diffusers_fused._ONCE
    del t
    assert key not in diffusers_fused._ONCE


def test_a_table_changed_in_place_keeps_one_finalizer():
    """A table changed in place between calls (a static buffer refilled each step) is computed again each time but
    holds one finalizer, not one per call."""
    from treeq_engine.runtime import diffusers_fused
    from treeq_engine.runtime.flux3_fused import _kernel_tables

    registered = []
    real = weakref.finalize
    t = torch.randn(2, 4, 24, generator=torch.Generator().manual_seed(0))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(weakref, "finalize", lambda obj, *a: registered.append(obj) or real(obj, *a))
        for _ in range(4):
            t.add_(1.0)
            _kernel_tables([t], 8)
    assert len(registered) == 1 and registered[0] is t and (id(t),) in diffusers_fused._ONCE


def test_the_processor_s_attention_backend_and_what_a_block_is_handed():
    """The attention runs on the processor's backend; a block handed a table per sample (B, 1, 3·D), which diffusers
    broadcasts, or no rotary table runs as diffusers computes it; a block of another structure (a LayerNorm with
    affine) is not swapped."""
    from diffusers.models.attention_dispatch import AttentionBackendName

    from treeq_engine.runtime import flux3_fused

    model = tiny_flux3()
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    backends, original = [], flux3_fused.dispatch_attention_fn

    def dispatch(*a, backend=None, **k):
        backends.append(backend)
        return original(*a, backend=None, **k)

    for m in fused.modules():
        if hasattr(m, "processor"):
            m.processor._attention_backend = AttentionBackendName.NATIVE
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(flux3_fused, "dispatch_attention_fn", dispatch)
        with torch.no_grad():
            fused(**call())
    assert backends == [AttentionBackendName.NATIVE] * 8
    g = torch.Generator().manual_seed(4)
    x, table = torch.randn(2, 16, 32, generator=g), torch.randn(2, 1, 96, generator=g)
    rotary = model.pos_embed(_ids(1, 4, 4, 1))
    with torch.no_grad():
        for tab, rot in ((table, rotary), (table.expand(2, 16, 96).contiguous(), None)):
            want = unfused.mode_blocks["image"][0](x, tab, rot)
            close(fused.mode_blocks["image"][0](x, tab, rot), want, bound=1e-5)
    model.single_transformer_blocks[0].norm = torch.nn.LayerNorm(32, elementwise_affine=True, eps=1e-6)
    fused = quantize(copy.deepcopy(model), QuantPlan.block_uniform(model, 4, 8), dtype=torch.float32)
    assert type(fused.single_transformer_blocks[0]).__name__ == "Flux3SingleTransformerBlock"
    assert isinstance(fused.single_transformer_blocks[1], FusedFlux3SingleTransformerBlock)


def test_float_linears_run_as_modules():
    """A float to_out and linear_out (W16) run as modules, hooks and all, and the gated sum as diffusers computes
    it; the block's other linears stay fused."""
    model = tiny_flux3()
    plan = QuantPlan.block_uniform(model, 4, 8)
    for n in ("to_out.0", "linear_out"):
        plan = plan.with_layer(f"single_transformer_blocks.0.{'attn.' if n == 'to_out.0' else 'ff.'}{n}",
                               LayerConfig(16, 16))
    unfused, fused = pair(model, plan)
    kw = call()
    seen = []
    block = fused.single_transformer_blocks[0]
    hooks = [block.get_submodule(n).register_forward_hook(lambda *a: seen.append(1))
             for n in ("attn.to_out.0", "ff.linear_out")]
    calls, got = count_kernels(fused, kw)
    for h in hooks:
        h.remove()
    assert len(seen) == 2 and calls["ln"] == per_forward()["ln"]
    assert calls["residual"] == per_forward()["residual"] - 2
    with torch.no_grad():
        torch.testing.assert_close(got, unfused(**kw).sample, rtol=1e-5, atol=1e-5)


def test_only_blocks_with_something_to_fuse_are_swapped_and_bf16():
    model = tiny_flux3()
    weight_only = quantize(copy.deepcopy(model), QuantPlan.block_uniform(model, 4, 16), dtype=torch.float32)
    assert not blocks(weight_only)
    fused = half_agrees(tiny_flux3().to(torch.bfloat16), call(dtype=torch.bfloat16))
    assert count_kernels(fused, call(dtype=torch.bfloat16))[0] == per_forward()


@pytest.mark.gpu
def test_fused_equals_unfused_on_gpu():
    """The same on the GPU's kernels (CUDA or Triton, whichever the dispatcher picks), bf16, with a reference
    image."""
    gpu_fused_matches(tiny_flux3(), call(dtype=torch.bfloat16), per_forward())
