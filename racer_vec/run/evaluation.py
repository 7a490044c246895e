"""Evaluation episodes and their metrics (design §7): the Evaluator, used by train.py's periodic
evaluation and by evaluate.py (racer_vec.run.eval_cli).

Episode k always runs with seed `seed + k`, whatever the worker count: the vector env has autoreset
DISABLED and finished envs are reset here with the next episode's seed. Sampled actions use a key
derived from (k, step), and actions are computed on a padded batch of fixed size EVAL_BATCH,
because XLA on CPU gives results that differ by ~1e-6 between batch sizes, and that is enough to
change an episode. So an evaluation gives the same numbers with any number of workers.

No JAX here: the policy is a function handed in by the caller.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Callable

import numpy as np
from gymnasium.vector import AutoresetMode

from racer_vec.config import KINEMATICS_FEATURES, WORKER_TIMEOUT_S, EnvConfig, RewardParams
from racer_vec.sim import highway
from racer_vec.sim.rewards import training_reward
from racer_vec.sim.video import FrameStats, VideoRecorder

EVAL_BATCH = 16
SAFETY_RISK_THRESHOLD = -0.5
"""A step violates safety when its collision risk is below this, or when the ego is offroad."""
VX, VY = KINEMATICS_FEATURES.index("vx"), KINEMATICS_FEATURES.index("vy")
RELEASE_OFFROAD_PENALTY = -5.0
"""The release's evaluation adds this on every step where highway-env's `on_road` is false (design §11)."""
METRICS_FILE = "evaluation_metrics.json"
RULE = "=" * 50


class EvaluationInterrupted(Exception):
    """`should_stop` asked to stop: between vector steps, or while the driver waited for its workers."""


# policy(obs[EVAL_BATCH, obs_dim], episode_ids[EVAL_BATCH], steps[EVAL_BATCH]) -> actions[EVAL_BATCH, 2]
Policy = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


# ---------------------------------------------------------------------------------------------
# Metrics


@dataclasses.dataclass
class EpisodeRecord:
    episode: int
    seed: int
    episode_return: float
    """The env's reward summed."""
    training_return: float
    length: int
    crashed: bool
    offroad_terminated: bool
    safety_violation_rate: float
    """Fraction of steps with collision risk < -0.5 or offroad."""
    min_distance: float | None
    """Mean over steps of the nearest-vehicle distance (m), steps without one skipped; None if none had one."""
    ego_speed: float
    """Mean over steps of the forward speed (m/s)."""
    release_return: float
    """The release's return (design §11): the env's reward without the env layer's offroad-termination
    term, and -5 on every step off highway-env's road."""
    release_speed: float
    """The release's speed (design §11): mean over steps of |(vx, vy)| of the ego's observation before the step."""
    lane_changes: int
    """Steps on which the ego's lane changed (design §3's driving diagnostics)."""
    overtakes: int
    """Vehicles the ego passed minus vehicles that passed it."""
    distance: float
    """The ego's progress along the road (m)."""

    def to_json(self) -> dict:
        return {("return" if k == "episode_return" else k): v for k, v in dataclasses.asdict(self).items()}


def summarize(episodes: list[EpisodeRecord], release: bool = False) -> dict:
    """The design §7 summary; rates are fractions in [0, 1], standard deviations over episodes (ddof 0).
    `release`: return and speed are the release's measures (design §11); crashes are counted as ours."""
    returns = np.array([e.release_return if release else e.episode_return for e in episodes])
    lengths = np.array([e.length for e in episodes])
    crashed = np.array([e.crashed for e in episodes])
    offroad = np.array([e.offroad_terminated for e in episodes])
    distances = [e.min_distance for e in episodes if e.min_distance is not None]
    return {
        "num_episodes": len(episodes),
        "mean_return": float(returns.mean()),
        "std_return": float(returns.std()),
        "mean_length": float(lengths.mean()),
        "std_length": float(lengths.std()),
        "success_rate": float(np.mean(~crashed & ~offroad)),
        "collision_rate": float(crashed.mean()),
        "mean_safety_violation_rate": float(np.mean([e.safety_violation_rate for e in episodes])),
        "mean_min_distance": float(np.mean(distances)) if distances else None,
        "mean_ego_speed": float(np.mean([e.release_speed if release else e.ego_speed for e in episodes])),
        "mean_training_return": float(np.mean([e.training_return for e in episodes])),
        "offroad_episode_rate": float(offroad.mean()),
        "mean_lane_changes": float(np.mean([e.lane_changes for e in episodes])),
        "mean_overtakes": float(np.mean([e.overtakes for e in episodes])),
        "mean_distance": float(np.mean([e.distance for e in episodes])),
    }


