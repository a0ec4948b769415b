"""No silent failure: each fault made for real at toy sizes, and what the user gets from it.

A diverging learning rate, fp16 overflows, non-finite adapters, a non-finite sample, a real SIGTERM to
a real `python train_agd.py`, a signal mid-write, conflicting options, two runs into one --out, and
a full disk (a small tmpfs where it can be mounted; else an ENOSPC raised at the write).
"""

import errno
import functools
import json
import os
import re
import runpy
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

import adapters
import checkpoint
import families
import guidance
import runs
import sample
import train_agd
import trajectories

ROOT = Path(__file__).resolve().parents[1]
TOY = ["--trajectories", "20", "--steps", "4", "--shard-size", "10", "--batch-size", "8", "--no-eval"]
SHORT = ["--train-steps", "6", "--save-every", "3"]


def run(out, *extra):
    train_agd.main(train_agd.parse_args(["--out", str(out), *TOY, *extra]))


def adapter_tensors(out):
    return checkpoint.read_tensors(out / "adapters.safetensors")


def assert_same(a, b):
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted toy run: its shards, checkpoint and adapters are what every faulty run must end with."""
    out = tmp_path_factory.mktemp("reference")
    run(out, *SHORT)
    return out


def with_shards(reference, out):
    """A fresh --out holding the reference's trajectory shards, so that collection has nothing to do."""
    shutil.copytree(reference / "trajectories", out / "trajectories")
    return out


def no_temp_files(out):
    return not [p for p in out.rglob("*") if ".tmp" in p.name or ".stale" in p.name]


# -----------------------------------------------------------------------------
# numeric blow-ups


def test_a_diverging_learning_rate_stops_at_its_step_and_keeps_the_last_good_checkpoint(reference, tmp_path,
                                                                                        monkeypatch):
    with_shards(reference, tmp_path)
    written, real_save = {}, train_agd.save_state

    def save_state(file, student, opt, sched, step, *rest):  # what each checkpoint held when it was written
        real_save(file, student, opt, sched, step, *rest)
        written[step] = file.read_bytes()

    monkeypatch.setattr(train_agd, "save_state", save_state)
    with pytest.raises(runs.Diverged, match=r"training diverged at step \d+: .* not finite.* lower --lr than 1e\+08"
                       ) as e:
        run(tmp_path, "--lr", "1e8", "--train-steps", "30", "--save-every", "1")
    step = int(re.search(r"at step (\d+)", str(e.value)).group(1))
    assert written and max(written) == step  # a checkpoint after every good step, none after the bad one
    assert (tmp_path / "train_state.pt").read_bytes() == written[step]  # bit for bit as it was
    assert f"train_state.pt at step {step}, is kept" in str(e.value)
    state = torch.load(tmp_path / "train_state.pt", weights_only=True)
    assert checkpoint.non_finite(state["adapters"]) is None
    assert not (tmp_path / "adapters.safetensors").exists()


def fresh_student(base):
    torch.manual_seed(0)
    defaults = families.FAMILIES["tiny"].train
    return adapters.attach(base.model, **base.adapter_options(**{k: defaults[k] for k in train_agd.ADAPTER_OPTIONS
                                                                 if k in defaults}))


@pytest.fixture(scope="module")
def fp16_base():
    """The tiny teacher in float16 on the CPU: torch 2.13 runs its autocast and its GradScaler there."""
    return families.load("tiny", dtype=torch.float16)


def test_fp16_overflows_are_skipped_and_counted(reference, fp16_base, tmp_path, monkeypatch, capsys):
    """Real fp16 overflows in backward: the scaler starts at 2^24 (its default is 2^16), which this model's
    gradients overflow in float16, so the first steps are skipped, the scale halved, until it fits."""
    monkeypatch.setattr(torch.amp, "GradScaler", functools.partial(torch.amp.GradScaler, init_scale=2.0 ** 24))
    data = trajectories.load_shards(reference / "trajectories")
    student = fresh_student(fp16_base)
    before = {k: v.clone() for k, v in student.adapter_state_dict().items()}
    train_agd.train(student, lambda step: data, train_agd.Training(8, 2, 1e-3, save_every=100), tmp_path)
    state = torch.load(tmp_path / "train_state.pt", weights_only=True)
    skipped = state["skipped"]
    assert skipped[0] == 0 and 0 < len(skipped) < 8, skipped  # measured: steps 0, 1, 3, 4, 5
    assert len(state["losses"]) == 8 - len(skipped)  # the skipped steps' losses are not counted
    out, err = capsys.readouterr()
    assert len(re.findall(r"step \d+: float16 overflow, skipped \(loss scale", out)) == len(skipped)  # the log
    assert f"float16: {len(skipped)} of 8 steps skipped" in out
    assert f"skipped={len(skipped)}" in err  # the progress bar
    after = student.adapter_state_dict()
    assert checkpoint.non_finite(after) is None and any(not torch.equal(before[k], after[k]) for k in after)


