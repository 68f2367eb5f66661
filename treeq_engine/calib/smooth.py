"""SmoothQuant-style channel balancing, folded into the model so that runtime and kernels are unchanged.

A linear ``y = x·Wᵀ`` is rewritten ``y = (x/s)·(W·diag(s))ᵀ`` with, per input channel k,

    s_k = max|X_k|^α / max_n |W[n, k]|^(1−α)

which moves activation outliers (hard for a per-token quantizer) into the weight (easy for a per-channel one).
The division by ``s`` must cost nothing at run time, so it is folded into the op that produces ``x``: a *site*
is that producer plus every linear that reads ``x`` (all of them take ``W·diag(s)``, quantized or not, or the
model would change). The sites, where the fold is exact:

    our DiT (the facebookresearch block layout)
      attn.qkv        x = LN(h)·(1 + scale_msa) + shift_msa  ->  rows of adaLN_modulation.1 for shift/scale_msa
      mlp.fc1         x = LN(h)·(1 + scale_mlp) + shift_mlp  ->  rows of adaLN_modulation.1 for shift/scale_mlp
      attn.proj       x = softmax(q·kᵀ)·v                    ->  the v rows of attn.qkv (attention is linear in v)
    diffusers' BasicTransformerBlock (DiT: adaLN-Zero; PixArt: adaLN-single)
      attn1.to_q/k/v  as attn.qkv, into norm1.linear; one site, one ``s`` for the three  (adaLN-Zero only)
      ff.net.0.proj   as mlp.fc1, into norm1.linear                                        (adaLN-Zero only)
      attnN.to_out.0  as attn.proj, into attnN.to_v                          (self- and cross-attention)
    diffusers' MMDiT blocks (SD3's JointTransformerBlock, Flux's FluxTransformerBlock / FluxSingleTransformerBlock)
      attn.to_q/k/v            into norm1.linear's (shift, scale) of the attention; SD3.5's attn2.to_q/k/v into
                               its second pair (SD35AdaLayerNormZeroX, 9 chunks)
      ff.net.0.proj            into norm1.linear's (shift, scale) of the MLP
      attn.add_q/k/v_proj      into norm1_context.linear (AdaLayerNormZero; SD3's last block: the 2-chunk
                               AdaLayerNormContinuous, scale before shift)
      ff_context.net.0.proj    into norm1_context.linear's MLP pair
      Flux single block: proj_mlp and attn.to_q/k/v, one site (they read the one normalised sequence), into
                               norm.linear (AdaLayerNormZeroSingle, 3 chunks)
    Qwen-Image's QwenImageTransformerBlock (per stream a 6-chunk modulation linear, ordered as AdaLayerNormZero's)
      attn.to_q/k/v, attn.add_q/k/v_proj   into img_mod.1 / txt_mod.1, attention pair (chunks 0, 1)
      img_mlp.net.0.proj, txt_mlp.net.0.proj   into img_mod.1 / txt_mod.1, MLP pair (chunks 3, 4)
    Wan's WanTransformerBlock, Sana's SanaTransformerBlock and LTX-Video's LTXVideoTransformerBlock
      attnN.to_out.0           into attnN.to_v (Wan's image-to-video cross-attention: and add_v_proj, both values
                               are summed into its output; Sana's linear attention is linear in v too)
      Wan attn2.to_q           into norm2's affine weight and bias (cross_attn_norm)
      Sana ff.conv_point       into the first half of ff.conv_depth's channels: GLUMBConv computes
                               conv_depth(h)[:H]·SiLU(conv_depth(h)[H:]) and the depthwise conv keeps channels apart
    Z-Image's ZImageTransformerBlock (main blocks and refiners; RMSNorm·γ, then the modulation's 1 + scale)
      attention.to_q/k/v       into attention_norm1's weight γ
      attention.to_out.0       into attention.to_v
      feed_forward.w1/w3       into ffn_norm1's weight γ
      feed_forward.w2          into feed_forward.w3 (the SwiGLU's SiLU(w1·x) ⊙ w3·x is linear in w3's output)
    FLUX.2's Flux2TransformerBlock / Flux2SingleTransformerBlock
      ff(_context).linear_out  into the second half of linear_in's rows (SiLU(first half) ⊙ second half)
      attn.to_out (single)     into to_qkv_mlp_proj's v rows and its SwiGLU value rows (to_out reads the
                               attention's output joined with the SwiGLU's: one factor per channel, two ranges)

(``shift/s`` is a row scaling; ``(1 + scale)/s − 1`` a row scaling plus a bias change.) The second linear of an
MLP reads GELU's output, which nothing linear precedes, so it is left alone; so are PixArt's attn1 and ff inputs,
whose shift and scale add a timestep embedding shared by all blocks (no per-block weight can absorb ``1/s``), and
its cross-attention's to_k/to_v, which read the captions every block shares; Wan's and Sana's modulated inputs
are left alone for the same reason. The MMDiT and Qwen-Image blocks' attention outputs are not sites: their joint
attention mixes both streams' values, so one ``s`` would have to fold into two producers (to_v and add_v_proj)
and feed two consumers. The folded model computes the same function in floating point. Per site, ``α`` is chosen
from a grid — or no smoothing — by the calibrated output error of the site's planned linears on the FP model's
inputs (``calibrate_layer``; a tied group as one stacked linear, as PTQ calibrates it), so smoothing is applied
only where it measurably helps.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import torch
import torch.nn as nn

from ..models.diffusers_transformers import MMDIT_BLOCKS
from ..plan import QuantPlan
from .capture import CalibBatch, StageRunner

TARGETS = ("attn.qkv", "attn.proj", "mlp.fc1")   # our DiT's block linears
DIFFUSERS_TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "ff.net.0.proj", "attn1.to_out.0",
                     "attn2.to_out.0")
_DEFAULT_PROCESSORS = ("AttnProcessor2_0", "AttnProcessor")   # plain attention: the output is linear in v


@dataclasses.dataclass(frozen=True)
class Site:
    """Where one ``s`` folds: ``consumers`` (the linears, or 1×1 convolutions, that read ``x``, in the model's
    order; ``key``, the first, names the site) take ``W·diag(s)``; each producer's output rows are divided by ``s``:
    its ``rows`` (of a linear, a LayerNorm's affine or a depthwise convolution: weight and bias), or with
    ``modulate`` its (shift, scale) chunks of an adaLN linear, ``(1 + scale)/s − 1`` for the scale. ``also``: more
    producers whose outputs are summed into ``x`` by the same linear map (Wan's image-to-video cross-attention: its
    text and image values), each divided alike."""
    consumers: tuple[str, ...]
    producer: str
    rows: tuple[int, int] | None = None      # [start, stop) of producer's output rows
    modulate: tuple[int, int] | None = None  # (shift chunk, scale chunk) of an adaLN output of ``chunks`` chunks
    chunks: int = 6
    also: tuple[str, ...] = ()               # more producers (``rows`` only)
    # instead of ``rows``: several [start, stop) ranges of the producer's rows, ``s`` split across them in order
    # (FLUX.2's single blocks: to_out reads the attention's values and the SwiGLU's value half, both made by one
    # fused projection)
    segments: tuple[tuple[int, int], ...] = ()

    @property
    def key(self) -> str:
        return self.consumers[0]

    @property
    def row_ranges(self) -> tuple[tuple[int, int], ...]:
        """The producer rows ``s`` divides, in the order of ``s``'s channels (none for a modulation)."""
        return self.segments or ((self.rows,) if self.rows is not None else ())

    @property
    def producers(self) -> tuple[str, ...]:
        return (self.producer,) + self.also


def smoothing_factors(x: torch.Tensor, w: torch.Tensor, alpha: float) -> torch.Tensor:
    """``s (K,)`` for inputs ``x (M, K)`` and weight ``w (N, K)``."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"smoothing alpha must be in [0, 1], got {alpha}")
    xa = x.detach().abs().amax(0).float().clamp(min=1e-5)
    wa = w.detach().abs().amax(0).float().clamp(min=1e-5)
    return (xa ** alpha / wa ** (1 - alpha)).clamp(min=1e-5, max=1e5)


def precision_cap(model: nn.Module, site: Site, s: torch.Tensor) -> torch.Tensor:
    """``s`` capped where its fold would cost precision: a modulation producer in half precision stores the folded
    scale as ``(1 + scale)/s − 1``, which nears −1 as ``s`` grows, so the multiplier ``m = (1 + scale)/s`` it
    encodes has the absolute rounding of a value near 1: a relative error of ``u/m`` (``u`` the dtype's unit
    roundoff; bf16: 0.4 %/m). Per channel ``s`` is capped so that ``m`` (from the scale's bias, the per-channel
    part) stays at least ``2⁷·u`` (bf16: 1/2, fp16: 1/16; float32: no cap to speak of), and never below 1 (no
    smoothing). Other sites scale rows by ``1/s``, which keeps their relative precision: returned as given."""
    if site.modulate is None:
        return s
    producer = _linear(model, site.producer)
    bias = producer.bias
    if bias is None or not producer.weight.dtype.is_floating_point:
        return s
    d, second = s.shape[0], site.modulate[1]
    floor = torch.finfo(producer.weight.dtype).eps / 2 * 2 ** 7   # the least multiplier m kept
    one_plus = (1.0 + bias.detach()[second * d:(second + 1) * d].float()).abs().to(s.device)
    return torch.minimum(s, (one_plus / floor).clamp(min=1.0))


def _linear(model: nn.Module, name: str) -> nn.Module:
    try:
        mod = model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"smoothing folds into the DiT block layout; the model has no {name!r}") from None
    if getattr(mod, "is_frozen", False):
        raise ValueError(f"{name} is already calibrated (frozen); smooth the FP model before calibration")
    from ..runtime.linear import TreeQLinear

    if isinstance(mod, TreeQLinear):   # (its `weight` is a dequantized copy: a fold into it would be lost)
        raise ValueError(f"{name} is packed (TreeQLinear); smooth the FP model before quantize")
    if not isinstance(getattr(mod, "weight", None), torch.Tensor):
        raise ValueError(f"{name} has no weight to fold a smoothing factor into")
    return mod


def _diffusers_block(model: nn.Module, name: str) -> tuple[str, str, nn.Module] | None:
    """``(block prefix, the name within the block, the block)`` when ``name`` is one of a diffusers
    ``BasicTransformerBlock``'s :data:`DIFFUSERS_TARGETS`."""
    for sub in DIFFUSERS_TARGETS:
        if name == sub or name.endswith("." + sub):
            block_name = name[: len(name) - len(sub)].rstrip(".")
            try:
                block = model.get_submodule(block_name) if block_name else model
            except AttributeError:
                return None
            if type(block).__name__ == "BasicTransformerBlock" and hasattr(block, "norm_type"):
                return (block_name + "." if block_name else ""), sub, block
    return None


def _width(model: nn.Module, name: str) -> int:
    try:
        mod = model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"smoothing folds into a transformer block; the model has no {name!r}") from None
    w = getattr(mod, "weight", None)
    if not isinstance(w, torch.Tensor) or not (w.dim() == 2 or (w.dim() == 4 and tuple(w.shape[2:]) == (1, 1))):
        raise ValueError(f"{name} has no (out, in) weight (a linear's, a 1×1 convolution's) to fold a smoothing "
                         "factor into")
    return int(w.shape[1])


