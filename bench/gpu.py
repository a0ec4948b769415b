"""Every GPU figure of this project in one prepared run: at most 8 minutes on one H100 / H200.

    python bench/gpu.py                   # -> bench/results/gpu-<device>.json, and tables for BENCHMARKS.md
    python bench/gpu.py --dry-run         # every section on tiny configs, on the CPU, in seconds (a test runs it)
    python bench/gpu.py --sections compile --total 900     # one section, with more time

Random full-size weights built on the GPU (bench/random_models.py: the presets, no hub), bf16,
attention through SDPA (ours; diffusers' AttnProcessor2_0). The library's own paths: families,
adapters (default options of train_agd.py), guidance.guided, sample.sample_latents,
train_agd.train, trajectories.collect_shard, fast.speed_up. Each section runs in a forked child
process under its time limit (the imports are paid once, and its GPU memory and peak statistics
are its own): a section that fails, runs out of memory or out of time is recorded as such, with
the rows it had measured, and the rest still run. The JSON is rewritten as each section ends.

Sections, each with its limit in seconds on an H100 (SECTIONS):
  env                the device, torch, CUDA, diffusers
  step_*             ms per denoiser step at batch B: the base at B, CFG (one call at batch 2B), AGD
                     (the student at B, the default adapters); ours and diffusers on the same weights,
                     taking turns; eager, then eager in channels_last (UNets). SDXL 1024 px and SD 2.1
                     768 px at batch 1, DiT-XL/2 256 px at 1, 8 and 32
  image_sdxl         seconds per SDXL image: 50 steps with CFG and with AGD, prompt encoding and decoding in
  train_memory_sdxl  peak memory of train_agd.train, SDXL 1024 px: batch 1 with and without gradient
                     checkpointing; the largest batch under 24 GiB (allocator capped there: doubling, then
                     bisecting, while time is left)
  collect_sdxl       trajectories per minute of Algorithm 1 at SDXL's defaults (collect_shard: 50 steps,
                     batches of 4), and its peak memory
  compile            the steps again under torch.compile (fast.speed_up), the most telling first, while
                     time is left; compile seconds and graph breaks; last, CUDA graphs (reduce-overhead)
"""

import argparse
import dataclasses
import json
import multiprocessing
import os
import signal
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import adapters  # noqa: E402
import fast  # noqa: E402
import families  # noqa: E402
import guidance  # noqa: E402
import prompts  # noqa: E402
import random_models  # noqa: E402
import sample  # noqa: E402
import train_agd  # noqa: E402
import train_memory  # noqa: E402
import trajectories  # noqa: E402

GiB = 2 ** 30
TOTAL = 480  # seconds for the whole run on one GPU
W = 7.5  # the guidance scale of every step (its value changes no cost)
TRAIN_LIMIT = 24 * GiB  # the 24 GB card of the paper's claim
DRY_LARGEST = 2  # the dry run's pretended largest batch
SIDE = {"sdxl": 1024, "sd21": 768, "dit": 256}  # pixels


@dataclasses.dataclass
class Context:
    """What a section runs with, and where its rows go (a JSON file, rewritten after each row)."""
    device: torch.device
    dtype: torch.dtype
    dry: bool  # tiny configs on the CPU
    deadline: float  # time.monotonic() by which the section must be done
    part: Path
    rows: list = dataclasses.field(default_factory=list)
    notes: list = dataclasses.field(default_factory=list)

    def left(self):
        return self.deadline - time.monotonic()

    def px(self, name):
        """The image side a family's rows are at (the dry run's tiny models: "tiny")."""
        return "tiny" if self.dry else SIDE[name]

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def record(self, **row):
        self.rows.append(row)
        print("  " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
              flush=True)
        self.save()

    def note(self, text):
        self.notes.append(text)
        print(f"  note: {text}", flush=True)
        self.save()

    def save(self, **extra):
        tmp = self.part.with_name(self.part.name + ".tmp")
        tmp.write_text(json.dumps({"rows": self.rows, "notes": self.notes, **extra}, indent=1))
        tmp.replace(self.part)


# -----------------------------------------------------------------------------
# shared pieces


