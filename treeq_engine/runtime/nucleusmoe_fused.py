"""Fused NucleusMoE blocks for packed inference: the fusions of :mod:`.diffusers_fused` for diffusers'
``NucleusMoEImageTransformerBlock``.

One image stream attending to itself and to the block's projection of the text; ``img_mod(temb)`` gives a scale and
a gate per sub-layer and sample, around LayerNorms without affine (no shift; the gates clamped to [-2, 2], tanh'd):

    h = h + tanh(gate1) · attention(to_q, to_k, to_v ← Q(LN(h)·(1 + scale1)), text)
    h = h + tanh(gate2) · mlp(LN(h)·(1 + scale2))

Where a linear is a :class:`TreeQLinear` with quantized activations, LayerNorm + modulate run in its
``quantize_input`` kernel (one call for to_q/to_k/to_v; in a dense block one for the SwiGLU's projection, whose gated
residual then runs in the feed-forward's second linear's epilogue, SwiGLU between the kernels). A mixture-of-experts
MLP runs as the module: its router reads the unmodulated rows and its experts gathered float rows. The attention runs
its processor (``NucleusMoEAttnProcessor2_0``: grouped-query heads, the q/k RMSNorms, the rotary embedding, the text's
keys and values or their cache, the output projection) on the kernels' projections (``HandedAttention``); its gated
residual is diffusers' sum. Fused and unfused agree to float rounding, not bit for bit.

A block is swapped only in the structure diffusers builds (LayerNorms without affine, ``img_mod`` as SiLU + linear,
an ``Attention`` with that processor, a SwiGLU ``FeedForward`` or a ``NucleusMoELayer``) with a packed linear with
quantized activations to fuse. It runs diffusers' own forward in training mode, on other input ranks, for a
``temb`` of another batch or rank, with attention arguments other than the mask and the text cache, and when a norm, the
modulation or the attention carries a hook or another processor (or a projection the kernels run does); a hooked
feed-forward (or a part of it) runs as the module. The state dict is unchanged.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from diffusers.models.attention_processor import Attention
from diffusers.models.transformers.transformer_nucleusmoe_image import (NucleusMoEAttnProcessor2_0,
                                                                        NucleusMoEImageTransformerBlock,
                                                                        NucleusMoELayer)

from .diffusers_fused import (_adopt, _bypassed_hook, _forward_wrapped, _gated_out, _hooked, _plain_layer_norm,
                              _project, hand_projections, like_rows, register_block, runs_processor, swap_blocks,
                              swiglu_feed_forward)
from .linear import runs_packed_kernels as _quantized

_QKV = ("to_q", "to_k", "to_v")
# the attention arguments the block hands on (the model's joint mask; the text's cached keys and values)
_KWARGS = ("attention_mask", "cached_txt_key", "cached_txt_value")


def _supported(block: nn.Module) -> bool:
    if type(block) is not NucleusMoEImageTransformerBlock or _forward_wrapped(block):
        return False
    d, mod, attn = block.dim, block.img_mod, block.attn
    return (isinstance(d, int) and _plain_layer_norm(block.pre_attn_norm, d)
            and _plain_layer_norm(block.pre_mlp_norm, d) and type(mod) is nn.Sequential and len(mod) == 2
            and type(mod[0]) is nn.SiLU and getattr(mod[1], "out_features", None) == 4 * d and type(attn) is Attention
            and attn.to_q.in_features == d and attn.to_k.in_features == d
            and (type(block.img_mlp) is NucleusMoELayer if block.moe_enabled
                 else swiglu_feed_forward(block.img_mlp, d)))


def _linears(block: nn.Module) -> list[nn.Module]:
    a = block.attn
    out = [a.to_q, a.to_k, a.to_v]
    return out if block.moe_enabled else out + [block.img_mlp.net[0].proj, block.img_mlp.net[2]]


class FusedNucleusMoEImageTransformerBlock(NucleusMoEImageTransformerBlock):
    """A ``NucleusMoEImageTransformerBlock`` running the fused packed kernels (module docstring)."""

    def __init__(self, block: NucleusMoEImageTransformerBlock) -> None:
        if type(block) is not NucleusMoEImageTransformerBlock or not _supported(block):
            raise ValueError("FusedNucleusMoEImageTransformerBlock handles NucleusMoEImageTransformerBlock in the "
                             "structure diffusers builds")
        _adopt(self, block)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, temb: torch.Tensor,
                image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
                attention_kwargs: dict[str, Any] | None = None) -> torch.Tensor:
        args = (hidden_states, encoder_hidden_states, temb, image_rotary_emb, attention_kwargs)
        h, attn, n1, n2 = hidden_states, self.attn, self.pre_attn_norm, self.pre_mlp_norm
        kw = attention_kwargs or {}
        if (self.training or h.ndim != 3 or not like_rows(h, temb, dtype=False) or temb.ndim != 2
                or any(k not in _KWARGS for k in kw) or _hooked(n1) or _hooked(n2) or _hooked(self.img_mod)
                or not runs_processor(attn, (NucleusMoEAttnProcessor2_0,), _QKV)):
            return super().forward(*args)
        b, s, d = h.shape
        scale1, gate1, scale2, gate2 = self.img_mod(temb).unsqueeze(1).chunk(4, dim=-1)   # (B, 1, D) each
        gate1, gate2 = gate1.clamp(min=-2.0, max=2.0), gate2.clamp(min=-2.0, max=2.0)
        context = None if kw.get("cached_txt_key") is not None else self.encoder_proj(encoder_hidden_states)

        def kernel(norm: nn.LayerNorm, scale: torch.Tensor) -> dict[str, Any]:
            k = scale.reshape(b, d).float().contiguous()
            return dict(ln_eps=norm.eps, shift=torch.zeros_like(k), scale=k)

        handed, rows = hand_projections(attn, _QKV, h, lambda: n1(h) * (1 + scale1), **kernel(n1, scale1))
        cache = {k: v for k, v in kw.items() if k != "attention_mask"}
        out = attn.processor(handed, rows, context, kw.get("attention_mask"), image_rotary_emb, **cache)
        h = h + gate1.tanh() * out

        mlp = self.img_mlp
        if self.moe_enabled:
            normed = n2(h)
            h = h + gate2.tanh() * mlp(normed * (1 + scale2), normed, timestep=temb)
        else:
            h = self._dense(h, scale2, gate2, kernel(n2, scale2))
        if h.dtype == torch.float16:
            fp16 = torch.finfo(torch.float16)
            h = h.clip(fp16.min, fp16.max)
        return h

    def _dense(self, h: torch.Tensor, scale2: torch.Tensor, gate2: torch.Tensor,
               kernel: dict[str, Any]) -> torch.Tensor:
        """The dense block's gated SwiGLU feed-forward (module docstring)."""
        ff, n2 = self.img_mlp, self.pre_mlp_norm
        glu, fc2 = ff.net[0], ff.net[2]
        if (_hooked(ff) or _hooked(glu) or _hooked(glu.activation) or _hooked(ff.net[1]) or not _quantized(glu.proj)
                or _hooked(glu.proj) or _bypassed_hook(fc2)):
            return h + gate2.tanh() * ff(n2(h) * (1 + scale2))
        b, s, d = h.shape
        h2 = h.reshape(b * s, d).contiguous()
        (y,) = _project((glu.proj,), h2, lambda: h2, **kernel)   # (packed: no float rows read)
        hidden, gate = y.chunk(2, dim=-1)   # (SwiGLU's activation on (B, S, ·), as diffusers calls it)
        z = hidden * glu.activation(gate.view(b, s, -1)).reshape(b * s, -1)
        tanh = gate2.tanh()
        return _gated_out(fc2, z.view(b, s, -1), h2, b, tanh.reshape(b, d).float().contiguous(), tanh).view(b, s, d)


def fuse_nucleusmoe_blocks(model: nn.Module) -> int:
    """Swap every NucleusMoE block of ``model`` that :class:`FusedNucleusMoEImageTransformerBlock` handles and that has
    a packed linear with quantized activations to fuse; returns how many were swapped."""
    return swap_blocks(model, lambda m: FusedNucleusMoEImageTransformerBlock if _supported(m) else None, _linears)


register_block(FusedNucleusMoEImageTransformerBlock, 0)   # (returns hidden_states alone, as the original)
