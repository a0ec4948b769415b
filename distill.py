"""Step distillation of the adapters: progressive distillation (Salimans & Ho 2022), base still frozen.

AGD halves the cost of a step; this halves the number of steps, round by round. Meng et al. 2023
distill guidance and then steps the same way but train the whole model; here only the adapters
train, so that they still switch off to give back the base and still load onto its fine-tunes:

    python train_agd.py --distill-steps 6                       # AGD, then 24 -> 12 -> 6 steps
    python train_agd.py --adapters agd.safetensors --distill-steps 6 --out DIR    # given adapters

The sampler is deterministic DDIM (Song et al. 2021, eta = 0) on the base's own schedule and
parameterization (`scheduler`), at "trailing" spacing: its S-step timesteps are every other one of
its 2S-step timesteps (diffusers' "leading" ones do not nest: 1000 // 24 = 41 but 1000 // 12 = 83),
so that one step of a student spans exactly two of its teacher's, and every run starts at
t = T - 1, where x_T is pure noise (leading's 6 steps start at t = 830; Lin et al. 2023, Table 2).

Round r, from 2S to S steps:
- the teacher is the base with round r - 1's adapters (round 0: the AGD adapters), the student a
  copy of them that it trains: two Students on one base, each acting only in its own scope;
- data: trajectories of the teacher along its own 2S-step sampler, from noise, at w ~ U[w_min,
  w_max] and every class / prompt in turn (`teacher_shard`). Its states at even steps are where the
  student starts and its state two steps on is where the student must land. Progressive
  distillation noises dataset images to the round's timesteps; AGD uses no dataset, and the
  teacher's own run sits exactly at those timesteps, gives a start and a target for every student
  step at two teacher passes a pair and no student pass, and needs nothing stored. AGD's recorded
  trajectories are of another sampler (DiT: stochastic DDPM) at other timesteps;
- training: the student's one step regresses onto the teacher's two (`one_step_target`), Adam with
  warm-up and cosine decay, checkpointed atomically; a step's batch depends only on (seed, round,
  step), so a killed round resumes to the same adapters;
- the round's adapters are saved with their step count ("steps") and sampler in the metadata, and
  `sample.py --adapters FILE` samples with them (`read_steps`).

Letters in shape comments: N rows (student steps x trajectories), B batch, C channels, H W size.
"""

import math
from contextlib import nullcontext
from dataclasses import dataclass, replace

import numpy as np
import torch
from tqdm import tqdm

import adapters
import checkpoint
import families
import guidance
import hub
import prompts
import runs
import train_agd
import trajectories

SAMPLER = "ddim-trailing"  # the metadata's name of the distilled sampler

# train_agd.py's defaults per model family: training steps and peak learning rate of each round, the
# teacher trajectories per shard, shards held, steps between new shards. tiny: measured (README);
# the others are not measured yet (no GPU was lent to this work): a round at AGD's learning rate.
DEFAULTS = {
    "tiny": dict(train_steps=800, lr=5e-3, shard_size=50, buffer_shards=4, refresh_every=25),
    "dit": dict(train_steps=4000, lr=1e-4, shard_size=32, buffer_shards=4, refresh_every=50),
    "sd21": dict(train_steps=2000, lr=1e-4, shard_size=16, buffer_shards=4, refresh_every=50),
    "sdxl": dict(train_steps=2000, lr=1e-4, shard_size=16, buffer_shards=4, refresh_every=50),
}

# -----------------------------------------------------------------------------
# the sampler


def scheduler(base):
    """A base's distilled sampler: deterministic DDIM at trailing spacing, with its own schedule and
    prediction (DiT: families.dit_scheduler(weights, "ddim"); SD: its repo's config as a DDIMScheduler).

    x_0 is not clipped. Unclipped, a step is linear in the model's output, so that the target of
    `one_step_target` lands exactly; and clipping x_0 while keeping the unclipped epsilon, as diffusers'
    DDIM does where a config asks (the tiny teacher's, for its DDPM sampler), compounds over the steps:
    the tiny teacher's CFG samples at w = 3 in 24 steps have digit FID 393 clipped, 62 unclipped.
    """
    if base.family.conditioning == "class":
        ddim = families.dit_scheduler(base.weights, "ddim")
    else:
        config = guidance.read_scheduler_config(base.weights)
        ddim = guidance.scheduler_from_config({**config, "_class_name": "DDIMScheduler"})
    return replace(ddim, timestep_spacing="trailing", options={**ddim.options, "eta": 0.0, "clip_sample": None})


