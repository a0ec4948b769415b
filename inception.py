"""The Inception-v3 of FID, with the same features as pytorch-fid (fid.py computes FID from them).

The features are those of the Inception-v3 graph of TensorFlow's FID code (2015-12-05) as ported by
pytorch-fid (mseitzer/pytorch-fid): its weights pt_inception-2015-12-05-6726825d.pth in torchvision's
Inception3 layout, with "Patch:"es where the TF graph differs from torchvision (average pools that
skip the padding, a max pool in the last block). It is written out here in full, with pytorch-fid's
resize and normalization; tests/test_fid.py checks its features against pytorch-fid's on identical
weights.

    model = inception.load_inception()        # the official weights, downloaded once and hash-checked
    features = model(images)                  # images (B, 3, H, W) in [0, 1] -> pool3 features (B, 2048)
"""

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import checkpoint

FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")
FID_WEIGHTS_SHA256_PREFIX = "6726825d"  # torch.hub's convention: the name ends in its hash's first digits
INPUT_SIZE = 299  # Inception-v3's input resolution; every image is resized to it
FEATURE_DIM = 2048  # pool3, the final average pool
BN_EPS = 0.001  # TensorFlow's batch norm epsilon, kept by torchvision's and pytorch-fid's port


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
