"""``quantize(model, plan)``: swap a model's linears for packed :class:`TreeQLinear` modules (and its pointwise
convolutions, which are linears over channels, for :class:`TreeQPointwiseConv`).

Works on plain ``nn.Linear`` layers (weights quantized here, branches initialised by the closed-form Monarch
projection) and on layers already converted to the fake-quant ``QuantLinear`` by search/PTQ/PEFT (their
calibrated weight quantization and trained branch are packed as they are; a plan whose config for a calibrated
layer differs from its calibration is refused: it would round the float weight again).
"""
from __future__ import annotations

import functools
import warnings
from typing import Any

import torch
import torch.nn as nn

from ..branches import MonarchShape, monarch
from ..format import quantize as quantize_tensor
from ..models.diffusers_transformers import MMDIT_BLOCKS
from ..nn.convert import FUSED_PROJECTIONS, _set_submodule, runs_fused_projections
from ..nn.pointwise import conv_weight, describe, is_pointwise_conv, layer_dims
from ..nn.quant_linear import QuantLinear
from ..nn.quant_pointwise import QuantPointwiseConv, conv_spatial_dims
from ..plan import LayerConfig, QuantPlan, check_runnable
from .graphed_diffusers import reset_graphs
from .linear import LAYOUTS, TreeQLinear, TreeQPointwiseConv, branch_dtype, check_max_k


def _branch_factors(mod: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    br = getattr(mod, "branch", None)
    if br is None:
        return None
    w1, w2 = getattr(br, "w1", None), getattr(br, "w2", None)
    if not isinstance(w1, torch.Tensor) or not isinstance(w2, torch.Tensor):
        raise TypeError(f"branch {type(br).__name__} exposes no Monarch factors w1/w2 the runtime can pack")
    return w1.detach(), w2.detach()


def check_packable(mod: nn.Module, cfg: LayerConfig, name: str) -> None:
    """Every refusal of :func:`pack_layer`, run for all layers before any is swapped (so a refused plan leaves the
    model as it was) and by :func:`skeleton` (so an artifact's plan is held to what ``quantize`` would pack)."""
    plain_conv = is_pointwise_conv(mod)
    conv = plain_conv or isinstance(mod, QuantPointwiseConv)
    if not conv and not isinstance(mod, (QuantLinear, nn.Linear)):
        raise TypeError(f"{name}: cannot pack a {describe(mod)}: only linears and pointwise (1x1) convolutions pack")
    check_runnable(cfg, name)
    if cfg.weight_spec().is_quantized:
        check_max_k(layer_dims(mod)[0], cfg, name)
    if isinstance(mod, QuantLinear) and mod.is_frozen and mod.config != cfg:
        # (packing it by the plan would round the float weight again and drop what calibration chose)
        raise ValueError(f"{name}: calibrated at {mod.config}, but the plan asks for {cfg}: pack a calibrated model "
                         "with the plan calibration returned (`treeq ptq`'s plan.json; `quantize --ptq DIR`)")
    own = _branch_factors(mod) if isinstance(mod, QuantLinear) else None
    if own is not None and mod.config == cfg and cfg.weight_spec().is_quantized and not _fits(own, cfg, mod):
        raise ValueError(f"{name}: its branch does not have the shape its config {cfg.label} names "
                         f"({cfg.branch}): the quantized path holds W − B for that branch")


def _fits(factors: tuple[torch.Tensor, torch.Tensor], cfg: LayerConfig, mod: nn.Module) -> bool:
    """Whether a module's branch factors are the ones ``cfg.branch`` describes (for this layer's shape)."""
    if cfg.branch is None:
        return False
    k, n = layer_dims(mod)
    shp = MonarchShape(n=n, k=k, blocks=cfg.branch.blocks, rank=cfg.branch.rank)
    return tuple(factors[0].shape) == tuple(shp.w1_shape) and tuple(factors[1].shape) == tuple(shp.w2_shape)


def pack_layer(mod: nn.Module, cfg: LayerConfig, name: str, dtype: torch.dtype) -> nn.Module:
    """One layer -> TreeQLinear (TreeQPointwiseConv for a pointwise convolution), or for W16 the layer as a plain
    Linear (the convolution as it is)."""
    check_packable(mod, cfg, name)
    plain_conv = is_pointwise_conv(mod)
    conv = plain_conv or isinstance(mod, QuantPointwiseConv)
    weight, bias = (conv_weight(mod) if plain_conv else mod.weight), mod.bias
    if not cfg.weight_spec().is_quantized:  # stays a Linear in the model's own precision, like its neighbours
        if conv:
            return mod if plain_conv else mod.to_conv()
        lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device,
                        dtype=weight.dtype)
        with torch.no_grad():
            lin.weight.copy_(weight)
            if bias is not None:
                lin.bias.copy_(bias)
        return lin
    factors = _branch_factors(mod) if isinstance(mod, QuantLinear) else None
    if factors is not None and not _fits(factors, cfg, mod):   # the plan's branch, not the simulation's
        factors = None
    if isinstance(mod, QuantLinear) and mod.config == cfg:
        wq = mod.weight_qtensor()
    else:
        w = weight.detach().float()
        if factors is None and cfg.branch is not None:
            factors = monarch.project(w, cfg.branch.blocks, cfg.branch.rank)
        if factors is not None:  # the residual of the factors as the layer will store them (bf16 in a 16-bit model)
            factors = tuple(f.detach().to(branch_dtype(dtype)).float() for f in factors)
            w = w - monarch.to_dense(factors[0].float(), factors[1].float(), w.shape[0], w.shape[1])
        wq = quantize_tensor(w, cfg.weight_spec())
    # the packed layer reports the replaced layer's dtype (code reads it off parameters(): Wan, ModelMixin.dtype)
    kw: dict[str, Any] = dict(name=name, dtype=dtype, compute_dtype=_model_dtype(weight, dtype))
    if conv:
        dims = len(mod.kernel_size) if plain_conv else mod.spatial_dims
        return TreeQPointwiseConv.from_weights(wq, cfg, bias, factors, spatial_dims=dims, **kw)
    return TreeQLinear.from_weights(wq, cfg, bias, factors, **kw)


