"""SmoothQuant folded into a DiT block: function-preserving folds, the per-layer choice, and PTQ with it."""
import copy

import pytest
import torch
import torch.nn as nn

from gmb_standin import assert_same_up_to_rounding_flips, tiny_dit, trajectory
from treeq_engine import runtime
from treeq_engine.calib import smooth
from treeq_engine.calib.capture import capture_inputs
from treeq_engine.calib.ptq import PTQConfig, calibrate, load_calibration
from treeq_engine.nn import quantizable_linears
from treeq_engine.plan import QuantPlan, is_block_layer


@pytest.mark.parametrize("leaf", ["attn.qkv", "attn.proj", "mlp.fc1"])
def test_fold_preserves_function_and_scales_the_input(leaf, gen):
    model = tiny_dit(seed=2)
    batches = trajectory(model, n=3, steps=2, seed=1)
    name = f"blocks.1.{leaf}"
    with torch.no_grad():
        ref = [model(*b) for b in batches]
    x_before = capture_inputs(model, name, batches, 10_000)
    w_before = model.get_submodule(name).weight.detach().clone()
    s = torch.rand(w_before.shape[1], generator=gen) * 3 + 0.2
    smooth.fold(model, name, s)
    with torch.no_grad():
        for b, r in zip(batches, ref):
            torch.testing.assert_close(model(*b), r, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(capture_inputs(model, name, batches, 10_000), x_before / s, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model.get_submodule(name).weight.detach(), w_before * s)


def test_factors_and_errors(gen):
    x = torch.randn(50, 6, generator=gen)
    x[:, 2] *= 20
    w = torch.randn(4, 6, generator=gen)
    s = smooth.smoothing_factors(x, w, 0.5)
    torch.testing.assert_close(s, (x.abs().amax(0) ** 0.5) / (w.abs().amax(0) ** 0.5))
    assert int(s.argmax()) == 2
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        smooth.smoothing_factors(x, w, 1.5)
    model = tiny_dit()
    with pytest.raises(ValueError, match="only"):
        smooth.fold(model, "blocks.0.mlp.fc2", torch.ones(48))
    with pytest.raises(ValueError, match="positive and finite"):
        smooth.fold(model, "blocks.0.attn.qkv", -torch.ones(24))
    plain = nn.Module()
    plain.attn = nn.Module()
    plain.attn.qkv = nn.Linear(8, 24)
    with pytest.raises(ValueError, match="no 'adaLN_modulation.1'"):
        smooth.fold(plain, "attn.qkv", torch.ones(8))
    # a packed layer's `weight` is a dequantized copy: a fold into it would be lost, the producer's half kept
    packed = tiny_dit()
    runtime.quantize(packed, QuantPlan.block_uniform(packed, 4, 8), dtype=torch.float32)
    before = packed.get_submodule("blocks.0.adaLN_modulation.1").w_scale.clone()
    with pytest.raises(ValueError, match="is packed .TreeQLinear.; smooth the FP model before quantize"):
        smooth.fold(packed, "blocks.0.attn.qkv", torch.full((24,), 2.0))
    assert torch.equal(packed.get_submodule("blocks.0.adaLN_modulation.1").w_scale, before)   # nothing written


def test_calibrate_with_smoothing_resumes_and_reloads(tmp_path):
    fp = tiny_dit(seed=4)
    batches = trajectory(fp, n=4, steps=3, seed=0)
    names = quantizable_linears(fp, include=is_block_layer)
    plan = QuantPlan.uniform(names, 4, 4)
    cfg = PTQConfig(max_tokens=256, rounds=1, smooth_alphas=(0.5, 0.75))
    base = PTQConfig(max_tokens=256, rounds=1)
    model = copy.deepcopy(fp)
    calibrated = calibrate(model, plan, batches, cfg, out_dir=tmp_path / "s", progress=False)
    plain = copy.deepcopy(fp)
    calibrate(plain, plan, batches, base, out_dir=tmp_path / "p", progress=False)
    import json

    st = json.loads((tmp_path / "s" / "ptq.json").read_text())
    st_plain = json.loads((tmp_path / "p" / "ptq.json").read_text())
    chosen = st["smooth"]
    assert set(chosen) == {n for n in names if n.endswith(smooth.TARGETS)}
    assert any(a is not None for a in chosen.values())  # the outlier channels make smoothing pay somewhere
    for n, a in chosen.items():  # where smoothing was chosen, the layer's calibrated error went down
        if a is not None:
            assert st["layers"][n]["err"] < st_plain["layers"][n]["err"]
    # a fresh FP copy loaded from the directory re-applies the folds: the same model
    again = copy.deepcopy(fp)
    load_calibration(again, tmp_path / "s")
    with torch.no_grad():
        for b in batches:
            torch.testing.assert_close(again(*b), model(*b))
    # resuming a finished run re-folds from the saved factors instead of choosing again
    resumed = copy.deepcopy(fp)
    calibrate(resumed, plan, batches, cfg, out_dir=tmp_path / "s", progress=False)
    with torch.no_grad():
        torch.testing.assert_close(resumed(*batches[0]), model(*batches[0]))
    # the packed runtime (fused LN + modulate + quantize blocks) runs the smoothed, calibrated model as simulated
    packed = runtime.quantize(copy.deepcopy(model), calibrated, dtype=torch.float32)
    assert_same_up_to_rounding_flips(packed, model, batches)
    with pytest.raises(ValueError, match="smooth_alphas must lie"):
        PTQConfig(smooth_alphas=(2.0,))


def test_stale_smoothing_factors_are_not_trusted(tmp_path):
    """Smoothing factors left by another run (killed after writing them, before its first state) are recomputed,
    not folded in; a calibration whose factors went missing does not load."""
    fp = tiny_dit(seed=4)
    batches = trajectory(fp, n=4, steps=3, seed=0)
    names = quantizable_linears(fp, include=is_block_layer)
    plan = QuantPlan.uniform(names, 4, 4)
    cfg = PTQConfig(max_tokens=256, rounds=1, smooth_alphas=(0.5, 0.75))
    want = calibrate(copy.deepcopy(fp), plan, batches, cfg, out_dir=tmp_path / "ref", progress=False)
    other = PTQConfig(max_tokens=256, rounds=1, smooth_alphas=(0.9,))
    calibrate(copy.deepcopy(fp), plan, batches, other, out_dir=tmp_path / "x", progress=False)
    (tmp_path / "x" / "ptq.json").unlink()   # as if killed right after writing the factors
    got = calibrate(copy.deepcopy(fp), plan, batches, cfg, out_dir=tmp_path / "x", progress=False)
    assert got.layers == want.layers
    import json

    assert json.loads((tmp_path / "x" / "ptq.json").read_text())["smooth"] == \
        json.loads((tmp_path / "ref" / "ptq.json").read_text())["smooth"]
    from treeq_engine.calib.ptq import SMOOTH_FILE

    (tmp_path / "x" / SMOOTH_FILE).unlink()
    from treeq_engine.calib.store import CheckpointError

    with pytest.raises(CheckpointError, match="missing or from another run"):
        load_calibration(copy.deepcopy(fp), tmp_path / "x")


def test_calibrations_from_before_run_digests_still_load(tmp_path):
    """A smoothed calibration written before run digests (no "data" in its state, no digest on the factors)
    loads and resumes as it did."""
    import json

    from safetensors.torch import load_file, save_file

    from treeq_engine.calib.ptq import SMOOTH_FILE

    fp = tiny_dit(seed=4)
    batches = trajectory(fp, n=4, steps=3, seed=0)
    plan = QuantPlan.uniform(quantizable_linears(fp, include=is_block_layer), 4, 4)
    cfg = PTQConfig(max_tokens=256, rounds=1, smooth_alphas=(0.5, 0.75))
    model = copy.deepcopy(fp)
    calibrate(model, plan, batches, cfg, out_dir=tmp_path, progress=False)
    f = tmp_path / SMOOTH_FILE
    save_file(load_file(str(f)), str(f))                     # as written before: no metadata
    st = json.loads((tmp_path / "ptq.json").read_text())
    del st["data"]
    (tmp_path / "ptq.json").write_text(json.dumps(st))
    again = copy.deepcopy(fp)
    load_calibration(again, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(again(*batches[0]), model(*batches[0]))
    calibrate(copy.deepcopy(fp), plan, batches, cfg, out_dir=tmp_path, progress=False, data={"samples": 4})


def test_resume_with_smoothing_is_exact(tmp_path):
    """A run stopped half way and resumed writes the same layer files as an uninterrupted one, bit for bit, with
    SmoothQuant on: the factors fold in one order (a linear can be one site's consumer and another's producer, and
    the two folds' rounding depends on their order; the saved file lists them sorted, the choice in site order)."""
    import json
    import shutil

    from safetensors.torch import load_file

    from treeq_engine.plan import BranchConfig

    fp = tiny_dit(seed=4)
    batches = trajectory(fp, n=4, steps=3, seed=0)
    names = quantizable_linears(fp, include=is_block_layer)
    plan = QuantPlan.uniform(names, 4, 4, branch=BranchConfig("monarch", 4, 1))
    cfg = PTQConfig(max_tokens=256, rounds=1, smooth_alphas=(0.5, 0.75))
    whole = copy.deepcopy(fp)
    calibrate(whole, plan, batches, cfg, out_dir=tmp_path / "a", progress=False)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    state = json.loads((tmp_path / "b" / "ptq.json").read_text())
    done = list(state["layers"])[: len(state["layers"]) // 2]
    state["layers"] = {k: v for k, v in state["layers"].items() if k in done}   # as if stopped half way
    (tmp_path / "b" / "ptq.json").write_text(json.dumps(state))
    calibrate(copy.deepcopy(fp), plan, batches, cfg, out_dir=tmp_path / "b", progress=False)
    files = sorted((tmp_path / "a" / "layers").iterdir())
    assert len(files) == len(names)
    for f in files:
        a, b = load_file(str(f)), load_file(str(tmp_path / "b" / "layers" / f.name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f.name
    again = copy.deepcopy(fp)   # and a reload is the calibrated model, bit for bit
    load_calibration(again, tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(again(*batches[0]), whole(*batches[0]))