def round_steps(start, steps):
    """The step counts of the rounds that halve `start` down to `steps`: (24, 6) -> [12, 6]."""
    rounds, n = [], start
    while n > steps:
        if n % 2:
            raise ValueError(f"{start} steps do not halve to {steps}: start at {steps} x a power of 2")
        n //= 2
        rounds.append(n)
    if n != steps:
        raise ValueError(f"{start} steps do not halve to {steps}")
    return rounds


def start_steps(steps, default):
    """Where halving to `steps` starts: the most sampler steps, `steps` x a power of 2, up to `default`."""
    n = steps
    while 2 * n <= default:
        n *= 2
    return n


def read_steps(path):
    """The step count that a distilled adapters file (or hub id) was trained for, or None (AGD's adapters)."""
    meta = checkpoint.read_metadata(hub.resolve_adapters(path))
    return int(meta["steps"]) if meta.get("sampler") == SAMPLER else None


# -----------------------------------------------------------------------------
# the regression target


def one_step_target(x, x_target, now, nxt, prediction_type):
    """The output whose DDIM step from x at `now` = (alpha, sigma) lands on x_target at `nxt`.

    A deterministic DDIM step goes to alpha' x_0 + sigma' eps with eps = (x - alpha x_0) / sigma: it
    is linear in the predicted x_0, and the x_0 that lands on x_target is Salimans & Ho's (2022,
    Algorithm 2) x~ = (x_target - (sigma' / sigma) x) / (alpha' - (sigma' / sigma) alpha). The model
    predicts x_0 only through its own output, so the target is that output: v = (alpha x - x~) / sigma,
    or eps = (x - alpha x~) / sigma. (The distilled sampler does not clip x_0: see `scheduler`.)
    """
    (alpha, sigma), (alpha_next, sigma_next) = now, nxt
    x0 = (x_target - (sigma_next / sigma) * x) / (alpha_next - (sigma_next / sigma) * alpha)
    if prediction_type == "v_prediction":
        return (alpha * x - x0) / sigma
    if prediction_type == "epsilon":
        return (x - alpha * x0) / sigma
    raise ValueError(f"step distillation of a {prediction_type!r} model is not implemented (epsilon or v)")


def loss_weight(now, prediction_type):
    """The weight that makes the output's squared error Salimans & Ho's x-space loss, max(SNR, 1) |x~ - x_0|^2.

    An output error d moves x_0 by sigma d (v) or by sigma / alpha d (epsilon). So for v the weight is
    max(alpha^2, sigma^2), between 1/2 and 1: about v's own MSE. For epsilon it is max(1, sigma^2 / alpha^2):
    the noisiest steps weigh up to 1 / alpha^2, as they must, since an epsilon model's x_0 there is
    (x - sigma eps) / alpha and its error is amplified by sigma / alpha (Salimans & Ho's reason to
    distill into x or v; a frozen base keeps its own parameterization, and the weight keeps the loss on x_0).
    """
    alpha, sigma = now
    scale = sigma if prediction_type == "v_prediction" else sigma / alpha  # |d x_0 / d output|
    return max(alpha**2 / sigma**2, 1.0) * scale**2


# -----------------------------------------------------------------------------
# the data: the teacher's own trajectories


