"""Learning curves of one or more runs, from their metrics.jsonl, against environment transitions.

    python -m racer_vec.plot runs/a runs/b --output curves.png
    python -m racer_vec.plot results/a_120000.json results/b_120000.json   # from results files
    python -m racer_vec.plot --tradeoff results/hf_*.json --output docs/speed_vs_safety.png

A results file (`racer_vec.results collect`) holds its run's curve up to the evaluated step, so
committed figures can be redrawn without the run directories. Results files of the same run (say at
120k and 240k transitions), with or without its run directory, are drawn as one line with a star
for each file's evaluation.

One figure, one line per run (labelled by run name and cvar_risk). Top row: training (episode
return, speed, collision rate, cumulative collisions); bottom row: the periodic evaluations, where
the runs have them. Episode returns are a moving average over `--smooth` log intervals; speed and
collision rate are the trainer's own EMAs (weight 0.01 per vector step and per finished episode).
"""

from __future__ import annotations

import dataclasses
import io
import json
import sys
from pathlib import Path

import numpy as np
import tyro

from racer_vec.config import ConfigError
from racer_vec.results import RELEASE_ROWS, RELEASE_STEPS, read_json
from racer_vec.run.jsonl import read_jsonl
from racer_vec.write_failures import WriteFailed, check_output_file, error_exit, write_atomically


@dataclasses.dataclass(frozen=True)
class PlotArgs:
    runs: tyro.conf.Positional[tuple[Path, ...]]
    """Run directories (each with metrics.jsonl and config.json) or results files (*.json)."""
    output: Path = Path("learning_curves.png")
    """PNG file to write."""
    smooth: int = 10
    """Moving-average window for episode returns, in log intervals (1: no smoothing)."""
    title: str | None = None
    """Figure title; default: the presets of the runs."""
    tradeoff: bool = False
    """Instead of learning curves: every results file as a point, evaluation speed and return
    against training collisions, beside the release's published rows (design §11)."""


