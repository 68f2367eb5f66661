"""Fused diffusers DiT / PixArt blocks (runtime.diffusers_fused) compute what the unfused packed model computes,
fall back per sub-step where a layer is not packed with quantized activations, and leave other blocks alone."""
import os

import pytest
import torch
import torch.nn as nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
diffusers = pytest.importorskip("diffusers", reason="diffusers is an optional dependency (requirements-dev.txt)")

from tiny_diffusers import tiny_dit, tiny_pixart  # noqa: E402

from diffusers.models.attention import BasicTransformerBlock  # noqa: E402

from treeq_engine.nn import quantizable_linears  # noqa: E402
from treeq_engine.plan import BranchConfig, LayerConfig, QuantPlan, is_block_layer  # noqa: E402
from treeq_engine.runtime import TreeQLinear, quantize  # noqa: E402
from treeq_engine.runtime.convert import skeleton  # noqa: E402
from treeq_engine.runtime.diffusers_fused import FusedBasicTransformerBlock, fuse_diffusers_blocks  # noqa: E402

BRANCH = LayerConfig(4, 8, branch=BranchConfig("monarch", 4, 1))


def randomize(model):
    gen = torch.Generator().manual_seed(7)   # the same weights for every copy of a model
    with torch.no_grad():  # diffusers zero-inits adaLN-Zero and outputs, which would hide a broken fusion
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model


def build(kind, **kw):
    return randomize(tiny_dit(**kw) if kind == "dit" else tiny_pixart())


def inputs(kind, gen, dtype=torch.float32, mask=True):
    x = dict(hidden_states=torch.randn(2, 4, 8, 8, generator=gen).to(dtype), timestep=torch.tensor([10, 500]))
    if kind == "dit":
        return dict(x, class_labels=torch.tensor([1, 3]))
    x["encoder_hidden_states"] = torch.randn(2, 5, 24, generator=gen).to(dtype)
    if mask:   # as the pipeline passes it: caption tokens past each prompt's length are padding
        x["encoder_attention_mask"] = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    return x


def plan_for(model, low=LayerConfig(3, 4), **changes):
    """W4A8 everywhere in the blocks, with ``low`` layers (another activation spec: their own quantize call) and
    Monarch branches (their own call too; ff.net.2's needs ff.net.0.proj's float rows); ``changes`` (a name ->
    config, None: left 16-bit) on top."""
    b = "transformer_blocks"
    layers = {n: LayerConfig(4, 8) for n in quantizable_linears(model, include=is_block_layer)}
    layers.update({f"{b}.0.attn1.to_k": BRANCH, f"{b}.0.attn1.to_v": low,
                   f"{b}.1.ff.net.0.proj": low, f"{b}.1.ff.net.2": BRANCH})
    if f"{b}.0.attn2.to_q" in layers:
        layers.update({f"{b}.0.attn2.to_v": BRANCH, f"{b}.1.attn2.to_k": low})
    for name, cfg in changes.items():
        layers[name] = cfg
    return QuantPlan({n: c for n, c in layers.items() if c is not None})


def pair(kind, plan, dtype=torch.float32, **kw):
    """(unfused, fused) packed copies of the same model."""
    unfused = quantize(build(kind, **kw), plan, dtype=dtype, fuse=False).to(dtype)
    fused = quantize(build(kind, **kw), plan, dtype=dtype).to(dtype)
    return unfused, fused


def fused_ln_calls(monkeypatch) -> list[str]:
    """The names of the packed layers that run LayerNorm in their quantization kernel from now on (the fused path)."""
    calls = []
    quantize_input = TreeQLinear.quantize_input

    def spy(self, x2, **kw):
        if kw.get("ln_eps") is not None:
            calls.append(self.name)
        return quantize_input(self, x2, **kw)

    monkeypatch.setattr(TreeQLinear, "quantize_input", spy)
    return calls


def n_fused(model):
    return sum(isinstance(m, FusedBasicTransformerBlock) for m in model.modules())


