"""Generate images with classifier-free guidance, or with AGD adapters in one pass per step.

    python sample.py --model dit --classes 207 360 387 974 --cfg 4.0           # DiT-XL/2-256 from the hub
    python sample.py --model dit --adapters runs/dit/adapters.safetensors --w 4.0
    python sample.py --model dit --weights DiT-XL-2-512x512.pt --sampler ddim --steps 50
    python sample.py --model tiny --classes 0 1 2 3 --cfg 3.0                 # the bundled MNIST teacher

DiT is sampled as its paper samples it (facebookresearch/DiT sample_ddp.py): 250 DDPM steps respaced
as in improved DDPM, with the learned variance, and CFG against the null class (on every latent
channel, where the paper's code guides three of four: see dit_denoiser); or with DDIM at diffusers'
"leading" spacing, as diffusers' DiTPipeline runs the hub's scheduler config. Writes the images as
one PNG grid and prints the seconds per sampler step.
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
import dit
import guidance
import vae

ROOT = Path(__file__).resolve().parent
COLUMNS = 4  # images per row of the grid, as DiT's and AGD's sample.py


class InputError(ValueError):
    """Input that cannot be sampled (a class the model lacks, a size its weights lack); one line for the user."""


# -----------------------------------------------------------------------------
# DiT: class-conditional, on SD latents (DiT-XL/2) or on pixels (the tiny teacher)

SPACING = {"ddpm": "iddpm", "ddim": "leading"}  # DiT's respacing (IDDPM); DiTPipeline's DDIMScheduler default


def dit_denoiser(model, labels, cfg_scale=None, student=None, w=None):
    """The denoiser to sample with: the conditional model, CFG against the null class, or adapters at w.

    Samples stay float32 between steps; the model computes in its own dtype. CFG guides all C epsilon
    channels, as diffusers' DiTPipeline does; the paper's code guides only the first 3 of 4 "for exact
    reproducibility reasons" (models.py, forward_with_cfg), and its variance comes from the conditional
    pass either way.
    """
    dtype = next(model.parameters()).dtype
    if student is not None:  # AGD: one pass per step
        return lambda x, t: student(x.to(dtype), t, w=w, y=labels).float()

    def net(x, t, y):
        return model(x.to(dtype), t, y=y).float()

    if cfg_scale is None or cfg_scale == 1:  # w = 1 is the conditional model: one pass, as DiTPipeline runs it
        return lambda x, t: net(x, t, labels)
    null = torch.full_like(labels, model.config.num_classes)  # the row that label dropout trained
    return guidance.guided(net, cfg_scale, {"y": labels}, {"y": null})


@torch.no_grad()
def sample_dit(model, labels, cfg_scale=None, steps=250, sampler="ddpm", generator=None, student=None, w=None,
               prediction_type="epsilon", clip_sample=None, progress=False):
    """Clean latents (B, C, H, W) for class `labels` (B,): noise from `generator`, then `steps` of `sampler`."""
    cfg = model.config
    x = torch.randn((len(labels), cfg.in_channels, cfg.input_size, cfg.input_size), generator=generator,
                    device=labels.device)  # (B, C, H, W)
    return guidance.sample(dit_denoiser(model, labels, cfg_scale, student, w), x, guidance.linear_schedule(),
                           guidance.spaced_timesteps(steps, spacing=SPACING[sampler]),
                           step=guidance.SAMPLERS[sampler], generator=generator, progress=progress,
                           prediction_type=prediction_type, clip_sample=clip_sample)


def prediction_options(weights):
    """prediction_type and clip_sample from the scheduler config beside the weights, where there is one.

    DiT-XL/2 predicts epsilon and is not clipped (the hub's config and the paper's sample_ddp.py); the
    tiny teacher predicts v and clips x_0 to its pixel range (tiny.SCHEDULER_CONFIG). Hub ids and .pt
    files have no local config: DiT's defaults.
    """
    path = Path(weights)
    for file in (path / "scheduler" / "scheduler_config.json", path.parent / "scheduler" / "scheduler_config.json"):
        if file.is_file():
            config = guidance.read_scheduler_config(file)
            clip = config.get("clip_sample", True)  # diffusers' default where a config leaves it out
            return {"prediction_type": config.get("prediction_type", "epsilon"),
                    "clip_sample": float(config.get("clip_sample_range", 1.0)) if clip else None}
    return {"prediction_type": "epsilon", "clip_sample": None}


@dataclass
class DiTChoice:
    """What sampling one kind of DiT needs beyond its weights."""
    weights: dict  # image side in pixels -> the official weights (hub id or folder)
    latent: bool  # denoises the SD autoencoder's latents (decoded at the end), else pixels
    classes: list  # default --classes
    steps: dict  # sampler -> default --steps


# The autoencoder for a .pt checkpoint, which comes without one: the one DiT's FIDs (sample_ddp.py
# --vae ema) and the official AGD code decode with.
ORIGINAL_VAE = "stabilityai/sd-vae-ft-ema"

MODELS = {
    # SD 2.1 and SDXL (--prompt) will sit beside these, with their own generate function.
    "dit": DiTChoice(weights={256: "facebook/DiT-XL-2-256", 512: "facebook/DiT-XL-2-512"}, latent=True,
                     classes=[207, 360, 387, 974, 88, 979, 417, 279],  # the classes of DiT's sample.py
                     steps={"ddpm": 250, "ddim": 50}),
    "tiny": DiTChoice(weights={28: str(ROOT / "assets" / "tiny-dit-mnist")}, latent=False,
                      classes=list(range(10)), steps={"ddpm": 25, "ddim": 25}),
}


def load_dit(args, choice):
    """The DiT, its autoencoder (None in pixel space), and the weights' name, checked against --image-size."""
    weights = args.weights
    if weights is None:
        size = args.image_size or min(choice.weights)
        if size not in choice.weights:
            raise InputError(f"--image-size {size}: the {args.model} weights come in "
                             f"{' and '.join(map(str, choice.weights))} px")
        weights = choice.weights[size]
        if weights.startswith("/") and not Path(weights).exists():
            raise InputError(f"{weights}: missing (the bundled teacher: python tiny.py teacher trains it)")
    model = dit.from_pretrained(weights, dtype=args.dtype, device=args.device)
    ae, factor = None, 1
    if choice.latent:
        ae = vae.from_pretrained(args.vae or (ORIGINAL_VAE if dit.find_original(weights) else weights),
                                 dtype=args.dtype, device=args.device)
        factor = ae.config.downsampling_factor
    side = model.config.input_size * factor
    if args.image_size is not None and args.image_size != side:
        raise InputError(f"{weights}: its images are {side} x {side} px, not {args.image_size}")
    return model, ae, weights


