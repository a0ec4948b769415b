"""DiT end to end: the paper's own .pt checkpoints, the full-size key sets, and the whole sampling loop.

- facebookresearch/DiT checkpoints load into the same model as the hub's files: parity of a tiny one
  with a reference of the paper's forward written below from its models.py (timm blocks, freq_shift 0);
- DiT-XL/2 256 and 512: every key and shape of the official files (both layouts) on the meta device;
- class labels to images: our sampler against diffusers' DiTPipeline (DDIM, the hub's scheduler) and
  DDPMScheduler with learned range (the paper's sampler), from the same noise, to 1e-4.
"""

import argparse
import io
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import adapters
import checkpoint
import dit
import families
from util import max_rel_err
import guidance
import sample
import vae

diffusers = pytest.importorskip("diffusers")




# -----------------------------------------------------------------------------
# the paper's checkpoint layout, written out from facebookresearch/DiT models.py


def original_shapes(depth, hidden, patch, in_channels, grid, num_classes, learn_sigma=True, mlp_ratio=4):
    """Every key of a facebookresearch/DiT state dict and its shape (its DiT(...).state_dict())."""
    D, p, M = hidden, patch, int(hidden * mlp_ratio)
    out = p * p * in_channels * (2 if learn_sigma else 1)
    shapes = {"pos_embed": (1, grid * grid, D),  # a frozen parameter there, so it is saved
              "x_embedder.proj.weight": (D, in_channels, p, p), "x_embedder.proj.bias": (D,),
              "t_embedder.mlp.0.weight": (D, 256), "t_embedder.mlp.0.bias": (D,),
              "t_embedder.mlp.2.weight": (D, D), "t_embedder.mlp.2.bias": (D,),
              "y_embedder.embedding_table.weight": (num_classes + 1, D)}  # + the null class (label dropout)
    for i in range(depth):
        for name, shape in [("attn.qkv", (3 * D, D)), ("attn.proj", (D, D)), ("mlp.fc1", (M, D)),
                            ("mlp.fc2", (D, M)), ("adaLN_modulation.1", (6 * D, D))]:
            shapes[f"blocks.{i}.{name}.weight"] = shape
            shapes[f"blocks.{i}.{name}.bias"] = shape[:1]
    shapes.update({"final_layer.linear.weight": (out, D), "final_layer.linear.bias": (out,),
                   "final_layer.adaLN_modulation.1.weight": (2 * D, D),
                   "final_layer.adaLN_modulation.1.bias": (2 * D,)})
    return shapes


