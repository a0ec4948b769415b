"""Samplers and CFG: each step equals diffusers' scheduler step on the same inputs and noise."""

import pytest
import torch

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