def _model_dtype(weight: torch.Tensor, dtype: torch.dtype) -> torch.dtype:
    """The replaced layer's float dtype (``dtype`` for a weight without one)."""
    return weight.dtype if weight.is_floating_point() else dtype


@torch.no_grad()
def quantize(model: nn.Module, plan: QuantPlan, *, dtype: torch.dtype = torch.bfloat16, fuse: bool = True,
             layout: str = "auto") -> nn.Module:
    """Swap every layer the plan names for its packed form, in place, and (``fuse``) fuse LayerNorm + modulate +
    quantization into the DiT blocks that allow it; ``layout`` as in :func:`set_layout`. Returns ``model``.
    ``dtype``: the precision the packed layers are built for (their Monarch factors are stored in bf16 unless it is
    float32); each reports the dtype of the layer it replaced as its own (``TreeQLinear.out_dtype``)."""
    if not isinstance(plan, QuantPlan):
        raise TypeError(f"plan must be a QuantPlan, got {type(plan).__name__}")
    check_layout(layout)
    plan.validate(model)
    _check_unfused(model, plan)
    for name, cfg in plan.layers.items():   # every refusal before the first swap: a refused plan changes nothing
        check_packable(model.get_submodule(name), cfg, name)
    for name, cfg in plan.layers.items():   # (set_layout, below, forgets a graphed model's graphs)
        _set_submodule(model, name, pack_layer(model.get_submodule(name), cfg, name, dtype))
    guard_projection_fusion(model)
    if fuse:
        fuse_blocks(model)
    set_layout(model, layout)
    return model


def check_layout(layout: str) -> None:
    if layout not in ("auto",) + LAYOUTS:
        raise ValueError(f"layout must be 'auto' or one of {LAYOUTS}, got {layout!r}")


@torch.no_grad()
def set_layout(model: nn.Module, layout: str = "auto") -> dict[str, int]:
    """Choose how each packed layer holds its codes on its device (``TreeQLinear.set_layout``): ``"auto"`` keeps
    only the CUDA kernels' fragment layout where those kernels will run the layer (a CUDA device they support,
    quantized activations) and layout v1 elsewhere; ``"v1"`` or ``"frag"`` everywhere they apply (weight-only
    layers keep v1). Call it again after moving the model to another device. Returns the count per layout."""
    from ..kernels.cuda_backend import runs_weight

    check_layout(layout)
    reset_graphs(model)   # a graphed diffusers transformer's graphs read the codes and modules this replaces
    counts = {lay: 0 for lay in LAYOUTS}
    for mod in treeq_layers(model).values():
        want = layout
        if not mod.act_spec.is_quantized:
            want = "v1"
        elif layout == "auto":
            want = "frag" if runs_weight(mod.w_scale.device, mod.in_features) else "v1"
        mod.set_layout(want)
        counts[want] += 1
    return counts


