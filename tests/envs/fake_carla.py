"""A small stand-in for the ``carla`` client package (0.9.x), for tests only: no server, no UE4.

Not a simulator. A *server* (:class:`FakeServer`, reachable once :func:`serve` registers it on a
port) holds one world: a straight 4-lane highway along +x standing in for Town04's road 45 (lanes
-1..-4, 3.5 m wide, centres at y = 1.75, 5.25, 8.75, 12.25; +y is the right-hand side, as in
CARLA), the driven car as a kinematic bicycle, autopilot cars at a constant speed, walkers walking
straight, collisions as overlapping boxes and cameras whose BGRA pixels encode the frame, the car's
x and the camera's yaw. Class, method, argument and attribute names follow the real client;
tests/envs/test_carla.py checks them against the real package when it is installed. Behaviour
goes only as far as CarlaEnv's reward, termination, distance, reconnect and cleanup logic needs.

Fake-only test hooks are methods of :class:`FakeServer` (``stop``, ``restart``, ``fail_ticks``,
``inject_collision``, ``place``); nothing in the module stands for real server behaviour beyond
what its docstrings say.
"""

from __future__ import annotations

import copy
import fnmatch
import itertools
import math
from dataclasses import dataclass, field

import numpy as np

SERVERS: dict[int, FakeServer] = {}
"""Fake servers by RPC port; :class:`Client` reaches only these."""

ROAD_ID = 45
ROAD_LENGTH = 2000.0
LANE_WIDTH = 3.5
LANES = (-1, -2, -3, -4)
ROAD_Y = (0.0, LANE_WIDTH * len(LANES))
VEHICLE_HALF = (2.25, 1.0)  # half length, half width (m)
WALKER_HALF = (0.3, 0.3)
MASS = {"vehicle": 1500.0, "walker": 80.0}
WHEELBASE, MAX_STEER = 2.9, 0.6  # m, rad at steer = 1
SPEED_LIMIT = 25.0  # m/s on the highway (90 km/h)
VERSION = "0.9.16"


def serve(port: int, **options) -> FakeServer:
    """Start a fake server on ``port`` (replacing any); ``options`` go to :class:`FakeServer`."""
    SERVERS[port] = FakeServer(port, **options)
    return SERVERS[port]


def _timeout(host: str, port: int, seconds: float) -> RuntimeError:
    """The real client's message when nothing answers."""
    return RuntimeError(
        f"time-out of {int(seconds * 1000)}ms while waiting for the simulator, make sure the "
        f"simulator is ready and connected to {host}:{port}"
    )


# --------------------------------------------------------------------------- geometry


@dataclass
class Vector3D:
    x: float = 0.0
    y: float = 0.0
    z: float = 0.0

    def __add__(self, other):
        return type(self)(self.x + other.x, self.y + other.y, self.z + other.z)

    def __sub__(self, other):
        return type(self)(self.x - other.x, self.y - other.y, self.z - other.z)

    def __mul__(self, k: float):
        return type(self)(self.x * k, self.y * k, self.z * k)

    def length(self) -> float:
        return math.sqrt(self.x**2 + self.y**2 + self.z**2)


@dataclass
class Location(Vector3D):
    def distance(self, location) -> float:
        return (self - location).length()


@dataclass
class Rotation:
    pitch: float = 0.0
    yaw: float = 0.0
    roll: float = 0.0

    def get_forward_vector(self) -> Vector3D:
        yaw = math.radians(self.yaw)
        return Vector3D(math.cos(yaw), math.sin(yaw), 0.0)

    def get_right_vector(self) -> Vector3D:
        yaw = math.radians(self.yaw)
        return Vector3D(-math.sin(yaw), math.cos(yaw), 0.0)


@dataclass
class Transform:
    location: Location = field(default_factory=Location)
    rotation: Rotation = field(default_factory=Rotation)

    def get_forward_vector(self) -> Vector3D:
        return self.rotation.get_forward_vector()

    def get_right_vector(self) -> Vector3D:
        return self.rotation.get_right_vector()


