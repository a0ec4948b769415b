"""text_encoders.py against its references, on the real CLIP vocabulary and tiny random weights.

The tokenizer against transformers' CLIPTokenizer (what the diffusers pipelines call), the text
towers against transformers' CLIPTextModel(WithProjection) on identical weights, full-size key and
shape checks on the meta device, and the prompt encodings against the diffusers pipelines'
encode_prompt on tiny random SD 2.1 and SDXL pipelines saved to disk. No network.
"""

import gzip
import json
import random
import shutil

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

import checkpoint
import prompts
import text_encoders as te
from tiny_pipelines import CLIP_ASSETS, PAD_BANG, PAD_EOT, make_sdxl, tiny_text_config

HARD_PROMPTS = [
    "",
    " ",
    "a photograph of an astronaut riding a horse",
    "A PHOTOGRAPH Of An ASTRONAUT",  # case
    "café, naïve façade, Ångström, crème brûlée",  # precomposed accents
    "cafe\u0301 nai\u0308ve",  # combining accents, which NFC composes
    "🙂 👍🏽 👨‍👩‍👧 🏳️‍🌈 emoji",  # emoji, a skin tone, zero-width-joiner sequences
    "東京の夜景、水彩画。 一只猫在屋顶上",  # CJK
    "서울의 밤 풍경 صورة قطة हिन्दी में बिल्ली แมวน่ารัก Ελληνικά ΣΟΦΊΑ",  # other scripts, marks
    "hello! wow!!! really?! x!y",  # "!" is the pad token of SD 2.1's tokenizer
    "(masterpiece:1.2), [bad], {x}; a-b_c/d\\e ... --ar 16:9 #tag @user",
    "don't, it's, we're, I've, I'm, you'll, he'd, O'Neil's DON'T IT'S ''quoted''",  # contractions
    "3.14159 1024x768 2nd 1,000,000",  # digits are split one by one
    "tabs\tand\nnew  lines\r\n and\u00a0nbsp\u3000ideographic space, zero\u200bwidth",
    "\x00\x07\x1b[0m control characters",
    "ﬁne ﬂour ＦＵＬＬ ｗｉｄｔｈ",  # NFC keeps ligatures and full-width forms
    "İstanbul STRASSE straße ǅ",  # lowercase corner cases
    "a <|endoftext|> b <|startoftext|>c <|ENDOFTEXT|> &amp; &lt;b&gt;",  # special tokens typed in
    "word " * 74 + "end",  # about 75 tokens: the most that fit
    "word " * 75 + "end",  # one more: cut
    "a very long prompt, " * 40,  # far beyond the context
    "supercalifragilisticexpialidocious" * 5,  # one long word, many BPE pieces
]


def random_prompts(n, seed=0):
    """Random strings over many scripts, symbols, whitespace and special tokens."""
    rng = random.Random(seed)
    ranges = [(0x20, 0x7E)] * 4 + [(0x9, 0xD), (0xA0, 0x24F), (0x300, 0x36F), (0x370, 0x4FF), (0x590, 0x6FF),
                                   (0x900, 0x97F), (0xE00, 0xE7F), (0x2000, 0x206F), (0x3000, 0x30FF),
                                   (0x4E00, 0x4FFF), (0xAC00, 0xACFF), (0xFF00, 0xFFEF), (0x1F300, 0x1F6FF)]
    extras = ["", "!", "'s", "'LL", "<|endoftext|>", "<|startoftext|>", "<|EndOfText|>", "  ", "\n", "1234"]
    return ["".join(chr(rng.randint(*rng.choice(ranges))) if rng.random() < 0.9 else rng.choice(extras)
                    for _ in range(rng.randint(0, 60))) for _ in range(n)]


def reference_ids(tokenizer, prompts):
    """What the diffusers pipelines feed their text encoders."""
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


# -----------------------------------------------------------------------------
# tokenizer


