"""Fused FLUX.2 blocks for packed inference: the fusions of :mod:`.diffusers_fused` for diffusers'
``Flux2TransformerBlock`` (double stream) and ``Flux2SingleTransformerBlock``.

The modulations come in as arguments, made once per forward by the model's shared modulation linears (not by the
block): per stream two triples (shift, scale, gate) for the double block, one for the single block; ``LN`` has no
affine. The feed-forwards are SwiGLU: ``linear_out(SiLU(a) ⊙ b)`` with ``[a, b] = linear_in(x)``.

Double block:

    q, k, v = to_q/k/v ← Q(mod(LN(h), shift1, scale1)),   q', k', v' = add_q/k/v_proj ← the same on the text
    o', o   = joint attention([q'; q], [k'; k], [v'; v])   (RMSNorm on q and k, the rotary tables of [text; image])
    h = h + gate1 · to_out(o),   c = c + c_gate1 · to_add_out(o')
    h = h + gate2 · ff.linear_out(Q(SwiGLU(ff.linear_in(Q(mod(LN(h), shift2, scale2))))))   (ff_context alike)

Single block, on the text and image tokens together (x = [text; image]):

    [q, k, v, a, b] = to_qkv_mlp_proj ← Q(mod(LN(x), shift, scale))
    x = x + gate · to_out(Q([attention(q, k, v) ; SiLU(a) ⊙ b]))

Where a linear is a :class:`TreeQLinear` with quantized activations, LayerNorm + modulate + quantization run in its
``quantize_input`` kernel (one call shared by the linears of a stream that read the same rows with one activation
spec and no Monarch branch), and the gated residual ``x + gate ⊙ y`` in to_out's, to_add_out's, each
feed-forward's second linear's and the single block's to_out's epilogue. SwiGLU runs between the kernels, as
diffusers computes it. The attention is ``Flux2AttnProcessor``'s / ``Flux2ParallelSelfAttnProcessor``'s
computation (their RMSNorms, ``apply_rotary_emb``, ``dispatch_attention_fn`` with the processor's backend). Fused
and unfused agree to the model dtype's rounding, not bit for bit.

A block is swapped only in the structure diffusers builds (LayerNorms without affine, the SwiGLU feed-forwards,
the fused projection of q, k, v and the MLP input with ``mlp_mult_factor`` 2) with a packed linear with quantized
activations to fuse. It runs diffusers' own forward in training mode, with attention kwargs (the reference-image
KV cache), when a norm or the attention carries a hook or another processor, or on other input ranks; a hooked
feed-forward runs as a module. diffusers' block-level hooks (FirstBlockCache, MagCache) find the fused classes in
``TransformerBlockRegistry`` under the originals' entries. The state dict is unchanged.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from diffusers.models.transformers.transformer_flux2 import (Flux2Attention, Flux2AttnProcessor, Flux2FeedForward,
                                                             Flux2ParallelSelfAttention,
                                                             Flux2ParallelSelfAttnProcessor,
                                                             Flux2SingleTransformerBlock, Flux2SwiGLU,
                                                             Flux2TransformerBlock)

from .diffusers_fused import (_adopt, _bypassed_hook, _forward_wrapped, _gated_out, _hooked, _plain_layer_norm,
                              _project, joint_attention_ok, kernel_modulation, register_block, swap_blocks)
from .mmdit_fused import _attention   # (FLUX.2's processors compute FLUX.1's attention)

_PROJECTIONS = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")


def _swiglu_ff(ff: Any, d: int) -> bool:
    """``Flux2FeedForward`` as diffusers builds it: linear_in (d -> 2h), SwiGLU, linear_out (h -> d)."""
    return (type(ff) is Flux2FeedForward and type(ff.act_fn) is Flux2SwiGLU
            and getattr(ff.linear_in, "in_features", None) == d
            and getattr(ff.linear_in, "out_features", None) == 2 * getattr(ff.linear_out, "in_features", -1))


def _double_supported(block: nn.Module) -> bool:
    if type(block) is not Flux2TransformerBlock or _forward_wrapped(block):
        return False
    d = getattr(block.norm1, "normalized_shape", (None,))[0]
    return (isinstance(d, int) and all(_plain_layer_norm(getattr(block, n), d)
                                       for n in ("norm1", "norm1_context", "norm2", "norm2_context"))
            and _swiglu_ff(block.ff, d) and _swiglu_ff(block.ff_context, d) and type(block.attn) is Flux2Attention
            and block.attn.added_kv_proj_dim is not None)


def _single_supported(block: nn.Module) -> bool:
    if type(block) is not Flux2SingleTransformerBlock or _forward_wrapped(block):
        return False
    attn = block.attn
    d = getattr(block.norm, "normalized_shape", (None,))[0]
    return (isinstance(d, int) and _plain_layer_norm(block.norm, d) and type(attn) is Flux2ParallelSelfAttention
            and attn.mlp_mult_factor == 2 and type(attn.mlp_act_fn) is Flux2SwiGLU)


def _single_attention_ok(attn: Any) -> bool:
    if type(attn.processor) is not Flux2ParallelSelfAttnProcessor or _hooked(attn) or _hooked(attn.mlp_act_fn):
        return False
    return not (_bypassed_hook(attn.to_qkv_mlp_proj) or _bypassed_hook(attn.to_out))


def _double_linears(block: nn.Module) -> list[nn.Module]:
    a = block.attn
    return [a.to_q, a.to_k, a.to_v, a.add_q_proj, a.add_k_proj, a.add_v_proj, a.to_out[0], a.to_add_out,
            block.ff.linear_in, block.ff.linear_out, block.ff_context.linear_in, block.ff_context.linear_out]


def _single_linears(block: nn.Module) -> list[nn.Module]:
    return [block.attn.to_qkv_mlp_proj, block.attn.to_out]


def _ff(ff: Any, ln: nn.Module, x2: torch.Tensor, b: int, mod: torch.Tensor, m32: torch.Tensor) -> torch.Tensor:
    """``x + gate2 · ff(mod(LN(x), shift2, scale2))`` as (M, D) rows of ``x2`` (``mod`` (B, 6, D), ``m32`` (6, B, D)
    float32): LayerNorm + modulate in linear_in's quantization, SwiGLU between the kernels, the gated residual in
    linear_out's epilogue. A hook on the feed-forward or on a part the kernels run: the module runs, hooks and all."""
    x = x2.view(b, -1, x2.shape[-1])
    fc1, fc2 = ff.linear_in, ff.linear_out
    if _hooked(ff) or _hooked(ff.act_fn) or _bypassed_hook(fc1) or _bypassed_hook(fc2):
        y = ff(ln(x) * (1 + mod[:, 4:5]) + mod[:, 3:4])
        return (x + mod[:, 5:6] * y).reshape(x2.shape)
    (h,) = _project((fc1,), x2, lambda: ln(x) * (1 + mod[:, 4:5]) + mod[:, 3:4], ln_eps=ln.eps, shift=m32[3],
                    scale=m32[4])
    # (the SwiGLU module on (B, S, ·) rows, as diffusers calls it: a hook on its SiLU sees what it sees there)
    return _gated_out(fc2, ff.act_fn(h.view(b, -1, h.shape[-1])), x2, b, m32[5], mod[:, 5:6])


