"""Fused Sana blocks for packed inference: the fusions of :mod:`.diffusers_fused` for diffusers'
``SanaTransformerBlock`` and Sana-Video's ``SanaVideoTransformerBlock`` (last paragraph).

The block's six modulation vectors are ``scale_shift_table + t6`` (adaLN-single, in the model's dtype); ``LN`` has
no affine; the feed-forward (GLUMBConv) runs on the latent grid (``height × width`` tokens):

    q, k, v = to_q/k/v ← Q(mod(LN(h), shift_msa, scale_msa))
    h = h + gate_msa · to_out(linear_attention(ReLU(q), ReLU(k), v))           (attn1: SanaLinearAttnProcessor2_0)
    h = h + attn2(h, captions, caption mask)                                    (cross-attention, as diffusers')
    u = SiLU(conv_inverted ← Q(mod(LN(h), shift_mlp, scale_mlp)))
    u, g = chunk(conv_depth(u))                                                 (depthwise 3×3, float)
    h = h + gate_mlp · conv_point ← Q(u · SiLU(g))

Where a layer is a packed one with quantized activations (``TreeQLinear``, the 1×1 convolutions
``TreeQPointwiseConv``), LayerNorm + modulate + quantization run in its ``quantize_input`` kernel (one call
shared by to_q/to_k/to_v with one activation spec and no Monarch branch; one for ``conv_inverted``, on the tokens'
channel rows), and the gated residual in ``to_out[0]``'s and ``conv_point``'s epilogues. The linear attention is
the processor's computation (ReLU kernels, float32 sums, its 1e-15 guard; ``norm_q``/``norm_k`` where the model
has them, Sana 1.5's RMSNorm; in float16 its output clipped to the format's range, as the processor does, so that
projection's residual is added after it rather than in its epilogue). The cross-attention runs as diffusers'
module (its packed linears each quantize their own input): its keys and values read the captions. Fused and
unfused agree to the model dtype's rounding (the kernels do LayerNorm + modulate and the gated residual in float32),
not bit for bit.

A block is swapped only in the structure diffusers builds (LayerNorms without affine, a table of six vectors, an
``Attention`` attn1, a ``GLUMBConv`` without its own norm or residual) with a packed layer with quantized
activations to fuse; its attn1 computes the fused path only with ``SanaLinearAttnProcessor2_0`` (checked per
forward). It runs diffusers' own forward in training mode, with a self-attention mask, without the latent grid, and
when a norm, the self-attention, the feed-forward itself or a packed 1×1 convolution of it carries a hook, or the
self-attention another processor; an unpacked projection or convolution, the depthwise convolution and the SiLU run
as diffusers calls them, hooks and all (diffusers' layerwise casting hooks the convolutions it leaves unpacked: the
block stays fused).
diffusers' block-level hooks (FirstBlockCache, whole-block layer skip) look blocks up in ``TransformerBlockRegistry``,
which has no entry for Sana's block in diffusers 0.42: the fused class gets one (the output is hidden_states alone),
so those hooks apply to a fused model (on an unfused block they raise, as on diffusers' own model). The state dict is
unchanged.

Sana-Video's block is Sana's with a rotary linear attention (``SanaLinearAttnProcessor3_0``: the rotated ReLU
queries and keys in the numerator, the unrotated ones in the normalizer), computed here as the processor computes
it, and a feed-forward (``GLUMBTempConv``) whose ``conv_point`` output goes through a temporal (3, 1) convolution
with its own residual before the gate, so conv_point has no epilogue and the gated residual is diffusers' sum. Its
timestep table is per sample, or per token (image to video: the conditioning frame's tokens at timestep 0): then a
modulation group per run of tokens that share a timestep (``per_token_modulation``). It runs diffusers' forward
without a rotary table or the latent grid, for a timestep batch, width or dtype other than the rows' (diffusers
broadcasts and promotes), and when a norm, the self-attention, the feed-forward or a packed 1×1 convolution of it
carries a hook, or the self-attention another processor (the temporal convolution, like the depthwise one, runs as
the module). diffusers 0.42 has no registry entry for it either: both classes get the fused one.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, SanaLinearAttnProcessor2_0
from diffusers.models.transformers.sana_transformer import GLUMBConv, SanaTransformerBlock

try:   # (Sana-Video's block: absent from older releases)
    from diffusers.models.transformers.transformer_sana_video import (GLUMBTempConv, SanaLinearAttnProcessor3_0,
                                                                      SanaVideoTransformerBlock)
except ImportError:
    SanaVideoTransformerBlock = None

from ..nn.pointwise import layer_dims
from .diffusers_fused import (_adopt, _bypassed_hook, _forward_wrapped, _gated_out, _hooked, _plain_layer_norm,
                              _project, kernel_modulation, Modulation, modulation_chunk, per_token_modulation,
                              register_block, self_attention_ok, six_vector_table, swap_blocks)
from .linear import runs_packed_kernels as _quantized


def _glumb_block(block: Any, kind: Any, ff_kind: Any) -> bool:
    """``block`` is of ``kind`` in the structure diffusers builds: LayerNorms without affine, a table of six vectors,
    an ``Attention`` attn1 and an attn2, a feed-forward of ``ff_kind`` without its own norm or residual (Sana's
    ``GLUMBConv``; Sana-Video's ``GLUMBTempConv`` with its temporal convolution)."""
    if kind is None or type(block) is not kind or _forward_wrapped(block):
        return False
    d = six_vector_table(block)
    ff = block.ff
    return (d is not None and _plain_layer_norm(block.norm1, d) and _plain_layer_norm(getattr(block, "norm2", None), d)
            and type(block.attn1) is Attention and getattr(block, "attn2", None) is not None
            and type(ff) is ff_kind and ff.norm_type is None and not ff.residual_connection
            and type(ff.nonlinearity) is nn.SiLU and type(ff.conv_depth) is nn.Conv2d
            and type(getattr(ff, "conv_temp", ff.conv_depth)) is nn.Conv2d
            and layer_dims(ff.conv_inverted)[0] == d and layer_dims(ff.conv_point)[1] == d)


def _sana_supported(block: nn.Module) -> bool:
    return _glumb_block(block, SanaTransformerBlock, GLUMBConv)


def _linears(block: nn.Module) -> list[nn.Module]:
    a = block.attn1
    return [a.to_q, a.to_k, a.to_v, a.to_out[0], block.ff.conv_inverted, block.ff.conv_point]


def _self_attention_ok(attn: Any) -> bool:
    """``attn`` computes what the fused path computes: the linear-attention processor, to_out of [layer, Dropout],
    no hook on it or on a projection the kernels run. (Checked on every forward.)"""
    if type(attn.processor) is not SanaLinearAttnProcessor2_0 or _hooked(attn):
        return False
    m = attn._modules
    out = m.get("to_out")
    if out is None or len(out) != 2 or type(out._modules.get("1")) is not nn.Dropout or _hooked(out._modules["1"]):
        return False
    return not any(_bypassed_hook(m[n]) for n in ("to_q", "to_k", "to_v")) and not _bypassed_hook(out._modules["0"])


def _ff_ok(ff: Any) -> bool:
    """No hook on what the fused path does not call as a module: the feed-forward itself, a packed 1×1 convolution.
    The depthwise (and temporal) convolution and the SiLU it calls as diffusers does, hooks and all (diffusers'
    layerwise casting hooks the convolutions it leaves unpacked)."""
    return not (_hooked(ff) or _bypassed_hook(ff.conv_inverted) or _bypassed_hook(ff.conv_point))


def _linear_attention(attn: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, b: int) -> torch.Tensor:
    """``SanaLinearAttnProcessor2_0``'s attention of (B·S, inner) projection rows, as (B, S, inner) in their dtype."""
    dtype = q.dtype
    query, key, value = (t.view(b, -1, t.shape[-1]) for t in (q, k, v))
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    query = query.transpose(1, 2).unflatten(1, (attn.heads, -1))
    key = key.transpose(1, 2).unflatten(1, (attn.heads, -1)).transpose(2, 3)
    value = value.transpose(1, 2).unflatten(1, (attn.heads, -1))
    query, key, value = F.relu(query).float(), F.relu(key).float(), value.float()
    value = F.pad(value, (0, 0, 0, 1), mode="constant", value=1.0)
    o = torch.matmul(torch.matmul(value, key), query)
    o = o[:, :, :-1] / (o[:, :, -1:] + 1e-15)
    return o.flatten(1, 2).transpose(1, 2).to(dtype)


def _glumbconv(ff: Any, norm: nn.Module, x2: torch.Tensor, b: int, hw: tuple[int, int], mod: torch.Tensor,
               m32: torch.Tensor) -> torch.Tensor:
    """``x + gate_mlp · GLUMBConv(mod(LN(x), shift_mlp, scale_mlp))`` as (M, D) rows of ``x2``: LayerNorm + modulate
    in conv_inverted's quantization, the gated residual in conv_point's epilogue; SiLU, the depthwise convolution
    and the gating as diffusers computes them."""
    d = x2.shape[-1]
    height, width = hw
    ci, cp = ff.conv_inverted, ff.conv_point
    if _quantized(ci):
        u = ci.linear(ci.quantize_input(x2, ln_eps=norm.eps, shift=m32[3], scale=m32[4]), out_dtype=x2.dtype)
        u = u.view(b, height, width, -1).permute(0, 3, 1, 2)   # (the channels-last rows as NCHW, as Sana's view)
    else:
        x = x2.view(b, -1, d)
        rows = (norm(x) * (1 + mod[:, 4:5]) + mod[:, 3:4]).to(x2.dtype)
        u = ci(rows.unflatten(1, (height, width)).permute(0, 3, 1, 2))
    u = ff.conv_depth(ff.nonlinearity(u))
    u, gate = torch.chunk(u, 2, dim=1)
    u = u * ff.nonlinearity(gate)
    if _quantized(cp):
        rows = u.permute(0, 2, 3, 1).reshape(x2.shape[0], -1).contiguous()
        return cp.linear(cp.quantize_input(rows), out_dtype=x2.dtype, residual=x2, gate=m32[5])
    y = cp(u).flatten(2, 3).permute(0, 2, 1)
    return (x2.view(b, -1, d) + mod[:, 5:6] * y).reshape(x2.shape)


class FusedSanaTransformerBlock(SanaTransformerBlock):
    """A ``SanaTransformerBlock`` running the fused packed kernels (module docstring)."""

    def __init__(self, block: SanaTransformerBlock) -> None:
        if not _sana_supported(block):
            raise ValueError("FusedSanaTransformerBlock handles SanaTransformerBlock in the structure diffusers builds")
        _adopt(self, block)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                encoder_hidden_states: torch.Tensor | None = None,
                encoder_attention_mask: torch.Tensor | None = None, timestep: torch.LongTensor | None = None,
                height: int | None = None, width: int | None = None) -> torch.Tensor:
        args = (hidden_states, attention_mask, encoder_hidden_states, encoder_attention_mask, timestep, height, width)
        h = hidden_states
        a1 = self.attn1
        if (self.training or attention_mask is not None or h.ndim != 3 or timestep is None or height is None
                or width is None or height * width != h.shape[1] or _hooked(self.norm1) or _hooked(self.norm2)
                or not _self_attention_ok(a1) or not _ff_ok(self.ff)):
            return super().forward(*args)
        b, s, d = h.shape
        if timestep.numel() != b * 6 * d:
            return super().forward(*args)
        mod = self.scale_shift_table[None] + timestep.reshape(b, 6, -1)   # (B, 6, D), as diffusers computes it
        m32 = kernel_modulation(mod)                                      # (6, B, D) float32: the kernels' layout
        h2 = h.reshape(b * s, d).contiguous()
        q, k, v = _project((a1.to_q, a1.to_k, a1.to_v), h2,
                           lambda: (self.norm1(h) * (1 + mod[:, 1:2]) + mod[:, 0:1]).to(h.dtype),
                           ln_eps=self.norm1.eps, shift=m32[0], scale=m32[1])
        o = _linear_attention(a1, q, k, v, b)
        proj = a1.to_out[0]
        if h.dtype == torch.float16:   # the processor clips its output to fp16's range before the gated residual
            o2 = o.reshape(b * s, -1).contiguous()
            y = proj.linear(proj.quantize_input(o2), out_dtype=h.dtype) if _quantized(proj) else proj(o2)
            h = h + mod[:, 2:3] * y.clip(-65504, 65504).view(b, s, d)
        else:
            h = _gated_out(proj, o, h2, b, m32[2], mod[:, 2:3]).view(b, s, d)
        h2 = (self.attn2(h, encoder_hidden_states=encoder_hidden_states, attention_mask=encoder_attention_mask)
              + h).reshape(b * s, d)
        return _glumbconv(self.ff, self.norm2, h2, b, (height, width), mod, m32).view(b, s, d)


