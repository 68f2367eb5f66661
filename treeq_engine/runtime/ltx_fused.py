"""Fused LTX-Video blocks for packed inference: the fusions of :mod:`.diffusers_fused` for diffusers'
``LTXVideoTransformerBlock``.

The block's modulation is its own table plus the timestep projection every block shares,
``mod = scale_shift_table + temb`` (six vectors per sample, in the model's dtype; per token where the pipeline
passes a timestep per token: image to video, the conditioning frame's at 0); ``RMS`` is an RMSNorm without affine:

    q, k, v = to_q/k/v ← Q(mod(RMS(h), shift_msa, scale_msa))
    h = h + gate_msa · to_out(attention(RMSNorm(q), RMSNorm(k), v, rotary))               (attn1: self-attention)
    h = h + attn2(h, context, mask)                                                      (cross-attention, no norm)
    h = h + gate_mlp · ff.net[2](Q(GELU_tanh(ff.net[0].proj(Q(mod(RMS(h), shift_mlp, scale_mlp))))))

Where a linear is a :class:`TreeQLinear` with quantized activations, RMSNorm + modulate + quantization run in its
``quantize_input`` kernel (the kernel's RMSNorm mode; one call shared by to_q/to_k/to_v with one activation spec
and no Monarch branch), GELU(tanh) and ``ff.net[2]``'s codes in ``ff.net[0].proj``'s epilogue, and the gated
residuals in ``to_out[0]``'s and ``ff.net[2]``'s. A per-token modulation reaches the kernels as one group per run of
rows it repeats (``per_token_modulation``: a latent frame's tokens share their timestep, so ``(6, B·F, D)`` float32,
filled chunk by chunk, per block while it runs; the float paths compute their chunks from ``temb`` when asked).
The self-attention is ``LTXVideoAttnProcessor``'s computation
(RMSNorm across heads on q and k, LTX's rotary embedding, ``dispatch_attention_fn`` with the processor's backend).
The cross-attention runs as diffusers' module (its packed linears each quantize their own input): its keys and
values read the text. Fused and unfused agree to the model dtype's rounding (the kernels compute the norm and
modulate in float32 and add the gated residual in float32, where diffusers rounds each step to the model dtype),
not bit for bit.

A block is swapped only in the structure diffusers builds (RMSNorms without affine before the self-attention and
the feed-forward, ``LTXAttention`` with ``LTXVideoAttnProcessor`` on unfused projections, a ``FeedForward`` of
[GELU(tanh), Dropout, linear]) with a packed linear with quantized activations to fuse. It runs diffusers' own
forward in training mode, for a ``temb`` of another shape than ``(B, 1, 6·D)`` or ``(B, S, 6·D)``, when a norm or
the self-attention carries a hook or another processor; a
feed-forward, ``to_out[0]`` or ``ff.net[0].proj`` that is hooked or not packed runs as diffusers computes it.
diffusers' block-level hooks (FirstBlockCache, MagCache) find the fused class in ``TransformerBlockRegistry`` under
the original's entry. The state dict is unchanged.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.normalization import RMSNorm
from diffusers.models.transformers.transformer_ltx import (LTXAttention, LTXVideoAttnProcessor,
                                                           LTXVideoTransformerBlock, apply_rotary_emb)

from .diffusers_fused import (_adopt, _feed_forward, _ff, _forward_wrapped, _gated_out, _hooked,
                              _project, Modulation, dispatch_kwargs, kernel_modulation, like_rows, modulation_chunk,
                              per_token_modulation, register_block, self_attention_ok, swap_blocks)
from .linear import runs_packed_kernels as _quantized


def _plain_rms_norm(norm: Any, dim: int) -> bool:
    """An RMSNorm without affine over the last dim (what the quantization kernel's RMSNorm mode computes)."""
    return (type(norm) is RMSNorm and norm.weight is None and norm.bias is None
            and tuple(norm.dim) == (dim,) and norm.eps > 0)   # (the kernel takes a positive epsilon)


def _self_attention_ok(attn: Any) -> bool:
    return self_attention_ok(attn, LTXAttention, LTXVideoAttnProcessor)


def _ltx_supported(block: nn.Module) -> bool:
    if type(block) is not LTXVideoTransformerBlock or _forward_wrapped(block):
        return False
    table = getattr(block, "scale_shift_table", None)
    if not isinstance(table, torch.Tensor) or table.dim() != 2 or table.shape[0] != 6:
        return False
    d = table.shape[-1]
    return (_plain_rms_norm(block.norm1, d) and _plain_rms_norm(block.norm2, d) and type(block.attn1) is LTXAttention
            and _feed_forward(block.ff, d) and block.ff.net[0].approximate == "tanh")


def _linears(block: nn.Module) -> list[nn.Module]:
    a = block.attn1
    return [a.to_q, a.to_k, a.to_v, a.to_out[0], block.ff.net[0].proj, block.ff.net[2]]


def _self_attention(attn: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, b: int, rotary: Any) -> torch.Tensor:
    """``LTXVideoAttnProcessor``'s self-attention of (B·S, inner) projection rows, as (B, S, inner)."""
    query, key, value = (t.view(b, -1, t.shape[-1]) for t in (q, k, v))
    query, key = attn.norm_q(query), attn.norm_k(key)
    if rotary is not None:
        query, key = apply_rotary_emb(query, rotary), apply_rotary_emb(key, rotary)
    query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))
    o = dispatch_attention_fn(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                              **dispatch_kwargs(attn.processor))
    return o.flatten(2, 3).to(query.dtype)


