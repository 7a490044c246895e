"""Numbers that a change of structure must not move (issue: regrouping the package changes no
number): the tiny training run's logged values, every one but the clock, and one episode of the
fast simulator, bit for bit, against values recorded before the regrouping.

XLA's CPU kernels and OpenBLAS pick their code by instruction set and thread count, so the values
are recorded per kind of CPU. To record them for a new kind, on a commit whose numbers are trusted:
`python tests/test_numbers_hold.py`.
"""

import dataclasses
import hashlib
import json
import os
import platform
import sys
from pathlib import Path

import numpy as np
import pytest

from racer_vec.run.provenance import cpuinfo

RECORDED = Path(__file__).parent / "data" / "recorded_numbers.json"
CLOCKS = ("sps", "wall_time")


def cpu_kind() -> str:
    flags = set(cpuinfo().get("flags", "").split())
    isa = "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else "base"
    return f"{platform.machine()}-{isa}-{os.cpu_count()}cpus"


def untimed_metrics(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in CLOCKS} for row in rows]


def fast_sim_episode() -> dict:
    """One `racer_highway` episode (50 vehicles) of the fast simulator with seeded random actions."""
    import configs
    from racer_vec.sim.highway import make_env

    env_cfg = dataclasses.replace(configs.PRESETS["racer_highway"].env, fast_sim=True)
    env = make_env(env_cfg, seed=3)
    rng = np.random.default_rng(3)
    digest = hashlib.sha256()
    obs, _ = env.reset(seed=3)
    digest.update(obs.tobytes())
    total, steps = 0.0, 0
    for steps in range(1, 201):
        obs, reward, terminated, truncated, info = env.step(rng.uniform(-1, 1, 2).astype(np.float32))
        digest.update(obs.tobytes() + np.float64(reward).tobytes() + bytes([terminated, truncated]))
        total += reward
        if terminated or truncated:
            break
    env.close()
    return {"length": steps, "return": total, "sha256": digest.hexdigest()}


def _recorded() -> dict:
    numbers = json.loads(RECORDED.read_text()).get(cpu_kind()) if RECORDED.exists() else None
    if numbers is None:
        pytest.skip(f"no numbers recorded for this kind of CPU ({cpu_kind()}); see this module's docstring")
    return numbers


def test_the_tiny_run_logs_the_recorded_values(tiny_run):
    assert untimed_metrics(tiny_run) == _recorded()["tiny_run"]


def test_a_fast_simulator_episode_is_the_recorded_one():
    assert fast_sim_episode() == _recorded()["fast_sim_episode"]


if __name__ == "__main__":
    import subprocess
    import tempfile

    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import TINY_ARGS, run_train

    with tempfile.TemporaryDirectory() as runs:
        result = run_train(*TINY_ARGS, "--runs-dir", runs, "--run-name", "tiny", "--save-buffer",
                           "--wandb-mode", "disabled")  # fmt: skip
        assert result.returncode == 0, result.stderr
        numbers = {"tiny_run": untimed_metrics(Path(runs) / "tiny"), "fast_sim_episode": fast_sim_episode()}
    recorded = json.loads(RECORDED.read_text()) if RECORDED.exists() else {}
    recorded[cpu_kind()] = numbers
    RECORDED.parent.mkdir(exist_ok=True)
    RECORDED.write_text(json.dumps(recorded, indent=1, sort_keys=True) + "\n")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"recorded {cpu_kind()} at {commit} in {RECORDED}")
