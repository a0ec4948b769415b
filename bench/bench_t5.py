"""Peak resident memory of loading T5-XXL (SD3's text_encoder_3) in bf16 from a file of random weights.

    python bench/bench_t5.py                        # an fp16 file in two shards, as the SD3 repos hold it
    python bench/bench_t5.py --file-dtype fp32      # from fp32 (19 GB on disk)

Writes text_encoder_3/ (config.json, model.safetensors.index.json and two shards, tensor by tensor:
never whole in memory) to a scratch folder, loads it with `t5.T5Encoder.from_pretrained(folder,
dtype=torch.bfloat16)` in a fresh process, reads the kernel's peak (`VmHWM`) and samples its
anonymous and file-backed parts, then deletes the folder. Run under the heavy lock:
`flock /tmp/agd-heavy.lock python bench/bench_t5.py`.
"""

import argparse
import json
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import t5  # noqa: E402
from bench_unet import measure_load  # noqa: E402

FILE_DTYPES = {"fp16": (torch.float16, "F16"), "bf16": (torch.bfloat16, "BF16"), "fp32": (torch.float32, "F32")}

# text_encoder_3/config.json of stabilityai/stable-diffusion-3-medium-diffusers: the keys t5.py reads
CONFIG = {"architectures": ["T5EncoderModel"], "d_ff": 10240, "d_kv": 64, "d_model": 4096, "dense_act_fn": "gelu_new",
          "feed_forward_proj": "gated-gelu", "is_gated_act": True, "layer_norm_epsilon": 1e-06, "model_type": "t5",
          "num_heads": 64, "num_layers": 24, "relative_attention_max_distance": 128,
          "relative_attention_num_buckets": 32, "vocab_size": 32128}


def write_shard(file, shapes, dtype, tag, g):
    """One safetensors file of random tensors, written tensor by tensor: 8-byte header size, JSON header, raw data."""
    header, offset = {}, 0
    size = torch.empty((), dtype=dtype).element_size()
    for key, shape in shapes.items():
        n = size * torch.Size(shape).numel()
        header[key] = {"dtype": tag, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)  # tensor data 8-byte aligned
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for shape in shapes.values():
            f.write(torch.randn(shape, generator=g).mul_(0.02).to(dtype).view(torch.uint8).numpy().tobytes())
    return offset


def write_random_folder(folder, file_dtype):
    """text_encoder_3/ of random T5-XXL weights, two shards and their index as the hub's; returns the bytes written."""
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in t5.T5Encoder(t5.T5Config.from_hub(CONFIG)).state_dict().items()}
    dtype, tag = FILE_DTYPES[file_dtype]
    keys = list(shapes)
    halves = {"model-00001-of-00002.safetensors": keys[:len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(CONFIG))
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: name for name, ks in halves.items() for k in ks}}))
    g = torch.Generator().manual_seed(0)
    return sum(write_shard(folder / name, {k: shapes[k] for k in ks}, dtype, tag, g) for name, ks in halves.items())


def load_child(args):
    """In a fresh process: load the folder in bf16, report peak resident memory as JSON (bench_unet's measure)."""
    model, figures = measure_load(lambda: t5.T5Encoder.from_pretrained(args.path, dtype=torch.bfloat16))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    print(json.dumps(figures))


def load_memory(args):
    folder = Path(args.tmp) / "text_encoder_3"
    try:
        print(f"writing random T5-XXL weights ({args.file_dtype}, two shards) to {folder} ...", flush=True)
        start = time.perf_counter()
        size = write_random_folder(folder, args.file_dtype)
        print(f"  {size / 1e9:.2f} GB in {time.perf_counter() - start:.0f} s", flush=True)
        for run in range(args.runs):
            out = subprocess.run([sys.executable, __file__, "--child", str(folder)],
                                 check=True, capture_output=True, text=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            gib, weights = 1024 ** 2, r["weights_bytes"] / 1024 ** 3
            peak, before = r["peak_kib"] / gib, r["before_kib"] / gib
            print(f"run {run + 1}: bf16 weights {weights:.2f} GiB; peak RSS {peak:.2f} GiB, of which {before:.2f} GiB "
                  f"before loading (python, torch); loading added {peak - before:.2f} GiB = "
                  f"{(peak - before) / weights:.3f} x the bf16 weights "
                  f"(peak anon {r['peak_RssAnon_kib'] / gib:.2f} GiB, "
                  f"peak file-backed {r['peak_RssFile_kib'] / gib:.2f} GiB, sampled); {r['seconds']:.0f} s", flush=True)
    finally:
        shutil.rmtree(args.tmp, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--file-dtype", default="fp16", choices=list(FILE_DTYPES), help="dtype of the weights on disk")
    parser.add_argument("--tmp", default="/tmp/agd_bench_t5", help="scratch folder for the file (deleted after)")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: the measured process loads this folder
    args = parser.parse_args()
    if args.child:
        args.path = args.child
        load_child(args)
    else:
        load_memory(args)
