"""Loading DiT weights from a local file: official facebookresearch checkpoints and the project's own.

Accepted files:

* ``.pt`` / ``.pth`` / ``.bin``: ``torch.load(weights_only=True)`` of either a plain state dict (the released
  ``DiT-XL-2-256x256.pt``) or a training checkpoint holding ``"ema"`` (what the reference ``train.py`` writes;
  ``"ema"`` wins over ``"model"``, as in the reference's ``find_model``);
* ``.safetensors``: a flat state dict.

Nothing is ever unpickled beyond tensors and plain containers. Every failure is a :class:`CheckpointError`
naming the file and what is wrong: not found, unreadable or truncated, not a state dict, or a state dict that
does not fit the model (missing and unexpected keys, shape mismatches, each listed).
"""
from __future__ import annotations

import math
import pickle
import re
from pathlib import Path
from typing import Any, Mapping

import torch

from .dit import DIT_CONFIGS, DiT, DiTConfig


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read or does not fit the model."""


def read_state_dict(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file (unwrapping ``{"ema": ...}`` / ``{"model": ...}``)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist or is not a file")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path), device=str(map_location)))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    try:
        obj = torch.load(str(path), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path}: refused to load (weights_only=True allows only tensors and plain "
                              f"containers): {msg}") from None
    except Exception as e:  # noqa: BLE001 - torch.load fails on bad bytes in many ways (EOF, IndexError, ...)
        raise CheckpointError(f"{path}: not a readable torch checkpoint (truncated or corrupt?): "
                              f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    return unwrap_state_dict(obj, where=str(path))


def unwrap_state_dict(obj: Any, where: str = "checkpoint") -> dict[str, torch.Tensor]:
    """A plain state dict from a loaded checkpoint object."""
    if isinstance(obj, Mapping):
        for key in ("ema", "model", "state_dict"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{where}: expected a state dict (name -> tensor) or a dict holding 'ema', got "
                              f"{type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{where}: not a state dict: {len(bad)} entries are not (str -> tensor), e.g. "
                              f"{bad[:3]} (top-level keys: {list(obj)[:8]})")
    # DDP-wrapped models save 'module.'-prefixed keys.
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def infer_config(sd: Mapping[str, torch.Tensor], **overrides: Any) -> DiTConfig:
    """A :class:`DiTConfig` from a state dict's shapes. The head count cannot be read from shapes: it is taken
    from ``overrides`` or from the reference config of the same width (384: 6, 768: 12, 1024/1152: 16)."""
    need = ["x_embedder.proj.weight", "pos_embed", "y_embedder.embedding_table.weight", "final_layer.linear.weight",
            "blocks.0.mlp.fc1.weight"]
    missing = [k for k in need if k not in sd]
    if missing:
        raise CheckpointError(f"cannot infer a DiT config: the state dict lacks {missing} (is this a DiT "
                              f"checkpoint? first keys: {list(sd)[:5]})")
    try:
        proj = sd["x_embedder.proj.weight"]
        hidden, in_ch, p = proj.shape[0], proj.shape[1], proj.shape[2]
        tokens = sd["pos_embed"].shape[1]
        grid = int(round(tokens ** 0.5))
        out_ch = sd["final_layer.linear.weight"].shape[0] // (p * p)
        depth = 1 + max(int(m.group(1)) for k in sd if (m := _BLOCK.match(k)))
        rows = sd["y_embedder.embedding_table.weight"].shape[0]
        mlp_ratio = sd["blocks.0.mlp.fc1.weight"].shape[0] / hidden
    except (IndexError, ValueError, ZeroDivisionError) as e:   # tensors of other ranks than a DiT's
        raise CheckpointError(f"cannot infer a DiT config from these shapes (x_embedder.proj.weight "
                              f"{tuple(sd['x_embedder.proj.weight'].shape)}, pos_embed "
                              f"{tuple(sd['pos_embed'].shape)}): {e}") from None
    if rows < 2:
        raise CheckpointError(f"y_embedder.embedding_table.weight has {rows} row(s): a DiT's label table has its "
                              "classes and the null class")
    # the label table's last row is taken as guidance's null class, as in every official checkpoint; a model
    # trained without one needs num_classes=rows, class_dropout_prob=0 in the overrides
    kw: dict[str, Any] = dict(input_size=grid * p, patch_size=p, in_channels=in_ch, hidden_size=hidden, depth=depth,
                              mlp_ratio=mlp_ratio, learn_sigma=out_ch == 2 * in_ch, num_classes=rows - 1,
                              class_dropout_prob=0.1)
    if "num_heads" not in overrides:
        heads = {c.hidden_size: c.num_heads for c in DIT_CONFIGS.values() if c.hidden_size >= 384}
        if hidden not in heads:
            raise CheckpointError(f"cannot infer num_heads for hidden size {hidden}; pass it (num_heads=...)")
        kw["num_heads"] = heads[hidden]
    kw.update(overrides)
    try:
        return DiTConfig(**kw)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"the inferred DiT config is not valid ({e}): {kw}") from None


def check_state_dict(model: torch.nn.Module, sd: Mapping[str, torch.Tensor], where: str = "checkpoint") -> None:
    """Raise a :class:`CheckpointError` listing every missing key, unexpected key and shape mismatch."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {missing[:10]}{' ...' if len(missing) > 10 else ''}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {unexpected[:10]}"
                         f"{' ...' if len(unexpected) > 10 else ''}")
        if shapes:
            parts.append(f"shape mismatches ({len(shapes)}): {shapes[:10]}{' ...' if len(shapes) > 10 else ''}")
        raise CheckpointError(f"{where} does not fit the model: " + "; ".join(parts))


