"""The Monarch branch B = BD₂·P₁·BD₁·P₀ in its canonical tensor form (pure PyTorch reference).

Rectangular Monarch with ``b`` blocks and per-block rank ``r``, for a linear ``W (N, K)``, with input blocks
*strided* and output blocks *contiguous*::

    Kb = ceil(K / b), Nb = ceil(N / b)               K, N zero-padded to b·Kb, b·Nb
    w1: (b, b·r, Kb)    w1[k, j·r + s, i]            BD₁: input block k (inputs i·b + k) -> b·r values
    w2: (b, Nb, b·r)    w2[j, l, k·r + s]            BD₂: output block j (outputs j·Nb + l), gathering every k

    stage 1  z[m, j, k·r + s] = Σ_i  w1[k, j·r + s, i] · x[m, i·b + k]           (P₀: the stride-b gather,
                                                                                  P₁: the (k, j) transpose)
    stage 2  y[m, j·Nb + l]   = Σ_{k,s} w2[j, l, k·r + s] · z[m, j, k·r + s]

so ``B[j·Nb + l, i·b + k] = Σ_s w2[j, l, k·r + s] · w1[k, j·r + s, i]``: every (j, k) block of B (rows
contiguous, columns strided by b) has rank ≤ r, and B reaches rank min(b²·r, N, K). Parameters
``b·r·(b·Kb + b·Nb)`` ≈ ``b·r·(K + N)``, equal to a rank ``b·r`` low-rank branch. ``b = 1`` *is* the low-rank
branch ``y = L2 · (L1 · x)`` with ``L1 = w1[0] (r, K)``, ``L2 = w2[0] (N, r)``, so kernels implement one path.

Where the permutation sits. What makes Monarch more than block-low-rank is that one side's blocks are strided
and the other's contiguous: a diagonal-heavy W then spreads over all (j, k) blocks (the identity at b = 32 on
1152 × 1152 is approximated to 1/3 relative error, against 0.99 for contiguous-contiguous blocks or rank 32).
Dao et al.'s rectangular Monarch strides the outputs (``n = l·b + j``); we stride the inputs, the transposed
structure with the same rank reach, parameters and closed-form projection. The kernels decide it: stage 1 runs
in the row-owning quantization kernel, which holds whole rows and gathers at stride b for free, while stage 2
runs in the GEMM epilogue, where contiguous output blocks mean an output tile meets only the ``~tile/Nb + 1``
blocks it overlaps and reads only their slices of ``z`` (``b·r`` values per token each, not all ``b²·r``).

The split into stages is the kernels' split: stage 1 runs next to activation quantization on the
unquantized row, producing ``z (M, b, b·r)``; stage 2 is added in the GEMM epilogue.
"""
from __future__ import annotations

import dataclasses
import math

import torch


