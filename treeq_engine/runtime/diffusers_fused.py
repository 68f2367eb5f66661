"""Fused diffusers transformer blocks for packed inference: the fusions of :mod:`.dit_fused` for
``diffusers.models.attention.BasicTransformerBlock`` with ``norm_type`` ``"ada_norm_zero"`` (diffusers' DiT) and
``"ada_norm_single"`` (PixArt).

The block's six modulation vectors come from ``norm1.linear(silu(norm1.emb(t, y)))`` (adaLN-Zero) or from
``scale_shift_table + timestep`` (adaLN-single), in the order shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp,
gate_mlp; ``LN`` is ``norm1.norm`` / ``norm1``, then ``norm3`` / ``norm2`` (an affine, where it has one, folded
into the kernel's modulate: ``folded_affine``):

    h1 = x  + gate_msa · to_out(SDPA(to_q, to_k, to_v ← Q(mod(LN(x), shift_msa, scale_msa))))
    h2 = h1 + to_out'(SDPA(to_q' ← Q(h1), to_k', to_v' ← Q(encoder_hidden_states), encoder_attention_mask))
                                                                                    (PixArt's attn2; DiT has none)
    y  = h2 + gate_mlp · ff.net[2](Q(GELU_tanh(ff.net[0].proj(Q(mod(LN(h2), shift_mlp, scale_mlp))))))
                                                                            (GEGLU: hidden ⊙ GELU(gate) halves)

Where a linear is a :class:`TreeQLinear` with quantized activations:

- LayerNorm + modulate + quantization run in its ``quantize_input`` kernel; to_q, to_k and to_v share one such call
  when they read the same rows with the same activation spec and none carries a Monarch branch (a branch's stage 1
  runs in that call with the layer's own ``monarch_w1``, so a layer with a branch gets its own call);
- ``ff.net[0].proj`` applies GELU(tanh) in its epilogue (only for diffusers' ``"gelu-approximate"``; an exact GELU
  runs after it) and, where ``ff.net[2]`` is quantized without a branch, writes ``ff.net[2]``'s activation codes;
- ``to_out[0]`` and ``ff.net[2]`` add the (gated) residual ``x + gate ⊙ y`` in their epilogue (attn2's ungated).

Any other linear (16-bit, weight-only) gets the float rows diffusers would give it and the residual is added as
diffusers adds it, sub-step by sub-step. The fused residual rounds once less than diffusers' ``x + gate·y``, and
the kernels do LayerNorm + modulate in float32 where diffusers does them in the model's dtype: fused and unfused
agree to the model dtype's rounding, not bit for bit.

The attention is computed as ``AttnProcessor2_0`` computes it (SDPA with its default 1/√head_dim scale, which is
what that processor uses whatever ``Attention.scale`` says), only where that is the module's processor and the
module has nothing the fused path skips (norm_q/norm_k, group/spatial norm, norm_cross, residual_connection,
rescale_output_factor ≠ 1, a to_out other than [linear, Dropout]); otherwise the ``Attention`` module itself runs.
attn1 with an ``attention_mask`` also runs as the module (the pipelines pass none); attn2's
``encoder_attention_mask`` goes through ``Attention.prepare_attention_mask`` as in the processor.

:func:`fuse_diffusers_blocks` swaps only blocks whose whole structure this handles: norm types above,
``pos_embed is None``, ``only_cross_attention False``, no GLIGEN ``fuser``, LayerNorms (with or without affine),
adaLN-Zero with its own embedder (``norm1.emb``) and no attn2, a ``FeedForward`` of [GELU or GEGLU, Dropout, linear
(, Dropout)], and
at least one packed linear with quantized activations to fuse. A swapped block still runs diffusers' own forward
(the original computation) in training mode, with ``cross_attention_kwargs``, with a feed-forward chunk size, on
inputs other than (B, T, D) or with a conditioning batch other than B. :class:`FusedBasicTransformerBlock` is a
``BasicTransformerBlock`` holding the original block's children and attributes: the state dict is unchanged.

Hooks. The fused path calls the norms, attentions and feed-forward's modules by their parts, not as modules; where
one of them (or a linear the kernels run) carries a forward (pre-)hook or an instance-level ``forward`` wrapper
(diffusers' ``HookRegistry``: layer skip as SkipLayerGuidance applies it, PAB, FasterCache; accelerate), that
sub-step runs as the module (a norm: the whole block runs diffusers' forward), so the hook acts as on the unfused
model. A block whose own forward is wrapped when fusing is left as it is (the wrapper is bound to that object);
hooks registered on a fused block afterwards wrap the fused forward. diffusers' block-level hooks (FirstBlockCache,
MagCache, whole-block layer skip) find the fused class in ``TransformerBlockRegistry`` as ``BasicTransformerBlock``.
"""
from __future__ import annotations

import math
import weakref
from typing import Any, Callable, Container, Iterable, Sequence, TypeAlias

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.models.activations import GEGLU, GELU, SwiGLU
from diffusers.models.attention import BasicTransformerBlock, FeedForward
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from diffusers.models.normalization import AdaLayerNormZero, FP32LayerNorm, RMSNorm

from .linear import TreeQLinear
from .linear import runs_packed_kernels as _quantized


def _plain_layer_norm(norm: Any, dim: int) -> bool:
    """A LayerNorm the quantization kernel can do: no affine (the kernel has no weight/bias), over the last dim."""
    return (type(norm) is nn.LayerNorm and norm.weight is None and norm.bias is None
            and tuple(norm.normalized_shape) == (dim,))


def plain_fp32_layer_norm(norm: Any, dim: int) -> bool:
    """diffusers' ``FP32LayerNorm`` without affine over the last dim (Wan's, AuraFlow's): LayerNorm in float32, what
    the quantization kernel computes."""
    return (type(norm) is FP32LayerNorm and norm.weight is None and norm.bias is None
            and tuple(norm.normalized_shape) == (dim,))