def format_summary(summary: dict) -> str:
    """The printed results block (design §7)."""
    distance = summary["mean_min_distance"]
    return "\n".join(
        [
            RULE,
            "HIGHWAY POLICY EVALUATION RESULTS",
            RULE,
            f"Episodes: {summary['num_episodes']}",
            f"Mean Return: {summary['mean_return']:.3f} ± {summary['std_return']:.3f}",
            f"Mean Length: {summary['mean_length']:.1f} ± {summary['std_length']:.1f}",
            f"Success Rate: {100 * summary['success_rate']:.1f}%",
            f"Collision Rate: {100 * summary['collision_rate']:.1f}%",
            f"Mean Safety Violation Rate: {100 * summary['mean_safety_violation_rate']:.1f}%",
            f"Mean Min Distance: {'n/a' if distance is None else f'{distance:.2f}m'}",
            f"Mean Ego Speed: {summary['mean_ego_speed']:.1f} m/s",
        ]
        + ([f"Mean Lane Changes: {summary['mean_lane_changes']:.1f}",
            f"Mean Overtakes: {summary['mean_overtakes']:.1f}",
            f"Mean Distance: {summary['mean_distance']:.0f} m"]
           if "mean_lane_changes" in summary else [])  # summaries written before the diagnostics
        + ([f"Protocol: {summary['protocol']}, actions {summary['action_rule']}, {summary['env_id']}"]
           if "protocol" in summary else [])  # fmt: skip
    )


class EpisodeAccumulator:
    """Per-env sums of the running episodes, updated with one vector step at a time (vectorized over envs)."""

    def __init__(self, num_envs: int):
        self.env_return = np.zeros(num_envs)
        self.training_return = np.zeros(num_envs)
        self.violations = np.zeros(num_envs, dtype=np.int64)
        self.distance_sum = np.zeros(num_envs)
        self.distance_steps = np.zeros(num_envs, dtype=np.int64)
        self.speed_sum = np.zeros(num_envs)
        self.release_return = np.zeros(num_envs)
        self.observed_speed_sum = np.zeros(num_envs)
        self.length = np.zeros(num_envs, dtype=np.int64)
        self.lane_changes = np.zeros(num_envs, dtype=np.int64)
        self.overtakes = np.zeros(num_envs, dtype=np.int64)
        self.distance = np.zeros(num_envs)

    def reset(self, mask: np.ndarray) -> None:
        for array in vars(self).values():
            array[mask] = 0

    def add(self, env_reward: np.ndarray, values: dict, rewards: dict, release_reward: np.ndarray,
            obs_before: np.ndarray) -> None:  # fmt: skip
        """`values`: envs.step_values of the step; `rewards`: rewards.training_reward of it; `obs_before`:
        the observations the step acted on (the release measures speed there)."""
        self.env_return += env_reward
        self.release_return += release_reward
        self.observed_speed_sum += np.hypot(obs_before[:, VX], obs_before[:, VY])  # row 0 is the ego's
        self.training_return += rewards["training_reward"]
        self.violations += (rewards["collision_risk"] < SAFETY_RISK_THRESHOLD) | values["offroad"]
        near = np.isfinite(values["nearest_distance"])
        self.distance_sum += np.where(near, values["nearest_distance"], 0.0)
        self.distance_steps += near
        self.speed_sum += values["forward_speed"]
        self.length += 1
        self.lane_changes += values["lane_change"]
        self.overtakes += values["overtakes"]
        self.distance += values["distance"]

    def record(self, i: int, episode: int, seed: int, crashed: bool, offroad_terminated: bool) -> EpisodeRecord:
        length = int(self.length[i])
        steps_near = int(self.distance_steps[i])
        return EpisodeRecord(
            episode=episode,
            seed=seed,
            episode_return=float(self.env_return[i]),
            training_return=float(self.training_return[i]),
            length=length,
            crashed=bool(crashed),
            offroad_terminated=bool(offroad_terminated),
            safety_violation_rate=float(self.violations[i] / length),
            min_distance=float(self.distance_sum[i] / steps_near) if steps_near else None,
            ego_speed=float(self.speed_sum[i] / length),
            release_return=float(self.release_return[i]),
            release_speed=float(self.observed_speed_sum[i] / length),
            lane_changes=int(self.lane_changes[i]),
            overtakes=int(self.overtakes[i]),
            distance=float(self.distance[i]),
        )


