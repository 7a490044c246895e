"""Sweeps: one train.py run per grid point and seed, each a Ray Tune trial (design §12).

    python -m racer_vec.sweep highway_fast --grid agent.cvar_risk=0,0.5,0.8 --seeds 0 1 --max-steps 120000
    python -m racer_vec.sweep --resume runs/<sweep-name>     # unfinished trials continue, finished ones are skipped
    python -m racer_vec.sweep --report runs/<sweep-name>     # evaluate, results files, table, plot (no Ray)

Trials. A trial is an ordinary run. The Ray Tune trainable `SweepTrial` starts `python train.py PRESET
[flags] --seed S --runs-dir <sweep> --run-name <trial>`, or `train.py --resume <its run dir>` when the
run directory already holds a checkpoint, and reports each line train.py appends to metrics.jsonl
(its main metrics; the run directory keeps the whole line) to Tune. When the process dies the trainable raises, Tune's FailureConfig(max_failures) retries the
trial, and the retry finds the run's own checkpoint: a retried trial continues from its latest
checkpoint, never from step 0. Ray Tune does all the scheduling: the grid is Tune's grid_search, a
trial's resources are its placement group (num_envs + 1 CPUs unless --cpus-per-trial), retries and
the experiment state that --resume restores (`<sweep>/.tune`) are Tune's.

Processes. The trial's Ray worker starts a small supervisor in a session of its own (a terminal's
Ctrl-C reaches the sweep, which decides), and the supervisor runs train.py with PR_SET_PDEATHSIG =
SIGTERM: however the worker ends (a Ray worker SIGKILLs its children when it exits, even when Tune
stops it normally), the supervisor goes with it and train.py writes a checkpoint and exits, as on
Ctrl-C. Each trial holds an flock on `<sweep>/.locks/<trial>.lock` that train.py inherits: a retry
waits for the previous attempt's process to finish its checkpoint, and the sweep, after stopping
Ray, waits until no trial process of this machine is left.

Signals. Ctrl-C and SIGTERM stop the sweep through Tune's own interrupt handling: Tune saves its
experiment state and stops the trials (each train.py gets SIGTERM, checkpoints and exits), then a
locally started Ray is shut down. A second Ctrl-C stops waiting and kills what is left.

runs/<sweep-name>/ holds sweep.json (the command, the trials and their train.py flags), one run
directory per trial (`cvar_risk=0.5_seed=0/`: config.json, metrics.jsonl, checkpoints/, eval/, and
train.log, the process's output), .tune/ (Ray Tune's state), .locks/, and the report: results/,
table.md (one row per grid point, mean ± std over seeds) and learning_curves.png (one colour per
grid point: the mean over its seeds, a star per seed's final evaluation).

Nothing needs the network: a local Ray instance listens on 127.0.0.1 and starts neither its
dashboard nor usage statistics unless asked. Ray is imported only where a sweep runs (the trainable
classes are built on first use, see `__getattr__`), so bad input fails before any Ray start and
the report runs without Ray. No JAX here: the report's evaluation imports it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import fcntl
import functools
import io
import itertools
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
import typing
from datetime import datetime
from pathlib import Path

import tyro

import configs
from racer_vec.run.train_cli import parse_train_args
from racer_vec.config import ConfigError, TrainConfig, to_dict
from racer_vec.tools.results import collect, group_by_seed, results_table, seeds_text, steps_text

TRAIN_PY = Path(__file__).resolve().parents[2] / "train.py"
SWEEP_FILE = "sweep.json"
TUNE_DIR = ".tune"
LOCK_DIR = ".locks"
TRAIN_LOG = "train.log"
PROG = "python -m racer_vec.sweep"
TRIAL_ENV = "RACER_VEC_SWEEP_TRIAL"
"""Set to the run directory in the environment of a trial's processes."""
SET_BY_SWEEP = {
    "seed": "use --seeds",
    "run_name": "trials are named after their grid point",
    "runs_dir": "use the sweep's --runs-dir",
    "resume": "use the sweep's --resume",
    "preset": "give the preset first",
}
ALIASES = {"num_workers": "num_envs"}
LOCK_WAIT_S = 300.0
"""How long a retry, or the sweep at its end, waits for a trial process to write its final checkpoint."""
STOP_WAIT_S = 60.0
"""How long a stopped trial waits for train.py's final checkpoint. Longer than Tune waits for a stopping
trial (about 10 s, then it kills the worker): a Ray worker that exits normally kills its children."""
POLL_S = 0.5
GPU_MEMORY = 0.75
"""JAX preallocates 75% of a GPU's memory; trials sharing a GPU split that between them."""
OBJECT_STORE_BYTES = 256 * 1024**2
"""A local instance's object store: trials pass nothing through it (Ray's default takes 30% of RAM)."""


# ---------------------------------------------------------------------------------------------
# The command line


