"""Fused Kandinsky 5 blocks for packed inference: the fusions of :mod:`.diffusers_fused` for diffusers'
``Kandinsky5TransformerDecoderBlock`` (the visual stream) and ``Kandinsky5TransformerEncoderBlock`` (the text
stream) of Kandinsky 5.0 (Video Lite, Video Pro, Image Lite).

Each block's ``Kandinsky5Modulation`` turns ``silu(time_embed)`` into a shift, a scale and a gate per sub-layer
(nine vectors in the decoder block, six in the encoder block), around LayerNorms without affine, all in float32:

    q, k, v = to_query/key/value ← Q(mod(LN(x), shift_sa, scale_sa))
    x = x + gate_sa · self_attention(q, k, v)             (the processor's own: RMSNorm on q and k, rotary, NABLA)
    q' = to_query ← Q(mod(LN(x), shift_ca, scale_ca))         (the decoder block only: keys and values read the text)
    x = x + gate_ca · cross_attention(q', text)
    x = x + gate_ff · out_layer(Q(GELU(in_layer(Q(mod(LN(x), shift_ff, scale_ff))))))

Where a linear is a :class:`TreeQLinear` with quantized activations, LayerNorm + modulate + quantization run in its
``quantize_input`` kernel (one call shared by to_query/to_key/to_value with one activation spec and no Monarch
branch, one for the cross-attention's query, one for the feed-forward), and the feed-forward's gated residual in
``out_layer``'s epilogue (float32, as the block adds it). The feed-forward's GELU is exact (not tanh) and runs
between the kernels. Each attention runs its processor itself (``Kandinsky5AttnProcessor``) on a view of the
attention whose query (and key and value) projections return the kernels' outputs (``HandedAttention``), so its
norms, rotary embedding (which rounds q and k through bfloat16, as diffusers' does), sparse attention and output
layer are diffusers' own; the attentions' gated residuals are added in float32 as the block adds them. Fused and
unfused agree to the model dtype's rounding, not bit for bit.

A block is swapped only in the structure diffusers builds (LayerNorms without affine, ``Kandinsky5Attention`` with
``Kandinsky5AttnProcessor``, ``Kandinsky5FeedForward``) with a packed linear with quantized activations to fuse. It
runs diffusers' own forward in training mode, on other input ranks or modulation shapes, and when a norm the kernel
computes, the modulation or an attention carries a hook or another processor, or a projection the kernels run
carries one; a feed-forward that is hooked runs as diffusers computes it. diffusers' block-level hooks
(FirstBlockCache, MagCache) find the fused decoder block in ``TransformerBlockRegistry`` under the original's entry
(its hidden states argument named ``visual_embed``); the encoder blocks, which no block hook reaches, have none. The
state dict is unchanged.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn
from diffusers.models.transformers.transformer_kandinsky import (Kandinsky5Attention, Kandinsky5AttnProcessor,
                                                                 Kandinsky5FeedForward, Kandinsky5Modulation,
                                                                 Kandinsky5TransformerDecoderBlock,
                                                                 Kandinsky5TransformerEncoderBlock)

from .diffusers_fused import (_adopt, _bypassed_hook, _forward_wrapped, _hooked, _plain_layer_norm, _project,
                              hand_projections, kernel_modulation, like_rows, register_block, runs_processor,
                              swap_blocks)
from .linear import runs_packed_kernels as _quantized

PROJECTIONS = ("to_query", "to_key", "to_value")


def _attention(attn: Any, d: int) -> bool:
    return type(attn) is Kandinsky5Attention and attn.to_query.in_features == d


def _supported(block: nn.Module) -> bool:
    if type(block) not in (Kandinsky5TransformerDecoderBlock, Kandinsky5TransformerEncoderBlock) \
            or _forward_wrapped(block):
        return False
    decoder = type(block) is Kandinsky5TransformerDecoderBlock
    norm = block.self_attention_norm
    d = norm.normalized_shape[0] if isinstance(norm, nn.LayerNorm) else None
    modulation = block.visual_modulation if decoder else block.text_modulation
    ff = block.feed_forward
    return (d is not None and _plain_layer_norm(norm, d) and _plain_layer_norm(block.feed_forward_norm, d)
            and type(modulation) is Kandinsky5Modulation
            and modulation.out_layer.out_features == (9 if decoder else 6) * d
            and _attention(block.self_attention, d) and type(ff) is Kandinsky5FeedForward
            and type(ff.activation) is nn.GELU and ff.in_layer.in_features == d
            and (not decoder or (_plain_layer_norm(block.cross_attention_norm, d)
                                 and _attention(block.cross_attention, d))))


def _linears(block: nn.Module) -> list[nn.Module]:
    a, ff = block.self_attention, block.feed_forward
    out = [a.to_query, a.to_key, a.to_value, ff.in_layer, ff.out_layer]
    return out + ([block.cross_attention.to_query] if type(block) is Kandinsky5TransformerDecoderBlock else [])


def _modulated(norm: nn.Module, x: torch.Tensor, mod: torch.Tensor, i: int) -> torch.Tensor:
    """diffusers' rows for sub-layer ``i``: ``LN(x) · (scale + 1) + shift`` in float32, in ``x``'s dtype."""
    return (norm(x.float()) * (mod[:, 3 * i + 1:3 * i + 2].float() + 1.0)
            + mod[:, 3 * i:3 * i + 1].float()).type_as(x)


def _gated(x: torch.Tensor, mod: torch.Tensor, i: int, y: torch.Tensor) -> torch.Tensor:
    """``x + gate_i · y`` in float32, in ``x``'s dtype (as the block adds it)."""
    return (x.float() + mod[:, 3 * i + 2:3 * i + 3].float() * y.float()).type_as(x)


