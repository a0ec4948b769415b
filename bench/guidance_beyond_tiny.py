"""Beyond a constant scale, in one pass: guidance intervals and negative classes in the tiny world.

    python bench/guidance_beyond_tiny.py --out runs/guidance-beyond     # trains what it lacks, then measures

Guidance-distilled models lose the per-step schedule and the negative condition; AGD's adapters take
w (and, trained so, the negative) at every call, so both survive. Two experiments, each method from
the same noise, CFG against AGD as train_agd.py evaluates (tiny.generate; digit FID, accuracy):

1. interval: guidance only where the noise level sigma_t / alpha_t lies in (LOW, HIGH] (Kynkaanniemi
   et al. 2024; their EDM2 interval (0.28, 5.42] by default), against a constant w, at w = 1.5, 3, 5,
   with the default adapters (trained at constant w: the schedule only changes the w they are asked).
   CFG skips its null pass where w = 1, AGD its adapters.
2. negative: CFG(y, negative j) = neg + w (cond - neg) against AGD(y, negative j), with adapters trained
   on trajectories whose negative was drawn at random (train_agd.py --negatives), for several (y, j)
   pairs of digits that look alike; digit FID against the real digits of class y, accuracy on y, and
   the classifier's mean probability of j (how well j is avoided), beside the null negative's figures.

Writes DIR/metrics.json ({"results": [{"experiment", "method", "w", "schedule" | "negative", "fid",
"accuracy", "p_negative", "sec_per_image"}, ...]}) and DIR/samples.png. Seconds come from the
measuring run itself; on a machine that was busy then, `--retime` times the same rows again, alone
(`--repeats` interleaved batches of `--time-batch` a row: minutes, no scoring).
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import adapters  # noqa: E402
import checkpoint  # noqa: E402
import families  # noqa: E402
import guidance  # noqa: E402
import sample  # noqa: E402
import tiny  # noqa: E402
import train_agd  # noqa: E402

PAIRS = [(3, 8), (4, 9), (7, 1), (5, 6), (2, 7)]  # (asked for, guided away from): digits that look alike


def trained(folder, *options):
    """The adapters of `python train_agd.py --out folder *options`, trained here if not there yet."""
    file = Path(folder) / "adapters.safetensors"
    if not file.is_file():
        resume = ["--resume"] if (folder / "train_state.pt").is_file() else []  # a stopped training continues
        train_agd.main(train_agd.parse_args(["--out", str(folder), "--no-eval", *resume, *options]))
    return file


def methods(base, student, w, steps, schedule=None):
    """{name: make(cond, null) -> denoiser} for CFG and AGD at w, as sample.py builds them."""
    timesteps = base.scheduler.timesteps(steps)
    scale = schedule.at(w, base.scheduler, timesteps) if schedule is not None else w
    return {"cfg": lambda cond, null: sample.denoiser(base.model, cond, null, cfg_scale=scale),
            "agd": lambda cond, null: sample.denoiser(base.model, cond, null, student=student, w=scale)}


def p_of(classifier, images, j):
    """The classifier's mean probability of class j over the images."""
    with torch.no_grad():
        return classifier(images.clamp(-1, 1)).softmax(1)[:, j].mean().item()


