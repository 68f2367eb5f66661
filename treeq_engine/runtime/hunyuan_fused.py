"""Fused HunyuanVideo blocks for packed inference: diffusers' ``HunyuanVideoTransformerBlock`` (double stream) and
``HunyuanVideoSingleTransformerBlock`` compute FLUX.1's blocks (``mmdit_fused.flux_double`` / ``flux_single``: the
same adaLNs, LayerNorms without affine, GELU(tanh) feed-forwards and gated residuals), with
``HunyuanVideoAttnProcessor2_0``'s attention:

    double: [q; q'] = [rot(norm_q(to_q ← n)); norm_added_q(add_q_proj ← n')]   (k alike, v without norm or rotary)
    single: x = [image; text],  q = norm_q(to_q ← n(x)), the rotary embedding on the image rows only
    o = attention(q, k, v, mask)    (the model's (B, 1, 1, image + text) mask: a prompt's padding hidden)

the image tokens first, then the text (Flux orders them the other way and rotates both). Where a linear is a
:class:`TreeQLinear` with quantized activations, LayerNorm + modulate + quantization run in its ``quantize_input``
kernel, GELU(tanh) and the gated residuals in the GEMM epilogues, as for Flux. Fused and unfused agree to the model
dtype's rounding, not bit for bit (the kernels modulate in float32); in float16 neither clips its outputs (Flux's
blocks do, HunyuanVideo's do not).

A block is swapped only in the structure diffusers builds, with a packed linear with quantized activations to fuse;
a swapped block runs diffusers' own forward in training mode, when its attention runs another processor or fused
projections, when a norm, the attention or a projection carries a hook, on other input ranks or without text.
HunyuanVideo FramePack's blocks are these classes and fuse too (tested); HunyuanImage 2.1's are diffusers' copies
of them (the double block's rotary argument renamed ``image_rotary_emb``, its processor computing HunyuanVideo's)
and fuse alike; Motif-Video's are copies too, with an optional text cross-attention that runs as diffusers' module
on what diffusers hands it (the double block's projected image attention output, the single block's raw one, the
normalized text). HunyuanVideo-I2V's token-replace blocks, and the token refiners' blocks, stay unfused. The state
dict is unchanged.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import torch
import torch.nn as nn
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.attention_processor import Attention
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.normalization import AdaLayerNormZero, AdaLayerNormZeroSingle
from diffusers.models.transformers.transformer_hunyuan_video import (HunyuanVideoAttnProcessor2_0,
                                                                     HunyuanVideoSingleTransformerBlock,
                                                                     HunyuanVideoTransformerBlock)

try:   # (HunyuanImage 2.1's blocks: absent from older releases)
    from diffusers.models.transformers import transformer_hunyuanimage as _image
except ImportError:
    _image = None
try:   # (Motif-Video's copies of the blocks: absent from older releases)
    from diffusers.models.transformers import transformer_motif_video as _motif
except ImportError:
    _motif = None

from .diffusers_fused import (_bypassed_hook, _feed_forward, _forward_wrapped, _hooked, _plain_layer_norm,
                              adopt_checked, dispatch_kwargs, joint_attention_ok, like_rows, refuse_fused_projections,
                              register_block, swap_blocks)
from .linear import runs_packed_kernels as _quantized
from .mmdit_fused import _adaln, _gelu_tanh, _modulation, flux_double, flux_linears, flux_single

PROJECTIONS = ("to_q", "to_k", "to_v")
ADDED = ("add_q_proj", "add_k_proj", "add_v_proj")


def _attention(attn: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, b: int, rotary: Any,
               text: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
               mask: torch.Tensor | None = None, *, text_rows: int = 0) -> torch.Tensor:
    """``HunyuanVideoAttnProcessor2_0``'s attention of (B·S, inner) projection rows, image first (module docstring):
    the double block's text projections ``text`` after, or the single block's last ``text_rows`` rows its text,
    neither rotated. As (B, S, inner)."""
    def heads(t: torch.Tensor) -> torch.Tensor:
        return t.view(b, -1, t.shape[-1]).unflatten(2, (attn.heads, -1))

    query, key, value = heads(q), heads(k), heads(v)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    if rotary is not None:
        if text_rows:
            query = torch.cat([apply_rotary_emb(query[:, :-text_rows], rotary, sequence_dim=1),
                               query[:, -text_rows:]], dim=1)
            key = torch.cat([apply_rotary_emb(key[:, :-text_rows], rotary, sequence_dim=1), key[:, -text_rows:]],
                            dim=1)
        else:
            query = apply_rotary_emb(query, rotary, sequence_dim=1)
            key = apply_rotary_emb(key, rotary, sequence_dim=1)
    if text is not None:
        eq, ek, ev = (heads(t) for t in text)
        if attn.norm_added_q is not None:
            eq = attn.norm_added_q(eq)
        if attn.norm_added_k is not None:
            ek = attn.norm_added_k(ek)
        query, key, value = torch.cat([query, eq], dim=1), torch.cat([key, ek], dim=1), torch.cat([value, ev], dim=1)
    o = dispatch_attention_fn(query, key, value, attn_mask=mask, dropout_p=0.0, is_causal=False,
                              **dispatch_kwargs(attn.processor))
    return o.flatten(2, 3).to(query.dtype)


def _attention_ok(attn: Any, joint: bool, processor: type = HunyuanVideoAttnProcessor2_0,
                  kind: Any = Attention) -> bool:
    """``attn`` computes what the fused path computes (checked on every forward): an attention of class ``kind``
    running HunyuanVideo's ``processor`` (or a copy's) on unfused projections, no hook on it or on a projection the
    kernels run."""
    if type(attn) is not kind or type(attn.processor) is not processor:
        return False
    refuse_fused_projections(attn, PROJECTIONS + ADDED)   # (a dense copy of packed layers: an error)
    if getattr(attn, "fused_projections", False) or _hooked(attn):
        return False
    if joint:
        return joint_attention_ok(attn, processor, PROJECTIONS + ADDED)
    m = attn._modules
    return (attn.pre_only and all(m.get(n) is not None for n in PROJECTIONS)
            and not any(_bypassed_hook(m[n]) for n in PROJECTIONS))


def _cross_ok(block: nn.Module) -> bool:
    """``block`` has no text cross-attention, or Motif-Video's (run as the module, on the inputs diffusers hands
    it)."""
    cross = getattr(block, "cross_attn", None)
    return cross is None or (_motif is not None and type(cross) is _motif.MotifVideoCrossAttention)


def _double_supported(block: nn.Module, kind: type[Any] = HunyuanVideoTransformerBlock) -> bool:
    """``block`` is a double-stream block of class ``kind`` in the structure diffusers builds (HunyuanVideo 1.5's
    are alike: ``hunyuan15_fused``)."""
    if type(block) is not kind or _forward_wrapped(block) or not _cross_ok(block):
        return False
    d = block.norm2.normalized_shape[0] if isinstance(block.norm2, nn.LayerNorm) else None
    return (d is not None and _plain_layer_norm(block.norm2, d) and _plain_layer_norm(block.norm2_context, d)
            and _feed_forward(block.ff, d) and _feed_forward(block.ff_context, d)
            and _adaln(block.norm1, AdaLayerNormZero, d) and _adaln(block.norm1_context, AdaLayerNormZero, d)
            and type(block.attn) is _ATTENTIONS.get(kind, Attention) and block.attn.added_kv_proj_dim is not None)


def _single_supported(block: nn.Module) -> bool:
    if type(block) not in _SINGLE or _forward_wrapped(block) or not _cross_ok(block):
        return False
    d = getattr(block.proj_out, "out_features", None)
    return (isinstance(d, int) and _gelu_tanh(block.act_mlp) and _adaln(block.norm, AdaLayerNormZeroSingle, d)
            and type(block.attn) is _ATTENTIONS.get(type(block), Attention))


def _linears(block: nn.Module) -> list[nn.Module]:
    return flux_linears(block, single=type(block) in _SINGLE)


def _processor(block: nn.Module) -> type:
    """The processor whose computation the fused path repeats for ``block``'s attention (its class's, found through
    the whole MRO: a subclass made at run time, such as torch's parametrize makes, comes first)."""
    return next(_PROCESSORS[c] for c in type(block).__mro__ if c in _PROCESSORS)


