"""ADM-style Gaussian diffusion (Ho et al. 2020; Nichol & Dhariwal 2021), as the DiT reference configures it.

    forward process   q(x_t | x_0) = N(√ᾱ_t · x_0, (1 − ᾱ_t) I),    ᾱ_t = Π_{s≤t} (1 − β_s)
    schedule          linear β from 1e-4 to 0.02 over 1000 steps (both scaled by 1000 / steps)
    model             ε-prediction; with a learned variance the model also outputs v ∈ [−1, 1] per pixel and
                      log σ² = f·log β_t + (1 − f)·log β̃_t,  f = (v + 1)/2         (learned range)
    posterior         q(x_{t−1} | x_t, x_0) = N(c1_t·x_0 + c2_t·x_t, β̃_t)
    loss              ‖ε − ε̂‖² + L_vlb (the variance learns through the bound; the mean is stopped there)

Respacing (``space_timesteps``) keeps a subset S of the original steps and re-derives the betas so that
ᾱ over S is unchanged; the model is always called with the *original* timestep index (``timestep_map``). DDPM
ancestral sampling (``p_sample_loop``) and DDIM (``ddim_sample_loop``, any η) run on the respaced process.
All schedule constants are float64 and cast to float32 when gathered, as in ADM. Randomness comes only from
an optional ``torch.Generator``, so a seed fixes a whole trajectory.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

VAR_TYPES = ("learned_range", "fixed_large", "fixed_small")

Model = Callable[..., torch.Tensor]


def linear_beta_schedule(num_steps: int) -> torch.Tensor:
    """ADM's linear schedule, float64 ``(num_steps,)``."""
    if num_steps <= 0:
        raise ValueError(f"diffusion steps must be positive, got {num_steps}")
    scale = 1000.0 / num_steps
    # numpy's linspace, not torch's: they differ in the last bit, and ADM's exact schedule is numpy's.
    return torch.from_numpy(np.linspace(scale * 1e-4, scale * 0.02, num_steps, dtype=np.float64))


def space_timesteps(num_timesteps: int, section_counts: str | Sequence[int] | int) -> set[int]:
    """The original steps to keep. ``section_counts`` is a step count (``250``), a comma list (``"10,15,20"``:
    the process is cut into equal sections, each strided to its count, endpoints included), or ``"ddimN"``: the
    fixed integer stride of the DDIM paper, ``range(0, T, stride)`` with exactly N steps."""
    if isinstance(section_counts, bool) or not isinstance(section_counts, (numbers.Integral, str, list, tuple, range)):
        raise ValueError(f"timestep respacing must be 'N', 'N1,N2,...', 'ddimN', an int or a list of ints, got "
                         f"{section_counts!r}")
    if isinstance(section_counts, numbers.Integral):
        section_counts = [int(section_counts)]
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            try:
                want = int(section_counts[len("ddim"):])
            except ValueError:
                raise ValueError(f"'ddimN' takes a step count N, got {section_counts!r}") from None
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == want:
                    return set(range(0, num_timesteps, stride))
            raise ValueError(f"cannot take exactly {want} of {num_timesteps} steps with an integer stride")
        try:
            section_counts = [int(s) for s in section_counts.split(",")]
        except ValueError:
            raise ValueError(f"timestep respacing must be 'N', 'N1,N2,...' or 'ddimN', got {section_counts!r}") from None
    counts = list(section_counts)
    if any(isinstance(c, bool) or not isinstance(c, numbers.Integral) for c in counts):
        raise ValueError(f"timestep respacing counts must be ints, got {counts}")
    if not counts or any(c <= 0 for c in counts):
        raise ValueError(f"timestep respacing counts must be positive, got {counts}")
    size_per, extra = divmod(num_timesteps, len(counts))
    steps: list[int] = []
    start = 0
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot divide a section of {size} steps into {count}")
        frac_stride = 1.0 if count <= 1 else (size - 1) / (count - 1)   # a float: not the int `stride` above
        # round() is Python's half-to-even, as in ADM: the exact step set depends on it.
        steps += [start + round(j * frac_stride) for j in range(count)]
        start += size
    return set(steps)


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=tuple(range(1, x.dim())))


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_std_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """log-probability of data ``x`` in [−1, 1] quantized to 256 bins under N(means, e^(2·log_scales)); the edge
    bins extend to ±∞. Elementwise, in nats."""
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = _approx_std_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = _approx_std_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


