"""racer-vec's env layer as gymnasium ids (design §3): gym.make builds each preset's env, gymnasium's
own checker passes on every id, simulator and action option, and env.spec makes the env again."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env, data_shares_objects

import configs
from racer_vec import ENV_IDS
from racer_vec.config import ConfigError, EnvConfig
from racer_vec.sim.highway import make_env

ROOT = Path(__file__).resolve().parent.parent
FAST = "racer_vec/highway-fast-v0"
ACTION_OPTIONS = [
    f.name for f in dataclasses.fields(EnvConfig) if f.name.endswith("_action") and isinstance(f.default, bool)
]
"""EnvConfig's switches of what an action means (target_speed_action, ...), each checked on its own."""


@pytest.fixture(autouse=True)
def headless(monkeypatch):
    # check_env renders every mode the env declares, "human" included
    monkeypatch.setenv("SDL_VIDEODRIVER", "offscreen")


def assert_same_episode(env: gym.Env, other: gym.Env, steps: int = 5) -> None:
    """Same seed and actions: the same observations, rewards and ends."""
    np.testing.assert_array_equal(env.reset(seed=3)[0], other.reset(seed=3)[0])
    actions = np.random.default_rng(0).uniform(-1, 1, (steps, 2)).astype(np.float32)
    for action in actions:
        first, second = env.step(action.copy()), other.step(action.copy())
        np.testing.assert_array_equal(first[0], second[0])
        assert first[1:4] == second[1:4]


def test_every_preset_env_has_an_id():
    assert {cfg.env for cfg in configs.PRESETS.values()} == {configs.PRESETS[p].env for p in ENV_IDS.values()}


@pytest.mark.parametrize("env_id", sorted(ENV_IDS))
def test_each_id_makes_its_presets_env(env_id):
    env = gym.make(env_id)
    preset_env = make_env(configs.PRESETS[ENV_IDS[env_id]].env)
    assert type(env.unwrapped) is type(preset_env.unwrapped)
    assert env.unwrapped.config == preset_env.unwrapped.config
    assert_same_episode(env, preset_env)


@pytest.mark.parametrize(
    ("first", "then"),
    [
        ("import racer_vec", "import gymnasium"),
        ("import gymnasium", "import racer_vec"),
        # a check that gymnasium is installed, before its import
        ("import racer_vec", "import importlib.util\nimportlib.util.find_spec('gymnasium')\nimport gymnasium"),
    ],
)
def test_ids_are_registered_whichever_is_imported_first(first, then):
    """racer_vec registers its ids without importing gymnasium itself (design §2: it must stay light)."""
    code = f"""
import sys
{first}
print("gymnasium" in sys.modules)
{then}
print(sorted(i for i in sys.modules["gymnasium"].registry if i.startswith("racer_vec/")))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    registered = f"{sorted(ENV_IDS)}\n"
    assert out.stdout.split("\n", 1) == [str(first == "import gymnasium"), registered], out.stderr[-2000:]


@pytest.mark.filterwarnings("ignore:.*is different from the unwrapped version")  # the env layer is wrappers
@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("option", [None, *ACTION_OPTIONS])
@pytest.mark.parametrize("fast_sim", [True, False], ids=["fast-sim", "stock-sim"])
@pytest.mark.parametrize("env_id", sorted(ENV_IDS))
def test_gymnasium_check_env_passes(env_id, fast_sim, option):
    env = gym.make(env_id, fast_sim=fast_sim, **({option: True} if option else {}))
    check_env(env)


def test_infos_share_no_object():
    """highway-env's info holds the action it was given: a caller stepping one array twice (as
    check_env's step determinism does) must still get infos of their own."""
    env = gym.make(FAST)
    env.reset(seed=0)
    action = env.action_space.sample()
    assert not data_shares_objects(env.step(action)[4], env.step(action)[4])


@pytest.mark.parametrize("option", [None, *ACTION_OPTIONS])
def test_spec_makes_the_same_env_again(option):
    """gym.make(env.spec) rebuilds the env with its keywords, and so does the spec of make_env's env
    (its wrappers record all their arguments)."""
    keywords = {option: True} if option else {}
    env = gym.make(FAST, **keywords)
    again = gym.make(env.spec)
    assert again.spec == env.spec and str(again) == str(env)
    assert_same_episode(env, again)
    trained_on = make_env(dataclasses.replace(configs.PRESETS["highway_fast"].env, **keywords))
    assert_same_episode(trained_on, gym.make(trained_on.spec))


def test_a_keyword_that_is_no_env_field_is_named_with_the_valid_ones():
    named = "unknown keyword 'speed_limit' for highway_fast's env; its keywords: .*target_speed_action"
    with pytest.raises(TypeError, match=named):
        gym.make(FAST, speed_limit=30)
    with pytest.raises(ConfigError, match="--env.speed-control-gain must be in"):
        gym.make(FAST, speed_control_gain=2.0)