def _attend(attn: Any, names: tuple[str, ...], norm: nn.Module, x: torch.Tensor, mod: torch.Tensor,
            m32: torch.Tensor, i: int, normed: torch.Tensor | None = None, **call: Any) -> torch.Tensor:
    """Sub-layer ``i``'s attention on the kernels' projections ``names`` of ``mod(LN(x))``, its processor's own
    computation after them; its gated residual. ``normed``: ``mod(LN(x))`` where the caller computed it already."""
    handed, rows = hand_projections(attn, names, x, lambda: _modulated(norm, x, mod, i) if normed is None else normed,
                                    ln_eps=norm.eps, shift=m32[3 * i], scale=m32[3 * i + 1])
    return _gated(x, mod, i, attn.processor(handed, rows, **call))


def _ff_parts(ff: Any) -> tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor], nn.Module, list[nn.Module]]:
    """A feed-forward's first linear, activation, second linear, and the modules a hook on which makes it run as
    the module: Kandinsky 5's ``Kandinsky5FeedForward`` (in_layer, activation, out_layer) or diffusers'
    ``FeedForward`` with a GELU (Kandinsky 6's: net = [GELU(proj), Dropout, linear])."""
    if type(ff) is Kandinsky5FeedForward:
        return ff.in_layer, ff.activation, ff.out_layer, [ff, ff.activation]
    glu = ff.net[0]
    return glu.proj, glu.gelu, ff.net[2], [ff, glu, ff.net[1]]


def _feed_forward(block: Any, x: torch.Tensor, mod: torch.Tensor, m32: torch.Tensor, i: int) -> torch.Tensor:
    """Sub-layer ``i``: the feed-forward's gated residual, LayerNorm + modulate in its first linear's quantization and
    the residual in the second's epilogue; as diffusers computes it where the feed-forward or its activation is
    hooked or a layer is not packed."""
    ff, norm = block.feed_forward, block.feed_forward_norm
    fc1, act, fc2, parts = _ff_parts(ff)
    if (any(_hooked(m) for m in parts) or _bypassed_hook(fc1) or _bypassed_hook(fc2)
            or not _quantized(fc1) or not _quantized(fc2)):
        return _gated(x, mod, i, ff(_modulated(norm, x, mod, i)))
    b, s, d = x.shape
    x2 = x.reshape(b * s, d).contiguous()
    (hidden,) = _project((fc1,), x2, lambda: _modulated(norm, x, mod, i), ln_eps=norm.eps,
                         shift=m32[3 * i], scale=m32[3 * i + 1])
    y = fc2.linear(fc2.quantize_input(act(hidden).contiguous()), out_dtype=x.dtype, residual=x2, gate=m32[3 * i + 2])
    return y.view(b, s, d)