def check_close(unfused, fused, x, dtype=torch.float32):
    with torch.no_grad():
        a, b = unfused(**x).sample, fused(**x).sample
    scale = float(a.float().abs().max())
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(b.float(), a.float(), rtol=0, atol=tol * scale)
    return a, b


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["dit", "pixart"])
def test_fused_equals_unfused(kind, dtype, gen):
    """In bf16 the kernels' float32 LayerNorm + modulate and diffusers' bf16 one differ by bf16 roundings, which a
    4-bit activation grid turns into whole-code flips: there the other spec is A8 (symmetric) instead."""
    low = LayerConfig(3, 4) if dtype == torch.float32 else LayerConfig(3, 8, a_symmetric=True)
    plan = plan_for(build(kind), low)
    unfused, fused = pair(kind, plan, dtype)
    assert n_fused(unfused) == 0 and n_fused(fused) == 2
    assert all(isinstance(b, BasicTransformerBlock) for b in fused.transformer_blocks)
    assert list(fused.state_dict()) == list(unfused.state_dict())
    check_close(unfused, fused, inputs(kind, gen, dtype), dtype)


def test_qkv_share_one_quantize_call(gen, monkeypatch):
    """LayerNorm + modulate + quantization once for to_q, to_k, to_v with one spec and no branch (block 1); block
    0's to_k (branch) and to_v (another spec) get their own; ff.net.0.proj one per block."""
    calls = fused_ln_calls(monkeypatch)
    _, fused = pair("dit", plan_for(build("dit")))
    with torch.no_grad():
        fused(**inputs("dit", gen))
    b = "transformer_blocks"
    assert calls == [f"{b}.0.attn1.to_q", f"{b}.0.attn1.to_k", f"{b}.0.attn1.to_v", f"{b}.0.ff.net.0.proj",
                     f"{b}.1.attn1.to_q", f"{b}.1.ff.net.0.proj"]


def test_fused_block_shares_the_original_modules():
    model = quantize(build("pixart"), plan_for(build("pixart")), dtype=torch.float32, fuse=False)
    before = model.transformer_blocks[0]
    assert fuse_diffusers_blocks(model) == 2 and fuse_diffusers_blocks(model) == 0   # fused blocks stay as they are
    after = model.transformer_blocks[0]
    assert after.attn1 is before.attn1 and after.ff is before.ff and after.scale_shift_table is before.scale_shift_table


@pytest.mark.parametrize("kind", ["dit", "pixart"])
def test_layers_not_packed_with_quantized_activations_fall_back(kind, gen):
    """16-bit and weight-only linears take diffusers' float rows and residual: to_out.0 (block 0: 16-bit, block 1:
    weight-only), to_q (16-bit beside packed to_k/to_v), ff.net.0.proj weight-only (its GELU after it), a 16-bit
    ff.net.2."""
    b = "transformer_blocks"
    plan = plan_for(build(kind), **{f"{b}.0.attn1.to_out.0": None, f"{b}.1.attn1.to_out.0": LayerConfig(4, 16),
                                    f"{b}.1.attn1.to_q": None, f"{b}.0.ff.net.0.proj": LayerConfig(4, 16),
                                    f"{b}.1.ff.net.2": None})
    if kind == "pixart":
        plan = QuantPlan({**plan.layers, f"{b}.0.attn2.to_out.0": LayerConfig(4, 16)})
    unfused, fused = pair(kind, plan)
    assert n_fused(fused) == 2
    check_close(unfused, fused, inputs(kind, gen))


def test_exact_gelu_runs_after_the_epilogue(gen):
    """diffusers' "gelu" (erf) is not the epilogue's tanh GELU: ff.net.0.proj stores its output, GELU follows."""
    plan = plan_for(build("dit", activation_fn="gelu"))
    unfused, fused = pair("dit", plan, activation_fn="gelu")
    assert fused.transformer_blocks[0].ff.net[0].approximate == "none" and n_fused(fused) == 2
    check_close(unfused, fused, inputs("dit", gen))


