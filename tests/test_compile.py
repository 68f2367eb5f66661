"""``torch.compile`` of packed models: the packed layers and the fused blocks trace without a graph break (no cache
lookup, no core call, no shape read off values inside the traced forward), the traced forward runs the fused
kernels (their calls counted while it is traced), and the compiled model equals the eager one. On the CPU with the
reference backend and ``aot_eager`` (inductor would compile C++ for minutes); on a GPU the kernels are custom ops
with fake implementations (``kernels/cuda_backend.py``, ``kernels/triton/backend.py``), which trace alike."""
import importlib

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="diffusers is an optional dependency (requirements-dev.txt)")

from test_mmdit_fused import count_kernels  # noqa: E402
from tinydit import one_thread  # noqa: E402,F401

from treeq_engine.plan import LayerConfig, QuantPlan  # noqa: E402
from treeq_engine.runtime import quantize, set_layout  # noqa: E402

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::UserWarning")]


def _conditioning(name):
    return importlib.import_module("test_fused_conditioning").MODELS[name]()


def _ltx_per_token():
    """LTX-Video's image to video: the conditioning frame at timestep 0, a timestep per token."""
    model, call = _conditioning("ltx")

    def per_token(m):
        kw = call(m)
        first = torch.zeros(2, kw["hidden_states"].shape[1])
        first[:, :24] = 1
        return dict(kw, timestep=torch.full((2, 1), 500.0) * (1 - first))

    return model, per_token, _sample


def _dit():
    from treeq_engine.models import DiT, dit_config

    torch.manual_seed(0)
    model = DiT(dit_config("DiT-test", num_classes=10)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    return model, lambda m: dict(x=x, t=torch.tensor([3, 700]), y=torch.tensor([1, 7])), lambda m, kw: m(**kw)


def _sample(model, kw):
    out = model(**kw)
    s = out.sample if hasattr(out, "sample") else out[0]
    return torch.cat([t.flatten() for t in s]) if isinstance(s, (list, tuple)) else s


CASES = {   # name: () -> (model, call(model) -> kwargs, output(model, kwargs) -> tensor)
    "DiT (ours)": _dit,
    "Flux": lambda: (*_conditioning("flux"), _sample),
    "Sana": lambda: (*_conditioning("sana"), _sample),
    "LTX-Video, a timestep per token": _ltx_per_token,
}


def _counted(model, kw, output):
    """``count_kernels`` for any output: the fused kernels' calls of one run of ``output(model, kw)``."""
    class Sampled(torch.nn.Module):
        def forward(self, **k):
            return type("Out", (), {"sample": output(model, k)})()

    return count_kernels(Sampled(), kw)[0]


@pytest.mark.parametrize("name", list(CASES))
def test_compiled_packed_models_trace_whole_and_equal_eager(name):
    import torch._dynamo as dynamo

    model, call, output = CASES[name]()
    plan = QuantPlan.block_uniform(model, 4, 8)
    if name.startswith("Flux"):   # (a branch, a W16 layer and another activation spec in the mix)
        from treeq_engine.plan import BranchConfig

        plan = plan.with_layer("transformer_blocks.0.attn.to_k", LayerConfig(16, 16)) \
            .with_layer("single_transformer_blocks.0.proj_mlp", LayerConfig(4, 8, branch=BranchConfig("monarch", 2))) \
            .with_layer("single_transformer_blocks.1.attn.to_q", LayerConfig(4, 4))
    quantize(model, plan, dtype=torch.float32)
    kw = call(model)
    eager_calls = _counted(model, kw, output)
    assert eager_calls["ln"] > 0
    with torch.no_grad():
        want = output(model, kw)
    dynamo.reset()   # (fullgraph: a graph break is an error)
    compiled = torch.compile(lambda **k: output(model, k), backend="aot_eager", fullgraph=True)
    traced = _counted(None, kw, lambda _, k: compiled(**k))   # (counted while traced: the fused path was taken)
    assert traced == eager_calls
    with torch.no_grad():
        got = compiled(**kw)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(compiled(**kw), want, rtol=1e-5, atol=1e-5)   # (and again, from its graph)


def test_a_compiled_model_follows_new_weights():
    """Weights loaded into a compiled model (in place, or assigned) are what its next call computes with: the graph
    derives its operands from the buffers as they are, not from a cache; in the fragment layout too, whose channel
    map a load takes anew."""
    import copy

    for layout in ("v1", "frag"):
        torch.manual_seed(0)
        a = torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.GELU(), torch.nn.Linear(48, 32))
        b = copy.deepcopy(a)
        with torch.no_grad():
            for p in b.parameters():
                p.mul_(-1.5)
        plan = QuantPlan.uniform(["0", "2"], 4, 8)
        quantize(a, plan, dtype=torch.float32)
        quantize(b, plan, dtype=torch.float32)
        for m in (a, b):
            set_layout(m, layout)
        x = torch.randn(5, 32)
        # (the fragment layout on the CPU: the reference unpacks it through the core, which no graph holds: that
        # call breaks the graph and runs eagerly, with the new codes)
        compiled = torch.compile(a, backend="aot_eager", fullgraph=layout == "v1")
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), a(x), rtol=0, atol=0)
            want = b(x)
            a.load_state_dict(b.state_dict())
            torch.testing.assert_close(compiled(x), want, rtol=0, atol=0)
            a[0].w_scale.mul_(2)   # (by hand: the compiled graph reads it too)
            torch.testing.assert_close(compiled(x), a(x), rtol=0, atol=0)
            fresh = copy.deepcopy(b)
            a.load_state_dict({k: v.clone() for k, v in fresh.state_dict().items()}, assign=True)
            torch.testing.assert_close(compiled(x), want, rtol=0, atol=0)
        if layout == "frag":
            assert a[0].__dict__["_row_chan"].device == a[0].w_frag.device


