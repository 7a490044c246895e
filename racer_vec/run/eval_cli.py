"""evaluate.py's command (design §7): evaluate a checkpoint, or a baseline policy, and report.

No JAX at module level (evaluate.py imports it inside main()); the agent is loaded inside
`build_policy`.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Literal

import numpy as np

import configs
from racer_vec.config import (
    ACTION_DIM, WORKER_TIMEOUT_S, ConfigError, EnvConfig, RewardParams, TrainConfig, resolve, to_dict,
)  # fmt: skip
from racer_vec.run.checkpoint_files import (
    EVALUATION_ITEMS, DamagedCheckpoint, damage_warning, locate, newest_intact, saved_config, verify,
)  # fmt: skip
from racer_vec.run.evaluation import (
    METRICS_FILE, EpisodeRecord, EvaluationInterrupted, Evaluator, Filming, Policy, format_summary, summarize,
)  # fmt: skip
from racer_vec.run.provenance import machine_info, source_commit
from racer_vec.run.signals import stop_signals
from racer_vec.sim import highway
from racer_vec.sim.video import VideoRecorder
from racer_vec.validation import check_finite
from racer_vec.write_failures import WriteFailed, check_output_dir, write_atomically

PresetName = Literal[tuple(configs.PRESETS)]  # type: ignore[valid-type]
DEFAULT_EPISODES = 20
RELEASE_EPISODES = 10
"""The release's evaluation script runs 10 episodes by default (design §11)."""
ACTION_FIELDS = ("target_speed_action", "target_speed_range", "speed_control_gain", "lane_target_action")
"""The env fields that say what an agent's actions mean (design §3): it keeps them on another preset's env."""
IDM_TARGET_SPEED = 40.0
"""The `idm` baseline's target speed unless --idm-target-speed (m/s)."""


@dataclasses.dataclass(frozen=True)
class EvalArgs:
    """Evaluate a RACER checkpoint, or a baseline policy, on highway-env (design §7)."""

    checkpoint: str | None = None
    """A run directory, its checkpoints/ directory, or one step's directory (else the latest step).
    The agent and the env are rebuilt from the checkpoint's own saved config."""
    policy: Literal["agent", "zero", "constant", "random", "idm"] = "agent"
    """`agent`: the checkpoint's actor. Baselines: `zero`, `constant` (--constant-action), `random`
    (uniform), `idm` (highway-env's IDM + MOBIL driver drives the ego: the textbook driver); they need
    --preset, or (all but `idm`) a --checkpoint whose env they then use."""
    preset: PresetName | None = None
    """The preset whose env a baseline policy runs on; with a checkpoint, run its agent on that preset's
    env instead of its own (a PointNet agent runs on any number of observed vehicles)."""
    constant_action: tuple[float, float] = (0.5, 0.0)
    """The `constant` baseline's action: acceleration, steering, in [-1, 1]."""
    idm_target_speed: float | None = None
    """The `idm` baseline's target speed (m/s; default 40). highway-env caps it at the lane's speed
    limit, 30 m/s on the highway envs' roads."""
    num_episodes: int | None = None
    """Episodes; default: 20, or 10 with --protocol release (the release script's default)."""
    num_workers: int = 4
    """Env worker processes (at most one per episode); the results do not depend on it."""
    seed: int = 0
    """Episode k uses env seed `seed + k`; sampled actions use a key derived from seed, k and the step."""
    render: bool = True
    """Write MP4 videos of the first --max-videos episodes."""
    max_videos: int = 3
    deterministic: bool = False
    """Act with tanh of the actor's mean (mapped onto the limited range) instead of sampling."""
    protocol: Literal["racer-vec", "release"] = "racer-vec"
    """`racer-vec`: design §7's measures. `release`: the public release's evaluation script (design §11):
    the actor's mean clipped to the action box (no tanh; a learned limit still bounds it), -5 on every
    step off highway-env's road in place of the env layer's offroad term, speed as |(vx, vy)| observed
    before each step, 10 episodes unless --num-episodes; crashes are counted as ours (correctly)."""
    hold_speed: float | None = None
    """With a checkpoint trained with --env.target-speed-action: the target speed (m/s) replaces the
    policy's own (a learned cap's too) on every step while the policy steers, to measure what its
    steering does at a speed it did not choose."""
    output_dir: str | None = None
    """Where evaluation_metrics.json and the videos go; default: <run>/eval/<step>, or eval/<policy>_<preset>."""
    duration: int | None = None
    """Override the env's episode duration (s), e.g. for a quick look; default: the config's."""
    worker_timeout: float = WORKER_TIMEOUT_S
    """Seconds an env worker may take to answer a step or reset before it counts as hung, a fault like
    a death (design §10); train.py's default too."""
    max_worker_restarts: int = 3
    """Env worker faults (a raise, a death, a hang) the evaluation survives: each starts new workers and
    runs the lost episodes again from their own seeds, with the same results (design §10). One more
    ends it, exit 1."""


