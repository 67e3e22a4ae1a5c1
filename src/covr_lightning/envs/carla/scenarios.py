"""The #HW (highway) and #GP (ghost pedestrian) scenarios and their reward (DBC / ResAct).

Protocol. The CARLA environment of DBC (Zhang et al., ICLR 2021; facebookresearch/
deep_bisim4control), which ResAct (Liu et al., AAAI 2025) uses unchanged: Town04's highway, the
ego car starting at rest, traffic on the Traffic Manager's autopilot, 1000-tick (50 s) episodes,
action repeat 4, 84 px frames from 60-degree cameras 1.6 m ahead of the car's centre and 1.7 m
up. Road 45 at s = 100 m and 20 cars at s in [100, 300] m follow DBC's ``CARLA_0.9.8`` env; the
reward follows its ``CARLA_0.9.6`` env (the one ResAct ships). Per tick:

    r = v_ego . u_highway * dt - lambda_i * impulse - lambda_s * |steer|

with u_highway the lane's direction 5 m ahead, impulse the norm of the collision impulses (N s)
reported in the tick, lambda_i = 1e-4 and lambda_s = 1. Like DBC, an agent step's reward is the
*mean* over its ticks (``reward_aggregation="mean"``), which puts the paper's episode rewards on
the scale of metres / action repeat; ``"sum"`` is the alternative. ``docs/carla.md`` has sources.

Episode end (:func:`end_reason`). ``terminated``: off the driving lanes, the road runs out, slower
than 0.1 m/s for ``stuck_env_steps`` ticks in a row, a tick's collision impulse at or above
``collision_end_impulse`` (off by default, as DBC), or (#GP) hitting the pedestrian.
``truncated``: ``max_episode_env_steps`` ticks, or a lost connection.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from covr_lightning.envs.carla.server import TOWN, CarlaServer, lifted
from covr_lightning.errors import ConfigError

DEFAULT_ACTION_REPEAT = 4
"""Ticks per agent step (DBC's and ResAct's CARLA scripts): 5 decisions per simulated second."""

HIGHWAY_ROAD_ID = 45
HIGHWAY_LANES = (-1, -2, -3, -4)
START_S = 100.0
"""Where the ego car starts on road 45 (metres along the road, DBC's ``get_waypoint_xodr``)."""
TRAFFIC_S = (100.0, 300.0)
"""Range of the other cars' starting s (DBC); a car within 15 m of the ego in its lane is skipped."""
TRAFFIC_CLEARANCE = 15.0
EGO_BLUEPRINT = "vehicle.audi.a2"
CAMERA_MOUNT = (1.6, 1.7)
"""(x ahead of the car's centre, z up) of every camera, metres (DBC)."""
LOOKAHEAD = 5.0
"""u_highway is the lane's direction this many metres ahead of the car (DBC)."""
SPAWN_LIFT = 0.3
STUCK_SPEED = 0.1
"""m/s; below it a tick counts towards ``stuck_env_steps``."""
GHOST_CURB = 1.0
"""The pedestrian appears this far (metres) right of the ego lane's edge, facing across it."""

TASK_DESCRIPTIONS = {
    "highway": (
        "drive the car forward along the highway as far as possible, keeping to the lanes and "
        "avoiding collisions with the other vehicles"
    ),
    "ghost_pedestrian": (
        "drive the car forward along the highway as far as possible, keeping to the lanes, "
        "avoiding collisions with the other vehicles and braking or steering for any pedestrian "
        "who steps onto the road"
    ),
}

TERMINAL = ("pedestrian", "collision", "off_road", "road_end", "stuck")
"""End reasons that terminate (no bootstrap), in order of precedence; others truncate."""


def highway_reward(
    progress: float, impulse: float, steer: float, collision_weight: float, steer_weight: float
) -> float:
    """One tick's reward (DBC, Zhang et al. 2021).

    r = v_ego . u_highway * dt - lambda_i * impulse - lambda_s * |steer|

    Args:
        progress: v_ego . u_highway * dt, metres along the highway in the tick (negative backwards).
        impulse: Norm of the collision impulses of the tick, N s (>= 0).
        steer: Steering command of the tick, in [-1, 1].
        collision_weight: lambda_i (1e-4).
        steer_weight: lambda_s (1.0).

    Returns:
        The reward of the tick.
    """
    return progress - collision_weight * impulse - steer_weight * abs(steer)


def split_action(action: np.ndarray) -> tuple[float, float, float]:
    """Agent action (throttle-brake, steer) in [-1, 1]^2 -> CARLA's (throttle, steer, brake).

    throttle = max(a_0, 0); brake = max(-a_0, 0); steer = a_1 (negative turns left); inputs are
    clipped to [-1, 1] first. This is the layout of the ``carla`` phrase codec.

    Args:
        action: (2,) agent action.

    Returns:
        ``(throttle, steer, brake)`` with throttle and brake in [0, 1].
    """
    longitudinal, steer = (float(v) for v in np.clip(np.asarray(action, np.float64), -1.0, 1.0))
    return max(longitudinal, 0.0), steer, max(-longitudinal, 0.0)


@dataclass
class Tick:
    """What one server tick did to the episode (the flags say which end conditions hold)."""

    frame: int
    progress: float = 0.0  # metres along the highway
    speed: float = 0.0  # m/s
    impulse: float = 0.0  # N s
    pedestrian: bool = False  # the ego car hit a walker
    off_road: bool = False
    road_end: bool = False
    stuck: bool = False
    horizon: bool = False


def end_reason(tick: Tick, collision_end_impulse: float | None) -> str:
    """Why the episode ends at ``tick`` ("" if it goes on); terminal reasons first."""
    reasons = {
        "pedestrian": tick.pedestrian,
        "collision": collision_end_impulse is not None and tick.impulse >= collision_end_impulse,
        "off_road": tick.off_road,
        "road_end": tick.road_end,
        "stuck": tick.stuck,
        "horizon": tick.horizon,
    }
    return next((reason for reason, ended in reasons.items() if ended), "")


def measure(server: CarlaServer, ego, tick: Tick, dt: float) -> None:
    """Fill ``tick`` with the ego car's speed, progress along the highway and road flags."""
    location, velocity = ego.get_location(), ego.get_velocity()
    tick.speed = math.hypot(velocity.x, velocity.y)
    tick.off_road = server.map.get_waypoint(location, project_to_road=False) is None
    lane = server.map.get_waypoint(location)  # projected onto the nearest driving lane
    ahead = lane.next(LOOKAHEAD) if lane is not None else []
    if ahead:  # v_ego . u_highway * dt, u_highway the lane's direction 5 m ahead (DBC)
        u = ahead[0].transform.get_forward_vector()
        tick.progress = (velocity.x * u.x + velocity.y * u.y) / math.hypot(u.x, u.y) * dt
    tick.road_end = not ahead


# --------------------------------------------------------------------------- spawning


def spawn_ego(server: CarlaServer, rng: np.random.Generator):
    """Put the ego car at s = 100 m of a random highway lane.

    Returns:
        ``(ego, lane id)``.

    Raises:
        ConfigError: Every lane is blocked or missing (another client left actors there).
    """
    blueprints = server.blueprints.filter(EGO_BLUEPRINT) or server.blueprints.filter("vehicle.*")
    blueprint = blueprints[0]
    if blueprint.has_attribute("role_name"):
        blueprint.set_attribute("role_name", "hero")
    for lane in [int(lane) for lane in rng.permutation(HIGHWAY_LANES)]:
        waypoint = server.map.get_waypoint_xodr(HIGHWAY_ROAD_ID, lane, START_S)
        if waypoint is None:
            continue
        spot = lifted(server.carla, waypoint.transform, SPAWN_LIFT)
        ego = server.world.try_spawn_actor(blueprint, spot)
        if ego is not None:
            return ego, lane
    raise ConfigError(
        f"cannot place the ego car at s={START_S:g} m of {TOWN}'s highway (road "
        f"{HIGHWAY_ROAD_ID}) on the server at {server.host}:{server.port}: every lane is blocked "
        "or missing",
        "restart the CARLA server to clear actors another client left there",
    )


def spawn_traffic(server: CarlaServer, rng: np.random.Generator, ego_lane: int, count: int) -> list:
    """DBC's traffic: ``count`` tries at random lanes and s in [100, 300] m, on the autopilot.

    Returns:
        The cars spawned (a try whose spot is taken or too close to the ego car spawns none).
    """
    server.traffic_manager.set_random_device_seed(int(rng.integers(2**31)))
    blueprints = [
        bp
        for bp in server.blueprints.filter("vehicle.*")
        if not bp.has_attribute("number_of_wheels")
        or int(bp.get_attribute("number_of_wheels")) == 4
    ]
    traffic = []
    for _ in range(count):
        lane = int(rng.choice(HIGHWAY_LANES))
        s = float(rng.uniform(*TRAFFIC_S))
        blueprint = blueprints[int(rng.integers(len(blueprints)))]
        if lane == ego_lane and abs(s - START_S) < TRAFFIC_CLEARANCE:
            continue
        waypoint = server.map.get_waypoint_xodr(HIGHWAY_ROAD_ID, lane, s)
        if waypoint is None:
            continue
        if blueprint.has_attribute("role_name"):
            blueprint.set_attribute("role_name", "autopilot")
        car = server.world.try_spawn_actor(
            blueprint, lifted(server.carla, waypoint.transform, SPAWN_LIFT)
        )
        if car is None:  # the spot is taken
            continue
        car.set_autopilot(True, server.tm_port)
        traffic.append(car)
    return traffic


def spawn_ghost(server: CarlaServer, ego, rng: np.random.Generator, distance: float, speed: float):
    """#GP: a pedestrian just right of the ego lane, ``distance`` m ahead, walking left across it.

    Returns:
        ``(walker, its WalkerControl)``, or ``None`` when the spot is off the road or taken (the
        env tries again next tick).
    """
    carla = server.carla
    lane = server.map.get_waypoint(ego.get_location())
    ahead = lane.next(distance)
    if not ahead:
        return None
    spot = ahead[0].transform
    right = spot.get_right_vector()
    offset = lane.lane_width / 2 + GHOST_CURB
    location = carla.Location(
        x=spot.location.x + right.x * offset,
        y=spot.location.y + right.y * offset,
        z=spot.location.z + 1.0,  # a walker's origin is at its hips
    )
    blueprints = server.blueprints.filter("walker.pedestrian.*")
    blueprint = blueprints[int(rng.integers(len(blueprints)))]
    if blueprint.has_attribute("is_invincible"):
        blueprint.set_attribute("is_invincible", "false")
    rotation = carla.Rotation(yaw=spot.rotation.yaw - 90.0)
    walker = server.world.try_spawn_actor(blueprint, carla.Transform(location, rotation))
    if walker is None:
        return None
    control = carla.WalkerControl(
        direction=carla.Vector3D(x=-right.x, y=-right.y, z=0.0), speed=speed
    )
    walker.apply_control(control)
    return walker, control
