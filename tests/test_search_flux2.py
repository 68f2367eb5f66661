"""The search, PTQ and PEFT on diffusers' FLUX.2 transformer (tiny random configs, offline): the runner's segments
compose to the model bit for bit (with and without embedded guidance, float32 and bf16), tied leaves follow what
reads one input, the evaluator agrees with a brute-force oracle on the model's own forward, and the command line
captures a FLUX.2 [klein] pipeline, searches, calibrates, fine-tunes, packs and samples."""
import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
diffusers = pytest.importorskip("diffusers", reason="diffusers is an optional dependency (requirements-dev.txt)")

from pipeline_flow import captured, leaves, ptq_peft_packed, searched_and_packed, searched_beats_uniform, write_images  # noqa: E402
from test_search_mmdit import check_evaluator  # noqa: E402
from tiny_diffusers import tiny_flux2, tiny_flux2_klein_pipeline  # noqa: E402
from tinydit import one_thread  # noqa: E402,F401

from treeq_engine.search import Flux2Runner, make_runner  # noqa: E402
from treeq_engine.search.diffusers_runner import diffusers_arch  # noqa: E402
from treeq_engine.search.evaluator import run_segments  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def call(n=2, tokens=12, text=5, seed=0, guidance=False, dtype=torch.float32, refs=0):
    """The keyword arguments FLUX.2's pipelines pass: packed latents, text features, timesteps / 1000, 4-axis
    position ids (per sample, as the pipelines pass them; the image's at time 0), FLUX.2 [dev]'s guidance; ``refs``
    reference-image tokens appended, at time 10 (as the pipelines append a reference image's)."""
    g = torch.Generator().manual_seed(seed)
    img_ids = torch.randint(0, 8, (tokens, 4), generator=g)
    img_ids[:, 0] = 0
    if refs:
        ref_ids = torch.randint(0, 8, (refs, 4), generator=g)
        ref_ids[:, 0] = 10
        img_ids, tokens = torch.cat([img_ids, ref_ids]), tokens + refs
    return dict(hidden_states=torch.randn(n, tokens, 16, generator=g).to(dtype),
                encoder_hidden_states=torch.randn(n, text, 24, generator=g).to(dtype),
                timestep=torch.rand(n, generator=g), img_ids=img_ids[None].expand(n, -1, -1),
                txt_ids=torch.zeros(n, text, 4), guidance=torch.full((n,), 4.0) if guidance else None)


@pytest.mark.parametrize("guidance", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_segments_compose_to_the_model(guidance, dtype):
    model = tiny_flux2(guidance).to(dtype)
    runner = make_runner(model)
    assert isinstance(runner, Flux2Runner) and diffusers_arch(model) == "flux2" and runner.num_segments == 6
    assert runner.input_names[-1] == ("guidance" if guidance else "txt_ids")
    for tokens, text in ((12, 5), (20, 9)):
        kw = call(tokens=tokens, text=text, guidance=guidance, dtype=dtype)
        with torch.no_grad():
            assert torch.equal(run_segments(runner, runner.inputs(**kw)), model(**kw).sample)


def test_leaves_ties_and_checked_inputs():
    model = tiny_flux2()
    runner, inputs, space, names = leaves(model, call())
    assert names[:4] == ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.add_q_proj",
                         "transformer_blocks.0.attn.to_add_out", "transformer_blocks.0.attn.to_out.0"]
    assert names[-2:] == ["single_transformer_blocks.1.attn.to_qkv_mlp_proj", "single_transformer_blocks.1.attn.to_out"]
    tied = {leaf.name: leaf.layer_names for leaf in space.leaves}
    assert tied["transformer_blocks.1.attn.add_q_proj"] == tuple(f"transformer_blocks.1.attn.add_{x}_proj"
                                                                  for x in "qkv")
    fixed = {f[0].name for f in space.fixed}   # the shared modulations are edge layers (W8A8)
    assert {"double_stream_modulation_img.linear", "single_stream_modulation.linear", "x_embedder",
            "context_embedder", "norm_out.linear", "proj_out"} <= fixed
    assert runner.segment_of("single_transformer_blocks.0.attn.to_out") == 3
    good = call()
    for bad, match in ((dict(joint_attention_kwargs={"scale": 1.0}), "joint_attention_kwargs"),
                       (dict(kv_cache_mode="extract"), "KV cache"),
                       (dict(guidance=torch.ones(2)), "embeds no guidance"),
                       (dict(hidden_states=torch.randn(2, 12, 8)), r"\(N, S, 16\)"),
                       (dict(encoder_hidden_states=torch.randn(2, 5, 8)), r"\(N=2, L, 24\)"),
                       (dict(img_ids=torch.zeros(12, 3)), r"\(12, 4\)"),
                       (dict(img_ids=torch.randint(0, 4, (2, 12, 4))), "differ between the samples")):
        with pytest.raises(ValueError, match=match):
            runner.inputs(**{**good, **bad})
    with pytest.raises(ValueError, match="guidance-distilled"):
        make_runner(tiny_flux2(guidance=True)).inputs(**good)


