"""diffusers transformers from local directories, for the command line (``--diffusers PATH``), and how an artifact
rebuilds one. Nothing is downloaded: ``PATH`` is a transformer directory (``config.json`` +
weights, as ``save_pretrained`` writes) or a pipeline directory holding one under ``transformer/``.

    model, desc = load_transformer("models/PixArt-XL-2-512x512", dtype=torch.float16)
    model = rebuild(desc)          # same architecture, random weights (an artifact then loads into it)
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

SUPPORTED = ("DiTTransformer2DModel", "PixArtTransformer2DModel")


def transformer_dir(path: str | Path) -> Path:
    """The directory whose ``config.json`` names a supported transformer class: ``path`` or ``path/transformer``."""
    p = Path(path)
    for d in (p, p / "transformer"):
        cfg = d / "config.json"
        if cfg.is_file():
            try:
                name = json.loads(cfg.read_text()).get("_class_name")
            except (json.JSONDecodeError, AttributeError):
                raise ValueError(f"{cfg}: not a diffusers config (unreadable JSON object)") from None
            if name in SUPPORTED:
                return d
            if d == p and name is not None and not (p / "transformer").is_dir():
                raise ValueError(f"{cfg}: {name} is not supported; TreeQ searches and packs {', '.join(SUPPORTED)}")
    raise ValueError(f"{path}: no diffusers transformer here (a directory with config.json naming one of "
                     f"{', '.join(SUPPORTED)}, or a pipeline directory with transformer/)")


def _diffusers() -> Any:
    try:
        import diffusers
    except ImportError:
        raise ImportError("--diffusers needs the diffusers package (pip install diffusers)") from None
    return diffusers


def load_transformer(path: str | Path, dtype: torch.dtype | None = None,
                     device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """The transformer under ``path`` (local files only) in eval mode, and a JSON-able description to rebuild it."""
    d = transformer_dir(path)
    name = json.loads((d / "config.json").read_text())["_class_name"]
    cls = getattr(_diffusers(), name)
    model = cls.from_pretrained(str(d), local_files_only=True).to(device, dtype).eval()   # cast after: see capture
    return model, describe(model, source=str(path))


def describe(model: nn.Module, source: str = "") -> dict[str, Any]:
    """What ``rebuild`` needs: the class and its config (JSON-able values only)."""
    name = type(model).__name__
    if name not in SUPPORTED:
        raise ValueError(f"{name} is not a supported diffusers transformer ({', '.join(SUPPORTED)})")
    config = {k: v for k, v in dict(model.config).items() if not k.startswith("_")}
    return {"arch": "diffusers", "class": name, "config": json.loads(json.dumps(config, default=list)),
            "source": source}


def rebuild(desc: dict[str, Any], device: str | torch.device = "cpu") -> nn.Module:
    """A fresh transformer of the described architecture (random weights)."""
    name = desc.get("class")
    if desc.get("arch") != "diffusers" or name not in SUPPORTED:
        raise ValueError(f"not a diffusers transformer description: arch {desc.get('arch')!r}, class {name!r}")
    with torch.device(device):
        return getattr(_diffusers(), name).from_config(desc["config"]).eval()
