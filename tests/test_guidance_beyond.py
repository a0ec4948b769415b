"""Beyond a constant CFG scale, still in one pass: guidance schedules and negative conditions.

- schedules give the hand-computed w at each step; CFG skips its null pass where w(t) = 1;
- adapters that read the negative start as the conditional model, train on trajectories with random
  negatives, and sample with a negative prompt in one UNet pass per step (tiny random SDXL);
- adapters trained without negatives refuse one in one line.
"""

import math

import pytest
import torch

import adapters
import families
import guidance
import sample
import train_agd
import trajectories
from test_adapters import inputs, randomize, tiny_dit

VP = guidance.Scheduler(guidance.VPSchedule(guidance.linear_schedule()), guidance.ddim_step)


def test_schedules_give_the_hand_computed_w():
    timesteps = VP.timesteps(5)  # 800, 600, 400, 200, 0
    assert guidance.WSchedule().scales(4.0, VP, timesteps) == [4.0] * 5
    assert guidance.WSchedule.parse("linear:0:2").scales(4.0, VP, timesteps) == [1.0, 2.5, 4.0, 5.5, 7.0]
    abar = guidance.linear_schedule()
    levels = [math.sqrt((1 - abar[t]) / abar[t]) for t in timesteps.tolist()]  # sigma_t / alpha_t
    low, high = levels[3] * 1.01, levels[1] * 1.01  # guided at the 2nd, 3rd (levels[1], levels[2]) only
    interval = guidance.WSchedule.parse(f"interval:{low}:{high}")
    assert interval.scales(4.0, VP, timesteps) == [1.0, 4.0, 4.0, 1.0, 1.0]
    at = interval.at(4.0, VP, timesteps)
    assert at(torch.full((3,), 600)) == 4.0 and at(torch.full((3,), 0)) == 1.0
    for bad in ("interval:2:1", "linear:1", "steps:3", "interval:a:b"):
        with pytest.raises(ValueError, match="guidance schedule"):
            guidance.WSchedule.parse(bad)


def test_cfg_makes_one_call_where_the_schedule_gives_1():
    model = tiny_dit()
    x, t, y = inputs()
    batches = []
    model.register_forward_pre_hook(lambda m, args: batches.append(len(args[0])))
    cond, null = {"y": y}, {"y": torch.full_like(y, 5)}
    timesteps = VP.timesteps(4)
    w = guidance.WSchedule.parse("linear:1:0").at(3.0, VP, timesteps)  # 3, 2.33, 1.67, 1: no guidance at the end
    with torch.no_grad():
        guidance.sample(guidance.guided(model, w, cond, null), x, VP, timesteps)
        assert batches == [6, 6, 6, 3]  # the last step: the conditional pass alone
        last = guidance.guided(model, w, cond, null)(x, torch.full((3,), 0))
        assert torch.equal(last, model(x, torch.full((3,), 0), y=y))


def test_fresh_negative_adapters_are_the_conditional_model():
    model = tiny_dit()
    x, t, y = inputs()
    with torch.no_grad():
        base = model(x, t, y=y)
        student = adapters.attach(model, hidden_dim=16, negative_classes=6, use_timestep=True)
        assert student.takes_negative
        assert torch.equal(student(x, t, w=3.0, negative={"y": torch.tensor([2, 5, 5])}, y=y), base)
        randomize(student)  # trained: the negative counts
        against = {j: student(x, t, w=3.0, negative={"y": torch.full((3,), j)}, y=y) for j in (2, 5)}
        assert not torch.allclose(against[2], against[5])
    with pytest.raises(ValueError, match="pass negative="):
        student(x, t, w=3.0, y=y)


def test_collection_draws_negatives_and_cfg_subtracts_them(tmp_path):
    base = families.load("tiny")
    plan = trajectories.Collection(trajectories=8, steps=2, shard_size=8, negative_prob=0.5, seed=3)
    shard = trajectories.make_shard(base, plan, 0)
    y, neg = shard["cond.y"], shard["neg.y"]
    drawn = neg != base.model.config.num_classes
    assert 0 < drawn.sum() < 8 and not (neg[drawn] == y[drawn]).any()  # some negatives, never the class itself
    # the first row's target is CFG against the stored negative
    x, t, w = shard["x"][:8].float(), shard["t"][:8], shard["w"][:8]
    with torch.no_grad():
        expected = guidance.guided(base.model, w, {"y": y}, {"y": neg})(x, t)
    torch.testing.assert_close(shard["target"][:8].float(), expected, rtol=0, atol=2e-3)  # stored in fp16


