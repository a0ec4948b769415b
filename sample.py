"""Generate images with classifier-free guidance, or with AGD adapters in one pass per step.

    python sample.py --model dit --classes 207 360 387 974 --cfg 4.0           # DiT-XL/2-256 from the hub
    python sample.py --model dit --adapters runs/dit/adapters.safetensors --w 4.0
    python sample.py --model dit --weights DiT-XL-2-512x512.pt --sampler ddim --steps 50
    python sample.py --model tiny --classes 0 1 2 3 --cfg 3.0                 # the bundled MNIST teacher
    python sample.py --model sdxl --prompt "a red fox in the snow" --num-images 4 --cfg 7.5 --dtype bfloat16
    python sample.py --model sd21 --weights my-sd21-finetune --adapters runs/sd21/adapters.safetensors --w 7.5
    python sample.py --model sd3 --prompt "a red fox in the snow" --cfg 7.0 --dtype bfloat16 --no-t5
    python sample.py --model sd35 --adapters runs/sd35/adapters.safetensors --w 4.5 --dtype bfloat16
    python sample.py --model sdxl --lora style.safetensors:0.8 --adapters runs/sdxl/adapters.safetensors --w 7.5
    python sample.py --model sdxl --ip-adapter IP-Adapter/sdxl_models/ip-adapter_sdxl.safetensors --ip-image dog.png
    python sample.py --model sdxl --controlnet diffusers/controlnet-canny-sdxl-1.0 --control-image photo.png --canny \
        --control-scale 0.5 --adapters runs/sdxl/adapters.safetensors --w 7.5     # the official AGD code's setting

DiT is sampled as its paper samples it (facebookresearch/DiT sample_ddp.py): 250 DDPM steps respaced
as in improved DDPM, with the learned variance, and CFG against the null class (on every latent
channel, where the paper's code guides three of four); or with DDIM at diffusers' "leading" spacing,
as diffusers' DiTPipeline runs the hub's scheduler config (families.dit_scheduler decides both).

Stable Diffusion 2.1 and XL are sampled as diffusers' StableDiffusion(XL)Pipeline samples them: the
sampler, schedule and prediction of the repo's scheduler config (SD 2.1: DDIM, v; SDXL: Euler,
epsilon), CFG against the negative prompt or the model's own null condition, at the image size the
UNet was trained for unless --height and --width say otherwise. SD3 and SD3.5 are sampled as
StableDiffusion3Pipeline samples them: Euler steps of the flow at the scheduler config's shifted
timesteps, CFG on the velocity, the latents decoded as z / scaling_factor + shift_factor; --no-t5 puts
zeros in T5-XXL's place, as the pipeline with text_encoder_3=None. Adapters trained on a base model
load as well onto a fine-tune of it (--weights): the base is never changed by training them.
ControlNets (--controlnet, repeated for several) act as in diffusers' ControlNet pipelines: each
control image resized to the output size, whose default is the first image's; with CFG on both
halves of the batch, with adapters once per step beside the one UNet pass.

Adapters distilled to a few steps (train_agd.py --distill-steps) sample with their own sampler,
deterministic DDIM at trailing spacing (distill.scheduler), in the steps their file records.

Writes the images as one PNG grid and prints the seconds per sampler step.
"""

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import adapters
import checkpoint
import control_image
import controlnet
import distill
import families
import fast
import guidance
import image_encoders
import ip_adapter
import lora

COLUMNS = 4  # images per row of the grid, as DiT's and AGD's sample.py


class InputError(ValueError):
    """Input that cannot be sampled (a class the model lacks, a size its weights lack); one line for the user."""


class NonFiniteSample(ValueError):
    """A sample turned NaN or infinite: the message names the step and the sample, and no image is written."""


# -----------------------------------------------------------------------------
# denoisers: the model conditioned, guided, or with adapters