@pytest.mark.parametrize("guidance", [False, True])
def test_evaluate_matches_brute_force(guidance):
    check_evaluator(tiny_flux2(guidance), call(n=4, seed=3, guidance=guidance), 0.5, seed=5)


def test_reference_image_tokens_are_left_out_of_the_metric():
    """A call with reference images (``treeq capture --images``): the segments still compose to the whole output,
    and the metric reads the image's own tokens only (the pipeline drops the references' predictions), also after a
    call of another size; the evaluator agrees with the brute-force oracle on it."""
    model = tiny_flux2()
    runner = make_runner(model)
    kw, plain = call(tokens=12, refs=7), call(tokens=19)   # (as many tokens in all, no references)
    assert torch.equal(run_segments(make_runner(model), make_runner(model).inputs(**plain)), model(**plain).sample)
    with torch.no_grad():
        full = model(**kw).sample
        state = runner.inputs(**kw)
        assert torch.equal(runner.forward(*state), full) and full.shape[1] == 19
        assert torch.equal(run_segments(runner, state), full[:, :12])
        assert run_segments(runner, runner.inputs(**call(tokens=9, refs=4))).shape[1] == 9
        assert runner.output((full,)).shape[1] == 12   # (per token count)
        with pytest.raises(ValueError, match="capture them into separate files"):   # 19 tokens, split otherwise
            run_segments(runner, runner.inputs(**plain))
    check_evaluator(model, call(n=4, tokens=6, refs=5, seed=3), 0.5, seed=5, tokens=6)


def test_profile_reads_calls_with_reference_images(tmp_path):
    """`treeq profile --diffusers` runs the runner on a weightless copy, where the position ids hold no values: the
    rows of a call with reference images are the image's and the references' tokens together."""
    from treeq_engine.runtime.profile import diffusers_rows
    from treeq_engine.search.diffusers_runner import save_inputs

    model = tiny_flux2()
    model.save_pretrained(tmp_path / "flux2")
    runner = make_runner(model)
    calib = str(tmp_path / "calib.safetensors")
    save_inputs(calib, runner, runner.inputs(**call(tokens=12, refs=7)))
    rows = diffusers_rows(str(tmp_path / "flux2"), calib, [1, 2])
    assert {(16, 16, 19), (16, 16, 38), (16, 144, 24)} <= set(rows)   # q/k/v on 12 + 7 tokens; single blocks + text


def test_capture_search_ptq_peft_pack_and_sample_a_flux2_klein_pipeline(tmp_path):
    """`treeq capture` on a FLUX.2 [klein] pipeline (CFG: each step's prompt and negative calls) -> `treeq search`
    -> `treeq ptq` (SmoothQuant folded) / `peft` -> `treeq quantize --ptq --peft`; the artifact computes what the
    calibrated, fine-tuned fake-quant transformer computes, and samples in the pipeline."""
    from treeq_engine.cli import main

    size = ["--height", "32", "--width", "32"]
    pipe_dir, prompts, calib, inputs = captured(tmp_path, tiny_flux2_klein_pipeline(), "klein",
                                                ["--steps", "3", "--timesteps", "2", "--cfg", "4.0", *size])
    assert inputs[0].shape == (8, 64, 16) and inputs[1].shape == (8, 512, 24)   # 2 steps x (2 prompts + 2 negative)
    assert len(set(inputs[2].tolist())) == 2
    src = ["--diffusers", str(pipe_dir), "--calib-inputs", calib]
    plan = searched_beats_uniform(tmp_path, src)
    assert "single_transformer_blocks.1.attn.to_qkv_mlp_proj" in plan.layers
    direct, loaded = ptq_peft_packed(tmp_path, src, pipe_dir, ptq=["--branch-params", "4", "--smooth-alphas", "0.3",
                                                                   "0.6"])
    assert len(json.loads((tmp_path / "ptq" / "ptq.json").read_text())["smooth"]) == 2 * 2 + 2
    art = tmp_path / "art"
    kw = call(n=2, seed=7)
    with torch.no_grad():
        want, got = direct(**kw).sample, loaded(**kw).sample.float()
    assert float((got - want).norm() / want.norm()) < 2e-2   # the artifact runs bf16 (quantize's default)
    assert main(["sample", "--pipeline", str(pipe_dir), "--artifact", str(art), "--prompts", str(prompts), "--steps",
                 "2", *size, "--device", "cpu", "--out", str(tmp_path / "q.png")]) == 0


