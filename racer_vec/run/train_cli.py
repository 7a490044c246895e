"""Command-line parsing for train.py: presets as tyro subcommands, and --resume's flag rules.

No JAX here: spawned workers re-import the entry module and what it imports.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import tyro

import configs
from racer_vec.config import ConfigError, TrainConfig, from_dict, resolve
from racer_vec.validation import flag_name

# Flags that may differ from the saved config when resuming (design §7).
RESUME_MUTABLE = frozenset(
    {
        "resume",
        "max_steps",
        "wandb_mode",
        "log_interval",
        "checkpoint_interval",
        "keep_checkpoint_every",
        "eval_interval",
        "eval_episodes",
        "save_buffer",
        "max_worker_restarts",
        "worker_timeout",
    }
)


def with_preset_name(argv: list[str]) -> list[str]:
    """Put the default preset's name first unless a preset (or --help) already is.

    tyro 1.0.17 rejects a leading `--no-<flag>` when no subcommand was named.
    """
    if argv and (argv[0] in configs.PRESETS or argv[0] in ("-h", "--help")):
        return argv
    return [configs.DEFAULT, *argv]


def parse_cli(default_preset_argv: list[str], description: str) -> TrainConfig:
    preset_type = tyro.extras.subcommand_type_from_defaults(
        configs.PRESETS, descriptions=configs.PRESET_DESCRIPTIONS, prefix_names=False
    )
    return tyro.cli(
        preset_type,
        default=configs.PRESETS[configs.DEFAULT],
        args=default_preset_argv,
        description=description,
        config=(tyro.conf.CascadeSubcommandArgs,),
    )


def _resume_path(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg == "--resume" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--resume="):
            return arg.split("=", 1)[1]
    return None


def load_saved_config(run_dir: Path) -> TrainConfig:
    path = run_dir / "config.json"
    if not path.is_file():
        raise ConfigError(f"--resume {run_dir}: not a run directory (no config.json there)")
    try:
        return from_dict(TrainConfig, json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError) as exc:
        raise ConfigError(f"--resume {run_dir}: unreadable config.json ({exc})") from None


def _changed_fields(old, new, prefix: str = "") -> list[tuple[str, object, object]]:
    changed = []
    for f in dataclasses.fields(old):
        a, b = getattr(old, f.name), getattr(new, f.name)
        if dataclasses.is_dataclass(a):
            changed += _changed_fields(a, b, f"{prefix}{f.name}.")
        elif a != b:
            changed.append((prefix + f.name, a, b))
    return changed


def resume_config(argv: list[str], run_dir: str) -> TrainConfig:
    """The saved config of `run_dir` with the flags that may change on resume applied."""
    saved = load_saved_config(Path(run_dir))
    if argv and argv[0] in configs.PRESETS:
        if argv[0] != saved.preset:
            raise ConfigError(f"--resume {run_dir}: the run used preset {saved.preset}, not {argv[0]}")
        argv = argv[1:]
    given = tyro.cli(TrainConfig, default=saved, args=argv, config=(tyro.conf.CascadeSubcommandArgs,))
    for path, old, new in _changed_fields(saved, given):
        if path not in RESUME_MUTABLE:
            raise ConfigError(
                f"{flag_name(path)} cannot change on --resume (saved {old!r}, given {new!r}); "
                f"only {', '.join(sorted(flag_name(p) for p in RESUME_MUTABLE))} may"
            )
    return resolve(given)


def parse_train_args(argv: list[str] | None = None) -> TrainConfig:
    """The resolved TrainConfig for train.py's command line (raises ConfigError on a user mistake)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    run_dir = _resume_path(argv)
    if run_dir is not None:
        return resume_config(argv, run_dir)
    cfg = parse_cli(with_preset_name(argv), description="Train RACER on highway-env.")
    return resolve(cfg)
