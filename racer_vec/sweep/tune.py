"""Ray Tune: the trainable (one trial: a TrialProcess, its metrics.jsonl lines as Tune results) and
its progress lines, the Tuner (new, or restored from <sweep>/.tune), and the sweep's run from Ray's
start to its shutdown. Imported only where a sweep runs: --report and bad input need no Ray."""

from __future__ import annotations

import functools
import logging
import os
import re
import signal
import socket
import sys
from pathlib import Path

try:
    import ray
    from ray import tune
except ImportError as exc:
    raise ImportError(f"the sweep needs Ray Tune: pip install -e '.[sweep]' ({exc})") from exc

from racer_vec.config import ConfigError, TrainConfig
from racer_vec.run.checkpoint_files import first_line
from racer_vec.sweep import watchdog
from racer_vec.sweep.cli import SweepArgs, say, sigterm_as_ctrl_c
from racer_vec.sweep.grid import trial_cpus, trial_name
from racer_vec.sweep.report import write_report
from racer_vec.sweep.sweep_dir import TUNE_DIR, available_cpus
from racer_vec.sweep.trial import (
    STOP_WAIT_S, TRIAL_ENV, TrialProcess, is_finished, latest_step, wait_for_trial_processes,
)  # fmt: skip

OBJECT_STORE_BYTES = 256 * 1024**2
"""A local instance's object store: trials pass nothing through it (Ray's default takes 30% of RAM)."""
WORKER_NICENESS = 0
"""What a local instance's Ray adds to its workers' nice value (Ray's default, 15, would run the
trials 15 levels behind the sweep: behind any other work of the machine, design §12)."""


SHOWN_METRICS = ("env_steps", "episode_return_mean", "speed_ema", "collision_ema")
"""First in each result: Ray Tune's status table shows the first four metrics of a result."""
TUNE_METRICS = (
    *SHOWN_METRICS, "sps", "updates", "critic_loss", "episodes_total", "train_collisions_total",
    "offroad_terminations_total", "eval/mean_return", "eval/mean_ego_speed", "eval/collision_rate", "eval/success_rate",
)  # fmt: skip
"""What a trial reports to Tune of each metrics.jsonl line (the line itself stays in the run directory);
Tune prints a trial's last result as a table."""


def tune_result(row: dict, done: bool) -> dict:
    first = {k: float("nan") if row.get(k) is None else row[k] for k in SHOWN_METRICS}
    rest = {k: row[k] for k in TUNE_METRICS if k not in first and row.get(k) is not None}
    return {**first, **rest, "done": done}


def check_address(address: str) -> None:
    """Fail in a second, not after ray.init's minute of retries, when no cluster answers at `address`."""
    from ray._private import services

    if address == "auto":
        try:
            target = services.canonicalize_bootstrap_address_or_die("auto")
        except ConnectionError:
            raise ConfigError(
                "--address auto: no Ray cluster runs on this machine (start one with `ray start --head`)"
            ) from None
    else:
        target = address.removeprefix("ray://")
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--address {address}: expected auto, HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except OSError as exc:
        raise ConfigError(f"--address {address}: nothing answers at {host}:{port} ({exc.strerror or exc})") from None


def start_ray(args: SweepArgs) -> None:
    os.environ["RAY_USAGE_STATS_ENABLED"] = "1" if args.ray_usage_stats else "0"
    # Tune prints every failed attempt's whole traceback; the sweep's line and the trial's train.log say it
    os.environ.setdefault("TUNE_PRINT_ALL_TRIAL_ERRORS", "0")
    if args.address is not None:
        ray.init(address=args.address, logging_level=logging.WARNING)
        return
    if os.environ.pop("RAY_ADDRESS", None):
        say("RAY_ADDRESS is ignored: the sweep starts its own Ray instance unless --address is given")
    ray.init(
        address="local",  # not a cluster `ray start` may run here: that one is --address auto
        num_cpus=available_cpus(),
        include_dashboard=args.ray_dashboard,
        _node_ip_address="127.0.0.1",
        object_store_memory=OBJECT_STORE_BYTES,
        logging_level=logging.WARNING,
        _system_config={"worker_niceness": WORKER_NICENESS},
    )


