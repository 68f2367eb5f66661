"""The search's segment runner for diffusers' Chroma transformer (``ChromaTransformer2DModel``: Chroma1-HD,
Chroma1-Base; text to image). The same interface as ``DiffusersRunner`` (``make_runner`` picks it), so capture,
search, PTQ and PEFT take Chroma too; the runtime packs it and fuses its blocks (``runtime/chroma_fused.py``).

Chroma is FLUX.1-schnell's architecture with the per-block modulation linears replaced by one approximator
(``distilled_guidance_layer``) that maps the timestep to every block's modulation vectors at once, and with the
prompt's padding masked (the pipeline passes a mask over ``[text; image]``). Segments: 0 runs the embedders (the
packed-latent and T5 embedders, the timestep projection and the approximator), ``1..B`` the double-stream blocks
and then the single-stream blocks (which read the text and image tokens joined, as the model joins them after its
last double block), the last one the output norm and projection on the image tokens. Each does what the model's
``forward`` does between those points (a test holds their composition bit-identical to
``transformer(...).sample``). The state between double blocks is ``(image tokens, text tokens, modulations, image
ids, text ids, mask)``, between single blocks ``(joined tokens, modulations, image ids, text ids, mask)``; the
position ids are stored per sample (the model takes them unbatched) and each block rebuilds the rotary tables.

Calibration inputs, in the order of ``input_names``: ``hidden_states (N, S, C)`` (packed latents),
``encoder_hidden_states (N, L, D)``, ``timestep (N,)`` (as the pipeline passes it: the scheduler's / 1000),
``img_ids (N, S, 3)``, ``txt_ids (N, L, 3)``, ``attention_mask (N, L + S)`` (as the pipeline passes it; ``(N, 0)``
for a call without one). The MSE is taken on the whole output (the flow-matching velocity). The pipeline's mask is
float, which the attention adds to its scores: the prompt's padding is weighed down, not hidden, so PTQ's statistics
read every row; a boolean mask hides its padding, which then stays out of them (``real_rows``). Ties as FLUX.1's
(``mmdit_tie``); the approximator is an edge layer (W8A8 in a uniform plan). What the search cannot reproduce is an
error at capture: attention kwargs (IP-Adapter), ControlNet residuals.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
import torch.nn as nn

from .evaluator import CutModel, State, arch_of_class, describe_arg, sample_scalars
from .mmdit_runner import dual_stream_segment, mmdit_tie, position_ids

CHROMA = "chroma"


def chroma_arch(model: nn.Module) -> str | None:
    """``"chroma"`` for the Chroma transformer this runner cuts, ``None`` for anything else."""
    return arch_of_class(model, "ChromaTransformer2DModel", CHROMA, "transformer_blocks", "single_transformer_blocks",
                         "distilled_guidance_layer")


class ChromaRunner(CutModel):
    """``SegmentRunner`` for a diffusers Chroma transformer (see the module docstring)."""

    extra_conditions = False   # (PixArt's; ``load_inputs`` asks every runner)
    scheduler_timesteps = False   # (the pipeline passes them / 1000)
    pads_rows = True   # (a boolean mask hides a prompt's padding: real_rows)
    input_names = ("hidden_states", "encoder_hidden_states", "timestep", "img_ids", "txt_ids", "attention_mask")

    def __init__(self, model: nn.Module, *, output_fn: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        if chroma_arch(model) is None:
            raise TypeError(f"ChromaRunner cuts diffusers' ChromaTransformer2DModel; got {type(model).__name__}")
        self.model: Any = model   # a diffusers transformer: its submodules are read by name
        self.arch = CHROMA
        self.joint = model.transformer_blocks
        self.single = model.single_transformer_blocks
        self.num_segments = len(self.joint) + len(self.single) + 2
        self.in_channels = int(model.config.in_channels)
        self.output_fn = output_fn

    def tie(self, layer_name: str) -> str | None:
        return mmdit_tie(layer_name)

    def segment_of(self, layer_name: str) -> int:
        return dual_stream_segment(layer_name, len(self.joint), self.num_segments)

    def real_rows(self, layer_name: str, state: State) -> torch.Tensor | None:
        """The prompt's rows a boolean mask hides are not real: the T5 embedder's, each double block's text
        projections and feed-forward, and a single block's (every linear there reads ``[text; image]``). Every state
        holds the mask last and the text ids before it. The pipeline's mask is a float one, which the attention
        adds to its scores (+1 for the prompt, +0 for the padding): the padding is weighed down, not hidden, and
        the output reads it, so then every row is real."""
        mask = state[-1]
        if mask.shape[1] == 0 or mask.dtype != torch.bool:
            return None
        parts = layer_name.split(".")
        text = state[-2].shape[1]
        if parts[0] == "context_embedder" or (
                len(parts) > 3 and parts[0] == "transformer_blocks" and
                (parts[2] == "ff_context" or parts[2] == "attn" and parts[3] in ("add_q_proj", "add_k_proj",
                                                                                  "add_v_proj", "to_add_out"))):
            return mask[:, :text]
        if parts[0] == "single_transformer_blocks":
            return mask
        return None

    # -- inputs ------------------------------------------------------------------------------------
    def inputs(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
               timestep: Any = None, img_ids: torch.Tensor | None = None, txt_ids: torch.Tensor | None = None,
               attention_mask: torch.Tensor | None = None, *, joint_attention_kwargs: Mapping[str, Any] | None = None,
               controlnet_block_samples: Any = None, controlnet_single_block_samples: Any = None,
               **_: Any) -> State:
        """One transformer call's arguments (as the pipeline passes them) as this runner's input tuple: the timestep
        broadcast to the batch, the position ids repeated per sample, a missing mask as ``(N, 0)``. What the search
        cannot reproduce is an error."""
        if joint_attention_kwargs:
            raise ValueError(f"the search runs the default attention; joint_attention_kwargs "
                             f"{sorted(joint_attention_kwargs)} are not supported")
        if controlnet_block_samples is not None or controlnet_single_block_samples is not None:
            raise ValueError("the search does not support ControlNet residuals")
        x = hidden_states
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[2] != self.in_channels:
            raise ValueError(f"hidden_states must be (N, S, {self.in_channels}) packed latents, got {describe_arg(x)}")
        n, s = x.shape[:2]
        width = int(self.model.config.joint_attention_dim)
        enc = encoder_hidden_states
        if not isinstance(enc, torch.Tensor) or enc.dim() != 3 or enc.shape[0] != n or enc.shape[2] != width:
            raise ValueError(f"encoder_hidden_states must be (N={n}, L, {width}), got {describe_arg(enc)}")
        ids = position_ids(img_ids, txt_ids, n, s, enc.shape[1], 3, "Chroma")
        mask = attention_mask
        if mask is None:
            mask = x.new_zeros(n, 0)
        elif not isinstance(mask, torch.Tensor) or tuple(mask.shape) not in ((n, enc.shape[1] + s), (n, 0)):
            raise ValueError(f"attention_mask must be (N={n}, L + S = {enc.shape[1] + s}) over [text; image], got "
                             f"{describe_arg(mask)}")
        return (x, enc, sample_scalars("timestep", timestep, n, x.device), *ids, mask)

    # -- the model's forward, cut ------------------------------------------------------------------
    def _embed(self, state: State) -> State:
        m = self.model
        x, enc, t, img_ids, txt_ids, mask = state
        h = m.x_embedder(x)
        temb = m.distilled_guidance_layer(m.time_text_embed(t.to(h.dtype) * 1000))
        return (h, m.context_embedder(enc), temb, img_ids, txt_ids, mask)

    def _block(self, i: int, state: State) -> State:
        m = self.model
        img_ids, txt_ids, mask = state[-3:]
        rope = m.pos_embed(torch.cat((txt_ids[0], img_ids[0]), dim=0))
        attn_mask = None if mask.shape[1] == 0 else mask
        joint, single = len(self.joint), len(self.single)
        if i < joint:
            h, enc, temb = state[:3]
            img = 3 * single + 6 * i   # (the model's offsets into the approximator's rows)
            txt = 3 * single + 6 * joint + 6 * i
            enc, h = self.joint[i](hidden_states=h, encoder_hidden_states=enc,
                                   temb=torch.cat((temb[:, img:img + 6], temb[:, txt:txt + 6]), dim=1),
                                   image_rotary_emb=rope, attention_mask=attn_mask, joint_attention_kwargs=None)
            return (h, enc, temb, img_ids, txt_ids, mask)
        if len(state) == 6:   # the first single block: text and image joined, as the model joins them
            state = (torch.cat([state[1], state[0]], dim=1), *state[2:])
        x, temb = state[:2]
        j = i - joint
        x = self.single[j](hidden_states=x, temb=temb[:, 3 * j:3 * j + 3], image_rotary_emb=rope,
                           attention_mask=attn_mask, joint_attention_kwargs=None)
        return (x, *state[1:])

    def _head(self, state: State) -> torch.Tensor:
        m = self.model
        h = state[0] if len(state) == 6 else state[0][:, state[-2].shape[1]:]   # (image tokens after the text)
        return m.proj_out(m.norm_out(h, state[-4][:, -2:]))
