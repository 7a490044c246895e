"""Results files: one small JSON per evaluated run, and a Markdown table of several.

    python -m racer_vec.results collect runs/NAME --evaluation runs/NAME/eval/STEP/evaluation_metrics.json
    python -m racer_vec.results collect --evaluation eval/idm40_highway_fast/evaluation_metrics.json  # a baseline
    python -m racer_vec.results table results/*.json
    python -m racer_vec.results table results/*.json --mean-over-seeds
    python -m racer_vec.results table results/*.json --release

A results file keeps what a reader needs to trust and reproduce a number without the run directory
(checkpoints and buffers are too large to share): the evaluation summary, the resolved config, the
training totals at the evaluated checkpoint, wall time, transitions/s, for every start or resume
of the run the source commit and the machine (with the collector's `--notes` on them), and the
learning curve up to the evaluated step (the metrics `racer_vec.plot` draws), so that plots can be
redrawn from the results files alone. A baseline policy's results file (evaluate.py --policy, no run)
has its evaluation, its env's config, `env_steps` 0, no CVaR and no training; its `seed` is the
evaluation's --seed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Annotated, Callable, Union

import tyro

from racer_vec.config import ConfigError, TrainConfig, from_dict, to_dict
from racer_vec.run.jsonl import read_jsonl
from racer_vec.write_failures import WriteFailed, check_output_file, error_exit, write_atomically


@dataclasses.dataclass(frozen=True)
class Collect:
    """Write the results file of a run evaluated by evaluate.py, or of a baseline policy's evaluation."""

    evaluation: Path
    """evaluation_metrics.json written by evaluate.py for one of the run's checkpoints (or, without a
    run, for a baseline policy)."""
    run: tyro.conf.Positional[Path | None] = None
    """Run directory (config.json, metrics.jsonl, run_info.jsonl); none for a baseline policy."""
    output: Path | None = None
    """Results file; default: results/<run name>_<step>.json, or results/<baseline>.json."""
    notes: str | None = None
    """What a reader needs that the files do not say, kept in the results file: e.g. that a resumed
    run's sessions ran on different commits, and why their numbers are still one run's."""


@dataclasses.dataclass(frozen=True)
class Table:
    """Print a Markdown table of results files."""

    files: tyro.conf.Positional[tuple[Path, ...]]
    mean_over_seeds: bool = False
    """One row per group of runs that differ only in seed (same settings, same evaluated step): the
    mean over its seeds."""
    release: bool = False
    """Add the public release's published rows (at 1.6M transitions of highway-fast-v0) below the
    files' rows; a column it did not publish shows "—"."""


@dataclasses.dataclass(frozen=True)
class ReleaseRow:
    """One row of the public release's table, 200k iterations = 1.6M transitions (design §11)."""

    label: str
    cvar_risk: float | None  # None: plain SAC, no CVaR objective
    mean_return: float
    std_return: float | None  # published for CVaR 0.5 only
    speed: float
    train_collisions: int


RELEASE_ROWS = (
    ReleaseRow("release: CVaR 0.5", 0.5, 102.4, 35.2, 39.1, 2057),
    ReleaseRow("release: CVaR 0.8", 0.8, 56.0, None, 25.2, 543),
    ReleaseRow("release: SAC", None, 54.4, None, 24.5, 677),
)
RELEASE_STEPS = 1_600_000


def read_json(path: Path, what: str):
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such {what}") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: unreadable {what} ({exc})") from None


CURVE_KEYS = (
    "env_steps", "updates", "sps", "episode_return_mean", "episode_training_return_mean", "episode_length_mean",
    "speed_ema", "collision_ema", "train_collisions_total", "offroad_terminations_total", "episodes_total",
    "episode_lane_changes_mean", "episode_overtakes_mean", "episode_distance_mean",
    "speed_floor", "cap_ramp", "effective_limit",
)  # fmt: skip
"""Per log interval, what a learning curve needs (plus every `eval/...` key)."""


def curve(metrics: dict[int, dict], last_step: int) -> list[dict]:
    """The learning curve up to `last_step`, one row per logged step, floats to 6 significant digits."""

    def short(value):
        return float(f"{value:.6g}") if isinstance(value, float) else value

    return [
        {k: short(v) for k, v in metrics[step].items() if k in CURVE_KEYS or k.startswith("eval/")}
        for step in sorted(metrics)
        if step <= last_step
    ]


