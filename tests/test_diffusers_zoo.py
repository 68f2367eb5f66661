"""Every diffusers image and video transformer we could build small packs and runs (`diffusers_zoo.CASES`: 50
classes, Wan, Z-Image, Qwen-Image, HunyuanVideo, LTX, CogVideoX, Lumina2, HiDream, Mochi, Cosmos, Flux.2, FLUX.3, ...):
a uniform W8A8 plan (what `treeq quantize --uniform` packs) in float32 lands near the model's own output, and the
bf16 path (model cast to bf16, layers packed at bf16, bf16 inputs) runs and lands near the bf16 model's output.
These models read things off their linears that code for nn.Linear expects (a weight's dtype, the dtype of a
submodule's first parameter); a packed layer answers them."""
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
diffusers = pytest.importorskip("diffusers", reason="diffusers is an optional dependency (requirements-dev.txt)")

from diffusers_zoo import CASES  # noqa: E402

from treeq_engine.plan import QuantPlan  # noqa: E402
from treeq_engine.runtime import quantize, treeq_layers  # noqa: E402

# Z-Image's W8A8 edge layers (its 256 -> dim timestep MLP) put it above 1e-2; the rest land at 0.5-2e-2
TOL = 0.035
# linears a model holds but does not call on these inputs (packed all the same: a plan names every linear): SANA-WM's
# softmax blocks keep their linear attention's beta and gate projections (the checkpoint has them), and its raymap
# embedder is off where the camera rays come in after the attention
IDLE = {"SanaWM": ["blocks.1.attn.beta_proj", "blocks.1.attn.gate_proj", "raymap_embedder.proj"],
        "Cosmos3": ["lm_head"],   # (the omni model's text head: not run to denoise)
        # (the Sana-WM refiner runs LTX-2's video stream only: its audio and audio-video linears stay idle)
        "SanaWMLTX2Refiner": lambda model: sorted(n for n in treeq_layers(model)
                                                  if "audio" in n or n.startswith("av_cross"))}
# diffusers' own bf16 forward does not run on the CPU (SANA-WM's grid refuses bf16): the bf16 leg is a GPU's; nor
# anywhere for Kandinsky 5 in diffusers 0.42 (its time embedding feeds a float32 sinusoid to a bf16 linear)
NO_CPU_BF16 = {"SanaWM", "Kandinsky5"}


def _idle(name, model):
    idle = IDLE.get(name, [])
    return idle(model) if callable(idle) else idle


def _build(name, dtype):
    ctor, inputs = CASES[name]
    torch.manual_seed(0)
    try:
        model = ctor().eval()
    except AttributeError as e:   # another diffusers release without this class
        if "has no attribute" in str(e) and "diffusers" in str(e):
            pytest.skip(f"this diffusers has no {name} transformer")
        raise
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():   # diffusers zero-initialises adaLN and output layers: perturb, or the output is trivial
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    g1 = torch.Generator().manual_seed(1)
    kw = inputs(lambda *s: torch.randn(*s, generator=g1))
    kw = {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else
          [t.to(dtype) for t in v] if isinstance(v, list) and v and isinstance(v[0], torch.Tensor) else v
          for k, v in kw.items()}
    return model.to(dtype), kw


def _out(model, kw):
    with torch.no_grad():
        o = model(**kw).sample
    return (torch.cat([t.flatten() for t in o]) if isinstance(o, list) else o).float()


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _packed_run(model, kw):
    """The output, and the packed layers that did not run (a layer whose tensors the model reads instead of calling
    it would compute in float, unquantized, without a word)."""
    layers = treeq_layers(model)
    ran = set()
    hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: ran.add(n)) for n, m in layers.items()]
    try:
        return _out(model, kw), sorted(set(layers) - ran)
    finally:
        for h in hooks:
            h.remove()


@pytest.mark.parametrize("name", sorted(CASES))
def test_packs_and_runs(name):
    model, kw = _build(name, torch.float32)
    fp = _out(model, kw)
    plan = QuantPlan.block_uniform(model, 8, 8, pointwise_convs=True)
    quantize(model, plan)   # the default build (bf16 storage rules): the packed layers still say float32
    assert len(treeq_layers(model)) == len(plan.layers) > 0
    assert model.dtype == torch.float32   # what pipelines cast their inputs to
    got, idle = _packed_run(model, kw)
    assert idle == _idle(name, model)
    assert torch.isfinite(got).all() and 0 < _rel(got, fp) < TOL
    if name in NO_CPU_BF16:
        return

    model, kw = _build(name, torch.bfloat16)
    fp16 = _out(model, kw)
    quantize(model, QuantPlan.block_uniform(model, 8, 8, pointwise_convs=True))
    assert model.dtype == torch.bfloat16
    got, idle = _packed_run(model, kw)
    assert idle == _idle(name, model)
    assert torch.isfinite(got).all() and 0 < _rel(got, fp16) < 2 * TOL