def denoiser(model, cond, null=None, cfg_scale=None, student=None, w=None, channels=None, beside=(), controlnets=()):
    """The denoiser to sample with: adapters at w (one pass), CFG at cfg_scale against `null`, or the model at `cond`.

    w and cfg_scale: a number, or a function of the step's timestep (guidance.WSchedule.at); channels:
    how many output channels CFG guides (default all; see families.load_dit). Adapters
    that read the negative get `null` as it. Samples stay float32 between steps; the model computes in
    its own dtype. `beside`: attachments in every call (an IP-Adapter), each taking its keys of cond;
    `controlnets` add their residuals to the model's or the student's one call (controlnet.controlled; their
    images ride in cond and null, Control.condition).
    """
    dtype = next(model.parameters()).dtype
    call = adapters.call_with(model, *beside) if beside else model
    call = controlnet.controlled(call, controlnets) if controlnets else call

    def net(x, t, **c):
        return call(x.to(dtype), t, **c).float()

    if student is not None:  # AGD: one pass per step (and one of each ControlNet)
        negative = null if student.takes_negative else None
        one_pass = adapters.call_with(model, *beside, student) if beside else student  # all in the one pass
        one_pass = controlnet.controlled(one_pass, controlnets) if controlnets else one_pass

        def agd(x, t):
            scale = w(t) if callable(w) else w
            if callable(w) and scale == 1:  # a schedule's unguided step: the conditional model, as CFG's there
                return net(x, t, **cond)
            return one_pass(x.to(dtype), t, w=scale, negative=negative, **cond).float()

        return agd
    if cfg_scale is None or (not callable(cfg_scale) and cfg_scale == 1):  # w = 1: the conditional model, one
        return lambda x, t: net(x, t, **cond)  # pass, as the pipelines run it
    return guidance.guided(net, cfg_scale, cond, null, channels)


@torch.no_grad()
def sample_latents(base, conditions, noise, steps, cfg_scale=None, negative=None, student=None, w=None,
                   generator=None, progress=False, w_schedule=None, beside=(), control=None):
    """Clean samples (B, C, H, W) for `conditions` (B class ids or B prompts) from x_T = `noise`.

    `steps` of the base's scheduler, with CFG at `cfg_scale` against `negative` (a negative prompt or
    class; default: the model's null condition), or with the adapters `student` at `w` in one pass per
    step; `w_schedule` (guidance.WSchedule) varies either scale from step to step; `beside`: attachments
    in every model call (see denoiser); `control` (a Control) adds ControlNets. Latents come in the
    autoencoder's scaled units.
    """
    cond = base.encode(conditions)
    timesteps = base.scheduler.timesteps(steps)
    scheduled = w_schedule is not None and w_schedule.kind != "constant"
    if scheduled and student is not None:
        w = w_schedule.at(w, base.scheduler, timesteps)
    elif scheduled and cfg_scale is not None:
        cfg_scale = w_schedule.at(cfg_scale, base.scheduler, timesteps)
    guided = student is None and cfg_scale is not None and (callable(cfg_scale) or cfg_scale != 1)
    needs_null = guided or (student is not None and student.takes_negative)
    null = base.null(len(noise), negative) if needs_null else None
    if control is not None:
        cond, null = control.condition(cond, null, len(noise))
    nets = control.nets if control is not None else ()
    finite = FiniteCheck(len(timesteps))
    denoise = denoiser(base.model, cond, null, cfg_scale, student, w, base.cfg_channels, beside, nets)
    x = guidance.sample(denoise, noise.float(), base.scheduler, timesteps, generator=generator, callback=finite,
                        progress=progress)
    finite.check(x, conditions)
    return x