def _video_supported(block: nn.Module) -> bool:
    return SanaVideoTransformerBlock is not None and _glumb_block(block, SanaVideoTransformerBlock, GLUMBTempConv)


def _rotated(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Sana-Video's rotary embedding of (B, S, H, head_dim) rows: interleaved pairs, as its processor rotates them."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2).type_as(x)


def _rotary_linear_attention(attn: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, b: int,
                             rotary: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """``SanaLinearAttnProcessor3_0``'s attention of (B·S, inner) projection rows, as (B, S, inner) in their dtype:
    ReLU kernels, the rotated queries and keys in the numerator, the unrotated ones in the normalizer."""
    dtype = q.dtype
    query, key, value = (t.view(b, -1, t.shape[-1]) for t in (q, k, v))
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))
    query, key = F.relu(query), F.relu(key)
    query_rotate, key_rotate = _rotated(query, *rotary), _rotated(key, *rotary)
    query, key, value = (t.permute(0, 2, 3, 1) for t in (query, key, value))
    query_rotate, key_rotate = (t.permute(0, 2, 3, 1).float() for t in (query_rotate, key_rotate))
    z = 1 / (key.sum(dim=-1, keepdim=True).transpose(-2, -1) @ query + 1e-15)
    o = torch.matmul(torch.matmul(value.float(), key_rotate.transpose(-1, -2)), query_rotate) * z
    return o.flatten(1, 2).transpose(1, 2).to(dtype)


