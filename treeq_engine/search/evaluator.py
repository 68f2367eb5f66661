"""Scoring candidates: end-to-end output MSE against the full-precision model on the calibration set.

A model is cut into *segments* at points where its whole state is a few tensors (for a DiT: the embedders,
each block, the final layer; the state between blocks is ``(h, c)``). A :class:`SegmentRunner` runs one
segment; the :class:`Evaluator`

1. runs the full-precision model once and keeps its outputs (the reference);
2. runs the model once at ENG's environment (every layer at the environment config, errors scaled by λ) and
   keeps the state entering every segment, per calibration chunk;
3. scores a node's candidates from the cached input of the segment holding the node's first layer onward:
   the node's layers at the candidates (λ = 1), every other layer at the environment. Layers before the node
   run at the environment whatever the candidate, so their output is the cached state: only the suffix runs.
4. stacks ``group`` candidates along the batch (``QuantLinear.set_group_configs``): the cached state is tiled
   G times and group g of every node layer runs at candidate g, so one forward scores G candidates.

The MSE of a candidate is ``Σ_i w_i Σ (out_i − ref_i)² / (Σ_i w_i · numel per sample)`` over the calibration
samples i, with optional per-sample weights ``w`` (default 1; see ``models.diffusion.sampler_weights``), accumulated in
float64 on the device; the only host transfer is the final ``(m,)`` vector of one ``evaluate`` call.
Evaluations are deterministic and do not depend on how calls are split across processes, as long as each
call gets the same candidates (the tree search cuts work into fixed chunks for that reason).
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Callable, Protocol, Sequence

import numpy as np
import torch
import torch.nn as nn

from ..nn import QuantLinear, convert
from ..plan import LayerConfig, PlanError, QuantPlan
from .eng import Environment
from .space import SearchSpace

State = tuple[torch.Tensor, ...]


class SegmentRunner(Protocol):
    """A model cut into ``num_segments`` pieces run in sequence. Segment 0 takes the calibration inputs
    (tensors with the sample on dim 0); the last returns the output (and, where the pipeline reads only part of it,
    the mask of what it reads: ``CutModel._read_mask``); ``output`` maps that state to the tensor the MSE is taken
    on."""

    num_segments: int

    def segment_of(self, layer_name: str) -> int: ...

    def run(self, segment: int, state: State) -> State: ...

    def output(self, state: State) -> torch.Tensor: ...


class CutModel:
    """What every runner shares: the whole model as its segments in turn, and the output the metric sees. A
    runner cut as embedders, blocks and head implements ``_embed``, ``_block`` and ``_head`` (or overrides ``run``)."""

    num_segments: int
    output_fn: Callable[[torch.Tensor], torch.Tensor] | None
    blocks_attr = "transformer_blocks"   # the model's ModuleList of blocks: segments 1..B
    head_modules: tuple[str, ...] = ("norm_out", "proj_out")   # the head's submodules: the last segment
    # the pipeline hands the transformer its scheduler's timesteps as they are (Flux and Qwen-Image pass them
    # / 1000): a capture can then pick the timesteps to keep from the scheduler before any run
    scheduler_timesteps = True
    # its inputs carry padding that ``real_rows`` leaves out of calibration statistics (captions, prompts)
    pads_rows = False
    # inputs kept in their stored dtype when the others are cast to the model's (values a half dtype would round)
    exact_inputs: tuple[str, ...] = ("timestep",)

    def segment_of(self, layer_name: str) -> int:
        """Block ``i``'s layers run in segment ``i + 1``, the head's in the last, everything else in segment 0."""
        parts = layer_name.split(".")
        if len(parts) > 1 and parts[0] == self.blocks_attr and parts[1].isdigit():
            return int(parts[1]) + 1
        if parts[0] in self.head_modules:
            return self.num_segments - 1
        return 0

    def run(self, segment: int, state: State) -> State:
        """Segment 0 the embedders, the last the head (its output, and the mask of the output the metric reads when
        ``_read_mask`` gives one), the ones between block ``segment − 1``."""
        if segment == 0:
            return self._embed(state)
        if segment == self.num_segments - 1:
            out = self._head(state)
            read = self._read_mask(state, out)
            return (out,) if read is None else (out, read)
        return self._block(segment - 1, state)

    def _read_mask(self, state: State, out: torch.Tensor) -> torch.Tensor | None:
        """Which elements of the head's output ``out`` (computed from ``state``) the pipeline reads, a boolean
        tensor broadcasting to ``out``; None when it reads them all. Default: all."""
        return None

    def _embed(self, state: State) -> State:
        raise NotImplementedError

    def _block(self, i: int, state: State) -> State:
        raise NotImplementedError

    def _head(self, state: State) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        """The whole model on one input tuple (every segment in turn): the full output, before ``output_fn``."""
        state: State = tuple(inputs)
        for s in range(self.num_segments):
            state = self.run(s, state)
        return state[0]

    def output(self, state: State) -> torch.Tensor:
        """The head's output as the metric sees it: elements the pipeline does not read (``_read_mask``) at 0 in
        both the quantized and the reference output, so that they add nothing; then ``output_fn``."""
        out = state[0]
        if len(state) > 1:
            out = torch.where(state[1], out, out.new_zeros(()))
        return out if self.output_fn is None else self.output_fn(out)

    def real_rows(self, layer_name: str, state: State) -> torch.Tensor | None:
        """Which rows of ``layer_name``'s input are real tokens when its segment runs on ``state``: a boolean
        ``(N, L)`` mask over the input's leading dims, or ``None`` when all are. Calibration statistics (PTQ's clip
        search, SmoothQuant's channel ranges) read only real rows: a caption padded to the call's longest and hidden
        by the attention mask is computed but never seen by the output. Default: every row is real."""
        return None


def arch_of_class(model: nn.Module, class_name: str, arch: str, *attrs: str) -> str | None:
    """``arch`` when ``model`` is diffusers' ``class_name`` with the submodules ``attrs`` a runner reads, else None
    (by name: nothing imports diffusers to ask)."""
    ok = type(model).__name__ == class_name and all(hasattr(model, a) for a in attrs)
    return arch if ok else None


def sample_scalars(name: str, value: Any, n: int, device: torch.device) -> torch.Tensor:
    """A call's scalar-per-sample input (a timestep, a guidance scale) as ``(n,)``: a scalar or a (1,) broadcast;
    a clear error for anything else, or for none."""
    if value is None:
        raise ValueError(f"{name} is required")
    v = torch.as_tensor(value, device=device)
    v = v[None] if v.dim() == 0 else v
    if v.dim() != 1 or v.shape[0] not in (1, n):
        raise ValueError(f"{name} must be a scalar, (1,) or ({n},), got shape {tuple(v.shape)}")
    return v.expand(n).clone()


def token_timesteps(value: Any, n: int, s: int, device: torch.device) -> torch.Tensor:
    """A call's timestep as ``(n,)`` (``sample_scalars``) or, given per token (``(1, s)`` or ``(n, s)``: Wan 2.2
    TI2V's, LTX-Video image-to-video's, with the conditioning tokens held at a lower timestep), as ``(n, s)``."""
    if isinstance(value, torch.Tensor) and value.dim() == 2 and value.shape[1] != 1:
        if value.shape[0] not in (1, n) or value.shape[1] != s:
            raise ValueError(f"per-token timesteps must be (1, {s}) or ({n}, {s}) (one per latent token), got "
                             f"{tuple(value.shape)}")
        return value.to(device).expand(n, s).clone()
    if isinstance(value, torch.Tensor) and value.dim() == 2:
        if value.shape[0] not in (1, n):
            raise ValueError(f"timestep must be a scalar, (1,), ({n},), ({n}, 1) or per token (1 or {n}, {s}), got "
                             f"shape {tuple(value.shape)}")
        value = value.flatten()   # (N, 1): one per sample, as the models flatten it
    if isinstance(value, torch.Tensor) and value.dim() > 2:
        raise ValueError(f"timestep must be a scalar, (1,), ({n},) or per token (1 or {n}, {s}), got shape "
                         f"{tuple(value.shape)}")
    return sample_scalars("timestep", value, n, device)


def sample_timesteps(t: torch.Tensor) -> torch.Tensor:
    """Each sample's timestep ``(N,)``: ``t`` itself, or of per-token timesteps ``(N, S)`` each sample's largest: the
    timestep of its noisy tokens, the one the sampler steps (its conditioning tokens sit lower, at 0)."""
    return t if t.dim() == 1 else t.amax(dim=1)


def noisy_tokens(t: torch.Tensor) -> torch.Tensor | None:
    """Of per-token timesteps ``(N, S)``, the tokens at their sample's timestep ``(N, S)`` bool: the rest are
    conditioning tokens (an image's first frame), whose prediction the pipelines drop or overwrite. None for
    per-sample timesteps. (Never read back to the host: no sync per segment, and a weightless profile's meta
    tensors pass.)"""
    if t.dim() != 2:
        return None
    return t == t.amax(dim=1, keepdim=True)


def describe_arg(v: object) -> object:
    """What an argument is, for an error message: a tensor's shape, else its type's name."""
    return tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__


def kept_rows(keep: torch.Tensor) -> torch.Tensor:
    """A ``(N, L)`` keep-mask as the real rows: a sample that keeps no token attends to all of them alike (its
    attention bias is uniform), so all its rows are real."""
    keep = keep.bool()
    return keep | ~keep.any(dim=1, keepdim=True)


class DiTRunner(CutModel):
    """DiT-shaped models: ``embed(x, t, y) -> (h, c)``, ``blocks[i](h, c) -> h``, ``final(h, c) -> out``.

    Segments: 0 = embedders, 1..B = blocks, B + 1 = final layer. ``output_fn`` picks what the metric sees, e.g.
    the ε channels of a learned-σ output (``lambda out: out[:, :in_channels]``); default: the whole output."""

    def __init__(self, model: nn.Module, *, blocks_attr: str = "blocks", final_prefix: str = "final_layer",
                 output_fn: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        for attr in ("embed", "final", blocks_attr):
            if not hasattr(model, attr):
                raise TypeError(f"DiTRunner needs model.{attr} (embed(x, t, y) -> (h, c), {blocks_attr}[i](h, c), "
                                f"final(h, c)); {type(model).__name__} has none")
        self.model = model
        self.blocks = getattr(model, blocks_attr)
        self.blocks_attr, self.final_prefix = blocks_attr, final_prefix
        self.num_segments = len(self.blocks) + 2
        self.output_fn = output_fn

    def segment_of(self, layer_name: str) -> int:
        parts = layer_name.split(".")
        if parts[0] == self.blocks_attr and len(parts) > 1 and parts[1].isdigit():
            return int(parts[1]) + 1
        if layer_name == self.final_prefix or layer_name.startswith(self.final_prefix + "."):
            return self.num_segments - 1
        return 0

    def run(self, segment: int, state: State) -> State:
        if segment == 0:
            return tuple(self.model.embed(*state))
        if segment == self.num_segments - 1:
            return (self.model.final(*state),)
        h, c = state
        return (self.blocks[segment - 1](h, c), c)



def run_segments(runner: SegmentRunner, inputs: State) -> torch.Tensor:
    """Every segment in turn on ``inputs``: the model's output as the metric sees it."""
    state = tuple(inputs)
    for s in range(runner.num_segments):
        state = runner.run(s, state)
    return runner.output(state)


def tile(state: State, g: int) -> State:
    """Each tensor repeated ``g`` times along dim 0: group ``i`` is rows ``[i·M, (i+1)·M)``."""
    return tuple(t.repeat((g,) + (1,) * (t.dim() - 1)) for t in state)


class Evaluator:
    """End-to-end MSE of candidate configurations of a node (a range of leaves), at an ENG environment.

    ``model`` is converted in place (every layer of the space becomes a ``QuantLinear``) if it is not already.
    ``inputs``: the calibration tensors ``(N, …)`` (for a DiT: ``x_t``, ``t``, ``y``), moved to the model's
    device. ``batch``: calibration samples per forward; ``group``: candidates stacked per forward (the forward
    batch is ``batch · group``). ``reference``: FP outputs from another evaluator on the same inputs, to share.
    ``weights``: per-sample weights ``(N,)`` of the MSE, non-negative, not all zero (default: all 1).
    """

    def __init__(self, model: nn.Module, runner: SegmentRunner, space: SearchSpace, inputs: Sequence[torch.Tensor],
                 env: Environment, *, batch: int = 64, group: int = 16,
                 reference: list[torch.Tensor] | None = None, weights: torch.Tensor | None = None) -> None:
        if batch <= 0 or group <= 0:
            raise ValueError(f"batch and group must be positive, got batch={batch}, group={group}")
        self.model, self.runner, self.space, self.env = model, runner, space, env
        self.batch, self.group = batch, group
        model.eval()   # e.g. a DiT drops class labels at random in training mode
        p = next(model.parameters())
        self.device = p.device
        n = int(inputs[0].shape[0])
        if n == 0 or any(int(t.shape[0]) != n for t in inputs):
            raise ValueError("calibration inputs must share a non-empty sample dim, got "
                             f"{[tuple(t.shape) for t in inputs]}")
        self.num_samples = n
        self._chunks: list[State] = [tuple(t[i:i + batch].to(self.device) for t in inputs) for i in range(0, n, batch)]
        self.weights = None
        if weights is not None:
            w = torch.as_tensor(weights, dtype=torch.float64).cpu()
            if w.shape != (n,) or not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or float(w.sum()) <= 0:
                raise ValueError(f"weights must be ({n},), finite, non-negative and not all zero; got shape "
                                 f"{tuple(w.shape)}")
            self.weights = w
        self._chunk_w = None if self.weights is None else [
            (self.weights[i:i + batch] / self.weights.sum()).to(self.device) for i in range(0, n, batch)]
        self._units = self._convert()
        self.leaf_segment = [runner.segment_of(name) for name in space.names]
        split = [leaf.layer_names for leaf, seg in zip(space.leaves, self.leaf_segment)
                 if any(runner.segment_of(n) != seg for n in leaf.layer_names)]
        if split:
            raise PlanError(f"tied layers must run in one segment of the model: {split[0]}")
        if any(b < a for a, b in zip(self.leaf_segment, self.leaf_segment[1:])):
            raise PlanError("the leaves' segments must not decrease along the forward order; the runner's "
                            "segment_of does not match the model")
        self._env = self._env_settings()
        self._reference = reference
        self._states: list[list[State]] | None = None
        self.evaluations = 0

    # -- setup -----------------------------------------------------------------------------------
    def _convert(self) -> list[list[QuantLinear]]:
        """The modules of each leaf (several when tied), then of each fixed layer."""
        units = [leaf.layer_names for leaf in self.space.leaves] + [(leaf.name,) for leaf, _ in self.space.fixed]
        todo = [n for u in units for n in u if not isinstance(self.model.get_submodule(n), QuantLinear)]
        if todo:   # the config given here is replaced by the environment's before any run
            convert(self.model, QuantPlan({n: self.env.config for n in todo}))
        modules = [[self.model.get_submodule(n) for n in u] for u in units]
        sample_dim = getattr(self.runner, "sample_dim", None)   # (where grouped candidates split a linear's input)
        for u, ms in zip(units, modules):
            for n, m in zip(u, ms):
                m.sample_dim = sample_dim(n) if sample_dim is not None else 0
        return modules

    def _env_settings(self) -> list[tuple[LayerConfig | None, float]]:
        n = len(self.space.leaves)
        if self.env.plan is not None and len(self.env.plan) != n:
            raise PlanError(f"the ENG environment plan has {len(self.env.plan)} configs for {n} searched leaves")
        fixed = [cfg for _, cfg in self.space.fixed]
        return [self.env.layer(True, None, i) for i in range(n)] + [self.env.layer(False, c) for c in fixed]

    def _apply_env(self) -> None:
        for unit, (cfg, lam) in zip(self._units, self._env):
            for m in unit:
                if m.group_configs is not None:
                    m.set_group_configs(None)
                if m.config != cfg:
                    m.set_config(cfg)
                if m.noise_scale != lam:
                    m.set_noise_scale(lam)

    @torch.no_grad()
    def reference(self) -> list[torch.Tensor]:
        """Full-precision outputs per calibration chunk."""
        if self._reference is None:
            for m in (m for unit in self._units for m in unit):   # evaluations re-apply the environment first
                m.set_group_configs(None)
                m.set_config(None)
            ref = [self._run(0, c) for c in self._chunks]
            bad = [i for i, r in enumerate(ref) if not bool(torch.isfinite(r).all())]
            if bad:   # every MSE against it would be NaN, and a search would return the cheapest plan silently
                raise ValueError(f"the full-precision model's output on the calibration inputs is not finite (NaN/Inf "
                                 f"in {len(bad)} of {len(ref)} chunks, first chunk {bad[0]}): check the calibration "
                                 "inputs, and the model's weights and dtype (float16 overflows)")
            self._reference = ref
        return self._reference

    @torch.no_grad()
    def states(self) -> list[list[State]]:
        """The environment's state entering each segment, per chunk: ``states[segment][chunk]``."""
        if self._states is None:
            self._apply_env()
            segs = self.runner.num_segments
            states: list[list[State]] = [[] for _ in range(segs)]
            for chunk in self._chunks:
                state = chunk
                for s in range(segs):
                    states[s].append(state)
                    state = self.runner.run(s, state)
            self._states = states
        return self._states

    def _run(self, start: int, state: State) -> torch.Tensor:
        for s in range(start, self.runner.num_segments):
            state = self.runner.run(s, state)
        return self.runner.output(state)

    def fingerprint(self) -> str:
        """A digest of what the scores depend on: the space, the environment, the batching, the calibration
        inputs, and an exact content summary of the weights (``calibration.tensor_summary``)."""
        from ..nn import grouped
        from .calibration import tensor_summary

        h = hashlib.sha256()
        doc = {"space": self.space.fingerprint(), "env": self.env.to_dict(), "batch": self.batch,
               "group": self.group, "samples": self.num_samples}
        # what changes the scores' rounding: named only when not the CPU eager default
        device = next((p.device.type for p in self.model.parameters()), "cpu")
        if device != "cpu":
            doc["device"] = device
        if grouped.is_compiled():
            doc["compiled"] = True
        h.update(json.dumps(doc, sort_keys=True).encode())
        if self.weights is not None:
            h.update(self.weights.numpy().tobytes())
        with torch.no_grad():
            for chunk in self._chunks:
                for t in chunk:
                    h.update(t.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes())
            for name, p in self.model.named_parameters():
                h.update(f"{name}:{tensor_summary(p)}".encode())
        return h.hexdigest()

    # -- scoring ---------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, lo: int, hi: int, assignments: np.ndarray) -> np.ndarray:
        """MSE ``(m,)`` of the candidates ``assignments (m, hi − lo)`` (candidate indices) for leaves
        ``[lo, hi)``, every other layer at the environment."""
        a = np.asarray(assignments, dtype=np.int64)
        if not 0 <= lo < hi <= len(self.space.leaves) or a.ndim != 2 or a.shape[1] != hi - lo:
            raise ValueError(f"evaluate: leaves [{lo}, {hi}) of {len(self.space.leaves)} with assignments "
                             f"(m, {hi - lo}), got shape {a.shape}")
        if a.size and (a.min() < 0 or a.max() >= len(self.space.candidates)):
            raise ValueError(f"evaluate: candidate indices must be in [0, {len(self.space.candidates)})")
        ref = self.reference()
        states = self.states()
        self._apply_env()
        start = self.leaf_segment[lo]
        node = self._units[lo:hi]
        cands = self.space.candidates
        sse = torch.zeros(len(a), dtype=torch.float64, device=self.device)
        try:
            for unit in node:
                for m in unit:
                    m.set_noise_scale(1.0)
            for c0 in range(0, len(a), self.group):
                rows = a[c0:c0 + self.group]
                g = len(rows)
                for j, unit in enumerate(node):
                    configs = [cands[i] for i in rows[:, j]]
                    for m in unit:
                        m.set_group_configs(configs)
                for k, (chunk_state, chunk_ref) in enumerate(zip(states[start], ref)):
                    out = self._run(start, tile(chunk_state, g))
                    diff = out.reshape(g, *chunk_ref.shape).float() - chunk_ref.float()
                    if self._chunk_w is None:
                        sse[c0:c0 + g] += diff.pow(2).reshape(g, -1).sum(dim=1, dtype=torch.float64)
                    else:   # Σ_i (w_i / Σw) · Σ (out_i − ref_i)²
                        per = diff.pow(2).reshape(g, len(chunk_ref), -1).sum(dim=2, dtype=torch.float64)
                        sse[c0:c0 + g] += per @ self._chunk_w[k]
        finally:
            self._apply_env()
        self.evaluations += len(a)
        per_sample = ref[0][0].numel()
        norm = per_sample * (self.num_samples if self._chunk_w is None else 1)
        return (sse / norm).cpu().numpy()

    def evaluate_plans(self, assignments: np.ndarray) -> np.ndarray:
        """MSE of whole plans ``(m, n_leaves)``: all leaves at the plan, the fixed layers at the environment
        (with λ = 1 this is the PTQ error of the plan)."""
        return self.evaluate(0, len(self.space.leaves), assignments)
