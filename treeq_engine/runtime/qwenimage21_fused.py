"""Fused Qwen-Image 2.1 blocks for packed inference: the fusions of :mod:`.diffusers_fused` for diffusers'
``QwenImage21TransformerBlock`` (single stream over [text; condition images; target image]).

Every block slices ``(scale, gate)`` pairs out of the model's one shared modulation, per sample, or per token where
the model runs a causal condition (text and condition-image tokens read the ``t = 0`` row, the target image its
sample's: ``_select_modulation_rows``). ``LN`` has no affine:

    q, k, v = to_q/k/v ← Q(LN(h)·(1 + scale_1))
    h = h + tanh(gate_1) · attn(q, k, v)                     (the processor's attention and to_out, KV cache and all)
    h = h + tanh(gate_2) · out(Q(SiLU(gate_layer ← n) ⊙ (proj ← n))),   n = Q(LN(h)·(1 + scale_2))

Where a linear is a :class:`TreeQLinear` with quantized activations, LayerNorm + modulate + quantization run in its
``quantize_input`` kernel (one call shared by to_q/to_k/to_v, one by gate_layer/proj, per activation spec without a
Monarch branch), and the feed-forward's gated residual in ``out``'s epilogue. The per-token tables reach the kernels
as one modulation group per run of tokens (``per_token_modulation``). The attention runs the processor itself
(``QwenImage21AttnProcessor`` or ``QwenImage21FlexAttnProcessor``: the KV cache's prefill, extract and cached decode,
the block-causal segments or mask), on a view of the attention whose projections return what the kernels computed
(so its RMSNorms, rotary embedding, cache bookkeeping, attention and to_out are diffusers' own, and nothing on the
shared modules changes). Fused and unfused agree to the model dtype's rounding, not bit for bit (the kernels
modulate in float32, and take the feed-forward gate's tanh there).

A block is swapped only in the structure diffusers builds (LayerNorms without affine, the SwiGLU feed-forward, a
``QwenImage21Attention``) with a packed linear with quantized activations to fuse. It runs diffusers' own forward in
training mode, on other input ranks or modulation shapes, with fused projections, and when a norm, the attention,
a projection the kernels run or the feed-forward carries a hook or another processor. diffusers' block registry has
no entry for the original, nor for the fused class. The state dict is unchanged.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from diffusers.models.transformers.transformer_qwenimage21 import (QwenImage21Attention, QwenImage21AttnProcessor,
                                                                   QwenImage21FlexAttnProcessor,
                                                                   QwenImage21SwiGLUFeedForward,
                                                                   QwenImage21TransformerBlock,
                                                                   _select_modulation_rows)

from .diffusers_fused import (_adopt, _bypassed_hook, _forward_wrapped, _hooked, _plain_layer_norm, _project,
                              hand_projections, once_per_forward, per_token_modulation, swap_blocks)
from .linear import runs_packed_kernels as _quantized

PROJECTIONS = ("to_q", "to_k", "to_v")
PROCESSORS = (QwenImage21AttnProcessor, QwenImage21FlexAttnProcessor)


def _supported(block: nn.Module) -> bool:
    if type(block) is not QwenImage21TransformerBlock or _forward_wrapped(block):
        return False
    attn, ff = block.attn, block.img_mlp
    d = getattr(attn.to_q, "in_features", None) if type(attn) is QwenImage21Attention else None
    return (isinstance(d, int) and _plain_layer_norm(block.img_norm1, d) and _plain_layer_norm(block.img_norm2, d)
            and type(ff) is QwenImage21SwiGLUFeedForward and getattr(ff.proj, "in_features", None) == d
            and getattr(ff.gate_layer, "in_features", None) == d and getattr(ff.out, "out_features", None) == d)


def _linears(block: nn.Module) -> list[nn.Module]:
    a, ff = block.attn, block.img_mlp
    return [a.to_q, a.to_k, a.to_v, ff.gate_layer, ff.proj, ff.out]


def _runs_fused(block: nn.Module) -> bool:
    """The block's parts compute what the fused path computes (checked on every forward): the processor diffusers
    ships, unfused projections without a hook where the kernels run them, no hook on the norms, the attention or the
    feed-forward."""
    a, ff = block.attn, block.img_mlp
    return (type(a.processor) in PROCESSORS and not getattr(a, "fused_projections", False)
            and not any(_hooked(m) for m in (block.img_norm1, block.img_norm2, a, ff, ff.activation_fn))
            and not any(_bypassed_hook(getattr(a, n)) for n in PROJECTIONS)
            and not _bypassed_hook(ff.gate_layer) and not _bypassed_hook(ff.proj) and not _bypassed_hook(ff.out))


def _tables(modulation: torch.Tensor, mask: torch.Tensor | None, b: int, s: int,
            d: int) -> tuple[list[torch.Tensor], torch.Tensor] | None:
    """scale_1, gate_1, scale_2, gate_2 as diffusers broadcasts them ((B, 1, D) or per token (B, S, D)), and as the
    kernels take them: float32 (4, G, D), G = B, or one group per run of tokens. None for another shape."""
    rows = 1 + (mask is not None)
    if modulation.ndim != 2 or tuple(modulation.shape) != (b + rows - 1, 4 * d):
        return None
    if mask is not None and tuple(mask.shape) != (s,):
        return None
    (scale1, gate1), (scale2, gate2) = (m.chunk(2, dim=-1) for m in modulation.chunk(2, dim=-1))
    chunks = [_select_modulation_rows(t, mask) for t in (scale1, gate1, scale2, gate2)]
    if mask is None:
        return chunks, once_per_forward([modulation], lambda: torch.stack([c[:, 0] for c in chunks]).float())
    # (the runs are the mask's: a token reads its sample's row or the t = 0 row; found once per forward)
    return chunks, once_per_forward([modulation, mask], lambda: per_token_modulation(
        lambda i: chunks[i].expand(b, s, d), b * s, chunks=4, runs_of=mask.view(1, s, 1)))


class FusedQwenImage21TransformerBlock(QwenImage21TransformerBlock):
    """A ``QwenImage21TransformerBlock`` running the fused packed kernels (module docstring)."""

    def __init__(self, block: QwenImage21TransformerBlock) -> None:
        if not _supported(block):
            raise ValueError("FusedQwenImage21TransformerBlock handles QwenImage21TransformerBlock in the structure "
                             "diffusers builds")
        _adopt(self, block)

    def forward(self, hidden_states: torch.Tensor, modulation: torch.Tensor, rotary_emb: torch.Tensor | None = None,
                attention_mask: Any | None = None, target_token_mask: torch.Tensor | None = None,
                layer_cache: Any = None, kv_cache_mode: str | None = None, cache_write_slice: slice | None = None,
                segments: list[tuple[int, int, bool]] | None = None,
                key_valid: torch.Tensor | None = None) -> torch.Tensor:
        attention = dict(attention_mask=attention_mask, rotary_emb=rotary_emb, layer_cache=layer_cache,
                         kv_cache_mode=kv_cache_mode, cache_write_slice=cache_write_slice, segments=segments,
                         key_valid=key_valid)
        x = hidden_states
        tables = None if self.training or x.ndim != 3 or not _runs_fused(self) else \
            _tables(modulation, target_token_mask, x.shape[0], x.shape[1], x.shape[2])
        if tables is None:
            return super().forward(x, modulation, target_token_mask=target_token_mask, **attention)
        (scale1, gate1, scale2, gate2), m32 = tables
        b, s, d = x.shape
        zero = torch.zeros_like(m32[0])
        a, ff = self.attn, self.img_mlp

        # the processor's own attention (as QwenImage21Attention.forward calls it), handed the kernels' projections
        # through a view of the attention; float projections read diffusers' modulated rows, as diffusers calls them
        handed, rows = hand_projections(a, PROJECTIONS, x, lambda: self.img_norm1(x) * (1 + scale1),
                                        ln_eps=self.img_norm1.eps, shift=zero, scale=m32[0])
        x = x + gate1.tanh() * a.processor(handed, rows, **attention)

        x2 = x.reshape(b * s, d).contiguous()
        g, u = _project((ff.gate_layer, ff.proj), x2, lambda: self.img_norm2(x) * (1 + scale2),
                        ln_eps=self.img_norm2.eps, shift=zero, scale=m32[2])
        h = ff.activation_fn(g) * u
        if _quantized(ff.out):
            x = ff.out.linear(ff.out.quantize_input(h.contiguous()), out_dtype=x.dtype, residual=x2,
                              gate=m32[3].tanh()).view(b, s, d)
        else:
            x = x + gate2.tanh() * ff.out(h.view(b, s, -1))
        if x.dtype == torch.float16:
            x = x.clip(-65504, 65504)
        return x


def fuse_qwenimage21_blocks(model: nn.Module) -> int:
    """Swap every Qwen-Image 2.1 block of ``model`` that the fused class handles and that has a packed linear with
    quantized activations to fuse; returns how many were swapped."""
    return swap_blocks(model, lambda m: FusedQwenImage21TransformerBlock if _supported(m) else None, _linears)
