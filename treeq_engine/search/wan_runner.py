"""The search's segment runner for diffusers' Wan video transformer (``WanTransformer3DModel``: Wan 2.1 text- and
image-to-video, and each expert of Wan 2.2 A14B). The same interface as ``DiffusersRunner`` (``make_runner`` picks
it), so capture, search, PTQ and PEFT take Wan too; the runtime packs it and fuses its blocks
(``runtime/wan_fused.py``).

Segments: 0 runs the embedders (the 3-d patch embedding, the timestep, text (and image) embedders), ``1..B`` the
blocks, the last one the output norm, modulation, projection and unpatchify. Each does what the model's ``forward``
does between those points (a test holds their composition bit-identical to ``transformer(...).sample``). The state
between blocks is ``(tokens, text (and image) tokens, timestep projection, temb, timestep)``; each block segment
rebuilds the rotary table from the latent grid (frames, height, width in patches), which segment 0 records per token
count (a host value, as SD3's runner keeps its grid).

Calibration inputs, in the order of ``input_names``: ``hidden_states (N, C, F, H, W)``, ``timestep (N,)`` (the
scheduler's, 0..1000; Wan 2.2 TI2V's ``expand_timesteps`` pipelines pass one per latent token, ``(N, S)``, its
image-to-video the first frame's tokens at 0), ``encoder_hidden_states (N, L, D)``, and for image-to-video models
(``image_dim`` set) ``encoder_hidden_states_image (N, I, E)``: the CLIP image tokens, or for first-last-frame models
(``pos_embed_seq_len``, which the pipeline passes as ``(2N, I, E)``: each sample's two images in consecutive rows)
``(N, 2, I, E)``, so that the sample is on dim 0.

The MSE is taken on the output (the flow-matching velocity) the pipeline reads: with per-token timesteps, not on the
tokens held below their sample's timestep (the conditioning first frame, which the pipeline overwrites after every
step), nor do the output projection's PTQ statistics read them. What the search cannot reproduce is an error at capture:
attention kwargs.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
import torch.nn as nn

from .evaluator import CutModel, State, arch_of_class, describe_arg, noisy_tokens, token_timesteps

WAN = "wan"


def wan_arch(model: nn.Module) -> str | None:
    """``"wan"`` for the Wan transformer this runner cuts, ``None`` for anything else."""
    return arch_of_class(model, "WanTransformer3DModel", WAN, "blocks", "rope")


class WanRunner(CutModel):
    """``SegmentRunner`` for a diffusers Wan transformer (see the module docstring)."""

    extra_conditions = False   # (PixArt's; ``load_inputs`` asks every runner)
    blocks_attr = "blocks"

    def __init__(self, model: nn.Module, *, output_fn: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        if wan_arch(model) is None:
            raise TypeError(f"WanRunner cuts diffusers' WanTransformer3DModel; got {type(model).__name__}")
        self.model: Any = model   # a diffusers transformer: its submodules are read by name
        self.arch = WAN
        self.blocks = model.blocks
        self.num_segments = len(self.blocks) + 2
        cfg = model.config
        self.patch = tuple(int(p) for p in cfg.patch_size)
        self.in_channels = int(cfg.in_channels)
        self.image = cfg.image_dim is not None
        # first-last-frame models (pos_embed_seq_len) take two images' embeddings per sample, as consecutive rows
        embedder = getattr(model.condition_embedder, "image_embedder", None)
        self.pairs = getattr(embedder, "pos_embed", None) is not None
        self._grids: dict[int, tuple[int, int, int]] = {}
        self.output_fn = output_fn

    @property
    def input_names(self) -> tuple[str, ...]:
        names = ("hidden_states", "timestep", "encoder_hidden_states")
        return names + (("encoder_hidden_states_image",) if self.image else ())

    def tie(self, layer_name: str) -> str | None:
        """Linears that read one input, searched as one leaf: the self-attention's to_q/to_k/to_v, the
        cross-attention's to_k/to_v (text tokens) and its add_k_proj/add_v_proj (image tokens)."""
        head, _, last = layer_name.rpartition(".")
        attn = head.rpartition(".")[2]
        if attn == "attn1" and last in ("to_q", "to_k", "to_v"):
            return head + ".qkv"
        if attn == "attn2" and last in ("to_k", "to_v"):
            return head + ".kv"
        if attn == "attn2" and last in ("add_k_proj", "add_v_proj"):
            return head + ".add_kv"
        return None

    # -- inputs ------------------------------------------------------------------------------------
    def inputs(self, hidden_states: torch.Tensor, timestep: torch.Tensor | float | None = None,
               encoder_hidden_states: torch.Tensor | None = None,
               encoder_hidden_states_image: torch.Tensor | None = None, *,
               attention_kwargs: Mapping[str, Any] | None = None, check_values: bool = True, **_: Any) -> State:
        """One transformer call's arguments (as the pipeline passes them) as this runner's input tuple, the
        timestep broadcast to the batch. What the search cannot reproduce is an error. (``check_values`` is
        accepted for the common interface: nothing here reads values back from the device.)"""
        if attention_kwargs:
            raise ValueError(f"the search runs the default attention; attention_kwargs {sorted(attention_kwargs)} "
                             "are not supported")
        if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() != 5:
            raise ValueError(f"hidden_states must be an (N, C, F, H, W) video latent, got {describe_arg(hidden_states)}")
        n = hidden_states.shape[0]
        if hidden_states.shape[1] != self.in_channels:
            raise ValueError(f"hidden_states must have {self.in_channels} channels, got {tuple(hidden_states.shape)}")
        if any(s % p for s, p in zip(hidden_states.shape[2:], self.patch)):
            raise ValueError(f"hidden_states' frames, height and width must be multiples of the patch size "
                             f"{self.patch}, got {tuple(hidden_states.shape)}")
        width = self.model.config.text_dim
        if not isinstance(encoder_hidden_states, torch.Tensor) or encoder_hidden_states.dim() != 3 or \
                encoder_hidden_states.shape[0] != n or encoder_hidden_states.shape[2] != width:
            raise ValueError(f"encoder_hidden_states must be (N={n}, L, {width}), got {describe_arg(encoder_hidden_states)}")
        tokens = 1
        for size, p in zip(hidden_states.shape[2:], self.patch):
            tokens *= size // p
        t = token_timesteps(timestep, n, tokens, hidden_states.device)
        out: State = (hidden_states, t, encoder_hidden_states)
        if not self.image:
            if encoder_hidden_states_image is not None:
                raise ValueError("encoder_hidden_states_image given to a text-to-video Wan (no image_dim)")
            return out
        dim = self.model.config.image_dim
        img = encoder_hidden_states_image
        if self.pairs:
            if isinstance(img, torch.Tensor) and img.dim() == 4 and tuple(img.shape[:2]) == (n, 2) and \
                    img.shape[3] == dim:
                return out + (img,)   # (as a calibration file stores them)
            if not isinstance(img, torch.Tensor) or img.dim() != 3 or img.shape[0] != 2 * n or img.shape[2] != dim:
                raise ValueError(f"this first-last-frame Wan needs encoder_hidden_states_image (2N={2 * n}, I, {dim}) "
                                 f"(two images per sample), got {describe_arg(img)}")
            return out + (img.unflatten(0, (n, 2)),)
        if not isinstance(img, torch.Tensor) or img.dim() != 3 or img.shape[0] != n or img.shape[2] != dim:
            raise ValueError(f"this image-to-video Wan needs encoder_hidden_states_image (N={n}, I, {dim}), got "
                             f"{describe_arg(img)}")
        return out + (img,)


    def real_rows(self, layer_name: str, state: State) -> torch.Tensor | None:
        """The output projection's rows of conditioning tokens are not real (their prediction is overwritten)."""
        return noisy_tokens(state[4]) if layer_name == "proj_out" else None

    def _block(self, i: int, state: State) -> State:
        h, enc, tproj = state[:3]
        return (self.blocks[i](h, enc, tproj, self._rope(h)),) + state[1:]

    # -- the model's forward, cut ------------------------------------------------------------------
    def _grid(self, tokens: int) -> tuple[int, int, int]:
        if tokens not in self._grids:
            raise RuntimeError(f"no latent grid of {tokens} patches went through segment 0")
        return self._grids[tokens]

    def _rope(self, h: torch.Tensor) -> Any:
        """The rotary table of the latent grid behind ``h``'s tokens: the model's ``rope`` reads only the shape of
        its argument, so an expanded scalar stands in for the latent."""
        f, hh, w = self._grid(h.shape[1])
        pt, ph, pw = self.patch
        return self.model.rope(h.new_zeros(()).expand(1, 1, f * pt, hh * ph, w * pw))

    def _embed(self, state: State) -> State:
        m = self.model
        x, t, enc = state[:3]
        grid = (x.shape[2] // self.patch[0], x.shape[3] // self.patch[1], x.shape[4] // self.patch[2])
        tokens = grid[0] * grid[1] * grid[2]
        if self._grids.setdefault(tokens, grid) != grid:
            raise ValueError(f"latents of {tokens} patches came as {self._grids[tokens]} and {grid} grids: use one "
                             "shape per token count")
        h = m.patch_embedding(x).flatten(2).transpose(1, 2).contiguous()
        img = state[3].flatten(0, 1) if self.pairs else state[3] if self.image else None
        per_token = t.dim() == 2   # (Wan 2.2 TI2V: temb (N, S, D), the projection (N, S, 6, D))
        temb, tproj, enc, img = m.condition_embedder(t.flatten(), enc, img,
                                                     timestep_seq_len=t.shape[1] if per_token else None)
        tproj = tproj.unflatten(2 if per_token else 1, (6, -1))
        if img is not None:
            enc = torch.concat([img, enc], dim=1)
        return (h, enc, tproj, temb, t)

    def _head(self, state: State) -> torch.Tensor:
        m = self.model
        h, temb = state[0], state[3]
        if temb.dim() == 3:   # per token
            shift, scale = (m.scale_shift_table[None].to(temb.device) + temb.unsqueeze(2)).chunk(2, dim=2)
            shift, scale = shift.squeeze(2), scale.squeeze(2)
        else:
            shift, scale = (m.scale_shift_table.to(temb.device) + temb.unsqueeze(1)).chunk(2, dim=1)
        h = (m.norm_out(h.float()) * (1 + scale.to(h.device)) + shift.to(h.device)).type_as(h)
        h = m.proj_out(h)
        f, hh, w = self._grid(h.shape[1])
        pt, ph, pw = self.patch
        h = h.reshape(h.shape[0], f, hh, w, pt, ph, pw, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return h.flatten(6, 7).flatten(4, 5).flatten(2, 3)

    def _read_mask(self, state: State, out: torch.Tensor) -> torch.Tensor | None:
        """The noisy tokens' elements of the output ``(N, C, F, H, W)``: a conditioning token's patch is not read."""
        keep = noisy_tokens(state[4])
        if keep is None:
            return None
        f, hh, w = self._grid(keep.shape[1])
        pt, ph, pw = self.patch
        keep = keep.view(-1, 1, f, 1, hh, 1, w, 1).expand(-1, 1, f, pt, hh, ph, w, pw)
        return keep.reshape(keep.shape[0], 1, f * pt, hh * ph, w * pw).to(out.device)
