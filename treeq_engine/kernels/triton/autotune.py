"""Tile configurations for the plain-Triton GEMM on the DiT-XL/2 shapes.

``(K, N)`` ∈ {(1152, 3456) qkv, (1152, 1152) proj, (1152, 4608) fc1, (4608, 1152) fc2, (1152, 6912) adaLN} and
tokens ``M = 256 … 32768``. On a GPU, ``triton.autotune`` times the candidates below once per
``(M rounded up to a power of two, N, K, bits, branch)`` and caches the winner; candidates are pruned so that
split-K appears only where the tile grid cannot fill the SMs (small M) and 128-row tiles only where M fills
them. ``TREEQ_TRITON_AUTOTUNE=0`` skips the timing and uses ``heuristic_config`` (deterministic, for CUDA-graph
capture without a warm-up, and for the ahead-of-time compile checks). Under the interpreter a small fixed tile
keeps the CPU tests fast; the tests pass explicit configs to cover split-K and grouping.
"""
from __future__ import annotations

import dataclasses
import functools
import os

import triton

from .runtime import INTERPRET

SM_COUNT_H100 = 132


@dataclasses.dataclass(frozen=True)
class GemmConfig:
    bm: int
    bn: int
    bk: int
    split_k: int = 1
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3

    def to_triton(self) -> triton.Config:
        return triton.Config(dict(BM=self.bm, BN=self.bn, BK=self.bk, SPLIT_K=self.split_k, GROUP_M=self.group_m),
                             num_warps=self.num_warps, num_stages=self.num_stages)


INTERPRETER_CONFIG = GemmConfig(32, 32, 64, split_k=1, group_m=2, num_warps=4, num_stages=1)

# Candidates that compile for sm_90a within the 227 KB of shared memory and without register spills (checked
# with ``treeq triton-aot``-style builds; 128 × 256 spills 16 bytes and is kept for large M). The Monarch
# epilogue holds more at once, so it has its own list.
SPLITK_MAX_M = 2048   # above this many rows no split-K config is tried (the tile grid fills the GPU)
CANDIDATES: tuple[GemmConfig, ...] = (
    GemmConfig(128, 256, 128, 1, 8, 8, 3),
    GemmConfig(128, 128, 128, 1, 8, 8, 3),
    GemmConfig(128, 128, 128, 1, 8, 8, 4),
    GemmConfig(64, 256, 128, 1, 8, 8, 3),
    GemmConfig(64, 128, 128, 1, 8, 8, 4),
    GemmConfig(64, 128, 128, 2, 8, 8, 3),
    GemmConfig(64, 128, 128, 4, 8, 8, 3),
    GemmConfig(64, 64, 128, 4, 8, 4, 4),
)
BRANCH_CANDIDATES: tuple[GemmConfig, ...] = (
    GemmConfig(64, 128, 128, 1, 8, 8, 3),
    GemmConfig(64, 128, 128, 1, 8, 8, 4),
    GemmConfig(128, 64, 128, 1, 8, 8, 3),
    GemmConfig(64, 128, 64, 1, 8, 8, 4),
    GemmConfig(64, 128, 128, 2, 8, 8, 3),
    GemmConfig(128, 128, 128, 2, 8, 8, 3),
    GemmConfig(64, 64, 128, 4, 8, 4, 4),
)


def heuristic_config(m: int, n: int, k: int, branch: bool = False) -> GemmConfig:
    """A prediction, not a measurement: big tiles once the grid fills the GPU, split-K below that. With the
    Monarch branch the epilogue holds the accumulator, the branch product and their address tensors at once;
    64 × 128 tiles over 8 warps are the largest that compile without spills for sm_90a (``treeq triton-aot``)."""
    if branch:
        tiles = triton.cdiv(m, 64) * triton.cdiv(n, 128)
        return GemmConfig(64, 128, 128, 1 if tiles >= SM_COUNT_H100 else 2, 8, 8, 3)
    if m >= 4096:
        return GemmConfig(128, 256, 128, 1, 8, 8, 3)
    if m >= 1024:
        return GemmConfig(128, 128, 128, 1, 8, 8, 3)
    tiles = triton.cdiv(m, 64) * triton.cdiv(n, 128)
    split = 1 if tiles >= SM_COUNT_H100 else 2 if 2 * tiles >= SM_COUNT_H100 or k < 2048 else 4
    return GemmConfig(64, 128, 128, split, 8, 8, 3)


def _prune(configs, named_args, **kwargs):
    m, n = named_args["M"], named_args["N"]
    branch = bool(kwargs.get("HAS_BRANCH", named_args.get("HAS_BRANCH", False)))
    allowed = {c.to_triton().__str__() for c in (BRANCH_CANDIDATES if branch else CANDIDATES)}
    keep = []
    for c in configs:
        if str(c) not in allowed:
            continue
        kw = c.kwargs
        tiles = triton.cdiv(m, kw["BM"]) * triton.cdiv(n, kw["BN"])
        if kw["SPLIT_K"] > 1 and (m > SPLITK_MAX_M or tiles >= SM_COUNT_H100):
            continue
        if kw["BM"] == 128 and m < 512:
            continue
        keep.append(c)
    return keep or list(configs)[:1]


def gemm_config(m: int, n: int, k: int, bits: int, branch: bool) -> GemmConfig | None:
    """The config to launch with, or None to let ``triton.autotune`` choose (GPU, autotuning on)."""
    if INTERPRET:
        return INTERPRETER_CONFIG
    if os.environ.get("TREEQ_TRITON_AUTOTUNE", "1") == "0":
        return heuristic_config(m, n, k, branch)
    return None


@functools.lru_cache(maxsize=None)
def tuned_gemm_kernel():
    from .gemm import _packed_gemm_kernel

    configs = {str(c.to_triton()): c.to_triton() for c in CANDIDATES + BRANCH_CANDIDATES}
    return triton.autotune(configs=list(configs.values()),
                           key=["M_BUCKET", "N", "K", "BITS", "HAS_BRANCH"],
                           prune_configs_by={"early_config_prune": _prune})(_packed_gemm_kernel)
