"""The RACER learner (design §4): one compiled iteration, checkpointable agent, convergence, risk, devices."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from racer_vec.learner import agent as racer
from racer_vec.learner import networks, replay
from racer_vec.config import AgentConfig, ConfigError


def resolved(**overrides) -> AgentConfig:
    cfg = dataclasses.replace(AgentConfig(hidden_dims=(32, 32), num_atoms=21, q_min=-5.0, q_max=5.0), **overrides)
    return dataclasses.replace(
        cfg,
        target_entropy=-1.0 if cfg.target_entropy is None else cfg.target_entropy,
        cvar_limits=cfg.cvar_risk if cfg.cvar_limits is None else cfg.cvar_limits,
    )


def filled_buffer(obs, actions, rewards, masks, next_obs):
    buffer = replay.init_buffer(len(rewards), obs.shape[1])
    return replay.insert(buffer, obs, actions, rewards, masks, next_obs)


def run(learner, agent, buffer, iterations):
    for _ in range(iterations):
        agent, metrics = learner.iteration(agent, buffer)
    return agent, metrics


# ---------------------------------------------------------------------------------------------
# Two small learners, one per risk level, shared by the device, convergence and risk tests.

CAPACITY, BATCH, UTD, UPDATES = 4096, 128, 2, 100


def small(cvar_risk):
    return resolved(
        cvar_risk=cvar_risk, num_atoms=17, q_min=-12.0, q_max=4.0, actor_lr=3e-3, critic_lr=3e-3, temp_lr=3e-3,
        init_temperature=0.1,
    )  # fmt: skip


def small_learner(cvar_risk):
    return racer.make_learner(small(cvar_risk), batch_size=BATCH, utd_ratio=UTD, updates_per_iteration=UPDATES)


# ---------------------------------------------------------------------------------------------
# Devices (design §4.8). First in the file: the 2-device subprocess compiles while this process
# compiles the same learner for one device.


def device_run(num_devices):
    """One iteration (100 agent updates) of the small learner above, which this process has
    compiled already, on random data; returns everything the comparison needs."""
    assert jax.device_count() == num_devices
    learner = small_learner(0.8)
    rng = np.random.default_rng(0)
    obs, next_obs = rng.normal(size=(2, CAPACITY, 2)).astype(np.float32)
    buffer = filled_buffer(obs, rng.uniform(-1, 1, (CAPACITY, 2)), rng.normal(size=CAPACITY),
                           (rng.random(CAPACITY) > 0.1).astype(np.float32), next_obs)  # fmt: skip
    agent, metrics = learner.iteration(racer.init_agent(small(0.8), 2, 1, 0), buffer)
    actions = racer.sample_actions(agent, buffer.observations[:8], jax.random.PRNGKey(0))
    try:
        racer.make_learner(small(0.8), batch_size=BATCH + 1, utd_ratio=UTD, updates_per_iteration=UPDATES)
        error = ""
    except ConfigError as exc:
        error = str(exc)
    return {
        "leaves": [np.asarray(leaf).tolist() for leaf in jax.tree.leaves(agent)],
        "metrics": {k: float(v) for k, v in metrics.items()},
        "actions": np.asarray(actions).tolist(),
        "compiles": learner.iteration._cache_size(),
        "num_devices": learner.num_devices,
        "error": error,
    }


@pytest.mark.slow
def test_one_and_two_devices_agree():
    script = f"import json, sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); import test_agent; " \
             "print(json.dumps(test_agent.device_run(2)))"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True)
    one = json.loads(json.dumps(device_run(1)))  # meanwhile, the same run on this process's one device
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0
    two = json.loads(out.strip().splitlines()[-1])
    assert two["num_devices"] == 2 and one["num_devices"] == 1
    assert two["compiles"] == 1
    # the same random draws on both; only the order of the batch sums differs
    for a, b in zip(one["leaves"], two["leaves"], strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)
    for name, value in one["metrics"].items():
        assert two["metrics"][name] == pytest.approx(value, rel=1e-4, abs=1e-5), name
    np.testing.assert_allclose(two["actions"], one["actions"], rtol=1e-5, atol=1e-6)
    assert one["error"] == ""  # an odd batch is fine on one device
    assert "--batch-size" in two["error"]


# ---------------------------------------------------------------------------------------------
# The compiled iteration on a PointNet agent with a learned limit


VEHICLES = 4
POINTNET = resolved(encoder="pointnet", pointnet_dim=16, num_qs=2)


def random_transitions(rng, n, vehicles=VEHICLES):
    obs = rng.normal(size=(2, n, vehicles, 6)).astype(np.float32)
    obs[..., 0] = rng.random((2, n, vehicles)) < 0.7
    obs = obs.reshape(2, n, vehicles * 6)
    actions = rng.uniform(-1, 1, (n, 2)).astype(np.float32)
    return obs[0], actions, rng.normal(size=n).astype(np.float32), (rng.random(n) > 0.1).astype(np.float32), obs[1]


@pytest.fixture(scope="module")
def pointnet_learner():
    return racer.make_learner(POINTNET, batch_size=32, utd_ratio=2, updates_per_iteration=2)  # memoized


@pytest.fixture(scope="module")
def pointnet_buffer():
    return filled_buffer(*random_transitions(np.random.default_rng(0), 256))


@pytest.mark.slow
def test_iteration_is_one_compiled_call_that_updates_everything(pointnet_learner, pointnet_buffer):
    agent = racer.init_agent(POINTNET, VEHICLES * 6, VEHICLES, 0)
    before = jax.tree.map(lambda x: np.array(x, copy=True), agent)  # a view would block donation
    first, metrics = pointnet_learner.iteration(agent, pointnet_buffer)
    assert agent.critic.params.is_deleted()  # donated
    second, metrics = pointnet_learner.iteration(first, pointnet_buffer)
    assert pointnet_learner.iteration._cache_size() == 1  # no recompilation: no weak-type or shape drift
    assert int(second.updates) == 4
    expected = {"critic_loss", "actor_loss", "limit_loss", "temperature_loss", "lagrange_loss", "cross_entropy",
                "entropy_data", "entropy_ood", "entropy_gap", "entropy", "cvar", "q_mean", "temperature", "limit",
                "lagrange", "finite"}  # fmt: skip
    assert set(metrics) == expected == set(racer.METRICS) | {"finite"}
    assert all(np.shape(v) == () for v in metrics.values())
    assert bool(metrics["finite"])
    for name in ("actor", "critic", "temperature", "limit", "lagrange"):
        moved = getattr(second, name).params
        assert not np.allclose(np.asarray(moved), getattr(before, name).params), name
    assert not np.allclose(np.asarray(second.target_critic), before.target_critic)
    assert not np.array_equal(np.asarray(second.key), before.key)
    assert 0.0 < float(second.limit.params) <= 1.0


def test_agent_checkpoint_round_trip_keeps_the_compiled_update(pointnet_learner, pointnet_buffer, tmp_path):
    import orbax.checkpoint as ocp  # here, not at the top: the 2-device subprocess imports this module

    agent, _ = pointnet_learner.iteration(racer.init_agent(POINTNET, VEHICLES * 6, VEHICLES, 1), pointnet_buffer)
    expected = jax.tree.map(np.asarray, agent)
    template = racer.init_agent(POINTNET, VEHICLES * 6, VEHICLES, 2)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "agent", agent)
        checkpointer.wait_until_finished()
        restored = checkpointer.restore(tmp_path / "agent", jax.tree.map(ocp.utils.to_shape_dtype_struct, template))
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, restored), expected)
    compiled = pointnet_learner.iteration._cache_size()
    restored, metrics = pointnet_learner.iteration(restored, pointnet_buffer)
    assert bool(metrics["finite"])
    assert pointnet_learner.iteration._cache_size() == compiled


def test_reset_reinitializes_all_but_the_temperature_from_the_agents_key(pointnet_learner, pointnet_buffer):
    """design §11: a fresh initialization of actor, critic, target and lagrange (optimizer states
    too), drawn from the agent's own key; temperature, update count and the learned limit carry over."""
    trained = run(pointnet_learner, racer.init_agent(POINTNET, VEHICLES * 6, VEHICLES, 5), pointnet_buffer, 3)[0]
    before = jax.tree.map(lambda x: np.array(x, copy=True), trained)
    reset = racer.reset_agent(POINTNET, VEHICLES * 6, trained)

    key, k_init = jax.random.split(jax.random.wrap_key_data(jnp.asarray(before.key), impl=racer.RNG_IMPL))
    fresh = racer._agent_initializer(POINTNET, VEHICLES * 6)(jax.random.key_data(k_init))  # compiled: init_agent's
    for name in ("actor", "critic", "lagrange"):
        jax.tree.map(np.testing.assert_array_equal, getattr(reset, name), getattr(fresh, name))
        assert not np.allclose(np.asarray(getattr(reset, name).params), getattr(before, name).params), name
    np.testing.assert_array_equal(reset.target_critic, reset.critic.params)
    assert float(reset.lagrange.params) == pytest.approx(np.log(POINTNET.q_entropy_lagrange_init))
    adam = reset.actor.opt_state[0]
    assert int(adam.count) == 0 and not np.any(np.asarray(adam.mu)) and not np.any(np.asarray(adam.nu))
    for name in ("temperature", "limit"):
        jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, getattr(reset, name)), getattr(before, name))
    assert float(before.limit.params) != pytest.approx(POINTNET.init_limit)  # it had learned
    assert int(before.temperature.opt_state[0].count) == 3 * 2  # its Adam state was kept, not rebuilt
    assert int(reset.updates) == int(before.updates) == 6
    np.testing.assert_array_equal(reset.key, jax.random.key_data(key))
    # the reset agent trains on with the same compiled update
    compiled = pointnet_learner.iteration._cache_size()
    _, metrics = pointnet_learner.iteration(reset, pointnet_buffer)
    assert bool(metrics["finite"]) and pointnet_learner.iteration._cache_size() == compiled


