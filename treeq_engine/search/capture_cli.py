"""``treeq capture``: run a local diffusers pipeline whose transformer the search cuts (the README's table of models
says which) and record its transformer's calls as the calibration inputs of ``treeq search --diffusers`` (and
``treeq ptq`` / ``peft``).

    treeq capture --pipeline models/DiT-XL-2-256 --labels 207,360,387,974,88,979,417,279 --steps 25 \\
        --timesteps 8 --out calib.safetensors
    treeq capture --pipeline models/PixArt-XL-2-512x512 --prompts prompts.txt --steps 20 --out calib.safetensors
    treeq search --diffusers models/PixArt-XL-2-512x512 --calib-inputs calib.safetensors --budget W4A8 --out out/px
    treeq capture --pipeline models/FLUX.1-dev --prompts prompts.txt --steps 28 --height 512 --width 512 \\
        --out flux.safetensors
    treeq capture --pipeline models/Wan2.1-T2V-1.3B --prompts prompts.txt --steps 30 --height 240 --width 416 \\
        --frames 17 --batch 1 --out wan.safetensors
    treeq capture --pipeline models/Qwen-Image-Edit-2509 --prompts edits.txt --images images.txt --steps 40 \\
        --cfg 4.0 --out edit.safetensors
    treeq capture --pipeline models/Wan2.2-T2V-A14B --transformer transformer_2 --prompts prompts.txt --steps 40 \\
        --height 240 --width 416 --frames 17 --batch 1 --out wan-low.safetensors

A pipeline that denoises with two experts (Wan 2.2 A14B: ``transformer`` above its boundary timestep,
``transformer_2`` below) runs whole, and ``--transformer`` names the expert whose calls are recorded: each expert
is searched, calibrated and packed on its own (``--diffusers DIR/transformer_2``); ``treeq sample`` takes both
artifacts (``--artifact``, ``--artifact-2``). The timesteps kept are the expert's own.

An image-conditioned pipeline (image to video, editing, FLUX.2's reference images) takes ``--images FILE``: one
line per prompt with the paths of its images (comma-separated where the pipeline takes several), and runs one
prompt at a time.

Each pipeline run samples as it normally would (its scheduler, guidance and resolution); of the distinct timesteps
it visits, ``--timesteps`` evenly spaced ones are kept (first and last included), with every sample of the batch
(both halves under classifier-free guidance: the guided model sees both). The file also holds the scheduler's
sampler weights ``c(t)²``, measured on its own step (``diffusers_schedule``): the search's default metric and
PEFT's ``--loss-weights sampler``; a scheduler without them (flow matching: SD3, Flux) is noted, and the metric is
the plain MSE of the prediction. Flux's pipeline passes the transformer its timesteps divided by 1000 (in its
dtype), and a scheduler with dynamic shifting (FLUX.1-dev's) moves its schedule by resolution, so for those the
timesteps are chosen from the first run's calls (every run has one resolution) and the later runs keep only
calls at them. Nothing is downloaded.
"""
from __future__ import annotations

import argparse
import inspect
import sys
from pathlib import Path

import torch

from ..models.diffusers_transformers import EXPERTS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pipeline", required=True,
                   help="a local diffusers pipeline directory (its transformer one the search cuts: the README's table "
                        "of models)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--labels", default=None, help="DiT: comma-separated class labels, one sample each")
    what.add_argument("--prompts", default=None,
                      help="a text-conditioned pipeline (all but DiT): a text file, one prompt per line")
    p.add_argument("--images", default=None, metavar="FILE",
                   help="an image-conditioned pipeline (image to video, editing, FLUX.2's references): a text file, "
                        "one line per prompt with the paths of its images (comma-separated where it takes several); "
                        "each prompt then runs alone")
    p.add_argument("--steps", type=int, default=25, help="sampling steps per run")
    p.add_argument("--timesteps", type=int, default=8, help="distinct timesteps kept (evenly spaced)")
    p.add_argument("--cfg", type=float, default=None, help="guidance scale (default: the pipeline's)")
    p.add_argument("--height", type=int, default=None, help="text-to-image: image height (default: the pipeline's)")
    p.add_argument("--width", type=int, default=None, help="text-to-image: image width (default: the pipeline's)")
    p.add_argument("--frames", type=int, default=None,
                   help="text-to-video (Wan, LTX-Video): frames per video (default: the pipeline's, 81 for Wan, 161 "
                        "for LTX-Video: large)")
    p.add_argument("--transformer", default=None, choices=EXPERTS,
                   help="a two-expert pipeline (Wan 2.2 A14B): the expert whose calls are recorded")
    p.add_argument("--batch", type=int, default=8, help="labels or prompts per pipeline run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--out", required=True, help="safetensors file to write")


