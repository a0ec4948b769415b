"""Plug and play in the tiny world: adapters trained on the tiny teacher, used on a fine-tune of it.

    python train_agd.py                     # adapters of the bundled teacher -> runs/tiny/adapters.safetensors
    python bench/plug_and_play_tiny.py      # fine-tunes the teacher on thick digits first if runs/tiny-thick is missing
    python tiny.py finetune --style thick --lora 8   # or a LoRA of it -> runs/tiny-thick-lora8/
    python bench/plug_and_play_tiny.py --lora runs/tiny-thick-lora8/pytorch_lora_weights.safetensors

Adapters are trained on a base model and, like a LoRA, are meant to load onto fine-tuned checkpoints
of it (Jensen & Sadat 2025; DESIGN.md, "Adapters"). Here the tiny teacher is fine-tuned briefly on
thickened digits (`python tiny.py finetune --style thick`), the adapters trained on the original are
attached to it unchanged, and AGD is compared with the fine-tune's own CFG from the same noise
(tiny.evaluate): digit FID against the thickened real digits, and class accuracy. The original
teacher with the same adapters is measured too, for reference, its FID against the plain digits.
With --lora, the fine-tune is the teacher with that LoRA fused into it (lora.py), as sample.py --lora
loads one.
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import adapters  # noqa: E402
import checkpoint  # noqa: E402
import families  # noqa: E402
import lora  # noqa: E402
import tiny  # noqa: E402

STYLE = "thick"  # the fine-tune's style, and so its FID's reference set


def measure(weights, adapters_file, reference, args, loras=()):
    """tiny.evaluate on `weights` (with `loras` fused) with the adapters attached: base, CFG and AGD at each w,
    same noise, as train_agd.py evaluates (its seed + 1, its sampler steps)."""
    base = families.load("tiny", weights)
    lora.apply(base.lora_models(), loras, undoable=False)
    student = adapters.load(base.model, adapters_file).eval()
    results, _ = tiny.evaluate(base, student, families.FAMILIES["tiny"].train["steps"], args.eval_w,
                               args.eval_samples, seed=1, reference=reference)
    return results


def print_table(rows):
    """The rows; AGD's last column: its accuracy against CFG's, in points, +- its paired standard error."""
    print(f"{'model':<10} {'w':>4} {'method':<6} {'FID':>8} {'accuracy':>9} {'ms/image':>9} {'vs CFG (points)':>16}")
    for r in rows:
        vs = r.get("accuracy_vs_cfg")
        print(f"{r['model']:<10} {r['w']:>4.1f} {r['method']:<6} {r['fid']:>8.2f} {r['accuracy']:>9.3f} "
              f"{1000 * r['sec_per_image']:>9.1f} " + (f"{vs['points']:>+9.1f} +- {vs['se_points']:.1f}" if vs else ""))


def main(args):
    start = time.time()
    adapters_file, loras = Path(args.adapters), [args.lora] if args.lora else []
    folder = args.lora[0].parent if loras else Path(args.finetuned)  # the fine-tune's, with its README
    out = Path(args.out or folder / "plug_and_play.json")
    if not adapters_file.is_file():
        raise FileNotFoundError(f"{adapters_file}: no such adapters file (train them with `python train_agd.py`)")
    if loras and not args.lora[0].is_file():
        raise FileNotFoundError(f"{args.lora[0]}: no such LoRA file (train one with `python tiny.py finetune "
                                f"--style {STYLE} --lora 8`)")
    finetune_minutes = None
    if not loras and not (folder / "transformer").is_dir():  # tiny.py writes the weights only when done
        tiny.main(tiny.parse_args(["finetune", "--style", STYLE, "--steps", str(args.finetune_steps),
                                   "--out", str(folder)]))
        finetune_minutes = (time.time() - start) / 60
    classifier = tiny.load_classifier()
    digits, _ = tiny.load_digits()
    styled = tiny.reference_statistics(classifier, tiny.STYLES[STYLE](digits))
    weights, name = (tiny.TEACHER, "LoRA") if loras else (folder, "fine-tuned")
    rows = [{"model": name, **r} for r in measure(weights, adapters_file, styled, args, loras)]
    rows += [{"model": "original", **r} for r in measure(tiny.TEACHER, adapters_file, None, args)]
    made_by = folder / "README.md"
    report = {"adapters": str(adapters_file), "finetuned": str(folder), "style": STYLE,
              "lora": json.loads(lora.record(loras))[0] if loras else None,
              "finetuned_made_by": made_by.read_text().strip() if made_by.is_file() else None,
              "finetune_minutes": finetune_minutes, "eval_w": args.eval_w, "eval_samples": args.eval_samples,
              "reference": {name: f"the 5,000 real digits, tiny.{tiny.STYLES[STYLE].__name__}",
                            "original": "the 5,000 real digits"},
              "results": rows, "minutes": (time.time() - start) / 60}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print_table(rows)
    print(f"-> {out} ({report['minutes']:.1f} min)")
    return report


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--adapters", default="runs/tiny/adapters.safetensors",
                   help="adapters trained on the original teacher (`python train_agd.py`)")
    p.add_argument("--finetuned", default=f"runs/tiny-{STYLE}",
                   help=f"the fine-tuned teacher; if missing, the bundled one is fine-tuned on {STYLE} digits into it")
    p.add_argument("--finetune-steps", type=int, default=500, help="steps of that fine-tune")
    p.add_argument("--lora", type=lora.spec_argument, metavar="FILE[:MULTIPLIER]",
                   help="the fine-tune is the bundled teacher with this LoRA (`python tiny.py finetune --style "
                        f"{STYLE} --lora 8`), in place of --finetuned")
    p.add_argument("--eval-w", type=float, nargs="+", default=[1.5, 3.0, 5.0])
    p.add_argument("--eval-samples", type=tiny.sample_count, default=500)
    p.add_argument("--out", default=None, help="json file (default: <finetuned>/plug_and_play.json, or beside "
                   "the LoRA file)")
    return p.parse_args(argv)


if __name__ == "__main__":
    try:
        main(parse_args())
    except (checkpoint.CheckpointError, FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
