"""Fused Hunyuan-DiT blocks for packed inference: the fusions of :mod:`.diffusers_fused` for diffusers'
``HunyuanDiTBlock`` (Hunyuan-DiT v1.0 to v1.2, and its distilled variants).

A pre-norm block without gates; its float32 LayerNorms carry an affine (``LN_w,b``), which the quantization kernel
takes folded into its modulate (``folded_affine``); ``AdaLayerNormShift`` adds one shift from ``temb``. The second
half of the blocks first joins the long skip from the first half:

    h = skip_linear(Q(LN_skip([h; skip])))                                     (the blocks with a skip)
    h = h + attn1.to_out(attention(to_q, to_k, to_v ← Q(LN_1(h) + shift)))      shift = linear(silu(temb))
    h = h + attn2.to_out(attention(to_q ← Q(LN_2(h)); to_k, to_v ← Q(encoder_hidden_states)))
    h = h + ff.net[2](Q(GELU_tanh(ff.net[0].proj(Q(LN_3(h))))))

Where a linear is a :class:`TreeQLinear` with quantized activations, LayerNorm (+ shift) + quantization run in its
``quantize_input`` kernel (one call for to_q/to_k/to_v, one for attn2's to_k/to_v, where they share an activation
spec and carry no Monarch branch), GELU(tanh) and ``ff.net[2]``'s codes in ``ff.net[0].proj``'s epilogue, each
residual in to_out's and ``ff.net[2]``'s epilogues. The attentions are ``HunyuanAttnProcessor2_0``'s computation
(the q/k LayerNorms called as the modules they are, the rotary embedding on q and k, on q alone in the
cross-attention). Fused and unfused agree to the model dtype's rounding (the kernels normalize, modulate and add in
float32, where diffusers rounds each step to the model dtype), not bit for bit.

A block is swapped only in the structure diffusers builds (``AdaLayerNormShift`` and float32 LayerNorms of the
block's width, a ``FeedForward`` of [GELU, Dropout, linear(, Dropout)], ``Attention`` modules running
``HunyuanAttnProcessor2_0`` on unfused projections) with a packed linear with quantized activations to fuse. It runs
diffusers' own forward in training mode, with a feed-forward chunk size, without text, for a ``temb`` or a text
whose batch is not the latents' (diffusers broadcasts them), for a text, skip or ``temb`` in another dtype than the
latents' (diffusers promotes the block's rows), and when a norm or an attention carries a hook or another processor
(the fused-projection one too); a hook on the feed-forward or a packed linear of it runs the feed-forward as the
module. diffusers'
block-level hooks (FirstBlockCache, MagCache) find both classes, fused or not, in ``TransformerBlockRegistry``
(diffusers 0.42 has no entry for them). The state dict is unchanged.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, HunyuanAttnProcessor2_0
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.normalization import FP32LayerNorm
from diffusers.models.transformers.hunyuan_transformer_2d import AdaLayerNormShift, HunyuanDiTBlock

from .diffusers_fused import (_adopt, _bypassed_hook, _feed_forward, _ff, _forward_wrapped, _gated_out, _hooked,
                              _project, folded_affine, plain_attention, register_block, self_attention_ok,
                              swap_blocks)


def _layer_norm(norm: Any, dim: int) -> bool:
    """diffusers' float32 LayerNorm over the last dim, affine or not (the affine folds into the modulate)."""
    return type(norm) is FP32LayerNorm and tuple(norm.normalized_shape) == (dim,)


def _supported(block: nn.Module) -> bool:
    if type(block) is not HunyuanDiTBlock or _forward_wrapped(block):
        return False
    n1 = block.norm1
    if type(n1) is not AdaLayerNormShift or not isinstance(n1.norm, nn.LayerNorm) or len(n1.norm.normalized_shape) != 1:
        return False
    d = n1.norm.normalized_shape[0]
    skip = block.skip_linear is None or (_layer_norm(block.skip_norm, 2 * d)
                                         and getattr(block.skip_linear, "in_features", None) == 2 * d)
    return (skip and isinstance(n1.linear, nn.Module) and _layer_norm(n1.norm, d) and _layer_norm(block.norm2, d)
            and _layer_norm(block.norm3, d) and _feed_forward(block.ff, d) and plain_attention(block.attn1, cross=False)
            and plain_attention(block.attn2, cross=True))


def _linears(block: nn.Module) -> list[nn.Module]:
    a1, a2 = block.attn1, block.attn2
    out = [a1.to_q, a1.to_k, a1.to_v, a1.to_out[0], a2.to_q, a2.to_k, a2.to_v, a2.to_out[0], block.ff.net[0].proj,
           block.ff.net[2]]
    return out + ([block.skip_linear] if block.skip_linear is not None else [])


def _sdpa(attn: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, b: int, rotary: Any) -> torch.Tensor:
    """``HunyuanAttnProcessor2_0``'s attention of (B·S, inner) projection rows, as (B, S, inner)."""
    head_dim = k.shape[-1] // attn.heads   # (the processor's: the key's width over the heads)

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.view(b, -1, attn.heads, head_dim).transpose(1, 2)

    query, key, value = split(q), split(k), split(v)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    if rotary is not None:
        query = apply_rotary_emb(query, rotary)
        if not attn.is_cross_attention:
            key = apply_rotary_emb(key, rotary)
    o = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
    return o.transpose(1, 2).reshape(b, -1, attn.heads * head_dim).to(query.dtype)


