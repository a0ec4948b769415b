"""bench/gpu.py and bench/train_memory.py: the GPU run works before a GPU is there; the CPU accounting's tools."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import gpu  # noqa: E402
import train_memory  # noqa: E402

MiB = 2 ** 20


@pytest.mark.slow  # a minute on 2 busy cores: every section on tiny models, each in its own process
def test_the_dry_run_writes_every_section(tmp_path):
    pytest.importorskip("diffusers")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--dry-run", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "gpu-dry-run.json").read_text())
    assert list(results["sections"]) == list(gpu.SECTIONS)
    for name, section in results["sections"].items():
        assert section["status"] == "ok", (name, section)
        assert section["rows"], name
    steps = [r for r in results["sections"]["step_dit"]["rows"]]
    assert {(r["impl"], r["variant"], r["batch"]) for r in steps} == \
        {(i, v, b) for i in ("ours", "diffusers") for v in ("base", "cfg", "agd") for b in (1, 8, 32)}
    search = results["sections"]["train_memory_sdxl"]["rows"][-1]
    assert (search["largest_batch"], search["first_failing_batch"]) == (gpu.DRY_LARGEST, gpu.DRY_LARGEST + 1)
    assert "| sdxl | tiny | 1 | eager | contiguous | ours |" in done.stdout  # the markdown table, tiny in a dry run


def test_a_killed_or_failing_section_is_recorded_and_the_rest_run(tmp_path, monkeypatch):
    def fails(ctx):
        ctx.record(before="the failure")
        raise RuntimeError("out of luck")

    def hangs(ctx):
        ctx.record(before="the hang")
        import time
        time.sleep(60)

    monkeypatch.setitem(gpu.SECTIONS, "fails", (fails, 10))
    monkeypatch.setitem(gpu.SECTIONS, "hangs", (hangs, 10))
    failed = gpu.run_section("fails", True, 30, tmp_path)
    assert failed["status"] == "failed" and failed["error"] == "RuntimeError: out of luck"
    assert failed["rows"] == [{"before": "the failure"}]
    hung = gpu.run_section("hangs", True, 1, tmp_path)
    assert hung["status"].startswith("timed out") and hung["rows"] == [{"before": "the hang"}]
    assert not list(tmp_path.iterdir())  # the part files are gone


def test_the_cpu_peak_is_the_most_bytes_live_at_once():
    def work():
        a = torch.empty(4 * MiB, dtype=torch.uint8)
        b = torch.empty(8 * MiB, dtype=torch.uint8)  # 12 MiB live
        del a
        c = torch.empty(2 * MiB, dtype=torch.uint8)  # 10 MiB live
        return b, c

    _, peak = train_memory.peak_allocated(work, "cpu")
    assert 12 * MiB <= peak < 12 * MiB + 64 * 1024


def test_full_size_counts_and_narrowed_configs():
    n = train_memory.counts(train_memory.scaled_sdxl(1.0))
    assert n["base"] == 2_567_463_684  # SDXL's UNet
    assert n["adapters"] == 125_168_000  # beside its 70 attn2, 320 wide (BENCHMARKS.md: 125.2 M)
    cfg = train_memory.scaled_sdxl(0.2)
    assert cfg.block_out_channels == (64, 128, 256) and cfg.attention_head_dim == (1, 2, 4)
    with pytest.raises(ValueError, match="multiples of 32"):
        train_memory.scaled_sdxl(0.15)


def test_the_fit_recovers_its_form():
    a, b, g = 3e6, 2e5, 7e8
    rows = [{"width": c, "batch": B, "activations": a + B * (b + g * c)} for c, B in ((0.1, 1), (0.2, 1), (0.1, 2))]
    assert train_memory.fit(rows) == pytest.approx((a, b, g), rel=1e-6)
    assert train_memory.predict((a, b, g), 1.0, 16) == pytest.approx(a + 16 * (b + g))
