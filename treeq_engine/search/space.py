"""The search space: which linears are searched (the leaves, in forward order), their candidate configs, and
the fixed config of every other quantizable linear.

    space = SearchSpace.build(model, calib_inputs)                 # block linears searched, the rest at W8A8
    plan  = space.plan(assignment)                                 # one candidate index per leaf -> QuantPlan

A leaf records its weight shape ``(N, K)`` and the rows per sample it multiplies (``tokens``: 256 for a
DiT-XL/2 block linear, 1 for adaLN), measured with hooks on one forward; costs weight by ``N·K`` (weight bits)
and by ``tokens·N·K`` MACs (activation bits).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn

from ..format import ACT_BITS, WEIGHT_BITS
from ..nn import quantizable_linears
from ..nn.pointwise import layer_dims
from ..nn.quant_pointwise import channels_last_rows
from ..plan import SHAPES_KEY, LayerConfig, PlanError, QuantPlan, is_block_layer

DEFAULT_W_BITS: tuple[int, ...] = (2, 3, 4, 8)
DEFAULT_A_BITS: tuple[int, ...] = (3, 4, 8)


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One linear: weight ``(N, K)``, ``tokens`` rows per sample, ``bias`` present or not; with ``members``, the
    linears tied to it (reading the same input, e.g. diffusers' separate to_q/to_k/to_v), which take its config:
    one searched unit whose costs are the sum of its parts."""

    name: str
    n: int
    k: int
    tokens: int
    bias: bool = True
    members: tuple["Leaf", ...] = ()

    @property
    def parts(self) -> tuple["Leaf", ...]:
        """Each linear of the unit, as a leaf of its own."""
        return (dataclasses.replace(self, members=()),) + self.members if self.members else (self,)

    @property
    def layer_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.parts)

    @property
    def params(self) -> int:
        return sum(p.n * p.k for p in self.parts)

    @property
    def macs(self) -> int:
        """Multiply-accumulates per sample."""
        return sum(p.tokens * p.n * p.k for p in self.parts)


def candidate_configs(w_bits: Iterable[int] = DEFAULT_W_BITS, a_bits: Iterable[int] = DEFAULT_A_BITS,
                      template: LayerConfig | None = None) -> tuple[LayerConfig, ...]:
    """Every ``(w, a)`` pair, weights major; other fields (symmetry, clipping, branch) from ``template``. A 16-bit
    weight pairs only with 16-bit activations and no branch (the runtime keeps such a layer an unquantized
    ``nn.Linear``; W16A8 would be searched but could not be packed)."""
    w_bits, a_bits = tuple(w_bits), tuple(a_bits)
    for what, bits, allowed in (("weight", w_bits, WEIGHT_BITS), ("activation", a_bits, ACT_BITS)):
        if not bits:
            raise PlanError(f"no candidate {what} bit-widths given")
        bad = [b for b in bits if b not in allowed + (16,)]
        if bad:
            raise PlanError(f"candidate {what} bit-width(s) {bad} are not in the format: expected {allowed} or 16")
        if len(set(bits)) != len(bits):
            raise PlanError(f"candidate {what} bit-widths repeat: {bits}")
    base = template or LayerConfig(8, 8)
    # W16 weights run as the model's own unquantized nn.Linear: only W16A16 without a branch has a packed form
    out = tuple(base.replace(w_bits=w, a_bits=a) for w in w_bits for a in a_bits
                if w != 16 or (a == 16 and base.branch is None))
    if not out:
        raise PlanError(f"no runnable candidate among W{w_bits} x A{a_bits}: 16-bit weights pair only with 16-bit "
                        "activations and no branch")
    return out


def parse_bits(text: str, what: str) -> tuple[int, ...]:
    """``"2,3,4,8"`` -> ``(2, 3, 4, 8)``, with a clear error."""
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise PlanError(f"{what} must be comma-separated integers, got {text!r}") from None


