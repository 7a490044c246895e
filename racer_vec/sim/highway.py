"""The env layer (design §3): one highway-env per worker, and the AsyncVectorEnv of N of them.

No JAX here: forkserver/spawn workers import this module (design §2, import hygiene).

Seeding: worker i is built with seed `seed + i` and reset with it once at construction, so every
worker's simulator and action space start from a distinct, reproducible seed. The driver's
`envs.reset(seed=seed)` gives worker i the same `seed + i` (gymnasium's rule for an int seed); after
that, SAME_STEP autoresets continue each worker's own random stream.

Info keys of every step and reset (`STEP_KEYS` plus `rewards`), per worker:
  offroad             bool   design §3 rule: |lateral lane offset| > half the lane width, or not on the road
  crashed             bool
  speed               float  m/s
  forward_speed       float  speed * cos(heading), m/s
  nearest_distance    float  metres to the nearest other vehicle, centre to centre (inf when none)
  offroad_terminated  bool   this step terminated the episode without a crash
  on_road             bool   highway-env's own `on_road` (the release's offroad test, design §11)
  lane_change         int    1 if the ego's lane differs from the previous step's (driving.DrivingDiagnostics)
  overtakes           int    vehicles the ego passed this step minus those that passed it
  distance            float  metres of the ego's progress along the road this step
  rewards             dict   highway-env's reward terms (as floats)
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import inspect
import math
import multiprocessing
import multiprocessing.connection
import os
import signal
import time
from collections.abc import Callable, Container

import gymnasium as gym
import numpy as np
from gymnasium.envs.registration import load_env_creator
from gymnasium.vector import AsyncVectorEnv, AutoresetMode
from gymnasium.vector.async_vector_env import AsyncState
from highway_env import utils

from racer_vec.config import WORKER_TIMEOUT_S, ConfigError, EnvConfig
from racer_vec.sim.driving import DIAGNOSTIC_KEYS, DrivingDiagnostics, IdmEgo
from racer_vec.sim.video import configure_headless

OBS_CLIP = 100.0
STEP_KEYS = ("offroad", "crashed", "speed", "forward_speed", "nearest_distance", "offroad_terminated", "on_road",
             *DIAGNOSTIC_KEYS)
"""Scalar per-step info values; `step_values` also returns the `rewards` dict."""
DEAD_WORKER_POLL_S = 2.0
"""How long find_failed_worker waits for a dead worker's exit code (it is None for a few ms)."""
WAIT_SLICE_S = 0.2
"""A wait for the workers looks at the stop flag, the dead workers and the clock this often (design §8)."""
CLOSE_TIMEOUT_S = 2.0
"""How long a close lets healthy workers close their envs (milliseconds, normally) before it kills them."""


class EnvWorkerError(RuntimeError):
    """An exception raised inside worker `env_index`'s step or reset."""

    def __init__(self, env_index: int | EnvWorkerError, message: str | None = None):
        # AsyncVectorEnv re-raises a worker's exception in the driver as `type(exc)(exc)`
        if isinstance(env_index, EnvWorkerError):
            env_index, message = env_index.env_index, env_index.message
        super().__init__(env_index, message)
        self.env_index = int(env_index)
        self.message = message

    def __reduce__(self):
        # the worker sends it to the driver through a multiprocessing queue: it must unpickle
        return (EnvWorkerError, (self.env_index, self.message))

    def __str__(self) -> str:
        return f"env worker {self.env_index}: {self.message}"


def _env_class(env_id: str) -> type:
    module, sep, name = env_id.rpartition(":")
    if not sep:
        raise ConfigError(
            f"--env.env-id must have the module:id form (e.g. highway_env:highway-v0), got '{env_id}'"
        )
    try:
        importlib.import_module(module)
    except ImportError as e:
        raise ConfigError(f"--env.env-id: cannot import module '{module}' ({e})") from None
    try:
        entry_point = gym.spec(name).entry_point
    except gym.error.Error as e:
        raise ConfigError(f"--env.env-id: unknown environment '{env_id}' ({e})") from None
    env_class = load_env_creator(entry_point) if isinstance(entry_point, str) else entry_point
    if not hasattr(env_class, "default_config"):
        raise ConfigError(f"--env.env-id: '{env_id}' is not a highway-env environment")
    return env_class


