"""TreeQ artifacts: a directory with the packed model (safetensors), its plan (JSON) and a manifest.

    <dir>/manifest.json     {"format": "treeq-artifact", "version": 2, "layout_version": 1, "model": ...,
                             "model_config": {...}, "model_config_sha256": ..., "fingerprint": ...,
                             "sha256": ..., "plan_sha256": ...}
    <dir>/plan.json         the QuantPlan
    <dir>/model.safetensors every tensor of the quantized model's state_dict

Loading checks, in order, with a clear error for each: the manifest's format and versions, the checksums of the
weights and the plan (corruption, edits), the architecture fingerprint (the wrong model), every packed layer's
tensors (shapes and integer dtypes; scales finite and positive, zero points on the grid, column sums equal to
the codes' sums: within their bounds, or exactly with ``verify_codes``) and the shapes of the other tensors, all
before ``model`` is touched; then a strict state-dict load. Nothing is unpickled.
"""
from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..branches import MonarchShape
from ..format.packing import LAYOUT_VERSION
from ..plan import QuantPlan
from .convert import check_layout, set_layout, skeleton

FORMAT = "treeq-artifact"
# 2: Monarch factors with input blocks strided and output blocks contiguous (branches/monarch.py); version 1
# stored the transposed arrangement, which this build would misread.
VERSION = 2
ARTIFACT_FILES = ("manifest.json", "plan.json", "model.safetensors")


class ArtifactError(ValueError):
    """A TreeQ artifact that is malformed, corrupt, of another version, or for another model."""


def fingerprint(model: nn.Module, plan: QuantPlan) -> str:
    """Hash of the names and shapes of the plan's layers in the full-precision model (or that model converted for
    calibration: a fake-quant layer hashes as the layer it wraps)."""
    from ..nn.pointwise import layer_dims
    from ..nn.quant_pointwise import conv_spatial_dims

    h = hashlib.sha256()
    for name in plan.layers:
        m = model.get_submodule(name)
        k, n = layer_dims(m)
        dims = conv_spatial_dims(m)
        kind = "" if dims is None else f"conv{dims}d:"   # (linears hash as they always did)
        h.update(f"{name}:{kind}{k}x{n}:{m.bias is not None};".encode())
    return h.hexdigest()[:16]


def _config_sha256(config: Any) -> str:
    """Checksum of a manifest's model_config: the fingerprint sees only the packed layers' shapes, and settings
    such as a DiT's head count change no shape."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save(model: nn.Module, plan: QuantPlan, path: str | Path, *, fp_fingerprint: str,
         model_config: dict[str, Any] | None = None) -> Path:
    """Write a quantized model (after :func:`treeq_engine.runtime.quantize`) as an artifact directory.
    ``fp_fingerprint`` is :func:`fingerprint` of the full-precision model, taken before quantizing."""
    from safetensors.torch import save_file

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    # replacing an artifact: its manifest goes first and comes back last, so an interrupted save leaves a directory
    # that loads as "no manifest.json", never new weights under an old manifest; each file is written beside its
    # name (a hidden .partial, removed on failure and by the next save) and renamed over it
    (out / "manifest.json").unlink(missing_ok=True)
    for name in ARTIFACT_FILES:
        _partial(out / name).unlink(missing_ok=True)
    _write(out / "model.safetensors", lambda tmp: save_file(state, str(tmp)))
    _write(out / "plan.json", plan.save)
    manifest = {"format": FORMAT, "version": VERSION, "layout_version": LAYOUT_VERSION, "model": plan.model,
                "model_config": model_config or {}, "model_config_sha256": _config_sha256(model_config or {}),
                "fingerprint": fp_fingerprint,
                "sha256": _sha256(out / "model.safetensors"), "plan_sha256": _sha256(out / "plan.json")}
    _write(out / "manifest.json", lambda tmp: tmp.write_text(json.dumps(manifest, indent=2) + "\n"))
    return out


def _partial(path: Path) -> Path:
    return path.with_name(f".{path.name}.partial")


def _write(path: Path, write: Callable[[Path], Any]) -> None:
    tmp = _partial(path)
    try:
        tmp.touch()   # created as the process's umask allows: the mode the file keeps (safetensors writes 0600)
        mode = stat.S_IMODE(tmp.stat().st_mode)
        write(tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _ours(out: Path) -> dict[str, Any] | None:
    """The manifest of a TreeQ artifact in ``out`` (of any version), or None where its manifest.json is another's."""
    try:
        man = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return man if isinstance(man, dict) and man.get("format") == FORMAT else None


