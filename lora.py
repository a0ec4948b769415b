"""LoRA files as people share them (Hu et al. 2021, arXiv 2106.09685), on this library's models.

A LoRA changes the weight W (out, in[, kh, kw]) of a Linear or Conv2d by a low-rank product:

    W' = W + multiplier * scale * up @ down      # down (r, in[, kh, kw]), up (out, r[, 1, 1])

with scale = alpha / r per module, as kohya-ss's loader has it (no alpha, or alpha 0: alpha = r).
Two families of files are read into one list of such updates (`Term`s):
- kohya-ss's (sd-scripts; most shared files): `lora_unet_<path>`, `lora_te_<path>` (SD 1 / 2),
  `lora_te1_` / `lora_te2_` (SDXL): a module's path with "." written "_", then `.lora_down.weight`,
  `.lora_up.weight`, `.alpha`. SDXL's are named after the original (sgm) UNet's modules
  (`input_blocks_4_1_...`, `sgm_names`), or after diffusers'; a LoCon conv has a down of the conv's
  own kernel and a 1x1 up.
- diffusers' and peft's: `unet.<path>.lora_A.weight` / `.lora_B.weight`, `text_encoder.`,
  `text_encoder_2.`, `transformer.` (a DiT in diffusers' names: `attn1.to_q` is the first third of
  our fused qkv), scaled by the file's `lora_adapter_metadata` (peft's lora_alpha, alpha_pattern)
  or else 1; and diffusers' older names (`...attn1.processor.to_q_lora.down.weight`, `...lora.down.weight`).

    specs = [lora.parse_spec("style.safetensors:0.7"), lora.parse_spec("detail.safetensors")]
    applied = lora.apply(dict(unet=model, text_encoder=te), specs)   # fused (default), or fuse=False
    ...                                                             # the models are the LoRA'd ones now
    applied.remove()                                                # the original weights, bit for bit

Fused, a LoRA costs nothing per step; the original weights are kept (on the CPU, where memory is
less scarce than on an accelerator) and copied back by `remove`, because subtracting the update
again would not give back the same bits (`undoable=False` keeps none). At run time (fuse=False) a
forward hook on each changed module adds scale * up(down(x)): no copy of any weight, two thin
products per module and call, and the LoRA's tensors can be trained (`attach`, `train`, `save`).
Hooks rather than wrapper modules: the model's modules and state_dict keys stay as they are, so
adapters.attach, saving and strict loading see the same model, and gradient checkpointing reruns a
hook with its module.
"""

import argparse
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import checkpoint
import dit
import text_encoders
import unet

Error = checkpoint.CheckpointError  # every bad input is one, with a one-line message the CLIs print

# -----------------------------------------------------------------------------
# "FILE[:MULTIPLIER]", as the CLIs take it


def parse_spec(text):
    """"FILE[:MULTIPLIER]" -> (Path, multiplier); the multiplier defaults to 1.0."""
    text = str(text)
    if Path(text).expanduser().is_file():  # a file whose name holds a colon
        return Path(text).expanduser(), 1.0
    head, colon, tail = text.rpartition(":")
    if not colon or "/" in tail or "\\" in tail:  # no multiplier (a Windows drive's colon is followed by a path)
        return Path(text).expanduser(), 1.0
    try:
        multiplier = float(tail)
    except ValueError:
        multiplier = math.nan
    if not math.isfinite(multiplier) or not head:
        raise Error(f"LoRA {text!r}: expected FILE[:MULTIPLIER] with a number as the multiplier "
                    f"(e.g. style.safetensors:0.8), got {'no file' if not head else repr(tail)}")
    return Path(head).expanduser(), multiplier


def spec_argument(text):
    """parse_spec as an argparse `type`: a bad spec becomes the parser's own one-line error, naming it."""
    try:
        return parse_spec(text)
    except Error as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def check_files(loras):
    """Each LoRA file's header read: a missing, truncated or corrupt file fails before any model loads."""
    for file, _ in loras:
        if Path(file).is_dir():
            raise Error(f"{file}: a folder; expected a LoRA .safetensors file")
        checkpoint.read_metadata(file)


