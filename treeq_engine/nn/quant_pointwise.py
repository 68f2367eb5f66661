"""QuantPointwiseConv: a pointwise convolution fake-quantized as the linear over channels it is.

A 1×…×1 convolution computes ``y[:, :, p] = W · x[:, :, p] + b`` at every position ``p`` (``nn.pointwise``), so
its simulation is :class:`QuantLinear`'s on the positions as tokens: the input moves its channels last, runs the
linear path (per-token activation quantization, per-channel weights, the branch, grouped candidates along the
leading batch dim) and moves them back. The weight is the convolution's, viewed as ``(N, K)`` (one storage), so
search, PTQ, PEFT and the runtime's packing read it as a linear's. Sana's feed-forward (GLUMBConv's inverted and
point convolutions, half its weights) is made of them.

The view is a Parameter of its own: a converted model's state dict holds ``(N, K)`` where the convolution held
``(N, K, 1, ...)``, and code holding the convolution's Parameter (an optimizer built before ``convert``) does not
see the new one. ``unconvert`` gives back a plain convolution viewing the same storage.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..plan import LayerConfig
from .pointwise import PointwiseConvAttributes, is_pointwise_conv
from .quant_linear import QuantLinear


class QuantPointwiseConv(PointwiseConvAttributes, QuantLinear):
    """``QuantLinear`` over the channels of a ``(B, C, *spatial)`` input (see the module docstring)."""

    def __init__(self, conv: nn.Module, config: LayerConfig | None = None, *, name: str = "") -> None:
        if not is_pointwise_conv(conv):
            raise TypeError(f"QuantPointwiseConv wraps a pointwise (1x1, stride 1, one group) convolution, got "
                            f"{type(conv).__name__}")
        n, k = conv.out_channels, conv.in_channels
        lin = nn.Linear(k, n, bias=conv.bias is not None, device="meta")
        # the (N, K) view of the (N, K, 1, ...) weight (one storage when contiguous), a Parameter of its own
        lin.weight = nn.Parameter(conv.weight.detach().reshape(n, k), requires_grad=conv.weight.requires_grad)
        lin.bias = conv.bias
        super().__init__(lin, config, name=name)
        self.spatial_dims = len(conv.kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.dim() - self.spatial_dims - 1   # the channel dim: 1 batched, 0 unbatched (as torch's ConvNd takes)
        if c not in (0, 1) or x.shape[c] != self.in_features:
            raise ValueError(f"{self.name or 'QuantPointwiseConv'}: input must be (B, {self.in_features}"
                             f"{', *' * self.spatial_dims}) or ({self.in_features}{', *' * self.spatial_dims}) for a "
                             f"{self.spatial_dims}-D pointwise convolution, got {tuple(x.shape)}")
        return super().forward(x.movedim(c, -1)).movedim(-1, c)

    def to_conv(self) -> nn.Module:
        """The plain convolution this simulates, sharing its weight's storage and its bias (``unconvert``)."""
        cls = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[self.spatial_dims - 1]
        conv = cls(self.in_features, self.out_features, 1, bias=self.bias is not None, device="meta")
        conv.weight = nn.Parameter(self.weight.detach().view(self.out_features, self.in_features,
                                                             *(1,) * self.spatial_dims),
                                   requires_grad=self.weight.requires_grad)
        conv.bias = self.bias
        return conv

    def extra_repr(self) -> str:
        return f"conv{self.spatial_dims}d 1x1, " + super().extra_repr()


def conv_spatial_dims(module: nn.Module) -> int | None:
    """The spatial dims of a pointwise convolution, plain or fake-quant; ``None`` for a linear."""
    if isinstance(module, QuantPointwiseConv):
        return module.spatial_dims
    return len(module.kernel_size) if is_pointwise_conv(module) else None


def channels_last_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The ``(..., K)`` rows a layer's input ``x`` holds: a pointwise convolution's (plain or fake-quant) input has
    its channels on dim 1, a linear's last."""
    if isinstance(module, QuantPointwiseConv) or is_pointwise_conv(module):
        return x.movedim(1, -1)
    return x
