"""Adapter Guidance Distillation: collect CFG trajectories, train adapters on them, evaluate.

    python train_agd.py                  # the bundled tiny teacher, end to end on a CPU in minutes
    python train_agd.py --model dit      # DiT-XL/2 from the hub (or --weights FOLDER)
    python train_agd.py --model sdxl --prompt-file prompts/agd_prompts.txt   # SD 2.1 / SDXL
    python train_agd.py --model sdxl --online                    # no storage: the teacher runs beside
    torchrun --nproc_per_node 8 train_agd.py --model sdxl        # data-parallel on 8 GPUs

1. Collect (Algorithm 1 of Jensen & Sadat 2025): sample the frozen base model with CFG at random
   scales w ~ U[w_min, w_max], along the sampler used at inference, for every class (DiT, 4 per
   class) or prompt (SD), and record (x_t, t, w) with the CFG output as the target. Only
   --keep-steps steps of each trajectory are stored, in fp16, and the condition (a class, a
   prompt's embeddings) once per trajectory. Shards are written atomically; an interrupted
   collection resumes where it stopped. --online stores nothing: the base with its adapters
   disabled is the teacher, and trajectories are generated while training into a bounded buffer.
2. Train (Algorithm 2): adapters beside the attention blocks learn, by MSE, to give the CFG output
   in one pass. The base is frozen in bf16 (fp16 where bf16 is missing), the adapters' weights stay
   fp32 under autocast; Adam, linear warm-up over 10 % of the steps, then cosine decay. The state is
   checkpointed atomically every --save-every steps; --resume continues from it, exactly: a step's
   batch depends only on (seed, rank, step).
3. Evaluate (tiny world): the teacher without guidance, with CFG and with adapters, from the same
   noise, at several w: digit FID, class accuracy and seconds per image -> metrics.json,
   samples.png and a table.

Under torchrun every rank collects its share of the shards, then trains on its part of each batch;
gradients are averaged across ranks (data parallel) and rank 0 writes the checkpoints.
"""

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import adapters
import checkpoint
import dit
import guidance
import prompts
import unet

ROOT = Path(__file__).resolve().parent
OFFICIAL_STEPS = 1000  # the official code stores every one of the 1,000 steps: input and output, fp16

# -----------------------------------------------------------------------------
# what each model needs: its loader, condition, null condition, sampler and defaults


@dataclass
class Setup:
    """Everything model-specific; the rest of this file only calls these."""
    model: torch.nn.Module
    shape: tuple  # (C, H, W) of the denoiser's input
    out_channels: int  # of its output: C, or 2C with a learned variance (DiT)
    condition: callable  # trajectory indices (N,) -> cond dict of the denoiser
    null: callable  # n -> the null condition dict
    alphas_cumprod: torch.Tensor
    timesteps: torch.Tensor  # the inference sampler's steps, descending
    step: callable  # guidance.ddpm_step, ddim_step or euler_step
    step_kw: dict = field(default_factory=dict)
    adapter_options: dict = field(default_factory=dict)


def class_condition(num_classes, device):
    """Trajectory i asks for class i mod num_classes: every class equally often (DiT: 4 per class)."""
    return lambda idx: {"y": (idx % num_classes).to(device)}


def class_null(null_class, device):
    return lambda n: {"y": torch.full((n,), null_class, dtype=torch.long, device=device)}


def setup_dit(model, args, step_kw):
    cfg = model.config
    return Setup(
        model=model, shape=(cfg.in_channels, cfg.input_size, cfg.input_size), out_channels=cfg.out_channels,
        condition=class_condition(cfg.num_classes, args.device), null=class_null(cfg.num_classes, args.device),
        alphas_cumprod=guidance.linear_schedule(),
        timesteps=guidance.spaced_timesteps(args.steps, spacing="iddpm"),  # DiT's respaced DDPM
        step=guidance.ddpm_step, step_kw=step_kw,
        # the paper's placement: every block's self-attention (Student picks `attn` in a DiT)
        adapter_options=dict(hidden_dim=args.hidden_dim, num_heads=args.num_heads, use_timestep=args.use_timestep,
                             num_classes=cfg.num_classes + 1 if args.use_class else 0, mlp_ratio=args.mlp_ratio,
                             zero_at_w1=args.zero_at_w1, modulation=args.modulation))