def _as_rows(s: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``s`` shaped to scale the rows (dim 0) of ``w``: a linear's (out, in), a norm's (d,), a conv's (out, ...)."""
    return s.view(-1, *([1] * (w.dim() - 1)))


def _as_columns(s: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``s`` shaped to scale the input channels (dim 1) of a linear's (out, in) or a 1×1 conv's (out, in, 1, 1)."""
    return s.view(1, -1, *([1] * (w.dim() - 2)))


def _check_attention(attn: nn.Module, name: str, processors: Sequence[str]) -> None:
    """Refuse a fold at ``name`` when ``attn`` does not run what the fold assumes: its separate projections (not
    a fused ``to_qkv``, which a fold would leave unscaled) under one of ``processors``."""
    from ..nn.convert import runs_fused_projections

    if runs_fused_projections(attn):
        raise ValueError(f"cannot fold smoothing for {name!r}: its attention runs fused projections "
                         "(fuse_qkv_projections); unfuse them first")
    processor = type(getattr(attn, "processor", None)).__name__
    if processor not in processors:
        raise ValueError(f"cannot fold smoothing for {name!r}: its attention runs {processor}, not diffusers' "
                         f"default processor ({', '.join(processors)})")


def _enclosing(model: nn.Module, name: str, classes: Sequence[str]) -> tuple[str, str, nn.Module] | None:
    """``(block prefix with its dot, the name within the block, the block)`` of the innermost module of one of
    ``classes`` holding ``name``; None when none does."""
    parts = name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            block = model.get_submodule(".".join(parts[:cut]))
        except AttributeError:
            continue
        if type(block).__name__ in classes:
            return ".".join(parts[:cut]) + ".", ".".join(parts[cut:]), block
    return None


_MMDIT_PROCESSORS = ("JointAttnProcessor2_0", "FluxAttnProcessor", "FluxAttnProcessor2_0")   # to_q(x) on x as given
# the adaLN norms: chunks, and per use the (shift, scale) chunk indices
_NORMS = {"AdaLayerNormZero": (6, {"attn": (0, 1), "mlp": (3, 4)}),
          "SD35AdaLayerNormZeroX": (9, {"attn": (0, 1), "mlp": (3, 4), "attn2": (6, 7)}),
          "AdaLayerNormContinuous": (2, {"attn": (1, 0)}),
          "AdaLayerNormZeroSingle": (3, {"attn": (0, 1)})}


def _mmdit_site(model: nn.Module, name: str) -> Site | None:
    """The site of ``name`` in an MMDiT block (module docstring), None when ``name`` is in none; a clear error
    when it is in one but its input cannot be smoothed."""
    found = _enclosing(model, name, MMDIT_BLOCKS)
    if found is None:
        return None
    pre, sub, block = found
    single = type(block).__name__ == "FluxSingleTransformerBlock"
    consumers: tuple[str, ...]
    if single and sub in ("proj_mlp", "attn.to_q", "attn.to_k", "attn.to_v"):
        norm, use, consumers = "norm", "attn", ("proj_mlp", "attn.to_q", "attn.to_k", "attn.to_v")
    elif not single and sub in ("attn.to_q", "attn.to_k", "attn.to_v", "attn2.to_q", "attn2.to_k", "attn2.to_v"):
        attn = sub.split(".")[0]
        norm, use, consumers = "norm1", attn, tuple(f"{attn}.to_{x}" for x in "qkv")
    elif not single and sub in ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"):
        norm, use, consumers = "norm1_context", "attn", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")
    elif not single and sub in ("ff.net.0.proj", "ff_context.net.0.proj"):
        norm, use, consumers = ("norm1" if sub.startswith("ff.") else "norm1_context"), "mlp", (sub,)
    else:
        raise ValueError(f"cannot fold smoothing for {name!r}: in a {type(block).__name__} only the inputs of "
                         "to_q/k/v, add_q/k/v_proj, the feed-forwards' first linears (and Flux's single blocks' "
                         "proj_mlp) come from a per-block modulation")
    mod = getattr(block, norm, None)
    kind = type(mod).__name__
    if kind not in _NORMS or use not in _NORMS[kind][1]:
        raise ValueError(f"cannot fold smoothing for {name!r}: its input comes from {pre}{norm}, a {kind}, which "
                         f"this fold does not know (it folds into {', '.join(_NORMS)})")
    if any(c.startswith("attn") for c in consumers):
        _check_attention(getattr(block, consumers[-1].split(".")[0]), name, _MMDIT_PROCESSORS)
    chunks, uses = _NORMS[kind]
    return Site(tuple(pre + c for c in consumers), f"{pre}{norm}.linear", modulate=uses[use], chunks=chunks)


# Qwen-Image's double-stream block: per stream a 6-chunk modulation linear (shift, scale, gate of the attention,
# then of the MLP), as AdaLayerNormZero's; the joint attention's outputs mix both streams' values (not sites)
_QWEN_SITES = {**{f"attn.to_{x}": ("img_mod.1", (0, 1), tuple(f"attn.to_{y}" for y in "qkv")) for x in "qkv"},
               **{f"attn.add_{x}_proj": ("txt_mod.1", (0, 1), tuple(f"attn.add_{y}_proj" for y in "qkv"))
                  for x in "qkv"},
               "img_mlp.net.0.proj": ("img_mod.1", (3, 4), ("img_mlp.net.0.proj",)),
               "txt_mlp.net.0.proj": ("txt_mod.1", (3, 4), ("txt_mlp.net.0.proj",))}
_WAN_PROCESSORS = ("WanAttnProcessor", "WanAttnProcessor2_0")
_SANA_PROCESSORS = {"attn1": ("SanaLinearAttnProcessor2_0",),   # ReLU on q and k only: linear in v
                    "attn2": ("SanaAttnProcessor2_0", "AttnProcessor2_0")}
_LTX_PROCESSORS = ("LTXVideoAttnProcessor", "LTXVideoAttentionProcessor2_0")   # (rotary and q/k norm on q, k only)
_SHARED_MODULATION = ("its shift and scale add a timestep embedding every block shares (a scale-shift table), which "
                      "no per-block weight can scale")


def _zimage_site(model: nn.Module, name: str, pre: str, sub: str, block: nn.Module) -> Site:
    """A Z-Image block's site (module docstring): every input of its linears is made by a per-block weight."""
    if sub in ("attention.to_q", "attention.to_k", "attention.to_v", "feed_forward.w1", "feed_forward.w3"):
        attn = sub.startswith("attention.")
        norm_name = "attention_norm1" if attn else "ffn_norm1"
        norm = getattr(block, norm_name)
        if not isinstance(getattr(norm, "weight", None), torch.Tensor):
            raise ValueError(f"cannot fold smoothing for {name!r}: {pre}{norm_name} has no affine weight")
        if attn:
            _check_attention(block.attention, name, ("ZSingleStreamAttnProcessor",))
        consumers = tuple(f"attention.to_{x}" for x in "qkv") if attn else ("feed_forward.w1", "feed_forward.w3")
        return Site(tuple(pre + c for c in consumers), pre + norm_name, rows=(0, _width(model, name)))
    if sub == "attention.to_out.0":   # attention is linear in v
        _check_attention(block.attention, name, ("ZSingleStreamAttnProcessor",))
        return Site((name,), pre + "attention.to_v", rows=(0, _width(model, name)))
    if sub == "feed_forward.w2":   # reads SiLU(w1·x) ⊙ (w3·x): linear in w3's output
        return Site((name,), pre + "feed_forward.w3", rows=(0, _width(model, name)))
    raise ValueError(f"cannot fold smoothing for {name!r}: in a {type(block).__name__} only the attention's and the "
                     "feed-forward's linears are sites")


def _flux2_site(model: nn.Module, name: str, pre: str, sub: str, block: nn.Module) -> Site:
    """A FLUX.2 block's site (module docstring): the SwiGLU feed-forwards' second linears, and the single blocks'
    output projection. The modulated inputs read modulations every block shares; the double blocks' attention
    outputs mix both streams' values."""
    if type(block).__name__ == "Flux2TransformerBlock" and sub in ("ff.linear_out", "ff_context.linear_out"):
        inner = _width(model, name)   # reads SiLU(first half) ⊙ second half of linear_in's outputs
        return Site((name,), pre + sub.split(".")[0] + ".linear_in", rows=(inner, 2 * inner))
    if type(block).__name__ == "Flux2SingleTransformerBlock" and sub == "attn.to_out":
        attn = block.attn
        _check_attention(attn, name, ("Flux2ParallelSelfAttnProcessor",))
        i, m = int(attn.inner_dim), int(attn.mlp_hidden_dim)
        if int(attn.mlp_mult_factor) != 2 or _width(model, name) != i + m:
            raise ValueError(f"cannot fold smoothing for {name!r}: its input is not the attention's {i} values and "
                             f"a SwiGLU's {m} (mlp_mult_factor {attn.mlp_mult_factor})")
        # to_qkv_mlp_proj's rows: q, k, v (i each), then the SwiGLU's gate and value halves (m each)
        return Site((name,), pre + "attn.to_qkv_mlp_proj", segments=((2 * i, 3 * i), (3 * i + m, 3 * i + 2 * m)))
    raise ValueError(f"cannot fold smoothing for {name!r}: in a {type(block).__name__} only the feed-forwards' "
                     "second linears and the single blocks' output projection are sites (the modulations are "
                     "shared by every block; the joint attention mixes both streams' values)")


def _block_site(model: nn.Module, name: str) -> Site | None:
    """The site of ``name`` in a Wan, Qwen-Image, Sana, Z-Image, FLUX.2 or LTX-Video block (module docstring), None when
    ``name`` is in none of them; a clear error when it is in one but its input cannot be smoothed."""
    found = _enclosing(model, name, ("QwenImageTransformerBlock", "WanTransformerBlock", "SanaTransformerBlock",
                                     "ZImageTransformerBlock", "Flux2TransformerBlock",
                                     "Flux2SingleTransformerBlock", "LTXVideoTransformerBlock"))
    if found is None:
        return None
    pre, sub, block = found
    kind = type(block).__name__
    if kind == "ZImageTransformerBlock":
        return _zimage_site(model, name, pre, sub, block)
    if kind.startswith("Flux2"):
        return _flux2_site(model, name, pre, sub, block)
    if kind == "QwenImageTransformerBlock":
        if sub not in _QWEN_SITES:
            raise ValueError(f"cannot fold smoothing for {name!r}: in a {kind} only the inputs of to_q/k/v, "
                             "add_q/k/v_proj and the MLPs' first linears come from a per-block modulation")
        producer, chunks, consumers = _QWEN_SITES[sub]
        if sub.startswith("attn."):
            _check_attention(block.attn, name, ("QwenDoubleStreamAttnProcessor2_0",))
        return Site(tuple(pre + c for c in consumers), pre + producer, modulate=chunks, chunks=6)
    if sub in ("attn1.to_out.0", "attn2.to_out.0"):   # attention is linear in v: 1/s folds into the values
        attn_name = sub.split(".")[0]
        attn = getattr(block, attn_name)
        processors = (_WAN_PROCESSORS if kind == "WanTransformerBlock" else _LTX_PROCESSORS
                      if kind == "LTXVideoTransformerBlock" else _SANA_PROCESSORS[attn_name])
        _check_attention(attn, name, processors)
        also = (f"{pre}{attn_name}.add_v_proj",) if getattr(attn, "add_v_proj", None) is not None else ()
        return Site((name,), f"{pre}{attn_name}.to_v", rows=(0, _width(model, name)), also=also)
    if kind == "LTXVideoTransformerBlock":
        if sub in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "ff.net.0.proj"):
            raise ValueError(f"cannot fold smoothing for {name!r}: {_SHARED_MODULATION}")
        raise ValueError(f"cannot fold smoothing for {name!r}: in a {kind} only the attentions' outputs have an input "
                         "a per-block weight produces")
    if kind == "WanTransformerBlock":
        if sub == "attn2.to_q":
            norm = block.norm2
            if not isinstance(getattr(norm, "weight", None), torch.Tensor):
                raise ValueError(f"cannot fold smoothing for {name!r}: its input is the residual stream through "
                                 f"{pre}norm2, a {type(norm).__name__} without a per-block affine "
                                 "(cross_attn_norm=False)")
            _check_attention(block.attn2, name, _WAN_PROCESSORS)
            return Site((name,), pre + "norm2", rows=(0, _width(model, name)))
        if sub in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "ffn.net.0.proj"):
            raise ValueError(f"cannot fold smoothing for {name!r}: {_SHARED_MODULATION}")
        raise ValueError(f"cannot fold smoothing for {name!r}: in a {kind} only the attentions' outputs and (with "
                         "cross_attn_norm) the cross-attention's query have an input a per-block weight produces")
    # Sana
    if sub == "ff.conv_point":   # reads conv_depth's first half times SiLU(its second): depthwise, so per channel
        ff = block.ff
        depth = ff.conv_depth
        width = _width(model, name)   # (conv_point's input channels, whatever module now holds them)
        if (type(ff).__name__ != "GLUMBConv" or getattr(depth, "groups", None) != depth.out_channels
                or depth.out_channels != 2 * width):
            raise ValueError(f"cannot fold smoothing for {name!r}: {pre}ff is not the GLUMBConv it folds into (a "
                             "depthwise conv_depth of twice conv_point's input channels)")
        return Site((name,), pre + "ff.conv_depth", rows=(0, width))
    if sub in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "ff.conv_inverted"):
        raise ValueError(f"cannot fold smoothing for {name!r}: {_SHARED_MODULATION}")
    raise ValueError(f"cannot fold smoothing for {name!r}: in a {kind} only the attentions' outputs and the "
                     "feed-forward's point convolution have an input a per-block weight produces")


