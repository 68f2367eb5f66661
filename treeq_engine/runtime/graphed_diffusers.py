"""A diffusers transformer whose calls replay CUDA graphs, inside the user's own pipeline::

    graph_pipeline(pipe)        # pipe.transformer (FP, or quantized by runtime.quantize / an artifact) now replays
    images = pipe(prompt=prompts, num_inference_steps=20).images
    ungraph_pipeline(pipe)      # back to eager calls

A pipeline calls its transformer once per denoising step with the same shapes, so each call shape is captured
once (on first use, after a warm-up) and every later step is one graph replay instead of hundreds of kernel
launches, which at batch 1–8 is what sets the time (docs/sources.md). For DiT and PixArt the call's
arguments are brought to the search runner's input tuple (``DiffusersRunner.inputs``: the timestep broadcast to
the batch, a missing caption mask as ones, what the runner cannot reproduce an error) and the graph runs the
runner's forward, which tests hold bit-identical to the transformer's own. Any other transformer (SD3, Flux,
Sana, ...) is captured through its own forward: its tensor arguments are the graph's inputs, and its other
arguments (None, numbers, strings, plain lists and dicts of them; anything else is refused) are part of the key,
so a call that changes one is captured anew. A forward that reads a value back to the host cannot be captured;
that is an error naming the model.

The transformer stays the pipeline's object: ``graph_transformer`` gives it, in place, a subclass of its own class
(same name) whose ``forward`` replays. So the pipeline, its config, ``isinstance`` checks and ``save_pretrained``
see the model they saw (a wrapper module would be dropped by ``save_pretrained``), and ``ungraph_transformer``
gives the class back.

What a graph cannot follow, and what is done about it:

* A graph holds the addresses of everything it read. Values copied into the same tensors (an in-place
  ``load_state_dict``, an optimizer step) are read by the next replay. Tensors or modules *replaced* are not:
  moving or casting the whole model (``pipe.to``, ``.half()``), ``runtime.quantize``, ``set_layout`` and
  ``fuse_blocks`` forget its graphs; after anything else that replaces them (``load_state_dict(assign=True)``,
  ``param.data = …``, casting one submodule, swapping modules) call ``reset_graphs``.
* A replay runs none of the Python around the kernels, so hooks on the model's modules (diffusers' caches,
  layerwise casting, group offload) or accelerate/diffusers hooks on the model (model CPU offload moves it every
  call) are refused, when graphing and again at each capture. Plain hooks on the model itself run (they are
  called around ``forward``).
* Autocast, on and its dtype, is part of a call's key; under it the capture runs with autocast's weight cache off
  (the cast weights of a cached capture are freed when the autocast block exits).
* Each call shape keeps its own graph and activation memory until ``reset_graphs``; each replay's output is
  copied out (the graph's buffer is overwritten by the next replay). The class-label range is checked when a
  shape is captured and when the labels tensor changes (a pipeline passes the same one at every step), not at
  every replay (a read-back that would stall the CPU). A graphed model does not deep-copy, pickle or
  ``torch.compile`` (its forward is left out of compilation): ungraph it first.
"""
from __future__ import annotations

import contextlib
import inspect
import weakref
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from ..models.diffusers_transformers import experts
from .graphs import GraphedStep

StepFactory = Callable[[Callable[..., torch.Tensor], Sequence[torch.Tensor]], Callable[..., torch.Tensor]]
_STATE = "_treeq_graphs"


def _hooks(model: nn.Module) -> list[str]:
    """Hooks that a replay would not run, or that move the model every call: ``"<module>: <kind>"``. (Plain
    forward hooks on ``model`` itself are called around its ``forward``, so they run.)"""
    found = []
    for name, module in model.named_modules():
        kinds = [k for k in ("_forward_hooks", "_forward_pre_hooks") if name and getattr(module, k, None)]
        kinds += ["_hf_hook"] if hasattr(module, "_hf_hook") else []
        registry = getattr(module, "_diffusers_hook", None)   # pipelines with cache support (Flux's cache_context)
        if registry is not None and getattr(registry, "hooks", True):   # leave an empty registry on the model
            kinds.append("_diffusers_hook")
        found += [f"{name or type(model).__name__}: {k}" for k in kinds]
    return found


def _refuse_hooks(model: nn.Module) -> None:
    hooks = _hooks(model)
    if hooks:
        more = ", …" if len(hooks) > 3 else ""
        raise ValueError(f"{type(model).__name__} carries hooks ({', '.join(hooks[:3])}{more}; e.g. model CPU "
                         "offload or a diffusers cache): a graph replays its modules without calling them. Remove "
                         "them before graphing")


