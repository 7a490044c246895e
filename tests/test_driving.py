"""design §3's driving diagnostics (lane changes, net overtakes, distance) on scripted scenes, on the
stock and the fast simulator, their sums in evaluation and training; and the textbook baseline,
highway-env's IDM driver as the ego (evaluate.py --policy idm, design §7)."""

import dataclasses
import json
import sys
from types import SimpleNamespace

import numpy as np
import pytest
from highway_env.road.lane import StraightLane
from highway_env.vehicle.behavior import IDMVehicle

import configs
from conftest import ROOT
from racer_vec.config import RewardParams
from racer_vec.run.evaluation import Evaluator
from racer_vec.sim.driving import DrivingDiagnostics
from racer_vec.sim.highway import make_env

sys.path.insert(0, str(ROOT))
import evaluate  # noqa: E402  (the entry point lives at the repo root)

FAST = configs.PRESETS["highway_fast"].env
LANE_WIDTH = 4.0
STEP_S = 1 / FAST.policy_frequency


# ------------------------------------------------------------------ the rule, on positions set by hand


def _replay(gaps: list[list[float]], ids_change_at: int | None = None) -> list[int]:
    """The `overtakes` increments of an ego at x = 0 whose others sit at longitudinal `gaps` per step."""
    lane = StraightLane([0.0, 0.0], [1000.0, 0.0])
    ego = SimpleNamespace(position=np.zeros(2), lane=lane, lane_index=("0", "1", 0))
    others = [object() for _ in gaps[0]]
    diagnostics = DrivingDiagnostics()
    positions = lambda row: np.array([[g, 3.0] for g in row]).reshape(-1, 2)  # noqa: E731
    assert diagnostics.reset(ego, others, positions(gaps[0])) == {"lane_change": 0, "overtakes": 0, "distance": 0.0}
    counts = []
    for t, row in enumerate(gaps[1:], start=1):
        if t == ids_change_at:
            others = [object() for _ in row]
        counts.append(diagnostics.step(ego, others, positions(row))["overtakes"])
    return counts


@pytest.mark.parametrize(
    "gaps, expected",
    [
        ([[5.0], [1.0], [-1.0], [-4.0]], [0, 1, 0]),  # passed once
        ([[-5.0], [-1.0], [2.0]], [0, -1]),  # passed by it
        ([[5.0], [-1.0], [2.0], [-3.0], [4.0]], [1, -1, 1, -1]),  # oscillating about the ego: nets 0
        ([[5.0], [0.0], [0.0], [-2.0]], [0, 0, 1]),  # level keeps the side it had: one pass, when behind
        ([[5.0], [0.0], [3.0]], [0, 0]),  # level and back ahead: no pass
        ([[-2.0], [0.0], [-1.0], [0.0], [3.0]], [0, 0, 0, -1]),
        ([[0.0], [3.0], [-1.0]], [0, 1]),  # level from the start: no side until it has one
        ([[5.0, -5.0, 1.0], [-5.0, 5.0, 2.0]], [0]),  # one passed, one passing: net 0
        ([[5.0, 6.0, -1.0], [-5.0, -6.0, -2.0]], [2]),
    ],
)
def test_overtakes_count_sign_changes_of_the_gap(gaps, expected):
    assert _replay(gaps) == expected


def test_a_changed_vehicle_list_counts_no_pass_and_starts_afresh():
    # at step 2 the list is new: its vehicles' sides are taken there, and count from step 3 on
    assert _replay([[5.0], [4.0], [-1.0], [-2.0], [3.0]], ids_change_at=2) == [0, 0, 0, -1]


# ---------------------------------------------------------------- scripted scenes on both simulators


def _scene(fast_sim: bool, others: list[tuple[float, int, float]]):
    """highway_fast's env with the ego alone at reset (25 m/s, heading 0), then `others` put on the
    road: (metres ahead of the ego, lanes to its left, speed), each an IDMVehicle holding its speed
    in its lane. Returns the env and the ego."""
    env = make_env(dataclasses.replace(FAST, fast_sim=fast_sim, vehicles_count=0))
    env.reset(seed=4)
    base = env.unwrapped
    ego, road = base.vehicle, base.road
    assert ego.speed == 25.0 and ego.heading == 0.0 and road.vehicles == [ego]
    lane = ego.lane_index[2]
    side = 1 if lane < FAST.lanes_count - 2 else -1  # lanes that exist
    for ahead, lanes, speed in others:
        position = [ego.position[0] + ahead, LANE_WIDTH * (lane + side * lanes)]
        road.vehicles.append(IDMVehicle(road, position, 0.0, speed, target_speed=speed, enable_lane_change=False))
    return env, ego


def _drive(env, actions) -> list[dict]:
    infos = []
    for action in actions:
        _, _, terminated, truncated, info = env.step(np.asarray(action, dtype=np.float32))
        assert not (terminated or truncated)
        infos.append({k: info[k] for k in ("lane_change", "overtakes", "distance")})
    return infos


