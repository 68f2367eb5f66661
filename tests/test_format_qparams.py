"""Quantizing with externally chosen per-row parameters (PTQ's per-channel clip, PEFT's scale training)."""
import pytest
import torch

from treeq_engine.format import (QuantSpec, dequantize, fake_quantize, fake_quantize_with_qparams, quantize,
                                 quantize_with_qparams, row_qparams)

SPECS = [QuantSpec.weight(b, sym) for b in (2, 3, 4, 8) for sym in (False, True)] + [QuantSpec.activation(3)]


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_given_qparams_reproduce_quantize_exactly(spec, gen):
    x = torch.randn(23, 67, generator=gen) * torch.rand(23, 1, generator=gen) * 2
    ref = quantize(x, spec)
    got = quantize_with_qparams(x, spec, ref.scale, ref.zero_point)
    assert torch.equal(got.codes, ref.codes)
    fq = fake_quantize_with_qparams(x, spec, ref.scale, ref.zero_point)
    assert torch.equal(fq, fake_quantize(x, spec))
    # the differentiable path gives the same values
    xs = x.clone().requires_grad_(True)
    s = ref.scale.clone().requires_grad_(True)
    assert torch.equal(fake_quantize_with_qparams(xs, spec, s, ref.zero_point).detach(), fq)


@pytest.mark.parametrize("spec", [QuantSpec.weight(4), QuantSpec.weight(3, True)], ids=str)
def test_per_row_clip_equals_scalar_clip_row_by_row(spec, gen):
    x = torch.randn(9, 40, generator=gen)
    clips = torch.tensor([1.0, 0.9, 0.8, 0.7, 0.6, 0.55, 0.5, 0.95, 0.75])
    scale, zp = row_qparams(x, spec, clip=clips)
    for r, c in enumerate(clips.tolist()):
        s1, z1 = row_qparams(x[r:r + 1], QuantSpec.weight(spec.bits, spec.symmetric, c))
        assert torch.equal(scale[r:r + 1], s1) and torch.equal(zp[r:r + 1], z1)
    # default (no clip tensor) is the spec's scalar clip: existing behaviour
    s_def, z_def = row_qparams(x, spec)
    s_one, z_one = row_qparams(x, spec, clip=torch.ones(9))
    assert torch.equal(s_def, s_one) and torch.equal(z_def, z_one)


def test_gradients_ste_and_lsq(gen):
    spec = QuantSpec.weight(3)
    x = torch.randn(6, 30, generator=gen)
    qt = quantize(x, spec)
    scale = qt.scale * 0.6  # shrink: some values clip
    xs = x.clone().requires_grad_(True)
    s = scale.clone().requires_grad_(True)
    y = fake_quantize_with_qparams(xs, spec, s, qt.zero_point)
    g = torch.randn(y.shape, generator=gen)
    (y * g).sum().backward()
    v = x / scale[:, None]
    u = torch.round(v) + qt.zero_point[:, None]
    inside = (u >= spec.qmin) & (u <= spec.qmax)
    assert bool((~inside).any()) and bool(inside.any())
    torch.testing.assert_close(xs.grad, g * inside)
    q = u.clamp(spec.qmin, spec.qmax)
    ds = torch.where(inside, torch.round(v) - v, q - qt.zero_point[:, None])
    torch.testing.assert_close(s.grad, (g * ds).sum(1))
    # a small step against the LSQ gradient lowers a reconstruction loss (the use PEFT makes of it)
    target = x
    s2 = scale.clone().requires_grad_(True)
    loss = ((fake_quantize_with_qparams(x, spec, s2, qt.zero_point) - target) ** 2).sum()
    loss.backward()
    with torch.no_grad():
        better = ((fake_quantize_with_qparams(x, spec, s2 - 1e-3 * s2.grad.sign() * scale, qt.zero_point)
                   - target) ** 2).sum()
    assert float(better) < float(loss.detach())


def test_bad_qparams_are_named(gen):
    spec = QuantSpec.weight(4)
    x = torch.randn(5, 8, generator=gen)
    qt = quantize(x, spec)
    with pytest.raises(ValueError, match=r"scale must be torch.float32 \(5,\)"):
        quantize_with_qparams(x, spec, qt.scale[:4], qt.zero_point)
    with pytest.raises(ValueError, match="zero_point must be torch.int32"):
        quantize_with_qparams(x, spec, qt.scale, qt.zero_point.long())
    with pytest.raises(ValueError, match="finite and positive"):
        quantize_with_qparams(x, spec, -qt.scale, qt.zero_point)
    with pytest.raises(ValueError, match=r"zero_point must lie in \[-8, 7\]"):
        quantize_with_qparams(x, spec, qt.scale, qt.zero_point + 20)
    bad = x.clone()
    bad[1, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        quantize_with_qparams(bad, spec, qt.scale, qt.zero_point)
    with pytest.raises(ValueError, match="keeps bf16"):
        quantize_with_qparams(x, QuantSpec.weight(16), qt.scale, qt.zero_point)
    with pytest.raises(ValueError, match=r"per-row clip must be a tensor of shape \(5,\)"):
        row_qparams(x, spec, clip=torch.ones(4))
    with pytest.raises(ValueError, match=r"clip ratios must lie in \(0, 1\]"):
        row_qparams(x, spec, clip=torch.full((5,), 1.5))
    # dequantized codes are what the codes and params say
    got = quantize_with_qparams(x, spec, qt.scale, qt.zero_point)
    torch.testing.assert_close(dequantize(got), qt.scale[:, None] * (got.codes.float() - qt.zero_point[:, None]))
