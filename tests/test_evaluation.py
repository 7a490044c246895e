"""evaluate.py (design §7): metrics with known answers, the printed block, worker-count invariance,
videos, checkpoints end to end, and bad input."""

import dataclasses
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import pytest

import configs
from racer_vec.config import RewardParams
from racer_vec.run.evaluation import (
    EpisodeAccumulator, EpisodeRecord, Evaluator, format_summary, release_reward, summarize,
)  # fmt: skip
from racer_vec.sim.video import PANEL_HEIGHT

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import evaluate  # noqa: E402  (the entry point lives at the repo root)

FRAME_SHAPE = (150 + PANEL_HEIGHT, 600, 3)  # highway-env's default 600x150 view under the panel


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = evaluate.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def episodes_of(output_dir: Path) -> list[dict]:
    report = json.loads((output_dir / "evaluation_metrics.json").read_text())
    return [{k: v for k, v in e.items() if k != "video"} for e in report["episodes"]]


# ------------------------------------------------------------------------------ metrics


def step_values(offroad, nearest, forward_speed, crashed=(False, False), on_road=(True, True),
                offroad_end=(False, False), driving=((0, 0), (0, 0), (0.0, 0.0))):  # fmt: skip
    lane_change, overtakes, distance = driving
    return {
        "offroad": np.array(offroad),
        "nearest_distance": np.array(nearest, dtype=float),
        "forward_speed": np.array(forward_speed, dtype=float),
        "crashed": np.array(crashed),
        "on_road": np.array(on_road),
        "offroad_terminated": np.array(offroad_end),
        "lane_change": np.array(lane_change),
        "overtakes": np.array(overtakes),
        "distance": np.array(distance, dtype=float),
    }


def test_accumulated_episode_metrics():
    acc = EpisodeAccumulator(2)
    steps = [
        # env rewards, training rewards, collision risk, offroad, nearest distance, forward speed,
        # (lane change, overtakes, distance)
        ((1.0, 0.0), (0.9, 0.1), (-0.6, -0.5), (False, False), (5.0, math.inf), (20.0, 10.0),
         ((1, 0), (1, -1), (4.0, 2.0))),
        ((0.5, 0.0), (0.4, 0.1), (-0.4, -0.5), (False, False), (math.inf, math.inf), (22.0, 10.0),
         ((0, 0), (-1, 0), (4.4, 2.0))),
        ((0.25, 0.0), (0.2, 0.1), (0.0, -0.5), (True, False), (7.0, math.inf), (24.0, 10.0),
         ((1, 0), (1, 0), (4.8, 2.0))),
    ]  # fmt: skip
    for t, (env_r, train_r, risk, offroad, nearest, speed, driving) in enumerate(steps):
        rewards = {"training_reward": np.array(train_r), "collision_risk": np.array(risk)}
        obs_before = np.zeros((2, 12))
        obs_before[:, 3:5] = [[3.0 * (t + 1), 4.0 * (t + 1)], [0.0, -2.0]]  # the ego row's vx, vy
        values = step_values(offroad, nearest, speed, driving=driving)
        acc.add(np.array(env_r), values, rewards, np.array(env_r) - 5.0 * t, obs_before)

    first = acc.record(0, episode=3, seed=13, crashed=False, offroad_terminated=True)
    assert first.length == 3 and (first.episode, first.seed) == (3, 13)
    assert first.episode_return == pytest.approx(1.75)
    assert first.training_return == pytest.approx(1.5)
    # risk < -0.5 at step 0, offroad at step 2
    assert first.safety_violation_rate == pytest.approx(2 / 3)
    # the step without a vehicle is skipped, not counted as 0 or inf
    assert first.min_distance == pytest.approx(6.0)
    assert first.ego_speed == pytest.approx(22.0)
    assert first.release_return == pytest.approx(1.75 - 5.0 * (0 + 1 + 2))
    assert first.release_speed == pytest.approx(10.0)  # |(3, 4)|, |(6, 8)|, |(9, 12)|: 5, 10, 15
    assert (first.lane_changes, first.overtakes) == (2, 1) and first.distance == pytest.approx(13.2)

    second = acc.record(1, episode=4, seed=14, crashed=True, offroad_terminated=False)
    assert second.safety_violation_rate == 0.0  # -0.5 is not below the threshold
    assert second.min_distance is None
    assert second.training_return == pytest.approx(0.3)
    assert (second.lane_changes, second.overtakes, second.distance) == (0, -1, 6.0)

    acc.reset(np.array([True, False]))
    assert acc.length.tolist() == [0, 3] and acc.env_return[0] == 0.0 and acc.distance_steps.tolist() == [0, 0]
    assert acc.lane_changes.tolist() == [0, 0] and acc.overtakes.tolist() == [0, -1] and acc.distance[0] == 0.0