@dataclasses.dataclass(frozen=True)
class Run:
    name: str
    preset: str
    cvar_risk: float
    metrics: list[dict]
    finals: tuple[dict, ...] = ()
    """The results files' own evaluations: `env_steps` and the evaluate.py summary of each."""

    @property
    def label(self) -> str:
        return f"{self.name} (CVaR {self.cvar_risk:g})"

    def series(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """(env_steps, values) of the lines that have `key`."""
        rows = [(m["env_steps"], m[key]) for m in self.metrics if m.get(key) is not None]
        if not rows:
            return np.zeros(0), np.zeros(0)
        steps, values = np.array(rows, dtype=np.float64).T
        return steps, values


def load_run(run_dir: Path) -> Run:
    if run_dir.suffix == ".json" and run_dir.is_file():
        return load_results_file(run_dir)
    metrics_path = run_dir / "metrics.jsonl"
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir}: not a directory")
    if not metrics_path.is_file():
        raise ConfigError(f"{run_dir}: no metrics.jsonl (not a run directory, or the run logged nothing yet)")
    metrics = read_jsonl(metrics_path)  # a torn line (a run killed mid-write) is skipped with a warning
    if not metrics:
        raise ConfigError(f"{metrics_path}: empty (the run logged nothing yet)")
    try:
        config = json.loads((run_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        config = {}
    # A resumed run appends to metrics.jsonl and repeats the steps logged after its checkpoint:
    # the later line of a step is the one kept.
    by_step = {m["env_steps"]: m for m in metrics}
    return Run(
        name=config.get("run_name") or run_dir.resolve().name,
        preset=config.get("preset", "?"),
        cvar_risk=float(config.get("agent", {}).get("cvar_risk", float("nan"))),
        metrics=[by_step[s] for s in sorted(by_step)],
    )


def load_results_file(path: Path) -> Run:
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: unreadable results file ({exc})") from None
    if not isinstance(record, dict) or not record.get("curve"):
        raise ConfigError(f"{path}: no learning curve in this file (not a results file, or written before they held one)")
    return Run(
        name=record.get("run", path.stem),
        preset=record.get("preset", "?"),
        cvar_risk=float(record.get("cvar_risk", float("nan"))),
        metrics=record["curve"],
        finals=({"env_steps": record.get("env_steps"), **record.get("evaluation", {})},),
    )


def merge_runs(runs: list[Run]) -> list[Run]:
    """One Run per run: a run given more than once (its directory and results files, or results
    files at several steps) becomes one line with every final evaluation; a later source wins a
    step both log. Runs that only share a name (another preset or risk level) stay apart."""
    merged: dict[tuple, Run] = {}
    for run in runs:
        key = (run.name, run.preset, run.cvar_risk)
        if key in merged:
            first = merged[key]
            by_step = {m["env_steps"]: m for m in (*first.metrics, *run.metrics)}
            finals = {f["env_steps"]: f for f in (*first.finals, *run.finals)}
            run = dataclasses.replace(
                first, metrics=[by_step[s] for s in sorted(by_step)], finals=tuple(finals[s] for s in sorted(finals))
            )
        merged[key] = run
    return list(merged.values())


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over up to `window` points (shorter at the start, so no point is dropped)."""
    if window <= 1 or values.size == 0:
        return values
    csum = np.cumsum(np.insert(values, 0, 0.0))
    idx = np.arange(1, values.size + 1)
    lo = np.maximum(idx - window, 0)
    return (csum[idx] - csum[lo]) / (idx - lo)


# (metrics key, panel title, y-axis label, scale, smoothed)
TRAIN_PANELS = (
    ("episode_return_mean", "Training episode return", "env return per episode", 1.0, True),
    ("speed_ema", "Training speed (EMA)", "forward speed [m/s]", 1.0, False),
    ("collision_ema", "Training collision rate (EMA)", "episodes ending in a crash [%]", 100.0, False),
    ("train_collisions_total", "Cumulative training collisions", "crashes [count]", 1.0, False),
)
EVAL_PANELS = (
    ("eval/mean_return", "Evaluation return", "env return per episode", 1.0, False),
    ("eval/mean_ego_speed", "Evaluation speed", "mean forward speed [m/s]", 1.0, False),
    ("eval/collision_rate", "Evaluation collision rate", "episodes ending in a crash [%]", 100.0, False),
    ("eval/success_rate", "Evaluation success rate", "episodes without crash or offroad [%]", 100.0, False),
)


def plot_runs(runs: list[Run], output: Path, smooth: int = 10, title: str | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # headless: no display needed
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 4, figsize=(20, 8.5), constrained_layout=True)
    stars = False
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for row, panels in enumerate((TRAIN_PANELS, EVAL_PANELS)):
        for ax, (key, panel_title, ylabel, scale, smoothed) in zip(axes[row], panels):
            drawn = False
            for i, run in enumerate(runs):
                color = colors[i % len(colors)]
                steps, values = run.series(key)
                if steps.size:
                    if smoothed:
                        values = moving_average(values, smooth)
                    style = {"marker": "o", "markersize": 4} if row == 1 else {}
                    ax.plot(steps, values * scale, color=color, label=run.label, **style)
                    drawn = True
                for final in run.finals if row == 1 else ():
                    value = final.get(key.removeprefix("eval/"))
                    if value is not None:
                        ax.plot(final["env_steps"], value * scale, marker="*", markersize=14, color=color,
                                markeredgecolor="black", linestyle="none")  # fmt: skip
                        drawn = stars = True
            ax.set_title(panel_title)
            ax.set_xlabel("environment transitions")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(_thousands))
            if drawn and scale == 100.0:
                ax.set_ylim(*percent_limits(*ax.get_ylim()))
            if not drawn:
                ax.text(0.5, 0.5, "no data in these runs", ha="center", va="center", transform=ax.transAxes)
    for ax in axes[1]:  # evaluations are sparse: show them against the whole training
        ax.set_xlim(axes[0, 0].get_xlim())
    handles, labels = axes[0, 0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 4), title="run (risk level)")
    presets = ", ".join(sorted({r.preset for r in runs}))
    window = f"moving average over {smooth} log intervals" if smooth > 1 else "not smoothed"
    fig.suptitle(
        f"{title or presets}\n"
        f"Episode return: {window}; speed and collision rate: EMA (weight 0.01); "
        f"evaluation: the periodic deterministic evaluations (--eval-episodes each)"
        + ("\n★: a results file's evaluation by evaluate.py (stochastic actions)" if stars else ""),
        fontsize=12,
    )
    save_figure(fig, output)
    return output


# label placement (points): CVaR 0.5 sits at the axes' right edge, CVaR 0.8 and SAC close together
RELEASE_LABEL_OFFSETS = {"release: CVaR 0.5": (-10, -14), "release: CVaR 0.8": (-8, 8), "release: SAC": (8, -14)}


MARKERS = {
    "masked target": "o", "masked target, target-speed action": "^", "masked target, learned speed cap": "D",
    "release's target (no mask)": "s", "release's target (no mask), target-speed action": "v",
    "release's target (no mask), learned speed cap": "P",
}  # fmt: skip


def agent_kind(config: dict) -> str:
    """A run's marker in the figure: its target (design §4.3, §14), and RACER's target-speed action
    with or without the learned cap on it (§4.1)."""
    agent, env = config["agent"], config.get("env", {})
    kind = "release's target (no mask)" if agent.get("bootstrap_terminations", False) else "masked target"
    if env.get("target_speed_action", False):
        capped = agent.get("learned_limit", True) and agent.get("limited_action") == "speed"
        kind += ", learned speed cap" if capped else ", target-speed action"
    return kind


def tradeoff_points(records: list[dict]) -> list[dict]:
    """One point per results file: its evaluation speed and return, its training collisions."""
    points = []
    for r in records:
        try:
            points.append({
                "run": r["run"],
                "step": step_label(r["env_steps"])
                + (" (deterministic)" if (r.get("evaluation_settings") or {}).get("deterministic") else ""),
                "cvar_risk": r["cvar_risk"],
                "target": agent_kind(r["config"]),
                "speed": r["evaluation"]["mean_ego_speed"],
                "return": r["evaluation"]["mean_return"],
                "collisions": r["training"]["train_collisions_total"],
                # one training run across its results files: resumes keep the first start (a rerun under
                # the same name does not)
                "run_id": (r["run"], (r.get("sessions") or [{}])[0].get("started")),
                "env_steps": r["env_steps"],
            })  # fmt: skip
        except (KeyError, TypeError) as exc:
            raise ConfigError(f"{r.get('run', '?')}: not a results file ({exc} missing)") from None
    return points


def step_label(env_steps: float) -> str:
    return f"{env_steps / 1e6:g}M" if abs(env_steps) >= 1_000_000 else f"{env_steps / 1000:g}k"


def run_labels(points: list[dict]) -> dict[tuple, str]:
    """The legend's name of each training run: its name and risk, and its first start where a rerun
    shares the name."""
    first = {}
    for p in points:
        first.setdefault(p["run_id"], p)
    names = [p["run"] for p in first.values()]
    labels = {}
    for run, p in first.items():
        rerun = f", started {run[1]}" if names.count(p["run"]) > 1 and run[1] else ""
        labels[run] = f"{p['run']} (CVaR {p['cvar_risk']:g}{rerun})"
    return labels


def trajectories(points: list[dict]) -> list[list[dict]]:
    """The points of each training run evaluated at two or more steps, in step order: the path one
    agent takes through the figure as it trains on."""
    runs: dict[tuple, list[dict]] = {}
    for p in points:
        runs.setdefault(p["run_id"], []).append(p)
    return [sorted(ps, key=lambda p: p["env_steps"]) for ps in runs.values() if len(ps) > 1]


def plot_tradeoff(records: list[dict], output: Path, title: str | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = tradeoff_points(records)
    paths = trajectories(points)
    # one colour per training run, named once in the legend; each point says only its step, so that
    # points that sit close together stay readable
    labels = run_labels(points)
    palette = [plt.cm.tab10(i) for i in range(10) if i != 3]  # tab10's red is taken by the release's stars
    colours = {run: palette[i % len(palette)] for i, run in enumerate(labels)}
    fig, axes = plt.subplots(1, 2, figsize=(15, 6.5), layout="constrained")
    for ax, key, name in ((axes[0], "speed", "evaluation speed [m/s]"), (axes[1], "return", "evaluation return")):
        for path in paths:
            ax.plot([p["collisions"] for p in path], [p[key] for p in path], color=colours[path[0]["run_id"]],
                    lw=1.2, alpha=0.7, zorder=2)  # fmt: skip
        for p in points:
            colour = colours[p["run_id"]]
            ax.scatter(p["collisions"], p[key], color=colour, marker=MARKERS[p["target"]], s=70,
                       edgecolor="black", linewidth=0.5, zorder=3)  # fmt: skip
            ax.annotate(p["step"], (p["collisions"], p[key]), textcoords="offset points", xytext=(5, 4),
                        fontsize=8, color=colour)  # fmt: skip
        for row in RELEASE_ROWS:
            value = row.speed if key == "speed" else row.mean_return
            ax.scatter(row.train_collisions, value, marker="*", s=260, color="crimson", edgecolor="black", zorder=4)
            dx, dy = RELEASE_LABEL_OFFSETS[row.label]
            ax.annotate(f"{row.label} @ {step_label(RELEASE_STEPS)}", (row.train_collisions, value),
                        textcoords="offset points", xytext=(dx, dy),
                        ha="left" if dx > 0 else "right", fontsize=8, color="crimson")  # fmt: skip
        ax.set_xscale("symlog", linthresh=10)
        ax.set_xlabel("training collisions (total up to the evaluated step)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    targets = {p["run_id"]: p["target"] for p in points}
    handles = [plt.Line2D([], [], ls="", marker=MARKERS[targets[run]], color=colours[run], markeredgecolor="black",
                          label=label) for run, label in labels.items()]  # fmt: skip
    handles += [plt.Line2D([], [], ls="", marker=m, color="white", markeredgecolor="black", label=t)
                for t, m in MARKERS.items() if any(p["target"] == t for p in points)]  # fmt: skip
    handles.append(plt.Line2D([], [], ls="", marker="*", markersize=14, color="crimson", label="the release's table"))
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 4))
    fig.suptitle((title or "Speed and return against training collisions: up and left is better")
                 + ("\nlines join one run's evaluations as it trains on" if paths else ""),
                 fontsize=12)  # fmt: skip
    save_figure(fig, output)
    return output


def save_figure(fig, output: Path) -> None:
    """The figure as a PNG, written beside an older `output` and renamed over it (WriteFailed names
    `output` when that fails, and the older file stays as it was)."""
    import matplotlib.pyplot as plt

    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=100)
    plt.close(fig)
    write_atomically(output, image.getvalue())


def percent_limits(lo: float, hi: float, min_span: float = 10.0, pad: float = 1.0) -> tuple[float, float]:
    """y-limits of a rate panel: inside 0-100% (plus `pad` so markers on the bounds show) and at
    least `min_span` points tall, so that a flat 0% or 100% does not get ticks like -0.04% or 104%."""
    lo, hi = max(lo, 0.0), min(hi, 100.0)
    if hi - lo < min_span:
        lo = min(max((lo + hi - min_span) / 2, 0.0), 100.0 - min_span)
        hi = lo + min_span
    return lo - pad, hi + pad


def _thousands(x: float, _pos) -> str:
    return step_label(x) if abs(x) >= 1000 else f"{x:g}"


def main(argv: list[str] | None = None) -> int:
    args = tyro.cli(PlotArgs, args=argv, description=__doc__.splitlines()[0], prog="python -m racer_vec.plot")
    try:
        if not args.runs:
            raise ConfigError("give at least one run directory")
        if args.smooth < 1:
            raise ConfigError(f"--smooth must be at least 1, got {args.smooth}")
        if args.output.suffix.lower() != ".png":
            raise ConfigError(f"--output {args.output}: must end in .png")
        check_output_file("--output", args.output)
        if args.tradeoff:
            records = [read_json(Path(f), "results file") for f in args.runs]
            path = plot_tradeoff(records, args.output, title=args.title)
        else:
            runs = merge_runs([load_run(Path(d)) for d in args.runs])
            path = plot_runs(runs, args.output, smooth=args.smooth, title=args.title)
    except (ConfigError, WriteFailed) as exc:
        return error_exit(exc)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
