"""Packed layers holding their codes in the CUDA kernels' fragment layout only (``TreeQLinear.set_layout``):
the same numbers, the same state dict (layout v1), loads into either layout, clear errors.

On the CPU a fragment-layout layer runs on the reference backend (it unpacks through the C++ core), so every
check here is exact; the GPU half (the CUDA kernels reading the held layout, resident bytes) is in
``test_cuda_kernels.py``.
"""
import pytest
import torch
import torch.nn as nn

from treeq_engine.format import pack
from treeq_engine.kernels import PackedWeight, cuda_layout, packed_linear
from treeq_engine.kernels.types import FragWeight
from treeq_engine.nn import QuantLinear, quantizable_linears
from treeq_engine.plan import BranchConfig, LayerConfig, QuantPlan
from treeq_engine.runtime import TreeQLinear, artifact, quantize, set_layout, treeq_layers


def _layer(cfg, n=70, k=90, seed=0, branch=None):
    torch.manual_seed(seed)
    lin = nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.mul_(torch.rand(n, 1) * 3)   # channel scales that differ
    q = QuantLinear(lin, cfg)
    mon = None
    if branch is not None:
        from treeq_engine.branches import monarch

        mon = monarch.project(lin.weight.detach(), *branch)
    return TreeQLinear.from_weights(q.weight_qtensor(), cfg, lin.bias, mon, dtype=torch.float32)