@dataclasses.dataclass(frozen=True)
class SweepArgs:
    """Train one run per grid point and seed as Ray Tune trials, then evaluate and tabulate them.

    python -m racer_vec.sweep [PRESET] --grid KEY=V1,V2,... [--grid ...] --seeds S1 S2 ... [train.py flags]

    Every flag that is not one of these goes to each trial's train.py (python train.py --help lists them)."""

    grid: tuple[str, ...] = ()
    """KEY=V1,V2,...: a config field, as its path or its train.py flag (agent.cvar_risk, --agent.cvar-risk,
    num_envs, env.fast_sim=true,false), and its values; several keys (one --grid each, or several after
    one) make a product. Without --grid the sweep is the seeds of one setting."""
    seeds: tuple[int, ...] = (0,)
    """Seeds: every grid point trains once per seed."""
    sweep_name: str | None = None
    """The sweep's directory under --runs-dir; default: <preset>_<date>-<time>."""
    runs_dir: Path = Path("runs")
    """Where the sweep's directory goes; its trials' run directories go inside it."""
    resume: Path | None = None
    """Continue the sweep in this directory: unfinished trials resume from their latest checkpoints,
    finished ones are skipped; its grid, seeds and train.py flags are the saved ones."""
    report: Path | None = None
    """Only write the report of the sweep in this directory, without Ray: evaluate each finished trial's
    final checkpoint, write results files, the table and the learning-curve plot."""
    address: str | None = None
    """Ray cluster to run on: `auto` (the cluster `ray start` runs on this machine), HOST:PORT or
    ray://HOST:PORT. Default: a local Ray instance of this sweep's own, stopped at the end."""
    cpus_per_trial: float | None = None
    """CPUs Ray reserves for each trial; default: its num_envs + 1 (the env workers and the learner)."""
    gpus_per_trial: float = 0.0
    """GPUs Ray reserves for each trial. A fraction shares a GPU: each trial's JAX is then told to
    preallocate that fraction of the 75% of GPU memory it takes by default. 0: trials run JAX on the CPU."""
    max_failures: int = 3
    """Retries of a trial whose process dies, each from the trial's latest checkpoint (-1: no limit)."""
    report_episodes: int = 50
    """Evaluation episodes of each trial's final checkpoint in the report (train.py's --eval-episodes is
    its periodic evaluation)."""
    report_workers: int = 4
    """Env worker processes of each report evaluation (the numbers do not depend on it)."""
    final_report: bool = True
    """Write the report when every trial has finished."""
    ray_dashboard: bool = False
    """Start Ray's dashboard with the local instance (it serves on 127.0.0.1:8265)."""
    ray_usage_stats: bool = False
    """Let Ray collect and send its usage statistics (off: nothing leaves the machine)."""


@dataclasses.dataclass(frozen=True)
class CommandLine:
    """argv split into the preset, the sweep's own flags and train.py's flags."""

    preset: str | None
    sweep_tokens: list[str]
    """The sweep's flags in canonical spelling, a repeated --grid merged into one."""
    train_args: list[str]
    given: frozenset[str]
    """SweepArgs fields given on the command line."""


def _flag_table() -> dict[str, tuple[str, str]]:
    """Every spelling of a sweep flag -> (SweepArgs field, kind: bool, one value or many)."""
    table = {}
    for name, hint in typing.get_type_hints(SweepArgs).items():
        kind = "bool" if hint is bool else "many" if typing.get_origin(hint) is tuple else "one"
        for spelling in {name, name.replace("_", "-")}:
            table["--" + spelling] = (name, kind)
            if kind == "bool":
                table["--no-" + spelling] = table["--no_" + spelling] = (name, kind)
    return table


def split_command_line(argv: list[str]) -> CommandLine:
    """Take the sweep's flags out of argv (by their arity); everything else is train.py's."""
    preset = None
    if argv and not argv[0].startswith("-"):
        if argv[0] not in configs.PRESETS:
            raise ConfigError(f"unknown preset {argv[0]!r} (presets: {', '.join(configs.PRESETS)})")
        preset, argv = argv[0], argv[1:]
    table = _flag_table()
    single, many, train, given = [], {}, [], set()
    i = 0
    while i < len(argv):
        flag, eq, inline = argv[i].partition("=")
        i += 1
        if argv[i - 1] in ("-h", "--help"):
            single.append("--help")
            continue
        if flag not in table:
            train.append(argv[i - 1])
            continue
        name, kind = table[flag]
        given.add(name)
        canonical = "--" + name.replace("_", "-")
        if kind == "bool":
            single.append(canonical.replace("--", "--no-", 1) if flag.startswith("--no") else canonical)
            continue
        if eq:
            values = [inline]
        else:
            # a list runs to the next flag; its first value may look like one (--grid --agent.cvar-risk=0,0.5)
            rest = argv[i + 1 :]
            count = 1 if kind == "one" else 1 + next((n for n, t in enumerate(rest) if t.startswith("--")), len(rest))
            values, i = argv[i : i + count], i + count
        if not values or not all(values):
            raise ConfigError(f"{canonical} needs {'a value' if kind == 'one' else 'at least one value'}")
        if kind == "one":
            single += [canonical, values[0]]
        else:  # a grid key spelled as a flag would look like an option to tyro: its path means the same
            many.setdefault(canonical, []).extend(v.removeprefix("--") if name == "grid" else v for v in values)
    tokens = single + [t for flag, values in many.items() for t in (flag, *values)]
    return CommandLine(preset, tokens, train, frozenset(given))


