"""The search's segment runner for diffusers' MMDiT transformers: ``SD3Transformer2DModel`` (SD3, SD3.5) and
``FluxTransformer2DModel`` (FLUX.1). The same interface as ``DiffusersRunner`` (``make_runner`` picks one), so
capture, search, PTQ and PEFT take these models too; the runtime packs them and fuses their blocks
(``runtime/mmdit_fused.py``).

Segments: 0 runs the embedders (patch or latent embedding, timestep + pooled-text (+ guidance) embedding, the
context embedder), ``1..B`` the joint blocks (and for Flux then the single-stream blocks), the last one the output
norm and projection (and SD3's unpatchify). Each does what the model's ``forward`` does between those points (a
test holds their composition bit-identical to ``transformer(...).sample``). The state between blocks is
``(image tokens, text tokens, temb)``, and for Flux also the text and image position ids, per sample (the model
takes them unbatched; they are stored per sample so that every state tensor has the sample on dim 0, as the
search's chunking and candidate stacking need), from which each block segment rebuilds the rotary embedding.

Calibration inputs, in the order of ``input_names``:

* SD3: ``hidden_states (N, C, H, W)``, ``encoder_hidden_states (N, L, D)``, ``pooled_projections (N, P)``,
  ``timestep (N,)`` (the scheduler's, 0..1000);
* Flux: ``hidden_states (N, S, C)`` (packed latents), ``encoder_hidden_states (N, L, D)``, ``pooled_projections
  (N, P)``, ``timestep (N,)`` (as the pipeline passes it: the scheduler's / 1000), ``img_ids (N, S, 3)``,
  ``txt_ids (N, L, 3)``, and with guidance distillation (FLUX.1-dev) ``guidance (N,)``.

The MSE is taken on the output (the flow-matching velocity); of a FLUX.1 Kontext call (``treeq capture --images``),
on the image's own tokens, not the reference image's that follow them (``ReferenceTokens``). What the search
cannot reproduce is an error at capture: ControlNet residuals, attention kwargs (IP-Adapter), SD3's skipped layers.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
import torch.nn as nn

from .evaluator import CutModel, State, describe_arg, sample_scalars

SD3, FLUX = "sd3", "flux"
CLASSES = {"SD3Transformer2DModel": SD3, "FluxTransformer2DModel": FLUX}


def position_ids(img_ids: Any, txt_ids: Any, n: int, image: int, text: int, axes: int,
                 model: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A FLUX-style call's image and text position ids (``(S, A)`` as the model takes them, or ``(N, S, A)`` as
    older pipelines pass them) checked and stored per sample, ``(N, image, axes)`` and ``(N, text, axes)``: one set
    per call (``model`` names whose forward takes the first sample's)."""
    ids = []
    for name, v, length in (("img_ids", img_ids, image), ("txt_ids", txt_ids, text)):
        if not isinstance(v, torch.Tensor) or v.dim() not in (2, 3) or tuple(v.shape[-2:]) != (length, axes) \
                or (v.dim() == 3 and v.shape[0] != n):
            raise ValueError(f"{name} must be ({length}, {axes}) or (N={n}, {length}, {axes}) position ids, got "
                             f"{describe_arg(v)}")
        if v.dim() == 3 and n > 1 and not torch.equal(v, v[:1].expand_as(v)):
            raise ValueError(f"{name} differ between the samples of one call: {model} takes one set per call")
        ids.append(v[None].expand(n, -1, -1) if v.dim() == 2 else v)
    return ids[0], ids[1]