def test_pixart_masks(gen):
    """No encoder mask, and a self-attention mask (attn1 then runs as the Attention module)."""
    unfused, fused = pair("pixart", plan_for(build("pixart")))
    check_close(unfused, fused, inputs("pixart", gen, mask=False))
    x = inputs("pixart", gen)
    x["attention_mask"] = torch.ones(2, 16)
    x["attention_mask"][0, 10:] = 0
    a, _ = check_close(unfused, fused, x)
    with torch.no_grad():
        assert not torch.allclose(a, unfused(**inputs("pixart", gen)).sample)   # the mask mattered


def test_runtime_fallbacks_run_diffusers_forward(gen, monkeypatch):
    """Chunked feed-forward, cross_attention_kwargs, training mode: diffusers' own forward, exactly (no fused
    LayerNorm in any quantize call)."""
    fused_ln = []
    quantize_input = TreeQLinear.quantize_input

    def spy(self, x2, **kw):
        fused_ln.append(kw.get("ln_eps") is not None)
        return quantize_input(self, x2, **kw)

    monkeypatch.setattr(TreeQLinear, "quantize_input", spy)
    unfused, fused = pair("dit", plan_for(build("dit")))
    x = inputs("dit", gen)
    for m in (unfused, fused):
        for blk in m.transformer_blocks:
            blk.set_chunk_feed_forward(4, 1)
    with torch.no_grad():
        torch.testing.assert_close(fused(**x).sample, unfused(**x).sample, rtol=0, atol=0)
        for m in (unfused, fused):
            for blk in m.transformer_blocks:
                blk.set_chunk_feed_forward(None, 0)
        blk = fused.transformer_blocks[0]
        h = torch.randn(2, 16, 32, generator=gen)
        kw = dict(timestep=x["timestep"], class_labels=x["class_labels"])
        ref = unfused.transformer_blocks[0](h, **kw)
        torch.testing.assert_close(blk(h, cross_attention_kwargs={"unused": 1}, **kw), ref, rtol=0, atol=0)
        blk.train()
        torch.testing.assert_close(blk(h, **kw), ref, rtol=0, atol=0)   # dropout p=0: the identity
        assert fused_ln and not any(fused_ln)
        blk.eval()
        torch.testing.assert_close(blk(h, **kw), ref, rtol=0, atol=1e-4 * float(ref.abs().max()))
        assert any(fused_ln)   # that one was fused


def test_latte_s_spatial_and_temporal_blocks():
    """Latte (Latte-1's configuration: GELU(tanh), LayerNorms without affine) builds PixArt's block twice per layer:
    a spatial one with its cross-attention, a temporal one without; both fuse, fused equals unfused (float32)."""
    import diffusers

    from test_mmdit_fused import count_kernels, pair as model_pair
    from tiny_diffusers import perturbed

    torch.manual_seed(0)
    model = perturbed(diffusers.LatteTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
        cross_attention_dim=16, sample_size=8, patch_size=2, num_embeds_ada_norm=1000, norm_type="ada_norm_single",
        caption_channels=8, video_length=3, activation_fn="gelu-approximate", norm_elementwise_affine=False).eval())
    unfused, fused = model_pair(model, QuantPlan.block_uniform(model, 4, 8))
    assert n_fused(fused) == 4 and fused.temporal_transformer_blocks[0].attn2 is None
    g = torch.Generator().manual_seed(1)
    h, c = torch.randn(2, 4, 3, 8, 12, generator=g), torch.randn(2, 5, 8, generator=g)
    kw = dict(hidden_states=h, encoder_hidden_states=c, timestep=torch.tensor([500, 20]),
              enable_temporal_attentions=True)
    calls, got = count_kernels(fused, kw)
    with torch.no_grad():
        want, fp = unfused(**kw).sample, model(**kw).sample
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert 0 < float((got - fp).norm() / fp.norm()) < 0.15
    # (per block: q/k/v and the feed-forward's LayerNorm-fused quantizations, GELU and fc2's codes in fc1's epilogue;
    # the spatial blocks' cross-attention adds one residual more)
    assert calls == {"ln": 4 * 2, "gelu": 4, "residual": 4 * 2 + 2, "codes_out": 4}


