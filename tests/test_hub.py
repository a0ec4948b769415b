"""hub.py without the network: adapters by hub id from an offline cache in hf_hub_download's layout, one-line
errors for bad ids and missing files, the model card of a run holding that run's figures, push_to_hub against a
fake HfApi."""

import json
import subprocess
import sys
from types import SimpleNamespace

import huggingface_hub
import numpy as np
import pytest
import torch
from huggingface_hub.errors import GatedRepoError, RemoteEntryNotFoundError, RepositoryNotFoundError
from PIL import Image

import adapters
import checkpoint
import dit
import hub
from util import offline_hub_cache

OPTIONS = dict(hidden_dim=8, num_heads=2, mlp_ratio=1.0, use_timestep=True, num_classes=11, modulation=True,
               zero_at_w1=True)


def tiny_student(seed=0):
    """A random tiny DiT with random adapters (their zero-init output projections randomized too)."""
    torch.manual_seed(seed)
    model = dit.DiT(dit.DiT_models["tiny-mnist"]())
    student = adapters.attach(model, **OPTIONS)
    with torch.no_grad():
        for p in student.adapters.parameters():
            p.normal_()
    return model, student


def make_run(folder, base="someone/tiny-dit", metrics=True, seed=0):
    """A training run's --out as train_agd.py leaves it: adapters, losses, and (tiny world) metrics and samples."""
    model, student = tiny_student(seed)
    folder.mkdir(parents=True, exist_ok=True)
    student.save(folder / hub.ADAPTERS_FILE, base=base)
    (folder / "losses.json").write_text(json.dumps([0.05 / (1 + i / 10) for i in range(120)]))
    n_adapter, n_base = student.num_parameters()
    if metrics:
        results = [{"method": m, "w": w, "fid": 10 * w + k + 0.1234, "accuracy": 0.5 + 0.01 * k + 0.1 * w,
                    "sec_per_image": 0.001 * (k + 1) * w} for w in (1.5, 3.0) for k, m in enumerate(["base", "cfg", "agd"])]
        (folder / "metrics.json").write_text(json.dumps({
            "results": results, "model": "tiny", "weights": base, "trajectories": 77, "steps": 25, "train_steps": 120,
            "eval_samples": 40, "adapter_parameters": n_adapter, "base_parameters": n_base, "minutes": 0.5}))
        Image.new("L", (60, 90), 128).save(folder / "samples.png")
    (folder / "train_state.pt").write_bytes(b"not for the hub")
    (folder / "trajectories").mkdir(exist_ok=True)
    (folder / "trajectories" / "shard_00000.safetensors").write_bytes(b"nor this")
    return model, student


# -----------------------------------------------------------------------------
# resolve_adapters


def test_adapters_by_hub_id_from_the_offline_cache(tmp_path, monkeypatch):
    put = offline_hub_cache(tmp_path / "home", monkeypatch)
    model, student = make_run(tmp_path / "run")
    other = tmp_path / "other.safetensors"
    tiny_student(seed=1)[1].save(other, base="someone/tiny-dit")
    put("user/repo", hub.ADAPTERS_FILE, tmp_path / "run" / hub.ADAPTERS_FILE)
    put("user/repo", "w4/agd.safetensors", other)

    file = hub.resolve_adapters("user/repo")
    assert file.is_file() and "models--user--repo" in str(file) and file.name == hub.ADAPTERS_FILE
    loaded = adapters.load(model, file)
    for k, v in student.adapter_state_dict().items():
        assert torch.equal(loaded.adapter_state_dict()[k], v), k

    file = hub.resolve_adapters("user/repo/w4/agd.safetensors")
    assert file.read_bytes() == other.read_bytes()


