"""Tiny random SD 1.5, SD 2.1, SDXL and SD3 pipelines and IP-Adapters, saved to disk in the official hub
layout (test helper).

Each builds the diffusers pipeline from tiny components with the official architectures' features
(SD 1.5: 1x1-conv projections, one head count, OpenAI's CLIP; SD 2.1: linear projections, per-block
head counts, upcast attention, v-prediction; SDXL: two text towers, the pooled text and size
embedding, several transformer layers per block), the real CLIP
tokenizers from assets/clip, and a scheduler, then writes it as the hub repos store it:

    root = make_sd15(tmp_path)   # model_index.json, tokenizer/, text_encoder/, unet/, vae/, scheduler/
    root = make_sd21(tmp_path)   # the same, tokenizer/, text_encoder/, unet/, vae/, scheduler/
    root = make_sdxl(tmp_path)   # ... plus tokenizer_2/, text_encoder_2/
    root = make_sd3(tmp_path)    # transformer/, vae/, scheduler/, text_encoder{,_2,_3}/, tokenizer{,_2,_3}/
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(root)   # the reference, on the same files
    file = make_ip_adapter(folder, "sdxl_models", "ip-adapter_sdxl.safetensors", pipe.unet)  # h94's layout

Two things differ from what diffusers + transformers 5 write, so they are put back the hub's way:
tokenizer folders hold vocab.json + merges.txt + special-token files (transformers 5 writes only
tokenizer.json), and a CLIPTextModel's keys carry the text_model. prefix (transformers 5 drops it).
"""

import json
import shutil
import string
from pathlib import Path

import torch
from diffusers import (AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler,
                       SD3Transformer2DModel, StableDiffusion3Pipeline, StableDiffusionPipeline,
                       StableDiffusionXLPipeline, UNet2DConditionModel)
from safetensors.torch import load_file, save_file
from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer,
                          CLIPVisionConfig, CLIPVisionModelWithProjection)

CLIP_ASSETS = Path(__file__).resolve().parent.parent / "assets" / "clip"
PAD_BANG = CLIP_ASSETS / "tokenizer_pad_bang"  # SD 2.1's tokenizer and SDXL's tokenizer_2: pad "!"
PAD_EOT = CLIP_ASSETS / "tokenizer_pad_eot"  # SDXL's tokenizer: pad <|endoftext|>

# scheduler/scheduler_config.json of stabilityai/stable-diffusion-2-1 and stable-diffusion-xl-base-1.0,
# verbatim: the tiny pipelines sample as the hub's do
SD21_SCHEDULER = {"_class_name": "DDIMScheduler", "_diffusers_version": "0.8.0", "beta_end": 0.012,
                  "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
                  "num_train_timesteps": 1000, "prediction_type": "v_prediction", "set_alpha_to_one": False,
                  "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None}
SDXL_SCHEDULER = {"_class_name": "EulerDiscreteScheduler", "_diffusers_version": "0.19.0.dev0", "beta_end": 0.012,
                  "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
                  "interpolation_type": "linear", "num_train_timesteps": 1000, "prediction_type": "epsilon",
                  "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
                  "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False}
# ... and of stable-diffusion-3-medium-diffusers and stable-diffusion-3.5-large (which spells out
# diffusers' defaults of its day; 3.5-medium's is the same but for its _diffusers_version)
SD3_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.29.0.dev0",
                 "num_train_timesteps": 1000, "shift": 3.0}
SD35_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.31.0.dev0",
                  "base_image_seq_len": 256, "base_shift": 0.5, "invert_sigmas": False, "max_image_seq_len": 4096,
                  "max_shift": 1.15, "num_train_timesteps": 1000, "shift": 3.0, "shift_terminal": None,
                  "use_beta_sigmas": False, "use_dynamic_shifting": False, "use_exponential_sigmas": False,
                  "use_karras_sigmas": False}


def tiny_text_config(hidden_size, hidden_act, projection_dim, num_hidden_layers=3, eos_token_id=2):
    """A CLIPTextConfig with the real vocabulary and context, small everywhere else."""
    # eos_token_id 2 and bos/pad 0/1 are what the official SD 2.1 and SDXL configs say.
    return CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, hidden_size=hidden_size,
                          intermediate_size=2 * hidden_size, num_hidden_layers=num_hidden_layers,
                          num_attention_heads=4, hidden_act=hidden_act, projection_dim=projection_dim,
                          layer_norm_eps=1e-5, bos_token_id=0, eos_token_id=eos_token_id, pad_token_id=1)


