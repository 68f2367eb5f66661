"""SmoothQuant in Wan, Qwen-Image and Sana blocks: every site folds exactly (the transformer computes what it did;
each consumer reads ``x/s`` with weight ``W·diag(s)``), what cannot fold is refused with the reason, and PTQ with
smoothing calibrates, re-folds from its directory and packs."""
import copy
import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
diffusers = pytest.importorskip("diffusers", reason="diffusers is an optional dependency (requirements-dev.txt)")

from test_search_qwen import call as qwen_call  # noqa: E402
from test_search_sana import call as sana_call  # noqa: E402
from test_search_ltx import call as ltx_call  # noqa: E402
from test_search_wan import call as wan_call  # noqa: E402
from test_search_zimage import call as zimage_call  # noqa: E402
from test_search_wan import tiny_wan  # noqa: E402
from tiny_diffusers import perturbed, tiny_flux2, tiny_ltx, tiny_qwen, tiny_sana, tiny_zimage  # noqa: E402
from tinydit import one_thread  # noqa: E402,F401

from treeq_engine.calib import smooth  # noqa: E402
from treeq_engine.calib.capture import capture_inputs  # noqa: E402
from treeq_engine.plan import QuantPlan  # noqa: E402
from treeq_engine.search import make_runner  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

# per model: a builder, its call, the sites of block 1 named by one of their consumers, the block-1 site keys a
# W4A4 plan smooths
CASES = {
    "wan": (lambda: perturbed(tiny_wan()), lambda m: wan_call(m, n=2, seed=4),
            ("attn1.to_out.0", "attn2.to_q", "attn2.to_out.0"), {"attn1.to_out.0", "attn2.to_q", "attn2.to_out.0"}),
    "wan-i2v": (lambda: perturbed(tiny_wan(image=True)), lambda m: wan_call(m, n=2, seed=4),
                ("attn2.to_out.0", "attn2.to_q"), {"attn1.to_out.0", "attn2.to_q", "attn2.to_out.0"}),
    "qwen": (tiny_qwen, lambda m: qwen_call(n=2, seed=4),
             ("attn.to_k", "attn.add_v_proj", "img_mlp.net.0.proj", "txt_mlp.net.0.proj"),
             {"attn.to_q", "attn.add_q_proj", "img_mlp.net.0.proj", "txt_mlp.net.0.proj"}),
    "sana": (tiny_sana, lambda m: sana_call(n=2, seed=4),
             ("attn1.to_out.0", "attn2.to_out.0", "ff.conv_point"), {"attn1.to_out.0", "attn2.to_out.0",
                                                                     "ff.conv_point"}),
    "sana-sprint": (lambda: tiny_sana(sprint=True), lambda m: {**sana_call(n=2, seed=4), "guidance": torch.ones(2)},
                    ("attn1.to_out.0", "ff.conv_point"), {"attn1.to_out.0", "attn2.to_out.0", "ff.conv_point"}),
    # (and the refiners' blocks: the noise refiner's modulated, the context refiner's not)
    "zimage": (tiny_zimage, lambda m: zimage_call(lens=(7, 40, 3), seed=4),
               ("attention.to_k", "attention.to_out.0", "feed_forward.w3", "feed_forward.w2",
                "../noise_refiner.0.attention.to_v", "../context_refiner.0.feed_forward.w1",
                "../context_refiner.0.feed_forward.w2"),
               {"attention.to_q", "attention.to_out.0", "feed_forward.w1", "feed_forward.w2"}),
    # (and the single blocks' output projection: the attention's values and the SwiGLU's, one fused projection)
    "ltx": (tiny_ltx, lambda m: ltx_call(n=2, seed=4), ("attn1.to_out.0", "attn2.to_out.0"),
            {"attn1.to_out.0", "attn2.to_out.0"}),
    "flux2": (tiny_flux2, lambda m: flux2_call(m),
              ("ff.linear_out", "ff_context.linear_out", "../single_transformer_blocks.1.attn.to_out"),
              {"ff.linear_out", "ff_context.linear_out"}),
}


def flux2_call(model, n=2, seed=4):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(n, 12, 16, generator=g), encoder_hidden_states=torch.randn(n, 5, 24,
                generator=g), timestep=torch.rand(n, generator=g), img_ids=torch.randint(0, 8, (12, 4), generator=g),
                txt_ids=torch.zeros(5, 4))


