"""Fused CogView4 blocks for packed inference: the fusions of :mod:`.diffusers_fused` for diffusers'
``CogView4TransformerBlock`` (CogView4-6B, its Control variant), and for CogView3-Plus's block
(:class:`FusedCogView3PlusTransformerBlock`).

The text ``c`` and the image tokens ``h`` share every linear of the block, as in CogVideoX's: the processor projects
the joined rows [text; image], and one feed-forward serves both streams. ``CogView4AdaLayerNormZero`` gives each
stream its own six vectors from one linear of ``temb`` (its twelve chunks interleave the streams: shift_msa,
c_shift_msa, scale_msa, ...), around LayerNorms without affine:

    n_h = LN(h) · (1 + scale_msa) + shift_msa,   n_c = LN_c(c) · (1 + c_scale_msa) + c_shift_msa      (norm1)
    q, k, v = to_q/k/v ← Q(n_c), Q(n_h)            (the same projections, run per stream with its own modulation)
    o_c, o_h = attention(LN_q(q), LN_k(k), v, mask)   (text first; the rotary embedding on the image rows only)
    h = h + gate_msa · to_out(o_h),   c = c + c_gate_msa · to_out(o_c)
    h = h + gate_mlp · ff(Q(mod(norm2(h)))),   c = c + c_gate_mlp · ff(Q(mod(norm2_context(c))))   (GELU(tanh))

Where a linear is a :class:`TreeQLinear` with quantized activations, LayerNorm + modulate + quantization run in its
``quantize_input`` kernel (one call per stream shared by to_q/to_k/to_v with one activation spec and no Monarch
branch), GELU(tanh) and ``ff.net[2]``'s codes in ``ff.net[0].proj``'s epilogue, the gated residuals in
``to_out[0]``'s and ``ff.net[2]``'s; each stream's rows run their own GEMMs (per-token activation codes: the same
codes as the joined rows'). The attention is ``CogView4AttnProcessor``'s computation, its text mask included (the
processor turns the ``(B, text)`` mask into a 0/1 float matrix that SDPA adds to the scores: a padded token is not
hidden, its scores just lack the +1; computed the same way here). Fused and unfused agree to the model dtype's
rounding (the kernels normalize, modulate and add the residuals in float32, where diffusers rounds each step to the
model dtype), not bit for bit.

A block is swapped only in the structure diffusers builds (``CogView4AdaLayerNormZero`` and the feed-forward's
LayerNorms without affine over the block's width, ``CogView4AttnProcessor`` on unfused projections with LayerNorm
or no q/k norms, a ``FeedForward`` of [GELU(tanh), Dropout, linear]) with a packed linear with quantized activations
to fuse. It runs diffusers' own forward in training mode, with ``attention_kwargs``, without text, with a rotary
table per sample (a list), a mask that is not ``(B, text)``, for a ``temb`` or a text whose batch or dtype is not
the latents' (diffusers broadcasts and promotes), when a norm or the attention carries a hook or another processor
(``CogView4TrainingAttnProcessor`` too), and when a projection carries one other than diffusers' layerwise casting
(``hooked_beyond_casting``): the fused path calls those once per stream, where the processor calls them once on the
joined rows. The feed-forward diffusers too calls once per stream: a hook on it or a part of it runs that part as the
module. The adaLN linear runs as the module. diffusers' block-level hooks
(FirstBlockCache, MagCache) find the fused class in ``TransformerBlockRegistry`` under the original's entry. The
state dict is unchanged.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0
from diffusers.models.normalization import CogView3PlusAdaLayerNormZeroTextImage
from diffusers.models.transformers.transformer_cogview3plus import CogView3PlusTransformerBlock

try:   # (GLM-Image's block: absent from older releases)
    from diffusers.models.transformers.transformer_glm_image import (GlmImageAdaLayerNormZero, GlmImageAttnProcessor,
                                                                     GlmImageTransformerBlock)
except ImportError:
    GlmImageTransformerBlock = None
from diffusers.models.transformers.transformer_cogview4 import (CogView4AdaLayerNormZero, CogView4AttnProcessor,
                                                                CogView4TransformerBlock)

from .cogvideox_fused import _attention as _cogvideox_attention
from .diffusers_fused import (_adopt, _feed_forward, _ff, _forward_wrapped, _gated_out, _hooked, _plain_layer_norm,
                              _project, HandedAttention, hooked_beyond_casting, kernel_modulation, kernel_projections,
                              like_rows, plain_attention, register_block, runs_processor, self_attention_ok,
                              swap_blocks)


def _two_streams(block: Any, kind: Any, adaln: Any, norms: tuple[str, str]) -> bool:
    """``block`` is of ``kind`` in the structure diffusers builds: an ``adaln`` of two LayerNorms without affine
    (``norms``: the image's, the text's) and a linear, LayerNorms without affine before the feed-forward, a
    ``FeedForward`` of [GELU, Dropout, linear], a self-attention with LayerNorm or no q/k norms."""
    if kind is None or type(block) is not kind or _forward_wrapped(block):
        return False
    n1, attn = block.norm1, block.attn1
    d = block.norm2.normalized_shape[0] if isinstance(block.norm2, nn.LayerNorm) else None
    return (d is not None and type(n1) is adaln and all(_plain_layer_norm(getattr(n1, n), d) for n in norms)
            and isinstance(n1.linear, nn.Module) and _plain_layer_norm(block.norm2, d)
            and _plain_layer_norm(block.norm2_context, d) and _feed_forward(block.ff, d)
            and plain_attention(attn, cross=False)
            and all(n is None or type(n) is nn.LayerNorm for n in (attn.norm_q, attn.norm_k)))


def _supported(block: nn.Module) -> bool:
    return _two_streams(block, CogView4TransformerBlock, CogView4AdaLayerNormZero, ("norm", "norm_context"))


def _interleaved(norm: Any, temb: torch.Tensor, b: int, d: int) -> tuple[tuple[torch.Tensor, torch.Tensor], ...] | None:
    """Each stream's six vectors from one linear of ``temb`` whose twelve chunks interleave the streams (shift_msa,
    c_shift_msa, scale_msa, ...: CogView4's and GLM-Image's adaLN), as diffusers uses them, (B, 6, D) in DiT's order,
    and as the kernels take them: ((image's), (text's)); None for another shape."""
    mod = norm.linear(temb)
    if mod.shape != (b, 12 * d):
        return None
    mod = mod.view(b, 12, d)
    return tuple((m, kernel_modulation(m)) for m in (mod[:, 0::2], mod[:, 1::2]))


def _linears(block: nn.Module) -> list[nn.Module]:
    a = block.attn1
    return [a.to_q, a.to_k, a.to_v, a.to_out[0], block.ff.net[0].proj, block.ff.net[2]]


def _attention(attn: Any, text: list[torch.Tensor], image: list[torch.Tensor], b: int, rotary: Any,
               mask: torch.Tensor | None, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``CogView4AttnProcessor``'s attention of the text's and the image's (B·S, inner) q, k, v rows (``dtype``: the
    text's, which the processor casts the q/k norms' outputs to): the outputs before ``to_out``, (B, S_text, inner)
    and (B, S, inner)."""
    def heads(t: torch.Tensor) -> torch.Tensor:
        return t.view(b, -1, t.shape[-1]).unflatten(2, (attn.heads, -1)).transpose(1, 2)

    query, key, value = (torch.cat([heads(c), heads(h)], dim=2) for c, h in zip(text, image))
    if attn.norm_q is not None:
        query = attn.norm_q(query).to(dtype=dtype)
    if attn.norm_k is not None:
        key = attn.norm_k(key).to(dtype=dtype)
    s = text[0].shape[0] // b
    if rotary is not None:
        query = torch.cat([query[:, :, :s], apply_rotary_emb(query[:, :, s:], rotary, use_real_unbind_dim=-2)], 2)
        key = torch.cat([key[:, :, :s], apply_rotary_emb(key[:, :, s:], rotary, use_real_unbind_dim=-2)], 2)
    if mask is not None:   # (the processor's: a 0/1 float matrix SDPA adds to the scores)
        joined = torch.ones((b, query.shape[2]), device=query.device)
        joined[:, :s] = mask.float().to(query.device)
        joined = joined.unsqueeze(2)
        mask = ((joined @ joined.transpose(1, 2)) > 0).unsqueeze(1).to(query.dtype)
    o = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=0.0, is_causal=False)
    o = o.transpose(1, 2).flatten(2, 3).type_as(query)
    return o[:, :s], o[:, s:]


