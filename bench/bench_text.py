"""text_encoders.py against transformers on the CPU: tokenizing and encoding a batch of prompts.

    python bench/bench_text.py --preset ViT-L/14 --batch 64 --repeats 3

Random full-size weights (the same in both), the real CLIP tokenizer from assets/clip.
"""

import argparse
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import checkpoint  # noqa: E402
import text_encoders as te  # noqa: E402

TOKENIZER = ROOT / "assets" / "clip" / "tokenizer_pad_bang"


def prompts(n, seed=0):
    """n prompts as people write them: short to over-long, some punctuation, a few non-English words."""
    rng = random.Random(seed)
    subjects = ["an astronaut riding a horse", "a corgi wearing sunglasses", "a bowl of ramen", "東京の夜景",
                "a lighthouse in a storm", "a portrait of an old fisherman", "a café in Paris at dawn"]
    styles = ["oil painting", "35mm photo", "watercolor", "isometric 3D render", "ukiyo-e", "pixel art"]
    extras = ["highly detailed", "8k", "trending on artstation", "soft light", "(masterpiece:1.2)",
              "golden hour", "bokeh", "by Greg Rutkowski", "sharp focus", "wide angle!"]
    return [", ".join([rng.choice(subjects), rng.choice(styles)] + rng.sample(extras, rng.randint(0, len(extras))))
            * rng.choice([1, 1, 1, 3]) for _ in range(n)]


def seconds(fn, repeats, calls=1):
    """Best wall time per call over `repeats` rounds of `calls` calls (after one warm-up call)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best


def main(args):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    batch = prompts(args.batch)
    print(f"{args.batch} prompts, {torch.get_num_threads()} threads, torch {torch.__version__}")

    ours_tok, ref_tok = te.Tokenizer.from_pretrained(TOKENIZER), CLIPTokenizer.from_pretrained(TOKENIZER)

    def ref_ids():
        return ref_tok(batch, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids

    ids = ours_tok(batch)
    assert torch.equal(ids, ref_ids()), "token ids differ"
    t_ours = seconds(lambda: ours_tok(batch), args.repeats, calls=20)
    t_ref = seconds(ref_ids, args.repeats, calls=20)
    print(f"  tokenize: ours {t_ours * 1e3:.2f} ms, transformers {t_ref * 1e3:.2f} ms "
          f"(ours / transformers {t_ours / t_ref:.2f}), ids identical")

    torch.manual_seed(0)
    cfg = te.PRESETS[args.preset]()
    if args.layers:
        cfg.num_hidden_layers = args.layers
    fields = {k: v for k, v in vars(cfg).items() if k != "with_projection"}
    ref = (CLIPTextModelWithProjection if cfg.with_projection else CLIPTextModel)(CLIPTextConfig(**fields)).eval()
    with torch.device("meta"):
        ours = te.TextEncoder(cfg)
    checkpoint.load_into(ours, te.official_keys(ref.state_dict()), source="transformers").eval()
    print(f"{args.preset} ({cfg.num_hidden_layers} layers): {sum(p.numel() for p in ours.parameters()):,} parameters")
    with torch.no_grad():
        last, penultimate, pooled = ours(ids)
        out = ref(ids, output_hidden_states=True)
        expected_pooled = out.text_embeds if cfg.with_projection else out.pooler_output
        for name, a, b in [("last hidden state", last, out.last_hidden_state),
                           ("penultimate", penultimate, out.hidden_states[-2]), ("pooled", pooled, expected_pooled)]:
            print(f"  {name:18s} max abs error {(a - b).abs().max().item():.2e} (values up to "
                  f"{b.abs().max().item():.2f})")
        t_ours = seconds(lambda: ours(ids), args.repeats)
        t_ref = seconds(lambda: ref(ids, output_hidden_states=True), args.repeats)
    print(f"  encode: ours {t_ours:.2f} s, transformers {t_ref:.2f} s (ours / transformers {t_ours / t_ref:.2f})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="ViT-L/14", choices=list(te.PRESETS))
    parser.add_argument("--batch", type=int, default=64, help="number of prompts")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds; the best is reported")
    parser.add_argument("--layers", type=int, default=0, help="keep only this many layers (0: all), for a quick run")
    main(parser.parse_args())