def _tiny_vae(scaling_factor, force_upcast):
    """An AutoencoderKL with two levels (8x fewer channels, 2x instead of 8x downsampling)."""
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         layers_per_block=2, norm_num_groups=32, sample_size=16,
                         scaling_factor=scaling_factor, force_upcast=force_upcast)


def _hub_layout(root, tokenizers, clip_text_models, scheduler=None):
    """Rewrite what save_pretrained wrote into the hub's layout (see the module docstring); `scheduler`: the
    hub repo's scheduler config, verbatim, in place of the one diffusers wrote."""
    if scheduler is not None:
        (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2))
    for name, source in tokenizers.items():
        shutil.rmtree(root / name)
        shutil.copytree(source, root / name, copy_function=shutil.copyfile)  # assets are read-only
    for name in clip_text_models:
        file = root / name / "model.safetensors"
        tensors = load_file(file)
        if not any(k.startswith("text_model.") for k in tensors):
            tensors = {"text_model." + k: v for k, v in tensors.items()}
        save_file(tensors, file, metadata={"format": "pt"})


def make_sd15(tmp_path):
    """A tiny random SD 1.5 pipeline saved under tmp_path; returns its root folder."""
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(tiny_text_config(32, "quick_gelu", projection_dim=16))  # OpenAI ViT-L/14
    unet = UNet2DConditionModel(  # attention_head_dim: one head count for every level, as SD 1.5's 8
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=4, cross_attention_dim=32, use_linear_projection=False, norm_num_groups=32)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")
    pipe = StableDiffusionPipeline(vae=_tiny_vae(0.18215, force_upcast=False), text_encoder=text_encoder,
                                   tokenizer=CLIPTokenizer.from_pretrained(PAD_EOT), unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    root = Path(tmp_path) / "sd15"
    pipe.save_pretrained(root)
    # SD 2.1's DDIM config predicting epsilon (SD 1.5's hub config is PNDM's, which guidance.py does not follow)
    _hub_layout(root, {"tokenizer": PAD_EOT}, ["text_encoder"], {**SD21_SCHEDULER, "prediction_type": "epsilon"})
    return root


def make_sd21(tmp_path, prediction_type="v_prediction"):
    """A tiny random SD 2.1 (768-v) pipeline saved under tmp_path; returns its root folder."""
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(tiny_text_config(32, "gelu", projection_dim=16))  # OpenCLIP: exact GELU
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(2, 4), cross_attention_dim=32, use_linear_projection=True, upcast_attention=True,
        norm_num_groups=32)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)
    pipe = StableDiffusionPipeline(vae=_tiny_vae(0.18215, force_upcast=True), text_encoder=text_encoder,
                                   tokenizer=CLIPTokenizer.from_pretrained(PAD_BANG), unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    root = Path(tmp_path) / "sd21"
    pipe.save_pretrained(root)
    _hub_layout(root, {"tokenizer": PAD_BANG}, ["text_encoder"],
                {**SD21_SCHEDULER, "prediction_type": prediction_type})
    return root


def make_sdxl(tmp_path, force_zeros_for_empty_prompt=True):
    """A tiny random SDXL base pipeline saved under tmp_path; returns its root folder."""
    torch.manual_seed(0)
    # Different widths for the two towers (32 and 48, projection 40) so that a mix-up cannot pass.
    text_encoder = CLIPTextModel(tiny_text_config(32, "quick_gelu", projection_dim=32))  # OpenAI ViT-L/14
    text_encoder_2 = CLIPTextModelWithProjection(tiny_text_config(48, "gelu", projection_dim=40))  # OpenCLIP bigG
    time_dim = 8
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2), cross_attention_dim=32 + 48,
        use_linear_projection=True, norm_num_groups=32,
        addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + 40)  # six size numbers + the pooled text
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading", prediction_type="epsilon",
                                       interpolation_type="linear", use_karras_sigmas=False)
    pipe = StableDiffusionXLPipeline(
        vae=_tiny_vae(0.13025, force_upcast=True), text_encoder=text_encoder, text_encoder_2=text_encoder_2,
        tokenizer=CLIPTokenizer.from_pretrained(PAD_EOT), tokenizer_2=CLIPTokenizer.from_pretrained(PAD_BANG),
        unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
        add_watermarker=False)
    root = Path(tmp_path) / "sdxl"
    pipe.save_pretrained(root)
    _hub_layout(root, {"tokenizer": PAD_EOT, "tokenizer_2": PAD_BANG}, ["text_encoder"], SDXL_SCHEDULER)
    return root


