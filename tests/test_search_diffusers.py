"""The search on diffusers' DiT and PixArt transformers (tiny random configs, offline): the runner's segments
compose to the model bit for bit, the evaluator agrees with a brute-force oracle that converts a copy and runs the
model's own forward, pipeline calls are captured as calibration inputs, and a whole search returns a plan that
``quantize`` packs."""
import copy

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="diffusers is an optional dependency (requirements-dev.txt)")

from tiny_diffusers import perturbed, tiny_dit, tiny_dit_pipeline, tiny_pixart, tiny_pixart_pipeline  # noqa: E402
from tinydit import one_thread  # noqa: E402,F401

from cli_refusal import refused  # noqa: E402
from treeq_engine.nn import convert, quant_layers  # noqa: E402
from treeq_engine.plan import LayerConfig, QuantPlan  # noqa: E402
from treeq_engine.search import Budget, DiffusersRunner, Environment, Evaluator, SearchSpace, capture_calls  # noqa: E402
from treeq_engine.search.diffusers_runner import load_inputs, save_inputs  # noqa: E402
from treeq_engine.search.evaluator import run_segments  # noqa: E402
from treeq_engine.search.run import SearchConfig, search  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def pixart_extra():
    torch.manual_seed(0)
    return diffusers.PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=24, in_channels=4,
                                              out_channels=8, num_layers=2, sample_size=8, patch_size=2,
                                              cross_attention_dim=48, caption_channels=24, norm_type="ada_norm_single",
                                              use_additional_conditions=True).eval()   # width: a multiple of 3


def example(runner, n=4, seed=0, hw=(8, 8)):
    """Inputs as a pipeline would pass them, the runner's tuple, and the model's own output on them."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, *hw, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    m = runner.model
    with torch.no_grad():
        if runner.arch == "dit":
            y = torch.randint(0, 10, (n,), generator=g)
            return runner.inputs(x, t, y), m(x, t, y).sample
        enc = torch.randn(n, 5, 24, generator=g)
        mask = (torch.rand(n, 5, generator=g) > 0.4).long()
        mask[:, 0] = 1
        cond = {"resolution": None, "aspect_ratio": None}
        if runner.extra_conditions:
            cond = {"resolution": torch.tensor([[512.0, 768.0]]).repeat(n, 1), "aspect_ratio": torch.full((n, 1), 1.5)}
        inputs = runner.inputs(x, t, encoder_hidden_states=enc, encoder_attention_mask=mask, added_cond_kwargs=cond)
        return inputs, m(x, enc, t, added_cond_kwargs=cond, encoder_attention_mask=mask).sample


MODELS = {"dit": tiny_dit, "pixart": tiny_pixart, "pixart-extra": pixart_extra}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_segments_compose_to_the_model(name):
    runner = DiffusersRunner(perturbed(MODELS[name]()))
    for hw in ((8, 8),) + (((8, 12),) if name.startswith("pixart") else ()):   # PixArt latents need not be square
        inputs, want = example(runner, hw=hw)
        with torch.no_grad():
            got = runner.forward(*inputs)
            assert torch.equal(got, want)
            assert torch.equal(run_segments(runner, inputs), want[:, :4])   # the metric sees the ε half
    assert runner.segment_of("transformer_blocks.1.attn1.to_q") == 2
    assert runner.segment_of("proj_out") == runner.num_segments - 1 == 3


def test_space_follows_the_model():
    runner = DiffusersRunner(perturbed(tiny_pixart()))
    inputs, _ = example(runner)
    space = SearchSpace.build(runner.model, inputs, forward=lambda *xs: run_segments(runner, xs))
    block = [n.split(".", 2)[2] for n in space.names[:10]]
    assert block == ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                     "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2"]
    tokens = {leaf.name.split(".", 2)[2]: leaf.tokens for leaf in space.leaves[:10]}
    assert tokens["attn1.to_q"] == 16 and tokens["attn2.to_k"] == 5     # captions: 5 tokens per sample
    assert len(space.leaves) == 20
    assert {leaf.name for leaf, _ in space.fixed} == {"adaln_single.emb.timestep_embedder.linear_1",
                                                       "adaln_single.emb.timestep_embedder.linear_2",
                                                       "adaln_single.linear", "caption_projection.linear_1",
                                                       "caption_projection.linear_2", "proj_out"}
    dit = DiffusersRunner(perturbed(tiny_dit()))
    inputs, _ = example(dit)
    space = SearchSpace.build(dit.model, inputs, forward=lambda *xs: run_segments(dit, xs))
    assert space.names[0] == "transformer_blocks.0.norm1.linear" and space.leaves[0].tokens == 1
    assert all(".emb." in leaf.name or leaf.name.startswith("proj_out") for leaf, _ in space.fixed)


def test_tied_leaves():
    """to_q/to_k/to_v (and cross-attention's to_k/to_v) as one leaf each: the order, the summed costs, the plan
    writing every tied layer, and a plan that splits a tie refused."""
    from treeq_engine.plan import PlanError
    from treeq_engine.search import cost_model

    runner = DiffusersRunner(perturbed(tiny_pixart()))
    inputs, _ = example(runner)
    fwd = lambda *xs: run_segments(runner, xs)  # noqa: E731
    tied = SearchSpace.build(runner.model, inputs, forward=fwd, tie=runner.tie)
    plain = SearchSpace.build(runner.model, inputs, forward=fwd)
    assert [leaf.layer_names for leaf in tied.leaves[:7]] == [
        tuple(f"transformer_blocks.0.{n}" for n in names) for names in (
            ("attn1.to_q", "attn1.to_k", "attn1.to_v"), ("attn1.to_out.0",), ("attn2.to_q",),
            ("attn2.to_k", "attn2.to_v"), ("attn2.to_out.0",), ("ff.net.0.proj",), ("ff.net.2",))]
    assert len(tied.leaves) == 14 and tied.leaves[3].tokens == 5 and tied.leaves[0].params == 3 * 32 * 32
    rng = np.random.default_rng(0)
    a = rng.integers(0, len(tied.candidates), len(tied.leaves))
    plan = tied.plan(a)
    assert plan.layers["transformer_blocks.1.attn1.to_k"] == plan.layers["transformer_blocks.1.attn1.to_q"]
    np.testing.assert_array_equal(tied.assignment(plan), a)
    for kind in ("w", "wa", "bytes", "latency"):   # a tied leaf costs what its layers cost apart
        np.testing.assert_allclose(cost_model(tied, kind).total(a), cost_model(plain, kind).total(plain.assignment(plan)))
    split = plan.with_layer("transformer_blocks.0.attn2.to_v", LayerConfig(2, 8))
    with pytest.raises(PlanError, match="tied layers must share one config"):
        tied.assignment(split)
    dit = DiffusersRunner(perturbed(tiny_dit()))
    x, _ = example(dit)
    space = SearchSpace.build(dit.model, x, forward=lambda *xs: run_segments(dit, xs), tie=dit.tie)
    assert [leaf.name.split(".", 2)[2] for leaf in space.leaves[:5]] == [   # our DiT's five linears per block
        "norm1.linear", "attn1.to_q", "attn1.to_out.0", "ff.net.0.proj", "ff.net.2"]


def model_call(m, runner, inputs):
    """The transformer's own forward on a runner input tuple (the call a pipeline makes)."""
    if runner.arch == "dit":
        return m(*inputs).sample
    x, enc, t, mask = inputs[:4]
    cond = {"resolution": inputs[4], "aspect_ratio": inputs[5]} if runner.extra_conditions else None
    return m(x, enc, t, added_cond_kwargs=cond, encoder_attention_mask=mask).sample


def brute_mse(model, runner, inputs, space, env, lo, hi, row):
    """Convert a fresh copy, run the model's own forward, MSE of the ε half against FP."""
    m = copy.deepcopy(model)
    c = runner.in_channels
    with torch.no_grad():
        fp = model_call(m, runner, inputs)[:, :c].double()
    layers = {n: space.candidates[row[i - lo]] if lo <= i < hi else env.config
              for i, leaf in enumerate(space.leaves) for n in leaf.layer_names}
    layers.update({leaf.name: cfg for leaf, cfg in space.fixed})
    convert(m, QuantPlan(layers))
    node = {n for leaf in space.leaves[lo:hi] for n in leaf.layer_names}
    for name, q in quant_layers(m).items():
        q.set_noise_scale(1.0 if name in node else env.lam)
    with torch.no_grad():
        out = model_call(m, runner, inputs)[:, :c].double()
    return float(((out - fp) ** 2).mean())


@pytest.mark.parametrize("name,lam,tied", [("dit", 1.0, True), ("pixart", 0.5, False), ("pixart", 1.0, True),
                                          ("pixart-extra", 1.0, False)])
def test_evaluate_matches_brute_force(name, lam, tied):
    model = perturbed(MODELS[name]())
    runner = DiffusersRunner(model)
    inputs, _ = example(runner, n=5, seed=3)
    space = SearchSpace.build(model, inputs, forward=lambda *xs: run_segments(runner, xs),
                              tie=runner.tie if tied else None)
    env = Environment(LayerConfig(4, 4), lam)
    pristine = copy.deepcopy(model)
    # candidates stacked 3 per forward (groups of 3 and 1); one chunk: a different chunking changes the matmuls'
    # float rounding, which can flip a code at a rounding boundary (seen: 7e-4 on one score, batch 2 against 5)
    ev = Evaluator(model, runner, space, inputs, env, batch=5, group=3)
    rng = np.random.default_rng(len(name))
    c = len(space.candidates)
    for lo, hi in ((0, 2), (5, 8), (len(space.leaves) - 3, len(space.leaves))):
        rows = rng.integers(0, c, (4, hi - lo))
        got = ev.evaluate(lo, hi, rows)
        want = [brute_mse(pristine, runner, inputs, space, env, lo, hi, r) for r in rows]
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-12)
    assert (got > 0).all()


