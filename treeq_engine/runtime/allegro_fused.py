"""Fused Allegro blocks for packed inference: the fusions of :mod:`.diffusers_fused` for diffusers'
``AllegroTransformerBlock``.

PixArt's block (adaLN-single: six vectors ``scale_shift_table + t6``, in DiT's order) with Allegro's attention: a 3D
rotary embedding on the self-attention's q and k (``apply_rotary_emb_allegro``) and the masks the model turns into
additive biases; its LayerNorms may carry an affine (``norm_elementwise_affine``), which the quantization kernel
takes folded into its modulate (``folded_affine``):

    h = h + gate_msa · to_out(attention(to_q, to_k, to_v ← Q(mod(LN_1(h), shift_msa, scale_msa)), mask, rotary))
    h = h + attn2.to_out(attention(to_q ← Q(h); to_k, to_v ← Q(encoder_hidden_states), encoder mask))
    h = h + gate_mlp · ff.net[2](Q(GELU_tanh(ff.net[0].proj(Q(mod(LN_2(h), shift_mlp, scale_mlp))))))

Where a linear is a :class:`TreeQLinear` with quantized activations, LayerNorm + modulate + quantization run in its
``quantize_input`` kernel (one call for to_q/to_k/to_v, one for attn2's to_k/to_v, where they share an activation
spec and carry no Monarch branch), GELU(tanh) and ``ff.net[2]``'s codes in ``ff.net[0].proj``'s epilogue, each
(gated) residual in to_out's and ``ff.net[2]``'s epilogues. The attentions are ``AllegroAttnProcessor2_0``'s
computation. Fused and unfused agree to the model dtype's rounding (the kernels normalize, modulate and add in
float32, where diffusers rounds each step to the model dtype), not bit for bit.

A block is swapped only in the structure diffusers builds (LayerNorms over the block's width, a table of six vectors,
a ``FeedForward`` of [GELU, Dropout, linear(, Dropout)], ``Attention`` modules running ``AllegroAttnProcessor2_0`` on
unfused projections) with a packed linear with quantized activations to fuse. It runs diffusers' own forward in
training mode, without text, on one token, for a ``temb`` or a text whose batch or dtype is not the latents'
(diffusers broadcasts and promotes), and when a norm or an attention carries a hook or another processor; a hook on
the feed-forward or a packed linear of it runs the feed-forward as the module. diffusers' block-level hooks
(FirstBlockCache, MagCache) find both classes, fused or not, in ``TransformerBlockRegistry`` (diffusers 0.42 has no
entry for them). The state dict is unchanged.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.models.attention_processor import AllegroAttnProcessor2_0, Attention
from diffusers.models.embeddings import apply_rotary_emb_allegro
from diffusers.models.transformers.transformer_allegro import AllegroTransformerBlock

from .diffusers_fused import (_adopt, _feed_forward, _ff, _forward_wrapped, _gated_out, _hooked, _layer_norm,
                              _project, _sdpa, folded_affine, plain_attention, register_block, self_attention_ok,
                              six_vector_table, swap_blocks)


def _supported(block: nn.Module) -> bool:
    if type(block) is not AllegroTransformerBlock or _forward_wrapped(block):
        return False
    d = six_vector_table(block)
    return (d is not None and _layer_norm(block.norm1, d) and _layer_norm(block.norm2, d)
            and _feed_forward(block.ff, d) and plain_attention(block.attn1, cross=False)
            and plain_attention(getattr(block, "attn2", None), cross=True))


def _linears(block: nn.Module) -> list[nn.Module]:
    a1, a2 = block.attn1, block.attn2
    return [a1.to_q, a1.to_k, a1.to_v, a1.to_out[0], a2.to_q, a2.to_k, a2.to_v, a2.to_out[0], block.ff.net[0].proj,
            block.ff.net[2]]


def _self_attention(attn: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, b: int,
                    mask: torch.Tensor | None, rotary: Any) -> torch.Tensor:
    """``AllegroAttnProcessor2_0``'s self-attention of (B·S, inner) projection rows, as (B·S, inner) rows."""
    head_dim = k.shape[-1] // attn.heads   # (the processor's: the key's width over the heads)
    if mask is not None:
        mask = attn.prepare_attention_mask(mask, k.shape[0] // b, b)
        mask = mask.view(b, attn.heads, -1, mask.shape[-1])
    query, key, value = (t.view(b, -1, attn.heads, head_dim).transpose(1, 2) for t in (q, k, v))
    if rotary is not None:
        query = apply_rotary_emb_allegro(query, rotary[0], rotary[1])
        key = apply_rotary_emb_allegro(key, rotary[0], rotary[1])
    o = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=0.0, is_causal=False)
    return o.transpose(1, 2).reshape(-1, attn.heads * head_dim).to(query.dtype)


