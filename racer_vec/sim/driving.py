"""How the ego drives (design §3): the per-step driving diagnostics, and highway-env's own driver as
the ego for the textbook baseline (`evaluate.py --policy idm`, design §7).

No JAX here: forkserver/spawn workers import this module (design §2, import hygiene).
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np

DIAGNOSTIC_KEYS = ("lane_change", "overtakes", "distance")
"""The info keys of `DrivingDiagnostics`, one increment per step (0 at a reset)."""


class DrivingDiagnostics:
    """Per-step increments of an episode's lane changes, net overtakes and distance (design §3).

    - `lane_change` (0/1): the ego's lane (`lane_index`, the road's closest lane to it) differs from
      the previous step's. One policy step is far too short to cross two lanes.
    - `overtakes` (net count): every other vehicle is ahead of the ego or behind it by the sign of
      its longitudinal gap, the centre-to-centre distance along the road (the direction of the ego's
      lane at the ego). A vehicle exactly level keeps the side it had; one never seen off level has
      none. A step counts +1 for each vehicle that went from ahead to behind, -1 for each that went
      from behind to ahead. Each vehicle's episode total is then +1, -1 or 0 by its first and last
      sides alone, so a vehicle that oscillates about the ego nets 0 and nothing counts twice.
    - `distance` (m): the ego's progress along the road this step (its displacement along the same
      direction; negative when it backs up).

    Vehicles are identified by their place in `road.vehicles`: highway-v0 and highway-fast-v0 create
    them all at reset and never add or remove one (the fast simulator keeps the same list). A step
    whose list is not the previous step's counts no overtakes and starts the sides afresh.
    """

    def __init__(self) -> None:
        self._lane = None
        self._position = np.zeros(2)
        self._ids: tuple[int, ...] = ()
        self._side = np.zeros(0)

    def _observe(self, ego, others: list, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
        """The road's direction at the ego, the others' sides (-1, 0, +1) and their identities."""
        longitudinal, _ = ego.lane.local_coordinates(ego.position)
        heading = ego.lane.heading_at(longitudinal)
        direction = np.array([np.cos(heading), np.sin(heading)])
        side = np.sign((positions - ego.position) @ direction) if len(others) else np.zeros(0)
        return direction, side, tuple(map(id, others))

    def reset(self, ego, others: list, positions: np.ndarray) -> dict:
        """Start an episode; `positions` (len(others), 2) are the others'. Returns the reset's zeros."""
        _, self._side, self._ids = self._observe(ego, others, positions)
        self._lane, self._position = ego.lane_index, ego.position.copy()
        return {"lane_change": 0, "overtakes": 0, "distance": 0.0}

    def step(self, ego, others: list, positions: np.ndarray) -> dict:
        """This step's increments (plain Python types, for AsyncVectorEnv)."""
        direction, side, ids = self._observe(ego, others, positions)
        overtakes = 0
        if ids == self._ids:
            side = np.where(side == 0, self._side, side)
            overtakes = int(np.sum((self._side > 0) & (side < 0)) - np.sum((self._side < 0) & (side > 0)))
        lane_change = int(ego.lane_index != self._lane)
        distance = float((ego.position - self._position) @ direction)
        self._side, self._ids, self._lane, self._position = side, ids, ego.lane_index, ego.position.copy()
        return {"lane_change": lane_change, "overtakes": overtakes, "distance": distance}


class IdmEgo(gym.Wrapper):
    """highway-env's IDMVehicle (IDM with MOBIL lane changes) drives the ego; the env's actions are
    ignored (design §7, the textbook baseline).

    At every reset the controlled vehicle is replaced, at its place in `road.vehicles`, by an
    IDMVehicle in the same state with `target_speed`; it is the env's `vehicle` (so the observation,
    the reward and the env layer read it). Its IDM parameters are the class's (it is not randomized,
    which would also draw from the road's random generator and change the traffic). highway-env caps
    an IDMVehicle's target speed at its lane's speed limit (30 m/s on these roads), so targets above
    that drive like 30 m/s. Steps pass no action to highway-env: the IDMVehicle acts with the others
    in `road.act()`, on the stock and on the fast simulator alike.
    """

    def __init__(self, env: gym.Env, target_speed: float):
        super().__init__(env)
        self.target_speed = target_speed

    def reset(self, *, seed=None, options=None):
        from highway_env.vehicle.behavior import IDMVehicle  # here: the env layer's importers need no highway-env

        _, info = self.env.reset(seed=seed, options=options)
        base = self.env.unwrapped
        ego, vehicles = base.vehicle, base.road.vehicles
        driver = IDMVehicle(base.road, ego.position, ego.heading, ego.speed, target_speed=self.target_speed)
        vehicles[vehicles.index(ego)] = driver  # vehicles have no __eq__: found by identity
        base.vehicle = driver
        if hasattr(base.road, "invalidate"):  # a FastRoad: its arrays hold the replaced vehicle
            base.road.invalidate()
        return base.observation_type.observe(), info

    def step(self, action):
        return self.env.step(None)
