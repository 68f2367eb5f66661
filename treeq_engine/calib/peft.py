"""PEFT: QLoRA-style data-free distillation of a calibrated (frozen low-bit) model toward the FP model.

EfficientDM's recipe, with the branch as the adapter: the FP model samples a trajectory, and at every visited
input ``(x_t, t, y)`` the quantized model's ε is pulled toward the FP model's::

    loss = mean (ε_q(x_t, t, y) − ε_fp(x_t, t, y))²        x_t along the FP model's sampler trajectory

``loss_weights="sampler"`` weighs each sample by the sampler's ``c(t)²`` (``models.diffusion.sampler_weights``,
normalised to mean 1 over the schedule; ``data.sampler_loss_weights`` builds it): how much an ε error moves the
next sampler state. Unweighted, the last step (t ≈ 0: x_t nearly clean, ε nearly unpredictable) has ~1000× the
loss of the others, and those spikes inflate AdamW's second moments for hundreds of steps.

Frozen: the low-bit codes (and everything else of the model). Trained: the branch factors ``w1``, ``w2`` of every
layer that has a branch; optionally a LoRA merged into the codes (``lora_rank``), and the per-channel weight
scales (``lr_w_scale``, LSQ gradient; kept above 1% of their calibrated value). One AdamW optimizer with a
parameter group per kind, a linear warm-up then cosine (or constant) learning-rate schedule, gradient-norm clipping.

Data: ``trajectory(round) -> list of model-input tuples`` gives one FP trajectory (all its steps) for a fresh
random batch; round ``r`` must be deterministic in ``r`` (seeded), so a resumed run sees the same data. Step
``s`` trains on entry ``perm_r[s mod L]`` of trajectory ``r = s // L`` (``perm_r`` a seeded shuffle).

Checkpoints (every ``checkpoint_every`` steps and at the end): ``out_dir/peft-NNNNNNN.safetensors`` (step N; the
previous one deleted) holds the trained tensors and the optimizer's moments, ``out_dir/peft.json`` the step,
config, loss history and the name of that file. Rerunning with
the same ``out_dir`` and config resumes where it stopped and gives the same result as an uninterrupted run.
"""
from __future__ import annotations

import dataclasses
import json
import math
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..nn import full_precision, quant_layers
from .capture import CalibBatch
from .lora import LoRA
from .store import CheckpointError, changed, read_json, read_tensors, write_json, write_tensors

SCHEMA = "treeq-peft"
VERSION = 2  # 2: Monarch factors in branches/monarch.py's current arrangement (input blocks strided)
SCHEDULES = ("cosine", "constant")
LOSS_WEIGHTS = ("uniform", "sampler")
SCALE_FLOOR = 0.01

EpsFn = Callable[[nn.Module, CalibBatch], torch.Tensor]
Trajectory = Callable[[int], Sequence[CalibBatch]]


def model_eps(model: nn.Module, batch: CalibBatch) -> torch.Tensor:
    """The default ε: the model's whole output."""
    return model(*batch)


@dataclasses.dataclass(frozen=True)
class PEFTConfig:
    steps: int = 200
    lr_branch: float = 1e-3
    lora_rank: int = 0  # 0: no LoRA
    lr_lora: float = 1e-3
    lr_w_scale: float = 0.0  # 0: scales stay frozen
    weight_decay: float = 0.0
    warmup: int = 0
    schedule: str = "cosine"
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    checkpoint_every: int = 50
    shuffle: bool = True
    seed: int = 0
    loss_weights: str = "uniform"  # or "sampler": per-sample c(t)² (see the module docstring)

    def __post_init__(self) -> None:
        for f in ("steps", "checkpoint_every"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"PEFTConfig.{f} must be a positive int, got {v!r}")
        for f in ("lora_rank", "warmup"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"PEFTConfig.{f} must be a non-negative int, got {v!r}")
        for f in ("lr_branch", "lr_lora", "lr_w_scale", "weight_decay", "grad_clip"):
            v = getattr(self, f)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"PEFTConfig.{f} must be a finite number >= 0, got {v!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"PEFTConfig.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.loss_weights not in LOSS_WEIGHTS:
            raise ValueError(f"PEFTConfig.loss_weights must be one of {LOSS_WEIGHTS}, got {self.loss_weights!r}")

    def lr_factor(self, step: int) -> float:
        """Multiplier of every group's base learning rate at optimizer step ``step`` (0-based)."""
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.schedule == "constant":
            return 1.0
        span = max(1, self.steps - self.warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(step - self.warmup, span) / span))


