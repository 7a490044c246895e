"""python -m racer_vec.results: a results file from an evaluated run, and the Markdown table."""

import json
import sys
from pathlib import Path

import pytest

from racer_vec import plot, results

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import evaluate  # noqa: E402


@pytest.fixture(scope="module")
def evaluation(tiny_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eval")
    code = evaluate.main(["--checkpoint", str(tiny_run / "checkpoints" / "200"), "--num-episodes", "2",
                          "--num-workers", "1", "--no-render", "--output-dir", str(out)])
    assert code == 0
    return out / "evaluation_metrics.json"


def test_collect_and_table(tiny_run, evaluation, tmp_path, capsys):
    output = tmp_path / "results" / "tiny.json"
    note = "sessions 1-2 on different commits; no number differs between them"
    args = ["collect", str(tiny_run), "--evaluation", str(evaluation), "--output", str(output), "--notes", note]
    assert results.main(args) == 0
    record = json.loads(output.read_text())
    assert record["notes"] == note
    summary = json.loads(evaluation.read_text())["summary"]
    metrics = {m["env_steps"]: m for m in map(json.loads, (tiny_run / "metrics.jsonl").read_text().splitlines())}

    assert record["run"] == "tiny" and record["preset"] == "highway_fast" and record["env_steps"] == 200
    assert record["evaluation"] == summary and record["evaluation"]["num_episodes"] == 2
    # training totals at the evaluated checkpoint, not at the end of the run
    assert record["training"]["train_collisions_total"] == metrics[200]["train_collisions_total"]
    assert record["training"]["episodes_total"] == metrics[200]["episodes_total"] < metrics[400]["episodes_total"]
    assert record["training"]["transitions_per_s"] == metrics[200]["sps"] > 0
    assert record["config"]["agent"]["hidden_dims"] == [32, 32]
    (session,) = record["sessions"]
    assert session["env_steps"] == 0 and len(session["commit"]) == 40 and session["machine"]["cores"] >= 1
    # the learning curve up to the evaluated step, which the plot draws from the file alone
    assert [row["env_steps"] for row in record["curve"]] == [s for s in sorted(metrics) if s <= 200]
    last = record["curve"][-1]
    assert last["train_collisions_total"] == metrics[200]["train_collisions_total"]
    assert last["eval/mean_return"] == pytest.approx(metrics[200]["eval/mean_return"], rel=1e-5)
    assert "actor_loss" not in last
    run = plot.load_run(output)
    assert run.label == "tiny (CVaR 0.5)"
    assert list(run.series("speed_ema")[0]) == [row["env_steps"] for row in record["curve"]]
    (final,) = run.finals
    assert final["env_steps"] == 200 and final["collision_rate"] == summary["collision_rate"]
    assert plot.plot_runs([run], tmp_path / "from_results.png").stat().st_size > 10_000

    capsys.readouterr()
    assert results.main(["table", str(output), str(output)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and lines[0].startswith("| run | CVaR |")
    assert lines[2].startswith("| tiny | 0.5 | 0 | 0.2k |")
    assert f"| {100 * summary['collision_rate']:.0f}% | {100 * summary['offroad_episode_rate']:.0f}% |" in lines[2]


def test_evaluation_of_another_run_is_refused(tiny_run, evaluation, tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text((tiny_run / "config.json").read_text())
    code = results.main(["collect", str(other), "--evaluation", str(evaluation)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "not a checkpoint of" in err


def test_missing_files_are_one_line_and_exit_2(tmp_path, capsys):
    code = results.main(["collect", str(tmp_path), "--evaluation", str(tmp_path / "e.json")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "config.json" in err


def test_mean_over_seeds_groups_runs_that_differ_only_in_seed(tiny_run, evaluation, tmp_path, capsys):
    assert results.main(["collect", str(tiny_run), "--evaluation", str(evaluation), "--output",
                         str(tmp_path / "s0.json")]) == 0  # fmt: skip
    base = json.loads((tmp_path / "s0.json").read_text())
    base["evaluation"]["collision_rate"], base["training"]["train_collisions_total"] = 0.5, 10
    base["evaluation"]["offroad_episode_rate"] = 0.1

    def variant(name, seed, collision_rate, collisions, **agent):
        record = json.loads(json.dumps(base))
        record["run"], record["seed"], record["config"]["seed"] = name, seed, seed
        record["config"]["run_name"] = name
        record["evaluation"]["collision_rate"], record["training"]["train_collisions_total"] = collision_rate, collisions
        record["config"]["agent"].update(agent)
        record["cvar_risk"] = record["config"]["agent"]["cvar_risk"]
        return record

    seed1 = variant("tiny_s1", 1, 0.25, 20)
    del seed1["config"]["agent"]["bootstrap_terminations"]  # written before the field existed: its default
    records = [base, seed1, variant("risky", 0, 1.0, 99, cvar_risk=0.8),
               variant("ablation", 1, 0.0, 5, bootstrap_terminations=True)]  # fmt: skip
    groups = results.seed_groups(records)
    assert sorted([r["run"] for r in g] for g in groups) == [["ablation"], ["risky"], ["tiny", "tiny_s1"]]

    files = []
    for r in records:
        files.append(tmp_path / f"{r['run']}.json")
        files[-1].write_text(json.dumps(r))
    capsys.readouterr()
    assert results.main(["table", *map(str, files), "--mean-over-seeds"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 + 3 and lines[0].startswith("| preset | CVaR | transitions | seeds |")
    (pair,) = [line for line in lines if "tiny, tiny_s1" in line]
    # mean ± std over the two seeds: collisions 50% and 25%, offroad 10% both, train collisions 10 and 20
    assert "| 0, 1 |" in pair and "| 38 ± 12% | 10 ± 0% |" in pair and "| 15.0 ± 5.0 |" in pair


def test_provenance_names_the_cpu_model_and_cache(tmp_path, monkeypatch):
    """Hosts reporting the same CPU name ran the same command to different numbers: a session's
    machine record keeps the family, model, stepping and cache that tell them apart."""
    from racer_vec.run import provenance

    fake = tmp_path / "cpuinfo"
    fake.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\n"
                    "model name\t: AMD EPYC\nstepping\t: 1\ncache size\t: 1024 KB\n\n"
                    "processor\t: 1\ncpu family\t: 99\nmodel name\t: other\n")  # fmt: skip
    assert provenance.cpuinfo(str(fake))["cpu family"] == "25"
    monkeypatch.setattr(provenance.cpuinfo, "__defaults__", (str(fake),))
    machine = provenance.machine_info()
    assert (machine["cpu"], machine["cpu_model"], machine["cpu_cache"]) == (
        "AMD EPYC", "family 25 model 17 stepping 1", "1024 KB")
    assert provenance.cpuinfo(str(tmp_path / "none")) == {}


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip("|").split("|")]


def _markdown_rows(out: str) -> list[dict[str, str]]:
    header, _, *rows = out.strip().splitlines()
    return [dict(zip(_cells(header), _cells(row), strict=True)) for row in rows]


def test_release_rows_sit_under_the_columns_they_belong_to(capsys):
    assert results.main(["table", "--release"]) == 0
    table = _markdown_rows(capsys.readouterr().out)
    assert [row["run"] for row in table] == ["release: CVaR 0.5", "release: CVaR 0.8", "release: SAC"]
    cvar05, cvar08, sac = table
    assert cvar05["eval return"] == "102.4 ± 35.2" and cvar05["eval speed [m/s]"] == "39.1"
    assert cvar05["train collisions"] == "2,057" and cvar05["transitions"] == "1600k" and cvar05["CVaR"] == "0.5"
    assert cvar08["eval return"] == "56.0" and cvar08["train collisions"] == "543" and cvar08["CVaR"] == "0.8"
    assert sac["CVaR"] == "—" and sac["eval speed [m/s]"] == "24.5" and sac["eval collisions"] == "—"

    assert results.main(["table", "--release", "--mean-over-seeds"]) == 0
    first = _markdown_rows(capsys.readouterr().out)[0]
    assert first["runs"] == "release: CVaR 0.5" and first["eval return"] == "102.4 ± 35.2" and first["seeds"] == "—"


def test_table_without_files_or_release_is_one_line_and_exit_2(capsys):
    code = results.main(["table"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--release" in err


def test_a_baseline_s_results_file_tabulates_beside_files_written_before_the_diagnostics(tmp_path, capsys):
    assert evaluate.main(["--policy", "idm", "--preset", "highway_fast", "--duration", "1", "--num-episodes", "2",
                          "--num-workers", "1", "--no-render", "--output-dir", str(tmp_path / "e")]) == 0  # fmt: skip
    evaluation = tmp_path / "e" / "evaluation_metrics.json"
    output = tmp_path / "idm.json"
    assert results.main(["collect", "--evaluation", str(evaluation), "--output", str(output)]) == 0
    record = json.loads(output.read_text())
    summary = json.loads(evaluation.read_text())["summary"]
    assert record["run"] == "idm40_highway_fast" and record["preset"] == "highway_fast"
    assert (record["cvar_risk"], record["env_steps"], record["training"], record["curve"]) == (None, 0, None, [])
    assert record["evaluation"] == summary and record["config"]["env"]["duration"] == 1
    assert len(record["evaluation_provenance"]["commit"]) == 40 and record["evaluation_provenance"]["machine"]["cores"]

    record["evaluation"] |= {"mean_lane_changes": 1.25, "mean_overtakes": -2.5, "mean_distance": 1234.4}
    output.write_text(json.dumps(record))
    old = ROOT / "results" / "hf_cvar0.5_s0_120000.json"  # written before the diagnostics
    assert "mean_overtakes" not in json.loads(old.read_text())["evaluation"]
    capsys.readouterr()
    assert results.main(["table", str(output), str(old)]) == 0
    baseline, agent = _markdown_rows(capsys.readouterr().out)
    assert baseline["CVaR"] == "—" and baseline["evaluation"] == "idm, 40 m/s target"
    assert (baseline["eval lane changes"], baseline["eval overtakes"], baseline["eval distance [m]"]) == (
        "1.2", "-2.5", "1,234")
    assert baseline["train collisions"] == "—" and agent["eval overtakes"] == "—" and agent["CVaR"] == "0.5"
    assert results.main(["table", str(output), str(old), "--mean-over-seeds"]) == 0
    rows = _markdown_rows(capsys.readouterr().out)
    assert [row["runs"] for row in rows] == ["idm40_highway_fast", "hf_cvar0.5_s0"]

    # a baseline's evaluation needs no run; a checkpoint's needs its run
    report = json.loads(evaluation.read_text())
    report["config"]["checkpoint"] = {"directory": "runs/x/checkpoints", "step": 100}
    (tmp_path / "ckpt.json").write_text(json.dumps(report))
    assert results.main(["collect", "--evaluation", str(tmp_path / "ckpt.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a baseline policy's evaluation" in err
