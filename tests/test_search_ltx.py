"""The search, PTQ and PEFT on diffusers' LTX-Video transformer (tiny random configs, offline): the runner's
segments compose to the model bit for bit (float32 and bf16, two video shapes), tied leaves follow what reads one
input, the evaluator agrees with a brute-force oracle on the model's own forward, PTQ's statistics leave out the
caption padding, and the command line searches, calibrates, fine-tunes and packs from a saved calibration file."""
import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
diffusers = pytest.importorskip("diffusers", reason="diffusers is an optional dependency (requirements-dev.txt)")

from pipeline_flow import captured, cut_run, leaves, ptq_peft_packed, searched_and_packed, searched_beats_uniform, write_images  # noqa: E402
from test_search_mmdit import check_evaluator  # noqa: E402
from tiny_diffusers import tiny_ltx, tiny_ltx_pipeline  # noqa: E402
from tinydit import one_thread  # noqa: E402,F401

from treeq_engine.search import LTXRunner, make_runner  # noqa: E402
from treeq_engine.search.diffusers_runner import diffusers_arch, load_inputs, save_inputs  # noqa: E402
from treeq_engine.search.evaluator import run_segments  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def call(n=2, video=(2, 4, 6), text=6, seed=0, dtype=torch.float32, fps=25):
    """The keyword arguments LTX's pipeline passes: packed latents, padded captions with their keep-mask (the first
    sample's two tokens shorter), the scheduler's timestep, the latent video's size and the rope scale."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(n, text, dtype=torch.long)
    mask[0, text - 2:] = 0
    f, h, w = video
    return dict(hidden_states=torch.randn(n, f * h * w, 4, generator=g).to(dtype),
                encoder_hidden_states=torch.randn(n, text, 16, generator=g).to(dtype), encoder_attention_mask=mask,
                timestep=torch.full((n,), 500.0), num_frames=f, height=h, width=w,
                rope_interpolation_scale=(8 / fps, 32, 32))


def test_calls_without_a_rope_scale_and_with_column_timesteps():
    """The model's defaults, as a direct call (or a user's loop) may leave them: no rope scale (the model then skips
    the rescaling, which a scale of ones would not) and an (N, 1) timestep (the model flattens it)."""
    model = tiny_ltx()
    kw = {**call(), "rope_interpolation_scale": None, "timestep": torch.full((2, 1), 500.0)}
    runner = make_runner(model)
    with torch.no_grad():
        assert torch.equal(run_segments(runner, runner.inputs(**kw)), model(**kw).sample)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_segments_compose_to_the_model(dtype):
    model = tiny_ltx().to(dtype)
    runner = make_runner(model)
    assert isinstance(runner, LTXRunner) and diffusers_arch(model) == "ltx" and runner.num_segments == 4
    for video in ((2, 4, 6), (3, 2, 2)):
        kw = call(video=video, dtype=dtype)
        with torch.no_grad():
            assert torch.equal(run_segments(runner, runner.inputs(**kw)), model(**kw).sample), video


def i2v_call(n=2, seed=0, video=(2, 4, 6)):
    """The image-to-video pipeline's call: one timestep per token, the conditioning first frame's at 0."""
    kw = call(n=n, seed=seed, video=video)
    f, h, w = video
    t = torch.full((n, f * h * w), 500.0)
    t[:, :h * w] = 0
    return {**kw, "timestep": t}


def test_per_token_timesteps():
    """The image-to-video pipeline's per-token timesteps: the segments compose to the model bit for bit; the metric
    and the output projection's PTQ rows leave out the first frame's tokens (held at 0; the pipeline drops their
    prediction), while the caption padding stays out of the caption layers' rows."""
    model = tiny_ltx()
    kw = i2v_call()
    runner, state, got, head = cut_run(model, kw)
    with torch.no_grad():
        want = model(**kw).sample
    assert torch.equal(got[:, 24:], want[:, 24:]) and not bool(got[:, :24].any())
    rows = runner.real_rows("proj_out", head)
    assert rows.shape == (2, 48) and not bool(rows[:, :24].any()) and bool(rows[:, 24:].all())
    assert runner.real_rows("caption_projection.linear_1", state).sum() == 10   # (4 + 6 real caption tokens)


