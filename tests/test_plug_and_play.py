"""Plug and play in the tiny world: the thick style, the teacher's fine-tune, bench/plug_and_play_tiny.py at toy size."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import adapters
import tiny

ROOT = Path(__file__).resolve().parents[1]

spec = importlib.util.spec_from_file_location("plug_and_play_tiny", ROOT / "bench" / "plug_and_play_tiny.py")
plug_and_play = importlib.util.module_from_spec(spec)
spec.loader.exec_module(plug_and_play)


def test_thicken_keeps_the_range_and_makes_strokes_bolder():
    dot = torch.full((1, 1, 28, 28), -1.0)
    dot[0, 0, 0, 0] = dot[0, 0, 10, 10] = 1.0
    assert (tiny.thicken(dot) > 0).sum() == 4 + 9  # a corner pixel grows to 2 x 2, an inner one to 3 x 3
    images, _ = tiny.load_digits()
    images = images[:100]
    thick = tiny.thicken(images)
    assert thick.shape == images.shape and thick.min() >= -1 and thick.max() <= 1
    assert (thick >= images).all()  # a dilation only adds ink
    assert ((thick > 0).sum(dim=(1, 2, 3)) > (images > 0).sum(dim=(1, 2, 3))).all()


def test_finetune_changes_the_weights_and_keeps_the_architecture(tmp_path):
    teacher = tiny.load_teacher()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    images, labels = tiny.load_digits()
    tuned = tiny.finetune_teacher(teacher, tiny.thicken(images[:32]), labels[:32], steps=2, batch_size=8)
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())  # the teacher is left alone
    after = tuned.state_dict()
    assert tuned.config == teacher.config and after.keys() == before.keys()
    assert all(after[k].shape == v.shape for k, v in before.items())
    assert any(not torch.equal(after[k], v) for k, v in before.items())
    tiny.save_teacher(tuned, tmp_path)  # the hub layout, loaded back strictly
    assert torch.equal(tiny.load_teacher(tmp_path).pos_embed, tuned.pos_embed)


def test_script_fine_tunes_evaluates_and_writes_json(tmp_path):
    file = tmp_path / "adapters.safetensors"
    adapters.attach(tiny.load_teacher(), hidden_dim=8).save(file)
    args = plug_and_play.parse_args(["--adapters", str(file), "--finetuned", str(tmp_path / "thick"),
                                     "--finetune-steps", "2", "--eval-w", "2", "--eval-samples", "20",
                                     "--out", str(tmp_path / "pp.json")])
    plug_and_play.main(args)
    assert (tmp_path / "thick" / "transformer" / "config.json").is_file()
    assert "finetune --style thick --steps 2" in (tmp_path / "thick" / "README.md").read_text()
    report = json.loads((tmp_path / "pp.json").read_text())
    assert {"adapters", "finetuned", "style", "finetune_minutes", "eval_w", "eval_samples", "results"} <= set(report)
    rows = {(r["model"], r["method"], r["w"]) for r in report["results"]}
    assert rows == {(m, k, 2.0) for m in ("fine-tuned", "original") for k in ("base", "cfg", "agd")}
    for r in report["results"]:
        assert r["fid"] >= 0 and 0 <= r["accuracy"] <= 1 and r["sec_per_image"] > 0


def test_missing_adapters_is_one_line(tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "plug_and_play_tiny.py"), "--adapters",
                          str(tmp_path / "none.safetensors")], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode != 0 and run.stderr.strip().count("\n") == 0
    assert "none.safetensors" in run.stderr and "train_agd.py" in run.stderr


def test_script_measures_a_lora_of_the_teacher(tmp_path):
    """--lora: the fine-tune is the teacher with the LoRA fused; nothing is fine-tuned, the report names the LoRA."""
    import lora

    file, lora_file = tmp_path / "adapters.safetensors", tmp_path / "thick-lora" / "lora.safetensors"
    teacher = tiny.load_teacher()
    adapters.attach(teacher, hidden_dim=8).save(file)
    lora_file.parent.mkdir()
    (lora_file.parent / "README.md").write_text("made by hand")
    lora.save(lora.attach(teacher, lora.dit_modules(teacher), rank=2), lora_file)
    report = plug_and_play.main(plug_and_play.parse_args(["--adapters", str(file), "--lora", f"{lora_file}:0.5",
                                                          "--eval-w", "2", "--eval-samples", "20"]))
    assert (lora_file.parent / "plug_and_play.json").is_file()
    assert report["lora"]["file"] == str(lora_file) and report["lora"]["multiplier"] == 0.5
    assert report["finetuned_made_by"] == "made by hand" and report["finetune_minutes"] is None
    rows = {(r["model"], r["method"], r["w"]) for r in report["results"]}
    assert rows == {(m, k, 2.0) for m in ("LoRA", "original") for k in ("base", "cfg", "agd")}


def test_fewer_than_two_samples_is_one_line(capsys):
    """A FID needs two samples: the benches refuse one before they fine-tune or sample anything."""
    with pytest.raises(SystemExit):
        plug_and_play.parse_args(["--eval-samples", "1"])
    assert "--eval-samples: 1: need at least 2 samples" in capsys.readouterr().err
    assert plug_and_play.parse_args(["--eval-samples", "2"]).eval_samples == 2