@dataclasses.dataclass(frozen=True)
class Target:
    """What is evaluated: the config it runs with, and where its checkpoint is (None for a preset)."""

    cfg: TrainConfig
    label: str
    """Names the videos: highway_eval_<label>_episode_<k>.mp4."""
    output_dir: Path
    checkpoint_dir: Path | None = None
    step: int | None = None
    env: EnvConfig | None = None
    """The env the episodes run on when it is not the config's own (--preset with a checkpoint)."""

    @property
    def env_cfg(self) -> EnvConfig:
        return self.cfg.env if self.env is None else self.env


def episodes_of(args: EvalArgs) -> int:
    if args.num_episodes is not None:
        return args.num_episodes
    return RELEASE_EPISODES if args.protocol == "release" else DEFAULT_EPISODES


def idm_speed(args: EvalArgs) -> float | None:
    """The `idm` baseline's target speed; None for every other policy."""
    if args.policy != "idm":
        return None
    return IDM_TARGET_SPEED if args.idm_target_speed is None else args.idm_target_speed


def action_rule(args: EvalArgs) -> str:
    """How the evaluated policy acts, as results files and tables name it."""
    if args.policy == "idm":
        return f"idm, {idm_speed(args):g} m/s target"
    if args.policy != "agent":
        return args.policy
    rule = "clip(mean)" if args.protocol == "release" else "tanh(mean)" if args.deterministic else "sampled"
    return rule if args.hold_speed is None else f"{rule}, {args.hold_speed:g} m/s held"


def validate_args(args: EvalArgs) -> None:
    for flag, value in (("--num-episodes", episodes_of(args)), ("--num-workers", args.num_workers),
                        ("--worker-timeout", args.worker_timeout)):  # fmt: skip
        if value <= 0:
            raise ConfigError(f"{flag} must be positive, got {value}")
    check_finite(args)
    for flag, value in (("--max-videos", args.max_videos), ("--seed", args.seed),
                        ("--max-worker-restarts", args.max_worker_restarts)):  # fmt: skip
        if value < 0:
            raise ConfigError(f"{flag} must be >= 0, got {value}")
    if args.duration is not None and args.duration <= 0:
        raise ConfigError(f"--duration must be positive, got {args.duration}")
    if not all(-1.0 <= a <= 1.0 for a in args.constant_action):
        raise ConfigError(f"--constant-action must be in [-1, 1], got {args.constant_action}")
    if args.idm_target_speed is not None:
        if args.policy != "idm":
            raise ConfigError(f"--idm-target-speed applies to --policy idm, not to --policy {args.policy}")
        if not args.idm_target_speed > 0:
            raise ConfigError(f"--idm-target-speed must be positive, got {args.idm_target_speed:g}")
    if args.policy == "idm" and args.checkpoint is not None:
        raise ConfigError("--policy idm drives highway-env's own IDM driver: give --preset NAME, not --checkpoint")
    if args.policy == "agent":
        if args.checkpoint is None:
            raise ConfigError("--checkpoint is required to evaluate an agent (or choose a baseline with --policy)")
        if args.deterministic and args.protocol == "release":
            raise ConfigError("--protocol release acts with the clipped mean: --deterministic does not apply")
    else:
        if args.checkpoint is None and args.preset is None:
            raise ConfigError(f"--policy {args.policy} needs --preset NAME (the env to run on)")
        if args.checkpoint is not None and args.preset is not None:
            raise ConfigError("give either --preset or --checkpoint for a baseline's env, not both")
        for flag, given in (("--deterministic", args.deterministic), ("--hold-speed", args.hold_speed is not None)):
            if given:
                raise ConfigError(f"{flag} applies to the agent, not to --policy {args.policy}")


