"""SD 2.1 and SDXL from prompt to latents: scheduler configs, Euler and DDIM steps, and the whole loop.

- scheduler_from_config reads the official scheduler_config.json files as diffusers reads them
  (schedule, timesteps, prediction, final alpha), and diffusers' defaults where a file is silent;
- euler_step and ddim_step with SD's final alpha equal diffusers' steps, one by one;
- PromptEncoder, unet.from_pretrained, scheduler_from_config and guidance.sample with CFG equal
  StableDiffusionPipeline (DDIM; epsilon and v) and StableDiffusionXLPipeline (Euler; DDIM) on tiny
  random pipelines saved to disk, from the same latents, to 1e-4; and what the callback sees at every
  step is what the pipeline's UNet was given, and the guided prediction it made of the output.
"""

import json
import shutil

import pytest
import torch

import checkpoint
import guidance
import prompts
import unet

diffusers = pytest.importorskip("diffusers")
from tiny_pipelines import SD21_SCHEDULER, SDXL_SCHEDULER  # noqa: E402  (imports diffusers)
from util import max_rel_err  # noqa: E402


# -----------------------------------------------------------------------------
# scheduler configs


@pytest.mark.parametrize("config, reference, step", [
    (SD21_SCHEDULER, diffusers.DDIMScheduler, guidance.ddim_step),
    (SDXL_SCHEDULER, diffusers.EulerDiscreteScheduler, guidance.euler_step),
], ids=["sd2.1", "sdxl"])
def test_official_scheduler_configs_read_as_diffusers_reads_them(config, reference, step):
    ref = reference.from_config(config)
    s = guidance.scheduler_from_config(config)
    assert s.step_fn is step
    assert torch.allclose(s.alphas_cumprod.float(), ref.alphas_cumprod, rtol=1e-6)
    for n in (1, 4, 7, 25, 50, 1000):
        ref.set_timesteps(n)
        assert torch.equal(s.timesteps(n).to(ref.timesteps.dtype), ref.timesteps), n
    if step is guidance.ddim_step:  # SD 2.1: v-prediction, no clipping, the last step stops at abar_0
        assert ref.final_alpha_cumprod < 1
        assert s.options == dict(prediction_type="v_prediction", clip_sample=None)
        assert s.final[0] ** 2 == pytest.approx(ref.final_alpha_cumprod.item(), rel=1e-6)  # (alpha, sigma) of abar_0
    else:
        assert s.options == dict(prediction_type="epsilon") and s.final == (1.0, 0.0)


@pytest.mark.parametrize("name", ["DDIMScheduler", "EulerDiscreteScheduler", "DDPMScheduler"])
def test_keys_a_config_leaves_out_take_diffusers_defaults(name):
    """Each class's own: Euler spaces its steps "linspace", DDIM and DDPM "leading" and clip x_0 to [-1, 1]."""
    ref = getattr(diffusers, name)()
    s = guidance.scheduler_from_config({"_class_name": name})
    assert (s.timestep_spacing, s.steps_offset) == (ref.config.timestep_spacing, ref.config.steps_offset)
    assert torch.allclose(s.alphas_cumprod.float(), ref.alphas_cumprod, rtol=1e-6)
    assert s.options["prediction_type"] == ref.config.prediction_type
    if name != "EulerDiscreteScheduler":
        assert s.options["clip_sample"] == ref.config.clip_sample_range
    if name == "DDIMScheduler":
        assert s.final[0] ** 2 == ref.final_alpha_cumprod == 1


def test_trained_betas_give_the_schedule():
    betas = torch.linspace(1e-3, 0.05, 100, dtype=torch.float64).tolist()
    ref = diffusers.DDIMScheduler(num_train_timesteps=100, trained_betas=betas)
    s = guidance.scheduler_from_config({"_class_name": "DDIMScheduler", "num_train_timesteps": 100,
                                        "trained_betas": betas})
    assert len(s.alphas_cumprod) == 100
    assert torch.allclose(s.alphas_cumprod.float(), ref.alphas_cumprod, rtol=1e-6)


