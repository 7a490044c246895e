"""design §3 and 8: the env layer on the real simulator, and the forkserver vector env with its faults."""

import dataclasses
import math
import os
import pickle
import signal
import subprocess
import sys
import textwrap
from dataclasses import field

import numpy as np
import pytest

from conftest import ROOT

import configs
from racer_vec.config import STEERING, ConfigError, EnvConfig
from racer_vec.sim.highway import (
    STEP_KEYS,
    EnvWorkerError,
    final_observations,
    find_failed_worker,
    make_env,
    make_vector_env,
    step_values,
)

RACER = configs.PRESETS["racer_highway"].env
FAST = configs.PRESETS["highway_fast"].env
# the env layer's rules do not need 50 vehicles; a light scene keeps the tests fast
LIGHT = dataclasses.replace(RACER, vehicles_count=5)


def act(*a):
    return np.asarray(a, dtype=np.float32)


@pytest.mark.parametrize("preset", sorted(configs.PRESETS))
def test_observation_shape_bounds_and_info(preset):
    cfg = configs.PRESETS[preset].env
    env = make_env(cfg, seed=0)
    size = cfg.observed_vehicles * 6
    space = env.observation_space
    assert space.shape == (size,) and space.dtype == np.float32
    assert (space.low == -100).all() and (space.high == 100).all()
    assert env.action_space.shape == (2,) and (env.action_space.low == -1).all()

    obs, info = env.reset(seed=0)
    assert obs.shape == (size,) and obs.dtype == np.float32 and space.contains(obs)
    assert obs[1] == 100.0  # the ego's absolute x (>= 100 m at the start) is clipped
    obs, reward, terminated, truncated, info = env.step(act(0.0, 0.0))
    assert space.contains(obs) and isinstance(reward, float)
    rows = obs.reshape(-1, 6)
    assert rows[0, 0] == 1 and (rows[:, 0] == 1).sum() > 1
    for key, kind in [
        ("offroad", bool),
        ("crashed", bool),
        ("speed", float),
        ("forward_speed", float),
        ("nearest_distance", float),
        ("offroad_terminated", bool),
    ]:
        assert type(info[key]) is kind, key
    assert set(STEP_KEYS) <= set(info)
    assert set(info["rewards"]) == {"collision_reward", "right_lane_reward", "high_speed_reward", "on_road_reward"}
    assert info["forward_speed"] == pytest.approx(rows[0, 3], rel=1e-6)
    env.close()


def _after(env, seed, actions):
    env.reset(seed=seed)
    for a in actions:
        _, _, _, _, info = env.step(act(*a))
    ego = env.unwrapped.vehicle
    return ego.position.copy(), info["speed"]


def test_index_1_is_steering_index_0_is_acceleration():
    assert STEERING == 1
    env = make_env(LIGHT)
    straight, speed = _after(env, 0, [[0.0, 0.0]] * 2)
    for steer in (0.5, -0.5):
        pos, steered_speed = _after(env, 0, [[0.0, steer]] * 2)
        assert np.sign(pos[1] - straight[1]) == np.sign(steer) and abs(pos[1] - straight[1]) > 1.0
        assert steered_speed == pytest.approx(speed, abs=0.5)
    pos, faster = _after(env, 0, [[1.0, 0.0]] * 2)
    assert faster > speed + 1.0 and pos[1] == pytest.approx(straight[1], abs=1e-9)
    pos, slower = _after(env, 0, [[-1.0, 0.0]] * 2)
    assert slower < speed - 1.0 and pos[1] == pytest.approx(straight[1], abs=1e-9)
    env.close()


def _drive_off_road(env, seed, steps):
    """One hard right turn, then straight ahead: the ego (rightmost lane for these seeds) leaves the road."""
    env.reset(seed=seed)
    out = [env.step(act(0.0, 0.5))]
    while len(out) < steps and not (out[-1][2] or out[-1][3]):
        out.append(env.step(act(0.0, 0.0)))
    return out


def test_racer_highway_terminates_after_20_consecutive_offroad_steps():
    assert RACER.max_offroad_steps == 20 and not RACER.offroad_terminal
    steps = _drive_off_road(make_env(LIGHT), 0, 40)
    offroad = [info["offroad"] for *_, info in steps]
    assert offroad == [False] + [True] * 20
    assert [terminated for _, _, terminated, _, _ in steps] == [False] * 20 + [True]
    *_, reward, terminated, truncated, info = steps[-1]
    assert info["offroad_terminated"] and not info["crashed"] and not truncated
    assert info["rewards"]["on_road_reward"] == 0.0 and reward == 0.0
    assert not any(info["offroad_terminated"] for *_, info in steps[:-1])

    no_rule = _drive_off_road(make_env(dataclasses.replace(LIGHT, max_offroad_steps=0)), 0, 25)
    assert len(no_rule) == 25 and not any(terminated for _, _, terminated, _, _ in no_rule)


