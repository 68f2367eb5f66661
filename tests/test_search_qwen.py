"""The search, PTQ and PEFT on diffusers' Qwen-Image transformer (tiny random configs, offline): the runner's
segments compose to the model bit for bit, padding a call's prompts (as calls of different prompt lengths are
stacked) leaves the image tokens as they were, tied leaves follow what reads one input, the evaluator agrees with a
brute-force oracle on the model's own forward, and the command line searches, calibrates, fine-tunes and packs."""
import json
import os

import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")
diffusers = pytest.importorskip("diffusers", reason="diffusers is an optional dependency (requirements-dev.txt)")

from pipeline_flow import ptq_peft_packed  # noqa: E402
from test_search_mmdit import check_evaluator  # noqa: E402
from tiny_diffusers import tiny_qwen, tiny_qwen_pipeline  # noqa: E402
from tinydit import one_thread  # noqa: E402,F401

from treeq_engine.plan import QuantPlan  # noqa: E402
from treeq_engine.search import (QwenImageRunner, capture_calls,  # noqa: E402
                                 make_runner)
from treeq_engine.search.diffusers_runner import diffusers_arch, load_inputs, save_inputs  # noqa: E402
from treeq_engine.search.evaluator import run_segments  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def call(n=2, text=7, hw=(4, 6), seed=0):
    """The keyword arguments Qwen-Image's pipeline passes: packed latents, padded prompts with their mask (the
    first sample's prompt two tokens shorter), timesteps / 1000, the latent grid of each sample."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(n, text, dtype=torch.long)
    mask[0, text - 2:] = 0
    return dict(hidden_states=torch.randn(n, hw[0] * hw[1], 16, generator=g),
                encoder_hidden_states=torch.randn(n, text, 16, generator=g), encoder_hidden_states_mask=mask,
                timestep=torch.rand(1, generator=g).expand(n).clone(), img_shapes=[[(1, *hw)]] * n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_segments_compose_to_the_model(dtype):
    model = tiny_qwen().to(dtype)
    runner = make_runner(model)
    assert isinstance(runner, QwenImageRunner) and diffusers_arch(model) == "qwen-image"
    for hw in ((4, 6), (2, 8)):
        kw = {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() and k != "timestep" else v
              for k, v in call(hw=hw).items()}
        with torch.no_grad():
            assert torch.equal(run_segments(runner, runner.inputs(**kw)), model(**kw).sample)


def test_calls_of_different_prompt_lengths_stack_padded():
    """Captured calls whose prompts differ in length are padded to the longest, mask 0: the output (image tokens)
    is what each call gave."""
    model = tiny_qwen()
    runner = make_runner(model)
    calls_kw = [call(text=7, seed=1), call(text=10, seed=2)]
    with capture_calls(runner) as calls, torch.no_grad():
        want = torch.cat([model(**kw).sample for kw in calls_kw])
    inputs = calls.inputs()
    assert inputs[1].shape == (4, 10, 16) and inputs[2].shape == (4, 10)
    assert int(inputs[2][2:].sum()) == 10 + 8 and int(inputs[2][:2].sum()) == 5 + 7   # (pads and masks are 0)
    with torch.no_grad():
        got = run_segments(runner, inputs)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with torch.no_grad():   # and padding itself changes nothing the metric reads
        kw = call(text=7)
        padded = dict(kw, encoder_hidden_states=F.pad(kw["encoder_hidden_states"], (0, 0, 0, 5)),
                      encoder_hidden_states_mask=F.pad(kw["encoder_hidden_states_mask"], (0, 5)))
        torch.testing.assert_close(model(**padded).sample, model(**kw).sample, rtol=1e-5, atol=1e-5)


def test_tied_leaves_and_checked_inputs():
    runner = make_runner(tiny_qwen())
    assert runner.tie("transformer_blocks.0.attn.to_k") == "transformer_blocks.0.attn.qkv"
    assert runner.tie("transformer_blocks.1.attn.add_v_proj") == "transformer_blocks.1.attn.add_qkv"
    assert runner.tie("transformer_blocks.0.attn.to_out.0") is None and runner.tie("img_in") is None
    assert runner.segment_of("transformer_blocks.1.img_mlp.net.2") == 2 and runner.segment_of("proj_out") == 3
    kw = call()
    with pytest.raises(ValueError, match=r"hidden_states must be \(N, S, 16\) packed latents"):
        runner.inputs(**{**kw, "hidden_states": torch.randn(2, 4, 4, 6)})
    with pytest.raises(ValueError, match=r"encoder_hidden_states_mask must be \(N=2, L=7\)"):
        runner.inputs(**{**kw, "encoder_hidden_states_mask": torch.ones(2, 6)})
    with pytest.raises(ValueError, match="cover 20 image tokens, hidden_states has 24"):
        runner.inputs(**{**kw, "img_shapes": [[(1, 4, 5)]] * 2})
    with pytest.raises(ValueError, match="img_shapes differ between the samples"):
        runner.inputs(**{**kw, "img_shapes": [[(1, 4, 6)], [(1, 6, 4)]]})
    with pytest.raises(ValueError, match="cover 28 image tokens, hidden_states has 24"):   # (an edit call's grids)
        runner.inputs(**{**kw, "img_shapes": [[(1, 4, 6), (1, 2, 2)]] * 2})
    runner.inputs(**kw)   # records the 4 x 6 grid for 24 tokens
    with pytest.raises(ValueError, match="latents of 24 tokens came as"):
        runner.inputs(**{**kw, "img_shapes": [[(1, 6, 4)]] * 2})
    with pytest.raises(ValueError, match="guidance embeddings"):
        runner.inputs(**kw, guidance=torch.ones(2))
    with pytest.raises(ValueError, match="attention_kwargs"):
        runner.inputs(**kw, attention_kwargs={"scale": 1.0})
    state = runner.inputs(**{**kw, "encoder_hidden_states_mask": None})
    assert state[2].dtype == torch.long and bool(state[2].all())   # no mask: all ones
    assert tuple(state[4].shape) == (2, 1, 3) and state[4][0].tolist() == [[1, 4, 6]]
    with pytest.raises(TypeError, match="the layered variant"):
        QwenImageRunner(diffusers.QwenImageTransformer2DModel(
            patch_size=2, in_channels=16, out_channels=4, num_layers=1, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=16, axes_dims_rope=(8, 4, 4), use_additional_t_cond=True))


def edit_call(n=2, seed=0, conditions=((2, 4),)):
    """An edit pipeline's call: the target's 4 x 6 latent tokens, then each condition image's, one grid each."""
    kw = call(n=n, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    extra = [torch.randn(n, h * w, 16, generator=g) for h, w in conditions]
    kw["hidden_states"] = torch.cat([kw["hidden_states"], *extra], dim=1)
    kw["img_shapes"] = [[(1, 4, 6)] + [(1, h, w) for h, w in conditions]] * n
    return kw


@pytest.mark.parametrize("zero_cond", [False, True])
def test_edit_calls_compose_and_the_metric_reads_the_target(zero_cond):
    """Qwen-Image-Edit's calls (condition images' tokens after the target's; with zero_cond_t, as 2511, those
    tokens modulated at timestep 0): the cut composes to the model bit for bit, in float32 and bf16, and the metric
    reads the target's tokens only, as the pipelines keep them; the evaluator agrees with a brute-force oracle on
    them."""
    import copy

    import numpy as np

    from treeq_engine.nn import convert, quant_layers
    from treeq_engine.plan import LayerConfig
    from treeq_engine.search import Environment, Evaluator, SearchSpace

    model = tiny_qwen() if not zero_cond else _zero_cond(tiny_qwen())
    runner = make_runner(model)
    assert runner.zero_cond == zero_cond
    for dtype, conditions in ((torch.float32, ((2, 4),)), (torch.float32, ((2, 2), (4, 2))), (torch.bfloat16, ((2, 4),))):
        m = model.to(dtype)
        kw = {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() and k != "timestep" else v
              for k, v in edit_call(conditions=conditions).items()}
        state = runner.inputs(**kw)
        with torch.no_grad():
            want = m(**kw).sample
            assert torch.equal(runner.forward(*state), want), (dtype, conditions)   # every token
            assert torch.equal(run_segments(runner, state), want[:, :24])   # what the metric reads: the target's
    model = model.float()
    kw = edit_call(n=4, seed=3)
    inputs = runner.inputs(**kw)
    space = SearchSpace.build(model, inputs, forward=lambda *xs: run_segments(runner, xs), tie=runner.tie)
    env = Environment(LayerConfig(4, 4), 0.5)
    pristine = copy.deepcopy(model)
    ev = Evaluator(model, runner, space, inputs, env, batch=4, group=3)
    rows = np.random.default_rng(5).integers(0, len(space.candidates), (3, 4))

    def brute(row, lo):   # the model's own forward, converted, on the target's tokens
        m = copy.deepcopy(pristine)
        with torch.no_grad():
            fp = m(**kw).sample[:, :24].double()
        layers = {n: space.candidates[row[i - lo]] if lo <= i < lo + 4 else env.config
                  for i, leaf in enumerate(space.leaves) for n in leaf.layer_names}
        layers.update({leaf.name: cfg for leaf, cfg in space.fixed})
        convert(m, QuantPlan(layers))
        node = {n for leaf in space.leaves[lo:lo + 4] for n in leaf.layer_names}
        for name, q in quant_layers(m).items():
            q.set_noise_scale(1.0 if name in node else env.lam)
        with torch.no_grad():
            return float(((m(**kw).sample[:, :24].double() - fp) ** 2).mean())

    for lo in (0, len(space.leaves) - 4):
        got = ev.evaluate(lo, lo + 4, rows)
        np.testing.assert_allclose(got, [brute(r, lo) for r in rows], rtol=2e-5)


def _zero_cond(model):
    """``model`` rebuilt as Qwen-Image-Edit-2511 builds it (``zero_cond_t``), the same weights."""
    cfg = {k: v for k, v in dict(model.config).items() if not k.startswith("_")}
    twin = diffusers.QwenImageTransformer2DModel(**{**cfg, "zero_cond_t": True})
    twin.load_state_dict(model.state_dict())
    return twin.eval()


def test_evaluate_matches_brute_force():
    check_evaluator(tiny_qwen(), call(n=4, seed=3), 0.5, seed=5)


def test_search_ptq_peft_quantize(tmp_path, capsys):
    """`treeq search / ptq / peft / quantize --diffusers` on a Qwen-Image transformer directory with saved inputs
    (two captured calls of different prompt lengths): the plan packs, and the artifact computes what the
    calibrated, fine-tuned fake-quant transformer computes."""
    from treeq_engine.cli import main

    model = tiny_qwen()
    d = tmp_path / "qwen"
    model.save_pretrained(d)
    runner = make_runner(model)
    with capture_calls(runner) as calls, torch.no_grad():
        model(**call(n=3, text=6, seed=1))
        model(**call(n=3, text=9, seed=2))
    calib = str(tmp_path / "calib.safetensors")
    save_inputs(calib, runner, calls.inputs())
    assert load_inputs(calib, make_runner(tiny_qwen()))[2].shape == (6, 9)
    src = ["--diffusers", str(d), "--calib-inputs", calib]
    out = tmp_path / "search"
    assert main(["search", *src, "--budget", "W4A8", "--keep", "3", "--baselines", "uniform", "--no-progress",
                 "--device", "cpu", "--out", str(out)]) == 0
    assert "QwenImageTransformer2DModel" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["tss"]["mse"] <= report["baselines"]["uniform"]["mse"] * (1 + 1e-6)
    plan = QuantPlan.load(out / "plan.json")
    assert plan.layers["transformer_blocks.0.attn.add_k_proj"] == plan.layers["transformer_blocks.0.attn.add_q_proj"]
    direct, loaded = ptq_peft_packed(tmp_path, src, d, batch=3)
    kw = call(n=2, seed=7)
    with torch.no_grad():
        want, got = direct(**kw).sample, loaded(**kw).sample.float()
    assert float((got - want).norm() / want.norm()) < 2e-2   # the artifact runs bf16 (quantize's default)


def test_what_the_pipeline_passes_and_a_fresh_runner():
    """No mask (the model's own default), one negative prompt for a batch (the model broadcasts it), and the grids
    given per prompt while ``num_images_per_prompt`` makes more samples: each as the model computes it. A runner
    that did not read the inputs (PTQ's, PEFT's) finds the grids in the state."""
    model = tiny_qwen()
    runner = make_runner(model)
    kw = call(n=4, hw=(2, 8))
    cases = [dict(kw, encoder_hidden_states_mask=None),
             dict(kw, encoder_hidden_states=kw["encoder_hidden_states"][:1], encoder_hidden_states_mask=None),
             dict(kw, img_shapes=[[(1, 2, 8)]] * 2)]
    for c in cases:
        with torch.no_grad():
            state = runner.inputs(**c)
            torch.testing.assert_close(run_segments(runner, state), model(**c).sample, rtol=0, atol=0)
            torch.testing.assert_close(run_segments(QwenImageRunner(model), state), model(**c).sample, rtol=0, atol=0)


def test_capture_search_and_pack_a_qwen_pipeline(tmp_path, capsys):
    """`treeq capture` on a Qwen-Image pipeline with true CFG (--cfg maps to true_cfg_scale with a blank negative
    prompt: the negative calls, one prompt for the batch, are recorded too; prompts of different lengths stacked
    padded) -> `treeq search` -> `treeq quantize`; the artifact samples in the pipeline."""
    from treeq_engine.cli import main

    pipe_dir = tmp_path / "qwen"
    tiny_qwen_pipeline().save_pretrained(pipe_dir)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cat\na much longer prompt about a dog on a hill\n")
    calib = str(tmp_path / "calib.safetensors")
    size = ["--height", "64", "--width", "96"]
    assert main(["capture", "--pipeline", str(pipe_dir), "--prompts", str(prompts), "--steps", "3", "--timesteps",
                 "2", "--cfg", "4", *size, "--device", "cpu", "--out", calib]) == 0
    out = capsys.readouterr().out
    assert "6 transformer calls, kept 8 samples at 2 timesteps" in out   # 3 steps x (prompts, negative) of 2
    runner = make_runner(diffusers.QwenImageTransformer2DModel.from_pretrained(pipe_dir / "transformer"))
    inputs = load_inputs(calib, runner)
    t, mask = inputs[3], inputs[2]
    assert len(set(t.tolist())) == 2 and float(t.max()) <= 1.0   # the pipeline's timesteps / 1000
    assert len({int(r) for r in mask.sum(1)}) >= 2 and not bool(mask.all())   # prompts of several lengths, padded
    res = tmp_path / "search"
    assert main(["search", "--diffusers", str(pipe_dir), "--calib-inputs", calib, "--budget", "W4A8", "--keep", "2",
                 "--no-progress", "--device", "cpu", "--out", str(res)]) == 0
    art = tmp_path / "art"
    assert main(["quantize", "--diffusers", str(pipe_dir), "--plan", str(res / "plan.json"), "--out", str(art)]) == 0
    assert main(["sample", "--pipeline", str(pipe_dir), "--artifact", str(art), "--prompts", str(prompts), "--steps",
                 "2", "--cfg", "4", *size, "--device", "cpu", "--out", str(tmp_path / "q.png")]) == 0


def test_an_all_ones_mask_reaches_the_blocks_as_none():
    """The pipeline passes no mask when no prompt is padded (unmasked attention: the fast kernels); a runner whose
    inputs had no padding does the same, and one that read padded prompts keeps the mask."""
    model = tiny_qwen()
    seen = []
    model.transformer_blocks[0].register_forward_pre_hook(
        lambda mod, args, kw: seen.append(kw["encoder_hidden_states_mask"]), with_kwargs=True)
    kw = call(n=2)
    full = dict(kw, encoder_hidden_states_mask=torch.ones_like(kw["encoder_hidden_states_mask"]))
    for given, masked in ((full, False), (dict(kw, encoder_hidden_states_mask=None), False), (kw, True)):
        runner = make_runner(model)
        seen.clear()
        with torch.no_grad():
            got = run_segments(runner, runner.inputs(**given))
            want = model(**given).sample
        assert (seen[0] is not None) == masked
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_unpadded_calls_of_two_lengths_stack_masked():
    """A true-CFG pipeline at batch 1 calls the transformer once with the prompt and once with the negative prompt,
    each unpadded (no mask): stacked, the shorter is padded, and the runner that read them masks from then on."""
    model = tiny_qwen()
    runner = make_runner(model)
    calls_kw = [dict(call(n=1, text=t, seed=t), encoder_hidden_states_mask=None) for t in (7, 11)]
    with capture_calls(runner) as calls, torch.no_grad():
        want = torch.cat([model(**kw).sample for kw in calls_kw])
    inputs = calls.inputs()
    assert inputs[2].tolist() == [[1] * 7 + [0] * 4, [1] * 11]
    with torch.no_grad():
        torch.testing.assert_close(run_segments(runner, inputs), want, rtol=1e-5, atol=1e-5)


def test_ptq_statistics_leave_out_padded_text_rows():
    """The text stream's layers are calibrated on real prompt tokens only: the padding the mask hides is left out
    of what PTQ captures; image-stream layers see every token."""
    from treeq_engine.calib.capture import capture_inputs

    model = tiny_qwen()
    runner = make_runner(model)
    inputs = runner.inputs(**call(n=2, text=7))   # 7 + 5 real prompt tokens, 2 of padding
    for name, rows in (("txt_in", 12), ("transformer_blocks.0.attn.add_k_proj", 12),
                       ("transformer_blocks.1.txt_mlp.net.2", 12), ("transformer_blocks.1.attn.to_add_out", 12),
                       ("transformer_blocks.0.attn.to_q", 2 * 24), ("transformer_blocks.1.img_mlp.net.2", 2 * 24)):
        assert capture_inputs(model, name, [inputs], max_tokens=10_000).shape[0] == rows, name
    with torch.no_grad():   # the rows kept are the real ones: txt_in's input is the normed prompt
        want = model.txt_norm(inputs[1])[inputs[2].bool()]
    torch.testing.assert_close(capture_inputs(model, "txt_in", [inputs], max_tokens=10_000), want)


def test_edit_2511_candidates_stack_apart_and_ptq_reads_the_target():
    """Qwen-Image-Edit-2511 embeds [t; 0·t]: with the timestep embedder searched too, stacking candidates along the
    batch (group 3) scores what one candidate per forward does (the embedding and the image modulation see their
    rows sample by sample); PTQ's statistics of the output projection read the target's tokens only."""
    import numpy as np

    from treeq_engine.calib.capture import capture_inputs
    from treeq_engine.plan import LayerConfig
    from treeq_engine.search import Environment, Evaluator, SearchSpace

    model = _zero_cond(tiny_qwen())
    runner = make_runner(model)
    inputs = runner.inputs(**edit_call(n=4, seed=3))
    space = SearchSpace.build(model, inputs, forward=lambda *xs: run_segments(runner, xs), tie=runner.tie,
                              include="time_text_embed|transformer_blocks")
    assert space.leaves[0].name.startswith("time_text_embed")
    rows = np.random.default_rng(1).integers(0, len(space.candidates), (3, 4))
    env = Environment(LayerConfig(4, 4), 1.0)
    scores = [Evaluator(model, runner, space, inputs, env, batch=4, group=g).evaluate(0, 4, rows) for g in (1, 3)]
    np.testing.assert_allclose(scores[1], scores[0], rtol=1e-5)
    assert capture_inputs(model, "proj_out", [inputs], max_tokens=10_000).shape[0] == 4 * 24   # of 4 x 32 tokens
    assert capture_inputs(model, "transformer_blocks.1.img_mlp.net.2", [inputs], 10_000).shape[0] == 4 * 32
