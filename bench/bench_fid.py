"""fid.py's Inception against pytorch-fid's on the CPU: feature-extraction throughput and agreement.

Both networks get the same seeded weights (tests/fixtures/make_fid_fixtures.py) and the same batches
of random 256 x 256 images (the resolution of DiT-XL/2's samples), timed alternately so that a load
change on the machine hits both. pytorch-fid needs torchvision's pure-Python models, installed
outside the project as that script's docstring says:

    pip install --no-deps --target /tmp/fidref torchvision==0.29.2 pytorch-fid==0.3.0
    python bench/bench_fid.py --pytorch-fid /tmp/fidref --batch-size 50 --repeats 3

Without --pytorch-fid only ours is timed.
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "fixtures"))
import fid  # noqa: E402
import make_fid_fixtures as fixtures  # noqa: E402


def images_per_second(model, images):
    """Throughput of one forward pass over `images`."""
    start = time.perf_counter()
    with torch.no_grad():
        model(images)
    return len(images) / (time.perf_counter() - start)


def main(args):
    torch.manual_seed(0)
    weights = fixtures.seeded_weights(fixtures.read_layout())
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(weights, Path(tmp) / "weights.pth")
        ours = inception.load_inception(Path(tmp) / "weights.pth")
    models = {"ours": ours}
    if args.pytorch_fid:
        inception, _ = fixtures.import_pytorch_fid(args.pytorch_fid)
        inception.load_state_dict_from_url = lambda *a, **k: weights  # instead of the download
        theirs = inception.InceptionV3([inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
        models["pytorch-fid"] = lambda x: theirs(x)[0].flatten(1)  # [B, 2048, 1, 1] -> (B, 2048)

    images = torch.rand(args.batch_size, 3, args.size, args.size)
    print(f"{args.batch_size} images of {args.size} x {args.size} a batch, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    with torch.no_grad():
        outputs = {name: model(images) for name, model in models.items()}  # also the warm-up
    if "pytorch-fid" in outputs:
        error = (outputs["ours"] - outputs["pytorch-fid"]).abs().max().item()
        print(f"  max abs difference of the features: {error:.2e} (features up to "
              f"{outputs['pytorch-fid'].abs().max().item():.2f})")
    rates = {name: [] for name in models}
    for _ in range(args.repeats):  # alternate, so that both see the same machine load
        for name, model in models.items():
            rates[name].append(images_per_second(model, images))
    for name, runs in rates.items():
        print(f"  {name:12s} median {statistics.median(runs):.2f} images/s over {len(runs)} batches "
              f"(min {min(runs):.2f}, max {max(runs):.2f})")
    if "pytorch-fid" in rates:
        ratio = statistics.median(rates["ours"]) / statistics.median(rates["pytorch-fid"])
        print(f"  ours / pytorch-fid: {ratio:.3f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pytorch-fid", type=Path, default=None,
                        help="folder holding torchvision and pytorch-fid (pip install --no-deps --target)")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    main(parser.parse_args())
