"""The model families at full size with random weights, built on the device from the presets: no hub, no files.

    base = random_models.base("sdxl", "cuda", torch.bfloat16)             # a families.Base, text encoders too
    base = random_models.base("sdxl", "cpu", torch.float32, tiny=True)    # the same parts, tiny (dry runs)
    twin, call = random_models.diffusers_twin(base.model)                 # diffusers' model on the same weights

For benchmarks: what a step costs and holds depends on the architecture and the sizes, not on the
weights' values. Full size: unet.PRESETS, dit.DiT_models, vae.VAE_models and text_encoders.PRESETS,
with PyTorch's default initialization (the DiT's zero-inits drawn off zero, so that its output and
its adapters' are not trivially zero). Each Base is put together as families.load_sd / load_dit do
from files, with the hub repos' scheduler configs.
"""

import dataclasses
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import dit  # noqa: E402
import families  # noqa: E402
import guidance  # noqa: E402
import prompts  # noqa: E402
import text_encoders  # noqa: E402
import unet  # noqa: E402
import vae  # noqa: E402

# scheduler/scheduler_config.json of stabilityai/stable-diffusion-2-1 and stable-diffusion-xl-base-1.0:
# the keys that the samplers read (tests/tiny_pipelines.py holds the files whole)
SCHEDULERS = {
    "sd21": {"_class_name": "DDIMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
             "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1, "prediction_type": "v_prediction",
             "num_train_timesteps": 1000},
    "sdxl": {"_class_name": "EulerDiscreteScheduler", "beta_start": 0.00085, "beta_end": 0.012,
             "beta_schedule": "scaled_linear", "steps_offset": 1, "timestep_spacing": "leading",
             "prediction_type": "epsilon", "interpolation_type": "linear", "num_train_timesteps": 1000},
}
TOKENIZERS = ROOT / "assets" / "clip"  # the real CLIP tokenizers: SDXL's first pads with <|endoftext|>, the rest "!"
TINY_TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)

# -----------------------------------------------------------------------------
# configs: full size (the presets), and tiny ones with the same features for dry runs


def unet_config(name, tiny=False):
    """SDXL's or SD 2.1's UNet config: the preset, or a tiny one with its features."""
    if not tiny:
        return unet.PRESETS["sdxl" if name == "sdxl" else "sd2.1"]()
    if name == "sdxl":  # two levels, the second with 2 transformer layers; the text_time embedding
        return unet.UNetConfig(
            sample_size=16, block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
            transformer_layers_per_block=(1, 2), cross_attention_dim=32 + 48, use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 40)
    return unet.UNetConfig(sample_size=16, block_out_channels=(32, 64),
                           down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                           up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=(2, 4),
                           cross_attention_dim=32, use_linear_projection=True, upcast_attention=True,
                           prediction_type="v_prediction")


def dit_config(tiny=False):
    """DiT-XL/2 at 256 px as the hub's config runs it (freq_shift 1, norm_eps 1e-5: diffusers' layout), or tiny."""
    cfg = dit.DiT_models["DiT-XL/2"]() if not tiny else dit.DiTConfig(input_size=8, hidden_size=32, depth=2,
                                                                      num_heads=2, num_classes=10)
    cfg.freq_shift, cfg.norm_eps = 1, 1e-5
    return cfg


def tower_configs(name, tiny=False):
    """The CLIP text towers of SD 2.1 (one) or SDXL (two)."""
    if not tiny:
        names = ["ViT-L/14", "ViT-bigG/14"] if name == "sdxl" else ["ViT-H/14"]
        return [text_encoders.PRESETS[n]() for n in names]
    if name == "sdxl":  # widths 32 and 48 (context 80), the second projected to 40, as the UNet above takes
        return [text_encoders.TextConfig(**TINY_TOWER, projection_dim=32),
                text_encoders.TextConfig(**{**TINY_TOWER, "hidden_size": 48}, hidden_act="gelu", projection_dim=40,
                                         with_projection=True)]
    return [text_encoders.TextConfig(**TINY_TOWER, hidden_act="gelu", projection_dim=16)]


# -----------------------------------------------------------------------------
# models


def build(make, device, dtype):
    """make() built on `device` (its default initialization runs there), then cast to `dtype`, in eval mode."""
    with torch.device(device):
        model = make()
    return model.to(dtype=dtype).eval()


def random_dit(device, dtype, tiny=False):
    model = build(lambda: dit.DiT(dit_config(tiny)), device, dtype)
    with torch.no_grad():  # off the paper's zero-inits, or the output and the adapters' gradients are zero
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model


def prompt_encoder(name, device, dtype, tiny=False):
    """SD 2.1's or SDXL's PromptEncoder: the real tokenizers, random towers."""
    towers = [build(lambda c=c: text_encoders.TextEncoder(c), device, dtype).requires_grad_(False)
              for c in tower_configs(name, tiny)]
    if name == "sdxl":
        return prompts.PromptEncoder(text_encoders.Tokenizer.from_pretrained(TOKENIZERS / "tokenizer_pad_eot", None),
                                     towers[0],
                                     text_encoders.Tokenizer.from_pretrained(TOKENIZERS / "tokenizer_pad_bang", None),
                                     towers[1], force_zeros_for_empty_prompt=True)
    return prompts.PromptEncoder(text_encoders.Tokenizer.from_pretrained(TOKENIZERS / "tokenizer_pad_bang", None),
                                 towers[0])


def autoencoder(name, device, dtype, tiny=False):
    cfg = vae.VAE_models["sdxl" if name == "sdxl" else "sd-2.1"]()
    if tiny:
        cfg.block_out_channels, cfg.sample_size = (32, 64), 32  # two levels: 2x downsampling
    return build(lambda: vae.AutoencoderKL(cfg), device, dtype)


