"""vae.py against diffusers' AutoencoderKL at full size (random weights): agreement and decode time.

    python bench/bench_vae.py --preset sdxl --size 256 --repeats 3
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import checkpoint  # noqa: E402
import vae  # noqa: E402


def seconds(fn, repeats):
    """Best wall time of `repeats` calls (after one warm-up)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main(args):
    from diffusers import AutoencoderKL  # the reference, for this benchmark only

    torch.manual_seed(0)
    cfg = vae.VAE_models[args.preset]()
    ref = AutoencoderKL.from_config(vae.config_to_diffusers(cfg)).eval()
    with torch.device("meta"):
        ours = vae.AutoencoderKL(cfg)
    checkpoint.load_into(ours, ref.state_dict(), source="diffusers").eval()
    sf, f = cfg.scaling_factor, cfg.downsampling_factor
    x = torch.rand(1, 3, args.size, args.size) * 2 - 1
    z = torch.randn(1, cfg.latent_channels, args.size // f, args.size // f)
    tile = args.size // 2
    print(f"{args.preset}: {sum(p.numel() for p in ours.parameters()):,} parameters, "
          f"{args.size} x {args.size} px, {torch.get_num_threads()} threads, torch {torch.__version__}")
    with torch.no_grad():
        for name, a, b in [
            ("encode (mean)", ours.encode(x), ref.encode(x).latent_dist.mode() * sf),
            ("decode", ours.decode(z), ref.decode(z / sf).sample),
        ]:
            print(f"  {name:22s} max abs error {(a - b).abs().max().item():.2e} (outputs up to "
                  f"{b.abs().max().item():.2f})")
        ref.enable_tiling()
        ref.tile_sample_min_size, ref.tile_latent_min_size = tile, tile // f
        a, b = ours.decode(z, tile_size=tile), ref.decode(z / sf).sample
        print(f"  {f'tiled decode ({tile} px)':22s} max abs error {(a - b).abs().max().item():.2e}")
        ref.disable_tiling()
        t_ours = seconds(lambda: ours.decode(z), args.repeats)
        t_ref = seconds(lambda: ref.decode(z / sf), args.repeats)
        t_tiled = seconds(lambda: ours.decode(z, tile_size=tile), args.repeats)
    print(f"  decode: ours {t_ours:.2f} s, diffusers {t_ref:.2f} s, ours tiled ({tile} px) {t_tiled:.2f} s")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="sdxl", choices=list(vae.VAE_models))
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (a multiple of 64)")
    parser.add_argument("--repeats", type=int, default=3)
    main(parser.parse_args())
