"""Fused EasyAnimate blocks for packed inference: the fusions of :mod:`.diffusers_fused` for diffusers'
``EasyAnimateTransformerBlock`` (EasyAnimate V5.1: MMDiT blocks with the text's own projections and feed-forward;
the blocks past ``mmdit_layers`` share them between the streams, as CogVideoX's).

Each of the block's two ``EasyAnimateLayerNormZero`` gives per stream (video, text) a shift, scale and gate from one
linear of ``silu(temb)``, around one float32 LayerNorm, whose affine the quantization kernel takes folded into its
modulate (``cogvideox_fused``'s ``_stream_modulation``):

    q, k, v = to_q/k/v ← Q(mod(LN(h)));  q', k', v' = add_q/k/v_proj ← Q(mod(LN(c)))    (to_q/k/v on both: shared)
    o', o = attention([q'; q], [k'; k], [v'; v])        (q/k LayerNorms, the rotary embedding on the video rows)
    h = h + gate · to_out(o),   c = c + enc_gate · to_add_out(o')                       (shared: c + enc_gate · o')
    h = h + gate_ff · ff(Q(mod(LN(h)))),   c = c + enc_gate_ff · txt_ff(Q(mod(LN(c))))   (shared: ff)

Where a linear is a :class:`TreeQLinear` with quantized activations, LayerNorm + modulate + quantization run in its
``quantize_input`` kernel (one call per stream for its q/k/v, one per feed-forward, where they share an activation
spec and carry no Monarch branch), GELU(tanh) and the second linear's codes in the first's epilogue, the gated
residuals in to_out's, to_add_out's and the feed-forwards' second epilogues. The attention is
``EasyAnimateAttnProcessor2_0``'s computation. Fused and unfused agree to the model dtype's rounding (the kernels
normalize and modulate in float32, the LayerNorm's affine folded in), not bit for bit.

A block is swapped only in the structure diffusers builds (``EasyAnimateLayerNormZero`` over a float32 LayerNorm of
the block's width, an ``Attention`` with LayerNorm or no q/k norms, ``FeedForward`` modules of [GELU, Dropout,
linear(, Dropout)], no ``after_norm``) with a packed linear with quantized activations to fuse. It runs diffusers'
own forward in training mode, without text, for a ``temb`` or a text whose batch or dtype is not the latents'
(diffusers broadcasts and promotes), when a norm or the attention carries a hook or another processor, and, in a
block whose streams share the projections, when one of those carries one other than diffusers' layerwise casting
(diffusers runs them on the joined rows; a hooked feed-forward, which it runs per stream, runs as the module).
diffusers' block-level hooks (FirstBlockCache,
MagCache) find both classes, fused or not, in ``TransformerBlockRegistry`` (diffusers 0.42 has no entry for them).
The state dict is unchanged.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.normalization import FP32LayerNorm
from diffusers.models.transformers.transformer_easyanimate import (EasyAnimateAttnProcessor2_0,
                                                                   EasyAnimateLayerNormZero,
                                                                   EasyAnimateTransformerBlock)

from .cogvideox_fused import _stream_modulation, _streams
from .diffusers_fused import (_adopt, _bypassed_hook, _feed_forward, _ff, _forward_wrapped, _gated_out, _hooked,
                              _project, hooked_beyond_casting, refuse_fused_projections, register_block,
                              swap_blocks)

_TEXT = ("add_q_proj", "add_k_proj", "add_v_proj")


def _norm(norm: Any, d: int) -> bool:
    return (type(norm) is EasyAnimateLayerNormZero and type(norm.norm) is FP32LayerNorm
            and tuple(norm.norm.normalized_shape) == (d,) and isinstance(norm.linear, nn.Module))


def _supported(block: nn.Module) -> bool:
    if type(block) is not EasyAnimateTransformerBlock or _forward_wrapped(block) or block.norm3 is not None:
        return False
    n1, attn = block.norm1, block.attn1
    d = n1.norm.normalized_shape[0] if isinstance(getattr(n1, "norm", None), nn.LayerNorm) else None
    mmdit = block.txt_ff is not None
    return (d is not None and _norm(n1, d) and _norm(block.norm2, d) and _feed_forward(block.ff, d)
            and (not mmdit or _feed_forward(block.txt_ff, d)) and type(attn) is Attention
            and not attn.is_cross_attention and attn.group_norm is None and attn.spatial_norm is None
            and attn.norm_cross is None and not attn.residual_connection and attn.rescale_output_factor == 1.0
            and all(n is None or type(n) is nn.LayerNorm for n in (attn.norm_q, attn.norm_k))
            and all((getattr(attn, n, None) is not None) == mmdit for n in _TEXT + ("to_add_out",)))


def _linears(block: nn.Module) -> list[nn.Module]:
    a = block.attn1
    out = [a.to_q, a.to_k, a.to_v, a.to_out[0], block.ff.net[0].proj, block.ff.net[2]]
    if block.txt_ff is not None:
        out += [*(getattr(a, n) for n in _TEXT), a.to_add_out, block.txt_ff.net[0].proj, block.txt_ff.net[2]]
    return out


def _attention(attn: Any, text: list[torch.Tensor], video: list[torch.Tensor], b: int, rotary: Any,
               mmdit: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``EasyAnimateAttnProcessor2_0``'s attention of the text's and the video's (B·S, inner) q, k, v rows: the
    outputs before the output projections, (B, S_text, inner) and (B, S, inner)."""
    def heads(t: torch.Tensor) -> torch.Tensor:
        return t.view(b, -1, t.shape[-1]).unflatten(2, (attn.heads, -1)).transpose(1, 2)

    s = text[0].shape[0] // b
    if mmdit:   # (each stream its own projections and q/k norms)
        query, key, value = (heads(t) for t in video)
        eq, ek, ev = (heads(t) for t in text)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if attn.norm_added_q is not None:
            eq = attn.norm_added_q(eq)
        if attn.norm_added_k is not None:
            ek = attn.norm_added_k(ek)
        query, key, value = torch.cat([eq, query], 2), torch.cat([ek, key], 2), torch.cat([ev, value], 2)
    else:   # (the joined rows [text; video] through the shared projections and norms)
        query, key, value = (heads(torch.cat([c.view(b, s, -1), h.view(b, -1, h.shape[-1])], 1))
                             for c, h in zip(text, video))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
    if rotary is not None:
        query = torch.cat([query[:, :, :s], apply_rotary_emb(query[:, :, s:], rotary)], dim=2)
        key = torch.cat([key[:, :, :s], apply_rotary_emb(key[:, :, s:], rotary)], dim=2)
    o = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
    o = o.transpose(1, 2).flatten(2, 3).to(query.dtype)
    return o[:, :s], o[:, s:]


