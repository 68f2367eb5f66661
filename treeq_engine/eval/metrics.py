"""Quality metrics: what quantization loses, measured against the full-precision (FP) model and real data.

One module for the demo, the search, PTQ and the benchmarks:

* **ε-prediction MSE** (:class:`EpsProbe`): a fixed, seeded set of model inputs (x_t, t, y) spread over the
  timesteps, with the FP model's ε on them cached; ``probe.mse(model)`` is the mean squared difference of the
  model's ε channels from FP's (overall and per timestep).
* **Sample PSNR and SSIM** against FP samples drawn from the same seeds (:func:`psnr`, :func:`ssim`).
* **Fréchet distance** between Gaussian fits of feature sets (:func:`frechet_distance`), and **class accuracy**;
  on digits the features and labels come from the shipped classifier (:class:`DigitsJudge`), and the real
  reference is the held-out split. The ADM-suite FID/sFID/IS are in :mod:`treeq_engine.eval.adm`.

Images are ``(N, C, H, W)`` in [−1, 1] (``data_range`` 2) unless stated.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F


# -- image similarity -------------------------------------------------------------------------------------------

def _check_pair(x: torch.Tensor, ref: torch.Tensor, data_range: float = 2.0) -> None:
    try:
        r = float(data_range)
    except (TypeError, ValueError):
        r = math.nan
    if not (math.isfinite(r) and r > 0):  # log10(range² / MSE) would be -inf or NaN, not an error
        raise ValueError(f"data_range must be a positive finite number, got {data_range!r}")
    if x.shape != ref.shape:
        raise ValueError(f"images and reference differ in shape: {tuple(x.shape)} vs {tuple(ref.shape)}")
    if x.dim() != 4:
        raise ValueError(f"images must be (N, C, H, W), got {tuple(x.shape)}")


def psnr(x: torch.Tensor, ref: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Per-image PSNR in dB, ``(N,)``: ``10·log10(range² / MSE)``; identical images give +inf."""
    _check_pair(x, ref, data_range)
    mse = ((x.double() - ref.double()) ** 2).flatten(1).mean(1)
    return (10 * torch.log10(data_range ** 2 / mse)).float()


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    g = torch.exp(-((torch.arange(size, dtype=torch.float64) - (size - 1) / 2) ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(x: torch.Tensor, ref: torch.Tensor, data_range: float = 2.0, window: int = 11,
         sigma: float = 1.5) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004), ``(N,)``: Gaussian-weighted local means, variances and covariance over
    ``window × window`` patches (σ = 1.5), the valid positions only, ``C1 = (0.01·range)²``,
    ``C2 = (0.03·range)²``; averaged over positions and channels. Images smaller than the window use a window
    of their (odd) size."""
    _check_pair(x, ref, data_range)
    n, c, h, w = x.shape
    size = min(window, h - (1 - h % 2), w - (1 - w % 2))
    if size < 1:
        raise ValueError(f"images of {h}×{w} are too small for SSIM")
    k = _gaussian_window(size, sigma).to(x.device)[None, None].expand(c, 1, size, size)
    a, b = x.double(), ref.double()

    def blur(v: torch.Tensor) -> torch.Tensor:
        return F.conv2d(v, k, groups=c)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a ** 2
    var_b = blur(b * b) - mu_b ** 2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(1).float()


# -- feature statistics ------------------------------------------------------------------------------------------

def feature_stats(features: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(F,)`` and covariance ``(F, F)`` (unbiased, float64) of features ``(N, F)``."""
    # (float64 first: numpy has no bfloat16)
    f = np.asarray(features.detach().cpu().double() if isinstance(features, torch.Tensor) else features,
                   dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be (N, F) with N >= 2, got shape {f.shape}")
    if not np.isfinite(f).all():
        raise ValueError("features contain NaN or Inf")
    return f.mean(0), np.atleast_2d(np.cov(f, rowvar=False))


def _sqrt_psd(a: np.ndarray) -> np.ndarray:
    vals, vecs = np.linalg.eigh((a + a.T) / 2)
    return (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T


def check_gaussian(mu: np.ndarray, sigma: np.ndarray, what: str = "Gaussian") -> tuple[np.ndarray, np.ndarray]:
    """``mu`` and ``sigma`` as float64 after checking that they can be a Gaussian fit: ``mu (D,)`` and ``sigma
    (D, D)`` finite, ``sigma`` symmetric and positive semi-definite up to rounding. ``what`` names them in the
    error (a file, or which side of a distance). A scalar ``mu``/``sigma`` is a 1-D Gaussian."""
    try:
        mu = np.atleast_1d(np.asarray(mu, np.float64))
        sigma = np.atleast_2d(np.asarray(sigma, np.float64))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what}: mu and sigma must be numeric arrays ({e})") from None
    if mu.ndim != 1 or mu.size == 0 or sigma.shape != (mu.size, mu.size):
        raise ValueError(f"{what}: expected mu (D,) and sigma (D, D) with D >= 1, got mu {mu.shape} and sigma "
                         f"{sigma.shape}")
    for name, v in (("mu", mu), ("sigma", sigma)):
        if not np.isfinite(v).all():
            raise ValueError(f"{what}: {name} contains NaN or Inf ({int((~np.isfinite(v)).sum())} of {v.size} "
                             "values)")
    # A covariance is symmetric PSD; rounding (float32 storage, np.cov of fewer samples than dimensions) leaves
    # asymmetry and negative eigenvalues far below these tolerances, relative to the matrix's scale.
    scale = float(np.abs(sigma).max())
    asym = float(np.abs(sigma - sigma.T).max())
    if asym > 1e-6 * scale:
        raise ValueError(f"{what}: sigma is not symmetric (max |sigma - sigma.T| = {asym:.3g}, entries up to "
                         f"{scale:.3g}); a covariance matrix is")
    # PSD within tol  <=>  sigma + tol·I positive definite; Cholesky says so at a fraction of an eigensolver's cost.
    tol = 1e-6 * max(float(np.trace(sigma)), 0.0) + np.finfo(np.float64).tiny
    try:
        np.linalg.cholesky(sigma + tol * np.eye(mu.size))
    except np.linalg.LinAlgError:
        low = float(np.linalg.eigvalsh((sigma + sigma.T) / 2).min())
        raise ValueError(f"{what}: sigma is not positive semi-definite (smallest eigenvalue {low:.3g}, trace "
                         f"{float(np.trace(sigma)):.3g}); a covariance matrix is") from None
    return mu, sigma


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """``‖μ1 − μ2‖² + tr(Σ1 + Σ2 − 2·(Σ1·Σ2)^½)`` between two Gaussians (FID's formula).

    Both fits are checked first (:func:`check_gaussian`: finite, matching shapes, Σ symmetric PSD), since they
    may come from a user's file. tr((Σ1Σ2)^½) is computed as the sum of the singular values of Σ1^½·Σ2^½ (the
    square roots of the eigenvalues of Σ1^½·Σ2·Σ1^½, which Σ1·Σ2 shares), so it stays real and, never
    squaring, accurate for the rank-deficient covariances small sample sets give (identical fits give 0)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"Fréchet distance: shapes do not match: mu {mu1.shape} / {mu2.shape}, sigma {s1.shape} / "
                         f"{s2.shape}")
    mu1, s1 = check_gaussian(mu1, s1, "Fréchet distance: first Gaussian (mu1, sigma1)")
    mu2, s2 = check_gaussian(mu2, s2, "Fréchet distance: second Gaussian (mu2, sigma2)")
    tr_sqrt = float(np.linalg.svd(_sqrt_psd(s1) @ _sqrt_psd(s2), compute_uv=False).sum())
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)


def class_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of rows of ``logits (N, K)`` whose argmax is ``labels (N,)``."""
    if logits.dim() != 2 or labels.shape != (logits.shape[0],):
        raise ValueError(f"logits must be (N, K) and labels (N,), got {tuple(logits.shape)} and {tuple(labels.shape)}")
    if logits.shape[0] == 0:
        raise ValueError("class accuracy of no samples: logits and labels are empty")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integer class indices, got {labels.dtype}")
    return float((logits.argmax(1) == labels.to(logits.device)).float().mean())


# -- ε-prediction MSE ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class EpsProbe:
    """Fixed model inputs and the FP model's ε on them.

    ``x (N, C, H, W)``, ``t (N,)`` model timesteps, ``y (N,)`` labels, ``ref_eps (N, C, H, W)``. Build it once
    with :meth:`build`; then ``probe.mse(model)`` compares any (e.g. quantized) model to FP on exactly these
    inputs."""

    x: torch.Tensor
    t: torch.Tensor
    y: torch.Tensor
    ref_eps: torch.Tensor

    @classmethod
    @torch.no_grad()
    def build(cls, fp_model: torch.nn.Module, x0: torch.Tensor, *, timesteps: int = 10, seed: int = 0,
              num_classes: int | None = None, labels: torch.Tensor | None = None, diffusion=None,
              batch: int = 256) -> "EpsProbe":
        """Noise ``x0 (N, C, H, W)`` (real data, or N(0, I) for a model without data) to ``timesteps`` evenly
        spaced timesteps of the 1000-step process (sample ``i`` gets the ``i mod timesteps``-th), with noise
        and, unless ``labels`` are given, labels drawn from ``seed``."""
        from ..models.diffusion import create_diffusion

        if isinstance(timesteps, bool) or not isinstance(timesteps, int) or timesteps < 1:
            raise ValueError(f"timesteps must be a positive int, got {timesteps!r}")
        if not isinstance(x0, torch.Tensor) or x0.dim() < 2 or x0.shape[0] < timesteps:
            got = tuple(x0.shape) if isinstance(x0, torch.Tensor) else type(x0).__name__
            raise ValueError(f"x0 must be a tensor of at least timesteps={timesteps} samples (sample i is noised to "
                             f"the (i mod timesteps)-th timestep: fewer would leave the noisiest out), got {got}")
        diffusion = diffusion if diffusion is not None else create_diffusion("")
        gen = torch.Generator().manual_seed(seed)
        n = x0.shape[0]
        grid = torch.linspace(0, diffusion.num_timesteps - 1, timesteps).round().long()
        t = grid[torch.arange(n) % timesteps]
        if labels is None:
            if num_classes is None:
                num_classes = fp_model.config.num_classes
            labels = torch.randint(0, num_classes, (n,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        x = diffusion.q_sample(x0.float().cpu(), t, noise)
        device = next(fp_model.parameters()).device
        probe = cls(x.to(device), diffusion.model_timesteps(t).to(device), labels.long().to(device),
                    torch.empty(0))
        return dataclasses.replace(probe, ref_eps=probe.eps(fp_model, batch))

    @torch.no_grad()
    def eps(self, model: Callable[..., torch.Tensor], batch: int = 256) -> torch.Tensor:
        """The ε channels of ``model`` on the probe inputs ``(N, C, H, W)``."""
        was = getattr(model, "training", False)
        if isinstance(model, torch.nn.Module):
            model.eval()
        c = self.x.shape[1]
        out = torch.cat([model(self.x[i:i + batch], self.t[i:i + batch], self.y[i:i + batch])[:, :c]
                         for i in range(0, self.x.shape[0], batch)])
        if isinstance(model, torch.nn.Module):
            model.train(was)
        return out

    def mse(self, model: Callable[..., torch.Tensor], batch: int = 256) -> float:
        """Mean over all probe inputs of ``(ε_model − ε_FP)²``."""
        return float(((self.eps(model, batch) - self.ref_eps) ** 2).mean())

    def mse_per_timestep(self, model: Callable[..., torch.Tensor], batch: int = 256) -> dict[int, float]:
        """``{timestep: mean (ε_model − ε_FP)²}``, in increasing timestep order."""
        err = ((self.eps(model, batch) - self.ref_eps) ** 2).flatten(1).mean(1)
        return {int(t): float(err[self.t == t].mean()) for t in torch.unique(self.t)}


# -- digits: classifier features and labels -------------------------------------------------------------------

class DigitsJudge:
    """The digits metrics: Fréchet distance in the shipped classifier's feature space against the held-out
    real digits, and class accuracy by the classifier."""

    def __init__(self, classifier: torch.nn.Module | None = None, real: torch.Tensor | None = None) -> None:
        from ..models.classifier import load_digits_classifier
        from ..models.digits import digits_split

        self.classifier = classifier if classifier is not None else load_digits_classifier()
        self.classifier.eval()
        self.real = real if real is not None else digits_split().test_x
        self.real_stats = feature_stats(self.features(self.real))

    @torch.no_grad()
    def features(self, images: torch.Tensor, batch: int = 512) -> torch.Tensor:
        dev = next(self.classifier.parameters()).device
        return torch.cat([self.classifier.features(images[i:i + batch].to(dev)).cpu()
                          for i in range(0, images.shape[0], batch)])

    @torch.no_grad()
    def logits(self, images: torch.Tensor, batch: int = 512) -> torch.Tensor:
        dev = next(self.classifier.parameters()).device
        return torch.cat([self.classifier(images[i:i + batch].to(dev)).cpu()
                          for i in range(0, images.shape[0], batch)])

    def frechet(self, images: torch.Tensor) -> float:
        """Fréchet distance of ``images``' classifier features to the held-out real digits'."""
        return frechet_distance(*feature_stats(self.features(images)), *self.real_stats)

    def accuracy(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        return class_accuracy(self.logits(images), labels)


def compare_samples(samples: torch.Tensor, ref_samples: torch.Tensor, data_range: float = 2.0) -> dict[str, float]:
    """Mean PSNR (dB, over images that differ from their reference; +inf if all are identical) and mean SSIM of
    ``samples`` against ``ref_samples`` drawn from the same seeds. Empty or non-finite input is an error: it has
    no meaningful PSNR, and skipping it would read as "identical"."""
    _check_pair(samples, ref_samples)
    if samples.shape[0] == 0:
        raise ValueError(f"compare_samples: no samples to compare (shape {tuple(samples.shape)})")
    for name, v in (("samples", samples), ("ref_samples", ref_samples)):
        bad = int((~torch.isfinite(v)).sum())
        if bad:
            raise ValueError(f"compare_samples: {name} contain NaN or Inf ({bad} of {v.numel()} values)")
    p = psnr(samples, ref_samples, data_range)
    # With finite input the only non-finite PSNR is +inf from an identical pair, which the mean leaves out.
    differ = p[p != math.inf]
    return {"psnr": float(differ.mean()) if differ.numel() else math.inf,
            "ssim": float(ssim(samples, ref_samples, data_range).mean())}
