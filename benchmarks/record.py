"""Where benchmark results go: a marked section of ``benchmarks/RESULTS.md``, a JSON record, the commit.

Every write is atomic (a temporary file, then ``os.replace``): the GPU runbook kills a step at its time limit,
and a kill in the middle of a write must leave the previous version, not a truncated file.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "RESULTS.md"


def git_commit() -> str:
    """Short hash of HEAD, ``+dirty`` when tracked files differ from it; ``unknown`` without git."""
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev + ("+dirty" if dirty else "") if rev else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_json(path: Path, obj: Any) -> None:
    write_atomic(Path(path), json.dumps(obj, indent=1) + "\n")


def write_section(block: str, begin: str, end: str, path: Path = RESULTS) -> None:
    """Replace the text from ``begin`` to ``end`` (both markers inside ``block``) in ``path``, or append
    ``block`` when the markers are not there yet."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    write_atomic(path, text)