def test_a_run_of_fp16_overflows_stops_the_run(reference, fp16_base, tmp_path):
    data = trajectories.load_shards(reference / "trajectories")
    with pytest.raises(runs.Diverged, match=r"at step (\d+): 3 steps in a row overflowed in float16.*--dtype bfloat16"):
        train_agd.train(fresh_student(fp16_base), lambda step: data,
                        train_agd.Training(20, 2, 1e8, save_every=100, max_skips=3), tmp_path)
    assert not (tmp_path / "train_state.pt").exists()


def test_save_and_load_refuse_non_finite_tensors(tmp_path):
    student = fresh_student(families.load("tiny"))
    key = sorted(student.adapter_state_dict())[5]
    with torch.no_grad():
        student.adapter_state_dict()[key].view(-1)[3] = float("nan")
    with pytest.raises(checkpoint.CheckpointError, match=rf"bad\.safetensors: not written: adapter tensor {key} is"):
        student.save(tmp_path / "bad.safetensors")
    assert not list(tmp_path.iterdir())

    good = fresh_student(families.load("tiny"))
    good.save(tmp_path / "good.safetensors")
    tensors, meta = checkpoint.read_tensors(tmp_path / "good.safetensors"), checkpoint.read_metadata(
        tmp_path / "good.safetensors")
    tensors[key].view(-1)[0] = float("inf")
    checkpoint.save_file(tensors, tmp_path / "edited.safetensors", metadata=meta)
    with pytest.raises(checkpoint.CheckpointError, match=rf"edited\.safetensors: tensor {key} is not finite"):
        adapters.load(families.load("tiny").model, tmp_path / "edited.safetensors")


def test_a_sample_that_turns_non_finite_is_named_with_its_step():
    base = families.load("tiny")
    labels = torch.tensor([0, 3, 7, 9])
    g = torch.Generator().manual_seed(0)
    noise = torch.randn((4, *base.shape), generator=g)
    calls = []

    def denoise(x, t):  # sample 2 turns NaN at the third step, sample 3 at the fourth
        out = base.model(x, t, y=labels)
        if len(calls) >= 2:
            out[2] = float("nan")
        if len(calls) >= 3:
            out[3, 0, 0, 0] = float("inf")
        calls.append(t)
        return out

    check = sample.FiniteCheck(5)
    x = guidance.sample(denoise, noise, base.scheduler, base.scheduler.timesteps(5), generator=g, callback=check)
    with pytest.raises(sample.NonFiniteSample, match=r"sample 2 \(class 7\) turned non-finite \(nan or inf\) at "
                                                     r"step 3 of 5; 1 more samples did too"):
        check.check(x, labels)
    fine = sample.FiniteCheck(5)
    x = guidance.sample(lambda x, t: base.model(x, t, y=labels), noise, base.scheduler, base.scheduler.timesteps(5),
                        callback=fine)
    fine.check(x, labels)  # nothing to say


def test_the_sample_cli_exits_non_zero_on_a_non_finite_sample(tmp_path, monkeypatch):
    """Finite adapters (save takes them) so large that every sample overflows: an error, not a black PNG."""
    student = fresh_student(families.load("tiny"))
    with torch.no_grad():
        for v in student.adapter_state_dict().values():
            v.fill_(1e30)
    student.save(tmp_path / "huge.safetensors")
    monkeypatch.setattr(sys, "argv", ["sample.py", "--model", "tiny", "--adapters", str(tmp_path / "huge.safetensors"),
                                      "--w", "3", "--steps", "3", "--out", str(tmp_path / "x.png")])
    with pytest.raises(SystemExit) as e:  # the CLI as `python sample.py ...` runs it
        runpy.run_path(str(ROOT / "sample.py"), run_name="__main__")
    assert re.fullmatch(r"error: sample 0 \(class 0\) turned non-finite \(nan or inf\) at step 1 of 3; 9 more "
                        r"samples did too; no image is written", str(e.value.code))  # exit status 1
    assert not (tmp_path / "x.png").exists()


# -----------------------------------------------------------------------------
# interrupted and conflicting runs


