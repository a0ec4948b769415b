"""sample.py for Stable Diffusion 2.1 and XL, on the tiny random pipelines of tiny_pipelines.py:

- the whole path (load, encode, sample, decode) from --seed equals StableDiffusion(XL)Pipeline from the
  same seed, images and latents to 1e-4, with several prompts, several images each and a negative prompt;
- the CLI writes them as one grid, in order, and prints the seconds per step;
- adapters: a fresh file gives exactly the conditional model's images, in one UNet pass per step;
  adapters saved on a base load onto a fine-tune of it and sample there (plug-and-play);
- bad input (adapters of another model, a missing file, a size the autoencoder cannot make) is one line.
"""

import dataclasses
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import adapters
import checkpoint
import dit
import families
import guidance
import sample
import prompts
import unet
import vae

diffusers = pytest.importorskip("diffusers")
from safetensors.torch import load_file, save_file  # noqa: E402
from util import max_rel_err  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SIDE = 16  # pixels: the tiny pipelines' native size (8 x 8 latents; their autoencoders downsample 2x)
FACTOR = 2
STEPS = 3
PROMPTS = ["a photograph of an astronaut riding a horse", "a red cube on a blue sphere"]


@pytest.fixture(scope="module")
def pipelines(sd21_root, sdxl_root):
    return {"sd21": sd21_root, "sdxl": sdxl_root}


def parse(name, root, *argv):
    """sample.py's arguments for the tiny pipeline `name` at root, on the CPU."""
    return sample.parse_args(["--model", name, "--weights", str(root), "--steps", str(STEPS), "--device", "cpu",
                              *argv])


@torch.no_grad()
def load(name, root, height=SIDE, width=SIDE):
    """What sample_latents takes, loaded from the pipeline at root: UNet, prompt encoder, scheduler."""
    return families.load(name, root, height=height, width=width)


def cells(grid, n, height, width):
    """The n images of a grid of COLUMNS columns, (n, height, width, 3)."""
    return np.stack([grid[r * height:(r + 1) * height, c * width:(c + 1) * width]
                     for r, c in (divmod(i, sample.COLUMNS) for i in range(n))])


def as_bytes(images):
    """Images (B, 3, H, W) in [0, 1] as save_grid stores them: (B, H, W, 3) uint8."""
    return (images * 255).round().byte().permute(0, 2, 3, 1).numpy()


# -----------------------------------------------------------------------------
# the whole path against the diffusers pipelines


@torch.no_grad()
def pipeline_output(name, root, w, negative_prompt, num_images, height, width, seed):
    """The pipeline's images (B, 3, H, W) in [0, 1] and its final latents, from the noise of `seed`."""
    pipeline = diffusers.StableDiffusionXLPipeline if name == "sdxl" else diffusers.StableDiffusionPipeline
    pipe = pipeline.from_pretrained(root)
    pipe.set_progress_bar_config(disable=True)
    final = {}

    def keep_latents(pipe, i, t, kwargs):  # after the last step: the clean latents (Euler's sigma is 0 there)
        final["latents"] = kwargs["latents"]
        return kwargs

    negative_prompt = negative_prompt and [negative_prompt] * len(PROMPTS)  # one each, as the pipelines take it
    images = pipe(PROMPTS, negative_prompt=negative_prompt, num_images_per_prompt=num_images, height=height,
                  width=width, num_inference_steps=STEPS, guidance_scale=w,
                  generator=torch.Generator().manual_seed(seed), output_type="pt",
                  callback_on_step_end=keep_latents).images
    return images, final["latents"]


CASES = [  # pipeline, CFG scale, negative prompt
    ("sd21", 7.5, None),  # DDIM, v-prediction: the null condition is the empty prompt
    ("sd21", 7.5, "blurry, low quality"),
    ("sdxl", 5.0, None),  # Euler, epsilon: the null condition is zeros
    ("sdxl", 5.0, "blurry, low quality"),
]


@pytest.mark.parametrize("name, w, negative_prompt", CASES, ids=[f"{n}-w{w}-{'negative' if neg else 'null'}"
                                                                   for n, w, neg in CASES])
