"""The sweep command: grid expansion and bad input without Ray; with Ray (marked slow), one tiny
two-trial sweep whose trial is killed mid-run, which is interrupted, resumed, and reported."""

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import ROOT, TINY_ARGS
from racer_vec.sweep import cli, grid, report, trial
from racer_vec.sweep.__main__ import main
from racer_vec.sweep.sweep_dir import open_sweep, plan_sweep
from racer_vec.config import ConfigError

# TINY_ARGS without the preset and the flags the sweep sets; no periodic evaluation, no wandb
TRAIN_FLAGS = [
    *TINY_ARGS[1 : TINY_ARGS.index("--max-steps")],
    *TINY_ARGS[TINY_ARGS.index("--start-training") : TINY_ARGS.index("--eval-interval")],
    "--eval-interval", "0", "--wandb-mode", "disabled",
]  # fmt: skip


def _plan(tmp_path, *argv):
    args, line = cli.parse_command_line(list(argv))
    return plan_sweep(args, line, list(argv))


# ---------------------------------------------------------------------------------------------
# Without Ray


def test_command_line_splits_sweep_flags_from_train_flags():
    line = cli.split_command_line(
        ["highway_fast", "--grid", "agent.cvar_risk=0,0.5", "--max-steps", "400", "--grid=num_envs=1,2",
         "--seeds", "0", "1", "--agent.hidden-dims", "32", "32", "--no-final-report", "--cpus_per_trial", "1"]
    )  # fmt: skip
    assert line.preset == "highway_fast"
    assert line.train_args == ["--max-steps", "400", "--agent.hidden-dims", "32", "32"]
    args, _ = cli.parse_command_line(["--grid", "a=1", "--grid", "b=2", "--seeds", "3", "4", "--no-final-report"])
    assert args.grid == ("a=1", "b=2") and args.seeds == (3, 4) and args.final_report is False
    assert {"grid", "seeds", "final_report", "cpus_per_trial"} <= line.given


def test_grid_is_a_product_of_named_trials_run_by_train_py_flags(tmp_path):
    sweep_dir, spec = _plan(
        tmp_path, "highway_fast", "--grid", "agent.cvar_risk=0,0.5", "--grid", "--env.fast-sim=true,false",
        "--seeds", "0", "1", "--runs-dir", str(tmp_path), "--sweep-name", "s", *TRAIN_FLAGS, "--max-steps", "400",
    )  # fmt: skip
    assert sweep_dir == tmp_path / "s" and not sweep_dir.exists()
    names = [t["name"] for t in spec["trials"]]
    assert len(names) == len(set(names)) == 8
    assert "cvar_risk=0.5_fast_sim=false_seed=1" in names
    trials = grid.validate_trials(spec)
    cfg = trials["cvar_risk=0.5_fast_sim=false_seed=1"]
    assert (cfg.agent.cvar_risk, cfg.env.fast_sim, cfg.seed, cfg.max_steps) == (0.5, False, 1, 400)
    assert (cfg.run_name, cfg.runs_dir) == ("cvar_risk=0.5_fast_sim=false_seed=1", str(sweep_dir))
    assert grid.trial_cpus(spec, cfg) == cfg.num_envs + 1 == 3
    assert grid.trial_cpus({**spec, "cpus_per_trial": 1.0}, cfg) == 1.0
    assert grid.grid_flags("agent.hidden_dims", "64 64") == ["--agent.hidden-dims", "64", "64"]
    assert grid.grid_flags("save_buffer", "false") == ["--no-save-buffer"]


