"""The search's segment runner for any diffusers transformer without a cut of its own (``GenericRunner``:
HunyuanVideo, CogVideoX, Lumina2, Mochi, ...), so that capture, search, PTQ and PEFT take them too; the runtime
packs them (HunyuanVideo's blocks fused, the others' linears each quantizing their own input).

The model's own ``forward`` runs every segment. The blocks are the modules of the model's top-level
``ModuleList``\\ s (and of those a top-level ``ModuleDict`` holds: FLUX.3's per-mode blocks), in the order
``forward`` calls them (one segment each; a list a call does not reach is no segment of its cut); segment 0 holds
what runs before the first block, the last segment what runs after the last. Segment ``b + 1`` runs ``forward`` with
every block called before block ``b`` replaced by a stand-in that returns a recorded output, and stops when block
``b`` returns. What ``forward`` computes around its blocks (embedders, rotary tables, masks) is computed again in
every segment: a candidate config of an embedder layer reaches every later block, as in the model, and the cost is
the embedders' (small beside a block's). The state between segments is the call's inputs and the output of the
latest block (or, where the model's forward reads more, such as Lumina2's joint blocks reading its caption refiner's
last output, the latest output of each block list reached so far: ``check`` tries the smaller state first); the
stand-ins of the other blocks return NaN, so a ``forward`` that reads them (a skip connection) shows it.

``check(inputs)`` runs the first and last samples through the model's ``forward`` and through the segments and
requires the outputs bit-identical, every block of a list it reaches called once, in order, with the samples on one
dim of its outputs (0, or a sequence-first block's, kept batch-first in the state: ``_trace_batch_dims``);
it records in which segment each linear first runs (``segment_of``) and which linears of one module read the very
same input tensor (``tie``: a self-attention's to_q/to_k/to_v; a cross-attention's to_k/to_v). ``load_inputs`` runs it
on every calibration file; a model it refuses is said to be refused, by name, before any search.

Inputs are the ``forward``'s arguments as the pipeline passes them, stored by name: tensors with the call's samples
on dim 0 as they are; other tensors (a rotary table, position ids, a (1,) timestep) are shared by the call's
samples: stored repeated per sample and passed as the first; a tuple of tensors element by element (``name.0``,
``name.1``, ...); None, numbers, strings and lists and tuples of them are constants every call must repeat (the
calibration file keeps them; a list with an item per sample keeps one, rebuilt for each batch).
The timestep is the argument ``timestep`` (or ``timesteps``), stored as ``timestep``. Attention kwargs and other
values are refused. The MSE is taken on the whole output. Padding a keep-mask input hides from the output stays out of
PTQ's statistics (``_trace_padding``, ``real_rows``).
"""
from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import math
import warnings
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
import torch.nn as nn

from ..nn.convert import quantizable_linears
from .evaluator import CutModel, State, describe_arg, kept_rows, run_segments

GENERIC = "generic"
TIMESTEP_PARAMS = ("timestep", "timesteps")
SPEC_KEY = "generic_inputs"   # in the calibration file's metadata: the input spec and constants, JSON
SKIPPED = ("self", "return_dict")
# a constant argument in the calibration file's JSON: a tuple as {TUPLE: items} (JSON has lists only); a list with an
# item per sample (Qwen-Image 2.1's and NucleusMoE's ``img_shapes``) as {PER_SAMPLE: item}, rebuilt for each batch
TUPLE, PER_SAMPLE = "__tuple__", "__per_sample__"


class _Stop(Exception):
    """Raised by the forward hook of a segment's block: its output, and the end of the segment."""

    def __init__(self, value: Any) -> None:
        super().__init__()
        self.value = value


def block_lists(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """The model's top-level ``ModuleList``\\ s holding linears, and those of its top-level ``ModuleDict``\\ s
    (FLUX.3's per-mode ``mode_blocks["image"]``): its blocks, in definition order."""
    layers = quantizable_linears(model)
    found: list[tuple[str, nn.ModuleList]] = []
    for name, child in model.named_children():
        if isinstance(child, nn.ModuleList):
            found.append((name, child))
        elif isinstance(child, nn.ModuleDict):
            found += [(f"{name}.{key}", ml) for key, ml in child.items() if isinstance(ml, nn.ModuleList)]
    return [(name, ml) for name, ml in found if len(ml) and any(n.startswith(name + ".") for n in layers)]


def generic_arch(model: nn.Module, lists: Sequence[Any] | None = None) -> str | None:
    """``"generic:<class>"`` for a diffusers model with block lists (``lists``, when already found) and a timestep
    argument, else None."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return None
    if not any(p in params for p in TIMESTEP_PARAMS) or not (block_lists(model) if lists is None else lists):
        return None
    return f"{GENERIC}:{type(model).__name__}"


def _encode(value: Any, param: str) -> Any:
    """A constant argument (None, numbers, strings, and tuples and lists of them) as JSON (``TUPLE``)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{param} = {value}: not a finite number")
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (tuple, list)):
        items = [_encode(v, param) for v in value]
        return {TUPLE: items} if isinstance(value, tuple) else items
    raise ValueError(f"{param}: a {type(value).__name__} argument is not supported by the search's generic cut "
                     f"(tensors, tuples of tensors, None, numbers, strings and lists of them are)")