@dataclass
class Distillation:
    """The rounds: from `start` steps halving down to `steps`; what each trains on and how."""
    steps: int  # the last round's student steps
    start: int  # the first teacher's steps: steps x a power of 2
    train_steps: int  # per round
    batch_size: int  # global: split across torchrun's ranks
    lr: float
    w_min: float = 1.0
    w_max: float = 6.0
    shard_size: int = 50  # teacher trajectories per shard
    batch: int = None  # trajectories sampled at once (None: a shard)
    buffer_shards: int = 4  # shards held at once
    refresh_every: int = 50  # a new shard every N training steps
    save_every: int = 200
    seed: int = 0
    prompts: list = None  # prompt families: trajectory i asks for prompt i mod len(prompts)


def seed_of(*numbers):
    """One generator seed from several numbers: (seed, round, shard) or (seed, round, rank, step)."""
    return int(np.random.SeedSequence(list(numbers)).generate_state(1)[0])


@torch.no_grad()
def teacher_shard(base, sched, teacher, hp, grid, round, k):
    """Shard k of a round: `hp.shard_size` trajectories of the teacher along `grid` (its own 2S steps)
    from noise, as rows; a function of (seed, round, k) only. Trajectory i asks for class (prompt) i mod their number.

    A row is a student step: the teacher's state x at an even step i (at grid[i]), the output that
    takes it by one step to the teacher's state at step i + 2, that output's loss weight, w, and
    the trajectory whose condition it asks for ("traj", "cond.*": as trajectories.py stores them).
    """
    device, dtype = next(base.model.parameters()).device, next(base.model.parameters()).dtype
    g = torch.Generator(device=device).manual_seed(seed_of(hp.seed, round, k))
    n = hp.shard_size
    idx = torch.arange(k * n, (k + 1) * n)
    w = hp.w_min + (hp.w_max - hp.w_min) * torch.rand(n, generator=g, device=device)
    cond = trajectories.conditions(base, hp, idx)
    states = []  # per batch, the teacher's state before each step and after the last: (b, C, H, W) x (2S + 1)
    for i in torch.arange(n).split(hp.batch or n):
        c = {key: v[i.to(v.device)] for key, v in cond.items()}
        x = torch.randn((len(i), *base.shape), generator=g, device=device)  # x_T
        run = []
        final = guidance.sample(lambda x, t: teacher(x.to(dtype), t, w=w[i.to(device)], **c).float(), x, sched,
                                grid, callback=lambda step: run.append(step["x"]))
        states.append(run + [final])
    states = [torch.cat(s) for s in zip(*states)]  # (n, C, H, W) x (2S + 1)
    ptype, rows = sched.options["prediction_type"], []
    for i in range(0, len(grid), 2):
        now = sched.schedule(grid[i].item())
        nxt = sched.schedule(grid[i + 2].item()) if i + 2 < len(grid) else sched.final
        rows.append((states[i], one_step_target(states[i], states[i + 2], now, nxt, ptype), loss_weight(now, ptype)))
    S = len(rows)
    shard = {
        "x": torch.cat([r[0] for r in rows]).cpu(),  # (N, C, H, W), N = S * n
        "t": grid[::2].repeat_interleave(n),  # (N,)
        "target": torch.cat([r[1] for r in rows]).cpu(),  # (N, C, H, W) in the model's output space
        "weight": torch.tensor([r[2] for r in rows], dtype=torch.float32).repeat_interleave(n),  # (N,)
        "w": w.cpu().repeat(S),  # (N,)
        "traj": torch.arange(n).repeat(S),  # (N,) row -> its trajectory in this shard
    }
    for k, v in cond.items():  # once per trajectory
        shard[f"cond.{k}"] = v.cpu()
    return shard


class TeacherBuffer:
    """A round's data: the shards of teacher trajectories held at once, a new one every `refresh_every` steps.

    Shard k of round r depends only on (seed, round, k) (rank q of W makes shard k * W + q), so a
    resumed round rebuilds exactly the buffer it had.
    """

    def __init__(self, make, shards, refresh_every, rank=0, world=1):
        self.make, self.n, self.refresh_every, self.rank, self.world = make, shards, refresh_every, rank, world
        self.shards, self.data = {}, None

    def __call__(self, step):
        newest = step // self.refresh_every
        wanted = range(max(0, newest - self.n + 1), newest + 1)
        if set(self.shards) != set(wanted):
            self.shards = {k: self.shards.get(k) or self.make(k * self.world + self.rank) for k in wanted}
            self.data = trajectories.concat_shards([self.shards[k] for k in wanted])
        return self.data


