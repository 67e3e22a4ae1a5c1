"""One CARLA server per host:port, shared by the envs of this process; parking; reconnects.

Sharing a server. The training loop builds a training env and an evaluation env from the same
recipe, both on one server and one world. Envs of one process share a connection
(:func:`join_server`); when one of them ticks, the other's actors are *parked*
(:func:`park_actors`): physics off and lifted 500 m above their place, traffic off the autopilot,
sensors muted, and put back exactly where they were (pose and velocities,
:func:`unpark_actors`) when it ticks again. Another process driving the same server is refused
(a lock file per host:port), as one world cannot serve two synchronous clients.

Lost connection. :meth:`CarlaServer.reconnect` connects anew after a time-out; every env's actors
of the old connection become stale (``generation`` counts reconnects). If the server cannot be
reached again it raises a one-line :class:`ConfigError`.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Protocol

from covr_lightning.errors import ConfigError

try:  # a lock file keeps a second process off a server this one drives (POSIX only)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

_LOG = logging.getLogger(__name__)

TOWN = "Town04"
PARK_LIFT = 500.0
"""Metres above their place that parked actors wait."""


def import_carla():
    """The ``carla`` client module, imported on first use (tests put a fake in ``sys.modules``).

    Raises:
        ConfigError: The package is not installed.
    """
    try:
        import carla
    except ImportError as err:
        raise ConfigError(
            "the CARLA env needs the carla client package, which is not installed",
            'pip install "covr-lightning[carla]" (wheels for CPython 3.8-3.12; see docs/carla.md)',
        ) from err
    return carla


def start_hint(port: int) -> str:
    """How to start a server on ``port``, for error messages."""
    return (
        f"start one with ./CarlaUE4.sh -RenderOffScreen -carla-rpc-port={port} (or docker run "
        "--privileged --gpus all --net=host carlasim/carla:0.9.16 /bin/bash ./CarlaUE4.sh "
        f"-RenderOffScreen -carla-rpc-port={port}), or point env.host / env.port at a running one"
    )


def lifted(carla, transform, lift: float):
    """``transform`` raised by ``lift`` metres (spawning just above the road, parking far above)."""
    location = transform.location
    raised = carla.Location(x=location.x, y=location.y, z=location.z + lift)
    return carla.Transform(raised, transform.rotation)


def lock_server(host: str, port: int):
    """Hold a per-host:port lock file for as long as this process drives that server.

    Raises:
        ConfigError: Another process holds the lock.
    """
    if fcntl is None:  # pragma: no cover - Windows
        return None
    name = re.sub(r"[^A-Za-z0-9.-]", "_", f"{host}-{port}")
    handle = open(Path(tempfile.gettempdir()) / f"covr-lightning-carla-{name}.lock", "a+")  # noqa: SIM115
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        handle.seek(0)
        owner = handle.read().strip()
        handle.close()
        raise ConfigError(
            f"another process{f' (pid {owner})' if owner else ''} already drives the CARLA server "
            f"at {host}:{port}",
            "one synchronous world serves one process: keep run.num_envs=1, or start another "
            "server and give this run its env.port and env.traffic_manager_port",
        ) from err
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


class WorldUser(Protocol):
    """An env that shares a server's world: it parks its actors while another env ticks."""

    def park(self) -> None:
        """Freeze this user's actors out of the way."""

    def unpark(self) -> None:
        """Put this user's actors back as they were."""


