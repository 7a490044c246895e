"""train.py's command line: presets, flags without a preset name, aliases, --resume rules, bad input."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

import configs
from racer_vec.run.train_cli import parse_train_args
from racer_vec.config import ConfigError, TrainConfig, from_dict, resolve, to_dict

ROOT = Path(__file__).resolve().parents[1]


def test_default_preset_and_flags_without_preset_name():
    cfg = parse_train_args([])
    assert cfg.preset == "racer_highway"
    assert cfg == resolve(configs.PRESETS["racer_highway"])
    assert parse_train_args(["--num-envs", "2"]).num_envs == 2
    assert parse_train_args(["--num-workers", "3"]).num_envs == 3
    assert parse_train_args(["--num_envs", "4"]).num_envs == 4


def test_derived_defaults_are_resolved():
    cfg = parse_train_args(["--num-workers", "4"])
    assert cfg.updates_per_iteration == 4
    assert cfg.agent.target_entropy == -1.0
    assert cfg.agent.cvar_limits == cfg.agent.cvar_risk
    assert parse_train_args(["highway_fast"]).updates_per_iteration == 1


def test_no_flags_work_without_preset_name():
    cfg = parse_train_args(["--env.no-normalize-reward", "--reward.no-speed-correction"])
    assert cfg.preset == "racer_highway"
    assert cfg.env.normalize_reward is False and cfg.reward.speed_correction is False
    assert parse_train_args(["--agent.no-learned-limit"]).agent.learned_limit is False


def test_preset_values():
    fast = parse_train_args(["highway_fast", "--agent.cvar-risk", "0.8"])
    assert fast.env.env_id == "highway_env:highway-fast-v0"
    assert fast.agent.encoder == "pointnet" and fast.agent.cvar_risk == 0.8
    assert fast.num_envs == 8 and fast.start_training == 8000
    dist = parse_train_args(["racer_highway_distributed"])
    assert (dist.num_envs, dist.batch_size, dist.utd_ratio, dist.buffer_size) == (4, 256, 16, 200_000)


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--agent.cvar-risk", "1.0"], "--agent.cvar-risk"),
        (["--agent.q-min", "5", "--agent.q-max", "5"], "--agent.q-min"),
        (["--num-envs", "0"], "--num-envs"),
        (["--batch-size", "4096"], "--batch-size"),
        (["--resume", "/nonexistent/run"], "--resume"),
    ],
)
def test_config_errors_name_the_flag(argv, flag):
    with pytest.raises(ConfigError, match=flag):
        parse_train_args(argv)


def _run_train(*args):
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args], capture_output=True, text=True, timeout=120, cwd=ROOT
    )


def test_bad_input_exits_2_with_one_line():
    result = _run_train("--agent.cvar-risk", "1.5")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "--agent.cvar-risk" in result.stderr
    assert "Traceback" not in result.stderr
    unknown = _run_train("--no-such-flag", "1")
    assert unknown.returncode == 2 and "Traceback" not in unknown.stderr


def _saved_run(tmp_path, **changes) -> Path:
    cfg = resolve(dataclasses.replace(configs.PRESETS["highway_fast"], **changes))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps(to_dict(cfg)))
    return run_dir


def test_resume_keeps_saved_config_and_allows_listed_flags(tmp_path):
    run_dir = _saved_run(tmp_path, seed=7)
    cfg = parse_train_args(["--resume", str(run_dir), "--max-steps", "5000", "--save-buffer", "--eval-episodes", "2"])
    assert cfg.preset == "highway_fast" and cfg.seed == 7
    assert (cfg.max_steps, cfg.save_buffer, cfg.eval_episodes) == (5000, True, 2)
    # a flag equal to the saved value is accepted; the saved preset's name is too
    assert parse_train_args(["highway_fast", "--resume", str(run_dir), "--seed", "7"]).seed == 7


def test_resume_refuses_changed_flags_and_other_presets(tmp_path):
    run_dir = _saved_run(tmp_path)
    with pytest.raises(ConfigError, match="--agent.cvar-risk"):
        parse_train_args(["--resume", str(run_dir), "--agent.cvar-risk", "0.1"])
    with pytest.raises(ConfigError, match="racer_highway"):
        parse_train_args(["racer_highway", "--resume", str(run_dir)])


def test_config_json_round_trip():
    cfg = resolve(configs.PRESETS["highway_fast"])
    assert from_dict(TrainConfig, json.loads(json.dumps(to_dict(cfg)))) == cfg


def test_fast_sim_is_default_and_no_fast_sim_swaps_back():
    from racer_vec.sim.highway import simulator_id

    assert parse_train_args([]).env.fast_sim is True
    stock = parse_train_args(["--env.no-fast-sim"]).env
    assert stock.fast_sim is False and simulator_id(stock) == "highway_env:highway-v0"
    assert simulator_id(parse_train_args([]).env) == "racer_vec.sim.fast_sim:fast-highway-v0"
    assert simulator_id(parse_train_args(["highway_fast"]).env) == "racer_vec.sim.fast_sim:fast-highway-fast-v0"
    with pytest.raises(ConfigError, match="--env.fast-sim"):
        simulator_id(dataclasses.replace(stock, env_id="highway_env:merge-v0", fast_sim=True))


@pytest.mark.parametrize("tool", ["benchmark", "profile_learner", "pendulum", "plot", "results", "device_check"])
def test_tool_usage_names_the_documented_command(tool, capsys):
    """`--help` shows the `python -m racer_vec.<tool>` a user typed, not a path into the package."""
    import importlib

    main = importlib.import_module(f"racer_vec.{tool}").main
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.lstrip().startswith(f"usage: python -m racer_vec.{tool} ")