def _decode(value: Any, batch: int) -> Any:
    """``_encode``'s inverse; a per-sample list rebuilt with ``batch`` items."""
    if isinstance(value, list):
        return [_decode(v, batch) for v in value]
    if isinstance(value, dict) and TUPLE in value:
        return tuple(_decode(v, batch) for v in value[TUPLE])
    if isinstance(value, dict) and PER_SAMPLE in value:
        return [_decode(value[PER_SAMPLE], batch) for _ in range(batch)]
    return value   # (a number, a string, None, or the empty mapping)


def _flat(value: Any, where: str) -> tuple[list[torch.Tensor], Any]:
    """A block's output as tensors and its structure (``"t"``, or a list of ``"t"``/``None`` for a tuple)."""
    if isinstance(value, torch.Tensor):
        return [value], "t"
    if isinstance(value, (tuple, list)) and all(v is None or isinstance(v, torch.Tensor) for v in value):
        return [v for v in value if v is not None], ["t" if v is not None else None for v in value]
    raise ValueError(f"{where} returns {type(value).__name__}: the generic cut takes blocks returning tensors")


def _unflat(tensors: Sequence[torch.Tensor], spec: Any) -> Any:
    if spec == "t":
        return tensors[0]
    it = iter(tensors)
    return tuple(next(it) if s is not None else None for s in spec)


