"""Fused SANA-WM refiner blocks (`runtime/sanawm_refiner_fused.py`): through the refiner pipeline's chunk-causal loop
(the sink captured before the rotary embedding, windows denoised against [sink | history | active], each window then
captured after it and appended to the history) the fused model's outputs and KV cache equal the unfused packed
model's (float32, the reference backend: the RMSNorm + modulate in the quantization kernels of to_q/k/v and
ff.net[0].proj, GELU(tanh) and ff.net[2]'s codes in its epilogue, the gated residuals in to_out's and ff.net[2]'s);
the fused kernels run, with LTX-2.3's per-head gate too; and what the fused path cannot reproduce runs diffusers' own
forward."""
import copy

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="diffusers is an optional dependency (requirements-dev.txt)")
refiner = pytest.importorskip("diffusers.models.transformers.transformer_sana_wm_refiner",
                              reason="diffusers before SANA-WM")

from test_mmdit_fused import count_kernels, on_gpu, pair  # noqa: E402
from test_zimage_fused import close  # noqa: E402
from tiny_diffusers import perturbed  # noqa: E402
from tinydit import one_thread  # noqa: E402,F401

from treeq_engine.plan import BranchConfig, LayerConfig, QuantPlan  # noqa: E402
from treeq_engine.runtime import quantize  # noqa: E402
from treeq_engine.runtime.sanawm_refiner_fused import FusedSanaWMLTX2RefinerTransformerBlock  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
# per block: one RMSNorm-fused quantization for q/k/v and one for ff.net[0].proj, GELU and ff.net[2]'s codes in its
# epilogue, the gated residuals in to_out[0]'s and ff.net[2]'s (the text cross-attention runs as diffusers' module)
PER_FORWARD = {"ln": 2 * 2, "gelu": 2, "residual": 2 * 2, "codes_out": 2}
HW = 4   # latent frames of 4x4 tokens


def tiny(**config):
    """A refiner of two blocks (LTX-2's structure, audio streams idle; random weights, perturbed off diffusers' zero
    initialisations)."""
    torch.manual_seed(0)
    return perturbed(refiner.SanaWMLTX2RefinerTransformer3DModel(**dict(
        in_channels=4, out_channels=4, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=8,
        cross_attention_dim=16, audio_in_channels=4, audio_out_channels=4, audio_num_attention_heads=2,
        audio_attention_head_dim=4, audio_cross_attention_dim=8, num_layers=2, caption_channels=16,
        rope_double_precision=False) | config).eval())


