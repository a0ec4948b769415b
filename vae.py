"""The KL-f8 autoencoders of Stable Diffusion (Rombach et al., "High-Resolution Image Synthesis with
Latent Diffusion Models", CVPR 2022): images <-> latents 8 times smaller per side, with 4 channels
(SD 1.x, 2.x, SDXL) or 16 (SD3 and SD3.5: Esser et al. 2024, sec. 5.2.1, more channels for more detail).

    ae = vae.from_pretrained("stabilityai/stable-diffusion-xl-base-1.0")   # its vae/ subfolder
    z = ae.encode(images)    # (B, 3, H, W) in [-1, 1] -> (B, 4, H/8, W/8): (z - shift_factor) * scaling_factor
    images = ae.decode(z)    # and back: about [-1, 1], not clamped

Latent convention: `encode` returns latents already shifted by `shift_factor` (SD3's; 0 before
it) and multiplied by `scaling_factor`, and `decode` expects them so; these are the latents the
diffusion models denoise. (The factors give the latents roughly zero mean and unit variance: LDM
paper, Sec. 4.3.2 and D.1.) diffusers' AutoencoderKL leaves them to its pipelines instead:
`(vae.encode(x).latent_dist.mode() - shift_factor) * scaling_factor` equals our `encode(x)`, and
`vae.decode(z / scaling_factor + shift_factor)` our `decode(z)`, as StableDiffusion3Pipeline decodes.

Attribute names are diffusers' AutoencoderKL keys, so its safetensors load as they are; the one
older naming of the attention weights that the SD 1.x / 2.x files still hold is renamed on load.

Letters in shape comments: B batch, C channels, H W image height width, h w latent height width
(H/f, W/f with f = 8, the downsampling factor), L latent channels, T = h*w positions.
"""

import re
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

import checkpoint

NORM_EPS = 1e-6  # of every GroupNorm, as the LDM autoencoder (diffusers passes eps=1e-6 throughout)
TILE_OVERLAP = 0.25  # tiled decode: neighbouring tiles share a quarter of their side (diffusers' choice)


# -----------------------------------------------------------------------------
# config


@dataclass
class VAEConfig:
    in_channels: int = 3  # RGB in
    out_channels: int = 3  # RGB out
    latent_channels: int = 4  # L
    block_out_channels: tuple = (128, 256, 512, 512)  # channels per resolution; f = 2^(levels - 1)
    layers_per_block: int = 2  # ResNet blocks per resolution (the decoder has one more)
    norm_num_groups: int = 32  # GroupNorm groups
    sample_size: int = 512  # the image side it was trained or fine-tuned at; tiles of this side
    #                         are diffusers' default in its tiled decode
    scaling_factor: float = 0.18215  # latents are multiplied by it (SD 1.x / 2.x); absent from
    #                                  those older config.json files, where this is diffusers' default
    shift_factor: float | None = None  # SD3: subtracted from the latents before the scaling; None: 0
    use_quant_conv: bool = True  # the 1x1 convolutions around the latents (below); SD3's autoencoder has none
    use_post_quant_conv: bool = True
    force_upcast: bool = True  # fp16 weights still compute in fp32; diffusers' default where
    #                            config.json does not say (SD 1.x / 2.x); SDXL's says true

    @property
    def downsampling_factor(self):
        return 2 ** (len(self.block_out_channels) - 1)


# -----------------------------------------------------------------------------
# blocks


class ResnetBlock(nn.Module):
    """Two GroupNorm-SiLU-conv layers plus a skip; no timestep input (the autoencoder has none)."""

    def __init__(self, cfg, in_channels, out_channels):
        super().__init__()
        self.norm1 = nn.GroupNorm(cfg.norm_num_groups, in_channels, eps=NORM_EPS)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(cfg.norm_num_groups, out_channels, eps=NORM_EPS)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        # where the width changes, a 1x1 convolution brings the skip to the new width
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))  # (B, Cin, H, W) -> (B, Cout, H, W)
        h = self.conv2(F.silu(self.norm2(h)))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