# -----------------------------------------------------------------------------
# T5's tokenizer, small
#
# The hub's tokenizer_3/ holds a tokenizer.json (a Unigram model over SentencePiece pieces, with
# T5's pre-tokenizer and "$A </s>" post-processor), tokenizer_config.json and special_tokens_map.json.
# transformers builds the same structure around any vocabulary: a few hundred pieces here.

T5_WORDS = ("a photo of an astronaut riding horse on the moon red cat dog painting blue sky with "
            "in style oil portrait").split()


def make_t5_tokenizer(folder):
    """A T5 tokenizer folder in the hub's layout; its vocabulary: T5's specials, some words, single characters."""
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]  # ids 0, 1, 2 as in T5's
    pieces += [("\u2581" + w, -3.0 - 0.1 * i) for i, w in enumerate(T5_WORDS)]
    pieces += [(c, -6.0) for c in string.ascii_letters + string.digits + string.punctuation]
    pieces += [("\u2581" + c, -6.5) for c in string.ascii_letters + string.digits]
    unique = {}  # each piece once, where it first comes ("\u2581a" is a word and a letter)
    for piece, score in pieces:
        unique.setdefault(piece, score)
    pieces = list(unique.items())
    folder = Path(folder)
    T5TokenizerFast(vocab=pieces, extra_ids=100).save_pretrained(folder)
    # the hub's side files (written by transformers 4), in place of transformers 5's own
    extra = [f"<extra_id_{i}>" for i in range(100)]
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"additional_special_tokens": extra, "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"},
        indent=2))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"additional_special_tokens": extra, "clean_up_tokenization_spaces": True, "eos_token": "</s>",
         "extra_ids": 100, "legacy": True, "model_max_length": 512, "pad_token": "<pad>", "sp_model_kwargs": {},
         "tokenizer_class": "T5Tokenizer", "unk_token": "<unk>"}, indent=2))
    return folder


# -----------------------------------------------------------------------------
# SD3 and SD3.5


def _perturb(*modules, scale=0.1):
    """Move every weight off its initialization (norms' ones and zeros, biases), so that each matters."""
    with torch.no_grad():
        for module in modules:
            for p in module.parameters():
                p.add_(scale * torch.randn_like(p))


def make_sd3(tmp_path, sd35=False):
    """A tiny random SD3 pipeline (sd35: SD3.5-like, q / k RMSNorm and a dual-attention block) saved under tmp_path.

    The widths keep SD3's relations: the CLIP-L and CLIP-G states side by side (32 + 48) are narrower
    than T5's (96), so they are zero-padded to it; the pooled text is both towers' projections (80).
    """
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    torch.manual_seed(0)
    text_encoder = CLIPTextModelWithProjection(tiny_text_config(32, "quick_gelu", projection_dim=32))  # CLIP-L
    text_encoder_2 = CLIPTextModelWithProjection(tiny_text_config(48, "gelu", projection_dim=48))  # OpenCLIP bigG
    t5_folder = make_t5_tokenizer(Path(tmp_path) / "t5_tokenizer")
    text_encoder_3 = T5EncoderModel(T5Config(vocab_size=320, d_model=96, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                             feed_forward_proj="gated-gelu", is_encoder_decoder=False))
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=16, num_layers=3, attention_head_dim=8, num_attention_heads=4,
        joint_attention_dim=96, caption_projection_dim=32, pooled_projection_dim=32 + 48, out_channels=16,
        pos_embed_max_size=12, **(dict(dual_attention_layers=(0,), qk_norm="rms_norm") if sd35 else {}))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(32, 64),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=2, norm_num_groups=32, sample_size=16, scaling_factor=1.5305,
                        shift_factor=0.0609, force_upcast=True, use_quant_conv=False, use_post_quant_conv=False)
    _perturb(text_encoder, text_encoder_2, text_encoder_3, transformer, vae)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=text_encoder, tokenizer=CLIPTokenizer.from_pretrained(PAD_EOT),
        text_encoder_2=text_encoder_2, tokenizer_2=CLIPTokenizer.from_pretrained(PAD_BANG),
        text_encoder_3=text_encoder_3, tokenizer_3=T5TokenizerFast.from_pretrained(t5_folder))
    root = Path(tmp_path) / ("sd35" if sd35 else "sd3")
    pipe.save_pretrained(root)
    _hub_layout(root, {"tokenizer": PAD_EOT, "tokenizer_2": PAD_BANG, "tokenizer_3": t5_folder},
                ["text_encoder", "text_encoder_2"], SD35_SCHEDULER if sd35 else SD3_SCHEDULER)
    index = json.loads((root / "model_index.json").read_text())  # the hub names T5's tokenizer class so
    (root / "model_index.json").write_text(json.dumps({**index, "tokenizer_3": ["transformers", "T5TokenizerFast"]},
                                                      indent=2))
    return root


