"""Fused MMDiT blocks for packed inference: the fusions of :mod:`.diffusers_fused` for diffusers'
``FluxTransformerBlock`` (double stream), ``FluxSingleTransformerBlock`` and SD3's ``JointTransformerBlock``, and
for diffusers' copies of Flux's blocks: LongCat-Image's, Bria's and Bria FIBO's (``FLUX_ATTENTIONS``; FIBO's single
blocks are handed the joint rows and run the legacy ``Attention`` with Bria's processor).

Both take their modulation from an adaLN linear of ``silu(temb)``; ``LN`` has no affine.

Single block (``norm`` = AdaLayerNormZeroSingle: shift, scale, gate), on the text and image tokens together:

    x = [text; image],   n = Q(mod(LN(x), shift, scale))
    y = x + gate · proj_out([attention(to_q, to_k, to_v ← n) ; GELU_tanh(proj_mlp ← n)])

Double block (``norm1`` / ``norm1_context`` = AdaLayerNormZero: six vectors per stream, as in DiT):

    q, k, v = to_q/k/v ← Q(mod(LN(h), shift_msa, scale_msa)),  q', k', v' = add_q/k/v_proj ← same on the text
    o', o   = joint attention([q'; q], [k'; k], [v'; v])                    (RMSNorm on q and k, rotary embedding)
    h = h + gate_msa · to_out(o),   c = c + c_gate_msa · to_add_out(o')
    h = h + gate_mlp · ff.net[2](Q(GELU_tanh(ff.net[0].proj(Q(mod(LN(h), shift_mlp, scale_mlp))))))   (same for c)

SD3 block (``JointTransformerBlock``): the double block's computation with ``JointAttnProcessor2_0``'s attention
(image tokens first, optional RMSNorms on q and k, no rotary embedding); SD3.5's second attention (``attn2``, on
``mod(LN(h), shift_msa2, scale_msa2)`` of the block's input, gated by ``gate_msa2``) adds to h after the first;
the last block (``context_pre_only``) modulates the text with an ``AdaLayerNormContinuous`` (scale, shift), has no
to_add_out and no text feed-forward, and returns no text.

Where a linear is a :class:`TreeQLinear` with quantized activations, LayerNorm + modulate + quantization run in
its ``quantize_input`` kernel, one call shared by the linears that read those rows with one activation spec and no
Monarch branch (the single block's four: proj_mlp and to_q/k/v); GELU(tanh) runs in proj_mlp's and
``ff.net[0].proj``'s epilogue (the latter also writing ``ff.net[2]``'s codes); the gated residual ``x + gate ⊙ y``
in proj_out's, to_out's, to_add_out's and ``ff.net[2]``'s. The attention is ``FluxAttnProcessor``'s (the same
diffusers calls: the RMSNorms, ``apply_rotary_emb``, ``dispatch_attention_fn`` with the processor's backend).
Any other linear gets the float rows diffusers would give it. Fused and unfused agree to the model dtype's
rounding (the kernels do LayerNorm + modulate in float32), not bit for bit.

A block is swapped only in the structure diffusers builds (LayerNorms without affine, adaLN without its own
embedder, a ``FeedForward`` of [GELU(tanh), Dropout, linear], GELU(tanh) in the single block) and with a packed
linear with quantized activations to fuse. A swapped block runs diffusers' own forward in training mode, with
``joint_attention_kwargs`` (IP-Adapter), when its attention runs another processor than ``FluxAttnProcessor`` /
``JointAttnProcessor2_0`` or fused projections, when a norm or the attention carries a hook, with a chunked
feed-forward (SD3), or on other input ranks; a hook on a feed-forward or on a packed linear the kernels run makes that
part run as modules. diffusers' block-level hooks (FirstBlockCache, MagCache) find the fused classes in
``TransformerBlockRegistry`` under the originals' entries. The state dict is unchanged.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.models.attention import JointTransformerBlock
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.attention_processor import Attention, JointAttnProcessor2_0
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.normalization import (AdaLayerNormContinuous, AdaLayerNormZero, AdaLayerNormZeroSingle,
                                            SD35AdaLayerNormZeroX)
from diffusers.models.transformers.transformer_flux import (FluxAttention, FluxAttnProcessor,
                                                            FluxSingleTransformerBlock, FluxTransformerBlock)

try:   # (diffusers' copies of Flux's blocks: absent from older releases)
    from diffusers.models.transformers import transformer_longcat_image as _longcat
except ImportError:
    _longcat = None
try:
    from diffusers.models.transformers import transformer_bria as _bria
except ImportError:
    _bria = None
try:
    from diffusers.models.transformers import transformer_bria_fibo as _fibo
except ImportError:
    _fibo = None
try:
    from diffusers.models.transformers import transformer_ovis_image as _ovis
except ImportError:
    _ovis = None

from .diffusers_fused import (_adopt, _bypassed_hook, _feed_forward, _ff, _forward_wrapped, _gated_out, _hooked,
                              _plain_layer_norm, _project, adopt_checked, dispatch_kwargs, kernel_modulation, like_rows,
                              plain_out, refuse_fused_projections, register_block, swap_blocks)


# the attentions a FLUX.1-style block may run, each with the processor whose computation the fused path repeats:
# Flux's, and the copies LongCat-Image's, Bria's, Bria FIBO's and Ovis-Image's blocks run (Flux's classes but for the
# names, and a processor that splits the heads by their count rather than their width: the same split on one device)
FLUX_ATTENTIONS: dict[type, type] = {FluxAttention: FluxAttnProcessor}
if _longcat is not None:
    FLUX_ATTENTIONS[_longcat.LongCatImageAttention] = _longcat.LongCatImageAttnProcessor
if _bria is not None:
    FLUX_ATTENTIONS[_bria.BriaAttention] = _bria.BriaAttnProcessor
if _fibo is not None:
    FLUX_ATTENTIONS[_fibo.BriaFiboAttention] = _fibo.BriaFiboAttnProcessor
    # (Bria FIBO's single blocks: the legacy Attention running Bria's processor, which computes Flux's)
    FLUX_ATTENTIONS[_fibo.Attention] = _fibo.BriaAttnProcessor
if _ovis is not None:   # (Ovis-Image's blocks: ovis_fused)
    FLUX_ATTENTIONS[_ovis.OvisImageAttention] = _ovis.OvisImageAttnProcessor


def _gelu_tanh(act: nn.Module) -> bool:
    return type(act) is nn.GELU and act.approximate == "tanh"


def _flux_attention_ok(attn: Any, joint: bool) -> bool:
    """``attn`` computes what the fused path computes: ``FluxAttnProcessor`` (or a copy's: ``FLUX_ATTENTIONS``) on
    unfused projections, no hook on it or on a projection the kernels run. (Checked on every forward.)"""
    processor = FLUX_ATTENTIONS.get(type(attn))
    if processor is None or type(getattr(attn, "processor", None)) is not processor:
        return False
    refuse_fused_projections(attn, ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"))
    if attn.fused_projections:
        return False
    m = attn._modules
    names = ["to_q", "to_k", "to_v"] + (["add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"] if joint else [])
    if any(m.get(n) is None for n in names) or _hooked(attn):
        return False
    out = plain_out(attn) if joint else None
    if joint and out is None:
        return False
    return not any(_bypassed_hook(m[n]) for n in names) and not (out is not None and _bypassed_hook(out))


def _adaln(norm: Any, kind: type, d: int) -> bool:
    """An adaLN of ``kind`` as Flux builds it: no embedder of its own, a LayerNorm without affine, a linear."""
    if type(norm) is not kind:
        return False
    return (getattr(norm, "emb", None) is None and _plain_layer_norm(getattr(norm, "norm", None), d)
            and isinstance(getattr(norm, "linear", None), nn.Module))


def _flux_heads(attn: Any) -> bool:
    """``attn`` is one of ``FLUX_ATTENTIONS`` whose heads tile its projections (the fused path splits them by their
    width, the copies' processors by their count: the same split then; the legacy ``Attention`` has no
    ``head_dim``, and both split it by the count)."""
    if type(attn) not in FLUX_ATTENTIONS:
        return False
    if "head_dim" not in attn.__dict__:
        return attn.inner_dim % attn.heads == 0
    return attn.heads * attn.head_dim == attn.inner_dim


def single_width(block: nn.Module) -> int | None:
    """The width of a FLUX.1-style single block (Flux's, Chroma's) whose parts besides its adaLN are as diffusers
    builds them (GELU(tanh) after proj_mlp, a ``FluxAttention`` without output projection), else None."""
    d = getattr(block.proj_out, "out_features", None)
    ok = (isinstance(d, int) and _gelu_tanh(block.act_mlp) and _flux_heads(block.attn) and block.attn.pre_only)
    return d if ok else None


def flux_linears(block: nn.Module, single: bool) -> list[nn.Module]:
    """The linears a FLUX.1-style single (``single``) or double block's fusion runs (Flux's, Chroma's)."""
    a = block.attn
    if single:
        return [block.proj_mlp, a.to_q, a.to_k, a.to_v, block.proj_out]
    return [a.to_q, a.to_k, a.to_v, a.add_q_proj, a.add_k_proj, a.add_v_proj, a.to_out[0], a.to_add_out,
            block.ff.net[0].proj, block.ff.net[2], block.ff_context.net[0].proj, block.ff_context.net[2]]


def _single_supported(block: nn.Module) -> bool:
    if type(block) not in _SINGLE or _forward_wrapped(block):
        return False
    d = single_width(block)
    return d is not None and _adaln(block.norm, AdaLayerNormZeroSingle, d)


def double_width(block: nn.Module) -> int | None:
    """The width of a FLUX.1-style double block (Flux's, Chroma's) whose parts after the adaLNs are as diffusers
    builds them (LayerNorms without affine before the feed-forwards, GELU(tanh) feed-forwards, a joint
    ``FluxAttention``), else None."""
    d = block.norm2.normalized_shape[0] if isinstance(block.norm2, nn.LayerNorm) else None
    ok = (d is not None and _plain_layer_norm(block.norm2, d) and _plain_layer_norm(block.norm2_context, d)
          and _feed_forward(block.ff, d) and _feed_forward(block.ff_context, d)
          and _flux_heads(block.attn) and block.attn.added_kv_proj_dim is not None)
    return d if ok else None


def _double_supported(block: nn.Module) -> bool:
    if type(block) not in _DOUBLE or _forward_wrapped(block):
        return False
    d = double_width(block)
    return (d is not None and _adaln(block.norm1, AdaLayerNormZero, d)
            and _adaln(block.norm1_context, AdaLayerNormZero, d))


def _joint_attention_ok(attn: Any, joint: bool) -> bool:
    """SD3's ``attn`` (``joint``: with the text projections) or SD3.5's ``attn2`` computes what the fused path
    computes: ``JointAttnProcessor2_0`` on plain projections, no hook on it or on a projection the kernels run."""
    if type(attn) is not Attention or type(attn.processor) is not JointAttnProcessor2_0:
        return False
    m, out = attn._modules, plain_out(attn)
    if out is None:
        return False
    names = ["to_q", "to_k", "to_v"] + (["add_q_proj", "add_k_proj", "add_v_proj"] if joint else [])
    if joint and not attn.context_pre_only:
        names.append("to_add_out")
    if any(m.get(n) is None for n in names):
        return False
    return not any(_bypassed_hook(m[n]) for n in names) and not _bypassed_hook(out)


def _sd3_supported(block: nn.Module) -> bool:
    if type(block) is not JointTransformerBlock or _forward_wrapped(block):
        return False
    d = block.norm2.normalized_shape[0] if isinstance(block.norm2, nn.LayerNorm) else None
    if d is None or not _plain_layer_norm(block.norm2, d) or not _feed_forward(block.ff, d):
        return False
    if not _adaln(block.norm1, SD35AdaLayerNormZeroX if block.use_dual_attention else AdaLayerNormZero, d):
        return False
    if block.context_pre_only:
        return _adaln(block.norm1_context, AdaLayerNormContinuous, d) and block.ff_context is None
    return (_adaln(block.norm1_context, AdaLayerNormZero, d) and _plain_layer_norm(block.norm2_context, d)
            and _feed_forward(block.ff_context, d))


def _linears(block: nn.Module) -> list[nn.Module]:
    a = block.attn
    if isinstance(block, JointTransformerBlock):
        out = [a.to_q, a.to_k, a.to_v, a.add_q_proj, a.add_k_proj, a.add_v_proj, a.to_out[0], block.ff.net[0].proj,
               block.ff.net[2]]
        if block.attn2 is not None:
            out += [block.attn2.to_q, block.attn2.to_k, block.attn2.to_v, block.attn2.to_out[0]]
        if not block.context_pre_only:
            out += [a.to_add_out, block.ff_context.net[0].proj, block.ff_context.net[2]]
        return out
    return flux_linears(block, single=type(block) in _SINGLE)


def _modulation(norm: Any, temb: torch.Tensor, b: int, chunks: int, d: int,
                dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The adaLN vectors as diffusers computes them, ``(B, chunks, D)``, and as the kernels take them, float32
    ``(chunks, B, D)`` contiguous; None for a broadcast conditioning batch (diffusers' forward handles it).
    ``dtype``: AdaLayerNormContinuous casts ``silu(temb)`` to its input's dtype first."""
    act = norm.silu(temb)
    mod = norm.linear(act if dtype is None else act.to(dtype))
    if mod.shape != (b, chunks * d):
        return None
    mod = mod.view(b, chunks, d)
    return mod, kernel_modulation(mod)


def _attention(attn: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, b: int, rotary: Any,
               text: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
               mask: torch.Tensor | None = None) -> torch.Tensor:
    """``FluxAttnProcessor``'s attention of (B·S, inner) projection rows (the text's first when given), as
    (B, S_text + S, inner), with the attention mask it is handed (Chroma's); FLUX.2's processors compute the same
    (``flux2_fused``)."""
    split = (-1, attn.head_dim) if "head_dim" in attn.__dict__ else (attn.heads, -1)   # (the legacy Attention: none)

    def heads(t: torch.Tensor) -> torch.Tensor:
        return t.view(b, -1, t.shape[-1]).unflatten(-1, split)

    query, key, value = attn.norm_q(heads(q)), attn.norm_k(heads(k)), heads(v)
    if text is not None:
        eq, ek, ev = text
        query = torch.cat([attn.norm_added_q(heads(eq)), query], dim=1)
        key = torch.cat([attn.norm_added_k(heads(ek)), key], dim=1)
        value = torch.cat([heads(ev), value], dim=1)
    if rotary is not None:
        query = apply_rotary_emb(query, rotary, sequence_dim=1)
        key = apply_rotary_emb(key, rotary, sequence_dim=1)
    proc = attn.processor
    o = dispatch_attention_fn(query, key, value, attn_mask=mask, **dispatch_kwargs(proc))
    return o.flatten(2, 3).to(query.dtype)


def _joint_sdpa(attn: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, b: int,
                text: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """``JointAttnProcessor2_0``'s attention of (B·S, inner) projection rows (the image's first, then the text's
    when given), as (B, S + S_text, inner)."""
    heads = attn.heads
    head_dim = k.shape[-1] // heads

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.view(b, -1, heads, head_dim).transpose(1, 2)

    query, key, value = split(q), split(k), split(v)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    if text is not None:
        eq, ek, ev = (split(t) for t in text)
        if attn.norm_added_q is not None:
            eq = attn.norm_added_q(eq)
        if attn.norm_added_k is not None:
            ek = attn.norm_added_k(ek)
        query, key, value = torch.cat([query, eq], dim=2), torch.cat([key, ek], dim=2), torch.cat([value, ev], dim=2)
    o = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
    return o.transpose(1, 2).reshape(b, -1, heads * head_dim).to(query.dtype)


def flux_single(block: Any, x: torch.Tensor, mod: torch.Tensor, m32: torch.Tensor, rotary: Any,
                mask: torch.Tensor | None = None, *, attention: Callable[..., torch.Tensor] | None = None,
                clip_fp16: bool = True, swiglu: bool = False) -> torch.Tensor:
    """A FLUX.1-style single block (Flux's, Chroma's on ``x = [text; image]``; HunyuanVideo's, with its
    ``attention``, on ``[image; text]``) with its modulation ``mod`` (B, 3, D) and ``m32`` (3, B, D) float32: the
    fused kernels' ``x + gate · proj_out([attention ; GELU(proj_mlp)])``, clipped to float16's range in float16
    where the original block clips (``clip_fp16``: Flux's do, HunyuanVideo's do not). ``swiglu``: proj_mlp gives
    [h, g] and the MLP is ``act_mlp(g) · h`` (Ovis-Image's), between the kernels."""
    attention = attention or _attention
    norm, attn = block.norm, block.attn
    b, s, d = x.shape
    x2 = x.reshape(b * s, d).contiguous()
    mlp, q, k, v = _project((block.proj_mlp, attn.to_q, attn.to_k, attn.to_v), x2,
                            lambda: norm.norm(x) * (1 + mod[:, 1:2]) + mod[:, 0:1], ln_eps=norm.norm.eps,
                            shift=m32[0], scale=m32[1], gelu=() if swiglu else (True,), act=block.act_mlp)
    if swiglu:
        hidden, gate = mlp.chunk(2, dim=-1)
        mlp = block.act_mlp(gate) * hidden
    o = attention(attn, q, k, v, b, rotary, mask=mask)
    y = _gated_out(block.proj_out, torch.cat([o, mlp.view(b, s, -1)], dim=2), x2, b, m32[2], mod[:, 2:3])
    y = y.view(b, s, d)
    return y.clip(-65504, 65504) if clip_fp16 and y.dtype == torch.float16 else y


def flux_double(block: Any, h: torch.Tensor, c: torch.Tensor, m: tuple[torch.Tensor, torch.Tensor],
                mc: tuple[torch.Tensor, torch.Tensor], rotary: Any, mask: torch.Tensor | None = None, *,
                attention: Callable[..., torch.Tensor] | None = None, text_first: bool = True,
                clip_fp16: bool = True, ff: Callable[..., torch.Tensor] = _ff,
                image_out: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """A FLUX.1-style double block (Flux's, Chroma's; HunyuanVideo's with its ``attention``, whose output has the
    image tokens first: not ``text_first``) on the image tokens ``h`` and text ``c`` with each stream's modulation
    ``(mod (B, 6, D), m32 (6, B, D) float32)``: the fused kernels' computation; ``(c, h)``, the text clipped to
    float16's range in float16 where the original block clips (``clip_fp16``). ``ff``: the feed-forwards' gated
    residual (``_ff``'s arguments: GELU(tanh) feed-forwards; Ovis-Image's are SwiGLU). ``image_out``: the image
    stream's step after the attention, given its (B, T, inner) attention output and the (B·T, D) rows, giving the
    rows (Motif-Video's, whose cross-attention reads the projected output); by default ``to_out`` with the gated
    residual in its epilogue."""
    attention = attention or _attention
    n1, n1c, attn = block.norm1, block.norm1_context, block.attn
    (mod, m32), (cmod, c32) = m, mc
    b, t, d = h.shape
    text = c.shape[1]
    h2, c2 = h.reshape(b * t, d).contiguous(), c.reshape(b * text, d).contiguous()
    q, k, v = _project((attn.to_q, attn.to_k, attn.to_v), h2,
                       lambda: n1.norm(h) * (1 + mod[:, 1:2]) + mod[:, 0:1], ln_eps=n1.norm.eps, shift=m32[0],
                       scale=m32[1])
    eq, ek, ev = _project((attn.add_q_proj, attn.add_k_proj, attn.add_v_proj), c2,
                          lambda: n1c.norm(c) * (1 + cmod[:, 1:2]) + cmod[:, 0:1], ln_eps=n1c.norm.eps,
                          shift=c32[0], scale=c32[1])
    o = attention(attn, q, k, v, b, rotary, (eq, ek, ev), mask=mask)
    oc, oh = o.split_with_sizes([text, t], dim=1) if text_first else o.split_with_sizes([t, text], dim=1)[::-1]
    h2 = _gated_out(attn.to_out[0], oh, h2, b, m32[2], mod[:, 2:3]) if image_out is None else image_out(oh, h2)
    c2 = _gated_out(attn.to_add_out, oc, c2, b, c32[2], cmod[:, 2:3])
    h2 = ff(block.ff, block.norm2, h2, b, mod, m32)
    c2 = ff(block.ff_context, block.norm2_context, c2, b, cmod, c32)
    cv = c2.view(b, text, d)
    return (cv.clip(-65504, 65504) if clip_fp16 and cv.dtype == torch.float16 else cv), h2.view(b, t, d)


def _kwargs_mask(attention_kwargs: dict[str, Any] | None, masked: bool) -> tuple[bool, torch.Tensor | None]:
    """Whether the fused path computes a call with the attention's keyword arguments ``attention_kwargs`` (none; or,
    with ``masked``, an ``attention_mask`` alone, which Bria FIBO's processors hand the attention as it is), and
    that mask."""
    if not attention_kwargs:
        return True, None
    if masked and set(attention_kwargs) == {"attention_mask"}:
        return True, attention_kwargs["attention_mask"]
    return False, None


def _single_forward(block: Any, unfused: Callable[..., Any], args: tuple[Any, ...],
                    single: Callable[..., torch.Tensor] | None = None, *, joint_rows: bool = False,
                    masked: bool = False) -> Any:
    """The fused forward of a FLUX.1-style single block (module docstring), ``single`` its computation;
    ``unfused(*args)`` is diffusers' own. ``joint_rows``: the block is handed the rows [text; image] already, no
    ``encoder_hidden_states`` (Bria FIBO's), and returns them; else it returns (text, image). ``masked``: an
    ``attention_mask`` in the keyword arguments is the attention's (``_kwargs_mask``)."""
    hidden_states, encoder_hidden_states, temb, image_rotary_emb, attention_kwargs = args
    norm, attn = block.norm, block.attn
    ok, mask = _kwargs_mask(attention_kwargs, masked)
    if (block.training or not ok or hidden_states.ndim != 3
            or (not joint_rows and (encoder_hidden_states is None or encoder_hidden_states.ndim != 3))
            or not like_rows(hidden_states, encoder_hidden_states, temb)
            or _hooked(norm) or _hooked(norm.norm) or _hooked(block.act_mlp) or _bypassed_hook(block.proj_mlp)
            or _bypassed_hook(block.proj_out) or not _flux_attention_ok(attn, joint=False)):
        return unfused(*args)
    x = hidden_states if joint_rows else torch.cat([encoder_hidden_states, hidden_states], dim=1)
    m = _modulation(norm, temb, x.shape[0], 3, x.shape[2])
    if m is None:
        return unfused(*args)
    y = (single or flux_single)(block, x, *m, image_rotary_emb, mask)   # (looked up per call: a test replaces it)
    if joint_rows:
        return y
    text = encoder_hidden_states.shape[1]
    return y[:, :text], y[:, text:]


def _double_forward(block: Any, unfused: Callable[..., Any], args: tuple[Any, ...],
                    double: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None, *,
                    masked: bool = False) -> Any:
    """The fused forward of a FLUX.1-style double block (module docstring), ``double`` its computation;
    ``unfused(*args)`` is diffusers' own. ``masked``: as ``_single_forward``'s."""
    hidden_states, encoder_hidden_states, temb, image_rotary_emb, attention_kwargs = args
    n1, n1c, attn = block.norm1, block.norm1_context, block.attn
    ok, mask = _kwargs_mask(attention_kwargs, masked)
    if (block.training or not ok or hidden_states.ndim != 3 or encoder_hidden_states.ndim != 3
            or not like_rows(hidden_states, encoder_hidden_states, temb)
            or any(_hooked(n) for n in (n1, n1.norm, n1c, n1c.norm, block.norm2, block.norm2_context))
            or not _flux_attention_ok(attn, joint=True)):
        return unfused(*args)
    b, _, d = hidden_states.shape
    m, mc = _modulation(n1, temb, b, 6, d), _modulation(n1c, temb, b, 6, d)
    if m is None or mc is None:
        return unfused(*args)
    return (double or flux_double)(block, hidden_states, encoder_hidden_states, m, mc, image_rotary_emb, mask)


def _adopt_checked(new: nn.Module, block: nn.Module) -> None:
    adopt_checked(new, block, _SINGLE.keys() | _DOUBLE.keys(),
                  lambda b: _single_supported(b) if type(b) in _SINGLE else _double_supported(b))


class FusedFluxSingleTransformerBlock(FluxSingleTransformerBlock):
    """A ``FluxSingleTransformerBlock`` running the fused packed kernels (module docstring)."""

    def __init__(self, block: FluxSingleTransformerBlock) -> None:
        _adopt_checked(self, block)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, temb: torch.Tensor,
                image_rotary_emb: Any = None, joint_attention_kwargs: dict[str, Any] | None = None) -> Any:
        return _single_forward(self, super().forward, (hidden_states, encoder_hidden_states, temb, image_rotary_emb,
                                                       joint_attention_kwargs))


class FusedFluxTransformerBlock(FluxTransformerBlock):
    """A ``FluxTransformerBlock`` running the fused packed kernels (module docstring)."""

    def __init__(self, block: FluxTransformerBlock) -> None:
        _adopt_checked(self, block)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, temb: torch.Tensor,
                image_rotary_emb: Any = None, joint_attention_kwargs: dict[str, Any] | None = None) -> Any:
        return _double_forward(self, super().forward, (hidden_states, encoder_hidden_states, temb, image_rotary_emb,
                                                       joint_attention_kwargs))


# the FLUX.1-style blocks and their fused classes: Flux's, and diffusers' copies (LongCat-Image's forwards are
# Flux's; Bria's name the attention's keyword arguments attention_kwargs)
_SINGLE: dict[type, type] = {FluxSingleTransformerBlock: FusedFluxSingleTransformerBlock}
_DOUBLE: dict[type, type] = {FluxTransformerBlock: FusedFluxTransformerBlock}
if _longcat is not None:
    class FusedLongCatImageSingleTransformerBlock(_longcat.LongCatImageSingleTransformerBlock):
        """LongCat-Image's single block (Flux's) running the fused packed kernels (module docstring)."""

        def __init__(self, block: nn.Module) -> None:
            _adopt_checked(self, block)

        def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, temb: torch.Tensor,
                    image_rotary_emb: Any = None, joint_attention_kwargs: dict[str, Any] | None = None) -> Any:
            return _single_forward(self, super().forward, (hidden_states, encoder_hidden_states, temb,
                                                           image_rotary_emb, joint_attention_kwargs))

    class FusedLongCatImageTransformerBlock(_longcat.LongCatImageTransformerBlock):
        """LongCat-Image's double block (Flux's) running the fused packed kernels (module docstring)."""

        def __init__(self, block: nn.Module) -> None:
            _adopt_checked(self, block)

        def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, temb: torch.Tensor,
                    image_rotary_emb: Any = None, joint_attention_kwargs: dict[str, Any] | None = None) -> Any:
            return _double_forward(self, super().forward, (hidden_states, encoder_hidden_states, temb,
                                                           image_rotary_emb, joint_attention_kwargs))

    _SINGLE[_longcat.LongCatImageSingleTransformerBlock] = FusedLongCatImageSingleTransformerBlock
    _DOUBLE[_longcat.LongCatImageTransformerBlock] = FusedLongCatImageTransformerBlock
if _bria is not None:
    class FusedBriaSingleTransformerBlock(_bria.BriaSingleTransformerBlock):
        """Bria's single block (Flux's) running the fused packed kernels (module docstring)."""

        def __init__(self, block: nn.Module) -> None:
            _adopt_checked(self, block)

        def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, temb: torch.Tensor,
                    image_rotary_emb: Any = None, attention_kwargs: dict[str, Any] | None = None) -> Any:
            return _single_forward(self, super().forward, (hidden_states, encoder_hidden_states, temb,
                                                           image_rotary_emb, attention_kwargs))

    class FusedBriaTransformerBlock(_bria.BriaTransformerBlock):
        """Bria's double block (Flux's) running the fused packed kernels (module docstring)."""

        def __init__(self, block: nn.Module) -> None:
            _adopt_checked(self, block)

        def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, temb: torch.Tensor,
                    image_rotary_emb: Any = None, attention_kwargs: dict[str, Any] | None = None) -> Any:
            return _double_forward(self, super().forward, (hidden_states, encoder_hidden_states, temb,
                                                           image_rotary_emb, attention_kwargs))

    _SINGLE[_bria.BriaSingleTransformerBlock] = FusedBriaSingleTransformerBlock
    _DOUBLE[_bria.BriaTransformerBlock] = FusedBriaTransformerBlock