class FiniteCheck:
    """The sampler's callback that notes the first step at which each sample's denoiser output is not finite.

    The note stays on the device, so that sampling never waits for it; `check` looks once, at the end.
    """

    def __init__(self, steps):
        self.steps, self.first = steps, None  # (B,): each sample's first non-finite step; `steps` for none

    def __call__(self, step):
        bad = ~torch.isfinite(step["out"]).flatten(1).all(1)  # (B,)
        if self.first is None:
            self.first = torch.full(bad.shape, self.steps, device=bad.device)
        self.first = torch.where(bad, self.first.clamp(max=step["i"]), self.first)

    def check(self, x, conditions):
        """Raise NonFiniteSample naming the first sample to turn non-finite (its output, or its final x)."""
        last = torch.where(~torch.isfinite(x).flatten(1).all(1), self.steps - 1, self.steps)  # (B,)
        first = torch.minimum(self.first, last).tolist() if self.first is not None else last.tolist()
        bad = [b for b, s in enumerate(first) if s < self.steps]
        if bad:
            b = min(bad, key=lambda b: first[b])
            c = conditions[b]
            what = f"class {int(c)}" if torch.is_tensor(c) else f"prompt {c[:40]!r}"
            more = f"; {len(bad) - 1} more samples did too" if len(bad) > 1 else ""
            raise NonFiniteSample(f"sample {b} ({what}) turned non-finite (nan or inf) at step {first[b] + 1} of "
                                  f"{self.steps}{more}; no image is written")


def load_student(model, file, weights):
    """adapters.load, with adapters made for another kind of model refused in one line."""
    try:
        return adapters.load(model, file)
    except checkpoint.CheckpointError:
        raise  # already one line: the file and the key at fault
    except ValueError as e:  # e.g. DiT's adapters (beside `attn`) on a UNet (attn1, attn2)
        raise InputError(f"{file}: these adapters do not fit {weights} ({e})") from None


def describe(sampler, steps, n, cfg_scale, student, w, w_schedule=None, negative=None):
    """What ran each step, for the line sample.py prints."""
    passes = (f"adapters at w={w:g}, one pass" if student is not None else
              f"CFG at w={cfg_scale:g}, conditional and null passes batched" if cfg_scale != 1 else
              "no guidance, one pass")
    if w_schedule is not None and w_schedule.kind != "constant":
        passes += f", w scheduled {w_schedule.kind}"
    if negative is not None:
        passes += f", against the negative {negative!r}"
    return f"{sampler}, {steps} steps, {n} images, {passes}"


# -----------------------------------------------------------------------------
# an image prompt beside the text: IP-Adapter (ip_adapter.py)


def find_image_prompt(args):
    """(the --ip-image, the --ip-adapter file, its image encoder's (folder or hub id, subfolder)), each found
    before any model loads: a missing or unreadable one is one line."""
    try:
        image = image_encoders.read_image(args.ip_image)
    except ValueError as e:
        raise InputError(f"--ip-image {e}") from None
    file, (folder, subfolder) = ip_adapter.fetch(args.ip_adapter)
    if args.image_encoder is not None:
        folder, subfolder = args.image_encoder, None
    elif subfolder is None and not Path(folder).is_dir():
        raise InputError(f"{file}: no image encoder beside it (h94/IP-Adapter keeps it in {folder}); "
                         "name it with --image-encoder")
    return image, file, (folder, subfolder or "image_encoder")


def load_image_prompt(args, base, image_prompt):
    """The IP-Adapter beside the UNet's attn2 modules, its image encoder run once: (base with the image's
    tokens in each condition and the null image's in each null, the attachments of every UNet call, what
    the printed line adds)."""
    image, file, (folder, subfolder) = image_prompt
    try:
        ip = ip_adapter.load(base.model, file, args.ip_scale)
    except checkpoint.CheckpointError:
        raise  # one line already: the file and the key at fault
    except ValueError as e:  # not a UNet
        raise InputError(f"--ip-adapter {args.ip_adapter}: {e}") from None
    encoder = image_encoders.VisionEncoder.from_pretrained(folder, subfolder, dtype=args.dtype, device=args.device)
    tokens = ip.encode(encoder, encoder.processor([image]))  # (1, N, D)
    base = ip_adapter.with_image_prompt(base, tokens, ip.null(1, encoder))  # the encoder's work is done
    return base, (ip,), f", IP-Adapter {Path(file).name} at scale {args.ip_scale:g}"


