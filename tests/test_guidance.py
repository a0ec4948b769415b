"""Samplers and CFG: each step equals diffusers' scheduler step on the same inputs and noise."""

import json
import math

import pytest
import torch

import checkpoint
import guidance

diffusers = pytest.importorskip("diffusers")


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_spaced_timesteps_match_diffusers(spacing):
    for n in (1, 7, 50, 250):
        ref = diffusers.DDIMScheduler(timestep_spacing=spacing, steps_offset=1 if spacing == "leading" else 0)
        ref.set_timesteps(n)
        ours = guidance.spaced_timesteps(n, spacing=spacing, steps_offset=1 if spacing == "leading" else 0)
        assert torch.equal(ours, ref.timesteps), (spacing, n)


def test_iddpm_respacing_is_dits():
    ts = guidance.spaced_timesteps(250, spacing="iddpm")
    assert ts[0] == 999 and ts[-1] == 0 and len(set(ts.tolist())) == 250
    assert ts[1] == round(248 * 999 / 249)  # IDDPM's space_timesteps: round(i * (T - 1) / (n - 1))


def test_linear_schedule_matches_diffusers():
    ref = diffusers.DDPMScheduler(beta_schedule="linear")
    assert torch.allclose(guidance.linear_schedule().float(), ref.alphas_cumprod, rtol=1e-6)
    ref = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    assert torch.allclose(guidance.scaled_linear_schedule().float(), ref.alphas_cumprod, rtol=1e-6)


@pytest.mark.parametrize("learned", [True, False])
def test_ddpm_steps_match_diffusers(learned):
    """Every step of a respaced DDPM chain (learned-range variance, as DiT samples), with shared noise."""
    timesteps = guidance.spaced_timesteps(20, spacing="iddpm")
    ref = diffusers.DDPMScheduler(beta_schedule="linear", clip_sample=False,
                                  variance_type="learned_range" if learned else "fixed_small")
    ref.set_timesteps(timesteps=timesteps.tolist())
    ours = guidance.Scheduler(guidance.VPSchedule(guidance.linear_schedule()), guidance.ddpm_step)
    torch.manual_seed(0)
    g_ref, g_ours = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    for i, t in enumerate(timesteps.tolist()):
        x = torch.randn(2, 3, 8, 8)
        out = torch.randn(2, 6 if learned else 3, 8, 8)
        if learned:
            out[:, 3:] = out[:, 3:].tanh()  # the model's variance interpolation lies in [-1, 1]
        x_ref = ref.step(out, t, x, generator=g_ref).prev_sample
        t_prev = timesteps[i + 1].item() if i + 1 < len(timesteps) else None
        noise = torch.randn(x.shape, generator=g_ours) if t_prev is not None else None
        x_ours = ours.step(out, x, t, t_prev, noise=noise)
        assert (x_ours - x_ref).abs().max() < 1e-4 * x_ref.abs().max(), t


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_ddim_steps_match_diffusers(prediction_type, eta):
    ref = diffusers.DDIMScheduler(beta_schedule="linear", clip_sample=False, prediction_type=prediction_type,
                                  set_alpha_to_one=True)
    ref.set_timesteps(15)
    ours = guidance.Scheduler(guidance.VPSchedule(guidance.linear_schedule()), guidance.ddim_step,
                              dict(eta=eta, prediction_type=prediction_type))
    timesteps = ours.timesteps(15)
    for i, t in enumerate(timesteps.tolist()):
        x, out, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
        x_ref = ref.step(out, t, x, eta=eta, variance_noise=noise if eta else None).prev_sample
        t_prev = timesteps[i + 1].item() if i + 1 < len(timesteps) else None
        x_ours = ours.step(out, x, t, t_prev, noise=noise)
        assert (x_ours - x_ref).abs().max() < 1e-4 * x_ref.abs().max(), t


def test_cfg_formula():
    cond, uncond = torch.randn(3, 8, 4, 4), torch.randn(3, 8, 4, 4)
    assert torch.allclose(guidance.cfg(cond, uncond, 1.0, 4), cond, atol=1e-6)  # w = 1: no guidance
    out = guidance.cfg(cond, uncond, torch.tensor([0.0, 2.0, 5.5]), 4)
    assert torch.allclose(out[0, :4], uncond[0, :4])  # w = 0: unconditional
    assert torch.allclose(out[2, :4], uncond[2, :4] + 5.5 * (cond[2, :4] - uncond[2, :4]))
    assert torch.equal(out[:, 4:], cond[:, 4:])  # learned variance: the conditional one