# -----------------------------------------------------------------------------
# a round


def batch_rows(n_rows, batch, seed, round, rank, step):
    """The rows of one rank's batch at one step of a round: a function of (seed, round, rank, step) only."""
    g = torch.Generator().manual_seed(seed_of(seed, round, rank, step))
    return torch.randint(0, n_rows, (batch,), generator=g)


def save_state(file, student, opt, sched, steps, step, losses, scaler=None):
    """Everything to resume a round exactly, written atomically (checkpoint.atomic_write)."""
    with checkpoint.atomic_write(file) as f:
        torch.save({"adapters": student.adapter_state_dict(), "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(), "steps": steps, "step": step, "losses": losses,
                    "scaler": scaler.state_dict() if scaler is not None else {}}, f)


def train_round(base, sched, teacher, student, hp, round, out, resume=False, rank=0, world=1, signals=None):
    """Round `round`: train `student` so that its one DDIM step does what `teacher`'s two do; returns the losses.

    As train_agd.train: a non-finite loss or gradient stops the round (runs.Diverged) before it touches
    the checkpoint, and a SIGINT / SIGTERM caught by `signals` ends the step, checkpoints and raises
    runs.Interrupted (fp16's skipped steps are left to the loss scaler).
    """
    steps = round_steps(hp.start, hp.steps)[round]
    grid = sched.timesteps(2 * steps)
    assert torch.equal(grid[::2], sched.timesteps(steps)), "the trailing spacing nests"
    source = TeacherBuffer(lambda k: teacher_shard(base, sched, teacher, hp, grid, round, k),
                           hp.buffer_shards, hp.refresh_every, rank, world)
    model = base.model
    params = list(student.adapters.parameters())
    opt = torch.optim.Adam(params, lr=hp.lr)  # a fresh optimizer each round (Salimans & Ho 2022, Algorithm 2)
    lr = torch.optim.lr_scheduler.LambdaLR(opt, train_agd.lr_lambda(hp.train_steps))
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    state_file, step, losses = out / "distill_state.pt", 0, []
    if resume and state_file.is_file():
        state = train_agd.load_state(state_file)
        if state["steps"] == steps:  # this round's, not an earlier one's
            student.load_adapter_state_dict(state["adapters"], source=str(state_file))
            opt.load_state_dict(state["optimizer"])
            lr.load_state_dict(state["scheduler"])
            if state.get("scaler"):
                scaler.load_state_dict(state["scaler"])
            step, losses = state["step"], state["losses"]
            if rank == 0:
                print(f"resumed the {steps}-step round from {state_file} at step {step}")
    C = base.shape[0]  # the channels DDIM steps with (a learned variance past them is ignored)
    per_rank = hp.batch_size // world
    saved = step  # the step of the checkpoint on disk (0: none)
    bar = tqdm(range(step, hp.train_steps), desc=f"distill {2 * steps} -> {steps} steps", initial=step,
               total=hp.train_steps, disable=rank != 0)
    for step in bar:
        batch = source(step)
        i = batch_rows(len(batch["x"]), per_rank, hp.seed, round, rank, step)
        x, t, w = batch["x"][i].to(device, dtype), batch["t"][i].to(device), batch["w"][i].to(device)
        target, weight = batch["target"][i].to(device), batch["weight"][i].to(device)
        cond = trajectories.batch_condition(batch, i, device, dtype)
        with student.condition(w=w, t=t, **cond):  # the student's scope: the teacher's adapters stay off
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                pred = model(x, t, **cond)
            loss = (weight * (pred[:, :C].float() - target).pow(2).flatten(1).mean(1)).mean()
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
        train_agd.average_gradients(params, world)
        if not scaler.is_enabled() and (what := train_agd.non_finite(loss, params, world)):
            raise runs.Diverged(train_agd.diverged(step, what, hp.lr, state_file, saved, fp16=False))
        scaler.step(opt)
        scaler.update()
        lr.step()
        losses.append(loss.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.5f}", lr=f"{lr.get_last_lr()[0]:.1e}")
        stop = signals.requested(world, device) if signals is not None else 0
        if ((step + 1) % hp.save_every == 0 or stop) and step + 1 < hp.train_steps:
            if rank == 0:
                save_state(state_file, student, opt, lr, steps, step + 1, losses, scaler)
            saved = step + 1
        if stop and step + 1 < hp.train_steps:
            raise runs.Interrupted(stop, f"stopped after step {step + 1} of {hp.train_steps} of the {steps}-step "
                                         f"round; its state is saved in {state_file}")
    train_agd.check_in_sync(params, world)
    if rank == 0:
        save_state(state_file, student, opt, lr, steps, hp.train_steps, losses, scaler)
    return losses


