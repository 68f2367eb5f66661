"""What the per-model search tests share: a tiny pipeline captured by `treeq capture`, random images for
``--images``, and a transformer's search space as its runner cuts it."""
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


def searched_beats_uniform(tmp_path: Path, src: Sequence[str]) -> Any:
    """`treeq search` (W4A8, K = 2, the uniform baseline) on ``src`` (``--diffusers DIR --calib-inputs FILE``) into
    ``tmp_path / "search"``: TSS's MSE at most the uniform plan's. Returns the plan."""
    import json

    from treeq_engine.plan import QuantPlan

    res = tmp_path / "search"
    assert main(["search", *src, "--budget", "W4A8", "--keep", "2", "--baselines", "uniform", "--no-progress",
                 "--device", "cpu", "--out", str(res)]) == 0
    report = json.loads((res / "report.json").read_text())
    assert report["tss"]["mse"] <= report["baselines"]["uniform"]["mse"] * (1 + 1e-6)
    return QuantPlan.load(res / "plan.json")


def searched_and_packed(tmp_path: Path, pipe_dir: Path, calib: str) -> Path:
    """`treeq search` (W4A8, K = 2, no baselines) on the transformer of ``pipe_dir`` with calibration file ``calib``,
    then `treeq quantize --plan`: the artifact's directory."""
    res, art = tmp_path / "search", tmp_path / "art"
    assert main(["search", "--diffusers", str(pipe_dir), "--calib-inputs", calib, "--budget", "W4A8", "--keep", "2",
                 "--baselines", "", "--no-progress", "--device", "cpu", "--out", str(res)]) == 0
    assert main(["quantize", "--diffusers", str(pipe_dir), "--plan", str(res / "plan.json"), "--out", str(art)]) == 0
    return art


def cut_run(model: Any, kw: dict[str, Any]) -> tuple[Any, tuple, Any, tuple]:
    """``model``'s runner on the call ``kw``, its segments held to the model's own output bit for bit: ``(runner,
    input tuple, the output the metric reads, the state entering the head)``."""
    import torch

    runner = make_runner(model)
    with torch.no_grad():
        want = model(**kw).sample
        state = runner.inputs(**kw)
        assert torch.equal(runner.forward(*state), want)
        head = state
        for s in range(runner.num_segments - 1):
            head = runner.run(s, head)
        return runner, state, runner.output(runner.run(runner.num_segments - 1, head)), head


def write_images(tmp_path: Path, lines: Sequence[str], sizes: dict[str, tuple[int, int]] | None = None) -> str:
    """Random RGB images on disk (64 px, or ``sizes[name]`` = (width, height)), and an --images file naming them by
    ``lines`` (relative paths)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in sorted({n.strip() for line in lines for n in line.split(",")}):
        w, h = (sizes or {}).get(name, (64, 64))
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / name)
    (tmp_path / "images.txt").write_text("\n".join(lines) + "\n")
    return str(tmp_path / "images.txt")


def leaves(model: Any, kw: dict[str, Any]) -> tuple[Any, tuple, SearchSpace, list[str]]:
    """``model``'s runner, its inputs for the call ``kw``, the search space the runner's cut gives (default ties and
    candidates) and its leaves' names in forward order."""
    runner = make_runner(model)
    inputs = runner.inputs(**kw)
    space = SearchSpace.build(model, inputs, forward=lambda *xs: run_segments(runner, xs), tie=runner.tie)
    return runner, inputs, space, [leaf.name for leaf in space.leaves]


def ptq_peft_packed(tmp_path: Path, src: Sequence[str], transformer: Path, *, ptq: Sequence[str] = (),
                    bits: str = "W4A8", batch: int = 4, peft_steps: int = 2) -> tuple[Any, Any]:
    """`treeq ptq` (``bits``, ``ptq`` extra arguments) -> `treeq peft` -> `treeq quantize --ptq --peft` on the
    diffusers transformer ``src`` names (``--diffusers DIR --calib-inputs FILE``), into ``tmp_path`` / ptq, peft,
    art. Returns the transformer under ``transformer`` with that calibration and fine-tuning loaded (fake quant) and
    the artifact loaded into a model rebuilt from its manifest: what the tests compare."""
    from treeq_engine.calib.peft import load_finetuned
    from treeq_engine.calib.ptq import load_calibration
    from treeq_engine.models.diffusers_transformers import load_transformer, rebuild
    from treeq_engine.runtime import artifact

    ptq_dir, peft_dir, art = str(tmp_path / "ptq"), str(tmp_path / "peft"), tmp_path / "art"
    assert main(["ptq", *src, "--calib-batch", str(batch), "--bits", bits, "--max-tokens", "64", "--rounds", "1",
                 *ptq, "--out", ptq_dir]) == 0
    assert main(["peft", *src, "--calib-batch", str(batch), "--ptq", ptq_dir, "--steps", str(peft_steps),
                 "--lr-branch", "0.05", "--out", peft_dir]) == 0
    assert main(["quantize", "--diffusers", str(transformer), "--ptq", ptq_dir, "--peft", peft_dir,
                 "--out", str(art)]) == 0
    direct, _ = load_transformer(str(transformer))
    load_calibration(direct, ptq_dir)
    load_finetuned(direct, peft_dir)
    return direct, artifact.load(art, rebuild(artifact.read_manifest(art)["model_config"]))
