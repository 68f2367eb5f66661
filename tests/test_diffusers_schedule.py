"""Sampler weights measured on a diffusers scheduler's own step (``search.diffusers_schedule``), held against the
closed forms where they exist: DDPM's equal our sampler's ``c(t)²`` on the same timesteps, DDIM's and Euler's
and first-order DPM-Solver's follow their steps; what has none says why; they travel in the calibration file to
the search (``--metric sampler``) and to PEFT (``--loss-weights sampler``)."""
import inspect
import math

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="diffusers is an optional dependency (requirements-dev.txt)")

from treeq_engine.search import diffusers_schedule as ds  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")   # diffusers' own numpy calls, per step


def test_ddpm_weights_equal_our_samplers():
    """A DDPMScheduler on our respaced DDPM's timesteps gives our ``sampler_weights`` (both normalised): the
    measurement through its ``step`` equals our formula."""
    from treeq_engine.models.diffusion import create_diffusion, sampler_weights

    ours = create_diffusion("25", diffusion_steps=1000)
    want = sampler_weights(ours, torch.arange(len(ours.timestep_map)))
    want = want / want.mean()
    sched = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    sched.set_timesteps(timesteps=sorted(ours.timestep_map.tolist(), reverse=True))
    got = ds.scheduler_weights(sched)
    assert len(got) == 25
    got_t = torch.tensor([got[float(t)] for t in ours.timestep_map.tolist()], dtype=torch.float64)
    # diffusers keeps ᾱ in float32: 1 − ᾱ_0 = 1e-4 keeps 3 of its 7 digits, the other steps agree to 2e-5
    torch.testing.assert_close(got_t[1:], want[1:], rtol=2e-5, atol=0)
    torch.testing.assert_close(got_t[:1], want[:1], rtol=5e-4, atol=0)


def _normalised(raw):
    mean = sum(raw) / len(raw)
    return [r / mean for r in raw]


@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
@pytest.mark.parametrize("alpha_to_one", [True, False])
def test_ddim_weights_follow_its_own_step(spacing, alpha_to_one):
    """DDIM steps to t − T/N (not always the next scheduled timestep) and ends at ᾱ = 1 or ᾱ_0: the measured
    weights are its step's ε coefficient √(1 − ᾱ_prev) − √ᾱ_prev·√(1 − ᾱ_t)/√ᾱ_t under each setting."""
    sched = diffusers.DDIMScheduler(timestep_spacing=spacing, set_alpha_to_one=alpha_to_one, clip_sample=False)
    w = ds.scheduler_weights(sched, 10)
    probe = diffusers.DDIMScheduler(timestep_spacing=spacing, set_alpha_to_one=alpha_to_one)
    probe.set_timesteps(10)
    ts = [int(t) for t in probe.timesteps.tolist()]
    assert [int(t) for t in w] == ts
    abar = probe.alphas_cumprod.double()
    final = 1.0 if alpha_to_one else float(abar[0])
    raw = []
    for t in ts:
        prev = t - 1000 // 10
        a, p = float(abar[t]), (float(abar[prev]) if prev >= 0 else final)
        raw.append((math.sqrt(1 - p) - math.sqrt(p) * math.sqrt(1 - a) / math.sqrt(a)) ** 2)
    for t, r in zip(ts, _normalised(raw)):
        assert math.isclose(w[float(t)], r, rel_tol=1e-5), (t, w[float(t)], r)
    if spacing == "leading":   # its last step is t = 0, where ε barely moves the sample: it is damped
        assert w[float(ts[-1])] < 0.01 * w[float(ts[0])]
    # sample clipping makes a step depend on the data: the weights are the unclipped step's, the scheduler untouched
    clipped = diffusers.DDIMScheduler(timestep_spacing=spacing, set_alpha_to_one=alpha_to_one, clip_sample=True)
    assert ds.scheduler_weights(clipped, 10) == w
    assert clipped.config.clip_sample and clipped.num_inference_steps is None


