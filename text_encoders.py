"""CLIP's tokenizer and text towers, as Stable Diffusion 2.1 and SDXL use them.

Two pieces, read in order (prompts.py puts them together as the pipelines do):

    tok = Tokenizer.from_pretrained(root)            # CLIP's BPE: prompts -> ids (B, 77)
    te = TextEncoder.from_pretrained(root)           # a CLIP text tower: ids -> hidden states, pooled

The towers are CLIP's text transformer (Radford et al., "Learning Transferable Visual Models From
Natural Language Supervision", 2021): OpenAI's ViT-L/14 (SDXL's first encoder), and OpenCLIP's
ViT-H/14 (SD 2.1) and ViT-bigG/14 (SDXL's second; Cherti et al., "Reproducible scaling laws for
contrastive language-image learning", 2023). Attribute names are the keys of the hub's
transformers checkpoints (text_model.encoder.layers.0.self_attn.q_proj.weight, ...), so loading is
strict and mechanical. Every output equals what the diffusers pipelines feed their UNet.

Letters in shape comments: B batch, T tokens (77), D hidden size, nh heads, hs head size,
P projection size.
"""

import json
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tokenizers import AddedToken, Regex, normalizers, pre_tokenizers
from tokenizers import Tokenizer as BPETokenizer
from tokenizers.models import BPE

import checkpoint

# -----------------------------------------------------------------------------
# tokenizer

# OpenAI's CLIP tokenizer (simple_tokenizer.py in github.com/openai/CLIP) splits lowercased text into
# words with this pattern: the two special tokens, English contractions, runs of letters, single
# digits, and runs of anything else that is not a space. Each word is then byte-level BPE'd, its
# last symbol marked by "</w>".
CLIP_WORDS = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
CONTEXT_LENGTH = 77  # CLIP's text context: <|startoftext|>, 75 tokens, <|endoftext|>
SPECIAL_TOKENS = {  # role -> transformers' CLIPTokenizer default, used where a folder names none
    "bos_token": "<|startoftext|>",
    "eos_token": "<|endoftext|>",
    "pad_token": "<|endoftext|>",
    "unk_token": "<|endoftext|>",
}


def read_json(file, default=None):
    """A JSON file as a dict; `default` when it is absent (None: it must exist)."""
    if not file.is_file():
        if default is None:
            raise checkpoint.CheckpointError(f"{file}: missing")
        return default
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise checkpoint.CheckpointError(f"{file}: not valid JSON ({e})") from None


def _tokenizer_folder(path_or_repo_id, subfolder):
    """A local folder holding a tokenizer: the folder itself, its `subfolder`, or a hub download."""
    path = Path(path_or_repo_id).expanduser()
    if path.exists():
        for folder in ([path / subfolder] if subfolder else []) + [path]:
            if (folder / "vocab.json").is_file() or (folder / "tokenizer.json").is_file():
                return folder
        where = f"{path / subfolder} or {path}" if subfolder else str(path)
        raise checkpoint.CheckpointError(f"{where}: no tokenizer (expected vocab.json and merges.txt)")
    if str(path_or_repo_id).startswith((".", "/", "~")) or str(path_or_repo_id).count("/") != 1:
        raise checkpoint.CheckpointError(f"{path_or_repo_id}: no such folder (and not a hub id 'owner/name')")
    # checkpoint.resolve looks for a config.json, which a tokenizer folder lacks
    from huggingface_hub import snapshot_download  # only needed for hub ids

    prefix = f"{subfolder}/" if subfolder else ""
    names = ("vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json")
    try:
        root = Path(snapshot_download(str(path_or_repo_id), allow_patterns=[prefix + n for n in names]))
    except Exception as e:  # network, auth, unknown repo: all one line for the user
        raise checkpoint.CheckpointError(f"{path_or_repo_id}: could not download the tokenizer from the hub "
                                         f"({type(e).__name__})") from e
    return _tokenizer_folder(root, subfolder)


def _read_bpe(folder):
    """The vocabulary {token: id} and the merges [(a, b), ...] of a tokenizer folder."""
    if (folder / "vocab.json").is_file():  # the hub's layout (written by transformers 4)
        if not (folder / "merges.txt").is_file():
            raise checkpoint.CheckpointError(f"{folder / 'merges.txt'}: missing (expected beside vocab.json)")
        return BPE.read_file(str(folder / "vocab.json"), str(folder / "merges.txt"))
    model = read_json(folder / "tokenizer.json").get("model", {})  # transformers 5 writes only this file
    if model.get("type") != "BPE" or "vocab" not in model:
        raise checkpoint.CheckpointError(f"{folder / 'tokenizer.json'}: expected a BPE model with a vocab")
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
    return model["vocab"], merges