def skeleton(model: nn.Module, plan: QuantPlan, *, dtype: torch.dtype = torch.bfloat16, fuse: bool = True) -> nn.Module:
    """Swap the plan's layers for empty TreeQLinear (TreeQPointwiseConv) modules of the right shapes (to load an
    artifact into)."""
    plan.validate(model)
    _check_unfused(model, plan)
    for name, cfg in plan.layers.items():
        check_packable(model.get_submodule(name), cfg, name)
    for name, cfg in plan.layers.items():
        mod = model.get_submodule(name)
        if not cfg.weight_spec().is_quantized:
            continue
        mshape = None if cfg.branch is None else (cfg.branch.blocks, cfg.branch.rank)
        k, n = layer_dims(mod)
        kw: dict[str, Any] = dict(bias=mod.bias is not None, monarch=mshape, name=name, dtype=dtype,
                                  device=mod.weight.device, compute_dtype=_model_dtype(mod.weight, dtype))
        dims = conv_spatial_dims(mod)   # (a plain or a converted pointwise convolution; None: a linear)
        packed = TreeQLinear(k, n, cfg, **kw) if dims is None else TreeQPointwiseConv(k, n, cfg, spatial_dims=dims, **kw)
        _set_submodule(model, name, packed)
    guard_projection_fusion(model)
    if fuse:
        fuse_blocks(model)
    return model


# the projections diffusers' ``fuse_projections`` concatenates into one ``to_qkv`` / ``to_kv`` / ``to_added_qkv``
PROJECTIONS = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")


def _check_unfused(model: nn.Module, plan: QuantPlan) -> None:
    """A plan packing projections of an attention whose projections are fused (``fuse_qkv_projections`` before
    quantizing) would pack layers the attention no longer calls: its dense ``to_qkv`` would run unquantized."""
    for name, cfg in plan.layers.items():
        parent, _, last = name.rpartition(".")
        if last in FUSED_PROJECTIONS and not runs_fused_projections(model.get_submodule(parent)):
            raise ValueError(f"the plan packs {name}, a fused projection {parent} no longer runs (left by "
                             "unfuse_qkv_projections): leave it out of the plan")
        if last in PROJECTIONS and cfg.weight_spec().is_quantized and \
                runs_fused_projections(model.get_submodule(parent)):
            raise ValueError(f"the plan packs {name}, but {parent or 'the model'} runs its fused projection "
                             "(fuse_qkv_projections() was called): the packed layer would never run; call "
                             "unfuse_qkv_projections() before quantizing")


def _refuse_fusion(attn: nn.Module, fuse: bool = True) -> None:
    if fuse:
        raise RuntimeError("fuse_qkv_projections() after quantize would replace packed projections by one dense "
                           "float linear of their dequantized weights (the attention would run unquantized); "
                           "leave the projections unfused")
    attn.fused_projections = False   # (unfusing: there is nothing fused)


def guard_projection_fusion(model: nn.Module) -> int:
    """diffusers' ``fuse_projections`` concatenates ``to_q.weight`` etc. into a new dense linear, and a packed layer
    answers ``weight`` dequantized: on every attention holding packed projections it is replaced by a refusal (on
    the instance, so nothing else changes). A fused projection an earlier fuse and unfuse left behind is dropped:
    a float copy of weights now packed, which the attention no longer runs and an artifact would store (and a fresh
    model would not have). Returns how many attentions are guarded."""
    n = 0
    for mod in model.modules():
        if callable(getattr(mod, "fuse_projections", None)) and \
                any(isinstance(mod._modules.get(p), TreeQLinear) for p in PROJECTIONS):
            for name in FUSED_PROJECTIONS:   # (not run: _check_unfused refused an attention that runs one)
                if name in mod._modules:
                    delattr(mod, name)
            if getattr(mod, "fused_projections", False):
                mod.fused_projections = False
            mod.fuse_projections = functools.partial(_refuse_fusion, mod)   # (a partial pickles; a bound method not)
            n += 1
    return n


