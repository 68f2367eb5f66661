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


def write_tensors(path: str | Path, tensors: Mapping[str, torch.Tensor]) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


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
