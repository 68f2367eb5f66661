"""Costs and budgets: what a plan spends, per leaf and in total.

Every cost is a sum of per-leaf terms plus a constant, so a node's cost is the sum of its leaves' and a merged
candidate costs ``cost(A) + cost(B)``. Kinds (``Budget.kind``):

==========  ==========================================================  =========================
kind        total                                                        budget text
==========  ==========================================================  =========================
``w``       average weight bits, weighted by parameters ``N·K``          ``W4``, ``W3.5``
``a``       average activation bits, weighted by MACs ``tokens·N·K``     ``A4``
``wa``      both at once (a plan labelled WxAy satisfies both)           ``W4A4``, ``W3.5A4``
``bytes``   model bytes: packed weights + scales + branches + the rest   ``12MB``, ``3.5MiB``, ``800kB``
``latency`` summed µs of the searched linears (lookup table/roofline)    ``350us``, ``1.2ms``
==========  ==========================================================  =========================

Averages are over the searched leaves only: the fixed layers (embedders, final layer, W8A8 by default) are
outside the budget, as in the mixed-precision literature's "average bits of the quantized layers".

Model bytes count what an artifact stores: the packed weight (layout v1, ``packed_shape``), per output channel a
float32 scale, an int32 zero point and an int32 column sum (``PackedWeight``), a bf16 bias, a bf16 Monarch
branch (``MonarchShape.params``); a bf16 (16-bit) weight is 2 bytes per element. The fixed layers are counted at
their configs and every other parameter (embeddings, norms, positional table) at 2 bytes.

Latency comes from a lookup table written by the runtime's profiler (``LatencyTable``; JSON schema
``treeq-latency-lut`` v1 below) or, without one, from a roofline estimate (``roofline_us``). The table's rows are
``(K, N, tokens, w_bits, a_bits, branch) -> µs`` for one GEMM, ``tokens`` being the GEMM's M (the leaf's rows
per sample times the serving batch):

```json
{"schema": "treeq-latency-lut", "version": 1, "device": "NVIDIA H100 80GB HBM3", "backend": "cuda",
 "entries": [{"k": 1152, "n": 3456, "tokens": 512, "w_bits": 4, "a_bits": 4, "branch": null, "us": 9.8},
             {"k": 1152, "n": 3456, "tokens": 512, "w_bits": 4, "a_bits": 4,
              "branch": {"kind": "monarch", "blocks": 32, "rank": 1}, "us": 12.1}]}
```

A missing ``tokens`` is interpolated linearly between the nearest entries of the same (K, N, bits, branch);
anything else missing is an error naming the key. Shapes, tokens and bits are positive integers, ``us`` a positive
finite number, and entries that repeat a (K, N, tokens, bits, branch) must repeat its ``us`` too.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence, cast

import numpy as np

from ..branches import branch_params
from ..format import packed_dtype, packed_shape
from ..plan import BranchConfig, LayerConfig, PlanError
from .space import Leaf, SearchSpace

COST_KINDS = ("w", "a", "wa", "bytes", "latency")
DIMS = {"w": ("w_bits",), "a": ("a_bits",), "wa": ("w_bits", "a_bits"), "bytes": ("bytes",), "latency": ("us",)}

LUT_SCHEMA = "treeq-latency-lut"
LUT_VERSION = 1

# Roofline constants: H100 SXM dense int8 tensor-core throughput, HBM3 bandwidth, and a per-GEMM floor for the
# launch and the epilogue's tail (CUDA graphs remove most launch overhead; a few µs remain per kernel).
ROOFLINE_OPS_PER_S = 1979e12
ROOFLINE_BYTES_PER_S = 3.35e12
ROOFLINE_FLOOR_US = 3.0


class BudgetError(PlanError):
    """A plan that spends more than its budget, or a budget no plan can meet."""


# -- budgets ---------------------------------------------------------------------------------------
_UNITS = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30}
_TIME = {"us": 1.0, "µs": 1.0, "ms": 1e3, "s": 1e6}
_NUM = r"(\d+(?:\.\d*)?|\.\d+)"


@dataclasses.dataclass(frozen=True)
class Budget:
    """A limit per cost dimension: ``kind`` in ``COST_KINDS``, ``limits`` in the units of ``DIMS[kind]``."""

    kind: str
    limits: tuple[float, ...]

    def __post_init__(self) -> None:
        if self.kind not in COST_KINDS:
            raise BudgetError(f"budget kind must be one of {COST_KINDS}, got {self.kind!r}")
        limits = tuple(float(v) for v in self.limits)
        if len(limits) != len(DIMS[self.kind]):
            raise BudgetError(f"a {self.kind!r} budget has {len(DIMS[self.kind])} limit(s), got {limits}")
        if not all(math.isfinite(v) and v > 0 for v in limits):
            raise BudgetError(f"budget limits must be positive and finite, got {limits}")
        object.__setattr__(self, "limits", limits)

    @classmethod
    def parse(cls, text: str) -> "Budget":
        """``W4A4``, ``W3.5``, ``A4``, ``12MB``/``3.5MiB``/``800kB``/``123456B``, ``350us``/``1.2ms``."""
        t = text.strip()
        m = re.fullmatch(rf"[wW]{_NUM}[aA]{_NUM}", t)
        if m:
            return cls("wa", (float(m[1]), float(m[2])))
        m = re.fullmatch(rf"([wWaA]){_NUM}", t)
        if m:
            return cls(m[1].lower(), (float(m[2]),))
        m = re.fullmatch(rf"{_NUM}\s*([a-zA-Zµ]+)", t)
        if m and m[2].lower() in _UNITS:
            return cls("bytes", (float(m[1]) * _UNITS[m[2].lower()],))
        if m and m[2].lower() in _TIME:
            return cls("latency", (float(m[1]) * _TIME[m[2].lower()],))
        raise BudgetError(f"cannot read budget {text!r}: expected e.g. W4A4, W3.5, A4, 12MB, 3.5MiB, 350us, 1.2ms")

    @property
    def label(self) -> str:
        if self.kind == "wa":
            return f"W{self.limits[0]:g}A{self.limits[1]:g}"
        if self.kind in ("w", "a"):
            return f"{self.kind.upper()}{self.limits[0]:g}"
        if self.kind == "bytes":
            return f"{self.limits[0] / 1e6:g}MB"
        return f"{self.limits[0]:g}us"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "limits": list(self.limits), "label": self.label}


# -- per-layer terms -------------------------------------------------------------------------------
def linear_bytes(leaf: Leaf, cfg: LayerConfig | None) -> int:
    """Bytes an artifact stores for one linear (each linear of a tied leaf) at ``cfg`` (``None``: bf16 weights)."""
    if leaf.members:
        return sum(linear_bytes(p, cfg) for p in leaf.parts)
    n, k = leaf.n, leaf.k
    total = 2 * n if leaf.bias else 0
    if cfg is None or cfg.w_bits == 16:
        total += 2 * n * k
    else:
        rows, cols = packed_shape(n, k, cfg.w_bits)
        total += rows * cols * packed_dtype(cfg.w_bits).itemsize + 12 * n   # + scale f32, zp i32, col_sum i32
    if cfg is not None and cfg.branch is not None:
        total += 2 * branch_params(cfg.branch, leaf.n, leaf.k)
    return total


def roofline_us(k: int, n: int, tokens: int, w_bits: int, a_bits: int, branch: BranchConfig | None = None) -> float:
    """Roofline estimate of one quantized GEMM ``(tokens, K) x (N, K)ᵀ`` on an H100 SXM.

    ``max(ops / 1979 TOPS, bytes / 3.35 TB/s) + 3 µs``: every format runs on the int8 tensor-core path (low-bit
    weights unpack to int8 in registers), so ops do not depend on the bit-widths; bytes do: the packed weight
    (``w_bits/8`` per element), the activation codes (``a_bits/8``), the bf16 output, and a bf16 branch with its
    two GEMMs. 16-bit operands count 2 bytes and bf16 tensor-core rate (half of int8)."""
    ops = 2.0 * tokens * n * k
    rate = ROOFLINE_OPS_PER_S if max(w_bits, a_bits) <= 8 else ROOFLINE_OPS_PER_S / 2
    nbytes = n * k * w_bits / 8 + tokens * k * a_bits / 8 + tokens * n * 2 + n * 12
    if branch is not None:
        p = branch_params(branch, n, k)
        ops_b = 2.0 * tokens * p
        ops += ops_b * 2      # the branch runs in bf16: half rate, counted as twice the int8 ops
        nbytes += 2 * p
    return max(ops / rate, nbytes / ROOFLINE_BYTES_PER_S) * 1e6 + ROOFLINE_FLOOR_US


def _branch_key(b: BranchConfig | Mapping[str, Any] | None) -> tuple | None:
    if b is None:
        return None
    if isinstance(b, Mapping):
        try:
            b = BranchConfig(**b)
        except TypeError as e:   # an unknown field (b is still the mapping: the assignment did not happen)
            raise PlanError(f"branch {dict(cast(Mapping[str, Any], b))} is not a branch config ({e})") from None
    if not isinstance(b, BranchConfig):
        raise PlanError(f"branch must be null or an object with kind, blocks and rank, got {b!r}")
    return (b.kind, b.blocks, b.rank)


_LUT_FIELDS = ("k", "n", "tokens", "w_bits", "a_bits", "us")   # and "branch", null when absent


def _lut_int(v: Any) -> int | None:
    """``v`` as a positive int, or None: an integral float (64.0) is exact, but a fractional one (64.9) or a bool
    is not a shape or a bit-width, and ``int()`` would truncate it silently."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v != int(v) or v <= 0:
        return None
    return int(v)


