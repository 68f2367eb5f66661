"""Fused Wan blocks for packed inference: the fusions of :mod:`.diffusers_fused` for diffusers'
``WanTransformerBlock`` (Wan 2.1, each expert of Wan 2.2 A14B) and its copies: ChronoEdit's and Wan-Animate's
(Wan's classes to the line, in their own modules), ``SkyReelsV2TransformerBlock`` (its self-attention takes the
block's mask, diffusion forcing's causal one between blocks of frames; a timestep per frame arrives as a
(B, 6, S, D) table) and ``WanVACETransformerBlock`` (Wan's block on VACE's control rows, between an input projection
that adds the main rows, in the first, and the control hint's projection, both run as diffusers' modules).

The block's modulation is its own table plus the timestep projection every block shares,
``mod = scale_shift_table + temb`` (six vectors per sample, float32); ``LN`` is a float32 LayerNorm without affine:

    q, k, v = to_q/k/v ← Q(mod(LN(h), shift_msa, scale_msa))
    h = h + gate_msa · to_out(attention(RMSNorm(q), RMSNorm(k), v, rotary))              (attn1: self-attention)
    h = h + attn2(norm2(h), context)                                                    (cross-attention)
    h = h + c_gate · ffn.net[2](Q(GELU_tanh(ffn.net[0].proj(Q(mod(LN(h), c_shift, c_scale))))))

Where a linear is a :class:`TreeQLinear` with quantized activations, LayerNorm + modulate + quantization run in
its ``quantize_input`` kernel (one call shared by to_q/to_k/to_v with one activation spec and no Monarch
branch), GELU(tanh) and ``ffn.net[2]``'s codes in ``ffn.net[0].proj``'s epilogue, and the gated residual in
``to_out[0]``'s and ``ffn.net[2]``'s. The self-attention is ``WanAttnProcessor``'s computation (RMSNorm across
heads on q and k, its rotary embedding, ``dispatch_attention_fn`` with the processor's backend). The
cross-attention runs as diffusers' module (its packed linears each quantize their own input): its keys and values
read the text, not the block's rows. Fused and unfused agree to the model dtype's rounding (the kernels do
LayerNorm + modulate in float32 and add the residual in float32, as Wan's block does), not bit for bit.

A block is swapped only in the structure diffusers builds (float32 LayerNorms without affine around the
attention and feed-forward, ``WanAttention`` with ``WanAttnProcessor`` on unfused projections, a ``FeedForward`` of
[GELU(tanh), Dropout, linear]) with a packed linear with quantized activations to fuse. Wan 2.2 TI2V's per-token
modulation (a ``(B, S, 6, D)`` ``temb``: the first frame's tokens at timestep 0) and SkyReels-V2's (``(B, 6, S, D)``)
reach the kernels one group per run of tokens that share a timestep (a latent frame, or a block of frames). It
runs diffusers' own forward in training mode, when a norm or the self-attention carries a hook or another
processor; a feed-forward, ``to_out[0]`` or ``ffn.net[0].proj`` that is hooked or not packed runs as diffusers
computes it. diffusers' block-level hooks (FirstBlockCache, MagCache) find
the fused class in ``TransformerBlockRegistry`` under the original's entry. The state dict is unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_wan import WanAttention, WanAttnProcessor, WanTransformerBlock

try:   # (diffusers' copies of Wan's block: absent from older releases)
    from diffusers.models.transformers import transformer_chronoedit as _chronoedit
except ImportError:
    _chronoedit = None
try:
    from diffusers.models.transformers import transformer_skyreels_v2 as _skyreels
except ImportError:
    _skyreels = None
try:
    from diffusers.models.transformers import transformer_wan_animate as _animate
except ImportError:
    _animate = None
try:
    from diffusers.models.transformers import transformer_wan_vace as _vace
except ImportError:
    _vace = None

from .diffusers_fused import (_feed_forward, _ff, _forward_wrapped, _gated_out, _hooked, _project, Modulation,
                              adopt_checked, dispatch_kwargs, like_rows, modulation_chunk, per_token_modulation,
                              plain_fp32_layer_norm, register_block, self_attention_ok, swap_blocks)
from .linear import runs_packed_kernels as _quantized


@dataclass(frozen=True)
class _Family:
    """A block diffusers builds as Wan's: its block, attention and processor classes, and how it lays out a
    per-token timestep table: (B, S, 6, D) (Wan 2.2 TI2V), or (B, 6, S, D) (``chunks_first``: SkyReels-V2's
    diffusion forcing)."""
    block: type
    attention: type
    processor: type
    chunks_first: bool = False
    per_token: bool = True   # (WanVACE's block chunks a (B, 6, D) table only)


# ChronoEdit's and Wan-Animate's classes are Wan's to the line (diffusers' "Copied from"); SkyReels-V2's block also
# hands its self-attention a mask (diffusion forcing's causal one between blocks of frames) and lays a per-token
# table out chunks first
_FAMILIES = {WanTransformerBlock: _Family(WanTransformerBlock, WanAttention, WanAttnProcessor)}
if _chronoedit is not None:
    _FAMILIES[_chronoedit.WanTransformerBlock] = _Family(_chronoedit.WanTransformerBlock, _chronoedit.WanAttention,
                                                         _chronoedit.WanAttnProcessor)
if _animate is not None:
    _FAMILIES[_animate.WanTransformerBlock] = _Family(_animate.WanTransformerBlock, _animate.WanAttention,
                                                      _animate.WanAttnProcessor)
if _vace is not None:
    _FAMILIES[_vace.WanVACETransformerBlock] = _Family(_vace.WanVACETransformerBlock, WanAttention, WanAttnProcessor,
                                                       per_token=False)
if _skyreels is not None:
    _FAMILIES[_skyreels.SkyReelsV2TransformerBlock] = _Family(
        _skyreels.SkyReelsV2TransformerBlock, _skyreels.SkyReelsV2Attention, _skyreels.SkyReelsV2AttnProcessor,
        chunks_first=True)


def _self_attention_ok(attn: Any, family: _Family) -> bool:
    """``attn`` computes what the fused path computes (``self_attention_ok``), and has no image projections."""
    return getattr(attn, "add_k_proj", None) is None and self_attention_ok(attn, family.attention, family.processor)


def wan_structure(block: nn.Module, attention: type) -> bool:
    """``block`` is built as diffusers builds Wan's (Helios', AnyFlow's): a (1, 6, D) ``scale_shift_table``, float32
    LayerNorms without affine around a self-attention of class ``attention`` and a GELU(tanh) feed-forward."""
    table = getattr(block, "scale_shift_table", None)
    if not isinstance(table, torch.Tensor) or table.dim() != 3:
        return False
    d = table.shape[-1]
    return (tuple(table.shape) == (1, 6, d) and plain_fp32_layer_norm(block.norm1, d)
            and plain_fp32_layer_norm(block.norm3, d) and type(block.attn1) is attention
            and _feed_forward(block.ffn, d) and block.ffn.net[0].approximate == "tanh")


def _wan_supported(block: nn.Module) -> bool:
    family = _FAMILIES.get(type(block))
    return family is not None and not _forward_wrapped(block) and wan_structure(block, family.attention)


def _linears(block: nn.Module) -> list[nn.Module]:
    a = block.attn1
    return [a.to_q, a.to_k, a.to_v, a.to_out[0], block.ffn.net[0].proj, block.ffn.net[2]]


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's rotary embedding of (B, S, heads, head_dim) rows: interleaved pairs, cos and sin read at the pair's
    even and odd positions."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * c - x2 * s
    out[..., 1::2] = x1 * s + x2 * c
    return out.type_as(x)


def _self_attention(attn: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, b: int, rotary: Any,
                    mask: torch.Tensor | None) -> torch.Tensor:
    """``WanAttnProcessor``'s self-attention of (B·S, inner) projection rows, as (B, S, inner)."""
    query, key, value = (t.view(b, -1, t.shape[-1]) for t in (q, k, v))
    query, key = attn.norm_q(query), attn.norm_k(key)
    query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))
    if rotary is not None:
        query, key = _rotate(query, *rotary), _rotate(key, *rotary)
    proc = attn.processor
    o = dispatch_attention_fn(query, key, value, attn_mask=mask, dropout_p=0.0, is_causal=False,
                              **dispatch_kwargs(proc))
    return o.flatten(2, 3).type_as(query)


