"""The T5 v1.1 encoder and its tokenizer, as Stable Diffusion 3 and 3.5 use T5-XXL's.

Raffel et al., "Exploring the Limits of Transfer Learning with a Unified Text-to-Text Transformer"
(JMLR 2020), in its v1.1 form (google/t5-v1_1-xxl: gated-GELU feed-forward, no dropout at
inference, untied input and output embeddings). Two pieces, read in order:

    tok = T5Tokenizer.from_pretrained(root)          # tokenizer_3/tokenizer.json: prompts -> ids (B, 256)
    te = T5Encoder.from_pretrained(root)             # text_encoder_3/: ids -> last hidden states (B, 256, 4096)

What sets T5 apart from CLIP's text tower: no learned positions but a relative position bias
(a learned scalar per head and log-spaced distance bucket, computed in the first layer and added
to every layer's attention logits); no 1/sqrt(d) scaling of those logits (the initialization
absorbs it, Mesh TensorFlow); RMSNorm without bias or mean; pre-norm residuals. In fp16 the
feed-forward's output projection `wo` is kept in fp32, as transformers does (its
`_keep_in_fp32_modules`): T5's activations there overflow fp16.

Attribute names are the keys of the hub's transformers checkpoints (shared.weight,
encoder.block.0.layer.0.SelfAttention.q.weight, ...), so loading is strict and mechanical.

Letters in shape comments: B batch, L tokens, D d_model, F d_ff, nh heads, hs d_kv (head size).
"""

import math
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tokenizers import Tokenizer as _Tokenizer

import checkpoint

MAX_LENGTH = 256  # tokens SD3 gives T5: StableDiffusion3Pipeline's max_sequence_length default
EOS, PAD = "</s>", "<pad>"  # T5's end and padding tokens (ids 1 and 0 in its vocabulary)


# -----------------------------------------------------------------------------
# tokenizer


def _tokenizer_file(path_or_repo_id, subfolder):
    """tokenizer.json of a local folder (itself or its `subfolder`), or of a hub repo's subfolder, downloaded."""
    path = Path(path_or_repo_id).expanduser()
    if path.exists():
        for folder in ([path / subfolder] if subfolder else []) + [path]:
            if (folder / "tokenizer.json").is_file():
                return folder / "tokenizer.json"
        where = f"{path / subfolder} or {path}" if subfolder else str(path)
        raise checkpoint.CheckpointError(f"{where}: no tokenizer.json (T5's tokenizer, as the hub stores it)")
    if str(path_or_repo_id).startswith((".", "/", "~")) or str(path_or_repo_id).count("/") != 1:
        raise checkpoint.CheckpointError(f"{path_or_repo_id}: no such folder (and not a hub id 'owner/name')")
    from huggingface_hub import hf_hub_download  # only needed for hub ids

    try:
        return Path(hf_hub_download(str(path_or_repo_id), "tokenizer.json", subfolder=subfolder))
    except Exception as e:  # network, auth, unknown repo: all one line for the user
        raise checkpoint.CheckpointError(f"{path_or_repo_id}: could not download {subfolder}/tokenizer.json from the "
                                         f"hub ({type(e).__name__})") from e