def _read_special_tokens(folder):
    """The four special tokens of a tokenizer folder, as transformers reads them: role -> AddedToken."""
    config = read_json(folder / "tokenizer_config.json", default={})
    if "added_tokens_decoder" not in config:  # older folders (the hub's SD ones): special_tokens_map.json wins
        config.update(read_json(folder / "special_tokens_map.json", default={}))
    # Folders written by newer transformers list every added token with its flags, which then hold:
    # tokenizer_config.json's added_tokens_decoder (>= 4.34), tokenizer.json's added_tokens (5).
    listed = list(config.get("added_tokens_decoder", {}).values())
    listed += read_json(folder / "tokenizer.json", default={}).get("added_tokens", [])
    flags = {t["content"]: t for t in listed}
    tokens = {}
    for role, default in SPECIAL_TOKENS.items():
        spec = config.get(role) or default  # a string, or the dict form {"content": ..., "normalized": ...}
        spec = flags.get(spec if isinstance(spec, str) else spec["content"], spec)
        spec = {"content": spec} if isinstance(spec, str) else spec
        # Special tokens are matched in the raw text, before lowercasing, unless the folder says
        # "normalized": true (older hub folders do, for <|startoftext|> and <|endoftext|>).
        tokens[role] = AddedToken(spec["content"], single_word=spec.get("single_word", False),
                                  lstrip=spec.get("lstrip", False), rstrip=spec.get("rstrip", False),
                                  normalized=spec.get("normalized", False), special=True)
    return tokens, int(config.get("model_max_length", CONTEXT_LENGTH))


class Tokenizer:
    """CLIP's BPE tokenizer on the `tokenizers` library: prompts -> ids (B, 77), as transformers' CLIPTokenizer."""

    def __init__(self, vocab, merges, special_tokens=None, max_length=CONTEXT_LENGTH):
        special_tokens = special_tokens or {role: AddedToken(t, special=True) for role, t in SPECIAL_TOKENS.items()}
        unk = special_tokens["unk_token"].content  # never used: every byte has a symbol
        bpe = BPETokenizer(BPE(vocab, merges, end_of_word_suffix="</w>", unk_token=unk))
        # transformers' CLIPTokenizer cleans text as OpenAI's does minus ftfy's repairs: NFC, one space
        # for any whitespace run, lowercase. Then CLIP's words, and ByteLevel maps each word's UTF-8
        # bytes to printable symbols. ByteLevel's own GPT-2 split finds no boundary inside a CLIP word
        # but one: a special token typed in another case ("<|EndOfText|>") is not kept whole, yet its
        # lowercase form is a CLIP word, which transformers then splits into "<|", "endoftext", "|>".
        bpe.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                               normalizers.Lowercase()])
        bpe.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(CLIP_WORDS), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
        # Special tokens typed in a prompt are kept whole. So is the pad token, a special token too:
        # with SD 2.1's pad "!", every "!" in a prompt becomes id 0, not the word-final "!</w>" (256).
        bpe.add_special_tokens(list(special_tokens.values()))
        ids = {role: bpe.token_to_id(t.content) for role, t in special_tokens.items()}
        self.bpe, self.max_length = bpe, max_length
        self.bos_id, self.eos_id, self.pad_id = ids["bos_token"], ids["eos_token"], ids["pad_token"]

    @classmethod
    def from_pretrained(cls, path_or_repo_id, subfolder="tokenizer"):
        """The tokenizer of a hub id or local folder: vocab.json, merges.txt and the special tokens."""
        folder = _tokenizer_folder(path_or_repo_id, subfolder)
        vocab, merges = _read_bpe(folder)
        special_tokens, max_length = _read_special_tokens(folder)
        return cls(vocab, merges, special_tokens, max_length)

    def __call__(self, prompts):
        """A prompt or list of prompts -> ids (B, 77): start, tokens cut to 75, end, pad."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompts must be strings, got {[type(p).__name__ for p in prompts]}")
        room = self.max_length - 2  # for the start and end tokens
        rows = []
        for encoding in self.bpe.encode_batch(prompts, add_special_tokens=False):
            ids = [self.bos_id] + encoding.ids[:room] + [self.eos_id]
            rows.append(ids + [self.pad_id] * (self.max_length - len(ids)))
        return torch.tensor(rows, dtype=torch.long).view(len(rows), self.max_length)  # (B, T)


# -----------------------------------------------------------------------------
# config


def quick_gelu(x):
    """OpenAI CLIP's sigmoid approximation of GELU (Hendrycks & Gimpel 2016, section 2)."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"gelu": F.gelu, "quick_gelu": quick_gelu}


