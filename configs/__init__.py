"""Presets: small modules that each build a TrainConfig. No JAX here (workers import it)."""

from configs import highway_fast, racer_highway, racer_highway_distributed

DEFAULT = "racer_highway"

PRESETS = {
    "racer_highway": racer_highway.config(),
    "racer_highway_distributed": racer_highway_distributed.config(),
    "highway_fast": highway_fast.config(),
}

PRESET_DESCRIPTIONS = {
    "racer_highway": "The original description's scene: highway-v0, 50 vehicles, CVaR 0.8, learned steering limit (default).",
    "racer_highway_distributed": "The original description's distributed command: racer_highway with 4 workers, batch 256, utd 16.",
    "highway_fast": "The public highway-racer release: highway-fast-v0, 8 workers, PointNet, CVaR 0.5.",
}