class T5Tokenizer:
    """T5's SentencePiece (Unigram) tokenizer from its tokenizer.json: prompts -> ids (B, max_length).

    As transformers' T5TokenizerFast with padding="max_length", truncation=True: the tokens, cut to
    leave room for the end token, then </s>, then <pad> up to max_length.
    """

    def __init__(self, tokenizer, max_length=MAX_LENGTH, source="tokenizer.json"):
        self.tokenizer, self.max_length = tokenizer, max_length
        tokenizer.no_truncation()  # both done here, explicitly, whatever the file asks for
        tokenizer.no_padding()
        self.eos_id, self.pad_id = tokenizer.token_to_id(EOS), tokenizer.token_to_id(PAD)
        if self.eos_id is None or self.pad_id is None:
            raise checkpoint.CheckpointError(f"{source}: no {EOS} or {PAD} token (not T5's tokenizer)")

    @classmethod
    def from_pretrained(cls, path_or_repo_id, subfolder="tokenizer_3", max_length=MAX_LENGTH):
        """The tokenizer of a hub id or local folder: its tokenizer.json (SD3's tokenizer_3/)."""
        file = _tokenizer_file(path_or_repo_id, subfolder)
        try:
            tokenizer = _Tokenizer.from_file(str(file))
        except Exception as e:  # the tokenizers library's own parse errors
            raise checkpoint.CheckpointError(f"{file}: not a readable tokenizer ({str(e).splitlines()[0]})") from None
        return cls(tokenizer, max_length, source=file)

    def __call__(self, prompts):
        """A prompt or list of prompts -> ids (B, max_length): tokens cut to max_length - 1, </s>, pads."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompts must be strings, got {[type(p).__name__ for p in prompts]}")
        rows = []
        for encoding in self.tokenizer.encode_batch(prompts, add_special_tokens=False):
            ids = encoding.ids[:self.max_length - 1] + [self.eos_id]
            rows.append(ids + [self.pad_id] * (self.max_length - len(ids)))
        return torch.tensor(rows, dtype=torch.long).view(len(rows), self.max_length)  # (B, L)


# -----------------------------------------------------------------------------
# config


@dataclass
class T5Config:
    """A T5 v1.1 encoder; the fields are those of the hub's config.json (transformers' T5Config)."""

    vocab_size: int = 32128  # 32000 SentencePiece pieces, 100 sentinels, padded to a multiple of 128
    d_model: int = 4096  # D
    d_kv: int = 64  # hs; nh * hs need not be D (T5-XXL: 64 x 64 = 4096, but T5-small: 8 x 64 = 512)
    d_ff: int = 10240  # F: the feed-forward's hidden size
    num_layers: int = 24  # encoder blocks
    num_heads: int = 64  # nh
    relative_attention_num_buckets: int = 32  # distance buckets of the position bias
    relative_attention_max_distance: int = 128  # distances beyond it share the last bucket
    layer_norm_epsilon: float = 1e-6

    @classmethod
    def from_hub(cls, config, source="config.json"):
        """The config of a hub T5 encoder's config.json, refusing what is not T5 v1.1's architecture."""
        if config.get("model_type", "t5") != "t5":
            raise checkpoint.CheckpointError(f"{source}: model_type is {config['model_type']!r}, expected 't5'")
        missing = [f.name for f in fields(cls) if f.name not in config]
        if missing:
            raise checkpoint.CheckpointError(f"{source}: missing {missing[0]} (expected a T5Config's fields)")
        # T5 v1.1 (and SD3's text_encoder_3): GELU-gated feed-forward, tanh-approximated GELU
        for key, value in (("feed_forward_proj", "gated-gelu"), ("dense_act_fn", "gelu_new")):
            if config.get(key, value) != value:
                raise checkpoint.CheckpointError(f"{source}: {key} is {config[key]!r}; this encoder is T5 v1.1's "
                                                 f"({key} {value!r})")
        return cls(**{f.name: config[f.name] for f in fields(cls)})


# The encoder of SD3's text_encoder_3 (google/t5-v1_1-xxl's), as its config.json describes it.
PRESETS = {"t5-v1_1-xxl": lambda: T5Config()}


# -----------------------------------------------------------------------------
# blocks


def relative_position_bucket(relative_position, num_buckets, max_distance):
    """Bucket of each (key - query) distance, either direction (Raffel et al. 2020, sec. 2.1; Mesh TensorFlow).

    Half the buckets for each direction; of those, half for the exact distances 0 ... n/2 - 1, the
    rest logarithmically spaced up to max_distance, beyond which all share the last.
    """
    n = num_buckets // 2
    buckets = (relative_position > 0).long() * n  # keys after the query: the upper half
    distance = relative_position.abs()
    exact = n // 2
    # (clamped below at `exact` only to keep log() finite where the exact bucket is taken anyway)
    far = exact + (torch.log(distance.clamp(min=exact).float() / exact) / math.log(max_distance / exact)
                   * (n - exact)).long()
    return buckets + torch.where(distance < exact, distance, far.clamp(max=n - 1))


class RMSNorm(nn.Module):
    """T5's layer norm: scale only, by the root mean square (no mean, no bias); its statistics in fp32."""

    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        x = x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)  # fp32 for half inputs
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return self.weight * x


