"""``treeq profile``: measure every (layer shape × format × tokens) on this machine's GPU into the latency lookup
table the search reads (schema ``treeq-latency-lut`` v1, see ``treeq_engine/search/costs.py``).

One entry times the whole quantized linear as the runtime runs it — activation quantization (with the Monarch
stage 1 where there is a branch) plus the packed GEMM with its epilogue, the weight in the layout the runtime holds
on that device — replayed as a CUDA graph of many calls (launch latency amortized) that rotate over copies of the
weights, up to 128 of them or twice an H100's L2 (a model streams its weights from HBM; one layer replayed alone
would keep them in L2; the smallest layers' copies still fit in L2); W16A16 entries time the bf16 ``F.linear``
the same way. Not seen: the fused DiT blocks' LayerNorm + modulate (inside qkv's and fc1's quantization kernel)
and GELU (in fc1's epilogue); callers comparing with a model account for those (``benchmarks/latency_budget.py``).

By default the table holds exactly what a search over the model needs: every linear at its own rows per image ×
each ``--batch`` (adaLN and the embedders run one row per image, the others every token), at W16A16, W8A8 (the
fixed layers) and every candidate format of the search. For a diffusers transformer the search cuts (``--diffusers
DIR --calib-inputs FILE``) the rows per image are those of the calibration file the search reads, found by one forward of a weightless (meta-device) copy through the search's
runner. Timings on a CPU are written too (useful only to test the pipeline), marked with the device.
"""
from __future__ import annotations

import argparse
import copy
import gc
import itertools
import json
import math
import platform
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
import torch.nn as nn
from tqdm import tqdm

from ..format import quantize as quantize_tensor
from ..plan import BranchConfig, LayerConfig, check_runnable
from .linear import TreeQLinear
from .timing import time_graph_ms

LUT_SCHEMA, LUT_VERSION = "treeq-latency-lut", 1
ROTATE_BYTES = 128 << 20   # weights rotated per timed graph: > 2× an H100's 50 MB L2
MAX_COPIES = 128


def layer_shapes(model: nn.Module, include=None) -> list[tuple[int, int]]:
    """Distinct ``(K, N)`` of the model's linears (optionally only names passing ``include``)."""
    from ..nn import quantizable_linears
    from ..nn.pointwise import layer_dims

    shapes = []
    for name in quantizable_linears(model, include=include):
        kn = layer_dims(model.get_submodule(name))
        if kn not in shapes:
            shapes.append(kn)
    return shapes


def diffusers_rows(path: str, calib_inputs: str, batches: Sequence[int], *,
                   device: str = "cpu") -> list[tuple[int, int, int]]:
    """Distinct ``(K, N, GEMM rows)`` of every linear the search prices for the diffusers transformer under
    ``path`` on the inputs of calibration file ``calib_inputs`` (its first sample's shapes), × each batch: one
    forward of a meta-device copy (no weights loaded, nothing computed) through the search's runner. A forward that
    reads values of its inputs (a mask's lengths: Lumina2, Mochi, HunyuanVideo 1.5), which meta tensors do not
    hold, runs instead on ``device`` with the architecture's weights all zero (built there in float32: about 4 bytes
    per parameter for the moment it runs; freed after): no checkpoint is read, and the shapes are the inputs'."""
    from ..models.diffusers_transformers import class_of, model_class, transformer_dir
    from ..search import make_runner
    from ..search.diffusers_runner import GENERIC_ATTR, load_inputs

    config = json.loads((transformer_dir(path) / "config.json").read_text())
    cls = model_class(class_of(config))
    assert cls is not None   # (transformer_dir checked it)
    with torch.device("meta"):
        model = cls.from_config(config)
    runner = make_runner(model)
    try:
        inputs = tuple(t.to("meta") for t in load_inputs(calib_inputs, runner, samples=1, shapes_only=True))
    except ValueError as e:
        if "on the meta device" not in str(e):
            raise
        try:
            with torch.device(device):
                model = _zeroed(cls.from_config(config))
            runner = make_runner(model)
            inputs = tuple(t.to(device) for t in load_inputs(calib_inputs, runner, samples=1, shapes_only=True))
            return _rows(model, runner, inputs, batches)
        except torch.OutOfMemoryError as oom:
            raise ValueError(f"{cls.__name__}'s forward reads its inputs' values, which the meta device does not "
                             f"hold, and its zero-weight copy does not fit {device} ({oom}); profile on a device with "
                             "room for it in float32") from None
        finally:   # (the runner lives on its model: a cycle; the zero-weight copy goes now, not at the next gc)
            model.__dict__.pop(GENERIC_ATTR, None)
            del model
            gc.collect()
            if torch.device(device).type == "cuda":
                torch.cuda.empty_cache()
    return _rows(model, runner, inputs, batches)


