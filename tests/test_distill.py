"""Step distillation (distill.py): the target lands where the teacher's two DDIM steps land, those steps
are diffusers' DDIMScheduler's, rounds resume exactly, and collect -> train -> distill -> sample runs
end to end on tiny random DiT and SDXL layouts and on the bundled tiny teacher.
"""

import contextlib
import json
import signal
from types import SimpleNamespace

import pytest
import torch

import adapters
import checkpoint
import dit
import distill
import families
import guidance
import runs
import sample
import train_agd

TOY = ["--trajectories", "4", "--steps", "3", "--keep-steps", "2", "--shard-size", "2", "--collect-batch", "1",
       "--train-steps", "4", "--batch-size", "4", "--save-every", "2", "--lr", "1e-2", "--no-eval"]
DIT_CONFIG = {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_schedule": "linear",
              "beta_start": 1e-4, "beta_end": 0.02, "clip_sample": False, "set_alpha_to_one": True}


def tiny_dit(folder, prediction_type="epsilon", clip_sample=False):
    """A random 2-block DiT on 8 x 8 latents in the hub layout, with a scheduler config beside it."""
    torch.manual_seed(0)
    model = dit.DiT(dit.DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2,
                                  num_classes=10, freq_shift=1))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))  # off the zero-inits
    dit.save_pretrained(model, folder / "transformer")
    (folder / "scheduler").mkdir()
    config = {**DIT_CONFIG, "prediction_type": prediction_type, "clip_sample": clip_sample}
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    return folder


def random_adapters(base, file, **options):
    """Adapters as if trained (every weight random), saved: the first teacher."""
    torch.manual_seed(1)
    student = adapters.attach(base.model, **base.adapter_options(hidden_dim=16, use_timestep=True, **options))
    with torch.no_grad():
        for p in student.adapters.parameters():
            p.normal_(0, 0.1)
    student.save(file)
    student.detach()
    return file


def test_trailing_timesteps_nest():
    """One step of S spans exactly two of 2S, also where S does not divide T, from t = T - 1."""
    sched = distill.scheduler(families.load("tiny"))
    for steps in (1, 3, 6, 12, 25, 48):
        assert torch.equal(sched.timesteps(2 * steps)[::2], sched.timesteps(steps))
        assert sched.timesteps(steps)[0] == 999
    assert distill.round_steps(24, 6) == [12, 6] and distill.start_steps(6, 25) == 24
    with pytest.raises(ValueError, match="do not halve"):
        distill.round_steps(25, 6)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("nxt", [(0.6, 0.8), (1.0, 0.0), (0.9996, 0.0292)])  # a step, DiT's end, SD's abar_0
def test_one_step_target_lands_where_the_two_steps_land(prediction_type, nxt):
    g = torch.Generator().manual_seed(0)
    x, x_target = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    now = (0.3, (1 - 0.3**2) ** 0.5)
    out = distill.one_step_target(x, x_target, now, nxt, prediction_type)
    landed = guidance.ddim_step(out, x, now, nxt, prediction_type=prediction_type)
    assert torch.allclose(landed, x_target, atol=1e-5)
    # the weight turns an output error into max(SNR, 1) times the squared error of x_0
    delta = 1e-3 * torch.randn(x.shape, generator=g)
    x0, _ = guidance.predict_x0_eps(out, x, *now, prediction_type)
    x0_off, _ = guidance.predict_x0_eps(out + delta, x, *now, prediction_type)
    snr = now[0] ** 2 / now[1] ** 2
    assert distill.loss_weight(now, prediction_type) * delta.pow(2).sum() == \
        pytest.approx(max(snr, 1) * (x0_off - x0).pow(2).sum().item(), rel=1e-4)


def diffusers_ddim(config, denoise, x, steps):
    """diffusers' DDIMScheduler at trailing spacing from x: every state, x_T first."""
    from diffusers import DDIMScheduler

    ref = DDIMScheduler.from_config({**config, "timestep_spacing": "trailing"})
    ref.set_timesteps(steps)
    states = [x]
    for t in ref.timesteps:
        x = ref.step(denoise(x, t.expand(len(x))), t, x, eta=0.0).prev_sample
        states.append(x)
    return ref.timesteps, states