def test_a_plan_naming_linears_read_as_tensors_is_refused():
    """HunyuanDiT's attention pool hands its linears' weights to F.multi_head_attention_forward instead of calling
    them: no plan may pack them (they would run dequantized, unquantized, without a word)."""
    from treeq_engine.plan import LayerConfig, PlanError

    model, _ = _build("HunyuanDiT", torch.float32)
    plan = QuantPlan.block_uniform(model, 8, 8, pointwise_convs=True)
    assert not any(".pooler." in n for n in plan.layers)
    bad = plan.with_layer("time_extra_emb.pooler.q_proj", LayerConfig(4, 8))
    with pytest.raises(PlanError, match=r"time_extra_emb.pooler.q_proj.*reads their weights as tensors"):
        quantize(model, bad)



def _attentions(model, packed):
    """The modules with diffusers' fuse_projections whose projections ``packed`` (names) holds."""
    from treeq_engine.runtime.convert import PROJECTIONS

    return [m for a, m in model.named_modules() if callable(getattr(m, "fuse_projections", None))
            and any(f"{a}.{p}" in packed for p in PROJECTIONS)]


@pytest.mark.parametrize("name", sorted(CASES))
def test_projection_fusion_is_refused_on_packed_attention(name):
    """diffusers' fuse_qkv_projections concatenates to_q/to_k/to_v weights into a new dense linear, and a packed layer
    answers `weight` dequantized: after quantize the attention would run that float copy, unquantized. Refused on
    every attention holding packed projections, the output unchanged. Before quantize: a model whose attention runs
    its fused projection (a Fused* processor, or the newer classes' flag) is refused until unfused; one whose
    processor reads the separate projections anyway is not; either way every packed layer then runs."""
    from treeq_engine.runtime.convert import runs_fused_projections

    model, kw = _build(name, torch.float32)
    plan = QuantPlan.block_uniform(model, 8, 8, pointwise_convs=True)
    if not _attentions(model, plan.layers):
        pytest.skip(f"{name}: no attention with fuse_projections has packed projections")
    try:
        if hasattr(model, "fuse_qkv_projections"):
            model.fuse_qkv_projections()
        else:
            _attentions(model, plan.layers)[0].fuse_projections()
    except Exception as e:   # (some attentions cannot fuse even unquantized)
        pytest.skip(f"{name}: fusing projections fails on the float model ({type(e).__name__}: {e})")
    if any(runs_fused_projections(a) for a in _attentions(model, plan.layers)):
        with pytest.raises(ValueError, match="unfuse_qkv_projections"):
            quantize(model, plan)
        if hasattr(model, "unfuse_qkv_projections"):
            model.unfuse_qkv_projections()
        else:   # (fused per attention above: unfused so)
            for a in _attentions(model, plan.layers):   # (the legacy Attention has no unfuse: only [0] was fused)
                getattr(a, "unfuse_projections", lambda: None)()
    _, idle = _packed_run(quantize(model, plan), kw)
    assert idle == _idle(name, model)   # no packed projection left out by a fused one
    # (after, not from, the hooked run: a hook on a packed projection runs a fused block as diffusers computes it,
    # which Z-Image's fused block matches to float rounding only)
    want = _out(model, kw)
    for attn in _attentions(model, treeq_layers(model)):
        with pytest.raises(RuntimeError, match="leave the projections unfused"):
            attn.fuse_projections()
        attn.fuse_projections(False)   # (unfusing what is not fused is allowed)
    assert torch.equal(_out(model, kw), want)


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_uniform_plan_puts_its_bits_on_the_blocks(name):
    """`treeq quantize --uniform W4A8`: every model's repeated blocks take W4A8 and only its edge layers
    (embedders, modulation generators, output head) stay W8A8; blocks named other than ``*blocks.N`` (Lumina2's
    and Z-Image's ``layers.N`` and refiners) once stayed W8A8 whole, without a word."""
    model, _ = _build(name, torch.float32)
    plan = QuantPlan.block_uniform(model, 4, 8, pointwise_convs=True)
    w4 = [n for n, c in plan.layers.items() if c.w_bits == 4]
    assert len(w4) > len(plan.layers) - len(w4) > 0, (len(w4), len(plan.layers))


def test_which_layers_are_block_layers():
    from treeq_engine.plan import is_block_layer

    for name in ("layers.3.attention.to_q", "noise_refiner.0.feed_forward.w1", "context_refiner.1.attention.to_out.0",
                 "transformer_blocks.0.attn.to_q", "single_transformer_blocks.2.proj_mlp", "blocks.7.mlp.fc1",
                 "mode_blocks.image_cond.3.attn.to_q"):
        assert is_block_layer(name), name
    for name in ("distilled_guidance_layer.layers.0.linear_1", "cap_embedder.1", "t_embedder.mlp.0",
                 "transformer_blocks.0.norm1.emb.timestep_embedder.linear_1", "all_final_layer.2-1.linear",
                 "early_stream_modulations.image.linear", "x_embedders.image_cond"):
        assert not is_block_layer(name), name