def site_of(model: nn.Module, name: str) -> Site:
    """The :class:`Site` where the input of linear ``name`` can be smoothed; a clear error where it cannot."""
    for find in (_mmdit_site, _block_site):
        site = find(model, name)
        if site is not None:
            return site
    found = _diffusers_block(model, name)
    if found is not None:
        pre, sub, block = found
        if sub.endswith("to_out.0"):
            attn = sub.split(".")[0]
            _check_attention(getattr(block, attn), name, _DEFAULT_PROCESSORS)
            return Site((pre + sub,), f"{pre}{attn}.to_v", rows=(0, _width(model, name)))
        if block.norm_type == "ada_norm_single":
            raise ValueError(f"cannot fold smoothing for {name!r}: its input's shift and scale add a timestep "
                             "embedding every block shares ('ada_norm_single' norm, as PixArt's), which no "
                             "per-block weight can scale")
        if block.norm_type != "ada_norm_zero":
            raise ValueError(f"cannot fold smoothing for {name!r}: its input comes from a {block.norm_type!r} norm "
                             "without a per-block modulation (only adaLN-Zero blocks, as diffusers' DiT, fold into "
                             "norm1.linear)")
        if sub.startswith("attn1."):
            if block.only_cross_attention:
                raise ValueError(f"cannot fold smoothing for {name!r}: attn1 reads the captions here")
            if getattr(block, "pos_embed", None) is not None:
                raise ValueError(f"cannot fold smoothing for {name!r}: the block adds positional embeddings to "
                                 "attn1's input after the modulation")
            attn = block.attn1
            _check_attention(attn, name, _DEFAULT_PROCESSORS)
            if getattr(attn, "group_norm", None) is not None or getattr(attn, "spatial_norm", None) is not None:
                raise ValueError(f"cannot fold smoothing for {name!r}: a norm runs before to_q/to_k/to_v")
            return Site(tuple(f"{pre}attn1.{p}" for p in ("to_q", "to_k", "to_v")), f"{pre}norm1.linear",
                        modulate=(0, 1))
        return Site((pre + sub,), f"{pre}norm1.linear", modulate=(3, 4))
    parent, _, leaf = name.rpartition(".")
    block, _, sub = parent.rpartition(".")
    kind = f"{sub}.{leaf}"
    pre = f"{block}." if block else ""
    if kind not in TARGETS:
        raise ValueError(f"cannot fold smoothing for {name!r}: only {TARGETS} of a DiT block, or "
                         f"{DIFFUSERS_TARGETS} of a diffusers transformer block")
    if kind == "attn.proj":
        d = _width(model, name)
        return Site((name,), f"{pre}attn.qkv", rows=(2 * d, 3 * d))  # v in the (3, heads, head_dim) layout
    return Site((name,), f"{pre}adaLN_modulation.1", modulate=(0, 1) if kind == "attn.qkv" else (3, 4))


