"""PTQ: the per-channel / per-layer clip searches, branch init in calibration, resumable per-layer checkpoints."""
import copy
import dataclasses
import json

import pytest
import torch

from cli_refusal import refused
from gmb_standin import Wrapped, assert_same_up_to_rounding_flips, tiny_dit, trajectory
from treeq_engine import runtime
from treeq_engine.calib import ptq
from treeq_engine.calib.ptq import PTQConfig, calibrate, calibrate_layer, load_calibration, search_weight_clip
from treeq_engine.calib.store import CheckpointError
from treeq_engine.format import QuantSpec, dequantize, fake_quantize, quantize_with_qparams, row_qparams
from treeq_engine.nn import QuantLinear, convert, quant_layers, quantizable_linears
from treeq_engine.plan import BranchConfig, LayerConfig, QuantPlan, is_block_layer


def _layer_data(gen, n=20, k=36, m=300):
    w = torch.randn(n, k, generator=gen) * 0.1
    w[3, 5] = 2.0  # an outlier weight: clipping that channel pays
    x = torch.randn(m, k, generator=gen)
    x[:, 7] *= 8.0  # an outlier input channel
    return w, x


def test_weight_clip_search_is_per_channel_optimal(gen):
    w, x = _layer_data(gen)
    spec = QuantSpec.weight(3)
    xq = fake_quantize(x, QuantSpec.activation(4))
    target = x @ w.T
    grid = (1.0, 0.8, 0.6, 0.4)
    scale, zp, clip = search_weight_clip(w, xq, target, spec, grid)
    errs = []
    for c in grid:
        s, z = row_qparams(w, QuantSpec.weight(3, clip_ratio=c))
        errs.append((xq @ dequantize(quantize_with_qparams(w, spec, s, z)).T - target).square().sum(0))
    errs = torch.stack(errs)  # (grid, N)
    best = errs.argmin(0)
    torch.testing.assert_close(clip, torch.tensor(grid)[best])
    got = (xq @ dequantize(quantize_with_qparams(w, spec, scale, zp)).T - target).square().sum(0)
    torch.testing.assert_close(got, errs.min(0).values)
    assert len(set(clip.tolist())) > 1  # the channels really chose differently


@pytest.mark.parametrize("branch,init", [(None, "weight"), (BranchConfig("monarch", 4, 1), "weight"),
                                         (BranchConfig("lowrank", 1, 4), "weight"),
                                         (BranchConfig("monarch", 4, 1), "residual")])
def test_calibrate_layer_never_worse_than_rtn(branch, init, gen):
    w, x = _layer_data(gen)
    cfg = LayerConfig(3, 3, branch=branch)
    res = calibrate_layer(w, x, cfg, PTQConfig(branch_init=init, rounds=2))
    assert res.err <= res.err_rtn * (1 + 1e-6)
    assert res.err < 0.9 * res.err_rtn  # outliers: the searches pay off
    assert 0.5 <= res.a_clip <= 1.0 and (branch is None) == (res.branch is None)
    # the reported error is what the calibrated layer really does
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    q = QuantLinear(lin, cfg.replace(a_clip=res.a_clip))
    q.branch = res.branch
    q.freeze_weight(res.base, res.scale, res.zero_point)
    with torch.no_grad():
        y, out = x @ w.T, q(x)
    assert float((out - y).square().sum() / y.square().sum()) == pytest.approx(res.err, rel=1e-4)
    if branch is not None and init == "weight":
        torch.testing.assert_close(res.base + res.branch.dense().detach(), w, rtol=1e-5, atol=1e-5)
    if init == "residual":
        assert torch.equal(res.base, w)


def test_grid_of_one_is_round_to_nearest(gen):
    w, x = _layer_data(gen)
    res = calibrate_layer(w, x, LayerConfig(4, 4), PTQConfig(w_clip_grid=(1.0,), a_clip_grid=(1.0,)))
    assert res.err == pytest.approx(res.err_rtn, rel=1e-6) and res.a_clip == 1.0


def _setup(seed=0):
    model = tiny_dit(seed=seed)
    batches = trajectory(model, n=4, steps=3, seed=seed)
    names = quantizable_linears(model, include=is_block_layer)
    return model, batches, names


def _eps_err(model, ref, batches):
    with torch.no_grad():
        return sum(float((model(*b) - r).square().mean()) for b, r in zip(batches, ref)) / len(batches)


