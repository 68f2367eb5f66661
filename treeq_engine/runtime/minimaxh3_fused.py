"""Fused MiniMax-H3 blocks for packed inference: the fusions of :mod:`.diffusers_fused` for diffusers'
``MiniMaxH3TransformerBlock`` (the main blocks; the token refiner's stay unfused).

One packed sequence of text, video and audio tokens; the block's modulation projection gives six vectors per
(timestep, modality) pair, which each token selects by its ``adaln_indices`` (a modulation per token), around
RMSNorms with a weight (``w``):

    n = RMS(h)·w₁·(1 + scale_msa) + shift_msa;   h = h + gate_msa · attention(to_q, to_k, to_v ← Q(n))
    m = RMS(h)·w₂·(1 + scale_mlp) + shift_mlp;   h = h + gate_mlp · ff.net[2](Q(SwiGLU(ff.net[0].proj ← Q(m))))

Where a linear is a :class:`TreeQLinear` with quantized activations, the RMSNorm, its weight and the modulation run in
its ``quantize_input`` kernel (RMSNorm without affine, then ``x̂·(1 + k) + shift`` with ``k = w·(1 + scale) − 1``, a
modulation group per run of tokens selecting one pair: ``per_token_modulation``; one call for to_q/to_k/to_v, one for
the SwiGLU's projection) and the feed-forward's gated residual in ff.net[2]'s epilogue; SwiGLU runs between the
kernels. The attention runs the block's own processor (the q/k RMSNorms, the rotary embedding, the output projection)
on the kernels' projections (``HandedAttention``); its gated residual is diffusers' sum. Fused and unfused agree to
float rounding, not bit for bit (the kernel scales x̂ by ``w·(1 + scale)`` in one step).

A block is swapped only in the structure diffusers builds (torch RMSNorms with a weight and an epsilon of the block's
width, a ``MiniMaxH3Attention``, a SwiGLU ``FeedForward``) with a packed linear with quantized activations to fuse. It
runs diffusers' own forward in training mode, on other input ranks, for rows whose dtype is not the norms', and when a
norm, the modulation projection or the attention carries a hook or another processor (or a projection the kernels run
does); a hooked feed-forward (or a part of it) runs as the module. The state dict is unchanged.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from diffusers.models.attention import FeedForward
from diffusers.models.activations import SwiGLU
from diffusers.models.transformers.transformer_minimax_h3 import (MiniMaxH3AdaLayerNormModulation, MiniMaxH3Attention,
                                                                  MiniMaxH3AttnProcessor, MiniMaxH3TransformerBlock)

from .diffusers_fused import (_adopt, _bypassed_hook, _forward_wrapped, _gated_out, _hooked, _project,
                              hand_projections, per_token_modulation, register_block, runs_processor, swap_blocks)

_PROJECTIONS = ("to_q", "to_k", "to_v")


def _norm(norm: Any, d: int) -> bool:
    """torch's RMSNorm with a weight and an epsilon (the kernel takes a positive one) over the last dim."""
    return (type(norm) is nn.RMSNorm and norm.weight is not None and tuple(norm.normalized_shape) == (d,)
            and norm.eps is not None and norm.eps > 0)


def _supported(block: nn.Module) -> bool:
    if type(block) is not MiniMaxH3TransformerBlock or _forward_wrapped(block):
        return False
    d = block.adaln_proj.hidden_size if type(block.adaln_proj) is MiniMaxH3AdaLayerNormModulation else None
    ff = block.ff
    net: Any = getattr(ff, "net", None)
    return (isinstance(d, int) and _norm(block.norm1, d) and _norm(block.norm2, d)
            and type(block.attn) is MiniMaxH3Attention and type(ff) is FeedForward and len(net) == 3
            and type(net[0]) is SwiGLU and type(net[1]) is nn.Dropout
            and getattr(net[0].proj, "in_features", None) == d and getattr(net[2], "out_features", None) == d)