def run(args: argparse.Namespace) -> int:
    from ..models.diffusers_transformers import (area_kwargs, expert_timesteps, guidance_kwargs, load_pipeline,
                                                 pipeline_class, pipeline_refusal, read_images, read_prompts,
                                                 steps_kwargs, transformer_dir)
    from .diffusers_runner import (capture_calls, check_stored, make_runner, save_inputs,
                                   select_timesteps, stack_inputs)
    from .evaluator import sample_timesteps

    try:
        expert = args.transformer or "transformer"
        transformer_dir(Path(args.pipeline) / expert if args.transformer else args.pipeline)
        if args.images is not None and args.labels is not None:
            raise ValueError("--images goes with --prompts: a class-conditioned pipeline takes no image")
        refusal = pipeline_refusal(args.pipeline, "treeq capture", images=args.images is not None,
                                   one_transformer=args.transformer is None,
                                   choose="give --transformer transformer or transformer_2 (each expert's calls make "
                                          "a calibration file of their own)")
        if refusal:
            raise ValueError(refusal)
        if Path(args.out).is_dir():
            raise ValueError(f"--out {args.out} is a directory; the calibration inputs are a .safetensors file")
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)   # (before the pipeline runs, not after)

        if args.labels is not None:
            try:
                items: list = [int(v) for v in args.labels.split(",") if v.strip()]
            except ValueError:
                raise ValueError(f"--labels must be comma-separated class indices, got {args.labels!r}") from None
        else:
            items = read_prompts(args.prompts)
        if not items:
            raise ValueError("no labels or prompts given")
        if args.steps <= 0 or args.batch <= 0:
            raise ValueError(f"--steps and --batch must be positive, got {args.steps}, {args.batch}")
        if args.timesteps <= 0:
            raise ValueError(f"--timesteps must be positive, got {args.timesteps}")
        size = {side: getattr(args, side) for side in ("height", "width") if getattr(args, side) is not None}
        if any(v <= 0 for v in size.values()):
            raise ValueError(f"--height and --width must be positive numbers of pixels, got {size}")
        if args.frames is not None and args.frames <= 0:
            raise ValueError(f"--frames must be a positive number of frames, got {args.frames}")
        images: list | None = None
        if args.images is not None:   # (read before the pipeline loads: a bad file fails fast)
            images = read_images(args.images, len(items), pipeline_class(args.pipeline, images=True))
            if args.batch != 1:
                print("treeq capture: note: --images: each prompt runs alone", file=sys.stderr)
        pipe = load_pipeline(args.pipeline, getattr(torch, args.dtype), args.device, images=args.images is not None)
        model = getattr(pipe, expert, None)
        if not isinstance(model, torch.nn.Module):
            raise ValueError(f"--transformer {expert}: {type(pipe).__name__} has none")
        runner = make_runner(model)
        if (args.labels is not None) != (runner.arch == "dit"):
            raise ValueError(f"a {runner.arch} pipeline takes {'--labels' if runner.arch == 'dit' else '--prompts'}")
        if size and runner.arch == "dit":
            raise ValueError("a DiT pipeline samples at its transformer's size: give it without --height / --width")
        if runner.arch == "dit":
            classes = int(model.config.num_embeds_ada_norm)
            bad = [v for v in items if not 0 <= v < classes]
            if bad:
                raise ValueError(f"class labels must be in [0, {classes - 1}], got {bad[:5]}")
        if args.frames is not None and "num_frames" not in inspect.signature(pipe.__call__).parameters:
            raise ValueError(f"--frames is for a text-to-video pipeline; {type(pipe).__name__} makes images")
        kw: dict = {} if args.cfg is None else guidance_kwargs(pipe, args.cfg)
        kw.update(size)
        kw.update(area_kwargs(pipe, kw))
        if args.frames is not None:
            kw["num_frames"] = args.frames
        # the timesteps to keep, from the pipeline's scheduler (the values its runs will visit): calls at the
        # others are not stored, so a long capture holds only what it keeps
        from .diffusers_schedule import scheduler_weights

        try:   # each timestep's step factor c(t)², measured on the scheduler: the sampler weights
            extra = pipe.prepare_extra_step_kwargs(None, 0.0) if hasattr(pipe, "prepare_extra_step_kwargs") else {}
            weights: dict[float, float] | None = scheduler_weights(pipe.scheduler, args.steps, step_kwargs=extra)
        except ValueError as e:
            weights = None
            print(f"treeq capture: note: no sampler weights ({e}); the search takes the plain MSE of the prediction",
                  file=sys.stderr)
        if args.timesteps > args.steps:
            print(f"treeq capture: note: --timesteps {args.timesteps} > --steps {args.steps}: every step's calls are "
                  "kept", file=sys.stderr)
        keep: list[float] | None = None
        shifting = bool(getattr(getattr(pipe.scheduler, "config", None), "use_dynamic_shifting", False))
        if runner.scheduler_timesteps and not shifting:   # (module docstring: else chosen from the first run's calls)
            pipe.scheduler.set_timesteps(args.steps)
            schedule = expert_timesteps(pipe, expert, pipe.scheduler.timesteps.tolist())
            if not schedule:
                raise ValueError(f"none of the {args.steps} steps' timesteps fall to {expert}: give more --steps")
            keep = select_timesteps(schedule, min(args.timesteps, len(set(schedule))))
        from tqdm import tqdm

        capture = capture_calls(runner, keep=keep)
        batch = 1 if images is not None else args.batch
        with capture as calls:
            for i in tqdm(range(0, len(items), batch), desc="capture", unit="run", disable=None):
                chunk = items[i:i + batch]
                g = torch.Generator(device="cpu").manual_seed(args.seed + i)
                if runner.arch == "dit":
                    pipe(class_labels=chunk, generator=g, output_type="np", **steps_kwargs(pipe, args.steps), **kw)
                elif images is not None:
                    pipe(prompt=chunk[0], image=images[i], generator=g, output_type="latent",
                         **steps_kwargs(pipe, args.steps), **kw)
                    if i and calls.calls:   # (fail now, not after every run: one file holds calls of one shape)
                        try:
                            ragged = {runner.input_names.index(k): v for k, v in getattr(runner, "ragged", {}).items()}
                            check_stored(runner, stack_inputs([calls.calls[0], calls.calls[-1]], ragged))
                        except ValueError as e:
                            raise ValueError(f"prompt {i + 1}'s images give transformer calls unlike prompt 1's: "
                                             f"{e}. One calibration file holds calls of one shape: give images of "
                                             "one size (and count) per file") from None
                else:
                    pipe(prompt=chunk, generator=g, output_type="latent", **steps_kwargs(pipe, args.steps), **kw)
                if keep is None:   # every run visits the first run's timesteps (one resolution): choose now
                    if not calls.timesteps:
                        raise ValueError("the pipeline's first run made no transformer calls")
                    keep = select_timesteps(calls.timesteps, min(args.timesteps, len(set(calls.timesteps))))
                    capture.keep = set(keep)
                    chosen = [(c, t) for c, t in zip(calls.calls, calls.timesteps) if t in capture.keep]
                    calls.skipped += len(calls.calls) - len(chosen)
                    calls.calls, calls.timesteps = [c for c, _ in chosen], [t for _, t in chosen]
        if not calls.calls:
            raise ValueError(f"none of the pipeline's {calls.skipped} transformer calls came at the scheduler's "
                             f"timesteps {keep}: this pipeline passes timesteps another way")
        inputs = calls.inputs()
        save_inputs(args.out, runner, inputs, weights=weights, scheduler=pipe.scheduler)
    except (ValueError, ImportError, OSError) as e:
        print(f"treeq capture: error: {e}", file=sys.stderr)
        return 2
    shapes = ", ".join(f"{n} {tuple(t.shape)}" for n, t in zip(runner.input_names, inputs))
    print(f"{len(calls.calls) + calls.skipped} transformer calls, kept {inputs[0].shape[0]} samples at "
          f"{len(set(sample_timesteps(inputs[runner.input_names.index('timestep')]).tolist()))} timesteps -> "
          f"{args.out}: {shapes}"
          + ("" if weights is None else f"; sampler weights of {type(pipe.scheduler).__name__}"))
    return 0
