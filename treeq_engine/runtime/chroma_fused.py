"""Fused Chroma blocks for packed inference: the fusions of :mod:`.mmdit_fused` for diffusers'
``ChromaTransformerBlock`` (double stream) and ``ChromaSingleTransformerBlock``.

Chroma's blocks are FLUX.1's with the modulation handed in: the model's approximator makes every block's vectors at
once, and the block takes its slice as ``temb`` ((B, 12, D) for a double block: six for the image stream, six for
the text; (B, 3, D) for a single block). ``LN`` has no affine; the pipeline's mask over ``[text; image]`` reaches the
attention as the outer product the blocks form from it.

    q, k, v = to_q/k/v ← Q(mod(LN(h), shift_msa, scale_msa)),  q', k', v' = add_q/k/v_proj ← the same on the text
    o', o   = joint attention([q'; q], [k'; k], [v'; v], mask)       (RMSNorm on q and k, rotary embedding)
    h = h + gate_msa · to_out(o),   c = c + c_gate_msa · to_add_out(o')
    h = h + gate_mlp · ff.net[2](Q(GELU_tanh(ff.net[0].proj(Q(mod(LN(h), shift_mlp, scale_mlp))))))   (c alike)

    single, on x = [text; image]:
    x = x + gate · proj_out([attention(to_q/k/v ← n, mask) ; GELU_tanh(proj_mlp ← n)]),   n = Q(mod(LN(x)))

Where a linear is a :class:`TreeQLinear` with quantized activations, LayerNorm + modulate + quantization run in
its ``quantize_input`` kernel (one call per stream for q/k/v, one for the single block's proj_mlp and q/k/v),
GELU(tanh) in proj_mlp's and ``ff.net[0].proj``'s epilogues (the latter also writing ``ff.net[2]``'s codes), the
gated residuals in to_out's, to_add_out's, ``ff.net[2]``'s and proj_out's, as FLUX.1's blocks fuse them. The
attention is ``FluxAttnProcessor``'s with the mask. Fused and unfused agree to the model dtype's rounding, not
bit for bit.

A block is swapped only in the structure diffusers builds (LayerNorms without affine, the FLUX.1 attention and
feed-forwards) with a packed linear with quantized activations to fuse. It runs diffusers' own forward in
training mode, with ``joint_attention_kwargs`` (IP-Adapter), when a norm or the attention carries a hook or another
processor, or on other input shapes; a hooked feed-forward runs as a module. diffusers' block-level hooks find the
fused classes in ``TransformerBlockRegistry`` under the originals' entries. The state dict is unchanged.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from diffusers.models.transformers.transformer_chroma import (ChromaAdaLayerNormZeroPruned,
                                                              ChromaAdaLayerNormZeroSinglePruned,
                                                              ChromaSingleTransformerBlock, ChromaTransformerBlock)

from .diffusers_fused import (_adopt, _bypassed_hook, _forward_wrapped, _hooked, _plain_layer_norm, kernel_modulation,
                              like_rows, register_block, swap_blocks)
from .mmdit_fused import _flux_attention_ok, double_width, flux_double, flux_linears, flux_single, single_width


def _pruned(norm: Any, kind: type, d: int) -> bool:
    """Chroma's adaLN as diffusers builds it: no embedder of its own, a LayerNorm without affine."""
    return (type(norm) is kind and getattr(norm, "emb", None) is None
            and _plain_layer_norm(getattr(norm, "norm", None), d))


def _double_supported(block: nn.Module) -> bool:
    if type(block) is not ChromaTransformerBlock or _forward_wrapped(block):
        return False
    d = double_width(block)
    return (d is not None and _pruned(block.norm1, ChromaAdaLayerNormZeroPruned, d)
            and _pruned(block.norm1_context, ChromaAdaLayerNormZeroPruned, d))


def _single_supported(block: nn.Module) -> bool:
    if type(block) is not ChromaSingleTransformerBlock or _forward_wrapped(block):
        return False
    d = single_width(block)
    return d is not None and _pruned(block.norm, ChromaAdaLayerNormZeroSinglePruned, d)