def test_seed_to_images_matches_the_pipeline(pipelines, name, w, negative_prompt):
    """Same seed, prompts, size, steps and scale: the same latents and images; 16 x 24 px, so a mix-up shows."""
    root, height, width, num_images, seed = pipelines[name], SIDE, 24, 2, 3
    expected_images, expected_latents = pipeline_output(name, root, w, negative_prompt, num_images, height, width,
                                                        seed)
    argv = [a for p in PROMPTS for a in ("--prompt", p)]
    argv += ["--num-images", str(num_images), "--height", str(height), "--width", str(width), "--cfg", str(w),
             "--seed", str(seed)] + (["--negative-prompt", negative_prompt] if negative_prompt else [])
    images, _, _ = sample.generate(parse(name, root, *argv), families.FAMILIES[name])
    assert images.shape == expected_images.shape == (4, 3, height, width)
    assert ((expected_images > 0) & (expected_images < 1)).float().mean() > 0.5  # the clamp hides little
    assert (images - expected_images).abs().max() < 1e-4

    # sample_latents itself, from the pipeline's x_T
    base = load(name, root, height, width)
    batch = [p for p in PROMPTS for _ in range(num_images)]
    noise = torch.randn(4, 4, height // FACTOR, width // FACTOR, generator=torch.Generator().manual_seed(seed))
    latents = sample.sample_latents(base, batch, noise, STEPS, w, negative_prompt)
    assert max_rel_err(latents, expected_latents) < 1e-4
    assert max_rel_err(expected_latents, noise) > 0.1  # the sampler moved the latents: the comparison could fail
    unguided = sample.sample_latents(base, batch, noise, STEPS, 1.0)
    assert max_rel_err(latents, unguided) > 1e-2  # and so did guidance, against the null or negative prompt


@pytest.mark.parametrize("name, size_argv, height, width, sampler", [
    ("sd21", [], SIDE, SIDE, "ddim"),  # the UNet's native size: its sample_size, times the autoencoder's factor
    ("sdxl", ["--width", "24"], SIDE, 24, "euler"),
])
def test_the_grid_holds_the_images_in_order_and_the_time_per_step_is_printed(pipelines, tmp_path, capsys, name,
                                                                            size_argv, height, width, sampler):
    root, out = pipelines[name], tmp_path / "sub" / "grid.png"
    argv = ["--prompt", "a cat", "--prompt", "a dog", "--prompt", "a cow", "--num-images", "2", *size_argv]
    sample.main(parse(name, root, *argv, "--out", str(out)))
    printed = capsys.readouterr().out.strip()
    assert re.fullmatch(rf"\d+\.\d{{3}} s/step \({sampler}, {STEPS} steps, 6 images, CFG at w=7.5, conditional "
                        rf"and null passes batched\) -> {re.escape(str(out))}", printed), printed
    grid = np.asarray(Image.open(out))
    assert grid.shape == (2 * height, 4 * width, 3)  # 6 images in rows of 4
    images, _, _ = sample.generate(parse(name, root, *argv), families.FAMILIES[name])
    assert np.array_equal(cells(grid, 6, height, width), as_bytes(images))  # cat, cat, dog, dog, cow, cow
    assert not grid[height:, 2 * width:].any()  # past the last image: black
    first, second = cells(grid, 2, height, width)
    assert not np.array_equal(first, second)  # one prompt's two images: each from its own noise


# -----------------------------------------------------------------------------
# adapters: one pass per step, and plug-and-play onto a fine-tune


def attach(model):
    """Adapters on the tiny UNet, conditioned on w, t and the prompt tokens."""
    return adapters.attach(model, hidden_dim=8, use_timestep=True, prompt_dim=model.config.cross_attention_dim)


@pytest.mark.parametrize("name", ["sd21", "sdxl"])
def test_fresh_adapters_are_the_conditional_model_in_one_pass(pipelines, tmp_path, capsys, name):
    root, file = pipelines[name], tmp_path / "agd.safetensors"
    base = load(name, root)
    model = base.model
    attach(model).save(file)
    sample.main(parse(name, root, "--adapters", str(file), "--w", "7.5", "--out", str(tmp_path / "agd.png")))
    assert "adapters at w=7.5, one pass" in capsys.readouterr().out
    sample.main(parse(name, root, "--cfg", "1", "--out", str(tmp_path / "conditional.png")))
    assert "no guidance, one pass" in capsys.readouterr().out
    assert np.array_equal(np.asarray(Image.open(tmp_path / "agd.png")),
                          np.asarray(Image.open(tmp_path / "conditional.png")))

    # one UNet pass of the batch per step, through the adapters; CFG's pass holds the batch twice
    student = adapters.load(model, file)
    batches, adapter_calls = [], []
    model.register_forward_hook(lambda module, args, out: batches.append(len(args[0])))
    student.adapters[0].register_forward_hook(lambda module, args, out: adapter_calls.append(out))
    noise = torch.randn(2, 4, SIDE // FACTOR, SIDE // FACTOR, generator=torch.Generator().manual_seed(0))
    run = [base, PROMPTS, noise, STEPS]
    agd = sample.sample_latents(*run, student=student, w=7.5)
    assert batches == [2] * STEPS and len(adapter_calls) == STEPS
    assert all(not out.any() for out in adapter_calls)  # fresh: the adapters add zeros
    assert torch.equal(agd, sample.sample_latents(*run, cfg_scale=1.0))
    batches.clear()
    sample.sample_latents(*run, cfg_scale=7.5)
    assert batches == [4] * STEPS


def fine_tune(root, dest):
    """A copy of the pipeline at root whose UNet weights have moved, as a fine-tune's have; same config."""
    shutil.copytree(root, dest)
    file = dest / "unet" / "diffusion_pytorch_model.safetensors"
    g = torch.Generator().manual_seed(1)
    tensors = {k: v + 0.05 * v.std() * torch.randn(v.shape, generator=g) if v.numel() > 1 else v
               for k, v in load_file(file).items()}
    save_file(tensors, file, metadata={"format": "pt"})
    return dest


@pytest.mark.parametrize("name", ["sd21", "sdxl"])
def test_adapters_of_the_base_sample_with_a_fine_tune(pipelines, tmp_path, capsys, name):
    root, file = pipelines[name], tmp_path / "agd.safetensors"
    tuned_root = fine_tune(root, tmp_path / "fine-tune")
    base = load(name, root)
    student = attach(base.model)
    with torch.no_grad():  # as if trained: they change the output
        for p in student.adapters.parameters():
            p.normal_(0, 0.5)
    student.save(file)
    out = tmp_path / "agd.png"
    sample.main(parse(name, tuned_root, "--prompt", PROMPTS[0], "--adapters", str(file), "--w", "3",
                      "--out", str(out)))
    assert "adapters at w=3, one pass" in capsys.readouterr().out

    tuned = dataclasses.replace(base, model=unet.from_pretrained(tuned_root))  # the base's encoder and scheduler
    noise = torch.randn(1, 4, SIDE // FACTOR, SIDE // FACTOR, generator=torch.Generator().manual_seed(0))
    run = [PROMPTS[:1], noise, STEPS]
    z = sample.sample_latents(tuned, *run, student=adapters.load(tuned.model, file), w=3.0)
    with torch.no_grad():
        images = (vae.from_pretrained(tuned_root).decode(z) / 2 + 0.5).clamp(0, 1)
    assert np.array_equal(np.asarray(Image.open(out))[None], as_bytes(images))
    # the fine-tune's weights and the adapters both count: neither could have been left out unseen
    assert max_rel_err(z, sample.sample_latents(base, *run, student=adapters.load(base.model, file), w=3.0)) > 1e-3
    assert max_rel_err(z, sample.sample_latents(tuned, *run, cfg_scale=1.0)) > 1e-3


# -----------------------------------------------------------------------------
# bad input: one line, naming what is wrong


def dit_adapters(file):
    adapters.attach(dit.DiT(dit.DiT_models["tiny-mnist"]()), hidden_dim=8).save(file)


def sdxl_adapters(file, pipelines):
    attach(unet.from_pretrained(pipelines["sdxl"])).save(file)


@pytest.mark.parametrize("argv, message", [
    (["--adapters", "SDXL"], r"sdxl\.safetensors: missing key down_blocks\.0\.attentions\.0\.transformer_blocks\.0"
                             r"\.attn2\.condition\."),
    (["--adapters", "DIT"], r"dit\.safetensors: these adapters do not fit .*sd21 \(adapters for a DiT, not a UNet\)"),
    (["--adapters", "no/such/agd.safetensors"], r"agd\.safetensors: not in the hub cache .* no such local file either$"),
    (["--adapters", "UNET"], "diffusion_pytorch_model.safetensors: not an adapters file"),
    (["--height", "15"], "--height 15: not a multiple of 2, the autoencoder's downsampling factor"),
    (["--height", "16", "--width", "9"], "--width 9: not a multiple of 2"),
])
def test_bad_input_is_one_line(pipelines, tmp_path, argv, message):
    files = {"SDXL": tmp_path / "sdxl.safetensors", "DIT": tmp_path / "dit.safetensors",
             "UNET": pipelines["sd21"] / "unet" / "diffusion_pytorch_model.safetensors"}
    if "SDXL" in argv:  # adapters of another UNet config
        sdxl_adapters(files["SDXL"], pipelines)
    if "DIT" in argv:  # adapters of another kind of model
        dit_adapters(files["DIT"])
    argv = [str(files.get(a, a)) for a in argv]
    with pytest.raises((sample.InputError, checkpoint.CheckpointError), match=message) as e:
        sample.main(parse("sd21", pipelines["sd21"], *argv, "--out", str(tmp_path / "x.png")))
    assert "\n" not in str(e.value)
    assert not (tmp_path / "x.png").exists()


def test_the_script_prints_one_line_not_a_traceback(pipelines, tmp_path):
    sdxl_adapters(tmp_path / "sdxl.safetensors", pipelines)
    result = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--model", "sd21", "--weights",
                             str(pipelines["sd21"]), "--adapters", str(tmp_path / "sdxl.safetensors"), "--device",
                             "cpu", "--out", str(tmp_path / "x.png")], capture_output=True, text=True, timeout=120,
                            cwd=tmp_path)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {tmp_path / 'sdxl.safetensors'}: missing key "), lines


@pytest.mark.parametrize("argv, message", [
    (["--model", "sd21", "--classes", "3"], "--classes is not an option of --model sd21"),
    (["--model", "sdxl", "--sampler", "ddim"], "--sampler is not an option of --model sdxl"),
    (["--model", "sdxl", "--image-size", "1024"], "--image-size is not an option of --model sdxl"),
    (["--model", "dit", "--prompt", "a cat"], "--prompt is not an option of --model dit"),
    (["--model", "tiny", "--height", "28"], "--height is not an option of --model tiny"),
    (["--model", "sd21", "--num-images", "0"], "--num-images must be at least 1"),
    (["--model", "sd21", "--width", "-8"], "--width must be positive"),
    (["--model", "sd21", "--adapters", "a.safetensors", "--cfg", "7.5"], "with --adapters give the scale as --w"),
    (["--model", "sdxl", "--w-schedule", "interval:5:1"], "need 0 <= LOW < HIGH"),
])
def test_bad_arguments_are_refused_by_the_parser(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        sample.parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_defaults_are_the_official_pipelines():
    sd21, sdxl = sample.parse_args(["--model", "sd21"]), sample.parse_args(["--model", "sdxl", "--adapters", "a"])
    assert families.FAMILIES["sd21"].weights == "stabilityai/stable-diffusion-2-1"
    assert families.FAMILIES["sdxl"].weights == "stabilityai/stable-diffusion-xl-base-1.0"
    assert (sd21.steps, sd21.cfg, sd21.w, sd21.num_images) == (50, 7.5, None, 1)
    assert (sdxl.steps, sdxl.cfg, sdxl.w) == (50, None, 7.5)
    assert len(sd21.prompt) == 1 and sd21.negative_prompt is None and sd21.height is None  # size: the model's
