"""Timing on the device: the median over many CUDA-graph replays (launch overhead excluded, as in serving).

``calls`` > 1 captures that many calls of ``fn`` in one graph and reports the time per call: for a kernel of a few
microseconds, one replay per event pair would add the graph's own launch latency to every sample. A caller that
wants cold-L2 numbers (a model streams its weights from HBM; an isolated layer replayed alone keeps them in
L2) makes ``fn`` rotate over enough copies of its operands, one per call.

On the CPU (for tests of the code paths, never for numbers) the same call times eager runs with a host clock.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def time_graph_ms(fn: Callable[[], object], *, reps: int = 50, warmup: int = 5, calls: int = 1,
                  device: torch.device | str | None = None) -> float:
    """Median milliseconds of one call of ``fn`` (no arguments, fixed shapes) on ``device`` (default: the current
    CUDA device when there is one, else the CPU)."""
    if calls < 1 or reps < 1:
        raise ValueError(f"calls and reps must be ≥ 1, got calls={calls}, reps={reps}")
    dev = torch.device(device) if device is not None else \
        torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if dev.type != "cuda":
        for _ in range(max(1, warmup // 5) * calls):
            fn()
        samples = []
        for _ in range(reps):
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            samples.append((time.perf_counter() - t0) * 1e3 / calls)
        return statistics.median(samples)
    with torch.cuda.device(dev):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad():   # first calls (caches, autotuning) outside the capture
            for _ in range(max(warmup, calls)):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.no_grad():
            for _ in range(calls):
                fn()
        for _ in range(3):
            graph.replay()
        torch.cuda.synchronize()
        samples = []
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for _ in range(reps):
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / calls)
        return statistics.median(samples)
