"""Runs that survive the machine (design §8, §10, §12): one writer per run, logs that survive a kill,
a write that fails (a full disk), places that cannot be written, and no process left by a killed
sweep. A full disk is a file-size limit here (RLIMIT_FSIZE, with SIGXFSZ ignored: writes past it
fail with EFBIG), which needs neither root nor a real disk."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

import configs
from conftest import ROOT, run_train
from racer_vec import plot, results
from racer_vec.config import ConfigError, resolve, to_dict
from racer_vec.run import checkpoint_files
from racer_vec.run.jsonl import append_jsonl, read_jsonl
from racer_vec.run.run_dir import RunDirectory
from racer_vec.run.run_lock import LOCK_FD_ENV, RunLock
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


def _running(pids) -> list[int]:
    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


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
    while _running(started) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _running(started) == []
    assert (tmp_path / "trial").read_text() == "checkpointed"  # SIGTERM first: train.py checkpoints


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

    result = run_train(*args)  # room again
    assert result.returncode == 0, result.stderr[-3000:]
    assert checkpoint_files.steps(run / "checkpoints")[0] == 600
    steps = [row["env_steps"] for row in read_jsonl(run / "metrics.jsonl")]
    assert steps == [100, 200, 300, 400, 500, 600, 500, 600]  # the torn line skipped, no record lost
    assert plot.main([str(run), "--output", str(tmp_path / "curves.png")]) == 0
