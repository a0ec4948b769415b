"""image_encoders.py: CLIP's vision towers and image preprocessing against transformers.

The tower against CLIPVisionModelWithProjection on identical random weights (every parameter,
LayerNorms included): image embedding, penultimate and last hidden states; the full-size ViT-H/14
and ViT-bigG/14 of h94/IP-Adapter key by key and shape by shape on the meta device; the
preprocessing against CLIPImageProcessor's PIL path on non-square images of several modes; and
the one-line errors of a missing or unreadable image. No network.
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModelWithProjection

import checkpoint
import image_encoders as ie
from tiny_pipelines import randomize, tiny_vision_config
from util import max_rel_err

# config.json of h94/IP-Adapter's models/image_encoder and sdxl_models/image_encoder (their model fields)
H94_VIT_H = dict(architectures=["CLIPVisionModelWithProjection"], hidden_act="gelu", hidden_size=1280, image_size=224,
                 intermediate_size=5120, layer_norm_eps=1e-05, model_type="clip_vision_model", num_attention_heads=16,
                 num_channels=3, num_hidden_layers=32, patch_size=14, projection_dim=1024)
H94_VIT_BIGG = {**H94_VIT_H, "hidden_size": 1664, "intermediate_size": 8192, "num_hidden_layers": 48,
                "projection_dim": 1280}


@pytest.mark.parametrize("hidden_act", ["gelu", "quick_gelu"])
def test_vision_tower_matches_transformers(tmp_path, hidden_act):
    ref = randomize(CLIPVisionModelWithProjection(tiny_vision_config(24, hidden_act))).eval()
    ref.save_pretrained(tmp_path)
    # files written before transformers 4.31, h94's among them, also hold the fixed position_ids
    file = tmp_path / "model.safetensors"
    save_file({**load_file(file), "vision_model.embeddings.position_ids": torch.arange(17)[None]}, file)
    ours = ie.VisionEncoder.from_pretrained(tmp_path)
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ref(pixels, output_hidden_states=True)
        last, penultimate, embeds = ours(pixels)
    assert embeds.shape == (3, 24) and penultimate.shape == last.shape == (3, 17, 32)
    assert max_rel_err(embeds, expected.image_embeds) < 1e-5
    assert max_rel_err(penultimate, expected.hidden_states[-2]) < 1e-5
    assert max_rel_err(last, expected.last_hidden_state) < 1e-5
    assert max_rel_err(penultimate, last) > 0.1  # two different layers' states: the comparison could fail
    assert (ours.processor.size, ours.processor.crop_size) == (32, (32, 32))  # the config's image size


@pytest.mark.parametrize("name, config", [("ViT-H/14", H94_VIT_H), ("ViT-bigG/14", H94_VIT_BIGG)],
                         ids=["ViT-H/14", "ViT-bigG/14"])
def test_full_size_vision_towers_have_every_official_key(name, config):
    assert ie.VisionConfig.from_hub(config) == ie.VISION_PRESETS[name]()
    with torch.device("meta"):
        ref = CLIPVisionModelWithProjection(CLIPVisionConfig(**config))
        ours = ie.VisionEncoder(ie.VISION_PRESETS[name]())
    expected = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == expected
    assert expected["vision_model.embeddings.position_embedding.weight"] == (257, config["hidden_size"])
    assert expected["visual_projection.weight"] == (config["projection_dim"], config["hidden_size"])


def random_images():
    """Non-square random images of several sizes and modes: RGB, RGBA with random alpha, grey, palette."""
    rng = np.random.default_rng(0)
    images = []
    for (w, h), mode in zip([(37, 53), (300, 200), (225, 224), (31, 90), (64, 33), (50, 51)],
                            ["RGB", "RGBA", "L", "P", "RGBA", "RGB"]):
        a = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
        image = Image.fromarray(a, "RGBA")  # the alpha channel random: transparency is laid over white
        images.append(image if mode == "RGBA" else Image.fromarray(a[..., :3]).convert(mode))
    return images


@pytest.mark.parametrize("side", [32, 224])
def test_preprocessing_matches_clip_image_processor(side):
    """Shortest side resized bicubic with PIL, long side truncated, centre crop, rescale, CLIP's mean / std."""
    images = random_images()
    # CLIPImageProcessor is this class where torchvision is absent (here); torchvision's bicubic differs
    expected = CLIPImageProcessorPil(size=side, crop_size=side)(images, return_tensors="pt").pixel_values
    ours = ie.ImageProcessor(side, (side, side))(images)
    assert ours.shape == expected.shape == (len(images), 3, side, side) and ours.dtype == torch.float32
    assert (ours - expected).abs().max() < 1e-6
    one = ie.ImageProcessor(side, (side, side))(images[1])  # one image, not a list
    assert torch.equal(one, ours[1:2])


def test_preprocessing_reads_a_preprocessor_config(tmp_path):
    config = {"size": {"shortest_edge": 40}, "crop_size": {"height": 32, "width": 36}, "image_mean": [0.5, 0.4, 0.3],
              "image_std": [0.2, 0.25, 0.3], "rescale_factor": 1 / 127.5, "resample": 3, "do_resize": True,
              "do_center_crop": True, "do_rescale": True, "do_normalize": True}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    images = random_images()
    processor = ie.ImageProcessor.from_folder(tmp_path, image_size=224)
    expected = CLIPImageProcessorPil(**config)(images, return_tensors="pt").pixel_values
    assert expected.shape == (len(images), 3, 32, 36)
    assert (processor(images) - expected).abs().max() < 1e-6
    # without the file: CLIP's defaults at the encoder's image size
    assert ie.ImageProcessor.from_folder(tmp_path / "elsewhere", image_size=32) == ie.ImageProcessor(32, (32, 32))
    for change, message in [({"do_center_crop": False}, "do_center_crop=false is not supported"),
                            ({"resample": 2}, "resample=2 is not supported")]:
        (tmp_path / "preprocessor_config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(checkpoint.CheckpointError, match=message):
            ie.ImageProcessor.from_folder(tmp_path, image_size=224)


def test_image_and_config_errors(tmp_path):
    with pytest.raises(ValueError, match="no such image file") as e:
        ie.read_image(tmp_path / "missing.png")
    assert "\n" not in str(e.value)
    (tmp_path / "garbage.png").write_bytes(b"not an image at all")
    Image.fromarray(np.zeros((64, 64, 3), np.uint8) + 7).save(tmp_path / "whole.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "whole.png").read_bytes()[:60])
    for name in ("garbage.png", "cut.png"):
        with pytest.raises(ValueError, match="not a readable image") as e:
            ie.read_image(tmp_path / name)
        assert str(tmp_path / name) in str(e.value) and "\n" not in str(e.value)
    assert ie.read_image(tmp_path / "whole.png").size == (64, 64)
    with pytest.raises(ValueError, match="expected PIL images"):
        ie.ImageProcessor(32, (32, 32))([torch.zeros(3, 32, 32)])
    encoder = ie.VisionEncoder(ie.VisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=1, num_attention_heads=4, projection_dim=8))
    with pytest.raises(ValueError, match=r"expected \(B, 3, 32, 32\)"):
        encoder(torch.zeros(1, 3, 224, 224))
    with pytest.raises(checkpoint.CheckpointError, match="a whole CLIP model"):
        ie.VisionConfig.from_hub({"vision_config": {}, "text_config": {}})
    with pytest.raises(checkpoint.CheckpointError, match="missing patch_size"):
        ie.VisionConfig.from_hub({k: v for k, v in H94_VIT_H.items() if k != "patch_size"})
