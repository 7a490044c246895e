"""The run's host-side bookkeeping (design §7): its counters, saved with every checkpoint, the EMAs
of speed and collisions, and the running sums of the N current episodes."""

from __future__ import annotations

import dataclasses

import numpy as np

EMA_WEIGHT = 0.01


@dataclasses.dataclass
class Counters:
    """Host-side run state; saved as JSON with every checkpoint and continued on --resume."""

    env_steps: int = 0
    updates: int = 0
    critic_updates: int = 0
    episodes_total: int = 0
    train_collisions_total: int = 0
    offroad_terminations_total: int = 0
    resets_total: int = 0
    """Agent re-initializations by the reset schedule (design §11)."""
    last_reset_step: int = 0
    """Env step of the latest reset: a checkpoint at a reset step holds the agent before it."""
    worker_restarts_total: int = 0
    """Training vector envs replaced after a worker fault (design §10)."""
    eval_worker_restarts_total: int = 0
    """Periodic evaluators rebuilt after a worker fault."""
    speed_ema: float | None = None
    collision_ema: float | None = None
    wall_time: float = 0.0
    train_time: float = 0.0
    """Wall time spent training, evaluation excluded (the denominator of SPS)."""
    learning_starts: int = 0
    """Env step from which updates run (start_training, or later after a resume without a buffer)."""
    action_key: list[int] = dataclasses.field(default_factory=list)


def ema_over_sequence(ema: float | None, values: np.ndarray, weight: float) -> float | None:
    """The EMA after updating with `values` one by one, in order, without a Python loop."""
    if values.size == 0:
        return ema
    if ema is None:
        ema, values = float(values[0]), values[1:]
    k = values.size
    decay = (1.0 - weight) ** np.arange(k - 1, -1, -1)
    return float((1.0 - weight) ** k * ema + weight * np.sum(decay * values))


class EpisodeTracker:
    """Running sums of the N current episodes, and the finished ones' since the last log: the env's
    return, the training return, the length and the driving diagnostics (design §3)."""

    DIAGNOSTICS = {"lane_changes": "lane_change", "overtakes": "overtakes", "distance": "distance"}
    """Logged name (`episode_<name>_mean`) -> the step's info key it sums."""

    def __init__(self, num_envs: int):
        names = ("return", "training_return", "length", *self.DIAGNOSTICS)
        self.sums = {name: np.zeros(num_envs) for name in names}
        self.finished: list[dict[str, np.ndarray]] = []

    def abandon(self) -> None:
        """The running episodes end unfinished (their workers were replaced): they are not counted."""
        for running in self.sums.values():
            running[:] = 0.0

    def step(self, env_reward, train_reward, done, values: dict) -> None:
        """`values`: the step's highway.step_values."""
        increments = {"return": env_reward, "training_return": train_reward, "length": 1}
        increments |= {name: values[key] for name, key in self.DIAGNOSTICS.items()}
        for name, increment in increments.items():
            self.sums[name] += increment
        if done.any():
            self.finished.append({name: running[done] for name, running in self.sums.items()})
            for running in self.sums.values():
                running[done] = 0.0

    def pop_means(self) -> dict:
        if not self.finished:
            return {}
        finished = {name: np.concatenate([f[name] for f in self.finished]) for name in self.sums}
        self.finished = []
        means = {f"episode_{name}_mean": float(values.mean()) for name, values in finished.items()}
        return {**means, "episodes_in_interval": int(finished["length"].size)}
