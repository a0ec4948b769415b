"""Frechet Inception Distance with the same numbers as pytorch-fid, and improved precision and recall.

FID (Heusel et al. 2017, "GANs trained by a two time-scale update rule converge to a local Nash
equilibrium") fits a Gaussian to the pool3 features of each image set and measures
    d^2 = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)).
The features are those of the Inception-v3 graph of TensorFlow's FID code (2015-12-05) as ported by
pytorch-fid (mseitzer/pytorch-fid), the FID most PyTorch papers report: its weights
pt_inception-2015-12-05-6726825d.pth in torchvision's Inception3 layout, with "Patch:"es where the TF
graph differs from torchvision (average pools that skip the padding, a max pool in the last block).
It is written out here in full, with pytorch-fid's resize and normalization; tests/test_fid.py checks
its features against pytorch-fid's on identical weights. (pytorch-fid differs slightly from the TF
original, chiefly by the bilinear resize: its README reports 0.0009 relative on LSUN.)

Improved precision and recall (Kynkaanniemi et al. 2019, "Improved precision and recall metric for
assessing generative models") use the same features: k = 3 nearest-neighbour balls around each real
(or generated) feature estimate that set's manifold, as in the ADM evaluator that AGD reports.

    python fid.py samples/ reference/                  # FID of two folders of images
    python fid.py --save-stats reference/ ref.npz      # reference statistics once, then
    python fid.py samples/ ref.npz                     # FID against them
    python fid.py samples.npz reference/ --precision-recall
"""

import argparse
import hashlib
import os
import sys
import warnings
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from scipy import linalg
from tqdm import tqdm

import checkpoint

FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")
FID_WEIGHTS_SHA256_PREFIX = "6726825d"  # torch.hub's convention: the name ends in its hash's first digits
INPUT_SIZE = 299  # Inception-v3's input resolution; every image is resized to it
FEATURE_DIM = 2048  # pool3, the final average pool
BN_EPS = 0.001  # TensorFlow's batch norm epsilon, kept by torchvision's and pytorch-fid's port
IMAGE_EXTENSIONS = {"bmp", "jpg", "jpeg", "pgm", "png", "ppm", "tif", "tiff", "webp"}  # pytorch-fid's
BATCH_SIZE = 50  # pytorch-fid's default
NUM_WORKERS = min(8, os.cpu_count() or 1)  # image-decoding threads (pytorch-fid: min(8, CPUs) processes)
PR_NEIGHBOURS = 3  # k of Kynkaanniemi et al.; the ADM evaluator's nhood_sizes=(3,)
PR_BATCH_SIZE = 1000  # rows of the distance matrix at a time: 1000 x 50k floats = 200 MB
CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "agd" / "fid"
CACHE_VERSION = "agd-fid-1"  # part of every cache key: bump when the features would change


class FIDError(ValueError):
    """Bad input for FID (a folder, an image, statistics); the message is one line for the CLI."""


# -----------------------------------------------------------------------------
# the network: torchvision's Inception3 layout with pytorch-fid's patches


def resize(images):
    """Resize [B, 3, H, W] to 299 x 299 as pytorch-fid does: bilinear, no antialiasing, half-pixel centres."""
    return F.interpolate(images, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)


def avg_pool_3x3(x):
    """3x3, stride-1 average pool of the Inception blocks, averaging over the image only.

    Patch: TensorFlow's average pool does not count the zero padding, torchvision's does
    (count_include_pad=True); pytorch-fid patches InceptionA, InceptionC and the first InceptionE.
    """
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class BatchNorm2d(nn.Module):
    """Batch norm with frozen running statistics: this network only ever runs in inference."""

    def __init__(self, channels, eps=BN_EPS):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x):
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            training=False, eps=self.eps)


