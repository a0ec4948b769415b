"""Guidance-conditioned adapters: Adapter Guidance Distillation (Jensen & Sadat, TMLR 2025).

Classifier-free guidance runs the denoiser twice per step. AGD keeps the base model frozen and
attaches a small adapter beside each of its attention blocks (DiT: every block's self-attention
`attn`; SD UNets: every transformer block's cross-attention `attn2`), conditioned on the guidance
scale w, and trains the adapters so that one pass at w gives what CFG gives at w:

    student = adapters.attach(model, hidden_dim=256)   # base weights shared and frozen
    out = student(x, t, w=w, **cond)                   # one pass ~ uncond + w (cond - uncond)
    with student.condition(w=w, t=t, **cond):          # the explicit scope a training step needs
        loss = mse(model(x, t, **cond), target); loss.backward()
    student.enabled = False                            # exactly model(x, t, **cond) again
    student.save("agd.safetensors"); student = adapters.load(model, "agd.safetensors")

Each adapter reads the hidden states entering the module it sits beside (its "site") and adds its
output to that module's output. Its output projection starts at zero, so a freshly attached student
is the conditional base model exactly. Two architectures, as in the official code:
- "cross_attention": the hidden states attend to a few condition tokens (w, and optionally the
  timestep, the class, the prompt tokens), each embedded to `hidden_dim`;
- "additive": the condition embeddings are summed and mapped by an MLP to one vector per sample,
  added to every token.

Ours, not the paper's: `modulation=True` also puts an additive adapter on every adaLN modulation
of a DiT (each block's shift / scale / gate and the final layer's shift / scale): the class reaches
a DiT only through these vectors, and guidance amplifies the class. An adapter there moves them by
a (w, t, y)-dependent amount, as guidance-distilled models take w beside t in their conditioning
(Meng et al. 2023). On the tiny teacher, four blocks deep, adapters beside attention alone recover
about half of the CFG correction; with the modulation adapters, about nine tenths (README).

Where adapters sit is declared per model family (families.py: `sites`), never guessed. The model
file knows nothing of them: they are forward hooks on their sites, and they act only inside an
explicit scope, `with student.condition(...)`, which holds the condition (w, t, class, prompt) of
that call. Outside every scope the base model is the base model, with gradients on or off, at any
batch size; a teacher and a student can share one base. Gradient checkpointing re-runs blocks (and
so the hooks) during the backward pass: call backward inside the scope, as above (outside it,
torch's checkpoint raises, since the recomputation would differ).

`Attachment` is that mechanism on its own, for whatever else sits beside a base model's modules
and takes a condition of its own per call (ip_adapter.py's image attention is another), and
`call_with` composes several around one base call.

Letters in shape comments: B batch, T tokens, D the site's width, S condition tokens, h hidden_dim.
"""

import json
import math
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

import checkpoint
import hub

FORMAT = "agd-adapters/1"  # metadata tag of the saved file

# -----------------------------------------------------------------------------
# where adapters sit


@dataclass(frozen=True)
class Site:
    """A module of the base model that an adapter sits beside; families.py lists them per model family."""
    name: str  # the module's path in the model, e.g. "blocks.3.attn"
    kind: str  # "tokens": its first input is (B, T, in_dim) tokens and its output (B, T, out_dim);
    #            "vector": its first input is one (B, in_dim) vector per sample and its output (B, out_dim)
    in_dim: int
    out_dim: int


