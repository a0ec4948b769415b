"""Algorithm 1 of Jensen & Sadat 2025: CFG trajectories of the frozen base model, the adapters' data.

Sample the base with CFG at random scales w ~ U[w_min, w_max], along the sampler used at inference,
for every class (DiT) or prompt (SD), and keep (x_t, t, w) with the CFG output as the target:

    plan = Collection(trajectories=1000, steps=25, keep_steps=None, w_min=1, w_max=6)
    collect(base, plan, folder)              # resumable shards of fp16 rows
    data = load_shards(folder)               # {"x", "t", "target", "w", "traj", "cond.*"}

Only `keep_steps` steps of each trajectory are stored, in fp16, and the condition (a class, a
prompt's embeddings) once per trajectory. Shard k depends only on (seed, k): an interrupted
collection resumes where it stopped, and `OnlineBuffer` (--online: nothing stored; the base itself,
outside any adapter scope, is the teacher) rebuilds exactly the shards it held.

Letters in shape comments: N rows (steps x trajectories), B trajectories, C channels, H W size.
"""

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from tqdm import tqdm

import checkpoint
import guidance

OFFICIAL_STEPS = 1000  # the official code stores every one of the 1,000 steps: input and output, fp16


@dataclass
class Collection:
    """What to collect: how many trajectories, along which sampler run, at which scales, stored how."""
    trajectories: int
    steps: int  # sampler steps per trajectory, as at inference
    w_min: float = 1.0
    w_max: float = 6.0
    keep_steps: int = None  # store only this many steps of each trajectory (None: all)
    shard_size: int = 100  # trajectories per shard file
    batch: int = None  # trajectories sampled at once (None: a shard)
    seed: int = 0
    prompts: list = None  # prompt families: trajectory i asks for prompt i mod len(prompts)
    negative_prob: float = 0.0  # the share of trajectories whose CFG is against a negative, not the null
    negative_prompts: list = None  # prompt families: the negatives, drawn at random (classes: another class)


def keep_indices(num_steps, keep):
    """Which steps of a trajectory to store: all, or `keep` evenly spread from first to last."""
    if keep is None or keep >= num_steps:
        return list(range(num_steps))
    return sorted({round(i * (num_steps - 1) / (keep - 1)) for i in range(keep)}) if keep > 1 else [num_steps - 1]


def conditions(base, plan, idx):
    """The condition of trajectories idx: class i mod the number of classes (every class equally
    often), or prompt i mod the number of prompts."""
    if base.family.conditioning == "class":
        return base.encode(idx % base.model.config.num_classes)
    return base.encode([plan.prompts[i % len(plan.prompts)] for i in idx.tolist()])


def draw_negatives(base, plan, idx, generator):
    """Each trajectory's negative: None (the null condition) but for a share `negative_prob`, which get
    another class than their own (classes) or a prompt of `negative_prompts` (prompts), at random."""
    n = len(idx)
    drawn = torch.rand(n, generator=generator, device=generator.device).cpu() < plan.negative_prob
    if base.family.conditioning == "class":
        k = base.model.config.num_classes
        other = (idx % k + 1 + torch.randint(0, k - 1, (n,), generator=generator, device=generator.device).cpu()) % k
        return [int(j) if d else None for j, d in zip(other, drawn)]
    pick = torch.randint(0, len(plan.negative_prompts), (n,), generator=generator, device=generator.device).cpu()
    return [plan.negative_prompts[j] if d else None for j, d in zip(pick.tolist(), drawn)]


def negative_condition(base, negatives):
    """The condition CFG subtracts, per trajectory: the null condition where the negative is None."""
    null = base.null(len(negatives))
    if all(v is None for v in negatives):
        return null
    if base.family.conditioning == "class":
        return base.null(len(negatives), torch.tensor([base.model.config.num_classes if v is None else v
                                                        for v in negatives]))
    given = base.null(len(negatives), ["" if v is None else v for v in negatives])  # each prompt encoded
    mask = torch.tensor([v is not None for v in negatives], device=null["context"].device)
    return {k: torch.where(mask.view(-1, *[1] * (v.ndim - 1)), given[k], v) for k, v in null.items()}