def _modulation(temb_mod: torch.Tensor, b: int, sets: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A shared modulation ``(B or 1, 3·sets·d)`` as ``(B, 3·sets, d)`` in its dtype and ``(3·sets, B, d)`` float32."""
    mod = temb_mod.expand(b, -1).view(b, 3 * sets, d)
    return mod, kernel_modulation(mod)


class FusedFlux2TransformerBlock(Flux2TransformerBlock):
    """A ``Flux2TransformerBlock`` running the fused packed kernels (module docstring)."""

    def __init__(self, block: Flux2TransformerBlock) -> None:
        if not _double_supported(block):
            raise ValueError("FusedFlux2TransformerBlock handles Flux2TransformerBlock in the structure diffusers "
                             "builds")
        _adopt(self, block)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, temb_mod_img: torch.Tensor,
                temb_mod_txt: torch.Tensor, image_rotary_emb: Any = None,
                joint_attention_kwargs: dict[str, Any] | None = None) -> Any:
        args = (hidden_states, encoder_hidden_states, temb_mod_img, temb_mod_txt, image_rotary_emb,
                joint_attention_kwargs)
        attn = self.attn
        norms = (self.norm1, self.norm1_context, self.norm2, self.norm2_context)
        if (self.training or joint_attention_kwargs or hidden_states.ndim != 3 or encoder_hidden_states.ndim != 3
                or temb_mod_img.ndim != 2 or temb_mod_txt.ndim != 2 or any(_hooked(n) for n in norms)
                or any(x.dtype != hidden_states.dtype for x in (encoder_hidden_states, temb_mod_img, temb_mod_txt))
                or not joint_attention_ok(attn, Flux2AttnProcessor, _PROJECTIONS)):
            return super().forward(*args)
        b, t, d = hidden_states.shape
        text = encoder_hidden_states.shape[1]
        if encoder_hidden_states.shape[0] != b or temb_mod_img.shape[0] not in (1, b) or \
                temb_mod_txt.shape[0] not in (1, b):
            return super().forward(*args)   # (before any layer runs: a fallback computes nothing twice)
        mod, m32 = _modulation(temb_mod_img, b, 2, d)
        cmod, c32 = _modulation(temb_mod_txt, b, 2, d)
        h, c = hidden_states, encoder_hidden_states
        h2, c2 = h.reshape(b * t, d).contiguous(), c.reshape(b * text, d).contiguous()
        n1, cn1 = self.norm1, self.norm1_context
        q, k, v = _project((attn.to_q, attn.to_k, attn.to_v), h2,
                           lambda: (1 + mod[:, 1:2]) * n1(h) + mod[:, 0:1], ln_eps=n1.eps, shift=m32[0],
                           scale=m32[1])
        eq, ek, ev = _project((attn.add_q_proj, attn.add_k_proj, attn.add_v_proj), c2,
                              lambda: (1 + cmod[:, 1:2]) * cn1(c) + cmod[:, 0:1], ln_eps=cn1.eps, shift=c32[0],
                              scale=c32[1])
        o = _attention(attn, q, k, v, b, image_rotary_emb, text=(eq, ek, ev))
        oc, oh = o.split_with_sizes([text, t], dim=1)
        h2 = _gated_out(attn.to_out[0], oh, h2, b, m32[2], mod[:, 2:3])
        c2 = _gated_out(attn.to_add_out, oc, c2, b, c32[2], cmod[:, 2:3])
        h2 = _ff(self.ff, self.norm2, h2, b, mod, m32)
        c2 = _ff(self.ff_context, self.norm2_context, c2, b, cmod, c32)
        h, c = h2.view(b, t, d), c2.view(b, text, d)
        if c.dtype == torch.float16:
            c = c.clip(-65504, 65504)
        return c, h


class FusedFlux2SingleTransformerBlock(Flux2SingleTransformerBlock):
    """A ``Flux2SingleTransformerBlock`` running the fused packed kernels (module docstring)."""

    def __init__(self, block: Flux2SingleTransformerBlock) -> None:
        if not _single_supported(block):
            raise ValueError("FusedFlux2SingleTransformerBlock handles Flux2SingleTransformerBlock in the structure "
                             "diffusers builds")
        _adopt(self, block)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None,
                temb_mod: torch.Tensor, image_rotary_emb: Any = None,
                joint_attention_kwargs: dict[str, Any] | None = None, split_hidden_states: bool = False,
                text_seq_len: int | None = None) -> Any:
        args = (hidden_states, encoder_hidden_states, temb_mod, image_rotary_emb, joint_attention_kwargs,
                split_hidden_states, text_seq_len)
        attn = self.attn
        if (self.training or joint_attention_kwargs or hidden_states.ndim != 3 or temb_mod.ndim != 2
                or temb_mod.dtype != hidden_states.dtype
                or encoder_hidden_states is not None and (encoder_hidden_states.ndim != 3
                                                          or encoder_hidden_states.shape[0] != hidden_states.shape[0]
                                                          or encoder_hidden_states.dtype != hidden_states.dtype)
                or _hooked(self.norm) or not _single_attention_ok(attn)
                or temb_mod.shape[0] not in (1, hidden_states.shape[0])):
            return super().forward(*args)
        if encoder_hidden_states is not None:
            text_seq_len = encoder_hidden_states.shape[1]
            hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        x = hidden_states
        b, t, d = x.shape
        mod, m32 = _modulation(temb_mod, b, 1, d)
        x2 = x.reshape(b * t, d).contiguous()
        norm = self.norm
        (proj,) = _project((attn.to_qkv_mlp_proj,), x2, lambda: (1 + mod[:, 1:2]) * norm(x) + mod[:, 0:1],
                           ln_eps=norm.eps, shift=m32[0], scale=m32[1])
        i = attn.inner_dim
        q, k, v, mlp = proj.split_with_sizes([i, i, i, proj.shape[-1] - 3 * i], dim=-1)
        o = _attention(attn, q, k, v, b, image_rotary_emb)
        joined = torch.cat([o.reshape(b * t, -1), attn.mlp_act_fn(mlp.view(b, t, -1)).reshape(b * t, -1)], dim=-1)
        x = _gated_out(attn.to_out, joined, x2, b, m32[2], mod[:, 2:3]).view(b, t, d)
        if x.dtype == torch.float16:
            x = x.clip(-65504, 65504)
        if split_hidden_states:
            return x[:, :text_seq_len], x[:, text_seq_len:]
        return x


def fuse_flux2_blocks(model: nn.Module) -> int:
    """Swap every FLUX.2 double and single block of ``model`` that the fused classes handle and that has a packed
    linear with quantized activations to fuse; returns how many were swapped."""
    double = swap_blocks(model, lambda m: FusedFlux2TransformerBlock if _double_supported(m) else None,
                         _double_linears)
    return double + swap_blocks(model, lambda m: FusedFlux2SingleTransformerBlock if _single_supported(m) else None,
                                _single_linears)


register_block(FusedFlux2TransformerBlock, 1, 0)   # (returns (encoder_hidden_states, hidden_states))
register_block(FusedFlux2SingleTransformerBlock, 0, None)
