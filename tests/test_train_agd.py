"""train_agd.py end to end on the bundled tiny teacher, at toy sizes: collect -> train -> evaluate, resume."""

import json

import pytest
import torch

import adapters
import checkpoint
import families
import tiny
import train_agd
import trajectories

TOY = ["--trajectories", "20", "--steps", "4", "--shard-size", "10", "--train-steps", "6", "--batch-size", "8",
       "--save-every", "3", "--eval-samples", "20", "--eval-batch", "10", "--eval-w", "2.0", "4.0"]


def run(tmp_path, *extra):
    args = train_agd.parse_args(["--out", str(tmp_path), *TOY, *extra])
    train_agd.main(args)
    return args


def test_end_to_end(tmp_path, monkeypatch):
    import huggingface_hub
    from test_hub import FakeApi

    FakeApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    run(tmp_path, "--push-to-hub", "user/agd-tiny")
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    rows = {(r["method"], r["w"]) for r in metrics["results"]}
    assert rows == {(m, w) for m in ("base", "cfg", "agd") for w in (2.0, 4.0)}
    for r in metrics["results"]:
        assert r["fid"] >= 0 and 0 <= r["accuracy"] <= 1 and r["sec_per_image"] > 0
    row = {(r["method"], r["w"]): r for r in metrics["results"]}
    assert row[("base", 2.0)]["fid"] == row[("base", 4.0)]["fid"]  # the unguided teacher, listed beside each w
    assert row[("cfg", 2.0)]["fid"] != row[("cfg", 4.0)]["fid"]  # guidance changes the samples
    assert row[("cfg", 4.0)]["accuracy"] > row[("base", 4.0)]["accuracy"]  # and makes them show the class asked
    for w in (2.0, 4.0):  # AGD's accuracy against CFG's, from the same noise, with its paired standard error
        vs = row[("agd", w)]["accuracy_vs_cfg"]
        assert vs["points"] == pytest.approx(100 * (row[("agd", w)]["accuracy"] - row[("cfg", w)]["accuracy"]), abs=1e-4)
        assert vs["se_points"] >= 0
    assert (tmp_path / "samples.png").stat().st_size > 0
    shards = sorted((tmp_path / "trajectories").glob("shard_*.safetensors"))
    assert len(shards) == 2
    data = trajectories.load_shards(tmp_path / "trajectories")
    assert len(data["x"]) == 20 * 4 and data["x"].dtype == torch.float16
    assert 1.0 <= data["w"].min() and data["w"].max() <= 6.0
    student = adapters.load(tiny.load_teacher(), tmp_path / "adapters.safetensors")
    assert student.num_parameters()[0] == metrics["adapter_parameters"]
    card = (tmp_path / "README.md").read_text()  # the model card, from this run's files, then uploaded
    cfg_4 = next(r for r in metrics["results"] if (r["method"], r["w"]) == ("cfg", 4.0))
    assert f"{cfg_4['fid']:.3f}" in card and 'adapters.load(model, "user/agd-tiny")' in card
    assert (tmp_path / "loss.png").is_file()
    upload = next(c[1] for c in FakeApi.calls if c[0] == "upload_folder")
    assert upload["repo_id"] == "user/agd-tiny" and upload["folder_path"] == tmp_path


def test_resume_after_a_kill_gives_the_same_adapters(tmp_path, monkeypatch):
    run(tmp_path / "whole", "--no-eval")
    real_save = train_agd.save_state

    def killed(file, student, opt, sched, step, *rest):
        real_save(file, student, opt, sched, step, *rest)
        raise KeyboardInterrupt  # the process dies right after its first checkpoint

    monkeypatch.setattr(train_agd, "save_state", killed)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "killed", "--no-eval")
    monkeypatch.setattr(train_agd, "save_state", real_save)
    assert torch.load(tmp_path / "killed" / "train_state.pt", weights_only=True)["step"] == 3
    run(tmp_path / "killed", "--no-eval", "--resume")
    a = checkpoint.read_tensors(tmp_path / "whole" / "adapters.safetensors")
    b = checkpoint.read_tensors(tmp_path / "killed" / "adapters.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_collection_resumes_and_names_a_corrupt_shard(tmp_path):
    args = train_agd.parse_args(["--out", str(tmp_path), *TOY])
    base, plan = train_agd.load_base(args), train_agd.collection_plan(args, families.FAMILIES["tiny"])
    trajectories.collect(base, plan, tmp_path / "trajectories")
    first = tmp_path / "trajectories" / "shard_00000.safetensors"
    stamp = first.stat().st_mtime_ns
    trajectories.collect(base, plan, tmp_path / "trajectories")  # nothing to do: shards are kept
    assert first.stat().st_mtime_ns == stamp
    first.write_bytes(first.read_bytes()[:100])
    with pytest.raises(checkpoint.CheckpointError, match="shard_00000.safetensors"):
        trajectories.load_shards(tmp_path / "trajectories")
    assert (tmp_path / "trajectories" / "shard_00001.safetensors").is_file()  # nothing else lost


def test_bad_arguments_exit_with_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit):
        train_agd.parse_args(["--w-min", "3", "--w-max", "2"])
    assert "--w-min" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_agd.parse_args(["--push-to-hub", "agd-tiny"])
    assert "not a hub repo id (user/repo)" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # refused before any collection or training, not by a traceback after them
        train_agd.parse_args(["--eval-samples", "1"])
    assert "need at least 2 samples" in capsys.readouterr().err


