"""Adapter Guidance Distillation: collect CFG trajectories, train adapters on them, evaluate.

    python train_agd.py                  # the bundled tiny teacher, end to end on a CPU in minutes
    python train_agd.py --model dit      # DiT-XL/2 from the hub (or --weights FOLDER)
    python train_agd.py --model sdxl --prompt-file prompts/agd_prompts.txt   # SD 2.1 / SDXL
    python train_agd.py --model sd35 --no-t5                     # SD3 / SD3.5, without T5-XXL
    python train_agd.py --model sdxl --online                    # no storage: the teacher runs beside
    python train_agd.py --model sdxl --lora style.safetensors:0.8  # the adapters of a LoRA'd SDXL
    torchrun --nproc_per_node 8 train_agd.py --model sdxl        # data-parallel on 8 GPUs

1. Collect (Algorithm 1 of Jensen & Sadat 2025; trajectories.py): CFG trajectories of the frozen
   base at w ~ U[w_min, w_max], along the inference sampler; --keep-steps of each stored in fp16.
   Every prompt is encoded first and the text encoders are freed: T5-XXL never sits beside training.
   --online stores nothing: trajectories are generated while training into a bounded buffer.
2. Train (Algorithm 2; this file): adapters beside the attention blocks learn, by MSE, to give the
   CFG output in one pass. The base is frozen in bf16 (fp16 where bf16 is missing), the adapters'
   weights stay fp32 under autocast; Adam, linear warm-up over 10 % of the steps, then cosine decay.
   The state is checkpointed atomically every --save-every steps; --resume continues from it,
   exactly: a step's batch depends only on (seed, rank, step).
3. Distill steps (--distill-steps N; distill.py): rounds of progressive distillation halve the
   adapters' deterministic DDIM steps down to N, the base still frozen; --adapters FILE distills
   given adapters instead of training them.
4. Evaluate (tiny world; tiny.py): the teacher without guidance, with CFG and with adapters, from
   the same noise, at several w: digit FID, class accuracy and seconds per image -> metrics.json,
   samples.png and a table; with --distill-steps, CFG, AGD and the distilled adapters against steps.

Under torchrun every rank collects its share of the shards, then trains on its part of each batch;
gradients are averaged across ranks (data parallel) and rank 0 writes the checkpoints.
"""

import argparse
import gc
import hashlib
import json
import math
import os
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import adapters
import checkpoint
import families
import fast
import hub
import lora
import prompts
import runs
import trajectories

ROOT = Path(__file__).resolve().parent

# -----------------------------------------------------------------------------
# training (Algorithm 2)


@dataclass
class Training:
    """The optimization: steps, batch, learning rate, loss, how often to checkpoint."""
    train_steps: int
    batch_size: int  # global: split across torchrun's ranks
    lr: float
    loss: str = "mse"  # see distillation_loss
    save_every: int = 200
    seed: int = 0
    max_skips: int = 20  # fp16: stop after this many steps in a row that the loss scaler skipped


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


def save_state(file, student, opt, sched, step, losses, scaler=None, with_base=False, skipped=()):
    """Everything to resume training exactly, written atomically (checkpoint.atomic_write); with_base: the
    base's weights too, when they are trained (the whole-model baseline of bench/ablations_tiny.py)."""
    with checkpoint.atomic_write(file) as f:
        torch.save({"adapters": student.adapter_state_dict(), "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(), "step": step, "losses": losses,
                    "scaler": scaler.state_dict() if scaler is not None else {}, "skipped": list(skipped),
                    **({"base": student.model.state_dict()} if with_base else {})}, f)
    with checkpoint.atomic_write(file.parent / "losses.json") as f:
        f.write(json.dumps(losses).encode())


def non_finite(loss, params, world):
    """What of this step is not finite: "" (nothing), the loss or a gradient; under torchrun, on any rank."""
    norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])  # foreach: few kernels
    bad = ~torch.isfinite(torch.stack([loss.detach().float(), norm]))  # a NaN or inf anywhere makes the norm one
    if world > 1:
        bad = bad.float()
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    loss_bad, grad_bad = bad.tolist()
    return "" if not (loss_bad or grad_bad) else f"{'the loss' if loss_bad else 'a gradient'} is not finite " \
        f"(the loss is {loss.item():.4g})"


