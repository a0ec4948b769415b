"""control_image.py: Canny edges against cv2.Canny pixel by pixel, control images as diffusers prepares them."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from scipy import ndimage

import control_image

cv2 = pytest.importorskip("cv2")  # opencv-python-headless, test-only


def scaled(a):
    """Any array to uint8 over its full range."""
    return np.round((a - a.min()) / (a.max() - a.min()) * 255).astype(np.uint8)


def drawing(size=(160, 120)):
    """Shapes, lines and text on a coloured ground: hard edges in every direction, corners, ties."""
    image = Image.new("RGB", size, (30, 60, 90))
    d = ImageDraw.Draw(image)
    d.ellipse((10, 10, 80, 70), fill=(200, 40, 40))
    d.rectangle((60, 30, 140, 100), fill=(20, 220, 120), outline=(255, 255, 255))
    d.polygon([(100, 5), (155, 20), (120, 60)], fill=(250, 200, 0))
    d.line((0, 119, 159, 0), fill=(0, 0, 0), width=2)
    d.text((8, 100), "adapter guidance", fill=(255, 255, 0))
    return np.asarray(image)


def images():
    rng = np.random.default_rng(0)
    yield "smooth grey noise", scaled(ndimage.gaussian_filter(rng.random((97, 130)), 3))
    yield "smooth colour noise", scaled(ndimage.gaussian_filter(rng.random((64, 80, 3)), (1.5, 1.5, 0)))
    yield "white noise, colour", (rng.random((50, 60, 3)) * 255).astype(np.uint8)
    yield "drawing, colour", drawing()
    yield "drawing, grey", np.asarray(Image.fromarray(drawing()).convert("L"))
    ramp = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (40, 1))  # flat steps: equal magnitudes side by side
    yield "ramp", np.concatenate([ramp, ramp[::-1, ::-1]], axis=0)
    yield "thin strip", scaled(rng.random((3, 40)))


@pytest.mark.parametrize("name, image", list(images()), ids=[n for n, _ in images()])
def test_canny_equals_opencv(name, image):
    expected = cv2.Canny(image, 100, 200)
    ours = control_image.canny_edges(image, 100, 200)
    assert ours.dtype == np.uint8 and ours.shape == image.shape[:2]
    agreement = (ours == expected).mean()
    assert agreement == 1.0, f"{name}: {agreement:.6f} of pixels agree"
    if name != "thin strip":
        assert 0.005 < (expected > 0).mean() < 0.6  # an edge map with something in it, not all edges
    # other thresholds, given either way round, as OpenCV takes them
    assert np.array_equal(control_image.canny_edges(image, 150, 50), cv2.Canny(image, 150, 50))


def test_canny_image_is_the_official_control():
    """np.array(image) -> cv2.Canny(100, 200) -> the edges stacked as RGB, as the official AGD code makes it."""
    image = Image.fromarray(drawing()).convert("RGBA")
    edges = control_image.canny(image)
    assert edges.mode == "RGB" and edges.size == image.size
    expected = cv2.Canny(np.array(image.convert("RGB")), 100, 200)
    assert np.array_equal(np.asarray(edges), np.repeat(expected[:, :, None], 3, axis=2))
    with pytest.raises(ValueError, match="expected a uint8"):
        control_image.canny_edges(np.zeros((4, 4), dtype=np.float32))


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P"])
@pytest.mark.parametrize("size", [None, (48, 40)])
def test_prepare_matches_diffusers(mode, size):
    from diffusers.image_processor import VaeImageProcessor

    processor = VaeImageProcessor(vae_scale_factor=8, do_convert_rgb=True, do_normalize=False)  # the pipelines'
    rgba = Image.fromarray(np.concatenate([drawing(), np.full((120, 160, 1), 128, np.uint8)], axis=2), "RGBA")
    image = rgba.convert(mode).resize((157, 121))  # sides that are not multiples of 8
    height, width = size or (None, None)
    expected = processor.preprocess(image, height=height, width=width)
    ours = control_image.prepare(image, height, width)
    assert ours.shape == expected.shape == (1, 3, *(size or (120, 152)))  # rounded down when not given
    assert ours.dtype == torch.float32 and 0 <= ours.min() and ours.max() <= 1
    assert torch.equal(ours, expected)


def test_bad_control_images_are_one_line_errors(tmp_path):
    text = tmp_path / "edges.png"
    text.write_text("not an image")
    with pytest.raises(ValueError, match="edges.png: not an image PIL can read") as e:
        control_image.load_image(text)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="no such control image file"):
        control_image.load_image(tmp_path / "missing.png")
    with pytest.raises(ValueError, match="too small"):
        control_image.prepare(Image.new("RGB", (7, 30)))
    Image.fromarray(drawing()).save(tmp_path / "ok.png")
    assert control_image.load_image(tmp_path / "ok.png").size == (160, 120)
