"""The driver: N env workers and the learner in one process, overlapping in time (design §1).

One iteration:
    actions = sample_actions(agent, obs)        # on device, for all N envs at once
    envs.step_async(actions)                    # workers simulate ...
    agent = learner.iteration(agent, buffer)    # ... while XLA runs the update (async dispatch)
    envs.step_wait()
    training reward in numpy over N; buffer = insert(buffer, N transitions)  # one jitted call
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import sys
import time

import jax
import numpy as np

from racer_vec.config import ACTION_DIM, ConfigError, RewardParams, TrainConfig, to_dict
from racer_vec.learner.agent import init_agent, make_learner, reset_agent
from racer_vec.learner.devices import replicated_sharding
from racer_vec.learner.replay import init_buffer, insert
from racer_vec.learner.schedules import schedule_metrics, speed_bounds, warmup_box
from racer_vec.run.checkpoint_files import damage_warning
from racer_vec.run.checkpoints import Checkpointer
from racer_vec.run.counters import EMA_WEIGHT, Counters, EpisodeTracker, ema_over_sequence
from racer_vec.run.evaluation import EvaluationInterrupted, Evaluator
from racer_vec.run.progress import ProgressDisplay
from racer_vec.run.run_dir import RunDirectory
from racer_vec.run.signals import ignore_stop_signals, stop_signals
from racer_vec.sim import highway
from racer_vec.sim.rewards import training_reward
from racer_vec.write_failures import WriteFailed

class TrainingStopped(Exception):
    """Training cannot go on (a worker fault or non-finite values); the message says why."""


def _crossed(before: int, after: int, interval: int) -> bool:
    return interval > 0 and after // interval > before // interval


def reset_due(cfg: TrainConfig, c: Counters) -> bool:
    """The release's schedule (design §11): after the update of every reset_interval-th vector step
    below 80% of max_steps, once learning has started. Checked before each vector step acts, so the
    step's evaluation, log line and checkpoint see the agent that learned for it; `last_reset_step`
    keeps it to once per step when the next step is retried after a worker fault or resumed."""
    vector_step = c.env_steps // cfg.num_envs
    return (
        cfg.reset_interval > 0 and c.updates > 0 and vector_step % cfg.reset_interval == 0
        and c.env_steps < 0.8 * cfg.max_steps and c.last_reset_step != c.env_steps
    )  # fmt: skip


class Trainer:
    def __init__(self, cfg: TrainConfig, directory: RunDirectory | None = None):
        self.cfg = cfg
        self.directory = RunDirectory(cfg) if directory is None else directory
        self.run_dir = self.directory.path
        self.reward_params = RewardParams.build(cfg.reward, cfg.env)
        self.interrupted = False
        self.envs = None
        self.evaluator = None
        # updates need a non-empty buffer, even with --start-training 0
        self.counters = Counters(learning_starts=max(cfg.start_training, cfg.num_envs))
        self.stored = 0
        """Transitions in the replay buffer, tracked on the host (reading the device's would sync)."""
        self.tracker = EpisodeTracker(cfg.num_envs)
        self.last_metrics = None
        self.pending_eval: dict = {}
        self.last_logged_step = -1

    # ----------------------------------------------------------------------------------- setup
    def setup(self) -> None:
        cfg = self.cfg
        self.directory.lock()  # before anything is written: one writer per run (design §8)
        highway.check_env(cfg.env)
        self.obs_dim = obs_dim = cfg.env.obs_dim

        self.learner = make_learner(
            cfg.agent,
            batch_size=cfg.batch_size,
            utd_ratio=cfg.utd_ratio,
            updates_per_iteration=cfg.updates_per_iteration,
        )
        self.agent = init_agent(cfg.agent, obs_dim, cfg.env.observed_vehicles, cfg.seed)
        self.buffer = init_buffer(cfg.buffer_size, obs_dim, ACTION_DIM)
        # Committed like the agent and like the key _sample returns: an uncommitted key compiles
        # the sampler a second time on the second iteration (~1 s).
        self.action_key = jax.device_put(jax.random.PRNGKey(cfg.seed + 1), replicated_sharding())
        self.random_actions = np.random.default_rng(cfg.seed)

        self.checkpointer = Checkpointer(self.directory.checkpoints, cfg.keep_checkpoints, cfg.keep_checkpoint_every)
        if cfg.resume:
            self._restore()
        elif self.checkpointer.latest_step() is not None:
            raise ConfigError(f"--run-name {self.run_dir.name}: {self.run_dir} already holds a run (use --resume)")
        self.directory.open(self.counters.env_steps)

        self._sample = jax.jit(self._sample_actions)
        # the env workers start in the loop's first reset, where a worker fault is handled (design §10)
        if cfg.eval_interval > 0:
            self.evaluator = self._make_evaluator()

    def _sample_actions(self, agent, obs, key, bounds):
        key, sub = jax.random.split(key)
        return self.learner.sample_actions(agent, obs, sub, bounds), key

    def _restore(self) -> None:
        if self.checkpointer.latest_step() is None:
            raise ConfigError(f"--resume {self.run_dir}: no checkpoint to resume from")
        # the newest intact step (design §10); damaged newer ones are set aside, to be trained again
        step, agent, state, buffer, damaged = self.checkpointer.restore_newest(self.agent, self.buffer)
        if damaged:
            print(damage_warning(damaged, step), file=sys.stderr, flush=True)
            self.checkpointer.set_aside(s for s, _ in damaged)
        self.agent = agent
        counters = dict(state["counters"])
        self.counters = Counters(**counters)
        self.action_key = jax.device_put(np.asarray(self.counters.action_key, dtype=np.uint32), replicated_sharding())
        self.random_actions = np.random.default_rng([self.cfg.seed, step])
        if buffer is not None:
            self.buffer = buffer
            self.stored = int(buffer.size)
        else:
            # The policy refills the buffer before updates resume (design §7).
            self.counters.learning_starts = step + max(self.cfg.start_training, self.cfg.num_envs)
        print(
            f"resumed {self.run_dir} at {step} env steps"
            + ("" if buffer is not None else f"; refilling the buffer for {self.cfg.start_training} steps"),
            flush=True,
        )

    # ------------------------------------------------------------------------------- main loop
    def run(self) -> int:
        """Train up to max_steps, or until Ctrl-C or SIGTERM (then with a checkpoint, exit code 130)."""
        c = self.counters
        self.display = ProgressDisplay(total=self.cfg.max_steps, start=c.env_steps)
        try:
            with stop_signals(self._on_signal):
                with contextlib.suppress(highway.WaitStopped):  # stopped mid-wait: that step is not stored (design §8)
                    self._train_loop()
                if self.last_logged_step != c.env_steps:
                    self._log()
                self._checkpoint()
            if self.interrupted:
                print(f"\ninterrupted: checkpoint at {c.env_steps} env steps in {self.run_dir}", flush=True)
                return 130
            return 0
        except TrainingStopped as exc:
            print(f"\ntraining stopped: {exc}", file=sys.stderr, flush=True)
            return 1
        finally:
            self.display.close()

    def _train_loop(self) -> None:
        """Vector steps until max_steps or a stop signal, the schedule's work between them."""
        cfg, c = self.cfg, self.counters
        obs = self.reset_envs(seed=cfg.seed + c.env_steps)
        tick = time.perf_counter()
        while c.env_steps < cfg.max_steps and not self.interrupted:
            if reset_due(cfg, c):
                self._reset_agent()
                tick = self._clock(tick, training=False)
            try:
                obs = self.vector_step(obs)
            except highway.WorkerFault as fault:
                tick = self._clock(tick, training=True)
                obs = self._replace_workers(fault)
                tick = self._clock(tick, training=False)
                continue
            tick = self._clock(tick, training=True)
            self._after_vector_step()
            self.display.update(c, self.stored)
            tick = self._clock(tick, training=False)

    def _clock(self, tick: float, *, training: bool) -> float:
        """Add the time since `tick` to the wall time, and to the training time (SPS) if `training`."""
        now = time.perf_counter()
        if training:
            self.counters.train_time += now - tick
        self.counters.wall_time += now - tick
        return now

    def _after_vector_step(self) -> None:
        """The schedule's work due at this env step: evaluation, log line, checkpoint (a reset due at
        this step comes after them, before the next step acts: `reset_due`)."""
        cfg, c = self.cfg, self.counters
        before = c.env_steps - cfg.num_envs
        if _crossed(before, c.env_steps, cfg.eval_interval):
            self._evaluate()
        if _crossed(before, c.env_steps, cfg.log_interval):
            self._log()
        if _crossed(before, c.env_steps, cfg.checkpoint_interval):
            self._checkpoint()

    def _reset_agent(self) -> None:
        c = self.counters
        self.agent = reset_agent(self.cfg.agent, self.obs_dim, self.agent)
        c.resets_total += 1
        c.last_reset_step = c.env_steps
        a = self.cfg.agent
        kept = "the temperature and the limit" if a.learned_limit and a.keep_limit_on_reset else "the temperature"
        self.display.message(f"reset the agent (all but {kept}) at {c.env_steps} env steps")

    def _on_signal(self, signum, frame) -> None:
        self.interrupted = True

    def vector_step(self, obs: np.ndarray) -> np.ndarray:
        """One vector step: act, learn while the workers simulate, store N transitions.

        A worker fault (a hang too) raises highway.WorkerFault, and a stop signal while the workers
        have not answered highway.WaitStopped, before anything of the step is stored.
        """
        cfg, c = self.cfg, self.counters
        bounds = speed_bounds(cfg, c.env_steps)  # the speed box's schedules now (design §4.1), traced
        if c.env_steps >= cfg.start_training:
            actions, self.action_key = self._sample(self.agent, obs, self.action_key, bounds)
            actions = np.asarray(actions)
        else:
            low, high = warmup_box(bounds)
            actions = self.random_actions.uniform(low, high, (cfg.num_envs, ACTION_DIM)).astype(np.float32)

        highway.vector_call(self.envs, self.envs.step_async, actions)
        if c.env_steps >= c.learning_starts:
            # Dispatched asynchronously: XLA learns while the workers simulate.
            self.agent, self.last_metrics = self.learner.iteration(self.agent, self.buffer, bounds)
            c.updates += cfg.updates_per_iteration
            c.critic_updates += cfg.updates_per_iteration * cfg.utd_ratio
        next_obs, env_reward, terminated, truncated, infos = highway.vector_call(self.envs, self.envs.step_wait)

        values = highway.step_values(infos, cfg.num_envs)
        real_next_obs = highway.final_observations(next_obs, infos)
        rewards = training_reward(real_next_obs, env_reward, values["rewards"], values["offroad"], self.reward_params)
        train_reward = rewards["training_reward"]
        # Truncation (time limit) still bootstraps; only crashes and offroad terminations do not.
        masks = 1.0 - terminated.astype(np.float32)
        self.buffer = insert(self.buffer, obs, actions, train_reward.astype(np.float32), masks, real_next_obs)
        self.stored = min(self.stored + cfg.num_envs, cfg.buffer_size)

        done = terminated | truncated
        self.tracker.step(env_reward, train_reward, done, values)
        c.env_steps += cfg.num_envs
        c.speed_ema = ema_over_sequence(c.speed_ema, np.array([values["forward_speed"].mean()]), EMA_WEIGHT)
        crashed = values["crashed"][done].astype(np.float64)
        c.collision_ema = ema_over_sequence(c.collision_ema, crashed, EMA_WEIGHT)
        c.episodes_total += int(done.sum())
        c.train_collisions_total += int(crashed.sum())
        c.offroad_terminations_total += int(values["offroad_terminated"].sum())
        return next_obs

    # ---------------------------------------------------------------------------- worker faults
    def reset_envs(self, seed: int) -> np.ndarray | None:
        """Start the workers where none run, and reset every env; a worker fault replaces them."""
        cfg = self.cfg
        try:
            if self.envs is None:
                self.envs = highway.make_vector_env(cfg.env, cfg.num_envs, seed=seed, worker_timeout=cfg.worker_timeout,
                                                    should_stop=lambda: self.interrupted)  # fmt: skip
            return highway.vector_call(self.envs, self.envs.reset, seed=seed)[0]
        except highway.WorkerFault as fault:
            return self._replace_workers(fault)

    def _replace_workers(self, fault: highway.WorkerFault) -> np.ndarray | None:
        """design §10: close the faulted vector env (killing a hung worker) and start a new one; the running
        episodes end there (nothing of the faulted step was stored), learner, buffer and counters carry on."""
        cfg, c = self.cfg, self.counters
        if self.envs is not None:  # else it faulted while it started
            self.envs.close()
            self.envs = None
        if self.interrupted or fault.exitcode == -signal.SIGTERM:
            # a SIGTERM to the whole process group reached the workers too: stop, do not replace
            self.interrupted = True
            return None
        if c.worker_restarts_total >= cfg.max_worker_restarts:
            step = self._checkpoint()
            raise TrainingStopped(
                f"{fault.describe()} after {c.worker_restarts_total} worker restarts (--max-worker-restarts "
                f"{cfg.max_worker_restarts}); learner state saved at {step} env steps in {self.run_dir / 'checkpoints'}"
            )
        c.worker_restarts_total += 1
        print(
            f"{fault.describe()}; replacing the env workers at {c.env_steps} env steps "
            f"(restart {c.worker_restarts_total} of at most {cfg.max_worker_restarts})",
            file=sys.stderr, flush=True,
        )  # fmt: skip
        self.tracker.abandon()
        # new seeds, still determined by the run: seed + 1000 * restarts + env index
        return self.reset_envs(seed=cfg.seed + 1000 * c.worker_restarts_total)

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

    def _log(self) -> None:
        c, cfg = self.counters, self.cfg
        learner = self._learner_metrics()
        record = {
            "env_steps": c.env_steps,
            "updates": c.updates,
            "critic_updates": c.critic_updates,
            # per transition collected while learning: one iteration of updates per vector step
            "critic_utd": c.critic_updates / (c.updates / cfg.updates_per_iteration * cfg.num_envs) if c.updates else 0.0,
            "sps": c.env_steps / c.train_time if c.train_time > 0 else 0.0,
            "buffer_size": self.stored,
            "speed_ema": c.speed_ema,
            "collision_ema": c.collision_ema,
            "train_collisions_total": c.train_collisions_total,
            "offroad_terminations_total": c.offroad_terminations_total,
            "episodes_total": c.episodes_total,
            "resets_total": c.resets_total,
            "worker_restarts_total": c.worker_restarts_total,
            "eval_worker_restarts_total": c.eval_worker_restarts_total,
            "wall_time": c.wall_time,
            **learner,
            **schedule_metrics(cfg, c.env_steps, learner.get("limit")),
            **self.tracker.pop_means(),
            **self.pending_eval,
        }
        self.pending_eval = {}
        self.last_logged_step = c.env_steps
        self.directory.log(record)
        self.display.log(record)

    def _evaluate(self) -> None:
        """Periodic evaluation; a worker fault skips it and rebuilds the evaluator (design §10)."""
        if self.evaluator is None:
            return
        dead = self.evaluator.dead_workers()
        if dead:
            self._rebuild_evaluator(f"evaluation worker {dead[0]} had died", skipped=False)
        try:
            bounds = speed_bounds(self.cfg, self.counters.env_steps, floor=False)  # evaluation has no floor
            summary = self.evaluator.evaluate(
                lambda agent_obs: self.learner.deterministic_actions(self.agent, agent_obs, bounds),
                self.cfg.eval_episodes,
                self.cfg.eval_seed,
            )
        except EvaluationInterrupted:
            return  # the run stops at this step: nothing to report
        except highway.WorkerFault as fault:
            if not self.interrupted:  # a SIGTERM to the process group ends the run: no rebuild
                self._rebuild_evaluator(fault.describe("evaluation worker"), skipped=True)
            return
        self.pending_eval = {f"eval/{k}": v for k, v in summary.items()}

    def _rebuild_evaluator(self, reason: str, *, skipped: bool) -> None:
        c = self.counters
        self.evaluator.close()  # kills what is left of the faulted workers, a hung one too
        c.eval_worker_restarts_total += 1
        outcome = "evaluation skipped" if skipped else "evaluating with a new evaluator"
        print(f"{reason} at {c.env_steps} env steps; {outcome}", file=sys.stderr, flush=True)
        if skipped:
            self.pending_eval = {"eval/skipped": 1}
        self.evaluator = self._make_evaluator()

    def _make_evaluator(self) -> Evaluator:
        cfg = self.cfg
        return Evaluator(cfg.env, self.reward_params, num_workers=min(cfg.num_envs, cfg.eval_episodes),
                         worker_timeout=cfg.worker_timeout, should_stop=lambda: self.interrupted)  # fmt: skip

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
        if self.envs is not None:  # never blocks on a worker, a hung one included (design §8)
            self.envs.close()
            self.envs = None
        if self.evaluator is not None:
            self.evaluator.close()
        self.directory.close()
        if hasattr(self, "checkpointer"):
            self.checkpointer.close()
        self.directory.unlock()  # last: the run is another process's to train from here

    def write_failure(self, exc: WriteFailed) -> str:
        """The one line of a failed write (a full disk, say): what failed, where the run stands and
        how to go on (design §10)."""
        latest = self.checkpointer.latest_step() if hasattr(self, "checkpointer") else None
        if latest is None:
            after = "no checkpoint was saved; once there is room, start the run again"
        else:
            after = (f"its latest checkpoint is {latest} in {self.directory.checkpoints}; once there is room, "
                     f"continue with: python train.py --resume {self.run_dir}")  # fmt: skip
        return f"error: {exc}; training stopped at {self.counters.env_steps} env steps, {after}"


def _stop_start_up(signum, frame):
    raise KeyboardInterrupt  # SIGTERM during start-up ends it like Ctrl-C: nothing to save yet


def train(cfg: TrainConfig, directory: RunDirectory | None = None) -> int:
    """Run training to cfg.max_steps (in `directory`, locked already by train.py); returns the process
    exit code."""
    with stop_signals(_stop_start_up, (signal.SIGTERM,)):
        trainer = Trainer(cfg, directory)
        try:
            trainer.setup()
            return trainer.run()
        except WriteFailed as exc:
            print(trainer.write_failure(exc), file=sys.stderr, flush=True)
            return 1
        finally:
            ignore_stop_signals()  # nothing left running: a second Ctrl-C or SIGTERM waits for the clean-up
            trainer.close()
