"""The branch as an ``nn.Module``: trainable Monarch factors beside a quantized linear.

    branch(x) = x·Bᵀ = stage2(stage1(x))       B = P₂·BD₂·P₁·BD₁   (N, K)
    w1 (b, b·r, Kb)   w2 (b, Nb, b·r)          (the canonical layout of :mod:`.monarch`)

``stage1`` is what the activation-quantization kernel computes next to quantization, from the unquantized row
(``z (M, b, b·r)``); ``stage2`` is what the GEMM epilogue adds. A low-rank (SVDQuant-style) branch is the same
module with ``b = 1``: ``w1[0] (r, K)``, ``w2[0] (N, r)``, so one class, one kernel path.

The factors train in float32 (the branch is the high-precision path). The packed runtime stores them in bf16
for a 16-bit model (``runtime.linear.branch_dtype``), which is what the fused kernels multiply and what the bit
budget counts (16 bits per entry); a float32 runtime model keeps float32.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..plan import BranchConfig
from . import monarch
from .monarch import MonarchShape


class MonarchBranch(nn.Module):
    """``x (..., K) -> x·Bᵀ (..., N)`` with Monarch factors ``w1``, ``w2`` (Parameters)."""

    def __init__(self, n: int, k: int, blocks: int, rank: int = 1, *, kind: str = "monarch") -> None:
        super().__init__()
        self.shape = MonarchShape(n=n, k=k, blocks=blocks, rank=rank)
        if kind not in ("monarch", "lowrank"):
            raise ValueError(f"branch kind must be 'monarch' or 'lowrank', got {kind!r}")
        if kind == "lowrank" and blocks != 1:
            raise ValueError(f"a lowrank branch has blocks=1, got {blocks}")
        self.kind = kind
        self.n, self.k = n, k
        self.w1 = nn.Parameter(torch.zeros(self.shape.w1_shape))
        self.w2 = nn.Parameter(torch.zeros(self.shape.w2_shape))

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def from_config(cls, cfg: BranchConfig, n: int, k: int) -> "MonarchBranch":
        """A zero branch of the plan's size (``lowrank`` = one block of rank ``cfg.rank``)."""
        if not isinstance(cfg, BranchConfig):
            raise TypeError(f"cfg must be a BranchConfig, got {type(cfg).__name__}")
        return cls(n, k, cfg.blocks, cfg.rank, kind=cfg.kind)

    @classmethod
    def projected(cls, matrix: torch.Tensor, cfg: BranchConfig) -> "MonarchBranch":
        """The closed-form best approximation of ``matrix (N, K)`` in this structure (per-block truncated SVD;
        for ``lowrank`` the top-``rank`` singular triplets)."""
        if matrix.dim() != 2:
            raise ValueError(f"a branch approximates a 2-D (N, K) matrix, got shape {tuple(matrix.shape)}")
        br = cls.from_config(cfg, *matrix.shape)
        w1, w2 = monarch.project(matrix, cfg.blocks, cfg.rank)
        with torch.no_grad():
            br.w1.copy_(w1)
            br.w2.copy_(w2)
        return br.to(matrix.device)

    @property
    def config(self) -> BranchConfig:
        return BranchConfig(self.kind, self.shape.blocks, self.shape.rank)

    @property
    def params(self) -> int:
        return self.shape.params

    # -- math ------------------------------------------------------------------------------------
    def stage1(self, x: torch.Tensor) -> torch.Tensor:
        """``z (..., b, b·r)`` from the unquantized ``x (..., K)``."""
        if x.shape[-1] != self.k:   # (monarch.stage1 pads any K up to b·Kb: a wrong width would pass silently)
            raise ValueError(f"branch input has {x.shape[-1]} features, expected K={self.k}")
        return monarch.stage1(x, self.w1)

    def stage2(self, z: torch.Tensor) -> torch.Tensor:
        """``(..., N)`` to add to the GEMM output, from ``z (..., b, b·r)``."""
        return monarch.stage2(z, self.w2, self.n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.k:
            raise ValueError(f"branch input has {x.shape[-1]} features, expected K={self.k}")
        return self.stage2(self.stage1(x))

    def dense(self) -> torch.Tensor:
        """``B (N, K)`` (differentiable in the factors)."""
        return monarch.to_dense(self.w1, self.w2, self.n, self.k)

    def extra_repr(self) -> str:
        s = self.shape
        return f"{self.kind}: N={s.n}, K={s.k}, blocks={s.blocks}, rank={s.rank}, params={s.params}"
