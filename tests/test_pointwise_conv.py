"""Pointwise convolutions are linears over channels (`nn/pointwise.py`): packed (`TreeQPointwiseConv`) bit for bit
the packed linear of the same weight on channels-last rows, close to the float convolution, through plans,
artifacts and layouts; simulated (`QuantPointwiseConv`) exactly as the fake-quant linear on those rows, in search's
grouped mode, PTQ's captures and back to a plain convolution; other convolutions are refused with a message that
says why."""
import re

import pytest
import torch
import torch.nn as nn

from treeq_engine.nn import QuantLinear, QuantPointwiseConv, convert, packable_layers, quantizable_linears, unconvert
from treeq_engine.nn.pointwise import is_pointwise_conv, layer_dims
from treeq_engine.plan import BranchConfig, LayerConfig, PlanError, QuantPlan
from treeq_engine.runtime import TreeQLinear, TreeQPointwiseConv, artifact, quantize, set_layout, treeq_layers
from treeq_engine.runtime.convert import pack_layer

CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
SPATIAL = {1: (11,), 2: (5, 3), 3: (3, 2, 3)}


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("nd", [1, 2, 3])
@pytest.mark.parametrize("label,bias,branch", [("W8A8", True, None), ("W4A4", False, None), ("W3A8", True, None),
                                               ("W4A8", True, BranchConfig("monarch", 2, 1))])
def test_packed_conv_is_the_packed_linear_over_channels(nd, label, bias, branch):
    g = torch.Generator().manual_seed(10 * nd + ["W8A8", "W4A4", "W3A8", "W4A8"].index(label))
    k, n = 37, 23   # odd channels
    conv = CONVS[nd](k, n, 1, bias=bias)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) / k ** 0.5)
        if bias:
            conv.bias.copy_(torch.randn(n, generator=g))
    cfg = LayerConfig(int(label[1]), int(label[3]), branch=branch)
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(conv.weight.reshape(n, k))
        if bias:
            lin.bias.copy_(conv.bias)
    pc = pack_layer(conv, cfg, "c", torch.float32)
    pl = pack_layer(lin, cfg, "l", torch.float32)
    assert type(pc) is TreeQPointwiseConv and type(pl) is TreeQLinear and pc.spatial_dims == nd
    for key, t in pl.state_dict().items():   # the same artifact tensors as the linear's
        assert torch.equal(pc.state_dict()[key], t), key
    x = torch.randn(3, k, *SPATIAL[nd], generator=g)
    with torch.no_grad():
        y = pc(x)
        want = pl(x.movedim(1, -1)).movedim(-1, 1)
        fp = conv(x)
    assert y.shape == fp.shape and torch.equal(y, want)
    assert rel(y, fp) < {"W8A8": 0.02, "W4A4": 0.35, "W3A8": 0.3, "W4A8": 0.2}[label]
    with torch.no_grad():   # an unbatched input is the batched one's first sample (the branch's float matmul
        torch.testing.assert_close(pc(x[0]), y[0], rtol=1e-5, atol=1e-5)   # may round by its row count)


@pytest.mark.parametrize("nd", [1, 2, 3])
def test_replacements_answer_what_code_reads_off_the_convolution(nd):
    """Code written for a convolution reads its attributes (SANA-WM's feed-forward reads ``out_channels``): the
    fake-quant and the packed replacements answer them as the pointwise convolution they replace, read-only."""
    conv = CONVS[nd](37, 23, 1)
    attrs = ("in_channels", "out_channels", "kernel_size", "stride", "dilation", "padding", "groups")
    for m in (QuantPointwiseConv(conv, LayerConfig(4, 8)), pack_layer(conv, LayerConfig(4, 8), "c", torch.float32)):
        assert {a: getattr(m, a) for a in attrs} == {a: getattr(conv, a) for a in attrs}, type(m).__name__
        with pytest.raises(AttributeError):
            m.out_channels = 5