def test_guided_batches_both_passes_into_one_call():
    calls = []

    def model(x, t, y):
        calls.append(len(x))
        return x * (y.float() + 1).view(-1, 1, 1, 1)

    x = torch.randn(2, 1, 4, 4)
    out = guidance.guided(model, 3.0, {"y": torch.tensor([1, 2])}, {"y": torch.tensor([0, 0])})(x, torch.tensor([5, 5]))
    assert calls == [4]
    expected = x * 1 + 3.0 * (x * torch.tensor([2.0, 3.0]).view(-1, 1, 1, 1) - x)
    assert torch.allclose(out, expected)


def test_sample_reports_each_step_to_the_callback():
    scheduler = guidance.Scheduler(guidance.VPSchedule(guidance.linear_schedule()), guidance.ddim_step)
    timesteps = scheduler.timesteps(5)
    seen, kept = [], []

    def keep_two(step):  # the callback keeps what it wants, where it wants it
        seen.append(step["i"])
        if step["i"] in (0, 4):
            kept.append((step["x"].half().cpu(), step["t"], step["out"].half().cpu()))

    x = guidance.sample(lambda x, t: torch.zeros_like(x), torch.randn(2, 1, 4, 4), scheduler, timesteps,
                        callback=keep_two)
    assert seen == [0, 1, 2, 3, 4] and [k[1] for k in kept] == [timesteps[0].item(), timesteps[4].item()]
    assert all(k[0].shape == (2, 1, 4, 4) and k[0].dtype == torch.float16 for k in kept)
    assert x.shape == (2, 1, 4, 4)


def test_a_schedule_is_alpha_and_sigma():
    abar = guidance.linear_schedule()
    schedule = guidance.VPSchedule(abar)
    for t in (0, 1, 500, 999):
        alpha, sigma = schedule(t)
        assert alpha == abar[t].item() ** 0.5 and abs(alpha**2 + sigma**2 - 1) < 1e-12  # variance preserving
    alpha, sigma = schedule(499.5)  # a fractional timestep: between its neighbours, in log abar
    assert schedule(500)[0] < alpha < schedule(499)[0]
    assert abs(alpha**2 - (abar[499] * abar[500]).sqrt().item()) < 1e-12


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "flow"])
def test_predictions_give_back_x0_and_eps(prediction_type):
    """x = alpha x_0 + sigma eps, for VP (alpha^2 + sigma^2 = 1) and flow matching (alpha = 1 - sigma)."""
    x0, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    alpha, sigma = (0.3, 0.7) if prediction_type == "flow" else (0.6, 0.8)
    x = alpha * x0 + sigma * eps
    prediction = {"epsilon": eps, "v_prediction": alpha * eps - sigma * x0, "flow": eps - x0}[prediction_type]
    got_x0, got_eps = guidance.predict_x0_eps(prediction, x, alpha, sigma, prediction_type)
    torch.testing.assert_close(got_x0, x0), torch.testing.assert_close(got_eps, eps)


# -----------------------------------------------------------------------------
# flow matching (SD3, SD3.5): against FlowMatchEulerDiscreteScheduler


