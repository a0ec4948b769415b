"""unet.py against diffusers' UNet2DConditionModel at full size, random weights: speed; peak memory of loading.

    python bench/bench_unet.py speed --threads 1 --runs 7           # CPU: SD 2.1 and SDXL, fp32, 32x32 latents
    python bench/bench_unet.py speed --device cuda --dtype bf16     # GPU: native sizes (SDXL 128x128, SD 2.1 96x96)
    python bench/bench_unet.py speed --device cuda --dtype bf16 --compile
    python bench/bench_unet.py load-memory                          # peak RSS of loading SDXL in bf16 from an fp32 file

Timings interleave ours and diffusers run by run (alternating which goes first) on the very same
weight tensors and report medians. On the CPU they also take the process's CPU time, which other
processes competing for the cores inflate far less than wall time; the ratio is then on CPU time.
"""

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import checkpoint  # noqa: E402
import unet  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def diffusers_options(config):
    """The config as diffusers' UNet2DConditionModel keyword arguments."""
    return {k: v for k, v in dataclasses.asdict(config).items() if k != "prediction_type"}


def random_pair(name, device, dtype):
    """(ours, diffusers') full-size UNet sharing one set of random weights: only one copy in memory."""
    from diffusers import UNet2DConditionModel  # the reference, for this benchmark only
    from diffusers.utils import logging

    logging.set_verbosity_error()  # not its advice on casting with .to(), which it does right here

    config = unet.PRESETS[name]()
    with torch.device("meta"):
        ref = UNet2DConditionModel(**diffusers_options(config))
        ours = unet.UNet(config)
    ref = ref.to_empty(device=device).to(dtype).eval()
    g = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for key, p in ref.named_parameters():  # fan-in scaled weights, unit norms, zero biases
            if p.ndim > 1:
                p.normal_(0, (p.numel() // p.shape[0]) ** -0.5, generator=g)
            else:
                p.fill_(1.0 if "norm" in key and key.endswith("weight") else 0.0)
    checkpoint.load_into(ours, ref.state_dict(), source="diffusers")
    return ours.eval(), ref


def inputs(name, batch, size, device, dtype):
    """Random latents, timesteps and text conditioning of the shapes the pipelines pass."""
    c = unet.PRESETS[name]()
    g = torch.Generator(device).manual_seed(1)
    x = torch.randn(batch, c.in_channels, size, size, generator=g, device=device, dtype=dtype)
    t = torch.full((batch,), 500.0, device=device)
    context = torch.randn(batch, 77, c.cross_attention_dim, generator=g, device=device, dtype=dtype)
    cond = {}
    if c.addition_embed_type == "text_time":
        pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
        px = 8.0 * size  # original size, crop corner, target size: the pipelines' default
        cond = dict(text_embeds=torch.randn(batch, pooled, generator=g, device=device, dtype=dtype),
                    time_ids=torch.tensor([[px, px, 0, 0, px, px]] * batch, device=device))
    return x, t, context, cond


def speed(args):
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    cpu = device.type == "cpu"
    if args.threads:
        torch.set_num_threads(args.threads)
    sync = (lambda: None) if cpu else torch.cuda.synchronize
    clocks = {"wall": time.perf_counter} | ({"CPU": time.process_time} if cpu else {})
    print(f"torch {torch.__version__}, {args.device} "
          f"({f'{torch.get_num_threads()} threads' if cpu else torch.cuda.get_device_name()}), "
          f"{args.dtype}, compile={args.compile}, {args.runs} interleaved runs after {args.warmup} warm-up\n")
    columns = [f"{who} ms ({clock})" for clock in clocks for who in ("ours", "diffusers")]
    print("| model | latents | batch | " + " | ".join(columns) + " | diffusers / ours | max rel. diff |")
    print("| --- " * (len(columns) + 5) + "|")
    for name in args.models:
        size = args.size or (32 if cpu else unet.PRESETS[name]().sample_size)
        ours, ref = random_pair(name, device, dtype)
        run_ours, run_ref = ours, ref
        if args.compile:
            run_ours, run_ref = torch.compile(ours), torch.compile(ref)
        for batch in args.batches:
            x, t, context, cond = inputs(name, batch, size, device, dtype)
            calls = {
                "ours": lambda: run_ours(x, t, context, **cond),
                "diffusers": lambda: run_ref(x, t, context, added_cond_kwargs=cond or None).sample,
            }
            times = {(clock, who): [] for clock in clocks for who in calls}
            with torch.inference_mode():
                out = {who: f() for who, f in calls.items()}
                for _ in range(args.warmup - 1):
                    for f in calls.values():
                        f()
                for i in range(args.runs):
                    for who in (list(calls) if i % 2 == 0 else list(calls)[::-1]):
                        sync()
                        start = {clock: now() for clock, now in clocks.items()}
                        calls[who]()
                        sync()
                        for clock, now in clocks.items():
                            times[clock, who].append(now() - start[clock])
            ms = {key: statistics.median(v) * 1000 for key, v in times.items()}
            # the ratio on the steadiest clock: CPU time is what the process itself spent, whatever else runs
            clock = "CPU" if cpu else "wall"
            a32, b32 = out["ours"].float(), out["diffusers"].float()
            err = ((a32 - b32).abs().max() / b32.abs().max()).item()
            cells = [f"{ms[c, who]:.0f}" for c in clocks for who in calls]
            ratio = f"{ms[clock, 'diffusers'] / ms[clock, 'ours']:.3f} ({clock})"
            print(f"| {name} | {size}x{size} | {batch} | {' | '.join(cells)} | {ratio} | {err:.1e} |", flush=True)
        del ours, ref, run_ours, run_ref


# -----------------------------------------------------------------------------
# peak memory of loading


def write_random_file(config, folder):
    """A full-size fp32 unet/ folder of random weights, written tensor by tensor (never whole in memory)."""
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in unet.UNet(config).state_dict().items()}
    header, offset = {}, 0
    for key, shape in shapes.items():  # the safetensors layout: 8-byte header size, JSON header, raw data
        size = 4 * (torch.Size(shape).numel())
        header[key] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)  # tensor data 8-byte aligned
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(diffusers_options(config)))
    g = torch.Generator().manual_seed(0)
    with open(folder / "diffusion_pytorch_model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for key, shape in shapes.items():
            f.write(torch.randn(shape, generator=g).mul_(0.02).numpy().tobytes())
    return offset


def status_kib(field):
    """A field of /proc/self/status, in KiB (VmHWM: the kernel's record of peak resident memory)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def measure_load(load):
    """(model, figures) of `model = load()` in this process: peak resident memory before and after (VmHWM), the
    peaks of its anonymous and file-backed parts (sampled: the kernel keeps only the total's), seconds, weights."""
    peaks = {"RssAnon": 0, "RssFile": 0}

    def sample():
        while not done.is_set():
            for k in peaks:
                peaks[k] = max(peaks[k], status_kib(k))
            time.sleep(0.005)

    done = threading.Event()
    before = status_kib("VmHWM")
    sampler = threading.Thread(target=sample)
    sampler.start()
    start = time.perf_counter()
    model = load()
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return model, dict(before_kib=before, peak_kib=status_kib("VmHWM"), weights_bytes=weights, seconds=seconds,
                       **{f"peak_{k}_kib": v for k, v in peaks.items()})


def load_child(args):
    """In a fresh process: load the folder in bf16, report peak resident memory as JSON."""
    _, figures = measure_load(lambda: unet.from_pretrained(args.path, dtype=torch.bfloat16))
    print(json.dumps(figures))


def load_memory(args):
    folder = Path(args.tmp) / "unet"
    try:
        print(f"writing a random fp32 SDXL UNet to {folder} ...", flush=True)
        size = write_random_file(unet.PRESETS["sdxl"](), folder)
        print(f"  {size / 1e9:.2f} GB of fp32 weights", flush=True)
        for run in range(args.runs):
            out = subprocess.run([sys.executable, __file__, "load-child", "--path", str(folder)],
                                 check=True, capture_output=True, text=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            gib, weights = 1024 ** 2, r["weights_bytes"] / 1024 ** 3
            peak, before = r["peak_kib"] / gib, r["before_kib"] / gib
            print(f"run {run + 1}: bf16 weights {weights:.2f} GiB; peak RSS {peak:.2f} GiB, of which "
                  f"{before:.2f} GiB before loading (python, torch); loading added {peak - before:.2f} GiB = "
                  f"{(peak - before) / weights:.2f} x the bf16 weights (peak anon {r['peak_RssAnon_kib'] / gib:.2f} "
                  f"GiB, peak file-backed {r['peak_RssFile_kib'] / gib:.2f} GiB, sampled); {r['seconds']:.0f} s",
                  flush=True)
    finally:
        shutil.rmtree(args.tmp, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="task", required=True)
    p = sub.add_parser("speed", help="ms per forward, ours and diffusers, same weights")
    p.add_argument("--models", nargs="+", default=["sd2.1", "sdxl"], choices=list(unet.PRESETS))
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    p.add_argument("--size", type=int, default=None, help="latent side (default: 32 on CPU, the model's own on GPU)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2])
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--compile", action="store_true", help="torch.compile both models")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.set_defaults(fn=speed)
    p = sub.add_parser("load-memory", help="peak resident memory of loading SDXL in bf16 from an fp32 file")
    p.add_argument("--tmp", default="/tmp/agd_bench_unet", help="scratch folder for the 10 GB file (deleted after)")
    p.add_argument("--runs", type=int, default=2)
    p.set_defaults(fn=load_memory)
    p = sub.add_parser("load-child")  # internal: the measured process
    p.add_argument("--path", required=True)
    p.set_defaults(fn=load_child)
    args = parser.parse_args()
    args.fn(args)
