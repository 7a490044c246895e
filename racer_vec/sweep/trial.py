"""One trial's process, run inside its Ray worker (no Ray here): train.py under the supervisor, the
trial's lock that train.py inherits, the metrics.jsonl lines it appends, and the state of its run
directory."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import typing
from datetime import datetime
from pathlib import Path

from racer_vec.config import ConfigError
from racer_vec.run import checkpoint_files
from racer_vec.run.jsonl import parse_jsonl, read_jsonl
from racer_vec.run.run_lock import (
    LOCK_FD_ENV, LOCK_FILE, describe_holder, is_current, is_locked, lock_path, open_lock_file, read_holder,
    record_holder, try_lock,
)  # fmt: skip
from racer_vec.sweep.cli import say
from racer_vec.sweep.grid import trial_argv, trial_name
from racer_vec.sweep.sweep_dir import TRAIN_LOG

TRAIN_PY = Path(__file__).resolve().parents[2] / "train.py"
SUPERVISOR = "racer_vec.sweep.supervisor"
TRIAL_ENV = "RACER_VEC_SWEEP_TRIAL"
"""Set to the run directory in the environment of a trial's processes."""
LOCK_WAIT_S = 300.0
"""How long a retry, or the sweep at its end, waits for a trial process to write its final checkpoint."""
STOP_WAIT_S = 60.0
"""How long a stopped trial waits for train.py's final checkpoint. Longer than Tune waits for a stopping
trial (about 10 s, then it kills the worker): a Ray worker that exits normally kills its children."""
POLL_S = 0.5
GPU_MEMORY = 0.75
"""JAX preallocates 75% of a GPU's memory; trials sharing a GPU split that between them."""


class TrialFailed(Exception):
    """A trial's train.py died or could not start; Ray Tune retries the trial."""


def carry_niceness(session_leader: int) -> None:
    """Give a new session's scheduling group this process's nice value (design §12). Linux's autogroup
    puts each session in a group of its own and shares the CPU between groups by the group's nice
    value, not its processes': a trial of a sweep started with `nice -n 19` would compete at nice 0
    with the shell it was started from."""
    for _ in range(20):
        try:
            Path(f"/proc/{session_leader}/autogroup").write_text(str(os.getpriority(os.PRIO_PROCESS, 0)))
            return
        except BlockingIOError:  # EAGAIN: without CAP_SYS_ADMIN the kernel takes one change per 0.1 s
            time.sleep(0.1)
        except OSError:  # no autogroup here: the processes' own nice values decide
            return


def latest_step(run_dir: Path) -> int | None:
    """The run's newest intact checkpoint (its agent and state: what the report evaluates), or None."""
    try:
        return checkpoint_files.newest_intact(Path(run_dir) / "checkpoints")[0]
    except ConfigError:
        return None