def fuse_blocks(model: nn.Module) -> int:
    """Fuse LayerNorm + modulate + quantization (and GELU, the gated residuals) into the transformer blocks that
    allow it: the project's DiT blocks, diffusers' DiT / PixArt blocks, Flux's double and single blocks, SD3's
    joint blocks, Wan's, Qwen-Image's, Sana's, FLUX.2's, Z-Image's, LTX-Video's (LTX-2's too), Chroma's,
    HunyuanVideo's (1.5's too), CogVideoX's, Cosmos', Mochi's, Lumina2's, FLUX.3's, Ideogram 4's, Qwen-Image 2.1's
    and Helios' blocks. Returns how many blocks were fused."""
    from .dit_fused import fuse_dit_blocks

    reset_graphs(model)
    fused = fuse_dit_blocks(model)
    # only a model holding diffusers modules pays for importing diffusers' block classes
    if any(type(m).__module__.startswith("diffusers.") for m in model.modules()):
        from .diffusers_fused import fuse_diffusers_blocks

        fused += fuse_diffusers_blocks(model)
        present = {type(m).__name__ for m in model.modules()}
        for blocks, what, module, function, version in _DIFFUSERS_FUSED:
            if not present.intersection(blocks):
                continue
            if _diffusers_version() < version:
                warnings.warn(f"{what} blocks stay unfused: their fused forward computes as diffusers >= "
                              f"{version[0]}.{version[1]} does", stacklevel=2)
                continue
            try:   # (through __import__: imported only for a model that has such blocks)
                fuse = getattr(__import__(f"{__package__}.{module}", fromlist=[function]), function)
            except ImportError as e:   # (a diffusers that says its version but lacks what the fused forward calls)
                warnings.warn(f"{what} blocks stay unfused: this diffusers lacks what their fused forward calls "
                              f"({e}); diffusers >= {version[0]}.{version[1]} has it", stacklevel=2)
                continue
            fused += fuse(model)
        _register_fused_names(model)
    return fused