def test_inputs_are_checked():
    dit, pix, extra = (DiffusersRunner(m()) for m in (tiny_dit, tiny_pixart, pixart_extra))
    x = torch.zeros(2, 4, 8, 8)
    inputs = dit.inputs(x, torch.tensor(7), torch.tensor([1, 2]))
    assert inputs[1].tolist() == [7, 7]                                   # a scalar timestep, broadcast
    assert pix.inputs(x, 5, encoder_hidden_states=torch.zeros(2, 3, 24))[3].tolist() == [[1] * 3] * 2   # no mask
    with pytest.raises(ValueError, match="class_labels"):
        dit.inputs(x, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"timestep must be"):
        dit.inputs(x, torch.tensor([1, 2, 3]), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="self-attention mask"):
        pix.inputs(x, 5, encoder_hidden_states=torch.zeros(2, 3, 24), attention_mask=torch.ones(2, 16))
    with pytest.raises(ValueError, match="keep-mask"):
        pix.inputs(x, 5, encoder_hidden_states=torch.zeros(2, 3, 24), encoder_attention_mask=torch.zeros(2, 1, 3))
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        pix.inputs(x, 5)
    with pytest.raises(ValueError, match="additional conditions"):
        extra.inputs(x, 5, encoder_hidden_states=torch.zeros(2, 3, 24))
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        dit.inputs(torch.zeros(2, 16), 5, torch.tensor([1, 2]))
    with pytest.raises(TypeError, match="DiffusersRunner cuts"):
        DiffusersRunner(torch.nn.Linear(2, 2))


def test_capture_from_a_pipeline(tmp_path):
    pipe = tiny_dit_pipeline()
    runner = DiffusersRunner(pipe.transformer)
    with capture_calls(runner) as calls:
        pipe(class_labels=[0, 1, 2], num_inference_steps=6, guidance_scale=1.5, generator=torch.manual_seed(0),
             output_type="np")
        pipe(class_labels=[3], num_inference_steps=6, guidance_scale=1.5, generator=torch.manual_seed(1),
             output_type="np")
    assert len(calls.calls) == 12 and not pipe.transformer._forward_pre_hooks   # the hook is gone
    x, t, y = calls.inputs()
    assert x.shape == (36 + 12, 4, 8, 8)
    assert y[:6].tolist() == [0, 1, 2, 1000, 1000, 1000]                        # [cond; uncond (null class)]
    sub = calls.inputs(timesteps=3)
    steps = sorted(set(calls.timesteps), reverse=True)                          # 6 distinct, in sampling order
    assert sorted(set(sub[1].tolist()), reverse=True) == [steps[0], steps[2], steps[5]]
    assert sub[0].shape[0] == 3 * (6 + 2)                                       # both runs at each kept step
    with pytest.raises(ValueError, match="timesteps must be"):
        calls.inputs(timesteps=7)
    # the captured inputs are the transformer's: the runner reproduces the pipeline's calls
    with torch.no_grad():
        assert torch.equal(runner.forward(*sub), pipe.transformer(*sub).sample)

    path = str(tmp_path / "calib.safetensors")
    save_inputs(path, runner, sub)
    back = load_inputs(path, runner)
    assert all(torch.equal(a, b) for a, b in zip(back, sub))
    with pytest.raises(ValueError, match="'dit' transformer"):
        load_inputs(path, DiffusersRunner(tiny_pixart()))