def original_pos_embed(dim, grid):
    """MAE's 2-d sin-cos positions the way the paper's code makes them: numpy float64, then float32, (1, T, D)."""
    def embed(pos, d):
        angles = np.outer(pos.reshape(-1), 1.0 / 10000 ** (np.arange(d // 2) / (d / 2)))
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    cols, rows = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))
    return torch.from_numpy(np.concatenate([embed(cols, dim // 2), embed(rows, dim // 2)], axis=1)).float()[None]


def random_original(shapes, seed=0):
    """A random state dict in the paper's layout, its positions the fixed ones."""
    g = torch.Generator().manual_seed(seed)
    sd = {k: torch.randn(shape, generator=g) * 0.1 for k, shape in shapes.items()}
    sd["pos_embed"] = original_pos_embed(shapes["pos_embed"][2], math.isqrt(shapes["pos_embed"][1]))
    return sd


def original_forward(sd, x, t, y, num_heads):
    """The paper's DiT forward (its models.py with timm's Attention and Mlp), over its state dict."""
    def linear(h, name):
        return F.linear(h, sd[f"{name}.weight"], sd[f"{name}.bias"])

    def norm(h):
        return F.layer_norm(h, h.shape[-1:], eps=1e-6)

    p = sd["x_embedder.proj.weight"].shape[-1]
    h = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=p)
    h = h.flatten(2).transpose(1, 2) + sd["pos_embed"]  # (B, T, D)
    B, T, D = h.shape
    hs = D // num_heads
    freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=x.dtype) / 128)  # GLIDE's, no shift
    angles = t.to(x.dtype)[:, None] * freqs[None]
    c = linear(F.silu(linear(torch.cat([angles.cos(), angles.sin()], 1), "t_embedder.mlp.0")), "t_embedder.mlp.2")
    c = c + sd["y_embedder.embedding_table.weight"][y]  # (B, D)
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    for i in range(depth):
        b = f"blocks.{i}."
        shift1, scale1, gate1, shift2, scale2, gate2 = linear(F.silu(c), b + "adaLN_modulation.1")[:, None].chunk(6, -1)
        q, k, v = linear(norm(h) * (1 + scale1) + shift1, b + "attn.qkv").reshape(B, T, 3, num_heads, hs).unbind(2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, nh, T, hs)
        a = (q @ k.transpose(-2, -1) / math.sqrt(hs)).softmax(-1) @ v
        h = h + gate1 * linear(a.transpose(1, 2).reshape(B, T, D), b + "attn.proj")
        m = F.gelu(linear(norm(h) * (1 + scale2) + shift2, b + "mlp.fc1"), approximate="tanh")
        h = h + gate2 * linear(m, b + "mlp.fc2")
    shift, scale = linear(F.silu(c), "final_layer.adaLN_modulation.1")[:, None].chunk(2, -1)
    out = linear(norm(h) * (1 + scale) + shift, "final_layer.linear")  # (B, T, p*p*C)
    g, C = math.isqrt(T), out.shape[-1] // (p * p)
    return out.reshape(B, g, g, p, p, C).permute(0, 5, 1, 3, 2, 4).reshape(B, C, g * p, g * p)


TINY = dict(depth=2, hidden=32, patch=2, in_channels=4, grid=4, num_classes=10)  # no preset: 2 heads given
TINY_MNIST = dict(depth=4, hidden=128, patch=4, in_channels=1, grid=7, num_classes=10)  # the preset: 4 heads


def adam_state(seed=0):
    """An optimizer state dict as train.py saves one (tensors, numbers, tuples, lists)."""
    layer = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-4)
    layer(torch.randn(1, 2)).sum().backward()
    opt.step()
    return opt.state_dict()


@pytest.mark.parametrize("shapes, num_heads, layout", [
    (TINY, 2, "state dict"), (TINY, 2, "train.py checkpoint"), (TINY_MNIST, None, "folder"),
    (dict(TINY, learn_sigma=False), 2, "state dict")])
def test_original_checkpoint_matches_the_papers_forward(tmp_path, shapes, num_heads, layout):
    sd = random_original(original_shapes(**shapes))
    file = tmp_path / "0400000.pt"
    if layout == "train.py checkpoint":  # {"model", "ema", "opt", "args"}: the EMA weights are the ones
        torch.save({"model": random_original(original_shapes(**shapes), seed=1), "ema": sd, "opt": adam_state(),
                    "args": argparse.Namespace(model="DiT-XL/2", image_size=256)}, file)
    else:
        torch.save(sd, file)
    model = dit.from_pretrained(tmp_path if layout == "folder" else file, num_heads=num_heads)
    heads = num_heads or 4
    assert model.config == dit.DiTConfig(
        input_size=shapes["grid"] * shapes["patch"], patch_size=shapes["patch"], in_channels=shapes["in_channels"],
        hidden_size=shapes["hidden"], depth=shapes["depth"], num_heads=heads, num_classes=10,
        learn_sigma=shapes.get("learn_sigma", True), freq_shift=0)
    C, S = shapes["in_channels"], shapes["grid"] * shapes["patch"]
    x, t, y = torch.randn(3, C, S, S), torch.tensor([0, 321.5, 999]), torch.tensor([0, 7, 10])  # 10: null class
    with torch.no_grad():
        assert max_rel_err(model(x, t, y=y), original_forward(sd, x, t, y, heads)) < 1e-5


def test_both_layouts_hold_the_same_model(tmp_path):
    """The same weights as a .pt and in the hub's layout: equal tensors; equal outputs under the same freq_shift."""
    torch.save(random_original(original_shapes(**TINY_MNIST)), tmp_path / "tiny.pt")
    original = dit.from_pretrained(tmp_path / "tiny.pt")
    as_hub = dit.DiT(replace(original.config, freq_shift=1))  # the hub's layout implies diffusers' freq_shift
    as_hub.load_state_dict(original.state_dict())
    dit.save_pretrained(as_hub, tmp_path / "hub" / "transformer")
    hub = dit.from_pretrained(tmp_path / "hub")
    assert hub.config == replace(original.config, freq_shift=1)
    for k, v in original.state_dict().items():
        assert torch.equal(hub.state_dict()[k], v), k
    shift0 = dit.DiT(original.config).eval()
    shift0.load_state_dict(hub.state_dict())
    x, t, y = torch.randn(2, 1, 28, 28), torch.tensor([10, 700]), torch.tensor([3, 10])
    with torch.no_grad():
        assert torch.equal(shift0(x, t, y=y), original(x, t, y=y))
        assert max_rel_err(hub(x, t, y=y), original(x, t, y=y)) > 1e-3  # freq_shift matters: the check can fail


def saved_bytes(obj):
    """What torch.save writes for `obj`."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


class NotATensor:
    """A pickled object that weights_only loading must refuse."""


def checkpoint_without(key, **changed):
    """A tiny-mnist-sized checkpoint in the paper's layout, less `key`, with some tensors changed."""
    sd = {**random_original(original_shapes(**TINY_MNIST)), **changed}
    sd.pop(key, None)
    return sd


@pytest.mark.parametrize("make, message", [
    (lambda f: f.write_bytes(b"not a checkpoint"), "not a PyTorch checkpoint of plain tensors"),
    (lambda f: torch.save({"x": NotATensor()}, f), "not a PyTorch checkpoint of plain tensors"),
    (lambda f: f.write_bytes(saved_bytes(checkpoint_without(None))[:2000]), "not a readable PyTorch checkpoint"),
    (lambda f: torch.save([torch.zeros(1)], f), "not a state dict"),
    (lambda f: torch.save(checkpoint_without(None, pos_embed=torch.randn(1, 49, 128)), f),
     r"pos_embed is not the fixed 2-d sin-cos positions of a 7\^2 grid"),
    (lambda f: torch.save(checkpoint_without(None, pos_embed=torch.zeros(1, 48, 128)), f),
     "48 positions, not a square grid"),
    (lambda f: torch.save(checkpoint_without("blocks.1.mlp.fc2.bias"), f), "missing key blocks.1.mlp.fc2.bias"),
    (lambda f: torch.save(checkpoint_without("x_embedder.proj.weight"), f), "missing key x_embedder.proj.weight"),
    (lambda f: torch.save(checkpoint_without(None, extra=torch.zeros(1)), f), "unexpected key extra"),
    (lambda f: torch.save(random_original(original_shapes(**TINY)), f), "no preset's.*pass num_heads"),
])
def test_original_checkpoint_errors(tmp_path, make, message):
    file = tmp_path / "DiT.pt"
    make(file)
    with pytest.raises(checkpoint.CheckpointError, match=message) as e:
        dit.from_pretrained(file)
    assert str(file) in str(e.value) and "\n" not in str(e.value)


def test_a_folder_of_several_checkpoints_asks_for_one(tmp_path):
    for name in ("0100000.pt", "0200000.pt"):
        torch.save(random_original(original_shapes(**TINY_MNIST)), tmp_path / name)
    with pytest.raises(checkpoint.CheckpointError, match="holds 2 .pt checkpoints"):
        dit.from_pretrained(tmp_path)
    assert dit.from_pretrained(tmp_path / "0200000.pt").config.depth == 4


# -----------------------------------------------------------------------------
# full size, on the meta device


@pytest.mark.parametrize("image_size", [256, 512])
def test_full_size_original_checkpoint_keys(image_size):
    """DiT-XL-2-{256,512}.pt: the config read off its shapes is DiT-XL/2's; every key and shape loads."""
    shapes = original_shapes(depth=28, hidden=1152, patch=2, in_channels=4, grid=image_size // 16, num_classes=1000)
    sd = {k: torch.empty(shape, device="meta") for k, shape in shapes.items()}
    cfg = dit.config_from_original(sd)
    assert cfg == replace(dit.DiT_models["DiT-XL/2"](), input_size=image_size // 8)
    with torch.device("meta"):
        model = dit.DiT(cfg)
    del sd["pos_embed"]
    checkpoint.check_keys({k: v.shape for k, v in model.state_dict().items()}, sd, f"DiT-XL-2-{image_size}.pt")
    assert round(sum(p.numel() for p in model.parameters()) / 1e6) == 675  # the paper's count (Table 4)
    # our fixed positions are the paper's at full size too
    assert dit.from_original({"pos_embed": original_pos_embed(1152, image_size // 16)}, cfg) == {}


def test_full_size_512_hub_keys():
    """facebook/DiT-XL-2-512's transformer/config.json: every diffusers key maps onto ours with its shape."""
    config = {"_class_name": "Transformer2DModel", "sample_size": 64, "patch_size": 2, "in_channels": 4,
              "out_channels": 8, "num_layers": 28, "num_attention_heads": 16, "attention_head_dim": 72,
              "num_embeds_ada_norm": 1000, "norm_type": "ada_norm_zero", "activation_fn": "gelu-approximate",
              "attention_bias": True, "norm_elementwise_affine": False}
    cfg = dit.config_from_diffusers(config)
    assert cfg == replace(dit.DiT_models["DiT-XL/2"](), input_size=64, freq_shift=1, norm_eps=1e-5)
    with torch.device("meta"):
        ref = diffusers.DiTTransformer2DModel(**{k: v for k, v in config.items() if k != "_class_name"})
        ours = dit.DiT(cfg)
    checkpoint.check_keys({k: v.shape for k, v in ours.state_dict().items()},
                          dit.from_diffusers(ref.state_dict(), 28), "DiT-XL-2-512")


# -----------------------------------------------------------------------------
# the sampling loop against diffusers


HUB_DDIM = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02, clip_sample=False,
                set_alpha_to_one=True, steps_offset=0, prediction_type="epsilon")  # facebook/DiT-XL-2-256's scheduler


def make_dit_pipeline(root, seed=0):
    """A tiny DiTPipeline in the hub's layout: a random DiT with learned sigma and 1000 classes (the
    pipeline's null class is 1000), a random 2-level autoencoder, the hub's DDIM scheduler config."""
    torch.manual_seed(seed)
    transformer = diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2, sample_size=8,
        patch_size=2, num_embeds_ada_norm=1000, norm_eps=1e-6)
    sd = transformer.state_dict()
    for k in sd:  # random normal weights everywhere, so that no zero-init hides a bug
        sd[k] = torch.randn_like(sd[k]) * 0.2
    for k in sd:  # one embedder, copied into every block, as in converted checkpoints
        if ".norm1.emb." in k and not k.startswith("transformer_blocks.0."):
            sd[k] = sd["transformer_blocks.0." + k.split(".", 2)[2]]
    transformer.load_state_dict(sd)
    ae = diffusers.AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                                 up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, layers_per_block=1,
                                 norm_num_groups=32, sample_size=16)
    pipe = diffusers.DiTPipeline(transformer=transformer, vae=ae, scheduler=diffusers.DDIMScheduler(**HUB_DDIM))
    pipe.save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = make_dit_pipeline(tmp_path_factory.mktemp("dit-pipeline"))
    pipe = diffusers.DiTPipeline.from_pretrained(root)
    pipe.set_progress_bar_config(disable=True)
    return pipe, root


LABELS = [3, 999, 0]


def sample_dit(base, labels, cfg_scale=None, steps=8, seed=0, student=None, w=None):
    """sample.py's DiT path: x_T, then every step's noise, from one generator of `seed`."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((len(labels), *base.shape), generator=g)
    return sample.sample_latents(base, labels, noise, steps, cfg_scale, student=student, w=w, generator=g)


@pytest.mark.parametrize("cfg_scale", [1.0, 4.0])
def test_class_to_image_matches_dit_pipeline(pipeline, cfg_scale):
    """DDIM: sample.py's whole path (load, sample, decode, to [0, 1]) against DiTPipeline on the same files."""
    pipe, root = pipeline
    expected = pipe(LABELS, guidance_scale=cfg_scale, generator=torch.Generator().manual_seed(0),
                    num_inference_steps=8, output_type="pt").images  # (B, 3, H, W) in [0, 1]
    args = sample.parse_args(["--model", "dit", "--weights", str(root), "--classes", *map(str, LABELS),
                              "--cfg", str(cfg_scale), "--sampler", "ddim", "--steps", "8", "--device", "cpu"])
    images, _, _ = sample.generate(args, families.FAMILIES["dit"])
    assert images.shape == expected.shape == (3, 3, 16, 16)
    assert ((expected > 0) & (expected < 1)).float().mean() > 0.5  # not saturated: the clamp hides nothing
    assert (images - expected).abs().max() < 1e-4
    if cfg_scale != 1:  # guidance changes the images: the comparison above could fail
        unguided = pipe(LABELS, guidance_scale=1.0, generator=torch.Generator().manual_seed(0),
                        num_inference_steps=8, output_type="pt").images
        assert (unguided - expected).abs().max() > 1e-2


def test_ddpm_learned_variance_matches_diffusers_scheduler(pipeline):
    """The paper's sampler: IDDPM-respaced DDPM with learned range, CFG on epsilon, variance from the
    conditional pass, against DDPMScheduler(variance_type="learned_range") on the same timesteps."""
    pipe, root = pipeline
    steps, w = 10, 4.0
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4,
                                        beta_end=0.02, variance_type="learned_range", clip_sample=False)
    scheduler.set_timesteps(timesteps=families.dit_scheduler(root).timesteps(steps).tolist())  # DiT's own
    assert scheduler.timesteps.tolist() == [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor(LABELS)
    x = torch.randn(3, 4, 8, 8, generator=g)
    with torch.no_grad():
        for t in scheduler.timesteps:
            out = pipe.transformer(torch.cat([x, x]), t.expand(6), class_labels=torch.cat([labels, labels * 0 + 1000]))
            cond, uncond = out.sample.chunk(2)
            eps = uncond[:, :4] + w * (cond[:, :4] - uncond[:, :4])
            x = scheduler.step(torch.cat([eps, cond[:, 4:]], 1), t, x, generator=g).prev_sample
    ours = sample_dit(families.load("dit", root, sampler="ddpm"), labels, w, steps)
    assert max_rel_err(ours, x) < 1e-4
    ae = vae.from_pretrained(root)
    with torch.no_grad():
        assert (ae.decode(ours) - pipe.vae.decode(x / ae.scaling_factor).sample).abs().max() < 1e-4


def test_passes_per_step(pipeline):
    """Adapters: one pass of B samples per step, at scale w; CFG: one pass of 2B; w = 1: one pass of B."""
    _, root = pipeline
    base = families.load("dit", root, sampler="ddim")
    model = base.model
    student = adapters.attach(model, hidden_dim=8)
    with torch.no_grad():
        for p in student.adapters.parameters():  # trained-like: not the zero output of a fresh adapter
            p.normal_(0, 0.5)
    batches = []
    model.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    labels = torch.tensor(LABELS)

    def run(**kw):
        return sample_dit(base, labels, steps=5, **kw)

    a, b = run(student=student, w=2.0), run(student=student, w=5.0)
    assert batches == [3] * 10
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        scheduler = guidance.Scheduler(guidance.VPSchedule(guidance.linear_schedule()), guidance.ddim_step,
                                       dict(prediction_type="epsilon", clip_sample=None))  # DiTPipeline's
        by_hand = guidance.sample(lambda x, t: student(x, t, w=2.0, y=labels), x, scheduler, scheduler.timesteps(5))
    assert torch.equal(a, by_hand)
    assert max_rel_err(a, b) > 1e-3
    batches.clear()
    run(cfg_scale=2.0)
    assert batches == [6] * 5
    batches.clear()
    run(cfg_scale=1.0)  # w = 1 is the conditional model: no null pass
    assert batches == [3] * 5
