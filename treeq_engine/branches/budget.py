"""What a branch costs, and a plan's average weight bits with and without branch bytes.

A branch's factors are stored in 16 bits (bf16), so a layer ``(N, K)`` at ``w_bits`` with a branch of ``P``
parameters costs ``N·K·w_bits + 16·P`` bits; its *effective* weight bits are that over ``N·K``. Whether a
budget counts the branch is the caller's choice (the paper does not say): :func:`plan_weight_bits` reports
either. A plan's average is parameter-weighted over the layers it names (the MixDQ convention).

    branch_params(cfg, n, k)                    parameters of a branch config on an (N, K) layer
    layer_weight_bits(cfg, n, k, count_branch)  total bits of one layer's weights (+ branch)
    plan_weight_bits(plan, shapes, count_branch)  parameter-weighted average bits per weight
"""
from __future__ import annotations

from typing import Mapping

from ..plan import BranchConfig, LayerConfig, QuantPlan
from .monarch import MonarchShape

BRANCH_BITS = 16


def branch_params(cfg: BranchConfig | None, n: int, k: int) -> int:
    """Parameters of the branch ``cfg`` beside an ``(N, K)`` weight (0 without a branch)."""
    if cfg is None:
        return 0
    return MonarchShape(n=n, k=k, blocks=cfg.blocks, rank=cfg.rank).params


def layer_weight_bits(cfg: LayerConfig, n: int, k: int, count_branch: bool = True) -> int:
    """Bits of one layer's weights: ``N·K·w_bits`` (+ ``16·branch params`` when ``count_branch``).
    Per-channel scales and zero points are left out (the same for every config)."""
    bits = n * k * cfg.w_bits
    if count_branch:
        bits += BRANCH_BITS * branch_params(cfg.branch, n, k)
    return bits


def plan_weight_bits(plan: QuantPlan, shapes: Mapping[str, tuple[int, int]], count_branch: bool = True) -> float:
    """Parameter-weighted average bits per weight over the plan's layers; ``shapes[name] = (N, K)``."""
    missing = [n for n in plan.layers if n not in shapes]
    if missing:
        raise KeyError(f"no (N, K) shape for plan layer(s) {missing[:3]}")
    total_bits = sum(layer_weight_bits(c, *shapes[n], count_branch) for n, c in plan.layers.items())
    total_w = sum(shapes[n][0] * shapes[n][1] for n in plan.layers)
    return total_bits / total_w if total_w else 0.0


def default_branch(n: int, k: int, lowrank: int = 32, kind: str = "monarch") -> BranchConfig:
    """The issue's default size: a Monarch branch with as many parameters as a rank-``lowrank`` low-rank one
    (``b·r = lowrank`` with ``r = 1``; fewer blocks where the layer is narrower), or that low-rank branch."""
    if kind not in ("monarch", "lowrank"):
        raise ValueError(f"branch kind must be 'monarch' or 'lowrank', got {kind!r}")
    if kind == "lowrank":
        return BranchConfig("lowrank", 1, min(lowrank, n, k))
    s = MonarchShape.matching_lowrank(n, k, lowrank)
    return BranchConfig("monarch", s.blocks, s.rank)