def test_evaluate_with_per_token_timesteps_matches_brute_force():
    read = torch.ones(1, 48, 1, dtype=torch.bool)
    read[:, :24] = False
    check_evaluator(tiny_ltx(), i2v_call(n=4, seed=3), 0.5, seed=5, read=read)


def test_a_saved_file_reproduces_the_rope_scale(tmp_path):
    """The rope scale (8/25 here) is stored in float64 and kept so in a bf16 search (``exact_inputs``): a fresh
    runner on the loaded inputs composes to the model's output on the pipeline's call, bit for bit."""
    model = tiny_ltx().to(torch.bfloat16)
    kw = call(dtype=torch.bfloat16)
    path = str(tmp_path / "calib.safetensors")
    save_inputs(path, make_runner(model), make_runner(model).inputs(**kw))
    fresh = make_runner(model)
    inputs = load_inputs(path, fresh)
    assert inputs[4].dtype == torch.float64 and inputs[1].dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.equal(run_segments(fresh, inputs), model(**kw).sample)


def test_leaves_ties_and_checked_inputs():
    model = tiny_ltx()
    runner, inputs, space, names = leaves(model, call())
    assert names[:4] == ["transformer_blocks.0.attn1.to_q", "transformer_blocks.0.attn1.to_out.0",
                         "transformer_blocks.0.attn2.to_q", "transformer_blocks.0.attn2.to_k"]
    assert {f[0].name for f in space.fixed} >= {"proj_in", "caption_projection.linear_1", "proj_out"}
    good = call()
    for bad, match in ((dict(attention_kwargs={"scale": 1.0}), "attention_kwargs"),
                       (dict(video_coords=torch.zeros(2, 3, 48)), "video_coords"),
                       (dict(timestep=torch.ones(2, 47)), r"per-token timesteps must be \(1, 48\) or \(2, 48\)"),
                       (dict(num_frames=None), "num_frames, height and width"),
                       (dict(height=5), "is 60 tokens, hidden_states has 48"),
                       (dict(rope_interpolation_scale=(1.0, 2.0)), "3 positive numbers"),
                       (dict(rope_interpolation_scale=(0.0, 2.0, 2.0)), "3 positive numbers"),
                       (dict(hidden_states=torch.randn(2, 48, 8)), r"\(N, S, 4\)"),
                       (dict(encoder_attention_mask=torch.ones(2, 5)), "keep-mask")):
        with pytest.raises(ValueError, match=match):
            runner.inputs(**{**good, **bad})
    runner.inputs(**good)
    with pytest.raises(ValueError, match="one video shape and frame rate per token count"):
        runner.inputs(**{**good, "rope_interpolation_scale": (8 / 24, 32, 32)})
    stored = make_runner(model).inputs(**good)
    odd = stored[4].clone()
    odd[1, 3] = 0.5
    with pytest.raises(ValueError, match="video differs between the samples"):
        make_runner(model).inputs(hidden_states=stored[0], encoder_hidden_states=stored[1], timestep=stored[2],
                                  encoder_attention_mask=stored[3], video=odd)
    # a state another runner read, for the same token count at another frame rate: refused, not run with the rope
    # this runner recorded
    other = make_runner(model)
    other_state = other.inputs(**{**good, "rope_interpolation_scale": (8 / 24, 32, 32)})
    with pytest.raises(ValueError, match="one video shape and frame rate per token count"):
        runner.run(0, other_state)
    with pytest.raises(TypeError, match="LTXVideoTransformer3DModel"):
        LTXRunner(torch.nn.Linear(2, 2))


def test_evaluate_matches_brute_force():
    check_evaluator(tiny_ltx(), call(n=4, seed=3), 0.5, seed=5)


def test_ptq_statistics_leave_out_caption_padding():
    from treeq_engine.calib.capture import capture_inputs

    model = tiny_ltx()
    inputs = make_runner(model).inputs(**call(n=2, text=6))   # 4 + 6 real caption tokens
    for name, rows in (("caption_projection.linear_1", 10), ("transformer_blocks.1.attn2.to_v", 10),
                       ("transformer_blocks.0.attn2.to_q", 2 * 48), ("transformer_blocks.1.ff.net.2", 2 * 48)):
        assert capture_inputs(model, name, [inputs], max_tokens=10_000).shape[0] == rows, name


