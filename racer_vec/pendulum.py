"""Does the learner learn? The RACER learner on gymnasium's Pendulum-v1, nothing of highway-env.

    python -m racer_vec.pendulum                  # 10k steps, a few minutes on 2 CPU cores
    python -m racer_vec.pendulum --cvar-risk 0 --steps 20000

When a highway run misses its target, this separates a learner bug from an environment, reward or
task problem: the agent, critic ensemble, CVaR actor, temperature and lagrange updates and the
replay buffer are the ones `train.py` uses, fed by a task with a known answer. Pendulum's
swing-up scores about -1200 per episode with random actions and -150 to -200 once solved; SAC-like
learners get there within about 10k steps at one update per step. Exit code 1 when the final
deterministic evaluation stays below `--threshold`.

Pendulum has one action (torque in [-2, 2]) where the agent has two: index 0 (acceleration on
the highway) drives the torque and index 1 (the learned steering limit's index) is ignored, so its
entropy only adds a constant to the policy's. Rewards are divided by `--reward-scale` so that the
discounted returns (about -160 to 0 after scaling) lie inside the atom support.
"""

from __future__ import annotations

import dataclasses
import sys
import time

import numpy as np
import tyro

from racer_vec.config import ACTION_DIM, AgentConfig, ConfigError

TORQUE = 2.0
"""Pendulum-v1's action bound."""


@dataclasses.dataclass(frozen=True)
class PendulumArgs:
    steps: int = 10_000
    """Environment steps, random actions during the first `--start-training`."""
    start_training: int = 1000
    batch_size: int = 128
    utd_ratio: int = 1
    """Critic minibatches per agent update (one agent update per env step)."""
    cvar_risk: float = 0.8
    """racer_highway's risk level by default; 0 optimizes the mean."""
    hidden_dims: tuple[int, ...] = (256, 256)
    reward_scale: float = 10.0
    q_min: float = -170.0
    q_max: float = 10.0
    eval_interval: int = 2000
    eval_episodes: int = 5
    threshold: float = -400.0
    """Mean deterministic return the final evaluation must reach."""
    seed: int = 0


def agent_config(args: PendulumArgs) -> AgentConfig:
    """The racer_highway agent (section 4 defaults) with this task's support, resolved."""
    return AgentConfig(
        hidden_dims=args.hidden_dims,
        q_min=args.q_min,
        q_max=args.q_max,
        cvar_risk=args.cvar_risk,
        cvar_limits=args.cvar_risk,
        target_entropy=-ACTION_DIM / 2,
    )


def validate(args: PendulumArgs) -> None:
    for flag, value in (("--steps", args.steps), ("--batch-size", args.batch_size), ("--utd-ratio", args.utd_ratio),
                        ("--eval-episodes", args.eval_episodes), ("--reward-scale", args.reward_scale)):  # fmt: skip
        if value <= 0:
            raise ConfigError(f"{flag} must be positive, got {value}")
    if not 0.0 <= args.cvar_risk < 1.0:
        raise ConfigError(f"--cvar-risk must be in [0, 1), got {args.cvar_risk}")
    if not args.batch_size <= args.start_training < args.steps:
        raise ConfigError(
            f"--start-training ({args.start_training}) must be at least --batch-size ({args.batch_size}) "
            f"and below --steps ({args.steps})"
        )
    if args.q_min >= args.q_max:
        raise ConfigError(f"--q-min ({args.q_min}) must be below --q-max ({args.q_max})")


def evaluate(learner, agent, episodes: int, seed: int) -> float:
    """Mean return of the deterministic policy (tanh of the mean) over `episodes` seeded episodes."""
    import gymnasium as gym

    env = gym.make("Pendulum-v1")
    returns = []
    for k in range(episodes):
        obs, _ = env.reset(seed=seed + k)
        total, done = 0.0, False
        while not done:
            action = np.asarray(learner.deterministic_actions(agent, obs[None].astype(np.float32)))[0]
            obs, reward, terminated, truncated, _ = env.step(TORQUE * action[:1])
            total += float(reward)
            done = terminated or truncated
        returns.append(total)
    env.close()
    return float(np.mean(returns))


def run(args: PendulumArgs, log=print) -> list[tuple[int, float]]:
    """Train; returns the evaluations as (env step, mean deterministic return), the last at `steps`."""
    import gymnasium as gym
    import jax

    from racer_vec.learner import agent as racer
    from racer_vec.learner import replay

    validate(args)
    cfg = agent_config(args)
    learner = racer.make_learner(cfg, batch_size=args.batch_size, utd_ratio=args.utd_ratio, updates_per_iteration=1)
    env = gym.make("Pendulum-v1")
    obs_dim = env.observation_space.shape[0]
    agent = racer.init_agent(cfg, obs_dim, 1, args.seed)
    buffer = replay.init_buffer(args.steps, obs_dim)
    key = jax.random.PRNGKey(args.seed + 1)
    random_actions = np.random.default_rng(args.seed)

    evaluations, returns, episode_return = [], [], 0.0
    obs, _ = env.reset(seed=args.seed)
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        if step > args.start_training:
            key, sub = jax.random.split(key)
            action = np.asarray(learner.sample_actions(agent, obs[None].astype(np.float32), sub))[0]
            agent, _ = learner.iteration(agent, buffer)  # dispatched while the env steps
        else:
            action = random_actions.uniform(-1.0, 1.0, ACTION_DIM).astype(np.float32)
        next_obs, reward, terminated, truncated, _ = env.step(TORQUE * action[:1])
        # Pendulum only truncates (200 steps): the target bootstraps through every transition.
        buffer = replay.insert(buffer, obs[None], action[None], np.array([reward / args.reward_scale]),
                               np.array([0.0 if terminated else 1.0]), next_obs[None])  # fmt: skip
        episode_return += float(reward)
        obs = next_obs
        if terminated or truncated:
            returns.append(episode_return)
            episode_return = 0.0
            obs, _ = env.reset()
        if step % args.eval_interval == 0 or step == args.steps:
            mean_return = evaluate(learner, agent, args.eval_episodes, seed=10_000)
            evaluations.append((step, mean_return))
            recent = np.mean(returns[-5:]) if returns else float("nan")
            log(f"steps {step:6d}  eval return {mean_return:8.1f}  training return (last 5) {recent:8.1f}  "
                f"{time.perf_counter() - start:6.0f} s")  # fmt: skip
    env.close()
    return evaluations


def main(argv: list[str] | None = None) -> int:
    args = tyro.cli(PendulumArgs, args=argv, description=__doc__.splitlines()[0], prog="python -m racer_vec.pendulum")
    try:
        evaluations = run(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    final = evaluations[-1][1]
    verdict = "learns" if final >= args.threshold else "does NOT learn"
    print(f"final deterministic return {final:.1f} (threshold {args.threshold:g}): the learner {verdict} Pendulum-v1")
    return 0 if final >= args.threshold else 1


if __name__ == "__main__":
    sys.exit(main())
