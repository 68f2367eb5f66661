"""Every fused block, called on what diffusers' forward broadcasts or promotes: each conditioning input (a text, a
temb, a modulation table; each tensor argument besides the rows with the rows' batch) cut to a batch of 1, and, in
bf16, each floating one in float32. Where diffusers' forward returns, the fused block returns the same (shape,
dtype, values) and runs no submodule more often than diffusers does (a fused path that computed the adaLN linear
before finding it must fall back ran it twice). Reviews found a fused path crashing on a text batch
of 1 (Flux, SD3, Chroma, HunyuanVideo, CogVideoX, CogView4), returning bf16 where diffusers promotes to float32
(Flux, SD3, CogView4, FLUX.2, FLUX.3) and running the adaLN linear twice (DiT, Z-Image, Kandinsky 5, Cosmos, ...)."""
import copy
import importlib
import inspect
from collections import Counter

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="diffusers is an optional dependency (requirements-dev.txt)")

from test_mmdit_fused import pair  # noqa: E402
from tinydit import one_thread  # noqa: E402,F401

from treeq_engine.plan import QuantPlan  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _from(module, build, call="call", build_kw=None, **call_kw):
    def make():
        m = importlib.import_module(module)
        return getattr(m, build)(**(build_kw or {})), lambda model: getattr(m, call)(**call_kw)
    return make


def _diffusers(kind):
    def make():
        m = importlib.import_module("test_diffusers_fused")
        return m.build(kind), lambda model: m.inputs(kind, torch.Generator().manual_seed(0))
    return make


def _zoo(name):
    def make():
        from diffusers_zoo import CASES
        from tiny_diffusers import perturbed

        torch.manual_seed(0)
        def call(model):
            g = torch.Generator().manual_seed(0)
            return CASES[name][1](lambda *shape: torch.randn(*shape, generator=g))

        return perturbed(CASES[name][0]().eval()), call
    return make


def _mmdit(build):
    def make():
        from test_search_mmdit import call
        from tiny_diffusers import perturbed

        return perturbed(build()), lambda model: call(model, n=2)
    return make


def _tiny(helper, module, call="call"):
    def make():
        from tiny_diffusers import perturbed

        model = getattr(importlib.import_module("tiny_diffusers"), helper)()
        return perturbed(model), lambda m: getattr(importlib.import_module(module), call)()
    return make


MODELS = {
    "dit": _diffusers("dit"), "pixart": _diffusers("pixart"), "latte": _zoo("Latte"),
    "flux": _mmdit(lambda: importlib.import_module("test_mmdit_fused").flux(True)),
    "sd3": _mmdit(lambda: importlib.import_module("test_search_mmdit").tiny_sd3()),
    "sd3.5": _mmdit(lambda: importlib.import_module("test_search_mmdit").tiny_sd3(True)),
    "chroma": _tiny("tiny_chroma", "test_search_chroma"), "flux2": _tiny("tiny_flux2", "test_search_flux2"),
    "qwen": _tiny("tiny_qwen", "test_search_qwen"), "zimage": _tiny("tiny_zimage", "test_search_zimage"),
    "ltx": _tiny("tiny_ltx", "test_search_ltx"), "sana": _tiny("tiny_sana", "test_search_sana"),
    "wan": lambda: _wan(),
    "flux3": _from("test_flux3_fused", "tiny_flux3"), "hunyuan": _from("test_hunyuan_fused", "tiny_hunyuan"),
    "hunyuan15": _from("test_hunyuan15_fused", "tiny_hunyuan15"),
    "cogvideox": _from("test_cogvideox_fused", "tiny_cogvideox"), "cogview4": _from("test_cogview4_fused", "tiny"),
    "cogview3plus": _from("test_cogview3plus_fused", "tiny"), "cosmos": _from("test_cosmos_fused", "tiny_cosmos"),
    "kandinsky5": _from("test_kandinsky5_fused", "tiny"), "ovis": _from("test_ovis_fused", "tiny"),
    "mochi": _from("test_mochi_fused", "tiny_mochi"), "lumina2": _from("test_lumina2_fused", "tiny_lumina2"),
    "ltx2": _from("test_ltx2_fused", "tiny_ltx2"), "helios": _from("test_helios_fused", "tiny_helios"),
    "ideogram4": _from("test_ideogram4_fused", "tiny_ideogram4"), "anyflow": _from("test_anyflow_fused", "tiny"),
    "qwenimage21": _from("test_qwenimage21_fused", "tiny_qwenimage21"),
    "auraflow": _from("test_auraflow_fused", "tiny"), "hunyuandit": _from("test_hunyuandit_fused", "tiny"),
    "sana_video": _from("test_sana_video_fused", "tiny"), "allegro": _from("test_allegro_fused", "tiny"),
    "easyanimate": _from("test_easyanimate_fused", "tiny"), "glm_image": _from("test_glm_image_fused", "tiny"),
    "motif_video": _from("test_motif_video_fused", "tiny"), "bria_fibo2": _from("test_bria_fibo2_fused", "tiny"),
    "joyimage": lambda: _joyimage("edit"), "joyimage_plus": lambda: _joyimage("edit+"),
    "prx": _from("test_prx_fused", "tiny"), "krea2": _from("test_krea2_fused", "tiny"),
    "ernieimage": _from("test_ernieimage_fused", "tiny"),
    "dreamlite": _from("test_dreamlite_fused", "tiny"),
    "cosmos3": _from("test_cosmos3_fused", "tiny"),
    "nucleusmoe": _from("test_nucleusmoe_fused", "tiny"),
    "hidream": _from("test_hidream_fused", "tiny"),
    "hidream-dense": _from("test_hidream_fused", "tiny", build_kw={"kind": "dense"}),
    "cosmos3-relu2": _from("test_cosmos3_fused", "tiny", build_kw={"act": "relu2"}),
    "kandinsky6sr": _from("test_kandinsky6_fused", "tiny", build_kw={"kind": "sr"}, kind="sr"),
    "kandinsky6": _from("test_kandinsky6_fused", "tiny", build_kw={"kind": "k6"}, kind="k6"),
    "kandinsky6-plain": _from("test_kandinsky6_fused", "tiny", build_kw={"kind": "k6-plain"}, kind="k6-plain"),
    "omnigen": _from("test_omnigen_fused", "tiny"), "wananimate2": lambda: _wananimate2(),
    "minimaxh3": _from("test_minimaxh3_fused", "tiny"), "sanawm_refiner": lambda: _sanawm_refiner(),
    "wanvace": _from("test_wan_family_fused", "tiny_vace", call="call_vace"),
    "bria_fibo": _from("test_flux_copies_fused", "tiny_fibo", call="call_fibo"),
    "motif_video-cross": _from("test_motif_video_fused", "cross"),
}