class FusedCogView4TransformerBlock(CogView4TransformerBlock):
    """A ``CogView4TransformerBlock`` running the fused packed kernels (module docstring)."""

    def __init__(self, block: CogView4TransformerBlock) -> None:
        if not _supported(block):
            raise ValueError("FusedCogView4TransformerBlock handles CogView4TransformerBlock in the structure "
                             "diffusers builds")
        _adopt(self, block)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                temb: torch.Tensor | None = None, image_rotary_emb: Any = None, attention_mask: Any = None,
                attention_kwargs: dict[str, Any] | None = None) -> Any:
        args = (hidden_states, encoder_hidden_states, temb, image_rotary_emb, attention_mask, attention_kwargs)
        h, c, n1, attn = hidden_states, encoder_hidden_states, self.norm1, self.attn1
        # (the processor runs the projections on the joined rows [text; image], the fused path per stream: a hook
        # there could tell, but for diffusers' layerwise casting; diffusers too runs the feed-forward per stream)
        norms = (n1, n1.norm, n1.norm_context, self.norm2, self.norm2_context)
        if (self.training or attention_kwargs or temb is None or h.ndim != 3 or c.ndim != 3 or not c.shape[1]
                or not like_rows(h, c, temb) or isinstance(image_rotary_emb, list)
                or not (attention_mask is None or (isinstance(attention_mask, torch.Tensor)
                                                   and tuple(attention_mask.shape) == tuple(c.shape[:2])))
                or any(_hooked(m) for m in norms) or any(hooked_beyond_casting(m) for m in _linears(self)[:4])
                or not self_attention_ok(attn, Attention, CogView4AttnProcessor)):
            return super().forward(*args)
        b, t, d = h.shape
        text = c.shape[1]
        streams = _interleaved(n1, temb, b, d)
        if streams is None:
            return super().forward(*args)
        (mod_h, m32_h), (mod_c, m32_c) = streams
        h2, c2 = h.reshape(b * t, d).contiguous(), c.reshape(b * text, d).contiguous()
        qkv = (attn.to_q, attn.to_k, attn.to_v)
        image = _project(qkv, h2, lambda: n1.norm(h).to(h.dtype) * (1 + mod_h[:, 1:2]) + mod_h[:, 0:1],
                         ln_eps=n1.norm.eps, shift=m32_h[0], scale=m32_h[1])
        words = _project(qkv, c2, lambda: n1.norm_context(c).to(c.dtype) * (1 + mod_c[:, 1:2]) + mod_c[:, 0:1],
                         ln_eps=n1.norm_context.eps, shift=m32_c[0], scale=m32_c[1])
        oc, oh = _attention(attn, words, image, b, image_rotary_emb, attention_mask, c.dtype)
        h2 = _gated_out(attn.to_out[0], oh, h2, b, m32_h[2], mod_h[:, 2:3])
        c2 = _gated_out(attn.to_out[0], oc, c2, b, m32_c[2], mod_c[:, 2:3])
        h2 = _ff(self.ff, self.norm2, h2, b, mod_h, m32_h)
        c2 = _ff(self.ff, self.norm2_context, c2, b, mod_c, m32_c)
        return h2.view(b, t, d), c2.view(b, text, d)


