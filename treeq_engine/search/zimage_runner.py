"""The search's segment runner for diffusers' Z-Image transformer (``ZImageTransformer2DModel``, text to image:
Z-Image and Z-Image-Turbo). The same interface as ``DiffusersRunner`` (``make_runner`` picks it), so capture,
search, PTQ and PEFT take Z-Image too; the runtime packs it and fuses its blocks (``runtime/zimage_fused.py``).

Segments: 0 runs everything before the main blocks (the timestep embedding; the patch embedding and the noise
refiner blocks over the image tokens; the caption embedding and the context refiner blocks over the caption tokens;
the unified ``[image, caption]`` sequence and its rotary table), ``1..B`` the main blocks (``layers``), the last
one the final layer and unpatchify. Each does what the model's ``forward`` does between those points (a test holds
their composition bit-identical to ``transformer(...).sample``, stacked). The refiner blocks are block layers:
searched, not held at 8 bits, although they run in segment 0. The state between blocks is ``(unified tokens,
attention mask, rotary table, adaLN input, image sizes)``; the mask is ``(N, 0)`` when no token is padding (the
model then passes none), and the image sizes stay on the host.

Calibration inputs, in the order of ``input_names``: ``hidden_states (N, C, F, H, W)`` (the pipeline's list of
per-sample latents, stacked: one size per call), ``timestep (N,)`` (as the pipeline passes it: ``(1000 − t) /
1000``), ``encoder_hidden_states (N, L, D)`` (the pipeline's list of per-prompt caption features, each as long as
its prompt, padded to the longest with zeros) and ``encoder_attention_mask (N, L)`` (1 for a prompt token). The
calls of a calibration set are padded to the longest prompt of all (``ragged``); segment 0 strips the padding
again, so the model sees each prompt as the pipeline gave it.

The MSE is taken on the whole output (the flow-matching prediction). What the search cannot reproduce is an error at
capture: the omni variant's calls (nested lists, SigLIP features), ControlNet residuals, attention kwargs.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
import torch.nn as nn

from .evaluator import CutModel, State, arch_of_class, describe_arg, sample_scalars

ZIMAGE = "z-image"
_SEQ_MULTIPLE = 32   # Z-Image pads every image and caption to a multiple of this with its pad tokens
_REFINERS = ("noise_refiner", "context_refiner")


def zimage_arch(model: nn.Module) -> str | None:
    """``"z-image"`` for the Z-Image transformer this runner cuts, ``None`` for anything else."""
    return arch_of_class(model, "ZImageTransformer2DModel", ZIMAGE, "layers", *_REFINERS)


class ZImageRunner(CutModel):
    """``SegmentRunner`` for a diffusers Z-Image transformer (see the module docstring)."""

    extra_conditions = False   # (PixArt's; ``load_inputs`` asks every runner)
    scheduler_timesteps = False   # (the pipeline passes (1000 - t) / 1000)
    pads_rows = True   # (a batch pads its sequences to the longest: real_rows)
    ragged = {"encoder_hidden_states": 0.0, "encoder_attention_mask": 0}
    blocks_attr = "layers"
    head_modules = ("all_final_layer",)
    input_names = ("hidden_states", "timestep", "encoder_hidden_states", "encoder_attention_mask")

    def __init__(self, model: nn.Module, *, output_fn: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        if zimage_arch(model) is None:
            raise TypeError(f"ZImageRunner cuts diffusers' ZImageTransformer2DModel; got {type(model).__name__}")
        if getattr(model, "siglip_embedder", None) is not None:
            raise TypeError("ZImageRunner cuts text-to-image Z-Image; this one has SigLIP image conditioning "
                            "(siglip_feat_dim: the omni variant), which its calls need")
        self.model: Any = model   # a diffusers transformer: its submodules are read by name
        self.arch = ZIMAGE
        self.blocks = model.layers
        self.num_segments = len(self.blocks) + 2
        self.patch = int(model.all_patch_size[0])
        self.f_patch = int(model.all_f_patch_size[0])
        self.key = f"{self.patch}-{self.f_patch}"
        self.in_channels = int(model.config.in_channels)
        self.cap_dim = int(model.config.cap_feat_dim)
        self._meta_size: tuple[int, ...] = ()   # the latent size segment 0 last saw (read on the meta device)
        self.output_fn = output_fn

    def tie(self, layer_name: str) -> str | None:
        """Linears that read one input, searched as one leaf: the attention's to_q/to_k/to_v and the SwiGLU
        feed-forward's w1/w3, in every block (refiners included)."""
        head, _, last = layer_name.rpartition(".")
        if head.endswith(".attention") and last in ("to_q", "to_k", "to_v"):
            return head + ".qkv"
        if head.endswith(".feed_forward") and last in ("w1", "w3"):
            return head + ".w13"
        return None

    def real_rows(self, layer_name: str, state: State) -> torch.Tensor | None:
        """The rows a batch pads its sequences with (to its longest caption, and after the unified sequence) are
        not real: the context refiners' and the main blocks' rows the attention mask hides; the final layer reads
        only the image tokens (the caption tokens it also projects are dropped by unpatchify). The pad tokens
        Z-Image appends to every image and caption (to a multiple of 32) are attended to: real; but the embedders
        see each sample's last token repeated in their place (replaced by the pad token after): not real."""
        parts = layer_name.split(".")
        if parts[0] in ("cap_embedder", "all_x_embedder"):   # the samples' rows, each padded to a multiple of 32
            if parts[0] == "cap_embedder":
                lens = state[3].sum(dim=1)
            else:
                f, h, w = state[0].shape[2:]
                lens = torch.full((state[0].shape[0],), f // self.f_patch * (h // self.patch) * (w // self.patch),
                                  device=state[0].device)
            padded = lens + (-lens) % _SEQ_MULTIPLE   # the copies of each last token are replaced by pad tokens
            return torch.cat([torch.arange(int(p), device=lens.device) < n for n, p in zip(lens, padded)])
        if parts[0] == "context_refiner" and not parts[2].startswith("adaLN"):
            lens = state[3].sum(dim=1)
            padded = lens + (-lens) % _SEQ_MULTIPLE
            return torch.arange(int(padded.max()), device=padded.device)[None, :] < padded[:, None]
        if parts[0] == self.blocks_attr and not parts[2].startswith("adaLN"):
            mask = state[1]
            return mask.bool() if mask.shape[1] else None
        if parts[0] in self.head_modules and parts[-1] == "linear":
            h, sizes = state[0], state[4]
            tokens = sizes[:, 0] // self.f_patch * (sizes[:, 1] // self.patch) * (sizes[:, 2] // self.patch)
            return torch.arange(h.shape[1], device=h.device)[None, :] < tokens.to(h.device)[:, None]
        return None

    # -- inputs ------------------------------------------------------------------------------------
    def inputs(self, x: Any = None, t: Any = None, cap_feats: Any = None, *, hidden_states: Any = None,
               timestep: Any = None, encoder_hidden_states: Any = None, encoder_attention_mask: Any = None,
               controlnet_block_samples: Any = None, siglip_feats: Any = None, image_noise_mask: Any = None,
               patch_size: int = 2, f_patch_size: int = 1, joint_attention_kwargs: Mapping[str, Any] | None = None,
               **_: Any) -> State:
        """One transformer call's arguments (as the pipeline passes them: ``x``, ``t``, ``cap_feats``; or a stored
        input tuple by this runner's input names) as this runner's input tuple: the latents stacked, the captions
        padded to the longest with their mask, the timestep broadcast to the batch. What the search cannot
        reproduce is an error."""
        x = hidden_states if x is None else x
        t = timestep if t is None else t
        cap_feats = encoder_hidden_states if cap_feats is None else cap_feats
        if joint_attention_kwargs:
            raise ValueError(f"the search runs the default attention; joint_attention_kwargs "
                             f"{sorted(joint_attention_kwargs)} are not supported")
        if controlnet_block_samples is not None:
            raise ValueError("the search does not support ControlNet residuals")
        if siglip_feats is not None or image_noise_mask is not None or \
                (isinstance(x, (list, tuple)) and x and isinstance(x[0], (list, tuple))):
            raise ValueError("the search cuts Z-Image's text-to-image calls; the omni variant's (nested lists of "
                             "images, SigLIP features, noise masks) are not supported")
        if (patch_size, f_patch_size) != (self.patch, self.f_patch):
            raise ValueError(f"the search cuts patch size {self.patch}, frame patch {self.f_patch} (the model's "
                             f"first); the call asks for {patch_size}, {f_patch_size}")
        latents = self._latents(x)
        n = latents.shape[0]
        enc, mask = self._captions(cap_feats, encoder_attention_mask, n)
        return (latents, sample_scalars("t (the timestep)", t, n, latents.device), enc, mask)

    def _captions(self, caps: Any, mask: Any, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The pipeline's list of ``n`` caption features ``(L_i, D)`` as ``(N, L, D)`` zero-padded and its ``(N, L)``
        mask; a stored ``(N, L, D)`` with its mask, checked (each row a prefix of ones: the prompt, then padding)."""
        if isinstance(caps, (list, tuple)):
            if len(caps) != n or not all(isinstance(c, torch.Tensor) and c.dim() == 2 and c.shape[1] == self.cap_dim
                                         and c.shape[0] > 0 for c in caps):
                raise ValueError(f"cap_feats must be {n} caption features (L_i, {self.cap_dim}), one per latent, got "
                                 f"{[describe_arg(c) for c in caps]}")
            longest = max(c.shape[0] for c in caps)
            enc = caps[0].new_zeros(n, longest, self.cap_dim)
            out = torch.zeros(n, longest, dtype=torch.long, device=enc.device)
            for i, c in enumerate(caps):
                enc[i, :c.shape[0]] = c
                out[i, :c.shape[0]] = 1
            return enc, out
        if not isinstance(caps, torch.Tensor) or caps.dim() != 3 or caps.shape[0] != n or caps.shape[2] != self.cap_dim:
            raise ValueError(f"cap_feats must be a list of {n} caption features (L_i, {self.cap_dim}), got "
                             f"{describe_arg(caps)}")
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(caps.shape[:2]):
            raise ValueError(f"padded caption features {tuple(caps.shape)} need their (N, L) mask, got "
                             f"{describe_arg(mask)}")
        lens = mask.sum(dim=1)
        prefix = torch.arange(mask.shape[1], device=mask.device)[None, :] < lens[:, None]
        if not torch.equal(mask.bool(), prefix) or bool((lens == 0).any()):
            raise ValueError("encoder_attention_mask must mark each caption's tokens first, then its padding, with "
                             "at least one token per caption")
        return caps, mask

    def saw_padding(self) -> None:
        """Calls stacked padded (``ragged``) need nothing more: segment 0 strips each caption's padding again."""

    def _latents(self, x: Any) -> torch.Tensor:
        if isinstance(x, torch.Tensor) and x.dim() == 5:
            latents = x
        elif isinstance(x, (list, tuple)) and x and all(isinstance(v, torch.Tensor) and v.dim() == 4 for v in x):
            if len({tuple(v.shape) for v in x}) != 1:
                raise ValueError(f"the latents of one call differ in size ({sorted({tuple(v.shape) for v in x})}): "
                                 "capture calls of one resolution")
            latents = torch.stack(list(x))
        else:
            raise ValueError(f"x must be a list of (C, F, H, W) latents (or one (N, C, F, H, W) tensor), got "
                             f"{describe_arg(x) if not isinstance(x, (list, tuple)) else [describe_arg(v) for v in x]}")
        c, f, h, w = latents.shape[1:]
        if c != self.in_channels or f % self.f_patch or h % self.patch or w % self.patch:
            raise ValueError(f"latents must be ({self.in_channels}, F, H, W) with F a multiple of {self.f_patch} and "
                             f"H, W multiples of {self.patch}, got {tuple(latents.shape[1:])}")
        return latents

    def shape_extremes(self, inputs: State) -> list[State]:
        """For the profiler's meta-device pass (which cannot read a caption's length): the input tuple with every
        caption whole, and with every caption one token long. The rows of any real call lie between the two."""
        return [inputs, inputs[:2] + (inputs[2][:, :1], inputs[3][:, :1])]

    # -- the model's forward, cut ------------------------------------------------------------------
    def _embed(self, state: State) -> State:
        """The model's forward up to its main blocks, on the call as the pipeline made it (each caption unpadded)."""
        m = self.model
        latents, t, enc, mask = state[:4]
        xs = list(latents.unbind(0))
        # (on the meta device, where the profiler finds shapes, nothing can be read: each caption taken whole)
        lens = [enc.shape[1]] * len(xs) if enc.is_meta else mask.sum(dim=1).tolist()
        caps = [c[:int(k)] for c, k in zip(enc, lens)]
        device = latents.device
        adaln = m.t_embedder(t * m.t_scale).type_as(xs[0])
        x, cap, sizes, x_pos, cap_pos, x_pad, cap_pad = m.patchify_and_embed(xs, caps, self.patch, self.f_patch)
        self._meta_size = tuple(sizes[0])
        x_lens = [len(v) for v in x]
        x = m.all_x_embedder[self.key](torch.cat(x, dim=0))
        x, x_freqs, x_mask, _, _ = m._prepare_sequence(list(x.split(x_lens, dim=0)), x_pos, x_pad, m.x_pad_token,
                                                       None, device)
        for layer in m.noise_refiner:
            x = layer(x, x_mask, x_freqs, adaln, None, None, None)
        cap_lens = [len(v) for v in cap]
        cap = m.cap_embedder(torch.cat(cap, dim=0))
        cap, cap_freqs, cap_mask, _, _ = m._prepare_sequence(list(cap.split(cap_lens, dim=0)), cap_pos, cap_pad,
                                                             m.cap_pad_token, None, device)
        for layer in m.context_refiner:
            cap = layer(cap, cap_mask, cap_freqs)
        h, freqs, attn_mask, _ = m._build_unified_sequence(x, x_freqs, x_lens, None, cap, cap_freqs, cap_lens, None,
                                                           None, None, None, None, False, device)
        if attn_mask is None:
            attn_mask = torch.ones(h.shape[0], 0, dtype=torch.bool, device=device)
        # (the sizes stay on the host: the head reads them back without a device sync)
        return (h, attn_mask, freqs, adaln, torch.tensor(sizes, dtype=torch.long))

    def _block(self, i: int, state: State) -> State:
        h, attn_mask, freqs, adaln, sizes = state
        h = self.blocks[i](h, attn_mask if attn_mask.shape[1] else None, freqs, adaln, None, None, None)
        return (h, attn_mask, freqs, adaln, sizes)

    def _head(self, state: State) -> torch.Tensor:
        m = self.model
        h, adaln, sizes = state[0], state[3], state[4]
        h = m.all_final_layer[self.key](h, c=adaln)
        size = [tuple(s) for s in sizes.tolist()] if not sizes.is_meta else [self._meta_size] * h.shape[0]
        return torch.stack(m.unpatchify(list(h.unbind(dim=0)), size, self.patch, self.f_patch))