@pytest.mark.parametrize("fast_sim", [False, True], ids=["stock", "fast"])
def test_passes_at_the_steps_the_gaps_change_sign_and_distance_is_speed_times_time(fast_sim):
    # A, 15 m/s, 31 m ahead: the ego (25 m/s) draws level at 3.1 s and is past it at step 16 (3.2 s);
    # B, 30 m/s, 38.5 m behind: level at 7.7 s, ahead at step 39 (7.8 s)
    env, ego = _scene(fast_sim, [(31.0, 1, 15.0), (-38.5, 2, 30.0)])
    infos = _drive(env, [(0.0, 0.0)] * 45)
    overtakes = [i["overtakes"] for i in infos]
    assert {t + 1: n for t, n in enumerate(overtakes) if n} == {16: 1, 39: -1}
    assert sum(overtakes) == 0
    assert not any(i["lane_change"] for i in infos)
    assert all(i["distance"] == pytest.approx(25.0 * STEP_S) for i in infos)
    assert sum(i["distance"] for i in infos) == pytest.approx(25.0 * STEP_S * 45)
    env.close()


@pytest.mark.parametrize("fast_sim", [False, True], ids=["stock", "fast"])
def test_a_constant_steering_changes_lane_where_the_ego_crosses_a_lane_boundary(fast_sim):
    env, ego = _scene(fast_sim, [])
    start_lane = ego.lane_index[2]
    steer = 0.02 if start_lane < FAST.lanes_count - 2 else -0.02
    x, y, infos = [ego.position[0]], [ego.position[1]], []
    for _ in range(14):
        infos += _drive(env, [(0.0, steer)])
        x.append(ego.position[0])
        y.append(ego.position[1])
    # the closest lane (straight lanes of one heading): the nearest centre, LANE_WIDTH apart
    lanes = np.round(np.array(y) / LANE_WIDTH)
    assert [i["lane_change"] for i in infos] == (np.diff(lanes) != 0).astype(int).tolist()
    assert sum(i["lane_change"] for i in infos) == 2  # two boundaries crossed in 14 steps
    # progress along the road, not the length of the path
    np.testing.assert_allclose([i["distance"] for i in infos], np.diff(x))
    env.close()


