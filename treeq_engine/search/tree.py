"""Tree-Structured Search (TSS): a bottom-up binary tree over adjacent leaves with a Pareto drop at each merge.

    level 0   the leaves, each holding its candidate configs (scored and dropped to K only if it has more)
    level l   adjacent nodes merge pairwise, (n_0 n_1), (n_2 n_3), …; an odd last node is carried up unscored.
              A merge scores the Cartesian product of its children's kept configs (≤ K·K) by the joint
              end-to-end MSE (the node's layers at the candidate, everything else at ENG's environment) and by
              cost (the children's costs added), and keeps K by ``pareto_drop``.
    root      every plan scored at the last merge is a whole plan; their non-dominated set (in every cost
              dimension and MSE) is the result's ``front``: the best plan for any budget of the cost's kind is
              its lowest-MSE point that meets it (``SearchResult.best``).

With a budget, a candidate that cannot meet it even with every other leaf at its cheapest config is dropped
before scoring (exact: it has no feasible completion), so the K slots go to configs that can still be used.
Each node also always keeps its slice of the *elite* plans: the environment-uniform plan (every leaf at ENG's
environment config, when that is a candidate), so that at λ = 1 the search cannot end worse than uniform, and any
warm-start plans passed as ``elites`` (for example the integer-programming baseline's): each reaches the root whole
and is scored there, so the search cannot end worse than it on its own metric either, while every merge may still
combine a slice of it with other configs.
Two-dimensional costs (WxAy) are thinned along ``CostModel.axis``: the binding dimension's budget use.

Evaluations: ``Σ |S_A|·|S_B|`` over the ``n − 1`` merges, at most ``(n − 1)·K²`` (with more elites than K, the
elites' count replaces K), plus ``n·C`` at level 0 when the leaves have more than K candidates. Each level's scoring is
independent across nodes and is sharded over processes (``distributed``). After every level the state (each
node's kept configs with their costs and MSEs) is written atomically to ``state_path`` as JSON; a search started
again with ``resume=True`` continues after the last finished level and gives the identical result.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
from tqdm.auto import tqdm

from ..calib.store import write_json   # atomic: a kill leaves the previous level's state or this one
from . import distributed
from .costs import Budget, BudgetError, CostModel
from .evaluator import Evaluator
from .pareto import nondominated_fronts, pareto_drop

STATE_SCHEMA = "treeq-tss-state"
STATE_VERSION = 1
FINGERPRINT_SCHEME = 2   # 2: exact integer content sums (calibration.tensor_summary); 1: float sums


@dataclasses.dataclass
class Node:
    """Leaves ``[lo, hi)`` with their kept configs ``(k, hi − lo)`` (candidate indices), costs ``(k, d)`` and
    MSEs ``(k,)`` (NaN where not scored)."""

    lo: int
    hi: int
    configs: np.ndarray
    cost: np.ndarray
    mse: np.ndarray

    def take(self, idx: np.ndarray) -> "Node":
        return Node(self.lo, self.hi, self.configs[idx], self.cost[idx], self.mse[idx])

    def to_dict(self) -> dict[str, Any]:
        return {"lo": self.lo, "hi": self.hi, "configs": self.configs.tolist(), "cost": self.cost.tolist(),
                "mse": [None if np.isnan(v) else float(v) for v in self.mse]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Node":
        mse = np.array([np.nan if v is None else v for v in d["mse"]], dtype=np.float64)
        return cls(int(d["lo"]), int(d["hi"]), np.array(d["configs"], dtype=np.int64).reshape(len(mse), -1),
                   np.array(d["cost"], dtype=np.float64).reshape(len(mse), -1), mse)


@dataclasses.dataclass
class SearchResult:
    """The root's front and the record of the search."""

    root: Node                            # the K plans kept at the root
    front: Node                           # the non-dominated plans among all scored at the last merge
    root_candidates: dict[str, Any]       # the last merge's scored product: axis cost, mse, kept (for the plot)
    levels: list[dict[str, Any]]          # per level: nodes, scored nodes, evaluations, wall_s
    evaluations: int
    wall_s: float
    keep: int
    cost_kind: str
    budget: Budget | None
    slots: int = 0                        # configs a node keeps: K, or the number of elites when that is larger
    candidates: int = 0                   # configs per leaf (scored at level 0 only when more than K)

    def best(self, budget: Budget, cost: CostModel) -> tuple[np.ndarray, np.ndarray, float]:
        """(assignment, total cost, MSE) of the lowest-MSE front plan meeting ``budget``."""
        total = cost.offset + self.front.cost
        ok = np.flatnonzero(cost.fits(total, budget))
        if not len(ok):
            raise BudgetError(f"no plan on the root's front meets {budget.label}; its costs span "
                              f"{total.min(axis=0).round(4).tolist()}..{total.max(axis=0).round(4).tolist()}")
        mse = np.where(np.isnan(self.front.mse[ok]), np.inf, self.front.mse[ok])
        i = int(ok[np.lexsort((ok, total[ok].sum(axis=1), mse))[0]])
        return self.front.configs[i], total[i], float(self.front.mse[i])

    @property
    def evaluation_bound(self) -> int:
        """``(n − 1)·K²`` for the merges, plus ``n·C`` when the leaves' ``C`` candidates are more than K (they are
        scored once to drop them to K) or when one leaf is the whole tree."""
        n, k = self.root.hi - self.root.lo, max(self.keep, self.slots)
        return (n - 1) * k ** 2 + (n * self.candidates if self.candidates > k or n == 1 else 0)


