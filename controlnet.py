"""ControlNet (Zhang, Rao & Agrawala 2023, arXiv 2302.05543) for the SD UNets, and the tiny DiT's.

A ControlNet is a trainable copy of a diffusion model's encoder that also sees a control image
(edges, depth, a mask, ...). Its features pass through zero-initialized layers and are added to the
frozen base model's: for the UNet to every skip and to the mid block's output (their fig. 3); for a
transformer to the first blocks' hidden states (SD3ControlNetModel; PixArt-delta, Chen et al. 2024,
arXiv 2401.05252). Zero-initialized, a fresh ControlNet leaves the base model exactly as it was.

    net = controlnet.from_pretrained("diffusers/controlnet-canny-sdxl-1.0")
    residuals = net(x, t, control, **cond, scale=0.5)       # dict(down_residuals=..., mid_residual=...)
    out = unet(x, t, **cond, **residuals)

    denoise = controlled(unet, [net], timesteps)            # the same, as one call over the denoiser interface
    extra, extra_null = control_condition([net], [image], [0.5], batch=B)
    out = denoise(x, t, **cond, **extra)                    # cond carries the images; CFG batches them too

The UNet ControlNet is built from unet.py's own blocks, under the keys of diffusers' ControlNetModel,
so the hub's files load strictly; the original layout (lllyasviel's and thibaud's single files,
`control_model.*`) is mapped onto those keys by `from_original`.

Shapes: B batch, N ControlNets, C channels, H x W grid, T tokens, D width, L text tokens.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import checkpoint
import dit
import unet
from unet import DownBlock, Downsample, MidBlock, ResnetBlock, SpatialTransformer, TimestepEmbedding, per_level

# -----------------------------------------------------------------------------
# config


@dataclass
class ControlNetConfig(unet.UNetConfig):
    """The hub's ControlNetModel config.json: its base UNet's options (for the down and mid blocks) and its own."""

    conditioning_channels: int = 3  # channels of the control image
    conditioning_embedding_out_channels: tuple = (16, 32, 96, 256)  # the image encoder's widths; each next one
    #                                                                 halves the grid: 8x down to the latents
    controlnet_conditioning_channel_order: str = "rgb"  # "bgr": trained on BGR images (the channels are flipped)
    global_pool_conditions: bool = False  # residuals averaged over the grid (SD 1.5's "shuffle"); implies guess mode

    def __post_init__(self):
        # A ControlNet has no up blocks; the UNet's checks want some: the mirror of its down blocks.
        self.up_block_types = tuple(kind.replace("Down", "Up") for kind in reversed(self.down_block_types))
        super().__post_init__()
        self.conditioning_embedding_out_channels = tuple(self.conditioning_embedding_out_channels)
        if self.controlnet_conditioning_channel_order not in ("rgb", "bgr"):
            raise ValueError(f"controlnet_conditioning_channel_order: {self.controlnet_conditioning_channel_order!r} "
                             "(expected 'rgb' or 'bgr')")
        if not isinstance(self.layers_per_block, int):
            raise ValueError(f"layers_per_block: a ControlNet has one count for all levels, got "
                             f"{self.layers_per_block}")


@dataclass
class DiTControlNetConfig:
    """A ControlNet for a DiT: a copy of its first `num_layers` blocks."""

    base: dit.DiTConfig  # the DiT it controls
    num_layers: int = 2  # blocks copied; residual i is added to the base's hidden states after its block i
    conditioning_channels: int = 1  # channels of the control image, patchified as the base patchifies x

    def to_dict(self):
        return {"_class_name": "DiTControlNetModel", "num_layers": self.num_layers,
                "conditioning_channels": self.conditioning_channels, "base": dit.config_to_diffusers(self.base)}

    @classmethod
    def from_dict(cls, d):
        unknown = set(d) - {"_class_name", "num_layers", "conditioning_channels", "base"}
        if unknown or "base" not in d:
            raise ValueError(f"{sorted(unknown)[0] if unknown else 'base'}: expected num_layers, "
                             "conditioning_channels and base (the DiT's config.json)")
        return cls(dit.config_from_diffusers(d["base"]), d.get("num_layers", 2), d.get("conditioning_channels", 1))


# -----------------------------------------------------------------------------
# the UNet's ControlNet


class ConditioningEmbedding(nn.Module):
    """The control image to the latent grid: 3x3 convs with SiLU, each level's second one of stride 2, a zero conv out.

    The paper uses four 4x4 convs (section 3.2); the released models, and diffusers, these.
    """

    def __init__(self, in_channels, channels, out_channels):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, channels[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        for a, b in zip(channels[:-1], channels[1:]):
            self.blocks.append(nn.Conv2d(a, a, 3, padding=1))
            self.blocks.append(nn.Conv2d(a, b, 3, padding=1, stride=2))
        self.conv_out = nn.Conv2d(channels[-1], out_channels, 3, padding=1)  # zero at initialization

    def forward(self, x):
        h = F.silu(self.conv_in(x))                                        # [B, 16, 8H, 8W]
        for conv in self.blocks:
            h = F.silu(conv(h))                                            # every other one halves the grid
        return self.conv_out(h)                                            # [B, C, H, W]


class ControlNet(nn.Module):
    """x_t, t, a control image and the UNet's condition -> residuals for its skips and its mid block."""

    condition_keys = ("context", "text_embeds", "time_ids")  # the base UNet's condition, which it sees too

    def __init__(self, config):
        super().__init__()
        self.config = c = config
        n, ch, layers = len(c.block_out_channels), c.block_out_channels, c.layers_per_block
        heads = per_level(c.attention_head_dim, n)
        depth = per_level(c.transformer_layers_per_block, n)
        emb_dim = 4 * ch[0]  # E

        def resnet(in_channels, channels):
            return ResnetBlock(in_channels, channels, emb_dim, c.norm_num_groups, c.norm_eps)

        def transformer(i):
            return SpatialTransformer(ch[i], heads[i], depth[i], c.cross_attention_dim, c.use_linear_projection,
                                      c.norm_num_groups)

        # the UNet's input, time embedding and down and mid blocks, under the UNet's keys
        self.conv_in = nn.Conv2d(c.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], emb_dim)
        if c.addition_embed_type == "text_time":
            self.add_embedding = TimestepEmbedding(c.projection_class_embeddings_input_dim, emb_dim)
        self.controlnet_cond_embedding = ConditioningEmbedding(c.conditioning_channels,
                                                               c.conditioning_embedding_out_channels, ch[0])
        self.down_blocks = nn.ModuleList()
        for i in range(n):
            attends = c.down_block_types[i] == "CrossAttnDownBlock2D"
            self.down_blocks.append(DownBlock(
                [resnet(ch[max(i - 1, 0)] if k == 0 else ch[i], ch[i]) for k in range(layers)],
                [transformer(i) for _ in range(layers)] if attends else [],
                Downsample(ch[i]) if i < n - 1 else None))
        self.mid_block = MidBlock([resnet(ch[-1], ch[-1]), resnet(ch[-1], ch[-1])], [transformer(n - 1)])
        # the zero convs: one 1x1 conv per skip the UNet joins (conv_in, each resnet, each downsampler), one for the mid
        skips = [ch[0]] + [ch[i] for i in range(n) for _ in range(layers + (i < n - 1))]
        self.controlnet_down_blocks = nn.ModuleList([nn.Conv2d(s, s, 1) for s in skips])
        self.controlnet_mid_block = nn.Conv2d(ch[-1], ch[-1], 1)
        # no initialization here: this ControlNet only ever runs with loaded weights

    embed = unet.UNet.embed  # the time (and SDXL size and pooled-text) embedding, computed as the UNet computes it

    def forward(self, x, t, control, context, text_embeds=None, time_ids=None, scale=1.0, guess_mode=False):
        """dict(down_residuals=[...], mid_residual=...) for the UNet, from latents x [B, in, H, W] and a control
        image [B, 3, 8H, 8W] in [0, 1]; `scale` is a number or one per sample.

        Guess mode (the ControlNet recognizes the content with no prompt, used on the conditional half
        of CFG only) scales the residuals from 0.1 at the first skip to 1 at the mid block, as diffusers does.
        """
        c = self.config
        dtype = self.conv_in.weight.dtype
        x, context, control = x.to(dtype), context.to(dtype), control.to(dtype)
        if c.controlnet_conditioning_channel_order == "bgr":
            control = control.flip(1)
        emb = self.embed(t, x.shape[0], dtype, text_embeds, time_ids)     # [B, E]

        hint = self.controlnet_cond_embedding(control)                     # [B, C, H, W]
        if hint.shape[-2:] != x.shape[-2:]:
            raise ValueError(f"a control image of {control.shape[-1]} x {control.shape[-2]} px makes a "
                             f"{hint.shape[-1]} x {hint.shape[-2]} grid, the latents are {x.shape[-1]} x "
                             f"{x.shape[-2]}: prepare it at the output size")
        h = self.conv_in(x) + hint                                         # [B, C, H, W]
        skips = [h]
        for block in self.down_blocks:
            for i, resnet in enumerate(block.resnets):
                h = resnet(h, emb)
                if block.attentions:
                    h = block.attentions[i](h, context)
                skips.append(h)
            for downsample in block.downsamplers:
                h = downsample(h)                                          # [B, C, H/2, W/2]
                skips.append(h)
        h = self.mid_block.resnets[0](h, emb)
        h = self.mid_block.attentions[0](h, context)
        h = self.mid_block.resnets[1](h, emb)

        out = [zero(s) for zero, s in zip(self.controlnet_down_blocks, skips)] + [self.controlnet_mid_block(h)]
        scale = torch.as_tensor(scale, dtype=torch.float32, device=h.device).reshape(-1, 1, 1, 1)  # [B or 1, 1, 1, 1]
        if guess_mode and not c.global_pool_conditions:
            ramp = torch.logspace(-1, 0, len(out), device=h.device)        # 0.1 ... 1, shallow to deep
            out = [r * (ramp[k] * scale).to(r.dtype) for k, r in enumerate(out)]
        else:
            out = [r * scale.to(r.dtype) for r in out]
        if c.global_pool_conditions:
            out = [r.mean(dim=(2, 3), keepdim=True) for r in out]           # [B, C, 1, 1]
        return dict(down_residuals=out[:-1], mid_residual=out[-1])


