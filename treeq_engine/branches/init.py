"""Closed-form initialisation of a branch beside a quantized weight: two variants, chosen by measurement.

    "weight"    B = Π(W)                 the quantized path carries Q(W − B)      (SVDQuant's choice)
    "residual"  B = Π(W − Q(W))          the quantized path carries Q(W)

``Π`` is the branch structure's best Frobenius approximation (:func:`monarch.project`: a truncated SVD per
block; the top singular triplets for low rank). In "weight" the branch takes the large, structured part of W
and the residual, with its smaller range, gets a finer grid; in "residual" the branch fits the quantization
error, which is close to unstructured noise. ``docs/gmb.md`` has the measurement that picks the default.

Both return ``(branch, base)``: ``base`` is the matrix the quantized path quantizes, so a layer's output is
``Q_a(x)·Q_w(base)ᵀ + branch(x)``.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..plan import BranchConfig
from .module import MonarchBranch

INIT_MODES = ("weight", "residual")

# (N, K) float weight -> its fake-quantized (N, K) version (the layer's weight quantizer, as calibrated)
WeightQuantizer = Callable[[torch.Tensor], torch.Tensor]


def init_branch(weight: torch.Tensor, cfg: BranchConfig, mode: str = "weight",
                quantizer: WeightQuantizer | None = None) -> tuple[MonarchBranch, torch.Tensor]:
    """Build the branch for ``weight (N, K)``; returns ``(branch, base (N, K))``. ``quantizer`` is needed by
    ``"residual"`` (it defines the error the branch fits)."""
    if mode not in INIT_MODES:
        raise ValueError(f"branch init mode must be one of {INIT_MODES}, got {mode!r}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (N, K), got shape {tuple(weight.shape)}")
    w = weight.detach().to(torch.float32)
    if mode == "weight":
        branch = MonarchBranch.projected(w, cfg)
        with torch.no_grad():
            base = w - branch.dense()
        return branch, base
    if quantizer is None:
        raise ValueError("the 'residual' init needs the layer's weight quantizer")
    with torch.no_grad():
        err = w - quantizer(w).to(torch.float32)
    return MonarchBranch.projected(err, cfg), w