def resolve_target(args: EvalArgs) -> Target:
    """The config and names of what `args` evaluates; ConfigError for a bad checkpoint path."""
    if args.checkpoint is None:
        cfg = configs.PRESETS[args.preset]
        speed = idm_speed(args)
        label = f"{args.policy}{'' if speed is None else f'{speed:g}'}_{args.preset}"
        target = Target(resolve(cfg), label, Path("eval") / label)
    else:
        path = Path(args.checkpoint)
        if path.is_file():
            raise ConfigError(f"--checkpoint {path}: not a directory")
        directory, step = locate(path)
        if step is None:  # the newest intact step (design §10)
            step, damaged = newest_intact(directory)
            if damaged:
                print(damage_warning(damaged, step), file=sys.stderr, flush=True)
        else:
            try:
                verify(directory / str(step), EVALUATION_ITEMS)
            except DamagedCheckpoint as exc:
                raise ConfigError(f"--checkpoint {directory / str(step)}: damaged checkpoint ({exc})") from None
        try:
            cfg = resolve(saved_config(directory, step))
        except (TypeError, ValueError) as exc:
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError(f"--checkpoint {directory / str(step)}: unreadable saved config ({exc})") from None
        run = directory.parent
        suffix = "" if args.policy == "agent" else f"_{args.policy}"
        suffix += "_deterministic" if args.deterministic else ""
        suffix += "_release" if args.protocol == "release" else ""
        suffix += "" if args.hold_speed is None else f"_hold{args.hold_speed:g}"
        env = None
        if args.preset is not None:
            env = configs.PRESETS[args.preset].env
            env = dataclasses.replace(env, **{name: getattr(cfg.env, name) for name in ACTION_FIELDS})
            suffix += f"_on_{args.preset}"
            if cfg.agent.encoder != "pointnet" and env.observed_vehicles != cfg.env.observed_vehicles:
                raise ConfigError(
                    f"--preset {args.preset}: its env observes {env.observed_vehicles} vehicles, the checkpoint's "
                    f"{cfg.agent.encoder} agent {cfg.env.observed_vehicles}; only a PointNet agent runs on another number"
                )
        label = f"{run.name}_{step}{suffix}"
        target = Target(cfg, label, run / "eval" / f"{step}{suffix}", directory, step, env)
    if args.duration is not None:
        target = dataclasses.replace(target, env=dataclasses.replace(target.env_cfg, duration=args.duration))
    if args.hold_speed is not None:
        check_hold_speed(args.hold_speed, target.env_cfg)
    if args.output_dir is not None:
        target = dataclasses.replace(target, output_dir=Path(args.output_dir))
    return target


def check_hold_speed(speed: float, env_cfg: EnvConfig) -> None:
    if not env_cfg.target_speed_action:
        raise ConfigError("--hold-speed needs an agent trained with --env.target-speed-action (this one accelerates)")
    low, high = env_cfg.target_speed_range
    if not low <= speed <= high:
        raise ConfigError(f"--hold-speed must be within the env's target speeds, {low:g}-{high:g} m/s, got {speed:g}")


def holding_speed(policy: Policy, speed: float, env_cfg: EnvConfig) -> Policy:
    """`policy` with action index 0, the target speed (design §3), replaced by `speed`."""
    low, high = env_cfg.target_speed_range
    held = 2.0 * (speed - low) / (high - low) - 1.0

    def act(obs, ids, steps):
        actions = np.array(policy(obs, ids, steps), np.float32)
        actions[:, 0] = held
        return actions

    return act


