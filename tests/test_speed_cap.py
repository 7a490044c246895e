"""RACER's speed cap (design §3, §4.1, §4.6): the target-speed action, its controller in the env layer
(stock and fast simulator alike), the one-sided cap and the gradient that moves it, resets."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import configs
from racer_vec.config import ConfigError, EnvConfig, resolve
from racer_vec.learner import agent as racer
from racer_vec.learner import devices, networks
from racer_vec.sim.highway import SpeedControl, make_env

FAST = configs.PRESETS["highway_fast"]
TARGET_SPEED_ENV = dataclasses.replace(FAST.env, target_speed_action=True, duration=8)


# ---------------------------------------------------------------------------------------------
# The env layer


def control(gain=1.0) -> SpeedControl:
    return SpeedControl(low=0.0, high=40.0, gain=gain, step_s=0.2, acceleration_range=(-5.0, 5.0))


def test_the_controller_closes_the_speed_error_within_the_acceleration_bounds():
    # action 0 spans [0, 40] m/s: 0.25 -> 25 m/s; steering passes through
    assert control().target_speed(0.25) == pytest.approx(25.0)
    assert control().target_speed(3.0) == pytest.approx(40.0)  # clipped like the env's action
    np.testing.assert_allclose(control()(np.array([0.25, -0.3]), 24.5), [2.5 / 5.0, -0.3])  # 0.5 m/s in 0.2 s
    np.testing.assert_allclose(control()(np.array([0.5, 0.0]), 25.0), [1.0, 0.0])  # 25 m/s^2 wanted, 5 allowed
    np.testing.assert_allclose(control()(np.array([-1.0, 0.0]), 25.0), [-1.0, 0.0])
    np.testing.assert_allclose(control(gain=0.5)(np.array([0.25, 0.0]), 24.0), [0.5 * 1.0 / 0.2 / 5.0, 0.0])


def speeds_under(env_cfg: EnvConfig, target_action: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    env = make_env(env_cfg)
    rng = np.random.default_rng(seed)
    try:
        obs, info = env.reset(seed=seed)
        speeds, observations = [info["speed"]], [obs]
        for _ in range(env_cfg.duration * env_cfg.policy_frequency):
            obs, _, terminated, truncated, info = env.step(np.array([target_action, rng.uniform(-0.05, 0.05)]))
            speeds.append(info["speed"])
            observations.append(obs)
            if terminated or truncated:
                break
        return np.array(speeds), np.array(observations)
    finally:
        env.close()


# targets a fraction of a step (1 m/s) away from the start (25 m/s): an overshoot would show
@pytest.mark.parametrize("target_action, target_speed", [(-0.225, 15.5), (0.73, 34.6)])
def test_the_cap_holds_in_the_env_on_the_stock_and_the_fast_simulator(target_action, target_speed):
    runs = {
        fast: speeds_under(dataclasses.replace(TARGET_SPEED_ENV, fast_sim=fast), target_action, seed=3)
        for fast in (False, True)
    }
    np.testing.assert_array_equal(runs[True][1], runs[False][1])  # bit-identical episodes
    speeds = runs[True][0]
    assert len(speeds) > 20
    # never past the target: above it the speed only falls, below it only rises, up to the target
    above = speeds[:-1] > target_speed
    assert np.all(np.where(above, speeds[1:] <= speeds[:-1], speeds[1:] <= target_speed + 1e-9))
    assert speeds[-1] == pytest.approx(target_speed, abs=1e-6)  # reached within the episode


def test_a_speed_cap_needs_the_target_speed_action():
    agent = dataclasses.replace(FAST.agent, learned_limit=True, limited_action="speed")
    with pytest.raises(ConfigError, match="--env.target-speed-action"):
        resolve(dataclasses.replace(FAST, agent=agent))
    resolve(dataclasses.replace(FAST, agent=agent, env=TARGET_SPEED_ENV))
    with pytest.raises(ConfigError, match="--env.speed-control-gain"):
        resolve(dataclasses.replace(FAST, env=dataclasses.replace(TARGET_SPEED_ENV, speed_control_gain=1.5)))


# ---------------------------------------------------------------------------------------------
# The agent

OBS_DIM, ATOMS = 2, 21


def capped(**overrides):
    cfg = racer.AgentConfig(
        hidden_dims=(1,), num_atoms=ATOMS, q_min=-5.0, q_max=5.0, critic_layer_norm=False, learned_limit=True,
        limited_action="speed", init_limit=0.5, limits_lr=1e-2, limits_weight_decay=0.0, target_entropy=-1.0,
        cvar_risk=0.5, cvar_limits=0.5,
    )  # fmt: skip
    return dataclasses.replace(cfg, **overrides)


def critic_valuing_speed(agent: racer.RacerAgent, slope: float):
    """A critic whose return distribution tilts towards high atoms as the target-speed action grows
    (slope > 0) or towards low atoms (slope < 0): its CVaR is monotone in action 0, in that direction."""
    params = agent.critic_params()
    hidden = params["hidden"][0]["dense"]
    kernel = jnp.zeros_like(hidden["kernel"]).at[:, OBS_DIM + 0, 0].set(1.0)  # the unit sees a0 only
    params["hidden"][0]["dense"] = {"kernel": kernel, "bias": jnp.full_like(hidden["bias"], 2.0)}  # a0 + 2 > 0
    atoms = jnp.asarray(racer.atoms_of(capped()))
    params["head"] = {"kernel": jnp.broadcast_to(slope * atoms / 5.0, params["head"]["kernel"].shape),
                      "bias": jnp.zeros_like(params["head"]["bias"])}  # fmt: skip
    return agent.critic_layout.ravel(params, batch_dims=1)


def limit_after_policy_steps(cfg, slope: float, alpha: float, steps: int = 30) -> float:
    agent = racer.init_agent(cfg, OBS_DIM, 1, 0)
    critic = critic_valuing_speed(agent, slope)
    setup = racer.Setup(cfg, racer.make_optimizers(cfg), racer.atoms_of(cfg), devices.Shards(1, 64), 64, 1)
    step = jax.jit(functools.partial(racer.policy_step, setup))
    rng = np.random.default_rng(0)
    obs = jnp.asarray(rng.normal(size=(64, OBS_DIM)), jnp.float32)
    for _ in range(steps):
        noise = jnp.asarray(rng.normal(size=(64, 2)), jnp.float32)
        actor, limit, _ = step(agent, critic, obs, noise, jnp.float32(alpha))
        agent = agent.replace(actor=actor, limit=limit)
    return float(agent.limit.params)


@pytest.mark.slow
@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_the_cap_follows_the_critics_cvar_and_not_the_entropy_bonus(alpha):
    """design §4.6: the cap rises where the CVaR increases with speed and falls where it decreases,
    whatever the temperature: the entropy bonus of a wider box (-alpha / h) would raise it by itself."""
    start = capped().init_limit
    assert limit_after_policy_steps(capped(), slope=1.0, alpha=alpha) > start + 0.1
    assert limit_after_policy_steps(capped(), slope=-1.0, alpha=alpha) < start - 0.1


def test_capped_actions_stay_in_the_box_and_the_release_rule_clips_the_mean():
    h = 0.3
    agent = racer.init_agent(capped(init_limit=h), OBS_DIM, 1, 1)
    assert agent.speed_cap
    obs = jnp.asarray(np.random.default_rng(2).normal(size=(512, OBS_DIM)) * 3, jnp.float32)
    actions = np.asarray(racer.sample_actions(agent, obs, jax.random.PRNGKey(0)))
    assert actions[:, 0].min() >= -1.0 and actions[:, 0].max() <= 2 * h - 1 + 1e-6
    assert actions[:, 0].max() > 2 * h - 1 - 0.05 and actions[:, 0].min() < -0.95  # the whole box is used
    assert np.abs(actions[:, 1]).max() <= 1.0 and np.abs(actions[:, 1]).max() > 0.9
    mean, _ = networks.actor_apply(agent.actor_params(), obs)
    mean = np.asarray(mean)
    np.testing.assert_allclose(np.asarray(racer.deterministic_actions(agent, obs)),
                               np.stack([h - 1 + h * np.tanh(mean[:, 0]), np.tanh(mean[:, 1])], -1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(racer.release_actions(agent, obs)),
                               np.clip(mean, [-1.0, -1.0], [2 * h - 1, 1.0]), rtol=1e-6, atol=1e-6)  # fmt: skip


@pytest.mark.parametrize("keep", [True, False])
def test_the_reset_carries_the_cap_unless_told_not_to(keep):
    cfg = capped(keep_limit_on_reset=keep)
    agent = racer.init_agent(capped(), OBS_DIM, 1, 0)  # the same architecture, its initializer compiled already
    learned = agent.replace(limit=agent.limit.replace(params=jnp.float32(0.8)))
    reset = racer.reset_agent(cfg, OBS_DIM, learned)
    assert float(reset.limit.params) == pytest.approx(0.8 if keep else cfg.init_limit)
    assert reset.speed_cap
