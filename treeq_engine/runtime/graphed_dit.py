"""A DiT whose forward replays CUDA graphs: one graph per input shape, captured on first use.

The sampler calls the model once per denoising step with the same shapes, so after the first step every call is
one graph replay instead of hundreds of kernel launches. ``forward_with_cfg`` and the attributes the sampler
reads (``config``, ``null_class``...) are the wrapped model's.

A graph holds the addresses of everything it read, the kernels' derived weight operands included: moving or
casting the wrapper forgets its graphs; after changing the weights otherwise (``load_state_dict``, fine-tuning)
call :meth:`reset` before the next forward, or the graphs would replay against operands the caches have since
rebuilt elsewhere.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from .graphs import GraphedStep


class GraphedDiT(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if not torch.cuda.is_available():
            raise RuntimeError("GraphedDiT needs a CUDA device; none is available (sample eagerly instead)")
        self.model = model
        self._graphs: dict[tuple, GraphedStep] = {}

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("model", "_graphs") or name.startswith("__"):   # (not yet set: no recursion)
                raise
            return getattr(self.model, name)

    def reset(self) -> None:
        """Forget every captured graph (they are captured again on next use)."""
        self._graphs.clear()

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> "GraphedDiT":
        self.reset()   # .to / .cuda / .half move or recast the weights the graphs read
        return super()._apply(fn, *args, **kwargs)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        key = (tuple(x.shape), x.dtype, tuple(t.shape), t.dtype, tuple(y.shape), y.dtype)
        step = self._graphs.get(key)
        if step is None:
            step = self._graphs[key] = GraphedStep(lambda a, b, c: self.model(a, b, c), [x, t, y])
        return step(x, t, y)

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float,
                         guided_channels: int | None = None) -> torch.Tensor:
        return type(self.model).forward_with_cfg(self, x, t, y, cfg_scale, guided_channels)
