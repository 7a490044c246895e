"""The training reward (design §6), vectorized numpy over N envs and V vehicles.

No JAX here: env workers import this module (design §2, import hygiene).
Observation rows are highway-env Kinematics features `[presence, x, y, vx, vy, heading]`: row 0 is the
ego in absolute coordinates, the other rows have x, y, vx, vy relative to the ego and an absolute heading.
"""

from __future__ import annotations

import math

import numpy as np

FEATURES = 6
PRESENCE, X, Y, VX, VY, HEADING = range(FEATURES)
OFFROAD_PENALTY = -0.5


def _rows(obs: np.ndarray) -> np.ndarray:
    """(N, V*6) or (N, V, 6) -> (N, V, 6) float64."""
    obs = np.asarray(obs, dtype=np.float64)
    return obs.reshape(obs.shape[0], -1, FEATURES)


def collision_risk(
    obs: np.ndarray,
    *,
    warning_ttc: float = 2.0,
    critical_ttc: float = 1.0,
    proximity: float = 10.0,
    cone_half_angle: float = math.pi / 16,
) -> np.ndarray:
    """Time-to-collision risk of the vehicles ahead, in [-1, 0]; (N, V*6) or (N, V, 6) -> (N,).

    A present vehicle at relative position p with relative velocity v counts when p lies within
    `cone_half_angle` of the ego's forward unit vector f, d = p.f > 0 and the closing speed c = -v.f > 0.
    It is dangerous when ttc = d / c < warning_ttc and |p| < proximity; its risk is -1 below
    critical_ttc, else -exp(-3 (1 - u)) with u = (warning_ttc - ttc) / (warning_ttc - critical_ttc).
    The result is the minimum over vehicles, 0 when none is dangerous.
    """
    rows = _rows(obs)
    heading = rows[:, 0, HEADING]
    forward = np.stack([np.cos(heading), np.sin(heading)], axis=-1)[:, None, :]  # (N, 1, 2)
    others = rows[:, 1:, :]  # (N, V-1, 6)
    p = others[..., X : Y + 1]
    v = others[..., VX : VY + 1]

    d = np.sum(p * forward, axis=-1)  # (N, V-1)
    closing = -np.sum(v * forward, axis=-1)
    dist = np.linalg.norm(p, axis=-1)
    # angle(p, f) <= cone  <=>  cos(angle) = d / |p| >= cos(cone), with d > 0 checked separately
    in_cone = d >= dist * math.cos(cone_half_angle)
    candidate = (others[..., PRESENCE] > 0) & in_cone & (d > 0) & (closing > 0)

    ttc = np.divide(d, closing, out=np.full_like(d, np.inf), where=candidate)
    dangerous = candidate & (ttc < warning_ttc) & (dist < proximity)
    u = (warning_ttc - ttc) / (warning_ttc - critical_ttc)
    risk = np.where(ttc < critical_ttc, -1.0, -np.exp(-3.0 * (1.0 - u)))
    risk = np.where(dangerous, risk, 0.0)
    # a (N, 0) array has no minimum: with no other rows the risk is 0
    return risk.min(axis=1, initial=0.0)


def training_reward(next_obs, base_reward, env_rewards, offroad, cfg) -> dict:
    """design §6: base + speed correction + safety_coeff * (collision risk + offroad penalty).

    next_obs: (N, V*6) or (N, V, 6), the real next observations (final ones for finished episodes).
    base_reward: (N,) env reward. env_rewards: highway-env's info["rewards"] dict, each value (N,).
    offroad: (N,) bool. cfg: see design §2 (`racer_vec.config.RewardParams` fits); the risk parameters
    fall back to collision_risk's defaults when cfg lacks them.
    Returns a dict of (N,) float64 arrays.
    """
    rows = _rows(next_obs)
    base_reward = np.asarray(base_reward, dtype=np.float64)
    offroad = np.asarray(offroad, dtype=bool)

    v_min, v_max = cfg.speed_range
    forward_speed_reward = np.clip((rows[:, 0, VX] - v_min) / (v_max - v_min), 0.0, 1.0)
    if cfg.speed_correction:
        # in the env's units: its weighted sum is lmap'ed by span (when it normalizes) and gated by on_road
        span = (
            cfg.high_speed_reward + cfg.right_lane_reward - cfg.collision_reward
            if cfg.normalize_reward
            else 1.0
        )
        c = np.asarray(env_rewards["on_road_reward"], dtype=np.float64) / span
        env_speed = np.asarray(env_rewards["high_speed_reward"], dtype=np.float64)
        speed_correction = c * (cfg.speed_weight * forward_speed_reward - cfg.high_speed_reward * env_speed)
    else:
        speed_correction = np.zeros_like(base_reward)

    risk = collision_risk(
        rows,
        warning_ttc=getattr(cfg, "warning_ttc", 2.0),
        critical_ttc=getattr(cfg, "critical_ttc", 1.0),
        proximity=getattr(cfg, "proximity", 10.0),
        cone_half_angle=getattr(cfg, "cone_half_angle", math.pi / 16),
    )
    offroad_penalty = np.where(offroad, OFFROAD_PENALTY, 0.0)
    safety_reward = risk + offroad_penalty
    return {
        "training_reward": base_reward + speed_correction + cfg.safety_coeff * safety_reward,
        "safety_reward": safety_reward,
        "collision_risk": risk,
        "offroad_penalty": offroad_penalty,
        "forward_speed_reward": forward_speed_reward,
        "speed_correction": speed_correction,
    }
