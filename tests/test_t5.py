"""t5.py against transformers' T5EncoderModel and T5TokenizerFast: same files, same ids, same states; T5-XXL on meta."""

import json
import random
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import checkpoint
import t5
from util import max_rel_err

transformers = pytest.importorskip("transformers")
from tiny_pipelines import make_t5_tokenizer  # noqa: E402  (imports transformers)

# Tiny encoders, every feature of T5-XXL's: the real buckets over 256 tokens (so that the far,
# logarithmic buckets are used), and one whose heads are not as wide as the model (nh hs != D).
TINY = {
    "xxl-like": dict(vocab_size=320, d_model=32, d_kv=8, d_ff=48, num_layers=3, num_heads=4),
    "narrow-heads": dict(vocab_size=320, d_model=24, d_kv=4, d_ff=40, num_layers=2, num_heads=3,
                         relative_attention_num_buckets=8, relative_attention_max_distance=20),
}

# text_encoder_3/config.json of stabilityai/stable-diffusion-3-medium-diffusers (google/t5-v1_1-xxl's encoder)
XXL = {"architectures": ["T5EncoderModel"], "classifier_dropout": 0.0, "d_ff": 10240, "d_kv": 64, "d_model": 4096,
       "decoder_start_token_id": 0, "dense_act_fn": "gelu_new", "dropout_rate": 0.1, "eos_token_id": 1,
       "feed_forward_proj": "gated-gelu", "initializer_factor": 1.0, "is_encoder_decoder": True, "is_gated_act": True,
       "layer_norm_epsilon": 1e-06, "model_type": "t5", "num_decoder_layers": 24, "num_heads": 64, "num_layers": 24,
       "output_past": True, "pad_token_id": 0, "relative_attention_max_distance": 128,
       "relative_attention_num_buckets": 32, "tie_word_embeddings": False, "torch_dtype": "float16", "use_cache": True,
       "vocab_size": 32128}


