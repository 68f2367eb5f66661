"""QuantLinear: a fake-quantized ``nn.Linear`` driven by the format oracle.

    y = Q̃_a(x) · Q̃_w(W − B)ᵀ + bias + branch(x)        Q̃(v) = v + λ·(Q(v) − v)

``Q`` is :func:`treeq_engine.format.fake_quantize` (per-token activations, per-channel weights, straight-through
gradients). ``λ = noise_scale`` is Environmental Noise Guidance's knob: 1 is plain quantization, 0 leaves the
layer in full precision, values between scale the quantization error. ``branch`` is an optional
high-precision module (the General Monarch Branch, or low rank) with a ``dense()`` method giving the matrix B
that the quantized weight leaves out, and a ``forward(x)`` computing ``x·Bᵀ``; with it the quantized path
carries only the residual ``W − B``.

Frozen (calibrated) weights. After PTQ a layer holds its quantized weight explicitly: int8 codes, a per-channel
scale and zero point (chosen by calibration, not by the data rule), ``freeze_weight``. The quantized path then
no longer follows ``W`` or the branch: fine-tuning trains the branch (and optionally the scales, or a LoRA merged
into the codes QALoRA-style) against fixed low-bit weights, as QLoRA does, and the codes are what gets packed::

    frozen:  Q̃_w = s·(codes − zp)                      or, with ``lora``,  Q_{s,zp}(s·(codes − zp) + ΔW_lora)

ENG's λ is defined for unfrozen layers only (a frozen layer has no float weight to interpolate towards).

This is the simulation used for search, calibration and fine-tuning. The packed, kernel-backed module for
inference is a different class (runtime), built from the same plan.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..format import (QuantSpec, QuantizedTensor, fake_quantize, fake_quantize_with_qparams, quantize,
                      quantize_with_qparams, row_qparams)
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
        self.lora: nn.Module | None = None  # frozen layers only: a module with delta() -> (N, K)
        self.noise_scale = 1.0
        self.register_buffer("w_codes", None)  # int8 (N, K) when frozen
        self.register_buffer("w_zero_point", None)  # int32 (N,) when frozen
        self.w_scale: nn.Parameter | None = None  # float32 (N,) when frozen; trainable if PEFT asks
        self._frozen_spec: QuantSpec | None = None  # the weight spec the codes were made with
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
        fs = self._frozen_spec
        if self.is_frozen and config is not None and (config.w_bits, config.w_symmetric) != (fs.bits, fs.symmetric):
            raise ValueError(f"{self.name or 'QuantLinear'}: weight is frozen at {fs}; unfreeze_weight() before "
                             f"changing it to {config.label}")
        self._config = config
        self._w_cache = None

    def set_noise_scale(self, lam: float) -> None:
        lam = float(lam)
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"noise scale λ must be in [0, 1], got {lam}")
        if self.is_frozen and lam != 1.0:
            raise ValueError(f"{self.name or 'QuantLinear'}: λ={lam} needs a float weight; this layer's weight is "
                             "frozen (calibrated codes)")
        self.noise_scale = lam
        self._w_cache = None

    @property
    def weight_spec(self) -> QuantSpec | None:
        return None if self._config is None else self._config.weight_spec()

    @property
    def act_spec(self) -> QuantSpec | None:
        return None if self._config is None else self._config.act_spec()

    # -- frozen (calibrated) weight ----------------------------------------------------------------
    @property
    def is_frozen(self) -> bool:
        return self.w_codes is not None

    def freeze_weight(self, base: torch.Tensor | None = None, scale: torch.Tensor | None = None,
                      zero_point: torch.Tensor | None = None) -> None:
        """Fix the quantized path: quantize ``base (N, K)`` (default ``W − B``) with ``scale`` float32 ``(N,)`` and
        ``zero_point`` int32 ``(N,)`` (default: the format's rule on ``base``) and keep the codes."""
        spec = self.weight_spec
        if spec is None or not spec.is_quantized:
            raise ValueError(f"{self.name or 'QuantLinear'}: only a quantized weight can be frozen "
                             f"(config {None if self._config is None else self._config.label})")
        if self.noise_scale != 1.0:
            raise ValueError(f"{self.name or 'QuantLinear'}: freeze at λ=1 (now λ={self.noise_scale})")
        with torch.no_grad():
            base = (self.residual_weight() if base is None else base).detach().to(torch.float32)
            if base.shape != (self.out_features, self.in_features):
                raise ValueError(f"base must be ({self.out_features}, {self.in_features}), got {tuple(base.shape)}")
            if (scale is None) != (zero_point is None):
                raise ValueError("give both scale and zero_point, or neither")
            if scale is None:
                scale, zero_point = row_qparams(base, spec)
            qt = quantize_with_qparams(base, spec, scale.to(base.device, torch.float32).contiguous(),
                                       zero_point.to(base.device, torch.int32).contiguous())
        self.load_frozen(qt.codes, qt.scale, qt.zero_point)

    def load_frozen(self, codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        """Set the frozen state directly (from a checkpoint): int8 codes ``(N, K)``, scale float32 ``(N,)``,
        zero point int32 ``(N,)``, checked against this layer and its weight spec."""
        spec = self.weight_spec
        n, k = self.out_features, self.in_features
        if spec is None or not spec.is_quantized:
            raise ValueError(f"{self.name or 'QuantLinear'}: only a quantized weight can be frozen")
        for what, t, shape, dt in (("codes", codes, (n, k), torch.int8), ("scale", scale, (n,), torch.float32),
                                   ("zero_point", zero_point, (n,), torch.int32)):
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape or t.dtype != dt:
                got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{self.name or 'QuantLinear'}: frozen {what} must be {dt} {shape}, got {got}")
        if int(codes.min()) < spec.qmin or int(codes.max()) > spec.qmax:
            raise ValueError(f"{self.name or 'QuantLinear'}: codes outside [{spec.qmin}, {spec.qmax}] of {spec}")
        dev = self.weight.device
        self._frozen_spec = spec
        self.w_codes = codes.to(dev)
        self.w_zero_point = zero_point.to(dev)
        self.w_scale = nn.Parameter(scale.detach().to(dev).clone(), requires_grad=False)
        self._w_cache = None

    def unfreeze_weight(self) -> None:
        self.w_codes = None
        self.w_zero_point = None
        self.w_scale = None
        self._frozen_spec = None
        self.lora = None
        self._w_cache = None

    def _dequantized_codes(self, scale: torch.Tensor) -> torch.Tensor:
        return scale[:, None] * (self.w_codes.to(torch.float32) - self.w_zero_point[:, None].to(torch.float32))

    def _frozen_weight(self) -> torch.Tensor:
        if self.lora is None:
            return self._dequantized_codes(self.w_scale)
        base = self._dequantized_codes(self.w_scale.detach())
        return fake_quantize_with_qparams(base + self.lora.delta().to(torch.float32), self._frozen_spec,
                                          self.w_scale, self.w_zero_point)

    # -- math ------------------------------------------------------------------------------------
    def residual_weight(self) -> torch.Tensor:
        """The weight the quantized path carries: ``W − B`` with a branch, else ``W``."""
        if self.branch is None:
            return self.weight
        return self.weight - self.branch.dense().to(self.weight.dtype)

    def _cache_key(self) -> tuple:
        parts = [self._config, self.noise_scale, self.weight._version, self.weight.data_ptr(), self.weight.dtype]
        if self.is_frozen:
            deps = [self.w_codes, self.w_scale] + ([] if self.lora is None else list(self.lora.parameters()))
        else:
            deps = [] if self.branch is None else list(self.branch.parameters())
        return tuple(parts + [(p.data_ptr(), p._version) for p in deps])

    def quantized_weight(self) -> torch.Tensor:
        """``Q̃_w(W − B)`` (frozen: the calibrated codes' values) in the weight's dtype; cached while neither
        weights nor config change and no gradient is needed."""
        spec = self.weight_spec
        if self.is_frozen:
            trainable = [self.w_scale] + ([] if self.lora is None else list(self.lora.parameters()))
            needs_grad = torch.is_grad_enabled() and any(p.requires_grad for p in trainable)
        else:
            wr = self.residual_weight()
            if spec is None or not spec.is_quantized:
                return wr
            needs_grad = torch.is_grad_enabled() and wr.requires_grad
        if not needs_grad:
            key = self._cache_key()
            if self._w_cache is not None and self._w_cache[0] == key:
                return self._w_cache[1]
        if self.is_frozen:
            wq = self._frozen_weight().to(self.weight.dtype)
        else:
            wq = fake_quantize(wr, spec)
            if self.noise_scale != 1.0:
                wq = wr + self.noise_scale * (wq - wr)
        if not needs_grad:
            wq = wq.detach()
            self._w_cache = (key, wq)
        return wq

    def weight_qtensor(self) -> QuantizedTensor:
        """The integer form of the quantized path's weight, as the runtime packs it: the frozen codes (a LoRA
        merged into them) when calibrated, else ``W − B`` (``W`` without a branch) by the format's rule. Its
        dequantization equals :meth:`quantized_weight` at ``λ = 1``."""
        if self.is_frozen:
            spec = self._frozen_spec
            scale = self.w_scale.detach().float().contiguous()
            if self.lora is None:
                return QuantizedTensor(self.w_codes, scale, self.w_zero_point, spec)
            with torch.no_grad():
                merged = self._dequantized_codes(scale) + self.lora.delta().float()
            return quantize_with_qparams(merged, spec, scale, self.w_zero_point)
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
        frozen = ", frozen" if self.is_frozen else ""
        return f"{self.in_features} -> {self.out_features}, {cfg}{lam}{frozen}"
