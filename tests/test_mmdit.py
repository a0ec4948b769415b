"""mmdit.py against diffusers' SD3Transformer2DModel: same files, same outputs; full-size keys and shapes on meta."""

import json
import re
import shutil

import pytest
import torch
from diffusers import SD3Transformer2DModel  # test-only reference
from safetensors.torch import load_file, save_file

import checkpoint
import mmdit
from util import max_rel_err

# Tiny configs in diffusers' names, one per code path of the full-size models. Three blocks: a
# first, a middle and the last (context_pre_only); a 12 x 12 position grid, cropped.
_TINY = dict(sample_size=8, patch_size=2, in_channels=16, num_layers=3, attention_head_dim=8, num_attention_heads=4,
             joint_attention_dim=24, caption_projection_dim=32, pooled_projection_dim=20, out_channels=16,
             pos_embed_max_size=12)
TINY = {
    "sd3-like": _TINY,
    # SD3.5: q / k RMSNorm, and dual attention in the first block and in the last (context_pre_only) one
    "sd3.5-like": dict(_TINY, dual_attention_layers=(0, 2), qk_norm="rms_norm"),
}

# The official transformer/config.json files (their keys and values; diffusers' version tags left out).
_COMMON = {"_class_name": "SD3Transformer2DModel", "attention_head_dim": 64, "in_channels": 16,
           "joint_attention_dim": 4096, "out_channels": 16, "patch_size": 2, "pooled_projection_dim": 2048,
           "sample_size": 128}
OFFICIAL = {
    "sd3-medium": dict(_COMMON, caption_projection_dim=1536, num_attention_heads=24, num_layers=24,
                       pos_embed_max_size=192),
    "sd3.5-medium": dict(_COMMON, caption_projection_dim=1536, num_attention_heads=24, num_layers=24,
                         pos_embed_max_size=384, dual_attention_layers=list(range(13)), qk_norm="rms_norm"),
    "sd3.5-large": dict(_COMMON, caption_projection_dim=2432, num_attention_heads=38, num_layers=38,
                        pos_embed_max_size=192, qk_norm="rms_norm"),
}


def reference(name):
    """diffusers' model of a tiny config, every weight and the stored positions randomized."""
    torch.manual_seed(0)
    model = SD3Transformer2DModel(**TINY[name]).eval()
    with torch.no_grad():  # norms' ones, adaLN and biases all moved, so that each of them matters
        for t in list(model.parameters()) + list(model.buffers()):
            t.add_(0.2 * torch.randn_like(t))
    return model


def inputs(name, batch=2, size=(8, 8), tokens=7):
    """Random (x, t, context, pooled) for a tiny config; t = 1000 sigma as the pipeline passes it."""
    c = TINY[name]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, c["in_channels"], *size, generator=g)
    t = torch.tensor([1000.0, 333.25, 71.5, 1.0][:batch])
    context = torch.randn(batch, tokens, c["joint_attention_dim"], generator=g)
    pooled = torch.randn(batch, c["pooled_projection_dim"], generator=g)
    return x, t, context, pooled


