"""vae.py against diffusers' AutoencoderKL: tiny configs for numbers, full-size configs key by key on meta."""

import re
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import checkpoint  # noqa: E402
import vae  # noqa: E402

diffusers = pytest.importorskip("diffusers")

# Three resolutions (f = 4) so that every kind of block, shortcut and resampler is exercised;
# sample_size 32 is diffusers' tile side in its tiled decode (8 latents).
TINY = dict(block_out_channels=[8, 16, 16], down_block_types=["DownEncoderBlock2D"] * 3,
            up_block_types=["UpDecoderBlock2D"] * 3, layers_per_block=2, norm_num_groups=4, sample_size=32)

# The official config.json files, as the hub holds them. The SD 1.x / 2.x ones predate the keys
# scaling_factor and force_upcast, so both are diffusers' defaults there (0.18215, true).
_BLOCKS = dict(block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
               up_block_types=["UpDecoderBlock2D"] * 4)
_COMMON = dict(_class_name="AutoencoderKL", act_fn="silu", in_channels=3, out_channels=3, latent_channels=4,
               layers_per_block=2, norm_num_groups=32, **_BLOCKS)
OFFICIAL = {
    "sd-vae-ft-ema": dict(_COMMON, _diffusers_version="0.4.2", sample_size=256),
    "sd-vae-ft-mse": dict(_COMMON, _diffusers_version="0.4.2", sample_size=256),
    "sd-2.1": dict(_COMMON, _diffusers_version="0.8.0", sample_size=768),
    "sdxl": dict(_COMMON, _diffusers_version="0.20.0.dev0", sample_size=1024, scaling_factor=0.13025,
                 force_upcast=True),
    # SD3's (and SD3.5's): 16 channels, shifted latents, no 1x1 convolutions around them
    "sd3": dict(_COMMON, _diffusers_version="0.29.0.dev0", latent_channels=16, sample_size=1024,
                scaling_factor=1.5305, shift_factor=0.0609, force_upcast=True, latents_mean=None, latents_std=None,
                use_quant_conv=False, use_post_quant_conv=False),
}
# (keys, parameters) of each: SD3's lacks the two 1x1 convolutions, and has 16 latent channels
SIZES = {"sd-vae-ft-ema": (248, 83_653_863), "sd-vae-ft-mse": (248, 83_653_863), "sd-2.1": (248, 83_653_863),
         "sdxl": (248, 83_653_863), "sd3": (244, 83_819_683)}
# Files saved before diffusers' 2023 attention rewrite name the attention weights the old way.
LEGACY = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


def assert_close(ours, ref, rel=1e-5):
    """Max abs error within `rel` of the reference's largest magnitude."""
    assert ours.shape == ref.shape and ours.dtype == ref.dtype
    err, scale = (ours - ref).abs().max().item(), ref.abs().max().item()
    assert err <= rel * scale, f"max abs error {err:.3g} for outputs up to {scale:.3g}"