def check_fits(net, model):
    """Raise a one-line error unless ControlNet `net` was made for a base model shaped like `model`."""
    if isinstance(net, DiTControlNet):
        if net.config.base != model.config or net.config.num_layers > model.config.depth:
            raise checkpoint.CheckpointError(f"ControlNet for a DiT of width {net.config.base.hidden_size} and "
                                             f"depth {net.config.base.depth}: does not fit this DiT (width "
                                             f"{model.config.hidden_size}, depth {model.config.depth})")
        return
    a, b = net.config, model.config
    mine = (a.in_channels, a.block_out_channels, per_level(a.layers_per_block, len(a.block_out_channels)),
            a.cross_attention_dim, a.addition_embed_type)
    theirs = (b.in_channels, b.block_out_channels, per_level(b.layers_per_block, len(b.block_out_channels)),
              b.cross_attention_dim, b.addition_embed_type)
    if mine != theirs:
        raise checkpoint.CheckpointError(
            f"ControlNet for a UNet of widths {a.block_out_channels} and text width {a.cross_attention_dim}: "
            f"does not fit this UNet ({b.block_out_channels}, {b.cross_attention_dim}); pick one made for this base")


# -----------------------------------------------------------------------------
# the tiny DiT's ControlNet


class DiTControlNet(nn.Module):
    """x_t, t, a control image and the class -> residuals for the DiT's first blocks (SD3ControlNetModel's design)."""

    condition_keys = ("y",)

    def __init__(self, config):
        super().__init__()
        self.config = c = config
        b = c.base
        self.x_embedder = dit.PatchEmbed(b)
        self.pos_embed_input = nn.Conv2d(c.conditioning_channels, b.hidden_size, b.patch_size, stride=b.patch_size)
        self.t_embedder = dit.TimestepEmbedder(b)
        self.y_embedder = dit.LabelEmbedder(b)
        grid = b.input_size // b.patch_size
        self.register_buffer("pos_embed", dit.sincos_2d(b.hidden_size, grid)[None], persistent=False)  # (1, T, D)
        self.blocks = nn.ModuleList([dit.DiTBlock(b) for _ in range(c.num_layers)])
        self.controlnet_blocks = nn.ModuleList([nn.Linear(b.hidden_size, b.hidden_size) for _ in range(c.num_layers)])

    @classmethod
    def from_dit(cls, model, num_layers=2, conditioning_channels=1):
        """A fresh ControlNet of `model`: a copy of its embedders and first blocks, its new layers zero."""
        net = cls(DiTControlNetConfig(model.config, num_layers, conditioning_channels)).to(model.x_embedder.proj.weight)
        own = net.state_dict()
        missing, _ = net.load_state_dict({k: v for k, v in model.state_dict().items() if k in own}, strict=False)
        assert all(k.startswith(("pos_embed_input.", "controlnet_blocks.")) for k in missing), missing
        with torch.no_grad():  # zero-init: the control image's input and every residual's output
            for layer in [net.pos_embed_input, *net.controlnet_blocks]:
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)
        return net

    def forward(self, x, t, control, y, scale=1.0):
        """dict(block_residuals=[...]) for the DiT: one (B, T, D) per copied block; control (B, C, H, W) in [0, 1]."""
        B = x.shape[0]
        t = torch.as_tensor(t, device=x.device).expand(B)
        h = self.x_embedder(x) + self.pos_embed.to(x.dtype)                # (B, T, D)
        h = h + self.pos_embed_input(control.to(h.dtype)).flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, T, D)
        c = self.t_embedder(t) + self.y_embedder(y)                        # (B, D)
        scale = torch.as_tensor(scale, dtype=h.dtype, device=h.device).reshape(-1, 1, 1)  # (B or 1, 1, 1)
        residuals = []
        for block, zero in zip(self.blocks, self.controlnet_blocks):
            h = block(h, c)
            residuals.append(zero(h) * scale)                              # (B, T, D)
        return dict(block_residuals=residuals)


