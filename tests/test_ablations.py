"""The paper's experiments in the tiny world (bench/ablations_tiny.py) at toy size, and DiT's own CFG.

- every experiment's code path runs end to end and writes its rows and plots;
- standard pairs are real digits noised by the forward process, with the base's CFG output as target;
- the whole-model baseline trains every parameter of a copy and leaves the teacher's file as it was;
- --cfg-channels 3 is facebookresearch/DiT's forward_with_cfg, its arithmetic written out here.
"""

import hashlib
import importlib.util
import sys

import pytest
import torch

import dit
import families
import guidance
import sample
import tiny
import trajectories
import train_agd
from util import max_rel_err

spec = importlib.util.spec_from_file_location("ablations_tiny", families.ROOT / "bench" / "ablations_tiny.py")
ablations = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ablations)
sys.modules["ablations_tiny"] = ablations  # its worker processes import it by name (bench/ on their path)

TOY = ["--trajectories", "10", "--train-steps", "2", "--samples", "10", "--batch", "10", "--steps", "4"]


def test_every_experiment_runs_end_to_end_and_a_rerun_reuses_it(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(families.ROOT / "bench"))  # for the two worker processes (--jobs 2)
    report = ablations.run(ablations.parse_args(["--out", str(tmp_path), *TOY, "--jobs", "2"]))
    assert report["jobs"] == 2 and len(list(tmp_path.glob("worker-*.log"))) == 2  # their progress bars
    rows = report["results"]
    assert {r["experiment"] for r in rows} == {"reference", *ablations.EXPERIMENTS}
    variants = {(r["experiment"], r["variant"]) for r in rows}
    assert ("data", "standard (forward-noised real digits)") in variants and ("full", "whole model") in variants
    assert {r["w"] for r in rows if r["experiment"] == "unseen"} == {7.0, 8.0}
    assert {r["variant"] for r in rows if r["experiment"] == "storage"} == {f"keep {k} of 25" for k in (2, 4, 8, 25)}
    params = {r["variant"]: r["trainable_parameters"] for r in rows if r["experiment"] in ("arch", "full")}
    assert params["cross-attention (w)"] < params["cross-attention (w, t, class)"] < params["tiny default (+ modulation)"]
    assert params["whole model"] > sum(p.numel() for p in tiny.load_teacher().parameters())
    assert all((tmp_path / f"{e}.png").is_file() for e in ablations.EXPERIMENTS)
    again = ablations.run(ablations.parse_args(["--out", str(tmp_path), *TOY, "--only", "storage", "--jobs", "1"]))
    first = [r for r in rows if r["experiment"] == "storage"]
    assert [r for r in again["results"] if r["experiment"] == "storage"] == first  # cached, not recomputed
    with pytest.raises(ValueError, match="--train-steps 2"):  # a cache measured otherwise is refused
        ablations.run(ablations.parse_args(["--out", str(tmp_path), *TOY, "--train-steps", "3"]))
    (tmp_path / "settings.json").unlink()  # a folder of before settings.json: its metrics.json says
    with pytest.raises(ValueError, match="--train-steps 2"):
        ablations.run(ablations.parse_args(["--out", str(tmp_path), *TOY, "--train-steps", "3"]))


def test_standard_pairs_are_noised_real_digits_with_cfg_targets():
    base = families.load("tiny")
    plan = trajectories.Collection(trajectories=10, steps=4, shard_size=10, seed=0)
    digits, labels = tiny.load_digits()
    shard = trajectories.standard_shard(base, plan, 0, digits, labels)
    timesteps = base.scheduler.timesteps(4)
    assert sorted(set(shard["t"].tolist())) == sorted(timesteps.tolist())
    last = shard["t"] == timesteps[-1]  # t = 0: barely noised, so the real digit of the row's class shows
    x0, y = shard["x"][last].float(), shard["cond.y"][shard["traj"][last]]
    nearest = torch.cdist(x0.flatten(1), digits.flatten(1)).min(1)
    assert nearest.values.max() < 0.2 * 28 and torch.equal(labels[nearest.indices], y)  # a real digit, its class
    with torch.no_grad():
        target = guidance.guided(base.model, shard["w"], {"y": shard["cond.y"][shard["traj"]]},
                                 base.null(len(shard["w"])))(shard["x"].float(), shard["t"])
    assert max_rel_err(shard["target"].float(), target) < 1e-3  # the pairs as computed, stored in fp16


