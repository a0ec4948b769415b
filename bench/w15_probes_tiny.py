"""What holds the tiny adapters' accuracy at w = 1.5 under CFG's: the default adapters with one change each.

    python bench/ablations_tiny.py --out runs/ablations --train-steps 1500        # first: the trajectories
    python bench/w15_probes_tiny.py --ablations runs/ablations --out runs/w15-probes
    python bench/w15_probes_tiny.py --ablations runs/ablations --out runs/w15-probes --only class-gain \\
        --lora runs/tiny-thick-lora8/pytorch_lora_weights.safetensors         # also on the thick LoRA

At w = 1.5 the default adapters are 1.4 points of accuracy under CFG on the bundled teacher and 3.0 on
its thick LoRA (BENCHMARKS.md, "Plug-and-play on a LoRA"), where the whole model distilled on the same
trajectories is 1.0 over it (on the teacher). Each probe trains the default adapters with one change through
bench/ablations_tiny.py's run_variant (the default recipe, the ablation run's trajectories and steps,
cached per probe under --out) and evaluates them as the default run (500 samples, the same noise); with
--lora, on the LoRA'd teacher too, against its own CFG (as bench/plug_and_play_tiny.py). The probes:

- mlp-sites: a cross-attention adapter beside every block's MLP as well (a say in more layers);
- film-mlp: beside every MLP, an adapter that reads the hidden states themselves, not only through
  attention weights over the few condition tokens: up(gelu(down(x)) (1 + scale) + shift), scale and shift
  from (w, t, class); film-mlp-final: also beside the final layer's linear;
- small-w-draws: each batch drawn with row probability proportional to (w - 1)^(-1/2) (41 % of the draws
  at w < 2, against 20 %), as if more trajectories were collected at small w;
- class-gain: each modulation adapter adds a (w, t, class)-dependent gain on the base's own class
  direction in modulation space, (w - 1) [A + G (mod(c) - mod(c_null))]: on a fine-tune, the
  fine-tune's own direction;
- no-factor: no (w - 1) factor on the adapters' output; mse: plain MSE, not the guidance loss.
"""

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import ablations_tiny  # noqa: E402
import adapters  # noqa: E402
import distill  # noqa: E402
import families  # noqa: E402
import guidance  # noqa: E402
import lora  # noqa: E402
import tiny  # noqa: E402
import train_agd  # noqa: E402
import trajectories  # noqa: E402

FILM_RANK = 64  # the film adapters' hidden width: half the tiny teacher's 128
SMALL_W_POWER = 0.5  # small-w-draws: row probability ~ (w - 1)^(-power), w - 1 floored at 0.05


class FiLMAdapter(nn.Module):
    """Reads the hidden states x: up(gelu(down(x)) (1 + scale) + shift), scale and shift from the condition
    tokens (w, t, class) side by side; the output projection zero at init, as every adapter's."""

    def __init__(self, dim, out_dim, cfg):
        super().__init__()
        self.condition = adapters.ConditionEmbedder(cfg)
        tokens = 1 + cfg.use_timestep + bool(cfg.num_classes)
        self.down = nn.Linear(dim, FILM_RANK)
        self.film = nn.Linear(tokens * cfg.hidden_dim, 2 * FILM_RANK)
        self.out_proj = nn.Linear(FILM_RANK, out_dim)

    def forward(self, x, **condition):
        c, _ = self.condition(**condition)
        scale, shift = self.film(c.flatten(1)).chunk(2, -1)  # (B, r) each
        return self.out_proj(F.gelu(self.down(x)) * (1 + scale[:, None]) + shift[:, None])  # (B, T, D)


class ClassGain(nn.Module):
    """A modulation site's two additive adapters: the offset A and the gain G on the class direction."""

    def __init__(self, dim, out_dim, cfg):
        super().__init__()
        self.add = adapters.AdditiveAdapter(dim, out_dim, cfg)
        self.gain = adapters.AdditiveAdapter(dim, out_dim, cfg)
        adapters.init_adapter(self.add)
        adapters.init_adapter(self.gain)


