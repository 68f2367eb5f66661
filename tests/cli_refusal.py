"""``refused(match, argv)``: `treeq ARGV` must refuse its input the way every command does: exit status 2 and a
``treeq COMMAND: error: ...`` line on stderr (matching the regex ``match``), no traceback."""
from __future__ import annotations

import contextlib
import io
import re

from treeq_engine.cli import main


def refused(match: str, argv: list[str]) -> str:
    """Run ``treeq *argv``; returns its error line."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(argv)
    text = err.getvalue()
    assert rc == 2, f"`treeq {' '.join(argv)}` returned {rc}, expected 2 (refused input); stderr: {text}"
    lines = [line for line in text.splitlines() if line.startswith(f"treeq {argv[0]}: error: ")]
    assert lines, f"no `treeq {argv[0]}: error:` line in: {text}"
    assert re.search(match, lines[-1]), f"{match!r} is not in: {lines[-1]}"
    assert "Traceback" not in text, text
    return lines[-1]
