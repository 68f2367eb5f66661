"""Fused HiDream-I1 blocks for packed inference: the fusions of :mod:`.diffusers_fused` for diffusers'
``HiDreamImageTransformerBlock`` (image and text streams) and ``HiDreamImageSingleTransformerBlock`` (one joined
stream), inside the model's ``HiDreamBlock`` wrappers.

``adaLN_modulation(temb)`` gives a shift, a scale and a gate per sub-layer, stream and sample, around LayerNorms
without affine:

    h = h + gate_msa · attention(to_q, to_k, to_v ← Q(LN(h)·(1 + scale_msa) + shift_msa))     (per stream)
    h = h + gate_mlp · ff(LN(h)·(1 + scale_mlp) + shift_mlp)

Where a linear is a :class:`TreeQLinear` with quantized activations, LayerNorm + modulate run in its
``quantize_input`` kernel: one call per stream for its q/k/v, and for a SwiGLU feed-forward
(``HiDreamImageFeedForwardSwiGLU``: ``w2(silu(w1 ← x) ⊙ w3 ← x)``) one for w1 and w3, whose gated residual then runs
in w2's epilogue. The image stream's mixture-of-experts feed-forward runs as the module (its gate and experts read
float rows). The attention runs its processor (``HiDreamAttnProcessor``: the q/k RMSNorms, the image mask on the
keys, the rotary embedding, the output projections) on the kernels' projections (``HandedAttention``); its gated
residuals are diffusers' sums. Fused and unfused agree to float rounding, not bit for bit.

A block is swapped only in the structure diffusers builds (LayerNorms without affine, ``adaLN_modulation`` as SiLU +
linear, a ``HiDreamAttention`` with that processor) with a packed linear with quantized activations to fuse. It runs
diffusers' own forward in training mode, on other input ranks, for a ``temb`` of another batch, rank or dtype or a
modulation of another dtype than the rows, and when a norm, the modulation or the attention carries a hook or another
processor (or a projection the kernels run does); a hooked feed-forward (or a part of it) runs as the module. The state
dict is unchanged.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.models.transformers.transformer_hidream_image import (HiDreamAttention, HiDreamAttnProcessor,
                                                                     HiDreamImageFeedForwardSwiGLU,
                                                                     HiDreamImageSingleTransformerBlock,
                                                                     HiDreamImageTransformerBlock,
                                                                     MOEFeedForwardSwiGLU)

from .diffusers_fused import (_adopt, _bypassed_hook, _forward_wrapped, _hooked, _plain_layer_norm, _project,
                              HandedAttention, kernel_projections, like_rows, runs_processor, swap_blocks)
from .linear import runs_packed_kernels as _quantized

_IMAGE = ("to_q", "to_k", "to_v")
_TEXT = ("to_q_t", "to_k_t", "to_v_t")


def _ff_ok(ff: Any, d: int, moe: bool) -> bool:
    if type(ff) is HiDreamImageFeedForwardSwiGLU:
        return ff.w1.in_features == d and ff.w3.in_features == d and ff.w2.out_features == d
    return moe and type(ff) is MOEFeedForwardSwiGLU


def _supported(block: nn.Module) -> bool:
    double = type(block) is HiDreamImageTransformerBlock
    if not (double or type(block) is HiDreamImageSingleTransformerBlock) or _forward_wrapped(block):
        return False
    mod, attn = block.adaLN_modulation, block.attn1
    d = getattr(attn, "query_dim", None)
    norms = ("norm1_i", "norm3_i") + (("norm1_t", "norm3_t") if double else ())
    return (isinstance(d, int) and all(_plain_layer_norm(getattr(block, n), d) for n in norms)
            and type(mod) is nn.Sequential and len(mod) == 2 and type(mod[0]) is nn.SiLU
            and getattr(mod[1], "out_features", None) == (12 if double else 6) * d
            and type(attn) is HiDreamAttention and attn.single is not double and attn.to_q.in_features == d
            and _ff_ok(block.ff_i, d, moe=True) and (not double or _ff_ok(block.ff_t, d, moe=False)))


def _linears(block: nn.Module) -> list[nn.Module]:
    a = block.attn1
    names = _IMAGE + (_TEXT if not a.single else ())
    out = [getattr(a, n) for n in names]
    ffs: list[Any] = [block.ff_i, getattr(block, "ff_t", None)]
    for ff in ffs:
        if type(ff) is HiDreamImageFeedForwardSwiGLU:
            out += [ff.w1, ff.w3, ff.w2]
    return out


def _kernel(norm: nn.LayerNorm, shift: torch.Tensor, scale: torch.Tensor) -> dict[str, Any]:
    b, d = shift.shape[0], shift.shape[-1]
    return dict(ln_eps=norm.eps, shift=shift.reshape(b, d).float().contiguous(),
                scale=scale.reshape(b, d).float().contiguous())


def _modulated(norm: nn.LayerNorm, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """diffusers' rows: ``LN(x)`` in the rows' dtype, modulated."""
    return norm(x).to(dtype=x.dtype) * (1 + scale) + shift


def _projections(attn: Any, names: tuple[str, ...], norm: nn.LayerNorm, x: torch.Tensor, shift: torch.Tensor,
                 scale: torch.Tensor, outputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """One stream's packed projections of ``mod(LN(x))`` by the kernel, into ``outputs``; the rows to hand the
    processor (``x``, or diffusers' rows where a float projection reads them)."""
    out, rows = kernel_projections(attn, names, x, lambda: _modulated(norm, x, shift, scale),
                                   **_kernel(norm, shift, scale))
    outputs.update(out)
    return rows


def _feed_forward(ff: Any, norm: nn.LayerNorm, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                  gate: torch.Tensor) -> torch.Tensor:
    """``x + gate · ff(mod(LN(x)))``: a SwiGLU's w1 and w3 from the kernel and the gated residual in w2's epilogue;
    the module where it is a mixture of experts, hooked, or w1 or w3 is not packed."""
    if (type(ff) is not HiDreamImageFeedForwardSwiGLU or _hooked(ff)
            or any(_hooked(m) or not _quantized(m) for m in (ff.w1, ff.w3)) or _bypassed_hook(ff.w2)):
        return gate * ff(_modulated(norm, x, shift, scale)) + x
    b, s, d = x.shape
    x2 = x.reshape(b * s, d).contiguous()
    g, u = _project((ff.w1, ff.w3), x2, lambda: x2, **_kernel(norm, shift, scale))   # (both packed)
    z = F.silu(g) * u
    if not _quantized(ff.w2):
        return gate * ff.w2(z.view(b, s, -1)) + x
    y = ff.w2.linear(ff.w2.quantize_input(z), out_dtype=x.dtype, residual=x2,
                     gate=gate.reshape(b, d).float().contiguous())
    return y.view(b, s, d)


def _fallback(block: Any, h: torch.Tensor, e: torch.Tensor | None, temb: Any) -> bool:
    """diffusers' forward must run (module docstring); checked before any layer runs."""
    attn, proj = block.attn1, block.adaLN_modulation[1]
    norms = [block.norm1_i, block.norm3_i] + ([] if attn.single else [block.norm1_t, block.norm3_t])
    names = _IMAGE + (() if attn.single else _TEXT)
    return (block.training or h.ndim != 3
            or (not attn.single and (e is None or e.ndim != 3 or e.shape[0] != h.shape[0]))
            or not like_rows(h, temb) or temb.ndim != 2   # (a temb of another dtype: modulations promoting the rows)
            or getattr(proj, "dtype_anchor", proj.weight).dtype != h.dtype
            or (e is not None and not attn.single and e.dtype != h.dtype)
            or any(_hooked(n) for n in norms) or _hooked(block.adaLN_modulation)
            or not runs_processor(attn, (HiDreamAttnProcessor,), names))


class FusedHiDreamImageTransformerBlock(HiDreamImageTransformerBlock):
    """A ``HiDreamImageTransformerBlock`` running the fused packed kernels (module docstring)."""

    def __init__(self, block: HiDreamImageTransformerBlock) -> None:
        if type(block) is not HiDreamImageTransformerBlock or not _supported(block):
            raise ValueError("FusedHiDreamImageTransformerBlock handles HiDreamImageTransformerBlock in the structure "
                             "diffusers builds")
        _adopt(self, block)

    def forward(self, hidden_states: torch.Tensor, hidden_states_masks: torch.Tensor | None = None,
                encoder_hidden_states: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                image_rotary_emb: torch.Tensor = None) -> tuple[torch.Tensor, torch.Tensor]:
        h, e, attn = hidden_states, encoder_hidden_states, self.attn1
        if _fallback(self, h, e, temb):
            return super().forward(h, hidden_states_masks, e, temb, image_rotary_emb)
        assert e is not None and temb is not None   # (checked by _fallback)
        (shift_msa_i, scale_msa_i, gate_msa_i, shift_mlp_i, scale_mlp_i, gate_mlp_i, shift_msa_t, scale_msa_t,
         gate_msa_t, shift_mlp_t, scale_mlp_t, gate_mlp_t) = self.adaLN_modulation(temb)[:, None].chunk(12, dim=-1)
        outputs: dict[str, torch.Tensor] = {}
        rows_i = _projections(attn, _IMAGE, self.norm1_i, h, shift_msa_i, scale_msa_i, outputs)
        rows_t = _projections(attn, _TEXT, self.norm1_t, e, shift_msa_t, scale_msa_t, outputs)
        out_i, out_t = attn.processor(HandedAttention(attn, outputs), hidden_states=rows_i,
                                      hidden_states_masks=hidden_states_masks, encoder_hidden_states=rows_t,
                                      image_rotary_emb=image_rotary_emb)
        h, e = gate_msa_i * out_i + h, gate_msa_t * out_t + e
        return (_feed_forward(self.ff_i, self.norm3_i, h, shift_mlp_i, scale_mlp_i, gate_mlp_i),
                _feed_forward(self.ff_t, self.norm3_t, e, shift_mlp_t, scale_mlp_t, gate_mlp_t))


class FusedHiDreamImageSingleTransformerBlock(HiDreamImageSingleTransformerBlock):
    """A ``HiDreamImageSingleTransformerBlock`` running the fused packed kernels (module docstring)."""

    def __init__(self, block: HiDreamImageSingleTransformerBlock) -> None:
        if type(block) is not HiDreamImageSingleTransformerBlock or not _supported(block):
            raise ValueError("FusedHiDreamImageSingleTransformerBlock handles HiDreamImageSingleTransformerBlock in "
                             "the structure diffusers builds")
        _adopt(self, block)

    def forward(self, hidden_states: torch.Tensor, hidden_states_masks: torch.Tensor | None = None,
                encoder_hidden_states: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                image_rotary_emb: torch.Tensor = None) -> torch.Tensor:
        h, attn = hidden_states, self.attn1
        if _fallback(self, h, None, temb):
            return super().forward(h, hidden_states_masks, encoder_hidden_states, temb, image_rotary_emb)
        assert temb is not None   # (checked by _fallback)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = \
            self.adaLN_modulation(temb)[:, None].chunk(6, dim=-1)
        outputs: dict[str, torch.Tensor] = {}
        rows = _projections(attn, _IMAGE, self.norm1_i, h, shift_msa, scale_msa, outputs)
        out = attn.processor(HandedAttention(attn, outputs), hidden_states=rows,
                             hidden_states_masks=hidden_states_masks, encoder_hidden_states=None,
                             image_rotary_emb=image_rotary_emb)
        h = gate_msa * out + h
        return _feed_forward(self.ff_i, self.norm3_i, h, shift_mlp, scale_mlp, gate_mlp)


def fuse_hidream_blocks(model: nn.Module) -> int:
    """Swap every HiDream block of ``model`` that a fused class handles and that has a packed linear with quantized
    activations to fuse; returns how many were swapped."""
    def choose(mod: nn.Module) -> type | None:
        if not _supported(mod):
            return None
        return (FusedHiDreamImageTransformerBlock if type(mod) is HiDreamImageTransformerBlock
                else FusedHiDreamImageSingleTransformerBlock)

    return swap_blocks(model, choose, _linears)