class ClassGainStudent(adapters.Student):
    """The default student whose modulation sites add (w - 1) [A + G (mod(c) - mod(c_null))]."""

    def __init__(self, model, sites, cfg):
        super().__init__(model, sites, cfg)
        for i, s in enumerate(self.sites):
            if s.kind == "vector":
                self.adapters[i] = ClassGain(s.in_dim, s.out_dim, cfg)

    def output(self, i, module, args, output, condition):
        if self.sites[i].kind != "vector":
            return super().output(i, module, args, output, condition)
        c, w, y = args[0], condition["w"], condition["y"]  # c = t_emb + y_emb (B, D): the modulation's input
        table = self.model.y_embedder.embedding_table
        c_null = c - table(y) + table(torch.full_like(y, self.model.config.num_classes))
        linear = module[1]  # adaLN_modulation = (SiLU, Linear); called directly, not through this hook again
        direction = output - F.linear(F.silu(c_null), linear.weight, linear.bias)  # (B, out)
        a = self.adapters[i]
        delta = a.add(c, **condition)[:, 0] + a.gain(c, **condition)[:, 0] * direction
        return output + delta * (w - 1)[:, None]


def build(probe, model, base, seed):
    """A fresh student of a probe on `model` (the teacher, or the LoRA'd one), seeded as the ablations'."""
    torch.manual_seed(seed)
    options = base.adapter_options(**ablations_tiny.default_options(**({"zero_at_w1": False} if probe == "no-factor"
                                                                       else {})))
    D, depth = model.config.hidden_size, model.config.depth
    sites = families.dit_sites(model, True)
    if probe == "class-gain":
        return ClassGainStudent(model, sites, adapters.AdapterConfig(**options))
    extra = []
    if probe in ("mlp-sites", "film-mlp", "film-mlp-final"):
        extra += [adapters.Site(f"blocks.{i}.mlp", "tokens", D, D) for i in range(depth)]
    if probe == "film-mlp-final":
        extra += [adapters.Site("final_layer.linear", "tokens", D, model.final_layer.linear.out_features)]
    student = adapters.attach(model, sites=sites + extra, **options)
    if probe.startswith("film"):
        for i in range(len(sites), len(student.sites)):
            student.adapters[i] = FiLMAdapter(student.sites[i].in_dim, student.sites[i].out_dim, student.config)
            adapters.init_adapter(student.adapters[i])
    return student


PROBES = ["mlp-sites", "film-mlp", "film-mlp-final", "small-w-draws", "class-gain", "no-factor", "mse"]


def small_w_rows(w):
    """small-w-draws' batch_rows: the rows of a batch drawn with probability ~ (w - 1)^(-power)."""
    prob = ((w.float() - 1).clamp(min=0.05) ** -SMALL_W_POWER).double()
    prob /= prob.sum()

    def batch_rows(n_rows, batch, seed, rank, step):
        g = torch.Generator().manual_seed(distill.seed_of(seed, rank, step))  # as train_agd.batch_rows seeds
        return torch.multinomial(prob, batch, replacement=True, generator=g)

    return batch_rows


def run_probe(world, probe, ws):
    """Train (resumably, cached) and evaluate one probe on the teacher, through run_variant."""
    world.student = lambda name, options: (build(probe, world.base.model, world.base, world.args.seed), None)
    hp, rows = world.hp, train_agd.batch_rows
    if probe == "mse":
        world.hp = dataclasses.replace(hp, loss="mse")
    if probe == "small-w-draws":
        train_agd.batch_rows = small_w_rows(world.data("default")["w"])
    try:
        return ablations_tiny.run_variant(world, probe, ablations_tiny.default_options(), ws)
    finally:
        world.hp, train_agd.batch_rows = hp, rows


def lora_world(lora_file, classifier):
    """The LoRA'd teacher (the LoRA fused, as sample.py --lora loads it) and its style's FID statistics, once."""
    base = families.load("tiny", tiny.TEACHER)
    lora.apply(base.lora_models(), [(Path(lora_file), 1.0)], undoable=False)
    digits, _ = tiny.load_digits()
    return base, tiny.reference_statistics(classifier, tiny.STYLES["thick"](digits))


