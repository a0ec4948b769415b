"""Adapter Guidance Distillation: collect CFG trajectories, train adapters on them, evaluate.

    python train_agd.py                  # the bundled tiny teacher, end to end on a CPU in minutes
    python train_agd.py --model dit      # DiT-XL/2 from the hub (or --weights FOLDER)

1. Collect (Algorithm 1 of Jensen & Sadat 2025): sample the frozen base model with CFG at random
   scales w ~ U[w_min, w_max], along the sampler used at inference, and record (x_t, t, cond, w)
   with the CFG output as the target. Shards are written atomically; an interrupted collection
   resumes where it stopped.
2. Train (Algorithm 2): adapters beside the attention blocks learn, by MSE, to give the CFG output
   in one pass. Adam, linear warm-up over 10 % of the steps, then cosine decay. The state is
   checkpointed atomically every --save-every steps; --resume continues from it.
3. Evaluate (tiny world): the teacher without guidance, with CFG and with adapters, from the same
   noise, at several w: digit FID, class accuracy and seconds per image -> metrics.json,
   samples.png and a table.
"""

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import adapters
import checkpoint
import dit
import guidance

# -----------------------------------------------------------------------------
# what each model needs: its loader, condition, null condition, sampler and defaults


@dataclass
class Setup:
    """Everything model-specific; the rest of this file only calls these."""
    model: torch.nn.Module
    shape: tuple  # (C, H, W) of the denoiser's input
    condition: callable  # trajectory indices (N,) -> cond dict of the denoiser
    null: callable  # n -> the null condition dict
    alphas_cumprod: torch.Tensor
    timesteps: torch.Tensor  # the inference sampler's steps, descending
    step: callable  # guidance.ddpm_step or ddim_step
    step_kw: dict = field(default_factory=dict)
    adapter_options: dict = field(default_factory=dict)


def class_condition(num_classes, device):
    """Trajectory i asks for class i mod num_classes: every class equally often (DiT: 4 per class)."""
    return lambda idx: {"y": (idx % num_classes).to(device)}


def class_null(null_class, device):
    return lambda n: {"y": torch.full((n,), null_class, dtype=torch.long, device=device)}


def scheduler_config(weights):
    """The base's scheduler/scheduler_config.json where a local folder has one (its prediction type)."""
    path = Path(weights)
    for file in (path / "scheduler" / "scheduler_config.json", path.parent / "scheduler" / "scheduler_config.json"):
        if file.is_file():
            return json.loads(file.read_text())
    return {}


def setup_dit(model, args, scheduler):
    cfg = model.config
    step_kw = {"prediction_type": scheduler.get("prediction_type", "epsilon")}
    if scheduler.get("clip_sample", False):  # pixel-space models (the tiny teacher) clip x_0 to [-1, 1]
        step_kw["clip_sample"] = float(scheduler.get("clip_sample_range", 1.0))
    return Setup(
        model=model, shape=(cfg.in_channels, cfg.input_size, cfg.input_size),
        condition=class_condition(cfg.num_classes, args.device), null=class_null(cfg.num_classes, args.device),
        alphas_cumprod=guidance.linear_schedule(),
        timesteps=guidance.spaced_timesteps(args.steps, spacing="iddpm"),  # DiT's respaced DDPM
        step=guidance.ddpm_step, step_kw=step_kw,
        adapter_options=dict(hidden_dim=args.hidden_dim, use_timestep=args.use_timestep,
                             num_classes=cfg.num_classes + 1 if args.use_class else 0, mlp_ratio=args.mlp_ratio))


MODELS = {
    # name: (default weights, defaults that differ from the paper's / the CLI's)
    "tiny": ("assets/tiny-dit-mnist", dict(trajectories=500, steps=25, train_steps=1000, batch_size=64, lr=1e-3,
                                           hidden_dim=32, mlp_ratio=2.0, w_min=1.0, w_max=6.0)),
    "dit": ("facebook/DiT-XL-2-256", dict(trajectories=4000, steps=250, train_steps=20000, batch_size=32, lr=1e-4,
                                          hidden_dim=256, mlp_ratio=4.0, w_min=1.0, w_max=6.0)),
}


