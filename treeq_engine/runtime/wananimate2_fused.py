"""Fused Wan-Animate-2 blocks for packed inference: the fusions of :mod:`.diffusers_fused` for diffusers'
``WanAnimate2TransformerBlock``.

Wan's block (``wan_fused``) with another layout: a float32 modulation (the block's table plus the timestep
projection: six vectors per sample, DiT's order) around float32 LayerNorms without affine, a self-attention whose
processor keeps a KV cache of the reference tokens (``kv_cache_mode``: "extract" writes it in the reference pass,
"cached" reads it in each generation step), and a feed-forward of [linear, GELU(tanh), linear]:

    q, k, v = to_q/k/v ← Q(mod(LN(h), shift, scale));   h = h + gate · attention(...)       (the processor's)
    h = h + cross_attn(norm3(h), text, image)                                            (diffusers' module)
    h = h + gate2 · ffn[2](Q(GELU_tanh(ffn[0] ← Q(mod(LN(h), shift2, scale2)))))

Where a linear is a :class:`TreeQLinear` with quantized activations, LayerNorm + modulate + quantization run in its
``quantize_input`` kernel (one call for to_q/to_k/to_v with one activation spec and no Monarch branch, one for
ffn[0]), GELU(tanh) and ffn[2]'s codes in ffn[0]'s epilogue, the feed-forward's gated residual in ffn[2]'s
(float32, as diffusers sums it). The self-attention runs the block's own processor (the q/k RMSNorms, the KV cache,
the float64 rotary embedding, the block mask, the output projection) on the kernels' projections
(``HandedAttention``): the keys it caches are the kernels'. Fused and unfused agree to the model dtype's rounding, not
bit for bit.

A block is swapped only in the structure diffusers builds with a packed linear with quantized activations to fuse.
It runs diffusers' own forward in training mode, for a ``temb`` whose batch is not the rows', when a norm or the
self-attention carries a hook or another processor (or a projection the kernels run does) or its projections are
fused; a hooked feed-forward (or a part of it the kernels run) runs as the module. The state dict is unchanged.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from diffusers.models.transformers.transformer_wan_animate_2 import (WanAnimate2Attention, WanAnimate2AttnProcessor,
                                                                     WanAnimate2TransformerBlock)

from .diffusers_fused import (_adopt, _bypassed_hook, _forward_wrapped, _hooked, hand_projections, kernel_modulation,
                              like_rows, plain_fp32_layer_norm, refuse_fused_projections, register_block,
                              runs_processor, swap_blocks)
from .linear import runs_packed_kernels as _quantized

_PROJECTIONS = ("to_q", "to_k", "to_v")


def _supported(block: nn.Module) -> bool:
    if type(block) is not WanAnimate2TransformerBlock or _forward_wrapped(block):
        return False
    table = block.modulation
    d = table.shape[-1] if table.dim() == 3 and tuple(table.shape[:2]) == (1, 6) else None
    ffn = block.ffn
    return (d is not None and plain_fp32_layer_norm(block.norm1, d) and plain_fp32_layer_norm(block.norm2, d)
            and type(block.self_attn) is WanAnimate2Attention and not block.self_attn.is_cross_attention
            and type(ffn) is nn.Sequential and len(ffn) == 3 and type(ffn[1]) is nn.GELU
            and ffn[1].approximate == "tanh" and getattr(ffn[0], "in_features", None) == d
            and getattr(ffn[2], "out_features", None) == d)


def _linears(block: nn.Module) -> list[nn.Module]:
    a = block.self_attn
    return [a.to_q, a.to_k, a.to_v, block.ffn[0], block.ffn[2]]


def _feed_forward(block: Any, h: torch.Tensor, mod: torch.Tensor, m32: torch.Tensor) -> torch.Tensor:
    """``h + gate2 · ffn(mod(LN(h), shift2, scale2))`` (B, S, D) in float32, rounded to ``h``'s dtype as diffusers
    rounds it: LayerNorm + modulate in ffn[0]'s quantization, GELU(tanh) and ffn[2]'s codes in its epilogue, the gated
    residual in ffn[2]'s. A hook on the feed-forward or on a part the kernels run: the module runs, hooks and all."""
    b, s, d = h.shape
    ffn, norm = block.ffn, block.norm2
    fc1, act, fc2 = ffn

    def rows() -> torch.Tensor:
        return (norm(h.float()) * (1 + mod[:, 4:5]) + mod[:, 3:4]).type_as(h)

    # (an activation that is not GELU(tanh) any more, or a hooked one, where the kernel would compute it: the module)
    epilogue_gelu = type(act) is nn.GELU and act.approximate == "tanh" and not _hooked(act)
    if _hooked(ffn) or (_quantized(fc1) and not epilogue_gelu) or _bypassed_hook(fc1) or _bypassed_hook(fc2):
        return (h.float() + ffn(rows()).float() * mod[:, 5:6]).type_as(h)
    h2 = h.reshape(b * s, d).contiguous()
    if _quantized(fc1):
        a = fc1.quantize_input(h2, ln_eps=norm.eps, shift=m32[3], scale=m32[4])
        codes = _quantized(fc2) and fc2.monarch_w1 is None   # (a branch's stage 1 needs float rows)
        y = fc1.linear(a, gelu=True, out_spec=fc2.act_spec if codes else None, out_dtype=h.dtype)
    else:
        y = act(fc1(rows())).reshape(b * s, -1)
    if _quantized(fc2):
        if isinstance(y, torch.Tensor):
            y = fc2.quantize_input(y.contiguous())
        return fc2.linear(y, out_dtype=h.dtype, residual=h2, gate=m32[5]).view(b, s, d)
    return (h.float() + fc2(y.view(b, s, -1)).float() * mod[:, 5:6]).type_as(h)