def image_prompt_arguments(p):
    """sample.py's IP-Adapter options, their own group."""
    g = p.add_argument_group("an image prompt (--model sd21, sdxl with an SD 1.5 or SDXL UNet): IP-Adapter, "
                             "h94/IP-Adapter's files")
    g.add_argument("--ip-adapter", metavar="FILE", help="an IP-Adapter file (.safetensors or .bin) or hub id, e.g. "
                   "h94/IP-Adapter/sdxl_models/ip-adapter_sdxl.safetensors; the image attends beside the text, in "
                   "CFG's null half the null image; with --adapters, in their one pass")
    g.add_argument("--ip-image", metavar="FILE", help="the image prompt (any image PIL reads)")
    g.add_argument("--ip-scale", type=float, metavar="S", help="the image's weight against the text "
                   "(default 0.6, as the official AGD code)")
    g.add_argument("--image-encoder", metavar="PATH", help="its CLIP image encoder, folder or hub id (default: "
                   "the image_encoder/ folder beside the file, as h94's layout has it)")


IMAGE_PROMPT_MODELS = ("sd21", "sdxl")  # the UNet families, for h94's SD 1.5 and SDXL IP-Adapters


def check_image_prompt_arguments(p, args):
    """One line for IP-Adapter options that do not go together; --ip-scale's default."""
    given = [name for name in ("ip_adapter", "ip_image", "ip_scale", "image_encoder") if getattr(args, name)
             is not None]
    if given and args.model not in IMAGE_PROMPT_MODELS:
        p.error(f"--{given[0].replace('_', '-')} is not an option of --model {args.model} (IP-Adapters are for "
                f"the UNets: --model {' or '.join(IMAGE_PROMPT_MODELS)})")
    if given and (args.ip_adapter is None or args.ip_image is None):
        p.error("an image prompt takes both --ip-adapter FILE and --ip-image FILE")
    args.ip_scale = ip_adapter.SCALE if args.ip_scale is None else args.ip_scale


# -----------------------------------------------------------------------------
# loading what --model, --weights and the size options name


def dit_weights(args, family):
    """The DiT weights to load: --weights, or the official ones for --image-size."""
    if args.weights is not None:
        return args.weights
    if args.image_size is not None and family.sizes and args.image_size not in family.sizes:
        raise InputError(f"--image-size {args.image_size}: the {family.name} weights come in "
                         f"{' and '.join(map(str, family.sizes))} px")
    weights = family.sizes.get(args.image_size or min(family.sizes, default=0), family.weights)
    if weights.startswith("/") and not Path(weights).exists():
        raise InputError(f"{weights}: missing (the bundled teacher: python tiny.py teacher trains it)")
    return weights


def load_base(args, family):
    """The Base for the CLI's options, its autoencoder included; sizes and classes checked."""
    if family.conditioning == "class":
        weights = dit_weights(args, family)
        try:
            base = family.load(weights, args.dtype, args.device, sampler=args.sampler, with_vae=True,
                               vae_weights=args.vae, cfg_channels=args.cfg_channels)
        except checkpoint.CheckpointError:
            raise
        except ValueError as e:  # --cfg-channels the model does not have
            raise InputError(f"--{str(e).replace('_', '-')}") from None
        factor = base.vae.config.downsampling_factor if base.vae is not None else 1
        side = base.shape[-1] * factor
        if args.image_size is not None and args.image_size != side:
            raise InputError(f"{weights}: its images are {side} x {side} px, not {args.image_size}")
        n = base.model.config.num_classes
        bad = [c for c in args.classes + ([args.negative_class] if args.negative_class is not None else [])
               if not 0 <= c < n]
        if bad:
            raise InputError(f"class {bad[0]} is out of range: {weights} has classes 0-{n - 1} "
                             f"(and {n}, the null class that CFG uses)")
        return base
    try:
        return family.load(args.weights, args.dtype, args.device, height=args.height, width=args.width,
                           with_vae=True, vae_weights=args.vae, t5=not args.no_t5)
    except checkpoint.CheckpointError:
        raise
    except ValueError as e:  # a size the autoencoder cannot make: its message begins with the option's name
        raise InputError(f"--{e}" if str(e).startswith(("height ", "width ")) else str(e)) from None