class Attachment(nn.Module):
    """Modules beside sites of a frozen base model, as forward hooks that act only inside `condition()`.

    A subclass builds its modules, calls `_hook_sites()`, and defines `prepare(**condition)` (what a
    scope holds) and `output(i, module, args, output, condition)` (site i's new output). `keys` names
    the entries of a call's cond that it takes for itself (see call_with).
    """

    keys = ()

    def __init__(self, model, sites):
        super().__init__()
        modules = dict(model.named_modules())
        missing = [s.name for s in sites if s.name not in modules]
        if missing:
            raise ValueError(f"{type(model).__name__} has no module {missing[0]!r} to attach to")
        self.model = model.requires_grad_(False)  # frozen; its weights are shared, never copied
        self.sites = list(sites)
        self.enabled = True
        self._condition = None  # set only inside `condition()`
        self._hooks = []

    def _hook_sites(self):
        modules = dict(self.model.named_modules())
        self._hooks = [modules[s.name].register_forward_hook(self._hook(i)) for i, s in enumerate(self.sites)]

    def _hook(self, i):
        def hook(module, args, output):
            if not self.enabled or self._condition is None:
                return None  # the base model's output, untouched
            return self.output(i, module, args, output, self._condition)

        return hook

    @contextmanager
    def condition(self, **condition):
        """The scope in which calls of the base model see this condition; scopes nest."""
        prepared = self.prepare(**condition)
        previous, self._condition = self._condition, prepared
        try:
            yield self
        finally:
            self._condition = previous

    @contextmanager
    def disabled(self):
        """`with student.disabled():` the base model, also inside a scope."""
        enabled, self.enabled = self.enabled, False
        try:
            yield self
        finally:
            self.enabled = enabled

    def detach(self):
        """Remove the hooks: the base model is left exactly as it was before attaching."""
        for h in self._hooks:
            h.remove()
        self._hooks = []


def call_with(model, *attachments):
    """The call model(x, t, **cond) with attachments beside it, each conditioned in its own scope.

    Each attachment takes its `keys` out of cond and also sees the rest (the class, the prompt);
    the base model gets what is left. CFG batches such a call as any other (guidance.guided).
    """
    def call(x, t, **cond):
        own = {k: cond.pop(k) for a in attachments for k in a.keys if k in cond}
        with ExitStack() as scopes:
            for a in attachments:
                scopes.enter_context(a.condition(t=t, **{k: own[k] for k in a.keys if k in own}, **cond))
            return model(x, t, **cond)

    return call


# -----------------------------------------------------------------------------
# options


@dataclass
class AdapterConfig:
    arch: str = "cross_attention"  # "cross_attention" (official default) or "additive"
    hidden_dim: int = 256  # h: width of the condition tokens and of the attention (paper, DiT-XL/2)
    num_heads: int = 1  # of the adapter's cross-attention
    mlp_ratio: float = 4.0  # of the MLPs that embed scalars (w, t) after their Fourier features
    w_scale: float = 1.0  # w is multiplied by it before its Fourier features (the official code's cfg_mult:
    #                       1000 for its additive adapter on DiT; 1 for its cross-attention adapter)
    use_timestep: bool = False  # also condition on t (scaled by 1 / num_train_timesteps)
    num_classes: int = 0  # > 0: also condition on the class label `y` (DiT; includes the null class)
    prompt_dim: int = 0  # > 0: also condition on the prompt tokens `context` of this width (SD)
    negative_classes: int = 0  # > 0: also condition on the negative class (DiT; the null class: no negative)
    negative_prompt_dim: int = 0  # > 0: also condition on the negative prompt's tokens of this width (SD)
    modulation: bool = False  # ours: also an additive adapter on every `adaLN_modulation` (DiT; see above)
    zero_at_w1: bool = False  # ours, not the official code's: scale the adapters' output by (w - 1), so that
    #                           at w = 1 the student is the conditional model exactly, as CFG is, and small
    #                           w, whose corrections are too small for the MSE to notice, follow linearly
    num_train_timesteps: int = 1000


# -----------------------------------------------------------------------------
# building blocks


class FourierFeatures(nn.Module):
    """Random Fourier features cos(2 pi (f s + phase)) of a scalar s (Tancik et al. 2020)."""

    def __init__(self, dim):
        super().__init__()
        # Random but saved with the adapters: they are part of the trained function.
        self.register_buffer("frequencies", torch.randn(dim))
        self.register_buffer("phases", torch.rand(dim))

    def forward(self, s):  # in fp32 whatever the adapters' dtype: the phases of large frequencies need it
        phase = s.float()[:, None] * self.frequencies.float() + self.phases.float()
        return torch.cos(2 * math.pi * phase).to(self.frequencies.dtype)  # (B,) -> (B, h)


