"""The search's segment runner for diffusers' Sana transformer (``SanaTransformer2DModel``, text to image). The same
interface as ``DiffusersRunner`` (``make_runner`` picks it), so capture, search, PTQ and PEFT take Sana too; the
runtime packs it and fuses its blocks (``runtime/sana_fused.py``).

Segments: 0 runs the embedders (the patch embedding, a pointwise convolution at patch size 1; adaLN-single's
timestep embedding; the caption projection and its RMSNorm), ``1..B`` the blocks (linear self-attention,
cross-attention on the caption, the GLUMBConv feed-forward), the last one the modulated output norm, projection
and unpatchify. Each does what the model's ``forward`` does between those points (a test holds their composition
bit-identical to ``transformer(...).sample``). The state between blocks is ``(h, captions, caption bias, t6,
embedded t)``; the latent grid is remembered by token count for the blocks (GLUMBConv runs on the image) and the
head.

The feed-forward's inverted and point convolutions are 1x1: linears over channels, searched and calibrated as
such (``nn.QuantPointwiseConv``); its depthwise 3x3 convolution is not one and stays in full precision.

Calibration inputs, in the order of ``input_names``: ``hidden_states (N, C, H, W)``, ``encoder_hidden_states (N, L,
caption_channels)``, ``timestep (N,)`` (as the pipeline passes it: the scheduler's × ``timestep_scale``; Sana-Sprint's
SCM time), ``encoder_attention_mask (N, L)`` (1 keeps a caption token), and for the guidance-distilled Sana-Sprint
(``guidance_embeds``) ``guidance (N,)`` (the embedded guidance scale, as its pipeline passes it). Sana's pipelines pad
every prompt to ``max_sequence_length``; PTQ's statistics leave that padding out (``real_rows``). The MSE is taken
on the whole output (the flow-matching velocity; Sana-Sprint's TrigFlow prediction). What the search cannot
reproduce is an error at capture: attention kwargs, ControlNet residuals, a self-attention mask.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
import torch.nn as nn

from .diffusers_runner import attention_tie, caption_bias, caption_rows, checked_captions
from .evaluator import CutModel, State, arch_of_class, describe_arg, sample_scalars

SANA = "sana"


def sana_arch(model: nn.Module) -> str | None:
    """``"sana"`` for the Sana transformer this runner cuts, ``None`` for anything else."""
    return arch_of_class(model, "SanaTransformer2DModel", SANA, "transformer_blocks")


class SanaRunner(CutModel):
    """``SegmentRunner`` for a diffusers Sana transformer (see the module docstring)."""

    extra_conditions = False   # (PixArt's; ``load_inputs`` asks every runner)
    pads_rows = True   # (captions padded to max_sequence_length: real_rows)

    def __init__(self, model: nn.Module, *, output_fn: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        if sana_arch(model) is None:
            raise TypeError(f"SanaRunner cuts diffusers' SanaTransformer2DModel; got {type(model).__name__}")
        cfg = model.config
        self.guidance = bool(cfg.get("guidance_embeds"))   # Sana-Sprint: the guidance scale is an input
        self.input_names = ("hidden_states", "encoder_hidden_states", "timestep", "encoder_attention_mask") + \
            (("guidance",) if self.guidance else ())
        self.model: Any = model   # a diffusers transformer: its submodules are read by name
        self.arch = SANA
        self.blocks = model.transformer_blocks
        self.num_segments = len(self.blocks) + 2
        self.patch = int(cfg.patch_size)
        self.in_channels = int(cfg.in_channels)
        self._grids: dict[int, tuple[int, int]] = {}   # token count -> the latent grid in patches
        # the pipeline hands over the scheduler's timesteps × timestep_scale: as they are only at scale 1 (and not
        # in Sana-Sprint's, which maps them to its SCM time)
        self.scheduler_timesteps = float(cfg.get("timestep_scale", 1.0)) == 1.0 and not self.guidance
        self.output_fn = output_fn

    def tie(self, layer_name: str) -> str | None:
        """Linears that read one input, searched as one leaf: self-attention's to_q/to_k/to_v, and cross-attention's
        to_k/to_v (both on the captions), as PixArt's."""
        return attention_tie(layer_name)

    def real_rows(self, layer_name: str, state: State) -> torch.Tensor | None:
        """The caption padding the mask hides (every prompt is padded to ``max_sequence_length``) is not real: the
        caption projection's rows and cross-attention's to_k/to_v rows of padding, as PixArt's."""
        return caption_rows(layer_name, state)

    # -- inputs ------------------------------------------------------------------------------------
    def inputs(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
               timestep: torch.Tensor | float | None = None, guidance: Any = None,
               encoder_attention_mask: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None, *,
               attention_kwargs: Mapping[str, Any] | None = None, controlnet_block_samples: Any = None,
               **_: Any) -> State:
        """One transformer call's arguments (as the pipeline passes them) as this runner's input tuple: the timestep
        broadcast to the batch, a missing caption mask as ones. What the search cannot reproduce is an error."""
        if attention_kwargs:
            raise ValueError(f"the search runs the default attention; attention_kwargs {sorted(attention_kwargs)} "
                             "are not supported")
        if controlnet_block_samples is not None:
            raise ValueError("the search does not support ControlNet residuals")
        if (guidance is not None) != self.guidance:
            raise ValueError("this Sana embeds a guidance scale (Sana-Sprint): its calls pass guidance" if self.guidance
                             else "this Sana embeds no guidance scale: its calls pass none")
        if attention_mask is not None:
            raise ValueError("the search does not support a self-attention mask (attention_mask); pipelines pass None")
        x = hidden_states
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != self.in_channels or \
                x.shape[2] % self.patch or x.shape[3] % self.patch:
            raise ValueError(f"hidden_states must be (N, {self.in_channels}, H, W) latents with H and W multiples of "
                             f"the patch size {self.patch}, got {describe_arg(x)}")
        n = x.shape[0]
        enc, mask = checked_captions(encoder_hidden_states, encoder_attention_mask, n,
                                     int(self.model.config.caption_channels), x.device)
        out: State = (x, enc, sample_scalars("timestep", timestep, n, x.device), mask)
        if self.guidance:
            out += (sample_scalars("guidance", guidance, n, x.device),)
        return out

    # -- the model's forward, cut ------------------------------------------------------------------
    def _grid(self, tokens: int) -> tuple[int, int]:
        if tokens not in self._grids:
            raise RuntimeError(f"no latent grid of {tokens} patches went through segment 0")
        return self._grids[tokens]

    def _embed(self, state: State) -> State:
        """``(h, captions, caption bias, adaLN-single t, embedded t)``. The latents need not be square: the patch
        grid is remembered by token count for the blocks and the head (a host value)."""
        m = self.model
        x, enc, t, mask = state[:4]
        n = x.shape[0]
        grid = (x.shape[-2] // self.patch, x.shape[-1] // self.patch)
        if self._grids.setdefault(grid[0] * grid[1], grid) != grid:
            raise ValueError(f"latents of {grid[0] * grid[1]} patches came as {self._grids[grid[0] * grid[1]]} and "
                             f"{grid} grids: use one aspect ratio per token count")
        h = m.patch_embed(x)
        if self.guidance:
            t6, emb = m.time_embed(t, guidance=state[4], hidden_dtype=h.dtype)
        else:
            t6, emb = m.time_embed(t, batch_size=n, hidden_dtype=h.dtype)
        enc = m.caption_norm(m.caption_projection(enc).view(n, -1, h.shape[-1]))
        bias = caption_bias(mask, h.dtype)
        return (h, enc, bias, t6, emb)

    def _block(self, i: int, state: State) -> State:
        h, enc, bias, t6, emb = state
        height, width = self._grid(h.shape[1])
        h = self.blocks[i](h, None, enc, bias, t6, height, width)
        return (h, enc, bias, t6, emb)

    def _head(self, state: State) -> torch.Tensor:
        m = self.model
        h, emb = state[0], state[4]
        hp, wp = self._grid(h.shape[1])
        h = m.proj_out(m.norm_out(h, emb, m.scale_shift_table))
        p = self.patch
        h = h.reshape(h.shape[0], hp, wp, p, p, -1).permute(0, 5, 1, 3, 2, 4)
        return h.reshape(h.shape[0], -1, hp * p, wp * p)
