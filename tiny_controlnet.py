"""The tiny world's ControlNet: the bundled teacher draws its digit inside a given silhouette.

The control image of a digit is its mask (pixels above mid-grey), dilated by one pixel and blurred
(Gaussian, sigma 1): it fixes where the digit lies, how big and how slanted it is and roughly its
outline, but not its strokes. So the teacher still has to draw the digit, and its class and the
guidance keep their part: with the digit's edges as control, the ControlNet would nearly copy the
digit, and CFG and AGD could differ in nothing that the control had not already fixed. A silhouette
is also cheap to take again from a sample, which makes the fidelity to it a plain measure: the IoU of
the sample's silhouette with the control's (`control_fidelity`; 1 for the digit it was made from).

    python tiny.py controlnet            # trains it on the 5,000 digits -> assets/tiny-controlnet-mnist

Used beside CFG or adapters as every ControlNet here (controlnet.py):

    net = controlnet.from_pretrained(tiny_controlnet.CONTROLNET)
    extra, extra_null = controlnet.control_condition([net], control_image(digits), 1.0, batch=len(digits))
    cfg = guidance.guided(controlnet.controlled(teacher, [net]), w, {"y": y, **extra}, {"y": null, **extra_null})
    agd = lambda x, t: controlnet.controlled(student, [net])(x, t, w=w, y=y, **extra)
"""

import torch
import torch.nn.functional as F
from tqdm import tqdm

import controlnet
import guidance
import tiny

CONTROLNET = tiny.ASSETS / "tiny-controlnet-mnist"  # hub layout: config.json + diffusion_pytorch_model.safetensors

# -----------------------------------------------------------------------------
# the control image and the fidelity to it


def _gaussian(sigma=1.0, radius=2):
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-x**2 / (2 * sigma**2))
    return k / k.sum()  # (2r + 1,)


def control_image(images):
    """Digits (B, 1, 28, 28) in [-1, 1] -> their silhouettes (B, 1, 28, 28) in [0, 1]: mask, dilated, blurred."""
    mask = (images > 0).float()                                           # the strokes
    mask = F.max_pool2d(mask, 3, stride=1, padding=1)                      # one pixel wider (3 x 3 dilation)
    k = _gaussian().to(images.device)
    mask = F.conv2d(mask, k.view(1, 1, 1, -1), padding=(0, 2))             # blurred along rows,
    mask = F.conv2d(mask, k.view(1, 1, -1, 1), padding=(2, 0))             # then columns; outside is background
    return mask.clamp(0, 1)  # (the kernel sums to 1 up to rounding)


def control_fidelity(samples, controls):
    """Mean IoU of each sample's silhouette with its control's (both: the control image above 0.5)."""
    a, b = control_image(samples) > 0.5, controls > 0.5                    # (B, 1, H, W) each
    inter, union = (a & b).sum(dim=(1, 2, 3)), (a | b).sum(dim=(1, 2, 3))
    iou = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(inter, dtype=torch.float32))
    return iou.float().mean().item()


# -----------------------------------------------------------------------------
# training


def train_controlnet(teacher, images, labels, steps=800, batch_size=64, lr=1e-3, label_dropout=0.1, num_layers=2,
                     ema_decay=0.995, seed=0):
    """A ControlNet of the frozen `teacher` (a copy of its first `num_layers` blocks), trained on the digits'
    silhouettes with the teacher's own objective (tiny.teacher_loss); returns its EMA weights.

    Label dropout as in the teacher's training, so that it also serves CFG's null half, where it
    runs with the null class. ControlNet training starts from the copy; only the zero layers and the
    copy move, the teacher never does.
    """
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    teacher = teacher.float().eval().requires_grad_(False)
    net = controlnet.DiTControlNet.from_dit(teacher, num_layers, conditioning_channels=1).train()
    ema = controlnet.DiTControlNet(net.config).requires_grad_(False)
    ema.load_state_dict(net.state_dict())
    controls = control_image(images)
    alphas_cumprod = guidance.linear_schedule()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    bar = tqdm(range(steps), desc="controlnet")
    for step in bar:
        idx = torch.randint(0, len(images), (batch_size,), generator=g)
        y = labels[idx].clone()
        y[torch.rand(batch_size, generator=g) < label_dropout] = tiny.NULL_CLASS
        t = torch.randint(0, len(alphas_cumprod), (batch_size,), generator=g)

        def controlled(x, t, y):  # the teacher with this batch's residuals
            return teacher(x, t, y, **net(x, t, controls[idx], y))

        loss = tiny.teacher_loss(controlled, images[idx], y, t, torch.randn(images[idx].shape, generator=g),
                                 alphas_cumprod)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), net.parameters()):
                pe.lerp_(pm, 1 - ema_decay)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    return ema.eval()