def gelu_new(x):
    """GELU's tanh approximation (Hendrycks & Gimpel 2016), written out as transformers' "gelu_new": in half
    precision each operation rounds, as there (F.gelu(approximate="tanh") rounds once)."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def clamp_fp16(x):
    """In fp16, infinities become the largest finite value less 1000, as transformers' T5Block does after each layer."""
    if x.dtype != torch.float16:
        return x
    limit = torch.finfo(torch.float16).max
    limit = torch.where(torch.isinf(x).any(), limit - 1000, limit)
    return x.clamp(-limit, limit)


class Attention(nn.Module):
    """Multi-head self-attention, unscaled, plus the relative position bias (computed by the first layer's)."""

    def __init__(self, config, has_relative_attention_bias=False):
        super().__init__()
        inner, self.nh, self.config = config.num_heads * config.d_kv, config.num_heads, config
        self.q = nn.Linear(config.d_model, inner, bias=False)
        self.k = nn.Linear(config.d_model, inner, bias=False)
        self.v = nn.Linear(config.d_model, inner, bias=False)
        self.o = nn.Linear(inner, config.d_model, bias=False)
        if has_relative_attention_bias:
            self.relative_attention_bias = nn.Embedding(config.relative_attention_num_buckets, config.num_heads)

    def position_bias(self, length, device):
        """The learned bias (1, nh, L, L) of every query-key distance; shared by all layers."""
        positions = torch.arange(length, device=device)
        relative = positions[None, :] - positions[:, None]  # (L, L): key position - query position
        buckets = relative_position_bucket(relative, self.config.relative_attention_num_buckets,
                                           self.config.relative_attention_max_distance)
        return self.relative_attention_bias(buckets).permute(2, 0, 1)[None]  # (L, L, nh) -> (1, nh, L, L)

    def forward(self, x, bias):
        B, L, _ = x.shape
        q, k, v = (p(x).view(B, L, self.nh, -1).transpose(1, 2) for p in (self.q, self.k, self.v))  # (B, nh, L, hs)
        # no 1/sqrt(hs): T5's initialization of q absorbs it (Mesh TensorFlow); no mask: SD3 attends to the pads too
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=1.0)  # (B, nh, L, hs)
        return self.o(y.transpose(1, 2).reshape(B, L, -1))  # (B, L, D)


class LayerSelfAttention(nn.Module):
    """Pre-norm self-attention with its residual (the checkpoints' block.N.layer.0)."""

    def __init__(self, config, has_relative_attention_bias=False):
        super().__init__()
        self.SelfAttention = Attention(config, has_relative_attention_bias)
        self.layer_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)

    def forward(self, x, bias):
        return x + self.SelfAttention(self.layer_norm(x), bias)


class DenseGatedActDense(nn.Module):
    """The gated-GELU feed-forward of T5 v1.1 (Shazeer 2020, "GLU Variants Improve Transformer")."""

    def __init__(self, config):
        super().__init__()
        self.wi_0 = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wi_1 = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)

    def forward(self, x):
        h = gelu_new(self.wi_0(x)) * self.wi_1(x)  # (B, L, F)
        # wo may be fp32 beside fp16 weights (see the module docstring); its output then stays fp32,
        # and so, through the residual, does the stream
        return self.wo(h.to(self.wo.weight.dtype))  # (B, L, D)