@pytest.fixture(scope="module", params=[PAD_BANG, PAD_EOT], ids=["pad_bang", "pad_eot"])
def tokenizers(request):
    """(ours, transformers') on one of the two hub tokenizer folders."""
    return te.Tokenizer.from_pretrained(request.param), CLIPTokenizer.from_pretrained(request.param)


def test_tokenizer_matches_transformers_on_hard_prompts(tokenizers):
    ours, theirs = tokenizers
    ids = ours(HARD_PROMPTS)
    assert ids.shape == (len(HARD_PROMPTS), 77) and ids.dtype == torch.long
    for prompt, row, expected in zip(HARD_PROMPTS, ids, reference_ids(theirs, HARD_PROMPTS)):
        assert torch.equal(row, expected), f"prompt {prompt!r}"


def test_tokenizer_matches_transformers_on_random_text(tokenizers):
    ours, theirs = tokenizers
    prompts = random_prompts(300)
    assert torch.equal(ours(prompts), reference_ids(theirs, prompts))


def test_tokenizer_pad_conventions():
    """SD 2.1 pads with "!" (id 0), which then also stands for every "!" typed; SDXL's first with <|endoftext|>."""
    bang, eot = te.Tokenizer.from_pretrained(PAD_BANG), te.Tokenizer.from_pretrained(PAD_EOT)
    assert bang.pad_id == 0 and eot.pad_id == 49407 and bang.bos_id == eot.bos_id == 49406
    assert bang("hi!")[0, :5].tolist() == [49406, 1883, 0, 49407, 0]
    assert eot("hi!")[0, :5].tolist() == [49406, 1883, 256, 49407, 49407]  # "!</w>" is 256
    assert bang("")[0].tolist() == [49406, 49407] + [0] * 75
    assert bang("x").shape == (1, 77) and bang([]).shape == (0, 77)


def test_tokenizer_reads_the_hub_dict_form(tmp_path):
    """The hub's SD 2.1 folder writes its special tokens as dicts, with normalized: true."""
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(PAD_BANG / name, tmp_path / name)
    token = lambda content: {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True,
                             "rstrip": False, "single_word": False}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(dict(
        add_prefix_space=False, bos_token=token("<|startoftext|>"), eos_token=token("<|endoftext|>"),
        unk_token=token("<|endoftext|>"), pad_token="!", do_lower_case=True, errors="replace",
        model_max_length=77, tokenizer_class="CLIPTokenizer")))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps(dict(
        bos_token=token("<|startoftext|>"), eos_token=token("<|endoftext|>"), unk_token=token("<|endoftext|>"),
        pad_token="!")))
    ours, theirs = te.Tokenizer.from_pretrained(tmp_path), CLIPTokenizer.from_pretrained(tmp_path)
    prompts = HARD_PROMPTS + ["<|ENDOFTEXT|> is matched after lowercasing here"]
    assert torch.equal(ours(prompts), reference_ids(theirs, prompts))
    plain = te.Tokenizer.from_pretrained(PAD_BANG)  # the flag matters: there it is not matched
    assert not torch.equal(ours(prompts[-1:]), plain(prompts[-1:]))


def test_tokenizer_reads_a_transformers_5_folder(tmp_path):
    """transformers 5 saves only tokenizer.json (+ tokenizer_config.json)."""
    CLIPTokenizer.from_pretrained(PAD_BANG).save_pretrained(tmp_path)
    assert not (tmp_path / "vocab.json").exists()
    assert torch.equal(te.Tokenizer.from_pretrained(tmp_path)(HARD_PROMPTS),
                       te.Tokenizer.from_pretrained(PAD_BANG)(HARD_PROMPTS))


