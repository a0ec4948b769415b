"""flow_matching_draft.py against diffusers' FlowMatchEulerDiscreteScheduler: sigmas, timesteps, steps, loop."""

import pytest
import torch

import flow_matching_draft as fm

diffusers = pytest.importorskip("diffusers")

# scheduler/scheduler_config.json of stabilityai/stable-diffusion-3-medium-diffusers and of
# stable-diffusion-3.5-large (which spells out diffusers' defaults of its day)
SD3_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.29.0.dev0",
                 "num_train_timesteps": 1000, "shift": 3.0}
SD35_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.31.0.dev0",
                  "base_image_seq_len": 256, "base_shift": 0.5, "invert_sigmas": False, "max_image_seq_len": 4096,
                  "max_shift": 1.15, "num_train_timesteps": 1000, "shift": 3.0, "shift_terminal": None,
                  "use_beta_sigmas": False, "use_dynamic_shifting": False, "use_exponential_sigmas": False,
                  "use_karras_sigmas": False}


@pytest.mark.parametrize("shift", [1.0, 3.0, 1.7])
@pytest.mark.parametrize("steps", [1, 2, 4, 28, 50, 1000])
def test_sigmas_and_timesteps_equal_the_schedulers(shift, steps):
    ref = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    ref.set_timesteps(steps)
    sigmas = fm.flow_sigmas(steps, shift=shift)
    assert sigmas.dtype == torch.float32 and sigmas.shape == (steps + 1,)
    assert torch.equal(sigmas, ref.sigmas)
    assert torch.equal(fm.flow_timesteps(sigmas), ref.timesteps)
    assert sigmas[0] == 1 and sigmas[-1] == 0 and (sigmas.diff() < 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_euler_steps_equal_the_schedulers(dtype):
    ref = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    ref.set_timesteps(6)
    sigmas = fm.flow_sigmas(6, shift=3.0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 5, 5, generator=g).to(dtype)
    ours = x.clone()
    for i, t in enumerate(ref.timesteps):
        v = torch.randn(2, 4, 5, 5, generator=g).to(dtype)
        x = ref.step(v, t, x, return_dict=False)[0]
        ours = fm.flow_euler_step(v, sigmas[i], sigmas[i + 1], ours)
        assert ours.dtype == x.dtype == dtype
        assert torch.equal(ours, x), i


def test_forward_process_and_predictions():
    ref = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    ref.set_timesteps(10)
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(3, 4, 6, 6, generator=g), torch.randn(3, 4, 6, 6, generator=g)
    ts = ref.timesteps[[0, 4, 9]]
    sigma = ts / 1000
    assert torch.equal(fm.flow_add_noise(x0, noise, sigma), ref.scale_noise(x0, ts, noise))
    x = fm.flow_add_noise(x0, noise, sigma)
    v = noise - x0  # the velocity of the straight path
    got_x0, got_eps = fm.flow_predict_x0_eps(v, x, sigma.view(-1, 1, 1, 1))
    assert torch.allclose(got_x0, x0, atol=1e-5) and torch.allclose(got_eps, noise, atol=1e-5)
    alpha, s = fm.flow_alpha_sigma(sigma)
    assert torch.allclose(alpha + s, torch.ones(3))
    # one Euler step on the exact velocity lands on the path again: x at the next sigma
    nxt = fm.flow_euler_step(v, sigma.view(-1, 1, 1, 1), 0.1, x)
    assert torch.allclose(nxt, fm.flow_add_noise(x0, noise, 0.1), atol=1e-5)


def test_sample_runs_the_schedulers_loop_and_reports_each_step():
    ref = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    ref.set_timesteps(5)
    w = torch.randn(4, 4, generator=torch.Generator().manual_seed(2))

    def denoise(x, t):  # any function of (x, t): a fixed linear map, scaled by the timestep
        return torch.einsum("ij,bjhw->bihw", w, x) * (t.reshape(-1, 1, 1, 1) / 1000)

    x = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(3))
    expected = x.clone()
    for t in ref.timesteps:
        expected = ref.step(denoise(expected, t.expand(2)), t, expected, return_dict=False)[0]
    seen = []
    out = fm.flow_sample(denoise, x, fm.flow_sigmas(5, shift=3.0), callback=seen.append)
    assert torch.equal(out, expected)
    assert [s["i"] for s in seen] == list(range(5))
    assert torch.equal(torch.stack([s["t"] for s in seen]), ref.timesteps)
    assert torch.equal(seen[0]["x"], x) and torch.equal(seen[-1]["v"], denoise(seen[-1]["x"], ref.timesteps[-1]))


@pytest.mark.parametrize("config", [SD3_SCHEDULER, SD35_SCHEDULER], ids=["sd3", "sd3.5"])
def test_official_scheduler_configs(config):
    assert fm.flow_scheduler_options(config) == dict(shift=3.0, num_train_timesteps=1000)
    ref = diffusers.FlowMatchEulerDiscreteScheduler.from_config(config)
    ref.set_timesteps(28)
    assert torch.equal(fm.flow_sigmas(28, **fm.flow_scheduler_options(config)), ref.sigmas)


@pytest.mark.parametrize("change, message", [
    (dict(_class_name="EulerDiscreteScheduler"), "expected FlowMatchEulerDiscreteScheduler"),
    (dict(use_dynamic_shifting=True), "use_dynamic_shifting=True is not supported"),
    (dict(stochastic_sampling=True), "stochastic_sampling=True is not supported"),
    (dict(prediction_type="epsilon"), "prediction_type is not a FlowMatchEulerDiscreteScheduler option"),
])
def test_unsupported_scheduler_options(change, message):
    with pytest.raises(ValueError, match=message):
        fm.flow_scheduler_options({**SD35_SCHEDULER, **change})
    with pytest.raises(ValueError, match="at least 1"):
        fm.flow_sigmas(0)