def generate_dit(args, choice):
    """Images (B, C, H, W) in [0, 1], one per class of --classes; seconds per step; what ran each step."""
    model, ae, weights = load_dit(args, choice)
    n = model.config.num_classes
    bad = [c for c in args.classes if not 0 <= c < n]
    if bad:
        raise InputError(f"class {bad[0]} is out of range: {weights} has classes 0-{n - 1} "
                         f"(and {n}, the null class that CFG uses)")
    student = adapters.load(model, args.adapters) if args.adapters else None
    labels = torch.tensor(args.classes, device=args.device)
    generator = torch.Generator(args.device).manual_seed(args.seed)
    start = time.perf_counter()
    z = sample_dit(model, labels, args.cfg, args.steps, args.sampler, generator, student, args.w,
                   **prediction_options(weights), progress=True)  # (B, C, h, w)
    z = z.cpu()  # waits for the device to finish
    seconds = (time.perf_counter() - start) / args.steps
    with torch.no_grad():
        images = ae.decode(z.to(args.device)).float().cpu() if ae is not None else z  # (B, C, H, W) about [-1, 1]
    how = (f"adapters at w={args.w:g}, one pass" if student is not None else
           f"CFG at w={args.cfg:g}, conditional and null passes batched" if args.cfg != 1 else "no guidance, one pass")
    return (images / 2 + 0.5).clamp(0, 1), seconds, how


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


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Sample images with classifier-free guidance (two passes per step) "
                                "or with AGD adapters (one pass per step); write a PNG grid.")
    p.add_argument("--model", choices=list(MODELS), default="dit",
                   help="dit: DiT-XL/2 (ImageNet classes); tiny: the bundled MNIST teacher (digits 0-9)")
    p.add_argument("--weights", help="hub id, folder in the hub's layout, or a facebookresearch/DiT .pt checkpoint "
                   "(default: the official weights for --image-size)")
    p.add_argument("--vae", help="autoencoder, hub id or folder (default: the weights' vae/, or "
                   f"{ORIGINAL_VAE} for a .pt)")
    p.add_argument("--image-size", type=int, help="image side in px: picks the official weights (DiT: 256 or 512; "
                   "default 256), or is checked against --weights")
    p.add_argument("--classes", type=int, nargs="+", help="class ids, one image each (default: DiT's sample.py "
                   "classes; tiny: 0-9)")
    p.add_argument("--cfg", type=float, help="CFG scale w; 1 is no guidance (default 4.0)")
    p.add_argument("--adapters", help="AGD adapters file: sample in one pass per step at scale --w, instead of CFG")
    p.add_argument("--w", type=float, help="the guidance scale asked of the adapters (default 4.0)")
    p.add_argument("--sampler", choices=list(guidance.SAMPLERS), default="ddpm",
                   help="ddpm: learned variance, IDDPM respacing (the DiT paper); ddim: eta 0, leading spacing")
    p.add_argument("--steps", type=int, help="sampler steps (default: dit 250 ddpm, 50 ddim; tiny 25)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="of the model weights; samples stay float32 between steps")
    p.add_argument("--out", default="samples.png", help="the PNG grid to write")
    args = p.parse_args(argv)
    choice = MODELS[args.model]
    if args.adapters is not None and args.cfg is not None:
        p.error("--cfg is the scale of CFG; with --adapters give the scale as --w")
    if args.adapters is None and args.w is not None:
        p.error("--w is the scale asked of --adapters; without them give the CFG scale as --cfg")
    args.cfg = None if args.adapters else 4.0 if args.cfg is None else args.cfg
    args.w = (4.0 if args.w is None else args.w) if args.adapters else None
    args.classes = args.classes or choice.classes
    args.steps = choice.steps[args.sampler] if args.steps is None else args.steps
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


def main(args):
    images, seconds, how = generate_dit(args, MODELS[args.model])
    save_grid(images, args.out)
    print(f"{seconds:.3f} s/step ({args.sampler}, {args.steps} steps, {len(images)} images, {how}) -> {args.out}")


if __name__ == "__main__":
    args = parse_args()
    try:
        main(args)
    except (InputError, checkpoint.CheckpointError) as e:
        sys.exit(f"error: {e}")