def load_dit_checkpoint(path: str | Path, config: DiTConfig | str | None = None, *,
                        map_location: str | torch.device = "cpu", **overrides: Any) -> DiT:
    """A :class:`DiT` with the weights of ``path``. ``config``: a :class:`DiTConfig`, a registry name
    (``"DiT-XL/2"``; official checkpoints also need ``input_size=32`` for 256 px or ``64`` for 512 px), or
    ``None`` to infer it from the weights' shapes. The model is returned in eval mode, in the checkpoint's dtype
    (float32 when its tensors mix dtypes); non-float or non-finite tensors are a :class:`CheckpointError`."""
    sd = read_state_dict(path, map_location)
    bad = [k for k, v in sd.items() if not v.is_floating_point()]
    if bad:
        raise CheckpointError(f"{path}: a DiT's tensors are floats; {bad[:5]} are "
                              f"{sorted({str(sd[k].dtype) for k in bad})}")
    if len({v.dtype for v in sd.values()}) > 1:   # one dtype per model: mixed ones would meet in the forward
        sd = {k: v.float() for k, v in sd.items()}
    # a NaN or ±inf anywhere makes the float64 sum non-finite (14x cheaper than isfinite over every element)
    nonfinite = [k for k, v in sd.items() if not math.isfinite(float(v.sum(dtype=torch.float64)))]
    if nonfinite:
        raise CheckpointError(f"{path}: NaN or infinite weights in {nonfinite[:5]}")
    if config is not None and not isinstance(config, (str, DiTConfig)):
        raise CheckpointError(f"config must be a DiTConfig, a registry name or None, got {type(config).__name__}")
    if isinstance(config, str):
        if config not in DIT_CONFIGS:
            raise CheckpointError(f"unknown DiT config {config!r}; known: {sorted(DIT_CONFIGS)}")
        config = DIT_CONFIGS[config]
    if config is None:
        config = infer_config(sd, **overrides)
    elif overrides:
        config = config.replace(**overrides)
    with torch.device("meta"):
        model = DiT(config)  # shapes only: the weights come from the file
    try:
        check_state_dict(model, sd, where=str(path))
    except CheckpointError as e:
        pos = sd.get("pos_embed")
        if pos is not None and tuple(pos.shape) != tuple(model.pos_embed.shape):   # the usual cause: the resolution
            side = round(pos.shape[1] ** 0.5) * config.patch_size
            raise CheckpointError(f"{e}; the checkpoint's positional table is for input_size={side} (latents "
                                  f"{side}x{side}), the config's for {config.input_size}: leave the config out to "
                                  f"infer it, or pass input_size={side}") from None
        raise
    model.load_state_dict(sd, assign=True)
    model.pos_embed.requires_grad_(False)
    return model.to(map_location).eval()


def save_dit_safetensors(model: DiT, path: str | Path) -> None:
    """Write ``model``'s state dict (official key names) as safetensors, contiguous and unshared."""
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}, str(path))
