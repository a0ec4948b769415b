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
    abar = guidance.linear_schedule()
    torch.manual_seed(0)
    g_ref, g_ours = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    for i, t in enumerate(timesteps.tolist()):
        x = torch.randn(2, 3, 8, 8)
        out = torch.randn(2, 6 if learned else 3, 8, 8)
        if learned:
            out[:, 3:] = out[:, 3:].tanh()  # the model's variance interpolation lies in [-1, 1]
        x_ref = ref.step(out, t, x, generator=g_ref).prev_sample
        t_prev = timesteps[i + 1].item() if i + 1 < len(timesteps) else -1
        noise = torch.randn(x.shape, generator=g_ours) if t_prev >= 0 else None
        x_ours = guidance.ddpm_step(abar, out, t, t_prev, x, noise=noise)
        assert (x_ours - x_ref).abs().max() < 1e-4 * x_ref.abs().max(), t


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_ddim_steps_match_diffusers(prediction_type, eta):
    ref = diffusers.DDIMScheduler(beta_schedule="linear", clip_sample=False, prediction_type=prediction_type,
                                  set_alpha_to_one=True)
    ref.set_timesteps(15)
    abar = guidance.linear_schedule()
    timesteps = guidance.spaced_timesteps(15)
    for i, t in enumerate(timesteps.tolist()):
        x, out, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
        x_ref = ref.step(out, t, x, eta=eta, variance_noise=noise if eta else None).prev_sample
        t_prev = timesteps[i + 1].item() if i + 1 < len(timesteps) else -1
        x_ours = guidance.ddim_step(abar, out, t, t_prev, x, noise=noise, eta=eta, prediction_type=prediction_type)
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


def test_sample_records_the_trajectory():
    abar = guidance.linear_schedule()
    timesteps = guidance.spaced_timesteps(5)
    record = []
    x = guidance.sample(lambda x, t: torch.zeros_like(x), torch.randn(2, 1, 4, 4), abar, timesteps,
                        step=guidance.ddim_step, record=record)
    assert [r[1] for r in record] == timesteps.tolist()
    assert all(r[0].shape == (2, 1, 4, 4) and r[2].shape == (2, 1, 4, 4) for r in record)
    assert x.shape == (2, 1, 4, 4)
