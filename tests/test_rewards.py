"""design §6: collision risk and the training reward (numpy), including a check on the real simulator."""

import dataclasses
import math
from types import SimpleNamespace

import numpy as np
import pytest

import configs
from racer_vec.config import RewardConfig, RewardParams
from racer_vec.sim.highway import make_env
from racer_vec.sim.rewards import collision_risk, training_reward

V = 15


def scene(*others, ego_heading=0.0, ego_vx=25.0, n_rows=V):
    """(1, V, 6) observation: ego at x=150 with `ego_heading`; others given as (px, py, vx, vy) relative."""
    obs = np.zeros((1, n_rows, 6), dtype=np.float32)
    obs[0, 0] = [1, 100, 4, ego_vx, 0, ego_heading]
    for i, (px, py, vx, vy) in enumerate(others, start=1):
        obs[0, i] = [1, px, py, vx, vy, 0.3]  # other vehicles' headings play no role
    return obs


def risk_of(*others, ego_heading=0.0, **params):
    return collision_risk(scene(*others, ego_heading=ego_heading), **params)[0]


@pytest.mark.parametrize(
    "distance, closing, expected",
    [
        (8.0, 10.0, -1.0),  # ttc 0.8 < critical
        (15.0, 10.0, 0.0),  # ttc 1.5 but |p| >= proximity
        (8.0, 5.0, -math.exp(-1.8)),  # ttc 1.6, u = 0.4
        (8.0, 3.0, 0.0),  # ttc 2.67 > warning
        (9.0, 6.0, -math.exp(-1.5)),  # ttc 1.5, u = 0.5
    ],
)
def test_worked_examples(distance, closing, expected):
    assert risk_of((distance, 0.0, -closing, 0.0)) == pytest.approx(expected, abs=1e-6)


def test_spec_value_of_the_third_example():
    assert risk_of((8.0, 0.0, -5.0, 0.0)) == pytest.approx(-0.165, abs=5e-4)


@pytest.mark.parametrize(
    "vehicle",
    [
        (8.0, 0.0, 5.0, 0.0),  # pulling away
        (-8.0, 0.0, 10.0, 0.0),  # behind, closing from the rear
        (8.0, 8.0 * math.tan(math.radians(12.0)), -10.0, 0.0),  # 12 deg off axis, cone is 11.25
        (0.0, 4.0, 0.0, -10.0),  # beside, moving sideways towards the ego
    ],
)
def test_non_dangerous_vehicles_give_zero(vehicle):
    assert risk_of(vehicle) == 0.0


def test_absent_rows_give_zero():
    obs = scene((8.0, 0.0, -10.0, 0.0))
    obs[0, 1, 0] = 0.0  # presence off: the row's values must not count
    assert collision_risk(obs)[0] == 0.0
    assert collision_risk(scene())[0] == 0.0  # all-zero rows


def test_inside_the_cone_counts():
    angle = math.radians(10.0)
    vehicle = (8.0 * math.cos(angle), 8.0 * math.sin(angle), -10.0, 0.0)
    assert risk_of(vehicle) == pytest.approx(-1.0)


def test_forward_direction_follows_the_ego_heading():
    ahead = (0.0, 8.0, 0.0, -10.0)  # along +y: ahead only for an ego heading pi/2
    assert risk_of(ahead, ego_heading=math.pi / 2) == pytest.approx(-1.0)
    assert risk_of(ahead, ego_heading=0.0) == 0.0
    assert risk_of((8.0, 0.0, -10.0, 0.0), ego_heading=math.pi / 2) == 0.0


def test_minimum_over_dangerous_vehicles():
    mild = (8.0, 0.0, -5.0, 0.0)  # -exp(-1.8)
    medium = (9.0, 0.5, -6.0, 0.0)  # ttc ~1.5
    harmless = (-5.0, 0.0, 3.0, 0.0)
    assert risk_of(harmless, mild) == pytest.approx(-math.exp(-1.8), abs=1e-6)
    both = risk_of(mild, harmless, medium)
    assert both == pytest.approx(min(risk_of(mild), risk_of(medium)), abs=1e-12)
    assert both < risk_of(mild)
    assert risk_of(mild, (6.0, 0.0, -10.0, 0.0), medium) == -1.0


