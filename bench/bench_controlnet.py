"""One AGD + ControlNet step against one CFG + ControlNet step, full-size SDXL at 1024 px, random weights (CPU).

    OMP_NUM_THREADS=2 python bench/bench_controlnet.py --runs 2

The SDXL UNet with the full-size SDXL ControlNet (the architecture of diffusers/controlnet-canny-sdxl-1.0:
ControlNetModel.from_unet of SDXL base, 1.25 B parameters) and adapters at the paper's placements
(bench_agd.py's). A CFG + ControlNet step runs the ControlNet and the UNet on the conditional and the
null batch (2B), as diffusers' pipeline does; an AGD + ControlNet step runs each once at batch B.
The two take turns run by run, the order alternating, after one warm-up each; medians and best runs.
"""

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import adapters  # noqa: E402
import controlnet  # noqa: E402
import families  # noqa: E402
import guidance  # noqa: E402
import unet  # noqa: E402
from bench_agd import build  # noqa: E402


@torch.no_grad()
def main(args):
    print(f"CPU, {torch.get_num_threads()} threads, float32, torch {torch.__version__}")
    model, x, cond, null = build("sdxl", args.resolution, args.batch)  # random full-size UNet at batch B
    torch.manual_seed(1)
    net = controlnet.ControlNet(controlnet.ControlNetConfig(**dataclasses.asdict(unet.PRESETS["sdxl"]()))).eval()
    controlnet.check_fits(net, model)
    student = adapters.attach(model, hidden_dim=families.FAMILIES["sdxl"].train["hidden_dim"])
    for a in student.adapters:  # trained adapters are not zero; the cost is the same either way
        torch.nn.init.normal_(a.out_proj.weight, std=0.02)
    image = torch.rand(1, 3, 8 * x.shape[-2], 8 * x.shape[-1])                # a control image in [0, 1]
    extra, extra_null = controlnet.control_condition([net], image[0], 0.5, batch=args.batch)
    t, w = torch.full((args.batch,), 500), 5.0
    run = {"cfg+cn": lambda: guidance.guided(controlnet.controlled(model, [net]), w, {**cond, **extra},
                                             {**null, **extra_null})(x, t),
           "agd+cn": lambda: controlnet.controlled(student, [net])(x, t, w=w, **cond, **extra)}
    for fn in run.values():
        fn()  # warm-up
    times = {k: [] for k in run}
    for r in range(args.runs):
        for k in (list(run) if r % 2 == 0 else list(run)[::-1]):
            start = time.perf_counter()
            run[k]()
            times[k].append(time.perf_counter() - start)
            print(f"  run {r} {k}: {times[k][-1]:.2f} s", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    n_net = sum(p.numel() for p in net.parameters())
    n_adapter, n_base = student.num_parameters()
    print(f"sdxl {8 * x.shape[-1]} px, batch {args.batch}: UNet {n_base / 1e6:.0f} M, ControlNet {n_net / 1e6:.0f} M, "
          f"adapters {n_adapter / 1e6:.1f} M; {args.runs} runs")
    print(f"  median s/step: CFG + ControlNet {med['cfg+cn']:.2f}, AGD + ControlNet {med['agd+cn']:.2f}; "
          f"AGD / CFG {med['agd+cn'] / med['cfg+cn']:.3f} (best runs "
          f"{min(times['agd+cn']) / min(times['cfg+cn']):.3f})")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=2, help="timed runs of each")
    p.add_argument("--batch", type=int, default=1, help="B: images per step")
    p.add_argument("--resolution", type=int, default=1024, help="image side in pixels")
    main(p.parse_args())