def build_policy(args: EvalArgs, target: Target) -> Policy:
    """The action function of the evaluated policy (loads and checks the checkpoint for `agent`)."""
    if args.policy in ("zero", "idm"):  # idm: the env layer's driver ignores the actions
        return lambda obs, ids, steps: np.zeros((obs.shape[0], ACTION_DIM), np.float32)
    if args.policy == "constant":
        action = np.asarray(args.constant_action, np.float32)
        return lambda obs, ids, steps: np.broadcast_to(action, (obs.shape[0], ACTION_DIM))

    import jax

    base_key = jax.random.PRNGKey(args.seed)

    def row_keys(episode_ids, steps):
        # one key per (episode, step): an episode's actions do not depend on which worker runs it
        return jax.vmap(lambda k, t: jax.random.fold_in(jax.random.fold_in(base_key, k), t))(episode_ids, steps)

    if args.policy == "random":
        uniform = jax.jit(
            lambda ids, steps: jax.vmap(lambda key: jax.random.uniform(key, (ACTION_DIM,), minval=-1.0, maxval=1.0))(
                row_keys(ids, steps)
            )
        )
        return lambda obs, ids, steps: np.asarray(uniform(ids, steps))

    from racer_vec.learner.schedules import speed_bounds

    agent, learner = _restore_agent(target)
    # the ramp on a learned cap at the checkpoint's step, as RACER's evaluation acts; no floor (design §4.1)
    bounds = speed_bounds(target.cfg, target.step, floor=False)
    if args.protocol == "release":
        return lambda obs, ids, steps: np.asarray(learner.release_actions(agent, obs, bounds))
    if args.deterministic:
        return lambda obs, ids, steps: np.asarray(learner.deterministic_actions(agent, obs, bounds))

    @jax.jit
    def sample(agent, obs, ids, steps, bounds):
        one = lambda o, key: learner.sample_actions(agent, o[None], key, bounds)[0]  # noqa: E731
        return jax.vmap(one)(obs, row_keys(ids, steps))

    return lambda obs, ids, steps: np.asarray(sample(agent, obs, ids, steps, bounds))


def _restore_agent(target: Target):
    import jax

    from racer_vec.learner.agent import init_agent, make_learner
    from racer_vec.run.checkpoints import Checkpointer

    cfg = target.cfg
    learner = make_learner(
        cfg.agent, batch_size=cfg.batch_size, utd_ratio=cfg.utd_ratio, updates_per_iteration=cfg.updates_per_iteration
    )
    try:
        # shapes and dtypes are all a restore needs: eval_shape spares compiling the agent's initializer
        # the shapes the checkpoint was trained with: its own env's, whatever env it runs on here
        template = jax.eval_shape(lambda: init_agent(cfg.agent, cfg.env.obs_dim, cfg.env.observed_vehicles, cfg.seed))
    except ValueError as exc:
        raise ConfigError(f"--checkpoint {target.checkpoint_dir}: saved config does not fit its env ({exc})") from None
    checkpointer = Checkpointer(target.checkpoint_dir, keep=cfg.keep_checkpoints)
    try:
        agent, _, _ = checkpointer.restore(target.step, template)
    except DamagedCheckpoint as exc:
        raise ConfigError(f"--checkpoint {target.checkpoint_dir / str(target.step)}: damaged checkpoint ({exc})") from None
    finally:
        checkpointer.close()
    return agent, learner


