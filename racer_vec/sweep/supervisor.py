"""The process between a trial's Ray worker and its train.py (design §12):

    python -P -m racer_vec.sweep.supervisor WORKER_PID LOCK_FD TRAIN_PY [train.py's arguments]

It runs train.py and passes on its exit status and the SIGTERM/SIGINT it is sent. A Ray worker kills
its children with SIGKILL when it exits, even a worker Tune stops normally, so train.py must not be
one: it gets SIGTERM when the supervisor dies (PR_SET_PDEATHSIG, checked against a parent that died
before it was set) and writes its final checkpoint whoever killed the worker. The supervisor gets
SIGKILL when the worker dies, from as early as it can: it imports nothing beyond the standard library
(racer_vec/__init__.py and racer_vec/sweep/__init__.py import nothing either), so that it is tied to
its parent within milliseconds of its start.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys

PR_SET_PDEATHSIG = 1
EXIT_ORPHANED = 143
"""The parent died before the death signal was set: exit as a SIGTERM would have ended us."""
_PRCTL = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None
"""Looked up once: train.py's process calls it between fork and exec."""


def set_parent_death_signal(signum: int) -> None:
    """The signal this process gets when its parent dies (Linux; elsewhere nothing)."""
    if _PRCTL is not None:
        _PRCTL(PR_SET_PDEATHSIG, signum)


def main(argv: list[str]) -> int:
    worker, lock_fd, command = int(argv[0]), int(argv[1]), argv[2:]
    me = os.getpid()
    # Ray workers block SIGINT (and a child inherits the mask)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != worker:
        return EXIT_ORPHANED
    child = None
    received = []

    def forward(signum, frame) -> None:
        received.append(signum)
        if child is not None:
            child.send_signal(signum)

    def arm() -> None:  # in the child, before train.py starts
        set_parent_death_signal(signal.SIGTERM)
        if os.getppid() != me:
            os._exit(EXIT_ORPHANED)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    child = subprocess.Popen([sys.executable, *command], pass_fds=(lock_fd,), preexec_fn=arm)
    for signum in received:  # sent while train.py was starting
        child.send_signal(signum)
    code = child.wait()
    if code < 0:  # die of the same signal
        if -code != signal.SIGKILL:
            signal.signal(-code, signal.SIG_DFL)
        os.kill(me, -code)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
