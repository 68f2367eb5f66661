"""Post-training calibration: per-channel weight clipping, per-layer activation clipping, branch initialisation.

Layer by layer in forward order (sequential: each layer sees the inputs produced by the already calibrated
layers before it; :class:`~.capture.StageRunner` walks a DiT block by block so this costs one pass, not one per
layer), on inputs ``X (M, K)`` captured from the calibration set, with the FP target ``Y = X·Wᵀ`` (bias cancels):

    out(a, s, zp) = Q_a(X; a)·Q_w(base; s, zp)ᵀ + X·Bᵀ                 err = ‖out − Y‖²

1. Branch (if the plan gives the layer one), closed form (:func:`~treeq_engine.branches.init_branch`):
   "weight" B = Π(W), base = W − B before the search; "residual" base = W, B = Π(W − Q(W)) after the first
   weight search (it fits the calibrated quantizer's error).
2. Weight clip per output channel: for each ratio c of ``w_clip_grid``, the format's parameters of ``base``
   shrunk by c; channel n keeps the c with the least ``Σ_m err[m, n]``. With a fixed activation quantizer the
   error of output channel n depends only on weight row n, so this per-channel choice is exact, not greedy.
3. Activation clip per layer: the ratio of ``a_clip_grid`` with the least total error for the chosen weights
   (the dynamic per-token quantizer's range is ``a·[min, max]`` of each token).
4. Steps 2–3 alternate ``rounds`` times. The layer is then frozen (codes, scales, zero points) and its plan
   entry gets the chosen ``a_clip``.

Optionally (``smooth_alphas``) SmoothQuant balancing is folded into the model first (:mod:`.smooth`: our DiT's
blocks, diffusers DiT, PixArt, SD3 and Flux blocks).

Resumable: each finished layer is written to ``out_dir/layers/<name>.safetensors`` and recorded in
``out_dir/ptq.json`` before the next one starts; a rerun with the same plan and config loads the finished
layers and continues. ``load_calibration`` rebuilds a calibrated model from the directory.
"""
from __future__ import annotations

import dataclasses
import json
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..branches import INIT_MODES, MonarchBranch, init_branch
from ..branches.monarch import check_fits
from ..format import QuantSpec, dequantize, fake_quantize, quantize_with_qparams, row_qparams
from ..nn import QuantLinear, convert
from ..nn.pointwise import layer_dims
from ..nn.quant_linear import check_frozen
from ..plan import LayerConfig, PlanError, QuantPlan, check_runnable
from . import smooth
from .capture import CalibBatch, StageRunner
from .store import CheckpointError, changed, digest, read_json, read_metadata, read_tensors, write_json, write_tensors

SCHEMA = "treeq-ptq"
VERSION = 2  # 2: Monarch factors in branches/monarch.py's current arrangement (input blocks strided)
SMOOTH_FILE = "smooth.safetensors"
DEFAULT_W_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5)
DEFAULT_A_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5)


@dataclasses.dataclass(frozen=True)
class PTQConfig:
    """``w_clip_grid``/``a_clip_grid``: candidate clip ratios (``(1.0,)`` turns a search off: round-to-nearest on
    the full range). ``rounds``: weight/activation alternations. ``branch_init``: "weight" or "residual".
    ``max_tokens``: input rows per layer used by the search. ``smooth_alphas``: fold SmoothQuant balancing into the
    model first, per site the α of this grid (or none) with the least calibrated error (:mod:`.smooth`)."""

    w_clip_grid: tuple[float, ...] = DEFAULT_W_GRID
    a_clip_grid: tuple[float, ...] = DEFAULT_A_GRID
    rounds: int = 2
    branch_init: str = "weight"
    max_tokens: int = 4096
    smooth_alphas: tuple[float, ...] = ()  # SmoothQuant α candidates (empty: off), see smooth.py
    seed: int = 0

    def __post_init__(self) -> None:
        alphas = tuple(float(a) for a in self.smooth_alphas)
        if any(not 0.0 <= a <= 1.0 for a in alphas):
            raise ValueError(f"PTQConfig.smooth_alphas must lie in [0, 1], got {alphas}")
        object.__setattr__(self, "smooth_alphas", alphas)
        for name in ("w_clip_grid", "a_clip_grid"):
            grid = tuple(float(c) for c in getattr(self, name))
            if not grid or any(not 0.0 < c <= 1.0 for c in grid):
                raise ValueError(f"PTQConfig.{name} must be a non-empty list of ratios in (0, 1], got {grid}")
            object.__setattr__(self, name, grid)
        if self.branch_init not in INIT_MODES:
            raise ValueError(f"PTQConfig.branch_init must be one of {INIT_MODES}, got {self.branch_init!r}")
        if not isinstance(self.rounds, int) or self.rounds < 1:
            raise ValueError(f"PTQConfig.rounds must be a positive int, got {self.rounds!r}")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"PTQConfig.max_tokens must be a positive int, got {self.max_tokens!r}")

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


