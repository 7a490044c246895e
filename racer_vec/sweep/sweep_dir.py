"""The sweep's directory: a new sweep planned from its command line (nothing written until Ray is
ready), an existing one opened for --resume or --report from its sweep.json, and the sweep's settings
checked against this machine."""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path

import configs
from racer_vec.config import ConfigError, TrainConfig
from racer_vec.sweep.cli import CommandLine, SweepArgs
from racer_vec.sweep.grid import (
    SET_BY_SWEEP, config_fields, flag_spellings, parse_grid, train_flag, trial_cpus, trial_name, trial_points,
)  # fmt: skip
from racer_vec.write_failures import check_output_dir, write_atomically, writing

SWEEP_FILE = "sweep.json"
TUNE_DIR = ".tune"
TRAIN_LOG = "train.log"


def plan_sweep(args: SweepArgs, line: CommandLine, argv: list[str]) -> tuple[Path, dict]:
    """A new sweep's directory and spec (nothing is written yet)."""
    preset = line.preset or configs.DEFAULT
    name = args.sweep_name or f"{preset}_{datetime.now():%Y%m%d-%H%M%S}"
    if not name or "/" in name or name.startswith("."):
        raise ConfigError(f"--sweep-name {name!r}: must be a plain directory name")
    sweep_dir = (args.runs_dir / name).absolute()
    check_output_dir("--runs-dir", args.runs_dir)  # before Ray starts (design §8)
    if sweep_dir.exists():
        raise ConfigError(
            f"{sweep_dir} exists: continue that sweep with --resume {sweep_dir}, or choose another --sweep-name"
        )
    grid = parse_grid(args.grid)
    if not args.seeds or len(set(args.seeds)) < len(args.seeds):
        raise ConfigError(f"--seeds {' '.join(map(str, args.seeds))}: give distinct seeds")
    _check_train_args(line.train_args, [path for path, _ in grid])
    points = trial_points(grid, args.seeds)
    spec = {
        "name": name,
        "sweep_dir": str(sweep_dir),
        "preset": preset,
        "grid": [[path, values] for path, values in grid],
        "seeds": list(args.seeds),
        "train_args": line.train_args,
        "trials": [{"name": trial_name(point), "config": point} for point in points],
        "cpus_per_trial": args.cpus_per_trial,
        "gpus_per_trial": args.gpus_per_trial,
        "max_failures": args.max_failures,
        "cwd": os.getcwd(),
        "command": ["python", "-m", "racer_vec.sweep", *argv],
        "created": datetime.now().isoformat(timespec="seconds"),
    }
    if len({t["name"] for t in spec["trials"]}) < len(points):
        raise ConfigError("two grid points give the same trial name; make their values differ in letters or digits")
    return sweep_dir, spec


def _check_train_args(train_args: list[str], grid_paths: list[str]) -> None:
    given = {token.partition("=")[0] for token in train_args if token.startswith("--")}
    for path, why in SET_BY_SWEEP.items():
        if path in config_fields() and given & flag_spellings(path):
            raise ConfigError(f"{train_flag(path)} is set by the sweep ({why})")
    for path in grid_paths:
        if given & flag_spellings(path):
            raise ConfigError(f"{train_flag(path)} is given both as a train.py flag and as --grid {path}")


RESUMABLE = {
    "resume", "report", "address", "report_episodes", "report_workers", "final_report", "ray_dashboard",
    "ray_usage_stats",
}  # fmt: skip
"""The flags --resume and --report may come with: everything else is the saved sweep's."""


def create_sweep(sweep_dir: Path, spec: dict) -> None:
    """Write a new sweep's directory and its sweep.json (once Ray is ready to run it)."""
    with writing(sweep_dir):
        sweep_dir.mkdir(parents=True)
    write_atomically(sweep_dir / SWEEP_FILE, json.dumps(spec, indent=2) + "\n")


def open_sweep(path: Path, line: CommandLine, flag: str) -> tuple[Path, dict]:
    """An existing sweep's directory and spec, for --resume or --report."""
    if {"resume", "report"} <= line.given:
        raise ConfigError("give --resume or --report, not both")
    fixed = sorted(train_flag(name) for name in line.given - RESUMABLE)
    if line.preset or line.train_args or fixed:
        extra = [*([line.preset] if line.preset else []), *fixed, *line.train_args]
        raise ConfigError(f"{flag} {path} takes the sweep as its sweep.json saved it: drop {' '.join(extra)}")
    sweep_dir = path.absolute()
    try:
        spec = json.loads((sweep_dir / SWEEP_FILE).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{flag} {path}: not a sweep directory (no {SWEEP_FILE} there)") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{flag} {path}: unreadable {SWEEP_FILE} ({exc})") from None
    # the directory may have moved since: its trials live where it is now
    return sweep_dir, {**spec, "sweep_dir": str(sweep_dir)}


def available_cpus() -> int:
    """The CPUs this process may run on (a local Ray instance gets exactly these)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def check_settings(args: SweepArgs, spec: dict, trials: dict[str, TrainConfig]) -> None:
    """The sweep's numbers, and whether this machine can hold a trial when the sweep runs locally."""
    cpus, gpus = spec["cpus_per_trial"], spec["gpus_per_trial"]
    checks = [
        ("--cpus-per-trial", cpus is None or cpus > 0, "must be positive"),
        ("--gpus-per-trial", gpus >= 0 and (gpus <= 1 or float(gpus).is_integer()),
         "must be a fraction of one GPU or a whole number of GPUs"),
        ("--max-failures", spec["max_failures"] >= -1, "must be -1 (no limit) or more"),
        ("--report-episodes", args.report_episodes > 0, "must be positive"),
        ("--report-workers", args.report_workers > 0, "must be positive"),
    ]  # fmt: skip
    for flag, ok, why in checks:
        if not ok:
            raise ConfigError(f"{flag} {why}")
    if args.address is None:
        available = available_cpus()
        name, cfg = max(trials.items(), key=lambda item: trial_cpus(spec, item[1]))
        if trial_cpus(spec, cfg) > available:
            raise ConfigError(
                f"trial {name} asks Ray for {trial_cpus(spec, cfg):g} CPUs (num_envs {cfg.num_envs} + 1) but this "
                f"machine has {available}: pass --cpus-per-trial {available} (its workers then share cores) or "
                f"run on a cluster (--address)"
            )
