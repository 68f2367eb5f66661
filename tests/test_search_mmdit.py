"""The search, PTQ and PEFT on diffusers' MMDiT transformers, SD3 and Flux (tiny random configs, offline): the
runner's segments compose to the model bit for bit, tied leaves follow what reads one input, the evaluator agrees
with a brute-force oracle that converts a copy and runs the model's own forward, and the command line captures a
Flux pipeline, searches, calibrates, fine-tunes and packs."""
import copy
import json
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
diffusers = pytest.importorskip("diffusers", reason="diffusers is an optional dependency (requirements-dev.txt)")

from pipeline_flow import ptq_peft_packed, write_images  # noqa: E402
from tiny_diffusers import perturbed  # noqa: E402
from tinydit import one_thread  # noqa: E402,F401

from cli_refusal import refused  # noqa: E402
from treeq_engine.nn import convert, quant_layers  # noqa: E402
from treeq_engine.plan import LayerConfig, QuantPlan  # noqa: E402
from treeq_engine.search import Environment, Evaluator, MMDiTRunner, SearchSpace, make_runner  # noqa: E402
from treeq_engine.search.diffusers_runner import diffusers_arch, load_inputs, save_inputs  # noqa: E402
from treeq_engine.search.evaluator import run_segments  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_sd3(dual=False):
    torch.manual_seed(0)
    extra = dict(dual_attention_layers=(0,), qk_norm="rms_norm") if dual else {}   # SD3.5-medium's blocks
    return diffusers.SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2,
                                           attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                           caption_projection_dim=16, pooled_projection_dim=8, out_channels=4,
                                           pos_embed_max_size=16, **extra).eval()


def tiny_flux(guidance=False):
    torch.manual_seed(0)
    return diffusers.FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2,
                                            attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                            pooled_projection_dim=8, axes_dims_rope=(2, 2, 4),
                                            guidance_embeds=guidance).eval()


MODELS = {"sd3": tiny_sd3, "sd3-dual": lambda: tiny_sd3(dual=True), "flux": tiny_flux,
          "flux-guidance": lambda: tiny_flux(guidance=True)}


