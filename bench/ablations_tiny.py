"""The paper's comparisons, re-run in the tiny world through the library's own code paths.

    python bench/ablations_tiny.py --out runs/ablations                 # every experiment (resumable)
    python bench/ablations_tiny.py --out runs/ablations --only data unseen

Each variant trains with the default run's recipe (train_agd.py: the same 1,000 trajectories, batch,
learning rate and loss) for a third of its steps, 500 (--train-steps 1500: the default run's own), and
is evaluated as the default run is (500 samples per row, the same noise, w = 1.5, 3, 5): digit FID,
class accuracy, seconds per image, trainable parameters. Two variants run at a time (--jobs), each in a
process of one thread: the whole set in about 40 minutes on 2 cores.

1. data: adapters trained on CFG-guided trajectories (AGD, Algorithm 1) against the same adapters
   trained on standard pairs: real digits noised by the forward process at the same timesteps, with
   the base's CFG output there as the target (Meng et al. 2023's guidance distillation data).
2. arch: the cross-attention adapter on w alone (the official default) and on w, t and the class; the
   additive ("offset") adapter with the official code's w x 1000 (cfg_mult) before its Fourier
   features; the tiny default, which adds the modulation adapters.
3. full: the whole model distilled (Meng et al.'s first stage: base unfrozen, w given to it by an added
   embedding on the timestep's, zero at start) against the adapters; the bundled teacher is copied,
   never changed.
4. unseen: the default adapters at w = 7 and 8, outside their training range [1, 6].
5. storage: --keep-steps 2, 4, 8 and 25 of 25 (the same trajectories, fewer of their steps kept).

Every variant's adapters and evaluation are cached under --out: a rerun computes only what is missing.
Writes OUT/metrics.json ({"results": [{"experiment", "variant", "w", "fid", "accuracy", "sec_per_image",
"trainable_parameters"}, ...]}), a table, and OUT/<experiment>.png (needs matplotlib, which the test
requirements install; without it the plots are skipped). Times: each variant's minutes and seconds per
image are its own process's, beside whatever ran with it (the default run's table gives AGD against CFG
interleaved, side by side).
"""

import argparse
import concurrent.futures
import copy
import dataclasses
import json
import multiprocessing
import os
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import adapters  # noqa: E402
import checkpoint  # noqa: E402
import families  # noqa: E402
import guidance  # noqa: E402
import tiny  # noqa: E402
import train_agd  # noqa: E402
import trajectories  # noqa: E402

EXPERIMENTS = ["data", "arch", "full", "unseen", "storage"]
DEFAULTS = families.FAMILIES["tiny"].train
# the whole model: Meng et al.'s recipe, plain MSE at the paper's 1e-4 (the adapters' 5e-3 wrecks it, and so
# does 5e-4 under the guidance loss, whose rows near w = 1 weigh up to 100 x: BENCHMARKS.md)
FULL_LR, FULL_LOSS = 1e-4, "mse"
# a third of the default run's training steps, so that the whole set fits 45 minutes on 2 cores (BENCHMARKS.md)
TRAIN_STEPS = 500


def default_options(**changes):
    """The tiny default adapters' options (train_agd.py's), with `changes`."""
    options = {k: DEFAULTS.get(k, families.OFFICIAL_ADAPTERS.get(k)) for k in train_agd.ADAPTER_OPTIONS}
    return {**options, "use_negative": False, **changes}


# variant -> (experiments it belongs to, adapter options; None: the whole model)
VARIANTS = {
    "default": (("data", "arch", "full", "unseen", "storage"), default_options()),
    "standard-data": (("data",), default_options()),
    "cross-attention (w)": (("arch",), default_options(use_timestep=False, use_class=False, modulation=False)),
    "cross-attention (w, t, class)": (("arch",), default_options(modulation=False)),
    "additive (w x 1000, t, class)": (("arch",), default_options(modulation=False, arch="additive", w_scale=1000.0)),
    "whole model": (("full",), None),
    **{f"keep {k} of 25": (("storage",), default_options()) for k in (2, 4, 8)},
}
LABELS = {"default": {"data": "CFG trajectories (AGD)", "arch": "tiny default (+ modulation)",
                      "unseen": "default adapters", "storage": "keep 25 of 25", "full": "adapters"},
          "standard-data": {"data": "standard (forward-noised real digits)"}}