def bytes_to_unicode():
    """GPT-2's map from the 256 bytes to printable characters, which CLIP's BPE works on."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}


def test_hub_vocabulary_is_openais_bpe():
    """The hub's vocab.json and merges.txt are OpenAI's bpe_simple_vocab_16e6, as simple_tokenizer.py reads it."""
    lines = gzip.open(CLIP_ASSETS / "bpe_simple_vocab_16e6.txt.gz", "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    hub_vocab = json.loads((PAD_BANG / "vocab.json").read_text(encoding="utf-8"))
    assert hub_vocab == {token: i for i, token in enumerate(vocab)}
    hub_merges = (PAD_BANG / "merges.txt").read_text(encoding="utf-8").split("\n")[1:]
    assert [tuple(m.split()) for m in hub_merges if m] == merges


def test_tokenizer_errors(tmp_path):
    tok = te.Tokenizer.from_pretrained(PAD_EOT)
    with pytest.raises(ValueError, match="prompts must be strings"):
        tok(["ok", 3])
    with pytest.raises(checkpoint.CheckpointError, match="no such folder"):
        te.Tokenizer.from_pretrained(tmp_path / "missing")
    with pytest.raises(checkpoint.CheckpointError, match="no tokenizer"):
        te.Tokenizer.from_pretrained(tmp_path)
    shutil.copyfile(PAD_EOT / "vocab.json", tmp_path / "vocab.json")
    with pytest.raises(checkpoint.CheckpointError, match="merges.txt: missing"):
        te.Tokenizer.from_pretrained(tmp_path)


# -----------------------------------------------------------------------------
# text towers


def tiny_reference(tmp_path, with_projection, hidden_act, eos_token_id, num_hidden_layers=3, seed=0):
    """A transformers text tower with random weights, saved as transformers saves it; (model, folder)."""
    torch.manual_seed(seed)
    config = tiny_text_config(32, hidden_act, projection_dim=24, num_hidden_layers=num_hidden_layers,
                              eos_token_id=eos_token_id)
    model = (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)
    with torch.no_grad():  # transformers initializes LayerNorms to (1, 0): make them count
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(tmp_path)
    return model.eval(), tmp_path


def tower_ids():
    """Token ids from both pad conventions, including typed special tokens and cut prompts."""
    return torch.cat([te.Tokenizer.from_pretrained(PAD_BANG)(HARD_PROMPTS),
                      te.Tokenizer.from_pretrained(PAD_EOT)(HARD_PROMPTS)])


@pytest.mark.parametrize("with_projection, hidden_act, eos_token_id, num_hidden_layers", [
    (False, "quick_gelu", 2, 3),  # ViT-L/14 as in SDXL's config: legacy eos id, pool at the largest id
    (False, "gelu", 49407, 1),  # ViT-H/14's GELU, a newer config's eos id; one layer: penultimate = embeddings
    (True, "gelu", 2, 3),  # ViT-bigG/14 as in SDXL's config
    (True, "quick_gelu", 49407, 2),
])
def test_text_encoder_matches_transformers(tmp_path, with_projection, hidden_act, eos_token_id, num_hidden_layers):
    reference, folder = tiny_reference(tmp_path, with_projection, hidden_act, eos_token_id, num_hidden_layers)
    model = te.TextEncoder.from_pretrained(folder)
    assert model.config.with_projection == with_projection and model.config.hidden_act == hidden_act
    ids = tower_ids()
    with torch.no_grad():
        last, penultimate, pooled = model(ids)
        expected = reference(ids, output_hidden_states=True)
    torch.testing.assert_close(last, expected.last_hidden_state, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(penultimate, expected.hidden_states[-2], atol=1e-5, rtol=1e-5)
    expected_pooled = expected.text_embeds if with_projection else expected.pooler_output
    torch.testing.assert_close(pooled, expected_pooled, atol=1e-5, rtol=1e-5)
    assert pooled.shape == (len(ids), 24 if with_projection else 32)


def test_pooling_takes_the_first_end_token():
    """Both pooling rules find a typed <|endoftext|> before the real one, and ignore <|endoftext|> padding."""
    ids = te.Tokenizer.from_pretrained(PAD_EOT)(["a photo", "a <|endoftext|> b", ""])
    for eos_token_id in (2, 49407):
        with torch.device("meta"):
            model = te.TextEncoder(te.TextConfig(eos_token_id=eos_token_id))
        assert model.eos_positions(ids).tolist() == [3, 2, 1]


def test_text_encoder_loads_the_official_layout(tmp_path):
    """The hub's files: text_model.-prefixed keys, and (before transformers 4.31) the position_ids buffer."""
    _, folder = tiny_reference(tmp_path / "saved", False, "quick_gelu", 2)
    tensors = checkpoint.read_tensors(folder)
    assert not any(k.startswith("text_model.") for k in tensors)  # what transformers 5 writes
    official = tmp_path / "official"
    official.mkdir()
    shutil.copyfile(folder / "config.json", official / "config.json")
    hub = {"text_model." + k: v for k, v in tensors.items()}
    hub["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    checkpoint.save_file(hub, official / "model.safetensors")
    a, b = te.TextEncoder.from_pretrained(folder), te.TextEncoder.from_pretrained(official)
    ids = tower_ids()[:4]
    with torch.no_grad():
        assert all(torch.equal(x, y) for x, y in zip(a(ids), b(ids)))

    hub.pop("text_model.final_layer_norm.bias")
    hub["text_model.encoder.layers.0.mlp.fc1.weight"] = torch.zeros(3, 3)
    checkpoint.save_file(hub, official / "model.safetensors")
    with pytest.raises(checkpoint.CheckpointError, match="missing key text_model.final_layer_norm.bias"):
        te.TextEncoder.from_pretrained(official)
    hub["text_model.final_layer_norm.bias"] = torch.zeros(32)
    checkpoint.save_file(hub, official / "model.safetensors")
    with pytest.raises(checkpoint.CheckpointError, match=r"key text_model.encoder.layers.0.mlp.fc1.weight has shape"):
        te.TextEncoder.from_pretrained(official)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float16, 1e-2), (torch.bfloat16, 6e-2)])
