"""Adapters on the Hugging Face hub: fetch them by id, describe a training run in a model card, publish it.

    file = hub.resolve_adapters("user/repo")                    # the repo's adapters.safetensors
    file = hub.resolve_adapters("user/repo/w4/agd.safetensors")  # any .safetensors file of the repo
    file = hub.resolve_adapters("runs/tiny")                    # a local file, or a run folder (its adapters)
    hub.write_card("runs/tiny")                                 # runs/tiny/README.md and loss.png
    hub.push_to_hub("runs/tiny", "user/agd-tiny")               # creates the repo, uploads adapters and card

Hub files come through huggingface_hub's `hf_hub_download` and its cache, as the models do
(checkpoint.py), so that with HF_HUB_OFFLINE=1 a file fetched once loads again without the network.

The model card is generated from what train_agd.py writes into --out: adapters.safetensors (its
metadata holds the adapter options under "config" and the base weights' id under "base"),
losses.json (one loss per training step), and for the tiny world metrics.json (the evaluation's
table and the run's settings) and samples.png (the grid base / CFG / AGD). The card is Markdown
with the hub's YAML front matter (https://huggingface.co/docs/hub/model-cards): the base model, a
`base_model_relation: adapter` that places these adapters under it in the hub's model tree, tags.
"""

import json
import math
import re
from pathlib import Path

import checkpoint

ROOT = Path(__file__).resolve().parent
ADAPTERS_FILE = "adapters.safetensors"  # what train_agd.py writes into --out, and the file "user/repo" means
LOSS_PLOT = "loss.png"  # the loss curve write_card draws beside the card
UPLOADS = (ADAPTERS_FILE, "README.md", "samples.png", LOSS_PLOT, "metrics.json", "losses.json")  # what push_to_hub sends
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")  # owner/name, as the hub spells repo ids
PAPER = ('Jensen & Sadat, "Efficient Distillation of Classifier-Free Guidance using Adapters", TMLR 2025, '
         "[arXiv 2503.07274](https://arxiv.org/abs/2503.07274)")

# -----------------------------------------------------------------------------
# fetch: local path or hub id -> a local adapters file


def split_hub_id(hub_id):
    """A hub id as (repo, file): user/repo -> its adapters.safetensors; user/repo/a/b.safetensors -> a/b.safetensors."""
    parts = str(hub_id).split("/")
    if str(hub_id).startswith((".", "/", "~")) or len(parts) < 2 or not HUB_ID.fullmatch("/".join(parts[:2])):
        raise checkpoint.CheckpointError(f"{hub_id}: no such file or folder, and not a hub id "
                                         "(user/repo or user/repo/file.safetensors)")
    filename = "/".join(parts[2:]) or ADAPTERS_FILE
    if not filename.endswith(".safetensors"):
        raise checkpoint.CheckpointError(f"{hub_id}: no such file or folder, and not a hub id (after user/repo "
                                         f"comes a .safetensors file, not {filename!r})")
    return "/".join(parts[:2]), filename


def resolve_adapters(path_or_id):
    """A local adapters file: the file itself, a run folder's adapters.safetensors, or a hub download of
    "user/repo" (its adapters.safetensors) or "user/repo/file.safetensors"."""
    path = Path(path_or_id).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        if (path / ADAPTERS_FILE).is_file():
            return path / ADAPTERS_FILE
        raise checkpoint.CheckpointError(f"{path}: a folder without {ADAPTERS_FILE} (expected an adapters "
                                         "file, or the --out folder of a training run)")
    repo_id, filename = split_hub_id(path_or_id)
    return _download(repo_id, filename, what=str(path_or_id))


