"""Configuration: plain frozen dataclasses that tyro turns into flags.

No JAX here: env workers import this module (SPEC 2, import hygiene).
Fields left as ``None`` are derived defaults, resolved by :func:`resolve` when the config is built,
so ``config.json`` always holds concrete values.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Annotated, Literal

import tyro


ACTION_DIM = 2
"""highway-env's ContinuousAction: index 0 = acceleration, index 1 = steering."""
STEERING = 1


class ConfigError(ValueError):
    """A user mistake in the configuration; the message names the flag."""


@dataclass(frozen=True)
class EnvConfig:
    """The highway-env scene (highway-env's own config keys, plus this project's env layer)."""

    env_id: str = "highway_env:highway-v0"
    """Gymnasium id in the `module:id` form, so that spawned workers register it themselves."""
    fast_sim: bool = True
    """Use racer-vec's array-based simulator for this scene: bit-identical to stock highway-env, faster."""
    observed_vehicles: int = 15
    """Rows of the Kinematics observation (ego included): the observation has 6 times as many values."""
    vehicles_count: int = 50
    """Other vehicles on the road."""
    lanes_count: int = 4
    vehicles_density: float = 1.0
    duration: int = 40
    """Episode length in seconds (policy steps = duration * policy_frequency)."""
    simulation_frequency: int = 15
    """Simulator steps per second (Hz)."""
    policy_frequency: int = 5
    """Agent actions per second (Hz)."""
    ego_spacing: float = 2.0
    collision_reward: float = -1.0
    """highway-env reward weight for a crash (also used by the training reward's normalization)."""
    right_lane_reward: float = 0.1
    high_speed_reward: float = 0.4
    lane_change_reward: float = 0.0
    reward_speed_range: tuple[float, float] = (20.0, 30.0)
    """Speeds (m/s) mapped onto [0, 1] by the env's own speed reward."""
    normalize_reward: bool = True
    offroad_terminal: bool = False
    """highway-env's own rule: terminate when the ego leaves the road."""
    max_offroad_steps: int = 20
    """Terminate after this many consecutive offroad steps (0 turns the rule off)."""
    offroad_termination_reward: float = 0.0
    """Added to the env reward of a step that ends the episode offroad (without a crash)."""

    def highway_config(self) -> dict:
        """The config dict handed to highway-env (it rejects keys it does not know)."""
        return {
            "observation": {
                "type": "Kinematics",
                "vehicles_count": self.observed_vehicles,
                "features": ["presence", "x", "y", "vx", "vy", "heading"],
                "normalize": False,
                "absolute": False,
            },
            "action": {"type": "ContinuousAction"},
            "lanes_count": self.lanes_count,
            "vehicles_count": self.vehicles_count,
            "vehicles_density": self.vehicles_density,
            "duration": self.duration,
            "simulation_frequency": self.simulation_frequency,
            "policy_frequency": self.policy_frequency,
            "ego_spacing": self.ego_spacing,
            "collision_reward": self.collision_reward,
            "right_lane_reward": self.right_lane_reward,
            "high_speed_reward": self.high_speed_reward,
            "lane_change_reward": self.lane_change_reward,
            "reward_speed_range": list(self.reward_speed_range),
            "normalize_reward": self.normalize_reward,
            "offroad_terminal": self.offroad_terminal,
        }


@dataclass(frozen=True)
class RewardConfig:
    """The training reward (SPEC 6). The env's reward weights live in the env section only."""

    speed_correction: bool = True
    """Swap the env's speed term for a forward-speed term on `speed_range`."""
    speed_range: tuple[float, float] = (30.0, 45.0)
    """Forward speeds (m/s) mapped onto [0, 1] by the correction."""
    speed_weight: float = 0.4
    """Weight of the correction's forward-speed term."""
    safety_coeff: float = 0.01
    """Weight of the safety reward (collision risk + offroad penalty, in [-1.5, 0])."""
    warning_ttc: float = 2.0
    """Time to collision (s) below which a vehicle ahead is dangerous."""
    critical_ttc: float = 1.0
    """Time to collision (s) below which the risk is -1."""
    proximity: float = 10.0
    """Only vehicles closer than this (m) can be dangerous."""
    cone_half_angle: float = math.pi / 16
    """Half-angle (rad) of the forward cone in which vehicles are considered."""


@dataclass(frozen=True)
class RewardParams:
    """What `rewards.training_reward` reads: the reward section plus the env's weights."""

    speed_correction: bool
    speed_range: tuple[float, float]
    speed_weight: float
    safety_coeff: float
    warning_ttc: float
    critical_ttc: float
    proximity: float
    cone_half_angle: float
    collision_reward: float
    right_lane_reward: float
    high_speed_reward: float
    normalize_reward: bool

    @classmethod
    def build(cls, reward: RewardConfig, env: EnvConfig) -> RewardParams:
        return cls(
            **dataclasses.asdict(reward),
            collision_reward=env.collision_reward,
            right_lane_reward=env.right_lane_reward,
            high_speed_reward=env.high_speed_reward,
            normalize_reward=env.normalize_reward,
        )


