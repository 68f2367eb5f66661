"""A diffusers DiT or PixArt transformer whose calls replay CUDA graphs, for the user's own pipeline::

    pipe.transformer = GraphedTransformer(pipe.transformer)    # FP, or quantized by runtime.quantize / an artifact
    images = pipe(prompt=prompts, num_inference_steps=20).images

A pipeline calls its transformer once per denoising step with the same shapes, so each call shape is captured
once (on first use, after a warm-up) and every later step is one graph replay instead of hundreds of kernel
launches, which at batch 1–8 is what sets the time (research/h100-baselines.md). The call's arguments are
brought to the search runner's input tuple (``DiffusersRunner.inputs``: the timestep broadcast to the batch, a
missing caption mask as ones, what the runner cannot reproduce an error) and the graph runs the runner's forward,
which tests hold bit-identical to the transformer's own. The pipeline and its scheduler run as before; every
attribute the pipeline reads (``config``, ``dtype``...) is the wrapped transformer's.

Each replay's output is a copy (the graph's own buffer is overwritten by the next step). As with ``GraphedDiT``,
a graph holds the addresses of what it read: after changing the weights call :meth:`reset`.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from .graphs import GraphedStep

StepFactory = Callable[[Callable[..., torch.Tensor], Sequence[torch.Tensor]], Callable[..., torch.Tensor]]


class GraphedTransformer(nn.Module):
    """``GraphedTransformer(transformer)``: called as the transformer is (``forward``'s signature, ``return_dict``
    honoured), each input shape captured once as a CUDA graph and replayed. ``step_factory`` makes the replayable
    step from ``(fn, example inputs)`` (default :class:`GraphedStep`, which needs CUDA)."""

    def __init__(self, transformer: nn.Module, *, step_factory: StepFactory | None = None) -> None:
        super().__init__()
        from ..search.diffusers_runner import DiffusersRunner

        if step_factory is None and not torch.cuda.is_available():
            raise RuntimeError("GraphedTransformer needs a CUDA device; none is available (run the pipeline eagerly)")
        self.transformer = transformer
        self.runner = DiffusersRunner(transformer)   # checks the architecture
        self._signature = inspect.signature(transformer.forward)
        self._factory: StepFactory = step_factory or GraphedStep
        self._graphs: dict[tuple, Callable[..., torch.Tensor]] = {}

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.transformer, name)

    @property
    def graphs(self) -> int:
        """How many call shapes have a captured graph."""
        return len(self._graphs)

    def reset(self) -> None:
        """Forget every captured graph (captured again on next use): call it after changing the weights."""
        self._graphs.clear()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        try:
            bound = self._signature.bind(*args, **kwargs)
        except TypeError as e:
            raise TypeError(f"{type(self.transformer).__name__}: {e}") from None
        inputs = self.runner.inputs(**bound.arguments)
        key = tuple((tuple(t.shape), t.dtype, t.device) for t in inputs)
        step = self._graphs.get(key)
        if step is None:
            step = self._graphs[key] = self._factory(lambda *xs: self.runner.forward(*xs), inputs)
        out = step(*inputs).clone()
        if not bound.arguments.get("return_dict", True):
            return (out,)
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        return Transformer2DModelOutput(sample=out)
