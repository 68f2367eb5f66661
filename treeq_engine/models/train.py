"""Training a class-conditional DiT on an in-memory image set: ADM's hybrid loss, AdamW, EMA, resumable.

Every random draw (batch indices, timesteps, noise, label dropout) comes from one ``torch.Generator`` seeded
with ``TrainConfig.seed`` and saved in the checkpoint, so a run killed and resumed gives the same weights as an
uninterrupted one (on the same machine and thread count). The learning rate warms up linearly, then follows a
cosine down to ``min_lr_ratio · lr``. The checkpoint (``train_state.pt``, read with ``weights_only=True``) is
written atomically every ``checkpoint_every`` steps and at the end.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import numbers
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .checkpoint import CheckpointError
from .diffusion import GaussianDiffusion
from .dit import DiT

STATE_FILE = "train_state.pt"
# What save() writes; a file without all of them is not a training state this code can resume from.
_STATE_KEYS = ("model", "ema", "opt", "generator", "step", "record", "train_config", "dit_config")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 4000
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 200
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    seed: int = 0
    checkpoint_every: int = 250

    def __post_init__(self) -> None:
        # Caught here rather than as a NaN loss of an empty batch or a modulo by zero in the loop.
        for f, least in (("steps", 1), ("batch_size", 1), ("checkpoint_every", 1), ("warmup", 0)):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < least:
                raise ValueError(f"TrainConfig.{f} must be an int >= {least}, got {v!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral):
            raise ValueError(f"TrainConfig.seed must be an int, got {self.seed!r}")
        if not (isinstance(self.lr, numbers.Real) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"TrainConfig.lr must be a positive finite number, got {self.lr!r}")
        for f in ("min_lr_ratio", "ema_decay"):
            v = getattr(self, f)
            if not (isinstance(v, numbers.Real) and 0 <= v <= 1):
                raise ValueError(f"TrainConfig.{f} must be in [0, 1], got {v!r}")

    def lr_at(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        frac = (step - self.warmup) / max(1, self.steps - self.warmup)
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for pe, p in zip(ema.parameters(), model.parameters()):
        pe.mul_(decay).add_(p.detach(), alpha=1 - decay)


def _save_atomic(obj: dict[str, Any], path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train_dit(model: DiT, images: torch.Tensor, labels: torch.Tensor, diffusion: GaussianDiffusion,
              cfg: TrainConfig, out_dir: str | Path, *, resume: bool = True, progress: bool = True,
              stop_after: int | None = None) -> tuple[DiT, dict[str, Any]]:
    """Train ``model`` in place on ``images (N, C, H, W)``, ``labels (N,)``; returns the EMA model and a record
    (losses every 50 steps, wall time). ``stop_after`` ends early after that many steps (for tests of resume).

    A ``train_state.pt`` in ``out_dir`` is resumed only if it was written with the same ``TrainConfig`` and DiT
    config; anything else is a :class:`CheckpointError` naming the difference."""
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"cfg must be a TrainConfig, got {type(cfg).__name__}")
    mc = model.config
    want = (mc.in_channels, mc.input_size, mc.input_size)
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or tuple(images.shape[1:]) != want:
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a tensor (N, {want[0]}, {want[1]}, {want[2]}) for this DiT, got {got}")
    if images.shape[0] == 0:
        raise ValueError("images is empty: there is nothing to train on")
    if not images.is_floating_point():
        raise TypeError(f"images must be a float tensor (in [-1, 1]), got {images.dtype}")
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1:
        got = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"labels must be a 1-D tensor (N,), got {got}")
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
    if labels.is_floating_point() or labels.dtype == torch.bool or labels.is_complex():
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    # One pass over the data, next to the training itself; a bad value would otherwise surface as "training
    # diverged" or an index error inside the label embedding.
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= mc.num_classes:
        raise ValueError(f"labels must be in [0, {mc.num_classes}) for this DiT (num_classes {mc.num_classes}), got "
                         f"values in [{lo}, {hi}]")
    bad = int((~torch.isfinite(images)).sum())
    if bad:
        raise ValueError(f"images contain NaN or Inf ({bad} of {images.numel()} values)")
    # The model's output width and the process's variance type must agree: a learned-sigma model (2C channels)
    # under a fixed variance would be compared to C-channel noise (broadcast, or a size mismatch deep in the
    # loss), and a fixed-sigma model has no variance channels for a learned-range process.
    learned = diffusion.var_type == "learned_range"
    if mc.learn_sigma != learned:
        raise ValueError(f"the DiT has learn_sigma={mc.learn_sigma} but the diffusion's variance is "
                         f"{diffusion.var_type!r}; pair a learned-sigma model with create_diffusion(learn_sigma=True) "
                         "and a fixed-sigma one with learn_sigma=False")
    if stop_after is not None and (isinstance(stop_after, bool) or not isinstance(stop_after, numbers.Integral)
                                   or stop_after < 1):
        raise ValueError(f"stop_after must be None or an int >= 1, got {stop_after!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state_path = out_dir / STATE_FILE
    gen = torch.Generator().manual_seed(cfg.seed)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                            weight_decay=cfg.weight_decay)
    record: dict[str, Any]   # lists of floats and the float "seconds"
    step, record = 0, {"loss": [], "mse": [], "vb": [], "seconds": 0.0}
    if resume and state_path.exists():
        try:
            st = torch.load(state_path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any read failure means the same thing here
            raise CheckpointError(f"{state_path}: cannot resume from it ({type(e).__name__}: {e}); delete it to "
                                  "start over") from None
        if not isinstance(st, Mapping):
            raise CheckpointError(f"{state_path} holds a {type(st).__name__}, not a training state; delete it to "
                                  "start over")
        missing = [k for k in _STATE_KEYS if k not in st]
        if missing:
            raise CheckpointError(f"{state_path} is not a complete training state (missing {missing}); delete it to "
                                  "start over")
        if st["train_config"] != dataclasses.asdict(cfg):
            raise CheckpointError(f"{state_path} was written with a different TrainConfig "
                                  f"({st['train_config']}); use another output directory")
        now = model.config.to_dict()
        if st["dit_config"] != now:
            saved = st["dit_config"] if isinstance(st["dit_config"], Mapping) else {}
            diff = {k: (saved.get(k), now.get(k)) for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)}
            raise CheckpointError(f"{state_path} was written for a different DiT config (field: (saved, this "
                                  f"model's) {diff}); use another output directory")
        try:
            model.load_state_dict(st["model"])
            ema.load_state_dict(st["ema"])
            opt.load_state_dict(st["opt"])
            gen.set_state(st["generator"])
            step, record = int(st["step"]), st["record"]
        except (KeyError, TypeError, ValueError, RuntimeError) as e:  # same config, yet the contents do not fit
            msg = str(e).splitlines()[0] if str(e) else ""
            raise CheckpointError(f"{state_path}: cannot resume from it ({type(e).__name__}: {msg}); delete it to "
                                  "start over") from None

    def save() -> None:
        _save_atomic({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                      "generator": gen.get_state(), "step": step, "record": record,
                      "train_config": dataclasses.asdict(cfg), "dit_config": model.config.to_dict()}, state_path)

    end = cfg.steps if stop_after is None else min(cfg.steps, step + stop_after)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=step, desc="train", dynamic_ncols=True)
    model.train()
    acc: dict[str, float] = {"loss": 0.0, "mse": 0.0, "vb": 0.0}
    t0 = time.time()
    n = images.shape[0]
    drop_p = model.config.class_dropout_prob
    while step < end:
        idx = torch.randint(0, n, (cfg.batch_size,), generator=gen)
        x0, y = images[idx], labels[idx]
        t = torch.randint(0, diffusion.num_timesteps, (cfg.batch_size,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        drop = (torch.rand(cfg.batch_size, generator=gen) < drop_p).long()
        for g in opt.param_groups:
            g["lr"] = cfg.lr_at(step)
        terms = diffusion.training_losses(model, x0, t, noise=noise,
                                          model_kwargs={"y": y, "force_drop_ids": drop})
        loss = terms["loss"].mean()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training diverged at step {step}: loss {loss.item()}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        # EMA warm-up: early on the average would be dominated by the random init.
        ema_update(ema, model, min(cfg.ema_decay, (1 + step) / (10 + step)))
        step += 1
        for k in acc:
            acc[k] += float(terms[k].detach().mean()) if k in terms else 0.0
        if step % 50 == 0:
            for k in acc:
                record[k].append(acc[k] / 50)
                acc[k] = 0.0
            if bar is not None:
                bar.set_postfix(loss=f"{record['loss'][-1]:.4f}", mse=f"{record['mse'][-1]:.4f}")
        if bar is not None:
            bar.update(1)
        if step % cfg.checkpoint_every == 0 or step == end:
            record["seconds"] = float(record["seconds"]) + time.time() - t0
            t0 = time.time()
            save()
    if bar is not None:
        bar.close()
    model.eval()
    return ema.eval(), record
