import json

import pytest
import torch
import torch.nn as nn

from treeq_engine.format import QuantSpec, fake_quantize
from treeq_engine.nn import (QuantLinear, apply_plan, convert, forward_order, noise_scale, quant_layers,
                             quantizable_linears, unconvert)
from treeq_engine.plan import BranchConfig, LayerConfig, PlanError, QuantPlan, is_block_layer


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.fc2 = nn.Linear(2 * d, d)  # registered before fc1: module order != forward order
        self.fc1 = nn.Linear(d, 2 * d)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(x)))


class Net(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.blocks = nn.ModuleList([Block(d), Block(d)])
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def test_layer_config_validation():
    with pytest.raises(PlanError, match="unsupported weight bit-width 5"):
        LayerConfig(5, 8)
    with pytest.raises(PlanError, match="unsupported activation bit-width 2"):
        LayerConfig(4, 2)
    with pytest.raises(PlanError, match="lowrank branch has blocks=1"):
        BranchConfig("lowrank", blocks=4)
    assert LayerConfig(4, 4, branch={"kind": "monarch", "blocks": 8, "rank": 1}).branch == BranchConfig("monarch", 8, 1)
    assert LayerConfig(16, 16).label == "W16A16"


def test_plan_json_roundtrip_and_errors(tmp_path):
    net = Net()
    names = quantizable_linears(net, include=is_block_layer)
    assert names == ["blocks.0.fc2", "blocks.0.fc1", "blocks.1.fc2", "blocks.1.fc1"]
    plan = QuantPlan.uniform(names, 4, 4, model="net", edge_names=["head"])
    plan = plan.with_layer("blocks.1.fc1", LayerConfig(3, 8, branch=BranchConfig("monarch", 4, 1)))
    plan.save(tmp_path / "p.json")
    back = QuantPlan.load(tmp_path / "p.json")
    assert back == plan and list(back.layers) == list(plan.layers)
    d = plan.to_dict()
    for bad, msg in [({**d, "schema": "x"}, "not a TreeQ plan"), ({**d, "version": 99}, "version 99"),
                     ({**d, "extra": 1}, "unknown plan field"),
                     ({**d, "layers": {"a": {"w_bits": 4}}}, r"layer 'a': missing \['a_bits'\]"),
                     ({**d, "layers": {"a": {"w_bits": 7, "a_bits": 8}}}, "layer 'a': unsupported weight bit-width 7"),
                     ({**d, "layers": {"a": {"w_bits": 4, "a_bits": 8, "groups": 2}}}, "unknown field")]:
        with pytest.raises(PlanError, match=msg):
            QuantPlan.from_dict(json.loads(json.dumps(bad)))
    with pytest.raises(PlanError, match="not valid JSON"):
        QuantPlan.from_json("{")
    with pytest.raises(PlanError, match="does not have"):
        QuantPlan.uniform(["blocks.0.fc3"], 4, 4).validate(net)
    with pytest.raises(PlanError, match="must be nn.Linear"):
        QuantPlan.uniform(["blocks.0"], 4, 4).validate(net)


def test_forward_order_and_convert(gen):
    net = Net()
    x = torch.randn(5, 16, generator=gen)
    assert forward_order(net, x) == ["blocks.0.fc1", "blocks.0.fc2", "blocks.1.fc1", "blocks.1.fc2", "head"]
    ref = net(x)
    plan = QuantPlan.uniform(quantizable_linears(net), 16, 16)
    convert(net, plan)
    assert len(quant_layers(net)) == 5
    torch.testing.assert_close(net(x), ref)  # 16 bits: identity
    apply_plan(net, QuantPlan.uniform(quantizable_linears(net), 4, 4))
    y = net(x)
    assert not torch.allclose(y, ref)
    # one layer by hand equals the oracle composition
    q = net.blocks[0].fc1
    xin = torch.randn(3, 16, generator=gen)
    expect = fake_quantize(xin, QuantSpec.activation(4)) @ fake_quantize(q.weight, QuantSpec.weight(4)).T + q.bias
    torch.testing.assert_close(q(xin), expect)
    with noise_scale(net, 0.0):
        torch.testing.assert_close(net(x), ref)
    unconvert(net)
    assert not quant_layers(net) and isinstance(net.head, nn.Linear)
    torch.testing.assert_close(net(x), ref)


def test_noise_scale_interpolates(gen):
    lin = nn.Linear(16, 8)
    q = QuantLinear(lin, LayerConfig(3, 3))
    x = torch.randn(4, 16, generator=gen)
    full, fp = q(x), lin(x)
    q.set_noise_scale(0.5)
    xq = x + 0.5 * (fake_quantize(x, QuantSpec.activation(3)) - x)
    wq = lin.weight + 0.5 * (fake_quantize(lin.weight, QuantSpec.weight(3)) - lin.weight)
    torch.testing.assert_close(q(x), xq @ wq.T + lin.bias)
    assert not torch.allclose(q(x), full) and not torch.allclose(q(x), fp)
    with pytest.raises(ValueError, match=r"λ must be in \[0, 1\]"):
        q.set_noise_scale(1.5)


def test_gradients_flow_and_cache(gen):
    q = QuantLinear(nn.Linear(16, 8), LayerConfig(4, 8))
    x = torch.randn(4, 16, generator=gen, requires_grad=True)
    q(x).sum().backward()
    assert q.weight.grad is not None and x.grad is not None
    with torch.no_grad():
        a = q.quantized_weight()
        assert q.quantized_weight() is a  # cached
        q.weight.add_(0.1)
        assert q.quantized_weight() is not a  # weight changed: recomputed


def _ref(q, x):
    return torch.nn.functional.linear(fake_quantize(x, q.act_spec), fake_quantize(q.weight, q.weight_spec), q.bias)


def test_cache_across_modes_and_unseen_writes(gen):
    """A weight cached under inference_mode is not reused where autograd may save it (that crashed the backward);
    a fused optimizer's step, which the version counters miss, is caught by clear_caches."""
    from treeq_engine.nn import clear_caches

    q = QuantLinear(nn.Linear(16, 8), LayerConfig(4, 8))
    q.weight.requires_grad_(False)
    q.bias.requires_grad_(False)
    x = torch.randn(4, 16, generator=gen)
    with torch.inference_mode():
        q(x)
    xg = x.clone().requires_grad_(True)
    q(xg).sum().backward()   # frozen base weight, gradient for x (PEFT's case)
    assert xg.grad is not None
    q.weight.requires_grad_(True)
    opt = torch.optim.SGD(q.parameters(), lr=0.5, fused=True) if _fused_ok() else None
    if opt is not None:
        with torch.no_grad():
            q(x)
        q(x).pow(2).sum().backward()
        opt.step()
        clear_caches(q)
        with torch.no_grad():
            torch.testing.assert_close(q(x), _ref(q, x), rtol=0, atol=0)


def _fused_ok():
    try:
        torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1, fused=True)
        return True
    except (RuntimeError, ValueError):
        return False


