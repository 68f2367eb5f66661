"""`treeq profile` writes a well-formed latency table (CPU timings: the pipeline, not the numbers)."""
import json

import pytest

from treeq_engine.cli import main


def test_profile_table(tmp_path):
    out = tmp_path / "lut.json"
    assert main(["profile", "--config", "DiT-test", "--device", "cpu", "--reps", "1", "--tokens", "16,32",
                 "--formats", "W16A16,W4A8,W3A3", "--branch", "monarch:4:1", "--out", str(out)]) == 0
    lut = json.loads(out.read_text())
    assert lut["schema"] == "treeq-latency-lut" and lut["version"] == 1 and lut["backend"] == "reference"
    shapes = {(e["k"], e["n"]) for e in lut["entries"]}
    assert shapes == {(32, 96), (32, 32), (32, 128), (128, 32), (32, 192), (256, 32), (32, 64)}
    keys = {(e["k"], e["n"], e["tokens"], e["w_bits"], e["a_bits"], bool(e["branch"])) for e in lut["entries"]}
    assert len(keys) == len(lut["entries"])  # no duplicates
    assert all(e["us"] > 0 for e in lut["entries"])
    assert not any(e["w_bits"] == 16 and e["branch"] for e in lut["entries"])


def test_default_profile_covers_what_the_search_looks_up(tmp_path):
    """`treeq profile` with its defaults writes every entry a default latency search of the same model reads, at
    each profiled serving batch (adaLN and the embedders at one row per image, the rest every token)."""
    import torch

    from treeq_engine.models import DiT, dit_config
    from treeq_engine.search import SearchSpace, cost_model
    from treeq_engine.search.costs import LatencyTable

    out = tmp_path / "lut.json"
    assert main(["profile", "--config", "DiT-test", "--device", "cpu", "--reps", "1", "--batch", "1,4",
                 "--out", str(out)]) == 0
    lut = LatencyTable.load(out)
    torch.manual_seed(0)
    model = DiT(dit_config("DiT-test"))
    c = model.config
    probe = [torch.randn(2, c.in_channels, c.input_size, c.input_size), torch.tensor([1, 2]), torch.tensor([0, 1])]
    space = SearchSpace.build(model, probe)
    for serve in (1, 4):
        cm = cost_model(space, "latency", latency_table=lut, serve_batch=serve)
        assert cm.table.shape[:2] == (len(space.leaves), len(space.candidates)) and (cm.table > 0).all()
    rows = {(e["k"], e["n"], e["tokens"]) for e in json.loads(out.read_text())["entries"]}
    d = c.hidden_size
    assert (d, 6 * d, 1) in rows and (d, 6 * d, 4) in rows and (d, 3 * d, 4 * c.num_tokens) in rows
    assert (d, 3 * d, 1) not in rows   # only the rows the model runs


def test_time_graph_ms_host_path_counts_calls():
    """On the CPU the timer runs ``calls`` calls per sample (the graph path captures that many per replay)."""
    from treeq_engine.runtime.timing import time_graph_ms

    n = []
    ms = time_graph_ms(lambda: n.append(1), reps=2, warmup=5, calls=3, device="cpu")
    assert ms >= 0 and len(n) == 3 + 2 * 3
    with pytest.raises(ValueError, match="calls and reps must be"):
        time_graph_ms(lambda: None, calls=0, device="cpu")


@pytest.mark.gpu
def test_profile_on_the_gpu():
    """On a GPU: the graph timer over rotating weight copies gives finite, positive per-call times, and the table
    names the device and the backend the runtime uses there."""
    import torch

    from treeq_engine.runtime.profile import profile_layers

    lut = profile_layers([(1152, 1152, 256), (1152, 6912, 8)], [(16, 16), (4, 8), (8, 8)], device="cuda", reps=5,
                         progress=False)
    assert lut["device"] == torch.cuda.get_device_name() and lut["backend"] in ("cuda", "triton")
    us = {(e["n"], e["w_bits"]): e["us"] for e in lut["entries"]}
    assert len(us) == 6 and all(0 < v < 10_000 for v in us.values()), us