def folded_affine(ln: nn.LayerNorm, shift: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's modulate arguments ``(shift, scale)``, float32 (G, D), for ``LN_w,b(x) · (1 + scale) + shift``
    (CogVideoX's, HunyuanDiT's LayerNorms with affine): the kernel normalizes without affine, so it takes
    ``LN(x) · (1 + (w(1 + scale) − 1)) + (b(1 + scale) + shift)``."""
    s, t = scale.float(), shift.float()
    if ln.bias is not None:
        t = ln.bias.float() * (1 + s) + t
    if ln.weight is not None:
        s = ln.weight.float() * (1 + s) - 1
    return t.contiguous(), s.contiguous()


def plain_attention(attn: Any, cross: bool | None = None, projections: Sequence[str] = ("to_k", "to_v")) -> bool:
    """``attn`` is diffusers' ``Attention`` with nothing around its projections and SDPA that a fused path would skip
    (no group or spatial norm, no norm of the text, no residual connection or output rescale), a cross-attention or
    not (``cross``; None: either), with ``projections``. The processor and hooks are checked on every forward."""
    return (type(attn) is Attention and (cross is None or attn.is_cross_attention == cross)
            and attn.group_norm is None and attn.spatial_norm is None and attn.norm_cross is None
            and not attn.residual_connection and attn.rescale_output_factor == 1.0
            and all(getattr(attn, n, None) is not None for n in projections))


def six_vector_table(block: nn.Module) -> int | None:
    """The width of an adaLN-single block's ``scale_shift_table`` of six vectors, (6, D) (PixArt's, Sana's,
    Allegro's), else None."""
    table = getattr(block, "scale_shift_table", None)
    if not isinstance(table, torch.Tensor) or table.dim() != 2 or table.shape[0] != 6:
        return None
    return int(table.shape[1])


def weighted_rms_norm(norm: Any, dim: int) -> bool:
    """An RMSNorm over the last dim with a weight and no bias: what the kernel's RMSNorm and factor compute."""
    return (type(norm) is RMSNorm and isinstance(norm.weight, torch.Tensor) and norm.bias is None
            and tuple(norm.dim) == (dim,) and norm.eps > 0)   # (the kernel takes a positive epsilon)


def rms_factor(norm: RMSNorm, scale: torch.Tensor | None, b: int, d: int,
               grouped: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's modulate arguments for ``RMS(x)·w·scale`` (Z-Image's and Lumina2's norms): shift 0 and ``k =
    w·scale − 1``, float32 (G, D) (G = B with a modulation, ``scale`` (B, 1, D) being diffusers' ``1 + s``; G = 1
    without one; per token, ``grouped``: the scale's (G, D) groups of runs of rows, ``per_token_modulation``'s)."""
    w = norm.weight.float()
    if grouped is not None:
        k = w * grouped - 1.0
    else:
        k = (w * scale.float().reshape(b, d) if scale is not None else w.reshape(1, d)) - 1.0
    k = k.contiguous()
    return torch.zeros_like(k), k


def sandwich_swiglu(x: torch.Tensor, norm_in: RMSNorm, norm_out: nn.Module, ff: nn.Module,
                    linears: tuple[nn.Module, nn.Module, nn.Module], act: Callable[[torch.Tensor], torch.Tensor],
                    scale: torch.Tensor | None, gate: torch.Tensor | None,
                    grouped: torch.Tensor | None = None) -> torch.Tensor:
    """``x + gate · norm_out(down(act(g) ⊙ u))`` with ``[g, u] = gate_proj, up ← RMSNorm_w(x)·scale`` for (B, S, D)
    rows ``x`` (Z-Image's and Lumina2's feed-forward between sandwich norms; ``linears`` = (gate_proj, up, down);
    ``scale`` diffusers' (B, 1, D) ``1 + s``, ``gate`` its tanh'd gate, None without a modulation; per token, both
    (B, S, D) and ``grouped`` the scale's groups for the kernel, ``rms_factor``'s): RMSNorm, its weight and the
    modulation in the quantization kernel shared by gate_proj and up; a hooked feed-forward (or a hooked packed
    gate_proj/up) runs as the module. ``norm_out`` needs whole rows: in torch."""
    b, s, d = x.shape
    gate_proj, up, down = linears

    def rows() -> torch.Tensor:
        return norm_in(x) if scale is None else norm_in(x) * scale

    if _hooked(ff) or _bypassed_hook(gate_proj) or _bypassed_hook(up):
        h = ff(rows())
    else:
        shift, k = rms_factor(norm_in, scale, b, d, grouped)
        g, u = _project((gate_proj, up), x.reshape(b * s, d).contiguous(), rows, ln_eps=norm_in.eps, shift=shift,
                        scale=k, rms_norm=True)
        h = down(act(g.view(b, s, -1)) * u.view(b, s, -1))   # (act on (B, S, ·), as diffusers calls it)
    y = norm_out(h)
    return x + (y if gate is None else gate * y)


def _forward_wrapped(mod: nn.Module) -> bool:
    """``mod.forward`` is replaced on the instance: a hook of diffusers' ``HookRegistry`` (layer skip, PAB, caches,
    group offloading) or accelerate's ``add_hook_to_module``. The bound method of ``mod``'s own class forward that
    removing such a hook leaves behind is no wrapper."""
    fwd = mod.__dict__.get("forward")
    # (ignore: mypy narrows mod through the `is` test to Any | None, so type(mod) to type[Any] | type[None])
    return fwd is not None and not (getattr(fwd, "__self__", None) is mod
                                    and getattr(fwd, "__func__", None) is type(mod).forward)  # type: ignore[union-attr]


def like_rows(rows: torch.Tensor, *conditioning: Any, dtype: bool = True, batch: bool = True) -> bool:
    """Each conditioning tensor given (a text, a temb, a modulation; None skipped) has, with ``batch``, the rows'
    batch (dim 0) and, with ``dtype``, their dtype. diffusers' forward broadcasts a batch of 1 and promotes another
    dtype (its output then in that dtype), which the fused paths do not: they leave such a call to it, checked before
    any layer runs (a fallback would run that layer again)."""
    b = rows.shape[0] if rows.ndim else None
    return all(t is None or (isinstance(t, torch.Tensor) and t.ndim > 0 and (not batch or t.shape[0] == b)
                             and (not dtype or t.dtype == rows.dtype)) for t in conditioning)


def _hooked(mod: nn.Module) -> bool:
    """``mod`` does something when called that the fused path, which bypasses ``mod(...)``, would skip. (Checked on
    every forward: it reads the instance dict, not attributes through ``nn.Module.__getattr__``.)"""
    d = mod.__dict__
    return bool(d.get("_forward_hooks") or d.get("_forward_pre_hooks")) or ("forward" in d and _forward_wrapped(mod))


def hooked_beyond_casting(mod: nn.Module) -> bool:
    """``_hooked``, save for diffusers' layerwise casting hook alone (its weights cast from the storage to the compute
    dtype around each call: the same computed per stream as on joined rows). For a module a fused path calls once
    per stream where diffusers calls it once on the streams' joined rows (CogVideoX's, CogView4's projections and
    feed-forward): any other hook could see the difference. (Checked on every forward.)"""
    if not _hooked(mod):
        return False
    d = mod.__dict__
    hooks = getattr(d.get("_diffusers_hook"), "hooks", None)
    return bool(d.get("_forward_hooks") or d.get("_forward_pre_hooks") or not isinstance(hooks, dict)
                or list(hooks) != ["layerwise_casting"]
                or type(hooks["layerwise_casting"]).__name__ != "LayerwiseCastingHook")


def _bypassed_hook(layer: nn.Module) -> bool:
    """A hook on a linear the fused path runs by its kernels (a packed layer with quantized activations); the others
    it calls as modules, hooks included (diffusers' layerwise casting hooks 16-bit linears)."""
    return _hooked(layer) and _quantized(layer)


def kernel_modulation(mod: torch.Tensor) -> torch.Tensor:
    """Modulation vectors ``(B, chunks, D)`` as diffusers uses them (``mod[:, i:i+1]``, for the float sub-steps) in
    the layout the kernels take: contiguous float32 ``(chunks, B, D)``, one conversion for all chunks."""
    return mod.transpose(0, 1).to(torch.float32, memory_format=torch.contiguous_format).contiguous()


# a modulation: per sample (B, chunks, D), or per token a function giving chunk i's (B, S, D) rows
Modulation: TypeAlias = "torch.Tensor | Callable[[int], torch.Tensor]"


def modulation_chunk(mod: Modulation, i: int) -> torch.Tensor:
    """Chunk ``i`` of a modulation as diffusers broadcasts it over a block's ``(B, S, D)`` rows: ``(B, 1, D)`` of a
    per-sample ``(B, chunks, D)``; a per-token modulation (LTX-Video's image to video, Wan 2.2 TI2V,
    Qwen-Image-Edit-2511) is a function giving chunk ``i`` as ``(B, S, D)``, computed when asked (the whole table in
    diffusers' layout is never held beside the kernels' copy)."""
    return mod[:, i:i + 1] if isinstance(mod, torch.Tensor) else mod(i)


def _capturing(device: torch.device) -> bool:
    """Nothing may depend on the device's values: a graph is being captured, a CUDA graph on ``device``'s current
    stream (it cannot wait for them, and replays with others) or ``torch.compile``'s (it has no shape or branch
    that depends on them)."""
    return torch.compiler.is_compiling() or (device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def run_length(tables: Iterable[torch.Tensor]) -> int:
    """The rows per group of per-token tables ``(B, S, ·)`` (taken one at a time: a generator computes each when
    asked): the largest ``r`` dividing S such that every table's rows change only at multiples of ``r`` in every
    sample (a frame's tokens share a timestep where the pipeline passes one per frame). Compared exactly, a slice
    of columns at a time (no (B, S, D) boolean at once); a table expanded along S (stride 0) changes nowhere.

    While a CUDA graph is captured or ``torch.compile`` traces (``_capturing``), 1: the runs are read off
    the values, and a graph replays with other values (another step's timesteps may merge or split the runs), so it
    takes a group per row, right for any values (the kernels then read a modulation row per token)."""
    s, changed = 0, None
    for t in tables:
        if changed is None:
            if _capturing(t.device):
                return 1
            s = t.shape[1]
            changed = torch.zeros(max(s - 1, 0), dtype=torch.bool, device=t.device)
        if t.stride(1) == 0:
            continue
        for c in range(0, t.shape[2], 256):
            part = t[..., c:c + 256]
            changed |= (part[:, 1:] != part[:, :-1]).any(-1).any(0)
    r = s
    for p in ([] if changed is None else torch.nonzero(changed).flatten().tolist()):
        r = math.gcd(r, p + 1)
    return max(r, 1)


# what a forward's blocks would each compute again from the very tensors the model hands them all (the kernels'
# modulation tables of FLUX.3's and Qwen-Image 2.1's per-token tables): computed once per forward. Keyed by the
# tensors' identities, held weakly and checked alive and unmodified, so an entry never answers for other tensors
# (CPython reuses a dead object's id) and dies with the forward's tensors. (A tensor made under torch.inference_mode
# has no version counter: one changed in place there would not be seen; models hand their blocks these tables
# unchanged.)
_ONCE: dict[tuple[int, ...], tuple[list[weakref.ref], list[int | None], Any]] = {}


def _versions(tensors: Sequence[torch.Tensor]) -> list[int | None]:
    return [None if t.is_inference() else t._version for t in tensors]


def _drop_dead(key: tuple[int, ...]) -> None:
    """Drop ``_ONCE``'s entry under ``key`` if a tensor it was computed from has died (not one that a new tensor at
    a reused address has taken since)."""
    hit = _ONCE.get(key)
    if hit is not None and any(r() is None for r in hit[0]):
        _ONCE.pop(key, None)


def once_per_forward(tensors: Sequence[torch.Tensor], compute: Callable[[], Any]) -> Any:
    """``compute()``, once for these very ``tensors`` as long as they live unmodified (see ``_ONCE``); the result is
    let go when the first of them dies (the forward's end), not held until the next forward. Under
    ``torch.compile``: computed each time (its graph holds the computation, no lookup)."""
    if torch.compiler.is_compiling():
        return compute()
    key = tuple(id(t) for t in tensors)
    hit = _ONCE.get(key)
    if hit is not None and all(r() is t for r, t in zip(hit[0], tensors)) and hit[1] == _versions(tensors):
        return hit[2]
    out = compute()
    _ONCE[key] = ([weakref.ref(t) for t in tensors], _versions(tensors), out)
    # (these very tensors changed in place: their finalizers are registered already; one per tensor, not per call)
    if hit is None or not all(r() is t for r, t in zip(hit[0], tensors)):
        for t in tensors:
            weakref.finalize(t, _drop_dead, key)
    return out


def per_token_modulation(chunk: Callable[[int], torch.Tensor], rows: int, chunks: int = 6, *,
                         runs_of: torch.Tensor | None = None, token_dim: int = 1) -> torch.Tensor:
    """The kernels' float32 ``(chunks, G, D)`` of a per-token modulation, from ``chunk(i)`` (``(B, S, D)`` as
    diffusers computes it, B·S = ``rows``): one group per run of rows that every chunk repeats (``run_length``; row
    m takes group ``m // (rows // G)``), so a timestep per frame costs a row per frame, not one per token. The runs
    are found on ``runs_of`` where given (``(B or 1, S, ·)``, what the chunks are computed from per token: the
    timestep embedding; its runs are the chunks' or finer; with ``token_dim=2``, ``(B, chunks, S, D)``), each chunk
    then computed once, and found once per forward for the embedding every block is handed (``once_per_forward``:
    Wan's, SkyReels-V2's, LTX-Video's, LTX-2's, Helios'); else on the chunks themselves, each computed twice. Never
    all held at once."""
    first = chunk(0)
    b, s, d = first.shape
    if b * s != rows:
        raise ValueError(f"per_token_modulation: chunks of {tuple(first.shape)} for {rows} rows")
    if runs_of is not None:
        if token_dim not in (1, 2):
            raise ValueError(f"per_token_modulation: token_dim {token_dim}, not 1 or 2")
        tables = (lambda: runs_of.unbind(1)) if token_dim == 2 else (lambda: [runs_of.reshape(*runs_of.shape[:2], -1)])
        r = once_per_forward([runs_of], lambda: run_length(tables()))
    else:
        r = run_length(first if i == 0 else chunk(i) for i in range(chunks))
    m32 = torch.empty(chunks, b * (s // r), d, dtype=torch.float32, device=first.device)
    for i in range(chunks):
        m32[i] = (first if i == 0 else chunk(i))[:, ::r].reshape(-1, d)
    return m32


def plain_out(attn: Any) -> nn.Module | None:
    """``attn``'s output linear where its ``to_out`` is [linear, Dropout] as diffusers builds it and neither the
    attention nor the Dropout carries a hook (the fused path skips both calls), else None."""
    out = attn._modules.get("to_out")
    if (out is None or len(out) != 2 or type(out._modules.get("1")) is not nn.Dropout or _hooked(attn)
            or _hooked(out._modules["1"])):
        return None
    return out._modules["0"]


def joint_attention_ok(attn: Any, processor: type, projections: Sequence[str]) -> bool:
    """``attn`` computes what a fused double-stream block computes (checked on every forward): ``processor`` exactly
    (the separate projections it reads, not a fused one), no hook on it, ``to_out`` as [linear, Dropout] with
    ``to_add_out`` and ``projections`` present, no hook on a projection the kernels run."""
    if type(attn.processor) is not processor:
        return False
    m, out = attn._modules, plain_out(attn)
    if out is None or m.get("to_add_out") is None or any(m.get(n) is None for n in projections):
        return False
    return not any(_bypassed_hook(m[n]) for n in tuple(projections) + ("to_add_out",)) and not _bypassed_hook(out)


def self_attention_ok(attn: Any, kind: type[Any], processor: type[Any]) -> bool:
    """A self-attention ``attn`` computes what a fused block computes with it (Wan's, LTX-Video's): an attention of
    class ``kind`` running ``processor`` exactly on unfused projections, ``to_out`` as [linear, Dropout], no hook on
    it or on a projection the kernels run. (Checked on every forward.)"""
    if type(attn) is not kind or type(attn.processor) is not processor:
        return False
    refuse_fused_projections(attn, ("to_q", "to_k", "to_v"))   # (a dense copy of packed layers: an error)
    if getattr(attn, "fused_projections", False):
        return False
    m, out = attn._modules, plain_out(attn)
    return out is not None and not any(_bypassed_hook(m[n]) for n in ("to_q", "to_k", "to_v")) \
        and not _bypassed_hook(out)


def runs_processor(attn: Any, processors: tuple[type, ...],
                   projections: Sequence[str] = ("to_q", "to_k", "to_v")) -> bool:
    """``attn`` computes what a fused path computes with it or hands it to: one of ``processors`` exactly, no hook on
    it, none on a projection the kernels run in its place (``projections``). (Checked on every forward.)"""
    m = attn._modules   # (checked on every forward: nn.Module.__getattr__ costs ~1 µs a name)
    return (type(attn.processor) in processors and not _hooked(attn)
            and not any(_bypassed_hook(m[n]) for n in projections))


def dispatch_kwargs(proc: Any) -> dict[str, Any]:
    """What a diffusers processor passes ``dispatch_attention_fn`` besides the tensors: its backend, and its context
    parallel configuration where this diffusers has one (0.36 added it)."""
    kw = {"backend": getattr(proc, "_attention_backend", None)}
    if hasattr(proc, "_parallel_config"):
        kw["parallel_config"] = proc._parallel_config
    return kw


def refuse_fused_projections(attn: Any, names: Sequence[str]) -> None:
    """diffusers' ``fuse_qkv_projections`` builds one dense linear from the projections' ``weight``, which a packed
    layer answers dequantized: after ``quantize`` the attention would run that float copy, silently unquantized."""
    if getattr(attn, "fused_projections", False) and any(isinstance(attn._modules.get(n), TreeQLinear)
                                                           for n in names):
        raise RuntimeError("fused_projections is set on an attention with packed projections: its dense fused "
                           "projection would run unquantized; leave the projections unfused (fused_projections "
                           "False, as quantize left them)")


def _sdpa_attention(attn: Attention) -> bool:
    """``attn`` computes what the fused path computes: AttnProcessor2_0 with nothing around the plain SDPA, and no
    hook on it or a projection the kernels run (diffusers' layer skip / PAB / FasterCache hook the Attention module).
    Checked on every forward, so submodules are read from ``_modules`` (``nn.Module.__getattr__`` costs ~1 µs)."""
    m = attn._modules
    to_out = m.get("to_out")
    out = None if to_out is None else to_out._modules
    return (type(attn.processor) is AttnProcessor2_0
            and attn.norm_q is None and attn.norm_k is None and attn.group_norm is None and attn.spatial_norm is None
            and attn.norm_cross is None and not attn.residual_connection and attn.rescale_output_factor == 1.0
            and out is not None and len(out) == 2 and type(out.get("1")) is nn.Dropout and not _hooked(out["1"])
            and not (_hooked(attn) or _bypassed_hook(m["to_q"]) or _bypassed_hook(m["to_k"])
                     or _bypassed_hook(m["to_v"]) or _bypassed_hook(out["0"])))


def _feed_forward(ff: Any, dim: int, geglu: bool = False) -> bool:
    """diffusers' ``FeedForward`` of [GELU (with ``geglu`` also GEGLU), Dropout, linear (, Dropout)] of width
    ``dim``, what ``_ff`` computes."""
    net: Any = getattr(ff, "net", None)   # (read only once ff is a FeedForward, which has one)
    return (type(ff) is FeedForward and len(net) in (3, 4) and (type(net[0]) is GELU or geglu and type(net[0]) is GEGLU)
            and type(net[1]) is nn.Dropout and all(type(m) is nn.Dropout for m in net[3:])
            and getattr(net[0].proj, "in_features", None) == dim and getattr(net[2], "out_features", None) == dim)


def swiglu_feed_forward(ff: Any, dim: int) -> bool:
    """diffusers' ``FeedForward(activation_fn="swiglu")`` of width ``dim``: [SwiGLU, Dropout, linear]."""
    net: Any = getattr(ff, "net", None)
    return (type(ff) is FeedForward and len(net) == 3 and type(net[0]) is SwiGLU and type(net[1]) is nn.Dropout
            and getattr(net[0].proj, "in_features", None) == dim and getattr(net[2], "out_features", None) == dim)


def _supported(block: nn.Module) -> bool:
    """Every part of ``block`` is one :class:`FusedBasicTransformerBlock` computes (see the module docstring)."""
    if type(block) is not BasicTransformerBlock or block.pos_embed is not None or block.only_cross_attention:
        return False
    if _forward_wrapped(block) or getattr(getattr(block, "_diffusers_hook", None), "hooks", None):
        return False   # its hook wraps this object's forward: a swapped-in block would run the old one's, unfused
    if hasattr(block, "fuser") or not _feed_forward(block.ff, block.dim, geglu=True):
        return False
    for attn in (block.attn1, block.attn2):   # the projections the fused path reads (attn2 may be absent)
        if attn is not None and not (isinstance(attn, Attention) and attn.to_k is not None
                                     and attn.to_v is not None and attn.to_out is not None):
            return False
    d = block.dim
    if block.norm_type == "ada_norm_zero":
        n1 = block.norm1
        return (type(n1) is AdaLayerNormZero and n1.emb is not None and _layer_norm(n1.norm, d)
                and _layer_norm(block.norm3, d) and block.attn2 is None)
    if block.norm_type == "ada_norm_single":
        return _layer_norm(block.norm1, d) and _layer_norm(block.norm2, d)
    return False


def _layer_norm(norm: Any, dim: int) -> bool:
    """A LayerNorm over the last dim, with or without affine (the kernel takes an affine folded into its modulate,
    ``folded_affine``)."""
    return type(norm) is nn.LayerNorm and tuple(norm.normalized_shape) == (dim,) and norm.eps > 0


def _fusable_linears(block: nn.Module) -> list[nn.Module]:
    attns = [a for a in (block.attn1, block.attn2) if a is not None]
    return ([m for a in attns for m in (a.to_q, a.to_k, a.to_v, a.to_out[0])]
            + [block.ff.net[0].proj, block.ff.net[2]])


class HandedAttention:
    """An attention as its processor sees it, whose named projections return the given outputs: the processor runs
    as diffusers runs it (its norms, rotary embedding, caches, attention and output projection), on the kernels'
    projections (Qwen-Image 2.1's, Helios'). Nothing on the attention changes (calls in other threads see it as it
    is); everything else is the attention's own."""

    def __init__(self, attn: nn.Module, outputs: dict[str, torch.Tensor]) -> None:
        self._attn, self._outputs = attn, outputs

    def __getattr__(self, name: str) -> Any:
        if name in self._outputs:
            out = self._outputs[name]
            return lambda *args, **kwargs: out
        return getattr(self._attn, name)


def kernel_projections(attn: nn.Module, names: Sequence[str], x: torch.Tensor, float_rows: Callable[[], torch.Tensor],
                       **kernel: Any) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The projections ``names`` of ``attn`` that run the kernels, computed from the rows ``x`` (…, D) by the
    quantization kernel (``kernel``: ``_project``'s norm and modulation arguments), by name, each (…, N); and the rows
    to call the processor with (``x``, or diffusers' rows ``float_rows()`` where a float projection reads them, as the
    processor calls it)."""
    packed = [n for n in names if _quantized(getattr(attn, n))]
    outs = _project([getattr(attn, n) for n in packed], x.reshape(-1, x.shape[-1]).contiguous(), lambda: x, **kernel)
    rows = x if len(packed) == len(names) else float_rows()
    return {n: y.view(*x.shape[:-1], -1) for n, y in zip(packed, outs)}, rows


def hand_projections(attn: nn.Module, names: Sequence[str], x: torch.Tensor, float_rows: Callable[[], torch.Tensor],
                     **kernel: Any) -> tuple[HandedAttention, torch.Tensor]:
    """``kernel_projections`` handed to the processor: the view of ``attn`` whose projections return them, and the
    rows to call the processor with."""
    outputs, rows = kernel_projections(attn, names, x, float_rows, **kernel)
    return HandedAttention(attn, outputs), rows


def _project(layers: Sequence[nn.Module], x2: torch.Tensor, float_rows: Callable[[], torch.Tensor], *,
             ln_eps: float | None = None, shift: torch.Tensor | None = None, scale: torch.Tensor | None = None,
             gelu: Sequence[bool] = (), act: nn.Module | None = None, rms_norm: bool = False) -> list[torch.Tensor]:
    """Each layer applied to ``pre(x2)`` (optional LayerNorm, or RMSNorm with ``rms_norm``, + modulate), as (M, N)
    rows in ``x2``'s dtype.

    A quantized layer quantizes ``x2`` in the kernel that does ``pre``; quantized layers without a branch share
    one such call per activation spec (the codes depend only on the rows and the spec), a branch's stage 1 needs
    the layer's own call. Other layers read the float rows ``float_rows()`` (diffusers' own computation, once).
    The layers flagged in ``gelu`` are followed by GELU(tanh): in the epilogue when they run the kernels, else by
    the module ``act``."""
    flags = list(gelu) + [False] * (len(layers) - len(gelu))
    shared: dict = {}
    rows = None
    out = []
    for layer, g in zip(layers, flags):
        if _quantized(layer):
            if layer.monarch_w1 is None and layer.act_spec in shared:
                a = shared[layer.act_spec]
            else:
                a = layer.quantize_input(x2, ln_eps=ln_eps, shift=shift, scale=scale, rms_norm=rms_norm)
                if layer.monarch_w1 is None:
                    shared[layer.act_spec] = a
            out.append(layer.linear(a, gelu=g, out_dtype=x2.dtype))
        else:
            if rows is None:
                rows = float_rows()
            y = layer(rows)
            if g:
                assert act is not None   # (a caller flagging GELU passes the module diffusers runs)
                y = act(y)
            out.append(y.reshape(-1, y.shape[-1]))
    return out


def _sdpa(attn: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: int,
          mask: torch.Tensor | None) -> torch.Tensor:
    """AttnProcessor2_0's attention of (B·T, inner) projections, returned as (B·T, inner) rows."""
    heads = attn.heads
    head_dim = k.shape[-1] // heads   # the processor derives it from the key's width
    if mask is not None:
        mask = attn.prepare_attention_mask(mask, k.shape[0] // batch, batch)
        mask = mask.view(batch, heads, -1, mask.shape[-1])
    q4, k4, v4 = (t.view(batch, -1, heads, head_dim).transpose(1, 2) for t in (q, k, v))
    o = F.scaled_dot_product_attention(q4, k4, v4, attn_mask=mask, dropout_p=0.0, is_causal=False)
    return o.transpose(1, 2).reshape(-1, heads * head_dim).to(q.dtype).contiguous()


def _ff(ff: Any, ln: nn.Module, x2: torch.Tensor, b: int, mod: Modulation, m32: torch.Tensor, *,
        rms_norm: bool = False, fp32_rows: bool | None = None) -> torch.Tensor:
    """``x + gate_mlp · ff(mod(LN(x), shift_mlp, scale_mlp))`` as (M, D) rows of ``x2`` (``rms_norm``: ``ln`` is an
    RMSNorm without affine, which the kernel computes in its RMSNorm mode), with the modulation's chunks 3, 4, 5
    (``mod`` (B, ≥6, D) as diffusers uses them, or per token a chunk function (``modulation_chunk``); ``m32``
    (≥6, G, D) float32 as the kernels take them, G = B, or B·S per token): LayerNorm + modulate in fc1's
    quantization, GELU(tanh) and fc2's codes in fc1's epilogue, the gated residual in fc2's. A hook on the
    FeedForward (diffusers' layer skip) or on a part the kernels run: the module runs, hooks and all. (ff.net[1],
    and a final ff.net[3], are Dropout: the identity in eval.) ``mod`` may be float32 while the rows are 16-bit
    (Wan's modulation): the unfused parts compute as the model does, the rows the feed-forward reads in the rows'
    dtype, the gated sum in float32, the result in the rows' dtype. ``fp32_rows``: the float path normalizes float32
    rows and modulates in float32 (Wan's ``norm3(h.float())``; the default for an ``FP32LayerNorm``), else the rows
    in their dtype, the norm's output modulated in it (EasyAnimate's)."""
    d = x2.shape[-1]
    x = x2.view(b, x2.shape[0] // b if b else 0, d)
    gelu, fc1, fc2 = ff.net[0], ff.net[0].proj, ff.net[2]
    geglu = type(gelu) is GEGLU   # (its projection's halves: hidden ⊙ GELU(gate), the exact GELU)
    tanh = not geglu and gelu.approximate == "tanh"
    # (Wan's and Helios' float32 LayerNorm: diffusers hands it float32 rows, and keeps its float32 output)
    if fp32_rows is None:
        fp32_rows = isinstance(ln, FP32LayerNorm)
    normed = (lambda: ln(x.float())) if fp32_rows else (lambda: ln(x))
    if (_hooked(ff) or any(_hooked(m) for i, m in enumerate(ff.net) if i in (1, 3)) or (_hooked(gelu) or _hooked(fc1))
            and _quantized(fc1) or _bypassed_hook(fc2)):
        y = ff((normed() * (1 + modulation_chunk(mod, 4)) + modulation_chunk(mod, 3)).type_as(x))
        return (modulation_chunk(mod, 5) * y + x).to(x2.dtype).reshape(x2.shape)
    if _quantized(fc1):
        act = fc1.quantize_input(x2, ln_eps=ln.eps, shift=m32[3], scale=m32[4], rms_norm=rms_norm)
        if tanh and _quantized(fc2) and fc2.monarch_w1 is None:
            h = fc1.linear(act, gelu=True, out_spec=fc2.act_spec, out_dtype=x2.dtype)   # (a branch: float rows)
        elif tanh:
            h = fc1.linear(act, gelu=True, out_dtype=x2.dtype)
        elif geglu:
            hidden, gate = fc1.linear(act, out_dtype=x2.dtype).chunk(2, dim=-1)
            h = hidden * gelu.gelu(gate)
        else:
            h = gelu.gelu(fc1.linear(act, out_dtype=x2.dtype))
    else:
        h = gelu((normed() * (1 + modulation_chunk(mod, 4)) + modulation_chunk(mod, 3)).type_as(x)).reshape(
            x2.shape[0], -1)
    if _quantized(fc2):
        if isinstance(h, torch.Tensor):
            h = fc2.quantize_input(h.contiguous())
        return fc2.linear(h, out_dtype=x2.dtype, residual=x2, gate=m32[5])
    y = fc2(h.reshape(*x.shape[:2], h.shape[-1]))   # (on (B, S, ·), as diffusers calls it: a hook sees that shape)
    return (modulation_chunk(mod, 5) * y + x).to(x2.dtype).reshape(x2.shape)


def _gated_out(proj: nn.Module, o: torch.Tensor, x2: torch.Tensor, batch: int,
               gate32: torch.Tensor | None = None, gate: torch.Tensor | None = None) -> torch.Tensor:
    """``x2 + gate ⊙ proj(o)`` as (M, D) rows (ungated when ``gate`` is None; ``o`` rows or (B, T, ·)): in proj's
    epilogue where it is packed with quantized activations, else as diffusers adds it (an attention's to_out[1] is
    Dropout: the identity)."""
    if _quantized(proj):
        o2 = o.reshape(-1, o.shape[-1]).contiguous()
        return proj.linear(proj.quantize_input(o2), out_dtype=x2.dtype, residual=x2, gate=gate32)
    t = x2.shape[0] // batch if batch else 0
    y = proj(o.reshape(batch, t, o.shape[-1])).view(batch, t, x2.shape[-1])   # (as diffusers calls it: B, S, ·)
    if gate is not None:
        y = gate * y
    return (y + x2.view(y.shape)).reshape(x2.shape)


def _adopt(new: nn.Module, block: nn.Module) -> None:
    """Make ``new`` (a fused subclass instance, not built by its class's ``__init__``, which would build new
    layers) take over ``block``'s children, parameters, attributes and hooks (the block object itself leaves the
    model), but not what is bound to that object: the bound method a removed diffusers/accelerate hook leaves as
    ``forward`` (it would run the old block, unfused) and an empty diffusers HookRegistry (hooks registered through
    it would wrap the old block; a new one is made on demand)."""
    nn.Module.__init__(new)
    new.__dict__.update(vars(block))
    new.__dict__.pop("forward", None)
    new.__dict__.pop("_diffusers_hook", None)


def adopt_checked(new: nn.Module, block: nn.Module, originals: Container[type],
                  supported: Callable[[nn.Module], bool]) -> None:
    """``_adopt`` for a fused class that stands for one of several diffusers classes (copies of one block): ``block``
    must be of the class ``new``'s stands for (the first of ``originals`` in its MRO: a user's subclass of a fused
    class comes first), in the structure the fused forward handles (``supported``)."""
    base = next(c for c in type(new).__mro__ if c in originals)
    if type(block) is not base or not supported(block):
        raise ValueError(f"{type(new).__name__} handles {base.__module__}.{base.__name__} in the structure diffusers "
                         "builds")
    _adopt(new, block)


class FusedBasicTransformerBlock(BasicTransformerBlock):
    """A ``BasicTransformerBlock`` (ada_norm_zero / ada_norm_single) running the fused packed kernels; see the
    module docstring for what is fused and when it falls back to diffusers' forward."""

    def __init__(self, block: BasicTransformerBlock) -> None:
        if not _supported(block):
            raise ValueError("FusedBasicTransformerBlock handles BasicTransformerBlock with norm_type ada_norm_zero "
                             "or ada_norm_single in the structure diffusers' DiT and PixArt build")
        _adopt(self, block)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                encoder_hidden_states: torch.Tensor | None = None,
                encoder_attention_mask: torch.Tensor | None = None, timestep: torch.LongTensor | None = None,
                cross_attention_kwargs: dict[str, Any] | None = None, class_labels: torch.LongTensor | None = None,
                added_cond_kwargs: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        args = dict(hidden_states=hidden_states, attention_mask=attention_mask,
                    encoder_hidden_states=encoder_hidden_states, encoder_attention_mask=encoder_attention_mask,
                    timestep=timestep, cross_attention_kwargs=cross_attention_kwargs, class_labels=class_labels,
                    added_cond_kwargs=added_cond_kwargs)
        # dropout (training), processor kwargs and GLIGEN, chunked feed-forward: diffusers' own forward has them
        if self.training or cross_attention_kwargs or self._chunk_size is not None or hidden_states.ndim != 3 \
                or timestep is None or not like_rows(hidden_states, encoder_hidden_states, batch=False) \
                or timestep.is_floating_point() and timestep.dtype != hidden_states.dtype:
            return super().forward(**args)   # (another dtype: diffusers promotes the rows)
        x = hidden_states
        b, t, d = x.shape
        zero = self.norm_type == "ada_norm_zero"
        ln1, ln2 = (self.norm1.norm, self.norm3) if zero else (self.norm1, self.norm2)
        if _hooked(self.norm1) or _hooked(ln1) or _hooked(ln2):   # the fused path calls none of them as a module
            return super().forward(**args)
        if zero and not (like_rows(x, timestep, dtype=False) or class_labels is not None
                         and like_rows(x, class_labels, dtype=False)):
            return super().forward(**args)   # (a conditioning batch of 1, which diffusers broadcasts: before emb runs)
        if zero:
            emb = self.norm1.emb(timestep, class_labels, hidden_dtype=x.dtype)
            mod = self.norm1.linear(self.norm1.silu(emb))
            if mod.shape != (b, 6 * d):   # a broadcast conditioning batch: leave it to diffusers
                return super().forward(**args)
            mod = mod.view(b, 6, d)
        else:
            if timestep.numel() != b * 6 * d:
                return super().forward(**args)
            mod = self.scale_shift_table[None] + timestep.reshape(b, 6, -1)
        m32 = kernel_modulation(mod)
        affine = [(ln, i) for ln, i in ((ln1, 0), (ln2, 3)) if ln.weight is not None or ln.bias is not None]
        if affine:   # (a LayerNorm's affine, folded into the kernel's modulate; into a copy: at batch 1 in float32
            m32 = m32.clone()   # kernel_modulation returns mod itself, which the float sub-steps read)
            for ln, i in affine:
                m32[i], m32[i + 1] = folded_affine(ln, m32[i], m32[i + 1])
        x2 = x.reshape(b * t, d).contiguous()

        # 1. self-attention, gate_msa
        attn = self.attn1
        if attention_mask is None and _sdpa_attention(attn):
            q, k, v = _project((attn.to_q, attn.to_k, attn.to_v), x2,
                               lambda: ln1(x) * (1 + mod[:, 1:2]) + mod[:, 0:1], ln_eps=ln1.eps, shift=m32[0],
                               scale=m32[1])
            x2 = _gated_out(attn.to_out[0], _sdpa(attn, q, k, v, b, None), x2, b, m32[2], mod[:, 2:3])
        else:
            y = attn(ln1(x) * (1 + mod[:, 1:2]) + mod[:, 0:1], attention_mask=attention_mask)
            x2 = (mod[:, 2:3] * y + x).reshape(b * t, d)

        # 2. PixArt's cross-attention: no norm, ungated
        attn = self.attn2
        if attn is not None:
            x = x2.view(b, t, d)
            ctx = encoder_hidden_states if encoder_hidden_states is not None else x
            if _sdpa_attention(attn) and ctx.ndim == 3 and ctx.shape[0] == b:
                ctx2 = ctx.reshape(-1, ctx.shape[-1]).contiguous()
                q, = _project((attn.to_q,), x2, lambda: x)
                k, v = _project((attn.to_k, attn.to_v), ctx2, lambda: ctx)
                x2 = _gated_out(attn.to_out[0], _sdpa(attn, q, k, v, b, encoder_attention_mask), x2, b)
            else:
                y = attn(x, encoder_hidden_states=encoder_hidden_states, attention_mask=encoder_attention_mask)
                x2 = (y + x).reshape(b * t, d)

        # 3. feed-forward, gate_mlp
        return _ff(self.ff, ln2, x2, b, mod, m32).view(b, t, d)



def swap_blocks(model: nn.Module, choose: Callable[[nn.Module], type | None],
                linears: Callable[[nn.Module], Sequence[nn.Module]]) -> int:
    """Replace every block of ``model`` for which ``choose`` names a fused class and that has a packed linear with
    quantized activations among ``linears(block)`` by that class built from it; returns how many were swapped."""
    from ..nn.convert import _set_submodule

    swaps = [(name, cls) for name, mod in model.named_modules()
             if name and (cls := choose(mod)) is not None and any(_quantized(m) for m in linears(mod))]
    for name, cls in swaps:
        _set_submodule(model, name, cls(model.get_submodule(name)))
    return len(swaps)


def register_block(fused: type, hidden_index: int, encoder_index: int | None = None, **names: str) -> None:
    """diffusers' block-level hooks (FirstBlockCache, MagCache, layer skip of a whole block, as SkipLayerGuidance
    applies it) look a block's exact class up in ``TransformerBlockRegistry``: give a fused class the entry of its
    original (``type.__mro__[1]``: the same forward signature), with its outputs' positions and the argument names
    ``names`` (``hidden_states_argument_name``, ...) or else diffusers' entry's; and give the original the fused
    class's entry where diffusers has none (Sana's, Chroma's, SkyReels-V2's blocks, ...) or one that names other
    outputs (diffusers 0.42 says Bria's double block returns the hidden states first; it returns
    (encoder_hidden_states, hidden_states), as Flux's does): an unfused, a fused and a partly fused model take the
    same hooks, in whichever process a fused class is imported (unpickling a fused model imports it too). Fills
    diffusers' registry first, which imports every transformer diffusers knows (a second or two, once)."""
    registry = _block_registry()
    if registry is None:
        return
    from diffusers.hooks._helpers import TransformerBlockRegistry

    try:
        TransformerBlockRegistry._register()
    except ImportError:   # (a transformer diffusers' registration imports is missing: it registered what it could)
        pass
    original = fused.__mro__[1]
    meta = registry.get(original)
    _set_entry(registry, fused, hidden_index, encoder_index, meta, names)
    if meta is None or (meta.return_hidden_states_index, meta.return_encoder_hidden_states_index) != \
            (hidden_index, encoder_index):
        _set_entry(registry, original, hidden_index, encoder_index, meta, names)


def _block_registry() -> dict[type, Any] | None:
    try:
        from diffusers.hooks._helpers import TransformerBlockRegistry
    except ImportError:   # a diffusers without that registry has no hook that looks blocks up in it
        return None
    registry = getattr(TransformerBlockRegistry, "_registry", None)
    return registry if isinstance(registry, dict) and hasattr(TransformerBlockRegistry, "_register") else None


def _set_entry(registry: dict[type, Any], cls: type, hidden_index: int, encoder_index: int | None, like: Any,
               names: dict[str, str]) -> None:
    """``cls``'s entry: its outputs' positions, the forward's argument names ``names``, else ``like``'s (diffusers'
    entry for the original), else diffusers' defaults."""
    from diffusers.hooks._helpers import TransformerBlockMetadata

    fields = ("hidden_states_argument_name", "encoder_hidden_states_argument_name")
    kept = {k: getattr(like, k) for k in fields if like is not None and hasattr(like, k)}
    meta = TransformerBlockMetadata(return_hidden_states_index=hidden_index,
                                    return_encoder_hidden_states_index=encoder_index, **(kept | names))
    meta._cls = cls
    registry[cls] = meta


def fuse_diffusers_blocks(model: nn.Module) -> int:
    """Swap every ``BasicTransformerBlock`` of ``model`` that :class:`FusedBasicTransformerBlock` handles and that
    has a packed linear with quantized activations to fuse; returns how many were swapped."""
    return swap_blocks(model, lambda m: FusedBasicTransformerBlock if _supported(m) else None, _fusable_linears)


register_block(FusedBasicTransformerBlock, 0)   # (returns hidden_states alone)