def legacy_name(key):
    """`key` as a file saved before the rename names it (encoder.mid_block.attentions.0.query.weight)."""
    for new, old in LEGACY.items():
        key = key.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
    return key


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random tiny diffusers AutoencoderKL saved in both layouts: in a pipeline's vae/, at a repo's root."""
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKL(**TINY).eval()
    with torch.no_grad():  # move every weight off its init (GroupNorm's ones and zeros included)
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    root = tmp_path_factory.mktemp("vae")
    ref.save_pretrained(root / "pipeline" / "vae")
    ref.save_pretrained(root / "standalone")
    return ref, root


@pytest.mark.parametrize("layout", ["pipeline", "standalone"])
def test_encode_decode_match_diffusers(tiny, layout):
    ref, root = tiny
    ours = vae.from_pretrained(root / layout)
    sf = ref.config.scaling_factor
    assert ours.scaling_factor == sf and ours.config.downsampling_factor == 4
    x = torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(1)) * 2 - 1
    z = torch.randn(2, 4, 12, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        posterior = ref.encode(x).latent_dist
        assert_close(ours.encode(x), posterior.mode() * sf)
        sampled = ours.encode(x, generator=torch.Generator().manual_seed(3))
        assert_close(sampled, posterior.sample(generator=torch.Generator().manual_seed(3)) * sf)
        assert (sampled - ours.encode(x)).abs().max() > 1e-2  # the generator did sample
        assert_close(ours.decode(z), ref.decode(z / sf).sample)


# SD3's autoencoder, small: 16 latent channels, shift and scale, no quant convs
TINY_SD3 = dict(TINY, latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
                use_post_quant_conv=False)


def test_sd3_autoencoder_matches_diffusers_and_the_sd3_pipeline_convention(tmp_path):
    with torch.random.fork_rng():  # the other tests' draws stay as they were
        torch.manual_seed(0)
        ref = diffusers.AutoencoderKL(**TINY_SD3).eval()
        with torch.no_grad():
            for p in ref.parameters():
                p.add_(0.1 * torch.randn_like(p))
    ref.save_pretrained(tmp_path / "vae")
    ours = vae.from_pretrained(tmp_path)
    assert (ours.shift_factor, ours.scaling_factor, ours.config.latent_channels) == (0.0609, 1.5305, 16)
    assert not any("quant_conv" in k for k in ours.state_dict())
    sf, shift = 1.5305, 0.0609
    x = torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(1)) * 2 - 1
    z = torch.randn(2, 16, 8, 12, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        posterior = ref.encode(x).latent_dist
        assert_close(ours.encode(x), (posterior.mode() - shift) * sf)
        sampled = ours.encode(x, generator=torch.Generator().manual_seed(3))
        assert_close(sampled, (posterior.sample(generator=torch.Generator().manual_seed(3)) - shift) * sf)
        assert_close(ours.decode(z), ref.decode(z / sf + shift).sample)  # as StableDiffusion3Pipeline decodes
        assert (ours.decode(z) - ref.decode(z / sf).sample).abs().max() > 1e-3  # the shift matters
        ours16 = vae.from_pretrained(tmp_path, dtype=torch.float16)  # force_upcast without post_quant_conv's weights
        assert ours16.dtype == torch.float16
        assert_close(ours16.decode(z), ours.decode(z), rel=1e-2)  # (its weights rounded to fp16)


def test_slices_give_the_whole_batch(tiny):
    ref, root = tiny
    ours = vae.from_pretrained(root / "pipeline")
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    z = torch.randn(3, 4, 4, 4)
    with torch.no_grad():
        assert_close(ours.encode(x, batch_size=2), ours.encode(x), rel=1e-6)
        # one draw for the whole batch: slices do not change which noise each image gets
        assert_close(ours.encode(x, batch_size=2, generator=torch.Generator().manual_seed(0)),
                     ours.encode(x, generator=torch.Generator().manual_seed(0)), rel=1e-6)
        assert_close(ours.decode(z, batch_size=2), ours.decode(z), rel=1e-6)


def test_tiled_decode_matches_diffusers(tiny):
    ref, root = tiny
    ours = vae.from_pretrained(root / "pipeline")
    sf = ref.config.scaling_factor
    # 20 x 12 latents in tiles of 8 every 6: a 4 x 2 grid whose last row and column are cut short
    z = torch.randn(2, 4, 20, 12, generator=torch.Generator().manual_seed(4))
    ref.enable_tiling()
    try:
        with torch.no_grad():
            expected = ref.decode(z / sf).sample
            tiled = ours.decode(z, tile_size=ref.config.sample_size)
            assert_close(tiled, expected)
            assert_close(ours.decode(z, tile_size=32, batch_size=1), expected)
            assert (tiled - ours.decode(z)).abs().max() > 1e-3  # tiles were decoded apart, then faded
            small = z[:, :, :8, :8]  # fits in one tile: decoded whole
            assert torch.equal(ours.decode(small, tile_size=32), ours.decode(small))
    finally:
        ref.disable_tiling()
    for bad in (0, 24, 36):
        with pytest.raises(ValueError, match="tile_size"):
            ours.decode(z, tile_size=bad)


def test_force_upcast_decodes_fp16_weights_in_fp32(tiny):
    ref, root = tiny
    ours = vae.from_pretrained(root / "pipeline", dtype=torch.float16)
    assert ours.config.force_upcast and ours.dtype == torch.float16
    with torch.no_grad():  # an fp16 overflow, as SDXL's VAE has: conv_in's outputs beyond 65504
        ours.decoder.conv_in.weight.mul_(2e4)
        ours.decoder.conv_in.bias.mul_(2e4)
    same_in_fp32 = vae.AutoencoderKL(ours.config)
    same_in_fp32.load_state_dict({k: v.float() for k, v in ours.state_dict().items()})
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        upcast = ours.decode(z)
        assert upcast.dtype == torch.float32 and upcast.isfinite().all()
        assert_close(upcast, same_in_fp32.decode(z))
        assert ours.decode(z.half()).isfinite().all()
        assert_close(ours.encode(x), same_in_fp32.encode(x))
        assert ours.dtype == torch.float16  # upcast for the call only
        ours.config.force_upcast = False
        in_fp16 = ours.decode(z)
        assert in_fp16.dtype == torch.float16 and not in_fp16.isfinite().all()


def test_legacy_attention_names_load(tiny, tmp_path):
    ref, root = tiny
    tensors = load_file(root / "standalone" / "diffusion_pytorch_model.safetensors")
    legacy = {legacy_name(k): v for k, v in tensors.items()}
    assert sum(k != legacy_name(k) for k in tensors) == 16  # 8 tensors in each of the two attentions
    folder = tmp_path / "legacy"
    folder.mkdir()
    (folder / "config.json").write_text((root / "standalone" / "config.json").read_text())
    save_file(legacy, folder / "diffusion_pytorch_model.safetensors")
    ours = vae.from_pretrained(folder)
    z = torch.randn(1, 4, 4, 4)
    with torch.no_grad():
        assert_close(ours.decode(z), ref.decode(z / ref.config.scaling_factor).sample)
    both = r"both \S+\.(query|key|value|proj_attn)\.\w+ and \S+\.to_"
    with pytest.raises(checkpoint.CheckpointError, match=both):
        vae.rename_legacy_keys({**legacy, **tensors})


def test_a_renamed_or_extra_key_is_named(tiny, tmp_path):
    ref, root = tiny
    tensors = load_file(root / "standalone" / "diffusion_pytorch_model.safetensors")
    (tmp_path / "config.json").write_text((root / "standalone" / "config.json").read_text())
    file = tmp_path / "diffusion_pytorch_model.safetensors"
    key = "decoder.up_blocks.1.resnets.2.conv1.weight"
    save_file({k.replace("conv1", "conv_1") if k == key else k: v for k, v in tensors.items()}, file)
    with pytest.raises(checkpoint.CheckpointError, match=f"missing key {re.escape(key)}"):
        vae.from_pretrained(tmp_path)
    save_file({**tensors, "encoder.extra.weight": torch.zeros(1)}, file)
    with pytest.raises(checkpoint.CheckpointError, match=r"unexpected key encoder\.extra\.weight"):
        vae.from_pretrained(tmp_path)


@pytest.mark.parametrize("change, message", [
    (dict(_class_name="UNet2DConditionModel"), "expected AutoencoderKL"),
    (dict(latents_mean=[0.1] * 4), r"latents_mean is \[0\.1"),
    (dict(mid_block_add_attention=False), "mid_block_add_attention is False"),
    (dict(down_block_types=["DownEncoderBlock2D", "DownBlock2D"]), "down_block_types"),
    (dict(conv_type="magic"), "unknown key conv_type"),
    (dict(block_out_channels=None), "missing key block_out_channels"),
])
def test_unsupported_configs_are_refused(change, message):
    with pytest.raises(checkpoint.CheckpointError, match=message):
        config = {k: v for k, v in {**OFFICIAL["sdxl"], **change}.items() if v is not None}
        vae.config_from_diffusers(config)


@pytest.mark.parametrize("name", list(OFFICIAL))
def test_full_size_keys_and_shapes_match_diffusers(name):
    official = OFFICIAL[name]
    cfg = vae.config_from_diffusers(official)
    assert cfg == vae.VAE_models[name]()
    with torch.device("meta"):
        ref = diffusers.AutoencoderKL.from_config(official)
        ours = vae.AutoencoderKL(cfg)
    # diffusers reads the keys the older files lack as we do
    assert (ref.config.scaling_factor, ref.config.force_upcast) == (cfg.scaling_factor, cfg.force_upcast)
    expected = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == expected
    assert (len(expected), sum(p.numel() for p in ours.parameters())) == SIZES[name]
    # the loading path itself, with either naming of the attention weights that official files hold
    for rename in (str, legacy_name):
        files = {rename(k): torch.empty(shape, device="meta") for k, shape in expected.items()}
        checkpoint.load_into(ours, vae.rename_legacy_keys(files), source=name)