def _known_keys(component) -> set[str]:
    """The config keys an observation/action type reads: its constructor's named parameters."""
    params = inspect.signature(type(component).__init__).parameters.values()
    named = {p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    return (named - {"self", "env"}) | {"type"}


def _check_keys(config: dict, known: Container[str], where: str) -> None:
    # highway-env silently ignores keys it does not read (that is how `initial_spacing` went unnoticed)
    for key in config:
        if key not in known:
            raise ConfigError(f"unknown highway-env config key '{where}{key}'")


def policy_step_s(env_cfg: EnvConfig) -> float:
    """Seconds per policy step: highway-env holds an action for simulation // policy frequency frames."""
    return (env_cfg.simulation_frequency // env_cfg.policy_frequency) / env_cfg.simulation_frequency


@dataclasses.dataclass(frozen=True)
class SpeedControl:
    """Action index 0 as a target speed, tracked by a proportional controller (design §3).

    Once per policy step, on the simulator's own speed v: acceleration `gain * (v* - v) / T` over the
    step's duration T (highway-env holds an action for the whole step), clipped to the action type's
    acceleration range. With gain <= 1 the speed moves at most to the target, never past it, and the
    same arithmetic runs on the stock and the fast simulator.
    """

    low: float
    high: float
    gain: float
    step_s: float
    """Seconds per policy step (`policy_step_s`)."""
    acceleration_range: tuple[float, float]

    @classmethod
    def of(cls, env_cfg: EnvConfig, env: gym.Env) -> SpeedControl | None:
        if not env_cfg.target_speed_action:
            return None
        low, high = env_cfg.target_speed_range
        accel = tuple(float(a) for a in env.unwrapped.action_type.acceleration_range)
        return cls(low, high, env_cfg.speed_control_gain, policy_step_s(env_cfg), accel)

    def target_speed(self, action0) -> float:
        return self.low + (float(np.clip(action0, -1.0, 1.0)) + 1.0) / 2.0 * (self.high - self.low)

    def __call__(self, action: np.ndarray, speed: float) -> np.ndarray:
        """The ContinuousAction that tracks `action[0]`'s target speed from `speed`."""
        acceleration = self.gain * (self.target_speed(action[0]) - speed) / self.step_s
        lo, hi = self.acceleration_range
        command = np.array(action, dtype=np.float64)
        command[0] = np.clip(2.0 * (acceleration - lo) / (hi - lo) - 1.0, -1.0, 1.0)
        return command


@dataclasses.dataclass(frozen=True)
class LaneControl:
    """Action index 1 as a target lateral position across the road, tracked by a lateral controller
    (design §3): -1 is the centre of the road's first lane, 1 the centre of its last, continuous in between.

    highway-env's `ControlledVehicle.steering_control` cascade (lateral position error -> lateral
    speed -> heading -> heading rate -> steering), run once per policy step, because highway-env holds
    the ego's action for all of the step's frames, on the simulator's own position, heading and speed
    (the same arithmetic on the stock and the fast simulator). Lateral positions are in the frame of
    the road's first lane (its centre line is 0).
    """

    step_s: float
    """Seconds per policy step (`policy_step_s`)."""
    steering_range: tuple[float, float]

    TAU_LATERAL = 1.0
    """Time constant (s) of the lateral approach: one lane (4 m) settles within 0.5 m in about 2 s
    (τ ln 8 = 2.1 s for a first-order approach; 1.8-2.0 s measured, design §3), a calm lane change;
    highway-env's own 0.6 s would swerve across in 1.2 s."""
    MAX_LATERAL_SPEED = 4.0
    """Cap (m/s) on the lateral speed command: three lanes take about 4 s, with headings of at most
    0.2 rad at 20 m/s and 0.1 rad at 40 m/s; an uncapped 12 m error would ask for 12 m/s."""
    MAX_HEADING = math.pi / 4
    """Cap (rad) on the heading command relative to the road, highway-env's own (binding below 5.7 m/s)."""

    @classmethod
    def of(cls, env_cfg: EnvConfig, env: gym.Env) -> LaneControl | None:
        if not env_cfg.lane_target_action:
            return None
        steering = tuple(float(s) for s in env.unwrapped.action_type.steering_range)
        return cls(policy_step_s(env_cfg), steering)

    @staticmethod
    def target_lateral(action1, outer_lateral: float) -> float:
        """The target lateral position of `action1`, with the last lane's centre at `outer_lateral`."""
        return (float(np.clip(action1, -1.0, 1.0)) + 1.0) / 2.0 * outer_lateral

    def steering(self, target: float, lateral: float, heading: float, speed: float, length: float) -> float:
        """The steering angle (rad) that, held for a step, steers from `lateral` towards `target`.

        `heading` is relative to the road. The heading rate brings the heading to its command by the
        end of the step (a one-step deadbeat, like SpeedControl's gain 1), and the bicycle model's
        heading rate `v sin(β) / (L/2)`, with `tan δ = 2 tan β`, gives the steering angle δ.
        """
        speed = utils.not_zero(speed)
        lateral_speed = np.clip((target - lateral) / self.TAU_LATERAL, -self.MAX_LATERAL_SPEED, self.MAX_LATERAL_SPEED)
        heading_command = np.clip(np.arcsin(np.clip(lateral_speed / speed, -1, 1)), -self.MAX_HEADING, self.MAX_HEADING)
        heading_rate = utils.wrap_to_pi(heading_command - heading) / self.step_s
        slip = np.arcsin(np.clip(length / 2 / speed * heading_rate, -1, 1))
        return float(np.arctan(2 * np.tan(slip)))

    def __call__(self, action: np.ndarray, vehicle) -> np.ndarray:
        """The ContinuousAction that steers `vehicle` towards `action[1]`'s target lateral position."""
        first, last = self._outer_lanes(vehicle)
        longitudinal, lateral = first.local_coordinates(vehicle.position)
        outer_lateral = first.local_coordinates(last.position(longitudinal, 0.0))[1]
        target = self.target_lateral(action[1], outer_lateral)
        heading = vehicle.heading - first.heading_at(longitudinal)
        angle = self.steering(target, lateral, heading, vehicle.speed, vehicle.LENGTH)
        lo, hi = self.steering_range
        command = np.array(action, dtype=np.float64)
        command[1] = np.clip(2.0 * (angle - lo) / (hi - lo) - 1.0, -1.0, 1.0)
        return command

    @staticmethod
    def _outer_lanes(vehicle):
        """The first and the last lane of the road the vehicle is on (highway-env's lane order)."""
        from_, to, _ = vehicle.lane_index
        lanes = vehicle.road.network.graph[from_][to]
        return lanes[0], lanes[-1]


class HighwayLayer(gym.Wrapper, gym.utils.RecordConstructorArgs):
    """Flat clipped observation, enriched info, the env layer's offroad rules and, with
    --env.target-speed-action and --env.lane-target-action, the speed and lateral controllers (design §3)."""

    def __init__(
        self,
        env: gym.Env,
        max_offroad_steps: int,
        offroad_termination_reward: float,
        speed_control: SpeedControl | None = None,
        lane_control: LaneControl | None = None,
    ):
        # recorded in env.spec, so that gymnasium can make this env again (design §3, gymnasium ids)
        gym.utils.RecordConstructorArgs.__init__(
            self,
            max_offroad_steps=max_offroad_steps,
            offroad_termination_reward=offroad_termination_reward,
            speed_control=speed_control,
            lane_control=lane_control,
        )
        super().__init__(env)
        self.observation_space = gym.spaces.Box(
            -OBS_CLIP, OBS_CLIP, shape=(math.prod(env.observation_space.shape),), dtype=np.float32
        )
        self.max_offroad_steps = max_offroad_steps
        self.offroad_termination_reward = offroad_termination_reward
        self.speed_control = speed_control
        self.lane_control = lane_control
        self.offroad_steps = 0
        self.diagnostics = DrivingDiagnostics()

    def _observation(self, obs: np.ndarray) -> np.ndarray:
        return np.clip(obs.reshape(-1), -OBS_CLIP, OBS_CLIP).astype(np.float32)

    def _info(self, info: dict, reset: bool = False) -> dict:
        ego = self.env.unwrapped.vehicle
        longitudinal, lateral, _ = ego.lane_offset
        offroad = abs(lateral) > ego.lane.width_at(longitudinal) / 2 or not ego.on_road
        others = [v for v in self.env.unwrapped.road.vehicles if v is not ego]
        positions = np.array([v.position for v in others]).reshape(-1, 2)
        nearest = float(np.min(np.linalg.norm(positions - ego.position, axis=1))) if others else math.inf
        driving = (self.diagnostics.reset if reset else self.diagnostics.step)(ego, others, positions)
        # plain Python types: AsyncVectorEnv stacks each key with the dtype of the first env's value
        return {
            **info,
            "offroad": bool(offroad),
            "crashed": bool(ego.crashed),
            "speed": float(ego.speed),
            "forward_speed": float(ego.speed * math.cos(ego.heading)),
            "nearest_distance": nearest,
            "offroad_terminated": False,
            "on_road": bool(ego.on_road),
            **driving,
            "rewards": {k: float(r) for k, r in info["rewards"].items()},
        }

    def reset(self, *, seed=None, options=None):
        obs, info = self.env.reset(seed=seed, options=options)
        self.offroad_steps = 0
        return self._observation(obs), self._info(info, reset=True)

    def step(self, action):
        # a new array: highway-env's info holds the action it was given, and no two steps' infos may share
        # an object (a caller may step one array twice)
        action = np.array(action)
        vehicle = self.env.unwrapped.vehicle
        if self.speed_control is not None:
            action = self.speed_control(action, vehicle.speed)
        if self.lane_control is not None:
            action = self.lane_control(action, vehicle)
        obs, reward, terminated, truncated, info = self.env.step(action)
        info = self._info(info)
        self.offroad_steps = self.offroad_steps + 1 if info["offroad"] else 0
        terminated = bool(terminated) or 0 < self.max_offroad_steps <= self.offroad_steps
        # design §3: an offroad termination is a termination without a crash
        info["offroad_terminated"] = terminated and not info["crashed"]
        reward = float(reward)
        if info["offroad_terminated"]:
            reward += self.offroad_termination_reward
        return self._observation(obs), reward, terminated, bool(truncated), info


class TagErrors(gym.Wrapper, gym.utils.RecordConstructorArgs):
    """Re-raise any exception of step/reset as EnvWorkerError carrying this worker's index."""

    def __init__(self, env: gym.Env, env_index: int):
        gym.utils.RecordConstructorArgs.__init__(self, env_index=env_index)
        super().__init__(env)
        self.env_index = env_index

    def _tagged(self, e: Exception) -> EnvWorkerError:
        return EnvWorkerError(self.env_index, f"{type(e).__name__}: {e}")

    def reset(self, *, seed=None, options=None):
        try:
            return self.env.reset(seed=seed, options=options)
        except Exception as e:
            raise self._tagged(e) from e

    def step(self, action):
        try:
            return self.env.step(action)
        except Exception as e:
            raise self._tagged(e) from e


class EpisodeControl(gym.Wrapper):
    """Worker side of evaluation: idles from the end of its episode until the next reset, and films.

    Idle, `step` returns the final observation without simulating, so workers without an episode
    left cost no CPU. With `filming` set (per env, with `set_attr`), reset and step infos carry
    the rendered frame as `info["frame"]`.
    """

    def __init__(self, env: gym.Env):
        super().__init__(env)
        if env.render_mode is not None:
            configure_headless()  # in the worker, before pygame's display starts
        self.filming = False
        self._running = False
        self._final_obs = np.zeros(self.observation_space.shape, self.observation_space.dtype)

    def reset(self, *, seed=None, options=None):
        obs, info = self.env.reset(seed=seed, options=options)
        self._running = True
        return obs, self._with_frame(info)

    def step(self, action):
        if not self._running:
            return self._final_obs, 0.0, False, False, {}
        obs, reward, terminated, truncated, info = self.env.step(action)
        if terminated or truncated:
            self._running = False
            self._final_obs = obs
        return obs, reward, terminated, truncated, self._with_frame(info)

    def _with_frame(self, info: dict) -> dict:
        if not self.filming:
            return info
        frame = self.env.render()
        # Once a frame was taken, highway-env also renders every intermediate simulation frame of
        # the next step (for its own video recorder); they are discarded here.
        self.env.unwrapped.enable_auto_render = False
        return {**info, "frame": frame}


def simulator_id(env_cfg: EnvConfig) -> str:
    """The env id to build: the fast simulator's twin of `env_id` unless --env.no-fast-sim."""
    if not env_cfg.fast_sim:
        return env_cfg.env_id
    from racer_vec.sim.fast_sim import FAST_SIM_IDS

    if env_cfg.env_id not in FAST_SIM_IDS:
        raise ConfigError(
            f"--env.fast-sim: no fast simulator for {env_cfg.env_id} (it has one for "
            f"{', '.join(FAST_SIM_IDS)}); use --env.no-fast-sim"
        )
    return FAST_SIM_IDS[env_cfg.env_id]


def make_env(
    env_cfg: EnvConfig,
    *,
    seed: int | None = None,
    render_mode: str | None = None,
    env_index: int = 0,
    idm_ego_speed: float | None = None,
) -> gym.Env:
    """One highway env with the env layer; raises ConfigError for an unknown id or config key.

    With a seed, the env and its action space are seeded (the env is reset once with it). With
    `idm_ego_speed`, highway-env's IDM + MOBIL driver with that target speed drives the ego and the
    actions are ignored (driving.IdmEgo, the textbook baseline).
    """
    config = env_cfg.highway_config()
    _check_keys(config, _env_class(env_cfg.env_id).default_config(), "")
    env_id = simulator_id(env_cfg)
    env = gym.make(env_id, config=config, render_mode=render_mode)
    try:
        for section, component in (
            ("observation", env.unwrapped.observation_type),
            ("action", env.unwrapped.action_type),
        ):
            _check_keys(config[section], _known_keys(component), f"{section}.")
    except ConfigError:
        env.close()
        raise
    if idm_ego_speed is not None:
        env = IdmEgo(env, idm_ego_speed)
    layer = HighwayLayer(
        env,
        env_cfg.max_offroad_steps,
        env_cfg.offroad_termination_reward,
        SpeedControl.of(env_cfg, env),
        LaneControl.of(env_cfg, env),
    )
    env = TagErrors(layer, env_index)
    if seed is not None:
        env.reset(seed=seed)
        env.action_space.seed(seed)
    return env


def check_env(env_cfg: EnvConfig) -> None:
    """Make one env and close it, before any worker starts: an unknown env id or config key raises
    ConfigError here, and its observations must have `env_cfg.obs_dim` values (what the agent and the
    buffer are built for)."""
    env = make_env(env_cfg)
    try:
        shape = env.observation_space.shape
    finally:
        env.close()
    if shape != (env_cfg.obs_dim,):
        raise RuntimeError(f"{env_cfg.env_id}: observations of shape {shape}, expected ({env_cfg.obs_dim},)")


def _worker_env(
    env_cfg: EnvConfig, seed: int | None, env_index: int, render_mode: str | None, wrapper, idm_ego_speed: float | None
) -> gym.Env:
    # A terminal's Ctrl-C reaches the whole process group; only the driver handles it (design §8).
    # AsyncVectorEnv also calls the first factory in the driver: keep the driver's handler there.
    if multiprocessing.parent_process() is not None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    env = make_env(env_cfg, seed=seed, render_mode=render_mode, env_index=env_index, idm_ego_speed=idm_ego_speed)
    return env if wrapper is None else wrapper(env)


def make_vector_env(
    env_cfg: EnvConfig,
    num_envs: int,
    *,
    seed: int,
    autoreset_mode: AutoresetMode = AutoresetMode.SAME_STEP,
    context: str = "forkserver",
    render_mode: str | None = None,
    wrapper: Callable[[gym.Env], gym.Env] | None = None,
    idm_ego_speed: float | None = None,
    worker_timeout: float = WORKER_TIMEOUT_S,
    should_stop: Callable[[], bool] | None = None,
) -> WatchedVectorEnv:
    """N worker processes with shared-memory observations; worker i is seeded `seed + i`.

    `wrapper` (picklable, e.g. a gym.Wrapper class) wraps each worker's env inside the worker;
    `idm_ego_speed` makes highway-env's IDM driver the ego (`make_env`). `worker_timeout` and
    `should_stop` bound every wait for the workers (WatchedVectorEnv).

    Use forkserver or spawn: the driver runs JAX, which is multithreaded, so never fork it.
    """
    if context == "forkserver":
        # Import the simulator once in the forkserver (it only reads this before it starts): each
        # worker is then forked ready instead of importing gymnasium, pandas and highway-env anew
        # (~0.1 s instead of ~1.7 s per vector env on the 2-core machine). "__main__" is the default.
        preload = ["__main__", "racer_vec.sim.highway", "highway_env", "racer_vec.sim.fast_sim"]
        if wrapper is not None:
            preload.append(wrapper.__module__)
        multiprocessing.get_context("forkserver").set_forkserver_preload(preload)
    # The driver reports worker faults itself, in one line (design §10); gymnasium would also log
    # each one with the worker's traceback, and warn when a faulted vector env is closed.
    gym.logger.min_level = gym.logger.ERROR + 1
    env_fns = [
        functools.partial(_worker_env, env_cfg, seed + i, i, render_mode, wrapper, idm_ego_speed)
        for i in range(num_envs)
    ]
    return WatchedVectorEnv(
        env_fns, worker_timeout=worker_timeout, should_stop=should_stop, shared_memory=True, context=context,
        autoreset_mode=autoreset_mode,
    )  # fmt: skip


def step_values(infos: dict, num_envs: int) -> dict:
    """Per-env values of a SAME_STEP vector step: `STEP_KEYS` as (N,) arrays, `rewards` a dict of (N,).

    A finished env's top-level info already belongs to its reset episode: its values come from
    `infos["final_info"]` (gymnasium stacks that nested dict like the top level, mask `_final_info`).
    """
    finished = infos.get("_final_info", np.zeros(num_envs, dtype=bool))
    final = infos.get("final_info")

    def pick(top: np.ndarray, key: str, final_part: dict | None) -> np.ndarray:
        return top if final_part is None else np.where(finished, final_part[key], top)

    values = {key: pick(infos[key], key, final) for key in STEP_KEYS}
    final_rewards = None if final is None else final["rewards"]
    values["rewards"] = {
        key: pick(r, key, final_rewards) for key, r in infos["rewards"].items() if not key.startswith("_")
    }
    return values


def final_observations(next_obs: np.ndarray, infos: dict) -> np.ndarray:
    """The real next observation of every env: `final_obs` where an episode finished, else next_obs."""
    finished = infos.get("_final_obs")
    if finished is None or not finished.any():
        return next_obs
    real = next_obs.copy()
    real[finished] = np.stack(infos["final_obs"][finished])
    return real


WORKER_ERRORS = (EnvWorkerError, EOFError, BrokenPipeError, ConnectionResetError)
"""What a worker's raise (rewrapped by gymnasium) or death looks like in the driver."""


class WorkerFault(Exception):
    """A vector-env call failed because a worker raised or died (design §10); `env_index` is None when
    it could not be found. Not a RuntimeError: only these are worker faults, and an error of the
    driver's own code keeps its traceback."""

    def __init__(self, env_index: int | None, cause: BaseException, exitcode: int | None = None):
        super().__init__(env_index, cause)
        self.env_index = env_index
        self.cause = cause
        self.exitcode = exitcode
        self.episode: int | None = None
        """The evaluation episode the worker was running, where one was (set by the evaluator)."""

    def where(self, role: str = "env worker") -> str:
        where = f"{role} {self.env_index}" if self.env_index is not None else f"an {role}"
        return where if self.episode is None else f"{where} (episode {self.episode})"

    def describe(self, role: str = "env worker") -> str:
        lines = str(self.cause).strip().splitlines()
        detail = lines[-1][:300] if lines else ""
        if self.exitcode is not None and self.exitcode < 0:
            detail = f"killed by signal {-self.exitcode}" + (f"; {detail}" if detail else "")
        return f"{self.where(role)} failed ({type(self.cause).__name__}{': ' + detail if detail else ''})"


class WorkerHung(WorkerFault):
    """A worker that did not answer within the worker timeout: stuck in a system call, deadlocked, in an
    endless loop or stopped by the machine. A fault like a death (design §10). `doing`: the call it did
    not answer (step, reset, set_attr, or start: building its env); `waited`: seconds."""

    def __init__(self, env_index: int, doing: str, waited: float):
        super().__init__(env_index, TimeoutError(f"no answer to its {doing} in {waited:.1f} s"))
        self.doing, self.waited = doing, waited

    def describe(self, role: str = "env worker") -> str:
        return f"{self.where(role)} hung ({self.cause})"


class WaitStopped(Exception):
    """A stop signal came while the driver waited for its workers (design §8): the call is abandoned,
    and its vector env can only be closed."""


def vector_call(envs: AsyncVectorEnv, call: Callable, *args, **kwargs):
    """`call(*args, **kwargs)` on a vector env; a worker's raise or death becomes WorkerFault (a hang
    is one already, WorkerHung), and a stop while waiting stays WaitStopped."""
    try:
        return call(*args, **kwargs)
    except (WorkerFault, WaitStopped):
        raise
    except Exception as exc:
        # gymnasium drops the pipe of a worker whose raise it rewraps, whatever the error's type
        if not isinstance(exc, WORKER_ERRORS) and all(pipe is not None for pipe in envs.parent_pipes):
            raise
        index = find_failed_worker(envs, exc)
        exitcode = envs.processes[index].exitcode if index is not None else None
        raise WorkerFault(index, exc, exitcode) from exc


def find_failed_worker(envs: AsyncVectorEnv, exc: BaseException) -> int | None:
    """The index of the worker behind `exc` raised by a vector env call, or None if not found.

    A raise in a worker arrives rewrapped by gymnasium (an EnvWorkerError keeps its index, and
    gymnasium drops the faulty worker's pipe); a dead worker shows up as EOFError (mid-step),
    BrokenPipeError (between steps) or ConnectionResetError, and is found by its exit code.
    """
    if isinstance(exc, EnvWorkerError):
        return exc.env_index
    dropped = [i for i, pipe in enumerate(envs.parent_pipes) if pipe is None]
    if dropped:
        return dropped[0]
    if isinstance(exc, (EOFError, BrokenPipeError, ConnectionResetError)):
        deadline = time.monotonic() + DEAD_WORKER_POLL_S
        while True:
            dead = dead_workers(envs)
            if dead or time.monotonic() > deadline:
                return dead[0] if dead else None
            time.sleep(0.005)
    return None


def dead_workers(envs: AsyncVectorEnv) -> list[int]:
    """Workers that ended (a stopped one has not: only a wait's timeout finds it)."""
    return [i for i, p in enumerate(envs.processes) if p.exitcode is not None]


class WatchedVectorEnv(AsyncVectorEnv):
    """gymnasium's AsyncVectorEnv, whose every wait for its workers is bounded and gives way to a stop
    signal, and whose close never blocks on a worker (design §8). gymnasium's step_wait and reset_wait
    wait forever unless given a timeout, and its set_attr, its constructor's space check and its close
    wait forever in any case.

    A wait runs in slices of WAIT_SLICE_S on the workers' pipes (a signal handler only sets a flag, and
    Python retries the wait after it). After a slice in which no worker answered, a stop
    (`should_stop()`) raises WaitStopped, a dead worker WorkerFault, and a worker silent for
    `worker_timeout` seconds WorkerHung. Each leaves the call pending with answers unread, so the vector
    env can only be closed (a timed-out gymnasium step_wait cannot be reused either: it resets its state
    and leaves the healthy workers' answers in their pipes, where the next step would read them).
    """

    def __init__(self, env_fns, *, worker_timeout: float, should_stop: Callable[[], bool] | None = None, **kwargs):
        self.worker_timeout = worker_timeout
        self.should_stop = should_stop or (lambda: False)
        try:
            super().__init__(env_fns, **kwargs)
        except BaseException:
            if hasattr(self, "processes"):  # the caller never gets this object: its workers end here
                self.close(terminate=True)
            raise

    def reset_wait(self, timeout: float | None = None):
        self._await("reset")
        return super().reset_wait()

    def step_wait(self, timeout: float | None = None):
        self._await("step")
        return super().step_wait()

    def set_attr(self, name: str, values) -> None:
        values = values if isinstance(values, (list, tuple)) else [values] * self.num_envs
        self._send_and_await("set_attr", [("_setattr", (name, value)) for value in values])

    def _check_spaces(self) -> None:
        # the first answer of each worker, once it has built its env
        spaces = (self.observation_mode, self.single_observation_space, self.single_action_space)
        same = vector_call(self, self._send_and_await, "start", [("_check_spaces", spaces)] * self.num_envs)
        if not all(observations and actions for observations, actions in same):
            raise RuntimeError("the env workers' observation or action spaces differ from the first env's")

    def _send_and_await(self, doing: str, messages: list) -> tuple:
        """One message to each worker; their answers read as gymnasium's call_wait reads a call's."""
        for pipe, message in zip(self.parent_pipes, messages, strict=True):
            pipe.send(message)
        self._state = AsyncState.WAITING_CALL
        self._await(doing)
        return super().call_wait()

    def _await(self, doing: str) -> None:
        """Until every worker has answered `doing` (an answer, or a dead worker's EOF, is in its pipe)."""
        silent = {pipe: i for i, pipe in enumerate(self.parent_pipes) if pipe is not None}
        start = time.monotonic()
        while silent:
            answered = multiprocessing.connection.wait(list(silent), WAIT_SLICE_S)
            for pipe in answered:
                del silent[pipe]
            if answered:
                continue
            if self.should_stop():
                raise WaitStopped(doing)
            dead = dead_workers(self)
            if dead:  # the others may never answer: gymnasium would read the pipes in order
                raise WorkerFault(dead[0], EOFError(), self.processes[dead[0]].exitcode)
            waited = time.monotonic() - start
            if waited >= self.worker_timeout:
                raise WorkerHung(min(silent.values()), doing, waited)

    def close_extras(self, timeout: float | None = None, terminate: bool = False) -> None:
        """Healthy workers between calls are asked to close their envs; whatever has not ended
        CLOSE_TIMEOUT_S later, and every worker of a vector env that faulted or was left mid-call, is
        killed. So no close blocks on a worker, and none is left behind (they are the forkserver's
        children: one left outlives the driver)."""
        pipes = self.parent_pipes
        healthy = not terminate and getattr(self, "_state", None) is AsyncState.DEFAULT
        if healthy and all(pipe is not None for pipe in pipes) and not dead_workers(self):
            with contextlib.suppress(OSError):  # a worker that died since
                for pipe in pipes:
                    pipe.send(("close", None))
            deadline = time.monotonic() + CLOSE_TIMEOUT_S
            for process in self.processes:
                process.join(max(0.0, deadline - time.monotonic()))
        started = [process for process in self.processes if process.pid is not None]
        for process in started:
            _kill(process)
        for pipe in pipes:
            if pipe is not None:
                pipe.close()
        for process in started:
            process.join(CLOSE_TIMEOUT_S)


def _kill(process: multiprocessing.Process) -> None:
    """SIGKILL, which a stopped worker cannot ignore: gymnasium's terminate sends SIGTERM, which a
    stopped process keeps pending, and then joins it forever. By pid: once the forkserver is gone (a
    SIGTERM to the process group ends it too), multiprocessing reports every worker ended (exit code
    255), live or not, and its own kill() sends nothing (the kernel continues a stopped orphan only
    where its process group is left orphaned, which a subreaper in the session, a container's init
    say, prevents)."""
    if process.exitcode in (None, 255):
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGKILL)
