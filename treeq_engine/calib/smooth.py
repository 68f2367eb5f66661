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

(``shift/s`` is a row scaling; ``(1 + scale)/s − 1`` a row scaling plus a bias change.) The second linear of an
MLP reads GELU's output, which nothing linear precedes, so it is left alone; so are PixArt's attn1 and ff inputs,
whose shift and scale add a timestep embedding shared by all blocks (no per-block weight can absorb ``1/s``), and
its cross-attention's to_k/to_v, which read the captions every block shares. The MMDiT blocks' attention
outputs are not sites: their joint attention mixes both streams' values, so one ``s`` would have to fold into two
producers (to_v and add_v_proj) and feed two consumers. The folded model computes the
same function in floating point. Per site, ``α`` is chosen from a grid — or no smoothing — by the calibrated
output error of the site's planned linears on the FP model's inputs (``calibrate_layer``; a tied group as one
stacked linear, as PTQ calibrates it), so smoothing is applied only where it measurably helps.
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
    """Where one ``s`` folds: ``consumers`` (the linears that read ``x``, in the model's order; ``key``, the
    first, names the site) take ``W·diag(s)``; ``producer``'s output rows are divided by ``s``: its ``rows``, or
    with ``modulate`` its (shift, scale) chunks of an adaLN linear, ``(1 + scale)/s − 1`` for the scale."""
    consumers: tuple[str, ...]
    producer: str
    rows: tuple[int, int] | None = None      # [start, stop) of producer's output rows
    modulate: tuple[int, int] | None = None  # (shift chunk, scale chunk) of an adaLN output of ``chunks`` chunks
    chunks: int = 6

    @property
    def key(self) -> str:
        return self.consumers[0]