def check_out(path: str | Path, overwrite: bool = False) -> None:
    """Refuse to write an artifact into ``path`` where that would destroy something: an artifact already there, or
    one a cut-off save left without its manifest (both unless ``overwrite``), a file, or a directory holding
    anything else (hidden files aside)."""
    out = Path(path)
    if not out.exists():
        return
    if not out.is_dir():
        raise ArtifactError(f"{out} is a file, not an artifact directory")
    man = _ours(out)
    files = sorted(f.name for f in out.iterdir() if not f.name.startswith("."))
    others = [f for f in files if f not in (ARTIFACT_FILES if man is not None else ARTIFACT_FILES[1:])]
    if others:
        raise ArtifactError(f"{out} holds other files ({', '.join(others[:3])}{', ...' if len(others) > 3 else ''}); "
                            "an artifact goes into a new or empty directory")
    if not files or overwrite:
        return
    if man is not None:
        made = man.get("model_config")
        made = made.get("class") or made.get("arch") if isinstance(made, dict) else None
        raise ArtifactError(f"{out} already holds an artifact{f' made from {made}' if made else ''}; pass "
                            "--overwrite to replace it, or choose another directory")
    raise ArtifactError(f"{out} holds {' and '.join(files)} but no manifest.json (a save cut off?); pass --overwrite "
                        "to replace them, or choose another directory")