def generate(args, family):
    """Images (B, C, H, W) in [0, 1], in order; seconds per step; what ran each step."""
    if args.adapters:
        adapters.read_config(args.adapters)  # a missing or foreign file fails before the models load
    lora.check_files(args.lora)
    image_prompt = find_image_prompt(args) if args.ip_adapter else None
    controls = read_control_images(args.control_image or [], args.canny)  # before the models load
    if controls:  # the output size follows the first control image, unless given
        height, width = control_size(controls[0], args.height, args.width, args.weights or family.weights, args.vae)
        args = argparse.Namespace(**{**vars(args), "height": height, "width": width})
    base = load_base(args, family)
    lora.apply(base.lora_models(), args.lora, undoable=False)  # fused for good, before any prompt is encoded
    if args.distilled and (family.conditioning == "prompt" or args.sampler == "ddim"):
        base.scheduler = distill.scheduler(base)  # the sampler the adapters were distilled for
    student = load_student(base.model, args.adapters, base.weights) if args.adapters else None
    control = load_control(args.controlnet, args.control_scale, controls, base.model, args.height, args.width,
                           args.dtype, args.device) if controls else None
    negative = args.negative_class if family.conditioning == "class" else args.negative_prompt
    if student is not None and negative is not None and not student.takes_negative:
        raise InputError(f"{args.adapters}: these adapters learned CFG against the null condition only; for a "
                         f"negative in one pass, train them with one (python train_agd.py --negatives 0.5)")
    beside, ip_how = (), ""
    if image_prompt is not None:
        base, beside, ip_how = load_image_prompt(args, base, image_prompt)
    fast.speed_up(base.model, args.compile, args.cuda_graphs, args.channels_last)
    if family.conditioning == "class":
        conditions = torch.tensor(args.classes, device=args.device)
    else:
        conditions = [p for p in args.prompt for _ in range(args.num_images)]  # as num_images_per_prompt orders them
    generator = torch.Generator(args.device).manual_seed(args.seed)
    noise = torch.randn((len(conditions), *base.shape), generator=generator, device=args.device)  # (B, C, h, w): x_T
    start = time.perf_counter()  # a prompt's encoding counts in: once, against `steps` passes
    z = sample_latents(base, conditions, noise, args.steps, args.cfg, negative, student, args.w, generator,
                       progress=True, w_schedule=args.w_schedule, beside=beside, control=control)  # (B, C, h, w)
    z = z.cpu()  # waits for the device to finish
    seconds = (time.perf_counter() - start) / args.steps
    images = z
    if base.vae is not None:
        with torch.no_grad():  # one image at a time: a batch of 1024 px images is large to decode at once
            images = base.vae.decode(z.to(args.device), batch_size=1).float().cpu()  # (B, 3, H, W) about [-1, 1]
    sampler = base.scheduler.name + (f" at {base.scheduler.timestep_spacing} spacing" if args.distilled else "")
    how = describe(sampler, args.steps, len(images), args.cfg, student, args.w, args.w_schedule, negative)
    how += "".join(f", LoRA {file.name}:{multiplier:g}" for file, multiplier in args.lora) + ip_how
    if control is not None:
        how += "".join(f", ControlNet {n} at {s:g}" for n, s in zip(control.names, control.scales))
    return (images / 2 + 0.5).clamp(0, 1), seconds, how


# -----------------------------------------------------------------------------
# ControlNet: --controlnet, --control-image, --control-scale, --canny


@dataclass
class Control:
    """ControlNets, one prepared control image (1, 3, H, W) in [0, 1] and one scale each, for sample_latents."""
    nets: list
    images: list
    scales: list
    names: list  # what --controlnet said, for the printed line

    def condition(self, cond, null, batch):
        """cond and null (None: not needed) carrying the images; in null too, so that under CFG the
        ControlNets run on both halves of the batch, as diffusers' pipelines run them."""
        extra, extra_null = controlnet.control_condition(self.nets, [i[0] for i in self.images], self.scales, batch)
        return {**cond, **extra}, None if null is None else {**null, **extra_null}


