"""lora.py against diffusers' load_lora_weights / set_adapters / fuse_lora (peft), on tiny random
SD 1.5, SD 2.1 and SDXL pipelines, with random LoRA files in each format (tests/lora_files.py);
kohya-ss's alpha rule by hand where diffusers approximates it; DiT LoRAs against peft on diffusers'
DiT; exact unfusing; and one-line errors for bad input."""

import json
import shutil

import pytest
import torch
from lora_files import make_lora
from util import max_rel_err

import checkpoint
import dit
import lora
import unet
from text_encoders import TextEncoder

MULTIPLIERS = (0.7, 1.3)
CASES = [("sd15", "kohya"), ("sd15", "peft"), ("sd21", "kohya"), ("sd21", "peft"),
         ("sdxl", "kohya_sgm"), ("sdxl", "kohya"), ("sdxl", "peft")]


@pytest.fixture(scope="module")
def roots(sd15_root, sd21_root, sdxl_root):
    return dict(sd15=sd15_root, sd21=sd21_root, sdxl=sdxl_root)


def ours(root):
    """Our UNet and text towers of a pipeline folder, by component name."""
    models = dict(unet=unet.from_pretrained(root), text_encoder=TextEncoder.from_pretrained(root, "text_encoder"))
    if (root / "text_encoder_2").is_dir():
        models["text_encoder_2"] = TextEncoder.from_pretrained(root, "text_encoder_2")
    return models


def inputs(models, seed=0):
    """Random UNet inputs (x, t, cond) and token ids (with an <|endoftext|> to pool) for the towers."""
    g = torch.Generator().manual_seed(seed)
    c = models["unet"].config
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([999, 421])
    cond = dict(context=torch.randn(2, 7, c.cross_attention_dim, generator=g))
    if c.addition_embed_type == "text_time":
        pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
        cond.update(text_embeds=torch.randn(2, pooled, generator=g),
                    time_ids=torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2))
    ids = torch.randint(0, 49406, (2, 77), generator=g)
    ids[:, 9] = 49407
    return x, t, cond, ids


@torch.no_grad()
def run_ours(models, x, t, cond, ids):
    """UNet output, and each tower's (last, penultimate, pooled)."""
    out = {"unet": models["unet"](x, t, **cond)}
    for name in ("text_encoder", "text_encoder_2"):
        if name in models:
            out[name] = models[name](ids)
    return out


@torch.no_grad()
def run_diffusers(pipe, x, t, cond, ids):
    """The same outputs from a diffusers pipeline's components."""
    added = {k: cond[k] for k in ("text_embeds", "time_ids") if k in cond}
    out = {"unet": pipe.unet(x, t, encoder_hidden_states=cond["context"],
                             added_cond_kwargs=added or None).sample}
    for name in ("text_encoder", "text_encoder_2"):
        tower = getattr(pipe, name, None)
        if tower is not None:
            o = tower(ids, output_hidden_states=True)
            pooled = o.text_embeds if hasattr(o, "text_embeds") else o.pooler_output
            out[name] = (o.last_hidden_state, o.hidden_states[-2], pooled)
    return out


def assert_close(a, b, tol, what):
    for name in b:
        pairs = [(a[name], b[name])] if name == "unet" else list(zip(a[name], b[name]))
        for i, (x, y) in enumerate(pairs):
            err = max_rel_err(x, y)
            assert err < tol, f"{what}: {name}[{i}] differs by {err:.2e}"


def lora_pair(root, kind, fmt, tmp_path):
    """Two random LoRAs of one pipeline: kohya's with alpha 2 on rank 4 and LoCon convs of rank 2, alpha 1."""
    kw = dict(rank=4, conv_rank=2, alpha=2, conv_alpha=1) if fmt.startswith("kohya") else dict(rank=4)
    # diffusers' kohya reader maps add_embedding_linear_N in diffusers' names onto no module (its
    # SDXL index stripping eats the N); ours is checked against the sgm names below
    skip = ("add_embedding",) if (kind, fmt) == ("sdxl", "kohya") else ()
    return [make_lora(root, fmt, tmp_path / f"{kind}-{fmt}-{s}.safetensors", seed=s, skip=skip, **kw) for s in (1, 2)]


