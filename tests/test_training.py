"""The driver end to end: run directory, resume, Ctrl-C, worker faults, episode boundaries."""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import psutil
import pytest

from conftest import ROOT, TINY_ARGS, no_worker_left, run_train, train_here
from racer_vec.run.checkpoints import Checkpointer
from racer_vec.config import TrainConfig, from_dict

METRIC_KEYS = {
    "env_steps", "updates", "sps", "critic_loss", "speed_ema", "collision_ema", "train_collisions_total",
    "offroad_terminations_total", "episodes_total", "wall_time", "critic_utd", "buffer_size", "resets_total",
}


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_tiny_run_writes_config_metrics_and_checkpoints(tiny_run):
    cfg = from_dict(TrainConfig, json.loads((tiny_run / "config.json").read_text()))
    assert cfg.preset == "highway_fast" and cfg.num_envs == 2 and cfg.updates_per_iteration == 1
    rows = _metrics(tiny_run)
    assert [r["env_steps"] for r in rows] == [100, 200, 300, 400]
    for row in rows[1:]:
        assert METRIC_KEYS <= row.keys(), METRIC_KEYS - row.keys()
        assert np.isfinite(row["critic_loss"])
    assert rows[0].get("critic_loss") is None  # no update before start_training
    assert "episode_return_mean" in rows[-1] and rows[-1]["episodes_total"] >= 10
    assert {"episode_lane_changes_mean", "episode_overtakes_mean", "episode_distance_mean"} <= rows[-1].keys()
    # one agent update per vector step once training started at 100 env steps (2 envs)
    assert rows[-1]["updates"] == (400 - 100) // 2
    assert rows[-1]["critic_utd"] == pytest.approx(2 * 1 / 2)
    assert {"eval/mean_return", "eval/collision_rate", "eval/num_episodes", "eval/mean_overtakes"} <= rows[1].keys()
    assert rows[1]["eval/num_episodes"] == 2
    steps = sorted(int(p.name) for p in (tiny_run / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [200, 400]
    assert any((tiny_run / "wandb").glob("offline-run-*"))


@pytest.mark.slow
def test_resume_continues_counters_and_restores_buffer(tiny_run, tmp_path):
    run_dir = tmp_path / "tiny"
    shutil.copytree(tiny_run, run_dir)
    before = _metrics(run_dir)[-1]
    assert train_here("--resume", run_dir, "--max-steps", "500", "--wandb-mode", "disabled") == 0
    rows = _metrics(run_dir)
    after = rows[-1]
    assert rows[-2] == before and after["env_steps"] == 500
    assert after["updates"] == before["updates"] + 50  # buffer restored: no refill pause
    assert after["resets_total"] == before["resets_total"] == 2  # vector step 200: 400 is 80% of 500, no reset
    assert after["episodes_total"] >= before["episodes_total"]
    assert after["wall_time"] > before["wall_time"]

    # The buffer restored on resume is the one saved at 400 steps, bit for bit.
    from racer_vec.run.training import Trainer

    cfg = dataclasses.replace(
        from_dict(TrainConfig, json.loads((tiny_run / "config.json").read_text())),
        resume=str(tiny_run), wandb_mode="disabled", eval_interval=0,
    )
    trainer = Trainer(cfg)
    try:
        trainer.setup()
        saved = Checkpointer(tiny_run / "checkpoints", keep=5)
        _, state, buffer = saved.restore(400, trainer.agent, trainer.buffer)
        assert state["counters"]["env_steps"] == trainer.counters.env_steps == 400
        for name in ("observations", "actions", "rewards", "masks", "next_observations", "position", "size"):
            np.testing.assert_array_equal(np.asarray(getattr(trainer.buffer, name)), np.asarray(getattr(buffer, name)))
        assert int(trainer.buffer.size) == 400
    finally:
        trainer.close()


def _adam_counts(run_dir, step):
    """Adam step counts of the actor, critic and temperature, and the agent's update count."""
    import orbax.checkpoint as ocp

    agent = ocp.StandardCheckpointer().restore(run_dir / "checkpoints" / str(step) / "agent")
    counts = {name: int(agent[name]["opt_state"][0]["count"]) for name in ("actor", "critic", "temperature")}
    return {**counts, "updates": int(agent["updates"])}


def test_kept_checkpoints_are_the_newest_and_the_first_past_each_milestone(tmp_path):
    import jax.numpy as jnp

    agent = {"w": jnp.zeros(3)}
    checkpointer = Checkpointer(tmp_path, keep=2, keep_every=20)
    for step in (8, 16, 24, 32, 37, 48, 56):  # 8 envs a vector step; 37: a stop signal's save
        checkpointer.save(step, agent, {"step": step})
    assert sorted(checkpointer.steps()) == [24, 48, 56]
    checkpointer.close()
    resumed = Checkpointer(tmp_path, keep=2, keep_every=20)  # a resumed run keeps its milestones
    for step in (64, 72):
        resumed.save(step, agent, {"step": step})
    assert sorted(resumed.steps()) == [24, 48, 64, 72]
    resumed.close()
    newest_only = Checkpointer(tmp_path / "plain", keep=2)
    for step in (8, 16, 24, 32):
        newest_only.save(step, agent, {"step": step})
    assert sorted(newest_only.steps()) == [24, 32]
    newest_only.close()


def test_reset_schedule_steps_and_once_per_step():
    """design §11's schedule as the loop meets it: before each vector step acts (2 envs, updates from
    100 env steps, reset interval 50 vector steps, 400 env steps)."""
    from racer_vec.run.counters import Counters
    from racer_vec.run.training import reset_due

    cfg = dataclasses.replace(TrainConfig(), num_envs=2, reset_interval=50, max_steps=400)
    c, resets = Counters(), []
    while c.env_steps < cfg.max_steps:
        if reset_due(cfg, c):
            resets.append(c.env_steps)
            c.last_reset_step = c.env_steps
            assert not reset_due(cfg, c)  # the step retried after a worker fault does not reset again
        c.updates += c.env_steps >= 100
        c.env_steps += 2
    # none at vector step 50 (no update yet) nor at 200 (400 is not below 80% of max_steps)
    assert resets == [200, 300]
    # resumed from the checkpoint at a reset step (taken before the reset): the reset comes first
    assert reset_due(cfg, Counters(env_steps=200, updates=50, last_reset_step=0))
    assert not reset_due(cfg, Counters(env_steps=202, updates=51, last_reset_step=200))
    # 80% of max_steps, exactly: no reset at it, one just below it
    assert not reset_due(dataclasses.replace(cfg, max_steps=500), Counters(env_steps=400, updates=150))
    assert reset_due(dataclasses.replace(cfg, max_steps=501), Counters(env_steps=400, updates=150))
    assert not reset_due(dataclasses.replace(cfg, reset_interval=0), Counters(env_steps=200, updates=50))


@pytest.mark.slow
def test_reset_schedule_reinitializes_and_a_resumed_run_resets_exactly_as_the_uninterrupted_one(tiny_run, tmp_path,
                                                                                                  capsys):
    """design §11 at the tiny scale: resets after the updates of vector steps 100 and 150 (env steps
    200 and 300), none at 50 (no update yet) nor at 200 (400 is past 80% of 400). Updates run from
    100 env steps, one per vector step, with two critic steps each."""
    # a step's log line and checkpoint come before its reset
    assert [r["resets_total"] for r in _metrics(tiny_run)] == [0, 0, 1, 2]
    # the checkpoint at 200 holds the agent that learned for 200 steps: 50 updates, none reset yet
    assert _adam_counts(tiny_run, 200) == {"actor": 50, "critic": 100, "temperature": 50, "updates": 50}
    # at 400: 50 updates since the reset at 300; the temperature's Adam state was kept throughout
    assert _adam_counts(tiny_run, 400) == {"actor": 50, "critic": 100, "temperature": 150, "updates": 150}

    # Resumed from the checkpoint at the first reset step: that reset comes first, then the second.
    run_dir = tmp_path / "tiny"
    shutil.copytree(tiny_run, run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "400")
    assert train_here("--resume", run_dir, "--max-steps", "400", "--wandb-mode", "disabled") == 0
    out = capsys.readouterr().out
    assert out.count("reset the agent") == 2, out[-3000:]
    assert "at 200 env steps" in out and "at 300 env steps" in out
    assert _metrics(run_dir)[-1]["resets_total"] == 2
    assert _adam_counts(run_dir, 400) == _adam_counts(tiny_run, 400)


@pytest.mark.slow
def test_resume_without_buffer_refills_before_updates(tiny_run, tmp_path, capsys):
    run_dir = tmp_path / "tiny"
    shutil.copytree(tiny_run, run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "400" / "buffer")
    from racer_vec.run.checkpoint_files import write_manifest

    write_manifest(run_dir / "checkpoints" / "400")  # saved without its buffer (else it is damaged)
    before = _metrics(run_dir)[-1]
    assert train_here("--resume", run_dir, "--max-steps", "560", "--wandb-mode", "disabled") == 0
    assert "refilling" in capsys.readouterr().out
    rows = _metrics(run_dir)
    after = rows[-1]
    # 100 refill steps (start_training) without updates, then 60 steps = 30 vector steps of updates
    assert after["updates"] == before["updates"] + 30
    # the buffer refills from empty, and the UTD counts the transitions collected while learning
    assert [r["buffer_size"] for r in rows[-2:]] == [100, 160]
    assert after["critic_utd"] == pytest.approx(1.0)


def _session_processes(sid):
    found = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if os.getsid(proc.pid) == sid and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (ProcessLookupError, psutil.NoSuchProcess, PermissionError):
            pass
    return found


def _long_args(tmp_path, *extra, learn=True, max_steps=100000):
    """The tiny run's arguments for runs/long: to `max_steps`, a checkpoint only at the end, no evaluation."""
    args = list(TINY_ARGS)
    args[args.index("--max-steps") + 1] = str(max_steps)
    if not learn:
        args[args.index("--start-training") + 1] = str(max_steps)
    args[args.index("--checkpoint-interval") + 1] = "100000"
    return [*args, "--runs-dir", str(tmp_path), "--run-name", "long", "--eval-interval", "0", *extra]


def _trained(tmp_path) -> bool:
    """runs/long has logged twice: it has started training."""
    metrics = tmp_path / "long" / "metrics.jsonl"
    return metrics.exists() and len(metrics.read_text().splitlines()) >= 2


def _start_long_run(tmp_path, *extra, **long):
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *_long_args(tmp_path, *extra, **long)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    deadline = time.time() + 120
    while not _trained(tmp_path):
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "the run did not start training in time"
        time.sleep(0.5)
    return proc


def _wait_all_gone(sid, timeout=20.0):
    deadline = time.time() + timeout
    while _session_processes(sid) and time.time() < deadline:
        time.sleep(0.2)
    return _session_processes(sid)


@pytest.mark.parametrize(
    "signum, group",
    [(signal.SIGINT, True), (signal.SIGTERM, False), (signal.SIGTERM, True)],
    ids=["Ctrl-C to the process group", "SIGTERM to the driver", "SIGTERM to the process group"],
)
@pytest.mark.slow
def test_stop_signals_checkpoint_and_leave_nothing(tmp_path, signum, group):
    # learning from 50 env steps, logged at 50 and 100: stopped while it learns
    proc = _start_long_run(tmp_path, "--wandb-mode", "offline", "--start-training", "50", "--log-interval", "50")
    if group:
        os.killpg(proc.pid, signum)
    else:
        proc.send_signal(signum)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode in (0, 130), err[-3000:]
    assert "Traceback" not in err
    assert _wait_all_gone(proc.pid) == []
    ckpt = Checkpointer(tmp_path / "long" / "checkpoints", keep=5)
    step = ckpt.latest_step()
    assert step is not None and step >= 100
    state = json.loads((tmp_path / "long" / "checkpoints" / str(step) / "state" / "metadata").read_text())
    assert state["counters"]["env_steps"] == step


def _workers(driver_pid):
    """The env worker processes: children of the driver's forkserver, oldest first."""
    forkservers = [p for p in psutil.Process(driver_pid).children() if "forkserver" in " ".join(p.cmdline())]
    workers = [c for fs in forkservers for c in fs.children()]
    return sorted(workers, key=lambda p: p.create_time())


def _train_killing_a_worker(tmp_path, index, *extra, **long):
    """The long run (train.py's main() in this process: the driver's fault handling is under test, not
    its process); once it has started training, a thread kills its env worker `index`, oldest first.
    Returns its exit code and the workers the thread saw."""
    seen = []

    def kill():
        deadline = time.time() + 120
        while not _trained(tmp_path) and time.time() < deadline:
            time.sleep(0.1)
        seen.extend(_workers(os.getpid()))
        seen[index].kill()

    killer = threading.Thread(target=kill, daemon=True)
    killer.start()
    code = train_here(*_long_args(tmp_path, *extra, **long))
    killer.join()
    return code, seen


@pytest.mark.slow
def test_killed_training_worker_is_replaced_and_the_run_finishes(tmp_path, capsys):
    code, workers = _train_killing_a_worker(tmp_path, 1, "--wandb-mode", "disabled", max_steps=400)
    err = capsys.readouterr().err
    assert code == 0 and len(workers) == 2, err[-3000:]
    assert "Traceback" not in err
    assert "env worker 1 failed" in err and "replacing the env workers" in err, err[-3000:]
    assert no_worker_left() == []
    rows = _metrics(tmp_path / "long")
    assert rows[-1]["env_steps"] == 400 and rows[-1]["worker_restarts_total"] == 1
    state = json.loads((tmp_path / "long" / "checkpoints" / "400" / "state" / "metadata").read_text())
    assert state["counters"]["worker_restarts_total"] == 1


@pytest.mark.slow
def test_killed_evaluation_worker_is_replaced_and_the_run_finishes(tmp_path, capsys):
    code, workers = _train_killing_a_worker(tmp_path, 2, "--wandb-mode", "disabled", "--eval-interval", "200",
                                            max_steps=400)  # fmt: skip
    err = capsys.readouterr().err
    assert code == 0 and len(workers) == 4, err[-3000:]  # 2 training workers, then the evaluator's 2
    assert "Traceback" not in err
    assert "evaluation worker 0 had died" in err, err[-3000:]
    assert no_worker_left() == []
    rows = _metrics(tmp_path / "long")
    assert rows[-1]["env_steps"] == 400 and rows[-1]["eval_worker_restarts_total"] == 1
    assert rows[-1]["worker_restarts_total"] == 0
    # the evaluation after the rebuild ran: none was skipped
    assert [r["eval/num_episodes"] for r in rows if "eval/num_episodes" in r] == [2, 2]


@pytest.mark.slow
def test_run_past_its_restart_limit_stops_with_a_checkpoint(tmp_path, capsys):
    # 1000 steps: were the worker not killed, the run would finish, with exit 0
    code, _ = _train_killing_a_worker(tmp_path, 1, "--wandb-mode", "disabled", "--max-worker-restarts", "0",
                                      learn=False, max_steps=1000)  # fmt: skip
    err = capsys.readouterr().err
    assert code not in (0, 130)
    assert "env worker 1 failed" in err and "--max-worker-restarts 0" in err, err[-3000:]
    assert "Traceback" not in err
    assert no_worker_left() == []
    assert Checkpointer(tmp_path / "long" / "checkpoints", keep=5).latest_step() is not None


@pytest.fixture(scope="module")
def stepped(tmp_path_factory):
    """45 vector steps of the tiny run's driver in this process (90 transitions, 4+ episodes per env at
    20 steps each; updates from 40 env steps): its config, its buffer's rows, its update count and how
    many times the sampler and the update compiled."""
    from racer_vec.run.train_cli import parse_train_args
    from racer_vec.run.training import Trainer

    cfg = dataclasses.replace(
        parse_train_args(list(TINY_ARGS)), wandb_mode="disabled", eval_interval=0,
        runs_dir=str(tmp_path_factory.mktemp("runs")), run_name="stepped", start_training=40, max_steps=10**9,
    )  # fmt: skip
    steps, trainer = 45, Trainer(cfg)
    try:
        trainer.setup()
        obs = trainer.reset_envs(seed=cfg.seed)  # starts the workers
        for _ in range(steps):
            obs = trainer.vector_step(obs)
        stored = {k: np.asarray(getattr(trainer.buffer, k)) for k in ("observations", "actions", "masks", "next_observations")}
        compiles = {"sample": trainer._sample._cache_size(), "iteration": trainer.learner.iteration._cache_size()}
        return {"cfg": cfg, "steps": steps, "stored": stored, "updates": trainer.counters.updates, "compiles": compiles}
    finally:
        trainer.close()


@pytest.mark.slow  # replays the run's envs
def test_stored_transitions_never_cross_episode_boundaries(stepped):
    """Replay each worker's env in-process with the buffer's actions: every stored row must match."""
    from racer_vec.sim import highway

    cfg, steps, stored = stepped["cfg"], stepped["steps"], stepped["stored"]
    n = cfg.num_envs
    ends = 0
    for i in range(n):
        env = highway.make_env(cfg.env, seed=cfg.seed + i)
        replica_obs, _ = env.reset(seed=cfg.seed + i)
        for t in range(steps):
            row = t * n + i
            np.testing.assert_array_equal(stored["observations"][row], replica_obs)
            next_obs, _, terminated, truncated, _ = env.step(stored["actions"][row])
            np.testing.assert_array_equal(stored["next_observations"][row], next_obs)
            assert stored["masks"][row] == (0.0 if terminated else 1.0)
            replica_obs = next_obs
            if terminated or truncated:
                ends += 1
                replica_obs, _ = env.reset()
        env.close()
    assert ends >= 4


@pytest.mark.slow
def test_the_loop_compiles_its_calls_once(stepped):
    """The sampler and the update compile on the first iteration only. (An uncommitted PRNG key
    once made the sampler compile a second time on the second iteration, ~1 s of a timed loop.)"""
    assert stepped["updates"] > 10  # random actions to 40 env steps, then sampling and updates
    assert stepped["compiles"] == {"sample": 1, "iteration": 1}


@pytest.mark.slow
def test_the_same_command_trains_the_same_run(tiny_run, tmp_path):
    # Results rows are checked by rerunning their command: everything but the clock must repeat,
    # bit for bit (env seeds, warm-up actions, minibatches, XLA's CPU arithmetic). The rerun is
    # main() in this process, not the tiny run's: another process, with its own hash seed (state an
    # earlier test left here could only make it differ, failing the test).
    assert train_here(*TINY_ARGS, "--runs-dir", tmp_path, "--run-name", "again", "--wandb-mode", "disabled") == 0

    def untimed(run_dir):
        return [{k: v for k, v in m.items() if k not in ("sps", "wall_time")} for m in _metrics(run_dir)]

    first, again = untimed(tiny_run), untimed(tmp_path / "again")
    assert len(first) == 4 and first[-1]["updates"] > 0
    assert again == first


# ------------------------------------------------------------------ the driver, in process


def _trainer(tmp_path, *extra, name="inproc"):
    from racer_vec.run.train_cli import parse_train_args
    from racer_vec.run.training import Trainer

    cfg = parse_train_args([*TINY_ARGS, "--runs-dir", str(tmp_path), "--run-name", name, "--wandb-mode", "disabled",
                            *extra])  # fmt: skip
    trainer = Trainer(cfg)
    trainer.setup()
    return trainer


class FakeEvaluator:
    """Stands in for the periodic evaluator: `faults` evaluations raise a worker fault, each takes `seconds`."""

    def __init__(self, seconds=0.0, faults=0):
        self.seconds, self.faults, self.calls, self.closed = seconds, faults, 0, False

    def evaluate(self, policy, num_episodes, seed):
        from racer_vec.sim.highway import WorkerFault

        self.calls += 1
        time.sleep(self.seconds)
        if self.calls <= self.faults:
            raise WorkerFault(1, EOFError("worker died"), exitcode=-9)
        return {"num_episodes": num_episodes}

    def dead_workers(self):
        return []

    def close(self):
        self.closed = True


@pytest.mark.slow
def test_wall_time_counts_each_evaluation_once(tmp_path):
    trainer = _trainer(tmp_path, "--eval-interval", "4", "--max-steps", "24", "--start-training", "100000",
                       "--batch-size", "2")  # fmt: skip
    try:
        trainer.evaluator.close()
        trainer.evaluator = FakeEvaluator(seconds=0.25)
        assert trainer.run() == 0
        c = trainer.counters
        assert trainer.evaluator.calls == 6
        # the 1.5 s of evaluation are in the wall time once, and not in the training time (SPS)
        assert 1.5 <= c.wall_time - c.train_time < 2.2, (c.wall_time, c.train_time)
    finally:
        trainer.close()


@pytest.mark.slow
def test_a_periodic_evaluation_fault_skips_it_and_rebuilds_the_evaluator(tmp_path, monkeypatch, capsys):
    trainer = _trainer(tmp_path, "--eval-interval", "4", "--max-steps", "12", "--start-training", "100000",
                       "--batch-size", "2", "--log-interval", "4")  # fmt: skip
    try:
        trainer.evaluator.close()
        faulty = trainer.evaluator = FakeEvaluator(faults=1)
        rebuilt = FakeEvaluator()
        monkeypatch.setattr(trainer, "_make_evaluator", lambda: rebuilt)
        assert trainer.run() == 0
        assert faulty.closed and trainer.evaluator is rebuilt and rebuilt.calls == 2
        rows = _metrics(trainer.run_dir)
        assert [r.get("eval/skipped") for r in rows] == [1, None, None]
        assert [r.get("eval/num_episodes") for r in rows] == [None, 2, 2]
        assert rows[-1]["eval_worker_restarts_total"] == 1
        err = capsys.readouterr().err
        assert "evaluation worker 1 failed (EOFError: killed by signal 9; worker died) at 4 env steps" in err
    finally:
        trainer.close()


def test_an_error_of_the_driver_is_not_taken_for_a_worker_fault(tmp_path):
    from racer_vec.sim.highway import WorkerFault

    trainer = _trainer(tmp_path, "--eval-interval", "0")
    try:
        obs = trainer.reset_envs(seed=0)  # starts the workers
        envs = trainer.envs

        def driver_bug(*args, **kwargs):
            raise RuntimeError("a bug in the driver")

        envs.step_wait = driver_bug
        with pytest.raises(RuntimeError, match="a bug in the driver") as raised:
            trainer.vector_step(obs)
        assert not isinstance(raised.value, WorkerFault) and trainer.counters.worker_restarts_total == 0
    finally:
        trainer.close()  # kills the workers of the pending step


@pytest.mark.slow  # a real run
def test_no_update_before_the_buffer_holds_a_transition(tmp_path):
    trainer = _trainer(tmp_path, "--eval-interval", "0", "--start-training", "0", "--batch-size", "2")
    try:
        obs = trainer.reset_envs(seed=0)  # starts the workers
        obs = trainer.vector_step(obs)
        assert trainer.counters.updates == 0  # the buffer was empty during the first step
        trainer.vector_step(obs)
        assert trainer.counters.updates == 1 and bool(trainer.last_metrics["finite"])
    finally:
        trainer.close()


@pytest.mark.slow
def test_resume_restores_the_buffer_that_was_in_memory(tmp_path):
    from racer_vec.run.train_cli import parse_train_args
    from racer_vec.run.training import Trainer

    fields = ("observations", "actions", "rewards", "masks", "next_observations", "position", "size")
    trainer = _trainer(tmp_path, "--eval-interval", "0", "--max-steps", "140", "--save-buffer", name="buf")
    try:
        assert trainer.run() == 0
        in_memory = {name: np.array(getattr(trainer.buffer, name)) for name in fields}
    finally:
        trainer.close()
    resumed = Trainer(parse_train_args(["--resume", str(tmp_path / "buf"), "--wandb-mode", "disabled"]))
    try:
        resumed.setup()
        assert resumed.counters.env_steps == 140 and resumed.stored == 140
        for name, array in in_memory.items():
            np.testing.assert_array_equal(np.asarray(getattr(resumed.buffer, name)), array, err_msg=name)
    finally:
        resumed.close()


def _damage(step_dir, how="truncate"):
    """Truncate (or delete) the largest file of a checkpoint's agent: its parameters."""
    target = max((p for p in (step_dir / "agent").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    if how == "truncate":
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    else:
        target.unlink()


@pytest.mark.parametrize("manifest", [True, False], ids=["files.json", "without files.json"])
@pytest.mark.slow
def test_resume_falls_back_to_the_newest_intact_checkpoint(tiny_run, tmp_path, capsys, manifest):
    run_dir = tmp_path / "tiny"
    shutil.copytree(tiny_run, run_dir)
    if not manifest:  # as saved before checkpoints listed their files: found when orbax reads them
        for path in (run_dir / "checkpoints").glob("*/files.json"):
            path.unlink()
    _damage(run_dir / "checkpoints" / "400")
    args = ("--resume", run_dir, "--max-steps", "420", "--wandb-mode", "disabled")
    if manifest:  # found before orbax reads the step: the run's results are under test, in this process
        code, (out, err) = train_here(*args), capsys.readouterr()
    else:  # orbax's failed read leaves coroutines whose "Exception ignored" only a process of its own shows
        result = run_train(*map(str, args))
        code, out, err = result.returncode, result.stdout, result.stderr
    assert code == 0, err[-3000:]
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "checkpoint 400 damaged" in warnings[0] and "using checkpoint 200" in warnings[0]
    assert "Traceback" not in err and "Exception ignored" not in err, err[-3000:]
    assert "resumed" in out and "at 200 env steps" in out
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "400.damaged").is_dir()  # kept, not deleted
    assert sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()) == [200, 400, 420]
    assert _metrics(run_dir)[-1]["env_steps"] == 420


@pytest.mark.slow
def test_resume_without_an_intact_checkpoint_is_one_line_and_exit_2(tiny_run, tmp_path):
    run_dir = tmp_path / "tiny"
    shutil.copytree(tiny_run, run_dir)
    _damage(run_dir / "checkpoints" / "400", how="delete")
    (run_dir / "checkpoints" / "200" / "state" / "metadata").write_text("{")
    result = run_train("--resume", str(run_dir), "--wandb-mode", "disabled")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(run_dir / "checkpoints") in lines[0] and "no intact checkpoint" in lines[0], lines
