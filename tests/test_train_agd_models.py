"""train_agd.py on tiny random SD 2.1, SDXL and DiT models in the hub layout: collect -> train -> sample.

Also: --online, bf16 base with fp32 adapters, torchrun with two gloo ranks, a corrupt checkpoint,
and the storage an SDXL trajectory takes against the official code's.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import adapters
import checkpoint
import dit
import families
import guidance
import prompts
import train_agd
import trajectories
import unet

ROOT = Path(__file__).resolve().parent.parent
TOY = ["--trajectories", "4", "--steps", "3", "--keep-steps", "2", "--shard-size", "2", "--collect-batch", "1",
       "--train-steps", "4", "--batch-size", "4", "--save-every", "2", "--lr", "1e-2", "--no-eval"]


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory, sd21_root, sdxl_root):
    prompt_file = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    prompt_file.write_text("# three prompts\na red fox in the snow\n\na lighthouse at night\na bowl of ramen\n")
    return {"sd21": sd21_root, "sdxl": sdxl_root, "prompts": prompt_file}


def tiny_dit(folder):
    """A random 2-block DiT on 8 x 8 latents, saved in the hub layout (weights perturbed off the zero-inits)."""
    torch.manual_seed(0)
    model = dit.DiT(dit.DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2,
                                  num_classes=10, freq_shift=1))  # freq_shift 1: the hub layout's
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    dit.save_pretrained(model, folder / "transformer")
    return folder


def run(out, *extra):
    args = train_agd.parse_args(["--out", str(out), *TOY, *extra])
    train_agd.main(args)
    return args


@pytest.mark.parametrize("model, dtype", [("sd21", "bfloat16"), ("sdxl", "float32")])
def test_sd_collect_train_sample(tmp_path, pipelines, model, dtype):
    root = pipelines[model]
    extra = ["--use-prompt"] if model == "sdxl" else []
    args = run(tmp_path, "--model", model, "--weights", str(root), "--prompt-file", str(pipelines["prompts"]),
               "--dtype", dtype, *extra)
    assert args.gradient_checkpointing  # the SD default

    data = trajectories.load_shards(tmp_path / "trajectories")
    assert len(data["x"]) == 4 * 2 and data["x"].dtype == torch.float16 and data["x"].shape[1:] == (4, 8, 8)
    assert 1.0 <= data["w"].min() and data["w"].max() <= 12.0
    keys = {"cond.context"} | ({"cond.text_embeds", "cond.time_ids"} if model == "sdxl" else set())
    assert {k for k in data if k.startswith("cond.")} == keys
    assert data["cond.context"].shape[:2] == (4, 77)  # once per trajectory, not per step
    # trajectory i asked for prompt i mod 3: trajectories 0 and 3 share their embeddings, 0 and 1 do not
    assert torch.equal(data["cond.context"][0], data["cond.context"][3])
    assert not torch.equal(data["cond.context"][0], data["cond.context"][1])

    base = unet.from_pretrained(root)
    student = adapters.load(base, tmp_path / "adapters.safetensors")
    attn2 = [n for n, _ in base.named_modules() if n.endswith(".attn2")]
    assert student.targets == attn2 and any(n.startswith("up_blocks") for n in attn2)
    assert student.config.prompt_dim == (base.config.cross_attention_dim if model == "sdxl" else 0)
    assert any(a.out_proj.weight.abs().sum() > 0 for a in student.adapters)  # trained off its zero init
    assert all(p.dtype == torch.float32 for p in student.adapters.parameters())

    # sample with the student: one pass per step, along the repo's own scheduler
    scheduler = guidance.scheduler_from_config(root)
    cond = prompts.PromptEncoder.from_pretrained(root)(["a red fox in the snow"], height=64, width=64)
    with torch.no_grad():
        x = guidance.sample(lambda x, t: student(x, t, w=5.0, **cond), torch.randn(1, 4, 8, 8), scheduler,
                            scheduler.timesteps(3))
    assert x.shape == (1, 4, 8, 8) and torch.isfinite(x).all()


def test_real_models_default_to_a_bf16_base_with_fp32_adapters(tmp_path, pipelines):
    args = train_agd.parse_args(["--model", "sd21", "--weights", str(pipelines["sd21"]), "--out", str(tmp_path),
                                 "--prompt-file", str(pipelines["prompts"]), *TOY])
    assert args.dtype == torch.bfloat16  # the default for the real models
    base = train_agd.load_base(args)
    assert base.model.gradient_checkpointing
    student = adapters.attach(base.model, **base.adapter_options(hidden_dim=8))
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in base.model.parameters())
    assert all(p.dtype == torch.float32 and p.requires_grad for p in student.adapters.parameters())


def test_dit_collect_train_sample(tmp_path):
    root = tiny_dit(tmp_path / "dit")
    run(tmp_path / "run", "--model", "dit", "--weights", str(root), "--dtype", "float32", "--use-class")
    data = trajectories.load_shards(tmp_path / "run" / "trajectories")
    assert data["target"].shape[1:] == (8, 8, 8)  # epsilon and the learned variance
    assert torch.equal(data["cond.y"], torch.arange(4) % 10)
    assert 1.0 <= data["w"].min() and data["w"].max() <= 6.0
    base = dit.from_pretrained(root)
    student = adapters.load(base, tmp_path / "run" / "adapters.safetensors")
    assert len(student.targets) == 2 and all(n.endswith(".attn") for n in student.targets)
    with torch.no_grad():
        scheduler = families.dit_scheduler(root)
        x = guidance.sample(lambda x, t: student(x, t, w=4.0, y=torch.tensor([3])), torch.randn(1, 4, 8, 8),
                            scheduler, scheduler.timesteps(3))
    assert torch.isfinite(x).all()

    # a corrupt training checkpoint is reported by name; the shards and the adapters stay
    state = tmp_path / "run" / "train_state.pt"
    state.write_bytes(state.read_bytes()[:50])
    before = (tmp_path / "run" / "adapters.safetensors").read_bytes()
    with pytest.raises(checkpoint.CheckpointError, match="train_state.pt"):
        run(tmp_path / "run", "--model", "dit", "--weights", str(root), "--dtype", "float32", "--use-class",
            "--resume")
    assert (tmp_path / "run" / "adapters.safetensors").read_bytes() == before
    assert len(trajectories.load_shards(tmp_path / "run" / "trajectories")["x"]) == 8


ONLINE = ["--online", "--shard-size", "4", "--buffer-shards", "2", "--refresh-every", "2", "--train-steps", "6",
          "--save-every", "3", "--steps", "3", "--keep-steps", "3", "--batch-size", "8"]


def test_online_stores_nothing_and_resumes_exactly(tmp_path, monkeypatch):
    run(tmp_path / "whole", *ONLINE)
    assert not (tmp_path / "whole" / "trajectories").exists()
    real_save = train_agd.save_state

    def killed(file, *rest):
        real_save(file, *rest)
        raise KeyboardInterrupt  # dies right after its first checkpoint

    monkeypatch.setattr(train_agd, "save_state", killed)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "killed", *ONLINE)
    monkeypatch.setattr(train_agd, "save_state", real_save)
    run(tmp_path / "killed", *ONLINE, "--resume")  # rebuilds the buffer it had at step 3
    a = checkpoint.read_tensors(tmp_path / "whole" / "adapters.safetensors")
    b = checkpoint.read_tensors(tmp_path / "killed" / "adapters.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_torchrun_two_gloo_ranks(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "train_agd.py"), "--out", str(tmp_path), *TOY, "--trajectories", "8", "--batch-size", "8"]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(list((tmp_path / "trajectories").glob("shard_*.safetensors"))) == 4  # two from each rank
    state = torch.load(tmp_path / "train_state.pt", weights_only=True)
    assert state["step"] == 4 and len(state["losses"]) == 4
    assert checkpoint.read_tensors(tmp_path / "adapters.safetensors")  # written once, by rank 0


def test_sdxl_trajectory_is_over_20x_smaller_than_the_official():
    shape = (4, 128, 128)  # SDXL's 1024 px latents
    official = trajectories.official_trajectory_bytes(shape)
    assert official == 262_144_000  # 1,000 steps x (input, output) x 4 x 128 x 128 x fp16
    cond = 2 * (77 * 2048 + 1280 + 6)  # context, pooled text, size ids, fp16
    keep = len(trajectories.keep_indices(50, families.FAMILIES["sdxl"].train["keep_steps"]))
    ours = trajectories.trajectory_bytes(shape, 4, keep, cond)
    assert official / ours >= 20, official / ours


def test_missing_prompt_file_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit):
        train_agd.parse_args(["--model", "sdxl", "--prompt-file", str(tmp_path / "none.txt")])
    assert "--prompt-file" in capsys.readouterr().err


def test_bundled_prompt_file():
    bundled = prompts.read_prompts(ROOT / "prompts" / "agd_prompts.txt")
    assert len(bundled) == 125 and len(set(bundled)) == 125
    assert families.FAMILIES["sdxl"].train["trajectories"] == 4 * len(bundled)