@pytest.mark.parametrize("kind,fmt", CASES)
def test_two_loras_match_diffusers(roots, kind, fmt, tmp_path):
    """Two LoRAs at 0.7 and 1.3: UNet and text towers equal diffusers' with peft (and once its
    fused weights); our run-time and fused outputs agree; removing restores every weight bit for bit."""
    from diffusers import DiffusionPipeline

    root = roots[kind]
    files = lora_pair(root, kind, fmt, tmp_path)
    pipe = DiffusionPipeline.from_pretrained(root)
    for name, file in zip("ab", files):
        pipe.load_lora_weights(str(file), adapter_name=name)
    pipe.set_adapters(["a", "b"], adapter_weights=list(MULTIPLIERS))
    models = ours(root)
    original = {c: {k: v.clone() for k, v in m.state_dict().items()} for c, m in models.items()}
    x, t, cond, ids = inputs(models)
    base = run_ours(models, x, t, cond, ids)
    specs = list(zip(files, MULTIPLIERS))

    reference = run_diffusers(pipe, x, t, cond, ids)
    applied = lora.apply(models, specs, fuse=False)
    at_run_time = run_ours(models, x, t, cond, ids)
    assert_close(at_run_time, reference, 1e-5, "run time vs diffusers")
    applied.remove()

    applied = lora.apply(models, specs, fuse=True)
    fused = run_ours(models, x, t, cond, ids)
    assert_close(fused, at_run_time, 1e-5, "fused vs run time")
    if (kind, fmt) == ("sdxl", "kohya_sgm"):  # diffusers' fuse_lora too, once: it takes most of a case's time
        pipe.fuse_lora(adapter_names=["a", "b"])
        pipe.unload_lora_weights()  # the fused weights stay, peft's layers go
        assert_close(fused, run_diffusers(pipe, x, t, cond, ids), 1e-5, "fused vs diffusers fused")
    # the LoRAs do change every output, far beyond the tolerance
    for name in base:
        a, b = (base[name], fused[name]) if name == "unet" else (base[name][0], fused[name][0])
        assert max_rel_err(a, b) > 1e-2, f"{name}: the LoRAs changed nothing"

    applied.remove()
    for c, m in models.items():
        for k, v in m.state_dict().items():
            assert torch.equal(v, original[c][k]), f"{c}.{k} not restored bit for bit"


def test_sgm_and_diffusers_names_read_alike(sdxl_root, tmp_path):
    """A kohya SDXL LoRA named after the original UNet's blocks and one named after diffusers' modules
    (the same random tensors) give the same updates, add_embedding (label_emb) included."""
    models = ours(sdxl_root)
    terms = {fmt: lora.read(make_lora(sdxl_root, fmt, tmp_path / f"{fmt}.safetensors", seed=3, alpha=1), models)
             for fmt in ("kohya", "kohya_sgm")}
    assert len(terms["kohya"]) == len(terms["kohya_sgm"]) == 183 + 18 + 18
    assert any(t.target.module == "add_embedding.linear_1" for t in terms["kohya_sgm"])
    # the first tower's last layer, which SDXL never runs (it takes the penultimate states), is accepted
    assert any(t.component == "text_encoder" and ".layers.2." in t.target.module for t in terms["kohya_sgm"])
    by_module = {(t.component, t.target): t for t in terms["kohya_sgm"]}
    for a in terms["kohya"]:
        b = by_module[a.component, a.target]
        assert a.scale == b.scale
        assert torch.equal(a.down, b.down) and torch.equal(a.up, b.up)


def test_full_size_sdxl_sgm_names_are_diffusers():
    """Every Linear and Conv2d of the full-size SDXL UNet (meta device), named as kohya-ss names it in the
    original's blocks, goes back to the same module through diffusers' own kohya / sgm conversion."""
    import types

    from diffusers.loaders.lora_conversion_utils import (_convert_non_diffusers_lora_to_diffusers,
                                                         _maybe_map_sgm_blocks_to_diffusers)
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    with torch.device("meta"):
        model = unet.UNet(unet.PRESETS["sdxl"]())
    by_kohya = {k: t for k, t in lora._flat(lora.targets(model)).items()
                if k.startswith(("input_blocks", "middle_block", "output_blocks", "time_embed", "label_emb", "out_"))}
    ours = {p for p, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    assert {t.module for t in by_kohya.values()} == ours and len(ours) == 794
    sd = {f"lora_unet_{k}.lora_{r}.weight": torch.zeros(1) for k in by_kohya for r in ("down", "up")}
    sd, _ = _convert_non_diffusers_lora_to_diffusers(
        _maybe_map_sgm_blocks_to_diffusers(sd, types.SimpleNamespace(layers_per_block=2)))
    sd = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in sd.items()})
    assert {k.rsplit(".lora_", 1)[0] for k in sd} == ours
    # and names as they stand in shared SDXL LoRA files
    for kohya, path in [("input_blocks_4_1_transformer_blocks_0_attn1_to_q",
                         "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"),
                        ("input_blocks_1_0_in_layers_2", "down_blocks.0.resnets.0.conv1"),
                        ("input_blocks_3_0_op", "down_blocks.0.downsamplers.0.conv"),
                        ("middle_block_1_proj_in", "mid_block.attentions.0.proj_in"),
                        ("output_blocks_0_0_skip_connection", "up_blocks.0.resnets.0.conv_shortcut"),
                        ("output_blocks_2_2_conv", "up_blocks.0.upsamplers.0.conv"),
                        ("output_blocks_8_0_emb_layers_1", "up_blocks.2.resnets.2.time_emb_proj")]:
        assert by_kohya[kohya].module == path