def test_capture_rejects_what_the_search_cannot_run():
    runner = DiffusersRunner(tiny_pixart())
    x = torch.zeros(2, 4, 8, 8)
    with capture_calls(runner) as calls, pytest.raises(ValueError, match="mixes timesteps"):
        runner.model(x, torch.zeros(2, 3, 24), torch.tensor([1, 2]),
                     added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    assert not calls.calls and not runner.model._forward_pre_hooks
    with pytest.raises(ValueError, match="no transformer calls"):
        calls.inputs()


def test_search_then_quantize(tmp_path):
    from treeq_engine.runtime import quantize

    model = perturbed(tiny_pixart())
    fp = copy.deepcopy(model)
    runner = DiffusersRunner(model)
    inputs, _ = example(runner, n=6, seed=5)
    out = search(model, runner, inputs, SearchConfig(Budget.parse("W4A8"), keep=3, batch=6, group=9,
                                                     baselines=("uniform",)),
                 out_dir=tmp_path, progress=False, model_name="tiny-pixart")
    plan = out.plan
    assert out.report["model"] == "tiny-pixart" and out.report["leaves"] == 14       # q/k/v and k/v tied
    assert len({plan.layers[f"transformer_blocks.1.attn1.to_{x}"] for x in "qkv"}) == 1
    assert (tmp_path / "plan.json").exists() and (tmp_path / "pareto.png").exists()
    assert out.report["tss"]["mse"] <= out.report["baselines"]["uniform"]["mse"]
    assert sum(c.w_bits != 8 for c in plan.layers.values()) >= 10     # the budget is spent, not all W8
    ref_model = copy.deepcopy(fp)
    quantize(fp, plan)                     # the searched plan packs the FP transformer (fused blocks included)
    from treeq_engine.runtime.linear import TreeQLinear

    assert sum(isinstance(m, TreeQLinear) for m in fp.modules()) == len(plan.layers)
    with torch.no_grad():
        x, enc, t, mask = example(runner, n=2, seed=9)[0]
        q = fp(x, enc, t, added_cond_kwargs={"resolution": None, "aspect_ratio": None},
               encoder_attention_mask=mask).sample
        ref = DiffusersRunner(ref_model).forward(x, enc, t, mask)
    rel = float((q - ref).norm() / ref.norm())
    assert torch.isfinite(q).all() and 0 < rel < 0.2, rel


def test_command_line_capture_search_quantize(tmp_path, capsys):
    """`treeq capture` -> `treeq search --diffusers` -> `treeq quantize --diffusers`, and the artifact loads into a
    rebuilt transformer that computes what the quantized one computes."""
    from treeq_engine.cli import main
    from treeq_engine.models.diffusers_transformers import rebuild
    from treeq_engine.plan import QuantPlan
    from treeq_engine.runtime import artifact, quantize

    pipe_dir = tmp_path / "pipe"
    tiny_dit_pipeline().save_pretrained(pipe_dir)
    calib = str(tmp_path / "calib.safetensors")
    assert main(["capture", "--pipeline", str(pipe_dir), "--labels", "0,1,2,3,4", "--batch", "3", "--steps", "5",
                 "--timesteps", "2", "--cfg", "1.5", "--device", "cpu", "--out", calib]) == 0
    assert "kept 20 samples at 2 timesteps" in capsys.readouterr().out   # 2 runs x 2 steps x (cond + uncond)
    from treeq_engine.search.diffusers_runner import load_weights

    assert len(load_weights(calib, DiffusersRunner(tiny_dit_pipeline().transformer))) == 5   # the whole schedule

    out = tmp_path / "search"
    assert main(["search", "--diffusers", str(pipe_dir), "--calib-inputs", calib, "--budget", "W4A8", "--keep", "2",
                 "--device", "cpu", "--no-progress", "--out", str(out)]) == 0
    plan = QuantPlan.load(out / "plan.json")
    assert len(plan.layers) == 20 and "transformer_blocks.1.ff.net.2" in plan.layers   # 14 searched, 6 fixed
    import json

    report = json.loads((out / "report.json").read_text())
    assert report["leaves"] == 10                                            # to_q/k/v tied: 5 per block
    assert report["weighted"]       # the default metric: the DDIM scheduler's c(t)², stored by the capture
    assert main(["search", "--diffusers", str(pipe_dir), "--calib-inputs", calib, "--budget", "W4A8",
                 "--check", str(out / "plan.json")]) == 0
    untied = tmp_path / "untied"
    assert main(["search", "--diffusers", str(pipe_dir), "--calib-inputs", calib, "--budget", "W4A8", "--keep", "2",
                 "--untie", "--no-progress", "--out", str(untied)]) == 0
    assert json.loads((untied / "report.json").read_text())["leaves"] == 14

    art = tmp_path / "art"
    assert main(["quantize", "--diffusers", str(pipe_dir), "--plan", str(out / "plan.json"), "--out", str(art)]) == 0
    man = artifact.read_manifest(art)
    loaded = artifact.load(art, rebuild(man["model_config"]))
    direct = diffusers.DiTTransformer2DModel.from_pretrained(pipe_dir / "transformer").eval()
    quantize(direct, plan)
    x, t, y = DiffusersRunner(direct).inputs(torch.randn(2, 4, 8, 8), torch.tensor([3, 900]), torch.tensor([1, 7]))
    with torch.no_grad():
        assert torch.equal(loaded(x, t, y).sample, direct(x, t, y).sample)

    # samples from the pipeline, FP and with the artifact's transformer (same seed: different but close)
    from PIL import Image

    compiled = ["--artifact", str(art), "--compile", "default", "--compile-backend", "aot_eager"]
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    for name, extra in (("fp", []), ("q", ["--artifact", str(art)]), ("qc", compiled)):
        assert main(["sample", "--pipeline", str(pipe_dir), *extra, "--labels", "1,2,3", "--steps", "3",
                     "--device", "cpu", "--out", str(tmp_path / f"{name}.png")]) == 0
    fp_img, q_img, qc_img = (np.asarray(Image.open(tmp_path / f"{n}.png"), dtype=np.float64) for n in ("fp", "q", "qc"))
    assert fp_img.shape == q_img.shape == (16, 48, 3) and 0 < np.abs(fp_img - q_img).mean() < 64
    assert np.abs(q_img - qc_img).max() <= 1   # (the pipeline's transformer compiled in place: the same samples)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1   # (and compiled it was)
    torch._dynamo.reset()
    refused("class indices", ["sample", "--pipeline", str(pipe_dir), "--labels", "1000", "--device", "cpu"])
    refused("positive number of steps", ["sample", "--pipeline", str(pipe_dir), "--steps", "0", "--device", "cpu"])
    refused("not --prompts", ["sample", "--pipeline", str(pipe_dir), "--prompts", "p.txt", "--device", "cpu"])
    refused("own scheduler", ["sample", "--pipeline", str(pipe_dir), "--sampler", "ddim", "--device", "cpu"])
    refused("needs --device cuda",   # (tests/test_graphed_diffusers.py)
            ["sample", "--pipeline", str(pipe_dir), "--graph", "--device", "cpu"])
    # inputs without sampler weights: the default metric says so and takes the plain MSE, an explicit one refuses
    plain = str(tmp_path / "plain.safetensors")
    runner = DiffusersRunner(direct)
    save_inputs(plain, runner, load_inputs(calib, runner))
    assert main(["search", "--diffusers", str(pipe_dir), "--calib-inputs", plain, "--budget", "W4A8",
                 "--metric", "sampler"]) == 2
    assert "holds no sampler weights" in capsys.readouterr().err
    assert main(["search", "--diffusers", str(pipe_dir), "--calib-inputs", plain, "--budget", "W4A8", "--keep", "2",
                 "--no-progress", "--out", str(tmp_path / "plain")]) == 0
    assert "the metric is the plain MSE of the prediction" in capsys.readouterr().err
    assert not json.loads((tmp_path / "plain" / "report.json").read_text())["weighted"]
    assert main(["search", "--diffusers", str(pipe_dir), "--calib-inputs", plain, "--budget", "W4A8",
                 "--metric", "sampler", "--check", str(out / "plan.json")]) == 0   # a plan check scores nothing
    # the pipeline's scheduler swapped after the capture: the weights are still the DDIM ones, and it says so
    index = pipe_dir / "model_index.json"
    meta = json.loads(index.read_text())
    index.write_text(json.dumps({**meta, "scheduler": ["diffusers", "EulerDiscreteScheduler"]}))
    assert main(["search", "--diffusers", str(pipe_dir), "--calib-inputs", calib, "--budget", "W4A8", "--keep", "2",
                 "--no-progress", "--out", str(tmp_path / "swapped")]) == 0
    assert "are DDIMScheduler 5 steps's, and the pipeline's scheduler differs (DDIMScheduler became " \
           "EulerDiscreteScheduler)" in capsys.readouterr().err
    index.write_text(json.dumps(meta))
    # same class, another setting: named too; the unchanged pipeline gives no note
    sched_file = pipe_dir / "scheduler" / "scheduler_config.json"
    settings = json.loads(sched_file.read_text())
    sched_file.write_text(json.dumps({**settings, "timestep_spacing": "trailing"}))
    assert main(["search", "--diffusers", str(pipe_dir), "--calib-inputs", calib, "--budget", "W4A8", "--keep", "2",
                 "--no-progress", "--out", str(tmp_path / "respaced")]) == 0
    assert "DDIMScheduler settings changed: timestep_spacing 'leading' -> 'trailing'" in capsys.readouterr().err
    sched_file.write_text(json.dumps(settings))
    assert main(["search", "--diffusers", str(pipe_dir), "--calib-inputs", calib, "--budget", "W4A8", "--keep", "2",
                 "--no-progress", "--out", str(tmp_path / "same")]) == 0
    assert "differs" not in capsys.readouterr().err
    assert main(["search", "--diffusers", str(pipe_dir), "--calib-inputs", calib, "--budget", "W4A8",
                 "--calib-trajectories", "4"]) == 2
    assert "--calib-trajectories: our DiT's calibration sampler" in capsys.readouterr().err
    refused("not a pipeline directory", ["sample", "--pipeline", str(pipe_dir / "transformer"), "--device", "cpu"])

    # what the command line refuses, and how it says so
    assert main(["search", "--diffusers", str(pipe_dir), "--budget", "W4A8", "--out", str(out)]) == 2
    assert "--calib-inputs" in capsys.readouterr().err
    assert main(["search", "--diffusers", str(tmp_path), "--calib-inputs", calib, "--budget", "W4A8"]) == 2
    assert "no diffusers transformer here" in capsys.readouterr().err
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\n")
    assert main(["capture", "--pipeline", str(pipe_dir), "--prompts", str(prompts), "--out", calib]) == 2
    assert "takes --labels" in capsys.readouterr().err


class WholeForward(torch.nn.Module):
    """The transformer behind a module the stage walk does not know: calibrated as one stage (its whole forward)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, *inputs):
        return DiffusersRunner(self.inner).forward(*inputs)


def test_ptq_walks_the_diffusers_cut_and_packs():
    """`calib.ptq.calibrate` on a PixArt: walking its segments from cached stage inputs gives exactly what re-running
    the whole model for every layer gives; the calibrated Monarch model beats round-to-nearest; `quantize` packs it
    and computes what the fake-quant model computes."""
    from treeq_engine.plan import BranchConfig
    from treeq_engine.calib.ptq import PTQConfig, calibrate
    from treeq_engine.runtime import quantize

    model = perturbed(tiny_pixart())
    runner = DiffusersRunner(model)
    # captions unpadded: the staged walk leaves padding out of its statistics, which the whole forward cannot
    # (test_ptq_statistics_leave_out_padded_captions)
    batches = [b[:3] + (torch.ones_like(b[3]),) + b[4:] for b in (example(runner, n=3, seed=s)[0] for s in (11, 12))]
    base = QuantPlan.block_uniform(model, 4, 4)
    plan = QuantPlan({n: c.replace(branch=BranchConfig("monarch", 4)) if ".transformer_blocks." in f".{n}" else c
                      for n, c in base.layers.items()})
    cfg = PTQConfig(max_tokens=64, rounds=1, w_clip_grid=(1.0, 0.8), a_clip_grid=(1.0, 0.9))
    staged = copy.deepcopy(model)
    calibrated = calibrate(staged, plan, batches, cfg, progress=False)
    whole = WholeForward(copy.deepcopy(model))
    calibrate(whole, QuantPlan({f"inner.{n}": c for n, c in plan.layers.items()}), batches, cfg, progress=False)
    for n in plan.layers:
        a, b = staged.get_submodule(n), whole.get_submodule(f"inner.{n}")
        assert torch.equal(a.w_codes, b.w_codes) and torch.equal(a.w_scale, b.w_scale), n
        assert a.config == b.config

    rtn = copy.deepcopy(model)
    convert(rtn, base)
    x = batches[0]
    with torch.no_grad():
        fp = runner.forward(*x)
        err_rtn = float(((DiffusersRunner(rtn).forward(*x) - fp) ** 2).mean())
        fake = DiffusersRunner(staged).forward(*x)
        err_ptq = float(((fake - fp) ** 2).mean())
        assert err_ptq < 0.8 * err_rtn, (err_ptq, err_rtn)       # measured: 0.61×
        quantize(staged, calibrated, dtype=torch.float32)
        packed = DiffusersRunner(staged).forward(*x)
    # the packed integer GEMM and the simulation's float matmul differ by an ulp here and there, which can flip a
    # later quantizer's rounding (measured: no flip and 6e-7 on one CPU; on another 1.5 % of the outputs moved,
    # by at most 6e-3 of ~2), so: almost all equal, the rest moved a little
    diff = (packed - fake).abs()
    assert float((diff > 1e-3).float().mean()) < 0.03 and float(diff.max()) < 0.02 * float(fake.abs().max())
    # SmoothQuant folds into PixArt's to_out.0 only (test_smoothing_folds_into_diffusers_blocks); a plan that
    # quantizes no activation there gives it nothing to do, which is an error rather than a silent no-op
    with pytest.raises(ValueError, match="SmoothQuant"):
        calibrate(copy.deepcopy(model), QuantPlan.block_uniform(model, 4, 16), batches,
                  PTQConfig(smooth_alphas=(0.5,)), progress=False)


def captured_dit_pipeline(tmp_path):
    """A tiny DiT pipeline saved under ``tmp_path`` and `treeq capture`'s inputs of it: (pipeline dir, calibration
    file, the `--diffusers ... --calib-inputs ... --calib-batch 4` arguments)."""
    from treeq_engine.cli import main

    pipe_dir = tmp_path / "pipe"
    tiny_dit_pipeline().save_pretrained(pipe_dir)
    calib = str(tmp_path / "calib.safetensors")
    assert main(["capture", "--pipeline", str(pipe_dir), "--labels", "0,1,2", "--steps", "4", "--timesteps", "2",
                 "--device", "cpu", "--out", calib]) == 0
    return pipe_dir, calib, ["--diffusers", str(pipe_dir), "--calib-inputs", calib, "--calib-batch", "4"]


def test_command_line_ptq_peft_quantize(tmp_path, capsys):
    """`treeq ptq` / `peft` / `quantize --ptq --peft` with `--diffusers PATH --calib-inputs FILE`: the artifact
    computes what the calibrated (SmoothQuant folded in), fine-tuned fake-quant transformer computes."""
    from treeq_engine.calib.peft import load_finetuned
    from treeq_engine.calib.ptq import load_calibration
    from treeq_engine.cli import main
    from treeq_engine.models.diffusers_transformers import rebuild
    from treeq_engine.runtime import artifact

    pipe_dir, calib, src = captured_dit_pipeline(tmp_path)
    ptq, peft = str(tmp_path / "ptq"), str(tmp_path / "peft")
    assert main(["ptq", *src, "--bits", "W4A4", "--branch", "monarch", "--branch-params", "4", "--max-tokens", "64",
                 "--rounds", "1", "--smooth-alphas", "0.5", "0.75", "--out", ptq]) == 0
    assert "calibrated 20 layers" in capsys.readouterr().out
    import json

    assert len(json.loads((tmp_path / "ptq" / "ptq.json").read_text())["smooth"]) == 6   # 3 sites × 2 blocks
    assert main(["peft", *src, "--ptq", ptq, "--steps", "4", "--lr-branch", "0.05", "--checkpoint-every", "2",
                 "--out", peft]) == 0
    assert "for 4 steps" in capsys.readouterr().out
    art = tmp_path / "art"
    assert main(["quantize", "--diffusers", str(pipe_dir), "--ptq", ptq, "--peft", peft, "--out", str(art)]) == 0

    direct = diffusers.DiTTransformer2DModel.from_pretrained(pipe_dir / "transformer").eval()
    load_calibration(direct, ptq)
    load_finetuned(direct, peft)
    loaded = artifact.load(art, rebuild(artifact.read_manifest(art)["model_config"]))
    x, t, y = DiffusersRunner(direct).inputs(torch.randn(2, 4, 8, 8), torch.tensor([3, 900]), torch.tensor([1, 7]))
    ptq_only = diffusers.DiTTransformer2DModel.from_pretrained(pipe_dir / "transformer").eval()
    load_calibration(ptq_only, ptq)
    with torch.no_grad():
        want, before = direct(x, t, y).sample, ptq_only(x, t, y).sample
        got = loaded(x, t, y).sample.float()
    rel = float((got - want).norm() / want.norm())
    assert rel < 2e-2                                            # the artifact runs bf16 (quantize's default dtype)
    assert float((before - want).norm() / want.norm()) > 3 * rel  # PEFT moved it 0.12: the artifact kept that

    from treeq_engine.calib.store import CheckpointError

    with pytest.raises(CheckpointError, match="calibrated from another model"):
        load_calibration(perturbed(diffusers.DiTTransformer2DModel.from_pretrained(pipe_dir / "transformer"), 9), ptq)
    # sampler-weighted distillation: the capture stored the DDIM scheduler's c(t)²; inputs without them refuse it
    assert main(["peft", *src, "--ptq", ptq, "--steps", "2", "--lr-branch", "0.05", "--loss-weights", "sampler",
                 "--out", str(tmp_path / "p2")]) == 0
    import json

    assert json.loads((tmp_path / "p2" / "peft.json").read_text())["config"]["loss_weights"] == "sampler"
    assert "differs" not in capsys.readouterr().err
    sched_file = pipe_dir / "scheduler" / "scheduler_config.json"   # the scheduler changed since the capture
    sched_file.write_text(json.dumps({**json.loads(sched_file.read_text()), "steps_offset": 1}))
    assert main(["peft", *src, "--ptq", ptq, "--steps", "1", "--loss-weights", "sampler",
                 "--out", str(tmp_path / "p2b")]) == 0
    assert "treeq peft: note: the sampler weights in" in capsys.readouterr().err
    runner = DiffusersRunner(direct)
    plain = str(tmp_path / "plain.safetensors")
    save_inputs(plain, runner, load_inputs(calib, runner))
    refused("holds no sampler weights",
            ["peft", "--diffusers", str(pipe_dir), "--calib-inputs", plain, "--ptq", ptq, "--loss-weights",
             "sampler", "--out", str(tmp_path / "p3")])
    refused("--calib-inputs", ["ptq", "--diffusers", str(pipe_dir), "--out", str(tmp_path / "p4")])


def test_review_cases(tmp_path, capsys, monkeypatch):
    """What a first review found: hub checkpoints that name the generic Transformer2DModel, PixArt's unset
    use_additional_conditions, half-precision captures feeding a float32 search, float timesteps kept exact under
    --dtype bfloat16, and clear errors for bad labels, junk files and wrong shapes."""
    import json

    import treeq_engine.search.cli as search_cli
    from treeq_engine.cli import main
    from treeq_engine.search.diffusers_runner import select_timesteps

    # PixArt decides use_additional_conditions from sample_size when the config leaves it unset
    torch.manual_seed(0)
    px = diffusers.PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=24, in_channels=4,
                                            out_channels=8, num_layers=1, sample_size=128, patch_size=2,
                                            cross_attention_dim=48, caption_channels=24, norm_type="ada_norm_single")
    assert px.config.use_additional_conditions is None and DiffusersRunner(px).extra_conditions

    # a hub-style checkpoint: the generic class name, remapped by norm_type
    pipe_dir = tmp_path / "pipe"
    tiny_dit_pipeline().save_pretrained(pipe_dir)
    for f, edit in (("transformer/config.json", lambda d: d.update(_class_name="Transformer2DModel")),
                    ("model_index.json", lambda d: d.update(transformer=["diffusers", "Transformer2DModel"]))):
        doc = json.loads((pipe_dir / f).read_text())
        edit(doc)
        (pipe_dir / f).write_text(json.dumps(doc))
    calib = str(tmp_path / "calib.safetensors")
    assert main(["capture", "--pipeline", str(pipe_dir), "--labels", "0,1", "--steps", "4", "--timesteps", "2",
                 "--device", "cpu", "--dtype", "bfloat16", "--out", calib]) == 0
    assert "4 transformer calls, kept 8 samples at 2 timesteps" in capsys.readouterr().out   # 2 of 4 steps x 4
    runner = DiffusersRunner(diffusers.DiTTransformer2DModel.from_pretrained(pipe_dir / "transformer"))
    x, t, y = load_inputs(calib, runner)
    assert x.dtype == torch.float32 and t.dtype == torch.int64                # a bf16 capture, read at fp32
    out = tmp_path / "search"
    assert main(["search", "--diffusers", str(pipe_dir), "--calib-inputs", calib, "--budget", "W4A8", "--keep", "2",
                 "--no-progress", "--out", str(out)]) == 0
    assert main(["quantize", "--diffusers", str(pipe_dir), "--uniform", "W4A8", "--out", str(tmp_path / "a")]) == 0

    # float timesteps (Euler-type schedulers) are not rounded to the search dtype
    ft = str(tmp_path / "float_t.safetensors")
    save_inputs(ft, runner, (x, torch.full((8,), 667.3), y))
    seen = {}

    def stop(model, runner, inputs, *a, **k):
        seen["t"] = inputs[1]
        raise ValueError("stop")

    monkeypatch.setattr(search_cli, "search", stop)
    assert main(["search", "--diffusers", str(pipe_dir), "--calib-inputs", ft, "--budget", "W4A8",
                 "--dtype", "bfloat16", "--no-progress"]) == 2
    assert seen["t"].dtype == torch.float32 and float(seen["t"][0]) == pytest.approx(667.3, abs=1e-4)
    monkeypatch.undo()
    capsys.readouterr()

    # clear errors
    assert main(["capture", "--pipeline", str(pipe_dir), "--labels", "0,1000", "--out", calib]) == 2
    assert "class labels must be in [0, 999]" in capsys.readouterr().err
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a tensor file")
    assert main(["search", "--diffusers", str(pipe_dir), "--calib-inputs", str(junk), "--budget", "W4A8"]) == 2
    assert "not a readable safetensors file" in capsys.readouterr().err
    wrong = str(tmp_path / "wrong.safetensors")
    save_inputs(wrong, runner, (torch.zeros(2, 3, 8, 8), torch.zeros(2, dtype=torch.long), y[:2]))
    assert main(["search", "--diffusers", str(pipe_dir), "--calib-inputs", wrong, "--budget", "W4A8"]) == 2
    assert "hidden_states must be (N, 4, H, W)" in capsys.readouterr().err
    assert main(["search", "--diffusers", str(pipe_dir), "--calib-inputs", calib, "--budget", "W4A8",
                 "--model", "x.pt"]) == 2
    assert "--model" in capsys.readouterr().err
    with pytest.raises(ValueError, match="class labels must be in"):
        runner.inputs(x[:1], 5, torch.tensor([1001]))
    assert select_timesteps(torch.tensor([999, 749, 499, 249, 0]), 3) == [999.0, 499.0, 0.0]


def test_our_dit_converted_to_diffusers_searches_alike(tmp_path):
    """`dit_to_diffusers` keeps the function (our DiT and its diffusers copy agree to float rounding), and TSS
    through DiffusersRunner (to_q/k/v tied) returns the plan TSS through DiTRunner returns, with the same score."""
    from treeq_engine.models import DiT, DiTConfig
    from treeq_engine.models.diffusers_transformers import dit_to_diffusers
    from treeq_engine.search import DiTRunner

    ours = perturbed(DiT(DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2,
                                   num_classes=10)).eval(), seed=4)
    theirs = dit_to_diffusers(ours)
    g = torch.Generator().manual_seed(2)
    inputs = (torch.randn(6, 4, 8, 8, generator=g), torch.tensor([0, 3, 99, 400, 871, 999]),
              torch.tensor([0, 1, 5, 9, 10, 3]))    # 10: the null class
    with torch.no_grad():
        torch.testing.assert_close(theirs(*inputs).sample, ours(*inputs), rtol=1e-5, atol=1e-6)
    cfg = SearchConfig(Budget.parse("W4A4"), keep=3, batch=6)
    a = search(ours, DiTRunner(ours, output_fn=lambda o: o[:, :4]), inputs, cfg, progress=False)
    b = search(theirs, DiffusersRunner(theirs), inputs, cfg, progress=False)
    pick = lambda plan, prefix: [c.label for n, c in plan.layers.items()  # noqa: E731
                                 if n.startswith(prefix) and ".emb." not in n
                                 and not n.endswith(("attn1.to_k", "attn1.to_v"))]
    assert len(pick(a.plan, "blocks.")) == 10
    assert pick(a.plan, "blocks.") == pick(b.plan, "transformer_blocks.")
    assert b.report["tss"]["search_mse"] == pytest.approx(a.report["tss"]["search_mse"], rel=1e-5)
    assert b.report["tss"]["evaluations"] == a.report["tss"]["evaluations"]


def test_second_review_cases(tmp_path):
    """A calibration file's digest ignores its header's order; dit_to_diffusers takes a DiT trained without label
    dropout; a DiT's latents must be square; PixArt without a caption projection takes captions at the
    cross-attention width; a 0-dim tensor in a calibration file is a clear error."""
    from safetensors.torch import save_file

    from treeq_engine.models import DiT, DiTConfig
    from treeq_engine.models.diffusers_transformers import dit_to_diffusers
    from treeq_engine.search.diffusers_runner import inputs_digest

    tensors = {"hidden_states": torch.randn(2, 4, 8, 8), "timestep": torch.tensor([1, 2]),
               "class_labels": torch.tensor([3, 4])}
    a, b, c = (str(tmp_path / f"{n}.safetensors") for n in "abc")
    save_file(tensors, a, metadata={"schema": "treeq-diffusers-calibration", "arch": "dit"})
    save_file(dict(reversed(list(tensors.items()))), b, metadata={"arch": "dit", "schema": "treeq-diffusers-calibration"})
    save_file({**tensors, "timestep": torch.tensor([1, 3])}, c, metadata={"schema": "treeq-diffusers-calibration",
                                                                          "arch": "dit"})
    assert inputs_digest(a) == inputs_digest(b) != inputs_digest(c)

    ours = perturbed(DiT(DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2,
                                   num_classes=10, class_dropout_prob=0.0)).eval())
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([5, 50, 500]), torch.tensor([0, 4, 9])
    with torch.no_grad():
        torch.testing.assert_close(dit_to_diffusers(ours)(x, t, y).sample, ours(x, t, y), rtol=1e-5, atol=1e-6)

    dit = DiffusersRunner(tiny_dit())
    with pytest.raises(ValueError, match="must be square"):
        dit.inputs(torch.zeros(2, 4, 8, 12), 5, torch.tensor([1, 2]))
    torch.manual_seed(0)
    bare = DiffusersRunner(diffusers.PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=1, sample_size=8,
        patch_size=2, cross_attention_dim=48, caption_channels=None, norm_type="ada_norm_single",
        use_additional_conditions=False).eval())
    assert len(bare.inputs(torch.zeros(2, 4, 8, 8), 5, encoder_hidden_states=torch.zeros(2, 3, 48))) == 4
    zero = str(tmp_path / "zero.safetensors")
    save_file({**tensors, "hidden_states": torch.tensor(1.0)}, zero,
              metadata={"schema": "treeq-diffusers-calibration", "arch": "dit"})
    with pytest.raises(ValueError, match="non-empty sample dim"):
        load_inputs(zero, dit)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["dit", "pixart"])
def test_search_on_gpu_matches_cpu(name):
    """The diffusers runner on CUDA: segments compose to the model exactly, and float32 candidate scores agree
    with the CPU's (different GEMM kernels: a code can flip at a rounding boundary, so a loose bound)."""
    model = perturbed(MODELS[name]())
    runner = DiffusersRunner(model)
    inputs, _ = example(runner, n=5, seed=3)
    space = SearchSpace.build(model, inputs, forward=lambda *xs: run_segments(runner, xs), tie=runner.tie)
    env = Environment(LayerConfig(4, 4), 1.0)
    gpu_model = copy.deepcopy(model).cuda()
    gpu_runner = DiffusersRunner(gpu_model)
    gpu_inputs = tuple(t.cuda() for t in inputs)
    with torch.no_grad():
        torch.testing.assert_close(gpu_runner.forward(*gpu_inputs), model_call(gpu_model, gpu_runner, gpu_inputs),
                                   rtol=0, atol=0)
    rows = np.random.default_rng(0).integers(0, len(space.candidates), (6, 3))
    cpu = Evaluator(model, runner, space, inputs, env, batch=5, group=3).evaluate(2, 5, rows)
    gpu = Evaluator(gpu_model, gpu_runner, space, gpu_inputs, env, batch=5, group=3).evaluate(2, 5, rows)
    np.testing.assert_allclose(gpu, cpu, rtol=2e-2)