@torch.no_grad()
def reproduced(base, sched, teacher, student, hp, round):
    """How much of what its one step must change the student learned, on teacher trajectories it never saw.

    The student starts as the teacher, whose one step from x gives output o_0; the target o* is
    what lands where the teacher's two steps land. The least-squares coefficient of the student's
    change o - o_0 on the needed change o* - o_0 (1: all of it), and the weighted residual
    |o - o*|^2 / |o_0 - o*|^2 left (0: none), at each of the S steps.
    """
    steps = round_steps(hp.start, hp.steps)[round]
    grid = sched.timesteps(2 * steps)
    rows = teacher_shard(base, sched, teacher, hp, grid, round, 10**6)  # a shard never trained on
    device, dtype = next(base.model.parameters()).device, next(base.model.parameters()).dtype
    C, sums = base.shape[0], []
    for i in torch.arange(len(rows["x"])).split(hp.batch_size):
        x, t, w = rows["x"][i].to(device, dtype), rows["t"][i].to(device), rows["w"][i].to(device)
        cond = trajectories.batch_condition(rows, i, device, dtype)
        o0 = teacher(x, t, w=w, **cond)[:, :C].float().cpu()  # the student's one step before the round
        o = student(x, t, w=w, **cond)[:, :C].float().cpu()
        target = rows["target"][i]
        need, got, left = (target - o0).flatten(1), (o - o0).flatten(1), (o - target).flatten(1)
        sums.append(torch.stack([(got * need).sum(1), need.pow(2).sum(1), left.pow(2).sum(1)], 1))  # (B, 3)
    sums = torch.cat(sums)  # (N, 3): per row <got, need>, |need|^2, |left|^2

    def fit(s):
        return {"coefficient": (s[:, 0].sum() / s[:, 1].sum()).item(),
                "residual": (s[:, 2].sum() / s[:, 1].sum()).item()}

    per_step = [{"t": t, **fit(sums[rows["t"] == t])} for t in grid[::2].tolist()]
    small = rows["w"] < 2  # where the student falls furthest short (BENCHMARKS.md, "Step distillation")
    return {"steps": steps, **fit(rows["weight"][:, None] * sums), "per_step": per_step,
            "w_below_2": fit(sums[small]), "w_from_2": fit(sums[~small])}


# -----------------------------------------------------------------------------
# the rounds


def round_file(out, steps):
    return out / f"adapters_{steps}steps.safetensors"


