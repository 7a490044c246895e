"""The lane-target action (design §3): action index 1 as a target lateral position across the road,
tracked by the env layer's lateral controller on the stock and the fast simulator alike."""

import dataclasses
import subprocess
import sys

import numpy as np
import pytest

import configs
from conftest import ROOT
from racer_vec.config import ConfigError, EnvConfig
from racer_vec.run.train_cli import parse_train_args
from racer_vec.sim.highway import LaneControl, make_env

FAST = configs.PRESETS["highway_fast"]
LANE_ENV = dataclasses.replace(FAST.env, lane_target_action=True)
EMPTY_ROAD = dataclasses.replace(LANE_ENV, vehicles_count=0, duration=60)
STEPS_PER_S = LANE_ENV.policy_frequency
TOLERANCE = 0.5
"""Metres from the target's lane centre within which a target counts as reached."""


def action_of(lane: float, lanes_count: int = 4) -> float:
    """Action index 1 whose target is the centre of `lane` (fractional: between two centres)."""
    return 2.0 * lane / (lanes_count - 1) - 1.0


def test_the_mapping_spans_the_outer_lane_centres():
    # 4 lanes of 4 m: the last lane's centre is 12 m from the first's
    assert [LaneControl.target_lateral(a, 12.0) for a in (-1.0, -1 / 3, 0.0, 1 / 3, 0.5, 1.0)] == pytest.approx(
        [0.0, 4.0, 6.0, 8.0, 9.0, 12.0]
    )
    assert LaneControl.target_lateral(1.7, 12.0) == 12.0 and LaneControl.target_lateral(-3.0, 8.0) == 0.0
    assert action_of(2) == pytest.approx(1 / 3)


def hold_targets(env_cfg: EnvConfig, speed: float, targets: list[float], seconds: float, seed: int = 1):
    """Lateral positions (m, the first lane's centre at 0) and offroad flags, one per policy step from
    the reset on, holding each action index 1 of `targets` for `seconds` at a constant `speed`."""
    env = make_env(env_cfg)
    try:
        env.reset(seed=seed)
        ego = env.unwrapped.vehicle
        ego.speed = float(speed)  # acceleration 0 below keeps it
        lateral, offroad = [ego.position[1]], [False]
        for target in targets:
            for _ in range(int(seconds * STEPS_PER_S)):
                _, _, terminated, truncated, info = env.step(np.array([0.0, target]))
                assert not (terminated or truncated)
                lateral.append(ego.position[1])
                offroad.append(info["offroad"] or not info["on_road"])
        return np.array(lateral), np.array(offroad)
    finally:
        env.close()


def settling_s(lateral: np.ndarray, target: float) -> float:
    """Seconds until the position stays within TOLERANCE of `target`."""
    outside = np.flatnonzero(np.abs(lateral - target) > TOLERANCE)
    return 0.0 if outside.size == 0 else (outside[-1] + 1) / STEPS_PER_S


# From the seed's start lane (1): one lane, three lanes and back, one lane twice, and a target
# between two centres, each held for 8 s.
TOUR = [0.0, 3.0, 0.0, 1.0, 2.0, 1.5]


@pytest.mark.parametrize("speed", [20.0, 30.0, 40.0])
def test_any_held_target_is_reached_within_6_s_and_held_without_leaving_the_road(speed):
    hold_s = 8
    lateral, offroad = hold_targets(EMPTY_ROAD, speed, [action_of(lane) for lane in TOUR], hold_s)
    assert lateral[0] == pytest.approx(4.0)
    steps = hold_s * STEPS_PER_S
    for k, lane in enumerate(TOUR):
        segment = lateral[k * steps + 1 : (k + 1) * steps + 1]
        assert settling_s(segment, 4.0 * lane) <= 6.0, (speed, k, lane)
    assert not offroad.any()
    # no overshoot beyond the outer lanes' centres, which the targets never leave
    assert lateral.min() > -TOLERANCE and lateral.max() < 12.0 + TOLERANCE


@pytest.mark.parametrize("speed", [20.0, 40.0])
def test_one_lane_takes_about_2_s_and_three_lanes_at_most_5(speed):
    lateral, _ = hold_targets(EMPTY_ROAD, speed, [action_of(0.0), action_of(3.0)], 6)
    one, three = lateral[: 6 * STEPS_PER_S + 1], lateral[6 * STEPS_PER_S :]
    assert 1.4 <= settling_s(one, 0.0) <= 2.6
    assert settling_s(three, 12.0) <= 5.0


def test_one_step_turns_the_heading_to_its_command():
    # The cascade, checked against highway-env's bicycle model: holding the controller's steering
    # for one step turns the heading exactly to arcsin(lateral speed command / speed).
    for target_lane, speed, lateral_speed in ((1.1, 20.0, 0.4), (3.0, 20.0, 4.0), (0.0, 35.0, -4.0), (1.0, 30.0, 0.0)):
        env = make_env(EMPTY_ROAD)
        try:
            env.reset(seed=1)  # lane 1, heading 0
            ego = env.unwrapped.vehicle
            ego.speed = speed
            env.step(np.array([0.0, action_of(target_lane)]))
            assert ego.heading == pytest.approx(np.arcsin(lateral_speed / speed), abs=1e-9), target_lane
        finally:
            env.close()