@dataclass
class VehicleControl:
    throttle: float = 0.0
    steer: float = 0.0
    brake: float = 0.0
    hand_brake: bool = False
    reverse: bool = False
    manual_gear_shift: bool = False
    gear: int = 0


@dataclass
class WalkerControl:
    direction: Vector3D = field(default_factory=lambda: Vector3D(1.0, 0.0, 0.0))
    speed: float = 0.0
    jump: bool = False


@dataclass
class WorldSettings:
    synchronous_mode: bool = False
    no_rendering_mode: bool = False
    fixed_delta_seconds: float | None = None


class LaneType:
    NONE, Driving, Shoulder, Sidewalk, Any = 1, 2, 4, 8, -2


# --------------------------------------------------------------------------- map


@dataclass
class Waypoint:
    road_id: int
    lane_id: int
    s: float
    lane_width: float = LANE_WIDTH
    lane_type: int = LaneType.Driving

    @property
    def transform(self) -> Transform:
        return Transform(Location(self.s, _lane_centre(self.lane_id), 0.0), Rotation())

    def next(self, distance: float) -> list[Waypoint]:
        s = self.s + distance
        return [Waypoint(self.road_id, self.lane_id, s)] if s <= ROAD_LENGTH else []


def _lane_centre(lane_id: int) -> float:
    return LANE_WIDTH * (abs(lane_id) - 0.5)


class Map:
    def __init__(self, name: str) -> None:
        self.name = name

    def get_waypoint(self, location, project_to_road=True, lane_type=LaneType.Driving):
        """Nearest driving lane; ``None`` off the road's lanes unless ``project_to_road``."""
        on_road = ROAD_Y[0] <= location.y <= ROAD_Y[1] and 0.0 <= location.x <= ROAD_LENGTH
        if not project_to_road and not on_road:
            return None
        lane = min(LANES, key=lambda lane_id: abs(location.y - _lane_centre(lane_id)))
        return Waypoint(ROAD_ID, lane, min(max(location.x, 0.0), ROAD_LENGTH))

    def get_waypoint_xodr(self, road_id, lane_id, s):
        if road_id != ROAD_ID or lane_id not in LANES or not 0.0 <= s <= ROAD_LENGTH:
            return None
        return Waypoint(road_id, lane_id, s)

    def get_spawn_points(self) -> list[Transform]:
        return [Waypoint(ROAD_ID, lane, 20.0).transform for lane in LANES]


# --------------------------------------------------------------------------- blueprints


class ActorAttribute:
    def __init__(self, id: str, value: str, recommended_values=()) -> None:
        self.id, self._value = id, value
        self.recommended_values = list(recommended_values)

    def as_str(self) -> str:
        return self._value

    def as_int(self) -> int:
        return int(self._value)

    def as_float(self) -> float:
        return float(self._value)

    def as_bool(self) -> bool:
        return self._value.lower() == "true"

    def __int__(self) -> int:
        return self.as_int()

    def __float__(self) -> float:
        return self.as_float()

    def __str__(self) -> str:
        return self._value


class ActorBlueprint:
    def __init__(self, id: str, **attributes: str) -> None:
        self.id = id
        self.tags = id.split(".")
        self._attributes = {"role_name": "", **attributes}

    def has_attribute(self, id) -> bool:
        return id in self._attributes

    def get_attribute(self, id) -> ActorAttribute:
        if id not in self._attributes:
            raise IndexError(f"blueprint '{self.id}' has no attribute '{id}'")
        return ActorAttribute(id, self._attributes[id])

    def set_attribute(self, id, value) -> None:
        if id not in self._attributes:
            raise IndexError(f"blueprint '{self.id}' has no attribute '{id}'")
        self._attributes[id] = str(value)


class BlueprintLibrary:
    def __init__(self, blueprints: list[ActorBlueprint]) -> None:
        self._blueprints = blueprints

    def find(self, id) -> ActorBlueprint:
        for blueprint in self._blueprints:
            if blueprint.id == id:
                return copy.deepcopy(blueprint)
        raise IndexError(f"blueprint '{id}' not found")

    def filter(self, wildcard_pattern) -> BlueprintLibrary:
        return BlueprintLibrary(
            [copy.deepcopy(b) for b in self._blueprints if fnmatch.fnmatch(b.id, wildcard_pattern)]
        )

    def __iter__(self):
        return iter(self._blueprints)

    def __len__(self) -> int:
        return len(self._blueprints)

    def __getitem__(self, index) -> ActorBlueprint:
        return self._blueprints[index]