def test_guidance_loss_measures_errors_in_units_of_the_guidance_direction():
    target = torch.zeros(3, 2, 4, 4)
    w = torch.tensor([1.5, 2.0, 5.0])
    pred = (w - 1).view(-1, 1, 1, 1) * torch.ones_like(target)  # off by exactly one guidance direction at every w
    assert train_agd.distillation_loss(pred, target, w, "guidance").item() == pytest.approx(1.0)
    assert train_agd.distillation_loss(pred, target, w, "mse").item() == pytest.approx((0.25 + 1 + 16) / 3)
    assert torch.isfinite(train_agd.distillation_loss(pred, target, torch.ones(3), "guidance"))  # w = 1: floored


def test_modulation_is_for_dits_only(capsys):
    with pytest.raises(SystemExit):
        train_agd.parse_args(["--model", "sdxl", "--modulation"])
    assert "--modulation" in capsys.readouterr().err


def test_training_at_least_halves_the_one_pass_error_to_cfg(tmp_path):
    """The central claim, small: on recorded CFG pairs of the bundled teacher, 100 steps of Algorithm 2 (the
    tiny world's adapters, the paper's MSE) at least halve the student's MSE to the CFG targets, on
    trajectories it was not trained on."""
    base = families.load("tiny")
    plan = trajectories.Collection(trajectories=60, steps=25, shard_size=20, seed=0)
    train_data = trajectories.concat_shards([trajectories.make_shard(base, plan, k) for k in (0, 1)])
    held_out = trajectories.make_shard(base, plan, 2)
    torch.manual_seed(0)
    defaults = families.FAMILIES["tiny"].train
    student = adapters.attach(base.model, **base.adapter_options(**{k: defaults[k] for k in train_agd.ADAPTER_OPTIONS
                                                                    if k in defaults}))

    @torch.no_grad()
    def error():
        cond = trajectories.batch_condition(held_out, torch.arange(len(held_out["x"])), "cpu", torch.float32)
        pred = student(held_out["x"].float(), held_out["t"], w=held_out["w"], **cond)
        return (pred - held_out["target"].float()).pow(2).mean().item()

    before = error()  # a fresh student: the conditional teacher, no guidance at all
    train_agd.train(student, lambda step: train_data, train_agd.Training(100, 64, defaults["lr"], "mse", 1000),
                    tmp_path)
    after = error()
    assert after <= 0.5 * before, (before, after)  # measured: 0.105 -> 0.042


def test_accuracy_against_is_the_paired_difference_by_hand():
    """Per sample: (1, 1, 0, 0) right against (1, 0, 0, 1): differences (0, 1, 0, -1), mean 0, standard deviation
    sqrt(2 / 3), so the standard error is sqrt(2 / 3) / 2 (in points: times 100)."""
    labels = torch.tensor([0, 1, 2, 3])
    logits = lambda right: torch.nn.functional.one_hot(torch.where(torch.tensor(right) == 1, labels, (labels + 1) % 10),
                                                       10).float()  # noqa: E731
    vs = tiny.accuracy_against(torch.nn.Identity(), logits([1, 1, 0, 0]), logits([1, 0, 0, 1]), labels)
    assert vs["points"] == pytest.approx(0.0)
    assert vs["se_points"] == pytest.approx(100 * (2 / 3) ** 0.5 / 2)
    vs = tiny.accuracy_against(torch.nn.Identity(), logits([1, 1, 1, 0]), logits([1, 0, 0, 0]), labels)
    assert vs["points"] == pytest.approx(50.0)