MMDIT_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn.add_q_proj",
                 "attn.add_k_proj", "attn.add_v_proj", "ff.net.0.proj", "ff_context.net.0.proj", "proj_mlp")
BLOCK_TARGETS = ("img_mlp.net.0.proj", "txt_mlp.net.0.proj", "ffn.net.0.proj", "ff.conv_point", "ff.conv_inverted",
                 "attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0", "feed_forward.w1",
                 "feed_forward.w2", "feed_forward.w3", "ff.linear_out", "ff_context.linear_out", "attn.to_out")


def _is_site_kind(name: str) -> bool:
    return any(name == t or name.endswith("." + t)
               for t in TARGETS + DIFFUSERS_TARGETS + MMDIT_TARGETS + BLOCK_TARGETS)


def targets(model: nn.Module, plan: QuantPlan, refused: dict[str, str] | None = None) -> list[str]:
    """The keys of the sites (see :class:`Site`) where smoothing can fold into ``model`` and helps ``plan``: a
    planned linear there quantizes its activations. In the plan's order. ``refused`` (when given) collects the
    planned linears of a smoothable kind whose input this model cannot smooth, with the reason."""
    keys: list[str] = []
    for name, cfg in plan.layers.items():
        if not cfg.act_spec().is_quantized:
            continue
        try:
            key = site_of(model, name).key
        except ValueError as e:
            if refused is not None and _is_site_kind(name):
                refused[name] = str(e)
            continue
        if key not in keys:
            keys.append(key)
    return keys


