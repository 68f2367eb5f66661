"""Fused FLUX.3 blocks for packed inference: the fusions of :mod:`.diffusers_fused` for diffusers'
``Flux3ModeTransformerBlock`` (a token mode's own blocks: the image's, the reference image's, the text's) and
``Flux3SingleTransformerBlock`` (the joint blocks over [text; content]).

Both compute a parallel attention and SwiGLU feed-forward from one modulated LayerNorm (no affine), under a
per-token modulation table ``(B, S, 3·D)`` of shift, scale and gate, which the model builds per mode from each
token's timestep embedding (the image tokens' timestep, 0 for the reference image and the text):

    n = mod(LN(x), shift, scale);   q, k, v, [a, b] = to_q/k/v, ff.linear_in ← Q(n)
    x = x + gate · (to_out(attention(RMSNorm(q), RMSNorm(k), v, rotary)) + ff.linear_out(Q(SiLU(a) ⊙ b)))

The joint block does so on [text; content], each stream normalised and modulated with its own table, its own gate
on its output rows. Where a linear is a :class:`TreeQLinear` with quantized activations, LayerNorm + modulate +
quantization run in its ``quantize_input`` kernel (one call per stream shared by to_q/to_k/to_v and linear_in with
one activation spec and no Monarch branch; the joint block's streams run their projections apart and meet in the
attention), and the gated sum in two epilogues: ``r = x + gate ⊙ to_out(o)`` in to_out's, ``r + gate ⊙
linear_out(·)`` in linear_out's (where both run the kernels; else the sum as diffusers computes it). The tables
repeat one row per run of tokens of one timestep: the kernels take one modulation group per run
(``per_token_modulation``), not a row per token. The attention is ``Flux3AttnProcessor``'s computation (RMSNorm on q
and k in float32, ``apply_rotary_emb``, ``dispatch_attention_fn`` with the processor's backend); SwiGLU runs
between the kernels. Fused and unfused agree to the model dtype's rounding, not bit for bit. (The joint block's
float linears run once per stream: a hook on one sees two calls.)

A block is swapped only in the structure diffusers builds (a LayerNorm without affine, a ``Flux3Attention`` and
the SwiGLU ``Flux3FeedForward``) with a packed linear with quantized activations to fuse. It runs diffusers' own
forward in training mode, on other input ranks or table shapes, with fused projections, and when the norm, the
attention, the feed-forward or a part of it carries a hook or another processor. diffusers' block registry has no
entry for the originals, nor for the fused classes. The state dict is unchanged.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux3 import (Flux3Attention, Flux3AttnProcessor, Flux3FeedForward,
                                                             Flux3ModeTransformerBlock, Flux3SingleTransformerBlock,
                                                             Flux3SwiGLU)

from .diffusers_fused import (_adopt, _bypassed_hook, _forward_wrapped, _hooked, _plain_layer_norm, _project,
                              dispatch_kwargs, per_token_modulation, self_attention_ok, swap_blocks)
from .linear import runs_packed_kernels as _quantized


def _swiglu_ff(ff: Any, d: int) -> bool:
    """``Flux3FeedForward`` as diffusers builds it: linear_in (d -> 2h), SwiGLU, linear_out (h -> d)."""
    return (type(ff) is Flux3FeedForward and type(ff.act_fn) is Flux3SwiGLU
            and getattr(ff.linear_in, "in_features", None) == d
            and getattr(ff.linear_in, "out_features", None) == 2 * getattr(ff.linear_out, "in_features", -1)
            and getattr(ff.linear_out, "out_features", None) == d)


def _supported(block: nn.Module) -> bool:
    if type(block) not in (Flux3ModeTransformerBlock, Flux3SingleTransformerBlock) or _forward_wrapped(block):
        return False
    d = getattr(block.norm, "normalized_shape", (None,))[0]
    return (isinstance(d, int) and _plain_layer_norm(block.norm, d) and type(block.attn) is Flux3Attention
            and getattr(block.attn.to_q, "in_features", None) == d and _swiglu_ff(block.ff, d))


def _linears(block: nn.Module) -> list[nn.Module]:
    a = block.attn
    return [a.to_q, a.to_k, a.to_v, block.ff.linear_in, a.to_out[0], block.ff.linear_out]


def _runs_fused(block: nn.Module) -> bool:
    """The block's parts compute what the fused path computes (checked on every forward): ``Flux3AttnProcessor``
    exactly on unfused projections, no hook on the norm, the attention, the feed-forward or its SwiGLU, nor on a
    linear the kernels run (``self_attention_ok``; a float linear runs as a module, hooks and all)."""
    ff = block.ff
    return (not any(_hooked(m) for m in (block.norm, ff, ff.act_fn))
            and not _bypassed_hook(ff.linear_in) and not _bypassed_hook(ff.linear_out)
            and self_attention_ok(block.attn, Flux3Attention, Flux3AttnProcessor))


def _modulation(table: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
    """A (B, S, 3·D) table as the kernels take it: float32 (3, G, D), one group per run of equal rows (row m of
    ``x``'s B·S takes group m // (B·S / G)); None for another shape."""
    b, s, d = x.shape
    if table.ndim != 3 or tuple(table.shape) != (b, s, 3 * d):
        return None
    return per_token_modulation(lambda i: table[..., i * d:(i + 1) * d], b * s, chunks=3)


def _project_stream(block: nn.Module, x: torch.Tensor, table: torch.Tensor, m32: torch.Tensor) -> list[torch.Tensor]:
    """q, k, v and linear_in's output for the (B, S, D) rows ``x``, as (B·S, ·) rows: LayerNorm + modulate +
    quantization in the kernel; float layers read diffusers' modulated rows."""
    d = x.shape[-1]
    a = block.attn

    def rows() -> torch.Tensor:
        shift, scale = table[..., :d], table[..., d:2 * d]
        return (1 + scale) * block.norm(x) + shift

    return _project((a.to_q, a.to_k, a.to_v, block.ff.linear_in), x.reshape(-1, d).contiguous(), rows,
                    ln_eps=block.norm.eps, shift=m32[0], scale=m32[1])


def _attention(attn: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rotary: Any) -> torch.Tensor:
    """``Flux3AttnProcessor``'s attention of (B, T, inner) projections, before to_out: (B, T, inner)."""
    query, key, value = (t.unflatten(-1, (attn.heads, -1)) for t in (q, k, v))
    query, key = attn.norm_q(query.float()), attn.norm_k(key.float())
    if rotary is not None:
        query = apply_rotary_emb(query, rotary, sequence_dim=1)
        key = apply_rotary_emb(key, rotary, sequence_dim=1)
    query, key = query.to(value.dtype), key.to(value.dtype)
    o = dispatch_attention_fn(query, key, value, attn_mask=None, **dispatch_kwargs(attn.processor))
    return o.flatten(2, 3).to(query.dtype)


def _gated_sum(block: nn.Module, x: torch.Tensor, o: torch.Tensor, f: torch.Tensor, table: torch.Tensor,
               m32: torch.Tensor) -> torch.Tensor:
    """``x + gate · (to_out(o) + linear_out(SwiGLU(f)))`` for the (B, S, D) rows ``x`` (``o``, ``f``: the
    attention's and linear_in's outputs for those rows): in to_out's and linear_out's epilogues where both run the
    kernels, else as diffusers computes it."""
    b, s, d = x.shape
    a, ff = block.attn, block.ff
    proj, out = a.to_out[0], ff.linear_out
    h = ff.act_fn(f)
    if _quantized(proj) and _quantized(out):
        x2 = x.reshape(b * s, d).contiguous()
        r = proj.linear(proj.quantize_input(o.reshape(b * s, -1).contiguous()), out_dtype=x.dtype, residual=x2,
                        gate=m32[2])
        return out.linear(out.quantize_input(h.contiguous()), out_dtype=x.dtype, residual=r, gate=m32[2]).view(b, s, d)
    y = a.to_out[1](proj(o.reshape(b, s, -1))) + out(h.view(b, s, -1))
    return x + table[..., 2 * d:] * y


class FusedFlux3ModeTransformerBlock(Flux3ModeTransformerBlock):
    """A ``Flux3ModeTransformerBlock`` running the fused packed kernels (module docstring)."""

    def __init__(self, block: Flux3ModeTransformerBlock) -> None:
        if not _supported(block):
            raise ValueError("FusedFlux3ModeTransformerBlock handles Flux3ModeTransformerBlock in the structure "
                             "diffusers builds")
        _adopt(self, block)

    def forward(self, hidden_states: torch.Tensor, temb_mod: torch.Tensor,
                image_rotary_emb: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        args = (hidden_states, temb_mod, image_rotary_emb)
        x = hidden_states
        if self.training or x.ndim != 3 or not _runs_fused(self):
            return super().forward(*args)
        m32 = _modulation(temb_mod, x)
        if m32 is None:
            return super().forward(*args)
        b, s, _ = x.shape
        q, k, v, f = _project_stream(self, x, temb_mod, m32)
        o = _attention(self.attn, q.view(b, s, -1), k.view(b, s, -1), v.view(b, s, -1), image_rotary_emb)
        return _gated_sum(self, x, o, f, temb_mod, m32)


class FusedFlux3SingleTransformerBlock(Flux3SingleTransformerBlock):
    """A ``Flux3SingleTransformerBlock`` running the fused packed kernels (module docstring)."""

    def __init__(self, block: Flux3SingleTransformerBlock) -> None:
        if not _supported(block):
            raise ValueError("FusedFlux3SingleTransformerBlock handles Flux3SingleTransformerBlock in the structure "
                             "diffusers builds")
        _adopt(self, block)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, temb_mod: torch.Tensor,
                temb_mod_context: torch.Tensor,
                image_rotary_emb: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        args = (hidden_states, encoder_hidden_states, temb_mod, temb_mod_context, image_rotary_emb)
        x, c = hidden_states, encoder_hidden_states
        if (self.training or x.ndim != 3 or c.ndim != 3 or x.shape[0] != c.shape[0] or x.shape[2] != c.shape[2]
                or not _runs_fused(self)):
            return super().forward(*args)
        m32, c32 = _modulation(temb_mod, x), _modulation(temb_mod_context, c)
        if m32 is None or c32 is None:
            return super().forward(*args)
        b, s, _ = x.shape
        t = c.shape[1]
        text, content = _project_stream(self, c, temb_mod_context, c32), _project_stream(self, x, temb_mod, m32)
        # the joint sequence [text; content], as diffusers concatenates the modulated rows
        q, k, v = (torch.cat([tp.view(b, t, -1), cp.view(b, s, -1)], dim=1) for tp, cp in zip(text[:3], content[:3]))
        o = _attention(self.attn, q, k, v, image_rotary_emb)
        c = _gated_sum(self, c, o[:, :t], text[3], temb_mod_context, c32)
        x = _gated_sum(self, x, o[:, t:], content[3], temb_mod, m32)
        return c, x


def fuse_flux3_blocks(model: nn.Module) -> int:
    """Swap every FLUX.3 block of ``model`` that the fused classes handle and that has a packed linear with
    quantized activations to fuse; returns how many were swapped."""
    def choose(m: nn.Module) -> type | None:
        if not _supported(m):
            return None
        if type(m) is Flux3ModeTransformerBlock:
            return FusedFlux3ModeTransformerBlock
        return FusedFlux3SingleTransformerBlock

    return swap_blocks(model, choose, _linears)