def setup_sd(weights, args):
    """SD 2.1 / SDXL: the UNet, its prompt encoder and the repo's own scheduler (the inference sampler).

    Trajectory i asks for prompt i mod P of --prompt-file; the null condition is the pipeline's
    (the empty prompt for SD 2.1, zeros for SDXL).
    """
    model = unet.from_pretrained(weights, dtype=args.dtype, device=args.device)
    model.gradient_checkpointing = bool(args.gradient_checkpointing)
    encoder = prompts.PromptEncoder.from_pretrained(weights, dtype=args.dtype, device=args.device)
    scheduler = guidance.scheduler_from_config(weights)
    prompt_list = prompts.read_prompts(args.prompt_file)
    cfg = model.config
    size = args.resolution or 8 * (cfg.sample_size or 64)  # pixels; latents are 8x smaller (the VAE's factor)

    def condition(idx):
        return encoder([prompt_list[i % len(prompt_list)] for i in idx.tolist()], height=size, width=size)

    return Setup(
        model=model, shape=(cfg.in_channels, size // 8, size // 8), out_channels=cfg.out_channels,
        condition=condition, null=lambda n: encoder.null(n, height=size, width=size),
        alphas_cumprod=scheduler.alphas_cumprod, timesteps=scheduler.timesteps(args.steps),
        step=scheduler.step, step_kw=scheduler.step_kw,
        # the paper's placement: every transformer block's cross-attention attn2, down, mid and up
        adapter_options=dict(hidden_dim=args.hidden_dim, num_heads=args.num_heads, use_timestep=args.use_timestep,
                             mlp_ratio=args.mlp_ratio, zero_at_w1=args.zero_at_w1, prompt_dim=cfg.cross_attention_dim if args.use_prompt else 0))


MODELS = {
    # name: (default weights, defaults that differ from the paper's / the CLI's)
    # tiny: a short run with a high learning rate; the adapters also see t and the class, scale their
    # output by (w - 1), sit on the adaLN modulations too, and learn the guidance direction at every w
    # alike (11 % of the base; README's tiny-world section says what each of these bought)
    "tiny": ("assets/tiny-dit-mnist", dict(trajectories=1000, steps=25, train_steps=1500, batch_size=64, lr=5e-3,
                                           hidden_dim=24, num_heads=4, mlp_ratio=1.0, use_timestep=True,
                                           use_class=True, zero_at_w1=True, modulation=True, loss="guidance",
                                           w_min=1.0, w_max=6.0)),
    "dit": ("facebook/DiT-XL-2-256", dict(trajectories=4000, steps=250, keep_steps=50, train_steps=20000,
                                          batch_size=32, lr=1e-4, hidden_dim=256, mlp_ratio=4.0, w_min=1.0,
                                          w_max=6.0, gradient_checkpointing=True)),
    # SD: 4 trajectories per prompt of the bundled file, 8 of 50 sampler steps stored; the official
    # adapters' width 320 and 5,000 steps; batch sizes for a 24 GB GPU with gradient checkpointing
    "sd21": ("stabilityai/stable-diffusion-2-1", dict(trajectories=500, steps=50, keep_steps=8, train_steps=5000,
                                                      batch_size=32, lr=1e-4, hidden_dim=320, mlp_ratio=4.0,
                                                      w_min=1.0, w_max=12.0, collect_batch=16,
                                                      gradient_checkpointing=True)),
    "sdxl": ("stabilityai/stable-diffusion-xl-base-1.0", dict(trajectories=500, steps=50, keep_steps=8,
                                                              train_steps=5000, batch_size=16, lr=1e-4,
                                                              hidden_dim=320, mlp_ratio=4.0, w_min=1.0, w_max=12.0,
                                                              collect_batch=4, gradient_checkpointing=True)),
}


def load_setup(args):
    weights = args.weights or MODELS[args.model][0]
    if args.model == "tiny" and not args.weights:
        weights = ROOT / weights
    if args.model in ("sd21", "sdxl"):
        return setup_sd(weights, args)
    model = dit.from_pretrained(weights, device=args.device, dtype=args.dtype)
    model.gradient_checkpointing = bool(args.gradient_checkpointing)
    return setup_dit(model, args, guidance.step_options_beside(weights))  # as sample.py samples


def args_device(s):
    return next(s.model.parameters()).device


# -----------------------------------------------------------------------------
# 1. collect CFG trajectories (Algorithm 1)


def keep_indices(num_steps, keep):
    """Which steps of a trajectory to store: all, or `keep` evenly spread from first to last."""
    if keep is None or keep >= num_steps:
        return list(range(num_steps))
    return sorted({round(i * (num_steps - 1) / (keep - 1)) for i in range(keep)}) if keep > 1 else [num_steps - 1]


@torch.no_grad()
def collect_shard(s, idx, w, generator, keep):
    """Sample trajectories `idx` with CFG at scales w; return the kept steps as one shard.

    Rows are (x_t, t, target, w) of one step of one trajectory; the condition is stored once per
    trajectory ("cond.*": a class label, or a prompt's embeddings) and rows point to it by "traj".
    """
    cond, null = s.condition(idx), s.null(len(idx))
    x = torch.randn((len(idx), *s.shape), generator=generator, device=generator.device).to(args_device(s))
    record = []
    guidance.sample(guidance.guided(s.model, w.to(x.device), cond, null), x, s.alphas_cumprod, s.timesteps,
                    step=s.step, generator=generator, record=record, **s.step_kw)
    rows = [record[i] for i in keep_indices(len(record), keep)]
    n, B = len(rows), len(idx)
    shard = {
        "x": torch.cat([r[0] for r in rows]).half().cpu(),  # (n*B, C, H, W)
        "t": torch.tensor([r[1] for r in rows]).repeat_interleave(B),  # (n*B,)
        "target": torch.cat([r[2] for r in rows]).half().cpu(),  # (n*B, C_out, H, W)
        "w": w.repeat(n),  # (n*B,)
        "traj": torch.arange(B).repeat(n),  # (n*B,) row -> its trajectory in this shard
    }
    for k, v in cond.items():  # once per trajectory, not per step
        shard[f"cond.{k}"] = (v.half() if v.is_floating_point() else v).cpu()
    return shard


def make_shard(s, args, k, total=None):
    """Shard k: trajectories k * shard_size ... (up to `total`), in batches of --collect-batch.

    Its content depends only on (seed, k): collection resumes, and --online rebuilds its buffer.
    """
    g = torch.Generator(device=args_device(s)).manual_seed(args.seed * 100003 + k)
    end = (k + 1) * args.shard_size if total is None else min((k + 1) * args.shard_size, total)
    idx = torch.arange(k * args.shard_size, end)
    w = args.w_min + (args.w_max - args.w_min) * torch.rand(len(idx), generator=g, device=g.device).cpu()
    batch = args.collect_batch or len(idx)
    return concat_shards([collect_shard(s, i, ws, g, args.keep_steps)
                          for i, ws in zip(idx.split(batch), w.split(batch))])


def trajectory_bytes(shape, out_channels, keep, cond_bytes):
    """Bytes one stored trajectory takes: `keep` rows of fp16 x_t and target, int64 t, fp32 w, int64
    trajectory index; and its condition once."""
    pixels = math.prod(shape[1:])
    return keep * (2 * shape[0] * pixels + 2 * out_channels * pixels + 8 + 4 + 8) + cond_bytes


def official_trajectory_bytes(shape):
    """What the official code stores per trajectory: all 1,000 steps' input and output in fp16."""
    return OFFICIAL_STEPS * 2 * 2 * math.prod(shape)  # SDXL's 4 x 128 x 128 latents: 262 MB


def print_storage(s, args, n_shards, folder):
    """The storage a collection will take, before it starts."""
    keep = len(keep_indices(len(s.timesteps), args.keep_steps))
    cond = s.condition(torch.arange(1))
    cond_bytes = sum(v[0].numel() * (2 if v.is_floating_point() else v.element_size()) for v in cond.values())
    per = trajectory_bytes(s.shape, s.out_channels, keep, cond_bytes)
    full = official_trajectory_bytes(s.shape)
    print(f"collecting {args.trajectories} trajectories x {keep} of {len(s.timesteps)} steps: "
          f"{per / 1e6:.2f} MB per trajectory ({full / per:.0f}x less than all {OFFICIAL_STEPS} steps in fp16, "
          f"{full / 1e6:.0f} MB), {args.trajectories * per / 1e9:.2f} GB in {n_shards} shards -> {folder}")


def collect(s, args, folder):
    """Write shards of CFG trajectories to `folder`, skipping those already there (resume).

    Under torchrun rank r writes shards r, r + world, ...; all wait for all before training.
    """
    folder.mkdir(parents=True, exist_ok=True)
    n_shards = math.ceil(args.trajectories / args.shard_size)
    if args.rank == 0:
        print_storage(s, args, n_shards, folder)
    for k in tqdm(range(args.rank, n_shards, args.world), desc="collect", disable=args.rank != 0):
        file = folder / f"shard_{k:05d}.safetensors"
        if not file.is_file():
            checkpoint.save_file(make_shard(s, args, k, args.trajectories), file)
    if args.world > 1:
        dist.barrier()


def concat_shards(shards):
    """Shards as one, rows re-pointed at their trajectories."""
    out, offset = [], 0
    for shard in shards:
        out.append({**shard, "traj": shard["traj"] + offset})
        offset += len(next(v for k, v in shard.items() if k.startswith("cond.")))
    return {k: torch.cat([sh[k] for sh in out]) for k in out[0]}


def load_shards(folder):
    """All shards of a trajectory folder, concatenated; a corrupt shard raises an error that names it."""
    files = sorted(folder.glob("shard_*.safetensors"))
    if not files:
        raise checkpoint.CheckpointError(f"{folder}: no trajectory shards")
    return concat_shards([checkpoint.read_tensors(f) for f in files])


def batch_condition(data, rows, device, dtype):
    """The stored condition of each row's trajectory, as the denoiser takes it."""
    cond = {}
    for k, v in data.items():
        if k.startswith("cond."):
            v = v[data["traj"][rows]].to(device)
            cond[k[len("cond."):]] = v.to(dtype) if v.is_floating_point() else v
    return cond


class OnlineBuffer:
    """--online: CFG trajectories of the frozen base, generated while training; nothing is stored.

    The teacher is the student's own base with the adapters disabled. Every --refresh-every steps a
    new shard of --shard-size trajectories replaces the oldest of the --buffer-shards held. Shard k
    is offline collection's shard k (rank r of W makes k * W + r), so a resumed run rebuilds the
    buffer it had.
    """

    def __init__(self, s, student, args):
        self.s, self.student, self.args = s, student, args
        self.shards, self.data = {}, None

    def __call__(self, step):
        a = self.args
        newest = step // a.refresh_every
        wanted = range(max(0, newest - a.buffer_shards + 1), newest + 1)
        if set(self.shards) != set(wanted):
            self.shards = {k: self.shards.get(k) for k in wanted}
            with self.student.disabled():
                for k in wanted:
                    if self.shards[k] is None:
                        self.shards[k] = make_shard(self.s, a, k * a.world + a.rank)
            self.data = concat_shards([self.shards[k] for k in wanted])
        return self.data


# -----------------------------------------------------------------------------
# 2. train the adapters (Algorithm 2)


def lr_lambda(total, warmup_frac=0.1):
    """Linear warm-up over the first 10 % of steps, then cosine decay to zero (the paper's schedule)."""
    warmup = max(1, int(total * warmup_frac))
    return lambda step: (step + 1) / warmup if step < warmup else \
        0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def distillation_loss(pred, target, w, kind="mse"):
    """MSE to the CFG output; "guidance": each sample's divided by (w - 1)^2 (floored at 0.1^2).

    The CFG correction is (w - 1) (cond - uncond), so its squared size grows as (w - 1)^2 and plain
    MSE is ruled by the largest w; divided, every w counts as an error on the direction cond - uncond.
    """
    err = (pred - target).pow(2).flatten(1).mean(1)  # (B,)
    if kind == "guidance":
        err = err / (w.float() - 1).clamp(min=0.1) ** 2
    return err.mean()


def batch_rows(n_rows, batch, seed, rank, step):
    """The rows of one rank's batch at one step: a function of (seed, rank, step) only, so resuming is exact."""
    g = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0]))
    return torch.randint(0, n_rows, (batch,), generator=g)


