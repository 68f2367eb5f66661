"""Fused Z-Image blocks for packed inference: the fusions of :mod:`.diffusers_fused` for diffusers'
``ZImageTransformerBlock`` (Z-Image, Z-Image-Turbo and Z-Image Omni: the main blocks and the noise and context
refiners), and for Bria FIBO 2's copy of it (``FusedBriaFibo2TransformerBlock``).

The block, with RMSNorms carrying a weight ``w`` and a modulation ``(scale, gate)`` per sample, or per token where
the forward is handed a ``noise_mask`` (Omni's and Bria FIBO 2's noisy and clean tokens, each kind its own; the
kernels then take a modulation group per run of tokens sharing one), the context refiner none (scale 0, gate 1, no
tanh):

    q, k, v = to_q/k/v ← Q(RMS(h)·w₁·(1 + scale_msa))
    h = h + tanh(gate_msa) · RMSNorm₂(to_out(attention(RMSNorm(q), RMSNorm(k), v, rotary, mask)))
    a, b = w1/w3 ← Q(RMS(h)·w₃·(1 + scale_mlp))
    h = h + tanh(gate_mlp) · RMSNorm₄(w2(SiLU(a) ⊙ b))

Where a linear is a :class:`TreeQLinear` with quantized activations, the RMSNorm, its weight, the modulation and
the quantization run in its ``quantize_input`` kernel: the kernel's RMSNorm without affine, then ``x̂·(1 + k)``
with ``k = w·(1 + scale) − 1`` (the norm's weight and the modulation make one per-feature factor per sample). One
such call serves to_q/to_k/to_v, one w1/w3 (per activation spec, without a Monarch branch: a branch's stage 1 needs
the layer's own call). What stays in torch: the attention (``ZSingleStreamAttnProcessor``'s computation: RMSNorm
on q and k per head, the complex rotary embedding, ``dispatch_attention_fn`` with the processor's backend and the
batch's padding mask), SiLU ⊙, and the gated residuals: the sandwich RMSNorms after to_out and w2 need whole output
rows, which no GEMM tile owns. to_out and w2 run as modules (a packed one quantizes its own input). Fused and
unfused agree to float rounding, not bit for bit: the kernel multiplies x̂ by ``w·(1 + scale)`` where diffusers
multiplies by ``w``, then by ``1 + scale`` (and rounds to the model dtype in between).

A block is swapped only in the structure diffusers builds (RMSNorms with a weight and no bias before the attention
and the feed-forward, the SwiGLU feed-forward, an ``Attention`` with ``ZSingleStreamAttnProcessor``) with a packed
linear with quantized activations to fuse. It runs diffusers' own forward in training mode, on other input ranks,
for a conditioning batch other than the rows' (diffusers broadcasts it), and when a norm the kernel computes or the
attention carries a hook or another processor; a feed-forward that is hooked (or one of w1/w3 that is hooked and
packed) runs as a module. Bria FIBO 2's self-attention runs its own processor on the kernels' projections
(``HandedAttention``); its injection blocks' gated text cross-attention runs between the attention and the
feed-forward as diffusers runs it. diffusers' block-level hooks (FirstBlockCache, MagCache) find Z-Image's fused
class in ``TransformerBlockRegistry`` under the original's entry (diffusers has none for Bria FIBO 2's block, whose
model those hooks do not run on, fused or not). The state dict is unchanged.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.attention_processor import Attention
from diffusers.models.transformers.transformer_z_image import (FeedForward, ZImageTransformerBlock,
                                                               ZSingleStreamAttnProcessor)

try:   # (Bria FIBO 2's copy of the block: absent from older releases)
    from diffusers.models.transformers import transformer_bria_fibo2 as _fibo2
except ImportError:
    _fibo2 = None

from .diffusers_fused import (_adopt, _forward_wrapped, _hooked, _project, dispatch_kwargs, hand_projections,
                              like_rows, per_token_modulation, register_block, rms_factor, runs_processor,
                              sandwich_swiglu, swap_blocks, weighted_rms_norm)


def _zimage_supported(block: nn.Module) -> bool:
    if type(block) is not ZImageTransformerBlock or _forward_wrapped(block):
        return False
    d = block.dim
    attn, ff = block.attention, block.feed_forward
    if block.modulation:
        seq = block.adaLN_modulation
        if len(seq) != 1 or getattr(seq[0], "out_features", None) != 4 * d:
            return False
    return (weighted_rms_norm(block.attention_norm1, d) and weighted_rms_norm(block.ffn_norm1, d)
            and type(attn) is Attention and attn.to_q is not None and attn.to_k is not None
            and attn.to_v is not None and type(ff) is FeedForward
            and getattr(ff.w1, "in_features", None) == d and getattr(ff.w3, "in_features", None) == d)


def _linears(block: nn.Module) -> list[nn.Module]:
    a, ff = block.attention, block.feed_forward
    return [a.to_q, a.to_k, a.to_v, ff.w1, ff.w3]


def _rotate(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Z-Image's rotary embedding of (B, S, heads, head_dim) rows: adjacent pairs as complex numbers times
    ``freqs_cis (B, S, head_dim / 2)``, in float32 (the processor's ``apply_rotary_emb``)."""
    with torch.amp.autocast("cuda", enabled=False):
        xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(xc * freqs_cis.unsqueeze(2)).flatten(3).type_as(x)


