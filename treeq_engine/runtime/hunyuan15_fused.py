"""Fused HunyuanVideo 1.5 blocks for packed inference: diffusers' ``HunyuanVideo15TransformerBlock`` is
HunyuanVideo's double-stream block (``hunyuan_fused``: FLUX.1's fused double block with the image tokens first and
the rotary embedding on them only; the same adaLNs, LayerNorms without affine, GELU(tanh) feed-forwards and gated
residuals, the same kernel calls) with ``HunyuanVideo15AttnProcessor2_0``'s mask: the block's ``(B, text)`` prompt
mask, padded with ones in front for the image tokens, hides the padding both ways (the outer product of the mask
with itself: padded queries see nothing, as the processor builds it). HunyuanVideo 1.5 has no single-stream blocks;
its token refiner's blocks stay unfused.

A block is swapped only in the structure diffusers builds with a packed linear with quantized activations to fuse;
a swapped block runs diffusers' own forward in training mode, when its attention runs another processor or fused
projections, when a norm, the attention or a projection carries a hook, on other input ranks, without text or
without a mask. diffusers >= 0.36 (its processor's ``dispatch_attention_fn``); diffusers' block registry has no
entry for the original, nor for the fused class. The state dict is unchanged.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.models.transformers.transformer_hunyuan_video15 import (HunyuanVideo15AttnProcessor2_0,
                                                                       HunyuanVideo15TransformerBlock)

from .diffusers_fused import _adopt, _hooked, like_rows, swap_blocks
from .hunyuan_fused import _attention, _attention_ok, _double_supported
from .mmdit_fused import _modulation, flux_double, flux_linears


def _supported(block: nn.Module) -> bool:
    return _double_supported(block, HunyuanVideo15TransformerBlock)


def _mask(mask: torch.Tensor, rows: int) -> torch.Tensor:
    """``HunyuanVideo15AttnProcessor2_0``'s attention mask of ``rows`` tokens (image, then text) from the block's
    ``(B, text)`` prompt mask: ones in front for the image, the outer product, ``(B, 1, rows, rows)`` bool."""
    b = mask.shape[0]
    keep = F.pad(mask, (rows - mask.shape[1], 0), value=True).bool().view(b, 1, 1, rows)
    return keep & keep.transpose(2, 3)


class FusedHunyuanVideo15TransformerBlock(HunyuanVideo15TransformerBlock):
    """A ``HunyuanVideo15TransformerBlock`` running the fused packed kernels (module docstring)."""

    def __init__(self, block: HunyuanVideo15TransformerBlock) -> None:
        if not _supported(block):
            raise ValueError("FusedHunyuanVideo15TransformerBlock handles HunyuanVideo15TransformerBlock in the "
                             "structure diffusers builds")
        _adopt(self, block)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, temb: torch.Tensor,
                attention_mask: torch.Tensor | None = None, freqs_cis: Any = None, *args: Any, **kwargs: Any) -> Any:
        call = (hidden_states, encoder_hidden_states, temb, attention_mask, freqs_cis, *args)
        n1, n1c, attn, h, c = self.norm1, self.norm1_context, self.attn, hidden_states, encoder_hidden_states
        if (self.training or h.ndim != 3 or c.ndim != 3 or not c.shape[1] or not like_rows(h, c, temb)
                or attention_mask is None
                or attention_mask.ndim != 2
                or any(_hooked(n) for n in (n1, n1.norm, n1c, n1c.norm, self.norm2, self.norm2_context))
                or not _attention_ok(attn, joint=True, processor=HunyuanVideo15AttnProcessor2_0)):
            return super().forward(*call, **kwargs)
        b, t, d = h.shape
        m, mc = _modulation(n1, temb, b, 6, d), _modulation(n1c, temb, b, 6, d)
        if m is None or mc is None:
            return super().forward(*call, **kwargs)
        mask = _mask(attention_mask, t + c.shape[1])
        c, h = flux_double(self, h, c, m, mc, freqs_cis, mask, attention=_attention, text_first=False,
                           clip_fp16=False)
        return h, c


def fuse_hunyuan15_blocks(model: nn.Module) -> int:
    """Swap every HunyuanVideo 1.5 block of ``model`` that the fused class handles and that has a packed linear with
    quantized activations to fuse; returns how many were swapped."""
    return swap_blocks(model, lambda m: FusedHunyuanVideo15TransformerBlock if _supported(m) else None,
                       lambda block: flux_linears(block, single=False))

