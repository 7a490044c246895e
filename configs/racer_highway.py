"""The original description's preset: highway-v0 with 50 vehicles, CVaR 0.8 and a learned steering limit."""

from racer_vec.config import TrainConfig


def config() -> TrainConfig:
    return TrainConfig(preset="racer_highway")
