"""TreeQLinear: the inference module holding packed low-bit weights, scales and branch factors.

    y = packed_linear(quantize_activation(x, a_spec, monarch_w1=w1), W_packed, bias, monarch_w2=w2)

It runs the fastest backend the kernel dispatcher finds for its inputs (CUDA, then Triton, then the reference),
so the same module serves a GPU and the CPU with the same numbers (within the kernels' stated tolerance).
A layer whose activations stay in 16 bits (weight-only quantization) multiplies by the dequantized weight.

Layouts. The state dict (the artifact) always holds the codes in layout v1. On the device a layer holds them in
one layout (``set_layout``): ``"v1"``, which every backend reads (the CUDA kernels derive their fragment layout from
it and cache that beside it), or ``"frag"``, only the CUDA kernels' fragment layout — one copy, so the resident
weight halves on the CUDA path. A ``"frag"`` layer converts to layout v1 when its state dict is taken and from it
when one is loaded (on the CPU, exact); off the CUDA kernels it runs on the reference backend.
"""
from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..format import MAX_K, QuantSpec, QuantizedTensor
from ..format.packing import LAYOUT_VERSION, pack, packed_dtype, packed_shape
from ..kernels import PackedWeight, QuantizedActivation, cuda_layout, packed_linear, quantize_activation
from ..kernels.derived import derived
from ..plan import LayerConfig
from ..nn.pointwise import PointwiseConvAttributes


def branch_dtype(dtype: torch.dtype) -> torch.dtype:
    """Storage of the Monarch factors for a model running in ``dtype``: bf16 for a 16-bit model (the fused kernels
    multiply them in bf16, and the bit budget counts 16 bits per factor entry), float32 for a float32 one (the
    reference path, exact to the calibrated simulation; also for float64, which never narrows them)."""
    return torch.bfloat16 if dtype in (torch.bfloat16, torch.float16) else torch.float32


def check_max_k(k: int, config: LayerConfig, name: str) -> None:
    """A ValueError where a layer of ``K = k`` would run the integer kernels (quantized activations) past MAX_K."""
    if config.act_spec().is_quantized and k > MAX_K:
        raise ValueError(f"{name}: K={k} exceeds MAX_K={MAX_K}, where the kernels' int32 accumulation could "
                         "overflow; give it a weight-only config (A16) or keep it bf16")


LAYOUTS = ("v1", "frag")


def runs_packed_kernels(mod: nn.Module) -> bool:
    """``mod`` is a packed layer with quantized activations: the fused blocks hand it codes, not float rows."""
    return isinstance(mod, TreeQLinear) and mod.act_spec.is_quantized


