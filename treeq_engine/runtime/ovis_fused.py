"""Fused Ovis-Image blocks for packed inference: diffusers' ``OvisImageTransformerBlock`` and
``OvisImageSingleTransformerBlock`` are FLUX.1's double and single blocks (``mmdit_fused.flux_double`` /
``flux_single``: the same adaLNs, LayerNorms without affine, attention and gated residuals, the same kernel calls)
with SwiGLU in place of GELU(tanh):

    double: h = h + gate_mlp · ff.net[2](Q(SwiGLU(ff.net[0].proj(Q(mod(LN(h), shift_mlp, scale_mlp))))))   (c alike)
    single: [h_mlp, g] = proj_mlp ← Q(n),   y = x + gate · proj_out([attention ; SiLU(g) · h_mlp])

where ``SwiGLU([h, g]) = h · SiLU(g)`` (diffusers' ``SwiGLU``: the first half gated by the second). Where a linear is
a :class:`TreeQLinear` with quantized activations, LayerNorm + modulate + quantization run in its ``quantize_input``
kernel (one call for the single block's proj_mlp and q/k/v, which read the same rows), the gated residuals in the
GEMM epilogues; SwiGLU runs between the kernels. The attention is ``OvisImageAttnProcessor``'s, which computes
``FluxAttnProcessor``'s (``mmdit_fused.FLUX_ATTENTIONS``). Fused and unfused agree to the model dtype's rounding,
not bit for bit.

A block is swapped only in the structure diffusers builds (FLUX.1's adaLNs and LayerNorms, SwiGLU feed-forwards, a
SiLU after the single block's proj_mlp of twice the MLP width) with a packed linear with quantized activations to
fuse; it falls back to diffusers' forward as Flux's blocks do (``mmdit_fused``), and a hooked feed-forward runs as
diffusers computes it. diffusers' block registry has no entry for either block (``register_block`` gives the
originals the fused classes' when they are imported). The state dict is unchanged.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from diffusers.models.activations import SwiGLU
from diffusers.models.attention import FeedForward
from diffusers.models.normalization import AdaLayerNormZero, AdaLayerNormZeroSingle
from diffusers.models.transformers.transformer_ovis_image import (OvisImageSingleTransformerBlock,
                                                                  OvisImageTransformerBlock)

from .diffusers_fused import (_bypassed_hook, _forward_wrapped, _gated_out, _hooked, _plain_layer_norm, _project,
                              adopt_checked, register_block, swap_blocks)
from .mmdit_fused import _adaln, _double_forward, _flux_heads, _single_forward, flux_double, flux_linears, flux_single


def _swiglu_feed_forward(ff: Any, d: int) -> bool:
    """diffusers' ``FeedForward(activation_fn="swiglu")``: [SwiGLU (d -> 2h), Dropout, linear (h -> d)]."""
    net: Any = getattr(ff, "net", None)
    return (type(ff) is FeedForward and len(net) == 3 and type(net[0]) is SwiGLU and type(net[1]) is nn.Dropout
            and type(net[0].activation) is nn.SiLU and getattr(net[0].proj, "in_features", None) == d
            and getattr(net[0].proj, "out_features", None) == 2 * getattr(net[2], "in_features", -1)
            and getattr(net[2], "out_features", None) == d)


def _double_supported(block: nn.Module) -> bool:
    if type(block) is not OvisImageTransformerBlock or _forward_wrapped(block):
        return False
    d = block.norm2.normalized_shape[0] if isinstance(block.norm2, nn.LayerNorm) else None
    return (d is not None and _plain_layer_norm(block.norm2, d) and _plain_layer_norm(block.norm2_context, d)
            and _swiglu_feed_forward(block.ff, d) and _swiglu_feed_forward(block.ff_context, d)
            and _adaln(block.norm1, AdaLayerNormZero, d) and _adaln(block.norm1_context, AdaLayerNormZero, d)
            and _flux_heads(block.attn) and block.attn.added_kv_proj_dim is not None)


def _single_supported(block: nn.Module) -> bool:
    if type(block) is not OvisImageSingleTransformerBlock or _forward_wrapped(block):
        return False
    d = getattr(block.proj_out, "out_features", None)
    return (isinstance(d, int) and type(block.act_mlp) is nn.SiLU and _adaln(block.norm, AdaLayerNormZeroSingle, d)
            and _flux_heads(block.attn) and block.attn.pre_only
            and getattr(block.proj_mlp, "out_features", None) == 2 * block.mlp_hidden_dim
            and getattr(block.proj_out, "in_features", None) == d + block.mlp_hidden_dim)