def _plus_supported(block: nn.Module) -> bool:
    return _two_streams(block, CogView3PlusTransformerBlock, CogView3PlusAdaLayerNormZeroTextImage,
                        ("norm_x", "norm_c"))


class FusedCogView3PlusTransformerBlock(CogView3PlusTransformerBlock):
    """A ``CogView3PlusTransformerBlock`` (CogView3-Plus-3B) running the fused packed kernels: CogView4's fusions
    (module docstring) with ``CogView3PlusAdaLayerNormZeroTextImage``'s twelve vectors (the image's six, then the
    text's) and ``CogVideoXAttnProcessor2_0``'s attention (no mask, no rotary embedding); in float16 each output
    clipped to the format's range after its residual, as diffusers clips it. It runs diffusers' forward in training
    mode, without text, for an ``emb`` whose batch or dtype is not the latents' (diffusers broadcasts and promotes),
    a text of another batch or dtype, when a norm or the attention carries a hook or another processor, and when a
    module diffusers runs on the joined rows (a projection, the feed-forward or a part of it) carries one other than
    diffusers' layerwise casting."""

    def __init__(self, block: CogView3PlusTransformerBlock) -> None:
        if not _plus_supported(block):
            raise ValueError("FusedCogView3PlusTransformerBlock handles CogView3PlusTransformerBlock in the structure "
                             "diffusers builds")
        _adopt(self, block)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        args = (hidden_states, encoder_hidden_states, emb)
        h, c, n1, attn = hidden_states, encoder_hidden_states, self.norm1, self.attn1
        # (diffusers runs the projections and the feed-forward on the joined rows [text; image], the fused path per
        # stream: a hook there could tell, but for diffusers' layerwise casting)
        norms = (n1, n1.norm_x, n1.norm_c, self.norm2, self.norm2_context)
        shared = (self.ff, *self.ff.net, *_linears(self))
        if (self.training or h.ndim != 3 or c.ndim != 3 or not c.shape[1] or emb.ndim != 2
                or not like_rows(h, c, emb) or any(_hooked(m) for m in norms)
                or any(hooked_beyond_casting(m) for m in shared)
                or not self_attention_ok(attn, Attention, CogVideoXAttnProcessor2_0)):
            return super().forward(*args)
        b, t, d = h.shape
        text = c.shape[1]
        mod = n1.linear(n1.silu(emb))
        if mod.shape != (b, 12 * d) or mod.dtype != h.dtype:
            return super().forward(*args)
        mod_h, mod_c = mod.view(b, 2, 6, d).unbind(1)   # (B, 6, D) each, DiT's layout: the image's, then the text's
        m32_h, m32_c = kernel_modulation(mod_h), kernel_modulation(mod_c)
        h2, c2 = h.reshape(b * t, d).contiguous(), c.reshape(b * text, d).contiguous()
        qkv = (attn.to_q, attn.to_k, attn.to_v)
        image = _project(qkv, h2, lambda: n1.norm_x(h) * (1 + mod_h[:, 1:2]) + mod_h[:, 0:1],
                         ln_eps=n1.norm_x.eps, shift=m32_h[0], scale=m32_h[1])
        words = _project(qkv, c2, lambda: n1.norm_c(c) * (1 + mod_c[:, 1:2]) + mod_c[:, 0:1],
                         ln_eps=n1.norm_c.eps, shift=m32_c[0], scale=m32_c[1])
        oc, oh = _cogvideox_attention(attn, tuple(words), tuple(image), b, None)
        h2 = _gated_out(attn.to_out[0], oh, h2, b, m32_h[2], mod_h[:, 2:3])
        c2 = _gated_out(attn.to_out[0], oc, c2, b, m32_c[2], mod_c[:, 2:3])
        h2 = _ff(self.ff, self.norm2, h2, b, mod_h, m32_h).view(b, t, d)
        c2 = _ff(self.ff, self.norm2_context, c2, b, mod_c, m32_c).view(b, text, d)
        if h.dtype == torch.float16:
            h2, c2 = h2.clip(-65504, 65504), c2.clip(-65504, 65504)
        return h2, c2


