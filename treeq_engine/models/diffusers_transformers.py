"""diffusers transformers from local directories, for the command line (``--diffusers PATH``), and how an artifact
rebuilds one. Nothing is downloaded: ``PATH`` is a transformer directory (``config.json`` +
weights, as ``save_pretrained`` writes) or a pipeline directory holding one under ``transformer/``.

DiT, PixArt, SD3, Flux, Wan, Qwen-Image, Sana, Z-Image, FLUX.2, LTX-Video and Chroma (``SUPPORTED``) go through the
whole flow (capture, search, PTQ, PEFT, packing, graphs) with cuts of their own; their blocks also fuse. Any other
diffusers transformer (HunyuanVideo, CogVideoX, Lumina2, ...) is cut generically where it can be
(``search.generic_runner``: the same flow), and packed and sampled in its pipeline in any case: its linears (and
pointwise convolutions) become packed modules (HunyuanVideo's blocks fused, the others' unfused).

    model, desc = load_transformer("models/PixArt-XL-2-512x512", dtype=torch.float16)
    model = rebuild(desc)          # same architecture, random weights (an artifact then loads into it)
"""
from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.nn as nn

# searched, calibrated, packed and fused (search.diffusers_runner.make_runner cuts each; runtime/*_fused.py fuse them)
SUPPORTED = ("DiTTransformer2DModel", "PixArtTransformer2DModel", "SD3Transformer2DModel", "FluxTransformer2DModel",
             "WanTransformer3DModel", "QwenImageTransformer2DModel", "SanaTransformer2DModel",
             "ZImageTransformer2DModel", "Flux2Transformer2DModel", "LTXVideoTransformer3DModel",
             "ChromaTransformer2DModel")
# the hub's DiT and PixArt-alpha checkpoints name the old generic class; diffusers remaps it by norm_type
# (looked up with config.get("norm_type"), which may be None: hence the str | None keys)
LEGACY: dict[str, dict[str | None, str]] = {"Transformer2DModel": {"ada_norm_zero": "DiTTransformer2DModel",
                                                                   "ada_norm_single": "PixArtTransformer2DModel"}}
# the block classes of SD3's and Flux's transformers (SmoothQuant sites, fused blocks), by name: no diffusers import
MMDIT_BLOCKS = ("JointTransformerBlock", "FluxTransformerBlock", "FluxSingleTransformerBlock")


def class_of(config: dict[str, Any]) -> str | None:
    """The transformer class a ``config.json`` names, the hub's legacy generic name resolved by ``norm_type``."""
    name = config.get("_class_name")
    return LEGACY[name].get(config.get("norm_type")) if name in LEGACY else name


def model_class(name: Any) -> type[Any] | None:
    """diffusers' model class called ``name`` (a ``ModelMixin``: what ``from_pretrained`` and ``from_config``
    build), or None when diffusers has no such model."""
    if not isinstance(name, str) or not name.isidentifier():
        return None
    try:
        import diffusers
    except ImportError:
        return None
    cls = getattr(diffusers, name, None)
    return cls if isinstance(cls, type) and issubclass(cls, diffusers.ModelMixin) else None


def transformer_dir(path: str | Path) -> Path:
    """The directory whose ``config.json`` names a diffusers model class: ``path`` or ``path/transformer``. (Which
    of them the search cuts, ``search.make_runner`` says: ``SUPPORTED`` by cuts of their own, others generically.)"""
    p = Path(path)
    for d in (p, p / "transformer"):
        cfg = d / "config.json"
        if cfg.is_file():
            try:
                config = json.loads(cfg.read_text())
                name = class_of(config)
            except (json.JSONDecodeError, AttributeError):
                raise ValueError(f"{cfg}: not a diffusers config (unreadable JSON object)") from None
            if model_class(name) is not None:
                return d
            if name is not None and (d != p or not (p / "transformer").is_dir()):
                raise ValueError(f"{cfg}: {name} is not a diffusers model class (this diffusers has none of that name)")
    raise ValueError(f"{path}: no diffusers transformer here (a directory with config.json naming a diffusers model, "
                     "or a pipeline directory with transformer/)")


