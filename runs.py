"""What keeps a training run's folder (--out) safe: one run at a time, the same options on resume, a clean stop.

    with runs.Lock(out), runs.Signals() as signals:             # a second run into `out` is refused at once
        changed = runs.check_options(out, options, fixed)      # out/run.json: what made the run
        ... train(..., signals=signals)                        # SIGINT / SIGTERM: checkpoint, then Interrupted

Every failure here is one line for the user (RunError, Interrupted) that says what to do next.
"""

import json
import os
import shlex
import signal
import socket
import sys
import threading
import time
from contextlib import contextmanager, suppress
from pathlib import Path

import torch
import torch.distributed as dist

import checkpoint

LOCK_FILE = "run.lock"
OPTIONS_FILE = "run.json"


class RunError(ValueError):
    """A run that cannot go on as asked; the message says why and the ways on."""


class Diverged(RunError):
    """A non-finite loss or gradient (or a run of fp16 overflows) stopped the training."""


class Interrupted(BaseException):
    """SIGINT or SIGTERM stopped the run cleanly; the message says what was kept.

    A BaseException, as KeyboardInterrupt is: no `except Exception` on the way up may swallow it.
    """

    def __init__(self, signum, message):
        super().__init__(f"{signal.Signals(signum).name}: {message}")
        self.exit_code = 128 + signum  # what a shell reports for a job killed by that signal


def resume_command(argv):
    """The command line that continues this run: the same one, with --resume."""
    return " ".join(["python", *map(shlex.quote, argv)] + ([] if "--resume" in argv else ["--resume"]))


# -----------------------------------------------------------------------------
# one run per folder


class Lock:
    """A lock file in the run's folder naming its holder (PID, host): a second run into the folder is refused.

    A lock whose holder is gone (a killed run: its PID no longer runs on this host) is taken over; one
    held on another host cannot be checked from here, and the error says how to clear it.
    """

    def __init__(self, folder):
        self.file = Path(folder) / LOCK_FILE
        self.mine = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}

    def __enter__(self):
        self.file.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a lock released or taken over meanwhile: look again
            try:
                fd = os.open(self.file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = read_json(self.file)
                if holder is not None and holder_is_gone(holder):
                    self._take_over(holder)
                elif holder is not None:
                    raise RunError(self._refusal(holder)) from None
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(self.mine, f)
            return self
        raise RunError(f"{self.file}: could not take the lock; is another run starting in {self.file.parent}?")

    def __exit__(self, *exc):
        if read_json(self.file) == self.mine:
            self.file.unlink(missing_ok=True)

    def _take_over(self, holder):
        """Move a gone holder's lock aside: of two runs taking it over at once, one moves it; the other finds none."""
        aside = self.file.with_name(f"{self.file.name}.{os.getpid()}.stale")
        try:
            os.rename(self.file, aside)
        except FileNotFoundError:
            return
        if read_json(aside) != holder:  # a live run's lock, made since the gone one's was read: put it back
            with suppress(FileExistsError):
                os.link(aside, self.file)
        aside.unlink()

    def _refusal(self, holder):
        if not holder:
            return (f"{self.file.parent} is in use by another run ({self.file} names none; if no run uses the "
                    f"folder, delete it), or give a new --out")
        where = f"PID {holder.get('pid')} on {holder.get('host')}, since {holder.get('started')}"
        clear = "" if holder.get("host") == self.mine["host"] else f" (if that run was killed, delete {self.file})"
        return f"{self.file.parent} is in use by another run ({where}): wait for it to end, or give a new --out{clear}"


def read_json(file):
    """A small JSON file's content: None if it is missing, {} if it cannot be read (half written)."""
    try:
        return json.loads(Path(file).read_text())
    except FileNotFoundError:
        return None
    except (ValueError, OSError):
        return {}


def holder_is_gone(holder):
    """Whether a lock's holder no longer runs: only known for a process of this host."""
    if not holder or holder.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(holder["pid"]), 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return True
    except (PermissionError, KeyError, ValueError, OverflowError):
        return False  # another user's process, or a lock that names none: not ours to take
    return False


# -----------------------------------------------------------------------------
# the options a run was made with


def flag(key):
    """An option's name as the CLI spells it."""
    files = {"prompts": "the prompts of --prompt-file", "negative_prompts": "the prompts of --negative-prompt-file"}
    return files.get(key, "--" + key.replace("_", "-"))


def check_options(folder, options, fixed, write=True):
    """Compare `options` with those stored by the run that made `folder`, then store them (if `write`).

    A difference in a `fixed` option (one that changes the adapters' shapes, the data or the schedule)
    is a RunError listing each; the other differences are returned, as text, to be said.
    """
    file = Path(folder) / OPTIONS_FILE
    options = json.loads(json.dumps(options, default=str))  # as stored: paths and dtypes as text, tuples as lists
    stored = read_json(file)
    if stored == {}:
        raise checkpoint.CheckpointError(f"{file}: unreadable; delete it to store this run's options anew")
    stored = stored or {}
    differ = [k for k in options if k in stored and stored[k] != options[k]]  # options added since: not compared
    conflicts = [k for k in differ if k in fixed]
    if conflicts:
        listed = "; ".join(f"{flag(k)} {stored[k]}, now {options[k]}" for k in conflicts)
        raise RunError(f"{folder} was made with other options: {listed}. To go on, give the options it was made "
                       "with, or a new --out for these")
    if write:
        with checkpoint.atomic_write(file) as f:
            f.write((json.dumps(options, indent=1) + "\n").encode())
    return ", ".join(f"{flag(k)} {stored[k]} -> {options[k]}" for k in differ)


# -----------------------------------------------------------------------------
# SIGINT and SIGTERM


class Signals:
    """SIGINT and SIGTERM (what a job scheduler sends before it kills a job), turned into a clean stop.

    Outside `deferred()` a signal raises Interrupted at once: what is being collected is dropped (the
    writes are atomic, so no partial file stays). Inside it, the signal is recorded and `requested()`
    says so at the end of the training step, which then checkpoints. A second signal stops at once.
    """

    def __init__(self):
        self.received, self._deferring, self._previous = None, False, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # Python runs handlers in the main thread only
            for s in (signal.SIGINT, signal.SIGTERM):
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame):
        if self._deferring and self.received is None:
            self.received = signum
            print(f"\n{signal.Signals(signum).name}: stopping after this step, with a checkpoint "
                  "(a second signal stops at once)", file=sys.stderr, flush=True)
            return
        raise Interrupted(signum, "stopped; every shard and checkpoint written so far is kept (writes are atomic)")

    @contextmanager
    def deferred(self):
        """A signal waits for the end of the current step (where the training loop asks `requested`)."""
        self._deferring = True
        try:
            yield self
        finally:
            self._deferring = False
        if self.received:  # came during the last step, after the loop's last look: stop here
            raise Interrupted(self.received, "stopped at the end of training; its state is saved")

    def requested(self, world=1, device="cpu"):
        """The signal that came (0: none); under torchrun, one that came to any rank, so that all stop at one step."""
        signum = self.received or 0
        if world > 1:
            agreed = torch.tensor([signum], device=device)
            dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
            signum = int(agreed.item())
        return signum
