"""The sweep's watchdog (design §12): what the sweep started ends when the sweep dies, SIGKILL included.

    python -P -m racer_vec.sweep.watchdog SWEEP_PID TRIAL_MARKER      (stdin: a pipe from the sweep)

The sweep starts it in a session of its own, with the read end of a pipe as stdin; the write end
only the sweep holds, so the pipe ends (EOF) when the sweep does, however it ends. Meanwhile the
watchdog keeps a list of the sweep's descendants (Ray's processes, the trials' workers), from
/proc twice a second. At EOF it stops them: the trials' processes (marked by TRIAL_MARKER in their
environment, `RACER_VEC_SWEEP_TRIAL=<sweep>/`: the supervisors, train.py, its workers) get SIGTERM,
so that train.py writes its checkpoint, and Ray's processes SIGTERM, then SIGKILL after a few
seconds; a trial still running after STOP_WAIT_S is killed. After a sweep that ended normally
nothing is left to stop. Linux only (/proc); elsewhere it waits for EOF and exits. Standard library
only: it starts within a fraction of a second.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import time
from pathlib import Path

POLL_S = 0.5
RAY_GRACE_S = 5.0
"""How long Ray's processes get to exit on SIGTERM before SIGKILL."""
STOP_WAIT_S = 60.0
"""How long a trial's train.py gets to write its checkpoint before SIGKILL (as the trial gives it)."""

Process = tuple[int, int]
"""(pid, start time in clock ticks since boot): a pid the kernel has reused is another process."""


def process_table() -> dict[Process, int]:
    """Every live process of the machine (zombies left out) and its parent's pid."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if fields[0] != "Z":  # fields: state, ppid, ..., start time (the stat file's 22nd field)
            table[(int(entry.name), int(fields[19]))] = int(fields[1])
    return table


def descendants(roots: set[int], table: dict[Process, int]) -> set[Process]:
    """The processes of `table` below the pids `roots`."""
    children: dict[int, list[Process]] = {}
    for process, ppid in table.items():
        children.setdefault(ppid, []).append(process)
    found, stack = set(), list(roots)
    while stack:
        for child in children.get(stack.pop(), ()):
            if child not in found:
                found.add(child)
                stack.append(child[0])
    return found


def marked(table: dict[Process, int], marker: bytes) -> set[Process]:
    """The processes whose environment holds a variable starting with `marker` (`NAME=prefix`)."""
    found = set()
    for process in table:
        try:
            environ = Path(f"/proc/{process[0]}/environ").read_bytes()
        except OSError:
            continue
        if any(var.startswith(marker) for var in environ.split(b"\0")):
            found.add(process)
    return found


def sweep_ended(stdin: int, sweep_pid: int, timeout: float) -> bool:
    """Whether the pipe from the sweep has ended (or the sweep is no longer this process's parent)."""
    readable, _, _ = select.select([stdin], [], [], timeout)
    if readable and not os.read(stdin, 4096):
        return True
    return os.getppid() != sweep_pid


def signal_all(processes: set[Process], signum: int) -> None:
    alive = process_table()
    for pid, start in processes:
        if (pid, start) in alive:
            try:
                os.kill(pid, signum)
            except (ProcessLookupError, PermissionError):
                pass


def wait_gone(processes: set[Process], timeout: float) -> set[Process]:
    """Those of `processes` still alive after up to `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        left = processes & process_table().keys()
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def stop(known: set[Process], marker: bytes) -> None:
    """SIGTERM the trials' processes (they checkpoint) and Ray's (SIGKILL after RAY_GRACE_S); a
    trial still running after STOP_WAIT_S gets SIGKILL."""
    table = process_table()
    live = known & table.keys()
    alive = {p for p in live | descendants({pid for pid, _ in live}, table) if p[0] != os.getpid()}
    trials = marked(table, marker)
    others = alive - trials
    if not trials and not others:
        return
    print(f"sweep: watchdog: the sweep has ended; stopping {len(others)} process(es) it started (Ray's) and "
          f"{len(trials)} of its trials' (these checkpoint)", file=sys.stderr, flush=True)  # fmt: skip
    signal_all(trials | others, signal.SIGTERM)
    signal_all(wait_gone(others, RAY_GRACE_S), signal.SIGKILL)
    signal_all(wait_gone(trials, STOP_WAIT_S), signal.SIGKILL)


def main(argv: list[str]) -> int:
    sweep_pid, marker = int(argv[0]), argv[1].encode()
    for signum in (signal.SIGINT, signal.SIGHUP):  # the sweep decides about a terminal's signals
        signal.signal(signum, signal.SIG_IGN)
    if not Path("/proc/self/stat").exists():
        while not sweep_ended(sys.stdin.fileno(), sweep_pid, 3600.0):
            pass
        return 0
    me = os.getpid()
    known: set[Process] = set()
    while not sweep_ended(sys.stdin.fileno(), sweep_pid, POLL_S):
        table = process_table()
        known = {p for p in known if p in table} | {p for p in descendants({sweep_pid}, table) if p[0] != me}
    stop(known, marker)
    return 0


def start(sweep_dir: Path, trial_env: str) -> int:
    """Start the watchdog of this process (the sweep); returns the pipe's write end, which this process
    keeps open while it lives (never passed on: its children must not hold it)."""
    import subprocess

    read, write = os.pipe()
    subprocess.Popen(
        [sys.executable, "-P", "-m", __name__, str(os.getpid()), f"{trial_env}={sweep_dir}/"],
        stdin=read, stdout=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    os.close(read)
    return write


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
