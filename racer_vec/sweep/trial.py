"""One trial's process, run inside its Ray worker (no Ray here): train.py under the supervisor, the
trial's lock that train.py inherits, the metrics.jsonl lines it appends, and the state of its run
directory."""

from __future__ import annotations

import contextlib
import fcntl
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
from racer_vec.sweep.cli import say
from racer_vec.sweep.grid import trial_argv, trial_name
from racer_vec.sweep.sweep_dir import LOCK_DIR, TRAIN_LOG

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
    """The complete lines appended to a metrics.jsonl since this object was made."""

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
        rows = []
        for line in lines:
            with contextlib.suppress(json.JSONDecodeError):
                rows.append(json.loads(line))
        return rows

    def last(self) -> dict:
        """The file's last complete line (an earlier attempt's), or {}."""
        if not self.path.exists():
            return {}
        lines = [line for line in self.path.read_bytes().split(b"\n")[:-1] if line.strip()]
        for line in reversed(lines):
            with contextlib.suppress(json.JSONDecodeError):
                return json.loads(line)
        return {}


def acquire_lock(path: Path, timeout: float) -> int:
    """An exclusive flock on `path`, once an earlier attempt's train.py, which holds it, has exited."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + timeout
    killed = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() > deadline:
                if killed or not kill_lock_holder(path):
                    os.close(fd)
                    raise TrialFailed(f"an earlier attempt's train.py still holds {path}") from None
                # told to stop LOCK_WAIT_S ago and still running: hung
                killed, deadline = True, time.monotonic() + 10.0
            time.sleep(POLL_S)


def lock_held(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def kill_lock_holder(lock: Path) -> bool:
    """SIGKILL the process group of the train.py that holds `lock`, if it runs on this machine.
    Only called while the lock is held, so the recorded pid is still that process's."""
    try:
        host, pid = lock.with_suffix(".pid").read_text().split()
    except (OSError, ValueError):
        return False
    if host != socket.gethostname():
        return False
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(int(pid), signal.SIGKILL)
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

    def __init__(self, spec: dict, config: dict):
        self.spec, self.config = spec, config
        self.name = trial_name(config)
        sweep_dir = Path(spec["sweep_dir"])
        self.run_dir = sweep_dir / self.name
        self.lock = sweep_dir / LOCK_DIR / f"{self.name}.lock"
        self.proc: subprocess.Popen | None = None
        self.lock_fd: int | None = None
        self.log = None
        self.group_killed = False
        self.pending: list[dict] = []
        self.last_row: dict = {}

    def start(self) -> None:
        self.lock.parent.mkdir(parents=True, exist_ok=True)
        self.lock_fd = acquire_lock(self.lock, LOCK_WAIT_S)
        self.run_dir.mkdir(parents=True, exist_ok=True)
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
        header = f"--- sweep trial {self.name}, {datetime.now():%Y-%m-%d %H:%M:%S}: train.py {' '.join(argv)}\n"
        self.log.write(header.encode())
        self.log.flush()
        cwd = self.spec["cwd"] if Path(self.spec["cwd"]).is_dir() else str(self.run_dir.parent)
        self.proc = subprocess.Popen(
            # -P: the supervisor is this checkout's, whatever the directory the sweep was started in holds
            [sys.executable, "-P", "-m", SUPERVISOR, str(os.getpid()), str(self.lock_fd), str(TRAIN_PY), *argv],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT, cwd=cwd,
            env=trial_environment(self.spec["gpus_per_trial"], os.environ, self.run_dir),
            start_new_session=True,  # a terminal's Ctrl-C goes to the sweep, which decides
            pass_fds=(self.lock_fd,),  # held while train.py lives, even if this worker and the supervisor die
        )  # fmt: skip
        self.lock.with_suffix(".pid").write_text(f"{socket.gethostname()} {self.proc.pid}\n")

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
            self.lock.with_suffix(".pid").unlink(missing_ok=True)
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
    busy = [p for p in sorted((sweep_dir / LOCK_DIR).glob("*.lock")) if lock_held(p)]
    if not busy:
        return []
    names = ", ".join(p.stem for p in busy)
    say(f"waiting for {len(busy)} trial process(es) to write a final checkpoint: {names} (Ctrl-C kills them)")
    deadline = time.monotonic() + timeout
    try:
        while busy and time.monotonic() < deadline:
            time.sleep(POLL_S)
            busy = [p for p in busy if lock_held(p)]
    except KeyboardInterrupt:
        pass
    killed = [p.stem for p in busy if lock_held(p) and kill_lock_holder(p)]
    if killed:
        say(f"killed {', '.join(killed)}: they resume from their latest periodic checkpoint")
    return killed
