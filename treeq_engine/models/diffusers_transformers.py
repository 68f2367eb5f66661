"""diffusers transformers from local directories, for the command line (``--diffusers PATH``), and how an artifact
rebuilds one. Nothing is downloaded: ``PATH`` is a transformer directory (``config.json`` +
weights, as ``save_pretrained`` writes) or a pipeline directory holding one under ``transformer/``.

    model, desc = load_transformer("models/PixArt-XL-2-512x512", dtype=torch.float16)
    model = rebuild(desc)          # same architecture, random weights (an artifact then loads into it)
"""
from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn as nn

SUPPORTED = ("DiTTransformer2DModel", "PixArtTransformer2DModel")
# the hub's DiT and PixArt-alpha checkpoints name the old generic class; diffusers remaps it by norm_type
LEGACY = {"Transformer2DModel": {"ada_norm_zero": "DiTTransformer2DModel",
                                 "ada_norm_single": "PixArtTransformer2DModel"}}


def _class_of(config: dict[str, Any]) -> str | None:
    name = config.get("_class_name")
    return LEGACY[name].get(config.get("norm_type")) if name in LEGACY else name


def transformer_dir(path: str | Path) -> Path:
    """The directory whose ``config.json`` names a supported transformer class: ``path`` or ``path/transformer``."""
    p = Path(path)
    for d in (p, p / "transformer"):
        cfg = d / "config.json"
        if cfg.is_file():
            try:
                config = json.loads(cfg.read_text())
                name = _class_of(config)
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
    cls = getattr(_diffusers(), _class_of(json.loads((d / "config.json").read_text())))
    with quiet_dtype_warning():
        model = cls.from_pretrained(str(d), local_files_only=True, torch_dtype=dtype)
    return model.to(device).eval(), describe(model, source=str(path))


@contextlib.contextmanager
def quiet_dtype_warning() -> Iterator[None]:
    """diffusers 0.42 renamed ``torch_dtype`` to ``dtype`` with a FutureWarning; older releases know only
    ``torch_dtype``. We pass ``torch_dtype`` (loading straight into the dtype, so a pipeline's fp32-kept modules
    stay so) and silence that one warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
        yield


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
