"""The sweep's command line: its own flags (SweepArgs), split from the train.py flags it passes on;
tyro's errors as one line; the sweep's output lines; SIGTERM taken as Ctrl-C."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import signal
import typing
from pathlib import Path

import tyro

import configs
from racer_vec.config import ConfigError

PROG = "python -m racer_vec.sweep"


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


def say(text: str) -> None:
    print(f"sweep: {text}", flush=True)


def sigterm_as_ctrl_c(signum, frame) -> None:
    signal.raise_signal(signal.SIGINT)  # SIGTERM stops the sweep as Ctrl-C does (Tune handles SIGINT)