def _linears(block: nn.Module) -> list[nn.Module]:
    a = block.attn
    return [a.to_q, a.to_k, a.to_v, block.ff.net[0].proj, block.ff.net[2]]


class FusedMiniMaxH3TransformerBlock(MiniMaxH3TransformerBlock):
    """A ``MiniMaxH3TransformerBlock`` running the fused packed kernels (module docstring)."""

    def __init__(self, block: MiniMaxH3TransformerBlock) -> None:
        if not _supported(block):
            raise ValueError("FusedMiniMaxH3TransformerBlock handles MiniMaxH3TransformerBlock in the structure "
                             "diffusers builds")
        _adopt(self, block)

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor, adaln_indices: torch.Tensor,
                rotary_emb: Any, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        args = (hidden_states, temb, adaln_indices, rotary_emb, attention_mask)
        h, attn, n1, n2, ff = hidden_states, self.attn, self.norm1, self.norm2, self.ff
        if (self.training or h.ndim != 3 or adaln_indices.ndim != 1 or adaln_indices.shape[0] != h.shape[1]
                or n1.weight.dtype != h.dtype or n2.weight.dtype != h.dtype or _hooked(n1) or _hooked(n2)
                or _hooked(self.adaln_proj) or not runs_processor(attn, (MiniMaxH3AttnProcessor,), _PROJECTIONS)):
            return super().forward(*args)
        b, s, d = h.shape
        vectors = self.adaln_proj(temb)   # (six (pairs, D), as diffusers computes them)
        picked = [v.index_select(0, adaln_indices) for v in vectors]   # (S, D) each, as diffusers selects them
        if any(p.dtype != h.dtype for p in picked):   # (a modulation of another dtype promotes the rows)
            return super().forward(*args)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = picked
        # the kernels' groups: a run of tokens selecting one pair shares one (found on the indices), every sample alike
        m32 = per_token_modulation(lambda i: picked[i].expand(b, s, d), b * s, runs_of=adaln_indices.view(1, s, 1))

        def factor(norm: nn.RMSNorm, shift: torch.Tensor, scale: torch.Tensor) -> dict[str, Any]:
            k = (norm.weight.float() * (1.0 + scale) - 1.0).contiguous()
            return dict(ln_eps=norm.eps, shift=shift.contiguous(), scale=k, rms_norm=True)

        def rows1() -> torch.Tensor:
            return n1(h) * (1.0 + scale_msa) + shift_msa

        handed, rows = hand_projections(attn, _PROJECTIONS, h, rows1, **factor(n1, m32[0], m32[1]))
        h = h + gate_msa * attn.processor(handed, rows, rotary_emb, attention_mask)

        def rows2() -> torch.Tensor:
            return n2(h) * (1.0 + scale_mlp) + shift_mlp

        glu, fc2 = ff.net[0], ff.net[2]
        if (_hooked(ff) or _hooked(glu) or _hooked(glu.activation) or _hooked(ff.net[1])
                or _bypassed_hook(glu.proj) or _bypassed_hook(fc2)):
            return h + gate_mlp * ff(rows2())
        h2 = h.reshape(b * s, d).contiguous()
        (y,) = _project((glu.proj,), h2, rows2, **factor(n2, m32[3], m32[4]))
        hidden, gate = y.chunk(2, dim=-1)   # (SwiGLU's: the activation on (B, S, ·), as diffusers calls it)
        act = glu.activation(gate.view(b, s, -1)).reshape(b * s, -1)
        return _gated_out(fc2, hidden * act, h2, b, m32[5], gate_mlp).view(b, s, d)


def fuse_minimaxh3_blocks(model: nn.Module) -> int:
    """Swap every MiniMax-H3 block of ``model`` that :class:`FusedMiniMaxH3TransformerBlock` handles and that has a
    packed linear with quantized activations to fuse; returns how many were swapped."""
    return swap_blocks(model, lambda m: FusedMiniMaxH3TransformerBlock if _supported(m) else None, _linears)


register_block(FusedMiniMaxH3TransformerBlock, 0)   # returns hidden_states alone, as the original
