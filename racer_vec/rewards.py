"""Public names of the training reward (design §2, §6), kept at `racer_vec.rewards`; the code
lives on the simulator side, in racer_vec.sim.rewards (no JAX)."""

from racer_vec.sim.rewards import collision_risk, training_reward

__all__ = ["collision_risk", "training_reward"]
