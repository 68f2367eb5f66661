"""Fused blocks of the SANA-WM refiner for packed inference: the fusions of :mod:`.ltx2_fused` for diffusers'
``SanaWMLTX2RefinerTransformerBlock`` (SANA-WM's stage 2: LTX-2's video stream, its self-attention through a
sliding-window KV cache).

The modulation is the block's table plus the timestep projection, ``mod = scale_shift_table + temb``, one per token
(the refiner takes a timestep per token; the kernels run a group per run of equal rows: a latent frame); ``RMS`` is
an RMSNorm without affine:

    q, k, v = to_q/k/v ← Q(mod(RMS(h), shift_msa, scale_msa))
    h = h + gate_msa · to_out(attention(rotary(RMSNorm(q)), [sink | history | rotary(RMSNorm(k))], [.. | v]))
    h = h + attn2(RMS(h), text)                                        (diffusers' module)
    h = h + gate_mlp · ff.net[2](Q(GELU_tanh(ff.net[0].proj(Q(mod(RMS(h), shift_mlp, scale_mlp))))))

Where a linear is a :class:`TreeQLinear` with quantized activations, RMSNorm + modulate + quantization run in its
``quantize_input`` kernel (one call shared by to_q/to_k/to_v and the per-head gate's linear where the attention has
one), GELU(tanh) and ``ff.net[2]``'s codes in ``ff.net[0].proj``'s epilogue, and the gated residuals in
``to_out[0]``'s and ``ff.net[2]``'s. The self-attention is ``SanaWMLTX2RefinerAttnProcessor``'s computation on the
kernels' projections, the cache included: with ``kv_cache_mode`` ``"capture_pre_rope"`` it stores the normalized
keys and values before the rotary embedding; ``"inject"`` prepends the cache's sink (re-rotated by the cache's
``sink_pe``) and history to the keys and values; ``"inject_and_capture_post_rope"`` also stores the rotated keys and
values. The audio streams the block holds (LTX-2's, so that its checkpoints load) stay idle, as in diffusers. Fused
and unfused agree to the model dtype's rounding (the kernels normalize and modulate in float32, and add the gated
residuals in float32), not bit for bit.

A block is swapped only in the structure diffusers builds (RMSNorms without affine, ``SanaWMLTX2Attention`` with
the interleaved or split rotary embedding, six modulation vectors, ``FeedForward`` of [GELU, Dropout, linear]) with
a packed linear with quantized activations to fuse. It runs diffusers' own forward in training mode, for a ``temb``
of another shape than ``(B, 1, 6·D)`` or ``(B, S, 6·D)`` or of another dtype, and when ``norm1``, ``norm3`` or the
self-attention carries a hook or another processor (a ``kv_cache_mode`` the model's forward refuses computes as
diffusers' block does: no cache; one without a cache raises where diffusers' does, after the projections); a
feed-forward, ``to_out[0]`` or ``ff.net[0].proj`` that is hooked or not packed runs as diffusers computes it. The
fused forward follows diffusers 0.42's block; the state dict is unchanged.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from diffusers.models.transformers.transformer_sana_wm_refiner import (SanaWMLTX2Attention,
                                                                       SanaWMLTX2RefinerAttnProcessor,
                                                                       SanaWMLTX2RefinerTransformerBlock,
                                                                       apply_interleaved_rotary_emb,
                                                                       apply_split_rotary_emb)

from .diffusers_fused import (_adopt, _bypassed_hook, _feed_forward, _forward_wrapped, _hooked, like_rows,
                              register_block, self_attention_ok, swap_blocks)
from .ltx2_fused import _modulation, _projections, attend, feed_forward, gated_heads_attention
from .ltx_fused import _plain_rms_norm

ROTARY = {"interleaved": apply_interleaved_rotary_emb, "split": apply_split_rotary_emb}


def _supported(block: nn.Module) -> bool:
    if type(block) is not SanaWMLTX2RefinerTransformerBlock or _forward_wrapped(block):
        return False
    table, attn = block.scale_shift_table, block.attn1
    if not isinstance(table, torch.Tensor) or table.dim() != 2 or table.shape[0] != 6:
        return False   # (nine vectors, LTX-2.3's cross-attention adaLN: the refiner's forward unpacks six)
    d = table.shape[1]
    return (_plain_rms_norm(block.norm1, d) and _plain_rms_norm(block.norm3, d)
            and type(attn) is SanaWMLTX2Attention and attn.rope_type in ROTARY and _feed_forward(block.ff, d))


def _linears(block: nn.Module) -> list[nn.Module]:
    return [*_projections(block.attn1), block.attn1.to_out[0], block.ff.net[0].proj, block.ff.net[2]]


def _attention_ok(attn: Any) -> bool:
    """The refiner's processor exactly, on unfused projections, nothing hooked that the kernels bypass."""
    return (self_attention_ok(attn, SanaWMLTX2Attention, SanaWMLTX2RefinerAttnProcessor)
            and (attn.to_gate_logits is None or not _bypassed_hook(attn.to_gate_logits)))