def _library() -> BlueprintLibrary:
    camera = {"image_size_x": "800", "image_size_y": "600", "fov": "90"}
    return BlueprintLibrary(
        [
            ActorBlueprint("vehicle.audi.a2", number_of_wheels="4"),
            ActorBlueprint("vehicle.tesla.model3", number_of_wheels="4"),
            ActorBlueprint("vehicle.bh.crossbike", number_of_wheels="2"),
            ActorBlueprint("walker.pedestrian.0001", is_invincible="true"),
            ActorBlueprint("walker.pedestrian.0002", is_invincible="true"),
            ActorBlueprint("sensor.camera.rgb", **camera),
            ActorBlueprint("sensor.other.collision"),
        ]
    )


# --------------------------------------------------------------------------- actors


class ActorList(list):
    def filter(self, wildcard_pattern) -> ActorList:
        return ActorList(a for a in self if fnmatch.fnmatch(a.type_id, wildcard_pattern))

    def find(self, id):
        return next((a for a in self if a.id == id), None)


class Actor:
    """Server-side state and client handle in one object (the real client has proxies)."""

    def __init__(self, world, blueprint, transform, parent=None) -> None:
        self._world = world
        self.id = next(world._server.ids)
        self.type_id = blueprint.id
        self.attributes = dict(blueprint._attributes)
        self.parent = parent
        self._transform = copy.deepcopy(transform)  # relative to the parent if attached
        self._velocity = Vector3D()
        self._spin = Vector3D()
        self._physics = True
        self._alive = True

    @property
    def is_alive(self) -> bool:
        return self._alive

    def get_world(self):
        return self._world

    def get_transform(self) -> Transform:
        self._world._check()
        if self.parent is None:
            return copy.deepcopy(self._transform)
        base, rel = self.parent.get_transform(), self._transform
        forward, right = base.get_forward_vector(), base.get_right_vector()
        location = base.location + forward * rel.location.x + right * rel.location.y
        location.z += rel.location.z
        return Transform(location, Rotation(yaw=base.rotation.yaw + rel.rotation.yaw))

    def get_location(self) -> Location:
        return self.get_transform().location

    def get_velocity(self) -> Vector3D:
        self._world._check()
        return copy.deepcopy(self.parent.get_velocity() if self.parent else self._velocity)

    def get_angular_velocity(self) -> Vector3D:
        self._world._check()
        return copy.deepcopy(self._spin)

    def set_transform(self, transform) -> None:
        self._world._check()
        self._transform = copy.deepcopy(transform)

    def set_simulate_physics(self, enabled=True) -> None:
        self._world._check()
        self._physics = bool(enabled)

    def set_target_velocity(self, velocity) -> None:
        self._world._check()
        self._velocity = copy.deepcopy(velocity)

    def set_target_angular_velocity(self, angular_velocity) -> None:
        self._world._check()
        self._spin = copy.deepcopy(angular_velocity)

    def destroy(self) -> bool:
        self._world._check()
        if not self._alive:
            return False
        self._alive = False
        server = self._world._server
        server.actors.pop(self.id, None)
        server.destroyed.append(self.id)
        return True

    # -- fake physics

    def _half(self) -> tuple[float, float]:
        return WALKER_HALF if self.type_id.startswith("walker.") else VEHICLE_HALF