def test_a_pipeline_folder_and_its_scheduler_file_read_alike(tmp_path):
    (tmp_path / "scheduler").mkdir()
    file = tmp_path / "scheduler" / "scheduler_config.json"
    file.write_text(json.dumps(SD21_SCHEDULER))
    for where in (tmp_path, tmp_path / "scheduler", file):
        s = guidance.scheduler_from_config(where)
        assert s.step_fn is guidance.ddim_step and s.options["prediction_type"] == "v_prediction"
        assert torch.equal(s.timesteps(4), torch.tensor([751, 501, 251, 1]))
    assert guidance.read_scheduler_config(tmp_path) == SD21_SCHEDULER


@pytest.mark.parametrize("changes, message", [
    ({"use_karras_sigmas": True}, "use_karras_sigmas=True is not supported"),
    ({"thresholding": True}, "thresholding=True is not supported"),
    ({"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr=True is not supported"),
    ({"interpolation_type": "log_linear"}, "interpolation_type='log_linear' is not supported"),
    ({"prediction_type": "sample"}, "prediction_type 'sample' is not supported"),
    ({"beta_schedule": "squaredcos_cap_v2"}, "beta_schedule 'squaredcos_cap_v2' is not supported"),
    ({"_class_name": "PNDMScheduler"}, "_class_name 'PNDMScheduler': no sampler here follows it"),
    ({"_class_name": "DDPMScheduler", "variance_type": "fixed_large"}, "variance_type 'fixed_large'"),
])
def test_unsupported_scheduler_options_name_the_file_and_option(tmp_path, changes, message):
    (tmp_path / "scheduler").mkdir()
    file = tmp_path / "scheduler" / "scheduler_config.json"
    file.write_text(json.dumps({**SDXL_SCHEDULER, **changes}))
    with pytest.raises(checkpoint.CheckpointError, match=message) as e:
        guidance.scheduler_from_config(tmp_path)
    assert str(file) in str(e.value) and "\n" not in str(e.value)


def test_scheduler_config_file_errors(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="no scheduler/scheduler_config.json"):
        guidance.scheduler_from_config(tmp_path)
    (tmp_path / "scheduler_config.json").write_text("{not json")
    with pytest.raises(checkpoint.CheckpointError, match="scheduler_config.json: not valid JSON"):
        guidance.scheduler_from_config(tmp_path)
    with pytest.raises(checkpoint.CheckpointError, match="no such folder"):
        guidance.scheduler_from_config(tmp_path / "missing")
    # null is how diffusers' files say "the default"
    assert guidance.scheduler_from_config({**SDXL_SCHEDULER, "use_karras_sigmas": None}).step_fn is guidance.euler_step


# -----------------------------------------------------------------------------
# single steps against diffusers


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing, steps", [("leading", 7), ("trailing", 7), ("linspace", 10)])
def test_euler_steps_match_diffusers(prediction_type, spacing, steps):
    """Every step, diffusers' sigma-space sample mapped to ours: x_t = x_sigma / sqrt(1 + sigma^2).

    That x_t is also what diffusers' scale_model_input gives the model; and the step is deterministic DDIM.
    """
    config = {**SDXL_SCHEDULER, "timestep_spacing": spacing, "prediction_type": prediction_type}
    ref = diffusers.EulerDiscreteScheduler.from_config(config)
    ref.set_timesteps(steps)
    s = guidance.scheduler_from_config(config)
    timesteps = s.timesteps(steps)
    assert torch.equal(timesteps.float(), ref.timesteps)  # these spacings: whole timesteps in diffusers too
    g = torch.Generator().manual_seed(0)
    for i, t in enumerate(timesteps.tolist()):
        x, out = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
        sigma, sigma_prev = ref.sigmas[i], ref.sigmas[i + 1]
        x_sigma = x * (sigma**2 + 1) ** 0.5
        assert max_rel_err(ref.scale_model_input(x_sigma, ref.timesteps[i]), x) < 1e-6
        expected = ref.step(out, ref.timesteps[i], x_sigma).prev_sample / (sigma_prev**2 + 1) ** 0.5
        t_prev = timesteps[i + 1].item() if i + 1 < len(timesteps) else None
        ours = s.step(out, x, t, t_prev)
        assert max_rel_err(ours, expected) < 1e-5, t
        ddim = guidance.ddim_step(out, x, s.schedule(t), s.schedule(t_prev) if t_prev is not None else (1.0, 0.0),
                                  prediction_type=prediction_type)
        assert max_rel_err(ours, ddim) < 1e-5, t


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("clip_sample", [False, True])
def test_ddim_steps_with_sds_final_alpha_match_diffusers(prediction_type, clip_sample):
    """set_alpha_to_one=False: the last step goes to abar_0, not to the clean sample."""
    config = {**SD21_SCHEDULER, "prediction_type": prediction_type, "clip_sample": clip_sample}
    ref = diffusers.DDIMScheduler.from_config(config)
    ref.set_timesteps(10)
    s = guidance.scheduler_from_config(config)
    timesteps = s.timesteps(10)
    assert torch.equal(timesteps, ref.timesteps)
    g = torch.Generator().manual_seed(0)
    for i, t in enumerate(timesteps.tolist()):
        x, out = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
        expected = ref.step(out, t, x).prev_sample
        t_prev = timesteps[i + 1].item() if i + 1 < len(timesteps) else None
        assert max_rel_err(s.step(out, x, t, t_prev), expected) < 1e-5, t
    # the default (stop at the clean sample) would not have matched that last step
    assert max_rel_err(guidance.ddim_step(out, x, s.schedule(t), (1.0, 0.0), **s.options), expected) > 1e-3


# -----------------------------------------------------------------------------
# prompt to latents: the whole loop against the diffusers pipelines

SIDE = 16  # pixels: the tiny pipelines' 8 x 8 latents (their autoencoders downsample 2x)
STEPS = 5
PROMPTS = ["a photograph of an astronaut riding a horse", "a red cube on a blue sphere"]


@pytest.fixture(scope="module")
def pipelines(sd21_root, sdxl_root):
    """The tiny SD 2.1 and SDXL pipelines (with the hub repos' scheduler configs verbatim)."""
    return {"sd2.1": sd21_root, "sdxl": sdxl_root}


def with_scheduler(root, dest, **changes):
    """A copy of the pipeline at root, its scheduler config changed (and model_index.json, for a new class)."""
    shutil.copytree(root, dest)
    file = dest / "scheduler" / "scheduler_config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), **changes}))
    if "_class_name" in changes:  # the pipelines pick the scheduler's class from model_index.json
        index = json.loads((dest / "model_index.json").read_text())
        index["scheduler"] = ["diffusers", changes["_class_name"]]
        (dest / "model_index.json").write_text(json.dumps(index))
    return dest


@torch.no_grad()
def diffusers_latents(root, latents, w, xl):
    """The pipeline's latents, and (x, t, context, added_cond_kwargs, output) of each of its UNet calls."""
    pipeline = diffusers.StableDiffusionXLPipeline if xl else diffusers.StableDiffusionPipeline
    pipe = pipeline.from_pretrained(root)
    pipe.set_progress_bar_config(disable=True)
    calls = []
    pipe.unet.register_forward_hook(lambda module, args, kwargs, out: calls.append(
        (args[0], args[1], kwargs["encoder_hidden_states"], kwargs.get("added_cond_kwargs"), out[0])),
        with_kwargs=True)
    out = pipe(PROMPTS, height=SIDE, width=SIDE, num_inference_steps=STEPS, guidance_scale=w,
               latents=latents.clone(), output_type="latent").images
    return out, calls


@torch.no_grad()
def our_latents(root, latents, w, seen):
    """Prompt to latents with this library: the composition sample.py and train_agd.py make for SD.

    Our loop runs in the VP space x_t; diffusers' DDIM starts from the given latents as they are, and
    its Euler ("leading") from latents * sqrt(1 + sigma_max^2) in sigma space, which is x_t = latents too.
    """
    pe = prompts.PromptEncoder.from_pretrained(root)
    model = unet.from_pretrained(root)
    s = guidance.scheduler_from_config(root)
    cond, null = pe(PROMPTS, height=SIDE, width=SIDE), pe.null(len(PROMPTS), height=SIDE, width=SIDE)
    # w = 1 is the conditional model, one pass, as the pipelines run it
    denoise = guidance.guided(model, w, cond, null) if w != 1 else (lambda x, t: model(x, t, **cond))
    x = guidance.sample(denoise, latents, s, s.timesteps(STEPS),
                        callback=lambda step: seen.append((step["x"], step["t"], step["out"])))
    return x, cond, null


CASES = [  # pipeline, scheduler config changes, guidance scale
    ("sd2.1", {}, 7.5),  # as the hub configures SD 2.1: DDIM, v-prediction, last step to abar_0
    ("sd2.1", {}, 1.0),
    ("sd2.1", {"prediction_type": "epsilon"}, 7.5),  # SD 2.1-base's prediction
    ("sdxl", {}, 7.5),  # as the hub configures SDXL: Euler, epsilon
    ("sdxl", {}, 1.0),
    ("sdxl", {"prediction_type": "v_prediction"}, 7.5),
    ("sdxl", {"_class_name": "DDIMScheduler"}, 7.5),  # DDIMScheduler.from_config(SDXL's config): to abar_0
]


@pytest.mark.parametrize("name, changes, w", CASES,
                         ids=[f"{n}-{'-'.join(map(str, c.values())) or 'hub'}-w{w}" for n, c, w in CASES])
def test_prompt_to_latents_matches_diffusers(pipelines, tmp_path, name, changes, w):
    root = with_scheduler(pipelines[name], tmp_path / name, **changes) if changes else pipelines[name]
    xl = name == "sdxl"
    latents = torch.randn(len(PROMPTS), 4, SIDE // 2, SIDE // 2, generator=torch.Generator().manual_seed(0))
    expected, calls = diffusers_latents(root, latents, w, xl)
    seen = []
    ours, cond, null = our_latents(root, latents, w, seen)
    assert ours.shape == expected.shape == latents.shape
    assert max_rel_err(ours, expected) < 1e-4
    assert max_rel_err(expected, latents) > 0.1  # the sampler moved the latents: the comparison could fail

    # the trajectory: at every step, the callback sees the UNet's input and the guided prediction it gave
    assert len(calls) == len(seen) == STEPS
    n = len(PROMPTS)
    for (x_ref, t_ref, context, added, out), (x, t, target) in zip(calls, seen):
        assert int(t_ref) == t
        assert max_rel_err(x, x_ref[-n:]) < 1e-4
        if w == 1:
            guided_ref, both = out, cond
        else:  # the pipelines batch [null, cond]; our guided batches [cond, null]
            uncond, text = out.chunk(2)
            guided_ref = uncond + w * (text - uncond)
            assert max_rel_err(guided_ref, text) > 1e-2  # guidance changes the prediction: its errors would show
            both = {k: torch.cat([null[k], cond[k]]) for k in cond}
        assert max_rel_err(target, guided_ref) < 1e-4
        # the prompt encodings: the same condition as the pipeline's, null included
        assert max_rel_err(both["context"], context) < 1e-5
        if xl:
            assert max_rel_err(both["text_embeds"], added["text_embeds"]) < 1e-5
            assert torch.equal(both["time_ids"], added["time_ids"])
