"""The search, PTQ and PEFT on diffusers' Sana transformer (tiny random configs, offline): the runner's segments
compose to the model bit for bit (square and non-square latents, patch sizes 1 and 2, bf16), its feed-forward's
pointwise convolutions are searched leaves, tied leaves follow what reads one input, caption padding stays out of
PTQ's statistics, the evaluator agrees with a brute-force oracle on the model's own forward, and the command line
captures a pipeline, searches, calibrates, fine-tunes, packs and samples."""
import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
diffusers = pytest.importorskip("diffusers", reason="diffusers is an optional dependency (requirements-dev.txt)")

from pipeline_flow import captured, searched_beats_uniform  # noqa: E402
from test_search_mmdit import check_evaluator  # noqa: E402
from tiny_diffusers import tiny_sana, tiny_sana_pipeline  # noqa: E402
from tinydit import one_thread  # noqa: E402,F401

from treeq_engine.nn import QuantPointwiseConv  # noqa: E402
from treeq_engine.search import SanaRunner, SearchSpace, make_runner  # noqa: E402
from treeq_engine.search.diffusers_runner import diffusers_arch  # noqa: E402
from treeq_engine.search.evaluator import run_segments  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def call(n=2, text=6, hw=(8, 8), seed=0):
    """The keyword arguments Sana's pipeline passes: latents, padded captions with their keep-mask (the first
    sample's caption two tokens shorter), the scheduler's timesteps."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(n, text, dtype=torch.long)
    mask[0, text - 2:] = 0
    return dict(hidden_states=torch.randn(n, 4, *hw, generator=g),
                encoder_hidden_states=torch.randn(n, text, 16, generator=g), encoder_attention_mask=mask,
                timestep=torch.rand(n, generator=g) * 1000)


@pytest.mark.parametrize("patch,dtype", [(1, torch.float32), (2, torch.float32), (1, torch.bfloat16)])
def test_segments_compose_to_the_model(patch, dtype):
    model = tiny_sana(patch).to(dtype)
    runner = make_runner(model)
    assert isinstance(runner, SanaRunner) and diffusers_arch(model) == "sana"
    for hw in ((8, 8), (4, 12)):
        kw = {k: v.to(dtype) if v.is_floating_point() and k != "timestep" else v for k, v in call(hw=hw).items()}
        with torch.no_grad():
            assert torch.equal(run_segments(runner, runner.inputs(**kw)), model(**kw).sample)


def test_leaves_ties_and_checked_inputs():
    model = tiny_sana()
    runner = make_runner(model)
    inputs = runner.inputs(**call())
    space = SearchSpace.build(model, inputs, forward=lambda *xs: run_segments(runner, xs), tie=runner.tie)
    names = [leaf.name for leaf in space.leaves]
    assert names[:6] == ["transformer_blocks.0.attn1.to_q", "transformer_blocks.0.attn1.to_out.0",
                         "transformer_blocks.0.attn2.to_q", "transformer_blocks.0.attn2.to_k",
                         "transformer_blocks.0.attn2.to_out.0", "transformer_blocks.0.ff.conv_inverted"]
    ff = {leaf.name: leaf for leaf in space.leaves}["transformer_blocks.0.ff.conv_point"]
    assert (ff.k, ff.n, ff.tokens) == (40, 16, 64)   # a pointwise convolution: the latent positions are its rows
    assert {leaf.name: leaf.tokens for leaf in space.leaves}["transformer_blocks.1.attn2.to_k"] == 6
    assert space.fixed and all(not n.startswith("transformer_blocks") for n in [f[0].name for f in space.fixed])
    assert "patch_embed.proj" in [f[0].name for f in space.fixed]   # (patch size 1: a pointwise edge at W8A8)
    for bad, match in ((dict(guidance=torch.ones(2)), "guidance"), (dict(attention_kwargs={"scale": 1.0}),
                                                                     "attention_kwargs"),
                       (dict(attention_mask=torch.ones(2, 64)), "self-attention mask"),
                       (dict(encoder_hidden_states=torch.randn(2, 6, 8)), r"\(N=2, L, 16\)"),
                       (dict(hidden_states=torch.randn(2, 3, 8, 8)), r"\(N, 4, H, W\)"),
                       (dict(encoder_attention_mask=torch.ones(2, 5)), "keep-mask")):
        with pytest.raises(ValueError, match=match):
            runner.inputs(**{**call(), **bad})
    with pytest.raises(ValueError, match="embeds no guidance scale"):
        runner.inputs(**call(), guidance=torch.ones(2))
    with pytest.raises(ValueError, match="Sana-Sprint"):
        make_runner(tiny_sana(sprint=True)).inputs(**call())


def test_sana_sprint_segments_and_evaluator():
    """Sana-Sprint (a guidance embedding, q/k RMSNorm): the cut takes the guidance as an input and composes to the
    model bit for bit; the evaluator agrees with the brute-force oracle."""
    model = tiny_sana(sprint=True)
    runner = make_runner(model)
    assert runner.input_names[-1] == "guidance" and not runner.scheduler_timesteps
    kw = dict(call(n=3, seed=2), guidance=torch.tensor([0.45, 0.3, 0.45]), timestep=torch.rand(3))
    with torch.no_grad():
        assert torch.equal(run_segments(runner, runner.inputs(**kw)), model(**kw).sample)
    check_evaluator(model, dict(call(n=4, seed=3), guidance=torch.full((4,), 0.45), timestep=torch.rand(4)), 1.0,
                    seed=6)


def test_ptq_statistics_leave_out_caption_padding():
    from treeq_engine.calib.capture import capture_inputs

    model = tiny_sana()
    inputs = make_runner(model).inputs(**call(n=2, text=6))   # 4 + 6 real caption tokens
    for name, rows in (("caption_projection.linear_1", 10), ("transformer_blocks.1.attn2.to_v", 10),
                       ("transformer_blocks.0.attn2.to_q", 2 * 64), ("transformer_blocks.1.ff.conv_point", 2 * 64)):
        assert capture_inputs(model, name, [inputs], max_tokens=10_000).shape[0] == rows, name


def test_evaluate_matches_brute_force():
    check_evaluator(tiny_sana(), call(n=4, seed=3), 0.5, seed=5)


def test_capture_search_ptq_peft_pack_and_sample_a_sana_pipeline(tmp_path, capsys):
    """`treeq capture` on a Sana pipeline (prompts padded to max_sequence_length, masked) -> `treeq search` (the
    feed-forward's pointwise convolutions among the leaves) -> `treeq ptq` (SmoothQuant folded) / `peft` ->
    `treeq quantize --ptq --peft`; the artifact computes what the calibrated, fine-tuned fake-quant transformer
    computes, and samples in the pipeline."""
    from treeq_engine.calib.peft import load_finetuned
    from treeq_engine.calib.ptq import load_calibration
    from treeq_engine.cli import main
    from treeq_engine.models.diffusers_transformers import rebuild
    from treeq_engine.runtime import TreeQPointwiseConv, artifact

    pipe_dir, prompts, calib, inputs = captured(tmp_path, tiny_sana_pipeline(), "sana",
                                                ["--steps", "3", "--timesteps", "2", "--cfg", "4.5", "--height", "512",
                                                 "--width", "512"])
    assert inputs[0].shape[1:] == (4, 16, 16) and not bool(inputs[3].bool().all())   # padded captions, masked
    src = ["--diffusers", str(pipe_dir), "--calib-inputs", calib]
    plan = searched_beats_uniform(tmp_path, src)
    assert "transformer_blocks.1.ff.conv_inverted" in plan.layers
    ptq, peft, art = str(tmp_path / "ptq"), str(tmp_path / "peft"), tmp_path / "art"
    assert main(["ptq", *src, "--calib-batch", "4", "--bits", "W4A8", "--branch-params", "4", "--max-tokens", "64",
                 "--rounds", "1", "--smooth-alphas", "0.3", "0.6", "--out", ptq]) == 0
    # per block: the attentions' outputs and the point convolution (the rest reads the shared modulation)
    assert set(json.loads((tmp_path / "ptq" / "ptq.json").read_text())["smooth"]) == {
        f"transformer_blocks.{i}.{leaf}" for i in range(2) for leaf in ("attn1.to_out.0", "attn2.to_out.0",
                                                                        "ff.conv_point")}
    assert main(["peft", *src, "--calib-batch", "4", "--ptq", ptq, "--steps", "2", "--lr-branch", "0.05",
                 "--out", peft]) == 0
    assert main(["quantize", "--diffusers", str(pipe_dir), "--ptq", ptq, "--peft", peft, "--out", str(art)]) == 0
    direct = diffusers.SanaTransformer2DModel.from_pretrained(pipe_dir / "transformer").eval()
    load_calibration(direct, ptq)
    load_finetuned(direct, peft)
    assert isinstance(direct.transformer_blocks[0].ff.conv_point, QuantPointwiseConv)
    loaded = artifact.load(art, rebuild(artifact.read_manifest(art)["model_config"]))
    assert isinstance(loaded.transformer_blocks[0].ff.conv_inverted, TreeQPointwiseConv)
    kw = call(n=2, hw=(16, 16), seed=7)
    with torch.no_grad():
        want, got = direct(**kw).sample, loaded(**kw).sample.float()
    assert float((got - want).norm() / want.norm()) < 2e-2   # the artifact runs bf16 (quantize's default)
    art2 = tmp_path / "art2"   # (the searched plan, packed, samples in the pipeline)
    assert main(["quantize", "--diffusers", str(pipe_dir), "--plan", str(tmp_path / "search" / "plan.json"),
                 "--out", str(art2)]) == 0
    assert main(["sample", "--pipeline", str(pipe_dir), "--artifact", str(art2), "--prompts", str(prompts), "--steps",
                 "2", "--height", "512", "--width", "512", "--device", "cpu", "--out", str(tmp_path / "q.png")]) == 0


def test_capture_search_and_pack_a_sana_sprint_pipeline(tmp_path):
    """A Sana-Sprint pipeline (two SCM steps, its guidance embedded): captured (the guidance among the inputs, the
    timesteps taken from the calls), searched, packed and sampled."""
    from treeq_engine.cli import main

    size = ["--height", "1024", "--width", "1024"]   # (its pipeline's only resolution bins: 32x32 latents)
    pipe_dir, prompts, calib, inputs = captured(tmp_path, tiny_sana_pipeline(sprint=True), "sprint",
                                                ["--steps", "2", "--timesteps", "2", *size])
    assert inputs[4].shape == (4,) and len(set(inputs[2].tolist())) == 2   # guidance per sample; two timesteps
    res = tmp_path / "search"
    assert main(["search", "--diffusers", str(pipe_dir), "--calib-inputs", calib, "--budget", "W4A8", "--keep", "2",
                 "--no-progress", "--device", "cpu", "--out", str(res)]) == 0
    art = tmp_path / "art"
    assert main(["quantize", "--diffusers", str(pipe_dir), "--plan", str(res / "plan.json"), "--out", str(art)]) == 0
    assert main(["sample", "--pipeline", str(pipe_dir), "--artifact", str(art), "--prompts", str(prompts), "--steps",
                 "2", *size, "--device", "cpu", "--out", str(tmp_path / "q.png")]) == 0
    for steps in ("1", "3"):   # (its pipeline's intermediate SCM timestep exists at two steps only: none given)
        assert main(["sample", "--pipeline", str(pipe_dir), "--artifact", str(art), "--prompts", str(prompts),
                     "--steps", steps, *size, "--device", "cpu", "--out", str(tmp_path / f"q{steps}.png")]) == 0
