"""Device-resident circular replay buffer (design §5)."""

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from racer_vec.learner import replay


def transitions(start, n, obs_dim=3):
    """Rows whose every value encodes their global index, so a row can be traced back."""
    idx = np.arange(start, start + n, dtype=np.float32)
    return (
        np.repeat(idx[:, None], obs_dim, axis=1),
        np.stack([idx, -idx], axis=1),
        idx * 10,
        (idx % 2 == 0).astype(np.float32),
        np.repeat(idx[:, None], obs_dim, axis=1) + 0.5,
    )


def test_insert_wraps_around_and_donates():
    buffer = replay.init_buffer(10, 3)
    buffer = replay.insert(buffer, *transitions(0, 6))
    assert int(buffer.position) == 6 and int(buffer.size) == 6
    compiled = replay.insert._cache_size()
    old = buffer
    buffer = replay.insert(buffer, *transitions(6, 6))
    assert replay.insert._cache_size() == compiled  # same N: no recompilation
    assert old.observations.is_deleted()  # donated: no second copy of the buffer
    assert int(buffer.position) == 2 and int(buffer.size) == 10
    # rows 0, 1 hold transitions 10, 11; rows 2..9 still hold 2..9
    np.testing.assert_array_equal(np.asarray(buffer.rewards), np.array([10, 11, 2, 3, 4, 5, 6, 7, 8, 9]) * 10.0)
    np.testing.assert_array_equal(np.asarray(buffer.actions[:3, 1]), [-10, -11, -2])
    np.testing.assert_array_equal(np.asarray(buffer.masks[:3]), [1, 0, 1])
    np.testing.assert_array_equal(np.asarray(buffer.next_observations[1]), [11.5] * 3)


def test_insert_of_a_whole_capacity_at_an_offset():
    buffer = replay.insert(replay.init_buffer(4, 3), *transitions(0, 3))
    buffer = replay.insert(buffer, *transitions(3, 4))
    assert int(buffer.position) == 3 and int(buffer.size) == 4
    np.testing.assert_array_equal(np.asarray(buffer.rewards), [40.0, 50.0, 60.0, 30.0])


def test_sampling_returns_only_inserted_rows():
    buffer = replay.insert(replay.init_buffer(100, 3), *transitions(1, 5))
    batch = jax.jit(replay.sample, static_argnums=2)(buffer, jax.random.PRNGKey(0), (4, 500))
    assert batch.observations.shape == (4, 500, 3) and batch.rewards.shape == (4, 500)
    rewards = np.asarray(batch.rewards)
    assert set(np.unique(rewards)) == {10.0, 20.0, 30.0, 40.0, 50.0}  # every inserted row, nothing else
    idx = rewards / 10
    np.testing.assert_array_equal(np.asarray(batch.observations[..., 0]), idx)
    np.testing.assert_array_equal(np.asarray(batch.next_observations[..., 1]), idx + 0.5)
    np.testing.assert_array_equal(np.asarray(batch.actions[..., 1]), -idx)


def test_save_restore_is_exact(tmp_path):
    buffer = replay.init_buffer(8, 3)
    for start in (0, 5, 10):
        buffer = replay.insert(buffer, *transitions(start, 5))
    expected = replay.buffer_to_numpy(buffer)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "buffer", buffer)
        checkpointer.wait_until_finished()
        restored = checkpointer.restore(tmp_path / "buffer", replay.restore_target(8, 3))
    assert isinstance(restored, replay.ReplayBuffer)
    for name, value in replay.buffer_to_numpy(restored).items():
        np.testing.assert_array_equal(value, expected[name])
        assert value.dtype == expected[name].dtype
    assert int(restored.position) == 7 and int(restored.size) == 8
    # the restored buffer keeps working: inserting continues at the saved position
    restored = replay.insert(restored, *transitions(15, 2))
    np.testing.assert_array_equal(np.asarray(restored.rewards[7]), 150.0)
    assert jnp.asarray(restored.size).dtype == jnp.int32