def distill(base, source, hp, out, resume=False, rank=0, world=1, signals=None):
    """Progressive distillation of the adapters in file `source` from hp.start steps down to hp.steps.

    Returns (the last round's student, the rounds' files, each round's diagnosis: `reproduced`).
    With `resume`, a round whose file exists is taken as done, and a killed round continues.
    """
    out.mkdir(parents=True, exist_ok=True)
    sched = scheduler(base)
    teacher = adapters.load(base.model, source).requires_grad_(False)
    student = adapters.load(base.model, source)  # the copy that the first round trains
    files, diagnosis = [], []
    for r, steps in enumerate(round_steps(hp.start, hp.steps)):
        file = round_file(out, steps)
        if resume and file.is_file():
            student.load_adapter_state_dict(checkpoint.read_tensors(file), source=str(file))
        else:
            with signals.deferred() if signals is not None else nullcontext():  # a signal ends the step
                losses = train_round(base, sched, teacher, student, hp, r, out, resume, rank, world, signals)
            if rank == 0:
                student.save(file, base=base.weights, steps=steps, sampler=SAMPLER, teacher=source if r == 0 else
                             round_file(out, 2 * steps).name, train_steps=hp.train_steps, loss=np.mean(losses[-50:]))
        if rank == 0:
            diagnosis.append(reproduced(base, sched, teacher, student, hp, r))
            d = diagnosis[-1]
            print(f"{2 * steps} -> {steps} steps: the student reproduces {d['coefficient']:.2f} of the change its "
                  f"one step needs (w < 2: {d['w_below_2']['coefficient']:.2f}, w >= 2: "
                  f"{d['w_from_2']['coefficient']:.2f}; residual {d['residual']:.2f}) -> {file}")
        teacher.load_adapter_state_dict(student.adapter_state_dict())  # the next round's teacher
        files.append(file)
    teacher.detach()  # the base is left with the student alone
    return student, files, diagnosis


# -----------------------------------------------------------------------------
# train_agd.py's step distillation options


def add_arguments(parser):
    """train_agd.py's argument group for step distillation."""
    g = parser.add_argument_group("step distillation (distill.py)")
    g.add_argument("--distill-steps", type=int, help="after training, halve the adapters' DDIM steps round by "
                   "round down to N (progressive distillation): <out>/adapters_<S>steps.safetensors for each round")
    g.add_argument("--adapters", help="an adapters file to distill instead of training AGD adapters first")
    g.add_argument("--distill-from", type=int, help="the first teacher's steps, N x a power of 2 (default: the most "
                   "up to the model's DDIM default, tiny 24 for N = 6; a distilled --adapters file: its steps)")
    g.add_argument("--distill-train-steps", type=int, help="training steps per round")
    g.add_argument("--distill-lr", type=float, help="peak learning rate of each round")


def check_arguments(p, args, family):
    """The step distillation flags: their defaults (DEFAULTS) and what they must agree on."""
    if args.distill_steps is None:
        if args.adapters is not None:
            p.error("--adapters names adapters to distill: give --distill-steps too")
        return
    if args.push_to_hub:
        p.error("--push-to-hub: the model card describes AGD's adapters, not distilled ones; upload without "
                "--distill-steps, or the round's file by hand")
    if args.model not in DEFAULTS:  # SD3's flow matching: DDIM's VP schedule is not its sampler
        p.error(f"--distill-steps is for {', '.join(DEFAULTS)} (DDIM on their VP schedule), not {args.model}")
    for k, v in DEFAULTS[args.model].items():
        if getattr(args, f"distill_{k}", None) is None:
            setattr(args, f"distill_{k}", v)
    try:
        given = read_steps(args.adapters) if args.adapters else None  # a distilled file goes on from its steps
    except (checkpoint.CheckpointError, FileNotFoundError) as e:
        p.error(f"--adapters: {e}")
    ddim = family.sample["steps"]["ddim"] if family.conditioning == "class" else family.sample["steps"]
    args.distill_from = args.distill_from or given or start_steps(args.distill_steps, ddim)
    if given is not None and args.distill_from != given:
        p.error(f"--adapters {args.adapters} were distilled to {given} steps: they halve from there, not from "
                f"{args.distill_from}")
    try:
        round_steps(args.distill_from, args.distill_steps)
    except ValueError as e:
        p.error(f"--distill-from / --distill-steps: {e}")


def plan(args, family):
    """The CLI's step distillation flags as a Distillation."""
    return Distillation(
        steps=args.distill_steps, start=args.distill_from, train_steps=args.distill_train_steps,
        batch_size=args.batch_size, lr=args.distill_lr, w_min=args.w_min, w_max=args.w_max,
        shard_size=args.distill_shard_size, batch=args.collect_batch, buffer_shards=args.distill_buffer_shards,
        refresh_every=args.distill_refresh_every, save_every=args.save_every, seed=args.seed,
        prompts=prompts.read_prompts(args.prompt_file) if family.conditioning == "prompt" else None)