class FusedAllegroTransformerBlock(AllegroTransformerBlock):
    """An ``AllegroTransformerBlock`` running the fused packed kernels (module docstring)."""

    def __init__(self, block: AllegroTransformerBlock) -> None:
        if not _supported(block):
            raise ValueError("FusedAllegroTransformerBlock handles AllegroTransformerBlock in the structure diffusers "
                             "builds")
        _adopt(self, block)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                temb: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                encoder_attention_mask: torch.Tensor | None = None, image_rotary_emb: Any = None) -> torch.Tensor:
        args = (hidden_states, encoder_hidden_states, temb, attention_mask, encoder_attention_mask, image_rotary_emb)
        h, c, a1, a2 = hidden_states, encoder_hidden_states, self.attn1, self.attn2
        table = self.scale_shift_table
        # (one token: diffusers squeezes its rows; a temb or text of another batch or dtype: it broadcasts, promotes)
        if (self.training or not isinstance(temb, torch.Tensor) or c is None or h.ndim != 3 or h.shape[1] < 2
                or c.ndim != 3 or c.shape[0] != h.shape[0] or c.dtype != h.dtype or temb.numel() != table.numel()
                * h.shape[0] or torch.promote_types(table.dtype, temb.dtype) != h.dtype
                or _hooked(self.norm1) or _hooked(self.norm2)
                or not self_attention_ok(a1, Attention, AllegroAttnProcessor2_0)
                or not self_attention_ok(a2, Attention, AllegroAttnProcessor2_0)):
            return super().forward(*args)
        b, t, d = h.shape
        mod = table[None] + temb.reshape(b, 6, -1)   # (B, 6, D), as diffusers computes it
        t1, s1 = folded_affine(self.norm1, mod[:, 0], mod[:, 1])
        t2, s2 = folded_affine(self.norm2, mod[:, 3], mod[:, 4])
        m32 = torch.stack([t1, s1, mod[:, 2].float(), t2, s2, mod[:, 5].float()])   # (6, B, D): the kernels' layout
        h2 = h.reshape(b * t, d).contiguous()

        # 1. self-attention, gate_msa
        q, k, v = _project((a1.to_q, a1.to_k, a1.to_v), h2,
                           lambda: self.norm1(h) * (1 + mod[:, 1:2]) + mod[:, 0:1], ln_eps=self.norm1.eps,
                           shift=m32[0], scale=m32[1])
        o = _self_attention(a1, q, k, v, b, attention_mask, image_rotary_emb)
        h2 = _gated_out(a1.to_out[0], o, h2, b, m32[2], mod[:, 2:3])

        # 2. cross-attention: no norm, ungated
        q, = _project((a2.to_q,), h2, lambda: h2.view(b, t, d))
        k, v = _project((a2.to_k, a2.to_v), c.reshape(-1, c.shape[-1]).contiguous(), lambda: c)
        h2 = _gated_out(a2.to_out[0], _sdpa(a2, q, k, v, b, encoder_attention_mask), h2, b)

        # 3. feed-forward, gate_mlp
        return _ff(self.ff, self.norm2, h2, b, mod, m32).view(b, t, d)


def fuse_allegro_blocks(model: nn.Module) -> int:
    """Swap every Allegro block of ``model`` that :class:`FusedAllegroTransformerBlock` handles and that has a packed
    linear with quantized activations to fuse; returns how many were swapped."""
    return swap_blocks(model, lambda m: FusedAllegroTransformerBlock if _supported(m) else None, _linears)


register_block(FusedAllegroTransformerBlock, 0)   # returns hidden_states alone, as the original
