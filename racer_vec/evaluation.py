"""Evaluation episodes and their metrics (SPEC 7).

Episode k always runs with seed `seed + k`, whatever the worker count: the vector env has autoreset
DISABLED and finished envs are reset here with the next episode's seed. Actions are computed on a
padded batch of fixed size EVAL_BATCH, because XLA on CPU gives results that differ by ~1e-6
between batch sizes, and that is enough to change an episode.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
from gymnasium.vector import AutoresetMode

from racer_vec import envs as env_layer
from racer_vec.config import EnvConfig, RewardParams
from racer_vec.rewards import training_reward

EVAL_BATCH = 16
SAFETY_RISK_THRESHOLD = -0.5

# policy(obs[EVAL_BATCH, obs_dim], episode_ids[EVAL_BATCH], steps[EVAL_BATCH]) -> actions[EVAL_BATCH, 2]
Policy = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


@dataclasses.dataclass
class EpisodeRecord:
    seed: int
    episode_return: float
    training_return: float
    length: int
    crashed: bool
    offroad_terminated: bool
    safety_violation_rate: float
    min_distance: float | None
    """Mean over steps of the nearest-vehicle distance (m); None when no vehicle was ever near."""
    ego_speed: float

    def to_json(self) -> dict:
        record = dataclasses.asdict(self)
        record["return"] = record.pop("episode_return")
        return record


def summarize(episodes: list[EpisodeRecord]) -> dict:
    """The SPEC 7 summary; rates are fractions in [0, 1]."""
    returns = np.array([e.episode_return for e in episodes])
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
        "mean_ego_speed": float(np.mean([e.ego_speed for e in episodes])),
        "mean_training_return": float(np.mean([e.training_return for e in episodes])),
        "offroad_episode_rate": float(offroad.mean()),
    }


class _Accumulator:
    """Per-env sums for the running episodes, updated vectorized over envs."""

    def __init__(self, n: int):
        self.n = n
        self.reset(np.ones(n, dtype=bool))

    def reset(self, mask: np.ndarray) -> None:
        for name in ("ret", "train_ret", "violations", "dist_sum", "speed_sum"):
            arr = getattr(self, name, np.zeros(self.n))
            arr[mask] = 0.0
            setattr(self, name, arr)
        for name in ("length", "dist_count"):
            arr = getattr(self, name, np.zeros(self.n, dtype=np.int64))
            arr[mask] = 0
            setattr(self, name, arr)

    def add(self, env_reward, values, rewards) -> None:
        self.ret += env_reward
        self.train_ret += rewards["training_reward"]
        self.length += 1
        self.violations += (rewards["collision_risk"] < SAFETY_RISK_THRESHOLD) | values["offroad"]
        near = np.isfinite(values["nearest_distance"])
        self.dist_sum += np.where(near, values["nearest_distance"], 0.0)
        self.dist_count += near
        self.speed_sum += values["forward_speed"]

    def record(self, i: int, seed: int, crashed: bool, offroad_terminated: bool) -> EpisodeRecord:
        return EpisodeRecord(
            seed=seed,
            episode_return=float(self.ret[i]),
            training_return=float(self.train_ret[i]),
            length=int(self.length[i]),
            crashed=bool(crashed),
            offroad_terminated=bool(offroad_terminated),
            safety_violation_rate=float(self.violations[i] / self.length[i]),
            min_distance=float(self.dist_sum[i] / self.dist_count[i]) if self.dist_count[i] else None,
            ego_speed=float(self.speed_sum[i] / self.length[i]),
        )


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


class Evaluator:
    """Runs evaluation episodes on its own DISABLED-autoreset vector env, kept open between calls."""

    def __init__(self, env_cfg: EnvConfig, reward_params: RewardParams, num_workers: int, render_mode=None):
        self.reward_params = reward_params
        self.num_workers = num_workers
        self.envs = env_layer.make_vector_env(
            env_cfg, num_workers, seed=0, autoreset_mode=AutoresetMode.DISABLED, render_mode=render_mode
        )

    def run(
        self,
        policy: Policy,
        num_episodes: int,
        seed: int,
        on_step: Callable | None = None,
        on_episode: Callable[[int, EpisodeRecord], None] | None = None,
    ) -> list[EpisodeRecord]:
        """Episodes 0..num_episodes-1 (seed + k); `on_step(episode_ids, active, ...)` sees every step."""
        n = self.num_workers
        episode_ids = np.full(n, -1)
        assign = np.arange(n) < num_episodes
        episode_ids[assign] = np.arange(n)[assign]
        next_episode = int(assign.sum())
        obs, _ = self.envs.reset(seed=[int(seed + k) if k >= 0 else None for k in episode_ids])
        acc = _Accumulator(n)
        records: dict[int, EpisodeRecord] = {}
        while (episode_ids >= 0).any():
            active = episode_ids >= 0
            actions = padded_actions(policy, obs, np.maximum(episode_ids, 0), acc.length.copy())
            obs, env_reward, terminated, truncated, infos = self.envs.step(actions)
            values = env_layer.step_values(infos, n)
            rewards = training_reward(obs, env_reward, values["rewards"], values["offroad"], self.reward_params)
            acc.add(env_reward, values, rewards)
            if on_step is not None:
                on_step(episode_ids, active, obs, env_reward, values, rewards, acc)
            done = (terminated | truncated) & active
            for i in np.flatnonzero(done):
                k = int(episode_ids[i])
                records[k] = acc.record(i, seed + k, values["crashed"][i], values["offroad_terminated"][i])
                if on_episode is not None:
                    on_episode(k, records[k])
            finished = terminated | truncated
            if finished.any():
                # Finished envs take the next episodes in env order; the rest go idle (but stay valid).
                new_ids = np.full(n, -1)
                order = np.flatnonzero(done)
                take = order[: max(0, num_episodes - next_episode)]
                new_ids[take] = np.arange(next_episode, next_episode + take.size)
                next_episode += take.size
                episode_ids = np.where(done, new_ids, episode_ids)
                reset_mask = finished
                seeds = [int(seed + new_ids[i]) if new_ids[i] >= 0 else None for i in range(n)]
                obs_reset, _ = self.envs.reset(seed=seeds, options={"reset_mask": np.asarray(reset_mask, dtype=bool)})
                obs = np.where(reset_mask[:, None], obs_reset, obs)
                acc.reset(reset_mask)
        return [records[k] for k in range(num_episodes)]

    def evaluate(self, policy_on_obs: Callable[[np.ndarray], np.ndarray], num_episodes: int, seed: int) -> dict:
        """Summary of deterministic episodes for periodic evaluation during training."""
        episodes = self.run(lambda obs, _ids, _steps: policy_on_obs(obs), num_episodes, seed)
        return summarize(episodes)

    def close(self) -> None:
        env_layer.close_vector_env(self.envs, faulted=False)