class Attention(nn.Module):
    """Single-head self-attention over all positions (of the lowest resolution), plus a skip."""

    def __init__(self, cfg, channels):
        super().__init__()
        self.group_norm = nn.GroupNorm(cfg.norm_num_groups, channels, eps=NORM_EPS)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        # a list so that the key reads to_out.0, as diffusers' (whose item 1 is a parameterless dropout)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x):
        B, C, h, w = x.shape
        a = self.group_norm(x).flatten(2).transpose(1, 2)  # (B, C, h, w) -> (B, T, C)
        q, k, v = (proj(a).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))  # (B, 1, T, C)
        a = F.scaled_dot_product_attention(q, k, v).squeeze(1)  # (B, T, C), softmax(q k^T / sqrt(C)) v
        a = self.to_out[0](a).transpose(1, 2).reshape(B, C, h, w)  # (B, T, C) -> (B, C, h, w)
        return x + a


class Downsample(nn.Module):
    """Halve the sides: a stride-2 3x3 convolution over the input padded by one zero row and column."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x):
        # Padding only at the bottom and right, as the LDM autoencoder (CompVis/latent-diffusion,
        # ldm/modules/diffusionmodules/model.py, Downsample) was trained; symmetric padding shifts it.
        x = F.pad(x, (0, 1, 0, 1))  # (B, C, H, W) -> (B, C, H+1, W+1)
        return self.conv(x)  # -> (B, C, H/2, W/2)


class Upsample(nn.Module):
    """Double the sides: nearest-neighbour upsampling, then a 3x3 convolution."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")  # (B, C, H, W) -> (B, C, 2H, 2W)
        return self.conv(x)


class DownEncoderBlock(nn.Module):
    """One resolution of the encoder: ResNet blocks, then (all but the last) a downsample."""

    def __init__(self, cfg, in_channels, out_channels, downsample):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(cfg, in_channels if j == 0 else out_channels, out_channels)
                                      for j in range(cfg.layers_per_block)])
        self.downsamplers = nn.ModuleList([Downsample(out_channels)] if downsample else [])

    def forward(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        for downsampler in self.downsamplers:
            x = downsampler(x)
        return x


class UpDecoderBlock(nn.Module):
    """One resolution of the decoder: one ResNet block more, then (all but the last) an upsample."""

    def __init__(self, cfg, in_channels, out_channels, upsample):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(cfg, in_channels if j == 0 else out_channels, out_channels)
                                      for j in range(cfg.layers_per_block + 1)])
        self.upsamplers = nn.ModuleList([Upsample(out_channels)] if upsample else [])

    def forward(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        for upsampler in self.upsamplers:
            x = upsampler(x)
        return x


class MidBlock(nn.Module):
    """ResNet, attention, ResNet at the lowest resolution: the one global look at the image."""

    def __init__(self, cfg, channels):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(cfg, channels, channels) for _ in range(2)])
        self.attentions = nn.ModuleList([Attention(cfg, channels)])

    def forward(self, x):
        x = self.resnets[0](x)
        x = self.attentions[0](x)
        return self.resnets[1](x)


# -----------------------------------------------------------------------------
# the autoencoder


class Encoder(nn.Module):
    """Image -> mean and log-variance of the diagonal Gaussian posterior over latents."""

    def __init__(self, cfg):
        super().__init__()
        ch = cfg.block_out_channels
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        last = len(ch) - 1
        self.down_blocks = nn.ModuleList([DownEncoderBlock(cfg, ch[max(i - 1, 0)], ch[i], downsample=i < last)
                                          for i in range(len(ch))])
        self.mid_block = MidBlock(cfg, ch[-1])
        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, ch[-1], eps=NORM_EPS)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x):
        x = self.conv_in(x)  # (B, 3, H, W) -> (B, C, H, W)
        for block in self.down_blocks:
            x = block(x)  # -> (B, C, h, w) after the last
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))  # (B, C, h, w) -> (B, 2L, h, w)


