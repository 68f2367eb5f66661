"""Fused DreamLite blocks for packed inference: the fusions of :mod:`.diffusers_fused` for diffusers'
``BasicTransformerBlockDreamLite`` (the transformer blocks of DreamLite's UNet), in its ``layer_norm`` form.

No modulation: LayerNorms with an affine (``w``, ``b``) before a self-attention (absent in DreamLite's "no
self-attention" blocks, whose rows are then the first norm's output), a cross-attention to the text and a GEGLU (or
GELU) feed-forward, each added back:

    h = h + attn1(to_q, to_k, to_v ← Q(LN(h)·w₁ + b₁))         (or h = LN(h)·w₁ + b₁ without a self-attention)
    h = h + attn2(to_q ← Q(LN(h)·w₂ + b₂), text)
    h = h + ff.net[2](Q(GEGLU(ff.net[0].proj ← Q(LN(h)·w₃ + b₃))))

Where a linear is a :class:`TreeQLinear` with quantized activations, the LayerNorm and its affine (folded into the
kernel's modulate, ``folded_affine``) run in its ``quantize_input`` kernel (one call for to_q/to_k/to_v, one for the
cross-attention's query, one for the feed-forward) and the feed-forward's residual in ff.net[2]'s epilogue; the
activation runs between the kernels. Each attention runs its processor (``AttnProcessor2_0``: the q/k RMSNorms,
grouped-query heads, the masks, the output projection) on a view of the attention whose projections return the
kernels' outputs (``HandedAttention``). Fused and unfused agree to float rounding, not bit for bit.

A block is swapped only in the structure diffusers builds (``layer_norm``, LayerNorms over the block's width,
diffusers' ``Attention``s without group or spatial norm, a GEGLU or GELU ``FeedForward``, no positional embedding
or GLIGEN fuser, a self-attention that is not a cross-attention) with a packed linear with quantized activations to
fuse. It runs diffusers' own forward in training mode, on other input ranks, with ``cross_attention_kwargs``, with a
chunked feed-forward, and when a norm or an attention carries a hook or another processor (or a projection the
kernels run does); a hooked feed-forward (or a part of it) runs as the module. The state dict is unchanged.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from diffusers.models.activations import GEGLU, GELU
from diffusers.models.attention import FeedForward
from diffusers.models.attention_processor import AttnProcessor2_0
from diffusers.models.transformers.transformer_2d_dreamlite import BasicTransformerBlockDreamLite

from .diffusers_fused import (_adopt, _bypassed_hook, _forward_wrapped, _gated_out, _hooked, _project, folded_affine,
                              hand_projections, plain_attention, register_block, runs_processor, swap_blocks)
from .linear import runs_packed_kernels as _quantized

_QKV = ("to_q", "to_k", "to_v")


def _norm(norm: Any, d: int) -> bool:
    return type(norm) is nn.LayerNorm and tuple(norm.normalized_shape) == (d,) and norm.eps > 0


def _ff_ok(ff: Any, d: int) -> bool:
    net: Any = getattr(ff, "net", None)
    return (type(ff) is FeedForward and len(net) in (3, 4) and type(net[0]) in (GEGLU, GELU)
            and type(net[1]) is nn.Dropout and all(type(m) is nn.Dropout for m in net[3:])
            and getattr(net[0].proj, "in_features", None) == d and getattr(net[2], "out_features", None) == d)


def _supported(block: nn.Module) -> bool:
    if type(block) is not BasicTransformerBlockDreamLite or _forward_wrapped(block):
        return False
    d = block.dim
    attn1, attn2 = block.attn1, block.attn2
    return (isinstance(d, int) and block.norm_type == "layer_norm" and block.pos_embed is None
            and not hasattr(block, "fuser") and not block.only_cross_attention and _norm(block.norm1, d)
            and _norm(block.norm3, d) and _ff_ok(block.ff, d)
            and (attn1 is None or (plain_attention(attn1, cross=False, projections=_QKV)
                                   and attn1.to_q.in_features == d))
            and (attn2 is None or (plain_attention(attn2, projections=_QKV) and _norm(block.norm2, d)
                                   and attn2.to_q.in_features == d)))


def _linears(block: nn.Module) -> list[nn.Module]:
    out = [block.ff.net[0].proj, block.ff.net[2]]
    if block.attn1 is not None:
        out += [block.attn1.to_q, block.attn1.to_k, block.attn1.to_v]
    if block.attn2 is not None:
        out += [block.attn2.to_q, block.attn2.to_k, block.attn2.to_v]
    return out


def _kernel(norm: nn.LayerNorm, like: torch.Tensor) -> dict[str, Any]:
    """The kernel's arguments for ``LN(x)·w + b``: the affine folded into a modulate of one group."""
    zero = torch.zeros(1, norm.normalized_shape[0], device=like.device)
    shift, scale = folded_affine(norm, zero, zero)
    return dict(ln_eps=norm.eps, shift=shift, scale=scale)