@pytest.mark.parametrize("prediction_type, clip_sample", [("epsilon", False), ("v_prediction", True)])
def test_the_teachers_two_ddim_steps_are_diffusers(tmp_path, prediction_type, clip_sample):
    """A round's data (teacher_shard) against diffusers' DDIMScheduler driving the same teacher from the same
    x_T: its rows start at every other state, and one step of the target lands two states on. A config's
    clip_sample (the tiny teacher's, for DDPM) is dropped: the distilled sampler does not clip."""
    base = families.load("dit", tiny_dit(tmp_path, prediction_type, clip_sample))
    teacher = adapters.load(base.model, random_adapters(base, tmp_path / "agd.safetensors", num_classes=11))
    sched = distill.scheduler(base)
    hp = distill.Distillation(steps=4, start=8, train_steps=1, batch_size=4, lr=1e-3, shard_size=3, seed=5)
    grid = sched.timesteps(8)
    rows = distill.teacher_shard(base, sched, teacher, hp, grid, 0, 0)
    start = rows["t"] == 999
    x_T, w, y = rows["x"][start], rows["w"][start], rows["cond.y"]
    with torch.no_grad():
        timesteps, states = diffusers_ddim({**DIT_CONFIG, "prediction_type": prediction_type},
                                           lambda x, t: teacher(x, t, w=w, y=y)[:, :4], x_T, 8)  # DDIM: no variance
    assert torch.equal(timesteps, grid)
    for j, t in enumerate(grid[::2].tolist()):
        r = rows["t"] == t
        assert torch.allclose(rows["x"][r], states[2 * j], atol=1e-5), t
        nxt = sched.schedule(grid[2 * j + 2].item()) if 2 * j + 2 < len(grid) else (1.0, 0.0)
        landed = guidance.ddim_step(rows["target"][r], rows["x"][r], sched.schedule(t), nxt,
                                    prediction_type=prediction_type)
        assert torch.allclose(landed, states[2 * j + 2], atol=1e-4), t


def test_sd_distilled_sampler_is_diffusers_ddim(sdxl_root):
    """SDXL's repo config (Euler) as DDIM at trailing spacing: diffusers' DDIMScheduler from the same config,
    ending at abar_0 (set_alpha_to_one false)."""
    sched = distill.scheduler(SimpleNamespace(family=families.FAMILIES["sdxl"], weights=str(sdxl_root)))
    assert sched.step_fn is guidance.ddim_step and sched.final != (1.0, 0.0)

    def denoise(x, t):  # any fixed function of (x, t) will do
        return torch.sin(x) * (t.float().view(-1, 1, 1, 1) / 1000)

    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    timesteps, states = diffusers_ddim(guidance.read_scheduler_config(sdxl_root), denoise, x, 10)
    assert torch.equal(timesteps, sched.timesteps(10))
    ours = guidance.sample(denoise, x, sched, sched.timesteps(10))
    assert torch.allclose(ours, states[-1], atol=1e-5)