def read_control_images(files, canny=False):
    """The control image files as PIL images (their Canny edges with `canny`); a file that is not one is one line."""
    try:
        images = [control_image.load_image(f) for f in files]
    except ValueError as e:
        raise InputError(f"--control-image {e}") from None
    return [control_image.canny(i) for i in images] if canny else images


def control_size(image, height, width, weights, vae_weights):
    """The output size with a control image: --height / --width, else the image's, each rounded down to
    the autoencoder's factor (its config), as diffusers' ControlNet pipelines take it."""
    import vae

    folder = checkpoint.resolve(vae_weights or weights, "vae")
    factor = vae.config_from_diffusers(checkpoint.read_config(folder), folder / "config.json").downsampling_factor
    return control_image.default_size(image, height, width, multiple=factor)


def load_control(files, scales, images, model, height, width, dtype, device):
    """The ControlNets at `files`, each checked to fit `model`, with its image prepared at height x width."""
    nets = []
    for file in files:
        net = controlnet.from_pretrained(file, dtype=dtype, device=device)
        try:
            controlnet.check_fits(net, model)
        except checkpoint.CheckpointError as e:  # name the file: several may be given
            raise checkpoint.CheckpointError(f"--controlnet {file}: {e}") from None
        nets.append(net)
    # (1, 3, H, W) each; the size is already the autoencoder's multiple (control_size, families.load_sd)
    prepared = [control_image.prepare(i, height, width, multiple=1).to(device) for i in images]
    return Control(nets, prepared, list(scales), [str(f) for f in files])


# -----------------------------------------------------------------------------
# output


def save_grid(images, file, columns=COLUMNS):
    """Images (B, C, H, W) in [0, 1] (C = 1 or 3) -> one PNG, `columns` per row, in order."""
    from PIL import Image

    B, C, H, W = images.shape
    columns = min(columns, B)
    rows = -(-B // columns)
    pixels = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()  # (B, H, W, C)
    grid = np.zeros((rows * H, columns * W, C), dtype=np.uint8)  # cells past the last image stay black
    for i, image in enumerate(pixels):
        r, c = divmod(i, columns)
        grid[r * H:(r + 1) * H, c * W:(c + 1) * W] = image
    file = Path(file)
    file.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid[..., 0] if C == 1 else grid).save(file)


# -----------------------------------------------------------------------------
# CLI


def distilled_steps(file):
    """The steps that distilled adapters were trained for; None for AGD's, or for a file generate() will report."""
    try:
        return distill.read_steps(file)
    except (checkpoint.CheckpointError, OSError):
        return None


