"""The learner (design §4, §5): networks, distributions, the device replay buffer and the agent's
compiled update. JAX; never imported by an env worker."""
