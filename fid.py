"""Frechet Inception Distance with the same numbers as pytorch-fid, and improved precision and recall.

FID (Heusel et al. 2017, "GANs trained by a two time-scale update rule converge to a local Nash
equilibrium") fits a Gaussian to the pool3 features of each image set and measures
    d^2 = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)).
The features are those of pytorch-fid (mseitzer/pytorch-fid), the FID most PyTorch papers report:
the Inception-v3 of TensorFlow's FID code, written out in inception.py; tests/test_fid.py checks
them against pytorch-fid's on identical weights. (pytorch-fid differs slightly from the TF original,
chiefly by the bilinear resize: its README reports 0.0009 relative on LSUN.)

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
from PIL import Image
from scipy import linalg
from tqdm import tqdm

import checkpoint
import inception

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
        batch = [inception.resize(x[None])[0] for x in batch]
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

        model = inception.load_inception(args.weights, device) if images else None
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