def test_euler_and_first_order_dpm_solver():
    """Euler keeps x/√ᾱ (σ-space): its step x + (σ' − σ)·ε is brought to the model's scale, (σ' − σ)/√(σ'² + 1);
    first-order DPM-Solver++ is DDIM to the next scheduled timestep (and to ᾱ = 1 after the last)."""
    euler = diffusers.EulerDiscreteScheduler()
    w = ds.scheduler_weights(euler, 12)
    euler.set_timesteps(12)
    sig = euler.sigmas.double().tolist()
    raw = [((sig[k + 1] - sig[k]) / math.sqrt(sig[k + 1] ** 2 + 1)) ** 2 for k in range(12)]
    got = [w[float(t)] for t in euler.timesteps.tolist()]
    for g, r in zip(got, _normalised(raw)):
        assert math.isclose(g, r, rel_tol=1e-4)

    dpm = diffusers.DPMSolverMultistepScheduler(solver_order=1)
    w = ds.scheduler_weights(dpm, 10)
    dpm.set_timesteps(10)
    ts = [int(t) for t in dpm.timesteps.tolist()]
    abar = dpm.alphas_cumprod.double()
    raw = []
    for k, t in enumerate(ts):
        a, p = float(abar[t]), (float(abar[ts[k + 1]]) if k + 1 < len(ts) else 1.0)
        raw.append((math.sqrt(1 - p) - math.sqrt(p) * math.sqrt(1 - a) / math.sqrt(a)) ** 2)
    for t, r in zip(ts, _normalised(raw)):
        assert math.isclose(w[float(t)], r, rel_tol=1e-4)
    # the default second-order solver puts more on this step's ε between its first-order first and last steps
    w2 = ds.scheduler_weights(diffusers.DPMSolverMultistepScheduler(), 10)
    assert w2[float(ts[1])] / w2[float(ts[0])] > 1.2 * w[float(ts[1])] / w[float(ts[0])]


def test_schedules_that_visit_a_timestep_twice_and_refusals():
    heun = diffusers.HeunDiscreteScheduler()
    w = ds.scheduler_weights(heun, 8)
    heun.set_timesteps(8)
    assert set(w) == {float(t) for t in heun.timesteps.tolist()} and len(w) < len(heun.timesteps)
    assert all(v > 0 for v in w.values())
    with pytest.raises(ValueError, match="predicts 'v_prediction'"):
        ds.scheduler_weights(diffusers.DDIMScheduler(prediction_type="v_prediction"), 10)
    with pytest.raises(ValueError, match="no ᾱ schedule"):
        ds.scheduler_weights(diffusers.FlowMatchEulerDiscreteScheduler(), 10)
    with pytest.raises(ValueError, match="starts at zero SNR"):   # trailing spacing visits t = 999, where ᾱ = 0
        ds.scheduler_weights(diffusers.DDIMScheduler(rescale_betas_zero_snr=True, timestep_spacing="trailing"), 10)
    assert len(ds.scheduler_weights(diffusers.DDIMScheduler(rescale_betas_zero_snr=True), 10)) == 10   # 'leading'
    with pytest.raises(ValueError, match="non-finite"):   # diffusers' own arithmetic gives NaN here
        ds.scheduler_weights(diffusers.UniPCMultistepScheduler(solver_type="bh1"), 10)
    with pytest.raises(ValueError, match="could not be measured"):   # its step needs the predicted variance
        ds.scheduler_weights(diffusers.DDPMScheduler(variance_type="learned_range"), 10)
    with pytest.raises(ValueError, match="steps must be positive"):
        ds.scheduler_weights(diffusers.DDIMScheduler(), 0)


