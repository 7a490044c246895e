"""The schedules of the policy's speed box (design §4.1): the speed floor and RACER's ramp on a learned
speed cap, as functions of the transition count (design §3's counting, checkpointed), so that a
resumed run, or one continued to a larger --max-steps, follows them exactly.

Their values are computed on the host and reach the compiled learner and the action sampler as
traced scalars (`SpeedBounds`), so the schedules move without recompiling anything.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

from racer_vec.config import ACTION_DIM, SPEED, AgentConfig, EnvConfig, TrainConfig


class SpeedBounds(NamedTuple):
    """The schedules' current values, as fractions of the target-speed range like the cap h; None
    where the agent has no such schedule (a static difference: agents without schedules compile and
    compute exactly what they would without this argument)."""

    floor: Any = None
    """φ: the target speed's box starts at 2φ - 1 rather than -1."""
    ramp: Any = None
    """ρ: a learned speed cap h acts as min(h, ρ)."""


def effective_limit(h, bounds: SpeedBounds):
    """The limit the policy acts and learns with: h, or min(h, ramp) under RACER's ramp (design §4.1)."""
    # `where`, not `minimum`: at h = ramp (both 1 once the ramp is up) h keeps its whole gradient
    return h if bounds.ramp is None else jnp.where(h <= bounds.ramp, h, bounds.ramp)


def _linear(env_steps: int, start: int, end: int, first: float, last: float) -> float:
    """`first` up to transition `start`, then linearly to `last` at `end`, `last` from there on (each end exact)."""
    progress = 0.0 if env_steps <= start else 1.0 if env_steps >= end else (env_steps - start) / (end - start)
    return (1.0 - progress) * first + progress * last


def speed_floor(agent: AgentConfig, env: EnvConfig, env_steps: int) -> float | None:
    """The floor on the target speed (m/s) at `env_steps`; None without one."""
    if agent.speed_floor is None:
        return None
    low = env.target_speed_range[0]
    return _linear(env_steps, agent.speed_floor_hold, agent.speed_floor_end, agent.speed_floor, low)


def cap_ramp(agent: AgentConfig, env_steps: int) -> float | None:
    """The ramp on a learned speed cap at `env_steps` (a fraction of the range, like h); None without one."""
    if agent.cap_ramp_init is None:
        return None
    return _linear(env_steps, agent.cap_ramp_start, agent.cap_ramp_end, agent.cap_ramp_init, 1.0)


def speed_bounds(cfg: TrainConfig, env_steps: int, *, floor: bool = True) -> SpeedBounds:
    """The values the policy acts and learns with at `env_steps`, as float32 scalars; `floor=False`:
    evaluation's, which has no floor (the ramp stays: RACER's own evaluation acts within it)."""
    floor_mps = speed_floor(cfg.agent, cfg.env, env_steps) if floor else None
    ramp = cap_ramp(cfg.agent, env_steps)
    low, high = cfg.env.target_speed_range
    return SpeedBounds(
        floor=None if floor_mps is None else np.float32((floor_mps - low) / (high - low)),
        ramp=None if ramp is None else np.float32(ramp),
    )


def warmup_box(bounds: SpeedBounds) -> tuple[np.ndarray, np.ndarray]:
    """(low, high) of the random warm-up actions: the env's [-1, 1] within the floor and the ramp (the
    original's warm-up samples its action space, whose high end its ramp moves); a learned cap does
    not bound them."""
    low, high = np.full(ACTION_DIM, -1.0), np.ones(ACTION_DIM)
    if bounds.floor is not None:
        low[SPEED] = 2.0 * float(bounds.floor) - 1.0
    if bounds.ramp is not None:
        high[SPEED] = 2.0 * float(bounds.ramp) - 1.0
    return low, high


def schedule_metrics(cfg: TrainConfig, env_steps: int, limit: float | None) -> dict:
    """metrics.jsonl's view of the schedules at `env_steps` (design §7): `speed_floor` (m/s), `cap_ramp` and
    `effective_limit` = min(limit, cap_ramp) (fractions of the range, like `limit`)."""
    metrics = {}
    floor, ramp = speed_floor(cfg.agent, cfg.env, env_steps), cap_ramp(cfg.agent, env_steps)
    if floor is not None:
        metrics["speed_floor"] = floor
    if ramp is not None:
        metrics["cap_ramp"] = ramp
        if limit is not None:
            metrics["effective_limit"] = min(limit, ramp)
    return metrics
