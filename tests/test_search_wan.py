"""The search, PTQ and PEFT on diffusers' Wan video transformer (tiny random configs, offline): the runner's
segments compose to the model bit for bit (text- and image-to-video, non-square grids), tied leaves follow what
reads one input, the evaluator agrees with a brute-force oracle that converts a copy and runs the model's own
forward, and the command line captures a Wan pipeline, searches (closed loop too), calibrates and packs."""
import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
diffusers = pytest.importorskip("diffusers", reason="diffusers is an optional dependency (requirements-dev.txt)")

from test_search_mmdit import check_evaluator  # noqa: E402
from pipeline_flow import cut_run, write_images  # noqa: E402
from tiny_diffusers import perturbed  # noqa: E402
from tinydit import one_thread  # noqa: E402,F401

from cli_refusal import refused  # noqa: E402
from treeq_engine.search import WanRunner, make_runner  # noqa: E402
from treeq_engine.search.diffusers_runner import diffusers_arch, load_inputs  # noqa: E402
from treeq_engine.search.evaluator import run_segments  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
# (its module imported now, at collection: the transformers warning it logs once is then not written into a test's
# closed capture by a logger an earlier test configured)
diffusers.WanImageToVideoPipeline  # noqa: B018

TEXT = 512   # Wan's image-to-video attention takes the last 512 context tokens as the text (hard-coded)


def tiny_wan(image=False, pairs=False):
    """``image``: image-to-video (CLIP image tokens); ``pairs``: first-last-frame (two images per sample)."""
    torch.manual_seed(0)
    extra = dict(image_dim=12, added_kv_proj_dim=16) if image or pairs else {}
    if pairs:
        extra["pos_embed_seq_len"] = 10
    return diffusers.WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8,
                                           in_channels=4, out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32,
                                           num_layers=2, rope_max_seq_len=32, **extra).eval()


def call(model, n=3, seed=0, fhw=(3, 8, 6)):
    """The keyword arguments Wan's pipeline passes the transformer (image-to-video: CLIP image tokens too)."""
    g = torch.Generator().manual_seed(seed)
    kw = dict(hidden_states=torch.randn(n, 4, *fhw, generator=g),
              timestep=torch.randint(0, 1000, (n,), generator=g).float(),
              encoder_hidden_states=torch.randn(n, TEXT if model.config.image_dim else 7, 16, generator=g))
    if model.config.image_dim:
        pairs = model.config.pos_embed_seq_len is not None   # the pipeline passes both images' tokens, 2N rows
        kw["encoder_hidden_states_image"] = torch.randn(2 * n if pairs else n, 5, 12, generator=g)
    return kw