def record(k, ret, length, crashed=False, offroad=False, violations=0.0, distance=None, speed=20.0,
           driving=(0, 0, 0.0)):  # fmt: skip
    lane_changes, overtakes, driven = driving
    return EpisodeRecord(k, k, ret, ret - 1.0, length, crashed, offroad, violations, distance, speed,
                         release_return=2 * ret, release_speed=speed + 1.0, lane_changes=lane_changes,
                         overtakes=overtakes, distance=driven)  # fmt: skip


def test_the_release_reward_swaps_our_offroad_term_for_its_minus_5_per_step_off_the_road():
    values = step_values((True, True, False), (1.0,) * 3, (0.0,) * 3, crashed=(False,) * 3,
                         on_road=(False, True, True), offroad_end=(True, True, False))  # fmt: skip
    got = release_reward(np.array([-2.0, 0.3, 0.7]), values, offroad_termination_reward=-2.0)
    # off the road at its termination: our -2 out, the release's -5 in; offroad by our lane rule but on
    # highway-env's road: our -2 out, nothing in; on the road: unchanged
    np.testing.assert_allclose(got, [-5.0, 2.3, 0.7])


def test_summary_of_known_episodes():
    episodes = [
        record(0, 1.0, 10, crashed=True, violations=0.5, distance=4.0, speed=10.0, driving=(0, 1, 100.0)),
        record(1, 2.0, 20, offroad=True, violations=0.25, speed=20.0, driving=(2, -2, 200.0)),
        record(2, 3.0, 30, distance=6.0, speed=30.0, driving=(1, 3, 300.0)),
        record(3, 6.0, 40, distance=8.0, speed=40.0, driving=(3, 0, 600.0)),
    ]
    s = summarize(episodes)
    assert s["num_episodes"] == 4
    assert s["mean_return"] == pytest.approx(3.0) and s["std_return"] == pytest.approx(math.sqrt(3.5))
    assert s["mean_length"] == 25.0 and s["std_length"] == pytest.approx(math.sqrt(125.0))
    # success excludes both the crash and the offroad termination
    assert s["success_rate"] == 0.5
    assert s["collision_rate"] == 0.25 and s["offroad_episode_rate"] == 0.25
    assert s["mean_safety_violation_rate"] == pytest.approx(0.1875)
    assert s["mean_min_distance"] == pytest.approx(6.0)  # the episode without a vehicle is skipped
    assert s["mean_ego_speed"] == pytest.approx(25.0)
    assert s["mean_training_return"] == pytest.approx(2.0)
    assert (s["mean_lane_changes"], s["mean_overtakes"], s["mean_distance"]) == (1.5, 0.5, 300.0)
    assert set(episodes[0].to_json()) >= {
        "seed", "return", "training_return", "length", "crashed", "offroad_terminated",
        "safety_violation_rate", "min_distance", "ego_speed", "release_return", "release_speed",
        "lane_changes", "overtakes", "distance",
    }
    # the release's measures replace return and speed; crashes are counted the same
    r = summarize(episodes, release=True)
    assert r["mean_return"] == pytest.approx(6.0) and r["std_return"] == pytest.approx(2 * math.sqrt(3.5))
    assert r["mean_ego_speed"] == pytest.approx(26.0)
    assert {k: v for k, v in r.items() if k not in ("mean_return", "std_return", "mean_ego_speed")} == {
        k: v for k, v in s.items() if k not in ("mean_return", "std_return", "mean_ego_speed")
    }