def _rows(model: nn.Module, runner: Any, inputs: tuple, batches: Sequence[int]) -> list[tuple[int, int, int]]:
    """``diffusers_rows``' count on a built model and its runner's inputs."""
    from ..search import SearchSpace
    from ..search.evaluator import run_segments

    per_image: set[tuple[int, int, int]] = set()
    # (a runner whose rows depend on values the meta device cannot hold, Z-Image's caption lengths, gives the
    # extremes: the search's rows then lie between two profiled ones)
    for shapes in getattr(runner, "shape_extremes", lambda x: [x])(inputs):
        space = SearchSpace.build(model, shapes, forward=lambda *xs: run_segments(runner, xs), fixed_config=None)
        per_image |= {(p.k, p.n, p.tokens) for leaf in space.leaves for p in leaf.parts} | \
            {(leaf.k, leaf.n, leaf.tokens) for leaf, _ in space.fixed}
    return sorted({(k, n, r * b) for k, n, r in per_image for b in batches})


def _zeroed(model: nn.Module) -> nn.Module:
    """``model`` with every parameter and buffer zero (deterministic; the shapes, not the values, are what the
    profile reads)."""
    with torch.no_grad():
        for t in itertools.chain(model.parameters(), model.buffers()):
            t.zero_()
    return model.eval()


def layer_rows(model: nn.Module, batches: Sequence[int]) -> list[tuple[int, int, int]]:
    """Distinct ``(K, N, GEMM rows)`` of every linear of a DiT-like ``model`` at each serving batch: its rows per
    image (from one forward on the meta device, nothing computed) × the batch."""
    from ..search import SearchSpace

    c = model.config
    with torch.device("meta"):   # the same architecture with no storage (no copy of a loaded checkpoint)
        meta = type(model)(c)
        x = torch.empty(1, c.in_channels, c.input_size, c.input_size)
        t, y = torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long)
    space = SearchSpace.build(meta, [x, t, y], fixed_config=None)
    per_image = {(p.k, p.n, p.tokens) for leaf in space.leaves for p in leaf.parts} | \
        {(leaf.k, leaf.n, leaf.tokens) for leaf, _ in space.fixed}
    return sorted({(k, n, r * b) for k, n, r in per_image for b in batches})


def _weight_bytes(mod: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in itertools.chain(mod.parameters(), mod.buffers()))


def time_linear(k: int, n: int, tokens: int, w_bits: int, a_bits: int, branch: BranchConfig | None, *,
                device: str, reps: int, gen: torch.Generator) -> float:
    """Median µs of one linear of this format on ``tokens`` rows, its weights cold in L2 (on a GPU)."""
    from .convert import set_layout

    x = torch.randn(tokens, k, generator=gen).to(device=device, dtype=torch.bfloat16)
    w = torch.randn(n, k, generator=gen) / k**0.5
    bias = torch.randn(n, generator=gen)
    if w_bits == 16:
        mod = nn.Linear(k, n).to(device=device, dtype=torch.bfloat16)
    else:
        cfg = LayerConfig(w_bits, a_bits, branch=branch)
        factors = None
        if branch is not None:
            from ..branches import MonarchShape

            shp = MonarchShape(n=n, k=k, blocks=branch.blocks, rank=branch.rank)
            factors = (torch.randn(shp.w1_shape, generator=gen) * 0.02,
                       torch.randn(shp.w2_shape, generator=gen) * 0.02)
        mod = TreeQLinear.from_weights(quantize_tensor(w, cfg.weight_spec()), cfg, bias, factors).to(device)
        set_layout(mod)   # as the runtime holds it on this device
    copies = 1
    if torch.device(device).type == "cuda":
        copies = max(1, min(MAX_COPIES, math.ceil(ROTATE_BYTES / max(1, _weight_bytes(mod)))))
    mods = [mod] + [copy.deepcopy(mod) for _ in range(copies - 1)]
    turn = itertools.cycle(mods)
    return 1e3 * time_graph_ms(lambda: next(turn)(x), reps=reps, calls=len(mods), device=device)


