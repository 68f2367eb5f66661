"""Fused Mochi blocks for packed inference: the fusions of :mod:`.diffusers_fused` for diffusers'
``MochiTransformerBlock`` (Mochi 1).

Each stream (video ``h``, text ``e``) has its own adaptive RMSNorm: ``MochiRMSNormZero`` gives ``scale_msa,
gate_msa, scale_mlp, gate_mlp`` per sample from ``silu(temb)`` (the last block's text stream, ``context_pre_only``,
has a ``MochiLayerNormContinuous``: a scale alone, and no feed-forward). RMS is the RMSNorm without weight:

    q, k, v    = to_q/k/v       ← Q(RMS(h)·(1 + scale_msa))
    q', k', v' = add_q/k/v_proj ← Q(RMS(e)·(1 + scale_msa'))
    o, o' = attention([q; q'], [k; k'], [v; v'])     (per sample, the prompt's padding dropped, as diffusers does)
    h = h + RMS(to_out(o))·tanh(gate_msa)                                   (a post-norm: as diffusers computes it)
    h = h + RMS(ff.net[2](SwiGLU(ff.net[0].proj ← Q(RMS(h)·(1 + scale_mlp)))))·tanh(gate_mlp)
    (e alike, with to_add_out and ff_context)

Where a linear is a :class:`TreeQLinear` with quantized activations, the RMSNorm, the modulation and the quantization
run in its ``quantize_input`` kernel (the kernel's RMSNorm mode, shift 0, its scale ``scale_msa`` or ``scale_mlp``):
one call shared by the three projections of a stream with one activation spec and no Monarch branch, one per
feed-forward. What stays in torch: the attention (``MochiAttnProcessor2_0``'s computation: RMSNorm with weight on q
and k per head, the rotary embedding on the video rows, an SDPA per sample over the video and the prompt's unmasked
tokens), SwiGLU and the gated residuals (the post-norms need whole output rows, which no GEMM tile owns); to_out,
to_add_out and ff.net[2] run as modules (a packed one quantizes its own input). Fused and unfused agree to the model
dtype's rounding, not bit for bit: diffusers rounds the modulated rows to the model dtype before the projections, the
kernel quantizes them from float32.

A block is swapped only in the structure diffusers builds (the adaptive norms over RMSNorms without weight, a
``MochiAttention``, SwiGLU feed-forwards) with a packed linear with quantized activations to fuse. It runs diffusers'
own forward in training mode, on other input ranks or timestep shapes, when the attention runs another processor,
and when a norm the kernel computes, the attention (pyramid attention broadcast hooks it) or a projection the kernels
run carries a hook; a feed-forward that is hooked runs as a module. diffusers' block-level hooks (FirstBlockCache,
MagCache) find the fused class in ``TransformerBlockRegistry`` under the original's entry. The state dict is
unchanged.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.models.attention_processor import MochiAttention, MochiAttnProcessor2_0
from diffusers.models.normalization import RMSNorm
from diffusers.models.transformers.transformer_mochi import (MochiLayerNormContinuous, MochiModulatedRMSNorm,
                                                             MochiRMSNormZero, MochiTransformerBlock)

from .diffusers_fused import (_adopt, _bypassed_hook, _forward_wrapped, _hooked, _project, register_block,
                              swap_blocks, swiglu_feed_forward)
from .linear import runs_packed_kernels as _quantized

PROJECTIONS = ("to_q", "to_k", "to_v")
ADDED = ("add_q_proj", "add_k_proj", "add_v_proj")


def _plain_rms(norm: Any) -> bool:
    """An RMSNorm without weight or bias: the kernel's RMSNorm mode (which takes a positive epsilon)."""
    return type(norm) is RMSNorm and norm.weight is None and getattr(norm, "bias", None) is None and norm.eps > 0


def _modulated(norm: Any) -> bool:
    return type(norm) is MochiModulatedRMSNorm and _plain_rms(norm.norm)


