"""Diffusion Transformer (Peebles & Xie, "Scalable Diffusion Models with Transformers", 2023).

A class-conditional transformer over patches of a latent image, conditioned through adaLN-Zero.
Called as every denoiser in this library is called:

    out = model(x, t, y=labels)   # x (B, C, H, W), t (B,), labels (B,) -> (B, 2C, H, W): epsilon, variance

Class `num_classes` is the null class that label dropout trains, so classifier-free guidance can
ask for the unconditional prediction. Attribute names are those of the paper's code
(facebookresearch/DiT), so its checkpoints (DiT-XL-2-256x256.pt) load as they are, less the fixed
positions they store; the hub's diffusers layout is mapped onto them by `from_diffusers`.

Letters in shape comments: B batch, C channels, H W height width, T tokens, D hidden size,
nh heads, hs head size, p patch size.
"""

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

import checkpoint

# -----------------------------------------------------------------------------
# helpers


def modulate(x, shift, scale):
    """adaLN: scale and shift every token by a per-sample vector."""
    return x * (1 + scale[:, None]) + shift[:, None]  # (B, T, D)


def timestep_embedding(t, dim, freq_shift, max_period=10000):
    """Sinusoidal features of (possibly fractional) timesteps, cosines first (DDPM; DiT)."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(exponent / (half - freq_shift))  # (dim/2,)
    args = t.float()[:, None] * freqs[None]  # (B, dim/2)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, dim)


def sincos_2d(dim, grid):
    """Fixed 2-d sin-cos positions (MAE; DiT): first half embeds the column, second the row."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64, device="cpu") / (dim / 4))
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64, device="cpu"),
                                torch.arange(grid, dtype=torch.float64, device="cpu"), indexing="ij")

    def embed(pos):
        angles = pos.flatten()[:, None] * omega[None]  # (T, D/4)
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)  # (T, D/2)

    return torch.cat([embed(cols), embed(rows)], dim=1).float()  # (T, D)


# -----------------------------------------------------------------------------
# config


@dataclass
class DiTConfig:
    input_size: int = 32  # side of the (latent) image: 256 px / 8 for DiT-XL/2-256
    patch_size: int = 2  # side of a patch: T = (input_size / patch_size)^2 tokens
    in_channels: int = 4  # latent channels of the SD autoencoder
    hidden_size: int = 1152  # D
    depth: int = 28  # number of DiT blocks
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000  # ImageNet; the class embedding has one more row, the null class
    learn_sigma: bool = True  # output 2C channels: epsilon and the variance interpolation (improved DDPM)
    norm_eps: float = 1e-6  # of the MLP's LayerNorm: the paper's code uses 1e-6, diffusers' DiT reads
    #                         config.json's norm_eps (default 1e-5) there, so hub models carry their own
    freq_shift: int = 0  # timestep frequencies exp(-ln(1e4) i / (half - freq_shift)): the paper's code
    #                      uses 0, diffusers' DiT 1; hub models are run as diffusers runs them

    @property
    def out_channels(self):
        return 2 * self.in_channels if self.learn_sigma else self.in_channels


# -----------------------------------------------------------------------------
# embedders


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> tokens, by a strided convolution."""

    def __init__(self, cfg):
        super().__init__()
        self.proj = nn.Conv2d(cfg.in_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, T, D)


class TimestepEmbedder(nn.Module):
    """Timestep -> sinusoidal features -> MLP."""

    def __init__(self, cfg, frequency_size=256):
        super().__init__()
        self.frequency_size = frequency_size
        self.freq_shift = cfg.freq_shift
        self.mlp = nn.Sequential(nn.Linear(frequency_size, cfg.hidden_size), nn.SiLU(),
                                 nn.Linear(cfg.hidden_size, cfg.hidden_size))

    def forward(self, t):
        freqs = timestep_embedding(t, self.frequency_size, self.freq_shift)  # (B, 256)
        return self.mlp(freqs.to(self.mlp[0].weight.dtype))  # (B, D)


class LabelEmbedder(nn.Module):
    """Class label -> vector; row `num_classes` is the null class (label dropout trains it)."""

    def __init__(self, cfg):
        super().__init__()
        self.embedding_table = nn.Embedding(cfg.num_classes + 1, cfg.hidden_size)

    def forward(self, y):
        return self.embedding_table(y)  # (B,) -> (B, D)


# -----------------------------------------------------------------------------
# blocks


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection."""

    def __init__(self, cfg):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)  # (B, nh, T, hs)
        return self.proj(x.transpose(1, 2).reshape(B, T, D))  # (B, T, D)


