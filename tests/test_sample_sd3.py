"""sample.py for SD3 and SD3.5, on the tiny random pipelines of tiny_pipelines.make_sd3:

- the whole path from --seed (the three text encoders or CLIP alone, flow-matching Euler with CFG on the
  velocity, latents decoded as z / scale + shift) equals StableDiffusion3Pipeline from the same seed,
  images to 1e-4, with several prompts, several images each and a negative prompt; the latents too;
- fresh adapters beside every joint attention: one transformer pass per step, the pipeline's images at
  guidance 1; trained ones change the image stream of each attention and pass its text stream through;
- bad input is one line: --model sd3 with SDXL weights, T5 weights that do not fit, sizes the patches
  cannot make, --no-t5 for a model without T5.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import adapters
import checkpoint
import families
import sample

diffusers = pytest.importorskip("diffusers")
from util import max_rel_err  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FACTOR, STEPS = 2, 3  # the tiny autoencoder downsamples 2x
PROMPTS = ["a photo of an astronaut riding a horse on the moon", "a red cat"]


@pytest.fixture(scope="module")
def pipelines(sd3_root, sd35_root):
    return {"sd3": sd3_root, "sd35": sd35_root}


def parse(name, root, *argv):
    """sample.py's arguments for the tiny pipeline `name` at root, on the CPU."""
    return sample.parse_args(["--model", name, "--weights", str(root), "--steps", str(STEPS), "--device", "cpu",
                              *argv])


@torch.no_grad()
def pipeline_output(root, w, t5=True, negative_prompt=None, num_images=2, height=16, width=32, seed=3,
                    output_type="pt"):
    """StableDiffusion3Pipeline's images (B, 3, H, W) in [0, 1] (or its final latents) from the noise of `seed`."""
    extra = {} if t5 else dict(text_encoder_3=None, tokenizer_3=None)
    pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(root, **extra)
    pipe.set_progress_bar_config(disable=True)
    negative_prompt = negative_prompt and [negative_prompt] * len(PROMPTS)
    return pipe(PROMPTS, negative_prompt=negative_prompt, num_images_per_prompt=num_images, height=height,
                width=width, num_inference_steps=STEPS, guidance_scale=w, generator=torch.Generator().manual_seed(seed),
                output_type=output_type).images


CASES = [  # model, CFG scale, T5, negative prompt
    ("sd3", 5.0, True, None),
    ("sd3", 7.0, False, None),  # CLIP alone: zeros in T5's place
    ("sd35", 3.5, True, "blurry, low quality"),  # q / k RMSNorm and a dual-attention block; against a negative
]


@pytest.mark.parametrize("name, w, t5, negative_prompt", CASES,
                         ids=[f"{n}-w{w}-{'t5' if t5 else 'no-t5'}-{'negative' if neg else 'null'}"
                              for n, w, t5, neg in CASES])
def test_seed_to_images_matches_the_pipeline(pipelines, name, w, t5, negative_prompt):
    """Same seed, prompts, size, steps and scale: the same images; 16 x 32 px, so that a mix-up of sides shows."""
    root = pipelines[name]
    expected = pipeline_output(root, w, t5, negative_prompt)
    argv = [a for p in PROMPTS for a in ("--prompt", p)] + ["--num-images", "2", "--height", "16", "--width", "32",
                                                           "--cfg", str(w), "--seed", "3"]
    argv += (["--negative-prompt", negative_prompt] if negative_prompt else []) + ([] if t5 else ["--no-t5"])
    images, _, how = sample.generate(parse(name, root, *argv), families.FAMILIES[name])
    assert how.startswith(f"flow euler, {STEPS} steps, 4 images, CFG at w={w:g}")
    assert images.shape == expected.shape == (4, 3, 16, 32)
    assert ((expected > 0) & (expected < 1)).float().mean() > 0.5  # the clamp hides little
    assert (images - expected).abs().max() < 1e-4

    # sample_latents itself, from the pipeline's x_T, against its final latents
    base = families.load(name, root, height=16, width=32, t5=t5)
    assert base.shape == (16, 8, 16) and (base.prompt_encoder.text_encoder_3 is None) == (not t5)
    batch = [p for p in PROMPTS for _ in range(2)]
    noise = torch.randn(4, *base.shape, generator=torch.Generator().manual_seed(3))
    latents = sample.sample_latents(base, batch, noise, STEPS, w, negative_prompt)
    assert max_rel_err(latents, pipeline_output(root, w, t5, negative_prompt, output_type="latent")) < 1e-4
    assert max_rel_err(latents, noise) > 0.1  # the sampler moved the latents
    assert max_rel_err(latents, sample.sample_latents(base, batch, noise, STEPS, 1.0)) > 1e-2  # and so did CFG