@dataclasses.dataclass
class LayerCalibration:
    """One layer's result. ``scale``/``zero_point`` (N,) quantize ``base (N, K)``; ``branch`` may be None;
    errors are relative: ‖out − Y‖² / ‖Y‖² on the captured inputs."""

    scale: torch.Tensor | None
    zero_point: torch.Tensor | None
    base: torch.Tensor
    branch: MonarchBranch | None
    a_clip: float
    w_clip: torch.Tensor | None
    err_rtn: float  # round-to-nearest, full range, no branch: the starting point
    err: float  # after calibration


def _act_spec(cfg: LayerConfig, clip: float) -> QuantSpec:
    return QuantSpec.activation(cfg.a_bits, cfg.a_symmetric, clip)


def _quant_x(x: torch.Tensor, cfg: LayerConfig, clip: float) -> torch.Tensor:
    spec = _act_spec(cfg, clip)
    return fake_quantize(x, spec) if spec.is_quantized else x


def search_weight_clip(base: torch.Tensor, xq: torch.Tensor, target: torch.Tensor, spec: QuantSpec,
                       grid: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per output channel, the clip ratio of ``grid`` minimising ``Σ_m (xq·Q_c(base)ᵀ − target)²[m, n]``.
    ``base (N, K)``, ``xq (M, K)``, ``target (M, N)``; returns ``(scale (N,), zero_point (N,), clip (N,))``."""
    n, dev = base.shape[0], base.device
    best = torch.full((n,), float("inf"), device=dev)
    scale = torch.empty(n, device=dev)
    zp = torch.empty(n, dtype=torch.int32, device=dev)
    clip = torch.empty(n, device=dev)
    for c in grid:
        s, z = row_qparams(base, spec, clip=torch.full((n,), c, device=dev))
        wq = dequantize(quantize_with_qparams(base, spec, s, z))
        err = (xq @ wq.T - target).square().sum(0)
        better = err < best  # ties keep the earlier (larger, less clipped) ratio
        best = torch.where(better, err, best)
        scale = torch.where(better, s, scale)
        zp = torch.where(better, z, zp)
        clip = torch.where(better, torch.full_like(clip, c), clip)
    return scale, zp, clip


def search_act_clip(x: torch.Tensor, wq: torch.Tensor, target: torch.Tensor, cfg: LayerConfig,
                    grid: Sequence[float]) -> float:
    """The per-layer activation clip ratio of ``grid`` minimising ``‖Q_a(x)·wqᵀ − target‖²``."""
    errs = [float((_quant_x(x, cfg, c) @ wq.T - target).square().sum()) for c in grid]
    return grid[min(range(len(grid)), key=errs.__getitem__)]


def calibrate_layer(weight: torch.Tensor, x: torch.Tensor, cfg: LayerConfig, config: PTQConfig) -> LayerCalibration:
    """Calibrate one linear ``weight (N, K)`` on its inputs ``x (M, K)`` (see the module docstring)."""
    w = weight.detach().to(torch.float32)
    x = x.to(torch.float32)
    wspec = cfg.weight_spec()
    y = x @ w.T
    norm = float(y.square().sum()) or 1.0

    def rel(out: torch.Tensor) -> float:
        return float((out - y).square().sum()) / norm

    wq_rtn = fake_quantize(w, QuantSpec.weight(cfg.w_bits, cfg.w_symmetric)) if wspec.is_quantized else w
    err_rtn = rel(_quant_x(x, cfg, 1.0) @ wq_rtn.T)
    if cfg.branch is not None and not wspec.is_quantized:
        raise ValueError(f"a branch beside an unquantized weight ({cfg.label}) serves no purpose")

    branch, base = None, w
    if cfg.branch is not None and config.branch_init == "weight":
        branch, base = init_branch(w, cfg.branch, "weight")
    xb = torch.zeros_like(y) if branch is None else branch(x).detach()
    a_clip = 1.0
    scale = zp = w_clip = None
    wq = base
    for r in range(config.rounds):
        xq = _quant_x(x, cfg, a_clip)
        if wspec.is_quantized:
            scale, zp, w_clip = search_weight_clip(base, xq, y - xb, wspec, config.w_clip_grid)
            wq = dequantize(quantize_with_qparams(base, wspec, scale, zp))
        if r == 0 and cfg.branch is not None and config.branch_init == "residual":
            # (ignore: mypy cannot type a lambda with a default-bound argument against the quantizer's Callable)
            branch, _ = init_branch(w, cfg.branch, "residual", quantizer=lambda m, wq=wq: wq)  # type: ignore[misc]
            xb = branch(x).detach()
            scale, zp, w_clip = search_weight_clip(base, xq, y - xb, wspec, config.w_clip_grid)
            wq = dequantize(quantize_with_qparams(base, wspec, scale, zp))
        if _act_spec(cfg, 1.0).is_quantized:
            a_clip = search_act_clip(x, wq, y - xb, cfg, config.a_clip_grid)
    err = rel(_quant_x(x, cfg, a_clip) @ wq.T + xb)
    return LayerCalibration(scale, zp, base, branch, a_clip, w_clip, err_rtn, err)


def _apply(layer: QuantLinear, cfg: LayerConfig, res: LayerCalibration) -> LayerConfig:
    """Install a calibration result in a converted layer; returns the calibrated config."""
    new_cfg = cfg.replace(a_clip=res.a_clip)
    if layer.is_frozen:
        layer.unfreeze_weight()
    layer.set_config(new_cfg)
    layer.branch = None if res.branch is None else res.branch.to(layer.weight.device)
    if res.scale is not None:
        layer.freeze_weight(res.base.to(layer.weight.device), res.scale, res.zero_point)
    return new_cfg


def _layer_tensors(layer: QuantLinear) -> dict[str, torch.Tensor]:
    t: dict[str, torch.Tensor] = {}
    if layer.is_frozen:
        qt = layer.weight_qtensor()
        t.update(codes=qt.codes, scale=qt.scale, zero_point=qt.zero_point)
    if layer.branch is not None:
        t.update(w1=layer.branch.w1, w2=layer.branch.w2)
    return t


def check_layer(cfg: LayerConfig, tensors: Mapping[str, torch.Tensor], out_features: int, in_features: int,
                where: str) -> None:
    """A CheckpointError naming the tensor unless ``tensors`` (a layer file) restore an ``(out_features,
    in_features)`` linear at ``cfg``: frozen codes, scales and zero points valid for its weight format, branch
    factors of the plan's shapes, floating point and finite. Changes nothing, so a caller can check every layer
    before it touches the model."""
    if cfg.weight_spec().is_quantized:
        missing = [k for k in ("codes", "scale", "zero_point") if k not in tensors]
        if missing:
            raise CheckpointError(f"{where}: no frozen {'/'.join(missing)} for a quantized weight")
        codes = tensors["codes"]
        if codes.dim() != 2 or tuple(codes.shape) != (out_features, in_features):
            raise CheckpointError(f"{where}: codes are {tuple(codes.shape)}, but this model's layer is "
                                  f"({out_features}, {in_features}); was the directory calibrated for another "
                                  "model?")
        try:
            check_frozen(codes, tensors["scale"], tensors["zero_point"], cfg.weight_spec(),
                         (out_features, in_features))
        except ValueError as e:
            raise CheckpointError(f"{where}: {e}") from None
    if cfg.branch is not None:
        if "w1" not in tensors or "w2" not in tensors:
            raise CheckpointError(f"{where}: the plan gives this layer a branch but w1/w2 are missing")
        br = MonarchBranch.from_config(cfg.branch, out_features, in_features)
        for k in ("w1", "w2"):
            t = tensors[k]
            if tuple(t.shape) != tuple(getattr(br, k).shape):
                raise CheckpointError(f"{where}: {k} is {tuple(t.shape)}, the plan's branch needs "
                                      f"{tuple(getattr(br, k).shape)}")
            if not t.is_floating_point():   # copy_ would cast integers silently
                raise CheckpointError(f"{where}: branch factor {k} must be floating point, got {t.dtype}")
            if not bool(torch.isfinite(t).all()):
                raise CheckpointError(f"{where}: branch factor {k} holds {int((~torch.isfinite(t)).sum())} NaN/inf "
                                      "value(s)")


def install_layer(layer: QuantLinear, cfg: LayerConfig, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Restore a calibrated layer from its saved tensors (frozen codes and branch factors); checked first, so a
    bad file leaves the layer as it was."""
    check_layer(cfg, tensors, layer.out_features, layer.in_features, where)
    layer.unfreeze_weight()
    layer.set_config(cfg)
    layer.branch = None
    if cfg.branch is not None:
        br = MonarchBranch.from_config(cfg.branch, layer.out_features, layer.in_features)
        with torch.no_grad():
            br.w1.copy_(tensors["w1"])
            br.w2.copy_(tensors["w2"])
        layer.branch = br.to(layer.weight.device)
    if cfg.weight_spec().is_quantized:
        try:
            layer.load_frozen(tensors["codes"], tensors["scale"], tensors["zero_point"])
        except ValueError as e:
            raise CheckpointError(f"{where}: {e}") from None


def _layer_file(out_dir: Path, name: str) -> Path:
    return out_dir / "layers" / f"{name}.safetensors"


def _run_digest(state: Mapping[str, Any]) -> str:
    return digest({k: state.get(k) for k in ("plan", "config", "data")})


def ptq_digest(state: Mapping[str, Any]) -> str:
    """What a PEFT run records of the calibration (a ``ptq.json`` state) it was fine-tuned from."""
    return digest({k: state.get(k) for k in ("plan", "config", "data", "layers")})


def _calibrated(plan: Any) -> Any:
    """Of a plan's JSON, what a calibration depends on: its layers and format, not the model's name or the search's
    record (``meta``)."""
    return {k: v for k, v in plan.items() if k not in ("model", "meta")} if isinstance(plan, dict) else plan


def diffusers_source(out_dir: str | Path) -> str | None:
    """The ``--diffusers`` path a ``treeq ptq`` output directory was calibrated from (its recorded data names
    the captured inputs only for a diffusers model), or None (our DiT, or unreadable: the load says why)."""
    try:
        data = json.loads((Path(out_dir) / "ptq.json").read_text()).get("data") or {}
    except (OSError, ValueError, AttributeError):
        return None
    model = data.get("model") if isinstance(data, dict) and "calib_inputs" in data else None
    return model if isinstance(model, str) else None


def diffusers_dtype(out_dir: str | Path) -> torch.dtype:
    """The dtype a ``treeq ptq --diffusers`` directory's model was loaded in (``--dtype``; float32 when it records
    none): fine-tuning and packing load the model in it, as the fingerprint it records was taken in it."""
    try:
        data = json.loads((Path(out_dir) / "ptq.json").read_text()).get("data") or {}
    except (OSError, ValueError, AttributeError):
        return torch.float32
    name = data.get("dtype", "float32") if isinstance(data, dict) else "float32"
    if name not in ("float32", "bfloat16", "float16"):
        raise CheckpointError(f"{out_dir}/ptq.json: data.dtype must be float32, bfloat16 or float16, got {name!r}")
    return getattr(torch, name)


ROWS_KEY = "rows"   # in ptq.json: "real" when the statistics left the padding out (every state made since)


def _has_padding(model: nn.Module) -> bool:
    """Whether ``model``'s runner leaves padded rows out of the statistics (``pads_rows``: PixArt's and Sana's
    captions, Qwen-Image's prompts, Z-Image's batch padding)."""
    from ..search.diffusers_runner import diffusers_arch, make_runner

    return diffusers_arch(model) is not None and bool(make_runner(model).pads_rows)


def _rows_tag(model: nn.Module) -> str:
    """What the statistics leave out, recorded in ptq.json: ``"real"`` (each runner's own ``real_rows``), with a
    digest of the padding rules the generic cut traced (``padding_digest``) where it has any."""
    from ..search.diffusers_runner import diffusers_arch, make_runner

    digest = getattr(make_runner(model), "padding_digest", None) if diffusers_arch(model) is not None else None
    d = digest() if digest is not None else None
    return "real" if d is None else f"real:{d}"


def _made_from(state: Mapping[str, Any]) -> str | None:
    """The command line's recorded fingerprint (in ``data``) of the FP model a state was calibrated from, or None."""
    return (state.get("data") or {}).get("model_fingerprint")


PROBE_KEY = "model_probe"   # in ptq.json, when calibrate() was given no data: a dtype-tolerant model signature


def _probe(model: nn.Module) -> dict[str, Any]:
    """Names and shapes of every parameter (hashed), and two values of each (the first and the middle one). Another
    model of the same shapes differs in those values; the same model in another dtype agrees within its rounding
    (a byte fingerprint would call a bf16 copy another model)."""
    import hashlib

    params = sorted(model.named_parameters())
    h = hashlib.sha256(";".join(f"{n}:{tuple(t.shape)}" for n, t in params).encode())
    values = [float(t.detach().flatten()[i]) for _, t in params for i in {0, t.numel() // 2} if t.numel()]
    return {"structure": h.hexdigest()[:16], "values": values}


def _probe_mismatch(stored: Any, model: nn.Module) -> str | None:
    """Why ``model`` is not the one ``stored`` was taken from (None when it is, up to dtype rounding)."""
    now = _probe(model)
    if not isinstance(stored, dict) or stored.get("structure") != now["structure"]:
        return "its parameters have other names or shapes"
    a, b = torch.tensor(stored.get("values") or [], dtype=torch.float64), torch.tensor(now["values"],
                                                                                      dtype=torch.float64)
    if a.shape != b.shape or not torch.allclose(a, b, rtol=1e-2, atol=1e-6):   # (bf16 rounds by 2⁻⁹ relative)
        return "its weights differ"
    return None


def _kind(v: Any) -> str:
    return "nothing (the field is missing)" if v is None else f"{type(v).__name__} {v!r}"[:80]


def _read_state(out: Path) -> dict[str, Any]:
    """``out/ptq.json``, with the fields this module reads checked (a CheckpointError naming the file and the
    field, not a KeyError or TypeError from deep inside a load)."""
    path = out / "ptq.json"
    state = read_json(path, SCHEMA, VERSION)
    for key in ("plan", "config", "layers"):
        if not isinstance(state.get(key), dict):
            raise CheckpointError(f"{path}: field {key!r} must be an object, got {_kind(state.get(key))}")
    try:
        QuantPlan.from_dict(state["plan"])
    except PlanError as e:
        raise CheckpointError(f"{path}: field 'plan': {e}") from None
    for name, entry in state["layers"].items():
        if not isinstance(entry, dict) or not isinstance(entry.get("config"), dict):
            got = _kind(entry.get("config")) if isinstance(entry, dict) else _kind(entry)
            raise CheckpointError(f"{path}: layers[{name!r}] must be an object with a 'config' object, got {got}")
    alphas = state["config"].get("smooth_alphas", [])
    if not isinstance(alphas, list):
        raise CheckpointError(f"{path}: config.smooth_alphas must be a list, got {_kind(alphas)}")
    data = state.get("data")
    if data is not None and not isinstance(data, dict):
        raise CheckpointError(f"{path}: field 'data' must be an object or null, got {_kind(data)}")
    fp = (data or {}).get("model_fingerprint")
    if fp is not None and (not isinstance(fp, str) or not fp):
        raise CheckpointError(f"{path}: data.model_fingerprint must be a non-empty string (a model fingerprint), "
                              f"got {_kind(fp)}")
    probe = state.get(PROBE_KEY)
    if probe is not None and not (isinstance(probe, dict) and isinstance(probe.get("structure"), str)
                                  and isinstance(probe.get("values"), list)
                                  and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                          for v in probe["values"])):
        raise CheckpointError(f"{path}: {PROBE_KEY} must be an object with a 'structure' string and a list of "
                              f"'values', got {_kind(probe)}")
    return state


def _smooth_factors(out: Path, run: str, rows: str, legacy: bool = False) -> dict[str, torch.Tensor] | None:
    """The run's saved smoothing factors, or None when there are none or they belong to another run (a job
    killed between writing them and its first state) or to statistics that left out other padding rows (``rows``,
    the state's ``ROWS_KEY``; a file without one is from before the generic cut's rules: ``"real"``). ``legacy``:
    the state predates run digests, so a file without one is taken as its own."""
    if not (out / SMOOTH_FILE).exists():
        return None
    meta = read_metadata(out / SMOOTH_FILE)
    tag = meta.get("run")
    if tag != run and not (legacy and tag is None) or meta.get(ROWS_KEY, "real") != rows:
        return None
    return read_tensors(out / SMOOTH_FILE)


def calibrate(model: nn.Module, plan: QuantPlan, batches: Sequence[CalibBatch], config: PTQConfig = PTQConfig(),
              *, out_dir: str | Path | None = None, progress: bool = True,
              data: Mapping[str, Any] | None = None, tie: Callable[[str], str | None] | None = None) -> QuantPlan:
    """Calibrate every layer of ``plan`` on ``batches`` (each a tuple of positional model inputs) in place:
    ``model`` is converted, its layers frozen with their calibrated weights and branches. Returns the
    calibrated plan (``a_clip`` filled in). With ``out_dir`` the work is saved per layer and resumed; ``data``
    (JSON-able: what the batches were made from, e.g. the model's fingerprint and the sampler's arguments) is
    recorded, and a resume with other data is refused like one with another plan or config. ``tie`` (as the
    search's, e.g. ``DiffusersRunner.tie``): linears of one key that read one input and share a branch-less
    config are calibrated as one (their weights stacked: one activation clip, per-channel weight clips), as our
    DiT's single qkv linear is, so their activation specs stay equal and the runtime quantizes their input once."""
    if not isinstance(plan, QuantPlan):
        raise TypeError(f"plan must be a QuantPlan, got {type(plan).__name__}")
    modules = dict(model.named_modules())
    for name, cfg in plan.layers.items():   # what quantize would refuse, and every branch fits its layer, first
        check_runnable(cfg, name)
        if cfg.branch is not None and name in modules:
            k, n = layer_dims(modules[name])
            try:
                check_fits(n, k, cfg.branch.blocks, cfg.branch.rank)
            except ValueError as e:
                raise ValueError(f"{name} (N={n}, K={k}): its {cfg.branch.kind} branch does not fit: {e}") from None
    state: dict[str, Any] = {"schema": SCHEMA, "version": VERSION, "plan": plan.to_dict(),
                             "config": config.to_dict(), "layers": {},
                             "data": None if data is None else json.loads(json.dumps(dict(data)))}
    state[ROWS_KEY] = _rows_tag(model)   # (outside the run digest: states from before it resume as they were)
    joint = _joint_groups(plan, tie)
    if joint:   # (absent otherwise, so that states from before read the same)
        state["joint"] = [list(g) for g in joint]
    out = None if out_dir is None else Path(out_dir)
    if out is not None and not _made_from(state):
        # Without the command line's fingerprint in data, load_calibration could not tell another model of the
        # same shapes. Outside data, so that the run digest (and so resuming older directories) is unchanged.
        state[PROBE_KEY] = _probe(model)
    if out is not None:
        (out / "layers").mkdir(parents=True, exist_ok=True)
        if (out / "ptq.json").exists():
            old = _read_state(out)
            if isinstance(old["plan"], dict) and _calibrated(old["plan"]) == _calibrated(state["plan"]):
                # the same layers under another model name (before ptq named diffusers models by class), or with
                # another search record (a resumed search rewrites its timings): the directory's run goes on
                state["plan"] = old["plan"]
            if old["plan"] != state["plan"]:
                was, now = _calibrated(old["plan"]), _calibrated(state["plan"])
                what = changed(was["layers"], now["layers"], 2) if was["layers"] != now["layers"] else changed(was, now)
                raise CheckpointError(f"{out}: holds a calibration of a different plan ({len(was['layers'])} layers, "
                                      f"now {len(now['layers'])}: {what}); use a new directory (or delete this one) "
                                      "to start over")
            if old["config"] != state["config"]:
                raise CheckpointError(f"{out}: holds a calibration with another config ("
                                      f"{changed(old['config'], state['config'])}); use a new directory (or delete "
                                      "this one) to start over")
            if old.get("joint") != state.get("joint"):
                raise CheckpointError(f"{out}: holds a calibration with other tied layers ({len(old.get('joint') or [])}"
                                      f" groups, now {len(state.get('joint') or [])}); use a new directory, or the "
                                      "same ties (tie= / --untie) as that run")
            if "data" in old and old["data"] != state["data"]:   # (states before data tags carry none)
                raise CheckpointError(f"{out}: holds a calibration on other data ({changed(old.get('data'), state['data'])}"
                                      "); use a new directory (or delete this one) to start over")
            why = _probe_mismatch(old[PROBE_KEY], model) if PROBE_KEY in old and PROBE_KEY in state else None
            if why:
                raise CheckpointError(f"{out}: holds a calibration of another model ({why}); use a new directory, "
                                      "or the model it was made from")
            if ROWS_KEY not in old and old["layers"] and _has_padding(model):
                raise CheckpointError(f"{out}: holds a calibration begun before caption/prompt padding was left out "
                                      "of the statistics (runner.real_rows); its finished layers saw the padding, "
                                      "new ones would not: use a new directory to start over")
            if ROWS_KEY in old and old[ROWS_KEY] != state[ROWS_KEY]:
                if old["layers"]:
                    raise CheckpointError(f"{out}: holds a calibration whose statistics left out other padding rows "
                                          f"({old[ROWS_KEY]!r}, now {state[ROWS_KEY]!r}: the generic cut's traced "
                                          "rules; a warning above says so where the trace failed this time); its "
                                          "finished layers would not match new ones: use a new directory")
                old[ROWS_KEY] = state[ROWS_KEY]   # (nothing calibrated yet: the new rules hold from the start)
            state = old
    run = _run_digest(state)
    if config.smooth_alphas:  # on the FP model, before conversion; chosen once, then reused on resume
        refused: dict[str, str] = {}
        if not smooth.targets(model, plan, refused):
            why = "" if not refused else f" ({len(refused)} refused, e.g. {next(iter(refused.values()))})"
            name = type(model).__name__
            raise ValueError(f"smooth_alphas: SmoothQuant folds into our DiT's block linears "
                             f"({', '.join(smooth.TARGETS)}) or the blocks of a diffusers transformer the search cuts "
                             f"(see calib/smooth.py) with quantized activations; this plan for a {name} has none{why}")
        if refused:
            warnings.warn(f"SmoothQuant: the inputs of {len(refused)} planned linear(s) cannot be smoothed in this "
                          f"model and are calibrated without, e.g. {next(iter(refused.values()))}", stacklevel=2)
        rows = state.get(ROWS_KEY, "real")
        factors = None if out is None else _smooth_factors(out, run, rows, legacy="data" not in state)
        if factors is None:
            factors, state["smooth"] = smooth.choose(model, plan, batches, config.smooth_alphas, config,
                                                      joint)
            if out is not None:
                write_tensors(out / SMOOTH_FILE, factors, {"run": run, ROWS_KEY: rows})
                write_json(out / "ptq.json", state)
        _fold_all(model, factors, out)
    # which stage runs each layer, traced before conversion: a converted layer run unfrozen would cache its
    # fake-quantized weight (a weight-sized copy per layer until it is calibrated)
    runner = StageRunner(model, batches, list(plan.layers))
    convert(model, plan)
    layers = {n: model.get_submodule(n) for n in plan.layers}
    order = list(runner.stage_of)   # first-call order
    for g in joint:   # before any work: a tied group shares one input, so one stage and one width
        if len({runner.stage_of[n] for n in g}) != 1 or len({layers[n].in_features for n in g}) != 1:
            raise ValueError(f"tied layers {list(g)} must read one input (one stage of the model, one width); "
                             f"stages {[runner.stage_of[n] for n in g]}, widths {[layers[n].in_features for n in g]}")
    calibrated = dict(plan.layers)
    for name in order:  # restore finished layers first so that later captures see them
        if name in state["layers"]:
            assert out is not None   # (layers are only ever restored from a state read from out)
            cfg = LayerConfig.from_dict(state["layers"][name]["config"], where=name)
            install_layer(layers[name], cfg, read_tensors(_layer_file(out, name)), str(_layer_file(out, name)))
            calibrated[name] = cfg
    todo = [n for n in order if n not in state["layers"]]
    bar = tqdm(total=len(todo), desc="PTQ", unit="layer", disable=not progress)
    group_of = {n: g for g in joint for n in g}
    for stage in range(runner.num_stages):
        for name in [n for n in todo if runner.stage_of[n] == stage]:
            if name in state["layers"]:   # calibrated with the first of its tied group
                continue
            t0 = time.perf_counter()
            x = runner.capture(name, config.max_tokens, seed=config.seed + order.index(name))
            cfg = plan.layers[name]
            members = [n for n in order if n in group_of[name]] if name in group_of else [name]
            weight = torch.cat([layers[n].weight.detach() for n in members]) if len(members) > 1 else \
                layers[name].weight
            res = calibrate_layer(weight, x, cfg, config)
            start = 0
            for n in members:   # each its rows of the stacked result
                rows = slice(start, start + layers[n].out_features)
                start = rows.stop
                part = res if len(members) == 1 else _rows_of(res, rows, x, cfg)
                calibrated[n] = _apply(layers[n], cfg, part)
                state["layers"][n] = {"config": calibrated[n].to_dict(), "err_rtn": part.err_rtn, "err": part.err,
                                      "a_clip": res.a_clip, "time_s": round(time.perf_counter() - t0, 4),
                                      "w_clip_mean": None if part.w_clip is None else float(part.w_clip.mean()),
                                      **({"joint": members} if len(members) > 1 else {})}
                if out is not None:
                    write_tensors(_layer_file(out, n), _layer_tensors(layers[n]))
            if out is not None:   # the group is recorded once all its layers are written
                write_json(out / "ptq.json", state)
            bar.update(len(members))
            bar.set_postfix_str(f"{name} err {res.err_rtn:.2e}->{res.err:.2e}")
        if stage + 1 < runner.num_stages and any(runner.stage_of[n] > stage for n in todo):
            runner.advance()
    bar.close()
    result = QuantPlan({n: calibrated[n] for n in plan.layers}, model=plan.model,
                       meta={**plan.meta, "ptq": config.to_dict()})
    if out is not None:
        result.save(out / "plan.json")
    return result


def _check_factors(model: nn.Module, factors: Mapping[str, torch.Tensor], out: Path | None) -> None:
    """Every saved or chosen smoothing factor foldable into ``model`` (site, shape, sign, finiteness), each keyed
    by its site's key (once per site: a second key of one site would fold it twice). Changes nothing."""
    where = SMOOTH_FILE if out is None else out / SMOOTH_FILE
    for name, factor in factors.items():
        try:
            key = smooth.site_of(model, name).key
        except ValueError as e:
            raise CheckpointError(f"{where}: holds factors for {name!r}, which this model cannot smooth ({e})") \
                from None
        if key != name:
            raise CheckpointError(f"{where}: keys {name!r}, a member of the site {key!r}; factors are keyed by "
                                  "their site's first linear")
        try:
            smooth.check_fold(model, name, factor)
        except ValueError as e:
            raise CheckpointError(f"{where}: {e}") from None   # (e names the factors' key)


def _fold_all(model: nn.Module, factors: Mapping[str, torch.Tensor], out: Path | None) -> None:
    """Fold saved or chosen smoothing factors; all are checked before the first fold, so a bad one leaves the
    caller's model unchanged."""
    _check_factors(model, factors, out)
    # In one order, by key: a linear can be both a site's consumer (its columns times s) and another's producer
    # (its rows divided by s'), and float rounding makes the two folds' order matter. The chosen factors come in
    # site order, the saved ones in the file's (sorted) order: without one order a resumed run would differ.
    for name in sorted(factors):
        smooth.fold(model, name, factors[name])


def _rows_of(res: LayerCalibration, rows: slice, x: torch.Tensor, cfg: LayerConfig) -> LayerCalibration:
    """One layer's share of a stacked (tied) calibration: its output rows, and its own relative errors."""
    part = dataclasses.replace(res, base=res.base[rows], scale=None if res.scale is None else res.scale[rows],
                               zero_point=None if res.zero_point is None else res.zero_point[rows],
                               w_clip=None if res.w_clip is None else res.w_clip[rows])
    x = x.to(torch.float32)
    w = part.base   # no branch in a tied group: base is the layer's float weight
    wspec = cfg.weight_spec()
    wq = w if part.scale is None else dequantize(quantize_with_qparams(w, wspec, part.scale, part.zero_point))
    wq_rtn = fake_quantize(w, QuantSpec.weight(cfg.w_bits, cfg.w_symmetric)) if wspec.is_quantized else w
    y = x @ w.T
    norm = float(y.square().sum()) or 1.0
    part.err_rtn = float((_quant_x(x, cfg, 1.0) @ wq_rtn.T - y).square().sum()) / norm
    part.err = float((_quant_x(x, cfg, res.a_clip) @ wq.T - y).square().sum()) / norm
    return part


def _joint_groups(plan: QuantPlan, tie: Callable[[str], str | None] | None) -> list[tuple[str, ...]]:
    """Plan layers of one ``tie`` key calibrated together: two or more, one config, no branch (a branch is fitted
    to its own layer's weight), a quantized weight or activation."""
    if tie is None:
        return []
    keyed: dict[str, list[str]] = {}
    for name in plan.layers:
        k = tie(name)
        if k is not None:
            keyed.setdefault(k, []).append(name)
    out = []
    for names in keyed.values():
        cfgs = {plan.layers[n] for n in names}
        cfg = next(iter(cfgs))
        if len(names) > 1 and len(cfgs) == 1 and cfg.branch is None and (cfg.weight_spec().is_quantized or
                                                                            cfg.act_spec().is_quantized):
            out.append(tuple(names))
    return out


def load_calibration(model: nn.Module, out_dir: str | Path) -> QuantPlan:
    """Convert ``model`` (FP) to the calibrated state saved in ``out_dir``; returns the calibrated plan. Everything
    is read and checked before the model is touched: a bad directory raises and leaves ``model`` as it was."""
    out = Path(out_dir)
    state = _read_state(out)
    plan = QuantPlan.from_dict(state["plan"])
    # Which model first: another model is named as such, not by whichever of its tensors first fails to fit.
    made_from = _made_from(state)
    if made_from is not None:   # (the command line records it in data; calibrate without data records a probe)
        from ..search.calibration import model_fingerprint

        this = model_fingerprint(model)
        if this[:len(made_from)] != made_from:
            raise CheckpointError(f"{out}: was calibrated from another model (fingerprint {made_from}, this one "
                                  f"{this[:len(made_from)]}); load it into the FP model it was made from")
    elif PROBE_KEY in state:
        why = _probe_mismatch(state[PROBE_KEY], model)
        if why:
            raise CheckpointError(f"{out}: was calibrated from another model ({why}); load it into the FP model "
                                  "it was made from")
    try:
        plan.validate(model)
    except PlanError as e:
        raise CheckpointError(f"{out}: was calibrated for another model: {e}") from None
    missing = [n for n in plan.layers if n not in state["layers"]]
    if missing:
        raise CheckpointError(f"{out}: calibration is unfinished ({len(missing)} layer(s) left, e.g. "
                              f"{missing[:3]}); rerun `treeq ptq` with this --out (or calibrate with this out_dir) "
                              "to finish it")
    try:
        layers_cfg = {n: LayerConfig.from_dict(state["layers"][n]["config"], where=f"layers[{n!r}].config")
                      for n in plan.layers}
    except PlanError as e:
        raise CheckpointError(f"{out / 'ptq.json'}: {e}") from None
    tensors = {}
    for n, cfg in layers_cfg.items():
        k, n_out = layer_dims(model.get_submodule(n))   # (the FP model's: a linear or a pointwise convolution)
        tensors[n] = read_tensors(_layer_file(out, n))
        check_layer(cfg, tensors[n], n_out, k, str(_layer_file(out, n)))
    calibrated = QuantPlan(layers_cfg, model=plan.model, meta={**plan.meta, "ptq": state["config"]})
    if state["config"].get("smooth_alphas"):
        factors = _smooth_factors(out, _run_digest(state), state.get(ROWS_KEY, "real"), legacy="data" not in state)
        if factors is None:
            raise CheckpointError(f"{out}: the calibration used SmoothQuant but {SMOOTH_FILE} is missing or from "
                                  "another run")
        _fold_all(model, factors, out)   # checks every factor before the first fold
    convert(model, calibrated)
    for n, cfg in layers_cfg.items():
        install_layer(model.get_submodule(n), cfg, tensors[n], str(_layer_file(out, n)))
    return calibrated