def collect_baseline(evaluation_file: Path, notes: str | None = None) -> dict:
    """The results file of a baseline policy's evaluation (no run, no training)."""
    evaluation = read_json(evaluation_file, "evaluation file")
    config = evaluation.get("config") or {}
    if config.get("checkpoint") or "label" not in config.get("evaluation", {}):
        raise ConfigError(f"{evaluation_file}: not a baseline policy's evaluation (a checkpoint's needs its run)")
    settings = config["evaluation"]
    return {
        "run": settings["label"],
        "preset": settings["preset"],
        "seed": settings["seed"],
        "cvar_risk": None,
        "env_steps": 0,
        "evaluation": evaluation["summary"],
        "evaluation_settings": settings,
        "evaluation_provenance": config.get("provenance"),
        "training": None,
        "sessions": [],
        "notes": notes,
        # the env the episodes ran on, in the preset's config
        "config": {**config["train"], "env": config["env"]},
        "curve": [],
    }


def collect(run_dir: Path | None, evaluation_file: Path, notes: str | None = None) -> dict:
    if run_dir is None:
        return collect_baseline(evaluation_file, notes)
    config = read_json(run_dir / "config.json", "run config (is this a run directory?)")
    evaluation = read_json(evaluation_file, "evaluation file")
    checkpoint = (evaluation.get("config") or {}).get("checkpoint")
    if not checkpoint:
        raise ConfigError(f"{evaluation_file}: evaluates a baseline policy, not a checkpoint of {run_dir}")
    step = int(checkpoint["step"])
    if Path(checkpoint["directory"]).resolve() != (run_dir / "checkpoints").resolve():
        raise ConfigError(f"{evaluation_file}: evaluates {checkpoint['directory']}, not a checkpoint of {run_dir}")

    # A resumed run may log a step twice (after an interruption); the later line is the one kept.
    metrics = {m["env_steps"]: m for m in read_jsonl(run_dir / "metrics.jsonl")}
    logged = [s for s in metrics if s <= step]
    if not logged:
        raise ConfigError(f"{run_dir}/metrics.jsonl: no line at or before the evaluated step {step}")
    at_step = metrics[max(logged)]
    train_time = at_step["env_steps"] / at_step["sps"] if at_step.get("sps") else None
    sessions = [s for s in read_jsonl(run_dir / "run_info.jsonl") if s.get("env_steps", 0) < step]
    return {
        "run": config.get("run_name") or run_dir.resolve().name,
        "preset": config["preset"],
        "seed": config["seed"],
        "cvar_risk": config["agent"]["cvar_risk"],
        "env_steps": step,
        "schedules": schedules(config),
        "evaluation": evaluation["summary"],
        "evaluation_settings": evaluation["config"]["evaluation"],
        "evaluation_provenance": evaluation["config"].get("provenance"),
        "training": {
            "logged_at_env_steps": at_step["env_steps"],
            "train_collisions_total": at_step.get("train_collisions_total"),
            "offroad_terminations_total": at_step.get("offroad_terminations_total"),
            "episodes_total": at_step.get("episodes_total"),
            "speed_ema": at_step.get("speed_ema"),
            "collision_ema": at_step.get("collision_ema"),
            "updates": at_step.get("updates"),
            "critic_updates": at_step.get("critic_updates"),
            "wall_time_s": at_step.get("wall_time"),
            "train_time_s": train_time,
            "transitions_per_s": at_step.get("sps"),
        },
        "sessions": sessions,
        "notes": notes,
        "config": config,
        "curve": curve(metrics, step),
    }


def kilo(env_steps: int) -> str:
    return f"{env_steps / 1000:g}k"


def cvar_text(cvar_risk: float | None) -> str:
    return "—" if cvar_risk is None else f"{cvar_risk:g}"  # None: a baseline policy


SCHEDULES = {"speed_floor": ("speed_floor_hold", "speed_floor_end"),
             "cap_ramp_init": ("cap_ramp_start", "cap_ramp_end")}
"""The schedules of the policy's speed box (design §4.1): the field that turns each on, and its two transitions."""


def schedules(config: dict) -> dict:
    """The schedule settings that trained a run, from its config ({} for none, a baseline's config, or a
    config older than them)."""
    agent = config.get("agent", {})
    return {k: agent[k] for on, ends in SCHEDULES.items() if agent.get(on) is not None for k in (on, *ends)}


def schedule_text(result: dict) -> str:
    """A run's schedules as a table cell, e.g. `floor 30 m/s to 200k, none by 400k`; "—" for none."""
    s, parts = schedules(result["config"]), []
    if "speed_floor" in s:
        hold, end = kilo(s["speed_floor_hold"]), kilo(s["speed_floor_end"])
        parts.append(f"floor {s['speed_floor']:g} m/s to {hold}, none by {end}")
    if "cap_ramp_init" in s:
        parts.append(f"cap ramp {s['cap_ramp_init']:g} to {kilo(s['cap_ramp_start'])}, 1 by {kilo(s['cap_ramp_end'])}")
    return "; ".join(parts) or "—"


