"""Configuration: plain frozen dataclasses that tyro turns into flags.

No JAX here: env workers import this module (design §2, import hygiene).
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
SPEED = 0
"""Action index 0: the acceleration, or with --env.target-speed-action the target speed (design §3)."""
STEERING = 1
"""Action index 1: the steering, or with --env.lane-target-action the target lateral position (design §3)."""
WORKER_TIMEOUT_S = 30.0
"""The default --worker-timeout of train.py and evaluate.py: far above the slowest healthy step or
reset measured (design §10), far below what a run can lose waiting for a hung worker."""


KINEMATICS_FEATURES = ("presence", "x", "y", "vx", "vy", "heading")
"""One row of the Kinematics observation (design §3): row 0 the ego, one row per observed vehicle."""


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
    target_speed_action: bool = False
    """Action index 0 is a target speed on `target_speed_range` rather than an acceleration: the env
    layer tracks it with a proportional controller (design §3), so a learned limit on it caps the speed."""
    target_speed_range: tuple[float, float] = (0.0, 40.0)
    """Target speeds (m/s) that action index 0 spans from -1 to 1 with --env.target-speed-action."""
    speed_control_gain: float = 1.0
    """Fraction of the speed error the controller closes in one policy step, in (0, 1]: 1 reaches the
    target in one step where the acceleration bounds allow; above 1 it would overshoot."""
    lane_target_action: bool = False
    """Action index 1 is a target lateral position across the road rather than a steering angle: -1
    the first lane's centre, 1 the last lane's, continuous in between; the env layer steers towards it
    with a lateral controller (design §3), so a lane change is one decision."""

    @property
    def obs_dim(self) -> int:
        """The env layer's flat observation: one Kinematics row per observed vehicle, the ego's included."""
        return self.observed_vehicles * len(KINEMATICS_FEATURES)

    def highway_config(self) -> dict:
        """The config dict handed to highway-env (it rejects keys it does not know)."""
        return {
            "observation": {
                "type": "Kinematics",
                "vehicles_count": self.observed_vehicles,
                "features": list(KINEMATICS_FEATURES),
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
    """The training reward (design §6). The env's reward weights live in the env section only."""

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
    """The RACER agent (design §4)."""

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
    release does (its target omits the termination mask, design §14). Wrong for these episodes;
    there to compare with the release."""
    learned_limit: bool = True
    """Learn a limit h in (0, 1] on the action that `limited_action` names."""
    limited_action: Literal["steering", "speed"] = "steering"
    """`steering`: a symmetric box [-h, h] on index 1 (the original description's). `speed`: a one-sided
    cap on the target speed of index 0, as in RACER's own code (design §4.1): the speed may use the
    fraction h of --env.target-speed-range above its low end; needs --env.target-speed-action."""
    keep_limit_on_reset: bool = True
    """The reset schedule (design §11) keeps the learned limit and its optimizer state, like the
    temperature; --agent.no-keep-limit-on-reset re-initializes it, as the release's reset would."""
    init_limit: float = 0.2
    """Initial h: the steering half-width, or the speed cap's fraction of the target-speed range."""
    limits_lr: float = 1e-5
    limits_weight_decay: float = 1e-3
    cvar_limits: float | None = None
    """CVaR level of the limit's loss; None: follow cvar_risk."""
    speed_floor: float | None = None
    """Practice: the lowest target speed (m/s) the policy may choose while it trains, a floor inside its
    squash (design §4.1); it holds until --agent.speed-floor-hold and falls linearly to the low end of
    --env.target-speed-range at --agent.speed-floor-end. Evaluation has none. Needs
    --env.target-speed-action; None: no floor."""
    speed_floor_hold: int = 0
    """The transition (counted like --max-steps) up to which the speed floor holds at --agent.speed-floor."""
    speed_floor_end: int = 0
    """The transition from which the speed floor is at the range's low end (none left)."""
    cap_ramp_init: float | None = None
    """RACER's ramp on a learned speed cap (design §4.1): the cap the policy acts and learns with is
    min(h, ramp); the ramp is this fraction of the target-speed range (like --agent.init-limit) until
    --agent.cap-ramp-start, then rises linearly to 1 at --agent.cap-ramp-end. Evaluation uses it too.
    Needs --agent.limited-action speed; None: no ramp."""
    cap_ramp_start: int = 0
    """The transition (counted like --max-steps) from which the cap's ramp rises."""
    cap_ramp_end: int = 0
    """The transition at which the cap's ramp reaches 1, the whole target-speed range."""
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
    max_worker_restarts: int = 3
    """Env worker faults a run survives by replacing its workers (design §10); one more stops it."""
    worker_timeout: float = WORKER_TIMEOUT_S
    """Seconds an env worker may take to answer a step or reset before it counts as hung, a fault like
    a death (design §10)."""
    reset_interval: int = 0
    """Every this many vector steps, while below 80% of max_steps, re-initialize every agent train
    state but the temperature, keeping the buffer, as the public release does (design §11); 0: never."""
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
    keep_checkpoint_every: int = 0
    """Also keep the first checkpoint saved at or after each multiple of this many transitions
    (e.g. 150000: 150k, 300k, ...), to evaluate them after the run; 0: only the newest."""
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
    from racer_vec.validation import validate  # validation reads these classes: imported here, not above

    validate(cfg)
    return cfg