# -----------------------------------------------------------------------------
# composition: a denoiser call that takes the control images in its condition


def _guess_mode(nets, guess_mode):
    """Guess mode as diffusers' pipelines decide it: asked for, or a first ControlNet with pooled residuals."""
    return guess_mode or bool(getattr(nets[0].config, "global_pool_conditions", False))


def control_condition(nets, images, scales=1.0, batch=1, guess_mode=False):
    """(cond entries, null entries) carrying the control images of `nets` for `batch` samples.

    images: one [C, H, W] or [batch, C, H, W] tensor in [0, 1] per ControlNet (control_image.prepare);
    scales: one conditioning scale per ControlNet, or one for all. cond gets control [B, N, C, H, W]
    and control_scale [B, N]; so does the null condition, so that under CFG the ControlNets act on
    both halves of the batch, as diffusers does; in guess mode its scales are 0: conditional half only.
    """
    images = [images] if torch.is_tensor(images) else list(images)
    scales = [float(scales)] * len(nets) if isinstance(scales, (int, float)) else [float(s) for s in scales]
    if not len(images) == len(scales) == len(nets):
        raise ValueError(f"{len(nets)} ControlNets, {len(images)} control images and {len(scales)} scales: "
                         "give one image and one scale per ControlNet")
    shapes = {tuple(i.shape[-3:]) for i in images}
    if len(shapes) > 1:
        raise ValueError(f"control images of shapes {sorted(shapes)}: all must be the output size")
    control = torch.stack([i.expand(batch, *i.shape[-3:]) for i in images], dim=1)  # [B, N, C, H, W]
    scale = torch.tensor(scales, device=control.device).expand(batch, len(nets))   # [B, N]
    null_scale = torch.zeros_like(scale) if _guess_mode(nets, guess_mode) else scale
    return dict(control=control, control_scale=scale), dict(control=control, control_scale=null_scale)