class RootScorer(Protocol):
    """Scores whole plans ``(m, n_leaves)`` -> ``(m,)`` (lower is better); ``tag`` says how, for resume."""

    tag: dict[str, Any]

    def __call__(self, assignments: np.ndarray) -> np.ndarray: ...


def _fingerprint(evaluator: Evaluator, cost: CostModel, keep: int, budget: Budget | None, anchor: bool,
                 root: dict[str, Any] | None = None, elites: np.ndarray | None = None) -> str:
    h = hashlib.sha256()
    doc = {"evaluator": evaluator.fingerprint(), "keep": keep, "cost": cost.kind, "anchor": anchor,
           "budget": None if budget is None else budget.to_dict()}
    if root is not None:   # absent otherwise, so that earlier state files still resume
        doc["root"] = root
    if elites is not None and len(elites):   # likewise
        doc["elites"] = np.asarray(elites).tolist()
    h.update(json.dumps(doc, sort_keys=True).encode())
    h.update(np.ascontiguousarray(cost.table).tobytes())
    return h.hexdigest()


class _Pruner:
    """Drops configs of leaves ``[lo, hi)`` that cannot meet the budget with every other leaf at its cheapest."""

    def __init__(self, cost: CostModel, budget: Budget | None) -> None:
        self.cost, self.budget = cost, budget
        mins = cost.min_costs()
        self.prefix = np.concatenate([np.zeros((1, mins.shape[1])), np.cumsum(mins, axis=0)])

    def __call__(self, lo: int, hi: int, node_cost: np.ndarray) -> np.ndarray:
        if self.budget is None:
            return np.ones(len(node_cost), dtype=bool)
        outside = self.prefix[-1] - (self.prefix[hi] - self.prefix[lo])
        return self.cost.fits(self.cost.offset + outside + node_cost, self.budget)


def _check_elites(elites: np.ndarray | None, n: int, n_cand: int, cost: CostModel,
                  budget: Budget | None) -> np.ndarray:
    """``elites`` as an ``(s, n)`` int64 array of distinct plans, each a valid assignment meeting ``budget``."""
    if elites is None:
        return np.zeros((0, n), dtype=np.int64)
    a = np.asarray(elites)
    if a.ndim == 1:
        a = a[None]
    if a.ndim != 2 or a.shape[1] != n or (a.size and not np.issubdtype(a.dtype, np.integer)):
        raise ValueError(f"elites must be integer plans of shape (s, {n}) (one candidate index per leaf), "
                         f"got shape {a.shape} and dtype {a.dtype}")
    a = a.astype(np.int64)
    if a.size and (a.min() < 0 or a.max() >= n_cand):
        raise ValueError(f"elite plans hold candidate indices outside [0, {n_cand})")
    if budget is not None:
        over = [i for i, p in enumerate(a) if not cost.fits(cost.total(p), budget)]
        if over:
            raise BudgetError(f"elite plan(s) {over} do not meet the budget {budget.label}")
    return np.unique(a, axis=0)   # sorted rows: the fingerprint does not depend on the order they were given in


