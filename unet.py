"""The conditional UNet of Stable Diffusion 1.x, 2.x and SDXL, whole, in one file.

Latent diffusion (Rombach et al. 2022, arXiv 2112.10752): a UNet over VAE latents whose resolution
levels hold ResNet blocks (Ho et al. 2020) and, from some level on, transformers that cross-attend
to the text tokens. SDXL (Podell et al. 2023, arXiv 2307.01952) is the same network with more
transformer blocks at low resolution and an extra "text_time" embedding of the pooled text and the
image size and crop ("micro-conditioning", their section 2.2).

Attribute names are the keys of diffusers' UNet2DConditionModel, so the hub's `unet/` safetensors
load strictly, one to one. The config is the hub's `unet/config.json`, read with diffusers' names.

    model = unet.from_pretrained("stabilityai/stable-diffusion-xl-base-1.0", dtype=torch.bfloat16)
    out = model(x, t, context=tokens, text_embeds=pooled, time_ids=sizes)   # eps or v

Shapes: B batch, C channels, H x W latent grid, T = H * W tokens, L text tokens, D text width,
E time-embedding width, nh heads, hd head width.
"""

import dataclasses
import json
import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

import checkpoint


# -----------------------------------------------------------------------------
# config


@dataclass
class UNetConfig:
    """The hub's unet/config.json, in diffusers' names; defaults are diffusers' (a file omits keys at their default)."""

    in_channels: int = 4                  # latent channels in (the KL-f8 VAE's 4)
    out_channels: int = 4                 # channels out: the predicted epsilon or v
    sample_size: int | None = None        # latent side at the native resolution (96 for 768 px); informational
    block_out_channels: tuple = (320, 640, 1280, 1280)  # channels of each resolution level, highest first
    down_block_types: tuple = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
    up_block_types: tuple = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
    layers_per_block: int | tuple = 2     # resnets per level going down; the way up has one more per level
    transformer_layers_per_block: int | tuple = 1  # transformer blocks in each attention, per level (SDXL: 1, 2, 10)
    attention_head_dim: int | tuple = 8   # quirk: the number of HEADS per level, not their width (diffusers #2011)
    cross_attention_dim: int = 1280       # D, the width of the text tokens (SD 1: 768, SD 2: 1024, SDXL: 2048)
    use_linear_projection: bool = False   # tokens in and out through Linear (SD 2, SDXL) or 1x1 Conv (SD 1)
    upcast_attention: bool = False        # fp32 softmax (SD 2.1 768); SDPA kernels already keep it in fp32
    norm_num_groups: int = 32             # GroupNorm groups everywhere
    norm_eps: float = 1e-5                # GroupNorm eps of the resnets and the output
    flip_sin_to_cos: bool = True          # timestep features ordered [cos, sin], as LDM's weights expect
    freq_shift: int = 0                   # timestep frequencies exp(-ln(1e4) * i / (half - freq_shift))
    addition_embed_type: str | None = None  # "text_time": SDXL's pooled-text + size/crop embedding
    addition_time_embed_dim: int | None = None  # SDXL: 256 sinusoidal features per time id (6 ids)
    projection_class_embeddings_input_dim: int | None = None  # SDXL: 1280 pooled text + 6 * 256 = 2816
    prediction_type: str = "epsilon"      # not in unet/config.json but in scheduler/: "epsilon" or "v_prediction"

    def __post_init__(self):
        for f in fields(self):  # JSON gives lists; tuples keep configs comparable
            if isinstance(getattr(self, f.name), list):
                setattr(self, f.name, tuple(getattr(self, f.name)))
        self.upcast_attention = bool(self.upcast_attention)  # SDXL's config.json says null
        n = len(self.block_out_channels)
        for name in ("down_block_types", "up_block_types", "layers_per_block", "transformer_layers_per_block",
                     "attention_head_dim"):
            value = getattr(self, name)
            if isinstance(value, tuple) and len(value) != n:
                raise ValueError(f"{name}: expected {n} entries (one per level of block_out_channels), got {value}")
        for name, allowed in (("down_block_types", ("CrossAttnDownBlock2D", "DownBlock2D")),
                              ("up_block_types", ("CrossAttnUpBlock2D", "UpBlock2D"))):
            for kind in getattr(self, name):
                if kind not in allowed:
                    raise ValueError(f"{name}: {kind!r} is not supported (expected one of {allowed})")
        heads = per_level(self.attention_head_dim, n)
        for i, (channels, nh) in enumerate(zip(self.block_out_channels, heads)):
            attends = self.down_block_types[i] == "CrossAttnDownBlock2D" or i == n - 1  # the mid block attends
            if attends and channels % nh:
                raise ValueError(f"attention_head_dim: {nh} heads do not divide the {channels} channels of level {i}")
        if self.addition_embed_type not in (None, "text_time"):
            raise ValueError(f"addition_embed_type: {self.addition_embed_type!r} is not supported "
                             "(None or 'text_time')")
        sizes = self.addition_time_embed_dim, self.projection_class_embeddings_input_dim
        if self.addition_embed_type and not all(sizes):
            raise ValueError("addition_embed_type 'text_time' needs addition_time_embed_dim and "
                             "projection_class_embeddings_input_dim")
        if not isinstance(self.cross_attention_dim, int):
            raise ValueError(f"cross_attention_dim: expected one width for all levels, got {self.cross_attention_dim}")
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type: {self.prediction_type!r} (expected 'epsilon' or 'v_prediction')")

    @classmethod
    def from_dict(cls, d):
        """Config from a config.json dict; diffusers' other keys must hold values that change nothing here."""
        known = {f.name for f in fields(cls)}
        for key, value in d.items():
            if key in known or key.startswith("_"):  # _class_name, _diffusers_version: bookkeeping
                continue
            if key not in INERT:
                raise ValueError(f"{key}: not a UNet2DConditionModel option this file knows")
            if value != INERT[key]:
                raise ValueError(f"{key}={value!r} is not supported (this UNet implements {key}={INERT[key]!r})")
        return cls(**{k: v for k, v in d.items() if k in known})


