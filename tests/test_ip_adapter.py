"""ip_adapter.py against diffusers' IP-Adapter, on tiny random SD 1.5-like and SDXL-like pipelines.

Each case writes a random IP-Adapter by hand in h94/IP-Adapter's layout and keys (its image encoder
beside it) and loads the same file into the diffusers pipeline (`load_ip_adapter`) and into ours:
- the decoupled attentions are numbered as diffusers numbers them (down, up, then mid blocks; every
  attn2 odd), which differs from unet.py's module order;
- the image tokens, the null image's, and the UNet's output with the IP-Adapter at scale 0.6 equal
  diffusers' UNet with its IP-Adapter attention processors;
- a few CFG steps from prompt + image equal StableDiffusion(XL)Pipeline(ip_adapter_image=...) from
  the same latents, and sample.py's images (--ip-adapter, --ip-image) the pipeline's from the same
  seed; fresh AGD adapters + the IP-Adapter in one UNet pass per step equal the pipeline at guidance 1;
- the .bin twin loads as the safetensors file; the full-size files' shapes, key by key, on meta;
- a hub id (h94/IP-Adapter/models/...) gives the local file's images, its encoder from the same repo;
- the one-line errors (another cross-attention width, an encoder that does not fit, bad files, a
  missing or unreadable image, options that do not go together).
Cases: IP-Adapter and IP-Adapter Plus (the Resampler on the penultimate hidden states), for each.
"""

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import adapters
import checkpoint
import families
import image_encoders as ie
import ip_adapter
import sample
import unet

diffusers = pytest.importorskip("diffusers")
from transformers import CLIPImageProcessorPil  # noqa: E402
from tiny_pipelines import make_ip_adapter, randomize, tiny_vision_config  # noqa: E402  (imports diffusers)
from util import max_rel_err, offline_hub_cache  # noqa: E402

SCALE = 0.6  # the official AGD code's IP-Adapter scale
SIDE, STEPS = 16, 4  # pixels (the tiny pipelines' 8 x 8 latents), sampler steps
PROMPT = "a photograph of an astronaut riding a horse"
CASES = {  # name: (pipeline, h94's subfolder, file name, Plus, the encoder's embedding width)
    "sd15": ("sd15", "models", "ip-adapter_sd15.safetensors", False, 24),
    "sdxl": ("sdxl", "sdxl_models", "ip-adapter_sdxl.safetensors", False, 40),
    "sd15-plus": ("sd15", "models", "ip-adapter-plus_sd15.safetensors", True, 24),
    "sdxl-plus": ("sdxl", "sdxl_models", "ip-adapter-plus_sdxl.safetensors", True, 40),
}


def image(seed, size=(48, 40)):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture(scope="module", params=list(CASES))
def case(request, sd15_root, sdxl_root, tmp_path_factory):
    """The diffusers pipeline with the IP-Adapter loaded, and ours: UNet, IP-Adapter, image and prompt encoders."""
    kind, subfolder, name, plus, embed_dim = CASES[request.param]
    root = sd15_root if kind == "sd15" else sdxl_root
    pipe = (diffusers.StableDiffusionXLPipeline if kind == "sdxl" else diffusers.StableDiffusionPipeline)\
        .from_pretrained(root)
    pipe.set_progress_bar_config(disable=True)
    folder = tmp_path_factory.mktemp("ip")
    file = make_ip_adapter(folder, subfolder, name, pipe.unet, embed_dim=embed_dim, plus=plus)
    pipe.load_ip_adapter(str(folder), subfolder=subfolder, weight_name=name)
    pipe.set_ip_adapter_scale(SCALE)
    # diffusers makes CLIPImageProcessor(size=image_size, crop_size=image_size), whose PIL path this is
    # (it is that class where torchvision is absent, here); PIL's bicubic is what CLIP's preprocessing uses
    pipe.feature_extractor = CLIPImageProcessorPil(size=32, crop_size=32)
    family = "sdxl" if kind == "sdxl" else "sd21"  # sample.py's --model for an SD 1.5 UNet: sd21
    base = families.load(family, root, height=SIDE, width=SIDE)
    return SimpleNamespace(name=request.param, root=root, pipe=pipe, file=file, plus=plus, model=base.model,
                           base=base, family=family, ip=ip_adapter.load(base.model, file, SCALE),
                           encoder=ie.VisionEncoder.from_pretrained(ip_adapter.encoder_folder(file)),
                           xl=kind == "sdxl")


