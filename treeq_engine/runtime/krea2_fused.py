"""Fused Krea 2 blocks for packed inference: the fusions of :mod:`.diffusers_fused` for diffusers'
``Krea2TransformerBlock`` (the main blocks; the text fusion's blocks stay unfused).

One stream of [text; image] tokens; the model's timestep projection ``temb`` (B, 1, 6·D), shared by every block, plus
the block's own table gives six vectors per sample (prescale, preshift, pregate, postscale, postshift, postgate)
around float32 RMSNorms whose weight is zero-centred (the multiplier ``1 + w``):

    n = (1 + prescale) · RMS(h)·(1 + w₁) + preshift
    h = h + pregate · to_out(attention(to_q, to_k, to_v ← Q(n)) · sigmoid(to_gate ← Q(n)))
    x = (1 + postscale) · RMS(h)·(1 + w₂) + postshift
    h = h + postgate · down(Q(SiLU(gate ← Q(x)) ⊙ up ← Q(x)))

Where a linear is a :class:`TreeQLinear` with quantized activations, the RMSNorm, its weight, the modulation and the
quantization run in its ``quantize_input`` kernel: RMSNorm without affine, then ``x̂·(1 + k) + shift`` with ``k =
(1 + w)(1 + scale) − 1``; one call serves to_q, to_k, to_v and to_gate, one the feed-forward's gate and up (per
activation spec, without a Monarch branch). The feed-forward's gated residual runs in down's epilogue; SiLU ⊙ between
the kernels. The attention runs the block's own processor (``Krea2AttnProcessor``: grouped-query heads, the q/k
RMSNorms, the rotary embedding, the text mask, the sigmoid gate, the output projection) on the kernels' projections
(``HandedAttention``); its gated residual is diffusers' sum. Fused and unfused agree to float rounding, not bit for
bit (the kernel multiplies x̂ by ``(1 + w)(1 + scale)`` once, where diffusers multiplies twice and rounds between).

A block is swapped only in the structure diffusers builds (Krea 2's RMSNorms of the block's width, a table of six
vectors, a ``Krea2Attention``, a ``Krea2SwiGLU``) with a packed linear with quantized activations to fuse. It runs
diffusers' own forward in training mode, for a ``temb`` that is not (B, 1, 6·D) in the rows' batch and dtype, and
when a norm or the attention carries a hook or another processor (or a projection the kernels run does); a hooked
feed-forward (or one of its packed linears) runs as the module. diffusers' block-level hooks (FirstBlockCache,
MagCache) find both classes, fused or not, in ``TransformerBlockRegistry``. The state dict is unchanged.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.models.transformers.transformer_krea2 import (Krea2Attention, Krea2AttnProcessor, Krea2RMSNorm,
                                                             Krea2SwiGLU, Krea2TransformerBlock)

from .diffusers_fused import (_adopt, _bypassed_hook, _forward_wrapped, _gated_out, _hooked, _project,
                              hand_projections, like_rows, register_block, runs_processor, swap_blocks)

_PROJECTIONS = ("to_q", "to_k", "to_v", "to_gate")


def _norm(norm: Any, d: int) -> bool:
    return type(norm) is Krea2RMSNorm and norm.dim == d and norm.eps > 0 and tuple(norm.weight.shape) == (d,)


def _supported(block: nn.Module) -> bool:
    if type(block) is not Krea2TransformerBlock or _forward_wrapped(block):
        return False
    table = block.scale_shift_table
    d = table.shape[1] if table.dim() == 2 and table.shape[0] == 6 else None
    ff = block.ff
    return (d is not None and _norm(block.norm1, d) and _norm(block.norm2, d) and type(block.attn) is Krea2Attention
            and type(ff) is Krea2SwiGLU and all(getattr(getattr(ff, n), "in_features", None) == d
                                               for n in ("gate", "up")))


def _linears(block: nn.Module) -> list[nn.Module]:
    a, ff = block.attn, block.ff
    return [a.to_q, a.to_k, a.to_v, a.to_gate, ff.gate, ff.up, ff.down]


def _factor(norm: Krea2RMSNorm, scale: torch.Tensor, shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's ``(shift, k)``, float32 (B, D), for ``(1 + scale)·RMS(x)·(1 + w) + shift`` (``scale``,
    ``shift``: diffusers' (B, 1, D) chunks)."""
    k = (1.0 + norm.weight.float()) * (1.0 + scale.float().squeeze(1)) - 1.0
    return shift.float().squeeze(1).contiguous(), k.contiguous()


class FusedKrea2TransformerBlock(Krea2TransformerBlock):
    """A ``Krea2TransformerBlock`` running the fused packed kernels (module docstring)."""

    def __init__(self, block: Krea2TransformerBlock) -> None:
        if not _supported(block):
            raise ValueError("FusedKrea2TransformerBlock handles Krea2TransformerBlock in the structure diffusers "
                             "builds")
        _adopt(self, block)

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor, image_rotary_emb: Any,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        args = (hidden_states, temb, image_rotary_emb, attention_mask)
        h, attn, n1, n2 = hidden_states, self.attn, self.norm1, self.norm2
        d = self.scale_shift_table.shape[1]
        if (self.training or h.ndim != 3 or temb.ndim != 3 or tuple(temb.shape[1:]) != (1, 6 * d)
                or not like_rows(h, temb) or _hooked(n1) or _hooked(n2)
                or not runs_processor(attn, (Krea2AttnProcessor,), _PROJECTIONS)):
            return super().forward(*args)
        b, t, _ = h.shape
        modulation = temb.unflatten(-1, (6, -1)) + self.scale_shift_table   # (B, 1, 6, D), as diffusers adds them
        prescale, preshift, pregate, postscale, postshift, postgate = modulation.unbind(-2)

        def pre() -> torch.Tensor:
            return (1.0 + prescale) * n1(h) + preshift

        shift, k = _factor(n1, prescale, preshift)
        # (the processor reads the rows only through the projections it runs itself: 16-bit ones)
        handed, rows = hand_projections(attn, _PROJECTIONS, h, pre, ln_eps=n1.eps, shift=shift, scale=k,
                                        rms_norm=True)
        h = h + pregate * attn.processor(handed, rows, attention_mask, image_rotary_emb)

        def post() -> torch.Tensor:
            return (1.0 + postscale) * n2(h) + postshift

        ff = self.ff
        if _hooked(ff) or any(_bypassed_hook(m) for m in (ff.gate, ff.up, ff.down)):
            return h + postgate * ff(post())
        h2 = h.reshape(b * t, d).contiguous()
        shift, k = _factor(n2, postscale, postshift)
        g, u = _project((ff.gate, ff.up), h2, post, ln_eps=n2.eps, shift=shift, scale=k, rms_norm=True)
        gate32 = postgate.float().squeeze(1).contiguous()
        return _gated_out(ff.down, F.silu(g) * u, h2, b, gate32, postgate).view(b, t, d)


def fuse_krea2_blocks(model: nn.Module) -> int:
    """Swap every Krea 2 block of ``model`` that :class:`FusedKrea2TransformerBlock` handles and that has a packed
    linear with quantized activations to fuse; returns how many were swapped."""
    return swap_blocks(model, lambda m: FusedKrea2TransformerBlock if _supported(m) else None, _linears)


register_block(FusedKrea2TransformerBlock, 0)   # returns hidden_states alone, as the original