def reference(name, dtype=torch.float32):
    """transformers' encoder of a tiny config, every weight (norms included) randomized."""
    torch.manual_seed(0)
    config = transformers.T5Config(**TINY[name], feed_forward_proj="gated-gelu", is_encoder_decoder=False)
    model = transformers.T5EncoderModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * (0.3 if p.ndim == 2 else 0.2) + (1.0 if p.ndim == 1 else 0.0))
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name -> (reference model, folder holding text_encoder_3/ as transformers saves it)."""
    out = {}
    for name in TINY:
        model = reference(name)
        root = tmp_path_factory.mktemp(name)
        model.save_pretrained(root / "text_encoder_3")
        out[name] = model, root
    return out


def ids(batch, length, vocab=320, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=g)


# -----------------------------------------------------------------------------
# encoder


@pytest.mark.parametrize("name", TINY)
def test_fp32_parity(saved, name):
    ref, root = saved[name]
    ours = t5.T5Encoder.from_pretrained(root)
    assert not ours.training and ours.dtype == torch.float32
    for length in (256, 13):  # SD3's 256 tokens, and another length (the bias is computed per length)
        x = ids(2, length)
        with torch.no_grad():
            expected = ref(x).last_hidden_state
            out = ours(x)
        assert out.shape == expected.shape
        assert max_rel_err(out, expected) <= 1e-5, (name, length)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_matches_transformers(saved, dtype):
    """fp16 keeps `wo` in fp32, as transformers does (its stream then stays fp32); bf16 casts everything."""
    ref, root = saved["xxl-like"]
    ours = t5.T5Encoder.from_pretrained(root, dtype=dtype)
    theirs = transformers.T5EncoderModel.from_pretrained(root / "text_encoder_3", dtype=dtype).eval()
    ours_wo = {k: v.dtype for k, v in ours.state_dict().items() if k.endswith(".wo.weight")}
    theirs_wo = {k: v.dtype for k, v in theirs.state_dict().items() if k.endswith(".wo.weight")}
    assert ours_wo == theirs_wo == dict.fromkeys(ours_wo, torch.float32 if dtype == torch.float16 else dtype)
    assert {v.dtype for k, v in ours.state_dict().items() if not k.endswith(".wo.weight")} == {dtype}
    x = ids(2, 256)
    with torch.no_grad():
        expected16, expected32, out = theirs(x).last_hidden_state, ref(x).last_hidden_state, ours(x)
    assert out.dtype == expected16.dtype == dtype
    assert max_rel_err(out, expected16) <= 1e-3  # the same half-precision operations (bit-identical here)
    assert max_rel_err(out, expected32) <= 1.5 * max_rel_err(expected16, expected32) + 1e-3


def test_position_buckets_match_transformers():
    bucket = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket
    relative = torch.arange(-400, 401)[None, :] - torch.arange(0, 3)[:, None]
    for num_buckets, max_distance in ((32, 128), (8, 20), (64, 300)):
        expected = bucket(relative, bidirectional=True, num_buckets=num_buckets, max_distance=max_distance)
        assert torch.equal(t5.relative_position_bucket(relative, num_buckets, max_distance), expected)
    # every bucket is used but one: "after the query, distance 0" cannot happen
    assert t5.relative_position_bucket(relative, 32, 128).unique().tolist() == [b for b in range(32) if b != 16]


def test_fp16_infinities_are_clamped():
    x = torch.tensor([1.0, float("inf"), -float("inf")], dtype=torch.float16)
    limit = torch.tensor(65504 - 1000, dtype=torch.float16).item()  # as transformers' T5Block (in fp16: 64512)
    assert t5.clamp_fp16(x).tolist() == [1.0, limit, -limit]
    finite = torch.tensor([65504.0, -3.0], dtype=torch.float16)
    assert torch.equal(t5.clamp_fp16(finite), finite)
    assert t5.clamp_fp16(torch.tensor([float("inf")])).isinf().all()  # only fp16


def test_sharded_checkpoint_loads(saved, tmp_path):
    """The hub stores T5-XXL in shards with an index (model.safetensors.index.json), as transformers writes them."""
    ref, _ = saved["narrow-heads"]
    ref.save_pretrained(tmp_path / "text_encoder_3", max_shard_size="20KB")
    shards = sorted(p.name for p in (tmp_path / "text_encoder_3").glob("model-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "text_encoder_3" / "model.safetensors.index.json").is_file()
    x = ids(2, 11)
    with torch.no_grad():
        assert max_rel_err(t5.T5Encoder.from_pretrained(tmp_path)(x), ref(x).last_hidden_state) <= 1e-5


def test_tied_embedding_read_once(saved, tmp_path):
    ref, root = saved["narrow-heads"]
    folder = tmp_path / "text_encoder_3"
    shutil.copytree(root / "text_encoder_3", folder)
    file = folder / "model.safetensors"
    tensors = load_file(file)
    x = ids(1, 9)
    with torch.no_grad():
        expected = ref(x).last_hidden_state
    both = {**tensors, "encoder.embed_tokens.weight": tensors["shared.weight"].clone()}  # older saves hold both
    save_file(both, file)
    assert max_rel_err(t5.T5Encoder.from_pretrained(folder)(x), expected) <= 1e-5
    only = {("encoder.embed_tokens.weight" if k == "shared.weight" else k): v for k, v in tensors.items()}
    save_file(only, file)
    assert max_rel_err(t5.T5Encoder.from_pretrained(folder)(x), expected) <= 1e-5
    save_file({**both, "encoder.embed_tokens.weight": torch.zeros_like(tensors["shared.weight"])}, file)
    with pytest.raises(checkpoint.CheckpointError, match="embed_tokens.weight differs from shared.weight"):
        t5.T5Encoder.from_pretrained(folder)


def test_weights_that_do_not_fit_are_named(saved, tmp_path):
    folder = tmp_path / "text_encoder_3"
    shutil.copytree(saved["xxl-like"][1] / "text_encoder_3", folder)
    file = folder / "model.safetensors"
    tensors = load_file(file)
    key = "encoder.block.2.layer.1.DenseReluDense.wi_1.weight"
    save_file({k: v for k, v in tensors.items() if k != key}, file)
    with pytest.raises(checkpoint.CheckpointError, match=f"missing key {re.escape(key)}"):
        t5.T5Encoder.from_pretrained(folder)
    save_file({**tensors, "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight": torch.zeros(32, 4)},
              file)  # only the first layer has the bias
    with pytest.raises(checkpoint.CheckpointError, match=r"unexpected key encoder\.block\.1\.layer\.0\.SelfAttention"):
        t5.T5Encoder.from_pretrained(folder)
    save_file(tensors, file)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "d_ff": 64}))  # a config the weights do not fit
    with pytest.raises(checkpoint.CheckpointError, match=r"wi_0\.weight has shape \(48, 32\), expected \(64, 32\)"):
        t5.T5Encoder.from_pretrained(folder)


@pytest.mark.parametrize("change, message", [
    (dict(feed_forward_proj="relu"), "feed_forward_proj is 'relu'; this encoder is T5 v1.1's"),
    (dict(model_type="clip_text_model"), "model_type is 'clip_text_model', expected 't5'"),
    (dict(d_kv=None), "missing d_kv"),
])
def test_config_errors(change, message):
    config = {k: v for k, v in {**XXL, **change}.items() if v is not None}
    with pytest.raises(checkpoint.CheckpointError, match=message):
        t5.T5Config.from_hub(config)


def test_t5_xxl_keys_and_shapes_on_meta():
    config = t5.T5Config.from_hub(XXL)
    assert config == t5.PRESETS["t5-v1_1-xxl"]()
    with torch.device("meta"):
        ref = transformers.T5EncoderModel(transformers.T5Config(**XXL))
        ours = t5.T5Encoder(config)
    # what transformers saves: the tied encoder.embed_tokens.weight is written once, as shared.weight
    expected = {k: tuple(v.shape) for k, v in ref.state_dict().items() if k != "encoder.embed_tokens.weight"}
    got = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert got == expected and len(got) == 24 * 9 + 3
    checkpoint.load_into(ours, t5.official_keys(ref.state_dict()), source="t5-v1_1-xxl")
    assert sum(p.numel() for p in ours.parameters()) == 4_762_310_656  # 9.5 GB in bf16


# -----------------------------------------------------------------------------
# tokenizer


PROMPTS = ["a photo of an astronaut riding a horse on the moon", "", "A Red CAT, in oil!", "  two   spaces\tand a tab ",
           "sky\nwith newline", "ünïcödé and 日本語 are unknown", "a </s> typed, <pad> and <extra_id_3> too",
           " ".join(["painting"] * 300)]  # longer than 256 tokens: cut, then </s>


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    folder = make_t5_tokenizer(tmp_path_factory.mktemp("tokenizer_3"))
    return folder, t5.T5Tokenizer.from_pretrained(folder), transformers.T5TokenizerFast.from_pretrained(folder)


def reference_ids(theirs, prompts, max_length=256):
    """As StableDiffusion3Pipeline._get_t5_prompt_embeds tokenizes."""
    return theirs(prompts, padding="max_length", max_length=max_length, truncation=True, add_special_tokens=True,
                  return_tensors="pt").input_ids


def test_tokenizer_matches_transformers(tokenizers):
    _, ours, theirs = tokenizers
    got, expected = ours(PROMPTS), reference_ids(theirs, PROMPTS)
    assert got.shape == (len(PROMPTS), 256) and got.dtype == torch.long
    assert torch.equal(got, expected)
    assert got[1, 0] == 1 and (got[1, 1:] == 0).all()  # the empty prompt: </s>, then pads
    assert got[-1, -1] == 1 and (got[-1] != 0).all()  # cut to 255 tokens and </s>
    assert (got == 2).any()  # unknown characters became <unk>


def test_tokenizer_matches_transformers_on_random_text(tokenizers):
    folder, ours, theirs = tokenizers
    rng = random.Random(0)
    alphabet = "abcdefghijklmnopqrstuvwxyzABC XYZ0123456789,.!?'  \u00e9"
    prompts = ["".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 60))) for _ in range(50)]
    prompts += [" ".join(rng.choice(["a", "photo", "of", "the", "moon", "red", "Cat"]) for _ in range(rng.randrange(9)))
                for _ in range(50)]
    assert torch.equal(ours(prompts), reference_ids(theirs, prompts))
    short = t5.T5Tokenizer.from_pretrained(folder, max_length=8)
    assert torch.equal(short(prompts), reference_ids(theirs, prompts, max_length=8))


def test_tokenizer_errors(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="no tokenizer.json"):
        t5.T5Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(checkpoint.CheckpointError, match="not a readable tokenizer"):
        t5.T5Tokenizer.from_pretrained(tmp_path)
    with pytest.raises(checkpoint.CheckpointError, match="no such folder"):
        t5.T5Tokenizer.from_pretrained("./nowhere")
    folder = make_t5_tokenizer(tmp_path / "t5")
    with pytest.raises(ValueError, match="prompts must be strings"):
        t5.T5Tokenizer.from_pretrained(folder)([None])