def record(loras):
    """The LoRAs [(file, multiplier), ...] as JSON, for the metadata of what is made with them (adapters files):
    each file as given, its multiplier and its sha256, which names it wherever it is moved."""
    return json.dumps([{"file": str(file), "multiplier": multiplier, "sha256": _sha256(file)}
                       for file, multiplier in loras])


def _sha256(file):
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# -----------------------------------------------------------------------------
# the names a LoRA file may give our modules


@dataclass(frozen=True)
class Target:
    """A module of ours that a LoRA may change, and the rows of its weight that it changes."""

    module: str  # path of a Linear or Conv2d
    rows: slice | None = None  # None: all; a DiT's to_q: the first third of its qkv


# a diffusers ResnetBlock2D's layers -> the original ResBlock's (sgm / LDM: in_layers = norm, SiLU, conv)
_RESNET_SGM = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def sgm_names(config):
    """Our UNet's block paths -> the original (sgm / LDM) UNet's, after which kohya-ss names SDXL's LoRAs.

    The original numbers its blocks in one sequence each way, as the skips run: input_blocks.0 is
    conv_in, then every resnet (with its transformer as .1) and downsampler (.0.op); output_blocks
    likewise, a level's upsampler after its last resnet and transformer (Rombach et al. 2022's
    openaimodel.py, which diffusers' convert_original_stable_diffusion_to_diffusers reads).
    """
    n = len(config.block_out_channels)
    layers = unet.per_level(config.layers_per_block, n)
    names = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
             "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
             "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2",
             "mid_block.resnets.0": "middle_block.0", "mid_block.attentions.0": "middle_block.1",
             "mid_block.resnets.1": "middle_block.2"}
    k = 1
    for i in range(n):
        for j in range(layers[i]):
            names[f"down_blocks.{i}.resnets.{j}"] = f"input_blocks.{k}.0"
            names[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{k}.1"
            k += 1
        if i < n - 1:
            names[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{k}.0.op"
            k += 1
    k = 0
    for j, i in enumerate(reversed(range(n))):  # the j-th up block works at level i, with one more resnet
        for r in range(layers[i] + 1):
            names[f"up_blocks.{j}.resnets.{r}"] = f"output_blocks.{k}.0"
            names[f"up_blocks.{j}.attentions.{r}"] = f"output_blocks.{k}.1"
            k += 1
        if i > 0:  # after the transformer where the level attends
            slot = 2 if config.up_block_types[j] == "CrossAttnUpBlock2D" else 1
            names[f"up_blocks.{j}.upsamplers.0.conv"] = f"output_blocks.{k - 1}.{slot}.conv"
    return names


def _sgm_name(path, names):
    """A module path of our UNet in the original's names, or None."""
    parts = path.split(".")
    for cut in range(min(5, len(parts)), 0, -1):  # the longest block path first
        head, rest = ".".join(parts[:cut]), parts[cut:]
        if head in names:
            if ".resnets." in head and rest:
                rest = [_RESNET_SGM.get(rest[0], rest[0])] + rest[1:]
            return ".".join([names[head]] + rest)
    return None


def _dit_names(model):
    """diffusers' DiT names -> Targets in ours (dit.from_diffusers maps the weights the same way)."""
    D, out = model.config.hidden_size, {}
    for ours, theirs in dit._TOP_KEYS.items():
        out[theirs] = Target(ours)
    for i in range(model.config.depth):
        for ours, theirs in dit._BLOCK_KEYS.items():
            out[f"transformer_blocks.{i}.{theirs}"] = Target(f"blocks.{i}.{ours}")
        for j, n in enumerate("qkv"):  # diffusers' to_q, to_k, to_v are the thirds of our qkv, in this order
            out[f"transformer_blocks.{i}.attn1.to_{n}"] = Target(f"blocks.{i}.attn.qkv", slice(j * D, (j + 1) * D))
    return out


def targets(model):
    """Every name a LoRA file may give a Linear or Conv2d of `model` -> its Target: ours, and the reference's."""
    ours = {name: Target(name) for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    if isinstance(model, unet.UNet):  # diffusers' names are ours; kohya's SDXL files use the original's
        names = sgm_names(model.config)
        return {**ours, **{_sgm_name(p, names): t for p, t in ours.items() if _sgm_name(p, names)}}
    if isinstance(model, text_encoders.TextEncoder):  # transformers 5 drops the text_model. prefix
        return {**ours, **{p.removeprefix("text_model."): t for p, t in ours.items() if p.startswith("text_model.")}}
    if isinstance(model, dit.DiT):
        return {**ours, **_dit_names(model)}
    return ours


def _flat(names):
    """kohya-ss's spelling of names ("." written "_") -> Targets; a spelling two modules share fits neither."""
    out = {}
    for name, target in names.items():
        key = name.replace(".", "_")
        out[key] = target if out.get(key, target) == target else None
    return out


# -----------------------------------------------------------------------------
# reading a file


@dataclass
class Term:
    """One low-rank update of one module's weight."""

    component: str  # the model it changes: "unet", "text_encoder", "text_encoder_2", "transformer"
    name: str  # the module's name in the file, less its prefix (kohya's: "_" for ".")
    target: Target  # the module of ours, and its rows
    down: torch.Tensor  # (r, in[, kh, kw])
    up: torch.Tensor  # (rows, r[, 1, 1])
    scale: float  # multiplier * alpha / r
    key: str  # the file's key of `down`, for messages


KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                  "lora_te2_": "text_encoder_2"}
KOHYA_ROLES = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "transformer")  # diffusers' pipeline names: the prefixes
# the end of a diffusers / peft key -> its tensor's role; peft's names first, then diffusers' older ones
PEFT_ROLES = ((".lora_A.weight", "down"), (".lora_B.weight", "up"), (".lora.down.weight", "down"),
              (".lora.up.weight", "up"), (".lora_linear_layer.down.weight", "down"),
              (".lora_linear_layer.up.weight", "up"), ("_lora.down.weight", "down"), ("_lora.up.weight", "up"),
              (".alpha", "alpha"))
# diffusers' attention-processor LoRAs (before 0.21): ...attn1.processor.to_out_lora -> the module it changes
OLD_NAMES = {"unet": {"to_out": "to_out.0"}, "text": {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj",
                                                       "to_out": "out_proj"}}


def _parse_key(key):
    """A file's key -> (component, module name, kohya's flat spelling?, role).

    component None: the key has no prefix (diffusers' oldest files, and a model's own save_lora_adapter);
    role None: not a LoRA tensor.
    """
    for prefix, component in KOHYA_PREFIXES.items():
        if key.startswith(prefix):
            name, _, rest = key[len(prefix):].partition(".")
            return component, name, True, KOHYA_ROLES.get(rest)
    component, _, rest = key.partition(".")
    if component not in COMPONENTS:
        component, rest = None, key
    rest = rest.replace(".processor.", ".")
    for end, role in PEFT_ROLES:
        if rest.endswith(end):
            name = rest[: -len(end)]
            if end.startswith("_lora."):
                head, _, last = name.rpartition(".")
                last = OLD_NAMES["text" if component in ("text_encoder", "text_encoder_2") else "unet"].get(last, last)
                name = f"{head}.{last}"
            return component, name, False, role
    return component, rest, False, None


def _peft_configs(metadata, file):
    """{component or None: peft LoraConfig fields} from the metadata diffusers writes beside peft weights."""
    text = metadata.get("lora_adapter_metadata")
    if not text:
        return {}
    try:
        config = json.loads(text)
    except json.JSONDecodeError as e:
        raise Error(f"{file}: metadata lora_adapter_metadata is not valid JSON ({e})") from None
    out = {}
    for key, value in config.items():  # a pipeline's are prefixed "unet.lora_alpha"; a model's own are not
        component, dot, field = key.partition(".")
        if dot and component in COMPONENTS:
            out.setdefault(component, {})[field] = value
        else:
            out.setdefault(None, {})[key] = value
    return out


def _peft_alpha(config, name):
    """peft's alpha for a module name: its alpha_pattern entry (a name or a dotted suffix of it), else lora_alpha."""
    for pattern, alpha in config.get("alpha_pattern", {}).items():
        if name == pattern or name.endswith("." + pattern):
            return alpha
    return config.get("lora_alpha")


def _trim(shape):
    """A shape without trailing 1s past its second dimension: a 1x1 conv and a linear map are one map."""
    shape = list(shape)
    while len(shape) > 2 and shape[-1] == 1:
        shape.pop()
    return tuple(shape)


def read(file, models, multiplier=1.0):
    """The Terms of one LoRA file on `models` ({"unet": ..., "text_encoder": ...}), each checked against its module.

    Raises Error, naming the first key that fits no module, or fits one in shape only after a
    reshape that would change its meaning, and files that are not LoRAs of these models.
    """
    file = Path(file)
    check_files([(file, multiplier)])
    tensors = checkpoint.read_tensors(file)  # one-line errors for a missing, truncated or corrupt file
    if not tensors:
        raise Error(f"{file}: holds no tensors (expected a LoRA)")
    configs = _peft_configs(checkpoint.read_metadata(file), file)
    models = {c: m for c, m in models.items() if m is not None}
    names = {c: targets(m) for c, m in models.items()}
    flat = {c: _flat(t) for c, t in names.items()}

    # unprefixed keys are the one model's, if one is given, else the UNet's (diffusers' attention processors)
    alone = next(iter(models)) if len(models) == 1 else "unet"
    groups = {}  # (component, name, flat) -> {role: (key, tensor)}
    for key, tensor in tensors.items():
        component, name, is_flat, role = _parse_key(key)
        component = component or alone
        if role is None:
            raise Error(f"{file}: key {key} is not a LoRA tensor this reader knows (plain LoRA and LoCon only: "
                        "lora_down / lora_up / alpha, lora_A / lora_B; not DoRA, LoHa, LoKr or LoCon's lora_mid)")
        groups.setdefault((component, name, is_flat), {})[role] = (key, tensor)

    terms = []
    for (component, name, is_flat), parts in groups.items():
        key = next(iter(parts.values()))[0]
        for role in ("down", "up"):
            if role not in parts:
                raise Error(f"{file}: key {key} has no {role} weight beside it")
        if component not in models:
            raise Error(f"{file}: key {key} changes the {component}, which is not among the models given "
                        f"({', '.join(models)})")
        target = (flat if is_flat else names)[component].get(name)
        if target is None:
            hint = (" (dit.py shares one timestep / class embedder; diffusers keeps a copy per block)"
                    if ".norm1.emb." in name else " (a LoRA of another model?)")
            raise Error(f"{file}: key {key} names no module of the {component}{hint}")
        (key, down), (_, up) = parts["down"], parts["up"]
        weight = models[component].get_submodule(target.module).weight
        r = down.shape[0]
        rows = weight.shape[0] if target.rows is None else target.rows.stop - target.rows.start
        want_down, want_up = (r, *weight.shape[1:]), (rows, r, *[1] * (weight.ndim - 2))
        if _trim(down.shape) != _trim(want_down) or _trim(up.shape) != _trim(want_up):
            raise Error(f"{file}: key {key} has shapes down {tuple(down.shape)}, up {tuple(up.shape)}; "
                        f"{component} module {target.module} needs down {want_down}, up {want_up} "
                        "(a LoRA of another model?)")
        config = configs.get(component) or configs.get(None) or {}
        if config.get("use_dora"):
            raise Error(f"{file}: key {key} is part of a DoRA (metadata use_dora); plain LoRAs only")
        if "alpha" in parts:  # kohya's: alpha 0 means alpha = r, as its LoRAModule reads it
            alpha = parts["alpha"][1].float()
            if alpha.numel() != 1:
                raise Error(f"{file}: key {parts['alpha'][0]} has shape {tuple(alpha.shape)}, expected one number")
            alpha = alpha.item() or r
        else:
            alpha = _peft_alpha(config, name) or r
        scale = alpha / (math.sqrt(r) if config.get("use_rslora") else r)  # rsLoRA (Kalajdzievski 2023)
        terms.append(Term(component, name, target, down.reshape(want_down), up.reshape(want_up),
                          multiplier * scale, key))
    return terms


# -----------------------------------------------------------------------------
# applying: fused into the weights, or at run time


class LowRank(nn.Module):
    """scale * up(down(x)) in the output rows of one module: a LoRA of it, at run time."""

    def __init__(self, module, term):
        super().__init__()
        w = module.weight
        self.down = nn.Parameter(term.down.to(w.device, w.dtype), requires_grad=False)  # (r, in[, kh, kw])
        self.up = nn.Parameter(term.up.to(w.device, w.dtype), requires_grad=False)  # (rows, r[, 1, 1])
        self.scale, self.rows, self.out_rows = term.scale, term.target.rows, w.shape[0]
        self.conv = None
        if isinstance(module, nn.Conv2d):  # LoCon: the down has the conv's kernel, stride and padding
            self.conv = dict(stride=module.stride, padding=module.padding, dilation=module.dilation)

    def forward(self, x):
        if self.conv is None:
            h = F.linear(F.linear(x, self.down), self.up)  # (..., in) -> (..., r) -> (..., rows)
        else:
            h = F.conv2d(F.conv2d(x, self.down, **self.conv), self.up)  # (B, in, H, W) -> (B, rows, H', W')
        if self.rows is not None:  # zeros in the rows left alone (a DiT's k and v beside its q); Linear only
            h = F.pad(h, (self.rows.start, self.out_rows - self.rows.stop))  # (..., out)
        return self.scale * h


def _adds(layers):
    """A forward hook adding the layers' outputs on the module's input to the module's output."""

    def hook(module, args, out):
        for layer in layers:
            out = out + layer(args[0])
        return out

    return hook


class Applied(nn.Module):
    """LoRAs applied to models by `apply` (or `attach`); `remove()` gives the models back as they were.

    At run time its parameters are the LoRAs' tensors; fused, it holds the original weights.
    """

    def __init__(self, models, terms, fuse, undoable=True):
        super().__init__()
        self.fused, self.terms, self.undoable = fuse, terms, undoable
        self.models = dict(models)  # a plain dict: the models are not this module's submodules
        self.originals = {}  # (component, module path) -> the weight before fusing, on the CPU
        self.layers = nn.ModuleList()
        self.hooks = []
        by_module = {}
        for term in terms:
            by_module.setdefault((term.component, term.target.module), []).append(term)
        for (component, path), group in by_module.items():
            module = self.models[component].get_submodule(path)
            if fuse:
                self._fuse(component, path, module, group)
            else:
                layers = [LowRank(module, t) for t in group]
                self.layers.extend(layers)
                self.hooks.append(module.register_forward_hook(_adds(layers)))

    @torch.no_grad()
    def _fuse(self, component, path, module, terms):
        """W += sum of scale * up @ down, in fp32, cast back once (as peft's merge on half weights)."""
        w = module.weight
        delta = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
        for t in terms:
            d = t.up.to(w.device, torch.float32).flatten(1) @ t.down.to(w.device, torch.float32).flatten(1)
            delta[t.target.rows or slice(None)] += t.scale * d.view(-1, *w.shape[1:])  # (rows, in[, kh, kw])
        if self.undoable:
            self.originals[component, path] = w.detach().to("cpu", copy=True)
        w.copy_((w.float() + delta).to(w.dtype))

    @torch.no_grad()
    def remove(self):
        """Undo: the original weights copied back (bit for bit), or the hooks removed. Undo the last applied first."""
        if self.fused and not self.undoable:
            raise Error("LoRA fused with undoable=False: the original weights were not kept")
        for (component, path), original in self.originals.items():
            self.models[component].get_submodule(path).weight.copy_(original)
        for hook in self.hooks:
            hook.remove()
        self.originals, self.hooks = {}, []


def apply(models, loras, fuse=True, undoable=True):
    """LoRA files [(file, multiplier), ...] on models {"unet": ..., "text_encoder": ..., ...}: the Applied handle.

    Every file is read and checked before any weight changes, so a bad one leaves the models as they were.
    Fused with undoable=False, the original weights are not kept (a LoRA on all of SDXL's attention and
    MLP layers would keep 4 GiB of bf16 weights): for a process that never removes it.
    """
    terms = [t for file, multiplier in loras for t in read(file, models, multiplier)]
    return Applied({c: m for c, m in models.items() if m is not None}, terms, fuse, undoable)


# -----------------------------------------------------------------------------
# training a LoRA of a model, and saving it as peft does

# what peft LoRAs of a DiT usually change, in diffusers' names: attention and MLP of every block
DIT_MODULES = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ff.net.0.proj", "ff.net.2")


def dit_modules(model):
    """The names of DIT_MODULES in every block of a DiT, as a LoRA file gives them."""
    return [f"transformer_blocks.{i}.{n}" for i in range(model.config.depth) for n in DIT_MODULES]


def attach(model, names, rank, component="transformer", alpha=None, seed=0):
    """Fresh trainable LoRAs of `rank` on the modules `names` (a file's names) of `model`, at run time.

    Initialized as Hu et al. (2021, sec. 4.1): down random (Kaiming-uniform, as nn.Linear and peft),
    up zero, so the LoRA'd model starts as the model. alpha defaults to the rank: scale 1.
    """
    table, g = targets(model), torch.Generator().manual_seed(seed)
    alpha = alpha or rank
    terms = []
    for name in names:
        if name not in table:
            raise Error(f"attach: {name} names no module of the {component}")
        target = table[name]
        w = model.get_submodule(target.module).weight
        rows = w.shape[0] if target.rows is None else target.rows.stop - target.rows.start
        down = nn.init.kaiming_uniform_(torch.empty(rank, *w.shape[1:]), a=math.sqrt(5), generator=g)
        up = torch.zeros(rows, rank, *[1] * (w.ndim - 2))  # zero-init: no change at first
        terms.append(Term(component, name, target, down, up, alpha / rank, key=name))
    applied = Applied({component: model}, terms, fuse=False)
    return applied.requires_grad_(True)


def train(applied, loss, steps, lr=1e-3, desc="LoRA"):
    """AdamW on a run-time LoRA's tensors alone; `loss()` is a batch's loss with it applied.

    Warm-up over 5 % of the steps then cosine decay (OneCycleLR), gradient norm clipped at 1, as
    tiny.train_teacher. Gradients are taken with respect to the LoRA's tensors only, so the model's
    own parameters need not be frozen and are never changed.
    """
    params = list(applied.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    # warm-up over 1.5 steps at least: OneCycleLR divides by their number less one, and by the rest
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=max(0.05, 1.5 / steps))
    bar = tqdm(range(steps), desc=desc)
    for step in bar:
        value = loss()
        for p, grad in zip(params, torch.autograd.grad(value, params)):
            p.grad = grad
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{value.item():.4f}")
    return applied


def save(applied, file):
    """A LoRA made by `attach` in peft's format as diffusers writes it: `<component>.<name>.lora_A.weight` /
    `.lora_B.weight`, with r and lora_alpha in the metadata (lora_adapter_metadata)."""
    tensors, config = {}, {}
    for t, layer in zip(applied.terms, applied.layers):
        r = t.down.shape[0]
        seen = config.setdefault(t.component, (r, t.scale))
        if seen != (r, t.scale):
            raise Error(f"save: {t.name} has rank {r} and scale {t.scale}, others of the {t.component} "
                        f"{seen[0]} and {seen[1]} (one rank and alpha per component)")
        tensors[f"{t.component}.{t.name}.lora_A.weight"] = layer.down
        tensors[f"{t.component}.{t.name}.lora_B.weight"] = layer.up
    metadata = {}
    for c, (r, scale) in config.items():
        names = sorted(t.name for t in applied.terms if t.component == c)
        metadata.update({f"{c}.r": r, f"{c}.lora_alpha": scale * r, f"{c}.target_modules": names})
    checkpoint.save_file(tensors, file, metadata={"format": "pt", "lora_adapter_metadata": json.dumps(metadata)})