class BasicConv2d(nn.Module):
    """Convolution without bias, batch norm, ReLU: every convolution of Inception-v3."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=False)
        self.bn = BatchNorm2d(out_channels)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)), inplace=True)  # in place: the batch norm's output is ours


class InceptionA(nn.Module):
    """35 x 35 block (Mixed_5b-d): 1x1, 5x5, double 3x3 and pooled branches, concatenated."""

    def __init__(self, in_channels, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, 1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, 1)

    def forward(self, x):
        branch1x1 = self.branch1x1(x)
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = self.branch_pool(avg_pool_3x3(x))  # Patch: see avg_pool_3x3
        return torch.cat([branch1x1, branch5x5, branch3x3dbl, branch_pool], 1)  # (B, 224 + pool, H, W)


class InceptionB(nn.Module):
    """Grid reduction 35 -> 17 (Mixed_6a): strided 3x3, strided double 3x3 and max-pool branches."""

    def __init__(self, in_channels):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        branch3x3 = self.branch3x3(x)
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([branch3x3, branch3x3dbl, branch_pool], 1)  # (B, 768, 17, 17)


class InceptionC(nn.Module):
    """17 x 17 block (Mixed_6b-e): 7x7 convolutions factorized into 1x7 and 7x1."""

    def __init__(self, in_channels, channels_7x7):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, 1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, 1)

    def forward(self, x):
        branch1x1 = self.branch1x1(x)
        branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        branch7x7dbl = self.branch7x7dbl_1(x)
        branch7x7dbl = self.branch7x7dbl_3(self.branch7x7dbl_2(branch7x7dbl))
        branch7x7dbl = self.branch7x7dbl_5(self.branch7x7dbl_4(branch7x7dbl))
        branch_pool = self.branch_pool(avg_pool_3x3(x))  # Patch: see avg_pool_3x3
        return torch.cat([branch1x1, branch7x7, branch7x7dbl, branch_pool], 1)  # (B, 768, 17, 17)


class InceptionD(nn.Module):
    """Grid reduction 17 -> 8 (Mixed_7a): strided 3x3, 7x7-then-strided-3x3 and max-pool branches."""

    def __init__(self, in_channels):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        branch3x3 = self.branch3x3_2(self.branch3x3_1(x))
        branch7x7x3 = self.branch7x7x3_2(self.branch7x7x3_1(x))
        branch7x7x3 = self.branch7x7x3_4(self.branch7x7x3_3(branch7x7x3))
        branch_pool = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([branch3x3, branch7x7x3, branch_pool], 1)  # (B, 1280, 8, 8)


class InceptionE(nn.Module):
    """8 x 8 block (Mixed_7b, 7c): 3x3 convolutions that fan out into parallel 1x3 and 3x1 ones."""

    def __init__(self, in_channels, max_pool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(in_channels, 320, 1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, 1)

    def forward(self, x):
        branch1x1 = self.branch1x1(x)
        branch3x3 = self.branch3x3_1(x)
        branch3x3 = torch.cat([self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3)], 1)
        branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        branch3x3dbl = torch.cat([self.branch3x3dbl_3a(branch3x3dbl), self.branch3x3dbl_3b(branch3x3dbl)], 1)
        if self.max_pool:
            # Patch: the FID graph's last block max-pools here where the paper and torchvision average
            # (pytorch-fid: "likely an error in this specific Inception implementation"); kept, since
            # the weights were trained with it.
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        else:
            pooled = avg_pool_3x3(x)  # Patch: see avg_pool_3x3
        branch_pool = self.branch_pool(pooled)
        return torch.cat([branch1x1, branch3x3, branch3x3dbl, branch_pool], 1)  # (B, 2048, 8, 8)


class FIDInceptionV3(nn.Module):
    """The FID Inception-v3 up to pool3; attribute names are the keys of pytorch-fid's weights file."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)

    def forward(self, images):
        """Pool3 features [B, 2048] of images [B, 3, H, W] in [0, 1], as pytorch-fid's InceptionV3 gives them."""
        x = resize(images)                               # (B, 3, 299, 299)
        x = 2 * x - 1                                    # [0, 1] -> [-1, 1], the range the TF graph expects
        x = self.Conv2d_1a_3x3(x)                        # (B, 32, 149, 149)
        x = self.Conv2d_2a_3x3(x)                        # (B, 32, 147, 147)
        x = self.Conv2d_2b_3x3(x)                        # (B, 64, 147, 147)
        x = F.max_pool2d(x, kernel_size=3, stride=2)     # (B, 64, 73, 73)
        x = self.Conv2d_3b_1x1(x)                        # (B, 80, 73, 73)
        x = self.Conv2d_4a_3x3(x)                        # (B, 192, 71, 71)
        x = F.max_pool2d(x, kernel_size=3, stride=2)     # (B, 192, 35, 35)
        x = self.Mixed_5b(x)                             # (B, 256, 35, 35)
        x = self.Mixed_5c(x)                             # (B, 288, 35, 35)
        x = self.Mixed_5d(x)                             # (B, 288, 35, 35)
        x = self.Mixed_6a(x)                             # (B, 768, 17, 17)
        x = self.Mixed_6b(x)                             # (B, 768, 17, 17)
        x = self.Mixed_6c(x)                             # (B, 768, 17, 17)
        x = self.Mixed_6d(x)                             # (B, 768, 17, 17)
        x = self.Mixed_6e(x)                             # (B, 768, 17, 17)
        x = self.Mixed_7a(x)                             # (B, 1280, 8, 8)
        x = self.Mixed_7b(x)                             # (B, 2048, 8, 8)
        x = self.Mixed_7c(x)                             # (B, 2048, 8, 8)
        x = F.adaptive_avg_pool2d(x, (1, 1))             # (B, 2048, 1, 1): pool3
        return x.flatten(1)                              # (B, 2048)