def test_non_finite_losses_are_flagged(pointnet_learner):
    obs, actions, rewards, masks, next_obs = random_transitions(np.random.default_rng(1), 256)
    rewards[:] = np.nan
    poisoned = filled_buffer(obs, actions, rewards, masks, next_obs)
    _, metrics = pointnet_learner.iteration(racer.init_agent(POINTNET, VEHICLES * 6, VEHICLES, 3), poisoned)
    assert not bool(metrics["finite"])


def test_actions_respect_the_learned_limit():
    agent = racer.init_agent(POINTNET, VEHICLES * 6, VEHICLES, 4)
    obs = jnp.asarray(random_transitions(np.random.default_rng(2), 512)[0])
    actions = np.asarray(racer.sample_actions(agent, obs, jax.random.PRNGKey(0)))
    h = POINTNET.init_limit
    assert np.abs(actions[:, 0]).max() <= 1.0 and np.abs(actions[:, 0]).max() > 0.9
    assert np.abs(actions[:, 1]).max() <= h and np.abs(actions[:, 1]).max() > 0.9 * h
    mean, _ = jax.jit(networks.actor_apply)(agent.actor_params(), obs)
    np.testing.assert_allclose(
        np.asarray(racer.deterministic_actions(agent, obs)), np.tanh(np.asarray(mean)) * [1.0, h], rtol=1e-5, atol=1e-6
    )


