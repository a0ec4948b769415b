"""fid.py: analytic Frechet distances, parity with pytorch-fid, precision and recall, the CLI.

The reference numbers in fixtures/fid_reference.npz are pytorch-fid 0.3.0's own outputs, recorded by
fixtures/make_fid_fixtures.py (its docstring says how, and why torchvision's compiled ops had to be
bypassed) on seeded random weights in the layout of the official weights file and on seeded PNG
images. The tests rebuild the same weights and images with that script's functions, so the 95 MB of
weights are never stored. No test touches the network.
"""

import hashlib
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import checkpoint
import fid
import inception

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures"))
import make_fid_fixtures as fixtures  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def reference():
    """pytorch-fid's recorded outputs."""
    with np.load(fixtures.REFERENCE_FILE) as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def official_weights():
    """Seeded random weights as a state dict in the official file's layout (keys, shapes, dtypes)."""
    return fixtures.seeded_weights(fixtures.read_layout())


@pytest.fixture(scope="module")
def weights_file(official_weights, tmp_path_factory):
    """The seeded weights saved as a .pth, as the official file is."""
    file = tmp_path_factory.mktemp("weights") / "pt_inception-seeded.pth"
    torch.save(official_weights, file)
    return file


@pytest.fixture(scope="module")
def network(weights_file):
    """Our network, loaded from the seeded weights file by the official-layout loader."""
    return inception.load_inception(weights_file)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """The two seeded image folders pytorch-fid saw."""
    root = tmp_path_factory.mktemp("images")
    fixtures.write_images(root / "a", root / "b")
    return root / "a", root / "b"


def random_statistics(rng, dim):
    """A mean and a well-conditioned covariance."""
    factor = rng.standard_normal((dim, dim))
    return rng.standard_normal(dim), factor @ factor.T / dim + 0.1 * np.eye(dim)


class PoolFeatures(nn.Module):
    """A cheap stand-in for the Inception: mean colour of each image quadrant (12 features); counts calls."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.calls = 0

    def forward(self, images):
        self.calls += 1
        return F.adaptive_avg_pool2d(images, 2).flatten(1) * self.scale  # (B, 12)


def write_png(file, pixels):
    Image.fromarray(pixels).save(file)


def run_cli(argv):
    """Run the CLI's main(): None if it finished, else its SystemExit message."""
    try:
        fid.main(fid.parse_args(argv))
    except SystemExit as e:
        return e.code
    return None


# -----------------------------------------------------------------------------
# the Frechet distance: analytic cases and pytorch-fid's numbers


def test_equal_statistics_give_zero():
    mu, sigma = random_statistics(np.random.RandomState(0), 16)
    assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-9


def test_equal_covariances_give_squared_mean_difference():
    rng = np.random.RandomState(1)
    mu1, sigma = random_statistics(rng, 16)
    mu2 = rng.standard_normal(16)
    expected = np.sum((mu1 - mu2) ** 2)
    assert fid.frechet_distance(mu1, sigma, mu2, sigma) == pytest.approx(expected, rel=1e-9)


def test_two_dimensional_case_by_hand():
    # S1 S2 = [[2, 4], [1, 8]] has positive eigenvalues, so Tr sqrt(S1 S2) = sqrt(Tr + 2 sqrt(det))
    # = sqrt(10 + 2 sqrt(12)).
    sigma1, sigma2 = np.array([[2.0, 1.0], [1.0, 2.0]]), np.diag([1.0, 4.0])
    expected = 3**2 + 4**2 + 4 + 5 - 2 * np.sqrt(10 + 2 * np.sqrt(12))
    assert fid.frechet_distance([3.0, 4.0], sigma1, [0.0, 0.0], sigma2) == pytest.approx(expected, rel=1e-12)