@dataclass
class TextConfig:
    """A CLIP text tower; the fields are those of the hub's config.json (transformers' CLIPTextConfig)."""

    vocab_size: int = 49408  # 256 bytes, each also with "</w>", 48894 merges, 2 special tokens
    max_position_embeddings: int = CONTEXT_LENGTH
    hidden_size: int = 768  # D
    intermediate_size: int = 3072  # the MLP's hidden size, 4 D
    num_hidden_layers: int = 12
    num_attention_heads: int = 12  # nh; hs = D / nh = 64 in every preset
    hidden_act: str = "quick_gelu"  # OpenAI's CLIP: x sigmoid(1.702 x); OpenCLIP's: the exact (erf) GELU
    layer_norm_eps: float = 1e-5
    projection_dim: int = 768  # P: text_projection's output size, where the model has one
    with_projection: bool = False  # a text_projection of the pooled state (CLIPTextModelWithProjection)
    eos_token_id: int = 2  # where to pool, see TextEncoder.eos_positions; 2 in every official config

    @classmethod
    def from_hub(cls, config, source="config.json"):
        """The config of a hub text encoder's config.json; its other keys are ignored."""
        names = [f.name for f in fields(cls) if f.name != "with_projection"]
        missing = [n for n in names if n not in config]
        if missing:
            raise checkpoint.CheckpointError(f"{source}: missing {missing[0]} (expected a CLIPTextConfig's fields)")
        if config["hidden_act"] not in ACTIVATIONS:
            raise checkpoint.CheckpointError(f"{source}: hidden_act is {config['hidden_act']!r}, "
                                             f"expected one of {sorted(ACTIVATIONS)}")
        if config["hidden_size"] % config["num_attention_heads"]:
            raise checkpoint.CheckpointError(f"{source}: hidden_size {config['hidden_size']} is not a multiple "
                                             f"of num_attention_heads {config['num_attention_heads']}")
        # The architecture, not projection_dim (always present), says whether there is a projection.
        with_projection = "CLIPTextModelWithProjection" in config.get("architectures", [])
        return cls(**{n: config[n] for n in names}, with_projection=with_projection)


# The towers of SD 2.1, SDXL and SD3 / SD3.5, as their hub repos' config.json describe them.
PRESETS = {
    # OpenAI's CLIP ViT-L/14: SDXL's text_encoder (and SD 1.x's)
    "ViT-L/14": lambda: TextConfig(),
    # the same tower with its text projection: SD3's text_encoder, whose projected pooled state (768) is
    # half of the MMDiT's pooled text
    "ViT-L/14-proj": lambda: TextConfig(with_projection=True),
    # OpenCLIP's ViT-H/14 as SD 2.1 ships it: 23 of its 24 layers, since SD 2 conditions on the
    # penultimate layer (Stability-AI/stablediffusion, FrozenOpenCLIPEmbedder layer="penultimate")
    "ViT-H/14": lambda: TextConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                                   num_attention_heads=16, hidden_act="gelu", projection_dim=512),
    # OpenCLIP's ViT-bigG/14: SDXL's and SD3's text_encoder_2, whose projected pooled state is a UNet input
    "ViT-bigG/14": lambda: TextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                      num_attention_heads=20, hidden_act="gelu", projection_dim=1280,
                                      with_projection=True),
}

# -----------------------------------------------------------------------------
# blocks


class Embeddings(nn.Module):
    """Token embedding plus a learned embedding of each position."""

    def __init__(self, config):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)

    def forward(self, ids):
        positions = torch.arange(ids.shape[1], device=ids.device)  # (T,)
        return self.token_embedding(ids) + self.position_embedding(positions)  # (B, T, D)


