"""The driver: N env workers and the learner in one process, overlapping in time (SPEC 1).

One iteration:
    actions = sample_actions(agent, obs)        # on device, for all N envs at once
    envs.step_async(actions)                    # workers simulate ...
    agent = learner.update(agent, buffer)       # ... while XLA runs the update (async dispatch)
    envs.step_wait()
    training reward in numpy over N; buffer = insert(buffer, N transitions)  # one jitted call
"""

from __future__ import annotations

import dataclasses
import json
import signal
import sys
import time
from datetime import datetime
from pathlib import Path

import jax
import numpy as np

from racer_vec import envs as env_layer
from racer_vec.agent import create_agent, make_learner, reset_agent
from racer_vec.checkpoints import Checkpointer
from racer_vec.config import ACTION_DIM, ConfigError, RewardParams, TrainConfig, to_dict
from racer_vec.evaluation import Evaluator
from racer_vec.progress import ProgressDisplay
from racer_vec.provenance import machine_info, source_commit
from racer_vec.replay import init_buffer, insert, replicated_sharding
from racer_vec.rewards import training_reward

EMA_WEIGHT = 0.01
WORKER_FAULTS = (env_layer.EnvWorkerError, EOFError, BrokenPipeError, ConnectionResetError)


class TrainingStopped(Exception):
    """Training cannot go on (a worker fault or non-finite values); the message says why."""


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
    """Agent re-initializations by the reset schedule (SPEC 11)."""
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
    """Running returns and lengths of the N current episodes, and the ones finished since the last log."""

    def __init__(self, num_envs: int):
        self.returns = np.zeros(num_envs)
        self.training_returns = np.zeros(num_envs)
        self.lengths = np.zeros(num_envs, dtype=np.int64)
        self.finished: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def step(self, env_reward, train_reward, done) -> None:
        self.returns += env_reward
        self.training_returns += train_reward
        self.lengths += 1
        if done.any():
            self.finished.append((self.returns[done], self.training_returns[done], self.lengths[done]))
            self.returns[done] = 0.0
            self.training_returns[done] = 0.0
            self.lengths[done] = 0

    def pop_means(self) -> dict:
        if not self.finished:
            return {}
        returns, train_returns, lengths = (np.concatenate(parts) for parts in zip(*self.finished))
        self.finished = []
        return {
            "episode_return_mean": float(returns.mean()),
            "episode_training_return_mean": float(train_returns.mean()),
            "episode_length_mean": float(lengths.mean()),
            "episodes_in_interval": int(returns.size),
        }