def test_layer_norms_with_an_affine_and_geglu(gen):
    """LayerNorms with an affine (diffusers' default ``norm_elementwise_affine``), folded into the kernel's modulate,
    and a GEGLU feed-forward (diffusers' default activation): the zoo's Latte (both), and DiT with affine norms;
    fused equals unfused, the kernels run (no GELU epilogue for GEGLU's exact GELU)."""
    from diffusers_zoo import CASES
    from test_mmdit_fused import count_kernels, pair as model_pair
    from tiny_diffusers import perturbed

    torch.manual_seed(0)
    latte = perturbed(CASES["Latte"][0]().eval())
    block = latte.transformer_blocks[0]
    assert type(block.ff.net[0]).__name__ == "GEGLU" and block.norm1.weight is not None
    unfused, fused = model_pair(latte, QuantPlan.block_uniform(latte, 4, 8))
    assert n_fused(fused) == 2
    g = torch.Generator().manual_seed(2)
    kw = CASES["Latte"][1](lambda *shape: torch.randn(*shape, generator=g))
    calls, got = count_kernels(fused, kw)
    with torch.no_grad():
        want, fp = unfused(**kw).sample, latte(**kw).sample
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    assert 0 < float((got - fp).norm() / fp.norm()) < 0.15
    # (a spatial and a temporal block: q/k/v and the feed-forward each; gated residuals of attn1 and the feed-forward,
    # and the spatial block's cross-attention's)
    assert calls["ln"] == 2 * 2 and calls["gelu"] == 0 and calls["residual"] == 3 + 2

    def dit_affine():
        m = tiny_dit()
        for blk in m.transformer_blocks:
            blk.norm1.norm, blk.norm3 = nn.LayerNorm(32, eps=1e-6), nn.LayerNorm(32, eps=1e-6)
        m = randomize(m)
        with torch.no_grad():
            for blk in m.transformer_blocks:
                for ln in (blk.norm1.norm, blk.norm3):
                    ln.weight.normal_(1.0, 0.2), ln.bias.normal_(0.0, 0.2)
        return m

    plan = plan_for(build("dit"))
    unfused = quantize(dit_affine(), plan, dtype=torch.float32, fuse=False)
    fused = quantize(dit_affine(), plan, dtype=torch.float32)
    assert n_fused(fused) == len(fused.transformer_blocks)
    check_close(unfused, fused, inputs("dit", gen))
    # batch 1 in float32, where the kernels' table is diffusers' own modulation tensor (no copy), with float sub-steps
    # reading it: a 16-bit to_q, a 16-bit feed-forward projection, a hook on an attention (the fold goes to a copy)
    one = {k: v[:1] for k, v in inputs("dit", gen).items()}
    plan = plan_for(build("dit"), **{"transformer_blocks.1.attn1.to_q": None,
                                     "transformer_blocks.0.ff.net.0.proj": None})
    unfused = quantize(dit_affine(), plan, dtype=torch.float32, fuse=False)
    fused = quantize(dit_affine(), plan, dtype=torch.float32)
    check_close(unfused, fused, one)
    hooks = [m.transformer_blocks[0].attn1.register_forward_pre_hook(lambda *a: None) for m in (unfused, fused)]
    check_close(unfused, fused, one)
    for h in hooks:
        h.remove()


