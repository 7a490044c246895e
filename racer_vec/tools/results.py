"""Results files: one small JSON per evaluated run, and a Markdown table of several.

    python -m racer_vec.results collect runs/NAME --evaluation runs/NAME/eval/STEP/evaluation_metrics.json
    python -m racer_vec.results table results/*.json
    python -m racer_vec.results table results/*.json --mean-over-seeds
    python -m racer_vec.results table results/*.json --release

A results file keeps what a reader needs to trust and reproduce a number without the run directory
(checkpoints and buffers are too large to share): the evaluation summary, the resolved config, the
training totals at the evaluated checkpoint, wall time, transitions/s, for every start or resume
of the run the source commit and the machine (with the collector's `--notes` on them), and the
learning curve up to the evaluated step (the metrics `racer_vec.plot` draws), so that plots can be
redrawn from the results files alone.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Annotated, Union

import tyro

from racer_vec.config import ConfigError, TrainConfig, from_dict, to_dict


@dataclasses.dataclass(frozen=True)
class Collect:
    """Write the results file of a run evaluated by evaluate.py."""

    run: tyro.conf.Positional[Path]
    """Run directory (config.json, metrics.jsonl, run_info.jsonl)."""
    evaluation: Path
    """evaluation_metrics.json written by evaluate.py for one of the run's checkpoints."""
    output: Path | None = None
    """Results file; default: results/<run name>_<step>.json."""
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


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a torn last line from a killed run
    return rows