# the diffusers blocks with fused classes of their own: (block class names, what, the runtime module and its
# ``fuse...(model) -> int``, the diffusers version its forward follows: 0.35 added dispatch_attention_fn and the
# processors it reads (HunyuanVideo's reads it from 0.36); before 0.39 Qwen-Image's processor ignored the text mask
# or took it through kwargs)
_DIFFUSERS_FUSED = ((MMDIT_BLOCKS, "SD3/Flux", "mmdit_fused", "fuse_mmdit_blocks", (0, 35)),
                    (("LongCatImageTransformerBlock", "LongCatImageSingleTransformerBlock", "BriaTransformerBlock",
                      "BriaSingleTransformerBlock", "BriaFiboTransformerBlock"), "LongCat-Image/Bria", "mmdit_fused",
                     "fuse_mmdit_blocks", (0, 42)),
                    (("WanTransformerBlock",), "Wan", "wan_fused", "fuse_wan_blocks", (0, 35)),
                    (("SkyReelsV2TransformerBlock",), "SkyReels-V2", "wan_fused", "fuse_wan_blocks", (0, 42)),
                    (("WanVACETransformerBlock",), "WanVACE", "wan_fused", "fuse_wan_blocks", (0, 35)),   # (as Wan's)
                    (("QwenImageTransformerBlock",), "Qwen-Image", "qwen_fused", "fuse_qwen_blocks", (0, 39)),
                    (("SanaTransformerBlock",), "Sana", "sana_fused", "fuse_sana_blocks", (0, 32)),
                    (("SanaVideoTransformerBlock",), "Sana-Video", "sana_fused", "fuse_sana_blocks", (0, 42)),
                    (("Flux2TransformerBlock", "Flux2SingleTransformerBlock"), "FLUX.2", "flux2_fused",
                     "fuse_flux2_blocks", (0, 36)),
                    (("ZImageTransformerBlock",), "Z-Image", "zimage_fused", "fuse_zimage_blocks", (0, 36)),
                    (("BriaFibo2TransformerBlock",), "Bria FIBO 2", "zimage_fused", "fuse_zimage_blocks", (0, 42)),
                    (("LTXVideoTransformerBlock",), "LTX-Video", "ltx_fused", "fuse_ltx_blocks", (0, 35)),
                    (("ChromaTransformerBlock", "ChromaSingleTransformerBlock"), "Chroma", "chroma_fused",
                     "fuse_chroma_blocks", (0, 35)),
                    (("HunyuanVideoTransformerBlock", "HunyuanVideoSingleTransformerBlock"), "HunyuanVideo",
                     "hunyuan_fused", "fuse_hunyuan_blocks", (0, 36)),
                    (("HunyuanImageTransformerBlock", "HunyuanImageSingleTransformerBlock"), "HunyuanImage 2.1",
                     "hunyuan_fused", "fuse_hunyuan_blocks", (0, 42)),
                    (("MotifVideoTransformerBlock", "MotifVideoSingleTransformerBlock"), "Motif-Video",
                     "hunyuan_fused", "fuse_hunyuan_blocks", (0, 42)),
                    (("HunyuanVideo15TransformerBlock",), "HunyuanVideo 1.5", "hunyuan15_fused",
                     "fuse_hunyuan15_blocks", (0, 36)),
                    (("CogVideoXBlock",), "CogVideoX", "cogvideox_fused", "fuse_cogvideox_blocks", (0, 32)),
                    (("ConsisIDBlock",), "ConsisID", "cogvideox_fused", "fuse_cogvideox_blocks", (0, 42)),
                    (("CogView4TransformerBlock",), "CogView4", "cogview4_fused", "fuse_cogview4_blocks", (0, 42)),
                    (("CogView3PlusTransformerBlock",), "CogView3-Plus", "cogview4_fused", "fuse_cogview4_blocks",
                     (0, 42)),
                    (("GlmImageTransformerBlock",), "GLM-Image", "cogview4_fused", "fuse_cogview4_blocks", (0, 42)),
                    (("Kandinsky5TransformerDecoderBlock", "Kandinsky5TransformerEncoderBlock"), "Kandinsky 5",
                     "kandinsky5_fused", "fuse_kandinsky5_blocks", (0, 42)),
                    (("Kandinsky6SRTransformerBlock", "Kandinsky6TransformerEncoderBlock",
                      "Kandinsky6FusedTransformerDecoderBlock"), "Kandinsky 6",
                     "kandinsky6_fused", "fuse_kandinsky6_blocks", (0, 42)),
                    (("OvisImageTransformerBlock", "OvisImageSingleTransformerBlock"), "Ovis-Image", "ovis_fused",
                     "fuse_ovis_blocks", (0, 42)),
                    (("AnyFlowTransformerBlock",), "AnyFlow", "anyflow_fused", "fuse_anyflow_blocks", (0, 42)),
                    (("LTX2VideoTransformerBlock",), "LTX-2", "ltx2_fused", "fuse_ltx2_blocks", (0, 42)),
                    (("SanaWMLTX2RefinerTransformerBlock",), "SANA-WM refiner", "sanawm_refiner_fused",
                     "fuse_sanawm_refiner_blocks", (0, 42)),
                    (("CosmosTransformerBlock",), "Cosmos", "cosmos_fused", "fuse_cosmos_blocks", (0, 42)),
                    (("MochiTransformerBlock",), "Mochi", "mochi_fused", "fuse_mochi_blocks", (0, 35)),
                    (("Lumina2TransformerBlock",), "Lumina2", "lumina2_fused", "fuse_lumina2_blocks", (0, 35)),
                    (("Flux3ModeTransformerBlock", "Flux3SingleTransformerBlock"), "FLUX.3", "flux3_fused",
                     "fuse_flux3_blocks", (0, 42)),
                    (("Ideogram4TransformerBlock",), "Ideogram 4", "ideogram4_fused", "fuse_ideogram4_blocks", (0, 42)),
                    (("QwenImage21TransformerBlock",), "Qwen-Image 2.1", "qwenimage21_fused", "fuse_qwenimage21_blocks",
                     (0, 42)),
                    (("HeliosTransformerBlock",), "Helios", "helios_fused", "fuse_helios_blocks", (0, 42)),
                    (("AuraFlowJointTransformerBlock", "AuraFlowSingleTransformerBlock"), "AuraFlow",
                     "auraflow_fused", "fuse_auraflow_blocks", (0, 42)),
                    (("HunyuanDiTBlock",), "Hunyuan-DiT", "hunyuandit_fused", "fuse_hunyuandit_blocks", (0, 42)),
                    (("AllegroTransformerBlock",), "Allegro", "allegro_fused", "fuse_allegro_blocks", (0, 42)),
                    (("JoyImageTransformerBlock", "JoyImageEditPlusTransformerBlock"), "JoyImage", "joyimage_fused",
                     "fuse_joyimage_blocks", (0, 42)),
                    (("PRXBlock",), "PRX", "prx_fused", "fuse_prx_blocks", (0, 42)),
                    (("Krea2TransformerBlock",), "Krea 2", "krea2_fused", "fuse_krea2_blocks", (0, 42)),
                    (("OmniGenBlock",), "OmniGen", "omnigen_fused", "fuse_omnigen_blocks", (0, 42)),
                    (("WanAnimate2TransformerBlock",), "Wan-Animate-2", "wananimate2_fused",
                     "fuse_wananimate2_blocks", (0, 42)),
                    (("MiniMaxH3TransformerBlock",), "MiniMax-H3", "minimaxh3_fused", "fuse_minimaxh3_blocks",
                     (0, 42)),
                    (("ErnieImageSharedAdaLNBlock",), "ERNIE-Image", "ernieimage_fused", "fuse_ernieimage_blocks",
                     (0, 42)),
                    (("BasicTransformerBlockDreamLite",), "DreamLite", "dreamlite_fused", "fuse_dreamlite_blocks",
                     (0, 42)),
                    (("Cosmos3VLTextMoTDecoderLayer",), "Cosmos 3", "cosmos3_fused", "fuse_cosmos3_layers",
                     (0, 42)),
                    (("NucleusMoEImageTransformerBlock",), "NucleusMoE", "nucleusmoe_fused", "fuse_nucleusmoe_blocks",
                     (0, 42)),
                    (("HiDreamImageTransformerBlock", "HiDreamImageSingleTransformerBlock"), "HiDream-I1",
                     "hidream_fused", "fuse_hidream_blocks", (0, 42)),
                    (("EasyAnimateTransformerBlock",), "EasyAnimate", "easyanimate_fused", "fuse_easyanimate_blocks",
                     (0, 42)))