def test_closed_loop_selection_through_the_pipeline(tmp_path, capsys):
    """`PipelineJudge`: the pipeline samples each plan with the judge's copy of the searched transformer; its FP
    reference is the pipeline's own output, full precision scores zero, the chosen plan has the lowest closed-loop
    MSE of those scored; and `treeq search --diffusers PIPELINE --select closed-loop-root` runs it."""
    import json

    from treeq_engine.cli import main
    from treeq_engine.search.closed_loop import ClosedLoopConfig, PipelineJudge

    pipe = tiny_dit_pipeline()
    pipe.set_progress_bar_config(disable=True)
    call = {"class_labels": [1, 2]}
    with torch.no_grad():
        own = pipe(**call, num_inference_steps=3, guidance_scale=1.5, generator=torch.Generator().manual_seed(0),
                   output_type="pt").images * 2 - 1
    runner = DiffusersRunner(pipe.transformer)
    with capture_calls(runner) as calls:
        pipe(class_labels=[0, 3], num_inference_steps=4, guidance_scale=1.5, generator=torch.manual_seed(5))
    source = PipelineJudge.describe("DiTPipeline", type(pipe.scheduler).__name__, call)
    closed = ClosedLoopConfig(samples=2, steps=3, cfg_scale=1.5, seed=0, max_plans=4, source=source)
    with pytest.raises(ValueError, match="ClosedLoopConfig.source must be"):
        PipelineJudge(pipe, call, pipe.transformer, ClosedLoopConfig(samples=2, steps=3))
    judges = []

    def make(model, cfg):
        judges.append(PipelineJudge(pipe, call, model, cfg))
        return judges[-1]

    out = search(pipe.transformer, runner, calls.inputs(), SearchConfig(Budget.parse("W4A8"), keep=2, batch=16,
                                                                          closed_loop=closed),
                 progress=False, judge_fn=make)
    judge = judges[0]
    torch.testing.assert_close(judge.reference, own.float(), rtol=0, atol=0)
    assert judge.score(QuantPlan({}))["closed_loop_mse"] == 0.0
    rows = out.report["closed_loop"]["plans"]
    assert len(rows) >= 2 and out.plan.meta["selected_by"] == "closed-loop"
    best = min(r["closed_loop_mse"] for r in rows)
    assert out.report["tss"]["closed_loop_mse"] == best > 0
    assert pipe.transformer is runner.model   # the searched transformer is back (converted: reload it to sample FP)

    pipe_dir = tmp_path / "pipe"
    tiny_dit_pipeline().save_pretrained(pipe_dir)
    calib = str(tmp_path / "calib.safetensors")
    assert main(["capture", "--pipeline", str(pipe_dir), "--labels", "0,1", "--steps", "4", "--timesteps", "2",
                 "--device", "cpu", "--out", calib]) == 0
    res = tmp_path / "cl"
    assert main(["search", "--diffusers", str(pipe_dir), "--calib-inputs", calib, "--budget", "W4A8", "--keep", "2",
                 "--select", "closed-loop-root", "--closed-loop-labels", "3,4", "--closed-loop-steps", "3",
                 "--no-progress", "--out", str(res)]) == 0
    report = json.loads((res / "report.json").read_text())
    meta = json.loads((res / "plan.json").read_text())["meta"]
    assert meta["selected_by"] == "closed-loop root" and report["tss"]["closed_loop_mse"] > 0
    # a resume with other labels must not reuse the scores: the labels are in the fingerprint
    other = main(["search", "--diffusers", str(pipe_dir), "--calib-inputs", calib, "--budget", "W4A8", "--keep",
                  "2", "--select", "closed-loop-root", "--closed-loop-labels", "5,6", "--closed-loop-steps", "3",
                  "--no-progress", "--out", str(res), "--resume"])
    assert other == 2 and "different search" in capsys.readouterr().err
    # bf16: the pipeline, its transformer and the judge's copy all at the search dtype
    assert main(["search", "--diffusers", str(pipe_dir), "--calib-inputs", calib, "--budget", "W4A8", "--keep", "2",
                 "--select", "closed-loop", "--closed-loop-labels", "3", "--closed-loop-steps", "2",
                 "--dtype", "bfloat16", "--no-progress", "--out", str(tmp_path / "bf16")]) == 0
    assert main(["search", "--diffusers", str(pipe_dir), "--calib-inputs", calib, "--budget", "W4A8",
                 "--closed-loop-labels", "3"]) == 2
    assert "are for --select closed-loop" in capsys.readouterr().err
    assert main(["search", "--diffusers", str(pipe_dir), "--calib-inputs", calib, "--budget", "W4A8",
                 "--select", "closed-loop", "--closed-loop-labels", "1,a"]) == 2
    assert "comma-separated integers" in capsys.readouterr().err
    assert main(["search", "--diffusers", str(pipe_dir / "transformer"), "--calib-inputs", calib, "--budget", "W4A8",
                 "--select", "closed-loop"]) == 2
    assert "pipeline directory" in capsys.readouterr().err
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    assert main(["search", "--diffusers", str(pipe_dir), "--calib-inputs", calib, "--budget", "W4A8",
                 "--select", "closed-loop", "--closed-loop-prompts", str(prompts)]) == 2
    assert "--closed-loop-labels, not prompts" in capsys.readouterr().err