@dataclasses.dataclass(frozen=True)
class SampleStep:
    """What a sampling loop reports after each step (to ``callback``).

    ``index``: 0 for the first (noisiest) step. ``t``: respaced indices ``(B,)``. ``t_model``: the original
    timesteps the model was called with ``(B,)``. ``x``: the model's input x_t ``(B, C, H, W)``.
    ``model_kwargs``: the other model inputs (e.g. ``y``). ``sample``: x_{t−1}. ``pred_xstart``: the x_0 estimate.
    """

    index: int
    t: torch.Tensor
    t_model: torch.Tensor
    x: torch.Tensor
    model_kwargs: dict[str, Any]
    sample: torch.Tensor
    pred_xstart: torch.Tensor


class GaussianDiffusion:
    """A (possibly respaced) diffusion process with ε-prediction.

    ``betas``: the process's own betas ``(S,)``. ``timestep_map[i]`` is the model timestep of step ``i`` (the
    identity for an unspaced process). ``var_type``: ``learned_range`` (the model outputs 2C channels),
    ``fixed_large`` or ``fixed_small``.
    """

    def __init__(self, betas: torch.Tensor | Sequence[float], *, var_type: str = "learned_range",
                 timestep_map: Sequence[int] | None = None) -> None:
        betas = torch.as_tensor(betas, dtype=torch.float64).cpu()
        if betas.dim() != 1 or betas.numel() == 0:
            raise ValueError(f"betas must be a non-empty 1-D sequence, got shape {tuple(betas.shape)}")
        if not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError("betas must lie in (0, 1]")
        if var_type not in VAR_TYPES:
            raise ValueError(f"var_type must be one of {VAR_TYPES}, got {var_type!r}")
        self.var_type = var_type
        self.betas = betas
        self._device_tables: dict[tuple[int, torch.device], torch.Tensor] = {}
        self.num_timesteps = n = betas.numel()
        self.timestep_map = torch.arange(n) if timestep_map is None else torch.as_tensor(list(timestep_map))
        if self.timestep_map.shape != (n,):
            raise ValueError(f"timestep_map must have {n} entries, got {self.timestep_map.numel()}")

        # The constants are computed in numpy float64 as ADM does: torch's float64 kernels differ from numpy's
        # in the last bit here and there, and these values should be the reference's exactly.
        b = betas.numpy()
        alphas = 1.0 - b
        acp = np.cumprod(alphas)
        acp_prev = np.append(1.0, acp[:-1])
        post_var = b * (1.0 - acp_prev) / (1.0 - acp)
        # β̃_0 = 0: its log is clipped by repeating β̃_1 at t = 0.
        post_log_var = np.log(np.append(post_var[1], post_var[1:])) if n > 1 else np.log(b)
        fixed_large = np.append(post_var[1], b[1:]) if n > 1 else b
        t64 = torch.from_numpy
        self.alphas_cumprod = t64(acp)
        self.alphas_cumprod_prev = t64(acp_prev)
        self.sqrt_alphas_cumprod = t64(np.sqrt(acp))
        self.sqrt_one_minus_alphas_cumprod = t64(np.sqrt(1.0 - acp))
        self.sqrt_recip_alphas_cumprod = t64(np.sqrt(1.0 / acp))
        self.sqrt_recipm1_alphas_cumprod = t64(np.sqrt(1.0 / acp - 1))
        self.posterior_variance = t64(post_var)
        self.posterior_log_variance_clipped = t64(post_log_var)
        self.posterior_mean_coef1 = t64(b * np.sqrt(acp_prev) / (1.0 - acp))
        self.posterior_mean_coef2 = t64((1.0 - acp_prev) * np.sqrt(alphas) / (1.0 - acp))
        self.log_betas = t64(np.log(b))
        self._fixed_var = {"fixed_large": (t64(fixed_large), t64(np.log(fixed_large))),
                           "fixed_small": (self.posterior_variance, self.posterior_log_variance_clipped)}

    # -- construction --------------------------------------------------------------------------------------
    def respaced(self, use_timesteps: Iterable[int]) -> "GaussianDiffusion":
        """The process on a subset of this process's steps, with betas re-derived so ᾱ agrees on the subset."""
        keep = sorted(set(int(i) for i in use_timesteps))
        if not keep or keep[0] < 0 or keep[-1] >= self.num_timesteps:
            raise ValueError(f"respacing steps must be a non-empty subset of [0, {self.num_timesteps})")
        new_betas, last = [], 1.0
        for i in keep:
            a = float(self.alphas_cumprod[i])
            new_betas.append(1.0 - a / last)
            last = a
        return GaussianDiffusion(new_betas, var_type=self.var_type,
                                 timestep_map=[int(self.timestep_map[i]) for i in keep])

    # -- helpers -------------------------------------------------------------------------------------------
    def _on(self, arr: torch.Tensor, device: torch.device) -> torch.Tensor:
        """``arr`` (one of this process's constant tables) on ``device``, copied there once: a host-to-device
        copy per lookup would make every sampling step wait for the GPU several times."""
        key = (id(arr), device)
        if key not in self._device_tables:
            self._device_tables[key] = arr.to(device)
        return self._device_tables[key]

    def _extract(self, arr: torch.Tensor, t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """``arr[t]`` as float32, shaped ``(B, 1, 1, ...)`` to broadcast against ``shape``."""
        out = self._on(arr, t.device)[t].float()
        return out.reshape(out.shape + (1,) * (len(shape) - 1))

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """Respaced indices -> the original timesteps the model was trained on."""
        return self._on(self.timestep_map, t.device)[t].to(t.dtype)

    def _check_t(self, x: torch.Tensor, t: torch.Tensor) -> None:
        if t.shape != (x.shape[0],):
            raise ValueError(f"timesteps must have shape ({x.shape[0]},), got {tuple(t.shape)}")
        if t.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"timesteps must be integer step indices, got {t.dtype}")

    # -- forward process -----------------------------------------------------------------------------------
    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε."""
        self._check_t(x_start, t)
        if noise.shape != x_start.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} != x_start shape {tuple(x_start.shape)}")
        return (self._extract(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
                + self._extract(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise)

    def q_posterior_mean_variance(self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        mean = (self._extract(self.posterior_mean_coef1, t, x_t.shape) * x_start
                + self._extract(self.posterior_mean_coef2, t, x_t.shape) * x_t)
        return (mean, self._extract(self.posterior_variance, t, x_t.shape),
                self._extract(self.posterior_log_variance_clipped, t, x_t.shape))

    def predict_xstart_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return (self._extract(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
                - self._extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * eps)

    def predict_eps_from_xstart(self, x_t: torch.Tensor, t: torch.Tensor, x_start: torch.Tensor) -> torch.Tensor:
        return ((self._extract(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t - x_start)
                / self._extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape))

    # -- reverse process -----------------------------------------------------------------------------------
    def split_output(self, model_output: torch.Tensor, x: torch.Tensor, t: torch.Tensor):
        """The model output -> (ε̂, variance, log variance) under this process's variance type."""
        b, c = x.shape[:2]
        if self.var_type == "learned_range":
            if model_output.shape != (b, 2 * c, *x.shape[2:]):
                raise ValueError(f"a learned-variance model must output (B, 2C, ...) = {(b, 2 * c, *x.shape[2:])}, "
                                 f"got {tuple(model_output.shape)}")
            eps, v = model_output[:, :c], model_output[:, c:]
            min_log = self._extract(self.posterior_log_variance_clipped, t, x.shape)
            max_log = self._extract(self.log_betas, t, x.shape)
            frac = (v + 1) / 2
            log_var = frac * max_log + (1 - frac) * min_log
            return eps, torch.exp(log_var), log_var
        if model_output.shape != x.shape:
            raise ValueError(f"a fixed-variance model must output x's shape {tuple(x.shape)}, got "
                             f"{tuple(model_output.shape)}")
        var, log_var = self._fixed_var[self.var_type]
        return model_output, self._extract(var, t, x.shape), self._extract(log_var, t, x.shape)

    def p_mean_variance(self, model: Model, x: torch.Tensor, t: torch.Tensor, *, clip_denoised: bool = True,
                        model_kwargs: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
        """p(x_{t−1} | x_t): ``mean``, ``variance``, ``log_variance``, ``pred_xstart`` and the model's ``eps``."""
        self._check_t(x, t)
        out = model(x, self.model_timesteps(t), **(model_kwargs or {}))
        eps, var, log_var = self.split_output(out, x, t)
        x0 = self.predict_xstart_from_eps(x, t, eps)
        if clip_denoised:
            x0 = x0.clamp(-1, 1)
        mean, _, _ = self.q_posterior_mean_variance(x0, x, t)
        return {"mean": mean, "variance": var, "log_variance": log_var, "pred_xstart": x0, "eps": eps}

    @staticmethod
    def _randn(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)

    def p_sample(self, model: Model, x: torch.Tensor, t: torch.Tensor, *, clip_denoised: bool = True,
                 model_kwargs: dict[str, Any] | None = None, generator: torch.Generator | None = None):
        """One DDPM ancestral step: x_{t−1} = μ + σ·z (no noise at t = 0)."""
        out = self.p_mean_variance(model, x, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
        noise = self._randn(x, generator)
        nonzero = (t != 0).float().reshape(-1, *([1] * (x.dim() - 1)))
        return {"sample": out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * noise,
                "pred_xstart": out["pred_xstart"]}

    def ddim_sample(self, model: Model, x: torch.Tensor, t: torch.Tensor, *, eta: float = 0.0,
                    clip_denoised: bool = True, model_kwargs: dict[str, Any] | None = None,
                    generator: torch.Generator | None = None):
        """One DDIM step (Song et al. eq. 12) with stochasticity η; ε is re-derived from the (clipped) x_0."""
        out = self.p_mean_variance(model, x, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
        eps = self.predict_eps_from_xstart(x, t, out["pred_xstart"])
        ab = self._extract(self.alphas_cumprod, t, x.shape)
        ab_prev = self._extract(self.alphas_cumprod_prev, t, x.shape)
        sigma = eta * torch.sqrt((1 - ab_prev) / (1 - ab)) * torch.sqrt(1 - ab / ab_prev)
        noise = self._randn(x, generator)
        mean = out["pred_xstart"] * torch.sqrt(ab_prev) + torch.sqrt(1 - ab_prev - sigma ** 2) * eps
        nonzero = (t != 0).float().reshape(-1, *([1] * (x.dim() - 1)))
        return {"sample": mean + nonzero * sigma * noise, "pred_xstart": out["pred_xstart"]}

    def _loop(self, step_fn, model: Model, shape: Sequence[int], *, noise: torch.Tensor | None,
              model_kwargs: dict[str, Any] | None, generator: torch.Generator | None,
              device: torch.device | str | None, progress: bool, callback: Callable[[SampleStep], None] | None,
              desc: str, **step_kw: Any) -> torch.Tensor:
        model_kwargs = dict(model_kwargs or {})
        if noise is not None:
            if tuple(noise.shape) != tuple(shape):
                raise ValueError(f"noise shape {tuple(noise.shape)} != requested shape {tuple(shape)}")
            x = noise
        else:
            dev = device if device is not None else (generator.device if generator is not None else "cpu")
            x = torch.randn(tuple(shape), generator=generator, device=dev)
        steps = range(self.num_timesteps - 1, -1, -1)
        if progress:
            from tqdm.auto import tqdm

            steps = tqdm(steps, desc=desc, leave=False)
        for index, i in enumerate(steps):
            t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
            out = step_fn(model, x, t, model_kwargs=model_kwargs, generator=generator, **step_kw)
            if callback is not None:
                callback(SampleStep(index, t, self.model_timesteps(t), x, model_kwargs, out["sample"],
                                    out["pred_xstart"]))
            x = out["sample"]
        return x

    @torch.no_grad()
    def p_sample_loop(self, model: Model, shape: Sequence[int], *, noise: torch.Tensor | None = None,
                      clip_denoised: bool = True, model_kwargs: dict[str, Any] | None = None,
                      generator: torch.Generator | None = None, device: torch.device | str | None = None,
                      progress: bool = False, callback: Callable[[SampleStep], None] | None = None) -> torch.Tensor:
        """DDPM ancestral sampling from x_T = ``noise`` (or N(0, I) drawn from ``generator``) to x_0."""
        return self._loop(self.p_sample, model, shape, noise=noise, model_kwargs=model_kwargs, generator=generator,
                          device=device, progress=progress, callback=callback, desc="ddpm",
                          clip_denoised=clip_denoised)

    @torch.no_grad()
    def ddim_sample_loop(self, model: Model, shape: Sequence[int], *, eta: float = 0.0,
                         noise: torch.Tensor | None = None, clip_denoised: bool = True,
                         model_kwargs: dict[str, Any] | None = None, generator: torch.Generator | None = None,
                         device: torch.device | str | None = None, progress: bool = False,
                         callback: Callable[[SampleStep], None] | None = None) -> torch.Tensor:
        """DDIM sampling (η = 0: deterministic given x_T)."""
        return self._loop(self.ddim_sample, model, shape, noise=noise, model_kwargs=model_kwargs,
                          generator=generator, device=device, progress=progress, callback=callback, desc="ddim",
                          eta=eta, clip_denoised=clip_denoised)

    # -- training ------------------------------------------------------------------------------------------
    def vb_terms_bpd(self, model_output: torch.Tensor, x_start: torch.Tensor, x_t: torch.Tensor,
                     t: torch.Tensor) -> torch.Tensor:
        """The variational-bound term per sample, in bits per dim: KL(q(x_{t−1}|x_t,x_0) ‖ p(x_{t−1}|x_t)) for
        t > 0, the discretized decoder NLL at t = 0. ``(B,)``."""
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x_start, x_t, t)
        eps, _, log_var = self.split_output(model_output, x_t, t)
        mean, _, _ = self.q_posterior_mean_variance(self.predict_xstart_from_eps(x_t, t, eps), x_t, t)
        kl = mean_flat(normal_kl(true_mean, true_log_var, mean, log_var)) / math.log(2.0)
        nll = -mean_flat(discretized_gaussian_log_likelihood(x_start, mean, 0.5 * log_var)) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def training_losses(self, model: Model, x_start: torch.Tensor, t: torch.Tensor, *, noise: torch.Tensor,
                        model_kwargs: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
        """ADM's hybrid loss per sample: ``mse`` = ‖ε − ε̂‖² (mean over dims) plus, with a learned variance,
        ``vb`` with ε̂ detached so the bound trains only the variance; ``loss`` is their sum. Each ``(B,)``."""
        x_t = self.q_sample(x_start, t, noise)
        out = model(x_t, self.model_timesteps(t), **(model_kwargs or {}))
        c = x_start.shape[1]
        terms: dict[str, torch.Tensor] = {}
        if self.var_type == "learned_range":
            if out.shape[1] != 2 * c:
                raise ValueError(f"a learned-variance model must output 2C = {2 * c} channels, got {out.shape[1]}")
            eps = out[:, :c]
            frozen = torch.cat([eps.detach(), out[:, c:]], dim=1)
            terms["vb"] = self.vb_terms_bpd(frozen, x_start, x_t, t)
        else:
            eps = out
        terms["mse"] = mean_flat((noise - eps) ** 2)
        terms["loss"] = terms["mse"] + terms.get("vb", 0.0)
        return terms


def create_diffusion(timestep_respacing: str | int | Sequence[int] | None = "", *, learn_sigma: bool = True,
                     sigma_small: bool = False, diffusion_steps: int = 1000) -> GaussianDiffusion:
    """The DiT reference's diffusion: linear β over ``diffusion_steps``, ε-prediction, learned-range variance
    (fixed large/small without ``learn_sigma``), respaced to ``timestep_respacing`` ('' or None: all steps)."""
    var_type = "learned_range" if learn_sigma else ("fixed_small" if sigma_small else "fixed_large")
    base = GaussianDiffusion(linear_beta_schedule(diffusion_steps), var_type=var_type)
    if timestep_respacing in (None, ""):
        timestep_respacing = diffusion_steps
    # Like the reference, even "all steps" goes through respacing: the betas re-derived from ᾱ differ from the
    # schedule's in the last bits, and matching them keeps sampling bit-compatible.
    return base.respaced(space_timesteps(diffusion_steps, timestep_respacing))


def sampler_weights(diffusion: GaussianDiffusion, t: torch.Tensor) -> torch.Tensor:
    """``c(t)²`` with ``c(t) = β_t / (√α_t · √(1 − ᾱ_t))`` for the (respaced) step indices ``t (B,)``: how much an
    ε error moves the DDPM posterior mean ``(x_t − β_t/√(1 − ᾱ_t) · ε) / √α_t``. float64 ``(B,)``."""
    betas = torch.as_tensor(diffusion.betas, dtype=torch.float64)
    abar = torch.as_tensor(diffusion.alphas_cumprod, dtype=torch.float64)
    beta, ab = betas[t], abar[t]
    return (beta / ((1 - beta).sqrt() * (1 - ab).sqrt())) ** 2