def test_singular_product_adds_eps_to_the_diagonals_as_pytorch_fid():
    # Rank-one covariances whose product scipy's sqrtm cannot root (it returns inf): the fallback must run.
    u, v = np.array([2.0, 0.0, -1.0]), np.array([2.0, -1.0, 1.0])
    sigma1, sigma2 = np.outer(u, u), np.outer(v, v)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert not np.isfinite(fid.linalg.sqrtm(sigma1 @ sigma2)).all()
    # Tr sqrt(X Y) = Tr sqrt(X^1/2 Y X^1/2) for positive definite X: an independent route, by eigh.
    eps = 1e-6
    x, y = sigma1 + eps * np.eye(3), sigma2 + eps * np.eye(3)
    w, q = np.linalg.eigh(x)
    x_half = q @ np.diag(np.sqrt(w)) @ q.T
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh(x_half @ y @ x_half), 0, None)).sum()
    expected = np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # neither scipy's deprecation nor its singular-matrix warning
        value = fid.frechet_distance(np.zeros(3), sigma1, np.zeros(3), sigma2, eps=eps)
    assert value == pytest.approx(expected, abs=1e-6)
    assert value == pytest.approx(5 + 6 - 2 * abs(u @ v), abs=1e-2)  # eps -> 0: |u|^2 + |v|^2 - 2 |u.v|


def test_frechet_distance_equals_pytorch_fid_on_the_same_features(reference):
    x, y = fixtures.gaussian_features()
    value = fid.frechet_distance(*fid.feature_statistics(x), *fid.feature_statistics(y))
    assert value == pytest.approx(reference["fid_gaussians"], rel=1e-6)
    # 6 images of 64 pool3 features: singular covariances, the case scipy warns about. (All 2048
    # features: test_cli_fid_of_two_folders_equals_pytorch_fid, once, as each 2048-d root costs ~30 s.)
    few = [reference[name][:, :fixtures.FEW_FEATURES] for name in ("features_a", "features_b")]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        value = fid.frechet_distance(*fid.feature_statistics(few[0]), *fid.feature_statistics(few[1]))
    assert value == pytest.approx(reference["fid_few_features"], rel=1e-6)


def test_mismatched_statistics_are_rejected():
    mu, sigma = random_statistics(np.random.RandomState(2), 4)
    with pytest.raises(fid.FIDError, match="mismatched statistics"):
        fid.frechet_distance(mu, sigma, mu[:3], sigma[:3, :3])
    with pytest.raises(fid.FIDError, match="N >= 2"):
        fid.feature_statistics(np.ones((1, 4)))


# -----------------------------------------------------------------------------
# the network against pytorch-fid


def test_features_equal_pytorch_fid(network, folders, reference):
    assert reference["features_a"].std() > 0.1  # not a degenerate network: the comparison means something
    for folder, name in zip(folders, ("features_a", "features_b")):
        # batch size 5 where pytorch-fid used 4: batching must not matter
        ours = fid.features(network, folder, batch_size=5, num_workers=2, progress=False)
        assert ours.shape == (fixtures.NUM_IMAGES, inception.FEATURE_DIM) and ours.dtype == np.float32
        np.testing.assert_allclose(ours, reference[name], rtol=0, atol=1e-5)
    # A float tensor larger than 299 x 299: the resize shrinks it (where antialiasing would matter).
    ours = fid.features(network, fixtures.large_images(), progress=False)
    np.testing.assert_allclose(ours, reference["features_large"], rtol=0, atol=1e-5)


def test_cli_fid_of_two_folders_equals_pytorch_fid(weights_file, folders, reference, capsys):
    # The slow test (~30 s on one core): scipy's root of a 2048 x 2048 matrix, as in pytorch-fid.
    assert run_cli([str(folders[0]), str(folders[1]), "--weights", str(weights_file), "--device", "cpu",
                    "--batch-size", "4", "--no-cache"]) is None
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[0].startswith("FID: ")
    assert float(printed[0].split()[1]) == pytest.approx(reference["fid_ab"], rel=1e-6)


def test_images_of_different_sizes_are_resized_one_by_one(network, tmp_path):
    rng = np.random.RandomState(3)
    small, large = rng.randint(0, 256, (20, 30, 3), np.uint8), rng.randint(0, 256, (40, 24, 3), np.uint8)
    write_png(tmp_path / "0.png", small)
    write_png(tmp_path / "1.png", large)
    together = fid.features(network, tmp_path, batch_size=2, progress=False)
    for i, pixels in enumerate((small, large)):
        alone = fid.features(network, torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255,
                             progress=False)
        np.testing.assert_allclose(together[i], alone[0], rtol=0, atol=1e-5)