def check_gpus(spec: dict) -> None:
    have = ray.cluster_resources().get("GPU", 0)
    if spec["gpus_per_trial"] > have:
        raise ConfigError(f"--gpus-per-trial {spec['gpus_per_trial']:g}: Ray sees {have:g} GPUs")


def _trial_resources(cpus: dict[str, float], gpus: float, config: dict):
    return tune.PlacementGroupFactory([{"CPU": cpus[trial_name(config)], **({"GPU": gpus} if gpus else {})}])


def _trial_label(trial) -> str:
    return trial_name(trial.config)


def make_tuner(spec: dict, trials: dict[str, TrainConfig]):
    """The sweep's Tuner: restored from <sweep>/.tune when there is Tune state to continue, else new."""
    cpus = {name: trial_cpus(spec, cfg) for name, cfg in trials.items()}
    trainable = tune.with_resources(
        tune.with_parameters(SweepTrial, spec=spec),
        functools.partial(_trial_resources, cpus, spec["gpus_per_trial"]),
    )
    tune_dir = Path(spec["sweep_dir"]) / TUNE_DIR
    if tune.Tuner.can_restore(tune_dir):
        # errored trials restart too: a trial's restart resumes from its run's checkpoint
        return tune.Tuner.restore(str(tune_dir), trainable, resume_unfinished=True, restart_errored=True)
    param_space = {path: tune.grid_search(values) for path, values in spec["grid"]}
    param_space["seed"] = tune.grid_search(spec["seeds"])
    return tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(trial_name_creator=_trial_label, trial_dirname_creator=_trial_label),
        run_config=tune.RunConfig(
            name=TUNE_DIR,
            storage_path=spec["sweep_dir"],
            failure_config=tune.FailureConfig(max_failures=spec["max_failures"]),
            # train.py writes the checkpoints a retry resumes from; Tune keeps none of its own
            checkpoint_config=tune.CheckpointConfig(checkpoint_at_end=False, checkpoint_frequency=0),
            callbacks=[SweepProgress()],
            verbose=1,
        ),
    )


def _error_line(trial) -> str:
    """The reason a trial's attempt failed, from Tune's error file: our TrialFailed line, or Ray's."""
    try:
        lines = [line.strip() for line in Path(trial.error_file).read_text().splitlines() if line.strip()]
    except (OSError, TypeError):
        return "no error file"
    ours = [line.split("TrialFailed: ", 1)[1] for line in lines if "TrialFailed: " in line]
    theirs = [line for line in lines if re.match(r"^[\w.]+(Error|Exception)\b", line)]
    if ours:
        return ours[-1][:400]
    # Ray's messages run on for lines (an actor's death, say): their first sentence says it
    return (theirs or lines or ["?"])[-1].split(". ")[0][:300]


class SweepTrial(tune.Trainable):
    """One trial: a TrialProcess, its metrics.jsonl lines as Tune results."""

    def setup(self, config, spec):
        node = f"Ray node {ray.get_runtime_context().get_node_id()} ({socket.gethostname()})"
        self.process = TrialProcess(spec, config, node)
        self.process.start()

    def step(self):
        return tune_result(*self.process.next_result())

    def save_checkpoint(self, checkpoint_dir):
        # a retry resumes from train.py's own latest checkpoint, whatever Tune keeps
        return {"env_steps": latest_step(self.process.run_dir)}

    def load_checkpoint(self, checkpoint):
        pass  # setup() already resumes the run from its run directory

    def cleanup(self):
        if hasattr(self, "process"):
            self.process.stop(STOP_WAIT_S)