def _blocks(model) -> str:
    return "blocks" if hasattr(model, "blocks") else "layers" if hasattr(model, "layers") else "transformer_blocks"


@pytest.mark.parametrize("name", list(CASES))
def test_every_site_folds_exactly(name):
    build, call, leaves, want = CASES[name]
    model = build()
    runner = make_runner(model)
    inputs = runner.inputs(**call(model))
    with torch.no_grad():
        ref = runner.forward(*inputs)
    blk = f"{_blocks(model)}.1"
    g = torch.Generator().manual_seed(5)
    for leaf in leaves:
        name = leaf[3:] if leaf.startswith("../") else f"{blk}.{leaf}"   # ("../": a full name)
        site = smooth.site_of(model, name)
        assert name in site.consumers
        before = {c: (capture_inputs(model, c, [inputs], 10_000), model.get_submodule(c).weight.detach().clone())
                  for c in site.consumers}
        width = before[site.key][1].shape[1]
        s = torch.rand(width, generator=g) * 3 + 0.2
        smooth.fold(model, name, s)
        with torch.no_grad():
            torch.testing.assert_close(runner.forward(*inputs), ref, rtol=1e-4, atol=1e-5, msg=leaf)
        for c, (x, w) in before.items():
            torch.testing.assert_close(capture_inputs(model, c, [inputs], 10_000), x / s, rtol=1e-4, atol=1e-5)
            shape = (1, -1) + (1,) * (w.dim() - 2)   # (a 1×1 convolution's weight is (out, in, 1, 1))
            torch.testing.assert_close(model.get_submodule(c).weight.detach(), w * s.view(shape))
    if name == "wan-i2v":   # the text and image values both feed the cross-attention's output
        assert smooth.site_of(model, f"{blk}.attn2.to_out.0").producers == (f"{blk}.attn2.to_v",
                                                                          f"{blk}.attn2.add_v_proj")
    plan = QuantPlan.block_uniform(model, 4, 4)
    keys = smooth.targets(model, plan)
    assert {k.removeprefix(f"{blk}.") for k in keys if k.startswith(f"{blk}.")} == want


