"""Evaluation episodes, their metrics (SPEC 7), and evaluate.py's command.

Episode k always runs with seed `seed + k`, whatever the worker count: the vector env has autoreset
DISABLED and finished envs are reset here with the next episode's seed. Sampled actions use a key
derived from (k, step), and actions are computed on a padded batch of fixed size EVAL_BATCH,
because XLA on CPU gives results that differ by ~1e-6 between batch sizes, and that is enough to
change an episode. So an evaluation gives the same numbers with any number of workers.

No JAX at module level: the evaluation workers import this module (SPEC 2, import hygiene); the
agent is loaded inside `build_policy`.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import sys
from pathlib import Path
from typing import Callable, Literal

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode

import configs
from racer_vec import envs as env_layer
from racer_vec.config import (
    ACTION_DIM, ConfigError, EnvConfig, RewardParams, TrainConfig, check_finite, resolve, to_dict,
)  # fmt: skip
from racer_vec.rewards import training_reward
from racer_vec.video import FrameStats, VideoRecorder, configure_headless

EVAL_BATCH = 16
SAFETY_RISK_THRESHOLD = -0.5
"""A step violates safety when its collision risk is below this, or when the ego is offroad."""
METRICS_FILE = "evaluation_metrics.json"
RULE = "=" * 50
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
"""Both stop a run or an evaluation cleanly: Ctrl-C, and a scheduler's preemption (SPEC 10)."""

class EvaluationInterrupted(Exception):
    """`should_stop` asked to stop; raised between vector steps, so the workers close cleanly."""


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

    def to_json(self) -> dict:
        return {("return" if k == "episode_return" else k): v for k, v in dataclasses.asdict(self).items()}


def summarize(episodes: list[EpisodeRecord]) -> dict:
    """The SPEC 7 summary; rates are fractions in [0, 1], standard deviations over episodes (ddof 0)."""
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


def format_summary(summary: dict) -> str:
    """The printed results block (SPEC 7)."""
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
        self.length = np.zeros(num_envs, dtype=np.int64)

    def reset(self, mask: np.ndarray) -> None:
        for array in vars(self).values():
            array[mask] = 0

    def add(self, env_reward: np.ndarray, values: dict, rewards: dict) -> None:
        """`values`: envs.step_values of the step; `rewards`: rewards.training_reward of it."""
        self.env_return += env_reward
        self.training_return += rewards["training_reward"]
        self.violations += (rewards["collision_risk"] < SAFETY_RISK_THRESHOLD) | values["offroad"]
        near = np.isfinite(values["nearest_distance"])
        self.distance_sum += np.where(near, values["nearest_distance"], 0.0)
        self.distance_steps += near
        self.speed_sum += values["forward_speed"]
        self.length += 1

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


# ---------------------------------------------------------------------------------------------
# Episodes on a DISABLED-autoreset vector env


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