class FusedWanAnimate2TransformerBlock(WanAnimate2TransformerBlock):
    """A ``WanAnimate2TransformerBlock`` running the fused packed kernels (module docstring)."""

    def __init__(self, block: WanAnimate2TransformerBlock) -> None:
        if not _supported(block):
            raise ValueError("FusedWanAnimate2TransformerBlock handles WanAnimate2TransformerBlock in the structure "
                             "diffusers builds")
        _adopt(self, block)

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor, encoder_hidden_states: torch.Tensor,
                kv_cache: Any, kv_cache_mode: str, rotary_emb: torch.Tensor, grid_sizes: torch.Tensor,
                encoder_hidden_states_image: torch.Tensor | None = None, reference_rotary_emb: Any = None,
                reference_grid_sizes: torch.Tensor | None = None, attention_mask: Any = None,
                origin_latent_frames: int | None = None, origin_latent_hw: int | None = None) -> torch.Tensor:
        args = (hidden_states, temb, encoder_hidden_states, kv_cache, kv_cache_mode, rotary_emb, grid_sizes,
                encoder_hidden_states_image, reference_rotary_emb, reference_grid_sizes, attention_mask,
                origin_latent_frames, origin_latent_hw)
        h, attn = hidden_states, self.self_attn
        refuse_fused_projections(attn, _PROJECTIONS)   # (a dense copy of packed layers: an error)
        if (self.training or h.ndim != 3 or temb.ndim != 3 or not like_rows(h, temb, dtype=False)
                or getattr(attn, "fused_projections", False) or _hooked(self.norm1) or _hooked(self.norm2)
                or not runs_processor(attn, (WanAnimate2AttnProcessor,), _PROJECTIONS)):
            return super().forward(*args)
        b, s, d = h.shape
        mod = self.modulation + temb   # (B, 6, D) float32, as diffusers adds them
        if tuple(mod.shape) != (b, 6, d):
            return super().forward(*args)
        m32 = kernel_modulation(mod)
        handed, rows = hand_projections(
            attn, _PROJECTIONS, h, lambda: (self.norm1(h.float()) * (1 + mod[:, 1:2]) + mod[:, 0:1]).type_as(h),
            ln_eps=self.norm1.eps, shift=m32[0], scale=m32[1])
        o = attn.processor(handed, rows, rotary_emb=rotary_emb, grid_sizes=grid_sizes, kv_cache=kv_cache,
                           kv_cache_mode=kv_cache_mode,
                           rope_stride=self.refer_stride if kv_cache_mode == "extract" else 1,
                           reference_rotary_emb=reference_rotary_emb, reference_grid_sizes=reference_grid_sizes,
                           reference_rope_stride=self.refer_stride, attention_mask=attention_mask,
                           origin_latent_frames=origin_latent_frames, origin_latent_hw=origin_latent_hw)
        h = (h.float() + o * mod[:, 2:3]).type_as(h)
        h = h + self.cross_attn(self.norm3(h.float()).type_as(h), encoder_hidden_states=encoder_hidden_states,
                                encoder_hidden_states_image=encoder_hidden_states_image)
        return _feed_forward(self, h, mod, m32)


def fuse_wananimate2_blocks(model: nn.Module) -> int:
    """Swap every Wan-Animate-2 block of ``model`` that :class:`FusedWanAnimate2TransformerBlock` handles and that
    has a packed linear with quantized activations to fuse; returns how many were swapped."""
    return swap_blocks(model, lambda m: FusedWanAnimate2TransformerBlock if _supported(m) else None, _linears)


register_block(FusedWanAnimate2TransformerBlock, 0)   # returns hidden_states alone, as the original
