"""Fast, bit-exact highway simulation (issue 14).

Stock highway-env spends most of a step in Python loops: every neighbour query walks all vehicles
and projects each one on a lane, collisions are tested pair by pair, and every vehicle runs its
driver model (IDM acceleration, MOBIL lane changes, steering controller) and its kinematics
alone. `FastRoad` does the same work on numpy arrays of all vehicles, gathered once per
simulation sub-step:

- the lane coordinates of every vehicle on every lane, `long`/`lat` of shape (N, K), from which
  neighbour queries, the closest-lane lookup and the observation's selection are answered;
- the other vehicles' `act` (IDM + MOBIL + steering control) and every vehicle's `step`
  (bicycle kinematics), batched over vehicles;
- collisions: a vectorized broad phase over all pairs, then highway-env's own exact test
  (`RoadObject.handle_collisions`) on the surviving pairs, in the original pair order.

Exactness. Every batched formula repeats highway-env's floating-point operations in highway-env's
order (each is annotated with the method it replaces), so results are bit-identical, not merely
close. That relies on two facts about numpy on the running machine, checked once per process by
`numerics_are_exact` (the fast path turns itself off, with a warning, if they do not hold):
numpy's transcendental ufuncs (tan, arctan, sin, cos, arcsin, power) give the same bits on arrays
as on scalars, and `np.dot` of two 2-vectors is what `dot2` computes (the plain `a0*b0 + a1*b1`,
or `fma(a1, b1, a0*b0)` where the BLAS fuses it, as OpenBLAS does on AVX-512 CPUs). Anything the
batched code does not model (other vehicle classes, road objects, curved or several roads,
connected-lane neighbour search, trajectory history, a vehicle at the end of its lane, other
observation settings, a non-ContinuousAction ego) falls back to the stock highway-env method for
that call, so the fast ids are exact whatever the config.

The env ids `fast-highway-v0` / `fast-highway-fast-v0` are registered with gymnasium when this
module is imported; `FAST_SIM_IDS` maps the stock ids to them. No JAX here (workers import it).
"""

from __future__ import annotations

import functools
import warnings

import gymnasium as gym
import highway_env
import numpy as np
from highway_env.envs.common.observation import KinematicObservation
from highway_env.envs.highway_env import HighwayEnv, HighwayEnvFast
from highway_env.road.lane import StraightLane
from highway_env.road.road import Road
from highway_env.vehicle.behavior import IDMVehicle
from highway_env.vehicle.kinematics import Vehicle

CHECKED_HIGHWAY_ENV_VERSION = "1.12.1"
"""The highway-env release whose internals this module replicates (tests/test_fast_sim.py checks it)."""

FAST_SIM_IDS = {
    "highway_env:highway-v0": "racer_vec.sim.fast_sim:fast-highway-v0",
    "highway_env:highway-fast-v0": "racer_vec.sim.fast_sim:fast-highway-fast-v0",
}
"""Stock env id -> the fast env id of the same scene."""

if highway_env.__version__ != CHECKED_HIGHWAY_ENV_VERSION:
    warnings.warn(
        f"racer_vec.sim.fast_sim replicates highway-env {CHECKED_HIGHWAY_ENV_VERSION} internals but "
        f"highway-env {highway_env.__version__} is installed: run tests/test_fast_sim.py",
        stacklevel=2,
    )

REPLICATED_INTERNALS = (
    # overridden (FastRoad, FastKinematicObservation, the env mixin)
    "road.road:Road.__init__",
    "road.road:Road.act",
    "road.road:Road.step",
    "road.road:Road.neighbour_vehicles",
    "road.road:Road.close_objects_to",
    "envs.common.observation:KinematicObservation.__init__",
    "envs.common.observation:KinematicObservation.observe",
    "envs.common.abstract:AbstractEnv.define_spaces",
    "envs.common.abstract:AbstractEnv._simulate",
    "envs.highway_env:HighwayEnv._create_road",
    "envs.highway_env:HighwayEnvFast._create_vehicles",
    # repeated operation by operation on arrays
    "road.road:RoadNetwork.get_closest_lane_index",
    "road.road:RoadNetwork.side_lanes",
    "road.road:RoadNetwork.straight_road_network",
    "road.lane:AbstractLane.on_lane",
    "road.lane:AbstractLane.is_reachable_from",
    "road.lane:AbstractLane.after_end",
    "road.lane:AbstractLane.distance_with_heading",
    "road.lane:AbstractLane.local_angle",
    "road.lane:StraightLane.__init__",
    "road.lane:StraightLane.local_coordinates",
    "road.lane:StraightLane.heading_at",
    "road.lane:StraightLane.width_at",
    "vehicle.objects:RoadObject.__init__",
    "vehicle.objects:RoadObject.handle_collisions",
    "vehicle.objects:RoadObject._is_colliding",
    "vehicle.objects:RoadObject.polygon",
    "vehicle.objects:RoadObject.direction",
    "vehicle.objects:RoadObject.velocity",
    "vehicle.objects:RoadObject.lane_distance_to",
    "vehicle.kinematics:Vehicle.__init__",
    "vehicle.kinematics:Vehicle.act",
    "vehicle.kinematics:Vehicle.step",
    "vehicle.kinematics:Vehicle.clip_actions",
    "vehicle.kinematics:Vehicle.on_state_update",
    "vehicle.kinematics:Vehicle.velocity",
    "vehicle.kinematics:Vehicle.to_dict",
    "vehicle.controller:ControlledVehicle.__init__",
    "vehicle.controller:ControlledVehicle.follow_road",
    "vehicle.controller:ControlledVehicle.steering_control",
    "vehicle.behavior:IDMVehicle.__init__",
    "vehicle.behavior:IDMVehicle.act",
    "vehicle.behavior:IDMVehicle.step",
    "vehicle.behavior:IDMVehicle.acceleration",
    "vehicle.behavior:IDMVehicle.desired_gap",
    "vehicle.behavior:IDMVehicle.change_lane_policy",
    "vehicle.behavior:IDMVehicle.mobil",
    "utils:not_zero",
    "utils:wrap_to_pi",
    "utils:do_every",
    "utils:are_polygons_intersecting",
    "utils:project_polygon",
    "utils:interval_distance",
)
"""The highway-env code (module:qualname under `highway_env.`) whose behaviour this module
reproduces; tests/test_fast_sim.py pins the source of each one."""