def release_reward(env_reward: np.ndarray, values: dict, offroad_termination_reward: float) -> np.ndarray:
    """The release's per-step reward (design §11): its -5 on every step off highway-env's road in place
    of the env layer's offroad-termination term."""
    ours = np.where(values["offroad_terminated"], offroad_termination_reward, 0.0)
    return env_reward - ours + np.where(values["on_road"], 0.0, RELEASE_OFFROAD_PENALTY)


def padded_actions(policy: Policy, obs: np.ndarray, episode_ids: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """Run `policy` on fixed-size chunks of EVAL_BATCH rows, whatever the number of envs."""
    n = obs.shape[0]
    chunks = []
    for start in range(0, n, EVAL_BATCH):
        rows = slice(start, min(start + EVAL_BATCH, n))
        pad = EVAL_BATCH - (rows.stop - rows.start)
        chunk = policy(
            np.pad(obs[rows], ((0, pad), (0, 0))),
            np.pad(episode_ids[rows], (0, pad)),
            np.pad(steps[rows], (0, pad)),
        )
        chunks.append(np.asarray(chunk)[: rows.stop - rows.start])
    return np.concatenate(chunks)


# ---------------------------------------------------------------------------------------------
# Episodes on a DISABLED-autoreset vector env


class Episodes:
    """The episodes of one Evaluator.run: which env runs which (-1: idle), their observations and
    running sums, the episodes still to start, and the finished ones' records."""

    def __init__(self, num_envs: int, obs_shape: tuple[int, ...], num_episodes: int, seed: int):
        self.ids = np.full(num_envs, -1)
        self.obs = np.zeros((num_envs, *obs_shape), np.float32)
        self.acc = EpisodeAccumulator(num_envs)
        self.records: dict[int, EpisodeRecord] = {}
        self.num_episodes, self.seed = num_episodes, seed
        self.to_start = collections.deque(range(num_episodes))

    @property
    def running(self) -> np.ndarray:
        return self.ids >= 0

    def assign(self, free: np.ndarray) -> np.ndarray:
        """Free envs take the next episodes in env order (the rest idle until the end); returns the
        mask of the envs that start one."""
        start = np.flatnonzero(free)[: len(self.to_start)]
        self.ids[start] = [self.to_start.popleft() for _ in start]
        started = np.zeros(len(self.ids), dtype=bool)
        started[start] = True
        return started

    def abandon(self) -> list[int]:
        """The running episodes are lost (their workers are replaced): they start again first, from
        their own seeds. Returns them."""
        lost = sorted(int(k) for k in self.ids[self.running])
        self.to_start.extendleft(reversed(lost))
        self.ids[:] = -1
        return lost

    def finish(self, done: np.ndarray, values: dict) -> list[EpisodeRecord]:
        """Record the episodes of the envs in `done`; their envs become free."""
        finished = []
        for i in np.flatnonzero(done):
            k = int(self.ids[i])
            crashed, offroad = values["crashed"][i], values["offroad_terminated"][i]
            self.records[k] = self.acc.record(i, k, self.seed + k, crashed, offroad)
            finished.append(self.records[k])
        self.ids[done] = -1
        return finished

    def in_order(self) -> list[EpisodeRecord]:
        return [self.records[k] for k in range(self.num_episodes)]


class Filming:
    """The filmed episodes (k < num_filmed) of an Evaluator.run: their frames, with the panel's stats,
    go to `recorder`."""

    def __init__(self, recorder: VideoRecorder, num_filmed: int):
        self.recorder, self.num_filmed = recorder, num_filmed

    def filmed(self, ids: np.ndarray) -> np.ndarray:
        return (ids >= 0) & (ids < self.num_filmed)

    def retake(self, episodes: list[int]) -> None:
        """The videos of episodes that run again (their workers faulted) start again."""
        for k in episodes:
            self.recorder.discard(k)

    def first_frames(self, infos: dict, started: np.ndarray, ids: np.ndarray) -> None:
        """The reset frames of the episodes just started (mask `started`)."""
        for i in np.flatnonzero(started & _has_frame(infos, len(ids))):
            stats = FrameStats(
                step=0, speed=float(infos["speed"][i]), safety_reward=None, env_return=0.0, training_return=0.0,
                offroad=bool(infos["offroad"][i]), crashed=bool(infos["crashed"][i]),
            )  # fmt: skip
            self.recorder.add_frame(int(ids[i]), infos["frame"][i], stats)

    def step_frames(self, infos: dict, values: dict, rewards: dict, episodes: Episodes) -> None:
        """The frames of a vector step, with the episodes' sums after it."""
        acc = episodes.acc
        for i in np.flatnonzero(self.filmed(episodes.ids) & _has_frame(infos, len(episodes.ids))):
            stats = FrameStats(
                step=int(acc.length[i]), speed=float(values["speed"][i]),
                safety_reward=float(rewards["safety_reward"][i]), env_return=float(acc.env_return[i]),
                training_return=float(acc.training_return[i]), offroad=bool(values["offroad"][i]),
                crashed=bool(values["crashed"][i]),
            )  # fmt: skip
            self.recorder.add_frame(int(episodes.ids[i]), infos["frame"][i], stats)


def _has_frame(infos: dict, n: int) -> np.ndarray:
    return infos.get("_frame", np.zeros(n, dtype=bool))


class Evaluator:
    """Runs evaluation episodes on its own DISABLED-autoreset vector env, started by the first run and
    kept open between runs; a worker fault closes it, and the next run starts a new one.

    `idm_ego_speed`: highway-env's IDM driver with that target speed drives (highway.make_env).
    `worker_timeout` and `should_stop` bound every wait for the workers (highway.WatchedVectorEnv);
    `should_stop` is also checked between vector steps."""

    def __init__(
        self,
        env_cfg: EnvConfig,
        reward_params: RewardParams,
        num_workers: int,
        *,
        render: bool = False,
        worker_timeout: float = WORKER_TIMEOUT_S,
        should_stop: Callable[[], bool] = lambda: False,
        idm_ego_speed: float | None = None,
    ):
        self.env_cfg = env_cfg
        self.idm_ego_speed = idm_ego_speed
        self.reward_params = reward_params
        self.offroad_termination_reward = env_cfg.offroad_termination_reward
        self.num_workers = num_workers
        self.render = render
        self.worker_timeout = worker_timeout
        self.should_stop = should_stop
        self.envs = None

    def _start_workers(self) -> None:
        self.envs = highway.make_vector_env(
            self.env_cfg,
            self.num_workers,
            seed=0,  # every episode is reset with its own seed
            autoreset_mode=AutoresetMode.DISABLED,
            render_mode="rgb_array" if self.render else None,
            wrapper=highway.EpisodeControl,
            idm_ego_speed=self.idm_ego_speed,
            worker_timeout=self.worker_timeout,
            should_stop=self.should_stop,
        )

    def run(
        self,
        policy: Policy,
        num_episodes: int,
        seed: int,
        *,
        filming: Filming | None = None,
        on_episode: Callable[[EpisodeRecord], None] | None = None,
        max_restarts: int = 0,
        on_restart: Callable[[highway.WorkerFault, list[int], int], None] | None = None,
    ) -> list[EpisodeRecord]:
        """Episodes 0..num_episodes-1 with seeds seed + k; `filming` films the first few.

        A worker fault (a raise, a death, a hang) closes the workers and raises highway.WorkerFault,
        or, `max_restarts` times at most, starts new workers and runs the lost episodes again from
        their own seeds, which gives the same numbers (design §10); `on_restart(fault, lost episodes,
        restart number)` is told first. A stop (`should_stop`) raises EvaluationInterrupted.
        """
        if filming is not None and not self.render:
            raise ValueError("filming needs an Evaluator built with render=True")
        episodes = Episodes(self.num_workers, (self.env_cfg.obs_dim,), num_episodes, seed)
        restarts = 0
        while True:
            try:
                self._run(policy, episodes, filming, on_episode)
                return episodes.in_order()
            except highway.WaitStopped:
                raise EvaluationInterrupted from None
            except highway.WorkerFault as fault:
                if fault.env_index is not None and episodes.ids[fault.env_index] >= 0:
                    fault.episode = int(episodes.ids[fault.env_index])
                self.close()
                lost = episodes.abandon()
                if restarts == max_restarts:
                    raise
                restarts += 1
                if filming is not None:
                    filming.retake(lost)
                if on_restart is not None:
                    on_restart(fault, lost, restarts)

    def _run(self, policy: Policy, episodes: Episodes, filming: Filming | None, on_episode) -> None:
        """Episodes until none is left to start or running, on the workers of this run (new ones after a
        fault)."""
        if self.envs is None:
            self._start_workers()
        free = np.ones(self.num_workers, dtype=bool)
        while True:
            started = episodes.assign(free)
            if started.any():
                self._start_episodes(episodes, started, filming)
            if not episodes.running.any():
                return
            if self.should_stop():
                raise EvaluationInterrupted
            free, finished = self._step(policy, episodes, filming)
            for record in finished if on_episode is not None else ():
                on_episode(record)

    def _start_episodes(self, episodes: Episodes, started: np.ndarray, filming: Filming | None) -> None:
        if filming is not None:
            highway.vector_call(self.envs, self.envs.set_attr, "filming", filming.filmed(episodes.ids).tolist())
        # Python ints (a numpy int kills the worker); a fresh options dict (reset pops reset_mask)
        seeds = [int(episodes.seed + k) if s else None for k, s in zip(episodes.ids, started)]
        reset_obs, infos = highway.vector_call(self.envs, self.envs.reset, seed=seeds, options={"reset_mask": started})
        episodes.acc.reset(started)
        if filming is not None:
            filming.first_frames(infos, started, episodes.ids)
        episodes.obs = np.where(started[:, None], reset_obs, episodes.obs)

    def _step(self, policy: Policy, episodes: Episodes, filming: Filming | None):
        """One vector step of the running episodes: (the mask of envs whose episode ended, its records)."""
        acc, obs_before = episodes.acc, episodes.obs
        actions = padded_actions(policy, obs_before, np.maximum(episodes.ids, 0), acc.length.copy())
        obs, env_reward, terminated, truncated, infos = highway.vector_call(self.envs, self.envs.step, actions)
        values = highway.step_values(infos, self.num_workers)
        rewards = training_reward(obs, env_reward, values["rewards"], values["offroad"], self.reward_params)
        release = release_reward(env_reward, values, self.offroad_termination_reward)
        acc.add(env_reward, values, rewards, release, obs_before)
        episodes.obs = obs
        if filming is not None:
            filming.step_frames(infos, values, rewards, episodes)
        done = (terminated | truncated) & episodes.running
        finished = episodes.finish(done, values)
        for record in finished if filming is not None else ():
            filming.recorder.finish(record.episode)
        return done, finished

    def evaluate(self, policy_on_obs: Callable[[np.ndarray], np.ndarray], num_episodes: int, seed: int) -> dict:
        """Summary of deterministic episodes for periodic evaluation during training."""
        episodes = self.run(lambda obs, _ids, _steps: policy_on_obs(obs), num_episodes, seed)
        return summarize(episodes)

    def dead_workers(self) -> list[int]:
        """Workers that died since the last evaluation (found before the next one needs them)."""
        return [] if self.envs is None else highway.dead_workers(self.envs)

    def close(self) -> None:
        """Never blocks on a worker, a hung one included (design §8)."""
        if self.envs is not None:
            self.envs.close()
            self.envs = None