def test_loader_is_strict_about_the_official_layout(official_weights, tmp_path):
    def load(state_dict):
        torch.save(state_dict, tmp_path / "w.pth")
        return inception.load_inception(tmp_path / "w.pth")

    # Only fc (the classifier) and the batch-norm counters may be absent: FID reads neither.
    lean = {k: v for k, v in official_weights.items() if not k.startswith("fc.") and "num_batches" not in k}
    model = load(lean)
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    with pytest.raises(checkpoint.CheckpointError, match="missing key Mixed_7c.branch_pool.bn.running_var"):
        load({k: v for k, v in lean.items() if k != "Mixed_7c.branch_pool.bn.running_var"})
    with pytest.raises(checkpoint.CheckpointError, match="unexpected key AuxLogits.conv0.conv.weight"):
        load({**lean, "AuxLogits.conv0.conv.weight": torch.zeros(128, 768, 1, 1)})
    with pytest.raises(checkpoint.CheckpointError, match=r"Mixed_5b.branch_pool.conv.weight has shape"):
        load({**lean, "Mixed_5b.branch_pool.conv.weight": torch.zeros(64, 192, 1, 1)})
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(checkpoint.CheckpointError, match="not a readable PyTorch weights file"):
        inception.load_inception(tmp_path / "junk.pth")