class FusedLTXVideoTransformerBlock(LTXVideoTransformerBlock):
    """An ``LTXVideoTransformerBlock`` running the fused packed kernels (module docstring)."""

    def __init__(self, block: LTXVideoTransformerBlock) -> None:
        if not _ltx_supported(block):
            raise ValueError("FusedLTXVideoTransformerBlock handles LTXVideoTransformerBlock in the structure "
                             "diffusers builds")
        _adopt(self, block)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, temb: torch.Tensor,
                image_rotary_emb: Any = None, encoder_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        args = (hidden_states, encoder_hidden_states, temb, image_rotary_emb, encoder_attention_mask)
        a1 = self.attn1
        if (self.training or hidden_states.ndim != 3 or temb.ndim != 3
                or not like_rows(hidden_states, temb, batch=False) or _hooked(self.norm1) or _hooked(self.norm2)
                or not _self_attention_ok(a1)):
            return super().forward(*args)
        h = hidden_states
        b, s, d = h.shape
        table = self.scale_shift_table.to(temb.device)
        mod: Modulation
        if tuple(temb.shape) == (b, 1, 6 * d):
            mod = table[None] + temb.reshape(b, 6, d)          # (B, 6, D), as diffusers adds them
            m32 = kernel_modulation(mod)                       # (6, B, D) float32: a group per sample
        elif tuple(temb.shape) == (b, s, 6 * d):   # a timestep per token (image to video: the first frame's at 0)
            t4 = temb.reshape(b, s, 6, d)

            def chunk(i: int) -> torch.Tensor:   # chunk i of diffusers' table[None, None] + temb: (B, S, D)
                return table[i] + t4[:, :, i]

            mod, m32 = chunk, per_token_modulation(chunk, b * s, runs_of=temb)   # (6, G, D): a group per latent frame
        else:
            return super().forward(*args)
        h2 = h.reshape(b * s, d).contiguous()
        q, k, v = _project((a1.to_q, a1.to_k, a1.to_v), h2,
                           lambda: self.norm1(h) * (1 + modulation_chunk(mod, 1)) + modulation_chunk(mod, 0),
                           ln_eps=self.norm1.eps, shift=m32[0], scale=m32[1], rms_norm=True)
        o = _self_attention(a1, q, k, v, b, image_rotary_emb)
        proj = a1.to_out[0]
        if _quantized(proj):   # (not hooked: _self_attention_ok)
            h = _gated_out(proj, o, h2, b, m32[2]).view(b, s, d)
        else:
            h = h + a1.to_out[1](proj(o)) * modulation_chunk(mod, 2)
        h = h + self.attn2(h, encoder_hidden_states=encoder_hidden_states, image_rotary_emb=None,
                           attention_mask=encoder_attention_mask)
        if _quantized(self.ff.net[0].proj):   # (_ff runs a hooked or unpacked part as diffusers computes it)
            return _ff(self.ff, self.norm2, h.reshape(b * s, d).contiguous(), b, mod, m32,
                       rms_norm=True).view(b, s, d)
        x = self.norm2(h) * (1 + modulation_chunk(mod, 4)) + modulation_chunk(mod, 3)
        return h + self.ff(x) * modulation_chunk(mod, 5)


def fuse_ltx_blocks(model: nn.Module) -> int:
    """Swap every LTX-Video block of ``model`` that the fused class handles and that has a packed linear with
    quantized activations to fuse; returns how many were swapped."""
    return swap_blocks(model, lambda m: FusedLTXVideoTransformerBlock if _ltx_supported(m) else None, _linears)


register_block(FusedLTXVideoTransformerBlock, 0)   # (returns hidden_states alone, as the original)