def smoothing_factors(x: torch.Tensor, w: torch.Tensor, alpha: float) -> torch.Tensor:
    """``s (K,)`` for inputs ``x (M, K)`` and weight ``w (N, K)``."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"smoothing alpha must be in [0, 1], got {alpha}")
    xa = x.detach().abs().amax(0).float().clamp(min=1e-5)
    wa = w.detach().abs().amax(0).float().clamp(min=1e-5)
    return (xa ** alpha / wa ** (1 - alpha)).clamp(min=1e-5, max=1e5)


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
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        raise ValueError(f"{name} has no (out, in) weight to fold a smoothing factor into")
    return int(w.shape[1])


def _plain_attention(attn: nn.Module, where: str) -> None:
    processor = type(getattr(attn, "processor", None)).__name__
    if processor not in _DEFAULT_PROCESSORS:
        raise ValueError(f"cannot fold smoothing for {where}: its attention runs {processor}, not diffusers' "
                         f"default processor ({', '.join(_DEFAULT_PROCESSORS)})")


_MMDIT_PROCESSORS = ("JointAttnProcessor2_0", "FluxAttnProcessor", "FluxAttnProcessor2_0")   # to_q(x) on x as given
# the adaLN norms: chunks, and per use the (shift, scale) chunk indices
_NORMS = {"AdaLayerNormZero": (6, {"attn": (0, 1), "mlp": (3, 4)}),
          "SD35AdaLayerNormZeroX": (9, {"attn": (0, 1), "mlp": (3, 4), "attn2": (6, 7)}),
          "AdaLayerNormContinuous": (2, {"attn": (1, 0)}),
          "AdaLayerNormZeroSingle": (3, {"attn": (0, 1)})}


def _mmdit_site(model: nn.Module, name: str) -> Site | None:
    """The site of ``name`` in an MMDiT block (module docstring), None when ``name`` is in none; a clear error
    when it is in one but its input cannot be smoothed."""
    parts = name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            block = model.get_submodule(".".join(parts[:cut]))
        except AttributeError:
            continue
        if type(block).__name__ in MMDIT_BLOCKS:
            break
    else:
        return None
    pre, sub = ".".join(parts[:cut]) + ".", ".".join(parts[cut:])
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
        attn_mod = getattr(block, consumers[-1].split(".")[0])
        if getattr(attn_mod, "fused_projections", False):   # to_qkv runs, not the to_q/k/v a fold would scale
            raise ValueError(f"cannot fold smoothing for {name!r}: its attention runs fused projections "
                             "(fuse_qkv_projections); unfuse them first")
        processor = type(getattr(attn_mod, "processor", None)).__name__
        if processor not in _MMDIT_PROCESSORS:
            raise ValueError(f"cannot fold smoothing for {name!r}: its attention runs {processor}, not diffusers' "
                             f"default ({', '.join(_MMDIT_PROCESSORS)})")
    chunks, uses = _NORMS[kind]
    return Site(tuple(pre + c for c in consumers), f"{pre}{norm}.linear", modulate=uses[use], chunks=chunks)


def site_of(model: nn.Module, name: str) -> Site:
    """The :class:`Site` where the input of linear ``name`` can be smoothed; a clear error where it cannot."""
    mmdit = _mmdit_site(model, name)
    if mmdit is not None:
        return mmdit
    found = _diffusers_block(model, name)
    if found is not None:
        pre, sub, block = found
        if sub.endswith("to_out.0"):
            attn = sub.split(".")[0]
            _plain_attention(getattr(block, attn), name)
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
            _plain_attention(attn, name)
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


def _is_site_kind(name: str) -> bool:
    return any(name == t or name.endswith("." + t) for t in TARGETS + DIFFUSERS_TARGETS + MMDIT_TARGETS)


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


def check_fold(model: nn.Module, name: str, s: torch.Tensor) -> tuple[Site, list[nn.Module], nn.Module, torch.Tensor]:
    """Everything :func:`fold` checks, changing nothing: a ValueError when ``s`` cannot fold into ``name``'s site
    of ``model``. Returns the site, its consumer linears, the producer and ``s`` as float32 on their device. (A
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
    producer = _linear(model, site.producer)
    n_out = producer.weight.shape[0]
    if site.rows is not None:
        lo, hi = site.rows
        if hi > n_out:
            raise ValueError(f"{site.producer} has {n_out} outputs; {name} reads rows {lo}:{hi}")
    elif site.modulate is not None:
        if n_out != site.chunks * d:
            raise ValueError(f"{site.producer} has {n_out} outputs; this adaLN modulation has {site.chunks}·{d}")
        if producer.bias is None:   # (1 + scale)/s − 1 needs a bias to hold its 1/s − 1
            raise ValueError(f"cannot fold smoothing for {name!r}: {site.producer} has no bias to hold the "
                             "modulation's (1 + scale)/s − 1")
    return site, consumers, producer, s


@torch.no_grad()
def fold(model: nn.Module, name: str, s: torch.Tensor) -> None:
    """Rewrite ``model`` so that the linears of ``name``'s site (see :class:`Site`: ``name`` is its key or any of
    its linears) see ``x/s`` and have weights ``W·diag(s)``; the model's function is unchanged."""
    site, consumers, producer, s = check_fold(model, name, s)   # before any write: a refused fold changes nothing
    d = consumers[0].weight.shape[1]
    bias = producer.bias

    def put(t: torch.Tensor, rows: slice, value: torch.Tensor) -> None:   # computed in float32, rounded once
        t[rows] = value.to(t.dtype)

    if site.rows is not None:
        rows = slice(*site.rows)
        put(producer.weight, rows, producer.weight[rows].float() / s[:, None])
        if bias is not None:
            put(bias, rows, bias[rows].float() / s)
    elif site.modulate is not None:
        first, second = site.modulate
        shift, scale = slice(first * d, (first + 1) * d), slice(second * d, (second + 1) * d)
        inv = 1.0 / s
        put(producer.weight, shift, producer.weight[shift].float() * inv[:, None])
        put(producer.weight, scale, producer.weight[scale].float() * inv[:, None])
        put(bias, shift, bias[shift].float() * inv)
        put(bias, scale, (1.0 + bias[scale].float()) * inv - 1.0)
    for c in consumers:
        c.weight.copy_((c.weight.float() * s[None, :]).to(c.weight.dtype))


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
            ws = [_linear(model, m).weight.detach().float() for m in members]
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
                s = smoothing_factors(x, w_all, a)
                err = error(s)
                if err < best_err:
                    best_err, best_a, best_s = err, a, s
            chosen[site.key] = best_a
            if best_s is not None:
                factors[site.key] = best_s
        if any(runner.stage_of[planned[s.key][0]] > stage for s in sites):
            runner.advance()
    return factors, chosen