def test_sd_negative_prompts_in_one_pass(tmp_path, sdxl_root):
    """train_agd.py --negatives on a tiny random SDXL, then sample.py with --negative-prompt and the adapters."""
    negatives = tmp_path / "negatives.txt"
    negatives.write_text("blurry\nlow quality\n")
    args = train_agd.parse_args(["--model", "sdxl", "--weights", str(sdxl_root), "--out", str(tmp_path / "run"),
                                 "--trajectories", "4", "--steps", "2", "--shard-size", "4", "--train-steps", "2",
                                 "--batch-size", "4", "--negatives", "1", "--negative-prompt-file", str(negatives),
                                 "--dtype", "float32", "--no-eval"])
    train_agd.main(args)
    data = trajectories.load_shards(tmp_path / "run" / "trajectories")
    assert data["neg.context"].shape == data["cond.context"].shape  # each trajectory's negative, once
    file = tmp_path / "run" / "adapters.safetensors"
    assert adapters.read_config(file).negative_prompt_dim == 80
    run = sample.parse_args(["--model", "sdxl", "--weights", str(sdxl_root), "--steps", "2", "--device", "cpu",
                             "--adapters", str(file), "--w", "5", "--negative-prompt", "blurry",
                             "--out", str(tmp_path / "x.png")])
    base = families.load("sdxl", sdxl_root, height=16, width=16)
    batches = []
    base.model.register_forward_pre_hook(lambda m, a: batches.append(len(a[0])))
    student = adapters.load(base.model, file)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with_negative = sample.sample_latents(base, ["a fox"], noise, 2, negative="blurry", student=student, w=5.0)
    assert batches == [1, 1]  # one pass per step, the negative read by the adapters
    assert torch.isfinite(with_negative).all()
    sample.main(run)
    assert (tmp_path / "x.png").is_file()


def test_adapters_without_negatives_refuse_one(tmp_path, sdxl_root):
    base = families.load("sdxl", sdxl_root, height=16, width=16)
    file = tmp_path / "plain.safetensors"
    adapters.attach(base.model, hidden_dim=8).save(file)
    run = sample.parse_args(["--model", "sdxl", "--weights", str(sdxl_root), "--steps", "1", "--device", "cpu",
                             "--adapters", str(file), "--negative-prompt", "blurry", "--out", str(tmp_path / "x.png")])
    with pytest.raises(sample.InputError, match=r"against the null condition only; .* --negatives") as e:
        sample.main(run)
    assert "\n" not in str(e.value) and not (tmp_path / "x.png").exists()


def test_the_tiny_world_bench_runs_both_experiments(tmp_path):
    """bench/guidance_beyond_tiny.py at toy size, on adapters trained at toy size (plain and with negatives)."""
    import importlib.util

    toy = ["--trajectories", "10", "--steps", "4", "--shard-size", "10", "--train-steps", "2", "--batch-size", "8",
           "--no-eval"]
    for name, extra in (("plain", []), ("negative", ["--negatives", "0.5"])):
        train_agd.main(train_agd.parse_args(["--out", str(tmp_path / name), *toy, *extra]))
    spec = importlib.util.spec_from_file_location("bench_gb", families.ROOT / "bench" / "guidance_beyond_tiny.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    report = bench.main(bench.parse_args(["--out", str(tmp_path / "out"), "--adapters",
                                          str(tmp_path / "plain" / "adapters.safetensors"), "--negative-adapters",
                                          str(tmp_path / "negative" / "adapters.safetensors"), "--w", "3",
                                          "--samples", "20", "--pair-samples", "10", "--batch", "10", "--steps", "4",
                                          "--pairs", "1"]))
    rows = report["results"]
    interval = [r for r in rows if r["experiment"] == "interval"]
    assert {(r["method"], r["schedule"].split(":")[0]) for r in interval} == \
        {(m, s) for m in ("cfg", "agd") for s in ("constant", "interval")}
    negative = [r for r in rows if r["experiment"] == "negative"]
    assert len(negative) == 1 * 2 * 2  # pairs x (null, j) x (cfg, agd)
    assert all(0 <= r["p_negative"] <= 1 and r["fid"] >= 0 for r in negative)
    assert (tmp_path / "out" / "samples.png").is_file()
    scores = [(r["fid"], r["accuracy"]) for r in rows]
    retimed = bench.main(bench.parse_args(["--out", str(tmp_path / "out"), "--retime", "--steps", "4", "--repeats", "2",
                                           "--time-batch", "3"]))
    assert retimed["retimed"] == {"repeats": 2, "batch": 3}
    assert [(r["fid"], r["accuracy"]) for r in retimed["results"]] == scores  # only the seconds change
    assert all(r["sec_per_image"] > 0 for r in retimed["results"])