def backend_on(device: str) -> str:
    """The backend the packed GEMM dispatches to on ``device`` (what the table's timings measured)."""
    from ..kernels import PackedWeight, quantize_activation
    from ..kernels.ops import selected_backend
    from ..format import QuantSpec

    w = PackedWeight.from_float(torch.randn(64, 64), QuantSpec.weight(4)).to(device)
    act = quantize_activation(torch.randn(16, 64, device=device), QuantSpec.activation(8))
    return selected_backend("packed_linear", act, w)


def profile(shapes: Sequence[tuple[int, int]], formats: Iterable[tuple[int, int]], tokens: Sequence[int], *,
            branches: Sequence[BranchConfig | None] = (None,), device: str = "cuda", reps: int = 50,
            seed: int = 0, progress: bool = True) -> dict:
    """A table of every ``shapes × formats × tokens × branches`` (see :func:`profile_layers` for exactly the
    layers a model runs)."""
    return profile_layers([(k, n, m) for (k, n), m in itertools.product(shapes, tokens)], formats,
                          branches=branches, device=device, reps=reps, seed=seed, progress=progress)


def profile_layers(layers: Sequence[tuple[int, int, int]], formats: Iterable[tuple[int, int]], *,
                   branches: Sequence[BranchConfig | None] = (None,), device: str = "cuda", reps: int = 50,
                   seed: int = 0, progress: bool = True) -> dict:
    """A table of every ``(K, N, rows)`` of ``layers`` × ``formats`` × ``branches``."""
    gen = torch.Generator().manual_seed(seed)
    jobs = [(kn, f, br) for kn, f, br in itertools.product(sorted(set(layers)), list(dict.fromkeys(formats)),
                                                            branches) if not (f[0] == 16 and br is not None)]
    entries = []
    for (k, n, m), (wb, ab), br in tqdm(jobs, desc="profile", disable=not progress):
        us = time_linear(k, n, m, wb, ab, br, device=device, reps=reps, gen=gen)
        entries.append({"k": k, "n": n, "tokens": m, "w_bits": wb, "a_bits": ab,
                        "branch": None if br is None else {"kind": br.kind, "blocks": br.blocks, "rank": br.rank},
                        "us": round(us, 3)})
    dev = torch.device(device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({platform.processor() or 'host'})"
    return {"schema": LUT_SCHEMA, "version": LUT_VERSION, "device": name, "backend": backend_on(device),
            "entries": entries}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="digits", help="'digits' or a DiT checkpoint; its linear shapes are profiled")
    p.add_argument("--diffusers", default=None, metavar="DIR",
                   help="instead of --model: a diffusers transformer (or pipeline) directory the search cuts "
                        "(the README's table of models says which), its rows per image from --calib-inputs")
    p.add_argument("--calib-inputs", default=None, metavar="FILE",
                   help="with --diffusers: the calibration file the search reads (`treeq capture`)")
    p.add_argument("--config", default=None, help="DiT config name instead of a checkpoint (e.g. DiT-XL/2: random "
                                                  "weights, real shapes)")
    p.add_argument("--formats", default="search",
                   help="comma-separated WxAy formats, or 'search': W16A16, W8A8 and the search's candidates "
                        "(--w-bits × --a-bits)")
    p.add_argument("--w-bits", default="2,3,4,8", help="candidate weight bits (with --formats search)")
    p.add_argument("--a-bits", default="3,4,8", help="candidate activation bits (with --formats search)")
    p.add_argument("--batch", default="1,8", help="comma-separated serving batches (images per forward): each "
                   "linear is timed at its own rows per image × each batch (the search's --serve-batch)")
    p.add_argument("--tokens", default=None, help="instead of --batch: these GEMM row counts for every shape")
    p.add_argument("--branch", action="append", default=[], metavar="monarch:B:R|lowrank:R",
                   help="also profile with this branch (repeatable)")
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", required=True, help="latency table JSON to write")


