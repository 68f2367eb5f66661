"""A LoRA weight update merged into a frozen quantized weight (QALoRA / EfficientDM style).

    ΔW = B·A · (alpha / r)        A (r, K) Kaiming-uniform,  B (N, r) zero     → ΔW = 0 at the start

A frozen :class:`~treeq_engine.nn.QuantLinear` with ``lora`` set computes ``Q_{s,zp}(s·(codes − zp) + ΔW)``: the
update is re-quantized on the layer's fixed grid, so after training it folds into new codes at no run-time cost
(unlike the branch, which stays a separate high-precision path). Gradients reach A and B through the
straight-through estimator.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn


class LoRA(nn.Module):
    def __init__(self, n: int, k: int, rank: int, alpha: float | None = None) -> None:
        super().__init__()
        if not all(isinstance(v, int) and v > 0 for v in (n, k, rank)):
            raise ValueError(f"LoRA sizes must be positive ints, got N={n}, K={k}, rank={rank}")
        if rank > min(n, k):
            raise ValueError(f"LoRA rank {rank} exceeds min(N={n}, K={k})")
        self.n, self.k, self.rank = n, k, rank
        self.scaling = (rank if alpha is None else float(alpha)) / rank
        self.a = nn.Parameter(torch.empty(rank, k))
        self.b = nn.Parameter(torch.zeros(n, rank))
        nn.init.kaiming_uniform_(self.a, a=math.sqrt(5))

    def delta(self) -> torch.Tensor:
        """``ΔW (N, K)``."""
        return (self.b @ self.a) * self.scaling

    def extra_repr(self) -> str:
        return f"N={self.n}, K={self.k}, rank={self.rank}"