def test_printed_block_is_the_spec_format():
    summary = {
        "num_episodes": 20, "mean_return": 24.567, "std_return": 8.234, "mean_length": 187.3,
        "std_length": 45.2, "success_rate": 0.85, "collision_rate": 0.15,
        "mean_safety_violation_rate": 0.123, "mean_min_distance": 8.45, "mean_ego_speed": 22.1,
    }
    assert format_summary(summary) == "\n".join([
        "=" * 50,
        "HIGHWAY POLICY EVALUATION RESULTS",
        "=" * 50,
        "Episodes: 20",
        "Mean Return: 24.567 ± 8.234",
        "Mean Length: 187.3 ± 45.2",
        "Success Rate: 85.0%",
        "Collision Rate: 15.0%",
        "Mean Safety Violation Rate: 12.3%",
        "Mean Min Distance: 8.45m",
        "Mean Ego Speed: 22.1 m/s",
    ])
    # with the driving diagnostics (summaries written before them print as above)
    summary |= {"mean_lane_changes": 1.44, "mean_overtakes": -0.25, "mean_distance": 957.6}
    assert format_summary(summary).splitlines()[-3:] == [
        "Mean Lane Changes: 1.4", "Mean Overtakes: -0.2", "Mean Distance: 958 m",
    ]  # fmt: skip


# ------------------------------------------------------------------ baselines on the real env

BASELINE = ("--policy", "random", "--preset", "highway_fast", "--duration", "2", "--num-episodes", "4", "--seed", "7")


def test_baseline_with_1_and_3_workers_videos_and_json(tmp_path, capsys):
    filmed, plain = tmp_path / "filmed", tmp_path / "plain"
    code, out, _ = run_cli(capsys, *BASELINE, "--num-workers", 1, "--max-videos", 2, "--output-dir", filmed)
    assert code == 0
    assert run_cli(capsys, *BASELINE, "--num-workers", 3, "--no-render", "--output-dir", plain)[0] == 0

    # the same episodes whatever the worker count, and filming does not change them
    episodes = episodes_of(filmed)
    assert episodes == episodes_of(plain)
    assert [e["seed"] for e in episodes] == [7, 8, 9, 10]
    # random actions really differ between episodes (each has its own key)
    assert len({round(e["return"], 9) for e in episodes}) > 1

    report = json.loads((filmed / "evaluation_metrics.json").read_text())
    assert set(report) >= {"summary", "episodes", "config"}
    assert report["config"]["env"]["duration"] == 2 and report["config"]["train"]["env"]["duration"] == 40
    summary = report["summary"]
    assert format_summary(summary) in out
    printed = re.search(r"Mean Return: (\S+) ± (\S+)", out)
    assert float(printed[1]) == pytest.approx(summary["mean_return"], abs=5e-4)
    assert float(printed[2]) == pytest.approx(summary["std_return"], abs=5e-4)
    assert float(re.search(r"Success Rate: (\S+)%", out)[1]) == pytest.approx(100 * summary["success_rate"], abs=0.05)

    videos = sorted(filmed.glob("*.mp4"))
    assert [v.name for v in videos] == [f"highway_eval_random_highway_fast_episode_{i}.mp4" for i in (0, 1)]
    assert not list(plain.glob("*.mp4"))
    for i, video in enumerate(videos):
        frames = list(imageio.get_reader(video).iter_data())
        assert len(frames) == report["episodes"][i]["length"] + 1  # the initial frame, then one per step
        assert frames[0].shape == FRAME_SHAPE
        assert frames[-1][PANEL_HEIGHT:].std() > 5  # the road was drawn (a "dummy" SDL driver gives black)


def test_evaluator_reused_between_evaluations():
    """The training driver keeps one Evaluator and calls evaluate() at every eval interval."""
    cfg = configs.PRESETS["highway_fast"]
    env = dataclasses.replace(cfg.env, duration=1)
    evaluator = Evaluator(env, RewardParams.build(cfg.reward, env), num_workers=2)
    try:
        straight = lambda obs: np.tile(np.float32([0.2, 0.0]), (obs.shape[0], 1))  # noqa: E731
        first = evaluator.evaluate(straight, num_episodes=3, seed=100)
        assert first == evaluator.evaluate(straight, num_episodes=3, seed=100)
        assert first["num_episodes"] == 3 and first["mean_length"] == 5.0
        assert first != evaluator.evaluate(straight, num_episodes=3, seed=200)
    finally:
        evaluator.close()


