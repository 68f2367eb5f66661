"""Sharding a tree level's evaluations over ``torch.distributed`` processes.

Every process holds the same model, calibration set and search state. A level's work is a list of fixed
*units* (a node's candidates cut into chunks of ``group`` rows, the same chunks whatever the process count);
units go to processes by longest-processing-time-first on their estimated cost (rows times segments to run),
each process scores its units, and one ``all_reduce(SUM)`` of a float64 vector that is zero outside each
process's units gives every process every score, exactly (x + 0 = x). All processes then make the identical
Pareto drops, so the plan does not depend on the process count.

Launch: ``torchrun --nproc-per-node N -m treeq_engine search ...`` (NCCL on CUDA, gloo on CPU).
"""
from __future__ import annotations

import datetime
import os

import numpy as np
import torch
import torch.distributed as dist


def is_active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if is_active() else (0, 1)


def init_from_env(backend: str | None = None) -> bool:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1); returns whether one is active."""
    if is_active():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    # Rank 0 works alone at times (collecting the calibration set, closed-loop selection: many sampling runs)
    # while the others wait in a collective; NCCL's default 10-minute timeout would abort them.
    timeout = datetime.timedelta(seconds=float(os.environ.get("TREEQ_DIST_TIMEOUT_S", 6 * 3600)))
    dist.init_process_group(backend, timeout=timeout)
    return True


def _collective_device() -> torch.device:
    """NCCL reduces CUDA tensors, gloo CPU ones."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def assign(costs: list[float], world: int) -> list[int]:
    """Owner rank of each unit: largest first to the least-loaded rank (ties: lower unit index, lower rank)."""
    load = [0.0] * world
    owner = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += costs[i]
    return owner


def all_sum(values: np.ndarray) -> np.ndarray:
    """Element-wise sum over processes of a float64 vector (identity with one process)."""
    if not is_active():
        return values
    t = torch.as_tensor(values, dtype=torch.float64).to(_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu().numpy()


def barrier() -> None:
    if is_active():
        dist.barrier()