if _fibo is not None:
    class FusedBriaFiboTransformerBlock(_fibo.BriaFiboTransformerBlock):
        """Bria FIBO's double block (Flux's) running the fused packed kernels (module docstring)."""

        def __init__(self, block: nn.Module) -> None:
            _adopt_checked(self, block)

        def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, temb: torch.Tensor,
                    image_rotary_emb: Any = None, joint_attention_kwargs: dict[str, Any] | None = None) -> Any:
            return _double_forward(self, super().forward, (hidden_states, encoder_hidden_states, temb,
                                                           image_rotary_emb, joint_attention_kwargs), masked=True)

    class FusedBriaFiboSingleTransformerBlock(_fibo.BriaFiboSingleTransformerBlock):
        """Bria FIBO's single block (Flux's on the joint [text; image] rows it is handed, the legacy ``Attention``
        running Bria's processor) running the fused packed kernels (module docstring)."""

        def __init__(self, block: nn.Module) -> None:
            _adopt_checked(self, block)

        def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor, image_rotary_emb: Any = None,
                    joint_attention_kwargs: dict[str, Any] | None = None) -> Any:
            def unfused(h: torch.Tensor, _: None, t: torch.Tensor, r: Any, k: dict[str, Any] | None) -> Any:
                return _fibo.BriaFiboSingleTransformerBlock.forward(self, h, t, r, k)

            return _single_forward(self, unfused, (hidden_states, None, temb, image_rotary_emb,
                                                   joint_attention_kwargs), joint_rows=True, masked=True)

    _SINGLE[_fibo.BriaFiboSingleTransformerBlock] = FusedBriaFiboSingleTransformerBlock
    _DOUBLE[_fibo.BriaFiboTransformerBlock] = FusedBriaFiboTransformerBlock