def _tyro_message(text: str) -> str:
    """The first message of a tyro error box, on one line (with tyro's suggestion, if any). rich draws
    the box with line-drawing characters on a terminal and with dashes elsewhere: both are stripped."""
    lines = []
    for raw in text.splitlines():
        line = raw.strip(" \t│╭╮╰╯")
        lines.append("" if set(line) <= set("─- ") else line.strip("─ "))
    start = next((k for k, line in enumerate(lines) if line), len(lines)) + 1  # after the box's title
    while start < len(lines) and not lines[start]:
        start += 1
    end = next((k for k in range(start, len(lines)) if not lines[k]), len(lines))
    marker = "Perhaps you meant:"
    after = [line for line in lines[lines.index(marker) + 1 :] if line] if marker in lines else []
    message = " ".join(lines[start:end]) or "invalid arguments"
    return f"{message} (perhaps {after[0].split()[0]}?)" if after else message


def quietly(parse: typing.Callable):
    """Run a tyro parse; its multi-line error box becomes one ConfigError line."""
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured), contextlib.redirect_stdout(captured):
            return parse()
    except SystemExit as exc:
        if exc.code in (0, None):
            raise
        raise ConfigError(_tyro_message(captured.getvalue())) from None


def parse_command_line(argv: list[str]) -> tuple[SweepArgs, CommandLine]:
    line = split_command_line(argv)
    if "--help" in line.sweep_tokens:
        tyro.cli(SweepArgs, args=["--help"], prog=PROG)  # prints and exits 0
    return quietly(lambda: tyro.cli(SweepArgs, args=line.sweep_tokens, prog=PROG)), line


# ---------------------------------------------------------------------------------------------
# The grid and its trials


@functools.cache
def config_fields() -> dict[str, type]:
    """Every leaf field of TrainConfig by path (`agent.cvar_risk`, `num_envs`) -> its type."""
    fields = {}

    def walk(cls, prefix: str) -> None:
        for name, hint in typing.get_type_hints(cls).items():
            if dataclasses.is_dataclass(hint):
                walk(hint, f"{prefix}{name}.")
            else:
                fields[prefix + name] = hint

    walk(TrainConfig, "")
    return fields