# diffusers' UNet2DConditionModel options that SD 1.x, 2.x and SDXL leave at these values, which
# this file hard-wires (the SDXL config.json spells most of them out).
INERT = dict(
    center_input_sample=False, mid_block_type="UNetMidBlock2DCrossAttn", only_cross_attention=False,
    mid_block_only_cross_attention=None, dual_cross_attention=False, downsample_padding=1,
    mid_block_scale_factor=1, resnet_out_scale_factor=1.0, resnet_time_scale_shift="default",
    resnet_skip_time_act=False, dropout=0.0, act_fn="silu", num_attention_heads=None,
    reverse_transformer_layers_per_block=None, encoder_hid_dim=None, encoder_hid_dim_type=None,
    class_embed_type=None, num_class_embeds=None, class_embeddings_concat=False,
    time_embedding_type="positional", time_embedding_dim=None, time_embedding_act_fn=None,
    timestep_post_act=None, time_cond_proj_dim=None, conv_in_kernel=3, conv_out_kernel=3,
    attention_type="default", cross_attention_norm=None, addition_embed_type_num_heads=64,
)


def per_level(value, n):
    """An option given as one int for all levels, or one per level, as a tuple of n."""
    return (value,) * n if isinstance(value, int) else tuple(value)


# -----------------------------------------------------------------------------
# helpers


def timestep_embedding(t, dim, flip_sin_to_cos=True, shift=0, max_period=10000):
    """Sinusoidal features [N, dim] of N timesteps, in fp32 (Vaswani et al. 2017; DDPM's time embedding)."""
    half = dim // 2
    # the same float32 operations, in the same order, as diffusers' get_timestep_embedding: t
    # reaches 999, so a last-bit difference in a frequency would show in the features
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - shift))
    angles = t.float()[:, None] * freqs[None]                              # [N, half]
    sin, cos = torch.sin(angles), torch.cos(angles)
    return torch.cat([cos, sin] if flip_sin_to_cos else [sin, cos], dim=-1)  # [N, dim]