class SweepProgress(tune.Callback):
    """A line per trial state change (Tune prints its status table besides)."""

    def on_trial_start(self, iteration, trials, trial, **info):
        step = latest_step(Path(trial.path).parents[1] / _trial_label(trial))
        start = f"resuming its run from {step} env steps" if step else "starting its run"
        say(f"{_trial_label(trial)}: RUNNING (attempt {trial.num_failures + 1}), {start}")

    def on_trial_recover(self, iteration, trials, trial, **info):
        say(f"{_trial_label(trial)}: FAILED attempt {trial.num_failures} ({_error_line(trial)}); "
            f"Ray Tune retries it from its latest checkpoint")  # fmt: skip

    def on_trial_error(self, iteration, trials, trial, **info):
        say(f"{_trial_label(trial)}: ERROR, failed {trial.num_failures} times ({_error_line(trial)})")

    def on_trial_complete(self, iteration, trials, trial, **info):
        say(f"{_trial_label(trial)}: TERMINATED at {trial.last_result.get('env_steps')} env steps")


def run_sweep(args: SweepArgs, spec: dict, trials: dict[str, TrainConfig]) -> int:
    sweep_dir = Path(spec["sweep_dir"])
    where = "a local Ray instance" if args.address is None else f"the Ray cluster at --address {args.address}"
    cpus = sorted({trial_cpus(spec, cfg) for cfg in trials.values()})
    say(f"{len(trials)} trials in {sweep_dir} on {where}; per trial {'/'.join(f'{c:g}' for c in cpus)} CPUs"
        f", {spec['gpus_per_trial']:g} GPUs; up to {spec['max_failures']} retries each")  # fmt: skip
    results, code = None, None
    # before Ray starts: whatever the sweep starts ends within seconds of its death, SIGKILL included
    watchdog.start(sweep_dir, TRIAL_ENV)
    try:
        try:
            start_ray(args)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise ConfigError(f"Ray did not start or connect ({first_line(exc)})") from None
        signal.signal(signal.SIGTERM, sigterm_as_ctrl_c)  # ray.init installed its own, which exits at once
        check_gpus(spec)
        results = make_tuner(spec, trials).fit()
    except KeyboardInterrupt:
        say("interrupted again: stopping Ray without waiting for Ray Tune")
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = 2
    finally:
        if ray.is_initialized():
            ray.shutdown()
        wait_for_trial_processes(sweep_dir)
    return code if code is not None else finish(args, spec, trials, results)


def trial_states(spec: dict, trials: dict[str, TrainConfig], results) -> dict[str, str]:
    """finished / error / unfinished per trial: from the run directories, else from Tune's results."""
    tune_says = {}
    for result in results or ():
        name = trial_name(result.config)
        done = (result.metrics or {}).get("done")
        tune_says[name] = "error" if result.error else "finished" if done else "unfinished"
    sweep_dir = Path(spec["sweep_dir"])
    return {name: "finished" if is_finished(sweep_dir / name) else tune_says.get(name, "unfinished") for name in trials}


def finish(args: SweepArgs, spec: dict, trials: dict[str, TrainConfig], results) -> int:
    states = trial_states(spec, trials, results)
    unfinished = [name for name, state in states.items() if state == "unfinished"]
    errored = [name for name, state in states.items() if state == "error"]
    say(f"{len(trials) - len(unfinished) - len(errored)} of {len(trials)} trials finished")
    if unfinished:
        say(f"stopped with {len(unfinished)} trial(s) unfinished, each checkpointed in its run directory; "
            f"continue with: python -m racer_vec.sweep --resume {spec['sweep_dir']}")  # fmt: skip
        return 130
    try:
        code = write_report(spec, args.report_episodes, args.report_workers) if args.final_report else 0
    except ConfigError as exc:
        print(f"error: report: {exc}", file=sys.stderr)
        code = 2
    if errored:
        say(f"failed for good: {', '.join(errored)} (their train.log says why); --resume retries them")
        return 1
    return code