class ScalarEmbedder(nn.Module):
    """A scalar per sample -> Fourier features -> MLP -> LayerNorm, as the official adapters embed w."""

    def __init__(self, dim, mlp_ratio):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.fourier = FourierFeatures(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, s):
        return self.norm(self.fc2(F.relu(self.fc1(self.fourier(s)))))  # (B,) -> (B, h)


def token_positions(n, dim):
    """Sinusoidal positions that tell the condition tokens apart (w is token 0, t token 1, ...)."""
    pos = torch.arange(n, dtype=torch.float32)[:, None]
    freqs = torch.exp(-math.log(10000.0) * torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    return torch.cat([torch.sin(pos * freqs), torch.cos(pos * freqs)], dim=1)  # (n, h)


class ConditionEmbedder(nn.Module):
    """(w, t, y, context, and the negative's) -> condition tokens (B, S, h): one per scalar and label, and
    the prompt's tokens (B, L, h), the negative prompt's after them."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        h = cfg.hidden_dim
        self.guidance = ScalarEmbedder(h, cfg.mlp_ratio)
        self.timestep = ScalarEmbedder(h, cfg.mlp_ratio) if cfg.use_timestep else None
        self.label = nn.Embedding(cfg.num_classes, h) if cfg.num_classes else None
        self.prompt = nn.Linear(cfg.prompt_dim, h) if cfg.prompt_dim else None
        self.negative_label = nn.Embedding(cfg.negative_classes, h) if cfg.negative_classes else None
        self.negative_prompt = nn.Linear(cfg.negative_prompt_dim, h) if cfg.negative_prompt_dim else None

    def forward(self, w, t=None, y=None, context=None, negative_y=None, negative_context=None):
        """(one token per scalar and label (B, S, h), the prompts' tokens (B, L, h) or None)."""
        tokens = [self.guidance(w * self.cfg.w_scale)]
        if self.timestep is not None:
            tokens.append(self.timestep(t.float() / self.cfg.num_train_timesteps))
        if self.label is not None:
            tokens.append(self.label(y))
        if self.negative_label is not None:
            tokens.append(self.negative_label(negative_y))
        tokens = torch.stack(tokens, dim=1)  # (B, S, h)
        prompts = [m(c.to(tokens.dtype)) for m, c in ((self.prompt, context), (self.negative_prompt, negative_context))
                   if m is not None]  # each (B, L, h)
        return tokens, torch.cat(prompts, dim=1) if prompts else None


class CrossAttentionAdapter(nn.Module):
    """The block's hidden states attend to the condition tokens; output projection zero at init."""

    def __init__(self, dim, out_dim, cfg):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.condition = ConditionEmbedder(cfg)
        self.q_proj = nn.Linear(dim, cfg.hidden_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_dim, cfg.hidden_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_dim, cfg.hidden_dim, bias=False)
        self.out_proj = nn.Linear(cfg.hidden_dim, out_dim)

    def forward(self, x, **condition):
        c, prompt = self.condition(**condition)
        c = c if prompt is None else torch.cat([c, prompt], dim=1)  # (B, S + L, h)
        c = c + token_positions(c.shape[1], c.shape[2]).to(c)  # (B, S, h)
        if c.shape[1] == 1:  # one token (w alone, the official default): softmax over one key is 1, so
            return self.out_proj(self.v_proj(c))  # every image token gets its value: once per sample (B, 1, D)
        B, T, _ = x.shape
        nh = self.num_heads
        q = self.q_proj(x).view(B, T, nh, -1).transpose(1, 2)  # (B, nh, T, h/nh)
        k = self.k_proj(c).view(B, c.shape[1], nh, -1).transpose(1, 2)  # (B, nh, S, h/nh)
        v = self.v_proj(c).view(B, c.shape[1], nh, -1).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, -1)  # (B, T, h)
        return self.out_proj(a)  # (B, T, D)


class AdditiveAdapter(nn.Module):
    """Summed condition embeddings -> MLP -> one vector per sample, added to every token."""

    def __init__(self, dim, out_dim, cfg):
        super().__init__()
        self.condition = ConditionEmbedder(cfg)
        self.fc1 = nn.Linear(cfg.hidden_dim, cfg.hidden_dim)
        self.norm = nn.LayerNorm(cfg.hidden_dim)
        self.out_proj = nn.Linear(cfg.hidden_dim, out_dim)

    def forward(self, x, **condition):
        c, prompt = self.condition(**condition)
        c = c.sum(1) if prompt is None else c.sum(1) + prompt.mean(1)  # (B, h)
        return self.out_proj(self.norm(F.relu(self.fc1(c))))[:, None]  # (B, 1, D)


ARCHS = {"cross_attention": CrossAttentionAdapter, "additive": AdditiveAdapter}


def init_adapter(adapter):
    """All initialization in one place; zero-init: the output projection, so the student starts as the base."""
    for m in adapter.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    nn.init.zeros_(adapter.out_proj.weight)
    nn.init.zeros_(adapter.out_proj.bias)


# -----------------------------------------------------------------------------
# the student: a frozen base model with adapters beside its sites


class Student(Attachment):
    """A base model with guidance-conditioned adapters beside its sites; `student(x, t, w=w, **cond)`."""

    keys = ("w", "negative")

    def __init__(self, model, sites, cfg):
        super().__init__(model, sites)
        self.config = cfg
        # "vector" sites (adaLN modulations) get one vector per sample, like the class they amplify
        archs = [cfg.arch if s.kind == "tokens" else "additive" for s in self.sites]
        self.adapters = nn.ModuleList([ARCHS[a](s.in_dim, s.out_dim, cfg) for s, a in zip(self.sites, archs)])
        for adapter in self.adapters:
            init_adapter(adapter)
        self._hook_sites()

    @property
    def targets(self):
        """The names of the modules the adapters sit beside, in order."""
        return [s.name for s in self.sites]

    @property
    def takes_negative(self):
        """Whether these adapters read the negative condition (trained on CFG against random negatives)."""
        return bool(self.config.negative_classes or self.config.negative_prompt_dim)

    def prepare(self, w, t, y=None, context=None, negative=None, **_):
        """What the adapters read: w and t per sample; the class or the prompt tokens where they use them,
        and the negative condition's (a cond dict: the null condition where there is no negative)."""
        c = self.config
        if c.num_classes and y is None:
            raise ValueError("these adapters condition on the class: pass y= to student.condition()")
        if c.prompt_dim and context is None:
            raise ValueError("these adapters condition on the prompt: pass context= to student.condition()")
        if self.takes_negative and negative is None:
            raise ValueError("these adapters condition on the negative: pass negative= (the null condition "
                             "where there is no negative)")
        negative_y = negative["y"] if c.negative_classes else None
        negative_context = negative["context"] if c.negative_prompt_dim else None
        device = next(self.adapters.parameters()).device
        w = torch.as_tensor(w, dtype=torch.float32, device=device).reshape(-1)  # a number, or one per sample
        t = torch.as_tensor(t, device=device).reshape(-1)
        B = max(len(w), len(t), *(len(v) for v in (y, context) if v is not None))
        return {"w": w.expand(B), "t": t.expand(B), "y": y, "context": context, "negative_y": negative_y,
                "negative_context": negative_context}

    def output(self, i, module, args, output, condition):
        x = args[0]  # the site's input: (B, T, D) tokens, or (B, D) for a "vector" site
        w = condition["w"]
        if x.shape[0] != w.shape[0]:
            raise RuntimeError(f"the adapters' condition holds a batch of {w.shape[0]} but "
                               f"{self.sites[i].name} runs a batch of {x.shape[0]}: condition the same batch "
                               "that the model runs (CFG's doubled batch is for the base model alone)")
        adapter = self.adapters[i]
        delta = adapter(x.to(adapter.out_proj.weight.dtype), **condition)  # (B, T, D) or (B, 1, D)
        if self.sites[i].kind == "vector":
            delta = delta[:, 0]  # (B, D)
        if self.config.zero_at_w1:
            delta = delta * (w - 1).view(-1, *[1] * (delta.dim() - 1))
        return output + delta.to(output.dtype)

    def forward(self, x, t, w, negative=None, **cond):
        """One pass at guidance scale w (a number or one per sample), against `negative` (a cond dict) for
        adapters that take one; disabled: the base model."""
        if not self.enabled:
            return self.model(x, t, **cond)
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
        with self.condition(w=w, t=t, negative=negative, **cond):
            return self.model(x, t, **cond)

    def adapter_state_dict(self):
        """The adapters' tensors, keyed by the module they sit beside: `blocks.3.attn.q_proj.weight`."""
        return {f"{s.name}.{k}": v for s, a in zip(self.sites, self.adapters) for k, v in a.state_dict().items()}

    def load_adapter_state_dict(self, tensors, source="state dict"):
        expected = {k: v.shape for k, v in self.adapter_state_dict().items()}
        checkpoint.check_keys(expected, tensors, source)
        for s, a in zip(self.sites, self.adapters):
            prefix = s.name + "."
            a.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})

    def num_parameters(self):
        """(adapter parameters, base parameters)."""
        return sum(p.numel() for p in self.adapters.parameters()), sum(p.numel() for p in self.model.parameters())

    def save(self, path, **metadata):
        """One safetensors file: the adapters' tensors, their options in its metadata."""
        meta = {"format": FORMAT, "config": json.dumps(asdict(self.config)), "model": type(self.model).__name__,
                **{k: str(v) for k, v in metadata.items()}}
        tensors = self.adapter_state_dict()
        bad = checkpoint.non_finite(tensors)
        if bad is not None:  # a diverged training: a file of NaNs would sample black images without a word
            raise checkpoint.CheckpointError(f"{path}: not written: adapter tensor {bad} is not finite (nan or inf)")
        checkpoint.save_file(tensors, path, metadata=meta)


