"""Pointwise convolutions are linears over channels.

A ``ConvNd`` with a 1×…×1 kernel, stride 1, no padding or dilation and one group computes at every position p

    y[:, :, p] = W · x[:, :, p] + b,    W = weight.reshape(out_channels, in_channels)

which is a linear layer whose tokens are the positions and whose features are the channels. Sana's feed-forward
(GLUMBConv's inverted and point convolutions) and its patch embedding (patch size 1) are such convolutions, and
hold half of its weights; the runtime packs them like linears (``runtime.linear.TreeQPointwiseConv``), and the
search, calibration and fake-quant simulation take them as linears too (``nn.quant_pointwise.QuantPointwiseConv``).
"""
from __future__ import annotations

import torch
import torch.nn as nn

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _base(m: nn.Module) -> type[nn.Module]:
    return next(c for c in CONVS if isinstance(m, c))


def _plain(m: nn.Module) -> bool:
    """``m`` runs its torch class's own forward: a subclass that changes it (scales the output, takes a cache or
    a gain) computes something else than the convolution, which a packed layer would silently drop."""
    return type(m).forward is _base(m).forward


def is_pointwise_conv(m: nn.Module) -> bool:
    """``m`` is a convolution that is a linear over channels (module docstring), with torch's own forward."""
    if not isinstance(m, CONVS) or not _plain(m):
        return False
    nd = len(m.kernel_size)
    zero = (0,) * nd
    return (tuple(m.kernel_size) == (1,) * nd and tuple(m.stride) == (1,) * nd and tuple(m.dilation) == (1,) * nd
            and m.groups == 1 and (m.padding in ("valid", "same") or tuple(m.padding) == zero))


def layer_dims(m: nn.Module) -> tuple[int, int]:
    """``(K, N)``, the input and output features of a linear (plain, fake-quant or packed) or a pointwise
    convolution (its channels)."""
    if is_pointwise_conv(m):
        return m.in_channels, m.out_channels
    return m.in_features, m.out_features


def conv_weight(m: nn.Module) -> torch.Tensor:
    """A pointwise convolution's weight as the ``(N, K)`` matrix of the linear it is."""
    return m.weight.reshape(m.out_channels, m.in_channels)


def describe(m: nn.Module) -> str:
    """What a module that is neither a linear nor a pointwise convolution is, for an error message."""
    if isinstance(m, CONVS) and not _plain(m):
        return f"{type(m).__name__}, a {_base(m).__name__} with its own forward"
    if isinstance(m, CONVS):
        k = "x".join(str(s) for s in m.kernel_size)
        extra = [f"stride {tuple(m.stride)}"] if any(s != 1 for s in m.stride) else []
        extra += [f"groups {m.groups}"] if m.groups != 1 else []
        extra += [f"dilation {tuple(m.dilation)}"] if any(d != 1 for d in m.dilation) else []
        extra += [f"padding {m.padding}"] if not (m.padding in ("valid", "same") or not any(m.padding)) else []
        return f"{type(m).__name__} with a {k} kernel" + (f" ({', '.join(extra)})" if extra else "")
    return type(m).__name__


class PointwiseConvAttributes:
    """What code written for a pointwise ``ConvNd`` reads off it, for the modules that replace one (the fake-quant
    ``QuantPointwiseConv``, the packed ``TreeQPointwiseConv``): its channels (SANA-WM's feed-forward reads
    ``out_channels``), a 1×…×1 kernel, stride 1, no padding, one group. Read-only; the host class sets
    ``in_features``, ``out_features`` and ``spatial_dims``."""

    in_features: int
    out_features: int
    spatial_dims: int

    @property
    def in_channels(self) -> int:
        return self.in_features

    @property
    def out_channels(self) -> int:
        return self.out_features

    @property
    def kernel_size(self) -> tuple[int, ...]:
        return (1,) * self.spatial_dims

    @property
    def stride(self) -> tuple[int, ...]:
        return (1,) * self.spatial_dims

    @property
    def dilation(self) -> tuple[int, ...]:
        return (1,) * self.spatial_dims

    @property
    def padding(self) -> tuple[int, ...]:
        return (0,) * self.spatial_dims

    @property
    def groups(self) -> int:
        return 1
