"""What was built and what this machine can run: ``treeq_engine.build_info()``."""
from __future__ import annotations

import argparse
import importlib.util
import json
import platform
from typing import Any

import torch

from . import core
from .format import LAYOUT_VERSION


def build_info() -> dict[str, Any]:
    """C++ core, CUDA objects and their archs, Triton, and whether a CUDA device is present."""
    info: dict[str, Any] = {
        "version": _version(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "layout_version": LAYOUT_VERSION,
        "cxx_core": False,
        "cuda_built": False,
        "cuda_archs": [],
        "cuda_runtime_version": None,
        "cuda_device_count": 0,
        "cuda_device_name": None,
        "triton": None,
    }
    if core.available():
        c = core.load()
        b = c.build_info()
        info["cxx_core"] = bool(b["cxx"])
        info["cuda_built"] = bool(b["cuda"])
        info["cuda_archs"] = [a for a in str(b["cuda_archs"]).split(",") if a]
        info["core_source_digest"] = b.get("source_digest")
        stale = core.stale_reason()
        if stale:
            info["core_stale"] = stale
        if b["cuda"]:
            v = int(b["cuda_runtime_version"])
            info["cuda_runtime_version"] = f"{v // 1000}.{(v % 1000) // 10}"
            info["cuda_device_count"] = int(c.cuda_device_count())
            if info["cuda_device_count"]:
                info["cuda_device_name"] = c.cuda_device_name(0)
            elif torch.cuda.is_available():   # torch sees a GPU the core cannot use: say why (e.g. the driver is
                try:                          # older than the static CUDA runtime the core links)
                    c.cuda_check_runnable()
                except RuntimeError as e:
                    info["cuda_core_error"] = str(e)
    else:
        info["core_error"] = core._import()[1]
    if not info["cuda_device_count"] and torch.cuda.is_available():  # e.g. a CPU-only core on a GPU host
        info["cuda_device_count"] = torch.cuda.device_count()
        info["cuda_device_name"] = torch.cuda.get_device_name(0)
    if importlib.util.find_spec("triton") is not None:
        import triton

        info["triton"] = triton.__version__
    info["diffusers"] = _diffusers_support()
    return info


# what the other diffusers transformers get (search.generic_runner)
OTHERS = ("the other transformers packed, searched and calibrated where the generic cut takes them, "
          "and most of them fused (the README's table of models)")


def _diffusers_support() -> str | None:
    """The installed diffusers (read from its metadata: importing it costs seconds) and what TreeQ does with its
    transformers; None without it."""
    from importlib.metadata import PackageNotFoundError, version

    from .models.diffusers_transformers import SUPPORTED

    try:
        v = version("diffusers")
    except PackageNotFoundError:
        return None
    names = ", ".join(n.replace("Transformer2DModel", "").replace("Transformer3DModel", "") for n in SUPPORTED)
    names = names.replace("QwenImage", "Qwen-Image").replace("ZImage", "Z-Image").replace("Flux2", "FLUX.2").replace("LTXVideo", "LTX-Video")
    try:
        major, minor = (int(x) for x in v.split(".")[:2])
    except ValueError:
        major, minor = 0, 0
    if (major, minor) < (0, 35):   # runtime/mmdit_fused.py calls what 0.35 added
        return f"{v}: {names} searched and calibrated; DiT, PixArt and Sana fused (SD3, Flux, Wan, Qwen-Image " \
            "need diffusers >= 0.35); " + OTHERS
    if (major, minor) < (0, 39):   # runtime/qwen_fused.py builds the text mask as 0.39's processor does
        return f"{v}: {names} searched and calibrated, all but Qwen-Image fused (it needs diffusers >= 0.39); " \
            + OTHERS
    return f"{v}: {names} searched, calibrated and fused; " + OTHERS


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("treeq-engine")
    except PackageNotFoundError:
        return "0+unknown"


def add_cli_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON")


def run_cli(args: argparse.Namespace) -> int:
    info = build_info()
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for k, v in info.items():
            print(f"{k:22s} {v}")
    return 0