def test_highway_fast_offroad_termination_adds_its_reward():
    steps = _drive_off_road(make_env(FAST), 0, 10)
    *_, reward, terminated, _, info = steps[-1]
    assert terminated and info["offroad"] and info["offroad_terminated"] and not info["crashed"]
    # highway-env pays nothing off the road (on_road factor 0): only the env layer's -2 remains
    assert reward == -2.0


def test_crash_is_not_an_offroad_termination():
    env = make_env(dataclasses.replace(RACER, vehicles_count=10))
    env.reset(seed=2)
    for _ in range(40):
        _, _, terminated, _, info = env.step(act(1.0, 0.0))
        if terminated:
            break
    assert terminated and info["crashed"] and not info["offroad_terminated"]


def test_nearest_distance_from_the_simulator():
    env = make_env(RACER)
    obs, info = env.reset(seed=0)
    rows = obs.reshape(-1, 6)[1:]
    observed = np.linalg.norm(rows[rows[:, 0] == 1, 1:3], axis=1).min()
    assert info["nearest_distance"] == pytest.approx(observed, rel=1e-5)
    empty = make_env(dataclasses.replace(RACER, vehicles_count=0))
    assert empty.reset(seed=0)[1]["nearest_distance"] == math.inf


@dataclasses.dataclass(frozen=True)
class ExtraKeys(EnvConfig):
    top: dict = field(default_factory=dict)
    observation: dict = field(default_factory=dict)
    action: dict = field(default_factory=dict)

    def highway_config(self) -> dict:
        config = super().highway_config()
        config.update(self.top)
        config["observation"].update(self.observation)
        config["action"].update(self.action)
        return config


@pytest.mark.parametrize(
    "extra, named",
    [
        ({"top": {"initial_spacing": 2}}, "'initial_spacing'"),
        ({"observation": {"see_behnd": True}}, "'observation.see_behnd'"),
        ({"action": {"steering_rang": [-1, 1]}}, "'action.steering_rang'"),
        ({"env_id": "highway_env:no-such-env-v0"}, "--env.env-id"),
        ({"env_id": "highway-v0"}, "--env.env-id"),
        ({"env_id": "no_such_module:highway-v0"}, "--env.env-id"),
    ],
)
def test_unknown_config_is_refused(extra, named):
    base = dataclasses.asdict(FAST)
    with pytest.raises(ConfigError, match=named):
        make_env(ExtraKeys(**{**base, **extra}))


def test_known_extra_keys_are_accepted():
    cfg = ExtraKeys(**dataclasses.asdict(FAST), top={"initial_lane_id": 1}, observation={"see_behind": True})
    assert make_env(cfg).unwrapped.config["initial_lane_id"] == 1


def test_env_worker_error_pickles_and_survives_gymnasiums_rewrap():
    error = EnvWorkerError(3, "ZeroDivisionError: division by zero")
    clone = pickle.loads(pickle.dumps(error))
    assert (clone.env_index, clone.message) == (3, error.message)
    rewrapped = type(clone)(clone)  # what AsyncVectorEnv raises in the driver
    assert rewrapped.env_index == 3 and "env worker 3" in str(rewrapped)