class Evaluator:
    """Runs evaluation episodes on its own DISABLED-autoreset vector env, kept open between calls."""

    def __init__(self, env_cfg: EnvConfig, reward_params: RewardParams, num_workers: int, *, render: bool = False):
        self.reward_params = reward_params
        self.num_workers = num_workers
        self.render = render
        self.envs = env_layer.make_vector_env(
            env_cfg,
            num_workers,
            seed=0,  # every episode is reset with its own seed
            autoreset_mode=AutoresetMode.DISABLED,
            render_mode="rgb_array" if render else None,
            wrapper=EpisodeControl,
        )
        self.faulted = False

    def run(
        self,
        policy: Policy,
        num_episodes: int,
        seed: int,
        *,
        recorder: VideoRecorder | None = None,
        num_filmed: int = 0,
        on_episode: Callable[[EpisodeRecord], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> list[EpisodeRecord]:
        """Episodes 0..num_episodes-1 with seeds seed + k; episodes k < num_filmed go to `recorder`.

        `should_stop` is checked between vector steps (never inside one, SPEC 8): when it returns
        True, EvaluationInterrupted is raised.
        """
        if num_filmed and not (self.render and recorder is not None):
            raise ValueError("filming needs an Evaluator built with render=True and a recorder")
        n = self.num_workers
        episode_ids = np.full(n, -1)
        obs = np.zeros((n, *self.envs.single_observation_space.shape), np.float32)
        acc = EpisodeAccumulator(n)
        records: dict[int, EpisodeRecord] = {}
        next_episode = 0
        needs_episode = np.ones(n, dtype=bool)
        try:
            while True:
                # Free envs take the next episodes in env order; the rest idle until the end.
                start = np.flatnonzero(needs_episode)[: num_episodes - next_episode]
                if start.size:
                    episode_ids[start] = np.arange(next_episode, next_episode + start.size)
                    next_episode += start.size
                    obs = self._start_episodes(obs, start, episode_ids, seed, num_filmed, recorder, acc)
                active = episode_ids >= 0
                if not active.any():
                    break
                if should_stop is not None and should_stop():
                    raise EvaluationInterrupted
                actions = padded_actions(policy, obs, np.maximum(episode_ids, 0), acc.length.copy())
                obs, env_reward, terminated, truncated, infos = env_layer.vector_call(self.envs, self.envs.step, actions)
                values = env_layer.step_values(infos, n)
                rewards = training_reward(obs, env_reward, values["rewards"], values["offroad"], self.reward_params)
                acc.add(env_reward, values, rewards)
                if num_filmed:
                    self._film_step(infos, episode_ids, active, num_filmed, recorder, values, rewards, acc)
                done = (terminated | truncated) & active
                for i in np.flatnonzero(done):
                    k = int(episode_ids[i])
                    records[k] = acc.record(i, k, seed + k, values["crashed"][i], values["offroad_terminated"][i])
                    if recorder is not None:
                        recorder.finish(k)
                    if on_episode is not None:
                        on_episode(records[k])
                episode_ids[done] = -1
                needs_episode = done
        except env_layer.WorkerFault as fault:
            if fault.env_index is not None and episode_ids[fault.env_index] >= 0:
                fault.episode = int(episode_ids[fault.env_index])
            self.faulted = True
            raise
        except BaseException as exc:
            # a failed or abandoned step leaves the workers in a state a plain close() hangs on
            self.faulted = not isinstance(exc, EvaluationInterrupted)
            raise
        return [records[k] for k in range(num_episodes)]

    def _start_episodes(self, obs, start, episode_ids, seed, num_filmed, recorder, acc) -> np.ndarray:
        n = self.num_workers
        mask = np.zeros(n, dtype=bool)
        mask[start] = True
        if num_filmed:
            self.envs.set_attr("filming", [bool(0 <= k < num_filmed) for k in episode_ids])
        # Python ints (a numpy int kills the worker); a fresh options dict (reset pops reset_mask)
        seeds = [int(seed + episode_ids[i]) if mask[i] else None for i in range(n)]
        reset_obs, infos = env_layer.vector_call(self.envs, self.envs.reset, seed=seeds, options={"reset_mask": mask})
        acc.reset(mask)
        if num_filmed:
            for i in np.flatnonzero(mask & infos.get("_frame", np.zeros(n, dtype=bool))):
                stats = FrameStats(
                    step=0,
                    speed=float(infos["speed"][i]),
                    safety_reward=None,
                    env_return=0.0,
                    training_return=0.0,
                    offroad=bool(infos["offroad"][i]),
                    crashed=bool(infos["crashed"][i]),
                )
                recorder.add_frame(int(episode_ids[i]), infos["frame"][i], stats)
        return np.where(mask[:, None], reset_obs, obs)

    @staticmethod
    def _film_step(infos, episode_ids, active, num_filmed, recorder, values, rewards, acc) -> None:
        filmed = active & (episode_ids < num_filmed) & infos.get("_frame", np.zeros(len(active), dtype=bool))
        for i in np.flatnonzero(filmed):
            stats = FrameStats(
                step=int(acc.length[i]),
                speed=float(values["speed"][i]),
                safety_reward=float(rewards["safety_reward"][i]),
                env_return=float(acc.env_return[i]),
                training_return=float(acc.training_return[i]),
                offroad=bool(values["offroad"][i]),
                crashed=bool(values["crashed"][i]),
            )
            recorder.add_frame(int(episode_ids[i]), infos["frame"][i], stats)

    def evaluate(
        self,
        policy_on_obs: Callable[[np.ndarray], np.ndarray],
        num_episodes: int,
        seed: int,
        should_stop: Callable[[], bool] | None = None,
    ) -> dict:
        """Summary of deterministic episodes for periodic evaluation during training."""
        episodes = self.run(lambda obs, _ids, _steps: policy_on_obs(obs), num_episodes, seed, should_stop=should_stop)
        return summarize(episodes)

    def dead_workers(self) -> list[int]:
        """Workers that died since the last evaluation (found before the next one needs them)."""
        return env_layer.dead_workers(self.envs)

    def close(self) -> None:
        env_layer.close_vector_env(self.envs, faulted=self.faulted)


# ---------------------------------------------------------------------------------------------
# evaluate.py

PresetName = Literal[tuple(configs.PRESETS)]  # type: ignore[valid-type]


@dataclasses.dataclass(frozen=True)
class EvalArgs:
    """Evaluate a RACER checkpoint, or a baseline policy, on highway-env (SPEC 7)."""

    checkpoint: str | None = None
    """A run directory, its checkpoints/ directory, or one step's directory (else the latest step).
    The agent and the env are rebuilt from the checkpoint's own saved config."""
    policy: Literal["agent", "zero", "constant", "random"] = "agent"
    """`agent`: the checkpoint's actor. Baselines: `zero`, `constant` (--constant-action), `random`
    (uniform); they need --preset, or a --checkpoint whose env they then use."""
    preset: PresetName | None = None
    """The preset whose env a baseline policy runs on."""
    constant_action: tuple[float, float] = (0.5, 0.0)
    """The `constant` baseline's action: acceleration, steering, in [-1, 1]."""
    num_episodes: int = 20
    num_workers: int = 4
    """Env worker processes (at most one per episode); the results do not depend on it."""
    seed: int = 0
    """Episode k uses env seed `seed + k`; sampled actions use a key derived from seed, k and the step."""
    render: bool = True
    """Write MP4 videos of the first --max-videos episodes."""
    max_videos: int = 3
    deterministic: bool = False
    """Act with tanh of the actor's mean (mapped onto the limited range) instead of sampling."""
    output_dir: str | None = None
    """Where evaluation_metrics.json and the videos go; default: <run>/eval/<step>, or eval/<policy>_<preset>."""
    duration: int | None = None
    """Override the env's episode duration (s), e.g. for a quick look; default: the config's."""


@dataclasses.dataclass(frozen=True)
class Target:
    """What is evaluated: the config it runs with, and where its checkpoint is (None for a preset)."""

    cfg: TrainConfig
    label: str
    """Names the videos: highway_eval_<label>_episode_<k>.mp4."""
    output_dir: Path
    checkpoint_dir: Path | None = None
    step: int | None = None


def validate_args(args: EvalArgs) -> None:
    for flag, value in (("--num-episodes", args.num_episodes), ("--num-workers", args.num_workers)):
        if value <= 0:
            raise ConfigError(f"{flag} must be positive, got {value}")
    check_finite(args)
    for flag, value in (("--max-videos", args.max_videos), ("--seed", args.seed)):
        if value < 0:
            raise ConfigError(f"{flag} must be >= 0, got {value}")
    if args.duration is not None and args.duration <= 0:
        raise ConfigError(f"--duration must be positive, got {args.duration}")
    if not all(-1.0 <= a <= 1.0 for a in args.constant_action):
        raise ConfigError(f"--constant-action must be in [-1, 1], got {args.constant_action}")
    if args.policy == "agent":
        if args.checkpoint is None:
            raise ConfigError("--checkpoint is required to evaluate an agent (or choose a baseline with --policy)")
        if args.preset is not None:
            raise ConfigError("--preset is only for baseline policies: a checkpoint brings its own config")
    else:
        if args.checkpoint is None and args.preset is None:
            raise ConfigError(f"--policy {args.policy} needs --preset NAME (the env to run on)")
        if args.checkpoint is not None and args.preset is not None:
            raise ConfigError("give either --preset or --checkpoint for a baseline's env, not both")
        if args.deterministic:
            raise ConfigError(f"--deterministic applies to the agent, not to --policy {args.policy}")


def resolve_target(args: EvalArgs) -> Target:
    """The config and names of what `args` evaluates; ConfigError for a bad checkpoint path."""
    if args.checkpoint is None:
        cfg = configs.PRESETS[args.preset]
        label = f"{args.policy}_{args.preset}"
        target = Target(resolve(cfg), label, Path("eval") / label)
    else:
        from racer_vec.checkpoints import (
            EVALUATION_ITEMS, DamagedCheckpoint, damage_warning, locate, newest_intact, saved_config, verify,
        )  # fmt: skip

        path = Path(args.checkpoint)
        if path.is_file():
            raise ConfigError(f"--checkpoint {path}: not a directory")
        directory, step = locate(path)
        if step is None:  # the newest intact step (SPEC 10)
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
        label = f"{run.name}_{step}{suffix}"
        target = Target(cfg, label, run / "eval" / f"{step}{suffix}", directory, step)
    if args.duration is not None:
        cfg = dataclasses.replace(target.cfg, env=dataclasses.replace(target.cfg.env, duration=args.duration))
        target = dataclasses.replace(target, cfg=cfg)
    if args.output_dir is not None:
        target = dataclasses.replace(target, output_dir=Path(args.output_dir))
    return target


def build_policy(args: EvalArgs, target: Target, obs_dim: int) -> Policy:
    """The action function of the evaluated policy (loads and checks the checkpoint for `agent`)."""
    if args.policy == "zero":
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

    agent, learner = _restore_agent(target, obs_dim)
    if args.deterministic:
        return lambda obs, ids, steps: np.asarray(learner.deterministic_actions(agent, obs))

    @jax.jit
    def sample(agent, obs, ids, steps):
        one = lambda o, key: learner.sample_actions(agent, o[None], key)[0]  # noqa: E731
        return jax.vmap(one)(obs, row_keys(ids, steps))

    return lambda obs, ids, steps: np.asarray(sample(agent, obs, ids, steps))


def _restore_agent(target: Target, obs_dim: int):
    import jax

    from racer_vec.agent import create_agent, make_learner
    from racer_vec.checkpoints import Checkpointer, DamagedCheckpoint

    cfg = target.cfg
    learner = make_learner(
        cfg.agent, batch_size=cfg.batch_size, utd_ratio=cfg.utd_ratio, updates_per_iteration=cfg.updates_per_iteration
    )
    try:
        # shapes and dtypes are all a restore needs: eval_shape spares compiling the agent's initializer
        template = jax.eval_shape(lambda: create_agent(cfg.agent, obs_dim, cfg.env.observed_vehicles, cfg.seed))
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
    env_cfg = target.cfg.env
    # a probe env checks the env config (unknown keys or id) before anything else starts
    probe = env_layer.make_env(env_cfg)
    obs_dim = probe.observation_space.shape[0]
    probe.close()
    policy = build_policy(args, target, obs_dim)

    num_filmed = min(args.max_videos, args.num_episodes) if args.render else 0
    num_workers = min(args.num_workers, args.num_episodes)
    recorder = VideoRecorder(target.output_dir, target.label, fps=env_cfg.policy_frequency) if num_filmed else None
    evaluator = Evaluator(env_cfg, RewardParams.build(target.cfg.reward, env_cfg), num_workers, render=num_filmed > 0)
    interrupted = []
    # Ctrl-C (and SIGTERM, SPEC 10) stops between vector steps (the workers ignore SIGINT, SPEC 8)
    previous = {s: signal.signal(s, lambda signum, frame: interrupted.append(signum)) for s in STOP_SIGNALS}
    try:
        with _progress() as progress:
            task = progress.add_task("evaluate", total=args.num_episodes)
            episodes = evaluator.run(
                policy,
                args.num_episodes,
                args.seed,
                recorder=recorder,
                num_filmed=num_filmed,
                on_episode=lambda record: progress.advance(task),
                should_stop=lambda: bool(interrupted),
            )
    except env_layer.WorkerFault as fault:
        if not interrupted:  # else a SIGTERM to the process group stopped the workers too
            print(f"error: {fault.describe()}; evaluation_metrics.json not written", file=sys.stderr)
            return 1
        print("\ninterrupted: evaluation_metrics.json not written", file=sys.stderr)
        return 130
    except EvaluationInterrupted:
        print("\ninterrupted: evaluation_metrics.json not written", file=sys.stderr)
        return 130
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if recorder is not None:
            recorder.close()
        evaluator.close()

    summary = summarize(episodes)
    videos = recorder.written if recorder is not None else {}
    report = {
        "summary": summary,
        "episodes": [{**e.to_json(), "video": str(videos[e.episode]) if e.episode in videos else None} for e in episodes],
        "config": {
            "evaluation": {**dataclasses.asdict(args), "num_workers_used": num_workers},
            "checkpoint": None
            if target.checkpoint_dir is None
            else {"directory": str(target.checkpoint_dir), "step": target.step},
            "train": to_dict(target.cfg),
        },
    }
    target.output_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = target.output_dir / METRICS_FILE
    metrics_path.write_text(json.dumps(report, indent=2) + "\n")

    print(format_summary(summary))
    print(f"\nmetrics: {metrics_path}")
    for k in sorted(videos):
        print(f"video:   {videos[k]}")
    return 0