def _supported(block: nn.Module) -> bool:
    if type(block) is not MochiTransformerBlock or _forward_wrapped(block):
        return False
    attn = block.attn1
    if type(attn) is not MochiAttention or any(getattr(attn, n, None) is None for n in PROJECTIONS + ADDED):
        return False
    d, dc = attn.to_q.in_features, attn.add_k_proj.in_features
    video = (type(block.norm1) is MochiRMSNormZero and _plain_rms(block.norm1.norm) and _modulated(block.norm3)
             and swiglu_feed_forward(block.ff, d))
    if block.context_pre_only:
        nc = block.norm1_context
        return video and type(nc) is MochiLayerNormContinuous and _modulated(nc.norm)
    return (video and type(block.norm1_context) is MochiRMSNormZero and _plain_rms(block.norm1_context.norm)
            and _modulated(block.norm3_context) and swiglu_feed_forward(block.ff_context, dc)
            and getattr(attn, "to_add_out", None) is not None)


def _linears(block: nn.Module) -> list[nn.Module]:
    a = block.attn1
    ffs = [block.ff] + ([] if block.context_pre_only else [block.ff_context])
    return [getattr(a, n) for n in PROJECTIONS + ADDED] + [ff.net[0].proj for ff in ffs]


def _attention_ok(attn: Any) -> bool:
    """``attn`` computes what the fused path computes: ``MochiAttnProcessor2_0`` exactly, to_out as [linear,
    Dropout], no hook on it or on a projection the kernels run. (Checked on every forward.)"""
    m = attn._modules
    out = m.get("to_out")
    return (type(attn.processor) is MochiAttnProcessor2_0 and not _hooked(attn) and out is not None
            and len(out) == 2 and type(out._modules.get("1")) is nn.Dropout
            and not any(_bypassed_hook(m[n]) for n in PROJECTIONS + ADDED))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The processor's rotary embedding: adjacent pairs rotated in float32, back in ``x``'s dtype."""
    even, odd = x[..., 0::2].float(), x[..., 1::2].float()
    return torch.stack([(even * cos - odd * sin).to(x.dtype), (even * sin + odd * cos).to(x.dtype)], -1).flatten(-2)


def _attention(attn: Any, video: list[torch.Tensor], text: list[torch.Tensor], b: int, mask: torch.Tensor,
               rotary: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``MochiAttnProcessor2_0``'s attention of the streams' (B·S, inner) and (B·L, inner) q, k, v rows, before the
    output projections: (B, S, inner) and (B, L, inner), the prompt's kept tokens' rows first and the rest zero (as
    diffusers packs them: with a mask holed in the middle, rows do not stay at their token's place)."""
    def heads(t: torch.Tensor) -> torch.Tensor:
        return t.view(b, -1, t.shape[-1]).unflatten(2, (attn.heads, -1))

    q, k, v = (heads(t) for t in video)
    eq, ek, ev = (heads(t) for t in text)
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    if attn.norm_added_q is not None:
        eq = attn.norm_added_q(eq)
    if attn.norm_added_k is not None:
        ek = attn.norm_added_k(ek)
    if rotary is not None:
        q, k = _rotate(q, *rotary), _rotate(k, *rotary)
    q, k, v, eq, ek, ev = (t.transpose(1, 2) for t in (q, k, v, eq, ek, ev))
    s, total = q.shape[2], q.shape[2] + eq.shape[2]
    outs = []
    for i in range(b):
        keep = torch.nonzero(mask[i].flatten(), as_tuple=False).flatten()
        o = F.scaled_dot_product_attention(torch.cat([q[i:i + 1], eq[i:i + 1, :, keep]], 2),
                                           torch.cat([k[i:i + 1], ek[i:i + 1, :, keep]], 2),
                                           torch.cat([v[i:i + 1], ev[i:i + 1, :, keep]], 2),
                                           dropout_p=0.0, is_causal=False)
        outs.append(F.pad(o, (0, 0, 0, total - o.shape[2])))
    o = torch.cat(outs, 0).transpose(1, 2).flatten(2, 3)
    return o[:, :s], o[:, s:]