def check_fold(model: nn.Module, name: str,
               s: torch.Tensor) -> tuple[Site, list[nn.Module], list[nn.Module], torch.Tensor]:
    """Everything :func:`fold` checks, changing nothing: a ValueError when ``s`` cannot fold into ``name``'s site
    of ``model``. Returns the site, its consumer linears, its producers and ``s`` as float32 on their device. (A
    caller folding several factors checks them all first, so that a bad one leaves the model untouched.)"""
    site = site_of(model, name)
    consumers = [_linear(model, c) for c in site.consumers]
    d = consumers[0].weight.shape[1]
    if any(c.weight.shape[1] != d for c in consumers):
        raise ValueError(f"{site.consumers}: read inputs of different widths; they cannot share a smoothing")
    if not isinstance(s, torch.Tensor):
        raise ValueError(f"{name}: smoothing factors must be a tensor of shape ({d},), got {type(s).__name__}")
    if tuple(s.shape) != (d,):
        raise ValueError(f"{name}: smoothing factors must be positive and finite, shape ({d},) (the width of the "
                         f"site's input); got shape {tuple(s.shape)}")
    s = s.to(consumers[0].weight.device, torch.float32)
    bad = ~(torch.isfinite(s) & (s > 0))
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ValueError(f"{name}: smoothing factors must be positive and finite, shape ({d},); {int(bad.sum())} "
                         f"of {d} are not (channel {i}: {float(s[i])})")
    producers = [_linear(model, p) for p in site.producers]
    for name_p, producer in zip(site.producers, producers):
        n_out = producer.weight.shape[0]
        if site.row_ranges:
            if any(hi > n_out for _, hi in site.row_ranges) or sum(hi - lo for lo, hi in site.row_ranges) != d:
                raise ValueError(f"{name_p} has {n_out} outputs; {name} reads rows "
                                 f"{', '.join(f'{lo}:{hi}' for lo, hi in site.row_ranges)} for its {d} channels")
        elif site.modulate is not None:
            if n_out != site.chunks * d:
                raise ValueError(f"{name_p} has {n_out} outputs; this adaLN modulation has {site.chunks}·{d}")
            if producer.bias is None:   # (1 + scale)/s − 1 needs a bias to hold its 1/s − 1
                raise ValueError(f"cannot fold smoothing for {name!r}: {name_p} has no bias to hold the "
                                 "modulation's (1 + scale)/s − 1")
    return site, consumers, producers, s