def test_weights_travel_in_the_calibration_file(tmp_path):
    from tiny_diffusers import tiny_dit

    from treeq_engine.search.diffusers_runner import DiffusersRunner, load_weights, save_inputs

    runner = DiffusersRunner(tiny_dit())
    inputs = runner.inputs(torch.randn(3, 4, 8, 8), torch.tensor([900, 500, 100]), torch.tensor([1, 2, 3]))
    table = {900.0: 2.0, 500.0: 0.75, 100.0: 0.25}
    path = str(tmp_path / "c.safetensors")
    save_inputs(path, runner, inputs, weights=table, scheduler="DDIMScheduler 3 steps")
    assert load_weights(path, runner) == table
    assert ds.per_sample(table, inputs[1], "x").tolist() == [2.0, 0.75, 0.25]
    fn = ds.batch_weights(table, runner.input_names.index("timestep"), "x")
    assert fn(tuple(t[1:] for t in inputs)).tolist() == [0.75, 0.25]
    plain = str(tmp_path / "p.safetensors")
    save_inputs(plain, runner, inputs)
    assert load_weights(plain, runner) is None
    with pytest.raises(ValueError, match=r"no sampler weight for timestep\(s\) \[100.0\]"):
        save_inputs(path, runner, inputs, weights={900.0: 1.0, 500.0: 1.0})
    with pytest.raises(ValueError, match="malformed sampler_weights"):
        ds.from_metadata({ds.METADATA_KEY: "[[1, 2, 3]]"}, "f")
    with pytest.raises(ValueError, match="non-negative finite"):
        ds.from_metadata({ds.METADATA_KEY: "[[1, -2]]"}, "f")


def test_a_step_that_is_not_linear_is_refused(monkeypatch):
    """The copies turn sample clipping and thresholding off; a switch they did not know of would make the step
    depend on the data, which the random-direction check catches."""
    monkeypatch.setattr(ds, "_NONLINEAR", ())
    for kw in ({"clip_sample": True}, {"thresholding": True}):
        with pytest.raises(ValueError, match="not linear in the model output"):
            ds.scheduler_weights(diffusers.DDIMScheduler(**kw), 10)


def test_step_arguments_and_the_held_schedule():
    """DDIM with η > 0 (the pipeline's ``eta``, passed through): √(1 − ᾱ_prev − σ²) − √ᾱ_prev·√(1 − ᾱ_t)/√ᾱ_t.
    Without steps, the schedule the scheduler holds is measured, fractional and custom timesteps included."""
    eta = 0.7
    sched = diffusers.DDIMScheduler(clip_sample=False)
    w = ds.scheduler_weights(sched, 10, step_kwargs={"eta": eta, "generator": None})
    sched.set_timesteps(10)
    abar = sched.alphas_cumprod.double()
    raw = []
    for t in sched.timesteps.tolist():
        a, p = float(abar[t]), (float(abar[t - 100]) if t >= 100 else 1.0)
        sigma2 = eta ** 2 * (1 - p) / (1 - a) * (1 - a / p)
        raw.append((math.sqrt(1 - p - sigma2) - math.sqrt(p) * math.sqrt(1 - a) / math.sqrt(a)) ** 2)
    for t, r in zip(sched.timesteps.tolist(), _normalised(raw)):
        assert math.isclose(w[float(t)], r, rel_tol=1e-5), t

    euler = diffusers.EulerDiscreteScheduler()
    euler.set_timesteps(12)
    held = ds.scheduler_weights(euler)
    assert list(held) == [float(t) for t in euler.timesteps.tolist()] and held == ds.scheduler_weights(euler, 12)
    assert float(euler.timesteps[1]) != int(euler.timesteps[1])   # fractional keys, kept as they are (above)
    with pytest.raises(ValueError, match="holds no inference schedule"):
        ds.scheduler_weights(diffusers.DDIMScheduler())