def grid_key(raw: str) -> str:
    """The config path a --grid key names (given as a path or as train.py's flag)."""
    path = raw.strip().removeprefix("--").replace("-", "_")
    path = ALIASES.get(path, path)
    if path in SET_BY_SWEEP:
        raise ConfigError(f"--grid {raw}: {path} is set by the sweep ({SET_BY_SWEEP[path]})")
    if path not in config_fields():
        close = difflib.get_close_matches(path, config_fields(), n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise ConfigError(f"--grid {raw}: unknown config field ({hint}fields are paths like agent.cvar_risk, num_envs)")
    return path


def parse_grid(entries: typing.Sequence[str]) -> list[tuple[str, list[str]]]:
    """[(path, values)] of `KEY=V1,V2,...` entries; values stay strings, as on train.py's command line."""
    grid = []
    for entry in entries:
        raw, eq, listed = entry.partition("=")
        if not eq:
            raise ConfigError(f"--grid {entry}: expected KEY=V1,V2,...")
        path = grid_key(raw)
        values = [v.strip() for v in listed.split(",")]
        if values == [""]:
            raise ConfigError(f"--grid {entry}: an empty grid (no values)")
        if "" in values:
            raise ConfigError(f"--grid {entry}: an empty value")
        if len(set(values)) < len(values):
            raise ConfigError(f"--grid {entry}: a value is repeated")
        if path in (p for p, _ in grid):
            raise ConfigError(f"--grid {raw}: the key is given twice")
        grid.append((path, values))
    return grid


def _flag(path: str, negated: bool = False) -> str:
    prefix, dot, leaf = path.rpartition(".")
    return "--" + prefix + dot + ("no-" if negated else "") + leaf.replace("_", "-")


def grid_flags(path: str, value: str) -> list[str]:
    """train.py's flags that set `path` to `value`."""
    hint = config_fields()[path]
    if hint is bool:
        if value.lower() in ("true", "1", "yes", "on"):
            return [_flag(path)]
        if value.lower() in ("false", "0", "no", "off"):
            return [_flag(path, negated=True)]
        raise ConfigError(f"--grid {path}={value}: not a boolean (true or false)")
    if typing.get_origin(hint) is tuple:
        return [_flag(path), *value.split()]
    return [_flag(path), value]


def flag_spellings(path: str) -> set[str]:
    """How train.py's command line can name the field `path` (with either separator, negated, aliased)."""
    names = {path} | {alias for alias, target in ALIASES.items() if target == path}
    flags = set()
    for name in names:
        for negated in (False, True):
            flag = _flag(name, negated)
            flags |= {flag, flag.replace("-", "_").replace("__", "--", 1)}
    return flags


def trial_name(config: dict) -> str:
    """`cvar_risk=0.5_seed=0`: the grid keys in path order by their field name (by path when two share
    one), then the seed."""
    keys = sorted(k for k in config if k != "seed")
    leaves = [k.rpartition(".")[2] for k in keys]
    parts = [f"{leaf if leaves.count(leaf) == 1 else key}={_safe(config[key])}" for key, leaf in zip(keys, leaves)]
    return "_".join([*parts, f"seed={config['seed']}"])


def _safe(value) -> str:
    return re.sub(r"[^\w.+=-]+", "-", str(value))


def trial_points(grid: list[tuple[str, list[str]]], seeds: typing.Sequence[int]) -> list[dict]:
    """Every trial's config as Tune's grid_search makes it: one value per key, and the seed."""
    keys = [path for path, _ in grid]
    return [
        {**dict(zip(keys, values)), "seed": seed}
        for values in itertools.product(*(values for _, values in grid))
        for seed in seeds
    ]


def trial_argv(spec: dict, config: dict) -> list[str]:
    """train.py's command line for a trial that starts from step 0."""
    grid = [t for key in sorted(k for k in config if k != "seed") for t in grid_flags(key, config[key])]
    return [
        spec["preset"], *spec["train_args"], *grid, "--seed", str(config["seed"]),
        "--runs-dir", spec["sweep_dir"], "--run-name", trial_name(config),
    ]  # fmt: skip


def validate_trials(spec: dict) -> dict[str, TrainConfig]:
    """Every trial's resolved config, through train.py's own parser: bad input fails here, before Ray."""
    resolved, seen = {}, {}
    for trial in spec["trials"]:
        name = trial["name"]
        try:
            cfg = quietly(functools.partial(parse_train_args, trial_argv(spec, trial["config"])))
        except ConfigError as exc:
            raise ConfigError(f"trial {name}: {exc}") from None
        key = json.dumps({**to_dict(cfg), "run_name": None}, sort_keys=True, default=str)
        if key in seen:
            raise ConfigError(f"trials {seen[key]} and {name} train the same config (two grid values mean the same)")
        seen[key] = name
        resolved[name] = cfg
    return resolved


def trial_cpus(spec: dict, cfg: TrainConfig) -> float:
    return spec["cpus_per_trial"] or cfg.num_envs + 1


# ---------------------------------------------------------------------------------------------
# The sweep directory


def plan_sweep(args: SweepArgs, line: CommandLine, argv: list[str]) -> tuple[Path, dict]:
    """A new sweep's directory and spec (nothing is written yet)."""
    preset = line.preset or configs.DEFAULT
    name = args.sweep_name or f"{preset}_{datetime.now():%Y%m%d-%H%M%S}"
    if not name or "/" in name or name.startswith("."):
        raise ConfigError(f"--sweep-name {name!r}: must be a plain directory name")
    sweep_dir = (args.runs_dir / name).absolute()
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
            raise ConfigError(f"{_flag(path)} is set by the sweep ({why})")
    for path in grid_paths:
        if given & flag_spellings(path):
            raise ConfigError(f"{_flag(path)} is given both as a train.py flag and as --grid {path}")


RESUMABLE = {
    "resume", "report", "address", "report_episodes", "report_workers", "final_report", "ray_dashboard",
    "ray_usage_stats",
}  # fmt: skip
"""The flags --resume and --report may come with: everything else is the saved sweep's."""


def open_sweep(path: Path, line: CommandLine, flag: str) -> tuple[Path, dict]:
    """An existing sweep's directory and spec, for --resume or --report."""
    if {"resume", "report"} <= line.given:
        raise ConfigError("give --resume or --report, not both")
    fixed = sorted(_flag(name) for name in line.given - RESUMABLE)
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


# ---------------------------------------------------------------------------------------------
# One trial's process (runs inside a Ray worker; no Ray in here)


class TrialFailed(Exception):
    """A trial's train.py died or could not start; Ray Tune retries the trial."""


# The Ray worker's child: a supervisor that runs train.py and passes on its exit status and the
# SIGTERM/SIGINT it is sent. A Ray worker kills its children with SIGKILL when it exits, even a
# worker Tune stops normally, so train.py must not be one: it gets SIGTERM when the supervisor dies
# (PR_SET_PDEATHSIG, checked against a parent that died before it was set) and writes its final
# checkpoint whoever killed the worker. Ray workers block SIGINT; their children would inherit that.
_SUPERVISOR = """\
import ctypes, os, signal, subprocess, sys
worker, lock_fd, me = int(sys.argv[1]), int(sys.argv[2]), os.getpid()
signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else lambda *a: 0
prctl(1, signal.SIGKILL)
if os.getppid() != worker:
    sys.exit(143)
received = []
def forward(signum, frame):
    received.append(signum)
    if child is not None:
        child.send_signal(signum)
def arm():
    prctl(1, signal.SIGTERM)
    if os.getppid() != me:
        os._exit(143)
child = None
signal.signal(signal.SIGTERM, forward)
signal.signal(signal.SIGINT, forward)
child = subprocess.Popen([sys.executable, *sys.argv[3:]], pass_fds=(lock_fd,), preexec_fn=arm)
for signum in received:
    child.send_signal(signum)
code = child.wait()
if code < 0:  # die of the same signal
    if -code != signal.SIGKILL:
        signal.signal(-code, signal.SIG_DFL)
    os.kill(me, -code)
sys.exit(code)
"""


def latest_step(run_dir: Path) -> int | None:
    """The newest complete checkpoint of a run (orbax writes a step under a temporary name, then renames it)."""
    directory = Path(run_dir) / "checkpoints"
    if not directory.is_dir():
        return None
    return max((int(p.name) for p in directory.iterdir() if p.name.isdigit() and (p / "state").is_dir()), default=None)


def saved_max_steps(run_dir: Path) -> int | None:
    try:
        return int(json.loads((Path(run_dir) / "config.json").read_text())["max_steps"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def is_finished(run_dir: Path) -> bool:
    step, max_steps = latest_step(run_dir), saved_max_steps(run_dir)
    return step is not None and max_steps is not None and step >= max_steps


def trial_environment(gpus: float, base: typing.Mapping[str, str], run_dir: Path | str = "") -> dict[str, str]:
    """train.py's environment in a trial with `gpus` GPUs (Ray already set CUDA_VISIBLE_DEVICES)."""
    # PYTHONUNBUFFERED: train.log follows the run as it goes. TRIAL_ENV marks the trial's processes
    # (train.py, its env workers, wandb), which live in sessions of their own, for `ps e` and the tests.
    env = {**base, "PYTHONUNBUFFERED": "1", TRIAL_ENV: str(run_dir)}
    if gpus == 0:
        env.setdefault("JAX_PLATFORMS", "cpu")  # no GPU was reserved: JAX must not take one
    elif gpus < 1:
        # JAX preallocates 75% of the GPU's memory: a second trial on the same GPU would not start
        env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", f"{GPU_MEMORY * gpus:.3f}")
    return env


class MetricsTail:
    """The complete lines appended to a metrics.jsonl since this object was made."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = path.stat().st_size if path.exists() else 0
        self.partial = b""

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        self.offset += len(data)
        *lines, self.partial = (self.partial + data).split(b"\n")
        rows = []
        for line in lines:
            with contextlib.suppress(json.JSONDecodeError):
                rows.append(json.loads(line))
        return rows

    def last(self) -> dict:
        """The file's last complete line (an earlier attempt's), or {}."""
        if not self.path.exists():
            return {}
        lines = [line for line in self.path.read_bytes().split(b"\n")[:-1] if line.strip()]
        for line in reversed(lines):
            with contextlib.suppress(json.JSONDecodeError):
                return json.loads(line)
        return {}


def acquire_lock(path: Path, timeout: float) -> int:
    """An exclusive flock on `path`, once an earlier attempt's train.py, which holds it, has exited."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + timeout
    killed = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() > deadline:
                if killed or not kill_lock_holder(path):
                    os.close(fd)
                    raise TrialFailed(f"an earlier attempt's train.py still holds {path}") from None
                # told to stop LOCK_WAIT_S ago and still running: hung
                killed, deadline = True, time.monotonic() + 10.0
            time.sleep(POLL_S)


def lock_held(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def kill_lock_holder(lock: Path) -> bool:
    """SIGKILL the process group of the train.py that holds `lock`, if it runs on this machine.
    Only called while the lock is held, so the recorded pid is still that process's."""
    try:
        host, pid = lock.with_suffix(".pid").read_text().split()
    except (OSError, ValueError):
        return False
    if host != socket.gethostname():
        return False
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(int(pid), signal.SIGKILL)
    return True


def describe_exit(code: int) -> str:
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    if code == 130:
        return "was interrupted (exit 130) by a signal the sweep did not send"
    return f"exited with code {code}"


def _last_log_line(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(f.seek(0, os.SEEK_END) - 4096, 0))
            lines = [line.strip() for line in f.read().decode(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1][:300] if lines else ""


class TrialProcess:
    """One attempt of a trial: train.py as a subprocess, and the metrics.jsonl lines it appends."""

    def __init__(self, spec: dict, config: dict):
        self.spec, self.config = spec, config
        self.name = trial_name(config)
        sweep_dir = Path(spec["sweep_dir"])
        self.run_dir = sweep_dir / self.name
        self.lock = sweep_dir / LOCK_DIR / f"{self.name}.lock"
        self.proc: subprocess.Popen | None = None
        self.lock_fd: int | None = None
        self.log = None
        self.group_killed = False
        self.pending: list[dict] = []
        self.last_row: dict = {}

    def start(self) -> None:
        self.lock.parent.mkdir(parents=True, exist_ok=True)
        self.lock_fd = acquire_lock(self.lock, LOCK_WAIT_S)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.tail = MetricsTail(self.run_dir / "metrics.jsonl")
        self.last_row = self.tail.last()
        if is_finished(self.run_dir):
            return  # an earlier attempt finished and died before Tune heard of it: nothing to train
        if not TRAIN_PY.is_file():
            raise TrialFailed(f"{TRAIN_PY} not found: racer-vec must be installed from a checkout (pip install -e)")
        step = latest_step(self.run_dir)
        argv = ["--resume", str(self.run_dir)] if step is not None else trial_argv(self.spec, self.config)
        self.log = open(self.run_dir / TRAIN_LOG, "ab")
        header = f"--- sweep trial {self.name}, {datetime.now():%Y-%m-%d %H:%M:%S}: train.py {' '.join(argv)}\n"
        self.log.write(header.encode())
        self.log.flush()
        cwd = self.spec["cwd"] if Path(self.spec["cwd"]).is_dir() else str(self.run_dir.parent)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _SUPERVISOR, str(os.getpid()), str(self.lock_fd), str(TRAIN_PY), *argv],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT, cwd=cwd,
            env=trial_environment(self.spec["gpus_per_trial"], os.environ, self.run_dir),
            start_new_session=True,  # a terminal's Ctrl-C goes to the sweep, which decides
            pass_fds=(self.lock_fd,),  # held while train.py lives, even if this worker and the supervisor die
        )  # fmt: skip
        self.lock.with_suffix(".pid").write_text(f"{socket.gethostname()} {self.proc.pid}\n")

    def next_result(self) -> tuple[dict, bool]:
        """The next metrics line and whether the run has finished; raises TrialFailed if it died."""
        while True:
            self.pending += self.tail.read()
            running = self.proc is not None and self.proc.poll() is None
            if running and not self.pending:
                time.sleep(POLL_S)
                continue
            if not running:
                self.pending += self.tail.read()
                if self.proc is not None and self.proc.returncode != 0:
                    self._fail(self.proc.returncode)
                self._release()
            done = not running and len(self.pending) <= 1
            if self.pending:
                self.last_row = self.pending.pop(0)
            return self.last_row, done

    def _fail(self, code: int) -> None:
        self._release(wait=LOCK_WAIT_S)
        said = _last_log_line(self.run_dir / TRAIN_LOG) if code > 0 else ""
        raise TrialFailed(
            f"the trial's process {describe_exit(code)} at {self.last_row.get('env_steps', 0)} env steps"
            + (f" ({said})" if said else "")
            + f"; latest checkpoint: {latest_step(self.run_dir)}; log: {self.run_dir / TRAIN_LOG}"
        )

    def stop(self, timeout: float) -> None:
        """SIGTERM train.py (it checkpoints and exits) and wait for it, up to `timeout` s. A run still
        saving then keeps the lock; the retry or the sweep's end waits for it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                return
        self._release()

    def _release(self, wait: float = 0.0) -> None:
        """Close the log and the lock, once the run's process group is gone: after `wait` s, what is
        left (a killed train.py's env workers, say) is killed. A train.py whose supervisor was killed
        is still writing its final checkpoint meanwhile."""
        if self.proc is not None and not self.group_killed:
            deadline = time.monotonic() + wait
            while _group_alive(self.proc.pid) and time.monotonic() < deadline:
                time.sleep(POLL_S)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.group_killed = True
        if self.log is not None:
            self.log.close()
            self.log = None
        if self.lock_fd is not None:
            self.lock.with_suffix(".pid").unlink(missing_ok=True)
            os.close(self.lock_fd)
            self.lock_fd = None


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if not Path("/proc").is_dir():
        return True
    # zombies (orphans that init has not reaped yet) count as gone
    return any(_is_running(pid) for pid in _group_members(pgid))


def _group_members(pgid: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if os.getpgid(int(entry.name)) == pgid:
                    members.append(int(entry.name))
    return members


def _is_running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


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


def wait_for_trial_processes(sweep_dir: Path, timeout: float = LOCK_WAIT_S) -> list[str]:
    """Wait until no trial process of the sweep runs on this machine (a stopped run may still be
    writing its final checkpoint); kill those left after `timeout` or a Ctrl-C. Returns their trials."""
    busy = [p for p in sorted((sweep_dir / LOCK_DIR).glob("*.lock")) if lock_held(p)]
    if not busy:
        return []
    names = ", ".join(p.stem for p in busy)
    say(f"waiting for {len(busy)} trial process(es) to write a final checkpoint: {names} (Ctrl-C kills them)")
    deadline = time.monotonic() + timeout
    try:
        while busy and time.monotonic() < deadline:
            time.sleep(POLL_S)
            busy = [p for p in busy if lock_held(p)]
    except KeyboardInterrupt:
        pass
    killed = [p.stem for p in busy if lock_held(p) and kill_lock_holder(p)]
    if killed:
        say(f"killed {', '.join(killed)}: they resume from their latest periodic checkpoint")
    return killed


# ---------------------------------------------------------------------------------------------
# Ray


def say(text: str) -> None:
    print(f"sweep: {text}", flush=True)


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
    import ray

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
    )


def check_gpus(spec: dict) -> None:
    import ray

    have = ray.cluster_resources().get("GPU", 0)
    if spec["gpus_per_trial"] > have:
        raise ConfigError(f"--gpus-per-trial {spec['gpus_per_trial']:g}: Ray sees {have:g} GPUs")


def _trial_resources(cpus: dict[str, float], gpus: float, config: dict):
    from ray.tune import PlacementGroupFactory

    return PlacementGroupFactory([{"CPU": cpus[trial_name(config)], **({"GPU": gpus} if gpus else {})}])


def _trial_label(trial) -> str:
    return trial_name(trial.config)


def make_tuner(spec: dict, trials: dict[str, TrainConfig]):
    """The sweep's Tuner: restored from <sweep>/.tune when there is Tune state to continue, else new."""
    from ray import tune

    cpus = {name: trial_cpus(spec, cfg) for name, cfg in trials.items()}
    trainable = tune.with_resources(
        tune.with_parameters(ray_class("SweepTrial"), spec=spec),
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
            callbacks=[ray_class("SweepProgress")()],
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


def _ray_classes() -> dict[str, type]:
    """The Ray Tune trainable and callback, built on first use so that importing this module needs no Ray."""
    from ray import tune

    class SweepTrial(tune.Trainable):
        """One trial: a TrialProcess, its metrics.jsonl lines as Tune results."""

        def setup(self, config, spec):
            self.process = TrialProcess(spec, config)
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

    for cls in (SweepTrial, SweepProgress):
        # pickled by reference to this module (Ray workers and Tune's saved state import it)
        cls.__module__, cls.__qualname__ = __name__, cls.__name__
    return {"SweepTrial": SweepTrial, "SweepProgress": SweepProgress}


def ray_class(name: str) -> type:
    """SweepTrial or SweepProgress, built once (a second build would break pickling by reference)."""
    if name not in globals():
        globals().update(_ray_classes())
    return globals()[name]


def __getattr__(name: str):
    if name in ("SweepTrial", "SweepProgress"):
        return ray_class(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _ctrl_c(signum, frame) -> None:
    signal.raise_signal(signal.SIGINT)  # SIGTERM stops the sweep as Ctrl-C does (Tune handles SIGINT)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


def run_sweep(args: SweepArgs, spec: dict, trials: dict[str, TrainConfig]) -> int:
    import ray

    sweep_dir = Path(spec["sweep_dir"])
    where = "a local Ray instance" if args.address is None else f"the Ray cluster at --address {args.address}"
    cpus = sorted({trial_cpus(spec, cfg) for cfg in trials.values()})
    say(f"{len(trials)} trials in {sweep_dir} on {where}; per trial {'/'.join(f'{c:g}' for c in cpus)} CPUs"
        f", {spec['gpus_per_trial']:g} GPUs; up to {spec['max_failures']} retries each")  # fmt: skip
    results, code = None, None
    try:
        try:
            start_ray(args)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise ConfigError(f"Ray did not start or connect ({_first_line(exc)})") from None
        signal.signal(signal.SIGTERM, _ctrl_c)  # ray.init installed its own, which exits at once
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


# ---------------------------------------------------------------------------------------------
# The report


def grid_points(spec: dict, records: list[tuple[dict, dict]]) -> list[tuple[dict, list[dict]]]:
    """[(grid point without seed, its results files sorted by seed)], in the grid's order."""

    def point(config: dict) -> dict:
        return {k: v for k, v in config.items() if k != "seed"}

    groups = group_by_seed(records, lambda item: json.dumps(point(item[0]), sort_keys=True), lambda item: item[1]["seed"])
    return [(point(group[0][0]), [record for _, record in group]) for group in groups.values()]


def _point_label(point: dict, path: str) -> str:
    leaves = [p.rpartition(".")[2] for p in point]
    leaf = path.rpartition(".")[2]
    return leaf if leaves.count(leaf) == 1 else path


def sweep_table(spec: dict, records: list[tuple[dict, dict]], episodes: int) -> str:
    """One row per grid point: its values, seeds, transitions, then the results table's columns as
    mean ± std over its seeds."""
    keys = [path for path, _ in spec["grid"]]
    labels = [*([_point_label(dict.fromkeys(keys), k) for k in keys] or ["preset"]), "seeds", "transitions"]
    rows = [([*([str(point[k]) for k in keys] or [spec["preset"]]), seeds_text(group), steps_text(group)], group)
            for point, group in grid_points(spec, records)]  # fmt: skip
    seeds = ", ".join(map(str, spec["seeds"]))
    caption = (
        f"Sweep `{spec['name']}` (preset `{spec['preset']}`, seeds {seeds}): per grid point, mean ± std over its "
        f"seeds of each run's final checkpoint, evaluated with {episodes} episodes by evaluate.py (stochastic "
        f"actions, episode seeds 0-{episodes - 1}); train collisions, transitions/s and wall time are the "
        f"training runs'."
    )
    return caption + "\n\n" + results_table(labels, rows)


def mean_curve(curves: list[list[dict]]) -> list[dict]:
    """Per logged step, the mean over runs of each numeric metric (over the runs that logged it)."""
    by_step: dict[int, list[dict]] = {}
    for rows in curves:
        for row in rows:
            by_step.setdefault(row["env_steps"], []).append(row)
    mean = []
    for step in sorted(by_step):
        rows = by_step[step]
        keys = {k for r in rows for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        values = {k: [r[k] for r in rows if isinstance(r.get(k), (int, float))] for k in keys}
        mean.append({**{k: sum(v) / len(v) for k, v in values.items()}, "env_steps": step})
    return mean


def plot_points(spec: dict, records: list[tuple[dict, dict]], output: Path) -> Path:
    """The learning curves, one colour per grid point: the mean over its seeds, and a star per seed's
    final evaluation."""
    from racer_vec.tools import plot

    sweep_dir = Path(spec["sweep_dir"])
    runs = []
    for point, group in grid_points(spec, records):
        names = [trial_name({**point, "seed": r["seed"]}) for r in group]
        curves = [plot.load_run(sweep_dir / name).metrics for name in names]
        label = ", ".join(f"{_point_label(point, k)}={v}" for k, v in point.items() if not k.endswith("cvar_risk"))
        runs.append(
            plot.Run(
                name=(label + ", " if label else "") + f"mean of {len(group)} seed{'s' if len(group) > 1 else ''}",
                preset=spec["preset"],
                cvar_risk=float(group[0]["cvar_risk"]),
                metrics=mean_curve(curves),
                finals=tuple({"env_steps": r["env_steps"], **r["evaluation"]} for r in group),
            )
        )
    title = f"Sweep {spec['name']} ({spec['preset']}): mean over seeds {', '.join(map(str, spec['seeds']))}"
    return plot.plot_runs(runs, output, title=title)


def _evaluated(path: Path, episodes: int) -> bool:
    """Whether the report's evaluation of this checkpoint exists already (a second --report reuses it)."""
    try:
        report = json.loads(path.read_text())
        settings = report["config"]["evaluation"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        return False
    return settings.get("num_episodes") == episodes and not settings.get("deterministic") and settings.get("seed") == 0


def write_report(spec: dict, episodes: int, workers: int) -> int:
    """Evaluate every finished trial's final checkpoint (evaluate.py's code), write its results file,
    then the sweep's table and plot. Returns the exit code."""
    from racer_vec.run.eval_cli import EvalArgs, run_evaluation
    from racer_vec.run.evaluation import METRICS_FILE

    sweep_dir = Path(spec["sweep_dir"])
    records, missing = [], []
    for trial in spec["trials"]:
        run_dir = sweep_dir / trial["name"]
        if not is_finished(run_dir):
            missing.append(trial["name"])
            continue
        step = latest_step(run_dir)
        evaluation = run_dir / "eval" / str(step) / METRICS_FILE
        if not _evaluated(evaluation, episodes):
            say(f"report: evaluating {trial['name']} at {step} env steps with {episodes} episodes")
            args = EvalArgs(checkpoint=str(run_dir / "checkpoints" / str(step)), num_episodes=episodes,
                            num_workers=workers, render=False, output_dir=str(evaluation.parent))  # fmt: skip
            try:
                code = run_evaluation(args)
            finally:
                stop_multiprocessing_helpers()
            if code != 0:
                return code
        record = collect(run_dir, evaluation)
        path = sweep_dir / "results" / f"{trial['name']}_{step}.json"
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(record, indent=2) + "\n")
        records.append((trial["config"], record))
    if missing:
        say(f"report: left out {len(missing)} unfinished trial(s): {', '.join(missing)}")
    if not records:
        say("report: no finished trial to report yet")
        return 1
    table = sweep_table(spec, records, episodes)
    (sweep_dir / "table.md").write_text(table + "\n")
    png = plot_points(spec, records, sweep_dir / "learning_curves.png")
    print("\n" + table + "\n", flush=True)
    say(f"report: {sweep_dir / 'table.md'}, {png}, results files in {sweep_dir / 'results'}")
    return 0


def stop_multiprocessing_helpers() -> None:
    """Stop the forkserver and resource tracker the evaluations started, now rather than just after
    this process exits: when the command returns, none of its processes is left."""
    from multiprocessing import forkserver, resource_tracker

    for helper in (forkserver._forkserver, resource_tracker._resource_tracker):
        stop = getattr(helper, "_stop", None)  # private since Python 3.8; absent: they exit with us
        if stop is not None:
            stop()


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    previous = signal.signal(signal.SIGTERM, _ctrl_c)
    try:
        return _main(list(sys.argv[1:] if argv is None else argv))
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


def _main(argv: list[str]) -> int:
    try:
        args, line = parse_command_line(argv)
        if args.report is not None:
            _, spec = open_sweep(args.report, line, "--report")
            return write_report(spec, args.report_episodes, args.report_workers)
        if args.resume is not None:
            sweep_dir, spec = open_sweep(args.resume, line, "--resume")
        else:
            sweep_dir, spec = plan_sweep(args, line, argv)
        trials = validate_trials(spec)
        check_settings(args, spec, trials)
        try:
            import ray.tune  # noqa: F401
        except ImportError:
            raise ConfigError("the sweep needs Ray Tune: pip install -e '.[sweep]'") from None
        if args.address is not None:
            check_address(args.address)
        if args.resume is None:
            sweep_dir.mkdir(parents=True)
            (sweep_dir / SWEEP_FILE).write_text(json.dumps(spec, indent=2) + "\n")
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return run_sweep(args, spec, trials)


if __name__ == "__main__":
    # Run as racer_vec.tools.sweep, not as __main__: Ray pickles the trial class by reference to its module.
    from racer_vec.tools.sweep import main as imported_main

    sys.exit(imported_main())
