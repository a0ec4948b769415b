"""controlnet.py against diffusers' ControlNetModel, and unet.py's residuals against UNet2DConditionModel's.

- tiny SD 2.1-like and SDXL-like ControlNets with every parameter randomized (zero convs included):
  the same residuals as diffusers, with conditioning scale, guess mode, global pooling and BGR input;
- the UNet with residuals equals diffusers' UNet with down_block_additional_residuals and
  mid_block_additional_residual;
- composition: several ControlNets sum, guess mode leaves the null half alone, start / end fractions
  switch a ControlNet on and off at diffusers' steps;
- full-size SD 1.5 / 2.1 / SDXL ControlNet configs key by key and shape by shape on the meta device;
- the original layout (control_model.*): a tiny file written here, checked first against diffusers'
  own converter, loads and gives diffusers' residuals; its config read off the shapes at full size;
- bad input: a ControlNet for another base, a broken file, mismatched counts: one-line errors.
"""

import dataclasses
import json
import shutil

import pytest
import torch
from diffusers import ControlNetModel, UNet2DConditionModel  # test-only reference
from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING, convert_controlnet_checkpoint
from safetensors.torch import load_file, save_file

import checkpoint
import controlnet
import unet
from util import max_rel_err

# diffusers' ControlNetModel options; conditioning_embedding_out_channels (8, 16): one stride-2 step,
# so control images are twice the latents' side
TINY = {
    "sd2.1-like": dict(
        block_out_channels=(32, 64, 64), layers_per_block=2, norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        attention_head_dim=(1, 2, 4), cross_attention_dim=24, use_linear_projection=True, upcast_attention=True,
        conditioning_embedding_out_channels=(8, 16)),
    "sdxl-like": dict(
        block_out_channels=(32, 64, 64), layers_per_block=2, norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        transformer_layers_per_block=(1, 2, 3), attention_head_dim=(1, 2, 4), cross_attention_dim=32,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=16 + 6 * 8, conditioning_embedding_out_channels=(8, 16)),
}
def randomized(model, seed=0):
    """Every parameter moved off its initialization, zero convs included (zeros would make parity trivial)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def reference(name, **changes):
    torch.manual_seed(0)
    return randomized(ControlNetModel(**{**TINY[name], **changes}))


def inputs(name, batch=2, side=8):
    """(x, t, control, cond) for a tiny config; cond holds text_embeds and time_ids when SDXL-like."""
    c = TINY[name]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 4, side, side + 2, generator=g)  # not square: rows and columns must not swap
    t = torch.tensor([999.0, 10.0, 500.0][:batch])
    control = torch.rand(batch, 3, 2 * side, 2 * side + 4, generator=g)
    cond = dict(context=torch.randn(batch, 7, c["cross_attention_dim"], generator=g))
    if c.get("addition_embed_type") == "text_time":
        sizes = torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024], [768, 512, 32, 16, 1024, 1024]] * 2)[:batch]
        cond.update(text_embeds=torch.randn(batch, 16, generator=g), time_ids=sizes)
    return x, t, control, cond


@torch.no_grad()
def run_reference(model, x, t, control, cond, scale=1.0, guess_mode=False):
    added = {k: cond[k] for k in ("text_embeds", "time_ids")} if "text_embeds" in cond else None
    down, mid = model(x, t, cond["context"], control, conditioning_scale=scale, added_cond_kwargs=added,
                      guess_mode=guess_mode, return_dict=False)
    return list(down), mid


def saved(model, folder):
    model.save_pretrained(folder)  # config.json + diffusion_pytorch_model.safetensors
    return folder


# -----------------------------------------------------------------------------
# parity


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("scale, guess_mode", [(1.0, False), (0.5, False), (0.7, True)])
def test_residuals_match_diffusers(tmp_path, name, scale, guess_mode):
    ref = reference(name)
    ours = controlnet.from_pretrained(saved(ref, tmp_path / "cn"))
    assert isinstance(ours, controlnet.ControlNet) and not ours.training
    args = inputs(name)
    down, mid = run_reference(ref, *args, scale=scale, guess_mode=guess_mode)
    with torch.no_grad():
        out = ours(*args[:3], **args[3], scale=scale, guess_mode=guess_mode)
    assert len(out["down_residuals"]) == len(down) == 9  # conv_in, 3 x 2 resnets, 2 downsamplers
    for a, b in zip(out["down_residuals"] + [out["mid_residual"]], down + [mid]):
        assert a.shape == b.shape
        assert max_rel_err(a, b) <= 1e-5
    assert mid.abs().max() > 0.1  # randomized zero convs: residuals that matter
    # a scale per sample: each row as with its own scale
    with torch.no_grad():
        rows = ours(*args[:3], **args[3], scale=torch.tensor([scale, 0.0]), guess_mode=guess_mode)
    assert max_rel_err(rows["mid_residual"][0], mid[0]) <= 1e-5 and rows["mid_residual"][1].abs().max() == 0
    with pytest.raises(ValueError, match="a control image of 20 x 16 px makes a 10 x 8 grid, the latents are 12 x 8"):
        ours(torch.randn(2, 4, 8, 12), *args[1:3], **args[3])


@pytest.mark.parametrize("changes", [dict(global_pool_conditions=True),
                                     dict(controlnet_conditioning_channel_order="bgr")], ids=["global-pool", "bgr"])
def test_pooled_and_bgr_controlnets_match_diffusers(tmp_path, changes):
    ref = reference("sd2.1-like", **changes)
    ours = controlnet.from_pretrained(saved(ref, tmp_path / "cn"))
    args = inputs("sd2.1-like")
    for guess_mode in (False, True):  # pooling disables guess mode's ramp
        down, mid = run_reference(ref, *args, scale=0.5, guess_mode=guess_mode)
        with torch.no_grad():
            out = ours(*args[:3], **args[3], scale=0.5, guess_mode=guess_mode)
        for a, b in zip(out["down_residuals"] + [out["mid_residual"]], down + [mid]):
            assert a.shape == b.shape and max_rel_err(a, b) <= 1e-5
    if "global_pool_conditions" in changes:
        assert mid.shape[-2:] == (1, 1)
    else:  # the flip matters: RGB input would give other residuals
        ref.register_to_config(controlnet_conditioning_channel_order="rgb")
        rgb, _ = run_reference(ref, *args, scale=0.5)
        assert max_rel_err(rgb[0], out["down_residuals"][0]) > 1e-2


@pytest.mark.parametrize("name", ["sd2.1-like", "sdxl-like"])
def test_unet_residuals_match_diffusers(tmp_path, name):
    """The residuals added to the skips after the down pass and to the mid block's output, as diffusers adds them."""
    options = {k: v for k, v in TINY[name].items() if k != "conditioning_embedding_out_channels"}
    options["up_block_types"] = tuple(k.replace("Down", "Up") for k in reversed(options["down_block_types"]))
    options.pop("upcast_attention", None)
    torch.manual_seed(0)
    ref = randomized(UNet2DConditionModel(**options))
    ref.save_pretrained(tmp_path / "unet")
    ours = unet.from_pretrained(tmp_path)
    net = controlnet.from_pretrained(saved(reference(name), tmp_path / "cn"))
    controlnet.check_fits(net, ours)
    x, t, control, cond = inputs(name)
    with torch.no_grad():
        residuals = net(x, t, control, **cond, scale=0.5)
        out = ours(x, t, **cond, **residuals)
        plain = ours(x, t, **cond)
    added = {k: cond[k] for k in ("text_embeds", "time_ids")} if "text_embeds" in cond else None
    with torch.no_grad():
        expected = ref(x, t, cond["context"], added_cond_kwargs=added,
                       down_block_additional_residuals=residuals["down_residuals"],
                       mid_block_additional_residual=residuals["mid_residual"]).sample
    assert max_rel_err(out, expected) <= 1e-5
    assert max_rel_err(plain, expected) > 1e-2  # the residuals changed the output
    with pytest.raises(ValueError, match="down_residuals: 8 given, this UNet has 9 skips"):
        ours(x, t, **cond, down_residuals=residuals["down_residuals"][1:])


