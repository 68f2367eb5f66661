"""Fused CogVideoX blocks for packed inference: the fusions of :mod:`.diffusers_fused` for diffusers'
``CogVideoXBlock`` (CogVideoX 2B/5B, 1.5, image to video) and ConsisID's copy of it, ``ConsisIDBlock`` (no keyword
arguments for the attention).

The text ``c`` and the video tokens ``h`` share every linear of the block; each of its two
``CogVideoXLayerNormZero`` gives a modulation per stream (shift, scale, gate for the video, and for the text) from
one linear of ``silu(temb)``, around one LayerNorm with affine:

    n_h = LN(h) · (1 + scale) + shift,   n_c = LN(c) · (1 + enc_scale) + enc_shift        (norm1)
    q, k, v = to_q/k/v ← Q(n_c), Q(n_h)           (the same projections, run per stream with its own modulation)
    o_c, o_h = attention(LN_q(q), LN_k(k), v)       (text first; the rotary embedding on the video rows only)
    h = h + gate · to_out(o_h),   c = c + enc_gate · to_out(o_c)
    h = h + gate_ff · ff(Q(norm2(h))),   c = c + enc_gate_ff · ff(Q(norm2(c)))             (GELU(tanh) inside)

The LayerNorm's affine folds into the modulation the quantization kernel applies (it normalizes without one):
``LN_w,b(x) · (1 + s) + t = LN(x) · (1 + (w(1 + s) − 1)) + (b(1 + s) + t)``, in float32. Where a linear is a
:class:`TreeQLinear` with quantized activations, LayerNorm + modulate + quantization run in its ``quantize_input``
kernel (one call per stream shared by to_q/to_k/to_v with one activation spec and no Monarch branch), GELU(tanh)
and ``ff.net[2]``'s codes in ``ff.net[0].proj``'s epilogue, the gated residuals in ``to_out[0]``'s and
``ff.net[2]``'s; each stream's rows run their own GEMM (one per-sample modulation each: no per-token table). The
attention is ``CogVideoXAttnProcessor2_0``'s computation. Fused and unfused agree to the model dtype's rounding
(the kernels normalize and modulate in float32, where diffusers rounds each step to the model dtype), not bit for
bit.

A block is swapped only in the structure diffusers builds (``CogVideoXLayerNormZero`` over a LayerNorm of the
block's width, ``CogVideoXAttnProcessor2_0`` on unfused projections with LayerNorm or no q/k norms, a
``FeedForward`` of [GELU, Dropout, linear(, Dropout)]) with a packed linear with quantized activations to fuse. It
runs diffusers' own forward in training mode, with ``attention_kwargs``, without text, for a ``temb`` whose batch
is not the latents', when a norm or the attention carries a hook or another processor, and when any module the two
streams share carries one (the feed-forward, its parts, a projection, packed or not) other than diffusers' layerwise
casting (``hooked_beyond_casting``): the fused path calls those once per stream, where diffusers calls them once on
the joined rows (a stateful hook, such as TaylorSeer's cache, would see the streams in turn). diffusers' block-level
hooks (FirstBlockCache, MagCache) find the fused class in ``TransformerBlockRegistry`` under the original's entry.
The state dict is unchanged.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, CogVideoXAttnProcessor2_0
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.normalization import CogVideoXLayerNormZero
from diffusers.models.transformers.cogvideox_transformer_3d import CogVideoXBlock

try:   # (ConsisID's copy of the block: absent from older releases)
    from diffusers.models.transformers.consisid_transformer_3d import ConsisIDBlock
except ImportError:
    ConsisIDBlock = None

from .diffusers_fused import (_feed_forward, _ff, _forward_wrapped, _gated_out, _hooked, _project, adopt_checked,
                              folded_affine, hooked_beyond_casting, like_rows, register_block, self_attention_ok,
                              swap_blocks)


def _layer_norm(norm: Any, dim: int) -> bool:
    """A LayerNorm over the last dim, affine or not (the affine folds into the modulation)."""
    return type(norm) is nn.LayerNorm and tuple(norm.normalized_shape) == (dim,)


def _norm_zero(norm: Any, dim: int) -> bool:
    return (type(norm) is CogVideoXLayerNormZero and _layer_norm(norm.norm, dim) and type(norm.silu) is nn.SiLU
            and isinstance(norm.linear, nn.Module))


def _supported(block: nn.Module) -> bool:
    if type(block) not in _FUSED or _forward_wrapped(block):
        return False
    attn, ln = block.attn1, getattr(block.norm1, "norm", None)
    d = ln.normalized_shape[0] if isinstance(ln, nn.LayerNorm) and len(ln.normalized_shape) == 1 else None
    return (d is not None and _feed_forward(block.ff, d) and _norm_zero(block.norm1, d) and _norm_zero(block.norm2, d)
            and type(attn) is Attention and not attn.is_cross_attention and attn.group_norm is None
            and attn.spatial_norm is None and attn.norm_cross is None and not attn.residual_connection
            and attn.rescale_output_factor == 1.0
            and all(n is None or type(n) is nn.LayerNorm for n in (attn.norm_q, attn.norm_k)))


def _linears(block: nn.Module) -> list[nn.Module]:
    a = block.attn1
    return [a.to_q, a.to_k, a.to_v, a.to_out[0], block.ff.net[0].proj, block.ff.net[2]]


def _streams(norm: CogVideoXLayerNormZero, temb: torch.Tensor, b: int, d: int) -> torch.Tensor | None:
    """``norm``'s six vectors as diffusers computes them, ``(B, 2, 3, D)``: per stream (video, text) shift, scale,
    gate; None when they are not per latent sample (diffusers' forward handles the rest)."""
    mod = norm.linear(norm.silu(temb))
    return mod.view(b, 2, 3, d) if mod.shape == (b, 6 * d) else None


def _stream_modulation(block: Any, m1: torch.Tensor, m2: torch.Tensor,
                       stream: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One stream's modulation (0: video, 1: text) in the six-vector layout of ``_ff``: as diffusers uses them,
    ``(B, 6, D)`` [shift, scale, gate of norm1, the same of norm2]; as the kernels take them, float32 ``(6, B, D)``
    with each LayerNorm's affine folded into its shift and scale."""
    mod = torch.cat([m1[:, stream], m2[:, stream]], dim=1)
    parts: list[torch.Tensor] = []
    for norm, m in ((block.norm1, m1), (block.norm2, m2)):
        shift, scale = folded_affine(norm.norm, m[:, stream, 0], m[:, stream, 1])
        parts += [shift, scale, m[:, stream, 2].float()]
    return mod, torch.stack(parts)


def _attention(attn: Any, text: tuple[torch.Tensor, ...], video: tuple[torch.Tensor, ...], b: int,
               rotary: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``CogVideoXAttnProcessor2_0``'s attention of the text's and the video's (B·S, inner) q, k, v rows: the
    outputs before ``to_out``, (B, S_text, inner) and (B, S, inner)."""
    heads = attn.heads
    head_dim = text[1].shape[-1] // heads   # (the processor's: the key's width over the heads)

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.view(b, -1, heads, head_dim).transpose(1, 2)

    query, key, value = (torch.cat([split(c), split(h)], dim=2) for c, h in zip(text, video))
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    s = text[0].shape[0] // b
    if rotary is not None:
        query = torch.cat([query[:, :, :s], apply_rotary_emb(query[:, :, s:], rotary)], dim=2)
        key = torch.cat([key[:, :, :s], apply_rotary_emb(key[:, :, s:], rotary)], dim=2)
    o = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
    o = o.transpose(1, 2).reshape(b, -1, heads * head_dim)
    return o[:, :s], o[:, s:]


def _forward(block: Any, unfused: Callable[..., Any], args: tuple[Any, ...]) -> Any:
    """The fused forward of a CogVideoX block (module docstring); ``unfused(*args)`` is diffusers' own."""
    h, c, temb, image_rotary_emb = args[:4]
    attention_kwargs = args[4] if len(args) > 4 else None
    n1, n2, attn = block.norm1, block.norm2, block.attn1
    if (block.training or attention_kwargs or h.ndim != 3 or c.ndim != 3 or not c.shape[1]
            or not like_rows(h, c, temb)
            or any(_hooked(n) for n in (n1, n1.norm, n2, n2.norm))
            or any(hooked_beyond_casting(m) for m in (block.ff, *block.ff.net, *_linears(block)))
            or not self_attention_ok(attn, Attention, CogVideoXAttnProcessor2_0)):
        return unfused(*args)
    b, t, d = h.shape
    text = c.shape[1]
    m1, m2 = _streams(n1, temb, b, d), _streams(n2, temb, b, d)
    if m1 is None or m2 is None:
        return unfused(*args)
    (mod_h, m32_h), (mod_c, m32_c) = _stream_modulation(block, m1, m2, 0), _stream_modulation(block, m1, m2, 1)
    h2, c2 = h.reshape(b * t, d).contiguous(), c.reshape(b * text, d).contiguous()
    qkv = (attn.to_q, attn.to_k, attn.to_v)
    video = _project(qkv, h2, lambda: n1.norm(h) * (1 + mod_h[:, 1:2]) + mod_h[:, 0:1], ln_eps=n1.norm.eps,
                     shift=m32_h[0], scale=m32_h[1])
    words = _project(qkv, c2, lambda: n1.norm(c) * (1 + mod_c[:, 1:2]) + mod_c[:, 0:1], ln_eps=n1.norm.eps,
                     shift=m32_c[0], scale=m32_c[1])
    oc, oh = _attention(attn, tuple(words), tuple(video), b, image_rotary_emb)
    h2 = _gated_out(attn.to_out[0], oh, h2, b, m32_h[2], mod_h[:, 2:3])
    c2 = _gated_out(attn.to_out[0], oc, c2, b, m32_c[2], mod_c[:, 2:3])
    h2 = _ff(block.ff, n2.norm, h2, b, mod_h, m32_h)
    c2 = _ff(block.ff, n2.norm, c2, b, mod_c, m32_c)
    return h2.view(b, t, d), c2.view(b, text, d)


class FusedCogVideoXBlock(CogVideoXBlock):
    """A ``CogVideoXBlock`` running the fused packed kernels (module docstring)."""

    def __init__(self, block: CogVideoXBlock) -> None:
        adopt_checked(self, block, _FUSED, _supported)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, temb: torch.Tensor,
                image_rotary_emb: Any = None, attention_kwargs: dict[str, Any] | None = None) -> Any:
        return _forward(self, super().forward, (hidden_states, encoder_hidden_states, temb, image_rotary_emb,
                                                attention_kwargs))


# the blocks and their fused classes: CogVideoX's, and ConsisID's (CogVideoX's without the attention's keyword
# arguments)
_FUSED: dict[type, type] = {CogVideoXBlock: FusedCogVideoXBlock}
if ConsisIDBlock is not None:
    class FusedConsisIDBlock(ConsisIDBlock):
        """ConsisID's copy of ``CogVideoXBlock`` running the fused packed kernels (module docstring)."""

        def __init__(self, block: nn.Module) -> None:
            adopt_checked(self, block, _FUSED, _supported)

        def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, temb: torch.Tensor,
                    image_rotary_emb: Any = None) -> Any:
            return _forward(self, super().forward, (hidden_states, encoder_hidden_states, temb, image_rotary_emb))

    _FUSED[ConsisIDBlock] = FusedConsisIDBlock


def fuse_cogvideox_blocks(model: nn.Module) -> int:
    """Swap every CogVideoX block of ``model`` that :class:`FusedCogVideoXBlock` handles and that has a packed linear
    with quantized activations to fuse; returns how many were swapped."""
    return swap_blocks(model, lambda m: _FUSED[type(m)] if _supported(m) else None, _linears)


for _fused in _FUSED.values():
    register_block(_fused, 0, 1)   # returns (hidden_states, encoder_hidden_states), as the original
