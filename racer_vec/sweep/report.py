"""The sweep's report: each finished trial's final checkpoint evaluated with evaluate.py's code, its
results file, the table (one row per grid point, the results table's columns as mean ± std over its
seeds) and the learning curves (one colour per grid point: the mean over its seeds, a star per seed's
final evaluation). No Ray; JAX only inside the evaluation."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from racer_vec import plot
from racer_vec.results import collect, group_by_seed, results_table, seeds_text, steps_text
from racer_vec.sweep.cli import say
from racer_vec.sweep.grid import trial_name
from racer_vec.sweep.trial import is_finished, latest_step
from racer_vec.write_failures import WriteFailed, write_atomically


def grid_points(spec: dict, records: list[tuple[dict, dict]]) -> list[tuple[dict, list[dict]]]:
    """[(grid point without seed, its results files sorted by seed)], in the grid's order."""

    def point(config: dict) -> dict:
        return {k: v for k, v in config.items() if k != "seed"}

    groups = group_by_seed(records, key=lambda item: json.dumps(point(item[0]), sort_keys=True),
                           seed=lambda item: item[1]["seed"])  # fmt: skip
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
    then the sweep's table and plot. Returns the exit code: a write that fails (a full disk, say) is
    one line and exit 1."""
    try:
        return _write_report(spec, episodes, workers)
    except WriteFailed as exc:
        print(f"error: report: {exc}", file=sys.stderr, flush=True)
        return 1


def _write_report(spec: dict, episodes: int, workers: int) -> int:
    sweep_dir = Path(spec["sweep_dir"])
    records, missing = [], []
    for trial in spec["trials"]:
        run_dir = sweep_dir / trial["name"]
        if not is_finished(run_dir):
            missing.append(trial["name"])
            continue
        code, record = _trial_record(run_dir, trial["name"], episodes, workers)
        if code != 0:
            return code
        path = sweep_dir / "results" / f"{trial['name']}_{record['env_steps']}.json"
        write_atomically(path, json.dumps(record, indent=2) + "\n")
        records.append((trial["config"], record))
    if missing:
        say(f"report: left out {len(missing)} unfinished trial(s): {', '.join(missing)}")
    if not records:
        say("report: no finished trial to report yet")
        return 1
    table = sweep_table(spec, records, episodes)
    write_atomically(sweep_dir / "table.md", table + "\n")
    png = plot_points(spec, records, sweep_dir / "learning_curves.png")
    print("\n" + table + "\n", flush=True)
    say(f"report: {sweep_dir / 'table.md'}, {png}, results files in {sweep_dir / 'results'}")
    return 0


def _trial_record(run_dir: Path, name: str, episodes: int, workers: int) -> tuple[int, dict | None]:
    """(exit code, results file) of a finished trial: its final checkpoint evaluated (unless it was
    already, with these settings), then collected."""
    from racer_vec.run.eval_cli import EvalArgs, run_evaluation
    from racer_vec.run.evaluation import METRICS_FILE

    step = latest_step(run_dir)
    evaluation = run_dir / "eval" / str(step) / METRICS_FILE
    if not _evaluated(evaluation, episodes):
        say(f"report: evaluating {name} at {step} env steps with {episodes} episodes")
        args = EvalArgs(checkpoint=str(run_dir / "checkpoints" / str(step)), num_episodes=episodes,
                        num_workers=workers, render=False, output_dir=str(evaluation.parent))  # fmt: skip
        try:
            code = run_evaluation(args)
        finally:
            stop_multiprocessing_helpers()
        if code != 0:
            return code, None
    return 0, collect(run_dir, evaluation)


def stop_multiprocessing_helpers() -> None:
    """Stop the forkserver and resource tracker the evaluations started, now rather than just after
    this process exits: when the command returns, none of its processes is left."""
    from multiprocessing import forkserver, resource_tracker

    for helper in (forkserver._forkserver, resource_tracker._resource_tracker):
        stop = getattr(helper, "_stop", None)  # private since Python 3.8; absent: they exit with us
        if stop is not None:
            stop()