class FusedBasicTransformerBlockDreamLite(BasicTransformerBlockDreamLite):
    """A ``BasicTransformerBlockDreamLite`` running the fused packed kernels (module docstring)."""

    def __init__(self, block: BasicTransformerBlockDreamLite) -> None:
        if type(block) is not BasicTransformerBlockDreamLite or not _supported(block):
            raise ValueError("FusedBasicTransformerBlockDreamLite handles BasicTransformerBlockDreamLite in the "
                             "structure diffusers builds (layer_norm)")
        _adopt(self, block)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                encoder_hidden_states: torch.Tensor | None = None,
                encoder_attention_mask: torch.Tensor | None = None, timestep: Any = None,
                cross_attention_kwargs: dict[str, Any] | None = None, class_labels: Any = None,
                added_cond_kwargs: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        args = (hidden_states, attention_mask, encoder_hidden_states, encoder_attention_mask, timestep,
                cross_attention_kwargs, class_labels, added_cond_kwargs)
        h, attn1, attn2 = hidden_states, self.attn1, self.attn2
        # (attn2 without a text reads its keys and values from the normalized rows too: all three by the kernel)
        cross = _QKV[:1] if encoder_hidden_states is not None else _QKV
        if (self.training or h.ndim != 3 or cross_attention_kwargs or self._chunk_size is not None
                or any(_hooked(n) for n in (self.norm1, self.norm2, self.norm3) if n is not None)
                or (attn1 is not None and not runs_processor(attn1, (AttnProcessor2_0,), _QKV))
                or (attn2 is not None and not runs_processor(attn2, (AttnProcessor2_0,), cross))):
            return super().forward(*args)
        if attn1 is not None:
            handed, rows = hand_projections(attn1, _QKV, h, lambda: self.norm1(h), **_kernel(self.norm1, h))
            h = attn1.processor(handed, rows, None, attention_mask) + h
        else:
            h = self.norm1(h)
        if attn2 is not None:
            x = h
            handed, rows = hand_projections(attn2, cross, x, lambda: self.norm2(x), **_kernel(self.norm2, x))
            h = attn2.processor(handed, rows, encoder_hidden_states, encoder_attention_mask) + h
        return self._feed_forward(h)

    def _feed_forward(self, h: torch.Tensor) -> torch.Tensor:
        ff = self.ff
        act, fc2 = ff.net[0], ff.net[2]
        if (_hooked(ff) or _hooked(act) or any(_hooked(m) for m in ff.net[1::2]) or not _quantized(act.proj)
                or _hooked(act.proj) or _bypassed_hook(fc2)):
            return ff(self.norm3(h)) + h
        b, s, d = h.shape
        x2 = h.reshape(b * s, d).contiguous()
        (y,) = _project((act.proj,), x2, lambda: self.norm3(h), **_kernel(self.norm3, h))
        if type(act) is GEGLU:
            a, g = y.chunk(2, dim=-1)
            z = a * act.gelu(g)
        else:
            z = act.gelu(y)
        return _gated_out(fc2, z, x2, b).view(b, s, d)


def fuse_dreamlite_blocks(model: nn.Module) -> int:
    """Swap every DreamLite block of ``model`` that :class:`FusedBasicTransformerBlockDreamLite` handles and that has
    a packed linear with quantized activations to fuse; returns how many were swapped."""
    return swap_blocks(model, lambda m: FusedBasicTransformerBlockDreamLite if _supported(m) else None, _linears)


register_block(FusedBasicTransformerBlockDreamLite, 0)   # (returns hidden_states alone, as the original)