def test_gpu_share_reaches_the_trial_environment():
    assert trial.trial_environment(0, {}, "runs/s/t")["JAX_PLATFORMS"] == "cpu"
    assert trial.trial_environment(0, {}, "runs/s/t")[trial.TRIAL_ENV] == "runs/s/t"
    env = trial.trial_environment(0.5, {})
    assert env["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.375" and "JAX_PLATFORMS" not in env
    assert "XLA_PYTHON_CLIENT_MEM_FRACTION" not in trial.trial_environment(1, {})


def test_metrics_tail_reports_complete_lines_once(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"env_steps": 100}\n')
    tail = trial.MetricsTail(path)  # starts at the end: an earlier attempt's lines are not reported again
    with open(path, "a") as f:
        f.write('{"env_steps": 200}\n{"env_ste')
    assert tail.read() == [{"env_steps": 200}]
    with open(path, "a") as f:
        f.write('ps": 300}\n')
    assert tail.read() == [{"env_steps": 300}] and tail.read() == []


def test_table_is_mean_and_std_over_seeds():
    spec = {"name": "s", "preset": "highway_fast", "grid": [["agent.cvar_risk", ["0", "0.5"]]], "seeds": [0, 1]}

    def record(risk, seed, ret, crashes):
        evaluation = {"mean_return": ret, "mean_ego_speed": 20.0, "collision_rate": 0.1 * seed, "success_rate": 1.0}
        training = {"train_collisions_total": crashes, "transitions_per_s": 50.0, "wall_time_s": 3600.0}
        return {"agent.cvar_risk": risk, "seed": seed}, {
            "seed": seed, "env_steps": 120_000, "evaluation": evaluation, "training": training}  # fmt: skip

    table = report.sweep_table(spec, [record("0", 0, 50.0, 10), record("0", 1, 60.0, 20), record("0.5", 0, 55.0, 5)], 50)
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| cvar_risk | seeds | transitions | eval return |")
    assert rows[1] == (
        "| 0 | 0, 1 | 120k | 55.0 ± 5.0 | 20.0 ± 0.0 | 5 ± 5% | 100 ± 0% | 15.0 ± 5.0 | 50.0 ± 0.0 | 1.00 ± 0.00 |"
    )
    assert rows[2].startswith("| 0.5 | 0 | 120k | 55.0 | ")


@pytest.mark.parametrize(
    "argv, says",
    [
        (["--grid", "agent.cvar_riskk=0,0.5"], "unknown config field (did you mean agent.cvar_risk?"),
        (["--grid", "agent.cvar_risk=0,1.0"], "--agent.cvar-risk must be in [0, 1)"),
        (["--grid", "agent.cvar_risk=0,abc"], "could not convert string to float"),
        (["--grid", "agent.cvar_risk="], "an empty grid"),
        (["--grid", "seed=1,2"], "use --seeds"),
        (["--max-stepz", "5"], "perhaps --max-steps?"),
        (["--address", "127.0.0.1:9"], "--address 127.0.0.1:9: nothing answers"),
        (["--num-envs", "8", "--cpus-per-trial", "100000"], "this machine has"),
    ],
)
def test_bad_input_is_one_line_and_exit_2_before_ray(tmp_path, capsys, argv, says):
    code = main(["highway_fast", "--runs-dir", str(tmp_path), "--sweep-name", "s", *argv])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and says in err, err
    assert not (tmp_path / "s").exists()


def test_existing_sweep_directory_needs_resume(tmp_path):
    (tmp_path / "s").mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "racer_vec.sweep", "highway_fast", "--runs-dir", str(tmp_path), "--sweep-name", "s"],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "exists: continue that sweep with --resume" in result.stderr
    with pytest.raises(ConfigError, match="not a sweep directory"):
        open_sweep(tmp_path / "s", cli.split_command_line([]), "--resume")


def _supervise(worker: int, *command: str, **popen) -> subprocess.Popen:
    lock_r, lock_w = os.pipe()  # any open descriptor stands in for the trial's lock
    try:
        return subprocess.Popen(
            [sys.executable, "-P", "-m", trial.SUPERVISOR, str(worker), str(lock_r), *command], pass_fds=(lock_r,),
            cwd=ROOT, **popen,
        )  # fmt: skip
    finally:
        os.close(lock_r)
        os.close(lock_w)