class LayerFF(nn.Module):
    """Pre-norm feed-forward with its residual (the checkpoints' block.N.layer.1)."""

    def __init__(self, config):
        super().__init__()
        self.DenseReluDense = DenseGatedActDense(config)  # the key's name, from T5 v1.0's ReLU
        self.layer_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)

    def forward(self, x):
        return x + self.DenseReluDense(self.layer_norm(x))


class Block(nn.Module):
    """Self-attention then feed-forward, `layer.0` and `layer.1` as the checkpoints name them."""

    def __init__(self, config, has_relative_attention_bias=False):
        super().__init__()
        self.layer = nn.ModuleList([LayerSelfAttention(config, has_relative_attention_bias), LayerFF(config)])

    def forward(self, x, bias):
        x = clamp_fp16(self.layer[0](x, bias))
        return clamp_fp16(self.layer[1](x))  # (B, L, D)


# -----------------------------------------------------------------------------
# model


class Stack(nn.Module):
    """The encoder's blocks and final norm: the checkpoints' `encoder`."""

    def __init__(self, config):
        super().__init__()
        self.block = nn.ModuleList([Block(config, has_relative_attention_bias=i == 0)
                                    for i in range(config.num_layers)])
        self.final_layer_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)


class T5Encoder(nn.Module):
    """T5's encoder as transformers' T5EncoderModel stores it: `shared` (the token embedding) and `encoder`."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = Stack(config)

    @property
    def dtype(self):
        return self.shared.weight.dtype

    def forward(self, ids):
        """ids (B, L) -> last hidden states (B, L, D), after the final norm (transformers' last_hidden_state)."""
        x = self.shared(ids)  # (B, L, D)
        bias = self.encoder.block[0].layer[0].SelfAttention.position_bias(ids.shape[1], ids.device)  # (1, nh, L, L)
        for block in self.encoder.block:
            x = block(x, bias)
        return self.encoder.final_layer_norm(x)

    @classmethod
    def from_pretrained(cls, path_or_repo_id, subfolder="text_encoder_3", dtype=None, device=None, variant=None):
        """The encoder of a hub id or local folder (config.json + model.safetensors, or its shards), loaded strictly.

        Built on the meta device, it takes the file's tensors cast one by one: T5-XXL in bf16 never
        holds an fp32 copy. In fp16, `wo` is read as fp32 (see the module docstring).
        """
        folder = checkpoint.resolve(path_or_repo_id, subfolder, variant)
        config = T5Config.from_hub(checkpoint.read_config(folder), source=folder / "config.json")
        with torch.device("meta"):
            model = cls(config)
        files = checkpoint.weight_files(folder, variant)
        keep = (lambda key: key.endswith(".DenseReluDense.wo.weight")) if dtype == torch.float16 else None
        tensors = checkpoint.read_tensors(files, dtype=dtype, device=device, keep_fp32=keep)
        checkpoint.load_into(model, official_keys(tensors, source=files[0]), source=files[0])
        return model.eval()


def official_keys(tensors, source="state dict"):
    """An encoder's tensors under the keys it has: the token embedding once, as `shared.weight`.

    transformers ties encoder.embed_tokens.weight to shared.weight; files saved with both (or, by
    some converters, with the first alone) hold one table twice, which we read once.
    """
    tensors = dict(tensors)
    tied = tensors.pop("encoder.embed_tokens.weight", None)
    if tied is not None:
        shared = tensors.setdefault("shared.weight", tied)
        differs = shared.shape != tied.shape or (not shared.is_meta and not torch.equal(shared, tied))
        if shared is not tied and differs:
            raise checkpoint.CheckpointError(f"{source}: encoder.embed_tokens.weight differs from shared.weight "
                                             "(T5 ties them: one table)")
    return tensors