def window(model, frames, cache, mode, seed=0, dtype=torch.float32, n=2, timesteps=(500.0, 250.0)):
    """One forward's call: latents of ``frames`` (absolute positions, their rotary embedding as the pipeline builds
    it), a timestep per token (each frame its own: the model takes any), a masked prompt, the cache and its mode."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    t = torch.tensor([timesteps[i % len(timesteps)] for i in range(len(frames))]).repeat_interleave(HW * HW)
    return dict(hidden_states=r(n, len(frames) * HW * HW, 4), encoder_hidden_states=r(n, 8, 16),
                timestep=t.expand(n, -1), encoder_attention_mask=torch.arange(8)[None] < torch.tensor([[8], [5]])[:n],
                video_rotary_emb=model.build_rotary_emb_for_absolute_positions(n, list(frames), HW, HW, "cpu", 24.0),
                kv_cache=cache, kv_cache_mode=mode)


def run(model, kw):
    with torch.no_grad():
        return model(**kw).sample


def refine(model, seed=0, dtype=torch.float32, n=2):
    """The refiner pipeline's loop (``SanaWMRefinerPipeline``'s ``rf_shifted_sink`` contract) with a one-frame sink
    and windows of two frames: the sink captured pre-RoPE; each window denoised twice against [sink | history |
    active] (the sink's rotary embedding slid to sit before the history), then captured post-RoPE and appended to
    the history. Returns every forward's output, and the cache."""
    cache = refiner.SanaWMRefinerKVCache(len(model.transformer_blocks))
    outs = [run(model, window(model, [0], cache, "capture_pre_rope", seed, dtype, n, timesteps=(0.0,)))]
    for layer in cache.layer_caches:
        layer.store_sink(*layer.get_captured_pre_rope())
    history = 0
    for start in (1, 3):
        cache.sink_pe = model.build_rotary_emb_for_absolute_positions(n, [start - history - 1], HW, HW, "cpu", 24.0)
        frames = [start, start + 1]
        kw = window(model, frames, cache, "inject", seed + start, dtype, n)
        for t in (900.0, 400.0):
            kw["timestep"] = torch.full_like(kw["timestep"], t)
            v = run(model, kw)
            outs.append(v)
            kw["hidden_states"] = kw["hidden_states"] - 0.5 * v
        outs.append(run(model, {**kw, "timestep": torch.zeros_like(kw["timestep"]),
                                "kv_cache_mode": "inject_and_capture_post_rope"}))
        for layer in cache.layer_caches:
            key, value = layer.get_captured_post_rope()
            old = layer.get_history()
            layer.store_history(*((key, value) if old is None else
                                  (torch.cat([old[0], key], 1), torch.cat([old[1], value], 1))))
        history += len(frames)
    return outs, cache


def mixed(model):
    plan = QuantPlan.block_uniform(model, 4, 8)
    return plan.with_layer("transformer_blocks.0.attn1.to_k", LayerConfig(16, 16)) \
        .with_layer("transformer_blocks.0.ff.net.2", LayerConfig(16, 16)) \
        .with_layer("transformer_blocks.1.attn1.to_out.0", LayerConfig(16, 16)) \
        .with_layer("transformer_blocks.1.attn1.to_q", LayerConfig(4, 4)) \
        .with_layer("transformer_blocks.1.ff.net.0.proj", LayerConfig(4, 8, branch=BranchConfig("monarch", 2)))


def cached_window(model, seed=0, device="cpu"):
    """An ``"inject"`` call of frames 3 and 4 against a cache of a random sink (frame 0) and history (frames 1, 2)
    on ``device``, as the pipeline's third window sees it."""
    g = torch.Generator().manual_seed(seed + 100)
    cache = refiner.SanaWMRefinerKVCache(len(model.transformer_blocks))
    for layer in cache.layer_caches:
        layer.store_sink(*(torch.randn(2, HW * HW, 16, generator=g).to(device) for _ in range(2)))
        layer.store_history(*(torch.randn(2, 2 * HW * HW, 16, generator=g).to(device) for _ in range(2)))
    cache.sink_pe = tuple(t.to(device) for t in model.build_rotary_emb_for_absolute_positions(2, [0], HW, HW,
                                                                                               "cpu", 24.0))
    kw = window(model, [3, 4], cache, "inject", seed)
    kw["video_rotary_emb"] = tuple(t.to(device) for t in kw["video_rotary_emb"])
    return kw


def caches(cache):
    return [t for layer in cache.layer_caches for t in (layer.sink_k_pre, layer.sink_v, layer.history_k,
                                                        layer.history_v)]


@pytest.mark.parametrize("kind", ["W8A8", "W4A8", "mixed"])
@pytest.mark.parametrize("config", [{}, {"gated_attn": True, "rope_type": "split"}], ids=["refiner", "gated-split"])
def test_the_refinement_loop_equals_the_unfused_model(kind, config):
    model = tiny(**config)
    plan = mixed(model) if kind == "mixed" else QuantPlan.block_uniform(model, int(kind[1]), int(kind[3]))
    unfused, fused = pair(model, plan)
    assert [type(b) for b in fused.transformer_blocks] == [FusedSanaWMLTX2RefinerTransformerBlock] * 2
    assert fused.state_dict().keys() == unfused.state_dict().keys()
    (want, want_cache), (got, got_cache), (fp, _) = refine(unfused), refine(fused), refine(model)
    assert len(got) == 7
    for g, w, f in zip(got, want, fp, strict=True):
        close(g, w)
        assert 0 < float((g - f).norm() / f.norm()) < 0.3
    for g, w in zip(caches(got_cache), caches(want_cache), strict=True):
        assert g.shape == w.shape
        close(g, w)
    if kind == "W4A8":
        for mode in (None, "inject", "inject_and_capture_post_rope", "capture_pre_rope"):
            kw = window(fused, [5, 6], got_cache, mode)
            calls, out = count_kernels(fused, kw)
            assert calls == PER_FORWARD, mode
            close(out, run(unfused, window(unfused, [5, 6], want_cache, mode)))


def test_what_the_fused_path_cannot_run_runs_diffusers_forward():
    model = tiny()
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 4, 8))
    _, cache = refine(unfused)
    kw = window(fused, [5, 6], cache, "inject")
    want = run(unfused, kw)
    full = PER_FORWARD["ln"]
    for part, fewer in [("norm1", 2), ("norm3", 2), ("attn1", 2), ("attn1.to_v", 2), ("attn1.to_out.1", 2),
                        ("ff", 1), ("ff.net.2", 1), ("attn1.to_out.0", 2), ("attn2", 0), ("attn2.to_q", 0)]:
        seen = []
        hook = fused.transformer_blocks[0].get_submodule(part).register_forward_pre_hook(lambda *a: seen.append(1))
        calls, got = count_kernels(fused, kw)
        hook.remove()
        assert seen and calls["ln"] == full - fewer, part
        close(got, want)
    other = type("OtherProcessor", (refiner.SanaWMLTX2RefinerAttnProcessor,), {})
    fused.transformer_blocks[1].attn1.set_processor(other())
    calls, got = count_kernels(fused, kw)
    assert calls["ln"] == full // 2
    close(got, want)
    fused.train()
    assert count_kernels(fused, kw)[0]["ln"] == 0
    fused.eval()

    # (a block called on its own: a mode without a cache raises where diffusers' raises)
    block, plain = fused.transformer_blocks[0], unfused.transformer_blocks[0]
    args = (torch.randn(2, 16, 16), torch.randn(2, 8, 16), torch.randn(2, 16, 6 * 16),
            model.build_rotary_emb_for_absolute_positions(2, [1], HW, HW, "cpu", 24.0))
    for b in (block, plain):
        with pytest.raises(AttributeError, match="get_sink"), torch.no_grad():
            b(*args, kv_cache_mode="inject")

    nine = tiny(cross_attn_mod=True)   # (nine vectors: the refiner's forward unpacks six and raises)
    q = quantize(copy.deepcopy(nine), QuantPlan.block_uniform(nine, 4, 8), dtype=torch.float32)
    assert not any(isinstance(b, FusedSanaWMLTX2RefinerTransformerBlock) for b in q.transformer_blocks)
    with pytest.raises(ValueError, match="FusedSanaWMLTX2RefinerTransformerBlock handles"):
        FusedSanaWMLTX2RefinerTransformerBlock(q.transformer_blocks[0])


