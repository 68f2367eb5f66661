"""The search, PTQ and PEFT on diffusers' Z-Image transformer (tiny random configs, offline): the runner's segments
compose to the model bit for bit (captions of different lengths, non-square latents, float32 and bf16), tied leaves
follow what reads one input, the evaluator agrees with a brute-force oracle on the model's own forward, PTQ's
statistics leave out the rows a batch pads, and the command line captures a Z-Image pipeline, searches, calibrates,
fine-tunes, packs and samples."""
import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
diffusers = pytest.importorskip("diffusers", reason="diffusers is an optional dependency (requirements-dev.txt)")

from pipeline_flow import captured, leaves, ptq_peft_packed, searched_beats_uniform  # noqa: E402
from test_search_mmdit import check_evaluator  # noqa: E402
from tiny_diffusers import tiny_zimage, tiny_zimage_pipeline  # noqa: E402
from tinydit import one_thread  # noqa: E402,F401

from treeq_engine.search import ZImageRunner, make_runner  # noqa: E402
from treeq_engine.search.diffusers_runner import diffusers_arch, load_inputs  # noqa: E402
from treeq_engine.search.evaluator import run_segments  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def call(lens=(7, 40, 3), hw=(8, 12), seed=0, dtype=torch.float32):
    """The arguments Z-Image's pipeline passes: a list of (C, 1, H, W) latents, the timesteps ((1000 - t) / 1000),
    a list of caption features, each as long as its prompt."""
    g = torch.Generator().manual_seed(seed)
    return dict(x=[torch.randn(4, 1, *hw, generator=g).to(dtype) for _ in lens], t=torch.rand(len(lens), generator=g),
                cap_feats=[torch.randn(n, 16, generator=g).to(dtype) for n in lens])


def stacked(model, kw):
    with torch.no_grad():
        return torch.stack(model(**kw).sample)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_segments_compose_to_the_model(dtype):
    """Captions of different lengths (the batch padded, the blocks masked), of one length (no mask), latents of
    a token count that Z-Image pads to a multiple of 32, non-square latents."""
    model = tiny_zimage().to(dtype)
    runner = make_runner(model)
    assert isinstance(runner, ZImageRunner) and diffusers_arch(model) == "z-image" and runner.num_segments == 4
    for lens, hw in (((7, 40, 3), (8, 12)), ((5, 5, 5), (10, 6)), ((32, 64), (8, 8))):
        kw = call(lens, hw, dtype=dtype)
        state = runner.inputs(**kw)
        assert state[2].shape == (len(lens), max(lens), 16) and state[3].sum().item() == sum(lens)
        with torch.no_grad():
            assert torch.equal(run_segments(runner, state), stacked(model, kw)), (lens, hw)


def test_leaves_ties_and_checked_inputs():
    model = tiny_zimage()
    runner, inputs, space, names = leaves(model, call())
    # the refiner blocks are searched (block layers) although segment 0 runs them; q/k/v and w1/w3 are tied
    assert names[:4] == ["noise_refiner.0.adaLN_modulation.0", "noise_refiner.0.attention.to_q",
                         "noise_refiner.0.attention.to_out.0", "noise_refiner.0.feed_forward.w1"]
    assert "context_refiner.0.attention.to_q" in names and "layers.1.feed_forward.w2" in names
    tied = {leaf.name: leaf.layer_names for leaf in space.leaves}
    assert tied["layers.0.attention.to_q"] == ("layers.0.attention.to_q", "layers.0.attention.to_k",
                                               "layers.0.attention.to_v")
    assert tied["layers.0.feed_forward.w1"] == ("layers.0.feed_forward.w1", "layers.0.feed_forward.w3")
    fixed = [f[0].name for f in space.fixed]
    assert set(fixed) == {"t_embedder.mlp.0", "t_embedder.mlp.2", "all_x_embedder.2-1", "cap_embedder.1",
                          "all_final_layer.2-1.adaLN_modulation.1", "all_final_layer.2-1.linear"}
    assert runner.segment_of("layers.1.attention.to_q") == 2
    assert runner.segment_of("context_refiner.0.feed_forward.w2") == 0
    assert runner.segment_of("all_final_layer.2-1.linear") == 3
    good = call()
    for bad, match in ((dict(x=[[v] for v in good["x"]]), "omni"), (dict(siglip_feats=[[None]] * 3), "omni"),
                       (dict(controlnet_block_samples={0: 0}), "ControlNet"),
                       (dict(joint_attention_kwargs={"scale": 1.0}), "joint_attention_kwargs"),
                       (dict(patch_size=1), "patch size 2"),
                       (dict(x=good["x"][:2] + [torch.randn(4, 1, 8, 8)]), "one resolution"),
                       (dict(x=[torch.randn(3, 1, 8, 12)] * 3), r"\(4, F, H, W\)"),
                       (dict(cap_feats=good["cap_feats"][:2]), "3 caption features"),
                       (dict(cap_feats=[torch.randn(0, 16)] * 3), "3 caption features"),
                       (dict(t=torch.rand(2)), r"\(3,\)")):
        with pytest.raises(ValueError, match=match):
            runner.inputs(**{**good, **bad})
    enc, mask = inputs[2], inputs[3].clone()
    mask[0, 0] = 0   # not a prefix: a stored file that is not what capture wrote
    with pytest.raises(ValueError, match="each caption's tokens first"):
        runner.inputs(hidden_states=inputs[0], timestep=inputs[1], encoder_hidden_states=enc,
                      encoder_attention_mask=mask)
    with pytest.raises(TypeError, match="ZImageTransformer2DModel"):
        ZImageRunner(torch.nn.Linear(2, 2))