def average_gradients(params, world):
    """Data parallel (what DDP does, spelled out): every rank steps with the mean of all ranks' gradients."""
    if world == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])  # one all-reduce for all adapters
    dist.all_reduce(flat)
    flat /= world
    for p, g in zip(params, flat.split([g.numel() for g in grads])):
        p.grad = g.view_as(p).clone()


def check_in_sync(params, world):
    """Under torchrun: all ranks must end with the same adapters, or the averaging went wrong."""
    if world == 1:
        return
    total = torch.stack([p.detach().double().sum() for p in params]).sum().reshape(1)
    gathered = [torch.zeros_like(total) for _ in range(world)]
    dist.all_gather(gathered, total)
    if any(not torch.equal(g, gathered[0]) for g in gathered):
        raise RuntimeError(f"adapters differ across ranks after training: {[g.item() for g in gathered]}")


def save_state(file, student, opt, sched, step, losses, scaler=None):
    """Everything to resume training exactly, written atomically (temp file, then rename)."""
    tmp = file.with_name(file.name + ".tmp")
    torch.save({"adapters": student.adapter_state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "step": step, "losses": losses,
                "scaler": scaler.state_dict() if scaler is not None else {}}, tmp)
    tmp.replace(file)
    (file.parent / "losses.json").write_text(json.dumps(losses))