def test_child_processes_see_the_offline_cache(tmp_path, monkeypatch):
    """What a CLI test (sample.py --adapters user/repo) relies on: the cache and offline mode reach a child process."""
    put = offline_hub_cache(tmp_path / "home", monkeypatch)
    make_run(tmp_path / "run")
    pointer = put("user/repo", hub.ADAPTERS_FILE, tmp_path / "run" / hub.ADAPTERS_FILE)
    code = "import hub, huggingface_hub.constants as c; print(c.HF_HUB_OFFLINE, hub.resolve_adapters('user/repo'))"
    out = subprocess.run([sys.executable, "-c", code], cwd=hub.ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", str(pointer)]


def test_local_file_and_run_folder(tmp_path):
    make_run(tmp_path / "run")
    file = tmp_path / "run" / hub.ADAPTERS_FILE
    assert hub.resolve_adapters(file) == file
    assert hub.resolve_adapters(str(tmp_path / "run")) == file
    with pytest.raises(checkpoint.CheckpointError, match="a folder without adapters.safetensors") as e:
        hub.resolve_adapters(tmp_path / "run" / "trajectories")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("bad", ["adapters", "./missing.safetensors", "/no/such/adapters.safetensors",
                                 "user/repo/adapters.bin", "-user/repo", "user/re po", "user/repo/sub/folder"])
def test_bad_hub_id_is_one_line(bad, tmp_path, monkeypatch):
    offline_hub_cache(tmp_path, monkeypatch)
    with pytest.raises(checkpoint.CheckpointError, match="not a hub id") as e:
        hub.resolve_adapters(bad)
    assert str(e.value).startswith(bad) and "\n" not in str(e.value)


@pytest.mark.parametrize("missing", ["user/absent", "user/repo/absent.safetensors"])
def test_not_cached_offline_is_one_line(missing, tmp_path, monkeypatch):
    put = offline_hub_cache(tmp_path / "home", monkeypatch)
    make_run(tmp_path / "run")
    put("user/repo", hub.ADAPTERS_FILE, tmp_path / "run" / hub.ADAPTERS_FILE)
    with pytest.raises(checkpoint.CheckpointError, match="not in the hub cache .* HF_HUB_OFFLINE is set") as e:
        hub.resolve_adapters(missing)
    assert str(e.value).startswith(missing) and "\n" not in str(e.value)


RESPONSE = SimpleNamespace(headers={}, request=None)  # what the hub's HTTP errors keep of a response


@pytest.mark.parametrize("error, message", [
    (RepositoryNotFoundError("404 Client Error\nRepository Not Found", response=RESPONSE),
     "no such local file or folder, and no hub repo user/repo"),
    (GatedRepoError("403 Client Error\nGated", response=RESPONSE), "hub repo user/repo is gated"),
    (RemoteEntryNotFoundError("404 Client Error\nEntry Not Found", response=RESPONSE),
     "hub repo user/repo has no file adapters.safetensors"),
    (ConnectionError("timed out\nretrying"), r"could not download adapters.safetensors .*ConnectionError: timed out"),
])
def test_hub_errors_are_one_line(error, message, monkeypatch):
    """What hf_hub_download raises online (faked here: no network) becomes one line that says what to do."""
    def download(repo_id, filename):
        raise error

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    with pytest.raises(checkpoint.CheckpointError, match=message) as e:
        hub.resolve_adapters("user/repo")
    assert str(e.value).startswith("user/repo: ") and "\n" not in str(e.value)


# -----------------------------------------------------------------------------
# the model card


def test_model_card_holds_the_run_it_describes(tmp_path):
    run = tmp_path / "run"
    model, student = make_run(run)
    card = hub.write_card(run, "user/agd-tiny").read_text()
    metrics = json.loads((run / "metrics.json").read_text())

    data = huggingface_hub.ModelCard(card).data  # the hub's own parser of the front matter
    assert data.library_name == "agd" and data.base_model == "someone/tiny-dit"
    assert data.base_model_relation == "adapter" and "agd" in data.tags and "tiny" in data.tags

    for r in metrics["results"]:  # every figure of the run, as train_agd.py prints it
        row = f"| {r['method']} | {r['w']:g} | {r['fid']:.3f} | {r['accuracy']:.3f} | {1000 * r['sec_per_image']:.2f} |"
        assert row in card, row
    n_adapter, n_base = student.num_parameters()
    assert f"{n_adapter:,} parameters ({100 * n_adapter / n_base:.1f} % of the base's {n_base:,})" in card
    for k, v in adapters.read_config(run / hub.ADAPTERS_FILE).__dict__.items():
        assert f"| {k} | `{v!r}` |" in card, k
    assert "| CFG trajectories collected (Algorithm 1) | 77 |" in card
    assert "[someone/tiny-dit](https://huggingface.co/someone/tiny-dit)" in card
    assert 'adapters.load(model, "user/agd-tiny")' in card
    best = min((r for r in metrics["results"] if r["method"] == "agd"), key=lambda r: r["fid"])["w"]
    assert f"python sample.py --model tiny --weights someone/tiny-dit --adapters user/agd-tiny --w {best:g}" in card
    assert "](samples.png)" in card and f"]({hub.LOSS_PLOT})" in card

    plot = Image.open(run / hub.LOSS_PLOT)
    assert plot.size == (520, 260) and np.asarray(plot.convert("L")).min() < 50  # a curve was drawn


def test_model_card_of_a_run_without_evaluation(tmp_path):
    """A DiT / SD run writes no metrics.json: the card counts the parameters from the file, names no figures."""
    run = tmp_path / "run"
    model, student = make_run(run, base="assets/tiny-dit-mnist", metrics=False)
    card = hub.model_card(run)
    data = huggingface_hub.ModelCard(card).data
    assert data.base_model is None  # the bundled teacher is no hub model
    assert f"{student.num_parameters()[0]:,} parameters," in card  # Fourier buffers not counted
    assert "## Results" not in card and "## Samples" not in card and "| training steps (Algorithm 2) | 120 |" in card
    assert f'adapters.load(model, "{run / hub.ADAPTERS_FILE}")' in card


def test_model_card_needs_an_adapters_file(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="adapters.safetensors: missing"):
        hub.write_card(tmp_path)
    assert not (tmp_path / "README.md").exists()


# -----------------------------------------------------------------------------
# push_to_hub


class FakeApi:
    """Records what push_to_hub asks of the hub."""
    calls = []

    def __init__(self, token=None):
        self.calls.append(("init", token))

    def create_repo(self, repo_id, **kw):
        self.calls.append(("create_repo", repo_id, kw))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kw):
        self.calls.append(("upload_folder", kw))