def test_pixart_pipeline_end_to_end(tmp_path, capsys):
    """A real PixArt-alpha pipeline (tiny, offline) through every command: capture with prompts (captions and
    their masks), a tied search with closed-loop selection sampling latents through the pipeline, pack, sample."""
    import json

    from treeq_engine.cli import main
    from treeq_engine.search.closed_loop import ClosedLoopConfig, PipelineJudge

    pipe = tiny_pixart_pipeline()
    pipe.set_progress_bar_config(disable=True)
    call = {"prompt": ["a red cat", "the dog on the hill"]}
    source = PipelineJudge.describe(type(pipe).__name__, type(pipe.scheduler).__name__, call)
    judge = PipelineJudge(pipe, call, copy.deepcopy(pipe.transformer), ClosedLoopConfig(steps=2, cfg_scale=4.5,
                                                                                        source=source))
    with torch.no_grad():
        own = pipe(**call, num_inference_steps=2, guidance_scale=4.5, generator=torch.Generator().manual_seed(0),
                   output_type="latent").images
    torch.testing.assert_close(judge.reference, own.float(), rtol=0, atol=0)   # latents, not images

    pipe_dir = tmp_path / "pixart"
    pipe.save_pretrained(pipe_dir)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\nthe dog on the hill\na blue house\n")
    calib = str(tmp_path / "calib.safetensors")
    assert main(["capture", "--pipeline", str(pipe_dir), "--prompts", str(prompts), "--batch", "2", "--steps", "3",
                 "--timesteps", "2", "--device", "cpu", "--out", calib]) == 0
    assert "kept 12 samples at 2 timesteps" in capsys.readouterr().out       # 3 prompts x 2 steps x (cond, uncond)
    runner = DiffusersRunner(diffusers.PixArtTransformer2DModel.from_pretrained(pipe_dir / "transformer"))
    x, enc, t, mask = load_inputs(calib, runner)
    assert x.shape == (12, 4, 32, 32) and enc.shape == (12, 120, 24) and mask.shape == (12, 120)
    assert 0 < int(mask.sum()) < mask.numel()                                 # padded captions are masked

    out = tmp_path / "search"
    assert main(["search", "--diffusers", str(pipe_dir), "--calib-inputs", calib, "--budget", "W4A8", "--keep", "2",
                 "--batch", "12", "--select", "closed-loop", "--closed-loop-prompts", str(prompts),
                 "--closed-loop-steps", "2", "--cfg-scale", "4.5", "--no-progress", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["leaves"] == 14 and report["closed_loop"]["config"]["samples"] == 3
    assert report["tss"]["closed_loop_mse"] == min(r["closed_loop_mse"] for r in report["closed_loop"]["plans"])
    art = tmp_path / "art"
    assert main(["quantize", "--diffusers", str(pipe_dir), "--plan", str(out / "plan.json"), "--out", str(art)]) == 0
    assert main(["sample", "--pipeline", str(pipe_dir), "--artifact", str(art), "--prompts", str(prompts),
                 "--steps", "2", "--device", "cpu", "--out", str(tmp_path / "q.png")]) == 0
    from PIL import Image

    assert Image.open(tmp_path / "q.png").size == (3 * 256, 256)
    refused("not --labels", ["sample", "--pipeline", str(pipe_dir), "--labels", "1,2", "--device", "cpu"])
    # PTQ from the command line: without branches the q/k/v and cross-attention k/v groups are calibrated as one
    ptq = tmp_path / "ptq"
    assert main(["ptq", "--diffusers", str(pipe_dir), "--calib-inputs", calib, "--bits", "W4A8", "--branch", "none",
                 "--max-tokens", "256", "--rounds", "1", "--out", str(ptq)]) == 0
    state = json.loads((ptq / "ptq.json").read_text())
    assert len(state["joint"]) == 4                                   # 2 blocks x (attn1 q/k/v, attn2 k/v)
    clips = {state["layers"][f"transformer_blocks.0.attn1.to_{x}"]["a_clip"] for x in "qkv"}
    assert len(clips) == 1


def test_pixart_sigma_pipeline():
    """PixArt-Sigma's pipeline (no extra conditions, 300-token captions by default): its calls are captured, the
    runner reproduces them, and the closed-loop judge's reference is the pipeline's own latents."""
    from treeq_engine.search.closed_loop import ClosedLoopConfig, PipelineJudge

    pipe = tiny_pixart_pipeline("PixArtSigmaPipeline")
    pipe.set_progress_bar_config(disable=True)
    runner = DiffusersRunner(pipe.transformer)
    with capture_calls(runner) as calls:
        pipe(prompt=["a red cat"], num_inference_steps=3, guidance_scale=4.5, output_type="latent",
             generator=torch.Generator().manual_seed(1))
    x, enc, t, mask = calls.inputs()
    assert x.shape == (6, 4, 32, 32) and enc.shape == (6, 300, 24)
    with torch.no_grad():
        assert torch.equal(runner.forward(x, enc, t, mask), model_call(pipe.transformer, runner, (x, enc, t, mask)))
    call = {"prompt": ["the dog on the hill"]}
    cfg = ClosedLoopConfig(steps=2, cfg_scale=4.5,
                           source=PipelineJudge.describe("PixArtSigmaPipeline", type(pipe.scheduler).__name__, call))
    judge = PipelineJudge(pipe, call, copy.deepcopy(pipe.transformer), cfg)
    with torch.no_grad():
        own = pipe(**call, num_inference_steps=2, guidance_scale=4.5, generator=torch.Generator().manual_seed(0),
                   output_type="latent").images
    torch.testing.assert_close(judge.reference, own.float(), rtol=0, atol=0)


def test_tied_ptq_equals_our_qkv(tmp_path):
    """PTQ with ties: a branch-less to_q/to_k/to_v group is calibrated as one linear (one activation clip), so our
    DiT and its diffusers copy calibrate to the same codes, scales and clips, row for row."""
    import json

    from treeq_engine.calib.ptq import PTQConfig, calibrate
    from treeq_engine.models import DiT, DiTConfig
    from treeq_engine.models.diffusers_transformers import dit_to_diffusers

    torch.manual_seed(0)   # DiT's own initialisation draws from the global generator
    ours = perturbed(DiT(DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2,
                                   num_classes=10)).eval(), seed=6)
    theirs = dit_to_diffusers(ours)
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(4, 4, 8, 8, generator=g), torch.randint(0, 1000, (4,), generator=g),
                torch.randint(0, 11, (4,), generator=g)) for _ in range(2)]
    cfg = PTQConfig(max_tokens=10_000, rounds=2, w_clip_grid=(1.0, 0.8, 0.6),
                    a_clip_grid=(1.0, 0.95, 0.9, 0.85, 0.8, 0.7, 0.6))
    a = calibrate(ours, QuantPlan.block_uniform(ours, 4, 3), batches, cfg, progress=False)
    untied = calibrate(copy.deepcopy(theirs), QuantPlan.block_uniform(theirs, 4, 3), batches, cfg, progress=False)
    b = calibrate(theirs, QuantPlan.block_uniform(theirs, 4, 3), batches, cfg, progress=False,
                  tie=DiffusersRunner(theirs).tie)
    # apart, q, k and v pick their own clips here (measured: 0.85/0.9/0.9 in block 1)
    assert any(len({untied.layers[f"transformer_blocks.{i}.attn1.to_{x}"].a_clip for x in "qkv"}) > 1
               for i in range(2))
    for i in range(2):
        qkv = ours.get_submodule(f"blocks.{i}.attn.qkv")
        parts = [theirs.get_submodule(f"transformer_blocks.{i}.attn1.to_{x}") for x in "qkv"]
        assert {b.layers[f"transformer_blocks.{i}.attn1.to_{x}"].a_clip for x in "qkv"} == \
            {a.layers[f"blocks.{i}.attn.qkv"].a_clip}
        assert torch.equal(torch.cat([p.w_codes for p in parts]), qkv.w_codes)
        assert torch.equal(torch.cat([p.w_scale for p in parts]), qkv.w_scale)
        assert torch.equal(torch.cat([p.w_zero_point for p in parts]), qkv.w_zero_point)
        fc2 = theirs.get_submodule(f"transformer_blocks.{i}.ff.net.2")
        assert torch.equal(fc2.w_codes, ours.get_submodule(f"blocks.{i}.mlp.fc2").w_codes)   # downstream too

    # a resume must agree on the ties: a calibration with them is not continued without them
    from treeq_engine.calib.store import CheckpointError

    plan = QuantPlan.block_uniform(theirs, 4, 3)
    fresh = dit_to_diffusers(ours.__class__(ours.config).eval())
    calibrate(copy.deepcopy(fresh), plan, batches, cfg, progress=False, out_dir=tmp_path / "p",
              tie=DiffusersRunner(fresh).tie)
    state = json.loads((tmp_path / "p" / "ptq.json").read_text())
    assert len(state["joint"]) == 2 and state["layers"]["transformer_blocks.0.attn1.to_k"]["joint"][0].endswith("to_q")
    errs = [state["layers"][f"transformer_blocks.0.attn1.to_{x}"]["err"] for x in "qkv"]   # each its own rows'
    assert len(set(errs)) == 3 and all(0 < e < 1 for e in errs)
    with pytest.raises(CheckpointError, match="other tied layers"):
        calibrate(copy.deepcopy(fresh), plan, batches, cfg, progress=False, out_dir=tmp_path / "p")
    # a tie across blocks is refused before any work (nothing written to resume from)
    across = lambda n: "fc2" if n.endswith("ff.net.2") else None  # noqa: E731
    with pytest.raises(ValueError, match="must read one input"):
        calibrate(copy.deepcopy(fresh), plan, batches, cfg, progress=False, out_dir=tmp_path / "q", tie=across)
    assert not (tmp_path / "q" / "ptq.json").exists()