def test_what_cannot_fold_is_refused():
    wan, qwen, sana = perturbed(tiny_wan()), tiny_qwen(), tiny_sana()
    for model, leaf, why in ((wan, "blocks.0.attn1.to_q", "every block shares"),
                             (wan, "blocks.0.ffn.net.0.proj", "every block shares"),
                             (wan, "blocks.0.ffn.net.2", "only the attentions' outputs"),
                             (qwen, "transformer_blocks.0.attn.to_out.0", "only the inputs of to_q/k/v"),
                             (qwen, "transformer_blocks.0.img_mlp.net.2", "only the inputs of to_q/k/v"),
                             (sana, "transformer_blocks.0.attn1.to_k", "every block shares"),
                             (sana, "transformer_blocks.0.ff.conv_inverted", "every block shares"),
                             (sana, "transformer_blocks.0.attn2.to_q", "point convolution")):
        with pytest.raises(ValueError, match=why):
            smooth.site_of(model, leaf)
    # Wan without cross_attn_norm: the cross-attention reads the residual stream as it is
    plain = copy.deepcopy(wan)
    plain.blocks[0].norm2 = torch.nn.Identity()
    with pytest.raises(ValueError, match="cross_attn_norm=False"):
        smooth.site_of(plain, "blocks.0.attn2.to_q")
    # another processor (output not known linear in v), fused projections
    other = copy.deepcopy(sana)
    other.transformer_blocks[0].attn1.set_processor(diffusers.models.attention_processor.AttnProcessor2_0())
    with pytest.raises(ValueError, match="runs AttnProcessor2_0"):
        smooth.site_of(other, "transformer_blocks.0.attn1.to_out.0")
    fused = copy.deepcopy(wan)
    fused.fuse_qkv_projections()
    with pytest.raises(ValueError, match="fused projections"):
        smooth.site_of(fused, "blocks.0.attn1.to_out.0")
    # a bad factor leaves the model untouched
    w = sana.transformer_blocks[0].ff.conv_depth.weight.detach().clone()
    with pytest.raises(ValueError, match="positive and finite"):
        smooth.fold(sana, "transformer_blocks.0.ff.conv_point", -torch.ones(w.shape[0] // 2))
    assert torch.equal(sana.transformer_blocks[0].ff.conv_depth.weight, w)


@pytest.mark.parametrize("name", ["wan", "qwen", "zimage", "flux2"])
def test_ptq_with_smoothing_reloads_and_packs(tmp_path, name):
    """PTQ with SmoothQuant (q/k/v tied as the runner ties them): a site per kind and block, the directory re-folds
    into a fresh FP copy to the calibrated model exactly, and the packed model computes what it computes."""
    from treeq_engine.calib.ptq import PTQConfig, calibrate, load_calibration
    from treeq_engine.runtime import quantize

    build, call, _, want = CASES[name]
    model = build()
    fp = copy.deepcopy(model)
    runner = make_runner(model)
    batches = [runner.inputs(**call(model))]
    cfg = PTQConfig(max_tokens=64, rounds=1, w_clip_grid=(1.0, 0.9), a_clip_grid=(1.0, 0.9),
                    smooth_alphas=(0.3, 0.6))
    plan = calibrate(model, QuantPlan.block_uniform(model, 4, 4), batches, cfg, progress=False, out_dir=tmp_path,
                     tie=runner.tie)   # (the calibrated plan: its clips)
    chosen = json.loads((tmp_path / "ptq.json").read_text())["smooth"]
    blocks = _blocks(model)
    assert {k for k in chosen if k.startswith(blocks + ".")} == {f"{blocks}.{i}.{leaf}" for i in range(2)
                                                                for leaf in want}
    # (Z-Image's refiner blocks: 4 sites each; FLUX.2's single blocks: 1)
    others = {k for k in chosen if not k.startswith(blocks + ".")}
    assert len(others) == {"zimage": 8, "flux2": 2}.get(name, 0), others
    again = copy.deepcopy(fp)
    load_calibration(again, tmp_path)
    with torch.no_grad():
        calibrated = runner.forward(*batches[0])
        assert torch.equal(make_runner(again).forward(*batches[0]), calibrated)
        quantize(again, plan, dtype=torch.float32)   # fused blocks, packed layers
        packed = make_runner(again).forward(*batches[0])
    assert float((packed - calibrated).norm() / calibrated.norm()) < 1e-2


def test_half_precision_modulation_caps_the_factors():
    """A bf16 modulation stores the folded scale as ``(1 + scale)/s − 1``, near −1 for a large ``s``: the multiplier
    it encodes then rounds like a value near 1 (at s = 100 the site's input moved by 14 %). The factors
    the choice folds are capped per channel so that the multiplier stays at least 1/2 (about bf16's own rounding);
    float32 is left alone, and so is a site that scales rows (an attention output)."""
    model = tiny_qwen()
    half = copy.deepcopy(model).to(torch.bfloat16)
    key = "transformer_blocks.0.attn.to_q"
    site = smooth.site_of(half, key)
    d = half.get_submodule(key).weight.shape[1]
    s = torch.full((d,), 100.0)
    one_plus = (1 + half.transformer_blocks[0].img_mod[1].bias[d:2 * d].float()).abs()
    capped = smooth.precision_cap(half, site, s)
    assert torch.equal(capped, torch.minimum(s, (2 * one_plus).clamp(min=1.0)))
    assert torch.equal(smooth.precision_cap(model, site, s), s)   # float32: m ≥ 2⁻¹⁷, no cap at s = 100
    wan = perturbed(tiny_wan()).to(torch.bfloat16)
    rows = smooth.site_of(wan, "blocks.0.attn1.to_out.0")
    assert torch.equal(smooth.precision_cap(wan, rows, s[:16]), s[:16])

    # what the cap buys: the site's input after the fold, times s, against the unfolded bf16 model's
    runner = make_runner(half)
    inputs = runner.inputs(**{k: v.to(torch.bfloat16) if isinstance(v, torch.Tensor) and v.is_floating_point()
                              and k != "timestep" else v for k, v in qwen_call(n=2, seed=4).items()})
    ref = capture_inputs(half, key, [inputs], 10_000)

    def moved(factors):
        m = copy.deepcopy(half)
        smooth.fold(m, key, factors)
        got = capture_inputs(m, key, [inputs], 10_000) * factors
        return float((got - ref).norm() / ref.norm())

    assert moved(s) > 0.05 and moved(capped) < 0.01   # measured: 13.8 % and 0.38 %