def _output(out: Any) -> Any:
    """A ``forward``'s result as one tensor: the tensor it returns (``.sample``, or a tuple's), or, for a model with
    several outputs (LTX-2's video and audio), all of them flattened per sample and concatenated, so that the metric
    reads each."""
    if hasattr(out, "to_tuple"):   # (a diffusers output object)
        out = out.to_tuple()
    if isinstance(out, (tuple, list)):
        parts = [o for o in out if isinstance(o, torch.Tensor)]
        if len(parts) == 1:
            return parts[0]
        if parts and all(p.dim() and p.shape[0] == parts[0].shape[0] for p in parts):
            return torch.cat([p.flatten(1) for p in parts], dim=1)
        return out
    return out


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit the same, NaN where the other has NaN (a sample whose prompt is all masked gives NaN in
    HunyuanVideo: 0/0 in its masked mean)."""
    return a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all())


def _surviving(options: dict[str, list[tuple[int, int, int]]] | None, silent: Mapping[str, torch.Tensor],
               pads: Sequence[torch.Tensor]) -> dict[str, list[tuple[int, int, int]]]:
    """The (mask, first row, rows) alignments of each linear's input rows with a mask under which every padded
    row is ``silent`` in these samples (``pads[j]``: mask j's padded tokens, ``(N, L_j)``): all that fit its
    rows when ``options`` is None, else those of ``options`` that still hold (the same rows, none padded heard)."""
    out: dict[str, list[tuple[int, int, int]]] = {}
    names = silent if options is None else [n for n in options if n in silent]
    for name in names:
        quiet = silent[name]
        rows = quiet.shape[1]
        if options is None:
            left = [(j, at, rows) for j, p in enumerate(pads)
                    for at in ([0] if rows == p.shape[1] else [rows - p.shape[1], 0] if rows > p.shape[1] else [])]
        else:
            left = options[name]
        out[name] = [(j, at, r) for j, at, r in left if r == rows and quiet.shape[0] == pads[j].shape[0]
                     and bool(quiet[:, at:at + pads[j].shape[1]][pads[j]].all())]
    return out


class GenericRunner(CutModel):
    """``SegmentRunner`` for a diffusers transformer the search has no cut of its own for (module docstring)."""

    extra_conditions = False   # (PixArt's; ``load_inputs`` asks every runner)
    # a traced padding rule fits the batches it was traced at; a model whose rows change with the batch's size
    # (FramePack trims its prompt at one sample) may meet a batch it does not fit: those count every row
    rows_exact = False
    scheduler_timesteps = False   # (how a pipeline scales its timesteps is unknown: capture takes them from the calls)

    def __init__(self, model: nn.Module, *, output_fn: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        lists = block_lists(model)
        arch = generic_arch(model, lists)
        if arch is None:
            raise TypeError(f"{type(model).__name__} is not cut by the search: it needs top-level block lists "
                            f"(ModuleList, or in a ModuleDict) and a timestep argument "
                            f"({' or '.join(TIMESTEP_PARAMS)})")
        self.model: Any = model
        self.arch = arch
        self.output_fn = output_fn
        # (names only: the runner lives on its model, and a deep copy of the model copies it)
        self._params = tuple(inspect.signature(model.forward).parameters)
        self._blocks = [f"{name}.{i}" for name, ml in lists for i in range(len(ml))]
        self.num_segments = len(self._blocks) + 2
        self._spec: list[tuple[str, str, int | None, bool]] | None = None   # (input name, param, index, shared)
        self._constants: dict[str, Any] = {}
        self._order: list[str] | None = None   # block names in call order (check)
        self._segment: dict[str, int] = {}   # linear name -> the segment it first runs in (check)
        self._ties: dict[str, str] = {}
        self._out_spec: dict[str, Any] = {}   # block name -> its output's structure (_flat)
        # per kind of input (the per-sample shapes of a file's inputs: _kind), from check: whether the state keeps
        # each list's latest output (not only the latest block's), and each block's output per-sample shapes, dtypes
        self._per_list: dict[Any, bool] = {}
        self._out_meta: dict[tuple[Any, str], list[tuple[tuple[int, ...], torch.dtype]]] = {}
        # block -> the samples' dim of each output tensor (check): 0, or where a sequence-first block keeps them
        # (ERNIE-Image's (S, B, H)); the state holds them batch-first, the stand-ins give them back in place
        self._batch_dims: dict[str, list[int]] = {}
        self._sample_dims: dict[str, int] = {}   # linear -> its input's samples' dim, where not 0 (sample_dim)
        self._first_batch = 0   # the first call's samples (inputs)
        # per kind of input: linear -> (the keep-mask input's index, the mask's first row in the linear's input,
        # the input's rows), for the linears whose rows under a mask's zeros never reach the output (_trace_padding)
        self._padding: dict[Any, dict[str, tuple[int, int, int]]] = {}

    # -- inputs ------------------------------------------------------------------------------------
    @property
    def input_names(self) -> tuple[str, ...]:
        if self._spec is None:
            raise RuntimeError(f"the inputs of this {type(self.model).__name__} are not known yet: they come from its "
                               "first captured call or a calibration file's metadata")
        return tuple(s[0] for s in self._spec)

    def inputs(self, **kwargs: Any) -> State:
        """One ``forward`` call's arguments (as the pipeline passes them) as this runner's input tuple; the first
        call fixes which inputs there are, every later call must agree. A list of constants as long as the call's
        batch is read as an item per sample (its length alone says so: pipelines pass ``[shape] * batch``), kept
        as one item and rebuilt for each batch the cut runs."""
        kwargs = {k: v for k, v in kwargs.items() if k not in SKIPPED}
        unknown = sorted(set(kwargs) - set(self._params))
        if unknown:
            raise ValueError(f"{type(self.model).__name__}.forward takes no {unknown}")
        first = next((v for v in kwargs.values() if isinstance(v, torch.Tensor) and v.dim()), None)
        if first is None:
            raise ValueError("a call without tensor arguments")
        n = first.shape[0]
        prior = {e[0]: e[3] for e in self._spec or ()}

        def shared(name: str, x: torch.Tensor) -> bool:
            if not (x.dim() and x.shape[0] == n):
                return True
            # a call of one sample cannot tell a (1, ...) input's role: as the earlier calls had it
            return n == 1 and prior.get(name, False)

        spec: list[tuple[str, str, int | None, bool]] = []
        values: list[torch.Tensor] = []
        constants: dict[str, Any] = {}
        for param, v in kwargs.items():
            name = "timestep" if param in TIMESTEP_PARAMS else param
            if isinstance(v, Mapping):
                if v:
                    raise ValueError(f"{param} {sorted(v)}: the search's generic cut takes no keyword-argument "
                                     "mappings (attention kwargs, added conditions) but empty ones")
                constants[param] = {}
                continue
            if isinstance(v, torch.Tensor):
                spec.append((name, param, None, shared(name, v)))
                values.append(v)
            elif isinstance(v, (tuple, list)) and v and all(isinstance(x, torch.Tensor) for x in v):
                for i, x in enumerate(v):
                    spec.append((f"{name}.{i}", param, i, shared(f"{name}.{i}", x)))
                    values.append(x)
            elif isinstance(v, list) and len(v) == n and not any(isinstance(x, torch.Tensor) for x in v):
                # an item per sample, as pipelines pass ``[shape] * batch``: one item, rebuilt for each batch run
                if any(x != v[0] for x in v):
                    raise ValueError(f"{param}: a list as long as the call's batch is read as an item per sample, "
                                     f"and its items differ ({v[0]!r}, ...): the generic cut runs a file's samples "
                                     "in batches of one kind; capture calls whose samples share it")
                constants[param] = {PER_SAMPLE: _encode(v[0], param)}
            else:
                constants[param] = _encode(v, param)
        if not any(s[0] == "timestep" for s in spec):
            raise ValueError(f"a call of {type(self.model).__name__} without a timestep tensor")
        if self._spec is None:
            self._set_spec(spec, constants)
            self._first_batch = n
        elif spec != self._spec or constants != self._constants:
            hint = (" (a first call of one sample cannot tell an input shared by a call's samples from a per-sample "
                    "one: capture with a batch of 2 or more)" if self._first_batch == 1 else "")
            raise ValueError(f"calls of {type(self.model).__name__} differ in their arguments: {self._describe()} and "
                             f"{self._describe(spec, constants)}; one calibration file holds calls of one kind{hint}")
        device = first.device
        return tuple(v.to(device).expand(n, *v.shape) if shared else v
                     for (_, _, _, shared), v in zip(spec, values))

    def _describe(self, spec: Any = None, constants: Any = None) -> str:
        spec = self._spec if spec is None else spec
        constants = self._constants if constants is None else constants
        names = [s[0] + (" (shared)" if s[3] else "") for s in spec]
        return f"inputs {names}, constants {constants}"

    def check_stored(self, out: State) -> None:
        """The checks a stored input tuple passes (``diffusers_runner.check_stored``)."""
        if any(not isinstance(t, torch.Tensor) or not t.dim() for t in out):
            raise ValueError(f"stored inputs must be tensors with the sample on dim 0, got "
                             f"{[describe_arg(t) for t in out]}")
        n = out[0].shape[0]
        if any(t.shape[0] != n for t in out):
            raise ValueError(f"stored inputs must share the sample dim, got {[tuple(t.shape) for t in out]}")
        for (name, _, _, shared), t in zip(self._spec or (), out):
            if shared and n > 1 and not torch.equal(t, t[:1].expand_as(t)):
                raise ValueError(f"{name} is shared by a call's samples, but differs between the stored samples")

    def metadata(self) -> dict[str, str]:
        """What a calibration file keeps of the inputs (``configure`` reads it back)."""
        return {SPEC_KEY: json.dumps({"spec": self._spec, "constants": self._constants})}

    def configure(self, meta: Mapping[str, str], where: str) -> None:
        """The input spec a calibration file's metadata holds."""
        try:
            doc = json.loads(meta[SPEC_KEY])
            spec = [(str(a), str(b), None if c is None else int(c), bool(d)) for a, b, c, d in doc["spec"]]
            constants = dict(doc["constants"])
        except (KeyError, ValueError, TypeError) as e:
            raise ValueError(f"{where}: no readable {SPEC_KEY} metadata ({e})") from None
        unknown = sorted(({s[1] for s in spec} | set(constants)) - set(self._params))
        if unknown:
            raise ValueError(f"{where}: inputs {unknown} are not arguments of {type(self.model).__name__}.forward")
        if self._spec is not None and (spec, constants) != (self._spec, self._constants):
            raise ValueError(f"{where}: {self._describe(spec, constants)}; this runner reads {self._describe()}")
        self._set_spec(spec, constants)

    def _set_spec(self, spec: list[tuple[str, str, int | None, bool]], constants: dict[str, Any]) -> None:
        self._spec, self._constants = spec, constants
        # the timestep and the inputs a call shares (rotary tables, position ids) stay in their captured dtype when
        # load_inputs casts the others to the model's, as the pipeline passes them
        self.exact_inputs = ("timestep",) + tuple(e[0] for e in spec if e[3])

    def _kwargs(self, state: State) -> dict[str, Any]:
        batch = state[0].shape[0] if state and state[0].dim() else 1
        kw: dict[str, Any] = {p: _decode(v, batch) for p, v in self._constants.items()}
        parts: dict[str, list[torch.Tensor]] = {}
        for (_, param, index, shared), t in zip(self._spec or (), state):
            v = t[0] if shared else t
            if index is None:
                kw[param] = v
            else:
                parts.setdefault(param, []).append(v)
        kw.update({p: tuple(vs) for p, vs in parts.items()})
        if "return_dict" in self._params:
            kw["return_dict"] = False
        return kw

    # -- the cut -----------------------------------------------------------------------------------
    def _module(self, name: str) -> nn.Module:
        return self.model.get_submodule(name)

    def _trace_batch_dims(self, one: State, shapes: Mapping[str, list[tuple[int, ...]]],
                          inputs: Mapping[str, tuple[int, ...]]) -> tuple[dict[str, list[int]], dict[str, int]]:
        """The samples' dim of each block output (``_batch_dims``) and of each linear's input (``_sample_dims``,
        where not 0): 0 where every block output of the one-sample call ``one`` has 1 there; else traced on two
        copies of the sample, the one dim that doubles (none: a block is left to ``run``, which refuses outputs it
        cannot put batch-first)."""
        if all(s and s[0] == 1 for ts in shapes.values() for s in ts):
            return {}, {}
        doubled: dict[str, list[tuple[int, ...]]] = {}
        handles = []
        for name in shapes:
            def hook(mod: nn.Module, args: tuple, out: Any, name: str = name) -> None:
                doubled[name] = [tuple(t.shape) for t in _flat(out, name)[0]]
            handles.append(self._module(name).register_forward_hook(hook))
        for name in inputs:
            def pre(mod: nn.Module, args: tuple, name: str = name) -> None:
                if name not in doubled and args and isinstance(args[0], torch.Tensor):
                    doubled[name] = [tuple(args[0].shape)]
            handles.append(self._module(name).register_forward_pre_hook(pre))
        try:
            self.model(**self._kwargs(tuple(torch.cat([t, t]) for t in one)))
        except Exception:   # (run names what fails)
            return {}, {}
        finally:
            for h in handles:
                h.remove()

        def grows(a: tuple[int, ...], b: tuple[int, ...]) -> int:
            found = [i for i in range(len(a)) if len(a) == len(b) and b[i] == 2 * a[i]
                     and all(b[j] == a[j] for j in range(len(a)) if j != i)]
            return found[0] if found else 0

        dims: dict[str, list[int]] = {}
        for name, ones in shapes.items():
            twos = doubled.get(name, [])
            found = [grows(a, b) for a, b in zip(ones, twos)]
            if len(found) == len(ones) == len(twos) and any(found):
                dims[name] = found
        samples = {name: d for name, a in inputs.items() if name in doubled
                   and (d := grows(a, doubled[name][0])) and len(a) > d + 1}
        return dims, samples

    def sample_dim(self, layer_name: str) -> int:
        """The dim of a linear's input that holds the samples (``QuantLinear.sample_dim``): 0 but in a
        sequence-first model."""
        return self._sample_dims.get(layer_name, 0)

    def _kind(self, state: State) -> Any:
        """What the cut's choices depend on: the per-sample shapes of the inputs (one calibration file's)."""
        return tuple(tuple(t.shape[1:]) for t in state[:len(self.input_names)])

    def _kept(self, b: int, per_list: bool) -> list[str]:
        """The blocks whose outputs the state entering block ``b`` carries, in call order: the latest block's alone
        when the model's forward reads no other (``check`` tries that first), else the latest of each list."""
        assert self._order is not None
        if b == 0:
            return []
        if not per_list:
            return [self._order[b - 1]]
        latest: dict[str, str] = {}
        for name in self._order[:b]:
            latest[name.rpartition(".")[0]] = name
        return sorted(latest.values(), key=self._order.index)

    def run(self, segment: int, state: State) -> State:
        if self._order is None:
            raise RuntimeError(f"check(inputs) first: the cut of this {type(self.model).__name__} is traced there")
        if segment == 0:
            return tuple(state)
        n_in = len(self.input_names)
        b = segment - 1   # the block this segment runs (b == len(order): none, the head)
        kind = self._kind(state)
        if kind not in self._per_list:
            raise RuntimeError(f"inputs of per-sample shapes {kind} have not been through check(): the cut of this "
                               f"{type(self.model).__name__} is traced per kind of input")
        per_list = self._per_list[kind]
        kept: dict[str, Any] = {}   # block name -> its recorded output
        rest = list(state[n_in:])
        for name in self._kept(b, per_list):
            spec = self._out_spec[name]
            k = sum(1 for x in spec if x is not None) if isinstance(spec, list) else 1
            kept[name] = _unflat(rest[:k], spec)
            rest = rest[k:]
        n = state[0].shape[0]
        out = self._forward(state[:n_in], b, kept, n, kind)
        if b == len(self._order):
            return (_output(out),)
        name = self._order[b]
        tensors, spec = _flat(out, name)
        dims = self._batch_dims.get(name, [])
        if len(dims) == len(tensors):
            tensors = [t.movedim(d, 0) if d else t for t, d in zip(tensors, dims)]
            out = _unflat(tensors, spec)
        if any(t.dim() == 0 or t.shape[0] != n for t in tensors):
            raise ValueError(f"block {name} of {type(self.model).__name__} returns {[tuple(t.shape) for t in tensors]}"
                             f" for {n} samples: the generic cut needs batch-first block outputs")
        self._out_spec[name] = spec
        self._out_meta[(kind, name)] = [(tuple(t.shape[1:]), t.dtype) for t in tensors]
        kept[name] = out
        flat: list[torch.Tensor] = []
        for k_name in self._kept(b + 1, per_list):
            flat += _flat(kept[k_name], k_name)[0]
        return tuple(state[:n_in]) + tuple(flat)

    def _forward(self, inputs: State, b: int, kept: Mapping[str, Any], n: int, kind: Any) -> Any:
        """``forward`` on ``inputs`` (``n`` samples) with the first ``b`` blocks standing in (the kept outputs;
        NaN of each block's recorded shape for the rest), stopped when block ``b`` returns (``_Stop``), or to its
        end when there is none."""
        assert self._order is not None
        device = inputs[0].device
        patched: list[tuple[nn.Module, Any]] = []   # (block, the instance forward it had: a hook's wrapper)
        handles = []
        nan: dict[Any, Any] = {}   # (one NaN output per shape for this forward's stand-ins, not one per block)

        def stand_in(name: str) -> Callable[..., Any]:
            dims = self._batch_dims.get(name, [])

            def in_place(ts: list[torch.Tensor]) -> list[torch.Tensor]:
                """Copies with the samples' dim where the block had it, laid out as the block gave them."""
                return [t.movedim(0, d).clone(memory_format=torch.contiguous_format) if d else t.clone()
                        for t, d in zip(ts, dims or [0] * len(ts))]

            def forward(*args: Any, **kwargs: Any) -> Any:
                if name in kept:
                    t, spec = _flat(kept[name], name)
                    return _unflat(in_place(t), spec)
                key = (tuple(self._out_meta[(kind, name)]), str(self._out_spec[name]))
                if key not in nan:
                    nan[key] = _unflat(in_place([torch.full((n, *shape), float("nan"), dtype=dtype, device=device)
                                                 for shape, dtype in self._out_meta[(kind, name)]]),
                                       self._out_spec[name])
                return nan[key]
            return forward

        def too_early(name: str) -> Callable[..., None]:
            def hook(mod: nn.Module, args: tuple) -> None:
                raise ValueError(f"{type(self.model).__name__}.forward called block {name} out of the order it was "
                                 "traced in")
            return hook

        def stop(mod: nn.Module, args: tuple, output: Any) -> None:
            raise _Stop(output)

        try:
            for i, name in enumerate(self._order):
                m = self._module(name)
                if i < b:
                    patched.append((m, m.__dict__.get("forward")))
                    m.forward = stand_in(name)   # (an instance attribute: nn.Module.__call__ finds it first)
                elif i == b:
                    handles.append(m.register_forward_hook(stop))
                else:
                    handles.append(m.register_forward_pre_hook(too_early(name)))
            try:
                return self.model(**self._kwargs(inputs))
            except _Stop as s:
                return s.value
        finally:
            for m, had in patched:
                if had is None:
                    del m.forward
                else:
                    m.forward = had
            for h in handles:
                h.remove()

    # -- the trace ---------------------------------------------------------------------------------
    @torch.no_grad()
    def check(self, inputs: State, *, padding: bool = True, shapes_only: bool = False) -> None:
        """Trace the cut on the first sample of ``inputs`` and hold it to the model (module docstring): a
        ``ValueError`` names what the generic cut cannot reproduce. ``padding``: trace the padding rules too.
        ``shapes_only``: as on the meta device, trace without holding the cut to the model's values (a profile
        prices shapes; the safe state layout, no padding rules)."""
        what = type(self.model).__name__
        device = next(self.model.parameters()).device
        one = tuple(t[:1].to(device) for t in inputs)
        kw = self._kwargs(one)
        order: list[str] = []
        linears = {name: self._module(name) for name in quantizable_linears(self.model)}
        first_input: dict[str, torch.Tensor] = {}   # (held: no buffer is freed and reused while traced)
        position: dict[str, int] = {}   # linear -> how many blocks had been called before it first ran
        handles = []

        def block_hook(name: str) -> Callable[..., None]:
            def hook(mod: nn.Module, args: tuple) -> None:
                if name in order:
                    raise ValueError(f"{what}.forward calls block {name} twice: the generic cut runs each block once")
                order.append(name)
            return hook

        out_shapes: dict[str, list[tuple[int, ...]]] = {}   # block -> its output tensors' shapes

        def shape_hook(name: str) -> Callable[..., None]:
            def hook(mod: nn.Module, args: tuple, out: Any) -> None:
                out_shapes[name] = [tuple(t.shape) for t in _flat(out, name)[0]]
            return hook

        def linear_hook(name: str) -> Callable[..., None]:
            def hook(mod: nn.Module, args: tuple) -> None:
                if name not in position:
                    position[name] = len(order)
                    x = args[0] if args else None
                    if isinstance(x, torch.Tensor):
                        first_input[name] = x
            return hook

        try:
            for name in self._blocks:
                handles.append(self._module(name).register_forward_pre_hook(block_hook(name)))
                handles.append(self._module(name).register_forward_hook(shape_hook(name)))
            for name, m in linears.items():
                handles.append(m.register_forward_pre_hook(linear_hook(name)))
            try:
                want = self.model(**kw)
            except ValueError:
                raise
            except Exception as e:   # (e.g. an input without the sample on dim 0, cut to one sample)
                where = " on the meta device (a weightless profile)" if one[0].device.type == "meta" else ""
                raise ValueError(f"{what}.forward fails on the first sample of these inputs alone{where}: "
                                 f"{type(e).__name__}: {e}") from None
        finally:
            for h in handles:
                h.remove()
        want = _output(want)
        # a list the call does not reach at all is no segment of this cut (FLUX.3's reference-image blocks in text to
        # image); one reached in part is refused
        reached = {name.rpartition(".")[0] for name in order}
        missing = sorted(b for b in set(self._blocks) - set(order) if b.rpartition(".")[0] in reached)
        if missing:
            raise ValueError(f"{what}.forward does not call blocks {missing[:3]} on these inputs: the generic cut "
                             "needs every block of a list it reaches called once")
        if not isinstance(want, torch.Tensor):
            raise ValueError(f"{what}.forward returns {type(want).__name__}: the generic cut needs a tensor output")
        if self._order is not None and order != self._order:
            raise ValueError(f"{what}: these inputs reach blocks {order[:2]}...{order[-1:]} ({len(order)}), an earlier "
                             f"check's {len(self._order)}: one runner cuts calls that reach the same blocks (a "
                             "calibration file of one kind)")
        self._order, self._out_spec = order, {}
        self.num_segments = len(order) + 2
        self._batch_dims, self._sample_dims = self._trace_batch_dims(
            one, out_shapes, {n: tuple(x.shape) for n, x in first_input.items()})
        kind = self._kind(one)
        try:
            if shapes_only or want.device.type == "meta":   # (a profile: values not compared; the safe layout)
                self._per_list[kind] = True
                run_segments(self, one)
            else:   # the latest block's output alone where that reproduces the model (half the state of two lists),
                #     held on the first and the last sample (a guided capture's two halves: what the forward reads
                #     may depend on the values, e.g. on a prompt's length)
                ends = tuple((t[[0, -1]] if t.shape[0] > 1 else t[:1]).to(device) for t in inputs)
                want_ends = want if ends[0].shape[0] == 1 else _output(self.model(**self._kwargs(ends)))
                for per_list in (False, True):
                    self._per_list[kind] = per_list
                    try:
                        got = run_segments(self, ends)
                    except Exception:
                        if per_list:
                            raise
                        continue
                    if _same(got, want_ends):
                        break
                else:
                    raise ValueError(f"{what}: its forward, cut at its blocks, does not give the model's output (it "
                                     "reads something other than each block list's latest output between its blocks, "
                                     "e.g. a skip connection): the generic cut cannot search it")
                # two copies of the sample: what a batch of one cannot show (an input's role, shared or not)
                refusal = ValueError(f"{what}: the cut runs one sample as the model does but not two copies of it "
                                     "together: an input the calls pass once for all samples is stored per sample (a "
                                     "capture of batch 1 cannot tell): capture with a batch of 2 or more")
                try:
                    two = run_segments(self, tuple(torch.cat([t, t]) for t in one)).float()
                except Exception:
                    raise refusal from None
                tol = 1e-4 if want.dtype == torch.float32 else 3e-2
                if two.shape[0] != 2 * want.shape[0] or any(
                        float((h - want.float()).norm()) > tol * float(want.float().norm()) + 1e-12
                        for h in two.chunk(2)):
                    raise refusal
        except BaseException:
            self._order = None
            self.num_segments = len(self._blocks) + 2
            self._per_list.pop(kind, None)
            raise
        block_of = {}
        for seg, name in enumerate(order, start=1):
            for sub, _ in self._module(name).named_modules():
                block_of[f"{name}.{sub}" if sub else name] = seg
        self._segment = {}
        for name in linears:
            if name in block_of:
                self._segment[name] = block_of[name]
            elif name in position:   # outside the blocks: 0 before them, else the segment of the next block called
                self._segment[name] = position[name] + 1 if position[name] else 0   # (after the last: the head's)
        groups: dict[tuple[str, int], list[str]] = {}   # (parent, the very tensor object) -> linears reading it
        for name, x in first_input.items():
            groups.setdefault((name.rpartition(".")[0], id(x)), []).append(name)
        self._ties = {}
        for (parent, _), names in groups.items():
            if len(names) > 1:
                label = f"{parent}.{'+'.join(n.rpartition('.')[2] for n in names)}"
                self._ties.update({n: label for n in names})
        first_input.clear()
        if padding and not shapes_only and want.device.type != "meta":
            self._trace_padding(inputs, kind)

    # -- padding -----------------------------------------------------------------------------------
    def _masks(self, inputs: State) -> list[tuple[int, torch.Tensor]]:
        """The inputs that read as per-token keep-masks, ``(input index, (N, L) bool)``: 0/1 values (bool,
        integer or float) along one dim of length 2 or more (singleton dims aside), some sample with a 0."""
        out = []
        for i, ((name, _, _, _), t) in enumerate(zip(self._spec or (), inputs)):
            dims = [d for d in t.shape[1:] if d != 1]
            if name == "timestep" or len(dims) != 1 or dims[0] < 2:
                continue
            m = t.reshape(t.shape[0], dims[0])
            if bool(((m == 0) | (m == 1)).all()) and not bool(m.all()):
                out.append((i, m != 0))
        return out

    def _trace_padding(self, inputs: State, kind: Any) -> None:
        """Which linears read padding: rows under a keep-mask input's zeros that never reach the output, left out
        of calibration statistics (``real_rows``). Traced on every sample of ``inputs``, two at a time (a batch of
        one may run otherwise: FramePack trims its prompt there): a linear's input rows under a mask's zeros
        (aligned with its rows, their first or their last) must have an exactly zero gradient of the output under
        a random weighting in every sample (others may too: the last single-stream block's prompt rows, whose
        output is dropped), with the same rows in every pair; the first mask and alignment that holds everywhere
        is the linear's rule. Then held again two at a time: the output must stay bit for bit the same with those
        rows of every ruled linear set to random values. Where that fails, or the backward pass does (memory, an
        in-place op), the padding stays in the statistics, and a warning says why."""
        self._padding[kind] = {}
        masks = self._masks(inputs)
        pads = [~kept_rows(m) for _, m in masks]   # (N, L) each: the rows a rule would leave out
        if not any(bool(p.any()) for p in pads):
            return
        n = inputs[0].shape[0]
        pairs = [list(range(i, min(i + 2, n))) for i in range(0, n, 2)]
        if n > 1 and len(pairs[-1]) == 1:
            pairs[-1] = [n - 2, n - 1]
        device = next(self.model.parameters()).device
        what = type(self.model).__name__
        options: dict[str, list[tuple[int, int, int]]] | None = None   # linear -> (mask, first row, rows) left
        try:
            for idx in pairs:
                silent = self._silent_rows(tuple(t[idx].to(device) for t in inputs))
                options = _surviving(options, silent, [p[idx] for p in pads])
        except (RuntimeError, ValueError) as e:   # (memory, an in-place op on a probed input, ...)
            warnings.warn(f"{what}: padded rows stay in the calibration statistics: the gradient that finds them "
                          f"fails ({type(e).__name__}: {e})", stacklevel=3)
            return
        rules = {}
        for name, left in (options or {}).items():   # (the first that leaves something out: a mask whose only zeros
            if name in self._sample_dims:            # are a sample's every token pads nothing, and holds trivially;
                continue                              # a sequence-first linear's rows are not a sample's in turn)
            for j, at, rows in left:
                if bool(pads[j].any()):
                    rules[name] = (masks[j][0], at, rows)
                    break
        if not rules:
            return
        self._padding[kind] = rules
        try:
            why = next((f"samples {idx}" for idx in pairs
                        if not self._unmoved(tuple(t[idx].to(device) for t in inputs))), None)
        except (RuntimeError, ValueError) as e:
            why = f"{type(e).__name__}: {e}"
        if why is not None:
            self._padding[kind] = {}
            warnings.warn(f"{what}: padded rows stay in the calibration statistics: setting the rows found silent "
                          f"to random values moves the output ({why})", stacklevel=3)

    def _silent_rows(self, state: State) -> dict[str, torch.Tensor]:
        """Per linear with a 3-D float input, run once, the rows of that input the output does not read on
        ``state``: ``(N, L)`` bool, where the gradient of the output under a random weighting is exactly zero."""
        probes: dict[str, torch.Tensor] = {}
        twice: set[str] = set()

        def probe(name: str) -> Callable[..., Any]:
            def hook(mod: nn.Module, args: tuple) -> Any:
                x = args[0] if args else None
                if name in probes:
                    twice.add(name)
                elif isinstance(x, torch.Tensor) and x.dim() == 3 and x.is_floating_point():
                    probes[name] = torch.zeros_like(x, requires_grad=True)
                    return (x + probes[name],) + args[1:]
                return None
            return hook

        # (the weights' gradients are not wanted: without them a linear's backward keeps no copy of its input)
        learning = [p for p in self.model.parameters() if p.requires_grad]
        try:
            for p in learning:
                p.requires_grad_(False)
            with self._hooked(probe), torch.enable_grad():
                out = _output(self.model(**self._kwargs(state)))
                weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(0)).to(out.device)
                grads = torch.autograd.grad((out.float() * weight).nansum(), list(probes.values()),
                                            allow_unused=True)
        finally:
            for p in learning:
                p.requires_grad_(True)
        return {name: (g.abs().amax(-1) == 0).cpu() for name, g in zip(probes, grads)
                if g is not None and name not in twice}

    def _unmoved(self, state: State) -> bool:
        """The output on ``state`` is bit for bit the same with the rows ``real_rows`` leaves out set to random
        values (both runs through the same hooks: a hook's result can take another matmul path than a view)."""
        gen = torch.Generator().manual_seed(1)

        def rows(noise: bool) -> Callable[[str], Callable[..., Any]]:
            def make(name: str) -> Callable[..., Any]:
                def hook(mod: nn.Module, args: tuple) -> Any:
                    keep = self.real_rows(name, state)
                    if keep is None:
                        return None
                    x = args[0]
                    if tuple(x.shape[:-1]) != tuple(keep.shape):
                        raise ValueError(f"{name} reads {tuple(x.shape)}, its padding rule {tuple(keep.shape)}")
                    other = x
                    if noise:
                        scale = 4 * float(x.float().nan_to_num(0.0, 0.0, 0.0).std()) + 1   # (finite: NaN would spread)
                        other = torch.randn(x.shape, generator=gen).to(x) * scale
                    return (torch.where(keep[..., None].to(x.device), x, other),) + args[1:]
                return hook
            return make

        with self._hooked(rows(False)):
            want = _output(self.model(**self._kwargs(state)))
        with self._hooked(rows(True)):
            got = _output(self.model(**self._kwargs(state)))
        return _same(got, want)

    def _hooked(self, make: Callable[[str], Callable[..., Any]]) -> contextlib.AbstractContextManager[None]:
        """Every linear with the forward pre-hook ``make(name)``, removed on exit."""
        @contextlib.contextmanager
        def hooked() -> Iterator[None]:
            handles = [self._module(n).register_forward_pre_hook(make(n)) for n in quantizable_linears(self.model)]
            try:
                yield
            finally:
                for h in handles:
                    h.remove()
        return hooked()

    def padding_digest(self) -> str | None:
        """A digest of the padding rules traced so far (PTQ's state records it: a resume must leave out the same
        rows), None when there are none."""
        rules = sorted((str(kind), sorted(r.items())) for kind, r in self._padding.items() if r)
        return hashlib.sha256(json.dumps(rules).encode()).hexdigest()[:16] if rules else None

    @property
    def pads_rows(self) -> bool:   # type: ignore[override]
        return any(self._padding.values())

    def real_rows(self, layer_name: str, state: State) -> torch.Tensor | None:
        """The rows of a linear's input that are not padding (``_trace_padding``), from its keep-mask input in
        ``state``; None for linears without padding and inputs of a kind not traced."""
        rule = self._padding.get(self._kind(state), {}).get(layer_name) if self._spec is not None else None
        if rule is None:
            return None
        i, at, rows = rule
        m = state[i]
        keep = kept_rows(m.reshape(m.shape[0], -1) != 0)
        out = torch.ones(keep.shape[0], rows, dtype=torch.bool, device=keep.device)
        out[:, at:at + keep.shape[1]] = keep
        return out

    def segment_of(self, layer_name: str) -> int:
        if self._order is None:
            raise RuntimeError(f"check(inputs) first: the cut of this {type(self.model).__name__} is traced there")
        if layer_name not in self._segment:
            raise ValueError(f"{layer_name} did not run in the traced call of {type(self.model).__name__}")
        return self._segment[layer_name]

    def tie(self, layer_name: str) -> str | None:
        """Linears of one module that read the very same input tensor in the traced call, searched as one leaf."""
        if self._order is None:
            raise RuntimeError(f"check(inputs) first: the cut of this {type(self.model).__name__} is traced there")
        return self._ties.get(layer_name)
