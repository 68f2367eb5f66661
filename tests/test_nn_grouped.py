"""Candidate batching in QuantLinear: G groups in one batch must equal G separate single-config runs."""
import pytest
import torch
import torch.nn as nn

from treeq_engine.format import QuantSpec, fake_quantize
from treeq_engine.nn import QuantLinear
from treeq_engine.nn.grouped import fake_quantize_groups
from treeq_engine.plan import LayerConfig


class LowRank(nn.Module):
    """A stand-in branch: x·(U V)ᵀ with ``dense() = U V``."""

    def __init__(self, n, k, r, gen):
        super().__init__()
        self.u = nn.Parameter(torch.randn(n, r, generator=gen) * 0.1)
        self.v = nn.Parameter(torch.randn(r, k, generator=gen) * 0.1)

    def dense(self):
        return self.u @ self.v

    def forward(self, x):
        return (x @ self.v.T) @ self.u.T


SPECS = [QuantSpec.activation(3), QuantSpec.activation(4, symmetric=True), QuantSpec.activation(8, clip_ratio=0.9),
         None, QuantSpec.activation(16), QuantSpec.activation(4, clip_ratio=0.7, symmetric=True)]


SAME_BITS = [QuantSpec.activation(4), QuantSpec.activation(4, symmetric=True), None,
             QuantSpec.activation(4, clip_ratio=0.8), QuantSpec.activation(16), QuantSpec.activation(4)]


