"""The MMDiT of Stable Diffusion 3 and 3.5, whole, in one file.

Esser et al., "Scaling Rectified Flow Transformers for High-Resolution Image Synthesis" (ICML 2024,
arXiv 2403.03206): a transformer over patches of 16-channel latents in which the image tokens and
the text tokens keep their own weights (two streams, each with its own adaLN-Zero modulation, q / k
/ v and MLP) but meet in one attention over both (their Fig. 2b). The timestep and the pooled text
embedding condition every modulation; the last block updates only the image stream. SD3.5
(Stability AI, 2024) adds RMSNorm on each head's queries and keys ("qk_norm", Esser et al. sec. 5.3.2)
and, in Medium's first 13 blocks, a second attention over the image tokens alone ("MMDiT-X",
`dual_attention_layers`), modulated by three more chunks.

Attribute names are the keys of diffusers' SD3Transformer2DModel, so the hub's `transformer/`
safetensors load strictly, one to one; the config is its `transformer/config.json`. Called as every
denoiser here:

    model = mmdit.from_pretrained("stabilityai/stable-diffusion-3.5-medium", dtype=torch.bfloat16)
    v = model(x, t, context=tokens, pooled=pooled)   # velocity (flow matching), t = 1000 sigma

AGD sits beside `transformer_blocks.N.attn` (every block): it is called as attn(x, context) with the
modulated image tokens first and returns (image-stream output, text-stream output or None).

Shapes: B batch, C latent channels, H x W latent grid, p patch side, T = HW / p^2 image tokens,
L text tokens, E text width (joint_attention_dim), D hidden size, nh heads, hs head size, M side of
the stored position grid.
"""

import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

import checkpoint

NORM_EPS = 1e-6  # of every LayerNorm and of the q / k RMSNorms (diffusers' JointTransformerBlock)
TIME_FEATURES = 256  # sinusoidal features of the timestep (diffusers' CombinedTimestepTextProjEmbeddings)


# -----------------------------------------------------------------------------
# config


@dataclass
class MMDiTConfig:
    """The hub's transformer/config.json in diffusers' names; defaults are diffusers' (files omit keys at them)."""

    sample_size: int = 128                # latent side at the native resolution (1024 px / 8); informational
    patch_size: int = 2                   # p: tokens are p x p patches of the latent grid
    in_channels: int = 16                 # C: the SD3 autoencoder's latent channels
    num_layers: int = 18                  # joint blocks
    attention_head_dim: int = 64          # hs (here it IS the head width, unlike the UNet's quirk)
    num_attention_heads: int = 18         # nh; D = nh * hs
    joint_attention_dim: int = 4096       # E: width of the text tokens (T5-XXL's; CLIP's zero-padded to it)
    caption_projection_dim: int = 1152    # width the text tokens are projected to: must be D
    pooled_projection_dim: int = 2048     # pooled text: CLIP-L's 768 + CLIP-G's 1280, both projected
    out_channels: int | None = 16         # channels of the predicted velocity (None: in_channels)
    pos_embed_max_size: int = 96          # M: the stored positions form an M x M grid, centre-cropped to the input
    dual_attention_layers: tuple = ()     # blocks with a second, image-only attention (SD3.5 Medium: 0 ... 12)
    qk_norm: str | None = None            # "rms_norm" (SD3.5) on each head's queries and keys, or None (SD3)

    def __post_init__(self):
        self.dual_attention_layers = tuple(self.dual_attention_layers)
        if self.out_channels is None:
            self.out_channels = self.in_channels
        if self.qk_norm not in (None, "rms_norm"):
            raise ValueError(f"qk_norm: {self.qk_norm!r} is not supported (None or 'rms_norm', as SD3 and SD3.5)")
        if self.caption_projection_dim != self.hidden_size:
            raise ValueError(f"caption_projection_dim {self.caption_projection_dim} must equal num_attention_heads "
                             f"x attention_head_dim = {self.hidden_size}: the text tokens join the image tokens' "
                             "attention")
        outside = [i for i in self.dual_attention_layers if not 0 <= i < self.num_layers]
        if outside:
            raise ValueError(f"dual_attention_layers: block {outside[0]} is not one of the {self.num_layers} blocks")

    @property
    def hidden_size(self):
        return self.num_attention_heads * self.attention_head_dim  # D

    @classmethod
    def from_dict(cls, d):
        """Config from a config.json dict, refusing other models and options this file lacks."""
        if d.get("_class_name", "SD3Transformer2DModel") != "SD3Transformer2DModel":
            raise ValueError(f"_class_name is {d['_class_name']}, expected SD3Transformer2DModel (SD3 / SD3.5's MMDiT)")
        known = {f.name for f in fields(cls)}
        for key in d:
            if key not in known and not key.startswith("_"):  # _class_name, _diffusers_version: bookkeeping
                raise ValueError(f"{key}: not an SD3Transformer2DModel option this file knows")
        return cls(**{k: v for k, v in d.items() if k in known})


