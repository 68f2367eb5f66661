"""What the per-model search tests share: a tiny pipeline captured by `treeq capture`, and a transformer's search
space as its runner cuts it."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from treeq_engine.cli import main
from treeq_engine.search import SearchSpace, make_runner
from treeq_engine.search.diffusers_runner import load_inputs
from treeq_engine.search.evaluator import run_segments

PROMPTS = "a red cat\na dog on the hill\n"   # (two prompts of different lengths)


def captured(tmp_path: Path, pipe: Any, name: str, capture_args: Sequence[str]) -> tuple[Path, Path, str, tuple]:
    """``pipe`` saved under ``tmp_path / name``, two prompts written, `treeq capture` run on them with
    ``capture_args`` (steps, timesteps, size, guidance) on the CPU: ``(pipeline dir, prompts file, calibration file,
    its inputs as a fresh runner of the saved transformer loads them)``."""
    pipe_dir = tmp_path / name
    pipe.save_pretrained(pipe_dir)
    prompts = tmp_path / "p.txt"
    prompts.write_text(PROMPTS)
    calib = str(tmp_path / "calib.safetensors")
    assert main(["capture", "--pipeline", str(pipe_dir), "--prompts", str(prompts), *capture_args, "--device", "cpu",
                 "--out", calib]) == 0
    transformer = type(pipe.transformer).from_pretrained(pipe_dir / "transformer").eval()
    return pipe_dir, prompts, calib, load_inputs(calib, make_runner(transformer))


def leaves(model: Any, kw: dict[str, Any]) -> tuple[Any, tuple, SearchSpace, list[str]]:
    """``model``'s runner, its inputs for the call ``kw``, the search space the runner's cut gives (default ties and
    candidates) and its leaves' names in forward order."""
    runner = make_runner(model)
    inputs = runner.inputs(**kw)
    space = SearchSpace.build(model, inputs, forward=lambda *xs: run_segments(runner, xs), tie=runner.tie)
    return runner, inputs, space, [leaf.name for leaf in space.leaves]
