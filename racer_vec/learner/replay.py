"""Device-resident circular replay buffer (design §5).

The buffer is a plain pytree of fixed-capacity arrays plus a device-side insert position and
size, so it lives on the device between iterations, is sampled inside the jitted update, and is
saved and restored with orbax like any other pytree (contents, position and size exactly).

With several JAX devices the buffer (like the agent) is replicated on all of them: each device
then gathers its own share of every minibatch locally (design §4.8).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from racer_vec.config import ACTION_DIM
from racer_vec.learner.devices import replicated_sharding

class Batch(NamedTuple):
    observations: jax.Array
    actions: jax.Array
    rewards: jax.Array
    masks: jax.Array
    next_observations: jax.Array


@flax.struct.dataclass
class ReplayBuffer:
    observations: jax.Array  # (C, obs_dim) f32
    actions: jax.Array  # (C, action_dim) f32
    rewards: jax.Array  # (C,) f32
    masks: jax.Array  # (C,) f32: 0 on true termination, 1 otherwise (time-limit truncation included)
    next_observations: jax.Array  # (C, obs_dim) f32
    position: jax.Array  # int32 scalar: the row the next insert writes first
    size: jax.Array  # int32 scalar: rows filled so far (<= C)

    @property
    def capacity(self) -> int:
        return self.rewards.shape[0]


def _empty(capacity: int, obs_dim: int, action_dim: int) -> ReplayBuffer:
    return ReplayBuffer(
        observations=jnp.zeros((capacity, obs_dim), jnp.float32),
        actions=jnp.zeros((capacity, action_dim), jnp.float32),
        rewards=jnp.zeros((capacity,), jnp.float32),
        masks=jnp.zeros((capacity,), jnp.float32),
        next_observations=jnp.zeros((capacity, obs_dim), jnp.float32),
        position=jnp.zeros((), jnp.int32),
        size=jnp.zeros((), jnp.int32),
    )


def init_buffer(capacity: int, obs_dim: int, action_dim: int = ACTION_DIM) -> ReplayBuffer:
    """An empty buffer, allocated directly on the device(s) where the learner reads it."""
    build = jax.jit(_empty, static_argnums=(0, 1, 2), out_shardings=replicated_sharding())
    return build(capacity, obs_dim, action_dim)


def restore_target(capacity: int, obs_dim: int, action_dim: int = ACTION_DIM) -> ReplayBuffer:
    """Shapes, dtypes and shardings of a buffer, without allocating it: the target for an orbax restore."""
    sharding = replicated_sharding()
    shapes = jax.eval_shape(functools.partial(_empty, capacity, obs_dim, action_dim))
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)


@functools.partial(jax.jit, donate_argnums=0)
def insert(buffer: ReplayBuffer, observations, actions, rewards, masks, next_observations) -> ReplayBuffer:
    """Write N transitions at the insert position, wrapping around at capacity (N <= capacity)."""
    n = rewards.shape[0]
    if n > buffer.capacity:
        raise ValueError(f"cannot insert {n} transitions into a buffer of capacity {buffer.capacity}")
    rows = (buffer.position + jnp.arange(n, dtype=jnp.int32)) % buffer.capacity

    def put(store, values):
        return store.at[rows].set(jnp.asarray(values, store.dtype), unique_indices=True)

    return ReplayBuffer(
        observations=put(buffer.observations, observations),
        actions=put(buffer.actions, actions),
        rewards=put(buffer.rewards, rewards),
        masks=put(buffer.masks, masks),
        next_observations=put(buffer.next_observations, next_observations),
        position=(buffer.position + n) % buffer.capacity,
        size=jnp.minimum(buffer.size + n, buffer.capacity),
    )


def sample_indices(buffer: ReplayBuffer, key, shape) -> jax.Array:
    """Uniform row indices in [0, size): usable inside jit, the size is a device value."""
    return jax.random.randint(key, shape, 0, buffer.size, dtype=jnp.int32)


def gather(buffer: ReplayBuffer, indices) -> Batch:
    """The transitions at `indices` (any shape); every field gains the indices' leading shape."""
    return Batch(
        observations=buffer.observations[indices],
        actions=buffer.actions[indices],
        rewards=buffer.rewards[indices],
        masks=buffer.masks[indices],
        next_observations=buffer.next_observations[indices],
    )


def sample(buffer: ReplayBuffer, key, batch_size) -> Batch:
    """A uniform minibatch; `batch_size` is an int or a shape such as (utd_ratio, batch_size)."""
    shape = (batch_size,) if isinstance(batch_size, int) else tuple(batch_size)
    return gather(buffer, sample_indices(buffer, key, shape))


def buffer_to_numpy(buffer: ReplayBuffer) -> dict[str, np.ndarray]:
    """Host copies of every field (for inspection; orbax saves the buffer pytree directly)."""
    return {f.name: np.asarray(getattr(buffer, f.name)) for f in dataclasses.fields(buffer)}