def _sanawm_refiner():
    m = importlib.import_module("test_sanawm_refiner_fused")
    return m.tiny(), m.cached_window   # (an AR window against a filled KV cache)


def _wananimate2():
    m = importlib.import_module("test_wananimate2_fused")
    return m.tiny(), lambda model: m.passes()[0]   # (the reference pass: it writes the KV cache it reads)


def _joyimage(kind):
    m = importlib.import_module("test_joyimage_fused")
    return m.tiny(kind), lambda model: m.call(kind)


def _wan():
    from test_search_wan import call, tiny_wan
    from tiny_diffusers import perturbed

    return perturbed(tiny_wan()), lambda model: call(model, n=2)


def _cast(x, dtype):
    if isinstance(x, torch.Tensor):
        return x.to(dtype) if x.is_floating_point() else x
    if isinstance(x, (list, tuple)):
        return type(x)(_cast(v, dtype) for v in x)
    if isinstance(x, dict):
        return {k: _cast(v, dtype) for k, v in x.items()}
    return x


def _tensors(x):
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for v in x for t in _tensors(v)]
    if isinstance(x, dict):
        return [t for v in x.values() for t in _tensors(v)]
    return []


def _first_calls(unfused, fused, kw):
    """Each fused class's first block (its name), with the arguments the unfused model hands that block."""
    firsts = {}
    for name, m in fused.named_modules():
        if type(m).__name__.startswith("Fused"):
            firsts.setdefault(type(m), name)
    seen, hooks = {}, []
    for name in firsts.values():
        hooks.append(unfused.get_submodule(name).register_forward_pre_hook(
            lambda mod, a, k, name=name: seen.setdefault(name, (a, dict(k))), with_kwargs=True))
    with torch.no_grad():
        unfused(**kw)
    for h in hooks:
        h.remove()
    return [(name, *seen[name]) for name in firsts.values() if name in seen]


def _run(block, args, kwargs):
    """The block's output (or the exception it raised) and how often each of its submodules ran."""
    names = {id(m): n for n, m in block.named_modules() if n}
    counts: Counter = Counter()
    hook = torch.nn.modules.module.register_module_forward_pre_hook(
        lambda m, a: counts.update([names[id(m)]]) if id(m) in names else None)
    try:
        with torch.no_grad():
            return block(*args, **kwargs), counts
    except Exception as e:   # (diffusers' own errors: compared with the fused block's)
        return e, counts
    finally:
        hook.remove()