def _family(block: nn.Module) -> _Family:
    # (a subclass made at run time, such as torch's parametrize makes, comes first in the MRO)
    return next(_FAMILIES[c] for c in type(block).__mro__ if c in _FAMILIES)


def _modulation(block: Any, h: torch.Tensor, temb: torch.Tensor) -> tuple[Modulation, torch.Tensor] | None:
    """The block's modulation, as diffusers uses it and as the kernels take it, where the fused path computes the
    block on the rows ``h`` (checked before any layer runs); None where it leaves the call to diffusers' forward."""
    family = _family(block)
    if (block.training or temb.ndim not in (3, 4) or h.ndim != 3 or _hooked(block.norm1) or _hooked(block.norm3)
            or not _self_attention_ok(block.attn1, family)):
        return None
    b, s, d = h.shape
    if temb.ndim == 4:   # a timestep per token: Wan 2.2 TI2V's (B, S, 6, D), SkyReels-V2's (B, 6, S, D)
        if (not family.per_token or tuple(temb.shape) != ((b, 6, s, d) if family.chunks_first else (b, s, 6, d))
                or tuple(block.scale_shift_table.shape) != (1, 6, d)):
            return None
        table = block.scale_shift_table[0]

        def chunk(i: int) -> torch.Tensor:   # chunk i of diffusers' float32 table + temb: (B, S, D)
            return table[i] + (temb[:, i] if family.chunks_first else temb[:, :, i]).float()

        # (6, G, D) float32: a group per latent frame (per block of frames)
        return chunk, per_token_modulation(chunk, b * s, runs_of=temb, token_dim=2 if family.chunks_first else 1)
    sample = block.scale_shift_table + temb.float()   # (B, 6, D) float32, as diffusers computes it
    if tuple(sample.shape) != (b, 6, d):
        return None
    return sample, sample.transpose(0, 1).contiguous()   # (6, B, D): the kernels' layout


