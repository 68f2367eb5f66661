"""`treeq quantize` then `treeq sample` on the shipped digits DiT: the artifact reproduces the packed model."""
import json
import re

import pytest
import torch

from cli_refusal import refused
from treeq_engine.cli import main
from treeq_engine.runtime import artifact
from treeq_engine.runtime.cli import load_artifact_model, load_fp_model


def test_quantize_then_sample(tmp_path, capsys):
    out = tmp_path / "w4a8"
    assert main(["quantize", "--uniform", "W4A8", "--out", str(out)]) == 0
    man = json.loads((out / "manifest.json").read_text())
    assert man["model_config"]["arch"] == "dit" and man["layout_version"] == 1
    assert "MiB packed" in capsys.readouterr().out
    model = load_artifact_model(str(out))
    fp = load_fp_model("digits")[0]
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    t, y = torch.tensor([10, 900]), torch.tensor([3, 8])
    with torch.no_grad():
        q, f = model(x, t, y), fp(x, t, y)
    rel = float((q - f).norm() / f.norm())
    assert 0 < rel < 0.2  # quantized, yet close to FP at W4A8
    png = tmp_path / "s.png"
    assert main(["sample", "--artifact", str(out), "--labels", "1,7", "--steps", "3", "--threads", "1",
                 "--out", str(png)]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_errors(tmp_path):
    refused("exactly one of --plan", ["quantize", "--out", str(tmp_path / "x")])
    refused("no such file",
            ["quantize", "--model", str(tmp_path / "nope.pt"), "--uniform", "W4A4", "--out", str(tmp_path / "x")])
    with pytest.raises(artifact.ArtifactError, match="no manifest"):
        load_artifact_model(str(tmp_path))
    refused("labels must be", ["sample", "--labels", "a,b", "--steps", "2", "--out", str(tmp_path / "s.png")])
    refused(r"--steps .0.: a positive number of steps", ["sample", "--steps", "0", "--out", str(tmp_path / "s.png")])
    refused("--steps .ddimx.", ["sample", "--steps", "ddimx", "--out", str(tmp_path / "s.png")])
    refused("--steps .0.", ["sample", "--model", str(tmp_path / "nope.pt"), "--steps", "0",   # (before it loads)
                            "--out", str(tmp_path / "s.png")])


def test_user_mistakes_are_one_line_errors(tmp_path, capsys):
    """What a user gets wrong ends in one line naming it, exit 2 — not a traceback (TREEQ_DEBUG=1 shows one)."""
    import json

    import torch

    from treeq_engine.plan import LayerConfig, QuantPlan

    plan = tmp_path / "plan.json"
    QuantPlan({"blocks.20.attn.qkv": LayerConfig(4, 4)}).save(plan)
    cases = [(["quantize", "--plan", str(plan), "--out", str(tmp_path / "a")], "does not have"),
             (["quantize", "--plan", str(tmp_path / "nope.json"), "--out", str(tmp_path / "a")], "No such file"),
             (["sample", "--artifact", str(tmp_path / "nowhere"), "--out", str(tmp_path / "s.png")],
              "no such artifact directory"),
             (["sample", "--labels", "0,12", "--steps", "2", "--out", str(tmp_path / "s.png")],
              r"class indices in \[0, 9\]")]
    if not torch.cuda.is_available():
        cases.append((["sample", "--device", "cuda", "--out", str(tmp_path / "s.png")], "no CUDA device"))
    for argv, msg in cases:
        try:
            rc = main(argv)
        except SystemExit as e:   # argument checks exit with their message
            rc, err = 2, str(e)
        else:
            err = capsys.readouterr().err
        assert rc == 2 and re.search(msg, err) and "Traceback" not in err, (argv, err)
    (tmp_path / "bad.json").write_text(json.dumps({"schema": "treeq-plan", "version": 99}))
    assert main(["quantize", "--plan", str(tmp_path / "bad.json"), "--out", str(tmp_path / "a")]) == 2
    assert "version 99 is not supported" in capsys.readouterr().err


def test_quantize_from_ptq_and_peft(tmp_path):
    """search/ptq/peft -> quantize: the artifact packs the calibrated codes, clips, smoothing folds and the
    fine-tuned Monarch branches, and runs what the fake-quant (simulated) model runs."""
    from treeq_engine.calib.peft import load_finetuned
    from treeq_engine.calib.ptq import load_calibration

    torch.set_num_threads(1)
    ptq, peft = tmp_path / "ptq", tmp_path / "peft"
    common = ["--calib-samples", "2", "--sample-steps", "2", "--max-tokens", "64", "--rounds", "1"]
    assert main(["ptq", "--bits", "W4A8", "--branch", "monarch", "--branch-params", "4", "--smooth-alphas", "0.5",
                 "--out", str(ptq), *common]) == 0
    assert main(["peft", "--ptq", str(ptq), "--steps", "2", "--batch", "2", "--sample-steps", "2",
                 "--out", str(peft)]) == 0
    out = tmp_path / "art"
    assert main(["quantize", "--ptq", str(ptq), "--peft", str(peft), "--out", str(out)]) == 0
    packed = load_artifact_model(str(out))
    sim = load_fp_model("digits")[0]
    plan = load_calibration(sim, ptq)
    load_finetuned(sim, peft)
    assert plan.layers["blocks.0.attn.qkv"].branch is not None
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    t, y = torch.tensor([5, 700]), torch.tensor([2, 9])
    with torch.no_grad():
        a, b = packed(x, t, y).float(), sim(x, t, y)
    assert float((a - b).norm() / b.norm()) < 0.02   # bf16 runtime vs float32 simulation (measured 2.3e-3)
    refused("--peft needs", ["quantize", "--peft", str(peft), "--out", str(tmp_path / "x")])
    refused("brings its own plan", ["quantize", "--ptq", str(ptq), "--uniform", "W4A4", "--out", str(tmp_path / "x")])


def test_sample_compiled_equals_eager(tmp_path, capsys):
    """`treeq sample --compile`: the packed model traces whole (one graph, no break) and samples what eager does."""
    import numpy as np
    import torch._dynamo as dynamo
    from PIL import Image

    art = tmp_path / "w4a4"
    assert main(["quantize", "--uniform", "W4A4", "--out", str(art)]) == 0
    common = ["sample", "--artifact", str(art), "--labels", "2,5", "--steps", "3", "--threads", "1"]
    assert main(common + ["--out", str(tmp_path / "eager.png")]) == 0
    dynamo.reset()
    dynamo.utils.counters.clear()
    capsys.readouterr()
    assert main(common + ["--compile", "default", "--compile-backend", "aot_eager",
                          "--out", str(tmp_path / "compiled.png")]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["compile"] == "default"
    assert dynamo.utils.counters["stats"]["unique_graphs"] >= 1 and not dynamo.utils.counters["graph_break"]
    eager, compiled = (np.asarray(Image.open(tmp_path / f"{n}.png"), dtype=np.int16) for n in ("eager", "compiled"))
    assert eager.shape == compiled.shape and np.abs(eager - compiled).max() <= 1
    dynamo.reset()


def test_sample_compile_mistakes(tmp_path):
    out = ["--steps", "2", "--out", str(tmp_path / "s.png")]
    refused("--graph and --compile", ["sample", "--graph", "--compile", "default"] + out)
    refused("goes with --compile", ["sample", "--compile-backend", "aot_eager"] + out)
    refused("not a torch.compile backend", ["sample", "--compile", "default", "--compile-backend", "nope"] + out)


def test_quantize_does_not_destroy_what_out_holds(tmp_path, monkeypatch):
    """An artifact in --out is replaced only with --overwrite; a file or a directory of other things is refused; the
    files are written whole (renamed into place), readable alike; a save cut off leaves no manifest (no artifact),
    never new weights under the old manifest."""
    import os
    import stat

    art = tmp_path / "art"
    assert main(["quantize", "--uniform", "W8A8", "--out", str(art)]) == 0
    before = (art / "model.safetensors").read_bytes()
    refused("already holds an artifact made from dit; pass --overwrite",
            ["quantize", "--uniform", "W4A4", "--out", str(art)])
    assert (art / "model.safetensors").read_bytes() == before
    assert main(["quantize", "--uniform", "W4A4", "--out", str(art), "--overwrite"]) == 0
    assert (art / "model.safetensors").read_bytes() != before
    assert sorted(f.name for f in art.iterdir()) == ["manifest.json", "model.safetensors", "plan.json"]
    modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in art.iterdir()}
    assert len(set(modes.values())) == 1, modes
    (tmp_path / "ptq").mkdir()
    (tmp_path / "ptq" / "ptq.json").write_text("{}")
    refused(r"holds other files \(ptq.json\)", ["quantize", "--uniform", "W4A4", "--out", str(tmp_path / "ptq")])
    (tmp_path / "f").write_text("")
    refused("is a file", ["quantize", "--uniform", "W4A4", "--out", str(tmp_path / "f")])

    import safetensors.torch

    def cut_off(state, path, *a, **k):
        with open(path, "wb") as f:
            f.write(b"\0" * 10)
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", cut_off)
    assert main(["quantize", "--uniform", "W8A8", "--out", str(art), "--overwrite"]) == 130
    assert not (art / "manifest.json").exists() and (art / "model.safetensors").read_bytes() != b"\0" * 10
    assert not [f for f in os.listdir(art) if f.startswith(".")]
    with pytest.raises(artifact.ArtifactError, match="no manifest.json"):
        load_artifact_model(str(art))
    monkeypatch.undo()
    # what a cut-off save left is replaced only with --overwrite; a partial file a killed process left goes then
    refused(r"holds model.safetensors and plan.json but no manifest.json \(a save cut off\?\); pass --overwrite",
            ["quantize", "--uniform", "W8A8", "--out", str(art)])
    (art / ".model.safetensors.partial").write_bytes(b"\0")
    assert main(["quantize", "--uniform", "W8A8", "--out", str(art), "--overwrite"]) == 0
    assert sorted(os.listdir(art)) == ["manifest.json", "model.safetensors", "plan.json"]
    load_artifact_model(str(art))
    # another tool's manifest is not an artifact; an input inside --out is never written over
    other = tmp_path / "site"
    other.mkdir()
    (other / "manifest.json").write_text('{"name": "site"}')
    refused(r"holds other files \(manifest.json\)", ["quantize", "--uniform", "W8A8", "--out", str(other),
                                                       "--overwrite"])
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "model.safetensors").write_bytes((art / "model.safetensors").read_bytes())
    for extra in ([], ["--overwrite"]):
        refused("--model .* lies in --out", ["quantize", "--model", str(ckpt / "model.safetensors"),
                                             "--uniform", "W8A8", "--out", str(ckpt), *extra])
