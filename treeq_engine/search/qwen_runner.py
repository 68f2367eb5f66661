"""The search's segment runner for diffusers' Qwen-Image transformer (``QwenImageTransformer2DModel``, text to
image). The same interface as ``DiffusersRunner`` (``make_runner`` picks it), so capture, search, PTQ and PEFT take
Qwen-Image too; the runtime packs it and fuses its blocks (``runtime/qwen_fused.py``).

Segments: 0 runs the embedders (the packed-latent and text input projections with the text RMSNorm, the timestep
embedding), ``1..B`` the double-stream blocks, the last one the output norm and projection. Each does what the
model's ``forward`` does between those points (a test holds their composition bit-identical to
``transformer(...).sample``). The state between blocks is ``(image tokens, text tokens, text mask, temb, grids)``;
each block segment rebuilds the rotary tables from the latent grids (``img_shapes``), which the runner keeps on the
host per image token count: recorded when it reads a call's inputs, else read once from the state's tensor.

Calibration inputs, in the order of ``input_names``: ``hidden_states (N, S, C)`` (packed latents),
``encoder_hidden_states (N, L, D)``, ``encoder_hidden_states_mask (N, L)`` (1 for a prompt token, 0 for padding;
all ones when the pipeline passes none), ``timestep (N,)`` (as the pipeline passes it: the scheduler's / 1000) and
``img_shapes (N, K, 3)`` (each sample's (frames, height, width) latent grids in patches, as the pipeline's
``img_shapes`` list). Qwen-Image's pipeline pads each call's prompts to the call's longest: the calls of a
calibration set are padded to the longest of all (``ragged``), which the mask hides (the image tokens, all the
metric reads, do not change: a test holds it).

The edit models (Qwen-Image-Edit, -2509, -2511) are cut too: their calls append each condition image's latent
tokens to the target's (one grid per image in ``img_shapes``, the target's first), and the 2511 model
(``zero_cond_t``) modulates the condition tokens with a zero-timestep embedding (the state then holds both
embeddings per sample, ``(N, 2, D)``). The pipelines drop the condition tokens from the prediction, so the MSE is
taken on the target's tokens only (``output``); capture such calls from Python (``capture_calls``: ``treeq capture``
runs text-only pipelines).

The MSE is taken on the flow-matching velocity. What the search cannot reproduce is an error at capture:
attention kwargs, ControlNet residuals, guidance embeddings, additional timestep conditions (the layered
variant).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
import torch.nn as nn

from .evaluator import CutModel, State, arch_of_class, describe_arg, sample_scalars
from .mmdit_runner import mmdit_tie

QWEN = "qwen-image"


def qwen_arch(model: nn.Module) -> str | None:
    """``"qwen-image"`` for the Qwen-Image transformer this runner cuts, ``None`` for anything else."""
    return arch_of_class(model, "QwenImageTransformer2DModel", QWEN, "transformer_blocks")


_ORDERS: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}   # (n, device) -> (sample-major, back)


def _sample_major_order(n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The permutation of ``[t; 0·t]`` rows (2n: all the samples' t first) to sample-major order (``t_0, 0·t_0, t_1,
    ...``) and its inverse, on ``device`` (made once per size and device: no host copy per call)."""
    key = (n, str(device))
    if key not in _ORDERS:
        order = torch.stack([torch.arange(n), torch.arange(n) + n], dim=1).flatten()
        _ORDERS[key] = (order.to(device), torch.argsort(order).to(device))
    return _ORDERS[key]