def test_at_walking_pace_the_heading_stays_within_highway_envs_45_degrees():
    # 2 m/s: the lateral speed command (4 m/s) asks for more than the speed; the heading is capped
    env = make_env(EMPTY_ROAD)
    try:
        env.reset(seed=1)
        ego = env.unwrapped.vehicle
        ego.speed = 2.0
        headings, lateral = [], []
        for _ in range(10 * STEPS_PER_S):
            _, _, _, _, info = env.step(np.array([0.0, 1.0]))
            headings.append(ego.heading)
            lateral.append(ego.position[1])
            assert not info["offroad"]
        assert max(np.abs(headings)) == pytest.approx(np.pi / 4)
        assert settling_s(np.array(lateral), 12.0) <= 8.0
    finally:
        env.close()


@pytest.mark.parametrize("lanes_count", [2, 5])
def test_the_outer_targets_are_the_roads_own_outer_lanes(lanes_count):
    env_cfg = dataclasses.replace(EMPTY_ROAD, lanes_count=lanes_count)
    lateral, offroad = hold_targets(env_cfg, 30.0, [-1.0, 1.0], 6 + 2 * lanes_count)
    steps = len(lateral) // 2
    assert abs(lateral[steps] - 0.0) < 0.05 and abs(lateral[-1] - 4.0 * (lanes_count - 1)) < 0.05
    assert not offroad.any()


def test_with_the_target_speed_action_the_action_is_target_speed_and_lateral_position():
    env_cfg = dataclasses.replace(EMPTY_ROAD, target_speed_action=True)
    env = make_env(env_cfg)
    try:
        obs, _ = env.reset(seed=1)
        assert env.action_space.shape == (2,) and obs.shape == (env_cfg.obs_dim,)
        ego = env.unwrapped.vehicle
        for _ in range(6 * STEPS_PER_S):  # 35 m/s (from 25), and the last lane (from lane 1)
            env.step(np.array([0.75, 1.0]))
        assert ego.speed == pytest.approx(35.0) and abs(ego.position[1] - 12.0) < TOLERANCE
    finally:
        env.close()


def episode(env_cfg: EnvConfig, seed: int) -> tuple[np.ndarray, np.ndarray]:
    env = make_env(env_cfg)
    rng = np.random.default_rng(seed)
    try:
        obs, _ = env.reset(seed=seed)
        observations, rewards = [obs], []
        for step in range(env_cfg.duration * env_cfg.policy_frequency):
            # a new target every second, and a target speed the pack and the ego's 25 m/s span
            if step % STEPS_PER_S == 0:
                action = np.array([rng.uniform(0.0, 0.8), rng.uniform(-1.0, 1.0)])
            obs, reward, terminated, truncated, _ = env.step(action)
            observations.append(obs)
            rewards.append(reward)
            if terminated or truncated:
                break
        return np.array(observations), np.array(rewards)
    finally:
        env.close()


def test_stock_and_fast_simulator_are_identical_under_the_lane_target_action():
    env_cfg = dataclasses.replace(LANE_ENV, target_speed_action=True, duration=20)
    stock = episode(dataclasses.replace(env_cfg, fast_sim=False), seed=5)
    fast = episode(env_cfg, seed=5)
    assert len(fast[1]) > 20 and np.ptp(fast[0][:, 2]) > 4.0  # the ego's y: it changed lanes
    np.testing.assert_array_equal(fast[0], stock[0])
    np.testing.assert_array_equal(fast[1], stock[1])


def test_a_learned_steering_limit_is_refused_with_the_lane_target_action():
    # racer_highway's learned limit is a steering box [-h, h]: it would pin the target mid-road
    with pytest.raises(ConfigError) as refused:
        parse_train_args(["--env.lane-target-action"])
    message = str(refused.value)
    assert "--env.lane-target-action" in message and "--agent.limited-action steering" in message
    assert "\n" not in message
    assert parse_train_args(["--env.lane-target-action", "--agent.no-learned-limit"]).env.lane_target_action
    speed_cap = ["--env.lane-target-action", "--env.target-speed-action", "--agent.limited-action", "speed"]
    assert parse_train_args(speed_cap).agent.limited_action == "speed"
    assert parse_train_args(["highway_fast", "--env.lane-target-action"]).env.lane_target_action
    refused_run = subprocess.run([sys.executable, str(ROOT / "train.py"), "--env.lane-target-action"],
                                 capture_output=True, text=True, timeout=60, cwd=ROOT)  # fmt: skip
    assert refused_run.returncode == 2 and refused_run.stderr.strip() == f"error: {message}"