@pytest.mark.slow
def test_periodic_deterministic_evaluation_does_not_depend_on_the_worker_count(tiny_run):
    """train.py's periodic evaluation: the agent's deterministic actions on 1 and on 3 workers."""
    import jax

    from racer_vec.learner.agent import init_agent, deterministic_actions
    from racer_vec.run.checkpoint_files import saved_config
    from racer_vec.run.checkpoints import Checkpointer
    from racer_vec.config import resolve

    cfg = resolve(saved_config(tiny_run / "checkpoints", 400))
    template = jax.eval_shape(lambda: init_agent(cfg.agent, 48, cfg.env.observed_vehicles, 0))
    checkpointer = Checkpointer(tiny_run / "checkpoints", keep=5)
    try:
        agent = checkpointer.restore(400, template)[0]
    finally:
        checkpointer.close()
    summaries = []
    for workers in (1, 3):
        evaluator = Evaluator(cfg.env, RewardParams.build(cfg.reward, cfg.env), num_workers=workers)
        try:
            summaries.append(evaluator.evaluate(lambda obs: deterministic_actions(agent, obs), 4, cfg.eval_seed))
        finally:
            evaluator.close()
    assert summaries[0] == summaries[1]
    assert summaries[0]["num_episodes"] == 4 and summaries[0]["mean_return"] != 0.0


# ------------------------------------------------------------------------- checkpoints


def test_checkpoint_end_to_end(tiny_run, tmp_path, capsys):
    latest = tiny_run / "checkpoints" / "400"
    common = ("--num-episodes", 3)
    code, out, _ = run_cli(capsys, "--checkpoint", tiny_run, *common, "--num-workers", 3, "--no-render",
                           "--output-dir", tmp_path / "a")
    assert code == 0, out
    report = json.loads((tmp_path / "a" / "evaluation_metrics.json").read_text())
    assert report["config"]["checkpoint"]["step"] == 400
    assert report["config"]["train"]["agent"]["hidden_dims"] == [32, 32]
    assert format_summary(report["summary"]) in out

    # a step directory, one worker, filming: the same sampled episodes
    code, _, _ = run_cli(capsys, "--checkpoint", latest, *common, "--num-workers", 1, "--max-videos", 1,
                         "--output-dir", tmp_path / "b")
    assert code == 0
    assert episodes_of(tmp_path / "a") == episodes_of(tmp_path / "b")
    (video,) = (tmp_path / "b").glob("*.mp4")
    assert video.name == "highway_eval_tiny_400_episode_0.mp4"

    code, _, _ = run_cli(capsys, "--checkpoint", tiny_run / "checkpoints" / "200", "--deterministic",
                         "--num-episodes", 2, "--no-render", "--output-dir", tmp_path / "c")
    assert code == 0
    report = json.loads((tmp_path / "c" / "evaluation_metrics.json").read_text())
    assert report["config"]["checkpoint"]["step"] == 200 and report["config"]["evaluation"]["deterministic"]


def test_the_release_protocol_clips_the_mean_counts_its_way_and_runs_on_another_env(tiny_run, tmp_path, capsys):
    """design §11: the release's action rule and measures, 10 episodes by default; and the agent on another
    preset's env (the PointNet agent of 8 observed vehicles on racer_highway's 15)."""
    code, out, _ = run_cli(capsys, "--checkpoint", tiny_run, "--protocol", "release", "--duration", 2, "--no-render",
                           "--output-dir", tmp_path / "release")  # fmt: skip
    assert code == 0 and "Protocol: release, actions clip(mean), highway_env:highway-fast-v0" in out
    report = json.loads((tmp_path / "release" / "evaluation_metrics.json").read_text())
    summary, episodes = report["summary"], report["episodes"]
    assert summary["num_episodes"] == 10 == report["config"]["evaluation"]["num_episodes"]
    assert (summary["protocol"], summary["action_rule"]) == ("release", "clip(mean)")
    assert summary["mean_return"] == pytest.approx(np.mean([e["release_return"] for e in episodes]))
    assert summary["mean_ego_speed"] == pytest.approx(np.mean([e["release_speed"] for e in episodes]))
    assert summary["collision_rate"] == np.mean([e["crashed"] for e in episodes])

    code, _, _ = run_cli(capsys, "--checkpoint", tiny_run, "--preset", "racer_highway", "--duration", 1,
                         "--num-episodes", 2, "--no-render")  # fmt: skip
    assert code == 0
    report = json.loads((tiny_run / "eval" / "400_on_racer_highway" / "evaluation_metrics.json").read_text())
    assert report["summary"]["env_id"] == "highway_env:highway-v0" and report["summary"]["action_rule"] == "sampled"

    code, _, err = run_cli(capsys, "--checkpoint", tiny_run, "--protocol", "release", "--deterministic")
    assert code == 2 and "--deterministic" in err