def _same(unfused_block, fused_block, args, kwargs, what, tol):
    """Where diffusers' forward returns, the fused block returns the same (within ``tol``, relative) having run no
    submodule more often; where diffusers raises (on the CPU, often SDPA refusing mixed dtypes), it may too."""
    want, want_counts = _run(unfused_block, args, kwargs)
    got, got_counts = _run(fused_block, args, kwargs)
    if isinstance(want, Exception):
        return
    assert not isinstance(got, Exception), f"{what}: the fused block raises {got!r}, diffusers returns"
    more = {n: (want_counts[n], c) for n, c in got_counts.items() if c > want_counts[n]}
    assert not more, f"{what}: submodules run more often fused than in diffusers: {more}"
    got_t, want_t = _tensors(got), _tensors(want)
    assert [(t.shape, t.dtype) for t in got_t] == [(t.shape, t.dtype) for t in want_t], what
    for a, b in zip(got_t, want_t):
        err = float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))
        assert err < tol, f"{what}: relative error {err:.3g}"


# blocks whose rows are not their first argument: WanVACE's control blocks run on control_hidden_states (the main
# rows, the first argument, are what their input projection adds to them: conditioning)
ROWS = {"FusedWanVACETransformerBlock": ("a", 2)}


def _variants(block, args, kwargs, change):
    """(what, args, kwargs) with one conditioning input at a time changed by ``change`` (None: left out), then all
    of them at once (DiT's timestep and class labels broadcast only together)."""
    params = list(inspect.signature(type(block).forward).parameters)[1:]
    rows_at = ROWS.get(type(block).__name__) or (("k", "hidden_states") if "hidden_states" in kwargs else ("a", 0))
    rows = kwargs["hidden_states"] if rows_at[0] == "k" else args[0]
    places = [("a", i) for i in range(len(args))] + [("k", k) for k in kwargs]
    every_a, every_k = list(args), dict(kwargs)
    for where in places:
        if where == rows_at:
            continue
        value = args[where[1]] if where[0] == "a" else kwargs[where[1]]
        new = change(value, rows)
        if new is None:
            continue
        a2, k2 = list(args), dict(kwargs)
        for a, k in ((a2, k2), (every_a, every_k)):
            if where[0] == "a":
                a[where[1]] = new
            else:
                k[where[1]] = new
        name = params[where[1]] if where[0] == "a" and where[1] < len(params) else where[1]
        yield f"{type(block).__name__} {name}", tuple(a2), k2
    yield f"{type(block).__name__} all of them", tuple(every_a), every_k


def _batch_of_one(value, rows):
    b = rows.shape[0]
    parts = _tensors(value)
    if parts and all(t.ndim and t.shape[0] == b for t in parts) and isinstance(value, (torch.Tensor, tuple, list)):
        return value[:1] if isinstance(value, torch.Tensor) else type(value)(t[:1] for t in value)
    return None


def _float32(value, rows):
    return _cast(value, torch.float32) if any(t.is_floating_point() for t in _tensors(value)) else None


@pytest.mark.parametrize("name", sorted(MODELS))
def test_broadcast_and_promoted_conditioning_run_as_diffusers(name):
    model, call = MODELS[name]()
    model = model.eval()
    for dtype, change in ((torch.float32, _batch_of_one), (torch.bfloat16, _float32)):
        m = copy.deepcopy(model).to(dtype)
        unfused, fused = pair(m, QuantPlan.block_uniform(m, 4, 8), dtype=dtype)
        kw = _cast(call(m), dtype)
        calls = _first_calls(unfused, fused, kw)
        assert calls, f"{name}: no fused block ran"
        for block_name, args, kwargs in calls:
            ub, fb = unfused.get_submodule(block_name), fused.get_submodule(block_name)
            for what, a, k in _variants(fb, args, kwargs, change):
                # (bf16 rows modulated in float32: diffusers computes parts in float32, the fused path in bf16)
                _same(ub, fb, a, k, f"{name} {dtype} {what}", 1e-3 if dtype == torch.float32 else 3e-2)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_bf16_runs_the_same_fused_kernels_as_float32(name):
    """The checks above leave no bf16 call of the model's own to diffusers' forward: its fused kernel calls in bf16
    are those of float32 (a conditioning input the model hands its blocks in another dtype would drop them)."""
    from test_mmdit_fused import count_kernels

    model, call = MODELS[name]()
    counts = []
    for dtype in (torch.float32, torch.bfloat16):
        m = copy.deepcopy(model.eval()).to(dtype)
        _, fused = pair(m, QuantPlan.block_uniform(m, 4, 8), dtype=dtype)
        counts.append(count_kernels(fused, _cast(call(m), dtype))[0])
    assert counts[0]["ln"] > 0 and counts[1] == counts[0]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_layerwise_casting_keeps_the_blocks_fused(name):
    """diffusers' layerwise casting (float32 compute, bf16 storage) hooks every linear and convolution left unpacked
    (here: each block's to_k, 16-bit): a fused path calls those as modules, so the hooks keep nothing from fusing,
    and the output is the unfused model's under the same casting."""
    from test_mmdit_fused import count_kernels

    from treeq_engine.plan import LayerConfig

    model, call = MODELS[name]()
    model = model.eval()
    plan = QuantPlan.block_uniform(model, 4, 8)
    for n in [n for n in plan.layers if n.endswith(".to_k")]:
        plan = plan.with_layer(n, LayerConfig(16, 16))
    unfused, fused = pair(model, plan)
    kw = call(model)
    plain, _ = count_kernels(fused, kw)
    for m in (unfused, fused):
        m.enable_layerwise_casting(storage_dtype=torch.bfloat16, compute_dtype=torch.float32)
    calls, got = count_kernels(fused, kw)
    with torch.no_grad():
        want = unfused(**kw).sample
    assert calls == plain
    # (within 1e-2: bf16-stored weights put more products on a rounding tie, and where a fused path rounds once
    # less than diffusers (Z-Image's w·(1 + scale)) a tied code may go the other way: measured 5.5e-3 there, 1e-7
    # for the rest)
    for a, b in zip(_tensors(got), _tensors(want)):
        assert float((a - b).norm() / b.norm()) < 1e-2


