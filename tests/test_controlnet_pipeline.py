"""Prompt + control image -> latents with this library's ControlNet, against diffusers' ControlNet pipelines.

PromptEncoder, unet.from_pretrained, controlnet.from_pretrained, control_image.prepare and
guidance.sample over guidance.guided(controlnet.controlled(...)) equal StableDiffusionControlNetPipeline
(SD 2.1: DDIM, v) and StableDiffusionXLControlNetPipeline (SDXL: Euler) on the tiny random pipelines,
from the same latents, to 1e-4: CFG on, conditioning scales 0.5 and 1.0, two ControlNets at once,
guess mode, start / end fractions; the output size taken from the control image as the pipelines
take it. And a fresh adapter student with the ControlNet, one UNet pass and one ControlNet pass per
step, equals the pipeline at guidance 1.
"""

import pytest
import torch
from PIL import Image

import adapters
import control_image
import controlnet
import guidance
import prompts
import unet
from util import max_rel_err

diffusers = pytest.importorskip("diffusers")

STEPS = 4
PROMPTS = ["a photograph of an astronaut riding a horse", "a red cube on a blue sphere"]
VAE_SCALE = 2  # the tiny pipelines' autoencoders downsample 2x (the real ones 8x)


def control_pil(seed, size=(21, 17)):
    """A random RGB control image of an odd size: the output size is it rounded down (to 20 x 16)."""
    g = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(size[1], size[0], 3, generator=g) * 255).byte().numpy()
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def controlnets(sd21_root, sdxl_root, tmp_path_factory):
    """Two randomized ControlNets per base, made as the hub's are (from_unet), saved in the hub layout."""
    out = {}
    for name, root in (("sd2.1", sd21_root), ("sdxl", sdxl_root)):
        base = diffusers.UNet2DConditionModel.from_pretrained(root / "unet")
        out[name] = []
        for seed in (0, 1):
            torch.manual_seed(seed)
            # one stride-2 step in the image encoder: the control image is VAE_SCALE x the latents
            net = diffusers.ControlNetModel.from_unet(base, conditioning_embedding_out_channels=(8, 16))
            with torch.no_grad():
                for p in net.parameters():  # zero convs included: zeros would make the comparison trivial
                    p.add_(0.05 * torch.randn_like(p))
            folder = tmp_path_factory.mktemp(f"cn-{name}-{seed}")
            net.save_pretrained(folder)
            out[name].append(folder)
    return out


@pytest.fixture(scope="module")
def roots(sd21_root, sdxl_root):
    return {"sd2.1": sd21_root, "sdxl": sdxl_root}


LOADED = {}  # (root, ControlNet folders, ours or theirs) -> what is loaded from them, once per module


def loaded(key, load):
    if key not in LOADED:
        LOADED[key] = load()
    return LOADED[key]