def run_reference(model, x, t, context, pooled):
    with torch.no_grad():
        return model(hidden_states=x, timestep=t, encoder_hidden_states=context, pooled_projections=pooled).sample


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name -> (reference model, repo folder holding transformer/ as diffusers saves it)."""
    out = {}
    for name in TINY:
        model = reference(name)
        repo = tmp_path_factory.mktemp(name)
        model.save_pretrained(repo / "transformer")
        out[name] = model, repo
    return out


# -----------------------------------------------------------------------------
# numerical parity


@pytest.mark.parametrize("name", TINY)
def test_fp32_parity(saved, name):
    ref, repo = saved[name]
    ours = mmdit.from_pretrained(repo)
    assert isinstance(ours, mmdit.MMDiT) and not ours.training
    # square, and oblong (4 x 6 patches, cropped off-centre of the 12 x 12 grid) with a longer text
    for size, tokens in [((8, 8), 7), ((8, 12), 11), ((24, 2), 3)]:
        args = inputs(name, size=size, tokens=tokens)
        expected = run_reference(ref, *args)
        with torch.no_grad():
            out = ours(*args)
        assert out.shape == expected.shape == args[0].shape
        assert max_rel_err(out, expected) <= 1e-5, (name, size)
    assert expected.abs().max() > 0.5  # a meaningful output, not one that vanished


@pytest.mark.parametrize("name", TINY)
def test_bf16_parity(saved, name):
    ref, repo = saved[name]
    ours = mmdit.from_pretrained(repo / "transformer", dtype=torch.bfloat16)  # the subfolder itself works too
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    x, t, context, pooled = inputs(name)
    expected32 = run_reference(ref, x, t, context, pooled)
    ref16 = reference(name).to(torch.bfloat16)
    expected16 = run_reference(ref16, x.bfloat16(), t, context.bfloat16(), pooled.bfloat16())
    with torch.no_grad():
        out = ours(x, t, context, pooled)  # fp32 inputs are cast to the weights' dtype
    assert out.dtype == torch.bfloat16
    assert max_rel_err(out, expected16) <= 1e-2  # the same bf16 operations: a few ulps at most
    assert max_rel_err(out, expected32) <= 1.5 * max_rel_err(expected16, expected32) + 1e-3


def test_timestep_forms(saved):
    ref, repo = saved["sd3-like"]
    ours = mmdit.from_pretrained(repo)
    x, _, context, pooled = inputs("sd3-like")
    expected = run_reference(ref, x, torch.tensor([750.0, 750.0]), context, pooled)
    with torch.no_grad():
        for t in [750, 750.0, torch.tensor(750.0), torch.tensor([750.0]), torch.tensor([750, 750])]:
            assert max_rel_err(ours(x, t, context, pooled), expected) <= 1e-5, t
        with pytest.raises(ValueError, match="t: expected a number or 2 timesteps"):
            ours(x, torch.tensor([1.0, 2.0, 3.0]), context, pooled)


def test_latent_sizes_the_positions_cannot_cover(saved):
    ours = mmdit.from_pretrained(saved["sd3-like"][1])
    _, t, context, pooled = inputs("sd3-like")
    with torch.no_grad():
        assert ours(torch.randn(1, 16, 24, 24), t[:1], context[:1], pooled[:1]).shape == (1, 16, 24, 24)  # all 12 x 12
        with pytest.raises(ValueError, match=r"13 x 12 patches; .* at most 12 x 12"):
            ours(torch.randn(1, 16, 26, 24), t[:1], context[:1], pooled[:1])
        with pytest.raises(ValueError, match="multiples of the patch size 2"):
            ours(torch.randn(1, 16, 9, 8), t[:1], context[:1], pooled[:1])


# -----------------------------------------------------------------------------
# what adapters and training rely on


@pytest.mark.parametrize("name", TINY)
def test_attn_hooks_see_the_image_stream(saved, name):
    """Hooks on every block's `attn` (found by name) get the modulated image tokens first and can add to the
    image stream's output (output[0]); diffusers' joint attention, hooked the same way, agrees."""
    ref, repo = saved[name]
    ours = mmdit.from_pretrained(repo)
    names = [n for n, _ in ours.named_modules() if n.endswith(".attn")]
    assert names == [f"transformer_blocks.{i}.attn" for i in range(3)]
    assert [n for n, _ in ours.named_modules() if n.endswith(".attn2")] == \
        [n for n, _ in ref.named_modules() if n.endswith(".attn2")]
    seen = []

    def ours_hook(module, args, out):
        seen.append((tuple(args[0].shape), tuple(out[0].shape), out[1] is None))
        return (out[0] + 0.5 * args[0], out[1])

    def ref_hook(module, args, kwargs, out):  # diffusers calls its attention by keyword
        x = kwargs["hidden_states"]
        return (out[0] + 0.5 * x, out[1])

    handles = [m.register_forward_hook(ours_hook) for n, m in ours.named_modules() if n.endswith(".attn")]
    handles += [m.register_forward_hook(ref_hook, with_kwargs=True) for n, m in ref.named_modules()
                if n.endswith(".attn")]
    try:
        args = inputs(name)
        with torch.no_grad():
            out = ours(*args)
        expected = run_reference(ref, *args)
    finally:
        for h in handles:
            h.remove()
    assert max_rel_err(out, expected) <= 1e-5
    assert max_rel_err(out, run_reference(ref, *args)) > 1e-2  # the hooks did change the output
    D = TINY[name]["num_attention_heads"] * TINY[name]["attention_head_dim"]
    assert seen == [((2, 16, D), (2, 16, D), False)] * 2 + [((2, 16, D), (2, 16, D), True)]  # the last: no text out


def test_gradient_checkpointing_same_gradients(saved):
    ours = mmdit.from_pretrained(saved["sd3.5-like"][1])
    x, t, context, pooled = inputs("sd3.5-like")
    weight = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(2))
    grads = []
    for flag in (False, True):
        ours.gradient_checkpointing = flag
        ours.zero_grad(set_to_none=True)
        xg = x.clone().requires_grad_(True)
        (ours(xg, t, context, pooled) * weight).sum().backward()
        grads.append([xg.grad] + [p.grad for p in ours.parameters()])
    assert all(g is not None for g in grads[1])
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(*grads))


# -----------------------------------------------------------------------------
# loading: errors name the file and key


def copy_repo(saved, name, tmp_path):
    shutil.copytree(saved[name][1], tmp_path / "repo")
    return tmp_path / "repo" / "transformer"


def test_missing_unexpected_and_misshapen_keys_are_named(saved, tmp_path):
    folder = copy_repo(saved, "sd3.5-like", tmp_path)
    file = folder / "diffusion_pytorch_model.safetensors"
    tensors = load_file(file)
    key = "transformer_blocks.1.attn.norm_added_k.weight"
    save_file({k: v for k, v in tensors.items() if k != key}, file)
    with pytest.raises(checkpoint.CheckpointError, match=f"missing key {re.escape(key)}"):
        mmdit.from_pretrained(folder)
    save_file({**tensors, "transformer_blocks.1.attn2.to_q.weight": torch.zeros(32, 32)}, file)  # block 1 is not dual
    with pytest.raises(checkpoint.CheckpointError, match=r"unexpected key transformer_blocks\.1\.attn2\.to_q\.weight"):
        mmdit.from_pretrained(folder)
    save_file({**tensors, "pos_embed.pos_embed": torch.zeros(1, 100, 32)}, file)
    with pytest.raises(checkpoint.CheckpointError, match=r"pos_embed\.pos_embed has shape \(1, 100, 32\), "
                                                         r"expected \(1, 144, 32\)"):
        mmdit.from_pretrained(folder)


@pytest.mark.parametrize("change, message", [
    (dict(_class_name="UNet2DConditionModel"), "expected SD3Transformer2DModel"),
    (dict(qk_norm="layer_norm"), "qk_norm: 'layer_norm' is not supported"),
    (dict(caption_projection_dim=48), "caption_projection_dim 48 must equal"),
    (dict(dual_attention_layers=[3]), "dual_attention_layers: block 3"),
    (dict(use_rope=True), "use_rope: not an SD3Transformer2DModel option"),
])
def test_unsupported_configs_name_the_file_and_option(saved, tmp_path, change, message):
    folder = copy_repo(saved, "sd3-like", tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(checkpoint.CheckpointError, match=re.escape(str(folder / "config.json")) + ".*" + message):
        mmdit.from_pretrained(folder)


def test_sdxl_weights_are_refused(sdxl_root):
    with pytest.raises(checkpoint.CheckpointError, match="no config.json"):
        mmdit.from_pretrained(sdxl_root)  # an SDXL repo has no transformer/
    with pytest.raises(checkpoint.CheckpointError, match="UNet2DConditionModel, expected SD3Transformer2DModel"):
        mmdit.from_pretrained(sdxl_root, subfolder="unet")


# -----------------------------------------------------------------------------
# full size, on the meta device


@pytest.mark.parametrize("name", OFFICIAL)
def test_full_size_keys_and_shapes_match_diffusers(name):
    config = mmdit.MMDiTConfig.from_dict(OFFICIAL[name])
    assert config == mmdit.PRESETS[name]()
    with torch.device("meta"):
        ref = SD3Transformer2DModel.from_config(OFFICIAL[name])
        ours = mmdit.MMDiT(config)
    expected = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert sorted(got) == sorted(expected)
    assert got == expected
    checkpoint.load_into(ours, ref.state_dict(), source=name)  # the strict check from_pretrained does
    # parameters, not counting the stored positions (a buffer): 2.0 B, 2.2 B, 8.1 B as published
    count = {"sd3-medium": 2_028_328_000, "sd3.5-medium": 2_243_171_520, "sd3.5-large": 8_056_627_520}
    assert sum(p.numel() for p in ours.parameters()) == count[name]