class FusedEasyAnimateTransformerBlock(EasyAnimateTransformerBlock):
    """An ``EasyAnimateTransformerBlock`` running the fused packed kernels (module docstring)."""

    def __init__(self, block: EasyAnimateTransformerBlock) -> None:
        if not _supported(block):
            raise ValueError("FusedEasyAnimateTransformerBlock handles EasyAnimateTransformerBlock in the structure "
                             "diffusers builds")
        _adopt(self, block)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, temb: torch.Tensor,
                image_rotary_emb: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        args = (hidden_states, encoder_hidden_states, temb, image_rotary_emb)
        h, c, n1, n2, attn = hidden_states, encoder_hidden_states, self.norm1, self.norm2, self.attn1
        mmdit = self.txt_ff is not None
        qkv = ("to_q", "to_k", "to_v")
        refuse_fused_projections(attn, qkv + (_TEXT if mmdit else ()))   # (a dense copy of packed layers)
        # (the projections both streams run: diffusers runs them on the joined rows, the fused path per stream, so a
        # hook could tell; the feed-forward diffusers too runs per stream)
        shared = () if mmdit else tuple(getattr(attn, n) for n in qkv)
        out = attn.to_out
        if (self.training or h.ndim != 3 or c.ndim != 3 or not c.shape[1] or c.shape[0] != h.shape[0]
                or c.dtype != h.dtype or temb.ndim != 2 or temb.shape[0] != h.shape[0] or temb.dtype != h.dtype
                or type(attn.processor) is not EasyAnimateAttnProcessor2_0 or attn.fused_projections
                or _hooked(attn) or len(out) != 2 or type(out[1]) is not nn.Dropout or _hooked(out[1])
                or any(_hooked(m) for m in (n1, n1.norm, n2, n2.norm)) or any(hooked_beyond_casting(m) for m in shared)
                or any(_bypassed_hook(getattr(attn, n)) for n in qkv + ((*_TEXT, "to_add_out") if mmdit else ()))
                or _bypassed_hook(out[0])):
            return super().forward(*args)
        b, t, d = h.shape
        text = c.shape[1]
        m1, m2 = _streams(n1, temb, b, d), _streams(n2, temb, b, d)
        if m1 is None or m2 is None:
            return super().forward(*args)
        (mod_h, m32_h), (mod_c, m32_c) = _stream_modulation(self, m1, m2, 0), _stream_modulation(self, m1, m2, 1)
        h2, c2 = h.reshape(b * t, d).contiguous(), c.reshape(b * text, d).contiguous()
        video = _project([getattr(attn, n) for n in qkv], h2,
                         lambda: n1.norm(h) * (1 + mod_h[:, 1:2]) + mod_h[:, 0:1], ln_eps=n1.norm.eps,
                         shift=m32_h[0], scale=m32_h[1])
        words = _project([getattr(attn, n) for n in (_TEXT if mmdit else qkv)], c2,
                         lambda: n1.norm(c) * (1 + mod_c[:, 1:2]) + mod_c[:, 0:1], ln_eps=n1.norm.eps,
                         shift=m32_c[0], scale=m32_c[1])
        oc, oh = _attention(attn, words, video, b, image_rotary_emb, mmdit)
        h2 = _gated_out(out[0], oh, h2, b, m32_h[2], mod_h[:, 2:3])
        if mmdit:
            c2 = _gated_out(attn.to_add_out, oc, c2, b, m32_c[2], mod_c[:, 2:3])
        else:   # (no output projection for the text: its attention rows, gated)
            c2 = (c + mod_c[:, 2:3] * oc).reshape(b * text, d)
        # (diffusers modulates the norm's output in the rows' dtype: not Wan's float32 rows)
        h2 = _ff(self.ff, n2.norm, h2, b, mod_h, m32_h, fp32_rows=False)
        c2 = _ff(self.txt_ff if mmdit else self.ff, n2.norm, c2, b, mod_c, m32_c, fp32_rows=False)
        return h2.view(b, t, d), c2.view(b, text, d)


def fuse_easyanimate_blocks(model: nn.Module) -> int:
    """Swap every EasyAnimate block of ``model`` that :class:`FusedEasyAnimateTransformerBlock` handles and that has
    a packed linear with quantized activations to fuse; returns how many were swapped."""
    return swap_blocks(model, lambda m: FusedEasyAnimateTransformerBlock if _supported(m) else None, _linears)


register_block(FusedEasyAnimateTransformerBlock, 0, 1)   # returns (hidden_states, encoder_hidden_states)