class FusedJointTransformerBlock(JointTransformerBlock):
    """SD3's ``JointTransformerBlock`` running the fused packed kernels (module docstring)."""

    def __init__(self, block: JointTransformerBlock) -> None:
        if not _sd3_supported(block):
            raise ValueError("FusedJointTransformerBlock handles JointTransformerBlock in the structure diffusers "
                             "builds for SD3 and SD3.5")
        _adopt(self, block)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, temb: torch.Tensor,
                joint_attention_kwargs: dict[str, Any] | None = None) -> Any:
        args = (hidden_states, encoder_hidden_states, temb, joint_attention_kwargs)
        n1, n1c, attn, attn2 = self.norm1, self.norm1_context, self.attn, self.attn2
        pre_only = self.context_pre_only
        norms = (n1, n1.norm, n1c, n1c.norm, self.norm2) + (() if pre_only else (self.norm2_context,))
        if (self.training or joint_attention_kwargs or self._chunk_size is not None or hidden_states.ndim != 3
                or encoder_hidden_states.ndim != 3 or not like_rows(hidden_states, encoder_hidden_states, temb)
                or any(_hooked(n) for n in norms)
                or not _joint_attention_ok(attn, joint=True)
                or (attn2 is not None and not _joint_attention_ok(attn2, joint=False))):
            return super().forward(*args)
        b, t, d = hidden_states.shape
        text = encoder_hidden_states.shape[1]
        h, c = hidden_states, encoder_hidden_states
        m = _modulation(n1, temb, b, 9 if attn2 is not None else 6, d)
        mc = _modulation(n1c, temb, b, 2, d, dtype=c.dtype) if pre_only else _modulation(n1c, temb, b, 6, d)
        if m is None or mc is None:
            return super().forward(*args)
        (mod, m32), (cmod, c32) = m, mc
        h2, c2 = h.reshape(b * t, d).contiguous(), c.reshape(b * text, d).contiguous()
        q, k, v = _project((attn.to_q, attn.to_k, attn.to_v), h2,
                           lambda: n1.norm(h) * (1 + mod[:, 1:2]) + mod[:, 0:1], ln_eps=n1.norm.eps, shift=m32[0],
                           scale=m32[1])
        cs, cc = (1, 0) if pre_only else (0, 1)   # AdaLayerNormContinuous: (scale, shift)
        eq, ek, ev = _project((attn.add_q_proj, attn.add_k_proj, attn.add_v_proj), c2,
                              lambda: n1c.norm(c) * (1 + cmod[:, cc:cc + 1]) + cmod[:, cs:cs + 1],
                              ln_eps=n1c.norm.eps, shift=c32[cs], scale=c32[cc])
        o = _joint_sdpa(attn, q, k, v, b, (eq, ek, ev))
        oh, oc = o[:, :t], o[:, t:]
        out = _gated_out(attn.to_out[0], oh, h2, b, m32[2], mod[:, 2:3])
        if attn2 is not None:   # its input: the block's input rows, its own modulation
            q2, k2, v2 = _project((attn2.to_q, attn2.to_k, attn2.to_v), h2,
                                  lambda: n1.norm(h) * (1 + mod[:, 7:8]) + mod[:, 6:7], ln_eps=n1.norm.eps,
                                  shift=m32[6], scale=m32[7])
            out = _gated_out(attn2.to_out[0], _joint_sdpa(attn2, q2, k2, v2, b), out, b, m32[8], mod[:, 8:9])
        h2 = _ff(self.ff, self.norm2, out, b, mod, m32)
        if pre_only:
            return None, h2.view(b, t, d)
        c2 = _gated_out(attn.to_add_out, oc, c2, b, c32[2], cmod[:, 2:3])
        c2 = _ff(self.ff_context, self.norm2_context, c2, b, cmod, c32)
        return c2.view(b, text, d), h2.view(b, t, d)   # (SD3 does not clip fp16, unlike Flux)


def fuse_mmdit_blocks(model: nn.Module) -> int:
    """Swap every Flux or SD3 block of ``model`` that the fused classes handle and that has a packed linear with
    quantized activations to fuse; returns how many were swapped."""
    def choose(mod: nn.Module) -> type | None:
        return (_SINGLE[type(mod)] if _single_supported(mod)
                else _DOUBLE[type(mod)] if _double_supported(mod)
                else FusedJointTransformerBlock if _sd3_supported(mod) else None)

    return swap_blocks(model, choose, _linears)


for _fused in (*_SINGLE.values(), *_DOUBLE.values(), FusedJointTransformerBlock):
    if _fibo is not None and _fused is FusedBriaFiboSingleTransformerBlock:
        register_block(_fused, 0)   # (returns the joint rows alone, as the original)
    else:
        register_block(_fused, 1, 0)   # each returns (encoder_hidden_states, hidden_states), as the originals
