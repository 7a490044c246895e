"""Where a number came from: the machine, the package versions and the source commit."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

PACKAGES = ("jax", "jaxlib", "flax", "optax", "highway-env", "gymnasium", "numpy")


def machine_info() -> dict:
    import jax

    cpu = cpuinfo()
    return {
        "cpu": cpu.get("model name", platform.processor()),
        # hosts that report the same name can differ in model and caches, and XLA's CPU kernels with
        # them, enough to change a long run's numbers (README, Results)
        "cpu_model": " ".join(f"{key.removeprefix('cpu ')} {cpu[key]}" for key in ("cpu family", "model", "stepping")
                              if key in cpu),  # fmt: skip
        "cpu_cache": cpu.get("cache size", ""),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "jax_backend": jax.default_backend(),
        "jax_devices": [str(d) for d in jax.devices()],
        "packages": {p: metadata.version(p) for p in PACKAGES},
    }


def cpuinfo(path: str = "/proc/cpuinfo") -> dict:
    """The first processor's block of /proc/cpuinfo (empty where there is none)."""
    info = {}
    try:
        with open(path) as f:
            for line in f:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                info[key.strip()] = value.strip()
    except OSError:
        pass
    return info


def source_commit() -> dict:
    """The git commit of the racer_vec source in use, and whether tracked files differ from it.

    Empty when the package does not live in a git checkout (e.g. installed from a wheel).
    """
    root = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return {}
