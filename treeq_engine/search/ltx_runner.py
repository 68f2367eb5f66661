"""The search's segment runner for diffusers' LTX-Video transformer (``LTXVideoTransformer3DModel``: text and image to
video). The same interface as ``DiffusersRunner`` (``make_runner`` picks it), so capture, search, PTQ and PEFT take
LTX-Video too; the runtime packs it and fuses its blocks (``runtime/ltx_fused.py``).

Segments: 0 runs the embedders (the packed-latent projection, adaLN-single's timestep embedding, the caption
projection), ``1..B`` the blocks (self-attention with the rotary table, cross-attention on the caption, the
feed-forward, modulated by the block's scale-shift table plus the shared timestep embedding), the last one the modulated
output norm and projection. Each does what the model's ``forward`` does between those points (a test holds their
composition bit-identical to ``transformer(...).sample``). The state between blocks is ``(h, captions, caption bias,
temb, embedded t, video, timestep)``; each block segment rebuilds the rotary table from the latent video's (frames,
height, width) and the pipeline's rope interpolation scale, which the runner keeps on the host per token count (recorded
when it reads a call's inputs, else read once from the state's ``video`` tensor).

Calibration inputs, in the order of ``input_names``: ``hidden_states (N, S, C)`` (packed latents),
``encoder_hidden_states (N, L, caption_channels)``, ``timestep (N,)`` (the scheduler's, 0..1000; the image-to-video
pipeline passes one per token, ``(N, S)``, the conditioning first frame's at 0), ``encoder_attention_mask (N, L)`` (1
keeps a caption token) and ``video (N, 6)``: the latent (frames, height, width) and the rope interpolation scale (time,
height, width) the pipeline passes (``num_frames``, ``height``, ``width``, ``rope_interpolation_scale``). The pipeline
pads every prompt to ``max_sequence_length``; PTQ's statistics leave the padding out (``real_rows``), as PixArt's. The
MSE is taken on the output (the flow-matching velocity) the pipeline reads: with per-token timesteps, not on the tokens
held below their sample's timestep (the conditioning frame, whose prediction the image-to-video pipeline drops), nor do
the output projection's PTQ statistics read them. What the search cannot reproduce is an error at capture:
``video_coords`` (the condition pipeline's image and video conditions), attention kwargs.
"""
from __future__ import annotations

import operator
from typing import Any, Callable, Mapping

import torch
import torch.nn as nn

from .diffusers_runner import attention_tie, caption_bias, caption_rows, checked_captions
from .evaluator import CutModel, State, arch_of_class, describe_arg, noisy_tokens, token_timesteps

LTX = "ltx"


def ltx_arch(model: nn.Module) -> str | None:
    """``"ltx"`` for the LTX-Video transformer this runner cuts, ``None`` for anything else."""
    return arch_of_class(model, "LTXVideoTransformer3DModel", LTX, "transformer_blocks", "rope")