@pytest.mark.parametrize("specs", [SPECS, SAME_BITS], ids=["mixed-bits", "same-bits"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fake_quantize_groups_is_bitwise_the_oracle(gen, dtype, specs):
    g, r, k = len(specs), 7, 37
    x = (torch.randn(g, r, k, generator=gen) * torch.rand(g, r, 1, generator=gen) * 5).to(dtype)
    x[1, 2] = 0.0                                    # an all-zero row (scale 1 branch)
    x[2, 3] = x[2, 3].abs()                          # a row without negatives
    x[0, 4, 5] = float("nan")                        # a poisoned row comes out NaN, as the kernels do
    x[5, 6, 0] = float("inf")
    got = fake_quantize_groups(x, specs)
    assert got.dtype == dtype and got.shape == x.shape
    for i, s in enumerate(specs):
        want = x[i] if s is None else fake_quantize(x[i], s, nonfinite="propagate")
        torch.testing.assert_close(got[i], want, rtol=0, atol=0, equal_nan=True)
    assert torch.isnan(got[0, 4]).all() and torch.isnan(got[5, 6]).all()


def test_fake_quantize_groups_shape_error(gen):
    with pytest.raises(ValueError, match=r"must be \(G=2, R, K\)"):
        fake_quantize_groups(torch.randn(3, 4, 5, generator=gen), SPECS[:2])


CONFIGS = [LayerConfig(4, 4), LayerConfig(2, 3), None, LayerConfig(8, 8, w_symmetric=True), LayerConfig(3, 8),
           LayerConfig(4, 4), LayerConfig(16, 4), LayerConfig(2, 16, w_clip=0.8)]


@pytest.mark.parametrize("lam", [1.0, 0.37, 0.0])
@pytest.mark.parametrize("with_branch", [False, True])
def test_grouped_forward_matches_separate_runs(gen, lam, with_branch):
    n, k, g = 23, 45, len(CONFIGS)
    lin = nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=gen))
        lin.bias.copy_(torch.randn(n, generator=gen))
    q = QuantLinear(lin, name="layer")
    if with_branch:
        q.branch = LowRank(n, k, 3, gen)
    q.set_noise_scale(lam)
    x = torch.randn(g * 3, 5, k, generator=gen) * 2            # (B, T, K): groups of 3 samples
    with torch.no_grad():
        want = []
        for i, c in enumerate(CONFIGS):
            q.set_config(c)
            want.append(q(x[3 * i: 3 * i + 3]))
        want = torch.cat(want)
        q.set_config(LayerConfig(8, 8))                         # the single config is ignored while grouped
        q.set_group_configs(CONFIGS)
        got = torch.full_like(want, float("nan"))
        got.copy_(q(x))
        q.set_group_configs(None)
        back = q(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    q.set_config(LayerConfig(8, 8))
    with torch.no_grad():
        torch.testing.assert_close(back, q(x), rtol=0, atol=0)   # leaving grouped mode restores the config


def test_grouped_errors(gen):
    q = QuantLinear(nn.Linear(8, 4), LayerConfig(4, 4), name="blk.fc")
    q.set_group_configs([LayerConfig(4, 4), LayerConfig(8, 8), None])
    with torch.no_grad(), pytest.raises(ValueError, match="blk.fc: grouped mode with G=3 needs a leading"):
        q(torch.randn(4, 8, generator=gen))
    with pytest.raises(RuntimeError, match="under torch.no_grad"):
        q(torch.randn(3, 8, generator=gen))
    with pytest.raises(TypeError, match="LayerConfig or None"):
        q.set_group_configs([(4, 4)])
    with pytest.raises(ValueError, match="at least one"):
        q.set_group_configs([])


@pytest.mark.gpu
def test_compiled_grouped_fake_quant_on_cuda_is_within_one_step_of_eager():
    from treeq_engine.nn import grouped

    gen = torch.Generator(device="cuda").manual_seed(0)
    specs = [QuantSpec.activation(b) for b in (3, 4, 8, 4, 3, 8)]
    x = torch.randn(6, 1024, 1152, generator=gen, device="cuda") * 3
    eager = grouped.fake_quantize_groups(x, specs)
    grouped.use_compiled(True)
    try:
        fused = grouped.fake_quantize_groups(x, specs)
    finally:
        grouped.use_compiled(False)
    for i, s in enumerate(specs):  # eager on CUDA is the oracle's arithmetic, on CUDA and on CPU alike
        torch.testing.assert_close(eager[i], fake_quantize(x[i], s, nonfinite="propagate"), rtol=0, atol=0)
        torch.testing.assert_close(eager[i].cpu(), fake_quantize(x[i].cpu(), s, nonfinite="propagate"), rtol=0,
                                   atol=0)
    step = (x.amax(2, keepdim=True).clamp(min=0) - x.amin(2, keepdim=True).clamp(max=0)) / torch.tensor(
        [s.qmax - s.qmin for s in specs], device="cuda")[:, None, None]
    diff = (fused - eager).abs()
    # Inductor divides with the approximate div.full.f32: a scale may move by an ulp, which moves every value of
    # its row by ulps (not counted), and a code at a rounding tie by one step (counted, rare)
    assert bool((diff <= step * 1.001 + 1e-6).all())                 # at most one code apart
    assert (diff > 0.5 * step).float().mean().item() < 1e-3          # and rarely that


@pytest.mark.parametrize("cfg", [LayerConfig(4, 3), LayerConfig(2, 4, a_symmetric=True, a_clip=0.8), LayerConfig(8, 8)])
def test_single_config_inference_path_is_bitwise_the_oracle_path(gen, cfg):
    """Without gradients QuantLinear quantizes activations through the grouped path (G = 1); with them through
    the oracle (straight-through gradient). Same arithmetic, same bits."""
    q = QuantLinear(nn.Linear(37, 11), cfg, name="l")
    x = torch.randn(3, 5, 37, generator=gen) * 3
    x[1, 2, 4] = float("nan")
    with torch.no_grad():
        fast = q(x)
    slow = q(x.clone().requires_grad_(True)).detach()
    torch.testing.assert_close(fast, slow, rtol=0, atol=0, equal_nan=True)
    assert torch.isnan(fast[1, 2]).all() and not torch.isnan(fast[0]).any()


def test_grouped_weight_cache_follows_weights_and_lambda(gen):
    q = QuantLinear(nn.Linear(16, 8), name="l")
    x = torch.randn(4, 16, generator=gen)
    cfgs = [LayerConfig(4, 8), LayerConfig(2, 8)]

    def run():
        q.set_group_configs(cfgs)
        with torch.no_grad():
            y = q(x)
        q.set_group_configs(None)
        return y

    first = run()
    with torch.no_grad():
        q.weight.mul_(2.0)                        # an in-place update bumps the version: no stale hit
    # per-channel scales double with the weight and the codes stay: y = Q(x)·2Q(W)ᵀ + b = 2·y_before − b
    torch.testing.assert_close(run(), 2 * first - q.bias.detach(), rtol=1e-5, atol=1e-5)
    q.set_noise_scale(0.0)                        # λ = 0: full precision, not the cached λ = 1 weight
    with torch.no_grad():
        torch.testing.assert_close(run(), nn.functional.linear(x, q.weight, q.bias), rtol=1e-6, atol=1e-6)
    for b in (2, 3, 4, 8, 16, 2, 3):
        q.set_group_configs([LayerConfig(b, 8)] * 2)
        with torch.no_grad():
            q(x)
    assert len(q._wg_cache) <= QuantLinear.GROUP_WEIGHT_CACHE
