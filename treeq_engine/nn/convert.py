"""Layer enumeration and module swapping: the narrow interface search, calibration and PTQ use.

    names = quantizable_linears(model)                     # every nn.Linear and pointwise convolution, module order
    order = forward_order(model, x, t, y)                  # the order they run in (hooks, one forward)
    convert(model, plan)                                   # nn.Linear -> QuantLinear for the plan's layers
                                                           # (a pointwise conv -> QuantPointwiseConv)
    apply_plan(model, plan)                                # re-configure converted layers (fast, no swap)
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn

from ..plan import PlanError, QuantPlan
from .pointwise import is_pointwise_conv
from .quant_linear import QuantLinear
from .quant_pointwise import QuantPointwiseConv


# Modules that hand their linears' tensors to a functional op instead of calling them (HunyuanDiT's attention
# pool passes q/k/v/c_proj's weights and biases to F.multi_head_attention_forward): a packed layer there would
# never quantize its input, only dequantize its weight on every access. Their linears stay as they are.
TENSOR_READERS = ("HunyuanDiTAttentionPool",)


# the dense modules diffusers' ``fuse_projections`` builds from to_q/to_k/to_v (add_*); an unfuse leaves them
FUSED_PROJECTIONS = ("to_qkv", "to_kv", "to_added_qkv")


def runs_fused_projections(attn: nn.Module) -> bool:
    """Whether ``attn`` computes its q/k/v through a fused projection (``to_qkv``...) rather than its separate
    ones. diffusers' legacy ``Attention`` (DiT, PixArt, SD3, ...) does when its processor is a ``Fused*`` one (what
    the model's ``fuse_qkv_projections`` sets; its ``unfuse_qkv_projections`` restores the processors and leaves
    the flag); the newer attention classes (Flux, Wan, Qwen-Image) branch on ``fused_projections``."""
    if type(attn).__name__ == "Attention" and type(attn).__module__.startswith("diffusers."):
        return type(getattr(attn, "processor", None)).__name__.startswith("Fused")
    return bool(getattr(attn, "fused_projections", False))


def read_as_tensors(model: nn.Module, names: Iterable[str]) -> list[str]:
    """Those of ``names`` that live in a ``TENSOR_READERS`` module of ``model``."""
    readers = [n + "." for n, m in model.named_modules() if type(m).__name__ in TENSOR_READERS]
    return [n for n in names if any(n.startswith(r) for r in readers)]


def _called_modules(model: nn.Module) -> Iterable[tuple[str, nn.Module]]:
    """The modules a forward may call: not those of a ``TENSOR_READERS`` module, nor a fused projection its
    attention no longer runs (what ``unfuse_qkv_projections`` leaves behind)."""
    modules = dict(model.named_modules())
    read = set(read_as_tensors(model, modules))
    stale = {n for n in modules if n.rpartition(".")[2] in FUSED_PROJECTIONS and "." in n
             and not runs_fused_projections(modules[n.rpartition(".")[0]])}
    return ((n, m) for n, m in modules.items() if n not in read and n not in stale)


def quantizable_linears(model: nn.Module, include: Callable[[str], bool] | None = None, *,
                        pointwise_convs: bool = True) -> list[str]:
    """Names of the ``nn.Linear`` modules of ``model`` and (``pointwise_convs``) its pointwise convolutions, the
    linears over channels they are (``nn.pointwise``), plain or already converted, in module order (not those of
    a ``TENSOR_READERS`` module): what search, PTQ, PEFT and ``runtime.quantize`` take."""
    def wanted(m: nn.Module) -> bool:
        if isinstance(m, QuantPointwiseConv) or is_pointwise_conv(m):
            return pointwise_convs
        return isinstance(m, (nn.Linear, QuantLinear))

    return [n for n, m in _called_modules(model) if wanted(m) and (include is None or include(n))]


packable_layers = quantizable_linears   # (the name runtime code reads it by)


@torch.no_grad()
def forward_order(model: nn.Module, *inputs: Any, names: Iterable[str] | None = None, **kw: Any) -> list[str]:
    """The linears of ``model`` in the order a forward pass first calls them (one traced forward)."""
    wanted = set(quantizable_linears(model) if names is None else names)
    order: list[str] = []
    handles = []
    for n, m in model.named_modules():
        if n in wanted:
            handles.append(m.register_forward_pre_hook(lambda mod, args, n=n: order.append(n) if n not in order else None))
    try:
        model(*inputs, **kw)
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in wanted if n not in order]
    return order + sorted(missing)  # layers not reached by this forward keep a stable place at the end


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def convert(model: nn.Module, plan: QuantPlan) -> nn.Module:
    """Swap every linear the plan names for a :class:`QuantLinear` with its config (in place); layers already
    converted are re-configured. Returns ``model``."""
    if not isinstance(plan, QuantPlan):
        raise TypeError(f"plan must be a QuantPlan, got {type(plan).__name__}")
    plan.validate(model)
    for name, cfg in plan.layers.items():
        mod = model.get_submodule(name)
        if isinstance(mod, QuantLinear):
            mod.set_config(cfg)
        else:
            cls = QuantPointwiseConv if is_pointwise_conv(mod) else QuantLinear
            _set_submodule(model, name, cls(mod, cfg, name=name))
    return model


def quant_layers(model: nn.Module) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def clear_caches(model: nn.Module) -> None:
    """Drop every converted layer's cached fake-quantized weights (:meth:`QuantLinear.clear_cache`): needed only
    after writes their version counters do not see (a ``fused=True`` optimizer's step, ``weight.data`` swaps)."""
    for m in quant_layers(model).values():
        m.clear_cache()


def apply_plan(model: nn.Module, plan: QuantPlan, *, strict: bool = True) -> None:
    """Set the configs of already converted layers; layers not in the plan go back to full precision."""
    layers = quant_layers(model)
    if strict:
        missing = [n for n in plan.layers if n not in layers]
        if missing:
            raise PlanError(f"apply_plan: {len(missing)} plan layer(s) are not converted, e.g. {missing[:3]}; "
                            "call convert() first")
    for n, m in layers.items():
        m.set_config(plan.layers.get(n))


def unconvert(model: nn.Module) -> nn.Module:
    """Swap every QuantLinear back to an ``nn.Linear`` (a QuantPointwiseConv to its convolution) sharing the same
    parameters."""
    for name, m in list(quant_layers(model).items()):
        if isinstance(m, QuantPointwiseConv):
            _set_submodule(model, name, m.to_conv())
            continue
        lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        lin.weight, lin.bias = m.weight, m.bias
        _set_submodule(model, name, lin)
    return model


@contextlib.contextmanager
def full_precision(model: nn.Module):
    """Temporarily run every converted layer as the float layer it was (its weight and bias: no quantization,
    branch or LoRA): the model computes what it did before ``convert`` (with SmoothQuant folded in, up to float
    rounding), so fine-tuning needs no second copy of the weights for its teacher."""
    layers = list(quant_layers(model).values())
    old = [m.full_precision for m in layers]
    try:
        for m in layers:
            m.full_precision = True
        yield model
    finally:
        for m, o in zip(layers, old):
            m.full_precision = o


@contextlib.contextmanager
def noise_scale(model: nn.Module, lam: float, names: Iterable[str] | None = None):
    """Temporarily set ENG's λ on the given (default: all) converted layers."""
    layers = quant_layers(model)
    chosen = layers if names is None else {n: layers[n] for n in names}
    old = {n: m.noise_scale for n, m in chosen.items()}
    try:
        for m in chosen.values():
            m.set_noise_scale(lam)
        yield
    finally:
        for n, m in chosen.items():
            m.set_noise_scale(old[n])