@dataclass(frozen=True)
class AgentConfig:
    """The RACER agent (SPEC 4)."""

    hidden_dims: tuple[int, ...] = (256, 256)
    """Hidden layer sizes of the actor and critic MLPs."""
    encoder: Literal["mlp", "pointnet"] = "mlp"
    """`pointnet`: shared per-vehicle Dense+LayerNorm+ReLU, max-pooled over the other vehicles."""
    pointnet_dim: int = 128
    """Width of the PointNet per-vehicle layer."""
    discount: float = 0.99
    tau: float = 0.005
    """Polyak rate of the target critic."""
    num_qs: int = 2
    """Critic ensemble size."""
    num_atoms: int = 101
    q_min: float = -10.0
    q_max: float = 110.0
    cvar_risk: float = 0.8
    """CVaR level in [0, 1): 0 is the mean, 0.8 averages the worst 20% of returns."""
    actor_lr: float = 3e-4
    critic_lr: float = 3e-4
    temp_lr: float = 3e-4
    critic_weight_decay: float = 1e-3
    critic_layer_norm: bool = True
    init_temperature: float = 1.0
    target_entropy: float | None = None
    """None: -action_dim / 2."""
    backup_entropy: bool = False
    """Subtract the entropy bonus from the bootstrapped target."""
    independent_ensemble: bool = True
    """Each critic member bootstraps from its own target member."""
    bootstrap_terminations: bool = False
    """Ablation: bootstrap through crashes and offroad terminations too, as the public highway-racer
    release does (its target omits the termination mask, SPEC errata). Wrong for these episodes;
    there to compare with the release."""
    learned_limit: bool = True
    """Learn a symmetric limit h in (0, 1] on the steering action (index 1)."""
    init_limit: float = 0.2
    limits_lr: float = 1e-5
    limits_weight_decay: float = 1e-3
    cvar_limits: float | None = None
    """CVaR level of the limit's loss; None: follow cvar_risk."""
    q_entropy_target_diff: float = -0.01
    q_entropy_lagrange_init: float = 1e-3
    q_entropy_lagrange_lr: float = 1e-3


@dataclass(frozen=True)
class TrainConfig:
    """A training run: env, reward and agent sections plus the run-level settings."""

    env: EnvConfig = field(default_factory=EnvConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)

    num_envs: Annotated[int, tyro.conf.arg(aliases=("--num-workers",))] = 1
    """Parallel environment workers (subprocesses)."""
    max_steps: int = 100_000
    """Environment transitions to train for, summed over all workers."""
    start_training: int = 1000
    """Transitions collected with random actions before the first update (summed over workers)."""
    batch_size: int = 128
    """Critic minibatch size."""
    utd_ratio: int = 8
    """Critic minibatches per agent update."""
    buffer_size: int = 100_000
    """Replay buffer capacity (transitions)."""
    updates_per_iteration: int | None = None
    """Agent updates per vector step; None: num_envs (one update per collected transition)."""
    reset_interval: int = 0
    """Every this many vector steps, while below 80% of max_steps, re-initialize every agent train
    state but the temperature, keeping the buffer, as the public release does (SPEC 11); 0: never."""
    seed: int = 0
    run_name: str | None = None
    """Run directory name under runs_dir; None: <preset>_<seed>_<timestamp>."""
    runs_dir: str = "runs"
    resume: str | None = None
    """Continue the run in this directory from its latest checkpoint."""
    save_buffer: bool = False
    """Save the replay buffer with every checkpoint (exact resume)."""
    wandb_mode: Literal["disabled", "offline", "online"] = "offline"
    wandb_project: str = "racer-vec"
    log_interval: int = 1000
    """Environment transitions between metrics.jsonl lines."""
    checkpoint_interval: int = 10_000
    """Environment transitions between checkpoints."""
    keep_checkpoints: int = 3
    """Checkpoints kept on disk (the newest ones)."""
    eval_interval: int = 25_000
    """Environment transitions between evaluations (0 turns periodic evaluation off)."""
    eval_episodes: int = 3
    eval_seed: int = 10_000
    """Evaluation episode k uses seed eval_seed + k."""
    preset: tyro.conf.Suppress[str] = "racer_highway"
    """Name of the preset this config came from (set by the preset, not a flag)."""


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(cls, data: dict):
    """Rebuild a (nested) config dataclass from `to_dict` output, e.g. a saved config.json."""
    hints = typing.get_type_hints(cls)
    unknown = set(data) - set(hints)
    if unknown:
        raise ConfigError(f"unknown config fields {sorted(unknown)} (saved by another version of racer-vec?)")
    kwargs = {}
    for name, value in data.items():
        if dataclasses.is_dataclass(hints[name]):
            value = from_dict(hints[name], value)
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


