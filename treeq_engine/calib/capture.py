"""Capturing layer inputs on the calibration set, stage by stage so that sequential calibration costs O(layers).

A model is walked as a chain of *stages*. A DiT (anything with ``embed(x, t, y) -> (h, c)``, ``blocks[i](h, c)``
and ``final(h, c)``) has ``embed``, one stage per block and ``final``; a diffusers transformer the search cuts
(``search.diffusers_runner.make_runner``) is cut as the search cuts it (a batch is the runner's input tuple); any
other model is one stage, its whole forward. The runner keeps every calibration batch's input to the current stage. Capturing a layer runs only that stage, and only until the layer has seen its input (the hook
then stops the forward); ``advance`` runs the stage as the model now stands (its layers calibrated) to make the
next stage's inputs. So each layer is calibrated on inputs produced by the already calibrated layers before it,
without re-running the prefix.

Tokens are subsampled per batch with a seeded generator, so a resumed calibration sees exactly the same rows.
Rows the runner calls padding (``real_rows``: PixArt's and Sana's captions, padded to a fixed length,
Qwen-Image's prompts, padded to the longest, hidden by the attention mask, and the rows Z-Image pads a batch with)
are left out first: the output never sees them, so they must not steer a clip.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from ..nn.quant_pointwise import channels_last_rows

CalibBatch = tuple  # positional model inputs, e.g. (x_t, t, y)


class _Captured(Exception):
    """Raised by the hook to stop the forward once the layer's input is taken."""


def is_staged(model: nn.Module) -> bool:
    return all(hasattr(model, a) for a in ("embed", "blocks", "final"))


RealRows = Callable[[str, tuple], "torch.Tensor | None"]


def _stage_fns(model: nn.Module) -> tuple[list[Callable[[tuple], Any]], RealRows, bool]:
    """The stages' functions, which rows of a layer's input are real tokens given its stage's input (the runner's
    ``real_rows``: padding hidden by an attention mask is not), and whether those rows always fit the layer's input
    (a traced rule may not, where a batch's size changes the model's rows: the generic cut's ``rows_exact``)."""
    from ..search.diffusers_runner import diffusers_arch, make_runner

    if diffusers_arch(model) is not None:   # the search's cut; batches are its input tuples
        runner = make_runner(model)
        # (the ignores: mypy cannot type a lambda whose default argument binds the loop variable)
        cut: list[Callable[[tuple], Any]] = [
            lambda inp, s=s: runner.run(s, inp) for s in range(runner.num_segments)]  # type: ignore[misc]
        return cut, runner.real_rows, getattr(runner, "rows_exact", True)
    if not is_staged(model):
        return [lambda inp: model(*inp)], _all_real, True
    fns: list[Callable[[tuple], Any]] = [lambda inp: model.embed(*inp)]
    fns += [lambda inp, b=b: (b(*inp), inp[1]) for b in model.blocks]  # type: ignore[misc]
    fns.append(lambda inp: model.final(*inp))
    return fns, _all_real, True


def _all_real(name: str, inp: tuple) -> torch.Tensor | None:
    return None


