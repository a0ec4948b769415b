"""Guidance-conditioned adapters: Adapter Guidance Distillation (Jensen & Sadat, TMLR 2025).

Classifier-free guidance runs the denoiser twice per step. AGD keeps the base model frozen and
attaches a small adapter beside each of its attention blocks (DiT: every block's self-attention
`attn`; SD UNets: every transformer block's cross-attention `attn2`), conditioned on the guidance
scale w, and trains the adapters so that one pass at w gives what CFG gives at w:

    student = adapters.attach(model, hidden_dim=256)   # base weights shared and frozen
    out = student(x, t, w=w, **cond)                   # one pass ~ uncond + w (cond - uncond)
    student.enabled = False                            # exactly model(x, t, **cond) again
    student.save("agd.safetensors"); student = adapters.load(model, "agd.safetensors")

Each adapter reads the hidden states entering its attention block and adds its output to the
block's output. Its output projection starts at zero, so a freshly attached student is the
conditional base model exactly. Two architectures, as in the official code:
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

The model file knows nothing of this: adapters are forward hooks on the modules they sit beside. The
condition (w, t, class, prompt) of the current call is what the hooks read; it is set by the
student's forward and kept until the next one, because gradient checkpointing re-runs blocks (and
so the hooks) during the backward pass. Under `torch.no_grad` it is dropped after each call, so
that the base model called directly is the base model.

Letters in shape comments: B batch, T tokens, D the block's width, S condition tokens, h hidden_dim.
"""

import json
import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

import checkpoint

FORMAT = "agd-adapters/1"  # metadata tag of the saved file

# -----------------------------------------------------------------------------
# options


