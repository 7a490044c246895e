"""Shared fixtures: one tiny training run for every test that needs a run."""

import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]

# The training subprocesses compile the same tiny learner: share XLA's persistent cache between them
# (one per test session, so nothing carries over between sessions).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="racer-vec-jax-cache-"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")

# highway_fast with tiny networks, 2 workers and 4 s episodes (20 steps): cheap, many boundaries.
TINY_ARGS = (
    "highway_fast",
    "--num-envs", "2",
    "--env.duration", "4",
    "--max-steps", "400",
    "--start-training", "100",
    "--batch-size", "32",
    "--utd-ratio", "2",
    "--buffer-size", "1000",
    "--agent.hidden-dims", "32", "32",
    "--agent.pointnet-dim", "16",
    "--agent.num-atoms", "21",
    "--log-interval", "100",
    "--checkpoint-interval", "200",
    "--keep-checkpoints", "5",
    "--eval-interval", "200",
    "--eval-episodes", "2",
    # the release's reset schedule, scaled down: resets at vector steps 100 and 150 (env steps 200, a
    # checkpoint, and 300); none at 100 (learning starts there) nor from 320 (80% of 400)
    "--reset-interval", "50",
)


def run_train(*args, timeout=300, **popen_kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args],
        capture_output=True, text=True, timeout=timeout, cwd=ROOT, **popen_kwargs,
    )


def train_here(*args) -> int:
    """train.py's main() in this process: a real run (its env workers, learner and checkpoints) that
    reuses this process's imports and compiled functions instead of run_train's new interpreter
    (~3 s of imports, then start-up and compiles). For runs whose results, not whose process, a test
    checks (read the output with capsys). The run restores the stop signals' handlers it replaced."""
    spec = importlib.util.spec_from_file_location("train", ROOT / "train.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script.main([str(arg) for arg in args])


def running(pids) -> list[int]:
    """Those of `pids` that still run (not zombies)."""
    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


def no_worker_left(timeout: float = 10.0) -> list:
    """The live children of this process's forkserver (env workers), once they are gone or at `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        forkservers = [p for p in psutil.Process().children() if "forkserver" in " ".join(p.cmdline())]
        left = running([c.pid for fs in forkservers for c in fs.children()])
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A finished tiny run (wandb offline, buffer saved): runs/<name> with checkpoints at 200 and 400."""
    runs_dir = tmp_path_factory.mktemp("runs")
    env = {**os.environ, "WANDB_SILENT": "true"}
    result = run_train(
        *TINY_ARGS, "--runs-dir", str(runs_dir), "--run-name", "tiny", "--save-buffer", "--wandb-mode", "offline",
        env=env,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return runs_dir / "tiny"


def pytest_collection_modifyitems(items):
    """A test that needs the tiny run is a real run: slow, whatever its own marks say (the quick
    subset, `make test-quick`, stays near a minute)."""
    for item in items:
        if "tiny_run" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