def run(module, checkpointed, *args):
    """module(*args); checkpointed, its activations are recomputed in backward (Chen et al. 2016, arXiv 1604.06174)."""
    if checkpointed:
        return torch.utils.checkpoint.checkpoint(module, *args, use_reentrant=False)
    return module(*args)


# -----------------------------------------------------------------------------
# blocks, smallest first


class TimestepEmbedding(nn.Module):
    """Two-layer MLP from sinusoidal (or other) features to the E-wide embedding that every resnet adds."""

    def __init__(self, in_features, dim):
        super().__init__()
        self.linear_1 = nn.Linear(in_features, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class ResnetBlock(nn.Module):
    """Two 3x3 convs with the time embedding added between them, around a residual (DDPM, Ho et al. 2020)."""

    def __init__(self, in_channels, out_channels, emb_dim, groups, eps):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(emb_dim, out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        # a 1x1 conv matches the channels of the residual when they change
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))                        # [B, C, H, W]
        h = h + self.time_emb_proj(F.silu(emb))[:, :, None, None]    # [B, E] -> [B, C, 1, 1], broadcast
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Downsample(nn.Module):
    """Halve the grid with a stride-2 3x3 conv."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)                                          # [B, C, H, W] -> [B, C, H/2, W/2]


class Upsample(nn.Module):
    """Double the grid (nearest neighbour) to the skip's size, then a 3x3 conv."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, size):
        # `size` is the grid of the skip about to be joined: 2x, except after an odd side was halved
        return self.conv(F.interpolate(x, size=size, mode="nearest"))  # [B, C, H, W] -> [B, C, 2H, 2W]


class Attention(nn.Module):
    """Multi-head attention of x's tokens to context's (to x's own when context is None), via SDPA."""

    def __init__(self, dim, heads, context_dim=None):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim or dim, dim, bias=False)
        # a list only for diffusers' key to_out.0; its to_out.1 is a dropout, without weights
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])

    def forward(self, x, context=None):
        context = x if context is None else context
        (B, T, C), L, nh = x.shape, context.shape[1], self.heads
        q = self.to_q(x).view(B, T, nh, C // nh).transpose(1, 2)           # [B, nh, T, hd]
        k = self.to_k(context).view(B, L, nh, C // nh).transpose(1, 2)     # [B, nh, L, hd]
        v = self.to_v(context).view(B, L, nh, C // nh).transpose(1, 2)     # [B, nh, L, hd]
        out = F.scaled_dot_product_attention(q, k, v)                      # [B, nh, T, hd], scale hd^-0.5
        return self.to_out[0](out.transpose(1, 2).reshape(B, T, C))        # [B, T, C]


class GEGLU(nn.Module):
    """A linear layer into a GELU-gated linear unit (Shazeer 2020, arXiv 2002.05202)."""

    def __init__(self, dim, inner_dim):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner_dim)

    def forward(self, x):
        x, gate = self.proj(x).chunk(2, dim=-1)                            # [B, T, 2 * 4C] -> 2 x [B, T, 4C]
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    """The transformer's MLP: GEGLU to 4x the width, then back."""

    def __init__(self, dim, mult=4):
        super().__init__()
        # indices are diffusers' keys net.0 and net.2; its net.1 is a dropout, without weights
        self.net = nn.ModuleList([GEGLU(dim, mult * dim), nn.Identity(), nn.Linear(mult * dim, dim)])

    def forward(self, x):
        return self.net[2](self.net[0](x))                                 # [B, T, C]


class TransformerBlock(nn.Module):
    """Pre-norm transformer block: self-attention, cross-attention to the text, MLP; each residual."""

    def __init__(self, dim, heads, context_dim):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, context_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x, context):
        x = x + self.attn1(self.norm1(x))                                  # [B, T, C]
        # adapters hook attn2 by name: its first argument is the normed stream, its output is added to it
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """The grid as tokens through transformer blocks and back, plus a residual (diffusers' Transformer2DModel)."""

    def __init__(self, channels, heads, depth, context_dim, linear_projection, groups):
        super().__init__()
        self.linear_projection = linear_projection
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)  # 1e-6, not norm_eps: as in LDM and diffusers
        # the same maps either way: SD 1 stored them as 1x1 convs on the grid, SD 2 and SDXL as linears on tokens
        if linear_projection:
            self.proj_in, self.proj_out = nn.Linear(channels, channels), nn.Linear(channels, channels)
        else:
            self.proj_in, self.proj_out = nn.Conv2d(channels, channels, 1), nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList([TransformerBlock(channels, heads, context_dim) for _ in range(depth)])

    def forward(self, x, context, checkpointed=False):
        B, C, H, W = x.shape
        h = self.norm(x)
        if not self.linear_projection:
            h = self.proj_in(h)
        h = h.permute(0, 2, 3, 1).reshape(B, H * W, C)                     # [B, C, H, W] -> [B, T, C]
        if self.linear_projection:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = run(block, checkpointed, h, context)
        if self.linear_projection:
            h = self.proj_out(h)
        h = h.reshape(B, H, W, C).permute(0, 3, 1, 2)                      # [B, T, C] -> [B, C, H, W]
        if not self.linear_projection:
            h = self.proj_out(h.contiguous())
        return x + h  # x first: the sum takes x's contiguous layout, which the convs after it prefer


