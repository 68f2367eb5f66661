"""Fused Cosmos 3 layers for packed inference: the fusions of :mod:`.diffusers_fused` for diffusers'
``Cosmos3VLTextMoTDecoderLayer`` (the mixture-of-transformers layers of Cosmos 3 Omni).

Two packed token streams, each (N, D) rows without a batch dimension: understanding (text, causal) and generation
(vision, sound, action), each with its own weights, around RMSNorms with a weight (diffusers' ``RMSNorm``, or
Nemotron's for the ``relu2`` backbones) and no modulation:

    u_q, u_k, u_v = to_q/k/v ← Q(RMS(und)·w);   g_q, g_k, g_v = add_q/k/v_proj ← Q(RMS(gen)·w')
    und, gen = und + to_out(causal attention), gen + to_add_out(attention to both streams)
    x = x + down(Q(SiLU(gate ← Q(RMS(x)·w'')) ⊙ up ← Q(RMS(x)·w'')))          (relu2: relu(up ← ...)²), per stream

Where a linear is a :class:`TreeQLinear` with quantized activations, the RMSNorm and its weight run in its
``quantize_input`` kernel (RMSNorm without affine, then ``x̂·(1 + k)`` with ``k = w − 1``, one group; one call per
stream for its three projections, one per stream for its MLP's gate and up) and each MLP's residual in its
down_proj's epilogue; the activation runs between the kernels. The attention runs its processor
(``Cosmos3AttnProcessor``: the q/k norms, the rotary embedding, both attention pathways, the output projections)
on a view of the attention whose projections return the kernels' outputs (``HandedAttention``); the residuals are
diffusers' sums. Fused and unfused agree to float rounding, not bit for bit.

A layer is swapped only in the structure diffusers builds (its RMSNorms over the width, a
``Cosmos3PackedMoTAttention``, ``Cosmos3VLTextMLP``s) with a packed linear with quantized activations to fuse. It runs
diffusers' own forward in training mode, on rows that are not (N, D) with N > 0 or whose dtype is not the norms',
and when a norm or the attention carries a hook or another processor (or a projection the kernels run does); a
hooked MLP (or a part of it, or one whose first projections are not packed) runs as the module. The fused layer
takes its original's entry in ``TransformerBlockRegistry``. The state dict is unchanged.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from diffusers.models.transformers.transformer_cosmos3 import (Cosmos3AttnProcessor, Cosmos3NemotronRMSNorm,
                                                               Cosmos3PackedMoTAttention, Cosmos3VLTextMLP,
                                                               Cosmos3VLTextMoTDecoderLayer)

from .diffusers_fused import (_adopt, _bypassed_hook, _forward_wrapped, _hooked, _project, HandedAttention,
                              kernel_projections, register_block, runs_processor, swap_blocks, weighted_rms_norm)
from .linear import runs_packed_kernels as _quantized

_UND = ("to_q", "to_k", "to_v")
_GEN = ("add_q_proj", "add_k_proj", "add_v_proj")
_NORMS = ("input_layernorm", "input_layernorm_moe_gen", "post_attention_layernorm", "post_attention_layernorm_moe_gen")


def _norm_ok(norm: Any, d: int) -> bool:
    if type(norm) is Cosmos3NemotronRMSNorm:
        return tuple(norm.weight.shape) == (d,) and norm.eps > 0
    return weighted_rms_norm(norm, d)


def _mlp_ok(mlp: Any, d: int) -> bool:
    return (type(mlp) is Cosmos3VLTextMLP and mlp.hidden_act in ("silu", "relu2") and mlp.up_proj.in_features == d
            and mlp.down_proj.out_features == d
            and (mlp.hidden_act != "silu" or (mlp.gate_proj.in_features == d and type(mlp.act_fn) is nn.SiLU)))


def _supported(layer: nn.Module) -> bool:
    if type(layer) is not Cosmos3VLTextMoTDecoderLayer or _forward_wrapped(layer):
        return False
    d, attn = layer.hidden_size, layer.self_attn
    return (isinstance(d, int) and all(_norm_ok(getattr(layer, n), d) for n in _NORMS)
            and type(attn) is Cosmos3PackedMoTAttention and attn.hidden_size == d
            and _mlp_ok(layer.mlp, d) and _mlp_ok(layer.mlp_moe_gen, d))


def _linears(layer: nn.Module) -> list[nn.Module]:
    a = layer.self_attn
    out = [getattr(a, n) for n in _UND + _GEN]
    for mlp in (layer.mlp, layer.mlp_moe_gen):
        out += [mlp.up_proj, mlp.down_proj] + ([mlp.gate_proj] if mlp.hidden_act == "silu" else [])
    return out


def _rms(norm: nn.Module) -> dict[str, Any]:
    """The kernel's arguments for ``RMS(x)·w``: its RMSNorm mode, the weight as a modulate of one group."""
    k = (norm.weight.float() - 1.0).view(1, -1)
    return dict(ln_eps=norm.eps, shift=torch.zeros_like(k), scale=k.contiguous(), rms_norm=True)


