"""Fused Z-Image blocks for packed inference: the fusions of :mod:`.diffusers_fused` for diffusers'
``ZImageTransformerBlock`` (Z-Image and Z-Image-Turbo: the main blocks and the noise and context refiners).

The block, with RMSNorms carrying a weight ``w`` and a modulation ``(scale, gate)`` per sample (the context
refiner has none: scale 0, gate 1, no tanh):

    q, k, v = to_q/k/v ← Q(RMS(h)·w₁·(1 + scale_msa))
    h = h + tanh(gate_msa) · RMSNorm₂(to_out(attention(RMSNorm(q), RMSNorm(k), v, rotary, mask)))
    a, b = w1/w3 ← Q(RMS(h)·w₃·(1 + scale_mlp))
    h = h + tanh(gate_mlp) · RMSNorm₄(w2(SiLU(a) ⊙ b))

Where a linear is a :class:`TreeQLinear` with quantized activations, the RMSNorm, its weight, the modulation and
the quantization run in its ``quantize_input`` kernel: the kernel's RMSNorm without affine, then ``x̂·(1 + k)``
with ``k = w·(1 + scale) − 1`` (the norm's weight and the modulation make one per-feature factor per sample). One
such call serves to_q/to_k/to_v, one w1/w3 (per activation spec, without a Monarch branch: a branch's stage 1 needs
the layer's own call). What stays in torch: the attention (``ZSingleStreamAttnProcessor``'s computation: RMSNorm
on q and k per head, the complex rotary embedding, ``dispatch_attention_fn`` with the processor's backend and the
batch's padding mask), SiLU ⊙, and the gated residuals: the sandwich RMSNorms after to_out and w2 need whole output
rows, which no GEMM tile owns. to_out and w2 run as modules (a packed one quantizes its own input). Fused and
unfused agree to float rounding, not bit for bit: the kernel multiplies x̂ by ``w·(1 + scale)`` where diffusers
multiplies by ``w``, then by ``1 + scale`` (and rounds to the model dtype in between).

A block is swapped only in the structure diffusers builds (RMSNorms with a weight and no bias before the attention
and the feed-forward, the SwiGLU feed-forward, an ``Attention`` with ``ZSingleStreamAttnProcessor``) with a packed
linear with quantized activations to fuse. It runs diffusers' own forward in training mode, for Z-Image Omni's
per-token modulation (``noise_mask``), on other input ranks, and when a norm the kernel computes or the attention
carries a hook or another processor; a feed-forward that is hooked (or one of w1/w3 that is hooked and packed)
runs as a module. diffusers' block-level hooks (FirstBlockCache, MagCache) find the fused class in
``TransformerBlockRegistry`` under the original's entry. The state dict is unchanged.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.attention_processor import Attention
from diffusers.models.transformers.transformer_z_image import (FeedForward, ZImageTransformerBlock,
                                                               ZSingleStreamAttnProcessor)

from .diffusers_fused import (_adopt, _forward_wrapped, _hooked, _project, dispatch_kwargs, like_rows,
                              register_block, rms_factor, runs_processor, sandwich_swiglu, swap_blocks,
                              weighted_rms_norm)


def _zimage_supported(block: nn.Module) -> bool:
    if type(block) is not ZImageTransformerBlock or _forward_wrapped(block):
        return False
    d = block.dim
    attn, ff = block.attention, block.feed_forward
    if block.modulation:
        seq = block.adaLN_modulation
        if len(seq) != 1 or getattr(seq[0], "out_features", None) != 4 * d:
            return False
    return (weighted_rms_norm(block.attention_norm1, d) and weighted_rms_norm(block.ffn_norm1, d)
            and type(attn) is Attention and attn.to_q is not None and attn.to_k is not None
            and attn.to_v is not None and type(ff) is FeedForward
            and getattr(ff.w1, "in_features", None) == d and getattr(ff.w3, "in_features", None) == d)


def _linears(block: nn.Module) -> list[nn.Module]:
    a, ff = block.attention, block.feed_forward
    return [a.to_q, a.to_k, a.to_v, ff.w1, ff.w3]


def _rotate(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Z-Image's rotary embedding of (B, S, heads, head_dim) rows: adjacent pairs as complex numbers times
    ``freqs_cis (B, S, head_dim / 2)``, in float32 (the processor's ``apply_rotary_emb``)."""
    with torch.amp.autocast("cuda", enabled=False):
        xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(xc * freqs_cis.unsqueeze(2)).flatten(3).type_as(x)