@dataclasses.dataclass(frozen=True)
class MonarchShape:
    """Sizes of a Monarch branch for a ``(N, K)`` linear."""

    n: int
    k: int
    blocks: int
    rank: int

    def __post_init__(self) -> None:
        for name in ("n", "k", "blocks", "rank"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"Monarch {name} must be a positive int, got {v!r}")
        if self.blocks > min(self.n, self.k):
            raise ValueError(f"Monarch blocks={self.blocks} exceeds min(N={self.n}, K={self.k})")

    @property
    def kb(self) -> int:
        return math.ceil(self.k / self.blocks)

    @property
    def nb(self) -> int:
        return math.ceil(self.n / self.blocks)

    @property
    def w1_shape(self) -> tuple[int, int, int]:
        return (self.blocks, self.blocks * self.rank, self.kb)

    @property
    def w2_shape(self) -> tuple[int, int, int]:
        return (self.blocks, self.nb, self.blocks * self.rank)

    @property
    def z_width(self) -> int:
        """Per-token width of the stage-1 output ``z``: b·b·r."""
        return self.blocks * self.blocks * self.rank

    @property
    def params(self) -> int:
        return math.prod(self.w1_shape) + math.prod(self.w2_shape)

    @classmethod
    def matching_lowrank(cls, n: int, k: int, lowrank: int = 32, rank: int = 1) -> "MonarchShape":
        """The default GMB size: ``b·r = lowrank`` so parameters equal a rank-``lowrank`` low-rank branch.
        Falls back to the largest ``b ≤ lowrank/rank`` that fits the layer."""
        b = max(1, min(lowrank // rank, n, k))
        return cls(n=n, k=k, blocks=b, rank=rank)

    @classmethod
    def of(cls, w1: torch.Tensor, w2: torch.Tensor, n: int, k: int) -> "MonarchShape":
        if w1.dim() != 3 or w2.dim() != 3:
            raise ValueError(f"Monarch factors must be 3-D, got w1 {tuple(w1.shape)}, w2 {tuple(w2.shape)}")
        b = w1.shape[0]
        if w1.shape[1] % b:
            raise ValueError(f"w1 {tuple(w1.shape)}: dim 1 must be blocks·rank")
        s = cls(n=n, k=k, blocks=b, rank=w1.shape[1] // b)
        if tuple(w1.shape) != s.w1_shape or tuple(w2.shape) != s.w2_shape:
            raise ValueError(f"Monarch factors for N={n}, K={k} with b={b}, r={s.rank} must be w1 {s.w1_shape}, "
                             f"w2 {s.w2_shape}; got {tuple(w1.shape)}, {tuple(w2.shape)}")
        return s


def stage1(x: torch.Tensor, w1: torch.Tensor) -> torch.Tensor:
    """``z (..., b, b·r)`` from ``x (..., K)``; K is zero-padded to b·Kb."""
    b, br, kb = w1.shape
    r = br // b
    k = x.shape[-1]
    if k > b * kb:
        raise ValueError(f"x has K={k} but w1 {tuple(w1.shape)} covers at most {b * kb}")
    lead = x.shape[:-1]
    xp = torch.nn.functional.pad(x, (0, b * kb - k)).reshape(-1, kb, b)  # (M, i, k): input i·b + k
    u = torch.einsum("mik,kci->mkc", xp, w1.to(x.dtype))  # (M, k, j·r+s)
    z = u.reshape(-1, b, b, r).transpose(1, 2).reshape(-1, b, b * r)  # (M, j, k·r+s)
    return z.reshape(*lead, b, b * r)


def stage2(z: torch.Tensor, w2: torch.Tensor, n: int) -> torch.Tensor:
    """``y (..., N)`` from ``z (..., b, b·r)``: output channel ``j·Nb + l``; padded outputs dropped."""
    b, nb, br = w2.shape
    if z.shape[-2:] != (b, br):
        raise ValueError(f"z has trailing shape {tuple(z.shape[-2:])}, w2 {tuple(w2.shape)} needs ({b}, {br})")
    lead = z.shape[:-2]
    y = torch.einsum("mjc,jlc->mjl", z.reshape(-1, b, br), w2.to(z.dtype))  # (M, j, l)
    return y.reshape(*lead, b * nb)[..., :n]


def forward(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, n: int) -> torch.Tensor:
    return stage2(stage1(x, w1), w2, n)


def to_dense(w1: torch.Tensor, w2: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The dense ``B (N, K)``."""
    MonarchShape.of(w1, w2, n, k)
    eye = torch.eye(k, dtype=w1.dtype, device=w1.device)
    return forward(eye, w1, w2, n).T.contiguous()  # column c of B is B·e_c


def _blocks_view(w: torch.Tensor, s: MonarchShape) -> torch.Tensor:
    """``W (N, K)`` as its (j, k) blocks ``(j, k, l, i)``: rows j·Nb + l, columns i·b + k, zero-padded."""
    wp = torch.nn.functional.pad(w, (0, s.blocks * s.kb - s.k, 0, s.blocks * s.nb - s.n))
    return wp.reshape(s.blocks, s.nb, s.kb, s.blocks).permute(0, 3, 1, 2)  # (j, l, i, k) -> (j, k, l, i)


def check_fits(n: int, k: int, blocks: int, rank: int = 1) -> MonarchShape:
    """The shape of a ``blocks``-block, rank-``rank`` Monarch branch on an ``(N, K)`` weight, or a ValueError saying
    why there is none (more blocks than a side; a rank above the block size)."""
    s = MonarchShape(n=n, k=k, blocks=blocks, rank=rank)
    if rank > min(s.nb, s.kb):
        raise ValueError(f"rank {rank} exceeds the block size ({s.nb} × {s.kb})")
    return s


def project(w: torch.Tensor, blocks: int, rank: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form best Monarch approximation of ``w (N, K)`` in Frobenius norm: a rank-``rank`` truncated SVD
    of every (j, k) block (the blocks are independent, so this is optimal). Returns ``(w1, w2)`` in float32."""
    if w.dim() != 2:
        raise ValueError(f"project needs a 2-D weight, got shape {tuple(w.shape)}")
    n, k = w.shape
    s = check_fits(n, k, blocks, rank)
    blk = _blocks_view(w.detach().to(torch.float32), s)  # (j, k, l, i)
    u, sv, vh = torch.linalg.svd(blk, full_matrices=False)  # (j,k,l,q), (j,k,q), (j,k,q,i)
    root = sv[..., :rank].sqrt()
    left = u[..., :rank] * root[..., None, :]  # (j, k, l, s)
    right = vh[..., :rank, :] * root[..., :, None]  # (j, k, s, i)
    w2 = left.permute(0, 2, 1, 3).reshape(blocks, s.nb, blocks * rank)  # [j, l, k·r+s]
    w1 = right.permute(1, 0, 2, 3).reshape(blocks, blocks * rank, s.kb)  # [k, j·r+s, i]
    return w1.contiguous(), w2.contiguous()
