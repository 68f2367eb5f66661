"""TreeQ artifacts: a directory with the packed model (safetensors), its plan (JSON) and a manifest.

    <dir>/manifest.json     {"format": "treeq-artifact", "version": 2, "layout_version": 1, "model": ...,
                             "model_config": {...}, "fingerprint": ..., "sha256": ...}
    <dir>/plan.json         the QuantPlan
    <dir>/model.safetensors every tensor of the quantized model's state_dict

Loading checks, in order, with a clear error for each: the manifest's format and versions, the file's
checksum (corruption), the architecture fingerprint (the wrong model), then a strict state-dict load.
Nothing is unpickled.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..format.packing import LAYOUT_VERSION
from ..plan import QuantPlan
from .convert import check_layout, set_layout, skeleton

FORMAT = "treeq-artifact"
# 2: Monarch factors with input blocks strided and output blocks contiguous (branches/monarch.py); version 1
# stored the transposed arrangement, which this build would misread.
VERSION = 2


class ArtifactError(ValueError):
    """A TreeQ artifact that is malformed, corrupt, of another version, or for another model."""


def fingerprint(model: nn.Module, plan: QuantPlan) -> str:
    """Hash of the names and shapes of the plan's layers in the full-precision model."""
    h = hashlib.sha256()
    for name in plan.layers:
        m = model.get_submodule(name)
        h.update(f"{name}:{m.in_features}x{m.out_features}:{m.bias is not None};".encode())
    return h.hexdigest()[:16]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save(model: nn.Module, plan: QuantPlan, path: str | Path, *, fp_fingerprint: str,
         model_config: dict[str, Any] | None = None) -> Path:
    """Write a quantized model (after :func:`treeq_engine.runtime.quantize`) as an artifact directory.
    ``fp_fingerprint`` is :func:`fingerprint` of the full-precision model, taken before quantizing."""
    from safetensors.torch import save_file

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"))
    plan.save(out / "plan.json")
    manifest = {"format": FORMAT, "version": VERSION, "layout_version": LAYOUT_VERSION, "model": plan.model,
                "model_config": model_config or {}, "fingerprint": fp_fingerprint,
                "sha256": _sha256(out / "model.safetensors")}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def read_manifest(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not (p / "manifest.json").is_file():
        if not p.exists():
            raise ArtifactError(f"{p}: no such artifact directory")
        raise ArtifactError(f"{p} is not a TreeQ artifact: no manifest.json")
    try:
        man = json.loads((p / "manifest.json").read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{p}/manifest.json is not valid JSON: {e}") from None
    if man.get("format") != FORMAT:
        raise ArtifactError(f"{p}: not a TreeQ artifact (format {man.get('format')!r})")
    if man.get("version") != VERSION:
        raise ArtifactError(f"{p}: artifact version {man.get('version')!r}; this build reads {VERSION} — "
                            "re-quantize the model with this version")
    if man.get("layout_version") != LAYOUT_VERSION:
        raise ArtifactError(f"{p}: weights packed with layout v{man.get('layout_version')}; this build reads "
                            f"v{LAYOUT_VERSION} — re-quantize the model with this version")
    return man


def load(path: str | Path, model: nn.Module, *, dtype: torch.dtype = torch.bfloat16,
         map_location: str | torch.device = "cpu", layout: str = "auto") -> nn.Module:
    """Load an artifact into ``model``, a freshly built full-precision instance of the same architecture
    (its weights are replaced); ``layout`` as in :func:`treeq_engine.runtime.set_layout` (by default, layers the
    CUDA kernels run keep only their fragment layout on the GPU). Returns the quantized model."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    check_layout(layout)
    p = Path(path)
    man = read_manifest(p)
    plan = QuantPlan.load(p / "plan.json")
    weights = p / "model.safetensors"
    if not weights.is_file():
        raise ArtifactError(f"{p}: model.safetensors is missing")
    if _sha256(weights) != man.get("sha256"):
        raise ArtifactError(f"{weights} is corrupt: its checksum does not match the manifest")
    plan.validate(model)
    fp = fingerprint(model, plan)
    if fp != man.get("fingerprint"):
        raise ArtifactError(f"{p} was made for another model (architecture fingerprint {man.get('fingerprint')}, "
                            f"this model has {fp}); build the model with the artifact's config: {man.get('model_config')}")
    try:
        state = load_file(str(weights), device=str(map_location))
    except (SafetensorError, OSError) as e:
        raise ArtifactError(f"{weights} cannot be read: {e}") from None
    skeleton(model, plan, dtype=dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ArtifactError(f"{p}: state does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    set_layout(model, layout)
    return model