def _fused_body(block: Any, h: torch.Tensor, encoder_hidden_states: torch.Tensor, rotary_emb: Any,
                mask: torch.Tensor | None, mod: Modulation, m32: torch.Tensor) -> torch.Tensor:
    """Self-attention, cross-attention and feed-forward of the rows ``h`` (module docstring), with the modulation
    ``_modulation`` gave."""
    a1 = block.attn1
    b, s, d = h.shape
    h2 = h.reshape(b * s, d).contiguous()
    q, k, v = _project((a1.to_q, a1.to_k, a1.to_v), h2,
                       lambda: (block.norm1(h.float()) * (1 + modulation_chunk(mod, 1))
                                + modulation_chunk(mod, 0)).type_as(h),
                       ln_eps=block.norm1.eps, shift=m32[0], scale=m32[1])
    o = _self_attention(a1, q, k, v, b, rotary_emb, mask)
    proj = a1.to_out[0]
    if _quantized(proj):   # (not hooked: _self_attention_ok)
        h = _gated_out(proj, o, h2, b, m32[2]).view(b, s, d)
    else:
        h = (h.float() + a1.to_out[1](proj(o)) * modulation_chunk(mod, 2)).type_as(h)
    h = h + block.attn2(block.norm2(h.float()).type_as(h), encoder_hidden_states, None, None)
    if _quantized(block.ffn.net[0].proj):   # (_ff runs a hooked or unpacked part as diffusers computes it)
        return _ff(block.ffn, block.norm3, h.reshape(b * s, d).contiguous(), b, mod, m32).view(b, s, d)
    x = (block.norm3(h.float()) * (1 + modulation_chunk(mod, 4)) + modulation_chunk(mod, 3)).type_as(h)
    return (h.float() + block.ffn(x).float() * modulation_chunk(mod, 5)).type_as(h)


def _fused_forward(block: Any, unfused: Callable[..., torch.Tensor], args: tuple[Any, ...],
                   mask: torch.Tensor | None = None) -> torch.Tensor:
    """The fused forward of a block of a Wan family (module docstring); ``unfused(*args)`` is diffusers' own."""
    hidden_states, encoder_hidden_states, temb, rotary_emb = args[:4]
    modulation = _modulation(block, hidden_states, temb)
    if modulation is None:
        return unfused(*args)
    return _fused_body(block, hidden_states, encoder_hidden_states, rotary_emb, mask, *modulation)


def _adopt_checked(new: nn.Module, block: nn.Module) -> None:
    adopt_checked(new, block, _FAMILIES, _wan_supported)


class FusedWanTransformerBlock(WanTransformerBlock):
    """A ``WanTransformerBlock`` running the fused packed kernels (module docstring)."""

    def __init__(self, block: WanTransformerBlock) -> None:
        _adopt_checked(self, block)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, temb: torch.Tensor,
                rotary_emb: Any) -> torch.Tensor:
        return _fused_forward(self, super().forward, (hidden_states, encoder_hidden_states, temb, rotary_emb))