def test_tied_ptq_resumes_after_a_kill_inside_a_group(tmp_path, monkeypatch):
    """Killed after a tied group's first layer file is written but before the state records the group: the
    resumed calibration redoes the group and ends where an uninterrupted one does."""
    import treeq_engine.calib.ptq as ptq_mod
    from treeq_engine.calib.ptq import PTQConfig, calibrate

    model = perturbed(tiny_pixart())
    runner = DiffusersRunner(model)
    batches = [example(runner, n=3, seed=s)[0] for s in (21, 22)]
    plan = QuantPlan.block_uniform(model, 4, 4)
    cfg = PTQConfig(max_tokens=64, rounds=1, w_clip_grid=(1.0, 0.8), a_clip_grid=(1.0, 0.9))
    whole = copy.deepcopy(model)
    want = calibrate(whole, plan, batches, cfg, progress=False, tie=runner.tie)

    real = ptq_mod.write_tensors

    def killed(path, *a, **k):
        real(path, *a, **k)
        if path.name == "transformer_blocks.1.attn1.to_q.safetensors":
            raise KeyboardInterrupt   # to_k and to_v not written, the state not updated
    monkeypatch.setattr(ptq_mod, "write_tensors", killed)
    with pytest.raises(KeyboardInterrupt):
        calibrate(copy.deepcopy(model), plan, batches, cfg, progress=False, out_dir=tmp_path, tie=runner.tie)
    monkeypatch.setattr(ptq_mod, "write_tensors", real)
    resumed = copy.deepcopy(model)
    got = calibrate(resumed, plan, batches, cfg, progress=False, out_dir=tmp_path, tie=runner.tie)
    assert got.layers == want.layers
    for n in plan.layers:
        assert torch.equal(resumed.get_submodule(n).w_codes, whole.get_submodule(n).w_codes), n


