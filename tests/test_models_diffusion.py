import math

import pytest
import torch

from test_models_dit import random_weights
from treeq_engine.models.diffusion import (GaussianDiffusion, create_diffusion, discretized_gaussian_log_likelihood,
                                           linear_beta_schedule, normal_kl, space_timesteps)
from treeq_engine.models.dit import DiT, dit_config
from treeq_engine.models.sample import sample


def test_schedule_and_respacing():
    b = linear_beta_schedule(1000)
    assert b.dtype == torch.float64 and b.shape == (1000,)
    assert math.isclose(b[0].item(), 1e-4) and math.isclose(b[-1].item(), 0.02)
    assert math.isclose(linear_beta_schedule(250)[-1].item(), 0.08)  # scaled by 1000 / steps
    assert space_timesteps(1000, "ddim25") == set(range(0, 1000, 40))
    assert space_timesteps(1000, "10") == {0, 111, 222, 333, 444, 555, 666, 777, 888, 999}
    s = space_timesteps(300, "10,15,20")  # three sections of 100, endpoints included
    assert len(s) == 45 and {0, 99, 100, 199, 200, 299} <= s
    assert space_timesteps(1000, 1000) == set(range(1000))
    with pytest.raises(ValueError, match="integer stride"):
        space_timesteps(1000, "ddim999")
    with pytest.raises(ValueError, match="cannot divide"):
        space_timesteps(10, "11")
    with pytest.raises(ValueError, match="'ddimN'"):
        space_timesteps(1000, "fast")
    base = GaussianDiffusion(linear_beta_schedule(1000))
    d = create_diffusion("17")
    keep = sorted(space_timesteps(1000, "17"))
    assert d.timestep_map.tolist() == keep and d.num_timesteps == 17
    # respacing keeps ᾱ on the kept steps
    torch.testing.assert_close(d.alphas_cumprod, base.alphas_cumprod[keep], rtol=1e-12, atol=0)


