"""QuantLinear: a fake-quantized ``nn.Linear`` driven by the format oracle.

    y = Q̃_a(x) · Q̃_w(W − B)ᵀ + bias + branch(x)        Q̃(v) = v + λ·(Q(v) − v)

``Q`` is :func:`treeq_engine.format.fake_quantize` (per-token activations, per-channel weights, straight-through
gradients). ``λ = noise_scale`` is Environmental Noise Guidance's knob: 1 is plain quantization, 0 leaves the
layer in full precision, values between scale the quantization error. ``branch`` is an optional
high-precision module (the General Monarch Branch, or low rank) with a ``dense()`` method giving the matrix B
that the quantized weight leaves out, and a ``forward(x)`` computing ``x·Bᵀ``; with it the quantized path
carries only the residual ``W − B``.

This is the simulation used for search, calibration and fine-tuning. The packed, kernel-backed module for
inference is a different class (runtime), built from the same plan.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..format import QuantSpec, QuantizedTensor, fake_quantize, quantize
from ..plan import LayerConfig


class QuantLinear(nn.Module):
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
        wq = fake_quantize(wr, spec)
        if self.noise_scale != 1.0:
            wq = wr + self.noise_scale * (wq - wr)
        if not needs_grad:
            wq = wq.detach()
            self._w_cache = (key, wq)
        return wq

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
        xq = fake_quantize(x, spec, nonfinite="propagate")
        return xq if self.noise_scale == 1.0 else x + self.noise_scale * (xq - x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"{self.name or 'QuantLinear'}: input has {x.shape[-1]} features, expected "
                             f"{self.in_features}")
        if self._config is None:
            return F.linear(x, self.weight, self.bias)
        y = F.linear(self.quantize_input(x), self.quantized_weight(), self.bias)
        if self.branch is not None:
            y = y + self.branch(x)
        return y

    def extra_repr(self) -> str:
        cfg = "fp" if self._config is None else self._config.label
        lam = "" if self.noise_scale == 1.0 else f", λ={self.noise_scale:g}"
        return f"{self.in_features} -> {self.out_features}, {cfg}{lam}"