def test_text_encoder_half_precision(tmp_path, dtype, tolerance):
    reference, folder = tiny_reference(tmp_path, True, "gelu", 2)
    model = te.TextEncoder.from_pretrained(folder, dtype=dtype)
    assert {p.dtype for p in model.parameters()} == {dtype}
    ids = tower_ids()[:8]
    with torch.no_grad():
        outputs = model(ids)
        expected = reference(ids, output_hidden_states=True)
    for out, ref in zip(outputs, (expected.last_hidden_state, expected.hidden_states[-2], expected.text_embeds)):
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), ref, atol=tolerance, rtol=tolerance)


# The text encoders' config.json in the hub repos (stabilityai/stable-diffusion-xl-base-1.0:
# text_encoder, text_encoder_2; stabilityai/stable-diffusion-2-1: text_encoder).
COMMON = dict(attention_dropout=0.0, bos_token_id=0, dropout=0.0, eos_token_id=2, initializer_factor=1.0,
              initializer_range=0.02, layer_norm_eps=1e-05, max_position_embeddings=77,
              model_type="clip_text_model", pad_token_id=1, torch_dtype="float16", vocab_size=49408)
OFFICIAL_CONFIGS = {
    "ViT-L/14": dict(COMMON, architectures=["CLIPTextModel"], hidden_act="quick_gelu", hidden_size=768,
                     intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12, projection_dim=768),
    "ViT-H/14": dict(COMMON, architectures=["CLIPTextModel"], hidden_act="gelu", hidden_size=1024,
                     intermediate_size=4096, num_attention_heads=16, num_hidden_layers=23, projection_dim=512),
    "ViT-bigG/14": dict(COMMON, architectures=["CLIPTextModelWithProjection"], hidden_act="gelu", hidden_size=1280,
                        intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32, projection_dim=1280),
}