def test_grouped_mode_agrees_with_single_mode(gen):
    """full_precision wins over groups (as over a config); a branch attached while grouped is used; under
    autocast the grouped output has single mode's dtype."""
    from treeq_engine.branches import MonarchBranch

    q = QuantLinear(nn.Linear(16, 8), LayerConfig(4, 8))
    x = torch.randn(4, 16, generator=gen)
    with torch.no_grad():
        q.set_group_configs([LayerConfig(2, 3)] * 2)
        q.full_precision = True
        torch.testing.assert_close(q(x), nn.functional.linear(x, q.weight, q.bias), rtol=0, atol=0)
        q.full_precision = False
        q(x)
        q.branch = MonarchBranch(8, 16, blocks=2, rank=1)
        nn.init.normal_(q.branch.w1)
        nn.init.normal_(q.branch.w2)
        grouped = q(x)
        q.set_group_configs(None)
        q.set_config(LayerConfig(2, 3))
        torch.testing.assert_close(grouped, q(x), rtol=1e-5, atol=1e-5)
        q.branch = None
        q.set_group_configs([LayerConfig(4, 8)] * 2)
        with torch.autocast("cpu", torch.bfloat16):
            y = q(x)
            q.set_group_configs(None)
            assert y.dtype == q(x).dtype == torch.bfloat16


def test_load_state_dict_checks_a_frozen_weight(gen):
    q = QuantLinear(nn.Linear(16, 8), LayerConfig(4, 8))
    q.freeze_weight()
    sd = {k: v.clone() for k, v in q.state_dict().items()}
    q.load_state_dict(sd)   # its own state loads
    for field, value, msg in (("w_scale", -1.0, "frozen scale must be finite and positive"),
                              ("w_codes", 100, r"codes outside \[-8, 7\]"),
                              ("w_zero_point", 9, r"frozen zero_point must lie in \[-8, 7\]")):
        bad = {k: v.clone() for k, v in sd.items()}
        bad[field].view(-1)[0] = value
        with pytest.raises(RuntimeError, match=msg):
            q.load_state_dict(bad)
        assert torch.equal(q.w_codes, sd["w_codes"]) and torch.equal(q.w_scale.detach(), sd["w_scale"])


def test_scale_gradient_beside_a_lora_is_the_weights_derivative(gen):
    """A frozen layer's trained scales next to a LoRA: the gradient is the derivative of the weight the forward
    computes (central differences agree), not only the requantization's LSQ term (0 for a fresh LoRA)."""
    from treeq_engine.calib.lora import LoRA

    torch.manual_seed(0)
    q = QuantLinear(nn.Linear(48, 40), LayerConfig(4, 8))
    q.freeze_weight()
    q.lora = LoRA(40, 48, 4)
    with torch.no_grad():
        q.lora.b.normal_(0, 1e-3)
    q.w_scale.requires_grad_(True)
    g = torch.randn(40, 48, generator=gen)

    def loss():
        return (q.quantized_weight().float() * g).sum()

    loss().backward()
    auto = q.w_scale.grad.clone()
    fd = torch.empty(40)
    with torch.no_grad():
        for i in range(40):
            h = float(q.w_scale[i]) * 1e-3
            q.w_scale[i] += h
            up = loss()
            q.w_scale[i] -= 2 * h
            down = loss()
            q.w_scale[i] += h
            fd[i] = (up - down) / (2 * h)
    assert float(torch.nn.functional.cosine_similarity(auto, fd, dim=0)) > 0.99
    torch.testing.assert_close(auto, fd, rtol=0.05, atol=1e-3 * float(fd.abs().max()))


def test_bad_input_shape():
    q = QuantLinear(nn.Linear(16, 8), LayerConfig(4, 8), name="blk.fc")
    with pytest.raises(ValueError, match="blk.fc: input has 15 features, expected 16"):
        q(torch.randn(2, 15))


def test_parse_wa():
    from treeq_engine.plan import PlanError, parse_wa

    assert parse_wa("W4A8") == (4, 8) and parse_wa(" w3a3 ") == (3, 3)
    for bad in ("4/4", "W4", "W4.5A4", "A4W4", ""):
        with pytest.raises(PlanError, match="written WxAy"):
            parse_wa(bad)