def _crossed(before: int, after: int, interval: int) -> bool:
    return interval > 0 and after // interval > before // interval


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.run_dir = Path(cfg.resume) if cfg.resume else Path(cfg.runs_dir) / (cfg.run_name or _default_run_name(cfg))
        self.reward_params = RewardParams.build(cfg.reward, cfg.env)
        self.interrupted = False
        self.envs = None
        self.evaluator = None
        self.wandb_run = None
        self.counters = Counters(learning_starts=cfg.start_training)
        self.tracker = EpisodeTracker(cfg.num_envs)
        self.last_metrics = None
        self.pending_eval: dict = {}
        self.last_logged_step = -1

    # ----------------------------------------------------------------------------------- setup
    def setup(self) -> None:
        cfg = self.cfg
        # Probing one env validates the env config (unknown keys, ids) before any worker starts.
        probe = env_layer.make_env(cfg.env)
        self.obs_dim = obs_dim = probe.observation_space.shape[0]
        probe.close()

        self.learner = make_learner(
            cfg.agent,
            batch_size=cfg.batch_size,
            utd_ratio=cfg.utd_ratio,
            updates_per_iteration=cfg.updates_per_iteration,
        )
        self.agent = create_agent(cfg.agent, obs_dim, cfg.env.observed_vehicles, cfg.seed)
        self.buffer = init_buffer(cfg.buffer_size, obs_dim, ACTION_DIM)
        # Committed like the agent and like the key _sample returns: an uncommitted key compiles
        # the sampler a second time on the second iteration (~1 s).
        self.action_key = jax.device_put(jax.random.PRNGKey(cfg.seed + 1), replicated_sharding())
        self.random_actions = np.random.default_rng(cfg.seed)

        self.checkpointer = Checkpointer(self.run_dir / "checkpoints", keep=cfg.keep_checkpoints)
        if cfg.resume:
            self._restore()
        else:
            if self.checkpointer.latest_step() is not None:
                raise ConfigError(f"--run-name {self.run_dir.name}: {self.run_dir} already holds a run (use --resume)")
            self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2) + "\n")
        # One line per start or resume: which code and machine produced which part of the run.
        session = {
            "started": datetime.now().isoformat(timespec="seconds"),
            "env_steps": self.counters.env_steps,
            **source_commit(),
            "machine": machine_info(),
        }
        with open(self.run_dir / "run_info.jsonl", "a") as f:
            f.write(json.dumps(session) + "\n")

        self._sample = jax.jit(self._sample_actions)
        self.envs = env_layer.make_vector_env(cfg.env, cfg.num_envs, seed=cfg.seed)
        if cfg.eval_interval > 0:
            self.evaluator = Evaluator(cfg.env, self.reward_params, num_workers=min(cfg.num_envs, cfg.eval_episodes))
        self._init_wandb()

    def _sample_actions(self, agent, obs, key):
        key, sub = jax.random.split(key)
        return self.learner.sample_actions(agent, obs, sub), key

    def _restore(self) -> None:
        step = self.checkpointer.latest_step()
        if step is None:
            raise ConfigError(f"--resume {self.run_dir}: no checkpoint to resume from")
        buffer_template = self.buffer if self.checkpointer.has_buffer(step) else None
        agent, state, buffer = self.checkpointer.restore(step, self.agent, buffer_template)
        self.agent = agent
        counters = dict(state["counters"])
        self.counters = Counters(**counters)
        self.action_key = jax.device_put(np.asarray(self.counters.action_key, dtype=np.uint32), replicated_sharding())
        self.random_actions = np.random.default_rng([self.cfg.seed, step])
        if buffer is not None:
            self.buffer = buffer
        else:
            # The policy refills the buffer before updates resume (SPEC 7).
            self.counters.learning_starts = step + self.cfg.start_training
        print(
            f"resumed {self.run_dir} at {step} env steps"
            + ("" if buffer is not None else f"; refilling the buffer for {self.cfg.start_training} steps"),
            flush=True,
        )

    def _init_wandb(self) -> None:
        if self.cfg.wandb_mode == "disabled":
            return
        import wandb

        self.wandb_run = wandb.init(
            project=self.cfg.wandb_project,
            name=self.run_dir.name,
            id=self.run_dir.name.replace("/", "_"),
            resume="allow",
            dir=str(self.run_dir),
            mode=self.cfg.wandb_mode,
            config=to_dict(self.cfg),
            settings=wandb.Settings(console="off", silent=True),
        )

    # ------------------------------------------------------------------------------- main loop
    def run(self) -> int:
        cfg, c = self.cfg, self.counters
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        display = ProgressDisplay(total=cfg.max_steps, start=c.env_steps)
        try:
            obs, _ = self._guarded(self.envs.reset, seed=cfg.seed + c.env_steps)
            tick = time.perf_counter()
            while c.env_steps < cfg.max_steps and not self.interrupted:
                obs = self.iteration(obs)
                now = time.perf_counter()
                c.train_time += now - tick
                c.wall_time += now - tick
                tick = now
                before = c.env_steps - cfg.num_envs
                if self._reset_due():
                    self.agent = reset_agent(cfg.agent, self.obs_dim, self.agent)
                    c.resets_total += 1
                    display.message(f"reset the agent (all but the temperature) at {c.env_steps} env steps")
                if _crossed(before, c.env_steps, cfg.eval_interval):
                    self._evaluate()
                if _crossed(before, c.env_steps, cfg.log_interval):
                    self._log(display)
                if _crossed(before, c.env_steps, cfg.checkpoint_interval):
                    self._checkpoint()
                display.update(c, self.buffer_size)
                now = time.perf_counter()
                c.wall_time += now - tick
                tick = now
            if self.last_logged_step != c.env_steps:
                self._log(display)
            self._checkpoint()
            if self.interrupted:
                print(f"\ninterrupted: checkpoint at {c.env_steps} env steps in {self.run_dir}", flush=True)
                return 130
            return 0
        except TrainingStopped as exc:
            print(f"\ntraining stopped: {exc}", file=sys.stderr, flush=True)
            return 1
        finally:
            display.close()
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _reset_due(self) -> bool:
        """The release's schedule (SPEC 11): at every reset_interval-th vector step below 80% of max_steps."""
        cfg, c = self.cfg, self.counters
        vector_step = c.env_steps // cfg.num_envs
        return cfg.reset_interval > 0 and vector_step % cfg.reset_interval == 0 and c.env_steps < 0.8 * cfg.max_steps

    def _on_signal(self, signum, frame) -> None:
        self.interrupted = True

    def iteration(self, obs: np.ndarray) -> np.ndarray:
        cfg, c = self.cfg, self.counters
        if c.env_steps >= cfg.start_training:
            actions, self.action_key = self._sample(self.agent, obs, self.action_key)
            actions = np.asarray(actions)
        else:
            actions = self.random_actions.uniform(-1.0, 1.0, (cfg.num_envs, ACTION_DIM)).astype(np.float32)

        self._guarded(self.envs.step_async, actions)
        if c.env_steps >= c.learning_starts:
            # Dispatched asynchronously: XLA learns while the workers simulate.
            self.agent, self.last_metrics = self.learner.update(self.agent, self.buffer)
            c.updates += cfg.updates_per_iteration
            c.critic_updates += cfg.updates_per_iteration * cfg.utd_ratio
        next_obs, env_reward, terminated, truncated, infos = self._guarded(self.envs.step_wait)

        values = env_layer.step_values(infos, cfg.num_envs)
        real_next_obs = env_layer.final_observations(next_obs, infos)
        rewards = training_reward(real_next_obs, env_reward, values["rewards"], values["offroad"], self.reward_params)
        train_reward = rewards["training_reward"]
        # Truncation (time limit) still bootstraps; only crashes and offroad terminations do not.
        masks = 1.0 - terminated.astype(np.float32)
        self.buffer = insert(self.buffer, obs, actions, train_reward.astype(np.float32), masks, real_next_obs)

        done = terminated | truncated
        self.tracker.step(env_reward, train_reward, done)
        c.env_steps += cfg.num_envs
        c.speed_ema = ema_over_sequence(c.speed_ema, np.array([values["forward_speed"].mean()]), EMA_WEIGHT)
        crashed = values["crashed"][done].astype(np.float64)
        c.collision_ema = ema_over_sequence(c.collision_ema, crashed, EMA_WEIGHT)
        c.episodes_total += int(done.sum())
        c.train_collisions_total += int(crashed.sum())
        c.offroad_terminations_total += int(values["offroad_terminated"].sum())
        return next_obs

    def _guarded(self, call, *args, **kwargs):
        """Run a vector-env call; a worker fault becomes TrainingStopped naming the env index."""
        try:
            return call(*args, **kwargs)
        except WORKER_FAULTS + (RuntimeError, ValueError) as exc:
            index = env_layer.find_failed_worker(self.envs, exc)
            env_layer.close_vector_env(self.envs, faulted=True)
            self.envs = None
            where = f"env worker {index}" if index is not None else "an env worker"
            step = self._checkpoint()
            raise TrainingStopped(
                f"{where} failed ({type(exc).__name__}: {_first_line(exc)}); "
                f"learner state saved at {step} env steps in {self.run_dir / 'checkpoints'}"
            ) from exc

    @property
    def buffer_size(self) -> int:
        return min(self.counters.env_steps, self.cfg.buffer_size)

    # ------------------------------------------------------------------------ logging and eval
    def _learner_metrics(self) -> dict:
        if self.last_metrics is None:
            return {}
        metrics = {k: v.item() for k, v in jax.device_get(self.last_metrics).items()}
        if not metrics.pop("finite"):
            raise TrainingStopped(
                f"non-finite loss or parameters at {self.counters.env_steps} env steps; "
                f"the last good checkpoint is {self.checkpointer.latest_step()} in {self.run_dir / 'checkpoints'}"
            )
        return metrics

    def _log(self, display) -> None:
        c = self.counters
        record = {
            "env_steps": c.env_steps,
            "updates": c.updates,
            "critic_updates": c.critic_updates,
            "critic_utd": c.critic_updates / max(c.env_steps - min(c.learning_starts, c.env_steps), 1),
            "sps": c.env_steps / c.train_time if c.train_time > 0 else 0.0,
            "buffer_size": self.buffer_size,
            "speed_ema": c.speed_ema,
            "collision_ema": c.collision_ema,
            "train_collisions_total": c.train_collisions_total,
            "offroad_terminations_total": c.offroad_terminations_total,
            "episodes_total": c.episodes_total,
            "resets_total": c.resets_total,
            "wall_time": c.wall_time,
            **self._learner_metrics(),
            **self.tracker.pop_means(),
            **self.pending_eval,
        }
        self.pending_eval = {}
        self.last_logged_step = c.env_steps
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log(record, step=c.env_steps)
        display.log(record)

    def _evaluate(self) -> None:
        if self.evaluator is None:
            return
        start = time.perf_counter()
        summary = self.evaluator.evaluate(
            lambda agent_obs: self.learner.deterministic_actions(self.agent, agent_obs),
            self.cfg.eval_episodes,
            self.cfg.eval_seed,
        )
        self.pending_eval = {f"eval/{k}": v for k, v in summary.items()}
        self.counters.wall_time += time.perf_counter() - start

    def _checkpoint(self) -> int:
        c = self.counters
        if self.checkpointer.latest_step() == c.env_steps:
            return c.env_steps
        self._learner_metrics()  # refuses to save a non-finite state
        c.action_key = [int(x) for x in np.asarray(self.action_key)]
        state = {"counters": dataclasses.asdict(c), "config": to_dict(self.cfg)}
        buffer = self.buffer if self.cfg.save_buffer else None
        self.checkpointer.save(c.env_steps, self.agent, state, buffer)
        return c.env_steps

    # -------------------------------------------------------------------------------- teardown
    def close(self) -> None:
        if self.envs is not None:
            env_layer.close_vector_env(self.envs, faulted=False)
            self.envs = None
        if self.evaluator is not None:
            self.evaluator.close()
        if self.wandb_run is not None:
            import wandb

            self.wandb_run.finish()
            wandb.teardown()
        if hasattr(self, "checkpointer"):
            self.checkpointer.close()


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[-1][:300] if lines else type(exc).__name__


def _default_run_name(cfg: TrainConfig) -> str:
    return f"{cfg.preset}_s{cfg.seed}_{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def train(cfg: TrainConfig) -> int:
    """Run training to cfg.max_steps; returns the process exit code."""
    trainer = Trainer(cfg)
    try:
        trainer.setup()
        return trainer.run()
    finally:
        trainer.close()
