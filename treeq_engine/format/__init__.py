"""The numeric format: specs, reference quantizers, the packed layout and the reference integer GEMM.

Everything here is pure PyTorch and is the oracle that the C++ core, the Triton kernels and the CUDA
kernels are tested against.
"""
from .spec import ACT_BITS, KEEP_BITS, WEIGHT_BITS, Granularity, QuantSpec, Role
from .quantize import (QuantizedTensor, dequantize, fake_quantize, fake_quantize_with_qparams, quantize,
                       quantize_with_qparams, row_qparams)
from .packing import GROUP, LAYOUT_VERSION, pack, packed_dtype, packed_shape, padded_k, unpack
from .gemm_ref import MAX_K, epilogue, int_gemm, quantized_linear, zero_point_correction

__all__ = [
    "ACT_BITS", "KEEP_BITS", "WEIGHT_BITS", "Granularity", "QuantSpec", "Role",
    "QuantizedTensor", "dequantize", "fake_quantize", "fake_quantize_with_qparams", "quantize",
    "quantize_with_qparams", "row_qparams",
    "GROUP", "LAYOUT_VERSION", "pack", "packed_dtype", "packed_shape", "padded_k", "unpack",
    "MAX_K", "epilogue", "int_gemm", "quantized_linear", "zero_point_correction",
]