def test_parameters_are_used():
    vehicle = (15.0, 0.0, -10.0, 0.0)  # ttc 1.5 at 15 m
    assert risk_of(vehicle) == 0.0
    assert risk_of(vehicle, proximity=20.0) == pytest.approx(-math.exp(-1.5), abs=1e-6)
    assert risk_of(vehicle, proximity=20.0, critical_ttc=1.6) == -1.0
    assert risk_of(vehicle, proximity=20.0, warning_ttc=1.4, critical_ttc=1.0) == 0.0
    off_axis = (8.0, 8.0 * math.tan(math.radians(12.0)), -10.0, 0.0)
    assert risk_of(off_axis, cone_half_angle=math.radians(13.0)) == -1.0


def test_flat_and_row_inputs_agree_and_batch_over_envs():
    rng = np.random.default_rng(0)
    n = 256
    obs = np.zeros((n, V, 6), dtype=np.float32)
    obs[:, 0] = [1, 100, 4, 25, 0, 0]
    obs[:, 0, 5] = rng.uniform(-0.2, 0.2, n)
    present = rng.random((n, V - 1)) < 0.6
    obs[:, 1:, 0] = present
    obs[:, 1:, 1] = rng.uniform(-15, 15, (n, V - 1))
    obs[:, 1:, 2] = rng.uniform(-2, 2, (n, V - 1))
    obs[:, 1:, 3] = rng.uniform(-12, 6, (n, V - 1))
    obs[:, 1:, 4] = rng.uniform(-1, 1, (n, V - 1))
    obs[:, 1:][~present] = 0.0

    rows = collision_risk(obs)
    flat = collision_risk(obs.reshape(n, V * 6))
    assert rows.shape == (n,)
    np.testing.assert_array_equal(rows, flat)
    assert (rows == -1).any() and ((rows < 0) & (rows > -1)).any() and (rows == 0).any()
    one_by_one = np.array([collision_risk(obs[i : i + 1])[0] for i in range(n)])
    np.testing.assert_array_equal(rows, one_by_one)


def test_ego_only_observation():
    assert collision_risk(np.zeros((3, 6)) + [1, 100, 4, 25, 0, 0]).tolist() == [0.0, 0.0, 0.0]


# ---- training_reward ------------------------------------------------------------------------

RACER = RewardParams.build(configs.PRESETS["racer_highway"].reward, configs.PRESETS["racer_highway"].env)
KEYS = {
    "training_reward",
    "safety_reward",
    "collision_risk",
    "offroad_penalty",
    "forward_speed_reward",
    "speed_correction",
}


def env_rewards(high_speed, on_road, n=1):
    return {
        "collision_reward": np.zeros(n),
        "right_lane_reward": np.ones(n),
        "high_speed_reward": np.full(n, high_speed),
        "on_road_reward": np.full(n, on_road),
    }


def test_training_reward_terms():
    obs = np.concatenate([scene(ego_vx=37.5), scene((8.0, 0.0, -5.0, 0.0), ego_vx=37.5)])
    out = training_reward(obs, np.array([0.9, 0.9]), env_rewards(1.0, 1.0, 2), np.array([False, True]), RACER)
    assert set(out) == KEYS and all(v.shape == (2,) for v in out.values())
    np.testing.assert_allclose(out["forward_speed_reward"], [0.5, 0.5])
    # env units: span = 0.4 + 0.1 - (-1) = 1.5; correction = (0.4 * 0.5 - 0.4 * 1) / 1.5
    np.testing.assert_allclose(out["speed_correction"], [-0.2 / 1.5] * 2)
    np.testing.assert_allclose(out["offroad_penalty"], [0.0, -0.5])
    np.testing.assert_allclose(out["collision_risk"], [0.0, -math.exp(-1.8)], atol=1e-6)
    np.testing.assert_allclose(out["safety_reward"], [0.0, -0.5 - math.exp(-1.8)], atol=1e-6)
    expected = 0.9 - 0.2 / 1.5 + 0.01 * out["safety_reward"]
    np.testing.assert_allclose(out["training_reward"], expected)


def test_forward_speed_reward_clips():
    obs = np.concatenate([scene(ego_vx=v) for v in (10.0, 30.0, 45.0, 60.0)])
    out = training_reward(obs, np.zeros(4), env_rewards(0.0, 1.0, 4), np.zeros(4, bool), RACER)
    np.testing.assert_allclose(out["forward_speed_reward"], [0.0, 0.0, 1.0, 1.0])


def test_speed_correction_zero_off_road_and_when_disabled():
    obs = scene(ego_vx=40.0)
    off = training_reward(obs, np.zeros(1), env_rewards(1.0, 0.0), np.array([True]), RACER)
    assert off["speed_correction"][0] == 0.0
    disabled = dataclasses.replace(RACER, speed_correction=False)
    on = training_reward(obs, np.zeros(1), env_rewards(1.0, 1.0), np.array([False]), disabled)
    assert on["speed_correction"][0] == 0.0


