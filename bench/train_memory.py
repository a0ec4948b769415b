"""Peak memory of SDXL adapter training at 1024 px, accounted on the CPU until a GPU measures it.

    OMP_NUM_THREADS=2 flock /tmp/agd-heavy.lock python bench/train_memory.py     # about 15 minutes on 2 cores
    python bench/train_memory.py --side 16 --check-side 8                          # a quick look, not the accounting

What train_agd.train holds at its peak for the full-size SDXL UNet frozen in bf16, the default
adapters (families.FAMILIES["sdxl"].train: 320 wide, beside all 70 attn2) in fp32 under autocast,
Adam, gradient checkpointing:
- counted exactly, on the meta device: the base's bf16 weights, the adapters' fp32 weights and, for
  the adapter weights that get gradients (the w-only adapter skips q_proj and k_proj), their fp32
  gradients and Adam's two fp32 moments;
- measured: everything else that train() allocates (stored block inputs, a recomputed block and its
  gradients, temporaries): the peak of the running sum of torch.profiler's memory events (every
  allocation and free of the CPU allocator, in order) over a train() run of 2 steps, less the
  gradients and moments counted above. On SDXL UNets narrowed in width (channels x c, heads of 64
  channels as SDXL's: the same blocks and depths) at the full 128 x 128 latents, at batch 1 and 2;
  fitted as a + B (b + g c) and extrapolated to c = 1. The fit's form is checked at 32 x 32
  latents, where a wider UNet is cheap: fitted on the narrow ones, it predicts c = 0.4.

The measured runs are fp32 (no autocast; a CPU is slow at bf16 and its autocast keeps the norms in
bf16). A GPU's run holds each of those tensors in bf16 or, where CUDA's autocast computes in fp32
(GroupNorm, LayerNorm), in fp32, plus at most one cast copy of it: at most 1.5 x its fp32 bytes. It
also holds bf16 copies of the trained adapter weights and fp32 copies of the base's norm weights
(autocast's casts, kept for backward). That bounds what a GPU's allocator holds; cuDNN workspaces
and the CUDA context come on top.
"""

import argparse
import gc
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import adapters  # noqa: E402
import random_models  # noqa: E402
import train_agd  # noqa: E402
import unet  # noqa: E402

GiB = 2 ** 30
HEAD = 64  # channels per attention head in every SDXL level
LIMITS = (16, 24)  # GiB: the aim, and the paper's card


# -----------------------------------------------------------------------------
# measuring


def peak_allocated(fn, device):
    """(fn(), the most bytes allocated at once while it ran, beyond what was allocated before).

    CUDA: torch.cuda's peak statistics. CPU: torch.profiler's memory events, summed in time order.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        out = fn()
        torch.cuda.synchronize(device)
        return out, torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile

    # The profiler remembers the size of every block allocated while any profile ran: one allocated
    # in an earlier profile and freed in this one would count as a free here. Free the garbage first.
    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    # the raw events: FunctionEvent lists attribute allocations to the ops around them, nested ops twice
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return out, peak


def training_rows(model, n, side):
    """n synthetic rows of SDXL trajectories as train() reads them (trajectories.load_shards' keys), fp16 on the CPU."""
    c = model.config
    pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, c.in_channels, side, side, generator=g).half()
    return {"x": x, "target": torch.randn(x.shape, generator=g).half(), "t": torch.randint(0, 1000, (n,), generator=g),
            "w": 1 + 11 * torch.rand(n, generator=g), "traj": torch.arange(n),
            "cond.context": torch.randn(n, 77, c.cross_attention_dim, generator=g).half(),
            "cond.text_embeds": torch.randn(n, pooled, generator=g).half(),
            "cond.time_ids": torch.tensor([[8.0 * side, 8.0 * side, 0, 0, 8.0 * side, 8.0 * side]] * n).half()}


