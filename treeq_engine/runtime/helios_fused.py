"""Fused Helios blocks for packed inference: the fusions of :mod:`.diffusers_fused` for diffusers'
``HeliosTransformerBlock`` (Helios long video: the history frames' tokens before the frames being made).

The block is Wan's (:mod:`.wan_fused`), under a per-token modulation: the model hands every block one timestep
projection per token (B, S, 6, D) (the history's tokens at their timestep, 0 where it is zeroed, the new frames' at
the step's), which each block adds to its own ``scale_shift_table``:

    q, k, v = to_q/k/v ← Q(mod(LN(h), shift_1, scale_1))
    h = h + gate_1 · attn1(q, k, v)        (the processor's own: RMSNorm, rotary, the history keys' amplification)
    h = h + attn2(norm2(h), text)           (as diffusers computes it: on the new frames' rows with guidance)
    h = h + gate_2 · ffn.net[2](Q(GELU(ffn.net[0].proj(Q(mod(LN(h), shift_2, scale_2))))))

Where a linear is a :class:`TreeQLinear` with quantized activations, LayerNorm + modulate + quantization run in its
``quantize_input`` kernel (one call shared by to_q/to_k/to_v with one activation spec and no Monarch branch, one for
the feed-forward), GELU(tanh) and ffn.net[2]'s codes in ffn.net[0].proj's epilogue, the feed-forward's gated
residual in ffn.net[2]'s. The kernels take one modulation group per run of tokens sharing a timestep (the runs found
once per forward on the projections every block is handed). The self-attention runs its processor itself
(``HeliosAttnProcessor``) on a view of the attention whose projections return the kernels' outputs
(``HandedAttention``), so its norms, rotary embedding, history amplification and to_out are diffusers' own; its gated
residual is added in float32 as diffusers adds it. Fused and unfused agree to the model dtype's rounding, not bit for
bit.

A block is swapped only in the structure diffusers builds (float32 LayerNorms without affine, a ``HeliosAttention``
self-attention, a GELU(tanh) feed-forward) with a packed linear with quantized activations to fuse. It runs
diffusers' own forward in training mode, on other input ranks or modulation shapes, with fused projections, and when
a norm the kernel computes or the self-attention carries a hook or another processor; a feed-forward that is hooked
runs as diffusers computes it. diffusers' block registry has no entry for the original, nor for the fused class. The
state dict is unchanged.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn
from diffusers.models.transformers.transformer_helios import (HeliosAttention, HeliosAttnProcessor,
                                                              HeliosTransformerBlock)

from .diffusers_fused import (HandedAttention, _adopt, _ff, _forward_wrapped, _hooked, hand_projections,
                              per_token_modulation, runs_processor, swap_blocks)
from .linear import runs_packed_kernels as _quantized
from .wan_fused import wan_structure

PROJECTIONS = ("to_q", "to_k", "to_v")


def _supported(block: nn.Module) -> bool:
    return (type(block) is HeliosTransformerBlock and not _forward_wrapped(block)
            and wan_structure(block, HeliosAttention) and block.attn1.add_k_proj is None)


def handed_linears(block: nn.Module) -> list[nn.Module]:
    """The linears the fused path runs in a Wan-style block whose self-attention is handed its projections
    (Helios', AnyFlow's): q, k, v and the feed-forward's."""
    a = block.attn1
    return [a.to_q, a.to_k, a.to_v, block.ffn.net[0].proj, block.ffn.net[2]]


def handed_self_attention(block: Any, h: torch.Tensor, temb: torch.Tensor
                          ) -> tuple[Callable[[int], torch.Tensor], torch.Tensor, HandedAttention, torch.Tensor]:
    """A Wan-style block's per-token modulation of ``h`` by its (B, S, 6, D) ``temb``: chunk i of diffusers' float32
    table + temb, (B, S, D), when asked; the kernels' (6, G, D) groups (the runs found once per forward, on
    ``temb``); and its self-attention's q/k/v from the quantization kernel, handed to a view of the attention, with the
    rows to call its processor with (``hand_projections``)."""
    b, s, _ = h.shape
    table = block.scale_shift_table[0]

    def chunk(i: int) -> torch.Tensor:
        return table[i] + temb[:, :, i].float()

    m32 = per_token_modulation(chunk, b * s, runs_of=temb)
    handed, rows = hand_projections(block.attn1, PROJECTIONS, h,
                                    lambda: (block.norm1(h.float()) * (1 + chunk(1)) + chunk(0)).type_as(h),
                                    ln_eps=block.norm1.eps, shift=m32[0], scale=m32[1])
    return chunk, m32, handed, rows


def handed_attention_ok(attn: Any, processors: tuple[type, ...]) -> bool:
    """The self-attention computes what the fused path hands it to (checked on every forward): one of
    ``processors`` exactly, unfused projections, no hook on it or on a projection the kernels run."""
    return not getattr(attn, "fused_projections", False) and runs_processor(attn, processors, PROJECTIONS)


class FusedHeliosTransformerBlock(HeliosTransformerBlock):
    """A ``HeliosTransformerBlock`` running the fused packed kernels (module docstring)."""

    def __init__(self, block: HeliosTransformerBlock) -> None:
        if not _supported(block):
            raise ValueError("FusedHeliosTransformerBlock handles HeliosTransformerBlock in the structure diffusers "
                             "builds")
        _adopt(self, block)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, temb: torch.Tensor,
                rotary_emb: torch.Tensor, original_context_length: int | None = None) -> torch.Tensor:
        args = (hidden_states, encoder_hidden_states, temb, rotary_emb, original_context_length)
        h, a1 = hidden_states, self.attn1
        if (self.training or h.ndim != 3 or temb.ndim != 4 or tuple(temb.shape) != (*h.shape[:2], 6, h.shape[2])
                or _hooked(self.norm1) or _hooked(self.norm3) or not handed_attention_ok(a1, (HeliosAttnProcessor,))):
            return super().forward(*args)
        b, s, d = h.shape
        chunk, m32, handed, rows = handed_self_attention(self, h, temb)
        o = a1.processor(handed, rows, None, None, rotary_emb, original_context_length)
        h = (h.float() + o * chunk(2)).type_as(h)

        # the cross-attention as diffusers computes it (with guidance on the new frames' rows alone)
        if self.guidance_cross_attn:
            history, new = torch.split(h, [h.shape[1] - original_context_length, original_context_length], dim=1)
            new = new + self.attn2(self.norm2(new.float()).type_as(new), encoder_hidden_states, None, None,
                                   original_context_length)
            h = torch.cat([history, new], dim=1)
        else:
            h = h + self.attn2(self.norm2(h.float()).type_as(h), encoder_hidden_states, None, None,
                               original_context_length)
        if _quantized(self.ffn.net[0].proj):   # (_ff runs a hooked or unpacked part as diffusers computes it)
            return _ff(self.ffn, self.norm3, h.reshape(b * s, d).contiguous(), b, chunk, m32).view(b, s, d)
        x = (self.norm3(h.float()) * (1 + chunk(4)) + chunk(3)).type_as(h)
        return (h.float() + self.ffn(x).float() * chunk(5)).type_as(h)


def fuse_helios_blocks(model: nn.Module) -> int:
    """Swap every Helios block of ``model`` that the fused class handles and that has a packed linear with quantized
    activations to fuse; returns how many were swapped."""
    return swap_blocks(model, lambda m: FusedHeliosTransformerBlock if _supported(m) else None, handed_linears)
