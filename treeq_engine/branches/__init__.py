"""High-precision branches beside quantized weights: the General Monarch Branch (and low rank as its b = 1 case)."""
from . import monarch
from .monarch import MonarchShape

__all__ = ["MonarchShape", "monarch"]