def attach_lora(model: nn.Module, rank: int, seed: int = 0) -> int:
    """Give every frozen layer a zero-initialised LoRA of ``rank`` (capped by the layer size); returns how many
    layers got one. Seeded, so a resumed run rebuilds the same starting factors before loading."""
    gen = torch.Generator().manual_seed(seed)
    count = 0
    for name, layer in quant_layers(model).items():
        if layer.is_frozen and layer.lora is None:
            r = min(rank, layer.out_features, layer.in_features)
            lora = LoRA(layer.out_features, layer.in_features, r)
            with torch.no_grad():
                bound = 1.0 / math.sqrt(layer.in_features)
                lora.a.copy_((torch.rand(lora.a.shape, generator=gen) * 2 - 1) * bound)
            layer.lora = lora.to(layer.weight.device)
            count += 1
    return count


def trainable_groups(model: nn.Module, config: PEFTConfig) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Freeze everything, then switch on the parameters PEFT trains, grouped by kind (named, in module order)."""
    model.requires_grad_(False)
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {"branch": [], "lora": [], "w_scale": []}
    for name, layer in quant_layers(model).items():
        if layer.branch is not None:
            groups["branch"] += [(f"{name}.branch.{k}", p) for k, p in layer.branch.named_parameters()]
        if layer.lora is not None and config.lora_rank > 0:
            groups["lora"] += [(f"{name}.lora.{k}", p) for k, p in layer.lora.named_parameters()]
        if layer.is_frozen and config.lr_w_scale > 0:
            groups["w_scale"].append((f"{name}.w_scale", layer.w_scale))
    for plist in groups.values():
        for _, p in plist:
            p.requires_grad_(True)
    return {k: v for k, v in groups.items() if v}


def _lr(config: PEFTConfig, kind: str) -> float:
    return {"branch": config.lr_branch, "lora": config.lr_lora, "w_scale": config.lr_w_scale}[kind]


@dataclasses.dataclass
class PEFTResult:
    step: int
    losses: list[float]
    trainable_params: int
    seconds: float


def _state_tensors(named: list[tuple[str, nn.Parameter]], opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {f"param.{n}": p.detach() for n, p in named}
    for n, p in named:
        for k, v in opt.state.get(p, {}).items():
            out[f"opt.{n}.{k}"] = torch.as_tensor(v).detach()
    return out


def _nonfinite(t: torch.Tensor) -> int:
    return int((~torch.isfinite(t)).sum())


def _check_params(named: list[tuple[str, nn.Parameter]], tensors: dict[str, torch.Tensor], where: str) -> None:
    """Every trainable has a tensor of its shape, floating point (``copy_`` would cast integers silently) and
    finite; weight scales positive (the quantizer is undefined at a scale <= 0). Changes nothing."""
    for n, p in named:
        key = f"param.{n}"
        if key not in tensors:
            raise CheckpointError(f"{where}: no tensor for trainable {n!r} (was the model built with the same "
                                  "plan, branches and LoRA rank?)")
        t = tensors[key]
        if tuple(t.shape) != tuple(p.shape):
            raise CheckpointError(f"{where}: {n} is {tuple(t.shape)}, the model has {tuple(p.shape)}")
        if not t.is_floating_point():
            raise CheckpointError(f"{where}: {key} must be floating point (as the model's {p.dtype}), got {t.dtype}")
        if _nonfinite(t):
            raise CheckpointError(f"{where}: {key} holds {_nonfinite(t)} NaN/inf value(s)")
        if n.endswith(".w_scale") and not bool((t > 0).all()):
            raise CheckpointError(f"{where}: {key} must be positive in every row, {int((t <= 0).sum())} are not")
    extra = {k[len("param."):] for k in tensors if k.startswith("param.")} - {n for n, _ in named}
    if extra:
        raise CheckpointError(f"{where}: holds trainables the model lacks, e.g. {sorted(extra)[:3]}")


def _load_params(named: list[tuple[str, nn.Parameter]], tensors: dict[str, torch.Tensor], where: str) -> None:
    _check_params(named, tensors, where)   # all of them before the first copy: a bad file changes nothing
    with torch.no_grad():
        for n, p in named:
            p.copy_(tensors[f"param.{n}"])


ADAM_STATE = ("step", "exp_avg", "exp_avg_sq")   # what AdamW keeps per parameter (no amsgrad)


def _load_optimizer(named: list[tuple[str, nn.Parameter]], opt: torch.optim.Optimizer,
                    tensors: dict[str, torch.Tensor], where: str) -> None:
    """The saved AdamW moments, checked in full before any is set: a wrong shape would fail inside the next
    ``opt.step()``, a missing one raise a KeyError there, a negative or NaN second moment turn the parameters NaN."""
    seen: set[str]
    states, seen = {}, set()
    for n, p in named:
        prefix = f"opt.{n}."
        st = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix) and "." not in k[len(prefix):]}
        seen.update(prefix + k for k in st)
        if not st:   # (a parameter AdamW never stepped has no state)
            continue
        missing = [k for k in ADAM_STATE if k not in st]
        if missing:
            raise CheckpointError(f"{where}: optimizer state of {n!r} lacks {', '.join(prefix + k for k in missing)}")
        unknown = sorted(set(st) - set(ADAM_STATE))
        if unknown:
            raise CheckpointError(f"{where}: unknown optimizer state {prefix + unknown[0]} (AdamW keeps "
                                  f"{', '.join(ADAM_STATE)})")
        for k in ("exp_avg", "exp_avg_sq"):
            t = st[k]
            if tuple(t.shape) != tuple(p.shape):
                raise CheckpointError(f"{where}: {prefix + k} is {tuple(t.shape)}, the parameter is "
                                      f"{tuple(p.shape)}")
            if not t.is_floating_point():
                raise CheckpointError(f"{where}: {prefix + k} must be floating point, got {t.dtype}")
            if _nonfinite(t):
                raise CheckpointError(f"{where}: {prefix + k} holds {_nonfinite(t)} NaN/inf value(s)")
        if bool((st["exp_avg_sq"] < 0).any()):
            raise CheckpointError(f"{where}: {prefix}exp_avg_sq must be >= 0 (a mean of squares), "
                                  f"{int((st['exp_avg_sq'] < 0).sum())} entries are negative")
        step = st["step"]
        if step.numel() != 1 or step.dtype == torch.bool or _nonfinite(step) or float(step) < 0:
            raise CheckpointError(f"{where}: {prefix}step must be one finite count >= 0, got "
                                  f"{step.dtype} {tuple(step.shape)}")
        states[p] = {k: v.to(p.device) for k, v in st.items()}
    extra = sorted(k for k in tensors if k.startswith("opt.") and k not in seen)
    if extra:
        raise CheckpointError(f"{where}: holds optimizer state for trainables the model lacks, e.g. {extra[:3]}")
    for p, st in states.items():
        opt.state[p] = st


def _read_state(path: Path) -> dict[str, Any]:
    """``peft.json`` with the fields this module reads checked: a CheckpointError naming the file and the field,
    not a KeyError or TypeError in the middle of a resume."""
    st = read_json(path, SCHEMA, VERSION)
    if not isinstance(st.get("config"), dict):
        got = "nothing (the field is missing)" if st.get("config") is None else type(st.get("config")).__name__
        raise CheckpointError(f"{path}: field 'config' must be an object (the PEFTConfig), got {got}")
    step = st.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CheckpointError(f"{path}: field 'step' must be an int >= 0 (the steps done), got "
                              f"{'nothing (the field is missing)' if step is None else repr(step)}")
    losses = st.get("losses")
    if not isinstance(losses, list) or any(not isinstance(v, (int, float)) or isinstance(v, bool) for v in losses):
        raise CheckpointError(f"{path}: field 'losses' must be a list of numbers, got "
                              f"{'nothing (the field is missing)' if losses is None else type(losses).__name__}")
    name = st.get("tensors", "peft.safetensors")
    if not isinstance(name, str) or not name or Path(name).name != name:
        raise CheckpointError(f"{path}: field 'tensors' must name a file in this directory, got {name!r}")
    return st


class _DeferredInterrupt:
    """While installed, Ctrl-C (SIGINT) only sets ``requested``: the training loop finishes its step, saves and
    stops, so the checkpoint never holds a half-applied step. A second Ctrl-C interrupts at once."""

    def __init__(self, enabled: bool) -> None:
        self.requested = False
        self._old = None
        if enabled and threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGINT) is signal.default_int_handler:   # not over a caller's own handling
            self._old = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def restore(self) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
            self._old = None


def _tensor_file(st: Mapping[str, Any]) -> str:
    return str(st.get("tensors", "peft.safetensors"))   # runs before named step files used one fixed name


def finetune(model: nn.Module, fp_model: nn.Module | None, trajectory: Trajectory, config: PEFTConfig = PEFTConfig(), *,
             eps_fn: EpsFn = model_eps, out_dir: str | Path | None = None, progress: bool = True,
             sample_weight: Callable[[CalibBatch], torch.Tensor] | None = None,
             data: Mapping[str, Any] | None = None) -> PEFTResult:
    """Distil the calibrated ``model`` (frozen layers from PTQ) toward ``fp_model`` in place (see the module
    docstring); ``fp_model=None``: toward ``model`` itself run as the float model it was (``nn.full_precision``: its
    converted layers still hold their float weights), which saves a second copy of the weights (a 12 B transformer's
    teacher is 24 GB in bf16; ``treeq peft --diffusers`` passes None). With ``out_dir`` it checkpoints and resumes:
    each checkpoint's tensors go to a file named by its step and ``peft.json``, written last, names the file (so a
    kill between the two writes leaves the previous checkpoint whole); Ctrl-C saves the last finished step.
    ``data`` (JSON-able: the starting calibration, the trajectories' arguments) is recorded, and a resume with other
    data is refused like one with another config.
    ``sample_weight(batch) -> (B,)``: the per-sample loss weights; required by (and only used with)
    ``config.loss_weights == "sampler"``."""
    if (config.loss_weights == "sampler") != (sample_weight is not None):
        raise ValueError(f"loss_weights={config.loss_weights!r} "
                         + ("needs sample_weight (e.g. calib.data.sampler_loss_weights(steps))"
                            if sample_weight is None else "takes no sample_weight"))
    if not quant_layers(model):
        raise ValueError("finetune needs a converted, calibrated model (no QuantLinear layers found)")
    if config.lora_rank > 0:
        attach_lora(model, config.lora_rank, seed=config.seed)
    groups = trainable_groups(model, config)
    if not groups:
        raise ValueError("nothing to train: no layer has a branch, and LoRA and scale training are off")
    if fp_model is not None:
        fp_model.requires_grad_(False)
    named = [np_ for kind in groups for np_ in groups[kind]]
    # A scale step may not cross zero (the quantizer would be undefined): scales stay >= 1% of where they began.
    scale_floor = [(p, p.detach().abs() * SCALE_FLOOR) for _, p in groups.get("w_scale", [])]
    # (no weight decay on quantizer scales: it would pull whole output channels toward 0)
    opt = torch.optim.AdamW([{"params": [p for _, p in groups[k]], "lr": _lr(config, k), "kind": k,
                              "base_lr": _lr(config, k),
                              "weight_decay": 0.0 if k == "w_scale" else config.weight_decay} for k in groups])
    start, losses = 0, []
    out = None if out_dir is None else Path(out_dir)
    cfg_doc = dataclasses.asdict(config)
    data_doc = None if data is None else json.loads(json.dumps(dict(data)))   # as it reads back from JSON
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        if (out / "peft.json").exists():
            st = _read_state(out / "peft.json")
            was = {**dataclasses.asdict(PEFTConfig()), **st["config"]}   # (older files lack new fields)
            if was != cfg_doc:
                raise CheckpointError(f"{out}: holds a fine-tuning run with another config ({changed(was, cfg_doc)}); "
                                      "use a new directory")
            if "data" in st and st["data"] != data_doc:   # (states before data tags carry none)
                raise CheckpointError(f"{out}: holds a fine-tuning run from other data "
                                      f"({changed(st.get('data'), data_doc)}); use a new directory")
            if st["step"] > config.steps:
                raise CheckpointError(f"{out / 'peft.json'}: step {st['step']} is past the run's {config.steps} steps")
            where = str(out / _tensor_file(st))
            tensors = read_tensors(where)
            _check_params(named, tensors, where)   # parameters and moments all checked before either is set
            _load_optimizer(named, opt, tensors, where)
            _load_params(named, tensors, where)
            start, losses = st["step"], list(st["losses"])

    def save(step: int) -> None:
        if out is None:
            return
        name = f"peft-{step:07d}.safetensors"
        write_tensors(out / name, _state_tensors(named, opt))
        write_json(out / "peft.json", {"schema": SCHEMA, "version": VERSION, "step": step, "tensors": name,
                                       "config": cfg_doc, "data": data_doc,
                                       "trainable": {k: sum(p.numel() for _, p in v) for k, v in groups.items()},
                                       "losses": losses})
        # only once the new state names the new file: every other step's file goes, the previous state's and any
        # a run killed between its tensors and its state left behind
        for old in out.glob("peft-*.safetensors"):
            if old.name != name:
                old.unlink(missing_ok=True)

    t0 = time.perf_counter()
    was_training = model.training
    model.eval()  # no dropout/label drop: the model runs as it samples
    if fp_model is not None:
        fp_model.eval()
    first = list(trajectory(0))
    length = len(first)
    if not length:
        raise ValueError("the trajectory source returned no model inputs")
    cur_round, batches, perm = -1, first, list(range(length))
    bar = tqdm(range(start, config.steps), desc="PEFT", unit="step", disable=not progress, initial=start,
               total=config.steps)
    stop = _DeferredInterrupt(out is not None)
    try:
        for step in bar:
            if step // length != cur_round:
                cur_round = step // length
                batches = first if cur_round == 0 else list(trajectory(cur_round))
                if len(batches) != length:
                    raise ValueError(f"trajectory {cur_round} has {len(batches)} inputs, trajectory 0 had {length}")
                g = torch.Generator().manual_seed(config.seed * 1_000_003 + cur_round)
                perm = torch.randperm(length, generator=g).tolist() if config.shuffle else list(range(length))
            batch = batches[perm[step % len(batches)]]
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * config.lr_factor(step)
            with torch.no_grad():
                if fp_model is None:
                    with full_precision(model):
                        target = eps_fn(model, batch)
                else:
                    target = eps_fn(fp_model, batch)
            # (in float32: a bf16 model's outputs differ from the teacher's by a few of bf16's own steps)
            err = (eps_fn(model, batch).float() - target.float()).square()
            if sample_weight is None:
                loss = err.mean()
            else:
                w = sample_weight(batch).to(err.device, err.dtype)
                loss = (err.flatten(1).mean(1) * w).mean()
            value = float(loss.detach())
            if not math.isfinite(value):   # before the step: the trained tensors and the checkpoints stay good
                raise ValueError(f"PEFT step {step + 1}: the loss is {value}; nothing of this step was applied or "
                                 "saved (the last checkpoint stays): lower the learning rates, or check the model's "
                                 "outputs on this batch")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip > 0:
                norm = torch.nn.utils.clip_grad_norm_([p for _, p in named], config.grad_clip)
                if not bool(torch.isfinite(norm)):
                    raise ValueError(f"PEFT step {step + 1}: the gradient norm is {float(norm)}; nothing of this "
                                     "step was applied or saved (the last checkpoint stays)")
            opt.step()
            with torch.no_grad():
                for p, floor in scale_floor:
                    torch.maximum(p, floor, out=p)
            losses.append(value)
            bar.set_postfix_str(f"loss {losses[-1]:.3e}")
            if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps:
                save(step + 1)
            if stop.requested:   # Ctrl-C: keep the steps finished since the last checkpoint, then stop
                if (step + 1) % config.checkpoint_every and step + 1 != config.steps:
                    save(step + 1)
                raise KeyboardInterrupt
    finally:
        stop.restore()
        model.train(was_training)
        for _, p in named:
            p.requires_grad_(False)
    return PEFTResult(config.steps, losses, sum(p.numel() for _, p in named), time.perf_counter() - t0)


def check_made_from(peft_dir: str | Path, ptq_dir: str | Path) -> None:
    """Raise a :class:`CheckpointError` unless the PEFT run in ``peft_dir`` was fine-tuned from the calibration in
    ``ptq_dir`` (as ``treeq peft`` records it: the digest of that ``ptq.json``). Runs that recorded none (the Python
    API without ``data``) are not checked."""
    import json

    from .ptq import ptq_digest

    peft_json, ptq_json = Path(peft_dir) / "peft.json", Path(ptq_dir) / "ptq.json"
    try:
        made_from = (json.loads(peft_json.read_text()).get("data") or {}).get("ptq")
        ptq_state = json.loads(ptq_json.read_text())
    except (OSError, ValueError, AttributeError) as e:
        raise CheckpointError(f"cannot tell which calibration {peft_dir} was fine-tuned from: {e}") from None
    if made_from is None or not isinstance(ptq_state, dict):
        return
    here = ptq_digest(ptq_state)
    if made_from != here:
        raise CheckpointError(f"{peft_dir} was fine-tuned from another calibration (ptq digest {made_from}, "
                              f"{ptq_dir} is {here}): give the --ptq directory it was made from")


def load_finetuned(model: nn.Module, out_dir: str | Path) -> dict[str, Any]:
    """Load the trained tensors of ``out_dir`` into a calibrated ``model`` (the state :func:`finetune` started
    from: same plan and branches; LoRA is attached here when the run used it). Returns the run's JSON state."""
    out = Path(out_dir)
    st = _read_state(out / "peft.json")
    try:
        config = PEFTConfig(**st["config"])
    except (TypeError, ValueError) as e:   # an unknown field, or a value out of range
        raise CheckpointError(f"{out / 'peft.json'}: field 'config': {e}") from None
    where = str(out / _tensor_file(st))
    tensors = read_tensors(where)
    bare = [m for m in quant_layers(model).values() if m.lora is None]
    if config.lora_rank > 0:
        attach_lora(model, config.lora_rank, seed=config.seed)
    groups = trainable_groups(model, config)
    named = [np_ for kind in groups for np_ in groups[kind]]
    try:
        _load_params(named, tensors, where)
    except CheckpointError:
        for m in bare:   # a refused file leaves the model as it was: no LoRA attached on its behalf
            m.lora = None
        raise
    finally:
        for _, p in named:
            p.requires_grad_(False)
    return st