def tiny_vision_config(projection_dim, hidden_act="gelu"):
    """A CLIPVisionConfig small everywhere: 32 x 32 pixels in 8 x 8 patches (17 tokens), 3 layers."""
    return CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                            image_size=32, patch_size=8, projection_dim=projection_dim, hidden_act=hidden_act)


def randomize(module, seed=0):
    """Every parameter of a module random, LayerNorms' and zero-inits included (test helper)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (p.shape[-1] ** -0.5 if p.ndim > 1 else 0.5))
    return module


def make_ip_adapter(folder, subfolder, weight_name, unet, embed_dim=24, plus=False, seed=0):
    """A random IP-Adapter for a diffusers UNet, written by hand in h94/IP-Adapter's layout and keys: the file
    folder/subfolder/weight_name (flat safetensors, or a .bin of {"image_proj": ..., "ip_adapter": ...}) and
    its CLIP image encoder in folder/subfolder/image_encoder (image embedding embed_dim wide). Returns the file.

    ip_adapter.N is numbered by diffusers' unet.attn_processors, as the reference code numbers them.
    plus: a Resampler of 16 latents (depth 4, one 64-wide head, as diffusers assumes) on the encoder's
    penultimate hidden states, instead of IP-Adapter's linear projection of its embedding.
    """
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):  # weights ~ 1 / sqrt(fan-in); vectors (norms, biases) around their init
        return torch.randn(shape, generator=g) * (shape[-1] ** -0.5 if len(shape) > 1 else 0.5)

    torch.manual_seed(seed)
    encoder = randomize(CLIPVisionModelWithProjection(tiny_vision_config(embed_dim)), seed)
    D, E = unet.config.cross_attention_dim, encoder.config.hidden_size
    if plus:
        dim, inner = 32, 64
        tensors = {"latents": rand(1, 16, dim), "proj_in.weight": rand(dim, E), "proj_in.bias": rand(dim),
                   "proj_out.weight": rand(D, dim), "proj_out.bias": rand(D), "norm_out.weight": 1 + rand(D),
                   "norm_out.bias": rand(D)}
        for i in range(4):
            tensors.update({f"layers.{i}.0.norm1.weight": 1 + rand(dim), f"layers.{i}.0.norm1.bias": rand(dim),
                            f"layers.{i}.0.norm2.weight": 1 + rand(dim), f"layers.{i}.0.norm2.bias": rand(dim),
                            f"layers.{i}.0.to_q.weight": rand(inner, dim),
                            f"layers.{i}.0.to_kv.weight": rand(2 * inner, dim),
                            f"layers.{i}.0.to_out.weight": rand(dim, inner),
                            f"layers.{i}.1.0.weight": 1 + rand(dim), f"layers.{i}.1.0.bias": rand(dim),
                            f"layers.{i}.1.1.weight": rand(4 * dim, dim),
                            f"layers.{i}.1.3.weight": rand(dim, 4 * dim)})
    else:
        tensors = {"proj.weight": rand(4 * D, embed_dim), "proj.bias": rand(4 * D), "norm.weight": 1 + rand(D),
                   "norm.bias": rand(D)}
    state = {"image_proj": tensors, "ip_adapter": {}}
    for n, name in enumerate(unet.attn_processors):
        if name.endswith("attn2.processor"):
            width = unet.get_submodule(name[:-len(".processor")]).to_q.out_features
            state["ip_adapter"].update({f"{n}.to_k_ip.weight": rand(width, D), f"{n}.to_v_ip.weight": rand(width, D)})
    where = Path(folder) / subfolder
    encoder.save_pretrained(where / "image_encoder")
    file = where / weight_name
    if file.suffix == ".safetensors":
        save_file({f"{part}.{k}": v for part, d in state.items() for k, v in d.items()}, file)
    else:
        torch.save(state, file)
    return file

def make_controlnet(root, folder, seed=0):
    """A ControlNet of the tiny pipeline at root, made as the hub's are (ControlNetModel.from_unet) with every
    parameter randomized (zero convs too: zeros would make any comparison trivial), saved in the hub layout.

    Its image encoder has one stride-2 step: control images are 2x the latents, as the tiny autoencoders' pixels.
    """
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    net = ControlNetModel.from_unet(UNet2DConditionModel.from_pretrained(Path(root) / "unet"),
                                    conditioning_embedding_out_channels=(8, 16))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    net.save_pretrained(folder)
    return Path(folder)