def _reference(sched, steps, seed=0):
    """The same quantity measured the plain way: the scheduler runs from a random state with random outputs, and
    at each call two copies step from that state with ε and ε + u (u random ±1); c = mean((Δ·u)) at the model's
    scale. Mean c² per timestep, normalised over the calls."""
    import copy

    g = torch.Generator().manual_seed(seed)
    sched = copy.deepcopy(sched)
    for k in ("clip_sample", "thresholding"):
        if getattr(sched.config, k, False):
            sched.register_to_config(**{k: False})
    sched.set_timesteps(steps)
    x = torch.randn(1, 4, 4, 4, generator=g, dtype=torch.float64) * float(sched.init_noise_sigma)
    calls = []
    for t in list(sched.timesteps):
        sched.scale_model_input(x, t)
        eps = torch.randn(x.shape, generator=g, dtype=torch.float64)
        u = torch.randint(0, 2, x.shape, generator=g).double() * 2 - 1
        a, b = copy.deepcopy(sched), copy.deepcopy(sched)
        kw = lambda: {"generator": torch.Generator().manual_seed(7)} if "generator" in inspect.signature(  # noqa: E731
            sched.step).parameters else {}
        ya = a.step(eps, t, x, return_dict=False, **kw())[0].double()
        yb = b.step(eps + u, t, x, return_dict=False, **kw())[0].double()
        c = float((b.scale_model_input(yb - ya, t) * u).mean())
        calls.append((float(t), c * c))
        x = sched.step(eps, t, x, return_dict=False, **kw())[0].double()
    mean = sum(w for _, w in calls) / len(calls)
    out = {}
    for t, w in calls:
        out.setdefault(t, []).append(w / mean)
    return {t: sum(v) / len(v) for t, v in out.items()}


@pytest.mark.parametrize("make", [
    lambda: diffusers.DDPMScheduler(), lambda: diffusers.DDIMScheduler(timestep_spacing="linspace"),
    lambda: diffusers.DPMSolverMultistepScheduler(),
    lambda: diffusers.DPMSolverMultistepScheduler(use_karras_sigmas=True),
    lambda: diffusers.UniPCMultistepScheduler(), lambda: diffusers.EulerDiscreteScheduler(),
    lambda: diffusers.EulerAncestralDiscreteScheduler(), lambda: diffusers.HeunDiscreteScheduler(),
    lambda: diffusers.KDPM2DiscreteScheduler(), lambda: diffusers.PNDMScheduler(),
    lambda: diffusers.PNDMScheduler(skip_prk_steps=True)],
    ids=["ddpm", "ddim-linspace", "dpm2m", "dpm2m-karras", "unipc", "euler", "euler-a", "heun", "kdpm2", "pndm-prk",
         "plms"])
def test_measured_as_from_a_real_trajectory(make):
    """From state 0 with output 0 (the probe) or from a random trajectory (the reference): the same weights, key
    for key, for every kind of step (ancestral, multistep, two calls per step, PRK)."""
    got, want = ds.scheduler_weights(make(), 8), _reference(make(), 8)
    assert list(got) == list(want)
    for t in want:
        assert math.isclose(got[t], want[t], rel_tol=1e-6, abs_tol=1e-12), (t, got[t], want[t])


