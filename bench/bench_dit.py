"""dit.py against diffusers' DiTTransformer2DModel at full size (DiT-XL/2, random weights): agreement and forward time.

    python bench/bench_dit.py --image-size 256 --batch-sizes 1 2 --runs 5

Both models hold the same weights (ours copied into diffusers' layout by dit.to_diffusers) and run
the hub's configuration (freq_shift 1, norm_eps 1e-5). Runs alternate between the two models, the
order swapping every run, so that a busy moment on the machine weighs on both. Reported: the ratio
ours / diffusers of the medians, of the best runs, and the median of the ratios of neighbouring runs.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import dit  # noqa: E402

# facebook/DiT-XL-2-256's transformer/config.json (sample_size 64 for -512)
HUB_CONFIG = {"sample_size": 32, "patch_size": 2, "in_channels": 4, "out_channels": 8, "num_layers": 28,
              "num_attention_heads": 16, "attention_head_dim": 72, "num_embeds_ada_norm": 1000,
              "norm_type": "ada_norm_zero", "activation_fn": "gelu-approximate", "attention_bias": True,
              "norm_elementwise_affine": False}


def seconds(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(args):
    from diffusers import DiTTransformer2DModel  # the reference, for this benchmark only

    torch.manual_seed(0)
    config = {**HUB_CONFIG, "sample_size": args.image_size // 8}
    cfg = dit.config_from_diffusers(config)
    ours = dit.DiT(cfg).eval()
    with torch.no_grad():  # random weights everywhere: the paper's zero-inits would make the output zero
        for p in ours.parameters():
            p.normal_(0, 0.02)
    ref = DiTTransformer2DModel(**config).eval()
    ref.load_state_dict(dit.to_diffusers(ours.state_dict(), cfg.depth))  # strict
    print(f"DiT-XL/2 {args.image_size} px: {sum(p.numel() for p in ours.parameters()):,} parameters (diffusers: "
          f"{sum(p.numel() for p in ref.parameters()):,}), fp32, CPU, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    S = cfg.input_size
    for B in args.batch_sizes:
        x, t, y = torch.randn(B, 4, S, S), torch.randint(0, 1000, (B,)), torch.randint(0, 1001, (B,))
        run = {"ours": lambda: ours(x, t, y=y), "diffusers": lambda: ref(x, t, class_labels=y).sample}
        with torch.no_grad():
            a, b = run["ours"](), run["diffusers"]()  # also the warm-up
            times = {name: [] for name in run}
            for r in tqdm(range(args.runs), desc=f"batch {B}", leave=False):
                for name in (["ours", "diffusers"] if r % 2 == 0 else ["diffusers", "ours"]):
                    times[name].append(seconds(run[name]))
        med = {name: statistics.median(v) for name, v in times.items()}
        paired = statistics.median(o / d for o, d in zip(times["ours"], times["diffusers"]))  # neighbours in time
        print(f"  batch {B}: max abs difference {(a - b).abs().max().item():.1e} (outputs up to "
              f"{b.abs().max().item():.2f}); {args.runs} runs each: median ours {med['ours']:.2f} s, diffusers "
              f"{med['diffusers']:.2f} s, ratio {med['ours'] / med['diffusers']:.3f}; best ratio "
              f"{min(times['ours']) / min(times['diffusers']):.3f}; median of paired ratios {paired:.3f}")
        print("    ours:      " + " ".join(f"{s:.2f}" for s in times["ours"]))
        print("    diffusers: " + " ".join(f"{s:.2f}" for s in times["diffusers"]))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=256, choices=[256, 512])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--runs", type=int, default=5, help="timed runs of each model per batch size")
    main(parser.parse_args())
