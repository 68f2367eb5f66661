"""Quantized modules and model conversion."""
from .convert import (apply_plan, clear_caches, convert, forward_order, full_precision, noise_scale, packable_layers,
                      quant_layers, quantizable_linears, unconvert)
from .quant_linear import QuantLinear
from .quant_pointwise import QuantPointwiseConv

__all__ = ["QuantLinear", "QuantPointwiseConv", "apply_plan", "clear_caches", "convert", "forward_order",
           "full_precision", "noise_scale", "packable_layers", "quant_layers", "quantizable_linears", "unconvert"]