def _attention(attn: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, b: int, mask: torch.Tensor | None,
               freqs_cis: torch.Tensor | None) -> torch.Tensor:
    """``ZSingleStreamAttnProcessor``'s attention of (B·S, inner) projection rows, then to_out: (B, S, D)."""
    query, key, value = (t.view(b, -1, attn.heads, t.shape[-1] // attn.heads) for t in (q, k, v))
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    if freqs_cis is not None:
        query, key = _rotate(query, freqs_cis), _rotate(key, freqs_cis)
    dtype = query.dtype
    key = key.to(dtype)
    if mask is not None and mask.ndim == 2:
        mask = mask[:, None, None, :]
    o = dispatch_attention_fn(query, key, value, attn_mask=mask, dropout_p=0.0, is_causal=False,
                              **dispatch_kwargs(attn.processor))
    out = attn.to_out[0](o.flatten(2, 3).to(dtype))
    return attn.to_out[1](out) if len(attn.to_out) > 1 else out


class FusedZImageTransformerBlock(ZImageTransformerBlock):
    """A ``ZImageTransformerBlock`` running the fused packed kernels (module docstring)."""

    def __init__(self, block: ZImageTransformerBlock) -> None:
        if not _zimage_supported(block):
            raise ValueError("FusedZImageTransformerBlock handles ZImageTransformerBlock in the structure diffusers "
                             "builds")
        _adopt(self, block)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor, freqs_cis: torch.Tensor,
                adaln_input: torch.Tensor | None = None, noise_mask: torch.Tensor | None = None,
                adaln_noisy: torch.Tensor | None = None, adaln_clean: torch.Tensor | None = None) -> torch.Tensor:
        # diffusers' forward, with Omni's arguments only where given (before 0.37 it takes none of them)
        omni = {k: v for k, v in (("noise_mask", noise_mask), ("adaln_noisy", adaln_noisy),
                                  ("adaln_clean", adaln_clean)) if v is not None}
        args = (x, attn_mask, freqs_cis, adaln_input)
        if not _sandwich_ok(self, x, adaln_input, noise_mask, adaln_noisy, adaln_clean, self.modulation) \
                or not runs_processor(self.attention, (ZSingleStreamAttnProcessor,)):
            return super().forward(*args, **omni)
        a = self.attention

        def attend(rows: torch.Tensor, shift: torch.Tensor, k: torch.Tensor, float_rows: Any) -> torch.Tensor:
            b = rows.shape[0]
            x2 = rows.reshape(-1, rows.shape[-1]).contiguous()   # (a strided batch-1 view: the kernels need rows)
            q, kk, v = _project((a.to_q, a.to_k, a.to_v), x2, float_rows, ln_eps=self.attention_norm1.eps,
                                shift=shift, scale=k, rms_norm=True)
            return _attention(a, q, kk, v, b, attn_mask, freqs_cis)

        out = _sandwich_forward(self, x, attend, adaln_input, noise_mask, adaln_noisy, adaln_clean,
                                self.modulation)
        return super().forward(*args, **omni) if out is None else out


def _sandwich_ok(block: Any, x: torch.Tensor, adaln_input: Any, noise_mask: Any, adaln_noisy: Any,
                 adaln_clean: Any, modulated: bool) -> bool:
    """What every Z-Image-style fused forward checks before any layer runs: eval mode, (B, S, D) rows, the
    conditioning's batch (a batch of 1 diffusers broadcasts: its forward), no hook on a norm the kernel computes."""
    if block.training or x.ndim != 3 or _hooked(block.attention_norm1) or _hooked(block.ffn_norm1):
        return False
    if not modulated:
        return True
    if noise_mask is None:
        return adaln_input is not None and like_rows(x, adaln_input, dtype=False)
    return (adaln_noisy is not None and adaln_clean is not None and tuple(noise_mask.shape) == tuple(x.shape[:2])
            and like_rows(x, adaln_noisy, adaln_clean, dtype=False))


def _modulation(block: Any, x: torch.Tensor, adaln_input: Any, noise_mask: Any, adaln_noisy: Any,
                adaln_clean: Any) -> tuple[tuple[torch.Tensor, ...], torch.Tensor | None] | None:
    """The block's (scale_msa, gate_msa, scale_mlp, gate_mlp) as diffusers computes them (``1 + s``, ``tanh(g)``):
    (B, 1, D) per sample, or per token (Z-Image Omni's, Bria FIBO 2's noisy and clean tokens: ``noise_mask``)
    (B, S, D) with the kernels' groups of the two scales, (2, G, D) float32 (``per_token_modulation``: a group per
    run of tokens); None where the shapes are not these."""
    b, s, d = x.shape
    if noise_mask is None:
        mod = block.adaLN_modulation(adaln_input)
        scale_msa, gate_msa, scale_mlp, gate_mlp = mod.unsqueeze(1).chunk(4, dim=2)
        gate_msa, gate_mlp = gate_msa.tanh(), gate_mlp.tanh()
        scale_msa, scale_mlp = 1.0 + scale_msa, 1.0 + scale_mlp
        return ((scale_msa, gate_msa, scale_mlp, gate_mlp), None) if scale_msa.shape == (b, 1, d) else None
    noisy, clean = (block.adaLN_modulation(e).chunk(4, dim=1) for e in (adaln_noisy, adaln_clean))
    mods = []
    for i in range(4):   # (scale, gate, scale, gate)
        n, c = (1.0 + noisy[i], 1.0 + clean[i]) if i % 2 == 0 else (noisy[i].tanh(), clean[i].tanh())
        mods.append(torch.where(noise_mask.unsqueeze(-1) == 1, n.unsqueeze(1).expand(-1, s, -1),
                                c.unsqueeze(1).expand(-1, s, -1)))   # (diffusers' select_per_token)
    if mods[0].shape != (b, s, d):
        return None
    # (the runs found on the mask every block is handed, once per forward: the scales' runs are its or coarser)
    return tuple(mods), per_token_modulation(lambda i: mods[2 * i], b * s, chunks=2, runs_of=noise_mask)


def _sandwich_forward(block: Any, x: torch.Tensor, attend: Any, adaln_input: Any, noise_mask: Any,
                      adaln_noisy: Any, adaln_clean: Any, modulated: bool,
                      between: Any = None) -> torch.Tensor | None:
    """A Z-Image-style block (module docstring) on the rows ``x``: ``attend(x, shift, k, float_rows)`` its
    attention's output (B, S, D) from the kernels' RMSNorm factor; ``between(x)``: what runs between the attention
    and the feed-forward (Bria FIBO 2's text cross-attention). None where diffusers' forward must run."""
    b, s, d = x.shape
    n1, n3 = block.attention_norm1, block.ffn_norm1
    scale_msa = gate_msa = scale_mlp = gate_mlp = grouped = None
    if modulated:
        m = _modulation(block, x, adaln_input, noise_mask, adaln_noisy, adaln_clean)
        if m is None:
            return None
        (scale_msa, gate_msa, scale_mlp, gate_mlp), grouped = m

    def msa_rows() -> torch.Tensor:
        return n1(x) if scale_msa is None else n1(x) * scale_msa

    shift, k = rms_factor(n1, scale_msa, b, d, None if grouped is None else grouped[0])
    y = block.attention_norm2(attend(x, shift, k, msa_rows))
    x = x + (y if gate_msa is None else gate_msa * y)
    if between is not None:
        x = between(x)
    ff = block.feed_forward
    return sandwich_swiglu(x, n3, block.ffn_norm2, ff, (ff.w1, ff.w3, ff.w2), F.silu, scale_mlp, gate_mlp,
                           None if grouped is None else grouped[1])


def _fibo2_supported(block: nn.Module) -> bool:
    if _fibo2 is None or type(block) is not _fibo2.BriaFibo2TransformerBlock or _forward_wrapped(block):
        return False
    attn, ff, seq = block.attention, block.feed_forward, block.adaLN_modulation
    d = getattr(attn.to_q, "in_features", None)
    return (isinstance(d, int) and len(seq) == 1 and getattr(seq[0], "out_features", None) == 4 * d
            and weighted_rms_norm(block.attention_norm1, d) and weighted_rms_norm(block.ffn_norm1, d)
            and type(attn) is _fibo2.BriaFibo2Attention and type(ff) is _fibo2.FeedForward
            and getattr(ff.w1, "in_features", None) == d and getattr(ff.w3, "in_features", None) == d)


if _fibo2 is not None:
    class FusedBriaFibo2TransformerBlock(_fibo2.BriaFibo2TransformerBlock):
        """Bria FIBO 2's block (Z-Image's, always modulated, per token where its forward passes ``noise_mask``)
        running the fused packed kernels (module docstring); its self-attention runs its own processor
        (``BriaFibo2AttnProcessor``) on the kernels' projections (``HandedAttention``), and an injection block's
        gated text cross-attention runs between the attention and the feed-forward as diffusers runs it."""

        def __init__(self, block: nn.Module) -> None:
            if not _fibo2_supported(block):
                raise ValueError("FusedBriaFibo2TransformerBlock handles BriaFibo2TransformerBlock in the structure "
                                 "diffusers builds")
            _adopt(self, block)

        def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None, freqs_cis: torch.Tensor,
                    adaln_input: torch.Tensor | None = None, noise_mask: torch.Tensor | None = None,
                    adaln_noisy: torch.Tensor | None = None, adaln_clean: torch.Tensor | None = None,
                    encoder_hidden_states: torch.Tensor | None = None,
                    encoder_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
            args = (x, attn_mask, freqs_cis, adaln_input, noise_mask, adaln_noisy, adaln_clean, encoder_hidden_states,
                    encoder_attention_mask)
            a = self.attention
            names = ("to_q", "to_k", "to_v")
            if not _sandwich_ok(self, x, adaln_input, noise_mask, adaln_noisy, adaln_clean, True) \
                    or not runs_processor(a, (_fibo2.BriaFibo2AttnProcessor,), names):
                return super().forward(*args)

            def attend(rows: torch.Tensor, shift: torch.Tensor, k: torch.Tensor, float_rows: Any) -> torch.Tensor:
                handed, rows = hand_projections(a, names, rows, float_rows, ln_eps=self.attention_norm1.eps,
                                                shift=shift, scale=k, rms_norm=True)
                return a.processor(handed, rows, None, attn_mask, freqs_cis)

            def cross(rows: torch.Tensor) -> torch.Tensor:   # (injection blocks: diffusers' computation)
                if self.cross_attention is None:
                    return rows
                out = self.cross_attention(self.cross_attn_norm1(rows), encoder_hidden_states=encoder_hidden_states,
                                           attention_mask=encoder_attention_mask)
                return rows + self.cross_attn_gate.tanh() * self.cross_attn_norm2(out)

            out = _sandwich_forward(self, x, attend, adaln_input, noise_mask, adaln_noisy, adaln_clean, True, cross)
            return super().forward(*args) if out is None else out


def fuse_zimage_blocks(model: nn.Module) -> int:
    """Swap every Z-Image (and Bria FIBO 2) block of ``model`` that a fused class handles and that has a packed
    linear with quantized activations to fuse; returns how many were swapped."""
    return swap_blocks(model, lambda m: FusedZImageTransformerBlock if _zimage_supported(m)
                       else FusedBriaFibo2TransformerBlock if _fibo2_supported(m) else None, _linears)


register_block(FusedZImageTransformerBlock, 0)   # (returns hidden states alone, as the original)
if _fibo2 is not None:   # (diffusers has no entry for Bria FIBO 2's block: its argument is x, as Z-Image's)
    register_block(FusedBriaFibo2TransformerBlock, 0, hidden_states_argument_name="x")