def test_supervisor_passes_on_exit_codes_and_signals():
    assert _supervise(os.getpid(), "-c", "import sys; sys.exit(3)").wait(timeout=30) == 3
    assert _supervise(1, "-c", "import sys; sys.exit(3)").wait(timeout=30) == 143  # not its parent: gone already
    child = "import signal, sys, time; signal.signal(signal.SIGTERM, lambda *a: sys.exit(7)); print('up', flush=True)"
    child += "; time.sleep(60)"
    proc = _supervise(os.getpid(), "-c", child, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "up\n"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 7


@pytest.mark.skipif(not Path("/proc/self/autogroup").exists(), reason="no autogroup scheduler on this machine")
def test_a_trial_session_keeps_the_sweeps_nice_value():
    """A session of its own is an autogroup of its own at nice 0 unless the trial passes its nice on."""
    code = """
import os, subprocess, sys, time
from racer_vec.sweep.trial import carry_niceness
os.nice(7)  # in this child only: the test's own process keeps its priority
leader = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], start_new_session=True)
fresh = open(f"/proc/{leader.pid}/autogroup").read().split()[-1]
carry_niceness(leader.pid)
print(fresh, open(f"/proc/{leader.pid}/autogroup").read().split()[-1])
leader.kill()
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.stdout.split() == ["0", str(min(os.getpriority(os.PRIO_PROCESS, 0) + 7, 19))], out


@pytest.mark.parametrize("module", ["supervisor", "watchdog"])
def test_supervisor_and_watchdog_import_only_the_standard_library(module):
    """The supervisor runs before it is tied to its Ray worker, the watchdog beside the sweep: what
    they import on the way must be light."""
    code = f"""
import sys
before = set(sys.modules)
import racer_vec.sweep.{module}
new = sorted(set(sys.modules) - before)
print(sorted({{m.split(".")[0] for m in new}} - set(sys.stdlib_module_names)), [m for m in new if "racer_vec" in m])
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.stdout.strip() == f"['racer_vec'] ['racer_vec', 'racer_vec.sweep', 'racer_vec.sweep.{module}']", out


# ---------------------------------------------------------------------------------------------
# With Ray: one scenario, checked by the tests below


def _leftovers(sid: int, sweep_dir: Path) -> list[str]:
    """Live processes of the sweep's session (its Ray instance and workers) or of its trials (sessions
    of their own, marked in their environment)."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        try:
            if proc.info["status"] == psutil.STATUS_ZOMBIE or proc.pid == os.getpid():
                continue
            if os.getsid(proc.pid) == sid or proc.environ().get(trial.TRIAL_ENV, "").startswith(str(sweep_dir)):
                found.append(f"{proc.pid} {' '.join(proc.info['cmdline'] or ())[:120]}")
        except (ProcessLookupError, psutil.NoSuchProcess, psutil.AccessDenied, PermissionError):
            pass
    return found


def _wait_gone(sid: int, sweep_dir: Path, timeout: float = 5.0) -> list[str]:
    deadline = time.time() + timeout
    while (left := _leftovers(sid, sweep_dir)) and time.time() < deadline:
        time.sleep(0.5)
    return left


def _start(tmp_path, name: str, *argv) -> tuple[subprocess.Popen, Path]:
    log = tmp_path / f"{name}.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "racer_vec.sweep", *argv], cwd=tmp_path, stdout=open(log, "w"),
        stderr=subprocess.STDOUT, start_new_session=True,  # its own session, as a terminal gives it
    )  # fmt: skip
    return proc, log


def _wait_for(proc, log: Path, condition, what: str, timeout: float = 240.0) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, f"the sweep exited before {what}:\n" + log.read_text()[-4000:]
        assert time.time() < deadline, f"timed out waiting for {what}:\n" + log.read_text()[-4000:]
        time.sleep(0.5)


@contextlib.contextmanager
def _stopped_on_failure(proc: subprocess.Popen):
    """A failed step stops the sweep it started, as Ctrl-C would (its trials checkpoint and exit)."""
    try:
        yield
    except BaseException:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        raise


def _train_py(run_dir: Path):
    """The trial's train.py (marked with its run directory, as other runs of the machine are not)."""
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        with contextlib.suppress(psutil.Error):
            if len(cmd) > 1 and cmd[1].endswith("train.py") and proc.environ().get(trial.TRIAL_ENV) == str(run_dir):
                return proc
    return None


def _nice(proc: psutil.Process) -> tuple[int, int]:
    """A process's nice value and its scheduling group's (Linux's autogroup; -1 without one)."""
    group = Path(f"/proc/{proc.pid}/autogroup")
    return proc.nice(), int(group.read_text().split()[-1]) if group.exists() else -1


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _sessions(run_dir: Path) -> list[int]:
    return [json.loads(line)["env_steps"] for line in (run_dir / "run_info.jsonl").read_text().splitlines()]


# the short trial ends where learning would start, compiling nothing: the long one alone compiles
# the learner (its retry and resume find it in the session's XLA cache)
SHORT, LONG = "max_steps=100_seed=0", "max_steps=800_seed=0"


@pytest.fixture(scope="module")
def scenario(tmp_path_factory):
    """A two-trial sweep (100 and 800 env steps): the long trial's train.py is SIGKILLed after its
    checkpoint at 200; once the short trial has finished and the long one's retry has trained on,
    Ctrl-C; then --resume to the end, with the report."""
    tmp = tmp_path_factory.mktemp("sweep")
    sweep_dir = tmp / "runs" / "tiny"
    argv = ["highway_fast", "--grid", "max_steps=100,800", "--seeds", "0", "--sweep-name", "tiny",
            "--cpus-per-trial", "1", "--report-episodes", "2", "--report-workers", "1", *TRAIN_FLAGS]  # fmt: skip
    long_dir = sweep_dir / LONG

    def retried():
        return len(_sessions(long_dir)) == 2 and max(m["env_steps"] for m in _metrics(long_dir)) > killed_at

    proc, log = _start(tmp, "first", *argv)
    with _stopped_on_failure(proc):
        _wait_for(proc, log, lambda: trial.latest_step(long_dir) == 200 and _train_py(long_dir), "a checkpoint")
        killed_at = max(m["env_steps"] for m in _metrics(long_dir))
        nice = _nice(_train_py(long_dir))
        _train_py(long_dir).kill()
        _wait_for(proc, log, lambda: f"{SHORT}: TERMINATED" in log.read_text() and retried(), "the retry to train on")
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the sweep's process group
        first_code = proc.wait(timeout=120)
    first = {"code": first_code, "out": log.read_text(), "left": _wait_gone(proc.pid, sweep_dir),
             "interrupted_at": trial.latest_step(long_dir), "killed_at": killed_at, "nice": nice}  # fmt: skip

    proc, log = _start(tmp, "resumed", "--resume", str(sweep_dir), "--report-episodes", "2", "--report-workers", "1")
    with _stopped_on_failure(proc):
        resumed_code = proc.wait(timeout=300)
    resumed = {"code": resumed_code, "out": log.read_text(), "left": _wait_gone(proc.pid, sweep_dir)}
    return sweep_dir, first, resumed


@pytest.mark.slow
def test_killed_trial_is_retried_from_its_checkpoint(scenario):
    sweep_dir, first, _ = scenario
    out = first["out"]
    assert f"{LONG}: FAILED attempt 1 (the trial's process was killed by SIGKILL" in out, out[-4000:]
    assert f"{LONG}: RUNNING (attempt 2), resuming its run from 200 env steps" in out
    # the retry resumed from the checkpoint at 200: its first logged step follows it, not step 0
    assert _sessions(sweep_dir / LONG)[:2] == [0, 200]
    steps = [m["env_steps"] for m in _metrics(sweep_dir / LONG)]
    assert steps[: steps.index(first["killed_at"]) + 1] == list(range(100, first["killed_at"] + 1, 100))
    assert steps[steps.index(first["killed_at"]) + 1] == 300


@pytest.mark.slow
def test_a_trial_runs_at_the_sweeps_nice_value(scenario):
    """Not Ray's default for its workers, 15 levels lower (design §12); the sweep's is this process's."""
    mine = os.getpriority(os.PRIO_PROCESS, 0)
    assert scenario[1]["nice"] == (mine, mine if Path("/proc/self/autogroup").exists() else -1)


@pytest.mark.slow
def test_interrupted_sweep_checkpoints_and_resume_finishes_only_the_unfinished_trial(scenario):
    sweep_dir, first, resumed = scenario
    assert first["code"] == 130, first["out"][-4000:]
    assert f"continue with: python -m racer_vec.sweep --resume {sweep_dir}" in first["out"]
    assert 300 <= first["interrupted_at"] < 800  # the Ctrl-C checkpoint, between the periodic ones
    assert resumed["code"] == 0, resumed["out"][-4000:]
    resuming = rf"{LONG}: RUNNING \(attempt \d\), resuming its run from {first['interrupted_at']} env steps"
    assert re.search(resuming, resumed["out"])
    assert f"{SHORT}: RUNNING" not in resumed["out"]
    assert _sessions(sweep_dir / SHORT) == [0]
    assert _sessions(sweep_dir / LONG) == [0, 200, first["interrupted_at"]]
    assert trial.latest_step(sweep_dir / SHORT) == 100 and trial.latest_step(sweep_dir / LONG) == 800


@pytest.mark.slow
def test_finished_sweep_has_its_table_results_and_plot(scenario):
    sweep_dir, _, resumed = scenario
    table = (sweep_dir / "table.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| max_steps | seeds | transitions | eval return | eval speed [m/s] |")
    assert [row.split(" | ")[:3] for row in rows[1:]] == [["| 100", "0", "0.1k"], ["| 800", "0", "0.8k"]]
    assert rows[1] in resumed["out"] and "Trial status:" in resumed["out"]  # Tune's status table
    assert sorted(p.name for p in (sweep_dir / "results").iterdir()) == [f"{SHORT}_100.json", f"{LONG}_800.json"]
    assert (sweep_dir / "learning_curves.png").stat().st_size > 10_000
    config = json.loads((sweep_dir / LONG / "config.json").read_text())  # an ordinary run, resumable by train.py
    assert (config["max_steps"], config["seed"], config["run_name"]) == (800, 0, LONG)


@pytest.mark.slow
def test_no_ray_or_trial_process_is_left(scenario):
    _, first, resumed = scenario
    assert first["left"] == [] and resumed["left"] == []


def _processes_naming(text: str) -> list[str]:
    """Live processes whose command line names `text` (the sweep's watchdog names its directory)."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            if proc.info["status"] != psutil.STATUS_ZOMBIE and text in " ".join(proc.info["cmdline"] or ()):
                found.append(f"{proc.pid} {' '.join(proc.info['cmdline'])[:120]}")
    return found


@pytest.mark.slow
def test_a_resume_beside_a_trial_is_refused_and_a_killed_sweep_leaves_no_process(tmp_path):
    sweep_dir = tmp_path / "runs" / "killed"
    run_dir = sweep_dir / "seed=0"
    # random actions only (no learner to compile): what is checked here is the processes, not the learning
    argv = ["highway_fast", "--seeds", "0", "--sweep-name", "killed", "--cpus-per-trial", "1", *TRAIN_FLAGS,
            "--max-steps", "100000", "--start-training", "100000"]  # fmt: skip
    proc, log = _start(tmp_path, "killed", *argv)
    with _stopped_on_failure(proc):
        _wait_for(proc, log, lambda: trial.latest_step(run_dir) and _train_py(run_dir), "a checkpoint")
        # one writer per run: a manual resume beside the live trial is refused, naming its train.py
        manual = subprocess.run([sys.executable, str(ROOT / "train.py"), "--resume", str(run_dir)],
                                capture_output=True, text=True, timeout=120)  # fmt: skip
        holder = _train_py(run_dir).pid
        assert manual.returncode == 2 and f"{run_dir} is in use: process {holder} trains in it" in manual.stderr
        assert manual.stderr.count("\n") == 1, manual.stderr
        os.kill(proc.pid, signal.SIGKILL)  # the sweep alone (the OOM killer's way), not its process group
        proc.wait()
    # its watchdog ends Ray's processes and the trial, which checkpoints on SIGTERM
    assert _wait_gone(proc.pid, sweep_dir, timeout=20) == []
    deadline = time.time() + 10
    while _processes_naming(str(sweep_dir)) and time.time() < deadline:
        time.sleep(0.5)
    assert _processes_naming(str(sweep_dir)) == []
    assert trial.latest_step(run_dir) >= max(m["env_steps"] for m in _metrics(run_dir))  # a final checkpoint
