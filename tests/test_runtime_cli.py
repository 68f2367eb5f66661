"""`treeq quantize` then `treeq sample` on the shipped digits DiT: the artifact reproduces the packed model."""
import json

import pytest
import torch

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
    with pytest.raises(SystemExit, match="exactly one of --plan"):
        main(["quantize", "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="no such file"):
        main(["quantize", "--model", str(tmp_path / "nope.pt"), "--uniform", "W4A4", "--out", str(tmp_path / "x")])
    with pytest.raises(artifact.ArtifactError, match="no manifest"):
        load_artifact_model(str(tmp_path))
    with pytest.raises(SystemExit, match="labels must be"):
        main(["sample", "--labels", "a,b", "--steps", "2", "--out", str(tmp_path / "s.png")])
