"""The calibration set: model inputs ``(x_t, t, y)`` collected along the full-precision sampler's trajectories.

    calib = load_or_collect(model, CalibrationConfig(trajectories=32, timesteps=8), cache_dir="~/.cache/treeq")
    x, t, y = calib.inputs()

``trajectories`` samples (classes cycled 0, 1, …, one seeded sampler run) are drawn with the FP model; of the
``steps`` sampling steps, ``timesteps`` evenly spaced ones (first and last included) are kept, each contributing
every sample's input at that step. With classifier-free guidance the model runs on ``[cond; uncond]`` and both
halves are kept (the null-class inputs are what the guided model sees too). So ``N = trajectories · timesteps``
(twice that with guidance), in step-major order.

Each sample also carries a *sampler weight* ``w = c(t)²``, ``c(t) = β_t / (√α_t · √(1 − ᾱ_t))`` on the
sampler's (respaced) schedule: the factor by which an error in ε moves the DDPM posterior mean, i.e. the next
sampler state. With ``metric="sampler"`` the search weighs each sample's squared ε error by it, so it minimises
the error the sampler actually feels in one step. Plain ε-MSE (``metric="eps"``) is dominated by the last step
(t = 0, where x_t is almost clean, ε is nearly unpredictable and its error is ~100× larger, yet enters the sample
with c ≈ 0.01): on the digits DiT at W3A3, 97 % of the ε-MSE came from that one step of four (docs/search.md).

The set is cached as safetensors (``x`` float32 ``(N, C, H, W)``, ``t`` and ``y`` int64 ``(N,)``, ``w`` float64
``(N,)``) with its config and the model's fingerprint in the metadata, under a file name derived from both: the
same model and config reuse it, anything else collects afresh. Collection is deterministic by ``seed``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

SCHEMA = "treeq-calibration"
VERSION = 2
METRICS = ("sampler", "eps")


@dataclasses.dataclass(frozen=True)
class CalibrationConfig:
    trajectories: int = 32
    steps: int = 50
    timesteps: int = 8
    cfg_scale: float = 1.0
    sampler: str = "ddpm"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.trajectories <= 0 or self.steps <= 0 or not 0 < self.timesteps <= self.steps:
            raise ValueError(f"calibration needs trajectories > 0 and 0 < timesteps <= steps, got {self}")


@dataclasses.dataclass(frozen=True)
class CalibrationSet:
    """``x (N, C, H, W)`` float32, ``t (N,)`` model timesteps and ``y (N,)`` labels, int64; ``w (N,)`` the
    sampler weights (float64)."""

    x: torch.Tensor
    t: torch.Tensor
    y: torch.Tensor
    w: torch.Tensor
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        n = self.x.shape[0]
        if self.t.shape != (n,) or self.y.shape != (n,) or self.w.shape != (n,):
            raise ValueError(f"calibration x {tuple(self.x.shape)}, t {tuple(self.t.shape)}, y "
                             f"{tuple(self.y.shape)} and w {tuple(self.w.shape)} must share the sample dimension")

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.x, self.t, self.y

    def weights(self, metric: str) -> torch.Tensor | None:
        """The per-sample MSE weights of a metric: ``"sampler"`` (``w``) or ``"eps"`` (none: plain ε-MSE)."""
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        return self.w if metric == "sampler" else None

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        save_file({"x": self.x.contiguous().float(), "t": self.t.long(), "y": self.y.long(), "w": self.w.double()},
                  str(path),
                  metadata={"schema": SCHEMA, "version": str(VERSION), "meta": json.dumps(self.meta)})

    @classmethod
    def load(cls, path: str | Path, num_classes: int | None = None) -> "CalibrationSet":
        """The set saved at ``path``, checked (``_check_tensors``). ``num_classes``: the model's classes, when
        known; the labels must then lie in ``[0, num_classes]`` (``num_classes`` is guidance's null class)."""
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                md = f.metadata() or {}
                if md.get("schema") != SCHEMA or md.get("version") != str(VERSION):
                    raise ValueError(f"{path} is not a calibration set of version {VERSION} (metadata {md})")
                missing = {"x", "t", "y", "w"} - set(f.keys())
                if missing:
                    raise ValueError(f"calibration file {path} lacks tensor(s) {sorted(missing)}")
                tensors = {k: f.get_tensor(k) for k in ("x", "t", "y", "w")}
        except (OSError, RuntimeError, SafetensorError) as e:   # missing, truncated or not safetensors
            raise ValueError(f"cannot read calibration set {path}: {e}") from None
        try:
            meta = json.loads(md.get("meta", "{}"))
        except json.JSONDecodeError as e:
            raise ValueError(f"calibration file {path}: metadata 'meta' is not valid JSON ({e})") from None
        if not isinstance(meta, dict):   # its "model" and "config" are looked up to match the cache
            raise ValueError(f"calibration file {path}: metadata 'meta' must be a JSON object, got "
                             f"{type(meta).__name__} {md['meta']!r:.80}")
        _check_tensors(path, tensors, num_classes)
        return cls(**tensors, meta=meta)


_DTYPES = {"x": torch.float32, "t": torch.int64, "y": torch.int64, "w": torch.float64}   # as ``save`` writes them


def _check_tensors(path: str | Path, tensors: dict[str, torch.Tensor], num_classes: int | None) -> None:
    """Dtypes, shapes and values of a loaded set: a hand-made or damaged file would otherwise index the label
    table out of range, or weigh the search's MSE by NaN or negative weights, far from the file."""
    where = f"calibration file {path}"
    for name, dtype in _DTYPES.items():
        if tensors[name].dtype != dtype:
            raise ValueError(f"{where}: tensor '{name}' must be {dtype}, got {tensors[name].dtype}")
    x, t, y, w = (tensors[k] for k in ("x", "t", "y", "w"))
    if x.ndim < 2 or x.shape[0] == 0:
        raise ValueError(f"{where}: tensor 'x' must hold the samples' inputs (N, C, H, W) with N > 0, got shape "
                         f"{tuple(x.shape)}")
    n = x.shape[0]
    for name in ("t", "y", "w"):
        if tensors[name].shape != (n,):
            raise ValueError(f"{where}: tensor '{name}' must have shape ({n},) (one per sample of x), got "
                             f"{tuple(tensors[name].shape)}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{where}: tensor 'x' holds NaN or infinite values")
    if t.min() < 0:
        raise ValueError(f"{where}: tensor 't' holds negative timesteps (min {int(t.min())})")
    if y.min() < 0 or num_classes is not None and y.max() > num_classes:
        top = "" if num_classes is None else f" or above {num_classes} (the model's classes and the null class)"
        raise ValueError(f"{where}: tensor 'y' holds labels below 0{top}: range [{int(y.min())}, {int(y.max())}]")
    if not torch.isfinite(w).all() or (w < 0).any() or not (w > 0).any():
        raise ValueError(f"{where}: tensor 'w' (sampler weights) must be finite, non-negative and not all zero, "
                         f"got range [{float(w.min())}, {float(w.max())}]")


_PERIOD = 32749          # prime; |int16| · period < 2^31, so each weighted word fits int32
_CHUNK = 1 << 24         # words per pass: bounds the temporary memory to ~128 MB whatever the tensor


@torch.no_grad()
def tensor_summary(t: torch.Tensor) -> str:
    """A content summary of ``t`` that is exact and the same on any device and thread count: its bytes read as
    int16 words, their sum and a position-weighted sum (weights 1..32749, repeating), in int64 (integer sums do
    not depend on the order a parallel reduction takes, as float sums do). Any change of one element changes it;
    reading every byte into a cryptographic hash would cost more than it protects against."""
    flat = t.detach().contiguous().reshape(-1)
    if flat.numel() * flat.element_size() % 2:
        flat = torch.cat([flat.view(torch.uint8), flat.new_zeros(1, dtype=torch.uint8)])
    words = flat.view(torch.int16)
    n = words.numel()
    weights = torch.arange(1, _PERIOD + 1, dtype=torch.int32, device=words.device)
    total = int(words.sum(dtype=torch.int64))
    weighted = 0
    step = _CHUNK - _CHUNK % _PERIOD
    for start in range(0, n, step):   # chunks start at multiples of the period: weights restart with them
        part = words[start:start + step].to(torch.int32)
        whole = part.numel() - part.numel() % _PERIOD
        weighted += int((part[:whole].view(-1, _PERIOD) * weights).sum(dtype=torch.int64))
        weighted += int((part[whole:] * weights[:part.numel() - whole]).sum(dtype=torch.int64))
    return f"{tuple(t.shape)}:{t.dtype}:{total}:{weighted}"


def model_fingerprint(model: nn.Module) -> str:
    """Parameter names and an exact content summary per floating-point tensor (:func:`tensor_summary`)."""
    h = hashlib.sha256()
    for name, p in model.state_dict().items():
        if torch.is_floating_point(p):
            h.update(f"{name}:{tensor_summary(p)}".encode())
    return h.hexdigest()


@torch.no_grad()
def collect(model: nn.Module, config: CalibrationConfig, *, progress: bool = False) -> CalibrationSet:
    """Run the FP sampler once and keep the model inputs at the chosen steps (see the module docstring)."""
    from ..models.diffusion import create_diffusion, sampler_weights
    from ..models.sample import sample

    n_classes = model.config.num_classes
    labels = torch.arange(config.trajectories) % n_classes
    keep = set(torch.linspace(0, config.steps - 1, config.timesteps).round().long().tolist())
    diffusion = create_diffusion(str(config.steps))
    xs, ts, ys, ws = [], [], [], []

    def grab(step: Any) -> None:
        if step.index in keep:
            xs.append(step.x.detach().float().cpu())
            ts.append(step.t_model.detach().long().cpu())
            ys.append(step.model_kwargs["y"].detach().long().cpu())
            ws.append(sampler_weights(diffusion, step.t.detach().long().cpu()))

    sample(model, labels, steps=config.steps, sampler=config.sampler, cfg_scale=config.cfg_scale, seed=config.seed,
           diffusion=diffusion, progress=progress, callback=grab)
    if len(xs) != len(keep):
        raise RuntimeError(f"the sampler reported {len(xs)} of the {len(keep)} requested steps")
    return CalibrationSet(torch.cat(xs), torch.cat(ts), torch.cat(ys), torch.cat(ws),
                          {"config": dataclasses.asdict(config)})


def load_or_collect(model: nn.Module, config: CalibrationConfig, cache_dir: str | Path | None, *,
                    progress: bool = False) -> CalibrationSet:
    """The cached set for this model and config, collecting (and caching) it if absent."""
    if cache_dir is None:
        return collect(model, config, progress=progress)
    fp = model_fingerprint(model)
    from ..calib.store import digest

    key = digest({"model": fp, "config": dataclasses.asdict(config)})
    path = Path(cache_dir).expanduser() / f"calib-{key}.safetensors"
    if path.exists():
        try:
            calib = CalibrationSet.load(path, getattr(getattr(model, "config", None), "num_classes", None))
        except ValueError as e:   # another version or a damaged file: collect again, saying why
            warnings.warn(f"{e}; collecting the calibration set again", stacklevel=2)
            calib = None
        if calib is not None and calib.meta.get("model") == fp and calib.meta.get("config") == dataclasses.asdict(config):
            return calib
    calib = collect(model, config, progress=progress)
    calib = dataclasses.replace(calib, meta={**calib.meta, "model": fp})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    calib.save(tmp)
    tmp.replace(path)
    return calib
