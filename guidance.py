"""Noise schedules, samplers and classifier-free guidance, over the one denoiser interface.

A denoiser here is any function `denoise(x, t) -> out`, where `out` is the model's own prediction
(epsilon, v or a flow velocity, with the learned variance in extra channels where the model has
them). Models, CFG and adapter students all become one with a closure:

    denoise = lambda x, t: model(x, t, **cond)             # the conditional model, one pass
    denoise = guided(model, w, cond, null)                  # CFG, two passes (batched as one)
    denoise = lambda x, t: student(x, t, w=w, **cond)       # AGD, one pass

A schedule gives (alpha_t, sigma_t) of x_t = alpha_t x_0 + sigma_t eps at a model timestep t:
VP schedules (DiT, SD) from the `alphas_cumprod` of their betas, alpha^2 + sigma^2 = 1; flow
matching (SD3) has alpha = 1 - sigma. Steps are plain functions of the model's output between two
such pairs, `step(out, x, now, nxt, noise=None, **options)`, and `sample` runs one over a list of
timesteps, reporting each step to a callback (what AGD's trajectory collection keeps, Algorithm 1
of Jensen & Sadat 2025). A `Scheduler` puts a schedule, a step and its options together as a
diffusers scheduler config describes them (`scheduler_from_config`), for DiT as for SD.
"""

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import checkpoint

# -----------------------------------------------------------------------------
# noise schedules


def linear_schedule(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02):
    """alphas_cumprod of DDPM's linear betas (Ho et al. 2020), as DiT trains with."""
    betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
    return torch.cumprod(1 - betas, dim=0)