def _map(f, *values):
    """f over tensors, or elementwise over lists of them (a ControlNet returns both)."""
    return [f(*v) for v in zip(*values)] if isinstance(values[0], list) else f(*values)


def controlled(call, nets, timesteps=None, start=0.0, end=1.0, guess_mode=False):
    """The denoiser call(x, t, **cond) with the residuals of ControlNets `nets` added, as one call.

    The returned call takes cond's control and control_scale (control_condition), runs each
    ControlNet on the rows whose scale is not 0, sums their residuals and passes them, with the
    rest of cond, to `call`: the base model, or an adapter student of it (the student's keys, such as
    w, are not the ControlNets'). start and end (one for all or one per ControlNet): the fractions of
    the sampler's steps, `timesteps` in order, between which each acts (diffusers' control_guidance_start / _end).
    """
    nets = list(nets)
    starts = [start] * len(nets) if isinstance(start, (int, float)) else list(start)
    ends = [end] * len(nets) if isinstance(end, (int, float)) else list(end)
    if not len(starts) == len(ends) == len(nets):
        raise ValueError(f"{len(nets)} ControlNets: give one start and one end fraction for all, or one per ControlNet")
    if any(not 0 <= s < e <= 1 for s, e in zip(starts, ends)):
        raise ValueError(f"start {starts} and end {ends}: expected 0 <= start < end <= 1")
    always = all(s == 0 for s in starts) and all(e == 1 for e in ends)
    if timesteps is None and not always:
        raise ValueError("start / end fractions need the sampler's timesteps")
    index = None if always else {int(s): i for i, s in enumerate(timesteps)}  # timestep -> its step
    guess = _guess_mode(nets, guess_mode)

    def acting(t):
        """Which ControlNets act at timestep t: those whose [start, end] holds the step (diffusers' controlnet_keep)."""
        if index is None:
            return [True] * len(nets)
        step = index.get(int(torch.as_tensor(t).flatten()[0]))
        if step is None:
            raise ValueError(f"t={int(torch.as_tensor(t).flatten()[0])} is not one of the {len(index)} timesteps "
                             "the ControlNets' start / end fractions were set for")
        n = len(index)
        return [s <= step / n and (step + 1) / n <= e for s, e in zip(starts, ends)]

    def denoise(x, t, control=None, control_scale=None, **cond):
        if control is None:
            return call(x, t, **cond)
        B = x.shape[0]
        residuals = {}
        for k, (net, on) in enumerate(zip(nets, acting(t))):
            rows = (control_scale[:, k] != 0).nonzero().flatten()
            if not on or len(rows) == 0:
                continue
            pick = (lambda v: v) if len(rows) == B else (lambda v: v[rows])
            tk = torch.as_tensor(t, device=x.device)
            tk = pick(tk) if tk.ndim == 1 and len(tk) == B else tk
            kw = {key: pick(cond[key]) for key in net.condition_keys if cond.get(key) is not None}
            out = net(pick(x), tk, pick(control[:, k]), scale=pick(control_scale[:, k]), **kw,
                      **(dict(guess_mode=True) if guess else {}))
            for key, value in out.items():
                if len(rows) < B:  # the rows it did not run on (the null half, in guess mode) get nothing
                    value = _map(lambda v: v.new_zeros(B, *v.shape[1:]).index_copy(0, rows, v), value)
                residuals[key] = value if key not in residuals else _map(torch.add, residuals[key], value)
        return call(x, t, **cond, **residuals)

    return denoise