class Vehicle(Actor):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._control = VehicleControl()
        self._autopilot: int | None = None  # traffic manager port

    def apply_control(self, control) -> None:
        self._world._check()
        self._control = copy.deepcopy(control)

    def get_control(self) -> VehicleControl:
        return copy.deepcopy(self._control)

    def set_autopilot(self, enabled=True, tm_port=8000) -> None:
        self._world._check()
        self._autopilot = int(tm_port) if enabled else None

    def _advance(self, dt: float) -> None:
        yaw = math.radians(self._transform.rotation.yaw)
        if self._autopilot is not None:
            tm = self._world._server.traffic_managers.get(self._autopilot)
            speed = SPEED_LIMIT * (1.0 - (tm.percentage if tm else 0.0) / 100.0)
        else:  # a kinematic bicycle: throttle 4 m/s^2, brake 8 m/s^2, a little drag
            c = self._control
            speed = math.hypot(self._velocity.x, self._velocity.y)
            speed = max(speed + (4.0 * c.throttle - 8.0 * c.brake - 0.02 * speed) * dt, 0.0)
            yaw += speed / WHEELBASE * math.tan(c.steer * MAX_STEER) * dt
            self._transform.rotation.yaw = math.degrees(yaw)
        self._velocity = Vector3D(speed * math.cos(yaw), speed * math.sin(yaw), 0.0)


class Walker(Actor):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._control = WalkerControl()

    def apply_control(self, control) -> None:
        self._world._check()
        self._control = copy.deepcopy(control)

    def get_control(self) -> WalkerControl:
        return copy.deepcopy(self._control)

    def _advance(self, dt: float) -> None:
        d = self._control.direction
        norm = math.hypot(d.x, d.y) or 1.0
        speed = self._control.speed
        self._velocity = Vector3D(d.x / norm * speed, d.y / norm * speed, 0.0)


class Sensor(Actor):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._callback = None

    def is_listening(self) -> bool:
        return self._callback is not None

    def listen(self, callback) -> None:
        self._world._check()
        self._callback = callback

    def stop(self) -> None:
        self._world._check()
        self._callback = None


@dataclass
class Image:
    frame: int
    timestamp: float
    width: int
    height: int
    fov: float
    raw_data: bytes
    transform: Transform


@dataclass
class CollisionEvent:
    frame: int
    timestamp: float
    actor: Actor
    other_actor: Actor | None
    normal_impulse: Vector3D
    transform: Transform


class TrafficManager:
    def __init__(self, port: int) -> None:
        self.port = port
        self.synchronous = False
        self.percentage = 0.0
        self.distance = 0.0
        self.seed: int | None = None

    def get_port(self) -> int:
        return self.port

    def set_synchronous_mode(self, mode_switch) -> None:
        self.synchronous = bool(mode_switch)

    def set_random_device_seed(self, value) -> None:
        self.seed = int(value)

    def global_percentage_speed_difference(self, percentage) -> None:
        self.percentage = float(percentage)

    def set_global_distance_to_leading_vehicle(self, distance) -> None:
        self.distance = float(distance)


# --------------------------------------------------------------------------- world, client


class World:
    def __init__(self, server: FakeServer) -> None:
        self._server = server
        self._epoch = server.epoch
        self.id = server.epoch

    def _check(self) -> None:
        """Every call fails like a time-out once the server is down or restarted."""
        server = self._server
        if not server.alive or self._epoch != server.epoch:
            raise _timeout("localhost", server.port, 10.0)

    def get_map(self) -> Map:
        self._check()
        return Map(self._server.map_name)

    def get_settings(self) -> WorldSettings:
        self._check()
        return copy.deepcopy(self._server.settings)

    def apply_settings(self, settings, seconds=0.0) -> int:
        self._check()
        self._server.settings = copy.deepcopy(settings)
        return self._server.frame

    def get_blueprint_library(self) -> BlueprintLibrary:
        self._check()
        return _library()

    def spawn_actor(self, blueprint, transform, attach_to=None, attachment_type=None, bone=""):
        actor = self.try_spawn_actor(blueprint, transform, attach_to, attachment_type, bone)
        if actor is None:
            raise RuntimeError("Spawn failed because of collision at spawn position")
        return actor

    def try_spawn_actor(self, blueprint, transform, attach_to=None, attachment_type=None, bone=""):
        self._check()
        server = self._server
        kind = {"vehicle": Vehicle, "walker": Walker, "sensor": Sensor}[blueprint.id.split(".")[0]]
        actor = kind(self, blueprint, transform, parent=attach_to)
        if kind is not Sensor and any(server.overlap(actor, other) for other in server.bodies()):
            return None
        server.actors[actor.id] = actor
        server.spawned.append(actor.id)
        return actor

    def get_actors(self) -> ActorList:
        self._check()
        return ActorList(self._server.actors.values())

    def get_actor(self, actor_id):
        self._check()
        return self._server.actors.get(actor_id)

    def tick(self, seconds=0.0) -> int:
        self._check()
        return self._server.step()


