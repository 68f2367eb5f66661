"""``treeq quantize`` (model + plan -> artifact) and ``treeq sample`` (FP model or artifact -> image grid)."""
from __future__ import annotations

import argparse
import inspect
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

DEFAULT_LABELS = "0,1,2,3,4,5,6,7,8,9"
MODEL_HELP = "'digits' (the shipped digits DiT) or a DiT checkpoint (.pt/.pth/.safetensors)"


def load_fp_model(spec: str, config: str | None = None, device: str = "cpu"):
    """The full-precision DiT named by ``spec`` and a JSON-able description of how to rebuild it."""
    from ..models.digits import load_any_dit, load_digits_dit

    if spec == "digits":
        model = load_digits_dit(device=device)
    else:
        if not Path(spec).is_file():
            raise SystemExit(f"model {spec!r}: no such file ({MODEL_HELP})")
        model = load_any_dit(spec, config, device=device)
    return model, {"arch": "dit", "config": model.config.to_dict(), "source": spec}


def parse_wa(label: str) -> tuple[int, int]:
    """``plan.parse_wa`` for the command line (a clear exit instead of a traceback)."""
    from ..plan import PlanError, parse_wa as parse

    try:
        return parse(label)
    except PlanError:
        raise SystemExit(f"expected a format like W4A8, got {label!r}") from None


def resolve_plan(model, plan_path: str | None, uniform: str | None, name: str):
    from ..plan import QuantPlan

    if (plan_path is None) == (uniform is None):
        raise SystemExit("give exactly one of --plan PLAN.json, --uniform WxAy or --ptq DIR")
    if plan_path is not None:
        plan = QuantPlan.load(plan_path)
        plan.validate(model)   # names the layers the model lacks before anything reads them
        return plan
    assert uniform is not None   # (exactly one of the two: checked above)
    w, a = parse_wa(uniform)
    return QuantPlan.block_uniform(model, w, a, model_name=name, pointwise_convs=True)   # (all it packs)


