"""sample.py --controlnet on the tiny random SD 2.1 and SDXL pipelines:

- seed, prompts and control image files -> images equal StableDiffusionControlNetPipeline and
  StableDiffusionXLControlNetPipeline from the same seed, to 1e-4: CFG on, scales 0.5 and 1.0, two
  ControlNets at once, --canny; the output size taken from the control image (rounded down);
- with --adapters, one UNet pass and one ControlNet pass of the batch per step; CFG runs both on twice
  the batch; fresh adapters give the images of the ControlNet pipeline's guidance 1;
- bad input (not an image, a ControlNet of another base, flags out of step) is one line.
"""

import re

import numpy as np
import pytest
import torch
from PIL import Image

import adapters
import checkpoint
import control_image
import controlnet
import families
import sample
import unet

diffusers = pytest.importorskip("diffusers")
from tiny_pipelines import make_controlnet  # noqa: E402

STEPS = 3
PROMPTS = ["a photograph of an astronaut riding a horse", "a red cube on a blue sphere"]


@pytest.fixture(scope="module")
def roots(sd21_root, sdxl_root):
    return {"sd21": sd21_root, "sdxl": sdxl_root}


@pytest.fixture(scope="module")
def nets(roots, tmp_path_factory):
    """Two random ControlNets per base, in the hub layout."""
    return {name: [make_controlnet(root, tmp_path_factory.mktemp(f"cn-{name}-{k}"), seed=k) for k in (0, 1)]
            for name, root in roots.items()}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Two control image files of an odd size (21 x 17 px: the output is 20 x 16), a drawing with edges in it."""
    folder = tmp_path_factory.mktemp("control")
    files = []
    for k in range(2):
        g = np.random.default_rng(k)
        pixels = (g.random((17, 21, 3)) * 80).astype(np.uint8)
        pixels[3 + k:12, 4:15 - k] = 230  # a bright box: Canny finds its outline
        files.append(folder / f"control{k}.png")
        Image.fromarray(pixels).save(files[-1])
    return files


def parse(name, root, *argv):
    return sample.parse_args(["--model", name, "--weights", str(root), "--steps", str(STEPS), "--device", "cpu",
                              *argv])


def control_argv(folders, files, scales, canny=False):
    argv = [a for f, i, s in zip(folders, files, scales) for a in ("--controlnet", str(f), "--control-image", str(i),
                                                                     "--control-scale", str(s))]
    return argv + (["--canny"] if canny else [])


@torch.no_grad()
def pipeline_images(name, root, folders, files, scales, w, seed, canny=False):
    xl = name == "sdxl"
    cls = diffusers.StableDiffusionXLControlNetPipeline if xl else diffusers.StableDiffusionControlNetPipeline
    models = [diffusers.ControlNetModel.from_pretrained(f) for f in folders]
    extra = {} if xl else dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe = cls.from_pretrained(root, controlnet=models if len(models) > 1 else models[0], **extra)
    pipe.set_progress_bar_config(disable=True)
    pil = [Image.open(f) for f in files]
    pil = [control_image.canny(i) for i in pil] if canny else pil  # the official AGD code's cv2.Canny, then this
    many = len(models) > 1
    return pipe(PROMPTS, image=pil if many else pil[0], controlnet_conditioning_scale=scales if many else scales[0],
                num_inference_steps=STEPS, guidance_scale=w, generator=torch.Generator().manual_seed(seed),
                output_type="pt").images


CASES = [  # base, ControlNets, scales, CFG scale, --canny
    ("sd21", [0], [1.0], 7.5, False),
    ("sd21", [0, 1], [0.5, 1.0], 7.5, False),
    ("sdxl", [0], [0.5], 5.0, True),  # the official AGD code's: SDXL canny at 0.5
    ("sdxl", [0, 1], [1.0, 0.5], 5.0, False),
]


IDS = [f"{n}-{len(k)}cn-{'-'.join(map(str, s))}{'-canny' if c else ''}" for n, k, s, _, c in CASES]


@pytest.mark.parametrize("name, which, scales, w, canny", CASES, ids=IDS)
def test_seed_to_images_matches_the_controlnet_pipelines(roots, nets, images, name, which, scales, w, canny):
    root, folders, files, seed = roots[name], [nets[name][k] for k in which], [images[k] for k in which], 3
    expected = pipeline_images(name, root, folders, files, scales, w, seed, canny)
    argv = [a for p in PROMPTS for a in ("--prompt", p)] + ["--cfg", str(w), "--seed", str(seed)]
    ours, _, how = sample.generate(parse(name, root, *argv, *control_argv(folders, files, scales, canny)),
                                   families.FAMILIES[name])
    assert ours.shape == expected.shape == (2, 3, 16, 20)  # the control image's size, rounded down to 2
    assert ((expected > 0) & (expected < 1)).float().mean() > 0.5  # the clamp hides little
    assert (ours - expected).abs().max() < 1e-4
    assert how.endswith(", ".join(f"ControlNet {f} at {s:g}" for f, s in zip(folders, scales)))
    plain, _, _ = sample.generate(parse(name, root, *argv, "--height", "16", "--width", "20"), families.FAMILIES[name])
    assert (plain - expected).abs().max() > 1e-3  # the ControlNets mattered: the comparison could fail


def count_batches(monkeypatch):
    """The batch of every UNet and ControlNet forward, recorded."""
    seen = {"unet": [], "controlnet": []}
    for key, cls in (("unet", unet.UNet), ("controlnet", controlnet.ControlNet)):
        original = cls.forward

        def counted(self, x, *args, key=key, original=original, **kw):
            seen[key].append(len(x))
            return original(self, x, *args, **kw)

        monkeypatch.setattr(cls, "forward", counted)
    return seen


@pytest.mark.parametrize("name", ["sd21", "sdxl"])
def test_adapters_with_controlnet_run_one_pass_of_each_per_step(roots, nets, images, tmp_path, monkeypatch, name):
    root, file = roots[name], tmp_path / "agd.safetensors"
    adapters.attach(unet.from_pretrained(root), hidden_dim=8, use_timestep=True).save(file)
    argv = [a for p in PROMPTS for a in ("--prompt", p)] + control_argv(nets[name][:1], images[:1], [0.5])
    seen = count_batches(monkeypatch)
    agd, _, how = sample.generate(parse(name, root, *argv, "--adapters", str(file), "--w", "5"),
                                  families.FAMILIES[name])
    assert "adapters at w=5, one pass" in how
    assert seen == {"unet": [2] * STEPS, "controlnet": [2] * STEPS}
    seen["unet"].clear(), seen["controlnet"].clear()
    sample.generate(parse(name, root, *argv, "--cfg", "5"), families.FAMILIES[name])
    assert seen == {"unet": [4] * STEPS, "controlnet": [4] * STEPS}  # CFG: both halves through both
    expected = pipeline_images(name, root, nets[name][:1], images[:1], [0.5], 1.0, 0)
    assert (agd - expected).abs().max() < 1e-4  # fresh adapters: the pipeline's conditional model


@pytest.mark.parametrize("argv, message", [
    (["--controlnet", "CN", "--control-image", "TEXT"], r"--control-image .*not-an-image\.png: not an image PIL can "
                                                        r"read \(UnidentifiedImageError\); give a PNG or JPEG"),
    (["--controlnet", "CN", "--control-image", "nowhere.png"], "--control-image nowhere.png: no such control image"),
    (["--controlnet", "XL", "--control-image", "IMAGE"], r"--controlnet .*cn-sdxl.*: ControlNet for a UNet of widths "
                                                         r"\(32, 64\) and text width 80: does not fit this UNet"),
])
def test_bad_input_is_one_line(roots, nets, images, tmp_path, argv, message):
    text = tmp_path / "not-an-image.png"
    text.write_text("not a picture")
    files = {"CN": nets["sd21"][0], "XL": nets["sdxl"][0], "TEXT": text, "IMAGE": images[0]}
    argv = [str(files.get(a, a)) for a in argv]
    with pytest.raises((sample.InputError, checkpoint.CheckpointError), match=message) as e:
        sample.main(parse("sd21", roots["sd21"], *argv, "--out", str(tmp_path / "x.png")))
    assert "\n" not in str(e.value)
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("argv, message", [
    (["--model", "sd21", "--control-image", "a.png"], "--control-image is for a ControlNet: give --controlnet"),
    (["--model", "sd21", "--canny"], "--canny is for a ControlNet: give --controlnet"),
    (["--model", "sd21", "--controlnet", "a", "--controlnet", "b", "--control-image", "a.png"],
     "2 --controlnet and 1 --control-image: give one control image per ControlNet, in the same order"),
    (["--model", "sdxl", "--controlnet", "a", "--control-image", "a.png", "--control-scale", "0.5",
      "--control-scale", "1"], "1 --controlnet and 2 --control-scale: give one scale per ControlNet, or none"),
    (["--model", "tiny", "--controlnet", "a"], "--controlnet is not an option of --model tiny"),
])
def test_flags_out_of_step_are_refused_by_the_parser(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        sample.parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_scales_default_to_one_each():
    args = sample.parse_args(["--model", "sdxl", "--controlnet", "a", "--control-image", "a.png", "--controlnet", "b",
                              "--control-image", "b.png"])
    assert args.control_scale == [1.0, 1.0] and args.canny is None
