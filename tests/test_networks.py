"""Actor distribution, PointNet encoder, critic ensemble and flat parameter layouts (design §4.1, 4.2)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from racer_vec.learner import networks
from racer_vec.config import AgentConfig

CFG = AgentConfig(hidden_dims=(32, 32), encoder="pointnet", pointnet_dim=16, num_qs=3, num_atoms=11)
VEHICLES = 5
# jitted (op-by-op initialization compiles every little op separately), with the cheap-to-compile
# PRNG the agent uses
actor_init = jax.jit(networks.actor_init, static_argnums=(1, 2))
ensemble_init = jax.jit(networks.ensemble_init, static_argnums=(1, 2))


def key(seed):
    return jax.random.key(seed, impl="unsafe_rbg")



def random_obs(rng, n, present_prob=0.6):
    obs = rng.normal(size=(n, VEHICLES, 6)).astype(np.float32) * 5
    obs[:, :, 0] = rng.random((n, VEHICLES)) < present_prob
    obs[:, 0, 0] = 1.0
    obs[obs[:, :, 0] == 0] = 0.0  # absent rows are all zeros
    return obs.reshape(n, VEHICLES * 6)


@pytest.mark.parametrize("speed_cap", [False, True], ids=["steering", "speed-cap"])
@pytest.mark.parametrize("limit", [0.2, 0.65, 1.0])
def test_squashed_log_prob_matches_numerical_change_of_variables(limit, speed_cap):
    rng = np.random.default_rng(0)
    mean = rng.normal(size=(64, 2)) * 0.8
    log_std = rng.uniform(-1.5, 0.5, (64, 2))
    # the box: steering [-h, h]; a speed cap [-1, 2h - 1] on index 0, centred at h - 1
    scale = np.array([limit, 1.0]) if speed_cap else np.array([1.0, limit])
    centre = np.array([limit - 1.0, 0.0]) if speed_cap else np.zeros(2)
    low, high = networks.action_box(limit, speed_cap)
    np.testing.assert_allclose(np.asarray(low), centre - scale, atol=1e-7)
    np.testing.assert_allclose(np.asarray(high), centre + scale, atol=1e-7)
    actions = centre + rng.uniform(-0.97, 0.97, (64, 2)) * scale
    u = np.arctanh((actions - centre) / scale)
    std = np.exp(log_std)
    ours = networks.squashed_log_prob(
        jnp.asarray((u - mean) / std, jnp.float32),
        jnp.asarray(u, jnp.float32),
        jnp.asarray(log_std, jnp.float32),
        limit,
        speed_cap,
    )
    np.testing.assert_allclose(np.asarray(networks.squash(jnp.asarray(u, jnp.float32), limit, speed_cap)), actions,
                               rtol=1e-5, atol=1e-6)  # fmt: skip
    # density of a = centre + scale * tanh(u): the Gaussian density of u(a) = atanh((a - centre) / scale)
    # times the numerical derivative du/da, per dimension
    delta = 1e-6
    du_da = (np.arctanh((actions + delta - centre) / scale) - np.arctanh((actions - delta - centre) / scale)) / (2 * delta)
    gaussian = -0.5 * ((u - mean) / std) ** 2 - np.log(std) - 0.5 * np.log(2 * np.pi)
    numeric = np.sum(gaussian + np.log(du_da), axis=-1)
    np.testing.assert_allclose(np.asarray(ours), numeric, rtol=1e-4, atol=1e-3)


def test_policy_samples_respect_the_limit_and_carry_their_log_prob():
    rng = np.random.default_rng(1)
    mean = jnp.asarray(rng.normal(size=(512, 2)) * 3, jnp.float32)
    log_std = jnp.asarray(rng.uniform(-2, 2, (512, 2)), jnp.float32)
    noise = jnp.asarray(rng.normal(size=(512, 2)), jnp.float32)
    actions, log_probs, u = networks.sample_policy(mean, log_std, 0.3, noise)
    assert np.all(np.abs(np.asarray(actions[:, 0])) <= 1.0)
    assert np.all(np.abs(np.asarray(actions[:, 1])) <= 0.3)
    np.testing.assert_allclose(np.asarray(actions), np.tanh(np.asarray(u)) * [1.0, 0.3], rtol=1e-6)
    np.testing.assert_allclose(
        np.asarray(log_probs), np.asarray(networks.squashed_log_prob(noise, u, log_std, 0.3)), rtol=1e-6
    )


def test_pointnet_pool_is_zero_when_no_other_vehicle_is_present():
    params = actor_init(key(0), CFG, VEHICLES * 6)["pointnet"]
    ego_only = np.zeros((3, VEHICLES - 1, 6), np.float32)
    def total(p):
        pooled = networks.pointnet_pool(p, ego_only)
        return jnp.sum(pooled), pooled

    (_, pooled), grads = jax.jit(jax.value_and_grad(total, has_aux=True))(params)
    np.testing.assert_array_equal(np.asarray(pooled), 0.0)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(grads))


def test_pointnet_pool_is_the_masked_max_of_per_vehicle_features():
    rng = np.random.default_rng(2)
    params = actor_init(key(1), CFG, VEHICLES * 6)["pointnet"]
    others = random_obs(rng, 40).reshape(40, VEHICLES, 6)[:, 1:]
    pooled = np.asarray(networks.pointnet_pool(params, others))
    w, b = np.asarray(params["dense"]["kernel"]), np.asarray(params["dense"]["bias"])
    scale, bias = np.asarray(params["norm"]["scale"]), np.asarray(params["norm"]["bias"])
    for n in range(40):
        rows = []
        for row in others[n]:
            if row[0] > 0.5:
                h = row @ w + b
                h = (h - h.mean()) / np.sqrt(h.var() + 1e-6) * scale + bias
                rows.append(np.maximum(h, 0.0))
        expected = np.max(rows, axis=0) if rows else np.zeros(CFG.pointnet_dim)
        np.testing.assert_allclose(pooled[n], expected, rtol=1e-4, atol=1e-4)
    shuffled = others[:, rng.permutation(VEHICLES - 1)]
    np.testing.assert_allclose(np.asarray(networks.pointnet_pool(params, shuffled)), pooled, rtol=1e-5, atol=1e-6)


def test_critic_ensemble_is_a_vmap_of_independent_members():
    rng = np.random.default_rng(3)
    params = ensemble_init(key(2), CFG, VEHICLES * 6)
    obs = jnp.asarray(random_obs(rng, 8))
    action_sets = jnp.asarray(rng.uniform(-1, 1, (2, 8, 2)), jnp.float32)
    logits = np.asarray(jax.jit(networks.ensemble_apply)(params, obs, action_sets))
    critic_apply = jax.jit(networks.critic_apply)
    assert logits.shape == (CFG.num_qs, 2, 8, CFG.num_atoms)
    for i in range(CFG.num_qs):
        member = jax.tree.map(lambda leaf, i=i: np.asarray(leaf)[i], params)
        for s in range(2):
            single = critic_apply(member, obs, action_sets[s])
            np.testing.assert_allclose(logits[i, s], np.asarray(single), rtol=1e-5, atol=1e-5)
    assert not np.allclose(logits[0], logits[1])


def test_layout_round_trip_and_gradient():
    params = ensemble_init(key(3), CFG, VEHICLES * 6)
    layout = networks.Layout.of(params, batch_dims=1)
    flat = layout.ravel(params, batch_dims=1)
    assert flat.shape == (CFG.num_qs, layout.size)
    jax.tree.map(np.testing.assert_array_equal, layout.unravel(flat), params)

    def loss(p):
        return sum(jnp.sum(jnp.sin(leaf) * (i + 1)) for i, leaf in enumerate(jax.tree.leaves(p)))

    flat_grad = jax.jit(jax.grad(lambda f: loss(layout.unravel(f))))(flat)
    nested_grad = jax.jit(jax.grad(loss))(params)
    np.testing.assert_allclose(np.asarray(flat_grad), np.asarray(layout.ravel(nested_grad, batch_dims=1)))


def test_pointnet_gradient_matches_plain_autodiff():
    """pointnet_pool's dense layer has a hand-written VJP; compare with autodiff of the plain formula."""
    rng = np.random.default_rng(4)
    params = actor_init(key(4), CFG, VEHICLES * 6)["pointnet"]
    others = jnp.asarray(random_obs(rng, 32).reshape(32, VEHICLES, 6)[:, 1:])
    weights = jnp.asarray(rng.normal(size=(32, CFG.pointnet_dim)), jnp.float32)

    def reference(p):
        h = others @ p["dense"]["kernel"] + p["dense"]["bias"]
        mean, var = jnp.mean(h, -1, keepdims=True), jnp.var(h, -1, keepdims=True)
        h = jax.nn.relu((h - mean) / jnp.sqrt(var + 1e-6) * p["norm"]["scale"] + p["norm"]["bias"])
        return jnp.sum(weights * jnp.max(jnp.where(others[..., :1] > 0.5, h, 0.0), axis=-2))

    ours = jax.jit(jax.grad(lambda p: jnp.sum(weights * networks.pointnet_pool(p, others))))(params)
    expected = jax.jit(jax.grad(reference))(params)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_pointnet_gradient_under_jit_matches_finite_differences():
    """Against float64 finite differences of a numpy PointNet: XLA:CPU (jaxlib 0.10.2) once
    miscompiled the gradient of a plain jnp.max pooling under jit, which autodiff of the same
    formula (the test above) cannot see."""
    rng = np.random.default_rng(0)
    cfg = dataclasses.replace(CFG, pointnet_dim=5)  # shapes at which the miscompile showed
    params = jax.tree.map(lambda x: x + 0.3 * rng.normal(size=x.shape).astype(np.float32),
                          actor_init(key(0), cfg, 8 * 6)["pointnet"])  # fmt: skip
    obs = rng.normal(size=(16, 8, 6))
    obs[..., 0] = rng.random((16, 8)) < 0.7
    others = obs[:, 1:]
    weights = rng.normal(size=(16, cfg.pointnet_dim))

    def pooled(p):
        h = others @ p["dense"]["kernel"] + p["dense"]["bias"]
        h = (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + 1e-6)
        z = (h * p["norm"]["scale"] + p["norm"]["bias"]) * (others[..., :1] > 0.5)
        return np.sum(weights * np.maximum(z.max(axis=-2), 0.0))

    ours = jax.jit(jax.grad(lambda p: jnp.sum(weights * networks.pointnet_pool(p, jnp.asarray(others, jnp.float32)))))(
        params
    )
    p64 = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
    for path, leaf in jax.tree.leaves_with_path(p64):
        grad = np.zeros_like(leaf)
        for i in np.ndindex(leaf.shape):
            for sign in (1, -1):
                bumped = leaf.copy()
                bumped[i] += sign * 1e-6
                trial = jax.tree.map_with_path(lambda q, x: bumped if q == path else x, p64)
                grad[i] += sign * pooled(trial) / 2e-6
        actual = np.asarray(dict(jax.tree.leaves_with_path(ours))[path])
        np.testing.assert_allclose(actual, grad, rtol=2e-3, atol=2e-3, err_msg=jax.tree_util.keystr(path))
