"""racer-vec: a vectorized single-process JAX trainer for RACER on highway-env. (No JAX imported here.)"""
