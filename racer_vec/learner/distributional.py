"""Categorical return distributions: the Cramér (L2) projection and CVaR (design §2, 4.3, 4.4).

Both functions are pure jnp, so they work under jit and vmap and accept numpy inputs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def categorical_l2_project(target_atoms, probs, support) -> jax.Array:
    """Project `sum_j probs[..., j] * delta(target_atoms[..., j])` onto the fixed `support[K]`.

    The Cramér projection onto an ascending support splits each target atom's mass between the two
    support atoms that bracket it, in proportion to how close it is to each (so the mean is kept for
    atoms inside the support); atoms beyond the support land on its nearest edge. `target_atoms`
    and `probs` have shape `(..., J)` (J need not equal K) and their leading dims broadcast; the
    result has shape `(..., K)`.
    """
    spacing = _even_spacing(support)
    support = jnp.asarray(support)
    target_atoms = jnp.asarray(target_atoms)
    probs = jnp.asarray(probs)
    num_atoms = support.shape[0]
    # brackets depend on the atoms only: computed before broadcasting against probs (e.g. members)
    lower, upper_weight = _bracket(target_atoms, support, spacing)

    shape = jnp.broadcast_shapes(target_atoms.shape, probs.shape)
    rows = (-1, shape[-1])
    lower = jnp.broadcast_to(lower, shape).reshape(rows)
    upper_weight = jnp.broadcast_to(upper_weight, shape).reshape(rows)
    probs = jnp.broadcast_to(probs, shape).reshape(rows)

    def project_row(lower, upper_weight, p):
        out = jnp.zeros(num_atoms, p.dtype)
        return out.at[lower].add(p * (1.0 - upper_weight)).at[lower + 1].add(p * upper_weight)

    out = jax.vmap(project_row)(lower, upper_weight, probs)
    return out.reshape(shape[:-1] + (num_atoms,))


def _bracket(target_atoms, support, spacing):
    """Index `lower` with support[lower] <= z <= support[lower + 1] (z clipped onto the support) and
    the share of the mass that goes to support[lower + 1]."""
    num_atoms = support.shape[0]
    tz = jnp.clip(target_atoms, support[0], support[-1])
    if spacing is None:
        lower = jnp.searchsorted(support, tz, side="right") - 1
    else:
        # evenly spaced (the agent's linspace): one division instead of a binary search; float
        # rounding can put it one atom off, so settle it against the exact atom values
        lower = jnp.clip(jnp.floor((tz - support[0]) / spacing).astype(jnp.int32), 0, num_atoms - 2)
        lower = jnp.where(tz < support[lower], lower - 1, lower)
        lower = jnp.where(tz >= support[jnp.clip(lower + 1, 0, num_atoms - 1)], lower + 1, lower)
    lower = jnp.clip(lower, 0, num_atoms - 2)
    z_lower = support[lower]
    upper_weight = jnp.clip((tz - z_lower) / (support[lower + 1] - z_lower), 0.0, 1.0)
    return lower, upper_weight


def _even_spacing(support) -> float | None:
    """The spacing of a concrete (numpy or committed jax), evenly spaced support; None if it is
    traced or uneven."""
    try:
        values = np.asarray(support, dtype=np.float64)
    except jax.errors.TracerArrayConversionError:
        return None
    steps = np.diff(values)
    if steps.size == 0 or not np.allclose(steps, steps[0], rtol=1e-4, atol=0.0):
        return None
    return float(steps[0])


def cvar(probs, atoms, risk) -> jax.Array:
    """Conditional value at risk of the categorical distribution `probs[..., K]` over ascending `atoms[K]`.

    The mean of the worst `1 - risk` fraction of returns (design §4.4): `F = cumsum(p)`,
    `F' = min(F, 1 - risk)`, `q = diff([0, F']) / (1 - risk)`, `CVaR = sum(q * z)`. `risk = 0` is
    the mean; `risk` in [0, 1) may be a traced scalar. Returns shape `(...)`.
    """
    probs = jnp.asarray(probs)
    keep = 1.0 - jnp.asarray(risk, probs.dtype)
    cdf = jnp.minimum(jnp.cumsum(probs, axis=-1), keep)
    q = jnp.diff(cdf, axis=-1, prepend=jnp.zeros_like(cdf[..., :1])) / keep
    return jnp.sum(q * jnp.asarray(atoms, probs.dtype), axis=-1)
