"""The grid: its keys (config fields, by path or train.py flag) and values, the trials it makes and
their names, each trial's train.py command line, and every trial's config checked through train.py's
own parser before Ray starts."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import itertools
import json
import re
import typing

from racer_vec.config import ConfigError, TrainConfig, to_dict
from racer_vec.run.train_cli import parse_train_args
from racer_vec.sweep.cli import quietly

SET_BY_SWEEP = {
    "seed": "use --seeds",
    "run_name": "trials are named after their grid point",
    "runs_dir": "use the sweep's --runs-dir",
    "resume": "use the sweep's --resume",
    "preset": "give the preset first",
}
ALIASES = {"num_workers": "num_envs"}


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


def train_flag(path: str, negated: bool = False) -> str:
    prefix, dot, leaf = path.rpartition(".")
    return "--" + prefix + dot + ("no-" if negated else "") + leaf.replace("_", "-")


def grid_flags(path: str, value: str) -> list[str]:
    """train.py's flags that set `path` to `value`."""
    hint = config_fields()[path]
    if hint is bool:
        if value.lower() in ("true", "1", "yes", "on"):
            return [train_flag(path)]
        if value.lower() in ("false", "0", "no", "off"):
            return [train_flag(path, negated=True)]
        raise ConfigError(f"--grid {path}={value}: not a boolean (true or false)")
    if typing.get_origin(hint) is tuple:
        return [train_flag(path), *value.split()]
    return [train_flag(path), value]


def flag_spellings(path: str) -> set[str]:
    """How train.py's command line can name the field `path` (with either separator, negated, aliased)."""
    names = {path} | {alias for alias, target in ALIASES.items() if target == path}
    flags = set()
    for name in names:
        for negated in (False, True):
            flag = train_flag(name, negated)
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