class ReferenceTokens:
    """Which output tokens a metric reads when a call appends reference images' latent tokens to the image's (FLUX.1
    Kontext, FLUX.2 with references): the pipelines drop the references' predictions. The image's own tokens lead
    and share their position ids' time coordinate (0); each reference's follow at another (1 for Kontext; 10, 20,
    ... for FLUX.2). Kept per token count from each call's ids (``note``, in segment 0) for ``own`` (the head's
    output). Calls of one token count split two ways are an error: the head's output cannot tell them apart."""

    def __init__(self) -> None:
        self.split: dict[int, int] = {}   # tokens of a call -> the image's own

    def note(self, img_ids: torch.Tensor) -> None:
        """Record the split of a call's ``(N, S, A)`` image ids (a weightless profile's meta ids hold no values:
        read as no references)."""
        s = img_ids.shape[1]
        time = img_ids[0, :, 0]
        own = s
        if s and time.device.type != "meta":
            refs = time != time[0]
            if bool(refs.any()):
                own = int(refs.int().argmax())   # (the first reference token)
        if self.split.setdefault(s, own) != own:
            raise ValueError(f"calls of {s} tokens with {own} and with {self.split[s]} of them the image's own (the "
                             "rest reference images'): the metric cannot tell them apart; capture them into separate "
                             "files")

    def own(self, out: torch.Tensor) -> torch.Tensor:
        """``out (N, S, ·)`` cut to the image's own tokens."""
        n = self.split.get(out.shape[1], out.shape[1])
        return out[:, :n] if n < out.shape[1] else out

    def rows(self, h: torch.Tensor) -> torch.Tensor | None:
        """The output projection's real rows of the head's input ``h (N, S, ·)``: the image's own tokens (the
        references' predictions are dropped, so PTQ's statistics leave them out), or None when all are."""
        n = self.split.get(h.shape[1], h.shape[1])
        if n >= h.shape[1]:
            return None
        keep = torch.zeros(h.shape[:2], dtype=torch.bool, device=h.device)
        keep[:, :n] = True
        return keep


def mmdit_arch(model: nn.Module) -> str | None:
    """``"sd3"`` / ``"flux"`` for the MMDiT transformers this runner cuts, ``None`` for anything else."""
    arch = CLASSES.get(type(model).__name__)
    return arch if arch is not None and hasattr(model, "transformer_blocks") else None


def mmdit_tie(layer_name: str) -> str | None:
    """Linears that read one input, searched as one leaf: an attention's to_q/to_k/to_v (image tokens, or SD3.5's
    second attention's), its add_q/k/v_proj (text tokens), and in a FLUX.1-style single-stream block (Flux's,
    Chroma's) the attention's to_q/to_k/to_v with proj_mlp (all on the one normalised sequence)."""
    head, _, last = layer_name.rpartition(".")
    block, _, attn = head.rpartition(".")
    if block.startswith("single_transformer_blocks.") and attn == "attn" and last in ("to_q", "to_k", "to_v"):
        return block + ".qkv_mlp"
    if head.startswith("single_transformer_blocks.") and last == "proj_mlp":
        return head + ".qkv_mlp"
    if attn in ("attn", "attn2") and last in ("to_q", "to_k", "to_v"):
        return head + ".qkv"
    if attn == "attn" and last in ("add_q_proj", "add_k_proj", "add_v_proj"):
        return head + ".add_qkv"
    return None


def dual_stream_segment(layer_name: str, joint: int, num_segments: int) -> int:
    """The segment of ``layer_name`` in a cut of ``joint`` double-stream blocks then single-stream blocks (FLUX.1's,
    FLUX.2's): block ``i`` of ``transformer_blocks`` in ``i + 1``, of ``single_transformer_blocks`` in ``joint + i +
    1``, the head (``norm_out``, ``proj_out``) in the last, everything else in 0."""
    parts = layer_name.split(".")
    if len(parts) > 1 and parts[1].isdigit():
        if parts[0] == "transformer_blocks":
            return int(parts[1]) + 1
        if parts[0] == "single_transformer_blocks":
            return joint + int(parts[1]) + 1
    if parts[0] in ("norm_out", "proj_out"):
        return num_segments - 1
    return 0