def scaled_linear_schedule(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012):
    """alphas_cumprod of Stable Diffusion's betas: linear in sqrt(beta)."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, dim=0)


class VPSchedule:
    """A variance-preserving schedule: alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t) (Ho et al. 2020).

    abar is defined at the integer training timesteps 0 ... T - 1; a fractional t interpolates log abar.
    """

    def __init__(self, alphas_cumprod):
        self.alphas_cumprod = alphas_cumprod.double()  # (T,)

    @property
    def num_train_timesteps(self):
        return len(self.alphas_cumprod)

    def abar(self, t):
        if float(t) == int(t):
            return self.alphas_cumprod[int(t)].item()
        lo, frac = int(math.floor(t)), t - math.floor(t)
        log = (1 - frac) * self.alphas_cumprod[lo].log() + frac * self.alphas_cumprod[lo + 1].log()
        return log.exp().item()

    def __call__(self, t):
        """(alpha_t, sigma_t) as Python floats, for one timestep."""
        abar = self.abar(t)
        return abar**0.5, (1 - abar) ** 0.5

    def per_sample(self, t, like):
        """(alpha_t, sigma_t) for integer timesteps t (B,), shaped to broadcast against `like` (B, ...)."""
        abar = self.alphas_cumprod.to(like.device)[t].float().view(-1, *[1] * (like.ndim - 1))
        return abar.sqrt(), (1 - abar).sqrt()


def add_noise(schedule, x0, t, noise):
    """Sample q(x_t | x_0) = N(alpha_t x_0, sigma_t^2 I) at timesteps t (B,)."""
    alpha, sigma = schedule.per_sample(t, x0)
    return alpha * x0 + sigma * noise


def spaced_timesteps(num_steps, num_train_timesteps=1000, spacing="leading", steps_offset=0):
    """The descending training timesteps a sampler visits (Lin et al. 2023, Table 2; IDDPM respacing).

    "leading", "trailing" and "linspace" are diffusers' spacings; "iddpm" is improved DDPM's
    `space_timesteps`, which DiT samples with (evenly spaced, rounded, from 0 to T - 1).
    """
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"steps must be in [1, {num_train_timesteps}], got {num_steps}")
    if spacing == "leading":
        ts = np.arange(num_steps) * (num_train_timesteps // num_steps) + steps_offset
    elif spacing == "trailing":
        ts = np.round(np.arange(num_train_timesteps, 0, -num_train_timesteps / num_steps)) - 1
    elif spacing == "linspace":
        ts = np.linspace(0, num_train_timesteps - 1, num_steps).round()
    elif spacing == "iddpm":
        stride = (num_train_timesteps - 1) / (num_steps - 1) if num_steps > 1 else 0
        ts = np.array([round(i * stride) for i in range(num_steps)])
    else:
        raise ValueError(f"unknown timestep spacing {spacing!r}")
    return torch.from_numpy(np.sort(ts.astype(np.int64))[::-1].copy())


# -----------------------------------------------------------------------------
# classifier-free guidance


def cfg(cond_out, uncond_out, w, channels):
    """uncond + w (cond - uncond) (Ho & Salimans 2022) on the first `channels` channels.

    Channels past them (a learned variance) are taken from the conditional prediction, as DiT does.
    w = 1 gives the conditional prediction; w may be a number or one value per sample.
    """
    w = torch.as_tensor(w, dtype=cond_out.dtype, device=cond_out.device).reshape(-1, *[1] * (cond_out.ndim - 1))
    pred = uncond_out[:, :channels] + w * (cond_out[:, :channels] - uncond_out[:, :channels])
    return torch.cat([pred, cond_out[:, channels:]], dim=1)


def guided(model, w, cond, null, channels=None):
    """The CFG denoiser: conditional and null passes batched into one call of `model`.

    w: a number, one per sample, or a function of the step's timestep (a guidance schedule, see
    WSchedule); where it gives 1 the null pass is skipped, since CFG at w = 1 is the conditional model.
    channels: how many output channels are guided (default: all of the input's; see cfg).
    """

    def denoise(x, t):
        t = torch.as_tensor(t, device=x.device).expand(x.shape[0])
        scale = w(t) if callable(w) else w
        if isinstance(scale, (int, float)) and scale == 1:
            return model(x, t, **cond)
        both = {k: torch.cat([cond[k], null[k]]) for k in cond}
        cond_out, uncond_out = model(torch.cat([x, x]), torch.cat([t, t]), **both).chunk(2)
        return cfg(cond_out, uncond_out, scale, channels or x.shape[1])

    return denoise


# -----------------------------------------------------------------------------
# guidance schedules: w from step to step


@dataclass(frozen=True)
class WSchedule:
    """How the guidance strength w - 1 varies over a run: at step i, w_i = 1 + (w - 1) f_i.

    "constant": f = 1. "interval" (Kynkaanniemi et al. 2024, "Applying guidance in a limited interval
    improves sample and distribution quality"): f = 1 where the noise level sigma_t / alpha_t lies in
    (low, high], else 0, i.e. no guidance at the highest and the lowest noise. "linear": f goes
    linearly from `start` at the first step to `end` at the last.
    """
    kind: str = "constant"
    low: float = 0.0  # interval: guided for low < sigma_t / alpha_t <= high
    high: float = math.inf
    start: float = 1.0  # linear: f at the first step and at the last
    end: float = 1.0

    def scales(self, w, scheduler, timesteps):
        """w at each of `timesteps` (Python floats, so that w = 1 can skip a pass)."""
        n = len(timesteps)
        out = []
        for i, t in enumerate(timesteps.tolist() if torch.is_tensor(timesteps) else timesteps):
            if self.kind == "constant":
                f = 1.0
            elif self.kind == "interval":
                alpha, sigma = scheduler.schedule(t)
                f = 1.0 if self.low < sigma / alpha <= self.high else 0.0
            elif self.kind == "linear":
                f = self.start + (self.end - self.start) * (i / (n - 1) if n > 1 else 0.0)
            else:
                raise ValueError(f"unknown guidance schedule {self.kind!r} (constant, interval, linear)")
            out.append(1.0 + (w - 1.0) * f)
        return out

    def at(self, w, scheduler, timesteps):
        """w as a function of the step's timestep (B,), for guided() and the adapters."""
        ts = timesteps.tolist() if torch.is_tensor(timesteps) else list(timesteps)
        table = dict(zip(ts, self.scales(w, scheduler, ts)))
        return lambda t: table[t.reshape(-1)[0].item() if torch.is_tensor(t) else t]

    @classmethod
    def parse(cls, spec):
        """"constant", "interval:LOW:HIGH" (noise levels sigma_t / alpha_t) or "linear:START:END"."""
        kind, *values = spec.split(":")
        try:
            numbers = [float(v) for v in values]
        except ValueError:
            numbers = None
        shapes = {"constant": 0, "interval": 2, "linear": 2}
        if kind not in shapes or numbers is None or len(numbers) != shapes[kind]:
            raise ValueError(f"guidance schedule {spec!r}: expected constant, interval:LOW:HIGH or linear:START:END")
        if kind == "interval":
            if not 0 <= numbers[0] < numbers[1]:
                raise ValueError(f"guidance schedule {spec!r}: need 0 <= LOW < HIGH")
            return cls(kind, low=numbers[0], high=numbers[1])
        return cls(kind, start=numbers[0], end=numbers[1]) if kind == "linear" else cls()


# -----------------------------------------------------------------------------
# single steps: x at (alpha, sigma) = `now` -> x at `nxt`; (1, 0) is the clean sample


def predict_x0_eps(prediction, x, alpha, sigma, prediction_type):
    """(x_0, epsilon) from the model's prediction at x = alpha x_0 + sigma eps.

    epsilon (DDPM); v = alpha eps - sigma x_0 (Salimans & Ho 2022); "flow": the velocity
    eps - x_0 of flow matching (Lipman et al. 2023; SD3), where alpha = 1 - sigma.
    alpha and sigma are numbers, or tensors that broadcast against x.
    """
    if prediction_type == "epsilon":
        eps = prediction
        x0 = (x - sigma * eps) / alpha
    elif prediction_type == "v_prediction":
        x0 = alpha * x - sigma * prediction
        eps = alpha * prediction + sigma * x
    elif prediction_type == "flow":
        x0 = x - sigma * prediction
        eps = x + alpha * prediction
    else:
        raise ValueError(f"unknown prediction type {prediction_type!r}")
    return x0, eps


def ddpm_step(out, x, now, nxt, noise=None, prediction_type="epsilon", clip_sample=None):
    """Ancestral step of p(x_{t_prev} | x_t) (Ho et al. 2020, eq. 7) over a respaced chain.

    With 2C output channels the last C interpolate the log-variance between the posterior's
    and beta's (improved DDPM, Nichol & Dhariwal 2021, eq. 15), as DiT predicts it.
    """
    C = x.shape[1]
    abar_t, abar_prev = now[0] ** 2, nxt[0] ** 2
    beta = 1 - abar_t / abar_prev  # the respaced chain's beta_t
    x0, _ = predict_x0_eps(out[:, :C], x, *now, prediction_type)
    if clip_sample is not None:  # pixel-space models: x_0 lies in [-1, 1]
        x0 = x0.clamp(-clip_sample, clip_sample)
    mean = (math.sqrt(abar_prev) * beta / (1 - abar_t)) * x0 + \
        (math.sqrt(1 - beta) * (1 - abar_prev) / (1 - abar_t)) * x  # posterior mean, eq. 7
    if nxt[1] == 0 or noise is None:
        return mean
    posterior_var = max((1 - abar_prev) / (1 - abar_t) * beta, 1e-20)
    if out.shape[1] == 2 * C:
        frac = (out[:, C:] + 1) / 2  # the model's v in [-1, 1]
        log_var = frac * math.log(beta) + (1 - frac) * math.log(posterior_var)
    else:
        log_var = torch.full_like(mean, math.log(posterior_var))
    return mean + torch.exp(0.5 * log_var) * noise


def ddim_step(out, x, now, nxt, noise=None, eta=0.0, prediction_type="epsilon", clip_sample=None):
    """DDIM step (Song et al. 2021, eq. 12); eta = 0 is deterministic. Learned variance is ignored.

    In flow matching's (alpha, sigma) = (1 - s, s), deterministic DDIM is the Euler step of the flow
    x + (s_next - s) v, which is what FlowMatchEulerDiscreteScheduler takes.
    """
    C = x.shape[1]
    (alpha, sigma), (alpha_next, sigma_next) = now, nxt
    x0, eps = predict_x0_eps(out[:, :C], x, alpha, sigma, prediction_type)
    if clip_sample is not None:  # pixel-space models; epsilon is kept unclipped, as in diffusers
        x0 = x0.clamp(-clip_sample, clip_sample)
    # the added noise's scale (eq. 16): eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev)
    s = eta * (sigma_next / sigma) * math.sqrt(max(1 - (alpha / alpha_next) ** 2, 0.0)) if eta else 0.0
    x_next = alpha_next * x0 + math.sqrt(sigma_next**2 - s**2) * eps
    if s > 0 and noise is not None:
        x_next = x_next + s * noise
    return x_next


def euler_step(out, x, now, nxt, noise=None, prediction_type="epsilon"):
    """Euler step of the probability-flow ODE dx/dsigma = eps (Karras et al. 2022, Algorithm 1 less Heun's term).

    Its variable is x = x_t / alpha_t = x_0 + sigma eps, at sigma = sigma_t / alpha_t: diffusers'
    EulerDiscreteScheduler keeps its samples in that space, and its scale_model_input hands the
    model exactly our x_t. Deterministic DDIM is the same step (Song et al. 2021, eq. 14).
    """
    C = x.shape[1]
    (alpha, sigma), (alpha_next, sigma_next) = now, nxt
    _, eps = predict_x0_eps(out[:, :C], x, alpha, sigma, prediction_type)
    x_sigma = x / alpha  # into Karras et al.'s space: x_t * sqrt(1 + sigma^2)
    x_sigma = x_sigma + (sigma_next / alpha_next - sigma / alpha) * eps
    return x_sigma * alpha_next  # and back: x / sqrt(1 + sigma_next^2)


SAMPLERS = {"ddpm": ddpm_step, "ddim": ddim_step, "euler": euler_step}


# -----------------------------------------------------------------------------
# a scheduler: schedule, step and options together; the sampling loop


@dataclass
class Scheduler:
    """A diffusers scheduler config as the loop takes it:

        s = scheduler_from_config("stabilityai/stable-diffusion-2-1")
        x0 = sample(denoise, x, s, s.timesteps(50))

    It samples as diffusers runs the config at SD's and SDXL's "leading" spacing. At the others
    diffusers differs: its DDIM and DDPM step to t - T // steps rather than to the next timestep
    visited (the same under "trailing" only when the steps divide T), and its Euler visits unrounded
    "linspace" timesteps and starts from sqrt(1 - abar_T) x_T rather than x_T.
    """

    schedule: VPSchedule  # t -> (alpha_t, sigma_t)
    step_fn: callable  # ddim_step, euler_step or ddpm_step
    options: dict = field(default_factory=dict)  # the step's: prediction_type, clip_sample, eta
    timestep_spacing: str = "leading"  # "leading", "trailing", "linspace" (Lin et al. 2023, Table 2) or "iddpm"
    steps_offset: int = 0  # added to "leading" timesteps: SD's 1 puts the last step at t = 1
    final: tuple = (1.0, 0.0)  # (alpha, sigma) after the last step: the clean sample, or SD DDIM's abar_0

    @property
    def name(self):
        return self.step_fn.__name__.removesuffix("_step")

    @property
    def alphas_cumprod(self):
        return self.schedule.alphas_cumprod

    @property
    def stochastic(self):
        """Whether a step draws noise: DDPM, and DDIM with eta > 0."""
        return self.step_fn is ddpm_step or self.options.get("eta", 0) > 0

    def timesteps(self, num_steps):
        """The descending timesteps of a num_steps run, as the scheduler's set_timesteps chooses them."""
        return spaced_timesteps(num_steps, self.schedule.num_train_timesteps, self.timestep_spacing,
                                self.steps_offset)

    def step(self, out, x, t, t_next, noise=None):
        """From x at timestep t to timestep t_next (None: past the last step)."""
        nxt = self.final if t_next is None else self.schedule(t_next)
        return self.step_fn(out, x, self.schedule(t), nxt, noise=noise, **self.options)


def sample(denoise, x, scheduler, timesteps, generator=None, callback=None, progress=False):
    """Run the scheduler's sampler from noise x at timesteps[0] down to the clean sample.

    `callback`, if given, sees each step as a dict(i=, t=, x=, out=) before it is taken: the
    trajectory AGD trains on (x_t, t, the denoiser's output). The callback keeps what it wants.
    """
    ts = [t.item() if torch.is_tensor(t) else t for t in timesteps]
    for i, t in enumerate(tqdm(ts, disable=not progress, desc="sampling", leave=False)):
        t_next = ts[i + 1] if i + 1 < len(ts) else None
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long if isinstance(t, int) else torch.float32)
        out = denoise(x, tt)
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "out": out})
        noise = None
        if t_next is not None and scheduler.stochastic:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x = scheduler.step(out, x, t, t_next, noise=noise)
    return x