def test_unhandled_blocks_are_left_alone(gen):
    """An RMSNorm where the block has a LayerNorm (block 1) and a block with nothing packed (a plain layer_norm
    block) stay as they are; the rest still fuses."""
    def dit_rms_norm3():
        m = tiny_dit()
        m.transformer_blocks[1].norm3 = nn.RMSNorm(32, eps=1e-5)
        return randomize(m)

    plan = plan_for(build("dit"))
    unfused = quantize(dit_rms_norm3(), plan, dtype=torch.float32, fuse=False)
    fused = quantize(dit_rms_norm3(), plan, dtype=torch.float32)
    assert [type(b) for b in fused.transformer_blocks] == [FusedBasicTransformerBlock, BasicTransformerBlock]
    check_close(unfused, fused, inputs("dit", gen))

    torch.manual_seed(0)
    blocks = nn.ModuleList([BasicTransformerBlock(32, 2, 16, activation_fn="gelu-approximate")])   # "layer_norm"
    names = quantizable_linears(blocks)
    quantize(blocks, QuantPlan({n: LayerConfig(4, 8) for n in names}), dtype=torch.float32)
    assert type(blocks[0]) is BasicTransformerBlock
    dit = quantize(build("dit"), QuantPlan({"proj_out_2": LayerConfig(4, 8)}), dtype=torch.float32)
    assert n_fused(dit) == 0   # no packed layer in any block: nothing to fuse


def test_skeleton_fuses_and_loads(gen):
    plan = plan_for(build("pixart"))
    fused = quantize(build("pixart"), plan, dtype=torch.float32)
    empty = skeleton(build("pixart"), plan, dtype=torch.float32)
    assert n_fused(empty) == 2
    empty.load_state_dict(fused.state_dict())
    x = inputs("pixart", gen)
    with torch.no_grad():
        torch.testing.assert_close(empty(**x).sample, fused(**x).sample, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["dit", "pixart"])
def test_fused_equals_unfused_on_gpu(kind, gen):
    """The same on the GPU's kernels (CUDA or Triton, whichever the dispatcher picks), bf16, layers in the
    fragment layout: the shared q/k/v codes, the epilogue GELU and fc2 codes, the gated residuals in the stores."""
    low = LayerConfig(3, 8, a_symmetric=True)
    plan = plan_for(build(kind), low)
    unfused = quantize(build(kind).cuda(), plan, dtype=torch.bfloat16, fuse=False).to(torch.bfloat16)
    fused = quantize(build(kind).cuda(), plan, dtype=torch.bfloat16).to(torch.bfloat16)
    assert n_fused(fused) == 2
    x = {k: v.cuda() for k, v in inputs(kind, gen, torch.bfloat16).items()}
    with torch.no_grad():
        a, b = unfused(**x).sample.float(), fused(**x).sample.float()
    assert torch.isfinite(b).all()
    # Wider than check_close's bf16 bound, which the CPU test meets at its seed by luck: in bf16 the fused float32
    # LayerNorm + modulate and diffusers' bf16 ones flip A8 codes, which these randomized blocks amplify. Over 100
    # random inputs (CPU, reference backend) the tiny DiT's fused output lies up to 0.04·‖a‖ (norm) and 0.11·max|a|
    # (worst element) from the unfused one, more than 0.03·max|a| for over half of them (its bf16 model is further
    # still from its float32 one); a dropped gate, gate rows of the wrong sample or a dropped residual move it by
    # 0.5–1.5·‖a‖ (0.5–2·max|a| at the worst element).
    assert (b - a).norm() <= 0.08 * a.norm(), f"relative error {float((b - a).norm() / a.norm()):.3g}"
    torch.testing.assert_close(b, a, rtol=0, atol=0.2 * float(a.abs().max()))


def _hooks_api():
    hooks = pytest.importorskip("diffusers.hooks", reason="this diffusers has no hooks API")
    if not all(hasattr(hooks, n) for n in ("HookRegistry", "ModelHook", "LayerSkipConfig", "apply_layer_skip")):
        pytest.skip("this diffusers has no layer-skip hooks")
    return hooks