# The three kinds of level only hold modules, under diffusers' key names. UNet.__init__ builds them
# and UNet.forward runs them, because the skip connections that tie the levels together are clearest
# in one place.


class DownBlock(nn.Module):
    """One level down: resnets, each followed by a transformer where the level attends, then a stride-2 conv."""

    def __init__(self, resnets, attentions, downsample=None):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(attentions)  # empty in diffusers' DownBlock2D
        self.downsamplers = nn.ModuleList([downsample] if downsample is not None else [])


class MidBlock(nn.Module):
    """The lowest level: resnet, transformer, resnet."""

    def __init__(self, resnets, attentions):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(attentions)


class UpBlock(nn.Module):
    """One level up: resnets, each joining a skip and followed by a transformer where the level attends, then 2x."""

    def __init__(self, resnets, attentions, upsample=None):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(attentions)  # empty in diffusers' UpBlock2D
        self.upsamplers = nn.ModuleList([upsample] if upsample is not None else [])


# -----------------------------------------------------------------------------
# the model


class UNet(nn.Module):
    """The conditional UNet: x_t, t, text tokens (and SDXL's pooled text and size ids) -> epsilon or v."""

    def __init__(self, config):
        super().__init__()
        self.config = c = config
        n, ch = len(c.block_out_channels), c.block_out_channels
        n_resnets = per_level(c.layers_per_block, n)
        heads = per_level(c.attention_head_dim, n)
        depth = per_level(c.transformer_layers_per_block, n)
        emb_dim = 4 * ch[0]  # E

        def resnet(in_channels, channels):
            return ResnetBlock(in_channels, channels, emb_dim, c.norm_num_groups, c.norm_eps)

        def transformer(i):  # for level i
            return SpatialTransformer(ch[i], heads[i], depth[i], c.cross_attention_dim, c.use_linear_projection,
                                      c.norm_num_groups)

        self.conv_in = nn.Conv2d(c.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], emb_dim)
        if c.addition_embed_type == "text_time":
            self.add_embedding = TimestepEmbedding(c.projection_class_embeddings_input_dim, emb_dim)

        # down: level i goes from ch[i - 1] to ch[i] channels; every level but the last halves the grid
        self.down_blocks = nn.ModuleList()
        for i in range(n):
            attends = c.down_block_types[i] == "CrossAttnDownBlock2D"
            self.down_blocks.append(DownBlock(
                [resnet(ch[max(i - 1, 0)] if k == 0 else ch[i], ch[i]) for k in range(n_resnets[i])],
                [transformer(i) for _ in range(n_resnets[i])] if attends else [],
                Downsample(ch[i]) if i < n - 1 else None))
        self.mid_block = MidBlock([resnet(ch[-1], ch[-1]), resnet(ch[-1], ch[-1])], [transformer(n - 1)])

        # up: the levels in reverse, one more resnet each. The skips they join are the outputs of
        # conv_in, of every down resnet (after its transformer) and of every downsampler, last first.
        skips = [ch[0]] + [ch[i] for i in range(n) for _ in range(n_resnets[i] + (i < n - 1))]
        self.up_blocks = nn.ModuleList()
        for j, i in enumerate(reversed(range(n))):  # the j-th up block works at level i
            joined = [skips.pop() for _ in range(n_resnets[i] + 1)]  # channels of the skip each resnet joins
            below = ch[min(i + 1, n - 1)]  # channels coming up from the level below
            attends = c.up_block_types[j] == "CrossAttnUpBlock2D"
            self.up_blocks.append(UpBlock(
                [resnet((below if k == 0 else ch[i]) + skip, ch[i]) for k, skip in enumerate(joined)],
                [transformer(i) for _ in joined] if attends else [],
                Upsample(ch[i]) if i > 0 else None))

        self.conv_norm_out = nn.GroupNorm(c.norm_num_groups, ch[0], eps=c.norm_eps)
        self.conv_out = nn.Conv2d(ch[0], c.out_channels, 3, padding=1)
        # no initialization here: the UNet only ever runs with loaded weights
        self.gradient_checkpointing = False  # set True to recompute each resnet and transformer block in backward

    def embed(self, t, batch, dtype, text_embeds=None, time_ids=None):
        """The time embedding [B, E] every resnet adds: of t, and for SDXL of the pooled text and size ids."""
        c = self.config
        t = torch.as_tensor(t, device=self.conv_in.weight.device)
        if t.ndim > 1 or t.numel() not in (1, batch):
            raise ValueError(f"t: expected a number or {batch} timesteps, got shape {tuple(t.shape)}")
        t = t.reshape(-1).expand(batch)                                    # [B]
        # sinusoids in fp32, then the weights' dtype, as diffusers: bf16 results match theirs
        features = timestep_embedding(t, c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift)  # [B, C]
        emb = self.time_embedding(features.to(dtype))                      # [B, E]
        if c.addition_embed_type == "text_time":  # SDXL micro-conditioning (Podell et al. 2023, sec. 2.2)
            if text_embeds is None or time_ids is None:
                raise ValueError("SDXL's UNet needs text_embeds (the pooled text embedding) and time_ids "
                                 "(original size, crop corner, target size: 6 numbers per sample)")
            ids = timestep_embedding(time_ids.flatten(), c.addition_time_embed_dim, c.flip_sin_to_cos, c.freq_shift)
            ids = ids.reshape(batch, -1)                                   # [B * 6, 256] -> [B, 6 * 256]
            emb = emb + self.add_embedding(torch.cat([text_embeds.to(dtype), ids.to(dtype)], dim=-1))  # [B, E]
        elif text_embeds is not None or time_ids is not None:
            raise ValueError("text_embeds and time_ids are only for SDXL's text_time conditioning, not in this config")
        return emb

    def forward(self, x, t, context, text_embeds=None, time_ids=None, down_residuals=None, mid_residual=None):
        """Epsilon or v [B, out, H, W] at latents x [B, in, H, W], timesteps t and text tokens context [B, L, D].

        SDXL also takes its pooled text embedding text_embeds [B, 1280] and time_ids [B, 6]: original
        size, crop corner and target size, in pixels. A ControlNet's residuals (controlnet.py), one per
        skip and one for the mid block, are added to them (Zhang et al. 2023, arXiv 2302.05543, fig. 3).
        """
        dtype = self.conv_in.weight.dtype  # the model runs in its weights' dtype; inputs are cast to it
        x, context = x.to(dtype), context.to(dtype)
        emb = self.embed(t, x.shape[0], dtype, text_embeds, time_ids)      # [B, E]
        ckpt = self.gradient_checkpointing and torch.is_grad_enabled()

        h = self.conv_in(x)                                                # [B, C, H, W]
        skips = [h]
        for block in self.down_blocks:
            for i, resnet in enumerate(block.resnets):
                h = run(resnet, ckpt, h, emb)
                if block.attentions:
                    h = block.attentions[i](h, context, ckpt)
                skips.append(h)
            for downsample in block.downsamplers:
                h = downsample(h)                                          # [B, C, H/2, W/2]
                skips.append(h)

        if down_residuals is not None:  # the ControlNet's, added to the skips after the whole down pass
            if len(down_residuals) != len(skips):
                raise ValueError(f"down_residuals: {len(down_residuals)} given, this UNet has {len(skips)} skips "
                                 "(a ControlNet for another base model?)")
            skips = [s + r.to(s.dtype) for s, r in zip(skips, down_residuals)]

        h = run(self.mid_block.resnets[0], ckpt, h, emb)
        h = self.mid_block.attentions[0](h, context, ckpt)
        h = run(self.mid_block.resnets[1], ckpt, h, emb)
        if mid_residual is not None:
            h = h + mid_residual.to(h.dtype)

        for block in self.up_blocks:
            for i, resnet in enumerate(block.resnets):
                h = torch.cat([h, skips.pop()], dim=1)                     # [B, C + C_skip, H, W]
                h = run(resnet, ckpt, h, emb)
                if block.attentions:
                    h = block.attentions[i](h, context, ckpt)
            for upsample in block.upsamplers:
                h = upsample(h, skips[-1].shape[-2:])                      # [B, C, 2H, 2W]

        return self.conv_out(F.silu(self.conv_norm_out(h)))                # [B, out, H, W]