def on_lora(world, probe, lora_file, base, reference, ws, samples):
    """The probe's trained adapters on the LoRA'd teacher against its CFG (plug_and_play_tiny's setting), cached."""
    file = world.out / "variants" / probe / "lora.json"
    cached = json.loads(file.read_text()) if file.is_file() else None
    if cached is not None and cached["lora"] == str(lora_file):  # another LoRA: measured anew
        return cached
    student = build(probe, base.model, base, world.args.seed)
    state = torch.load(world.out / "variants" / probe / "train_state.pt", map_location="cpu", weights_only=True)
    student.load_adapter_state_dict(state["adapters"])
    student.eval()
    denoisers = {}
    for w in ws:
        denoisers[("cfg", w)] = lambda cond, null, w=w: guidance.guided(base.model, w, cond, null)
        denoisers[("agd", w)] = lambda cond, null, w=w: (lambda x, t: student(x, t, w=w, **cond))
    with torch.no_grad():
        images, _ = tiny.generate(base, denoisers, world.plan.steps, samples, world.args.seed + 1, world.args.batch)
    student.detach()  # the LoRA'd teacher is shared by the next probe
    labels = torch.arange(samples) % tiny.NUM_CLASSES
    rows = [{"w": w, "cfg": tiny.score(world.classifier, images[("cfg", w)], reference, labels),
             "agd": tiny.score(world.classifier, images[("agd", w)], reference, labels),
             "accuracy_vs_cfg": tiny.accuracy_against(world.classifier, images[("agd", w)], images[("cfg", w)], labels)}
            for w in ws]
    ablations_tiny.write_json(file, {"lora": str(lora_file), "rows": rows})
    return json.loads(file.read_text())


def main(args):
    start = time.time()
    folder = Path(args.ablations) / "trajectories"
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no trajectories (run bench/ablations_tiny.py --out {args.ablations} first)")
    world = ablations_tiny.World(ablations_tiny.parse_args(
        ["--out", args.ablations, "--train-steps", str(args.train_steps), "--samples", str(args.samples)]))
    ablations_tiny.check_settings(argparse.Namespace(**{**vars(world.args), "out": args.out}))  # no mixed caches
    world.out = Path(args.out)
    world._data["trajectories"] = trajectories.load_shards(folder)
    report = {"ablations": args.ablations, "train_steps": args.train_steps, "samples": args.samples, "probes": {}}
    lora_base, reference = lora_world(args.lora, world.classifier) if args.lora else (None, None)
    for probe in args.only or PROBES:
        result = run_probe(world, probe, args.w)
        if args.lora:
            result["lora"] = on_lora(world, probe, args.lora, lora_base, reference, args.w, args.samples)
        report["probes"][probe] = result
        print(f"{probe:<16} {result['trainable_parameters']:>9,} " + "  ".join(
            f"w={r['w']:g}: {r['fid']:.2f} / {r['accuracy']:.3f}" for r in result["rows"]), flush=True)
        for r in result.get("lora", {}).get("rows", []):
            vs = r["accuracy_vs_cfg"]
            print(f"{'':<16} LoRA w={r['w']:g}: FID {r['agd']['fid']:.2f} vs CFG's {r['cfg']['fid']:.2f}, accuracy "
                  f"{vs['points']:+.1f} +- {vs['se_points']:.1f} points", flush=True)
    report["minutes"] = (time.time() - start) / 60
    ablations_tiny.write_json(world.out / "probes.json", report)
    print(f"-> {world.out / 'probes.json'} ({report['minutes']:.1f} min)")
    return report


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ablations", default="runs/ablations", help="an ablations_tiny.py --out: its trajectories")
    p.add_argument("--out", default="runs/w15-probes", help="output folder; what is in it is reused")
    p.add_argument("--only", nargs="+", choices=PROBES, help="these probes only (default: all)")
    p.add_argument("--train-steps", type=int, default=families.FAMILIES["tiny"].train["train_steps"],
                   help="per probe (default: the default run's)")
    p.add_argument("--samples", type=tiny.sample_count, default=500, help="per row")
    p.add_argument("--w", type=float, nargs="+", default=[1.5, 3.0, 5.0])
    p.add_argument("--lora", help="also evaluate each probe on the teacher with this LoRA (the thick one)")
    return p.parse_args(argv)


if __name__ == "__main__":
    try:
        main(parse_args())
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