def test_fresh_adapters_are_the_pipeline_at_guidance_1_in_one_pass(pipelines, tmp_path, capsys):
    root, file = pipelines["sd3"], tmp_path / "agd.safetensors"
    base = families.load("sd3", root, height=16, width=32)
    student = adapters.attach(base.model, **base.adapter_options(hidden_dim=8, use_timestep=True, use_prompt=True))
    assert student.targets == [f"transformer_blocks.{i}.attn" for i in range(3)]  # every joint block, the last too
    assert all(s.tuple_output for s in student.sites) and student.config.prompt_dim == 96  # T5's width, E
    student.save(file)
    out = tmp_path / "agd.png"
    sample.main(parse("sd3", root, *[a for p in PROMPTS for a in ("--prompt", p)], "--num-images", "2", "--height",
                      "16", "--width", "32", "--seed", "3", "--adapters", str(file), "--w", "7", "--out", str(out)))
    assert "flow euler, 3 steps, 4 images, adapters at w=7, one pass" in capsys.readouterr().out
    images, _, _ = sample.generate(parse("sd3", root, *[a for p in PROMPTS for a in ("--prompt", p)], "--num-images",
                                         "2", "--height", "16", "--width", "32", "--seed", "3", "--adapters",
                                         str(file), "--w", "7"), families.FAMILIES["sd3"])
    assert (images - pipeline_output(root, 1.0)).abs().max() < 1e-4  # the pipeline without guidance

    # one pass of the batch per step, through the adapters; CFG's holds the batch twice
    student = adapters.load(base.model, file)
    batches, adapter_calls = [], []
    base.model.register_forward_hook(lambda module, args, out: batches.append(len(args[0])))
    student.adapters[0].register_forward_hook(lambda module, args, out: adapter_calls.append(out))
    noise = torch.randn(2, *base.shape, generator=torch.Generator().manual_seed(0))
    agd = sample.sample_latents(base, PROMPTS, noise, STEPS, student=student, w=7.0)
    assert batches == [2] * STEPS and len(adapter_calls) == STEPS and not any(o.any() for o in adapter_calls)
    assert torch.equal(agd, sample.sample_latents(base, PROMPTS, noise, STEPS, cfg_scale=1.0))
    batches.clear()
    sample.sample_latents(base, PROMPTS, noise, STEPS, cfg_scale=7.0)
    assert batches == [4] * STEPS


def test_trained_adapters_move_the_image_stream_only(pipelines):
    """Each adapter adds to its joint attention's image output; the text output passes through untouched."""
    base = families.load("sd35", pipelines["sd35"], height=16, width=16)
    student = adapters.attach(base.model, hidden_dim=8)
    with torch.no_grad():  # as if trained
        for p in student.adapters.parameters():
            p.normal_(0, 0.5)
    seen = {}
    for i in (0, 2):  # the first joint block (with SD3.5's attn2 beside) and the last (no text output)
        attn = base.model.transformer_blocks[i].attn
        attn.register_forward_hook(lambda module, args, out, i=i: seen.setdefault(i, []).append(out))
    cond, x, t = base.encode(["a red cat"]), torch.randn(1, *base.shape), torch.tensor([500.0])
    with torch.no_grad():
        plain = base.model(x, t, **cond)
        guided = student(x, t, w=4.0, **cond)
    (image, text), (image_agd, text_agd) = seen[0]
    assert not torch.allclose(image, image_agd) and torch.equal(text, text_agd)  # first call: same inputs
    assert seen[2][0][1] is None and seen[2][1][1] is None  # context_pre_only: (image out, None)
    assert max_rel_err(guided, plain) > 1e-3
    assert all(a.out_proj.out_features == base.model.config.hidden_size for a in student.adapters)


