"""The model families agd knows, in one table: their weights, how each is loaded, conditioned and
sampled, where its adapters sit, and its defaults for training and sampling.

    base = families.load("sdxl", dtype=torch.bfloat16, device="cuda")   # or weights="my-finetune"
    cond, null = base.encode(["a red fox"]), base.null(1)
    x0 = guidance.sample(guidance.guided(base.model, 7.5, cond, null), noise, base.scheduler,
                         base.scheduler.timesteps(50))

train_agd.py, sample.py, the benches and the notebooks read FAMILIES; no second copy of a hub id.
A family conditions on a class (DiT: its null class is `num_classes`, the row label dropout
trained) or on a prompt (SD: the pipeline's null, the empty prompt for SD 2.1, zeros for SDXL).
"""

from dataclasses import dataclass, field
from pathlib import Path

import torch

import adapters
import dit
import guidance
import unet

ROOT = Path(__file__).resolve().parent
ORIGINAL_VAE = "stabilityai/sd-vae-ft-ema"  # what DiT's FIDs (sample_ddp.py --vae ema) decode a .pt's latents with

# -----------------------------------------------------------------------------
# where adapters sit: the paper's placement, and the modulation adapters of adapters.py


def dit_sites(model, modulation=False):
    """Every block's self-attention (tokens in and out at the width D); with `modulation`, every adaLN
    modulation too: (B, D) in, each block's 6 D (shift, scale, gate of attention and MLP), the final layer's 2 D."""
    D, depth = model.config.hidden_size, model.config.depth
    sites = [adapters.Site(f"blocks.{i}.attn", "tokens", D, D) for i in range(depth)]
    if modulation:
        sites += [adapters.Site(f"blocks.{i}.adaLN_modulation", "vector", D, 6 * D) for i in range(depth)]
        sites += [adapters.Site("final_layer.adaLN_modulation", "vector", D, 2 * D)]
    return sites


def unet_sites(model, modulation=False):
    """Every transformer block's cross-attention attn2, down, mid and up, at its level's width."""
    if modulation:
        raise ValueError("modulation adapters are for DiTs (adaLN); a UNet takes its adapters beside attn2")
    return [adapters.Site(f"{name}.attn2", "tokens", m.attn2.to_q.in_features, m.attn2.to_out[0].out_features)
            for name, m in model.named_modules() if isinstance(m, unet.TransformerBlock)]


SITES = {dit.DiT: dit_sites, unet.UNet: unet_sites}


def sites(model, modulation=False):
    """The adapter sites of a model, by its class."""
    if type(model) not in SITES:
        raise ValueError(f"no adapter placement is declared for {type(model).__name__} (families.SITES: "
                         f"{', '.join(c.__name__ for c in SITES)})")
    return SITES[type(model)](model, modulation)


# -----------------------------------------------------------------------------
# a loaded base model


@dataclass
class Base:
    """A base model loaded with what sampling and collecting from it need."""
    family: "Family"
    weights: str
    model: torch.nn.Module
    scheduler: guidance.Scheduler
    shape: tuple  # (C, H, W) of the denoiser's input
    encode: callable  # conditions (class ids (B,), or B prompts) -> the model's cond dict
    null: callable  # (n, negative=None) -> the cond dict CFG subtracts: the null condition, or a negative one
    vae: torch.nn.Module = None  # the autoencoder of a latent model, when asked for
    prompt_encoder: torch.nn.Module = None  # SD's
    cfg_channels: int = None  # the output channels CFG guides: all (None), or DiT's own code's 3 of 4

    @property
    def out_channels(self):
        return self.model.config.out_channels

    def adapter_options(self, use_class=False, use_prompt=False, use_negative=False, **options):
        """AdapterConfig options for this model: `use_class` / `use_prompt` become their widths, and
        `use_negative` the width of the negative condition the adapters then read (a class or a prompt)."""
        c = self.model.config
        if use_class:
            options["num_classes"] = c.num_classes + 1  # with the null class
        if use_prompt:
            options["prompt_dim"] = c.cross_attention_dim
        if use_negative and self.family.conditioning == "class":
            options["negative_classes"] = c.num_classes + 1  # the null class: no negative
        elif use_negative:
            options["negative_prompt_dim"] = c.cross_attention_dim
        return options

    def lora_models(self):
        """The models a LoRA file may change, under the names of diffusers' pipelines that its keys
        begin with (lora.apply's `models`): the UNet or the transformer, and the text towers (None: absent)."""
        models = {"unet" if isinstance(self.model, unet.UNet) else "transformer": self.model}
        for name in ("text_encoder", "text_encoder_2"):
            models[name] = getattr(self.prompt_encoder, name, None)
        return models


# -----------------------------------------------------------------------------
# DiT: class-conditional, on SD latents (DiT-XL/2) or on pixels (the tiny teacher)

DIT_SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)


