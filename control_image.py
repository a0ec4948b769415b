"""Control images for ControlNet: read, prepared as diffusers' ControlNet pipelines prepare them, and Canny edges.

    image = load_image("photo.png")
    edges = canny(image)                                   # PIL RGB, edges white: what the official AGD code feeds
    control = prepare(edges)                               # (1, 3, H, W) in [0, 1], H and W multiples of 8
    height, width = control.shape[-2:]                     # the output size, when none was asked for

The Canny detector is OpenCV's `cv2.Canny(image, 100, 200)` (aperture 3, L1 gradient) written with
numpy and scipy, so that the library needs no OpenCV at run time: the same integer Sobel gradients,
the same non-maximum suppression with its tan(22.5 deg) test in fixed point, the same hysteresis
(tests/test_control_image.py checks it against cv2.Canny pixel by pixel).
"""

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from scipy import ndimage

# -----------------------------------------------------------------------------
# reading and preparing


def load_image(file):
    """An image file as a PIL image, or a one-line error that says what is wrong with it."""
    file = Path(file)
    if not file.is_file():
        raise ValueError(f"{file}: no such control image file")
    try:
        image = Image.open(file)
        image.load()
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{file}: not an image PIL can read ({type(e).__name__}); give a PNG or JPEG") from None
    return image


def default_size(image, height=None, width=None, multiple=8):
    """(height, width): those given, else the image's, each rounded down to a multiple of `multiple` (the VAE's 8)."""
    height = image.height if height is None else height
    width = image.width if width is None else width
    return height - height % multiple, width - width % multiple


def prepare(image, height=None, width=None, multiple=8):
    """A PIL image as the ControlNet pipelines of diffusers take it: (1, 3, H, W) float32 in [0, 1].

    Resized with Lanczos to (height, width), the aspect ratio not kept, then RGB; in this order, as
    their VaeImageProcessor(do_convert_rgb=True, do_normalize=False) does it (the order matters for
    RGBA and palette images).
    """
    height, width = default_size(image, height, width, multiple)
    if height < multiple or width < multiple:
        raise ValueError(f"control image of {image.width} x {image.height} px: too small for {width} x {height} output")
    image = image.resize((width, height), resample=Image.LANCZOS).convert("RGB")
    array = np.asarray(image, dtype=np.float32) / 255.0                    # (H, W, 3)
    return torch.from_numpy(array).permute(2, 0, 1)[None].contiguous()     # (1, 3, H, W)


# -----------------------------------------------------------------------------
# Canny edges (Canny 1986), exactly as OpenCV computes them

TG22 = round(0.4142135623730950488 * (1 << 15))  # tan(22.5 deg) in OpenCV's 15-bit fixed point: 13573
SHIFT = 15


def _sobel(image):
    """OpenCV's 3 x 3 Sobel derivatives (dx, dy) of an (H, W, C) integer array, borders replicated."""
    p = np.pad(image.astype(np.int32), ((1, 1), (1, 1), (0, 0)), mode="edge")
    smooth_rows = p[:-2] + 2 * p[1:-1] + p[2:]                            # [1, 2, 1] down each column
    smooth_cols = p[:, :-2] + 2 * p[:, 1:-1] + p[:, 2:]                   # [1, 2, 1] along each row
    dx = smooth_rows[:, 2:] - smooth_rows[:, :-2]                          # (H, W, C): right minus left
    dy = smooth_cols[2:] - smooth_cols[:-2]                                # (H, W, C): below minus above
    return dx, dy


def canny_edges(image, low=100, high=200):
    """Edges of a uint8 (H, W) or (H, W, C) array: uint8 (H, W), 255 on edges, as cv2.Canny(image, low, high).

    A colour image is not made grey first: at each pixel OpenCV keeps the gradient of the channel
    where it is largest (L1 norm, the first channel on ties).
    """
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim not in (2, 3):
        raise ValueError(f"canny: expected a uint8 (H, W) or (H, W, C) array, got {image.dtype} {image.shape}")
    low, high = sorted((int(np.floor(low)), int(np.floor(high))))  # OpenCV swaps them if given the other way
    dx, dy = _sobel(image if image.ndim == 3 else image[:, :, None])
    norms = np.abs(dx) + np.abs(dy)                                        # (H, W, C)
    pick = norms.argmax(axis=2)[:, :, None]                                # the first largest channel
    mag = np.take_along_axis(norms, pick, 2)[:, :, 0]                      # (H, W)
    dx, dy = np.take_along_axis(dx, pick, 2)[:, :, 0], np.take_along_axis(dy, pick, 2)[:, :, 0]

    # non-maximum suppression along the gradient's direction, quantized to 0, 45, 90 or 135 degrees;
    # magnitudes outside the image count as 0. Ties are broken as OpenCV breaks them: strictly above the
    # neighbour before, at least the one after (along rows and columns), strictly above both on diagonals.
    m = np.pad(mag, 1)
    centre = m[1:-1, 1:-1]
    left, right, above, below = m[1:-1, :-2], m[1:-1, 2:], m[:-2, 1:-1], m[2:, 1:-1]
    x, y = np.abs(dx).astype(np.int64), np.abs(dy).astype(np.int64) << SHIFT
    tg22x = x * TG22
    tg67x = tg22x + (x << (SHIFT + 1))                                     # tan(67.5) = tan(22.5) + 2
    horizontal = y < tg22x
    vertical = ~horizontal & (y > tg67x)
    same_sign = (dx ^ dy) >= 0  # the gradient points down-right or up-left: the diagonal from top-left
    diagonal_max = np.where(same_sign, (centre > m[:-2, :-2]) & (centre > m[2:, 2:]),
                            (centre > m[:-2, 2:]) & (centre > m[2:, :-2]))
    is_max = np.where(horizontal, (centre > left) & (centre >= right),
                      np.where(vertical, (centre > above) & (centre >= below), diagonal_max))
    candidate = is_max & (mag > low)

    # hysteresis: a candidate is an edge if it is connected (8-neighbours) to one above `high`
    labels, _ = ndimage.label(candidate, structure=np.ones((3, 3), dtype=bool))
    strong = np.unique(labels[candidate & (mag > high)])
    return np.where(np.isin(labels, strong[strong > 0]), 255, 0).astype(np.uint8)


def canny(image, low=100, high=200):
    """Canny edges of a PIL image as a white-on-black RGB image, as the official AGD code makes its control.

    It runs cv2.Canny(np.array(image), 100, 200) on the RGB pixels and stacks the edges three times.
    """
    edges = canny_edges(np.asarray(image.convert("RGB")), low, high)      # (H, W)
    return Image.fromarray(np.repeat(edges[:, :, None], 3, axis=2))
