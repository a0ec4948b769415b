"""unet.py against diffusers' UNet2DConditionModel: same files, same outputs; full-size keys and shapes."""

import dataclasses
import json
import shutil

import pytest
import torch
from diffusers import UNet2DConditionModel  # test-only reference
from safetensors.torch import load_file, save_file

import checkpoint
import unet
from util import max_rel_err

# Tiny configs in diffusers' names, one per code path of the full-size models.
TINY = {
    # SD 2.1: linear projections, head COUNTS per level under attention_head_dim, plain lowest level
    "sd2.1-like": dict(
        sample_size=8, block_out_channels=(32, 64, 64), layers_per_block=2, norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(1, 2, 4), cross_attention_dim=24, use_linear_projection=True, upcast_attention=True),
    # SDXL: text_time conditioning, uneven transformer depths, plain highest level
    "sdxl-like": dict(
        sample_size=8, block_out_channels=(32, 64, 64), layers_per_block=2, norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 3), attention_head_dim=(1, 2, 4), cross_attention_dim=32,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=16 + 6 * 8),
    # SD 1.x: 1x1-conv projections, one head count for all levels; odd channel counts in and out
    "sd1-like": dict(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, in_channels=5,
        out_channels=3, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=2, cross_attention_dim=24),
}


def reference(name):
    """diffusers' model of a tiny config, every weight perturbed so that norms and biases matter."""
    torch.manual_seed(0)
    model = UNet2DConditionModel(**TINY[name]).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def inputs(name, batch=2, size=(16, 16)):
    """Random (x, t, context, text_embeds, time_ids) for a tiny config; the last two None unless SDXL-like."""
    c = TINY[name]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, c.get("in_channels", 4), *size, generator=g)
    t = torch.tensor([999.0, 10.5, 500.0, 1.0][:batch])
    context = torch.randn(batch, 7, c["cross_attention_dim"], generator=g)
    if c.get("addition_embed_type") != "text_time":
        return x, t, context, None, None
    text_embeds = torch.randn(batch, 16, generator=g)
    time_ids = torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024], [768, 512, 32, 16, 1024, 1024]] * 2)[:batch]
    return x, t, context, text_embeds, time_ids