def test_a_killed_round_resumes_to_the_same_adapters(tmp_path, monkeypatch):
    """Killed at the first checkpoint of the second round: the first round's file is kept, the second resumes."""
    base = families.load("dit", tiny_dit(tmp_path / "dit"))
    source = random_adapters(base, tmp_path / "agd.safetensors")
    hp = distill.Distillation(steps=1, start=4, train_steps=6, batch_size=4, lr=1e-2, shard_size=2, buffer_shards=2,
                              refresh_every=2, save_every=3)
    distill.distill(base, source, hp, tmp_path / "whole")[0].detach()
    real_save, saves = distill.save_state, []

    def killed(*args):
        real_save(*args)
        saves.append(args[4])  # the round's steps
        if saves == [2, 2, 1]:  # round one: at step 3 and at its end; round two: at step 3
            raise KeyboardInterrupt

    monkeypatch.setattr(distill, "save_state", killed)
    with pytest.raises(KeyboardInterrupt):
        distill.distill(base, source, hp, tmp_path / "killed")
    monkeypatch.setattr(distill, "save_state", real_save)
    first = (tmp_path / "killed" / "adapters_2steps.safetensors").stat().st_mtime_ns
    assert torch.load(tmp_path / "killed" / "distill_state.pt", weights_only=True)["step"] == 3
    fresh = families.load("dit", tmp_path / "dit")  # a new process: no hooks left from the killed run
    distill.distill(fresh, source, hp, tmp_path / "killed", resume=True)
    assert (tmp_path / "killed" / "adapters_2steps.safetensors").stat().st_mtime_ns == first  # taken as done
    for steps in (2, 1):
        a = checkpoint.read_tensors(tmp_path / "whole" / f"adapters_{steps}steps.safetensors")
        b = checkpoint.read_tensors(tmp_path / "killed" / f"adapters_{steps}steps.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert distill.read_steps(tmp_path / "killed" / "adapters_1steps.safetensors") == 1
    assert distill.read_steps(source) is None


class Signals:
    """runs.Signals as a round sees it: SIGTERM arrives at the `at`-th step it asks about."""

    def __init__(self, at):
        self.asked, self.at = 0, at

    def deferred(self):
        return contextlib.nullcontext()

    def requested(self, world=1, device="cpu"):
        self.asked += 1
        return signal.SIGTERM if self.asked == self.at else 0


def test_a_signal_stops_a_round_that_resumes_to_the_same_adapters(tmp_path):
    """SIGTERM in the second round: that step ends, is checkpointed, Interrupted; --resume ends as an unbroken run."""
    base = families.load("dit", tiny_dit(tmp_path / "dit"))
    source = random_adapters(base, tmp_path / "agd.safetensors")
    hp = distill.Distillation(steps=1, start=4, train_steps=5, batch_size=4, lr=1e-2, shard_size=2, buffer_shards=2,
                              refresh_every=2, save_every=100)
    distill.distill(base, source, hp, tmp_path / "whole")[0].detach()
    with pytest.raises(runs.Interrupted, match="after step 2 of 5 of the 1-step round"):
        distill.distill(base, source, hp, tmp_path / "stopped", signals=Signals(at=5 + 2))
    assert torch.load(tmp_path / "stopped" / "distill_state.pt", weights_only=True)["step"] == 2
    fresh = families.load("dit", tmp_path / "dit")
    distill.distill(fresh, source, hp, tmp_path / "stopped", resume=True)
    a = checkpoint.read_tensors(tmp_path / "whole" / "adapters_1steps.safetensors")
    b = checkpoint.read_tensors(tmp_path / "stopped" / "adapters_1steps.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_dit_collect_train_distill_sample(tmp_path):
    """One round (4 -> 2 steps), then a further one on --resume (2 -> 1), as README's 3-step round is made."""
    root = tiny_dit(tmp_path / "dit")
    argv = ["--out", str(tmp_path / "run"), *TOY, "--model", "dit", "--weights", str(root), "--dtype", "float32",
            "--use-class", "--distill-from", "4", "--distill-train-steps", "3"]
    train_agd.main(train_agd.parse_args(argv + ["--distill-steps", "2"]))
    files = [tmp_path / "run" / f"adapters_{s}steps.safetensors" for s in (2, 1)]
    first = files[0].read_bytes()
    assert distill.read_steps(files[0]) == 2 and not files[1].exists()
    train_agd.main(train_agd.parse_args(argv + ["--distill-steps", "1", "--resume"]))
    assert [distill.read_steps(f) for f in files] == [2, 1] and files[0].read_bytes() == first  # kept as done
    base = families.load("dit", root)
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([999, 500, 3]), torch.tensor([1, 2, 10])
    with torch.no_grad():
        expected = base.model(x, t, y=y)
        student = adapters.load(base.model, files[-1])
        assert not torch.allclose(student(x, t, w=4.0, y=y), expected)  # trained off the teacher's
        student.enabled = False
        assert torch.equal(student(x, t, w=4.0, y=y), expected)  # switched off: the base, bit for bit
        student.enabled = True
        assert torch.equal(base.model(x, t, y=y), expected)  # outside its scope too

    # sample.py takes the file's steps and the distilled sampler; --steps and --sampler still rule
    argv = ["--model", "dit", "--weights", str(root), "--adapters", str(files[-1]), "--device", "cpu"]
    parsed = sample.parse_args(argv)
    assert (parsed.steps, parsed.sampler, parsed.distilled) == (1, "ddim", 1)
    assert (sample.parse_args(argv + ["--steps", "5"]).steps, sample.parse_args(argv + ["--sampler", "ddpm"]).sampler) \
        == (5, "ddpm")
    base.scheduler = distill.scheduler(base)
    with torch.no_grad():
        z = sample.sample_latents(base, torch.tensor([3, 7]), torch.randn(2, 4, 8, 8), parsed.steps, student=student,
                                  w=4.0)
    assert z.shape == (2, 4, 8, 8) and torch.isfinite(z).all()


def test_sdxl_collect_train_distill_sample(tmp_path, sdxl_root):
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("a red fox in the snow\na lighthouse at night\n")
    args = train_agd.parse_args(["--out", str(tmp_path / "run"), *TOY, "--model", "sdxl", "--weights", str(sdxl_root),
                                 "--prompt-file", str(prompt_file), "--dtype", "float32", "--use-prompt",
                                 "--distill-steps", "1", "--distill-train-steps", "2"])
    assert args.distill_from == 32  # the most halvings of 1 up to SDXL's 50 steps
    args.distill_from, args.distill_shard_size = 2, 2  # one round, at toy size
    train_agd.main(args)
    file = tmp_path / "run" / "adapters_1steps.safetensors"
    assert distill.read_steps(file) == 1
    base = families.load("sdxl", sdxl_root, dtype=torch.float32)
    x, t = torch.randn(1, *base.shape), torch.tensor([500])
    with torch.no_grad():
        cond = base.encode(["a red fox in the snow"])
        expected = base.model(x, t, **cond)
        student = adapters.load(base.model, file)
        assert not torch.allclose(student(x, t, w=5.0, **cond), expected)
        student.enabled = False
        assert torch.equal(student(x, t, w=5.0, **cond), expected)  # switched off: the base, bit for bit
    student.detach()
    parsed = sample.parse_args(["--model", "sdxl", "--weights", str(sdxl_root), "--adapters", str(file), "--w", "5",
                                "--device", "cpu", "--height", "64", "--width", "64"])
    assert parsed.steps == 1
    images, _, how = sample.generate(parsed, families.FAMILIES["sdxl"])
    assert images.shape == (1, 3, 64, 64) and torch.isfinite(images).all()
    assert how.startswith("ddim at trailing spacing, 1 steps")


def test_tiny_distill_and_evaluate(tmp_path):
    """The tiny world's run at toy size: the rows of metrics.json, the figures, the diagnosis; sample.py on the file."""
    args = train_agd.parse_args(["--out", str(tmp_path), "--trajectories", "20", "--steps", "4", "--shard-size", "10",
                                 "--train-steps", "4", "--batch-size", "8", "--eval-samples", "20", "--eval-batch",
                                 "10", "--eval-w", "3.0", "--distill-steps", "1", "--distill-from", "4",
                                 "--distill-train-steps", "3"])
    args.distill_shard_size = 5
    train_agd.main(args)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    rows = {(r["method"], r["steps"], r["w"]) for r in metrics["results"]}
    assert rows == {("cfg", 4, 3.0)} | {(m, s, 3.0) for m in ("cfg", "agd", "agd-distilled") for s in (2, 1)}
    reference = next(r for r in metrics["results"] if r["steps"] == 4)
    assert "accuracy_vs_reference" not in reference
    for r in metrics["results"]:  # every other row's accuracy against the reference's, paired
        if r is not reference:
            assert r["accuracy_vs_reference"]["points"] == pytest.approx(100 * (r["accuracy"] - reference["accuracy"]),
                                                                         abs=1e-4)
    assert [d["steps"] for d in metrics["distillation"]] == [2, 1]
    assert all(len(d["per_step"]) == d["steps"] for d in metrics["distillation"])
    assert all({"w_below_2", "w_from_2"} <= set(d) for d in metrics["distillation"])
    for name in ("samples.png", "steps.png"):
        assert (tmp_path / name).stat().st_size > 0
    parsed = sample.parse_args(["--model", "tiny", "--adapters", str(tmp_path / "adapters_2steps.safetensors"),
                                "--classes", "3", "7", "--device", "cpu"])
    images, _, how = sample.generate(parsed, families.FAMILIES["tiny"])
    assert images.shape == (2, 1, 28, 28) and how.startswith("ddim at trailing spacing, 2 steps")


def test_adapters_without_distill_steps_is_one_line(capsys):
    with pytest.raises(SystemExit):
        train_agd.parse_args(["--adapters", "agd.safetensors"])
    assert "--distill-steps" in capsys.readouterr().err