def test_the_fragment_layout_operand_traces_too():
    """The fragment layout's weight operand (what the CUDA kernels read) is built in the graph from the channel map
    the layer took eagerly (the core that builds the map is no graph op); a layer moved or copied keeps one."""
    import copy

    import torch._dynamo as dynamo

    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.GELU(), torch.nn.Linear(96, 64))
    quantize(model, QuantPlan.uniform(["0", "2"], 4, 8), dtype=torch.float32)
    assert set_layout(model, "frag") == {"v1": 0, "frag": 2}
    for layer in (model[0], copy.deepcopy(model[0]), model[0].to("cpu")):
        def operand(x, layer=layer):
            w = layer.packed_weight().frag
            return x + w.uzp.float().sum() + w.ucs.float().sum() + w.row_chan.float().sum() + w.scale.sum()

        x = torch.zeros(1)
        dynamo.reset()
        assert dynamo.explain(operand)(x).graph_break_count == 0
        torch.testing.assert_close(torch.compile(operand, backend="aot_eager", fullgraph=True)(x), operand(x))


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["DiT (ours)", "Flux", "LTX-Video, a timestep per token"])
def test_compiled_on_gpu(name):
    """On the GPU, bf16, inductor: the packed layers' kernels (CUDA or Triton custom ops, with their fake
    implementations) trace without a graph break in the fused path, and the compiled model agrees with the eager
    one within bf16's rounding (inductor fuses the elementwise work between the kernels)."""
    import torch._dynamo as dynamo
    from test_mmdit_fused import on_gpu

    model, call, output = CASES[name]()
    model = model.cuda().to(torch.bfloat16)
    quantize(model, QuantPlan.block_uniform(model, 4, 8), dtype=torch.bfloat16)
    kw = on_gpu(call(model))
    with torch.no_grad():
        want = output(model, kw).float()
        dynamo.reset()
        explained = dynamo.explain(lambda **k: output(model, k))(**kw)
        assert explained.graph_break_count == 0, [str(r.reason).splitlines()[0] for r in explained.break_reasons]
        dynamo.reset()
        got = torch.compile(lambda **k: output(model, k))(**kw).float()
    assert torch.isfinite(got).all()
    assert float((got - want).norm() / want.norm()) < 2e-2