def load_setup(args):
    weights = args.weights or MODELS[args.model][0]
    if args.model == "tiny" and not args.weights:
        weights = Path(__file__).resolve().parent / weights
    model = dit.from_pretrained(weights, device=args.device, dtype=args.dtype)
    return setup_dit(model, args, scheduler_config(weights))


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
    """Sample trajectories `idx` with CFG at scales w; return the kept steps as one shard."""
    cond, null = s.condition(idx), s.null(len(idx))
    x = torch.randn((len(idx), *s.shape), generator=generator).to(args_device(s))
    record = []
    guidance.sample(guidance.guided(s.model, w.to(x.device), cond, null), x, s.alphas_cumprod, s.timesteps,
                    step=s.step, generator=generator, record=record, **s.step_kw)
    rows = [record[i] for i in keep_indices(len(record), keep)]
    n = len(rows)
    return {
        "x": torch.cat([r[0] for r in rows]).half().cpu(),  # (n*B, C, H, W)
        "t": torch.tensor([r[1] for r in rows]).repeat_interleave(len(idx)),  # (n*B,)
        "target": torch.cat([r[2] for r in rows]).half().cpu(),  # (n*B, C_out, H, W)
        "w": w.repeat(n),  # (n*B,)
        "traj": idx.repeat(n),  # (n*B,) trajectory index: its condition is s.condition(traj)
    }


def collect(s, args, folder):
    """Write shards of CFG trajectories to `folder`, skipping those already there (resume)."""
    folder.mkdir(parents=True, exist_ok=True)
    n_shards = math.ceil(args.trajectories / args.shard_size)
    keep = len(keep_indices(len(s.timesteps), args.keep_steps))
    per_sample = (np.prod(s.shape) * 2 + np.prod(s.shape) * (2 if s.model.config.learn_sigma else 1) * 2 + 20)
    print(f"collecting {args.trajectories} trajectories x {keep} of {len(s.timesteps)} steps: "
          f"{args.trajectories * keep * per_sample / 2**20:.1f} MiB in {n_shards} shards -> {folder}")
    for k in tqdm(range(n_shards), desc="collect"):
        file = folder / f"shard_{k:05d}.safetensors"
        if file.is_file():
            continue
        g = torch.Generator().manual_seed(args.seed * 100003 + k)  # a shard's content depends only on k
        idx = torch.arange(k * args.shard_size, min((k + 1) * args.shard_size, args.trajectories))
        w = args.w_min + (args.w_max - args.w_min) * torch.rand(len(idx), generator=g)
        checkpoint.save_file(collect_shard(s, idx, w, g, args.keep_steps), file)


def load_shards(folder):
    """All shards of a trajectory folder, concatenated; a corrupt shard is named."""
    files = sorted(folder.glob("shard_*.safetensors"))
    if not files:
        raise checkpoint.CheckpointError(f"{folder}: no trajectory shards")
    shards = [checkpoint.read_tensors(f) for f in files]
    return {k: torch.cat([sh[k] for sh in shards]) for k in shards[0]}


# -----------------------------------------------------------------------------
# 2. train the adapters (Algorithm 2)


def lr_lambda(total, warmup_frac=0.1):
    """Linear warm-up over the first 10 % of steps, then cosine decay to zero (the paper's schedule)."""
    warmup = max(1, int(total * warmup_frac))
    return lambda step: (step + 1) / warmup if step < warmup else \
        0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def save_state(file, student, opt, sched, step, generator, losses):
    """Everything to resume training exactly, written atomically (temp file, then rename)."""
    tmp = file.with_name(file.name + ".tmp")
    torch.save({"adapters": student.adapter_state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "step": step, "generator": generator.get_state(),
                "losses": losses}, tmp)
    tmp.replace(file)


def load_state(file):
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:
        raise checkpoint.CheckpointError(f"{file}: unreadable training checkpoint ({type(e).__name__}); "
                                         "delete it to start over") from None


