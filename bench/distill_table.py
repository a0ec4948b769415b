"""The step distillation table of BENCHMARKS.md from a run's metrics.json (train_agd.py --distill-steps).

    python bench/distill_table.py runs/distill-tiny-3/metrics.json [--bound-steps 6]

Prints the rows as markdown (method, steps, w, digit FID, accuracy, ms / image), then, at --bound-steps,
the issue's bounds for "agd-distilled" against CFG at the reference sampler: FID at most 1.15 x,
accuracy at most 2 points below, time at most 0.15 x; and the diagnosis of each round.
"""

import argparse
import json

NAMES = {"cfg": "CFG", "agd": "AGD", "agd-distilled": "AGD distilled"}


def main(args):
    metrics = json.loads(open(args.metrics).read())
    rows = metrics["results"]
    reference_steps = max(r["steps"] for r in rows if r["method"] == "cfg")
    ref = {r["w"]: r for r in rows if r["method"] == "cfg" and r["steps"] == reference_steps}
    print("| method | steps | w | digit FID | accuracy | ms / image |\n| --- | --- | --- | --- | --- | --- |")
    for r in sorted(rows, key=lambda r: (r["w"], -r["steps"], list(NAMES).index(r["method"]))):
        sampler = " (DDPM, reference)" if r["steps"] == reference_steps and r["method"] == "cfg" else ""
        print(f"| {NAMES[r['method']]}{sampler} | {r['steps']} | {r['w']:g} | {r['fid']:.1f} | {r['accuracy']:.3f} "
              f"| {1000 * r['sec_per_image']:.1f} |")
    print(f"\nBounds at {args.bound_steps} steps (AGD distilled against CFG at {reference_steps} steps):")
    for r in rows:
        if r["method"] == "agd-distilled" and r["steps"] == args.bound_steps:
            c = ref[r["w"]]
            fid, time = r["fid"] / c["fid"], r["sec_per_image"] / c["sec_per_image"]
            acc = 100 * (r["accuracy"] - c["accuracy"])
            ok = lambda good: "holds" if good else "FAILS"  # noqa: E731
            print(f"- w = {r['w']:g}: FID {fid:.2f} x ({ok(fid <= 1.15)}), accuracy {acc:+.1f} points "
                  f"({ok(acc >= -2)}), time {time:.3f} x ({ok(time <= 0.15)})")
    print("\nWhat each round's one step reproduces of the change its teacher's two steps need (unseen shard):")
    for d in metrics.get("distillation", []):
        per_step = ", ".join(f"{s['coefficient']:.2f}" for s in d["per_step"])
        print(f"- {2 * d['steps']} -> {d['steps']} steps: coefficient {d['coefficient']:.2f}, residual "
              f"{d['residual']:.2f}; per step from t = 999: {per_step}")
    print(f"\n{metrics.get('adapter_parameters', 0):,} adapter parameters against the base's "
          f"{metrics.get('base_parameters', 0):,}; {metrics.get('minutes', 0):.1f} minutes")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("metrics")
    p.add_argument("--bound-steps", type=int, default=6)
    main(p.parse_args())