def resolve(cfg: TrainConfig) -> TrainConfig:
    """Fill derived defaults and validate; raises ConfigError naming the flag."""
    agent = cfg.agent
    if agent.target_entropy is None:
        agent = dataclasses.replace(agent, target_entropy=-ACTION_DIM / 2)
    if agent.cvar_limits is None:
        agent = dataclasses.replace(agent, cvar_limits=agent.cvar_risk)
    upi = cfg.updates_per_iteration if cfg.updates_per_iteration is not None else cfg.num_envs
    cfg = dataclasses.replace(cfg, agent=agent, updates_per_iteration=upi)
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    positive = {
        "--num-envs": cfg.num_envs,
        "--max-steps": cfg.max_steps,
        "--batch-size": cfg.batch_size,
        "--utd-ratio": cfg.utd_ratio,
        "--buffer-size": cfg.buffer_size,
        "--updates-per-iteration": cfg.updates_per_iteration,
        "--log-interval": cfg.log_interval,
        "--checkpoint-interval": cfg.checkpoint_interval,
        "--keep-checkpoints": cfg.keep_checkpoints,
        "--eval-episodes": cfg.eval_episodes,
        "--agent.num-qs": cfg.agent.num_qs,
        "--agent.num-atoms": cfg.agent.num_atoms,
        "--agent.pointnet-dim": cfg.agent.pointnet_dim,
        "--env.observed-vehicles": cfg.env.observed_vehicles,
        "--env.vehicles-count": cfg.env.vehicles_count,
        "--env.lanes-count": cfg.env.lanes_count,
        "--env.duration": cfg.env.duration,
        "--env.simulation-frequency": cfg.env.simulation_frequency,
        "--env.policy-frequency": cfg.env.policy_frequency,
    }
    for flag, value in positive.items():
        if value is None or value <= 0:
            raise ConfigError(f"{flag} must be positive, got {value}")
    for flag, value in {
        "--start-training": cfg.start_training,
        "--eval-interval": cfg.eval_interval,
        "--env.max-offroad-steps": cfg.env.max_offroad_steps,
        "--reset-interval": cfg.reset_interval,
    }.items():
        if value < 0:
            raise ConfigError(f"{flag} must be >= 0, got {value}")
    if any(h <= 0 for h in cfg.agent.hidden_dims) or not cfg.agent.hidden_dims:
        raise ConfigError(f"--agent.hidden-dims must be positive sizes, got {cfg.agent.hidden_dims}")
    if cfg.agent.num_atoms < 2:
        raise ConfigError(f"--agent.num-atoms must be at least 2, got {cfg.agent.num_atoms}")
    for flag, risk in (("--agent.cvar-risk", cfg.agent.cvar_risk), ("--agent.cvar-limits", cfg.agent.cvar_limits)):
        if risk is not None and not 0.0 <= risk < 1.0:
            raise ConfigError(f"{flag} must be in [0, 1), got {risk}")
    if cfg.agent.q_min >= cfg.agent.q_max:
        raise ConfigError(f"--agent.q-min ({cfg.agent.q_min}) must be below --agent.q-max ({cfg.agent.q_max})")
    if not 0.0 < cfg.agent.init_limit <= 1.0:
        raise ConfigError(f"--agent.init-limit must be in (0, 1], got {cfg.agent.init_limit}")
    if not 0.0 <= cfg.agent.discount <= 1.0:
        raise ConfigError(f"--agent.discount must be in [0, 1], got {cfg.agent.discount}")
    if not 0.0 < cfg.agent.tau <= 1.0:
        raise ConfigError(f"--agent.tau must be in (0, 1], got {cfg.agent.tau}")
    collected = max(cfg.start_training, cfg.num_envs)
    if cfg.batch_size > collected:
        raise ConfigError(
            f"--batch-size ({cfg.batch_size}) is larger than the {collected} transitions collected "
            f"before training starts (--start-training)"
        )
    if cfg.buffer_size < cfg.num_envs:
        raise ConfigError(f"--buffer-size ({cfg.buffer_size}) must hold at least --num-envs transitions")
    lo, hi = cfg.reward.speed_range
    if not lo < hi:
        raise ConfigError(f"--reward.speed-range must be increasing, got {cfg.reward.speed_range}")
    lo, hi = cfg.env.reward_speed_range
    if not lo < hi:
        raise ConfigError(f"--env.reward-speed-range must be increasing, got {cfg.env.reward_speed_range}")
    if not cfg.reward.critical_ttc < cfg.reward.warning_ttc:
        raise ConfigError("--reward.critical-ttc must be below --reward.warning-ttc")
