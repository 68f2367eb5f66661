"""Fused Cosmos blocks for packed inference: the fusions of :mod:`.diffusers_fused` for diffusers'
``CosmosTransformerBlock`` (Cosmos-Predict2 text and video to world).

Each of the block's three ``CosmosAdaLayerNormZero`` gives shift, scale and gate from its own low-rank linears of
``silu(embedded_timestep)``, plus the timestep projection every block shares (``temb``): per sample, or per token
where the pipeline passes a timestep per frame (video to world: the conditioning frames'): the kernels then take
one modulation group per frame (its rows contiguous), not diffusers' table per token. ``LN`` has no affine:

    q, k, v = to_q/k/v ← Q(mod(LN(h), shift_1, scale_1))
    h = h + gate_1 · to_out(attention(RMSNorm(q), RMSNorm(k), v, rotary))           (attn1: self-attention)
    h = h + gate_2 · attn2(mod(LN(h), shift_2, scale_2), text)                        (as diffusers computes it)
    h = h + gate_3 · ff.net[2](Q(GELU(ff.net[0].proj(Q(mod(LN(h), shift_3, scale_3))))))

Where a linear is a :class:`TreeQLinear` with quantized activations, LayerNorm + modulate + quantization run in its
``quantize_input`` kernel (one call shared by to_q/to_k/to_v with one activation spec and no Monarch branch), the
gated residuals in ``to_out[0]``'s and ``ff.net[2]``'s epilogues (GELU here is exact: it runs between the two
linears, not in an epilogue). The self-attention is ``CosmosAttnProcessor2_0``'s computation. Fused and unfused
agree to the model dtype's rounding (the kernels normalize and modulate in float32), not bit for bit.

A block is swapped only in the structure diffusers builds (``CosmosAdaLayerNormZero`` over a LayerNorm without
affine, an ``Attention`` self-attention, a ``FeedForward`` of [GELU, Dropout, linear]) with a packed linear with
quantized activations to fuse (a ControlNet's control blocks, with their projections, are not). It runs diffusers'
own forward in training mode, with ControlNet residuals, for a modulation of another shape, and when a fused norm or
the self-attention carries a hook or another processor; a feed-forward or a packed linear that is hooked runs as
diffusers computes it. The fused forward follows diffusers 0.42's block (older ones stay unfused); diffusers' block
registry has no entry for the original, nor for the fused class. The state dict is unchanged.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.attention_processor import Attention
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_cosmos import (CosmosAdaLayerNormZero, CosmosAttnProcessor2_0,
                                                              CosmosTransformerBlock)

from .diffusers_fused import (_adopt, _feed_forward, _ff, _forward_wrapped, _gated_out, _hooked,
                              _plain_layer_norm, _project, like_rows, per_token_modulation, run_length,
                              self_attention_ok, swap_blocks)
from .linear import runs_packed_kernels as _quantized

Triple = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _norm_zero(norm: Any, d: int) -> bool:
    return type(norm) is CosmosAdaLayerNormZero and _plain_layer_norm(norm.norm, d)


def _supported(block: nn.Module) -> bool:
    if type(block) is not CosmosTransformerBlock or _forward_wrapped(block):
        return False
    ln = getattr(block.norm1, "norm", None)
    d = ln.normalized_shape[0] if isinstance(ln, nn.LayerNorm) and len(ln.normalized_shape) == 1 else None
    return (d is not None and _norm_zero(block.norm1, d) and _norm_zero(block.norm3, d)
            and type(block.attn1) is Attention and _feed_forward(block.ff, d)
            and block.before_proj is None and block.after_proj is None)   # (a ControlNet's control blocks: unfused)


def _linears(block: nn.Module) -> list[nn.Module]:
    a = block.attn1
    return [a.to_q, a.to_k, a.to_v, a.to_out[0], block.ff.net[0].proj, block.ff.net[2]]


def _modulation(norm: CosmosAdaLayerNormZero, embedded_timestep: torch.Tensor, temb: torch.Tensor | None,
                x: torch.Tensor) -> tuple[Triple, int] | None:
    """``norm``'s shift, scale and gate as diffusers computes them, each ``(B, G, D)``, and the rows each of the G
    groups covers: one group per sample, or per run of equal rows of a per-token modulation (a frame: video to world
    passes a timestep per frame; diffusers expands it to every token, 16x the memory at 4x4 patches of 64x64
    latents). None for another shape."""
    b, s, d = x.shape
    e = norm.linear_2(norm.linear_1(norm.activation(embedded_timestep)))
    if temb is not None:
        e = e + temb
    if e.ndim == 2 and tuple(e.shape) == (b, 3 * d):
        e, rows = e.unsqueeze(1), s
    elif e.ndim == 3 and tuple(e.shape) == (b, s, 3 * d):
        rows = run_length([e])
        e = e[:, ::rows].clone()   # (a copy: the per-token table is freed here)
    else:
        return None
    shift, scale, gate = e.chunk(3, dim=-1)
    return (shift, scale, gate), rows


def _self_attention(attn: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, b: int, rotary: Any) -> torch.Tensor:
    """``CosmosAttnProcessor2_0``'s self-attention of (B·S, inner) projection rows, as (B, S, inner)."""
    query, key, value = (t.view(b, -1, t.shape[-1]).unflatten(2, (attn.heads, -1)).transpose(1, 2) for t in (q, k, v))
    query, key = attn.norm_q(query), attn.norm_k(key)
    if rotary is not None:
        query = apply_rotary_emb(query, rotary, use_real=True, use_real_unbind_dim=-2)
        key = apply_rotary_emb(key, rotary, use_real=True, use_real_unbind_dim=-2)
    key = key.repeat_interleave(query.size(3) // key.size(3), dim=3)
    value = value.repeat_interleave(query.size(3) // value.size(3), dim=3)
    o = dispatch_attention_fn(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_mask=None,
                              dropout_p=0.0, is_causal=False)
    return o.flatten(2, 3).type_as(query)


class FusedCosmosTransformerBlock(CosmosTransformerBlock):
    """A ``CosmosTransformerBlock`` running the fused packed kernels (module docstring)."""

    def __init__(self, block: CosmosTransformerBlock) -> None:
        if not _supported(block):
            raise ValueError("FusedCosmosTransformerBlock handles CosmosTransformerBlock in the structure diffusers "
                             "builds")
        _adopt(self, block)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: Any, embedded_timestep: torch.Tensor,
                temb: torch.Tensor | None = None, image_rotary_emb: Any = None,
                extra_pos_emb: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                controlnet_residual: torch.Tensor | None = None, latents: torch.Tensor | None = None,
                block_idx: int | None = None) -> Any:
        args = (hidden_states, encoder_hidden_states, embedded_timestep, temb, image_rotary_emb, extra_pos_emb,
                attention_mask, controlnet_residual, latents, block_idx)
        n1, n3, attn, h = self.norm1, self.norm3, self.attn1, hidden_states
        if (self.training or self.before_proj is not None or self.after_proj is not None
                or controlnet_residual is not None or h.ndim != 3
                or not (like_rows(h, embedded_timestep, dtype=False) or like_rows(h, temb, dtype=False)
                        and temb is not None)   # (a modulation batch of 1: diffusers broadcasts it)
                or any(_hooked(n) for n in (n1, n1.norm, n3, n3.norm))
                or not self_attention_ok(attn, Attention, CosmosAttnProcessor2_0)):
            return super().forward(*args)
        if extra_pos_emb is not None:
            h = h + extra_pos_emb
        m1, m3 = _modulation(n1, embedded_timestep, temb, h), _modulation(n3, embedded_timestep, temb, h)
        if m1 is None or m3 is None or m1[1] != m3[1]:
            return super().forward(*args)
        b, s, d = h.shape
        rows = m1[1]
        grouped = m1[0] + m3[0]   # (shift, scale, gate of norm1, then norm3's: the layout _ff reads chunks 3-5 of)

        def chunk(i: int) -> torch.Tensor:   # as diffusers broadcasts it: (B, 1, D) per sample, else (B, S, D)
            t = grouped[i]
            return t if t.shape[1] == 1 else t.repeat_interleave(rows, dim=1)

        # the kernels' float32 (6, G, D): row m of the block takes group m // rows (a sample, or a frame)
        m32 = per_token_modulation(lambda i: grouped[i], b * grouped[0].shape[1])
        h2 = h.reshape(b * s, d).contiguous()
        q, k, v = _project((attn.to_q, attn.to_k, attn.to_v), h2, lambda: n1.norm(h) * (1 + chunk(1)) + chunk(0),
                           ln_eps=n1.norm.eps, shift=m32[0], scale=m32[1])
        o = _self_attention(attn, q, k, v, b, image_rotary_emb)
        proj = attn.to_out[0]
        if _quantized(proj):   # (not hooked: self_attention_ok)
            h = _gated_out(proj, o, h2, b, m32[2]).view(b, s, d)
        else:
            h = h + chunk(2) * attn.to_out[1](proj(o))
        x, gate = self.norm2(h, embedded_timestep, temb)   # the cross-attention, as diffusers computes it
        h = h + gate * self.attn2(x, encoder_hidden_states=encoder_hidden_states, attention_mask=attention_mask)
        if _quantized(self.ff.net[0].proj):   # (_ff runs a hooked or unpacked part as diffusers computes it)
            return _ff(self.ff, n3.norm, h.reshape(b * s, d).contiguous(), b, chunk, m32).view(b, s, d)
        return h + chunk(5) * self.ff(n3.norm(h) * (1 + chunk(4)) + chunk(3))


def fuse_cosmos_blocks(model: nn.Module) -> int:
    """Swap every Cosmos block of ``model`` that the fused class handles and that has a packed linear with quantized
    activations to fuse; returns how many were swapped."""
    return swap_blocks(model, lambda m: FusedCosmosTransformerBlock if _supported(m) else None, _linears)
