"""TreeQ Engine: mixed-precision quantization of Diffusion Transformers.

Tree-Structured Search with Environmental Noise Guidance picks each layer's weight/activation bits; the
General Monarch Branch keeps what the low-bit path loses; packed low-bit GEMM kernels (C++/CUDA core and
Triton) run the result. ``treeq_engine.format`` is the single source of truth for the numeric format.
"""
from .format import QuantSpec
from .info import build_info

__all__ = ["QuantSpec", "build_info"]