class MMDiTRunner(CutModel):
    """``SegmentRunner`` for a diffusers SD3 or Flux transformer (see the module docstring)."""

    extra_conditions = False   # (PixArt's; ``load_inputs`` asks every runner)

    def __init__(self, model: nn.Module, *, output_fn: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        arch = mmdit_arch(model)
        if arch is None:
            raise TypeError(f"MMDiTRunner cuts diffusers' {' and '.join(CLASSES)}; got {type(model).__name__}")
        self.model: Any = model   # a diffusers transformer: its submodules are read by name
        self.arch = arch
        self.scheduler_timesteps = arch == SD3   # (Flux's pipeline passes them / 1000)
        self.joint = model.transformer_blocks
        self.single = model.single_transformer_blocks if arch == FLUX else nn.ModuleList()
        self.num_segments = len(self.joint) + len(self.single) + 2
        self.in_channels, self.out_channels = int(model.config.in_channels), int(model.out_channels)
        self.patch = int(model.config.patch_size) if arch == SD3 else 1
        self.guidance = arch == FLUX and bool(model.config.guidance_embeds)
        self._grids: dict[int, tuple[int, int]] = {}
        self._refs = ReferenceTokens()   # (Flux Kontext's reference image)
        self.output_fn = output_fn

    @property
    def input_names(self) -> tuple[str, ...]:
        head = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep")
        if self.arch == SD3:
            return head
        return head + ("img_ids", "txt_ids") + (("guidance",) if self.guidance else ())

    def tie(self, layer_name: str) -> str | None:
        return mmdit_tie(layer_name)

    # -- inputs ------------------------------------------------------------------------------------
    def inputs(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
               pooled_projections: torch.Tensor | None = None, timestep: torch.Tensor | float | None = None,
               img_ids: torch.Tensor | None = None, txt_ids: torch.Tensor | None = None,
               guidance: torch.Tensor | float | None = None, *, joint_attention_kwargs: Mapping[str, Any] | None = None,
               block_controlnet_hidden_states: Any = None, controlnet_block_samples: Any = None,
               controlnet_single_block_samples: Any = None, skip_layers: Any = None, check_values: bool = True,
               **_: Any) -> State:
        """One transformer call's arguments (as a pipeline passes them) as this runner's input tuple: the
        timestep and guidance broadcast to the batch, Flux's position ids repeated per sample. What the search
        cannot reproduce is an error. (``check_values`` is accepted for the common interface: nothing here reads
        values back from the device.)"""
        if joint_attention_kwargs:
            raise ValueError(f"the search runs the default attention; joint_attention_kwargs "
                             f"{sorted(joint_attention_kwargs)} are not supported")
        if any(v is not None for v in (block_controlnet_hidden_states, controlnet_block_samples,
                                       controlnet_single_block_samples)):
            raise ValueError("the search does not support ControlNet residuals")
        if skip_layers:
            raise ValueError("the search runs every block; skip_layers (skip-layer guidance) is not supported")
        want_dim = 4 if self.arch == SD3 else 3
        if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() != want_dim:
            shape = "(N, C, H, W) latent" if self.arch == SD3 else "(N, S, C) packed-latent"
            raise ValueError(f"hidden_states must be a {shape} tensor, got {describe_arg(hidden_states)}")
        n = hidden_states.shape[0]
        if hidden_states.shape[1 if self.arch == SD3 else 2] != self.in_channels:
            raise ValueError(f"hidden_states must have {self.in_channels} channels, got {tuple(hidden_states.shape)}")
        if self.arch == SD3 and (hidden_states.shape[2] % self.patch or hidden_states.shape[3] % self.patch):
            raise ValueError(f"hidden_states' height and width must be multiples of the patch size {self.patch}, "
                             f"got {tuple(hidden_states.shape)}")
        cfg = self.model.config
        width = cfg.joint_attention_dim
        if not isinstance(encoder_hidden_states, torch.Tensor) or encoder_hidden_states.dim() != 3 or \
                encoder_hidden_states.shape[0] != n or encoder_hidden_states.shape[2] != width:
            raise ValueError(f"encoder_hidden_states must be (N={n}, L, {width}), got {describe_arg(encoder_hidden_states)}")
        pooled = cfg.pooled_projection_dim
        if not isinstance(pooled_projections, torch.Tensor) or tuple(pooled_projections.shape) != (n, pooled):
            raise ValueError(f"pooled_projections must be (N={n}, {pooled}), got {describe_arg(pooled_projections)}")
        t = sample_scalars("timestep", timestep, n, hidden_states.device)
        out: State = (hidden_states, encoder_hidden_states, pooled_projections, t)
        if self.arch == SD3:
            return out
        out += position_ids(img_ids, txt_ids, n, hidden_states.shape[1], encoder_hidden_states.shape[1], 3, "Flux")
        if self.guidance:
            if guidance is None:
                raise ValueError("this Flux is guidance-distilled (guidance_embeds): a call needs guidance")
            out += (sample_scalars("guidance", guidance, n, hidden_states.device),)
        return out

    # -- SegmentRunner -----------------------------------------------------------------------------
    def segment_of(self, layer_name: str) -> int:
        return dual_stream_segment(layer_name, len(self.joint), self.num_segments)

    def _block(self, i: int, state: State) -> State:
        h, enc, temb = state[:3]
        if self.arch == SD3:
            new_enc, h = self.joint[i](hidden_states=h, encoder_hidden_states=enc, temb=temb,
                                       joint_attention_kwargs=None)
            # the last block is context_pre_only: no text tokens come out, and none are read after it
            return (h, enc if new_enc is None else new_enc, temb)
        txt_ids, img_ids = state[3], state[4]
        rope = self.model.pos_embed(torch.cat((txt_ids[0], img_ids[0]), dim=0))
        block = self.joint[i] if i < len(self.joint) else self.single[i - len(self.joint)]
        enc, h = block(hidden_states=h, encoder_hidden_states=enc, temb=temb, image_rotary_emb=rope,
                       joint_attention_kwargs=None)
        return (h, enc, temb, txt_ids, img_ids)

    # -- the model's forward, cut ------------------------------------------------------------------
    def _embed(self, state: State) -> State:
        """SD3: ``(h, text, temb)``; Flux: ``(h, text, temb, txt_ids, img_ids)``. SD3's latents need not be square:
        the patch grid is remembered by token count for the head (a host value: the head reads nothing back)."""
        m = self.model
        x, enc, pooled, t = state[:4]
        if self.arch == SD3:
            grid = (x.shape[-2] // self.patch, x.shape[-1] // self.patch)
            if self._grids.setdefault(grid[0] * grid[1], grid) != grid:
                raise ValueError(f"latents of {grid[0] * grid[1]} patches came as {self._grids[grid[0] * grid[1]]} "
                                 f"and {grid} grids: use one aspect ratio per token count")
            h = m.pos_embed(x).contiguous()
            return (h, m.context_embedder(enc), m.time_text_embed(t, pooled))
        self._refs.note(state[4])
        h = m.x_embedder(x)
        t = t.to(h.dtype) * 1000
        if self.guidance:
            temb = m.time_text_embed(t, state[6].to(h.dtype) * 1000, pooled)
        else:
            temb = m.time_text_embed(t, pooled)
        return (h, m.context_embedder(enc), temb, state[5], state[4])

    def _head(self, state: State) -> torch.Tensor:
        m = self.model
        h, temb = state[0], state[2]
        h = m.proj_out(m.norm_out(h, temb))
        if self.arch == FLUX:
            return h
        if h.shape[1] not in self._grids:
            raise RuntimeError(f"no latent grid of {h.shape[1]} patches went through segment 0")
        height, width = self._grids[h.shape[1]]
        p, c = self.patch, self.out_channels
        h = h.reshape(-1, height, width, p, p, c)
        h = torch.einsum("nhwpqc->nchpwq", h)
        return h.reshape(-1, c, height * p, width * p)

    def real_rows(self, layer_name: str, state: State) -> torch.Tensor | None:
        """Flux Kontext's reference tokens are not real to the output projection (the pipeline drops them)."""
        return self._refs.rows(state[0]) if self.arch == FLUX and layer_name == "proj_out" else None

    def output(self, state: State) -> torch.Tensor:
        """The prediction the metric reads: Flux Kontext's call drops its reference image's tokens (as the pipeline
        does; ``ReferenceTokens``), then ``output_fn``."""
        out = self._refs.own(state[0]) if self.arch == FLUX else state[0]
        return out if self.output_fn is None else self.output_fn(out)