def test_config_errors():
    good = json.loads(json.dumps(OFFICIAL_CONFIGS["ViT-L/14"]))
    with pytest.raises(checkpoint.CheckpointError, match="hidden_act is 'relu'"):
        te.TextConfig.from_hub({**good, "hidden_act": "relu"})
    with pytest.raises(checkpoint.CheckpointError, match="missing num_hidden_layers"):
        te.TextConfig.from_hub({k: v for k, v in good.items() if k != "num_hidden_layers"})
    with pytest.raises(checkpoint.CheckpointError, match="not a multiple of num_attention_heads 7"):
        te.TextConfig.from_hub({**good, "num_attention_heads": 7})


@pytest.mark.parametrize("name", list(te.PRESETS))
def test_full_size_presets_load_every_official_key(name):
    """Each preset is its hub config, and takes every key and shape of the transformers model it names."""
    config = OFFICIAL_CONFIGS[name]
    assert te.TextConfig.from_hub(config) == te.PRESETS[name]()
    fields = {k: v for k, v in config.items() if k not in ("architectures", "model_type", "torch_dtype")}
    with torch.device("meta"):
        reference = (CLIPTextModelWithProjection if "WithProjection" in config["architectures"][0]
                     else CLIPTextModel)(CLIPTextConfig(**fields))
        model = te.TextEncoder(te.PRESETS[name]())
    official = te.official_keys(reference.state_dict())  # the hub's names, whatever transformers' version
    assert any(k.startswith("text_projection") for k in official) == model.config.with_projection
    checkpoint.load_into(model, official, source=name)  # strict: every key and shape
    assert sum(p.numel() for p in model.parameters()) == sum(t.numel() for t in official.values())


# -----------------------------------------------------------------------------
# prompt encoding: against the diffusers pipelines on tiny random pipelines


PROMPTS = ["a photograph of an astronaut riding a horse", "hello! CAFÉ 🙂 東京", "", "a very long prompt, " * 40]
CLOSE = dict(atol=1e-6, rtol=1e-5)


@pytest.fixture(scope="module")
def sd21(sd21_root):
    root = sd21_root
    return root, StableDiffusionPipeline.from_pretrained(root), prompts.PromptEncoder.from_pretrained(root)


@pytest.fixture(scope="module")
def sdxl(sdxl_root):
    root = sdxl_root
    return root, StableDiffusionXLPipeline.from_pretrained(root), prompts.PromptEncoder.from_pretrained(root)


def test_sd21_matches_diffusers(sd21):
    root, pipe, pe = sd21
    assert not pe.is_xl and not any(p.requires_grad for p in pe.parameters())
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=1,
                                          do_classifier_free_guidance=True)
        _, negative = pipe.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=1,
                                         do_classifier_free_guidance=True, negative_prompt=["blurry, ugly"] * 4)
        _, negatives = pipe.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=1,
                                          do_classifier_free_guidance=True, negative_prompt=PROMPTS[::-1])
    ours = pe(PROMPTS)
    assert set(ours) == {"context"} and ours["context"].shape == (4, 77, 32)
    torch.testing.assert_close(ours["context"], cond, **CLOSE)
    null = pe.null(4)
    assert set(null) == {"context"}
    torch.testing.assert_close(null["context"], uncond, **CLOSE)  # the empty prompt
    torch.testing.assert_close(pe.null(4, negative_prompt="blurry, ugly")["context"], negative, **CLOSE)
    torch.testing.assert_close(pe.null(4, negative_prompt=PROMPTS[::-1])["context"], negatives, **CLOSE)


