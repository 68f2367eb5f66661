"""Fused ERNIE-Image blocks for packed inference: the fusions of :mod:`.diffusers_fused` for diffusers'
``ErnieImageSharedAdaLNBlock``.

ERNIE-Image keeps its rows sequence-first, (S, B, D), and hands every block the same six modulation tables, each
(S, B, D): the per-sample vectors of ``adaLN_modulation`` expanded over the sequence. Around RMSNorms with a weight,
modulated in float32:

    n = RMS(x)·w₁·(1 + scale_msa) + shift_msa;   x = x + gate_msa · attention(to_q, to_k, to_v ← Q(n))
    m = RMS(x)·w₂·(1 + scale_mlp) + shift_mlp;   x = x + gate_mlp · fc2(Q(up ← Q(m) ⊙ GELU(gate_proj ← Q(m))))

Where a linear is a :class:`TreeQLinear` with quantized activations, the RMSNorm, its weight and the modulation run in
its ``quantize_input`` kernel (RMSNorm without affine, then ``x̂·(1 + k) + shift`` with ``k = w·(1 + scale) − 1``;
one call for to_q/to_k/to_v, one for the feed-forward's gate_proj and up_proj) and the feed-forward's gated residual
in linear_fc2's epilogue; ``up ⊙ GELU(gate)`` runs between the kernels. The kernels read rows in sample order, so
the block works on the rows transposed to (B, S, D) (the attention reads them so anyway) and returns them as an
(S, B, D) view: the next block's transpose is then free. The kernels take one modulation group per run of tokens
sharing one row in every table, found once per forward (``once_per_forward``) on the tables every block is handed:
the model's expanded tables give one group per sample. The attention runs the block's own processor (the q/k
RMSNorms, the rotary embedding, the text mask, the output projection) on the kernels' projections
(``HandedAttention``); its gated residual is diffusers' sum. Fused and unfused agree to float rounding, not bit for
bit (the kernel scales x̂ by ``w·(1 + scale)`` in one step, and adds the feed-forward's gated output before rounding).

A block is swapped only in the structure diffusers builds (diffusers' RMSNorms with a weight, an
``ErnieImageAttention``, an ``ErnieImageFeedForward``) with a packed linear with quantized activations to fuse. It
runs diffusers' own forward in training mode, for rows whose dtype is not the norms', for tables that are not six
of the rows' shape, and when a norm or the attention carries a hook or another processor (or a projection the
kernels run does); a hooked feed-forward (or one of its packed linears), or one whose gate_proj or up_proj is not
packed, runs as the module. The state dict is
unchanged.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.models.transformers.transformer_ernie_image import (ErnieImageAttention, ErnieImageFeedForward,
                                                                   ErnieImageSharedAdaLNBlock,
                                                                   ErnieImageSingleStreamAttnProcessor)

from .diffusers_fused import (_adopt, _bypassed_hook, _forward_wrapped, _hooked, _project, hand_projections,
                              once_per_forward, register_block, run_length, runs_processor, swap_blocks,
                              weighted_rms_norm)
from .linear import runs_packed_kernels as _quantized

_PROJECTIONS = ("to_q", "to_k", "to_v")


def _supported(block: nn.Module) -> bool:
    if type(block) is not ErnieImageSharedAdaLNBlock or _forward_wrapped(block):
        return False
    attn, mlp = block.self_attention, block.mlp
    d = getattr(attn, "query_dim", None)
    return (isinstance(d, int) and weighted_rms_norm(block.adaLN_sa_ln, d)
            and weighted_rms_norm(block.adaLN_mlp_ln, d) and type(attn) is ErnieImageAttention
            and len(attn.to_out) == 1 and type(mlp) is ErnieImageFeedForward
            and mlp.gate_proj.in_features == d and mlp.up_proj.in_features == d and mlp.linear_fc2.out_features == d)


def _linears(block: nn.Module) -> list[nn.Module]:
    a, mlp = block.self_attention, block.mlp
    return [a.to_q, a.to_k, a.to_v, mlp.gate_proj, mlp.up_proj, mlp.linear_fc2]


def _kernel_tables(temb: list[torch.Tensor]) -> torch.Tensor:
    """The six (S, B, D) tables as the kernels take them, float32 (6, G, D) in sample order: a group per run of
    tokens that every table repeats (``run_length``; one per sample for the model's expanded tables)."""
    by_sample = [t.transpose(0, 1) for t in temb]   # (B, S, D) views
    r = run_length(by_sample)
    return torch.stack([t[:, ::r].reshape(-1, t.shape[-1]) for t in by_sample]).float()


class FusedErnieImageSharedAdaLNBlock(ErnieImageSharedAdaLNBlock):
    """An ``ErnieImageSharedAdaLNBlock`` running the fused packed kernels (module docstring)."""

    def __init__(self, block: ErnieImageSharedAdaLNBlock) -> None:
        if type(block) is not ErnieImageSharedAdaLNBlock or not _supported(block):
            raise ValueError("FusedErnieImageSharedAdaLNBlock handles ErnieImageSharedAdaLNBlock in the structure "
                             "diffusers builds")
        _adopt(self, block)

    def forward(self, x: torch.Tensor, rotary_pos_emb: Any, temb: Any,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        args = (x, rotary_pos_emb, temb, attention_mask)
        attn, n1, n2, mlp = self.self_attention, self.adaLN_sa_ln, self.adaLN_mlp_ln, self.mlp
        if (self.training or x.ndim != 3 or not isinstance(temb, (list, tuple)) or len(temb) != 6
                or any(not isinstance(t, torch.Tensor) or t.shape != x.shape or t.dtype != x.dtype for t in temb)
                or n1.weight.dtype != x.dtype or n2.weight.dtype != x.dtype or _hooked(n1) or _hooked(n2)
                or not runs_processor(attn, (ErnieImageSingleStreamAttnProcessor,), _PROJECTIONS)):
            return super().forward(*args)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = temb
        s, b, d = x.shape
        m32 = once_per_forward(list(temb), lambda: _kernel_tables(list(temb)))

        def modulated(rows: torch.Tensor, norm: nn.Module, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
            h = norm(rows)   # (diffusers' rows, sequence-first)
            return (h.float() * (1 + scale.float()) + shift.float()).to(h.dtype)

        def kernel(norm: nn.Module, i: int) -> dict[str, Any]:
            k = (norm.weight.float() * (1.0 + m32[i + 1]) - 1.0).contiguous()
            return dict(ln_eps=norm.eps, shift=m32[i].contiguous(), scale=k, rms_norm=True)

        xb = x.transpose(0, 1).contiguous()   # (B, S, D): the kernels' row order (free where x is a block's output)
        handed, rows = hand_projections(attn, _PROJECTIONS, xb,
                                        lambda: modulated(x, n1, shift_msa, scale_msa).transpose(0, 1),
                                        **kernel(n1, 0))
        out = attn.processor(handed, rows, attention_mask, rotary_pos_emb).transpose(0, 1)
        x = x + (gate_msa.float() * out.float()).to(x.dtype)

        gate_proj, up, fc2 = mlp.gate_proj, mlp.up_proj, mlp.linear_fc2
        # (gate_proj and up both by the kernel, or the module: a float projection would see other rows than
        # diffusers' sequence-first ones)
        if (_hooked(mlp) or not _quantized(gate_proj) or not _quantized(up) or _hooked(gate_proj) or _hooked(up)
                or _bypassed_hook(fc2)):
            return x + (gate_mlp.float() * mlp(modulated(x, n2, shift_mlp, scale_mlp)).float()).to(x.dtype)
        xb = x.transpose(0, 1).contiguous()
        x2 = xb.view(b * s, d)
        g, u = _project((gate_proj, up), x2, lambda: xb, **kernel(n2, 3))   # (both packed: no float rows read)
        h = u * F.gelu(g)
        if not _quantized(fc2):   # (called on the sequence-first rows, as diffusers calls it)
            y = fc2(h.view(b, s, -1).transpose(0, 1))
            return x + (gate_mlp.float() * y.float()).to(x.dtype)
        out = fc2.linear(fc2.quantize_input(h), out_dtype=x.dtype, residual=x2, gate=m32[5])
        return out.view(b, s, d).transpose(0, 1)


def fuse_ernieimage_blocks(model: nn.Module) -> int:
    """Swap every ERNIE-Image block of ``model`` that :class:`FusedErnieImageSharedAdaLNBlock` handles and that has a
    packed linear with quantized activations to fuse; returns how many were swapped."""
    return swap_blocks(model, lambda m: FusedErnieImageSharedAdaLNBlock if _supported(m) else None, _linears)


register_block(FusedErnieImageSharedAdaLNBlock, 0, hidden_states_argument_name="x")   # (returns x alone)
