"""Random LoRA files for the tiny pipelines, in the formats people share (test helper).

    file = make_lora(root, "kohya", tmp_path / "a.safetensors", seed=1)   # root: a tiny_pipelines folder

Formats: "peft" (diffusers' and peft's `unet.<path>.lora_A.weight`, `text_encoder.`, `text_encoder_2.`),
"kohya" (`lora_unet_<path>` in diffusers' paths, `lora_te_` / `lora_te1_` / `lora_te2_`), "kohya_sgm"
(SDXL's UNet in the original's block names, as sd-scripts trains it), "diffusers_old" (diffusers'
attention-processor names, `...attn1.processor.to_q_lora.down.weight`).

Every Linear and Conv2d of the UNet gets a LoRA (LoCon: convs with a down of their own kernel and a
1x1 up), and the attention and MLP layers of each text tower (kohya's targets), all random, up
included, so that a LoRA misplaced or mis-scaled shows. Names come from the reference models
(diffusers' UNet2DConditionModel, transformers' CLIPTextModel) and, for the original UNet, from a
table written out by hand for make_sdxl's config, never from lora.py.
"""

import json
from pathlib import Path

import torch
import torch.nn as nn
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextModel

TEXT_LAYERS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")

# make_sdxl's UNet (two levels, two resnets each, attention at level 1) in the original's block names
SGM_TINY_SDXL = {
    "conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2", "conv_out": "out.2",
    "down_blocks.0.resnets.0": "input_blocks.1.0", "down_blocks.0.resnets.1": "input_blocks.2.0",
    "down_blocks.0.downsamplers.0.conv": "input_blocks.3.0.op",
    "down_blocks.1.resnets.0": "input_blocks.4.0", "down_blocks.1.attentions.0": "input_blocks.4.1",
    "down_blocks.1.resnets.1": "input_blocks.5.0", "down_blocks.1.attentions.1": "input_blocks.5.1",
    "mid_block.resnets.0": "middle_block.0", "mid_block.attentions.0": "middle_block.1",
    "mid_block.resnets.1": "middle_block.2",
    **{f"up_blocks.0.resnets.{r}": f"output_blocks.{r}.0" for r in range(3)},
    **{f"up_blocks.0.attentions.{r}": f"output_blocks.{r}.1" for r in range(3)},
    "up_blocks.0.upsamplers.0.conv": "output_blocks.2.2.conv",
    **{f"up_blocks.1.resnets.{r}": f"output_blocks.{3 + r}.0" for r in range(3)},
}
SGM_RESNET = {"conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "conv2": "out_layers.3",
              "conv_shortcut": "skip_connection"}


def sgm(path):
    """A diffusers module path of make_sdxl's UNet in the original's names."""
    for head in sorted(SGM_TINY_SDXL, key=len, reverse=True):
        if path == head or path.startswith(head + "."):
            rest = path[len(head) + 1:]
            if ".resnets." in head:
                rest = SGM_RESNET[rest]
            return SGM_TINY_SDXL[head] + ("." + rest if rest else "")
    raise KeyError(path)


def modules(root):
    """{component: {module path: nn.Linear or nn.Conv2d}} of a tiny pipeline, as the reference models name them."""
    root = Path(root)
    found = {"unet": {n: m for n, m in UNet2DConditionModel.from_pretrained(root / "unet").named_modules()
                      if isinstance(m, (nn.Linear, nn.Conv2d))}}
    for component in ("text_encoder", "text_encoder_2"):
        if (root / component).is_dir():
            model = CLIPTextModel.from_pretrained(root / component)
            layers = model.config.num_hidden_layers
            # the hub's files say text_model.encoder...: transformers 5 nests no text_model, so it is put back
            found[component] = {f"text_model.encoder.layers.{i}.{n}": model.get_submodule(f"encoder.layers.{i}.{n}")
                                for i in range(layers) for n in TEXT_LAYERS}
    return found