# -----------------------------------------------------------------------------
# diffusers' scheduler configs: what a repo's scheduler/scheduler_config.json asks of the loop

SCHEDULER_STEPS = {"DDIMScheduler": ddim_step, "EulerDiscreteScheduler": euler_step, "DDPMScheduler": ddpm_step}
SCHEDULES = {"linear": linear_schedule, "scaled_linear": scaled_linear_schedule}
# diffusers' defaults for the keys a config leaves out; Euler's spacing is the one default that differs
SCHEDULER_DEFAULTS = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                          trained_betas=None, prediction_type="epsilon", timestep_spacing="leading", steps_offset=0,
                          clip_sample=True, clip_sample_range=1.0, set_alpha_to_one=True, variance_type="fixed_small")
CLASS_DEFAULTS = {"EulerDiscreteScheduler": dict(timestep_spacing="linspace")}
# options that would change the sampler, and the one value implemented here (SD and SDXL use these)
SCHEDULER_FIXED = dict(thresholding=False, rescale_betas_zero_snr=False, use_karras_sigmas=False,
                       use_exponential_sigmas=False, use_beta_sigmas=False, interpolation_type="linear",
                       final_sigmas_type="zero", timestep_type="discrete")


def scheduler_from_config(config):
    """The Scheduler of a diffusers scheduler config: a dict, or a pipeline folder or hub id holding one.

    Another of the classes above samples with the same schedule as diffusers' `from_config` swap does:
    scheduler_from_config({**read_scheduler_config(root), "_class_name": "EulerDiscreteScheduler"}).
    "timestep_spacing": "iddpm" (ours) respaces as DiT samples.
    """
    if not isinstance(config, dict):
        file = scheduler_config_file(config)
        config = read_scheduler_config(file)
        try:
            return scheduler_from_config(config)
        except ValueError as e:  # an option not implemented here: name the file
            raise checkpoint.CheckpointError(f"{file}: {e}") from None
    name = config.get("_class_name")
    if name not in SCHEDULER_STEPS:
        raise ValueError(f"_class_name {name!r}: no sampler here follows it (set it to one of "
                         f"{', '.join(SCHEDULER_STEPS)})")
    c = {**SCHEDULER_DEFAULTS, **CLASS_DEFAULTS.get(name, {}), **config}
    for key, value in SCHEDULER_FIXED.items():
        if c.get(key) not in (None, value):  # absent, or null as diffusers' own files sometimes say
            raise ValueError(f"{key}={c[key]!r} is not supported (only {key}={value!r})")
    if c["prediction_type"] not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type {c['prediction_type']!r} is not supported ('epsilon' or 'v_prediction')")

    if c["trained_betas"] is not None:
        alphas_cumprod = torch.cumprod(1 - torch.tensor(c["trained_betas"], dtype=torch.float64), dim=0)
    elif c["beta_schedule"] in SCHEDULES:
        alphas_cumprod = SCHEDULES[c["beta_schedule"]](c["num_train_timesteps"], c["beta_start"], c["beta_end"])
    else:
        raise ValueError(f"beta_schedule {c['beta_schedule']!r} is not supported ({' or '.join(SCHEDULES)})")
    schedule = VPSchedule(alphas_cumprod)

    step, options, final = SCHEDULER_STEPS[name], dict(prediction_type=c["prediction_type"]), (1.0, 0.0)
    clip_sample = c["clip_sample_range"] if c["clip_sample"] else None
    if step is ddim_step:
        options.update(clip_sample=clip_sample)
        final = (1.0, 0.0) if c["set_alpha_to_one"] else schedule(0)
    elif step is ddpm_step:
        if c["variance_type"] not in ("fixed_small", "learned_range"):
            raise ValueError(f"variance_type {c['variance_type']!r} is not supported ('fixed_small' or "
                             "'learned_range', which ddpm_step reads off the model's channels)")
        options.update(clip_sample=clip_sample)
    return Scheduler(schedule, step, options, c["timestep_spacing"], c["steps_offset"], final)