def test_push_to_hub(tmp_path, monkeypatch):
    run = tmp_path / "run"
    make_run(run)
    FakeApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    assert hub.push_to_hub(run, "user/agd-tiny", token="tok", private=True) == "https://huggingface.co/user/agd-tiny"
    (_, token), (_, repo_id, create), (_, upload) = FakeApi.calls
    assert token == "tok" and repo_id == "user/agd-tiny" and create == {"private": True, "exist_ok": True}
    assert upload["repo_id"] == "user/agd-tiny" and upload["folder_path"] == run
    files = sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file())
    sent = sorted(huggingface_hub.utils.filter_repo_objects(files, allow_patterns=upload["allow_patterns"]))
    assert sent == ["README.md", "adapters.safetensors", "loss.png", "losses.json", "metrics.json", "samples.png"]
    assert 'adapters.load(model, "user/agd-tiny")' in (run / "README.md").read_text()


def test_push_to_hub_errors_are_one_line(tmp_path, monkeypatch):
    make_run(tmp_path / "run")
    FakeApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    with pytest.raises(checkpoint.CheckpointError, match="not a hub repo id"):
        hub.push_to_hub(tmp_path / "run", "agd-tiny")
    assert FakeApi.calls == []

    def refuse(self, **kw):
        raise PermissionError("401 Unauthorized\nInvalid token")

    monkeypatch.setattr(FakeApi, "upload_folder", refuse)
    with pytest.raises(checkpoint.CheckpointError, match=r"user/agd-tiny: could not upload .*401 Unauthorized") as e:
        hub.push_to_hub(tmp_path / "run", "user/agd-tiny")
    assert "\n" not in str(e.value)
