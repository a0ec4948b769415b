"""The IP-Adapter's own cost on one SDXL AGD step (full size, random weights, CPU).

    flock /tmp/agd-heavy.lock env OMP_NUM_THREADS=2 python bench/bench_ip_adapter.py --runs 3

One AGD step is the student's one UNet pass at batch B (adapters beside every attn2, 320 wide, as
bench_agd.py). With an IP-Adapter (ip-adapter_sdxl's shapes: 4 image tokens, 2048 wide, beside the
same 70 attn2) it is one pass of `adapters.call_with(unet, ip, student)`. Two ways of computing the
decoupled attention are timed: ip_adapter.py's, which folds attn2's to_q into the image keys and its
to_out into the image values once per scope (once per call, as sample.py opens it at every step), and
the direct one of diffusers' processor seen from the hook, to_out.weight @
attention(to_q(x), K_ip, V_ip), which repeats attn2's two T x C x C projections at every call.
Runs take turns, the order rotating; reported are medians, best runs, and each one's cost over AGD;
and, measured inside the same passes, the shares spent preparing the IP-Adapter's scope and in its
hooks, which a busy machine disturbs less than the difference of two passes.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import adapters  # noqa: E402
import ip_adapter  # noqa: E402
import unet  # noqa: E402


class DirectIPAdapter(ip_adapter.IPAdapter):
    """The decoupled attention without the fold: to_out.weight @ (scale * attention(to_q(x), K_ip, V_ip))."""

    def prepare(self, ip_tokens=None, **_):
        return {"tokens": ip_tokens}

    def output(self, i, module, args, output, condition):
        x, tokens = args[0], condition["tokens"].to(args[0].dtype)
        B, T, C = x.shape
        ip, nh = self.ip_adapter[self.numbers[i]], module.heads
        tokens = tokens.expand(B, -1, -1)
        q = module.to_q(x).view(B, T, nh, -1).transpose(1, 2)  # (B, nh, T, hd)
        k = ip.to_k_ip(tokens).view(B, -1, nh, C // nh).transpose(1, 2)  # (B, nh, N, hd)
        v = ip.to_v_ip(tokens).view(B, -1, nh, C // nh).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, C)
        return output + self.scale * F.linear(a, module.to_out[0].weight)


class Timed:
    """Adds up the seconds spent preparing a scope and in the hooks."""

    def prepare(self, **condition):
        start = time.perf_counter()
        out = super().prepare(**condition)
        self.spent["prepare"] += time.perf_counter() - start
        return out

    def output(self, *args):
        start = time.perf_counter()
        out = super().output(*args)
        self.spent["hooks"] += time.perf_counter() - start
        return out


class Folded(Timed, ip_adapter.IPAdapter):
    pass


class Direct(Timed, DirectIPAdapter):
    pass


def seconds(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@torch.no_grad()
def main(args):
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    cfg = unet.PRESETS["sdxl"]()
    model = unet.UNet(cfg).eval().to(dtype)  # PyTorch's default initialization: random, not zero
    S, B, D = args.resolution // 8, args.batch, cfg.cross_attention_dim
    x = torch.randn(B, 4, S, S, dtype=dtype)
    size = torch.tensor([[8 * S, 8 * S, 0, 0, 8 * S, 8 * S]], dtype=dtype).repeat(B, 1)
    cond = {"context": torch.randn(B, 77, D, dtype=dtype), "text_embeds": torch.randn(B, 1280, dtype=dtype),
            "time_ids": size}
    student = adapters.attach(model, hidden_dim=320).to(dtype=dtype)
    for a in student.adapters:  # trained adapters are not zero; the cost is the same either way
        torch.nn.init.normal_(a.out_proj.weight, std=0.02)
    folded = Folded(model, ip_adapter.ImageProjection(1280, D), scale=0.6).to(dtype=dtype)
    direct = Direct(model, folded.image_proj, scale=0.6)
    direct.ip_adapter = folded.ip_adapter  # the same weights, not a second 1.4 GB copy
    tokens = folded.image_proj(torch.randn(B, 1280, dtype=dtype))  # (B, 4, 2048), as from an image
    t, w = torch.full((B,), 500), 5.0
    run = {"agd": lambda: student(x, t, w=w, **cond),
           "agd+ip": lambda: adapters.call_with(model, folded, student)(x, t, w=w, ip_tokens=tokens, **cond),
           "agd+ip direct": lambda: adapters.call_with(model, direct, student)(x, t, w=w, ip_tokens=tokens, **cond)}
    for ip in (folded, direct):
        ip.spent = {"prepare": 0.0, "hooks": 0.0}
    outs = {k: fn() for k, fn in run.items()}  # warm-up, and the two ways agree
    err = ((outs["agd+ip"] - outs["agd+ip direct"]).abs().max() / outs["agd+ip direct"].abs().max()).item()
    moved = ((outs["agd+ip"] - outs["agd"]).abs().max() / outs["agd"].abs().max()).item()
    times = {k: [] for k in run}
    ips = {"agd+ip": folded, "agd+ip direct": direct}
    spent = {k: {"prepare": [], "hooks": []} for k in ips}
    order = list(run)
    for r in tqdm(range(args.runs), desc="runs", leave=False):
        for k in order[r % 3:] + order[:r % 3]:
            if k in ips:
                ips[k].spent = {"prepare": 0.0, "hooks": 0.0}
            times[k].append(seconds(run[k]))
            if k in ips:
                for part, v in ips[k].spent.items():
                    spent[k][part].append(v)
    n_ip = sum(v.numel() for v in folded.ip_state_dict().values())
    n_base = sum(p.numel() for p in model.parameters())
    print(f"CPU, {torch.get_num_threads()} threads, {args.dtype}, torch {torch.__version__}; SDXL {8 * S} px, "
          f"batch {B}; IP-Adapter {n_ip / 1e6:.1f} M parameters ({100 * n_ip / n_base:.1f} % of the UNet) beside "
          f"{len(folded.sites)} attn2; {args.runs} runs")
    print(f"  folded vs direct: max rel. difference {err:.1e}; the IP-Adapter moves the output by {moved:.2f} (rel.)")
    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    for k in run:
        extra = "" if k == "agd" else (f"; over AGD {100 * (med[k] - med['agd']) / med['agd']:.1f} % "
                                       f"(best runs {100 * (best[k] - best['agd']) / best['agd']:.1f} %)")
        print(f"  {k:<14} median {med[k]:.2f} s/step{extra}   runs: " + " ".join(f"{s:.2f}" for s in times[k]))
    for k, parts in spent.items():
        share = {part: [v / step for v, step in zip(values, times[k])] for part, values in parts.items()}
        print(f"  {k:<14} of which preparing the scope {100 * statistics.median(share['prepare']):.1f} %, "
              f"the 70 hooks {100 * statistics.median(share['hooks']):.1f} % (runs: "
              + " ".join(f"{100 * f:.1f}" for f in share["hooks"]) + ")")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=1024, help="image side in pixels (SDXL's native 1024)")
    parser.add_argument("--batch", type=int, default=1, help="B: images per step")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--runs", type=int, default=3, help="timed runs of each")
    main(parser.parse_args())