def call(model, n=4, seed=0, hw=(8, 8)):
    """The keyword arguments a pipeline passes the transformer (Flux: ids unbatched, timesteps / 1000)."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(n, 5, 16, generator=g)
    pooled = torch.randn(n, 8, generator=g)
    if type(model).__name__ == "SD3Transformer2DModel":
        return dict(hidden_states=torch.randn(n, 4, *hw, generator=g), encoder_hidden_states=text,
                    pooled_projections=pooled, timestep=torch.randint(0, 1000, (n,), generator=g).float())
    h, w = hw[0] // 2, hw[1] // 2
    img_ids = torch.zeros(h, w, 3)
    img_ids[..., 1] += torch.arange(h)[:, None]
    img_ids[..., 2] += torch.arange(w)[None, :]
    kw = dict(hidden_states=torch.randn(n, h * w, 16, generator=g), encoder_hidden_states=text,
              pooled_projections=pooled, timestep=torch.rand(n, generator=g), img_ids=img_ids.reshape(-1, 3),
              txt_ids=torch.zeros(5, 3))
    if model.config.guidance_embeds:
        kw["guidance"] = torch.full((n,), 3.5)
    return kw


def example(runner, **kw):
    """The runner's input tuple for a pipeline-like call, and the model's own output on it."""
    c = call(runner.model, **kw)
    with torch.no_grad():
        return runner.inputs(**c), runner.model(**c).sample


@pytest.mark.parametrize("name", sorted(MODELS))
def test_segments_compose_to_the_model(name):
    runner = make_runner(perturbed(MODELS[name]()))
    assert isinstance(runner, MMDiTRunner) and diffusers_arch(runner.model) == name.split("-")[0]
    for hw in ((8, 8), (8, 12)):   # neither needs square latents
        inputs, want = example(runner, hw=hw)
        with torch.no_grad():
            assert torch.equal(runner.forward(*inputs), want)
            assert torch.equal(run_segments(runner, inputs), want)   # the metric sees the whole prediction
    joint = len(runner.model.transformer_blocks)
    assert runner.segment_of("transformer_blocks.1.attn.to_q") == 2
    assert runner.segment_of("proj_out") == runner.num_segments - 1
    assert runner.segment_of("context_embedder") == runner.segment_of("time_text_embed.timestep_embedder.linear_1") == 0
    if name.startswith("flux"):
        assert runner.segment_of("single_transformer_blocks.1.proj_mlp") == joint + 2 == runner.num_segments - 2
        assert runner.input_names[-1] == ("guidance" if name == "flux-guidance" else "txt_ids")


def leaf_names(runner):
    inputs, _ = example(runner)
    space = SearchSpace.build(runner.model, inputs, forward=lambda *xs: run_segments(runner, xs), tie=runner.tie)
    return space, [leaf.layer_names for leaf in space.leaves]


def test_tied_leaves():
    """Linears reading one input are one leaf: an attention's to_q/k/v, its add_q/k/v_proj, and in Flux's
    single-stream blocks to_q/k/v with proj_mlp (named by proj_mlp, which runs first)."""
    space, leaves = leaf_names(make_runner(perturbed(tiny_flux())))
    b0 = [tuple(n.split(".", 2)[2] for n in names) for names in leaves if names[0].startswith("transformer_blocks.0.")]
    assert b0 == [("norm1.linear",), ("norm1_context.linear",), ("attn.to_q", "attn.to_k", "attn.to_v"),
                  ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"), ("attn.to_out.0",), ("attn.to_add_out",),
                  ("ff.net.0.proj",), ("ff.net.2",), ("ff_context.net.0.proj",), ("ff_context.net.2",)]
    s1 = [tuple(n.split(".", 2)[2] for n in names) for names in leaves
          if names[0].startswith("single_transformer_blocks.1.")]
    assert s1 == [("norm.linear",), ("proj_mlp", "attn.to_q", "attn.to_k", "attn.to_v"), ("proj_out",)]
    tied = space.leaves[[i for i, names in enumerate(leaves) if "proj_mlp" in names[0]][0]]
    assert tied.tokens == 16 + 5   # text and image tokens, one sequence
    plan = space.plan(np.zeros(len(space.leaves), dtype=np.int64))
    assert len({plan.layers[f"single_transformer_blocks.0.{n}"] for n in ("proj_mlp", "attn.to_v")}) == 1
    _, leaves = leaf_names(make_runner(perturbed(tiny_sd3(dual=True))))
    names = [tuple(n.split(".", 2)[2] for n in ns) for ns in leaves if ns[0].startswith("transformer_blocks.0.")]
    assert ("attn2.to_q", "attn2.to_k", "attn2.to_v") in names and ("attn.to_q", "attn.to_k", "attn.to_v") in names
    last = [tuple(n.split(".", 2)[2] for n in ns) for ns in leaves if ns[0].startswith("transformer_blocks.1.")]
    assert ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj") in last   # context_pre_only: no to_add_out
    assert not any("to_add_out" in n[0] or "ff_context" in n[0] for n in last)


def brute_mse(model, runner, kw, space, env, lo, hi, row, tokens=None, read=None):
    """Convert a fresh copy, run the model's own forward on the pipeline's call, MSE against FP (of the first
    ``tokens`` output tokens where given: what a pipeline keeps of a call with reference images; with the elements
    outside the boolean mask ``read`` counted as exact: a conditioning frame's)."""
    m = copy.deepcopy(model)

    def sample(m):   # (Z-Image returns a list of per-sample outputs: stacked, as its runner's head does)
        out = m(**kw).sample
        out = (torch.stack(out) if isinstance(out, list) else out)[:, :tokens].double()
        return out if read is None else torch.where(read, out, 0.0)

    with torch.no_grad():
        fp = sample(m)
    layers = {n: space.candidates[row[i - lo]] if lo <= i < hi else env.config
              for i, leaf in enumerate(space.leaves) for n in leaf.layer_names}
    layers.update({leaf.name: cfg for leaf, cfg in space.fixed})
    convert(m, QuantPlan(layers))
    node = {n for leaf in space.leaves[lo:hi] for n in leaf.layer_names}
    for name, q in quant_layers(m).items():
        q.set_noise_scale(1.0 if name in node else env.lam)
    with torch.no_grad():
        out = sample(m)
    return float(((out - fp) ** 2).mean())


def check_evaluator(model, kw, lam, seed, *, batch=4, group=3, rows=3, tokens=None, read=None):
    """The evaluator's MSE for random candidate rows of three nodes (the first leaves, middle ones, the last) equals
    ``brute_mse`` on the model's own forward, for a diffusers model called with ``kw`` (one chunk of ``batch``
    samples, ``group`` candidates stacked per forward; ``tokens``: the output tokens the metric reads; ``read``: the
    output elements it reads)."""
    runner = make_runner(model)
    inputs = runner.inputs(**kw)
    space = SearchSpace.build(model, inputs, forward=lambda *xs: run_segments(runner, xs), tie=runner.tie)
    env = Environment(LayerConfig(4, 4), lam)
    pristine = copy.deepcopy(model)
    ev = Evaluator(model, runner, space, inputs, env, batch=batch, group=group)
    rng = np.random.default_rng(seed)
    c = len(space.candidates)
    for lo, hi in ((0, 2), (3, 6), (len(space.leaves) - 3, len(space.leaves))):
        picked = rng.integers(0, c, (rows, hi - lo))
        got = ev.evaluate(lo, hi, picked)
        want = [brute_mse(pristine, runner, kw, space, env, lo, hi, r, tokens, read) for r in picked]
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-12)
        assert (got > 0).all()


