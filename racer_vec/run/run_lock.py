"""One writer per run (design §8): a process that trains in a run directory holds an flock on its
`run.lock`, and the file names the holder (`PID HOST`). An flock belongs to an open file and goes with
the last process holding it, so a killed run leaves no stale lock. A second train.py on the run is
refused (exit 2) with the holder named.

A sweep's trial takes the same lock before it starts train.py, which inherits the trial's open lock
file: its number is in RACER_VEC_RUN_LOCK_FD, and train.py takes it (after checking with fstat that it
is this run's lock file) instead of locking again. No JAX here.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from pathlib import Path

from racer_vec.config import ConfigError
from racer_vec.write_failures import os_error_reason

LOCK_FILE = "run.lock"
LOCK_FD_ENV = "RACER_VEC_RUN_LOCK_FD"
"""The number of an inherited open lock file (a sweep trial's, for its train.py)."""


def lock_path(run_dir: Path | str) -> Path:
    return Path(run_dir) / LOCK_FILE


def open_lock_file(run_dir: Path | str) -> int:
    """The run's lock file, open (run directory and file created if need be); OSError if they cannot be."""
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    return os.open(lock_path(run_dir), os.O_RDWR | os.O_CREAT, 0o644)


def try_lock(fd: int) -> bool:
    """Take the flock of the open file `fd` if no other open file holds it (no wait)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def is_current(fd: int, path: Path) -> bool:
    """Whether the open file `fd` is the file at `path` (not one removed or replaced since)."""
    try:
        mine, there = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (mine.st_dev, mine.st_ino) == (there.st_dev, there.st_ino)


def record_holder(fd: int, pid: int) -> None:
    """Write `PID HOST` into the held lock file."""
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{pid} {socket.gethostname()}\n".encode(), 0)


def read_holder(path: Path) -> tuple[int, str] | None:
    """(pid, host) recorded in a lock file, or None."""
    try:
        pid, host = path.read_text().split()
        return int(pid), host
    except (OSError, ValueError):
        return None


def describe_holder(path: Path) -> str:
    holder = read_holder(path)
    if holder is None:
        return "another process"
    pid, host = holder
    return f"process {pid}" + ("" if host == socket.gethostname() else f" on {host}")


def is_locked(path: Path) -> bool:
    """Whether a process holds the lock file `path` (taken and dropped at once when none does)."""
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return False
    try:
        if try_lock(fd):
            fcntl.flock(fd, fcntl.LOCK_UN)
            return False
        return True
    finally:
        os.close(fd)


def _inherited(path: Path) -> int | None:
    """The open lock file this process inherited for `path` (its flock held), or None."""
    value = os.environ.pop(LOCK_FD_ENV, None)
    if value is None:
        return None
    with contextlib.suppress(ValueError):
        fd = int(value)
        if is_current(fd, path) and try_lock(fd):
            os.set_inheritable(fd, False)  # the run's processes (workers, wandb) must not hold it
            return fd
    return None


class RunLock:
    """The held lock of one run directory; released by `release()` or when the process ends."""

    def __init__(self, run_dir: Path | str, flag: str):
        """Hold the lock of `run_dir`, creating it if need be; ConfigError when another process holds
        it, or when the directory cannot be written (`flag` names where the path came from)."""
        self.run_dir = Path(run_dir)
        self.path = lock_path(run_dir)
        self.fd = _inherited(self.path)
        try:
            if self.fd is None:
                self.fd = self._take()
            record_holder(self.fd, os.getpid())
        except OSError as exc:
            self.release()
            raise ConfigError(f"{flag}: cannot write there ({os_error_reason(exc)})") from None

    def _take(self) -> int:
        while True:
            fd = open_lock_file(self.run_dir)
            if not try_lock(fd):
                os.close(fd)
                raise ConfigError(
                    f"{self.run_dir} is in use: {describe_holder(self.path)} trains in it (it holds {self.path}); "
                    f"wait for it to end, or stop it, before training in this run"
                )
            if is_current(fd, self.path):
                return fd
            os.close(fd)  # the file was removed (an unused run's, at its release) after it was opened

    def release(self) -> None:
        """Drop the lock; a run directory that holds nothing but the lock file (a run that never
        started) is removed."""
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            if [p.name for p in self.run_dir.iterdir()] == [LOCK_FILE]:
                self.path.unlink()
                self.run_dir.rmdir()
        os.close(self.fd)
        self.fd = None