def test_diffusers_old_names_read_as_peft(sd21_root, tmp_path):
    """diffusers' older names (processor.to_q_lora.down, lora_linear_layer) give the same updates as peft's."""
    models = ours(sd21_root)
    old, new = (lora.read(make_lora(sd21_root, fmt, tmp_path / f"{fmt}.safetensors", seed=4), models)
                for fmt in ("diffusers_old", "peft"))
    key = lambda t: (t.component, t.target.module)  # noqa: E731
    assert sorted(map(key, old)) == sorted(map(key, new)) and len(old) == 121 + 18
    new = {key(t): t for t in new}
    for t in old:
        assert torch.equal(t.down, new[key(t)].down) and torch.equal(t.up, new[key(t)].up)


def test_kohya_alpha_rule_by_hand(sd15_root, tmp_path):
    """kohya-ss scales each module by its own alpha / rank, and by 1 where a module has no alpha;
    diffusers gives such a module the file's most common alpha instead, so this is checked by hand."""
    linear = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    conv = "down_blocks.0.resnets.0.conv1"
    file = make_lora(sd15_root, "kohya", tmp_path / "alphas.safetensors", seed=5, rank=4, conv_rank=2, alpha=3,
                     conv_alpha=0.5, no_alpha=(linear,), components=("unet",))
    models = ours(sd15_root)
    terms = {t.target.module: t for t in lora.read(file, models, multiplier=0.7)}
    assert terms[linear].scale == pytest.approx(0.7)  # no alpha: alpha = rank
    assert terms[conv].scale == pytest.approx(0.7 * 0.5 / 2)
    assert terms["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q"].scale == pytest.approx(0.7 * 3 / 4)

    tensors = checkpoint.read_tensors(file)
    weights = {p: models["unet"].get_submodule(p).weight.detach().clone() for p in (linear, conv)}
    applied = lora.apply({"unet": models["unet"]}, [(file, 0.7)])
    for path, scale in ((linear, 0.7 * 1.0), (conv, 0.7 * 0.5 / 2)):
        name = "lora_unet_" + path.replace(".", "_")
        down, up = tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"]
        delta = (up.flatten(1) @ down.flatten(1)).view(weights[path].shape)  # LoCon: a 3x3 down, 1x1 up
        expected = weights[path] + scale * delta
        assert torch.allclose(models["unet"].get_submodule(path).weight, expected, rtol=0, atol=1e-6)
    applied.remove()


def test_kohya_text_keys_need_the_text_encoder(sd15_root, tmp_path):
    file = make_lora(sd15_root, "kohya", tmp_path / "a.safetensors", seed=6)
    with pytest.raises(checkpoint.CheckpointError, match=r"key lora_te_\S+ changes the text_encoder, which is not"):
        lora.read(file, {"unet": unet.from_pretrained(sd15_root)})


