"""diffusers' DiT and PixArt transformers go through the same enumeration and swapping API (tiny random configs,
offline)."""
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
diffusers = pytest.importorskip("diffusers", reason="diffusers is an optional dependency (requirements-dev.txt)")

from tiny_diffusers import tiny_dit, tiny_pixart  # noqa: E402

from treeq_engine.demo import uniform_plan  # noqa: E402
from treeq_engine.nn import QuantLinear, convert, forward_order, quant_layers, quantizable_linears  # noqa: E402
from treeq_engine.plan import QuantPlan, is_block_layer  # noqa: E402


def randomize(model, gen):
    with torch.no_grad():  # diffusers zero-inits adaLN-Zero and outputs, which would hide a broken swap
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model


@pytest.mark.parametrize("kind", ["dit", "pixart"])
def test_enumerate_order_and_convert(kind, gen):
    if kind == "dit":
        model = randomize(tiny_dit(), gen)
        inputs = dict(hidden_states=torch.randn(2, 4, 8, 8, generator=gen), timestep=torch.tensor([10, 500]),
                      class_labels=torch.tensor([1, 3]))
        expect_first, block_linears = "transformer_blocks.0.norm1.emb.timestep_embedder.linear_1", 7
    else:
        model = randomize(tiny_pixart(), gen)
        inputs = dict(hidden_states=torch.randn(2, 4, 8, 8, generator=gen), timestep=torch.tensor([10, 500]),
                      encoder_hidden_states=torch.randn(2, 5, 24, generator=gen))
        expect_first, block_linears = "adaln_single.emb.timestep_embedder.linear_1", 10
    names = quantizable_linears(model)
    order = forward_order(model, **inputs)
    assert sorted(order) == sorted(names) and order[0] == expect_first
    blocks = [n for n in names if is_block_layer(n)]
    assert len(blocks) == 2 * block_linears
    assert all(".emb." not in n for n in blocks)  # the per-block embedder copies are edge layers
    with torch.no_grad():
        ref = model(**inputs).sample
    convert(model, QuantPlan.uniform(names, 16, 16))
    assert len(quant_layers(model)) == len(names)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).sample, ref)  # 16 bits: the identity
    convert(model, uniform_plan(model, 4, 4))
    assert {m.config.label for n, m in quant_layers(model).items() if is_block_layer(n)} == {"W4A4"}
    assert {m.config.label for n, m in quant_layers(model).items() if not is_block_layer(n)} == {"W8A8"}
    with torch.no_grad():
        q = model(**inputs).sample
    assert torch.isfinite(q).all() and not torch.allclose(q, ref)
    # exactly the fake-quant math of one swapped layer
    layer = model.get_submodule(blocks[3])
    assert isinstance(layer, QuantLinear)
    x = torch.randn(3, layer.in_features, generator=gen)
    lin = torch.nn.functional.linear
    from treeq_engine.format import fake_quantize

    want = lin(fake_quantize(x, layer.act_spec), fake_quantize(layer.weight, layer.weight_spec), layer.bias)
    torch.testing.assert_close(layer(x), want)