def scheduler_config_file(path_or_repo_id):
    """scheduler/scheduler_config.json of a pipeline: a local folder in the hub layout, or a hub id."""
    path = Path(path_or_repo_id).expanduser()
    if path.exists():
        for file in (path, path / "scheduler" / "scheduler_config.json", path / "scheduler_config.json"):
            if file.is_file():
                return file
        raise checkpoint.CheckpointError(f"{path}: no scheduler/scheduler_config.json (expected a pipeline folder "
                                         "in the hub layout)")
    if str(path_or_repo_id).startswith((".", "/", "~")) or str(path_or_repo_id).count("/") != 1:
        raise checkpoint.CheckpointError(f"{path_or_repo_id}: no such folder (and not a hub id 'owner/name')")
    from huggingface_hub import hf_hub_download  # only needed for hub ids

    try:
        return Path(hf_hub_download(str(path_or_repo_id), "scheduler/scheduler_config.json"))
    except Exception as e:  # network, auth, unknown repo: all one line for the user
        raise checkpoint.CheckpointError(f"{path_or_repo_id}: could not download scheduler/scheduler_config.json "
                                         f"from the hub ({type(e).__name__})") from e


def read_scheduler_config(path_or_repo_id):
    """A pipeline's scheduler config as a dict (see scheduler_config_file)."""
    file = scheduler_config_file(path_or_repo_id)
    try:
        return json.loads(file.read_text())
    except ValueError as e:
        raise checkpoint.CheckpointError(f"{file}: not valid JSON ({e})") from None