# -----------------------------------------------------------------------------
# presets: the unet/config.json of the official hub repos


PRESETS = {
    # stable-diffusion-v1-5/stable-diffusion-v1-5, 512 px, epsilon: 860 M parameters
    "sd1.5": lambda: UNetConfig(sample_size=64, cross_attention_dim=768),
    # stabilityai/stable-diffusion-2-1, 768 px, v-prediction: 866 M parameters
    "sd2.1": lambda: UNetConfig(sample_size=96, attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024,
                                use_linear_projection=True, upcast_attention=True, prediction_type="v_prediction"),
    # stabilityai/stable-diffusion-2-1-base, 512 px, epsilon
    "sd2.1-base": lambda: UNetConfig(sample_size=64, attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024,
                                     use_linear_projection=True),
    # stabilityai/stable-diffusion-xl-base-1.0, 1024 px, epsilon: 2.6 B parameters
    "sdxl": lambda: UNetConfig(
        sample_size=128, block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816),
}


# -----------------------------------------------------------------------------
# loading


def from_pretrained(path_or_repo_id, subfolder="unet", dtype=None, device=None, variant=None):
    """The UNet of a hub repo or local folder (the repo root or its unet/), loaded strictly in `dtype`.

    The model is built on the meta device and takes the file's tensors, cast one by one, as its own:
    SDXL in bf16 never holds an fp32 copy. `variant="fp16"` prefers the half-size fp16 files.
    """
    folder = checkpoint.resolve(path_or_repo_id, subfolder, variant)
    options = checkpoint.read_config(folder)
    try:
        config = UNetConfig.from_dict(options)
    except (TypeError, ValueError) as e:
        raise checkpoint.CheckpointError(f"{folder / 'config.json'}: {e}") from None
    # what the model predicts is recorded with the scheduler, in the repo folder beside unet/
    scheduler = folder.parent / "scheduler" / "scheduler_config.json"
    if scheduler.is_file() and "prediction_type" not in options:
        try:
            prediction_type = json.loads(scheduler.read_text()).get("prediction_type", "epsilon")
            config = dataclasses.replace(config, prediction_type=prediction_type)  # validates it
        except ValueError as e:  # invalid JSON, or a prediction this UNet does not make
            raise checkpoint.CheckpointError(f"{scheduler}: {e}") from None
    with torch.device("meta"):
        model = UNet(config)
    tensors = checkpoint.read_tensors(folder, dtype=dtype, device=device, variant=variant)
    return checkpoint.load_into(model, tensors, source=folder).eval()
