"""Fused Lumina2 blocks for packed inference: the fusions of :mod:`.diffusers_fused` for diffusers'
``Lumina2TransformerBlock`` (Lumina-Image 2.0: the main blocks, the noise refiner and the context refiner).

The block is Z-Image's (:mod:`.zimage_fused`), with RMSNorms carrying a weight ``w`` and a modulation ``(scale,
gate)`` per sample from ``LuminaRMSNormZero`` (the context refiner has none: scale 0, gate 1, no tanh):

    q, k, v = to_q/k/v ← Q(RMS(h)·w₁·(1 + scale_msa))
    h = h + tanh(gate_msa) · RMSNorm₂(to_out(attention(RMSNorm(q), RMSNorm(k), v, rotary, mask)))
    a, b = linear_1/linear_3 ← Q(RMS(h)·w₃·(1 + scale_mlp))
    h = h + tanh(gate_mlp) · RMSNorm₄(linear_2(SiLU(a) ⊙ b))

Where a linear is a :class:`TreeQLinear` with quantized activations, the RMSNorm, its weight, the modulation and
the quantization run in its ``quantize_input`` kernel (the kernel's RMSNorm, then ``x̂·(1 + k)`` with ``k =
w·(1 + scale) − 1``): one call shared by to_q/to_k/to_v, one by linear_1/linear_3 (per activation spec, without a
Monarch branch). What stays in torch: the attention (``Lumina2AttnProcessor2_0``'s computation: grouped-query heads,
RMSNorm on q and k per head, the complex rotary embedding, SDPA with the processor's scale and the batch's mask),
SiLU (in float32, ``FP32SiLU``) ⊙, and the gated residuals (the sandwich RMSNorms after to_out and linear_2 need
whole output rows, which no GEMM tile owns); to_out and linear_2 run as modules (a packed one quantizes its own
input). Fused and unfused agree to the model dtype's rounding, not bit for bit: the kernel multiplies x̂ by ``w·(1 +
scale)`` in float32 where diffusers multiplies by ``w``, then by ``1 + scale``, in the model dtype. So in float32 a
value within an ulp of a rounding boundary may take the next code, and later layers move with it (measured on a tiny
model: one 8-bit code of 2 400 flips, the output moves by 1.9e-3 relative).

A block is swapped only in the structure diffusers builds (RMSNorms with a weight and no bias before the attention
and the feed-forward, ``LuminaFeedForward``, an ``Attention`` with ``Lumina2AttnProcessor2_0``) with a packed linear
with quantized activations to fuse. It runs diffusers' own forward in training mode, on other input ranks or
timestep shapes, and when a norm the kernel computes or the attention carries a hook or another processor; a
feed-forward that is hooked (or one of linear_1/linear_3 that is hooked and packed) runs as a module. diffusers'
block registry has no entry for the original, nor for the fused class. The state dict is unchanged.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.models.attention import LuminaFeedForward
from diffusers.models.attention_processor import Attention
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.normalization import LuminaRMSNormZero
from diffusers.models.transformers.transformer_lumina2 import Lumina2AttnProcessor2_0, Lumina2TransformerBlock

from .diffusers_fused import (_adopt, _forward_wrapped, _hooked, _project, rms_factor, runs_processor,
                              sandwich_swiglu, swap_blocks, weighted_rms_norm)


def _supported(block: nn.Module) -> bool:
    if type(block) is not Lumina2TransformerBlock or _forward_wrapped(block):
        return False
    attn, ff, n1 = block.attn, block.feed_forward, block.norm1
    d = getattr(attn.to_q, "in_features", None) if type(attn) is Attention else None
    if d is None or attn.to_k is None or attn.to_v is None:
        return False
    if block.modulation:
        norm_ok = (type(n1) is LuminaRMSNormZero and weighted_rms_norm(n1.norm, d)
                   and getattr(n1.linear, "out_features", None) == 4 * d)
    else:
        norm_ok = weighted_rms_norm(n1, d)
    return (norm_ok and weighted_rms_norm(block.ffn_norm1, d) and type(ff) is LuminaFeedForward
            and getattr(ff.linear_1, "in_features", None) == d and getattr(ff.linear_3, "in_features", None) == d)


def _linears(block: nn.Module) -> list[nn.Module]:
    a, ff = block.attn, block.feed_forward
    return [a.to_q, a.to_k, a.to_v, ff.linear_1, ff.linear_3]


def _attention(attn: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, b: int, mask: torch.Tensor | None,
               rotary: torch.Tensor | None) -> torch.Tensor:
    """``Lumina2AttnProcessor2_0``'s attention of (B·S, ·) projection rows, then to_out: (B, S, D)."""
    head_dim = q.shape[-1] // attn.heads
    dtype = q.dtype
    query = q.view(b, -1, attn.heads, head_dim)
    key, value = (t.view(b, -1, t.shape[-1] // head_dim, head_dim) for t in (k, v))
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    if rotary is not None:
        query = apply_rotary_emb(query, rotary, use_real=False)
        key = apply_rotary_emb(key, rotary, use_real=False)
    query, key = query.to(dtype), key.to(dtype)
    n_rep = attn.heads // key.shape[2]
    if n_rep >= 1:
        key = key.unsqueeze(3).repeat(1, 1, 1, n_rep, 1).flatten(2, 3)
        value = value.unsqueeze(3).repeat(1, 1, 1, n_rep, 1).flatten(2, 3)
    if mask is not None:
        mask = mask.bool().view(b, 1, 1, -1)
    o = F.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                       attn_mask=mask, scale=attn.scale)
    o = o.transpose(1, 2).reshape(b, -1, attn.heads * head_dim).type_as(query)
    return attn.to_out[1](attn.to_out[0](o))


class FusedLumina2TransformerBlock(Lumina2TransformerBlock):
    """A ``Lumina2TransformerBlock`` running the fused packed kernels (module docstring)."""

    def __init__(self, block: Lumina2TransformerBlock) -> None:
        if not _supported(block):
            raise ValueError("FusedLumina2TransformerBlock handles Lumina2TransformerBlock in the structure "
                             "diffusers builds")
        _adopt(self, block)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor, image_rotary_emb: torch.Tensor,
                temb: torch.Tensor | None = None) -> torch.Tensor:
        args = (hidden_states, attention_mask, image_rotary_emb, temb)
        x, n1, n3 = hidden_states, self.norm1, self.ffn_norm1
        rms1 = n1.norm if self.modulation else n1
        per_sample = temb is not None and temb.ndim == 2 and temb.shape[0] == x.shape[0]
        if (self.training or x.ndim != 3 or (self.modulation and not per_sample)
                or any(_hooked(n) for n in (n1, rms1, n3)) or not runs_processor(self.attn, (Lumina2AttnProcessor2_0,))):
            return super().forward(*args)
        b, s, d = x.shape
        scale_msa = gate_msa = scale_mlp = gate_mlp = None
        if self.modulation:
            scale_msa, gate_msa, scale_mlp, gate_mlp = n1.linear(n1.silu(temb)).unsqueeze(1).chunk(4, dim=2)
            gate_msa, gate_mlp = gate_msa.tanh(), gate_mlp.tanh()
            scale_msa, scale_mlp = 1 + scale_msa, 1 + scale_mlp
            if scale_msa.shape != (b, 1, d):
                return super().forward(*args)
        x2 = x.reshape(b * s, d).contiguous()
        a = self.attn

        def msa_rows() -> torch.Tensor:
            return rms1(x) if scale_msa is None else rms1(x) * scale_msa

        shift, k = rms_factor(rms1, scale_msa, b, d)
        q, kk, v = _project((a.to_q, a.to_k, a.to_v), x2, msa_rows, ln_eps=rms1.eps, shift=shift, scale=k,
                            rms_norm=True)
        y = self.norm2(_attention(a, q, kk, v, b, attention_mask, image_rotary_emb))
        x = x + (y if gate_msa is None else gate_msa * y)

        ff = self.feed_forward
        return sandwich_swiglu(x, n3, self.ffn_norm2, ff, (ff.linear_1, ff.linear_3, ff.linear_2), ff.silu, scale_mlp,
                               gate_mlp)


def fuse_lumina2_blocks(model: nn.Module) -> int:
    """Swap every Lumina2 block of ``model`` that the fused class handles and that has a packed linear with
    quantized activations to fuse; returns how many were swapped."""
    return swap_blocks(model, lambda m: FusedLumina2TransformerBlock if _supported(m) else None, _linears)