@torch.no_grad()
def collect_shard(base, plan, idx, w, generator, negatives=None):
    """Sample trajectories `idx` with CFG at scales w (B,); return the kept steps as one shard.

    Rows are (x_t, t, target, w) of one step of one trajectory; the condition is stored once per
    trajectory ("cond.*": a class label, or a prompt's embeddings) and rows point to it by "traj".
    With `negatives` (one per trajectory, None for the null), CFG is neg + w (cond - neg) and the
    negative condition is stored as "neg.*".
    """
    device = next(base.model.parameters()).device
    cond = conditions(base, plan, idx)
    null = base.null(len(idx)) if negatives is None else negative_condition(base, negatives)
    x = torch.randn((len(idx), *base.shape), generator=generator, device=generator.device).to(device)
    timesteps = base.scheduler.timesteps(plan.steps)
    keep, rows = set(keep_indices(len(timesteps), plan.keep_steps)), []

    def keep_step(step):  # what the sampler shows of each step: only the kept ones leave the device, in fp16
        if step["i"] in keep:
            rows.append((step["x"].half().cpu(), step["t"], step["out"].half().cpu()))

    dtype = next(base.model.parameters()).dtype

    def model(x, t, **c):  # samples stay fp32 between steps; a bf16 / fp16 base computes in its own dtype
        return base.model(x.to(dtype), t, **c).float()

    guidance.sample(guidance.guided(model, w.to(device), cond, null, base.cfg_channels), x, base.scheduler,
                    timesteps, generator=generator, callback=keep_step)
    n, B = len(rows), len(idx)
    shard = {
        "x": torch.cat([r[0] for r in rows]),  # (N, C, H, W), N = n * B
        "t": torch.tensor([r[1] for r in rows]).repeat_interleave(B),  # (N,)
        "target": torch.cat([r[2] for r in rows]),  # (N, C_out, H, W)
        "w": w.repeat(n),  # (N,)
        "traj": torch.arange(B).repeat(n),  # (N,) row -> its trajectory in this shard
    }
    stored = {"cond": cond, **({"neg": null} if negatives is not None else {})}
    for prefix, condition in stored.items():  # once per trajectory, not per step
        for k, v in condition.items():
            shard[f"{prefix}.{k}"] = (v.half() if v.is_floating_point() else v).cpu()
    return shard


def make_shard(base, plan, k, capped=True):
    """Shard k: trajectories k * shard_size ... (capped: up to the plan's total), in batches of plan.batch.

    Its content depends only on (seed, k): collection resumes, and --online rebuilds its buffer.
    """
    device = next(base.model.parameters()).device
    g = torch.Generator(device=device).manual_seed(plan.seed * 100003 + k)
    end = (k + 1) * plan.shard_size
    idx = torch.arange(k * plan.shard_size, min(end, plan.trajectories) if capped else end)
    w = plan.w_min + (plan.w_max - plan.w_min) * torch.rand(len(idx), generator=g, device=g.device).cpu()
    negatives = draw_negatives(base, plan, idx, g) if plan.negative_prob > 0 else None  # (none drawn: as before)
    batch = plan.batch or len(idx)
    parts = []
    for start in range(0, len(idx), batch):
        part = slice(start, start + batch)
        parts.append(collect_shard(base, plan, idx[part], w[part], g, negatives[part] if negatives else None))
    return concat_shards(parts)


@torch.no_grad()
def standard_shard(base, plan, k, images, labels):
    """Shard k of "standard" pairs instead of trajectories: real images noised by the forward process,
    with the base's CFG output there as the target (the guidance distillation data of Meng et al.
    2023, against which AGD trains on CFG's own trajectories).

    Row for row it mirrors make_shard: trajectory i asks for class i mod the number of classes (a real
    image of that class), w ~ U[w_min, w_max], and one row at each timestep the sampler visits (or the
    kept ones), so that only where x_t comes from differs.
    """
    device = next(base.model.parameters()).device
    g = torch.Generator().manual_seed(plan.seed * 100003 + k)
    idx = torch.arange(k * plan.shard_size, min((k + 1) * plan.shard_size, plan.trajectories))
    w = plan.w_min + (plan.w_max - plan.w_min) * torch.rand(len(idx), generator=g)
    y = idx % base.model.config.num_classes
    of_class = [torch.nonzero(labels == c).flatten() for c in range(base.model.config.num_classes)]
    x0 = torch.stack([images[of_class[c][torch.randint(len(of_class[c]), (1,), generator=g)].item()]
                      for c in y.tolist()]).to(device)  # (B, C, H, W)
    timesteps = base.scheduler.timesteps(plan.steps)
    kept = [timesteps[i].item() for i in keep_indices(len(timesteps), plan.keep_steps)]
    cond, null = base.encode(y.to(device)), base.null(len(idx))
    denoise = guidance.guided(base.model, w.to(device), cond, null, base.cfg_channels)
    xs, targets = [], []
    for t in kept:
        noise = torch.randn(x0.shape, generator=g).to(device)
        tt = torch.full((len(idx),), t, device=device)
        x_t = guidance.add_noise(base.scheduler.schedule, x0, tt, noise).half().float()  # as stored: the pair exact
        xs.append(x_t.half().cpu())
        targets.append(denoise(x_t, tt).half().cpu())
    n = len(kept)
    return {"x": torch.cat(xs), "t": torch.tensor(kept).repeat_interleave(len(idx)), "target": torch.cat(targets),
            "w": w.repeat(n), "traj": torch.arange(len(idx)).repeat(n), "cond.y": y}