def test_capture_search_and_sample_with_reference_images(tmp_path, capsys):
    """`treeq capture --images` on FLUX.2 [klein]: each prompt runs alone with its own reference image (swapping the
    lines swaps the references' tokens between the calls), the calls carry the references' tokens after the
    image's, the search meters the image's own and PTQ's output-projection statistics read those only; images whose
    calls cannot share a file are refused at the second prompt, nothing written. `treeq sample --images` conditions
    on the images (the samples differ from text-to-image ones) and lays outputs of different sizes side by side."""
    from PIL import Image

    from treeq_engine.calib.capture import capture_inputs
    from treeq_engine.cli import main
    from treeq_engine.search.diffusers_runner import load_inputs

    pipe_dir = tmp_path / "klein"
    tiny_flux2_klein_pipeline().save_pretrained(pipe_dir)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cat\na dog on the hill\n")
    size = ["--height", "32", "--width", "32"]
    transformer = diffusers.Flux2Transformer2DModel.from_pretrained(pipe_dir / "transformer").eval()
    captures = []
    for lines in (["a.png", "b.png"], ["b.png", "a.png"]):
        calib = str(tmp_path / f"calib_{lines[0]}.safetensors")
        assert main(["capture", "--pipeline", str(pipe_dir), "--prompts", str(prompts), "--images",
                     write_images(tmp_path, lines), "--steps", "2", "--timesteps", "2", "--cfg", "1.0", *size,
                     "--device", "cpu", "--out", calib]) == 0
        assert "each prompt runs alone" in capsys.readouterr().err
        captures.append(load_inputs(calib, make_runner(transformer)))
    first, swapped = captures
    assert first[0].shape == (4, 64 + 256, 16)   # 2 prompts x 2 steps; a 64-px reference: 256 tokens after 64
    refs = lambda x: x[:, 64:]   # noqa: E731  (calls 0-1: prompt 1's steps, 2-3: prompt 2's)
    assert not torch.equal(refs(first[0])[0], refs(first[0])[2])
    assert torch.equal(refs(first[0])[:2], refs(swapped[0])[2:]) and torch.equal(refs(first[0])[2:],
                                                                                  refs(swapped[0])[:2])
    runner = make_runner(transformer)
    with torch.no_grad():
        assert run_segments(runner, first).shape == (4, 64, 16)   # the metric reads the image's own
    assert capture_inputs(transformer, "proj_out", [first], max_tokens=10_000).shape[0] == 4 * 64
    art = searched_and_packed(tmp_path, pipe_dir, calib)
    outs = {}
    for name, extra in (("refs", ["--images", write_images(tmp_path, ["a.png", "b.png, a.png"])]), ("text", [])):
        outs[name] = tmp_path / f"{name}.png"   # (FLUX.2 takes several references per prompt)
        assert main(["sample", "--pipeline", str(pipe_dir), "--artifact", str(art), "--prompts", str(prompts),
                     *extra, "--steps", "2", *size, "--device", "cpu", "--out", str(outs[name])]) == 0
        assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["samples"] == 2
    with Image.open(outs["refs"]) as a, Image.open(outs["text"]) as b:
        assert a.size == b.size == (64, 32) and a.tobytes() != b.tobytes()
    # without --height/--width FLUX.2 samples at its first reference's size: a row of 64x64 and 128x96
    mixed = write_images(tmp_path, ["a.png", "c.png"], sizes={"c.png": (128, 96)})
    assert main(["sample", "--pipeline", str(pipe_dir), "--artifact", str(art), "--prompts", str(prompts), "--images",
                 mixed, "--steps", "2", "--device", "cpu", "--out", str(tmp_path / "mixed.png")]) == 0
    with Image.open(tmp_path / "mixed.png") as grid:
        assert grid.size == (64 + 128, 96)
    bad = tmp_path / "bad.safetensors"
    assert main(["capture", "--pipeline", str(pipe_dir), "--prompts", str(prompts), "--images", mixed, "--steps", "2",
                 *size, "--device", "cpu", "--out", str(bad)]) == 2
    assert "prompt 2's images give transformer calls unlike prompt 1's" in capsys.readouterr().err
    assert not bad.exists()