def test_speed_correction_without_normalization():
    cfg = dataclasses.replace(RACER, normalize_reward=False, high_speed_reward=0.5, speed_weight=0.4)
    out = training_reward(scene(ego_vx=37.5), np.zeros(1), env_rewards(0.25, 1.0), np.array([False]), cfg)
    assert out["speed_correction"][0] == pytest.approx(0.4 * 0.5 - 0.5 * 0.25)


def test_speed_correction_zero_with_equal_ranges_and_weights():
    vx = np.linspace(15.0, 50.0, 64, dtype=np.float32)
    obs = np.concatenate([scene(ego_vx=v) for v in vx])
    same = dataclasses.replace(RACER, speed_range=(20.0, 30.0), speed_weight=RACER.high_speed_reward)
    env_speed = np.clip((vx.astype(np.float64) - 20.0) / 10.0, 0, 1)
    rewards = {**env_rewards(0.0, 1.0, 64), "high_speed_reward": env_speed}
    out = training_reward(obs, np.zeros(64), rewards, np.zeros(64, bool), same)
    np.testing.assert_allclose(out["speed_correction"], 0.0, atol=1e-7)


def test_bare_cfg_with_only_spec_attributes():
    bare = SimpleNamespace(
        speed_correction=True,
        speed_range=(30.0, 45.0),
        speed_weight=0.4,
        safety_coeff=0.01,
        collision_reward=-1.0,
        right_lane_reward=0.1,
        high_speed_reward=0.4,
        normalize_reward=True,
    )
    obs = scene((8.0, 0.0, -5.0, 0.0), ego_vx=37.5)
    out = training_reward(obs, np.ones(1), env_rewards(1.0, 1.0), np.array([False]), bare)
    full = training_reward(obs, np.ones(1), env_rewards(1.0, 1.0), np.array([False]), RACER)
    for key in KEYS:
        np.testing.assert_array_equal(out[key], full[key])


def _rollout(env_cfg, seed, actions):
    env = make_env(env_cfg)
    env.reset(seed=seed)
    steps = [env.step(np.asarray(a, dtype=np.float32)) for a in actions]
    env.close()
    obs, reward, terminated, _, info = zip(*steps, strict=True)
    return {
        "obs": np.stack(obs),
        "reward": np.array(reward),
        "terminated": np.array(terminated),
        "rewards": {k: np.array([i["rewards"][k] for i in info]) for k in info[0]["rewards"]},
        "offroad": np.array([i["offroad"] for i in info]),
        "crashed": np.array([i["crashed"] for i in info]),
        "forward_speed": np.array([i["forward_speed"] for i in info]),
    }


@pytest.mark.parametrize(
    "seed, actions",
    [
        (2, [[1.0, 0.0]] * 16),  # full throttle into traffic: crashes at the 16th step
        (0, [[0.5, 0.5]] + [[0.5, 0.0]] * 6),  # steer off the right edge of the road
    ],
    ids=["crash", "offroad"],
)
def test_speed_correction_on_the_real_simulator(seed, actions):
    """base + correction on [20, 30] equals the env's own reward recomputed with [30, 45]."""
    env_cfg = dataclasses.replace(configs.PRESETS["racer_highway"].env, vehicles_count=10)
    fast_range = dataclasses.replace(env_cfg, reward_speed_range=(30.0, 45.0))
    a = _rollout(env_cfg, seed, actions)
    b = _rollout(fast_range, seed, actions)  # same dynamics: only the reward's range differs
    np.testing.assert_array_equal(a["obs"], b["obs"])
    assert a["crashed"].any() if seed == 2 else (a["rewards"]["on_road_reward"] == 0).any()
    np.testing.assert_allclose(a["forward_speed"], a["obs"][:, 3], rtol=1e-6)

    params = RewardParams.build(configs.PRESETS["racer_highway"].reward, env_cfg)
    out = training_reward(a["obs"], a["reward"], a["rewards"], a["offroad"], params)
    np.testing.assert_allclose(a["reward"] + out["speed_correction"], b["reward"], atol=1e-6)
    assert np.abs(out["speed_correction"]).max() > 0.05
    assert (out["speed_correction"][a["rewards"]["on_road_reward"] == 0] == 0).all()

    same = RewardParams.build(RewardConfig(speed_range=(30.0, 45.0)), fast_range)
    out_b = training_reward(b["obs"], b["reward"], b["rewards"], b["offroad"], same)
    np.testing.assert_allclose(out_b["speed_correction"], 0.0, atol=1e-6)
