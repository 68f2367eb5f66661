"""Fused Kandinsky 6 blocks for packed inference: Kandinsky 5's fusions (:mod:`.kandinsky5_fused`) for diffusers'
``Kandinsky6SRTransformerBlock`` (every block of the Kandinsky 6 super-resolution transformer),
``Kandinsky6TransformerEncoderBlock`` (Kandinsky 6's video and audio text streams) and
``Kandinsky6FusedTransformerDecoderBlock`` (Kandinsky 6's joint video/audio blocks).

The first two are Kandinsky 5's text block with diffusers' ``FeedForward``: a ``Kandinsky6*Modulation`` turns
``silu(time_embed)`` into a shift, a scale and a gate per sub-layer, around LayerNorms without affine, modulated and
gated in float32:

    q, k, v = to_query/key/value ← Q(mod(LN(x), shift_sa, scale_sa))
    x = x + gate_sa · attention(q, k, v)        (the processor's own: RMSNorm on q and k, rotary, NABLA or a mask)
    x = x + gate_ff · net[2](Q(GELU(net[0].proj ← Q(mod(LN(x), shift_ff, scale_ff)))))

Where a linear is a :class:`TreeQLinear` with quantized activations, LayerNorm + modulate + quantization run in its
``quantize_input`` kernel (one call shared by to_query/to_key/to_value with one activation spec and no Monarch
branch, one for the feed-forward), and the feed-forward's gated residual in net[2]'s epilogue (float32, as the block
adds it); the exact GELU runs between the kernels. The attention runs its processor itself on a view of the
attention whose projections return the kernels' outputs (``HandedAttention``). Fused and unfused agree to the model
dtype's rounding, not bit for bit.

The joint block runs, per stream (video, audio; either may be absent), Kandinsky 5's visual block: self-attention,
text cross-attention (its query's LayerNorm + modulate in the kernel), and, with both streams, a cross-modal step
before the feed-forwards: each stream's query (``va_normalization``/``av_normalization`` + the cross modulation's
shift and scale, in the query's kernel) attends to the other stream's text-attention rows (``mod(LN(x))`` as the
text cross-attention's query read them: computed once, in float, for those keys and values), gated in; the
modulations' splits, the gate swap of ``cross_gates``, the time embedding ``fix_modulation`` picks and the rotary
tables of ``ca_rope`` as diffusers has them.

A block is swapped only in the structure diffusers builds (LayerNorms without affine, the block's attentions with their
default processor, GELU ``FeedForward``s) with a packed linear with quantized activations to fuse. It runs
diffusers' own forward in training mode, on other input ranks or modulation shapes (a time embedding, a text or
the other stream of another batch), and when a norm, a modulation or an attention carries a hook or another
processor, or a projection the kernels run carries one; a hooked feed-forward (or a part of it) runs as diffusers
computes it. The super-resolution block takes its original's entry in ``TransformerBlockRegistry`` (diffusers has
none for the joint block, whose rows are not named ``hidden_states``). The state dict is unchanged.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from diffusers.models.transformers.transformer_kandinsky6 import (Kandinsky6Attention, Kandinsky6AttnProcessor,
                                                                  Kandinsky6FusedTransformerDecoderBlock,
                                                                  Kandinsky6Modulation,
                                                                  Kandinsky6TransformerDecoderBlock,
                                                                  Kandinsky6TransformerEncoderBlock)
from diffusers.models.transformers.transformer_kandinsky6_sr import (Kandinsky6SRAttention, Kandinsky6SRAttnProcessor,
                                                                     Kandinsky6SRModulation,
                                                                     Kandinsky6SRTransformerBlock)

from .diffusers_fused import (_adopt, _feed_forward as _gelu_feed_forward, _forward_wrapped, _hooked,
                              _plain_layer_norm, kernel_modulation, like_rows, register_block, runs_processor,
                              swap_blocks)
from .kandinsky5_fused import PROJECTIONS, _attend, _feed_forward, _modulated, _modulation

# block class: (its attention, processor, modulation; the names of its modulation, attention and attention norm)
_KINDS: dict[type, tuple[Any, Any, Any, str, str, str]] = {
    Kandinsky6SRTransformerBlock: (Kandinsky6SRAttention, Kandinsky6SRAttnProcessor, Kandinsky6SRModulation,
                                   "visual_modulation", "self_attention", "self_attention_norm"),
    Kandinsky6TransformerEncoderBlock: (Kandinsky6Attention, Kandinsky6AttnProcessor, Kandinsky6Modulation,
                                        "text_modulation", "attn", "attn_norm"),
}


def _supported(block: nn.Module) -> bool:
    kind = _KINDS.get(type(block))
    if kind is None or _forward_wrapped(block):
        return False
    attention, _, modulation, mod_name, attn_name, norm_name = kind
    norm, attn, mod = getattr(block, norm_name), getattr(block, attn_name), getattr(block, mod_name)
    d: Any = norm.normalized_shape[0] if isinstance(norm, nn.LayerNorm) else None
    return (d is not None and _plain_layer_norm(norm, d) and _plain_layer_norm(block.feed_forward_norm, d)
            and type(mod) is modulation and mod.out_layer.out_features == 6 * d
            and type(attn) is attention and attn.to_query.in_features == d and attn.to_key.in_features == d
            and _gelu_feed_forward(block.feed_forward, d) and len(block.feed_forward.net) == 3)


def _linears(block: nn.Module) -> list[nn.Module]:
    attn = getattr(block, _KINDS[type(block)][4])
    ff = block.feed_forward
    return [attn.to_query, attn.to_key, attn.to_value, ff.net[0].proj, ff.net[2]]


def _fused(block: Any, x: torch.Tensor, time_embed: torch.Tensor, **call: Any) -> torch.Tensor | None:
    """The block's output by the kernels, its attention's processor called with ``call``; None where diffusers' own
    forward must run (module docstring)."""
    _, processor, _, mod_name, attn_name, norm_name = _KINDS[type(block).__mro__[1]]
    attn, norm, modulation = getattr(block, attn_name), getattr(block, norm_name), getattr(block, mod_name)
    if (block.training or x.ndim != 3 or not like_rows(x, time_embed, dtype=False) or time_embed.ndim != 2
            or _hooked(norm) or _hooked(block.feed_forward_norm) or _hooked(modulation)
            or not runs_processor(attn, (processor,), PROJECTIONS)):
        return None
    b, _, d = x.shape
    m = _modulation(modulation, time_embed, b, 6, d)
    if m is None:
        return None
    mod, m32 = m
    x = _attend(attn, PROJECTIONS, norm, x, mod, m32, 0, **call)
    return _feed_forward(block, x, mod, m32, 1)


class FusedKandinsky6SRTransformerBlock(Kandinsky6SRTransformerBlock):
    """A ``Kandinsky6SRTransformerBlock`` running the fused packed kernels (module docstring)."""

    def __init__(self, block: Kandinsky6SRTransformerBlock) -> None:
        if type(block) is not Kandinsky6SRTransformerBlock or not _supported(block):
            raise ValueError("FusedKandinsky6SRTransformerBlock handles Kandinsky6SRTransformerBlock in the structure "
                             "diffusers builds")
        _adopt(self, block)

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor, rotary_emb: torch.Tensor,
                sparse_params: dict[str, Any]) -> torch.Tensor:
        out = _fused(self, hidden_states, temb, rotary_emb=rotary_emb, sparse_params=sparse_params)
        return super().forward(hidden_states, temb, rotary_emb, sparse_params) if out is None else out


class FusedKandinsky6TransformerEncoderBlock(Kandinsky6TransformerEncoderBlock):
    """A ``Kandinsky6TransformerEncoderBlock`` running the fused packed kernels (module docstring)."""

    def __init__(self, block: Kandinsky6TransformerEncoderBlock) -> None:
        if type(block) is not Kandinsky6TransformerEncoderBlock or not _supported(block):
            raise ValueError("FusedKandinsky6TransformerEncoderBlock handles Kandinsky6TransformerEncoderBlock in the "
                             "structure diffusers builds")
        _adopt(self, block)

    def forward(self, x: torch.Tensor, time_embed: torch.Tensor, rope: torch.Tensor,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        # (what Kandinsky6Attention.forward hands its processor for a self-attention: the rotary table for keys too)
        out = _fused(self, x, time_embed, encoder_hidden_states=None, rotary_emb=rope, rotary_emb_kv=rope,
                     attn_mask=attn_mask)
        return super().forward(x, time_embed, rope, attn_mask) if out is None else out


def _stream_ok(dec: Any, d: int) -> bool:
    """One stream of a joint block (``Kandinsky6TransformerDecoderBlock``, used as a container) of width ``d``."""
    attns = (dec.self_attention, dec.cross_attention)
    return (type(dec) is Kandinsky6TransformerDecoderBlock and not _forward_wrapped(dec)
            and all(_plain_layer_norm(n, d) for n in (dec.self_attention_norm, dec.cross_attention_norm,
                                                     dec.feed_forward_norm))
            and type(dec.visual_modulation) is Kandinsky6Modulation and dec.visual_modulation.out_layer.out_features
            == 9 * d and all(type(a) is Kandinsky6Attention and a.to_query.in_features == d for a in attns)
            and dec.self_attention.to_key.in_features == d
            and _gelu_feed_forward(dec.feed_forward, d) and len(dec.feed_forward.net) == 3)


def _joint_ok(block: Any) -> bool:
    if type(block) is not Kandinsky6FusedTransformerDecoderBlock or _forward_wrapped(block):
        return False
    dv, da, gates = block.model_dim, block.model_dim_a, block.cross_gates
    va, av = block.va_modulation, block.av_modulation
    return (isinstance(dv, int) and isinstance(da, int) and _stream_ok(block.video_dec_block, dv)
            and _stream_ok(block.audio_dec_block, da)
            and _plain_layer_norm(block.va_normalization, dv) and _plain_layer_norm(block.av_normalization, da)
            and type(va) is Kandinsky6Modulation and type(av) is Kandinsky6Modulation
            and va.out_layer.out_features == (2 * dv + da if gates else 3 * dv)
            and av.out_layer.out_features == (2 * da + dv if gates else 3 * da)
            and type(block.va_cross_attention) is Kandinsky6Attention
            and block.va_cross_attention.to_query.in_features == dv
            and type(block.av_cross_attention) is Kandinsky6Attention
            and block.av_cross_attention.to_query.in_features == da)


def _joint_linears(block: nn.Module) -> list[nn.Module]:
    out: list[nn.Module] = [block.va_cross_attention.to_query, block.av_cross_attention.to_query]
    for dec in (block.video_dec_block, block.audio_dec_block):
        sa, ff = dec.self_attention, dec.feed_forward
        out += [sa.to_query, sa.to_key, sa.to_value, dec.cross_attention.to_query, ff.net[0].proj, ff.net[2]]
    return out


def _self_and_text(dec: Any, x: torch.Tensor, mod: torch.Tensor, m32: torch.Tensor, rope: Any, text: torch.Tensor,
                   mask: Any, keep: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One stream's self-attention and text cross-attention, each gated into the rows; with ``keep`` also the rows
    the cross-attention's query read (``mod(LN(x))``, float: the other stream's cross-modal keys read them)."""
    x = _attend(dec.self_attention, PROJECTIONS, dec.self_attention_norm, x, mod, m32, 0, encoder_hidden_states=None,
                rotary_emb=rope, rotary_emb_kv=rope, attn_mask=None)
    pre = _modulated(dec.cross_attention_norm, x, mod, 1) if keep else None
    x = _attend(dec.cross_attention, PROJECTIONS[:1], dec.cross_attention_norm, x, mod, m32, 1, normed=pre,
                encoder_hidden_states=text, rotary_emb=None, rotary_emb_kv=None, attn_mask=mask)
    return x, pre