def test_calibrate_model_resume_and_load(tmp_path, monkeypatch):
    model, batches, names = _setup()
    fp = copy.deepcopy(model)
    with torch.no_grad():
        ref = [fp(*b) for b in batches]
    plan = QuantPlan.uniform(names, 3, 4, model="tiny", branch=BranchConfig("monarch", 4, 1))
    cfg = PTQConfig(max_tokens=256, rounds=1)
    # round-to-nearest baseline
    rtn = convert(copy.deepcopy(fp), plan)
    for q in quant_layers(rtn).values():
        q.branch = None
    err_rtn = _eps_err(rtn, ref, batches)
    # a run interrupted after 3 layers, then resumed: only the remaining layers are calibrated
    calls, interrupted = [], []
    real = ptq.calibrate_layer

    def flaky(*a, **kw):
        calls.append(1)
        if len(calls) == 4 and not interrupted:
            interrupted.append(1)
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(ptq, "calibrate_layer", flaky)
    m1 = copy.deepcopy(fp)
    with pytest.raises(KeyboardInterrupt):
        calibrate(m1, plan, batches, cfg, out_dir=tmp_path / "run", progress=False)
    state = json.loads((tmp_path / "run" / "ptq.json").read_text())
    assert len(state["layers"]) == 3
    calls.clear()
    m2 = copy.deepcopy(fp)   # (the plan under another model name, as ptq named diffusers models before: resumed)
    calibrated = calibrate(m2, dataclasses.replace(plan, model="renamed"), batches, cfg, out_dir=tmp_path / "run",
                           progress=False)
    assert len(calls) == len(names) - 3
    monkeypatch.setattr(ptq, "calibrate_layer", real)
    # the same as one uninterrupted run
    m3 = copy.deepcopy(fp)
    calibrate(m3, plan, batches, cfg, out_dir=tmp_path / "once", progress=False)
    for n in names:
        a, b = m2.get_submodule(n), m3.get_submodule(n)
        assert a.is_frozen and torch.equal(a.w_codes, b.w_codes) and torch.equal(a.w_scale, b.w_scale)
        assert torch.equal(a.branch.w1, b.branch.w1)
    with torch.no_grad():
        for bt in batches:
            torch.testing.assert_close(m2(*bt), m3(*bt))
    # calibration beats round-to-nearest end to end, and the plan carries the chosen activation clips
    err_ptq = _eps_err(m3, ref, batches)
    assert err_ptq < err_rtn
    assert all(0.5 <= c.a_clip <= 1.0 for c in calibrated.layers.values())
    assert calibrated.meta["ptq"]["max_tokens"] == 256
    # load into a fresh FP copy: identical outputs
    m4 = copy.deepcopy(fp)
    loaded = load_calibration(m4, tmp_path / "once")
    assert loaded.layers == calibrated.layers
    with torch.no_grad():
        for bt in batches:
            torch.testing.assert_close(m4(*bt), m3(*bt))
    # the runtime packs the calibrated codes, clips and branches: the packed model computes the same
    packed = runtime.quantize(copy.deepcopy(m3), calibrated, dtype=torch.float32)
    assert_same_up_to_rounding_flips(packed, m3, batches)
    # packed by another plan (the one calibration started from, without its clips), a calibrated layer would be
    # rounded from its float weight again: refused, naming the layer
    other = next(n for n, c in calibrated.layers.items() if c != plan.layers[n])
    with pytest.raises(ValueError, match=f"{other}: calibrated at .*, but the plan asks for"):
        runtime.quantize(copy.deepcopy(m3), plan, dtype=torch.float32)