class LatencyTable:
    """Measured µs per ``(K, N, tokens, w_bits, a_bits, branch)`` (see the module docstring for the file)."""

    def __init__(self, entries: Sequence[Mapping[str, Any]], device: str = "", source: str = "",
                 backend: str = "") -> None:
        self.device, self.source, self.backend = device, source, backend
        self._rows: dict[tuple, list[tuple[int, float]]] = {}
        seen: dict[tuple, tuple[int, float]] = {}   # (key, tokens) -> (the entry that gave it, its µs)
        for i, e in enumerate(entries):
            where = f"latency table {source} entry {i}" if source else f"latency table entry {i}"
            if not isinstance(e, Mapping):
                raise PlanError(f"{where} is malformed: expected an object with {', '.join(_LUT_FIELDS)} and "
                                f"branch, got {e!r:.200}")
            missing = [f for f in _LUT_FIELDS if f not in e]
            if missing:
                raise PlanError(f"{where} is malformed: it lacks {missing}: {dict(e)}")
            bad = [f"'{f}' must be a positive integer, got {e[f]!r}" for f in _LUT_FIELDS[:-1]
                   if _lut_int(e[f]) is None]
            us = e["us"]
            # the comparison is exact for ints too: a huge JSON int fails here instead of overflowing float()
            if isinstance(us, bool) or not isinstance(us, (int, float)) or not 0 < us <= sys.float_info.max:
                bad.append(f"'us' must be a finite positive number, got {us!r}")
            if bad:
                raise PlanError(f"{where}: " + "; ".join(bad))
            try:
                branch = _branch_key(e.get("branch"))
            except PlanError as err:
                raise PlanError(f"{where}: {err}") from None
            k, n, tokens, w_bits, a_bits = (_lut_int(e[f]) for f in _LUT_FIELDS[:-1])
            key = (k, n, w_bits, a_bits, branch)
            if (key, tokens) in seen:   # a repeat of the same timing (one per layer of a shape) is harmless; two
                j, first = seen[key, tokens]   # timings of one GEMM leave unknown which one the search should use
                if first == float(us):
                    continue
                raise PlanError(f"{where} times K={k}, N={n}, tokens={tokens}, W{w_bits}A{a_bits}, branch={branch} "
                                f"at {us} us, but entry {j} already does at {first} us: keep one")
            seen[key, tokens] = (i, float(us))
            assert tokens is not None   # (every field is a positive int: bad was empty)
            self._rows.setdefault(key, []).append((tokens, float(us)))
        for rows in self._rows.values():
            rows.sort()

    @classmethod
    def load(cls, path: str | Path) -> "LatencyTable":
        try:
            d = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise PlanError(f"cannot read latency table {path}: {e}") from None
        if not isinstance(d, Mapping) or d.get("schema") != LUT_SCHEMA:
            raise PlanError(f"{path} is not a latency table (schema {LUT_SCHEMA!r} expected)")
        if d.get("version") != LUT_VERSION:
            raise PlanError(f"{path}: latency table version {d.get('version')!r} is not supported "
                            f"(this build reads {LUT_VERSION})")
        if not isinstance(d.get("entries"), list):
            raise PlanError(f"{path}: 'entries' must be a list")
        return cls(d["entries"], device=str(d.get("device", "")), source=str(path), backend=str(d.get("backend", "")))

    def check_device(self) -> None:
        """Warn when the table was measured on another kind of GPU than this machine's (its µs would mislead the
        budget) or on a CPU while a GPU is here."""
        import warnings

        import torch

        if not torch.cuda.is_available() or not self.device:
            return
        here = torch.cuda.get_device_name()
        if self.device != here:
            warnings.warn(f"latency table {self.source} was measured on {self.device!r} ({self.backend or '?'} "
                          f"backend), this machine has {here!r}: profile here (`treeq profile`) for a budget that "
                          "means what it says", stacklevel=2)

    def lookup(self, k: int, n: int, tokens: int, w_bits: int, a_bits: int,
               branch: BranchConfig | None = None) -> float:
        key = (k, n, w_bits, a_bits, _branch_key(branch))
        rows = self._rows.get(key)
        if not rows:
            raise PlanError(f"latency table {self.source} has no entry for K={k}, N={n}, W{w_bits}A{a_bits}, "
                            f"branch={key[-1]}; profile that shape or use the roofline estimate")
        toks = [r[0] for r in rows]
        i = int(np.searchsorted(toks, tokens))
        if i < len(rows) and toks[i] == tokens:
            return rows[i][1]
        if i == 0 or i == len(rows):
            raise PlanError(f"latency table {self.source}: tokens={tokens} is outside the profiled range "
                            f"[{toks[0]}, {toks[-1]}] for K={k}, N={n}, W{w_bits}A{a_bits}; profile the serving "
                            "batch too (`treeq profile --batch 1,8,...`) or search at a profiled --serve-batch")
        (t0, u0), (t1, u1) = rows[i - 1], rows[i]
        return u0 + (u1 - u0) * (tokens - t0) / (t1 - t0)