def test_evaluate_matches_brute_force():
    check_evaluator(tiny_zimage(), call(lens=(5, 9, 5, 12), hw=(8, 8), seed=3), 0.5, seed=5)


def test_ptq_statistics_leave_out_what_a_batch_pads():
    """The context refiners' rows beyond each caption (padded to a multiple of 32 with the pad token, which is
    attended, then to the batch's longest), the main blocks' rows the mask hides, and the final layer's caption
    tokens are left out; the image tokens and each caption's pad tokens are kept. The embedders see each sample's
    last token repeated where the pad tokens go (replaced after them): left out."""
    from treeq_engine.calib.capture import capture_inputs

    model = tiny_zimage()
    inputs = make_runner(model).inputs(**call(lens=(7, 40), hw=(8, 12)))   # 24 image tokens -> 32; captions 32, 64
    unified = (32 + 32) + (32 + 64)
    for name, rows in (("context_refiner.0.attention.to_q", 32 + 64), ("context_refiner.0.feed_forward.w2", 32 + 64),
                       ("noise_refiner.0.feed_forward.w1", 2 * 32), ("noise_refiner.0.adaLN_modulation.0", 2),
                       ("layers.1.attention.to_out.0", unified), ("layers.0.feed_forward.w1", unified),
                       ("layers.0.adaLN_modulation.0", 2), ("all_final_layer.2-1.linear", 2 * 24),
                       ("cap_embedder.1", 7 + 40), ("all_x_embedder.2-1", 2 * 24)):
        assert capture_inputs(model, name, [inputs], max_tokens=100_000).shape[0] == rows, name


def test_capture_search_ptq_peft_pack_and_sample_a_zimage_pipeline(tmp_path):
    """`treeq capture` on a Z-Image pipeline (CFG: prompts and negative prompts of different lengths) -> `treeq
    search` -> `treeq ptq` / `peft` -> `treeq quantize --ptq --peft`; the artifact computes what the calibrated,
    fine-tuned fake-quant transformer computes, and samples in the pipeline."""
    from treeq_engine.cli import main

    size = ["--height", "32", "--width", "32"]
    pipe_dir, prompts, calib, inputs = captured(tmp_path, tiny_zimage_pipeline(), "zimage",
                                                ["--steps", "3", "--timesteps", "2", "--cfg", "4.0", *size])
    assert inputs[0].shape == (8, 4, 1, 16, 16) and len(set(inputs[1].tolist())) == 2   # 2 steps x (2 + 2 CFG)
    assert len(set(inputs[3].sum(dim=1).tolist())) > 1   # prompts of different lengths, padded in the file
    src = ["--diffusers", str(pipe_dir), "--calib-inputs", calib]
    plan = searched_beats_uniform(tmp_path, src)
    assert "context_refiner.0.attention.to_q" in plan.layers and "layers.1.feed_forward.w3" in plan.layers
    direct, loaded = ptq_peft_packed(tmp_path, src, pipe_dir, ptq=["--branch-params", "4"])
    art = tmp_path / "art"
    kw = call(lens=(6, 3), hw=(16, 16), seed=7)
    want, got = stacked(direct, kw), stacked(loaded, kw).float()
    assert float((got - want).norm() / want.norm()) < 2e-2   # the artifact runs bf16 (quantize's default)
    assert main(["sample", "--pipeline", str(pipe_dir), "--artifact", str(art), "--prompts", str(prompts), "--steps",
                 "2", *size, "--device", "cpu", "--out", str(tmp_path / "q.png")]) == 0


