"""The one shared loading helper: hub id or local folder -> config and tensors, loaded strictly.

A model's `from_pretrained` is three lines with it:

    folder = checkpoint.resolve(path_or_repo_id, subfolder="unet")
    model = build(checkpoint.read_config(folder)) on the meta device
    checkpoint.load_into(model, checkpoint.read_tensors(folder, dtype=dtype), source=folder)

Every failure is a `CheckpointError` whose one-line message names the file or key at fault and
what was expected, so that the CLIs can print it without a traceback.
"""

import argparse
import json
import os
import pickle
from contextlib import contextmanager
from pathlib import Path

import torch

WEIGHT_NAMES = ("diffusion_pytorch_model", "model")  # diffusers' and transformers' file stems


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file or key at fault."""


# -----------------------------------------------------------------------------
# files: local folder or hub id


def _weight_candidates(variant):
    """File names to look for, most preferred first: a variant ("fp16") before the plain file."""
    stems = [f"{s}.{variant}" for s in WEIGHT_NAMES] if variant else []
    stems += list(WEIGHT_NAMES)
    return [f"{s}.safetensors.index.json" for s in stems] + [f"{s}.safetensors" for s in stems]


def resolve(path_or_repo_id, subfolder=None, variant=None):
    """A local folder holding config.json: the folder itself, its `subfolder`, or a hub download."""
    path = Path(path_or_repo_id).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path}: expected a folder (a hub repo's layout), got a file")
        for folder in ([path / subfolder] if subfolder else []) + [path]:
            if (folder / "config.json").is_file():
                return folder
        where = f"{path / subfolder} or {path}" if subfolder else str(path)
        raise CheckpointError(f"{where}: no config.json (expected a hub repo's folder layout)")
    if str(path_or_repo_id).startswith((".", "/", "~")) or str(path_or_repo_id).count("/") != 1:
        raise CheckpointError(f"{path_or_repo_id}: no such folder (and not a hub id 'owner/name')")
    return _download(str(path_or_repo_id), subfolder, variant)


def _download(repo_id, subfolder, variant):
    """Fetch config.json and the weights of a hub repo's subfolder, or of its root (a standalone VAE).

    A variant ("fp16") is fetched instead of the plain weights, never beside them; the repo's
    scheduler config comes along, since it says what the model predicts (epsilon or v).
    """
    from huggingface_hub import snapshot_download  # only needed for hub ids

    prefixes = ([f"{subfolder}/"] if subfolder else []) + [""]

    def fetch(names):
        patterns = [p + n for p in prefixes for n in ["config.json", *names]] + ["scheduler/scheduler_config.json"]
        try:
            return Path(snapshot_download(repo_id, allow_patterns=patterns))
        except Exception as e:  # network, auth, unknown repo: all one line for the user
            raise CheckpointError(f"{repo_id}: could not download from the hub ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0] if str(e) else ''})") from e

    plain = _weight_candidates(None)
    root = fetch([n for n in _weight_candidates(variant) if n not in plain] if variant else plain)
    folder = next((root / p for p in prefixes if (root / p / "config.json").is_file()), None)
    if folder is None:
        raise CheckpointError(f"{repo_id}: no {prefixes[0]}config.json in the hub repo")
    if variant and not any((folder / n).is_file() for n in _weight_candidates(variant)):
        root = fetch(plain)  # no such variant: the plain weights
    for name in _weight_candidates(variant):  # a sharded checkpoint: fetch the shards its index names
        index = folder / name
        if name.endswith(".index.json") and index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            prefix = str(folder.relative_to(root)).strip(".")
            snapshot_download(repo_id, allow_patterns=[f"{prefix}/{n}" if prefix else n for n in shards])
            break
    return folder


def read_config(folder):
    """config.json of a resolved folder, as a dict."""
    file = Path(folder) / "config.json"
    try:
        return json.loads(file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{file}: missing (every model folder has a config.json)") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from None


def weight_files(folder, variant=None):
    """The safetensors file(s) holding a folder's weights: a variant first, then the plain file."""
    folder = Path(folder)
    for name in _weight_candidates(variant):
        file = folder / name
        if not file.is_file():
            continue
        if name.endswith(".index.json"):
            try:
                shards = sorted(set(json.loads(file.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{file}: not a valid shard index ({e})") from None
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise CheckpointError(f"{file}: names shard {missing[0]}, which is missing")
            return [folder / s for s in shards]
        return [file]
    raise CheckpointError(f"{folder}: no weights (expected {' or '.join(_weight_candidates(variant)[-2:])})")


# -----------------------------------------------------------------------------
# tensors


# safetensors' header names for torch dtypes
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def _header(file):
    """(tensor entries, metadata, where the data starts) of a safetensors file, checked against its size."""
    file = Path(file)
    if not file.is_file():
        raise CheckpointError(f"{file}: missing")
    size = file.stat().st_size
    try:
        with open(file, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 0 < n <= size - 8:
                raise ValueError(f"header length {n} does not fit a file of {size} bytes")
            header = json.loads(f.read(n))
        metadata = header.pop("__metadata__", None) or {}
        end = max((info["data_offsets"][1] for info in header.values()), default=0)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{file}: not a readable safetensors file, truncated or corrupt ({e})") from None
    if 8 + n + end > size:
        raise CheckpointError(f"{file}: truncated ({size} bytes, its header needs {8 + n + end})")
    return header, metadata, 8 + n


def read_tensors(files_or_folder, dtype=None, device=None, variant=None, keep_fp32=None):
    """All tensors of one or more safetensors files; floating ones cast to `dtype` one at a time.

    Each tensor is read into its own buffer with a plain `readinto` and cast at once, so an fp32
    file loads as bf16 holding little more than the bf16 weights: no fp32 copy, and no
    memory-mapped file whose touched pages would all count as resident until it is closed.
    `keep_fp32(key) -> bool` names floating tensors read as fp32 instead (T5's `wo` in fp16).
    """
    if isinstance(files_or_folder, (str, Path)) and Path(files_or_folder).is_dir():
        files = weight_files(files_or_folder, variant)
    elif isinstance(files_or_folder, (str, Path)):
        files = [Path(files_or_folder)]
    else:
        files = [Path(f) for f in files_or_folder]
    tensors = {}
    for file in files:
        header, _, start = _header(file)
        with open(file, "rb") as f:
            for key, info in header.items():
                if info.get("dtype") not in _DTYPES:
                    raise CheckpointError(f"{file}: key {key} has unsupported dtype {info.get('dtype')}")
                begin, end = info["data_offsets"]
                buffer = torch.empty(end - begin, dtype=torch.uint8)
                f.seek(start + begin)
                f.readinto(buffer.numpy())
                t = buffer.view(_DTYPES[info["dtype"]]).reshape(info["shape"])
                if dtype is not None and t.is_floating_point():
                    t = t.to(torch.float32 if keep_fp32 is not None and keep_fp32(key) else dtype)
                tensors[key] = t.to(device) if device is not None else t
    return tensors


# What a pickled checkpoint may hold besides tensors and containers: facebookresearch/DiT's train.py
# saves its argparse.Namespace beside the weights. Nothing else is unpickled: weights_only=True.
PICKLE_SAFE = [argparse.Namespace]


def read_torch_file(file):
    """The object saved in a PyTorch .pt / .bin file, read with torch.load(weights_only=True): no code runs."""
    file = Path(file)
    if not file.is_file():
        raise CheckpointError(f"{file}: missing")
    try:
        with torch.serialization.safe_globals(PICKLE_SAFE):
            return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # corrupt, or pickled objects whose loading could run code
        raise CheckpointError(f"{file}: not a PyTorch checkpoint of plain tensors "
                              "(torch.load with weights_only=True refused it)") from None
    except Exception as e:  # truncated, not a zip archive, unreadable: one line for the user
        raise CheckpointError(f"{file}: not a readable PyTorch checkpoint ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from None


def read_metadata(file):
    """The string metadata of a safetensors file's header."""
    return _header(file)[1]


def check_keys(expected, tensors, source):
    """Raise on the first missing, unexpected or misshapen key. `expected` maps key -> shape."""
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    if missing:
        raise CheckpointError(f"{source}: missing key {missing[0]} (shape {tuple(expected[missing[0]])})"
                              + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    if unexpected:
        raise CheckpointError(f"{source}: unexpected key {unexpected[0]} (not in the model)"
                              + (f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else ""))
    for k, shape in expected.items():
        if tuple(tensors[k].shape) != tuple(shape):
            raise CheckpointError(f"{source}: key {k} has shape {tuple(tensors[k].shape)}, "
                                  f"expected {tuple(shape)}")


def load_into(model, tensors, source, checked=False):
    """Load `tensors` into `model` strictly (every key, every shape), replacing meta tensors.

    checked=True: the caller has already checked the file's keys in its own layout (and mapped them).
    """
    if not checked:
        check_keys({k: v.shape for k, v in model.state_dict().items()}, tensors, source)
    model.load_state_dict(tensors, strict=True, assign=True)
    for name, p in model.named_parameters():  # assign=True keeps the loaded tensors' requires_grad
        p.requires_grad_(True)
    return model


def non_finite(tensors):
    """The name of the first floating tensor holding a NaN or an infinity, or None."""
    return next((k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)


class WriteError(CheckpointError):
    """A file that could not be written (a full disk, say); the file as it was before is kept."""


@contextmanager
def atomic_write(file):
    """Open a temp file beside `file` for writing; once written and fsynced, it replaces `file`.

    A crash, a signal or a full disk mid-write leaves `file` as it was and the temp file removed; a
    failed write is a WriteError naming the file. The fsync is where a full disk shows on file systems
    that report it late (NFS), and makes the rename durable.
    """
    file = Path(file)
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(file.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, file)
    except BaseException as e:  # a signal too: no half-written temp file stays behind
        tmp.unlink(missing_ok=True)
        failed = os_error(e)
        if failed is None:
            raise
        raise WriteError(f"{file}: could not be written ({failed.strerror or failed}); the file as it was before, "
                         "if any, is kept") from None


def os_error(e):
    """The OSError that failed a write, if one did: torch.save reports a full disk as a RuntimeError of its
    zip writer ("unexpected pos"), raised while it handles the OSError (ENOSPC) of the write itself."""
    if isinstance(e, RuntimeError) and isinstance(e.__context__, OSError):
        return e.__context__
    return e if isinstance(e, OSError) else None


def save_file(tensors, file, metadata=None):
    """Write safetensors atomically (atomic_write): a crash or a full disk leaves the previous file intact."""
    from safetensors.torch import save

    data = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)
    with atomic_write(file) as f:  # written by Python, so that a full disk is an OSError (ENOSPC)
        f.write(data)
