"""Fused AnyFlow blocks for packed inference: the fusions of :mod:`.diffusers_fused` for diffusers'
``AnyFlowTransformerBlock`` (AnyFlow, and AnyFlow FAR's causal video generation: the class in each module).

The block is Wan's (:mod:`.wan_fused`) under a per-token modulation: the model hands every block one timestep
projection per token (B, S, 6, D) (a timestep per frame), which each block adds to its own ``scale_shift_table``:

    q, k, v = to_q/k/v ← Q(mod(LN(h), shift_1, scale_1))
    h = h + gate_1 · attn1(q, k, v)        (the processor's own: RMSNorm, rotary, FAR's block mask and KV cache)
    h = h + attn2(norm2(h), text)           (as diffusers computes it)
    h = h + gate_2 · ffn.net[2](Q(GELU(ffn.net[0].proj(Q(mod(LN(h), shift_2, scale_2))))))

Where a linear is a :class:`TreeQLinear` with quantized activations, LayerNorm + modulate + quantization run in its
``quantize_input`` kernel (one call shared by to_q/to_k/to_v with one activation spec and no Monarch branch, one for
the feed-forward), GELU(tanh) and ffn.net[2]'s codes in ffn.net[0].proj's epilogue, the feed-forward's gated
residual in ffn.net[2]'s. The kernels take one modulation group per run of tokens sharing a timestep (the runs found
once per forward on the projections every block is handed). The self-attention runs its processor itself
(``AnyFlowAttnProcessor``, or FAR's ``AnyFlowCausalAttnProcessor`` with its KV cache) on a view of the attention
whose projections return the kernels' outputs (``HandedAttention``), so its norms, rotary embedding, cache and
to_out are diffusers' own; its gated residual is added in float32 as diffusers adds it. Fused and unfused agree to
the model dtype's rounding, not bit for bit.

A block is swapped only in the structure diffusers builds (float32 LayerNorms without affine, an ``AnyFlowAttention``
self-attention without image projections, a GELU(tanh) feed-forward) with a packed linear with quantized activations
to fuse. It runs diffusers' own forward in training mode, on other input ranks or modulation shapes, with fused
projections, and when a norm the kernel computes or the self-attention carries a hook or another processor; a
feed-forward that is hooked runs as diffusers computes it. diffusers' block registry has no entry for the original,
nor for the fused class: a block cache would skip FAR's blocks, whose cache steps write the KV cache. The state dict
is unchanged.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from diffusers.models.transformers import transformer_anyflow as _anyflow
from diffusers.models.transformers import transformer_anyflow_far as _far

from .diffusers_fused import _ff, _forward_wrapped, _hooked, adopt_checked, swap_blocks
from .helios_fused import handed_attention_ok, handed_linears, handed_self_attention
from .linear import runs_packed_kernels as _quantized
from .wan_fused import wan_structure

# each module's block with its attention class, and the self-attention processors whose computation the fused path
# hands the kernels' projections to (the bidirectional one, FAR's causal one)
_ATTENTIONS = {_anyflow.AnyFlowTransformerBlock: _anyflow.AnyFlowAttention,
               _far.AnyFlowTransformerBlock: _far.AnyFlowAttention}
_PROCESSORS = (_anyflow.AnyFlowAttnProcessor, _far.AnyFlowAttnProcessor, _far.AnyFlowCausalAttnProcessor)


def _supported(block: nn.Module) -> bool:
    attention = _ATTENTIONS.get(type(block))
    return (attention is not None and not _forward_wrapped(block) and wan_structure(block, attention)
            and getattr(block.attn1, "add_k_proj", None) is None)


def _forward(block: Any, unfused: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
             temb: torch.Tensor, rotary_emb: Any, attention_mask: Any, kv_cache: Any,
             kv_cache_flag: Any) -> torch.Tensor:
    """The fused forward of an AnyFlow block (module docstring); ``unfused`` is diffusers' own."""
    def fallback() -> torch.Tensor:
        return unfused(hidden_states, encoder_hidden_states, temb, rotary_emb, attention_mask, kv_cache, kv_cache_flag)

    h, a1 = hidden_states, block.attn1
    if (block.training or h.ndim != 3 or temb.ndim != 4 or tuple(temb.shape) != (*h.shape[:2], 6, h.shape[2])
            or _hooked(block.norm1) or _hooked(block.norm3) or not handed_attention_ok(a1, _PROCESSORS)):
        return fallback()
    b, s, d = h.shape
    chunk, m32, handed, rows = handed_self_attention(block, h, temb)
    cache = {} if kv_cache is None else {"kv_cache": kv_cache, "kv_cache_flag": kv_cache_flag}
    o = a1.processor(handed, rows, rotary_emb=rotary_emb, attention_mask=attention_mask, **cache)
    h = (h.float() + o * chunk(2)).type_as(h)
    h = h + block.attn2(hidden_states=block.norm2(h.float()).type_as(h), encoder_hidden_states=encoder_hidden_states)
    if _quantized(block.ffn.net[0].proj):   # (_ff runs a hooked or unpacked part as diffusers computes it)
        return _ff(block.ffn, block.norm3, h.reshape(b * s, d).contiguous(), b, chunk, m32).view(b, s, d)
    x = (block.norm3(h.float()) * (1 + chunk(4)) + chunk(3)).type_as(h)
    return (h.float() + block.ffn(x).float() * chunk(5)).type_as(h)


class FusedAnyFlowTransformerBlock(_anyflow.AnyFlowTransformerBlock):
    """An ``AnyFlowTransformerBlock`` running the fused packed kernels (module docstring)."""

    def __init__(self, block: nn.Module) -> None:
        adopt_checked(self, block, _ATTENTIONS, _supported)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, temb: torch.Tensor,
                rotary_emb: Any, attention_mask: Any, kv_cache: Any = None, kv_cache_flag: Any = None) -> torch.Tensor:
        return _forward(self, super().forward, hidden_states, encoder_hidden_states, temb, rotary_emb,
                        attention_mask, kv_cache, kv_cache_flag)


class FusedAnyFlowFARTransformerBlock(_far.AnyFlowTransformerBlock):
    """AnyFlow FAR's ``AnyFlowTransformerBlock`` (the same class in its own module) running the fused packed
    kernels (module docstring)."""

    def __init__(self, block: nn.Module) -> None:
        adopt_checked(self, block, _ATTENTIONS, _supported)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, temb: torch.Tensor,
                rotary_emb: Any, attention_mask: Any, kv_cache: Any = None, kv_cache_flag: Any = None) -> torch.Tensor:
        return _forward(self, super().forward, hidden_states, encoder_hidden_states, temb, rotary_emb,
                        attention_mask, kv_cache, kv_cache_flag)


_FUSED = {_anyflow.AnyFlowTransformerBlock: FusedAnyFlowTransformerBlock,
          _far.AnyFlowTransformerBlock: FusedAnyFlowFARTransformerBlock}


def fuse_anyflow_blocks(model: nn.Module) -> int:
    """Swap every AnyFlow block of ``model`` that a fused class handles and that has a packed linear with quantized
    activations to fuse; returns how many were swapped."""
    return swap_blocks(model, lambda m: _FUSED[type(m)] if _supported(m) else None, handed_linears)