def _glumbtempconv(ff: Any, norm: nn.Module, x2: torch.Tensor, b: int, grid: tuple[int, int, int], mod: Modulation,
                   m32: torch.Tensor) -> torch.Tensor:
    """``x + gate_mlp · GLUMBTempConv(mod(LN(x), shift_mlp, scale_mlp))`` as (M, D) rows of ``x2``: LayerNorm +
    modulate in conv_inverted's quantization; SiLU, the depthwise convolution, the gating, the temporal convolution
    and the gated residual as diffusers computes them (the temporal convolution's residual comes between
    conv_point and the gate: no epilogue for it)."""
    d = x2.shape[-1]
    frames, height, width = grid
    ci, cp = ff.conv_inverted, ff.conv_point
    x = x2.view(b, -1, d)
    if _quantized(ci):
        u = ci.linear(ci.quantize_input(x2, ln_eps=norm.eps, shift=m32[3], scale=m32[4]), out_dtype=x2.dtype)
        u = u.view(b * frames, height, width, -1).permute(0, 3, 1, 2)   # (the channels-last rows as NCHW)
    else:
        rows = norm(x) * (1 + modulation_chunk(mod, 4)) + modulation_chunk(mod, 3)
        u = ci(rows.reshape(b * frames, height, width, d).permute(0, 3, 1, 2))
    u = ff.conv_depth(ff.nonlinearity(u))
    u, gate = torch.chunk(u, 2, dim=1)
    u = u * ff.nonlinearity(gate)
    if _quantized(cp):
        y = cp.linear(cp.quantize_input(u.permute(0, 2, 3, 1).reshape(x2.shape[0], -1).contiguous()),
                      out_dtype=x2.dtype)
        yt = y.view(b, frames, height * width, d).permute(0, 3, 1, 2)
    else:
        yt = cp(u).view(b, frames, d, height * width).permute(0, 2, 1, 3)
    y = (yt + ff.conv_temp(yt)).permute(0, 2, 3, 1).reshape(b, -1, d)
    return (x + modulation_chunk(mod, 5) * y).reshape(x2.shape)