def _cached_attention(attn: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, b: int, rotary: Any,
                      sink_rotary: Any, cache: Any, mode: str | None, gate: torch.Tensor | None) -> torch.Tensor:
    """``SanaWMLTX2RefinerAttnProcessor``'s attention of (B·S, inner) projection rows, as (B, S, inner): the cache
    written and read as ``mode`` says, each head scaled by ``2 sigmoid(gate)`` where the attention has per-head gates
    (``gate``: their (B·S, heads) logits)."""
    rotate = ROTARY.get(attn.rope_type)
    if rotate is None:   # (a type set after fusing: diffusers' error)
        raise ValueError(f"Unsupported LTX-2 RoPE type: {attn.rope_type}")
    query, key, value = (t.view(b, -1, t.shape[-1]) for t in (q, k, v))
    query, key = attn.norm_q(query), attn.norm_k(key)
    if mode == "capture_pre_rope":
        cache.store_captured_pre_rope(key.detach().clone(), value.detach().clone())
    query, key = rotate(query, rotary), rotate(key, rotary)
    if mode == "inject_and_capture_post_rope":
        cache.store_captured_post_rope(key.detach().clone(), value.detach().clone())
    if mode in ("inject", "inject_and_capture_post_rope"):
        keys, values = [], []
        sink = cache.get_sink()
        if sink is not None:
            if sink_rotary is None:
                raise ValueError("Injecting the attention sink requires the `sink_pe` RoPE tuple on the KV cache.")
            keys.append(rotate(sink[0].to(key.dtype), sink_rotary))
            values.append(sink[1].to(value.dtype))
        history = cache.get_history()
        if history is not None:
            keys.append(history[0].to(key.dtype))
            values.append(history[1].to(value.dtype))
        if keys:
            key, value = torch.cat([*keys, key], dim=1), torch.cat([*values, value], dim=1)
    return gated_heads_attention(attn, query, key, value, b, gate)


class FusedSanaWMLTX2RefinerTransformerBlock(SanaWMLTX2RefinerTransformerBlock):
    """A ``SanaWMLTX2RefinerTransformerBlock`` running the fused packed kernels (module docstring)."""

    def __init__(self, block: SanaWMLTX2RefinerTransformerBlock) -> None:
        if not _supported(block):
            raise ValueError("FusedSanaWMLTX2RefinerTransformerBlock handles SanaWMLTX2RefinerTransformerBlock in "
                             "the structure diffusers builds")
        _adopt(self, block)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, temb: torch.Tensor,
                video_rotary_emb: Any, encoder_attention_mask: torch.Tensor | None = None,
                sink_rotary_emb: Any = None, kv_cache: Any = None, kv_cache_mode: str | None = None) -> torch.Tensor:
        h = hidden_states
        if (self.training or h.ndim != 3 or not like_rows(h, temb, batch=False) or _hooked(self.norm1)
                or _hooked(self.norm3) or not _attention_ok(self.attn1)
                or (modulation := _modulation(self.scale_shift_table, temb, h)) is None):
            return super().forward(h, encoder_hidden_states, temb, video_rotary_emb, encoder_attention_mask,
                                   sink_rotary_emb, kv_cache, kv_cache_mode)
        mod, m32 = modulation
        b = h.shape[0]
        h = attend(self.norm1, self.attn1, h, mod, m32,
                   lambda q, k, v, gate: _cached_attention(self.attn1, q, k, v, b, video_rotary_emb, sink_rotary_emb,
                                                           kv_cache, kv_cache_mode, gate))
        h = h + self.attn2(self.norm2(h), encoder_hidden_states=encoder_hidden_states, query_rotary_emb=None,
                           attention_mask=encoder_attention_mask)
        return feed_forward(self.norm3, self.ff, h, mod, m32)


register_block(FusedSanaWMLTX2RefinerTransformerBlock, 0)   # returns hidden_states alone, as the original


def fuse_sanawm_refiner_blocks(model: nn.Module) -> int:
    """Swap every SANA-WM refiner block of ``model`` that the fused class handles and that has a packed linear with
    quantized activations to fuse; returns how many were swapped."""
    return swap_blocks(model, lambda m: FusedSanaWMLTX2RefinerTransformerBlock if _supported(m) else None, _linears)