def _download(repo_id, filename, what):
    """hf_hub_download through the hub cache, each way it can fail as one line that says what to do."""
    from huggingface_hub import constants, hf_hub_download  # only needed for hub ids
    from huggingface_hub.errors import EntryNotFoundError, GatedRepoError, LocalEntryNotFoundError, \
        RepositoryNotFoundError

    Error = checkpoint.CheckpointError
    try:
        return Path(hf_hub_download(repo_id, filename))
    except LocalEntryNotFoundError:  # offline (HF_HUB_OFFLINE=1, or no connection) and not cached
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the hub cannot be reached"
        raise Error(f"{what}: not in the hub cache ({constants.HF_HUB_CACHE}) and {why}; no such local "
                    "file either") from None
    except GatedRepoError:  # before its parent class, RepositoryNotFoundError
        raise Error(f"{what}: hub repo {repo_id} is gated: accept its conditions on the hub, then log in "
                    "(hf auth login)") from None
    except RepositoryNotFoundError:
        raise Error(f"{what}: no such local file or folder, and no hub repo {repo_id} (if it is private: "
                    "hf auth login)") from None
    except EntryNotFoundError:  # the repo exists; the file does not
        raise Error(f"{what}: hub repo {repo_id} has no file {filename}") from None
    except Exception as e:  # network, auth, an invalid id: all one line for the user
        first = str(e).splitlines()[0] if str(e) else ""
        raise Error(f"{what}: could not download {filename} from hub repo {repo_id} ({type(e).__name__}: "
                    f"{first})") from e


# -----------------------------------------------------------------------------
# the model card: generated from a run's files


def read_run(run_folder):
    """What a card is made of: (adapter metadata, adapter options, metrics, losses) of a run folder."""
    folder = Path(run_folder)
    file = folder / ADAPTERS_FILE
    meta = checkpoint.read_metadata(file)  # CheckpointError if missing or corrupt
    if "config" not in meta:
        raise checkpoint.CheckpointError(f"{file}: not an adapters file (no adapter config in its metadata)")
    metrics = json.loads((folder / "metrics.json").read_text()) if (folder / "metrics.json").is_file() else {}
    losses = json.loads((folder / "losses.json").read_text()) if (folder / "losses.json").is_file() else []
    return meta, json.loads(meta["config"]), metrics, losses


def is_hub_id(base):
    """Whether the base weights were a hub id (and not a local folder, such as the bundled tiny teacher)."""
    return bool(HUB_ID.fullmatch(base)) and not (ROOT / base).exists() and not Path(base).exists()


def parameter_counts(file, metrics):
    """(adapter parameters, base parameters or None): as the run counted them, else from the file's tensors."""
    if "adapter_parameters" in metrics:
        return metrics["adapter_parameters"], metrics.get("base_parameters")
    tensors = checkpoint.read_tensors(file)  # the random Fourier features are buffers, not parameters
    return sum(v.numel() for k, v in tensors.items() if ".fourier." not in k), None


SETTING_NAMES = {  # what metrics.json's entries mean, for the card's training table
    "trajectories": "CFG trajectories collected (Algorithm 1)",
    "steps": "sampler steps per trajectory",
    "train_steps": "training steps (Algorithm 2)",
    "eval_samples": "samples per row of the evaluation",
    "minutes": "minutes, collection + training + evaluation",
}
NOT_SETTINGS = {"results", "model", "weights", "adapter_parameters", "base_parameters"}  # shown elsewhere


