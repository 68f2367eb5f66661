"""Fused LTX-2 blocks for packed inference: the fusions of :mod:`.diffusers_fused` for diffusers'
``LTX2VideoTransformerBlock`` (video and audio together).

Each stream's modulation is its block's table plus the timestep projection every block shares,
``mod = scale_shift_table + temb`` (six vectors, nine with the cross-attention adaLN; per sample, or per token where
the pipeline passes a timestep per token); ``RMS`` is an RMSNorm without affine:

    q, k, v = to_q/k/v ← Q(mod(RMS(h), shift_msa, scale_msa))                    (each stream's self-attention)
    h = h + gate_msa · to_out(attention(RMSNorm(q), RMSNorm(k), v, rotary))
    ... the text cross-attentions and the audio-to-video / video-to-audio attentions, as diffusers computes them
    h = h + gate_mlp · ff.net[2](Q(GELU_tanh(ff.net[0].proj(Q(mod(RMS(h), shift_mlp, scale_mlp))))))

Where a linear is a :class:`TreeQLinear` with quantized activations, RMSNorm + modulate + quantization run in its
``quantize_input`` kernel (the kernel's RMSNorm mode; one call shared by to_q/to_k/to_v with one activation spec and
no Monarch branch), GELU(tanh) and ``ff.net[2]``'s codes in ``ff.net[0].proj``'s epilogue, and the gated residuals
in ``to_out[0]``'s and ``ff.net[2]``'s: per block, in each stream, the self-attention and the feed-forward. The
cross-attentions (text, audio to video, video to audio) run diffusers' modules (their packed linears each
quantizing their own input), with diffusers' code around them. The self-attention is
``LTX2AudioVideoAttnProcessor``'s computation (RMSNorm across heads on q and k, the interleaved or split rotary
embedding, ``dispatch_attention_fn`` with the processor's backend; LTX-2.3's per-head gate, ``2 sigmoid`` of a
linear of the same input, which shares q/k/v's quantization). Fused and unfused agree to the model dtype's rounding
(the kernels normalize and modulate in float32, and add the gated residuals in float32), not bit for bit.

A block is swapped only in the structure diffusers builds (RMSNorms without affine before the self-attentions and
the feed-forwards, ``LTX2Attention`` self-attentions, ``FeedForward`` of [GELU, Dropout, linear]) with a packed
linear with quantized activations to fuse. It runs diffusers' own forward in training mode, in a block that
spatio-temporal guidance perturbs (the perturbed processor's other blocks fuse), with a self-attention mask, for a
``temb`` of another shape than
``(B, 1, P·D)`` or ``(B, S, P·D)``, and when a fused norm or self-attention carries a hook or another processor;
a feed-forward, ``to_out[0]`` or ``ff.net[0].proj`` that is hooked or not packed runs as diffusers computes it. The
fused forward follows diffusers 0.42's block (older ones stay unfused); diffusers' block registry has no entry for
the original, nor for the fused class. The state dict is unchanged.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_ltx2 import (LTX2Attention, LTX2AudioVideoAttnProcessor,
                                                            LTX2PerturbedAttnProcessor, LTX2VideoTransformerBlock,
                                                            apply_interleaved_rotary_emb, apply_split_rotary_emb)

from .diffusers_fused import (_adopt, _bypassed_hook, _feed_forward, _ff, _forward_wrapped, _gated_out, _hooked,
                              _project, Modulation, dispatch_kwargs, like_rows, modulation_chunk, per_token_modulation,
                              self_attention_ok, swap_blocks)
from .linear import runs_packed_kernels as _quantized
from .ltx_fused import _plain_rms_norm

STREAMS = (("norm1", "attn1", "norm3", "ff", "scale_shift_table"),
           ("audio_norm1", "audio_attn1", "audio_norm3", "audio_ff", "audio_scale_shift_table"))


def _stream_ok(block: nn.Module, names: tuple[str, ...]) -> bool:
    norm1, attn, norm3, ff, table = (getattr(block, n, None) for n in names)
    if not isinstance(table, torch.Tensor) or table.dim() != 2 or table.shape[0] not in (6, 9):
        return False
    d = table.shape[1]
    return (_plain_rms_norm(norm1, d) and _plain_rms_norm(norm3, d) and type(attn) is LTX2Attention
            and _feed_forward(ff, d))


def _supported(block: nn.Module) -> bool:
    if type(block) is not LTX2VideoTransformerBlock or _forward_wrapped(block):
        return False
    return all(_stream_ok(block, names) for names in STREAMS)


def _projections(attn: Any) -> tuple[nn.Module, ...]:
    """The linears that read a self-attention's input, in the processors' order: the per-head gate's where it has
    one, then q, k, v."""
    gate = attn.to_gate_logits
    return (() if gate is None else (gate,)) + (attn.to_q, attn.to_k, attn.to_v)


def _linears(block: nn.Module) -> list[nn.Module]:
    out = []
    for _, attn, _, ff, _ in STREAMS:
        a, f = getattr(block, attn), getattr(block, ff)
        out += [*_projections(a), a.to_out[0], f.net[0].proj, f.net[2]]
    return out


def _attention_ok(attn: Any) -> bool:
    """A self-attention the fused path computes: LTX-2's processor, or the perturbed one (spatio-temporal guidance)
    in a block that does not perturb (``forward`` checks), on unfused projections, nothing hooked it bypasses."""
    processors = (LTX2AudioVideoAttnProcessor, LTX2PerturbedAttnProcessor)
    ok = any(self_attention_ok(attn, LTX2Attention, p) for p in processors)
    return ok and (attn.to_gate_logits is None or not _bypassed_hook(attn.to_gate_logits))


def _modulation(table: torch.Tensor, temb: torch.Tensor, x: torch.Tensor) -> tuple[Modulation, torch.Tensor] | None:
    """A stream's modulation (``get_mod_params``'s): as diffusers uses it, a chunk function giving chunk i as
    ``(B, 1, D)`` or ``(B, S, D)``; as the kernels take chunks 0-5, float32 ``(6, B, D)`` (a group per sample) or
    ``(6, G, D)`` (a group per run of equal rows: a latent frame). None for another ``temb`` shape."""
    b, s, d = x.shape
    p = table.shape[0]
    if temb.ndim != 3 or temb.shape[0] != b or temb.shape[1] not in (1, s) or temb.shape[2] != p * d:
        return None
    params = (table[None, None].to(temb.device) + temb.reshape(b, temb.shape[1], p, d)).unbind(dim=2)

    def chunk(i: int) -> torch.Tensor:
        return params[i]

    return chunk, per_token_modulation(chunk, b * temb.shape[1], runs_of=temb)   # (chunk by chunk: no stacked copy)


def _self_attention(attn: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, b: int, rotary: Any,
                    gate: torch.Tensor | None = None) -> torch.Tensor:
    """``LTX2AudioVideoAttnProcessor``'s self-attention (no mask) of (B·S, inner) projection rows, as (B, S, inner),
    each head scaled by ``2 sigmoid(gate)`` where the attention has per-head gates (``gate``: their (B·S, heads)
    logits)."""
    query, key, value = (t.view(b, -1, t.shape[-1]) for t in (q, k, v))
    query, key = attn.norm_q(query), attn.norm_k(key)
    if rotary is not None:
        if attn.rope_type == "interleaved":
            query, key = apply_interleaved_rotary_emb(query, rotary), apply_interleaved_rotary_emb(key, rotary)
        elif attn.rope_type == "split":
            query, key = apply_split_rotary_emb(query, rotary), apply_split_rotary_emb(key, rotary)
    return gated_heads_attention(attn, query, key, value, b, gate)


def gated_heads_attention(attn: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, b: int,
                          gate: torch.Tensor | None) -> torch.Tensor:
    """The LTX-2 processors' attention (no mask) of normalized, rotated (B, S, inner) queries and keys, as
    (B, S, inner), each head scaled by ``2 sigmoid(gate)`` where the attention has per-head gates (``gate``: their
    (B·S, heads) logits)."""
    query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))
    o = dispatch_attention_fn(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                              **dispatch_kwargs(attn.processor))
    o = o.flatten(2, 3).to(query.dtype)
    if gate is not None:
        gates = 2.0 * torch.sigmoid(gate.view(b, -1, gate.shape[-1]))
        o = (o.unflatten(2, (attn.heads, -1)) * gates.unsqueeze(-1)).flatten(2, 3)
    return o


def attend(norm: nn.Module, attn: Any, x: torch.Tensor, mod: Modulation, m32: torch.Tensor,
           attention: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
           ) -> torch.Tensor:
    """``x + gate_msa · to_out(attention(q, k, v, gate))`` of a stream's self-attention on ``mod(norm(x))``, the
    kernels where the layers are packed: ``attention`` takes the (B·S, ·) projection rows (and the per-head gate's
    logits, or None) and returns (B, S, inner)."""
    b, s, d = x.shape
    x2 = x.reshape(b * s, d).contiguous()
    *gate, q, k, v = _project(_projections(attn), x2,
                              lambda: norm(x) * (1 + modulation_chunk(mod, 1)) + modulation_chunk(mod, 0),
                              ln_eps=norm.eps, shift=m32[0], scale=m32[1], rms_norm=True)
    o = attention(q, k, v, gate[0] if gate else None)
    proj = attn.to_out[0]
    if _quantized(proj):   # (not hooked: self_attention_ok)
        return _gated_out(proj, o, x2, b, m32[2]).view(b, s, d)
    return x + attn.to_out[1](proj(o)) * modulation_chunk(mod, 2)


def feed_forward(norm: nn.Module, ff: Any, x: torch.Tensor, mod: Modulation, m32: torch.Tensor) -> torch.Tensor:
    """``x + gate_mlp · ff(mod(norm(x)))`` of a stream, the kernels where the layers are packed."""
    b, s, d = x.shape
    if _quantized(ff.net[0].proj):   # (_ff runs a hooked or unpacked part as diffusers computes it)
        return _ff(ff, norm, x.reshape(b * s, d).contiguous(), b, mod, m32, rms_norm=True).view(b, s, d)
    return x + ff(norm(x) * (1 + modulation_chunk(mod, 4)) + modulation_chunk(mod, 3)) * modulation_chunk(mod, 5)


class FusedLTX2VideoTransformerBlock(LTX2VideoTransformerBlock):
    """An ``LTX2VideoTransformerBlock`` running the fused packed kernels (module docstring)."""

    def __init__(self, block: LTX2VideoTransformerBlock) -> None:
        if not _supported(block):
            raise ValueError("FusedLTX2VideoTransformerBlock handles LTX2VideoTransformerBlock in the structure "
                             "diffusers builds")
        _adopt(self, block)

    def forward(self, hidden_states: torch.Tensor, audio_hidden_states: torch.Tensor,
                encoder_hidden_states: torch.Tensor, audio_encoder_hidden_states: torch.Tensor, temb: torch.Tensor,
                temb_audio: torch.Tensor, temb_ca_scale_shift: torch.Tensor, temb_ca_audio_scale_shift: torch.Tensor,
                temb_ca_gate: torch.Tensor, temb_ca_audio_gate: torch.Tensor, temb_prompt: torch.Tensor | None = None,
                temb_prompt_audio: torch.Tensor | None = None, video_rotary_emb: Any = None,
                audio_rotary_emb: Any = None, ca_video_rotary_emb: Any = None, ca_audio_rotary_emb: Any = None,
                encoder_attention_mask: torch.Tensor | None = None,
                audio_encoder_attention_mask: torch.Tensor | None = None,
                self_attention_mask: torch.Tensor | None = None,
                audio_self_attention_mask: torch.Tensor | None = None,
                a2v_cross_attention_mask: torch.Tensor | None = None,
                v2a_cross_attention_mask: torch.Tensor | None = None, use_a2v_cross_attention: bool = True,
                use_v2a_cross_attention: bool = True, perturbation_mask: torch.Tensor | None = None,
                all_perturbed: bool | None = None) -> Any:
        call = dict(hidden_states=hidden_states, audio_hidden_states=audio_hidden_states,
                    encoder_hidden_states=encoder_hidden_states,
                    audio_encoder_hidden_states=audio_encoder_hidden_states, temb=temb, temb_audio=temb_audio,
                    temb_ca_scale_shift=temb_ca_scale_shift, temb_ca_audio_scale_shift=temb_ca_audio_scale_shift,
                    temb_ca_gate=temb_ca_gate, temb_ca_audio_gate=temb_ca_audio_gate, temb_prompt=temb_prompt,
                    temb_prompt_audio=temb_prompt_audio, video_rotary_emb=video_rotary_emb,
                    audio_rotary_emb=audio_rotary_emb, ca_video_rotary_emb=ca_video_rotary_emb,
                    ca_audio_rotary_emb=ca_audio_rotary_emb, encoder_attention_mask=encoder_attention_mask,
                    audio_encoder_attention_mask=audio_encoder_attention_mask,
                    self_attention_mask=self_attention_mask, audio_self_attention_mask=audio_self_attention_mask,
                    a2v_cross_attention_mask=a2v_cross_attention_mask,
                    v2a_cross_attention_mask=v2a_cross_attention_mask,
                    use_a2v_cross_attention=use_a2v_cross_attention,
                    use_v2a_cross_attention=use_v2a_cross_attention, perturbation_mask=perturbation_mask,
                    all_perturbed=all_perturbed)
        h, ah = hidden_states, audio_hidden_states
        perturbs = perturbation_mask is not None or (all_perturbed is not None and bool(all_perturbed))
        if (self.training or perturbs or h.ndim != 3 or ah.ndim != 3 or self_attention_mask is not None
                or not (like_rows(h, temb, batch=False) and like_rows(ah, temb_audio, batch=False))
                or audio_self_attention_mask is not None
                or any(_hooked(getattr(self, n)) for n in ("norm1", "audio_norm1", "norm3", "audio_norm3"))
                or not (_attention_ok(self.attn1) and _attention_ok(self.audio_attn1))):
            return super().forward(**call)
        video = _modulation(self.scale_shift_table, temb, h)
        audio = _modulation(self.audio_scale_shift_table, temb_audio, ah)
        if video is None or audio is None:
            return super().forward(**call)
        (vmod, v32), (amod, a32) = video, audio
        b = h.shape[0]
        h = attend(self.norm1, self.attn1, h, vmod, v32,
                   lambda q, k, v, gate: _self_attention(self.attn1, q, k, v, b, video_rotary_emb, gate))
        ah = attend(self.audio_norm1, self.audio_attn1, ah, amod, a32,
                    lambda q, k, v, gate: _self_attention(self.audio_attn1, q, k, v, b, audio_rotary_emb, gate))

        # the cross-attentions, as diffusers' block computes them
        if self.video_cross_attn_adaln:
            shift_text_q, scale_text_q, gate_text_q = (vmod(i) for i in (6, 7, 8))
        if self.audio_cross_attn_adaln:
            audio_shift_text_q, audio_scale_text_q, audio_gate_text_q = (amod(i) for i in (6, 7, 8))
        if self.cross_attn_adaln:
            if temb_prompt is not None:
                shift_text_kv, scale_text_kv = self.get_mod_params(self.prompt_scale_shift_table, temb_prompt, b)
            else:
                shift_text_kv, scale_text_kv = self.prompt_scale_shift_table[None, None].to(
                    device=h.device, dtype=h.dtype).unbind(dim=2)
            if temb_prompt_audio is not None:
                audio_shift_text_kv, audio_scale_text_kv = self.get_mod_params(
                    self.audio_prompt_scale_shift_table, temb_prompt_audio, b)
            else:
                audio_shift_text_kv, audio_scale_text_kv = self.audio_prompt_scale_shift_table[None, None].to(
                    device=ah.device, dtype=ah.dtype).unbind(dim=2)
        x = self.norm2(h)
        if self.video_cross_attn_adaln:
            x = x * (1 + scale_text_q) + shift_text_q
        context = encoder_hidden_states
        if self.cross_attn_adaln:
            context = context * (1 + scale_text_kv) + shift_text_kv
        o = self.attn2(x, encoder_hidden_states=context, query_rotary_emb=None, attention_mask=encoder_attention_mask)
        if self.video_cross_attn_adaln:
            o = o * gate_text_q
        h = h + o
        x = self.audio_norm2(ah)
        if self.audio_cross_attn_adaln:
            x = x * (1 + audio_scale_text_q) + audio_shift_text_q
        context = audio_encoder_hidden_states
        if self.cross_attn_adaln:
            context = context * (1 + audio_scale_text_kv) + audio_shift_text_kv
        o = self.audio_attn2(x, encoder_hidden_states=context, query_rotary_emb=None,
                             attention_mask=audio_encoder_attention_mask)
        if self.audio_cross_attn_adaln:
            o = o * audio_gate_text_q
        ah = ah + o
        if use_a2v_cross_attention or use_v2a_cross_attention:
            nv, na = self.audio_to_video_norm(h), self.video_to_audio_norm(ah)
            vt = self.video_a2v_cross_attn_scale_shift_table
            a2v_scale, a2v_shift, v2a_scale, v2a_shift = self.get_mod_params(vt[:4, :], temb_ca_scale_shift, b)
            a2v_gate = self.get_mod_params(vt[4:, :], temb_ca_gate, b)[0].squeeze(2)
            at = self.audio_a2v_cross_attn_scale_shift_table
            audio_a2v_scale, audio_a2v_shift, audio_v2a_scale, audio_v2a_shift = self.get_mod_params(
                at[:4, :], temb_ca_audio_scale_shift, b)
            v2a_gate = self.get_mod_params(at[4:, :], temb_ca_audio_gate, b)[0].squeeze(2)
            if use_a2v_cross_attention:
                q = nv * (1 + a2v_scale.squeeze(2)) + a2v_shift.squeeze(2)
                kv = na * (1 + audio_a2v_scale.squeeze(2)) + audio_a2v_shift.squeeze(2)
                o = self.audio_to_video_attn(q, encoder_hidden_states=kv, query_rotary_emb=ca_video_rotary_emb,
                                             key_rotary_emb=ca_audio_rotary_emb,
                                             attention_mask=a2v_cross_attention_mask)
                h = h + a2v_gate * o
            if use_v2a_cross_attention:
                kv = nv * (1 + v2a_scale.squeeze(2)) + v2a_shift.squeeze(2)
                q = na * (1 + audio_v2a_scale.squeeze(2)) + audio_v2a_shift.squeeze(2)
                o = self.video_to_audio_attn(q, encoder_hidden_states=kv, query_rotary_emb=ca_audio_rotary_emb,
                                             key_rotary_emb=ca_video_rotary_emb,
                                             attention_mask=v2a_cross_attention_mask)
                ah = ah + v2a_gate * o

        h = feed_forward(self.norm3, self.ff, h, vmod, v32)
        ah = feed_forward(self.audio_norm3, self.audio_ff, ah, amod, a32)
        return h, ah


def fuse_ltx2_blocks(model: nn.Module) -> int:
    """Swap every LTX-2 block of ``model`` that the fused class handles and that has a packed linear with quantized
    activations to fuse; returns how many were swapped."""
    return swap_blocks(model, lambda m: FusedLTX2VideoTransformerBlock if _supported(m) else None, _linears)

