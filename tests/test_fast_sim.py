"""racer_vec.sim.fast_sim against stock highway-env: bit-identical episodes, and a guard on the
highway-env internals the fast simulator replicates."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import inspect

import gymnasium as gym
import highway_env
import numpy as np
import pytest
from highway_env.road.road import Road, RoadNetwork
from highway_env.vehicle.behavior import IDMVehicle
from highway_env.vehicle.kinematics import Vehicle

import configs
from racer_vec.sim import fast_sim

# sha256 prefixes of the sources of fast_sim.REPLICATED_INTERNALS in highway-env 1.12.1
PINNED_SOURCES = {
    "road.road:Road.__init__": "e35c6851f05630ce",
    "road.road:Road.act": "ce0167736a7ff43f",
    "road.road:Road.step": "f8751851df05287f",
    "road.road:Road.neighbour_vehicles": "6401966dd2bc7350",
    "road.road:Road.close_objects_to": "47179eca9acfb7e7",
    "envs.common.observation:KinematicObservation.__init__": "2e1ef3c82904affd",
    "envs.common.observation:KinematicObservation.observe": "bc4a7a71c6c3a8ee",
    "envs.common.abstract:AbstractEnv.define_spaces": "8b9779b2d1b8f9f5",
    "envs.common.abstract:AbstractEnv._simulate": "b02e8250d76fda79",
    "envs.highway_env:HighwayEnv._create_road": "0af08c25507d6dec",
    "envs.highway_env:HighwayEnvFast._create_vehicles": "27f31ba6d1623674",
    "road.road:RoadNetwork.get_closest_lane_index": "c096c36847553fd0",
    "road.road:RoadNetwork.side_lanes": "aca319c3ce6dd489",
    "road.road:RoadNetwork.straight_road_network": "dc9343bafb4e2cd6",
    "road.lane:AbstractLane.on_lane": "737440dd0b30c7fd",
    "road.lane:AbstractLane.is_reachable_from": "75ae04d01e5a7427",
    "road.lane:AbstractLane.after_end": "e3abae0b2fd4d84f",
    "road.lane:AbstractLane.distance_with_heading": "d3bfb2b18b4589ad",
    "road.lane:AbstractLane.local_angle": "7b7f68bcde031101",
    "road.lane:StraightLane.__init__": "3ba0b4f059ee0c45",
    "road.lane:StraightLane.local_coordinates": "cc85099a835712ba",
    "road.lane:StraightLane.heading_at": "40d21b3b5c900fc8",
    "road.lane:StraightLane.width_at": "a3f9e9578226633b",
    "vehicle.objects:RoadObject.__init__": "162fdf7357d3d1e6",
    "vehicle.objects:RoadObject.handle_collisions": "22d09daae961356d",
    "vehicle.objects:RoadObject._is_colliding": "0855e4f7e45cfac5",
    "vehicle.objects:RoadObject.polygon": "2ff76f380e68c8f9",
    "vehicle.objects:RoadObject.direction": "a4c77726611faa88",
    "vehicle.objects:RoadObject.velocity": "4adf0dc72944ece9",
    "vehicle.objects:RoadObject.lane_distance_to": "4db4f2b77cf0bdbe",
    "vehicle.kinematics:Vehicle.__init__": "01ae059487382f76",
    "vehicle.kinematics:Vehicle.act": "fdb4fe0b64f7e4eb",
    "vehicle.kinematics:Vehicle.step": "da2898cee3d632de",
    "vehicle.kinematics:Vehicle.clip_actions": "fe72ee0bf6986dac",
    "vehicle.kinematics:Vehicle.on_state_update": "2335ae4ab21c22c5",
    "vehicle.kinematics:Vehicle.velocity": "8306b4e7bb130034",
    "vehicle.kinematics:Vehicle.to_dict": "9196357e8d9ad247",
    "vehicle.controller:ControlledVehicle.__init__": "84e1d24a070dd37c",
    "vehicle.controller:ControlledVehicle.follow_road": "64dcd58fe8bf5f73",
    "vehicle.controller:ControlledVehicle.steering_control": "43c0c692d1dee36c",
    "vehicle.behavior:IDMVehicle.__init__": "fd6328d5b65f0ba5",
    "vehicle.behavior:IDMVehicle.act": "c0f254a624d328a2",
    "vehicle.behavior:IDMVehicle.step": "0a9d69d92d9e714f",
    "vehicle.behavior:IDMVehicle.acceleration": "39b9ba61a36409b0",
    "vehicle.behavior:IDMVehicle.desired_gap": "fe6699a416db83f2",
    "vehicle.behavior:IDMVehicle.change_lane_policy": "fd17bcecf4e9a6d3",
    "vehicle.behavior:IDMVehicle.mobil": "b5735ff10b6cde58",
    "utils:not_zero": "f9806f813c24b658",
    "utils:wrap_to_pi": "603d745ca127a314",
    "utils:do_every": "6bc9a36388d1e424",
    "utils:are_polygons_intersecting": "4f6d96ef2346ff70",
    "utils:project_polygon": "da8e377e5dbee0db",
    "utils:interval_distance": "d2aec181d04d9016",
}


def _source_digest(name: str) -> str:
    module, qualname = name.split(":")
    obj = importlib.import_module(f"highway_env.{module}")
    for part in qualname.split("."):
        obj = obj.__dict__[part] if isinstance(obj, type) else getattr(obj, part)
    if isinstance(obj, property):
        obj = obj.fget
    return hashlib.sha256(inspect.getsource(obj).encode()).hexdigest()[:16]


def test_highway_env_internals_are_the_checked_ones():
    assert highway_env.__version__ == fast_sim.CHECKED_HIGHWAY_ENV_VERSION
    assert set(PINNED_SOURCES) == set(fast_sim.REPLICATED_INTERNALS)
    changed = [name for name, digest in PINNED_SOURCES.items() if _source_digest(name) != digest]
    assert not changed, (
        f"highway-env changed code that racer_vec.sim.fast_sim replicates: {changed}. Re-check the fast "
        "simulator against the new code, then update PINNED_SOURCES."
    )


def test_numpy_gives_what_the_batched_formulas_assume():
    # if this fails the fast envs silently run the stock code: still exact, but slow
    assert fast_sim.numerics_are_exact()


def test_fma_emulation_rounds_once():
    from fractions import Fraction

    rng = np.random.default_rng(3)
    values = rng.normal(0.0, 1.0, (4000, 3)) * 10.0 ** rng.integers(-4, 4, (4000, 3))
    values[:500, 0] = 0.0
    values[500:1000, 2] = -values[500:1000, 0] * values[500:1000, 1]  # the result is the product's rounding error
    fused = fast_sim._fma(values[:, 0], values[:, 1], values[:, 2])
    exact = [float(Fraction(a) * Fraction(b) + Fraction(c)) for a, b, c in values]
    np.testing.assert_array_equal(fused, exact)


def test_ids_are_registered_and_build_the_fast_road():
    assert fast_sim.FAST_SIM_IDS == {
        "highway_env:highway-v0": "racer_vec.sim.fast_sim:fast-highway-v0",
        "highway_env:highway-fast-v0": "racer_vec.sim.fast_sim:fast-highway-fast-v0",
    }
    for stock_id, fast_id in fast_sim.FAST_SIM_IDS.items():
        env = gym.make(fast_id, config={"vehicles_count": 5, "action": {"type": "ContinuousAction"}})
        env.reset(seed=0)
        road = env.unwrapped.road
        assert isinstance(road, fast_sim.FastRoad) and road._scene() is not None
        assert isinstance(env.unwrapped.observation_type, fast_sim.FastKinematicObservation)
        assert type(gym.make(stock_id).unwrapped) in type(env.unwrapped).__bases__
        others_check = [v.check_collisions for v in road.vehicles if v is not env.unwrapped.vehicle]
        assert not any(others_check) if stock_id.endswith("highway-fast-v0") else all(others_check)
        env.close()


def _assert_identical(a, b, where: str) -> None:
    """Equal bits and equal types, recursively (floats by repr: -0.0 and NaN included)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), where
        for key in a:
            _assert_identical(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape, where
        assert a.tobytes() == b.tobytes(), f"{where}: {a} != {b}"
    else:
        assert type(a) is type(b) and repr(a) == repr(b), f"{where}: {a!r} != {b!r}"


def _ram(obs, t, rng):
    return np.array([1.0, 0.0])


def _weave(obs, t, rng):
    return np.array([0.6, 0.15 * np.sign(np.sin(t / 4))])


def _random(obs, t, rng):
    return rng.uniform(-1, 1, 2)


def _reverse(obs, t, rng):
    return np.array([-1.0, 0.0])


def _brake(obs, t, rng):
    return np.array([-0.2, 0.0])


def _keep_lane(obs, t, rng):
    """Drive at ~18 m/s in the middle of the current lane (reaches the time limit)."""
    _, x, y, vx, vy, heading = obs[0]
    steering = -0.04 * (y - 4 * np.round(y / 4)) - 0.6 * heading
    return np.array([np.clip((18.0 - vx) / 5, -1, 1), np.clip(steering / (np.pi / 4), -1, 1)])


EPISODES = [
    # preset, config overrides, seed, policy, max steps, events that must happen (in the stock env)
    ("racer_highway", {}, 0, _ram, 30, {"crash", "lane_change"}),
    ("racer_highway", {}, 1, _weave, 30, {"offroad", "lane_change"}),
    ("racer_highway", {}, 2, _random, 25, {"offroad", "lane_change"}),
    ("racer_highway", {"vehicles_count": 25, "vehicles_density": 4.0}, 3, _brake, 30, {"crash", "others_crash"}),
    ("racer_highway", {"vehicles_count": 12}, 4, _keep_lane, 200, {"truncated", "lane_change"}),
    ("highway_fast", {}, 0, _ram, 60, {"crash"}),
    ("highway_fast", {}, 1, _weave, 30, {"offroad"}),
    ("highway_fast", {}, 2, _reverse, 80, {"offroad"}),
    ("highway_fast", {"vehicles_count": 25, "vehicles_density": 4.0}, 3, _brake, 30, {"crash"}),
    ("highway_fast", {}, 5, _keep_lane, 200, {"truncated", "lane_change"}),
]


def _run_lockstep(preset, overrides, seed, policy, steps, fast_id=None) -> set[str]:
    env_cfg = configs.PRESETS[preset].env
    config = {**env_cfg.highway_config(), **overrides}
    stock = gym.make(env_cfg.env_id, config=config)
    fast = gym.make(fast_id or fast_sim.FAST_SIM_IDS[env_cfg.env_id], config=config)
    obs, info = stock.reset(seed=seed)
    fast_obs, fast_info = fast.reset(seed=seed)
    _assert_identical(obs, fast_obs, "reset obs")
    # reset's info["action"] is a sample of a freshly built, unseeded action space: random in stock too
    info.pop("action"), fast_info.pop("action")
    _assert_identical(info, fast_info, "reset info")
    rng = np.random.default_rng(seed)
    road = stock.unwrapped.road
    events = set()
    for t in range(steps):
        action = np.asarray(policy(obs, t, rng), dtype=np.float32)
        out, fast_out = stock.step(action), fast.step(action)
        for name, a, b in zip(("obs", "reward", "terminated", "truncated", "info"), out, fast_out):
            _assert_identical(a, b, f"{preset} seed {seed} {policy.__name__} step {t} {name}")
        obs, _, terminated, truncated, info = out
        ego = stock.unwrapped.vehicle
        others = [v for v in road.vehicles if v is not ego]
        events |= {
            name
            for name, happened in (
                ("crash", ego.crashed),
                ("others_crash", sum(v.crashed for v in others) > 1),  # more than the ego's victim
                ("offroad", not ego.on_road),
                ("lane_change", any(v.lane_index != v.target_lane_index for v in others)),
                ("truncated", truncated),
            )
            if happened
        }
        if terminated or truncated:
            break
    stock.close()
    fast.close()
    return events


@pytest.mark.parametrize(
    "preset,overrides,seed,policy,steps,expected",
    EPISODES,
    ids=[f"{p}-{s}-{pol.__name__}" for p, _, s, pol, _, _ in EPISODES],
)
def test_episodes_are_bit_identical(preset, overrides, seed, policy, steps, expected):
    events = _run_lockstep(preset, overrides, seed, policy, steps)
    assert expected <= events, f"the episode did not exercise {expected - events}"


@pytest.mark.slow  # the stock simulator's 50 vehicles: ~4 s on an idle 2-core machine
def test_a_racer_highway_episode_through_the_env_layer_is_bit_identical():
    """The training scene (racer_highway, 50 vehicles) through make_env's env layer over each
    simulator, with seeded random actions, to the episode's end (the layer's offroad termination)."""
    from racer_vec.sim.highway import make_env

    env_cfg = configs.PRESETS["racer_highway"].env
    assert env_cfg.vehicles_count == 50
    stock, fast = (make_env(dataclasses.replace(env_cfg, fast_sim=f), seed=3) for f in (False, True))
    _assert_identical(stock.reset(seed=3)[0], fast.reset(seed=3)[0], "reset obs")
    rng = np.random.default_rng(3)
    for t in range(200):
        action = rng.uniform(-1, 1, 2).astype(np.float32)
        out, fast_out = stock.step(action), fast.step(action)
        for name, a, b in zip(("obs", "reward", "terminated", "truncated", "info"), out, fast_out):
            _assert_identical(a, b, f"step {t} {name}")
        if out[2] or out[3]:
            break
    stock.close()
    fast.close()
    assert out[2], "random actions lead offroad within 200 steps"


def test_unsupported_settings_fall_back_to_stock_and_stay_identical():
    overrides = {
        "vehicles_count": 8,
        "other_vehicles_type": "highway_env.vehicle.behavior.LinearVehicle",
        "observation": {"type": "Kinematics", "vehicles_count": 5, "normalize": True},
    }
    _run_lockstep("racer_highway", overrides, 0, _weave, 8)
    env = gym.make("racer_vec.sim.fast_sim:fast-highway-v0", config=overrides)
    env.reset(seed=0)
    assert env.unwrapped.road._scene() is None


def test_road_queries_match_stock_including_ties():
    env = gym.make("racer_vec.sim.fast_sim:fast-highway-v0", config=configs.PRESETS["racer_highway"].env.highway_config())
    env.reset(seed=7)
    for _ in range(3):
        env.step(np.array([0.3, 0.02], dtype=np.float32))
    road = env.unwrapped.road
    vehicles = road.vehicles
    # ties: a vehicle exactly level with another on the same lane, and a copy of a position
    vehicles[3].position[0] = vehicles[5].position[0]
    vehicles[7].position[:] = vehicles[8].position
    road.invalidate()
    lanes = road.network.all_side_lanes(vehicles[0].lane_index)
    for v in vehicles:
        for lane_index in [None, *lanes]:
            fast_pair = road.neighbour_vehicles(v, lane_index)
            stock_pair = Road.neighbour_vehicles(road, v, lane_index)
            assert fast_pair[0] is stock_pair[0] and fast_pair[1] is stock_pair[1]
        for kwargs in ({"distance": 200.0, "count": 14, "see_behind": False}, {"distance": 60.0}):
            assert road.close_objects_to(v, **kwargs) == Road.close_objects_to(road, v, **kwargs)


def test_collision_broad_phase_never_drops_a_pair_the_exact_test_acts_on():
    rng = np.random.default_rng(0)
    road = fast_sim.FastRoad(network=RoadNetwork.straight_road_network(4, speed_limit=30))
    n, dt = 120, 1 / 15
    heading = np.where(rng.random(n) < 0.7, rng.normal(0, 0.3, n), rng.uniform(-np.pi, np.pi, n))
    road.vehicles = [
        Vehicle(road, [x, y], h, s)
        for x, y, h, s in zip(rng.uniform(0, 60, n), rng.uniform(-2, 14, n), heading, rng.uniform(-40, 40, n))
    ]
    sc = road._scene()
    kept = set(fast_sim.FastRoad._collision_candidates(sc, sc.x, sc.y, sc.heading, sc.speed, dt))
    acting = 0
    for i in range(n):
        for j in range(i + 1, n):
            intersecting, will_intersect, _ = road.vehicles[i]._is_colliding(road.vehicles[j], dt)
            if intersecting or will_intersect:
                acting += 1
                assert (i, j) in kept
    assert acting > 100 and len(kept) < n * (n - 1) / 2  # the scene is dense and the phase prunes


def _twin_roads(specs):
    """A stock Road and a FastRoad holding identical IDM vehicles (x, y, speed, target lane, timer)."""
    roads = []
    for cls in (Road, fast_sim.FastRoad):
        road = cls(network=RoadNetwork.straight_road_network(4, speed_limit=30))
        road.vehicles = [
            IDMVehicle(road, [x, y], 0.0, speed, target_lane_index=("0", "1", lane), timer=timer)
            for x, y, speed, lane, timer in specs
        ]
        roads.append(road)
    return roads


def _vehicle_states(road):
    return [
        (v.position.tolist(), repr(v.heading), repr(v.speed), v.target_lane_index, repr(v.timer), repr(v.action))
        for v in road.vehicles
    ]


@pytest.mark.parametrize("changer_first", [True, False])
def test_act_sees_targets_updated_earlier_in_the_list(changer_first):
    # "changer" (lane 1, timer fired, a slow car just ahead) switches its target to lane 2 by MOBIL;
    # "merger" is already moving from lane 3 into lane 2, 20 m behind it. highway-env lets the merger
    # abort only if the changer acted before it in the list: the batched act must see the same.
    changer, merger, slow = (100.0, 4.0, 20.0, 1, 1.5), (80.0, 11.5, 20.0, 2, 0.5), (115.0, 4.0, 10.0, 1, 0.5)
    specs = [changer, merger, slow] if changer_first else [merger, changer, slow]
    stock, fast = _twin_roads(specs)
    m = 1 if changer_first else 0
    assert stock.vehicles[m].lane_index[2] == 3 and stock.vehicles[m].target_lane_index[2] == 2
    for t in range(3):
        stock.act()
        fast.act()
        assert _vehicle_states(fast) == _vehicle_states(stock)
        if t == 0:  # the scenario does what it is meant to: an abort iff the changer came first
            assert (stock.vehicles[m].target_lane_index[2] == 3) == changer_first
        stock.step(1 / 15)
        fast.step(1 / 15)
        assert _vehicle_states(fast) == _vehicle_states(stock)


def test_vehicles_moved_by_hand_between_steps_are_seen():
    config = {**configs.PRESETS["racer_highway"].env.highway_config(), "vehicles_count": 12}
    stock_id = "highway_env:highway-v0"
    envs = [gym.make(env_id, config=config) for env_id in (stock_id, fast_sim.FAST_SIM_IDS[stock_id])]
    for env in envs:
        env.reset(seed=3)
    for t in range(8):
        if t == 3:
            for env in envs:
                vehicles = env.unwrapped.road.vehicles
                vehicles[0].position[1] += 4.0
                vehicles[2].position[0] -= 30.0
                vehicles[4].speed = 35.0
        action = np.array([0.2, 0.01], dtype=np.float32)
        stock_out, fast_out = (env.step(action) for env in envs)
        for name, a, b in zip(("obs", "reward", "terminated", "truncated", "info"), stock_out, fast_out):
            _assert_identical(a, b, f"step {t} {name}")