def test_the_whole_model_baseline_trains_a_copy(tmp_path):
    file = tiny.TEACHER / "transformer" / "diffusion_pytorch_model.safetensors"
    digest = hashlib.sha256(file.read_bytes()).hexdigest()
    world = ablations.World(ablations.parse_args(["--out", str(tmp_path), *TOY]))
    student, params = world.student("whole model", None)
    before = {k: v.clone() for k, v in student.model.state_dict().items()}
    data = world.data("default")
    train_agd.train(student, lambda step: data, world.hp, tmp_path, params=params)
    moved = [k for k, v in student.model.state_dict().items() if not torch.equal(v, before[k])]
    assert set(moved) == {k for k, p in student.model.named_parameters()}  # every base parameter trained
    assert hashlib.sha256(file.read_bytes()).hexdigest() == digest  # the teacher's file as it was
    teacher = families.load("tiny").model
    assert all(torch.equal(teacher.state_dict()[k], v) for k, v in world.base.model.state_dict().items())


def forward_with_cfg(model, x, t, y, cfg_scale):
    """facebookresearch/DiT's models.py DiT.forward_with_cfg, its arithmetic written out: the first half of
    the batch twice, the first 3 channels guided, the rest (the 4th epsilon channel, the variance) as the
    model gave them."""
    half = x[: len(x) // 2]
    out = model(torch.cat([half, half]), t, y)
    eps, rest = out[:, :3], out[:, 3:]
    cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
    half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
    return torch.cat([torch.cat([half_eps, half_eps]), rest], dim=1)


@pytest.mark.parametrize("w", [1.5, 4.0])
def test_cfg_channels_3_is_dits_own_cfg(w, tmp_path):
    torch.manual_seed(0)
    model = dit.DiT(dit.DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2,
                                  num_classes=5, freq_shift=1)).eval()  # 4 latent channels, as DiT-XL/2's
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([3, 400, 999]), torch.tensor([0, 4, 2])
    null = torch.full_like(y, 5)
    with torch.no_grad():
        ours = sample.denoiser(model, {"y": y}, {"y": null}, cfg_scale=w, channels=3)(x, t)
        expected = forward_with_cfg(model, torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]), w)[:3]
        every = sample.denoiser(model, {"y": y}, {"y": null}, cfg_scale=w)(x, t)
    assert max_rel_err(ours, expected) < 1e-6
    assert max_rel_err(every, expected) > 1e-3  # guiding all 4 channels differs: the test could fail
    dit.save_pretrained(model, tmp_path / "transformer")
    assert families.load("dit", tmp_path, cfg_channels=3).cfg_channels == 3  # what sample.py and collection use
    with pytest.raises(ValueError, match="has 4 channels"):
        families.load("dit", tmp_path, cfg_channels=5)


def test_w15_probes_run_end_to_end_on_the_teacher_and_a_lora(tmp_path):
    """bench/w15_probes_tiny.py at toy size: every probe trains, starts as the base (zero-init outputs) and
    changes it once trained; class-gain also on a LoRA'd teacher; a cache of other settings is refused."""
    import lora

    spec = importlib.util.spec_from_file_location("w15_probes_tiny", families.ROOT / "bench" / "w15_probes_tiny.py")
    probes = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probes)
    ablations.World(ablations.parse_args(["--out", str(tmp_path / "abl"), *TOY])).collect()
    teacher = tiny.load_teacher()
    lora_file = tmp_path / "lora.safetensors"
    lora.save(lora.attach(tiny.load_teacher(), lora.dit_modules(teacher), rank=2), lora_file)
    base = families.load("tiny")
    x, t, y = torch.randn(2, 1, 28, 28), torch.tensor([999, 10]), torch.tensor([3, 7])
    for probe in probes.PROBES:
        student = probes.build(probe, base.model, base, 0)
        with torch.no_grad():
            assert torch.equal(student(x, t, w=3.0, y=y), base.model(x, t, y=y)), probe  # starts as the base
        student.detach()
    argv = ["--ablations", str(tmp_path / "abl"), "--out", str(tmp_path / "probes"), "--train-steps", "2",
            "--samples", "10", "--w", "3.0"]
    report = probes.main(probes.parse_args(argv))
    assert set(report["probes"]) == set(probes.PROBES)
    params = {k: v["trainable_parameters"] for k, v in report["probes"].items()}
    assert params["mse"] == params["no-factor"] == params["small-w-draws"] < params["mlp-sites"] < params["film-mlp"]
    assert params["film-mlp"] < params["film-mlp-final"] and params["class-gain"] > params["mse"]
    again = probes.main(probes.parse_args(argv + ["--only", "class-gain", "--lora", str(lora_file)]))
    assert again["probes"]["class-gain"]["rows"] == report["probes"]["class-gain"]["rows"]  # cached
    (row,) = again["probes"]["class-gain"]["lora"]["rows"]
    assert row["w"] == 3.0 and 0 <= row["agd"]["accuracy"] <= 1 and row["accuracy_vs_cfg"]["se_points"] >= 0
    with pytest.raises(ValueError, match="--train-steps 2"):
        probes.main(probes.parse_args(argv[:4] + ["--train-steps", "3", "--samples", "10", "--w", "3.0"]))
