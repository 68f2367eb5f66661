import math

import numpy as np
import pytest
import scipy.linalg
import torch

from test_models_dit import random_weights
from treeq_engine.eval.metrics import (EpsProbe, class_accuracy, compare_samples, feature_stats, frechet_distance,
                                       psnr, ssim)
from treeq_engine.models.dit import DiT, dit_config


def test_psnr(gen):
    a = torch.rand(3, 1, 5, 7, generator=gen) * 2 - 1
    b = a + 0.1 * torch.randn(a.shape, generator=gen)
    want = [10 * math.log10(4.0 / float(((a[i] - b[i]) ** 2).mean())) for i in range(3)]
    torch.testing.assert_close(psnr(b, a), torch.tensor(want), rtol=1e-5, atol=1e-4)
    assert torch.isinf(psnr(a, a)).all()
    with pytest.raises(ValueError, match="differ in shape"):
        psnr(a, a[:2])


def naive_ssim(x: np.ndarray, y: np.ndarray, win: int, sigma: float, data_range: float) -> float:
    """SSIM of two 2-D images, patch by patch, straight from Wang et al. (2004)."""
    g = np.exp(-((np.arange(win) - (win - 1) / 2) ** 2) / (2 * sigma ** 2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    vals = []
    for i in range(x.shape[0] - win + 1):
        for j in range(x.shape[1] - win + 1):
            px, py = x[i:i + win, j:j + win], y[i:i + win, j:j + win]
            mx, my = (w * px).sum(), (w * py).sum()
            vx, vy = (w * (px - mx) ** 2).sum(), (w * (py - my) ** 2).sum()
            cxy = (w * (px - mx) * (py - my)).sum()
            vals.append((2 * mx * my + c1) * (2 * cxy + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2)))
    return float(np.mean(vals))


def test_ssim_matches_the_definition(gen):
    a = torch.rand(2, 2, 16, 13, generator=gen) * 2 - 1
    b = (a + 0.3 * torch.randn(a.shape, generator=gen)).clamp(-1, 1)
    got = ssim(b, a)
    for n in range(2):
        want = np.mean([naive_ssim(b[n, c].double().numpy(), a[n, c].double().numpy(), 11, 1.5, 2.0) for c in range(2)])
        assert abs(got[n].item() - want) < 1e-5
    torch.testing.assert_close(ssim(a, a), torch.ones(2))
    torch.testing.assert_close(ssim(a, b), got)  # symmetric
    small = torch.rand(1, 1, 6, 6, generator=gen)
    want = naive_ssim(small[0, 0].double().numpy(), (small[0, 0] * 0.5).double().numpy(), 5, 1.5, 2.0)
    assert abs(ssim(small, small * 0.5).item() - want) < 1e-5  # window shrinks to the (odd) image size
    out = compare_samples(b, a)
    assert out["ssim"] == pytest.approx(float(got.mean())) and out["psnr"] == pytest.approx(float(psnr(b, a).mean()))


def test_frechet_distance(gen):
    rng = np.random.default_rng(0)
    f1, f2 = rng.normal(size=(400, 6)), rng.normal(size=(300, 6)) @ rng.normal(size=(6, 6)) + 0.5
    mu1, s1 = feature_stats(f1)
    mu2, s2 = feature_stats(torch.from_numpy(f2))
    np.testing.assert_allclose(s1, np.cov(f1, rowvar=False))
    covmean = scipy.linalg.sqrtm(s1 @ s2).real  # the pytorch-fid / ADM formula
    want = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-8)
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(want, rel=1e-8)
    assert abs(frechet_distance(mu1, s1, mu1, s1)) < 1e-9
    # diagonal covariances: Σ (√a − √b)² plus the mean term
    a, b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.0])
    want = 1.0 + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(np.zeros(3), np.diag(a), np.array([1.0, 0, 0]), np.diag(b)) == pytest.approx(want)
    with pytest.raises(ValueError, match="shapes do not match"):
        frechet_distance(mu1, s1, mu1[:3], s1[:3, :3])
    # identical rank-deficient fits (fewer samples than features) at a large scale: 0 up to rounding
    big = rng.normal(size=(40, 200)) * 1e3
    mu, s = feature_stats(big)
    assert abs(frechet_distance(mu, s, mu, s)) < 1e-6 * np.trace(s)
    mu1b, s1b = feature_stats(torch.from_numpy(f1).bfloat16())   # numpy has no bfloat16: cast, not a TypeError
    assert s1b.shape == (6, 6)
    mu_1, s_1 = feature_stats(np.array([[1.0], [3.0], [2.0]]))   # one feature: still (F,) and (F, F)
    assert mu_1.shape == (1,) and s_1.shape == (1, 1)
    with pytest.raises(ValueError, match="N >= 2"):
        feature_stats(np.zeros((1, 3)))
    with pytest.raises(ValueError, match="NaN"):
        feature_stats(np.array([[0.0, np.nan], [1.0, 2.0]]))


def test_class_accuracy():
    logits = torch.tensor([[0.1, 2.0], [3.0, 0.0], [0.0, 1.0], [5.0, 4.0]])
    assert class_accuracy(logits, torch.tensor([1, 0, 0, 0])) == 0.75
    with pytest.raises(ValueError, match=r"\(N, K\)"):
        class_accuracy(logits, torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="no samples"):
        class_accuracy(logits[:0], torch.tensor([], dtype=torch.long))
    with pytest.raises(ValueError, match="integer class indices"):
        class_accuracy(logits, torch.tensor([0.5, 0.0, 0.0, 0.0]))


def test_eps_probe(gen):
    fp = random_weights(DiT(dit_config("DiT-test-1ch")), gen, std=0.1)
    x0 = torch.rand(20, 1, 8, 8, generator=gen) * 2 - 1
    probe = EpsProbe.build(fp, x0, timesteps=5, seed=3)
    assert sorted(torch.unique(probe.t).tolist()) == [0, 250, 500, 749, 999]
    assert probe.mse(fp) == 0.0
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="timesteps must be a positive int"):
            EpsProbe.build(fp, x0, timesteps=bad)
    with pytest.raises(ValueError, match="at least timesteps=30 samples"):
        EpsProbe.build(fp, x0, timesteps=30)   # 20 samples: the noisiest timesteps would get none
    again = EpsProbe.build(fp, x0, timesteps=5, seed=3)
    assert torch.equal(again.x, probe.x) and torch.equal(again.y, probe.y)  # seeded
    other = random_weights(DiT(dit_config("DiT-test-1ch")), gen, std=0.1)
    with torch.no_grad():
        eps_o = other(probe.x, probe.t, probe.y)[:, :1]
        eps_f = fp(probe.x, probe.t, probe.y)[:, :1]
    want = float(((eps_o - eps_f) ** 2).mean())
    assert probe.mse(other, batch=7) == pytest.approx(want, rel=1e-5)
    per_t = probe.mse_per_timestep(other)
    assert list(per_t) == [0, 250, 500, 749, 999]
    assert np.mean(list(per_t.values())) == pytest.approx(want, rel=1e-5)  # equal counts per timestep