def _attention_kind(block: nn.Module) -> type:
    """The class of ``block``'s attention as diffusers builds it (``Attention``; Motif-Video's its own)."""
    return next((_ATTENTIONS[c] for c in type(block).__mro__ if c in _ATTENTIONS), Attention)


def _adopt_checked(new: nn.Module, block: nn.Module) -> None:
    adopt_checked(new, block, _SINGLE.keys() | _DOUBLE.keys(),
                  lambda b: _single_supported(b) if type(b) in _SINGLE else _double_supported(b, type(b)))


def _single_forward(block: Any, unfused: Callable[..., Any], call: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The fused forward of a single-stream block (module docstring); ``unfused(*call, **kwargs)`` is diffusers'."""
    h, c, temb, attention_mask, image_rotary_emb = call[:5]
    norm, attn = block.norm, block.attn
    if (block.training or h.ndim != 3 or c.ndim != 3 or not like_rows(h, c, temb) or _hooked(norm)
            or _hooked(norm.norm)
            or _hooked(block.act_mlp) or _bypassed_hook(block.proj_mlp) or _bypassed_hook(block.proj_out)
            or not _attention_ok(attn, joint=False, processor=_processor(block), kind=_attention_kind(block))):
        return unfused(*call, **kwargs)
    text = c.shape[1]
    if not text:   # (diffusers' own: its split of [image; text] at -0 is degenerate, as it is)
        return unfused(*call, **kwargs)
    x = torch.cat([h, c], dim=1)
    m = _modulation(norm, temb, x.shape[0], 3, x.shape[2])
    if m is None:
        return unfused(*call, **kwargs)
    attention: Callable[..., torch.Tensor] = functools.partial(_attention, text_rows=text)
    cross = getattr(block, "cross_attn", None)
    if cross is not None:   # Motif-Video's: the image rows' attention output plus the cross-attention's of it
        mod = m[0]
        context = norm.norm(c) * (1 + mod[:, 1:2]) + mod[:, 0:1]   # (its text rows normalized, as diffusers')

        def attention(attn: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, b: int, rotary: Any,
                      mask: torch.Tensor | None = None) -> torch.Tensor:
            o = _attention(attn, q, k, v, b, rotary, mask=mask, text_rows=text)
            image = o[:, :-text]
            image = image + cross(hidden_states=image, encoder_hidden_states=context, attention_mask=mask,
                                  image_rotary_emb=rotary, image_embed_seq_len=_image_embed_seq_len(call, kwargs))
            return torch.cat([image, o[:, -text:]], dim=1)

    y = flux_single(block, x, *m, image_rotary_emb, attention_mask, attention=attention, clip_fp16=False)
    return y[:, :-text], y[:, -text:]


def _image_embed_seq_len(call: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Motif-Video's ``image_embed_seq_len`` argument (the image embedding's tokens before the text), as called."""
    return call[5] if len(call) > 5 else kwargs.get("image_embed_seq_len", 0)


def _cross_image_out(block: Any, context: torch.Tensor, b: int, mod: torch.Tensor, mask: torch.Tensor | None,
                     rotary: Any, seq_len: Any) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Motif-Video's double block after its attention, as diffusers computes it: ``h + gate_msa · to_out(o)``, then
    the cross-attention of ``to_out(o)`` and the normalized text ``context`` added (to_out by the kernels where it
    is packed, its output kept for the cross-attention, the sums in the rows' dtype)."""
    proj = block.attn.to_out[0]

    def image_out(oh: torch.Tensor, h2: torch.Tensor) -> torch.Tensor:
        t = h2.shape[0] // b if b else 0
        if _quantized(proj):   # (not hooked: _attention_ok)
            out = proj.linear(proj.quantize_input(oh.reshape(-1, oh.shape[-1]).contiguous()), out_dtype=h2.dtype)
            out = out.view(b, t, -1)
        else:
            out = proj(oh.reshape(b, t, oh.shape[-1]))
        h = h2.view(b, t, -1) + out * mod[:, 2:3]
        h = h + block.cross_attn(hidden_states=out, encoder_hidden_states=context, attention_mask=mask,
                                 image_rotary_emb=rotary, image_embed_seq_len=seq_len)
        return h.reshape(h2.shape)

    return image_out


def _double_forward(block: Any, unfused: Callable[..., Any], call: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The fused forward of a double-stream block (module docstring); ``unfused(*call, **kwargs)`` is diffusers'."""
    h, c, temb, attention_mask, rotary = call[:5]
    n1, n1c, attn = block.norm1, block.norm1_context, block.attn
    if (block.training or h.ndim != 3 or c.ndim != 3 or not c.shape[1] or not like_rows(h, c, temb)
            or any(_hooked(n) for n in (n1, n1.norm, n1c, n1c.norm, block.norm2, block.norm2_context))
            or not _attention_ok(attn, joint=True, processor=_processor(block), kind=_attention_kind(block))):
        return unfused(*call, **kwargs)
    b, _, d = h.shape
    m, mc = _modulation(n1, temb, b, 6, d), _modulation(n1c, temb, b, 6, d)
    if m is None or mc is None:
        return unfused(*call, **kwargs)
    image_out = None
    if getattr(block, "cross_attn", None) is not None:   # Motif-Video's text cross-attention
        cmod = mc[0]
        context = n1c.norm(c) * (1 + cmod[:, 1:2]) + cmod[:, 0:1]   # (the normalized text, as diffusers')
        image_out = _cross_image_out(block, context, b, m[0], attention_mask, rotary,
                                     _image_embed_seq_len(call, kwargs))
    c, h = flux_double(block, h, c, m, mc, rotary, attention_mask, attention=_attention, text_first=False,
                       clip_fp16=False, image_out=image_out)
    return h, c


class FusedHunyuanVideoSingleTransformerBlock(HunyuanVideoSingleTransformerBlock):
    """A ``HunyuanVideoSingleTransformerBlock`` running the fused packed kernels (module docstring)."""

    def __init__(self, block: HunyuanVideoSingleTransformerBlock) -> None:
        _adopt_checked(self, block)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, temb: torch.Tensor,
                attention_mask: torch.Tensor | None = None, image_rotary_emb: Any = None, *args: Any,
                **kwargs: Any) -> Any:
        return _single_forward(self, super().forward, (hidden_states, encoder_hidden_states, temb, attention_mask,
                                                       image_rotary_emb, *args), kwargs)


class FusedHunyuanVideoTransformerBlock(HunyuanVideoTransformerBlock):
    """A ``HunyuanVideoTransformerBlock`` running the fused packed kernels (module docstring)."""

    def __init__(self, block: HunyuanVideoTransformerBlock) -> None:
        _adopt_checked(self, block)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, temb: torch.Tensor,
                attention_mask: torch.Tensor | None = None, freqs_cis: Any = None, *args: Any, **kwargs: Any) -> Any:
        return _double_forward(self, super().forward, (hidden_states, encoder_hidden_states, temb, attention_mask,
                                                       freqs_cis, *args), kwargs)