# -----------------------------------------------------------------------------
# helpers


def timestep_embedding(t, dim=TIME_FEATURES, max_period=10000):
    """Sinusoidal features (B, dim) of (fractional) timesteps, cosines first, in fp32 (DDPM; diffusers' Timesteps)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None]                              # (B, dim/2)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)       # (B, dim)


def layer_norm(x):
    """LayerNorm without weights: every norm of the blocks, whose scale and shift come from the modulation."""
    return F.layer_norm(x, x.shape[-1:], eps=NORM_EPS)


def modulate(x, shift, scale):
    """adaLN: scale and shift every token by a per-sample vector (Peebles & Xie 2023)."""
    return x * (1 + scale[:, None]) + shift[:, None]                       # (B, T, D)


def run(module, checkpointed, *args):
    """module(*args); checkpointed, its activations are recomputed in backward (Chen et al. 2016, arXiv 1604.06174)."""
    if checkpointed:
        return torch.utils.checkpoint.checkpoint(module, *args, use_reentrant=False)
    return module(*args)


# -----------------------------------------------------------------------------
# blocks, smallest first


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned scale (Zhang & Sennrich 2019), over each head's hs channels."""

    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # as diffusers' RMSNorm: the mean square in fp32, the result back in the weight's (half) dtype
        x = x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + NORM_EPS)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return x * self.weight


class PatchEmbed(nn.Module):
    """p x p patches -> tokens by a strided convolution, plus the stored positions of the grid's centre."""

    def __init__(self, cfg):
        super().__init__()
        D, p = cfg.hidden_size, cfg.patch_size
        self.patch_size, self.max_size = p, cfg.pos_embed_max_size
        self.proj = nn.Conv2d(cfg.in_channels, D, p, stride=p)
        # Fixed 2-d sin-cos positions of an M x M grid, but read from the checkpoint as they were
        # trained (diffusers stores them; SD3's base_size and interpolation are baked in).
        self.register_buffer("pos_embed", torch.zeros(1, cfg.pos_embed_max_size ** 2, D))  # (1, M*M, D)

    def forward(self, x):
        B, _, H, W = x.shape
        p, M = self.patch_size, self.max_size
        if H % p or W % p:
            raise ValueError(f"latents of {H} x {W}: both sides must be multiples of the patch size {p}")
        h, w = H // p, W // p
        if h > M or w > M:
            raise ValueError(f"latents of {H} x {W} are {h} x {w} patches; the model has positions for at most "
                             f"{M} x {M} (pos_embed_max_size)")
        # The centre h x w of the grid, as SD3 was trained at every resolution (Esser et al. sec. 5.3.1).
        top, left = (M - h) // 2, (M - w) // 2
        pos = self.pos_embed.view(1, M, M, -1)[:, top:top + h, left:left + w].reshape(1, h * w, -1)  # (1, T, D)
        return self.proj(x).flatten(2).transpose(1, 2) + pos               # (B, C, H, W) -> (B, T, D)


