"""Runs that survive the machine (design §8, §10, §12): one writer per run, logs that survive a kill,
a write that fails (a full disk), places that cannot be written, no process left by a killed
sweep, and env workers that hang. A full disk is a file-size limit here (RLIMIT_FSIZE, with SIGXFSZ
ignored: writes past it fail with EFBIG), which needs neither root nor a real disk. A hung worker
stops itself (SIGSTOP) in a step, a reset or while it starts (tests/worker_hooks.py)."""

import contextlib
import dataclasses
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

import configs
import worker_hooks
from conftest import ROOT, TINY_ARGS, no_worker_left, run_train, running, train_here
from worker_hooks import Hang
from racer_vec import plot, results
from racer_vec.config import ConfigError, resolve, to_dict
from racer_vec.run import checkpoint_files
from racer_vec.run.jsonl import append_jsonl, read_jsonl
from racer_vec.run.run_dir import RunDirectory
from racer_vec.run.run_lock import LOCK_FD_ENV, RunLock
from racer_vec.sim import highway, video
from racer_vec.sweep import trial, watchdog
from racer_vec.sweep.__main__ import main as sweep_main
from racer_vec.write_failures import WriteFailed

sys.path.insert(0, str(ROOT))
import evaluate  # noqa: E402


LIMITED = """
import os, resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # kept across exec: writes past the limit fail with EFBIG
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
os.execv(sys.executable, [sys.executable, *sys.argv[2:]])
"""
"""Runs `python ARGS` with files limited to `limit` bytes, as on a full disk (a launcher, not a
preexec_fn: this process has imported JAX, whose fork hook warns about a preexec_fn's fork)."""


def python(*args, limit=None, **kwargs) -> subprocess.CompletedProcess:
    command = [sys.executable, *args] if limit is None else [sys.executable, "-c", LIMITED, str(limit), *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300, **kwargs)


