"""python -m racer_vec.plot: learning curves from runs' metrics.jsonl or results files."""

import json
import os
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest

from racer_vec import plot


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_plot_writes_a_png_from_a_tiny_run(tiny_run, tmp_path):
    # a second run with another risk level: the same metrics under another name
    other = tmp_path / "other"
    shutil.copytree(tiny_run, other, ignore=shutil.ignore_patterns("checkpoints", "wandb"))
    config = json.loads((other / "config.json").read_text())
    config["run_name"], config["agent"]["cvar_risk"] = "other", 0.8
    (other / "config.json").write_text(json.dumps(config))

    output = tmp_path / "figs" / "curves.png"
    result = subprocess.run(
        [sys.executable, "-m", "racer_vec.plot", str(tiny_run), str(other), "--output", str(output)],
        capture_output=True, text=True, timeout=120,
        env={k: v for k, v in os.environ.items() if k not in ("DISPLAY", "MPLBACKEND")},  # headless
    )
    assert result.returncode == 0, result.stderr
    width, height = png_size(output)
    assert width >= 1600 and height >= 700

    runs = [plot.load_run(tiny_run), plot.load_run(other)]
    assert [r.label for r in runs] == ["tiny (CVaR 0.5)", "other (CVaR 0.8)"]
    steps, evals = runs[0].series("eval/mean_return")
    assert list(steps) == [200, 400] and np.isfinite(evals).all()  # the tiny run evaluates every 200 steps


def test_resumed_and_torn_metrics_are_read_once_per_step(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    lines = [{"env_steps": s, "episode_return_mean": float(s)} for s in (100, 200, 300)]
    lines += [{"env_steps": 300, "episode_return_mean": -1.0}, {"env_steps": 400, "episode_return_mean": 4.0}]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(m) for m in lines) + '\n{"env_steps": 5')
    loaded = plot.load_run(run)
    steps, values = loaded.series("episode_return_mean")
    assert list(steps) == [100, 200, 300, 400] and list(values) == [100, 200, -1, 4]
    assert loaded.name == "run"


def test_moving_average_is_trailing_and_keeps_every_point():
    values = np.array([1.0, 3.0, 5.0, 7.0])
    assert list(plot.moving_average(values, 2)) == [1.0, 2.0, 4.0, 6.0]
    assert list(plot.moving_average(values, 1)) == list(values)