# ---------------------------------------------------------------------------------------------
# Learning


@pytest.mark.slow
def test_critic_converges_to_the_projected_bootstrapped_distribution():
    """State A -> B with r = 1 (not terminal), B terminal with r = 2, discount 0.99: the return from
    A is 2.98, which the unit-spaced support holds as 0.02 on atom 2 and 0.98 on atom 3."""
    rng = np.random.default_rng(0)
    state_a, state_b = np.array([1.0, 0.0], np.float32), np.array([0.0, 1.0], np.float32)
    is_a = np.arange(CAPACITY) % 2 == 0
    buffer = filled_buffer(
        np.where(is_a[:, None], state_a, state_b),
        rng.uniform(-1, 1, (CAPACITY, 2)),
        np.where(is_a, 1.0, 2.0),
        np.where(is_a, 1.0, 0.0),
        np.tile(state_b, (CAPACITY, 1)),
    )
    agent, _ = run(small_learner(0.0), racer.init_agent(small(0.0), 2, 1, 0), buffer, 3)
    states = np.repeat(np.stack([state_a, state_b]), 16, axis=0)
    actions = np.tile(rng.uniform(-1, 1, (16, 2)).astype(np.float32), (2, 1))
    probs = np.asarray(jax.nn.softmax(networks.ensemble_apply(agent.critic_params(), states, actions)))  # (Q, 32, 17)
    atom = {z: i for i, z in enumerate(range(-12, 5))}
    expected_a, expected_b = np.zeros(17), np.zeros(17)
    expected_a[[atom[2], atom[3]]] = [0.02, 0.98]
    expected_b[atom[2]] = 1.0
    np.testing.assert_allclose(probs[:, :16], np.broadcast_to(expected_a, probs[:, :16].shape), atol=0.05)
    np.testing.assert_allclose(probs[:, 16:], np.broadcast_to(expected_b, probs[:, 16:].shape), atol=0.05)