@dataclass
class AdapterConfig:
    arch: str = "cross_attention"  # "cross_attention" (official default) or "additive"
    hidden_dim: int = 256  # h: width of the condition tokens and of the attention (paper, DiT-XL/2)
    num_heads: int = 1  # of the adapter's cross-attention
    mlp_ratio: float = 4.0  # of the MLPs that embed scalars (w, t) after their Fourier features
    use_timestep: bool = False  # also condition on t (scaled by 1 / num_train_timesteps)
    num_classes: int = 0  # > 0: also condition on the class label `y` (DiT; includes the null class)
    prompt_dim: int = 0  # > 0: also condition on the prompt tokens `context` of this width (SD)
    target: str = ""  # name of the attention modules to attach to; "" picks attn2 if present, else attn
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
    """(w, t, y, context) -> condition tokens (B, S, h): one per scalar and label, one per prompt token."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.guidance = ScalarEmbedder(cfg.hidden_dim, cfg.mlp_ratio)
        self.timestep = ScalarEmbedder(cfg.hidden_dim, cfg.mlp_ratio) if cfg.use_timestep else None
        self.label = nn.Embedding(cfg.num_classes, cfg.hidden_dim) if cfg.num_classes else None
        self.prompt = nn.Linear(cfg.prompt_dim, cfg.hidden_dim) if cfg.prompt_dim else None

    def forward(self, w, t=None, y=None, context=None):
        """(one token per scalar and label (B, S, h), the prompt's tokens (B, L, h) or None)."""
        tokens = [self.guidance(w)]
        if self.timestep is not None:
            tokens.append(self.timestep(t.float() / self.cfg.num_train_timesteps))
        if self.label is not None:
            tokens.append(self.label(y))
        tokens = torch.stack(tokens, dim=1)  # (B, S, h)
        prompt = self.prompt(context.to(tokens.dtype)) if self.prompt is not None else None  # (B, L, h)
        return tokens, prompt


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
# the student: a frozen base model with adapters beside its attention blocks


def _widths(module):
    """(width in, width out) of a module: its first linear layer's input, its last one's output."""
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    return linears[0].in_features, linears[-1].out_features


MODULATION = "adaLN_modulation"  # DiT's per-block (and final layer's) shift / scale / gate


class Student(nn.Module):
    """A base model with adapters on its attention blocks; `student(x, t, w=w, **cond)`."""

    def __init__(self, model, cfg):
        super().__init__()
        names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
        target = cfg.target or ("attn2" if "attn2" in names else "attn")
        self.targets = [n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] == target]
        if not self.targets:
            raise ValueError(f"no module named {target!r} in {type(model).__name__} to attach adapters to")
        self.config = cfg = AdapterConfig(**{**asdict(cfg), "target": target})
        archs = [cfg.arch] * len(self.targets)
        if cfg.modulation:
            modulations = [n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] == MODULATION]
            if not modulations:
                raise ValueError(f"modulation=True: no {MODULATION!r} module in {type(model).__name__} (a DiT has them)")
            self.targets += modulations
            archs += ["additive"] * len(modulations)  # one vector per sample, like the class they amplify
        modules = dict(model.named_modules())
        self.model = model.requires_grad_(False)  # frozen; its weights are shared, never copied
        self.adapters = nn.ModuleList([ARCHS[a](*_widths(modules[n]), cfg) for n, a in zip(self.targets, archs)])
        for adapter in self.adapters:
            init_adapter(adapter)
        self.enabled = True
        self._condition = None
        self._hooks = [modules[n].register_forward_hook(self._hook(a)) for n, a in zip(self.targets, self.adapters)]

    def _hook(self, adapter):
        def add_adapter_output(module, args, output):
            if not self.enabled or self._condition is None:
                return None  # the base model's output, untouched
            x = args[0]  # (B, T, D): the hidden states entering the attention block; (B, D): a modulation's input
            if x.shape[0] != self._condition["w"].shape[0]:
                raise RuntimeError(f"adapters hold the condition of a batch of {self._condition['w'].shape[0]} "
                                   f"but the model runs a batch of {x.shape[0]}: call the model through the "
                                   "student, or call student.release() after training")
            delta = adapter(x.to(adapter.out_proj.weight.dtype), **self._condition)  # (B, T, D) or (B, 1, D)
            if output.dim() == 2:  # a modulation: one vector per sample
                delta = delta[:, 0]
            if self.config.zero_at_w1:
                delta = delta * (self._condition["w"] - 1).view(-1, *[1] * (delta.dim() - 1))
            return output + delta.to(output.dtype)

        return add_adapter_output

    def forward(self, x, t, w, **cond):
        """One pass at guidance scale w (a number or one per sample); disabled: the base model."""
        if not self.enabled:
            return self.model(x, t, **cond)
        B = x.shape[0]
        t = torch.as_tensor(t, device=x.device).expand(B)
        w = torch.as_tensor(w, device=x.device, dtype=torch.float32).expand(B)
        self._condition = {"w": w, "t": t, "y": cond.get("y"), "context": cond.get("context")}
        try:
            return self.model(x, t, **cond)
        finally:
            if not torch.is_grad_enabled():
                self._condition = None

    def release(self):
        """Forget the condition that the last call with gradients kept for the backward pass."""
        self._condition = None

    @contextmanager
    def disabled(self):
        """`with student.disabled():` the base model (the teacher, for online distillation)."""
        enabled, self.enabled = self.enabled, False
        try:
            yield self
        finally:
            self.enabled = enabled

    def detach(self):
        """Remove the hooks: the base model is left exactly as it was before `attach`."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def adapter_state_dict(self):
        """The adapters' tensors, keyed by the module they sit beside: `blocks.3.attn.q_proj.weight`."""
        return {f"{n}.{k}": v for n, a in zip(self.targets, self.adapters) for k, v in a.state_dict().items()}

    def load_adapter_state_dict(self, tensors, source="state dict"):
        expected = {k: v.shape for k, v in self.adapter_state_dict().items()}
        checkpoint.check_keys(expected, tensors, source)
        for n, a in zip(self.targets, self.adapters):
            prefix = n + "."
            a.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})

    def num_parameters(self):
        """(adapter parameters, base parameters)."""
        return sum(p.numel() for p in self.adapters.parameters()), sum(p.numel() for p in self.model.parameters())

    def save(self, path, **metadata):
        """One safetensors file: the adapters' tensors, their options in its metadata."""
        meta = {"format": FORMAT, "config": json.dumps(asdict(self.config)),
                **{k: str(v) for k, v in metadata.items()}}
        checkpoint.save_file(self.adapter_state_dict(), path, metadata=meta)


def attach(model, **options):
    """Attach fresh adapters beside the attention blocks of `model` (and, with modulation=True, on its adaLN
    modulations); see AdapterConfig for options."""
    known = {f.name for f in fields(AdapterConfig)}
    unknown = set(options) - known
    if unknown:
        raise ValueError(f"unknown adapter option {sorted(unknown)[0]!r} (known: {', '.join(sorted(known))})")
    if options.get("arch", "cross_attention") not in ARCHS:
        raise ValueError(f"unknown adapter arch {options['arch']!r} (known: {', '.join(ARCHS)})")
    device = next(model.parameters()).device
    return Student(model, AdapterConfig(**options)).to(device)


def read_config(path):
    """The AdapterConfig stored in a saved adapters file."""
    meta = checkpoint.read_metadata(path)
    if meta.get("format") != FORMAT or "config" not in meta:
        raise checkpoint.CheckpointError(f"{path}: not an adapters file (metadata has no {FORMAT!r} config)")
    return AdapterConfig(**json.loads(meta["config"]))


def load(model, path):
    """Rebuild a student from `student.save(path)` on `model` (the base, or a fine-tune of it)."""
    cfg = read_config(path)
    student = attach(model, **asdict(cfg))
    tensors = checkpoint.read_tensors(path)
    student.load_adapter_state_dict(tensors, source=str(path))
    return student.to(next(model.parameters()).device)
