"""The entry point of racer-vec's gymnasium ids (racer_vec.ENV_IDS, design §3): a preset's env layer,
the one training builds, for any gymnasium library's agent. No JAX here.

    import gymnasium as gym, racer_vec
    env = gym.make("racer_vec/highway-fast-v0", target_speed_action=True)
"""

from __future__ import annotations

import dataclasses

import gymnasium as gym

import configs
from racer_vec.config import EnvConfig, resolve
from racer_vec.sim.highway import make_env


def make_preset_env(preset: str, render_mode: str | None = None, **fields) -> gym.Env:
    """`make_env` with configs/<preset>.py's EnvConfig, `fields` (keywords of gym.make) replacing its
    fields; TypeError for a keyword that is not a field, ConfigError for a value train.py refuses."""
    names = [f.name for f in dataclasses.fields(EnvConfig)]
    unknown = [name for name in fields if name not in names]
    if unknown:
        raise TypeError(
            f"unknown keyword '{unknown[0]}' for {preset}'s env; its keywords: render_mode, {', '.join(names)}"
        )
    train_cfg = configs.PRESETS[preset]
    env_cfg = dataclasses.replace(train_cfg.env, **fields)
    # train.py's checks of these fields; the agent is the caller's, so none of racer-vec's agent's
    # limits applies (its steering limit refuses a lane target, design §3)
    resolve(dataclasses.replace(train_cfg, env=env_cfg, agent=dataclasses.replace(train_cfg.agent, learned_limit=False)))
    return make_env(env_cfg, render_mode=render_mode)
