"""Fused Ideogram 4 blocks for packed inference: the fusions of :mod:`.diffusers_fused` for diffusers'
``Ideogram4TransformerBlock``.

The block is Z-Image's (:mod:`.zimage_fused`): RMSNorms with a weight ``w`` around the attention and the SwiGLU
feed-forward, a modulation ``(scale, gate)`` per sample from the block's own ``adaln_modulation`` linear:

    q, k, v = to_q/k/v ← Q(RMS(h)·w₁·(1 + scale_msa))
    h = h + tanh(gate_msa) · RMSNorm₂(to_out(attention(RMSNorm(q), RMSNorm(k), v, MRoPE, segment mask)))
    h = h + tanh(gate_mlp) · RMSNorm₄(w2(SiLU(w1 ← n) ⊙ (w3 ← n))),   n = Q(RMS(h)·w₃·(1 + scale_mlp))

Where a linear is a :class:`TreeQLinear` with quantized activations, the RMSNorm, its weight and the modulation run
in its ``quantize_input`` kernel (``k = w·(1 + scale) − 1``; one call shared by to_q/to_k/to_v, one by w1/w3, per
activation spec without a Monarch branch). What stays in torch: the attention (``Ideogram4AttnProcessor``'s
computation: RMSNorm on q and k per head, the multimodal rotary embedding as cos/sin, ``dispatch_attention_fn`` with
the processor's backend and the model's block-diagonal segment mask), SiLU ⊙, and the gated residuals (the sandwich
RMSNorms after to_out and w2 need whole output rows, which no GEMM tile owns). Fused and unfused agree to the model
dtype's rounding, not bit for bit.

A block is swapped only in the structure diffusers builds (RMSNorms with a weight before the attention and the
feed-forward, ``Ideogram4MLP``, an ``Ideogram4Attention``) with a packed linear with quantized activations to fuse.
It runs diffusers' own forward in training mode, for a timestep per token (a modulation per token) or one for the
whole batch, on other input ranks, and when a norm the kernel computes, the attention or a packed projection carries
a hook, or the attention another processor than ``Ideogram4AttnProcessor``; a feed-forward that is hooked (or one
of w1/w3 that is hooked and packed) runs as a module. diffusers' block registry has no entry for the original, nor
for the fused class. The state dict is unchanged.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_ideogram4 import (Ideogram4Attention, Ideogram4AttnProcessor,
                                                                 Ideogram4MLP, Ideogram4TransformerBlock)

from .diffusers_fused import (_adopt, _forward_wrapped, _hooked, _project, dispatch_kwargs, like_rows, rms_factor,
                              runs_processor, sandwich_swiglu, swap_blocks, weighted_rms_norm)


def _supported(block: nn.Module) -> bool:
    if type(block) is not Ideogram4TransformerBlock or _forward_wrapped(block):
        return False
    attn, ff = block.attention, block.feed_forward
    d = getattr(attn, "hidden_size", None) if type(attn) is Ideogram4Attention else None
    return (isinstance(d, int) and weighted_rms_norm(block.attention_norm1, d)
            and weighted_rms_norm(block.ffn_norm1, d) and type(ff) is Ideogram4MLP
            and getattr(ff.w1, "in_features", None) == d and getattr(ff.w3, "in_features", None) == d
            and getattr(block.adaln_modulation, "out_features", None) == 4 * d)


def _linears(block: nn.Module) -> list[nn.Module]:
    a, ff = block.attention, block.feed_forward
    return [a.to_q, a.to_k, a.to_v, ff.w1, ff.w3]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _attention(attn: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, b: int, mask: torch.Tensor | None,
               rotary: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """``Ideogram4AttnProcessor``'s attention of (B·S, D) projection rows, then to_out[0]: (B, S, D)."""
    query, key, value = (t.view(b, -1, attn.num_heads, attn.head_dim) for t in (q, k, v))
    query, key = attn.norm_q(query), attn.norm_k(key)
    cos, sin = (t.unsqueeze(2) for t in rotary)
    query = (query * cos) + (_rotate_half(query) * sin)
    key = (key * cos) + (_rotate_half(key) * sin)
    o = dispatch_attention_fn(query, key, value, attn_mask=mask, **dispatch_kwargs(attn.processor))
    return attn.to_out[0](o.flatten(2, 3))


class FusedIdeogram4TransformerBlock(Ideogram4TransformerBlock):
    """An ``Ideogram4TransformerBlock`` running the fused packed kernels (module docstring)."""

    def __init__(self, block: Ideogram4TransformerBlock) -> None:
        if not _supported(block):
            raise ValueError("FusedIdeogram4TransformerBlock handles Ideogram4TransformerBlock in the structure "
                             "diffusers builds")
        _adopt(self, block)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor,
                image_rotary_emb: tuple[torch.Tensor, torch.Tensor], adaln_input: torch.Tensor) -> torch.Tensor:
        args = (hidden_states, attention_mask, image_rotary_emb, adaln_input)
        x, n1, n3 = hidden_states, self.attention_norm1, self.ffn_norm1
        if (self.training or x.ndim != 3 or adaln_input.ndim != 3 or tuple(adaln_input.shape[:2]) != (x.shape[0], 1)
                or not like_rows(x, adaln_input, batch=False) or _hooked(n1) or _hooked(n3)
                or not runs_processor(self.attention, (Ideogram4AttnProcessor,))):
            return super().forward(*args)   # (a timestep per token: a modulation per token)
        b, s, d = x.shape
        scale_msa, gate_msa, scale_mlp, gate_mlp = self.adaln_modulation(adaln_input).chunk(4, dim=-1)
        gate_msa, gate_mlp = torch.tanh(gate_msa), torch.tanh(gate_mlp)
        scale_msa, scale_mlp = 1.0 + scale_msa, 1.0 + scale_mlp
        a = self.attention
        shift, k = rms_factor(n1, scale_msa, b, d)
        q, kk, v = _project((a.to_q, a.to_k, a.to_v), x.reshape(b * s, d).contiguous(), lambda: n1(x) * scale_msa,
                            ln_eps=n1.eps, shift=shift, scale=k, rms_norm=True)
        x = x + gate_msa * self.attention_norm2(_attention(a, q, kk, v, b, attention_mask, image_rotary_emb))
        ff = self.feed_forward
        return sandwich_swiglu(x, n3, self.ffn_norm2, ff, (ff.w1, ff.w3, ff.w2), F.silu, scale_mlp, gate_mlp)


def fuse_ideogram4_blocks(model: nn.Module) -> int:
    """Swap every Ideogram 4 block of ``model`` that the fused class handles and that has a packed linear with
    quantized activations to fuse; returns how many were swapped."""
    return swap_blocks(model, lambda m: FusedIdeogram4TransformerBlock if _supported(m) else None, _linears)