# the blocks and their fused classes, and the processor each block's attention runs: HunyuanVideo's, and
# HunyuanImage 2.1's (HunyuanVideo's classes but for the names and the double block's rotary argument, renamed
# image_rotary_emb; its processor computes HunyuanVideo's)
_SINGLE: dict[type, type] = {HunyuanVideoSingleTransformerBlock: FusedHunyuanVideoSingleTransformerBlock}
_DOUBLE: dict[type, type] = {HunyuanVideoTransformerBlock: FusedHunyuanVideoTransformerBlock}
_PROCESSORS: dict[type, type] = {HunyuanVideoSingleTransformerBlock: HunyuanVideoAttnProcessor2_0,
                                 HunyuanVideoTransformerBlock: HunyuanVideoAttnProcessor2_0}
if _image is not None:
    class FusedHunyuanImageSingleTransformerBlock(_image.HunyuanImageSingleTransformerBlock):
        """HunyuanImage 2.1's single-stream block running the fused packed kernels (module docstring)."""

        def __init__(self, block: nn.Module) -> None:
            _adopt_checked(self, block)

        def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, temb: torch.Tensor,
                    attention_mask: torch.Tensor | None = None, image_rotary_emb: Any = None, *args: Any,
                    **kwargs: Any) -> Any:
            return _single_forward(self, super().forward, (hidden_states, encoder_hidden_states, temb,
                                                           attention_mask, image_rotary_emb, *args), kwargs)

    class FusedHunyuanImageTransformerBlock(_image.HunyuanImageTransformerBlock):
        """HunyuanImage 2.1's double-stream block running the fused packed kernels (module docstring)."""

        def __init__(self, block: nn.Module) -> None:
            _adopt_checked(self, block)

        def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, temb: torch.Tensor,
                    attention_mask: torch.Tensor | None = None, image_rotary_emb: Any = None, *args: Any,
                    **kwargs: Any) -> Any:
            return _double_forward(self, super().forward, (hidden_states, encoder_hidden_states, temb,
                                                           attention_mask, image_rotary_emb, *args), kwargs)

    _SINGLE[_image.HunyuanImageSingleTransformerBlock] = FusedHunyuanImageSingleTransformerBlock
    _DOUBLE[_image.HunyuanImageTransformerBlock] = FusedHunyuanImageTransformerBlock
    for _block in (_image.HunyuanImageSingleTransformerBlock, _image.HunyuanImageTransformerBlock):
        _PROCESSORS[_block] = _image.HunyuanImageAttnProcessor
