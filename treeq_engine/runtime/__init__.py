"""Inference: packed TreeQLinear modules, model conversion and artifacts."""
from . import artifact
from .convert import memory_report, quantize, set_layout, skeleton, treeq_layers
from .linear import TreeQLinear, TreeQPointwiseConv

__all__ = ["TreeQLinear", "TreeQPointwiseConv", "artifact", "memory_report", "quantize", "set_layout", "skeleton", "treeq_layers"]