CLASS_OPTIONS = ("classes", "negative_class", "image_size", "sampler", "cfg_channels")  # class models' (dit, tiny)
PROMPT_OPTIONS = ("prompt", "negative_prompt", "num_images", "height", "width",  # and only prompted ones (SD, SD3)
                  "controlnet", "control_image", "control_scale", "canny")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Sample images with classifier-free guidance (two passes per step) "
                                "or with AGD adapters (one pass per step); write a PNG grid.")
    p.add_argument("--model", choices=list(families.FAMILIES), default="dit",
                   help="; ".join(f"{f.name}: {f.help}" for f in families.FAMILIES.values()))
    p.add_argument("--weights", help="hub id or folder in the hub's layout (a fine-tune of the model, too); DiT: "
                   "also a facebookresearch/DiT .pt checkpoint (default: the official weights)")
    p.add_argument("--vae", help="autoencoder, hub id or folder (default: the weights' vae/, or "
                   f"{families.ORIGINAL_VAE} for a .pt)")
    p.add_argument("--cfg", type=float, help="CFG scale w; 1 is no guidance (default: dit and tiny 4.0, "
                   "sd21 and sdxl 7.5, sd3 7.0, sd35 4.5)")
    p.add_argument("--adapters", help="AGD adapters file: sample in one pass per step at scale --w, instead of CFG "
                   "(distilled ones: with their DDIM, in the steps they were distilled to)")
    p.add_argument("--w", type=float, help="the guidance scale asked of the adapters (default: as --cfg)")
    p.add_argument("--w-schedule", default="constant", metavar="SPEC",
                   help="how --cfg / --w vary over the steps: constant; interval:LOW:HIGH, guidance only where the "
                        "noise level sigma_t / alpha_t is in (LOW, HIGH] (Kynkaanniemi et al. 2024), w = 1 elsewhere "
                        "(CFG skips its null pass there); linear:START:END, the strength w - 1 scaled from START "
                        "at the first step to END at the last")
    p.add_argument("--steps", type=int, help="sampler steps (default: dit 250 ddpm, 50 ddim; tiny 25; "
                   "sd21 and sdxl 50; sd3 28; sd35 40; distilled --adapters: the steps they were distilled to)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="of the model weights (bfloat16 or float16 on a GPU); samples stay float32 between steps")
    p.add_argument("--out", default="samples.png", help="the PNG grid to write")
    d = p.add_argument_group("class-conditioned models (--model dit, tiny)")
    d.add_argument("--classes", type=int, nargs="+", help="class ids, one image each (default: DiT's sample.py "
                   "classes; tiny: 0-9)")
    d.add_argument("--negative-class", type=int, help="the class CFG guides away from, in place of the null "
                   "class (with --adapters: adapters trained with --negatives)")
    d.add_argument("--cfg-channels", type=lambda v: None if v == "all" else int(v), metavar="3|all",
                   help="the latent channels CFG guides: all (default, as diffusers' DiTPipeline), or 3, as "
                        "facebookresearch/DiT's forward_with_cfg does (its published FID-50K 2.27 at w = 1.5)")
    d.add_argument("--image-size", type=int, help="image side in px: picks the official weights (DiT: 256 or 512; "
                   "default 256), or is checked against --weights")
    d.add_argument("--sampler", choices=["ddpm", "ddim"],
                   help="ddpm (default): learned variance, IDDPM respacing (the DiT paper); ddim: eta 0, "
                   "leading spacing")
    s = p.add_argument_group("Stable Diffusion (--model sd21, sdxl, sd3, sd35); the sampler is the weights' "
                             "scheduler config's")
    s.add_argument("--prompt", action="append", help="a prompt; repeat for several (default: the model card's)")
    s.add_argument("--negative-prompt", help="what CFG guides away from (default: the empty prompt; SDXL: "
                   "its null condition, zeros)")
    s.add_argument("--num-images", type=int, help="images per prompt (default 1)")
    s.add_argument("--height", type=int, help="image height in px, a multiple of 8 (SD3: of 16; default: the "
                   "model's, 768 for SD 2.1, 1024 for SDXL and SD3)")
    s.add_argument("--width", type=int, help="image width in px (default: as --height)")
    s.add_argument("--no-t5", action="store_true", help="SD3 / SD3.5: leave T5-XXL out, zeros in its place "
                   "(as StableDiffusion3Pipeline with text_encoder_3=None): 4.8 B parameters less to load")
    g = p.add_argument_group("LoRA (kohya-ss, diffusers or peft files: UNet and text encoders, or a DiT)")
    g.add_argument("--lora", action="append", default=[], type=lora.spec_argument, metavar="FILE[:MULTIPLIER]",
                   help="fused into the base after loading, multiplier default 1.0; repeat for several. With "
                        "--adapters, the adapters of the base model act on the LoRA'd one")
    image_prompt_arguments(p)
    fast.add_arguments(p)
    c = p.add_argument_group("ControlNet (--model sd21, sdxl); repeat the three for several, in order")
    c.add_argument("--controlnet", action="append", metavar="PATH_OR_HUB_ID",
                   help="a ControlNet: hub id or folder in diffusers' layout, or one file in the original "
                        "control_model.* layout; several add their residuals")
    c.add_argument("--control-image", action="append", metavar="FILE",
                   help="its control image, resized to the output size (Lanczos, aspect not kept); the first "
                        "one's size, rounded down to a multiple of 8, is the default --height / --width")
    c.add_argument("--control-scale", action="append", type=float, metavar="S",
                   help="its conditioning scale (default 1.0 for each)")
    c.add_argument("--canny", action="store_true", default=None,
                   help="take the Canny edges of the control images first (thresholds 100 / 200, as cv2.Canny "
                        "in the official AGD code)")
    args = p.parse_args(argv)

    family = families.FAMILIES[args.model]
    defaults = family.sample
    prompted = family.conditioning == "prompt"
    wrong = [name for name in (CLASS_OPTIONS if prompted else PROMPT_OPTIONS) if getattr(args, name) is not None]
    if wrong:
        p.error(f"--{wrong[0].replace('_', '-')} is not an option of --model {args.model}")
    check_image_prompt_arguments(p, args)
    if args.no_t5 and not family.t5:
        p.error(f"--no-t5 is for SD3 / SD3.5; --model {args.model} has no T5 encoder")
    if args.adapters is not None and args.cfg is not None:
        p.error("--cfg is the scale of CFG; with --adapters give the scale as --w")
    if args.adapters is None and args.w is not None:
        p.error("--w is the scale asked of --adapters; without them give the CFG scale as --cfg")
    args.distilled = distilled_steps(args.adapters) if args.adapters else None
    try:
        args.w_schedule = guidance.WSchedule.parse(args.w_schedule)
    except ValueError as e:
        p.error(f"--w-schedule: {e}")
    args.cfg = None if args.adapters else defaults["cfg"] if args.cfg is None else args.cfg
    args.w = (defaults["cfg"] if args.w is None else args.w) if args.adapters else None
    if prompted:
        args.prompt = args.prompt or defaults["prompts"]
        args.num_images = 1 if args.num_images is None else args.num_images
        if args.num_images < 1:
            p.error(f"--num-images must be at least 1, got {args.num_images}")
        for flag, side in (("--height", args.height), ("--width", args.width)):
            if side is not None and side < 1:
                p.error(f"{flag} must be positive, got {side}")
        default_steps = args.distilled or defaults["steps"]
        check_control(p, args)
    else:
        args.sampler = args.sampler or ("ddim" if args.distilled else "ddpm")
        args.classes = args.classes or defaults["classes"]
        default_steps = args.distilled or defaults["steps"][args.sampler]
    args.steps = default_steps if args.steps is None else args.steps
    if not 1 <= args.steps <= 1000:
        p.error(f"--steps must be in [1, 1000] (the training timesteps), got {args.steps}")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        p.error(f"--device {args.device}: not a torch device (cpu, cuda, cuda:1, mps, ...)")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: this torch has no CUDA device")
    args.dtype = getattr(torch, args.dtype)
    return args


def check_control(p, args):
    """The ControlNet flags come in step: one image (and none or one scale) per --controlnet."""
    nets, images, scales = args.controlnet or [], args.control_image or [], args.control_scale or []
    if not nets and (images or scales or args.canny):
        given = "--control-image" if images else "--control-scale" if scales else "--canny"
        p.error(f"{given} is for a ControlNet: give --controlnet PATH_OR_HUB_ID too")
    if len(images) != len(nets):
        p.error(f"{len(nets)} --controlnet and {len(images)} --control-image: give one control image per "
                "ControlNet, in the same order")
    if scales and len(scales) != len(nets):
        p.error(f"{len(nets)} --controlnet and {len(scales)} --control-scale: give one scale per ControlNet, "
                "or none (1.0 each)")
    args.control_scale = scales or [1.0] * len(nets)


def main(args):
    images, seconds, how = generate(args, families.FAMILIES[args.model])
    save_grid(images, args.out)
    print(f"{seconds:.3f} s/step ({how}) -> {args.out}")


if __name__ == "__main__":
    args = parse_args()
    try:
        main(args)
    except (InputError, NonFiniteSample, checkpoint.CheckpointError) as e:
        sys.exit(f"error: {e}")