def _copy(mod):
    twin = TreeQLinear(mod.in_features, mod.out_features, mod.config, bias=mod.bias is not None,
                       monarch=None if mod.monarch_w1 is None else (mod.monarch_w1.shape[0],
                                                                    mod.monarch_w1.shape[1] // mod.monarch_w1.shape[0]),
                       dtype=torch.float32)
    twin.load_state_dict(mod.state_dict())
    return twin


@pytest.mark.parametrize("cfg,branch", [(LayerConfig(2, 8), None), (LayerConfig(3, 3), (4, 1)),
                                        (LayerConfig(4, 4, w_symmetric=True), None), (LayerConfig(8, 8), (2, 2))])
def test_frag_layout_same_numbers_and_state_dict(cfg, branch, gen):
    v1 = _layer(cfg, branch=branch)
    frag = _copy(v1)
    frag.set_layout("frag")
    assert frag.layout == "frag" and v1.layout == "v1" and frag.w_packed is None
    assert "frag layout" in repr(frag)
    x = torch.randn(3, 5, 90, generator=gen)
    torch.testing.assert_close(frag(x), v1(x), rtol=0, atol=0)
    sd_v1, sd_frag = v1.state_dict(), frag.state_dict()
    assert set(sd_frag) == set(sd_v1) and "w_frag" not in sd_frag
    for key in sd_v1:
        assert torch.equal(sd_frag[key], sd_v1[key]), key
    # one copy of the codes: the fragment words (tile padding included) replace layout v1
    words = cuda_layout.total_words(70, 90, cfg.w_bits) * 4
    assert frag.weight_bytes() == v1.weight_bytes() - v1.w_packed.numel() * v1.w_packed.element_size() + words
    # and back
    frag.set_layout("v1")
    assert frag.layout == "v1" and torch.equal(frag.w_packed, v1.w_packed) and not hasattr(frag, "w_frag")
    torch.testing.assert_close(frag(x), v1(x), rtol=0, atol=0)


def test_load_into_a_frag_layer_repacks(gen):
    """A state dict (layout v1) loaded into a fragment-layout layer lands in its fragment words, in place."""
    cfg = LayerConfig(4, 8)
    a, b = _layer(cfg, seed=0), _layer(cfg, seed=1)
    dst = _copy(a)
    dst.set_layout("frag")
    words = dst.w_frag
    x = torch.randn(7, 90, generator=gen)
    dst(x)   # caches built from a's codes must not survive the load
    dst.load_state_dict(b.state_dict())
    assert dst.w_frag is words and dst.layout == "frag"
    torch.testing.assert_close(dst(x), b(x), rtol=0, atol=0)
    torch.testing.assert_close(dst.packed_weight().codes(), b.packed_weight().codes())

    sd = b.state_dict()
    del sd["w_packed"]
    with pytest.raises(RuntimeError, match="Missing key.*w_packed"):
        dst.load_state_dict(sd)
    sd = b.state_dict()
    sd["w_packed"] = sd["w_packed"][:, :-1]
    with pytest.raises(RuntimeError, match=r"w_packed: a 4-bit layout-v1 weight for \(N=70, K=90\) is torch.int32"):
        dst.load_state_dict(sd)
    sd = b.state_dict()
    sd["extra"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match="Unexpected key.*extra"):
        dst.load_state_dict(sd)


def test_model_layouts_artifact_and_errors(tmp_path, gen):
    """``quantize(layout=...)`` and ``set_layout`` on a model; an artifact saved from fragment layout is the
    layout-v1 artifact and loads into either layout; weight-only layers keep layout v1."""
    def net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(40, 64), nn.GELU(), nn.Linear(64, 40), nn.GELU(), nn.Linear(40, 8))

    names = quantizable_linears(net())
    plan = QuantPlan({names[0]: LayerConfig(4, 8), names[1]: LayerConfig(3, 4, branch=BranchConfig("monarch", 4, 1)),
                      names[2]: LayerConfig(4, 16)}, model="toy")
    x = torch.randn(6, 40, generator=gen)
    fp = artifact.fingerprint(net(), plan)
    auto = quantize(net(), plan, dtype=torch.float32)
    assert {m.layout for m in treeq_layers(auto).values()} == {"v1"}   # CPU: nothing runs the CUDA kernels
    frag = quantize(net(), plan, dtype=torch.float32, layout="frag")
    layouts = {n: m.layout for n, m in treeq_layers(frag).items()}
    assert layouts == {names[0]: "frag", names[1]: "frag", names[2]: "v1"}   # W4A16 multiplies a dequantized weight
    with torch.no_grad():
        want = auto(x)
        torch.testing.assert_close(frag(x), want, rtol=0, atol=0)
    out = artifact.save(frag, plan, tmp_path / "frag", fp_fingerprint=fp)
    ref = artifact.save(auto, plan, tmp_path / "v1", fp_fingerprint=fp)
    assert (out / "model.safetensors").read_bytes() == (ref / "model.safetensors").read_bytes()
    for lay in ("v1", "frag"):
        loaded = artifact.load(out, net(), dtype=torch.float32, layout=lay)
        assert {m.layout for n, m in treeq_layers(loaded).items() if n != names[2]} == {lay}
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), want, rtol=0, atol=0)
    assert set_layout(frag, "v1") == {"v1": 3, "frag": 0}
    with pytest.raises(ValueError, match="layout must be 'auto' or one of"):
        set_layout(frag, "fragment")
    with pytest.raises(ValueError, match="layout must be 'auto' or one of"):
        quantize(net(), plan, layout="v2")
    with pytest.raises(ValueError, match="layout must be 'auto' or one of"):
        artifact.load(out, net(), layout="cuda")
    with pytest.raises(ValueError, match="keeps layout v1"):
        frag.get_submodule(names[2]).set_layout("frag")


def test_cast_and_inference_mode_keep_the_frag_layout(gen):
    x = torch.randn(4, 90, generator=gen)
    mod = _layer(LayerConfig(4, 8), branch=(4, 1))
    want = mod(x)
    mod.set_layout("frag")
    with torch.inference_mode():
        torch.testing.assert_close(mod(x), want, rtol=0, atol=0)
    mod.to(torch.bfloat16)   # compute dtype and the factors' storage change, not the codes'
    assert mod.w_frag.dtype == torch.int32 and mod.out_dtype == torch.bfloat16 and mod.layout == "frag"
    torch.testing.assert_close(mod(x.bfloat16()).float(), want, rtol=0.05, atol=0.05)