@pytest.fixture(scope="module")
def untrained_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Checkpoints of an untrained tiny agent: "speed", whose action 0 is a target speed (design §3),
    "accel", whose action 0 is an acceleration, and "lane", with target speed and target lateral position."""
    from conftest import TINY_ARGS
    from racer_vec.config import to_dict
    from racer_vec.learner.agent import init_agent
    from racer_vec.run.checkpoints import Checkpointer
    from racer_vec.run.train_cli import parse_train_args

    paths = {}
    lane = ["--env.target-speed-action", "--env.lane-target-action"]
    for name, extra in (("speed", ["--env.target-speed-action"]), ("accel", []), ("lane", lane)):
        cfg = parse_train_args([*TINY_ARGS, *extra])
        directory = tmp_path_factory.mktemp(name) / "checkpoints"
        checkpointer = Checkpointer(directory, keep=1)
        agent = init_agent(cfg.agent, cfg.env.obs_dim, cfg.env.observed_vehicles, cfg.seed)
        checkpointer.save(1, agent, {"config": to_dict(cfg)})
        checkpointer.close()
        paths[name] = directory / "1"
    return paths


@pytest.mark.slow  # real episodes
def test_a_held_speed_replaces_the_policys_target_speed(untrained_checkpoints, tmp_path, capsys):
    speeds = {}
    for held in (15, 35):
        code, out, err = run_cli(capsys, "--checkpoint", untrained_checkpoints["speed"], "--hold-speed", held,
                                 "--deterministic", "--num-episodes", 2, "--num-workers", 1, "--no-render",
                                 "--output-dir", tmp_path / str(held))  # fmt: skip
        assert code == 0, err
        report = json.loads((tmp_path / str(held) / "evaluation_metrics.json").read_text())
        assert report["summary"]["action_rule"] == f"tanh(mean), {held} m/s held"
        speeds[held] = [e["ego_speed"] for e in report["episodes"]]
    # episode k starts the same way in both (seed k, the same steering until the speeds part): the
    # untrained agent steers off the road within a few steps, faster where 35 m/s is held
    assert all(fast > slow for fast, slow in zip(speeds[35], speeds[15])), speeds


def test_holding_speed_sets_action_0_to_the_speed_on_the_env_s_range_and_keeps_the_steering():
    from racer_vec.run.eval_cli import holding_speed

    env = dataclasses.replace(configs.PRESETS["highway_fast"].env, target_speed_action=True, target_speed_range=(10, 40))
    policy = lambda obs, ids, steps: np.tile(np.float32([0.9, -0.3]), (len(obs), 1))  # noqa: E731
    for speed, action0 in ((10, -1.0), (25, 0.0), (31, 0.4), (40, 1.0)):
        actions = holding_speed(policy, speed, env)(np.zeros((3, 48)), np.arange(3), np.zeros(3))
        np.testing.assert_allclose(actions, [[action0, -0.3]] * 3, rtol=1e-6)


def test_a_checkpoint_keeps_what_its_actions_mean_on_another_presets_env(untrained_checkpoints):
    from racer_vec.run.eval_cli import EvalArgs, resolve_target

    args = EvalArgs(checkpoint=str(untrained_checkpoints["lane"]), preset="racer_highway", hold_speed=30.0)
    env = resolve_target(args).env_cfg
    assert env.env_id == "highway_env:highway-v0" and env.vehicles_count == 50
    assert env.target_speed_action and env.lane_target_action


@pytest.mark.parametrize(
    "checkpoint, args, message",
    [
        ("accel", ("--hold-speed", "30"), "--env.target-speed-action"),
        ("speed", ("--hold-speed", "41"), "0-40 m/s"),
        ("speed", ("--policy", "random", "--hold-speed", "30"), "--hold-speed applies to the agent"),
    ],
)
def test_a_held_speed_needs_a_target_speed_agent_and_a_speed_in_its_range(
    untrained_checkpoints, checkpoint, args, message, capsys
):
    code, _, err = run_cli(capsys, "--checkpoint", untrained_checkpoints[checkpoint], *args, "--no-render")
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and message in err and "--hold-speed" in err


def test_incompatible_checkpoint_is_one_line_and_exit_2(tiny_run, tmp_path, capsys):
    copy = tmp_path / "run" / "checkpoints"
    shutil.copytree(tiny_run / "checkpoints" / "200", copy / "200")
    state_file = copy / "200" / "state" / "metadata"
    state = json.loads(state_file.read_text())
    state["config"]["agent"]["hidden_dims"] = [64, 64]  # the saved arrays are 32 wide
    state_file.write_text(json.dumps(state))
    from racer_vec.run.checkpoint_files import write_manifest

    write_manifest(copy / "200")  # an intact checkpoint, of another agent
    code, _, err = run_cli(capsys, "--checkpoint", copy, "--no-render")
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "does not match" in err


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "args, message",
    [
        (("--checkpoint", "{tmp}/nowhere"), "no such file"),
        (("--checkpoint", "{tmp}"), "no checkpoints"),
        (("--checkpoint", "{tmp}/file.txt"), "not a directory"),
        (("--policy", "zero"), "--preset"),
        ((), "--checkpoint"),
        (("--policy", "zero", "--preset", "highway_fast", "--num-episodes", "0"), "--num-episodes"),
        (("--policy", "constant", "--preset", "highway_fast", "--constant-action", "2", "0"), "--constant-action"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, args, message):
    (tmp_path / "file.txt").write_text("")
    code, _, err = run_cli(capsys, *(a.format(tmp=tmp_path) for a in args))
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and message in err and err.startswith("error: ")


@pytest.mark.slow
def test_entry_point_runs_as_a_script_without_jax_at_import():
    # workers re-import the entry module and evaluation's modules: no JAX there (design §2)
    check = "import sys, evaluate, racer_vec.run.evaluation, racer_vec.sim.video; assert 'jax' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", check], cwd=ROOT).returncode == 0
    result = subprocess.run(
        [sys.executable, str(ROOT / "evaluate.py"), "--policy", "random"], capture_output=True, text=True
    )
    assert result.returncode == 2 and result.stderr.startswith("error: ") and "Traceback" not in result.stderr


def test_damaged_newest_checkpoint_falls_back_and_an_explicit_one_is_refused(tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run / "checkpoints", run / "checkpoints")
    (run / "checkpoints" / "400" / "state" / "metadata").unlink()
    code, _, err = run_cli(capsys, "--checkpoint", run / "checkpoints", "--num-episodes", 1, "--no-render",
                           "--output-dir", tmp_path / "out")
    assert code == 0
    assert err.strip().splitlines()[0].startswith("warning: checkpoint 400 damaged") and "using checkpoint 200" in err
    report = json.loads((tmp_path / "out" / "evaluation_metrics.json").read_text())
    assert report["config"]["checkpoint"]["step"] == 200

    code, _, err = run_cli(capsys, "--checkpoint", run / "checkpoints" / "400", "--no-render")
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and str(run / "checkpoints" / "400") in lines[0] and "damaged" in lines[0]


@pytest.mark.slow
def test_a_killed_worker_in_evaluate_runs_its_episodes_again_with_the_same_numbers(tmp_path, capsys):
    import os
    import time

    import psutil

    baseline = ["--policy", "constant", "--preset", "highway_fast", "--no-render"]
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "evaluate.py"), *baseline, "--num-episodes", "50", "--num-workers", "2",
         "--output-dir", str(tmp_path / "killed")],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    deadline = time.time() + 60
    workers = []
    while len(workers) < 2 and time.time() < deadline:
        try:
            forkservers = [p for p in psutil.Process(proc.pid).children() if "forkserver" in " ".join(p.cmdline())]
            workers = sorted((c for fs in forkservers for c in fs.children()), key=lambda p: p.create_time())
        except psutil.NoSuchProcess:  # a process that was just starting or ending
            pass
        time.sleep(0.2)
    time.sleep(2.0)  # into the episodes (the constant policy drives them to their time limit)
    workers[1].kill()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    lines = err.strip().splitlines()
    pattern = (r"env worker 1 \(episode \d+\) failed \(\w+: killed by signal 9[^)]*\); "
               r"new env workers run episode\(s\) ([\d, ]+) again \(restart 1 of at most 3\)")
    assert len(lines) == 1 and re.fullmatch(pattern, lines[0]), lines
    episodes = episodes_of(tmp_path / "killed")
    assert [e["episode"] for e in episodes] == list(range(50))
    for k in map(int, re.fullmatch(pattern, lines[0]).group(1).split(", ")):
        # episode k, alone: episode 0 of seed k (the constant policy draws no noise)
        assert run_cli(capsys, *baseline, "--num-episodes", 1, "--seed", k, "--output-dir", tmp_path / str(k))[0] == 0
        assert [{**e, "episode": k} for e in episodes_of(tmp_path / str(k))] == [episodes[k]]
    left = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == proc.pid and p.status() != psutil.STATUS_ZOMBIE:
                left.append(p)
        except (ProcessLookupError, psutil.NoSuchProcess):
            pass
    assert left == []