def _modulation(modulation: nn.Module, time_embed: torch.Tensor, b: int, chunks: int,
                d: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The block's vectors as diffusers computes them, ``(B, chunks, D)`` (shift, scale, gate per sub-layer), and
    as the kernels take them, float32 ``(chunks, B, D)``; None when they are not per latent sample."""
    mod = modulation(time_embed)
    if mod.shape != (b, chunks * d):
        return None
    mod = mod.view(b, chunks, d)
    return mod, kernel_modulation(mod)


class FusedKandinsky5TransformerDecoderBlock(Kandinsky5TransformerDecoderBlock):
    """A ``Kandinsky5TransformerDecoderBlock`` running the fused packed kernels (module docstring)."""

    def __init__(self, block: Kandinsky5TransformerDecoderBlock) -> None:
        if type(block) is not Kandinsky5TransformerDecoderBlock or not _supported(block):
            raise ValueError("FusedKandinsky5TransformerDecoderBlock handles Kandinsky5TransformerDecoderBlock in the "
                             "structure diffusers builds")
        _adopt(self, block)

    def forward(self, visual_embed: torch.Tensor, text_embed: torch.Tensor, time_embed: torch.Tensor, rope: Any,
                sparse_params: Any) -> torch.Tensor:
        args = (visual_embed, text_embed, time_embed, rope, sparse_params)
        x, sa, ca = visual_embed, self.self_attention, self.cross_attention
        norms = (self.self_attention_norm, self.cross_attention_norm, self.feed_forward_norm)
        if (self.training or x.ndim != 3 or text_embed.ndim != 3 or not like_rows(x, time_embed, dtype=False)
                or time_embed.ndim != 2
                or any(_hooked(n) for n in norms)
                or _hooked(self.visual_modulation) or not runs_processor(sa, (Kandinsky5AttnProcessor,), PROJECTIONS)
                or not runs_processor(ca, (Kandinsky5AttnProcessor,), PROJECTIONS[:1])):
            return super().forward(*args)
        b, _, d = x.shape
        m = _modulation(self.visual_modulation, time_embed, b, 9, d)
        if m is None:
            return super().forward(*args)
        mod, m32 = m
        x = _attend(sa, PROJECTIONS, self.self_attention_norm, x, mod, m32, 0, rotary_emb=rope,
                    sparse_params=sparse_params)
        x = _attend(ca, PROJECTIONS[:1], self.cross_attention_norm, x, mod, m32, 1, encoder_hidden_states=text_embed)
        return _feed_forward(self, x, mod, m32, 2)


class FusedKandinsky5TransformerEncoderBlock(Kandinsky5TransformerEncoderBlock):
    """A ``Kandinsky5TransformerEncoderBlock`` running the fused packed kernels (module docstring)."""

    def __init__(self, block: Kandinsky5TransformerEncoderBlock) -> None:
        if type(block) is not Kandinsky5TransformerEncoderBlock or not _supported(block):
            raise ValueError("FusedKandinsky5TransformerEncoderBlock handles Kandinsky5TransformerEncoderBlock in the "
                             "structure diffusers builds")
        _adopt(self, block)

    def forward(self, x: torch.Tensor, time_embed: torch.Tensor, rope: Any) -> torch.Tensor:
        sa = self.self_attention
        if (self.training or x.ndim != 3 or not like_rows(x, time_embed, dtype=False) or time_embed.ndim != 2
                or _hooked(self.self_attention_norm) or _hooked(self.feed_forward_norm)
                or _hooked(self.text_modulation) or not runs_processor(sa, (Kandinsky5AttnProcessor,), PROJECTIONS)):
            return super().forward(x, time_embed, rope)
        b, _, d = x.shape
        m = _modulation(self.text_modulation, time_embed, b, 6, d)
        if m is None:
            return super().forward(x, time_embed, rope)
        mod, m32 = m
        x = _attend(sa, PROJECTIONS, self.self_attention_norm, x, mod, m32, 0, rotary_emb=rope)
        return _feed_forward(self, x, mod, m32, 1)


def fuse_kandinsky5_blocks(model: nn.Module) -> int:
    """Swap every Kandinsky 5 block of ``model`` that a fused class handles and that has a packed linear with
    quantized activations to fuse; returns how many were swapped."""
    def choose(mod: nn.Module) -> type | None:
        if not _supported(mod):
            return None
        return (FusedKandinsky5TransformerDecoderBlock if type(mod) is Kandinsky5TransformerDecoderBlock
                else FusedKandinsky5TransformerEncoderBlock)

    return swap_blocks(model, choose, _linears)


register_block(FusedKandinsky5TransformerDecoderBlock, 0,   # (returns the visual rows alone, as the original)
               hidden_states_argument_name="visual_embed")