def _weaving(obs: np.ndarray, t: int) -> np.ndarray:
    """Towards 32 m/s; every other 20 steps towards the next lane's centre (back at the road's edge)."""
    _, _, y, vx, _, heading = obs[:6]
    lane = np.round(y / LANE_WIDTH)
    if (t // 20) % 2:
        lane = lane + 1 if y < 6 else lane - 1
    steering = -0.04 * (y - LANE_WIDTH * lane) - 0.6 * heading
    return np.float32([np.clip((32 - vx) / 5, -1, 1), np.clip(steering / (np.pi / 4), -1, 1)])


def test_the_stock_and_the_fast_simulator_report_the_same_diagnostics():
    """The preset's traffic and an ego that speeds and weaves through it, to the episode's end."""
    reports = []
    for fast_sim in (False, True):
        env = make_env(dataclasses.replace(FAST, fast_sim=fast_sim))
        obs, _ = env.reset(seed=7)
        reports.append([])
        for t in range(200):
            obs, _, terminated, truncated, info = env.step(_weaving(obs, t))
            reports[-1].append([info[k] for k in ("lane_change", "overtakes", "distance")])
            if terminated or truncated:
                break
        env.close()
    assert reports[0] == reports[1]
    lane_changes, overtakes, _ = np.sum(reports[0], axis=0)
    assert lane_changes >= 10 and overtakes >= 3


# ------------------------------------------------------------------------------- the textbook driver


def _idm_episodes(fast_sim: bool, seeds, actions) -> list[tuple]:
    env = make_env(dataclasses.replace(FAST, fast_sim=fast_sim, duration=8), idm_ego_speed=40.0)
    episodes = []
    for seed in seeds:
        obs, _ = env.reset(seed=seed)
        base = env.unwrapped
        assert type(base.vehicle) is IDMVehicle and base.vehicle.target_speed == 40.0
        assert base.road.vehicles[0] is base.vehicle and base.action_type.controlled_vehicle is base.vehicle
        if fast_sim:
            assert base.road._scene() is not None  # the batched code drives it, not the stock fallback
        trace = [obs.tobytes()]
        for t in range(40):
            obs, reward, terminated, truncated, info = env.step(actions(t))
            trace.append((obs.tobytes(), reward, info["speed"], info["lane_change"], info["overtakes"]))
            if terminated or truncated:
                break
        episodes.append(tuple(trace))
    env.close()
    return episodes


def test_the_idm_ego_drives_alike_on_both_simulators_and_ignores_actions(monkeypatch):
    acts = []
    stock_act = IDMVehicle.act
    monkeypatch.setattr(IDMVehicle, "act", lambda v, action=None: acts.append(v) or stock_act(v, action))
    seeds = (0, 1)
    stock = _idm_episodes(False, seeds, lambda t: np.zeros(2, np.float32))
    # like every other IDMVehicle, it acts once per simulation frame (in road.act), never for an action
    frames = FAST.simulation_frequency // FAST.policy_frequency
    steps = sum(len(episode) - 1 for episode in stock)
    assert sum(type(v) is IDMVehicle and v.target_speed == 40.0 for v in acts) == frames * steps
    monkeypatch.undo()
    assert _idm_episodes(True, seeds, lambda t: np.zeros(2, np.float32)) == stock
    assert _idm_episodes(True, seeds, lambda t: np.float32([1.0, (-1) ** t])) == stock
    speeds = [step[2] for episode in stock for step in episode[1:]]
    assert max(speeds) - min(speeds) > 1.0  # it drives: the IDM changes its speed


@pytest.mark.slow  # two vector envs, one on the stock simulator: ~5 s on the loaded 2-core machine
def test_the_idm_baseline_has_the_same_summary_on_both_simulators():
    summaries = []
    for fast_sim in (False, True):
        env = dataclasses.replace(FAST, fast_sim=fast_sim, duration=6)
        evaluator = Evaluator(env, RewardParams.build(configs.PRESETS["highway_fast"].reward, env), 1,
                              idm_ego_speed=30.0)  # fmt: skip
        try:
            summaries.append(evaluator.evaluate(lambda obs: np.zeros((obs.shape[0], 2), np.float32), 3, 5))
        finally:
            evaluator.close()
    assert summaries[0] == summaries[1]
    assert summaries[0]["collision_rate"] == 0.0 and summaries[0]["mean_distance"] > 100


def test_evaluate_policy_idm_names_the_driver_and_its_speed(tmp_path, capsys):
    code = evaluate.main(["--policy", "idm", "--idm-target-speed", "35", "--preset", "highway_fast", "--duration",
                          "2", "--num-episodes", "1", "--num-workers", "1", "--no-render", "--output-dir",
                          str(tmp_path)])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    report = json.loads((tmp_path / "evaluation_metrics.json").read_text())
    assert report["summary"]["action_rule"] == "idm, 35 m/s target"
    assert report["config"]["evaluation"]["idm_target_speed"] == 35.0
    assert report["config"]["evaluation"]["label"] == "idm35_highway_fast"
    assert "actions idm, 35 m/s target" in out and "Mean Lane Changes:" in out
    assert {"lane_changes", "overtakes", "distance"} <= report["episodes"][0].keys()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--idm-target-speed", "30", "--policy", "zero", "--preset", "highway_fast"], "applies to --policy idm"),
        (["--idm-target-speed", "30", "--checkpoint", "runs/x"], "applies to --policy idm"),
        (["--policy", "idm", "--idm-target-speed", "0", "--preset", "highway_fast"], "must be positive"),
        (["--policy", "idm", "--idm-target-speed", "-5", "--preset", "highway_fast"], "must be positive"),
        (["--policy", "idm", "--checkpoint", "runs/x"], "not --checkpoint"),
        (["--policy", "idm"], "needs --preset"),
        (["--policy", "idm", "--preset", "highway_fast", "--deterministic"], "applies to the agent"),
    ],
)
def test_nonsensical_idm_combinations_are_one_line_and_exit_2(args, message, capsys):
    assert evaluate.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_the_training_metrics_log_each_interval_s_episode_means():
    from racer_vec.run.counters import EpisodeTracker

    tracker = EpisodeTracker(2)
    steps = [  # done, lane changes, overtakes, distance (per env)
        ((False, False), (1, 0), (1, 0), (5.0, 1.0)),
        ((True, False), (0, 1), (1, -1), (5.0, 1.0)),  # env 0's episode: 1 lane change, 2 overtakes, 10 m
        ((False, True), (1, 1), (0, 0), (4.0, 2.0)),  # env 1's: 2, -1, 4 m
    ]
    for done, lane_change, overtakes, distance in steps:
        values = {"lane_change": np.array(lane_change), "overtakes": np.array(overtakes),
                  "distance": np.array(distance)}  # fmt: skip
        tracker.step(np.ones(2), np.full(2, 0.5), np.array(done), values)
    means = tracker.pop_means()
    assert means == {
        "episode_return_mean": 2.5, "episode_training_return_mean": 1.25, "episode_length_mean": 2.5,
        "episode_lane_changes_mean": 1.5, "episode_overtakes_mean": 0.5, "episode_distance_mean": 7.0,
        "episodes_in_interval": 2,
    }  # fmt: skip
    assert tracker.pop_means() == {}
    tracker.step(np.ones(2), np.ones(2), np.array([False, True]), values)
    # env 0's running episode (1 lane change so far) is not in this interval; env 1's new one is
    assert tracker.pop_means()["episode_lane_changes_mean"] == 1.0