# -- the cost model --------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class CostModel:
    """``total(assignment) = offset + Σ_i table[i, assignment[i]]``; ``table`` is ``(n_leaves, n_cands, d)``."""

    kind: str
    table: np.ndarray
    offset: np.ndarray
    share: np.ndarray | None = None      # (n_leaves, d) for the average-bit kinds: each leaf's weight in the average
    source: str = ""                     # where latency costs come from (a table, or the roofline estimate)

    @property
    def dims(self) -> tuple[str, ...]:
        return DIMS[self.kind]

    def leaf_costs(self, lo: int, hi: int, assignments: np.ndarray) -> np.ndarray:
        """Costs ``(m, d)`` of leaves ``[lo, hi)`` at ``assignments (m, hi − lo)`` (no offset)."""
        idx = np.arange(lo, hi)[None, :]
        return self.table[idx, assignments].sum(axis=1)

    def total(self, assignment: Sequence[int] | np.ndarray) -> np.ndarray:
        a = np.asarray(assignment)
        return self.offset + self.leaf_costs(0, len(a), a[None])[0]

    def axis(self, cost: np.ndarray, budget: Budget | None = None, span: tuple[int, int] | None = None
             ) -> np.ndarray:
        """The one axis the Pareto drop thins along, ``(..., d) -> (...)``: the cost itself for one dimension.
        For WxAy: the budget use of the binding dimension, ``max_d cost_d / limit_d`` (1 = exactly at the
        budget), so that at the root ``axis <= 1`` is the same as meeting the budget. ``cost`` is a whole plan's
        total (offset included) when ``span`` is None; for a node's leaves ``span = (lo, hi)`` each limit is
        scaled by the node's share of that average (its parameters for W, its MACs for A), so the axis reads
        "this node's average bits over the budget's". An earlier mean over the dimensions ((W + A)/2, the paper's
        single "Avg Bits") let a plan buy A8 layers with W2 layers at equal axis, and the root kept few plans
        that met both limits: TSS ended at W2.84A3.97 below IP's W4.00A4.00 (``docs/search.md``). Without a
        budget the limits are taken as 1."""
        cost = np.asarray(cost, dtype=np.float64)
        if cost.shape[-1] == 1:
            return cost[..., 0]
        lim = np.asarray(budget.limits if budget is not None else np.ones(cost.shape[-1]), dtype=np.float64)
        ref = lim if span is None or self.share is None else lim * self.share[span[0]:span[1]].sum(axis=0)
        return (cost / ref).max(axis=-1)

    def min_costs(self) -> np.ndarray:
        """``(n_leaves, d)``: each leaf's cheapest candidate, per dimension."""
        return self.table.min(axis=1)

    def fits(self, cost: np.ndarray, budget: Budget, tol: float = 1e-9) -> np.ndarray:
        """Which totals ``(..., d)`` meet ``budget`` (a small relative tolerance absorbs float sums)."""
        if budget.kind != self.kind:
            raise BudgetError(f"a {budget.kind!r} budget cannot judge {self.kind!r} costs")
        lim = np.asarray(budget.limits)
        return np.all(cost <= lim * (1 + tol), axis=-1)