def base(name, device, dtype, tiny=False, text=True, with_vae=False):
    """A families.Base of random weights: "sdxl" at 1024 px, "sd21" at 768 px, "dit" (DiT-XL/2) at 256 px.

    `text`: the SD prompt encoder (without it, encode and null are None); `with_vae`: the autoencoder.
    """
    family = families.FAMILIES[name]
    if name == "dit":
        model = random_dit(device, dtype, tiny)
        c = model.config

        def encode(labels):
            return {"y": torch.as_tensor(labels, device=device)}

        def null(n, negative=None):  # the null class, as families.load_dit's
            return {"y": torch.full((n,), c.num_classes, dtype=torch.long, device=device)}

        return families.Base(family, "random", model, families.dit_scheduler("random"),
                             (c.in_channels, c.input_size, c.input_size), encode, null)
    model = build(lambda: unet.UNet(unet_config(name, tiny)), device, dtype)
    ae = autoencoder(name, device, dtype, tiny) if with_vae else None
    factor = 2 if tiny else families.SD_FACTOR
    side = model.config.sample_size * factor  # pixels
    encoder, encode, null = (prompt_encoder(name, device, dtype, tiny) if text else None), None, None
    if encoder is not None:
        def encode(batch):
            return encoder(list(batch), height=side, width=side)

        def null(n, negative=None):  # the pipeline's null condition, or a negative prompt
            return encoder.null(n, height=side, width=side, negative_prompt=negative)

    return families.Base(family, "random", model, guidance.scheduler_from_config(SCHEDULERS[name]),
                         (model.config.in_channels, side // factor, side // factor), encode, null, vae=ae,
                         prompt_encoder=encoder)


def adapter_options(name, model):
    """The adapters train_agd.py attaches to this family's model by default: OFFICIAL_ADAPTERS, then the family's."""
    import train_agd

    family = families.FAMILIES[name]
    defaults = {**families.OFFICIAL_ADAPTERS, **family.train}
    options = {k: defaults[k] for k in train_agd.ADAPTER_OPTIONS if k in defaults}  # use_negative: off
    return families.Base(family, "random", model, None, None, None, None).adapter_options(**options)


def inputs(base, batch, generator=None):
    """(x, t, cond, null) of a batch at the base's shape, t mid-schedule; random conditions of the right shapes."""
    model, device = base.model, next(base.model.parameters()).device
    dtype = next(model.parameters()).dtype
    x = torch.randn((batch, *base.shape), generator=generator, device=device).to(dtype)
    t = torch.full((batch,), 500, device=device)
    if isinstance(model, dit.DiT):
        cond = {"y": torch.arange(batch, device=device) % model.config.num_classes}
    else:
        c = model.config
        cond = {"context": torch.randn(batch, 77, c.cross_attention_dim, generator=generator, device=device).to(dtype)}
        if c.addition_embed_type == "text_time":
            side = 8.0 * base.shape[-1]  # original size, crop corner, target size: the pipelines' default
            pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
            cond.update(text_embeds=torch.randn(batch, pooled, generator=generator, device=device).to(dtype),
                        time_ids=torch.tensor([[side, side, 0, 0, side, side]] * batch, device=device, dtype=dtype))
    null = base.null(batch) if base.null is not None else \
        {k: v if k == "time_ids" else torch.zeros_like(v) for k, v in cond.items()}  # SDXL's zeros
    return x, t, cond, null


# -----------------------------------------------------------------------------
# diffusers' models on the same weights


def diffusers_twin(model):
    """(diffusers' model holding `model`'s weights, a function called as ours: call(x, t, **cond)).

    The UNet's tensors are shared (its keys are diffusers'); the DiT's are mapped by dit.to_diffusers.
    Raises ImportError where diffusers is missing (a test-only dependency).
    """
    from diffusers.utils import logging

    logging.set_verbosity_error()
    if isinstance(model, dit.DiT):
        from diffusers import DiTTransformer2DModel

        options = {k: v for k, v in dit.config_to_diffusers(model.config).items() if not k.startswith("_")}
        p = next(model.parameters())
        with torch.device(p.device):  # not on the meta device: its positions are a buffer outside the state dict
            twin = DiTTransformer2DModel(**options).to(p.dtype)
        twin.load_state_dict(dit.to_diffusers(model.state_dict(), model.config.depth))
        return twin.eval().requires_grad_(False), lambda x, t, y: twin(x, timestep=t, class_labels=y).sample
    from diffusers import UNet2DConditionModel

    from bench_unet import diffusers_options

    with torch.device("meta"):
        twin = UNet2DConditionModel(**diffusers_options(model.config))
    twin.load_state_dict(model.state_dict(), assign=True)

    def call(x, t, context, text_embeds=None, time_ids=None):
        added = None if text_embeds is None else {"text_embeds": text_embeds, "time_ids": time_ids}
        return twin(x, t, encoder_hidden_states=context, added_cond_kwargs=added).sample

    return twin.eval().requires_grad_(False), call


def twin_sites(model, sites):
    """Our adapter sites, named as in diffusers' twin of `model` (the UNet's names are the same)."""
    if not isinstance(model, dit.DiT):
        return sites
    # our DiT's block i `blocks.i.attn` is diffusers' `transformer_blocks.i.attn1`; both gate its output
    # by the block's gate_msa, so an adapter added there acts the same
    return [dataclasses.replace(s, name=s.name.replace("blocks.", "transformer_blocks.").replace(".attn", ".attn1"))
            for s in sites]
