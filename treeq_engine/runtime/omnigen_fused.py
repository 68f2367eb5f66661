"""Fused OmniGen blocks for packed inference: the fusions of :mod:`.diffusers_fused` for diffusers' ``OmniGenBlock``
(OmniGen v1: a Phi-3 language model's decoder layer over [text; images; timestep; latents] tokens, no modulation):

    n = RMS(h)·w₁;   h = h + to_out(attention(to_q, to_k, to_v ← Q(n), mask, rotary))
    m = RMS(h)·w₂;   [g, u] = gate_up_proj ← Q(m);   h = h + down_proj(Q(u ⊙ SiLU(g)))

Where a linear is a :class:`TreeQLinear` with quantized activations, the RMSNorm and its weight run in its
``quantize_input`` kernel (the kernel's RMSNorm mode, ``x̂·(1 + k)`` with ``k = w − 1``; one call for to_q/to_k/to_v
with one activation spec and no Monarch branch, one for gate_up_proj) and the feed-forward's residual in down_proj's
epilogue; SiLU ⊙ runs between the kernels. The attention runs the block's own processor
(``OmniGenAttnProcessor2_0``: grouped-query heads, the rotary embedding, the model's mask, the output projection) on
the kernels' projections (``HandedAttention``); its residual is diffusers' sum. Fused and unfused agree to float
rounding, not bit for bit (the kernel normalizes and scales in float32 in one step).

A block is swapped only in the structure diffusers builds (RMSNorms with a weight of the block's width, an
``Attention`` running ``OmniGenAttnProcessor2_0``, ``OmniGenFeedForward``) with a packed linear with quantized
activations to fuse. It runs diffusers' own forward in training mode, on other input ranks, for norms whose weight
is in another dtype than the rows (diffusers' RMSNorm returns its weight's dtype), and when a norm or the
attention carries a hook or another processor (or a projection the kernels run does); a hooked feed-forward (or one
of its packed linears, or its activation) runs as the module. The state dict is unchanged.
"""
from __future__ import annotations


import torch
import torch.nn as nn
from diffusers.models.attention_processor import Attention
from diffusers.models.transformers.transformer_omnigen import (OmniGenAttnProcessor2_0, OmniGenBlock,
                                                               OmniGenFeedForward)

from .diffusers_fused import (_adopt, _bypassed_hook, _forward_wrapped, _gated_out, _hooked, _project,
                              hand_projections, register_block, rms_factor, runs_processor, swap_blocks,
                              weighted_rms_norm)

_PROJECTIONS = ("to_q", "to_k", "to_v")


def _supported(block: nn.Module) -> bool:
    if type(block) is not OmniGenBlock or _forward_wrapped(block):
        return False
    mlp, attn = block.mlp, block.self_attn
    d = getattr(mlp.gate_up_proj, "in_features", None) if type(mlp) is OmniGenFeedForward else None
    return (isinstance(d, int) and weighted_rms_norm(block.input_layernorm, d)
            and weighted_rms_norm(block.post_attention_layernorm, d) and type(attn) is Attention
            and type(mlp.activation_fn) is nn.SiLU and getattr(mlp.down_proj, "out_features", None) == d)


def _linears(block: nn.Module) -> list[nn.Module]:
    a, mlp = block.self_attn, block.mlp
    return [a.to_q, a.to_k, a.to_v, mlp.gate_up_proj, mlp.down_proj]


class FusedOmniGenBlock(OmniGenBlock):
    """An ``OmniGenBlock`` running the fused packed kernels (module docstring)."""

    def __init__(self, block: OmniGenBlock) -> None:
        if not _supported(block):
            raise ValueError("FusedOmniGenBlock handles OmniGenBlock in the structure diffusers builds")
        _adopt(self, block)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor,
                image_rotary_emb: torch.Tensor) -> torch.Tensor:
        args = (hidden_states, attention_mask, image_rotary_emb)
        h, attn, n1, n2 = hidden_states, self.self_attn, self.input_layernorm, self.post_attention_layernorm
        # (diffusers' RMSNorm returns its weight's dtype: a weight of another dtype than the rows promotes them)
        if (self.training or h.ndim != 3 or _hooked(n1) or _hooked(n2) or n1.weight.dtype != h.dtype
                or n2.weight.dtype != h.dtype
                or not runs_processor(attn, (OmniGenAttnProcessor2_0,), _PROJECTIONS)):
            return super().forward(*args)
        b, t, d = h.shape
        shift, k = rms_factor(n1, None, b, d)
        handed, rows = hand_projections(attn, _PROJECTIONS, h, lambda: n1(h), ln_eps=n1.eps, shift=shift, scale=k,
                                        rms_norm=True)
        h = h + attn.processor(handed, rows, rows, attention_mask, image_rotary_emb)
        mlp = self.mlp
        if _hooked(mlp) or _hooked(mlp.activation_fn) or any(_bypassed_hook(m) for m in (mlp.gate_up_proj,
                                                                                          mlp.down_proj)):
            return h + mlp(n2(h))
        h2 = h.reshape(b * t, d).contiguous()
        shift, k = rms_factor(n2, None, b, d)
        (gu,) = _project((mlp.gate_up_proj,), h2, lambda: n2(h), ln_eps=n2.eps, shift=shift, scale=k, rms_norm=True)
        gate, up = gu.chunk(2, dim=-1)
        y = up * mlp.activation_fn(gate.view(b, t, -1)).reshape(b * t, -1)   # (SiLU on (B, S, ·), as diffusers)
        return _gated_out(mlp.down_proj, y, h2, b).view(b, t, d)


def fuse_omnigen_blocks(model: nn.Module) -> int:
    """Swap every OmniGen block of ``model`` that :class:`FusedOmniGenBlock` handles and that has a packed linear
    with quantized activations to fuse; returns how many were swapped."""
    return swap_blocks(model, lambda m: FusedOmniGenBlock if _supported(m) else None, _linears)


register_block(FusedOmniGenBlock, 0)   # returns hidden_states alone, as the original