def unet_inputs(c, batch=2):
    g = torch.Generator().manual_seed(1)
    cond = {"context": torch.randn(batch, 77, c.model.config.cross_attention_dim, generator=g)}
    if c.xl:
        cond.update(text_embeds=torch.randn(batch, 40, generator=g),
                    time_ids=torch.tensor([[SIDE, SIDE, 0, 0, SIDE, SIDE]], dtype=torch.float32).repeat(batch, 1))
    return torch.randn(batch, 4, 8, 8, generator=g), torch.tensor([500, 20]), cond


def test_decoupled_attentions_are_numbered_as_diffusers_numbers_them(case):
    # the UNet's own (a Plus projection's Resampler has attention processors too, listed after them)
    processors = {k: v for k, v in case.pipe.unet.attn_processors.items() if not k.startswith("encoder_hid_proj")}
    loaded = {name[:-len(".processor")]: (n, p) for n, (name, p) in enumerate(processors.items())
              if hasattr(p, "to_k_ip")}
    assert [s.name for s in case.ip.sites] == [n for n, m in case.model.named_modules() if n.endswith("attn2")]
    assert sorted(loaded) == sorted(s.name for s in case.ip.sites)
    for site, number in zip(case.ip.sites, case.ip.numbers):
        n, processor = loaded[site.name]
        assert int(number) == n and n % 2 == 1
        assert torch.equal(case.ip.ip_adapter[number].to_k_ip.weight, processor.to_k_ip[0].weight)
        assert torch.equal(case.ip.ip_adapter[number].to_v_ip.weight, processor.to_v_ip[0].weight)
    # diffusers' order is not unet.py's (mid block last, not between down and up): the test could fail
    modules = [n for n, m in case.model.named_modules() if isinstance(m, unet.Attention)]
    assert ip_adapter.attention_order(case.model) != modules
    assert ip_adapter.attention_order(case.model) == [n[:-len(".processor")] for n in processors]


