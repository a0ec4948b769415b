"""AGD composed with a ControlNet, measured in the tiny world: CFG + ControlNet against AGD + ControlNet.

    python train_agd.py                          # the default tiny adapters -> runs/tiny/adapters.safetensors
    python bench/controlnet_tiny.py --out runs/controlnet-tiny

The adapters are the default ones, trained on the teacher's CFG without any ControlNet; the ControlNet
is the bundled one (tiny_controlnet.py; trained here first if assets/ lacks it). At each w, from the
same noise and for the same classes: CFG and AGD without a ControlNet, then both with it, each sample
controlled by the silhouette of a held-out real digit of its class. Measured: digit FID against the
5,000 real digits and class accuracy (tiny.score), control fidelity (tiny_controlnet.control_fidelity:
the mean IoU of each sample's silhouette with its control's; without a ControlNet, with the control
it was not given, which shows what the ControlNet changes), and seconds per image (median over batches,
the methods taking turns batch by batch). Writes DIR/metrics.json and DIR/samples.png.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import adapters  # noqa: E402
import checkpoint  # noqa: E402
import controlnet  # noqa: E402
import families  # noqa: E402
import guidance  # noqa: E402
import tiny  # noqa: E402
import tiny_controlnet  # noqa: E402

METHODS = [("cfg", False), ("agd", False), ("cfg", True), ("agd", True)]  # (method, with the ControlNet)
BOUNDS = "AGD + ControlNet: FID <= 1.1 x CFG + ControlNet's, accuracy within 0.02, fidelity within 0.02, time <= 0.6 x"


def controls_for(classes, images, labels):
    """For sample i, the silhouette of a held-out real digit of class classes[i] (the k-th of that class for
    its k-th sample): (n, 1, 28, 28) in [0, 1]."""
    _, held_out = tiny.split(len(images))
    by_class = {c: held_out[labels[held_out] == c] for c in range(tiny.NUM_CLASSES)}
    seen = {c: 0 for c in by_class}
    pick = []
    for c in classes.tolist():
        pick.append(by_class[c][seen[c] % len(by_class[c])])
        seen[c] += 1
    return tiny_controlnet.control_image(images[torch.stack(pick)])


def denoisers(base, student, net, w, cond, null, control):
    """{(method, controlled): denoiser} at scale w for one batch."""
    extra, extra_null = controlnet.control_condition([net], control, 1.0, batch=len(control))
    with_cn = controlnet.controlled(base.model, [net])
    student_cn = controlnet.controlled(student, [net])
    return {("cfg", False): guidance.guided(base.model, w, cond, null),
            ("agd", False): lambda x, t: student(x, t, w=w, **cond),
            ("cfg", True): guidance.guided(with_cn, w, {**cond, **extra}, {**null, **extra_null}),
            ("agd", True): lambda x, t: student_cn(x, t, w=w, **cond, **extra)}


@torch.no_grad()
def generate(base, student, net, eval_w, controls, classes, steps, batch_size, seed):
    """Samples and median seconds per image for every (method, controlled, w), every one from the same noise."""
    timesteps = base.scheduler.timesteps(steps)
    keys = [(m, c, w) for w in eval_w for m, c in METHODS]
    images, seconds = {k: [] for k in keys}, {k: [] for k in keys}
    for b, idx in enumerate(tqdm(torch.arange(len(classes)).split(batch_size), desc="controlnet_tiny")):
        cond, null = base.encode(classes[idx]), base.null(len(idx))
        for w in eval_w:
            for (m, c), denoise in denoisers(base, student, net, w, cond, null, controls[idx]).items():
                g = torch.Generator().manual_seed(seed * 1000 + b)  # the same noise for every method
                x = torch.randn((len(idx), *base.shape), generator=g)
                start = time.perf_counter()
                images[(m, c, w)].append(guidance.sample(denoise, x, base.scheduler, timesteps, generator=g))
                seconds[(m, c, w)].append((time.perf_counter() - start) / len(idx))
    return {k: torch.cat(v) for k, v in images.items()}, {k: float(np.median(v)) for k, v in seconds.items()}


def save_grid(rows, file, scale=2, margin=110):
    """Labelled rows of 28 x 28 images in [-1, 1] (the controls in [0, 1]), one column per sample."""
    from PIL import Image, ImageDraw

    n, size = rows[0][1].shape[0], 28 * scale
    canvas = Image.new("L", (margin + n * size, len(rows) * size), 255)
    draw = ImageDraw.Draw(canvas)
    for r, (label, images) in enumerate(rows):
        draw.text((4, r * size + size // 2 - 6), label, fill=0)
        pixels = ((images[:, 0].clamp(-1, 1) + 1) * 127.5).round().byte().numpy()
        for c in range(n):
            canvas.paste(Image.fromarray(pixels[c]).resize((size, size), Image.NEAREST), (margin + c * size, r * size))
    canvas.save(file)


def check_bounds(results):
    """For each w: AGD + ControlNet against CFG + ControlNet, each bound of BOUNDS held or not."""
    out = []
    for w in sorted({r["w"] for r in results}):
        at_w = {(r["method"], r["controlnet"]): r for r in results if r["w"] == w}
        cfg, agd = at_w[("cfg", True)], at_w[("agd", True)]
        out.append({"w": w, "fid": agd["fid"] <= 1.1 * cfg["fid"],
                    "accuracy": abs(agd["accuracy"] - cfg["accuracy"]) <= 0.02,
                    "control_fidelity": abs(agd["control_fidelity"] - cfg["control_fidelity"]) <= 0.02,
                    "time": agd["sec_per_image"] <= 0.6 * cfg["sec_per_image"],
                    "time_ratio": agd["sec_per_image"] / cfg["sec_per_image"]})
    return out


def print_table(results):
    print(f"{'method':<6} {'CN':<3} {'w':>4} {'FID':>8} {'accuracy':>9} {'fidelity':>9} {'ms/image':>9}")
    for r in results:
        print(f"{r['method']:<6} {'yes' if r['controlnet'] else 'no':<3} {r['w']:>4.1f} {r['fid']:>8.3f} "
              f"{r['accuracy']:>9.3f} {r['control_fidelity']:>9.3f} {1000 * r['sec_per_image']:>9.2f}")


def main(args):
    start = time.time()
    out = Path(args.out)
    if not Path(args.adapters).is_file():
        raise FileNotFoundError(f"{args.adapters}: no such adapters file (train the default ones with "
                                "`python train_agd.py`, or give --adapters)")
    if not (Path(args.controlnet) / "config.json").is_file():  # tiny.py writes the weights only when done
        tiny.main(tiny.parse_args(["controlnet", "--out", str(args.controlnet)]))
    base = families.load("tiny")
    student = adapters.load(base.model, args.adapters).eval()
    net = controlnet.from_pretrained(args.controlnet)
    controlnet.check_fits(net, base.model)
    digits, labels = tiny.load_digits()
    classes = torch.arange(args.samples) % tiny.NUM_CLASSES
    controls = controls_for(classes, digits, labels)
    steps = families.FAMILIES["tiny"].train["steps"]  # the sampler steps the adapters were trained and evaluated at
    images, seconds = generate(base, student, net, args.eval_w, controls, classes, steps, args.batch_size, args.seed)
    classifier = tiny.load_classifier()
    reference = tiny.reference_statistics(classifier)
    results = [{"method": m, "controlnet": c, "w": w, **tiny.score(classifier, images[(m, c, w)], reference, classes),
                "control_fidelity": tiny_controlnet.control_fidelity(images[(m, c, w)], controls),
                "sec_per_image": seconds[(m, c, w)]} for (m, c, w) in images]
    out.mkdir(parents=True, exist_ok=True)
    report = {"results": results, "bounds": BOUNDS, "held": check_bounds(results), "adapters": str(args.adapters),
              "controlnet": str(args.controlnet), "samples": args.samples, "steps": steps, "seed": args.seed,
              "threads": torch.get_num_threads(), "control_fidelity": "mean IoU of the sample's silhouette (mask "
              "dilated, blurred, > 0.5) with the control's; without a ControlNet, with the control it was not given",
              "minutes": (time.time() - start) / 60}
    (out / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    rows = [("control", controls[:20] * 2 - 1)]
    rows += [(f"{m.upper()}{' + CN' if c else ''} w={w:g}", images[(m, c, w)][:20])
             for w in args.eval_w for m, c in METHODS]
    save_grid(rows, out / "samples.png")
    print_table(results)
    for h in report["held"]:
        print(f"w={h['w']:g}: " + ", ".join(f"{k} {'held' if h[k] else 'FAILED'}" for k in
                                            ("fid", "accuracy", "control_fidelity", "time"))
              + f" (time ratio {h['time_ratio']:.2f})")
    print(f"-> {out / 'metrics.json'}, {out / 'samples.png'} ({report['minutes']:.1f} min)")
    return report


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for metrics.json and samples.png")
    p.add_argument("--adapters", default="runs/tiny/adapters.safetensors",
                   help="the default tiny adapters, trained without a ControlNet (`python train_agd.py`)")
    p.add_argument("--controlnet", default=str(tiny_controlnet.CONTROLNET), help="the tiny ControlNet's folder")
    p.add_argument("--eval-w", type=float, nargs="+", default=[1.5, 3.0, 5.0])
    p.add_argument("--samples", type=tiny.sample_count, default=500, help="per method and w")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--seed", type=int, default=1)
    return p.parse_args(argv)


if __name__ == "__main__":
    try:
        main(parse_args())
    except (checkpoint.CheckpointError, FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
