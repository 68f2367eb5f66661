"""The search's segment runner for diffusers transformers: ``DiTTransformer2DModel`` (adaLN-Zero, class labels)
and ``PixArtTransformer2DModel`` (adaLN-single, text cross-attention); ``make_runner`` picks this one or another
module's for every class the search cuts.

    runner = DiffusersRunner(transformer)                       # checks the architecture
    with capture_calls(runner) as calls:                        # the pipeline's own calls, as it samples
        pipe(...)
    inputs = calls.inputs()                                     # or runner.inputs(...) from tensors you have
    out = search(transformer, runner, inputs, SearchConfig(Budget.parse("W4A4")), out_dir="out")

The model is cut where the search needs it (``SegmentRunner``): segment 0 runs the embedders (patch embedding,
timestep/label embedding, PixArt's caption projection), segments ``1..B`` the transformer blocks, and the last one
the output head and unpatchify. Each segment does what the model's own ``forward`` does between those points
(a test holds the segments' composition bit-identical to ``transformer(...).sample``), so the searched linears,
their forward order and their inputs are the model's.

Calibration inputs are tuples of tensors with the sample on dim 0, in the order of ``input_names``:

* DiT: ``hidden_states (N, C, H, W)``, ``timestep (N,)``, ``class_labels (N,)``;
* PixArt: ``hidden_states``, ``encoder_hidden_states (N, L, D)``, ``timestep (N,)``, ``encoder_attention_mask
  (N, L)`` (1 keeps a caption token; give ones when the pipeline passes none), and with
  ``use_additional_conditions`` (the 1024-px models) ``resolution (N, 2)`` and ``aspect_ratio (N, 1)``.

The MSE is taken on the noise prediction: the first ``in_channels`` output channels when the model also predicts
the variance (``out_channels == 2·in_channels``, as diffusers' pipelines split it), else the whole output.
"""
from __future__ import annotations

import json
from typing import Any, Callable, Mapping, Sequence, cast

import torch
import torch.nn as nn
import torch.nn.functional as F

from .evaluator import CutModel, State, describe_arg, kept_rows, run_segments, sample_scalars, sample_timesteps

DIT, PIXART = "dit", "pixart"
VIDEO_ARCHS = ("wan", "ltx")   # the searched text-to-video transformers (their pipelines take num_frames)


def diffusers_arch(model: nn.Module) -> str | None:
    """``"dit"`` / ``"pixart"`` for the diffusers transformers this runner cuts, ``"sd3"`` / ``"flux"`` for those
    ``mmdit_runner.MMDiTRunner`` cuts, ``"wan"`` for ``wan_runner.WanRunner``'s, ``"qwen-image"`` for
    ``qwen_runner.QwenImageRunner``'s, ``"sana"`` for ``sana_runner.SanaRunner``'s, ``"z-image"`` for
    ``zimage_runner.ZImageRunner``'s, ``"flux2"`` for ``flux2_runner.Flux2Runner``'s, ``"ltx"`` for
    ``ltx_runner.LTXRunner``'s, ``"chroma"`` for ``chroma_runner.ChromaRunner``'s, ``None`` for anything else
    (``make_runner`` takes each of them); ``"generic:<class>"`` for another diffusers transformer the generic cut takes
    (``generic_runner.GenericRunner``)."""
    arch = _runner_for(model)[0]
    if arch is None:
        from .generic_runner import generic_arch

        arch = generic_arch(model)
    return arch


def _runner_for(model: nn.Module) -> tuple[str | None, Any]:
    """``(arch, runner class)`` of the first runner that cuts ``model``, or ``(None, None)``."""
    from .chroma_runner import ChromaRunner, chroma_arch
    from .flux2_runner import Flux2Runner, flux2_arch
    from .ltx_runner import LTXRunner, ltx_arch
    from .mmdit_runner import MMDiTRunner, mmdit_arch
    from .qwen_runner import QwenImageRunner, qwen_arch
    from .sana_runner import SanaRunner, sana_arch
    from .wan_runner import WanRunner, wan_arch
    from .zimage_runner import ZImageRunner, zimage_arch

    for arch_of, cls in ((mmdit_arch, MMDiTRunner), (wan_arch, WanRunner), (qwen_arch, QwenImageRunner),
                         (sana_arch, SanaRunner), (zimage_arch, ZImageRunner), (flux2_arch, Flux2Runner),
                         (ltx_arch, LTXRunner), (chroma_arch, ChromaRunner), (fused_arch, DiffusersRunner)):
        arch = arch_of(model)
        if arch is not None:
            return arch, cls
    return None, None