def parse_branch(s: str) -> BranchConfig:
    parts = s.split(":")
    try:
        if parts[0] == "monarch" and len(parts) == 3:
            return BranchConfig("monarch", int(parts[1]), int(parts[2]))
        if parts[0] == "lowrank" and len(parts) == 2:
            return BranchConfig("lowrank", 1, int(parts[1]))
    except ValueError:
        pass
    raise SystemExit(f"--branch must be monarch:BLOCKS:RANK or lowrank:RANK, got {s!r}")


def _ints(text: str, flag: str) -> list[int]:
    try:
        vals = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise SystemExit(f"{flag} must be comma-separated integers, got {text!r}") from None
    if not vals or min(vals) <= 0:
        raise SystemExit(f"{flag} must list positive integers, got {text!r}")
    return vals


def run(args: argparse.Namespace) -> int:
    from .cli import load_fp_model, parse_wa

    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise SystemExit(f"--device {args.device!r} is not a torch device (cpu, cuda, cuda:1, ...)") from None
    if device.type not in ("cpu", "cuda"):
        raise SystemExit(f"--device {args.device!r}: profiling times the cpu or a cuda device")
    if args.diffusers and (args.config or args.model != "digits"):
        raise SystemExit("--diffusers names the model: give it without --model / --config")
    if bool(args.diffusers) != bool(args.calib_inputs):
        raise SystemExit("--diffusers and --calib-inputs go together (the file's shapes give the rows per image)")
    model = None   # (a diffusers model is built weightless where its rows are found: diffusers_rows)
    if args.config:
        from ..models import DiT, dit_config

        try:
            with torch.device("meta"):
                model = DiT(dit_config(args.config))
        except KeyError as e:   # (a KeyError's text prints in quotes)
            raise SystemExit(f"--config: {e.args[0] if e.args else e}") from None
    elif not args.diffusers:
        model = load_fp_model(args.model)[0]
    if args.formats == "search":
        from ..search.space import candidate_configs, parse_bits

        cands = candidate_configs(parse_bits(args.w_bits, "--w-bits"), parse_bits(args.a_bits, "--a-bits"))
        formats = [(16, 16), (8, 8)] + [(c.w_bits, c.a_bits) for c in cands]
    else:
        formats = [parse_wa(f) for f in args.formats.split(",") if f.strip()]
        if not formats:
            raise SystemExit(f"--formats lists no format (e.g. W4A8,W8A8, or 'search'), got {args.formats!r}")
        for w, a in formats:
            check_runnable(LayerConfig(w, a), "--formats")
    branches = list(dict.fromkeys([None] + [parse_branch(b) for b in args.branch]))   # (a repeat would be timed
    # twice, and the table refuses two timings of one GEMM)
    if args.diffusers:
        if args.tokens is not None:
            raise SystemExit("--tokens is for --model / --config; a diffusers model's rows come from --calib-inputs")
        try:
            layers = diffusers_rows(args.diffusers, args.calib_inputs, _ints(args.batch, "--batch"), device=args.device)
        except (ValueError, ImportError, FileNotFoundError) as e:
            raise SystemExit(f"treeq profile: {e}") from None
    elif args.tokens is not None:
        layers = [(k, n, m) for (k, n), m in itertools.product(layer_shapes(model), _ints(args.tokens, "--tokens"))]
    else:
        layers = layer_rows(model, _ints(args.batch, "--batch"))
    if Path(args.out).is_dir():
        raise SystemExit(f"--out {args.out} is a directory; the latency table is a JSON file (e.g. lut.json)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)   # (before profiling, not after)
    lut = profile_layers(layers, formats, branches=branches, device=args.device, reps=args.reps)
    Path(args.out).write_text(json.dumps(lut, indent=1) + "\n")
    print(f"wrote {len(lut['entries'])} entries for {lut['device']} ({lut['backend']} backend) to {args.out}")
    return 0