def test_channels_last_view_in_and_out():
    """Sana hands its feed-forward a channels-last tensor viewed as channels-first: the packed conv reads and
    returns such views, with the conv's values."""
    conv = nn.Conv2d(16, 24, 1)
    pc = pack_layer(conv, LayerConfig(8, 8), "c", torch.float32)
    rows = torch.randn(2, 4, 6, 16)   # (B, H, W, C) contiguous
    x = rows.permute(0, 3, 1, 2)
    with torch.no_grad():
        y = pc(x)
        assert torch.equal(y, pc(x.contiguous()))
        assert rel(y, conv(x)) < 0.02
    assert y.movedim(1, -1).is_contiguous()


def test_bad_inputs_are_named():
    pc = pack_layer(nn.Conv2d(8, 4, 1), LayerConfig(8, 8), "blocks.0.ff.conv", torch.float32)
    with pytest.raises(ValueError, match=r"blocks.0.ff.conv: a 2-d convolution takes .* got a 5-d input"):
        pc(torch.randn(1, 8, 2, 2, 2))
    with pytest.raises(ValueError, match="input has 6 channels, expected 8"):
        pc(torch.randn(1, 6, 2, 2))
    with pytest.raises(TypeError, match="input must be a float tensor"):
        pc([1.0])
    with pytest.raises(ValueError, match="spatial_dims must be 1, 2 or 3"):
        TreeQPointwiseConv(8, 4, LayerConfig(8, 8), spatial_dims=4, bias=False)


@pytest.mark.parametrize("conv,what", [
    (nn.Conv2d(8, 8, 3, padding=1), "Conv2d with a 3x3 kernel"),
    (nn.Conv2d(8, 8, 1, stride=2), "Conv2d with a 1x1 kernel (stride (2, 2))"),
    (nn.Conv2d(8, 8, 1, groups=2), "Conv2d with a 1x1 kernel (groups 2)"),
    (nn.Conv1d(8, 8, 1, padding=1), "Conv1d with a 1 kernel (padding (1,))"),
    (nn.ConvTranspose2d(8, 8, 1), "ConvTranspose2d"),
])
def test_other_convolutions_are_refused(conv, what):
    assert not is_pointwise_conv(conv)
    model = nn.Sequential(conv)
    with pytest.raises(PlanError, match="Linear modules or pointwise .*" + re.escape(what)):
        QuantPlan({"0": LayerConfig(8, 8)}).validate(model)
    with pytest.raises(TypeError, match="cannot pack a " + what.split(" (")[0]):
        pack_layer(conv, LayerConfig(8, 8), "0", torch.float32)


class Scaled(nn.Conv2d):
    def forward(self, x):
        return super().forward(x) * 10


class Gained(nn.Conv1d):   # (diffusers' MMAudio convolutions take a gain like this)
    def forward(self, x, gain=1.0):
        return super().forward(x) * gain


@pytest.mark.parametrize("conv", [Scaled(8, 8, 1), Gained(8, 8, 1)])
def test_convolutions_with_their_own_forward_are_refused(conv):
    """A packed layer runs the plain convolution: a subclass computing something else is not packed silently."""
    assert not is_pointwise_conv(conv)
    with pytest.raises(PlanError, match=f"{type(conv).__name__}, a Conv[12]d with its own forward"):
        QuantPlan({"0": LayerConfig(8, 8)}).validate(nn.Sequential(conv))
    assert packable_layers(nn.Sequential(conv)) == []


class Plain(nn.Conv2d):   # a subclass that keeps torch's forward packs
    pass


def test_pointwise_padding_spellings():
    assert is_pointwise_conv(Plain(4, 4, 1))
    assert is_pointwise_conv(nn.Conv2d(4, 4, 1, padding="same")) and is_pointwise_conv(nn.Conv2d(4, 4, (1, 1)))
    assert is_pointwise_conv(nn.Conv2d(4, 4, 1, padding="valid"))
    assert layer_dims(nn.Conv3d(5, 7, 1)) == (5, 7) and layer_dims(nn.Linear(5, 7)) == (5, 7)