def load_pipeline(root, folders, xl):
    cls = diffusers.StableDiffusionXLControlNetPipeline if xl else diffusers.StableDiffusionControlNetPipeline
    nets = [diffusers.ControlNetModel.from_pretrained(f) for f in folders]
    extra = {} if xl else dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe = cls.from_pretrained(root, controlnet=nets if len(nets) > 1 else nets[0], **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def diffusers_latents(root, folders, images, latents, w, scales, xl, **kw):
    pipe = loaded((root, tuple(folders), "diffusers"), lambda: load_pipeline(root, folders, xl))
    many = len(folders) > 1
    return pipe(PROMPTS, image=images if many else images[0], num_inference_steps=STEPS, guidance_scale=w,
                controlnet_conditioning_scale=scales if many else scales[0], latents=latents.clone(),
                output_type="latent", **kw).images


@torch.no_grad()
def our_latents(root, folders, images, latents, w, scales, guess_mode=False, start=0.0, end=1.0, student=None):
    """The composition sample.py makes: prompts and control images to latents."""
    pe, model = loaded((root, "ours"),
                       lambda: (prompts.PromptEncoder.from_pretrained(root), unet.from_pretrained(root)))
    model = unet.from_pretrained(root) if student else model  # a student hooks its UNet: not the shared one
    nets = [loaded((f, "ours"), lambda f=f: controlnet.from_pretrained(f)) for f in folders]
    for net in nets:
        controlnet.check_fits(net, model)
    controls = [control_image.prepare(i, multiple=VAE_SCALE) for i in images]  # (1, 3, H, W)
    height, width = controls[0].shape[-2:]  # no size asked for: the control image's, rounded down
    s = guidance.scheduler_from_config(root)
    timesteps = s.timesteps(STEPS)
    n = len(PROMPTS)
    cond, null = pe(PROMPTS, height=height, width=width), pe.null(n, height=height, width=width)
    extra, extra_null = controlnet.control_condition(nets, [c[0] for c in controls], scales, batch=n,
                                                     guess_mode=guess_mode)
    cond, null = {**cond, **extra}, {**null, **extra_null}
    if student is None:
        call = controlnet.controlled(model, nets, timesteps, start, end, guess_mode)
        denoise = guidance.guided(call, w, cond, null) if w != 1 else (lambda x, t: call(x, t, **cond))
    else:  # adapters beside the UNet's attn2; the ControlNet wraps the student, one pass of each per step
        call = controlnet.controlled(student(model), nets, timesteps, start, end, guess_mode)
        denoise = lambda x, t: call(x, t, w=torch.full((n,), float(w)), **cond)  # noqa: E731
    assert latents.shape[-2:] == (height // VAE_SCALE, width // VAE_SCALE)
    return guidance.sample(denoise, latents, s, timesteps)


CASES = [  # base, ControlNets used, scales, guidance, pipeline options
    ("sd2.1", [0], [1.0], 7.5, {}),
    ("sd2.1", [0], [0.5], 7.5, {}),
    ("sd2.1", [0, 1], [0.5, 1.0], 7.5, {}),
    ("sd2.1", [0], [1.0], 5.0, dict(guess_mode=True)),
    ("sd2.1", [0, 1], [1.0, 0.5], 7.5, dict(start=[0.25, 0.0], end=[1.0, 0.5])),
    ("sdxl", [0], [0.5], 5.0, {}),  # the official AGD code's setting: SDXL canny at 0.5
    ("sdxl", [0], [1.0], 5.0, {}),
    ("sdxl", [0, 1], [0.5, 1.0], 5.0, {}),
]


def case_id(case):
    name, which, scales, w, options = case
    return "-".join([name, f"{len(which)}cn", *map(str, scales), f"w{w}", *options])


@pytest.mark.parametrize("name, which, scales, w, options", CASES, ids=[case_id(c) for c in CASES])
def test_latents_match_the_controlnet_pipelines(roots, controlnets, name, which, scales, w, options):
    root, xl = roots[name], name == "sdxl"
    folders = [controlnets[name][k] for k in which]
    images = [control_pil(10 + k) for k in which]
    latents = torch.randn(len(PROMPTS), 4, 16 // VAE_SCALE, 20 // VAE_SCALE, generator=torch.Generator().manual_seed(0))
    kw = dict(guess_mode=options.get("guess_mode", False))
    if "start" in options:
        kw.update(control_guidance_start=options["start"], control_guidance_end=options["end"])
    expected = diffusers_latents(root, folders, images, latents, w, scales, xl, **kw)
    ours = our_latents(root, folders, images, latents, w, scales, **options)
    assert ours.shape == expected.shape == latents.shape
    assert max_rel_err(ours, expected) < 1e-4
    if scales == [0.5] and w == 5.0 or len(scales) == 2 and not options:  # the ControlNets mattered
        plain = our_latents(root, folders, images, latents, w, [0.0] * len(scales))
        assert max_rel_err(plain, expected) > 1e-3


@pytest.mark.parametrize("name", ["sd2.1", "sdxl"])
def test_fresh_adapters_with_controlnet_are_the_pipeline_at_guidance_1(roots, controlnets, name, monkeypatch):
    """One UNet pass (adapters beside its attn2, none on the ControlNet's) and one ControlNet pass per step."""
    root, folders, images = roots[name], controlnets[name][:1], [control_pil(10)]
    latents = torch.randn(len(PROMPTS), 4, 8, 10, generator=torch.Generator().manual_seed(0))
    expected = diffusers_latents(root, folders, images, latents, 1.0, [0.5], name == "sdxl")
    passes = {"unet": 0, "controlnet": 0}

    def student(model):
        s = adapters.attach(model)
        assert all(n.startswith(("down_blocks", "mid_block", "up_blocks")) for n in s.targets)
        model.register_forward_pre_hook(lambda *_: passes.__setitem__("unet", passes["unet"] + 1))
        return s

    original = controlnet.ControlNet.forward

    def counted(self, *args, **kw):
        passes["controlnet"] += 1
        return original(self, *args, **kw)

    monkeypatch.setattr(controlnet.ControlNet, "forward", counted)
    ours = our_latents(root, folders, images, latents, 1.0, [0.5], student=student)
    assert max_rel_err(ours, expected) < 1e-4
    assert passes == {"unet": STEPS, "controlnet": STEPS}
