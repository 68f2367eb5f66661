"""Shared test setup. Triton kernels run under the interpreter on machines without a GPU; the variable must be
set before any module decorates a kernel, hence here, before the tests import the package."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_CUDA = torch.cuda.is_available()

if os.environ.get("PYTEST_XDIST_WORKER"):  # N worker processes share the cores (CPU references, ptxas, Inductor)
    _workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    torch.set_num_threads(max(1, (os.cpu_count() or _workers) // _workers))
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

# On a GPU, the order of importance (a time-limited run reports the first ones even if cut off): the CUDA kernels
# and the core, then the Triton kernels' exact integer checks, then the rest; the Inductor test early, so that
# its cold compile is not the last thing a worker does.
_GPU_ORDER = ("test_cuda_kernels.py", "test_core_cpp.py", "test_graphs.py", "test_nn_grouped.py",
              "test_triton_gpu.py::test_integer", "test_triton_gpu.py::test_gluon", "test_triton_gpu.py")


def _gpu_rank(item) -> int:
    nodeid = item.nodeid.split("/")[-1]
    return next((i for i, p in enumerate(_GPU_ORDER) if nodeid.startswith(p)), len(_GPU_ORDER))


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; none is present on this machine")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
    if HAS_CUDA:
        items.sort(key=_gpu_rank)  # stable: file order kept within a rank


@pytest.fixture
def gen():
    """A fresh, seeded generator per test: reproducible yet independent inputs."""
    return torch.Generator().manual_seed(1234)