@pytest.mark.parametrize("name", sorted(MODELS))
def test_smoothing_folds_into_diffusers_blocks(name):
    """Every SmoothQuant site of a diffusers block folds exactly: the transformer computes what it did, and each
    linear of the site reads ``x/s`` with weight ``W·diag(s)``; inputs no per-block weight produces are refused."""
    from treeq_engine.calib import smooth
    from treeq_engine.calib.capture import capture_inputs

    model = perturbed(MODELS[name]())
    runner = DiffusersRunner(model)
    inputs, _ = example(runner, n=3, seed=4)
    batches = [inputs]
    with torch.no_grad():
        ref = runner.forward(*inputs)
    blk = "transformer_blocks.1"
    sites = [f"{blk}.attn1.to_out.0"]
    if runner.arch == "dit":
        sites += [f"{blk}.attn1.to_q", f"{blk}.ff.net.0.proj"]
    else:
        sites += [f"{blk}.attn2.to_out.0"]
    g = torch.Generator().manual_seed(5)
    for key in sites:
        site = smooth.site_of(model, key)
        before = {c: (capture_inputs(model, c, batches, 10_000), model.get_submodule(c).weight.detach().clone())
                  for c in site.consumers}
        s = torch.rand(before[key][1].shape[1], generator=g) * 3 + 0.2
        smooth.fold(model, site.consumers[-1], s)   # any linear of the site names it
        with torch.no_grad():
            torch.testing.assert_close(runner.forward(*inputs), ref, rtol=1e-4, atol=1e-5)
        for c, (x, w) in before.items():
            torch.testing.assert_close(capture_inputs(model, c, batches, 10_000), x / s, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(model.get_submodule(c).weight.detach(), w * s)
    if runner.arch == "dit":
        assert smooth.site_of(model, f"{blk}.attn1.to_k").consumers == tuple(f"{blk}.attn1.to_{x}" for x in "qkv")
    else:   # adaLN-single: the shift and scale add a timestep embedding every block shares
        for leaf in ("attn1.to_q", "ff.net.0.proj"):
            with pytest.raises(ValueError, match="'ada_norm_single' norm"):
                smooth.fold(model, f"{blk}.{leaf}", torch.ones(48))
    with pytest.raises(ValueError, match="only"):
        smooth.fold(model, f"{blk}.ff.net.2", torch.ones(192))
    with pytest.raises(ValueError, match="positive and finite"):
        smooth.fold(model, f"{blk}.attn1.to_out.0", torch.ones(7))
    plan = QuantPlan.block_uniform(model, 4, 4)
    want = {f"transformer_blocks.{i}.{leaf}" for i in range(2)
            for leaf in (("attn1.to_q", "attn1.to_out.0", "ff.net.0.proj") if runner.arch == "dit"
                         else ("attn1.to_out.0", "attn2.to_out.0"))}
    assert set(smooth.targets(model, plan)) == want


def test_smoothed_tied_ptq_equals_our_dit(tmp_path):
    """PTQ with SmoothQuant on our DiT and on its diffusers copy (q/k/v tied): the same α per site, the same
    factors, the same calibrated codes; a CLI run folds, packs and reloads to what it calibrated."""
    import json

    from treeq_engine.calib.ptq import SMOOTH_FILE, PTQConfig, calibrate, load_calibration
    from treeq_engine.calib.store import read_tensors
    from treeq_engine.models import DiT, DiTConfig
    from treeq_engine.models.diffusers_transformers import dit_to_diffusers

    torch.manual_seed(0)
    ours = perturbed(DiT(DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2,
                                   num_classes=10)).eval(), seed=6)
    with torch.no_grad():   # outlier channels, so that smoothing pays somewhere
        for blk in ours.blocks:
            blk.adaLN_modulation[1].bias[32 + 3] += 4.0   # scale_msa of channel 3
            blk.adaLN_modulation[1].bias[4 * 32 + 5] += 4.0   # scale_mlp of channel 5
    theirs = dit_to_diffusers(ours)
    fp_theirs = copy.deepcopy(theirs)
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(4, 4, 8, 8, generator=g), torch.randint(0, 1000, (4,), generator=g),
                torch.randint(0, 11, (4,), generator=g)) for _ in range(2)]
    cfg = PTQConfig(max_tokens=10_000, rounds=1, w_clip_grid=(1.0, 0.8), a_clip_grid=(1.0, 0.9, 0.8),
                    smooth_alphas=(0.5, 0.75))
    calibrate(ours, QuantPlan.block_uniform(ours, 4, 4), batches, cfg, progress=False, out_dir=tmp_path / "a")
    calibrate(theirs, QuantPlan.block_uniform(theirs, 4, 4), batches, cfg, progress=False, out_dir=tmp_path / "b",
              tie=DiffusersRunner(theirs).tie)
    chosen_a = json.loads((tmp_path / "a" / "ptq.json").read_text())["smooth"]
    chosen_b = json.loads((tmp_path / "b" / "ptq.json").read_text())["smooth"]
    pairs = {"attn.qkv": "attn1.to_q", "attn.proj": "attn1.to_out.0", "mlp.fc1": "ff.net.0.proj"}
    assert len(chosen_a) == len(chosen_b) == 6
    assert any(v is not None for v in chosen_a.values())
    fa, fb = read_tensors(tmp_path / "a" / SMOOTH_FILE), read_tensors(tmp_path / "b" / SMOOTH_FILE)
    for i in range(2):
        for o, t in pairs.items():
            assert chosen_a[f"blocks.{i}.{o}"] == chosen_b[f"transformer_blocks.{i}.{t}"], (i, o)
            if f"blocks.{i}.{o}" in fa:
                torch.testing.assert_close(fb[f"transformer_blocks.{i}.{t}"], fa[f"blocks.{i}.{o}"])
        qkv = ours.get_submodule(f"blocks.{i}.attn.qkv")
        parts = [theirs.get_submodule(f"transformer_blocks.{i}.attn1.to_{x}") for x in "qkv"]
        assert torch.equal(torch.cat([p.w_codes for p in parts]), qkv.w_codes)
        fc1 = ours.get_submodule(f"blocks.{i}.mlp.fc1")
        assert torch.equal(theirs.get_submodule(f"transformer_blocks.{i}.ff.net.0.proj").w_codes, fc1.w_codes)
    # the directory re-folds into a fresh FP copy: the calibrated model, exactly
    again = copy.deepcopy(fp_theirs)
    load_calibration(again, tmp_path / "b")
    x = DiffusersRunner(again).inputs(*batches[0])
    with torch.no_grad():
        assert torch.equal(again(*x).sample, theirs(*x).sample)


def test_smoothing_refusals_and_orders(tmp_path, monkeypatch):
    """What smoothing refuses and how it says so, and what must not depend on the plan's key order."""
    import warnings

    from treeq_engine.calib import ptq, smooth
    from treeq_engine.calib.ptq import PTQConfig, calibrate
    from treeq_engine.calib.store import CheckpointError

    model = perturbed(tiny_dit())
    blk = "transformer_blocks.1"
    # a block adding positional embeddings to attn1's input: q/k/v refused by name, its feed-forward still folds
    odd = copy.deepcopy(model)
    odd.transformer_blocks[1].pos_embed = torch.nn.Identity()
    with pytest.raises(ValueError, match="positional embeddings"):
        smooth.site_of(odd, f"{blk}.attn1.to_q")
    assert smooth.site_of(odd, f"{blk}.ff.net.0.proj").producer == f"{blk}.norm1.linear"
    # an adaLN linear without a bias cannot hold (1 + scale)/s − 1
    nob = copy.deepcopy(model)
    nob.transformer_blocks[1].norm1.linear.bias = None
    with pytest.raises(ValueError, match="no bias"):
        smooth.fold(nob, f"{blk}.attn1.to_q", torch.full((32,), 2.0))
    # half-precision weights: folded in float32 and rounded once
    half, full = copy.deepcopy(model).to(torch.bfloat16), copy.deepcopy(model).to(torch.bfloat16).float()
    s = torch.rand(32, generator=torch.Generator().manual_seed(0)) * 8 + 0.5
    smooth.fold(half, f"{blk}.attn1.to_q", s)
    smooth.fold(full, f"{blk}.attn1.to_q", s)
    for n in (f"{blk}.norm1.linear", f"{blk}.attn1.to_k"):
        for a, b in zip(half.get_submodule(n).parameters(), full.get_submodule(n).parameters()):
            assert torch.equal(a, b.to(torch.bfloat16)), n

    # a tied q/k/v group is scored stacked whatever order the plan lists it in
    runner = DiffusersRunner(model)
    batches = [example(runner, n=2, seed=3)[0]]
    plan = QuantPlan.block_uniform(model, 4, 4)
    shuffled = QuantPlan(dict(sorted(plan.layers.items())))   # to_k before to_q
    seen = []
    real = ptq.calibrate_layer
    monkeypatch.setattr(ptq, "calibrate_layer", lambda w, *a, **k: (seen.append(tuple(w.shape)), real(w, *a, **k))[1])
    cfg = PTQConfig(max_tokens=64, rounds=1, w_clip_grid=(1.0,), a_clip_grid=(1.0, 0.9), smooth_alphas=(0.5,))
    smooth.choose(copy.deepcopy(model), shuffled, batches, (0.5,), cfg,
                  ptq._joint_groups(shuffled, runner.tie))
    assert (96, 32) in seen and (32, 32) not in seen[:2]
    monkeypatch.undo()

    # PixArt: its attn1/ff inputs are refused with one warning that says why; nothing to smooth is an error
    px = perturbed(tiny_pixart())
    pr = DiffusersRunner(px)
    with pytest.warns(UserWarning, match="cannot be smoothed.*timestep embedding every block shares"):
        calibrate(copy.deepcopy(px), QuantPlan.block_uniform(px, 4, 4), [example(pr, n=2)[0]], cfg, progress=False)
    only_q = QuantPlan({n: c for n, c in QuantPlan.block_uniform(px, 4, 4).layers.items() if n.endswith("to_q")})
    with pytest.raises(ValueError, match="has none .*refused, e.g."):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            calibrate(copy.deepcopy(px), only_q, [example(pr, n=2)[0]], cfg, progress=False)

    # a factors file keyed by a site's member (not its key) is refused, not folded twice
    out = tmp_path / "p"
    calibrate(copy.deepcopy(model), plan, batches, cfg, progress=False, out_dir=out, tie=runner.tie)
    from safetensors.torch import load_file, save_file

    f = out / ptq.SMOOTH_FILE
    tensors, meta = load_file(str(f)), __import__("safetensors").safe_open(str(f), "pt").metadata()
    key = next(k for k in tensors if k.endswith("attn1.to_q"))
    tensors[key.replace("to_q", "to_k")] = tensors.pop(key)
    save_file(tensors, str(f), metadata=meta)
    with pytest.raises(CheckpointError, match="a member of the site"):
        ptq.load_calibration(copy.deepcopy(model), out)