class Mlp(nn.Module):
    """Two linear layers with a tanh-approximated GELU between them."""

    def __init__(self, cfg):
        super().__init__()
        hidden = int(cfg.hidden_size * cfg.mlp_ratio)
        self.fc1 = nn.Linear(cfg.hidden_size, hidden)
        self.fc2 = nn.Linear(hidden, cfg.hidden_size)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    """Transformer block whose LayerNorms are modulated, and whose branches gated, by the condition."""

    def __init__(self, cfg):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, elementwise_affine=False, eps=cfg.norm_eps)
        self.mlp = Mlp(cfg)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cfg.hidden_size, 6 * cfg.hidden_size))

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa[:, None] * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp[:, None] * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x  # (B, T, D)


class FinalLayer(nn.Module):
    """Modulated LayerNorm, then each token -> its p x p x C_out patch."""

    def __init__(self, cfg):
        super().__init__()
        self.norm_final = nn.LayerNorm(cfg.hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(cfg.hidden_size, cfg.patch_size**2 * cfg.out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cfg.hidden_size, 2 * cfg.hidden_size))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (B, T, p*p*C_out)


# -----------------------------------------------------------------------------
# the model


class DiT(nn.Module):
    """Diffusion Transformer: patches -> adaLN-Zero blocks conditioned on (t, y) -> patches."""

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.x_embedder = PatchEmbed(cfg)
        self.t_embedder = TimestepEmbedder(cfg)
        self.y_embedder = LabelEmbedder(cfg)
        grid = cfg.input_size // cfg.patch_size
        self.register_buffer("pos_embed", sincos_2d(cfg.hidden_size, grid)[None], persistent=False)  # (1, T, D)
        self.blocks = nn.ModuleList([DiTBlock(cfg) for _ in range(cfg.depth)])
        self.final_layer = FinalLayer(cfg)
        self.gradient_checkpointing = False  # set True to recompute each block in backward (training adapters)
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self):
        """The paper's initialization; adaLN-Zero: every block starts as the identity."""
        if self.x_embedder.proj.weight.is_meta:  # built to be loaded: nothing to initialize
            return
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.x_embedder.proj.weight  # patch embedding initialized like a linear layer
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:  # zero-init: the gates, hence each block's residual branches
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)  # zero-init: the output
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def unpatchify(self, x, h, w):
        """(B, T, p*p*C) -> (B, C, H, W)."""
        p, c = self.config.patch_size, self.config.out_channels
        x = x.reshape(x.shape[0], h, w, p, p, c)
        return torch.einsum("bhwpqc->bchpwq", x).reshape(x.shape[0], c, h * p, w * p)

    def forward(self, x, t, y, block_residuals=None):
        """Predict epsilon (and the variance interpolation) for noisy x at timesteps t, class y.

        A ControlNet's residuals (controlnet.py), one (B, T, D) per block of its first blocks, are
        added to the hidden states after those blocks (as SD3's and PixArt-delta's ControlNets do).
        """
        B, _, H, W = x.shape
        p = self.config.patch_size
        t = torch.as_tensor(t, device=x.device).expand(B)  # a number or a (B,) tensor
        x = self.x_embedder(x) + self.pos_embed.to(x.dtype)  # (B, T, D)
        c = self.t_embedder(t) + self.y_embedder(y)  # (B, D)
        checkpointed = self.gradient_checkpointing and torch.is_grad_enabled()
        residuals = [] if block_residuals is None else list(block_residuals)
        if len(residuals) > len(self.blocks):
            raise ValueError(f"block_residuals: {len(residuals)} given, this DiT has {len(self.blocks)} blocks")
        for i, block in enumerate(self.blocks):  # checkpointed: activations recomputed in backward (Chen et al. 2016)
            x = torch.utils.checkpoint.checkpoint(block, x, c, use_reentrant=False) if checkpointed else block(x, c)
            if i < len(residuals):
                x = x + residuals[i].to(x.dtype)
        x = self.final_layer(x, c)  # (B, T, p*p*C_out)
        return self.unpatchify(x, H // p, W // p)  # (B, C_out, H, W)


# -----------------------------------------------------------------------------
# presets: the paper's models (Table 1) and the bundled tiny teacher


def _preset(depth, hidden_size, num_heads, patch_size, **kw):
    return lambda: DiTConfig(depth=depth, hidden_size=hidden_size, num_heads=num_heads,
                             patch_size=patch_size, **kw)


DiT_models = {
    **{f"DiT-S/{p}": _preset(12, 384, 6, p) for p in (2, 4, 8)},
    **{f"DiT-B/{p}": _preset(12, 768, 12, p) for p in (2, 4, 8)},
    **{f"DiT-L/{p}": _preset(24, 1024, 16, p) for p in (2, 4, 8)},
    **{f"DiT-XL/{p}": _preset(28, 1152, 16, p) for p in (2, 4, 8)},
    # The bundled teacher: 28 x 28 MNIST digits in pixel space (no autoencoder), 49 tokens of 4 x 4.
    "tiny-mnist": _preset(4, 128, 4, 4, input_size=28, in_channels=1, num_classes=10, freq_shift=1),
}


# -----------------------------------------------------------------------------
# loading and saving in the hub's diffusers layout


def config_from_diffusers(d):
    """Our config from a diffusers DiTTransformer2DModel / Transformer2DModel config.json."""
    in_channels = d.get("in_channels", 4)
    out_channels = d.get("out_channels") or in_channels
    if out_channels not in (in_channels, 2 * in_channels):
        raise checkpoint.CheckpointError(f"config.json: out_channels {out_channels} is neither in_channels "
                                         f"{in_channels} nor twice it (learned variance)")
    if d.get("norm_type", "ada_norm_zero") != "ada_norm_zero" or "num_embeds_ada_norm" not in d:
        raise checkpoint.CheckpointError("config.json: not a DiT (expected norm_type ada_norm_zero and "
                                         "num_embeds_ada_norm, the number of classes)")
    return DiTConfig(
        input_size=d.get("sample_size", 32), patch_size=d.get("patch_size", 2), in_channels=in_channels,
        hidden_size=d["num_attention_heads"] * d["attention_head_dim"], depth=d["num_layers"],
        num_heads=d["num_attention_heads"], num_classes=d["num_embeds_ada_norm"],
        learn_sigma=out_channels == 2 * in_channels, norm_eps=d.get("norm_eps", 1e-5), freq_shift=1)


def config_to_diffusers(cfg):
    """The config.json that diffusers' DiTTransformer2DModel reads for `cfg`."""
    if cfg.freq_shift != 1 or cfg.mlp_ratio != 4.0:
        raise ValueError("the diffusers layout implies freq_shift=1 and mlp_ratio=4")
    return {"_class_name": "DiTTransformer2DModel", "sample_size": cfg.input_size,
            "patch_size": cfg.patch_size, "in_channels": cfg.in_channels, "out_channels": cfg.out_channels,
            "num_layers": cfg.depth, "num_attention_heads": cfg.num_heads,
            "attention_head_dim": cfg.hidden_size // cfg.num_heads, "num_embeds_ada_norm": cfg.num_classes,
            "norm_type": "ada_norm_zero", "norm_eps": cfg.norm_eps, "activation_fn": "gelu-approximate",
            "attention_bias": True, "norm_elementwise_affine": False}


# ours <- diffusers, per block; q, k, v are fused into qkv separately
_BLOCK_KEYS = {"attn.proj": "attn1.to_out.0", "mlp.fc1": "ff.net.0.proj", "mlp.fc2": "ff.net.2",
               "adaLN_modulation.1": "norm1.linear"}
_TOP_KEYS = {"x_embedder.proj": "pos_embed.proj", "final_layer.adaLN_modulation.1": "proj_out_1",
             "final_layer.linear": "proj_out_2"}
_EMBEDDER_KEYS = {"t_embedder.mlp.0": "norm1.emb.timestep_embedder.linear_1",
                  "t_embedder.mlp.2": "norm1.emb.timestep_embedder.linear_2",
                  "y_embedder.embedding_table": "norm1.emb.class_embedder.embedding_table"}


def from_diffusers(sd, depth, source="state dict"):
    """Map a diffusers DiT state dict, its keys already checked, onto ours.

    diffusers stores the timestep and class embedders again in every block, where the paper has one
    of each (its 675M parameters); we load them once, after checking that the copies are equal.
    """
    sd, out = dict(sd), {}
    for ours, theirs in _TOP_KEYS.items():
        for p in ("weight", "bias"):
            out[f"{ours}.{p}"] = sd.pop(f"{theirs}.{p}")
    for ours, theirs in _EMBEDDER_KEYS.items():
        for p in ("weight", "bias") if "embedding_table" not in ours else ("weight",):
            first = out[f"{ours}.{p}"] = sd.pop(f"transformer_blocks.0.{theirs}.{p}")
            for i in range(1, depth):
                copy = sd.pop(f"transformer_blocks.{i}.{theirs}.{p}")
                # (meta tensors, as in the full-size key checks, have no values to compare)
                if not copy.is_meta and not torch.equal(copy, first):
                    raise checkpoint.CheckpointError(
                        f"{source}: transformer_blocks.{i}.{theirs}.{p} differs from block 0's copy "
                        "(DiT shares one embedder across blocks)")
    for i in range(depth):
        b = f"transformer_blocks.{i}."
        for ours, theirs in _BLOCK_KEYS.items():
            for p in ("weight", "bias"):
                out[f"blocks.{i}.{ours}.{p}"] = sd.pop(f"{b}{theirs}.{p}")
        for p in ("weight", "bias"):
            q, k, v = (sd.pop(f"{b}attn1.to_{n}.{p}") for n in "qkv")
            out[f"blocks.{i}.attn.qkv.{p}"] = torch.cat([q, k, v])
    return out


def to_diffusers(sd, depth):
    """Our state dict in diffusers' layout (embedders repeated in every block), the inverse of above."""
    out = {}
    for ours, theirs in _TOP_KEYS.items():
        for p in ("weight", "bias"):
            out[f"{theirs}.{p}"] = sd[f"{ours}.{p}"]
    for i in range(depth):
        b = f"transformer_blocks.{i}."
        for ours, theirs in {**_BLOCK_KEYS, **_EMBEDDER_KEYS}.items():
            for p in ("weight", "bias") if "embedding_table" not in ours else ("weight",):
                if ours in _EMBEDDER_KEYS:  # a copy per block: safetensors stores no shared tensors
                    out[f"{b}{theirs}.{p}"] = sd[f"{ours}.{p}"].clone()
                else:
                    out[f"{b}{theirs}.{p}"] = sd[f"blocks.{i}.{ours}.{p}"]
        for p in ("weight", "bias"):
            for n, part in zip("qkv", sd[f"blocks.{i}.attn.qkv.{p}"].chunk(3)):
                out[f"{b}attn1.to_{n}.{p}"] = part
    return out


# -----------------------------------------------------------------------------
# loading the paper's own checkpoints (facebookresearch/DiT: DiT-XL-2-256x256.pt, train.py's *.pt)
#
# Their keys are ours, plus `pos_embed`, which that code keeps as a frozen parameter. The files hold
# no config: it is read off the tensor shapes, with the paper code's freq_shift 0 and MLP LayerNorm
# eps 1e-6 (this file's defaults).


def find_original(path_or_repo_id, subfolder="transformer"):
    """The .pt file named by `path_or_repo_id`, itself or as the one in a folder with no config.json; else None."""
    path = Path(path_or_repo_id).expanduser()
    if path.is_file():
        return path
    if not path.is_dir() or any((folder / "config.json").is_file() for folder in (path / subfolder, path)):
        return None  # a hub id or a folder in the hub's layout
    files = sorted(path.glob("*.pt"))
    if len(files) > 1:
        raise checkpoint.CheckpointError(f"{path}: holds {len(files)} .pt checkpoints ({files[0].name}, "
                                         f"{files[1].name}, ...); name one of them")
    return files[0] if files else None


def read_original(file):
    """The model's tensors in a .pt file: a state dict, or the EMA weights of train.py's checkpoints."""
    sd = checkpoint.read_torch_file(file)
    if isinstance(sd, dict) and "ema" in sd:
        sd = sd["ema"]  # train.py's {"model", "ema", "opt", "args"}: the EMA weights, as DiT's sample.py takes
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise checkpoint.CheckpointError(f"{file}: not a state dict (expected a dict of tensors, or one under 'ema')")
    return sd


def config_from_original(sd, num_heads=None, source="state dict"):
    """Our config from the tensor shapes of an original checkpoint.

    The number of heads leaves no trace in the shapes: unless given, it is that of the preset of the
    same width and depth (DiT-S, -B, -L, -XL, Table 1).
    """
    for key in ("x_embedder.proj.weight", "pos_embed", "y_embedder.embedding_table.weight",
                "final_layer.linear.weight", "blocks.0.mlp.fc1.weight"):
        if key not in sd:
            raise checkpoint.CheckpointError(f"{source}: missing key {key} (not a facebookresearch/DiT checkpoint)")
    hidden, in_channels, patch, _ = sd["x_embedder.proj.weight"].shape  # (D, C, p, p)
    tokens = sd["pos_embed"].shape[1]  # (1, T, D)
    grid = math.isqrt(tokens)
    if grid * grid != tokens:
        raise checkpoint.CheckpointError(f"{source}: pos_embed has {tokens} positions, not a square grid")
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    if num_heads is None:
        presets = [make() for make in DiT_models.values()]
        same = [c.num_heads for c in presets if (c.hidden_size, c.depth) == (hidden, depth)]
        if not same:
            raise checkpoint.CheckpointError(f"{source}: width {hidden} and depth {depth} are no preset's, and the "
                                             "number of heads is not in the file: pass num_heads")
        num_heads = same[0]
    out_channels = sd["final_layer.linear.weight"].shape[0] // patch**2  # (p*p*C_out, D)
    return DiTConfig(
        input_size=grid * patch, patch_size=patch, in_channels=in_channels, hidden_size=hidden, depth=depth,
        num_heads=num_heads, mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / hidden,
        num_classes=sd["y_embedder.embedding_table.weight"].shape[0] - 1,  # its last row is the null class
        learn_sigma=out_channels == 2 * in_channels, norm_eps=1e-6, freq_shift=0)


def from_original(sd, cfg, source="state dict"):
    """Map an original state dict onto ours: the same keys, less `pos_embed`, checked to be our positions."""
    sd = dict(sd)
    pos = sd.pop("pos_embed", None)
    ours = sincos_2d(cfg.hidden_size, cfg.input_size // cfg.patch_size)[None]  # (1, T, D)
    if pos is None or pos.shape != ours.shape or not torch.allclose(pos.float(), ours, rtol=0, atol=1e-5):
        raise checkpoint.CheckpointError(f"{source}: pos_embed is not the fixed 2-d sin-cos positions of a "
                                         f"{cfg.input_size // cfg.patch_size}^2 grid (DiT does not learn them)")
    return sd


# -----------------------------------------------------------------------------
# loading either layout, saving the hub's


def from_pretrained(path_or_repo_id, subfolder="transformer", dtype=None, device=None, num_heads=None):
    """A DiT from a hub id, a local folder in the hub's layout, or a .pt of the paper's code (or a folder of one)."""
    original = find_original(path_or_repo_id, subfolder)
    if original is not None:  # num_heads: only for a .pt of a model that is no preset (config_from_original)
        sd = read_original(original)
        cfg = config_from_original(sd, num_heads, source=original)
        tensors, source = from_original(sd, cfg, source=original), original
    else:
        folder = checkpoint.resolve(path_or_repo_id, subfolder)
        cfg = config_from_diffusers(checkpoint.read_config(folder))
        files = checkpoint.weight_files(folder)
        tensors, source = checkpoint.read_tensors(files, dtype=dtype), files[0]
    with torch.device("meta"):
        model = DiT(cfg)
    if original is None:  # the file's own keys, checked once in its layout, so that errors name them
        expected = {k: v.shape for k, v in to_diffusers(model.state_dict(), cfg.depth).items()}
        checkpoint.check_keys(expected, tensors, source)
        checkpoint.load_into(model, from_diffusers(tensors, cfg.depth, source), source=source, checked=True)
    else:  # the paper's keys are ours
        checkpoint.load_into(model, tensors, source=source)
    return model.to(device=device, dtype=dtype).eval()


def save_pretrained(model, folder):
    """Write config.json + diffusion_pytorch_model.safetensors in the hub's diffusers layout."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config_to_diffusers(model.config), indent=2) + "\n")
    checkpoint.save_file(to_diffusers(model.state_dict(), model.config.depth),
                         folder / "diffusion_pytorch_model.safetensors")
