"""Access to the compiled core ``treeq_engine._C``, with checked, torch-facing wrappers.

The package works without the binary (every op has a pure-PyTorch reference); :func:`load` raises a clear
error, naming the fix, where a caller needs it.
"""
from __future__ import annotations

import functools
import hashlib
import warnings
from pathlib import Path
from types import ModuleType

import torch

from .format.packing import check_codes, packed_dtype, packed_shape, PACKABLE_BITS


class CoreUnavailableError(RuntimeError):
    """The compiled core is missing or cannot do what was asked."""


@functools.lru_cache(maxsize=None)
def _import() -> tuple[ModuleType | None, str]:
    try:
        from . import _C  # type: ignore[attr-defined]
    except ImportError as e:  # not built, or built for another Python
        return None, str(e)
    why = _stale(_C)
    if why:   # it may not know the arguments the Python side passes: say so before a call fails obscurely
        warnings.warn(why, RuntimeWarning, stacklevel=3)
    return _C, ""


@torch.compiler.assume_constant_result   # (torch.compile takes the answer as is: importing is no graph op)
def available() -> bool:
    return _import()[0] is not None


CSRC = Path(__file__).resolve().parents[1] / "csrc"
_SUFFIXES = (".cpp", ".cu", ".cuh", ".h")


def source_digest(root: Path = CSRC) -> str | None:
    """The digest CMakeLists.txt compiles into the core: SHA-256 over the lines ``relative path``, ``SHA-256 of the
    file`` (each newline-terminated) of every source under ``csrc/`` in sorted path order, first 16 hex digits;
    None without a source tree (an installed wheel)."""
    if not root.is_dir():
        return None
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.suffix in _SUFFIXES)
    manifest = "".join(f"{f}\n{hashlib.sha256((root / f).read_bytes()).hexdigest()}\n" for f in files)
    return hashlib.sha256(manifest.encode()).hexdigest()[:16]


def stale_reason() -> str | None:
    """Why the built core does not match the ``csrc/`` next to it (it was built from other sources: rebuild), or
    None when it matches, when there is no source tree to compare with, or when no core is built."""
    mod = _import()[0]
    return None if mod is None else _stale(mod)


def _stale(mod: ModuleType) -> str | None:
    want = source_digest()
    if want is None:
        return None
    got = mod.build_info().get("source_digest")
    if got == want:
        return None
    return (f"treeq_engine._C was built from other sources than {CSRC} (digest {got or 'unrecorded'}, the "
            f"sources now {want}): rebuild it (`pip install --no-build-isolation -e .`, or "
            f"tools/prebuild_core.sh for another machine's Python)")


def load() -> ModuleType:
    mod, why = _import()
    if mod is None:
        raise CoreUnavailableError(
            f"treeq_engine._C is not built ({why}); run `pip install --no-build-isolation -e .` "
            "from the repository root (see README)")
    return mod


def _cpu(t: torch.Tensor, what: str) -> torch.Tensor:
    if t.device.type != "cpu":
        raise ValueError(f"{what} must be a CPU tensor for the C++ reference, got device {t.device}")
    return t


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """C++ twin of :func:`treeq_engine.format.pack` (bit-identical)."""
    check_codes(_cpu(codes, "codes"), bits)
    return torch.from_numpy(load().cpu_pack(codes.numpy(), bits))


def _check_packed(packed: torch.Tensor, bits: int, k: int, what: str) -> None:
    if bits not in PACKABLE_BITS:
        raise ValueError(f"unsupported bit-width {bits}: expected one of {PACKABLE_BITS}")
    _cpu(packed, what)
    if packed.dtype != packed_dtype(bits):
        raise TypeError(f"{what} for {bits}-bit must be {packed_dtype(bits)}, got {packed.dtype}")
    if packed.dim() != 2 or tuple(packed.shape) != packed_shape(packed.shape[0], k, bits):
        raise ValueError(f"{what} for {bits}-bit, K={k} must have shape "
                         f"{packed_shape(packed.shape[0] if packed.dim() else 0, k, bits)}, got {tuple(packed.shape)}")
    if not packed.is_contiguous():
        raise ValueError(f"{what} must be contiguous")


def unpack(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """C++ twin of :func:`treeq_engine.format.unpack`."""
    _check_packed(packed, bits, k, "packed")
    return torch.from_numpy(load().cpu_unpack(packed.numpy(), bits, k))


def packed_gemm(a: torch.Tensor, w_packed: torch.Tensor, w_bits: int, k: int) -> torch.Tensor:
    """Exact int32 ``(M, N)`` accumulation of int8 activation codes ``a (M, K)`` against a layout-v1 packed
    weight ``(N, ·)``; equal to ``format.int_gemm(a, unpack(w_packed))``."""
    check_codes(_cpu(a, "activation codes a"), 8, "activation codes a")
    if a.shape[1] != k:
        raise ValueError(f"activation codes have K={a.shape[1]}, but the weight was packed with K={k}")
    _check_packed(w_packed, w_bits, k, "packed weight")
    return torch.from_numpy(load().cpu_packed_gemm(a.numpy(), w_packed.numpy(), w_bits, k))