_FUSED: dict[type, type] = {WanTransformerBlock: FusedWanTransformerBlock}
if _chronoedit is not None:
    class FusedChronoEditTransformerBlock(_chronoedit.WanTransformerBlock):
        """ChronoEdit's copy of ``WanTransformerBlock`` running the fused packed kernels (module docstring)."""

        def __init__(self, block: nn.Module) -> None:
            _adopt_checked(self, block)

        def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, temb: torch.Tensor,
                    rotary_emb: Any) -> torch.Tensor:
            return _fused_forward(self, super().forward, (hidden_states, encoder_hidden_states, temb, rotary_emb))

    _FUSED[_chronoedit.WanTransformerBlock] = FusedChronoEditTransformerBlock
    register_block(FusedChronoEditTransformerBlock, 0)
if _animate is not None:
    class FusedWanAnimateTransformerBlock(_animate.WanTransformerBlock):
        """Wan-Animate's copy of ``WanTransformerBlock`` running the fused packed kernels (module docstring)."""

        def __init__(self, block: nn.Module) -> None:
            _adopt_checked(self, block)

        def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, temb: torch.Tensor,
                    rotary_emb: Any) -> torch.Tensor:
            return _fused_forward(self, super().forward, (hidden_states, encoder_hidden_states, temb, rotary_emb))

    _FUSED[_animate.WanTransformerBlock] = FusedWanAnimateTransformerBlock
    register_block(FusedWanAnimateTransformerBlock, 0)
if _skyreels is not None:
    class FusedSkyReelsV2TransformerBlock(_skyreels.SkyReelsV2TransformerBlock):
        """A ``SkyReelsV2TransformerBlock`` running the fused packed kernels (module docstring): its self-attention
        takes the block's mask."""

        def __init__(self, block: nn.Module) -> None:
            _adopt_checked(self, block)

        def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, temb: torch.Tensor,
                    rotary_emb: Any, attention_mask: torch.Tensor | None) -> torch.Tensor:
            return _fused_forward(self, super().forward,
                                  (hidden_states, encoder_hidden_states, temb, rotary_emb, attention_mask),
                                  attention_mask)

    _FUSED[_skyreels.SkyReelsV2TransformerBlock] = FusedSkyReelsV2TransformerBlock
    register_block(FusedSkyReelsV2TransformerBlock, 0)
if _vace is not None:
    class FusedWanVACETransformerBlock(_vace.WanVACETransformerBlock):
        """A ``WanVACETransformerBlock`` running the fused packed kernels (module docstring): Wan's block on the
        control rows, its input projection (the first VACE block's: ``proj_in(control) + hidden_states``) and output
        projection (the control hint) run as diffusers' modules."""

        def __init__(self, block: nn.Module) -> None:
            _adopt_checked(self, block)

        def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                    control_hidden_states: torch.Tensor, temb: torch.Tensor,
                    rotary_emb: Any) -> tuple[torch.Tensor | None, torch.Tensor]:
            c, proj_in = control_hidden_states, self.proj_in
            modulation = _modulation(self, c, temb)
            # (the sum a projected input makes: the rows' batch and dtype, else diffusers broadcasts or promotes)
            if modulation is None or (proj_in is not None and not like_rows(c, hidden_states)):
                return super().forward(hidden_states, encoder_hidden_states, control_hidden_states, temb,
                                       rotary_emb)
            if proj_in is not None:
                c = proj_in(c) + hidden_states
            c = _fused_body(self, c, encoder_hidden_states, rotary_emb, None, *modulation)
            return (None if self.proj_out is None else self.proj_out(c)), c

    _FUSED[_vace.WanVACETransformerBlock] = FusedWanVACETransformerBlock
    # (no registry entry, as diffusers gives the original none: it returns (control hint, control rows), and
    # diffusers' block-level hooks run on the main blocks)


def fuse_wan_blocks(model: nn.Module) -> int:
    """Swap every Wan block of ``model`` that the fused class handles and that has a packed linear with quantized
    activations to fuse; returns how many were swapped."""
    return swap_blocks(model, lambda m: _FUSED.get(type(m)) if _wan_supported(m) else None, _linears)


register_block(FusedWanTransformerBlock, 0)   # (returns hidden_states alone, as the original)
