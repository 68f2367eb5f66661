"""Shared test setup. Triton kernels run under the interpreter on machines without a GPU; the variable must be
set before any module decorates a kernel, hence here, before the tests import the package."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; none is present on this machine")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture
def gen():
    """A fresh, seeded generator per test: reproducible yet independent inputs."""
    return torch.Generator().manual_seed(1234)