def test_checkpoint_errors(tmp_path):
    model, batches, names = _setup()
    plan = QuantPlan.uniform(names[:2], 4, 4)
    cfg = PTQConfig(max_tokens=64, rounds=1, w_clip_grid=(1.0, 0.8), a_clip_grid=(1.0, 0.8))
    calibrate(copy.deepcopy(model), plan, batches, cfg, out_dir=tmp_path, progress=False)
    with pytest.raises(CheckpointError, match=r"different plan \(2 layers, now 2: [\w.]+: w_bits 4 -> 3; "):
        calibrate(copy.deepcopy(model), QuantPlan.uniform(names[:2], 3, 4), batches, cfg, out_dir=tmp_path,
                  progress=False)
    # the same layers with another search record (a resumed search rewrites its timings): the run goes on
    again = QuantPlan(plan.layers, model=plan.model, meta={"search": {"wall_s": 1.5}})
    calibrate(copy.deepcopy(model), again, batches, cfg, out_dir=tmp_path, progress=False)
    with pytest.raises(CheckpointError, match=r"another config \(rounds 1 -> 2\)"):   # (the field that changed)
        calibrate(copy.deepcopy(model), plan, batches, dataclasses.replace(cfg, rounds=2), out_dir=tmp_path,
                  progress=False)
    with pytest.raises(CheckpointError, match=r"on other data \(null -> \{\"samples\": 16\}\)"):   # e.g. more samples
        calibrate(copy.deepcopy(model), plan, batches, cfg, out_dir=tmp_path, progress=False, data={"samples": 16})
    (tmp_path / "layers" / f"{names[1]}.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_calibration(copy.deepcopy(model), tmp_path)
    (tmp_path / "ptq.json").write_text('{"schema": "treeq-ptq", "version": 7}')
    with pytest.raises(CheckpointError, match="version 7 is not supported"):
        load_calibration(copy.deepcopy(model), tmp_path)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_calibration(copy.deepcopy(model), tmp_path / "nowhere")
    with pytest.raises(ValueError, match="branch_init must be one of"):
        PTQConfig(branch_init="svd")
    with pytest.raises(ValueError, match=r"ratios in \(0, 1\]"):
        PTQConfig(w_clip_grid=(1.2,))
    with pytest.raises(ValueError, match="serves no purpose"):
        calibrate_layer(torch.randn(8, 8), torch.randn(16, 8), LayerConfig(16, 8, branch=BranchConfig("lowrank", 1, 2)),
                        PTQConfig())


def test_cli_helpers():
    import argparse

    from treeq_engine.calib.cli import branch_for, parse_bits, uniform_plan, with_branch
    from treeq_engine.cli import build_parser

    assert parse_bits("W3A4") == (3, 4) and parse_bits("w8a8") == (8, 8)
    with pytest.raises(argparse.ArgumentTypeError, match="W4A4"):
        parse_bits("4/4")
    assert branch_for("none", 4) is None
    assert branch_for("lowrank", 4) == BranchConfig("lowrank", 1, 4)
    assert branch_for("monarch", 4) == BranchConfig("monarch", 4, 1)
    assert branch_for("monarch", 8, 2) == BranchConfig("monarch", 4, 2)
    with pytest.raises(ValueError, match="multiple of the Monarch rank"):
        branch_for("monarch", 6, 4)
    model = tiny_dit(d=24)
    plan = uniform_plan(model, (3, 3), BranchConfig("monarch", 32, 1))
    assert plan.layers["blocks.0.mlp.fc1"] == LayerConfig(3, 3, branch=BranchConfig("monarch", 24, 1))  # capped
    assert plan.layers["final_layer.linear"] == LayerConfig(8, 8) and plan.layers["t_embedder.mlp.0"] == LayerConfig(8, 8)
    # a searched (mixed) plan keeps its bits; the branch goes on block layers only, and None takes it off
    mixed = plan.with_layer("blocks.0.attn.qkv", LayerConfig(2, 8)).with_layer("blocks.0.mlp.fc2", LayerConfig(8, 4))
    lr = with_branch(mixed, model, BranchConfig("lowrank", 1, 4))
    assert lr.layers["blocks.0.attn.qkv"] == LayerConfig(2, 8, branch=BranchConfig("lowrank", 1, 4))
    assert lr.layers["blocks.0.mlp.fc2"] == LayerConfig(8, 4, branch=BranchConfig("lowrank", 1, 4))
    assert lr.layers["final_layer.linear"] == LayerConfig(8, 8)
    assert all(c.branch is None for c in with_branch(lr, model, None).layers.values())
    args = build_parser().parse_args(["ptq", "--bits", "W3A3", "--branch", "lowrank", "--out", "x"])
    assert args.bits == (3, 3) and args.branch == "lowrank" and args.branch_params == 32
    refused("--branch plan needs --plan", ["ptq", "--branch", "plan", "--out", "x"])
    args = build_parser().parse_args(["peft", "--ptq", "p", "--out", "o", "--lora-rank", "4"])
    assert args.lora_rank == 4 and args.steps == 400 and args.loss_weights == "uniform"
    assert build_parser().parse_args(["peft", "--ptq", "p", "--out", "o", "--loss-weights", "sampler"]).loss_weights \
        == "sampler"


def test_staged_walk_equals_whole_model_walk():
    """Calibrating block by block from cached stage inputs gives exactly what re-running the whole prefix gives."""
    model, batches, names = _setup(seed=3)
    plan = QuantPlan.uniform(names, 4, 4, branch=BranchConfig("lowrank", 1, 2), edge_names=["t_embedder.mlp.2", "final_layer.linear"])
    cfg = PTQConfig(max_tokens=96, rounds=1, w_clip_grid=(1.0, 0.8), a_clip_grid=(1.0, 0.8))
    staged = copy.deepcopy(model)
    calibrate(staged, plan, batches, cfg, progress=False)
    whole = Wrapped(copy.deepcopy(model))
    wplan = QuantPlan({f"inner.{n}": c for n, c in plan.layers.items()})
    calibrate(whole, wplan, batches, cfg, progress=False)
    for n in plan.layers:
        a, b = staged.get_submodule(n), whole.get_submodule(f"inner.{n}")
        assert torch.equal(a.w_codes, b.w_codes) and torch.equal(a.w_scale, b.w_scale), n
        assert a.config == b.config

