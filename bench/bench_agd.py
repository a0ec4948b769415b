"""One AGD step against one CFG step on full-size DiT-XL/2, SD 2.1 and SDXL (random weights, CPU).

    python bench/bench_agd.py --models dit sd21 sdxl --runs 5

A CFG step runs the base on the conditional and the null batch (one call of batch 2B); an AGD
step runs the student once at batch B, its adapters at the paper's placements and widths (DiT:
every block's self-attention, 256 wide; SD: every transformer block's attn2, 320 wide). The base
alone at batch B is timed too, so that the adapters' own cost is the AGD step's excess over it.
Runs of the three take turns, the order rotating, so that a busy moment on a shared machine
weighs on all; reported are medians, best runs, AGD / CFG and (AGD - base) / base.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import adapters  # noqa: E402
import dit  # noqa: E402
import families  # noqa: E402
import guidance  # noqa: E402
import unet  # noqa: E402

MODELS = ["dit", "sd21", "sdxl"]  # families whose full-size architecture is built here


def build(name, resolution, batch):
    """(random full-size model, latents of batch B, cond, null) at `resolution` pixels (None: native)."""
    torch.manual_seed(0)
    if name == "dit":
        cfg = dit.DiT_models["DiT-XL/2"]()
        cfg.input_size = (resolution or 256) // 8
        model = dit.DiT(cfg).eval()
        with torch.no_grad():  # off the zero-inits, or every output would be zero
            for p in model.parameters():
                p.normal_(0, 0.02)
        S = cfg.input_size
        cond = {"y": torch.randint(0, 1000, (batch,))}
        null = {"y": torch.full((batch,), 1000)}
        return model, torch.randn(batch, 4, S, S), cond, null
    cfg = unet.PRESETS["sd2.1" if name == "sd21" else "sdxl"]()
    model = unet.UNet(cfg).eval()  # PyTorch's default initialization: random, not zero
    S = (resolution or 8 * cfg.sample_size) // 8
    cond = {"context": torch.randn(batch, 77, cfg.cross_attention_dim)}
    if name == "sdxl":
        size = torch.tensor([[8 * S, 8 * S, 0, 0, 8 * S, 8 * S]], dtype=torch.float32).repeat(batch, 1)
        cond.update(text_embeds=torch.randn(batch, 1280), time_ids=size)
    null = {k: torch.zeros_like(v) if k != "time_ids" else v for k, v in cond.items()}
    return model, torch.randn(batch, 4, S, S), cond, null


def seconds(fn, device):
    """Wall time of fn(), waiting for a GPU's queued work to finish."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


@torch.no_grad()
def bench(name, args):
    model, x, cond, null = build(name, args.resolution.get(name), args.batch)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    model = model.to(device, dtype)
    x = x.to(device, dtype)
    cond, null = ({k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in c.items()}
                  for c in (cond, null))
    student = adapters.attach(model, hidden_dim=families.FAMILIES[name].train["hidden_dim"]).to(dtype=dtype)
    for a in student.adapters:  # trained adapters are not zero; the cost is the same either way
        torch.nn.init.normal_(a.out_proj.weight, std=0.02)
    t, w = torch.full((args.batch,), 500, device=device), 5.0
    run = {"cfg": lambda: guidance.guided(model, w, cond, null)(x, t),
           "agd": lambda: student(x, t, w=w, **cond),
           "base": lambda: model(x, t, **cond)}
    for fn in run.values():
        fn()  # warm-up
    times = {k: [] for k in run}
    order = list(run)
    for r in tqdm(range(args.runs), desc=name, leave=False):
        for k in order[r % 3:] + order[:r % 3]:
            times[k].append(seconds(run[k], device))
    n_adapter, n_base = student.num_parameters()
    med = {k: statistics.median(v) for k, v in times.items()}
    side = x.shape[-1] * 8
    print(f"{name} {side} px, batch {args.batch}: {n_base / 1e6:.0f} M parameters, adapters "
          f"{n_adapter / 1e6:.1f} M ({100 * n_adapter / n_base:.1f} %) on {len(student.targets)} "
          f"{student.targets[0].rsplit('.', 1)[-1]} modules; {args.runs} runs")
    print(f"  median s/step: CFG {med['cfg']:.3f}, AGD {med['agd']:.3f}, base {med['base']:.3f}; "
          f"AGD / CFG {med['agd'] / med['cfg']:.3f} (best runs {min(times['agd']) / min(times['cfg']):.3f}); "
          f"adapters' own cost {100 * (med['agd'] - med['base']) / med['base']:.1f} % of a forward pass "
          f"(best runs {100 * (min(times['agd']) - min(times['base'])) / min(times['base']):.1f} %)")
    for k, v in times.items():
        print(f"    {k:<5}" + " ".join(f"{s:.3f}" for s in v))


def main(args):
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    print(f"{where}, {args.dtype}, torch {torch.__version__}")
    for name in args.models:
        bench(name, args)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=MODELS)
    parser.add_argument("--batch", type=int, default=1, help="B: images per step")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--runs", type=int, default=5, help="timed runs of each of CFG, AGD, base")
    parser.add_argument("--resolution", nargs="*", default=[], metavar="MODEL=PX",
                        help="images' side in pixels per model, e.g. sdxl=512 (default: each model's native one)")
    args = parser.parse_args()
    try:
        args.resolution = {k: int(v) for k, v in (item.split("=") for item in args.resolution)}
    except ValueError:
        parser.error("--resolution takes MODEL=PIXELS, e.g. sdxl=512")
    main(args)