def table(header, rows):
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def figure(v):
    """A number as a card shows it: 4 significant digits for floats, thousands separated for ints."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return f"`{v}`" if isinstance(v, str) else str(v)
    return f"{v:,}" if isinstance(v, int) else f"{v:.4g}"


def results_table(results):
    """The evaluation as train_agd.py prints it: one row per (method, w)."""
    return table(["method", "w", "digit FID", "accuracy", "ms / image"],
                 [[r["method"], f"{r['w']:g}", f"{r['fid']:.3f}", f"{r['accuracy']:.3f}",
                   f"{1000 * r['sec_per_image']:.2f}"] for r in results])


def usage(family, base, source, config, w):
    """How to load the adapters: Python, and the sample.py command."""
    sd = config.get("target") == "attn2"  # adapters beside cross-attention: a UNet
    bundled = (ROOT / base).exists()  # the tiny teacher of assets/: sample.py's default for --model tiny
    if family == "tiny" and bundled:
        load = "import adapters, tiny\n\nmodel = tiny.load_teacher()"
    else:
        file = "unet" if sd else "dit"
        load = f'import adapters, {file}\n\nmodel = {file}.from_pretrained("{base}")'
    cond, what = ("**cond", "cond: the prompt's, as sample.py encodes it") if sd else ("y=labels", "labels: class ids (B,)")
    weights = "" if bundled else f" --weights {base}"
    condition = ' --prompt "a photo of a red fox"' if sd else " --classes 0 1 2 3" if family == "tiny" else ""
    return "\n".join([
        "```python",
        f"{load}  # the frozen base: the adapters never change it",
        f'student = adapters.load(model, "{source}")',
        f"out = student(x, t, w={w:g}, {cond})  # one pass ~ CFG at w = {w:g}; {what}",
        "```", "",
        "```",
        f"python sample.py --model {family or '<model>'}{weights} --adapters {source} --w {w:g}{condition}",
        "```"])


def model_card(run_folder, repo_id=None):
    """The README.md text of a model card for the adapters of a training run (train_agd.py's --out)."""
    folder = Path(run_folder)
    meta, config, metrics, losses = read_run(folder)
    base = meta.get("base") or metrics.get("weights") or "unknown"
    family = metrics.get("model") or meta.get("model") or ("dit" if config.get("target") == "attn" else None)
    results = metrics.get("results", [])
    agd = [r for r in results if r["method"] == "agd"]
    w = min(agd, key=lambda r: r["fid"])["w"] if agd else 7.5 if config.get("target") == "attn2" else 4.0
    source = repo_id or str(folder / ADAPTERS_FILE)

    front = ["---", "library_name: agd"]
    if is_hub_id(base):
        front += [f"base_model: {base}", "base_model_relation: adapter"]
    if config.get("target") == "attn2":
        front += ["pipeline_tag: text-to-image"]
    tags = ["agd", "adapter-guidance-distillation", "classifier-free-guidance", "guidance-distillation",
            "diffusion"] + ([family] if family else [])
    front += ["tags:", *[f"- {t}" for t in tags], "---"]

    if is_hub_id(base):
        where = f"[{base}](https://huggingface.co/{base})"
    elif (ROOT / base).exists():
        where = f"`{base}`, bundled with agd"
    else:
        where = f"`{base}`, a local folder (not on the hub)"
    adapter_params, base_params = parameter_counts(folder / ADAPTERS_FILE, metrics)
    share = f" ({100 * adapter_params / base_params:.1f} % of the base's {base_params:,})" if base_params else ""
    placement = f"beside every `{config.get('target')}` module" + (
        " and on every adaLN modulation" if config.get("modulation") else "")
    size = (folder / ADAPTERS_FILE).stat().st_size / 1e6

    settings = {k: v for k, v in {**metrics, **metrics.get("settings", {})}.items()
                if k not in NOT_SETTINGS and not isinstance(v, (dict, list))}
    if losses:
        settings.setdefault("train_steps", len(losses))
        settings["final loss (mean of the last 50 steps)"] = sum(losses[-50:]) / len(losses[-50:])

    title = repo_id.split("/")[1] if repo_id else folder.name
    lines = [*front, "", f"# {title}", "",
             f"Guidance-conditioned adapters for {where}, trained by Adapter Guidance Distillation ({PAPER}) "
             "with agd: one pass of the base model with these adapters at guidance scale "
             "w approximates what classifier-free guidance gives at w with two passes.", "",
             "## Base model", "",
             f"- weights: {where}" + (f" (`--model {family}`)" if family else ""),
             "- frozen: the adapters sit beside it as forward hooks and never change its weights; they also load "
             "onto fine-tunes of the same base", "",
             "## Adapters", "",
             f"{adapter_params:,} parameters{share}, {placement}; `{ADAPTERS_FILE}`, {size:.2f} MB, "
             "its options (those of `adapters.attach`) in the file's metadata:", "",
             table(["option", "value"], [[k, f"`{v!r}`"] for k, v in config.items()]), "",
             "## Training", "",
             "On CFG trajectories of the base model itself, sampled at random scales w (no dataset images), "
             "by MSE to the CFG output.", "",
             table(["setting", "value"], [[SETTING_NAMES.get(k, k), figure(v)] for k, v in settings.items()])]
    if results:
        lines += ["", "## Results", "",
                  f"From the same noise, {figure(metrics.get('eval_samples', '?'))} samples a row: the base without "
                  "guidance (`base`), with classifier-free guidance (`cfg`, two passes a step) and with these "
                  "adapters (`agd`, one pass). Digit FID: the Frechet distance between the features of the tiny "
                  "world's digit classifier on the samples and on the 5,000 real digits (lower is better); "
                  "accuracy: the share of samples that classifier assigns the class they were asked for; "
                  "milliseconds per image on the training machine.", "",
                  results_table(results)]
    if losses:
        lines += ["", "## Training loss", "", f"![training loss, per step]({LOSS_PLOT})"]
    if (folder / "samples.png").is_file():
        lines += ["", "## Samples", "",
                  "Rows base / CFG / AGD at each w; each column one seed, the same in every row.", "",
                  "![samples](samples.png)"]
    lines += ["", "## How to use", "",
              f"With agd (`adapters.load` takes a hub id: `user/repo` fetches its "
              f"`{ADAPTERS_FILE}` through the hub cache):", "",
              usage(family, base, source, config, w), ""]
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# the loss curve, drawn with PIL (no plotting library at run time)


def loss_plot(losses, file, size=(520, 260)):
    """A PNG of the loss per step (grey) and its running mean (black), on a log axis."""
    from PIL import Image, ImageDraw

    W, H = size
    left, right, top, bottom = 56, 12, 24, 28  # margins: room for the title and the axis labels
    window = max(1, len(losses) // 20)
    running = [sum(losses[max(0, i - window + 1):i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(losses))]
    logs, mean = ([math.log10(max(v, 1e-12)) for v in vs] for vs in (losses, running))
    lo, hi = min(logs), max(logs)
    hi = hi if hi > lo else lo + 1  # a flat curve still gets an axis

    def xy(i, v):
        x = left + (W - left - right) * (i / max(1, len(logs) - 1))
        return x, top + (H - top - bottom) * (hi - v) / (hi - lo)

    canvas = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(canvas)
    draw.rectangle([left, top, W - right, H - bottom], outline=(160, 160, 160))
    draw.line([xy(i, v) for i, v in enumerate(logs)], fill=(170, 170, 170), width=1)
    draw.line([xy(i, v) for i, v in enumerate(mean)], fill=(0, 0, 0), width=2)
    for v in (hi, lo):
        draw.text((4, xy(0, v)[1] - 6), f"{10 ** v:.2g}", fill=(0, 0, 0))
    draw.text((left, H - bottom + 6), "step 1", fill=(0, 0, 0))
    draw.text((W - right - 60, H - bottom + 6), f"step {len(logs)}", fill=(0, 0, 0))
    what = f" (grey) and its mean over {window} steps (black)" if window > 1 else ""
    draw.text((left, 6), f"training loss per step{what}, log scale", fill=(0, 0, 0))
    canvas.save(file)


def write_card(run_folder, repo_id=None):
    """Write the run's model card (README.md) and its loss curve into the run folder; returns the card's path."""
    folder = Path(run_folder)
    text = model_card(folder, repo_id)  # reads the run first: nothing is written for a folder without adapters
    losses_file = folder / "losses.json"
    if losses_file.is_file():
        loss_plot(json.loads(losses_file.read_text()), folder / LOSS_PLOT)
    (folder / "README.md").write_text(text)
    return folder / "README.md"


# -----------------------------------------------------------------------------
# publish


def push_to_hub(run_folder, repo_id, token=None, private=False):
    """Create the hub repo (if new) and upload the run's adapters, model card, images and figures; returns
    the repo's URL. `token`: a hub token (default: the one `hf auth login` stored)."""
    from huggingface_hub import HfApi

    if not HUB_ID.fullmatch(str(repo_id)):
        raise checkpoint.CheckpointError(f"{repo_id}: not a hub repo id (user/repo)")
    folder = Path(run_folder)
    write_card(folder, repo_id)  # the card names the repo in its how-to-use
    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=folder, allow_patterns=list(UPLOADS),
                          commit_message=f"AGD adapters from {folder.name}")
    except Exception as e:  # auth, network, a repo of someone else's: one line for the CLI
        first = str(e).splitlines()[0] if str(e) else ""
        raise checkpoint.CheckpointError(f"{repo_id}: could not upload to the hub ({type(e).__name__}: "
                                         f"{first})") from e
    return str(url)
