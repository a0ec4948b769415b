"""IP-Adapter: an image as a prompt, beside the text (Ye et al., "IP-Adapter: Text Compatible Image Prompt
Adapter for Text-to-Image Diffusion Models", 2023, arXiv 2308.06721), with h94/IP-Adapter's weights.

A CLIP image encoder (image_encoders.VisionEncoder) embeds the image; an image projection turns the
embedding into N tokens as wide as the text tokens (N = 4; the Plus variants resample the encoder's
penultimate hidden states into 16); and beside every cross-attention `attn2` of the UNet a second,
"decoupled" cross-attention with its own keys and values attends to those tokens (paper, eq. 5):

    out = attention(q, K_text, V_text) + scale * attention(q, K_image, V_image)

    file = "IP-Adapter/sdxl_models/ip-adapter_sdxl.safetensors"           # or its .bin twin
    ip = ip_adapter.load(unet, file, scale=0.6)                           # beside unet's attn2 modules
    encoder = image_encoders.VisionEncoder.from_pretrained(ip_adapter.encoder_folder(file))  # image_encoder/
    pixels = encoder.processor([image_encoders.read_image("dog.png")])    # (1, 3, 224, 224)
    tokens, null = ip.encode(encoder, pixels), ip.null(1, encoder)        # (1, N, D) each
    out = adapters.call_with(unet, ip)(x, t, ip_tokens=tokens, **cond)    # one pass with the image
    denoise = guidance.guided(adapters.call_with(unet, ip), w, {**cond, "ip_tokens": tokens},
                              {**null_cond, "ip_tokens": null})           # CFG: the null image in the null half
    denoise = lambda x, t: adapters.call_with(unet, ip, student)(x, t, w=w, ip_tokens=tokens, **cond)  # AGD
    base = ip_adapter.with_image_prompt(base, tokens, null)              # what sample.py samples (families.Base)

The IP-Adapter is an adapters.Attachment: hooks on attn2 that act only inside its scope, so unet.py
knows nothing of it, and it composes with the AGD adapters (hooks on the same attn2, each adding its
own part) and with ControlNet, whose residuals enter the UNet's blocks, not attn2: all three in one
pass equal diffusers' ControlNet pipeline with the IP-Adapter (tested). Attribute names are h94's keys
(image_proj.proj.weight, ip_adapter.1.to_k_ip.weight, ...), so its files load strictly.

Letters in shape comments: B batch, T image tokens of the UNet level, C its width, N image-prompt
tokens, D their width (the text tokens'), E the image encoder's width, nh heads, hd head width.
"""

import dataclasses
from pathlib import Path

import torch
import torch.nn as nn

import adapters
import checkpoint
import families
import hub
import unet

SCALE = 0.6  # the image's weight against the text where none is given: the official AGD code's
PERCEIVER_HEAD_DIM = 64  # the width of the Resampler's heads in every released Plus file (its dim_head)

# -----------------------------------------------------------------------------
# image projections: the encoder's output -> N tokens as wide as the text's


class ImageProjection(nn.Module):
    """IP-Adapter's projection: the image embedding (B, E) -> N tokens (B, N, D), a linear layer and a LayerNorm."""

    plus = False  # takes the image embedding, not the hidden states

    def __init__(self, embed_dim, dim, num_tokens=4):
        super().__init__()
        self.num_tokens = num_tokens
        self.proj = nn.Linear(embed_dim, num_tokens * dim)
        self.norm = nn.LayerNorm(dim)

    in_features = property(lambda self: self.proj.in_features)  # E
    out_features = property(lambda self: self.norm.normalized_shape[0])  # D

    def forward(self, embeds):
        return self.norm(self.proj(embeds).view(len(embeds), self.num_tokens, -1))  # (B, E) -> (B, N, D)


