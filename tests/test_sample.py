"""sample.py, the CLI: grids that hold the sampled images in order, adapters in place of CFG, one-line errors.

The sampling loop itself is checked against diffusers in test_dit_pipeline.py; here a random DiT of the
tiny teacher's preset stands in for the bundled teacher (which tiny.py may not have trained yet) and a
tiny DiTPipeline in the hub layout for DiT-XL/2.
"""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import adapters
import checkpoint
import dit
import families
import guidance
import sample
import tiny
import vae

pytest.importorskip("diffusers")
from test_dit_pipeline import make_dit_pipeline  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    """A random DiT of the tiny teacher's preset, saved as tiny.py saves the teacher (with its scheduler config)."""
    root = tmp_path_factory.mktemp("tiny-dit-mnist")
    torch.manual_seed(0)
    model = dit.DiT(dit.DiT_models["tiny-mnist"]())
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    tiny.save_teacher(model, root)
    return root


@pytest.fixture(scope="module")
def dit_pipeline(tmp_path_factory):
    return make_dit_pipeline(tmp_path_factory.mktemp("dit-pipeline"))


def run(*argv):
    """main() on these arguments, on the CPU."""
    args = sample.parse_args([*argv, "--device", "cpu"])
    sample.main(args)
    return args


def test_tiny_grid_holds_the_samples_in_order(tiny_teacher, tmp_path):
    out = tmp_path / "grid.png"
    run("--model", "tiny", "--weights", str(tiny_teacher), "--classes", "0", "1", "2", "3", "9",
        "--cfg", "3", "--steps", "4", "--seed", "7", "--out", str(out))
    grid = np.asarray(Image.open(out))
    assert grid.shape == (2 * 28, 4 * 28)  # 4 columns, single channel
    base = families.load("tiny", tiny_teacher)  # v-prediction, x_0 clipped, as the teacher's scheduler config says
    g = torch.Generator().manual_seed(7)
    noise = torch.randn((5, *base.shape), generator=g)
    x = sample.sample_latents(base, torch.tensor([0, 1, 2, 3, 9]), noise, 4, 3.0, generator=g)
    expected = ((x / 2 + 0.5).clamp(0, 1) * 255).round().byte()[:, 0].numpy()  # (B, 28, 28)
    for i, image in enumerate(expected):
        r, c = divmod(i, 4)
        assert np.array_equal(grid[28 * r:28 * (r + 1), 28 * c:28 * (c + 1)], image), i
    assert not grid[28:, 28:].any()  # past the last image: black
    assert 0 < expected.mean() < 255  # the images are not all black or white


def test_prediction_options_come_from_the_scheduler_config(tiny_teacher, dit_pipeline, tmp_path):
    v_clipped = {"prediction_type": "v_prediction", "clip_sample": 1.0}  # tiny.SCHEDULER_CONFIG
    options = lambda weights, sampler="ddpm": families.dit_scheduler(weights, sampler).options  # noqa: E731
    assert options(tiny_teacher) == v_clipped == options(tiny_teacher, "ddim")
    assert options(tiny_teacher / "transformer") == v_clipped
    dit_defaults = {"prediction_type": "epsilon", "clip_sample": None}
    assert options(dit_pipeline) == dit_defaults  # the hub's DDIM config: clip_sample false
    assert options("facebook/DiT-XL-2-256") == dit_defaults  # no local config: DiT's
    assert options(tmp_path / "DiT-XL-2-256x256.pt") == dit_defaults
    ddpm, ddim = families.dit_scheduler(dit_pipeline, "ddpm"), families.dit_scheduler(dit_pipeline, "ddim")
    assert (ddpm.step_fn, ddpm.timestep_spacing) == (guidance.ddpm_step, "iddpm")  # the paper's sampler
    assert (ddim.step_fn, ddim.timestep_spacing, ddim.final) == (guidance.ddim_step, "leading", (1.0, 0.0))


@pytest.mark.skipif(not (ROOT / "assets" / "tiny-dit-mnist").is_dir(), reason="tiny.py has not trained the teacher")
def test_the_bundled_teacher_is_the_default(tmp_path):
    run("--model", "tiny", "--classes", "4", "--steps", "2", "--out", str(tmp_path / "four.png"))
    assert np.asarray(Image.open(tmp_path / "four.png")).shape == (28, 28)


def test_output_names_the_file_and_the_time_per_step(tiny_teacher, tmp_path, capsys):
    out = tmp_path / "sub" / "dir" / "digits.png"
    run("--model", "tiny", "--weights", str(tiny_teacher), "--classes", "5", "--steps", "2", "--sampler", "ddim",
        "--out", str(out))
    printed = capsys.readouterr().out
    assert out.is_file()
    assert "s/step (ddim, 2 steps, 1 images, CFG at w=4, conditional and null passes batched)" in printed
    assert printed.rstrip().endswith(f"-> {out}")