def flow(shift=3.0, **config):
    return guidance.scheduler_from_config({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": shift, **config})


@pytest.mark.parametrize("shift", [1.0, 3.0, 1.7])
@pytest.mark.parametrize("steps", [1, 2, 4, 28, 50, 1000])
def test_flow_timesteps_equal_the_schedulers(shift, steps):
    ref = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    ref.set_timesteps(steps)
    timesteps = flow(shift).timesteps(steps)
    assert timesteps.dtype == torch.float32 and torch.equal(timesteps, ref.timesteps)
    assert timesteps[0] == 1000 and (timesteps.diff() < 0).all() and timesteps[-1] > 0
    alpha, sigma = flow(shift).schedule(timesteps[-1].item())  # the schedule's sigma is the scheduler's, t / 1000
    assert abs(sigma - ref.sigmas[-2].item()) < 1e-7 and alpha == 1 - sigma


def test_flow_steps_are_the_schedulers_euler_steps():
    """Deterministic DDIM on the velocity in (1 - sigma, sigma) is the scheduler's x + (sigma_next - sigma) v."""
    ref = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    ref.set_timesteps(28)
    ours = flow()
    assert ours.step_fn is guidance.ddim_step and ours.options == {"prediction_type": "flow"}
    assert ours.name == "flow euler" and not ours.stochastic
    timesteps = ours.timesteps(28)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 8, 8, generator=g)
    mine = x.clone()
    for i, t in enumerate(timesteps.tolist()):
        v = 2 * torch.randn(x.shape, generator=g)
        x = ref.step(v, ref.timesteps[i], x, return_dict=False)[0]
        mine = ours.step(v, mine, t, timesteps[i + 1].item() if i + 1 < len(timesteps) else None)
        assert (mine - x).abs().max() <= 1e-6 * x.abs().max(), i
    assert ours.final == (1.0, 0.0)  # past the last step: sigma 0, the clean sample


def test_flow_forward_process_and_predictions():
    ref = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    ref.set_timesteps(10)
    schedule = flow().schedule
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(3, 4, 6, 6, generator=g), torch.randn(3, 4, 6, 6, generator=g)
    t = ref.timesteps[[0, 4, 9]]
    x = guidance.add_noise(schedule, x0, t, noise)
    torch.testing.assert_close(x, ref.scale_noise(x0, t, noise), atol=1e-6, rtol=1e-6)
    alpha, sigma = schedule.per_sample(t, x0)
    assert torch.equal(alpha + sigma, torch.ones_like(alpha)) and alpha.shape == (3, 1, 1, 1)
    v = noise - x0  # the velocity of the straight path
    got_x0, got_eps = guidance.predict_x0_eps(v, x, alpha, sigma, "flow")
    torch.testing.assert_close(got_x0, x0, atol=1e-5, rtol=1e-5), torch.testing.assert_close(got_eps, noise)
    # one step on the exact velocity lands on the path again, at the next timestep
    nxt = guidance.ddim_step(v[:1], x[:1], schedule(t[0].item()), schedule(100.0), prediction_type="flow")
    torch.testing.assert_close(nxt, guidance.add_noise(schedule, x0[:1], torch.tensor([100.0]), noise[:1]))


def test_flow_sample_runs_the_schedulers_loop_and_reports_each_step():
    ref = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    ref.set_timesteps(5)
    m = torch.randn(4, 4, generator=torch.Generator().manual_seed(2))

    def denoise(x, t):  # any function of (x, t): a fixed linear map, scaled by the timestep
        return torch.einsum("ij,bjhw->bihw", m, x) * (t.reshape(-1, 1, 1, 1) / 1000)

    x = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(3))
    expected = x.clone()
    for t in ref.timesteps:
        expected = ref.step(denoise(expected, t.expand(2)), t, expected, return_dict=False)[0]
    seen, s = [], flow()
    out = guidance.sample(denoise, x, s, s.timesteps(5), callback=seen.append)
    assert (out - expected).abs().max() <= 1e-6 * expected.abs().max()
    assert [step["i"] for step in seen] == list(range(5))
    assert torch.equal(torch.tensor([step["t"] for step in seen]), ref.timesteps)  # the model's t = 1000 sigma
    assert torch.equal(seen[0]["x"], x) and torch.equal(seen[-1]["out"], denoise(seen[-1]["x"],
                                                                                 ref.timesteps[-1].expand(2)))


def test_flow_interval_guidance_skips_the_pure_noise_step():
    """At t = 1000 flow matching's alpha is 0: the noise level sigma / alpha is infinite, above any interval."""
    s = flow()
    timesteps = s.timesteps(4)
    scales = guidance.WSchedule("interval", low=0.5, high=20.0).scales(5.0, s, timesteps)
    assert scales == [1.0, 5.0, 5.0, 1.0]  # sigma / alpha: inf, 6.0, 1.5, 0.009
    assert guidance.WSchedule("interval", low=0.0, high=math.inf).scales(5.0, s, timesteps)[0] == 5.0


@pytest.mark.parametrize("name", ["SD3_SCHEDULER", "SD35_SCHEDULER"])
def test_official_flow_scheduler_configs(name):
    import tiny_pipelines

    config = getattr(tiny_pipelines, name)
    s = guidance.scheduler_from_config(config)
    assert isinstance(s.schedule, guidance.FlowSchedule) and s.shift == 3.0 and s.timestep_spacing == "shifted"
    ref = diffusers.FlowMatchEulerDiscreteScheduler.from_config(config)
    ref.set_timesteps(28)
    assert torch.equal(s.timesteps(28), ref.timesteps)


@pytest.mark.parametrize("change, message", [
    (dict(use_dynamic_shifting=True), "use_dynamic_shifting=True is not supported"),
    (dict(stochastic_sampling=True), "stochastic_sampling=True is not supported"),
    (dict(shift_terminal=0.1), "shift_terminal=0.1 is not supported"),
    (dict(prediction_type="epsilon"), "prediction_type is not a FlowMatchEulerDiscreteScheduler option"),
    (dict(beta_schedule="scaled_linear"), "beta_schedule is not a FlowMatchEulerDiscreteScheduler option"),
])
def test_unsupported_flow_options_are_named(change, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        flow(**change)
    file = tmp_path / "scheduler" / "scheduler_config.json"  # from a pipeline folder: the file is named too
    file.parent.mkdir()
    file.write_text(json.dumps({"_class_name": "FlowMatchEulerDiscreteScheduler", **change}))
    with pytest.raises(checkpoint.CheckpointError, match=f"scheduler_config.json: {message}"):
        guidance.scheduler_from_config(tmp_path)
    with pytest.raises(ValueError, match="at least 1"):
        flow().timesteps(0)
