"""Capturing one layer's inputs on the calibration set.

The model runs each calibration batch until the hooked layer has seen its input, then stops (the rest of the
forward is not needed), so capturing layer ``i`` costs about ``i/n`` of a forward. Tokens are subsampled per
batch with a seeded generator so that a resumed calibration sees exactly the same rows.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

CalibBatch = tuple  # positional model inputs, e.g. (x_t, t, y)


class _Captured(Exception):
    """Raised by the hook to stop the forward once the layer's input is taken."""


@torch.no_grad()
def capture_inputs(model: nn.Module, name: str, batches: Sequence[CalibBatch], max_tokens: int,
                   seed: int = 0) -> torch.Tensor:
    """Float32 ``(M, K)`` inputs of module ``name`` over ``batches``, at most ``max_tokens`` rows (an equal
    share per batch, drawn without replacement)."""
    if not batches:
        raise ValueError("calibration needs at least one batch of model inputs")
    if max_tokens <= 0:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    module = model.get_submodule(name)
    per_batch = max(1, -(-max_tokens // len(batches)))
    gen = torch.Generator().manual_seed(seed)
    rows: list[torch.Tensor] = []

    def hook(mod: nn.Module, args: tuple) -> None:
        x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float32)
        if x.shape[0] > per_batch:
            idx = torch.randperm(x.shape[0], generator=gen)[:per_batch].to(x.device)
            x = x[idx]
        rows.append(x)
        raise _Captured

    handle = module.register_forward_pre_hook(hook)
    try:
        for batch in batches:
            try:
                model(*batch)
            except _Captured:
                pass
            else:
                raise RuntimeError(f"layer {name!r} was not called by the model's forward on a calibration batch")
    finally:
        handle.remove()
    return torch.cat(rows)[:max_tokens]
