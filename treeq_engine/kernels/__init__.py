"""Kernel ops behind one API: activation quantization (fused LN/modulate/Monarch stage 1) and the packed
mixed-precision GEMM with the fused epilogue. Backends: reference (oracle), Triton, CUDA."""
from .ops import backends, packed_linear, quantize_activation, register
from .types import PackedWeight, QuantizedActivation

try:  # registers the "triton" backend; without Triton there is simply no such backend
    from .triton import backend as _triton_backend  # noqa: F401
except ImportError:
    pass
try:  # registers the "cuda" backend (it declines to run without a CUDA build and device)
    from . import cuda_backend  # noqa: F401
except ImportError:  # pragma: no cover - a torch without torch.library.custom_op
    pass

__all__ = ["PackedWeight", "QuantizedActivation", "backends", "packed_linear", "quantize_activation", "register"]
