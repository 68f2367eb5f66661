"""Operands derived from a packed weight (unpacked codes, kernel fragment layouts), built once and cached.

The artifact stores layout v1; each backend derives what its kernel wants. The cache is keyed by the identity of
an *anchor* tensor (the packed weight), lives exactly as long as it (it is held on the tensor itself; a copy or a
pickle of the tensor starts empty), and an entry is rebuilt when any of its *dependencies* was written in place
(their version counters moved) — e.g. buffers loaded into a module after its first forward.

Under ``torch.compile`` the entry an eager call left is read as it is (dynamo guards on it: a rebuilt or dropped
entry retraces), and an absent one is built in the graph; the stamps (storage addresses, version counters) are no
graph ops. A packed layer drops its buffers' entries when a state dict is loaded into it
(``TreeQLinear._load_from_state_dict``), so a compiled model retraces after new weights, not reading stale ones.
"""
from __future__ import annotations

from typing import Callable, Hashable, Sequence, TypeVar

import torch

T = TypeVar("T")

ATTR = "_treeq_derived"   # the anchor's attribute holding its cache


class _Cache(dict):
    """One anchor's entries, ``key -> (stamps, value)``; copied and pickled empty (a copy of the anchor is another
    tensor, and a checkpoint holds no derived operands)."""

    def __deepcopy__(self, memo: dict) -> "_Cache":
        return _Cache()

    def __reduce__(self) -> tuple:
        return (_Cache, ())


def stamp(t: torch.Tensor) -> tuple:
    """What identifies a tensor's contents for a cache: storage address, device, dtype and version counter (so
    ``.data`` reassignment, ``.to()`` and in-place writes all invalidate). Inference tensors have no version
    counter: an in-place write to one after its first use (under ``torch.inference_mode``) is not seen."""
    return (t.data_ptr(), t.device, t.dtype, None if t.is_inference() else t._version)


def derived(anchor: torch.Tensor, key: Hashable, deps: Sequence[torch.Tensor], build: Callable[[], T]) -> T:
    """``build()``'s result for ``(anchor, key)``, reused while ``deps`` (anchor included if it matters) are
    unchanged (see the module docstring for ``torch.compile``)."""
    per_anchor = getattr(anchor, ATTR, None)
    if torch.compiler.is_compiling():
        hit = None if per_anchor is None else per_anchor.get(key)
        return build() if hit is None else hit[1]
    if per_anchor is None:
        per_anchor = _Cache()
        setattr(anchor, ATTR, per_anchor)
    now = tuple(stamp(t) for t in deps)
    hit = per_anchor.get(key)
    if hit is None or hit[0] != now:
        hit = per_anchor[key] = (now, build())
    return hit[1]


def forget(*tensors: torch.Tensor | None) -> None:
    """Drop every entry cached on ``tensors`` (their contents are about to change: a state dict loaded into them)."""
    for t in tensors:
        cache = None if t is None else getattr(t, ATTR, None)
        if cache:
            cache.clear()