class World:
    """What every variant shares: the teacher, the default run's trajectories and hyperparameters, the
    classifier and its reference statistics."""

    def __init__(self, args):
        self.args, self.out = args, Path(args.out)
        self.base = families.load("tiny")
        self.plan = trajectories.Collection(trajectories=args.trajectories, steps=args.steps,
                                            w_min=DEFAULTS["w_min"], w_max=DEFAULTS["w_max"], seed=args.seed)
        self.hp = train_agd.Training(args.train_steps, DEFAULTS["batch_size"], DEFAULTS["lr"], DEFAULTS["loss"],
                                     save_every=200, seed=args.seed)
        self.classifier = tiny.load_classifier()
        self.reference = tiny.reference_statistics(self.classifier)
        self._data = {}

    def collect(self):
        """The default run's trajectories, collected into OUT/trajectories where missing; their folder."""
        folder = self.out / "trajectories"
        trajectories.collect(self.base, self.plan, folder)
        return folder

    def data(self, name):
        """The training rows of a variant: the trajectories (or a kept part), or the standard pairs."""
        if "trajectories" not in self._data:
            self._data["trajectories"] = trajectories.load_shards(self.collect())
        data = self._data["trajectories"]
        if name == "standard-data":
            folder = self.out / "standard-data"
            for k in range(-(-self.plan.trajectories // self.plan.shard_size)):
                file = folder / f"shard_{k:05d}.safetensors"
                if not file.is_file():
                    digits, labels = tiny.load_digits()
                    checkpoint.save_file(trajectories.standard_shard(self.base, self.plan, k, digits, labels), file)
            return trajectories.load_shards(folder)
        if name.startswith("keep "):
            keep = int(name.split()[1])
            timesteps = self.base.scheduler.timesteps(self.plan.steps)
            return trajectories.keep_rows(data, [timesteps[i].item() for i in trajectories.keep_indices(
                len(timesteps), keep)])
        return data

    def student(self, name, options):
        """A fresh student of a variant: adapters on the teacher, or the whole teacher copied with a w embedding."""
        torch.manual_seed(self.args.seed)  # as train_agd.py: the same initialization for every variant
        if options is not None:
            return adapters.attach(self.base.model, **self.base.adapter_options(**options)), None
        model = copy.deepcopy(self.base.model)
        D = model.config.hidden_size
        # w enters as a vector added to the timestep's embedding, c = t_emb + w_emb + y_emb (Meng et al.)
        student = adapters.attach(model, sites=[adapters.Site("t_embedder", "vector", D, D)], arch="additive",
                                  hidden_dim=DEFAULTS["hidden_dim"], mlp_ratio=DEFAULTS["mlp_ratio"])
        model.requires_grad_(True)  # unfrozen: every parameter of the copy trains
        return student, list(student.parameters())

    def evaluate(self, denoisers, model=None):
        """Scored rows {name: {fid, accuracy, sec_per_image}} of `denoisers` (tiny.generate's), same noise as
        train_agd.py's evaluation."""
        base = self.base if model is None else dataclasses.replace(self.base, model=model)
        images, seconds = tiny.generate(base, denoisers, self.plan.steps, self.args.samples, self.args.seed + 1,
                                        self.args.batch)
        labels = torch.arange(self.args.samples) % tiny.NUM_CLASSES
        return {k: {**tiny.score(self.classifier, v, self.reference, labels), "sec_per_image": seconds[k]}
                for k, v in images.items()}


def cached(file, compute):
    """The JSON in `file`, computed and written first if missing."""
    if not file.is_file():
        file.parent.mkdir(parents=True, exist_ok=True)
        write_json(file, compute())
    return json.loads(file.read_text())


def write_json(file, value):
    tmp = file.with_name(file.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2))
    tmp.replace(file)


def run_variant(world, name, options, ws):
    """Train (resumably) and evaluate one variant at the scales ws; what was measured before is reused."""
    out = world.out / "variants" / name.replace(" ", "_").replace(",", "").replace("(", "").replace(")", "")
    out.mkdir(parents=True, exist_ok=True)
    file = out / "results.json"
    done = json.loads(file.read_text()) if file.is_file() else {"rows": {}, "minutes": 0.0}
    missing = [w for w in ws if f"{w:g}" not in done["rows"]]
    if missing:
        start = time.time()
        student, params = world.student(name, options)
        data = world.data(name)
        hp = dataclasses.replace(world.hp, lr=FULL_LR, loss=FULL_LOSS) if params else world.hp  # the whole model
        train_agd.train(student, lambda step: data, hp, out, resume=True, params=params)  # or resumed
        student.eval()
        done["trainable_parameters"] = sum(p.numel() for p in (params or student.adapters.parameters()))
        scored = world.evaluate({w: (lambda cond, null, w=w: (lambda x, t: student(x, t, w=w, **cond)))
                                 for w in missing}, student.model if params else None)
        student.detach()
        done["rows"].update({f"{w:g}": {"w": w, **scored[w]} for w in missing})
        done["minutes"] += (time.time() - start) / 60
        write_json(file, done)
    return {"rows": [done["rows"][f"{w:g}"] for w in ws], "trainable_parameters": done["trainable_parameters"],
            "minutes": done["minutes"]}


def reference_rows(world, ws):
    """CFG at each of ws and the base without guidance, evaluated as the variants are (cached)."""
    return cached(world.out / f"reference-{'-'.join(f'{w:g}' for w in ws)}.json", lambda: {
        "rows": [{"method": m, "w": w, **r} for (m, w), r in world.evaluate({
            **{("cfg", w): (lambda cond, null, w=w: guidance.guided(world.base.model, w, cond, null)) for w in ws},
            ("base", 1.0): lambda cond, null: (lambda x, t: world.base.model(x, t, **cond))}).items()]})


def measure(world, task):
    """One task of the set: ("reference", ws) or (variant name, ws)."""
    name, ws = task
    return reference_rows(world, ws) if name == "reference" else run_variant(world, name, VARIANTS[name][1], ws)


# a task's minutes relative to a plain variant's (measured at 500 steps, BENCHMARKS.md): the longest go first
COST = {"standard-data": 1.7, "default": 1.4, "whole model": 1.3, "reference": 1.2}


def each(world, args, tasks):
    """Yield (task, result) as the tasks finish: in this process, or `args.jobs` at a time in worker
    processes of one thread each (a second thread speeds a tiny model up 1.6 x; a second process beside
    it, 2 x)."""
    if args.jobs == 1:
        for task in tasks:
            yield task, measure(world, task)
        return
    with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn"),
                                                initializer=start_worker, initargs=(args,)) as pool:
        futures = {pool.submit(measure_in_worker, task): task
                   for task in sorted(tasks, key=lambda task: -COST.get(task[0], 1.0))}
        for future in concurrent.futures.as_completed(futures):
            yield futures[future], future.result()