class TreeQLinear(nn.Module):
    """Packed replacement for an ``nn.Linear``; every stored tensor is a buffer so ``state_dict`` is the artifact.

    Code written for ``nn.Linear`` reads two more things, which the layer answers: ``weight`` (the dequantized
    weight, computed on each access: Z-Image reads ``mlp[0].weight.dtype``) and its parameters' dtype (Wan, Cosmos,
    ChronoEdit take ``next(iter(self.time_embedder.parameters())).dtype``, which a module of buffers alone cannot
    answer): the layer holds one empty parameter, ``dtype_anchor``, in the dtype of the model around it (the dtype
    of the layer it replaced, ``compute_dtype``; ``out_dtype``), which ``.to(dtype)`` moves. It is not part of the
    state dict. ``dtype`` is the precision the layer is built for: its Monarch factors are stored in bf16 unless it
    is float32 (``branch_dtype``)."""

    # buffers that may be None (for mypy: register_buffer is invisible to it)
    w_packed: torch.Tensor | None   # None while the codes are held in layout "frag" (w_frag)
    monarch_w1: torch.Tensor | None   # both or neither: a Monarch branch
    monarch_w2: torch.Tensor | None

    def __init__(self, in_features: int, out_features: int, config: LayerConfig, *, bias: bool,
                 monarch: tuple[int, int] | None = None, name: str = "", dtype: torch.dtype = torch.bfloat16,
                 device: torch.device | str | None = None, compute_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        wspec = config.weight_spec()
        if not wspec.is_quantized:
            raise ValueError(f"{name or 'TreeQLinear'}: a W16 layer stays nn.Linear; got {config}")
        check_max_k(in_features, config, name or "TreeQLinear")
        self.in_features, self.out_features = in_features, out_features
        self.config, self.name = config, name
        self.dtype_anchor = nn.Parameter(torch.empty(0, dtype=compute_dtype or dtype, device=device),
                                         requires_grad=False)
        self._act_spec = config.act_spec()   # built and validated once, not on every forward
        n, k = out_features, in_features
        self.register_buffer("w_packed", torch.zeros(packed_shape(n, k, wspec.bits), dtype=packed_dtype(wspec.bits),
                                                     device=device))
        self.register_buffer("w_scale", torch.ones(n, dtype=torch.float32, device=device))
        self.register_buffer("w_zero_point", torch.zeros(n, dtype=torch.int32, device=device))
        self.register_buffer("w_col_sum", torch.zeros(n, dtype=torch.int32, device=device))
        self.register_buffer("bias", torch.zeros(n, dtype=torch.float32, device=device) if bias else None)
        if monarch is not None:
            from ..branches import MonarchShape

            shp = MonarchShape(n=n, k=k, blocks=monarch[0], rank=monarch[1])
            bd = branch_dtype(dtype)
            self.register_buffer("monarch_w1", torch.zeros(shp.w1_shape, dtype=bd, device=device))
            self.register_buffer("monarch_w2", torch.zeros(shp.w2_shape, dtype=bd, device=device))
        else:
            self.monarch_w1 = self.monarch_w2 = None

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def from_weights(cls, weight_q: QuantizedTensor, config: LayerConfig, bias: torch.Tensor | None = None,
                     monarch: tuple[torch.Tensor, torch.Tensor] | None = None, *, name: str = "",
                     dtype: torch.dtype = torch.bfloat16, **kw: Any) -> "TreeQLinear":
        """The layer holding ``weight_q`` packed; ``kw`` goes to the constructor (a subclass's own arguments)."""
        pw = PackedWeight.from_quantized(weight_q)
        mshape = None if monarch is None else (monarch[0].shape[0], monarch[0].shape[1] // monarch[0].shape[0])
        mod = cls(pw.k, pw.n, config, bias=bias is not None, monarch=mshape, name=name, dtype=dtype,
                  device=weight_q.codes.device, **kw)
        assert mod.w_packed is not None   # (a new layer holds layout v1)
        mod.w_packed.copy_(pw.packed)
        mod.w_scale.copy_(pw.scale)
        mod.w_zero_point.copy_(pw.zero_point)
        mod.w_col_sum.copy_(pw.col_sum)
        if bias is not None:
            mod.bias.copy_(bias.detach().float())
        if monarch is not None:
            assert mod.monarch_w1 is not None and mod.monarch_w2 is not None   # (built with monarch=mshape)
            mod.monarch_w1.copy_(monarch[0].detach())
            mod.monarch_w2.copy_(monarch[1].detach())
        return mod

    # -- math ------------------------------------------------------------------------------------
    def packed_weight(self) -> PackedWeight:
        """The layer's weight operand, built (and checked) once and reused while its buffers are unchanged: this
        runs on every forward. (Under ``torch.compile`` it is built in the graph: ``derived``.)"""
        anchor = self.w_packed if self.w_packed is not None else self.w_frag
        return derived(anchor, "packed_weight", (anchor, self.w_scale, self.w_zero_point, self.w_col_sum),
                       self._build_packed_weight)

    def _build_packed_weight(self) -> PackedWeight:
        bits, n, k = self.config.w_bits, self.out_features, self.in_features
        frag = None
        if self.w_packed is None:
            rows = self.__dict__.get("_row_chan")   # (the layout's shared channel map, taken eagerly: _tile_rows)
            if rows is None or rows.device != self.w_frag.device:
                rows = self._tile_rows()
            frag = cuda_layout.frag_weight(self.w_frag, rows, self.w_scale, self.w_zero_point, self.w_col_sum, bits,
                                           n, k, shared=True)
        return PackedWeight(self.w_packed, bits, n, k, self.w_scale, self.w_zero_point, self.w_col_sum,
                            self.config.w_symmetric, LAYOUT_VERSION, frag)

    def _tile_rows(self) -> torch.Tensor:
        """The fragment layout's channel map on the layer's device (``tile_rows_on``: one tensor per (N, device)),
        kept on the layer (not a buffer: shared, and no part of the state), so that a forward under
        ``torch.compile``, which cannot call the core that builds it, finds it."""
        rows = cuda_layout.tile_rows_on(self.out_features, self.w_frag.device)
        self.__dict__["_row_chan"] = rows
        return rows

    # -- layouts ---------------------------------------------------------------------------------
    @property
    def layout(self) -> str:
        """Where the codes live on the device: ``"v1"`` or ``"frag"`` (see the module docstring)."""
        return "v1" if self.w_packed is not None else "frag"

    def set_layout(self, layout: str) -> None:
        """Hold the codes in ``layout`` (``"v1"`` or ``"frag"``) on the layer's device, converting on the CPU
        (exact). Only a layer with quantized activations runs the CUDA kernels, so only such a layer takes
        ``"frag"`` (off those kernels, e.g. on the CPU, a ``"frag"`` layer runs the reference backend, which
        caches its int8 codes: use it there for tests only). A CUDA graph captured before the change reads the
        old tensors: capture again after it."""
        if layout not in LAYOUTS:
            raise ValueError(f"{self.name or 'TreeQLinear'}: layout must be one of {LAYOUTS}, got {layout!r}")
        if layout == self.layout:
            return
        bits, n, k = self.config.w_bits, self.out_features, self.in_features
        if layout == "frag":
            assert self.w_packed is not None   # (the layout was v1: returned above otherwise)
            if not self.act_spec.is_quantized:
                raise ValueError(f"{self.name or 'TreeQLinear'}: a weight-only layer ({self.config.label}) "
                                 "multiplies a dequantized weight, not the CUDA kernels: it keeps layout v1")
            if self.w_packed.is_meta:   # a skeleton (to load into with assign=True): no codes to convert
                words = torch.empty(cuda_layout.total_words(n, k, bits), dtype=torch.int32, device="meta")
            else:
                words, _ = cuda_layout.repack(self.w_packed.cpu(), bits, n, k)
                words = words.to(self.w_packed.device)   # (one layer's codes twice, briefly; an OOM loses nothing)
            self.w_packed = None
            self.register_buffer("w_frag", words, persistent=False)
            if not words.is_meta:
                self._tile_rows()
        else:
            if self.w_frag.is_meta:
                packed = torch.empty(packed_shape(n, k, bits), dtype=packed_dtype(bits), device="meta")
            else:
                packed = self._v1_from_frag().to(self.w_frag.device)
            del self.w_frag
            self.w_packed = packed

    def _v1_from_frag(self) -> torch.Tensor:
        """The codes in layout v1, on the CPU."""
        bits, n, k = self.config.w_bits, self.out_features, self.in_features
        codes = cuda_layout.unrepack(self.w_frag.cpu(), cuda_layout.tile_rows(n), bits, n, k)
        return pack(codes, bits)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if self.w_packed is None:   # the artifact format is layout v1 whatever the device holds; on the CPU, so
            key = prefix + "w_packed"   # that taking a whole model's state never puts a second copy on the GPU
            if self.w_frag.is_meta:
                bits = self.config.w_bits
                destination[key] = torch.empty(packed_shape(self.out_features, self.in_features, bits),
                                               dtype=packed_dtype(bits), device="meta")
            else:
                destination[key] = self._v1_from_frag()
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination.pop(prefix + "dtype_anchor", None)   # (no data: what the model computes in is not the artifact's)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        anchor = prefix + "dtype_anchor"
        had_anchor = anchor in missing_keys
        try:
            self._load_codes(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        finally:
            if anchor in missing_keys and not had_anchor:
                missing_keys.remove(anchor)   # the state dict never holds it
        if self.dtype_anchor.device != self.w_scale.device:   # load_state_dict(assign=True) moved the tensors
            self.dtype_anchor = nn.Parameter(torch.empty(0, dtype=self.out_dtype, device=self.w_scale.device),
                                             requires_grad=False)

    def _load_codes(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        if self.w_packed is not None:
            return super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                                 unexpected_keys, error_msgs)
        key = prefix + "w_packed"
        packed = state_dict.pop(key, None)   # no such buffer now: the base class would call it unexpected
        try:
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                          error_msgs)
        finally:
            if packed is not None:
                state_dict[key] = packed
        if packed is None:
            missing_keys.append(key)
            return
        bits, n, k = self.config.w_bits, self.out_features, self.in_features
        want = packed_shape(n, k, bits)
        if not isinstance(packed, torch.Tensor) or tuple(packed.shape) != want or packed.dtype != packed_dtype(bits):
            got = f"{packed.dtype} {tuple(packed.shape)}" if isinstance(packed, torch.Tensor) else type(packed).__name__
            error_msgs.append(f"size mismatch for {key}: a {bits}-bit layout-v1 weight for (N={n}, K={k}) is "
                              f"{packed_dtype(bits)} {want}, got {got}")
            return
        if packed.is_meta:
            error_msgs.append(f"{key}: a meta tensor holds no codes to convert to the fragment layout")
            return
        words, _ = cuda_layout.repack(packed.detach().cpu(), bits, n, k)
        if local_metadata.get("assign_to_params_buffers", False):   # load_state_dict(assign=True): take its device
            self.w_frag = words.to(packed.device)
        else:
            with torch.no_grad():
                self.w_frag.copy_(words)   # in place: the tensor keeps its address
        self._tile_rows()   # (the channel map on the codes' device, for a forward under torch.compile)

    @property
    def act_spec(self) -> QuantSpec:
        return self._act_spec

    @property
    def out_dtype(self) -> torch.dtype:
        """The model's dtype around the layer (the replaced layer's; ``.to(dtype)`` changes it): what ``weight``
        and ``linear`` return by default. The forward returns its input's dtype."""
        return self.dtype_anchor.dtype

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight ``(out_features, in_features)`` in ``out_dtype``, for code that reads a linear's
        weight (its dtype, device, shape: Z-Image reads ``mlp[0].weight.dtype`` every step); a new tensor each
        time. From layout v1 it is unpacked on the layer's device; from the fragment layout the codes are read back
        through the CPU, which a CUDA graph cannot capture, so that one is built once and kept beside the codes
        (while they and the dtype are unchanged) and copied on each access. The forward never uses it."""
        if self.w_packed is not None:
            return self._dequantized().to(self.out_dtype)
        anchor = self.w_frag
        return derived(anchor, "dequantized_weight", (anchor, self.w_scale, self.w_zero_point, self.dtype_anchor),
                       lambda: self._dequantized().to(self.out_dtype)).clone()

    def _dequantized(self) -> torch.Tensor:
        return (self.packed_weight().codes().float() - self.w_zero_point[:, None].float()) * self.w_scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
            raise TypeError(f"{self.name or 'TreeQLinear'}: input must be a float tensor, got {got}")
        if x.shape[-1] != self.in_features:
            raise ValueError(f"{self.name or 'TreeQLinear'}: input has {x.shape[-1]} features, expected "
                             f"{self.in_features}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).contiguous()
        if not self.act_spec.is_quantized:  # weight-only: dequantize and multiply in the input's precision
            w = self._dequantized().to(x.dtype)
            y = F.linear(x2, w, None if self.bias is None else self.bias.to(x.dtype))
            if self.monarch_w1 is not None:
                from ..branches import monarch

                assert self.monarch_w2 is not None   # (both or neither)
                y = y + monarch.forward(x2.float(), self.monarch_w1.float(), self.monarch_w2.float(),
                                       self.out_features).to(x.dtype)
            return y.reshape(*lead, self.out_features)
        y = cast(torch.Tensor, self.linear(self.quantize_input(x2), out_dtype=x.dtype))   # (no out_spec: rows)
        return y.reshape(*lead, self.out_features)

    # -- the two fused halves, for callers that fuse more (LayerNorm + modulate before, GELU after) --
    def quantize_input(self, x2: torch.Tensor, *, ln_eps: float | None = None, shift: torch.Tensor | None = None,
                       scale: torch.Tensor | None = None, rms_norm: bool = False) -> QuantizedActivation:
        """Kernel 1: ``x2 (M, K)`` -> this layer's quantized activation (and Monarch stage 1), after the optional
        norm (LayerNorm, or RMSNorm with ``rms_norm``, epsilon ``ln_eps``) and modulate."""
        return quantize_activation(x2, self.act_spec, ln_eps=ln_eps, shift=shift, scale=scale,
                                   monarch_w1=self.monarch_w1, rms_norm=rms_norm)

    def linear(self, act: QuantizedActivation, *, gelu: bool = False, out_spec: QuantSpec | None = None,
               out_dtype: torch.dtype | None = None, residual: torch.Tensor | None = None,
               gate: torch.Tensor | None = None) -> torch.Tensor | QuantizedActivation:
        """Kernel 2: the packed GEMM with its epilogue (Monarch stage 2, bias, optional GELU, and either the
        next layer's quantization or the gated residual ``residual + gate ⊙ y``: ``kernels.packed_linear``)."""
        return packed_linear(act, self.packed_weight(), bias=self.bias, monarch_w2=self.monarch_w2, gelu=gelu,
                             out_spec=out_spec, out_dtype=out_dtype or self.out_dtype, residual=residual, gate=gate)

    def _apply(self, fn, recurse=True):
        """``.to(dtype)``, ``.half()``, ``.bfloat16()`` on the model change what this layer computes in, not its
        storage: the packed codes, float32 scales and bias stay as they are (``PackedWeight`` demands float32
        scales), the Monarch factors follow ``branch_dtype``. Device moves apply to everything. The probe lives on
        the layer's device: ``.to(dtype)`` without a device leaves it there (a CPU probe would move a CUDA layer's
        buffers to the CPU)."""
        probe = fn(torch.zeros(1, dtype=torch.float32, device=self.w_scale.device))
        if self.w_packed is None and not probe.is_meta:   # (the fragment layout's map, on the new device)
            self.__dict__["_row_chan"] = cuda_layout.tile_rows_on(self.out_features, probe.device)
        if probe.dtype == torch.float32:   # a device move (the anchor keeps its dtype), or .float(): all float32
            return super()._apply(fn, recurse)
        super()._apply(lambda t: t.to(device=probe.device), recurse)
        self.dtype_anchor.data = self.dtype_anchor.data.to(probe.dtype)
        if self.monarch_w1 is not None:
            self.monarch_w1 = self.monarch_w1.to(branch_dtype(probe.dtype))
            self.monarch_w2 = self.monarch_w2.to(branch_dtype(probe.dtype))
        return self

    def weight_bytes(self) -> int:
        """Bytes of everything the layer stores (packed weight, scales, zero points, sums, bias, branch)."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def extra_repr(self) -> str:
        br = "" if self.monarch_w1 is None else f", monarch b={self.monarch_w1.shape[0]}"
        lay = "" if self.layout == "v1" else ", frag layout"
        return f"{self.in_features} -> {self.out_features}, {self.config.label}{br}{lay}"


class TreeQPointwiseConv(PointwiseConvAttributes, TreeQLinear):
    """Packed replacement for a pointwise ``ConvNd`` (``nn.pointwise``): its channels are the features and its
    positions the tokens, so ``y = conv(x)`` runs as ``TreeQLinear`` on ``x`` with the channels moved last. The
    state is a ``TreeQLinear``'s. Sana's block hands its feed-forward a channels-last tensor viewed as channels
    first, so moving the channels back is free there; the output is such a view too."""

    def __init__(self, in_channels: int, out_channels: int, config: LayerConfig, *, spatial_dims: int,
                 **kw: Any) -> None:
        if spatial_dims not in (1, 2, 3):
            raise ValueError(f"spatial_dims must be 1, 2 or 3 (Conv1d/2d/3d), got {spatial_dims!r}")
        super().__init__(in_channels, out_channels, config, **kw)
        self.spatial_dims = spatial_dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        nd, who = self.spatial_dims, self.name or "TreeQPointwiseConv"
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{who}: input must be a float tensor, got {type(x).__name__}")
        if x.dim() not in (nd + 1, nd + 2):
            raise ValueError(f"{who}: a {nd}-d convolution takes (B, C, *{nd} sizes) or (C, *{nd} sizes), got a "
                             f"{x.dim()}-d input of shape {tuple(x.shape)}")
        c = x.dim() - nd - 1   # the channel dimension: 1 batched, 0 unbatched
        if x.shape[c] != self.in_features:
            raise ValueError(f"{who}: input has {x.shape[c]} channels, expected {self.in_features}")
        return super().forward(x.movedim(c, -1)).movedim(-1, c)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized kernel ``(out_channels, in_channels, 1, ...)``, as the convolution held it."""
        return super().weight.reshape(self.out_features, self.in_features, *(1,) * self.spatial_dims)

    def extra_repr(self) -> str:
        return f"pointwise conv{self.spatial_dims}d, " + super().extra_repr()
