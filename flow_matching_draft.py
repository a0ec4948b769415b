"""Flow matching for SD3 / SD3.5 as plain functions: schedule, forward process, Euler steps, a sampler.

A draft, to be folded into guidance.py beside the VP samplers. Rectified flow (Liu et al. 2022;
Esser et al. 2024, sec. 2) interpolates data and noise on a straight line,

    x_sigma = (1 - sigma) x_0 + sigma eps,   i.e. alpha = 1 - sigma,

and the model predicts the velocity v = d x_sigma / d sigma = eps - x_0, so that sampling is the ODE
dx = v d sigma, integrated from sigma = 1 (noise) to 0 by Euler steps. The model is given the
timestep t = sigma * num_train_timesteps. SD3 samples at sigmas shifted towards the noise
(Esser et al. eq. 23, "resolution-dependent shifting", shift 3 in its scheduler config):

    sigmas = flow_sigmas(28, shift=3.0)                  # (29,): 1 ... > 0, then 0
    x = flow_sample(lambda x, t: model(x, t, **cond), noise, sigmas)

Everything equals diffusers' FlowMatchEulerDiscreteScheduler (its static-shift path, the one the
SD3 and SD3.5 repos configure), number for number.
"""

import numpy as np
import torch

NUM_TRAIN_TIMESTEPS = 1000


def shift_sigmas(sigmas, shift):
    """Move sigmas towards the noise: s -> shift s / (1 + (shift - 1) s) (Esser et al. 2024, eq. 23)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def flow_sigmas(num_steps, shift=1.0, num_train_timesteps=NUM_TRAIN_TIMESTEPS):
    """The (num_steps + 1,) float32 sigmas an Euler sampler visits, from 1 down, then 0 (diffusers' set_timesteps).

    The steps are evenly spaced between sigma 1 and the smallest training sigma, already shifted,
    and are then shifted: diffusers' scheduler shifts that end point twice, and so do we.
    """
    if num_steps < 1:
        raise ValueError(f"steps must be at least 1, got {num_steps}")
    N = num_train_timesteps
    # the smallest training sigma, 1 / N, shifted in float32 as the scheduler's __init__ does
    sigma_min = shift_sigmas(torch.tensor(1.0, dtype=torch.float32) / N, shift).item()
    sigmas = np.linspace(1.0 * N, sigma_min * N, num_steps) / N  # float64, as numpy computes it there
    sigmas = torch.from_numpy(shift_sigmas(sigmas, shift)).to(torch.float32)
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def flow_timesteps(sigmas, num_train_timesteps=NUM_TRAIN_TIMESTEPS):
    """The timesteps the model is given at each step: sigma * num_train_timesteps, the final 0 left out."""
    return sigmas[:-1] * num_train_timesteps


def flow_alpha_sigma(sigma):
    """(alpha, sigma) of the flow-matching schedule: x_sigma = alpha x_0 + sigma eps with alpha = 1 - sigma."""
    return 1 - sigma, sigma


def flow_add_noise(x0, noise, sigma):
    """x_sigma = (1 - sigma) x_0 + sigma eps, sigma a number or one per sample (diffusers' scale_noise)."""
    sigma = torch.as_tensor(sigma, dtype=x0.dtype, device=x0.device)
    sigma = sigma.view(-1, *[1] * (x0.ndim - 1)) if sigma.ndim else sigma
    return sigma * noise + (1.0 - sigma) * x0


def flow_predict_x0_eps(v, x, sigma):
    """(x_0, eps) implied by a velocity v at x_sigma: x_0 = x - sigma v, eps = x + (1 - sigma) v."""
    return x - sigma * v, x + (1 - sigma) * v


def flow_euler_step(v, sigma, sigma_next, x):
    """One Euler step of dx = v d sigma from sigma to sigma_next (< sigma), in fp32, returned in v's dtype."""
    # as diffusers' step: the sample in fp32, dt a 0-d float32 tensor, the result cast back
    dt = torch.as_tensor(sigma_next, dtype=torch.float32) - torch.as_tensor(sigma, dtype=torch.float32)
    return (x.to(torch.float32) + dt * v).to(v.dtype)


def flow_sample(denoise, x, sigmas, callback=None, num_train_timesteps=NUM_TRAIN_TIMESTEPS):
    """Integrate the flow from x at sigmas[0] through sigmas[-1] (= 0) with Euler steps; `denoise(x, t) -> v`.

    `callback(dict(i=, x=, t=, sigma=, v=))` sees each step's input and the velocity used (CFG's, if
    denoise guides): a trajectory recorder keeps what it needs.
    """
    sigmas = sigmas.to(torch.float32)
    for i in range(len(sigmas) - 1):
        t = (sigmas[i] * num_train_timesteps).to(x.device)  # the timestep the model is given (0-d)
        v = denoise(x, t)
        if callback is not None:
            callback(dict(i=i, x=x, t=t, sigma=sigmas[i], v=v))
        x = flow_euler_step(v, sigmas[i], sigmas[i + 1], x)
    return x


# -----------------------------------------------------------------------------
# the scheduler config of the SD3 / SD3.5 repos (scheduler/scheduler_config.json)

# FlowMatchEulerDiscreteScheduler options other than the shift, at the values with which the
# schedule above is the scheduler's (the SD3 and SD3.5 repos set them so, or leave them out);
# the dynamic-shifting settings do nothing without use_dynamic_shifting.
_INERT = dict(use_dynamic_shifting=False, invert_sigmas=False, shift_terminal=None, use_karras_sigmas=False,
              use_exponential_sigmas=False, use_beta_sigmas=False, stochastic_sampling=False)
_UNUSED = ("base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len", "time_shift_type")


def flow_scheduler_options(config, source="scheduler_config.json"):
    """dict(shift=, num_train_timesteps=) from a FlowMatchEulerDiscreteScheduler config, refusing other schedules."""
    if config.get("_class_name", "FlowMatchEulerDiscreteScheduler") != "FlowMatchEulerDiscreteScheduler":
        raise ValueError(f"{source}: _class_name is {config['_class_name']}, expected FlowMatchEulerDiscreteScheduler")
    for key, value in config.items():
        if key.startswith("_") or key in ("shift", "num_train_timesteps") or key in _UNUSED:
            continue
        if key not in _INERT:
            raise ValueError(f"{source}: {key} is not a FlowMatchEulerDiscreteScheduler option this sampler knows")
        if value != _INERT[key]:
            raise ValueError(f"{source}: {key}={value!r} is not supported "
                             f"(this sampler implements {key}={_INERT[key]!r})")
    return dict(shift=float(config.get("shift", 1.0)),
                num_train_timesteps=int(config.get("num_train_timesteps", NUM_TRAIN_TIMESTEPS)))
