"""Fused MiniMax-H3 blocks for packed inference: the fusions of :mod:`.diffusers_fused` for diffusers'
``MiniMaxH3TransformerBlock`` (the main blocks; the token refiner's stay unfused).

One packed sequence of text, video and audio tokens; the block's modulation projection gives six vectors per
(timestep, modality) pair, which each token selects by its ``adaln_indices`` (a modulation per token), around
RMSNorms with a weight (``w``):

    n = RMS(h)·w₁·(1 + scale_msa) + shift_msa;   h = h + gate_msa · attention(to_q, to_k, to_v ← Q(n))
    m = RMS(h)·w₂·(1 + scale_mlp) + shift_mlp;   h = h + gate_mlp · ff.net[2](Q(SwiGLU(ff.net[0].proj ← Q(m))))

Where a linear is a :class:`TreeQLinear` with quantized activations, the RMSNorm, its weight and the modulation run in
its ``quantize_input`` kernel (RMSNorm without affine, then ``x̂·(1 + k) + shift`` with ``k = w·(1 + scale) − 1``)
and the feed-forward's gated residual in ff.net[2]'s epilogue; SwiGLU runs between the kernels. The kernels run once
per sample and run of tokens selecting one pair (one call for to_q/to_k/to_v, one for the SwiGLU's projection, one
gated residual), each with that pair's modulation row: the runs have unequal lengths (text, condition, video, audio),
so evenly spaced groups (``per_token_modulation``) would be one per token, tables growing with the sequence.
The attention runs the block's own processor (the q/k RMSNorms, the rotary embedding, the output projection) on the
kernels' projections (``HandedAttention``); its gated residual is diffusers' sum. Fused and unfused agree to
float rounding, not bit for bit (the kernel scales x̂ by ``w·(1 + scale)`` in one step).

A block is swapped only in the structure diffusers builds (torch RMSNorms with a weight and an epsilon of the block's
width, a ``MiniMaxH3Attention``, a SwiGLU ``FeedForward``) with a packed linear with quantized activations to fuse. It
runs diffusers' own forward in training mode, on other input ranks or an empty batch or sequence, while a CUDA graph is
captured (the runs are read off the indices' values, which a capture cannot wait for), for rows whose dtype is not the
norms', and when a norm, the modulation projection or the attention carries a hook or another processor (or a projection
the kernels run does); a hooked feed-forward (or a part of it) runs as the module. The state dict is unchanged.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from diffusers.models.transformers.transformer_minimax_h3 import (MiniMaxH3AdaLayerNormModulation, MiniMaxH3Attention,
                                                                  MiniMaxH3AttnProcessor, MiniMaxH3TransformerBlock)

from .diffusers_fused import (_adopt, _bypassed_hook, _capturing, _forward_wrapped, _hooked, _project,
                              HandedAttention, once_per_forward, register_block, runs_processor, swap_blocks,
                              swiglu_feed_forward)
from .linear import runs_packed_kernels as _quantized

_PROJECTIONS = ("to_q", "to_k", "to_v")


def _norm(norm: Any, d: int) -> bool:
    """torch's RMSNorm with a weight and an epsilon (the kernel takes a positive one) over the last dim."""
    return (type(norm) is nn.RMSNorm and norm.weight is not None and tuple(norm.normalized_shape) == (d,)
            and norm.eps is not None and norm.eps > 0)


def _supported(block: nn.Module) -> bool:
    if type(block) is not MiniMaxH3TransformerBlock or _forward_wrapped(block):
        return False
    d = block.adaln_proj.hidden_size if type(block.adaln_proj) is MiniMaxH3AdaLayerNormModulation else None
    return (isinstance(d, int) and _norm(block.norm1, d) and _norm(block.norm2, d)
            and type(block.attn) is MiniMaxH3Attention and swiglu_feed_forward(block.ff, d))


def _linears(block: nn.Module) -> list[nn.Module]:
    a = block.attn
    return [a.to_q, a.to_k, a.to_v, block.ff.net[0].proj, block.ff.net[2]]


def _segments(indices: torch.Tensor) -> list[tuple[int, int, int]]:
    """The runs of equal modulation indices, (start, end, index): a packed sequence's text, condition, audio and video
    tokens (a few runs, however long the sequence). One device sync, once per forward (``once_per_forward``)."""
    cut = (torch.nonzero(indices[1:] != indices[:-1]).flatten() + 1).tolist()
    bounds = [0, *cut, indices.shape[0]]
    values = indices[bounds[:-1]].tolist()
    return [(a, e, v) for a, e, v in zip(bounds[:-1], bounds[1:], values)]


