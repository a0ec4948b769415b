"""What many test files compare with."""


def max_rel_err(a, b):
    """The largest absolute difference, relative to the largest magnitude of the reference b."""
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def offline_hub_cache(root, monkeypatch):
    """Point huggingface_hub at an empty cache under `root`, offline (HF_HUB_OFFLINE=1), in this process and in
    the child processes a test starts (a CLI); returns put(repo_id, filename, file), which places a copy of
    `file` where hf_hub_download finds it without the network.

    The layout is the one hf_hub_download leaves behind: models--user--repo/blobs/<sha256> holds the bytes,
    snapshots/<commit>/<filename> links to the blob, refs/main names the commit. huggingface_hub reads
    HF_HUB_CACHE and HF_HUB_OFFLINE from the environment once, at import: the module's constants are
    patched as well as the environment.
    """
    import hashlib
    import os
    import shutil
    from pathlib import Path

    from huggingface_hub import constants

    cache = Path(root) / "hub"
    cache.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    def put(repo_id, filename, file, commit="0123456789abcdef0123456789abcdef01234567"):
        repo = cache / ("models--" + repo_id.replace("/", "--"))
        blob = repo / "blobs" / hashlib.sha256(Path(file).read_bytes()).hexdigest()  # an LFS file's etag
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(file, blob)
        pointer = repo / "snapshots" / commit / filename
        pointer.parent.mkdir(parents=True, exist_ok=True)
        pointer.unlink(missing_ok=True)
        pointer.symlink_to(os.path.relpath(blob, pointer.parent))
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(commit)
        return pointer

    return put
