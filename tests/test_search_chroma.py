"""The search, PTQ and PEFT on diffusers' Chroma transformer (tiny random configs, offline): the runner's segments
compose to the model bit for bit (with and without the pipeline's mask, float32 and bf16), tied leaves follow what
reads one input, the evaluator agrees with a brute-force oracle on the model's own forward, PTQ's statistics leave
out the prompt's padding, and the command line captures a Chroma pipeline, searches, calibrates, fine-tunes, packs
and samples."""
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
diffusers = pytest.importorskip("diffusers", reason="diffusers is an optional dependency (requirements-dev.txt)")

from pipeline_flow import captured, leaves, ptq_peft_packed, searched_beats_uniform  # noqa: E402
from test_search_mmdit import check_evaluator  # noqa: E402
from tiny_diffusers import tiny_chroma, tiny_chroma_pipeline  # noqa: E402
from tinydit import one_thread  # noqa: E402,F401

from treeq_engine.search import ChromaRunner, make_runner  # noqa: E402
from treeq_engine.search.diffusers_runner import diffusers_arch  # noqa: E402
from treeq_engine.search.evaluator import run_segments  # noqa: E402

# (diffusers' Chroma imports FluxPosEmbed from where 0.42 deprecates it)
pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:`FluxPosEmbed` is deprecated:FutureWarning")]