class MLP(nn.Module):
    """linear_1, SiLU, linear_2: the timestep's and the pooled text's embedders."""

    def __init__(self, in_features, dim):
        super().__init__()
        self.linear_1 = nn.Linear(in_features, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class TimeTextEmbed(nn.Module):
    """The condition of every modulation: embedded timestep plus embedded pooled text (B, D)."""

    def __init__(self, cfg):
        super().__init__()
        self.timestep_embedder = MLP(TIME_FEATURES, cfg.hidden_size)
        self.text_embedder = MLP(cfg.pooled_projection_dim, cfg.hidden_size)

    def forward(self, t, pooled):
        # the sinusoids in fp32, then the pooled text's dtype, as diffusers: bf16 results match theirs
        return self.timestep_embedder(timestep_embedding(t).to(pooled.dtype)) + self.text_embedder(pooled)


class Modulation(nn.Module):
    """SiLU then one linear layer from the condition to n per-sample vectors (adaLN; named `linear` as diffusers)."""

    def __init__(self, dim, n):
        super().__init__()
        self.n = n
        self.linear = nn.Linear(dim, n * dim)

    def forward(self, emb):
        return self.linear(F.silu(emb)).chunk(self.n, dim=1)              # (B, D) -> n x (B, D)


class GELUProj(nn.Module):
    """A linear layer into a tanh-approximated GELU (diffusers' GELU, which holds its linear as `proj`)."""

    def __init__(self, dim, inner_dim):
        super().__init__()
        self.proj = nn.Linear(dim, inner_dim)

    def forward(self, x):
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    """The MLP of either stream: to 4 D and back."""

    def __init__(self, dim, mult=4):
        super().__init__()
        # indices are diffusers' keys net.0 and net.2; its net.1 is a dropout, without weights
        self.net = nn.ModuleList([GELUProj(dim, mult * dim), nn.Identity(), nn.Linear(mult * dim, dim)])

    def forward(self, x):
        return self.net[2](self.net[0](x))                                 # (B, T, D)


def heads(x, proj, norm, nh):
    """Project tokens and split them into heads, each RMS-normed where the model has qk_norm: (B, nh, T, hs)."""
    B, T, _ = x.shape
    y = proj(x).view(B, T, nh, -1).transpose(1, 2)                         # (B, T, D) -> (B, nh, T, hs)
    return y if norm is None else norm(y)


class SelfAttention(nn.Module):
    """Multi-head self-attention over the image tokens alone: SD3.5's second attention (`attn2`)."""

    def __init__(self, cfg):
        super().__init__()
        D, self.nh = cfg.hidden_size, cfg.num_attention_heads
        self.to_q, self.to_k, self.to_v = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)
        qk = cfg.qk_norm is not None
        self.norm_q = RMSNorm(cfg.attention_head_dim) if qk else None
        self.norm_k = RMSNorm(cfg.attention_head_dim) if qk else None
        # a list only for diffusers' key to_out.0; its to_out.1 is a dropout, without weights
        self.to_out = nn.ModuleList([nn.Linear(D, D)])

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = (heads(x, p, n, self.nh) for p, n in ((self.to_q, self.norm_q), (self.to_k, self.norm_k),
                                                          (self.to_v, None)))
        out = F.scaled_dot_product_attention(q, k, v)                      # (B, nh, T, hs), scale hs^-0.5
        return self.to_out[0](out.transpose(1, 2).reshape(B, T, D))        # (B, T, D)


class JointAttention(nn.Module):
    """Each stream's own q / k / v (and q / k norms), one attention over the image and text tokens together.

    The image stream's projections are to_q, to_k, to_v, to_out.0; the text stream's add_q_proj,
    add_k_proj, add_v_proj, to_add_out (absent in the last block, whose text output is unused).
    """

    def __init__(self, cfg, context_out=True):
        super().__init__()
        D, hs, self.nh = cfg.hidden_size, cfg.attention_head_dim, cfg.num_attention_heads
        qk = cfg.qk_norm is not None
        self.to_q, self.to_k, self.to_v = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)
        self.norm_q, self.norm_k = (RMSNorm(hs), RMSNorm(hs)) if qk else (None, None)
        self.add_q_proj, self.add_k_proj, self.add_v_proj = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)
        self.norm_added_q, self.norm_added_k = (RMSNorm(hs), RMSNorm(hs)) if qk else (None, None)
        self.to_out = nn.ModuleList([nn.Linear(D, D)])  # to_out.0, as diffusers' key
        self.to_add_out = nn.Linear(D, D) if context_out else None

    def forward(self, x, context):
        """(image tokens (B, T, D), text tokens (B, L, D)) -> (image out (B, T, D), text out (B, L, D) or None)."""
        (B, T, D), L = x.shape, context.shape[1]
        q = torch.cat([heads(x, self.to_q, self.norm_q, self.nh),
                       heads(context, self.add_q_proj, self.norm_added_q, self.nh)], dim=2)  # (B, nh, T+L, hs)
        k = torch.cat([heads(x, self.to_k, self.norm_k, self.nh),
                       heads(context, self.add_k_proj, self.norm_added_k, self.nh)], dim=2)  # (B, nh, T+L, hs)
        v = torch.cat([heads(x, self.to_v, None, self.nh), heads(context, self.add_v_proj, None, self.nh)], dim=2)
        out = F.scaled_dot_product_attention(q, k, v)                      # (B, nh, T+L, hs), scale hs^-0.5
        out = out.transpose(1, 2).reshape(B, T + L, D)                     # (B, T+L, D), image tokens first
        x_out = self.to_out[0](out[:, :T])                                 # (B, T, D)
        return x_out, (self.to_add_out(out[:, T:]) if self.to_add_out is not None else None)