@torch.no_grad()
def test_unet_with_ip_adapter_matches_diffusers(case):
    x, t, cond = unet_inputs(case)
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    # diffusers' pipelines: encode_image gives the image's features and the null image's
    features, null_features = case.pipe.encode_image(pixels, "cpu", 1, output_hidden_states=case.plus)
    tokens, null = case.ip.encode(case.encoder, pixels), case.ip.null(2, case.encoder)
    project = case.pipe.unet.encoder_hid_proj
    assert tokens.shape == (2, 16 if case.plus else 4, case.model.config.cross_attention_dim)
    assert max_rel_err(tokens, project([features[:, None]])[0][:, 0]) < 1e-5
    assert max_rel_err(null, project([null_features[:, None]])[0][:, 0]) < 1e-5
    assert max_rel_err(null[:1], tokens[:1]) > 0.1

    added = {"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]} if case.xl else {}
    expected = case.pipe.unet(x, t, encoder_hidden_states=cond["context"],
                              added_cond_kwargs={**added, "image_embeds": [features[:, None]]}).sample
    ours = adapters.call_with(case.model, case.ip)(x, t, ip_tokens=tokens, **cond)
    assert max_rel_err(ours, expected) < 1e-5
    assert max_rel_err(case.model(x, t, **cond), expected) > 1e-2  # outside the scope: the base model alone
    one = adapters.call_with(case.model, case.ip)(x, t, ip_tokens=tokens[:1], **cond)  # one image for all
    both = adapters.call_with(case.model, case.ip)(x, t, ip_tokens=tokens[:1].expand(2, -1, -1), **cond)
    assert torch.equal(one, both)
    case.ip.scale = 0.0
    try:
        assert torch.equal(adapters.call_with(case.model, case.ip)(x, t, ip_tokens=tokens, **cond),
                           case.model(x, t, **cond))
    finally:
        case.ip.scale = SCALE


def our_latents(c, latents, w, ip_image=None, student=None):
    """Prompt + image -> latents with sample.sample_latents, from the pipeline's x_T (see test_sample_sd)."""
    base, beside = c.base, ()
    if ip_image is not None:
        tokens = c.ip.encode(c.encoder, c.encoder.processor([ip_image]))
        base, beside = ip_adapter.with_image_prompt(c.base, tokens, c.ip.null(1, c.encoder)), (c.ip,)
    if student is not None:  # AGD: one pass per step at w, the IP-Adapter and the adapters beside the same attn2
        return sample.sample_latents(base, [PROMPT], latents, STEPS, student=student, w=w, beside=beside)
    return sample.sample_latents(base, [PROMPT], latents, STEPS, cfg_scale=w, beside=beside)


def pipeline_latents(c, latents, w, ip_image):
    return c.pipe(PROMPT, ip_adapter_image=ip_image, height=SIDE, width=SIDE, num_inference_steps=STEPS,
                  guidance_scale=w, latents=latents.clone(), output_type="latent").images


@torch.no_grad()
def test_prompt_and_image_to_latents_match_the_pipeline_with_cfg(case):
    latents = torch.randn(1, 4, SIDE // 2, SIDE // 2, generator=torch.Generator().manual_seed(0))
    expected = pipeline_latents(case, latents, 7.5, image(0))
    ours = our_latents(case, latents, 7.5, image(0))
    assert max_rel_err(ours, expected) < 1e-4
    assert max_rel_err(our_latents(case, latents, 7.5), expected) > 1e-2  # without the image: not the same
    assert max_rel_err(our_latents(case, latents, 7.5, image(1)), expected) > 1e-2  # another image: neither


@torch.no_grad()
def test_agd_adapters_and_ip_adapter_in_one_pass_equal_the_pipeline_at_guidance_1(case):
    latents = torch.randn(1, 4, SIDE // 2, SIDE // 2, generator=torch.Generator().manual_seed(0))
    expected = pipeline_latents(case, latents, 1.0, image(0))
    student = adapters.attach(case.model, hidden_dim=16)  # fresh: its adapters add zero
    calls = []
    counter = case.model.register_forward_hook(lambda *_: calls.append(1))
    try:
        ours = our_latents(case, latents, 7.5, image(0), student=student)
        assert len(calls) == STEPS  # one UNet pass per step, batch 1
        assert max_rel_err(ours, expected) < 1e-4
        # trained adapters act in that same pass, beside the IP-Adapter's attention
        for a in student.adapters:
            torch.nn.init.normal_(a.out_proj.weight, std=0.05)
        x, t, cond = unet_inputs(case, batch=1)
        tokens = case.ip.encode(case.encoder, case.encoder.processor([image(0)]))
        both = adapters.call_with(case.model, case.ip, student)(x, t[:1], w=4.0, ip_tokens=tokens, **cond)
        ip_alone = adapters.call_with(case.model, case.ip)(x, t[:1], ip_tokens=tokens, **cond)
        student_alone = student(x, t[:1], w=4.0, **cond)
        assert max_rel_err(both, ip_alone) > 1e-2 and max_rel_err(both, student_alone) > 1e-2
    finally:
        counter.remove()
        student.detach()


def test_bin_twin_loads_as_the_safetensors_file(case, tmp_path):
    kind, subfolder, name, plus, embed_dim = CASES[case.name]
    twin = make_ip_adapter(tmp_path, subfolder, name.replace(".safetensors", ".bin"), case.pipe.unet,
                           embed_dim=embed_dim, plus=plus)  # same seed: the same tensors, torch.save'd nested
    loaded = ip_adapter.load(case.model, twin, SCALE)
    ours = loaded.ip_state_dict()
    loaded.detach()
    expected = case.ip.ip_state_dict()
    assert ours.keys() == expected.keys() == load_file(case.file).keys()
    assert all(torch.equal(ours[k], expected[k]) for k in expected)
    assert ip_adapter.read_file(twin).keys() == load_file(case.file).keys()


# -----------------------------------------------------------------------------
# sample.py: --ip-adapter FILE --ip-image FILE [--ip-scale S] [--image-encoder PATH]


def parse(c, *argv):
    """sample.py's arguments for the case's tiny pipeline, on the CPU, at the pipelines' 16 px."""
    return sample.parse_args(["--model", c.family, "--weights", str(c.root), "--steps", str(STEPS), "--device",
                              "cpu", "--height", str(SIDE), "--width", str(SIDE), "--prompt", PROMPT, *argv])


def generate(c, *argv):
    return sample.generate(parse(c, *argv), families.FAMILIES[c.family])


@pytest.mark.parametrize("case", ["sd15", "sdxl"], indirect=True)  # the sampling tests above take all four
@torch.no_grad()
def test_sample_py_prompt_and_image_to_images_match_the_pipeline(case, tmp_path):
    file, seed = tmp_path / "prompt.png", 3
    image(0).save(file)  # PNG: the pipeline and sample.py read the same pixels

    def pipeline_images(w):
        return case.pipe(PROMPT, ip_adapter_image=Image.open(file), height=SIDE, width=SIDE, guidance_scale=w,
                         num_inference_steps=STEPS, generator=torch.Generator().manual_seed(seed),
                         output_type="pt").images

    argv = ["--seed", str(seed), "--ip-adapter", str(case.file), "--ip-image", str(file)]
    expected = pipeline_images(7.5)
    images, _, how = generate(case, *argv, "--cfg", "7.5")
    assert images.shape == expected.shape == (1, 3, SIDE, SIDE)
    assert (images - expected).abs().max() < 1e-4
    assert how.endswith(f"CFG at w=7.5, conditional and null passes batched, IP-Adapter {case.file.name} at "
                        "scale 0.6")
    text_only, _, _ = generate(case, "--seed", str(seed), "--cfg", "7.5")
    assert (text_only - expected).abs().max() > 1e-2  # the image prompt moved the images: the test could fail
    unweighted, _, _ = generate(case, *argv, "--cfg", "7.5", "--ip-scale", "0")
    assert torch.equal(unweighted, text_only)  # --ip-scale is the scale: at 0 the text alone, exactly

    # AGD: fresh adapters beside the same attn2, one UNet pass per step: the pipeline at guidance 1
    agd_file = tmp_path / "agd.safetensors"
    adapters.attach(unet.from_pretrained(case.root), hidden_dim=8).save(agd_file)
    images, _, how = generate(case, *argv, "--adapters", str(agd_file), "--w", "7.5")
    assert (images - pipeline_images(1.0)).abs().max() < 1e-4
    assert "adapters at w=7.5, one pass" in how and "IP-Adapter" in how


# -----------------------------------------------------------------------------
# full size, on the meta device


@pytest.mark.parametrize("preset, embed_dim, attn2s", [("sdxl", 1280, 70), ("sdxl", 1024, 70), ("sd1.5", 1024, 16)],
                         ids=["ip-adapter_sdxl", "ip-adapter_sdxl_vit-h", "ip-adapter_sd15"])
def test_full_size_ip_adapter_shapes_key_by_key(preset, embed_dim, attn2s):
    """Every key and shape of h94's files, from diffusers' UNet on meta as its loader reads them."""
    config = unet.PRESETS[preset]()
    D = config.cross_attention_dim
    with torch.device("meta"):
        reference = diffusers.UNet2DConditionModel(**{k: v for k, v in dataclasses.asdict(config).items()
                                                      if k != "prediction_type"})
        model = unet.UNet(config)
        ip = ip_adapter.IPAdapter(model, ip_adapter.ImageProjection(embed_dim, D), SCALE)
    expected = {"image_proj.proj.weight": (4 * D, embed_dim), "image_proj.proj.bias": (4 * D,),
                "image_proj.norm.weight": (D,), "image_proj.norm.bias": (D,)}
    for n, name in enumerate(reference.attn_processors):
        if name.endswith("attn2.processor"):
            width = reference.get_submodule(name[:-len(".processor")]).to_q.out_features
            expected.update({f"ip_adapter.{n}.to_k_ip.weight": (width, D),
                             f"ip_adapter.{n}.to_v_ip.weight": (width, D)})
    assert {k: tuple(v.shape) for k, v in ip.ip_state_dict().items()} == expected
    assert len(expected) == 4 + 2 * attn2s and f"ip_adapter.{2 * attn2s - 1}.to_v_ip.weight" in expected
    ip.detach()


def test_encoder_folder_follows_h94s_layout(tmp_path):
    assert ip_adapter.encoder_folder(tmp_path / "models/ip-adapter_sd15.bin") == tmp_path / "models/image_encoder"
    assert ip_adapter.encoder_folder(tmp_path / "sdxl_models/ip-adapter_sdxl.safetensors") == \
        tmp_path / "sdxl_models/image_encoder"
    # SDXL's *_vit-h files were trained on ViT-H/14, which h94 keeps in models/
    assert ip_adapter.encoder_folder(tmp_path / "sdxl_models/ip-adapter-plus_sdxl_vit-h.safetensors") == \
        tmp_path / "models/image_encoder"


# -----------------------------------------------------------------------------
# bad input: one-line errors


def one_line(e):
    return "\n" not in str(e.value)


def test_errors(sd15_root, sdxl_root, tmp_path):
    sd15, sdxl = unet.from_pretrained(sd15_root), unet.from_pretrained(sdxl_root)
    reference = diffusers.UNet2DConditionModel.from_pretrained(sd15_root, subfolder="unet")
    file = make_ip_adapter(tmp_path, "models", "ip-adapter_sd15.safetensors", reference)
    with pytest.raises(checkpoint.CheckpointError, match="for 32-wide cross-attention, but this UNet attends to "
                                                         "80-wide") as e:
        ip_adapter.load(sdxl, file)  # SD 1.5's IP-Adapter on SDXL
    assert str(file) in str(e.value) and one_line(e)

    ip = ip_adapter.load(sd15, file)
    other = ie.VisionEncoder.from_pretrained(randomize_and_save(tmp_path / "other", projection_dim=40))
    with pytest.raises(checkpoint.CheckpointError, match="image embeddings are 40 wide, this IP-Adapter's image "
                                                         "projection takes 24") as e:
        ip.encode(other, torch.zeros(1, 3, 32, 32))
    assert one_line(e)
    x, t, cond = torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), {"context": torch.randn(2, 77, 32)}
    with pytest.raises(ValueError, match="pass ip_tokens="):
        adapters.call_with(sd15, ip)(x, t, **cond)
    with pytest.raises(RuntimeError, match="ip_tokens hold a batch of 3"):
        adapters.call_with(sd15, ip)(x, t, ip_tokens=torch.zeros(3, 4, 32), **cond)
    assert torch.equal(sd15(x, t, **cond), sd15(x, t, **cond))  # a failed call leaves no state behind
    ip.detach()

    tensors = load_file(file)
    bad = {}
    bad["missing"] = {k: v for k, v in tensors.items() if k != "ip_adapter.1.to_k_ip.weight"}
    bad["other"] = {"proj.weight": torch.zeros(2, 2)}
    for name, content in bad.items():
        save_file(content, tmp_path / f"{name}.safetensors")
    with pytest.raises(checkpoint.CheckpointError, match="missing key ip_adapter.1.to_k_ip.weight") as e:
        ip_adapter.load(sd15, tmp_path / "missing.safetensors")
    assert one_line(e)
    assert not any(m._forward_hooks for m in sd15.modules())  # a file that fails to load leaves no hooks
    with pytest.raises(checkpoint.CheckpointError, match="not an IP-Adapter file this library reads"):
        ip_adapter.load(sd15, tmp_path / "other.safetensors")
    with pytest.raises(checkpoint.CheckpointError, match="no such IP-Adapter file"):
        ip_adapter.load(sd15, tmp_path / "absent.bin")
    (tmp_path / "garbage.bin").write_bytes(b"not a pickle")
    torch.save({"image_proj": SimpleNamespace(a=1)}, tmp_path / "pickled.bin")  # not weights: refused unread
    torch.save({"something": torch.zeros(1)}, tmp_path / "flat.bin")
    for name, message in [("garbage.bin", "not a PyTorch checkpoint of plain tensors"),
                          ("pickled.bin", "not a PyTorch checkpoint of plain tensors"),
                          ("flat.bin", "not an IP-Adapter file this library reads")]:
        with pytest.raises(checkpoint.CheckpointError, match=message) as e:
            ip_adapter.load(sd15, tmp_path / name)
        assert one_line(e), name
    with pytest.raises(ValueError, match="beside a UNet's attn2 modules"):
        ip_adapter.load(torch.nn.Linear(2, 2), file)


def test_sample_py_takes_a_hub_id_and_its_encoder_from_the_same_repo(sd15_root, tmp_path, monkeypatch):
    reference = diffusers.UNet2DConditionModel.from_pretrained(sd15_root, subfolder="unet")
    file = make_ip_adapter(tmp_path / "h94", "models", "ip-adapter_sd15.safetensors", reference)
    put = offline_hub_cache(tmp_path / "home", monkeypatch)
    for name in ("ip-adapter_sd15.safetensors", "image_encoder/config.json", "image_encoder/model.safetensors"):
        put("h94/IP-Adapter", f"models/{name}", file.parent / name)
    image(0).save(tmp_path / "prompt.png")
    sd15 = SimpleNamespace(family="sd21", root=sd15_root)
    prompt = ["--ip-image", str(tmp_path / "prompt.png")]
    local, _, _ = generate(sd15, "--ip-adapter", str(file), *prompt)
    hub_images, _, how = generate(sd15, "--ip-adapter", "h94/IP-Adapter/models/ip-adapter_sd15.safetensors", *prompt)
    assert torch.equal(hub_images, local) and how.endswith("IP-Adapter ip-adapter_sd15.safetensors at scale 0.6")
    with pytest.raises(checkpoint.CheckpointError, match="h94/IP-Adapter/models/absent.bin: not in the hub cache"):
        generate(sd15, "--ip-adapter", "h94/IP-Adapter/models/absent.bin", *prompt)


def test_sample_py_errors(sd15_root, sdxl_root, tmp_path, capsys):
    reference = diffusers.UNet2DConditionModel.from_pretrained(sd15_root, subfolder="unet")
    file = make_ip_adapter(tmp_path / "h94", "models", "ip-adapter_sd15.safetensors", reference)
    image(0).save(tmp_path / "prompt.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    sd15, sdxl = SimpleNamespace(family="sd21", root=sd15_root), SimpleNamespace(family="sdxl", root=sdxl_root)
    ok = ["--ip-adapter", str(file), "--ip-image", str(tmp_path / "prompt.png")]
    for c, argv, error, message in [
        (sd15, ["--ip-adapter", str(file), "--ip-image", str(tmp_path / "absent.png")], sample.InputError,
         "--ip-image .*absent.png: no such image file"),
        (sd15, ["--ip-adapter", str(file), "--ip-image", str(tmp_path / "broken.png")], sample.InputError,
         "--ip-image .*broken.png: not a readable image"),
        (sdxl, ok, checkpoint.CheckpointError, "for 32-wide cross-attention, but this UNet attends to 80-wide"),
        (sd15, [*ok, "--image-encoder", str(randomize_and_save(tmp_path / "other", projection_dim=40))],
         checkpoint.CheckpointError, "image embeddings are 40 wide, this IP-Adapter's image projection takes 24"),
    ]:
        with pytest.raises(error, match=message) as e:
            generate(c, *argv)
        assert one_line(e), message
    alone = tmp_path / "alone" / file.name  # h94's file without the image_encoder/ folder beside it
    alone.parent.mkdir()
    alone.write_bytes(file.read_bytes())
    with pytest.raises(sample.InputError, match="no image encoder beside it .* name it with --image-encoder"):
        generate(sd15, "--ip-adapter", str(alone), "--ip-image", str(tmp_path / "prompt.png"))
    for argv, message in [(["--model", "sd21", "--ip-image", "x.png"], "takes both --ip-adapter FILE and --ip-image"),
                          (["--model", "sdxl", "--ip-adapter", "x.bin", "--ip-scale", "1"], "takes both"),
                          (["--model", "dit", "--ip-adapter", "x.bin"], "--ip-adapter is not an option of --model"),
                          (["--model", "tiny", "--ip-scale", "1"], "--ip-scale is not an option of --model tiny"),
                          (["--model", "sd3", "--ip-adapter", "x.bin"], "--ip-adapter is not an option of --model sd3 "
                                                                        "(IP-Adapters are for the UNets")]:
        with pytest.raises(SystemExit):
            sample.parse_args(argv)
        assert message in capsys.readouterr().err


def randomize_and_save(folder, projection_dim):
    from transformers import CLIPVisionModelWithProjection

    randomize(CLIPVisionModelWithProjection(tiny_vision_config(projection_dim))).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("case", ["sdxl"], indirect=True)
@torch.no_grad()
def test_ip_adapter_controlnet_and_adapters_compose_in_one_pass(case, tmp_path, monkeypatch):
    """--ip-adapter, --controlnet and fresh --adapters together: one UNet and one ControlNet pass per step,
    the images of diffusers' StableDiffusionXLControlNetPipeline with the IP-Adapter loaded, at guidance 1."""
    from test_sample_controlnet import count_batches
    from tiny_pipelines import make_controlnet

    prompt, control = tmp_path / "prompt.png", tmp_path / "control.png"
    image(0).save(prompt)
    image(1, size=(SIDE, SIDE)).save(control)
    net = make_controlnet(case.root, tmp_path / "cn", seed=0)
    pipe = diffusers.StableDiffusionXLControlNetPipeline.from_pretrained(
        case.root, controlnet=diffusers.ControlNetModel.from_pretrained(net))
    pipe.set_progress_bar_config(disable=True)
    pipe.load_ip_adapter(str(case.file.parent.parent), subfolder=case.file.parent.name, weight_name=case.file.name)
    pipe.set_ip_adapter_scale(SCALE)
    pipe.feature_extractor = CLIPImageProcessorPil(size=32, crop_size=32)
    expected = pipe(PROMPT, image=Image.open(control), ip_adapter_image=Image.open(prompt), height=SIDE, width=SIDE,
                    guidance_scale=1.0, controlnet_conditioning_scale=0.5, num_inference_steps=STEPS,
                    generator=torch.Generator().manual_seed(3), output_type="pt").images

    agd_file = tmp_path / "agd.safetensors"
    adapters.attach(unet.from_pretrained(case.root), hidden_dim=8).save(agd_file)
    seen = count_batches(monkeypatch)
    images, _, how = generate(case, "--seed", "3", "--ip-adapter", str(case.file), "--ip-image", str(prompt),
                              "--controlnet", str(net), "--control-image", str(control), "--control-scale", "0.5",
                              "--adapters", str(agd_file), "--w", "7.5")
    assert seen == {"unet": [1] * STEPS, "controlnet": [1] * STEPS}  # all three in the one pass of each step
    assert "IP-Adapter" in how and "ControlNet" in how and "one pass" in how
    assert (images - expected).abs().max() < 1e-4
    without_control, _, _ = generate(case, "--seed", "3", "--ip-adapter", str(case.file), "--ip-image", str(prompt),
                                     "--adapters", str(agd_file), "--w", "7.5")
    assert (without_control - expected).abs().max() > 1e-3  # the ControlNet mattered: the comparison could fail