def fused_arch(model: nn.Module) -> str | None:
    """``"dit"`` / ``"pixart"``: the two this module's runner cuts (and the runtime fuses), else ``None``."""
    cfg = getattr(model, "config", None)
    if not hasattr(model, "transformer_blocks") or cfg is None:
        return None
    norm = getattr(cfg, "norm_type", None) if not isinstance(cfg, Mapping) else cfg.get("norm_type")
    name = type(model).__name__
    if name == "DiTTransformer2DModel" and norm == "ada_norm_zero":
        return DIT
    if name == "PixArtTransformer2DModel" and norm == "ada_norm_single":
        return PIXART
    return None


def make_runner(model: nn.Module) -> Any:
    """The segment runner of a diffusers transformer the search cuts: ``DiffusersRunner`` for DiT and PixArt,
    ``MMDiTRunner`` for SD3 and Flux, ``WanRunner`` for Wan, ``QwenImageRunner`` for Qwen-Image, ``SanaRunner`` for
    Sana, ``ZImageRunner`` for Z-Image, ``Flux2Runner`` for FLUX.2, ``LTXRunner`` for LTX-Video, ``ChromaRunner``
    for Chroma. Anything else is a ``TypeError`` naming what is supported."""
    from ..models.diffusers_transformers import SUPPORTED, model_class

    runner = model.__dict__.get(GENERIC_ATTR)
    if runner is not None:   # (the generic cut's, kept on its model: its inputs and trace are learned once)
        return runner
    _, cls = _runner_for(model)
    if cls is None:
        from .generic_runner import GenericRunner, generic_arch

        if generic_arch(model) is None:
            what = (f"the search cuts diffusers' {', '.join(SUPPORTED)}, and other diffusers transformers with block "
                    f"lists and a timestep argument; got {type(model).__name__}")
            if model_class(type(model).__name__) is not None:   # a diffusers model: the user's input
                raise ValueError(what)
            raise TypeError(what)
        runner = GenericRunner(model)
        model.__dict__[GENERIC_ATTR] = runner   # (not a module attribute: no state dict, no hooks)
        return runner
    return cls(model)


GENERIC_ATTR = "_treeq_generic_runner"


def attention_tie(layer_name: str) -> str | None:
    """The tie of an ``attn1`` (self-attention: to_q/to_k/to_v on one input) / ``attn2`` (cross-attention: to_k/to_v
    on the captions) block layout, PixArt's and Sana's."""
    head, _, last = layer_name.rpartition(".")
    if head.endswith(".attn1") and last in ("to_q", "to_k", "to_v"):
        return head + ".qkv"
    if head.endswith(".attn2") and last in ("to_k", "to_v"):
        return head + ".kv"
    return None


def checked_captions(enc: Any, mask: Any, n: int, width: int,
                     device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A call's padded captions ``(n, L, width)`` and their keep-mask ``(n, L)`` (ones when the pipeline passes
    none), checked: Sana's and LTX-Video's inputs, PixArt-style."""
    if not isinstance(enc, torch.Tensor) or enc.dim() != 3 or enc.shape[0] != n or enc.shape[2] != width:
        raise ValueError(f"encoder_hidden_states must be (N={n}, L, {width}), got {describe_arg(enc)}")
    if mask is None:
        return enc, torch.ones(n, enc.shape[1], device=device)
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (n, enc.shape[1]):
        raise ValueError(f"encoder_attention_mask must be a (N={n}, L={enc.shape[1]}) keep-mask (1 keeps a token), "
                         f"got {describe_arg(mask)}")
    return enc, mask


def caption_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A ``(N, L)`` keep-mask as the ``(N, 1, L)`` attention bias the PixArt-style models make of it (0 keeps a token,
    -10000 hides it)."""
    return ((1 - mask.to(dtype)) * -10000.0).unsqueeze(1)