def call(n=2, hw=(3, 4), text=5, seed=0, dtype=torch.float32, masked=True):
    """The keyword arguments Chroma's pipeline passes: packed latents, T5 features, timesteps / 1000, the position
    ids, the mask over [text; image] (the first sample's last two text tokens hidden, as the pipeline hides a
    prompt's padding)."""
    g = torch.Generator().manual_seed(seed)
    h, w = hw
    img_ids = torch.zeros(h * w, 3)
    img_ids[:, 1], img_ids[:, 2] = torch.arange(h * w) // w, torch.arange(h * w) % w
    mask = torch.ones(n, text + h * w, dtype=dtype)
    mask[0, text - 2:text] = 0
    return dict(hidden_states=torch.randn(n, h * w, 16, generator=g).to(dtype),
                encoder_hidden_states=torch.randn(n, text, 16, generator=g).to(dtype),
                timestep=torch.rand(n, generator=g), img_ids=img_ids, txt_ids=torch.zeros(text, 3),
                attention_mask=mask if masked else None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_segments_compose_to_the_model(dtype):
    model = tiny_chroma().to(dtype)
    runner = make_runner(model)
    assert isinstance(runner, ChromaRunner) and diffusers_arch(model) == "chroma" and runner.num_segments == 6
    boolean = call(dtype=dtype)
    boolean["attention_mask"] = boolean["attention_mask"] > 0
    for kw in (call(dtype=dtype), call(n=3, hw=(4, 2), text=7, seed=1, dtype=dtype, masked=False), boolean):
        with torch.no_grad():
            assert torch.equal(run_segments(runner, runner.inputs(**kw)), model(**kw).sample)


def test_leaves_ties_and_checked_inputs():
    model = tiny_chroma()
    runner, inputs, space, names = leaves(model, call())
    assert names[:4] == ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.add_q_proj",
                         "transformer_blocks.0.attn.to_out.0", "transformer_blocks.0.attn.to_add_out"]
    tied = {leaf.name: leaf.layer_names for leaf in space.leaves}
    assert set(tied["single_transformer_blocks.1.proj_mlp"]) == {
        f"single_transformer_blocks.1.{n}" for n in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}
    fixed = {f[0].name for f in space.fixed}   # the approximator and the embedders are edge layers (W8A8)
    assert {"distilled_guidance_layer.in_proj", "x_embedder", "context_embedder", "proj_out"} <= fixed
    assert runner.segment_of("single_transformer_blocks.0.proj_out") == 2
    assert runner.segment_of("distilled_guidance_layer.layers.0.linear_1") == 0
    good = call()
    for bad, match in ((dict(joint_attention_kwargs={"scale": 1.0}), "joint_attention_kwargs"),
                       (dict(controlnet_block_samples=[torch.zeros(1)]), "ControlNet"),
                       (dict(hidden_states=torch.randn(2, 12, 8)), r"\(N, S, 16\)"),
                       (dict(encoder_hidden_states=torch.randn(2, 5, 8)), r"\(N=2, L, 16\)"),
                       (dict(img_ids=torch.zeros(12, 2)), r"\(12, 3\)"),
                       (dict(img_ids=torch.randint(0, 4, (2, 12, 3))), "differ between the samples"),
                       (dict(attention_mask=torch.ones(2, 12)), r"L \+ S = 17")):
        with pytest.raises(ValueError, match=match):
            runner.inputs(**{**good, **bad})
    with pytest.raises(TypeError, match="ChromaTransformer2DModel"):
        ChromaRunner(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("masked", [True, False])
def test_evaluate_matches_brute_force(masked):
    check_evaluator(tiny_chroma(), call(n=4, seed=3, masked=masked), 0.5, seed=5)


def test_ptq_statistics_leave_out_only_the_padding_a_mask_hides():
    """A boolean mask hides the prompt's padding from the attention: its rows stay out of PTQ's statistics. The
    pipeline's float mask is added to the attention scores (+1, +0): the padding is weighed down, not hidden, it
    moves the output, and every row counts. Without a mask every row counts too."""
    from treeq_engine.calib.capture import capture_inputs

    model = tiny_chroma()
    kw = call(n=2, text=5)   # 3 + 5 prompt tokens, 12 image tokens each
    hidden = {**kw, "attention_mask": kw["attention_mask"] > 0}
    inputs = make_runner(model).inputs(**hidden)
    for name, rows in (("context_embedder", 8), ("transformer_blocks.0.attn.add_k_proj", 8),
                       ("transformer_blocks.0.ff_context.net.2", 8), ("transformer_blocks.0.attn.to_q", 24),
                       ("single_transformer_blocks.1.proj_mlp", 8 + 24), ("single_transformer_blocks.2.proj_out", 32),
                       ("proj_out", 24)):
        assert capture_inputs(model, name, [inputs], max_tokens=10_000).shape[0] == rows, name
    for other in (kw, call(n=2, text=5, masked=False)):
        assert capture_inputs(model, "context_embedder", [make_runner(model).inputs(**other)],
                              max_tokens=10_000).shape[0] == 10
    with torch.no_grad():   # (the float mask's padding is read: changing it changes the output)
        moved = {**kw, "encoder_hidden_states": kw["encoder_hidden_states"].clone()}
        moved["encoder_hidden_states"][0, 3:] = 0
        assert not torch.allclose(model(**moved).sample, model(**kw).sample)


def test_a_call_without_a_mask_is_saved_and_loaded(tmp_path):
    from treeq_engine.search.diffusers_runner import load_inputs, save_inputs

    model = tiny_chroma()
    kw = call(masked=False)
    path = str(tmp_path / "calib.safetensors")
    save_inputs(path, make_runner(model), make_runner(model).inputs(**kw))
    fresh = make_runner(model)
    inputs = load_inputs(path, fresh)
    assert inputs[5].shape == (2, 0)
    with torch.no_grad():
        assert torch.equal(run_segments(fresh, inputs), model(**kw).sample)


def test_capture_search_ptq_peft_pack_and_sample_a_chroma_pipeline(tmp_path):
    """`treeq capture` on a Chroma pipeline (CFG: each step's prompt and negative calls; prompts padded to 512
    tokens, the padding masked) -> `treeq search` -> `treeq ptq` / `peft` -> `treeq quantize --ptq --peft`; the
    artifact computes what the calibrated, fine-tuned fake-quant transformer computes, and samples in the
    pipeline."""
    from treeq_engine.cli import main

    size = ["--height", "16", "--width", "16"]
    pipe_dir, prompts, calib, inputs = captured(tmp_path, tiny_chroma_pipeline(), "chroma",
                                                ["--steps", "3", "--timesteps", "2", "--cfg", "3.0", *size])
    assert inputs[0].shape == (8, 16, 16) and inputs[5].shape == (8, 512 + 16)   # 2 steps x (2 prompts + 2 negative)
    assert not bool(inputs[5].bool().all()) and len(set(inputs[2].tolist())) == 2
    src = ["--diffusers", str(pipe_dir), "--calib-inputs", calib]
    plan = searched_beats_uniform(tmp_path, src)
    assert "single_transformer_blocks.1.proj_mlp" in plan.layers
    direct, loaded = ptq_peft_packed(tmp_path, src, pipe_dir, ptq=["--branch-params", "4"])
    art = tmp_path / "art"
    kw = call(n=2, seed=7)
    with torch.no_grad():
        want, got = direct(**kw).sample, loaded(**kw).sample.float()
    assert float((got - want).norm() / want.norm()) < 2e-2   # the artifact runs bf16 (quantize's default)
    assert main(["sample", "--pipeline", str(pipe_dir), "--artifact", str(art), "--prompts", str(prompts), "--steps",
                 "2", *size, "--device", "cpu", "--out", str(tmp_path / "q.png")]) == 0