# the blocks whose attention is not diffusers' Attention (Motif-Video's: its own class, the same projections)
_ATTENTIONS: dict[type, type] = {}
if _motif is not None:
    class FusedMotifVideoSingleTransformerBlock(_motif.MotifVideoSingleTransformerBlock):
        """Motif-Video's single-stream block running the fused packed kernels (module docstring); its text
        cross-attention (``enable_text_cross_attention``) runs as the module on the image rows' attention output."""

        def __init__(self, block: nn.Module) -> None:
            _adopt_checked(self, block)

        def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, temb: torch.Tensor,
                    attention_mask: torch.Tensor | None = None, image_rotary_emb: Any = None, *args: Any,
                    **kwargs: Any) -> Any:
            return _single_forward(self, super().forward, (hidden_states, encoder_hidden_states, temb,
                                                           attention_mask, image_rotary_emb, *args), kwargs)

    class FusedMotifVideoTransformerBlock(_motif.MotifVideoTransformerBlock):
        """Motif-Video's double-stream block running the fused packed kernels (module docstring); its text
        cross-attention runs as the module on the image stream's projected attention output."""

        def __init__(self, block: nn.Module) -> None:
            _adopt_checked(self, block)

        def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, temb: torch.Tensor,
                    attention_mask: torch.Tensor | None = None, image_rotary_emb: Any = None, *args: Any,
                    **kwargs: Any) -> Any:
            return _double_forward(self, super().forward, (hidden_states, encoder_hidden_states, temb,
                                                           attention_mask, image_rotary_emb, *args), kwargs)

    _SINGLE[_motif.MotifVideoSingleTransformerBlock] = FusedMotifVideoSingleTransformerBlock
    _DOUBLE[_motif.MotifVideoTransformerBlock] = FusedMotifVideoTransformerBlock
    for _block in (_motif.MotifVideoSingleTransformerBlock, _motif.MotifVideoTransformerBlock):
        _PROCESSORS[_block] = _motif.MotifVideoAttnProcessor2_0
        _ATTENTIONS[_block] = _motif.MotifVideoAttention


def fuse_hunyuan_blocks(model: nn.Module) -> int:
    """Swap every HunyuanVideo block of ``model`` that a fused class handles and that has a packed linear with
    quantized activations to fuse; returns how many were swapped."""
    def choose(mod: nn.Module) -> type | None:
        if type(mod) in _DOUBLE and _double_supported(mod, type(mod)):
            return _DOUBLE[type(mod)]
        return _SINGLE[type(mod)] if _single_supported(mod) else None

    return swap_blocks(model, choose, _linears)


for _fused in (*_DOUBLE.values(), *_SINGLE.values()):
    register_block(_fused, 0, 1)   # each returns (hidden_states, encoder_hidden_states), as the originals