def wait_for(proc, pattern, timeout=300):
    """Read the child's stderr until `pattern` shows (its progress bar), while it runs."""
    seen, deadline = "", time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if select.select([proc.stderr], [], [], 1)[0]:
            seen += os.read(proc.stderr.fileno(), 1 << 16).decode(errors="replace")
            if re.search(pattern, seen):
                return seen
    raise AssertionError(f"the child never showed {pattern!r}: {seen[-2000:]}")


def test_sigterm_checkpoints_and_resume_gives_the_uninterrupted_adapters(reference, tmp_path):
    """A real SIGTERM to a real `python train_agd.py` (after it reports a step): it ends that step, writes a
    checkpoint, says how to resume, exits 143; a second run into its --out is refused while it runs."""
    steps = ["--train-steps", "20", "--save-every", "1000"]
    run(with_shards(reference, tmp_path / "whole"), *steps)
    out = with_shards(reference, tmp_path / "stopped")
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # the threads of this process: same bits
    proc = subprocess.Popen([sys.executable, "train_agd.py", "--out", str(out), *TOY, *steps], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for(proc, r"train: +\d+%\|[^|]*\| +[1-9]\d*/20")
        with pytest.raises(runs.RunError, match=rf"in use by another run \(PID {proc.pid} on "
                                                rf"{re.escape(socket.gethostname())}, since .*a new --out"):
            run(out, *steps)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    err = err.decode()
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert re.search(r"SIGTERM: stopped after step \d+ of 20; the training state is saved in .*train_state\.pt\. "
                     r"To continue: python train_agd\.py .* --resume", err)
    stopped_at = torch.load(out / "train_state.pt", weights_only=True)["step"]
    assert 1 <= stopped_at < 20 and not (out / "run.lock").exists() and no_temp_files(out)
    run(out, *steps, "--resume")
    assert_same(adapter_tensors(tmp_path / "whole"), adapter_tensors(out))


@contextmanager
def writes_to(name, action, at=1):
    """checkpoint.atomic_write, where the `at`-th write of the file called `name` is `action(f, data)` instead.

    Yields a dict: "before", what that file held when the faulty write began (None: no file).
    """
    real, count, seen = checkpoint.atomic_write, [0], {}

    class Faulty:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            return action(self.f, data)

        def __getattr__(self, attr):
            return getattr(self.f, attr)

    @contextmanager
    def atomic_write(file):
        file = Path(file)
        count[0] += file.name == name
        with real(file) as f:
            if file.name == name and count[0] == at:
                seen["before"] = file.read_bytes() if file.exists() else None
                yield Faulty(f)
            else:
                yield f

    checkpoint.atomic_write = atomic_write
    try:
        yield seen
    finally:
        checkpoint.atomic_write = real


def test_a_signal_mid_write_drops_the_shard_and_rerunning_completes(reference, tmp_path):
    """A real SIGTERM to this process while shard 1 is half written: the shard is dropped, no temp file stays."""
    def half_then_signal(f, data):
        f.write(bytes(data[:len(data) // 2]))
        os.kill(os.getpid(), signal.SIGTERM)  # its handler runs here, at the next bytecode
        raise AssertionError("the signal did not stop the write")

    with writes_to("shard_00001.safetensors", half_then_signal), pytest.raises(runs.Interrupted) as e:
        run(tmp_path, *SHORT)
    assert e.value.exit_code == 128 + signal.SIGTERM and str(e.value).startswith("SIGTERM: stopped")
    shards = tmp_path / "trajectories"
    assert [p.name for p in shards.iterdir()] == ["shard_00000.safetensors"] and no_temp_files(tmp_path)
    assert (shards / "shard_00000.safetensors").read_bytes() == \
        (reference / "trajectories" / "shard_00000.safetensors").read_bytes()
    run(tmp_path, *SHORT, "--resume")
    assert_same(adapter_tensors(reference), adapter_tensors(tmp_path))


def test_resume_with_other_options_names_each_and_allows_more_steps(reference, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    with pytest.raises(runs.RunError) as e:
        run(out, *SHORT, "--resume", "--lr", "0.002", "--hidden-dim", "32", "--w-max", "8", "--batch-size", "4")
    message = str(e.value)
    lr, width = families.FAMILIES["tiny"].train["lr"], families.FAMILIES["tiny"].train["hidden_dim"]
    for named in (f"--lr {lr}, now 0.002", f"--hidden-dim {width}, now 32", "--w-max 6.0, now 8.0",
                  "--batch-size 8, now 4"):
        assert named in message
    assert "\n" not in message and "give the options it was made with, or a new --out" in message
    with pytest.raises(runs.RunError, match=r"--w-max 6\.0, now 8\.0\. To go on") as e:  # the shards would be reused
        run(out, *SHORT, "--w-max", "8", "--lr", "0.002")
    assert "--lr" not in str(e.value)  # without --resume, training starts over: only the data must agree
    capsys.readouterr()
    run(out, "--train-steps", "8", "--save-every", "4", "--resume")
    assert "resuming with other options, which may change: --train-steps 6 -> 8, --save-every 3 -> 4" in \
        capsys.readouterr().out
    assert json.loads((out / "run.json").read_text())["train_steps"] == 8
    assert torch.load(out / "train_state.pt", weights_only=True)["step"] == 8


def test_a_stale_lock_is_taken_over_and_a_foreign_one_refused(reference, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference, out)  # a finished run: --resume has only the adapters to write
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # its PID now names no process
    lock = out / "run.lock"
    lock.write_text(json.dumps({"pid": gone.pid, "host": socket.gethostname(), "started": "earlier"}))
    run(out, *SHORT, "--resume")
    assert not lock.exists() and (out / "adapters.safetensors").is_file()
    lock.write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "earlier"}))
    with pytest.raises(runs.RunError, match=r"\(PID 1 on elsewhere, since earlier\).*if that run was killed, delete"):
        run(out, *SHORT, "--resume")
    lock.write_text("")  # a lock file that names none (its writer died at once)
    with pytest.raises(runs.RunError, match=r"names none; if no run uses the folder, delete it"):
        run(out, *SHORT, "--resume")


# -----------------------------------------------------------------------------
# a full disk


def full_disk(f, data):
    """What write(2) does on a full disk: it takes part of the data, then fails with ENOSPC."""
    f.write(bytes(data[:len(data) // 2]))
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("name, at", [("shard_00001.safetensors", 1), ("train_state.pt", 2),
                                      ("adapters.safetensors", 1)])
def test_a_full_disk_at_each_write_is_one_line_and_resume_completes(reference, tmp_path, name, at):
    """ENOSPC raised at the write (what a full disk gives): the error names the file, the file as it was
    before is kept (train_state.pt: the step-3 checkpoint, when step 6's is written), no temp file stays,
    and --resume then finishes the run as if nothing had happened."""
    if name != "shard_00001.safetensors":
        with_shards(reference, tmp_path)
    if name == "adapters.safetensors":
        (tmp_path / name).write_bytes(b"a previous run's adapters")
    with writes_to(name, full_disk, at) as seen, pytest.raises(checkpoint.WriteError) as e:
        run(tmp_path, *SHORT)
    assert re.fullmatch(rf"{re.escape(str(tmp_path / ('trajectories' if name.startswith('shard') else '') / name))}: "
                        r"could not be written \(No space left on device\); the file as it was before, if any, is kept",
                        str(e.value))
    assert (tmp_path / name).read_bytes() == seen["before"] if seen["before"] else not (tmp_path / name).exists()
    assert no_temp_files(tmp_path) and not (tmp_path / "run.lock").exists()
    run(tmp_path, *SHORT, "--resume")
    assert_same(adapter_tensors(reference), adapter_tensors(tmp_path))


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MB tmpfs; skipped where mounting is not allowed (not root, a container without CAP_SYS_ADMIN)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mount = shutil.which("mount")
    done = mount and subprocess.run([mount, "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)], capture_output=True)
    if not done or done.returncode:
        pytest.skip("no tmpfs can be mounted here; test_a_full_disk_at_each_write_... raises ENOSPC at the write")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


def test_a_full_tmpfs_fails_one_checkpoint_and_resume_completes(reference, small_disk):
    """A real full disk: room for the step-3 checkpoint, not for the step-6 one beside it (written before the
    old is replaced). Then room is made, and --resume finishes the run as if nothing had happened."""
    out = with_shards(reference, small_disk / "run")
    page = os.statvfs(small_disk).f_frsize
    state = -(-(reference / "train_state.pt").stat().st_size // page)  # the pages one checkpoint takes
    room = state + state // 2 + 8  # and a few for run.json, run.lock, losses.json
    with open(small_disk / "filler", "wb") as f:
        f.write(bytes((os.statvfs(small_disk).f_bavail - room) * page))
    with pytest.raises(checkpoint.WriteError, match=r"train_state\.pt: could not be written \(No space left on device"):
        run(out, *SHORT)
    assert torch.load(out / "train_state.pt", weights_only=True)["step"] == 3 and no_temp_files(out)
    (small_disk / "filler").unlink()
    run(out, *SHORT, "--resume")
    assert_same(adapter_tensors(reference), adapter_tensors(out))