def dit_prediction(weights):
    """prediction_type and clip_sample of the scheduler config beside a DiT's weights, if any.

    Looks in `weights`/scheduler/ and in its parent's (weights may name the transformer/ subfolder).
    DiT-XL/2 predicts epsilon unclipped (the hub's config, the paper's sample_ddp.py); the tiny
    teacher predicts v and clips x_0 to its pixel range. Hub ids and .pt files: DiT-XL/2's.
    """
    path = Path(weights)
    for file in (path / "scheduler" / "scheduler_config.json", path.parent / "scheduler" / "scheduler_config.json"):
        if file.is_file():
            config = guidance.read_scheduler_config(file)
            return {"prediction_type": config.get("prediction_type", "epsilon"),
                    "clip_sample": config.get("clip_sample", True),  # diffusers' default where a config leaves it out
                    "clip_sample_range": float(config.get("clip_sample_range", 1.0))}
    return {"prediction_type": "epsilon", "clip_sample": False}


def dit_scheduler(weights, sampler="ddpm"):
    """How a DiT samples, the one place it is decided: "ddpm" as the paper does (facebookresearch/DiT
    sample_ddp.py: DDPM with the learned variance over IDDPM-respaced steps), "ddim" (eta 0) at
    diffusers' "leading" spacing, as DiTPipeline runs the hub's scheduler config."""
    config = {**DIT_SCHEDULE, **dit_prediction(weights)}
    if sampler == "ddpm":
        config.update(_class_name="DDPMScheduler", variance_type="learned_range", timestep_spacing="iddpm")
    elif sampler == "ddim":
        config.update(_class_name="DDIMScheduler", timestep_spacing="leading", set_alpha_to_one=True)
    else:
        raise ValueError(f"unknown DiT sampler {sampler!r} (ddpm or ddim)")
    return guidance.scheduler_from_config(config)


def load_dit(family, weights, dtype=None, device=None, sampler="ddpm", with_vae=False, vae_weights=None,
             cfg_channels=None, **_):
    """The DiT and how it samples. cfg_channels=3: CFG guides the first 3 of the 4 latent channels, as
    facebookresearch/DiT's forward_with_cfg does "for exact reproducibility reasons", the arithmetic
    behind its published FID-50K of 2.27; the default guides all of them, as diffusers' DiTPipeline."""
    model = dit.from_pretrained(weights, dtype=dtype, device=device)
    if cfg_channels is not None and not 1 <= cfg_channels <= model.config.in_channels:
        raise ValueError(f"cfg_channels {cfg_channels}: {weights} has {model.config.in_channels} channels")
    num_classes = model.config.num_classes
    ae = None
    if with_vae and family.latent:
        import vae

        default = ORIGINAL_VAE if dit.find_original(weights) else weights  # a .pt comes without an autoencoder
        ae = vae.from_pretrained(vae_weights or default, dtype=dtype, device=device)

    def encode(labels):
        return {"y": torch.as_tensor(labels, device=device)}

    def null(n, negative=None):  # the null class, or a negative class per sample
        y = torch.full((n,), num_classes, dtype=torch.long) if negative is None else torch.as_tensor(negative)
        return {"y": y.to(device).expand(n)}

    c = model.config
    return Base(family, str(weights), model, dit_scheduler(weights, sampler), (c.in_channels, c.input_size, c.input_size),
                encode, null, vae=ae, cfg_channels=cfg_channels)


# -----------------------------------------------------------------------------
# Stable Diffusion 2.1 and XL: text-conditional on SD latents, sampled as their scheduler config says

SD_FACTOR = 8  # the SD autoencoders' downsampling factor, used where the autoencoder is not loaded