# -----------------------------------------------------------------------------
# bad input


def t5_of_width(root, d_model):
    """A copy of the pipeline at root whose text_encoder_3 is a random T5 of another width."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    T5EncoderModel(T5Config(vocab_size=320, d_model=d_model, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                            feed_forward_proj="gated-gelu", is_encoder_decoder=False)).save_pretrained(
        root / "text_encoder_3")
    return root


def t5_config_changed(root, **changes):
    """A copy of the pipeline at root whose text_encoder_3/config.json no longer describes its weights."""
    file = root / "text_encoder_3" / "config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), **changes}))
    return root


@pytest.mark.parametrize("weights, argv, message", [
    ("SDXL", [], r"sdxl: model_index.json names a StableDiffusionXLPipeline, not SD3 or SD3.5's "
                 r"StableDiffusion3Pipeline$"),
    ("T5_WIDTH", [], r"text_encoder_3 is 64 wide, the transformer's joint_attention_dim 96$"),
    ("T5_CONFIG", [], r"text_encoder_3.*(d_ff|wi_0|wi_1|wo).*shape"),
    ("SD3", ["--height", "18"], r"^--height 18: not a multiple of 4, the autoencoder's downsampling factor 2 times "
                                r"the transformer's patch size 2$"),  # 18 is even: the patches, not the autoencoder
    ("SD3", ["--height", "16", "--width", "10"], "^--width 10: not a multiple of 4"),
])
def test_bad_input_is_one_line(pipelines, sdxl_root, tmp_path, weights, argv, message):
    if weights.startswith("T5"):
        root = shutil.copytree(pipelines["sd3"], tmp_path / "sd3")
        root = t5_of_width(root, 64) if weights == "T5_WIDTH" else t5_config_changed(root, d_ff=48)
    else:
        root = sdxl_root if weights == "SDXL" else pipelines["sd3"]
    with pytest.raises((sample.InputError, checkpoint.CheckpointError), match=message) as e:
        sample.main(parse("sd3", root, *argv, "--out", str(tmp_path / "x.png")))
    assert "\n" not in str(e.value)
    assert not (tmp_path / "x.png").exists()


def test_the_script_prints_one_line_not_a_traceback(sdxl_root, tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--model", "sd3", "--weights", str(sdxl_root),
                             "--device", "cpu", "--out", str(tmp_path / "x.png")], capture_output=True, text=True,
                            timeout=120, cwd=tmp_path)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines == [f"error: {sdxl_root}: model_index.json names a StableDiffusionXLPipeline, not SD3 or SD3.5's "
                     "StableDiffusion3Pipeline"], lines


@pytest.mark.parametrize("argv, message", [
    (["--model", "sdxl", "--no-t5"], "--no-t5 is for SD3 / SD3.5; --model sdxl has no T5 encoder"),
    (["--model", "dit", "--no-t5"], "--no-t5 is for SD3 / SD3.5"),
    (["--model", "sd3", "--classes", "3"], "--classes is not an option of --model sd3"),
])
def test_bad_arguments_are_refused_by_the_parser(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        sample.parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_defaults_are_the_official_pipelines():
    sd3, sd35 = sample.parse_args(["--model", "sd3"]), sample.parse_args(["--model", "sd35", "--adapters", "a"])
    assert families.FAMILIES["sd3"].weights == "stabilityai/stable-diffusion-3-medium-diffusers"
    assert families.FAMILIES["sd35"].weights == "stabilityai/stable-diffusion-3.5-medium"
    assert "3.5-large" in families.FAMILIES["sd35"].help  # --weights takes Large
    assert (sd3.steps, sd3.cfg, sd3.no_t5) == (28, 7.0, False)  # their model cards'
    assert (sd35.steps, sd35.cfg, sd35.w) == (40, None, 4.5)