@pytest.mark.parametrize("name,lam", [("sd3", 1.0), ("sd3-dual", 0.5), ("flux-guidance", 1.0), ("flux", 0.5)])
def test_evaluate_matches_brute_force(name, lam):
    model = perturbed(MODELS[name]())
    runner = make_runner(model)
    kw = call(model, n=5, seed=3)
    inputs = runner.inputs(**kw)
    space = SearchSpace.build(model, inputs, forward=lambda *xs: run_segments(runner, xs), tie=runner.tie)
    env = Environment(LayerConfig(4, 4), lam)
    pristine = copy.deepcopy(model)
    ev = Evaluator(model, runner, space, inputs, env, batch=5, group=3)   # one chunk, 3 candidates per forward
    rng = np.random.default_rng(len(name))
    c = len(space.candidates)
    for lo, hi in ((0, 2), (4, 7), (len(space.leaves) - 3, len(space.leaves))):
        rows = rng.integers(0, c, (4, hi - lo))
        got = ev.evaluate(lo, hi, rows)
        want = [brute_mse(pristine, runner, kw, space, env, lo, hi, r) for r in rows]
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-12)
        assert (got > 0).all()


def test_inputs_are_checked():
    sd3, flux, fluxg = (make_runner(m()) for m in (tiny_sd3, tiny_flux, lambda: tiny_flux(guidance=True)))
    kw = call(sd3.model, n=2)
    with pytest.raises(ValueError, match=r"hidden_states must be a \(N, C, H, W\) latent tensor"):
        sd3.inputs(**{**kw, "hidden_states": kw["hidden_states"][0]})
    with pytest.raises(ValueError, match="must have 4 channels"):
        sd3.inputs(**{**kw, "hidden_states": torch.randn(2, 3, 8, 8)})
    with pytest.raises(ValueError, match="multiples of the patch size 2"):
        sd3.inputs(**{**kw, "hidden_states": torch.randn(2, 4, 8, 7)})
    with pytest.raises(ValueError, match=r"encoder_hidden_states must be \(N=2, L, 16\)"):
        sd3.inputs(**{**kw, "encoder_hidden_states": torch.randn(2, 5, 12)})
    with pytest.raises(ValueError, match=r"pooled_projections must be \(N=2, 8\)"):
        sd3.inputs(**{**kw, "pooled_projections": None})
    with pytest.raises(ValueError, match="timestep must be a scalar"):
        sd3.inputs(**{**kw, "timestep": torch.zeros(3)})
    with pytest.raises(ValueError, match="skip_layers"):
        sd3.inputs(**kw, skip_layers=[1])
    with pytest.raises(ValueError, match="ControlNet"):
        sd3.inputs(**kw, block_controlnet_hidden_states=[torch.zeros(1)])
    with pytest.raises(ValueError, match="joint_attention_kwargs"):
        sd3.inputs(**kw, joint_attention_kwargs={"scale": 1.0})
    t = sd3.inputs(**{**kw, "timestep": 500.0})[3]
    assert t.tolist() == [500.0, 500.0]   # a scalar timestep broadcast to the batch

    kw = call(flux.model, n=2)
    state = flux.inputs(**kw)
    assert state[4].shape == (2, 16, 3) and torch.equal(state[4][1], kw["img_ids"])   # ids per sample
    assert torch.equal(flux.inputs(**{**kw, "img_ids": state[4]})[4], state[4])        # (as a file stores them)
    with pytest.raises(ValueError, match=r"packed-latent"):
        flux.inputs(**{**kw, "hidden_states": torch.randn(2, 16, 4, 4)})
    with pytest.raises(ValueError, match=r"img_ids must be \(16, 3\) or \(N=2, 16, 3\)"):
        flux.inputs(**{**kw, "img_ids": torch.zeros(15, 3)})
    other = state[4].clone()
    other[1, 0, 1] = 7
    with pytest.raises(ValueError, match="img_ids differ between the samples of one call"):
        flux.inputs(**{**kw, "img_ids": other})
    with pytest.raises(ValueError, match="guidance-distilled"):
        fluxg.inputs(**kw)
    assert fluxg.inputs(**kw, guidance=3.5)[6].tolist() == [3.5, 3.5]
    with pytest.raises(TypeError, match="the search cuts diffusers' .*SD3Transformer2DModel.*; got Linear"):
        make_runner(torch.nn.Linear(2, 2))