@pytest.mark.parametrize("kind", ["t2v", "i2v", "flf2v"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_segments_compose_to_the_model(kind, dtype):
    model = perturbed(tiny_wan(image=kind == "i2v", pairs=kind == "flf2v")).to(dtype)
    runner = make_runner(model)
    assert isinstance(runner, WanRunner) and diffusers_arch(model) == "wan"
    for fhw in ((3, 8, 6), (2, 4, 10)):   # two grids: the head and the rotary tables find theirs by token count
        kw = {k: v.to(dtype) if v.is_floating_point() and k != "timestep" else v
              for k, v in call(model, fhw=fhw).items()}
        with torch.no_grad():
            want = model(**kw).sample
            got = run_segments(runner, runner.inputs(**kw))
        assert torch.equal(got, want)
        state = runner.inputs(**kw)
        with torch.no_grad():   # one sample alone (the search's chunks): the first-last-frame pairs stay together
            one = run_segments(runner, tuple(t[1:2] for t in state)).float()
        tol = 1e-5 if dtype == torch.float32 else 2e-2   # (a batch of one rounds its matmuls differently)
        assert float((one - want[1:2].float()).norm() / want[1:2].float().norm()) < tol
    assert runner.num_segments == len(model.blocks) + 2


def ti2v_call(model, n=3, seed=0, fhw=(3, 8, 6), image=True):
    """Wan 2.2 TI2V's call: one timestep per latent token; with an image, the first frame's tokens held at 0."""
    kw = call(model, n, seed, fhw)
    f, h, w = fhw[0], fhw[1] // 2, fhw[2] // 2
    t = kw["timestep"].clamp(min=1)[:, None].repeat(1, f * h * w)   # (a pipeline's noisy tokens are never at 0)
    if image:
        t[:, :h * w] = 0
    return {**kw, "timestep": t}


@pytest.mark.parametrize("image", [True, False])
def test_per_token_timesteps(image):
    """Wan 2.2 TI2V's per-token timesteps: the segments compose to the model bit for bit; the metric and the output
    projection's PTQ rows leave out the first frame's tokens held at 0 (text to video: nothing left out); a (1, S)
    row is broadcast to the batch."""
    from treeq_engine.search.diffusers_schedule import per_sample
    from treeq_engine.search.evaluator import sample_timesteps

    model = perturbed(tiny_wan())
    kw = ti2v_call(model, image=image)
    runner, state, got, head = cut_run(model, kw)
    with torch.no_grad():
        want = model(**kw).sample
    frame = 4 * 3   # one latent frame's tokens
    if image:
        assert torch.equal(got[:, :, 1:], want[:, :, 1:]) and not bool(got[:, :, 0].any())
        rows = runner.real_rows("proj_out", head)
        assert rows.shape == (3, 36) and not bool(rows[:, :frame].any()) and bool(rows[:, frame:].all())
    else:
        assert torch.equal(got, want) and bool(runner.real_rows("proj_out", head).all())
    assert runner.real_rows("blocks.0.ffn.net.2", head) is None
    assert torch.equal(sample_timesteps(state[1]), kw["timestep"].amax(1))
    weights = {float(v): 2.0 + i for i, v in enumerate(kw["timestep"].amax(1).tolist())}
    assert per_sample(weights, state[1], "x").tolist() == [2.0, 3.0, 4.0]   # (by each sample's noisy timestep)
    one = {**kw, "timestep": kw["timestep"][:1]}
    assert torch.equal(runner.inputs(**one)[1], kw["timestep"][:1].expand(3, -1))


def test_evaluate_with_per_token_timesteps_matches_brute_force():
    model = perturbed(tiny_wan())
    read = torch.ones(1, 1, 3, 8, 6, dtype=torch.bool)
    read[:, :, 0] = False   # (the first latent frame: the pipeline overwrites it)
    check_evaluator(model, ti2v_call(model, n=4, seed=3), 0.5, seed=7, read=read)


def test_tied_leaves_and_segments():
    runner = make_runner(tiny_wan(image=True))
    linears = [n for n, m in runner.model.named_modules() if isinstance(m, torch.nn.Linear)]
    ties = {n: runner.tie(n) for n in linears if runner.tie(n)}
    assert ties == {**{f"blocks.{b}.attn1.to_{x}": f"blocks.{b}.attn1.qkv" for b in (0, 1) for x in "qkv"},
                    **{f"blocks.{b}.attn2.to_{x}": f"blocks.{b}.attn2.kv" for b in (0, 1) for x in "kv"},
                    **{f"blocks.{b}.attn2.add_{x}_proj": f"blocks.{b}.attn2.add_kv" for b in (0, 1) for x in "kv"}}
    assert runner.segment_of("condition_embedder.time_proj") == 0
    assert runner.segment_of("blocks.1.ffn.net.2") == 2 and runner.segment_of("proj_out") == 3


@pytest.mark.parametrize("image,lam", [(False, 1.0), (True, 0.5)])
def test_evaluate_matches_brute_force(image, lam):
    model = perturbed(tiny_wan(image))
    check_evaluator(model, call(model, n=4, seed=3), lam, seed=7)


def test_inputs_are_checked():
    t2v, i2v = make_runner(tiny_wan()), make_runner(tiny_wan(image=True))
    kw = call(t2v.model, n=2)
    with pytest.raises(ValueError, match=r"hidden_states must be an \(N, C, F, H, W\) video latent"):
        t2v.inputs(**{**kw, "hidden_states": kw["hidden_states"][:, :, 0]})
    with pytest.raises(ValueError, match="must have 4 channels"):
        t2v.inputs(**{**kw, "hidden_states": torch.randn(2, 3, 3, 8, 6)})
    with pytest.raises(ValueError, match=r"multiples of the patch size \(1, 2, 2\)"):
        t2v.inputs(**{**kw, "hidden_states": torch.randn(2, 4, 3, 8, 5)})
    with pytest.raises(ValueError, match=r"encoder_hidden_states must be \(N=2, L, 16\)"):
        t2v.inputs(**{**kw, "encoder_hidden_states": torch.randn(2, 5, 12)})
    with pytest.raises(ValueError, match="timestep must be a scalar"):
        t2v.inputs(**{**kw, "timestep": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"per-token timesteps must be \(1, 36\) or \(2, 36\)"):
        t2v.inputs(**{**kw, "timestep": torch.zeros(2, 24)})   # (3 x 4 x 3 = 36 patches)
    with pytest.raises(ValueError, match="attention_kwargs"):
        t2v.inputs(**kw, attention_kwargs={"scale": 1.0})
    with pytest.raises(ValueError, match="given to a text-to-video Wan"):
        t2v.inputs(**kw, encoder_hidden_states_image=torch.randn(2, 5, 12))
    with pytest.raises(ValueError, match=r"needs encoder_hidden_states_image \(N=2, I, 12\)"):
        i2v.inputs(**call(i2v.model, n=2) | {"encoder_hidden_states_image": None})
    flf = make_runner(tiny_wan(pairs=True))
    with pytest.raises(ValueError, match=r"first-last-frame Wan needs encoder_hidden_states_image \(2N=4, I, 12\)"):
        flf.inputs(**call(flf.model, n=2) | {"encoder_hidden_states_image": torch.randn(2, 5, 12)})
    assert flf.inputs(**call(flf.model, n=2))[3].shape == (2, 2, 5, 12)   # stored per sample
    assert t2v.inputs(**{**kw, "timestep": 500.0})[1].tolist() == [500.0, 500.0]   # broadcast to the batch
    assert i2v.input_names[-1] == "encoder_hidden_states_image" and len(t2v.input_names) == 3
    with pytest.raises(TypeError, match="WanRunner cuts diffusers' WanTransformer3DModel; got Linear"):
        WanRunner(torch.nn.Linear(2, 2))
    with pytest.raises(RuntimeError, match="no latent grid of 24 patches"):
        t2v.run(t2v.num_segments - 1, (torch.zeros(1, 24, 16), None, None, torch.zeros(1, 16)))


def test_capture_search_ptq_and_pack_a_wan_pipeline(tmp_path, capsys):
    """`treeq capture` on a Wan text-to-video pipeline (--frames; both guidance calls recorded) -> `treeq search`
    (and closed loop through the pipeline, on its video latents) -> `treeq ptq` -> `treeq quantize`; the
    artifact samples a video in the pipeline."""
    pytest.importorskip("transformers", reason="Wan's pipeline needs transformers (UMT5)")
    pytest.importorskip("accelerate", reason="diffusers loads Wan (float32-kept modules) only with accelerate")
    from tiny_diffusers import tiny_wan_pipeline

    from treeq_engine.cli import main

    pipe_dir = tmp_path / "wan"
    pipe = tiny_wan_pipeline()
    pipe.transformer = perturbed(pipe.transformer)
    pipe.save_pretrained(pipe_dir)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cat\n")
    calib = str(tmp_path / "calib.safetensors")
    size = ["--height", "16", "--width", "16"]
    assert main(["capture", "--pipeline", str(pipe_dir), "--prompts", str(prompts), "--steps", "3", "--timesteps",
                 "2", *size, "--frames", "5", "--device", "cpu", "--out", calib]) == 0
    cap = capsys.readouterr()
    # 3 steps x (prompt, negative prompt) calls of one sample; 2 timesteps kept
    assert "6 transformer calls, kept 4 samples at 2 timesteps" in cap.out
    assert "hidden_states (4, 4, 3, 8, 8)" in cap.out   # 5 frames -> 3 latent frames (2x causal), 16 px -> 8
    runner = make_runner(diffusers.WanTransformer3DModel.from_pretrained(pipe_dir / "transformer"))
    inputs = load_inputs(calib, runner)
    assert len(set(inputs[1].tolist())) == 2 and float(inputs[1].max()) > 1   # the scheduler's timesteps
    out = tmp_path / "search"
    assert main(["search", "--diffusers", str(pipe_dir), "--calib-inputs", calib, "--budget", "W4A8", "--keep", "2",
                 "--baselines", "uniform", "--no-progress", "--device", "cpu", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "WanTransformer3DModel" in text
    report = json.loads((out / "report.json").read_text())
    assert report["tss"]["mse"] <= report["baselines"]["uniform"]["mse"] * (1 + 1e-6)
    plan = json.loads((out / "plan.json").read_text())["layers"]
    assert plan["blocks.0.attn1.to_k"] == plan["blocks.0.attn1.to_q"]
    res = tmp_path / "closed"
    assert main(["search", "--diffusers", str(pipe_dir), "--calib-inputs", calib, "--budget", "W4A8", "--keep", "2",
                 "--select", "closed-loop-root", "--closed-loop-prompts", str(prompts), "--closed-loop-steps", "2",
                 "--closed-loop-height", "16", "--closed-loop-width", "16", "--closed-loop-frames", "5",
                 "--no-progress", "--device", "cpu", "--out", str(res)]) == 0
    assert json.loads((res / "report.json").read_text())["tss"]["closed_loop_mse"] > 0
    ptq = str(tmp_path / "ptq")
    assert main(["ptq", "--diffusers", str(pipe_dir), "--calib-inputs", calib, "--calib-batch", "2", "--bits",
                 "W4A8", "--max-tokens", "64", "--rounds", "1", "--out", ptq]) == 0
    art = tmp_path / "art"
    assert main(["quantize", "--diffusers", str(pipe_dir), "--ptq", ptq, "--out", str(art)]) == 0
    assert main(["sample", "--pipeline", str(pipe_dir), "--artifact", str(art), "--prompts", str(prompts), "--steps",
                 "2", *size, "--frames", "5", "--device", "cpu", "--out", str(tmp_path / "q.png")]) == 0
    capsys.readouterr()
    assert main(["capture", "--pipeline", str(pipe_dir), "--prompts", str(prompts), "--frames", "0",
                 "--out", calib]) == 2
    assert "--frames must be a positive" in capsys.readouterr().err


def test_capture_search_and_sample_an_image_to_video_pipeline(tmp_path, capsys, monkeypatch):
    """`treeq capture --images` on a Wan 2.1 image-to-video pipeline: each prompt runs alone with its first frame,
    the calls carry the CLIP image tokens; `treeq search` cuts them, `treeq sample --images` samples the quantized
    transformer with the images."""
    pytest.importorskip("accelerate", reason="diffusers loads Wan (float32-kept modules) only with accelerate")
    import types

    from tiny_diffusers import tiny_wan_i2v_pipeline

    from treeq_engine.cli import main

    pipe = tiny_wan_i2v_pipeline()   # (skips without transformers)
    import diffusers.pipelines.wan.pipeline_wan_i2v as i2v

    # (diffusers' image-to-video pipeline calls ftfy even where it is not installed; Wan's own setup installs it)
    monkeypatch.setattr(i2v, "ftfy", types.SimpleNamespace(fix_text=lambda t: t), raising=False)
    pipe.transformer = perturbed(pipe.transformer)
    pipe_dir = tmp_path / "i2v"
    pipe.save_pretrained(pipe_dir)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cat\na dog on the hill\n")
    images = write_images(tmp_path, ["first.png", "other.png"], sizes={n: (48, 40) for n in ("first.png", "other.png")})
    calib = str(tmp_path / "calib.safetensors")
    size = ["--height", "32", "--width", "32", "--frames", "5"]
    assert main(["capture", "--pipeline", str(pipe_dir), "--prompts", str(prompts), "--images", images,
                 "--steps", "2", "--timesteps", "2", "--cfg", "1.0", *size, "--batch", "1", "--device", "cpu",
                 "--out", calib]) == 0
    assert "kept 4 samples at 2 timesteps" in capsys.readouterr().out   # 2 prompts x 2 steps, one call each
    runner = make_runner(diffusers.WanTransformer3DModel.from_pretrained(pipe_dir / "transformer"))
    inputs = load_inputs(calib, runner)
    assert inputs[0].shape == (4, 10, 3, 16, 16) and inputs[3].shape == (4, 5, 12)   # CLIP's 4 patches + class
    out = tmp_path / "search"
    assert main(["search", "--diffusers", str(pipe_dir), "--calib-inputs", calib, "--budget", "W4A8", "--keep", "2",
                 "--baselines", "", "--no-progress", "--device", "cpu", "--out", str(out)]) == 0
    art = tmp_path / "art"
    assert main(["quantize", "--diffusers", str(pipe_dir), "--plan", str(out / "plan.json"), "--out", str(art)]) == 0
    capsys.readouterr()
    assert main(["sample", "--pipeline", str(pipe_dir), "--artifact", str(art), "--prompts", str(prompts),
                 "--images", images, "--steps", "2", *size, "--device", "cpu",
                 "--out", str(tmp_path / "q.png")]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["samples"] == 2 and report["frames"] == 5


def test_capture_search_ptq_and_sample_a_ti2v_pipeline(tmp_path, capsys, monkeypatch):
    """Wan 2.2 TI2V (a ``WanPipeline`` with ``expand_timesteps``): `treeq capture` records one timestep per latent
    token, text to video (a call's tokens alike) and, with --images, image to video (the directory loads as
    ``WanImageToVideoPipeline``; the first frame's tokens at 0); `treeq search` and `treeq ptq` read them and
    `treeq sample --images` samples the packed transformer. Without ``expand_timesteps`` a WanPipeline takes no
    images."""
    pytest.importorskip("accelerate", reason="diffusers loads Wan (float32-kept modules) only with accelerate")
    import types

    import diffusers.pipelines.wan.pipeline_wan_i2v as i2v
    from tiny_diffusers import tiny_wan_ti2v_pipeline

    from treeq_engine.cli import main

    monkeypatch.setattr(i2v, "ftfy", types.SimpleNamespace(fix_text=lambda t: t), raising=False)   # (as above)
    pipe = tiny_wan_ti2v_pipeline()   # (skips without transformers)
    pipe.transformer = perturbed(pipe.transformer)
    pipe_dir = tmp_path / "ti2v"
    pipe.save_pretrained(pipe_dir)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cat\na dog on the hill\n")
    images = write_images(tmp_path, ["first.png", "other.png"])
    size = ["--height", "32", "--width", "32", "--frames", "5"]   # latents 3 x 16 x 16: 3 x 8 x 8 tokens
    runner = make_runner(diffusers.WanTransformer3DModel.from_pretrained(pipe_dir / "transformer"))
    calib = {}
    for mode, extra in (("i2v", ["--images", images, "--batch", "1"]), ("t2v", [])):
        calib[mode] = str(tmp_path / f"{mode}.safetensors")
        assert main(["capture", "--pipeline", str(pipe_dir), "--prompts", str(prompts), *extra, "--steps", "2",
                     "--timesteps", "2", "--cfg", "1.0", *size, "--device", "cpu", "--out", calib[mode]]) == 0
        assert "kept 4 samples at 2 timesteps" in capsys.readouterr().out
        t = load_inputs(calib[mode], runner)[1]
        assert t.shape == (4, 192) and bool((t[:, 64:] == t[:, -1:]).all()) and bool((t[:, -1] > 0).all())
        assert bool((t[:, :64] == 0).all()) if mode == "i2v" else bool((t == t[:, :1]).all())
    out = tmp_path / "search"
    assert main(["search", "--diffusers", str(pipe_dir), "--calib-inputs", calib["i2v"], "--budget", "W4A8",
                 "--keep", "2", "--baselines", "uniform", "--no-progress", "--device", "cpu", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert 0 < report["tss"]["mse"] <= report["baselines"]["uniform"]["mse"] * (1 + 1e-6)
    ptq = str(tmp_path / "ptq")
    assert main(["ptq", "--diffusers", str(pipe_dir), "--calib-inputs", calib["i2v"], "--calib-batch", "2", "--bits",
                 "W4A8", "--branch", "none", "--max-tokens", "256", "--rounds", "1", "--out", ptq]) == 0
    art = tmp_path / "art"
    assert main(["quantize", "--diffusers", str(pipe_dir), "--ptq", ptq, "--out", str(art)]) == 0
    capsys.readouterr()
    assert main(["sample", "--pipeline", str(pipe_dir), "--artifact", str(art), "--prompts", str(prompts),
                 "--images", images, "--steps", "2", *size, "--device", "cpu", "--out", str(tmp_path / "q.png")]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["samples"] == 2
    index = json.loads((pipe_dir / "model_index.json").read_text())
    (pipe_dir / "model_index.json").write_text(json.dumps({**index, "expand_timesteps": False}))
    assert main(["capture", "--pipeline", str(pipe_dir), "--prompts", str(prompts), "--images", images,
                 "--out", str(tmp_path / "c")]) == 2
    assert "WanPipeline takes no image" in capsys.readouterr().err


def test_each_expert_of_a_two_expert_pipeline(tmp_path, capsys):
    """Wan 2.2 A14B's two experts: `treeq capture --transformer` records the calls of the one it names (the high-noise
    expert's timesteps at or above the boundary, the low-noise one's below); each is searched or packed on its own
    (--diffusers DIR/transformer_2), or closed loop through the pipeline (--transformer); `treeq sample` replaces
    transformer with --artifact and transformer_2 with
    --artifact-2, each changing the video; an expert's artifact given for the other, and --artifact-2 on a
    one-transformer pipeline, are refused."""
    pytest.importorskip("accelerate", reason="diffusers loads Wan (float32-kept modules) only with accelerate")
    from PIL import Image
    from tiny_diffusers import tiny_wan_a14b_pipeline

    from treeq_engine.cli import main

    pipe = tiny_wan_a14b_pipeline()   # (skips without transformers)
    pipe.transformer, pipe.transformer_2 = perturbed(pipe.transformer), perturbed(pipe.transformer_2)
    pipe_dir = tmp_path / "a14b"
    pipe.save_pretrained(pipe_dir)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cat\n")
    size = ["--height", "16", "--width", "16", "--frames", "5"]
    for expert, high in (("transformer", True), ("transformer_2", False)):
        calib = str(tmp_path / f"{expert}.safetensors")
        assert main(["capture", "--pipeline", str(pipe_dir), "--transformer", expert, "--prompts", str(prompts),
                     "--steps", "6", "--timesteps", "2", *size, "--device", "cpu", "--out", calib]) == 0
        assert "kept 4 samples at 2 timesteps" in capsys.readouterr().out   # (prompt and negative prompt)
        t = load_inputs(calib, make_runner(diffusers.WanTransformer3DModel.from_pretrained(pipe_dir / expert)))[1]
        assert bool((t >= 500).all()) if high else bool((t < 500).all())
    low = tmp_path / "search-low"
    assert main(["search", "--diffusers", str(pipe_dir / "transformer_2"), "--calib-inputs",
                 str(tmp_path / "transformer_2.safetensors"), "--budget", "W4A8", "--keep", "2", "--baselines", "",
                 "--no-progress", "--device", "cpu", "--out", str(low)]) == 0
    closed = tmp_path / "closed-low"   # (closed loop through the pipeline, transformer in full precision)
    assert main(["search", "--diffusers", str(pipe_dir), "--transformer", "transformer_2", "--calib-inputs",
                 str(tmp_path / "transformer_2.safetensors"), "--budget", "W4A8", "--keep", "2", "--baselines", "",
                 "--select", "closed-loop-root", "--closed-loop-prompts", str(prompts), "--closed-loop-steps", "4",
                 "--closed-loop-height", "16", "--closed-loop-width", "16", "--closed-loop-frames", "5",
                 "--no-progress", "--device", "cpu", "--out", str(closed)]) == 0
    assert json.loads((closed / "report.json").read_text())["tss"]["closed_loop_mse"] > 0
    refused("its 1 steps never call its transformer_2",   # (one step, at the high-noise end: a search of nothing)
            ["search", "--diffusers", str(pipe_dir), "--transformer", "transformer_2", "--calib-inputs",
             str(tmp_path / "transformer_2.safetensors"), "--budget", "W4A8", "--keep", "2", "--baselines", "",
             "--select", "closed-loop-root", "--closed-loop-prompts", str(prompts), "--closed-loop-steps", "1",
             "--closed-loop-height", "16", "--closed-loop-width", "16", "--closed-loop-frames", "5",
             "--no-progress", "--device", "cpu", "--out", str(tmp_path / "closed-none")])
    arts = {"transformer": tmp_path / "art-high", "transformer_2": tmp_path / "art-low"}
    assert main(["quantize", "--diffusers", str(pipe_dir / "transformer"), "--uniform", "W4A4",
                 "--out", str(arts["transformer"])]) == 0
    assert main(["quantize", "--diffusers", str(pipe_dir / "transformer_2"), "--plan", str(low / "plan.json"),
                 "--out", str(arts["transformer_2"])]) == 0
    videos = {}
    for name, extra in (("fp", []), ("low", ["--artifact-2", str(arts["transformer_2"])]),
                        ("both", ["--artifact", str(arts["transformer"]), "--artifact-2", str(arts["transformer_2"])])):
        capsys.readouterr()
        out = tmp_path / f"{name}.png"
        assert main(["sample", "--pipeline", str(pipe_dir), *extra, "--prompts", str(prompts), "--steps", "4",
                     *size, "--device", "cpu", "--out", str(out)]) == 0
        assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["quantized"] == bool(extra)
        with Image.open(out) as im:
            videos[name] = im.tobytes()
    assert len(set(videos.values())) == 3   # each artifact took its expert's place
    refused("made from the pipeline's transformer_2, given for its transformer",   # (one class, one config: by folder)
            ["sample", "--pipeline", str(pipe_dir), "--artifact", str(arts["transformer_2"]), "--prompts", str(prompts),
             *size, "--steps", "2", "--device", "cpu"])
    index = json.loads((pipe_dir / "model_index.json").read_text())
    (pipe_dir / "model_index.json").write_text(json.dumps({**index, "transformer_2": [None, None],
                                                           "boundary_ratio": None}))
    refused("has no transformer_2", ["sample", "--pipeline", str(pipe_dir), "--artifact-2", str(arts["transformer_2"]),
                                     "--prompts", str(prompts), *size, "--steps", "2", "--device", "cpu"])


def test_what_the_commands_cannot_run_is_refused_before_loading(tmp_path, capsys):
    """An image-conditioned pipeline (its call needs an image) is refused by capture, sample and closed-loop search,
    a two-expert one (Wan 2.2 A14B) by capture without --transformer and by closed-loop search, from model_index.json
    alone, before any weights load."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cat\n")
    for cls, extra, what in (("WanImageToVideoPipeline", {}, "image for each call"),
                             ("WanPipeline", {"transformer_2": ["diffusers", "WanTransformer3DModel"]},
                              "two transformers.*give --transformer transformer or transformer_2")):
        d = tmp_path / cls
        (d / "transformer").mkdir(parents=True)
        (d / "transformer" / "config.json").write_text(json.dumps({"_class_name": "WanTransformer3DModel"}))
        (d / "model_index.json").write_text(json.dumps({"_class_name": cls, "transformer": ["diffusers", "x"],
                                                        **extra}))   # (no weights anywhere: nothing may load)
        refused(what, ["capture", "--pipeline", str(d), "--prompts", str(prompts), "--out", str(tmp_path / "c")])
        if cls == "WanImageToVideoPipeline":   # (a two-expert pipeline samples with both: its own test)
            refused(what, ["sample", "--pipeline", str(d), "--artifact", str(tmp_path / "art"), "--prompts",
                           str(prompts)])
        refused(what.split(".")[0], ["search", "--diffusers", str(d), "--calib-inputs", str(tmp_path / "c"),
                                     "--budget", "W4A8", "--select", "closed-loop-root", "--closed-loop-prompts",
                                     str(prompts)])


def test_a_bf16_cast_keeps_what_wan_keeps_in_float32(tmp_path):
    """The search's cast to bf16 leaves Wan's float32-kept modules (time embedder, norms, modulation and rotary
    tables) as from_pretrained(torch_dtype=bf16) leaves them, unrounded."""
    pytest.importorskip("accelerate", reason="diffusers loads Wan (float32-kept modules) only with accelerate")
    from treeq_engine.models.diffusers_transformers import cast_keeping_fp32

    model = tiny_wan(image=True)
    model.save_pretrained(tmp_path / "wan")
    loaded = diffusers.WanTransformer3DModel.from_pretrained(tmp_path / "wan", torch_dtype=torch.bfloat16)
    cast = cast_keeping_fp32(tiny_wan(image=True), torch.bfloat16)
    want = {n: t.dtype for n, t in [*loaded.named_parameters(), *loaded.named_buffers()]}
    got = {n: t.dtype for n, t in [*cast.named_parameters(), *cast.named_buffers()]}
    assert got == want and torch.float32 in got.values() and torch.bfloat16 in got.values()
    fresh = tiny_wan(image=True)
    assert torch.equal(cast.rope.freqs_cos, fresh.rope.freqs_cos)   # kept, not rounded through bf16