class _sample_major:
    """While open, ``module`` (the image modulation, which the 2511 block runs on ``[t; 0·t]``: 2N rows, all the
    samples' t first) sees its rows sample by sample (``t_0, 0·t_0, t_1, ...``) and hands its output back in the
    block's order. Rows are independent through a linear and per-token quantization, so this changes values only
    by the float rounding of another row order; it keeps each sample's rows together, as the search's candidate
    stacking (groups of consecutive samples along the batch) needs."""

    def __init__(self, module: nn.Module, n: int) -> None:
        self.module, self.n = module, n
        self.handles: list[Any] = []

    def __enter__(self) -> None:
        def forward_order(mod: nn.Module, args: tuple) -> tuple:
            return (args[0][_sample_major_order(self.n, args[0].device)[0]],) + args[1:]

        def back_order(mod: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
            return out[_sample_major_order(self.n, out.device)[1]]

        self.handles = [self.module.register_forward_pre_hook(forward_order),
                        self.module.register_forward_hook(back_order)]

    def __exit__(self, *exc: Any) -> None:
        for handle in self.handles:
            handle.remove()


class QwenImageRunner(CutModel):
    """``SegmentRunner`` for a diffusers Qwen-Image transformer (see the module docstring)."""

    extra_conditions = False   # (PixArt's; ``load_inputs`` asks every runner)
    scheduler_timesteps = False   # (the pipeline passes them / 1000)
    pads_rows = True   # (prompts padded to the longest: real_rows)
    # inputs whose dim 1 may differ between calls: padded to the longest with this value when calls are stacked
    ragged = {"encoder_hidden_states": 0.0, "encoder_hidden_states_mask": 0}

    def __init__(self, model: nn.Module, *, output_fn: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        if qwen_arch(model) is None:
            raise TypeError(f"QwenImageRunner cuts diffusers' QwenImageTransformer2DModel; got {type(model).__name__}")
        cfg = model.config
        if cfg.get("use_additional_t_cond"):
            raise TypeError("QwenImageRunner cuts Qwen-Image and its edit models; this one conditions on additional "
                            "timesteps (use_additional_t_cond: the layered variant)")
        self.zero_cond = bool(cfg.get("zero_cond_t"))   # (Qwen-Image-Edit-2511: condition tokens at timestep 0)
        self.model: Any = model   # a diffusers transformer: its submodules are read by name
        self.arch = QWEN
        self.blocks = model.transformer_blocks
        self.num_segments = len(self.blocks) + 2
        self.in_channels = int(cfg.in_channels)
        self._grids: dict[int, list[tuple[int, int, int]]] = {}
        # every text mask this runner has read was all ones (None: none read): the blocks then get no mask, as the
        # pipeline passes none then (unmasked attention: the fast kernels, the pipeline's own numbers)
        self._unmasked: bool | None = None
        self.output_fn = output_fn

    input_names = ("hidden_states", "encoder_hidden_states", "encoder_hidden_states_mask", "timestep", "img_shapes")

    def tie(self, layer_name: str) -> str | None:
        """Linears that read one input, searched as one leaf: the attention's to_q/to_k/to_v (image tokens) and its
        add_q/k/v_proj (text tokens), as the MMDiT runners tie them (``mmdit_tie``)."""
        return mmdit_tie(layer_name)

    def real_rows(self, layer_name: str, state: State) -> torch.Tensor | None:
        """The text stream's rows of padding (prompts of a calibration set padded to the longest, the mask hiding
        them) are not real: the text input projection's, and each block's text projections and MLP; nor are the
        condition images' tokens of an edit call to the output projection (the pipelines drop them)."""
        parts = layer_name.split(".")
        if parts[0] == "proj_out":   # an edit call's condition tokens: projected, dropped by the pipeline
            shapes = self._grids.get(state[0].shape[1])
            if shapes is not None and len(shapes) > 1:
                target = shapes[0][0] * shapes[0][1] * shapes[0][2]
                keep = torch.zeros(state[0].shape[:2], dtype=torch.bool, device=state[0].device)
                keep[:, :target] = True
                return keep
            return None
        text = parts[0] == "txt_in" or (
            len(parts) > 3 and parts[0] == "transformer_blocks" and
            (parts[2] == "txt_mlp" or (parts[2] == "attn" and parts[3] in ("add_q_proj", "add_k_proj", "add_v_proj",
                                                                           "to_add_out"))))
        mask = state[2] if text else None
        return None if mask is None else mask.bool()   # (image tokens are keys too: a fully masked prompt is unseen)

    # -- inputs ------------------------------------------------------------------------------------
    def inputs(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
               encoder_hidden_states_mask: torch.Tensor | None = None, timestep: torch.Tensor | float | None = None,
               img_shapes: Any = None, guidance: Any = None, *, attention_kwargs: Mapping[str, Any] | None = None,
               controlnet_block_samples: Any = None, additional_t_cond: Any = None, check_values: bool = True,
               **_: Any) -> State:
        """One transformer call's arguments (as the pipeline passes them) as this runner's input tuple: the timestep
        broadcast to the batch, the mask made explicit, ``img_shapes`` as a tensor (and recorded on the host per
        token count). What the search cannot reproduce is an error. (``img_shapes`` as a tensor, and the mask, are read
        back to the host: a calibration file's, on the CPU; ``check_values=False`` skips the mask's.)"""
        if attention_kwargs:
            raise ValueError(f"the search runs the default attention; attention_kwargs {sorted(attention_kwargs)} "
                             "are not supported")
        if controlnet_block_samples is not None:
            raise ValueError("the search does not support ControlNet residuals")
        if guidance is not None or additional_t_cond is not None:
            raise ValueError("the search cuts text-to-image Qwen-Image: guidance embeddings and additional timestep "
                             "conditions are not supported")
        if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() != 3 or \
                hidden_states.shape[2] != self.in_channels:
            raise ValueError(f"hidden_states must be (N, S, {self.in_channels}) packed latents, got "
                             f"{describe_arg(hidden_states)}")
        n, s = hidden_states.shape[:2]
        width = self.model.config.joint_attention_dim
        enc = encoder_hidden_states
        if not isinstance(enc, torch.Tensor) or enc.dim() != 3 or enc.shape[0] not in (1, n) or enc.shape[2] != width:
            raise ValueError(f"encoder_hidden_states must be (N={n}, L, {width}), got {describe_arg(enc)}")
        mask = encoder_hidden_states_mask
        if enc.shape[0] == 1 and n > 1:   # one negative prompt for a batch: the model broadcasts it
            enc = enc.expand(n, -1, -1)
            mask = None if mask is None else mask.expand(n, -1)
        if mask is None:
            mask = torch.ones(n, enc.shape[1], dtype=torch.long, device=enc.device)
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (n, enc.shape[1]):
            raise ValueError(f"encoder_hidden_states_mask must be (N={n}, L={enc.shape[1]}), got {describe_arg(mask)}")
        all_ones = encoder_hidden_states_mask is None or (check_values and bool(mask.all()))   # (a host read)
        self._unmasked = all_ones if self._unmasked is None else self._unmasked and all_ones
        t = sample_scalars("timestep", timestep, n, hidden_states.device)
        grids = self._grid_rows(img_shapes, n, s)
        self._grids[s] = [tuple(g) for g in grids[0].tolist()]
        return (hidden_states, enc, mask, t, grids.to(hidden_states.device))

    def saw_padding(self) -> None:
        """Calls this runner read are stacked padded (``ragged``): its blocks take the mask from now on, even if
        every call it read came unpadded (a true-CFG pipeline's prompt and negative prompt, one call each)."""
        self._unmasked = False

    def _grid_rows(self, img_shapes: Any, n: int, s: int) -> torch.Tensor:
        """``img_shapes`` (the pipeline's list of per-sample lists of (frames, height, width), or a stored
        ``(N, K, 3)`` tensor) as an ``(N, K, 3)`` CPU tensor, checked: one set of grids per call, covering the
        ``s`` image tokens."""
        if isinstance(img_shapes, torch.Tensor):
            grids = img_shapes.detach().to("cpu", torch.long)
        else:
            try:
                grids = torch.as_tensor([[tuple(g) for g in sample] for sample in img_shapes], dtype=torch.long,
                                        device="cpu")
            except (TypeError, ValueError):
                raise ValueError(f"img_shapes must be a list of per-sample lists of (frames, height, width), got "
                                 f"{img_shapes!r}") from None
        if grids.dim() != 3 or grids.shape[2] != 3 or grids.shape[0] == 0 or grids.shape[0] > n:
            raise ValueError(f"img_shapes must give (frames, height, width) grids for the {n} samples, got shape "
                             f"{tuple(grids.shape)}")
        if not torch.equal(grids, grids[:1].expand_as(grids)):
            raise ValueError("img_shapes differ between the samples of one call: Qwen-Image's rotary tables take "
                             "the first sample's")
        grids = grids[:1].expand(n, -1, -1)   # (the pipeline gives one per prompt, not per image of a prompt)
        if int(grids[0].prod(dim=1).sum()) != s:
            raise ValueError(f"img_shapes {grids[0].tolist()} cover {int(grids[0].prod(dim=1).sum())} image tokens, "
                             f"hidden_states has {s}")
        known = self._grids.get(s)
        if known is not None and known != [tuple(g) for g in grids[0].tolist()]:
            raise ValueError(f"latents of {s} tokens came as {known} and {grids[0].tolist()} grids: use one shape "
                             "per token count")
        return grids.contiguous()

    # -- the model's forward, cut ------------------------------------------------------------------
    def _embed(self, state: State) -> State:
        from diffusers.models.transformers.transformer_qwenimage import compute_text_seq_len_from_mask

        m = self.model
        x, enc, mask, t = state[:4]
        h = m.img_in(x)
        t = t.to(h.dtype)
        enc = m.txt_in(m.txt_norm(enc))
        _, _, mask = compute_text_seq_len_from_mask(enc, None if self._unmasked else mask)
        if self.zero_cond:   # the model embeds [t; 0·t]: embedded sample by sample (candidate stacking), kept (N, 2, D)
            temb = m.time_text_embed(torch.stack([t, t * 0], dim=1).flatten(), h)
            return (h, enc, mask, temb.unflatten(0, (-1, 2)), state[4])
        temb = m.time_text_embed(t, h)
        return (h, enc, mask, temb, state[4])

    def _block(self, i: int, state: State) -> State:
        h, enc, mask, temb, grids = state
        shapes = self._grids.get(h.shape[1])
        if shapes is None:   # inputs another runner read: their grids, read back once per token count
            shapes = self._grids[h.shape[1]] = [tuple(g) for g in grids[0].tolist()]
        rope = self.model.pos_embed([shapes], max_txt_seq_len=enc.shape[1], device=h.device)
        block = self.blocks[i]
        if not self.zero_cond:
            enc, h = block(hidden_states=h, encoder_hidden_states=enc, encoder_hidden_states_mask=mask, temb=temb,
                           image_rotary_emb=rope, joint_attention_kwargs=None, modulate_index=None)
            return (h, enc, mask, temb, grids)
        # as the model: both embeddings stacked on the batch ([t; 0·t]), 0 marks the target's tokens
        target = shapes[0][0] * shapes[0][1] * shapes[0][2]
        index = torch.zeros(h.shape[0], h.shape[1], dtype=torch.int, device=h.device)
        index[:, target:] = 1
        with _sample_major(block.img_mod, h.shape[0]):
            enc, h = block(hidden_states=h, encoder_hidden_states=enc, encoder_hidden_states_mask=mask,
                           temb=torch.cat([temb[:, 0], temb[:, 1]], dim=0), image_rotary_emb=rope,
                           joint_attention_kwargs=None, modulate_index=index)
        return (h, enc, mask, temb, grids)

    def _head(self, state: State) -> torch.Tensor:
        m = self.model
        h, temb = state[0], state[3]
        return m.proj_out(m.norm_out(h, temb[:, 0] if self.zero_cond else temb))

    def output(self, state: State) -> torch.Tensor:
        """The prediction the metric reads: an edit call's target tokens only (the pipelines drop the condition
        images' tokens), then ``output_fn``."""
        out = state[0]
        shapes = self._grids.get(out.shape[1])
        if shapes is not None and len(shapes) > 1:
            out = out[:, :shapes[0][0] * shapes[0][1] * shapes[0][2]]
        return out if self.output_fn is None else self.output_fn(out)