def _glm_supported(block: nn.Module) -> bool:
    return GlmImageTransformerBlock is not None and _two_streams(
        block, GlmImageTransformerBlock, GlmImageAdaLayerNormZero, ("norm", "norm_context"))


if GlmImageTransformerBlock is not None:
    class FusedGlmImageTransformerBlock(GlmImageTransformerBlock):
        """A ``GlmImageTransformerBlock`` (GLM-Image) running the fused packed kernels: CogView4's block (module
        docstring: the same interleaved twelve vectors, the same per-stream feed-forward), whose attention runs its own
        processor (``GlmImageAttnProcessor``: the joined rows' rotary embedding, text mask and KV cache, the output
        projection on the joined rows) on the kernels' projections (``HandedAttention``: each stream's LayerNorm +
        modulate + quantization in the projections' kernels); the attention's gated residuals are diffusers' sums. It
        runs diffusers' forward in training mode, with ``attention_kwargs``, without text, for a ``temb`` or a text of
        another batch or dtype, and when a norm or the attention carries a hook or another processor (a hooked
        projection the kernels run too); a hooked feed-forward, which diffusers too runs per stream, runs as the
        module."""

        def __init__(self, block: nn.Module) -> None:
            if not _glm_supported(block):
                raise ValueError("FusedGlmImageTransformerBlock handles GlmImageTransformerBlock in the structure "
                                 "diffusers builds")
            _adopt(self, block)

        def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                    temb: torch.Tensor | None = None, image_rotary_emb: Any = None, attention_mask: Any = None,
                    attention_kwargs: dict[str, Any] | None = None,
                    kv_cache: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
            args = (hidden_states, encoder_hidden_states, temb, image_rotary_emb, attention_mask, attention_kwargs,
                    kv_cache)
            h, c, n1, attn = hidden_states, encoder_hidden_states, self.norm1, self.attn1
            names = ("to_q", "to_k", "to_v")
            if (self.training or attention_kwargs or temb is None or h.ndim != 3 or c.ndim != 3 or not c.shape[1]
                    or not like_rows(h, c, temb) or temb.ndim != 2
                    or any(_hooked(m) for m in (n1, n1.norm, n1.norm_context, self.norm2, self.norm2_context))
                    or not runs_processor(attn, (GlmImageAttnProcessor,), names)):
                return super().forward(*args)
            b, t, d = h.shape
            text = c.shape[1]
            streams = _interleaved(n1, temb, b, d)
            if streams is None:
                return super().forward(*args)
            (mod_h, m32_h), (mod_c, m32_c) = streams

            def rows_h() -> torch.Tensor:
                return n1.norm(h).to(h.dtype) * (1 + mod_h[:, 1:2]) + mod_h[:, 0:1]

            def rows_c() -> torch.Tensor:
                return n1.norm_context(c).to(h.dtype) * (1 + mod_c[:, 1:2]) + mod_c[:, 0:1]

            image, hh = kernel_projections(attn, names, h, rows_h, ln_eps=n1.norm.eps, shift=m32_h[0],
                                           scale=m32_h[1])
            words, cc = kernel_projections(attn, names, c, rows_c, ln_eps=n1.norm_context.eps, shift=m32_c[0],
                                           scale=m32_c[1])
            # (the processor reads the rows only through the projections it still runs itself: 16-bit ones)
            handed = HandedAttention(attn, {n: torch.cat([words[n], image[n]], dim=1) for n in image})
            oh, oc = attn.processor(handed, hh, cc, attention_mask=attention_mask, image_rotary_emb=image_rotary_emb,
                                    kv_cache=kv_cache)
            h2 = (h + oh * mod_h[:, 2:3]).reshape(b * t, d)
            c2 = (c + oc * mod_c[:, 2:3]).reshape(b * text, d)
            h2 = _ff(self.ff, self.norm2, h2, b, mod_h, m32_h)
            c2 = _ff(self.ff, self.norm2_context, c2, b, mod_c, m32_c)
            return h2.view(b, t, d), c2.view(b, text, d)


def _fused_linears(block: nn.Module) -> list[nn.Module]:
    """The linears a fused block runs by its kernels: GLM-Image's processor runs the output projection itself."""
    if GlmImageTransformerBlock is not None and isinstance(block, GlmImageTransformerBlock):
        return [layer for layer in _linears(block) if layer is not block.attn1.to_out[0]]
    return _linears(block)


def fuse_cogview4_blocks(model: nn.Module) -> int:
    """Swap every CogView4, CogView3-Plus and GLM-Image block of ``model`` that the fused classes handle and that has
    a packed linear with quantized activations to fuse; returns how many were swapped."""
    return swap_blocks(model, lambda m: FusedCogView4TransformerBlock if _supported(m)
                       else FusedCogView3PlusTransformerBlock if _plus_supported(m)
                       else FusedGlmImageTransformerBlock if _glm_supported(m) else None, _fused_linears)


register_block(FusedCogView4TransformerBlock, 0, 1)   # returns (hidden_states, encoder_hidden_states), as the original
register_block(FusedCogView3PlusTransformerBlock, 0, 1)
if GlmImageTransformerBlock is not None:
    register_block(FusedGlmImageTransformerBlock, 0, 1)
