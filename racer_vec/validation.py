"""The checks of a resolved config (racer_vec.config.resolve runs them): each failure is one ConfigError
naming the flag (design §8). No JAX here, like racer_vec.config."""

from __future__ import annotations

import dataclasses
import functools
import math

from racer_vec.config import AgentConfig, ConfigError, EnvConfig, RewardConfig, TrainConfig


def _numbers(obj, prefix: str = ""):
    """(flag, value) of every number in a config, tuples and nested sections included."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        flag = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            yield from _numbers(value, f"{flag}.")
        elif isinstance(value, tuple):
            yield from ((flag, v) for v in value if isinstance(v, (int, float)))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield flag, value


def flag_name(path: str) -> str:
    return "--" + path.replace("_", "-")


def check_finite(cfg) -> None:
    """NaN and infinity parse as floats, and no field means anything with them."""
    for path, value in _numbers(cfg):
        if not math.isfinite(value):
            raise ConfigError(f"{flag_name(path)} must be a finite number, got {value}")


def _check_bounds(bounds: dict[str, tuple[object, str]]) -> None:
    """`bounds`: flag -> (value, rule); rules are "> 0", ">= 0"."""
    for flag, (value, rule) in bounds.items():
        ok = value > 0 if rule == "> 0" else value >= 0
        if not ok:
            raise ConfigError(f"{flag} must be {'positive' if rule == '> 0' else '>= 0'}, got {value}")


# The sign rules, as field paths (the message names flag_name(path)), checked in this order: the
# first failing field is the one reported.
_POSITIVE = (
    "num_envs", "max_steps", "batch_size", "utd_ratio", "buffer_size", "updates_per_iteration", "log_interval",
    "checkpoint_interval", "keep_checkpoints", "eval_episodes", "worker_timeout",
    "agent.num_qs", "agent.num_atoms", "agent.pointnet_dim",
    # log 0: the run would stop as non-finite after its warm-up
    "agent.init_temperature", "agent.q_entropy_lagrange_init",
    "env.observed_vehicles", "env.vehicles_count", "env.lanes_count", "env.vehicles_density", "env.ego_spacing",
    "env.duration", "env.simulation_frequency", "env.policy_frequency",
    "reward.critical_ttc", "reward.proximity", "reward.cone_half_angle",
)  # fmt: skip
_NON_NEGATIVE = (
    "start_training", "eval_interval", "reset_interval", "max_worker_restarts", "keep_checkpoint_every",
    # numpy and highway-env take seeds >= 0 only
    "seed", "eval_seed",
    "env.max_offroad_steps", "reward.safety_coeff",
    # a zero learning rate or weight decay is a valid ablation (that part stays frozen)
    "agent.actor_lr", "agent.critic_lr", "agent.temp_lr", "agent.limits_lr", "agent.q_entropy_lagrange_lr",
    "agent.critic_weight_decay", "agent.limits_weight_decay",
    "agent.speed_floor_hold", "agent.speed_floor_end", "agent.cap_ramp_start", "agent.cap_ramp_end",
)  # fmt: skip


def _check_signs(cfg: TrainConfig) -> None:
    value = lambda path: functools.reduce(getattr, path.split("."), cfg)  # noqa: E731
    bounds = {flag_name(path): (value(path), "> 0") for path in _POSITIVE}
    bounds.update({flag_name(path): (value(path), ">= 0") for path in _NON_NEGATIVE})
    _check_bounds(bounds)


def _validate_agent(agent: AgentConfig) -> None:
    if any(h <= 0 for h in agent.hidden_dims) or not agent.hidden_dims:
        raise ConfigError(f"--agent.hidden-dims must be positive sizes, got {agent.hidden_dims}")
    if agent.num_atoms < 2:
        raise ConfigError(f"--agent.num-atoms must be at least 2, got {agent.num_atoms}")
    for flag, risk in (("--agent.cvar-risk", agent.cvar_risk), ("--agent.cvar-limits", agent.cvar_limits)):
        if risk is not None and not 0.0 <= risk < 1.0:
            raise ConfigError(f"{flag} must be in [0, 1), got {risk}")
    if agent.q_min >= agent.q_max:
        raise ConfigError(f"--agent.q-min ({agent.q_min}) must be below --agent.q-max ({agent.q_max})")
    if not 0.0 < agent.init_limit <= 1.0:
        raise ConfigError(f"--agent.init-limit must be in (0, 1], got {agent.init_limit}")
    if not 0.0 <= agent.discount <= 1.0:
        raise ConfigError(f"--agent.discount must be in [0, 1], got {agent.discount}")
    if not 0.0 < agent.tau <= 1.0:
        raise ConfigError(f"--agent.tau must be in (0, 1], got {agent.tau}")


def _validate_run(cfg: TrainConfig) -> None:
    collected = max(cfg.start_training, cfg.num_envs)
    if cfg.batch_size > collected:
        raise ConfigError(
            f"--batch-size ({cfg.batch_size}) is larger than the {collected} transitions collected "
            f"before training starts (--start-training)"
        )
    if cfg.buffer_size < cfg.num_envs:
        raise ConfigError(f"--buffer-size ({cfg.buffer_size}) must hold at least --num-envs transitions")


def _validate_env(env: EnvConfig) -> None:
    if env.policy_frequency > env.simulation_frequency:
        raise ConfigError(
            f"--env.policy-frequency ({env.policy_frequency}) must not exceed --env.simulation-frequency "
            f"({env.simulation_frequency}): the simulator steps at least once per action"
        )
    if not 0.0 < env.speed_control_gain <= 1.0:
        raise ConfigError(f"--env.speed-control-gain must be in (0, 1], got {env.speed_control_gain}")


def _validate_across_sections(cfg: TrainConfig) -> None:
    """The agent's speed cap needs the env's target speed, a steering limit no lane target; every (low,
    high) range, in any section."""
    env, reward = cfg.env, cfg.reward
    if cfg.agent.learned_limit and cfg.agent.limited_action == "speed" and not env.target_speed_action:
        raise ConfigError("--agent.limited-action speed caps a target speed: it needs --env.target-speed-action")
    if cfg.agent.learned_limit and cfg.agent.limited_action == "steering" and env.lane_target_action:
        raise ConfigError(
            "--env.lane-target-action with --agent.learned-limit on --agent.limited-action steering: its box [-h, h] "
            "would keep the car in the middle of the road; use --agent.no-learned-limit or --agent.limited-action speed"
        )
    for flag, (lo, hi) in (("--reward.speed-range", reward.speed_range), ("--env.reward-speed-range", env.reward_speed_range),
                           ("--env.target-speed-range", env.target_speed_range)):
        if not lo < hi:
            raise ConfigError(f"{flag} must be increasing, got {(lo, hi)}")


def _validate_reward(env: EnvConfig, reward: RewardConfig) -> None:
    """The training reward: the env section's reward weights and the reward section."""
    if env.normalize_reward and env.high_speed_reward + env.right_lane_reward - env.collision_reward <= 0:
        raise ConfigError(
            "--env.normalize-reward maps [--env.collision-reward, --env.high-speed-reward + --env.right-lane-reward] "
            "onto [0, 1]: that range must be increasing"
        )
    if not reward.critical_ttc < reward.warning_ttc:
        raise ConfigError("--reward.critical-ttc must be below --reward.warning-ttc")
    if reward.cone_half_angle > math.pi:
        raise ConfigError(f"--reward.cone-half-angle must be at most pi, got {reward.cone_half_angle}")


