"""Prompt encoding for Stable Diffusion 2.1, SDXL and SD3 / SD3.5, as the diffusers pipelines do it.

    pe = PromptEncoder.from_pretrained(root)         # the repo's tokenizers and text towers
    cond = pe(prompts, height=1024, width=1024)      # -> dict(context=...[, text_embeds=..., time_ids=...])
    null = pe.null(len(prompts), height=1024, width=1024)   # the condition CFG subtracts
    out = unet(x, t, **cond)

    pe = SD3PromptEncoder.from_pretrained(root, t5=True)   # CLIP-L, CLIP-G and T5-XXL
    cond = pe(prompts)                               # -> dict(context=..., pooled=...)
    out = mmdit(x, t, **cond)

Every output equals what StableDiffusionPipeline / StableDiffusionXLPipeline feed their UNet, and
StableDiffusion3Pipeline its transformer.

Letters in shape comments: B batch, T tokens (77), D hidden size, P projection size; for SD3, S T5's
tokens (256) and E T5's width (4096).
"""

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import checkpoint
from t5 import MAX_LENGTH, T5Encoder, T5Tokenizer
from text_encoders import TextEncoder, Tokenizer, read_json


def read_prompts(file):
    """One prompt a line; blank lines and lines starting with # are skipped."""
    lines = [line.strip() for line in Path(file).read_text(encoding="utf-8").splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


# -----------------------------------------------------------------------------
# prompt encoding, as the diffusers pipelines do it


def _repo_json(path_or_repo_id, name="model_index.json"):
    """A JSON file of a pipeline repo (local folder or hub id): its model_index.json, which lists its components."""
    path = Path(path_or_repo_id).expanduser()
    if path.exists():
        return read_json(path / name)
    if str(path_or_repo_id).startswith((".", "/", "~")) or str(path_or_repo_id).count("/") != 1:
        raise checkpoint.CheckpointError(f"{path_or_repo_id}: no such folder (and not a hub id 'owner/name')")
    from huggingface_hub import hf_hub_download  # only needed for hub ids

    try:
        return read_json(Path(hf_hub_download(str(path_or_repo_id), name)))
    except Exception as e:  # network, auth, unknown repo: all one line for the user
        raise checkpoint.CheckpointError(f"{path_or_repo_id}: could not download {name} from the hub "
                                         f"({type(e).__name__})") from e



class PromptEncoder(nn.Module):
    """Prompts -> the UNet's `cond` dict, equal to the diffusers SD 2.1 / SDXL pipelines' encode_prompt."""

    def __init__(self, tokenizer, text_encoder, tokenizer_2=None, text_encoder_2=None,
                 force_zeros_for_empty_prompt=False):
        super().__init__()
        self.tokenizer, self.text_encoder = tokenizer, text_encoder
        self.tokenizer_2, self.text_encoder_2 = tokenizer_2, text_encoder_2  # SDXL only
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt  # SDXL's null condition is zeros

    @property
    def is_xl(self):
        """SDXL (two towers, pooled text and size conditioning) rather than SD 2.1."""
        return self.text_encoder_2 is not None

    @classmethod
    def from_pretrained(cls, path_or_repo_id, dtype=None, device=None, variant=None):
        """SD 2.1's tokenizer and text encoder, or SDXL's two of each, as the repo's model_index.json lists them."""
        index = _repo_json(path_or_repo_id)
        listed = [name for name in ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2")
                  if isinstance(index.get(name), list) and index[name][0] is not None]
        if listed[:2] != ["tokenizer", "text_encoder"]:
            raise checkpoint.CheckpointError(f"{path_or_repo_id}: model_index.json lists no tokenizer and "
                                             f"text_encoder (expected SD 2.1 or SDXL base)")

        def encoder(subfolder):  # frozen: AGD never trains the text encoders
            model = TextEncoder.from_pretrained(path_or_repo_id, subfolder, dtype, device, variant)
            return model.requires_grad_(False)

        parts = dict(tokenizer=Tokenizer.from_pretrained(path_or_repo_id, "tokenizer"),
                     text_encoder=encoder("text_encoder"))
        if "text_encoder_2" in listed:
            parts.update(tokenizer_2=Tokenizer.from_pretrained(path_or_repo_id, "tokenizer_2"),
                         text_encoder_2=encoder("text_encoder_2"),
                         force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", True)))
        return cls(**parts)

    def _time_ids(self, n, height, width, dtype, device):
        """SDXL's size conditioning (Podell et al. 2023, sec. 2.2) with the pipeline's defaults: (n, 6)."""
        if height is None or width is None:
            raise ValueError("SDXL conditions on the image size: pass height= and width= in pixels (e.g. 1024)")
        # (original height, width, crop top, left, target height, width): original = target, no crop
        return torch.tensor([[height, width, 0, 0, height, width]], dtype=dtype, device=device).repeat(n, 1)

    @torch.no_grad()
    def forward(self, prompts, height=None, width=None):
        """Prompts -> dict(context (B, T, D)) for SD 2.1; SDXL adds text_embeds (B, P) and time_ids (B, 6)."""
        device = next(self.text_encoder.parameters()).device
        if not self.is_xl:
            # SD 2.1 takes the last hidden states, final norm included: its 23 layers end where
            # OpenCLIP's penultimate layer does.
            last, _, _ = self.text_encoder(self.tokenizer(prompts).to(device))
            return dict(context=last)  # (B, T, D)
        # SDXL (Podell et al. 2023, sec. 2.1): both towers' penultimate hidden states side by side,
        # and the second's pooled state, projected.
        _, hidden, _ = self.text_encoder(self.tokenizer(prompts).to(device))  # (B, T, 768)
        _, hidden_2, pooled = self.text_encoder_2(self.tokenizer_2(prompts).to(device))  # (B, T, 1280), (B, P)
        context = torch.cat([hidden, hidden_2], dim=-1).to(pooled.dtype)  # (B, T, 2048), text_encoder_2's dtype
        time_ids = self._time_ids(len(pooled), height, width, pooled.dtype, device)  # (B, 6)
        return dict(context=context, text_embeds=pooled, time_ids=time_ids)

    @torch.no_grad()
    def null(self, n, height=None, width=None, negative_prompt=None):
        """The condition CFG subtracts, for n samples: the negative prompt, else "" (SD 2.1) or zeros (SDXL)."""
        if negative_prompt is None and self.is_xl and self.force_zeros_for_empty_prompt:
            # SDXL base zeroes the null condition instead of encoding "" (model_index.json's
            # force_zeros_for_empty_prompt); its size conditioning stays.
            projection = self.text_encoder_2.text_projection.weight  # (P, 1280)
            d = self.text_encoder.config.hidden_size + self.text_encoder_2.config.hidden_size  # 768 + 1280
            return dict(context=projection.new_zeros(n, self.tokenizer.max_length, d),
                        text_embeds=projection.new_zeros(n, projection.shape[0]),
                        time_ids=self._time_ids(n, height, width, projection.dtype, projection.device))
        negative_prompt = "" if negative_prompt is None else negative_prompt  # SD 2.1: the empty prompt
        if isinstance(negative_prompt, str):  # one prompt for all n: encode it once
            return {k: v.repeat_interleave(n, dim=0) for k, v in self(negative_prompt, height, width).items()}
        if len(negative_prompt) != n:
            raise ValueError(f"negative_prompt has {len(negative_prompt)} prompts, expected {n} (or one string)")
        return self(list(negative_prompt), height, width)


class SD3PromptEncoder(nn.Module):
    """Prompts -> the MMDiT's `cond` dict, equal to StableDiffusion3Pipeline.encode_prompt.

    The text tokens are CLIP-L's and CLIP-G's penultimate states side by side (77 x 2048),
    zero-padded to T5's width, then T5-XXL's last states (256 x 4096, padded, attended without a
    mask); the pooled text is both CLIPs' projected pooled states (768 + 1280). Without T5 (`t5=False`,
    for small GPUs), zeros take its rows: SD3 was trained with each text encoder dropped out at random
    (Esser et al. 2024), so that T5 can be left out at inference, at some cost to rendered text.
    """

    def __init__(self, tokenizer, text_encoder, tokenizer_2, text_encoder_2, tokenizer_3=None, text_encoder_3=None,
                 joint_attention_dim=4096, max_sequence_length=MAX_LENGTH):
        super().__init__()
        self.tokenizer, self.text_encoder = tokenizer, text_encoder  # CLIP-L (OpenAI's ViT-L/14)
        self.tokenizer_2, self.text_encoder_2 = tokenizer_2, text_encoder_2  # OpenCLIP's ViT-bigG/14
        self.tokenizer_3, self.text_encoder_3 = tokenizer_3, text_encoder_3  # T5-XXL, or None
        self.joint_attention_dim = joint_attention_dim  # E: the transformer's text width, T5's
        self.max_sequence_length = max_sequence_length  # S

    @classmethod
    def from_pretrained(cls, path_or_repo_id, dtype=None, device=None, t5=True, variant=None,
                        max_sequence_length=None):
        """The two CLIP towers (and with t5=True T5-XXL) of an SD3 / SD3.5 repo, with their tokenizers."""
        index = _repo_json(path_or_repo_id)
        if not all(isinstance(index.get(n), list) and index[n][0] is not None
                   for n in ("text_encoder", "text_encoder_2", "text_encoder_3")):
            raise checkpoint.CheckpointError(f"{path_or_repo_id}: model_index.json lists no text_encoder, "
                                             "text_encoder_2 and text_encoder_3 (expected SD3 or SD3.5)")
        # the text width is the transformer's (T5's, also without T5); read from its config alone
        joint_attention_dim = _repo_json(path_or_repo_id, "transformer/config.json").get("joint_attention_dim", 4096)

        def encoder(subfolder):  # frozen: AGD never trains the text encoders
            model = TextEncoder.from_pretrained(path_or_repo_id, subfolder, dtype, device, variant)
            if not model.config.with_projection:  # SD3 pools both towers' projected states
                raise checkpoint.CheckpointError(f"{path_or_repo_id}: {subfolder} is not a CLIPTextModelWithProjection "
                                                 "(its config.json's architectures), as SD3's text encoders are")
            return model.requires_grad_(False)

        parts = dict(tokenizer=Tokenizer.from_pretrained(path_or_repo_id, "tokenizer"),
                     text_encoder=encoder("text_encoder"),
                     tokenizer_2=Tokenizer.from_pretrained(path_or_repo_id, "tokenizer_2"),
                     text_encoder_2=encoder("text_encoder_2"), joint_attention_dim=joint_attention_dim,
                     max_sequence_length=max_sequence_length or MAX_LENGTH)
        if t5:
            text_encoder_3 = T5Encoder.from_pretrained(path_or_repo_id, "text_encoder_3", dtype, device, variant)
            if text_encoder_3.config.d_model != joint_attention_dim:
                raise checkpoint.CheckpointError(f"{path_or_repo_id}: text_encoder_3 is {text_encoder_3.config.d_model}"
                                                 f" wide, the transformer's joint_attention_dim {joint_attention_dim}")
            parts.update(tokenizer_3=T5Tokenizer.from_pretrained(path_or_repo_id, "tokenizer_3",
                                                                 parts["max_sequence_length"]),
                         text_encoder_3=text_encoder_3.requires_grad_(False))
        return cls(**parts)

    @torch.no_grad()
    def forward(self, prompts):
        """Prompts -> dict(context (B, 77 + S, E), pooled (B, 768 + 1280))."""
        weight = self.text_encoder.text_projection.weight
        device, dtype = weight.device, weight.dtype
        _, hidden, pooled = self.text_encoder(self.tokenizer(prompts).to(device))  # (B, T, 768), (B, 768)
        _, hidden_2, pooled_2 = self.text_encoder_2(self.tokenizer_2(prompts).to(device))  # (B, T, 1280), (B, 1280)
        clip = torch.cat([hidden.to(dtype), hidden_2.to(dtype)], dim=-1)  # (B, T, 2048), in CLIP-L's dtype as there
        if self.text_encoder_3 is not None:
            ids = self.tokenizer_3(prompts).to(device)  # (B, S)
            tokens = self.text_encoder_3(ids).to(self.text_encoder_3.dtype)  # (B, S, E)
        else:  # the pipeline's text_encoder_3=None: zeros in T5's place
            tokens = clip.new_zeros(len(clip), self.max_sequence_length, self.joint_attention_dim)  # (B, S, E)
        clip = F.pad(clip, (0, tokens.shape[-1] - clip.shape[-1]))  # (B, T, E): zeros after CLIP's 2048
        return dict(context=torch.cat([clip, tokens], dim=-2),  # (B, T + S, E)
                    pooled=torch.cat([pooled, pooled_2], dim=-1))  # (B, 2048)

    @torch.no_grad()
    def null(self, n, negative_prompt=None):
        """The condition CFG subtracts, for n samples: the negative prompt, else "" through all three encoders."""
        negative_prompt = "" if negative_prompt is None else negative_prompt  # SD3's null: the empty prompt
        if isinstance(negative_prompt, str):  # one prompt for all n: encode it once
            return {k: v.repeat_interleave(n, dim=0) for k, v in self(negative_prompt).items()}
        if len(negative_prompt) != n:
            raise ValueError(f"negative_prompt has {len(negative_prompt)} prompts, expected {n} (or one string)")
        return self(list(negative_prompt))