def _frozen(value: Any, where: str) -> Any:
    """A call's non-tensor argument as part of a replay key (hashable, compared by value): None, numbers, strings
    and lists, tuples and dicts of them. Anything else (a tensor inside a dict, an object) has no value a key could
    compare, so the call is refused rather than replayed with what the capture saw."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_frozen(v, where) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple(sorted((str(k), _frozen(v, where)) for k, v in value.items())))
    raise TypeError(f"{where} is a {type(value).__name__}: a graphed call replays what it captured, so its "
                    "non-tensor arguments must be plain values (None, numbers, strings, lists and dicts of them)")


class _Graphs:
    """One model's captured steps, keyed by call shape."""

    def __init__(self, model: nn.Module, original: type, factory: StepFactory) -> None:
        from ..search.diffusers_runner import DiffusersRunner, fused_arch

        self.model = model
        self.original = original
        self.signature = inspect.signature(getattr(original, "forward"))
        # DiT and PixArt: the runner canonicalises the calls (and checks the labels); any other transformer is
        # captured through its own forward, its tensor arguments the graph's inputs
        self.runner = DiffusersRunner(model) if fused_arch(model) else None
        self.factory = factory
        self.steps: dict[tuple, Callable[..., torch.Tensor]] = {}
        self.checked: Any = None   # a weak reference to the labels tensor last checked

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            bound = self.signature.bind(self.model, *args, **kwargs)
        except TypeError as e:
            raise TypeError(f"{self.original.__name__}: {e}") from None
        bound.apply_defaults()
        call = {k: v for k, v in bound.arguments.items() if k != "self"}
        return_dict = call.pop("return_dict", True)
        out = self._runner_call(call) if self.runner is not None else self._forward_call(call)
        if not return_dict:
            return (out,)
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        return Transformer2DModelOutput(sample=out)

    def _autocast(self) -> tuple[bool, Any, Any]:
        """(on, dtype, the context a capture runs in): autocast is part of the key, its weight cache off."""
        on = torch.is_autocast_enabled("cuda")
        dtype = torch.get_autocast_dtype("cuda") if on else None
        ctx = torch.autocast("cuda", dtype=dtype, enabled=True, cache_enabled=False) if on \
            else contextlib.nullcontext()
        return on, dtype, ctx

    def _forward_call(self, call: dict[str, Any]) -> torch.Tensor:
        """Any other transformer: its tensor arguments (by name) feed the graph, the rest is part of the key."""
        kinds = {name: p.kind for name, p in self.signature.parameters.items()}
        if any(kinds.get(k) in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD) for k in call):
            raise TypeError(f"{self.original.__name__}: a graphed call takes named arguments only (its forward "
                            "has *args / **kwargs)")
        names = [k for k, v in call.items() if torch.is_tensor(v)]
        static = {k: v for k, v in call.items() if not torch.is_tensor(v)}
        inputs = [call[k] for k in names]
        autocast, dtype, ctx = self._autocast()
        key = (tuple((k, tuple(t.shape), t.dtype, t.device) for k, t in zip(names, inputs)),
               tuple((k, _frozen(v, f"{self.original.__name__} argument {k!r}")) for k, v in static.items()),
               autocast, dtype)
        step = self.steps.get(key)
        if step is None:
            _refuse_hooks(self.model)   # (hooks added since graphing)
            forward = _eager(self.model, "forward")

            def run(*xs: torch.Tensor) -> torch.Tensor:
                return forward(**static, **dict(zip(names, xs)), return_dict=False)[0]

            with ctx:
                try:
                    step = self.steps[key] = self.factory(run, inputs)
                except RuntimeError as e:   # e.g. a host sync (.item(), a data-dependent branch) inside forward
                    raise RuntimeError(f"{self.original.__name__}'s forward could not be captured as a CUDA graph "
                                       f"({e}); call it without graphs (ungraph_transformer)") from e
        return step(*inputs).clone()

    def _runner_call(self, call: dict[str, Any]) -> torch.Tensor:
        from ..search.diffusers_runner import DiffusersRunner

        assert self.runner is not None   # (__call__ comes here only when there is a runner)
        # checks that read values back from the device (a host sync) only for a new shape or new labels
        labels = call.get("class_labels")
        fresh = torch.is_tensor(labels) and (self.checked is None or self.checked() is not labels)
        inputs = self.runner.inputs(**call, check_values=fresh)
        if fresh:
            self.checked = weakref.ref(labels)
        autocast, dtype, ctx = self._autocast()
        key = tuple((tuple(t.shape), t.dtype, t.device) for t in inputs) + (autocast, dtype)
        step = self.steps.get(key)
        if step is None:
            _refuse_hooks(self.model)   # (hooks added since graphing)
            if not fresh:   # a new shape gets every check, values included
                self.runner.inputs(**call)
            runner = DiffusersRunner(self.model)   # one per shape: PixArt's patch grid is per shape
            with ctx:
                step = self.steps[key] = self.factory(lambda *xs: runner.forward(*xs), inputs)
        return step(*inputs).clone()