def with_schedules(labels: list[str], rows: list[tuple[list[str], list[dict]]]):
    """The label columns and rows with a `schedules` column, where any row was trained with one."""
    if all(schedule_text(group[0]) == "—" for _, group in rows):
        return labels, rows
    return [*labels, "schedules"], [([*text, schedule_text(group[0])], group) for text, group in rows]


def evaluation_label(result: dict) -> str:
    """How a row was evaluated: the protocol's action rule, `release: clip(mean)` for the release's
    (design §11); files written before evaluations said so name the rule by --deterministic."""
    summary, settings = result["evaluation"], result.get("evaluation_settings") or {}
    rule = summary.get("action_rule") or ("tanh(mean)" if settings.get("deterministic") else "sampled")
    env = summary.get("env_id")
    on = "" if env is None or env == result["config"]["env"]["env_id"] else f" on {env.rpartition(':')[2]}"
    return ("release: " if summary.get("protocol") == "release" else "") + rule + on


# ---------------------------------------------------------------------------------------------
# The table: label columns that name a row, then the measured columns


@dataclasses.dataclass(frozen=True)
class Column:
    """A measured column of the results table."""

    header: str
    value: Callable[[dict], float | int | None]
    """Its value in a results file (None: the file does not have it)."""
    digits: int
    """Digits after the point of a float (a count of one run shows as the integer it is)."""
    unit: str = ""
    spread: Callable[[dict], float | None] | None = None
    """A run's own ± (the evaluation's std over episodes), shown in a row of one run."""


def _field(*path: str, then: Callable | None = None) -> Callable[[dict], float | int | None]:
    """The value at `path` in a results file (None where it has none), passed through `then`."""

    def value(result: dict):
        for key in path:
            result = result.get(key) if isinstance(result, dict) else None
        return result if result is None or then is None else then(result)

    return value


def _percent(fraction: float) -> float:
    return 100 * fraction


COLUMNS = (
    Column("eval return", _field("evaluation", "mean_return"), 1, spread=_field("evaluation", "std_return")),
    Column("eval speed [m/s]", _field("evaluation", "mean_ego_speed"), 1),
    Column("eval collisions", _field("evaluation", "collision_rate", then=_percent), 0, "%"),
    Column("eval offroad", _field("evaluation", "offroad_episode_rate", then=_percent), 0, "%"),
    Column("eval success", _field("evaluation", "success_rate", then=_percent), 0, "%"),
    Column("eval lane changes", _field("evaluation", "mean_lane_changes"), 1),
    Column("eval overtakes", _field("evaluation", "mean_overtakes"), 1),
    Column("eval distance [m]", _field("evaluation", "mean_distance"), 0),
    Column("train collisions", _field("training", "train_collisions_total"), 1),
    Column("transitions/s", _field("training", "transitions_per_s"), 1),
    Column("wall time [h]", _field("training", "wall_time_s", then=lambda seconds: seconds / 3600), 2),
)
"""The measured columns of every results table: per run, per group of seeds, and the sweep's."""


def cell(mean: float | int | None, digits: int, unit: str = "", std: float | None = None) -> str:
    """`mean ± std` (or the value alone), "—" for no value; a count of one run shows as its integer."""
    if mean is None:
        return "—"
    text = f"{mean:,}" if isinstance(mean, int) else f"{mean:,.{digits}f}"
    return text + ("" if std is None else f" ± {std:,.{digits}f}") + unit


def seeds_cell(column: Column, group: list[dict]) -> str:
    """The column over a group of runs: `mean ± std` over them (population std), the mean alone for one."""
    values = [v for v in map(column.value, group) if v is not None]
    if not values:
        return "—"
    mean = sum(values) / len(values)
    std = (sum((v - mean) ** 2 for v in values) / len(values)) ** 0.5 if len(values) > 1 else None
    return cell(mean, column.digits, column.unit, std)


def run_cell(column: Column, group: list[dict]) -> str:
    """The column of one run, with its own spread (the evaluation's std over episodes) where it has one."""
    (result,) = group
    spread = None if column.spread is None else column.spread(result)
    return cell(column.value(result), column.digits, column.unit, spread)


def seeds_text(group: list[dict]) -> str:
    return ", ".join(str(r["seed"]) for r in group)


def steps_text(group: list[dict]) -> str:
    return "/".join(kilo(s) for s in sorted({r["env_steps"] for r in group}))


def group_by_seed(items: list, key: Callable, seed: Callable = lambda r: r["seed"]) -> dict:
    """key(item) -> the items that share it (everything but the seed), each group sorted by seed, in
    the order of their first items."""
    groups: dict = {}
    for item in items:
        groups.setdefault(key(item), []).append(item)
    return {k: sorted(group, key=seed) for k, group in groups.items()}


def markdown_table(columns: list[str] | tuple[str, ...], rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
                     + ["| " + " | ".join(row) + " |" for row in rows])  # fmt: skip


