"""Bad PTQ/PEFT checkpoints give a CheckpointError naming the file and the field, before the model is touched."""
import copy
import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from gmb_standin import tiny_dit, trajectory
from cli_refusal import refused
from treeq_engine.calib.peft import PEFTConfig, finetune, load_finetuned
from treeq_engine.calib.ptq import SMOOTH_FILE, PTQConfig, calibrate, load_calibration
from treeq_engine.calib.store import CheckpointError
from treeq_engine.nn import QuantLinear, quant_layers, quantizable_linears
from treeq_engine.plan import BranchConfig, LayerConfig, QuantPlan, is_block_layer

FAST = PTQConfig(max_tokens=64, rounds=1, w_clip_grid=(1.0,), a_clip_grid=(1.0,))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An FP stand-in; a W3A4 + Monarch calibration, a smoothed W4A4 one, and a short PEFT run on the first."""
    fp = tiny_dit(seed=1)
    names = quantizable_linears(fp, include=is_block_layer)
    batches = trajectory(fp, n=2, steps=2, seed=0)
    root = tmp_path_factory.mktemp("runs")
    calibrate(copy.deepcopy(fp), QuantPlan.uniform(names, 3, 4, branch=BranchConfig("monarch", 4, 1)), batches,
              FAST, out_dir=root / "ptq", progress=False)
    smoothed = PTQConfig(max_tokens=64, rounds=1, w_clip_grid=(1.0,), a_clip_grid=(1.0,), smooth_alphas=(0.5,))
    calibrate(copy.deepcopy(fp), QuantPlan.uniform(names, 4, 4), batches, smoothed, out_dir=root / "smooth",
              progress=False)
    q = copy.deepcopy(fp)
    load_calibration(q, root / "ptq")
    finetune(q, fp, lambda r: trajectory(fp, n=2, steps=2, seed=100 + r), PEFT_CFG, out_dir=root / "peft",
             progress=False)
    return fp, names, root


PEFT_CFG = PEFTConfig(steps=2, checkpoint_every=2, lr_branch=1e-3)


def _copy(runs, tmp_path, which):
    d = tmp_path / which
    shutil.copytree(runs[2] / which, d)
    return d


def _edit_tensors(path, edit):
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    t = load_file(str(path))
    edit(t)
    save_file(t, str(path), metadata=meta)


def _edit_json(path, edit):
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model, before):
    after = model.state_dict()
    return set(after) == set(before) and all(torch.equal(after[k], v) for k, v in before.items()) and \
        not quant_layers(model)


def _first_nan(t):
    t = t.clone()
    t.view(-1)[0] = float("nan")
    return t


@pytest.mark.parametrize("key,edit,match", [
    ("scale", _first_nan, r"scale must be finite and positive.*row 0: nan"),
    ("scale", lambda t: -t, r"scale must be finite and positive"),
    ("zero_point", lambda t: t + 100, r"zero_point must lie in \[-4, 3\]"),
    ("w1", lambda t: t.round().to(torch.int32), r"branch factor w1 must be floating point, got torch.int32"),
    ("w1", _first_nan, r"branch factor w1 holds 1 NaN/inf"),
    ("w2", lambda t: t * float("inf"), r"branch factor w2 holds \d+ NaN/inf"),
])
def test_bad_layer_values_are_refused(runs, tmp_path, key, edit, match):
    fp, names, _ = runs
    d = _copy(runs, tmp_path, "ptq")
    layer_file = d / "layers" / f"{names[-1]}.safetensors"   # the last layer: the others would load first

    def change(t):
        t[key] = edit(t[key])

    _edit_tensors(layer_file, change)
    model = copy.deepcopy(fp)
    before = _snapshot(model)
    with pytest.raises(CheckpointError, match=match) as e:
        load_calibration(model, d)
    assert str(layer_file) in str(e.value)
    assert _unchanged(model, before)   # not converted, no layer installed


def test_load_frozen_checks_scale_and_zero_point():
    q = QuantLinear(torch.nn.Linear(8, 4), LayerConfig(4, 8))
    codes, scale, zp = torch.zeros(4, 8, dtype=torch.int8), torch.ones(4), torch.zeros(4, dtype=torch.int32)
    q.load_frozen(codes, scale, zp)
    bad = scale.clone()
    bad[2] = float("nan")
    with pytest.raises(ValueError, match=r"scale must be finite and positive.*row 2: nan"):
        q.load_frozen(codes, bad, zp)
    with pytest.raises(ValueError, match=r"scale must be finite and positive.*4 of 4"):
        q.load_frozen(codes, -scale, zp)
    with pytest.raises(ValueError, match=r"zero_point must lie in \[-8, 7\].*row 0: 8"):
        q.load_frozen(codes, scale, zp + 8)


@pytest.mark.parametrize("edit,match", [
    (lambda st: st.pop("layers"), "field 'layers' must be an object, got nothing"),
    (lambda st: st.pop("plan"), "field 'plan' must be an object, got nothing"),
    (lambda st: st.pop("config"), "field 'config' must be an object, got nothing"),
    (lambda st: st.update(data={"model_fingerprint": 5}), "data.model_fingerprint must be a non-empty string"),
    (lambda st: st.update(data="abc"), "field 'data' must be an object or null, got str"),
    (lambda st: st["layers"][next(iter(st["layers"]))].pop("config"), r"layers\[.*\] must be an object with a "
                                                                        "'config' object"),
    (lambda st: st["layers"][next(iter(st["layers"]))]["config"].update(a_clip=-0.5),   # the activation clip
     r"layers\[.*\]\.config: clip_ratio must be in \(0, 1\], got -0.5"),
])
def test_malformed_ptq_json(runs, tmp_path, edit, match):
    d = _copy(runs, tmp_path, "ptq")
    _edit_json(d / "ptq.json", edit)
    with pytest.raises(CheckpointError, match=match) as e:
        load_calibration(copy.deepcopy(runs[0]), d)
    assert str(d / "ptq.json") in str(e.value)


def test_bad_smoothing_factor_leaves_the_model_unfolded(runs, tmp_path):
    fp = runs[0]
    d = _copy(runs, tmp_path, "smooth")
    keys = list(load_file(str(d / SMOOTH_FILE)))
    assert len(keys) > 1
    _edit_tensors(d / SMOOTH_FILE, lambda t: t.update({keys[-1]: -t[keys[-1]]}))   # the last one folded
    model = copy.deepcopy(fp)
    before = _snapshot(model)
    with pytest.raises(CheckpointError, match=rf"{SMOOTH_FILE}: {keys[-1]}: smoothing factors must be positive"):
        load_calibration(model, d)
    assert _unchanged(model, before)
    _edit_tensors(d / SMOOTH_FILE, lambda t: t.update({keys[-1]: torch.ones(5)}))
    with pytest.raises(CheckpointError, match=rf"{SMOOTH_FILE}: {keys[-1]}: .*shape \(24,\).*got shape \(5,\)"):
        load_calibration(model, d)
    assert _unchanged(model, before)


def test_another_model_is_named_as_such(runs, tmp_path):
    fp, names, root = runs
    for which in ("ptq", "smooth"):   # another width: the model, not a smoothing factor or a branch shape
        with pytest.raises(CheckpointError, match="calibrated from another model"):
            load_calibration(tiny_dit(seed=1, d=32), root / which)
    # calibrate without data= records a probe of the model: another model of the same shapes is refused, the
    # same model in another dtype is not
    assert "model_probe" in json.loads((root / "ptq" / "ptq.json").read_text())
    with pytest.raises(CheckpointError, match=r"calibrated from another model \(its weights differ\)"):
        load_calibration(tiny_dit(seed=5), root / "ptq")
    for dtype in (torch.bfloat16, torch.float16):
        load_calibration(copy.deepcopy(fp).to(dtype), root / "ptq")
    # without a recorded probe (older directories) the layer shapes still name the wrong model
    d = _copy(runs, tmp_path, "ptq")
    _edit_json(d / "ptq.json", lambda st: st.pop("model_probe"))
    with pytest.raises(CheckpointError, match=r"codes are \(72, 24\), but this model's layer is \(96, 32\)"):
        load_calibration(tiny_dit(seed=1, d=32), d)
    # and a resume with another model is refused as one with other data is
    plan = QuantPlan.uniform(names, 3, 4, branch=BranchConfig("monarch", 4, 1))
    other = tiny_dit(seed=5)
    shutil.copytree(root / "ptq", tmp_path / "resume")
    with pytest.raises(CheckpointError, match="holds a calibration of another model"):
        calibrate(other, plan, trajectory(other, n=2, steps=2, seed=0), FAST, out_dir=tmp_path / "resume",
                  progress=False)


def _opt_key(tensors, suffix):
    return next(k for k in tensors if k.startswith("opt.") and k.endswith(".branch.w1." + suffix))


def _resume(runs, d):
    fp = runs[0]
    q = copy.deepcopy(fp)
    load_calibration(q, runs[2] / "ptq")
    finetune(q, fp, lambda r: trajectory(fp, n=2, steps=2, seed=100 + r), PEFTConfig(steps=3, checkpoint_every=2,
             lr_branch=1e-3), out_dir=d, progress=False)


def _peft_with(runs, tmp_path, edit_json=None, edit_tensors=None):
    d = _copy(runs, tmp_path, "peft")
    if edit_json is not None:
        _edit_json(d / "peft.json", edit_json)
    if edit_tensors is not None:
        name = json.loads((d / "peft.json").read_text())["tensors"]
        _edit_tensors(d / name, edit_tensors)
    return d


def _loaded(runs):
    q = copy.deepcopy(runs[0])
    load_calibration(q, runs[2] / "ptq")
    return q


def test_peft_json_fields(runs, tmp_path):
    d = _peft_with(runs, tmp_path, edit_json=lambda st: st.pop("config"))
    with pytest.raises(CheckpointError, match=r"peft.json: field 'config' must be an object"):
        load_finetuned(_loaded(runs), d)
    # a resume reads the step: missing, a clear error (the config must match first, so set the resumed one)
    resumed = dict(json.loads((runs[2] / "peft" / "peft.json").read_text())["config"], steps=3)
    d = _peft_with(runs, tmp_path / "b", edit_json=lambda st: (st.pop("step"), st.update(config=resumed)))
    with pytest.raises(CheckpointError, match=r"peft.json: field 'step' must be an int >= 0.*missing"):
        _resume(runs, d)


@pytest.mark.parametrize("edit,match", [
    (lambda t: t.update({_opt_key(t, "exp_avg"): torch.zeros(3)}), r"exp_avg is \(3,\), the parameter is"),
    (lambda t: t.pop(_opt_key(t, "step")), r"optimizer state of .* lacks opt\..*\.step"),
    (lambda t: t.update({_opt_key(t, "exp_avg_sq"): -t[_opt_key(t, "exp_avg_sq")] - 1}),
     r"exp_avg_sq must be >= 0"),
    (lambda t: t.update({k: t[k].round().to(torch.int32) for k in t if k.endswith("branch.w1")}),
     r"param\..*branch\.w1 must be floating point"),
    (lambda t: t.update({k: _first_nan(t[k]) for k in t if k.endswith("branch.w1")}),
     r"param\..*branch\.w1 holds 1 NaN/inf"),
])
def test_peft_resume_tensors(runs, tmp_path, edit, match):
    st = json.loads((runs[2] / "peft" / "peft.json").read_text())
    resumed = dict(st["config"], steps=3)
    d = _peft_with(runs, tmp_path, edit_json=lambda s: s.update(config=resumed), edit_tensors=edit)
    with pytest.raises(CheckpointError, match=match) as e:
        _resume(runs, d)
    assert str(d / st["tensors"]) in str(e.value)


def test_load_finetuned_refuses_bad_branch_factors_unchanged(runs, tmp_path):
    d = _peft_with(runs, tmp_path, edit_tensors=lambda t: t.update(
        {k: t[k].round().to(torch.int32) for k in t if k.endswith("branch.w1")}))
    q = _loaded(runs)
    before = _snapshot(q)
    with pytest.raises(CheckpointError, match=r"branch\.w1 must be floating point .*got torch.int32"):
        load_finetuned(q, d)
    assert all(torch.equal(q.state_dict()[k], v) for k, v in before.items())


def test_ptq_and_quantize_take_an_official_layout_checkpoint(tmp_path):
    """`treeq ptq --model X.pt` reads any DiT checkpoint (config inferred), not only digits-shaped ones, and
    `treeq quantize --model X.pt --ptq` packs the result; a missing file is named."""
    from treeq_engine.cli import main
    from treeq_engine.models import DiT
    from treeq_engine.models.dit import DIT_CONFIGS

    torch.manual_seed(0)
    ckpt = tmp_path / "s2.pt"
    torch.save(DiT(DIT_CONFIGS["DiT-S/2"].replace(input_size=4, num_classes=10, depth=1)).state_dict(), ckpt)
    assert main(["ptq", "--model", str(ckpt), "--bits", "W4A8", "--branch", "none", "--calib-samples", "2",
                 "--rounds", "1", "--max-tokens", "32", "--out", str(tmp_path / "ptq")]) == 0
    assert main(["quantize", "--model", str(ckpt), "--ptq", str(tmp_path / "ptq"), "--out", str(tmp_path / "a")]) == 0
    refused("no such file", ["ptq", "--model", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "x")])


def test_quantize_checks_the_peft_run_came_from_the_ptq_folder(tmp_path):
    """`treeq quantize --ptq A --peft B`: B records the digest of the ptq.json it was fine-tuned from; another
    calibration is refused before anything loads (it packed an artifact 200x further from FP)."""
    from treeq_engine.calib.peft import check_made_from
    from treeq_engine.calib.store import digest

    ptq, peft = tmp_path / "ptq", tmp_path / "peft"
    ptq.mkdir()
    peft.mkdir()
    state = {"plan": {"a": 1}, "config": {"b": 2}, "data": None, "layers": {}}
    (ptq / "ptq.json").write_text(json.dumps(state))
    mine = digest({k: state.get(k) for k in ("plan", "config", "data", "layers")})
    (peft / "peft.json").write_text(json.dumps({"data": {"ptq": mine}}))
    check_made_from(peft, ptq)
    (peft / "peft.json").write_text(json.dumps({"data": {"ptq": "0123456789abcdef"}}))
    with pytest.raises(CheckpointError, match="fine-tuned from another calibration"):
        check_made_from(peft, ptq)
    (peft / "peft.json").write_text(json.dumps({"data": None}))   # the Python API without data: not checked
    check_made_from(peft, ptq)