def cost_model(space: SearchSpace, kind: str, *, latency_table: LatencyTable | None = None,
               serve_batch: int = 1) -> CostModel:
    """The per-leaf cost table of ``space`` for one kind. ``serve_batch`` multiplies every leaf's rows per
    sample to give the GEMM's M for latency (e.g. 2 with classifier-free guidance)."""
    if kind not in COST_KINDS:
        raise BudgetError(f"cost kind must be one of {COST_KINDS}, got {kind!r}")
    leaves, cands = space.leaves, space.candidates
    w = np.array([[c.w_bits for c in cands]], dtype=np.float64)
    a = np.array([[c.a_bits for c in cands]], dtype=np.float64)
    params = np.array([[leaf.params] for leaf in leaves], dtype=np.float64)
    macs = np.array([[leaf.macs] for leaf in leaves], dtype=np.float64)
    share = None
    if kind == "w":
        table = (params * w / params.sum())[..., None]
    elif kind == "a":
        table = (macs * a / macs.sum())[..., None]
    elif kind == "wa":
        table = np.stack([params * w / params.sum(), macs * a / macs.sum()], axis=-1)
        share = np.concatenate([params / params.sum(), macs / macs.sum()], axis=1)
    elif kind == "bytes":
        table = np.array([[linear_bytes(leaf, c) for c in cands] for leaf in leaves], dtype=np.float64)[..., None]
    else:
        def us(leaf: Leaf, c: LayerConfig) -> float:
            if leaf.members:   # the runtime runs each tied linear as its own GEMM
                return sum(us(p, c) for p in leaf.parts)
            m = leaf.tokens * serve_batch
            if latency_table is not None:
                return latency_table.lookup(leaf.k, leaf.n, m, c.w_bits, c.a_bits, c.branch)
            return roofline_us(leaf.k, leaf.n, m, c.w_bits, c.a_bits, c.branch)
        table = np.array([[us(leaf, c) for c in cands] for leaf in leaves], dtype=np.float64)[..., None]
    offset = np.zeros(table.shape[-1])
    if kind == "bytes":
        offset[0] = sum(linear_bytes(leaf, c) for leaf, c in space.fixed) + 2 * space.other_params
    source = ""
    if kind == "latency":
        source = (f"latency table {latency_table.source} ({latency_table.device})" if latency_table is not None
                  else "the H100 roofline estimate (no latency table: `treeq profile` measures one)")
    return CostModel(kind, np.ascontiguousarray(table), offset, share, source)


