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

Candidate batching (the search): ``set_group_configs([c_0, …, c_{G−1}])`` splits the leading batch dimension
of every input into G equal groups and runs group ``g`` at ``c_g`` (same λ, same branch), as G separate
forwards would, in one batched matmul. ``set_group_configs(None)`` returns to the single config. Grouped mode
is for evaluation only (no gradients).

This is the simulation used for search, calibration and fine-tuning. The packed, kernel-backed module for
inference is a different class (runtime), built from the same plan.
"""
from __future__ import annotations

import functools
from typing import Any, Mapping, Sequence, cast

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..format import (QuantSpec, QuantizedTensor, fake_quantize, fake_quantize_with_qparams, quantize,
                      quantize_with_qparams, row_qparams)
from ..plan import LayerConfig
from ..kernels.derived import stamp
from .grouped import fake_quantize_groups


def check_frozen(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec,
                 shape: tuple[int, int]) -> None:
    """A ValueError naming the field unless ``codes`` int8 ``shape``, ``scale`` float32 and ``zero_point`` int32
    ``(shape[0],)`` are a valid frozen weight of ``spec``: codes and zero points on its integer grid, scales finite
    and positive (a NaN or negative scale would load and silently compute NaN or a sign-flipped weight)."""
    n = shape[0]
    for what, t, want, dt in (("codes", codes, shape, torch.int8), ("scale", scale, (n,), torch.float32),
                              ("zero_point", zero_point, (n,), torch.int32)):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(want) or t.dtype != dt:
            got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"frozen {what} must be {dt} {tuple(want)}, got {got}")
    if codes.numel() and (int(codes.min()) < spec.qmin or int(codes.max()) > spec.qmax):
        raise ValueError(f"codes outside [{spec.qmin}, {spec.qmax}] of {spec}")
    bad = ~(torch.isfinite(scale) & (scale > 0))
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ValueError(f"frozen scale must be finite and positive in every row; {int(bad.sum())} of {n} are not "
                         f"(row {i}: {float(scale[i])})")
    bad = (zero_point < spec.qmin) | (zero_point > spec.qmax)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ValueError(f"frozen zero_point must lie in [{spec.qmin}, {spec.qmax}] of {spec}; {int(bad.sum())} of "
                         f"{n} do not (row {i}: {int(zero_point[i])})")


def _dequantize(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (scale[:, None] * (codes.to(torch.float32) - zero_point[:, None].to(torch.float32))).to(dtype)


def _frozen_weight_math(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                        lora_a: torch.Tensor | None = None, lora_b: torch.Tensor | None = None, *,
                        spec: QuantSpec, scaling: float, dtype: torch.dtype) -> torch.Tensor:
    """A frozen layer's weight in ``dtype``: ``s·(codes − zp)``, or with a LoRA ``Q_{s,zp}(s·(codes − zp) + ΔW)``,
    ``ΔW = B·A·scaling`` (differentiable in A, B by the straight-through estimator and in ``s`` through both of its
    uses: the base ``s·(codes − zp)`` and the requantization's LSQ term, together ``(q − zp) − ΔW/s`` inside the
    range. With the base's share detached the gradient was the LSQ term alone: 0 for a fresh LoRA and of the wrong
    sign on many channels after, so training scales beside a LoRA made the model worse.)"""
    if lora_a is None or lora_b is None:
        return _dequantize(codes, scale, zero_point, dtype)
    base = _dequantize(codes, scale, zero_point, torch.float32)
    delta = ((lora_b @ lora_a) * scaling).to(torch.float32)
    return fake_quantize_with_qparams(base + delta, spec, scale, zero_point).to(dtype)


class _FrozenLinear(torch.autograd.Function):
    """``x·Wᵀ + b`` for a frozen layer, ``W = make_weight(*params)`` (:func:`_frozen_weight_math`) computed in the
    forward and again in the backward. Autograd keeps the int8 codes and the small trainable tensors (scales, LoRA
    factors) instead of what the weight's own graph would hold until the step's backward: the dequantized weight
    (2 or 4 bytes per weight against the codes' 1) and, with a LoRA or a trainable scale, several more
    weight-sized float intermediates per layer. The weight's gradient ``gradᵀ·x`` is formed in the backward, one
    layer at a time, and pushed through the recomputed graph, so the parameters get the plain graph's gradients.
    Its forward is :meth:`QuantLinear.quantized_weight`'s arithmetic, so outputs are bit-identical."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, bias: torch.Tensor | None, make_weight: Any,
                *params: torch.Tensor | None) -> torch.Tensor:
        with torch.no_grad():
            w = make_weight(*params)
        ctx.make_weight = make_weight
        ctx.has_bias = bias is not None
        # the backward rebuilds the weight as this forward did (a LoRA's B·A ran in autocast's dtype here)
        dev = x.device.type
        ctx.autocast = (dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
        trains = any(ctx.needs_input_grad[3:])
        ctx.save_for_backward(x if trains else None, *params)   # (x only for the weight's gradient)
        return F.linear(x, w, bias)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, *params = ctx.saved_tensors
        needs = ctx.needs_input_grad[3:]
        higher = torch.is_grad_enabled()   # create_graph: the gradients must be differentiable in turn
        dev, autocast_on, autocast_dtype = ctx.autocast
        with torch.enable_grad(), torch.autocast(dev, dtype=autocast_dtype, enabled=autocast_on):
            leaves = [p if higher or not n else p.detach().requires_grad_(True) for p, n in zip(params, needs)]
            w = ctx.make_weight(*leaves)
        # (in the gradient's dtype: under autocast the forward's matmul ran in it; autograd casts to the input's)
        gx = grad @ (w if higher else w.detach()).to(grad.dtype) if ctx.needs_input_grad[0] else None
        g2 = grad.reshape(-1, grad.shape[-1])
        gb = g2.sum(0) if ctx.has_bias and ctx.needs_input_grad[1] else None
        grads: list[torch.Tensor | None] = [None] * len(params)
        if any(needs):
            gw = g2.T @ x.reshape(-1, x.shape[-1]).to(g2.dtype)
            wanted = [i for i, n in enumerate(needs) if n]
            for i, g in zip(wanted, torch.autograd.grad(w, [leaves[i] for i in wanted], gw.to(w.dtype),
                                                        create_graph=higher)):
                grads[i] = g
        return (gx, gb, None, *grads)


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
        self.lora: nn.Module | None = None  # frozen layers only: a module with delta() -> (N, K)
        self.noise_scale = 1.0
        # the float layer this was (W, bias; no quantization, no branch, no LoRA): a distillation teacher computed
        # by the model itself (nn.convert.full_precision), as it still holds W
        self.full_precision = False
        self.register_buffer("w_codes", None)  # int8 (N, K) when frozen
        self.register_buffer("w_zero_point", None)  # int32 (N,) when frozen
        self.w_scale: nn.Parameter | None = None  # float32 (N,) when frozen; trainable if PEFT asks
        self._frozen_spec: QuantSpec | None = None  # the weight spec the codes were made with
        self._config: LayerConfig | None = None
        self._w_cache: tuple[Any, torch.Tensor] | None = None
        self._groups: tuple[LayerConfig | None, ...] | None = None
        self._wg_cache: dict[Any, torch.Tensor] = {}
        self._gp_cache: dict[Any, Any] = {}   # per (λ, device, no branch): activation specs, branch mask
        # the dim of the input that holds the samples, where grouped mode splits its candidates: 0, or 1 for a
        # sequence-first model (ERNIE-Image's (S, B, K)); the search sets it from its runner (``sample_dim``)
        self.sample_dim = 0
        self.set_config(config)

    # -- configuration ---------------------------------------------------------------------------
    @property
    def config(self) -> LayerConfig | None:
        return self._config

    def set_config(self, config: LayerConfig | None) -> None:
        if config is not None and not isinstance(config, LayerConfig):
            raise TypeError(f"config must be a LayerConfig or None, got {type(config).__name__}")
        fs = cast(QuantSpec, self._frozen_spec)   # read only when is_frozen, and load_frozen sets both together
        if self.is_frozen and config is not None and (config.w_bits, config.w_symmetric) != (fs.bits, fs.symmetric):
            raise ValueError(f"{self.name or 'QuantLinear'}: weight is frozen at {fs}; unfreeze_weight() before "
                             f"changing it to {config.label}")
        if config != self._config:   # the weight cache is keyed by config and λ anyway: keep it when unchanged
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
        if self.is_frozen:
            raise ValueError(f"{self.name or 'QuantLinear'}: grouped (search) mode needs a float weight; this "
                             "layer's weight is frozen (calibrated codes)")
        for c in configs:
            if c is not None and not isinstance(c, LayerConfig):
                raise TypeError(f"group configs must be LayerConfig or None, got {type(c).__name__}")
        self._groups = configs

    def set_noise_scale(self, lam: float) -> None:
        lam = float(lam)
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"noise scale λ must be in [0, 1], got {lam}")
        if self.is_frozen and lam != 1.0:
            raise ValueError(f"{self.name or 'QuantLinear'}: λ={lam} needs a float weight; this layer's weight is "
                             "frozen (calibrated codes)")
        if lam != self.noise_scale:
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
            assert zero_point is not None   # (both or neither: checked above)
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
        try:
            check_frozen(codes, scale, zero_point, spec, (n, k))
        except ValueError as e:
            raise ValueError(f"{self.name or 'QuantLinear'}: {e}") from None
        dev = self.weight.device
        self._frozen_spec = spec
        self.w_codes = codes.to(dev)
        self.w_zero_point = zero_point.to(dev)
        self.w_scale = nn.Parameter(scale.detach().to(dev).clone(), requires_grad=False)
        self._w_cache = None

    def _load_from_state_dict(self, state_dict: Mapping[str, Any], prefix: str, *args: Any) -> None:
        """``load_state_dict`` into a frozen layer checks the codes, scales and zero points as
        :meth:`load_frozen` does (a NaN scale or a code off the grid would load and compute garbage); a bad one
        is reported with the other loading errors and nothing of this layer is loaded."""
        error_msgs = args[-1]
        keys = [prefix + k for k in ("w_codes", "w_scale", "w_zero_point")]
        if self.is_frozen and all(k in state_dict for k in keys):
            codes, scale, zp = (state_dict[k] for k in keys)
            try:
                check_frozen(codes, scale.detach() if isinstance(scale, torch.Tensor) else scale, zp,
                             cast(QuantSpec, self._frozen_spec), (self.out_features, self.in_features))
            except ValueError as e:
                error_msgs.append(f"{prefix or self.name or 'QuantLinear'}: {e}")
                return
        super()._load_from_state_dict(state_dict, prefix, *args)

    def unfreeze_weight(self) -> None:
        self.w_codes = None
        self.w_zero_point = None
        self.w_scale = None
        self._frozen_spec = None
        self.lora = None
        self._w_cache = None

    def _dequantized_codes(self, scale: torch.Tensor) -> torch.Tensor:
        return _dequantize(self.w_codes, scale, self.w_zero_point, torch.float32)

    def _frozen_weight_parts(self) -> tuple[Any, tuple[torch.Tensor | None, ...]]:
        """``(make_weight, params)``: ``make_weight(*params)`` is this frozen layer's weight in its dtype (its
        LoRA, a :class:`~treeq_engine.calib.lora.LoRA`, given by its factors ``a`` and ``b``)."""
        assert self.w_scale is not None and self._frozen_spec is not None   # (frozen: load_frozen set both)
        lora = self.lora
        make = functools.partial(_frozen_weight_math, spec=self._frozen_spec, dtype=self.weight.dtype,
                                 scaling=1.0 if lora is None else float(lora.scaling))
        ab = () if lora is None else (lora.a, lora.b)
        return make, (self.w_codes, self.w_scale, self.w_zero_point, *ab)

    def _frozen_weight(self) -> torch.Tensor:
        make, params = self._frozen_weight_parts()
        return make(*params)

    # -- math ------------------------------------------------------------------------------------
    def residual_weight(self) -> torch.Tensor:
        """The weight the quantized path carries: ``W − B`` with a branch, else ``W``."""
        if self.branch is None:
            return self.weight
        return self.weight - self.branch.dense().to(self.weight.dtype)

    def _cache_key(self) -> tuple:
        """What an unfrozen layer's fake-quantized weight depends on (a frozen layer's is never cached). A weight
        built under ``torch.inference_mode`` is an inference tensor, which autograd cannot save for a later
        backward: it is not reused outside that mode."""
        deps = [] if self.branch is None else list(self.branch.parameters())
        return tuple([self._config, self.noise_scale, torch.is_inference_mode_enabled(), stamp(self.weight)]
                     + [stamp(p) for p in deps])

    def clear_cache(self) -> None:
        """Drop the cached fake-quantized weights. They are rebuilt when a weight's version counter moves, which
        every in-place write does except a ``fused=True`` optimizer's step and writes through another tensor
        later swapped in by ``weight.data = ...``: after those, call this (``nn.convert.clear_caches(model)`` for a
        whole model). Also frees the memory grouped (search) mode keeps."""
        self._w_cache = None
        self._wg_cache = {}
        self._gp_cache = {}

    def quantized_weight(self) -> torch.Tensor:
        """``Q̃_w(W − B)`` (frozen: the calibrated codes' values) in the weight's dtype. An unfrozen layer's is
        cached while neither weights nor config change and no gradient is needed (the search scores one weight
        many times). A frozen layer's is not: dequantizing its int8 codes costs one elementwise pass, and a
        cached copy would hold another weight-sized tensor per layer through PTQ and PEFT (in training, the
        forward's ``_FrozenLinear`` keeps only the codes for the backward, for the same reason)."""
        if self.is_frozen:
            return self._frozen_weight()
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
        """The integer form of the quantized path's weight, as the runtime packs it: the frozen codes (a LoRA
        merged into them) when calibrated, else ``W − B`` (``W`` without a branch) by the format's rule. Its
        dequantization equals :meth:`quantized_weight` at ``λ = 1``."""
        if self.is_frozen:
            spec = self._frozen_spec
            assert spec is not None and self.w_scale is not None   # (frozen: load_frozen set both)
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
        if torch.is_grad_enabled() and x.requires_grad:
            xq = fake_quantize(x, spec, nonfinite="propagate")        # with the straight-through gradient
        else:   # the same arithmetic in fewer passes (bit-identical; tests/test_nn_grouped.py)
            xq = fake_quantize_groups(x.reshape(1, -1, x.shape[-1]), [spec]).reshape(x.shape)
        return xq if self.noise_scale == 1.0 else x + self.noise_scale * (xq - x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"{self.name or 'QuantLinear'}: input has {x.shape[-1]} features, expected "
                             f"{self.in_features}")
        if self.full_precision:   # (also in grouped mode: the teacher is the float layer whatever the groups)
            return F.linear(x, self.weight, self.bias)
        if self._groups is not None:
            return self._forward_groups(x)
        if self._config is None:
            return F.linear(x, self.weight, self.bias)
        xq = self.quantize_input(x)
        if self.is_frozen:   # (PEFT: the backward keeps the codes, not a dequantized copy and its graph)
            make, params = self._frozen_weight_parts()
            y = _FrozenLinear.apply(xq, self.bias, make, *params)
        else:
            y = F.linear(xq, self.quantized_weight(), self.bias)
        if self.branch is not None:
            y = y + self.branch(x)
        return y

    def _forward_groups(self, x: torch.Tensor) -> torch.Tensor:
        """Group g = rows ``[g·B/G, (g+1)·B/G)`` of the samples' dim (``sample_dim``), at ``self._groups[g]``."""
        if self.sample_dim and x.dim() > self.sample_dim + 1:
            return self._grouped(x.movedim(self.sample_dim, 0)).movedim(0, self.sample_dim)
        return self._grouped(x)

    def _grouped(self, x: torch.Tensor) -> torch.Tensor:
        groups = self._groups
        assert groups is not None   # (forward calls this only in grouped mode)
        g = len(groups)
        if x.dim() < 2 or x.shape[0] % g:
            raise ValueError(f"{self.name or 'QuantLinear'}: grouped mode with G={g} needs a leading batch "
                             f"dimension divisible by {g}, got shape {tuple(x.shape)}")
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            raise RuntimeError(f"{self.name or 'QuantLinear'}: grouped mode is for evaluation; run it under "
                               "torch.no_grad()")
        xg = x.reshape(g, -1, self.in_features)                                  # (G, R, K)
        lam = self.noise_scale
        key = (lam, x.device, self.branch is None)
        if key not in self._gp_cache:   # host-to-device copies once per config set, not per forward
            specs = [None if c is None or lam == 0.0 else c.act_spec() for c in groups]
            # (a host-to-device copy waits for the stream: built only where the branch needs it)
            on = None if self.branch is None else \
                torch.tensor([c is not None for c in groups], device=x.device)[:, None, None]
            self._gp_cache[key] = (specs, on)
        specs, on = self._gp_cache[key]
        xq = fake_quantize_groups(xg, specs)   # its per-group parameters are cached per (specs, device)
        if lam not in (0.0, 1.0):
            xq = xg + lam * (xq - xg)
        weights = {}
        for c in groups:
            wkey = None if c is None else c.weight_spec()   # (not `key`: that one is the (λ, device) above)
            if wkey not in weights:
                weights[wkey] = self._group_weight(c)
        w = torch.stack([weights[None if c is None else c.weight_spec()] for c in groups])   # (G, N, K)
        y = torch.bmm(xq, w.transpose(1, 2))                                      # (G, R, N)
        if self.bias is not None:   # in y's dtype, as F.linear adds it (under autocast y is the autocast dtype)
            y = y + self.bias.to(y.dtype)
        if self.branch is not None and any(c is not None for c in groups):
            y = y + self.branch(xg) * on.to(y.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        cfg = "fp" if self._config is None else self._config.label
        lam = "" if self.noise_scale == 1.0 else f", λ={self.noise_scale:g}"
        frozen = ", frozen" if self.is_frozen else ""
        return f"{self.in_features} -> {self.out_features}, {cfg}{lam}{frozen}"
