"""Cramér projection and CVaR against brute-force numpy (design §2, 4.3, 4.4)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from racer_vec.learner.distributional import categorical_l2_project, cvar


def brute_force_project(target_atoms, probs, support):
    """Every target atom's mass, one at a time, split between its two bracketing support atoms."""
    target_atoms, probs = np.broadcast_arrays(np.asarray(target_atoms, np.float64), np.asarray(probs, np.float64))
    support = np.asarray(support, np.float64)
    out = np.zeros(target_atoms.shape[:-1] + (len(support),))
    for idx in np.ndindex(target_atoms.shape[:-1]):
        for z, p in zip(target_atoms[idx], probs[idx]):
            z = min(max(z, support[0]), support[-1])
            k = min(max(np.searchsorted(support, z, side="right") - 1, 0), len(support) - 2)
            w = (z - support[k]) / (support[k + 1] - support[k])
            out[idx + (k,)] += p * (1 - w)
            out[idx + (k + 1,)] += p * w
    return out


SUPPORT = np.linspace(-10.0, 110.0, 101, dtype=np.float32)
project = jax.jit(lambda atoms, probs: categorical_l2_project(atoms, probs, SUPPORT))  # evenly spaced path


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_projection_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    atoms = rng.uniform(-40, 140, (3, 4, 17)).astype(np.float32)  # unsorted, many beyond the support
    probs = rng.dirichlet(np.ones(17), (3, 4)).astype(np.float32)
    out = np.asarray(project(atoms, probs))
    assert out.shape == (3, 4, 101)
    np.testing.assert_allclose(out, brute_force_project(atoms, probs, SUPPORT), atol=1e-6)
    np.testing.assert_allclose(out.sum(-1), 1.0, atol=1e-5)  # mass conserved


def test_projection_broadcasts_and_jits_with_traced_support():
    rng = np.random.default_rng(3)
    atoms = rng.uniform(-20, 120, (5, 101)).astype(np.float32)  # shared by the members below
    probs = rng.dirichlet(np.ones(101), (2, 5)).astype(np.float32)
    expected = brute_force_project(atoms[None], probs, SUPPORT)
    np.testing.assert_allclose(np.asarray(categorical_l2_project(atoms, probs, SUPPORT)), expected, atol=1e-6)  # eager
    traced = jax.jit(categorical_l2_project)(atoms, probs, SUPPORT)  # binary-search path
    np.testing.assert_allclose(np.asarray(traced), expected, atol=1e-6)


def test_projection_onto_uneven_support():
    rng = np.random.default_rng(4)
    support = np.sort(rng.uniform(-5, 5, 9)).astype(np.float32)
    atoms = rng.uniform(-8, 8, (6, 7)).astype(np.float32)
    probs = rng.dirichlet(np.ones(7), 6).astype(np.float32)
    np.testing.assert_allclose(
        np.asarray(categorical_l2_project(atoms, probs, support)), brute_force_project(atoms, probs, support), atol=1e-6
    )


def test_atoms_beyond_the_support_land_on_its_edges():
    out = np.asarray(project(np.array([-1000.0, -10.5, 110.01, 5000.0]), np.full(4, 0.25)))
    assert out[0] == pytest.approx(0.5) and out[-1] == pytest.approx(0.5)
    assert out[1:-1].sum() == 0.0


def test_exact_hits_stay_on_their_atom():
    probs = np.array([0.1, 0.2, 0.3, 0.4], np.float32)
    hits = SUPPORT[[0, 37, 38, 100]]
    out = np.asarray(project(hits, probs))
    np.testing.assert_allclose(out[[0, 37, 38, 100]], probs, atol=1e-7)
    assert np.abs(np.delete(out, [0, 37, 38, 100])).max() < 1e-7


@pytest.mark.parametrize("reward", [3.7, -4.1, 57.25])
def test_terminal_target_keeps_the_mean_on_the_two_bracketing_atoms(reward):
    """mask = 0: every target atom is r + 0 * z = r, whatever the next distribution."""
    rng = np.random.default_rng(5)
    next_probs = rng.dirichlet(np.ones(101)).astype(np.float32)
    target_atoms = reward + 0.99 * 0.0 * SUPPORT
    out = np.asarray(project(target_atoms, next_probs))
    k = np.searchsorted(SUPPORT, reward) - 1
    assert np.nonzero(out > 1e-7)[0].tolist() == [k, k + 1]
    assert out.sum() == pytest.approx(1.0, abs=1e-5)
    assert out @ SUPPORT == pytest.approx(reward, abs=1e-4)


def test_terminal_target_on_an_atom_is_a_point_mass():
    out = np.asarray(project(np.full(101, SUPPORT[20]), np.full(101, 1 / 101)))
    assert out[20] == pytest.approx(1.0, abs=1e-5)
    assert np.delete(out, 20).max() < 1e-6


@pytest.mark.parametrize("risk", [0.0, 0.25, 0.5, 0.8, 0.95])
def test_cvar_is_the_mean_of_the_worst_fraction_of_sorted_samples(risk):
    rng = np.random.default_rng(int(risk * 100))
    atoms = np.linspace(-7.0, 13.0, 21)
    n = 2000  # (1 - risk) * n is an integer for every risk above
    counts = rng.multinomial(n, rng.dirichlet(np.ones(21)))
    samples = np.sort(np.repeat(atoms, counts))
    worst = samples[: round((1 - risk) * n)]
    got = float(jax.jit(cvar)(jnp.asarray(counts / n, jnp.float32), atoms, risk))
    assert got == pytest.approx(worst.mean(), abs=1e-4)


def test_cvar_risk_zero_is_the_mean_and_batches_under_jit():
    rng = np.random.default_rng(7)
    atoms = np.linspace(-40.0, 80.0, 151, dtype=np.float32)
    probs = rng.dirichlet(np.ones(151), (4, 3)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(cvar(probs, atoms, 0.0)), probs @ atoms, rtol=1e-5, atol=1e-4)
    risky = jax.jit(cvar)(probs, atoms, jnp.float32(0.5))  # a traced risk level
    assert risky.shape == (4, 3)
    assert np.all(np.asarray(risky) < probs @ atoms)