def diverged(step, what, lr, state_file, saved, fp16):
    """The one line that stops a diverged run: the step, what went wrong, what is kept, what to try."""
    kept = (f"the last good checkpoint, {state_file} at step {saved}, is kept as it was" if saved else
            "no checkpoint was written yet")
    try_ = (f"try --dtype bfloat16 (with --resume) or a lower --lr than {lr:g} (with a new --out)" if fp16 else
            f"try a lower --lr than {lr:g} (with a new --out)")
    return f"training diverged at step {step}: {what}; {kept}, and no adapters file is written; {try_}"


def load_state(file):
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:
        raise checkpoint.CheckpointError(f"{file}: unreadable training checkpoint ({type(e).__name__}); "
                                         "delete it to start over") from None


def train(student, source, hp, out, resume=False, rank=0, world=1, params=None, signals=None):
    """Fit the student's adapters (or `params`) to the CFG targets of `source(step)` (a dict of rows) by MSE.

    The base runs in its own dtype (bf16 or fp16) under autocast; the adapters keep fp32 weights,
    and fp16 gets a gradient scaler. Each step runs the base model inside the student's scope, and
    calls backward there too: gradient checkpointing re-runs the blocks, and their adapters, in it.

    A non-finite loss or gradient stops the run (runs.Diverged) before it touches the checkpoint; in
    fp16 the scaler skips such a step (an overflow) and halves its scale, and a run of `hp.max_skips`
    of them stops it. A SIGINT / SIGTERM caught by `signals` (runs.Signals) ends the step, checkpoints
    and raises runs.Interrupted.
    """
    model = student.model
    params = list(student.adapters.parameters()) if params is None else list(params)
    with_base = any(p.requires_grad for p in model.parameters())  # the whole model trained, not adapters only
    opt = torch.optim.Adam(params, lr=hp.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(hp.train_steps))
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    state_file, step, losses, skipped = out / "train_state.pt", 0, [], []
    if resume and state_file.is_file():
        state = load_state(state_file)
        student.load_adapter_state_dict(state["adapters"], source=str(state_file))
        if with_base:
            model.load_state_dict(state["base"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        step, losses, skipped = state["step"], state["losses"], state.get("skipped", [])
        if rank == 0:
            print(f"resumed from {state_file} at step {step}")
    per_rank = hp.batch_size // world
    saved = step  # the step of the checkpoint on disk (0: none)
    bar = tqdm(range(step, hp.train_steps), desc="train", initial=step, total=hp.train_steps, disable=rank != 0)
    for step in bar:
        batch = source(step)
        i = batch_rows(len(batch["x"]), per_rank, hp.seed, rank, step)
        x, t = batch["x"][i].to(device, dtype), batch["t"][i].to(device)
        target, w = batch["target"][i].to(device).float(), batch["w"][i].to(device)
        cond = trajectories.batch_condition(batch, i, device, dtype)
        negative = trajectories.batch_condition(batch, i, device, dtype, "neg.") or None  # adapters that read it
        with student.condition(w=w, t=t, negative=negative, **cond):
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                pred = model(x, t, **cond)
            loss = distillation_loss(pred.float(), target, w, hp.loss)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
        average_gradients(params, world)
        if not scaler.is_enabled() and (what := non_finite(loss, params, world)):
            raise runs.Diverged(diverged(step, what, hp.lr, state_file, saved, fp16=False))
        scale = scaler.get_scale()
        scaler.step(opt)  # fp16: skipped if a gradient overflowed (Micikevicius et al. 2018, mixed precision)
        scaler.update()
        with warnings.catch_warnings():  # fp16: a first step the scaler skipped is no wrong call order, as it warns
            warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler\.step\(\)` before", UserWarning)
            sched.step()
        overflowed = scaler.get_scale() < scale  # the scaler skipped the step and halved its scale
        if overflowed:
            skipped.append(step)
            if rank == 0:
                bar.write(f"step {step}: float16 overflow, skipped (loss scale {scale:g} -> {scaler.get_scale():g})")
            if (n := skipped_in_a_row(skipped, step + 1)) >= hp.max_skips:
                raise runs.Diverged(diverged(step, f"{n} steps in a row overflowed in float16", hp.lr, state_file,
                                             saved, fp16=True))
        else:
            losses.append(loss.item())
        if step % 10 == 0 or overflowed:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.5f}" if losses else "-",
                            lr=f"{sched.get_last_lr()[0]:.1e}", **({"skipped": len(skipped)} if skipped else {}))
        stop = signals.requested(world, device) if signals is not None else 0
        if ((step + 1) % hp.save_every == 0 or stop) and step + 1 < hp.train_steps:
            if rank == 0:
                save_state(state_file, student, opt, sched, step + 1, losses, scaler, with_base, skipped)
            saved = step + 1
        if stop and step + 1 < hp.train_steps:
            raise runs.Interrupted(stop, f"stopped after step {step + 1} of {hp.train_steps}; the training state is "
                                         f"saved in {state_file}")
    check_in_sync(params, world)
    if device.type == "cuda" and rank == 0:  # what a GPU needs for this run's settings
        print(f"peak GPU memory in training: {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB "
              f"(batch {per_rank} per GPU)")
    if skipped and rank == 0:
        print(f"float16: {len(skipped)} of {hp.train_steps} steps skipped by the loss scaler (overflows), at steps "
              + ", ".join(map(str, skipped[:10])) + (" ..." if len(skipped) > 10 else ""))
    if rank == 0:
        save_state(state_file, student, opt, sched, hp.train_steps, losses, scaler, with_base, skipped)
    return student


def skipped_in_a_row(skipped, step):
    """How many of the steps just before `step` the fp16 loss scaler skipped, in a row."""
    n = 0
    while n < len(skipped) and skipped[-1 - n] == step - 1 - n:
        n += 1
    return n


# -----------------------------------------------------------------------------
# CLI


ADAPTER_OPTIONS = ("hidden_dim", "num_heads", "mlp_ratio", "use_timestep", "use_class", "use_prompt", "use_negative",
                   "zero_at_w1", "modulation")  # the CLI's adapter flags, in AdapterConfig's names (use_*: see
#                                                Base.adapter_options)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Distill classifier-free guidance into adapters (AGD): collect CFG trajectories of the "
                    "frozen base model, train guidance-conditioned adapters on them, evaluate (tiny world).")
    p.add_argument("--model", choices=list(families.FAMILIES), default="tiny",
                   help="; ".join(f"{f.name}: {f.help}" for f in families.FAMILIES.values()))
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
    g.add_argument("--resolution", type=int, help="SD: image side in pixels (default: the model's native one)")
    g.add_argument("--cfg-channels", type=lambda v: None if v == "all" else int(v), metavar="3|all",
                   help="DiT: the latent channels CFG guides in the trajectories: all (default, as diffusers), or 3, "
                        "as facebookresearch/DiT's forward_with_cfg and the official AGD code collect")
    g.add_argument("--negatives", type=float, default=0.0, metavar="P",
                   help="the share of trajectories whose CFG is against a random negative (DiT: another class; SD: "
                        "a prompt of --negative-prompt-file) instead of the null condition; the adapters then also "
                        "see the negative, so that sampling with one runs in one pass (default 0: none)")
    g.add_argument("--negative-prompt-file", default=str(ROOT / "prompts" / "negative_prompts.txt"),
                   help="SD with --negatives: one negative prompt a line")
    g.add_argument("--online", action="store_true",
                   help="store nothing: generate trajectories while training (the base itself is the teacher)")
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
    g.add_argument("--use-prompt", action=argparse.BooleanOptionalAction, default=None,
                   help="SD: condition the adapters on the prompt tokens too")
    g.add_argument("--modulation", action=argparse.BooleanOptionalAction, default=None,
                   help="DiT: also adapt every adaLN modulation (ours; see adapters.py; default: on for tiny)")
    g.add_argument("--loss", choices=["mse", "guidance"], default=None,
                   help="mse: the paper's; guidance: each squared error divided by (w - 1)^2, i.e. measured in "
                        "units of the guidance direction, so small w weigh as much as large (default for tiny)")
    g.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute the base's blocks in backward: less memory, one more forward "
                        "(default: on for dit, sd21, sdxl, sd3 and sd35)")
    g.add_argument("--save-every", type=int, default=200, help="checkpoint the training state every N steps")
    g.add_argument("--resume", action="store_true", help="continue from <out>/train_state.pt")
    g = p.add_argument_group("LoRA (kohya-ss, diffusers or peft files: UNet and text encoders, or a DiT)")
    g.add_argument("--lora", action="append", default=[], type=lora.spec_argument, metavar="FILE[:MULTIPLIER]",
                   help="fused into the base after loading: trajectories are collected from, and the adapters "
                        "trained beside, the LoRA'd base (multiplier default 1.0); repeat for several")
    g = p.add_argument_group("SD3 / SD3.5 (--model sd3, sd35)")
    g.add_argument("--no-t5", action="store_true",
                   help="leave T5-XXL out: zeros in its tokens' place, as StableDiffusion3Pipeline with "
                        "text_encoder_3=None (4.8 B parameters less to load; some cost to prompt following)")
    import distill  # here, not above: distill.py builds on this file

    distill.add_arguments(p)
    g = p.add_argument_group("evaluation (tiny)")
    g.add_argument("--eval-w", type=float, nargs="+", default=[1.5, 3.0, 5.0])
    g.add_argument("--eval-samples", type=int, default=500)
    g.add_argument("--eval-batch", type=int, default=100)
    g.add_argument("--no-eval", action="store_true")
    g = p.add_argument_group("when things go wrong (README: When things go wrong)")
    g.add_argument("--max-skips", type=int, default=Training.max_skips,
                   help="float16: stop after this many steps in a row that the loss scaler skipped (overflows)")
    g = p.add_argument_group("sharing")
    g.add_argument("--push-to-hub", metavar="USER/REPO",
                   help="when done, upload the adapters with a model card (always written into --out as README.md), "
                        "the sample grid and the run's figures to this hub repo (`hf auth login` first)")
    g.add_argument("--hub-private", action="store_true", help="create that repo private")
    fast.add_arguments(p)
    args = p.parse_args(argv)
    family = families.FAMILIES[args.model]
    if args.push_to_hub is not None and not hub.HUB_ID.fullmatch(args.push_to_hub):
        p.error(f"--push-to-hub {args.push_to_hub}: not a hub repo id (user/repo)")
    for k, v in {**families.OFFICIAL_ADAPTERS, **family.train}.items():  # the model's defaults where not given
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    args.use_negative = args.negatives > 0
    if args.no_t5 and not family.t5:
        p.error(f"--no-t5 is for SD3 / SD3.5; --model {args.model} has no T5 encoder")
    if not 0 <= args.negatives <= 1:
        p.error(f"--negatives is a share of the trajectories, in [0, 1]; got {args.negatives}")
    if args.eval_samples < 2 or args.eval_batch < 1:  # found out before training, not after it
        p.error(f"--eval-samples {args.eval_samples} --eval-batch {args.eval_batch}: need at least 2 samples (a "
                "FID's covariance) in batches of at least 1")
    args.out = Path(args.out or f"runs/{args.model}")
    args.dtype = getattr(torch, args.dtype) if args.dtype else default_dtype(args)
    args.rank, args.world = 0, int(os.environ.get("WORLD_SIZE", 1))
    if args.w_min < 1 or args.w_max < args.w_min:
        p.error(f"need 1 <= --w-min <= --w-max, got {args.w_min}, {args.w_max}")
    if args.batch_size % args.world:
        p.error(f"--batch-size {args.batch_size} does not split over {args.world} ranks")
    if family.conditioning == "class" and args.use_prompt:
        p.error(f"--use-prompt is for prompt-conditioned models; --model {args.model} takes a class (--use-class)")
    if family.conditioning == "prompt":
        if args.cfg_channels is not None:
            p.error(f"--cfg-channels is for DiTs; --model {args.model} guides its whole prediction")
        if args.use_class:
            p.error(f"--use-class is for class-conditioned models; --model {args.model} takes a prompt (--use-prompt)")
        if args.modulation:
            p.error(f"--modulation is for DiTs (adaLN); --model {args.model} takes its adapters beside attention")
        for flag, file in (("--prompt-file", args.prompt_file),) + \
                (("--negative-prompt-file", args.negative_prompt_file),) * args.use_negative:
            if not Path(file).is_file() or not prompts.read_prompts(file):
                p.error(f"{flag} {file}: no such file, or no prompts in it")
    distill.check_arguments(p, args, family)
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


def collection_plan(args, family):
    """The CLI's collection flags as a trajectories.Collection."""
    return trajectories.Collection(
        trajectories=args.trajectories, steps=args.steps, w_min=args.w_min, w_max=args.w_max,
        keep_steps=args.keep_steps, shard_size=args.shard_size, batch=args.collect_batch, seed=args.seed,
        prompts=prompts.read_prompts(args.prompt_file) if family.conditioning == "prompt" else None,
        negative_prob=args.negatives, negative_prompts=prompts.read_prompts(args.negative_prompt_file)
        if family.conditioning == "prompt" and args.negatives > 0 else None)


def load_base(args):
    """The frozen base model that --model, --weights and --lora name, set up for training adapters beside it."""
    lora.check_files(args.lora)  # before the models load
    base = families.load(args.model, args.weights, dtype=args.dtype, device=args.device,
                         height=args.resolution, width=args.resolution, cfg_channels=args.cfg_channels,
                         t5=not args.no_t5)
    lora.apply(base.lora_models(), args.lora, undoable=False)  # fused for good: the base is the LoRA'd one
    base.model.gradient_checkpointing = bool(args.gradient_checkpointing)
    fast.speed_up(base.model, args.compile, args.cuda_graphs, args.channels_last)  # collection and training alike
    return base


def free_memory(base):
    """Hand memory that nothing holds any more back: the text encoders' after Base.precomputed."""
    gc.collect()
    if next(base.model.parameters()).is_cuda:
        torch.cuda.empty_cache()


# On --resume these may differ from the options the run was made with (and are said); any other is an error.
# --distill-steps may go on halving (6, then 3): the rounds done are kept, and --distill-from must not change.
MAY_CHANGE = {"train_steps", "save_every", "max_skips", "device", "dtype", "gradient_checkpointing", "world",
              "eval_w", "eval_samples", "eval_batch", "no_eval", "push_to_hub", "hub_private", "compile",
              "cuda_graphs", "channels_last", "distill_steps"}
# What the stored trajectory shards depend on: compared whenever they are reused, --resume or not.
DATA = {"model", "weights", "seed", "trajectories", "steps", "keep_steps", "w_min", "w_max", "shard_size",
        "collect_batch", "prompts", "resolution", "cfg_channels", "negatives", "negative_prompts", "no_t5"}


def run_options(args, family):
    """The options that made this run, as stored beside its checkpoint: prompts by their digest, not their file."""
    options = {k: v for k, v in vars(args).items()
               if k not in ("out", "resume", "rank", "prompt_file", "negative_prompt_file")}
    options["dtype"] = str(args.dtype).removeprefix("torch.") if args.dtype is not None else None
    files = {"prompts": args.prompt_file, "negative_prompts": args.negative_prompt_file if args.negatives else None}
    for key, file in files.items():
        if family.conditioning == "prompt" and file is not None:
            options[key] = hashlib.sha256("\n".join(prompts.read_prompts(file)).encode()).hexdigest()[:16]
    return options


def check_run(args, family, first_rank=True):
    """Refuse options that conflict with what `args.out` holds: the run on --resume, else its trajectory shards."""
    reused = any((args.out / "trajectories").glob("shard_*.safetensors")) and not args.online
    options = run_options(args, family)
    fixed = set(options) - MAY_CHANGE if args.resume else DATA if reused else set()
    changed = runs.check_options(args.out, options, fixed, write=first_rank)
    state = args.out / "train_state.pt"
    if first_rank and args.resume and changed:
        print(f"resuming with other options, which may change: {changed}")
    elif first_rank and not args.resume and state.is_file():
        print(f"note: training starts over; {state} is replaced at the first checkpoint (--resume continues it)")


def train_adapters(args, base, plan, out, signals=None):
    """Algorithms 1 and 2 as the CLI asks: collect along `plan` (or --online), then train; returns the student."""
    if args.online:
        source = trajectories.OnlineBuffer(base, plan, args.buffer_shards, args.refresh_every, args.rank,
                                           args.world)
    else:
        trajectories.collect(base, plan, out / "trajectories", args.rank, args.world)
        data = trajectories.load_shards(out / "trajectories")
        source = lambda step: data  # noqa: E731
    torch.manual_seed(args.seed)  # the adapters' initialization (and their random Fourier features)
    options = base.adapter_options(**{k: getattr(args, k) for k in ADAPTER_OPTIONS})
    student = adapters.attach(base.model, **options)  # fp32 adapters beside the frozen base
    n_adapter, n_base = student.num_parameters()
    if args.rank == 0:
        dtype = str(next(base.model.parameters()).dtype).removeprefix("torch.")
        print(f"adapters: {n_adapter:,} parameters ({100 * n_adapter / n_base:.1f} % of the base's {n_base:,}); "
              + ("online teacher" if args.online else f"{len(data['x']):,} training pairs")
              + f"; base in {dtype}, batch {args.batch_size} over {args.world} rank(s)")
    hp = Training(args.train_steps, args.batch_size, args.lr, args.loss, args.save_every, args.seed, args.max_skips)
    with signals.deferred() if signals is not None else nullcontext():  # a signal ends the step, checkpoints
        train(student, source, hp, out, args.resume, args.rank, args.world, signals=signals)
    if args.rank == 0:
        student.save(out / "adapters.safetensors", base=base.weights, lora=lora.record(args.lora))
    return student


def main(args):
    """Collect, train and evaluate into args.out: locked against a second run, options checked, signals caught."""
    args.out.mkdir(parents=True, exist_ok=True)
    first_rank = int(os.environ.get("RANK", 0)) == 0  # torchrun's rank, before the process group exists
    with runs.Lock(args.out) if first_rank else nullcontext(), runs.Signals() as signals:
        check_run(args, families.FAMILIES[args.model], first_rank)
        run(args, signals)


def run(args, signals=None):
    """The run itself: collect (or stream) trajectories, train, save the adapters, evaluate (tiny)."""
    out = args.out
    start = time.time()
    family = families.FAMILIES[args.model]
    init_distributed(args)
    try:
        base = load_base(args)
        plan = collection_plan(args, family)
        if family.conditioning == "prompt":  # all prompts encoded now (distillation's too); text encoders let go
            base = base.precomputed(plan.prompts + (plan.negative_prompts or []))
            free_memory(base)
        student = train_adapters(args, base, plan, out, signals) if args.adapters is None else None
        source = Path(args.adapters or out / "adapters.safetensors")
        if args.distill_steps is not None:
            import distill

            if student is not None:
                student.detach()  # its file is the first teacher
            student, files, diagnosis = distill.distill(base, source, distill.plan(args, family), out, args.resume,
                                                        args.rank, args.world, signals)
    finally:
        if args.world > 1:
            dist.destroy_process_group()
    if args.rank != 0:
        return
    last = files[-1] if args.distill_steps is not None else source
    if args.model != "tiny" or args.no_eval:
        print(f"adapters -> {last} ({(time.time() - start) / 60:.1f} min)")
        if args.distill_steps is None:
            share(out, args.push_to_hub, args.hub_private)
        return
    import tiny  # the tiny world's evaluation

    n_adapter, n_base = student.num_parameters()
    metrics = {"model": args.model, "weights": base.weights, "trajectories": args.trajectories, "steps": args.steps,
               "train_steps": args.train_steps, "eval_samples": args.eval_samples, "adapter_parameters": n_adapter,
               "base_parameters": n_base}
    if args.distill_steps is None:
        student.eval()
        results, grids = tiny.evaluate(base, student, args.steps, args.eval_w, args.eval_samples, args.eval_batch,
                                       args.seed + 1)
        tiny.save_grid(grids, out / "samples.png")
    else:
        distilled = {distill.read_steps(f): adapters.load(base.model, f) for f in files}
        agd = adapters.load(base.model, source)
        results, rows = tiny.evaluate_steps(base, agd, distilled, distill.scheduler(base), args.eval_w,
                                            args.eval_samples, args.eval_batch, args.seed + 1, args.steps)
        tiny.save_rows(rows, out / "samples.png")
        distill.plot_steps(results, out / "steps.png")
        metrics.update(distill_train_steps=args.distill_train_steps, distillation=diagnosis)
    metrics = {"results": results, **metrics, "minutes": (time.time() - start) / 60}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    tiny.print_table(results)
    print(f"-> {out / 'metrics.json'}, {out / 'samples.png'} ({metrics['minutes']:.1f} min)")
    if args.distill_steps is None:  # the model card describes AGD's adapters (distill.check_arguments)
        share(out, args.push_to_hub, args.hub_private)


def share(out, repo_id=None, private=False):
    """The run's model card into `out` (README.md, from its files), and, given a repo id, all of it to the hub."""
    print(f"model card -> {hub.write_card(out, repo_id)}")
    if repo_id is not None:
        print(f"uploaded -> {hub.push_to_hub(out, repo_id, private=private)}")


if __name__ == "__main__":
    args = parse_args()
    try:
        main(args)
    except runs.Interrupted as e:
        print(f"{e}. To continue: {runs.resume_command(sys.argv)}", file=sys.stderr)
        sys.exit(e.exit_code)
    except checkpoint.WriteError as e:  # a full disk: the files before it are intact
        sys.exit(f"error: {e}; once there is room: {runs.resume_command(sys.argv)}")
    except (checkpoint.CheckpointError, runs.RunError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
