"""The tiny DiT's ControlNet: residuals after the first blocks, zero at initialization, trained to follow a
silhouette (tiny_controlnet.py), saved in the hub layout; composed with CFG as every ControlNet here."""

import pytest
import torch

import checkpoint
import controlnet
import dit
import families
import guidance
import tiny
import tiny_controlnet
from util import max_rel_err


@pytest.fixture(scope="module")
def teacher():
    return tiny.load_teacher()


@pytest.fixture(scope="module")
def digits():
    images, labels = tiny.load_digits()
    return images[:64], labels[:64]


def randomized(net, seed=0):
    """A DiT ControlNet with its zero layers moved: residuals that matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in [*net.pos_embed_input.parameters(), *net.controlnet_blocks.parameters()]:
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return net.eval()


def inputs(digits, n=4):
    images, labels = digits
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 1, 28, 28, generator=g)
    y = labels[:n].clone()
    y[-1] = tiny.NULL_CLASS
    return x, torch.tensor([900, 500, 100, 3][:n]), tiny_controlnet.control_image(images[:n]), y


def test_residuals_are_added_after_the_first_blocks(teacher, digits):
    """block_residuals = a forward hook on block i adding residual i to its output."""
    x, t, _, y = inputs(digits)
    g = torch.Generator().manual_seed(2)
    residuals = [torch.randn(4, 49, 128, generator=g) for _ in range(2)]
    hooks = [teacher.blocks[i].register_forward_hook(lambda m, a, out, r=r: out + r) for i, r in enumerate(residuals)]
    with torch.no_grad():
        expected = teacher(x, t, y)
    for h in hooks:
        h.remove()
    with torch.no_grad():
        out = teacher(x, t, y, block_residuals=residuals)
        plain = teacher(x, t, y)
    assert max_rel_err(out, expected) <= 1e-6
    assert max_rel_err(plain, expected) > 1e-2
    with pytest.raises(ValueError, match="block_residuals: 6 given, this DiT has 4 blocks"):
        teacher(x, t, y, block_residuals=residuals * 3)


def test_fresh_controlnet_is_a_copy_that_changes_nothing(teacher, digits):
    net = controlnet.DiTControlNet.from_dit(teacher, num_layers=2)
    for i in range(2):
        for (k, a), (_, b) in zip(net.blocks[i].state_dict().items(), teacher.blocks[i].state_dict().items()):
            assert torch.equal(a, b), k
    x, t, control, y = inputs(digits)
    with torch.no_grad():
        assert torch.equal(teacher(x, t, y, **net(x, t, control, y)), teacher(x, t, y))
        moved = randomized(net)
        assert max_rel_err(teacher(x, t, y, **moved(x, t, control, y)), teacher(x, t, y)) > 1e-3


def test_save_load_and_fit(teacher, digits, tmp_path):
    net = randomized(controlnet.DiTControlNet.from_dit(teacher))
    controlnet.save_pretrained(net, tmp_path / "cn")
    loaded = controlnet.from_pretrained(tmp_path / "cn")
    assert isinstance(loaded, controlnet.DiTControlNet) and loaded.config == net.config
    controlnet.check_fits(loaded, teacher)
    x, t, control, y = inputs(digits)
    with torch.no_grad():
        a, b = net(x, t, control, y, scale=0.5), loaded(x, t, control, y, scale=0.5)
    assert all(torch.equal(p, q) for p, q in zip(a["block_residuals"], b["block_residuals"]))
    other = dit.DiT(dit.DiTConfig(input_size=28, patch_size=4, in_channels=1, hidden_size=64, depth=2, num_heads=2,
                                  num_classes=10, freq_shift=1))
    with pytest.raises(checkpoint.CheckpointError, match="does not fit this DiT") as e:
        controlnet.check_fits(loaded, other)
    assert "\n" not in str(e.value)


def test_cfg_runs_the_controlnet_on_both_halves(teacher, digits):
    """guidance.guided over controlled(teacher): the ControlNet sees the conditional and the null class."""
    net = randomized(controlnet.DiTControlNet.from_dit(teacher))
    x, t, control, y = inputs(digits)
    null = torch.full_like(y, tiny.NULL_CLASS)
    extra, extra_null = controlnet.control_condition([net], control, 0.7, batch=4)
    denoise = guidance.guided(controlnet.controlled(teacher, [net]), 3.0, {"y": y, **extra}, {"y": null, **extra_null})
    with torch.no_grad():
        out = denoise(x, t)
        on = teacher(x, t, y, **net(x, t, control, y, scale=0.7))
        off = teacher(x, t, null, **net(x, t, control, null, scale=0.7))
    assert max_rel_err(out, guidance.cfg(on, off, 3.0, 1)) <= 1e-5


def test_control_image_and_fidelity(digits):
    images, _ = digits
    controls = tiny_controlnet.control_image(images)
    assert controls.shape == images.shape and 0 <= controls.min() and controls.max() <= 1
    assert (controls[images > 0] > 0.5).float().mean() > 0.99  # the strokes lie inside the silhouette
    assert tiny_controlnet.control_fidelity(images, controls) == 1.0  # a digit follows its own silhouette
    other = tiny_controlnet.control_fidelity(images, controls.roll(1, 0))
    assert 0.2 < other < 0.8  # another digit's silhouette overlaps in part
    blank = -torch.ones(2, 1, 28, 28)
    assert tiny_controlnet.control_fidelity(blank, tiny_controlnet.control_image(blank)) == 1.0
    left, right = blank.clone(), blank.clone()
    left[:, :, 10:18, 2:8], right[:, :, 10:18, 20:26] = 1, 1
    assert tiny_controlnet.control_fidelity(left, tiny_controlnet.control_image(right)) == 0.0


def test_training_moves_only_the_controlnet(teacher, digits):
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    net = tiny_controlnet.train_controlnet(teacher, *digits, steps=3, batch_size=8, ema_decay=0.0)
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())
    assert net.controlnet_blocks[0].weight.abs().max() > 0  # the zero layers moved off zero


@pytest.mark.skipif(not (tiny_controlnet.CONTROLNET / "config.json").is_file(), reason="no bundled tiny ControlNet")
def test_bundled_controlnet_makes_samples_follow_the_control(teacher):
    """Held-out digits' silhouettes, CFG at w = 3 with and without the bundled ControlNet, the same noise."""
    net = controlnet.from_pretrained(tiny_controlnet.CONTROLNET)
    controlnet.check_fits(net, teacher)
    images, labels = tiny.load_digits()
    _, held_out = tiny.split(len(images))
    idx = held_out[:20]
    controls, y = tiny_controlnet.control_image(images[idx]), labels[idx]
    null = torch.full_like(y, tiny.NULL_CLASS)
    extra, extra_null = controlnet.control_condition([net], controls, 1.0, batch=len(y))
    scheduler = families.dit_scheduler(tiny.TEACHER)  # the teacher's DDPM, as sample.py --model tiny runs it
    fidelity = {}
    for name, model, cond, uncond in (("plain", teacher, {"y": y}, {"y": null}),
                                      ("controlnet", controlnet.controlled(teacher, [net]), {"y": y, **extra},
                                       {"y": null, **extra_null})):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(len(y), 1, 28, 28, generator=g)
        with torch.no_grad():
            samples = guidance.sample(guidance.guided(model, 3.0, cond, uncond), x, scheduler, scheduler.timesteps(25),
                                      generator=g)
        fidelity[name] = tiny_controlnet.control_fidelity(samples, controls)
    # the bundled weights are 200 steps of the recipe (BENCHMARKS.md): a measured gain of 0.07 IoU here
    assert fidelity["controlnet"] > fidelity["plain"] + 0.03, fidelity