def describe(space: SearchSpace, assignment: Sequence[int] | np.ndarray, *,
             latency_table: LatencyTable | None = None, serve_batch: int = 1) -> dict[str, float]:
    """Every cost of one plan, for reports: average W and A bits, bytes, latency."""
    a = space.check_assignment(assignment)
    out = {}
    for kind in ("w", "a", "bytes", "latency"):
        cm = cost_model(space, kind, latency_table=latency_table, serve_batch=serve_batch)
        out[DIMS[kind][0]] = float(cm.total(a)[0])
    return out


def check_budget(space: SearchSpace, assignment: Sequence[int] | np.ndarray, budget: Budget, *,
                 latency_table: LatencyTable | None = None, serve_batch: int = 1) -> None:
    """Raise :class:`BudgetError` naming every dimension the plan overspends."""
    cm = cost_model(space, budget.kind, latency_table=latency_table, serve_batch=serve_batch)
    total = cm.total(space.check_assignment(assignment))
    over = [f"{d} = {v:.6g} > {lim:g}" for d, v, lim in zip(cm.dims, total, budget.limits) if v > lim * (1 + 1e-9)]
    if over:
        raise BudgetError(f"plan violates the budget {budget.label}: " + "; ".join(over))


def environment_config(space: SearchSpace, budget: Budget, cost: CostModel | None = None) -> LayerConfig:
    """ENG's environment for a budget: the uniform candidate config with the most bits (W + A, then W) that
    meets it: W4A8 for a weights-only W4 budget, W8A4 for A4. By bits, not by cost: a measured latency table
    need not grow with the bits (a 2-bit unpack can be slower than a 4-bit one), and the environment stands for
    the precision the budget affords."""
    cost = cost or cost_model(space, budget.kind)
    best, best_key = None, None
    for c in space.candidates:
        total = cost.total(space.uniform(c))
        if not cost.fits(total, budget):
            continue
        key = (c.w_bits + c.a_bits, c.w_bits, float(np.sum(total / np.asarray(budget.limits))))
        if best_key is None or key > best_key:
            best, best_key = c, key
    if best is None:
        floor = cost.offset + cost.min_costs().sum(axis=0)
        if not cost.fits(floor, budget):
            by = f" by {cost.source}" if cost.source else ""
            raise BudgetError(f"no plan meets the budget {budget.label}: the cheapest plan costs "
                              + ", ".join(f"{float(v):.4g} {d}" for v, d in zip(floor, cost.dims)) + by)
        raise BudgetError(f"no uniform candidate config meets the budget {budget.label}; give ENG's environment "
                          "config explicitly")
    return best
