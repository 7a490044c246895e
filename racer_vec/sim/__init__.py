"""The simulator side (design §2, §3): what the env worker processes import. No JAX here or below:
a worker that imports JAX costs ~110 MB and starts XLA threads on the cores the simulation needs."""
