"""Packed DiT inference: the fused blocks equal the unfused packed model, which equals the fake-quant model."""
import pytest
import torch

from treeq_engine.models import DiT, dit_config
from treeq_engine.nn import convert, quantizable_linears
from treeq_engine.plan import BranchConfig, LayerConfig, QuantPlan, is_block_layer
from treeq_engine.runtime import quantize, treeq_layers
from treeq_engine.runtime.dit_fused import FusedDiTBlock


def _dit(seed=0):
    torch.manual_seed(seed)
    m = DiT(dit_config("DiT-test", num_classes=10)).eval()
    with torch.no_grad():  # the reference zero-inits adaLN and the output: perturb so every layer matters
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


def _inputs(gen):
    x = torch.randn(2, 4, 8, 8, generator=gen)
    return x, torch.tensor([3, 700]), torch.tensor([1, 7])


def _plan(model, fc2_branch=False):
    names = quantizable_linears(model, include=is_block_layer)
    layers = {n: LayerConfig(4, 8) for n in names}
    layers["blocks.1.mlp.fc1"] = LayerConfig(3, 4)
    if fc2_branch:
        layers["blocks.0.mlp.fc2"] = LayerConfig(4, 8, branch=BranchConfig("monarch", 4, 1))
    return QuantPlan(layers)


def quantize_calls(monkeypatch) -> list[str]:
    """The names of the packed layers whose ``quantize_input`` runs from now on, in call order."""
    from treeq_engine.runtime.linear import TreeQLinear

    calls = []
    orig = TreeQLinear.quantize_input

    def counting(self, x2, **kw):
        calls.append(self.name)
        return orig(self, x2, **kw)

    monkeypatch.setattr(TreeQLinear, "quantize_input", counting)
    return calls


@pytest.mark.parametrize("fc2_branch", [False, True])
def test_fused_equals_unfused_and_fake_quant(fc2_branch, gen):
    x, t, y = _inputs(gen)
    plan = _plan(_dit(), fc2_branch)
    with torch.no_grad():
        sim = convert(_dit(), plan)(x, t, y)
        unfused = quantize(_dit(), plan, dtype=torch.float32, fuse=False)
        fused = quantize(_dit(), plan, dtype=torch.float32)
        assert sum(isinstance(b, FusedDiTBlock) for b in fused.blocks) == 2
        assert not any(isinstance(b, FusedDiTBlock) for b in unfused.blocks)
        a, b = unfused(x, t, y), fused(x, t, y)
    scale = float(sim.abs().max())
    if not fc2_branch:  # the branch's closed-form init differs from the fake-quant model (no branch there)
        torch.testing.assert_close(a, sim, rtol=0, atol=2e-4 * scale)
    torch.testing.assert_close(b, a, rtol=0, atol=1e-4 * scale)  # the same math, fused
    assert set(fused.state_dict()) == set(unfused.state_dict())


def test_uniform_plan_packs_every_block_linear():
    m = _dit()
    quantize(m, _plan(m), dtype=torch.float32)
    assert len(treeq_layers(m)) == len(quantizable_linears(_dit(), include=is_block_layer))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gated_residual_fused_where_packed(dtype, gen):
    """proj and fc2 add the gated residual in their epilogue when they are packed with quantized activations; a
    weight-only proj (block 1) and a 16-bit fc2 (block 0) keep the separate multiply and add. Fused and unfused
    agree to the output type's rounding (the fused residual rounds once less)."""
    x, t, y = _inputs(gen)
    plan = _plan(_dit())
    layers = dict(plan.layers)
    layers["blocks.1.attn.proj"] = LayerConfig(4, 16)
    del layers["blocks.0.mlp.fc2"]
    plan = QuantPlan(layers)
    with torch.no_grad():
        unfused = quantize(_dit(), plan, dtype=dtype, fuse=False).to(dtype)
        fused = quantize(_dit(), plan, dtype=dtype).to(dtype)
        blocks = [b for b in fused.blocks if isinstance(b, FusedDiTBlock)]
        assert [(b.proj_residual, b.fc2_residual) for b in blocks] == [(True, False), (False, True)]
        a, b = unfused(x.to(dtype), t, y), fused(x.to(dtype), t, y)
        for blk in blocks:   # the separate multiply and add everywhere (bench_e2e's A/B), fc1 → fc2 codes included
            blk.proj_residual = blk.fc2_residual = False
        c = fused(x.to(dtype), t, y)
    scale = float(a.float().abs().max())
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(b.float(), a.float(), rtol=0, atol=tol * scale)
    torch.testing.assert_close(c.float(), a.float(), rtol=0, atol=tol * scale)


@pytest.mark.parametrize("second_spec", [8, 4])
def test_adaln_input_quantized_once_per_forward(second_spec, gen, monkeypatch):
    """SiLU(c)'s codes are computed once per forward for every block's adaLN linear with the same activation spec
    (one more call for a block whose adaLN has another spec), afresh for the next forward's c."""
    x, t, y = _inputs(gen)
    model = _dit()
    plan = _plan(model)
    layers = dict(plan.layers)
    layers.update({"blocks.0.adaLN_modulation.1": LayerConfig(4, 8),
                   "blocks.1.adaLN_modulation.1": LayerConfig(4, second_spec)})
    plan = QuantPlan(layers)
    with torch.no_grad():
        unfused = quantize(_dit(), plan, dtype=torch.float32, fuse=False)
        fused = quantize(_dit(), plan, dtype=torch.float32)
    assert all(b.ada_fused for b in fused.blocks) and fused.blocks[0].shared is fused.blocks[1].shared
    calls = quantize_calls(monkeypatch)
    with torch.no_grad():
        for tt in (t, t + 100):   # a second forward: new c, new codes
            a = unfused(x, tt, y)
            calls.clear()
            b = fused(x, tt, y)
            want = ["blocks.0.adaLN_modulation.1"] + ["blocks.1.adaLN_modulation.1"] * (second_spec != 8)
            assert [n for n in calls if "adaLN" in n] == want
            torch.testing.assert_close(b, a, rtol=0, atol=1e-4 * float(a.abs().max()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 2])
