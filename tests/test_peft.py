"""PEFT: distillation toward the FP model along its trajectories; checkpoints, resume, reload."""
import copy
import json

import pytest
import torch

from gmb_standin import tiny_dit, trajectory
from treeq_engine.calib.peft import PEFTConfig, finetune, load_finetuned
from treeq_engine.calib.ptq import PTQConfig, calibrate, load_calibration
from treeq_engine.calib.store import CheckpointError
from treeq_engine.nn import quant_layers, quantizable_linears
from treeq_engine.plan import BranchConfig, QuantPlan, is_block_layer

PTQ_FAST = PTQConfig(max_tokens=128, rounds=1, w_clip_grid=(1.0, 0.85, 0.7), a_clip_grid=(1.0, 0.85, 0.7))


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """An FP stand-in and its W3A4 + Monarch calibration, saved once for the module."""
    fp = tiny_dit(seed=1)
    names = quantizable_linears(fp, include=is_block_layer)
    plan = QuantPlan.uniform(names, 3, 4, branch=BranchConfig("monarch", 4, 1))
    d = tmp_path_factory.mktemp("ptq")
    calibrate(copy.deepcopy(fp), plan, trajectory(fp, n=4, steps=3, seed=0), PTQ_FAST, out_dir=d,
              progress=False)
    return fp, d


def _fresh(calibrated):
    fp, d = calibrated
    q = copy.deepcopy(fp)
    load_calibration(q, d)
    return q


def _traj(fp):
    return lambda r: trajectory(fp, n=4, steps=3, seed=100 + r)


def _eps_mse(q, fp, seed=7):
    batches = trajectory(fp, n=8, steps=4, seed=seed)  # held out: another seed than training
    with torch.no_grad():
        return sum(float((q(*b) - fp(*b)).square().mean()) for b in batches) / len(batches)


def test_lr_schedule():
    c = PEFTConfig(steps=10, warmup=2)
    assert c.lr_factor(0) == 0.5 and c.lr_factor(1) == 1.0
    assert c.lr_factor(2) == pytest.approx(1.0) and c.lr_factor(10) == pytest.approx(0.0, abs=1e-12)
    assert PEFTConfig(schedule="constant").lr_factor(150) == 1.0
    for bad, msg in [({"steps": 0}, "steps must be a positive int"), ({"lr_branch": -1.0}, "lr_branch must be"),
                     ({"schedule": "step"}, "schedule must be one of"), ({"lora_rank": -2}, "lora_rank must be")]:
        with pytest.raises(ValueError, match=msg):
            PEFTConfig(**bad)


def test_finetune_improves_branch_only_and_reloads(calibrated, tmp_path):
    fp = calibrated[0]
    q = _fresh(calibrated)
    before = _eps_mse(q, fp)
    codes = {n: m.w_codes.clone() for n, m in quant_layers(q).items()}
    res = finetune(q, fp, _traj(fp), PEFTConfig(steps=30, lr_branch=3e-3, checkpoint_every=10), out_dir=tmp_path,
                   progress=False)
    after = _eps_mse(q, fp)
    assert after < 0.8 * before
    assert res.step == 30 and len(res.losses) == 30
    assert res.trainable_params == sum(m.branch.params for m in quant_layers(q).values())
    for n, m in quant_layers(q).items():  # the low-bit weights stayed frozen
        assert torch.equal(m.w_codes, codes[n]) and not m.branch.w1.requires_grad
    assert not any(p.requires_grad for p in q.parameters())
    state = json.loads((tmp_path / "peft.json").read_text())
    assert state["step"] == 30 and state["trainable"]["branch"] == res.trainable_params
    # a fresh calibrated model with the trained tensors loaded is the same model
    q2 = _fresh(calibrated)
    load_finetuned(q2, tmp_path)
    b = trajectory(fp, n=2, steps=2, seed=9)[1]
    with torch.no_grad():
        torch.testing.assert_close(q2(*b), q(*b))