def _attention(attn: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, b: int, mask: torch.Tensor | None,
               freqs_cis: torch.Tensor | None) -> torch.Tensor:
    """``ZSingleStreamAttnProcessor``'s attention of (B·S, inner) projection rows, then to_out: (B, S, D)."""
    query, key, value = (t.view(b, -1, attn.heads, t.shape[-1] // attn.heads) for t in (q, k, v))
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    if freqs_cis is not None:
        query, key = _rotate(query, freqs_cis), _rotate(key, freqs_cis)
    dtype = query.dtype
    key = key.to(dtype)
    if mask is not None and mask.ndim == 2:
        mask = mask[:, None, None, :]
    o = dispatch_attention_fn(query, key, value, attn_mask=mask, dropout_p=0.0, is_causal=False,
                              **dispatch_kwargs(attn.processor))
    out = attn.to_out[0](o.flatten(2, 3).to(dtype))
    return attn.to_out[1](out) if len(attn.to_out) > 1 else out


class FusedZImageTransformerBlock(ZImageTransformerBlock):
    """A ``ZImageTransformerBlock`` running the fused packed kernels (module docstring)."""

    def __init__(self, block: ZImageTransformerBlock) -> None:
        if not _zimage_supported(block):
            raise ValueError("FusedZImageTransformerBlock handles ZImageTransformerBlock in the structure diffusers "
                             "builds")
        _adopt(self, block)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor, freqs_cis: torch.Tensor,
                adaln_input: torch.Tensor | None = None, noise_mask: torch.Tensor | None = None,
                adaln_noisy: torch.Tensor | None = None, adaln_clean: torch.Tensor | None = None) -> torch.Tensor:
        # diffusers' forward, with Omni's arguments only where given (before 0.37 it takes none of them)
        omni = {k: v for k, v in (("noise_mask", noise_mask), ("adaln_noisy", adaln_noisy),
                                  ("adaln_clean", adaln_clean)) if v is not None}
        args = (x, attn_mask, freqs_cis, adaln_input)
        n1, n3 = self.attention_norm1, self.ffn_norm1
        if (self.training or noise_mask is not None or x.ndim != 3 or (self.modulation and adaln_input is None)
                or not like_rows(x, adaln_input, dtype=False) or _hooked(n1) or _hooked(n3)
                or not runs_processor(self.attention, (ZSingleStreamAttnProcessor,))):
            return super().forward(*args, **omni)
        b, s, d = x.shape
        scale_msa = gate_msa = scale_mlp = gate_mlp = None
        if self.modulation:
            mod = self.adaLN_modulation(adaln_input)
            scale_msa, gate_msa, scale_mlp, gate_mlp = mod.unsqueeze(1).chunk(4, dim=2)
            gate_msa, gate_mlp = gate_msa.tanh(), gate_mlp.tanh()
            scale_msa, scale_mlp = 1.0 + scale_msa, 1.0 + scale_mlp
            if scale_msa.shape != (b, 1, d):
                return super().forward(*args, **omni)
        x2 = x.reshape(b * s, d).contiguous()   # (a strided batch-1 view reshapes to a view: the kernels need rows)
        a = self.attention

        def msa_rows() -> torch.Tensor:
            return n1(x) if scale_msa is None else n1(x) * scale_msa

        shift, k = rms_factor(n1, scale_msa, b, d)
        q, kk, v = _project((a.to_q, a.to_k, a.to_v), x2, msa_rows, ln_eps=n1.eps, shift=shift, scale=k,
                            rms_norm=True)
        attn_out = _attention(a, q, kk, v, b, attn_mask, freqs_cis)
        y = self.attention_norm2(attn_out)
        x = x + (y if gate_msa is None else gate_msa * y)

        ff = self.feed_forward
        return sandwich_swiglu(x, n3, self.ffn_norm2, ff, (ff.w1, ff.w3, ff.w2), F.silu, scale_mlp, gate_mlp)


def fuse_zimage_blocks(model: nn.Module) -> int:
    """Swap every Z-Image block of ``model`` that the fused class handles and that has a packed linear with
    quantized activations to fuse; returns how many were swapped."""
    return swap_blocks(model, lambda m: FusedZImageTransformerBlock if _zimage_supported(m) else None, _linears)


register_block(FusedZImageTransformerBlock, 0)   # (returns hidden states alone, as the original)
