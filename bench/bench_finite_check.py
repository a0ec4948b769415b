"""What sample.py's non-finite check (sample.FiniteCheck, the sampler's per-step callback) costs.

    python bench/bench_finite_check.py --runs 20

1. The bundled tiny teacher sampled with CFG as sample.py samples it (DDPM, 25 steps, batch 10):
   guidance.sample with the check as its callback against the same call without, the two taking
   turns run by run (the order alternating), so that a busy moment on a shared machine weighs on both.
   The tiny model is the worst case: the check's cost is fixed by the output's size, the model's grows.
2. The check alone, per step, on one output of each full-size model (DiT-XL/2: 8 x 32 x 32; SD 2.1:
   4 x 96 x 96; SDXL: 4 x 128 x 128), to set beside one sampler step of that model (BENCHMARKS.md).
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import families  # noqa: E402
import guidance  # noqa: E402
import sample  # noqa: E402

FULL_SIZE = {"DiT-XL/2": (8, 32, 32), "SD 2.1": (4, 96, 96), "SDXL": (4, 128, 128)}  # a denoiser's output (C, H, W)


@torch.no_grad()
def tiny_sampling(runs, steps=25, batch=10):
    """Median seconds of one sampling run with and without the check, and their ratio."""
    base = families.load("tiny")
    labels = torch.arange(batch) % 10
    cond, null = base.encode(labels), base.null(batch)
    denoise = sample.denoiser(base.model, cond, null, cfg_scale=4.0)
    timesteps = base.scheduler.timesteps(steps)
    noise = torch.randn((batch, *base.shape), generator=torch.Generator().manual_seed(0))

    def once(checked):
        check = sample.FiniteCheck(len(timesteps)) if checked else None
        start = time.perf_counter()
        x = guidance.sample(denoise, noise, base.scheduler, timesteps, generator=torch.Generator().manual_seed(1),
                            callback=check)
        if checked:
            check.check(x, labels)
        return time.perf_counter() - start

    once(True), once(False)  # warm-up
    times = {True: [], False: []}
    for r in range(runs):
        for checked in ((True, False) if r % 2 else (False, True)):
            times[checked].append(once(checked))
    with_, without = statistics.median(times[True]), statistics.median(times[False])
    return with_, without, with_ / without


def check_alone(shape, runs=200):
    """Median seconds of the check's per-step work on one output of `shape`."""
    check = sample.FiniteCheck(50)
    out = torch.randn(1, *shape)
    check({"i": 0, "out": out})
    times = []
    for i in range(runs):
        start = time.perf_counter()
        check({"i": i % 50, "out": out})
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(args):
    torch.set_num_threads(args.threads)
    with_, without, ratio = tiny_sampling(args.runs)
    print(f"tiny teacher, CFG, 25 DDPM steps, batch 10, {args.runs} runs each, {args.threads} thread(s):")
    print(f"  with the check {with_:.4f} s, without {without:.4f} s, ratio {ratio:.4f}")
    for name, shape in FULL_SIZE.items():
        print(f"  the check alone, one {name} output {shape}: {check_alone(shape) * 1e6:.0f} us per step")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    main(p.parse_args())