def sdxl_reference(pipe, height, width, **kwargs):
    """diffusers' SDXL condition and null condition, as dicts of the UNet's keyword arguments."""
    with torch.no_grad():
        context, negative, pooled, negative_pooled = pipe.encode_prompt(
            PROMPTS, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True, **kwargs)
    time_ids = pipe._get_add_time_ids((height, width), (0, 0), (height, width), dtype=context.dtype,
                                      text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
    time_ids = time_ids.repeat(len(PROMPTS), 1)
    return (dict(context=context, text_embeds=pooled, time_ids=time_ids),
            dict(context=negative, text_embeds=negative_pooled, time_ids=time_ids))


def assert_cond_close(ours, expected):
    assert set(ours) == set(expected) == {"context", "text_embeds", "time_ids"}
    for key in expected:
        torch.testing.assert_close(ours[key], expected[key], **CLOSE, msg=lambda m: f"{key}: {m}")


def test_sdxl_matches_diffusers(sdxl):
    root, pipe, pe = sdxl
    assert pe.is_xl and pe.force_zeros_for_empty_prompt
    cond, null = sdxl_reference(pipe, 16, 24)
    ours = pe(PROMPTS, height=16, width=24)
    assert ours["context"].shape == (4, 77, 32 + 48) and ours["text_embeds"].shape == (4, 40)
    assert_cond_close(ours, cond)
    assert ours["time_ids"][0].tolist() == [16, 24, 0, 0, 16, 24]
    assert_cond_close(pe.null(4, height=16, width=24), null)
    assert not null["context"].any() and not null["text_embeds"].any()  # force_zeros_for_empty_prompt

    # An explicit negative prompt, "" included, is encoded, not zeroed.
    for negative_prompt in ("", "blurry, ugly", PROMPTS[::-1]):
        _, null = sdxl_reference(pipe, 16, 24, negative_prompt=negative_prompt)
        assert null["context"].any()
        assert_cond_close(pe.null(4, height=16, width=24, negative_prompt=negative_prompt), null)


def test_sdxl_without_force_zeros_encodes_the_empty_prompt(tmp_path):
    root = make_sdxl(tmp_path, force_zeros_for_empty_prompt=False)
    pipe, pe = StableDiffusionXLPipeline.from_pretrained(root), prompts.PromptEncoder.from_pretrained(root)
    assert not pe.force_zeros_for_empty_prompt
    _, null = sdxl_reference(pipe, 32, 32)
    assert null["context"].any()
    assert_cond_close(pe.null(4, height=32, width=32), null)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_prompt_encoder_half_precision(sdxl, dtype):
    root, _, pe = sdxl
    half = prompts.PromptEncoder.from_pretrained(root, dtype=dtype)
    for ours, full in ((half(PROMPTS, height=16, width=24), pe(PROMPTS, height=16, width=24)),
                       (half.null(4, height=16, width=24), pe.null(4, height=16, width=24))):
        assert {v.dtype for v in ours.values()} == {dtype}  # time_ids too, as the pipeline makes them
        for key in ours:
            torch.testing.assert_close(ours[key].float(), full[key], atol=6e-2, rtol=6e-2)


def test_prompt_encoder_errors(sd21, sdxl, tmp_path):
    (_, _, pe), (_, _, pe_xl) = sd21, sdxl
    with pytest.raises(ValueError, match="pass height= and width="):
        pe_xl(PROMPTS)
    with pytest.raises(ValueError, match="pass height= and width="):
        pe_xl.null(2)
    with pytest.raises(ValueError, match="negative_prompt has 1 prompts, expected 4"):
        pe.null(4, negative_prompt=["x"])
    with pytest.raises(checkpoint.CheckpointError, match="model_index.json: missing"):
        prompts.PromptEncoder.from_pretrained(tmp_path)
    (tmp_path / "model_index.json").write_text(json.dumps({"unet": ["diffusers", "UNet2DConditionModel"],
                                                           "text_encoder": [None, None]}))
    with pytest.raises(checkpoint.CheckpointError, match="lists no tokenizer and text_encoder"):
        prompts.PromptEncoder.from_pretrained(tmp_path)