def _progress():
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    return Progress(
        TextColumn("[bold]evaluate"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("episodes"),
        TimeElapsedColumn(),
        console=console,
        disable=not console.is_terminal,
    )


def run_evaluation(args: EvalArgs) -> int:
    """evaluate.py's work; raises ConfigError on a user mistake, returns the exit code otherwise."""
    validate_args(args)
    target = resolve_target(args)
    # before anything starts: a place that cannot be written is one line, exit 2 (design §8)
    check_output_dir("--output-dir" if args.output_dir is not None else "the default --output-dir", target.output_dir)
    env_cfg = target.env_cfg
    highway.check_env(env_cfg)  # the env config (unknown keys or id) is checked before anything else starts
    commit = source_commit()  # git runs before JAX starts (JAX warns about a fork after it)
    policy = build_policy(args, target)
    if args.hold_speed is not None:
        policy = holding_speed(policy, args.hold_speed, env_cfg)
    num_episodes = episodes_of(args)
    num_filmed = min(args.max_videos, num_episodes) if args.render else 0
    recorder = VideoRecorder(target.output_dir, target.label, fps=env_cfg.policy_frequency) if num_filmed else None
    num_workers = min(args.num_workers, num_episodes)
    interrupted = []
    evaluator = Evaluator(
        env_cfg, RewardParams.build(target.cfg.reward, env_cfg), num_workers, render=num_filmed > 0,
        idm_ego_speed=idm_speed(args), worker_timeout=args.worker_timeout, should_stop=lambda: bool(interrupted),
    )  # fmt: skip

    def restarted(fault: highway.WorkerFault, lost: list[int], restart: int) -> None:
        print(f"{fault.describe()}; new env workers run episode(s) {', '.join(map(str, lost))} again "
              f"(restart {restart} of at most {args.max_worker_restarts})", file=sys.stderr, flush=True)  # fmt: skip

    try:
        # Ctrl-C (and SIGTERM, design §10) stops between vector steps or while the driver waits for its
        # workers (the workers ignore SIGINT, design §8)
        with stop_signals(lambda signum, frame: interrupted.append(signum)), _progress() as progress:
            task = progress.add_task("evaluate", total=num_episodes)
            episodes = evaluator.run(
                policy,
                num_episodes,
                args.seed,
                filming=None if recorder is None else Filming(recorder, num_filmed),
                on_episode=lambda record: progress.advance(task),
                max_restarts=args.max_worker_restarts,
                on_restart=restarted,
            )
    except highway.WorkerFault as fault:
        if not interrupted:  # else a SIGTERM to the process group stopped the workers too
            restarts = args.max_worker_restarts
            print(f"error: {fault.describe()} after {restarts} worker restarts (--max-worker-restarts {restarts}); "
                  "evaluation_metrics.json not written", file=sys.stderr)  # fmt: skip
            return 1
        print("\ninterrupted: evaluation_metrics.json not written", file=sys.stderr)
        return 130
    except EvaluationInterrupted:
        print("\ninterrupted: evaluation_metrics.json not written", file=sys.stderr)
        return 130
    except WriteFailed as exc:  # a video (design §10)
        print(f"error: {exc}; evaluation_metrics.json not written", file=sys.stderr)
        return 1
    finally:
        if recorder is not None:
            recorder.close()
        evaluator.close()
    videos = recorder.written if recorder is not None else {}
    try:
        provenance = {**commit, "machine": machine_info()}
        summary = write_metrics(args, target, episodes, videos, num_workers, provenance)
    except WriteFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(format_summary(summary))
    print(f"\nmetrics: {target.output_dir / METRICS_FILE}")
    for k in sorted(videos):
        print(f"video:   {videos[k]}")
    return 0


def write_metrics(
    args: EvalArgs, target: Target, episodes: list[EpisodeRecord], videos: dict, num_workers: int, provenance: dict
):
    """Write evaluation_metrics.json (the summary, every episode with its video, the evaluation's settings
    and `provenance`, the commit and machine); returns the summary."""
    summary = {
        **summarize(episodes, release=args.protocol == "release"),
        "protocol": args.protocol,
        "action_rule": action_rule(args),
        "env_id": target.env_cfg.env_id,
    }
    checkpoint = None if target.step is None else {"directory": str(target.checkpoint_dir), "step": target.step}
    report = {
        "summary": summary,
        "episodes": [{**e.to_json(), "video": str(videos[e.episode]) if e.episode in videos else None} for e in episodes],
        "config": {
            "evaluation": {
                **dataclasses.asdict(args), "idm_target_speed": idm_speed(args), "num_episodes": len(episodes),
                "num_workers_used": num_workers, "label": target.label,
            },  # fmt: skip
            # where the numbers came from (a baseline's results file has no run to say it)
            "provenance": provenance,
            "checkpoint": checkpoint,
            "train": to_dict(target.cfg),
            # the env the episodes ran on: the config's, or --preset's, with --duration applied
            "env": to_dict(target.env_cfg),
        },
    }
    write_atomically(target.output_dir / METRICS_FILE, json.dumps(report, indent=2) + "\n")
    return summary
