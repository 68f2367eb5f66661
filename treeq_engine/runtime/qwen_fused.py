"""Fused Qwen-Image blocks for packed inference: the fusions of :mod:`.diffusers_fused` for diffusers'
``QwenImageTransformerBlock`` (the double-stream block of Qwen-Image).

Each stream takes six modulation vectors from its own linear of ``silu(temb)`` (``img_mod`` / ``txt_mod``), in
the order of DiT's adaLN-Zero (shift, scale, gate for the attention, then for the feed-forward); ``LN`` has no
affine:

    q, k, v = to_q/k/v ← Q(mod(LN(h), shift1, scale1)),   q', k', v' = add_q/k/v_proj ← the same on the text
    o', o   = joint attention([q'; q], [k'; k], [v'; v])   (RMSNorm on q and k, Qwen's rotary tables, text mask)
    h = h + gate1 · to_out(o),   c = c + c_gate1 · to_add_out(o')
    h = h + gate2 · img_mlp.net[2](Q(GELU_tanh(img_mlp.net[0].proj(Q(mod(LN(h), shift2, scale2))))))   (txt alike)

Where a linear is a :class:`TreeQLinear` with quantized activations, LayerNorm + modulate + quantization run in
its ``quantize_input`` kernel, one call shared by the linears of a stream that read the same rows with one
activation spec and no Monarch branch; GELU(tanh) and the second feed-forward linear's codes in the first's
epilogue; the gated residual ``x + gate ⊙ y`` in to_out's, to_add_out's and each feed-forward's second epilogue.
The attention is ``QwenDoubleStreamAttnProcessor2_0``'s computation (its RMSNorms, ``apply_rotary_emb_qwen``, the
joint mask from the text mask, ``dispatch_attention_fn`` with the processor's backend). Fused and unfused agree to
the model dtype's rounding, not bit for bit.

Qwen-Image-Edit-2511 (``zero_cond_t``) modulates the condition images' tokens at timestep 0 and the target's at t
(``modulate_index`` says which is which): its image-stream modulation reaches the kernels per token, one group per
row (``(6, B·T, D)`` float32 while the block runs, filled chunk by chunk; the float paths select their chunks when
asked; the text stream's stays per sample).

A block is swapped only in the structure diffusers builds (LayerNorms without affine, ``Sequential(SiLU,
linear)`` modulations, ``FeedForward`` of [GELU(tanh), Dropout, linear]) with a packed linear with quantized
activations to fuse, and only on a diffusers whose processor builds the text mask itself (0.39 on;
``runtime.convert.fuse_blocks`` checks). It runs diffusers' own forward in training mode, with attention kwargs, a
``modulate_index`` without ``zero_cond_t`` (or none with it), when a norm, a modulation or the attention carries a
hook or another processor; a hooked feed-forward runs as a module. A batch-1 text or timestep (the pipeline's
negative-prompt call) is broadcast, as diffusers' sums broadcast it.
diffusers' block-level hooks (FirstBlockCache, MagCache) find the fused class in ``TransformerBlockRegistry`` under
the original's entry. The state dict is unchanged.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.attention_processor import Attention
from diffusers.models.transformers.transformer_qwenimage import (QwenDoubleStreamAttnProcessor2_0,
                                                                 QwenImageTransformerBlock, apply_rotary_emb_qwen)

from .diffusers_fused import (_adopt, _feed_forward, _ff, _forward_wrapped, _gated_out, _hooked, _plain_layer_norm,
                              _project, Modulation, dispatch_kwargs, joint_attention_ok, kernel_modulation,
                              modulation_chunk, per_token_modulation, register_block, swap_blocks)

_PROJECTIONS = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")


def _modulation_ok(mod: Any, d: int) -> bool:
    """``Sequential(SiLU, linear(d -> 6d))`` as Qwen-Image builds it."""
    return (type(mod) is nn.Sequential and len(mod) == 2 and type(mod[0]) is nn.SiLU
            and getattr(mod[1], "out_features", None) == 6 * d)


def _qwen_supported(block: nn.Module) -> bool:
    if type(block) is not QwenImageTransformerBlock or _forward_wrapped(block):
        return False
    d = getattr(block, "dim", None)
    if not isinstance(d, int):
        return False
    return (all(_plain_layer_norm(getattr(block, n), d) for n in ("img_norm1", "img_norm2", "txt_norm1", "txt_norm2"))
            and _modulation_ok(block.img_mod, d) and _modulation_ok(block.txt_mod, d)
            and _feed_forward(block.img_mlp, d) and _feed_forward(block.txt_mlp, d)
            and block.img_mlp.net[0].approximate == "tanh" and block.txt_mlp.net[0].approximate == "tanh"
            and type(block.attn) is Attention)


def _linears(block: nn.Module) -> list[nn.Module]:
    a = block.attn
    return [a.to_q, a.to_k, a.to_v, a.add_q_proj, a.add_k_proj, a.add_v_proj, a.to_out[0], a.to_add_out,
            block.img_mlp.net[0].proj, block.img_mlp.net[2], block.txt_mlp.net[0].proj, block.txt_mlp.net[2]]


def _joint_attention(attn: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     text: tuple[torch.Tensor, torch.Tensor, torch.Tensor], b: int, mask: torch.Tensor | None,
                     rotary: Any) -> torch.Tensor:
    """``QwenDoubleStreamAttnProcessor2_0``'s attention of (B·S, inner) projection rows, the text's given apart,
    as (B, S_text + S, inner)."""
    head_dim = attn.inner_dim // attn.heads

    def heads(t: torch.Tensor) -> torch.Tensor:
        return t.view(b, -1, t.shape[-1]).unflatten(-1, (-1, head_dim))

    iq, ik, iv = heads(q), heads(k), heads(v)
    tq, tk, tv = (heads(x) for x in text)
    if attn.norm_q is not None:
        iq = attn.norm_q(iq)
    if attn.norm_k is not None:
        ik = attn.norm_k(ik)
    if attn.norm_added_q is not None:
        tq = attn.norm_added_q(tq)
    if attn.norm_added_k is not None:
        tk = attn.norm_added_k(tk)
    if rotary is not None:
        img_freqs, txt_freqs = rotary
        iq, ik = (apply_rotary_emb_qwen(x, img_freqs, use_real=False) for x in (iq, ik))
        tq, tk = (apply_rotary_emb_qwen(x, txt_freqs, use_real=False) for x in (tq, tk))
    query, key, value = torch.cat([tq, iq], dim=1), torch.cat([tk, ik], dim=1), torch.cat([tv, iv], dim=1)
    attn_mask = None
    if mask is not None:   # the text mask, the image tokens all visible
        image = torch.ones((b, iq.shape[1]), dtype=torch.bool, device=iq.device)
        attn_mask = torch.cat([mask, image], dim=1)[:, None, None, :]
    proc = attn.processor
    o = dispatch_attention_fn(query, key, value, attn_mask=attn_mask, dropout_p=0.0, is_causal=False,
                              **dispatch_kwargs(proc))
    return o.flatten(2, 3).to(query.dtype)


class FusedQwenImageTransformerBlock(QwenImageTransformerBlock):
    """A ``QwenImageTransformerBlock`` running the fused packed kernels (module docstring)."""

    def __init__(self, block: QwenImageTransformerBlock) -> None:
        if not _qwen_supported(block):
            raise ValueError("FusedQwenImageTransformerBlock handles QwenImageTransformerBlock in the structure "
                             "diffusers builds")
        _adopt(self, block)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                encoder_hidden_states_mask: torch.Tensor, temb: torch.Tensor, image_rotary_emb: Any = None,
                joint_attention_kwargs: dict[str, Any] | None = None, modulate_index: Any = None) -> Any:
        args = (hidden_states, encoder_hidden_states, encoder_hidden_states_mask, temb, image_rotary_emb,
                joint_attention_kwargs, modulate_index)
        attn = self.attn
        norms = (self.img_norm1, self.img_norm2, self.txt_norm1, self.txt_norm2, self.img_mod, self.txt_mod)
        if (self.training or joint_attention_kwargs or (modulate_index is not None) != self.zero_cond_t
                or hidden_states.ndim != 3 or encoder_hidden_states.ndim != 3 or temb.ndim != 2
                or any(_hooked(n) for n in norms)
                or not joint_attention_ok(attn, QwenDoubleStreamAttnProcessor2_0, _PROJECTIONS)):
            return super().forward(*args)
        b, t, d = hidden_states.shape
        text = encoder_hidden_states.shape[1]
        mask = encoder_hidden_states_mask
        index = modulate_index
        if (encoder_hidden_states.shape[0] not in (1, b)
                or temb.shape[0] not in ((2, 2 * b) if self.zero_cond_t else (1, b))
                or self.zero_cond_t and not (isinstance(index, torch.Tensor) and index.ndim == 2
                                             and index.shape[0] in (1, b) and index.shape[1] == t)
                or mask is not None and (mask.ndim != 2 or mask.shape[0] not in (1, b))):
            return super().forward(*args)   # (before any layer runs: a fallback computes nothing twice)
        # a batch-1 text (the pipeline's negative prompt call), timestep or modulate_index (an edit pipeline's
        # images per prompt): broadcast, as diffusers' sums and selection broadcast them
        encoder_hidden_states = encoder_hidden_states.expand(b, -1, -1)
        mod: Modulation
        if self.zero_cond_t:   # the edit model's: the target's tokens (index 0) at t, the condition images' at 0
            both = self.img_mod(temb).view(2, -1, 1, 6, d)   # ([t; 0] rows, B or 1, 1, 6, D)
            at_t = (index == 0)[..., None]                  # (B or 1, T, 1)

            def chunk(i: int) -> torch.Tensor:   # chunk i as diffusers selects it per token: (B, T, D)
                return torch.where(at_t, both[0, :, :, i], both[1, :, :, i]).expand(b, t, d)

            mod, m32 = chunk, per_token_modulation(chunk, b * t, runs_of=at_t)   # (6, G, D): a group per run of rows
            cmod = self.txt_mod(temb[:temb.shape[0] // 2]).expand(b, -1).view(b, 6, d)
        else:
            mod = self.img_mod(temb).expand(b, -1).view(b, 6, d)
            m32 = kernel_modulation(mod)
            cmod = self.txt_mod(temb).expand(b, -1).view(b, 6, d)
        c32 = kernel_modulation(cmod)
        h, c = hidden_states, encoder_hidden_states
        h2, c2 = h.reshape(b * t, d).contiguous(), c.reshape(b * text, d).contiguous()
        n1, cn1 = self.img_norm1, self.txt_norm1
        q, k, v = _project((attn.to_q, attn.to_k, attn.to_v), h2,
                           lambda: n1(h) * (1 + modulation_chunk(mod, 1)) + modulation_chunk(mod, 0), ln_eps=n1.eps,
                           shift=m32[0], scale=m32[1])
        eq, ek, ev = _project((attn.add_q_proj, attn.add_k_proj, attn.add_v_proj), c2,
                              lambda: cn1(c) * (1 + cmod[:, 1:2]) + cmod[:, 0:1], ln_eps=cn1.eps, shift=c32[0],
                              scale=c32[1])
        if mask is not None:
            mask = mask.to(torch.bool).expand(b, -1)
        o = _joint_attention(attn, q, k, v, (eq, ek, ev), b, mask, image_rotary_emb)
        oc, oh = o.split_with_sizes([text, t], dim=1)
        h2 = _gated_out(attn.to_out[0], oh, h2, b, m32[2], modulation_chunk(mod, 2))
        c2 = _gated_out(attn.to_add_out, oc, c2, b, c32[2], cmod[:, 2:3])
        h2 = _ff(self.img_mlp, self.img_norm2, h2, b, mod, m32)
        c2 = _ff(self.txt_mlp, self.txt_norm2, c2, b, cmod, c32)
        h, c = h2.view(b, t, d), c2.view(b, text, d)
        if c.dtype == torch.float16:
            c = c.clip(-65504, 65504)
        if h.dtype == torch.float16:
            h = h.clip(-65504, 65504)
        return c, h


def fuse_qwen_blocks(model: nn.Module) -> int:
    """Swap every Qwen-Image block of ``model`` that the fused class handles and that has a packed linear with
    quantized activations to fuse; returns how many were swapped."""
    return swap_blocks(model, lambda m: FusedQwenImageTransformerBlock if _qwen_supported(m) else None, _linears)


register_block(FusedQwenImageTransformerBlock, 1, 0)   # (returns (encoder_hidden_states, hidden_states))
