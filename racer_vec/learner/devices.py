"""Where the learner's arrays live (design §4.8): one device, or data-parallel over several.

With several JAX devices the agent and the buffer are replicated on all of them and every minibatch
is split across them; `Shards` gives the update its view of that split.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "batch"
"""Mesh axis over which minibatches are split when there are several devices."""


def data_mesh() -> Mesh:
    """All local devices on one data-parallel axis."""
    return Mesh(np.array(jax.devices()), (DATA_AXIS,))


def replicated_sharding() -> jax.sharding.Sharding:
    """Where the agent and the buffer live: replicated on every device. Arrays placed explicitly
    are "committed", as are the arrays orbax restores, so a fresh and a restored agent hit the
    same compiled update."""
    if jax.device_count() == 1:
        return jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return NamedSharding(data_mesh(), PartitionSpec())



@dataclasses.dataclass(frozen=True)
class Shards:
    """How the update sees the device split: `count` devices with `local_batch` rows each."""

    count: int
    local_batch: int

    def pmean(self, tree):
        """The mean over devices (the identity on one)."""
        return jax.lax.pmean(tree, DATA_AXIS) if self.count > 1 else tree

    def local(self, x, axis: int):
        """This device's share of a globally drawn array, so that every device count draws the
        same random numbers and the results agree with one device."""
        if self.count == 1:
            return x
        start = jax.lax.axis_index(DATA_AXIS) * self.local_batch
        return jax.lax.dynamic_slice_in_dim(x, start, self.local_batch, axis)