@dataclasses.dataclass(frozen=True)
class SearchSpace:
    """Leaves (searched, forward order), their shared candidates, and the fixed layers."""

    leaves: tuple[Leaf, ...]
    candidates: tuple[LayerConfig, ...]
    fixed: tuple[tuple[Leaf, LayerConfig | None], ...] = ()
    other_params: int = 0          # parameters outside every linear (embeddings, norms): bf16 in byte counts
    model: str = ""

    def __post_init__(self) -> None:
        if not self.leaves:
            raise PlanError("the search space has no leaves: no linear matched the layer selection")
        if not self.candidates:
            raise PlanError("the search space has no candidate configs")
        names = [n for leaf in self.leaves for n in leaf.layer_names] + [leaf.name for leaf, _ in self.fixed]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise PlanError(f"layers listed twice in the search space: {dup[:5]}")
        if len(set(self.candidates)) != len(self.candidates):
            raise PlanError("candidate configs repeat")

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def build(cls, model: nn.Module, example_inputs: Sequence[Any], *,
              include: Callable[[str], bool] | str | None = None,
              candidates: Sequence[LayerConfig] | None = None,
              fixed_config: LayerConfig | None = LayerConfig(8, 8), model_name: str = "",
              forward: Callable[..., Any] | None = None,
              tie: Callable[[str], str | None] | None = None) -> "SearchSpace":
        """Enumerate the linears of ``model`` in the order one forward on ``example_inputs`` (a batch of
        calibration inputs) calls them. ``include`` picks the searched ones (a predicate or a regular expression
        matched with ``re.search``; default: the transformer-block linears); every other linear is fixed at
        ``fixed_config`` (``None``: full precision). ``forward`` runs that forward (default: ``model``; the
        search passes its segment runner's, so the space is what the runner runs). ``tie`` maps a searched
        linear to a group key (``None``: its own leaf): the linears of one key are one leaf, named by the first to
        run, and must read inputs of one shape (in features, rows per sample)."""
        if isinstance(include, str):
            try:
                pattern = re.compile(include)
            except re.error as e:
                raise PlanError(f"the searched-layer pattern {include!r} is not a regular expression: {e}") from None
            include = lambda n: pattern.search(n) is not None  # noqa: E731
        include = include or is_block_layer
        names = quantizable_linears(model)
        batch = int(example_inputs[0].shape[0])
        rows: dict[str, int] = {}

        def count(name: str) -> Callable[..., None]:
            def hook(module: nn.Module, args: tuple) -> None:   # a pre-hook must return None (else: new input)
                x = channels_last_rows(module, args[0])   # (a pointwise convolution's tokens are its positions)
                rows.setdefault(name, x.numel() // x.shape[-1])
            return hook

        hooks = [model.get_submodule(n).register_forward_pre_hook(count(n)) for n in names]
        try:
            with torch.no_grad():   # shapes only: no activations kept for a backward
                (forward or model)(*example_inputs)
        finally:
            for h in hooks:
                h.remove()
        order = list(rows)   # first-call order
        unreached = [n for n in names if n not in rows]
        if unreached:
            raise PlanError(f"{len(unreached)} linear(s) never ran in a forward pass, e.g. {unreached[:3]}")

        def leaf(n: str, searched: bool = True) -> Leaf:
            m = model.get_submodule(n)
            if rows[n] % batch and searched:
                raise PlanError(f"layer {n!r} saw {rows[n]} rows for a batch of {batch}: not a whole number per sample")
            k, out = layer_dims(m)
            # (a fixed layer may read the samples' rows concatenated, each of its own length, as Z-Image's caption
            # embedder does: its cost takes their mean, rounded up)
            return Leaf(n, out, k, -(-rows[n] // batch), m.bias is not None)

        leaves = tuple(leaf(n) for n in order if include(n))
        if tie is not None:
            leaves = _tie(leaves, tie)
        fixed = tuple((leaf(n, searched=False), fixed_config) for n in order if not include(n))
        in_linear = {id(p) for n in names for p in model.get_submodule(n).parameters(recurse=False)}
        other = sum(p.numel() for p in model.parameters() if id(p) not in in_linear)
        return cls(leaves, tuple(candidates) if candidates is not None else candidate_configs(),
                   fixed, other, model_name)

    # -- plans -----------------------------------------------------------------------------------
    @property
    def names(self) -> tuple[str, ...]:
        return tuple(leaf.name for leaf in self.leaves)

    def index_of(self, config: LayerConfig) -> int:
        try:
            return self.candidates.index(config)
        except ValueError:
            raise PlanError(f"config {config.label} is not a candidate of this search space "
                            f"({[c.label for c in self.candidates]})") from None

    def check_assignment(self, assignment: Sequence[int] | np.ndarray) -> np.ndarray:
        a = np.asarray(assignment, dtype=np.int64)
        if a.shape != (len(self.leaves),):
            raise PlanError(f"an assignment has one candidate index per leaf ({len(self.leaves)}), got shape {a.shape}")
        if a.size and (a.min() < 0 or a.max() >= len(self.candidates)):
            raise PlanError(f"candidate indices must be in [0, {len(self.candidates)}), got {a.min()}..{a.max()}")
        return a

    def plan(self, assignment: Sequence[int] | np.ndarray, meta: Mapping[str, Any] | None = None) -> QuantPlan:
        """The QuantPlan: searched layers at their candidates, fixed layers at theirs, in forward order."""
        a = self.check_assignment(assignment)
        layers = {n: self.candidates[i] for leaf, i in zip(self.leaves, a) for n in leaf.layer_names}
        layers.update({leaf.name: cfg for leaf, cfg in self.fixed if cfg is not None})
        shapes = {p.name: [p.k, p.n] for leaf in (*self.leaves, *(f for f, _ in self.fixed)) for p in leaf.parts}
        return QuantPlan(layers, model=self.model,
                         meta={**(meta or {}), SHAPES_KEY: {n: shapes[n] for n in layers if n in shapes}})

    def uniform(self, config: LayerConfig) -> np.ndarray:
        return np.full(len(self.leaves), self.index_of(config), dtype=np.int64)

    def assignment(self, plan: QuantPlan) -> np.ndarray:
        """A plan's candidate indices; the plan must name every leaf with a candidate config."""
        missing = [n for leaf in self.leaves for n in leaf.layer_names if n not in plan.layers]
        if missing:
            raise PlanError(f"the plan leaves {len(missing)} searched layer(s) unset, e.g. {missing[:3]}")
        split = [(leaf.name, n) for leaf in self.leaves for n in leaf.layer_names[1:]
                 if plan.layers[n] != plan.layers[leaf.name]]
        if split:
            raise PlanError(f"tied layers must share one config (the search treats them as one unit): {split[0][1]} "
                            f"is {plan.layers[split[0][1]].label}, {split[0][0]} {plan.layers[split[0][0]].label} "
                            "(a plan searched with --untie is checked with --untie)")
        return np.array([self.index_of(plan.layers[n]) for n in self.names], dtype=np.int64)

    def fingerprint(self) -> dict[str, Any]:
        """What a resumed search must agree on."""
        return {"leaves": [dataclasses.astuple(leaf)[:5] + ((dataclasses.astuple(leaf)[5],) if leaf.members else ())
                           for leaf in self.leaves],
                "candidates": [c.to_dict() for c in self.candidates],
                "fixed": [[leaf.name, None if c is None else c.to_dict()] for leaf, c in self.fixed]}


def _tie(leaves: tuple[Leaf, ...], key: Callable[[str], str | None]) -> tuple[Leaf, ...]:
    """Leaves of one ``key`` merged into the first of them (its position in the order)."""
    first: dict[str, int] = {}
    out: list[Leaf] = []
    for leaf in leaves:
        k = key(leaf.name)
        if k is None:
            out.append(leaf)
            continue
        if k not in first:
            first[k] = len(out)
            out.append(leaf)
            continue
        head = out[first[k]]
        if (leaf.k, leaf.tokens) != (head.k, head.tokens):
            raise PlanError(f"tied layers {head.name} and {leaf.name} read different inputs ({head.k} features x "
                            f"{head.tokens} rows against {leaf.k} x {leaf.tokens})")
        out[first[k]] = dataclasses.replace(head, members=head.members + (leaf,))
    return tuple(out)
