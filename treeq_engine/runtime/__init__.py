"""Inference: packed TreeQLinear modules, model conversion and artifacts."""
from . import artifact
from .convert import memory_report, quantize, set_layout, skeleton, treeq_layers
from .linear import TreeQLinear

__all__ = ["TreeQLinear", "artifact", "memory_report", "quantize", "set_layout", "skeleton", "treeq_layers"]