def results_table(
    labels: list[str], rows: list[tuple[list[str], list[dict]]], *, per_run: bool = False, release: bool = False
) -> str:
    """The one results table: each row its label cells, then COLUMNS over its results files (over seeds,
    or `per_run`, one file per row); a column no file has is left out (files written before it
    existed). `release`: the release's rows below."""
    results = [r for _, group in rows for r in group]
    columns = [c for c in COLUMNS if not results or any(c.value(r) is not None for r in results)]
    measure = run_cell if per_run else seeds_cell
    body = [[*text, *(measure(c, group) for c in columns)] for text, group in rows]
    header = [*labels, *(c.header for c in columns)]
    body += [release_cells(row, header) for row in RELEASE_ROWS] if release else []
    return markdown_table(header, body)


def release_cells(row: ReleaseRow, header: list[str]) -> list[str]:
    """The release's row under `header`, "—" where it published nothing."""
    cells = {
        "run": row.label, "runs": row.label, "preset": "the release", "transitions": kilo(RELEASE_STEPS),
        "CVaR": "—" if row.cvar_risk is None else f"{row.cvar_risk:g}",
        "eval return": cell(row.mean_return, 1, std=row.std_return), "eval speed [m/s]": cell(row.speed, 1),
        "train collisions": cell(row.train_collisions, 0),
        "evaluation": "release: clip(mean), its env not established (design §11)",
    }  # fmt: skip
    return [cells.get(name, "—") for name in header]


def table(results: list[dict], release: bool = False) -> str:
    """One row per results file."""
    labels = ["run", "CVaR", "seed", "transitions", "evaluation"]
    rows = [([r["run"], cvar_text(r["cvar_risk"]), str(r["seed"]), kilo(r["env_steps"]), evaluation_label(r)], [r])
            for r in results]  # fmt: skip
    return results_table(*with_schedules(labels, rows), per_run=True, release=release)


BOOKKEEPING = {
    "seed", "run_name", "runs_dir", "resume", "save_buffer", "wandb_mode", "wandb_project", "log_interval",
    "checkpoint_interval", "keep_checkpoints", "keep_checkpoint_every", "eval_interval", "eval_episodes", "eval_seed",
    "max_steps",
}  # fmt: skip
"""Config fields that do not change what a run learns up to its evaluated step (or are the seed)."""


def settings_key(result: dict) -> tuple:
    """What a run's numbers depend on but its seed: preset, evaluated step, resolved settings, evaluation."""
    try:  # fields added since the run was made take their defaults, as they would on a rerun
        config = to_dict(from_dict(TrainConfig, result["config"]))
    except (ConfigError, TypeError):
        config = result["config"]
    settings = {k: v for k, v in config.items() if k not in BOOKKEEPING}
    cvar_risk = -math.inf if result["cvar_risk"] is None else result["cvar_risk"]  # None: a baseline, first
    return (result["preset"], result["env_steps"], cvar_risk, evaluation_label(result),
            json.dumps(settings, sort_keys=True))  # fmt: skip


def seed_groups(results: list[dict]) -> list[list[dict]]:
    """Results grouped by everything but the seed and bookkeeping (settings_key), in its order."""
    groups = group_by_seed(results, settings_key)
    return [groups[key] for key in sorted(groups)]


def mean_table(results: list[dict], release: bool = False) -> str:
    """One row per group of runs that differ only in seed: mean ± std over its seeds."""
    labels = ["preset", "CVaR", "transitions", "seeds", "runs", "evaluation"]
    rows = [([g[0]["preset"], cvar_text(g[0]["cvar_risk"]), steps_text(g), seeds_text(g),
              ", ".join(r["run"] for r in g), evaluation_label(g[0])], g) for g in seed_groups(results)]  # fmt: skip
    return results_table(*with_schedules(labels, rows), release=release)


def main(argv: list[str] | None = None) -> int:
    command = tyro.cli(
        Union[Annotated[Collect, tyro.conf.subcommand("collect")], Annotated[Table, tyro.conf.subcommand("table")]],
        args=argv,
        description=__doc__.splitlines()[0], prog="python -m racer_vec.results",
    )
    try:
        if isinstance(command, Collect):
            if command.output is not None:
                check_output_file("--output", command.output)
            result = collect(command.run, command.evaluation, command.notes)
            name = result["run"] if command.run is None else f"{result['run']}_{result['env_steps']}"
            output = command.output or Path("results") / f"{name}.json"
            write_atomically(output, json.dumps(result, indent=2) + "\n")
            print(f"wrote {output}")
        else:
            if not command.files and not command.release:
                raise ConfigError("give at least one results file (or --release for the release's rows alone)")
            records = [read_json(f, "results file") for f in command.files]
            make = mean_table if command.mean_over_seeds else table
            print(make(records, command.release))
    except (ConfigError, WriteFailed) as exc:
        return error_exit(exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