# -----------------------------------------------------------------------------
# composition


class Recorder(torch.nn.Module):
    """A stand-in base model: records what it is called with, returns x."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, t, **cond):
        self.calls.append(cond)
        return x


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    """Two tiny SDXL-like ControlNets with different weights."""
    root = tmp_path_factory.mktemp("nets")
    return [controlnet.from_pretrained(saved(randomized(ControlNetModel(**TINY["sdxl-like"]), seed), root / str(seed)))
            for seed in (0, 1)]


def test_several_controlnets_sum_their_scaled_residuals(nets):
    x, t, control, cond = inputs("sdxl-like")
    images = [control, control.flip(-1)]
    extra, _ = controlnet.control_condition(nets, images, [0.5, 1.0], batch=2)
    base = Recorder()
    with torch.no_grad():
        controlnet.controlled(base, nets)(x, t, **cond, **extra)
        a = nets[0](x, t, images[0], **cond, scale=0.5)
        b = nets[1](x, t, images[1], **cond, scale=1.0)
    got = base.calls[0]
    assert set(got) == {"context", "text_embeds", "time_ids", "down_residuals", "mid_residual"}
    for r, ra, rb in zip(got["down_residuals"] + [got["mid_residual"]], a["down_residuals"] + [a["mid_residual"]],
                         b["down_residuals"] + [b["mid_residual"]]):
        assert max_rel_err(r, ra + rb) <= 1e-6
    # keys of other wrappers (an adapter student's w) pass through to the base, not to the ControlNets
    with torch.no_grad():
        controlnet.controlled(base, nets)(x, t, w=torch.tensor([3.0, 3.0]), **cond, **extra)
    assert torch.equal(base.calls[-1]["w"], torch.tensor([3.0, 3.0]))


def test_guess_mode_runs_on_the_conditional_half_only(nets):
    """Under CFG's batching the null rows get zero residuals; the conditional rows those of the ControlNet alone."""
    x, t, control, cond = inputs("sdxl-like")
    extra, extra_null = controlnet.control_condition(nets[:1], control[:1], 0.5, batch=1, guess_mode=True)
    assert torch.equal(extra_null["control_scale"], torch.zeros(1, 1))
    # what guidance.guided hands the model: row 0 conditional, row 1 null (here another prompt)
    conditional = {**{k: v[:1] for k, v in cond.items()}, **extra}
    null = {**{k: v[1:] for k, v in cond.items()}, **extra_null}
    both = {k: torch.cat([conditional[k], null[k]]) for k in conditional}
    base, seen = Recorder(), []
    hook = nets[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
    with torch.no_grad():
        controlnet.controlled(base, nets[:1], guess_mode=True)(x, t, **both)
        hook.remove()
        alone = nets[0](x[:1], t[:1], control[:1], **{k: v[:1] for k, v in cond.items()}, scale=0.5, guess_mode=True)
    assert seen == [1]  # one ControlNet pass, on one row
    got = base.calls[0]
    assert got["mid_residual"][1].abs().max() == 0 and got["mid_residual"][0].abs().max() > 0
    assert max_rel_err(got["mid_residual"][:1], alone["mid_residual"]) <= 1e-6
    assert max_rel_err(got["down_residuals"][0][:1], alone["down_residuals"][0]) <= 1e-6


def test_start_and_end_fractions_follow_diffusers_steps(nets):
    """Step i of n acts when start <= i / n and (i + 1) / n <= end (diffusers' controlnet_keep)."""
    x, t, control, cond = inputs("sdxl-like")
    timesteps = [900, 700, 500, 300, 100]
    extra, _ = controlnet.control_condition(nets, [control, control], 1.0, batch=2)
    base = Recorder()
    denoise = controlnet.controlled(base, nets, timesteps, start=[0.2, 0.0], end=[0.8, 0.4])
    with torch.no_grad():
        for step in timesteps:
            denoise(x, torch.full((2,), step), **cond, **extra)
            alone = [nets[k](x, step, control, **cond)["mid_residual"] for k in (0, 1)]
            got = base.calls[-1].get("mid_residual")
            i = timesteps.index(step)
            acting = [1 <= i <= 3, i <= 1]  # [0.2, 0.8]: steps 1 to 3 of 5; [0, 0.4]: steps 0 and 1
            expected = sum(a for a, on in zip(alone, acting) if on) if any(acting) else None
            if expected is None:
                assert got is None
            else:
                assert max_rel_err(got, expected) <= 1e-6, step
        with pytest.raises(ValueError, match="t=1 is not one of the 5 timesteps"):
            denoise(x, torch.ones(2), **cond, **extra)
    with pytest.raises(ValueError, match="start / end fractions need the sampler's timesteps"):
        controlnet.controlled(base, nets, start=0.5)
    with pytest.raises(ValueError, match="expected 0 <= start < end <= 1"):
        controlnet.controlled(base, nets, timesteps, start=0.5, end=0.5)


def test_mismatched_counts_say_what_to_fix(nets):
    control = torch.rand(3, 16, 20)
    with pytest.raises(ValueError, match="2 ControlNets, 1 control images and 2 scales"):
        controlnet.control_condition(nets, [control], [1.0, 1.0])
    with pytest.raises(ValueError, match="all must be the output size"):
        controlnet.control_condition(nets, [control, control[:, :8]], 1.0)
    with pytest.raises(ValueError, match="one start and one end fraction"):
        controlnet.controlled(Recorder(), nets, [1, 2], start=[0.0], end=[1.0, 1.0])


# -----------------------------------------------------------------------------
# full size, on the meta device

# diffusers/controlnet-canny-sdxl-1.0's config.json (the official AGD code's ControlNet), as on the hub
SDXL_CANNY = """{
  "_class_name": "ControlNetModel", "_diffusers_version": "0.20.0.dev0", "act_fn": "silu",
  "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256,
  "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280], "class_embed_type": null,
  "conditioning_channels": 3, "conditioning_embedding_out_channels": [16, 32, 96, 256],
  "controlnet_conditioning_channel_order": "rgb", "cross_attention_dim": 2048,
  "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], "downsample_padding": 1,
  "encoder_hid_dim": null, "encoder_hid_dim_type": null, "flip_sin_to_cos": true, "freq_shift": 0,
  "global_pool_conditions": false, "in_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1,
  "norm_eps": 1e-05, "norm_num_groups": 32, "num_attention_heads": null, "num_class_embeds": null,
  "only_cross_attention": false, "projection_class_embeddings_input_dim": 2816,
  "resnet_time_scale_shift": "default", "transformer_layers_per_block": [1, 2, 10], "upcast_attention": null,
  "use_linear_projection": true}"""


def from_unet_config(preset):
    """The config diffusers' ControlNetModel.from_unet writes for a base UNet preset (how hub ControlNets are made)."""
    options = {k: v for k, v in dataclasses.asdict(unet.PRESETS[preset]()).items() if k != "prediction_type"}
    with torch.device("meta"):
        net = ControlNetModel.from_unet(UNet2DConditionModel(**options), load_weights_from_unet=False)
    return {k: v for k, v in net.config.items()}


def check_meta(config_dict, count=None):
    config = controlnet.ControlNetConfig.from_dict(config_dict)
    with torch.device("meta"):
        ref = ControlNetModel(**{k: v for k, v in config_dict.items() if not k.startswith("_")})
        ours = controlnet.ControlNet(config)
    expected = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert sorted(got) == sorted(expected)
    assert got == expected
    checkpoint.load_into(ours, ref.state_dict(), source="meta")
    if count is not None:
        assert sum(p.numel() for p in ours.parameters()) == count
    return config, ours


def test_full_size_sdxl_canny_keys_and_shapes():
    config, ours = check_meta(json.loads(SDXL_CANNY), count=1_251_014_160)  # 1.25 B parameters
    # the hub's file is from_unet of SDXL base: the same ControlNet
    assert controlnet.ControlNetConfig.from_dict(from_unet_config("sdxl")) == config
    with torch.device("meta"):
        controlnet.check_fits(ours, unet.UNet(unet.PRESETS["sdxl"]()))
        with pytest.raises(checkpoint.CheckpointError, match="does not fit this UNet") as e:
            controlnet.check_fits(ours, unet.UNet(unet.PRESETS["sd2.1"]()))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("preset", ["sd2.1", "sd1.5"])
def test_full_size_sd_controlnet_keys_and_shapes(preset):
    check_meta(from_unet_config(preset), count={"sd2.1": 364_228_240, "sd1.5": 361_279_120}[preset])


# -----------------------------------------------------------------------------
# the original layout (lllyasviel/ControlNet's cldm.py; thibaud's SD 2.1 files)

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
          "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def to_original(sd, config):
    """A diffusers ControlNet state dict under cldm.py's keys, written from LDM's module layout (checked below
    against diffusers' own converter, so that this test's idea of the layout is not ours alone)."""
    n, layers = len(config["block_out_channels"]), config["layers_per_block"]
    blocks, block = {}, 1
    for i in range(n):
        for k in range(layers):
            blocks[f"down_blocks.{i}.resnets.{k}."] = f"input_blocks.{block}.0."
            blocks[f"down_blocks.{i}.attentions.{k}."] = f"input_blocks.{block}.1."
            block += 1
        if i < n - 1:
            blocks[f"down_blocks.{i}.downsamplers.0.conv."] = f"input_blocks.{block}.0.op."
            block += 1
    blocks.update({"mid_block.resnets.0.": "middle_block.0.", "mid_block.attentions.0.": "middle_block.1.",
                   "mid_block.resnets.1.": "middle_block.2.", "controlnet_mid_block.": "middle_block_out.0.",
                   "time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.",
                   "add_embedding.linear_1.": "label_emb.0.0.", "add_embedding.linear_2.": "label_emb.0.2.",
                   "conv_in.": "input_blocks.0.0.", "controlnet_cond_embedding.conv_in.": "input_hint_block.0.",
                   "controlnet_cond_embedding.conv_out.": "input_hint_block.14."})
    blocks.update({f"controlnet_down_blocks.{k}.": f"zero_convs.{k}.0." for k in range(block)})
    blocks.update({f"controlnet_cond_embedding.blocks.{k}.": f"input_hint_block.{2 * k + 2}." for k in range(6)})
    out = {}
    for key, tensor in sd.items():
        prefix = next(p for p in blocks if key.startswith(p))
        rest = key[len(prefix):]
        if "resnets" in prefix:
            first, _, tail = rest.partition(".")
            rest = RESNET[first] + "." + tail
        out[blocks[prefix] + rest] = tensor
    return out


ORIGINAL = {  # 64-wide heads, hint encoder (16, 32, 96, 256): the layouts of SD 2.1's and SDXL's original files
    "sd2.1-like": dict(block_out_channels=(64, 128), layers_per_block=2, down_block_types=("CrossAttnDownBlock2D",
                       "DownBlock2D"), attention_head_dim=(1, 2), cross_attention_dim=32, use_linear_projection=True),
    "sdxl-like": dict(block_out_channels=(64, 128), layers_per_block=2, down_block_types=("DownBlock2D",
                      "CrossAttnDownBlock2D"), attention_head_dim=(1, 2), transformer_layers_per_block=(1, 2),
                      cross_attention_dim=32, use_linear_projection=True, addition_embed_type="text_time",
                      addition_time_embed_dim=256, projection_class_embeddings_input_dim=16 + 6 * 256),
}


def normalized(config):
    """A config with per-level options spelled per level, and what an original file cannot say at its defaults."""
    n = len(config.block_out_channels)
    per = {k: unet.per_level(getattr(config, k), n) for k in ("transformer_layers_per_block", "attention_head_dim")}
    return dataclasses.replace(config, **per, upcast_attention=False, sample_size=None)


@pytest.mark.parametrize("name", ORIGINAL)
@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_original_layout_file_loads_and_matches_diffusers(tmp_path, name, suffix):
    torch.manual_seed(0)
    ref = randomized(ControlNetModel(**ORIGINAL[name]))
    original = to_original(ref.state_dict(), ref.config)
    converted = convert_controlnet_checkpoint(original, dict(ref.config))  # diffusers' reading of that layout
    # (its converter leaves SDXL's label_emb out, though its table for ControlNets names it)
    added = DIFFUSERS_TO_LDM_MAPPING["controlnet"]["addition_embed_type"]
    converted.update({ours: original[theirs] for ours, theirs in added.items() if theirs in original})
    assert set(converted) == set(ref.state_dict())
    assert all(torch.equal(converted[k], v) for k, v in ref.state_dict().items())
    file = tmp_path / f"control_tiny{suffix}"
    tensors = {"control_model." + k: v.contiguous() for k, v in original.items()}
    save_file(tensors, file) if suffix == ".safetensors" else torch.save(tensors, file)

    ours = controlnet.from_pretrained(file)
    assert normalized(ours.config) == normalized(controlnet.ControlNetConfig.from_dict(dict(ref.config)))
    g = torch.Generator().manual_seed(1)
    x, control = torch.randn(2, 4, 8, 6, generator=g), torch.rand(2, 3, 64, 48, generator=g)
    cond = dict(context=torch.randn(2, 5, 32, generator=g))
    if name == "sdxl-like":
        cond.update(text_embeds=torch.randn(2, 16, generator=g),
                    time_ids=torch.tensor([[512.0, 384, 0, 0, 512, 384]] * 2))
    down, mid = run_reference(ref, x, torch.tensor([900.0, 20.0]), control, cond, scale=0.8)
    with torch.no_grad():
        out = ours(x, torch.tensor([900.0, 20.0]), control, **cond, scale=0.8)
    for a, b in zip(out["down_residuals"] + [out["mid_residual"]], down + [mid]):
        assert max_rel_err(a, b) <= 1e-5


@pytest.mark.parametrize("preset", ["sd1.5", "sd2.1", "sdxl"])
def test_original_layout_config_read_off_full_size_shapes(preset):
    """The heads that shapes do not show: 8 per level for SD 1.x's 768-wide text, 64 wide for SD 2.x and SDXL."""
    config_dict = from_unet_config(preset)
    with torch.device("meta"):
        ref = ControlNetModel(**{k: v for k, v in config_dict.items() if not k.startswith("_")})
    original = {"control_model." + k: v for k, v in to_original(ref.state_dict(), config_dict).items()}
    config = controlnet.config_from_original(original)
    assert normalized(config) == normalized(controlnet.ControlNetConfig.from_dict(config_dict))
    mapped = controlnet.from_original(original, config)
    assert set(mapped) == set(ref.state_dict())


def test_original_layout_errors_name_the_key(tmp_path):
    torch.manual_seed(0)
    ref = ControlNetModel(**ORIGINAL["sd2.1-like"])
    original = {"control_model." + k: v.contiguous() for k, v in to_original(ref.state_dict(), ref.config).items()}
    file = tmp_path / "broken.safetensors"
    save_file({**original, "control_model.zero_convs.99.0.weight": torch.zeros(1)}, file)
    with pytest.raises(checkpoint.CheckpointError, match="unexpected key control_model.zero_convs.99.0.weight"):
        controlnet.from_pretrained(file)
    key = "control_model.input_blocks.1.1.transformer_blocks.0.attn2.to_v.weight"
    save_file({k: v for k, v in original.items() if k != key}, file)
    with pytest.raises(checkpoint.CheckpointError,
                       match="missing key down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v.weight"):
        controlnet.from_pretrained(file)
    save_file({"control_model.time_embed.0.weight": torch.zeros(2, 2)}, file)
    with pytest.raises(checkpoint.CheckpointError, match="not a ControlNet in the original layout"):
        controlnet.from_pretrained(file)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(checkpoint.CheckpointError, match="junk.pth: not a PyTorch checkpoint"):
        controlnet.from_pretrained(tmp_path / "junk.pth")


# -----------------------------------------------------------------------------
# loading in diffusers' layout: .bin, bad files


def test_bin_weights_load_weights_only(tmp_path):
    ref = reference("sd2.1-like")
    folder = saved(ref, tmp_path / "cn")
    tensors = load_file(folder / "diffusion_pytorch_model.safetensors")
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    torch.save(tensors, folder / "diffusion_pytorch_model.bin")
    ours = controlnet.from_pretrained(folder, dtype=torch.bfloat16)
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    args = inputs("sd2.1-like")
    _, mid = run_reference(ref, *args)
    with torch.no_grad():
        out = ours(*args[:3], **args[3])
    assert max_rel_err(out["mid_residual"], mid) <= 3e-2  # bf16


def test_bad_config_and_keys_name_the_file(tmp_path):
    folder = saved(reference("sd2.1-like"), tmp_path / "cn")
    file = folder / "config.json"
    good = json.loads(file.read_text())
    file.write_text(json.dumps({**good, "controlnet_conditioning_channel_order": "rbg"}))
    with pytest.raises(checkpoint.CheckpointError, match="config.json: controlnet_conditioning_channel_order: 'rbg'"):
        controlnet.from_pretrained(folder)
    file.write_text(json.dumps(good))
    weights = folder / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    save_file({k: v for k, v in tensors.items() if k != "controlnet_mid_block.bias"}, weights)
    with pytest.raises(checkpoint.CheckpointError, match="missing key controlnet_mid_block.bias"):
        controlnet.from_pretrained(folder)
    shutil.rmtree(folder)
    with pytest.raises(checkpoint.CheckpointError, match="no such folder"):
        controlnet.from_pretrained(folder)
