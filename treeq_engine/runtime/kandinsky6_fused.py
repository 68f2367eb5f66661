"""Fused Kandinsky 6 blocks for packed inference: Kandinsky 5's fusions (:mod:`.kandinsky5_fused`) for diffusers'
``Kandinsky6SRTransformerBlock`` (every block of the Kandinsky 6 super-resolution transformer) and
``Kandinsky6TransformerEncoderBlock`` (Kandinsky 6's video and audio text streams; its fused video/audio decoder
blocks stay unfused).

Both blocks are Kandinsky 5's text block with diffusers' ``FeedForward``: a ``Kandinsky6*Modulation`` turns
``silu(time_embed)`` into a shift, a scale and a gate per sub-layer, around LayerNorms without affine, modulated and
gated in float32:

    q, k, v = to_query/key/value ← Q(mod(LN(x), shift_sa, scale_sa))
    x = x + gate_sa · attention(q, k, v)        (the processor's own: RMSNorm on q and k, rotary, NABLA or a mask)
    x = x + gate_ff · net[2](Q(GELU(net[0].proj ← Q(mod(LN(x), shift_ff, scale_ff)))))

Where a linear is a :class:`TreeQLinear` with quantized activations, LayerNorm + modulate + quantization run in its
``quantize_input`` kernel (one call shared by to_query/to_key/to_value with one activation spec and no Monarch
branch, one for the feed-forward), and the feed-forward's gated residual in net[2]'s epilogue (float32, as the block
adds it); the exact GELU runs between the kernels. The attention runs its processor itself on a view of the
attention whose projections return the kernels' outputs (``HandedAttention``). Fused and unfused agree to the model
dtype's rounding, not bit for bit.

A block is swapped only in the structure diffusers builds (LayerNorms without affine, the block's attention with its
default processor, a GELU ``FeedForward``) with a packed linear with quantized activations to fuse. It runs
diffusers' own forward in training mode, on other input ranks or modulation shapes (a time embedding of another
batch), and when a norm, the modulation or the attention carries a hook or another processor, or a projection the
kernels run carries one; a hooked feed-forward (or a part of it) runs as diffusers computes it. The super-resolution
block takes its original's entry in ``TransformerBlockRegistry``. The state dict is unchanged.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from diffusers.models.transformers.transformer_kandinsky6 import (Kandinsky6Attention, Kandinsky6AttnProcessor,
                                                                  Kandinsky6Modulation,
                                                                  Kandinsky6TransformerEncoderBlock)
from diffusers.models.transformers.transformer_kandinsky6_sr import (Kandinsky6SRAttention, Kandinsky6SRAttnProcessor,
                                                                     Kandinsky6SRModulation,
                                                                     Kandinsky6SRTransformerBlock)

from .diffusers_fused import (_adopt, _feed_forward as _gelu_feed_forward, _forward_wrapped, _hooked,
                              _plain_layer_norm, like_rows, register_block, runs_processor, swap_blocks)
from .kandinsky5_fused import PROJECTIONS, _attend, _feed_forward, _modulation

# block class: (its attention, processor, modulation; the names of its modulation, attention and attention norm)
_KINDS: dict[type, tuple[Any, Any, Any, str, str, str]] = {
    Kandinsky6SRTransformerBlock: (Kandinsky6SRAttention, Kandinsky6SRAttnProcessor, Kandinsky6SRModulation,
                                   "visual_modulation", "self_attention", "self_attention_norm"),
    Kandinsky6TransformerEncoderBlock: (Kandinsky6Attention, Kandinsky6AttnProcessor, Kandinsky6Modulation,
                                        "text_modulation", "attn", "attn_norm"),
}


def _supported(block: nn.Module) -> bool:
    kind = _KINDS.get(type(block))
    if kind is None or _forward_wrapped(block):
        return False
    attention, _, modulation, mod_name, attn_name, norm_name = kind
    norm, attn, mod = getattr(block, norm_name), getattr(block, attn_name), getattr(block, mod_name)
    d: Any = norm.normalized_shape[0] if isinstance(norm, nn.LayerNorm) else None
    return (d is not None and _plain_layer_norm(norm, d) and _plain_layer_norm(block.feed_forward_norm, d)
            and type(mod) is modulation and mod.out_layer.out_features == 6 * d
            and type(attn) is attention and attn.to_query.in_features == d and attn.to_key.in_features == d
            and _gelu_feed_forward(block.feed_forward, d) and len(block.feed_forward.net) == 3)


def _linears(block: nn.Module) -> list[nn.Module]:
    attn = getattr(block, _KINDS[type(block)][4])
    ff = block.feed_forward
    return [attn.to_query, attn.to_key, attn.to_value, ff.net[0].proj, ff.net[2]]


def _fused(block: Any, x: torch.Tensor, time_embed: torch.Tensor, **call: Any) -> torch.Tensor | None:
    """The block's output by the kernels, its attention's processor called with ``call``; None where diffusers' own
    forward must run (module docstring)."""
    _, processor, _, mod_name, attn_name, norm_name = _KINDS[type(block).__mro__[1]]
    attn, norm, modulation = getattr(block, attn_name), getattr(block, norm_name), getattr(block, mod_name)
    if (block.training or x.ndim != 3 or not like_rows(x, time_embed, dtype=False) or _hooked(norm)
            or _hooked(block.feed_forward_norm) or _hooked(modulation)
            or not runs_processor(attn, (processor,), PROJECTIONS)):
        return None
    b, _, d = x.shape
    m = _modulation(modulation, time_embed, b, 6, d)
    if m is None:
        return None
    mod, m32 = m
    x = _attend(attn, PROJECTIONS, norm, x, mod, m32, 0, **call)
    return _feed_forward(block, x, mod, m32, 1)


class FusedKandinsky6SRTransformerBlock(Kandinsky6SRTransformerBlock):
    """A ``Kandinsky6SRTransformerBlock`` running the fused packed kernels (module docstring)."""

    def __init__(self, block: Kandinsky6SRTransformerBlock) -> None:
        if type(block) is not Kandinsky6SRTransformerBlock or not _supported(block):
            raise ValueError("FusedKandinsky6SRTransformerBlock handles Kandinsky6SRTransformerBlock in the structure "
                             "diffusers builds")
        _adopt(self, block)

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor, rotary_emb: torch.Tensor,
                sparse_params: dict[str, Any]) -> torch.Tensor:
        out = _fused(self, hidden_states, temb, rotary_emb=rotary_emb, sparse_params=sparse_params)
        return super().forward(hidden_states, temb, rotary_emb, sparse_params) if out is None else out


class FusedKandinsky6TransformerEncoderBlock(Kandinsky6TransformerEncoderBlock):
    """A ``Kandinsky6TransformerEncoderBlock`` running the fused packed kernels (module docstring)."""

    def __init__(self, block: Kandinsky6TransformerEncoderBlock) -> None:
        if type(block) is not Kandinsky6TransformerEncoderBlock or not _supported(block):
            raise ValueError("FusedKandinsky6TransformerEncoderBlock handles Kandinsky6TransformerEncoderBlock in the "
                             "structure diffusers builds")
        _adopt(self, block)

    def forward(self, x: torch.Tensor, time_embed: torch.Tensor, rope: torch.Tensor,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        # (what Kandinsky6Attention.forward hands its processor for a self-attention: the rotary table for keys too)
        out = _fused(self, x, time_embed, encoder_hidden_states=None, rotary_emb=rope, rotary_emb_kv=rope,
                     attn_mask=attn_mask)
        return super().forward(x, time_embed, rope, attn_mask) if out is None else out


def fuse_kandinsky6_blocks(model: nn.Module) -> int:
    """Swap every Kandinsky 6 block of ``model`` that a fused class handles and that has a packed linear with
    quantized activations to fuse; returns how many were swapped."""
    def choose(mod: nn.Module) -> type | None:
        if not _supported(mod):
            return None
        return (FusedKandinsky6SRTransformerBlock if type(mod) is Kandinsky6SRTransformerBlock
                else FusedKandinsky6TransformerEncoderBlock)

    return swap_blocks(model, choose, _linears)


register_block(FusedKandinsky6SRTransformerBlock, 0)   # (returns hidden_states alone, as the original)
