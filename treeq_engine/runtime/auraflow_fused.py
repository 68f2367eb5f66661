"""Fused AuraFlow blocks for packed inference: the fusions of :mod:`.diffusers_fused` for diffusers'
``AuraFlowJointTransformerBlock`` (image and text streams, MMDiT) and ``AuraFlowSingleTransformerBlock`` (the joined
rows [text; image]).

Each stream's ``AdaLayerNormZero`` gives six vectors from one linear of ``silu(temb)`` (DiT's order: shift_msa,
scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp) around float32 LayerNorms without affine. Unlike DiT's, the
feed-forward reads the LayerNorm of the attention's gated sum, and the block adds only the feed-forward to its input:

    q, k, v = to_q/k/v ← Q(mod(LN(h), shift_msa, scale_msa))       (add_q/k/v_proj ← the same on the text c)
    o_c, o_h = attention([q_c; q], [k_c; k], [v_c; v])             (LayerNorm on q and k, SDPA at ``attn.scale``)
    s = h + gate_msa · to_out(o_h)
    h = h + gate_mlp · out_projection(Q(SiLU(linear_1(n)) ⊙ linear_2(n))),   n = Q(mod(LN(s), shift_mlp, scale_mlp))
    (c alike with to_add_out and ff_context; the single block has no text stream and no to_add_out)

Where a linear is a :class:`TreeQLinear` with quantized activations, LayerNorm + modulate + quantization run in its
``quantize_input`` kernel (one call per stream for to_q/to_k/to_v, one for linear_1/linear_2, where they share an
activation spec and carry no Monarch branch), the gated sums ``s`` and the block's output in the epilogues of
to_out / to_add_out and of out_projection; SiLU ⊙ runs between the kernels. The attention is
``AuraFlowAttnProcessor2_0``'s computation (its q/k norms called as the modules they are). Fused and unfused agree to
the model dtype's rounding (the kernels normalize, modulate and add in float32, where diffusers rounds each step to
the model dtype), not bit for bit.

A block is swapped only in the structure diffusers builds (adaLN-Zero without embedder over float32 LayerNorms
without affine, ``AuraFlowFeedForward``, an ``Attention`` with ``AuraFlowAttnProcessor2_0``) with a packed linear
with quantized activations to fuse. It runs diffusers' own forward in training mode, with ``attention_kwargs``, for a
``temb`` or a text whose batch is not the latents' (diffusers broadcasts them), for a text or modulation in another
dtype than the latents' (diffusers promotes the block's rows), when a norm or the attention carries a hook or another
processor (the fused-projection one too); a feed-forward that carries a hook (or whose packed linear does) runs as
the module.
diffusers' block-level hooks (FirstBlockCache, MagCache) find both classes, fused or not, in
``TransformerBlockRegistry`` (diffusers 0.42 has no entry for them). The state dict is unchanged.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AuraFlowAttnProcessor2_0
from diffusers.models.normalization import AdaLayerNormZero
from diffusers.models.transformers.auraflow_transformer_2d import (AuraFlowFeedForward, AuraFlowJointTransformerBlock,
                                                                   AuraFlowSingleTransformerBlock)

from .diffusers_fused import (_adopt, _bypassed_hook, _forward_wrapped, _gated_out, _hooked, _project,
                              joint_attention_ok, kernel_modulation, plain_attention, plain_fp32_layer_norm,
                              refuse_fused_projections, register_block, self_attention_ok, swap_blocks)

_TEXT = ("add_q_proj", "add_k_proj", "add_v_proj")


def _adaln(norm: Any, d: int) -> bool:
    return (type(norm) is AdaLayerNormZero and norm.emb is None and plain_fp32_layer_norm(norm.norm, d)
            and isinstance(norm.linear, nn.Module))


def _feed_forward(ff: Any, d: int) -> bool:
    return (type(ff) is AuraFlowFeedForward and getattr(ff.linear_1, "in_features", None) == d
            and getattr(ff.linear_2, "in_features", None) == d
            and getattr(ff.out_projection, "out_features", None) == d)


def _width(block: nn.Module) -> int | None:
    norm = getattr(block, "norm2", None)
    return norm.normalized_shape[0] if isinstance(norm, nn.LayerNorm) and len(norm.normalized_shape) == 1 else None


def _supported(block: nn.Module) -> bool:
    joint = type(block) is AuraFlowJointTransformerBlock
    if not (joint or type(block) is AuraFlowSingleTransformerBlock) or _forward_wrapped(block):
        return False
    d = _width(block)
    if d is None or not (_adaln(block.norm1, d) and plain_fp32_layer_norm(block.norm2, d)
                         and _feed_forward(block.ff, d)
                         and plain_attention(block.attn, projections=("to_k", "to_v") + (_TEXT if joint else ()))):
        return False
    return not joint or (_adaln(block.norm1_context, d) and plain_fp32_layer_norm(block.norm2_context, d)
                         and _feed_forward(block.ff_context, d))


def _ff_linears(ff: nn.Module) -> list[nn.Module]:
    return [ff.linear_1, ff.linear_2, ff.out_projection]


def _linears(block: nn.Module) -> list[nn.Module]:
    a = block.attn
    out = [a.to_q, a.to_k, a.to_v, a.to_out[0], *_ff_linears(block.ff)]
    if isinstance(block, AuraFlowJointTransformerBlock):
        out += [*(getattr(a, n) for n in _TEXT), a.to_add_out, *_ff_linears(block.ff_context)]
    return out


def _stream_attention(attn: Any, qkv: list[torch.Tensor], b: int,
                      text: list[torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``AuraFlowAttnProcessor2_0``'s attention of (B·S, inner) projection rows (the text's first when given): the
    image's and the text's outputs before their output projections, (B, S, inner) each."""
    head_dim = qkv[1].shape[-1] // attn.heads

    def heads(t: torch.Tensor) -> torch.Tensor:
        return t.view(b, -1, attn.heads, head_dim)

    query, key, value = (heads(t) for t in qkv)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    s = 0
    if text is not None:
        eq, ek, ev = (heads(t) for t in text)
        s = eq.shape[1]
        if attn.norm_added_q is not None:
            eq = attn.norm_added_q(eq)
        if attn.norm_added_k is not None:
            ek = attn.norm_added_k(ek)
        query, key, value = torch.cat([eq, query], 1), torch.cat([ek, key], 1), torch.cat([ev, value], 1)
    o = F.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                       dropout_p=0.0, scale=attn.scale, is_causal=False)
    o = o.transpose(1, 2).reshape(b, -1, attn.heads * head_dim).to(query.dtype)
    return o[:, s:], (o[:, :s] if text is not None else None)