class Decoder(nn.Module):
    """Latents -> image: the encoder's resolutions in reverse."""

    def __init__(self, cfg):
        super().__init__()
        ch = cfg.block_out_channels[::-1]  # widest (lowest resolution) first
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(cfg, ch[0])
        last = len(ch) - 1
        self.up_blocks = nn.ModuleList([UpDecoderBlock(cfg, ch[max(i - 1, 0)], ch[i], upsample=i < last)
                                        for i in range(len(ch))])
        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, ch[-1], eps=NORM_EPS)
        self.conv_out = nn.Conv2d(ch[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z):
        x = self.conv_in(z)  # (B, L, h, w) -> (B, C, h, w)
        x = self.mid_block(x)
        for block in self.up_blocks:
            x = block(x)  # -> (B, C, H, W) after the last
        return self.conv_out(F.silu(self.conv_norm_out(x)))  # (B, C, H, W) -> (B, 3, H, W)


class AutoencoderKL(nn.Module):
    """The KL-regularized autoencoder: `encode` images to scaled latents, `decode` them back."""

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        # 1x1 convolutions on the posterior's moments and on the latents; the names are a leftover
        # of the VQ autoencoders (Esser et al. 2021) whose code the KL autoencoder shares. SD3's
        # has neither: an identity in their place, without weights.
        L = cfg.latent_channels
        self.quant_conv = nn.Conv2d(2 * L, 2 * L, 1) if cfg.use_quant_conv else nn.Identity()
        self.post_quant_conv = nn.Conv2d(L, L, 1) if cfg.use_post_quant_conv else nn.Identity()

    @property
    def scaling_factor(self):
        return self.config.scaling_factor

    @property
    def shift_factor(self):
        return self.config.shift_factor or 0.0

    @property
    def dtype(self):
        return self.decoder.conv_in.weight.dtype

    def _in_compute_dtype(self, *modules):
        """`modules` as functions, and the dtype they compute in: fp32 where force_upcast meets fp16 weights.

        SDXL's autoencoder overflows fp16 (activations beyond 65504 become inf, then NaN images), so its
        config.json asks for fp32; diffusers' pipelines cast the whole model up and back (`upcast_vae`).
        Here the modules run on fp32 copies of their weights for this call only: the model stays fp16.
        bf16 shares fp32's range and is left alone.
        """
        if not (self.config.force_upcast and self.dtype == torch.float16):
            return modules, self.dtype

        def in_fp32(module):
            weights = {name: p.float() for name, p in module.named_parameters()}
            return lambda x: torch.func.functional_call(module, weights, (x,))

        return [in_fp32(m) for m in modules], torch.float32

    def encode(self, x, generator=None, batch_size=None):
        """Images (B, 3, H, W) in [-1, 1] -> latents (B, L, h, w), less shift_factor, times scaling_factor.

        The posterior's mean, or with a `generator` a sample of it; `batch_size` encodes that many
        images at a time.
        """
        (encoder, quant_conv), dtype = self._in_compute_dtype(self.encoder, self.quant_conv)
        x = x.to(dtype)
        parts = x.split(batch_size or len(x))
        moments = torch.cat([quant_conv(encoder(part)) for part in parts])  # (B, 3, H, W) -> (B, 2L, h, w)
        mean, logvar = moments.chunk(2, dim=1)  # (B, L, h, w) each
        z = mean
        if generator is not None:
            # clamped as LDM's DiagonalGaussianDistribution; the noise is drawn on the generator's
            # device in one piece, so a seed gives the same latents as diffusers' latent_dist.sample
            std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
            noise = torch.randn(mean.shape, generator=generator, device=generator.device, dtype=mean.dtype)
            z = mean + std * noise.to(mean.device)
        return (z - self.shift_factor) * self.scaling_factor

    def decode(self, z, batch_size=None, tile_size=None):
        """Latents (B, L, h, w) as `encode` gives them -> images (B, 3, H, W), about [-1, 1] (not clamped).

        `batch_size` decodes that many latents at a time; `tile_size` (pixels, a multiple of 4f, e.g.
        config.sample_size as diffusers) decodes larger images in overlapping tiles whose seams are
        cross-faded: the decoder's activations are those of one tile; the images differ slightly
        from a whole decode's.
        """
        (post_quant_conv, decoder), dtype = self._in_compute_dtype(self.post_quant_conv, self.decoder)

        def decode_whole(z):
            return decoder(post_quant_conv(z))  # (B, L, h, w) -> (B, 3, H, W)

        f = self.config.downsampling_factor
        if tile_size is not None and (tile_size <= 0 or tile_size % (4 * f)):
            raise ValueError(f"tile_size {tile_size}: expected a positive multiple of {4 * f} pixels "
                             f"(4 x the downsampling factor, so that tiles overlap by exactly a quarter)")
        z = (z / self.scaling_factor + self.shift_factor).to(dtype)  # as StableDiffusion3Pipeline (0 before SD3)
        images = []
        for part in z.split(batch_size or len(z)):
            if tile_size is not None and max(part.shape[-2:]) > tile_size // f:
                images.append(self._decode_tiled(part, decode_whole, tile_size))
            else:
                images.append(decode_whole(part))
        return torch.cat(images)

    def _decode_tiled(self, z, decode_whole, tile_size):
        """Decode overlapping tiles row by row, each cross-faded from its upper and left neighbours.

        As diffusers' `AutoencoderKL.tiled_decode`, so the images are the same as diffusers'.
        """
        t = tile_size // self.config.downsampling_factor  # tile side in latents
        stride = int(t * (1 - TILE_OVERLAP))  # a tile starts every `stride` latents
        fade = int(tile_size * TILE_OVERLAP)  # pixels shared with the tile above or on the left
        keep = tile_size - fade  # pixels a tile contributes (from its top left): stride * f
        rows, above = [], None
        for i in range(0, z.shape[2], stride):
            row = []
            for j in range(0, z.shape[3], stride):
                tile = decode_whole(z[:, :, i:i + t, j:j + t])  # (B, 3, <= tile_size, <= tile_size)
                if above is not None:
                    tile = _cross_fade(above[len(row)], tile, fade, dim=2)
                if row:
                    tile = _cross_fade(row[-1], tile, fade, dim=3)
                row.append(tile)  # blended, so the next row and the next tile fade into the blended one
            rows.append(torch.cat([tile[:, :, :keep, :keep] for tile in row], dim=3))  # (B, 3, <= keep, W)
            above = row
        return torch.cat(rows, dim=2)  # (B, 3, H, W)


def _cross_fade(a, b, n, dim):
    """`b` with its first `n` rows (dim 2) or columns (dim 3) faded linearly in from the last `n` of `a`."""
    n = min(n, a.shape[dim], b.shape[dim])  # tiles at the bottom and right edges can be smaller
    w = torch.arange(n, dtype=torch.float64) / n  # weight of b: 0 at its edge, rising
    shape = (n, 1) if dim == 2 else (n,)
    w_a, w_b = (1 - w).view(shape).to(b), w.view(shape).to(b)
    head = a.narrow(dim, a.shape[dim] - n, n) * w_a + b.narrow(dim, 0, n) * w_b
    return torch.cat([head, b.narrow(dim, n, b.shape[dim] - n)], dim=dim)


# -----------------------------------------------------------------------------
# presets: the official autoencoders (their config.json files)


VAE_models = {
    # stabilityai/sd-vae-ft-ema and sd-vae-ft-mse: SD 1.x's autoencoder with a fine-tuned decoder
    "sd-vae-ft-ema": lambda: VAEConfig(sample_size=256),
    "sd-vae-ft-mse": lambda: VAEConfig(sample_size=256),
    # stabilityai/stable-diffusion-2-1, vae/: the same autoencoder
    "sd-2.1": lambda: VAEConfig(sample_size=768),
    # stabilityai/stable-diffusion-xl-base-1.0, vae/: retrained (batch 256, EMA weights), so its
    # latents have another scale; it overflows fp16, hence force_upcast
    "sdxl": lambda: VAEConfig(sample_size=1024, scaling_factor=0.13025, force_upcast=True),
    # stabilityai/stable-diffusion-3-medium-diffusers, vae/ (and SD3.5's, the same): 16 channels,
    # latents shifted then scaled, no 1x1 convolutions around them
    "sd3": lambda: VAEConfig(latent_channels=16, sample_size=1024, scaling_factor=1.5305, shift_factor=0.0609,
                             force_upcast=True, use_quant_conv=False, use_post_quant_conv=False),
}


# -----------------------------------------------------------------------------
# loading from the hub's diffusers layout

# config.json keys of diffusers' AutoencoderKL that this file does not make configurable, and the
# values the KL-f8 autoencoders have (keys newer than a file are absent from it: the same values)
_FIXED = {"act_fn": "silu", "latents_mean": None, "latents_std": None, "mid_block_add_attention": True}
_BLOCK_TYPES = {"down_block_types": "DownEncoderBlock2D", "up_block_types": "UpDecoderBlock2D"}


def config_from_diffusers(d, source="config.json"):
    """Our config from a diffusers AutoencoderKL config.json, refusing what this autoencoder is not."""
    if d.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise checkpoint.CheckpointError(f"{source}: _class_name is {d['_class_name']}, "
                                         f"expected AutoencoderKL")
    for key in ("block_out_channels", "layers_per_block"):  # diffusers' defaults there are a toy model
        if key not in d:
            raise checkpoint.CheckpointError(f"{source}: missing key {key}")
    ours = {f.name for f in fields(VAEConfig)}
    for key in d:
        if not key.startswith("_") and key not in ours | _FIXED.keys() | _BLOCK_TYPES.keys():
            raise checkpoint.CheckpointError(f"{source}: unknown key {key} (not an AutoencoderKL setting)")
    for key, value in _FIXED.items():
        if d.get(key, value) != value:
            raise checkpoint.CheckpointError(f"{source}: {key} is {d[key]!r}; "
                                             f"this autoencoder supports only {value!r}")
    cfg = VAEConfig(**{k: d[k] for k in ours if k in d})
    cfg.block_out_channels = tuple(cfg.block_out_channels)
    for key, block in _BLOCK_TYPES.items():
        expected = [block] * len(cfg.block_out_channels)
        if list(d.get(key, expected)) != expected:
            raise checkpoint.CheckpointError(f"{source}: {key} is {d[key]}, "
                                             f"expected {block} at each of {len(expected)} resolutions")
    return cfg


def config_to_diffusers(cfg):
    """The config.json that diffusers' AutoencoderKL reads for `cfg`."""
    n = len(cfg.block_out_channels)
    return {"_class_name": "AutoencoderKL", **{f.name: getattr(cfg, f.name) for f in fields(VAEConfig)},
            "block_out_channels": list(cfg.block_out_channels),
            **{key: [block] * n for key, block in _BLOCK_TYPES.items()}, **_FIXED}


# Files written by diffusers before its attention rewrite of 2023 (sd-vae-ft-ema / -mse, SD 2.1's
# vae/) name the mid-block attention query, key, value, proj_attn; diffusers renames them on load
# (ModelMixin._fix_state_dict_keys_on_load), and so do we.
_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_LEGACY_KEY = re.compile(r"^(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")


def rename_legacy_keys(tensors, source="state dict"):
    """`tensors` with the older attention names (query, key, value, proj_attn) renamed to to_q, ..."""
    out = {}
    for key, t in tensors.items():
        m = _LEGACY_KEY.match(key)
        new = f"{m[1]}.{_LEGACY_ATTENTION[m[2]]}.{m[3]}" if m else key
        if new in out or (new != key and new in tensors):
            raise checkpoint.CheckpointError(f"{source}: holds both {key} and {new}, the same weight")
        out[new] = t
    return out


def from_pretrained(path_or_repo_id, subfolder="vae", dtype=None, device=None):
    """The autoencoder from a hub id or local folder: a pipeline's (its `subfolder`) or a VAE's own."""
    folder = checkpoint.resolve(path_or_repo_id, subfolder)
    cfg = config_from_diffusers(checkpoint.read_config(folder), source=folder / "config.json")
    with torch.device("meta"):
        model = AutoencoderKL(cfg)
    files = checkpoint.weight_files(folder)
    tensors = rename_legacy_keys(checkpoint.read_tensors(files, dtype=dtype), source=files[0])
    checkpoint.load_into(model, tensors, source=files[0])
    return model.to(device=device).eval()