def test_resume_equals_uninterrupted(calibrated, tmp_path):
    fp = calibrated[0]
    cfg = PEFTConfig(steps=7, lr_branch=3e-3, lora_rank=2, lr_lora=1e-3, lr_w_scale=1e-4, checkpoint_every=2,
                     warmup=1)
    calls = []

    def flaky(model, batch):
        calls.append(1)
        if len(calls) == 2 * 5 + 1:  # fp + quantized per step: fail inside step 5, after the step-4 checkpoint
            raise KeyboardInterrupt
        return model(*batch)

    q1 = _fresh(calibrated)
    with pytest.raises(KeyboardInterrupt):
        finetune(q1, fp, _traj(fp), cfg, eps_fn=flaky, out_dir=tmp_path / "a", progress=False)
    assert json.loads((tmp_path / "a" / "peft.json").read_text())["step"] == 4
    q1 = _fresh(calibrated)
    r1 = finetune(q1, fp, _traj(fp), cfg, out_dir=tmp_path / "a", progress=False)
    q2 = _fresh(calibrated)
    r2 = finetune(q2, fp, _traj(fp), cfg, out_dir=tmp_path / "b", progress=False)
    assert r1.losses == r2.losses and len(r1.losses) == 7
    for (n1, p1), (n2, p2) in zip(q1.named_parameters(), q2.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    layer = next(iter(quant_layers(q2).values()))
    assert layer.lora is not None and layer.lora.b.abs().sum() > 0  # LoRA and scales trained too
    w_scale_moved = any(not torch.equal(m.w_scale, m2.w_scale) for m, m2 in
                        zip(quant_layers(q2).values(), quant_layers(_fresh(calibrated)).values()))
    assert w_scale_moved
    with pytest.raises(CheckpointError, match=r"another config \(checkpoint_every 2 -> 50; lora_rank 2 -> 0"):
        finetune(_fresh(calibrated), fp, _traj(fp), PEFTConfig(steps=8), out_dir=tmp_path / "a", progress=False)


def test_errors(calibrated):
    fp = calibrated[0]
    with pytest.raises(ValueError, match="no QuantLinear"):
        finetune(copy.deepcopy(fp), fp, _traj(fp), PEFTConfig(steps=1), progress=False)
    q = _fresh(calibrated)
    for m in quant_layers(q).values():
        m.branch = None
    with pytest.raises(ValueError, match="nothing to train"):
        finetune(q, fp, _traj(fp), PEFTConfig(steps=1), progress=False)
    with pytest.raises(ValueError, match="returned no model inputs"):
        finetune(_fresh(calibrated), fp, lambda r: [], PEFTConfig(steps=1), progress=False)


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_checkpoint(calibrated, tmp_path):
    """A NaN loss (here the model's output turns NaN at step 3) stops fine-tuning before that step is applied: the
    step-2 checkpoint stays and loads (it had been replaced by NaN tensors, and the run ended as if it had worked)."""
    fp = calibrated[0]
    q = _fresh(calibrated)
    calls = {"n": 0}

    def eps(model, batch):
        calls["n"] += 1
        out = model(*batch)
        return out * float("nan") if calls["n"] == 6 else out   # the trained model's forward at step 3

    with pytest.raises(ValueError, match="PEFT step 3: the loss is nan; nothing of this step was applied or saved"):
        finetune(q, fp, _traj(fp), PEFTConfig(steps=4, checkpoint_every=2), eps_fn=eps, out_dir=tmp_path,
                 progress=False)
    assert json.loads((tmp_path / "peft.json").read_text())["step"] == 2
    fresh = _fresh(calibrated)
    load_finetuned(fresh, tmp_path)
    assert all(bool(torch.isfinite(t).all()) for t in fresh.state_dict().values() if t.is_floating_point())


def test_branch_sizes_checked_before_any_layer_is_calibrated(tmp_path):
    """A branch that does not fit a layer is named before calibration starts (it failed half-way, without the
    layer's name, and the directory then refused the corrected plan)."""
    fp = tiny_dit(seed=1)
    names = quantizable_linears(fp, include=is_block_layer)
    plan = QuantPlan.uniform(names, 3, 4, branch=BranchConfig("lowrank", 1, 1000))
    with pytest.raises(ValueError, match=r"blocks\.0\.\S+ \(N=\d+, K=\d+\): its lowrank branch does not fit"):
        calibrate(copy.deepcopy(fp), plan, trajectory(fp, n=2, steps=2, seed=0), PTQ_FAST, out_dir=tmp_path / "p",
                  progress=False)
    assert not (tmp_path / "p" / "ptq.json").exists()


def test_scales_stay_positive_under_a_huge_learning_rate(calibrated):
    fp = calibrated[0]
    q = _fresh(calibrated)
    start = {n: m.w_scale.detach().clone() for n, m in quant_layers(q).items()}
    finetune(q, fp, _traj(fp), PEFTConfig(steps=3, lr_w_scale=10.0, lora_rank=2), progress=False)
    for n, m in quant_layers(q).items():
        assert bool((m.w_scale >= 0.01 * start[n] * (1 - 1e-6)).all()) and bool(torch.isfinite(m.w_scale).all())
    with torch.no_grad():
        assert torch.isfinite(q(*trajectory(fp, n=2, steps=2, seed=3)[0])).all()


def test_cli_ptq_then_peft(tmp_path, capsys):
    """`treeq ptq` and `treeq peft` on a DiT checkpoint given by path, end to end and resumable."""
    from treeq_engine.cli import main
    from treeq_engine.models.checkpoint import save_dit_safetensors

    fp = tiny_dit(seed=5)
    save_dit_safetensors(fp, tmp_path / "tiny.safetensors")
    (tmp_path / "tiny.json").write_text(json.dumps({"config": fp.config.to_dict()}))
    common = ["--model", str(tmp_path / "tiny.safetensors"), "--sample-steps", "2"]
    ptq_args = ["ptq", *common, "--bits", "W4A4", "--branch", "monarch", "--branch-params", "2", "--calib-samples",
                "4", "--max-tokens", "64", "--rounds", "1", "--smooth-alphas", "0.5", "--out", str(tmp_path / "p")]
    assert main(ptq_args) == 0
    assert "calibrated" in capsys.readouterr().out
    assert main(ptq_args) == 0  # a finished run resumes to the same place
    assert main(["peft", "--ptq", str(tmp_path / "p"), *common, "--steps", "3", "--batch", "2",
                 "--checkpoint-every", "2", "--out", str(tmp_path / "f")]) == 0
    assert json.loads((tmp_path / "f" / "peft.json").read_text())["step"] == 3
    capsys.readouterr()
    for bad, msg in ((["peft", "--ptq", str(tmp_path / "p"), *common, "--batch", "0", "--out", str(tmp_path / "g")],
                      "--batch must be positive, got 0"),
                     ([*ptq_args[:-1], str(tmp_path / "q"), "--calib-samples", "0"],
                      "--calib-samples must be positive, got 0"),
                     ([*ptq_args[:-1], str(tmp_path / "q"), "--branch-rank", "0"],
                      "--branch-rank must be a positive int, got 0")):
        assert main(bad) == 2 and msg in capsys.readouterr().err
    q = tiny_dit(seed=5)
    load_calibration(q, tmp_path / "p")
    load_finetuned(q, tmp_path / "f")
    assert all(m.is_frozen for m in quant_layers(q).values())


def test_sampler_loss_weights(calibrated, tmp_path):
    """The sampler-weighted loss: c(t)² per step of the schedule the trajectory used, mean 1, the last step (t = 0)
    weighed far below the others; finetune applies it (and refuses a mismatch)."""
    from treeq_engine.calib.data import sampler_loss_weights
    from treeq_engine.models.diffusion import create_diffusion, sampler_weights

    fp = calibrated[0]
    weight = sampler_loss_weights(3)
    batches = trajectory(fp, n=4, steps=3, seed=5)
    w = torch.stack([weight(b)[0] for b in batches])           # one weight per step (a step's batch shares t)
    assert all(torch.equal(weight(b), weight(b)[:1].expand(len(b[1]))) for b in batches)
    assert float(w.mean()) == pytest.approx(1.0, rel=1e-6)
    d = create_diffusion("3")
    want = sampler_weights(d, torch.arange(3)).float()
    assert torch.allclose(w.flip(0), want / want.mean())        # the sampler walks t from high to low
    assert float(w[-1]) < 0.01 * float(w[:-1].min())            # t = 0: nearly unpredictable ε, tiny weight
    with pytest.raises(ValueError, match="not steps of the 3-step schedule"):
        weight((batches[0][0], torch.full_like(batches[0][1], 17), batches[0][2]))
    # finetune: the weighted loss is what it records; a config and weights that disagree are an error
    q = _fresh(calibrated)
    cfg = PEFTConfig(steps=3, lr_branch=0.0, loss_weights="sampler", shuffle=False)
    res = finetune(q, fp, _traj(fp), cfg, progress=False, sample_weight=weight)
    with torch.no_grad():
        b = _traj(fp)(0)[0]
        want_loss = float(((q(*b) - fp(*b)).square().flatten(1).mean(1) * weight(b)).mean())
    assert res.losses[0] == pytest.approx(want_loss, rel=1e-5)
    with pytest.raises(ValueError, match="needs sample_weight"):
        finetune(q, fp, _traj(fp), cfg, progress=False)
    with pytest.raises(ValueError, match="takes no sample_weight"):
        finetune(q, fp, _traj(fp), PEFTConfig(steps=1), progress=False, sample_weight=weight)
    with pytest.raises(ValueError, match="loss_weights must be one of"):
        PEFTConfig(loss_weights="snr")


def test_torn_checkpoint_and_ctrl_c_resume_exactly(calibrated, tmp_path, monkeypatch):
    """A kill between a checkpoint's tensor file and its state (the state names the file: the previous
    checkpoint stays whole), and a Ctrl-C mid-step (the step finishes, is saved, then the run stops): both resume
    to the uninterrupted result; a resume from other data is refused."""
    import os
    import signal

    import treeq_engine.calib.peft as peft

    fp = calibrated[0]
    cfg = PEFTConfig(steps=7, lr_branch=3e-3, lora_rank=2, checkpoint_every=3)
    ref = finetune(_fresh(calibrated), fp, _traj(fp), cfg, out_dir=tmp_path / "ref", progress=False)

    real = peft.write_json
    writes = []

    def torn(path, doc):   # dies after the step-6 tensors are written, before the state that names them
        writes.append(doc["step"])
        if doc["step"] == 6:
            raise SystemExit("killed")
        real(path, doc)

    monkeypatch.setattr(peft, "write_json", torn)
    with pytest.raises(SystemExit):
        finetune(_fresh(calibrated), fp, _traj(fp), cfg, out_dir=tmp_path / "a", progress=False)
    monkeypatch.setattr(peft, "write_json", real)
    st = json.loads((tmp_path / "a" / "peft.json").read_text())
    assert st["step"] == 3 and (tmp_path / "a" / st["tensors"]).exists()
    # (and an off-grid step's tensors that a Ctrl-C save wrote but no state named: a step the resume never saves)
    (tmp_path / "a" / "peft-0000005.safetensors").write_bytes((tmp_path / "a" / st["tensors"]).read_bytes())
    r = finetune(_fresh(calibrated), fp, _traj(fp), cfg, out_dir=tmp_path / "a", progress=False)
    assert r.losses == ref.losses
    assert sorted(p.name for p in (tmp_path / "a").glob("peft-*.safetensors")) == ["peft-0000007.safetensors"]

    calls = []

    def ctrl_c(model, batch):   # SIGINT in the middle of step 4 (its first forward)
        calls.append(1)
        if len(calls) == 2 * 4 + 1:
            os.kill(os.getpid(), signal.SIGINT)
        return model(*batch)

    with pytest.raises(KeyboardInterrupt):
        finetune(_fresh(calibrated), fp, _traj(fp), cfg, eps_fn=ctrl_c, out_dir=tmp_path / "b", progress=False)
    assert json.loads((tmp_path / "b" / "peft.json").read_text())["step"] == 5   # step 4 (0-based) finished
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    q = _fresh(calibrated)
    r = finetune(q, fp, _traj(fp), cfg, out_dir=tmp_path / "b", progress=False)
    assert r.losses == ref.losses
    with pytest.raises(CheckpointError, match=r"other data \(null -> \{\"ptq\": \"another\"\}\)"):
        finetune(_fresh(calibrated), fp, _traj(fp), cfg, out_dir=tmp_path / "b", progress=False,
                 data={"ptq": "another"})


def test_the_model_itself_in_full_precision_is_the_teacher(calibrated):
    """fp_model=None distils toward the calibrated model run as the float model it was (nn.full_precision: its
    converted layers still hold their float weights): the same targets as a separate FP copy, bit for bit, so the
    same training, without a second copy of the weights."""
    from treeq_engine.nn import full_precision

    fp, _ = calibrated
    q = _fresh(calibrated)
    x, t, y = _traj(fp)(0)[0]
    with torch.no_grad(), full_precision(q):
        assert torch.equal(q(x, t, y), fp(x, t, y))
    assert not any(m.full_precision for m in quant_layers(q).values())   # (restored on exit)
    cfg = PEFTConfig(steps=4, lr_branch=3e-3, lora_rank=2)
    a, b = _fresh(calibrated), _fresh(calibrated)
    ra = finetune(a, fp, _traj(fp), cfg, progress=False)
    rb = finetune(b, None, _traj(fp), cfg, progress=False)
    assert ra.losses == rb.losses
    for (n, p), (_, p2) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, p2), n