def _eager_class(model: nn.Module) -> type[Any]:
    """``model``'s class without the graphed mixin (its own, or the one a graphed subclass was made from)."""
    return next(k for k in type(model).__mro__ if not issubclass(k, _GraphedForward))


def _eager(model: nn.Module, name: str) -> Callable:
    """``model``'s own method ``name`` past the graphed mixin (for an instance made without graph state, e.g. by
    ``type(graphed).from_pretrained``, or a hook holding the graphed forward after ungraphing)."""
    return getattr(_eager_class(model), name).__get__(model)


class _GraphedForward:
    """Mixed in before a diffusers transformer's class: ``forward`` replays, moving or casting forgets."""

    @torch.compiler.disable
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        state = self.__dict__.get(_STATE)
        if state is None:
            return _eager(self, "forward")(*args, **kwargs)  # type: ignore[arg-type]
        return state(*args, **kwargs)

    def _apply(self, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        state = self.__dict__.get(_STATE)
        if state is not None:
            state.steps.clear()   # .to / .cuda / .half move or recast what the graphs read
        return _eager(self, "_apply")(fn, *args, **kwargs)  # type: ignore[arg-type]

    def __deepcopy__(self, memo: dict) -> Any:
        raise TypeError("a graphed transformer holds CUDA graphs and does not copy: ungraph_transformer() it first")

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError("a graphed transformer holds CUDA graphs and does not pickle: ungraph_transformer() it first")


_SUBCLASSES: dict[type, type] = {}


def is_graphed(model: nn.Module) -> bool:
    return isinstance(model, _GraphedForward) and model.__dict__.get(_STATE) is not None


def graph_count(model: nn.Module) -> int:
    """How many call shapes of a graphed ``model`` have a captured graph (0 when it is not graphed)."""
    return len(getattr(model, _STATE).steps) if is_graphed(model) else 0


def reset_graphs(model: nn.Module) -> None:
    """Forget every captured graph of ``model`` (captured again on next use): after changing its weights."""
    if is_graphed(model):
        getattr(model, _STATE).steps.clear()


def graph_transformer(model: nn.Module, *, step_factory: StepFactory | None = None) -> nn.Module:
    """Make ``model`` (a diffusers transformer: DiT and PixArt through the search runner, any other through its
    own forward) replay CUDA graphs, in place (see the module
    docstring); returns it. ``step_factory`` makes the replayable step from ``(fn, example inputs)`` (default
    :class:`GraphedStep`, which needs CUDA)."""
    if is_graphed(model):
        return model
    if step_factory is None and not torch.cuda.is_available():
        raise RuntimeError("graphs need a CUDA device; none is available (run the pipeline eagerly)")
    cls = _eager_class(model)   # (also for a stateless instance of a graphed subclass)
    if "return_dict" not in inspect.signature(cls.forward).parameters:
        raise TypeError(f"graph_transformer takes a diffusers transformer (a forward with return_dict), got "
                        f"{cls.__name__}")
    _refuse_hooks(model)
    state = _Graphs(model, cls, step_factory or GraphedStep)
    sub = _SUBCLASSES.get(cls)
    if sub is None:   # same name and module: configs, checkpoints and the pipeline's records read as before
        sub = _SUBCLASSES[cls] = type(cls.__name__, (_GraphedForward, cls),
                                      {"__module__": cls.__module__, "__qualname__": cls.__qualname__})
    object.__setattr__(model, _STATE, state)
    model.__class__ = sub
    return model


def ungraph_transformer(model: nn.Module) -> nn.Module:
    """Undo :func:`graph_transformer`: eager calls, the graphs released; returns ``model``."""
    if isinstance(model, _GraphedForward):
        model.__dict__.pop(_STATE, None)
        model.__class__ = _eager_class(model)  # type: ignore[assignment]
    return model


def graph_pipeline(pipe: Any, *, step_factory: StepFactory | None = None) -> Any:
    """:func:`graph_transformer` on ``pipe.transformer`` (and a two-expert pipeline's ``transformer_2``); returns
    ``pipe``."""
    for model in experts(pipe):
        graph_transformer(model, step_factory=step_factory)
    return pipe


def ungraph_pipeline(pipe: Any) -> Any:
    """:func:`ungraph_transformer` on each of ``pipe``'s transformers; returns ``pipe``."""
    for model in experts(pipe):
        ungraph_transformer(model)
    return pipe