def add_quantize_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="digits", help=MODEL_HELP)
    p.add_argument("--config", default=None, help="DiT config name for a checkpoint (default: inferred)")
    p.add_argument("--diffusers", default=None, metavar="PATH",
                   help="instead of --model: a local diffusers transformer (or pipeline) directory, with --uniform or "
                        "--plan, or with --ptq where the search cuts it (the README's table of models says which)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="with --diffusers: the dtype the model loads in before packing (default float32; bfloat16 "
                        "halves the memory a large model needs; an fp32 checkpoint's weights are then rounded to bf16 "
                        "before they are quantized, and its unquantized parameters are stored in bf16); with --ptq "
                        "leave it out: the model loads in the dtype `treeq ptq --dtype` recorded")
    p.add_argument("--plan", default=None, help="a plan JSON (from `treeq search`)")
    p.add_argument("--uniform", default=None, help="instead of --plan: block linears at WxAy, edges at W8A8")
    p.add_argument("--ptq", default=None, help="instead of --plan: a `treeq ptq` directory (calibrated weights, "
                                               "clips, branches; made from --model)")
    p.add_argument("--peft", default=None, help="with --ptq: a `treeq peft` directory (fine-tuned branches, LoRA)")
    p.add_argument("--out", required=True, help="artifact directory to write (new or empty)")
    p.add_argument("--overwrite", action="store_true", help="replace an artifact already in --out")


def run_quantize(args: argparse.Namespace) -> int:
    from . import artifact
    from .convert import fusion_report, memory_report, quantize

    for flag, given in (("--model", args.model), ("--plan", args.plan)):   # (before anything loads; --overwrite too)
        if given and Path(given).name in artifact.ARTIFACT_FILES and \
                Path(given).resolve().parent == Path(args.out).resolve():
            raise SystemExit(f"{flag} {given} lies in --out {args.out}, where the artifact would write over it")
    try:
        artifact.check_out(args.out, args.overwrite)
    except artifact.ArtifactError as e:
        raise SystemExit(f"--out {e}") from None
    if args.diffusers:
        from ..models.diffusers_transformers import load_transformer

        if args.model != "digits" or args.config:
            raise SystemExit("--diffusers names the model: give it without --model / --config")
        if args.ptq and args.dtype is not None:
            raise SystemExit("--dtype: a --ptq calibration loads the model in the dtype it was calibrated in "
                             "(`treeq ptq --dtype`); give it without --dtype")
        dtype = getattr(torch, args.dtype or "float32")
        if args.ptq:
            from ..calib.ptq import diffusers_dtype

            dtype = diffusers_dtype(args.ptq)
        try:   # a calibration (--ptq) exists for the searched classes only; a plan packs any diffusers model
            model, desc = load_transformer(args.diffusers, dtype)
        except (ValueError, ImportError) as e:
            raise SystemExit(f"treeq quantize: {e}") from None
    else:
        if args.dtype is not None:
            raise SystemExit("--dtype is for --diffusers models (ours load in float32)")
        model, desc = load_fp_model(args.model, args.config)
    if args.peft and not args.ptq:
        raise SystemExit("--peft needs the --ptq directory it was fine-tuned from")
    if args.ptq:
        if args.plan or args.uniform:
            raise SystemExit("--ptq brings its own plan: give it without --plan / --uniform")
        from ..calib.peft import load_finetuned
        from ..calib.ptq import diffusers_source, load_calibration

        made_with = diffusers_source(args.ptq)
        if made_with is not None and not args.diffusers:
            raise SystemExit(f"--ptq {args.ptq} was calibrated on the diffusers model {made_with}: pass "
                             f"--diffusers {made_with}")
        from ..calib.store import not_a_run

        for flag, d in (("--ptq", args.ptq), ("--peft", args.peft)):
            why = None if d is None else not_a_run(d, flag[2:])
            if why:
                raise SystemExit(f"{flag} {d}: expected a `treeq {flag[2:]}` output directory; {why}")
        if args.peft:   # before anything loads: a run fine-tuned from another calibration packs garbage
            from ..calib.peft import check_made_from

            check_made_from(args.peft, args.ptq)
        plan = load_calibration(model, args.ptq)   # frozen calibrated codes, clips, branches, smoothing folds
        if args.peft:
            st = load_finetuned(model, args.peft)
            if st["step"] < st["config"]["steps"]:   # (a run stopped early is a valid model, but say so)
                print(f"treeq quantize: note: {args.peft} stopped at step {st['step']} of {st['config']['steps']}; "
                      "rerun `treeq peft` with the same --out to finish it", file=sys.stderr)
    else:
        plan = resolve_plan(model, args.plan, args.uniform, name=args.diffusers or args.model)
    from ..nn import packable_layers

    left = [n for n in packable_layers(model) if n not in plan.layers]
    if left:
        print(f"note: {len(left)} of the model's linears (or pointwise convolutions) are not in the plan and stay "
              f"in full precision, e.g. "
              f"{left[:3]}", file=sys.stderr)
    fp = artifact.fingerprint(model, plan)
    t0 = time.perf_counter()
    quantize(model, plan)
    out = artifact.save(model, plan, args.out, fp_fingerprint=fp, model_config=desc)
    rep = memory_report(model)
    print(f"packed {len(plan.layers)} layers in {time.perf_counter() - t0:.1f} s -> {out}")
    print(f"linear weights: {rep['packed_bytes'] / 2**20:.2f} MiB packed vs {rep['bf16_bytes'] / 2**20:.2f} MiB bf16 "
          f"({rep['ratio']:.3f}x)")
    print(describe_fusion(fusion_report(model)))
    return 0


def describe_fusion(report: dict) -> str:
    """``fusion_report``'s counts in a line: how many blocks run fused, of which classes, and how many layers with
    quantized activations run outside them (each quantizing its own input)."""
    blocks, outside = report["blocks"], report["outside"]
    if not blocks:
        return (f"fused blocks: none (no fused class handles this model's blocks, or nothing in them quantizes its "
                f"activations): each of the {report['packed']} layers with quantized activations quantizes its own "
                f"input")
    kinds = ", ".join(f"{c} {n}" for n, c in sorted(blocks.items()))
    e_g = f", e.g. {outside[:3]}" if outside else ""
    return (f"fused blocks: {sum(blocks.values())} ({kinds}); {len(outside)} of the {report['packed']} layers with "
            f"quantized activations run outside them, each quantizing its own input{e_g}")


def load_artifact_model(path: str, device: str = "cpu"):
    """Rebuild the model an artifact was made from (its manifest's config) and load the artifact into it."""
    from ..models import DiT, DiTConfig
    from . import artifact

    man = artifact.read_manifest(path)
    desc = man.get("model_config", {})
    if desc.get("arch") == "diffusers":
        raise artifact.ArtifactError(f"{path}: a diffusers {desc.get('class')} artifact; sample it in its pipeline: "
                                     f"treeq sample --pipeline DIR --artifact {path} (DIR: the pipeline the "
                                     "transformer came from)")
    if desc.get("arch") != "dit":
        raise artifact.ArtifactError(f"{path}: `treeq sample` rebuilds DiT artifacts only, this one is "
                                     f"{desc.get('arch')!r}")
    if not isinstance(desc.get("config"), dict):
        raise artifact.ArtifactError(f"{path}/manifest.json: model_config holds no DiT config (a JSON object)")
    try:
        with torch.device("meta"):
            model = DiT(DiTConfig.from_dict(desc["config"]))
    except (TypeError, ValueError) as e:
        raise artifact.ArtifactError(f"{path}/manifest.json: its DiT config is not valid: {e}") from None
    model = model.to_empty(device=device)
    return artifact.load(path, model, map_location=device).eval()


def add_sample_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="digits", help=MODEL_HELP + " (ignored with --artifact)")
    p.add_argument("--config", default=None, help="DiT config name for a checkpoint (default: inferred)")
    p.add_argument("--artifact", default=None, help="a quantized artifact directory (from `treeq quantize`)")
    p.add_argument("--artifact-2", default=None, metavar="DIR",
                   help="with a two-expert --pipeline (Wan 2.2 A14B): the artifact of its transformer_2 (the "
                        "low-noise expert; --artifact replaces transformer, the high-noise one)")
    p.add_argument("--pipeline", default=None, metavar="DIR",
                   help="sample a local diffusers pipeline with a transformer (DiT, PixArt, SD3, Flux, Wan, Sana, ...; "
                        "with --artifact: its transformer replaced by the quantized one from `treeq quantize "
                        "--diffusers`)")
    p.add_argument("--prompts", default=None,
                   help="with a text-to-image --pipeline: a text file, one prompt per line")
    p.add_argument("--images", default=None, metavar="FILE",
                   help="with an image-conditioned --pipeline (image to video, editing, FLUX.2's references): a text "
                        "file, one line per prompt with the paths of its images (comma-separated where it takes "
                        "several); each prompt runs alone")
    p.add_argument("--height", type=int, default=None, help="with --pipeline: image height (default: the pipeline's)")
    p.add_argument("--width", type=int, default=None, help="with --pipeline: image width (default: the pipeline's)")
    p.add_argument("--frames", type=int, default=None,
                   help="with a text-to-video --pipeline (Wan, ...): frames per video (default: the pipeline's)")
    p.add_argument("--labels", default=DEFAULT_LABELS, help="comma-separated class labels")
    p.add_argument("--steps", default="50", help="sampling steps (or 'ddimN')")
    p.add_argument("--sampler", choices=("ddpm", "ddim"), default="ddpm")
    p.add_argument("--cfg", type=float, default=None,
                   help="classifier-free guidance scale (1 = none; default: 1.5 for our DiT, the pipeline's own "
                        "default for a --pipeline)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="with --pipeline: the dtype the pipeline loads in (bfloat16 for large models)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--graph", action="store_true", help="replay each denoising step as a CUDA graph")
    p.add_argument("--compile", default=None, metavar="MODE", choices=COMPILE_MODES,
                   help="run the (quantized) model under torch.compile in this mode: default, reduce-overhead (with "
                        "torch's own CUDA graphs; instead of --graph), max-autotune, max-autotune-no-cudagraphs. "
                        "The first step compiles (seconds to minutes: the 'seconds' printed include it)")
    p.add_argument("--compile-backend", default="inductor",
                   help="with --compile: torch.compile's backend (inductor; aot_eager or eager to check a model "
                        "traces without compiling code)")
    p.add_argument("--out", default="samples.png",
                   help="PNG grid (latent models also write a .pt of latents); a video pipeline writes one row of "
                        "frames per video, or, to a .gif or .webp name, an animation of the videos side by side")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's choice; 1 is faster on a busy machine)")


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _check_compile(args: argparse.Namespace) -> None:
    if args.compile is None:
        if args.compile_backend != "inductor":
            raise SystemExit("--compile-backend goes with --compile MODE")
        return
    if args.graph:
        raise SystemExit("--graph and --compile both capture CUDA graphs: use --compile reduce-overhead (torch's "
                         "own graphs of the compiled model) or --graph alone")
    import torch._dynamo

    if args.compile_backend not in torch._dynamo.list_backends(exclude_tags=()):
        raise SystemExit(f"--compile-backend {args.compile_backend!r} is not a torch.compile backend here (try "
                         "inductor, aot_eager or eager)")


def _compile(model: torch.nn.Module, args: argparse.Namespace) -> None:
    """Compile ``model`` in place (``nn.Module.compile``: the module keeps its class and attributes, which the
    samplers and diffusers' pipelines read). The packed layers and the fused blocks trace without a graph break
    (docs/runtime.md, torch.compile)."""
    model.compile(mode=None if args.compile == "default" else args.compile, backend=args.compile_backend)


def run_sample(args: argparse.Namespace) -> int:
    from ..demo import save_grid
    from ..models import sample

    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    _check_compile(args)
    out = Path(args.out)
    if out.is_dir() or not out.name:   # (checked before the model loads and samples, not after)
        raise SystemExit(f"--out {args.out!r}: a directory; name an image file (e.g. samples.png)")
    if out.suffix.lower() not in IMAGE_SUFFIXES + ANIMATIONS:
        raise SystemExit(f"--out {args.out}: {out.suffix or 'no extension'} is no image type; write a .png (or "
                         f"{', '.join(IMAGE_SUFFIXES[1:])}; for a video pipeline {' or '.join(ANIMATIONS)})")
    if args.pipeline:
        return _sample_pipeline(args)
    if args.artifact_2:
        raise SystemExit("--artifact-2 is a two-expert --pipeline's second transformer (Wan 2.2 A14B)")
    from ..models.diffusion import create_diffusion

    try:   # (before the model loads; the sampler's words for it are respacing's)
        create_diffusion(args.steps)
    except ValueError as e:
        raise SystemExit(f"--steps {args.steps!r}: a positive number of steps, or 'ddimN' ({e})") from None
    if args.artifact:
        model = load_artifact_model(args.artifact, args.device)
    else:
        model = load_fp_model(args.model, args.config, args.device)[0]
    try:
        labels = torch.tensor([int(v) for v in args.labels.split(",") if v.strip()])
    except ValueError:
        raise SystemExit(f"--labels must be comma-separated integers, got {args.labels!r}") from None
    classes = model.config.num_classes
    if labels.numel() == 0 or int(labels.min()) < 0 or int(labels.max()) >= classes:
        raise SystemExit(f"--labels must be class indices in [0, {classes - 1}], got {args.labels!r}")
    if args.graph and not str(args.device).startswith("cuda"):
        raise SystemExit("--graph replays CUDA graphs: it needs --device cuda")
    if args.graph:
        from .graphed_dit import GraphedDiT

        model = GraphedDiT(model)
    if args.compile:
        _compile(model, args)
    t0 = time.perf_counter()
    if args.dtype != "float32":
        raise SystemExit("--dtype is for --pipeline (our DiT samples in float32)")
    imgs = sample(model, labels, steps=args.steps, sampler=args.sampler,
                  cfg_scale=1.5 if args.cfg is None else args.cfg, seed=args.seed,
                  progress=True).float().cpu()
    secs = time.perf_counter() - t0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if imgs.shape[1] == 1:
        save_grid({"samples": imgs}, out, columns=len(labels))
    else:  # latents: no VAE ships with the project; save them, and preview their first channel
        torch.save(imgs, out.with_suffix(".pt"))
        save_grid({"latent[0]": (imgs[:, :1] / imgs[:, :1].abs().amax().clamp(min=1e-6))}, out, columns=len(labels))
    print(json.dumps({"out": str(out), "samples": len(labels), "seconds": round(secs, 2),
                      "quantized": bool(args.artifact), "device": args.device,
                      **({"compile": args.compile} if args.compile else {})}))
    return 0


ANIMATIONS = (".gif", ".webp")   # what --out may name for a video pipeline
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")   # a grid of samples (PIL writes them)


def _row(images: list[Any]) -> Any:
    """PIL images side by side, each at its own size (an image-conditioned pipeline sizes each output from its
    input), on white."""
    from PIL import Image

    row = Image.new("RGB", (sum(im.width for im in images), max(im.height for im in images)), color="white")
    x = 0
    for im in images:
        row.paste(im.convert("RGB"), (x, 0))
        x += im.width
    return row


def _sample_pipeline(args: argparse.Namespace) -> int:
    """``treeq sample --pipeline DIR [--artifact ART] [--artifact-2 ART2]``: the pipeline samples as it would, its
    transformer (and a two-expert pipeline's transformer_2) the FP one or the artifact's; one row of images into
    ``--out``."""
    from PIL import Image

    from ..models.diffusers_transformers import (EXPERTS, area_kwargs, class_of, experts, guidance_kwargs,
                                                 load_pipeline, pipeline_class, pipeline_refusal, read_images,
                                                 read_prompts, steps_kwargs, transformer_dir)
    from . import artifact
    from .graphed_diffusers import graph_count

    try:
        import diffusers  # noqa: F401  (missing: a clear error before anything loads)

        config = json.loads((transformer_dir(args.pipeline) / "config.json").read_text())
    except (ValueError, ImportError) as e:
        raise SystemExit(f"treeq sample: {e}") from None
    name = class_of(config)
    dit = name == "DiTTransformer2DModel"   # class-conditional; the others take prompts
    if not dit and args.labels != DEFAULT_LABELS:
        raise SystemExit(f"a text-to-image pipeline ({name}) samples --prompts, not --labels")
    if dit and (args.prompts or args.images):
        raise SystemExit("a DiT pipeline samples --labels, not --prompts or --images")
    for side in ("height", "width"):
        if getattr(args, side) is not None and getattr(args, side) < 1:
            raise SystemExit(f"--{side} must be a positive number of pixels, got {getattr(args, side)}")
    if args.frames is not None and args.frames < 1:
        raise SystemExit(f"--frames must be a positive number of frames, got {args.frames}")
    if not (Path(args.pipeline) / "model_index.json").is_file():
        raise SystemExit(f"treeq sample: --pipeline {args.pipeline} is not a pipeline directory (no model_index.json)")
    refusal = pipeline_refusal(args.pipeline, "treeq sample", one_transformer=False, images=bool(args.images))
    if refusal:
        raise SystemExit(f"treeq sample: {refusal}")
    if args.sampler != "ddpm":
        raise SystemExit("--sampler is our DiT's sampler; a diffusers pipeline runs its own scheduler")
    if args.graph and not str(args.device).startswith("cuda"):
        raise SystemExit("--graph replays CUDA graphs: it needs --device cuda")
    try:
        steps = int(args.steps)
    except ValueError:
        steps = 0
    if steps < 1:
        raise SystemExit(f"--steps for a pipeline is a positive number of steps, got {args.steps!r}")
    images = None
    if args.images:   # (read before the pipeline loads: a bad file fails fast)
        if not args.prompts:
            raise SystemExit("treeq sample: --images goes with --prompts FILE (a line of images per prompt)")
        try:
            images = read_images(args.images, len(read_prompts(args.prompts)),
                                 pipeline_class(args.pipeline, images=True))
        except (ValueError, OSError) as e:
            raise SystemExit(f"treeq sample: --images: {e}") from None
    pipe = load_pipeline(args.pipeline, getattr(torch, args.dtype), device=args.device,
                         images=bool(args.images))
    video = "num_frames" in inspect.signature(pipe.__call__).parameters
    if args.frames is not None and not video:
        raise SystemExit(f"--frames is for a text-to-video pipeline; {type(pipe).__name__} makes images")
    if Path(args.out).suffix.lower() in ANIMATIONS and not video:
        raise SystemExit(f"--out {args.out}: an animation is for a video pipeline; {type(pipe).__name__} makes "
                         "images (write a .png)")
    replaced = [(n, o, a) for n, o, a in zip(EXPERTS, ("--artifact", "--artifact-2"), (args.artifact, args.artifact_2))
                if a]
    for component, option, path in replaced:
        model = getattr(pipe, component, None)
        if not isinstance(model, torch.nn.Module):
            raise SystemExit(f"{option} {path}: {type(pipe).__name__} has no {component}")
        desc = artifact.read_manifest(path).get("model_config", {})
        if desc.get("arch") != "diffusers" or desc.get("class") != type(model).__name__:
            raise SystemExit(f"{path}: made from {desc.get('class') or desc.get('arch')!r}, the pipeline's "
                             f"{component} is {type(model).__name__}")
        made_from = Path(str(desc.get("source") or "")).name   # (two experts share class and config: their folders)
        if getattr(pipe, "transformer_2", None) is not None and made_from in EXPERTS and made_from != component:
            raise SystemExit(f"{option} {path}: made from the pipeline's {made_from}, given for its {component} (the "
                             "high-noise expert is transformer, --artifact; the low-noise one transformer_2, "
                             "--artifact-2)")
        # loaded into the pipeline's own transformer (the artifact replaces every tensor, after checking that the
        # shapes are this architecture's): no second full-precision copy of a large model
        setattr(pipe, component, artifact.load(path, model, map_location=args.device).eval())
    if args.graph:   # each call shape captured once, every later step a replay (runtime/graphed_diffusers.py)
        from .graphed_diffusers import graph_pipeline

        graph_pipeline(pipe)
    if args.compile:
        for m in experts(pipe):
            _compile(m, args)
    g = torch.Generator(device="cpu").manual_seed(args.seed)
    kw = {**steps_kwargs(pipe, steps), "generator": g, "output_type": "pil"}
    if args.cfg is not None:   # (else the pipeline's own default: Flux's distilled guidance is not PixArt's)
        kw.update(guidance_kwargs(pipe, args.cfg))
    kw.update({side: getattr(args, side) for side in ("height", "width") if getattr(args, side) is not None})
    kw.update(area_kwargs(pipe, kw))
    if args.frames is not None:
        kw["num_frames"] = args.frames
    if dit:
        if "height" in kw or "width" in kw:
            raise SystemExit("a DiT pipeline samples at its transformer's size: give it without --height / --width")
        try:
            labels = [int(v) for v in args.labels.split(",") if v.strip()]
        except ValueError:
            raise SystemExit(f"--labels must be comma-separated integers, got {args.labels!r}") from None
        classes = int(pipe.transformer.config.num_embeds_ada_norm)
        if not labels or min(labels) < 0 or max(labels) >= classes:
            raise SystemExit(f"--labels must be class indices in [0, {classes - 1}], got {args.labels!r}")
        what: list = labels
        kw["class_labels"] = labels
    else:
        if not args.prompts:
            raise SystemExit(f"a text-to-image pipeline ({name}) samples --prompts FILE (one prompt per line)")
        try:
            what = read_prompts(args.prompts)
        except OSError as e:
            raise SystemExit(f"treeq sample: --prompts: {e}") from None
        if not what:
            raise SystemExit(f"treeq sample: {args.prompts} holds no prompts")
        kw["prompt"] = what
    calls = [kw]
    if images is not None:   # one run per prompt, with its images
        calls = [{**kw, "prompt": p, "image": im} for p, im in zip(what, images)]
    t0 = time.perf_counter()
    with torch.no_grad():
        results = [pipe(**c) for c in calls]
    secs = time.perf_counter() - t0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if video:   # a video: its frames in a row
        rows = [list(v) for r in results for v in r.frames]
    else:
        rows = [[im for r in results for im in r.images]]
    if out.suffix.lower() in ANIMATIONS:   # frame t of every video side by side, one animation frame per t
        grids = [_row([v[t] for v in rows]) for t in range(len(rows[0]))]
        grids[0].save(out, save_all=True, append_images=grids[1:], duration=1000 // 16, loop=0)
    else:
        strips = [_row(r) for r in rows]
        grid = Image.new("RGB", (max(g.width for g in strips), sum(g.height for g in strips)), color="white")
        y = 0
        for g in strips:
            grid.paste(g, (0, y))
            y += g.height
        grid.save(out)
    print(json.dumps({"out": str(out), "samples": len(rows) if video else len(rows[0]), "seconds": round(secs, 2),
                      **({"frames": len(rows[0])} if video else {}),
                      "quantized": bool(replaced), "graphs": sum(graph_count(m) for m in experts(pipe)),
                      "device": args.device, **({"compile": args.compile} if args.compile else {}),
                      "pipeline": args.pipeline}))
    return 0