# -----------------------------------------------------------------------------
# the plot of train_agd.py --distill-steps in the tiny world (tiny.evaluate_steps' rows)

PLOT_METHODS = {"cfg": ((40, 90, 200), "CFG, DDIM"), "agd": ((230, 130, 20), "AGD, DDIM"),
                "agd-distilled": ((30, 160, 60), "AGD distilled")}  # colour, legend; the reference is drawn black


def plot_steps(results, file):
    """FID and accuracy against sampler steps (log scale), a panel per w: the rows of evaluate_steps as a PNG.

    CFG at the most steps (the base's own sampler) is the reference: a black point and a dashed line across.
    """
    from PIL import Image, ImageDraw

    W, H, left, top, bottom, gap = 250, 170, 48, 22, 26, 14
    ws = sorted({r["w"] for r in results})
    reference = max(r["steps"] for r in results if r["method"] == "cfg")
    steps = sorted({r["steps"] for r in results})
    lo, hi = math.log2(steps[0]) - 0.3, math.log2(steps[-1]) + 0.3
    legend = 24
    img = Image.new("RGB", (len(ws) * (left + W + gap), legend + 2 * (top + H + bottom)), "white")
    draw = ImageDraw.Draw(img)
    entries = [((0, 0, 0), f"CFG, {reference} steps (reference)")] + list(PLOT_METHODS.values())
    for i, (colour, label) in enumerate(entries):
        x = 10 + i * 190
        draw.line([(x, 12), (x + 20, 12)], fill=colour, width=3)
        draw.text((x + 26, 6), label, fill="black")
    for col, w in enumerate(ws):
        for row, (key, name) in enumerate((("fid", "digit FID"), ("accuracy", "accuracy"))):
            x0, y0 = col * (left + W + gap) + left, legend + row * (top + H + bottom) + top
            rows = [r for r in results if r["w"] == w]
            values = [r[key] for r in rows]
            vmin, vmax = min(values), max(values)
            pad = 0.08 * (vmax - vmin or 1)
            vmin, vmax = vmin - pad, vmax + pad

            def at(s, v):
                return (x0 + (math.log2(s) - lo) / (hi - lo) * W, y0 + H - (v - vmin) / (vmax - vmin) * H)

            draw.rectangle([x0, y0, x0 + W, y0 + H], outline="black")
            draw.text((x0 + 4, y0 - 14), f"{name}, w = {w:g}", fill="black")
            for s in steps:  # x ticks
                x, _ = at(s, vmin)
                draw.line([(x, y0 + H), (x, y0 + H + 4)], fill="black")
                draw.text((x - 6, y0 + H + 6), str(s), fill="black")
            for k in range(5):  # y ticks
                v = vmin + (vmax - vmin) * k / 4
                _, y = at(steps[0], v)
                draw.line([(x0 - 4, y), (x0, y)], fill="black")
                draw.text((x0 - 44, y - 6), f"{v:.3f}" if key == "accuracy" else f"{v:.1f}", fill="black")
            ref = next(r[key] for r in rows if r["method"] == "cfg" and r["steps"] == reference)
            _, y = at(steps[0], ref)
            for x in range(int(x0), int(x0 + W), 8):  # dashed: the reference at every step count
                draw.line([(x, y), (min(x + 4, x0 + W), y)], fill="black")
            draw.ellipse([at(reference, ref)[0] - 3, y - 3, at(reference, ref)[0] + 3, y + 3], fill="black")
            for method, (colour, _) in PLOT_METHODS.items():
                points = sorted((r["steps"], r[key]) for r in rows
                                if r["method"] == method and r["steps"] != reference)
                xy = [at(s, v) for s, v in points]
                if len(xy) > 1:
                    draw.line(xy, fill=colour, width=2)
                for x, y in xy:
                    draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
    img.save(file)