WORKER = {}


def start_worker(args):
    """A worker: one thread; its progress bars and messages go to OUT/worker-<pid>.log (beside the parent's
    bar, which counts the tasks, they would interleave); its errors reach the parent."""
    torch.set_num_threads(1)
    sys.stderr = sys.stdout = open(Path(args.out) / f"worker-{os.getpid()}.log", "a", buffering=1)
    WORKER["world"] = World(args)


def measure_in_worker(task):
    return measure(WORKER["world"], task)


SETTINGS = ("trajectories", "train_steps", "steps", "samples", "seed")  # what the cached results depend on


def measured_settings(out):
    """The settings the results cached in `out` were measured with: its settings.json, or in a folder of
    before that file, those its metrics.json names ({}: a new folder)."""
    for name in ("settings.json", "metrics.json"):
        if (out / name).is_file():
            return {k: v for k, v in json.loads((out / name).read_text()).items() if k in SETTINGS}
    return {}


def check_settings(args):
    """Refuse settings other than those of the results cached in OUT; record them in OUT/settings.json."""
    out, mine = Path(args.out), {k: getattr(args, k) for k in SETTINGS}
    changed = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in measured_settings(out).items() if v != mine[k])
    if changed:
        raise ValueError(f"{args.out} holds results measured with {changed}: pass those, or another --out")
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "settings.json", mine)