def test_float_layers_run_as_diffusers_runs_them():
    """The per-head gate's and to_v's linears at W16 run as modules, hooks and all, in the processor's order (the
    gate first), while the kernels run the rest; a rotary type set after fusing raises diffusers' error."""
    model = tiny(gated_attn=True)
    plan = QuantPlan.block_uniform(model, 4, 8).with_layer("transformer_blocks.0.attn1.to_gate_logits",
                                                           LayerConfig(16, 16)) \
        .with_layer("transformer_blocks.0.attn1.to_v", LayerConfig(16, 16))
    unfused, fused = pair(model, plan)
    kw = cached_window(model)
    orders = []
    for m in (unfused, fused):
        attn, seen = m.transformer_blocks[0].attn1, []
        hooks = [getattr(attn, n).register_forward_pre_hook(lambda *a, n=n: seen.append(n))
                 for n in ("to_gate_logits", "to_v")]
        calls, out = count_kernels(m, kw)
        for h in hooks:
            h.remove()
        orders.append((seen, calls["ln"], out))
    (want_order, none, want), (got_order, ln, got) = orders
    assert got_order == want_order == ["to_gate_logits", "to_v"] and none == 0 and ln == PER_FORWARD["ln"]
    close(got, want)
    for m in (unfused, fused):
        m.transformer_blocks[1].attn1.rope_type = "other"
        with pytest.raises(ValueError, match="Unsupported LTX-2 RoPE type"):
            run(m, kw)


def test_bf16_and_only_blocks_with_something_to_fuse():
    model = tiny().to(torch.bfloat16)
    unfused, fused = pair(model, QuantPlan.block_uniform(model, 8, 8), dtype=torch.bfloat16)
    _, cache = refine(unfused, dtype=torch.bfloat16)
    kw = window(model, [5, 6], cache, "inject", dtype=torch.bfloat16)
    want = run(unfused, kw).float()
    calls, got = count_kernels(fused, kw)
    assert calls == PER_FORWARD and got.dtype == torch.bfloat16
    got = got.float()
    assert torch.isfinite(got).all() and float((got - want).norm() / want.norm()) < 2e-2
    weight_only = quantize(copy.deepcopy(model), QuantPlan.block_uniform(model, 4, 16), dtype=torch.bfloat16)
    assert not any(isinstance(b, FusedSanaWMLTX2RefinerTransformerBlock) for b in weight_only.transformer_blocks)


@pytest.mark.gpu
def test_fused_equals_unfused_on_gpu():
    """On the GPU's kernels (CUDA or Triton, whichever the dispatcher picks), bf16, W4A8, a window against a cache
    of a sink and a history: the fused kernels run, within 8 % of the unfused model."""
    model = tiny()
    plan = QuantPlan.block_uniform(model, 4, 8)
    unfused = quantize(copy.deepcopy(model).cuda(), plan, dtype=torch.bfloat16, fuse=False).to(torch.bfloat16)
    fused = quantize(copy.deepcopy(model).cuda(), plan, dtype=torch.bfloat16).to(torch.bfloat16)
    kw = cached_window(model, device="cuda")
    kw = {**on_gpu(kw), "video_rotary_emb": kw["video_rotary_emb"]}   # (the rotary embedding in float32)
    calls, b = count_kernels(fused, kw)
    assert calls == PER_FORWARD
    a = run(unfused, kw).float()
    b = b.float()
    assert torch.isfinite(b).all()
    assert (b - a).norm() <= 0.08 * a.norm(), f"relative error {float((b - a).norm() / a.norm()):.3g}"