def test_packed_weight_with_frag_only(gen):
    """A PackedWeight carrying only its fragment layout: checked, unpacked exactly, declined by Triton."""
    mod = _layer(LayerConfig(3, 8))
    pw = mod.packed_weight()
    mod.set_layout("frag")
    fw = mod.packed_weight()
    assert fw.packed is None and fw.frag is not None and fw.anchor is mod.w_frag
    assert torch.equal(fw.codes(), pw.codes())
    assert cuda_layout.cuda_operands(fw) is fw.frag
    uzp, ucs = cuda_layout.u_domain(pw.zero_point, pw.col_sum, 3, 90)
    assert torch.equal(fw.frag.uzp, uzp) and torch.equal(fw.frag.ucs, ucs)
    with pytest.raises(ValueError, match="needs its codes"):
        PackedWeight(None, 3, 70, 90, pw.scale, pw.zero_point, pw.col_sum)
    bad = FragWeight(fw.frag.words, fw.frag.row_chan, pw.scale, uzp, ucs, 4, 70, 90)
    with pytest.raises(ValueError, match="fragment-layout weight is 4-bit"):
        PackedWeight(None, 3, 70, 90, pw.scale, pw.zero_point, pw.col_sum, frag=bad)
    with pytest.raises(ValueError, match="zero_point must be"):
        PackedWeight(None, 3, 70, 90, pw.scale, pw.zero_point[:-1], pw.col_sum, frag=fw.frag)
    from treeq_engine.kernels import quantize_activation
    from treeq_engine.kernels.ops import backends

    act = quantize_activation(torch.randn(5, 90, generator=gen), LayerConfig(3, 8).act_spec())
    torch.testing.assert_close(packed_linear(act, fw), packed_linear(act, pw), rtol=0, atol=0)
    if "triton" in backends():
        with pytest.raises(RuntimeError, match="weight layout"):
            packed_linear(act, fw, backend="triton")
    assert torch.equal(pack(fw.codes(), 3), pw.packed)


def test_frag_layer_loads_after_to_empty_and_with_assign(gen):
    """The ways a skeleton gets its weights: ``to_empty`` then a load (the row map is not state: it must not be
    lost), and a meta skeleton loaded with ``assign=True`` (the codes take the state dict's device)."""
    cfg = LayerConfig(4, 8)
    src = _layer(cfg, seed=1)
    x = torch.randn(5, 90, generator=gen)
    mod = _layer(cfg, seed=0)
    mod.set_layout("frag")
    mod.to_empty(device="cpu")
    mod.load_state_dict(src.state_dict())
    torch.testing.assert_close(mod(x), src(x), rtol=0, atol=0)

    with torch.device("meta"):
        skel = TreeQLinear(90, 70, cfg, bias=True, dtype=torch.float32)
    skel.set_layout("frag")
    assert skel.w_frag.is_meta and skel.state_dict()["w_packed"].is_meta
    skel.load_state_dict(src.state_dict(), assign=True)
    assert not skel.w_frag.is_meta and skel.layout == "frag"
    torch.testing.assert_close(skel(x), src(x), rtol=0, atol=0)
    meta = {k: v.to("meta") for k, v in src.state_dict().items()}
    with pytest.raises(RuntimeError, match="meta tensor holds no codes"):
        skel.load_state_dict(meta)


def test_frag_state_dict_is_layout_v1_on_the_cpu_first():
    """A fragment-layout layer's state dict holds layout v1 on the CPU (taking a GPU model's state never puts a
    second copy of the codes on the device), under the key order of a layout-v1 layer."""
    v1 = _layer(LayerConfig(3, 4), branch=(4, 1))
    frag = _copy(v1)
    frag.set_layout("frag")
    sd = frag.state_dict()
    assert list(sd) == list(v1.state_dict()) and sd["w_packed"].device.type == "cpu"


def test_fragment_operands_are_checked(gen):
    mod = _layer(LayerConfig(4, 8))
    mod.set_layout("frag")
    fw = mod.packed_weight()
    f = fw.frag
    import dataclasses

    for change, msg in ((dict(words=f.words[:-1]), "words must be contiguous torch.int32"),
                        (dict(row_chan=f.row_chan.long()), "row_chan must be"),
                        (dict(uzp=f.uzp[:-1]), "uzp must be"),
                        (dict(scale=f.scale.double()), "scale must be")):
        with pytest.raises(ValueError, match=msg):
            dataclasses.replace(fw, frag=dataclasses.replace(f, **change))
