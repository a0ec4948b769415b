"""CLIP's vision towers and image preprocessing, as IP-Adapter uses them (h94/IP-Adapter's image encoders).

    encoder = VisionEncoder.from_pretrained(folder)           # CLIPVisionModelWithProjection's folder
    pixels = encoder.processor([read_image("cat.png")])       # CLIPImageProcessor's preprocessing, (B, 3, 224, 224)
    last, penultimate, embeds = encoder(pixels)               # hidden states (B, T, D), image embedding (B, P)

The towers are OpenCLIP's ViT-H/14 (models/image_encoder: SD 1.5's IP-Adapters and SDXL's *_vit-h)
and ViT-bigG/14 (sdxl_models/image_encoder: ip-adapter_sdxl), trained on LAION-2B (Cherti et al.,
"Reproducible scaling laws for contrastive language-image learning", 2023) as ViTs (Dosovitskiy et
al., "An Image is Worth 16x16 Words", 2021). Their transformer layer is the text towers'
(text_encoders.EncoderLayer), without the causal mask. Attribute names are the keys of the hub's
transformers checkpoints (vision_model.pre_layrnorm.weight, visual_projection.weight, ...).

Letters in shape comments: B batch, T tokens (1 + patches), D hidden size, P projection size,
C channels, H x W pixels.
"""

from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

import checkpoint
from text_encoders import EncoderLayer, read_json, run_layers, tower_fields

# -----------------------------------------------------------------------------
# configs


@dataclass
class VisionConfig:
    """A CLIP vision tower and its projection; the fields are those of the hub's config.json
    (transformers' CLIPVisionConfig, for a CLIPVisionModelWithProjection). Defaults: ViT-H/14's."""

    image_size: int = 224  # H = W: the side of the images the tower takes
    patch_size: int = 14  # each patch of 14 x 14 pixels is a token, after one class token
    num_channels: int = 3  # C
    hidden_size: int = 1280  # D
    intermediate_size: int = 5120  # the MLP's hidden size, 4 D
    num_hidden_layers: int = 32
    num_attention_heads: int = 16  # nh
    hidden_act: str = "gelu"  # OpenCLIP's towers: the exact (erf) GELU
    layer_norm_eps: float = 1e-5
    projection_dim: int = 1024  # P: visual_projection's output, the image embedding

    @property
    def num_positions(self):
        """T: one class token and (image_size / patch_size)^2 patches."""
        return (self.image_size // self.patch_size) ** 2 + 1

    @classmethod
    def from_hub(cls, config, source="config.json"):
        """The config of a hub image encoder's config.json; its other keys are ignored."""
        if "vision_config" in config:
            raise checkpoint.CheckpointError(f"{source}: a whole CLIP model (text and vision); expected a "
                                             "CLIPVisionModelWithProjection folder, as h94/IP-Adapter's image_encoder")
        return cls(**tower_fields(config, [f.name for f in fields(cls)], "CLIPVisionConfig", source))


# The image encoders of h94/IP-Adapter, as their config.json describe them (OpenCLIP's LAION-2B towers).
VISION_PRESETS = {
    # models/image_encoder: SD 1.5's IP-Adapters, and SDXL's *_vit-h ones
    "ViT-H/14": lambda: VisionConfig(),
    # sdxl_models/image_encoder: ip-adapter_sdxl
    "ViT-bigG/14": lambda: VisionConfig(hidden_size=1664, intermediate_size=8192, num_hidden_layers=48,
                                        projection_dim=1280),
}


# -----------------------------------------------------------------------------
# the tower


class VisionEmbeddings(nn.Module):
    """A learned class token, then a linear embedding of each patch, plus a learned embedding of each position
    (ViT: Dosovitskiy et al., "An Image is Worth 16x16 Words", 2021, eq. 1)."""

    def __init__(self, config):
        super().__init__()
        D, p = config.hidden_size, config.patch_size
        self.class_embedding = nn.Parameter(torch.empty(D))
        self.patch_embedding = nn.Conv2d(config.num_channels, D, kernel_size=p, stride=p, bias=False)
        self.position_embedding = nn.Embedding(config.num_positions, D)

    def forward(self, pixels):
        patches = self.patch_embedding(pixels).flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, T - 1, D)
        first = self.class_embedding.expand(len(patches), 1, -1)  # (B, 1, D)
        return torch.cat([first, patches], dim=1) + self.position_embedding.weight  # (B, T, D)


class VisionTransformer(nn.Module):
    """CLIP's vision transformer: the checkpoints' `vision_model`."""

    def __init__(self, config):
        super().__init__()
        self.embeddings = VisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)  # sic: the checkpoints' key
        self.encoder = nn.ModuleDict(dict(layers=nn.ModuleList(EncoderLayer(config, causal=False)
                                                               for _ in range(config.num_hidden_layers))))
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixels):
        """pixels (B, C, H, W) -> last and penultimate hidden states (B, T, D), the class token's, normed (B, D)."""
        last, penultimate = run_layers(self.encoder.layers, self.pre_layrnorm(self.embeddings(pixels)))
        return last, penultimate, self.post_layernorm(last[:, 0])