def _feed_forward_out(ff: Any, norm: nn.Module, s2: torch.Tensor, x2: torch.Tensor, b: int, mod: torch.Tensor,
                      m32: torch.Tensor) -> torch.Tensor:
    """``x + gate_mlp · ff(mod(LN(s), shift_mlp, scale_mlp))`` as (M, D) rows: LayerNorm + modulate in linear_1's
    and linear_2's quantization, the gated residual in out_projection's epilogue. A hook on the feed-forward or on a
    packed linear the kernels run: the module runs on diffusers' rows, hooks and all."""
    d = s2.shape[-1]
    s = s2.view(b, -1, d)

    def rows() -> torch.Tensor:
        return norm(s) * (1 + mod[:, 4:5]) + mod[:, 3:4]

    if _hooked(ff) or any(_bypassed_hook(m) for m in _ff_linears(ff)):
        y = ff(rows())
        return (mod[:, 5:6] * y + x2.view(y.shape)).reshape(x2.shape)
    g, u = _project((ff.linear_1, ff.linear_2), s2, rows, ln_eps=norm.eps, shift=m32[3], scale=m32[4])
    return _gated_out(ff.out_projection, F.silu(g) * u, x2, b, m32[5], mod[:, 5:6])


def _modulation(norm: Any, temb: torch.Tensor, b: int, d: int,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The six vectors as diffusers computes them, (B, 6, D), and as the kernels take them; None where they are not
    (B, 6·D) in the rows' ``dtype`` (diffusers' forward then promotes the block's rows: its output's dtype too)."""
    mod = norm.linear(norm.silu(temb))
    if mod.shape != (b, 6 * d) or mod.dtype != dtype:
        return None
    mod = mod.view(b, 6, d)
    return mod, kernel_modulation(mod)


def _stream_in(norm: Any, x: torch.Tensor, layers: tuple[nn.Module, ...], mod: torch.Tensor,
               m32: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A stream's (M, D) rows and its q, k, v projections of ``mod(LN(x), shift_msa, scale_msa)``."""
    b, t, d = x.shape
    x2 = x.reshape(b * t, d).contiguous()
    qkv = _project(layers, x2, lambda: norm.norm(x) * (1 + mod[:, 1:2]) + mod[:, 0:1], ln_eps=norm.norm.eps,
                   shift=m32[0], scale=m32[1])
    return x2, qkv