CURVE_KEYS = (
    "env_steps", "updates", "sps", "episode_return_mean", "episode_training_return_mean", "episode_length_mean",
    "speed_ema", "collision_ema", "train_collisions_total", "offroad_terminations_total", "episodes_total",
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


def collect(run_dir: Path, evaluation_file: Path, notes: str | None = None) -> dict:
    config = read_json(run_dir / "config.json", "run config (is this a run directory?)")
    evaluation = read_json(evaluation_file, "evaluation file")
    checkpoint = (evaluation.get("config") or {}).get("checkpoint")
    if not checkpoint:
        raise ConfigError(f"{evaluation_file}: evaluates a baseline policy, not a checkpoint of {run_dir}")
    step = int(checkpoint["step"])
    if Path(checkpoint["directory"]).resolve() != (run_dir / "checkpoints").resolve():
        raise ConfigError(f"{evaluation_file}: evaluates {checkpoint['directory']}, not a checkpoint of {run_dir}")

    # A resumed run may log a step twice (after an interruption); the later line is the one kept.
    metrics = {m["env_steps"]: m for m in _read_jsonl(run_dir / "metrics.jsonl")}
    logged = [s for s in metrics if s <= step]
    if not logged:
        raise ConfigError(f"{run_dir}/metrics.jsonl: no line at or before the evaluated step {step}")
    at_step = metrics[max(logged)]
    train_time = at_step["env_steps"] / at_step["sps"] if at_step.get("sps") else None
    sessions = [s for s in _read_jsonl(run_dir / "run_info.jsonl") if s.get("env_steps", 0) < step]
    return {
        "run": config.get("run_name") or run_dir.resolve().name,
        "preset": config["preset"],
        "seed": config["seed"],
        "cvar_risk": config["agent"]["cvar_risk"],
        "env_steps": step,
        "evaluation": evaluation["summary"],
        "evaluation_settings": evaluation["config"]["evaluation"],
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


def evaluation_label(result: dict) -> str:
    """How a row was evaluated: the protocol's action rule, `release: clip(mean)` for the release's
    (design §11); files written before evaluations said so name the rule by --deterministic."""
    summary, settings = result["evaluation"], result.get("evaluation_settings") or {}
    rule = summary.get("action_rule") or ("tanh(mean)" if settings.get("deterministic") else "sampled")
    env = summary.get("env_id")
    on = "" if env is None or env == result["config"]["env"]["env_id"] else f" on {env.rpartition(':')[2]}"
    return ("release: " if summary.get("protocol") == "release" else "") + rule + on


FIELDS = (
    ("run", lambda r: r["run"]),
    ("CVaR", lambda r: f"{r['cvar_risk']:g}"),
    ("seed", lambda r: str(r["seed"])),
    ("transitions", lambda r: kilo(r["env_steps"])),
    ("evaluation", evaluation_label),
    ("eval return", lambda r: f"{r['evaluation']['mean_return']:.1f} ± {r['evaluation']['std_return']:.1f}"),
    ("eval speed [m/s]", lambda r: f"{r['evaluation']['mean_ego_speed']:.1f}"),
    ("eval collisions", lambda r: f"{100 * r['evaluation']['collision_rate']:.0f}%"),
    ("eval offroad", lambda r: f"{100 * r['evaluation']['offroad_episode_rate']:.0f}%"),
    ("eval success", lambda r: f"{100 * r['evaluation']['success_rate']:.0f}%"),
    ("train collisions", lambda r: f"{r['training']['train_collisions_total']:,}"),
    ("transitions/s", lambda r: f"{r['training']['transitions_per_s']:.1f}"),
    ("wall time", lambda r: f"{r['training']['wall_time_s'] / 3600:.2f} h"),
)


def release_cells(row: ReleaseRow, columns: tuple[str, ...]) -> list[str]:
    """The release's row under `columns`, "—" where it published nothing."""
    ret = f"{row.mean_return:.1f}" + ("" if row.std_return is None else f" ± {row.std_return:.1f}")
    cells = {
        "run": row.label, "runs": row.label, "preset": "the release", "transitions": kilo(RELEASE_STEPS),
        "CVaR": "—" if row.cvar_risk is None else f"{row.cvar_risk:g}", "eval return": ret,
        "eval speed [m/s]": f"{row.speed:.1f}", "train collisions": f"{row.train_collisions:,}",
        "evaluation": "release: clip(mean), its env not established (design §11)",
    }  # fmt: skip
    return [cells.get(name, "—") for name in columns]


def markdown_table(columns: list[str] | tuple[str, ...], rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
                     + ["| " + " | ".join(row) + " |" for row in rows])  # fmt: skip


def markdown(fields: tuple, items: list, release: bool) -> str:
    """A Markdown table: one row per item (each field's formatter applied), then the release's rows."""
    columns = tuple(name for name, _ in fields)
    rows = [[fmt(item) for _, fmt in fields] for item in items]
    rows += [release_cells(row, columns) for row in RELEASE_ROWS] if release else []
    return markdown_table(columns, rows)


def table(results: list[dict], release: bool = False) -> str:
    return markdown(FIELDS, results, release)


BOOKKEEPING = {
    "seed", "run_name", "runs_dir", "resume", "save_buffer", "wandb_mode", "wandb_project", "log_interval",
    "checkpoint_interval", "keep_checkpoints", "eval_interval", "eval_episodes", "eval_seed", "max_steps",
}  # fmt: skip
"""Config fields that do not change what a run learns up to its evaluated step (or are the seed)."""


def _mean(group: list[dict], get) -> float:
    return float(sum(get(r) for r in group) / len(group))


MEAN_FIELDS = (
    ("preset", lambda g: g[0]["preset"]),
    ("CVaR", lambda g: f"{g[0]['cvar_risk']:g}"),
    ("transitions", lambda g: kilo(g[0]["env_steps"])),
    ("seeds", lambda g: ", ".join(str(r["seed"]) for r in g)),
    ("runs", lambda g: ", ".join(r["run"] for r in g)),
    ("evaluation", lambda g: evaluation_label(g[0])),
    ("eval return", lambda g: f"{_mean(g, lambda r: r['evaluation']['mean_return']):.1f}"),
    ("eval speed [m/s]", lambda g: f"{_mean(g, lambda r: r['evaluation']['mean_ego_speed']):.1f}"),
    ("eval collisions", lambda g: f"{100 * _mean(g, lambda r: r['evaluation']['collision_rate']):.0f}%"),
    ("eval offroad", lambda g: f"{100 * _mean(g, lambda r: r['evaluation']['offroad_episode_rate']):.0f}%"),
    ("eval success", lambda g: f"{100 * _mean(g, lambda r: r['evaluation']['success_rate']):.0f}%"),
    ("train collisions", lambda g: f"{_mean(g, lambda r: r['training']['train_collisions_total']):,.1f}"),
)


def seed_groups(results: list[dict]) -> list[list[dict]]:
    """Results grouped by everything but the seed and bookkeeping: resolved settings and evaluated step."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        try:  # fields added since the run was made take their defaults, as they would on a rerun
            config = to_dict(from_dict(TrainConfig, r["config"]))
        except (ConfigError, TypeError):
            config = r["config"]
        settings = {k: v for k, v in config.items() if k not in BOOKKEEPING}
        key = (r["preset"], r["env_steps"], r["cvar_risk"], evaluation_label(r), json.dumps(settings, sort_keys=True))
        groups.setdefault(key, []).append(r)
    return [sorted(groups[key], key=lambda r: r["seed"]) for key in sorted(groups)]


def mean_table(results: list[dict], release: bool = False) -> str:
    return markdown(MEAN_FIELDS, seed_groups(results), release)


def main(argv: list[str] | None = None) -> int:
    command = tyro.cli(
        Union[Annotated[Collect, tyro.conf.subcommand("collect")], Annotated[Table, tyro.conf.subcommand("table")]],
        args=argv,
        description=__doc__.splitlines()[0], prog="python -m racer_vec.results",
    )
    try:
        if isinstance(command, Collect):
            result = collect(command.run, command.evaluation, command.notes)
            output = command.output or Path("results") / f"{result['run']}_{result['env_steps']}.json"
            output.parent.mkdir(parents=True, exist_ok=True)
            output.write_text(json.dumps(result, indent=2) + "\n")
            print(f"wrote {output}")
        else:
            if not command.files and not command.release:
                raise ConfigError("give at least one results file (or --release for the release's rows alone)")
            records = [read_json(f, "results file") for f in command.files]
            make = mean_table if command.mean_over_seeds else table
            print(make(records, command.release))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