@torch.no_grad()
def fold(model: nn.Module, name: str, s: torch.Tensor) -> None:
    """Rewrite ``model`` so that the linears of ``name``'s site (see :class:`Site`: ``name`` is its key or any of
    its linears) see ``x/s`` and have weights ``W·diag(s)``; the model's function is unchanged."""
    site, consumers, producers, s = check_fold(model, name, s)   # before any write: a refused fold changes nothing
    d = consumers[0].weight.shape[1]

    def put(t: torch.Tensor, rows: slice, value: torch.Tensor) -> None:   # computed in float32, rounded once
        t[rows] = value.to(t.dtype)

    for producer in producers:
        w, bias = producer.weight, getattr(producer, "bias", None)
        if site.row_ranges:
            at = 0
            for lo, hi in site.row_ranges:
                rows, part = slice(lo, hi), s[at:at + hi - lo]
                put(w, rows, w[rows].float() / _as_rows(part, w))
                if bias is not None:
                    put(bias, rows, bias[rows].float() / part)
                at += hi - lo
        elif site.modulate is not None:
            assert bias is not None   # (check_fold: an adaLN producer has one)
            first, second = site.modulate
            shift, scale = slice(first * d, (first + 1) * d), slice(second * d, (second + 1) * d)
            inv = 1.0 / s
            put(w, shift, w[shift].float() * inv[:, None])
            put(w, scale, w[scale].float() * inv[:, None])
            put(bias, shift, bias[shift].float() * inv)
            put(bias, scale, (1.0 + bias[scale].float()) * inv - 1.0)
    for c in consumers:
        c.weight.copy_((c.weight.float() * _as_columns(s, c.weight)).to(c.weight.dtype))