@pytest.mark.parametrize("skip", ["attention", "ff", "attention_scores", "block"])
def test_diffusers_hooks_on_fused_blocks(skip, gen):
    """diffusers' layer skip (what SkipLayerGuidance applies) hooks the Attention / FeedForward modules, or the block
    looked up by its class in TransformerBlockRegistry: the fused block runs a hooked module as a module (the hook
    takes effect, as on the unfused model) and is registered like BasicTransformerBlock."""
    hooks = _hooks_api()
    cfg = dict(attention=dict(skip_attention=True, skip_ff=False), ff=dict(skip_attention=False, skip_ff=True),
               attention_scores=dict(skip_attention=False, skip_attention_scores=True, skip_ff=False),
               block=dict(skip_attention=True, skip_ff=True))[skip]
    unfused, fused = pair("pixart", plan_for(build("pixart")))
    x = inputs("pixart", gen)
    with torch.no_grad():
        plain = unfused(**x).sample
    for m in (unfused, fused):
        hooks.apply_layer_skip(m, hooks.LayerSkipConfig([0], fqn="transformer_blocks", **cfg))
    a, _ = check_close(unfused, fused, x)
    assert not torch.allclose(a, plain)   # the skip mattered
    assert n_fused(fused) == 2


def test_blocks_hooked_before_fusing(gen, monkeypatch):
    """A block whose forward a diffusers hook wraps stays as it is (the wrapper is bound to that object: a swapped-in
    block would run the old one's forward, unfused); once the hook is removed the block fuses and runs fused, and a
    hook registered on the fused block afterwards runs."""
    hooks = _hooks_api()

    class Count(hooks.ModelHook):
        calls = 0

        def pre_forward(self, module, *args, **kwargs):
            Count.calls += 1
            return args, kwargs

    fused_calls = []
    forward = FusedBasicTransformerBlock.forward

    def spy(self, *args, **kwargs):
        fused_calls.append(self)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(FusedBasicTransformerBlock, "forward", spy)
    plan = plan_for(build("pixart"))
    model = build("pixart")
    hooks.HookRegistry.check_if_exists_or_initialize(model.transformer_blocks[0]).register_hook(Count(), "count")
    registry = hooks.HookRegistry.check_if_exists_or_initialize(model.transformer_blocks[1])
    registry.register_hook(Count(), "gone")
    registry.remove_hook("gone")   # leaves the block's own bound forward and an empty registry behind
    quantize(model, plan, dtype=torch.float32)
    assert [type(b) for b in model.transformer_blocks] == [BasicTransformerBlock, FusedBasicTransformerBlock]
    x = inputs("pixart", gen)
    with torch.no_grad():
        model(**x)
    assert Count.calls == 1 and fused_calls == [model.transformer_blocks[1]]
    hooks.HookRegistry.check_if_exists_or_initialize(model.transformer_blocks[1]).register_hook(Count(), "count")
    with torch.no_grad():
        model(**x)
    assert Count.calls == 3 and len(fused_calls) == 2


def test_hooks_on_linears(gen, monkeypatch):
    """A forward hook on a packed linear the kernels would run (block 0's to_k) makes that attention run as the
    Attention module, so the hook sees the layer's input; a hook on a 16-bit linear (block 1's to_q, which the fused
    path calls as a module anyway; diffusers' layerwise casting hooks those) leaves the attention fused."""
    fused_ln = fused_ln_calls(monkeypatch)
    b = "transformer_blocks"
    unfused, fused = pair("dit", plan_for(build("dit"), **{f"{b}.1.attn1.to_q": None}))
    seen = []
    for name in (f"{b}.0.attn1.to_k", f"{b}.1.attn1.to_q"):
        fused.get_submodule(name).register_forward_pre_hook(lambda mod, args, n=name: seen.append(n))
    check_close(unfused, fused, inputs("dit", gen))
    assert seen == [f"{b}.0.attn1.to_k", f"{b}.1.attn1.to_q"]
    assert fused_ln == [f"{b}.0.ff.net.0.proj", f"{b}.1.attn1.to_k", f"{b}.1.ff.net.0.proj"]