def attach(model, sites=None, **options):
    """Attach fresh adapters beside the sites of `model` (default: its family's, families.sites); see
    AdapterConfig for options."""
    known = {f.name for f in fields(AdapterConfig)}
    unknown = set(options) - known
    if unknown:
        raise ValueError(f"unknown adapter option {sorted(unknown)[0]!r} (known: {', '.join(sorted(known))})")
    if options.get("arch", "cross_attention") not in ARCHS:
        raise ValueError(f"unknown adapter arch {options['arch']!r} (known: {', '.join(ARCHS)})")
    cfg = AdapterConfig(**options)
    if sites is None:
        import families  # the placement table of every model family

        sites = families.sites(model, modulation=cfg.modulation)
    device = next(model.parameters()).device
    return Student(model, sites, cfg).to(device)


def read_config(path):
    """The AdapterConfig stored in a saved adapters file (files of before the explicit placement too);
    `path` may be a hub id (hub.resolve_adapters)."""
    path = hub.resolve_adapters(path)
    meta = checkpoint.read_metadata(path)
    if meta.get("format") != FORMAT or "config" not in meta:
        raise checkpoint.CheckpointError(f"{path}: not an adapters file (metadata has no {FORMAT!r} config)")
    config = json.loads(meta["config"])
    config.pop("target", None)  # older files named their sites' module ("attn", "attn2"): now the family's
    try:
        return AdapterConfig(**config)
    except TypeError as e:
        raise checkpoint.CheckpointError(f"{path}: adapter options this version does not know ({e})") from None


def load(model, path):
    """Rebuild a student from `student.save(path)` on `model` (the base, or a fine-tune of it); `path`: a
    file, a training run's folder, or a hub id, "user/repo" or "user/repo/file.safetensors"."""
    path = hub.resolve_adapters(path)
    cfg = read_config(path)
    made_for = checkpoint.read_metadata(path).get("model")  # absent in files of before it was recorded
    if made_for is not None and made_for != type(model).__name__:
        raise ValueError(f"adapters for a {made_for}, not a {type(model).__name__}")
    student = attach(model, **asdict(cfg))
    tensors = checkpoint.read_tensors(path)
    bad = checkpoint.non_finite(tensors)
    if bad is not None:
        raise checkpoint.CheckpointError(f"{path}: tensor {bad} is not finite (nan or inf): these adapters come "
                                         "from a diverged training")
    student.load_adapter_state_dict(tensors, source=str(path))
    return student.to(next(model.parameters()).device)
