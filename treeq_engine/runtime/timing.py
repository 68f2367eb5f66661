"""Timing on the device: the median over many CUDA-graph replays (launch overhead excluded, as in serving).

On the CPU (for tests of the code paths, never for numbers) the same call times eager runs with a host clock.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def time_graph_ms(fn: Callable[[], object], *, reps: int = 50, warmup: int = 5) -> float:
    """Median milliseconds of one call of ``fn`` (no arguments, fixed shapes)."""
    if not torch.cuda.is_available():
        for _ in range(max(1, warmup // 5)):
            fn()
        samples = []
        for _ in range(max(1, reps)):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(samples)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
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
        samples.append(start.elapsed_time(end))
    return statistics.median(samples)