# -----------------------------------------------------------------------------
# the original layout: lllyasviel/ControlNet's cldm.py keys (control_model.*), as single files hold them

# LDM's resnet sub-keys -> unet.py's (and diffusers')
_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj", "out_layers.0": "norm2",
           "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}


def _original_prefixes(config):
    """(original prefix, ours) for every module of a ControlNet of `config`; transformers keep their sub-keys."""
    c, n, layers = config, len(config.block_out_channels), config.layers_per_block
    pairs = [("time_embed.0.", "time_embedding.linear_1."), ("time_embed.2.", "time_embedding.linear_2."),
             ("label_emb.0.0.", "add_embedding.linear_1."), ("label_emb.0.2.", "add_embedding.linear_2."),
             ("input_blocks.0.0.", "conv_in."), ("middle_block.1.", "mid_block.attentions.0."),
             ("middle_block_out.0.", "controlnet_mid_block.")]

    def resnet(theirs, ours):
        return [(f"{theirs}{a}.", f"{ours}{b}.") for a, b in _RESNET.items()]

    pairs += resnet("middle_block.0.", "mid_block.resnets.0.") + resnet("middle_block.2.", "mid_block.resnets.1.")
    block = 1  # input_blocks.0 is conv_in; then each level's resnets (and transformers) and its downsampler
    for i in range(n):
        for k in range(layers):
            pairs += resnet(f"input_blocks.{block}.0.", f"down_blocks.{i}.resnets.{k}.")
            pairs.append((f"input_blocks.{block}.1.", f"down_blocks.{i}.attentions.{k}."))
            block += 1
        if i < n - 1:
            pairs.append((f"input_blocks.{block}.0.op.", f"down_blocks.{i}.downsamplers.0.conv."))
            block += 1
    pairs += [(f"zero_convs.{k}.0.", f"controlnet_down_blocks.{k}.") for k in range(block)]
    # input_hint_block: a Sequential of convs and SiLUs: convs at 0, 2, ..., the last one the zero conv out
    hints = 2 * len(c.conditioning_embedding_out_channels) - 1
    pairs += [("input_hint_block.0.", "controlnet_cond_embedding.conv_in."),
              (f"input_hint_block.{2 * hints}.", "controlnet_cond_embedding.conv_out.")]
    pairs += [(f"input_hint_block.{2 * k + 2}.", f"controlnet_cond_embedding.blocks.{k}.") for k in range(hints - 1)]
    return pairs