def run(args):
    start = time.time()
    check_settings(args)
    world = World(args)
    wanted = args.only or EXPERIMENTS
    ws = list(args.w)
    unseen = ws + [w for w in args.unseen_w if w not in ws]
    world.collect()  # once (on every thread), before the variants share them
    tasks = [("reference", unseen if "unseen" in wanted else ws)] + [
        (name, unseen if "unseen" in experiments else ws) for name, (experiments, _) in VARIANTS.items()
        if any(e in wanted for e in experiments)]
    results = {}
    if args.jobs > 1:
        print(f"{args.jobs} variants at a time, one thread each; their progress: {world.out}/worker-*.log")
    with tqdm(total=len(tasks), desc=f"ablations ({args.jobs} at a time)") as bar:
        for (name, _), result in each(world, args, tasks):
            results[name] = result
            if name != "reference":
                bar.write(f"{name}: {result['minutes']:.1f} min (training and evaluation; cached after the first run)")
            bar.update()
    rows = [{"experiment": "reference", "variant": r["method"], "trainable_parameters": 0, **r}
            for r in results.pop("reference")["rows"]]
    for name, (experiments, _) in VARIANTS.items():
        if name not in results:
            continue
        result = results[name]
        for experiment in [e for e in experiments if e in wanted]:
            for r in result["rows"]:
                if experiment != "unseen" and r["w"] not in ws or experiment == "unseen" and r["w"] not in args.unseen_w:
                    continue
                rows.append({"experiment": experiment, "variant": LABELS.get(name, {}).get(experiment, name), **r,
                             "trainable_parameters": result["trainable_parameters"], "minutes": result["minutes"]})
    report = {"results": rows, "trajectories": args.trajectories, "train_steps": args.train_steps,
              "samples": args.samples, "jobs": args.jobs, "minutes": (time.time() - start) / 60}
    (world.out / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    print_table(rows)
    plot(rows, world.out)
    print(f"-> {world.out / 'metrics.json'} ({report['minutes']:.1f} min)")
    return report


def print_table(rows):
    print(f"{'experiment':<10} {'variant':<38} {'w':>4} {'FID':>7} {'acc':>6} {'ms/img':>7} {'trainable':>10}")
    for r in rows:
        print(f"{r['experiment']:<10} {r['variant']:<38} {r['w']:>4.1f} {r['fid']:>7.2f} {r['accuracy']:>6.3f} "
              f"{1000 * r['sec_per_image']:>7.1f} {r['trainable_parameters']:>10,}")


def plot(rows, out):
    """OUT/<experiment>.png: FID and accuracy against w (storage: against the steps kept), CFG for reference."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install -r requirements-test.txt)")
        return
    cfg = [r for r in rows if r["experiment"] == "reference" and r["variant"] == "cfg"]
    for experiment in sorted({r["experiment"] for r in rows} - {"reference"}):
        mine = [r for r in rows if r["experiment"] == experiment]
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
        for ax, key in zip(axes, ("fid", "accuracy")):
            if experiment == "storage":
                for w in sorted({r["w"] for r in mine}):
                    pts = sorted((int(r["variant"].split()[1]), r[key]) for r in mine if r["w"] == w)
                    ax.plot(*zip(*pts), "o-", label=f"AGD, w = {w:g}")
                    ax.axhline(next(c[key] for c in cfg if c["w"] == w), ls="--", lw=0.8, color="gray")
                ax.set(xlabel="steps of 25 kept per trajectory", xscale="log")
            else:
                for variant in dict.fromkeys(r["variant"] for r in mine):
                    pts = sorted((r["w"], r[key]) for r in mine if r["variant"] == variant)
                    ax.plot(*zip(*pts), "o-", label=variant)
                ws = sorted({r["w"] for r in mine})
                ax.plot(ws, [next(c[key] for c in cfg if c["w"] == w) for w in ws], "k--", label="CFG")
                ax.set(xlabel="guidance scale w")
            ax.set(ylabel={"fid": "digit FID (lower is better)", "accuracy": "class accuracy"}[key])
        axes[0].legend(fontsize=8)
        fig.suptitle(f"ablation: {experiment}")
        fig.tight_layout()
        fig.savefig(out / f"{experiment}.png", dpi=100)
        plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/ablations", help="output folder; what is in it is reused")
    p.add_argument("--only", nargs="+", choices=EXPERIMENTS, help="these experiments only (default: all)")
    p.add_argument("--w", type=float, nargs="+", default=[1.5, 3.0, 5.0], help="evaluation scales")
    p.add_argument("--unseen-w", type=float, nargs="+", default=[7.0, 8.0], help="the unseen experiment's scales")
    p.add_argument("--trajectories", type=int, default=DEFAULTS["trajectories"])
    p.add_argument("--train-steps", type=int, default=TRAIN_STEPS, help=f"per variant (default: {TRAIN_STEPS}; "
                   f"the default run's own {DEFAULTS['train_steps']} take about 75 minutes on 2 cores)")
    p.add_argument("--steps", type=int, default=DEFAULTS["steps"], help="sampler steps (collection and evaluation)")
    p.add_argument("--samples", type=tiny.sample_count, default=500, help="per row")
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=2, help="variants measured at a time, each in a process of one "
                   "thread (1: one after another in this process, on every thread)")
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error(f"--jobs {args.jobs}: at least 1")
    return args


if __name__ == "__main__":
    try:
        run(parse_args())
    except (checkpoint.CheckpointError, FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