def test_image_files_are_checked_before_anything_loads(tmp_path, capsys):
    """--images: a line per prompt, readable images, several on a line only for a pipeline that takes several, only
    for a pipeline that takes images at all, not with class labels; an image-conditioned pipeline without --images
    is told to give them. Checked from model_index.json and the files alone (no weights anywhere)."""
    from cli_refusal import refused

    from treeq_engine.cli import main

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cat\na dog\n")

    def pipeline(cls, transformer):
        d = tmp_path / cls
        (d / "transformer").mkdir(parents=True, exist_ok=True)
        (d / "transformer" / "config.json").write_text(json.dumps({"_class_name": transformer}))
        (d / "model_index.json").write_text(json.dumps({"_class_name": cls, "transformer": ["diffusers", "x"]}))
        return str(d)

    edit = pipeline("QwenImageEditPipeline", "QwenImageTransformer2DModel")
    plus = pipeline("QwenImageEditPlusPipeline", "QwenImageTransformer2DModel")
    klein = pipeline("Flux2KleinPipeline", "Flux2Transformer2DModel")
    pixart = pipeline("PixArtAlphaPipeline", "PixArtTransformer2DModel")
    img2img = pipeline("FluxImg2ImgPipeline", "FluxTransformer2DModel")
    inpaint = pipeline("FluxInpaintPipeline", "FluxTransformer2DModel")
    out = str(tmp_path / "c.safetensors")
    for pipe, lines, what in ((edit, ["a.png"], "1 lines of images for 2 prompts"),
                              (edit, ["a.png", "missing.png"], "cannot read image .*missing.png"),
                              (edit, ["a.png", "a.png, b.png"], "takes one image per prompt"),
                              (klein, ["a.png", " , "], "line 2 names no image"),
                              (pixart, ["a.png", "b.png"], "PixArtAlphaPipeline takes no image"),
                              (img2img, ["a.png", "b.png"], "FluxImg2ImgPipeline is not one"),
                              (inpaint, ["a.png", "b.png"], "FluxInpaintPipeline is not one")):
        images = write_images(tmp_path, [n for n in lines if "missing" not in n and n.strip(" ,")] or ["a.png"])
        (tmp_path / "images.txt").write_text("\n".join(lines) + "\n")
        assert main(["capture", "--pipeline", pipe, "--prompts", str(prompts), "--images", images, "--out", out]) == 2
        assert __import__("re").search(what, capsys.readouterr().err), what
        refused(what, ["sample", "--pipeline", pipe, "--prompts", str(prompts), "--images", images, "--out",
                       str(tmp_path / "s.png")])
    # several images on a line: read for a pipeline that takes several (then it fails to load: no weights)
    images = write_images(tmp_path, ["a.png", "a.png, b.png"])
    assert main(["capture", "--pipeline", plus, "--prompts", str(prompts), "--images", images, "--out", out]) == 2
    assert "per prompt" not in capsys.readouterr().err
    assert main(["capture", "--pipeline", edit, "--prompts", str(prompts), "--out", out]) == 2
    assert "give treeq capture --images FILE" in capsys.readouterr().err
    assert main(["capture", "--pipeline", img2img, "--prompts", str(prompts), "--out", out]) == 2
    assert "--images" not in capsys.readouterr().err   # (not one --images runs: not suggested)
    # a single-image pipeline reads a line as one path, commas and all; a photo comes upright (EXIF orientation)
    from PIL import Image

    from treeq_engine.models.diffusers_transformers import read_images

    photo = Image.new("RGB", (40, 20), "red")
    exif = photo.getexif()
    exif[0x0112] = 6   # (rotate 90° to display)
    photo.save(tmp_path / "x, y.jpg", exif=exif)
    (tmp_path / "one.txt").write_text("x, y.jpg\n")
    [im] = read_images(tmp_path / "one.txt", 1, "QwenImageEditPipeline")
    assert im.size == (20, 40)
    assert main(["capture", "--pipeline", edit, "--labels", "1,2", "--images", images, "--out", out]) == 2
    assert "--images goes with --prompts" in capsys.readouterr().err