@torch.no_grad()
def choose(model: nn.Module, plan: QuantPlan, batches: Sequence[CalibBatch], alphas: Sequence[float],
           config, joint: Sequence[Sequence[str]] = ()) -> tuple[dict[str, torch.Tensor], dict[str, float | None]]:
    """Per site (by key), the ``α`` of ``alphas`` (or none) with the least calibrated error of the site's planned
    linears on the FP model's inputs; returns ``(factors, chosen alpha per site)``. ``config`` is the
    ``PTQConfig`` used; ``joint``: the tied groups PTQ calibrates as one stacked linear (scored so here)."""
    from .ptq import calibrate_layer

    sites = [site_of(model, k) for k in targets(model, plan)]
    factors: dict[str, torch.Tensor] = {}
    chosen: dict[str, float | None] = {}
    if not sites:
        return factors, chosen
    planned = {s.key: [c for c in s.consumers if c in plan.layers] for s in sites}
    runner = StageRunner(model, batches, [c for s in sites for c in planned[s.key]])
    stacked = {frozenset(g) for g in joint}
    for stage in range(runner.num_stages):
        for site in [s for s in sites if runner.stage_of[planned[s.key][0]] == stage]:
            members = planned[site.key]
            x = runner.capture(members[0], config.max_tokens, seed=config.seed)
            ws = [_linear(model, m).weight.detach().float().flatten(1) for m in members]   # (1×1 convs)
            cfgs = [plan.layers[m] for m in members]
            if len(members) > 1 and frozenset(members) in stacked:
                ws, cfgs = [torch.cat(ws)], cfgs[:1]
            w_all = torch.cat(ws)
            norms = [float((x.float() @ w.T).square().sum()) for w in ws] if len(ws) > 1 else [1.0]

            def error(s: torch.Tensor | None) -> float:
                errs = [calibrate_layer(w if s is None else w * s, x if s is None else x / s, c, config).err
                        for w, c in zip(ws, cfgs)]
                if len(errs) == 1:
                    return errs[0]
                return sum(e * n for e, n in zip(errs, norms)) / (sum(norms) or 1.0)

            best_err, best_a, best_s = error(None), None, None
            for a in alphas:
                s = precision_cap(model, site, smoothing_factors(x, w_all, a))
                err = error(s)
                if err < best_err:
                    best_err, best_a, best_s = err, a, s
            chosen[site.key] = best_a
            if best_s is not None:
                factors[site.key] = best_s
        if any(runner.stage_of[planned[s.key][0]] > stage for s in sites):
            runner.advance()
    return factors, chosen