def train(student, rows, batch, steps=2):
    """train_agd.train for `steps` steps of `batch` rows, its checkpoint written to a temporary folder.

    As a fresh run: no gradients before, none after (what it allocated, it frees).
    """
    student.adapters.zero_grad(set_to_none=True)
    hp = train_agd.Training(train_steps=steps, batch_size=batch, lr=1e-4, save_every=10 ** 9)
    try:
        with tempfile.TemporaryDirectory(dir=scratch(student)) as out:
            train_agd.train(student, lambda step: rows, hp, Path(out))
    finally:
        student.adapters.zero_grad(set_to_none=True)


def scratch(student):
    """Where train() may write its last checkpoint (adapters and Adam: 1.5 GB for SDXL): memory, if it has room."""
    need = 4 * 4 * sum(p.numel() for p in student.adapters.parameters())
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() and shutil.disk_usage(shm).free > 2 * need else None


# -----------------------------------------------------------------------------
# narrowed SDXL, and what is counted exactly


def scaled_sdxl(c):
    """SDXL's UNet config with c x its channels (multiples of 32, for the 32 groups), heads of 64 channels."""
    cfg = unet.PRESETS["sdxl"]()
    channels = tuple(round(ch * c) for ch in cfg.block_out_channels)
    if any(ch % cfg.norm_num_groups or (i and ch % HEAD) for i, ch in enumerate(channels)):
        raise ValueError(f"width {c}: channels {channels} are not multiples of 32 (and of {HEAD} past level 0)")
    cfg.block_out_channels = channels
    cfg.attention_head_dim = tuple(max(1, ch // HEAD) for ch in channels)  # level 0 does not attend in SDXL
    return cfg


def counts(cfg, trained=None):
    """Parameter counts of a config's base and default adapters, on the meta device.

    `trained`: the names of the adapter weights that get gradients (None: all).
    """
    with torch.device("meta"):
        model = unet.UNet(cfg)
        student = adapters.attach(model, **random_models.adapter_options("sdxl", model))
    named = dict(student.adapters.named_parameters())
    norms = sum(p.numel() for m in model.modules() if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm))
                for p in m.parameters())
    return dict(base=sum(p.numel() for p in model.parameters()), adapters=sum(p.numel() for p in named.values()),
                trained=sum(named[k].numel() for k in (trained or named)), norms=norms)


def measure(c, side, batch):
    """One narrowed SDXL in fp32: what train() allocated at its peak, and that less the gradients and moments."""
    cfg = scaled_sdxl(c)
    torch.manual_seed(0)
    model = random_models.build(lambda: unet.UNet(cfg), "cpu", torch.float32)
    model.gradient_checkpointing = True  # the SDXL default (families.FAMILIES["sdxl"].train)
    student = adapters.attach(model, **random_models.adapter_options("sdxl", model))
    rows = training_rows(model, batch, side)
    trained = set()  # the adapter weights that get gradients
    for k, p in student.adapters.named_parameters():
        p.register_post_accumulate_grad_hook(lambda p, k=k: trained.add(k))
    start = time.perf_counter()
    _, allocated = peak_allocated(lambda: train(student, rows, batch), "cpu")
    trained = sorted(trained)
    n = counts(cfg, trained)
    return dict(width=c, side=side, batch=batch, channels=list(cfg.block_out_channels), **n,
                allocated=allocated, activations=allocated - 3 * 4 * n["trained"],  # fp32 gradients, 2 moments
                seconds=time.perf_counter() - start, trained_names=trained)


def fit(rows):
    """Least squares activations = a + B (b + g c) through the rows; returns (a, b, g)."""
    X = torch.tensor([[1.0, r["batch"], r["batch"] * r["width"]] for r in rows], dtype=torch.float64)
    y = torch.tensor([[float(r["activations"])] for r in rows], dtype=torch.float64)
    return tuple(torch.linalg.lstsq(X, y).solution[:, 0].tolist())


def predict(coef, c, batch):
    a, b, g = coef
    return a + batch * (b + g * c)


