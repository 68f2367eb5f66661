"""How the Triton backend runs on this machine: compiled on CUDA devices, interpreted on CPU tensors.

Triton reads ``TRITON_INTERPRET`` when a kernel is *decorated*, so the mode is fixed at import time
(tests/conftest.py sets it before importing the package on machines without a GPU). Kernels receive the mode as
a ``constexpr`` (``INTERP``) because a few operations differ: the interpreter has no libdevice (no
``mul.rn``/``add.rn``) and computes ``bf16`` dots wrongly, so kernels use fp32 operands there.
"""
from __future__ import annotations

import contextlib

import torch
import triton

INTERPRET: bool = bool(triton.knobs.runtime.interpret)  # Triton's own reading of TRITON_INTERPRET


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def runs_on(t: torch.Tensor) -> bool:
    """Whether Triton can run on ``t``'s device here: CUDA when compiled, CPU when interpreted."""
    if INTERPRET:
        return t.device.type == "cpu"
    return t.device.type == "cuda" and torch.cuda.is_available()


def check_device(*tensors: torch.Tensor | None) -> None:
    """Raise a clear error unless every tensor is on a device this Triton mode can run on."""
    for t in tensors:
        if t is not None and not runs_on(t):
            mode = "interpreter (TRITON_INTERPRET=1): CPU tensors" if INTERPRET else "compiled: CUDA tensors"
            raise RuntimeError(f"the Triton backend runs {mode}; got a tensor on {t.device}")


def empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Output allocation of every launcher (one place, so tests can poison outputs and prove each is written)."""
    return torch.empty(shape, dtype=dtype, device=device)


def on_device(t: torch.Tensor):
    """Context in which a kernel on ``t`` launches on ``t``'s GPU (Triton launches on the current device, which
    need not be the tensors' one); nothing on CPU tensors (the interpreter)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