class FusedHunyuanDiTBlock(HunyuanDiTBlock):
    """A ``HunyuanDiTBlock`` running the fused packed kernels (module docstring)."""

    def __init__(self, block: HunyuanDiTBlock) -> None:
        if not _supported(block):
            raise ValueError("FusedHunyuanDiTBlock handles HunyuanDiTBlock in the structure diffusers builds")
        _adopt(self, block)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                temb: torch.Tensor | None = None, image_rotary_emb: Any = None, skip: Any = None) -> torch.Tensor:
        args = (hidden_states, encoder_hidden_states, temb, image_rotary_emb, skip)
        h, c, n1, a1, a2 = hidden_states, encoder_hidden_states, self.norm1, self.attn1, self.attn2
        joins = self.skip_linear is not None
        norms = (n1, n1.norm, self.norm2, self.norm3) + ((self.skip_norm,) if joins else ())
        # (a text or temb batch other than the latents' broadcasts in diffusers' forward, rows of another dtype
        # promote: diffusers' forward computes those)
        joined = not joins or (isinstance(skip, torch.Tensor) and skip.shape == h.shape and skip.dtype == h.dtype
                               and not _bypassed_hook(self.skip_linear))
        if (self.training or self._chunk_size is not None or not isinstance(temb, torch.Tensor) or temb.ndim != 2
                or c is None or h.ndim != 3 or c.ndim != 3 or temb.shape[0] != h.shape[0] or c.shape[0] != h.shape[0]
                or c.dtype != h.dtype or temb.dtype != h.dtype or not joined
                or any(_hooked(n) for n in norms) or not self_attention_ok(a1, Attention, HunyuanAttnProcessor2_0)
                or not self_attention_ok(a2, Attention, HunyuanAttnProcessor2_0)):
            return super().forward(*args)
        b, t, d = h.shape
        shift = n1.linear(n1.silu(temb.to(torch.float32)).to(temb.dtype))
        if shift.shape != (b, d) or shift.dtype != h.dtype:   # (a temb of another dtype: diffusers promotes the rows)
            return super().forward(*args)
        h2 = h.reshape(b * t, d)
        if joins:
            cat = torch.cat([h, skip], dim=-1)
            t_skip, s_skip = folded_affine(self.skip_norm, *(torch.zeros(1, 2 * d, device=h.device),) * 2)
            h2, = _project((self.skip_linear,), cat.reshape(b * t, 2 * d), lambda: self.skip_norm(cat),
                           ln_eps=self.skip_norm.eps, shift=t_skip, scale=s_skip)
            h = h2.view(b, t, d)
        h2 = h2.contiguous()
        zero = torch.zeros(1, d, device=h.device)

        # 1. self-attention: LN_1 + shift in the quantization kernel, the residual in to_out's epilogue
        t1, s1 = folded_affine(n1.norm, shift, zero)
        q, k, v = _project((a1.to_q, a1.to_k, a1.to_v), h2, lambda: n1.norm(h) + shift.unsqueeze(1),
                           ln_eps=n1.norm.eps, shift=t1, scale=s1.expand(b, d).contiguous())
        h2 = _gated_out(a1.to_out[0], _sdpa(a1, q, k, v, b, image_rotary_emb), h2, b)

        # 2. cross-attention: LN_2 in to_q's quantization, the text rows as they are in to_k's and to_v's
        h = h2.view(b, t, d)
        t2, s2 = folded_affine(self.norm2, zero, zero)
        q, = _project((a2.to_q,), h2, lambda: self.norm2(h), ln_eps=self.norm2.eps, shift=t2, scale=s2)
        k, v = _project((a2.to_k, a2.to_v), c.reshape(-1, c.shape[-1]).contiguous(), lambda: c)
        h2 = _gated_out(a2.to_out[0], _sdpa(a2, q, k, v, b, image_rotary_emb), h2, b)

        # 3. feed-forward: LN_3 in fc1's quantization, the residual ungated (a gate of ones: exact) in fc2's epilogue
        t3, s3 = folded_affine(self.norm3, zero, zero)
        ones = torch.ones(1, d, device=h.device)
        m32 = torch.stack([zero, zero, zero, t3, s3, ones])
        mod = torch.stack([zero, zero, zero, zero, zero, ones], dim=1).to(h.dtype)   # (diffusers' LN_3 has its affine)
        return _ff(self.ff, self.norm3, h2, b, mod, m32).view(b, t, d)


def fuse_hunyuandit_blocks(model: nn.Module) -> int:
    """Swap every Hunyuan-DiT block of ``model`` that :class:`FusedHunyuanDiTBlock` handles and that has a packed
    linear with quantized activations to fuse; returns how many were swapped."""
    return swap_blocks(model, lambda m: FusedHunyuanDiTBlock if _supported(m) else None, _linears)


register_block(FusedHunyuanDiTBlock, 0)   # returns hidden_states alone, as the original
