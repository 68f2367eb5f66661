"""`treeq search` end to end on a small random DiT, the calibration cache, resume, plan checking."""
import json

import pytest
import torch

from tinydit import one_thread  # noqa: F401
from treeq_engine.cli import main
from treeq_engine.search.calibration import CalibrationConfig, CalibrationSet, collect, load_or_collect
from treeq_engine.search.cli import random_dit

pytestmark = pytest.mark.usefixtures("one_thread")

BASE = ["search", "--random-config", "DiT-test", "--calib-trajectories", "3", "--calib-steps", "4",
        "--calib-timesteps", "2", "--keep", "4", "--batch", "6", "--group", "8", "--no-progress"]


def test_calibration_is_collected_along_the_trajectory_and_cached(tmp_path):
    model = random_dit("DiT-test-1ch", seed=1)
    cfg = CalibrationConfig(trajectories=3, steps=5, timesteps=3, cfg_scale=2.0, seed=4)
    calib = collect(model, cfg)
    assert len(calib) == 3 * 3 * 2                           # trajectories × kept steps × [cond; uncond]
    assert calib.x.shape == (18, 1, 8, 8) and calib.x.dtype == torch.float32
    assert sorted(set(calib.y.tolist())) == [0, 1, 2, 10]    # classes cycled, and the null class of guidance
    t = calib.t.reshape(3, 6)                                # step-major: first, middle and last sampling steps
    assert (t == t[:, :1]).all() and t[0, 0] > t[1, 0] > t[2, 0] == 0
    # sampler weights c(t)²: the last step (t = 0, β = 1e-4, √(1 − ᾱ) = 0.01) weighs c² ≈ 1e-4
    w = calib.w.reshape(3, 6)
    assert (w == w[:, :1]).all() and w[2, 0] == pytest.approx(1e-4, rel=1e-3) and w[0, 0] > 0.1
    assert calib.weights("sampler") is calib.w and calib.weights("eps") is None
    with pytest.raises(ValueError, match="metric must be one of"):
        calib.weights("psnr")
    again = load_or_collect(model, cfg, tmp_path)
    files = list(tmp_path.glob("calib-*.safetensors"))
    assert len(files) == 1
    torch.testing.assert_close(again.x, calib.x, rtol=0, atol=0)       # deterministic by seed
    with torch.no_grad():
        model.blocks[0].mlp.fc1.weight.add_(1.0)                       # another model: collected afresh
    load_or_collect(model, cfg, tmp_path)
    assert len(list(tmp_path.glob("calib-*.safetensors"))) == 2
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="cannot read calibration set"):
        CalibrationSet.load(bad)
    for f in tmp_path.glob("calib-*.safetensors"):    # damaged cache files are collected again
        f.write_bytes(b"truncated")
    assert load_or_collect(model, cfg, tmp_path).x.shape == calib.x.shape
    with pytest.raises(ValueError, match="timesteps <= steps"):
        CalibrationConfig(steps=4, timesteps=5)


def test_cli_search_check_and_resume(tmp_path, capsys):
    out = tmp_path / "w4a4"
    assert main(BASE + ["--budget", "W4A4", "--baselines", "uniform,random", "--random-plans", "3",
                        "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "budget W4A4" in text and "tss" in text and "uniform" in text and "random" in text
    report = json.loads((out / "report.json").read_text())
    assert report["leaves"] == 10 and report["calibration_samples"] == 6
    assert report["tss"]["mse"] <= report["baselines"]["uniform"]["mse"]
    assert (out / "pareto.png").exists() and list(out.glob("calib-*.safetensors"))

    assert main(["search", "--random-config", "DiT-test", "--budget", "W4A4", "--check", str(out / "plan.json")]) == 0
    assert "valid" in capsys.readouterr().out
    assert main(BASE + ["--budget", "W2A3", "--check", str(out / "plan.json")]) == 2
    assert "violates the budget W2A3" in capsys.readouterr().err

    # a finished state resumes to the same plan without scoring anything new
    layers = json.loads((out / "plan.json").read_text())["layers"]
    state = json.loads((out / "tss_state.json").read_text())
    assert main(BASE + ["--budget", "W4A4", "--out", str(out), "--resume"]) == 0
    again = json.loads((out / "report.json").read_text())
    assert again["tss"]["mse"] == report["tss"]["mse"] and again["tss"]["evaluations"] == state["evaluations"]
    assert json.loads((out / "plan.json").read_text())["layers"] == layers
    assert json.loads((out / "tss_state.json").read_text()) == state
    assert "starting over" not in capsys.readouterr().err
    assert main(BASE + ["--budget", "W4A4", "--out", str(out)]) == 0   # (without --resume: said so)
    assert "note: starting over in" in capsys.readouterr().err
    assert main(BASE + ["--budget", "W4A4", "--out", str(tmp_path / "fresh"), "--resume"]) == 0
    assert "holds no tss_state.json: starting from the beginning" in capsys.readouterr().err


def test_cli_warm_start_and_environment_plan(tmp_path, capsys):
    out = tmp_path / "w"
    assert main(BASE + ["--budget", "W4A4", "--keep", "3", "--warm-start", "ip", "--env-plan", "ip",
                        "--baselines", "ip", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "env plan:ip" in text
    report = json.loads((out / "report.json").read_text())
    assert report["elites"] == ["ip"] and report["env_plan"] == "ip" and (out / "warm_start_ip.json").exists()
    assert report["tss"]["mse"] <= report["baselines"]["ip"]["mse"] * (1 + 1e-9)
    assert report["tss"]["evaluations_total"] == report["tss"]["evaluations"] + report["baselines"]["ip"]["evaluations"]


@pytest.mark.parametrize("args,msg", [
    (["--budget", "W4Z4"], "cannot read budget"),
    (["--budget", "W4A4", "--w-bits", "2,5"], "weight bit-width(s) [5]"),
    (["--budget", "W4A4", "--lam", "2"], "λ must be in"),
    (["--budget", "W1A3"], "no plan meets the budget W1A3"),
    (["--budget", "W4A4", "--env", "W4A4.5"], "integer bits"),
    (["--budget", "W4A4", "--warm-start", "nope.json"], "plan file nope.json does not exist"),
])
def test_cli_errors(args, msg, capsys, tmp_path):
    out = tmp_path / "run"   # (a run there before: refused options leave it as it is, and say nothing of it)
    out.mkdir()
    (out / "tss_state.json").write_text("{}")
    assert main(BASE + args + ["--calib-cache", str(tmp_path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert msg in err and "starting over" not in err and (out / "tss_state.json").read_text() == "{}"
    if "--lam" in args:   # (refused before the calibration set is sampled)
        assert not list(tmp_path.glob("calib-*"))
    assert main(BASE + args + ["--calib-cache", str(tmp_path), "--out", str(tmp_path / "new"), "--resume"]) == 2
    assert "note" not in capsys.readouterr().err   # (no "nothing to resume" before the error either)