def _no_plan(budget: Budget | None) -> BudgetError:
    return BudgetError(f"no plan meets the budget {budget.label if budget else ''}")


def _leaves(cost: CostModel, prune: _Pruner, n_cand: int) -> list[Node]:
    """Level 0's nodes: every leaf with its candidates that can still meet the budget."""
    nodes, every = [], np.arange(n_cand, dtype=np.int64)[:, None]
    for i in range(cost.table.shape[0]):
        node = Node(i, i + 1, every, cost.table[i].copy(), np.full(n_cand, np.nan))
        node = node.take(np.flatnonzero(prune(i, i + 1, node.cost)))
        if not len(node.mse):
            raise _no_plan(prune.budget)
        nodes.append(node)
    return nodes


def _merge(nodes: list[Node], prune: _Pruner) -> tuple[list[Node], list[int]]:
    """One level's nodes (pairs merged, an odd last node carried) and the indices of those to score."""
    merged: list[Node]
    merged, todo = [], []
    for j in range(0, len(nodes) - 1, 2):
        a, b = nodes[j], nodes[j + 1]
        ia, ib = np.divmod(np.arange(len(a.mse) * len(b.mse)), len(b.mse))       # the Cartesian product
        node = Node(a.lo, b.hi, np.concatenate([a.configs[ia], b.configs[ib]], axis=1), a.cost[ia] + b.cost[ib],
                    np.full(len(ia), np.nan))
        node = node.take(np.flatnonzero(prune(node.lo, node.hi, node.cost)))
        if not len(node.mse):
            raise _no_plan(prune.budget)
        todo.append(len(merged))
        merged.append(node)
    if len(nodes) % 2:
        merged.append(nodes[-1])
    return merged, todo


def _score(evaluator: Evaluator, nodes: list[Node], todo: list[int], bar: tqdm) -> int:
    """Fill ``mse`` of ``nodes[j]`` for ``j`` in ``todo``: fixed units of ``group`` rows, sharded over processes
    by estimated cost (rows × segments run), gathered exactly. Returns the number of evaluations."""
    rank, world = distributed.rank_world()
    g, segs = evaluator.group, evaluator.runner.num_segments
    units = [(j, s) for j in todo for s in range(0, len(nodes[j].mse), g)]
    owner = distributed.assign([float(len(nodes[j].mse[s:s + g]) * (segs - evaluator.leaf_segment[nodes[j].lo]))
                                for j, s in units], world)
    offsets = np.cumsum([0] + [len(nodes[j].mse) for j in todo])
    at = dict(zip(todo, offsets[:-1].tolist()))
    scores = np.zeros(int(offsets[-1]), dtype=np.float64)
    mine = [(j, s) for (j, s), r in zip(units, owner) if r == rank]
    bar.total += sum(len(nodes[j].mse[s:s + g]) for j, s in mine)
    bar.refresh()
    for j, s in mine:
        rows = nodes[j].configs[s:s + g]
        scores[at[j] + s: at[j] + s + len(rows)] = evaluator.evaluate(nodes[j].lo, nodes[j].hi, rows)
        bar.update(len(rows))
    scores = distributed.all_sum(scores)
    for j in todo:
        nodes[j].mse = scores[at[j]: at[j] + len(nodes[j].mse)]
        if len(nodes[j].mse) and np.isnan(nodes[j].mse).all():   # no config to prefer: the answer would be noise
            names = evaluator.space.leaves
            raise ValueError(f"every config of leaves {nodes[j].lo}..{nodes[j].hi - 1} ({names[nodes[j].lo].name} .. "
                             f"{names[nodes[j].hi - 1].name}) scored NaN: the quantized model's output is not finite "
                             "there (a float16 overflow, or weights holding NaN/Inf)")
    return len(scores)