class PerceiverAttention(nn.Module):
    """The latents attend to the image's hidden states and to themselves (Flamingo's perceiver resampler:
    Alayrac et al. 2022, sec. 3.1.1), keys and values from one linear layer."""

    def __init__(self, dim, heads):
        super().__init__()
        inner = heads * PERCEIVER_HEAD_DIM
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)  # of the image's hidden states
        self.norm2 = nn.LayerNorm(dim)  # of the latents
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x, latents):
        x, latents = self.norm1(x), self.norm2(latents)
        B, L, nh = latents.shape[0], latents.shape[1], self.heads
        q = self.to_q(latents).view(B, L, nh, -1).transpose(1, 2)  # (B, nh, L, 64)
        k, v = self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1)  # (B, T + L, nh 64) each
        k, v = (a.view(B, -1, nh, PERCEIVER_HEAD_DIM).transpose(1, 2) for a in (k, v))  # (B, nh, T + L, 64)
        out = nn.functional.scaled_dot_product_attention(q, k, v)  # (B, nh, L, 64)
        return self.to_out(out.transpose(1, 2).reshape(B, L, -1))  # (B, L, dim)


class Resampler(nn.Module):
    """IP-Adapter Plus's projection: L learned latents attend, layer by layer, to the encoder's penultimate
    hidden states (B, T, E) and come out as L tokens (B, L, D) (the reference code's resampler.py)."""

    plus = True  # takes the penultimate hidden states

    def __init__(self, embed_dim, dim, out_dim, depth=4, heads=12, num_queries=16, ff_mult=4):
        super().__init__()
        self.latents = nn.Parameter(torch.empty(1, num_queries, dim))
        self.proj_in = nn.Linear(embed_dim, dim)
        self.proj_out = nn.Linear(dim, out_dim)
        self.norm_out = nn.LayerNorm(out_dim)
        # each layer: attention, then a pre-norm MLP; Sequential indices are the keys (.1.0, .1.1, .1.3)
        self.layers = nn.ModuleList(nn.ModuleList([
            PerceiverAttention(dim, heads),
            nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, ff_mult * dim, bias=False), nn.GELU(),
                          nn.Linear(ff_mult * dim, dim, bias=False))]) for _ in range(depth))

    in_features = property(lambda self: self.proj_in.in_features)  # E
    out_features = property(lambda self: self.norm_out.normalized_shape[0])  # D

    def forward(self, hidden):
        x = self.proj_in(hidden)  # (B, T, E) -> (B, T, dim)
        latents = self.latents.expand(len(x), -1, -1)  # (B, L, dim)
        for attention, mlp in self.layers:
            latents = latents + attention(x, latents)
            latents = latents + mlp(latents)
        return self.norm_out(self.proj_out(latents))  # (B, L, D)


# -----------------------------------------------------------------------------
# the decoupled cross-attention beside every attn2


class DecoupledAttention(nn.Module):
    """The image tokens' own keys and values for one attn2 (paper, eq. 4); its query is attn2's."""

    def __init__(self, dim, width):
        super().__init__()
        self.to_k_ip = nn.Linear(dim, width, bias=False)
        self.to_v_ip = nn.Linear(dim, width, bias=False)


def attention_order(model):
    """The names of a UNet's attention modules in diffusers' order (`unet.attn_processors`): down blocks,
    up blocks, then the mid block, each in module order, attn1 before attn2 in every transformer block.

    diffusers registers up_blocks before it builds mid_block, and h94's files number their decoupled
    attentions by this order (the reference code loads them as a ModuleList of attn_processors.values()),
    so every attn2 has an odd number. unet.py declares mid_block between them, in the order they run.
    """
    rank = {"down_blocks": 0, "up_blocks": 1, "mid_block": 2}
    names = [n for n, m in model.named_modules() if isinstance(m, unet.Attention)]
    return sorted(names, key=lambda n: rank[n.split(".")[0]])  # stable: module order within each part


