"""Operands derived from a packed weight (unpacked codes, kernel fragment layouts), built once and cached.

The artifact stores layout v1; each backend derives what its kernel wants. The cache is keyed by the identity of
an *anchor* tensor (the packed weight), lives exactly as long as it, and an entry is rebuilt when any of its
*dependencies* was written in place (their version counters moved) — e.g. buffers loaded into a module after
its first forward.
"""
from __future__ import annotations

from typing import Callable, Hashable, Sequence, TypeVar

import torch
from torch.utils.weak import WeakIdKeyDictionary

T = TypeVar("T")

_CACHE: WeakIdKeyDictionary = WeakIdKeyDictionary()


def stamp(t: torch.Tensor) -> tuple:
    """What identifies a tensor's contents for a cache: storage address, device, dtype and version counter (so
    ``.to()``, in-place writes and ``.data`` reassignment to new storage invalidate). Not seen: an in-place write
    to an inference tensor after its first use (under ``torch.inference_mode``: no version counter), a
    ``fused=True`` optimizer's step (it does not advance the counters), an in-place write through ``t.data``
    (which has a counter of its own), and a ``.data`` swap back to a storage that was written through another
    tensor meanwhile (the parameter keeps its own counter). Write through the tensor itself, under
    ``torch.no_grad()``; or clear the caches (``nn.convert.clear_caches``) after such writes."""
    return (t.data_ptr(), t.device, t.dtype, None if t.is_inference() else t._version)


def derived(anchor: torch.Tensor, key: Hashable, deps: Sequence[torch.Tensor], build: Callable[[], T]) -> T:
    """``build()``'s result for ``(anchor, key)``, reused while ``deps`` (anchor included if it matters) are
    unchanged. Under ``torch.compile`` the build is traced into the graph instead: a cache lookup is no graph op,
    and the compiled graph then holds the conversion itself, always from the current buffers (weights changed in
    place, loaded or not, are what it reads). A build no graph can hold (one through the compiled core: the
    reference's unpacking of the fragment layout, the CUDA kernels' repack of a layout-v1 weight) breaks the graph
    there and runs eagerly, uncached, each call: keep the runtime's default layout on the GPU (the fragment layout,
    which the CUDA kernels read as it is) when compiling."""
    if torch.compiler.is_compiling():
        return build()
    per_anchor = _CACHE.get(anchor)
    if per_anchor is None:
        per_anchor = _CACHE[anchor] = {}
    now = tuple(stamp(t) for t in deps)
    hit = per_anchor.get(key)
    if hit is None or hit[0] != now:
        hit = per_anchor[key] = (now, build())
    return hit[1]