def student_of(base, model=None, sites=None):
    """The default student of train_agd.py (fp32 adapters, as sample.py loads them) on `model` (default: the base's).

    Output projections drawn off zero: trained adapters are not zero (the cost is the same either way).
    """
    torch.manual_seed(0)
    options = random_models.adapter_options(base.family.name, base.model)
    student = adapters.attach(model if model is not None else base.model, sites=sites, **options)
    with torch.no_grad():
        for a in student.adapters:
            a.out_proj.weight.normal_(0, 0.02)
    return student


def step_calls(net, student, x, t, cond, null, variants=("base", "cfg", "agd")):
    """One denoiser step of each kind: the base at batch B, CFG as one call at 2B, AGD in the student's scope."""
    guided = guidance.guided(net, W, cond, null)

    def agd():
        with student.condition(w=W, t=t, **cond):
            return net(x, t, **cond)

    calls = {"base": lambda: net(x, t, **cond), "cfg": lambda: guided(x, t), "agd": agd}
    return {k: calls[k] for k in variants}


@torch.no_grad()
def time_calls(ctx, calls, runs, warmup):
    """{name: (median ms, best ms)}: the calls take turns run by run, the order rotating, after `warmup` each."""
    for _ in range(warmup):
        for f in calls.values():
            f()
    names, times = list(calls), {k: [] for k in calls}
    for r in range(runs):
        for k in names[r % len(names):] + names[:r % len(names)]:
            ctx.sync()
            start = time.perf_counter()
            calls[k]()
            ctx.sync()
            times[k].append(1000 * (time.perf_counter() - start))
    return {k: (statistics.median(v), min(v)) for k, v in times.items()}


def runs(ctx, gpu_runs):
    return (2, 1) if ctx.dry else (gpu_runs, 3)


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


# -----------------------------------------------------------------------------
# sections


def env_section(ctx):
    row = dict(torch=torch.__version__, device=str(ctx.device), dtype=str(ctx.dtype).removeprefix("torch."))
    if ctx.device.type == "cuda":
        p = torch.cuda.get_device_properties(ctx.device)
        row.update(name=p.name, memory_gib=p.total_memory / GiB, cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version(), flash_sdp=torch.backends.cuda.flash_sdp_enabled())
    else:
        row.update(name="cpu (dry run)", threads=torch.get_num_threads())
    try:
        import diffusers

        row["diffusers"] = diffusers.__version__
    except ImportError:
        row["diffusers"] = None
    ctx.record(**row)


def twin_of(ctx, base, student):
    """(diffusers' twin's call, a student on it with the same adapter weights), or None without diffusers."""
    try:
        twin, call = random_models.diffusers_twin(base.model)
    except ImportError:
        ctx.note("diffusers is not installed: its rows are skipped")
        return None
    twin_student = student_of(base, twin, random_models.twin_sites(base.model, student.sites))
    for a, b in zip(student.adapters, twin_student.adapters):
        b.load_state_dict(a.state_dict())
    return twin, call, twin_student


def step_section(ctx, name, batches):
    base = random_models.base(name, ctx.device, ctx.dtype, tiny=ctx.dry, text=False)
    student = student_of(base)
    twin = twin_of(ctx, base, student)
    impls = {"ours": (base.model, student)} | ({"diffusers": (twin[1], twin[2])} if twin else {})
    n_adapter, n_base = student.num_parameters()
    ctx.note(f"{name}: {n_base:,} base parameters, adapters {n_adapter:,} beside {len(student.sites)} modules")
    layouts = ["contiguous"] + (["channels_last"] if name != "dit" else [])
    for layout in layouts:
        if layout == "channels_last":  # ours by the library's flag; diffusers' as its docs advise
            fast.speed_up(base.model, channels_last=True)
            if twin:
                twin[0].to(memory_format=torch.channels_last)
        for B in batches:
            if ctx.left() < (5 if ctx.dry else 8 * B ** 0.5):
                ctx.note(f"batch {B} {layout}: skipped, {ctx.left():.0f} s left")
                continue
            x, t, cond, null = random_models.inputs(base, B)
            calls = {(impl, k): f for impl, (net, s) in impls.items()
                     for k, f in step_calls(net, s, x, t, cond, null).items()}
            if twin and layout == "contiguous" and B == batches[0]:  # the same weights: the same outputs
                with torch.no_grad():
                    ctx.note(f"ours against diffusers, same weights: base rel. diff "
                             f"{rel_err(calls['ours', 'base'](), calls['diffusers', 'base']()):.1e}, AGD "
                             f"{rel_err(calls['ours', 'agd'](), calls['diffusers', 'agd']()):.1e}")
            for (impl, k), (ms, best) in time_calls(ctx, calls, *runs(ctx, 10)).items():
                ctx.record(model=name, px=ctx.px(name), batch=B, impl=impl, mode="eager", layout=layout, variant=k,
                           ms=ms, best_ms=best)


