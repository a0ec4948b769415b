"""SD3 / SD3.5 from prompt to image with our modules against StableDiffusion3Pipeline, on tiny random pipelines.

- SD3PromptEncoder equals the pipeline's encode_prompt (prompt and negative embeddings, pooled), with
  T5 and without (the pipeline's text_encoder_3=None);
- the whole path: our prompt encoding, mmdit, flow-matching Euler with CFG on the velocity and the
  16-channel autoencoder give the pipeline's images from the same initial latents, to 1e-4.
"""

import json
import shutil

import pytest
import torch

import checkpoint
import flow_matching_draft as fm
import mmdit
import prompts
import vae
from util import max_rel_err

diffusers = pytest.importorskip("diffusers")

PROMPTS = ["a photo of an astronaut riding a horse on the moon", "", "A Red CAT, in oil! " * 40]  # the last: cut


def pipeline(root, t5=True):
    extra = {} if t5 else dict(text_encoder_3=None, tokenizer_3=None)
    return diffusers.StableDiffusion3Pipeline.from_pretrained(root, **extra).to("cpu")


@pytest.mark.parametrize("t5", [True, False], ids=["t5", "no-t5"])
def test_prompt_encoding_matches_the_pipeline(sd3_root, t5):
    pipe = pipeline(sd3_root, t5)
    ours = prompts.SD3PromptEncoder.from_pretrained(sd3_root, t5=t5)
    assert (ours.text_encoder_3 is None) == (not t5)
    with torch.no_grad():
        context, negative, pooled, negative_pooled = pipe.encode_prompt(PROMPTS, None, None, device="cpu")
        cond, null = ours(PROMPTS), ours.null(len(PROMPTS))
    assert cond["context"].shape == (3, 77 + 256, 96) and cond["pooled"].shape == (3, 32 + 48)
    for got, expected in ((cond["context"], context), (cond["pooled"], pooled), (null["context"], negative),
                          (null["pooled"], negative_pooled)):
        assert got.shape == expected.shape
        assert max_rel_err(got, expected) <= 1e-6
    assert cond["context"][:, :77, 80:].abs().max() == 0  # CLIP's 32 + 48 widths, zero-padded to T5's 96
    assert (cond["context"][:, 77:].abs().max() > 0) == t5  # T5's rows, or zeros without it
    with torch.no_grad():  # a negative prompt takes the empty prompt's place, one for all or one each
        _, negative, _, negative_pooled = pipe.encode_prompt(PROMPTS[:2], None, None, device="cpu",
                                                             negative_prompt="blurry")
        null = ours.null(2, negative_prompt="blurry")
        assert max_rel_err(null["context"], negative) <= 1e-6 and max_rel_err(null["pooled"], negative_pooled) <= 1e-6
        each = ours.null(2, negative_prompt=["blurry", "dark"])
        assert torch.equal(each["context"][0], null["context"][0]) and not torch.equal(each["context"][1],
                                                                                       null["context"][1])
    with pytest.raises(ValueError, match="negative_prompt has 1 prompts, expected 2"):
        ours.null(2, negative_prompt=["one"])


def generate(root, prompt, latents, w, steps, t5=True):
    """Our modules from prompt to image, as StableDiffusion3Pipeline runs: CFG on the velocity, then decode."""
    pe = prompts.SD3PromptEncoder.from_pretrained(root, t5=t5)
    model, ae = mmdit.from_pretrained(root), vae.from_pretrained(root)
    cond, null = pe(prompt), pe.null(len(prompt))
    both = {k: torch.cat([null[k], cond[k]]) for k in cond}  # one batch: unconditional first, as the pipeline

    def denoise(x, t):
        uncond, conditional = model(torch.cat([x, x]), t, **both).chunk(2)
        return uncond + w * (conditional - uncond)

    with torch.no_grad():
        z = fm.flow_sample(denoise, latents, fm.flow_sigmas(steps, shift=3.0))
        return ae.decode(z)


@pytest.mark.parametrize("name, t5, w", [("sd3", True, 5.0), ("sd35", True, 3.5), ("sd3", False, 7.0)])
def test_prompt_to_image_matches_the_pipeline(sd3_root, sd35_root, name, t5, w):
    root = {"sd3": sd3_root, "sd35": sd35_root}[name]
    pipe = pipeline(root, t5)
    latents = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    prompt = PROMPTS[:2]
    with torch.no_grad():
        expected = pipe(prompt, num_inference_steps=3, guidance_scale=w, latents=latents.clone(), output_type="pt",
                        height=16, width=16).images  # in [0, 1]
    images = generate(root, prompt, latents, w, steps=3, t5=t5)
    assert max_rel_err((images / 2 + 0.5).clamp(0, 1), expected) <= 1e-4
    assert expected.std() > 0.05  # an image, not a constant


def edit_config(file, **changes):
    file.write_text(json.dumps({**json.loads(file.read_text()), **changes}))


def test_repos_that_are_not_sd3_are_refused(sdxl_root, sd3_root, tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="expected SD3 or SD3.5"):
        prompts.SD3PromptEncoder.from_pretrained(sdxl_root)
    root = tmp_path / "sd3"
    shutil.copytree(sd3_root, root)
    edit_config(root / "transformer" / "config.json", joint_attention_dim=128)  # T5 does not fit the transformer
    with pytest.raises(checkpoint.CheckpointError, match="text_encoder_3 is 96 wide, the transformer's "
                                                         "joint_attention_dim 128"):
        prompts.SD3PromptEncoder.from_pretrained(root)
    shutil.rmtree(root / "text_encoder_2")
    shutil.copytree(sdxl_root / "text_encoder", root / "text_encoder_2")  # a CLIPTextModel: no projection
    with pytest.raises(checkpoint.CheckpointError, match="text_encoder_2 is not a CLIPTextModelWithProjection"):
        prompts.SD3PromptEncoder.from_pretrained(root, t5=False)