# -----------------------------------------------------------------------------
# weights


def fetch_weights(url=FID_WEIGHTS_URL, sha256_prefix=FID_WEIGHTS_SHA256_PREFIX, folder=None):
    """Path of pytorch-fid's weights file, downloaded once to torch's hub cache and checked against its hash.

    The default folder, <torch hub dir>/checkpoints, is where pytorch-fid keeps the same file, so a
    machine that has run pytorch-fid downloads nothing.
    """
    folder = Path(folder) if folder is not None else Path(torch.hub.get_dir()) / "checkpoints"
    file = folder / url.rsplit("/", 1)[1]
    if not file.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        try:  # torch writes to a temporary file and renames it only once the hash matched
            torch.hub.download_url_to_file(url, str(file), hash_prefix=sha256_prefix)
        except (OSError, RuntimeError) as e:  # no network (URLError is an OSError), or a wrong hash
            raise checkpoint.CheckpointError(f"could not download the FID weights from {url} ({e}); "
                                             f"download them by hand and pass their path") from None
    return file


def _official_tensors(state_dict, source):
    """The tensors FIDInceptionV3 needs from the official state dict, which holds a little more.

    It also holds the 1008-way classifier `fc.*` (ImageNet's 1000 classes and 8 unused ones) that FID
    never reads, and maybe batch norms' `num_batches_tracked` counters, which only training uses.
    """
    if not isinstance(state_dict, dict):
        raise checkpoint.CheckpointError(f"{source}: expected a state dict, got a {type(state_dict).__name__}")
    return {k: v for k, v in state_dict.items() if not k.startswith("fc.") and not k.endswith(".num_batches_tracked")}