def _fused_forward(block: Any, unfused: Callable[..., Any], args: tuple[Any, ...]) -> Any:
    """The fused computation of either block (module docstring); ``unfused(*args)``, diffusers' forward, where the
    fused path cannot reproduce it."""
    joint = isinstance(block, AuraFlowJointTransformerBlock)
    if joint:
        h, c, temb, attention_kwargs = args
    else:
        (h, temb, attention_kwargs), c = args, None
    attn = block.attn
    norms = [block.norm1, block.norm1.norm, block.norm2]
    if joint:
        norms += [block.norm1_context, block.norm1_context.norm, block.norm2_context]
    if joint:
        refuse_fused_projections(attn, ("to_q", "to_k", "to_v") + _TEXT)   # (a dense copy of packed layers)
        ok = not attn.fused_projections and joint_attention_ok(attn, AuraFlowAttnProcessor2_0,
                                                               ("to_q", "to_k", "to_v") + _TEXT)
    else:
        ok = self_attention_ok(attn, Attention, AuraFlowAttnProcessor2_0)
    b = h.shape[0]
    # (a text or temb batch other than the latents' broadcasts in diffusers' forward; rows of another dtype promote)
    if (block.training or attention_kwargs or h.ndim != 3 or temb.ndim != 2 or temb.shape[0] != b
            or temb.dtype != h.dtype or not ok
            or (joint and (c.ndim != 3 or c.shape[0] != b or c.dtype != h.dtype)) or any(_hooked(n) for n in norms)):
        return unfused(*args)
    d = h.shape[2]
    m = _modulation(block.norm1, temb, b, d, h.dtype)
    mc = _modulation(block.norm1_context, temb, b, d, h.dtype) if joint and m is not None else None
    if m is None or (joint and mc is None):
        return unfused(*args)
    mod, m32 = m
    h2, qkv = _stream_in(block.norm1, h, (attn.to_q, attn.to_k, attn.to_v), mod, m32)
    text = None
    if mc is not None:
        c2, text = _stream_in(block.norm1_context, c, tuple(getattr(attn, n) for n in _TEXT), *mc)
    oh, oc = _stream_attention(attn, qkv, b, text)
    s2 = _gated_out(attn.to_out[0], oh, h2, b, m32[2], mod[:, 2:3])
    h = _feed_forward_out(block.ff, block.norm2, s2, h2, b, mod, m32).view(h.shape)
    if mc is None:
        return h
    cmod, c32 = mc
    s2 = _gated_out(attn.to_add_out, oc, c2, b, c32[2], cmod[:, 2:3])
    c = _feed_forward_out(block.ff_context, block.norm2_context, s2, c2, b, cmod, c32).view(c.shape)
    return c, h


class FusedAuraFlowJointTransformerBlock(AuraFlowJointTransformerBlock):
    """An ``AuraFlowJointTransformerBlock`` running the fused packed kernels (module docstring)."""

    def __init__(self, block: AuraFlowJointTransformerBlock) -> None:
        if type(block) is not AuraFlowJointTransformerBlock or not _supported(block):
            raise ValueError("FusedAuraFlowJointTransformerBlock handles AuraFlowJointTransformerBlock in the "
                             "structure diffusers builds")
        _adopt(self, block)

    def forward(self, hidden_states: torch.FloatTensor, encoder_hidden_states: torch.FloatTensor,
                temb: torch.FloatTensor, attention_kwargs: dict[str, Any] | None = None) -> Any:
        return _fused_forward(self, super().forward, (hidden_states, encoder_hidden_states, temb, attention_kwargs))


class FusedAuraFlowSingleTransformerBlock(AuraFlowSingleTransformerBlock):
    """An ``AuraFlowSingleTransformerBlock`` running the fused packed kernels (module docstring)."""

    def __init__(self, block: AuraFlowSingleTransformerBlock) -> None:
        if type(block) is not AuraFlowSingleTransformerBlock or not _supported(block):
            raise ValueError("FusedAuraFlowSingleTransformerBlock handles AuraFlowSingleTransformerBlock in the "
                             "structure diffusers builds")
        _adopt(self, block)

    def forward(self, hidden_states: torch.FloatTensor, temb: torch.FloatTensor,
                attention_kwargs: dict[str, Any] | None = None) -> Any:
        return _fused_forward(self, super().forward, (hidden_states, temb, attention_kwargs))


_FUSED = {AuraFlowJointTransformerBlock: FusedAuraFlowJointTransformerBlock,
          AuraFlowSingleTransformerBlock: FusedAuraFlowSingleTransformerBlock}


def fuse_auraflow_blocks(model: nn.Module) -> int:
    """Swap every AuraFlow block of ``model`` that the fused classes handle and that has a packed linear with
    quantized activations to fuse; returns how many were swapped."""
    return swap_blocks(model, lambda m: _FUSED[type(m)] if _supported(m) else None, _linears)


register_block(FusedAuraFlowJointTransformerBlock, 1, 0)   # returns (encoder_hidden_states, hidden_states)
register_block(FusedAuraFlowSingleTransformerBlock, 0)
