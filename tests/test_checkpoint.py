"""Every broken-checkpoint case raises a CheckpointError that names the file or key."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import checkpoint
import dit


@pytest.fixture
def saved(tmp_path):
    model = dit.DiT(dit.DiTConfig(input_size=8, patch_size=2, in_channels=2, hidden_size=16, depth=2, num_heads=2,
                                  num_classes=3, freq_shift=1))
    dit.save_pretrained(model, tmp_path / "transformer")
    return tmp_path, tmp_path / "transformer" / "diffusion_pytorch_model.safetensors"


def test_loads_from_root_and_subfolder(saved):
    root, _ = saved
    assert dit.from_pretrained(root).config.depth == 2
    assert dit.from_pretrained(root / "transformer").config.depth == 2


def drop(sd, key):
    del sd[key]


@pytest.mark.parametrize("edit, message", [
    (lambda sd: drop(sd, "proj_out_2.bias"), r"missing key proj_out_2\.bias"),
    (lambda sd: sd.update({"transformer_blocks.5.attn1.to_q.weight": torch.zeros(16, 16)}),
     r"unexpected key transformer_blocks\.5\.attn1\.to_q\.weight"),
    (lambda sd: sd.update({"proj_out_2.weight": torch.zeros(3, 16)}), r"proj_out_2\.weight has shape \(3, 16\), expected"),
], ids=["missing", "unexpected", "misshapen"])
def test_a_wrong_key_is_named(saved, edit, message):
    root, file = saved
    sd = load_file(file)
    edit(sd)
    save_file(sd, file)
    with pytest.raises(checkpoint.CheckpointError, match=message):
        dit.from_pretrained(root)


def test_truncated_file(saved):
    root, file = saved
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(checkpoint.CheckpointError, match="diffusion_pytorch_model.safetensors: truncated"):
        dit.from_pretrained(root)


def test_folder_without_config(saved):
    root, _ = saved
    (root / "transformer" / "config.json").unlink()
    with pytest.raises(checkpoint.CheckpointError, match="no config.json"):
        dit.from_pretrained(root)


def test_folder_without_weights(saved):
    root, file = saved
    file.unlink()
    with pytest.raises(checkpoint.CheckpointError, match="no weights"):
        dit.from_pretrained(root)


def test_bad_config_json(saved):
    root, _ = saved
    (root / "transformer" / "config.json").write_text("{not json")
    with pytest.raises(checkpoint.CheckpointError, match="config.json: not valid JSON"):
        dit.from_pretrained(root)


def test_missing_path_is_not_taken_for_a_hub_id(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="no such folder"):
        checkpoint.resolve(tmp_path / "nope", "transformer")


def test_sharded_checkpoint_with_missing_shard(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    save_file({"a": torch.zeros(1)}, tmp_path / "model-00001-of-00002.safetensors")
    with pytest.raises(checkpoint.CheckpointError, match="model-00002-of-00002.safetensors, which is missing"):
        checkpoint.weight_files(tmp_path)
    save_file({"b": torch.ones(1)}, tmp_path / "model-00002-of-00002.safetensors")
    assert set(checkpoint.read_tensors(tmp_path)) == {"a", "b"}


def test_read_tensors_casts_floats_only(tmp_path):
    save_file({"w": torch.randn(3), "i": torch.arange(3)}, tmp_path / "model.safetensors")
    t = checkpoint.read_tensors(tmp_path / "model.safetensors", dtype=torch.bfloat16)
    assert t["w"].dtype == torch.bfloat16 and t["i"].dtype == torch.int64
