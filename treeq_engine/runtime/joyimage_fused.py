"""Fused JoyImage blocks for packed inference: the fusions of :mod:`.diffusers_fused` for diffusers'
``JoyImageTransformerBlock`` (JoyImage-Edit) and ``JoyImageEditPlusTransformerBlock`` (JoyImage-Edit+: the same
block with a text mask).

A double-stream block (image ``h``, text ``c``), each stream with Wan's modulation (a learnt table plus the timestep
projection: six vectors per sample, DiT's order) around float32 LayerNorms without affine:

    [q, k, v] = img_attn_qkv ← Q(mod(LN(h), shift, scale));   [q', k', v'] = txt_attn_qkv ← the same on c
    o, o' = attention([q; q'], [k; k'], [v; v'])     (per-head RMSNorms on q and k, the rotary embedding, image first)
    h = h + gate · img_attn_proj(o),   c = c + gate' · txt_attn_proj(o')
    h = h + gate2 · img_mlp(Q(mod(LN(h), shift2, scale2))),   c alike with txt_mlp        (GELU(tanh) feed-forwards)

Where a linear is a :class:`TreeQLinear` with quantized activations, LayerNorm + modulate + quantization run in its
``quantize_input`` kernel (the fused qkv projection's, and each feed-forward's first linear's), GELU(tanh) and the
second linear's codes in the first's epilogue, the feed-forward's gated residual in the second's. The attention runs
the block's own processor (its rotary embedding, mask, output projections) on the kernels' qkv projections
(``HandedAttention``); the attention's gated residuals are diffusers' sums. Fused and unfused agree to the model
dtype's rounding (the kernels normalize and modulate in float32), not bit for bit.

A block is swapped only in the structure diffusers builds (the modulation tables, float32 LayerNorms without affine of
the block's width, ``FeedForward`` modules of [GELU, Dropout, linear]) with a packed linear with quantized activations
to fuse. It runs diffusers' own forward in training mode, for a ``temb`` or a text whose batch or dtype is not the
rows', and when a norm, a modulation table or the attention carries a hook or another processor (or a qkv projection
the kernels run does); a hooked feed-forward runs as the module. Both classes, fused or not, have an entry in
diffusers' ``TransformerBlockRegistry`` (diffusers 0.42's block caches do not find JoyImage's ``double_blocks``, fused
or not). The state dict is unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from .diffusers_fused import (_feed_forward, _ff, _forward_wrapped, _hooked, _project, adopt_checked,
                              HandedAttention, kernel_modulation, like_rows, plain_fp32_layer_norm, register_block,
                              runs_processor, swap_blocks)
from .linear import runs_packed_kernels as _quantized

try:   # (JoyImage's blocks: absent from older releases)
    from diffusers.models.transformers import transformer_joyimage as _joy
except ImportError:
    _joy = None
try:
    from diffusers.models.transformers import transformer_joyimage_edit_plus as _plus
except ImportError:
    _plus = None

_QKV = ("img_attn_qkv", "txt_attn_qkv")


@dataclass(frozen=True)
class _Family:
    """A JoyImage block class and the modulation, attention and processor classes diffusers builds it with;
    ``masked``: its forward takes the text mask."""
    block: type
    modulate: type
    attention: type
    processor: type
    masked: bool


_FAMILIES: dict[type, _Family] = {}
if _joy is not None:
    _FAMILIES[_joy.JoyImageTransformerBlock] = _Family(_joy.JoyImageTransformerBlock, _joy.JoyImageModulate,
                                                       _joy.JoyImageAttention, _joy.JoyImageAttnProcessor, False)
if _plus is not None:
    _FAMILIES[_plus.JoyImageEditPlusTransformerBlock] = _Family(
        _plus.JoyImageEditPlusTransformerBlock, _plus.JoyImageEditPlusModulate, _plus.JoyImageEditPlusAttention,
        _plus.JoyImageEditPlusAttnProcessor, True)


def _supported(block: Any) -> bool:
    family: Any = _FAMILIES.get(type(block))
    if family is None or _forward_wrapped(block):
        return False
    d = block.dim
    tables = all(type(m) is family.modulate and m.factor == 6 and tuple(m.modulate_table.shape) == (1, 6, d)
                 for m in (block.img_mod, block.txt_mod))
    norms = all(plain_fp32_layer_norm(getattr(block, n), d) for n in ("img_norm1", "img_norm2", "txt_norm1",
                                                                      "txt_norm2"))
    return (tables and norms and _feed_forward(block.img_mlp, d) and _feed_forward(block.txt_mlp, d)
            and type(block.attn) is family.attention
            and all(getattr(getattr(block.attn, n), "in_features", None) == d for n in _QKV))


def _linears(block: nn.Module) -> list[nn.Module]:
    a = block.attn
    return [a.img_attn_qkv, a.txt_attn_qkv, block.img_mlp.net[0].proj, block.img_mlp.net[2],
            block.txt_mlp.net[0].proj, block.txt_mlp.net[2]]


def _fused_forward(block: Any, unfused: Any, args: tuple[Any, ...]) -> Any:
    """The fused forward of either block (module docstring); ``unfused(*args)``, diffusers' forward, where the fused
    path cannot reproduce it."""
    family = next(_FAMILIES[c] for c in type(block).__mro__ if c in _FAMILIES)
    h, c, temb, rotary = args[:4]
    mask = args[4] if family.masked else None
    attn = block.attn
    norms = (block.img_norm1, block.img_norm2, block.txt_norm1, block.txt_norm2, block.img_mod, block.txt_mod)
    if (block.training or h.ndim != 3 or c.ndim != 3 or not isinstance(temb, torch.Tensor)
            or not like_rows(h, c, temb) or any(_hooked(m) for m in norms)
            or not runs_processor(attn, (family.processor,), _QKV)):
        return unfused(*args)
    b, t, d = h.shape
    s = c.shape[1]
    e = temb if temb.ndim == 3 else temb.unsqueeze(1)
    mods = [m.modulate_table + e for m in (block.img_mod, block.txt_mod)]   # (B, 6, D), as diffusers adds them
    if any(tuple(m.shape) != (b, 6, d) for m in mods):   # (a temb of more dims: diffusers' forward, its error)
        return unfused(*args)
    (mod_h, mod_c), (m32_h, m32_c) = mods, [kernel_modulation(m) for m in mods]

    def rows(x: torch.Tensor, norm: nn.Module, mod: torch.Tensor) -> torch.Tensor:
        return norm(x) * (1 + mod[:, 1:2]) + mod[:, 0:1]

    handed: dict[str, torch.Tensor] = {}
    streams = ((h, block.img_norm1, mod_h, m32_h, _QKV[0]), (c, block.txt_norm1, mod_c, m32_c, _QKV[1]))
    for x, norm, mod, m32, name in streams:
        layer = getattr(attn, name)
        if _quantized(layer):
            (out,) = _project((layer,), x.reshape(-1, d).contiguous(), lambda: rows(x, norm, mod), ln_eps=norm.eps,
                              shift=m32[0], scale=m32[1])
            handed[name] = out.view(b, x.shape[1], -1)
    # (the processor reads the rows only through a projection it runs itself: a 16-bit one)
    hh = h if _QKV[0] in handed else rows(h, block.img_norm1, mod_h)
    cc = c if _QKV[1] in handed else rows(c, block.txt_norm1, mod_c)
    extra = {"attention_mask": mask} if family.masked else {}
    oh, oc = attn.processor(HandedAttention(attn, handed), hh, cc, image_rotary_emb=rotary, **extra)
    h = h + oh * mod_h[:, 2:3]
    c = c + oc * mod_c[:, 2:3]
    # (diffusers modulates the float32 LayerNorm's output in the rows' dtype)
    h2 = _ff(block.img_mlp, block.img_norm2, h.reshape(b * t, d).contiguous(), b, mod_h, m32_h, fp32_rows=False)
    c2 = _ff(block.txt_mlp, block.txt_norm2, c.reshape(b * s, d).contiguous(), b, mod_c, m32_c, fp32_rows=False)
    return h2.view(b, t, d), c2.view(b, s, d)


_FUSED: dict[type, type] = {}
if _joy is not None:
    class FusedJoyImageTransformerBlock(_joy.JoyImageTransformerBlock):
        """A ``JoyImageTransformerBlock`` running the fused packed kernels (module docstring)."""

        def __init__(self, block: nn.Module) -> None:
            adopt_checked(self, block, _FAMILIES, _supported)

        def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, temb: torch.Tensor,
                    image_rotary_emb: Any = None) -> Any:
            return _fused_forward(self, super().forward, (hidden_states, encoder_hidden_states, temb,
                                                          image_rotary_emb))

    _FUSED[_joy.JoyImageTransformerBlock] = FusedJoyImageTransformerBlock
if _plus is not None:
    class FusedJoyImageEditPlusTransformerBlock(_plus.JoyImageEditPlusTransformerBlock):
        """A ``JoyImageEditPlusTransformerBlock`` running the fused packed kernels (module docstring)."""

        def __init__(self, block: nn.Module) -> None:
            adopt_checked(self, block, _FAMILIES, _supported)

        def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, temb: torch.Tensor,
                    image_rotary_emb: Any = None, attention_mask: torch.Tensor | None = None) -> Any:
            return _fused_forward(self, super().forward, (hidden_states, encoder_hidden_states, temb,
                                                          image_rotary_emb, attention_mask))

    _FUSED[_plus.JoyImageEditPlusTransformerBlock] = FusedJoyImageEditPlusTransformerBlock


def fuse_joyimage_blocks(model: nn.Module) -> int:
    """Swap every JoyImage block of ``model`` that a fused class handles and that has a packed linear with quantized
    activations to fuse; returns how many were swapped."""
    return swap_blocks(model, lambda m: _FUSED[type(m)] if _supported(m) else None, _linears)


for _fused in _FUSED.values():
    register_block(_fused, 0, 1)   # each returns (hidden_states, encoder_hidden_states), as the originals
