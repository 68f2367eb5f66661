"""Capture a fixed-shape step (one denoising step, one forward) in a CUDA graph and replay it.

At DiT sizes a forward is hundreds of small kernels: at batch 1–8 launch overhead, not arithmetic, sets the
time (docs/sources.md), so the runtime replays whole steps as graphs. Inputs are copied into static
buffers before each replay; the returned output is the graph's static buffer (clone it to keep it past the next
replay).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch


class GraphedStep:
    """``step = GraphedStep(fn, example_inputs)``; then ``step(*inputs)`` replays ``fn`` on new values of the
    same shapes, dtypes and device."""

    def __init__(self, fn: Callable[..., torch.Tensor], example_inputs: Sequence[torch.Tensor], *, warmup: int = 3):
        if not torch.cuda.is_available():
            raise RuntimeError("CUDA graphs need a CUDA device; none is available (run eagerly instead)")
        if not example_inputs:
            raise ValueError("a graphed step needs at least one input tensor (its device places the graph)")
        for i, t in enumerate(example_inputs):
            if not isinstance(t, torch.Tensor) or t.device.type != "cuda":
                raise ValueError(f"graph input {i} must be a CUDA tensor, got "
                                 f"{type(t).__name__ if not isinstance(t, torch.Tensor) else t.device}")
        self.fn = fn
        with torch.inference_mode(False):   # plain tensors: later copies into them work in or out of inference mode
            self.static_inputs = [t.clone() for t in example_inputs]
        with torch.cuda.device(example_inputs[0].device):   # the inputs' GPU, not whichever is current
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side), torch.no_grad():  # warm-up: autotuning and allocations happen here
                for _ in range(warmup):
                    fn(*self.static_inputs)
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            # a capture stream of the inputs' GPU (torch's default one belongs to whichever GPU captured first)
            with torch.cuda.graph(self.graph, stream=torch.cuda.Stream()), torch.no_grad():
                self.static_output = fn(*self.static_inputs)

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        if len(inputs) != len(self.static_inputs):
            raise ValueError(f"expected {len(self.static_inputs)} inputs, got {len(inputs)}")
        for i, (dst, src) in enumerate(zip(self.static_inputs, inputs)):
            if src.shape != dst.shape or src.dtype != dst.dtype:
                raise ValueError(f"graph input {i}: captured {tuple(dst.shape)} {dst.dtype}, got "
                                 f"{tuple(src.shape)} {src.dtype}; capture a new graph for new shapes")
            dst.copy_(src, non_blocking=True)
        self.graph.replay()
        return self.static_output
