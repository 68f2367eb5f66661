"""QuantLinear: a fake-quantized ``nn.Linear`` driven by the format oracle.

    y = Q̃_a(x) · Q̃_w(W − B)ᵀ + bias + branch(x)        Q̃(v) = v + λ·(Q(v) − v)

``Q`` is :func:`treeq_engine.format.fake_quantize` (per-token activations, per-channel weights, straight-through
gradients). ``λ = noise_scale`` is Environmental Noise Guidance's knob: 1 is plain quantization, 0 leaves the
layer in full precision, values between scale the quantization error. ``branch`` is an optional
high-precision module (the General Monarch Branch, or low rank) with a ``dense()`` method giving the matrix B
that the quantized weight leaves out, and a ``forward(x)`` computing ``x·Bᵀ``; with it the quantized path
carries only the residual ``W − B``.

Candidate batching (the search): ``set_group_configs([c_0, …, c_{G−1}])`` splits the leading batch dimension
of every input into G equal groups and runs group ``g`` at ``c_g`` (same λ, same branch), as G separate
forwards would, in one batched matmul. ``set_group_configs(None)`` returns to the single config. Grouped mode
is for evaluation only (no gradients).

This is the simulation used for search, calibration and fine-tuning. The packed, kernel-backed module for
inference is a different class (runtime), built from the same plan.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..format import QuantSpec, QuantizedTensor, fake_quantize, quantize
from ..plan import LayerConfig
from .grouped import fake_quantize_groups, group_params


class QuantLinear(nn.Module):
    GROUP_WEIGHT_CACHE = 6   # fake-quantized weights kept for grouped mode (one per weight spec and λ)

    def __init__(self, linear: nn.Linear, config: LayerConfig | None = None, *, name: str = "") -> None:
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"QuantLinear wraps an nn.Linear, got {type(linear).__name__}")
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight  # shared Parameter: conversion copies nothing
        self.bias = linear.bias
        self.name = name
        self.branch: nn.Module | None = None
        self.noise_scale = 1.0
        self._config: LayerConfig | None = None
        self._w_cache: tuple[Any, torch.Tensor] | None = None
        self._groups: tuple[LayerConfig | None, ...] | None = None
        self._wg_cache: dict[Any, torch.Tensor] = {}
        self._gp_cache: dict[Any, Any] = {}   # per (λ, device): activation specs, their params, branch mask
        self.set_config(config)

    # -- configuration ---------------------------------------------------------------------------
    @property
    def config(self) -> LayerConfig | None:
        return self._config

    def set_config(self, config: LayerConfig | None) -> None:
        if config is not None and not isinstance(config, LayerConfig):
            raise TypeError(f"config must be a LayerConfig or None, got {type(config).__name__}")
        self._config = config
        self._w_cache = None

    @property
    def group_configs(self) -> tuple[LayerConfig | None, ...] | None:
        return self._groups

    def set_group_configs(self, configs: Sequence[LayerConfig | None] | None) -> None:
        """Grouped (candidate-batched) mode: G configs, one per equal slice of the batch; ``None`` leaves it."""
        self._gp_cache = {}
        if configs is None:   # the weight cache stays: a search scores the same node in several batches
            self._groups = None
            return
        configs = tuple(configs)
        if not configs:
            raise ValueError(f"{self.name or 'QuantLinear'}: set_group_configs needs at least one config")
        for c in configs:
            if c is not None and not isinstance(c, LayerConfig):
                raise TypeError(f"group configs must be LayerConfig or None, got {type(c).__name__}")
        self._groups = configs

    def set_noise_scale(self, lam: float) -> None:
        lam = float(lam)
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"noise scale λ must be in [0, 1], got {lam}")
        self.noise_scale = lam
        self._w_cache = None

    @property
    def weight_spec(self) -> QuantSpec | None:
        return None if self._config is None else self._config.weight_spec()

    @property
    def act_spec(self) -> QuantSpec | None:
        return None if self._config is None else self._config.act_spec()

    # -- math ------------------------------------------------------------------------------------
    def residual_weight(self) -> torch.Tensor:
        """The weight the quantized path carries: ``W − B`` with a branch, else ``W``."""
        if self.branch is None:
            return self.weight
        return self.weight - self.branch.dense().to(self.weight.dtype)

    def _cache_key(self) -> tuple:
        parts = [self._config, self.noise_scale, self.weight._version, self.weight.data_ptr(), self.weight.dtype]
        if self.branch is not None:
            parts += [(p.data_ptr(), p._version) for p in self.branch.parameters()]
        return tuple(parts)

    def quantized_weight(self) -> torch.Tensor:
        """``Q̃_w(W − B)`` in the weight's dtype; cached while neither weights nor config change and no
        gradient is needed."""
        spec = self.weight_spec
        wr = self.residual_weight()
        if spec is None or not spec.is_quantized:
            return wr
        needs_grad = torch.is_grad_enabled() and wr.requires_grad
        if not needs_grad:
            key = self._cache_key()
            if self._w_cache is not None and self._w_cache[0] == key:
                return self._w_cache[1]
        wq = self._noisy_weight(wr, spec)
        if not needs_grad:
            wq = wq.detach()
            self._w_cache = (key, wq)
        return wq

    def _noisy_weight(self, wr: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
        wq = fake_quantize(wr, spec)
        return wq if self.noise_scale == 1.0 else wr + self.noise_scale * (wq - wr)

    def _group_weight(self, config: LayerConfig | None) -> torch.Tensor:
        """The weight group ``config`` multiplies: ``W`` in full precision, else ``Q̃_w(W − B)`` (cached)."""
        if config is None:
            return self.weight
        spec = config.weight_spec()
        key = (spec, self._cache_key()[1:])
        hit = self._wg_cache.get(key)
        if hit is None:   # keys hold λ and the weights' versions, so a stale entry is never hit; keep a few
            wr = self.residual_weight().detach()
            hit = wr if not spec.is_quantized else self._noisy_weight(wr, spec)
            if len(self._wg_cache) >= self.GROUP_WEIGHT_CACHE:
                self._wg_cache.pop(next(iter(self._wg_cache)))
            self._wg_cache[key] = hit
        return hit

    def weight_qtensor(self) -> QuantizedTensor:
        """The integer form of the quantized path's weight (``W − B`` with a branch), as the runtime packs it.
        Its dequantization equals :meth:`quantized_weight` at ``λ = 1``."""
        spec = self.weight_spec
        if spec is None or not spec.is_quantized:
            raise ValueError(f"{self.name or 'QuantLinear'}: weight is not quantized ({self._config})")
        return quantize(self.residual_weight().detach().float(), spec)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        spec = self.act_spec
        if spec is None or not spec.is_quantized or self.noise_scale == 0.0:
            return x
        if torch.is_grad_enabled() and x.requires_grad:
            xq = fake_quantize(x, spec, nonfinite="propagate")        # with the straight-through gradient
        else:   # the same arithmetic in fewer passes (bit-identical; tests/test_nn_grouped.py)
            xq = fake_quantize_groups(x.reshape(1, -1, x.shape[-1]), [spec]).reshape(x.shape)
        return xq if self.noise_scale == 1.0 else x + self.noise_scale * (xq - x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"{self.name or 'QuantLinear'}: input has {x.shape[-1]} features, expected "
                             f"{self.in_features}")
        if self._groups is not None:
            return self._forward_groups(x)
        if self._config is None:
            return F.linear(x, self.weight, self.bias)
        y = F.linear(self.quantize_input(x), self.quantized_weight(), self.bias)
        if self.branch is not None:
            y = y + self.branch(x)
        return y

    def _forward_groups(self, x: torch.Tensor) -> torch.Tensor:
        """Group g = rows ``[g·B/G, (g+1)·B/G)`` of the leading dim, at ``self._groups[g]``."""
        groups = self._groups
        g = len(groups)
        if x.dim() < 2 or x.shape[0] % g:
            raise ValueError(f"{self.name or 'QuantLinear'}: grouped mode with G={g} needs a leading batch "
                             f"dimension divisible by {g}, got shape {tuple(x.shape)}")
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            raise RuntimeError(f"{self.name or 'QuantLinear'}: grouped mode is for evaluation; run it under "
                               "torch.no_grad()")
        xg = x.reshape(g, -1, self.in_features)                                  # (G, R, K)
        lam = self.noise_scale
        key = (lam, x.device)
        if key not in self._gp_cache:   # host-to-device copies once per config set, not per forward
            specs = [None if c is None or lam == 0.0 else c.act_spec() for c in groups]
            on = torch.tensor([c is not None for c in groups], device=x.device)[:, None, None]
            self._gp_cache[key] = (specs, group_params(specs, x.device), on)
        specs, params, on = self._gp_cache[key]
        xq = fake_quantize_groups(xg, specs, params)
        if lam not in (0.0, 1.0):
            xq = xg + lam * (xq - xg)
        weights = {}
        for c in groups:
            key = None if c is None else c.weight_spec()
            if key not in weights:
                weights[key] = self._group_weight(c)
        w = torch.stack([weights[None if c is None else c.weight_spec()] for c in groups])   # (G, N, K)
        y = torch.bmm(xq, w.transpose(1, 2))                                      # (G, R, N)
        if self.bias is not None:
            y = y + self.bias
        if self.branch is not None and any(c is not None for c in groups):
            y = y + self.branch(xg) * on.to(y.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        cfg = "fp" if self._config is None else self._config.label
        lam = "" if self.noise_scale == 1.0 else f", λ={self.noise_scale:g}"
        return f"{self.in_features} -> {self.out_features}, {cfg}{lam}"