def train(s, data, args, out):
    """Fit adapters to the CFG targets by MSE; returns the student."""
    torch.manual_seed(args.seed)  # the adapters' initialization (and their random Fourier features)
    student = adapters.attach(s.model, **s.adapter_options)
    params = list(student.adapters.parameters())
    opt = torch.optim.Adam(params, lr=args.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(args.train_steps))
    g = torch.Generator().manual_seed(args.seed)
    state_file, step, losses = out / "train_state.pt", 0, []
    if args.resume and state_file.is_file():
        state = load_state(state_file)
        student.load_adapter_state_dict(state["adapters"], source=str(state_file))
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        g.set_state(state["generator"])
        step, losses = state["step"], state["losses"]
        print(f"resumed from {state_file} at step {step}")
    n_adapter, n_base = student.num_parameters()
    print(f"adapters: {n_adapter:,} parameters ({100 * n_adapter / n_base:.1f} % of the base's {n_base:,}); "
          f"{len(data['x']):,} training pairs")
    device = args_device(s)
    bar = tqdm(range(step, args.train_steps), desc="train", initial=step, total=args.train_steps)
    for step in bar:
        i = torch.randint(0, len(data["x"]), (args.batch_size,), generator=g)
        x, t = data["x"][i].to(device).float(), data["t"][i].to(device)
        target, w = data["target"][i].to(device).float(), data["w"][i].to(device)
        out_ = student(x, t, w=w, **s.condition(data["traj"][i]))
        loss = F.mse_loss(out_.float(), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.5f}", lr=f"{sched.get_last_lr()[0]:.1e}")
        if (step + 1) % args.save_every == 0 and step + 1 < args.train_steps:
            save_state(state_file, student, opt, sched, step + 1, g, losses)
    student.release()
    student.save(out / "adapters.safetensors", base=args.weights or MODELS[args.model][0])
    save_state(state_file, student, opt, sched, args.train_steps, g, losses)
    (out / "losses.json").write_text(json.dumps(losses))
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


def evaluate(s, student, args):
    """The teacher without guidance, with CFG and with adapters at each w: digit FID, accuracy, time."""
    import tiny  # the tiny world's classifier and digit FID

    classifier = tiny.load_classifier()
    reference = tiny.reference_statistics(classifier)
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
                    "frozen base model, train guidance-conditioned adapters on them, evaluate (tiny world).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", choices=list(MODELS), default="tiny",
                   help="tiny: the bundled MNIST DiT teacher (CPU, minutes); dit: DiT-XL/2")
    p.add_argument("--weights", help="hub id or local folder of the base model (default: the model's official one)")
    p.add_argument("--out", help="output folder (default: runs/<model>)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="dtype of the frozen base model")
    p.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("collection (Algorithm 1)")
    g.add_argument("--trajectories", type=int, help="number of CFG trajectories")
    g.add_argument("--steps", type=int, help="sampler steps per trajectory (as at inference)")
    g.add_argument("--keep-steps", type=int, default=None, help="store only this many steps per trajectory")
    g.add_argument("--w-min", type=float)
    g.add_argument("--w-max", type=float)
    g.add_argument("--shard-size", type=int, default=100, help="trajectories per shard file")
    g = p.add_argument_group("training (Algorithm 2)")
    g.add_argument("--train-steps", type=int)
    g.add_argument("--batch-size", type=int)
    g.add_argument("--lr", type=float, help="peak learning rate (paper: 1e-4)")
    g.add_argument("--hidden-dim", type=int, help="adapter width")
    g.add_argument("--mlp-ratio", type=float, help="of the adapters' scalar embedders")
    g.add_argument("--use-timestep", action="store_true", help="condition the adapters on t too")
    g.add_argument("--use-class", action="store_true", help="condition the adapters on the class too")
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
    args.out = Path(args.out or f"runs/{args.model}")
    args.dtype = getattr(torch, args.dtype) if args.dtype else None
    if args.w_min < 1 or args.w_max < args.w_min:
        p.error(f"need 1 <= --w-min <= --w-max, got {args.w_min}, {args.w_max}")
    return args


def main(args):
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    s = load_setup(args)
    collect(s, args, out / "trajectories")
    data = load_shards(out / "trajectories")
    student = train(s, data, args, out)
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