def test_fused_projections_before_quantize_and_pickling(tmp_path):
    """PixArt's legacy attention fuses q/k/v by its processor: a model fused before quantize is refused (its packed
    layers would never run), and once unfused (the processors restored, the flag left set by diffusers) it packs;
    W16 projections of a fused attention are not packed, so not refused. After quantize, fusing is refused and the
    guard survives pickling and deepcopy."""
    import copy

    from treeq_engine.runtime import artifact

    model = build("pixart")
    gen = torch.Generator().manual_seed(1)
    kw = inputs("pixart", gen)
    model.fuse_qkv_projections()
    with pytest.raises(ValueError, match="unfuse_qkv_projections"):
        quantize(model, QuantPlan.block_uniform(model, 8, 8))
    w16 = QuantPlan({n: c for n, c in QuantPlan.block_uniform(model, 8, 8).layers.items()
                     if n.rpartition(".")[2] not in ("to_q", "to_k", "to_v")})
    w16 = w16.with_layer("transformer_blocks.0.attn1.to_q", LayerConfig(16, 16))
    quantize(copy.deepcopy(model), w16)   # (W16: stays the float layer the fused projection copied)
    model.unfuse_qkv_projections()
    assert model.transformer_blocks[0].attn1.fused_projections   # (diffusers leaves it; the processor decides)
    assert hasattr(model.transformer_blocks[0].attn1, "to_qkv")   # (and the dense copy)
    plan = QuantPlan.block_uniform(model, 8, 8)   # (which names only what runs: not the leftover copy)
    assert not any(n.endswith(("to_qkv", "to_kv")) for n in plan.layers)
    with pytest.raises(ValueError, match="no longer runs"):
        quantize(copy.deepcopy(model), plan.with_layer("transformer_blocks.0.attn1.to_qkv", LayerConfig(8, 8)))
    fp = artifact.fingerprint(model, plan)
    quantize(model, plan)
    assert not hasattr(model.transformer_blocks[0].attn1, "to_qkv")   # dropped: a float copy of packed weights
    artifact.save(model, plan, tmp_path / "art", fp_fingerprint=fp)   # and so the artifact loads into a fresh model
    fresh = artifact.load(tmp_path / "art", build("pixart"), dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(fresh(**kw).sample, model(**kw).sample)
    with torch.no_grad():
        want = model(**kw).sample
    for m in (copy.deepcopy(model), torch.load(_saved(model, tmp_path), weights_only=False)):
        with pytest.raises(RuntimeError, match="leave the projections unfused"):
            m.fuse_qkv_projections()
        with torch.no_grad():
            assert torch.equal(m(**kw).sample, want)


def _saved(model, tmp_path):
    path = tmp_path / "model.pt"
    torch.save(model, path)   # (a whole-module pickle, as some serving code keeps models)
    return path


@pytest.mark.parametrize("bounds,rows", [((), 12), ((4, 8), 4), ((6,), 6), ((3, 8), 1)],
                         ids=["per-sample", "frames-of-4", "halves", "ragged"])
def test_a_per_token_modulation_is_grouped_by_the_runs_it_repeats(bounds, rows):
    """``per_token_modulation`` gives the kernels one group per run of rows that every chunk repeats (row m takes
    group m // (M // G)): expanded back, the groups are the per-token table exactly, whatever the runs."""
    from treeq_engine.runtime.diffusers_fused import per_token_modulation

    g = torch.Generator().manual_seed(0)
    b, s, d = 2, 12, 5
    starts = (0, *bounds)
    values = torch.randn(6, b, len(starts), d, generator=g)
    seg = torch.bucketize(torch.arange(s), torch.tensor(bounds or (s,)), right=True)   # (each row's run)
    table = values[:, :, seg]   # (6, B, S, D): constant within each run
    m32 = per_token_modulation(lambda i: table[i].to(torch.bfloat16), b * s)
    assert m32.dtype == torch.float32 and m32.shape == (6, b * s // rows, d)
    expanded = m32.repeat_interleave(b * s // m32.shape[1], dim=1)
    assert torch.equal(expanded, table.to(torch.bfloat16).float().reshape(6, b * s, d))


def test_run_length_finds_the_runs_every_table_repeats(monkeypatch):
    """The largest group size every table's runs of equal rows are made of, in every sample; a table expanded along
    the tokens changes nowhere; while a CUDA graph is captured, a row per group (the runs are the values', which a
    capture cannot read and a replay may change)."""
    from treeq_engine.runtime import diffusers_fused
    from treeq_engine.runtime.diffusers_fused import run_length

    g = torch.Generator().manual_seed(0)
    fours = torch.randn(2, 3, 8, generator=g).repeat_interleave(4, dim=1)   # (2, 12, 8) in runs of 4
    sixes = torch.randn(2, 2, 8, generator=g).repeat_interleave(6, dim=1)
    flat = torch.randn(2, 1, 8, generator=g).expand(2, 12, 8)
    assert (run_length([fours]), run_length([sixes]), run_length([fours, sixes])) == (4, 6, 2)
    assert run_length([flat]) == 12 and run_length([flat, sixes]) == 6
    other = fours.clone()
    other[1, 5] += 1   # (one sample's row breaks a run: every sample's groups follow)
    assert run_length([other]) == 1
    monkeypatch.setattr(diffusers_fused, "_capturing", lambda device: True)
    assert run_length([flat]) == 1


def test_every_fused_class_takes_its_original_s_block_registry_entry():
    """diffusers' block-level hooks read a block's output positions and argument names from
    ``TransformerBlockRegistry``: once a fused class is imported, it has its original's entry, and the original
    keeps diffusers' own, or gets the fused class's where diffusers has none, but for Bria's double block: diffusers
    0.42 says its output 0 is the hidden states, but it returns (encoder_hidden_states, hidden_states), as Flux's does
    (test_flux_copies_fused.py runs a block cache on a partly fused Bria)."""
    import importlib
    import pkgutil

    from diffusers.hooks._helpers import TransformerBlockRegistry

    import treeq_engine.runtime as runtime

    def entry(registry, cls):
        meta = registry[cls]
        return (meta.return_hidden_states_index, meta.return_encoder_hidden_states_index,
                meta.hidden_states_argument_name, meta.encoder_hidden_states_argument_name)

    # diffusers' own entries, registered afresh into an empty registry
    saved = TransformerBlockRegistry._registry, TransformerBlockRegistry._is_registered
    TransformerBlockRegistry._registry, TransformerBlockRegistry._is_registered = {}, False
    try:
        TransformerBlockRegistry._register()
        own = {cls: entry(TransformerBlockRegistry._registry, cls) for cls in TransformerBlockRegistry._registry}
    finally:
        TransformerBlockRegistry._registry, TransformerBlockRegistry._is_registered = saved
    for m in pkgutil.iter_modules(runtime.__path__):
        if m.name.endswith("_fused"):
            importlib.import_module(f"treeq_engine.runtime.{m.name}")
    registry = TransformerBlockRegistry._registry
    fused = [c for c in registry if c.__name__.startswith("Fused")]
    assert len(fused) >= 25
    for cls in fused:
        original = cls.__mro__[1]
        assert entry(registry, cls) == entry(registry, original), cls.__name__
        if original.__name__ == "BriaTransformerBlock":
            assert entry(registry, cls)[:2] == (1, 0) and own[original][:2] == (0, None)
        elif original in own:
            assert entry(registry, original) == own[original], cls.__name__
    kandinsky = [c for c in fused if c.__name__ == "FusedKandinsky5TransformerDecoderBlock"]
    assert [entry(registry, c)[2] for c in kandinsky] == ["visual_embed"]