def _linears(block: nn.Module) -> list[nn.Module]:
    return flux_linears(block, single=isinstance(block, ChromaSingleTransformerBlock))


def _pair_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """The attention mask Chroma's blocks form from the pipeline's ``(B, L + S)`` one: its outer product."""
    return None if mask is None else mask[:, None, None, :] * mask[:, None, :, None]


class FusedChromaSingleTransformerBlock(ChromaSingleTransformerBlock):
    """A ``ChromaSingleTransformerBlock`` running the fused packed kernels (module docstring)."""

    def __init__(self, block: ChromaSingleTransformerBlock) -> None:
        if not _single_supported(block):
            raise ValueError("FusedChromaSingleTransformerBlock handles ChromaSingleTransformerBlock in the structure "
                             "diffusers builds")
        _adopt(self, block)

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor, image_rotary_emb: Any = None,
                attention_mask: torch.Tensor | None = None,
                joint_attention_kwargs: dict[str, Any] | None = None) -> torch.Tensor:
        args = (hidden_states, temb, image_rotary_emb, attention_mask, joint_attention_kwargs)
        norm, attn, x = self.norm, self.attn, hidden_states
        if (self.training or joint_attention_kwargs or x.ndim != 3 or not like_rows(x, temb) or _hooked(norm)
                or _hooked(norm.norm) or _hooked(self.act_mlp) or _bypassed_hook(self.proj_mlp)
                or _bypassed_hook(self.proj_out)
                or not _flux_attention_ok(attn, joint=False)):
            return super().forward(*args)
        b, s, d = x.shape
        if tuple(temb.shape) != (b, 3, d):
            return super().forward(*args)
        return flux_single(self, x, temb, kernel_modulation(temb), image_rotary_emb, _pair_mask(attention_mask))


class FusedChromaTransformerBlock(ChromaTransformerBlock):
    """A ``ChromaTransformerBlock`` running the fused packed kernels (module docstring)."""

    def __init__(self, block: ChromaTransformerBlock) -> None:
        if not _double_supported(block):
            raise ValueError("FusedChromaTransformerBlock handles ChromaTransformerBlock in the structure diffusers "
                             "builds")
        _adopt(self, block)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, temb: torch.Tensor,
                image_rotary_emb: Any = None, attention_mask: torch.Tensor | None = None,
                joint_attention_kwargs: dict[str, Any] | None = None) -> Any:
        args = (hidden_states, encoder_hidden_states, temb, image_rotary_emb, attention_mask, joint_attention_kwargs)
        n1, n1c, attn = self.norm1, self.norm1_context, self.attn
        h, c = hidden_states, encoder_hidden_states
        if (self.training or joint_attention_kwargs or h.ndim != 3 or c.ndim != 3 or not like_rows(h, c, temb)
                or any(_hooked(n) for n in (n1, n1.norm, n1c, n1c.norm, self.norm2, self.norm2_context))
                or not _flux_attention_ok(attn, joint=True)):
            return super().forward(*args)
        b, _, d = h.shape
        if tuple(temb.shape) != (b, 12, d):
            return super().forward(*args)
        mod, cmod = temb[:, :6], temb[:, 6:]   # (the image stream's six, then the text's)
        return flux_double(self, h, c, (mod, kernel_modulation(mod)), (cmod, kernel_modulation(cmod)),
                           image_rotary_emb, _pair_mask(attention_mask))


def fuse_chroma_blocks(model: nn.Module) -> int:
    """Swap every Chroma block of ``model`` that a fused class handles and that has a packed linear with quantized
    activations to fuse; returns how many were swapped."""

    def choose(mod: nn.Module) -> type | None:
        if _double_supported(mod):
            return FusedChromaTransformerBlock
        return FusedChromaSingleTransformerBlock if _single_supported(mod) else None

    return swap_blocks(model, choose, _linears)


register_block(FusedChromaTransformerBlock, 1, 0)   # (returns (encoder_hidden_states, hidden_states), as the original)
register_block(FusedChromaSingleTransformerBlock, 0)
