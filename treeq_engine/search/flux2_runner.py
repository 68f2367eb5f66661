"""The search's segment runner for diffusers' FLUX.2 transformer (``Flux2Transformer2DModel``: FLUX.2 [dev], FLUX.2
[klein]). The same interface as ``DiffusersRunner`` (``make_runner`` picks it), so capture, search, PTQ and PEFT take
FLUX.2 too; the runtime packs it and fuses its blocks (``runtime/flux2_fused.py``).

Segments: 0 runs the embedders (the timestep (+ guidance) embedding, the three modulation linears every block
shares, the packed-latent and text embedders), ``1..B`` the double-stream blocks and then the single-stream
blocks, the last one the output norm and projection. Each does what the model's ``forward`` does between those
points (a test holds their composition bit-identical to ``transformer(...).sample``). The state between blocks is
``(image tokens, text tokens, temb, image modulation, text modulation, single-stream modulation, text ids, image
ids)``; the position ids are stored per sample (the model takes them unbatched), and each block segment rebuilds
the rotary tables from them. A single-stream block reads the text and image tokens joined and hands them back
split, as the model does between its last block and the head.

Calibration inputs, in the order of ``input_names``: ``hidden_states (N, S, C)`` (packed latents),
``encoder_hidden_states (N, L, D)``, ``timestep (N,)`` (as the pipelines pass it: the scheduler's / 1000),
``img_ids (N, S, A)``, ``txt_ids (N, L, A)`` (A position axes, 4 for the published models) and with guidance
distillation (FLUX.2 [dev]) ``guidance (N,)``. The MSE is taken on the output (the flow-matching velocity) of the
image's own tokens: a call with reference images (``treeq capture --images``) appends their latent tokens to the
image's, at other time coordinates (10, 20, ... where the image's are 0), and the pipeline drops their predictions,
so the metric does too (``mmdit_runner.ReferenceTokens``). What the search cannot reproduce is an error at capture:
attention kwargs, the reference-image KV cache modes.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
import torch.nn as nn

from .evaluator import CutModel, State, arch_of_class, describe_arg, sample_scalars
from .mmdit_runner import ReferenceTokens, dual_stream_segment, mmdit_tie, position_ids

FLUX2 = "flux2"


def flux2_arch(model: nn.Module) -> str | None:
    """``"flux2"`` for the FLUX.2 transformer this runner cuts, ``None`` for anything else."""
    return arch_of_class(model, "Flux2Transformer2DModel", FLUX2, "transformer_blocks", "single_transformer_blocks")


class Flux2Runner(CutModel):
    """``SegmentRunner`` for a diffusers FLUX.2 transformer (see the module docstring)."""

    extra_conditions = False   # (PixArt's; ``load_inputs`` asks every runner)
    scheduler_timesteps = False   # (the pipelines pass them / 1000)

    def __init__(self, model: nn.Module, *, output_fn: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        if flux2_arch(model) is None:
            raise TypeError(f"Flux2Runner cuts diffusers' Flux2Transformer2DModel; got {type(model).__name__}")
        cfg = model.config
        self.model: Any = model   # a diffusers transformer: its submodules are read by name
        self.arch = FLUX2
        self.joint = model.transformer_blocks
        self.single = model.single_transformer_blocks
        self.num_segments = len(self.joint) + len(self.single) + 2
        self.in_channels = int(cfg.in_channels)
        self.axes = len(cfg.axes_dims_rope)
        self.guidance = bool(cfg.guidance_embeds)
        self.input_names = ("hidden_states", "encoder_hidden_states", "timestep", "img_ids", "txt_ids") + \
            (("guidance",) if self.guidance else ())
        self.output_fn = output_fn
        self._refs = ReferenceTokens()

    def tie(self, layer_name: str) -> str | None:
        """Linears that read one input, searched as one leaf: a double-stream attention's to_q/to_k/to_v (image
        tokens) and its add_q/k/v_proj (text tokens), as the MMDiT runners tie them (``mmdit_tie``). (A single-stream
        block's q/k/v and MLP input are already one linear, ``to_qkv_mlp_proj``.)"""
        return mmdit_tie(layer_name)

    def segment_of(self, layer_name: str) -> int:
        return dual_stream_segment(layer_name, len(self.joint), self.num_segments)

    # -- inputs ------------------------------------------------------------------------------------
    def inputs(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
               timestep: Any = None, img_ids: torch.Tensor | None = None, txt_ids: torch.Tensor | None = None,
               guidance: Any = None, *, joint_attention_kwargs: Mapping[str, Any] | None = None,
               kv_cache: Any = None, kv_cache_mode: str | None = None, num_ref_tokens: int = 0,
               **_: Any) -> State:
        """One transformer call's arguments (as a pipeline passes them) as this runner's input tuple: the timestep
        and guidance broadcast to the batch, the position ids repeated per sample. What the search cannot
        reproduce is an error."""
        if joint_attention_kwargs:
            raise ValueError(f"the search runs the default attention; joint_attention_kwargs "
                             f"{sorted(joint_attention_kwargs)} are not supported")
        if kv_cache is not None or kv_cache_mode is not None or num_ref_tokens:
            raise ValueError("the search does not support FLUX.2's reference-image KV cache (kv_cache_mode)")
        x = hidden_states
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[2] != self.in_channels:
            raise ValueError(f"hidden_states must be (N, S, {self.in_channels}) packed latents, got {describe_arg(x)}")
        n = x.shape[0]
        width = int(self.model.config.joint_attention_dim)
        enc = encoder_hidden_states
        if not isinstance(enc, torch.Tensor) or enc.dim() != 3 or enc.shape[0] != n or enc.shape[2] != width:
            raise ValueError(f"encoder_hidden_states must be (N={n}, L, {width}), got {describe_arg(enc)}")
        ids = position_ids(img_ids, txt_ids, n, x.shape[1], enc.shape[1], self.axes, "FLUX.2")
        out: State = (x, enc, sample_scalars("timestep", timestep, n, x.device), *ids)
        if self.guidance:
            if guidance is None:
                raise ValueError("this FLUX.2 is guidance-distilled (guidance_embeds): a call needs guidance")
            out += (sample_scalars("guidance", guidance, n, x.device),)
        elif guidance is not None:
            raise ValueError("this FLUX.2 embeds no guidance (guidance_embeds is off): its calls pass none")
        return out

    # -- the model's forward, cut ------------------------------------------------------------------
    def _embed(self, state: State) -> State:
        m = self.model
        x, enc, t, img_ids, txt_ids = state[:5]
        self._refs.note(img_ids)
        t = t.to(x.dtype) * 1000
        g = state[5].to(x.dtype) * 1000 if self.guidance else None
        temb = m.time_guidance_embed(t, g)
        mods = (m.double_stream_modulation_img(temb), m.double_stream_modulation_txt(temb),
                m.single_stream_modulation(temb))
        return (m.x_embedder(x), m.context_embedder(enc), temb, *mods, txt_ids, img_ids)

    def _rope(self, txt_ids: torch.Tensor, img_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pe = self.model.pos_embed
        txt, img = pe(txt_ids[0]), pe(img_ids[0])
        return torch.cat([txt[0], img[0]], dim=0), torch.cat([txt[1], img[1]], dim=0)

    def _block(self, i: int, state: State) -> State:
        h, enc, temb, mod_img, mod_txt, mod_single, txt_ids, img_ids = state
        rope = self._rope(txt_ids, img_ids)
        if i < len(self.joint):
            enc, h = self.joint[i](hidden_states=h, encoder_hidden_states=enc, temb_mod_img=mod_img,
                                   temb_mod_txt=mod_txt, image_rotary_emb=rope, joint_attention_kwargs=None)
        else:
            enc, h = self.single[i - len(self.joint)](hidden_states=h, encoder_hidden_states=enc, temb_mod=mod_single,
                                                      image_rotary_emb=rope, joint_attention_kwargs=None,
                                                      split_hidden_states=True)
        return (h, enc, temb, mod_img, mod_txt, mod_single, txt_ids, img_ids)

    def _head(self, state: State) -> torch.Tensor:
        m = self.model
        return m.proj_out(m.norm_out(state[0], state[2]))

    def real_rows(self, layer_name: str, state: State) -> torch.Tensor | None:
        """Reference images' tokens are not real to the output projection (the pipeline drops them)."""
        return self._refs.rows(state[0]) if layer_name == "proj_out" else None

    def output(self, state: State) -> torch.Tensor:
        """The prediction the metric reads: the image's own tokens (a call with reference images: the pipeline drops
        theirs), then ``output_fn``."""
        out = self._refs.own(state[0])
        return out if self.output_fn is None else self.output_fn(out)