def load_sd(family, weights, dtype=None, device=None, height=None, width=None, with_vae=False, vae_weights=None,
            **_):
    """The UNet, its prompt encoder and the repo's scheduler; the latent shape at height x width pixels
    (default: the UNet's native size). SDXL conditions on that size."""
    import prompts

    ae, factor = None, SD_FACTOR
    if with_vae:  # first: a size it cannot make is refused before the large models load
        import vae

        ae = vae.from_pretrained(vae_weights or weights, dtype=dtype, device=device)
        factor = ae.config.downsampling_factor
    for name, side in (("height", height), ("width", width)):
        if side is not None and side % factor:
            raise ValueError(f"{name} {side}: not a multiple of {factor}, the autoencoder's downsampling factor")
    model = unet.from_pretrained(weights, dtype=dtype, device=device)
    native = model.config.sample_size
    if native is None and None in (height, width):
        raise ValueError(f"{weights}: its unet/config.json gives no sample_size; give the height and width")
    height, width = height or native * factor, width or native * factor
    encoder = prompts.PromptEncoder.from_pretrained(weights, dtype=dtype, device=device)

    def encode(batch):
        return encoder(list(batch), height=height, width=width)

    def null(n, negative=None):  # the pipeline's null condition, or a negative prompt
        return encoder.null(n, height=height, width=width, negative_prompt=negative)

    return Base(family, str(weights), model, guidance.scheduler_from_config(weights),
                (model.config.in_channels, height // factor, width // factor), encode, null, vae=ae,
                prompt_encoder=encoder)


# -----------------------------------------------------------------------------
# the table


@dataclass
class Family:
    """One kind of base model: what loading it takes, and the defaults of the CLIs for it."""
    name: str
    help: str  # one line for --help
    weights: str  # the official weights: a hub id, or the bundled folder
    conditioning: str  # "class" or "prompt"
    loader: callable  # (family, weights, dtype, device, **options) -> Base
    latent: bool = True  # denoises an autoencoder's latents (decoded at the end), else pixels
    sizes: dict = field(default_factory=dict)  # DiT: image side in pixels -> its official weights
    sample: dict = field(default_factory=dict)  # sample.py's defaults
    train: dict = field(default_factory=dict)  # train_agd.py's defaults (adapter options among them)

    def load(self, weights=None, dtype=None, device=None, **options):
        """The Base from `weights` (default: the official ones)."""
        return self.loader(self, weights or self.weights, dtype=dtype, device=device, **options)


# The official adapters' options where a family says nothing else: w alone, one head, the paper's MSE.
OFFICIAL_ADAPTERS = dict(num_heads=1, use_timestep=False, use_class=False, use_prompt=False, zero_at_w1=False,
                         modulation=False, loss="mse")

FAMILIES = {
    # tiny: a short run with a high learning rate; the adapters also see t and the class, scale their
    # output by (w - 1), sit on the adaLN modulations too, and learn the guidance direction at every w
    # alike (11 % of the base; README's tiny-world section says what each of these bought)
    "tiny": Family(
        "tiny", "the bundled MNIST DiT teacher (digits 0-9; CPU, minutes)", str(ROOT / "assets" / "tiny-dit-mnist"),
        "class", load_dit, latent=False,
        sample=dict(classes=list(range(10)), steps={"ddpm": 25, "ddim": 25}, cfg=4.0),
        train=dict(trajectories=1000, steps=25, train_steps=1500, batch_size=64, lr=5e-3, hidden_dim=24,
                   num_heads=4, mlp_ratio=1.0, use_timestep=True, use_class=True, zero_at_w1=True, modulation=True,
                   loss="guidance", w_min=1.0, w_max=6.0)),
    "dit": Family(
        "dit", "DiT-XL/2 (ImageNet classes)", "facebook/DiT-XL-2-256", "class", load_dit,
        sizes={256: "facebook/DiT-XL-2-256", 512: "facebook/DiT-XL-2-512"},
        sample=dict(classes=[207, 360, 387, 974, 88, 979, 417, 279],  # the classes of DiT's sample.py
                    steps={"ddpm": 250, "ddim": 50}, cfg=4.0),  # the paper's DiT-XL/2 samples
        train=dict(trajectories=4000, steps=250, keep_steps=50, train_steps=20000, batch_size=32, lr=1e-4,
                   hidden_dim=256, mlp_ratio=4.0, w_min=1.0, w_max=6.0, gradient_checkpointing=True)),
    # SD: 4 trajectories per prompt of the bundled file, 8 of 50 sampler steps stored; the official
    # adapters' width 320 and 5,000 steps; batch sizes for a 24 GB GPU with gradient checkpointing
    "sd21": Family(
        "sd21", "Stable Diffusion 2.1 (768 px, v-prediction)", "stabilityai/stable-diffusion-2-1", "prompt",
        load_sd, sample=dict(prompts=["a photo of an astronaut riding a horse on mars"], steps=50, cfg=7.5),
        train=dict(trajectories=500, steps=50, keep_steps=8, train_steps=5000, batch_size=32, lr=1e-4, hidden_dim=320,
                   mlp_ratio=4.0, w_min=1.0, w_max=12.0, collect_batch=16, gradient_checkpointing=True)),
    "sdxl": Family(
        "sdxl", "Stable Diffusion XL base 1.0 (1024 px)", "stabilityai/stable-diffusion-xl-base-1.0", "prompt",
        load_sd, sample=dict(prompts=["An astronaut riding a green horse"], steps=50, cfg=7.5),  # its model card's
        train=dict(trajectories=500, steps=50, keep_steps=8, train_steps=5000, batch_size=16, lr=1e-4, hidden_dim=320,
                   mlp_ratio=4.0, w_min=1.0, w_max=12.0, collect_batch=4, gradient_checkpointing=True)),
}


def load(name, weights=None, dtype=None, device=None, **options):
    """families.load("sdxl", ...): FAMILIES[name].load(...)."""
    return FAMILIES[name].load(weights, dtype=dtype, device=device, **options)