def _per_segment(layers: list[nn.Module], x2: torch.Tensor, b: int, s: int, segments: list[tuple[int, int, int]],
                 norm: nn.RMSNorm, shift: torch.Tensor, scale: torch.Tensor) -> list[torch.Tensor]:
    """Each packed layer of ``layers`` applied to ``RMS(x)·w·(1 + scale) + shift`` of the (B·S, D) rows ``x2``: the
    quantization kernel once per run of tokens sharing a modulation row (its shift and factor one (1, D) group), the
    rows' outputs in order. ``shift``, ``scale``: the (pairs, D) tables, in float32. The table the kernels read never
    grows with the sequence (a group per token would hold six (S, D) float32 tables)."""
    w = norm.weight.float()
    out: list[torch.Tensor] = []
    for i in range(b):
        for start, end, v in segments:
            rows = x2[i * s + start:i * s + end]
            k = (w * (1.0 + scale[v]) - 1.0).view(1, -1)
            ys = _project(layers, rows, lambda: rows, ln_eps=norm.eps, shift=shift[v].view(1, -1).contiguous(),
                          scale=k.contiguous(), rms_norm=True)
            if b == 1 and len(segments) == 1:
                return ys
            if not out:   # (written in place: no second copy of the outputs at once)
                out = [y.new_empty(b * s, y.shape[-1]) for y in ys]
            for o, y in zip(out, ys):
                o[i * s + start:i * s + end] = y
    return out


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
        proj = self.adaln_proj.linear
        # (while a CUDA graph is captured, or torch.compile traces, the runs, read off the indices' values, cannot be
        # found: diffusers' forward)
        if (self.training or h.ndim != 3 or 0 in h.shape[:2] or _capturing(h.device) or adaln_indices.ndim != 1
                or adaln_indices.shape[0] != h.shape[1] or n1.weight.dtype != h.dtype or n2.weight.dtype != h.dtype
                or _hooked(n1) or _hooked(n2) or _hooked(self.adaln_proj)
                or getattr(proj, "dtype_anchor", proj.weight).dtype != h.dtype
                or not runs_processor(attn, (MiniMaxH3AttnProcessor,), _PROJECTIONS)):
            return super().forward(*args)   # (a modulation of another dtype than the rows promotes them)
        b, s, d = h.shape
        vectors = [v.float() for v in self.adaln_proj(temb)]   # (six (pairs, D) tables, as diffusers computes them)
        segments = once_per_forward([adaln_indices], lambda: _segments(adaln_indices))

        def picked(i: int) -> torch.Tensor:   # (S, D): what diffusers' index_select gives, in the rows' dtype
            return vectors[i].to(h.dtype).index_select(0, adaln_indices)

        def rows1() -> torch.Tensor:
            return n1(h) * (1.0 + picked(1)) + picked(0)

        h2 = h.reshape(b * s, d).contiguous()
        packed = [n for n in _PROJECTIONS if _quantized(getattr(attn, n))]
        outs = _per_segment([getattr(attn, n) for n in packed], h2, b, s, segments, n1, vectors[0], vectors[1])
        handed = HandedAttention(attn, {n: y.view(b, s, -1) for n, y in zip(packed, outs)})
        rows = h if len(packed) == len(_PROJECTIONS) else rows1()
        h = h + picked(2) * attn.processor(handed, rows, rotary_emb, attention_mask)

        def rows2() -> torch.Tensor:
            return n2(h) * (1.0 + picked(4)) + picked(3)

        glu, fc2 = ff.net[0], ff.net[2]
        if (_hooked(ff) or _hooked(glu) or _hooked(glu.activation) or _hooked(ff.net[1]) or not _quantized(glu.proj)
                or _hooked(glu.proj) or _bypassed_hook(fc2)):
            return h + picked(5) * ff(rows2())
        h2 = h.reshape(b * s, d).contiguous()
        (y,) = _per_segment([glu.proj], h2, b, s, segments, n2, vectors[3], vectors[4])
        hidden, gate = y.chunk(2, dim=-1)   # (SwiGLU's: the activation on (B, S, ·), as diffusers calls it)
        z = hidden * glu.activation(gate.view(b, s, -1)).reshape(b * s, -1)
        if not _quantized(fc2):
            return h + picked(5) * fc2(z.view(b, s, -1))
        out = torch.empty_like(h2)   # (the feed-forward's gated residual: a gate row per run of tokens; per-token
        for i in range(b):           # codes, so each run's are the whole rows')
            for start, end, v in segments:
                r = slice(i * s + start, i * s + end)
                out[r] = fc2.linear(fc2.quantize_input(z[r].contiguous()), out_dtype=h.dtype, residual=h2[r],
                                    gate=vectors[5][v].view(1, -1).contiguous())
        return out.view(b, s, d)


def fuse_minimaxh3_blocks(model: nn.Module) -> int:
    """Swap every MiniMax-H3 block of ``model`` that :class:`FusedMiniMaxH3TransformerBlock` handles and that has a
    packed linear with quantized activations to fuse; returns how many were swapped."""
    return swap_blocks(model, lambda m: FusedMiniMaxH3TransformerBlock if _supported(m) else None, _linears)


register_block(FusedMiniMaxH3TransformerBlock, 0)   # returns hidden_states alone, as the original