def test_dit_peft_lora_matches_peft(tmp_path):
    """A peft LoRA of diffusers' DiT (to_q, to_k, to_v on our fused qkv's thirds, to_out, MLP, adaLN,
    the patch embedding's conv, the final layers) loads onto ours as peft loads it onto diffusers'."""
    from diffusers import DiTTransformer2DModel
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    torch.manual_seed(0)
    ours_model = dit.DiT(dit.DiT_models["tiny-mnist"]()).eval()
    with torch.no_grad():
        for p in ours_model.parameters():  # randomize the zero-inits too
            p.normal_(0, 0.05)
    dit.save_pretrained(ours_model, tmp_path / "transformer")
    theirs = DiTTransformer2DModel.from_pretrained(tmp_path / "transformer").eval()
    names = lora.dit_modules(ours_model) + ["transformer_blocks.1.norm1.linear", "pos_embed.proj",
                                            "proj_out_1", "proj_out_2"]
    g = torch.Generator().manual_seed(1)
    tensors = {}
    for name in names:
        m = theirs.get_submodule(name)
        shape_in = (m.in_channels, *m.kernel_size) if isinstance(m, torch.nn.Conv2d) else (m.in_features,)
        out = m.out_channels if isinstance(m, torch.nn.Conv2d) else m.out_features
        tensors[f"transformer.{name}.lora_A.weight"] = torch.randn(3, *shape_in, generator=g) * 0.1
        up = torch.randn(out, 3, *[1] * (len(shape_in) - 1), generator=g)  # a 1x1 up for the conv
        tensors[f"transformer.{name}.lora_B.weight"] = up * 0.1
    # peft's scale lora_alpha / r = 2, in the metadata as diffusers writes it: prefixed for a pipeline,
    # unprefixed for a model's own save_lora_adapter, whose keys are unprefixed too
    file, unprefixed = tmp_path / "dit-lora.safetensors", tmp_path / "unprefixed.safetensors"
    config = {"r": 3, "lora_alpha": 6, "target_modules": names}
    checkpoint.save_file(tensors, file, metadata={"lora_adapter_metadata": json.dumps(
        {f"transformer.{k}": v for k, v in config.items()})})
    checkpoint.save_file({k.removeprefix("transformer."): v for k, v in tensors.items()}, unprefixed,
                         metadata={"lora_adapter_metadata": json.dumps(config)})
    a, b = (lora.read(f, {"transformer": ours_model}) for f in (file, unprefixed))
    assert {t.scale for t in a} == {2.0}
    assert [(t.target, t.scale, t.key) for t in b] == [(t.target, t.scale, t.key.removeprefix("transformer."))
                                                       for t in a]
    inject_adapter_in_model(LoraConfig(r=3, lora_alpha=6, target_modules=names), theirs)
    set_peft_model_state_dict(theirs, {k.removeprefix("transformer."): v for k, v in tensors.items()})

    x, t, y = torch.randn(2, 1, 28, 28, generator=g), torch.tensor([3, 700]), torch.tensor([1, 10])
    with torch.no_grad():
        reference = theirs(x, timestep=t, class_labels=y).sample
        base = ours_model(x, t, y)
        applied = lora.apply({"transformer": ours_model}, [(file, 1.0)], fuse=False)
        got = ours_model(x, t, y)
        applied.remove()
        assert torch.equal(ours_model(x, t, y), base)
        applied = lora.apply({"transformer": ours_model}, [(unprefixed, 1.0)], fuse=True)
        fused = ours_model(x, t, y)
        applied.remove()
        assert torch.equal(ours_model(x, t, y), base)
        applied = lora.apply({"transformer": ours_model}, [(file, 1.0)], undoable=False)  # no originals kept
        assert torch.equal(ours_model(x, t, y), fused) and not applied.originals
        with pytest.raises(checkpoint.CheckpointError, match="undoable=False"):
            applied.remove()
    assert max_rel_err(base, reference) > 1e-2
    assert max_rel_err(got, reference) < 1e-5
    assert max_rel_err(fused, got) < 1e-5


def test_trained_dit_lora_saves_and_reads_back(tmp_path):
    """attach + train + save write peft's format with the alpha in the metadata; read gives the same model."""
    torch.manual_seed(0)
    model = dit.DiT(dit.DiT_models["tiny-mnist"]()).eval()
    with torch.no_grad():
        for p in model.parameters():  # the zero-inits too: a fresh DiT's output is zero whatever its LoRA
            p.normal_(0, 0.05)
    x, t, y = torch.randn(4, 1, 28, 28), torch.tensor([10, 200, 500, 900]), torch.tensor([0, 1, 2, 10])
    with torch.no_grad():
        base = model(x, t, y)
    applied = lora.attach(model, lora.dit_modules(model), rank=2, alpha=4)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    lora.train(applied, lambda: (model(x, t, y) - 1).pow(2).mean(), steps=3, lr=1e-2)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items()), "the base changed"
    with torch.no_grad():
        trained = model(x, t, y)
    assert max_rel_err(trained, base) > 1e-4
    file = tmp_path / "lora.safetensors"
    lora.save(applied, file)
    applied.remove()
    assert "transformer.transformer_blocks.0.attn1.to_k.lora_A.weight" in checkpoint.read_tensors(file)
    with torch.no_grad():
        assert torch.equal(model(x, t, y), base)
        lora.apply({"transformer": model}, [(file, 1.0)], fuse=True)
        assert max_rel_err(model(x, t, y), trained) < 1e-5


# -----------------------------------------------------------------------------
# bad input: one line naming the key or value at fault