def image_section(ctx):
    base = random_models.base("sdxl", ctx.device, ctx.dtype, tiny=ctx.dry, with_vae=True)
    student = student_of(base)
    steps = 2 if ctx.dry else families.FAMILIES["sdxl"].sample["steps"]
    prompt = families.FAMILIES["sdxl"].sample["prompts"]
    noise = torch.randn((1, *base.shape), generator=torch.Generator(ctx.device).manual_seed(0), device=ctx.device)

    @torch.no_grad()
    def image(method, n=steps):
        agd = method == "agd"
        z = sample.sample_latents(base, prompt, noise, n, cfg_scale=None if agd else W,
                                  student=student if agd else None, w=W if agd else None)
        return base.vae.decode(z)

    for method in ("cfg", "agd"):  # warm-up: kernels chosen, memory cached
        image(method, 2)
    z = torch.randn((1, *base.shape), device=ctx.device)
    decode = time_calls(ctx, {"decode": lambda: base.vae.decode(z)}, *runs(ctx, 3))["decode"][0] / 1000
    for i, method in enumerate(("cfg", "agd", "agd", "cfg")):  # each recorded as it ends: a timeout keeps them
        if i == 2 and ctx.left() < 2 * sum(r["seconds"] for r in ctx.rows) + 2:
            ctx.note("second runs skipped: not enough time left")
            break
        ctx.sync()
        start = time.perf_counter()
        image(method)
        ctx.sync()
        ctx.record(model="sdxl", px=ctx.px("sdxl"), steps=steps, method=method, seconds=time.perf_counter() - start,
                   decode_seconds=decode)


def train_memory_section(ctx):
    """Peak memory of train_agd.train; absolute on a GPU (weights included), on the CPU the weights plus the
    profiler's peak. The dry run's limit is made up (batch DRY_LARGEST fits, one more does not), to walk the search."""
    base = random_models.base("sdxl", ctx.device, ctx.dtype, tiny=ctx.dry, text=False)
    student = student_of(base)
    weights = sum(p.numel() * p.element_size() for p in student.parameters())  # base and adapters
    rows = train_memory.training_rows(base.model, 8 if ctx.dry else 64, base.shape[-1])
    cuda = ctx.device.type == "cuda"

    def trial(batch, checkpointing):
        """(peak allocated, peak reserved or None, seconds per step) of 2 training steps, or None if out of memory."""
        base.model.gradient_checkpointing = checkpointing
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(ctx.device)
        start = time.perf_counter()
        try:
            _, delta = train_memory.peak_allocated(lambda: train_memory.train(student, rows, batch), ctx.device)
        except torch.OutOfMemoryError:
            student.adapters.zero_grad(set_to_none=True)
            return None
        seconds = (time.perf_counter() - start) / 2
        if cuda:
            return torch.cuda.max_memory_allocated(ctx.device), torch.cuda.max_memory_reserved(ctx.device), seconds
        return weights + delta, None, seconds

    def record(batch, checkpointing, result, search=False):
        peak, reserved, seconds = result or (None, None, None)
        gib = lambda v: None if v is None else v / GiB  # noqa: E731
        fits = result is not None and (cuda or batch <= DRY_LARGEST)  # on a GPU: no OOM under the cap
        ctx.record(model="sdxl", px=ctx.px("sdxl"), batch=batch, checkpointing=checkpointing, peak_gib=gib(peak),
                   reserved_gib=gib(reserved), seconds_per_step=seconds, fits_limit=fits if search else None)
        return fits, seconds

    one = trial(1, True)
    record(1, True, one)
    record(1, False, trial(1, False))
    if cuda:  # the allocator refuses what a 24 GiB card could not hold
        total = torch.cuda.get_device_properties(ctx.device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, TRAIN_LIMIT / total), ctx.device)
        ctx.note(f"search: the largest batch whose training stays under {TRAIN_LIMIT / GiB:.0f} GiB "
                 "(allocator capped there)")
    else:
        ctx.note(f"search: dry run, a made-up limit (batch {DRY_LARGEST} fits, {DRY_LARGEST + 1} does not)")
    lo, hi, per_sample = 1, None, one[2]
    while hi is None or hi - lo > 1:
        batch = 2 * lo if hi is None else (lo + hi) // 2
        if ctx.left() < 2 * per_sample * batch + 10:
            ctx.note(f"search stopped by the time limit before batch {batch}")
            break
        fits, seconds = record(batch, True, trial(batch, True), search=True)
        per_sample = max(per_sample, (seconds or 0) / batch)
        lo, hi = (batch, hi) if fits else (lo, batch)
    ctx.record(model="sdxl", largest_batch=lo, first_failing_batch=hi, limit_gib=TRAIN_LIMIT / GiB if cuda else None)