def interval_experiment(base, student, classifier, reference, args):
    rows, grid = [], []
    schedules = {"constant": guidance.WSchedule(), f"interval:{args.interval[0]:g}:{args.interval[1]:g}":
                 guidance.WSchedule("interval", low=args.interval[0], high=args.interval[1])}
    labels = torch.arange(args.samples) % tiny.NUM_CLASSES
    for w in args.w:
        denoisers = {(name, m): make for name, s in schedules.items()
                     for m, make in methods(base, student, w, args.steps, s).items()}
        images, seconds = tiny.generate(base, denoisers, args.steps, args.samples, args.seed, args.batch)
        for (name, m), v in images.items():
            rows.append({"experiment": "interval", "method": m, "w": w, "schedule": name,
                         **tiny.score(classifier, v, reference, labels), "p_negative": None,
                         "sec_per_image": seconds[(name, m)]})
            if w == args.w[len(args.w) // 2]:
                grid.append((f"{m} {name.split(':')[0]} w={w:g}", v[:20]))
    return rows, grid


def negative_experiment(base, student, classifier, args):
    rows, grid = [], []
    digits, labels = tiny.load_digits()
    for y, j in PAIRS[:args.pairs]:
        reference = tiny.reference_statistics(classifier, digits[labels == y])  # the real digits of class y
        for negative in (None, j):
            for w in args.negative_w:
                images, seconds = tiny.generate(base, methods(base, student, w, args.steps), args.steps, args.pair_samples,
                                                args.seed, args.batch, classes=torch.full((args.pair_samples,), y),
                                                negative=negative)
                for m, v in images.items():
                    rows.append({"experiment": "negative", "method": m, "w": w, "y": y,
                                 "negative": "null" if negative is None else negative,
                                 **tiny.score(classifier, v, reference, torch.full((len(v),), y)),
                                 "p_negative": p_of(classifier, v, j), "sec_per_image": seconds[m]})
                    if w == args.negative_w[0]:
                        grid.append((f"{m} {y} vs {'null' if negative is None else negative}", v[:20]))
    return rows, grid


def retime(base, students, report, args):
    """Each row's seconds per image again: CFG and AGD take turns, `args.repeats` batches each, the median."""
    rows = report["results"]
    for cfg_row, agd_row in zip(rows[::2], rows[1::2]):
        assert (cfg_row["method"], agd_row["method"]) == ("cfg", "agd")
        interval = cfg_row["experiment"] == "interval"
        schedule = guidance.WSchedule.parse(cfg_row["schedule"]) if interval else None
        denoisers = methods(base, students[cfg_row["experiment"]], cfg_row["w"], args.steps, schedule)
        y = torch.arange(args.time_batch) % tiny.NUM_CLASSES if interval else \
            torch.full((args.time_batch,), cfg_row["y"])
        negative = None if interval or cfg_row["negative"] == "null" else cfg_row["negative"]
        times = {"cfg": [], "agd": []}
        for r in range(args.repeats):
            _, seconds = tiny.generate(base, denoisers, args.steps, args.time_batch, args.seed + r, args.time_batch,
                                       classes=y, negative=negative)
            for m in times:
                times[m].append(seconds[m])
        cfg_row["sec_per_image"], agd_row["sec_per_image"] = (float(np.median(times[m])) for m in ("cfg", "agd"))
    report["retimed"] = {"repeats": args.repeats, "batch": args.time_batch}
    return report


def save_grid(rows, file):
    """Labelled rows of 20 digits each."""
    from PIL import Image, ImageDraw

    scale, margin, size = 2, 130, 28 * 2
    canvas = Image.new("L", (margin + 20 * size, len(rows) * size), 255)
    draw = ImageDraw.Draw(canvas)
    for r, (label, images) in enumerate(rows):
        draw.text((4, r * size + size // 2 - 6), label, fill=0)
        pixels = ((images[:, 0].clamp(-1, 1) + 1) * 127.5).round().byte().numpy()
        for c, tile in enumerate(pixels):
            canvas.paste(Image.fromarray(tile).resize((size, size), Image.NEAREST), (margin + c * size, r * size))
    canvas.save(file)


def print_table(rows):
    print(f"{'experiment':<10} {'method':<4} {'w':>4} {'schedule / y vs negative':<26} {'FID':>7} {'acc':>6} "
          f"{'p(neg)':>7} {'ms/img':>7}")
    for r in rows:
        what = r.get("schedule") or f"{r['y']} vs {r['negative']}"
        p = "" if r["p_negative"] is None else f"{r['p_negative']:.3f}"
        print(f"{r['experiment']:<10} {r['method']:<4} {r['w']:>4.1f} {what:<26} {r['fid']:>7.2f} "
              f"{r['accuracy']:>6.3f} {p:>7} {1000 * r['sec_per_image']:>7.1f}")


def main(args):
    start = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.retime:
        report = json.loads((out / "metrics.json").read_text())
        base = families.load("tiny")
        students = {"interval": adapters.load(base.model, report["default_adapters"]).eval()}
        students["negative"] = adapters.load(base.model, report["negative_adapters"]).eval()
        retime(base, students, report, args)
        (out / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
        print_table(report["results"])
        print(f"-> {out / 'metrics.json'}: seconds per image retimed ({(time.time() - start) / 60:.1f} min)")
        return report
    default = Path(args.adapters) if args.adapters else trained(out / "default")
    negative = Path(args.negative_adapters) if args.negative_adapters else \
        trained(out / "negative", "--negatives", str(args.negatives))
    base = families.load("tiny")
    classifier = tiny.load_classifier()
    rows, grid = interval_experiment(base, adapters.load(base.model, default).eval(), classifier,
                                     tiny.reference_statistics(classifier), args)
    student = adapters.load(base.model, negative).eval()
    more, more_grid = negative_experiment(base, student, classifier, args)
    student.detach()
    rows, grid = rows + more, grid + more_grid
    report = {"results": rows, "default_adapters": str(default), "negative_adapters": str(negative),
              "negatives": args.negatives, "interval": args.interval, "samples": args.samples,
              "pair_samples": args.pair_samples, "steps": args.steps, "minutes": (time.time() - start) / 60}
    (out / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    save_grid(grid, out / "samples.png")
    print_table(rows)
    print(f"-> {out / 'metrics.json'}, {out / 'samples.png'} ({report['minutes']:.1f} min)")
    return report


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/guidance-beyond", help="output folder (its adapters are kept for reruns)")
    p.add_argument("--adapters", help="default adapters for the interval experiment (default: trained into "
                   "OUT/default by `python train_agd.py`)")
    p.add_argument("--negative-adapters", help="adapters trained with negatives (default: trained into OUT/negative "
                   "by `python train_agd.py --negatives NEGATIVES`)")
    p.add_argument("--negatives", type=float, default=0.5, help="train_agd.py --negatives of the negative adapters")
    p.add_argument("--interval", type=float, nargs=2, default=[0.28, 5.42], metavar=("LOW", "HIGH"))
    p.add_argument("--w", type=float, nargs="+", default=[1.5, 3.0, 5.0])
    p.add_argument("--negative-w", type=float, nargs="+", default=[3.0])
    p.add_argument("--samples", type=tiny.sample_count, default=500, help="per row of the interval experiment")
    p.add_argument("--pair-samples", type=tiny.sample_count, default=500,
                   help="per row of the negative experiment (200 resolve one class's accuracy to about 2.5 points)")
    p.add_argument("--pairs", type=int, default=len(PAIRS), help=f"how many of the (y, j) pairs {PAIRS} to measure")
    p.add_argument("--steps", type=int, default=families.FAMILIES["tiny"].train["steps"], help="sampler steps")
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--retime", action="store_true", help="only time the rows of OUT/metrics.json again (a quiet "
                   "machine's seconds for a measurement made on a busy one)")
    p.add_argument("--repeats", type=int, default=3, help="--retime: batches per method and row")
    p.add_argument("--time-batch", type=int, default=50, help="--retime: samples per batch")
    return p.parse_args(argv)


if __name__ == "__main__":
    try:
        main(parse_args())
    except (checkpoint.CheckpointError, FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