class IPAdapter(adapters.Attachment):
    """An image projection and a decoupled cross-attention beside every attn2 of a UNet; `scale` weighs
    the image against the text (diffusers' set_ip_adapter_scale; the official AGD code uses 0.6)."""

    keys = ("ip_tokens",)

    def __init__(self, model, image_proj, scale=1.0):
        super().__init__(model, families.unet_sites(model))
        number = {name: i for i, name in enumerate(attention_order(model))}
        self.numbers = [str(number[s.name]) for s in self.sites]  # h94's N of each site
        self.image_proj = image_proj
        self.ip_adapter = nn.ModuleDict({n: DecoupledAttention(image_proj.out_features, s.out_dim)
                                         for n, s in zip(self.numbers, self.sites)})
        modules = dict(model.named_modules())
        self.attn2 = [modules[s.name] for s in self.sites]  # a plain list: the UNet's, not submodules of ours
        self.scale = scale
        self._hook_sites()

    @property
    def plus(self):
        """Whether the image projection takes the encoder's penultimate hidden states (Plus), not its embedding."""
        return self.image_proj.plus

    def ip_state_dict(self):
        """The IP-Adapter's tensors under h94's flat keys: image_proj.*, ip_adapter.N.to_{k,v}_ip.weight."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("model.")}

    def check_encoder(self, encoder):
        """A one-line error unless the image encoder's output is what the image projection takes."""
        c = encoder.config
        width, what = (c.hidden_size, "hidden states") if self.plus else (c.projection_dim, "image embeddings")
        if width != self.image_proj.in_features:
            raise checkpoint.CheckpointError(
                f"the image encoder's {what} are {width} wide, this IP-Adapter's image projection takes "
                f"{self.image_proj.in_features} (h94/IP-Adapter: ip-adapter_sdxl goes with sdxl_models/image_encoder, "
                "the SD 1.5 and *_vit-h files with models/image_encoder)")

    @torch.no_grad()
    def encode(self, encoder, pixels):
        """The image prompt's tokens (B, N, D) of pixels (B, 3, H, W), as `encoder.processor` makes them."""
        self.check_encoder(encoder)
        _, penultimate, embeds = encoder(pixels)  # (B, T, E), (B, E)
        features = penultimate if self.plus else embeds
        return self.image_proj(features.to(next(self.image_proj.parameters())))  # its device and dtype

    @torch.no_grad()
    def null(self, n, encoder=None):
        """The null image's tokens (n, N, D), CFG's unconditional half, as diffusers' encode_image makes them:
        zeros in the CLIP embedding space, projected; Plus: a zero image (in normalized pixels) encoded."""
        if self.plus:
            if encoder is None:
                raise ValueError("an IP-Adapter Plus encodes a zero image for its null: pass the image encoder")
            c = encoder.config
            tokens = self.encode(encoder, torch.zeros(1, c.num_channels, c.image_size, c.image_size))
        else:
            p = next(self.image_proj.parameters())
            tokens = self.image_proj(p.new_zeros(1, self.image_proj.in_features))
        return tokens.expand(n, -1, -1)

    def prepare(self, ip_tokens=None, **_):
        """What the scope holds: per site, the image keys and values folded into attn2's (see fold)."""
        if ip_tokens is None:
            raise ValueError("the IP-Adapter attends to the image prompt: pass ip_tokens= (ip.encode(...); "
                             "in CFG's null condition, ip.null(...))")
        folded = [self.fold(module, self.ip_adapter[n], ip_tokens) for module, n in zip(self.attn2, self.numbers)]
        return {"folded": folded}

    def fold(self, attn2, ip, tokens):
        """(keys, values) of the image tokens (B, N, D) for one attn2, folded: (B, nh N, C) each.

        diffusers' IPAdapterAttnProcessor2_0 (and the reference code's IPAttnProcessor2_0) computes
        to_out(attention(q, K, V) + scale * attention(q, K_ip, V_ip)), q = to_q(x). to_out is linear, so
        the image's part is scale * W_out attention(q, K_ip, V_ip), which the hook adds to attn2's output
        (whose to_out bias that already holds). Per head h, attention(q, K_ip, V_ip)_h = softmax(x W_q,h^T
        K_ip,h^T / sqrt(hd)) V_ip,h, and W_out sums the heads' outputs linearly: so W_q,h folds into the N
        image keys and scale * W_out into the N image values, once per scope. The hook then never repeats
        attn2's projections of the T tokens: 2 T C nh N multiply-adds instead of to_q's and to_out's 2 T C^2,
        N / hd of them (1/16 for 4 tokens and SDXL's 64-wide heads; bench/bench_ip_adapter.py times both).
        """
        w_q, w_out = attn2.to_q.weight, attn2.to_out[0].weight  # (C, C) each
        C, nh = w_q.shape[0], attn2.heads
        hd = C // nh
        tokens = tokens.to(w_q)
        k = ip.to_k_ip(tokens).unflatten(-1, (nh, hd))  # (B, N, nh, hd)
        v = ip.to_v_ip(tokens).unflatten(-1, (nh, hd))  # (B, N, nh, hd)
        keys = torch.einsum("bnhd,hdc->bhnc", k, w_q.view(nh, hd, C)) * hd**-0.5  # (B, nh, N, C), x's space
        values = torch.einsum("bnhd,chd->bhnc", v, w_out.view(C, nh, hd)) * self.scale  # (B, nh, N, C), the output's
        return keys.flatten(1, 2), values.flatten(1, 2)  # (B, nh N, C) each

    def output(self, i, module, args, output, condition):
        """attn2's output plus scale x the decoupled attention of its query to the image tokens."""
        x = args[0]  # (B, T, C): the normed stream attn2 reads
        keys, values = condition["folded"][i]  # (B or 1, nh N, C) each
        if len(keys) not in (1, len(x)):
            raise RuntimeError(f"ip_tokens hold a batch of {len(keys)} but {self.sites[i].name} runs a batch "
                               f"of {len(x)}: give one image's tokens, or one per sample (CFG: the image's, "
                               "then the null's)")
        scores = (x @ keys.transpose(1, 2)).unflatten(-1, (module.heads, -1))  # (B, T, nh, N)
        weights = scores.float().softmax(dim=-1).to(x.dtype).flatten(2)  # each head's softmax, in fp32 (B, T, nh N)
        return output + weights @ values  # (B, T, C)