def test_dit_with_adapters_is_the_student_decoded(dit_pipeline, tmp_path, capsys):
    base = families.load("dit", dit_pipeline, sampler="ddim")
    student = adapters.attach(base.model, hidden_dim=8)
    with torch.no_grad():
        for p in student.adapters.parameters():
            p.normal_(0, 0.5)
    student.save(tmp_path / "agd.safetensors")
    out = tmp_path / "agd.png"
    run("--model", "dit", "--weights", str(dit_pipeline), "--classes", "1", "500", "--adapters",
        str(tmp_path / "agd.safetensors"), "--w", "2.5", "--sampler", "ddim", "--steps", "3", "--out", str(out))
    assert "adapters at w=2.5, one pass" in capsys.readouterr().out
    grid = np.asarray(Image.open(out))
    assert grid.shape == (16, 2 * 16, 3)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn((2, *base.shape), generator=g)
    z = sample.sample_latents(base, torch.tensor([1, 500]), noise, 3, student=student, w=2.5, generator=g)
    with torch.no_grad():
        images = (vae.from_pretrained(dit_pipeline).decode(z) / 2 + 0.5).clamp(0, 1)
    expected = (images * 255).round().byte().permute(0, 2, 3, 1).numpy()  # (B, H, W, 3)
    assert np.array_equal(grid[:, :16], expected[0]) and np.array_equal(grid[:, 16:], expected[1])


# -----------------------------------------------------------------------------
# bad input: one line, naming what is wrong


@pytest.mark.parametrize("argv, message", [
    (["--model", "tiny", "--classes", "3", "10"], r"class 10 is out of range: .* has classes 0-9 \(and 10, the null"),
    (["--model", "tiny", "--classes", "-1"], "class -1 is out of range"),
    (["--model", "dit", "--classes", "999", "1000"], "class 1000 is out of range: .* has classes 0-999"),
    (["--model", "dit", "--image-size", "512"], "its images are 16 x 16 px, not 512"),
    (["--model", "tiny", "--image-size", "32"], "its images are 28 x 28 px, not 32"),
    (["--model", "dit", "--adapters", "no/such/agd.safetensors"], r"no/such/agd.safetensors: not in the hub cache .* no such local file"),
    (["--model", "dit", "--adapters", "/no/such/agd.safetensors"], r"/no/such/agd.safetensors: no such file or folder, and not a hub id"),
    (["--model", "dit", "--adapters", "TINY_ADAPTERS"], r"tiny.safetensors: unexpected key blocks\.2\."),
])
def test_bad_input_is_one_line(tiny_teacher, dit_pipeline, tmp_path, argv, message):
    weights = tiny_teacher if argv[1] == "tiny" else dit_pipeline
    if "TINY_ADAPTERS" in argv:  # adapters trained for another model
        adapters.attach(dit.from_pretrained(tiny_teacher), hidden_dim=8).save(tmp_path / "tiny.safetensors")
        argv = [str(tmp_path / "tiny.safetensors") if a == "TINY_ADAPTERS" else a for a in argv]
    with pytest.raises((sample.InputError, checkpoint.CheckpointError), match=message) as e:
        run(*argv, "--weights", str(weights), "--steps", "1", "--out", str(tmp_path / "x.png"))
    assert "\n" not in str(e.value)
    assert not (tmp_path / "x.png").exists()


def test_bad_default_sizes_and_missing_weights(tmp_path):
    with pytest.raises(sample.InputError, match=r"--image-size 300: the dit weights come in 256 and 512 px"):
        run("--model", "dit", "--image-size", "300")  # refused before any download
    with pytest.raises(checkpoint.CheckpointError, match="no such folder"):
        run("--model", "dit", "--weights", str(tmp_path / "missing"))


@pytest.mark.parametrize("argv, message", [
    (["--adapters", "a.safetensors", "--cfg", "3"], "with --adapters give the scale as --w"),
    (["--w", "3"], "--w is the scale asked of --adapters"),
    (["--steps", "0"], "--steps must be in"),
    (["--classes", "one"], "invalid int value"),
    (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "nonsense"], "--device"),
])
def test_bad_arguments_are_refused_by_the_parser(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        sample.parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_the_script_prints_one_line_not_a_traceback(tiny_teacher, tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--model", "tiny", "--weights", str(tiny_teacher),
                             "--classes", "12", "--device", "cpu", "--out", str(tmp_path / "x.png")],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [f"error: class 12 is out of range: {tiny_teacher} has classes 0-9 "
                                                  "(and 10, the null class that CFG uses)"]