def _check_schedule(name: str, switch, start_field: str, end_field: str, start: int, end: int) -> None:
    """One schedule of the policy's speed box (design §4.1): `start` <= `end`, `end` > 0, neither without `switch`."""
    if switch is None:
        if start or end:
            raise ConfigError(f"{flag_name(start_field)} and {flag_name(end_field)} need {flag_name(name)}")
        return
    if start > end:
        raise ConfigError(f"{flag_name(start_field)} ({start}) must not exceed {flag_name(end_field)} ({end})")
    if end <= 0:
        raise ConfigError(f"{flag_name(end_field)} must be positive with {flag_name(name)} (the transition it ends at)")


def _validate_schedules(cfg: TrainConfig) -> None:
    """The speed floor needs a target speed inside its range and no learned cap; the ramp needs a learned cap."""
    agent, (low, high) = cfg.agent, cfg.env.target_speed_range
    speed_cap = agent.learned_limit and agent.limited_action == "speed"
    if agent.speed_floor is not None:
        if not cfg.env.target_speed_action:
            raise ConfigError("--agent.speed-floor bounds a target speed: it needs --env.target-speed-action")
        if speed_cap:
            raise ConfigError("--agent.speed-floor cannot join a learned speed cap (--agent.limited-action speed): "
                              "the cap can fall below it")  # fmt: skip
        if not low <= agent.speed_floor < high:
            raise ConfigError(f"--agent.speed-floor must be in --env.target-speed-range's [{low:g}, {high:g}) m/s, "
                              f"got {agent.speed_floor:g}")  # fmt: skip
    if agent.cap_ramp_init is not None:
        if not speed_cap:
            raise ConfigError("--agent.cap-ramp-init ramps a learned speed cap: it needs --agent.limited-action speed")
        if not 0.0 < agent.cap_ramp_init <= 1.0:
            raise ConfigError(f"--agent.cap-ramp-init must be in (0, 1], got {agent.cap_ramp_init}")
    _check_schedule("agent.speed_floor", agent.speed_floor, "agent.speed_floor_hold", "agent.speed_floor_end",
                    agent.speed_floor_hold, agent.speed_floor_end)  # fmt: skip
    _check_schedule("agent.cap_ramp_init", agent.cap_ramp_init, "agent.cap_ramp_start", "agent.cap_ramp_end",
                    agent.cap_ramp_start, agent.cap_ramp_end)  # fmt: skip


def validate(cfg: TrainConfig) -> None:
    """Raises ConfigError naming the flag of the first failing check, in this order."""
    check_finite(cfg)
    _check_signs(cfg)
    _validate_agent(cfg.agent)
    _validate_run(cfg)
    _validate_env(cfg.env)
    _validate_across_sections(cfg)
    _validate_reward(cfg.env, cfg.reward)
    _validate_schedules(cfg)