def test_search_ptq_peft_quantize(tmp_path):
    """`treeq search / ptq / peft / quantize --diffusers` on an LTX-Video transformer directory with saved inputs:
    the artifact computes what the calibrated, fine-tuned fake-quant transformer computes."""

    model = tiny_ltx()
    d = tmp_path / "ltx"
    model.save_pretrained(d)
    runner = make_runner(model)
    calib = str(tmp_path / "calib.safetensors")
    batch = [runner.inputs(**call(n=4, seed=s)) for s in (1,)]
    save_inputs(calib, runner, batch[0])
    src = ["--diffusers", str(d), "--calib-inputs", calib]
    plan = searched_beats_uniform(tmp_path, src)
    assert "transformer_blocks.1.ff.net.0.proj" in plan.layers
    direct, loaded = ptq_peft_packed(tmp_path, src, d, ptq=["--branch-params", "4", "--smooth-alphas", "0.5"])
    kw = call(n=2, seed=7)
    with torch.no_grad():
        want, got = direct(**kw).sample, loaded(**kw).sample.float()
    assert float((got - want).norm() / want.norm()) < 2e-2   # the artifact runs bf16 (quantize's default)


def test_capture_search_pack_and_sample_an_ltx_pipeline(tmp_path):
    """`treeq capture --frames` on an LTX-Video pipeline (CFG, captions padded to 128 tokens, the rope scale from the
    frame rate, the pipeline's own sigmas: timesteps taken from the calls) -> `treeq search` -> `treeq quantize` ->
    `treeq sample --frames`."""
    from treeq_engine.cli import main

    size = ["--height", "32", "--width", "32", "--frames", "9"]
    pipe_dir, prompts, calib, inputs = captured(tmp_path, tiny_ltx_pipeline(), "ltx",
                                                ["--steps", "3", "--timesteps", "2", "--cfg", "3.0", *size])
    assert inputs[0].shape == (8, 5 * 16 * 16, 4) and inputs[4][0].tolist() == [5.0, 16.0, 16.0, 2 / 25, 2.0, 2.0]
    assert not bool(inputs[3].bool().all())   # padded captions, masked
    art = searched_and_packed(tmp_path, pipe_dir, calib)
    assert main(["sample", "--pipeline", str(pipe_dir), "--artifact", str(art), "--prompts", str(prompts), "--steps",
                 "2", *size, "--device", "cpu", "--out", str(tmp_path / "q.png")]) == 0


def test_capture_search_and_sample_an_image_to_video_pipeline(tmp_path, capsys):
    """`treeq capture --images` on an LTX-Video directory (an LTXPipeline, run as LTXImageToVideoPipeline): each
    prompt runs alone with its first frame; the calls carry one timestep per token (the first latent frame's at 0)
    -> `treeq search` -> `treeq quantize` -> `treeq sample --images` (and an empty --images: text to video)."""
    from treeq_engine.cli import main

    pipe = tiny_ltx_pipeline()   # (saved as LTXPipeline, as LTX-Video is: --images loads its image-to-video class)
    images = write_images(tmp_path, ["a.png", "b.png"])
    size = ["--height", "32", "--width", "32", "--frames", "5"]   # latents 3 x 16 x 16
    pipe_dir, prompts, calib, inputs = captured(tmp_path, pipe, "ltx-i2v", ["--images", images, "--batch", "1",
                                                                            "--steps", "2", "--timesteps", "2",
                                                                            "--cfg", "3.0", *size])
    assert "kept 8 samples at 2 timesteps" in capsys.readouterr().out   # 2 prompts x 2 steps x CFG's 2 halves
    t = inputs[2]
    assert t.shape == (8, 3 * 16 * 16) and not bool(t[:, :256].any()) and bool((t[:, 256:] > 0).all())
    art = searched_and_packed(tmp_path, pipe_dir, calib)
    capsys.readouterr()
    for given in (images, ""):
        assert main(["sample", "--pipeline", str(pipe_dir), "--artifact", str(art), "--prompts", str(prompts),
                     "--images", given, "--steps", "2", *size, "--device", "cpu", "--out", str(tmp_path / "q.png")]) == 0
        assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["samples"] == 2