class Client:
    def __init__(self, host="127.0.0.1", port=2000, worker_threads=0) -> None:
        self.host, self.port, self.timeout = host, int(port), 5.0

    def _server(self) -> FakeServer:
        server = SERVERS.get(self.port)
        if server is None or not server.alive:
            raise _timeout(self.host, self.port, self.timeout)
        return server

    def set_timeout(self, seconds) -> None:
        self.timeout = float(seconds)

    def get_server_version(self) -> str:
        return self._server().version

    def get_client_version(self) -> str:
        return VERSION

    def get_world(self) -> World:
        return World(self._server())

    def load_world(self, map_name, reset_settings=True, map_layers=None) -> World:
        server = self._server()
        server.load(map_name, reset_settings)
        return World(server)

    def get_trafficmanager(self, port=8000) -> TrafficManager:
        return self._server().traffic_managers.setdefault(int(port), TrafficManager(int(port)))


# --------------------------------------------------------------------------- the server


class FakeServer:
    """One fake CARLA server: its world's actors, settings and frame counter, and test hooks.

    Args:
        port: RPC port the fake :class:`Client` reaches it on.
        map_name: The map loaded at start (not Town04, so the env has to load it).
        version: What ``get_server_version`` answers.

    Attributes:
        actors: Live actors by id.
        spawned: Ids of every actor ever spawned, in order.
        destroyed: Ids of every destroyed actor, in order.
        ticks: Successful ticks so far.
        loads: Maps loaded through ``load_world``.
    """

    def __init__(
        self, port: int, map_name: str = "Carla/Maps/Town10HD_Opt", version: str = VERSION
    ) -> None:
        self.port, self.map_name, self.version = port, map_name, version
        self.alive = True
        self.epoch = 0
        self.ids = itertools.count(100)
        self.actors: dict[int, Actor] = {}
        self.spawned: list[int] = []
        self.destroyed: list[int] = []
        self.settings = WorldSettings()
        self.traffic_managers: dict[int, TrafficManager] = {}
        self.frame = 0
        self.ticks = 0
        self.loads: list[str] = []
        self._failing_ticks = 0
        self._injected: list[tuple[Actor, float, Actor | None]] = []
        self._contacts: set[tuple[int, int]] = set()

    # -- test hooks (not in the real API)

    def stop(self) -> None:
        """The server process dies: every call of every client times out."""
        self.alive = False

    def restart(self) -> None:
        """A fresh server process on the same port: no actors, default settings."""
        self.alive = True
        self.epoch += 1
        self.actors.clear()
        self.settings = WorldSettings()
        self._contacts.clear()

    def fail_ticks(self, count: int = 1) -> None:
        """The next ``count`` ticks time out (the server stays up)."""
        self._failing_ticks = count

    def inject_collision(self, actor: Actor, impulse: float, other: Actor | None = None) -> None:
        """At the next tick, ``actor``'s collision sensors report an impulse of norm ``impulse``."""
        self._injected.append((actor, impulse, other))

    def place(self, type_id: str, lane: int, s: float, autopilot: bool = False) -> Actor:
        """Spawn an actor at ``s`` metres of ``lane`` (e.g. a car standing in the way)."""
        world = World(self)
        location = Waypoint(ROAD_ID, lane, s).transform.location
        actor = world.spawn_actor(_library().find(type_id), Transform(location, Rotation()))
        if autopilot:
            actor.set_autopilot(True, 8000)
        return actor

    def vehicles(self) -> list[Actor]:
        return [a for a in self.actors.values() if a.type_id.startswith("vehicle.")]

    def sensors(self) -> list[Actor]:
        return [a for a in self.actors.values() if a.type_id.startswith("sensor.")]

    # -- simulation

    def load(self, map_name: str, reset_settings: bool) -> None:
        self.loads.append(map_name)
        self.map_name = f"Carla/Maps/{map_name}"
        self.actors.clear()
        if reset_settings:
            self.settings = WorldSettings()

    def bodies(self) -> list[Actor]:
        """Actors that move and collide: not sensors, not frozen."""
        return [
            a
            for a in self.actors.values()
            if not isinstance(a, Sensor) and a.parent is None and a._physics
        ]

    @staticmethod
    def overlap(a: Actor, b: Actor) -> bool:
        (ax, ay), (bx, by) = a._half(), b._half()
        pa, pb = a._transform.location, b._transform.location
        return abs(pa.x - pb.x) < ax + bx and abs(pa.y - pb.y) < ay + by and abs(pa.z - pb.z) < 3

    def step(self) -> int:
        if self._failing_ticks:
            self._failing_ticks -= 1
            raise _timeout("localhost", self.port, 10.0)
        dt = self.settings.fixed_delta_seconds or 0.05
        for actor in self.bodies():
            actor._advance(dt)
            location = actor._transform.location
            location.x += actor._velocity.x * dt
            location.y += actor._velocity.y * dt
        self.frame += 1
        self.ticks += 1
        events = self._collide() + self._injected_events()
        for sensor in [a for a in self.actors.values() if isinstance(a, Sensor)]:
            if sensor._callback is None:
                continue
            if sensor.type_id == "sensor.camera.rgb":
                sensor._callback(self._image(sensor))
            else:
                for event in events:
                    if event.actor is sensor.parent:
                        sensor._callback(event)
        return self.frame

    def _collide(self) -> list[CollisionEvent]:
        """Events for newly overlapping pairs, each with impulse = other's mass x relative speed.

        The bodies then move together: a walker is carried by the car, a car by an autopilot car,
        and two driven cars share their mean velocity.
        """
        events, contacts = [], set()
        bodies = self.bodies()
        for a, b in itertools.combinations(bodies, 2):
            if not self.overlap(a, b):
                continue
            contacts.add((a.id, b.id))
            if (a.id, b.id) in self._contacts:
                continue
            relative = (a._velocity - b._velocity).length()
            for this, other in ((a, b), (b, a)):
                mass = MASS[other.type_id.split(".")[0]]
                impulse = Vector3D(-mass * relative, 0.0, 0.0)
                events.append(self._event(this, other, impulse))
            if isinstance(b, Walker) or getattr(a, "_autopilot", None) is not None:
                a, b = b, a  # a is the one carried
            if isinstance(a, Walker) or getattr(b, "_autopilot", None) is not None:
                a._velocity = copy.deepcopy(b._velocity)
                if isinstance(a, Walker):
                    a._control = WalkerControl(speed=0.0)
            else:
                a._velocity = b._velocity = (a._velocity + b._velocity) * 0.5
        self._contacts = contacts
        return events

    def _injected_events(self) -> list[CollisionEvent]:
        injected, self._injected = self._injected, []
        return [
            self._event(actor, other, Vector3D(-impulse, 0.0, 0.0))
            for actor, impulse, other in injected
        ]

    def _event(self, actor, other, impulse) -> CollisionEvent:
        return CollisionEvent(
            self.frame, self.frame * 0.05, actor, other, impulse, actor.get_transform()
        )

    def _image(self, camera: Sensor) -> Image:
        width = int(camera.attributes["image_size_x"])
        height = int(camera.attributes["image_size_y"])
        bgra = np.empty((height, width, 4), dtype=np.uint8)
        bgra[..., 0] = self.frame % 256
        bgra[..., 1] = int(camera.get_location().x * 4) % 256
        bgra[..., 2] = int(camera._transform.rotation.yaw + 128) % 256
        bgra[..., 3] = 255
        return Image(
            self.frame,
            self.frame * 0.05,
            width,
            height,
            float(camera.attributes["fov"]),
            bgra.tobytes(),
            camera.get_transform(),
        )