class StageRunner:
    """Walks ``model``'s stages over ``batches`` (each a tuple of positional model inputs)."""

    def __init__(self, model: nn.Module, batches: Sequence[CalibBatch], names: Sequence[str]) -> None:
        if not batches:
            raise ValueError("calibration needs at least one batch of model inputs")
        self.model = model
        self.fns, self.real_rows, self.rows_exact = _stage_fns(model)
        self.stage_of = self._assign(names, batches[0])
        self.stage = 0
        self.inputs: list[tuple] = [tuple(b) for b in batches]

    @torch.no_grad()
    def _assign(self, names: Sequence[str], batch: CalibBatch) -> dict[str, int]:
        """Which stage first calls each of ``names`` (one traced pass over the first batch)."""
        where: dict[str, int] = {}
        current = [0]

        def seen(name: str) -> Callable[[nn.Module, tuple], None]:
            def hook(mod: nn.Module, args: tuple) -> None:  # returns None: a pre-hook's value would replace args
                where.setdefault(name, current[0])
            return hook

        handles = [self.model.get_submodule(n).register_forward_pre_hook(seen(n)) for n in names]
        try:
            inp: Any = tuple(batch)
            for i, fn in enumerate(self.fns):
                current[0] = i
                inp = fn(inp)
        finally:
            for h in handles:
                h.remove()
        missing = [n for n in names if n not in where]
        if missing:
            raise RuntimeError(f"layer(s) {missing[:3]} are not called by the model's forward on a calibration batch")
        return where

    @torch.no_grad()
    def capture(self, name: str, max_tokens: int, seed: int = 0) -> torch.Tensor:
        """Float32 ``(M, K)`` inputs of module ``name`` over all batches, at most ``max_tokens`` rows (an equal
        share per batch, drawn without replacement). ``name`` must belong to the current stage."""
        if max_tokens <= 0:
            raise ValueError(f"max_tokens must be positive, got {max_tokens}")
        if self.stage_of[name] != self.stage:
            raise RuntimeError(f"layer {name!r} runs in stage {self.stage_of[name]}, the runner is at {self.stage}")
        per_batch = max(1, -(-max_tokens // len(self.inputs)))
        gen = torch.Generator().manual_seed(seed)
        rows: list[torch.Tensor] = []

        keep: list[torch.Tensor | None] = [None]
        misfit: list[str] = []

        def hook(mod: nn.Module, args: tuple) -> None:
            x = channels_last_rows(mod, args[0].detach())   # (a pointwise convolution's rows are its positions)
            if keep[0] is not None and tuple(x.shape[:-1]) != tuple(keep[0].shape):
                if self.rows_exact:
                    raise RuntimeError(f"{name}: the runner's real-row mask has shape {tuple(keep[0].shape)}, the "
                                       f"layer's input {tuple(x.shape)}")
                if not misfit:
                    warnings.warn(f"{name}: its traced padding rule ({tuple(keep[0].shape)}) does not fit this batch's "
                                  f"input {tuple(x.shape)}: every row of such batches counts", stacklevel=2)
                misfit.append(name)
                keep[0] = None
            if keep[0] is not None:   # padding the output never sees is left out of the statistics
                x = x[keep[0].to(x.device)]
            x = x.reshape(-1, x.shape[-1]).to(torch.float32)
            if x.shape[0] > per_batch:
                x = x[torch.randperm(x.shape[0], generator=gen)[:per_batch].to(x.device)]
            rows.append(x)
            raise _Captured

        handle = self.model.get_submodule(name).register_forward_pre_hook(hook)
        try:
            for inp in self.inputs:
                keep[0] = self.real_rows(name, inp)
                try:
                    self.fns[self.stage](inp)
                except _Captured:
                    pass
        finally:
            handle.remove()
        out = torch.cat(rows)[:max_tokens]
        if out.shape[0] == 0:
            raise ValueError(f"{name}: no input rows to calibrate on (every row of every batch is padding the "
                             "runner's real_rows leaves out)")
        return out

    @torch.no_grad()
    def advance(self) -> None:
        """Run the current stage on every batch (the model as it now is); its outputs feed the next stage."""
        if self.stage + 1 < len(self.fns):
            self.inputs = [self.fns[self.stage](inp) for inp in self.inputs]
        self.stage += 1

    @property
    def num_stages(self) -> int:
        return len(self.fns)


def capture_inputs(model: nn.Module, name: str, batches: Sequence[CalibBatch], max_tokens: int,
                   seed: int = 0) -> torch.Tensor:
    """Inputs of one layer of ``model`` as it is (no calibration walk): the layer's stage inputs are produced by
    running the earlier stages first."""
    runner = StageRunner(model, batches, [name])
    while runner.stage < runner.stage_of[name]:
        runner.advance()
    return runner.capture(name, max_tokens, seed)