def account(rows):
    """Full-size SDXL at the rows' side: the exact parts, the extrapolated activations, the GPU bound, batches."""
    coef = fit(rows)
    n = counts(scaled_sdxl(1.0), rows[0]["trained_names"])
    fixed = {"base weights (bf16)": 2 * n["base"], "adapter weights (fp32)": 4 * n["adapters"],
             "adapter gradients (fp32)": 4 * n["trained"], "Adam moments (2 x fp32)": 8 * n["trained"]}
    copies = 2 * n["trained"] + 4 * n["norms"]  # autocast's bf16 adapter weights, fp32 norm weights

    def total(batch, bound):  # the GPU bound: 1.5 x the fp32 activations, and autocast's copies
        act = predict(coef, 1.0, batch)
        return sum(fixed.values()) + (1.5 * act + copies if bound else act)

    largest = {}
    for limit in LIMITS:
        B = 0
        while B < 4096 and total(B + 1, bound=True) <= limit * GiB:
            B += 1
        largest[limit] = B
    return dict(side=rows[0]["side"], counts=n, fixed=fixed, fit=coef, activations_fp32=predict(coef, 1.0, 1),
                autocast_copies=copies, total_fp32=total(1, False), bound=total(1, True),
                bound_batch16=total(16, True), largest_batch_within_bound=largest)


# -----------------------------------------------------------------------------
# CLI


def main(args):
    torch.set_num_threads(args.threads)
    results = {"command": "python bench/train_memory.py " + " ".join(sys.argv[1:]), "torch": torch.__version__,
               "rows": []}
    plan = [(c, args.check_side, b) for c, b in ((0.1, 1), (0.2, 1), (0.1, 2), (0.4, 1))] + \
           [(c, args.side, b) for c, b in ((0.1, 1), (0.2, 1), (0.1, 2))]
    for c, side, batch in plan:
        row = measure(c, side, batch)
        results["rows"].append(row)
        print(f"width {c} {tuple(row['channels'])}, {side}x{side} latents, batch {batch}: train() allocated "
              f"{row['allocated'] / GiB:.3f} GiB at its peak; activations {row['activations'] / GiB:.3f} GiB "
              f"({row['seconds']:.0f} s)", flush=True)
    check = [r for r in results["rows"] if r["side"] == args.check_side]
    coef = fit([r for r in check if r["width"] < 0.4])
    wide = next(r for r in check if r["width"] == 0.4)
    results["check"] = dict(side=args.check_side, predicted=predict(coef, 0.4, 1), measured=wide["activations"])
    acc = results["accounting"] = account([r for r in results["rows"] if r["side"] == args.side])
    k = results["check"]
    print(f"\nform check at {args.check_side}x{args.check_side}: fitted on widths 0.1 and 0.2, it predicts width 0.4's "
          f"activations as {k['predicted'] / GiB:.3f} GiB; measured {k['measured'] / GiB:.3f} GiB "
          f"({100 * (k['predicted'] / k['measured'] - 1):+.1f} %)")
    n = acc["counts"]
    print(f"\nfull-size SDXL at {args.side}x{args.side} latents, batch 1 ({n['base']:,} base parameters; adapters "
          f"{n['adapters']:,}, {n['trained']:,} of them trained):")
    for part, nbytes in acc["fixed"].items():
        print(f"  {part:<48} {nbytes / GiB:6.2f} GiB  (counted)")
    print(f"  {'activations and temporaries, fp32 (extrapolated)':<48} {acc['activations_fp32'] / GiB:6.2f} GiB")
    print(f"  {'total, activations in fp32':<48} {acc['total_fp32'] / GiB:6.2f} GiB")
    print(f"  {'GPU bound (1.5 x activations + autocast copies)':<48} {acc['bound'] / GiB:6.2f} GiB")
    print(f"  at batch 16 (the SDXL default) the bound is {acc['bound_batch16'] / GiB:.2f} GiB; the largest batches "
          "within the bound: " + ", ".join(f"{B} under {g} GiB" for g, B in acc["largest_batch_within_bound"].items()))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
        print(f"-> {args.out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=128, help="latent side of the accounting (128: 1024 px)")
    parser.add_argument("--check-side", type=int, default=32, help="latent side of the check of the fit's form")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "train-memory-cpu.json"))
    main(parser.parse_args())