class CarlaServer:
    """One connection to a CARLA server, shared by the envs of this process that use it.

    Args:
        carla: The client module.
        host: Server host.
        port: Server RPC port.
        timeout: Client timeout, seconds (every RPC, tick and sensor wait).
        tm_port: Traffic Manager port.
        delta: Fixed tick length, seconds.

    Raises:
        ConfigError: Another process drives this server, or no server answers.
    """

    def __init__(self, carla, host: str, port: int, timeout: float, tm_port: int, delta: float):
        self.carla, self.host, self.port = carla, host, port
        self.timeout, self.tm_port, self.delta = timeout, tm_port, delta
        self.users: set[int] = set()
        self.active: WorldUser | None = None
        self.generation = 0  # +1 per reconnect: actors of an older generation are gone or stale
        self._lock = lock_server(host, port)
        try:
            self.connect()
        except BaseException:
            self.unlock()
            raise

    def connect(self) -> None:
        """Connect, load Town04 unless loaded, switch to synchronous mode with a fixed tick.

        Raises:
            ConfigError: No server answers at host:port within the timeout.
        """
        client = self.carla.Client(self.host, self.port)
        client.set_timeout(self.timeout)
        try:
            server_version = client.get_server_version()
        except RuntimeError as err:
            raise ConfigError(
                f"no CARLA server answered at {self.host}:{self.port} within {self.timeout:g} s",
                start_hint(self.port),
            ) from err
        client_version = client.get_client_version()
        if server_version.split("-")[0] != client_version.split("-")[0]:
            _LOG.warning(
                "CARLA server %s and client %s differ; install the client matching the server",
                server_version,
                client_version,
            )
        world = client.get_world()
        if world.get_map().name.split("/")[-1] != TOWN:
            client.set_timeout(max(self.timeout, 120.0))  # loading a town takes tens of seconds
            world = client.load_world(TOWN)
            client.set_timeout(self.timeout)
        if not hasattr(self, "original_settings"):  # a reconnect finds our own settings
            self.original_settings = world.get_settings()
        settings = world.get_settings()
        settings.synchronous_mode = True
        settings.fixed_delta_seconds = self.delta
        settings.no_rendering_mode = False
        world.apply_settings(settings)
        traffic_manager = client.get_trafficmanager(self.tm_port)
        traffic_manager.set_synchronous_mode(True)
        traffic_manager.set_global_distance_to_leading_vehicle(2.0)  # DBC
        traffic_manager.global_percentage_speed_difference(30.0)  # DBC: 30 % under the limit
        self.client, self.world, self.traffic_manager = client, world, traffic_manager
        self.map = world.get_map()
        self.blueprints = world.get_blueprint_library()

    def reconnect(self, err: Exception) -> None:
        """Connect anew after ``err``; every env's actors become stale.

        Raises:
            ConfigError: The server cannot be reached again.
        """
        _LOG.warning("lost the CARLA server at %s:%d (%s); reconnecting", self.host, self.port, err)
        try:
            self.connect()
        except ConfigError as again:
            raise ConfigError(
                f"lost the connection to the CARLA server at {self.host}:{self.port} ({err}) and "
                "could not reconnect",
                f"{start_hint(self.port)}; then continue with covr-lightning fit --resume last",
            ) from again
        self.generation += 1
        self.active = None

    def activate(self, user: WorldUser) -> None:
        """Make ``user`` the one that ticks: park the previous one's actors, unpark the user's."""
        if self.active is user:
            return
        if self.active is not None:
            self.active.park()
        self.active = user
        user.unpark()

    def release(self, user: WorldUser) -> None:
        """Forget ``user``; the last one out restores the server's settings and drops the lock."""
        self.users.discard(id(user))
        if self.active is user:
            self.active = None
        if self.users:
            return
        SERVERS.pop((self.host, self.port), None)
        try:
            self.traffic_manager.set_synchronous_mode(False)
            # Asynchronous even if it was found synchronous (a crashed run leaves it so): a
            # synchronous world with nobody ticking freezes every later client.
            self.original_settings.synchronous_mode = False
            self.world.apply_settings(self.original_settings)
        except RuntimeError as err:
            _LOG.warning("could not restore the CARLA server's settings (%s)", err)
        self.unlock()

    def unlock(self) -> None:
        """Drop the lock file (the server is free for another process)."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None


SERVERS: dict[tuple[str, int], CarlaServer] = {}
"""This process's connections, by (host, port)."""


def join_server(
    user: WorldUser, carla, host: str, port: int, timeout: float, tm_port: int, delta: float
) -> CarlaServer:
    """The connection to host:port for ``user``: this process's existing one, or a new one.

    Raises:
        ConfigError: The server is driven by another process or does not answer, or another env
            of this process uses it with a different Traffic Manager port or tick length.
    """
    server = SERVERS.get((host, port))
    if server is None:
        server = SERVERS[(host, port)] = CarlaServer(carla, host, port, timeout, tm_port, delta)
    elif (server.tm_port, server.delta) != (tm_port, delta):
        raise ConfigError(
            f"two envs on the CARLA server at {host}:{port} ask for different "
            "traffic_manager_port or fixed_delta_seconds",
            "give every env on one server the same settings",
        )
    server.users.add(id(user))
    return server


# --------------------------------------------------------------------------- parking

Parked = tuple[Any, Any, Any, Any]
"""(actor, transform, velocity, angular velocity) of one parked actor."""


def park_actors(server: CarlaServer, movers: list, traffic: list) -> list[Parked]:
    """Freeze ``movers`` (every moving actor of an env) 500 m above their place.

    Args:
        server: Their server.
        movers: The env's ego car, traffic and pedestrian.
        traffic: The cars among ``movers`` on the Traffic Manager's autopilot (taken off it).

    Returns:
        What :func:`unpark_actors` needs to put them back.
    """
    parked = [(a, a.get_transform(), a.get_velocity(), a.get_angular_velocity()) for a in movers]
    for car in traffic:
        car.set_autopilot(False, server.tm_port)
    for actor, transform, _, _ in parked:
        actor.set_simulate_physics(False)
        actor.set_transform(lifted(server.carla, transform, PARK_LIFT))
    return parked


def unpark_actors(server: CarlaServer, parked: list[Parked], traffic: list) -> None:
    """Put parked actors back with their velocities; the traffic back on the autopilot."""
    for actor, transform, velocity, spin in parked:
        actor.set_transform(transform)
        actor.set_simulate_physics(True)
        actor.set_target_velocity(velocity)
        actor.set_target_angular_velocity(spin)
    for car in traffic:
        car.set_autopilot(True, server.tm_port)
