"""sample.py --lora and train_agd.py --lora, on the tiny random pipelines of tiny_pipelines.py and the tiny teacher:

- two LoRAs at 0.7 and 1.3, in the formats people share (tests/lora_files.py), on the UNet and the text
  towers: the CLI's images from --seed equal diffusers' pipeline with load_lora_weights + set_adapters, to 1e-4;
- adapters attach to the LoRA'd base (plug-and-play), on SDXL and on the tiny DiT;
- train_agd.py collects from and trains on the LoRA'd base, and records the LoRAs in the adapters file;
- bad input (a LoRA of another model, an unreadable file, a multiplier that is not a number) is one line,
  and nothing is written.
"""

import json

import pytest
import torch
from lora_files import make_lora

import adapters
import checkpoint
import families
import lora
import sample
import tiny
import train_agd

diffusers = pytest.importorskip("diffusers")

PROMPTS = ["a photograph of an astronaut riding a horse", "a red cube on a blue sphere"]
STEPS, HEIGHT, WIDTH, SEED = 3, 16, 24, 3
MULTIPLIERS = (0.7, 1.3)


@pytest.fixture(scope="module")
def roots(sd15_root, sd21_root, sdxl_root):
    return dict(sd15=sd15_root, sd21=sd21_root, sdxl=sdxl_root)


def two_loras(root, formats, tmp_path):
    """Two random LoRAs of the pipeline at root, one per format; kohya's with alphas per module (LoCon convs:
    rank 2, alpha 1), peft's with lora_alpha in its metadata."""
    kw = {"kohya": dict(rank=4, conv_rank=2, alpha=2, conv_alpha=1), "peft": dict(rank=4, alpha=2)}
    return [make_lora(root, fmt, tmp_path / f"{fmt}-{seed}.safetensors", seed=seed, **kw[fmt.split("_")[0]])
            for seed, fmt in enumerate(formats, 1)]


def specs(files):
    return [f"{file}:{m}" for file, m in zip(files, MULTIPLIERS)]


def cli(name, root, *argv):
    """sample.generate's images (B, 3, H, W) in [0, 1] for these arguments, on the tiny pipeline at root."""
    args = sample.parse_args(["--model", "sdxl" if name == "sdxl" else "sd21", "--weights", str(root), "--steps",
                              str(STEPS), "--height", str(HEIGHT), "--width", str(WIDTH), "--seed", str(SEED),
                              "--device", "cpu", *[a for p in PROMPTS for a in ("--prompt", p)], *argv])
    return sample.generate(args, families.FAMILIES[args.model])[0]


@torch.no_grad()
def pipeline_images(name, root, files, w):
    """The diffusers pipeline's images with the LoRAs loaded by peft at MULTIPLIERS, from the noise of SEED."""
    pipe = diffusers.DiffusionPipeline.from_pretrained(root)
    pipe.set_progress_bar_config(disable=True)
    for i, file in enumerate(files):
        pipe.load_lora_weights(str(file), adapter_name=f"lora{i}")
    pipe.set_adapters([f"lora{i}" for i in range(len(files))], adapter_weights=list(MULTIPLIERS))
    return pipe(PROMPTS, height=HEIGHT, width=WIDTH, num_inference_steps=STEPS, guidance_scale=w,
                generator=torch.Generator().manual_seed(SEED), output_type="pt").images


CASES = [("sd15", ("kohya", "peft")), ("sd21", ("peft", "kohya")), ("sdxl", ("kohya_sgm", "peft"))]


@pytest.mark.parametrize("name, formats", CASES, ids=[f"{n}-{'+'.join(f)}" for n, f in CASES])
def test_two_loras_match_the_pipeline(roots, tmp_path, name, formats):
    """UNet and text towers LoRA'd, CFG at w = 5: the same images as diffusers', which the LoRAs do change."""
    root = roots[name]
    files = two_loras(root, formats, tmp_path)
    argv = ["--cfg", "5"] + [a for s in specs(files) for a in ("--lora", s)]
    images, expected = cli(name, root, *argv), pipeline_images(name, root, files, 5.0)
    assert images.shape == expected.shape == (2, 3, HEIGHT, WIDTH)
    assert ((expected > 0) & (expected < 1)).float().mean() > 0.5  # the clamp hides little
    assert (images - expected).abs().max() < 1e-4
    assert (images - cli(name, root, "--cfg", "5")).abs().max() > 1e-2


def random_adapters(model, file):
    """Adapters on a UNet or DiT with random weights (as if trained), saved to `file`."""
    student = adapters.attach(model, hidden_dim=8, use_timestep=True)
    with torch.no_grad():
        for p in student.adapters.parameters():
            p.normal_(0, 0.5)
    student.save(file)
    return file


def test_adapters_act_on_the_loraed_sdxl(roots, tmp_path):
    """--adapters with --lora: the adapters of the base attached to the LoRA'd UNet, one pass per step;
    both the LoRA and the adapters change the images."""
    root = roots["sdxl"]
    files = two_loras(root, ("kohya_sgm",), tmp_path)
    file = random_adapters(families.load("sdxl", root).model, tmp_path / "agd.safetensors")
    loras = ["--lora", specs(files)[0]]
    images = cli("sdxl", root, "--adapters", str(file), "--w", "3", *loras)

    base = families.load("sdxl", root, height=HEIGHT, width=WIDTH, with_vae=True)
    lora.apply(base.lora_models(), [(files[0], MULTIPLIERS[0])])
    student = adapters.load(base.model, file)
    generator = torch.Generator().manual_seed(SEED)
    noise = torch.randn((len(PROMPTS), *base.shape), generator=generator)
    z = sample.sample_latents(base, PROMPTS, noise, STEPS, student=student, w=3.0, generator=generator)
    with torch.no_grad():
        expected = (base.vae.decode(z, batch_size=1) / 2 + 0.5).clamp(0, 1)
    assert (images - expected).abs().max() < 1e-6
    assert (images - cli("sdxl", root, "--adapters", str(file), "--w", "3")).abs().max() > 1e-2
    assert (images - cli("sdxl", root, "--cfg", "1", *loras)).abs().max() > 1e-2


