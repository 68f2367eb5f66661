"""QuantPlan: the per-layer quantization plan, a versioned JSON document shared by search, PTQ and runtime.

```json
{
  "schema": "treeq-plan", "version": 1, "model": "DiT-digits",
  "layers": {
    "blocks.0.attn.qkv": {"w_bits": 4, "a_bits": 4, "w_symmetric": false, "a_symmetric": false,
                          "w_clip": 1.0, "a_clip": 1.0, "branch": {"kind": "monarch", "blocks": 32, "rank": 1}},
    "final_layer.linear": {"w_bits": 8, "a_bits": 8}
  },
  "meta": {"budget": {"w_bits": 4.0, "a_bits": 4.0}, "search": "tss"}
}
```

Layers absent from ``layers`` stay in full precision. ``w_bits``/``a_bits`` of 16 keep bf16. Keys are module
names (``model.named_modules()``); :meth:`QuantPlan.validate` checks them against a model.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import types
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch.nn as nn

from .format import QuantSpec

SCHEMA = "treeq-plan"
SHAPES_KEY = "layer_shapes"   # in a plan's meta: {layer: [K, N]} of the model it was made for (checked by validate)
PLAN_VERSION = 1
BRANCH_KINDS = ("monarch", "lowrank")


class PlanError(ValueError):
    """A malformed plan, or a plan that does not fit the model."""


@dataclasses.dataclass(frozen=True)
class BranchConfig:
    """A high-precision branch beside the quantized weight. ``lowrank`` is ``monarch`` with one block."""

    kind: str = "monarch"
    blocks: int = 32
    rank: int = 1

    def __post_init__(self) -> None:
        if self.kind not in BRANCH_KINDS:
            raise PlanError(f"branch kind must be one of {BRANCH_KINDS}, got {self.kind!r}")
        for f in ("blocks", "rank"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise PlanError(f"branch {f} must be a positive int, got {v!r}")
        if self.kind == "lowrank" and self.blocks != 1:
            raise PlanError(f"a lowrank branch has blocks=1, got {self.blocks}")


@dataclasses.dataclass(frozen=True)
class LayerConfig:
    """One layer's format. Validated against the numeric format on construction."""

    w_bits: int
    a_bits: int
    w_symmetric: bool = False
    a_symmetric: bool = False
    w_clip: float = 1.0
    a_clip: float = 1.0
    branch: BranchConfig | None = None

    def __post_init__(self) -> None:
        if isinstance(self.branch, Mapping):
            unknown = set(self.branch) - {f.name for f in dataclasses.fields(BranchConfig)}
            if unknown:
                raise PlanError(f"branch: unknown field(s) {sorted(unknown)}")
            object.__setattr__(self, "branch", BranchConfig(**self.branch))
        if self.branch is not None and not isinstance(self.branch, BranchConfig):
            raise PlanError(f"branch must be an object like {{\"kind\": \"monarch\", \"blocks\": 32, \"rank\": 1}} "
                            f"or absent, got {self.branch!r}")
        for f in ("w_symmetric", "a_symmetric"):
            if not isinstance(getattr(self, f), bool):
                raise PlanError(f"{f} must be true or false, got {getattr(self, f)!r}")
        for f in ("w_clip", "a_clip"):   # a number, kept as float (so the plan writes back what it read)
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise PlanError(f"{f} must be a number, got {v!r}")
            object.__setattr__(self, f, float(v))
        try:
            self.weight_spec()
            self.act_spec()
        except (TypeError, ValueError) as e:
            raise PlanError(str(e)) from None

    def weight_spec(self) -> QuantSpec:
        return QuantSpec.weight(self.w_bits, self.w_symmetric, self.w_clip)

    def act_spec(self) -> QuantSpec:
        return QuantSpec.activation(self.a_bits, self.a_symmetric, self.a_clip)

    @property
    def label(self) -> str:
        return f"W{self.w_bits}A{self.a_bits}" + ("" if self.branch is None else f"+{self.branch.kind}")

    def replace(self, **changes: Any) -> "LayerConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if self.branch is None:
            d.pop("branch")
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "layer") -> "LayerConfig":
        if not isinstance(d, Mapping):
            raise PlanError(f"{where}: expected an object, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise PlanError(f"{where}: unknown field(s) {sorted(unknown)}")
        missing = {"w_bits", "a_bits"} - set(d)
        if missing:
            raise PlanError(f"{where}: missing {sorted(missing)}")
        try:
            return cls(**d)
        except PlanError as e:
            raise PlanError(f"{where}: {e}") from None
        except TypeError as e:
            raise PlanError(f"{where}: {e}") from None


@dataclasses.dataclass(frozen=True)
class QuantPlan:
    """Per-layer configs keyed by module name, in forward order."""

    layers: Mapping[str, LayerConfig]
    model: str = ""
    meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    version: int = PLAN_VERSION

    def __post_init__(self) -> None:
        for name, cfg in self.layers.items():
            if not isinstance(name, str):   # (QuantPlan.uniform(model, ...) iterates a module's children)
                raise PlanError(f"layer names must be the model's module names (str), got a "
                                f"{type(name).__name__}: {name!r:.80}; QuantPlan.block_uniform(model, ...) takes "
                                f"the model itself")
            if not isinstance(cfg, LayerConfig):
                raise PlanError(f"layer {name!r}: expected a LayerConfig, got {type(cfg).__name__}")
        object.__setattr__(self, "layers", types.MappingProxyType(dict(self.layers)))
        object.__setattr__(self, "meta", types.MappingProxyType(dict(self.meta)))

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def uniform(cls, names: Iterable[str], w_bits: int, a_bits: int, *, model: str = "",
                edge_names: Iterable[str] = (), edge_bits: tuple[int, int] = (8, 8), **layer_kw: Any) -> "QuantPlan":
        """Every layer in ``names`` at ``W{w_bits}A{a_bits}``; ``edge_names`` (embedders, final layer) at
        ``edge_bits``."""
        layers = {n: LayerConfig(w_bits, a_bits, **layer_kw) for n in names}
        for n in edge_names:
            layers[n] = LayerConfig(*edge_bits)
        return cls(layers, model=model, meta={"kind": f"uniform W{w_bits}A{a_bits}"})

    @classmethod
    def block_uniform(cls, model: nn.Module, w_bits: int, a_bits: int, *, edge_bits: tuple[int, int] = (8, 8),
                      model_name: str = "", pointwise_convs: bool = True, **layer_kw: Any) -> "QuantPlan":
        """Every transformer-block linear of ``model`` (``is_block_layer``) at ``W{w_bits}A{a_bits}``, every other
        linear (embedders, final layer) at ``edge_bits``; with ``pointwise_convs`` (default), the pointwise
        convolutions too (``nn.pointwise``, linears over channels: Sana's feed-forward is such)."""
        from .nn import quantizable_linears

        names = quantizable_linears(model, pointwise_convs=pointwise_convs)
        return cls.uniform([n for n in names if is_block_layer(n)], w_bits, a_bits, model=model_name,
                           edge_names=[n for n in names if not is_block_layer(n)], edge_bits=edge_bits, **layer_kw)

    def with_layer(self, name: str, cfg: LayerConfig) -> "QuantPlan":
        layers = dict(self.layers)
        layers[name] = cfg
        return dataclasses.replace(self, layers=layers)

    # -- checks ----------------------------------------------------------------------------------
    def validate(self, model: nn.Module) -> None:
        """Every layer name must be an ``nn.Linear`` or a pointwise convolution (``nn.pointwise``) of ``model``
        (or one already converted), of the shape ``meta['layer_shapes']`` records when the plan carries it (a
        searched plan does)."""
        modules = dict(model.named_modules())
        bad = [n for n in self.layers if n not in modules]
        if bad:
            close = {n: [m for m in modules if m.endswith(n.split(".")[-1])][:3] for n in bad[:3]}
            raise PlanError(f"plan names {len(bad)} layer(s) the model does not have, e.g. {bad[:3]} "
                            f"(similar names in the model: {close})")
        from .nn.pointwise import describe, is_pointwise_conv, layer_dims
        from .nn.quant_linear import QuantLinear

        wrong = [n for n in self.layers if not isinstance(modules[n], (nn.Linear, QuantLinear))
                 and not is_pointwise_conv(modules[n])]
        if wrong:
            raise PlanError("plan layers must be nn.Linear modules or pointwise (1x1) convolutions; not such: "
                            + ", ".join(f"{n} ({describe(modules[n])})" for n in wrong[:5]))
        from .nn.convert import TENSOR_READERS, read_as_tensors

        read = read_as_tensors(model, self.layers)
        if read:
            raise PlanError(f"{read[:4]} belong to a module that reads their weights as tensors instead of calling "
                            f"them ({', '.join(TENSOR_READERS)}): packed, they would run unquantized; leave them out")
        shapes = self.meta.get(SHAPES_KEY)   # a searched plan records its layers' shapes: another model's is refused
        if shapes is not None and not isinstance(shapes, Mapping):
            raise PlanError(f"plan meta {SHAPES_KEY} must map layer names to [K, N], got {type(shapes).__name__}")
        if isinstance(shapes, Mapping):
            for n, shape in shapes.items():
                if not (isinstance(shape, (list, tuple)) and len(shape) == 2
                        and all(isinstance(v, int) and not isinstance(v, bool) for v in shape)):
                    raise PlanError(f"plan meta {SHAPES_KEY}[{n!r}] must be [K, N] (two integers), got {shape!r}")
                if n in self.layers and n in modules:
                    have = list(layer_dims(modules[n]))
                    if list(shape) != have:
                        raise PlanError(f"plan was made for another model: its layer {n!r} is K x N = "
                                        f"{shape[0]} x {shape[1]}, this model's is {have[0]} x {have[1]} "
                                        f"(plan model {self.model!r})")

    # -- JSON ------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "version": self.version, "model": self.model,
                "layers": {n: c.to_dict() for n, c in self.layers.items()}, "meta": dict(self.meta)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "QuantPlan":
        if not isinstance(d, Mapping):
            raise PlanError(f"a plan is a JSON object, got {type(d).__name__}")
        if d.get("schema") != SCHEMA:
            raise PlanError(f"not a TreeQ plan: schema is {d.get('schema')!r}, expected {SCHEMA!r}")
        if type(d.get("version")) is not int or d.get("version") != PLAN_VERSION:   # (true and 1.0 equal 1)
            raise PlanError(f"plan version {d.get('version')!r} is not supported (this build reads {PLAN_VERSION})")
        unknown = set(d) - {"schema", "version", "model", "layers", "meta"}
        if unknown:
            raise PlanError(f"unknown plan field(s) {sorted(unknown)}")
        layers = d.get("layers")
        if not isinstance(layers, Mapping):
            raise PlanError("plan 'layers' must be an object mapping layer names to configs")
        meta, model = d.get("meta", {}), d.get("model", "")
        if meta is not None and not isinstance(meta, Mapping):
            raise PlanError(f"plan 'meta' must be an object, got {type(meta).__name__}")
        if not isinstance(model, str):
            raise PlanError(f"plan 'model' must be a string, got {type(model).__name__}")
        return cls({n: LayerConfig.from_dict(c, where=f"layer {n!r}") for n, c in layers.items()},
                   model=model, meta=meta or {})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "QuantPlan":
        try:
            d = json.loads(text, object_pairs_hook=_no_duplicate_keys)
        except json.JSONDecodeError as e:
            raise PlanError(f"plan is not valid JSON: {e}") from None
        except RecursionError:
            raise PlanError("plan is not a plan: JSON nested too deeply") from None
        return cls.from_dict(d)

    def save(self, path: str | Path) -> None:
        """Write the plan as JSON, atomically (a temporary file renamed into place)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(self.to_json() + "\n")
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> "QuantPlan":
        if Path(path).is_dir():
            raise PlanError(f"{path} is a directory; a plan is a JSON file (e.g. {Path(path) / 'plan.json'})")
        try:
            text = Path(path).read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise PlanError(f"{path}: not a plan (not UTF-8 text)") from None
        try:
            return cls.from_json(text)
        except PlanError as e:
            raise PlanError(f"{path}: {e}") from None


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object, refusing a key given twice (``json`` would keep the last silently: a layer configured twice
    is a mistake to name, not to resolve)."""
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise PlanError(f"key {k!r} appears twice in one JSON object")
        out[k] = v
    return out


# the repeated blocks: ``blocks.N.`` (ours), ``transformer_blocks.N.`` (diffusers), ``single_transformer_blocks.N.``
# (Flux) and any other ``*_blocks.N.``, also keyed by a name (FLUX.3's per-mode ``mode_blocks.image.N.``); Lumina2's
# and Z-Image's ``layers.N.`` and their refiner blocks (whole transformer blocks over the latent or caption tokens
# before the main ones)
BLOCK_LAYER = re.compile(r"(^|[._])blocks\.([A-Za-z_]\w*\.)?\d+\."
                         r"|(^|\.)(layers|noise_refiner|context_refiner|siglip_refiner)\.\d+\.")
# diffusers' DiT keeps a copy of the timestep/class embedder inside every block (``norm1.emb``): embedders are
# edge layers wherever they live, as is Chroma's guidance approximator (an MLP of ``layers.N`` making the
# modulation every block reads).
EMBEDDER_LAYER = re.compile(r"(^|\.)emb\.|(^|\.)distilled_guidance_layer\.")


def parse_wa(text: str) -> tuple[int, int]:
    """``"W4A8"`` (any case, surrounding spaces allowed) -> ``(4, 8)``; anything else is a :class:`PlanError`."""
    m = re.fullmatch(r"W(\d+)A(\d+)", text.strip().upper())
    if not m:
        raise PlanError(f"a precision is written WxAy (e.g. W4A8), got {text!r}")
    return int(m.group(1)), int(m.group(2))


def check_runnable(config: LayerConfig, what: str = "") -> None:
    """A PlanError unless a packed model can run ``config``: 16-bit weights stay an unquantized ``nn.Linear``, so
    they go only with 16-bit activations and no branch (a simulation could quantize such activations; the packed
    model would silently not)."""
    if config.w_bits == 16 and (config.a_bits != 16 or config.branch is not None):
        raise PlanError(f"{what + ': ' if what else ''}{config.label} has 16-bit weights with quantized activations "
                        "or a branch, which no packed layer runs (a W16 layer stays an unquantized nn.Linear): use "
                        "W8 weights, or A16 without a branch")


def is_block_layer(name: str) -> bool:
    """Layers inside the repeated transformer blocks (searched by default); the rest are 'edge' layers
    (embedders, final layer), kept at 8 bits by default."""
    return BLOCK_LAYER.search(name) is not None and EMBEDDER_LAYER.search(name) is None