def _swiglu_ff(ff: Any, ln: nn.Module, x2: torch.Tensor, b: int, mod: torch.Tensor, m32: torch.Tensor) -> torch.Tensor:
    """``x + gate_mlp · ff(mod(LN(x), shift_mlp, scale_mlp))`` as (M, D) rows of ``x2`` (``mod`` (B, 6, D),
    ``m32`` (6, B, D) float32): LayerNorm + modulate in the first linear's quantization, SwiGLU between the kernels,
    the gated residual in the second's epilogue. A hook on the feed-forward or on a part of it: the module runs,
    hooks and all."""
    x = x2.view(b, -1, x2.shape[-1])
    glu, fc1, fc2 = ff.net[0], ff.net[0].proj, ff.net[2]

    def rows() -> torch.Tensor:
        return ln(x) * (1 + mod[:, 4:5]) + mod[:, 3:4]

    if (_hooked(ff) or _hooked(glu) or _hooked(glu.activation) or _hooked(ff.net[1]) or _bypassed_hook(fc1)
            or _bypassed_hook(fc2)):
        return (x + mod[:, 5:6] * ff(rows())).reshape(x2.shape)
    (h,) = _project((fc1,), x2, rows, ln_eps=ln.eps, shift=m32[3], scale=m32[4])
    hidden, gate = h.chunk(2, dim=-1)
    return _gated_out(fc2, hidden * glu.activation(gate), x2, b, m32[5], mod[:, 5:6])


def _linears(block: nn.Module) -> list[nn.Module]:
    if type(block) is OvisImageSingleTransformerBlock:
        return flux_linears(block, single=True)
    a = block.attn
    return [a.to_q, a.to_k, a.to_v, a.add_q_proj, a.add_k_proj, a.add_v_proj, a.to_out[0], a.to_add_out,
            block.ff.net[0].proj, block.ff.net[2], block.ff_context.net[0].proj, block.ff_context.net[2]]


class FusedOvisImageSingleTransformerBlock(OvisImageSingleTransformerBlock):
    """An ``OvisImageSingleTransformerBlock`` running the fused packed kernels (module docstring)."""

    def __init__(self, block: nn.Module) -> None:
        adopt_checked(self, block, (OvisImageSingleTransformerBlock,), _single_supported)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, temb: torch.Tensor,
                image_rotary_emb: Any = None, joint_attention_kwargs: dict[str, Any] | None = None) -> Any:
        return _single_forward(self, super().forward, (hidden_states, encoder_hidden_states, temb, image_rotary_emb,
                                                       joint_attention_kwargs),
                               single=lambda *a: flux_single(*a, swiglu=True))


class FusedOvisImageTransformerBlock(OvisImageTransformerBlock):
    """An ``OvisImageTransformerBlock`` running the fused packed kernels (module docstring)."""

    def __init__(self, block: nn.Module) -> None:
        adopt_checked(self, block, (OvisImageTransformerBlock,), _double_supported)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, temb: torch.Tensor,
                image_rotary_emb: Any = None, joint_attention_kwargs: dict[str, Any] | None = None) -> Any:
        return _double_forward(self, super().forward, (hidden_states, encoder_hidden_states, temb, image_rotary_emb,
                                                       joint_attention_kwargs),
                               double=lambda *a: flux_double(*a, ff=_swiglu_ff))


def fuse_ovis_blocks(model: nn.Module) -> int:
    """Swap every Ovis-Image block of ``model`` that a fused class handles and that has a packed linear with
    quantized activations to fuse; returns how many were swapped."""
    def choose(mod: nn.Module) -> type | None:
        return (FusedOvisImageSingleTransformerBlock if _single_supported(mod)
                else FusedOvisImageTransformerBlock if _double_supported(mod) else None)

    return swap_blocks(model, choose, _linears)


for _fused in (FusedOvisImageTransformerBlock, FusedOvisImageSingleTransformerBlock):
    register_block(_fused, 1, 0)   # each returns (encoder_hidden_states, hidden_states), as Flux's