# IDMVehicle class constants the batched driver model reads from the class (an instance override
# of any of them sends the scene to the stock path).
_IDM_CONSTANTS = frozenset(
    {
        "ACC_MAX", "COMFORT_ACC_MAX", "COMFORT_ACC_MIN", "DISTANCE_WANTED", "TIME_WANTED",
        "POLITENESS", "LANE_CHANGE_MIN_ACC_GAIN", "LANE_CHANGE_MAX_BRAKING_IMPOSED",
        "LANE_CHANGE_DELAY", "KP_LATERAL", "KP_HEADING", "TAU_PURSUIT", "MAX_STEERING_ANGLE",
    }
)

# Slack (m) of the collision broad phase: it keeps every pair highway-env's spherical pre-check
# keeps, even if the distance were rounded differently, and the exact test decides.
_BROAD_PHASE_SLACK = 1e-6


def _two_product(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`a*b` rounded and its exact rounding error (Dekker's product; finite, non-extreme inputs)."""
    product = a * b
    split = 134217729.0  # 2**27 + 1
    ta, tb = split * a, split * b
    a_hi, b_hi = ta - (ta - a), tb - (tb - b)
    a_lo, b_lo = a - a_hi, b - b_hi
    return product, ((a_hi * b_hi - product) + a_hi * b_lo + a_lo * b_hi) + a_lo * b_lo


def _two_sum(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`a+b` rounded and its exact rounding error (Knuth's sum)."""
    total = a + b
    b_virtual = total - a
    return total, (a - (total - b_virtual)) + (b - b_virtual)


def _fma(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """`a*b + c` with one rounding, like the FMA instruction (numpy has no fma ufunc).

    Boldo and Melquiond's emulation (IEEE Trans. Computers 57(4), 2008): with `a*b = uh + ul` and
    `c + uh = th + tl` exactly, `fma = round(th + round_to_odd(tl + ul))`.
    """
    uh, ul = _two_product(a, b)
    th, tl = _two_sum(c, uh)
    v, error = _two_sum(tl, ul)
    even = (v.view(np.int64) & 1) == 0
    v = np.where((error != 0) & even, np.nextafter(v, np.where(error > 0, np.inf, -np.inf)), v)
    return th + v


@functools.cache
def _dot_is_fused() -> bool:
    """Whether `np.dot` of two float64 2-vectors is `fma(a1, b1, a0*b0)` here, not `a0*b0 + a1*b1`.

    It is the BLAS's choice: OpenBLAS's ddot kernel for AVX-512 CPUs fuses, its AVX2 kernel
    does not (both seen on the machines this project runs on).
    """
    rng = np.random.default_rng(1)
    a, b = rng.normal(0.0, 30.0, (256, 2)), rng.normal(0.0, 1.0, (256, 2))
    blas = np.array([np.dot(u, v) for u, v in zip(a, b)])
    return bool(np.array_equal(blas, _fma(a[:, 1], b[:, 1], a[:, 0] * b[:, 0])))


def dot2(a0, b0, a1, b1) -> np.ndarray:
    """`np.dot((a0, a1), (b0, b1))` elementwise, with the running BLAS's rounding."""
    if _dot_is_fused():
        return _fma(np.asarray(a1, dtype=np.float64), np.asarray(b1, dtype=np.float64), a0 * b0)
    return a0 * b0 + a1 * b1


@functools.cache
def numerics_are_exact() -> bool:
    """Whether numpy on this machine gives what the batched formulas assume (see module doc).

    Checked once per process on a spread of inputs; when it fails, the fast envs warn and run
    the stock code (exact, not fast).
    """
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0.0, 0.3, 512), rng.uniform(-4.0, 4.0, 512)])
    exponent = rng.uniform(3.5, 4.5, x.size)
    a, b = rng.normal(0.0, 30.0, (256, 2)), rng.normal(0.0, 1.0, (256, 2))
    checks = [
        (f(arg), [f(v) for v in arg])
        for f, arg in ((np.tan, x), (np.arctan, x), (np.sin, x), (np.cos, x), (np.arcsin, np.clip(x, -1, 1)))
    ]
    checks.append((np.power(np.abs(x), exponent), [np.power(u, e) for u, e in zip(np.abs(x), exponent)]))
    checks.append((np.power(x, 2), [np.power(v, 2) for v in x]))
    checks.append((dot2(a[:, 0], b[:, 0], a[:, 1], b[:, 1]), [np.dot(u, v) for u, v in zip(a, b)]))
    exact = all(np.array_equal(batched, np.array(scalar)) for batched, scalar in checks)
    if not exact:
        warnings.warn(
            "numpy's vectorized math differs from its scalar math on this machine: "
            "racer_vec.sim.fast_sim falls back to the (exact, slow) stock highway-env code",
            stacklevel=2,
        )
    return exact


def _not_zero(x: np.ndarray, eps: float = 1e-2) -> np.ndarray:
    """`utils.not_zero`, elementwise."""
    return np.where(np.abs(x) > eps, x, np.where(x >= 0, eps, -eps))


def _wrap_to_pi(x: np.ndarray) -> np.ndarray:
    """`utils.wrap_to_pi`, elementwise (np.remainder is the same function as np.float64 `%`)."""
    return ((x + np.pi) % (2 * np.pi)) - np.pi


def _first_below(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Python's `min(a, b)`: `b` only if `b < a` (keeps `a` on ties and NaN)."""
    return np.where(b < a, b, a)


class _Lanes:
    """The lanes of a network made of one road of straight lanes, as arrays over lanes (K,).

    `StraightLane.local_coordinates` is `float(np.dot(position - start, direction))`; `coordinates`
    computes the same dot products for all vehicles and lanes at once.
    """

    def __init__(self, network) -> None:
        self.network = network
        ((from_, tos),) = network.graph.items()
        ((to, lanes),) = tos.items()
        self.indices = [(from_, to, k) for k in range(len(lanes))]
        self.lanes = list(lanes)
        self.count = len(lanes)
        self.start = np.array([lane.start for lane in lanes], dtype=np.float64)
        self.direction = np.array([lane.direction for lane in lanes], dtype=np.float64)
        self.direction_lateral = np.array([lane.direction_lateral for lane in lanes], dtype=np.float64)
        self.length = np.array([lane.length for lane in lanes], dtype=np.float64)
        self.width = np.array([lane.width for lane in lanes], dtype=np.float64)
        self.heading = np.array([lane.heading for lane in lanes], dtype=np.float64)
        self.speed_limit = np.array([lane.speed_limit for lane in lanes], dtype=np.float64)
        self.forbidden = np.array([lane.forbidden for lane in lanes], dtype=bool)
        self.vehicle_length = float(lanes[0].VEHICLE_LENGTH)

    @staticmethod
    def build(network) -> _Lanes | None:
        """The arrays of `network`, or None when it is not one road of straight lanes."""
        graph = getattr(network, "graph", None)
        if not graph or len(graph) != 1:
            return None
        (tos,) = graph.values()
        if len(tos) != 1:
            return None
        (lanes,) = tos.values()
        if not lanes or any(type(lane) is not StraightLane or lane.speed_limit is None for lane in lanes):
            return None
        if len({lane.VEHICLE_LENGTH for lane in lanes}) != 1:
            return None
        return _Lanes(network)

    def coordinates(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(longitudinal, lateral) of points (N,) on every lane: two (N, K) arrays."""
        dx = x[:, None] - self.start[None, :, 0]
        dy = y[:, None] - self.start[None, :, 1]
        longitudinal = dot2(dx, self.direction[:, 0], dy, self.direction[:, 1])
        lateral = dot2(dx, self.direction_lateral[:, 0], dy, self.direction_lateral[:, 1])
        return longitudinal, lateral

    def on_lane(self, longitudinal: np.ndarray, lateral: np.ndarray, margin: float) -> np.ndarray:
        """`AbstractLane.on_lane` for (N, K) coordinates."""
        return (
            (np.abs(lateral) <= self.width / 2 + margin)
            & (-self.vehicle_length <= longitudinal)
            & (longitudinal < self.length + self.vehicle_length)
        )

    def closest(self, longitudinal: np.ndarray, lateral: np.ndarray, heading: np.ndarray) -> np.ndarray:
        """`RoadNetwork.get_closest_lane_index(position, heading)` as lane ids (N,).

        `AbstractLane.distance_with_heading`: abs(r) + max(s - length, 0) + max(0 - s, 0) +
        1.0 * |wrap_to_pi(heading - lane heading)|, summed left to right; argmin keeps the first.
        """
        beyond = longitudinal - self.length
        before = 0 - longitudinal
        angle = np.abs(_wrap_to_pi(heading[:, None] - self.heading))
        distance = (
            np.abs(lateral)
            + np.where(0 > beyond, 0.0, beyond)
            + np.where(0 > before, 0.0, before)
            + 1.0 * angle
        )
        return np.argmin(distance, axis=1)


class _Scene:
    """All vehicles of a road at one simulation sub-step, as arrays over vehicles (N,)."""

    def __init__(self, vehicles: list, lanes: _Lanes) -> None:
        self.vehicles = vehicles
        self.ids = tuple(map(id, vehicles))
        self.lanes = lanes
        self.n = len(vehicles)
        rows = []
        for v in vehicles:
            if type(v) is IDMVehicle:
                rows.append(
                    (v.heading, v.speed, v.lane_index[2], v.target_lane_index[2], v.crashed, 1,
                     v.timer, v.DELTA, v.target_speed, v.enable_lane_change,
                     v.check_collisions, v.collidable, v.solid, v.diagonal, v.MAX_SPEED, v.MIN_SPEED, v.LENGTH, v.WIDTH)
                )
            else:
                # a plain Vehicle (the ego under ContinuousAction): no driver model, and
                # IDMVehicle.acceleration reads its target speed as getattr(v, "target_speed", 0)
                rows.append(
                    (v.heading, v.speed, v.lane_index[2], -1, v.crashed, 0,
                     0.0, np.nan, 0.0, False,
                     v.check_collisions, v.collidable, v.solid, v.diagonal, v.MAX_SPEED, v.MIN_SPEED, v.LENGTH, v.WIDTH)
                )
        cols = np.array(rows, dtype=np.float64).T
        (self.heading, self.speed, lane, target, crashed, is_idm, self.timer, self.delta, self.target_speed,
         enable_lane_change, check_collisions, collidable, solid, self.diagonal, self.max_speed,
         self.min_speed, self.length, self.width) = cols
        self.lane = lane.astype(np.intp)
        self.target = target.astype(np.intp)
        self.crashed = crashed.astype(bool)
        self.is_idm = is_idm.astype(bool)
        self.enable_lane_change = enable_lane_change.astype(bool)
        self.check_collisions = check_collisions.astype(bool)
        self.collidable = collidable.astype(bool)
        self.solid = solid.astype(bool)
        position = np.array([v.position for v in vehicles], dtype=np.float64)
        self.x, self.y = position[:, 0].copy(), position[:, 1].copy()
        self.impacts = [(i, v.impact) for i, v in enumerate(vehicles) if v.impact is not None]
        # RoadObject.direction / velocity: [cos h, sin h] and speed * direction
        self.cos_h, self.sin_h = np.cos(self.heading), np.sin(self.heading)
        self.vx, self.vy = self.speed * self.cos_h, self.speed * self.sin_h
        self.long, self.lat = lanes.coordinates(self.x, self.y)
        # Road.neighbour_vehicles counts a vehicle on a lane with on_lane(margin=1)
        self.on = lanes.on_lane(self.long, self.lat, margin=1)
        self._index = None

    @staticmethod
    def supported(vehicles: list) -> bool:
        """Whether the batched code models every vehicle of the list (else: stock methods)."""
        if not vehicles or len(set(map(id, vehicles))) != len(vehicles):
            return False
        for v in vehicles:
            if type(v) is IDMVehicle:
                if v.route or not _IDM_CONSTANTS.isdisjoint(v.__dict__):
                    return False
            elif type(v) is not Vehicle:
                return False
        return True

    def index(self, vehicle) -> int | None:
        if self._index is None:
            self._index = {vid: i for i, vid in enumerate(self.ids)}
        return self._index.get(id(vehicle))

    def neighbours(self, query: np.ndarray, lane: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """`Road.neighbour_vehicles(vehicles[query], lane)`: (front, rear) indices, -1 for None.

        Stock walks the vehicles in order and keeps the front one on `s <= s_v <= s_front` (so the
        last of equals wins) and the rear one on `s_rear < s_v < s` (the first of equals wins).
        """
        q = np.arange(query.size)
        s = self.long[query, lane][:, None]
        along = self.long[:, lane].T  # (Q, N): every vehicle's coordinate along the query's lane
        candidate = self.on[:, lane].T.copy()
        candidate[q, query] = False
        ahead = candidate & (s <= along)
        behind = candidate & (along < s)
        front = self.n - 1 - np.argmin(np.where(ahead, along, np.inf)[:, ::-1], axis=1)
        rear = np.argmax(np.where(behind, along, -np.inf), axis=1)
        return np.where(ahead.any(axis=1), front, -1), np.where(behind.any(axis=1), rear, -1)

    def desired_gap(self, ego: np.ndarray, front: np.ndarray) -> np.ndarray:
        """`IDMVehicle.desired_gap(ego, front)` (projected): a np.dot of 2-vectors."""
        c = IDMVehicle
        ab = -c.COMFORT_ACC_MAX * c.COMFORT_ACC_MIN
        dv = dot2(self.vx[ego] - self.vx[front], self.cos_h[ego], self.vy[ego] - self.vy[front], self.sin_h[ego])
        speed = self.speed[ego]
        return c.DISTANCE_WANTED + speed * c.TIME_WANTED + speed * dv / (2 * np.sqrt(ab))

    def acceleration(self, me: np.ndarray, ego: np.ndarray, front: np.ndarray) -> np.ndarray:
        """`vehicles[me].acceleration(ego_vehicle=vehicles[ego], front_vehicle=vehicles[front])`.

        Index arrays, -1 for None. The exponent is `me`'s DELTA (the method's `self`), the target
        speed and lane are the ego's, the gap is measured along the ego's lane.
        """
        c = IDMVehicle
        has_ego, has_front = ego >= 0, (ego >= 0) & (front >= 0)
        e, f = np.where(has_ego, ego, 0), np.where(has_front, front, 0)
        ego_lane = self.lane[e]
        target = np.clip(self.target_speed[e], 0, self.lanes.speed_limit[ego_lane])
        speed = self.speed[e]
        ratio = np.where(0 > speed, 0.0, speed) / np.abs(_not_zero(target))
        acc = c.COMFORT_ACC_MAX * (1 - np.power(ratio, self.delta[me]))
        d = self.long[f, ego_lane] - self.long[e, ego_lane]
        gap = c.COMFORT_ACC_MAX * np.power(self.desired_gap(e, f) / _not_zero(d), 2)
        acc = np.where(has_front, acc - gap, acc)
        return np.where(has_ego, acc, 0.0)

    @staticmethod
    def mobil_accepts(
        new_following_a, new_following_pred_a, self_pred_a, self_a, old_following_a, old_following_pred_a
    ) -> np.ndarray:
        """`IDMVehicle.mobil` (vehicles without a route) from its six IDM accelerations."""
        c = IDMVehicle
        jerk = self_pred_a - self_a + c.POLITENESS * (
            new_following_pred_a - new_following_a + old_following_pred_a - old_following_a
        )
        return ~(new_following_pred_a < -c.LANE_CHANGE_MAX_BRAKING_IMPOSED) & ~(jerk < c.LANE_CHANGE_MIN_ACC_GAIN)

    def steering_control(self, me: np.ndarray, lane: np.ndarray) -> np.ndarray:
        """`ControlledVehicle.steering_control(lane)`, then the clip of `IDMVehicle.act`."""
        c = IDMVehicle
        speed = _not_zero(self.speed[me])
        # straight lanes: heading_at(s + speed * TAU_PURSUIT) is the lane heading
        lane_future_heading = self.lanes.heading[lane]
        lateral_speed_command = -c.KP_LATERAL * self.lat[me, lane]
        heading_command = np.arcsin(np.clip(lateral_speed_command / speed, -1, 1))
        heading_ref = lane_future_heading + np.clip(heading_command, -np.pi / 4, np.pi / 4)
        heading_rate_command = c.KP_HEADING * _wrap_to_pi(heading_ref - self.heading[me])
        slip_angle = np.arcsin(np.clip(self.length[me] / 2 / speed * heading_rate_command, -1, 1))
        steering = np.arctan(2 * np.tan(slip_angle))
        steering = np.clip(steering, -c.MAX_STEERING_ANGLE, c.MAX_STEERING_ANGLE)
        return np.clip(steering, -c.MAX_STEERING_ANGLE, c.MAX_STEERING_ANGLE)

    def close_indices(self, i: int, distance: float, count: int | None, see_behind: bool, sort: bool) -> np.ndarray:
        """`Road.close_objects_to(vehicles[i], ...)` on a road without objects, as indices."""
        dx, dy = self.x - self.x[i], self.y - self.y[i]
        near = np.sqrt(dot2(dx, dx, dy, dy)) < distance  # np.linalg.norm = sqrt(x.dot(x))
        near[i] = False
        lane = self.lane[i]
        lane_distance = self.long[:, lane] - self.long[i, lane]  # vehicles[i].lane_distance_to(v)
        if not see_behind:
            near &= -2 * self.length[i] < lane_distance
        selected = np.flatnonzero(near)
        if sort:
            selected = selected[np.argsort(np.abs(lane_distance[selected]), kind="stable")]
        return selected[:count] if count else selected


class FastRoad(Road):
    """A `Road` whose act/step/neighbour queries run on arrays, bit-identical to `Road`.

    The scene arrays are gathered when a simulation sub-step starts (`act`) or at the first
    query after a `step`, and dropped by `step` (vehicles move) or when the vehicle list changes.
    Code that moves vehicles by hand between `act` and `step`, or between two queries outside
    them, must call `invalidate()`.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._lanes: _Lanes | None = None
        self._scene_cache: _Scene | None = None

    @classmethod
    def from_road(cls, road: Road) -> FastRoad:
        """The same road (network, vehicles, objects, random generator, flags) as a FastRoad."""
        return cls(
            network=road.network,
            vehicles=road.vehicles,
            road_objects=road.objects,
            np_random=road.np_random,
            record_history=road.record_history,
            neighbour_vehicles_connected_lanes=road.neighbour_vehicles_connected_lanes,
        )

    def invalidate(self) -> None:
        """Forget the arrays of this sub-step (call after moving vehicles by hand)."""
        self._scene_cache = None

    def _scene(self) -> _Scene | None:
        """The arrays of the current sub-step, or None when this road needs the stock methods."""
        cached = self._scene_cache
        if cached is not None and cached.vehicles is self.vehicles and cached.ids == tuple(map(id, self.vehicles)):
            return cached
        self._scene_cache = None
        if self.objects or self.record_history or self.neighbour_vehicles_connected_lanes:
            return None
        if self._lanes is None or self._lanes.network is not self.network:
            self._lanes = _Lanes.build(self.network)
        if self._lanes is None or not _Scene.supported(self.vehicles) or not numerics_are_exact():
            return None
        self._scene_cache = _Scene(self.vehicles, self._lanes)
        return self._scene_cache

    def act(self) -> None:
        """`Road.act`: every vehicle's `act()`, batched for IDMVehicles, along highway-env's own
        chain: change_lane_policy (MOBIL, then the abort rule), the IDM, and the write-back.

        Exact because, during `act`, positions, speeds and headings do not change: only target
        lanes, lane-change timers and actions do. MOBIL reads only the former, so it is batched;
        the one order-dependent read (a vehicle in the middle of a lane change aborts it when an
        IDM vehicle already heading for the same lane is just ahead, reading that vehicle's
        target lane, already updated if it acted earlier in the list) runs in list order.
        """
        self._scene_cache = None  # a sub-step starts here: see vehicles moved by anyone since
        sc = self._scene()
        if sc is None:
            return super().act()
        acting = sc.is_idm & ~sc.crashed  # IDMVehicle.act returns at once when crashed
        old_target = sc.target
        # ControlledVehicle.follow_road switches lanes at the end of a lane: not modelled here
        tgt = np.where(acting, old_target, 0)
        if np.any(acting & (sc.long[np.arange(sc.n), tgt] > sc.lanes.length[tgt] - sc.lanes.vehicle_length / 2)):
            return super().act()
        changing = acting & sc.enable_lane_change
        mid_change = changing & (sc.lane != old_target)
        timer_fired = changing & ~mid_change & (IDMVehicle.LANE_CHANGE_DELAY < sc.timer)
        asks = _lane_change_requests(sc, timer_fired)
        me, acceleration, target = _idm_and_mobil(sc, acting, asks)
        _abort_lane_changes(sc, mid_change, target, old_target)
        steering, acceleration = _idm_act(sc, me, target, acceleration)
        _write_back(sc, me, steering, acceleration, timer_fired, target, old_target)

    def step(self, dt: float) -> None:
        """`Road.step`: every vehicle's `step(dt)` batched, then the collision checks.

        Kinematics repeat `Vehicle.clip_actions`, `Vehicle.step` and `on_state_update` operation
        by operation. Collisions: `handle_collisions` runs, in the original (i, j > i) order, on
        every pair the broad phase (`_collision_candidates`) cannot prove to be a no-op.
        """
        sc = self._scene()
        if sc is None:
            super().step(dt)
            self._scene_cache = None
            return
        vehicles, lanes = sc.vehicles, sc.lanes
        actions = [v.action for v in vehicles]
        steering = np.array([a["steering"] for a in actions], dtype=np.float64)
        acceleration = np.array([a["acceleration"] for a in actions], dtype=np.float64)

        # Vehicle.clip_actions
        speed = sc.speed
        steering = np.where(sc.crashed, 0.0, steering)
        acceleration = np.where(sc.crashed, -1.0 * speed, acceleration)
        over = speed > sc.max_speed
        acceleration = np.where(over, _first_below(acceleration, 1.0 * (sc.max_speed - speed)), acceleration)
        under = ~over & (speed < sc.min_speed)
        floor = 1.0 * (sc.min_speed - speed)
        acceleration = np.where(under & (floor > acceleration), floor, acceleration)

        # Vehicle.step (IDMVehicle.step first advances its timer, in the write-back below)
        beta = np.arctan(1 / 2 * np.tan(steering))
        x = sc.x + speed * np.cos(sc.heading + beta) * dt
        y = sc.y + speed * np.sin(sc.heading + beta) * dt
        impacted = [i for i, _ in sc.impacts]
        for i, impact in sc.impacts:
            x[i] += impact[0]
            y[i] += impact[1]
        heading = sc.heading + speed * np.sin(beta) / (sc.length / 2) * dt
        new_speed = speed + acceleration * dt
        # Vehicle.on_state_update
        long, lat = lanes.coordinates(x, y)
        lane = lanes.closest(long, lat, heading)

        for v, action, st, acc, is_idm, xi, yi, h, sp, k in zip(
            vehicles, actions, steering.tolist(), acceleration.tolist(), sc.is_idm.tolist(),
            x.tolist(), y.tolist(), heading, new_speed.tolist(), lane.tolist(),
        ):
            action["steering"] = st
            action["acceleration"] = acc
            if is_idm:
                v.timer += dt
            position = v.position
            position[0] = xi
            position[1] = yi
            v.heading = h
            v.speed = sp
            v.lane_index = lanes.indices[k]
            v.lane = lanes.lanes[k]
        for i in impacted:
            vehicles[i].crashed = True
            vehicles[i].impact = None
        self._scene_cache = None

        for i, j in self._collision_candidates(sc, x, y, heading, new_speed, dt):
            vehicles[i].handle_collisions(vehicles[j], dt)

    @staticmethod
    def _collision_candidates(sc: _Scene, x, y, heading, speed, dt: float) -> list[tuple[int, int]]:
        """Pairs (i < j, in `Road.step`'s order) on which `handle_collisions` may do something.

        `handle_collisions(a=i, b=j)` returns at once unless one of the two checks collisions
        and both are collidable; `_is_colliding` then returns (False, False) when the centres
        are farther apart than the half diagonals plus a's travel. Otherwise the separating-axis
        test `are_polygons_intersecting` has a no-op outcome as soon as, on one of the polygons'
        edge normals, the intervals stay apart after a's is stretched by the relative
        displacement: checked here on a's two edge normals (its heading and its normal). Both
        checks keep `_BROAD_PHASE_SLACK` of margin, far above the rounding of either computation,
        so the broad phase never drops a pair the exact test would act on.
        """
        dx, dy = x[None, :] - x[:, None], y[None, :] - y[:, None]
        reach = (sc.diagonal[:, None] + sc.diagonal[None, :]) / 2 + (speed * dt)[:, None]
        near = (
            (np.sqrt(dx * dx + dy * dy) <= reach + _BROAD_PHASE_SLACK)
            & (sc.check_collisions[:, None] | sc.check_collisions[None, :])
            & (sc.collidable[:, None] & sc.collidable[None, :])
        )
        i, j = np.nonzero(np.triu(near, 1))
        if not i.size:
            return []
        cos_h, sin_h = np.cos(heading), np.sin(heading)
        ddx, ddy = dx[i, j], dy[i, j]
        # displacement of a minus b over dt (RoadObject.velocity ignores the slip angle)
        vx, vy = (speed * cos_h * dt), (speed * sin_h * dt)
        mx, my = vx[i] - vx[j], vy[i] - vy[j]
        relative = heading[j] - heading[i]
        along, across = np.abs(np.cos(relative)), np.abs(np.sin(relative))
        half_l, half_w = sc.length / 2, sc.width / 2
        apart = np.zeros(i.size, dtype=bool)
        for ax, ay, half_a, half_b in (
            (cos_h[i], sin_h[i], half_l[i], half_l[j] * along + half_w[j] * across),
            (-sin_h[i], cos_h[i], half_w[i], half_l[j] * across + half_w[j] * along),
        ):
            gap = np.abs(ddx * ax + ddy * ay) - half_a - half_b - np.abs(mx * ax + my * ay)
            apart |= gap > _BROAD_PHASE_SLACK
        return list(zip(i[~apart].tolist(), j[~apart].tolist()))

    def neighbour_vehicles(self, vehicle, lane_index=None):
        """`Road.neighbour_vehicles` answered from the sub-step's lane coordinates."""
        sc = self._scene()
        i = sc.index(vehicle) if sc is not None else None
        lane_index = lane_index or (vehicle.lane_index if i is not None else None)
        if i is None or not isinstance(lane_index, tuple) or lane_index not in sc.lanes.indices:
            return super().neighbour_vehicles(vehicle, lane_index)
        front, rear = sc.neighbours(np.array([i]), np.array([lane_index[2]]))
        front, rear = int(front[0]), int(rear[0])
        return (sc.vehicles[front] if front >= 0 else None, sc.vehicles[rear] if rear >= 0 else None)

    def close_objects_to(self, vehicle, distance, count=None, see_behind=True, sort=True, vehicles_only=False):
        """`Road.close_objects_to` answered from the sub-step's arrays (roads without objects)."""
        sc = self._scene()
        i = sc.index(vehicle) if sc is not None else None
        if i is None:
            return super().close_objects_to(vehicle, distance, count, see_behind, sort, vehicles_only)
        return [sc.vehicles[j] for j in sc.close_indices(i, distance, count, see_behind, sort)]


# ------------------------------------------------------------------------------------------------
# FastRoad.act, step by step (highway-env's IDMVehicle.act chain)


def _lane_change_requests(sc: _Scene, timer_fired) -> list[tuple[np.ndarray, np.ndarray]]:
    """change_lane_policy, MOBIL's candidates: (vehicles, side lane) for the left then the right
    side lane (RoadNetwork.side_lanes order) of every vehicle on its target lane whose timer fired."""
    lanes, everyone = sc.lanes, np.arange(sc.n)
    asks = []
    for side in (-1, 1):
        lane = sc.lane + side
        k = np.clip(lane, 0, lanes.count - 1)
        long, lat = sc.long[everyone, k], sc.lat[everyone, k]
        reachable = (  # AbstractLane.is_reachable_from
            ~lanes.forbidden[k]
            & (np.abs(lat) <= 2 * lanes.width[k])
            & (0 <= long)
            & (long < lanes.length[k] + lanes.vehicle_length)
        )
        ask = np.flatnonzero(timer_fired & (lane == k) & reachable & ~(np.abs(sc.speed) < 1))
        asks.append((ask, k[ask]))
    return asks


def _idm_and_mobil(sc: _Scene, acting, asks):
    """The IDM acceleration of every acting vehicle and MOBIL's decisions, from one neighbour
    query and one batch of IDM accelerations; returns (acting indices, acceleration, targets)."""
    ask = np.concatenate([a for a, _ in asks])
    ask_lane = np.concatenate([lane for _, lane in asks])
    n = sc.n
    # one neighbour query for the IDM (own lane) and MOBIL (own and candidate lanes) ...
    me = np.flatnonzero(acting)
    m = me.size
    front, rear = sc.neighbours(np.concatenate([me, ask]), np.concatenate([sc.lane[me], ask_lane]))
    own_front, own_rear = np.full(n, -1), np.full(n, -1)
    own_front[me], own_rear[me] = front[:m], rear[:m]
    # ... and one batch of IDM accelerations: the IDM's own, then MOBIL's six per candidate
    new_front, new_rear, old_front, old_rear = front[m:], rear[m:], own_front[ask], own_rear[ask]
    triples = [
        (me, me, own_front[me]),
        (ask, new_rear, new_front),  # new_following_a
        (ask, new_rear, ask),  # new_following_pred_a
        (ask, ask, new_front),  # self_pred_a
        (ask, ask, old_front),  # self_a
        (ask, old_rear, ask),  # old_following_a
        (ask, old_rear, old_front),  # old_following_pred_a
    ]
    acc = sc.acceleration(*(np.concatenate(column) for column in zip(*triples)))
    accept = _Scene.mobil_accepts(*acc[m:].reshape(6, ask.size))
    target = sc.target.copy()
    left = asks[0][0].size
    for part in (slice(0, left), slice(left, None)):  # a later accepted side lane wins
        chosen = accept[part]
        target[ask[part][chosen]] = ask_lane[part][chosen]
    return me, acc[:m], target


def _abort_lane_changes(sc: _Scene, mid_change, target, old_target) -> None:
    """change_lane_policy, abort part, in list order: a vehicle changing lanes goes back when an
    IDM vehicle heading for the same lane is too close ahead (updates `target` in place)."""
    everyone = np.arange(sc.n)
    for i in np.flatnonzero(mid_change):
        # targets as vehicle i sees them: updated for the vehicles before it in the list
        seen_target = np.where(everyone < i, target, old_target)
        rivals = sc.is_idm & (sc.lane != old_target[i]) & (seen_target == old_target[i])
        rivals[i] = False
        own_lane = sc.lane[i]
        for j in np.flatnonzero(rivals):
            d = sc.long[j, own_lane] - sc.long[i, own_lane]
            d_star = sc.desired_gap(np.array([i]), np.array([j]))[0]
            if 0 < d < d_star:
                target[i] = sc.lane[i]
                break


def _idm_act(sc: _Scene, me, target, acceleration):
    """IDMVehicle.act: steering towards the target lane; while changing lanes, the acceleration
    is the lower of the IDM's on the current and on the target lane."""
    steering = sc.steering_control(me, target[me])
    changing_lane = sc.lane[me] != target[me]
    if changing_lane.any():
        sub = me[changing_lane]
        sub_front, _ = sc.neighbours(sub, target[sub])
        on_target = sc.acceleration(sub, sub, sub_front)
        acceleration[changing_lane] = _first_below(acceleration[changing_lane], on_target)
    return steering, np.clip(acceleration, -IDMVehicle.ACC_MAX, IDMVehicle.ACC_MAX)


def _write_back(sc: _Scene, me, steering, acceleration, timer_fired, target, old_target) -> None:
    """The vehicles' own state, as their act() would have left it."""
    vehicles, indices = sc.vehicles, sc.lanes.indices
    for i, st, a in zip(me.tolist(), steering, acceleration):
        v = vehicles[i]
        if timer_fired[i]:
            v.timer = 0
        if target[i] != old_target[i]:
            v.target_lane_index = indices[target[i]]
        v.action = {"steering": st, "acceleration": a}
    sc.target = target


class FastKinematicObservation(KinematicObservation):
    """`KinematicObservation` built from the road's arrays instead of pandas data frames.

    Exact for the features below with `normalize=False` and `order="sorted"`: the same float64
    values (relative rows subtract the observer's value, as `Vehicle.to_dict(origin)` does), cast
    to float32 once. Other settings use the stock `observe`.
    """

    FAST_FEATURES = frozenset({"presence", "x", "y", "vx", "vy", "heading", "cos_h", "sin_h"})

    def observe(self) -> np.ndarray:
        road = self.env.road
        sc = road._scene() if isinstance(road, FastRoad) else None
        ego = self.observer_vehicle
        i = sc.index(ego) if sc is not None else None
        if (
            i is None
            or self.normalize
            or self.order != "sorted"
            or self.vehicles_count < 2
            or not self.FAST_FEATURES.issuperset(self.features)
        ):
            return super().observe()
        others = sc.close_indices(i, self.env.PERCEPTION_DISTANCE, self.vehicles_count - 1, self.see_behind, True)
        columns = {
            "presence": np.ones(sc.n),
            "x": sc.x,
            "y": sc.y,
            "vx": sc.vx,
            "vy": sc.vy,
            "heading": sc.heading,
            "cos_h": sc.cos_h,
            "sin_h": sc.sin_h,
        }
        obs = np.zeros((self.vehicles_count, len(self.features)))
        rows = np.concatenate([[i], others])
        for f, name in enumerate(self.features):
            values = columns[name][rows]
            if not self.absolute and name in ("x", "y", "vx", "vy"):
                values[1:] -= values[0]
            obs[: rows.size, f] = values
        return obs.astype(np.float32)  # the dtype of KinematicObservation.space()


class _FastSimEnv:
    """Mixin for highway envs: the stock scene on a FastRoad, observed by FastKinematicObservation."""

    def _create_road(self) -> None:
        super()._create_road()
        self.road = FastRoad.from_road(self.road)

    def define_spaces(self) -> None:
        super().define_spaces()
        if type(self.observation_type) is KinematicObservation:
            self.observation_type = FastKinematicObservation(self, **self.config["observation"])
            self.observation_space = self.observation_type.space()


class FastHighwayEnv(_FastSimEnv, HighwayEnv):
    """highway-v0 on the fast simulator (gym id `racer_vec.sim.fast_sim:fast-highway-v0`)."""


class FastHighwayEnvFast(_FastSimEnv, HighwayEnvFast):
    """highway-fast-v0 on the fast simulator (gym id `racer_vec.sim.fast_sim:fast-highway-fast-v0`).

    HighwayEnvFast's own rule is kept: its non-controlled vehicles do not check collisions, so a
    pair of them is never tested (the broad phase drops it like `handle_collisions` does).
    """


for _env_id, _entry_point in (
    ("fast-highway-v0", f"{__name__}:FastHighwayEnv"),
    ("fast-highway-fast-v0", f"{__name__}:FastHighwayEnvFast"),
):
    if _env_id not in gym.registry:
        gym.register(id=_env_id, entry_point=_entry_point)