@pytest.mark.parametrize("make, message", [
    (lambda d: d, "no metrics.jsonl"),
    (lambda d: d / "missing", "not a directory"),
    (lambda d: (d / "metrics.jsonl").write_text("") or d, "empty"),
    (lambda d: (d / "old.json").write_text('{"run": "old"}') and d / "old.json", "no learning curve"),
])
def test_a_run_without_metrics_is_one_line_and_exit_2(tmp_path, capsys, make, message):
    target = make(tmp_path)
    code = plot.main([str(target), "--output", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and message in err and str(target) in err
    assert not (tmp_path / "x.png").exists()


def test_results_files_of_one_run_merge_into_one_line(tmp_path):
    def results_file(name, run, cvar_risk, steps, collision_rate):
        record = {"run": run, "preset": "highway_fast", "cvar_risk": cvar_risk, "env_steps": steps[-1],
                  "evaluation": {"collision_rate": collision_rate},
                  "curve": [{"env_steps": s, "speed_ema": s / 1000} for s in steps]}  # fmt: skip
        (tmp_path / name).write_text(json.dumps(record))
        return plot.load_run(tmp_path / name)

    early = results_file("a_2.json", "a", 0.5, [1000, 2000], 0.25)
    late = results_file("a_4.json", "a", 0.5, [1000, 2000, 3000, 4000], 0.0)
    other = results_file("a_other.json", "a", 0.8, [1000], 1.0)  # same name, another risk level
    runs = plot.merge_runs([late, other, early])
    assert [(r.name, r.cvar_risk) for r in runs] == [("a", 0.5), ("a", 0.8)]
    merged = runs[0]
    assert list(merged.series("speed_ema")[0]) == [1000, 2000, 3000, 4000]
    assert [(f["env_steps"], f["collision_rate"]) for f in merged.finals] == [(2000, 0.25), (4000, 0.0)]
    assert plot.main([str(tmp_path / n) for n in ("a_4.json", "a_2.json", "a_other.json")]
                     + ["--output", str(tmp_path / "merged.png")]) == 0  # fmt: skip
    assert png_size(tmp_path / "merged.png")[0] >= 1600


@pytest.mark.parametrize(
    "data, expected",
    [
        ((-0.04, 0.04), (-1.0, 11.0)),  # a flat 0%: no negative rates
        ((96.0, 104.0), (89.0, 101.0)),  # a flat 100%: nothing above 100%
        ((2.0, 40.0), (1.0, 41.0)),  # a real range is kept
        ((-5.0, 120.0), (-1.0, 101.0)),
    ],
)
def test_rate_panels_stay_within_0_and_100_percent(data, expected):
    assert plot.percent_limits(*data) == pytest.approx(expected)


def test_tradeoff_figure_from_results_files(tmp_path):
    def record(name, risk, release_target, speed, ret, collisions, speed_action=False, cap=False):
        return {"run": name, "env_steps": 240000, "cvar_risk": risk,
                "config": {"agent": {"bootstrap_terminations": release_target, "learned_limit": cap,
                                     "limited_action": "speed" if cap else "steering"},
                           "env": {"target_speed_action": speed_action}},
                "evaluation": {"mean_ego_speed": speed, "mean_return": ret},
                "training": {"train_collisions_total": collisions}}  # fmt: skip

    files = []
    records = [record("a", 0.5, False, 22.8, 62.7, 46), record("b", 0.5, True, 29.1, 53.5, 154),
               record("c", 0.5, False, 24.0, 60.0, 20, speed_action=True, cap=True),
               record("d", 0.5, False, 25.0, 61.0, 30, speed_action=True)]  # fmt: skip
    for i, r in enumerate(records):
        files.append(tmp_path / f"{i}.json")
        files[-1].write_text(json.dumps(r))
    points = plot.tradeoff_points([json.loads(f.read_text()) for f in files])
    assert [(p["target"], p["speed"], p["collisions"]) for p in points] == [
        ("masked target", 22.8, 46), ("release's target (no mask)", 29.1, 154),
        ("masked target, learned speed cap", 24.0, 20), ("masked target, target-speed action", 25.0, 30)]
    assert plot.trajectories(points) == []
    output = tmp_path / "tradeoff.png"
    assert plot.main(["--tradeoff", *map(str, files), "--output", str(output)]) == 0
    assert output.stat().st_size > 10_000
    assert plot.main(["--tradeoff", str(tmp_path / "nope.json"), "--output", str(output)]) == 2


def test_tradeoff_joins_one_runs_evaluations_in_step_order():
    """A resumed run keeps its first start, so its files join; a rerun under the same name does not."""
    def record(steps, started, collisions):
        return {"run": "a", "env_steps": steps, "cvar_risk": 0.5, "config": {"agent": {}},
                "evaluation": {"mean_ego_speed": 20.0, "mean_return": 50.0},
                "training": {"train_collisions_total": collisions},
                "sessions": [{"started": started}] + ([{"started": "resumed"}] if steps > 120000 else [])}  # fmt: skip

    points = plot.tradeoff_points([record(240000, "t0", 46), record(120000, "t0", 23), record(120000, "t1", 29)])
    (path,) = plot.trajectories(points)
    assert [(p["env_steps"], p["collisions"]) for p in path] == [(120000, 23), (240000, 46)]
    # the legend names each run once, with its start where a rerun shares its name; each point says
    # only its step
    assert list(plot.run_labels(points).values()) == ["a (CVaR 0.5, started t0)", "a (CVaR 0.5, started t1)"]
    assert list(plot.run_labels(points[:2]).values()) == ["a (CVaR 0.5)"]
    assert [p["step"] for p in points] == ["240k", "120k", "120k"]
    assert [plot.step_label(n) for n in (800_000, 1_000_000, 1_600_000)] == ["800k", "1M", "1.6M"]
    deterministic = {**record(240000, "t0", 46), "evaluation_settings": {"deterministic": True}}
    assert plot.tradeoff_points([deterministic])[0]["step"] == "240k (deterministic)"