def load_inception(weights=None, device=None):
    """The FID Inception-v3, strictly loaded from a local .pth (the official file) or the cached download."""
    file = Path(weights).expanduser() if weights is not None else fetch_weights()
    if not file.is_file():
        raise checkpoint.CheckpointError(f"{file}: no such weights file")
    try:
        state_dict = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip or unpickling-policy errors: all one line for the user
        raise checkpoint.CheckpointError(f"{file}: not a readable PyTorch weights file "
                                         f"({type(e).__name__})") from None
    with torch.device("meta"):
        model = FIDInceptionV3()
    checkpoint.load_into(model, _official_tensors(state_dict, file), source=file)
    return model.requires_grad_(False).eval().to(device)


# -----------------------------------------------------------------------------
# images -> features


def image_files(folder, num_samples=None):
    """The image files of a folder in name order (the first `num_samples` of them, if given)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FIDError(f"{folder}: no such folder")
    # Unlike pytorch-fid (case-sensitive glob) this also takes .PNG, .JPG, ...
    files = sorted(f for f in folder.iterdir() if f.suffix[1:].lower() in IMAGE_EXTENSIONS and f.is_file())
    if not files:
        raise FIDError(f"{folder}: no images (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
    return files[:_checked_count(len(files), num_samples, folder)]


def _checked_count(available, num_samples, source):
    """How many images to use: `num_samples`, which must be there, or all."""
    if num_samples is None:
        return available
    if num_samples < 2 or num_samples > available:
        raise FIDError(f"{source}: asked for {num_samples} images, it has {available} (need 2 or more)")
    return num_samples


def read_image(file):
    """uint8 [3, H, W] of an image file, converted to RGB as pytorch-fid does (grey repeated, alpha dropped)."""
    try:
        with Image.open(file) as image:
            pixels = np.array(image.convert("RGB"))  # (H, W, 3)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise FIDError(f"{file}: not a readable image ({reason})") from None
    return torch.from_numpy(pixels).permute(2, 0, 1)  # (3, H, W)


def to_batch(images):
    """Float [B, 3, H, W] in [0, 1] from uint8 [3, H, W] images, scaled as torchvision's ToTensor does.

    Images of different sizes cannot be stacked (pytorch-fid fails on them); each is resized to
    299 x 299 on its own, which is what the network's own resize would have done to it.
    """
    batch = [image.float().div(255) for image in images]
    if len({x.shape for x in batch}) > 1:
        batch = [resize(x[None])[0] for x in batch]
    return torch.stack(batch)  # (B, 3, H, W)


def _folder_batches(files, batch_size, num_workers):
    """Float batches of image files; the next batch is decoded in threads while this one runs."""
    chunks = [files[i:i + batch_size] for i in range(0, len(files), batch_size)]
    with ThreadPoolExecutor(max(1, num_workers)) as pool:
        upcoming = [pool.submit(read_image, f) for f in chunks[0]]
        for i in range(len(chunks)):
            current = upcoming
            if i + 1 < len(chunks):
                upcoming = [pool.submit(read_image, f) for f in chunks[i + 1]]
            yield to_batch([future.result() for future in current])


def _read_npy_header(stream):
    """(shape, fortran_order, dtype) of an .npy stream, which is left at the first byte of the data."""
    version = np.lib.format.read_magic(stream)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    return read(stream)


def _npz_shape(file):
    """Shape [N, H, W, 3] of `arr_0` of an .npz of images (the ADM evaluator's layout), from its header alone."""
    try:
        with zipfile.ZipFile(file) as archive, archive.open("arr_0.npy") as stream:
            shape, fortran_order, dtype = _read_npy_header(stream)
    except (OSError, ValueError, zipfile.BadZipFile, KeyError) as e:
        raise FIDError(f"{file}: no images in it (expected arr_0, uint8 [N, H, W, 3]; "
                       f"{type(e).__name__})") from None
    if len(shape) != 4 or shape[3] != 3 or dtype != np.uint8 or fortran_order:
        raise FIDError(f"{file}: arr_0 is {dtype} {list(shape)}, expected uint8 [N, H, W, 3]")
    return shape


def _npz_batches(file, shape, count, batch_size):
    """Float batches of the first `count` images of an .npz, read a batch at a time (50k images are 10 GB)."""
    image_bytes = int(np.prod(shape[1:]))
    with zipfile.ZipFile(file) as archive, archive.open("arr_0.npy") as stream:
        _read_npy_header(stream)
        for start in range(0, count, batch_size):
            n = min(batch_size, count - start)
            data = stream.read(n * image_bytes)
            if len(data) != n * image_bytes:
                raise FIDError(f"{file}: truncated after {start + len(data) // image_bytes} images")
            pixels = torch.frombuffer(bytearray(data), dtype=torch.uint8).view(n, *shape[1:])  # (B, H, W, 3)
            yield to_batch(list(pixels.permute(0, 3, 1, 2)))  # (B, 3, H, W)


def _tensor_batches(images, batch_size):
    """Batches of an [N, 3, H, W] tensor in [0, 1]."""
    for start in range(0, len(images), batch_size):
        yield images[start:start + batch_size]


def _sha256_of_file(file):
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _cache_key(model, files, count):
    """A name for these features: the network's weights, and the content of the images used."""
    digest = hashlib.sha256(CACHE_VERSION.encode())
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    digest.update(f"{count}".encode())
    for file in files:
        digest.update(f"{file.name}:{_sha256_of_file(file)}".encode())
    return digest.hexdigest()


@torch.no_grad()
def features(model, source, batch_size=BATCH_SIZE, num_samples=None, num_workers=NUM_WORKERS,
             cache_dir=None, progress=True):
    """Features [N, D] (float32) of a folder of images, an .npz of images, or an [N, 3, H, W] tensor in [0, 1].

    With a `cache_dir`, the features of a folder or .npz are kept there under a hash of the images'
    content and of the network's weights, so that a reference set is computed once (about 8 KB an image).
    """
    if isinstance(source, torch.Tensor):
        if source.ndim != 4 or source.shape[1] != 3 or not source.is_floating_point():
            raise FIDError(f"expected float images [N, 3, H, W] in [0, 1], got {source.dtype} {list(source.shape)}")
        count, files, name = _checked_count(len(source), num_samples, "the tensor"), [], "images"
        batches = _tensor_batches(source[:count], batch_size)
    elif Path(source).is_dir():
        files, name = image_files(source, num_samples), Path(source).name
        count = len(files)
        batches = _folder_batches(files, batch_size, num_workers)
    elif Path(source).is_file():
        files, name, shape = [Path(source)], Path(source).name, _npz_shape(source)
        count = _checked_count(shape[0], num_samples, source)
        batches = _npz_batches(source, shape, count, batch_size)
    else:
        raise FIDError(f"{source}: no such folder or file")

    cached = Path(cache_dir) / f"{_cache_key(model, files, count)}.npy" if cache_dir and files else None
    if cached is not None and cached.is_file():
        return np.load(cached)
    device = next(model.parameters()).device
    out = []
    for batch in tqdm(batches, total=-(-count // batch_size), desc=name, unit="batch", disable=not progress):
        out.append(model(batch.to(device)).float().cpu())
    result = torch.cat(out).numpy()  # (N, D)
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_name(f"{cached.stem}.{os.getpid()}.tmp.npy")
        np.save(tmp, result)
        tmp.replace(cached)  # atomic: a crash leaves no half-written cache entry
    return result


# -----------------------------------------------------------------------------
# statistics and the Frechet distance


def feature_statistics(features):
    """Mean and covariance (float64) of an [N, D] feature array, as pytorch-fid computes them."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise FIDError(f"expected [N, D] features with N >= 2, got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64 as pytorch-fid does.

    The matrix square root is scipy's, called without the `disp` argument that pytorch-fid passes
    (deprecated since scipy 1.16): it returns the same root, without the error estimate we never used.
    """
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (len(mu1), len(mu1)):
        raise FIDError(f"mismatched statistics: means of {mu1.shape[0]} and {mu2.shape[0]} features, "
                       f"covariances {sigma1.shape} and {sigma2.shape}")
    diff = mu1 - mu2
    with warnings.catch_warnings():
        # scipy warns of a singular product (few samples, many features); the check below handles it.
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1.dot(sigma2))
        if not np.isfinite(covmean).all():
            # Near-singular product: pytorch-fid adds eps to the diagonals and takes the root again.
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        # Numerical error can give a tiny imaginary component; pytorch-fid rejects a large one.
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise FIDError(f"imaginary component {np.max(np.abs(covmean.imag))} in the covariance root")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def save_statistics(file, mu, sigma):
    """Write (mu, sigma) to an .npz in pytorch-fid's format (keys mu, sigma)."""
    np.savez_compressed(file, mu=mu, sigma=sigma)


def load_statistics(file):
    """(mu, sigma) of an .npz written by save_statistics, pytorch-fid or the ADM evaluator."""
    try:
        with np.load(file) as f:
            mu, sigma = f["mu"], f["sigma"]
    except (OSError, ValueError, KeyError) as e:
        raise FIDError(f"{file}: not an .npz of statistics with mu and sigma ({type(e).__name__})") from None
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise FIDError(f"{file}: mu {list(mu.shape)} and sigma {list(sigma.shape)} do not match")
    return mu, sigma


def is_statistics(path):
    """Whether `path` is an .npz of statistics (mu, sigma) rather than of images (arr_0).

    The ADM evaluator's reference batches hold both, but their mu and sigma come from the TF graph,
    not from this network: mixing the two would give neither's FID, so their images are used.
    """
    path = Path(path)
    if path.suffix != ".npz" or not path.is_file():
        return False
    try:
        with np.load(path) as f:
            return "mu" in f.files and "sigma" in f.files and "arr_0" not in f.files
    except (OSError, ValueError):
        return False


# -----------------------------------------------------------------------------
# improved precision and recall (Kynkaanniemi et al. 2019)


def _squared_distances(a, b):
    """Squared Euclidean distances [n, m] between rows of a [n, D] and b [m, D], by one matrix product."""
    return (a.square().sum(1, keepdim=True) - 2 * a @ b.T + b.square().sum(1)).clamp_min_(0)


def manifold_radii(features, k=PR_NEIGHBOURS, batch_size=PR_BATCH_SIZE):
    """Squared distance [N] from each feature to its k-th nearest neighbour in the same set."""
    if len(features) <= k:
        raise FIDError(f"precision and recall need more than k = {k} features, got {len(features)}")
    radii = []
    for start in range(0, len(features), batch_size):
        distances = _squared_distances(features[start:start + batch_size], features)  # (b, N)
        radii.append(distances.kthvalue(k + 1, dim=1).values)  # k + 1: the nearest is the point itself
    return torch.cat(radii)


def _fraction_inside(points, centres, radii, batch_size):
    """Fraction of `points` inside at least one ball (centre, squared radius), boundary included."""
    inside = [(_squared_distances(points[start:start + batch_size], centres) <= radii).any(1)  # (b,)
              for start in range(0, len(points), batch_size)]
    return torch.cat(inside).double().mean().item()


def precision_recall(real, fake, k=PR_NEIGHBOURS, batch_size=PR_BATCH_SIZE, device=None):
    """Improved precision (fakes inside the real manifold) and recall (reals inside the fake one).

    Each manifold is the union of balls around its features reaching the k-th nearest neighbour
    (Kynkaanniemi et al. 2019, Sec. 2). Distances are float32 and computed `batch_size` rows at a
    time, so 50k x 50k never lives in memory at once.
    """
    real = torch.as_tensor(real, dtype=torch.float32, device=device)
    fake = torch.as_tensor(fake, dtype=torch.float32, device=device)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise FIDError(f"mismatched features: {list(real.shape)} and {list(fake.shape)}")
    precision = _fraction_inside(fake, real, manifold_radii(real, k, batch_size), batch_size)
    recall = _fraction_inside(real, fake, manifold_radii(fake, k, batch_size), batch_size)
    return precision, recall


# -----------------------------------------------------------------------------
# CLI


def parse_args(argv=None):
    """The CLI's arguments."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("paths", nargs=2, metavar="PATH",
                        help="generated samples, then reference: each a folder of images, an .npz of images "
                             "(arr_0, uint8 [N, H, W, 3]) or an .npz of statistics (mu, sigma); with "
                             "--save-stats, images and the .npz to write")
    parser.add_argument("--save-stats", action="store_true", help="write the first path's statistics to the second")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="images per forward pass")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the network and precision/recall run")
    parser.add_argument("--num-samples", type=int, default=None, help="use the first N images of each set")
    parser.add_argument("--num-workers", type=int, default=NUM_WORKERS, help="image-decoding threads")
    parser.add_argument("--weights", default=None,
                        help="path of pt_inception-2015-12-05-6726825d.pth (None: download once to the hub cache)")
    parser.add_argument("--precision-recall", action="store_true",
                        help=f"also improved precision and recall (k = {PR_NEIGHBOURS}); needs images, not statistics")
    parser.add_argument("--cache-dir", default=str(CACHE_DIR), help="where features of image sets are kept")
    parser.add_argument("--no-cache", action="store_true", help="neither read nor write the cache")
    return parser.parse_args(argv)


def check_images(path, num_samples=None):
    """Raise FIDError now if `path` holds no usable set of images, before any weights are loaded."""
    if Path(path).is_dir():
        image_files(path, num_samples)
    elif Path(path).is_file():
        _checked_count(_npz_shape(path)[0], num_samples, path)
    else:
        raise FIDError(f"{path}: no such folder or file")


def main(args):
    """Print the FID (and precision and recall) of two image sets, or save one set's statistics."""
    try:
        if args.batch_size < 1:
            raise FIDError(f"--batch-size must be positive, got {args.batch_size}")
        try:
            device = torch.device(args.device)
        except RuntimeError:
            raise FIDError(f"--device {args.device}: not a device (cpu, cuda, cuda:1, ...)") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise FIDError(f"--device {args.device}: CUDA is not available here")
        if args.save_stats:
            source, out = args.paths
            if Path(out).exists():
                raise FIDError(f"{out}: exists already (not overwritten)")
            if not out.endswith(".npz"):
                raise FIDError(f"{out}: statistics are written to an .npz file")
            images = [source]
        else:
            images = [p for p in args.paths if not is_statistics(p)]
            if args.precision_recall and len(images) < 2:
                raise FIDError("--precision-recall needs images (a folder or an .npz of images), not statistics")
        for path in images:
            check_images(path, args.num_samples)

        model = load_inception(args.weights, device) if images else None
        options = dict(batch_size=args.batch_size, num_samples=args.num_samples, num_workers=args.num_workers,
                       cache_dir=None if args.no_cache else args.cache_dir)
        if args.save_stats:
            save_statistics(out, *feature_statistics(features(model, source, **options)))
            print(f"saved the statistics of {source} to {out}")
            return
        fake, real = (features(model, p, **options) if p in images else None for p in args.paths)
        fake_stats, real_stats = (load_statistics(p) if f is None else feature_statistics(f)
                                  for p, f in zip(args.paths, (fake, real)))
        print(f"FID: {frechet_distance(*fake_stats, *real_stats):.6f}")
        if args.precision_recall:
            precision, recall = precision_recall(real, fake, device=device)
            print(f"Precision: {precision:.6f}")
            print(f"Recall: {recall:.6f}")
    except (FIDError, checkpoint.CheckpointError) as e:
        sys.exit(f"fid.py: error: {e}")


if __name__ == "__main__":
    main(parse_args())