if SanaVideoTransformerBlock is not None:
    class FusedSanaVideoTransformerBlock(SanaVideoTransformerBlock):
        """A ``SanaVideoTransformerBlock`` running the fused packed kernels: Sana's fusions (module docstring) with
        Sana-Video's rotary linear attention (``SanaLinearAttnProcessor3_0``) and its feed-forward's temporal
        convolution, whose residual leaves ``conv_point`` without an epilogue; a timestep per token (image to video:
        the conditioning frame's tokens at 0) takes a modulation group per run of tokens that share one."""

        def __init__(self, block: nn.Module) -> None:
            if not _video_supported(block):
                raise ValueError("FusedSanaVideoTransformerBlock handles SanaVideoTransformerBlock in the structure "
                                 "diffusers builds")
            _adopt(self, block)

        def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    encoder_hidden_states: torch.Tensor | None = None,
                    encoder_attention_mask: torch.Tensor | None = None, timestep: torch.LongTensor | None = None,
                    frames: int | None = None, height: int | None = None, width: int | None = None,
                    rotary_emb: Any = None) -> torch.Tensor:
            args = (hidden_states, attention_mask, encoder_hidden_states, encoder_attention_mask, timestep, frames,
                    height, width, rotary_emb)
            h, a1 = hidden_states, self.attn1
            if not (isinstance(frames, int) and isinstance(height, int) and isinstance(width, int)):
                return super().forward(*args)
            grid = (frames, height, width)
            if (self.training or h.ndim != 3 or not isinstance(timestep, torch.Tensor) or timestep.ndim != 3
                    or frames * height * width != h.shape[1]
                    or not (isinstance(rotary_emb, tuple) and len(rotary_emb) == 2) or _hooked(self.norm1)
                    or _hooked(self.norm2) or not self_attention_ok(a1, Attention, SanaLinearAttnProcessor3_0)
                    or not _ff_ok(self.ff)):
                return super().forward(*args)
            b, s, d = h.shape
            table = self.scale_shift_table
            if timestep.shape[0] != b or timestep.shape[1] not in (1, s) or timestep.shape[2] != 6 * d \
                    or torch.promote_types(table.dtype, timestep.dtype) != h.dtype:
                return super().forward(*args)   # (diffusers broadcasts another batch, promotes another dtype)
            mod: Modulation
            if timestep.shape[1] == 1:
                sample = table[None] + timestep.view(b, 6, d)    # (B, 6, D), as diffusers computes it
                mod, m32 = sample, kernel_modulation(sample)   # (6, B, D) float32: the kernels' layout
            else:   # a timestep per token: (B, S, 6·D)

                def chunk(i: int) -> torch.Tensor:   # chunk i as diffusers computes it: (B, S, D)
                    return table[i] + timestep.view(b, s, 6, d)[:, :, i]

                mod = chunk
                m32 = per_token_modulation(chunk, b * s, runs_of=timestep)
            h2 = h.reshape(b * s, d).contiguous()
            q, k, v = _project((a1.to_q, a1.to_k, a1.to_v), h2,
                               lambda: (self.norm1(h) * (1 + modulation_chunk(mod, 1))
                                        + modulation_chunk(mod, 0)).to(h.dtype),
                               ln_eps=self.norm1.eps, shift=m32[0], scale=m32[1])
            o = _rotary_linear_attention(a1, q, k, v, b, rotary_emb)
            h = _gated_out(a1.to_out[0], o, h2, b, m32[2], modulation_chunk(mod, 2)).view(b, s, d)
            h2 = (self.attn2(h, encoder_hidden_states=encoder_hidden_states, attention_mask=encoder_attention_mask)
                  + h).reshape(b * s, d)
            return _glumbtempconv(self.ff, self.norm2, h2, b, grid, mod, m32).view(b, s, d)


def fuse_sana_blocks(model: nn.Module) -> int:
    """Swap every Sana and Sana-Video block of ``model`` that the fused classes handle and that has a packed layer
    with quantized activations to fuse; returns how many were swapped."""
    return swap_blocks(model, lambda m: FusedSanaTransformerBlock if _sana_supported(m)
                       else FusedSanaVideoTransformerBlock if _video_supported(m) else None, _linears)


register_block(FusedSanaTransformerBlock, 0)   # (returns hidden_states alone, as the original)
if SanaVideoTransformerBlock is not None:
    register_block(FusedSanaVideoTransformerBlock, 0)