def collect_section(ctx):
    base = random_models.base("sdxl", ctx.device, ctx.dtype, tiny=ctx.dry)
    d = families.FAMILIES["sdxl"].train
    plan = trajectories.Collection(trajectories=d["trajectories"], steps=2 if ctx.dry else d["steps"], w_min=d["w_min"],
                                   w_max=d["w_max"], keep_steps=d["keep_steps"], batch=d["collect_batch"],
                                   prompts=prompts.read_prompts(train_agd.ROOT / "prompts" / "agd_prompts.txt"))
    idx = torch.arange(plan.batch)
    w = plan.w_min + (plan.w_max - plan.w_min) * torch.rand(plan.batch)
    g = torch.Generator(ctx.device).manual_seed(0)
    trajectories.collect_shard(base, dataclasses.replace(plan, steps=2), idx, w, g)  # warm-up
    start = time.perf_counter()
    shard, delta = train_memory.peak_allocated(lambda: trajectories.collect_shard(base, plan, idx, w, g), ctx.device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(ctx.device) if ctx.device.type == "cuda" else \
        delta + sum(p.numel() * p.element_size() for m in (base.model, base.prompt_encoder) for p in m.parameters())
    stored = sum(v.numel() * v.element_size() for v in shard.values())
    ctx.record(model="sdxl", px=ctx.px("sdxl"), steps=plan.steps, batch=plan.batch, seconds=seconds,
               trajectories_per_minute=60 * plan.batch / seconds, peak_gib=peak / GiB,
               stored_mb_per_trajectory=stored / plan.batch / 1e6)


# The compiled steps, most telling first: ours (AGD against CFG; DiT's compile is the quickest), then
# diffusers', then the base alone and DiT's larger batches, then CUDA graphs. (model, impl, batch,
# variants, mode); each variant is compiled by its first call, then timed, then recorded.
COMPILE_ORDER = [
    ("dit", "ours", 1, ("agd", "cfg", "base"), "compile"), ("sdxl", "ours", 1, ("agd", "cfg"), "compile"),
    ("sd21", "ours", 1, ("agd", "cfg"), "compile"),
    *[(m, "diffusers", 1, ("agd", "cfg"), "compile") for m in ("dit", "sdxl", "sd21")],
    *[(m, impl, 1, ("base",), "compile") for m in ("sdxl", "sd21") for impl in ("ours", "diffusers")],
    ("dit", "diffusers", 1, ("base",), "compile"),
    *[("dit", "ours", B, ("agd", "cfg"), "compile") for B in (8, 32)],
    *[(m, "ours", 1, ("agd", "cfg"), "cudagraphs") for m in ("dit", "sdxl")],
]
# the dry run: the tiny DiT alone (a UNet's trace takes half a minute of a CPU; tests/test_fast.py traces them)
DRY_COMPILE_ORDER = [("dit", "ours", 1, ("agd", "cfg"), "compile"), ("dit", "diffusers", 1, ("agd",), "compile"),
                     ("dit", "ours", 1, ("agd",), "cudagraphs")]
FIRST_COMPILE = {"sdxl": 90, "sd21": 60, "dit": 40}  # seconds a first compile is guessed to take on an H100


def compile_section(ctx):
    """Compiled rows are timed one variant after the other (a dedicated GPU), not in turns: each compiles first."""
    from torch._dynamo.utils import counters

    torch._dynamo.config.automatic_dynamic_shapes = False  # a static graph per batch, as sample.py compiles it
    for limit in ("recompile_limit", "cache_size_limit"):  # graphs: base, student, per batch and mode, per model
        if hasattr(torch._dynamo.config, limit):  # (the name since torch 2.6, and before)
            setattr(torch._dynamo.config, limit, 64)
            break
    backend = "aot_eager" if ctx.dry else "inductor"
    ready, compiled, took = {}, {}, {}  # models built; (model, impl) -> its mode; model -> last compile seconds
    for name, impl, B, variants, mode in DRY_COMPILE_ORDER if ctx.dry else COMPILE_ORDER:
        if mode == "cudagraphs" and ctx.device.type != "cuda":
            ctx.note(fast.compile_options(ctx.device, cuda_graphs=True)[1])
            continue
        if name not in ready:
            base = random_models.base(name, ctx.device, ctx.dtype, tiny=ctx.dry, text=False)
            student = student_of(base)
            ready[name] = base, student, twin_of(ctx, base, student)
        base, student, twin = ready[name]
        if impl == "diffusers" and twin is None:
            continue
        module, net, s = (base.model, base.model, student) if impl == "ours" else twin
        x, t, cond, null = random_models.inputs(base, B)
        for k, f in step_calls(net, s, x, t, cond, null, variants).items():
            guess = took.get(name, 5 if ctx.dry else FIRST_COMPILE[name])
            if ctx.left() < guess:
                ctx.note(f"{name} {impl} {mode} batch {B} {k}: skipped, {ctx.left():.0f} s left, a compile takes "
                         f"about {guess:.0f} s")
                continue
            if compiled.get((name, impl)) != mode:
                if impl == "ours":
                    fast.speed_up(module, compile=True, cuda_graphs=mode == "cudagraphs", backend=backend)
                else:
                    module.compile(backend=backend, **({"mode": "reduce-overhead"} if mode == "cudagraphs" else {}))
                compiled[name, impl] = mode
            breaks = sum(counters["graph_break"].values())
            ctx.sync()
            start = time.perf_counter()
            with torch.no_grad():
                f()  # compiles
            ctx.sync()
            took[name] = time.perf_counter() - start
            (ms, best), = time_calls(ctx, {k: f}, *runs(ctx, 10)).values()
            ctx.record(model=name, px=ctx.px(name), batch=B, impl=impl, mode=mode, layout="contiguous", variant=k,
                       ms=ms, best_ms=best, compile_seconds=took[name],
                       graph_breaks=sum(counters["graph_break"].values()) - breaks)


SECTIONS = {  # name -> (function, seconds on an H100)
    "env": (env_section, 20),
    "step_sdxl": (lambda ctx: step_section(ctx, "sdxl", [1]), 50),
    "step_sd21": (lambda ctx: step_section(ctx, "sd21", [1]), 35),
    "step_dit": (lambda ctx: step_section(ctx, "dit", [1, 8, 32]), 45),
    "image_sdxl": (image_section, 45),
    "train_memory_sdxl": (train_memory_section, 105),
    "collect_sdxl": (collect_section, 55),
    "compile": (compile_section, TOTAL),  # what is left
}


# -----------------------------------------------------------------------------
# running the sections, each in a forked child process


def child(name, dry, deadline, part):
    """One section: its rows go to `part` as they come; an exception is recorded there, not raised."""
    os.setpgrp()  # a group of its own: a timeout ends it with whatever it started (compile workers)
    device = torch.device("cpu" if dry else "cuda")
    ctx = Context(device, torch.float32 if dry else torch.bfloat16, dry, deadline, part)  # CPUs are slow at bf16
    try:
        SECTIONS[name][0](ctx)
        ctx.save(status="ok")
    except Exception as e:  # noqa: BLE001: every failure is a result to record
        traceback.print_exc()
        ctx.save(status="failed", error=f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}")


def run_section(name, dry, limit, folder, method="fork"):
    """The section's result: status, seconds, rows and notes, whatever became of its process.

    Forked, the child inherits the imports; "spawn" starts afresh (the fallback, should CUDA refuse a fork).
    """
    part = folder / f".{name}.part.json"
    part.unlink(missing_ok=True)
    start = time.monotonic()
    process = multiprocessing.get_context(method).Process(target=child, args=(name, dry, start + limit, part))
    process.start()
    process.join(limit + 5)  # 5 s of grace: a section checks its deadline between measurements
    status = None
    if process.is_alive():
        os.killpg(process.pid, signal.SIGKILL)
        process.join()
        status = f"timed out after {limit:.0f} s"
    result = json.loads(part.read_text()) if part.is_file() else {"rows": [], "notes": []}
    part.unlink(missing_ok=True)
    if status is None and "status" not in result:
        status = f"crashed (exit code {process.exitcode})"
    return {"status": status or result.pop("status"), "seconds": time.monotonic() - start, "limit": limit, **result}


def preload():
    """Import diffusers here, if it is installed, so that every forked section inherits it (seconds each)."""
    try:
        import diffusers  # noqa: F401
        from diffusers import DiTTransformer2DModel, UNet2DConditionModel  # noqa: F401
    except ImportError:
        pass


def main(args):
    start = time.monotonic()
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    # Nothing in this process may start CUDA, or forked children could not: torch.cuda.is_available(),
    # which imports may call, then asks NVML instead of initializing the driver.
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    preload()
    method = "fork"
    results = {"command": "python bench/gpu.py " + " ".join(sys.argv[1:]), "date": time.strftime("%Y-%m-%d %H:%M"),
               "dry_run": args.dry_run, "total_limit": args.total, "sections": {}}
    file = folder / "gpu-dry-run.json" if args.dry_run else None
    for name in args.sections:
        left = args.total - (time.monotonic() - start) - 5
        limit = min(SECTIONS[name][1] if not args.dry_run else 120, left)
        if limit < 5:
            results["sections"][name] = {"status": "skipped: the run's time is spent", "rows": [], "notes": []}
            continue
        print(f"== {name} (limit {limit:.0f} s)", flush=True)
        result = results["sections"][name] = run_section(name, args.dry_run, limit, folder, method)
        if name == "env" and result["status"] != "ok" and not args.dry_run:
            print(f"== env failed in a forked process ({result.get('error')}); sections start afresh instead")
            method = "spawn"
            result = results["sections"][name] = run_section(name, args.dry_run, limit, folder, method)
        print(f"== {name}: {result['status']} in {result['seconds']:.1f} s "
              f"(run so far {time.monotonic() - start:.0f} s of {args.total})", flush=True)
        if file is None and name == "env" and result["rows"]:
            file = folder / f"gpu-{slug(result['rows'][0].get('name', 'unknown'))}.json"
        file = file or folder / "gpu-unknown.json"
        results["seconds"] = time.monotonic() - start
        file.write_text(json.dumps(results, indent=1) + "\n")
    print("\n" + tables(results))
    print(f"-> {file} ({results['seconds']:.0f} s)")


def slug(name):
    return "".join(c if c.isalnum() else "-" for c in name).strip("-")


# -----------------------------------------------------------------------------
# tables for BENCHMARKS.md


def tables(results):
    """The results as markdown tables."""
    rows = lambda name: results["sections"].get(name, {}).get("rows", [])  # noqa: E731
    out = [f"`{results['command']}` ({results['date']})", "", "| section | status | seconds | limit |",
           "| --- | --- | --- | --- |"]
    env = (rows("env") or [{}])[0]
    for name, s in results["sections"].items():
        out.append(f"| {name} | {s['status']} | {s.get('seconds', 0):.0f} | {s.get('limit', 0):.0f} |")
    out += ["", f"Device: {env.get('name')}, torch {env.get('torch')}, CUDA {env.get('cuda')}, "
                f"diffusers {env.get('diffusers')}, {env.get('dtype')}.", ""]
    size = "tiny (dry run)" if results["dry_run"] else "1024 px"
    steps = [r for name in results["sections"] for r in rows(name) if "variant" in r]
    groups = {}
    for r in steps:
        groups.setdefault((r["model"], r["batch"], r["mode"], r["layout"], r["impl"]), {})[r["variant"]] = r
    out += ["ms per denoiser step (medians): CFG is one call at batch 2B; AGD the student at B.", "",
            "| model | px | batch | mode | layout | impl | base | CFG | AGD | AGD / CFG | adapters' cost | "
            "CFG ours / diffusers | first call s (AGD, CFG) |", "| --- " * 13 + "|"]
    for (model, B, mode, layout, impl), v in groups.items():
        ms = {k: v[k]["ms"] for k in v}
        theirs = groups.get((model, B, mode, layout, "diffusers"), {}).get("cfg")
        cells = [f"{ms[k]:.1f}" if k in ms else "" for k in ("base", "cfg", "agd")]
        ratio = f"{ms['agd'] / ms['cfg']:.3f}" if {"agd", "cfg"} <= ms.keys() else ""
        cost = f"{100 * (ms['agd'] / ms['base'] - 1):+.1f} %" if {"agd", "base"} <= ms.keys() else ""
        versus = f"{ms['cfg'] / theirs['ms']:.3f}" if impl == "ours" and theirs and "cfg" in ms else ""
        first = ", ".join(f"{v[k]['compile_seconds']:.0f}" for k in ("agd", "cfg") if "compile_seconds" in v.get(k, {}))
        px = next(iter(v.values()))["px"]
        out.append(f"| {model} | {px} | {B} | {mode} | {layout} | {impl} | {' | '.join(cells)} | {ratio} | {cost} | "
                   f"{versus} | {first} |")
    image = {}
    for r in rows("image_sdxl"):  # the mean of a method's runs
        m = image.setdefault(r["method"], {**r, "runs": []})
        m["runs"].append(r["seconds"])
        m["seconds"] = statistics.mean(m["runs"])
    if image:
        out += ["", f"Seconds per SDXL {size} image (prompt encoding, sampling, decoding):", "",
                "| method | steps | s / image | of which decoding | / CFG |", "| --- | --- | --- | --- | --- |"]
        for m, r in image.items():
            rel = f"{r['seconds'] / image['cfg']['seconds']:.3f}" if "cfg" in image else ""
            out.append(f"| {m.upper()} | {r['steps']} | {r['seconds']:.2f} | {r['decode_seconds']:.2f} | {rel} |")
    memory = rows("train_memory_sdxl")
    if memory:
        out += ["", f"Peak memory of train_agd.train, SDXL {size} (base in {env.get('dtype')}, fp32 adapters, Adam):", "",
                "| batch | gradient checkpointing | peak allocated GiB | peak reserved GiB | s / step | "
                "under the limit |",
                "| --- | --- | --- | --- | --- | --- |"]
        fmt = lambda v, f: "out of memory" if v is None else format(v, f)  # noqa: E731
        for r in memory:
            if "largest_batch" in r:
                limit = "the dry run's made-up limit" if r["limit_gib"] is None else f"{r['limit_gib']:.0f} GiB"
                out.append(f"\nLargest batch under {limit}: {r['largest_batch']} (first failing: "
                           f"{r['first_failing_batch']}).")
            else:
                fits = {True: "yes", False: "no", None: ""}[r["fits_limit"]]
                out.append(f"| {r['batch']} | {'on' if r['checkpointing'] else 'off'} | {fmt(r['peak_gib'], '.2f')} | "
                           f"{'' if r['reserved_gib'] is None else format(r['reserved_gib'], '.2f')} | "
                           f"{fmt(r['seconds_per_step'], '.2f')} | {fits} |")
    for r in rows("collect_sdxl"):
        out += ["", "Collection (Algorithm 1) at SDXL's defaults:", "",
                "| steps | trajectories at once | s per batch | trajectories / minute | peak GiB | "
                "MB stored per trajectory |",
                "| --- | --- | --- | --- | --- | --- |",
                f"| {r['steps']} | {r['batch']} | {r['seconds']:.1f} | {r['trajectories_per_minute']:.1f} | "
                f"{r['peak_gib']:.2f} | {r['stored_mb_per_trajectory']:.2f} |"]
    notes = [f"- {name}: {n}" for name, s in results["sections"].items() for n in s.get("notes", [])]
    notes += [f"- {name}: {s['error']}" for name, s in results["sections"].items() if s.get("error")]
    return "\n".join(out + ([""] + notes if notes else []))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny configs on the CPU: checks every section runs")
    parser.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
    parser.add_argument("--total", type=float, default=TOTAL, help="seconds for the whole run")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"), help="folder of the JSON")
    args = parser.parse_args()
    if args.dry_run:
        args.total = max(args.total, 600)  # a loaded CPU's seconds are not a GPU's
    if "env" not in args.sections:
        args.sections.insert(0, "env")  # the device names the file
    main(args)
