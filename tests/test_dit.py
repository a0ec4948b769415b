"""DiT: numerical parity with diffusers' DiTTransformer2DModel on identical weights, and strict loading."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import checkpoint
import dit
from util import max_rel_err

diffusers = pytest.importorskip("diffusers")


def reference_dit(tmp_path, learn_sigma=True, num_layers=2, seed=0, **kw):
    """A tiny diffusers DiT with random weights (embedder copies made equal, as in converted checkpoints)."""
    torch.manual_seed(seed)
    cfg = dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8 if learn_sigma else 4,
               num_layers=num_layers, sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_eps=1e-6)
    cfg.update(kw)
    ref = diffusers.DiTTransformer2DModel(**cfg).eval()
    sd = ref.state_dict()
    for k in sd:  # random normal weights everywhere, so no zero-init hides a bug
        sd[k] = torch.randn_like(sd[k]) * 0.2
    for k in sd:
        if ".norm1.emb." in k and not k.startswith("transformer_blocks.0."):
            sd[k] = sd["transformer_blocks.0." + k.split(".", 2)[2]]
    ref.load_state_dict(sd)
    ref.save_pretrained(tmp_path / "transformer")
    return ref




@pytest.mark.parametrize("learn_sigma", [True, False])
def test_parity_with_diffusers(tmp_path, learn_sigma):
    ref = reference_dit(tmp_path, learn_sigma=learn_sigma)
    ours = dit.from_pretrained(tmp_path)  # the repo root: finds transformer/
    x = torch.randn(3, 4, 8, 8)
    t = torch.tensor([0, 500, 999])
    y = torch.tensor([0, 7, 10])  # 10 is the null class
    with torch.no_grad():
        expected = ref(x, t, class_labels=y).sample
        got = ours(x, t, y=y)
    assert got.shape == (3, 8 if learn_sigma else 4, 8, 8)
    assert max_rel_err(got, expected) < 1e-5


def test_parity_fractional_and_scalar_timesteps(tmp_path):
    ref = reference_dit(tmp_path, norm_eps=1e-5, patch_size=4, sample_size=16)
    ours = dit.from_pretrained(tmp_path / "transformer")  # the subfolder itself
    x = torch.randn(2, 4, 16, 16)
    y = torch.tensor([3, 10])
    with torch.no_grad():
        assert max_rel_err(ours(x, 321.5, y=y), ref(x, torch.tensor([321.5, 321.5]), class_labels=y).sample) < 1e-5


def test_save_pretrained_round_trip_loads_in_diffusers(tmp_path):
    model = dit.DiT(dit.DiT_models["tiny-mnist"]()).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.1)
    dit.save_pretrained(model, tmp_path / "transformer")
    ref = diffusers.DiTTransformer2DModel.from_pretrained(tmp_path / "transformer").eval()
    again = dit.from_pretrained(tmp_path)
    x, t, y = torch.randn(2, 1, 28, 28), torch.tensor([5, 900]), torch.tensor([1, 10])
    with torch.no_grad():
        ours = model(x, t, y=y)
        assert torch.equal(again(x, t, y=y), ours)
        assert max_rel_err(ours, ref(x, t, class_labels=y).sample) < 1e-5


def test_embedder_copies_must_agree(tmp_path):
    reference_dit(tmp_path)
    file = tmp_path / "transformer" / "diffusion_pytorch_model.safetensors"
    sd = load_file(file)
    key = "transformer_blocks.1.norm1.emb.timestep_embedder.linear_1.weight"
    sd[key] = sd[key] + 1
    save_file(sd, file)
    with pytest.raises(checkpoint.CheckpointError, match=key.replace(".", r"\.")):
        dit.from_pretrained(tmp_path)


def test_presets_and_parameter_count():
    assert set(dit.DiT_models) >= {f"DiT-{s}/{p}" for s in "SBL" for p in (2, 4, 8)} | {"DiT-XL/2", "tiny-mnist"}
    with torch.device("meta"):
        model = dit.DiT(dit.DiT_models["DiT-XL/2"]())
    n = sum(p.numel() for p in model.parameters())
    assert round(n / 1e6) == 675  # the paper's 675M (Table 4): embedders counted once


def test_full_size_config_matches_diffusers_keys():
    """DiT-XL/2-256's config.json: every diffusers key maps onto ours with the same shape."""
    config = {"sample_size": 32, "patch_size": 2, "in_channels": 4, "out_channels": 8, "num_layers": 28,
              "num_attention_heads": 16, "attention_head_dim": 72, "num_embeds_ada_norm": 1000,
              "norm_type": "ada_norm_zero"}
    with torch.device("meta"):
        ref = diffusers.DiTTransformer2DModel(**config)
        ours = dit.DiT(dit.config_from_diffusers(config))
    mapped = dit.from_diffusers(ref.state_dict(), 28)
    checkpoint.check_keys({k: v.shape for k, v in ours.state_dict().items()}, mapped, "DiT-XL/2")


def test_config_json_errors(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"norm_type": "layer_norm"}))
    with pytest.raises(checkpoint.CheckpointError, match="not a DiT"):
        dit.from_pretrained(tmp_path)
