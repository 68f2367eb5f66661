"""Checkpoint files for calibration and fine-tuning: tensors in safetensors, state in versioned JSON.

Writes are atomic (a temporary file renamed into place), so a job killed mid-write leaves the previous file
intact and resumes from it. Reads check the schema and version and name what is wrong.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load_file, save_file


class CheckpointError(ValueError):
    """A missing, malformed or mismatched checkpoint."""


def write_json(path: str | Path, doc: Mapping[str, Any]) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def read_json(path: str | Path, schema: str, version: int) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint state file")
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("schema") != schema:
        got = doc.get("schema") if isinstance(doc, dict) else type(doc).__name__
        raise CheckpointError(f"{path}: expected schema {schema!r}, got {got!r}")
    if doc.get("version") != version:
        raise CheckpointError(f"{path}: {schema} version {doc.get('version')!r} is not supported (this build "
                              f"reads {version})")
    return doc


def write_tensors(path: str | Path, tensors: Mapping[str, torch.Tensor],
                  metadata: Mapping[str, str] | None = None) -> None:
    """Tensors (and string ``metadata``, e.g. the digest of the run they belong to) to safetensors, atomically."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp),
              metadata=None if metadata is None else dict(metadata))
    os.replace(tmp, path)


def read_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of a safetensors file ({} when it has none)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such tensor file")
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def changed(old: Any, new: Any, limit: int = 4) -> str:
    """What differs between two JSON documents of a resumed run, for an error message: the differing top-level
    fields as ``field old -> new`` (long values cut), or the two values themselves when they are not objects."""
    def show(v: Any) -> str:
        text = json.dumps(v, sort_keys=True)
        return text if len(text) <= 60 else text[:57] + "..."

    if not (isinstance(old, Mapping) and isinstance(new, Mapping)):
        return f"{show(old)} -> {show(new)}"
    keys = [k for k in sorted(set(old) | set(new), key=str) if old.get(k) != new.get(k)]
    parts = []
    for k in keys[:limit]:   # (a field that is itself an object, e.g. a plan's layer: its own differing fields)
        a, b = old.get(k), new.get(k)
        nested = isinstance(a, Mapping) and isinstance(b, Mapping)
        parts.append(f"{k}: {changed(a, b, 2)}" if nested else f"{k} {show(a)} -> {show(b)}")
    return "; ".join(parts) + (f"; and {len(keys) - limit} more" if len(keys) > limit else "")


def digest(doc: Any) -> str:
    """A short stable hash of a JSON-able document (what a checkpoint belongs to)."""
    import hashlib

    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_tensors(path: str | Path, required: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such tensor file")
    try:
        tensors = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    missing = [k for k in required if k not in tensors]
    if missing:
        raise CheckpointError(f"{path}: missing tensor(s) {missing}")
    return tensors


# the file that marks each command's output directory
RUN_FILES = (("ptq.json", "a `treeq ptq` output"), ("peft.json", "a `treeq peft` output"),
             ("manifest.json", "an artifact of `treeq quantize`"), ("tss_state.json", "a `treeq search` output"))


def not_a_run(path: str | Path, command: str) -> str | None:
    """Why ``path`` is not a ``treeq {command}`` output directory (one holding its ``{command}.json``), naming what
    it is instead where it is another command's; None where it is one."""
    p = Path(path)
    if not p.exists():
        return "no such directory"
    if not p.is_dir():
        return "got a file"
    if (p / f"{command}.json").is_file():
        return None
    other = next((what for name, what in RUN_FILES if (p / name).is_file()), None)
    return f"it holds no {command}.json" + (f": it is {other}" if other else "")