def test_no_jax_in_worker_imports():
    """Design §2: the whole simulator side, the config, the presets, the entry points' and the
    tools' -m modules import no JAX (workers re-import them as __mp_main__); the simulator side
    imports nothing of the run, learner or sweep side."""
    code = """
import importlib, pkgutil, sys
import racer_vec.sim
sim = [m.name for m in pkgutil.walk_packages(racer_vec.sim.__path__, "racer_vec.sim.")]
assert {"racer_vec.sim.highway", "racer_vec.sim.fast_sim", "racer_vec.sim.rewards", "racer_vec.sim.video"} <= set(sim)
for name in sim:
    importlib.import_module(name)
other_side = sorted(m for m in sys.modules if m.startswith(("racer_vec.run", "racer_vec.learner", "racer_vec.sweep")))
assert not other_side, other_side
for name in ["racer_vec", "racer_vec.config", "racer_vec.validation", "configs", "train", "evaluate",
                   "racer_vec.benchmark", "racer_vec.profile_learner", "racer_vec.plot", "racer_vec.results", "racer_vec.pendulum",
                   "racer_vec.sweep", "racer_vec.sweep.__main__", "racer_vec.run.evaluation"]:
    importlib.import_module(name)
print(sorted(m for m in sys.modules if m == "jax" or m.startswith("jax.")))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


# ---- vector env (forkserver workers) --------------------------------------------------------


def test_vector_env_same_step_autoreset_keeps_final_obs_and_info():
    """Worker 0 drives off the road (highway_fast terminates) while worker 1 drives on; the vector
    results are checked against the same episodes replayed in-process."""
    seed = 1
    envs = make_vector_env(FAST, 2, seed=seed)
    replicas = [make_env(FAST) for _ in range(2)]
    try:
        assert all(type(p).__name__ == "ForkServerProcess" for p in envs.processes)
        obs, infos = envs.reset(seed=seed)
        for i, replica in enumerate(replicas):
            np.testing.assert_array_equal(obs[i], replica.reset(seed=seed + i)[0])

        actions = np.array([[0.0, 0.5], [0.0, 0.0]], dtype=np.float32)
        for _ in range(10):
            obs, reward, terminated, truncated, infos = envs.step(actions)
            expected = [replica.step(a.copy()) for replica, a in zip(replicas, actions, strict=True)]
            actions[0, STEERING] = 0.0
            if terminated.any():
                break
            np.testing.assert_array_equal(obs, np.stack([e[0] for e in expected]))
        assert terminated.tolist() == [True, False]
        assert infos["_final_obs"].tolist() == [True, False]

        real = final_observations(obs, infos)
        np.testing.assert_array_equal(real, np.stack([e[0] for e in expected]))
        assert not np.array_equal(real[0], obs[0])
        np.testing.assert_array_equal(obs[0], replicas[0].reset()[0])  # the reset episode's first obs
        np.testing.assert_array_equal(reward, [e[1] for e in expected])
        assert reward[0] == -2.0

        values = step_values(infos, 2)
        for key in STEP_KEYS:
            np.testing.assert_array_equal(values[key], [e[4][key] for e in expected], err_msg=key)
        for key, r in values["rewards"].items():
            np.testing.assert_array_equal(r, [e[4]["rewards"][key] for e in expected], err_msg=key)
        assert values["offroad_terminated"].tolist() == [True, False]
        # the top level already belongs to worker 0's new episode
        assert not infos["offroad"][0] and infos["rewards"]["on_road_reward"][0] == 1.0
        assert values["rewards"]["on_road_reward"][0] == 0.0

        obs, *_, infos = envs.step(np.zeros((2, 2), dtype=np.float32))
        assert "final_info" not in infos
        np.testing.assert_array_equal(final_observations(obs, infos), obs)
        assert step_values(infos, 2)["speed"].shape == (2,)
    finally:
        envs.close()


@pytest.mark.filterwarnings("ignore::UserWarning")  # gymnasium logs the worker's traceback
def test_worker_exception_is_reported_with_its_index():
    envs = make_vector_env(FAST, 2, seed=0)
    try:
        envs.reset(seed=0)
        # worker 1 only: policy_frequency 0 makes highway-env's own step divide by zero
        envs.reset(options={"config": {"policy_frequency": 0}, "reset_mask": np.array([False, True])})
        with pytest.raises(EnvWorkerError) as caught:
            envs.step(np.zeros((2, 2), dtype=np.float32))
        assert find_failed_worker(envs, caught.value) == 1
        assert "ZeroDivisionError" in str(caught.value)
    finally:
        envs.close()
    assert all(p.exitcode is not None for p in envs.processes)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("mid_step", [False, True], ids=["between-steps", "mid-step"])
def test_dead_worker_is_found_by_its_exit_code(mid_step):
    envs = make_vector_env(FAST, 2, seed=0)
    try:
        envs.reset(seed=0)
        actions = np.zeros((2, 2), dtype=np.float32)
        with pytest.raises((EOFError, BrokenPipeError, ConnectionResetError)) as caught:
            if mid_step:
                # stopped first, the worker cannot answer the step it was sent before it dies (a
                # plain kill after step_async races with a worker that has already replied)
                os.kill(envs.processes[1].pid, signal.SIGSTOP)
                envs.step_async(actions)
                os.kill(envs.processes[1].pid, signal.SIGKILL)
                envs.step_wait()
            else:
                os.kill(envs.processes[1].pid, signal.SIGKILL)
                envs.step(actions)
        assert find_failed_worker(envs, caught.value) == 1
    finally:
        envs.close()
    assert all(p.exitcode is not None for p in envs.processes)


SIGINT_DRIVER = textwrap.dedent(
    """
    import signal, time
    import numpy as np
    import configs
    from racer_vec.sim.highway import make_vector_env

    def main():
        interrupted = []
        # installed before the workers exist: the factory also runs here and must not replace it
        signal.signal(signal.SIGINT, lambda *_: interrupted.append(True))
        envs = make_vector_env(configs.PRESETS["highway_fast"].env, 2, seed=0)
        envs.reset(seed=0)
        print("ready", flush=True)
        deadline = time.monotonic() + 20
        while not interrupted and time.monotonic() < deadline:
            envs.step(np.zeros((2, 2), dtype=np.float32))
        alive = all(p.is_alive() for p in envs.processes)
        envs.step(np.zeros((2, 2), dtype=np.float32))
        print("result", bool(interrupted), alive, flush=True)
        envs.close()

    if __name__ == "__main__":
        main()
    """
)


@pytest.mark.slow
def test_sigint_to_the_process_group_reaches_only_the_driver(tmp_path):
    script = tmp_path / "driver.py"
    script.write_text(SIGINT_DRIVER)
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, like a terminal's foreground job
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, err
    assert out.strip() == "result True True"
