"""bench/controlnet_tiny.py end to end on a few samples: metrics.json in the issue's schema and the grid, a
ControlNet that changes the samples (rows with and without it differ), methods from the same noise."""

import json
import sys
from pathlib import Path

import torch

import adapters
import controlnet
import tiny

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import controlnet_tiny  # noqa: E402


def test_metrics_and_grid(tmp_path):
    teacher = tiny.load_teacher()
    net = controlnet.DiTControlNet.from_dit(teacher)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # off the zero-inits: a ControlNet that acts
        for p in [*net.pos_embed_input.parameters(), *net.controlnet_blocks.parameters()]:
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    controlnet.save_pretrained(net, tmp_path / "cn")
    adapters.attach(teacher, hidden_dim=8, use_timestep=True, num_classes=11).save(tmp_path / "a.st")
    args = controlnet_tiny.parse_args(["--out", str(tmp_path / "out"), "--adapters", str(tmp_path / "a.st"),
                                       "--controlnet", str(tmp_path / "cn"), "--eval-w", "3", "--samples", "10",
                                       "--batch-size", "10"])
    controlnet_tiny.main(args)
    report = json.loads((tmp_path / "out" / "metrics.json").read_text())
    rows = {(r["method"], r["controlnet"]): r for r in report["results"]}
    assert sorted(rows) == [("agd", False), ("agd", True), ("cfg", False), ("cfg", True)]
    for r in report["results"]:
        assert set(r) == {"method", "controlnet", "w", "fid", "accuracy", "control_fidelity", "sec_per_image"}
        assert r["w"] == 3.0 and 0 <= r["accuracy"] <= 1 and 0 <= r["control_fidelity"] <= 1 and r["fid"] >= 0
    assert rows[("cfg", True)]["fid"] != rows[("cfg", False)]["fid"]  # the ControlNet acted
    assert rows[("agd", False)]["fid"] != rows[("cfg", False)]["fid"]  # fresh adapters at w = 3 are not CFG
    assert [h["w"] for h in report["held"]] == [3.0]
    assert (tmp_path / "out" / "samples.png").stat().st_size > 0
