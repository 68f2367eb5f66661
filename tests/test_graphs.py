import pytest
import torch

from treeq_engine.runtime.graphs import GraphedStep


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error path")
def test_no_gpu_error():
    with pytest.raises(RuntimeError, match="need a CUDA device"):
        GraphedStep(lambda x: x * 2, [torch.ones(3)])


@pytest.mark.gpu
def test_replay_matches_eager():
    lin = torch.nn.Linear(64, 32).cuda()
    fn = lambda x: torch.nn.functional.gelu(lin(x))  # noqa: E731
    step = GraphedStep(fn, [torch.randn(8, 64, device="cuda")])
    for _ in range(3):
        x = torch.randn(8, 64, device="cuda")
        torch.testing.assert_close(step(x).clone(), fn(x))
    with pytest.raises(ValueError, match="capture a new graph"):
        step(torch.randn(4, 64, device="cuda"))


def test_graphed_dit_forgets_its_graphs_when_moved(monkeypatch):
    """Moving or casting the wrapper forgets its graphs (they hold the old addresses); an instance not yet
    initialised does not recurse on attribute lookups. (Construction only: no capture, so no GPU needed.)"""
    import torch.nn as nn

    from treeq_engine.runtime.graphed_dit import GraphedDiT

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    g = GraphedDiT(nn.Linear(2, 2))
    g._graphs[("shape",)] = object()
    g.to(torch.float64)
    assert not g._graphs and g.model.weight.dtype == torch.float64
    assert g.in_features == 2   # the wrapped model's attributes
    assert not hasattr(GraphedDiT.__new__(GraphedDiT), "anything")