def from_original(sd, config, source="state dict"):
    """Map an original-layout state dict (its keys with or without control_model.) onto ours, strictly."""
    prefixes = _original_prefixes(config)
    out = {}
    for key, tensor in sd.items():
        k = key.removeprefix("control_model.")
        theirs, ours = next(((a, b) for a, b in prefixes if k.startswith(a)), (None, None))
        if theirs is None:
            raise checkpoint.CheckpointError(f"{source}: unexpected key {key} (not a ControlNet's in the "
                                             "original layout)")
        out[ours + k[len(theirs):]] = tensor
    if len(out) != len(sd):
        raise checkpoint.CheckpointError(f"{source}: {len(sd)} keys map onto {len(out)} (a key given twice?)")
    with torch.device("meta"):
        expected = {k: v.shape for k, v in ControlNet(config).state_dict().items()}
    checkpoint.check_keys(expected, out, source)
    return out


def config_from_original(sd, source="state dict"):
    """The config of an original-layout ControlNet, from its tensors' shapes.

    The heads leave no trace in the shapes: as the official yaml files say, SD 1.x has 8 per level
    (its 768-wide text), SD 2.x and SDXL heads 64 wide.
    """
    sd = {k.removeprefix("control_model."): v for k, v in sd.items()}
    for key in ("input_blocks.0.0.weight", "input_hint_block.0.weight", "middle_block.0.in_layers.2.weight"):
        if key not in sd:
            raise checkpoint.CheckpointError(f"{source}: no key {key} (not a ControlNet in the original layout)")
    downs = sorted(int(k.split(".")[1]) for k in sd if k.startswith("input_blocks.") and ".0.op.weight" in k)
    if not downs:
        raise checkpoint.CheckpointError(f"{source}: no downsampler (input_blocks.N.0.op): not an original-layout "
                                         "ControlNet")
    layers, n = downs[0] - 1, len(downs) + 1
    first = [1 + i * (layers + 1) for i in range(n)]  # each level's first input block
    channels = tuple(sd[f"input_blocks.{b}.0.out_layers.3.weight"].shape[0] for b in first)

    def depth(prefix):  # transformer blocks in the attention at prefix
        prefix += "transformer_blocks."
        return len({k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix)})

    attends = [f"input_blocks.{b}.1.proj_in.weight" in sd for b in first]
    depths = [max(depth(f"input_blocks.{b}.1."), 1) for b in first]
    if attends[-1] and depths[-1] != depth("middle_block.1."):
        raise checkpoint.CheckpointError(f"{source}: the mid block's transformer depth differs from the lowest "
                                         "level's (no UNet here has that)")
    key = next(k for k in sd if k.endswith("attn2.to_k.weight"))
    context_dim = sd[key].shape[1]
    heads = 8 if context_dim == 768 else tuple(max(ch // 64, 1) for ch in channels)
    hints = sorted(int(k.split(".")[1]) for k in sd if k.startswith("input_hint_block.") and k.endswith(".weight"))
    hint_channels = [sd[f"input_hint_block.{i}.weight"].shape[0] for i in hints[:-1]]
    sdxl = "label_emb.0.0.weight" in sd
    try:
        return ControlNetConfig(
            in_channels=sd["input_blocks.0.0.weight"].shape[1], block_out_channels=channels, layers_per_block=layers,
            down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attends),
            transformer_layers_per_block=tuple(depths[:-1] + [depth("middle_block.1.")]),  # the mid's for the last
            attention_head_dim=heads, cross_attention_dim=context_dim,
            use_linear_projection=sd["middle_block.1.proj_in.weight"].ndim == 2,
            addition_embed_type="text_time" if sdxl else None, addition_time_embed_dim=256 if sdxl else None,
            projection_class_embeddings_input_dim=sd["label_emb.0.0.weight"].shape[1] if sdxl else None,
            conditioning_channels=sd["input_hint_block.0.weight"].shape[1],
            conditioning_embedding_out_channels=tuple(hint_channels[0:1] + hint_channels[2::2]))
    except (KeyError, ValueError) as e:
        raise checkpoint.CheckpointError(f"{source}: not a ControlNet this file can read ({e})") from None


# -----------------------------------------------------------------------------
# loading


def _torch_load(file):
    """A .bin / .pth / .ckpt of plain tensors, loaded without running pickled code (checkpoint.read_torch_file)."""
    sd = checkpoint.read_torch_file(file)
    sd = sd.get("state_dict", sd) if isinstance(sd, dict) else sd  # Lightning's .ckpt nests it
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise checkpoint.CheckpointError(f"{file}: not a state dict (expected a dict of tensors)")
    return sd


def _cast(tensors, dtype, device):
    """Floating tensors in `dtype`, all on `device` (None: as they are)."""
    return {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).to(device)
            for k, v in tensors.items()}


