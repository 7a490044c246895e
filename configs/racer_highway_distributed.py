"""The original description's distributed command: racer_highway with 4 workers and a larger learner."""

import dataclasses

from configs import racer_highway


def config():
    return dataclasses.replace(
        racer_highway.config(),
        preset="racer_highway_distributed",
        num_envs=4,
        batch_size=256,
        utd_ratio=16,
        buffer_size=200_000,
        max_steps=1_000_000,
    )