def _diffusers_version() -> tuple[int, int]:
    import diffusers

    try:
        major, minor = (int(x) for x in diffusers.__version__.split(".")[:2])
    except ValueError:
        return (0, 0)
    return (major, minor)


def _register_fused_names(model: nn.Module) -> None:
    """diffusers finds a model's blocks by class name (``_repeated_blocks`` for ``compile_repeated_blocks``,
    ``_no_split_modules`` for device maps): the fused classes join their originals there, on the instance."""
    fused = {type(m).__mro__[1].__name__: type(m).__name__ for m in model.modules()
             if type(m).__name__.startswith("Fused")}
    for attr in ("_repeated_blocks", "_no_split_modules"):
        names = getattr(model, attr, None)
        if isinstance(names, (list, tuple)) and any(n in fused for n in names):
            setattr(model, attr, list(names) + [fused[n] for n in names if n in fused and fused[n] not in names])


def treeq_layers(model: nn.Module) -> dict[str, TreeQLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, TreeQLinear)}


def fusion_report(model: nn.Module) -> dict[str, Any]:
    """What of ``model`` runs fused: ``blocks``, each fused block class's name with its count; ``packed``, the
    packed layers with quantized activations; ``outside``, the names of those outside fused blocks, which quantize
    their own input (embedders, output projections, blocks no fused class handles)."""
    from collections import Counter

    from .linear import runs_packed_kernels

    blocks: Counter = Counter()
    inside: set[int] = set()
    for mod in model.modules():
        if type(mod).__name__.startswith("Fused") and mod is not model:
            blocks[type(mod).__name__] += 1
            inside.update(id(m) for m in mod.modules())
    packed = [(n, m) for n, m in model.named_modules() if runs_packed_kernels(m)]
    return {"blocks": dict(blocks), "packed": len(packed), "outside": [n for n, m in packed if id(m) not in inside]}


def memory_report(model: nn.Module) -> dict[str, Any]:
    """Bytes of linear weights: packed layers vs what they would take in bf16."""
    packed = sum(m.weight_bytes() for m in treeq_layers(model).values())
    bf16 = sum(2 * m.in_features * m.out_features for m in treeq_layers(model).values())
    return {"packed_bytes": packed, "bf16_bytes": bf16, "ratio": packed / bf16 if bf16 else float("nan")}
