"""Fused PRX blocks for packed inference: the fusions of :mod:`.diffusers_fused` for diffusers' ``PRXBlock``.

An image-only block that reads the text through its attention's keys and values; one adaLN linear of ``silu(temb)``
gives six vectors per sample (DiT's order) around LayerNorms without affine:

    [q, k, v] = img_qkv_proj ← Q(mod(LN(h), shift, scale));   [k', v'] = txt_kv_proj ← the text as it is
    h = h + gate · to_out(attention(q, [k'; k], [v'; v], text mask))   (per-head RMSNorms, the rotary embedding)
    x = mod(LN(h), shift2, scale2)
    h = h + gate2 · down_proj(Q(GELU_tanh(gate_proj ← Q(x)) ⊙ up_proj ← Q(x)))

Where a linear is a :class:`TreeQLinear` with quantized activations, LayerNorm + modulate + quantization run in its
``quantize_input`` kernel (img_qkv_proj's; one call shared by gate_proj and up_proj with one activation spec and no
Monarch branch), GELU(tanh) in gate_proj's epilogue, the MLP's gated residual in down_proj's. The attention runs the
block's own processor (``PRXAttnProcessor2_0``: its norms, rotary embedding, text mask, the text's projection and the
output projection) on the kernels' qkv projection (``HandedAttention``); its gated residual is diffusers' sum. Fused
and unfused agree to the model dtype's rounding (the kernels normalize and modulate in float32), not bit for bit.

A block is swapped only in the structure diffusers builds (LayerNorms without affine of the block's width, the
GELU(tanh)-gated MLP, a ``PRXAttention``) with a packed linear with quantized activations to fuse. It runs diffusers'
own forward in training mode, for a text whose batch or dtype is not the rows' or a ``temb`` of another dtype or
batch (but 1: broadcast, as diffusers broadcasts it), and when a norm, the modulation, the MLP's activation or the
attention carries a hook or another processor (or a linear the kernels run does). diffusers' block-level hooks
(FirstBlockCache, MagCache) find both classes, fused or not, in ``TransformerBlockRegistry``. The state dict is
unchanged.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from diffusers.models.transformers.transformer_prx import Modulation, PRXAttention, PRXAttnProcessor2_0, PRXBlock

from .diffusers_fused import (_adopt, _bypassed_hook, _forward_wrapped, _gated_out, _hooked, _plain_layer_norm,
                              _project, hand_projections, kernel_modulation, like_rows, register_block, runs_processor,
                              swap_blocks)


def _supported(block: nn.Module) -> bool:
    if type(block) is not PRXBlock or _forward_wrapped(block):
        return False
    d = block.hidden_size
    return (_plain_layer_norm(block.img_pre_norm, d) and _plain_layer_norm(block.post_attention_layernorm, d)
            and type(block.modulation) is Modulation and getattr(block.modulation.lin, "out_features", None) == 6 * d
            and type(block.attention) is PRXAttention and type(block.mlp_act) is nn.GELU
            and block.mlp_act.approximate == "tanh"
            and all(getattr(getattr(block, n), "in_features", None) == d for n in ("gate_proj", "up_proj")))


def _linears(block: nn.Module) -> list[nn.Module]:
    return [block.attention.img_qkv_proj, block.gate_proj, block.up_proj, block.down_proj]


class FusedPRXBlock(PRXBlock):
    """A ``PRXBlock`` running the fused packed kernels (module docstring)."""

    def __init__(self, block: PRXBlock) -> None:
        if not _supported(block):
            raise ValueError("FusedPRXBlock handles PRXBlock in the structure diffusers builds")
        _adopt(self, block)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, temb: torch.Tensor,
                image_rotary_emb: torch.Tensor, attention_mask: torch.Tensor | None = None,
                **kwargs: Any) -> torch.Tensor:
        args = (hidden_states, encoder_hidden_states, temb, image_rotary_emb, attention_mask)
        h, attn, n1, n2 = hidden_states, self.attention, self.img_pre_norm, self.post_attention_layernorm
        # (a temb of batch 1: the pipeline's without guidance, broadcast over the images as diffusers broadcasts it)
        if (self.training or h.ndim != 3 or encoder_hidden_states.ndim != 3 or temb.ndim != 2
                or temb.shape[0] not in (1, h.shape[0]) or not like_rows(h, encoder_hidden_states)
                or not like_rows(h, temb, batch=False) or self.mlp_act.approximate != "tanh"
                or any(_hooked(m) for m in (n1, n2, self.modulation, self.mlp_act))
                or not runs_processor(attn, (PRXAttnProcessor2_0,), ("img_qkv_proj",))
                or any(_bypassed_hook(m) for m in (self.gate_proj, self.up_proj, self.down_proj))):
            return super().forward(*args, **kwargs)
        b, t, d = h.shape
        mod = self.modulation.lin(nn.functional.silu(temb))   # (as diffusers: its module's linear, its SiLU)
        mod = mod.view(-1, 6, d).expand(b, 6, d)   # (shift, scale, gate, then the MLP's: DiT's order)
        m32 = kernel_modulation(mod)
        # (the processor reads the rows only through img_qkv_proj: the float rows where it runs it itself)
        handed, rows = hand_projections(attn, ("img_qkv_proj",), h, lambda: (1 + mod[:, 1:2]) * n1(h) + mod[:, 0:1],
                                        ln_eps=n1.eps, shift=m32[0], scale=m32[1])
        o = attn.processor(handed, rows, encoder_hidden_states=encoder_hidden_states, attention_mask=attention_mask,
                           image_rotary_emb=image_rotary_emb)
        h = h + mod[:, 2:3] * o
        h2 = h.reshape(b * t, d).contiguous()
        g, u = _project((self.gate_proj, self.up_proj), h2, lambda: (1 + mod[:, 4:5]) * n2(h) + mod[:, 3:4],
                        ln_eps=n2.eps, shift=m32[3], scale=m32[4], gelu=(True,), act=self.mlp_act)
        return _gated_out(self.down_proj, g * u, h2, b, m32[5], mod[:, 5:6]).view(b, t, d)


def fuse_prx_blocks(model: nn.Module) -> int:
    """Swap every PRX block of ``model`` that :class:`FusedPRXBlock` handles and that has a packed linear with
    quantized activations to fuse; returns how many were swapped."""
    return swap_blocks(model, lambda m: FusedPRXBlock if _supported(m) else None, _linears)


register_block(FusedPRXBlock, 0)   # returns hidden_states alone, as the original
