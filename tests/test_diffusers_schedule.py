"""Sampler weights read off a diffusers scheduler (``search.diffusers_schedule``): DDPM's equal our sampler's
``c(t)²`` on the same timesteps, DDIM's follow its step's ε coefficient, what has none says why; they travel in
the calibration file to the search (``--metric sampler``) and to PEFT (``--loss-weights sampler``)."""
import math

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="diffusers is an optional dependency (requirements-dev.txt)")

from treeq_engine.search import diffusers_schedule as ds  # noqa: E402


def test_ddpm_weights_equal_our_samplers():
    """A DDPMScheduler on our respaced DDPM's timesteps gives our ``sampler_weights`` (both normalised)."""
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


def test_ddim_weights_are_its_steps_eps_coefficient():
    sched = diffusers.DDIMScheduler(num_train_timesteps=1000)
    w = ds.scheduler_weights(sched, 10)
    ts = [float(t) for t in sched.timesteps.tolist()]
    assert list(w) == ts and math.isclose(sum(w.values()) / len(w), 1.0)
    abar = sched.alphas_cumprod.double()
    raw = []
    for k, t in enumerate(ts):
        a, p = float(abar[int(t)]), (float(abar[int(ts[k + 1])]) if k + 1 < len(ts) else 1.0)
        # x_prev = √ᾱ_prev·x̂0 + √(1−ᾱ_prev)·ε with x̂0 = (x − √(1−ᾱ)·ε)/√ᾱ: ∂x_prev/∂ε
        raw.append((math.sqrt(1 - p) - math.sqrt(p) * math.sqrt(1 - a) / math.sqrt(a)) ** 2)
    mean = sum(raw) / len(raw)
    for t, r in zip(ts, raw):
        assert math.isclose(w[t], r / mean, rel_tol=1e-12)
    assert w[ts[-1]] < 0.01 * w[ts[0]]   # the last step's ε barely moves the sample: it is damped

    dpm = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=1000)
    assert len(ds.scheduler_weights(dpm, 20)) == 20
    with pytest.raises(ValueError, match="predicts 'v_prediction'"):
        ds.scheduler_weights(diffusers.DDIMScheduler(prediction_type="v_prediction"), 10)
    with pytest.raises(ValueError, match="no ᾱ schedule"):
        ds.scheduler_weights(diffusers.FlowMatchEulerDiscreteScheduler(), 10)
    with pytest.raises(ValueError, match="steps must be positive"):
        ds.scheduler_weights(sched, 0)


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