def _score_root(scorer: RootScorer, node: Node, bar: tqdm) -> int:
    """The last merge scored by ``scorer`` on rank 0, its scores given to every process."""
    rank, _ = distributed.rank_world()
    scores = np.zeros(len(node.mse), dtype=np.float64)
    if rank == 0:
        bar.total += len(scores)
        bar.refresh()
        scores[:] = scorer(node.configs)
        bar.update(len(scores))
    node.mse = distributed.all_sum(scores)
    return len(scores)


def _spans(n: int, level: int, path: Path) -> list[tuple[int, int]]:
    """The leaves ``[lo, hi)`` of each node after ``level`` levels of ``n`` leaves (the pairing of ``_merge``)."""
    spans = [(i, i + 1) for i in range(n)]
    for _ in range(level):
        if len(spans) == 1:   # also bounds the loop for an absurd level
            raise ValueError(f"{path}: level {level} is past the root of a search over {n} leaves; the state is "
                             "damaged or edited: remove it or start without --resume")
        merged = [(spans[j][0], spans[j + 1][1]) for j in range(0, len(spans) - 1, 2)]
        spans = merged + spans[-1:] if len(spans) % 2 else merged
    return spans


def _state_array(value: Any, kinds: str, shape: tuple[int, int], where: str) -> np.ndarray:
    """``value`` as an array of one of the dtype ``kinds`` (``"i"``: integers, ``"if"``: numbers) and ``shape``."""
    try:
        a = np.array(value)
    except ValueError:   # ragged rows
        a = None
    if a is None or a.shape != shape or a.dtype.kind not in kinds:
        got = "ragged rows" if a is None else f"shape {a.shape} of {a.dtype}"
        raise ValueError(f"{where} must be {'integers' if kinds == 'i' else 'numbers'} of shape {shape}, got {got}")
    return a


def _state_node(d: Any, where: str, span: tuple[int, int], n_cand: int, cost: CostModel) -> Node:
    """A state file's node, checked: exactly the leaves ``span``, candidate indices, the costs the cost table gives
    them and an MSE (or null) per config. ``Node.from_dict`` alone would resume an edited or damaged state into a
    plan for part of the model, or one over the budget."""
    if not isinstance(d, dict) or not {"lo", "hi", "configs", "cost", "mse"} <= d.keys():
        raise ValueError(f"{where} must be an object with lo, hi, configs, cost and mse")
    got = (d["lo"], d["hi"])
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in got) or got != span:
        raise ValueError(f"{where} covers leaves [{got[0]!r}, {got[1]!r}), expected [{span[0]}, {span[1]})")
    mse = d["mse"]
    if (not isinstance(mse, list) or not mse
            or not all(v is None or isinstance(v, (int, float)) and not isinstance(v, bool) for v in mse)):
        raise ValueError(f"{where}.mse must be a non-empty list of numbers or nulls, got {mse!r:.80}")
    k, lo, hi = len(mse), span[0], span[1]
    configs = _state_array(d["configs"], "i", (k, hi - lo), f"{where}.configs")
    if configs.min() < 0 or configs.max() >= n_cand:
        raise ValueError(f"{where}.configs holds candidate indices outside [0, {n_cand})")
    node_cost = _state_array(d["cost"], "if", (k, cost.table.shape[2]), f"{where}.cost").astype(np.float64)
    if not np.allclose(node_cost, cost.leaf_costs(lo, hi, configs), rtol=1e-9, atol=0):
        raise ValueError(f"{where}.cost does not match the cost table at its configs")
    return Node.from_dict({**d, "configs": configs, "cost": node_cost})