def _mlp(mlp: Any, norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x + mlp(norm(x))`` for (N, D) rows: the norm in the first projections' kernel, the residual in down_proj's
    epilogue; as the module where it or a part is hooked or its first projections are not packed."""
    silu = mlp.hidden_act == "silu"
    first = (mlp.gate_proj, mlp.up_proj) if silu else (mlp.up_proj,)
    if (_hooked(mlp) or (silu and _hooked(mlp.act_fn)) or any(_hooked(m) or not _quantized(m) for m in first)
            or _bypassed_hook(mlp.down_proj)):
        return x + mlp(norm(x))
    ys = _project(first, x, lambda: x, **_rms(norm))   # (all packed: no float rows read)
    h = mlp.act_fn(ys[0]) * ys[1] if silu else torch.relu(ys[0]).square()
    down = mlp.down_proj
    if not _quantized(down):
        return x + down(h)
    return down.linear(down.quantize_input(h), out_dtype=x.dtype, residual=x)


class FusedCosmos3VLTextMoTDecoderLayer(Cosmos3VLTextMoTDecoderLayer):
    """A ``Cosmos3VLTextMoTDecoderLayer`` running the fused packed kernels (module docstring)."""

    def __init__(self, layer: Cosmos3VLTextMoTDecoderLayer) -> None:
        if type(layer) is not Cosmos3VLTextMoTDecoderLayer or not _supported(layer):
            raise ValueError("FusedCosmos3VLTextMoTDecoderLayer handles Cosmos3VLTextMoTDecoderLayer in the structure "
                             "diffusers builds")
        _adopt(self, layer)

    def forward(self, und_seq: torch.Tensor, gen_seq: torch.Tensor,
                rotary_emb: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor,
                                                                                                torch.Tensor]:
        attn = self.self_attn
        norms = [getattr(self, n) for n in _NORMS]
        if (self.training or und_seq.ndim != 2 or gen_seq.ndim != 2 or und_seq.shape[0] == 0
                or gen_seq.shape[0] == 0 or any(n.weight.dtype != und_seq.dtype for n in norms)
                or gen_seq.dtype != und_seq.dtype or any(_hooked(n) for n in norms)
                or not runs_processor(attn, (Cosmos3AttnProcessor,), _UND + _GEN)):
            return super().forward(und_seq, gen_seq, rotary_emb)
        und, gen = und_seq.contiguous(), gen_seq.contiguous()
        outputs: dict[str, torch.Tensor] = {}
        rows = []
        streams: tuple[tuple[torch.Tensor, tuple[str, ...], nn.Module], ...] = (
            (und, _UND, self.input_layernorm), (gen, _GEN, self.input_layernorm_moe_gen))
        for x, names, norm in streams:
            out, r = kernel_projections(attn, names, x, lambda: norm(x), **_rms(norm))
            outputs.update(out)
            rows.append(r)   # (x, or diffusers' rows where a float projection reads them)
        und_out, gen_out = attn.processor(HandedAttention(attn, outputs), rows[0], rows[1], rotary_emb)
        und, gen = und + und_out, gen + gen_out
        return _mlp(self.mlp, self.post_attention_layernorm, und), _mlp(self.mlp_moe_gen,
                                                                       self.post_attention_layernorm_moe_gen, gen)


def fuse_cosmos3_layers(model: nn.Module) -> int:
    """Swap every Cosmos 3 layer of ``model`` that :class:`FusedCosmos3VLTextMoTDecoderLayer` handles and that has a
    packed linear with quantized activations to fuse; returns how many were swapped."""
    return swap_blocks(model, lambda m: FusedCosmos3VLTextMoTDecoderLayer if _supported(m) else None, _linears)


register_block(FusedCosmos3VLTextMoTDecoderLayer, 1, 0)   # (returns (und, gen): diffusers' entry, gen the rows)