def test_capture_runs_one_prompt_at_a_time_without_guidance(tmp_path):
    """Z-Image-Turbo's way: no guidance (`--cfg 1`: Z-Image's guidance_scale 0, one call per step), prompts of
    different lengths in runs of their own (`--batch 1`): the calls stack padded to the longest prompt and compose
    to the model's output exactly."""
    from treeq_engine.cli import main
    from treeq_engine.models.diffusers_transformers import guidance_kwargs

    pipe = tiny_zimage_pipeline()
    assert guidance_kwargs(pipe, 1.0) == {"guidance_scale": 0.0} and guidance_kwargs(pipe, 5.0) == {
        "guidance_scale": 4.0}   # (Z-Image computes pos + g·(pos − neg))
    pipe_dir = tmp_path / "zimage"
    pipe.save_pretrained(pipe_dir)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\na red dog on the hill by the house\n")
    calib = str(tmp_path / "calib.safetensors")
    assert main(["capture", "--pipeline", str(pipe_dir), "--prompts", str(prompts), "--steps", "2", "--cfg", "1",
                 "--batch", "1", "--height", "32", "--width", "32", "--device", "cpu", "--out", calib]) == 0
    transformer = diffusers.ZImageTransformer2DModel.from_pretrained(pipe_dir / "transformer").eval()
    runner = make_runner(transformer)
    inputs = load_inputs(calib, runner)
    assert inputs[0].shape[0] == 4 and len(set(inputs[3].sum(dim=1).tolist())) == 2   # 2 prompts x 2 steps
    lens = inputs[3].sum(dim=1).tolist()
    kw = dict(x=list(inputs[0].unbind(0)), t=inputs[1], cap_feats=[c[:n] for c, n in zip(inputs[2], lens)])
    with torch.no_grad():
        assert torch.equal(run_segments(runner, inputs), stacked(transformer, kw))


def test_profile_covers_what_a_latency_search_looks_up(tmp_path):
    """`treeq profile --diffusers` finds Z-Image's rows on a weightless copy, where caption lengths cannot be read:
    it profiles the extremes (captions whole, one token), so a latency-budgeted search over calibration inputs of
    any caption lengths interpolates inside the table."""
    from treeq_engine.cli import main
    from treeq_engine.search.diffusers_runner import save_inputs

    model = tiny_zimage()
    d = tmp_path / "zimage"
    model.save_pretrained(d)
    runner = make_runner(model)
    calib = str(tmp_path / "calib.safetensors")
    # 64 image tokens; the search's first batch (2) holds captions of 3 and 7 tokens (32 rows), the file's longest
    # is 40 (64 rows): a profile of the longest alone would start above what the search looks up
    save_inputs(calib, runner, runner.inputs(**call(lens=(3, 7, 40), hw=(16, 16))))
    lut = tmp_path / "lut.json"
    assert main(["profile", "--diffusers", str(d), "--calib-inputs", calib, "--batch", "1,2", "--w-bits", "4,8",
                 "--a-bits", "8", "--reps", "1", "--device", "cpu", "--out", str(lut)]) == 0
    for serve in ("1", "2"):
        out = tmp_path / f"s{serve}"
        assert main(["search", "--diffusers", str(d), "--calib-inputs", calib, "--budget", "1s", "--latency-table",
                     str(lut), "--serve-batch", serve, "--w-bits", "4,8", "--a-bits", "8", "--keep", "2",
                     "--baselines", "", "--batch", "2", "--no-progress", "--device", "cpu", "--out", str(out)]) == 0
        assert json.loads((out / "report.json").read_text())["tss"]["costs"]["us"] > 0
