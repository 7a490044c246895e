"""A sweep on a Ray cluster of two nodes, both on this machine (Ray's own multi-node harness,
ray.cluster_utils): a trial runs on each node, the second node is lost without grace mid-trial,
and Ray Tune finishes that trial on the head from its checkpoint (design §12). Not tested here:
machines that really are separate, and a sweep directory on shared storage (both nodes share this
machine's filesystem)."""

import os
import re
import time

import psutil
import pytest

from racer_vec.sweep import trial
from test_sweep import TRAIN_FLAGS, _metrics, _sessions, _start, _stopped_on_failure, _wait_for

MAX_STEPS = 400  # a checkpoint every 100 steps: the lost trial has one to resume from, and steps left


def _attempt_nodes(run_dir) -> list[str]:
    """The Ray node of each attempt of a trial, from the header its train.log gets per attempt."""
    try:
        return re.findall(r"^--- sweep trial .*?, on Ray node (\w+) ", (run_dir / "train.log").read_text(), re.M)
    except FileNotFoundError:
        return []


def _trial_processes(sweep_dir) -> list[str]:
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if proc.environ().get(trial.TRIAL_ENV, "").startswith(str(sweep_dir)):
                found.append(f"{proc.pid} {' '.join(proc.info['cmdline'] or ())[:120]}")
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return found


def _live_children() -> set[int]:
    children = psutil.Process().children(recursive=True)
    return {p.pid for p in children if p.is_running() and p.status() != psutil.STATUS_ZOMBIE}


def _gone(alive, timeout: float = 10.0):
    """`alive()` once it is empty, or what it still holds after `timeout` s."""
    deadline = time.time() + timeout
    while (left := alive()) and time.time() < deadline:
        time.sleep(0.5)
    return left


@pytest.mark.slow
def test_a_trial_on_a_lost_node_finishes_from_its_checkpoint_on_the_head(tmp_path, monkeypatch):
    from ray.cluster_utils import Cluster  # here: collecting the suite imports no Ray

    before = _live_children()
    # the nodes run their workers at this process's nice value, as the sweep's own instance does,
    # and, as it does, without a dashboard or usage statistics
    monkeypatch.setenv("RAY_worker_niceness", "0")
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        second = cluster.add_node(num_cpus=1)
        head_id, second_id = cluster.head_node.node_id, second.node_id
        sweep_dir = tmp_path / "runs" / "cluster"
        argv = ["highway_fast", "--seeds", "0", "1", "--sweep-name", "cluster", "--address", cluster.address,
                "--cpus-per-trial", "1", "--no-final-report", *TRAIN_FLAGS, "--checkpoint-interval", "100",
                "--max-steps", str(MAX_STEPS)]  # fmt: skip
        runs = [sweep_dir / "seed=0", sweep_dir / "seed=1"]
        proc, log = _start(tmp_path, "sweep", *argv)
        with _stopped_on_failure(proc):

            def lost_trial():  # the trial on the second node, once it has a checkpoint
                return next((r for r in runs if _attempt_nodes(r) == [second_id] and trial.latest_step(r)), None)

            _wait_for(proc, log, lambda: all(_attempt_nodes(r) for r in runs) and lost_trial(), "a checkpoint")
            lost = lost_trial()
            cluster.remove_node(second, allow_graceful=False)
            code = proc.wait(timeout=300)
        out = log.read_text()
        left = _gone(lambda: _trial_processes(sweep_dir))
    finally:
        cluster.shutdown()
    assert code == 0, out[-4000:]
    other = next(r for r in runs if r != lost)
    # a trial on each node; the lost one's retry on the head, from the checkpoint its train.py wrote
    assert _attempt_nodes(other) == [head_id] and _attempt_nodes(lost) == [second_id, head_id]
    assert f"{lost.name}: FAILED attempt 1 (" in out
    resumed_at = _sessions(lost)[1]
    assert _sessions(lost) == [0, resumed_at] and resumed_at >= 100
    # its train.py outlived the node's Ray worker long enough to write a final checkpoint
    assert f"interrupted: checkpoint at {resumed_at} env steps" in (lost / "train.log").read_text()
    assert f"{lost.name}: RUNNING (attempt 2), resuming its run from {resumed_at} env steps" in out
    steps = [m["env_steps"] for m in _metrics(lost)]
    assert steps == sorted(set(steps)) and steps[-1] == MAX_STEPS  # each step logged once
    assert trial.latest_step(lost) == trial.latest_step(other) == MAX_STEPS
    # nothing left: no trial process, and none of the cluster's
    assert left == []
    assert _gone(lambda: _live_children() - before) == set()