class JointBlock(nn.Module):
    """An MMDiT block: both streams modulated (adaLN-Zero), attended together, each through its own MLP.

    `context_pre_only` (the last block): the text stream is read, not updated, so its modulation
    is a plain (scale, shift) and it has no output projection or MLP. `dual_attention` (SD3.5
    Medium): an image-only attention besides, on the same normed tokens, its own shift / scale / gate.
    """

    def __init__(self, cfg, context_pre_only=False, dual_attention=False):
        super().__init__()
        D = cfg.hidden_size
        self.context_pre_only = context_pre_only
        self.norm1 = Modulation(D, 9 if dual_attention else 6)
        self.norm1_context = Modulation(D, 2 if context_pre_only else 6)
        self.attn = JointAttention(cfg, context_out=not context_pre_only)
        self.attn2 = SelfAttention(cfg) if dual_attention else None
        self.ff = FeedForward(D)
        self.ff_context = None if context_pre_only else FeedForward(D)

    def forward(self, x, context, emb):
        """(image tokens (B, T, D), text tokens (B, L, D), condition (B, D)) -> both updated (text: None if last)."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp, *dual = self.norm1(emb)
        normed = layer_norm(x)
        if self.context_pre_only:  # diffusers' AdaLayerNormContinuous: (scale, shift), in that order
            c_scale, c_shift = self.norm1_context(emb)
            c_in = modulate(layer_norm(context), c_shift, c_scale)
        else:
            c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(emb)
            c_in = modulate(layer_norm(context), c_shift_msa, c_scale_msa)
        # adapters hook attn by name: its first argument is the modulated image stream, and its
        # output[0], the image stream's attention output, is what they add to (before the gate)
        x_attn, c_attn = self.attn(modulate(normed, shift_msa, scale_msa), c_in)
        x = x + gate_msa[:, None] * x_attn
        if self.attn2 is not None:  # SD3.5's second attention reads the same normed tokens, not the updated x
            shift_msa2, scale_msa2, gate_msa2 = dual
            x = x + gate_msa2[:, None] * self.attn2(modulate(normed, shift_msa2, scale_msa2))
        x = x + gate_mlp[:, None] * self.ff(modulate(layer_norm(x), shift_mlp, scale_mlp))  # (B, T, D)
        if self.context_pre_only:
            return x, None
        context = context + c_gate_msa[:, None] * c_attn
        context = context + c_gate_mlp[:, None] * self.ff_context(modulate(layer_norm(context), c_shift_mlp,
                                                                           c_scale_mlp))  # (B, L, D)
        return x, context


# -----------------------------------------------------------------------------
# the model


class MMDiT(nn.Module):
    """SD3 / SD3.5's transformer: latents x_t, timestep, text tokens and pooled text -> velocity."""

    def __init__(self, config):
        super().__init__()
        self.config = c = config
        D = c.hidden_size
        self.pos_embed = PatchEmbed(c)
        self.time_text_embed = TimeTextEmbed(c)
        self.context_embedder = nn.Linear(c.joint_attention_dim, D)
        self.transformer_blocks = nn.ModuleList([
            JointBlock(c, context_pre_only=i == c.num_layers - 1, dual_attention=i in c.dual_attention_layers)
            for i in range(c.num_layers)])
        self.norm_out = Modulation(D, 2)  # diffusers' AdaLayerNormContinuous: (scale, shift)
        self.proj_out = nn.Linear(D, c.patch_size ** 2 * c.out_channels)
        # no initialization here: the MMDiT only ever runs with loaded weights
        self.gradient_checkpointing = False  # set True to recompute each block in backward (training adapters)

    def unpatchify(self, x, h, w):
        """(B, T, p*p*C) -> (B, C, H, W)."""
        p, C = self.config.patch_size, self.config.out_channels
        x = x.reshape(x.shape[0], h, w, p, p, C)
        return torch.einsum("bhwpqc->bchpwq", x).reshape(x.shape[0], C, h * p, w * p)

    def forward(self, x, t, context, pooled):
        """Velocity (B, C, H, W) at latents x (B, C, H, W), timesteps t = 1000 sigma, text (B, L, E), pooled (B, P)."""
        dtype = self.proj_out.weight.dtype  # the model runs in its weights' dtype; inputs are cast to it
        B, _, H, W = x.shape
        t = torch.as_tensor(t, device=x.device)
        if t.ndim > 1 or t.numel() not in (1, B):
            raise ValueError(f"t: expected a number or {B} timesteps, got shape {tuple(t.shape)}")
        t = t.reshape(-1).expand(B)                                        # (B,)
        h = self.pos_embed(x.to(dtype))                                    # (B, T, D)
        emb = self.time_text_embed(t, pooled.to(dtype))                    # (B, D)
        c = self.context_embedder(context.to(dtype))                       # (B, L, E) -> (B, L, D)
        checkpointed = self.gradient_checkpointing and torch.is_grad_enabled()
        for block in self.transformer_blocks:
            h, c = run(block, checkpointed, h, c, emb)
        scale, shift = self.norm_out(emb)
        h = self.proj_out(modulate(layer_norm(h), shift, scale))           # (B, T, p*p*C)
        p = self.config.patch_size
        return self.unpatchify(h, H // p, W // p)                          # (B, C, H, W)


# -----------------------------------------------------------------------------
# presets: the transformer/config.json of the official hub repos


def _preset(num_layers, pos_embed_max_size, **kw):
    # sized by depth d alone: d heads of 64, so D = 64 d (Esser et al. 2024, their scaling study)
    return lambda: MMDiTConfig(num_layers=num_layers, num_attention_heads=num_layers,
                               caption_projection_dim=64 * num_layers, pos_embed_max_size=pos_embed_max_size, **kw)


PRESETS = {
    # stabilityai/stable-diffusion-3-medium-diffusers: 2.0 B parameters
    "sd3-medium": _preset(24, 192),
    # stabilityai/stable-diffusion-3.5-medium: MMDiT-X, 2.2 B parameters; positions for 384 x 384 patches (SD3: 192)
    "sd3.5-medium": _preset(24, 384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm"),
    # stabilityai/stable-diffusion-3.5-large (and -large-turbo, the same config): 8.1 B parameters
    "sd3.5-large": _preset(38, 192, qk_norm="rms_norm"),
}


# -----------------------------------------------------------------------------
# loading


def from_pretrained(path_or_repo_id, subfolder="transformer", dtype=None, device=None, variant=None):
    """The MMDiT of a hub repo or local folder (the repo root or its transformer/), loaded strictly in `dtype`.

    Built on the meta device, it takes the file's tensors, cast one by one, as its own: SD3.5 Large
    in bf16 never holds an fp32 copy.
    """
    folder = checkpoint.resolve(path_or_repo_id, subfolder, variant)
    try:
        config = MMDiTConfig.from_dict(checkpoint.read_config(folder))
    except (TypeError, ValueError) as e:
        raise checkpoint.CheckpointError(f"{folder / 'config.json'}: {e}") from None
    with torch.device("meta"):
        model = MMDiT(config)
    tensors = checkpoint.read_tensors(folder, dtype=dtype, device=device, variant=variant)
    return checkpoint.load_into(model, tensors, source=folder).eval()