# -----------------------------------------------------------------------------
# h94/IP-Adapter's files


def read_file(file):
    """An IP-Adapter file's tensors under h94's flat keys: a .safetensors file as it is, or a .bin twin
    ({"image_proj": {...}, "ip_adapter": {...}}, the reference code's torch.save) read weights-only."""
    path = Path(file).expanduser()
    if not path.is_file():
        raise checkpoint.CheckpointError(f"{path}: no such IP-Adapter file")
    if path.suffix == ".safetensors":
        return checkpoint.read_tensors(path)
    state = checkpoint.read_torch_file(path)  # weights-only: tensors and plain containers, no code runs
    parts = ("image_proj", "ip_adapter")
    if isinstance(state, dict) and all(isinstance(state.get(p), dict) for p in parts):
        state = {f"{p}.{k}": v for p in parts for k, v in state[p].items()}
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise checkpoint.CheckpointError(f"{path}: expected {{'image_proj': {{...}}, 'ip_adapter': {{...}}}} of "
                                         "tensors, as h94/IP-Adapter's .bin files hold")
    return state


def image_projection(tensors, source):
    """The image projection that a file's image_proj.* tensors describe (build it on the meta device)."""
    def shape(key):
        if key not in tensors:
            raise checkpoint.CheckpointError(f"{source}: missing key {key}")
        return tuple(tensors[key].shape)

    if "image_proj.proj.weight" in tensors:  # IP-Adapter: one linear layer to N tokens
        (out, embed_dim), (dim,) = shape("image_proj.proj.weight"), shape("image_proj.norm.weight")
        return ImageProjection(embed_dim, dim, out // dim)
    if "image_proj.latents" in tensors:  # IP-Adapter Plus: the Resampler
        _, num_queries, dim = shape("image_proj.latents")
        depth = sum(1 for k in tensors if k.startswith("image_proj.layers.") and k.endswith(".0.to_q.weight"))
        inner = shape("image_proj.layers.0.0.to_q.weight")[0]
        if inner % PERCEIVER_HEAD_DIM:
            raise checkpoint.CheckpointError(f"{source}: image_proj.layers.0.0.to_q.weight has {inner} rows, "
                                             f"not heads of {PERCEIVER_HEAD_DIM}")
        return Resampler(shape("image_proj.proj_in.weight")[1], dim, shape("image_proj.proj_out.weight")[0], depth,
                         inner // PERCEIVER_HEAD_DIM, num_queries, shape("image_proj.layers.0.1.1.weight")[0] // dim)
    raise checkpoint.CheckpointError(f"{source}: not an IP-Adapter file this library reads (expected "
                                     "image_proj.proj.weight, or image_proj.latents for the Plus variants; "
                                     "the Full-face and FaceID variants are not supported)")


def load(model, file, scale=SCALE):
    """An h94/IP-Adapter file (.safetensors, or its .bin twin) beside `model`'s attn2 modules, strictly,
    in the UNet's dtype and on its device; `scale` 0.6 as the official AGD code composes them."""
    if not isinstance(model, unet.UNet):
        raise ValueError(f"an IP-Adapter sits beside a UNet's attn2 modules, not a {type(model).__name__}'s")
    tensors = read_file(file)
    with torch.device("meta"):
        image_proj = image_projection(tensors, file)
    width = model.config.cross_attention_dim
    if image_proj.out_features != width:
        raise checkpoint.CheckpointError(f"{file}: an IP-Adapter for {image_proj.out_features}-wide cross-attention, "
                                         f"but this UNet attends to {width}-wide text tokens "
                                         "(SD 1.5: 768, SDXL: 2048)")
    with torch.device("meta"):
        ip = IPAdapter(model, image_proj, scale)
    p = next(model.parameters())
    try:
        checkpoint.check_keys({k: v.shape for k, v in ip.ip_state_dict().items()}, tensors, file)
        for name in ("image_proj", "ip_adapter"):
            prefix = name + "."
            own = {k[len(prefix):]: v.to(p.device, p.dtype) for k, v in tensors.items() if k.startswith(prefix)}
            getattr(ip, name).load_state_dict(own, strict=True, assign=True)
    except Exception:
        ip.detach()  # a file that does not load leaves the UNet without hooks
        raise
    for tensor in ip.ip_state_dict().values():
        tensor.requires_grad_(False)  # frozen beside a frozen base
    return ip


def fetch(spec):
    """(a local IP-Adapter file, its image encoder as (folder or hub id, subfolder)) for a file, or for a hub
    id user/repo/path/file, fetched through the hub cache as hub.py fetches adapters:

        fetch("h94/IP-Adapter/sdxl_models/ip-adapter_sdxl.safetensors")
        # -> (<hub cache>/.../sdxl_models/ip-adapter_sdxl.safetensors, ("h94/IP-Adapter", "sdxl_models/image_encoder"))

    The encoder is where encoder_folder says, in the same repo; VisionEncoder.from_pretrained fetches it.
    """
    path, parts = Path(spec).expanduser(), str(spec).split("/")
    if path.exists() or str(spec).startswith((".", "/", "~")) or len(parts) < 3:
        return path, (encoder_folder(path), None)
    repo_id, filename = "/".join(parts[:2]), "/".join(parts[2:])
    file = hub._download(repo_id, filename, what=str(spec))
    return file, (repo_id, encoder_folder(Path(filename)).as_posix())  # the same repo's folder, fetched on use


def encoder_folder(file):
    """The image encoder of an h94/IP-Adapter file, in its repo's layout: the image_encoder/ folder beside
    it; for SDXL's *_vit-h files (in sdxl_models/), models/image_encoder, the ViT-H/14 they were trained on."""
    path = Path(file).expanduser()
    if "vit-h" in path.name and path.parent.name == "sdxl_models":
        return path.parent.parent / "models" / "image_encoder"
    return path.parent / "image_encoder"


def with_image_prompt(base, tokens, null_tokens):
    """A families.Base whose conditions also hold the image prompt's tokens (`ip_tokens`, one row per
    sample) and whose null conditions the null image's, so that CFG batches them as it batches the text."""
    def encode(conditions):
        return {**base.encode(conditions), "ip_tokens": tokens.expand(len(conditions), -1, -1)}

    def null(n, negative=None):
        return {**base.null(n, negative), "ip_tokens": null_tokens.expand(n, -1, -1)}

    return dataclasses.replace(base, encode=encode, null=null)