def test_separate_residual_at_any_batch(dtype, batch, gen):
    """A block whose proj keeps the separate multiply and add (weight-only proj; all blocks in bench_e2e's A/B)
    runs at batch 1 too: the first block's input is a transposed view (the patch embedding), and fc1's
    quantization takes contiguous rows."""
    x = torch.randn(batch, 4, 8, 8, generator=gen).to(dtype)
    t, y = torch.tensor([3, 700][:batch]), torch.tensor([1, 7][:batch])
    layers = dict(_plan(_dit()).layers)
    layers["blocks.0.attn.proj"] = LayerConfig(4, 16)
    plan = QuantPlan(layers)
    with torch.no_grad():
        a = quantize(_dit(), plan, dtype=dtype, fuse=False).to(dtype)(x, t, y)
        fused = quantize(_dit(), plan, dtype=dtype).to(dtype)
        assert not fused.blocks[0].proj_residual
        b = fused(x, t, y)
        for blk in fused.blocks:   # the A/B: every residual separate
            blk.proj_residual = blk.fc2_residual = False
        c = fused(x, t, y)
    scale = float(a.float().abs().max())
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(b.float(), a.float(), rtol=0, atol=tol * scale)
    torch.testing.assert_close(c.float(), a.float(), rtol=0, atol=tol * scale)


def test_adaln_codes_shared_within_one_model_call_only(gen, monkeypatch):
    """The model's call scopes the shared SiLU(c) codes: nothing survives it (no stale codes for a c changed in
    place, e.g. a CUDA graph's static input; no activations held; the model pickles), an exception closes it
    too, a block called on its own quantizes its input itself, and a copy of the model shares its own."""
    import copy
    import io

    x, t, y = _inputs(gen)
    fused = quantize(_dit(), _plan(_dit()), dtype=torch.float32)
    shared = fused.blocks[0].shared
    calls = quantize_calls(monkeypatch)
    with torch.inference_mode():
        want = fused(x, t, y)
    assert sum("adaLN" in n for n in calls) == 1
    assert not shared._active and shared._scope is None

    with torch.no_grad():   # one c object, new contents: the block sees the new ones
        h, c = fused.embed(x, t, y)
        fused.blocks[0](h, c)
        c.mul_(2)
        torch.testing.assert_close(fused.blocks[0](h, c), fused.blocks[0](h, c.clone()), rtol=0, atol=0)

    def boom(mod, args):
        raise RuntimeError("boom")

    handle = fused.blocks[1].register_forward_pre_hook(boom)
    with pytest.raises(RuntimeError, match="boom"), torch.no_grad():
        fused(x, t, y)
    handle.remove()
    assert not shared._active and shared._scope is None

    buf = io.BytesIO()
    torch.save(fused, buf)
    buf.seek(0)
    for other in (copy.deepcopy(fused), torch.load(buf, weights_only=False)):
        assert other.blocks[0].shared is other.blocks[1].shared is not shared
        calls.clear()
        with torch.no_grad():
            torch.testing.assert_close(other(x, t, y), want, rtol=0, atol=0)
        assert sum("adaLN" in n for n in calls) == 1


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 2])
def test_fused_blocks_on_gpu(batch):
    """On the GPU's kernels, bf16: the fused DiT (a weight-only proj in block 0: the separate-residual path; float32
    adaLN output; shared SiLU(c) codes) equals the unfused packed model, so does the A/B with every residual
    separate, and a CUDA-graph replay with new inputs equals eager (the shared codes recorded inside the graph)."""
    from treeq_engine.runtime.graphed_dit import GraphedDiT

    dev, dt = "cuda", torch.bfloat16
    layers = dict(_plan(_dit()).layers)
    layers["blocks.0.attn.proj"] = LayerConfig(4, 16)
    plan = QuantPlan(layers)
    g = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, 4, 8, 8, generator=g).to(dev, dt)
    t, y = torch.randint(0, 1000, (batch,), generator=g).to(dev), torch.randint(0, 10, (batch,), generator=g).to(dev)
    with torch.no_grad():
        unfused = quantize(_dit().to(dev, dt), plan, dtype=dt, fuse=False)
        fused = quantize(_dit().to(dev, dt), plan, dtype=dt)
        a, b = unfused(x, t, y), fused(x, t, y)
        for blk in fused.blocks:
            blk.proj_residual = blk.fc2_residual = False
        c = fused(x, t, y)
        scale = float(a.float().abs().max())
        for out in (b, c):
            torch.testing.assert_close(out.float(), a.float(), rtol=0, atol=3e-2 * scale)
        model = quantize(_dit().to(dev, dt), plan, dtype=dt)
        graphed = GraphedDiT(model)
        for tt in (t, (t + 400) % 1000):
            e, r = model(x, tt, y), graphed(x, tt, y).clone()
            torch.testing.assert_close(r.float(), e.float(), rtol=0, atol=1e-2 * float(e.float().abs().max()))
