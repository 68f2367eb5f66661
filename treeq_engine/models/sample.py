"""Sampling a class-conditional DiT: the reference's ``sample.py`` as a function, deterministic by seed.

    images = sample(model, labels, steps=50, cfg_scale=1.5, seed=0)          # (N, C, H, W)

With ``cfg_scale != 1`` the batch is doubled to ``[cond; uncond]`` (the second half labelled with the null class)
and the model runs through ``forward_with_cfg``; the first half is returned. The starting noise and every
step's noise come from one ``torch.Generator`` seeded with ``seed``, so two calls with the same arguments give
the same images, and a quantized model sampled with the FP model's seed starts from the same x_T.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch

from .diffusion import GaussianDiffusion, SampleStep, create_diffusion
from .dit import DiT

SAMPLERS = ("ddpm", "ddim")


@torch.no_grad()
def sample(model: DiT, labels: torch.Tensor, *, steps: int | str = 50, sampler: str = "ddpm",
           cfg_scale: float = 1.0, seed: int = 0, eta: float = 0.0, clip_denoised: bool = True,
           diffusion: GaussianDiffusion | None = None, progress: bool = False,
           callback: Callable[[SampleStep], None] | None = None) -> torch.Tensor:
    """Samples ``(N, C, H, W)`` for class ``labels (N,)``. ``callback`` sees every step's model inputs: with
    guidance, the doubled batch ``[x; x]`` with labels ``[y; null]`` that the model actually ran on."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    if not isinstance(labels, torch.Tensor):
        labels = torch.as_tensor(labels)
    if labels.dim() != 1:
        raise ValueError(f"labels must be (N,), got shape {tuple(labels.shape)}")
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise TypeError(f"labels must be integer class indices, got {labels.dtype}")
    cfg = model.config
    # checked once here (a forward on the GPU checks no values: that would stall every step)
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= cfg.num_classes):
        raise ValueError(f"labels must be class indices in [0, {cfg.num_classes - 1}], got "
                         f"[{int(labels.min())}, {int(labels.max())}] (the null class is for guidance only)")
    if isinstance(cfg_scale, bool) or not isinstance(cfg_scale, (int, float)) or not math.isfinite(cfg_scale):
        raise ValueError(f"cfg_scale must be a finite number, got {cfg_scale!r}")
    if sampler == "ddim" and not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must lie in [0, 1] (0: deterministic DDIM, 1: DDPM-like), got {eta!r}")
    if sampler == "ddpm" and eta != 0.0:
        raise ValueError("eta is DDIM's; the ddpm sampler has none (use sampler='ddim')")
    diffusion = diffusion if diffusion is not None else create_diffusion(str(steps))
    device = next(model.parameters()).device
    labels = labels.to(device=device, dtype=torch.long)
    n = labels.shape[0]
    gen = torch.Generator(device=device).manual_seed(int(seed))
    z = torch.randn((n, cfg.in_channels, cfg.input_size, cfg.input_size), generator=gen, device=device)
    if cfg_scale != 1.0:
        z = torch.cat([z, z], dim=0)
        y = torch.cat([labels, torch.full_like(labels, model.null_class)])

        def fn(x, t, y):
            return model.forward_with_cfg(x, t, y, cfg_scale)
    else:
        y, fn = labels, model
    report = callback
    if callback is not None and cfg_scale != 1.0:
        # forward_with_cfg runs the model on [x[:n]; x[:n]] (the second half of x only carries the unused
        # uncond trajectory): report that, the batch the model really saw.
        def report(step: SampleStep) -> None:
            callback(dataclasses.replace(step, x=torch.cat([step.x[:n], step.x[:n]])))
    loop_kw = dict(noise=z, clip_denoised=clip_denoised, model_kwargs={"y": y}, generator=gen,
                   progress=progress, callback=report)
    was_training = model.training
    model.eval()
    try:
        if sampler == "ddpm":
            out = diffusion.p_sample_loop(fn, z.shape, **loop_kw)
        else:
            out = diffusion.ddim_sample_loop(fn, z.shape, eta=eta, **loop_kw)
    finally:
        model.train(was_training)
    return out[:n]