class Attention(nn.Module):
    """Causal multi-head self-attention: each token sees itself and the tokens before it (CLIP, sec. 2.4)."""

    def __init__(self, config):
        super().__init__()
        d = config.hidden_size
        self.n_head = config.num_attention_heads
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x):
        B, T, D = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, D // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, self.n_head, D // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = self.v_proj(x).view(B, T, self.n_head, D // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, D))  # (B, T, D)


class MLP(nn.Module):
    """Two linear layers with CLIP's activation between them."""

    def __init__(self, config):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = ACTIVATIONS[config.hidden_act]

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))  # (B, T, D)


class EncoderLayer(nn.Module):
    """A pre-norm transformer block (GPT-2's, which CLIP's text transformer follows)."""

    def __init__(self, config):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = Attention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        x = x + self.mlp(self.layer_norm2(x))
        return x  # (B, T, D)


# -----------------------------------------------------------------------------
# model


class TextTransformer(nn.Module):
    """CLIP's text transformer: the checkpoints' `text_model`."""

    def __init__(self, config):
        super().__init__()
        self.embeddings = Embeddings(config)
        # A ModuleDict only to give the layers the checkpoints' key prefix, encoder.layers.N.
        self.encoder = nn.ModuleDict(dict(layers=nn.ModuleList(EncoderLayer(config)
                                                               for _ in range(config.num_hidden_layers))))
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, ids):
        """ids (B, T) -> last hidden states after the final norm, penultimate ones without it, (B, T, D) each."""
        x = self.embeddings(ids)  # (B, T, D)
        penultimate = x
        for layer in self.encoder.layers:
            penultimate = x  # the input of the last layer: transformers' hidden_states[-2]
            x = layer(x)
        return self.final_layer_norm(x), penultimate


class TextEncoder(nn.Module):
    """A CLIP text tower as the hub stores it: `text_model`, and for bigG a `text_projection`."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.text_model = TextTransformer(config)
        if config.with_projection:
            self.text_projection = nn.Linear(config.hidden_size, config.projection_dim, bias=False)

    def eos_positions(self, ids):
        """The position of each sequence's <|endoftext|> token, whose final state CLIP pools (sec. 2.4)."""
        # Configs written before transformers PR #24773 (all official ones) say eos_token_id 2, a
        # mistake; transformers keeps their old rule, the largest id, which is <|endoftext|> (49407,
        # the vocabulary's last) with either pad token. Otherwise: the first eos_token_id, since the
        # pad may be that token too. Both find the first <|endoftext|> of a sequence that has one.
        if self.config.eos_token_id == 2:
            return ids.argmax(dim=-1)  # (B,)
        return (ids == self.config.eos_token_id).int().argmax(dim=-1)  # (B,)

    def forward(self, ids):
        """ids (B, T) -> (last hidden states (B, T, D), penultimate (B, T, D), pooled (B, D) or projected (B, P))."""
        last, penultimate = self.text_model(ids)
        pooled = last[torch.arange(ids.shape[0], device=ids.device), self.eos_positions(ids)]  # (B, D)
        if self.config.with_projection:
            pooled = self.text_projection(pooled)  # (B, P)
        return last, penultimate, pooled

    @classmethod
    def from_pretrained(cls, path_or_repo_id, subfolder="text_encoder", dtype=None, device=None, variant=None):
        """A text tower from a hub id or local folder in the hub's layout (config.json + model.safetensors)."""
        folder = checkpoint.resolve(path_or_repo_id, subfolder, variant)
        config = TextConfig.from_hub(checkpoint.read_config(folder), source=folder / "config.json")
        with torch.device("meta"):
            model = cls(config)
        files = checkpoint.weight_files(folder, variant)
        tensors = official_keys(checkpoint.read_tensors(files, dtype=dtype))
        checkpoint.load_into(model, tensors, source=files[0])
        return model.to(device=device).eval()


def official_keys(tensors):
    """A text tower's tensors under the official keys (text_model.*, text_projection.weight)."""
    # Checkpoints written before transformers 4.31 (SD 2.1's among them) also hold the fixed buffer
    # text_model.embeddings.position_ids = arange(77); transformers ignores it on load, as we do.
    tensors = {k: v for k, v in tensors.items() if not k.endswith("embeddings.position_ids")}
    # transformers 5 saves a CLIPTextModel without the text_model. prefix that the hub's files have.
    if not any(k.startswith("text_model.") for k in tensors):
        tensors = {"text_model." + k: v for k, v in tensors.items()}
    return tensors