def _shapes(args, kwargs):
    return [tuple(t.shape) for t in _tensors(list(args)) + _tensors(kwargs)]


@pytest.mark.parametrize("plan", ["W4A8", "half 16-bit"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_a_hook_on_any_part_of_a_fused_block_sees_what_diffusers_shows_it(name, plan):
    """A forward pre-hook on each submodule of each fused block kind in turn (hooks that change nothing): it fires as
    often as on the unfused block, on inputs of the same shapes, and the block's output stays the unfused one's; a
    forward hook scaling the submodule's output moves the fused block's output as the unfused one's. A
    fused path that runs a hooked part by its kernels, or per stream where diffusers runs it on joined rows, must
    leave that part (or the block) to diffusers' computation. With every other linear left 16-bit, the float paths
    run the modules diffusers runs, as diffusers calls them."""
    from treeq_engine.plan import LayerConfig

    model, call = MODELS[name]()
    model = model.eval()
    layers = QuantPlan.block_uniform(model, 4, 8)
    if plan != "W4A8":
        for n in sorted(layers.layers)[::2]:
            layers = layers.with_layer(n, LayerConfig(16, 16))
    unfused, fused = pair(model, layers)
    calls = _first_calls(unfused, fused, call(model))
    assert calls, f"{name}: no fused block ran"
    for block_name, args, kwargs in calls:
        ub, fb = unfused.get_submodule(block_name), fused.get_submodule(block_name)
        for part, _ in ub.named_modules():
            if not part:
                continue
            seen: dict[str, list] = {"unfused": [], "fused": []}
            outs = []
            for tag, block in (("unfused", ub), ("fused", fb)):
                hook = block.get_submodule(part).register_forward_pre_hook(
                    lambda m, a, k, tag=tag: seen[tag].append(_shapes(a, k)), with_kwargs=True)
                try:
                    outs.append(_run(block, args, kwargs)[0])
                finally:
                    hook.remove()
            assert seen["fused"] == seen["unfused"], f"{name} {type(fb).__name__}.{part}"
            if isinstance(outs[0], Exception):
                continue
            for a, b in zip(_tensors(outs[1]), _tensors(outs[0])):
                err = float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))
                assert err < 5e-3, f"{name} {type(fb).__name__}.{part}: relative error {err:.3g}"
            # (a hook that changes the part's output: the fused block's output moves as the unfused one's)
            outs = []
            for block in (ub, fb):
                hook = block.get_submodule(part).register_forward_hook(
                    lambda m, a, out: out * 1.5 if isinstance(out, torch.Tensor) and out.is_floating_point() else None)
                try:
                    outs.append(_run(block, args, kwargs)[0])
                finally:
                    hook.remove()
            if isinstance(outs[0], Exception):
                continue
            for a, b in zip(_tensors(outs[1]), _tensors(outs[0])):
                err = float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))
                assert err < 5e-3, f"{name} {type(fb).__name__}.{part} (output changed): relative error {err:.3g}"


@pytest.mark.parametrize("name", sorted(MODELS))
def test_inference_mode_runs_the_fused_blocks(name):
    """Under ``torch.inference_mode`` (what serving code wraps a pipeline in; its tensors have no version counters,
    which the once-per-forward caches read) every fused block kind runs its kernels and computes what it computes
    under ``no_grad``."""
    from test_mmdit_fused import count_kernels

    model, call = MODELS[name]()
    _, fused = pair(model.eval(), QuantPlan.block_uniform(model, 4, 8))
    kw = call(model)
    want_calls, want = count_kernels(fused, kw)
    with torch.inference_mode():
        got_calls, got = count_kernels(fused, kw)
    assert got_calls == want_calls and want_calls["ln"] > 0
    for a, b in zip(_tensors(got), _tensors(want), strict=True):
        assert torch.equal(a, b)