def _read_state(path: Path, state: dict[str, Any], n_cand: int, cost: CostModel
                ) -> tuple[list[Node], Node | None, list[dict[str, Any]], int, float, int, dict[str, Any] | None]:
    """(nodes, front, levels, evaluations, wall_s, next level, root_candidates) of a state file whose fingerprint
    matched, after checking that its nodes are exactly the level's: a missing node cannot be recomputed (it is the
    result of every drop below it), so an incomplete state is refused rather than resumed into a plan for part of
    the model."""
    fix = "remove it or start without --resume"
    need = {"level", "nodes", "levels", "evaluations", "wall_s"} - state.keys()
    if need:
        raise ValueError(f"{path}: the TSS state lacks {sorted(need)}; {fix}")
    level, evaluations, wall_s = state["level"], state["evaluations"], state["wall_s"]
    for name, v in (("level", level), ("evaluations", evaluations)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(f"{path}: '{name}' must be a non-negative integer, got {v!r}; {fix}")
    if not isinstance(wall_s, (int, float)) or isinstance(wall_s, bool) or not (0 <= wall_s < float("inf")):
        raise ValueError(f"{path}: 'wall_s' must be a finite non-negative number, got {wall_s!r}; {fix}")
    levels = state["levels"]
    if not isinstance(levels, list) or len(levels) != level + 1 or not all(isinstance(v, dict) for v in levels):
        raise ValueError(f"{path}: 'levels' must list one object per finished level ({level + 1}); {fix}")
    n = cost.table.shape[0]
    spans = _spans(n, level, path)
    nodes = state["nodes"]
    if not isinstance(nodes, list) or len(nodes) != len(spans):
        got = f"{len(nodes)} nodes" if isinstance(nodes, list) else repr(nodes)[:80]
        raise ValueError(f"{path}: 'nodes' must list the {len(spans)} nodes of level {level} over {n} leaves, "
                         f"got {got}; the state is incomplete or edited: {fix}")
    front = state.get("front")
    if front is None and len(spans) == 1:   # written at the last merge, with the root
        raise ValueError(f"{path}: the finished search's state lacks its 'front'; {fix}")
    try:
        nodes = [_state_node(d, f"{path}: nodes[{j}]", span, n_cand, cost)
                 for j, (d, span) in enumerate(zip(nodes, spans))]
        if front is not None:
            front = _state_node(front, f"{path}: front", (0, n), n_cand, cost)
    except ValueError as e:
        raise ValueError(f"{e}; {fix}") from None
    root_candidates = state.get("root_candidates")
    if root_candidates is not None and not isinstance(root_candidates, dict):
        raise ValueError(f"{path}: 'root_candidates' must be an object or null; {fix}")
    return nodes, front, levels, evaluations, float(wall_s), level + 1, root_candidates


def tree_search(evaluator: Evaluator, cost: CostModel, *, keep: int = 16, budget: Budget | None = None,
                state_path: str | Path | None = None, resume: bool = False, progress: bool = True,
                anchor: bool = True, on_level: Callable[[int], None] | None = None,
                root_scorer: RootScorer | None = None, elites: np.ndarray | None = None,
                note: Callable[[str], None] | None = None) -> SearchResult:
    """Run TSS; see the module docstring. ``anchor=False`` drops the environment-uniform elite (for ablations).
    ``elites``: warm-start plans ``(s, n_leaves)`` (candidate indices, each meeting ``budget``) that every node
    keeps its slice of.
    ``on_level(level)`` is called after each finished level (tests use it to stop a search midway).
    ``root_scorer``: scores the last merge's whole plans instead of the evaluator (the closed-loop root,
    ``closed_loop``); its ``tag`` joins the resume fingerprint. ``note(text)`` is told, on rank 0, once every input
    has been checked, when the run starts over an earlier state or finds none to resume (the CLI prints it)."""
    if keep <= 0:
        raise ValueError(f"keep (K) must be positive, got {keep}")
    if budget is not None and budget.kind != cost.kind:
        raise BudgetError(f"budget kind {budget.kind!r} does not match the cost kind {cost.kind!r}")
    space = evaluator.space
    n = len(space.leaves)
    rank, _ = distributed.rank_world()
    prune = _Pruner(cost, budget)
    warm = _check_elites(elites, n, len(space.candidates), cost, budget)
    fingerprint = _fingerprint(evaluator, cost, keep, budget, anchor, None if root_scorer is None else
                               root_scorer.tag, warm)
    plans = list(warm)
    if anchor and evaluator.env.config in space.candidates:
        plans.insert(0, space.uniform(evaluator.env.config))

    def drop(nd: Node) -> np.ndarray:
        always = []
        for plan in plans:   # a slice pruned away (only possible for a plan over the budget) is simply absent
            hits = np.flatnonzero((nd.configs == plan[nd.lo:nd.hi]).all(axis=1))
            if len(hits):
                always.append(int(hits[0]))
        return pareto_drop(cost.axis(nd.cost, budget, (nd.lo, nd.hi)), nd.mse, keep, always=always)

    path = Path(state_path) if state_path is not None else None
    state: dict[str, Any] | None = None
    if resume and path is not None and path.exists():
        try:
            state = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path} cannot be read as a TSS state file ({e}); remove it or start without "
                             "--resume") from None
        if not isinstance(state, dict) or state.get("schema") != STATE_SCHEMA or state.get("version") != STATE_VERSION:
            raise ValueError(f"{path} is not a TSS state file of version {STATE_VERSION}")
        if state.get("fingerprint_scheme", 1) != FINGERPRINT_SCHEME:
            raise ValueError(f"{path} was written by an earlier TreeQ whose search fingerprints are computed "
                             "differently (float sums that depended on the thread count); it cannot be matched to "
                             "this search: start without --resume")
        if state.get("fingerprint") != fingerprint:
            raise ValueError(f"{path} belongs to a different search (model, calibration inputs or their weights, "
                             "space, budget, λ, K, warm start or batching differ); remove it or start without "
                             "--resume")
    distributed.barrier()
    if state is not None:
        assert path is not None   # (state is only ever read from path)
        nodes, front, levels, evaluations, wall0, level, root_candidates = _read_state(
            path, state, len(space.candidates), cost)
    else:
        nodes = _leaves(cost, prune, len(space.candidates))
        levels, evaluations, wall0, level, root_candidates, front = [], 0, 0.0, 0, None, None
        if note is not None and path is not None and rank == 0:
            if path.exists():
                note(f"starting over in {path.parent} (its {path.name} is replaced at the end of the first level, "
                     "and the plan, report and plots at the end; --resume continues it instead)")
            elif resume:
                note(f"--resume, but {path.parent} holds no {path.name}: starting from the beginning")

    t0 = time.perf_counter()
    bar = tqdm(total=0, unit="eval", desc="TSS", disable=not progress or rank != 0, dynamic_ncols=True)
    try:
        while level == 0 or len(nodes) > 1:
            t_level = time.perf_counter()
            if level == 0:   # leaves are scored only to drop them to K (or when one leaf is the whole tree)
                todo = [j for j, nd in enumerate(nodes) if len(nd.mse) > keep or n == 1]
            else:
                nodes, todo = _merge(nodes, prune)
            bar.set_description(f"TSS level {level}")
            if root_scorer is not None and len(nodes) == 1 and todo:
                total = _score_root(root_scorer, nodes[0], bar)
            else:
                total = _score(evaluator, nodes, todo, bar)
            for j in todo:
                nd = nodes[j]
                kept = drop(nd)
                if len(nodes) == 1:   # the last merge (or the only leaf): keep everything for the answer
                    mask = np.zeros(len(nd.mse), dtype=bool)
                    mask[kept] = True
                    root_candidates = {"axis": cost.axis(cost.offset + nd.cost, budget).tolist(),
                                       "mse": [None if np.isnan(v) else float(v) for v in nd.mse],
                                       "kept": mask.tolist()}
                    front = nd.take(nondominated_fronts(np.concatenate([nd.cost, nd.mse[:, None]], axis=1))[0])
                nodes[j] = nd.take(kept)
            levels.append({"level": level, "nodes": len(nodes), "scored_nodes": len(todo), "evaluations": total,
                           "wall_s": time.perf_counter() - t_level})
            evaluations += total
            if path is not None:
                if rank == 0:
                    write_json(path, {"schema": STATE_SCHEMA, "version": STATE_VERSION, "fingerprint": fingerprint,
                                      "fingerprint_scheme": FINGERPRINT_SCHEME,
                                       "level": level, "nodes": [nd.to_dict() for nd in nodes], "levels": levels,
                                       "evaluations": evaluations, "wall_s": wall0 + time.perf_counter() - t0,
                                       "root_candidates": root_candidates,
                                       "front": None if front is None else front.to_dict()})
                distributed.barrier()
            if on_level is not None:
                on_level(level)
            level += 1
    finally:
        bar.close()
    return SearchResult(nodes[0], front if front is not None else nodes[0], root_candidates or {}, levels,
                        evaluations, wall0 + time.perf_counter() - t0, keep, cost.kind, budget, len(plans),
                        len(space.candidates))