def _diffusers() -> Any:
    try:
        import diffusers
    except ImportError:
        raise ImportError("--diffusers needs the diffusers package (pip install diffusers)") from None
    return diffusers


def load_transformer(path: str | Path, dtype: torch.dtype | None = None,
                     device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """The transformer under ``path`` (local files only) in eval mode, and a JSON-able description to rebuild it:
    any diffusers model class."""
    _diffusers()   # (a clear error without diffusers)
    d = transformer_dir(path)
    cls = model_class(class_of(json.loads((d / "config.json").read_text())))
    assert cls is not None   # (transformer_dir checked it)
    with loading(d):
        model = cls.from_pretrained(str(d), local_files_only=True, torch_dtype=dtype)
    model = _in_dtype(model, dtype)
    return model.to(device).eval(), describe(model, source=str(path))


def _in_dtype(model: nn.Module, dtype: torch.dtype | None) -> nn.Module:
    """``model`` at ``dtype`` when ``from_pretrained`` left it all float32: diffusers without ``accelerate`` decides
    the load dtype from the first tensor of the checkpoint, and SD3's is a float32 positional table, so the whole
    transformer stays float32 (and a half-precision pipeline then fails in its first convolution). The modules the
    class keeps in float32 (``_keep_in_fp32_modules``) stay so."""
    if dtype is None or dtype == torch.float32:
        return model
    floats = [p.dtype for p in model.parameters() if p.is_floating_point()]
    if not floats or any(dt != torch.float32 for dt in floats):   # loaded as asked (or partly kept in float32)
        return model
    return cast_keeping_fp32(model, dtype)


def cast_keeping_fp32(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``model.to(dtype)``, except the parameters and buffers the class keeps in float32
    (``_keep_in_fp32_modules``: any path component named there, e.g. Wan's time embedder, norms, modulation
    tables and rotary tables), which are left as they are (a round trip through ``dtype`` would round them)."""
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or [])
    if not keep:
        return model.to(dtype)
    saved = set(model.state_dict())   # (non-persistent buffers, rotary tables, stay as diffusers' loading leaves them)
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if t.is_floating_point() and t.dtype != dtype and not keep.intersection(name.split(".")) and name in saved:
                t.data = t.data.to(dtype)
    return model


@contextlib.contextmanager
def loading(path: str | Path) -> Iterator[None]:
    """Around diffusers' ``from_pretrained``. diffusers 0.42 renamed ``torch_dtype`` to ``dtype`` with a
    FutureWarning; older releases know only ``torch_dtype``. We pass ``torch_dtype`` (loading straight into the
    dtype, so a pipeline's fp32-kept modules stay so) and silence that one warning. A model class that keeps
    modules in float32 (Wan's ``_keep_in_fp32_modules``) loads only with ``accelerate`` installed; diffusers' own
    error names an argument the user never passed, so it is said plainly."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
        try:
            yield
        except ValueError as e:
            if "low_cpu_mem_usage" not in str(e) or "keep_in_fp32" not in str(e):
                raise
            raise ValueError(f"{path}: this model keeps some modules in float32, and diffusers loads such a model "
                             "only with the accelerate package installed (pip install accelerate)") from e


def load_pipeline(path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu", *,
                  images: bool = False) -> Any:
    """The diffusers pipeline under ``path`` (local files only), loaded at ``dtype``, on ``device``, its progress
    bars off (our commands draw their own); with ``images``, as the class that takes them (``pipeline_class``)."""
    variant = pipeline_class(path, images=images) if images else ""
    loader = getattr(_diffusers(), variant) if variant in IMAGE_VARIANTS.values() else _diffusers().DiffusionPipeline
    with loading(path):
        pipe = loader.from_pretrained(str(path), local_files_only=True, torch_dtype=dtype)
    for name in EXPERTS:
        if isinstance(getattr(pipe, name, None), nn.Module):
            setattr(pipe, name, _in_dtype(getattr(pipe, name), dtype))
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# pipelines whose ``image`` is an optional reference: without one they are text to image (FLUX.2's, FLUX.1 Kontext's)
TEXT_TO_IMAGE_WITH_OPTIONAL_IMAGE = ("Flux2Pipeline", "Flux2KleinPipeline", "FluxKontextPipeline")
# pipelines that condition one prompt on several images (a list as ``image``); the others take one per prompt
MULTI_IMAGE_PIPELINES = ("Flux2Pipeline", "Flux2KleinPipeline", "QwenImageEditPlusPipeline")
# the image-conditioned pipelines ``--images`` runs: their calls carry the image as the runners read it (image
# tokens, reference tokens or a conditioning first frame the metric leaves out) over the whole schedule; not img2img
# (a partial schedule), inpainting or control pipelines
IMAGE_PIPELINES = ("WanImageToVideoPipeline", "LTXImageToVideoPipeline", "QwenImageEditPipeline",
                   "QwenImageEditPlusPipeline", "FluxKontextPipeline", "Flux2Pipeline", "Flux2KleinPipeline")


# pipeline directories that run as another class when given images, as diffusers' examples load them: LTX-Video's
# (one model for text and image to video) as its image-to-video pipeline, and Wan 2.2 TI2V's (a ``WanPipeline``
# with ``expand_timesteps``); Wan 2.1's and 2.2 A14B's text-to-video models take no image (their image-to-video
# models are other checkpoints)
IMAGE_VARIANTS = {"WanPipeline": "WanImageToVideoPipeline", "LTXPipeline": "LTXImageToVideoPipeline"}


def _class_of(index: Any, images: bool) -> str:
    name = index.get("_class_name") if isinstance(index, dict) else None
    if not isinstance(name, str):
        return ""
    if images and name in IMAGE_VARIANTS and (name != "WanPipeline" or index.get("expand_timesteps") is True):
        return IMAGE_VARIANTS[name]
    return name


def pipeline_class(path: str | Path, *, images: bool = False) -> str:
    """The pipeline class named by ``path``'s ``model_index.json`` ("" when it names none or cannot be read); with
    ``images``, the class that runs the directory with them (``IMAGE_VARIANTS``)."""
    try:
        index = json.loads((Path(path) / "model_index.json").read_text())
    except (OSError, json.JSONDecodeError):
        return ""
    return _class_of(index, images)


def pipeline_refusal(path: str | Path, what: str, *, one_transformer: bool = True, images: bool = False,
                     takes_images: bool = True, choose: str = "") -> str | None:
    """Why command ``what`` cannot run the pipeline directory ``path`` (read from its ``model_index.json``, before
    anything loads), or None: a pipeline whose call takes an image (Wan's image-to-video, Qwen-Image-Edit; not
    FLUX.2's, whose reference images are optional) unless ``images`` (the command has them: ``--images``), a
    pipeline that takes no image when ``images``, one that needs more than prompts, class labels and images, and,
    with ``one_transformer``, one that denoises with two transformers (Wan 2.2 A14B's experts: the commands read,
    replace or sample one; ``choose``: how ``what`` picks one, said with the refusal). ``takes_images``: whether
    ``what`` has an ``--images`` option to suggest."""
    import inspect

    index_file = Path(path) / "model_index.json"
    if not index_file.is_file():
        return None
    try:
        index = json.loads(index_file.read_text())
    except json.JSONDecodeError:
        return f"{index_file}: not JSON"
    name = _class_of(index, images)
    cls = getattr(_diffusers(), name, None) if name.isidentifier() else None
    if isinstance(cls, type) and callable(getattr(cls, "__call__", None)):
        params = inspect.signature(cls.__call__).parameters
        if images and "image" not in params:
            return f"{name} takes no image: --images is for an image-conditioned pipeline"
        if images and name not in IMAGE_PIPELINES:
            return (f"--images runs the image-conditioned pipelines {', '.join(IMAGE_PIPELINES)}; {name} is not one "
                    "(img2img samples part of the schedule; inpainting and control pipelines take more than images)")
        optional_image = name in TEXT_TO_IMAGE_WITH_OPTIONAL_IMAGE or images
        needs = [q.name for q in params.values() if q.name != "self"
                 and q.kind in (q.POSITIONAL_OR_KEYWORD, q.KEYWORD_ONLY)
                 and (q.default is q.empty and q.name not in ("prompt", "class_labels", "image")
                      or q.name == "image" and not optional_image)]
        if needs == ["image"] and takes_images and name in IMAGE_PIPELINES:
            return (f"{name} takes an image for each call: give {what} --images FILE (one line per prompt: the "
                    "paths of its images)")
        if needs:
            return (f"{name} takes {', '.join(needs)} for each call: {what} runs pipelines conditioned on prompts, "
                    "class labels and images only (record another pipeline's calls in Python with capture_calls)")
    if one_transformer and index.get("transformer_2") not in (None, [None, None]):
        return (f"{name} denoises with two transformers (transformer and transformer_2: Wan 2.2's experts); "
                f"{what} handles one" + (f": {choose}" if choose else ""))
    return None


EXPERTS = ("transformer", "transformer_2")   # a two-expert pipeline's transformers (Wan 2.2 A14B): high, low noise


def experts(pipe: Any) -> list[nn.Module]:
    """A pipeline's transformers: ``transformer``, and ``transformer_2`` where it has two experts."""
    return [m for m in (getattr(pipe, n, None) for n in EXPERTS) if isinstance(m, nn.Module)]


def expert_timesteps(pipe: Any, name: str, timesteps: Sequence[float]) -> list[float]:
    """Of a schedule's ``timesteps``, those at which ``pipe`` calls its transformer ``name``: all for a pipeline
    with one transformer; with two experts split at ``boundary_ratio · num_train_timesteps`` (Wan 2.2's), those at
    or above the boundary for ``transformer`` (high noise), those below it for ``transformer_2``, as its loop
    chooses."""
    ratio = getattr(getattr(pipe, "config", None), "boundary_ratio", None)
    if name not in EXPERTS:
        raise ValueError(f"a pipeline's transformer is one of {EXPERTS}, got {name!r}")
    if ratio is None or getattr(pipe, "transformer_2", None) is None:
        if name != "transformer":
            raise ValueError(f"{type(pipe).__name__} denoises with one transformer: it has no {name}")
        return [float(t) for t in timesteps]
    boundary = float(ratio) * float(pipe.scheduler.config.num_train_timesteps)
    high = name == "transformer"
    return [float(t) for t in timesteps if (float(t) >= boundary) == high]


def guidance_kwargs(pipe: Any, scale: float) -> dict[str, Any]:
    """The pipeline arguments for classifier-free guidance at ``scale`` (``neg + scale·(pos − neg)``: 1 is no
    guidance): ``guidance_scale`` for most; Qwen-Image's "true CFG" (``true_cfg_scale``, active only with a negative
    prompt: a blank one, as its examples use), whose ``guidance_scale`` is the distilled models' guidance embedding
    that the base model ignores; Z-Image's ``guidance_scale`` is ``scale − 1`` (it computes ``pos + g·(pos − neg)``
    and guides whenever ``g > 0``: Z-Image-Turbo's 0 is our 1)."""
    name = type(pipe).__name__
    if name.startswith("QwenImage"):
        return {"true_cfg_scale": scale, **({"negative_prompt": " "} if scale > 1 else {})}
    if name.startswith("ZImage"):
        return {"guidance_scale": max(scale - 1.0, 0.0)}
    return {"guidance_scale": scale}


def area_kwargs(pipe: Any, kw: dict[str, Any]) -> dict[str, Any]:
    """FLUX.1 Kontext's pipeline rescales every image to ``max_area`` (1024² by default) whatever ``height`` and
    ``width`` say: where a pipeline takes ``max_area`` and the call sets both sides, their product (so a given size
    is the size sampled)."""
    import inspect

    if "height" in kw and "width" in kw and "max_area" in inspect.signature(pipe.__call__).parameters:
        return {"max_area": int(kw["height"]) * int(kw["width"])}
    return {}


def steps_kwargs(pipe: Any, steps: int) -> dict[str, Any]:
    """The pipeline arguments for ``steps`` denoising steps: ``num_inference_steps``; Sana-Sprint's pipeline also
    takes an intermediate SCM timestep that only exists at two steps (its default, refused at any other count), so
    at other counts it gets none."""
    kw: dict[str, Any] = {"num_inference_steps": steps}
    if type(pipe).__name__.startswith("SanaSprint") and steps != 2:
        kw["intermediate_timesteps"] = None
    return kw


def read_prompts(path: str | Path) -> list[str]:
    """A prompts file: one prompt per line, blank lines skipped."""
    return [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]


def read_images(path: str | Path, prompts: int, pipeline: str) -> list[Any]:
    """An ``--images`` file for ``prompts`` prompts of pipeline class ``pipeline``: one line per prompt (blank lines
    skipped), the path of its conditioning image, or the comma-separated paths of its images where the pipeline
    takes several (``MULTI_IMAGE_PIPELINES``), relative to the file's folder. Returns each prompt's ``image``
    argument: an RGB ``PIL.Image`` upright (its EXIF orientation applied, as diffusers' ``load_image`` does), or a
    list of them for a pipeline that takes several."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    file = Path(path)
    lines = [line.strip() for line in file.read_text().splitlines() if line.strip()]
    if len(lines) != prompts:
        raise ValueError(f"{file}: {len(lines)} lines of images for {prompts} prompts (one line per prompt)")
    multi = pipeline in MULTI_IMAGE_PIPELINES
    out: list[Any] = []
    for i, line in enumerate(lines, 1):
        names = [p.strip() for p in line.split(",") if p.strip()] if multi else [line]   # (one: a comma is a name)
        if not names:
            raise ValueError(f"{file}: line {i} names no image")
        if not multi and "," in line and not (file.parent / line).exists():
            raise ValueError(f"{file}: line {i}: no image {line!r}; {pipeline} takes one image per prompt (several: "
                             f"{', '.join(MULTI_IMAGE_PIPELINES)})")
        imgs = []
        for p in (file.parent / n for n in names):
            try:
                with Image.open(p) as im:
                    imgs.append(ImageOps.exif_transpose(im).convert("RGB"))
            except (OSError, UnidentifiedImageError) as e:   # (missing, unreadable, not an image)
                raise ValueError(f"{file}: line {i}: cannot read image {p}: {e}") from None
        out.append(imgs if multi else imgs[0])
    return out


def describe(model: nn.Module, source: str = "") -> dict[str, Any]:
    """What ``rebuild`` needs: the class and its config (JSON-able values only). Any diffusers model."""
    name = type(model).__name__
    if model_class(name) is None or not isinstance(model, model_class(name)):  # type: ignore[arg-type]
        raise ValueError(f"{name} is not a diffusers model class")
    config = {k: v for k, v in dict(model.config).items() if not k.startswith("_")}
    return {"arch": "diffusers", "class": name, "config": json.loads(json.dumps(config, default=list)),
            "source": source}


def rebuild(desc: dict[str, Any], device: str | torch.device = "cpu") -> nn.Module:
    """A fresh model of the described architecture (random weights)."""
    name = desc.get("class")
    cls = model_class(name)
    if desc.get("arch") != "diffusers" or cls is None or not isinstance(desc.get("config"), dict):
        raise ValueError(f"not a diffusers model description: arch {desc.get('arch')!r}, class {name!r}")
    with torch.device(device):
        return cls.from_config(desc["config"]).eval()


@torch.no_grad()
def dit_to_diffusers(model: nn.Module) -> nn.Module:
    """Our DiT (``models.DiT``: the official layout) as diffusers' ``DiTTransformer2DModel`` with the same weights:
    ``qkv`` split into ``to_q/to_k/to_v``, the timestep and label embedders copied into every block's ``norm1.emb``
    (diffusers keeps one per block), LayerNorm ε = 1e-6 as the official model, the positional table copied.

    One difference is not in diffusers' config: its DiT computes the timestep frequencies as
    ``exp(−ln(10⁴)·i / (half − 1))`` (``downscale_freq_shift=1``) where the official DiT divides by ``half``.
    The returned model is set to the official formula (``time_proj.downscale_freq_shift = 0`` in every block), so
    its outputs are ours up to float rounding; saved and reloaded by diffusers it would use diffusers' own, as every
    hub DiT does (1–2 % relative L2 on the digits DiT's output for random inputs and timesteps)."""
    from .dit import DiT

    if not isinstance(model, DiT):
        raise TypeError(f"dit_to_diffusers converts the project's DiT (models.DiT), got {type(model).__name__}")
    d = _diffusers()
    c = model.config
    out = d.DiTTransformer2DModel(
        num_attention_heads=c.num_heads, attention_head_dim=c.hidden_size // c.num_heads, in_channels=c.in_channels,
        out_channels=c.out_channels, num_layers=c.depth, sample_size=c.input_size, patch_size=c.patch_size,
        num_embeds_ada_norm=c.num_classes, norm_type="ada_norm_zero", norm_eps=1e-6,
        activation_fn="gelu-approximate").eval()
    p = next(model.parameters())
    # nn.Module.to: diffusers' own .to warns about fp32-kept modules, which its DiT has none of
    out = nn.Module.to(out, device=p.device, dtype=p.dtype)
    if round(c.mlp_ratio * c.hidden_size) != 4 * c.hidden_size:
        raise ValueError(f"diffusers' DiT has an MLP of 4x the width; this DiT's mlp_ratio is {c.mlp_ratio}")

    def copy(dst: nn.Module, src: nn.Module) -> None:
        dst.weight.copy_(src.weight)
        if getattr(src, "bias", None) is not None:
            dst.bias.copy_(src.bias)

    copy(out.pos_embed.proj, model.x_embedder.proj)
    out.pos_embed.pos_embed.copy_(model.pos_embed.reshape(out.pos_embed.pos_embed.shape))
    h = c.hidden_size
    for blk, ref in zip(out.transformer_blocks, model.blocks):
        emb = blk.norm1.emb
        copy(emb.timestep_embedder.linear_1, model.t_embedder.mlp[0])
        copy(emb.timestep_embedder.linear_2, model.t_embedder.mlp[2])
        table = model.y_embedder.embedding_table.weight   # no null-class row when trained without dropout:
        emb.class_embedder.embedding_table.weight[:table.shape[0]].copy_(table)   # diffusers' stays, unused
        emb.time_proj.downscale_freq_shift = 0
        copy(blk.norm1.linear, ref.adaLN_modulation[1])
        for i, name in enumerate(("to_q", "to_k", "to_v")):   # qkv rows are (3, heads, head_dim)
            lin = getattr(blk.attn1, name)
            lin.weight.copy_(ref.attn.qkv.weight[i * h:(i + 1) * h])
            lin.bias.copy_(ref.attn.qkv.bias[i * h:(i + 1) * h])
        copy(blk.attn1.to_out[0], ref.attn.proj)
        copy(blk.ff.net[0].proj, ref.mlp.fc1)
        copy(blk.ff.net[2], ref.mlp.fc2)
    copy(out.proj_out_1, model.final_layer.adaLN_modulation[1])
    copy(out.proj_out_2, model.final_layer.linear)
    return out