def read_manifest(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not (p / "manifest.json").is_file():
        if not p.exists():
            raise ArtifactError(f"{p}: no such artifact directory")
        raise ArtifactError(f"{p} is not a TreeQ artifact: no manifest.json")
    try:
        man = json.loads((p / "manifest.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{p}/manifest.json is not valid JSON: {e}") from None
    if not isinstance(man, dict):
        raise ArtifactError(f"{p}/manifest.json must hold a JSON object, got {type(man).__name__}")
    if man.get("format") != FORMAT:
        raise ArtifactError(f"{p}: not a TreeQ artifact (format {man.get('format')!r})")
    if man.get("version") != VERSION:
        raise ArtifactError(f"{p}: artifact version {man.get('version')!r}; this build reads {VERSION} — "
                            "re-quantize the model with this version")
    if not isinstance(man.get("model_config", {}), dict):
        raise ArtifactError(f"{p}/manifest.json: model_config must be a JSON object, got "
                            f"{type(man['model_config']).__name__}")
    if "model_config_sha256" in man and _config_sha256(man.get("model_config", {})) != man["model_config_sha256"]:
        raise ArtifactError(f"{p}/manifest.json: model_config was changed: its checksum does not match (the weights "
                            "were packed for the config it was written with)")
    if man.get("layout_version") != LAYOUT_VERSION:
        raise ArtifactError(f"{p}: weights packed with layout v{man.get('layout_version')}; this build reads "
                            f"v{LAYOUT_VERSION} — re-quantize the model with this version")
    return man


def load(path: str | Path, model: nn.Module, *, dtype: torch.dtype | None = None,
         map_location: str | torch.device = "cpu", layout: str = "auto", verify_codes: bool = False) -> nn.Module:
    """Load an artifact into ``model``, a freshly built full-precision instance of the same architecture
    (its weights are replaced); ``layout`` as in :func:`treeq_engine.runtime.set_layout` (by default, layers the
    CUDA kernels run keep only their fragment layout on the GPU). Returns the quantized model. Everything the
    artifact holds is checked before ``model`` is changed (module docstring; the column sums against their bounds,
    and with ``verify_codes`` exactly against the codes, which unpacks every weight: seconds per 100 M weights on
    the CPU, for files another program wrote); should the final state-dict load still fail, ``model`` is left
    part-swapped: build a fresh one. ``dtype``: the model precision the packed layers are built for (it sets
    their Monarch factors' storage: bf16 for a 16-bit model, float32 otherwise); ``None`` keeps the factors as
    the artifact stores them (float32 ones from a float32 build load unrounded)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from ..plan import PlanError

    check_layout(layout)
    if torch.device(map_location).type == "cuda" and not torch.cuda.is_available():
        raise ArtifactError(f"map_location={map_location!r}, but no CUDA device is available to torch")
    p = Path(path)
    man = read_manifest(p)
    if not (p / "plan.json").is_file():
        raise ArtifactError(f"{p}: plan.json is missing")
    if "plan_sha256" in man and _sha256(p / "plan.json") != man["plan_sha256"]:   # (older artifacts have none)
        raise ArtifactError(f"{p}/plan.json was changed or is corrupt: its checksum does not match the manifest")
    try:
        plan = QuantPlan.load(p / "plan.json")
    except PlanError as e:
        raise ArtifactError(f"{p}: {e}") from None
    weights = p / "model.safetensors"
    if not weights.is_file():
        raise ArtifactError(f"{p}: model.safetensors is missing")
    if _sha256(weights) != man.get("sha256"):
        raise ArtifactError(f"{weights} is corrupt: its checksum does not match the manifest")
    plan.validate(model)
    desc, cfg = man.get("model_config", {}), getattr(model, "config", None)
    to_dict = getattr(cfg, "to_dict", None)
    if desc.get("arch") == "dit" and isinstance(desc.get("config"), dict) and callable(to_dict):
        have = to_dict()
        diff = sorted(k for k in set(have) | set(desc["config"]) if have.get(k) != desc["config"].get(k))
        if diff:   # (settings such as num_heads change no shape: the fingerprint cannot see them)
            raise ArtifactError(f"{p} was made for another model: its config differs in {diff} (artifact: "
                                + ", ".join(f"{k}={desc['config'].get(k)!r}" for k in diff) + "; this model: "
                                + ", ".join(f"{k}={have.get(k)!r}" for k in diff) + ")")
    fp = fingerprint(model, plan)
    if fp != man.get("fingerprint"):
        raise ArtifactError(f"{p} was made for another model (architecture fingerprint {man.get('fingerprint')}, "
                            f"this model has {fp}); build the model with the artifact's config: {man.get('model_config')}")
    try:
        state = load_file(str(weights), device=str(map_location))
    except (SafetensorError, OSError, RuntimeError) as e:
        raise ArtifactError(f"{weights} cannot be read: {e}") from None
    _check_state(state, model, plan, weights, verify_codes)
    if dtype is None:
        stored = {t.dtype for k, t in state.items() if k.endswith(".monarch_w1")}
        dtype = torch.float32 if torch.float32 in stored else torch.bfloat16
    skeleton(model, plan, dtype=dtype)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise ArtifactError(f"{p}: state does not fit the model: {e}") from None
    if missing or unexpected:
        raise ArtifactError(f"{p}: state does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    set_layout(model, layout)
    return model


def _check_state(state: dict[str, torch.Tensor], model: nn.Module, plan: QuantPlan, where: Path,
                 verify_codes: bool = False) -> None:
    """What a checksum cannot vouch for (a file written by other code, or edited and re-summed): the packed
    layers' tensors and values, and the shapes of every other tensor the model has under the same name."""
    from ..format import unpack
    from ..format.packing import packed_dtype, packed_shape
    from ..nn.pointwise import layer_dims

    planned = set()
    for name, cfg in plan.layers.items():
        spec = cfg.weight_spec()
        if not spec.is_quantized:
            continue
        planned.add(name)
        k, n = layer_dims(model.get_submodule(name))
        want = {"w_packed": (packed_dtype(spec.bits), packed_shape(n, k, spec.bits)),
                "w_scale": (torch.float32, (n,)), "w_zero_point": (torch.int32, (n,)),
                "w_col_sum": (torch.int32, (n,))}
        got = {}
        for key, (dt, shape) in want.items():
            t = state.get(f"{name}.{key}")
            if t is None:
                raise ArtifactError(f"{where}: {name}.{key} is missing")
            if t.dtype != dt or tuple(t.shape) != tuple(shape):
                raise ArtifactError(f"{where}: {name}.{key} must be {dt} {tuple(shape)} for a {cfg.label} layer "
                                    f"(N={n}, K={k}), got {t.dtype} {tuple(t.shape)}")
            got[key] = t
        scale, zp = got["w_scale"], got["w_zero_point"]
        if not bool(torch.isfinite(scale).all()) or not bool((scale > 0).all()):
            raise ArtifactError(f"{where}: {name}.w_scale must be finite and positive")
        lo, hi = (0, 0) if spec.symmetric else (spec.qmin, spec.qmax)
        if int(zp.min()) < lo or int(zp.max()) > hi:
            raise ArtifactError(f"{where}: {name}.w_zero_point must lie in [{lo}, {hi}] ({spec.bits}-bit "
                                f"{'symmetric' if spec.symmetric else 'asymmetric'} weights), got "
                                f"[{int(zp.min())}, {int(zp.max())}]")
        col = got["w_col_sum"]
        if int(col.min()) < k * spec.qmin or int(col.max()) > k * spec.qmax:   # K codes in [qmin, qmax]
            raise ArtifactError(f"{where}: {name}.w_col_sum lies outside [K·qmin, K·qmax] = [{k * spec.qmin}, "
                                f"{k * spec.qmax}]: not the sums of {spec.bits}-bit codes")
        if verify_codes:
            codes = unpack(got["w_packed"].cpu(), spec.bits, k)
            if not torch.equal(codes.sum(1, dtype=torch.int64).to(torch.int32), col.cpu()):
                raise ArtifactError(f"{where}: {name}.w_col_sum does not equal the sums of its codes")
        shapes: dict[str, tuple[int, ...] | None] = {"bias": (n,) if model.get_submodule(name).bias is not None
                                                     else None, "monarch_w1": None, "monarch_w2": None}
        if cfg.branch is not None:
            mshape = MonarchShape(n=n, k=k, blocks=cfg.branch.blocks, rank=cfg.branch.rank)
            shapes.update(monarch_w1=tuple(mshape.w1_shape), monarch_w2=tuple(mshape.w2_shape))
        for key, want_shape in shapes.items():   # present exactly where the plan and the model say, of those shapes
            t = state.get(f"{name}.{key}")
            if (t is None) != (want_shape is None):
                raise ArtifactError(f"{where}: {name}.{key} is " + ("missing" if t is None else
                                    f"there, but the {cfg.label} layer has none"))
            if t is None:
                continue
            if tuple(t.shape) != want_shape:
                raise ArtifactError(f"{where}: {name}.{key} must be {want_shape} for a {cfg.label} layer (N={n}, "
                                    f"K={k}), got {tuple(t.shape)}")
            if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
                raise ArtifactError(f"{where}: {name}.{key} must be finite floats, got {t.dtype}")
    for key, t in model.state_dict().items():   # the rest: same name, same shape, no integer cast
        if key.rpartition(".")[0] in planned or key not in state:
            continue
        s = state[key]
        if tuple(s.shape) != tuple(t.shape) or (s.is_floating_point() != t.is_floating_point()) or \
                (not t.is_floating_point() and s.dtype != t.dtype):
            raise ArtifactError(f"{where}: {key} is {s.dtype} {tuple(s.shape)}, the model's is {t.dtype} "
                                f"{tuple(t.shape)}: built with another config than the artifact's?")