def random_factors(module, rank, g):
    """(down, up) of a random LoRA of `module`: LoCon's for a conv (down of its kernel, 1x1 up)."""
    if isinstance(module, nn.Conv2d):
        down = torch.randn(rank, module.in_channels, *module.kernel_size, generator=g)
        up = torch.randn(module.out_channels, rank, 1, 1, generator=g)
        fan_in = module.in_channels * module.kernel_size[0] * module.kernel_size[1]
    else:
        down = torch.randn(rank, module.in_features, generator=g)
        up = torch.randn(module.out_features, rank, generator=g)
        fan_in = module.in_features
    return down / fan_in**0.5, up * 0.3 / rank**0.5  # a change of a few tenths of the weights' size


def make_lora(root, fmt, file, seed=0, rank=4, conv_rank=None, alpha=None, conv_alpha=None, no_alpha=(),
              components=("unet", "text_encoder", "text_encoder_2"), skip=()):
    """Write a random LoRA of the pipeline at `root` in format `fmt` to `file`; returns the file.

    kohya: alpha / conv_alpha are written per module (none if None, and none for the module paths in
    `no_alpha`); peft: one alpha for all modules, in diffusers' lora_adapter_metadata. Module paths
    in `skip` (or starting with one of them) get no LoRA.
    """
    g = torch.Generator().manual_seed(seed)
    tensors, alphas = {}, {}
    for component, found in modules(root).items():
        if component not in components:
            continue
        for path, module in found.items():
            if any(path == s or path.startswith(s + ".") for s in skip):
                continue
            is_conv = isinstance(module, nn.Conv2d)
            r = conv_rank if is_conv and conv_rank else rank
            down, up = random_factors(module, r, g)
            a = None if path in no_alpha else (conv_alpha if is_conv and conv_alpha is not None else alpha)
            write(tensors, fmt, component, path, down, up, a)
            alphas[component] = a
    metadata = {"format": "pt"}
    if fmt == "peft" and alpha is not None:  # diffusers' save_lora_weights(..., unet_lora_adapter_metadata=...)
        config = {}
        for component in alphas:
            # the paths peft finds in the models diffusers loads (transformers 5's towers nest no text_model)
            targets = sorted({k.split(".", 1)[1].rsplit(".lora_", 1)[0].removeprefix("text_model.") for k in tensors
                              if k.startswith(component + ".")})
            config.update({f"{component}.r": rank, f"{component}.lora_alpha": alpha,
                           f"{component}.target_modules": targets})
        metadata["lora_adapter_metadata"] = json.dumps(config)
    Path(file).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(file), metadata=metadata)
    return Path(file)


KOHYA = {"unet": "lora_unet", "text_encoder": "lora_te", "text_encoder_2": "lora_te2"}


def write(tensors, fmt, component, path, down, up, alpha):
    """Put one module's LoRA into `tensors` under the names of `fmt`."""
    if fmt in ("kohya", "kohya_sgm"):
        prefix = KOHYA[component]
        if component == "text_encoder" and fmt == "kohya_sgm":
            prefix = "lora_te1"  # SDXL's: its towers are te1 and te2
        name = sgm(path) if fmt == "kohya_sgm" and component == "unet" else path
        name = f"{prefix}_{name.replace('.', '_')}"
        tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"] = down, up
        if alpha is not None:
            tensors[f"{name}.alpha"] = torch.tensor(float(alpha))
    elif fmt == "peft":
        tensors[f"{component}.{path}.lora_A.weight"], tensors[f"{component}.{path}.lora_B.weight"] = down, up
    elif fmt == "diffusers_old":  # attention layers by processor name, the rest as LoRACompatibleLinear / Conv
        head, _, last = path.removesuffix(".0").rpartition(".")  # to_out.0 -> to_out
        if component == "unet" and last in ("to_q", "to_k", "to_v", "to_out"):
            name = f"{component}.{head}.processor.{last}_lora"
        elif component != "unet" and last in ("q_proj", "k_proj", "v_proj", "out_proj"):
            name = f"{component}.{head}.to_{last.removesuffix('_proj')}_lora"
        else:
            name = f"{component}.{path}." + ("lora" if component == "unet" else "lora_linear_layer")
        tensors[f"{name}.down.weight"], tensors[f"{name}.up.weight"] = down, up
    else:
        raise ValueError(fmt)