def _swiglu_ff(ff: Any, norm: MochiModulatedRMSNorm, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``ff(RMS(x)·(1 + scale))`` for (B, S, D) rows ``x`` and ``scale (B, D)``: RMSNorm + modulate + quantize in
    ff.net[0].proj's kernel where it is packed with quantized activations and nothing there is hooked, else as
    diffusers computes it (the module, hooks and all). ff.net[1] is Dropout: the identity in eval."""
    b, s, d = x.shape
    swiglu, fc1 = ff.net[0], ff.net[0].proj

    def rows() -> torch.Tensor:
        return norm(x, (1 + scale.unsqueeze(1).to(torch.float32)))

    if _hooked(ff) or _hooked(ff.net[1]) or not _quantized(fc1) or _hooked(swiglu) or _hooked(fc1):
        return ff(rows())
    h, = _project((fc1,), x.reshape(b * s, d).contiguous(), rows, ln_eps=norm.norm.eps,
                  shift=torch.zeros_like(scale, dtype=torch.float32), scale=scale.float().contiguous(), rms_norm=True)
    a, gate = h.view(b, s, -1).chunk(2, dim=-1)
    return ff.net[2](a * swiglu.activation(gate))


class FusedMochiTransformerBlock(MochiTransformerBlock):
    """A ``MochiTransformerBlock`` running the fused packed kernels (module docstring)."""

    def __init__(self, block: MochiTransformerBlock) -> None:
        if not _supported(block):
            raise ValueError("FusedMochiTransformerBlock handles MochiTransformerBlock in the structure diffusers "
                             "builds")
        _adopt(self, block)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, temb: torch.Tensor,
                encoder_attention_mask: torch.Tensor, image_rotary_emb: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor]:
        args = (hidden_states, encoder_hidden_states, temb, encoder_attention_mask, image_rotary_emb)
        h, e, attn = hidden_states, encoder_hidden_states, self.attn1
        n1, nc = self.norm1, self.norm1_context
        norms = [n1, n1.norm, self.norm3, self.norm3.norm, nc, nc.norm]
        norms += [nc.norm.norm] if self.context_pre_only else [self.norm3_context, self.norm3_context.norm]
        if (self.training or h.ndim != 3 or e.ndim != 3 or temb.ndim != 2
                or not h.shape[0] == e.shape[0] == temb.shape[0] or any(_hooked(n) for n in norms)
                or not _attention_ok(attn)):
            return super().forward(*args)
        b, s, d = h.shape
        scale_msa, gate_msa, scale_mlp, gate_mlp = n1.linear(n1.silu(temb)).chunk(4, dim=1)
        if self.context_pre_only:
            c_scale = nc.linear_1(nc.silu(temb).to(e.dtype))
            c_norm = nc.norm.norm
        else:
            c_scale, c_gate_msa, c_scale_mlp, c_gate_mlp = nc.linear(nc.silu(temb)).chunk(4, dim=1)
            c_norm = nc.norm
        if scale_msa.shape != (b, d) or c_scale.shape != (b, e.shape[2]):
            return super().forward(*args)

        def stream(layers: list[nn.Module], x: torch.Tensor, scale: torch.Tensor, norm: RMSNorm) -> list[torch.Tensor]:
            def rows() -> torch.Tensor:   # diffusers' modulated rows, in the model dtype
                return (norm(x.float()) * (1 + scale.unsqueeze(1).float())).to(x.dtype)

            return _project(layers, x.reshape(-1, x.shape[2]).contiguous(), rows, ln_eps=norm.eps,
                            shift=torch.zeros_like(scale, dtype=torch.float32), scale=scale.float().contiguous(),
                            rms_norm=True)

        video = stream([getattr(attn, n) for n in PROJECTIONS], h, scale_msa, n1.norm)
        text = stream([getattr(attn, n) for n in ADDED], e, c_scale, c_norm)
        o, oc = _attention(attn, video, text, b, encoder_attention_mask, image_rotary_emb)
        o = attn.to_out[1](attn.to_out[0](o))
        h = h + self.norm2(o, torch.tanh(gate_msa).unsqueeze(1))
        h = h + self.norm4(_swiglu_ff(self.ff, self.norm3, h, scale_mlp), torch.tanh(gate_mlp).unsqueeze(1))
        if not self.context_pre_only:
            e = e + self.norm2_context(attn.to_add_out(oc), torch.tanh(c_gate_msa).unsqueeze(1))
            y = _swiglu_ff(self.ff_context, self.norm3_context, e, c_scale_mlp)
            e = e + self.norm4_context(y, torch.tanh(c_gate_mlp).unsqueeze(1))
        return h, e


def fuse_mochi_blocks(model: nn.Module) -> int:
    """Swap every Mochi block of ``model`` that the fused class handles and that has a packed linear with quantized
    activations to fuse; returns how many were swapped."""
    return swap_blocks(model, lambda m: FusedMochiTransformerBlock if _supported(m) else None, _linears)


register_block(FusedMochiTransformerBlock, 0, 1)
