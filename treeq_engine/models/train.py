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
import os
import time
from pathlib import Path
from typing import Any

import torch

from .checkpoint import CheckpointError
from .diffusion import GaussianDiffusion
from .dit import DiT

STATE_FILE = "train_state.pt"


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
    (losses every 50 steps, wall time). ``stop_after`` ends early after that many steps (for tests of resume)."""
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state_path = out_dir / STATE_FILE
    gen = torch.Generator().manual_seed(cfg.seed)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                            weight_decay=cfg.weight_decay)
    step, record = 0, {"loss": [], "mse": [], "vb": [], "seconds": 0.0}
    if resume and state_path.exists():
        try:
            st = torch.load(state_path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any read failure means the same thing here
            raise CheckpointError(f"{state_path}: cannot resume from it ({type(e).__name__}: {e}); delete it to "
                                  "start over") from None
        if st.get("train_config") != dataclasses.asdict(cfg):
            raise CheckpointError(f"{state_path} was written with a different TrainConfig "
                                  f"({st.get('train_config')}); use another output directory")
        model.load_state_dict(st["model"])
        ema.load_state_dict(st["ema"])
        opt.load_state_dict(st["opt"])
        gen.set_state(st["generator"])
        step, record = int(st["step"]), st["record"]

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
