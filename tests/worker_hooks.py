"""Workers that hang, for the tests of design §10: a stand-in for the env factory of the vector envs
(`highway._worker_env`) that makes a chosen worker stop itself (SIGSTOP) on its k-th step or reset,
or while it builds its env. A reset takes milliseconds: only the worker itself can hang inside one.

The stand-in is a functools.partial of a function of this module, so the workers, which unpickle
their factory, import this module (the driver's sys.path reaches them); no JAX here. Each hang
happens once: the first worker to create its marker file (it writes its pid there) stops, and the
new workers that replace it run normally.
"""

from __future__ import annotations

import dataclasses
import functools
import multiprocessing
import os
import signal
import threading
import time
from pathlib import Path

import gymnasium as gym

from racer_vec.sim import highway

WORKER_ENV = highway._worker_env
"""The real factory: this module's stand-in replaces it in the driver, never in a worker."""


@dataclasses.dataclass(frozen=True)
class Hang:
    """Worker `index` of a training vector env (or, with `evaluator`, of an Evaluator's: evaluate.py's,
    or training's periodic evaluation) stops on its `count`-th `call` ("step", "reset" or "start")."""

    index: int
    call: str
    count: int
    marker: str
    evaluator: bool = False


class StopsItself(gym.Wrapper):
    def __init__(self, env: gym.Env, hang: Hang):
        super().__init__(env)
        self.hang, self.calls = hang, 0

    def reset(self, **kwargs):
        self._count("reset")
        return self.env.reset(**kwargs)

    def step(self, action):
        self._count("step")
        return self.env.step(action)

    def _count(self, call: str) -> None:
        if call == self.hang.call:
            self.calls += 1
            if self.calls == self.hang.count:
                stop_once(self.hang.marker)


def stop_once(marker: str) -> None:
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    os.kill(os.getpid(), signal.SIGSTOP)


def worker_env(hangs: tuple[Hang, ...], env_cfg, seed, env_index, render_mode, wrapper, idm_ego_speed) -> gym.Env:
    in_worker = multiprocessing.parent_process() is not None  # gymnasium also builds the first env in the driver
    mine = [h for h in hangs if in_worker and h.index == env_index and h.evaluator == (wrapper is not None)]
    for hang in mine:
        if hang.call == "start":
            stop_once(hang.marker)
    env = WORKER_ENV(env_cfg, seed, env_index, render_mode, wrapper, idm_ego_speed)
    for hang in mine:
        env = StopsItself(env, hang) if hang.call != "start" else env
    return env


def stand_in(*hangs: Hang):
    """What replaces `highway._worker_env`: the real factory, with `hangs` armed."""
    return functools.partial(worker_env, hangs)


def install(*hangs: Hang) -> None:
    """For a driver in a process of its own (train.py or evaluate.py started by a test)."""
    highway._worker_env = stand_in(*hangs)


def wait_for(marker: str | Path, timeout: float = 120.0) -> int:
    """The pid of the worker that stopped at `marker`, once it has."""
    marker, deadline = Path(marker), time.monotonic() + timeout
    while not (marker.exists() and marker.read_text()):
        assert time.monotonic() < deadline, f"no worker hung at {marker}"
        time.sleep(0.05)
    return int(marker.read_text())


def continue_later(marker: str | Path, seconds: float = 30.0) -> None:
    """SIGCONT the worker stopped at `marker` `seconds` after it stopped, if it is still there: without
    the driver's timeout the test then fails on its assertions instead of hanging for ever."""

    def resume():
        try:
            pid = wait_for(marker, timeout=600)
        except AssertionError:  # it never stopped: the test has failed already
            return
        time.sleep(seconds)
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass

    threading.Thread(target=resume, daemon=True).start()