def saved_max_steps(run_dir: Path) -> int | None:
    try:
        return int(json.loads((Path(run_dir) / "config.json").read_text())["max_steps"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def is_finished(run_dir: Path) -> bool:
    step, max_steps = latest_step(run_dir), saved_max_steps(run_dir)
    return step is not None and max_steps is not None and step >= max_steps


def trial_environment(gpus: float, base: typing.Mapping[str, str], run_dir: Path | str = "") -> dict[str, str]:
    """train.py's environment in a trial with `gpus` GPUs (Ray already set CUDA_VISIBLE_DEVICES)."""
    # PYTHONUNBUFFERED: train.log follows the run as it goes. TRIAL_ENV marks the trial's processes
    # (train.py, its env workers, wandb), which live in sessions of their own, for `ps e` and the tests.
    env = {**base, "PYTHONUNBUFFERED": "1", TRIAL_ENV: str(run_dir)}
    if gpus == 0:
        env.setdefault("JAX_PLATFORMS", "cpu")  # no GPU was reserved: JAX must not take one
    elif gpus < 1:
        # JAX preallocates 75% of the GPU's memory: a second trial on the same GPU would not start
        env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", f"{GPU_MEMORY * gpus:.3f}")
    return env


class MetricsTail:
    """The complete lines appended to a metrics.jsonl since this object was made (a torn line, left
    by a killed attempt, skipped with a warning)."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = path.stat().st_size if path.exists() else 0
        self.partial = b""

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        self.offset += len(data)
        *lines, self.partial = (self.partial + data).split(b"\n")
        return parse_jsonl(lines, str(self.path), first_line=None)

    def last(self) -> dict:
        """The file's last record (an earlier attempt's), or {}."""
        rows = read_jsonl(self.path)
        return rows[-1] if rows else {}


def acquire_lock(run_dir: Path, timeout: float) -> int:
    """The run's lock (racer_vec.run.run_lock), held by an open file that train.py inherits, once an
    earlier attempt's train.py, which holds it, has exited. A process that is not one of this run's
    trials (a `train.py --resume` beside the sweep) is not waited for."""
    path = lock_path(run_dir)
    deadline = time.monotonic() + timeout
    killed = False
    while True:
        fd = open_lock_file(run_dir)
        if try_lock(fd) and is_current(fd, path):
            os.ftruncate(fd, 0)
            return fd
        os.close(fd)
        if _holder_is_trial(run_dir) is False:
            raise TrialFailed(f"{run_dir} is in use by {describe_holder(path)}, which is not this sweep's trial")
        if time.monotonic() > deadline:
            if killed or not kill_lock_holder(run_dir):
                raise TrialFailed(f"an earlier attempt's train.py still holds {path}")
            # told to stop LOCK_WAIT_S ago and still running: hung
            killed, deadline = True, time.monotonic() + 10.0
        time.sleep(POLL_S)


def _holder_is_trial(run_dir: Path) -> bool | None:
    """Whether the process named in the run's lock file is one of this run's trial processes (marked
    in its environment); None when that cannot be told (no pid yet, gone, another machine)."""
    holder = read_holder(lock_path(run_dir))
    if holder is None or holder[1] != socket.gethostname():
        return None
    try:
        environ = Path(f"/proc/{holder[0]}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    return f"{TRIAL_ENV}={run_dir}".encode() in environ


def kill_lock_holder(run_dir: Path) -> bool:
    """SIGKILL the process group of the trial process that holds the run's lock, if it runs on this
    machine. Only called while the lock is held, so the recorded pid is still that process's."""
    if not _holder_is_trial(run_dir):
        return False
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(os.getpgid(read_holder(lock_path(run_dir))[0]), signal.SIGKILL)
    return True


def describe_exit(code: int) -> str:
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    if code == 130:
        return "was interrupted (exit 130) by a signal the sweep did not send"
    return f"exited with code {code}"


def _last_log_line(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(f.seek(0, os.SEEK_END) - 4096, 0))
            lines = [line.strip() for line in f.read().decode(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1][:300] if lines else ""


class TrialProcess:
    """One attempt of a trial: train.py as a subprocess, and the metrics.jsonl lines it appends."""

    def __init__(self, spec: dict, config: dict, node: str):
        self.spec, self.config = spec, config
        self.node = node  # where this attempt runs, named in train.log: on a cluster, which machine ran what
        self.name = trial_name(config)
        sweep_dir = Path(spec["sweep_dir"])
        self.run_dir = sweep_dir / self.name
        self.proc: subprocess.Popen | None = None
        self.lock_fd: int | None = None
        self.log = None
        self.group_killed = False
        self.pending: list[dict] = []
        self.last_row: dict = {}

    def start(self) -> None:
        self.lock_fd = acquire_lock(self.run_dir, LOCK_WAIT_S)  # creates the run directory
        self.tail = MetricsTail(self.run_dir / "metrics.jsonl")
        self.last_row = self.tail.last()
        if is_finished(self.run_dir):
            return  # an earlier attempt finished and died before Tune heard of it: nothing to train
        if not TRAIN_PY.is_file():
            raise TrialFailed(f"{TRAIN_PY} not found: racer-vec must be installed from a checkout (pip install -e)")
        # any saved step: train.py --resume picks the newest intact one (or says why there is none)
        saved = checkpoint_files.steps(self.run_dir / "checkpoints")
        argv = ["--resume", str(self.run_dir)] if saved else trial_argv(self.spec, self.config)
        self.log = open(self.run_dir / TRAIN_LOG, "ab")
        started = f"{datetime.now():%Y-%m-%d %H:%M:%S}, on {self.node}"
        header = f"--- sweep trial {self.name}, {started}: train.py {' '.join(argv)}\n"
        self.log.write(header.encode())
        self.log.flush()
        cwd = self.spec["cwd"] if Path(self.spec["cwd"]).is_dir() else str(self.run_dir.parent)
        self.proc = subprocess.Popen(
            # -P: the supervisor is this checkout's, whatever the directory the sweep was started in holds
            [sys.executable, "-P", "-m", SUPERVISOR, str(os.getpid()), str(self.lock_fd), str(TRAIN_PY), *argv],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT, cwd=cwd,
            # train.py takes the run's lock from this open file (design §8): held while train.py lives,
            # even if this worker and the supervisor die
            env={**trial_environment(self.spec["gpus_per_trial"], os.environ, self.run_dir), LOCK_FD_ENV: str(self.lock_fd)},
            start_new_session=True,  # a terminal's Ctrl-C goes to the sweep, which decides
            pass_fds=(self.lock_fd,),
        )  # fmt: skip
        record_holder(self.lock_fd, self.proc.pid)  # until train.py records itself; its process group
        carry_niceness(self.proc.pid)

    def next_result(self) -> tuple[dict, bool]:
        """The next metrics line and whether the run has finished; raises TrialFailed if it died."""
        while True:
            self.pending += self.tail.read()
            running = self.proc is not None and self.proc.poll() is None
            if running and not self.pending:
                time.sleep(POLL_S)
                continue
            if not running:
                self.pending += self.tail.read()
                if self.proc is not None and self.proc.returncode != 0:
                    self._fail(self.proc.returncode)
                self._release()
            done = not running and len(self.pending) <= 1
            if self.pending:
                self.last_row = self.pending.pop(0)
            return self.last_row, done

    def _fail(self, code: int) -> None:
        self._release(wait=LOCK_WAIT_S)
        said = _last_log_line(self.run_dir / TRAIN_LOG) if code > 0 else ""
        raise TrialFailed(
            f"the trial's process {describe_exit(code)} at {self.last_row.get('env_steps', 0)} env steps"
            + (f" ({said})" if said else "")
            + f"; latest checkpoint: {latest_step(self.run_dir)}; log: {self.run_dir / TRAIN_LOG}"
        )

    def stop(self, timeout: float) -> None:
        """SIGTERM train.py (it checkpoints and exits) and wait for it, up to `timeout` s. A run still
        saving then keeps the lock; the retry or the sweep's end waits for it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                return
        self._release()

    def _release(self, wait: float = 0.0) -> None:
        """Close the log and the lock, once the run's process group is gone: after `wait` s, what is
        left (a killed train.py's env workers, say) is killed. A train.py whose supervisor was killed
        is still writing its final checkpoint meanwhile."""
        if self.proc is not None and not self.group_killed:
            deadline = time.monotonic() + wait
            while _group_alive(self.proc.pid) and time.monotonic() < deadline:
                time.sleep(POLL_S)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.group_killed = True
        if self.log is not None:
            self.log.close()
            self.log = None
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if not Path("/proc").is_dir():
        return True
    # zombies (orphans that init has not reaped yet) count as gone
    return any(_is_running(pid) for pid in _group_members(pgid))


def _group_members(pgid: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if os.getpgid(int(entry.name)) == pgid:
                    members.append(int(entry.name))
    return members


def _is_running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def wait_for_trial_processes(sweep_dir: Path, timeout: float = LOCK_WAIT_S) -> list[str]:
    """Wait until no trial process of the sweep runs on this machine (a stopped run may still be
    writing its final checkpoint); kill those left after `timeout` or a Ctrl-C. Returns their trials."""
    # a run that another process (train.py --resume beside the sweep) trains in is not waited for
    busy = [p.parent for p in sorted(sweep_dir.glob(f"*/{LOCK_FILE}"))
            if is_locked(p) and _holder_is_trial(p.parent) is not False]  # fmt: skip
    if not busy:
        return []
    names = ", ".join(p.name for p in busy)
    say(f"waiting for {len(busy)} trial process(es) to write a final checkpoint: {names} (Ctrl-C kills them)")
    deadline = time.monotonic() + timeout
    try:
        while busy and time.monotonic() < deadline:
            time.sleep(POLL_S)
            busy = [p for p in busy if is_locked(lock_path(p))]
    except KeyboardInterrupt:
        pass
    killed = [p.name for p in busy if is_locked(lock_path(p)) and kill_lock_holder(p)]
    if killed:
        say(f"killed {', '.join(killed)}: they resume from their latest periodic checkpoint")
    return killed