def load_state(file):
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:
        raise checkpoint.CheckpointError(f"{file}: unreadable training checkpoint ({type(e).__name__}); "
                                         "delete it to start over") from None


def train(s, data, args, out):
    """Fit adapters to the CFG targets by MSE; returns the student.

    `data` is the collected shards, or None for --online. The base runs in its own dtype (bf16 or
    fp16) under autocast; the adapters keep fp32 weights, and fp16 gets a gradient scaler.
    """
    torch.manual_seed(args.seed)  # the adapters' initialization (and their random Fourier features)
    student = adapters.attach(s.model, **s.adapter_options)  # fp32 adapters beside the frozen base
    params = list(student.adapters.parameters())
    opt = torch.optim.Adam(params, lr=args.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(args.train_steps))
    device, dtype = args_device(s), next(s.model.parameters()).dtype
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    state_file, step, losses = out / "train_state.pt", 0, []
    if args.resume and state_file.is_file():
        state = load_state(state_file)
        student.load_adapter_state_dict(state["adapters"], source=str(state_file))
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        step, losses = state["step"], state["losses"]
        if args.rank == 0:
            print(f"resumed from {state_file} at step {step}")
    source = OnlineBuffer(s, student, args) if data is None else (lambda step: data)
    n_adapter, n_base = student.num_parameters()
    if args.rank == 0:
        print(f"adapters: {n_adapter:,} parameters ({100 * n_adapter / n_base:.1f} % of the base's {n_base:,}); "
              + ("online teacher" if data is None else f"{len(data['x']):,} training pairs")
              + f"; base in {str(dtype).removeprefix('torch.')}, batch {args.batch_size} over {args.world} rank(s)")
    per_rank = args.batch_size // args.world
    bar = tqdm(range(step, args.train_steps), desc="train", initial=step, total=args.train_steps,
               disable=args.rank != 0)
    for step in bar:
        batch = source(step)
        i = batch_rows(len(batch["x"]), per_rank, args.seed, args.rank, step)
        x, t = batch["x"][i].to(device, dtype), batch["t"][i].to(device)
        target, w = batch["target"][i].to(device).float(), batch["w"][i].to(device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            pred = student(x, t, w=w, **batch_condition(batch, i, device, dtype))
        loss = distillation_loss(pred.float(), target, w, args.loss)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        average_gradients(params, args.world)
        scaler.step(opt)
        scaler.update()
        sched.step()
        losses.append(loss.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.5f}", lr=f"{sched.get_last_lr()[0]:.1e}")
        if (step + 1) % args.save_every == 0 and step + 1 < args.train_steps and args.rank == 0:
            save_state(state_file, student, opt, sched, step + 1, losses, scaler)
    student.release()
    check_in_sync(params, args.world)
    if device.type == "cuda" and args.rank == 0:  # what a GPU needs for this run's settings
        print(f"peak GPU memory in training: {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB "
              f"(batch {per_rank} per GPU)")
    if args.rank == 0:
        student.save(out / "adapters.safetensors", base=args.weights or MODELS[args.model][0])
        save_state(state_file, student, opt, sched, args.train_steps, losses, scaler)
    return student


# -----------------------------------------------------------------------------
# 3. evaluate in the tiny world


@torch.no_grad()
def generate(s, denoisers, n, seed, batch_size):
    """n samples per method (sample i asks for class i mod 10), every method from the same noise.

    Methods take turns batch by batch, so that a busy moment on the machine skews none of them;
    seconds per image is the median over batches. Returns ({name: images}, {name: sec/image}).
    """
    images, seconds = {k: [] for k in denoisers}, {k: [] for k in denoisers}
    for b, idx in enumerate(tqdm(torch.arange(n).split(batch_size), desc="evaluate")):
        cond, null = s.condition(idx), s.null(len(idx))
        for name, make in denoisers.items():
            g = torch.Generator().manual_seed(seed * 1000 + b)  # the same noise for every method
            x = torch.randn((len(idx), *s.shape), generator=g).to(args_device(s))
            start = time.perf_counter()
            images[name].append(guidance.sample(make(cond, null), x, s.alphas_cumprod, s.timesteps,
                                                step=s.step, generator=g, **s.step_kw).cpu())
            seconds[name].append((time.perf_counter() - start) / len(idx))
    return {k: torch.cat(v) for k, v in images.items()}, {k: float(np.median(v)) for k, v in seconds.items()}


def evaluate(s, student, args, reference=None):
    """The teacher without guidance, with CFG and with adapters at each w: digit FID, accuracy, time.

    `reference`: the digit FID's (mu, sigma) (default: the real digits'; a fine-tune's own style's).
    """
    import tiny  # the tiny world's classifier and digit FID

    classifier = tiny.load_classifier()
    reference = tiny.reference_statistics(classifier) if reference is None else reference
    denoisers = {("base", 1.0): lambda cond, null: (lambda x, t: s.model(x, t, **cond))}
    for w in args.eval_w:
        denoisers[("cfg", w)] = lambda cond, null, w=w: guidance.guided(s.model, w, cond, null)
        denoisers[("agd", w)] = lambda cond, null, w=w: (lambda x, t: student(x, t, w=w, **cond))
    images, seconds = generate(s, denoisers, args.eval_samples, args.seed + 1, args.eval_batch)
    labels = torch.arange(args.eval_samples) % 10
    scores = {k: {"fid": tiny.digit_fid(classifier, v, reference), "accuracy": tiny.accuracy(classifier, v, labels),
                  "sec_per_image": seconds[k]} for k, v in images.items()}
    results, grids = [], {}
    for w in args.eval_w:  # the unguided teacher is listed beside each w (it does not depend on w)
        results += [{"method": m, "w": w, **scores[(m, 1.0 if m == "base" else w)]} for m in ("base", "cfg", "agd")]
        grids[w] = [images[("base", 1.0)][:20], images[("cfg", w)][:20], images[("agd", w)][:20]]
    return results, grids


def save_grid(grids, file):
    """Rows base / CFG / AGD for each w, same seeds in each column, labelled on the left."""
    from PIL import Image, ImageDraw

    scale, margin = 2, 90
    rows = [(f"{name} w={w:g}" if name != "base" else "base", img)
            for w, (b, c, a) in grids.items() for name, img in (("base", b), ("CFG", c), ("AGD", a))]
    n = rows[0][1].shape[0]
    size = rows[0][1].shape[-1] * scale
    canvas = Image.new("L", (margin + n * size, len(rows) * size), 255)
    draw = ImageDraw.Draw(canvas)
    for r, (label, images) in enumerate(rows):
        draw.text((4, r * size + size // 2 - 6), label, fill=0)
        pixels = ((images[:, 0].clamp(-1, 1) + 1) * 127.5).round().byte().numpy()
        for c in range(n):
            tile = Image.fromarray(pixels[c]).resize((size, size), Image.NEAREST)
            canvas.paste(tile, (margin + c * size, r * size))
    canvas.save(file)


def print_table(results):
    print(f"{'method':<6} {'w':>5} {'FID':>8} {'accuracy':>9} {'ms/image':>9}")
    for r in results:
        print(f"{r['method']:<6} {r['w']:>5.1f} {r['fid']:>8.3f} {r['accuracy']:>9.3f} {1000 * r['sec_per_image']:>9.2f}")


# -----------------------------------------------------------------------------
# CLI


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Distill classifier-free guidance into adapters (AGD): collect CFG trajectories of the "
                    "frozen base model, train guidance-conditioned adapters on them, evaluate (tiny world).")
    p.add_argument("--model", choices=list(MODELS), default="tiny",
                   help="tiny: the bundled MNIST DiT teacher (CPU, minutes); dit: DiT-XL/2; sd21: Stable "
                        "Diffusion 2.1 (768 px, v); sdxl: SDXL base 1.0")
    p.add_argument("--weights", help="hub id or local folder of the base model (default: the model's official one)")
    p.add_argument("--out", help="output folder (default: runs/<model>)")
    p.add_argument("--device", default="cpu", help="cpu, cuda (under torchrun: each rank's cuda:LOCAL_RANK)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="dtype of the frozen base model (default: float32 for tiny, else bfloat16, or float16 "
                        "where bfloat16 is missing); the adapters stay float32 under autocast")
    p.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("collection (Algorithm 1)")
    g.add_argument("--trajectories", type=int, help="number of CFG trajectories")
    g.add_argument("--steps", type=int, help="sampler steps per trajectory (as at inference)")
    g.add_argument("--keep-steps", type=int, default=None, help="store only this many steps per trajectory")
    g.add_argument("--w-min", type=float)
    g.add_argument("--w-max", type=float)
    g.add_argument("--shard-size", type=int, default=100, help="trajectories per shard file")
    g.add_argument("--collect-batch", type=int, default=None, help="trajectories sampled at once (default: a shard)")
    g.add_argument("--prompt-file", default=str(ROOT / "prompts" / "agd_prompts.txt"),
                   help="SD: one prompt a line; trajectory i asks for prompt i mod their number")
    g.add_argument("--resolution", type=int, help="SD: image side in pixels (default: the UNet's native one)")
    g.add_argument("--online", action="store_true",
                   help="store nothing: generate trajectories while training (base with adapters disabled)")
    g.add_argument("--buffer-shards", type=int, default=4, help="--online: shards held at once")
    g.add_argument("--refresh-every", type=int, default=50, help="--online: a new shard every N training steps")
    g = p.add_argument_group("training (Algorithm 2)")
    g.add_argument("--train-steps", type=int)
    g.add_argument("--batch-size", type=int, help="global batch (split across torchrun's ranks)")
    g.add_argument("--lr", type=float, help="peak learning rate (paper: 1e-4)")
    g.add_argument("--hidden-dim", type=int, help="adapter width (official: DiT 256, SD 320)")
    g.add_argument("--mlp-ratio", type=float, help="of the adapters' scalar embedders")
    g.add_argument("--num-heads", type=int, help="of the adapters' cross-attention")
    g.add_argument("--zero-at-w1", action=argparse.BooleanOptionalAction, default=None,
                   help="scale the adapters' output by (w - 1): exactly the conditional model at w = 1")
    g.add_argument("--use-timestep", action=argparse.BooleanOptionalAction, default=None,
                   help="condition the adapters on t too")
    g.add_argument("--use-class", action=argparse.BooleanOptionalAction, default=None,
                   help="DiT: condition the adapters on the class too")
    g.add_argument("--use-prompt", action="store_true", help="SD: condition the adapters on the prompt tokens too")
    g.add_argument("--modulation", action=argparse.BooleanOptionalAction, default=None,
                   help="DiT: also adapt every adaLN modulation (ours; see adapters.py; default: on for tiny)")
    g.add_argument("--loss", choices=["mse", "guidance"], default=None,
                   help="mse: the paper's; guidance: each squared error divided by (w - 1)^2, i.e. measured in "
                        "units of the guidance direction, so small w weigh as much as large (default for tiny)")
    g.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute the base's blocks in backward: less memory, one more forward "
                        "(default: on for dit, sd21 and sdxl)")
    g.add_argument("--save-every", type=int, default=200, help="checkpoint the training state every N steps")
    g.add_argument("--resume", action="store_true", help="continue from <out>/train_state.pt")
    g = p.add_argument_group("evaluation (tiny)")
    g.add_argument("--eval-w", type=float, nargs="+", default=[1.5, 3.0, 5.0])
    g.add_argument("--eval-samples", type=int, default=500)
    g.add_argument("--eval-batch", type=int, default=100)
    g.add_argument("--no-eval", action="store_true")
    args = p.parse_args(argv)
    for k, v in MODELS[args.model][1].items():  # the model's defaults where not given
        if getattr(args, k) is None:
            setattr(args, k, v)
    for k, v in dict(num_heads=1, use_timestep=False, use_class=False, zero_at_w1=False, modulation=False,
                     loss="mse").items():  # the official adapters'
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.out = Path(args.out or f"runs/{args.model}")
    args.dtype = getattr(torch, args.dtype) if args.dtype else default_dtype(args)
    args.rank, args.world = 0, int(os.environ.get("WORLD_SIZE", 1))
    if args.w_min < 1 or args.w_max < args.w_min:
        p.error(f"need 1 <= --w-min <= --w-max, got {args.w_min}, {args.w_max}")
    if args.batch_size % args.world:
        p.error(f"--batch-size {args.batch_size} does not split over {args.world} ranks")
    if args.model in ("sd21", "sdxl"):
        if args.modulation:
            p.error("--modulation is for DiTs (adaLN); a UNet takes its adapters beside attn2")
        if not Path(args.prompt_file).is_file() or not prompts.read_prompts(args.prompt_file):
            p.error(f"--prompt-file {args.prompt_file}: no such file, or no prompts in it")
    return args


def default_dtype(args):
    """The frozen base's dtype: as stored for the tiny teacher; bf16, else fp16, for the real models."""
    if args.model == "tiny":
        return None
    if args.device.startswith("cuda") and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def init_distributed(args):
    """Under torchrun: join the process group (gloo on CPU, nccl on GPUs); each rank its own GPU."""
    if args.world == 1:
        return
    dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
    args.rank = dist.get_rank()
    if args.device == "cuda":
        args.device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}"
        torch.cuda.set_device(args.device)


def main(args):
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    init_distributed(args)
    try:
        s = load_setup(args)
        data = None
        if not args.online:
            collect(s, args, out / "trajectories")
            data = load_shards(out / "trajectories")
        student = train(s, data, args, out)
    finally:
        if args.world > 1:
            dist.destroy_process_group()
    if args.rank != 0:
        return
    if args.model != "tiny" or args.no_eval:
        print(f"adapters -> {out / 'adapters.safetensors'} ({(time.time() - start) / 60:.1f} min)")
        return
    student.eval()
    results, grids = evaluate(s, student, args)
    metrics = {"results": results, "model": args.model, "weights": str(args.weights or MODELS[args.model][0]),
               "trajectories": args.trajectories, "steps": args.steps, "train_steps": args.train_steps,
               "eval_samples": args.eval_samples, "adapter_parameters": student.num_parameters()[0],
               "base_parameters": student.num_parameters()[1], "minutes": (time.time() - start) / 60}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    save_grid(grids, out / "samples.png")
    print_table(results)
    print(f"-> {out / 'metrics.json'}, {out / 'samples.png'} ({metrics['minutes']:.1f} min)")


if __name__ == "__main__":
    args = parse_args()
    try:
        main(args)
    except (checkpoint.CheckpointError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