def test_full_network_matches_the_official_layout_key_for_key():
    with torch.device("meta"):
        ours = {k: tuple(v.shape) for k, v in inception.FIDInceptionV3().state_dict().items()}
    official = {k: shape for k, shape, _ in fixtures.read_layout()
                if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
    assert ours == official and sum(np.prod(s) for s in ours.values()) > 21_000_000


# -----------------------------------------------------------------------------
# image sources, sample counts and the cache (with a cheap stand-in network)


def test_folder_npz_and_tensor_give_the_same_features(tmp_path):
    pixels = np.random.RandomState(4).randint(0, 256, (5, 12, 10, 3), np.uint8)
    (tmp_path / "images").mkdir()
    for i, image in enumerate(pixels):
        write_png(tmp_path / "images" / f"{i}.png", image)
    np.savez(tmp_path / "images.npz", pixels)  # arr_0, as the ADM evaluator reads it
    np.savez_compressed(tmp_path / "compressed.npz", pixels)
    model = PoolFeatures()
    from_folder = fid.features(model, tmp_path / "images", batch_size=2, progress=False)
    from_npz = fid.features(model, tmp_path / "images.npz", batch_size=3, progress=False)
    from_tensor = fid.features(model, torch.from_numpy(pixels).permute(0, 3, 1, 2) / 255.0, progress=False)
    expected = pixels.reshape(5, 2, 6, 2, 5, 3).mean((2, 4)).transpose(0, 3, 1, 2).reshape(5, 12) / 255
    np.testing.assert_allclose(from_folder, expected, rtol=1e-6)
    np.testing.assert_array_equal(from_npz, from_folder)
    np.testing.assert_array_equal(fid.features(model, tmp_path / "compressed.npz", batch_size=2, progress=False),
                                  from_folder)
    np.testing.assert_array_equal(from_tensor, from_folder)
    np.testing.assert_array_equal(fid.features(model, tmp_path / "images", num_samples=3, progress=False),
                                  from_folder[:3])
    np.testing.assert_array_equal(fid.features(model, tmp_path / "images.npz", num_samples=4, progress=False),
                                  from_folder[:4])
    with pytest.raises(fid.FIDError, match="asked for 6 images, it has 5"):
        fid.features(model, tmp_path / "images", num_samples=6, progress=False)


def test_cache_is_keyed_by_image_content_and_weights(tmp_path):
    rng = np.random.RandomState(5)
    for i in range(3):
        write_png(tmp_path / f"{i}.png", rng.randint(0, 256, (8, 8, 3), np.uint8))
    cache, model = tmp_path / "cache", PoolFeatures()
    first = fid.features(model, tmp_path, cache_dir=cache, progress=False)
    assert model.calls == 1 and len(list(cache.glob("*.npy"))) == 1
    np.testing.assert_array_equal(fid.features(model, tmp_path, cache_dir=cache, progress=False), first)
    assert model.calls == 1  # read back, not recomputed
    write_png(tmp_path / "1.png", rng.randint(0, 256, (8, 8, 3), np.uint8))  # same name, new content
    changed = fid.features(model, tmp_path, cache_dir=cache, progress=False)
    assert model.calls == 2 and not np.array_equal(changed, first)
    with torch.no_grad():
        model.scale.fill_(2.0)  # other weights: other features
    np.testing.assert_allclose(fid.features(model, tmp_path, cache_dir=cache, progress=False), 2 * changed)
    assert model.calls == 3 and len(list(cache.glob("*.npy"))) == 3


# -----------------------------------------------------------------------------
# improved precision and recall


def test_precision_recall_by_hand():
    # Real points 0..3 have k = 3 radii 3, 2, 2, 3. Fake 6 lies exactly on the ball of 3 (boundary counts),
    # 6.5 outside every ball, 1.5 and -3 inside: precision 3/4. The ball of fake 1.5 (radius 5) holds every real.
    real, fake = np.array([[0.0], [1.0], [2.0], [3.0]]), np.array([[6.0], [6.5], [1.5], [-3.0]])
    np.testing.assert_array_equal(fid.manifold_radii(torch.tensor(real)).sqrt().numpy(), [3, 2, 2, 3])
    assert fid.precision_recall(real, fake) == (0.75, 1.0)
    assert fid.precision_recall(fake, real) == (1.0, 0.75)
    with pytest.raises(fid.FIDError, match="more than k = 3"):
        fid.precision_recall(real[:3], fake)


def test_precision_recall_in_batches_equals_brute_force():
    rng = np.random.RandomState(6)
    real, fake = rng.standard_normal((40, 8)), rng.standard_normal((50, 8)) * 0.8 + 0.6

    def brute_force(points, centres):  # full float64 distance matrices, sorted
        radii = np.sort(((centres[:, None] - centres[None]) ** 2).sum(-1), axis=1)[:, 3]
        return (((points[:, None] - centres[None]) ** 2).sum(-1) <= radii).any(1).mean()

    expected = brute_force(fake, real), brute_force(real, fake)
    assert 0.2 < expected[0] < 0.95 and 0.2 < expected[1] < 0.95  # neither trivially 0 nor 1
    assert fid.precision_recall(real, fake, batch_size=7) == pytest.approx(expected, abs=1e-12)
    assert fid.precision_recall(real, real) == (1.0, 1.0)


# -----------------------------------------------------------------------------
# weights download (from a file:// URL: no network)


def test_fetch_weights_checks_the_hash_and_downloads_once(tmp_path):
    source = tmp_path / "pt_weights-abc.pth"
    source.write_bytes(b"weights" * 1000)
    prefix = hashlib.sha256(source.read_bytes()).hexdigest()[:8]
    hub = tmp_path / "hub"
    with pytest.raises(checkpoint.CheckpointError, match="invalid hash value"):
        inception.fetch_weights(source.as_uri(), sha256_prefix="00000000", folder=hub)
    assert list(hub.iterdir()) == []  # nothing half-written left behind
    file = inception.fetch_weights(source.as_uri(), sha256_prefix=prefix, folder=hub)
    assert file == hub / source.name and file.read_bytes() == source.read_bytes()
    source.unlink()
    assert inception.fetch_weights(source.as_uri(), sha256_prefix=prefix, folder=hub) == file  # no second download


# -----------------------------------------------------------------------------
# CLI


def test_cli_save_stats_then_compare(tmp_path, capsys, monkeypatch):
    rng = np.random.RandomState(7)
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        for i in range(4):
            write_png(tmp_path / name / f"{i}.png", rng.randint(0, 256, (8, 8, 3), np.uint8))
    # An ADM reference batch: images, and the TF graph's statistics, which must not be mixed with ours.
    b_pixels = np.stack([np.array(Image.open(tmp_path / "b" / f"{i}.png")) for i in range(4)])
    np.savez(tmp_path / "adm_b.npz", b_pixels, mu=np.zeros(12), sigma=np.eye(12))
    monkeypatch.setattr(inception, "load_inception", lambda weights, device: PoolFeatures())  # no 95 MB weights
    common = ["--device", "cpu", "--cache-dir", str(tmp_path / "cache")]
    assert run_cli(["--save-stats", str(tmp_path / "b"), str(tmp_path / "b.npz"), *common]) is None
    assert run_cli([str(tmp_path / "a"), str(tmp_path / "b.npz"), *common]) is None
    assert run_cli([str(tmp_path / "a"), str(tmp_path / "b"), "--precision-recall", *common]) is None
    assert run_cli([str(tmp_path / "a"), str(tmp_path / "adm_b.npz"), *common]) is None
    out = capsys.readouterr().out.splitlines()
    assert out[1].startswith("FID: ") and out[1] == out[2] == out[5]  # statistics, folder, .npz agree
    assert out[3].startswith("Precision: ") and out[4].startswith("Recall: ")
    model = PoolFeatures()
    fa, fb = (fid.features(model, tmp_path / n, progress=False) for n in ("a", "b"))
    assert float(out[1].split()[1]) == pytest.approx(
        fid.frechet_distance(*fid.feature_statistics(fa), *fid.feature_statistics(fb)), abs=1e-6)


def test_cli_errors_are_one_line(weights_file, tmp_path, monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("bad input must be reported before any weights are fetched")

    monkeypatch.setattr(inception, "fetch_weights", no_download)
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "000.png").write_bytes(b"not a png")
    fid.save_statistics(tmp_path / "s2.npz", np.zeros(2), np.eye(2))
    fid.save_statistics(tmp_path / "s3.npz", np.zeros(3), np.eye(3))
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with_weights = ["--weights", str(weights_file)]  # only where the images are read
    cases = {
        (str(tmp_path / "empty"), str(tmp_path / "s2.npz")): "empty: no images",
        (str(tmp_path / "bad"), str(tmp_path / "s2.npz"), *with_weights): "000.png: not a readable image",
        (str(tmp_path / "s2.npz"), str(tmp_path / "s3.npz")): "mismatched statistics",
        (str(tmp_path / "missing"), str(tmp_path / "s2.npz")): "missing: no such folder or file",
        (str(tmp_path / "junk.npz"), str(tmp_path / "s2.npz")): "junk.npz: no images in it",
        (str(tmp_path / "bad"), str(tmp_path / "s2.npz"), "--num-samples", "5"): "asked for 5 images, it has 1",
        ("--save-stats", str(tmp_path / "bad"), str(tmp_path / "s2.npz")): "s2.npz: exists already",
        (str(tmp_path / "s2.npz"), str(tmp_path / "s2.npz"), "--precision-recall"): "needs images",
        (str(tmp_path / "s2.npz"), str(tmp_path / "s2.npz"), "--device", "gpu"): "--device gpu: not a device",
    }
    for argv, expected in cases.items():
        message = run_cli(["--device", "cpu", *argv, "--no-cache"])  # a case's own --device comes last
        assert isinstance(message, str) and "\n" not in message, (argv, message)
        assert message.startswith("fid.py: error: ") and expected in message, (argv, message)


def test_cli_as_a_program(tmp_path):
    fid.save_statistics(tmp_path / "a.npz", np.zeros(2), np.eye(2))
    fid.save_statistics(tmp_path / "b.npz", np.ones(2), 4 * np.eye(2))  # FID = 2 + (2 - 1)^2 * 2 = 4
    done = subprocess.run([sys.executable, "fid.py", str(tmp_path / "a.npz"), str(tmp_path / "b.npz")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "FID: 4.000000", done.stderr
    done = subprocess.run([sys.executable, "fid.py", str(tmp_path / "a.npz"), str(tmp_path / "nowhere")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip() == f"fid.py: error: {tmp_path / 'nowhere'}: no such folder or file"
