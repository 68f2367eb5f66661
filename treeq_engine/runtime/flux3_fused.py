"""Fused FLUX.3 blocks for packed inference: the fusions of :mod:`.diffusers_fused` for diffusers'
``Flux3ModeTransformerBlock`` (a token mode's own blocks: the image's, the reference image's, the text's) and
``Flux3SingleTransformerBlock`` (the joint blocks over [text; content]).

Both compute a parallel attention and SwiGLU feed-forward from one modulated LayerNorm (no affine), under a
per-token modulation table ``(B, S, 3·D)`` of shift, scale and gate, which the model builds per mode from each
token's timestep embedding (the image tokens' timestep, 0 for the reference image and the text; a flow map adds its
target timestep's embedding to every mode's):

    n = mod(LN(x), shift, scale);   q, k, v, [a, b] = to_q/k/v, ff.linear_in ← Q(n)
    x = x + gate · (to_out(attention(RMSNorm(q), RMSNorm(k), v, rotary)) + ff.linear_out(Q(SiLU(a) ⊙ b)))

The joint block does so on [text; content], each stream normalised and modulated with its own table and gated by
it: fused, the two run as one sequence, each row with its own stream's modulation and gate. Where a linear is a
:class:`TreeQLinear` with quantized activations, LayerNorm + modulate + quantization run in its ``quantize_input``
kernel (one call shared by to_q/to_k/to_v and linear_in with one activation spec and no Monarch branch), and the
gated sum in two epilogues: ``r = x + gate ⊙ to_out(o)`` in to_out's, ``r + gate ⊙ linear_out(·)`` in
linear_out's (where both run the kernels; else the sum as diffusers computes it). The tables repeat a row over
runs of tokens: the kernels take the rows in groups of the largest size every run is made of
(``per_token_modulation``: a sample's 512 text, 4096 image and 4096 reference tokens in 17 groups of 512), not a
row per token, found once per forward for the tables every block is handed (``_kernel_tables``). The attention is
``Flux3AttnProcessor``'s computation (RMSNorm on q and k in float32, ``apply_rotary_emb``, ``dispatch_attention_fn``
with the processor's backend); SwiGLU runs between the kernels. Fused and unfused agree to the model dtype's
rounding, not bit for bit.

A block is swapped only in the structure diffusers builds (a LayerNorm without affine, a ``Flux3Attention`` and
the SwiGLU ``Flux3FeedForward``) with a packed linear with quantized activations to fuse. It runs diffusers' own
forward in training mode, on other input ranks or table shapes, without tokens, with fused float projections (fusing
packed ones is refused), and when the norm, the attention, the feed-forward or a part of it carries a hook or
another processor. diffusers' block registry has no entry for the originals, nor for the fused classes. The state
dict is unchanged.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux3 import (Flux3Attention, Flux3AttnProcessor, Flux3FeedForward,
                                                             Flux3ModeTransformerBlock, Flux3SingleTransformerBlock,
                                                             Flux3SwiGLU)

from .diffusers_fused import (_adopt, _bypassed_hook, _forward_wrapped, _hooked, _plain_layer_norm, _project,
                              dispatch_kwargs, once_per_forward, per_token_modulation, self_attention_ok,
                              swap_blocks)
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


def _kernel_tables(tables: Sequence[torch.Tensor], d: int) -> torch.Tensor:
    """The (B, S_i, 3·D) tables of the rows [stream 0; stream 1; ...] (per sample, as the joint block concatenates
    them) as the kernels take them: float32 (3, G, D), the rows in groups of the largest size every run of equal
    rows is made of (``per_token_modulation``: the joint block's 512 text, 4096 image and 4096 reference-image tokens
    of a sample run in 17 groups of 512), computed once per forward for the same tables."""
    b = tables[0].shape[0]
    rows = b * sum(t.shape[1] for t in tables)

    def chunk(i: int) -> torch.Tensor:
        parts = [t[..., i * d:(i + 1) * d] for t in tables]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    return once_per_forward(tables, lambda: per_token_modulation(chunk, rows, chunks=3))


def _fused(block: nn.Module, x: torch.Tensor, m32: torch.Tensor, rows: Callable[[], torch.Tensor],
           gate: Callable[[], torch.Tensor], rotary: Any) -> torch.Tensor:
    """The block on the (B, T, D) rows ``x``: ``x + gate · (to_out(o) + linear_out(SwiGLU(f)))`` with o the
    attention of q, k, v and [q, k, v, f] = to_q/k/v, linear_in ← Q(n), n the modulated LayerNorm of ``x``
    (``rows()``: diffusers' n, for float layers; ``gate()``: diffusers' (B, T, D) gate, for a sum in torch)."""
    b, t, d = x.shape
    a, ff = block.attn, block.ff
    x2 = x.reshape(b * t, d).contiguous()
    q, k, v, f = _project((a.to_q, a.to_k, a.to_v, ff.linear_in), x2, rows, ln_eps=block.norm.eps, shift=m32[0],
                          scale=m32[1])
    o = _attention(a, q.view(b, t, -1), k.view(b, t, -1), v.view(b, t, -1), rotary)
    h = ff.act_fn(f.view(b, t, -1)).reshape(b * t, -1)   # (on (B, T, ·), as diffusers calls it)
    proj, out = a.to_out[0], ff.linear_out
    if _quantized(proj) and _quantized(out):   # x + gate·to_out(o) in to_out's epilogue, + gate·linear_out(h) in its
        r = proj.linear(proj.quantize_input(o.reshape(b * t, -1).contiguous()), out_dtype=x.dtype, residual=x2,
                        gate=m32[2])
        return out.linear(out.quantize_input(h.contiguous()), out_dtype=x.dtype, residual=r, gate=m32[2]).view(b, t, d)
    y = a.to_out[1](proj(o)) + out(h.view(b, t, -1))
    return x + gate() * y


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


def _table_fits(table: torch.Tensor, x: torch.Tensor) -> bool:
    """A per-token table (B, S, 3·D) for the rows ``x`` (B, S, D), in their dtype (diffusers promotes rows modulated
    by a table of another dtype: its forward computes that)."""
    b, s, d = x.shape
    return table.ndim == 3 and tuple(table.shape) == (b, s, 3 * d) and table.dtype == x.dtype


class FusedFlux3ModeTransformerBlock(Flux3ModeTransformerBlock):
    """A ``Flux3ModeTransformerBlock`` running the fused packed kernels (module docstring)."""

    def __init__(self, block: Flux3ModeTransformerBlock) -> None:
        if not _supported(block):
            raise ValueError("FusedFlux3ModeTransformerBlock handles Flux3ModeTransformerBlock in the structure "
                             "diffusers builds")
        _adopt(self, block)

    def forward(self, hidden_states: torch.Tensor, temb_mod: torch.Tensor,
                image_rotary_emb: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x = hidden_states
        if self.training or x.ndim != 3 or not _table_fits(temb_mod, x) or not x.shape[1] or not _runs_fused(self):
            return super().forward(hidden_states, temb_mod, image_rotary_emb)
        d = x.shape[2]
        shift, scale, gate = temb_mod.chunk(3, dim=-1)
        return _fused(self, x, _kernel_tables([temb_mod], d), lambda: (1 + scale) * self.norm(x) + shift,
                      lambda: gate, image_rotary_emb)


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
        x, c = hidden_states, encoder_hidden_states
        if (self.training or x.ndim != 3 or c.ndim != 3 or x.shape[0] != c.shape[0] or x.shape[2] != c.shape[2]
                or c.dtype != x.dtype
                or not (x.shape[1] and c.shape[1]) or not _table_fits(temb_mod, x)
                or not _table_fits(temb_mod_context, c) or not _runs_fused(self)):
            return super().forward(hidden_states, encoder_hidden_states, temb_mod, temb_mod_context, image_rotary_emb)
        t, d = c.shape[1], c.shape[2]
        shift, scale, gate = temb_mod.chunk(3, dim=-1)
        c_shift, c_scale, c_gate = temb_mod_context.chunk(3, dim=-1)

        def rows() -> torch.Tensor:   # diffusers' modulated [text; content]
            return torch.cat([(1 + c_scale) * self.norm(c) + c_shift, (1 + scale) * self.norm(x) + shift], dim=1)

        # the joint sequence [text; content] as one: one quantization per activation spec, one GEMM per linear, the
        # rows' groups from both tables (each row's own modulation and gate, as diffusers applies them per stream)
        out = _fused(self, torch.cat([c, x], dim=1), _kernel_tables([temb_mod_context, temb_mod], d), rows,
                     lambda: torch.cat([c_gate, gate], dim=1), image_rotary_emb)
        return out[:, :t], out[:, t:]


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