class ConvNet(nn.Module):
    """A linear and a pointwise convolution, the shape of Sana's feed-forward around a linear."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.ModuleDict({"lin": nn.Linear(12, 20), "conv": nn.Conv2d(20, 12, 1)})])
        self.edge = nn.Conv2d(12, 12, 3, padding=1)   # not pointwise: stays

    def forward(self, x):   # x (B, H, W, 12)
        h = self.blocks[0]["lin"](x).permute(0, 3, 1, 2)
        return self.edge(self.blocks[0]["conv"](h))


def test_plans_artifacts_and_layouts(tmp_path):
    torch.manual_seed(0)
    model = ConvNet()
    x = torch.randn(2, 3, 5, 12)
    assert packable_layers(model) == quantizable_linears(model) == ["blocks.0.lin", "blocks.0.conv"]
    assert quantizable_linears(model, pointwise_convs=False) == ["blocks.0.lin"]
    assert list(QuantPlan.block_uniform(model, 4, 8, pointwise_convs=False).layers) == ["blocks.0.lin"]
    plan = QuantPlan.block_uniform(model, 4, 8)
    assert list(plan.layers) == ["blocks.0.lin", "blocks.0.conv"]

    fp = artifact.fingerprint(model, plan)
    quantize(model, plan, dtype=torch.float32)
    assert isinstance(model.blocks[0]["conv"], TreeQPointwiseConv) and isinstance(model.edge, nn.Conv2d)
    with torch.no_grad():
        want = model(x)
    artifact.save(model, plan, tmp_path / "art", fp_fingerprint=fp)
    fresh = ConvNet()
    loaded = artifact.load(tmp_path / "art", fresh, dtype=torch.float32, verify_codes=True)
    assert isinstance(loaded.blocks[0]["conv"], TreeQPointwiseConv)
    with torch.no_grad():
        assert torch.equal(loaded(x), want)
        set_layout(loaded, "frag")   # the CUDA kernels' layout, and back: the same numbers
        assert {m.layout for m in treeq_layers(loaded).values()} == {"frag"}
        assert torch.equal(loaded(x), want)
        set_layout(loaded, "v1")
        assert torch.equal(loaded(x), want)

    class LinearNet(ConvNet):   # the same names and dims, a linear where the conv was: another model
        def __init__(self):
            super().__init__()
            self.blocks[0]["conv"] = nn.Linear(20, 12)
    with pytest.raises(artifact.ArtifactError, match="made for another model"):
        artifact.load(tmp_path / "art", LinearNet(), dtype=torch.float32)


def test_w16_keeps_the_convolution():
    conv = nn.Conv2d(8, 4, 1)
    assert pack_layer(conv, LayerConfig(16, 16), "c", torch.float32) is conv
    with pytest.raises(ValueError, match="16-bit weights with quantized activations"):
        pack_layer(conv, LayerConfig(16, 8), "c", torch.float32)


def test_plan_shapes_of_a_conv_are_checked():
    model = nn.Sequential(nn.Conv2d(8, 4, 1))
    plan = QuantPlan({"0": LayerConfig(8, 8)}, meta={"layer_shapes": {"0": [8, 4]}})
    plan.validate(model)
    with pytest.raises(PlanError, match="K x N = 8 x 6, this model's is 8 x 4"):
        QuantPlan({"0": LayerConfig(8, 8)}, meta={"layer_shapes": {"0": [8, 6]}}).validate(model)


@pytest.mark.parametrize("nd", [1, 2, 3])
def test_simulated_conv_is_the_fake_quant_linear_over_channels(nd):
    """QuantPointwiseConv computes exactly what QuantLinear computes on the channels-last rows (with a branch, in
    grouped mode, frozen), packs to what the runtime packs from the plain convolution, and unconverts to the plain
    convolution it was (one weight storage)."""
    g = torch.Generator().manual_seed(nd)
    k, n = 37, 23
    conv = CONVS[nd](k, n, 1)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) / k ** 0.5)
    x = torch.randn(3, k, *SPATIAL[nd], generator=g)
    cfg = LayerConfig(4, 8, branch=BranchConfig("monarch", 2, 1))
    lin = nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.copy_(conv.weight.reshape(n, k))
        lin.bias.copy_(conv.bias)
    sim, ref = QuantPointwiseConv(conv, cfg, name="c"), QuantLinear(lin, cfg, name="l")
    assert sim.weight.data_ptr() == conv.weight.data_ptr()   # (a view: nothing copied)
    from treeq_engine.branches import MonarchBranch

    br = MonarchBranch.from_config(cfg.branch, n, k)
    with torch.no_grad():
        br.w1.copy_(torch.randn(br.w1.shape, generator=g) * 0.1)
        br.w2.copy_(torch.randn(br.w2.shape, generator=g) * 0.1)
    sim.branch, ref.branch = br, br
    rows = x.movedim(1, -1)
    with torch.no_grad():
        got = sim(x)
        assert got.shape == (3, n, *SPATIAL[nd])
        assert torch.equal(got, ref(rows).movedim(-1, 1))
        configs = [cfg, LayerConfig(8, 8, branch=cfg.branch), None]   # grouped: three candidates along the batch
        sim.set_group_configs(configs)
        ref.set_group_configs(configs)
        assert torch.equal(sim(x), ref(rows).movedim(-1, 1))
        sim.set_group_configs(None)
        ref.set_group_configs(None)
    sim.freeze_weight()
    ref.freeze_weight()
    with torch.no_grad():
        assert torch.equal(sim(x), ref(rows).movedim(-1, 1))
        packed = pack_layer(sim, cfg, "c", torch.float32)
        assert isinstance(packed, TreeQPointwiseConv) and packed.spatial_dims == nd
        torch.testing.assert_close(packed(x), sim(x), rtol=1e-4, atol=1e-4)   # (the packed kernel's epilogue)
    with pytest.raises(ValueError, match=r"input must be \(B, 37"):
        sim(rows)   # channels last: the wrong layout is named, not computed
    with torch.no_grad():   # unbatched (C, *spatial), as torch's convolution takes it
        torch.testing.assert_close(sim(x[1]), sim(x)[1], rtol=1e-5, atol=1e-6)   # (a GEMM of other M)
    back = nn.Sequential(QuantPointwiseConv(conv, None))
    unconvert(back)
    assert type(back[0]) is CONVS[nd] and back[0].weight.data_ptr() == conv.weight.data_ptr()
    with torch.no_grad():
        torch.testing.assert_close(back[0](x), conv(x))


def test_convert_and_capture_take_pointwise_convolutions():
    """convert swaps a planned pointwise convolution for a QuantPointwiseConv; the search's space counts its positions
    as rows, and PTQ's capture hands calibration channels-last rows."""
    from treeq_engine.calib.capture import capture_inputs
    from treeq_engine.search import SearchSpace

    torch.manual_seed(0)
    model = ConvNet()
    x = torch.randn(2, 3, 5, 12)
    space = SearchSpace.build(model, (x,), include=lambda n: True)
    assert [(leaf.name, leaf.k, leaf.n, leaf.tokens) for leaf in space.leaves] == \
        [("blocks.0.lin", 12, 20, 15), ("blocks.0.conv", 20, 12, 15)]
    with torch.no_grad():
        h = model.blocks[0]["lin"](x)
    rows = capture_inputs(model, "blocks.0.conv", [(x,)], max_tokens=1000)
    torch.testing.assert_close(rows, h.reshape(-1, 20))   # the positions' channel vectors, as the linear's rows
    plan = QuantPlan.block_uniform(model, 8, 8)
    convert(model, plan)
    assert isinstance(model.blocks[0]["conv"], QuantPointwiseConv) and isinstance(model.edge, nn.Conv2d)
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()
    from treeq_engine.runtime.convert import skeleton

    skeleton(model, plan, dtype=torch.float32)   # (a converted model's layers take their packed forms too)
    assert type(model.blocks[0]["conv"]) is TreeQPointwiseConv and model.blocks[0]["conv"].spatial_dims == 2