def keep_rows(data, timesteps):
    """The rows of collected data at the given timesteps only (a smaller --keep-steps of the same trajectories)."""
    rows = torch.isin(data["t"], torch.as_tensor(list(timesteps)))
    return {k: v[rows] if k in ("x", "t", "target", "w", "traj") else v for k, v in data.items()}


def trajectory_bytes(shape, out_channels, keep, cond_bytes):
    """Bytes one stored trajectory takes: `keep` rows of fp16 x_t and target, int64 t, fp32 w, int64
    trajectory index; and its condition once."""
    pixels = math.prod(shape[1:])
    return keep * (2 * shape[0] * pixels + 2 * out_channels * pixels + 8 + 4 + 8) + cond_bytes


def official_trajectory_bytes(shape):
    """What the official code stores per trajectory: all 1,000 steps' input and output in fp16."""
    return OFFICIAL_STEPS * 2 * 2 * math.prod(shape)  # SDXL's 4 x 128 x 128 latents: 262 MB


def print_storage(base, plan, n_shards, folder):
    """The storage a collection will take, before it starts."""
    keep = len(keep_indices(plan.steps, plan.keep_steps))
    cond = conditions(base, plan, torch.arange(1))
    cond_bytes = sum(v[0].numel() * (2 if v.is_floating_point() else v.element_size()) for v in cond.values())
    per = trajectory_bytes(base.shape, base.out_channels, keep, cond_bytes)
    full = official_trajectory_bytes(base.shape)
    print(f"collecting {plan.trajectories} trajectories x {keep} of {plan.steps} steps: "
          f"{per / 1e6:.2f} MB per trajectory ({full / per:.0f}x less than all {OFFICIAL_STEPS} steps in fp16, "
          f"{full / 1e6:.0f} MB), {plan.trajectories * per / 1e9:.2f} GB in {n_shards} shards -> {folder}")


def collect(base, plan, folder, rank=0, world=1):
    """Write shards of CFG trajectories to `folder`, skipping those already there (resume).

    Under torchrun rank r writes shards r, r + world, ...; all wait for all before training.
    """
    folder.mkdir(parents=True, exist_ok=True)
    n_shards = math.ceil(plan.trajectories / plan.shard_size)
    if rank == 0:
        print_storage(base, plan, n_shards, folder)
    for k in tqdm(range(rank, n_shards, world), desc="collect", disable=rank != 0):
        file = folder / f"shard_{k:05d}.safetensors"
        if not file.is_file():  # written atomically: an interrupt or a full disk leaves no partial shard
            shard = make_shard(base, plan, k)
            bad = checkpoint.non_finite(shard)
            if bad is not None:
                raise checkpoint.CheckpointError(f"{file}: not written: its {bad} is not finite (the base's CFG "
                                                 "outputs overflowed; in float16, try --dtype bfloat16)")
            checkpoint.save_file(shard, file)
    if world > 1:
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


def batch_condition(data, rows, device, dtype, prefix="cond."):
    """The stored condition of each row's trajectory, as the denoiser takes it ("neg.": its negative's)."""
    cond = {}
    for k, v in data.items():
        if k.startswith(prefix):
            v = v[data["traj"][rows]].to(device)
            cond[k[len(prefix):]] = v.to(dtype) if v.is_floating_point() else v
    return cond


class OnlineBuffer:
    """--online: CFG trajectories of the frozen base, generated while training; nothing is stored.

    The teacher is the base model itself, called outside the student's scope. Every `refresh_every`
    steps a new shard replaces the oldest of the `shards` held. Shard k is offline collection's
    shard k (rank r of W makes k * W + r), so a resumed run rebuilds the buffer it had.
    """

    def __init__(self, base, plan, shards=4, refresh_every=50, rank=0, world=1):
        self.base, self.plan = base, plan
        self.n, self.refresh_every, self.rank, self.world = shards, refresh_every, rank, world
        self.shards, self.data = {}, None

    def __call__(self, step):
        newest = step // self.refresh_every
        wanted = range(max(0, newest - self.n + 1), newest + 1)
        if set(self.shards) != set(wanted):
            self.shards = {k: self.shards.get(k) for k in wanted}
            for k in wanted:
                if self.shards[k] is None:
                    self.shards[k] = make_shard(self.base, self.plan, k * self.world + self.rank, capped=False)
            self.data = concat_shards([self.shards[k] for k in wanted])
        return self.data