def test_calibration_files_round_trip(tmp_path):
    """`save_inputs` / `load_inputs` with the MMDiT names; a file of one architecture refuses the other."""
    flux = make_runner(tiny_flux(guidance=True))
    inputs = flux.inputs(**call(flux.model, n=3))
    path = str(tmp_path / "flux.safetensors")
    save_inputs(path, flux, inputs)
    back = load_inputs(path, flux)
    assert all(torch.equal(a, b) for a, b in zip(back, inputs))
    with pytest.raises(ValueError, match="inputs of a 'flux' transformer, this one is 'sd3'"):
        load_inputs(path, make_runner(tiny_sd3()))
    with pytest.raises(ValueError, match=r"does not take: \['guidance'\].*another variant"):
        load_inputs(path, make_runner(tiny_flux()))   # FLUX.1-dev's calls offered to a schnell-like Flux


def test_search_ptq_peft_quantize_on_sd3(tmp_path, capsys):
    """`treeq search / ptq / peft / quantize --diffusers` on an SD3 transformer directory with saved inputs: the
    plan packs, and the artifact computes what the calibrated, fine-tuned fake-quant transformer computes."""
    from treeq_engine.cli import main

    model = perturbed(tiny_sd3())
    d = tmp_path / "sd3"
    model.save_pretrained(d)
    runner = make_runner(model)
    calib = str(tmp_path / "calib.safetensors")
    save_inputs(calib, runner, tuple(torch.cat(t) for t in zip(*(runner.inputs(**call(model, n=3, seed=s))
                                                                  for s in range(2)))))
    src = ["--diffusers", str(d), "--calib-inputs", calib]
    out = tmp_path / "search"
    assert main(["search", *src, "--budget", "W4A8", "--keep", "3", "--baselines", "uniform", "--no-progress",
                 "--device", "cpu", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "SD3Transformer2DModel" in text and "leaves" in text
    plan = QuantPlan.load(out / "plan.json")
    report = json.loads((out / "report.json").read_text())
    assert report["tss"]["mse"] <= report["baselines"]["uniform"]["mse"]
    assert plan.layers["transformer_blocks.0.attn.to_k"] == plan.layers["transformer_blocks.0.attn.to_q"]
    assert main(["quantize", "--diffusers", str(d), "--plan", str(out / "plan.json"), "--out",
                 str(tmp_path / "a1")]) == 0

    direct, loaded = ptq_peft_packed(tmp_path, src, d, bits="W4A4", peft_steps=3)
    kw = call(model, n=2, seed=7)
    with torch.no_grad():
        want, got = direct(**kw).sample, loaded(**kw).sample.float()
    assert float((got - want).norm() / want.norm()) < 2e-2   # the artifact runs bf16 (quantize's default)


def test_capture_search_and_pack_a_flux_pipeline(tmp_path, capsys):
    """`treeq capture` on a Flux pipeline (its calls all recorded, timesteps chosen after: they come / 1000) ->
    `treeq search` -> `treeq quantize`; the artifact samples in the pipeline."""
    pytest.importorskip("transformers", reason="Flux's pipeline needs transformers (CLIP, T5)")
    from tiny_diffusers import tiny_flux_pipeline

    from treeq_engine.cli import main

    pipe_dir = tmp_path / "flux"
    tiny_flux_pipeline().save_pretrained(pipe_dir)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cat\na blue house on the hill\na dog\n")
    calib = str(tmp_path / "calib.safetensors")
    size = ["--height", "16", "--width", "16"]
    assert main(["capture", "--pipeline", str(pipe_dir), "--prompts", str(prompts), "--steps", "4", "--timesteps",
                 "3", *size, "--batch", "2", "--device", "cpu", "--out", calib]) == 0
    cap = capsys.readouterr()
    assert "8 transformer calls, kept 9 samples at 3 timesteps" in cap.out   # 2 runs x 4 steps; 3 prompts x 3
    assert "no sampler weights" in cap.err
    runner = make_runner(diffusers.FluxTransformer2DModel.from_pretrained(pipe_dir / "transformer"))
    inputs = load_inputs(calib, runner)
    t = inputs[runner.input_names.index("timestep")]
    assert len(set(t.tolist())) == 3 and float(t.max()) <= 1.0   # the pipeline's timesteps / 1000
    out = tmp_path / "search"
    assert main(["search", "--diffusers", str(pipe_dir), "--calib-inputs", calib, "--budget", "W4A8", "--keep", "3",
                 "--no-progress", "--device", "cpu", "--out", str(out)]) == 0
    assert "plain MSE of the prediction" in capsys.readouterr().err
    art = tmp_path / "art"
    assert main(["quantize", "--diffusers", str(pipe_dir), "--plan", str(out / "plan.json"), "--out", str(art)]) == 0
    assert main(["sample", "--pipeline", str(pipe_dir), "--artifact", str(art), "--prompts", str(prompts), "--steps",
                 "2", *size, "--device", "cpu", "--out", str(tmp_path / "q.png")]) == 0
    res = tmp_path / "closed"   # closed-loop selection through the pipeline: its latents come packed
    assert main(["search", "--diffusers", str(pipe_dir), "--calib-inputs", calib, "--budget", "W4A8", "--keep", "2",
                 "--select", "closed-loop-root", "--closed-loop-prompts", str(prompts), "--closed-loop-steps", "2",
                 "--no-progress", "--device", "cpu", "--out", str(res)]) == 0
    report = json.loads((res / "report.json").read_text())
    assert report["tss"]["closed_loop_mse"] > 0
    assert json.loads((res / "plan.json").read_text())["meta"]["selected_by"] == "closed-loop root"
    assert main(["capture", "--pipeline", str(pipe_dir), "--labels", "1,2", "--out", calib]) == 2
    assert "a flux pipeline takes --prompts" in capsys.readouterr().err
    assert main(["capture", "--pipeline", str(pipe_dir), "--prompts", str(prompts), "--height", "0",
                 "--out", calib]) == 2
    assert "--height and --width must be positive" in capsys.readouterr().err


def test_capture_search_and_sample_a_flux_kontext_pipeline(tmp_path, capsys, monkeypatch):
    """FLUX.1 Kontext: without --images it is text to image; with `treeq capture --images` each prompt runs alone
    with its reference image, whose latent tokens (time coordinate 1) follow the image's and stay out of the metric;
    the search runs on them and `treeq sample --images` samples the quantized transformer with the images."""
    pytest.importorskip("transformers", reason="Flux's pipeline needs transformers (CLIP, T5)")
    import diffusers.pipelines.flux.pipeline_flux_kontext as kontext
    from tiny_diffusers import tiny_flux_pipeline

    from treeq_engine.cli import main
    from treeq_engine.search.evaluator import run_segments

    monkeypatch.setattr(kontext, "PREFERRED_KONTEXT_RESOLUTIONS", [(32, 32)])   # (1024-px class sizes: too big)
    pipe = diffusers.FluxKontextPipeline(**tiny_flux_pipeline().components)
    pipe_dir = tmp_path / "kontext"
    pipe.save_pretrained(pipe_dir)
    prompts = tmp_path / "p.txt"
    prompts.write_text("make it red\nadd a dog\n")
    images = write_images(tmp_path, ["a.png", "b.png"], sizes={n: (40, 40) for n in ("a.png", "b.png")})
    calib = str(tmp_path / "calib.safetensors")
    size = ["--height", "16", "--width", "16"]
    assert main(["capture", "--pipeline", str(pipe_dir), "--prompts", str(prompts), "--images",
                 images, "--steps", "2", "--timesteps", "2", *size, "--batch", "1", "--device",
                 "cpu", "--out", calib]) == 0
    runner = make_runner(diffusers.FluxTransformer2DModel.from_pretrained(pipe_dir / "transformer"))
    inputs = load_inputs(calib, runner)
    assert inputs[0].shape == (4, 16 + 64, 16)   # 16-px image: 4x4 tokens; the 32-px reference: 8x8 after them
    with torch.no_grad():
        assert run_segments(runner, inputs).shape == (4, 16, 16)   # the metric reads the image's own
    from treeq_engine.calib.capture import capture_inputs

    assert capture_inputs(runner.model, "proj_out", [inputs], max_tokens=10_000).shape[0] == 4 * 16   # and PTQ
    out, art = tmp_path / "search", tmp_path / "art"
    assert main(["search", "--diffusers", str(pipe_dir), "--calib-inputs", calib, "--budget", "W4A8", "--keep", "2",
                 "--baselines", "", "--no-progress", "--device", "cpu", "--out", str(out)]) == 0
    assert main(["quantize", "--diffusers", str(pipe_dir), "--plan", str(out / "plan.json"), "--out", str(art)]) == 0
    capsys.readouterr()
    for extra in (["--images", images], []):   # (text to image without)
        assert main(["sample", "--pipeline", str(pipe_dir), "--artifact", str(art), "--prompts", str(prompts),
                     *extra, "--steps", "2", *size, "--device", "cpu", "--out", str(tmp_path / "q.png")]) == 0
        assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["samples"] == 2


@pytest.mark.parametrize("shifting", [False, True])
def test_capture_an_sd3_pipeline(tmp_path, capsys, shifting):
    """SD3 under classifier-free guidance (both halves captured, timesteps as the scheduler's); with a scheduler
    that shifts its schedule by resolution, the timesteps are chosen from the first run's calls."""
    pytest.importorskip("transformers", reason="SD3's pipeline needs transformers (CLIP, T5)")
    from tiny_diffusers import tiny_sd3_pipeline

    from treeq_engine.cli import main

    pipe_dir = tmp_path / "sd3"
    tiny_sd3_pipeline(shifting).save_pretrained(pipe_dir)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cat\na blue house on the hill\na dog\n")
    calib = str(tmp_path / "calib.safetensors")
    assert main(["capture", "--pipeline", str(pipe_dir), "--prompts", str(prompts), "--steps", "4", "--timesteps",
                 "2", "--height", "16", "--width", "16", "--batch", "2", "--device", "cpu", "--out", calib]) == 0
    # 2 runs x 4 steps; 3 prompts x 2 guidance halves x 2 timesteps
    assert "8 transformer calls, kept 12 samples at 2 timesteps" in capsys.readouterr().out
    runner = make_runner(diffusers.SD3Transformer2DModel.from_pretrained(pipe_dir / "transformer"))
    inputs = load_inputs(calib, runner)
    t = inputs[runner.input_names.index("timestep")]
    assert len(set(t.tolist())) == 2 and float(t.max()) == 1000.0   # the scheduler's scale, first step kept
    assert inputs[0].shape == (12, 4, 8, 8)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["sd3", "flux-guidance"])
def test_search_on_gpu_matches_cpu(name):
    """The MMDiT runner on CUDA: segments compose to the model exactly, and float32 candidate scores agree with
    the CPU's (different GEMM kernels: a code can flip at a rounding boundary, so a loose bound)."""
    model = perturbed(MODELS[name]())
    runner = make_runner(model)
    kw = call(model, n=5, seed=3)
    inputs = runner.inputs(**kw)
    space = SearchSpace.build(model, inputs, forward=lambda *xs: run_segments(runner, xs), tie=runner.tie)
    env = Environment(LayerConfig(4, 4), 1.0)
    gpu_model = copy.deepcopy(model).cuda()
    gpu_runner = make_runner(gpu_model)
    gpu_kw = {k: v.cuda() for k, v in kw.items()}
    gpu_inputs = gpu_runner.inputs(**gpu_kw)
    with torch.no_grad():
        torch.testing.assert_close(gpu_runner.forward(*gpu_inputs), gpu_model(**gpu_kw).sample, rtol=0, atol=0)
    rows = np.random.default_rng(0).integers(0, len(space.candidates), (6, 3))
    cpu = Evaluator(model, runner, space, inputs, env, batch=5, group=3).evaluate(2, 5, rows)
    gpu = Evaluator(gpu_model, gpu_runner, space, gpu_inputs, env, batch=5, group=3).evaluate(2, 5, rows)
    np.testing.assert_allclose(gpu, cpu, rtol=2e-2)


@pytest.mark.parametrize("name", ["sd3", "sd3-dual", "flux"])
def test_smoothing_folds_into_mmdit_blocks(name):
    """Every SmoothQuant site of an MMDiT block folds exactly (the transformer computes what it did; each linear of
    the site reads ``x/s`` with weight ``W·diag(s)``): the image and text streams' q/k/v and feed-forwards, SD3.5's
    second attention, SD3's last (context_pre_only) block's text q/k/v, Flux's single-block proj_mlp + q/k/v; the
    attention outputs (both streams' values mixed) are refused."""
    from treeq_engine.calib import smooth
    from treeq_engine.calib.capture import capture_inputs

    model = perturbed(MODELS[name]())
    runner = make_runner(model)
    inputs = runner.inputs(**call(model, n=3, seed=4))
    batches = [inputs]
    with torch.no_grad():
        ref = runner.forward(*inputs)
    blk = "transformer_blocks.0"
    sites = [f"{blk}.attn.to_k", f"{blk}.attn.add_v_proj", f"{blk}.ff.net.0.proj", f"{blk}.ff_context.net.0.proj"]
    if name == "sd3-dual":
        sites.append(f"{blk}.attn2.to_q")
    if name.startswith("sd3"):
        sites.append("transformer_blocks.1.attn.add_q_proj")   # the last block: AdaLayerNormContinuous
    else:
        sites.append("single_transformer_blocks.1.attn.to_v")
    g = torch.Generator().manual_seed(5)
    for key in sites:
        site = smooth.site_of(model, key)
        assert key in site.consumers
        before = {c: (capture_inputs(model, c, batches, 10_000), model.get_submodule(c).weight.detach().clone())
                  for c in site.consumers}
        s = torch.rand(before[key][1].shape[1], generator=g) * 3 + 0.2
        smooth.fold(model, key, s)
        with torch.no_grad():
            torch.testing.assert_close(runner.forward(*inputs), ref, rtol=1e-4, atol=1e-5)
        for c, (x, w) in before.items():
            torch.testing.assert_close(capture_inputs(model, c, batches, 10_000), x / s, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(model.get_submodule(c).weight.detach(), w * s)
    if name == "flux":
        assert smooth.site_of(model, "single_transformer_blocks.0.attn.to_q").consumers == tuple(
            f"single_transformer_blocks.0.{c}" for c in ("proj_mlp", "attn.to_q", "attn.to_k", "attn.to_v"))
    with pytest.raises(ValueError, match="only the inputs of to_q/k/v"):
        smooth.fold(model, f"{blk}.attn.to_out.0", torch.ones(16))
    plan = QuantPlan.block_uniform(model, 4, 4)
    keys = smooth.targets(model, plan)
    assert f"{blk}.attn.to_q" in keys and f"{blk}.ff.net.0.proj" in keys and f"{blk}.attn.to_out.0" not in keys


def test_ptq_with_smoothing_on_flux(tmp_path, capsys):
    """`treeq ptq --smooth-alphas` on a Flux: sites are chosen per α, folded, and the packed artifact computes what
    the calibrated fake-quant transformer computes."""
    from treeq_engine.calib.ptq import load_calibration
    from treeq_engine.cli import main
    from treeq_engine.models.diffusers_transformers import rebuild
    from treeq_engine.runtime import artifact

    model = perturbed(tiny_flux())
    d = tmp_path / "flux"
    model.save_pretrained(d)
    runner = make_runner(model)
    calib = str(tmp_path / "calib.safetensors")
    save_inputs(calib, runner, runner.inputs(**call(model, n=4, seed=1)))
    ptq = str(tmp_path / "ptq")
    assert main(["ptq", "--diffusers", str(d), "--calib-inputs", calib, "--bits", "W4A4", "--branch", "none",
                 "--max-tokens", "64", "--rounds", "1", "--smooth-alphas", "0.5", "0.8", "--out", ptq]) == 0
    state = json.loads((tmp_path / "ptq" / "ptq.json").read_text())
    # 1 joint block: image and text q/k/v and feed-forwards; 2 single blocks: proj_mlp + q/k/v
    assert len(state["smooth"]) == 6
    art = tmp_path / "art"
    assert main(["quantize", "--diffusers", str(d), "--ptq", ptq, "--out", str(art)]) == 0
    direct = diffusers.FluxTransformer2DModel.from_pretrained(d).eval()
    load_calibration(direct, ptq)
    loaded = artifact.load(art, rebuild(artifact.read_manifest(art)["model_config"]))
    kw = call(model, n=2, seed=7)
    with torch.no_grad():
        want, got = direct(**kw).sample, loaded(**kw).sample.float()
    assert float((got - want).norm() / want.norm()) < 2e-2


@pytest.mark.parametrize("name", ["sd3", "flux-guidance"])
def test_profile_covers_what_a_latency_search_looks_up(tmp_path, capsys, name):
    """`treeq profile --diffusers DIR --calib-inputs FILE` times every linear at the rows per image of the
    calibration file (found on a weightless copy) × each batch: a latency-budgeted search of that model at either
    serving batch finds every entry it looks up."""
    from treeq_engine.cli import main
    from treeq_engine.search.costs import LatencyTable

    model = perturbed(MODELS[name]())
    d = tmp_path / name
    model.save_pretrained(d)
    runner = make_runner(model)
    calib = str(tmp_path / "calib.safetensors")
    save_inputs(calib, runner, runner.inputs(**call(model, n=2, hw=(8, 12))))
    lut = tmp_path / "lut.json"
    assert main(["profile", "--diffusers", str(d), "--calib-inputs", calib, "--batch", "1,2", "--w-bits", "4,8",
                 "--a-bits", "8", "--reps", "1", "--device", "cpu", "--out", str(lut)]) == 0
    rows = {(e["k"], e["n"], e["tokens"]) for e in json.loads(lut.read_text())["entries"]}
    image_tokens = 24 if name == "sd3" else 24 + 5   # (8x12 latents in 2x2 patches; Flux's single blocks: + text)
    assert any(t == image_tokens for _, _, t in rows) and any(t == 2 * image_tokens for _, _, t in rows)
    assert any(t == 1 for _, _, t in rows)   # the adaLN linears: one row per image
    LatencyTable.load(lut)
    for serve in ("1", "2"):
        out = tmp_path / f"s{serve}"
        assert main(["search", "--diffusers", str(d), "--calib-inputs", calib, "--budget", "1s", "--latency-table",
                     str(lut), "--serve-batch", serve, "--w-bits", "4,8", "--a-bits", "8", "--keep", "2",
                     "--baselines", "", "--no-progress", "--device", "cpu", "--out", str(out)]) == 0
        report = json.loads((out / "report.json").read_text())
        assert report["tss"]["costs"]["us"] > 0
    capsys.readouterr()
    refused("go together", ["profile", "--diffusers", str(d), "--out", str(lut)])
    other = make_runner(tiny_sd3() if name != "sd3" else tiny_flux())
    wrong = str(tmp_path / "wrong.safetensors")
    save_inputs(wrong, other, other.inputs(**call(other.model, n=1)))
    refused("inputs of a", ["profile", "--diffusers", str(d), "--calib-inputs", wrong, "--out", str(lut)])


def test_walkthrough_mends(tmp_path, capsys):
    """What a user walkthrough found: SD3 loads at the asked dtype (diffusers without accelerate left it float32),
    closed-loop selection samples at --closed-loop-height/--width and the summary names its result, a diffusers
    calibration used without --diffusers says which model it was made on, and the DiT-only size check names the
    pipeline it refuses."""
    pytest.importorskip("transformers", reason="SD3's pipeline needs transformers (CLIP, T5)")
    from tiny_diffusers import tiny_sd3_pipeline

    from treeq_engine.cli import main
    from treeq_engine.models.diffusers_transformers import load_pipeline, load_transformer

    pipe_dir = tmp_path / "sd3"
    tiny_sd3_pipeline().save_pretrained(pipe_dir)
    model, _ = load_transformer(pipe_dir, torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert load_pipeline(pipe_dir, torch.float16).transformer.dtype == torch.float16
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cat\na dog\n")
    calib = str(tmp_path / "calib.safetensors")
    assert main(["capture", "--pipeline", str(pipe_dir), "--prompts", str(prompts), "--steps", "2", "--timesteps",
                 "3", "--height", "16", "--width", "16", "--dtype", "float16", "--device", "cpu", "--out", calib]) == 0
    assert "--timesteps 3 > --steps 2" in capsys.readouterr().err
    out = tmp_path / "s"
    sizes = []
    original = diffusers.StableDiffusion3Pipeline.__call__

    def recording(self, *a, **kw):
        sizes.append((kw.get("height"), kw.get("width")))
        return original(self, *a, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(diffusers.StableDiffusion3Pipeline, "__call__", recording)
        assert main(["search", "--diffusers", str(pipe_dir), "--calib-inputs", calib, "--budget", "W4A8", "--keep",
                     "2", "--select", "closed-loop-root", "--closed-loop-prompts", str(prompts), "--closed-loop-steps",
                     "2", "--closed-loop-height", "24", "--closed-loop-width", "16", "--no-progress", "--device",
                     "cpu", "--out", str(out)]) == 0
    assert sizes and set(sizes) == {(24, 16)}   # the FP reference and every plan scored
    assert "selected closed loop at the root: closed-loop MSE" in capsys.readouterr().out
    assert main(["search", "--diffusers", str(pipe_dir), "--calib-inputs", calib, "--budget", "W4A8",
                 "--closed-loop-height", "16", "--no-progress", "--device", "cpu"]) == 2
    assert "are for --select closed-loop" in capsys.readouterr().err
    ptq = str(tmp_path / "ptq")
    assert main(["ptq", "--diffusers", str(pipe_dir), "--calib-inputs", calib, "--bits", "W8A8", "--branch", "none",
                 "--max-tokens", "32", "--rounds", "1", "--out", ptq]) == 0
    refused(f"calibrated on the diffusers model {pipe_dir}: pass --diffusers",
            ["quantize", "--ptq", ptq, "--out", str(tmp_path / "art")])
    refused("calibrated on the diffusers model", ["peft", "--ptq", ptq, "--out", str(tmp_path / "peft")])