def test_the_file_remembers_its_scheduler(tmp_path):
    """The calibration file stores the scheduler's class and settings; a pipeline whose scheduler changed since
    (class or any setting) gets a note naming what changed; files from before (a label only) compare by class."""
    import json

    from tiny_diffusers import tiny_dit

    from treeq_engine.search.diffusers_runner import DiffusersRunner, save_inputs, schedule_drift

    sched = diffusers.DDIMScheduler(num_train_timesteps=1000)
    sched.set_timesteps(3)
    cfg = ds.config_of(sched)
    assert cfg["_class_name"] == "DDIMScheduler" and cfg["timestep_spacing"] == "leading"
    assert not any(k.startswith("_") and k != "_class_name" for k in cfg)
    assert ds.config_drift(cfg, dict(cfg)) is None
    assert ds.config_drift(cfg, ds.config_of(diffusers.EulerDiscreteScheduler())) == \
        "DDIMScheduler became EulerDiscreteScheduler"
    many = {**cfg, "steps_offset": 1, "clip_sample": False, "beta_end": 0.03, "beta_start": 2e-4, "eta": 0.5}
    note = ds.config_drift(cfg, many)
    assert note.startswith("DDIMScheduler settings changed: beta_end") and note.endswith("(+1 more)")

    runner = DiffusersRunner(tiny_dit())
    inputs = runner.inputs(torch.randn(3, 4, 8, 8), torch.tensor([900, 500, 100]), torch.tensor([1, 2, 3]))
    table = {900.0: 2.0, 500.0: 0.75, 100.0: 0.25}
    path, old = str(tmp_path / "c.safetensors"), str(tmp_path / "old.safetensors")
    save_inputs(path, runner, inputs, weights=table, scheduler=sched)
    save_inputs(old, runner, inputs, weights=table, scheduler="DDIMScheduler 3 steps")   # a file from before

    pipe = tmp_path / "pipe"
    (pipe / "scheduler").mkdir(parents=True)
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "DiTPipeline",
                                                       "scheduler": ["diffusers", "DDIMScheduler"]}))
    sched.save_config(pipe / "scheduler")
    assert ds.pipeline_scheduler_config(pipe) == cfg
    assert schedule_drift(path, str(pipe)) is None and schedule_drift(old, str(pipe)) is None
    settings = json.loads((pipe / "scheduler" / "scheduler_config.json").read_text())
    (pipe / "scheduler" / "scheduler_config.json").write_text(json.dumps({**settings, "timestep_spacing": "trailing"}))
    assert "DDIMScheduler settings changed: timestep_spacing 'leading' -> 'trailing'" in schedule_drift(path, str(pipe))
    assert schedule_drift(old, str(pipe)) is None   # the old file knows the class only
    (pipe / "model_index.json").write_text(json.dumps({"scheduler": ["diffusers", "PNDMScheduler"]}))
    assert "(DDIMScheduler became PNDMScheduler)" in schedule_drift(old, str(pipe))
    assert "are DDIMScheduler 3 steps's" in schedule_drift(path, str(pipe))
    # nothing to compare with: a transformer directory, a scheduler diffusers does not have, inputs without weights
    assert ds.pipeline_scheduler_config(tmp_path) is None and schedule_drift(path, str(tmp_path)) is None
    (pipe / "model_index.json").write_text(json.dumps({"scheduler": ["mylib", "MyScheduler"]}))
    assert schedule_drift(path, str(pipe)) is None
    plain = str(tmp_path / "plain.safetensors")
    save_inputs(plain, runner, inputs)
    assert schedule_drift(plain, str(pipe)) is None


def test_labels_that_name_no_scheduler_give_no_note(tmp_path):
    """A file saved with an empty or free-form label and no stored settings is not compared (no made-up class)."""
    import json

    from tiny_diffusers import tiny_dit

    from treeq_engine.search.diffusers_runner import DiffusersRunner, save_inputs, schedule_drift

    runner = DiffusersRunner(tiny_dit())
    inputs = runner.inputs(torch.randn(2, 4, 8, 8), torch.tensor([900, 100]), torch.tensor([1, 2]))
    pipe = tmp_path / "pipe"
    (pipe / "scheduler").mkdir(parents=True)
    (pipe / "model_index.json").write_text(json.dumps({"scheduler": ["diffusers", "DDIMScheduler"]}))
    diffusers.DDIMScheduler().save_config(pipe / "scheduler")
    for label in ("", "   ", "my capture"):
        path = str(tmp_path / "c.safetensors")
        save_inputs(path, runner, inputs, weights={900.0: 1.0, 100.0: 0.5}, scheduler=label)
        assert schedule_drift(path, str(pipe)) is None