class LTXRunner(CutModel):
    """``SegmentRunner`` for a diffusers LTX-Video transformer (see the module docstring)."""

    extra_conditions = False   # (PixArt's; ``load_inputs`` asks every runner)
    pads_rows = True   # (captions padded to max_sequence_length: real_rows)
    scheduler_timesteps = False   # (the pipeline sets its own sigmas and shift: capture takes timesteps from the calls)
    exact_inputs = ("timestep", "video")   # (the rope scale, e.g. 8/25: float64, not rounded to the model's dtype)
    input_names = ("hidden_states", "encoder_hidden_states", "timestep", "encoder_attention_mask", "video")

    def __init__(self, model: nn.Module, *, output_fn: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        if ltx_arch(model) is None:
            raise TypeError(f"LTXRunner cuts diffusers' LTXVideoTransformer3DModel; got {type(model).__name__}")
        self.model: Any = model   # a diffusers transformer: its submodules are read by name
        self.arch = LTX
        self.blocks = model.transformer_blocks
        self.num_segments = len(self.blocks) + 2
        self.in_channels = int(model.config.in_channels)
        self._videos: dict[int, tuple[tuple[int, int, int], tuple[float, float, float]]] = {}
        self._ropes: dict[tuple[int, str], Any] = {}   # (token count, device) -> rotary tables
        self.output_fn = output_fn

    def tie(self, layer_name: str) -> str | None:
        """Linears that read one input, searched as one leaf: self-attention's to_q/to_k/to_v, and cross-attention's
        to_k/to_v (both on the captions), as PixArt's."""
        return attention_tie(layer_name)

    def real_rows(self, layer_name: str, state: State) -> torch.Tensor | None:
        """The caption padding the mask hides is not real: the caption projection's rows and cross-attention's
        to_k/to_v rows of padding, as PixArt's; nor are the output projection's rows of conditioning tokens."""
        if layer_name == "proj_out":
            return noisy_tokens(state[6])
        return caption_rows(layer_name, state)

    # -- inputs ------------------------------------------------------------------------------------
    def inputs(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
               timestep: Any = None, encoder_attention_mask: torch.Tensor | None = None,
               num_frames: int | None = None, height: int | None = None, width: int | None = None,
               rope_interpolation_scale: Any = None, video_coords: Any = None, *, video: torch.Tensor | None = None,
               attention_kwargs: Mapping[str, Any] | None = None, **_: Any) -> State:
        """One transformer call's arguments (as the pipeline passes them; or a stored input tuple, whose ``video``
        holds the latent size and rope scale) as this runner's input tuple. What the search cannot reproduce is an
        error."""
        if attention_kwargs:
            raise ValueError(f"the search runs the default attention; attention_kwargs {sorted(attention_kwargs)} "
                             "are not supported")
        if video_coords is not None:
            raise ValueError("the search does not support video_coords (the condition pipeline's conditions)")
        x = hidden_states
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[2] != self.in_channels:
            raise ValueError(f"hidden_states must be (N, S, {self.in_channels}) packed latents, got {describe_arg(x)}")
        n, s = x.shape[:2]
        enc, mask = checked_captions(encoder_hidden_states, encoder_attention_mask, n,
                                     int(self.model.config.caption_channels), x.device)
        t = token_timesteps(timestep, n, s, x.device)
        return (x, enc, t, mask, self._video_rows(video, num_frames, height, width, rope_interpolation_scale, n, s))

    def _video_rows(self, video: Any, frames: Any, height: Any, width: Any, scale: Any, n: int, s: int) -> torch.Tensor:
        """The latent (frames, height, width) and rope scale of a call as an ``(n, 6)`` float64 CPU tensor, checked
        against the ``s`` tokens, and recorded on the host per token count."""
        if isinstance(video, torch.Tensor):
            if tuple(video.shape) != (n, 6):
                raise ValueError(f"video must be (N={n}, 6): latent frames, height, width, rope scales, got "
                                 f"{describe_arg(video)}")
            if not torch.equal(video, video[:1].expand_as(video)):
                raise ValueError("video differs between the samples of one set of inputs: one video shape and frame "
                                 "rate per call")
            row = [float(v) for v in video[0].tolist()]
        else:
            try:
                size_in = [operator.index(v) for v in (frames, height, width)]
            except TypeError:
                size_in = []
            if len(size_in) != 3 or min(size_in) <= 0:
                raise ValueError(f"num_frames, height and width (the latent video's, in patches) are required, got "
                                 f"{frames}, {height}, {width}")
            if scale is None:   # the model then skips the rescaling: kept as (0, 0, 0), which no real scale is
                sc = [0.0, 0.0, 0.0]
            else:
                try:
                    sc = [float(v) for v in scale]
                except (TypeError, ValueError):
                    raise ValueError(f"rope_interpolation_scale must be 3 numbers, got {scale!r}") from None
                if len(sc) != 3 or min(sc) <= 0:
                    raise ValueError(f"rope_interpolation_scale must be 3 positive numbers, got {scale!r}")
            row = [float(v) for v in size_in] + sc
        size = (int(row[0]), int(row[1]), int(row[2]))
        if size[0] * size[1] * size[2] != s:
            raise ValueError(f"a latent video of {size[0]}x{size[1]}x{size[2]} is {size[0] * size[1] * size[2]} "
                             f"tokens, hidden_states has {s}")
        entry = (size, (row[3], row[4], row[5]))
        if self._videos.setdefault(s, entry) != entry:
            raise ValueError(f"latents of {s} tokens came as {self._videos[s]} and {entry}: use one video shape and "
                             "frame rate per token count")
        return torch.tensor([row] * n, dtype=torch.float64, device="cpu")   # (also under a meta device context)

    # -- the model's forward, cut ------------------------------------------------------------------
    def _video(self, video: torch.Tensor, s: int) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
        """The (frames, height, width) and rope scale behind ``s`` tokens: the host's record, checked against (or,
        for inputs another runner read, taken from) the state's ``video`` (one host read per segment-0 batch). A
        weightless profile's meta ``video`` holds no values: the record its ``inputs`` made stands."""
        if video.device.type == "meta":
            if s not in self._videos:
                raise ValueError(f"no latent video of {s} tokens went through inputs(): a meta state has no values")
            return self._videos[s]
        row = [float(v) for v in video[0].tolist()]
        entry = ((int(row[0]), int(row[1]), int(row[2])), (row[3], row[4], row[5]))
        if self._videos.setdefault(s, entry) != entry:
            raise ValueError(f"latents of {s} tokens came as {self._videos[s]} and {entry}: use one video shape and "
                             "frame rate per token count")
        return entry

    def _rope(self, h: torch.Tensor, video: torch.Tensor) -> Any:
        """The rotary tables of ``h``'s tokens, made once per token count and device (one sample's: they broadcast
        over the batch, bit-identical to the model's per-sample copies)."""
        key = (h.shape[1], str(h.device))
        rope = self._ropes.get(key)
        if rope is None:
            (f, hh, w), scale = self._videos.get(h.shape[1]) or self._video(video, h.shape[1])
            rope = self._ropes[key] = self.model.rope(h[:1], f, hh, w, None if scale == (0.0, 0.0, 0.0) else scale,
                                                      None)
        return rope

    def _embed(self, state: State) -> State:
        """``(h, captions, caption bias, temb, embedded t, video, timestep)``, as the model's forward computes them
        (temb and embedded t per sample, or per token)."""
        m = self.model
        x, enc, t, mask, video = state
        n = x.shape[0]
        self._video(video, x.shape[1])   # (a state read elsewhere must agree with what this runner recorded)
        bias = caption_bias(mask, x.dtype)
        h = m.proj_in(x)
        temb, emb = m.time_embed(t.flatten(), batch_size=n, hidden_dtype=h.dtype)
        temb, emb = temb.view(n, -1, temb.size(-1)), emb.view(n, -1, emb.size(-1))
        enc = m.caption_projection(enc).view(n, -1, h.size(-1))
        return (h, enc, bias, temb, emb, video, t)

    def _block(self, i: int, state: State) -> State:
        h, enc, bias, temb, emb, video = state[:6]
        h = self.blocks[i](hidden_states=h, encoder_hidden_states=enc, temb=temb,
                           image_rotary_emb=self._rope(h, video), encoder_attention_mask=bias)
        return (h,) + state[1:]

    def _head(self, state: State) -> torch.Tensor:
        m = self.model
        h, emb = state[0], state[4]
        shift_scale = m.scale_shift_table[None, None] + emb[:, :, None]
        shift, scale = shift_scale[:, :, 0], shift_scale[:, :, 1]
        return m.proj_out(m.norm_out(h) * (1 + scale) + shift)

    def _read_mask(self, state: State, out: torch.Tensor) -> torch.Tensor | None:
        """The noisy tokens' rows of the output ``(N, S, C)``: a conditioning token's prediction is dropped."""
        keep = noisy_tokens(state[6])
        return None if keep is None else keep[:, :, None].to(out.device)
