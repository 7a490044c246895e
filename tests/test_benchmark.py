"""python -m racer_vec.benchmark: every section measured, written and printed, on a tiny preset."""

import dataclasses
import json
import subprocess
import sys

import pytest

import configs
from racer_vec import benchmark, benchmark_compare


@pytest.fixture
def tiny_preset(monkeypatch):
    base = configs.PRESETS["highway_fast"]
    tiny = dataclasses.replace(
        base,
        agent=dataclasses.replace(base.agent, hidden_dims=(32, 32), pointnet_dim=16, num_atoms=21),
        batch_size=32, utd_ratio=2, buffer_size=1000, start_training=200,
    )
    monkeypatch.setitem(configs.PRESETS, "tiny", tiny)
    return tiny


@pytest.mark.slow
def test_benchmark_measures_writes_and_prints_every_section(tiny_preset, tmp_path, capsys):
    output = tmp_path / "out" / "bench.json"
    code = benchmark.main(["tiny", "--workers", "2", "--seconds", "0.5", "--warmup-seconds", "0.3",
                           "--sims", "fast", "--output", str(output)])
    assert code == 0
    report = json.loads(output.read_text())
    assert report["machine"]["cores"] >= 1 and report["machine"]["packages"]["highway-env"] == "1.12.1"

    assert [(r["sim"], r["workers"]) for r in report["env_only"]] == [("fast", 2)]
    assert all(r["transitions_per_s"] > 0 for r in report["env_only"])

    learner = report["learner"]
    assert (learner["batch_size"], learner["utd_ratio"]) == (32, 2)
    assert learner["critic_updates_per_s"] == pytest.approx(2 * learner["agent_updates_per_s"])
    assert learner["ms_per_agent_update"] == pytest.approx(1000 / learner["agent_updates_per_s"])
    assert learner["compile_seconds"] > 0

    shared = report["machine"]["cores"] < 2 + 2
    for row, workers in zip(report["end_to_end"], (2,), strict=True):
        assert row["workers"] == workers and row["updates_per_iteration"] == 1  # highway_fast's schedule
        assert row["transitions_per_s"] == pytest.approx(1000 * workers / row["iteration_ms"])
        bound_ms = row["simulate_ms"] + row["learn_ms"] if shared else max(row["simulate_ms"], row["learn_ms"])
        assert row["bound_efficiency"] == pytest.approx(bound_ms / row["iteration_ms"])
        assert row["bound"].startswith("simulate + learn" if shared else "max(")
        # a loop slower than 3x its bound, or faster than a third of it, is not measuring the loop
        assert 0.33 < row["bound_efficiency"] < 3.0

    out = capsys.readouterr().out
    assert "| end to end: workers |" in out and "| fast simulator |" in out and f"wrote {output}" in out


@pytest.mark.parametrize("args, message", [
    (["no_such_preset"], "PRESET 'no_such_preset'"),
    (["highway_fast", "--workers", "0"], "--workers"),
    (["highway_fast", "--output", "/proc/nope/bench.json"], "--output /proc/nope/bench.json"),
    (["--compare", "no-such-commit-xyz"], "--compare no-such-commit-xyz"),
    (["--compare", "HEAD", "--rounds", "0"], "--rounds"),
])
def test_bad_input_is_one_line_and_exit_2(args, message, capsys):
    # in this process: main's code is the module's exit status (the test below runs the module itself)
    assert benchmark.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_the_module_exits_with_mains_code():
    result = subprocess.run([sys.executable, "-m", "racer_vec.benchmark", "highway_fast", "--workers", "0"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "--workers" in result.stderr


def test_compare_summary_pairs_each_round():
    rates = {"reference": [10.0, 8.0, 12.0], "working_tree": [13.0, 12.0, 12.0]}
    row = benchmark_compare._summary(rates)
    assert row["ratios"] == pytest.approx([1.3, 1.5, 1.0])
    assert row["ratio_median"] == pytest.approx(1.3) and row["ratio_range"] == pytest.approx([1.0, 1.5])
    assert (row["reference_median"], row["working_tree_median"]) == (10.0, 12.0)


@pytest.mark.slow
def test_compare_sides_import_their_own_tree():
    """The reference side runs a git worktree's code, the working tree's side this checkout's."""
    head = subprocess.run(["git", "-C", str(benchmark_compare.ROOT), "rev-parse", "HEAD"],
                          capture_output=True, text=True).stdout.strip()
    if not head:
        pytest.skip("not a git checkout")
    with benchmark_compare.reference_worktree("HEAD") as path:
        sides = [benchmark_compare.Side("reference", path), benchmark_compare.Side("working_tree", benchmark_compare.ROOT)]
        try:
            for side in sides:
                assert side.info["commit"] == head
                assert any(f.endswith("racer_vec/learner/agent.py") for f in side.info["files"])
                assert all(f.startswith(f"{side.root}/") for f in side.info["files"])
        finally:
            for side in sides:
                side.close()
    assert not path.exists()