def _read_weights(folder, path_or_repo_id, subfolder, dtype, device):
    """A folder's diffusion_pytorch_model.safetensors, else its .bin (older hub repos, thibaud's, hold only that)."""
    folder, name = Path(folder), "diffusion_pytorch_model.bin"
    if not any(folder.glob("*.safetensors*")):
        if not (folder / name).is_file() and not Path(path_or_repo_id).expanduser().exists():
            from huggingface_hub import hf_hub_download  # only for hub ids

            try:  # resolve() fetched the config.json and any safetensors; the .bin lies beside them
                hf_hub_download(str(path_or_repo_id), name, subfolder=subfolder if folder.name == subfolder else None)
            except Exception as e:
                raise checkpoint.CheckpointError(f"{path_or_repo_id}: no safetensors weights and could not download "
                                                 f"{name} ({type(e).__name__})") from e
        if (folder / name).is_file():
            return _cast(_torch_load(folder / name), dtype, device), folder / name
    files = checkpoint.weight_files(folder)
    return checkpoint.read_tensors(files, dtype=dtype, device=device), files[0]


def from_pretrained(path_or_repo_id, subfolder=None, dtype=None, device=None):
    """A ControlNet: a hub id or folder in diffusers' layout (config.json + weights), or one original-layout file."""
    path = Path(path_or_repo_id).expanduser()
    if path.is_file():  # lllyasviel's or thibaud's single files: no config, keys control_model.*
        sd = checkpoint.read_tensors(path, dtype, device) if path.suffix == ".safetensors" else \
            _cast(_torch_load(path), dtype, device)
        config = config_from_original(sd, source=path)
        tensors, source, cls = from_original(sd, config, source=path), path, ControlNet
    else:
        folder = checkpoint.resolve(path_or_repo_id, subfolder)
        options = checkpoint.read_config(folder)
        cls = DiTControlNet if options.get("_class_name") == "DiTControlNetModel" else ControlNet
        try:
            config = (DiTControlNetConfig if cls is DiTControlNet else ControlNetConfig).from_dict(options)
        except (TypeError, ValueError) as e:
            raise checkpoint.CheckpointError(f"{folder / 'config.json'}: {e}") from None
        tensors, source = _read_weights(folder, path_or_repo_id, subfolder, dtype, device)
    with torch.device("meta"):
        model = cls(config)
    checkpoint.load_into(model, tensors, source=source)
    # a DiT ControlNet's fixed positions are not stored (built on the CPU, as dit.py builds them): move them
    return model.to(device=device, dtype=dtype).eval()


def save_pretrained(net, folder):
    """Write a DiT ControlNet as config.json + diffusion_pytorch_model.safetensors (the hub's layout)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(net.config.to_dict(), indent=2) + "\n")
    checkpoint.save_file(net.state_dict(), folder / "diffusion_pytorch_model.safetensors")