def test_sd15_lora_on_sdxl_names_the_key(sd15_root, sdxl_root, tmp_path):
    """Its text keys fit SDXL's first tower (both OpenAI's CLIP), its UNet keys do not: nothing is applied."""
    file = make_lora(sd15_root, "kohya", tmp_path / "sd15.safetensors", seed=7)
    models = ours(sdxl_root)
    before = {k: v.clone() for k, v in models["text_encoder"].state_dict().items()}
    with pytest.raises(checkpoint.CheckpointError) as e:
        lora.apply(models, [(file, 1.0)])
    message = str(e.value)
    assert "\n" not in message and "key lora_unet_" in message and "a LoRA of another model?" in message
    assert all(torch.equal(v, before[k]) for k, v in models["text_encoder"].state_dict().items())


def test_shape_mismatch_names_the_key(sdxl_root, tmp_path):
    """A LoRA whose module names exist in the model but whose shapes do not fit (the towers swapped)."""
    file = make_lora(sdxl_root, "kohya_sgm", tmp_path / "x.safetensors", seed=8, components=("text_encoder_2",))
    models = ours(sdxl_root)
    models["text_encoder_2"] = models["text_encoder"]
    before = {k: v.clone() for k, v in models["unet"].state_dict().items()}
    match = r"key lora_te2_\S+ has shapes down \(4, 48\).*needs down \(4, 32\)"
    with pytest.raises(checkpoint.CheckpointError, match=match):
        lora.apply(models, [(file, 1.0)])
    assert all(torch.equal(v, before[k]) for k, v in models["unet"].state_dict().items())


@pytest.mark.parametrize("content,match", [(b"not a safetensors file at all", "not a readable safetensors file"),
                                            (None, "missing")])
def test_unreadable_file(tmp_path, content, match):
    file = tmp_path / "broken.safetensors"
    if content is not None:
        file.write_bytes(content)
    with pytest.raises(checkpoint.CheckpointError, match=match):
        lora.read(file, {"transformer": dit.DiT(dit.DiT_models["tiny-mnist"]())})


def test_unsupported_tensor_names_the_key(tmp_path):
    file = tmp_path / "dora.safetensors"
    checkpoint.save_file({"lora_unet_conv_in.lora_down.weight": torch.zeros(2, 4, 3, 3),
                          "lora_unet_conv_in.lora_up.weight": torch.zeros(32, 2, 1, 1),
                          "lora_unet_conv_in.dora_scale": torch.zeros(1, 32)}, file)
    with pytest.raises(checkpoint.CheckpointError, match="key lora_unet_conv_in.dora_scale is not a LoRA tensor"):
        lora.read(file, {})


def test_parse_spec(tmp_path):
    assert lora.parse_spec("a.safetensors") == (lora.Path("a.safetensors"), 1.0)
    assert lora.parse_spec("dir/a.safetensors:0.7") == (lora.Path("dir/a.safetensors"), 0.7)
    assert lora.parse_spec("a.safetensors:-1e-1") == (lora.Path("a.safetensors"), -0.1)
    assert lora.parse_spec(r"C:\loras\a.safetensors") == (lora.Path(r"C:\loras\a.safetensors"), 1.0)
    odd = tmp_path / "style:v2.safetensors"  # a file whose name holds a colon
    shutil.copyfile(__file__, odd)
    assert lora.parse_spec(str(odd)) == (odd, 1.0)
    for bad in ("a.safetensors:strong", "a.safetensors:nan", ":0.5"):
        with pytest.raises(checkpoint.CheckpointError, match="expected FILE\\[:MULTIPLIER\\]") as e:
            lora.parse_spec(bad)
        assert "\n" not in str(e.value)


def test_tiny_finetune_lora_writes_a_peft_file(tmp_path):
    """`python tiny.py finetune --lora RANK`: the LoRA alone, in peft's names, loadable onto the teacher."""
    import tiny

    out = tmp_path / "thick-lora"
    tiny.main(tiny.parse_args(["finetune", "--lora", "2", "--steps", "2", "--batch-size", "4", "--out", str(out)]))
    file = out / "pytorch_lora_weights.safetensors"
    assert "finetune --style thick --steps 2 --batch-size 4 --lora 2" in (out / "README.md").read_text()
    tensors = checkpoint.read_tensors(file)
    teacher = tiny.load_teacher()
    assert len(tensors) == 2 * len(lora.dit_modules(teacher))
    assert tensors["transformer.transformer_blocks.3.ff.net.2.lora_A.weight"].shape == (2, 512)
    terms = lora.read(file, {"transformer": teacher})
    assert {t.scale for t in terms} == {1.0} and any(t.target.rows == slice(128, 256) for t in terms)  # to_k
    assert any(t.up.abs().max() > 0 for t in terms)  # trained: the zero-initialized ups moved