def one_error_line(stderr: str, *needles: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr and "ImportError" not in stderr, stderr[-3000:]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def fake_run(run_dir: Path, metrics: str = "", steps=(100, 200, 300)) -> Path:
    """A run directory as train.py leaves it, without checkpoints' arrays: config.json, metrics.jsonl
    (`metrics`, else one line per step), run_info.jsonl, and an evaluation of its checkpoint at 300."""
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = resolve(dataclasses.replace(configs.PRESETS["highway_fast"], runs_dir=str(run_dir.parent), run_name=run_dir.name))
    (run_dir / "config.json").write_text(json.dumps(to_dict(cfg)))
    rows = [{"env_steps": s, "episode_return_mean": float(s), "sps": 10.0} for s in steps]
    (run_dir / "metrics.jsonl").write_text(metrics or "".join(json.dumps(r) + "\n" for r in rows))
    (run_dir / "run_info.jsonl").write_text(json.dumps({"env_steps": 0, "commit": "x"}) + "\n")
    evaluation = {
        "summary": {"mean_return": 1.0, "num_episodes": 2},
        "config": {"evaluation": {"num_episodes": 2, "deterministic": False, "seed": 0},
                   "checkpoint": {"directory": str(run_dir / "checkpoints"), "step": 300}},
    }  # fmt: skip
    (run_dir / "eval" / "300").mkdir(parents=True, exist_ok=True)
    (run_dir / "eval" / "300" / "evaluation_metrics.json").write_text(json.dumps(evaluation))
    return run_dir


# ---------------------------------------------------------------------------------------------
# 1. One writer per run


HOLD = "import sys, time; from racer_vec.run.run_lock import RunLock; RunLock(sys.argv[1], 'test'); print('held', flush=True); time.sleep(600)"


def _holder(run_dir: Path, **popen) -> subprocess.Popen:
    """A process that holds the run's lock (as a training train.py does) until it is killed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True, cwd=ROOT,
                            **popen)  # fmt: skip
    assert proc.stdout.readline() == "held\n"
    return proc


def test_a_second_train_py_on_a_run_is_refused_naming_the_process_and_a_killed_one_leaves_no_lock(tmp_path):
    run_dir = fake_run(tmp_path / "run")
    holder = _holder(run_dir)
    try:
        result = run_train("--resume", str(run_dir), timeout=60)
        assert result.returncode == 2, result.stderr[-3000:]
        one_error_line(result.stderr, f"{run_dir} is in use: process {holder.pid} trains in it")
        with pytest.raises(ConfigError, match=f"process {holder.pid}"):
            RunLock(run_dir, "--resume")  # another open file of this process is refused as well
    finally:
        holder.kill()
        holder.wait()
    RunLock(run_dir, "--resume").release()  # a SIGKILLed holder leaves no stale lock
    assert (run_dir / "run.lock").read_text().split()[0] == str(os.getpid())


def test_a_trials_train_py_takes_the_trials_lock_which_a_manual_resume_cannot(tmp_path, monkeypatch):
    run_dir = tmp_path / "sweep" / "trial"
    fd = trial.acquire_lock(run_dir, timeout=5)  # the trial's, inherited by its train.py
    try:
        with pytest.raises(ConfigError, match="is in use"):
            RunLock(run_dir, "--resume")  # a manual train.py --resume beside the trial
        other = os.open(tmp_path / "other", os.O_RDWR | os.O_CREAT)
        monkeypatch.setenv(LOCK_FD_ENV, str(other))  # not this run's lock file: not taken for it
        with pytest.raises(ConfigError, match="is in use"):
            RunLock(run_dir, "--resume")
        os.close(other)
        assert LOCK_FD_ENV not in os.environ  # read once, not passed on
        monkeypatch.setenv(LOCK_FD_ENV, str(fd))
        lock = RunLock(run_dir, "--resume")  # the trial's train.py
        assert lock.fd == fd and (run_dir / "run.lock").read_text().split()[0] == str(os.getpid())
    finally:
        os.close(fd)


def test_a_trial_does_not_wait_for_a_run_another_process_trains_in(tmp_path):
    run_dir = tmp_path / "sweep" / "trial"
    holder = _holder(run_dir)
    try:
        started = time.monotonic()
        with pytest.raises(trial.TrialFailed, match=f"in use by process {holder.pid}, which is not this sweep's"):
            trial.acquire_lock(run_dir, timeout=60)
        assert time.monotonic() - started < 5
    finally:
        holder.kill()
        holder.wait()


# ---------------------------------------------------------------------------------------------
# 2. Logs that survive a kill

TORN = '{"env_steps": 250, "episode_ret'


def test_a_torn_line_is_skipped_wherever_it_sits_and_appends_start_on_a_new_line(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"env_steps": 100}\n' + TORN)  # a driver killed mid-write
    append_jsonl(path, {"env_steps": 200})  # --resume's first record
    append_jsonl(path, {"env_steps": 300})
    assert path.read_text().splitlines()[1:] == [TORN, '{"env_steps": 200}', '{"env_steps": 300}']
    assert read_jsonl(path) == [{"env_steps": 100}, {"env_steps": 200}, {"env_steps": 300}]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "skipped 1 torn line(s) (line 2)" in err and str(path) in err


def test_plot_results_and_the_sweep_read_past_a_torn_line_in_the_middle(tmp_path, capsys):
    lines = ['{"env_steps": 100, "sps": 1.0}', TORN, '{"env_steps": 200, "sps": 1.0}', '{"env_steps": 300, "sps": 1.0}']
    run = fake_run(tmp_path / "run", metrics="\n".join(lines) + "\n")
    assert plot.main([str(run), "--output", str(tmp_path / "curves.png")]) == 0
    assert [m["env_steps"] for m in plot.load_run(run).metrics] == [100, 200, 300]
    record = results.collect(run, run / "eval" / "300" / "evaluation_metrics.json")
    assert [row["env_steps"] for row in record["curve"]] == [100, 200, 300]
    tail = trial.MetricsTail(run / "metrics.jsonl")
    tail.offset = 0
    assert [row["env_steps"] for row in tail.read()] == [100, 200, 300]
    assert trial.MetricsTail(run / "metrics.jsonl").last() == {"env_steps": 300, "sps": 1.0}
    assert "torn line" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# 3. A write that fails

CHECKPOINT_ON_A_FULL_DISK = """
import sys
import numpy as np
from racer_vec.run.checkpoints import Checkpointer
from racer_vec.write_failures import WriteFailed
checkpointer = Checkpointer(sys.argv[1], keep=5)
checkpointer.save(1, {"a": np.zeros(10, np.float32)}, {"n": 1})
big = {f"x{i}": np.random.default_rng(i).normal(size=20000).astype(np.float32) for i in range(8)}
try:
    checkpointer.save(2, big, {"n": 2})
except WriteFailed as exc:
    print(f"error: {exc}", file=sys.stderr)
    checkpointer.close()
    sys.exit(1)
"""


@pytest.mark.slow
def test_a_checkpoint_on_a_full_disk_is_one_line_and_the_steps_before_it_stay(tmp_path):
    result = python("-c", CHECKPOINT_ON_A_FULL_DISK, str(tmp_path / "checkpoints"), limit=50_000)
    assert result.returncode == 1, result.stderr[-3000:]
    one_error_line(result.stderr, f"cannot write {tmp_path / 'checkpoints' / '2'} (File too large)")
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1"]  # the partial step 2 removed
    checkpoint_files.verify(tmp_path / "checkpoints" / "1", ("agent", "state"))


def test_a_metrics_line_that_cannot_be_written_names_its_path(tmp_path):
    cfg = resolve(dataclasses.replace(configs.PRESETS["highway_fast"], runs_dir=str(tmp_path), run_name="run"))
    directory = RunDirectory(cfg)
    (directory.path / "metrics.jsonl").mkdir(parents=True)  # any write there fails
    with pytest.raises(WriteFailed, match=f"cannot write {directory.path / 'metrics.jsonl'} "):
        directory.log({"env_steps": 100})


@pytest.mark.slow
def test_results_and_plots_on_a_full_disk_are_one_line_and_exit_1_keeping_the_old_file(tmp_path):
    run = fake_run(tmp_path / "run")
    output = tmp_path / "out" / "run.json"
    output.parent.mkdir()
    output.write_text("the previous results file\n")
    evaluation = run / "eval" / "300" / "evaluation_metrics.json"
    result = python("-m", "racer_vec.results", "collect", str(run), "--evaluation", str(evaluation),
                    "--output", str(output), limit=2_000)  # fmt: skip
    assert result.returncode == 1, result.stderr[-3000:]
    one_error_line(result.stderr, f"cannot write {output} (File too large)")
    assert output.read_text() == "the previous results file\n" and os.listdir(output.parent) == ["run.json"]

    result = python("-m", "racer_vec.plot", str(run), "--output", str(tmp_path / "curves.png"), limit=5_000)
    assert result.returncode == 1, result.stderr[-3000:]
    one_error_line(result.stderr, f"cannot write {tmp_path / 'curves.png'} (File too large)")


def test_the_sweep_report_on_a_full_disk_is_one_line_and_exit_1(tmp_path, capsys):
    sweep_dir = tmp_path / "sweep"
    name = "seed=0"
    run = fake_run(sweep_dir / name)
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "max_steps": 300}))
    (run / "checkpoints" / "300").mkdir(parents=True)
    (run / "checkpoints" / "300" / "files.json").write_text("{}")  # an intact step, for the report
    spec = {"name": "sweep", "sweep_dir": str(sweep_dir), "preset": "highway_fast", "grid": [], "seeds": [0],
            "train_args": [], "trials": [{"name": name, "config": {"seed": 0}}]}  # fmt: skip
    (sweep_dir / "sweep.json").write_text(json.dumps(spec))
    (sweep_dir / "results").write_text("")  # a file where the results directory goes: its writes fail
    code = sweep_main(["--report", str(sweep_dir), "--report-episodes", "2"])
    assert code == 1
    one_error_line(capsys.readouterr().err, f"error: report: cannot write {sweep_dir / 'results' / name}_300.json")


@pytest.mark.slow
def test_a_video_on_a_full_disk_is_one_line_and_exit_1(tmp_path):
    result = python("evaluate.py", "--policy", "zero", "--preset", "highway_fast", "--num-episodes", "1",
                    "--duration", "3", "--num-workers", "1", "--output-dir", str(tmp_path), limit=8_000)  # fmt: skip
    assert result.returncode == 1, result.stderr[-3000:]
    video = tmp_path / "highway_eval_zero_highway_fast_episode_0.mp4"
    one_error_line(result.stderr, f"cannot write {video} (", "evaluation_metrics.json not written")


# ---------------------------------------------------------------------------------------------
# 4. Places that cannot be written


def test_places_that_cannot_be_written_are_one_line_and_exit_2_before_anything_starts(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    bad = blocker / "sub"  # under a file: nobody, root included, can create it
    result = run_train("highway_fast", "--runs-dir", str(bad), "--run-name", "x", timeout=60)
    assert result.returncode == 2
    one_error_line(result.stderr, f"--runs-dir {bad}: cannot write there (Not a directory)")

    code = evaluate.main(["--policy", "zero", "--preset", "highway_fast", "--output-dir", str(bad)])
    assert code == 2
    one_error_line(capsys.readouterr().err, f"--output-dir {bad}: cannot write there")

    run = fake_run(tmp_path / "run")
    assert plot.main([str(run), "--output", str(bad / "x.png")]) == 2
    one_error_line(capsys.readouterr().err, f"--output {bad / 'x.png'}: cannot write there")
    evaluation = run / "eval" / "300" / "evaluation_metrics.json"
    assert results.main(["collect", str(run), "--evaluation", str(evaluation), "--output", str(bad / "r.json")]) == 2
    one_error_line(capsys.readouterr().err, f"--output {bad / 'r.json'}: cannot write there")
    assert sweep_main(["highway_fast", "--runs-dir", str(bad), "--sweep-name", "s", "--cpus-per-trial", "1"]) == 2
    one_error_line(capsys.readouterr().err, f"--runs-dir {bad}: cannot write there")


# ---------------------------------------------------------------------------------------------
# 5. No process outlives a killed sweep

STAND_IN_SWEEP = """
import os, subprocess, sys, time
from pathlib import Path
from racer_vec.sweep import watchdog
watchdog.start(Path(sys.argv[1]), "MARK")
sleep = [sys.executable, "-c", "import time; time.sleep(600)"]
# Ray: a process with a child of its own
ray = subprocess.Popen([sys.executable, "-c", f"import subprocess, time; subprocess.Popen({sleep!r}); time.sleep(600)"])
# a trial: in a session of its own, marked, checkpointing on SIGTERM
trial = subprocess.Popen([sys.executable, "-c", sys.argv[2], sys.argv[3]], start_new_session=True,
                         env={**os.environ, "MARK": sys.argv[1] + "/trial"})
print(ray.pid, trial.pid, flush=True)
time.sleep(600)
"""
TRIAL = """
import signal, sys, time
from pathlib import Path
signal.signal(signal.SIGTERM, lambda *_: (Path(sys.argv[1]).write_text("checkpointed"), sys.exit(0)))
time.sleep(600)
"""


@pytest.mark.slow
def test_the_watchdog_ends_what_a_killed_sweep_started(tmp_path):
    sweep = subprocess.Popen([sys.executable, "-c", STAND_IN_SWEEP, str(tmp_path), TRIAL, str(tmp_path / "trial")],
                             stdout=subprocess.PIPE, text=True, cwd=ROOT, start_new_session=True)  # fmt: skip
    try:
        ray, _ = map(int, sweep.stdout.readline().split())
        deadline = time.monotonic() + 30
        while len(psutil.Process(sweep.pid).children(recursive=True)) < 4:  # watchdog, Ray and its child, trial
            assert time.monotonic() < deadline
            time.sleep(0.2)
        time.sleep(4 * watchdog.POLL_S)  # the watchdog has seen them
        started = [p.pid for p in psutil.Process(sweep.pid).children(recursive=True)]
        assert ray in started
    finally:
        sweep.kill()
        sweep.wait()
    deadline = time.monotonic() + watchdog.RAY_GRACE_S + 5
    while running(started) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert running(started) == []
    assert (tmp_path / "trial").read_text() == "checkpointed"  # SIGTERM first: train.py checkpoints


# ---------------------------------------------------------------------------------------------
# 6. Env workers that hang (design §8, §10)

FAST = configs.PRESETS["highway_fast"].env
STILL = np.zeros((2, 2), np.float32)


def _hang(monkeypatch, *hangs: Hang) -> None:
    """Arm `hangs` in every vector env this process starts; a stopped worker that the code under test
    did not kill goes on after 30 s (the test then fails rather than waits for ever)."""
    monkeypatch.setattr(highway, "_worker_env", worker_hooks.stand_in(*hangs))
    for hang in hangs:
        worker_hooks.continue_later(hang.marker)


@pytest.mark.slow
def test_a_worker_that_hangs_while_it_starts_is_named_and_killed(tmp_path, monkeypatch):
    marker = str(tmp_path / "hung")
    _hang(monkeypatch, Hang(1, "start", 1, marker))
    started = time.monotonic()
    with pytest.raises(highway.WorkerHung) as hung:
        highway.make_vector_env(FAST, 2, seed=0, worker_timeout=2.0).close()
    assert time.monotonic() - started < 20  # gymnasium's constructor waits for ever
    assert hung.value.env_index == 1 and hung.value.doing == "start" and 2.0 <= hung.value.waited < 10
    assert hung.value.describe().startswith("env worker 1 hung (no answer to its start in ")
    assert no_worker_left() == []


def test_a_stop_ends_the_wait_for_a_hung_worker_and_the_close_kills_it(tmp_path, monkeypatch):
    marker = str(tmp_path / "hung")
    _hang(monkeypatch, Hang(1, "step", 1, marker))
    stop = threading.Event()
    envs = highway.make_vector_env(FAST, 2, seed=0, worker_timeout=60.0, should_stop=stop.is_set)
    try:
        envs.reset(seed=0)
        threading.Thread(target=lambda: (worker_hooks.wait_for(marker), stop.set()), daemon=True).start()
        started = time.monotonic()
        with pytest.raises(highway.WaitStopped):
            envs.step(STILL)
        assert time.monotonic() - started < 20  # a signal handler's flag, seen within a slice
    finally:
        started = time.monotonic()
        envs.close()
    assert time.monotonic() - started < 20 and no_worker_left() == []  # gymnasium's close waits for the step


@pytest.mark.slow
def test_a_close_kills_a_worker_stopped_between_calls():
    envs = highway.make_vector_env(FAST, 2, seed=0)
    envs.reset(seed=0)
    pid = envs.processes[1].pid
    os.kill(pid, signal.SIGSTOP)  # by the machine: not dead, so dead_workers() does not see it
    rescue = threading.Timer(30.0, lambda: running([pid]) and os.kill(pid, signal.SIGCONT))
    rescue.daemon = True
    rescue.start()
    started = time.monotonic()
    envs.close()
    assert time.monotonic() - started < 20  # gymnasium's close waits for its answer
    assert no_worker_left() == []


@pytest.mark.slow
def test_hung_training_and_evaluation_workers_are_replaced_and_the_run_finishes(tmp_path, monkeypatch, capsys):
    """A training worker hangs in the first reset, another mid-step; an evaluation worker hangs in
    its first reset, another mid-step in the next evaluation. Learning is off: the loop is under test."""
    from racer_vec.run.train_cli import parse_train_args
    from racer_vec.run.training import Trainer

    hangs = [Hang(0, "reset", 1, str(tmp_path / "a")), Hang(1, "step", 120, str(tmp_path / "b")),
             Hang(1, "reset", 1, str(tmp_path / "c"), evaluator=True),
             Hang(0, "step", 5, str(tmp_path / "d"), evaluator=True)]  # fmt: skip
    _hang(monkeypatch, *hangs)
    cfg = parse_train_args([*TINY_ARGS, "--max-steps", "300", "--start-training", "300", "--eval-interval", "100",
                            "--worker-timeout", "2", "--runs-dir", str(tmp_path), "--run-name", "hung",
                            "--wandb-mode", "disabled"])  # fmt: skip
    trainer = Trainer(cfg)
    try:
        trainer.setup()
        assert trainer.run() == 0
    finally:
        trainer.close()
    assert no_worker_left() == []
    err = capsys.readouterr().err
    assert "env worker 0 hung (no answer to its reset in 2." in err
    assert "replacing the env workers at 0 env steps (restart 1 of at most 3)" in err
    assert "env worker 1 hung (no answer to its step in 2." in err  # its 120th step: 238 env steps
    assert "replacing the env workers at 238 env steps (restart 2 of at most 3)" in err
    assert "evaluation worker 1 (episode 1) hung (no answer to its reset in 2." in err
    assert "at 100 env steps; evaluation skipped" in err
    assert "evaluation worker 0 (episode 0) hung (no answer to its step in 2." in err
    assert "at 200 env steps; evaluation skipped" in err
    rows = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["env_steps"] for r in rows] == [100, 200, 300]
    assert rows[-1]["worker_restarts_total"] == 2 and rows[-1]["eval_worker_restarts_total"] == 2
    assert [r.get("eval/skipped") for r in rows] == [1, 1, None]
    assert rows[-1]["eval/num_episodes"] == 2


LAUNCH = """
import sys
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/tests"]
import worker_hooks
worker_hooks.install(worker_hooks.Hang(1, "step", int(sys.argv[3]), sys.argv[2], evaluator={evaluator}))
import {module}
sys.exit({module}.main(sys.argv[4:]))
"""
"""Runs train.py's or evaluate.py's main with worker 1 stopping on its k-th step."""


def _launch(module: str, marker: Path, count: int, *args) -> subprocess.Popen:
    launch = LAUNCH.format(module=module, evaluator=module == "evaluate")
    return subprocess.Popen(
        [sys.executable, "-c", launch, str(ROOT), str(marker), str(count), *args],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip


def _session_left(sid: int, timeout: float = 10.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        pids = []
        for p in psutil.process_iter():
            try:
                if os.getsid(p.pid) == sid:
                    pids.append(p.pid)
            except (ProcessLookupError, psutil.NoSuchProcess):
                pass
        left = running(pids)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def _stopped_in_time(proc: subprocess.Popen, marker: Path, send) -> tuple[str, str, float]:
    """Sends a signal (`send(proc)`) once the worker has hung; the output and how long the stop took."""
    try:
        worker_hooks.wait_for(marker)
        time.sleep(1.0)  # the driver waits for it
        assert proc.poll() is None, proc.communicate()
        send(proc)
        started = time.monotonic()
        out, err = proc.communicate(timeout=120)
        return out, err, time.monotonic() - started
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)  # the stopped worker too: it is in the driver's process group
        raise


@pytest.mark.slow
def test_sigterm_while_a_training_worker_hangs_checkpoints_and_leaves_nothing(tmp_path):
    args = list(TINY_ARGS)
    for flag, value in (("--max-steps", "100000"), ("--start-training", "100000"), ("--checkpoint-interval", "100000")):
        args[args.index(flag) + 1] = value
    marker = tmp_path / "hung"
    proc = _launch("train", marker, 150, *args, "--eval-interval", "0", "--worker-timeout", "60",
                   "--runs-dir", str(tmp_path), "--run-name", "run", "--wandb-mode", "disabled")  # fmt: skip
    out, err, took = _stopped_in_time(proc, marker, lambda p: p.send_signal(signal.SIGTERM))
    assert proc.returncode == 130 and "Traceback" not in err, err[-3000:]
    assert took < 20  # the worker timeout is 60 s
    assert "interrupted: checkpoint at 298 env steps" in out  # the 149 vector steps before the hung one
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert checkpoint_files.steps(tmp_path / "run" / "checkpoints")[0] == 298 >= rows[-1]["env_steps"]
    assert _session_left(proc.pid) == []


ADOPTER = """
import ctypes, subprocess, sys, time
ctypes.CDLL(None).prctl(36, 1)  # PR_SET_CHILD_SUBREAPER: the driver's orphans become this process's children
driver = subprocess.Popen(sys.argv[1:], process_group=0)
print(driver.pid, flush=True)
print(driver.wait(), flush=True)
time.sleep(600)
"""
"""Runs a command in a process group of its own, below a process of the same session that adopts its
orphans (as a container's init may): the kernel then does not continue a stopped orphan for us."""


@pytest.mark.slow
def test_sigterm_to_the_process_group_while_an_evaluation_worker_hangs_leaves_nothing(tmp_path):
    """The SIGTERM ends the forkserver and the other worker, not the stopped one: the driver kills it."""
    marker = tmp_path / "hung"
    args = ["--policy", "constant", "--preset", "highway_fast", "--num-episodes", "4", "--num-workers", "2",
            "--no-render", "--worker-timeout", "60", "--output-dir", str(tmp_path)]  # fmt: skip
    launch = LAUNCH.format(module="evaluate", evaluator=True)
    adopter = subprocess.Popen(
        [sys.executable, "-c", ADOPTER, sys.executable, "-c", launch, str(ROOT), str(marker), "10", *args],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    driver = int(adopter.stdout.readline())
    try:
        worker_hooks.wait_for(marker)
        time.sleep(1.0)  # the driver waits for it
        os.killpg(driver, signal.SIGTERM)
        started = time.monotonic()
        assert select.select([adopter.stdout], [], [], 120)[0], "the driver did not stop"
        assert int(adopter.stdout.readline()) == 130
        assert time.monotonic() - started < 20
        assert [pid for pid in _session_left(adopter.pid) if pid != adopter.pid] == []
    finally:
        for group in (driver, adopter.pid):  # whatever is left
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGKILL)
    assert adopter.communicate()[1].strip().splitlines() == ["interrupted: evaluation_metrics.json not written"]


def _evaluate(capsys, output_dir: Path, *extra) -> tuple[list[dict], list[str]]:
    """evaluate.py in this process (8 episodes of 4 s, the first 2 filmed): its episodes and stderr lines."""
    args = ["--policy", "constant", "--constant-action", "-0.3", "0", "--preset", "highway_fast", "--num-episodes",
            "8", "--num-workers", "2", "--duration", "4", "--max-videos", "2", "--output-dir", str(output_dir),
            *extra]  # fmt: skip
    code = evaluate.main(args)
    err = capsys.readouterr().err
    assert code == 0, err
    report = json.loads((output_dir / "evaluation_metrics.json").read_text())
    for k in (0, 1):
        assert video.mp4_complete(output_dir / f"highway_eval_constant_highway_fast_episode_{k}.mp4")
    return [{k: v for k, v in e.items() if k != "video"} for e in report["episodes"]], err.strip().splitlines()


@pytest.mark.slow
def test_evaluate_runs_the_episodes_of_hung_workers_again_with_the_same_numbers(tmp_path, monkeypatch, capsys):
    undisturbed, lines = _evaluate(capsys, tmp_path / "undisturbed")
    assert lines == []
    # worker 0 hangs in episode 0, which is filmed; after the restart, worker 1 in its 3rd reset
    _hang(monkeypatch, Hang(0, "step", 10, str(tmp_path / "a"), evaluator=True),
          Hang(1, "reset", 3, str(tmp_path / "b"), evaluator=True))
    episodes, lines = _evaluate(capsys, tmp_path / "hung", "--worker-timeout", "2")
    assert episodes == undisturbed
    assert len(lines) == 2, lines
    assert lines[0].startswith("env worker 0 (episode 0) hung (no answer to its step in 2.")
    assert "; new env workers run episode(s) 0, " in lines[0] and lines[0].endswith("again (restart 1 of at most 3)")
    assert lines[1].startswith("env worker 1 (episode ") and "hung (no answer to its reset in 2." in lines[1]
    assert lines[1].endswith("again (restart 2 of at most 3)")
    assert no_worker_left() == []


@pytest.mark.slow
def test_evaluate_past_its_restart_limit_is_one_line_and_exit_1(tmp_path, monkeypatch, capsys):
    _hang(monkeypatch, Hang(1, "reset", 2, str(tmp_path / "a"), evaluator=True))
    code = evaluate.main(["--policy", "zero", "--preset", "highway_fast", "--num-episodes", "4", "--num-workers", "2",
                          "--duration", "2", "--no-render", "--worker-timeout", "2", "--max-worker-restarts", "0",
                          "--output-dir", str(tmp_path)])  # fmt: skip
    assert code == 1
    one_error_line(capsys.readouterr().err, "error: env worker 1 (episode ", "hung (no answer to its reset in 2.",
                   "after 0 worker restarts (--max-worker-restarts 0); evaluation_metrics.json not written")
    assert not (tmp_path / "evaluation_metrics.json").exists() and no_worker_left() == []


# ---------------------------------------------------------------------------------------------
# Real runs (slow)


@pytest.mark.slow
def test_a_full_disk_during_a_checkpoint_is_one_line_and_the_resumed_run_loses_no_record(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    with open(run / "metrics.jsonl", "a") as f:
        f.write(TORN)  # the driver was killed mid-write
    args = ("--resume", str(run), "--max-steps", "600", "--wandb-mode", "disabled")
    # the agent's 90 KB file does not fit: the checkpoint at 600 fails, after the lines of 500 and 600
    result = python(str(ROOT / "train.py"), *args, limit=50_000)
    assert result.returncode == 1, result.stderr[-3000:]
    one_error_line(result.stderr, f"cannot write {run / 'checkpoints' / '600'} (File too large)",
                   "its latest checkpoint is 400", f"python train.py --resume {run}")  # fmt: skip
    assert sorted(os.listdir(run / "checkpoints")) == ["200", "400"]  # intact; nothing of 600 left
    for step in (200, 400):
        checkpoint_files.verify(run / "checkpoints" / str(step))

    assert train_here(*args) == 0  # room again
    assert checkpoint_files.steps(run / "checkpoints")[0] == 600
    steps = [row["env_steps"] for row in read_jsonl(run / "metrics.jsonl")]
    assert steps == [100, 200, 300, 400, 500, 600, 500, 600]  # the torn line skipped, no record lost
    assert plot.main([str(run), "--output", str(tmp_path / "curves.png")]) == 0