class VisionEncoder(nn.Module):
    """A CLIP vision tower as the hub stores it (CLIPVisionModelWithProjection): `vision_model`,
    `visual_projection`; and the preprocessing of the images it takes."""

    def __init__(self, config, processor=None):
        super().__init__()
        self.config = config
        self.vision_model = VisionTransformer(config)
        self.visual_projection = nn.Linear(config.hidden_size, config.projection_dim, bias=False)
        self.processor = processor or ImageProcessor(config.image_size, (config.image_size,) * 2)

    def forward(self, pixels):
        """pixels (B, C, H, W) -> (last hidden states (B, T, D), penultimate (B, T, D), image embedding (B, P))."""
        c = self.config
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (c.num_channels, c.image_size, c.image_size):
            raise ValueError(f"pixels: expected (B, {c.num_channels}, {c.image_size}, {c.image_size}) "
                             f"(encoder.processor makes them), got {tuple(pixels.shape)}")
        last, penultimate, pooled = self.vision_model(pixels.to(self.visual_projection.weight))
        return last, penultimate, self.visual_projection(pooled)

    @classmethod
    def from_pretrained(cls, path_or_repo_id, subfolder="image_encoder", dtype=None, device=None):
        """An image encoder from a hub id or local folder (config.json + model.safetensors), and its
        preprocessing: the folder's preprocessor_config.json, else CLIP's at the config's image size."""
        folder = checkpoint.resolve(path_or_repo_id, subfolder)
        config = VisionConfig.from_hub(checkpoint.read_config(folder), source=folder / "config.json")
        with torch.device("meta"):
            model = cls(config, ImageProcessor.from_folder(folder, config.image_size))
        files = checkpoint.weight_files(folder)
        # Checkpoints written before transformers 4.31 (h94's among them) also hold the fixed buffer
        # vision_model.embeddings.position_ids = arange(T); transformers ignores it on load, as we do.
        tensors = {k: v for k, v in checkpoint.read_tensors(files, dtype=dtype).items()
                   if not k.endswith("embeddings.position_ids")}
        checkpoint.load_into(model, tensors, source=files[0])
        return model.to(device=device).eval()


# -----------------------------------------------------------------------------
# images

# OpenAI CLIP's normalization of RGB in [0, 1], which CLIPImageProcessor defaults to and OpenCLIP's towers share.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def read_image(file):
    """An image file as a PIL image, or a one-line ValueError (missing, unreadable)."""
    path = Path(file).expanduser()
    if not path.is_file():
        raise ValueError(f"{path}: no such image file")
    try:
        image = Image.open(path)
        image.load()  # decode now: a truncated or corrupt file fails here, not later
    except (OSError, SyntaxError, ValueError) as e:  # PIL's UnidentifiedImageError is an OSError
        raise ValueError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None
    return image


@dataclass
class ImageProcessor:
    """PIL images -> pixels (B, 3, H, W), as transformers' CLIPImageProcessor does it without torchvision
    (its PIL path): RGB, shortest side resized bicubic, centre crop, rescale to [0, 1], mean / std."""

    size: int = 224  # the shortest side after resizing; the long side keeps the aspect ratio, truncated
    crop_size: tuple = (224, 224)  # (H, W) of the centre crop
    mean: tuple = CLIP_MEAN
    std: tuple = CLIP_STD
    rescale_factor: float = 1 / 255

    def __post_init__(self):
        if max(self.crop_size) > self.size:  # CLIPImageProcessor would pad with zeros; no CLIP config does
            raise ValueError(f"crop_size {tuple(self.crop_size)} is larger than the resized side {self.size}")

    @classmethod
    def from_folder(cls, folder, image_size):
        """The folder's preprocessor_config.json (a CLIPImageProcessor's), else CLIP's at `image_size`."""
        file = Path(folder) / "preprocessor_config.json"
        c = read_json(file, default={"size": image_size, "crop_size": image_size})
        unsupported = [k for k in ("do_resize", "do_center_crop", "do_rescale", "do_normalize") if not c.get(k, True)]
        if unsupported or c.get("resample", 3) != 3:  # 3: PIL's BICUBIC
            what = f"{unsupported[0]}=false" if unsupported else f"resample={c['resample']}"
            raise checkpoint.CheckpointError(f"{file}: {what} is not supported (CLIP resizes bicubic, crops, "
                                             "rescales and normalizes)")
        size, crop = c.get("size", image_size), c.get("crop_size", image_size)
        try:
            size = size if isinstance(size, int) else size["shortest_edge"]
            crop = (crop, crop) if isinstance(crop, int) else (crop["height"], crop["width"])
            return cls(size, crop, tuple(c.get("image_mean", CLIP_MEAN)), tuple(c.get("image_std", CLIP_STD)),
                       c.get("rescale_factor", 1 / 255))
        except (KeyError, TypeError, ValueError) as e:
            raise checkpoint.CheckpointError(f"{file}: size / crop_size not understood ({e})") from None

    def __call__(self, images):
        """A PIL image or a list of them -> float32 pixels (B, 3, H, W) on the CPU."""
        images = [images] if isinstance(images, Image.Image) else list(images)
        return torch.stack([self.one(image) for image in images])

    def one(self, image):
        image = rgb(image)
        w, h = image.size
        long = int(self.size * max(w, h) / min(w, h))  # truncated, as transformers' get_resize_output_image_size
        w, h = (self.size, long) if w <= h else (long, self.size)
        a = np.asarray(image.resize((w, h), resample=Image.BICUBIC))  # (H, W, 3) uint8
        ch, cw = self.crop_size
        top, left = (h - ch) // 2, (w - cw) // 2
        a = a[top:top + ch, left:left + cw]
        # in transformers' dtypes and order: rescaled in float64 then cast, normalized in float32
        x = (a.astype(np.float64) * self.rescale_factor).astype(np.float32)
        x = (x - np.array(self.mean, dtype=np.float32)) / np.array(self.std, dtype=np.float32)
        return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))  # (3, H, W)


def rgb(image):
    """RGB, any transparency laid over white (transformers 5's convert_to_rgb)."""
    if not isinstance(image, Image.Image):
        raise ValueError(f"images: expected PIL images, got {type(image).__name__}")
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")