def test_posterior_is_bayes_rule():
    d = create_diffusion("50")
    t = torch.tensor([1, 7, 30, 49])
    x0, xt = torch.randn(4, 1, 2, 2, dtype=torch.float64), torch.randn(4, 1, 2, 2, dtype=torch.float64)
    mean, var, _ = d.q_posterior_mean_variance(x0, xt, t)
    ab, ab_prev = d.alphas_cumprod[t], d.alphas_cumprod_prev[t]
    alpha, beta = ab / ab_prev, 1 - ab / ab_prev
    # N(x_{t-1}; √ᾱ_{t-1}·x0, 1−ᾱ_{t-1}) · N(x_t; √α_t·x_{t-1}, β_t), normalised over x_{t-1}
    prec = 1 / (1 - ab_prev) + alpha / beta
    want_mean = (ab_prev.sqrt()[:, None, None, None] * x0 / (1 - ab_prev)[:, None, None, None]
                 + alpha.sqrt()[:, None, None, None] * xt / beta[:, None, None, None]) / prec[:, None, None, None]
    torch.testing.assert_close(mean.double(), want_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(var.flatten().double(), 1 / prec, rtol=1e-5, atol=0)


def test_learned_range_interpolates_log_variance():
    d = create_diffusion("20")
    x = torch.zeros(3, 1, 2, 2)
    t = torch.tensor([0, 5, 19])
    for v, want in [(-1.0, d.posterior_log_variance_clipped[t]), (1.0, d.log_betas[t]),
                    (0.0, (d.posterior_log_variance_clipped[t] + d.log_betas[t]) / 2)]:
        out = torch.cat([torch.zeros_like(x), torch.full_like(x, v)], dim=1)
        _, _, log_var = d.split_output(out, x, t)
        torch.testing.assert_close(log_var[:, 0, 0, 0].double(), want, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"must output \(B, 2C"):
        d.split_output(torch.zeros(3, 1, 2, 2), x, t)


class GaussianOracle:
    """The exact ε-prediction for data x0 ~ N(mu, s²) per pixel: E[ε | x_t] = √(1−ᾱ)(x_t − √ᾱ·mu) / (ᾱ s² + 1 − ᾱ);
    called with the original (model) timesteps, as the sampler does."""

    def __init__(self, mu, s, learned):
        self.mu, self.s, self.learned = mu, s, learned
        self.acp = create_diffusion("").alphas_cumprod
        self.calls = []

    def __call__(self, x, t, y=None):
        self.calls.append((x.clone(), t.clone()))
        a = self.acp[t].float().reshape(-1, 1, 1, 1)
        eps = (1 - a).sqrt() * (x - a.sqrt() * self.mu) / (a * self.s ** 2 + 1 - a)
        return torch.cat([eps, torch.zeros_like(eps)], 1) if self.learned else eps


def gaussian_trajectory(d, mu, s, sampler, learned):
    """Mean and std of the sampler's output for x0 ~ N(mu, s²) with the exact ε: every step is affine in x_t
    (x ↦ k·x + b, plus independent noise for DDPM), so both follow in closed form, scalar by scalar."""
    m, var = 0.0, 1.0
    acp, prev = d.alphas_cumprod.tolist(), d.alphas_cumprod_prev.tolist()
    for i in reversed(range(d.num_timesteps)):
        a, ap = acp[i], prev[i]
        ke = math.sqrt(1 - a) / (a * s * s + 1 - a)           # ε̂ = ke·(x − √a·mu)
        k0, b0 = (1 - math.sqrt(1 - a) * ke) / math.sqrt(a), math.sqrt(1 - a) * ke * mu   # x̂0 = k0·x + b0
        if sampler == "ddim":
            k = math.sqrt(ap) * k0 + math.sqrt(1 - ap) * ke
            b = math.sqrt(ap) * b0 - math.sqrt(1 - ap) * ke * math.sqrt(a) * mu
            noise = 0.0
        else:
            beta = 1 - a / ap
            c1, c2 = beta * math.sqrt(ap) / (1 - a), (1 - ap) * math.sqrt(1 - beta) / (1 - a)
            k, b = c1 * k0 + c2, c1 * b0
            if i == 0:  # the last step adds no noise
                noise = 0.0
            elif learned:  # v = 0: halfway between log β̃ and log β
                noise = math.exp(0.5 * (math.log(float(d.posterior_variance[i])) + math.log(beta)))
            else:  # fixed large
                noise = beta
        m, var = k * m + b, k * k * var + noise
    return m, math.sqrt(var)


@pytest.mark.parametrize("sampler, steps, learned", [("ddim", 25, True), ("ddpm", 50, True), ("ddpm", 50, False)])
def test_sampling_with_the_exact_score_follows_the_closed_form(sampler, steps, learned):
    d = create_diffusion(str(steps), learn_sigma=learned)
    oracle = GaussianOracle(0.3, 0.2, learned)
    gen = torch.Generator().manual_seed(0)
    shape = (64, 1, 8, 8)
    if sampler == "ddim":
        x = d.ddim_sample_loop(oracle, shape, generator=gen, clip_denoised=False)
    else:
        x = d.p_sample_loop(oracle, shape, generator=gen, clip_denoised=False)
    mean, std = gaussian_trajectory(d, 0.3, 0.2, sampler, learned)
    assert abs(mean - 0.3) < 0.01 and abs(std - 0.2) < 0.05  # the discretization is close to the data law
    assert abs(x.mean().item() - mean) < 0.01 and abs(x.std().item() - std) < 0.006, (x.mean(), x.std(), mean, std)
    # the model saw the original timesteps, noisiest first
    assert [int(t[0]) for _, t in oracle.calls] == d.timestep_map.flip(0).tolist()


def test_determinism_and_callback(gen):
    model = random_weights(DiT(dit_config("DiT-test-1ch")), gen, std=0.05)
    y = torch.tensor([0, 3, 7])
    steps, seen = [], []
    hook = model.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    a = sample(model, y, steps=6, seed=11, cfg_scale=2.0, callback=steps.append)
    hook.remove()
    b = sample(model, y, steps=6, seed=11, cfg_scale=2.0)
    c = sample(model, y, steps=6, seed=12, cfg_scale=2.0)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (3, 1, 8, 8) and torch.isfinite(a).all()
    assert [s.index for s in steps] == list(range(6))
    assert [int(s.t_model[0]) for s in steps] == sorted(space_timesteps(1000, 6), reverse=True)
    # with guidance the model ran on the doubled batch [cond; uncond]
    assert steps[0].x.shape == (6, 1, 8, 8) and steps[0].model_kwargs["y"].tolist() == [0, 3, 7, 10, 10, 10]
    assert len(seen) == 6 and all(torch.equal(s.x, x) for s, x in zip(steps, seen))  # what the model ran on
    assert torch.equal(steps[1].x[:3], steps[0].sample[:3])  # each step starts where the previous ended
    d1 = sample(model, y, steps=5, sampler="ddim", seed=3)
    d2 = sample(model, y, steps=5, sampler="ddim", seed=3)
    assert torch.equal(d1, d2)
    with pytest.raises(ValueError, match="sampler must be one of"):
        sample(model, y, sampler="euler")


def test_training_losses(gen):
    d = create_diffusion("")
    model = random_weights(DiT(dit_config("DiT-test-1ch")), gen, std=0.05)  # eval: no random label dropout
    x0 = torch.rand(4, 1, 8, 8, generator=gen) * 2 - 1
    t = torch.tensor([0, 1, 400, 999])
    noise = torch.randn(x0.shape, generator=gen)
    y = torch.tensor([1, 2, 3, 4])
    terms = d.training_losses(model, x0, t, noise=noise, model_kwargs={"y": y})
    out = model(d.q_sample(x0, t, noise), t, y)
    torch.testing.assert_close(terms["mse"], ((noise - out[:, :1]) ** 2).mean((1, 2, 3)))
    assert (terms["vb"][1:] >= 0).all()  # KL terms
    torch.testing.assert_close(terms["loss"], terms["mse"] + terms["vb"])
    # the bound trains only the variance channel: its gradient w.r.t. the ε output is zero
    out = out.detach().requires_grad_(True)
    vb = d.vb_terms_bpd(torch.cat([out[:, :1].detach(), out[:, 1:]], 1), x0, d.q_sample(x0, t, noise), t).sum()
    vb.backward()
    assert torch.count_nonzero(out.grad[:, :1]) == 0 and torch.count_nonzero(out.grad[:, 1:]) > 0


def test_likelihood_helpers():
    m = torch.randn(5)
    assert torch.allclose(normal_kl(m, torch.zeros(5), m, torch.zeros(5)), torch.zeros(5))
    kl = normal_kl(torch.tensor(0.0), torch.tensor(0.0), torch.tensor(1.0), torch.tensor(math.log(4.0)))
    assert math.isclose(kl.item(), 0.5 * (math.log(4.0) - 1 + 0.25 + 0.25), rel_tol=1e-6)
    # the 256 bins of [-1, 1] tile the line: their probabilities sum to 1
    centers = torch.linspace(-1, 1, 256, dtype=torch.float64)
    for mean, log_scale in [(0.1, -2.0), (-0.7, -4.0), (0.95, -1.0)]:
        lp = discretized_gaussian_log_likelihood(centers, torch.full_like(centers, mean),
                                                 torch.full_like(centers, log_scale))
        assert abs(lp.exp().sum().item() - 1) < 1e-6


def test_bad_inputs():
    with pytest.raises(ValueError, match="betas must lie"):
        GaussianDiffusion([0.1, 1.5])
    with pytest.raises(ValueError, match="var_type"):
        GaussianDiffusion([0.1], var_type="learned")
    d = create_diffusion("10")
    with pytest.raises(ValueError, match=r"timesteps must have shape \(2,\)"):
        d.q_sample(torch.zeros(2, 1, 2, 2), torch.tensor([1]), torch.zeros(2, 1, 2, 2))
    with pytest.raises(TypeError, match="integer step indices"):
        d.q_sample(torch.zeros(1, 1, 2, 2), torch.tensor([1.0]), torch.zeros(1, 1, 2, 2))
    with pytest.raises(ValueError, match="noise shape"):
        d.p_sample_loop(lambda x, t: x, (2, 1, 2, 2), noise=torch.zeros(3, 1, 2, 2))