def test_ptq_statistics_leave_out_padded_captions():
    """PixArt's captions are padded and masked: the caption projection and cross-attention's to_k/to_v are
    calibrated on real caption tokens only; every other layer sees all its rows."""
    from treeq_engine.calib.capture import capture_inputs

    model = tiny_pixart()
    inputs, _ = example(DiffusersRunner(model))
    mask = inputs[3].bool()
    real = int(mask.sum())
    assert 0 < real < mask.numel()
    for name, rows in (("caption_projection.linear_1", real), ("caption_projection.linear_2", real),
                       ("transformer_blocks.1.attn2.to_k", real), ("transformer_blocks.0.attn2.to_v", real),
                       ("transformer_blocks.0.attn2.to_q", 4 * 16), ("transformer_blocks.0.ff.net.2", 4 * 16)):
        assert capture_inputs(model, name, [inputs], max_tokens=10_000).shape[0] == rows, name
    torch.testing.assert_close(capture_inputs(model, "caption_projection.linear_1", [inputs], max_tokens=10_000),
                               inputs[1][mask])


def test_command_line_ptq_peft_quantize_in_bfloat16(tmp_path, capsys):
    """`treeq ptq --dtype bfloat16` calibrates a model loaded in bf16 (half the memory: what a 12B or 20B transformer
    needs to fit beside its teacher); `treeq peft` and `treeq quantize --ptq` load it in the dtype the calibration
    recorded, and the artifact computes what the calibrated, fine-tuned bf16 fake-quant model computes."""
    import json

    from treeq_engine.calib.peft import load_finetuned
    from treeq_engine.calib.ptq import load_calibration
    from treeq_engine.cli import main
    from treeq_engine.models.diffusers_transformers import rebuild
    from treeq_engine.runtime import artifact

    pipe_dir, calib, src = captured_dit_pipeline(tmp_path)
    ptq, peft, art = str(tmp_path / "ptq"), str(tmp_path / "peft"), tmp_path / "art"
    assert main(["ptq", *src, "--dtype", "bfloat16", "--bits", "W4A8", "--branch", "monarch", "--branch-params",
                 "4", "--max-tokens", "64", "--rounds", "1", "--out", ptq]) == 0
    assert json.loads((tmp_path / "ptq" / "ptq.json").read_text())["data"]["dtype"] == "bfloat16"
    assert main(["peft", *src, "--ptq", ptq, "--steps", "3", "--lr-branch", "0.05", "--out", peft]) == 0
    assert "for 3 steps" in capsys.readouterr().out
    refused("dtype it was calibrated in",
            ["quantize", "--diffusers", str(pipe_dir), "--ptq", ptq, "--dtype", "bfloat16", "--out", str(art)])
    assert main(["quantize", "--diffusers", str(pipe_dir), "--ptq", ptq, "--peft", peft, "--out", str(art)]) == 0
    assert "stopped at step" not in capsys.readouterr().err
    state = json.loads((tmp_path / "peft" / "peft.json").read_text())   # as a run stopped at step 3 of 5
    (tmp_path / "peft" / "peft.json").write_text(json.dumps({**state, "config": {**state["config"], "steps": 5}}))
    assert main(["quantize", "--diffusers", str(pipe_dir), "--ptq", ptq, "--peft", peft, "--out",
                 str(tmp_path / "art5")]) == 0
    assert "stopped at step 3 of 5; rerun `treeq peft`" in capsys.readouterr().err

    direct = diffusers.DiTTransformer2DModel.from_pretrained(pipe_dir / "transformer",
                                                             torch_dtype=torch.bfloat16).eval()
    load_calibration(direct, ptq)   # (a float32 model is another model to the calibration's fingerprint)
    load_finetuned(direct, peft)
    assert {p.dtype for n, p in direct.named_parameters() if ".branch." in n} == {torch.float32}   # trained so
    loaded = artifact.load(art, rebuild(artifact.read_manifest(art)["model_config"]))
    x, t, y = DiffusersRunner(direct).inputs(torch.randn(2, 4, 8, 8), torch.tensor([3, 900]), torch.tensor([1, 7]))
    with torch.no_grad():
        want = direct(x.bfloat16(), t, y).sample.float()
        got = loaded(x.to(loaded.dtype), t, y).sample.float()
    # (the artifact rebuilds the rest of the model in float32: 1.1e-2 from the bf16 model)
    assert torch.isfinite(got).all() and float((got - want).norm() / want.norm()) < 3e-2
    from treeq_engine.calib.store import CheckpointError

    with pytest.raises(CheckpointError, match="calibrated from another model"):
        load_calibration(diffusers.DiTTransformer2DModel.from_pretrained(pipe_dir / "transformer"), ptq)
    refused("--dtype is for --diffusers", ["ptq", "--dtype", "bfloat16", "--out", str(tmp_path / "p5")])


def test_ptq_ignores_what_the_padding_holds_and_caches_no_weights(tmp_path, monkeypatch):
    """End to end through `calibrate` on PixArt: two calibration sets that differ only in what their padded caption
    rows hold give bit-identical calibrated layers (the padding never reaches the statistics); while it runs, no
    layer holds a cached fake-quantized weight beside its float one; a sample that keeps no caption token attends
    to all of them alike, so all its rows count; and a directory begun before the padding was left out is not
    resumed with it."""
    import json

    from treeq_engine.calib import capture
    from treeq_engine.calib.ptq import PTQConfig, calibrate
    from treeq_engine.calib.store import CheckpointError
    from treeq_engine.nn import quant_layers

    model = perturbed(tiny_pixart())
    runner = DiffusersRunner(model)
    batches = [example(runner, n=3, seed=s)[0] for s in (11, 12)]
    junk = [b[:1] + (torch.where(b[3].bool()[..., None], b[1], torch.randn_like(b[1]) * 50),) + b[2:] for b in batches]
    plan = QuantPlan.block_uniform(model, 4, 8)
    cfg = PTQConfig(max_tokens=64, rounds=1, w_clip_grid=(1.0, 0.8), a_clip_grid=(1.0, 0.9))
    cached = []
    capture_fn = capture.StageRunner.capture

    def spy(self, name, *a, **k):
        cached.append(sum(m._w_cache is not None for m in quant_layers(self.model).values()))
        return capture_fn(self, name, *a, **k)

    monkeypatch.setattr(capture.StageRunner, "capture", spy)
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    calibrate(a, plan, batches, cfg, progress=False, out_dir=tmp_path / "a")
    calibrate(b, plan, junk, cfg, progress=False)
    assert cached and max(cached) == 0
    for n in plan.layers:
        la, lb = a.get_submodule(n), b.get_submodule(n)
        assert torch.equal(la.w_codes, lb.w_codes) and torch.equal(la.w_scale, lb.w_scale), n
        assert la.config == lb.config, n

    none_kept = batches[0][:3] + (torch.zeros_like(batches[0][3]),)
    assert bool(runner.real_rows("caption_projection.linear_1", none_kept).all())
    state = json.loads((tmp_path / "a" / "ptq.json").read_text())   # as a state written before real_rows
    del state["rows"]
    (tmp_path / "a" / "ptq.json").write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match="begun before caption/prompt padding"):
        calibrate(copy.deepcopy(model), plan, batches, cfg, progress=False, out_dir=tmp_path / "a")


def test_quantize_ptq_refuses_an_explicit_dtype(tmp_path):
    """`quantize --ptq` loads the dtype the calibration recorded: any --dtype given with it, float32 included, is
    refused rather than ignored."""

    refused("dtype it was calibrated in",
            ["quantize", "--diffusers", str(tmp_path), "--ptq", str(tmp_path), "--dtype", "float32",
             "--out", str(tmp_path / "a")])