def tiny_lora(file, seed=0):
    """A random rank-2 peft LoRA of the bundled teacher's attention and MLP layers (ups random too)."""
    teacher = tiny.load_teacher()
    applied = lora.attach(teacher, lora.dit_modules(teacher), rank=2, seed=seed)
    with torch.no_grad():
        for layer in applied.layers:
            layer.up.normal_(0, 0.1, generator=torch.Generator().manual_seed(seed))
    lora.save(applied, file)
    return file


def test_tiny_dit_with_lora_and_adapters(tmp_path):
    """sample.py --model tiny --lora: the teacher with the LoRA fused, with CFG and with the teacher's adapters."""
    file = tiny_lora(tmp_path / "lora.safetensors")
    agd = random_adapters(tiny.load_teacher(), tmp_path / "agd.safetensors")
    classes = [0, 3, 7]
    base = families.load("tiny")
    lora.apply(base.lora_models(), [(file, 1.3)])
    student = adapters.load(base.model, agd)
    for how, kwargs in ((["--cfg", "3"], dict(cfg_scale=3.0)), (["--adapters", str(agd), "--w", "3"],
                                                                  dict(student=student, w=3.0))):
        argv = ["--model", "tiny", "--classes", *map(str, classes), "--steps", "4", "--device", "cpu", *how]
        args = sample.parse_args([*argv, "--lora", f"{file}:1.3"])
        images, _, printed = sample.generate(args, families.FAMILIES["tiny"])
        assert printed.endswith(", LoRA lora.safetensors:1.3")
        generator = torch.Generator().manual_seed(0)
        noise = torch.randn((len(classes), *base.shape), generator=generator)
        x = sample.sample_latents(base, torch.tensor(classes), noise, 4, generator=generator, **kwargs)
        assert torch.equal(images, (x / 2 + 0.5).clamp(0, 1))
        without = sample.generate(sample.parse_args(argv), families.FAMILIES["tiny"])[0]
        assert (images - without).abs().max() > 1e-2


def test_train_agd_collects_from_the_loraed_base_and_records_it(tmp_path):
    file = tiny_lora(tmp_path / "lora.safetensors", seed=1)
    toy = ["--trajectories", "4", "--steps", "2", "--shard-size", "4", "--train-steps", "2", "--batch-size", "4",
           "--no-eval", "--out", str(tmp_path / "run"), "--lora", f"{file}:0.7"]
    args = train_agd.parse_args(toy)
    teacher = tiny.load_teacher()
    lora.apply({"transformer": teacher}, [(file, 0.7)])
    trained_on = train_agd.load_base(args).model.state_dict()
    assert all(torch.equal(v, trained_on[k]) for k, v in teacher.state_dict().items())
    assert any(not torch.equal(v, trained_on[k]) for k, v in tiny.load_teacher().state_dict().items())
    train_agd.main(args)
    record = json.loads(checkpoint.read_metadata(tmp_path / "run" / "adapters.safetensors")["lora"])
    assert record == [{"file": str(file), "multiplier": 0.7, "sha256": lora._sha256(file)}]


# -----------------------------------------------------------------------------
# bad input: one line, naming the key or value at fault, and nothing written


@pytest.mark.parametrize("case, message", [
    ("sd15-on-sdxl", r"sd15\.safetensors: key lora_unet_\S+ names no module of the unet \(a LoRA of another model\?\)"),
    ("unreadable", r"broken\.safetensors: not a readable safetensors file"),
    ("missing", r"none\.safetensors: missing$"),
], ids=["sd15-on-sdxl", "unreadable", "missing"])
def test_bad_lora_is_one_line_and_writes_nothing(roots, tmp_path, case, message):
    files = {"unreadable": tmp_path / "broken.safetensors", "missing": tmp_path / "none.safetensors"}
    files["unreadable"].write_bytes(b"not a safetensors file at all")
    if case == "sd15-on-sdxl":  # its text keys fit SDXL's first tower (OpenAI's CLIP both), its UNet keys do not
        files[case] = make_lora(roots["sd15"], "kohya", tmp_path / "sd15.safetensors", seed=7)
    out = tmp_path / "x.png"
    args = sample.parse_args(["--model", "sdxl", "--weights", str(roots["sdxl"]), "--steps", "1", "--device", "cpu",
                              "--lora", f"{files[case]}:0.5", "--out", str(out)])
    with pytest.raises(checkpoint.CheckpointError, match=message) as e:
        sample.main(args)
    assert "\n" not in str(e.value)
    assert not out.exists()


@pytest.mark.parametrize("cli", [sample, train_agd])
def test_a_multiplier_that_is_not_a_number_is_the_parsers_one_line(capsys, cli):
    with pytest.raises(SystemExit) as e:
        cli.parse_args(["--model", "tiny", "--lora", "a.safetensors:0.7", "--lora", "style.safetensors:strong"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        "error: argument --lora: LoRA 'style.safetensors:strong': expected FILE[:MULTIPLIER] with a number as the "
        "multiplier (e.g. style.safetensors:0.8), got 'strong'")