def run_reference(model, x, t, context, text_embeds, time_ids):
    added = None if text_embeds is None else dict(text_embeds=text_embeds, time_ids=time_ids)
    with torch.no_grad():
        return model(x, t, context, added_cond_kwargs=added).sample


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name -> (reference model, repo folder holding unet/ as diffusers saves it)."""
    out = {}
    for name in TINY:
        model = reference(name)
        repo = tmp_path_factory.mktemp(name)
        model.save_pretrained(repo / "unet")  # config.json + diffusion_pytorch_model.safetensors
        out[name] = model, repo
    return out


def copy_repo(saved, name, tmp_path):
    """A fresh copy of a saved tiny repo, to break."""
    shutil.copytree(saved[name][1], tmp_path / "repo")
    return tmp_path / "repo"


# -----------------------------------------------------------------------------
# numerical parity


@pytest.mark.parametrize("name", TINY)
def test_fp32_parity(saved, name):
    ref, repo = saved[name]
    ours = unet.from_pretrained(repo)
    assert isinstance(ours, unet.UNet) and not ours.training
    for size in [(16, 16), (13, 10)]:  # odd sides: the upsamplers must meet the skips' grids
        args = inputs(name, size=size)
        expected = run_reference(ref, *args)
        with torch.no_grad():
            out = ours(*args)
        assert out.shape == expected.shape
        assert max_rel_err(out, expected) <= 1e-5, (name, size)
    assert expected.abs().max() > 0.5  # a meaningful output, not one that vanished


@pytest.mark.parametrize("name", TINY)
def test_bf16_parity(saved, name):
    ref, repo = saved[name]
    ours = unet.from_pretrained(repo / "unet", dtype=torch.bfloat16)  # the subfolder itself works too
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    args = inputs(name)
    expected32 = run_reference(ref, *args)
    ref16 = reference(name).to(torch.bfloat16)
    expected16 = run_reference(ref16, *[a if a is None or a is args[1] else a.bfloat16() for a in args])
    with torch.no_grad():
        out = ours(*args)  # fp32 inputs are cast to the weights' dtype
    assert out.dtype == torch.bfloat16
    # the same bf16 operations as diffusers (fp32 sinusoids, then cast): a few bf16 ulps at most
    assert max_rel_err(out, expected16) <= 1e-2
    # and as close to the fp32 truth as diffusers' own bf16 run
    assert max_rel_err(out, expected32) <= 1.5 * max_rel_err(expected16, expected32) + 1e-3


def test_timestep_forms(saved):
    """t as a python number, a 0-d tensor, a [1] tensor, or a [B] long tensor: broadcast to the batch."""
    ref, repo = saved["sd2.1-like"]
    ours = unet.from_pretrained(repo)
    x, _, context, _, _ = inputs("sd2.1-like")
    expected = run_reference(ref, x, torch.tensor([700.0, 700.0]), context, None, None)
    with torch.no_grad():
        for t in [700, 700.0, torch.tensor(700), torch.tensor([700.0]), torch.tensor([700, 700])]:
            assert max_rel_err(ours(x, t, context), expected) <= 1e-5, t
        with pytest.raises(ValueError, match="t: expected a number or 2 timesteps"):
            ours(x, torch.tensor([1.0, 2.0, 3.0]), context)


def test_text_time_inputs_required(saved):
    ours = unet.from_pretrained(saved["sdxl-like"][1])
    x, t, context, _, _ = inputs("sdxl-like")
    with pytest.raises(ValueError, match="text_embeds"):
        ours(x, t, context)
    sd = unet.from_pretrained(saved["sd2.1-like"][1])
    x, t, context, _, _ = inputs("sd2.1-like")
    with pytest.raises(ValueError, match="only for SDXL"):
        sd(x, t, context, text_embeds=torch.zeros(2, 16), time_ids=torch.zeros(2, 6))


# -----------------------------------------------------------------------------
# what adapters and training rely on


def test_attn2_hooks_see_what_diffusers_attn2_sees(saved):
    """Hooks on every `*.attn2` (found by name) get the normed stream and add to the residual, as in diffusers."""
    ref, repo = saved["sdxl-like"]
    ours = unet.from_pretrained(repo)
    names = [n for n, _ in ours.named_modules() if n.endswith(".attn2")]
    assert sorted(names) == sorted(n for n, _ in ref.named_modules() if n.endswith(".attn2"))
    # attentions x depth: down levels 1, 2; mid; up levels 2, 1 (level 0 does not attend)
    assert len(names) == 2 * 2 + 2 * 3 + 3 + 3 * 3 + 3 * 2
    shapes = []

    def hook(module, args, out):
        shapes.append((tuple(args[0].shape), tuple(out.shape)))
        return out + 0.5 * args[0]

    for model in (ours, ref):
        for n, m in model.named_modules():
            if n.endswith(".attn2"):
                m.register_forward_hook(hook)
    args = inputs("sdxl-like")
    with torch.no_grad():
        out = ours(*args)
    expected = run_reference(ref, *args)
    plain = run_reference(reference("sdxl-like"), *args)
    assert max_rel_err(out, expected) <= 1e-5
    assert max_rel_err(out, plain) > 1e-2  # the hooks did change the output
    assert all(len(a) == 3 and a == o for a, o in shapes)  # [B, T, C] in, [B, T, C] out


def test_gradient_checkpointing_same_gradients(saved):
    ours = unet.from_pretrained(saved["sdxl-like"][1])
    calls = []
    for n, m in ours.named_modules():
        if n.endswith(".attn2"):
            m.register_forward_hook(lambda *_: calls.append(1))
    x, t, context, text_embeds, time_ids = inputs("sdxl-like")
    weight = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    grads = []
    for flag in (False, True):
        ours.gradient_checkpointing = flag
        ours.zero_grad(set_to_none=True)
        calls.clear()
        xg = x.clone().requires_grad_(True)
        (ours(xg, t, context, text_embeds, time_ids) * weight).sum().backward()
        grads.append([xg.grad] + [p.grad for p in ours.parameters()])
        n_calls = len(calls)
        if not flag:
            n_plain = n_calls
    assert n_calls == 2 * n_plain  # checkpointed: each transformer block ran again in backward
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # no recomputation when there is no backward
        calls.clear()
        ours(x, t, context, text_embeds, time_ids)
        assert len(calls) == n_plain


# -----------------------------------------------------------------------------
# loading: strict, explained


def test_renamed_key_names_itself(saved, tmp_path):
    repo = copy_repo(saved, "sd2.1-like", tmp_path)
    file = repo / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(file)
    key = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    tensors[key.replace("to_k", "to_key")] = tensors.pop(key)
    save_file(tensors, file)
    with pytest.raises(checkpoint.CheckpointError, match=f"missing key {key}"):
        unet.from_pretrained(repo)


def test_extra_and_misshapen_keys_name_themselves(saved, tmp_path):
    repo = copy_repo(saved, "sdxl-like", tmp_path)
    file = repo / "unet" / "diffusion_pytorch_model.safetensors"
    original = load_file(file)
    save_file({**original, "add_embedding.linear_3.weight": torch.zeros(4)}, file)
    with pytest.raises(checkpoint.CheckpointError, match="unexpected key add_embedding.linear_3.weight"):
        unet.from_pretrained(repo)
    key = "mid_block.attentions.0.proj_in.weight"
    save_file({**original, key: original[key][:, :32].contiguous()}, file)
    with pytest.raises(checkpoint.CheckpointError, match=rf"key {key} has shape \(64, 32\), expected \(64, 64\)"):
        unet.from_pretrained(repo)


@pytest.mark.parametrize("change, message", [
    (dict(class_embed_type="timestep"), "class_embed_type='timestep' is not supported"),
    (dict(some_new_option=1), "some_new_option: not a UNet2DConditionModel option"),
    (dict(attention_head_dim=[1, 2]), "attention_head_dim: expected 3 entries"),
    (dict(down_block_types=["SimpleCrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]),
     "'SimpleCrossAttnDownBlock2D' is not supported"),
])
def test_unsupported_config_names_the_option(saved, tmp_path, change, message):
    repo = copy_repo(saved, "sd2.1-like", tmp_path)
    file = repo / "unet" / "config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), **change}))
    with pytest.raises(checkpoint.CheckpointError, match=message) as e:
        unet.from_pretrained(repo)
    assert "config.json" in str(e.value) and "\n" not in str(e.value)


def test_prediction_type_from_the_scheduler(saved, tmp_path):
    repo = copy_repo(saved, "sd2.1-like", tmp_path)
    assert unet.from_pretrained(repo).config.prediction_type == "epsilon"
    (repo / "scheduler").mkdir()
    (repo / "scheduler" / "scheduler_config.json").write_text(json.dumps({"prediction_type": "v_prediction"}))
    assert unet.from_pretrained(repo).config.prediction_type == "v_prediction"
    (repo / "scheduler" / "scheduler_config.json").write_text(json.dumps({"prediction_type": "sample"}))
    with pytest.raises(checkpoint.CheckpointError, match="scheduler_config.json: prediction_type: 'sample'"):
        unet.from_pretrained(repo)


# -----------------------------------------------------------------------------
# full size, on the meta device


@pytest.mark.parametrize("name", unet.PRESETS)
def test_full_size_keys_and_shapes_match_diffusers(name):
    config = unet.PRESETS[name]()
    options = {k: v for k, v in dataclasses.asdict(config).items() if k != "prediction_type"}
    with torch.device("meta"):
        ref = UNet2DConditionModel(**options)
        ours = unet.UNet(config)
    expected = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert sorted(got) == sorted(expected)
    assert got == expected
    # and loading them is the strict check that from_pretrained does
    checkpoint.load_into(ours, ref.state_dict(), source=name)
    # the published sizes: 860 M (SD 1.5), 866 M (SD 2.1), 2.6 B (SDXL) parameters
    count = {"sd1.5": 859_520_964, "sd2.1": 865_910_724, "sd2.1-base": 865_910_724, "sdxl": 2_567_463_684}
    assert sum(p.numel() for p in ours.parameters()) == count[name]


# The official unet/config.json files, verbatim, quirks included (SDXL's "upcast_attention": null).
OFFICIAL = {
    "sd2.1": """{
      "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.10.0.dev0", "act_fn": "silu",
      "attention_head_dim": [5, 10, 20, 20], "block_out_channels": [320, 640, 1280, 1280],
      "center_input_sample": false, "cross_attention_dim": 1024,
      "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
      "downsample_padding": 1, "dual_cross_attention": false, "flip_sin_to_cos": true, "freq_shift": 0,
      "in_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05,
      "norm_num_groups": 32, "num_class_embeds": null, "only_cross_attention": false, "out_channels": 4,
      "sample_size": 96,
      "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
      "upcast_attention": true, "use_linear_projection": true}""",
    "sdxl": """{
      "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.19.0.dev0", "act_fn": "silu",
      "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256,
      "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280], "center_input_sample": false,
      "class_embed_type": null, "class_embeddings_concat": false, "conv_in_kernel": 3, "conv_out_kernel": 3,
      "cross_attention_dim": 2048, "cross_attention_norm": null,
      "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
      "downsample_padding": 1, "dual_cross_attention": false, "encoder_hid_dim": null,
      "encoder_hid_dim_type": null, "flip_sin_to_cos": true, "freq_shift": 0, "in_channels": 4,
      "layers_per_block": 2, "mid_block_only_cross_attention": null, "mid_block_scale_factor": 1,
      "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05, "norm_num_groups": 32,
      "num_attention_heads": null, "num_class_embeds": null, "only_cross_attention": false, "out_channels": 4,
      "projection_class_embeddings_input_dim": 2816, "resnet_out_scale_factor": 1.0,
      "resnet_skip_time_act": false, "resnet_time_scale_shift": "default", "sample_size": 128,
      "time_cond_proj_dim": null, "time_embedding_act_fn": null, "time_embedding_dim": null,
      "time_embedding_type": "positional", "timestep_post_act": null, "transformer_layers_per_block": [1, 2, 10],
      "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "upcast_attention": null,
      "use_linear_projection": true}""",
}


@pytest.mark.parametrize("name", OFFICIAL)
def test_official_config_reads_as_the_preset(name):
    config = unet.UNetConfig.from_dict(json.loads(OFFICIAL[name]))
    # the prediction type lives in the scheduler's config, not in unet/config.json
    assert dataclasses.replace(config, prediction_type=unet.PRESETS[name]().prediction_type) == unet.PRESETS[name]()