@pytest.mark.slow
def test_bootstrapping_terminations_is_an_ablation_that_changes_the_target():
    """State B of the test above (r = 2, then the end: all mass on atom 2 there) with its
    termination ignored: B -> B with r = 2 forever is worth 200, above the support, so the mass
    climbs onto the top atom at the target network's pace."""
    state_b = np.array([0.0, 1.0], np.float32)
    buffer = filled_buffer(
        np.tile(state_b, (CAPACITY, 1)), np.zeros((CAPACITY, 2), np.float32), np.full(CAPACITY, 2.0, np.float32),
        np.zeros(CAPACITY, np.float32), np.tile(state_b, (CAPACITY, 1)),
    )  # fmt: skip
    cfg = dataclasses.replace(small(0.0), bootstrap_terminations=True)
    learner = racer.make_learner(cfg, batch_size=BATCH, utd_ratio=UTD, updates_per_iteration=UPDATES)
    agent, _ = run(learner, racer.init_agent(cfg, 2, 1, 0), buffer, 3)
    logits = networks.ensemble_apply(agent.critic_params(), state_b[None], np.zeros((1, 2), np.float32))
    probs = np.asarray(jax.nn.softmax(logits))[:, 0]  # (Q, 17) on atoms -12..4
    assert (probs[:, 14] < 0.5).all() and (probs[:, -1] > 0.3).all()


def bandit_buffer(seed=0):
    """One step: action[0] > 0 picks the risky arm (+3 w.p. 0.9, -10 w.p. 0.1; mean 1.7), otherwise
    the safe arm (+1). Every episode ends there (mask 0)."""
    rng = np.random.default_rng(seed)
    actions = rng.uniform(-1, 1, (CAPACITY, 2)).astype(np.float32)
    risky = np.where(rng.random(CAPACITY) < 0.9, 3.0, -10.0)
    rewards = np.where(actions[:, 0] > 0, risky, 1.0).astype(np.float32)
    obs = np.ones((CAPACITY, 2), np.float32)
    return filled_buffer(obs, actions, rewards, np.zeros(CAPACITY, np.float32), obs)


@pytest.mark.slow
@pytest.mark.parametrize(("cvar_risk", "arm"), [(0.0, "risky"), (0.8, "safe")])
def test_risk_level_decides_between_the_risky_and_the_safe_arm(cvar_risk, arm):
    agent, metrics = run(small_learner(cvar_risk), racer.init_agent(small(cvar_risk), 2, 1, 0), bandit_buffer(), 3)
    assert bool(metrics["finite"])
    acceleration = float(racer.deterministic_actions(agent, jnp.ones((1, 2)))[0, 0])
    if arm == "risky":
        assert acceleration > 0.3
    else:
        assert acceleration < -0.3