class FusedKandinsky6JointBlock(Kandinsky6FusedTransformerDecoderBlock):
    """A ``Kandinsky6FusedTransformerDecoderBlock`` (the video/audio block) running the fused packed kernels."""

    def __init__(self, block: Kandinsky6FusedTransformerDecoderBlock) -> None:
        if type(block) is not Kandinsky6FusedTransformerDecoderBlock or not _joint_ok(block):
            raise ValueError("FusedKandinsky6JointBlock handles Kandinsky6FusedTransformerDecoderBlock in the "
                             "structure diffusers builds")
        _adopt(self, block)

    def _runs_fused(self, vis: Any, aud: Any, text_v: Any, text_a: Any, time_embed: Any) -> bool:
        if self.training or (vis is None and aud is None) or not isinstance(time_embed, (tuple, list)) \
                or len(time_embed) != 2:
            return False
        streams = [(x, t, text, dec) for x, t, text, dec in ((vis, time_embed[0], text_v, self.video_dec_block),
                                                             (aud, time_embed[1], text_a, self.audio_dec_block))
                   if x is not None]
        both = len(streams) == 2
        b = streams[0][0].shape[0] if streams[0][0].ndim == 3 else None
        for x, t, text, dec in streams:
            if (x.ndim != 3 or x.shape[0] != b or not isinstance(t, torch.Tensor) or t.ndim != 2
                    or not isinstance(text, torch.Tensor) or text.ndim != 3 or not like_rows(x, t, text, dtype=False)
                    or any(_hooked(n) for n in (dec.self_attention_norm, dec.cross_attention_norm,
                                                dec.feed_forward_norm, dec.visual_modulation))
                    or not runs_processor(dec.self_attention, (Kandinsky6AttnProcessor,), PROJECTIONS)
                    or not runs_processor(dec.cross_attention, (Kandinsky6AttnProcessor,), PROJECTIONS[:1])):
                return False
        if both:   # (the cross-modal modulations read either stream's time embedding)
            cross = (self.va_normalization, self.av_normalization, self.va_modulation, self.av_modulation)
            if (any(_hooked(m) for m in cross) or not like_rows(vis, *time_embed, dtype=False)
                    or not runs_processor(self.va_cross_attention, (Kandinsky6AttnProcessor,), PROJECTIONS[:1])
                    or not runs_processor(self.av_cross_attention, (Kandinsky6AttnProcessor,), PROJECTIONS[:1])):
                return False
        return True

    def forward(self, vis: torch.Tensor | None, aud: torch.Tensor | None, text_v: torch.Tensor, text_a: torch.Tensor,
                time_embed: tuple[torch.Tensor, torch.Tensor], vis_rope: torch.Tensor | None,
                aud_rope: torch.Tensor | None,
                attn_mask: Any = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        args = (vis, aud, text_v, text_a, time_embed, vis_rope, aud_rope, attn_mask)
        if not self._runs_fused(vis, aud, text_v, text_a, time_embed):
            return super().forward(*args)
        t_v, t_a = time_embed
        both = vis is not None and aud is not None
        mods: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        vis_pre = aud_pre = None
        if vis is not None:
            mods["v"] = _joint_modulation(self.video_dec_block.visual_modulation, t_v, self.model_dim)
            vis, vis_pre = _self_and_text(self.video_dec_block, vis, *mods["v"], vis_rope, text_v, attn_mask, both)
        if aud is not None:
            mods["a"] = _joint_modulation(self.audio_dec_block.visual_modulation, t_a, self.model_dim_a)
            aud, aud_pre = _self_and_text(self.audio_dec_block, aud, *mods["a"], aud_rope, text_a, attn_mask, both)
        if vis is not None and aud is not None:
            vis, aud = self._cross_modal(vis, aud, vis_pre, aud_pre, t_v, t_a, vis_rope, aud_rope)
        if vis is not None:
            vis = _feed_forward(self.video_dec_block, vis, *mods["v"], 2)
        if aud is not None:
            aud = _feed_forward(self.audio_dec_block, aud, *mods["a"], 2)
        return vis, aud

    def _cross_modal(self, vis: torch.Tensor, aud: torch.Tensor, vis_pre: Any, aud_pre: Any, t_v: torch.Tensor,
                     t_a: torch.Tensor, vis_rope: Any, aud_rope: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Each stream's query (LayerNorm + modulate in its kernel) attending to the other stream's text-attention
        rows, gated in: diffusers' cross-modal step, with its modulations' splits and gate swap."""
        dv, da = self.model_dim, self.model_dim_a
        va = self.va_modulation(t_v if self.fix_modulation else t_a)
        av = self.av_modulation(t_a if self.fix_modulation else t_v)
        if self.cross_gates:
            va_shift, va_scale, va_gate = torch.split(va, [dv, dv, da], dim=-1)
            av_shift, av_scale, av_gate = torch.split(av, [da, da, dv], dim=-1)
            gate_v, gate_a = av_gate, va_gate
        else:
            va_shift, va_scale, gate_v = torch.chunk(va, 3, dim=-1)
            av_shift, av_scale, gate_a = torch.chunk(av, 3, dim=-1)
        rq_v, rk_a = (vis_rope, aud_rope) if self.ca_rope else (None, None)
        mod_v = torch.stack((va_shift, va_scale, gate_v), dim=1)   # (B, 3, D): the layout _attend reads
        mod_a = torch.stack((av_shift, av_scale, gate_a), dim=1)
        # (what Kandinsky6Attention.forward hands its processor: rope_kv, else the query's table)
        new_v = _attend(self.va_cross_attention, PROJECTIONS[:1], self.va_normalization, vis, mod_v,
                        kernel_modulation(mod_v), 0, encoder_hidden_states=aud_pre, rotary_emb=rq_v,
                        rotary_emb_kv=rk_a if rk_a is not None else rq_v, attn_mask=None)
        new_a = _attend(self.av_cross_attention, PROJECTIONS[:1], self.av_normalization, aud, mod_a,
                        kernel_modulation(mod_a), 0, encoder_hidden_states=vis_pre, rotary_emb=rk_a,
                        rotary_emb_kv=rq_v if rq_v is not None else rk_a, attn_mask=None)
        return new_v, new_a


def _joint_modulation(modulation: nn.Module, t: torch.Tensor, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    m = _modulation(modulation, t, t.shape[0], 9, d)
    assert m is not None   # (the structure and the batch were checked: (B, 9·D))
    return m


def fuse_kandinsky6_blocks(model: nn.Module) -> int:
    """Swap every Kandinsky 6 block of ``model`` that a fused class handles and that has a packed linear with
    quantized activations to fuse; returns how many were swapped."""
    def choose(mod: nn.Module) -> type | None:
        if _joint_ok(mod):
            return FusedKandinsky6JointBlock
        if not _supported(mod):
            return None
        return (FusedKandinsky6SRTransformerBlock if type(mod) is Kandinsky6SRTransformerBlock
                else FusedKandinsky6TransformerEncoderBlock)

    def linears(block: nn.Module) -> list[nn.Module]:
        return _joint_linears(block) if type(block) is Kandinsky6FusedTransformerDecoderBlock else _linears(block)

    return swap_blocks(model, choose, linears)


register_block(FusedKandinsky6SRTransformerBlock, 0)   # (returns hidden_states alone, as the original)