def caption_rows(layer_name: str, state: State) -> torch.Tensor | None:
    """The real rows of a layer reading padded captions in PixArt's and Sana's cut: the caption projection's (segment
    0's input tuple holds the keep-mask at 3) and cross-attention's to_k/to_v (a block's state holds the caption
    bias at 2: 0 keeps a token, -10000 hides it); ``None`` for every other layer."""
    parts = layer_name.split(".")
    if parts[0] == "caption_projection":
        return kept_rows(state[3])
    if len(parts) == 4 and parts[2] == "attn2" and parts[3] in ("to_k", "to_v"):
        return kept_rows(state[2][:, 0] == 0)
    return None


class DiffusersRunner(CutModel):
    """``SegmentRunner`` for a diffusers DiT or PixArt transformer (see the module docstring)."""

    head_modules = ("proj_out", "proj_out_1", "proj_out_2", "norm_out")   # (DiT's head is adaLN-Zero's two)

    def __init__(self, model: nn.Module, *, output_fn: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        arch = fused_arch(model)
        if arch is None:
            raise TypeError(f"DiffusersRunner cuts diffusers' DiTTransformer2DModel (norm_type 'ada_norm_zero') and "
                            f"PixArtTransformer2DModel (norm_type 'ada_norm_single'); got {type(model).__name__}"
                            f" (norm_type {getattr(getattr(model, 'config', None), 'norm_type', None)!r})")
        self.model: Any = model   # a diffusers transformer: its submodules are read by name
        self.arch = arch
        self.pads_rows = arch == PIXART   # (its captions: real_rows)
        self.blocks = model.transformer_blocks
        self.num_segments = len(self.blocks) + 2
        self.patch = int(model.config.patch_size)
        self.in_channels, self.out_channels = int(model.config.in_channels), int(model.out_channels)
        self._grids: dict[int, tuple[int, int]] = {}
        # the model's attribute, not its config: None in a config means "sample_size == 128" to PixArt's __init__
        self.extra_conditions = arch == PIXART and bool(model.use_additional_conditions)
        if output_fn is None and self.out_channels == 2 * self.in_channels:
            c = self.in_channels
            output_fn = lambda out: out[:, :c]  # noqa: E731  (the ε half of a learned-σ output)
        self.output_fn = output_fn

    @property
    def input_names(self) -> tuple[str, ...]:
        if self.arch == DIT:
            return ("hidden_states", "timestep", "class_labels")
        extra = ("resolution", "aspect_ratio") if self.extra_conditions else ()
        return ("hidden_states", "encoder_hidden_states", "timestep", "encoder_attention_mask") + extra

    def tie(self, layer_name: str) -> str | None:
        """Linears that read one input, searched as one leaf (``SearchSpace.build(tie=...)``): self-attention's
        to_q/to_k/to_v, and cross-attention's to_k/to_v (both on the captions). Our DiT's attention is one qkv
        linear; the fused runtime quantizes such a group's input once when their activation specs agree and none
        has a Monarch branch (a branch's first stage reads the unquantized rows, so each branched layer runs its
        own quantization kernel)."""
        return attention_tie(layer_name)

    def real_rows(self, layer_name: str, state: State) -> torch.Tensor | None:
        """PixArt's captions are padded (to 120 or 300 tokens) and the mask hides the padding from cross-attention:
        the caption projection's and cross-attention's to_k/to_v rows of padding are not real."""
        return caption_rows(layer_name, state) if self.arch == PIXART else None

    # -- inputs ------------------------------------------------------------------------------------
    def inputs(self, hidden_states: torch.Tensor, timestep: torch.Tensor | float | int | None = None,
               class_labels: torch.Tensor | None = None, *, encoder_hidden_states: torch.Tensor | None = None,
               encoder_attention_mask: torch.Tensor | None = None,
               added_cond_kwargs: Mapping[str, torch.Tensor | None] | None = None,
               attention_mask: torch.Tensor | None = None,
               cross_attention_kwargs: Mapping[str, Any] | None = None, check_values: bool = True,
               **_: Any) -> State:
        """One transformer call's arguments (as a pipeline passes them) as this runner's input tuple: the
        timestep broadcast to the batch, a missing caption mask as ones. What the search cannot reproduce is an
        error: a self-attention mask, attention kwargs, a caption-bias mask, missing conditions.
        ``check_values=False`` skips the checks that read values back from the device (the class-label range)."""
        if not torch.is_tensor(hidden_states) or hidden_states.dim() != 4:
            raise ValueError(f"hidden_states must be a (N, C, H, W) latent tensor, got "
                             f"{tuple(hidden_states.shape) if torch.is_tensor(hidden_states) else type(hidden_states)}")
        if attention_mask is not None:
            raise ValueError("the search does not support a self-attention mask (attention_mask); pipelines pass None")
        if cross_attention_kwargs:
            raise ValueError(f"the search runs the default attention; cross_attention_kwargs "
                             f"{sorted(cross_attention_kwargs)} are not supported")
        n, c, hh, ww = hidden_states.shape
        if c != self.in_channels or hh % self.patch or ww % self.patch:
            raise ValueError(f"hidden_states must be (N, {self.in_channels}, H, W) with H and W multiples of the patch "
                             f"size {self.patch}, got {tuple(hidden_states.shape)}")
        if self.arch == DIT and hh != ww:   # its head takes the grid as √tokens, as diffusers' DiT does
            raise ValueError(f"a DiT's latents must be square, got {hh}x{ww}")
        t = sample_scalars("timestep", timestep, n, hidden_states.device)
        if self.arch == DIT:
            if class_labels is None or tuple(class_labels.shape) != (n,) or torch.is_floating_point(class_labels):
                raise ValueError(f"a DiT call needs integer class_labels of shape ({n},), got "
                                 f"{None if class_labels is None else (tuple(class_labels.shape), class_labels.dtype)}")
            classes = int(self.model.config.num_embeds_ada_norm)   # the table has a null-class row after them
            if check_values and class_labels.numel() and (int(class_labels.min()) < 0 or
                                                          int(class_labels.max()) > classes):
                raise ValueError(f"class labels must be in [0, {classes}] ({classes}: the null class), got "
                                 f"{int(class_labels.min())}..{int(class_labels.max())}")
            return (hidden_states, t, class_labels)
        if encoder_hidden_states is None or encoder_hidden_states.dim() != 3 or encoder_hidden_states.shape[0] != n:
            raise ValueError(f"a PixArt call needs encoder_hidden_states (N={n}, L, D), got "
                             f"{None if encoder_hidden_states is None else tuple(encoder_hidden_states.shape)}")
        cfg = self.model.config   # captions are projected from caption_channels, or come at the cross-attention width
        width = cfg.caption_channels or cfg.cross_attention_dim or getattr(self.model, "inner_dim", None)
        if encoder_hidden_states.shape[2] != width:
            raise ValueError(f"encoder_hidden_states must have {width} features, got {encoder_hidden_states.shape[2]}")
        length = encoder_hidden_states.shape[1]
        if encoder_attention_mask is None:
            mask = torch.ones(n, length, device=hidden_states.device)
        elif encoder_attention_mask.dim() == 2 and tuple(encoder_attention_mask.shape) == (n, length):
            mask = encoder_attention_mask
        else:
            raise ValueError(f"encoder_attention_mask must be a (N={n}, L={length}) keep-mask (1 keeps a token), "
                             f"got shape {tuple(encoder_attention_mask.shape)}")
        out: State = (hidden_states, encoder_hidden_states, t, mask)
        if self.extra_conditions:
            kw = dict(added_cond_kwargs or {})
            res, ar = kw.get("resolution"), kw.get("aspect_ratio")
            if not torch.is_tensor(res) or not torch.is_tensor(ar):
                raise ValueError("this PixArt uses additional conditions: added_cond_kwargs needs 'resolution' and "
                                 "'aspect_ratio' tensors")
            assert res is not None and ar is not None   # (both are tensors: checked above)
            out += (res.reshape(n, -1), ar.reshape(n, -1))
        return out

    def _block(self, i: int, state: State) -> State:
        block = self.blocks[i]
        if self.arch == DIT:
            h, t, y = state
            return (block(h, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
                          timestep=t, cross_attention_kwargs=None, class_labels=y), t, y)
        h, enc, bias, t6, emb = state
        return (block(h, attention_mask=None, encoder_hidden_states=enc, encoder_attention_mask=bias,
                      timestep=t6, cross_attention_kwargs=None, class_labels=None), enc, bias, t6, emb)

    # -- the model's forward, cut ------------------------------------------------------------------
    def _embed(self, state: State) -> State:
        """DiT: ``(h, t, y)``; PixArt: ``(h, captions, caption bias, adaLN-single t, embedded t)``. PixArt's
        latents need not be square: the patch grid is remembered by token count for the head (a host value, so
        the head does not read it back from the device)."""
        m = self.model
        x = state[0]
        n = x.shape[0]
        h = m.pos_embed(x)
        if self.arch == DIT:
            _, t, y = state
            return (h, t, y)
        grid = (x.shape[-2] // self.patch, x.shape[-1] // self.patch)
        if self._grids.setdefault(grid[0] * grid[1], grid) != grid:
            raise ValueError(f"latents of {grid[0] * grid[1]} patches came as {self._grids[grid[0] * grid[1]]} and "
                             f"{grid} grids: use one aspect ratio per token count")
        _, enc, t, mask = state[:4]
        bias = caption_bias(mask, h.dtype)
        cond = {"resolution": state[4], "aspect_ratio": state[5]} if self.extra_conditions else None
        t6, emb = m.adaln_single(t, cond, batch_size=n, hidden_dtype=h.dtype)
        if m.caption_projection is not None:
            enc = m.caption_projection(enc).view(n, -1, h.shape[-1])
        return (h, enc, bias, t6, emb)

    def _head(self, state: State) -> torch.Tensor:
        m = self.model
        h = state[0]
        if self.arch == DIT:
            _, t, y = state
            cond = self.blocks[0].norm1.emb(t, y, hidden_dtype=h.dtype)
            shift, scale = m.proj_out_1(F.silu(cond)).chunk(2, dim=1)
            h = m.norm_out(h) * (1 + scale[:, None]) + shift[:, None]
            h = m.proj_out_2(h)
            height = width = int(h.shape[1] ** 0.5)   # as the model: square latents
        else:
            emb = state[4]
            shift, scale = (m.scale_shift_table[None] + emb[:, None].to(m.scale_shift_table.device)).chunk(2, dim=1)
            h = m.norm_out(h)
            h = h * (1 + scale.to(h.device)) + shift.to(h.device)
            h = m.proj_out(h).squeeze(1)
            if h.shape[1] not in self._grids:
                raise RuntimeError(f"no latent grid of {h.shape[1]} patches went through segment 0")
            height, width = self._grids[h.shape[1]]
        p, c = self.patch, self.out_channels
        h = h.reshape(-1, height, width, p, p, c)
        h = torch.einsum("nhwpqc->nchpwq", h)
        return h.reshape(-1, c, height * p, width * p)


def diffusers_eps(model: nn.Module, batch: Sequence[torch.Tensor]) -> torch.Tensor:
    """The prediction of a diffusers DiT/PixArt (noise) or SD3/Flux (velocity) on one input tuple (``calib.peft``'s
    ``eps_fn``)."""
    return run_segments(make_runner(model), cast(State, batch))   # (any sequence: it makes its own tuple)


def check_stored(runner: Any, inputs: State) -> None:
    """The checks a captured call passes, on a stored input tuple (``runner.input_names`` order): shapes against the
    model's config, and what one call must share across its samples (position ids, grids). A ``ValueError`` names
    what is wrong."""
    if hasattr(runner, "check_stored"):   # (a runner whose inputs are not the forward's arguments by name)
        return runner.check_stored(inputs)
    kw = dict(zip(runner.input_names, inputs))
    if runner.extra_conditions:
        kw["added_cond_kwargs"] = {"resolution": kw.pop("resolution"), "aspect_ratio": kw.pop("aspect_ratio")}
    runner.inputs(**kw)


def stack_inputs(calls: Sequence[State], ragged: Mapping[int, float] | None = None) -> State:
    """Input tuples of several calls as one (concatenated along the sample dim), checking they agree. ``ragged``:
    inputs (by position) whose dim 1 may differ between calls, padded to the longest with the given value (a
    runner's ``ragged``: Qwen-Image's prompts and their mask, padded per call)."""
    if not calls:
        raise ValueError("no transformer calls were captured")
    width = {len(c) for c in calls}
    if len(width) != 1:
        raise ValueError(f"captured calls have different input counts: {sorted(width)}")
    out = []
    for i in range(len(calls[0])):
        if ragged and i in ragged:
            longest = max(c[i].shape[1] for c in calls)
            calls = [c[:i] + (F.pad(c[i], (0, 0) * (c[i].dim() - 2) + (0, longest - c[i].shape[1]),
                                    value=ragged[i]),) + c[i + 1:] for c in calls]
        shapes = {tuple(c[i].shape[1:]) for c in calls}
        if len(shapes) != 1:
            raise ValueError(f"input {i} changes shape between calls ({sorted(shapes)}): capture calls of one "
                             "resolution and caption length per calibration set")
        out.append(torch.cat([c[i].detach() for c in calls]))
    return tuple(out)


class CapturedCalls:
    """The transformer calls made while the context is open (``capture_calls``), as input tuples on the CPU."""

    def __init__(self, runner: Any) -> None:
        self.runner = runner
        self.calls: list[State] = []
        self.timesteps: list[float] = []
        self.skipped = 0   # calls at timesteps not asked for

    def inputs(self, timesteps: int | None = None) -> State:
        """The calibration inputs: every captured call, or only the calls at ``timesteps`` distinct timestep
        values evenly spaced over those seen (first and last included), every pipeline run's calls at them."""
        calls = self.calls
        if timesteps is not None:
            if not self.timesteps:
                raise ValueError("no transformer calls were captured")
            keep = set(select_timesteps(self.timesteps, timesteps))
            calls = [c for c, t in zip(self.calls, self.timesteps) if t in keep]
        names = self.runner.input_names
        ragged = {names.index(k): v for k, v in getattr(self.runner, "ragged", {}).items()}
        if any(len({c[i].shape[1] for c in calls}) > 1 for i in ragged):
            self.runner.saw_padding()   # calls it read unpadded now hold padding: it must mask from here on
        return stack_inputs(calls, ragged)


class capture_calls:
    """Record every call of a diffusers transformer as the search's input tuples::

        runner = DiffusersRunner(pipe.transformer)
        with capture_calls(runner) as calls:
            pipe(class_labels=[0, 1, 2, 3], num_inference_steps=25, generator=torch.manual_seed(0))
        inputs = calls.inputs(timesteps=8)        # 8 of the 25 steps, every sample (with CFG: both halves)

    ``keep``: only calls at these timestep values are stored (``select_timesteps`` picks them from the
    scheduler's; the rest are counted in ``skipped``): a long capture then holds only what it keeps. A call the
    search could not reproduce (a self-attention mask, attention kwargs) is an error at once."""

    def __init__(self, runner: Any, keep: Sequence[float] | None = None) -> None:
        import inspect

        self.runner = runner
        self.keep = None if keep is None else {float(v) for v in keep}
        self.captured = CapturedCalls(runner)
        self._signature = inspect.signature(runner.model.forward)
        self._handle: Any = None

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        bound = self._signature.bind(*args, **kwargs)
        state = self.runner.inputs(**bound.arguments)
        t = sample_timesteps(state[self.runner.input_names.index("timestep")])
        if bool((t != t[0]).any()):
            raise ValueError("a captured call mixes timesteps within its batch; the calibration groups calls by "
                             "timestep")
        if self.keep is not None and float(t[0]) not in self.keep:
            self.captured.skipped += 1
            return
        self.captured.calls.append(tuple(v.detach().to("cpu", copy=True) for v in state))
        self.captured.timesteps.append(float(t[0]))

    def __enter__(self) -> CapturedCalls:
        self._handle = self.runner.model.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self.captured

    def __exit__(self, *exc: Any) -> None:
        self._handle.remove()


def select_timesteps(timesteps: Sequence[float] | torch.Tensor, k: int) -> list[float]:
    """``k`` of a schedule's distinct timesteps, evenly spaced in sampling order, first and last included."""
    seen = sorted({float(v) for v in torch.as_tensor(timesteps).flatten().tolist()}, reverse=True)
    if not 0 < k <= len(seen):
        raise ValueError(f"timesteps must be in [1, {len(seen)}] (distinct timesteps of the schedule), got {k}")
    return [seen[i] for i in sorted({round(i * (len(seen) - 1) / max(k - 1, 1)) for i in range(k)})]


def save_inputs(path: str, runner: Any, inputs: Sequence[torch.Tensor], *,
                weights: Mapping[float, float] | None = None, scheduler: Any = "") -> None:
    """Calibration inputs as safetensors, named by ``runner.input_names`` (what ``load_inputs`` checks), with the
    schedule's sampler weights ``{timestep: c(t)²}`` when given (``diffusers_schedule.scheduler_weights``; every
    sample's timestep must have one). ``scheduler`` says what made them: the scheduler itself (its class and
    settings are stored, so that ``schedule_drift`` notices when the pipeline's changes) or a label."""
    from safetensors.torch import save_file

    from . import diffusers_schedule

    if len(inputs) != len(runner.input_names):
        raise ValueError(f"{len(inputs)} input tensors for the {len(runner.input_names)} names {runner.input_names}")
    meta = {"schema": "treeq-diffusers-calibration", "arch": runner.arch}
    if hasattr(runner, "metadata"):   # (what a runner keeps of its inputs beside them: the generic cut's spec)
        meta.update(runner.metadata())
    if weights is not None:
        diffusers_schedule.per_sample(weights, inputs[runner.input_names.index("timestep")], path)
        if isinstance(scheduler, str):
            meta.update(diffusers_schedule.to_metadata(weights, scheduler))
        else:
            steps = getattr(scheduler, "num_inference_steps", None)
            label = type(scheduler).__name__ + ("" if steps is None else f" {steps} steps")
            meta.update(diffusers_schedule.to_metadata(weights, label, diffusers_schedule.config_of(scheduler)))
    try:
        save_file({n: t.detach().cpu().contiguous() for n, t in zip(runner.input_names, inputs)}, path, metadata=meta)
    except Exception as e:   # safetensors' own error type (e.g. a read-only folder): an OSError, as open() gives
        if isinstance(e, (OSError, ValueError)):
            raise
        raise OSError(f"{path}: cannot write the calibration inputs ({e})") from None


def schedule_drift(path: str, pipeline: str) -> str | None:
    """A note when the sampler weights in calibration file ``path`` were measured on another scheduler (class or
    settings) than the one pipeline directory ``pipeline`` now holds; None when they match, or when either side
    does not say (weights stored without their scheduler's settings compare by class)."""
    from safetensors import safe_open

    from . import diffusers_schedule as ds

    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    if ds.METADATA_KEY not in meta:
        return None
    made_by = (meta.get(ds.SCHEDULER_KEY) or "").strip()
    now = ds.pipeline_scheduler_config(pipeline)
    if now is None:
        return None
    if ds.CONFIG_KEY in meta:
        try:
            stored = json.loads(meta[ds.CONFIG_KEY])
        except ValueError:
            stored = None
        if not isinstance(stored, dict):
            raise ValueError(f"{path}: malformed {ds.CONFIG_KEY} metadata (expected a JSON object)")
    else:   # a label only: comparable, by class alone, when it starts with a scheduler's class name
        cls = made_by.split()[0] if made_by else ""
        if not cls.endswith("Scheduler"):
            return None
        stored = {**now, "_class_name": cls}
    drift = ds.config_drift(stored, now)
    if drift is None:
        return None
    return (f"the sampler weights in {path} are {made_by or 'another scheduler'}'s, and the pipeline's scheduler "
            f"differs ({drift}): capture again to match it")


def load_weights(path: str, runner: Any) -> dict[float, float] | None:
    """The sampler weights ``{timestep: c(t)²}`` a calibration file holds (``treeq capture`` stores the pipeline
    scheduler's), checked to cover every sample's timestep; None when it holds none."""
    from safetensors import safe_open

    from . import diffusers_schedule

    with safe_open(path, framework="pt") as f:
        weights = diffusers_schedule.from_metadata(f.metadata() or {}, path)
        if weights is not None:
            diffusers_schedule.per_sample(weights, f.get_tensor("timestep"), path)
    return weights


def inputs_digest(path: str) -> str:
    """A digest of a calibration file's contents (tensor names, dtypes, shapes, bytes, metadata), independent of
    how the file lays them out (safetensors may write the same header in another order)."""
    import hashlib

    from safetensors import safe_open

    h = hashlib.sha256()
    with safe_open(path, framework="pt") as f:
        h.update(repr(sorted((f.metadata() or {}).items())).encode())
        for name in sorted(f.keys()):
            t = f.get_tensor(name).contiguous()
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.flatten().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def load_inputs(path: str, runner: Any, *, samples: int | None = None, padding: bool = True,
                shapes_only: bool = False) -> State:
    """Inputs ``save_inputs`` wrote, checked against the runner's architecture and input names; only the first
    ``samples`` when given (read from the file alone). The generic cut's check: ``padding=False`` traces no
    padding rules (only calibration statistics read them); ``shapes_only`` holds nothing to the model's values (a
    profile prices shapes)."""
    from safetensors import safe_open

    try:
        f = safe_open(path, framework="pt")
    except FileNotFoundError:
        raise
    except Exception as e:   # safetensors' own error type: a truncated or foreign file
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    with f:
        meta = f.metadata() or {}
        if meta.get("schema") != "treeq-diffusers-calibration":
            raise ValueError(f"{path}: not a TreeQ diffusers calibration file (schema {meta.get('schema')!r})")
        if meta.get("arch") != runner.arch:
            raise ValueError(f"{path}: inputs of a {meta.get('arch')!r} transformer, this one is {runner.arch!r}")
        if hasattr(runner, "configure"):   # (the generic cut's inputs: named in the metadata)
            runner.configure(meta, path)
        missing = [n for n in runner.input_names if n not in f.keys()]
        if missing:
            raise ValueError(f"{path}: missing inputs {missing} (has {sorted(f.keys())})")
        extra = sorted(set(f.keys()) - set(runner.input_names))
        if extra:   # e.g. a guidance-distilled Flux's guidance, offered to one without: another variant's calls
            raise ValueError(f"{path}: holds inputs this {type(runner.model).__name__} does not take: {extra} "
                             f"(it takes {list(runner.input_names)}); captured from another variant of the model?")
        out = tuple(f.get_tensor(n) if samples is None else f.get_slice(n)[:samples] for n in runner.input_names)
    n = out[0].shape[0] if out[0].dim() else 0
    if any(t.dim() == 0 or t.shape[0] != n for t in out) or n == 0:
        raise ValueError(f"{path}: inputs must share a non-empty sample dim, got {[tuple(t.shape) for t in out]}")
    try:
        check_stored(runner, out)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    # float inputs at the model's dtype (a capture in half precision feeds a float32 search); timesteps (and what
    # else a runner needs exact: exact_inputs) as stored
    dtype = next(runner.model.parameters()).dtype
    exact = getattr(runner, "exact_inputs", ("timestep",))
    out = tuple(t.to(dtype) if torch.is_floating_point(t) and name not in exact else t
                for name, t in zip(runner.input_names, out))
    if hasattr(runner, "check"):   # (the generic cut: traced and held to the model on some of the samples)
        try:
            runner.check(out, padding=padding, shapes_only=shapes_only)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
    return out
