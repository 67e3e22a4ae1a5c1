"""CARLA 0.9.x driving behind the gymnasium API: #HW (highway traffic) and #GP (ghost pedestrian).

The env is a client of a CARLA server that runs separately (``docs/carla.md``); the ``carla``
package is an optional extra, imported when an env is built, never when this module is. One *env
step* is one server tick of ``fixed_delta_seconds`` (0.05 s, synchronous mode); one *agent step*
(one call of :meth:`CarlaEnv.step`) holds the action for ``action_repeat`` ticks.

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

Episode end. ``terminated``: off the driving lanes, the road runs out, slower than 0.1 m/s for
``stuck_env_steps`` ticks in a row, a tick's collision impulse at or above
``collision_end_impulse`` (off by default, as DBC), or (#GP) hitting the pedestrian.
``truncated``: ``max_episode_env_steps`` ticks, or a lost connection. ``info["end_reason"]`` names
it. Reset ticks twice without counting env steps (the spawned cars settle onto the road).

Sharing a server. The training loop builds a training env and an evaluation env from the same
recipe, both on one server and one world. Envs of one process share a connection; when one of
them ticks, the other's actors are *parked*: physics off and lifted 500 m above their place,
traffic off the autopilot, sensors muted, and put back exactly where they were (pose and
velocities) when it ticks again. Another process driving the same server is refused (a lock file
per host:port), as one world cannot serve two synchronous clients.

Lost connection. A tick, spawn or sensor read that times out (``RuntimeError`` from the client)
makes the env reconnect once: the episode in progress ends as truncated with
``end_reason="connection_lost"`` and a logged warning, and the next reset spawns everything anew.
If the server cannot be reached again the env raises a one-line :class:`ConfigError`.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import math
import os
import queue
import re
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import gymnasium
import numpy as np
from PIL import Image

from covr_lightning.envs.frames import FrameStack
from covr_lightning.errors import ConfigError, require_positive_ints

try:  # a lock file keeps a second process off a server this one drives (POSIX only)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

_LOG = logging.getLogger(__name__)

DEFAULT_ACTION_REPEAT = 4
"""Ticks per agent step (DBC's and ResAct's CARLA scripts): 5 decisions per simulated second."""

TOWN = "Town04"
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
PARK_LIFT = 500.0
STUCK_SPEED = 0.1
"""m/s; below it a tick counts towards ``stuck_env_steps``."""
GHOST_CURB = 1.0
"""The pedestrian appears this far (metres) right of the ego lane's edge, facing across it."""
_SETTLE_TICKS = 2

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

_TERMINAL = ("pedestrian", "collision", "off_road", "road_end", "stuck")
"""End reasons that terminate (no bootstrap), in order of precedence; others truncate."""


def default_action_repeat(domain: str | None = None) -> int:
    """CARLA's action repeat.

    Args:
        domain: Ignored (one setting for both scenarios); present so callers can treat every
            env class alike.

    Returns:
        :data:`DEFAULT_ACTION_REPEAT` (4).
    """
    return DEFAULT_ACTION_REPEAT


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


def _bgra_to_rgb(image) -> np.ndarray:
    """A ``carla.Image`` (BGRA bytes) -> (H, W, 3) uint8 RGB, copied out of the client's buffer."""
    bgra = np.frombuffer(image.raw_data, dtype=np.uint8).reshape(image.height, image.width, 4)
    return np.ascontiguousarray(bgra[:, :, 2::-1])


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    if image.shape[:2] == (height, width):
        return image.copy()
    resized = Image.fromarray(image).resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(resized)


# --------------------------------------------------------------------------- one server


def _lock_server(host: str, port: int):
    """Hold a per-host:port lock file for as long as this process drives that server."""
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


class _Server:
    """One connection to a CARLA server, shared by the envs of this process that use it.

    Args:
        carla: The client module.
        host: Server host.
        port: Server RPC port.
        timeout: Client timeout, seconds (every RPC, tick and sensor wait).
        tm_port: Traffic Manager port.
        delta: Fixed tick length, seconds.
    """

    def __init__(self, carla, host: str, port: int, timeout: float, tm_port: int, delta: float):
        self.carla, self.host, self.port = carla, host, port
        self.timeout, self.tm_port, self.delta = timeout, tm_port, delta
        self.users: set[int] = set()
        self.active: CarlaEnv | None = None
        self.generation = 0  # +1 per reconnect: actors of an older generation are gone or stale
        self._lock = _lock_server(host, port)
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

    def activate(self, env: CarlaEnv) -> None:
        """Make ``env`` the one that ticks: park the previous one's actors, unpark env's."""
        if self.active is env:
            return
        if self.active is not None:
            self.active.park()
        self.active = env
        env.unpark()

    def release(self, env: CarlaEnv) -> None:
        """Forget ``env``; the last one out restores the server's settings and drops the lock."""
        self.users.discard(id(env))
        if self.active is env:
            self.active = None
        if self.users:
            return
        _SERVERS.pop((self.host, self.port), None)
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
        if self._lock is not None:
            self._lock.close()
            self._lock = None


_SERVERS: dict[tuple[str, int], _Server] = {}
_OPEN_ENVS: weakref.WeakSet[CarlaEnv] = weakref.WeakSet()


@atexit.register
def _close_open_envs() -> None:
    """Close envs nobody closed: their actors would outlive this process on the server, and a
    synchronous world with nobody ticking freezes the next client."""
    for env in list(_OPEN_ENVS):
        env.close()


def _join_server(env: CarlaEnv, carla, timeout: float, tm_port: int, delta: float) -> _Server:
    key = (env.host, env.port)
    server = _SERVERS.get(key)
    if server is None:
        server = _SERVERS[key] = _Server(carla, env.host, env.port, timeout, tm_port, delta)
    elif (server.tm_port, server.delta) != (tm_port, delta):
        raise ConfigError(
            f"two envs on the CARLA server at {env.host}:{env.port} ask for different "
            "traffic_manager_port or fixed_delta_seconds",
            "give every env on one server the same settings",
        )
    server.users.add(id(env))
    return server


# --------------------------------------------------------------------------- the env


@dataclass
class _Tick:
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


class CarlaEnv(gymnasium.Env):
    """A CARLA driving scenario (#HW or #GP) with frame stacking and action repeat.

    Args:
        scenario: ``highway`` (#HW: Town04's highway among autopilot traffic) or
            ``ghost_pedestrian`` (#GP: the same, plus a pedestrian who steps into the ego lane
            ``ghost_distance`` metres ahead at a random tick of ``ghost_window``).
        host: CARLA server host.
        port: CARLA server RPC port (``-carla-rpc-port``).
        timeout: Seconds to wait for the server on every call, tick and camera frame.
        traffic_manager_port: Port of the Traffic Manager driving the other cars.
        image_size: Side of each camera's square policy frame.
        cameras: 1 (forward), 3 or 5 cameras of ``fov`` degrees side by side, stitched left to
            right into one (image_size, cameras * image_size) panorama (DBC: 5 x 60 = 300 deg).
        fov: Horizontal field of view of each camera, degrees.
        view_size: Side of the forward camera :meth:`render` reads (the VLM's view); 0 renders
            the centre policy camera, resized.
        frame_stack: Frames per observation, stacked on the channel axis.
        action_repeat: Ticks per agent step; ``None`` takes :func:`default_action_repeat` (4).
        max_episode_env_steps: Ticks per episode before truncation (DBC: 1000, i.e. 50 s).
        fixed_delta_seconds: Simulated seconds per tick (dt of the reward).
        num_vehicles: Other cars spawned per episode (some fail when their spot is taken).
        collision_weight: lambda_i, reward per N s of collision impulse.
        steer_weight: lambda_s, reward per unit of |steer| per tick.
        reward_aggregation: An agent step's reward over its ticks: ``mean`` (DBC) or ``sum``.
        collision_end_impulse: End the episode when one tick's impulse reaches this (N s);
            ``None`` never (DBC: collisions only cost reward).
        stuck_env_steps: End the episode after this many ticks in a row below 0.1 m/s.
        ghost_window: (first, last) tick of the episode at which the #GP pedestrian may appear,
            drawn uniformly per episode.
        ghost_distance: Metres ahead of the ego car, along its lane, where the pedestrian appears.
        ghost_speed: Walking speed of the pedestrian across the road, m/s.
        seed: Seed of the scenario's random choices (lanes, traffic, pedestrian timing);
            ``reset(seed=...)`` reseeds.

    Attributes:
        observation_space: Box uint8 (3 * frame_stack, image_size, cameras * image_size).
        action_space: Box float32 [-1, 1]^2 = (throttle-brake, steer), see :func:`split_action`.
        frame_shape: One frame, (3, image_size, cameras * image_size).
        env_steps: Ticks taken since construction.

    Raises:
        ConfigError: A bad option, the carla package missing, no server at host:port, or another
            process driving that server.
    """

    metadata = {"render_modes": ["rgb_array"]}
    codec_kind = "carla"
    max_num_envs = 1
    """One synchronous world serves one process: the loop refuses run.num_envs > 1 up front."""
    episode_metrics = ("driving_distance", "dbc_distance")
    """Info keys the loop and ``evaluate`` report per episode (``rl/``, ``eval/`` metrics)."""
    """Action codec family of the VLM: (throttle-brake, steer) as phrases."""
    default_action_repeat = staticmethod(default_action_repeat)

    def __init__(
        self,
        scenario: Literal["highway", "ghost_pedestrian"] = "highway",
        host: str = "localhost",
        port: int = 2000,
        timeout: float = 10.0,
        traffic_manager_port: int = 8000,
        image_size: int = 84,
        cameras: int = 1,
        fov: float = 60.0,
        view_size: int = 224,
        frame_stack: int = 3,
        action_repeat: int | None = None,
        max_episode_env_steps: int = 1000,
        fixed_delta_seconds: float = 0.05,
        num_vehicles: int = 20,
        collision_weight: float = 1e-4,
        steer_weight: float = 1.0,
        reward_aggregation: Literal["mean", "sum"] = "mean",
        collision_end_impulse: float | None = None,
        stuck_env_steps: int = 100,
        ghost_window: tuple[int, int] = (100, 600),
        ghost_distance: float = 30.0,
        ghost_speed: float = 2.0,
        seed: int = 0,
    ) -> None:
        action_repeat = default_action_repeat() if action_repeat is None else action_repeat
        _check_options(
            scenario=scenario,
            positive_ints={
                "image_size": image_size,
                "frame_stack": frame_stack,
                "action_repeat": action_repeat,
                "max_episode_env_steps": max_episode_env_steps,
                "stuck_env_steps": stuck_env_steps,
            },
            cameras=cameras,
            fov=fov,
            view_size=view_size,
            positives={
                "timeout": timeout,
                "fixed_delta_seconds": fixed_delta_seconds,
                "ghost_distance": ghost_distance,
                "ghost_speed": ghost_speed,
            },
            reward_aggregation=reward_aggregation,
            ghost_window=ghost_window,
        )
        self.scenario, self.host, self.port = scenario, host, int(port)
        self.timeout = float(timeout)
        self.image_size, self.cameras, self.fov = int(image_size), int(cameras), float(fov)
        self.view_size = int(view_size)
        self.frame_stack, self.action_repeat = int(frame_stack), int(action_repeat)
        self.max_episode_env_steps = int(max_episode_env_steps)
        self.dt = float(fixed_delta_seconds)
        self.num_vehicles = int(num_vehicles)
        self.collision_weight, self.steer_weight = float(collision_weight), float(steer_weight)
        self.reward_aggregation = reward_aggregation
        self.collision_end_impulse = collision_end_impulse
        self.stuck_env_steps = int(stuck_env_steps)
        self.ghost_window = (int(ghost_window[0]), int(ghost_window[1]))
        self.ghost_distance, self.ghost_speed = float(ghost_distance), float(ghost_speed)
        self.render_mode = "rgb_array"
        self.env_steps = 0

        self.frame_shape: tuple[int, ...] = (3, self.image_size, self.cameras * self.image_size)
        self.observation_space = gymnasium.spaces.Box(
            0, 255, shape=(3 * self.frame_stack, *self.frame_shape[1:]), dtype=np.uint8
        )
        self.action_space = gymnasium.spaces.Box(-1.0, 1.0, shape=(2,), dtype=np.float32)

        self._rng = np.random.default_rng(seed)
        self._actors: list = []  # everything this env spawned, sensors first
        self._traffic: list = []
        self._ego = self._walker = self._ghost_control = None
        self._camera_queues: list[queue.SimpleQueue] = []
        self._view_queue: queue.SimpleQueue | None = None
        self._collisions: queue.SimpleQueue = queue.SimpleQueue()
        self._muted = False  # parked: sensor callbacks drop their data
        self._parked: list[tuple] = []
        self._frames = FrameStack(self.frame_stack)
        self._view: np.ndarray | None = None
        self._needs_reset = True
        self._closed = False

        self.carla = import_carla()
        self._server = _join_server(
            self, self.carla, self.timeout, int(traffic_manager_port), self.dt
        )
        self._generation = self._server.generation
        _OPEN_ENVS.add(self)

    # ---------------------------------------------------------------- gymnasium API

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Starts an episode: destroys the last one's actors, spawns the scenario anew.

        Args:
            seed: If given, reseeds the scenario's random choices.
            options: Unused (gymnasium API).

        Returns:
            The first observation (its stack holds copies of the first frame) and an empty dict.

        Raises:
            ConfigError: The server is gone and does not come back, or the ego car cannot be
                placed on the highway.
        """
        super().reset(seed=seed)
        if seed is not None:
            self._rng = np.random.default_rng(seed)
        for attempt in range(2):
            try:
                self._server.activate(self)
                self.destroy_actors()
                frame = self._start_episode()
                break
            except RuntimeError as err:  # the client's time-outs and RPC failures
                if attempt:
                    raise ConfigError(
                        f"the CARLA server at {self.host}:{self.port} failed twice while starting "
                        f"an episode ({err})",
                        "restart the server, then continue with covr-lightning fit --resume last",
                    ) from err
                self._server.reconnect(err)
                self._generation = self._server.generation
        self._frames.reset(frame)
        self._needs_reset = False
        return self._frames.observation(), {}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        """Holds ``action`` for ``action_repeat`` ticks (fewer if the episode ends).

        Args:
            action: (2,) (throttle-brake, steer) in [-1, 1].

        Returns:
            ``(obs, reward, terminated, truncated, info)``: the reward aggregates the ticks'
            rewards (``reward_aggregation``); info has ``env_steps`` (ticks taken),
            ``episode_return``, ``driving_distance`` (metres along the highway this episode),
            ``dbc_distance`` (DBC's distance measure, see docs/carla.md), ``progress`` (metres in
            this step), ``speed`` (m/s), ``collision_impulse`` (N s in this step) and
            ``end_reason`` (empty while the episode runs).

        Raises:
            RuntimeError: If called before :meth:`reset` or after the episode ended.
            ValueError: If the action's shape is not (2,).
            ConfigError: The connection was lost and the server does not come back.
        """
        if self._needs_reset:
            raise RuntimeError("CarlaEnv.step called before reset() or after the episode ended")
        action = np.asarray(action)
        if action.shape != self.action_space.shape:
            raise ValueError(f"action shape {action.shape} != {self.action_space.shape}")
        throttle, steer, brake = split_action(action)
        ticks: list[_Tick] = []
        if self._generation != self._server.generation:  # another env of this server reconnected
            self._drop_stale_actors()
            return self._finish(ticks, steer, end="connection_lost")
        try:
            self._server.activate(self)
            control = self.carla.VehicleControl(throttle=throttle, steer=steer, brake=brake)
            self._ego.apply_control(control)
            for _ in range(self.action_repeat):
                ticks.append(self._tick())
                if self._end(ticks[-1]):
                    break
            self._observe(ticks[-1].frame)
            late = self._take_collisions()  # events that arrived with the images
            ticks[-1].impulse += late[0]
            ticks[-1].pedestrian |= late[1]
        except RuntimeError as err:  # the client's time-outs and RPC failures
            self._server.reconnect(err)
            self._generation = self._server.generation
            self._drop_stale_actors()
            return self._finish(ticks, steer, end="connection_lost")
        return self._finish(ticks, steer, end=self._end(ticks[-1]))

    def render(self, height: int | None = None, width: int | None = None) -> np.ndarray:
        """The newest forward view at any size (black before the first reset).

        Args:
            height: Image height; defaults to ``view_size`` (``image_size`` without a view camera).
            width: Image width; defaults likewise.

        Returns:
            (height, width, 3) uint8 RGB image.
        """
        side = self.view_size or self.image_size
        height = side if height is None else int(height)
        width = side if width is None else int(width)
        if self._view is None:
            return np.zeros((height, width, 3), dtype=np.uint8)
        return _resize(self._view, height, width)

    @property
    def control_timestep(self) -> float:
        """Simulated seconds per env step (one synchronous tick)."""
        return self.dt

    @property
    def task_description(self) -> str:
        """The task in words, for the VLM's prompt."""
        return TASK_DESCRIPTIONS[self.scenario]

    def close(self) -> None:
        """Destroys every actor of this env; the server's last env restores its settings."""
        if self._closed or not hasattr(self, "_server"):
            return
        self._closed = True
        try:
            self.destroy_actors()
        except RuntimeError as err:  # server gone: nothing left to destroy there
            _LOG.warning("could not destroy the CARLA actors of this env (%s)", err)
        self._server.release(self)
        self._needs_reset = True

    # ---------------------------------------------------------------- episodes

    def _start_episode(self) -> np.ndarray:
        """Spawn ego, sensors, traffic (and plan the pedestrian); tick until the first frame."""
        carla, server = self.carla, self._server
        self._generation = server.generation
        ego_lane = self._spawn_ego()
        ego = self._ego
        mount = carla.Location(x=CAMERA_MOUNT[0], z=CAMERA_MOUNT[1])
        self._camera_queues = []
        for k in range(self.cameras):
            yaw = (k - (self.cameras - 1) / 2) * self.fov  # left to right
            self._camera_queues.append(
                self._spawn_camera(self.image_size, carla.Transform(mount, carla.Rotation(yaw=yaw)))
            )
        self._view_queue = None
        if self.view_size:
            self._view_queue = self._spawn_camera(self.view_size, carla.Transform(mount))
        collision = server.world.spawn_actor(
            server.blueprints.find("sensor.other.collision"), carla.Transform(), attach_to=ego
        )
        self._actors.insert(0, collision)
        collision.listen(self._on_collision)
        self._spawn_traffic(ego_lane)

        self._episode_env_steps = 0
        self._episode_return = 0.0
        self._distance = self._dbc_distance = 0.0
        self._slow_ticks = 0
        self._ghost_at = int(self._rng.integers(self.ghost_window[0], self.ghost_window[1] + 1))
        for _ in range(_SETTLE_TICKS - 1):
            server.world.tick()
        frame = server.world.tick()
        self._observe(frame)
        self._take_collisions()  # bumps while settling are not the agent's
        return self._frames.newest

    def _spawn_ego(self) -> int:
        """Put the ego car at s = 100 m of a random highway lane; returns the lane id."""
        server = self._server
        blueprints = server.blueprints.filter(EGO_BLUEPRINT) or server.blueprints.filter(
            "vehicle.*"
        )
        blueprint = blueprints[0]
        if blueprint.has_attribute("role_name"):
            blueprint.set_attribute("role_name", "hero")
        lanes = [int(lane) for lane in self._rng.permutation(HIGHWAY_LANES)]
        for lane in lanes:
            waypoint = server.map.get_waypoint_xodr(HIGHWAY_ROAD_ID, lane, START_S)
            if waypoint is None:
                continue
            self._ego = server.world.try_spawn_actor(blueprint, self._lifted(waypoint.transform))
            if self._ego is not None:
                self._actors.append(self._ego)
                return lane
        raise ConfigError(
            f"cannot place the ego car at s={START_S:g} m of {TOWN}'s highway (road "
            f"{HIGHWAY_ROAD_ID}) on the server at {self.host}:{self.port}: every lane is blocked "
            "or missing",
            "restart the CARLA server to clear actors another client left there",
        )

    def _spawn_camera(self, size: int, transform) -> queue.SimpleQueue:
        server = self._server
        blueprint = server.blueprints.find("sensor.camera.rgb")
        blueprint.set_attribute("image_size_x", str(size))
        blueprint.set_attribute("image_size_y", str(size))
        blueprint.set_attribute("fov", str(self.fov))
        camera = server.world.spawn_actor(blueprint, transform, attach_to=self._ego)
        self._actors.insert(0, camera)
        images: queue.SimpleQueue = queue.SimpleQueue()
        camera.listen(lambda image: None if self._muted else images.put(image))
        return images

    def _spawn_traffic(self, ego_lane: int) -> None:
        """DBC's traffic: cars at random lanes and s in [100, 300] m, on the autopilot."""
        server = self._server
        server.traffic_manager.set_random_device_seed(int(self._rng.integers(2**31)))
        blueprints = [
            bp
            for bp in server.blueprints.filter("vehicle.*")
            if not bp.has_attribute("number_of_wheels")
            or int(bp.get_attribute("number_of_wheels")) == 4
        ]
        self._traffic = []
        for _ in range(self.num_vehicles):
            lane = int(self._rng.choice(HIGHWAY_LANES))
            s = float(self._rng.uniform(*TRAFFIC_S))
            blueprint = blueprints[int(self._rng.integers(len(blueprints)))]
            if lane == ego_lane and abs(s - START_S) < TRAFFIC_CLEARANCE:
                continue
            waypoint = server.map.get_waypoint_xodr(HIGHWAY_ROAD_ID, lane, s)
            if waypoint is None:
                continue
            if blueprint.has_attribute("role_name"):
                blueprint.set_attribute("role_name", "autopilot")
            car = server.world.try_spawn_actor(blueprint, self._lifted(waypoint.transform))
            if car is None:  # the spot is taken
                continue
            car.set_autopilot(True, server.tm_port)
            self._actors.append(car)
            self._traffic.append(car)

    def _spawn_ghost(self) -> None:
        """#GP: a pedestrian just right of the ego lane, ``ghost_distance`` m ahead, walking left."""
        carla, server = self.carla, self._server
        lane = server.map.get_waypoint(self._ego.get_location())
        ahead = lane.next(self.ghost_distance)
        if not ahead:
            return
        spot = ahead[0].transform
        right = spot.get_right_vector()
        offset = lane.lane_width / 2 + GHOST_CURB
        location = carla.Location(
            x=spot.location.x + right.x * offset,
            y=spot.location.y + right.y * offset,
            z=spot.location.z + 1.0,  # a walker's origin is at its hips
        )
        blueprints = server.blueprints.filter("walker.pedestrian.*")
        blueprint = blueprints[int(self._rng.integers(len(blueprints)))]
        if blueprint.has_attribute("is_invincible"):
            blueprint.set_attribute("is_invincible", "false")
        rotation = carla.Rotation(yaw=spot.rotation.yaw - 90.0)
        walker = server.world.try_spawn_actor(blueprint, carla.Transform(location, rotation))
        if walker is None:  # the spot is taken: try again next tick
            return
        self._walker = walker
        self._actors.append(walker)
        self._ghost_control = carla.WalkerControl(
            direction=carla.Vector3D(x=-right.x, y=-right.y, z=0.0), speed=self.ghost_speed
        )
        walker.apply_control(self._ghost_control)

    def destroy_actors(self) -> None:
        """Destroy everything this env spawned (sensors first); a stale actor is skipped."""
        actors, self._actors = self._actors, []
        world = self._server.world
        for actor in actors:
            if hasattr(actor, "stop"):
                with contextlib.suppress(RuntimeError):  # a sensor of a connection that is gone
                    actor.stop()
            live = world.get_actor(actor.id)  # through the current connection
            if live is not None:
                live.destroy()
        self._forget_actors()

    def _drop_stale_actors(self) -> None:
        """After a reconnect: destroy what is left of this env's actors, if the server has any."""
        try:
            self.destroy_actors()
        except RuntimeError as err:
            _LOG.warning("could not destroy the CARLA actors of the lost episode (%s)", err)
            self._forget_actors()

    def _forget_actors(self) -> None:
        self._actors, self._traffic, self._parked = [], [], []
        self._ego = self._walker = self._ghost_control = None
        self._muted = False
        while not self._collisions.empty():
            self._collisions.get_nowait()

    # ---------------------------------------------------------------- sharing the world

    def park(self) -> None:
        """Freeze this env's cars and pedestrian 500 m above their place; mute its sensors."""
        if self._ego is None or self._muted:
            return
        self._muted = True
        movers = [self._ego, *self._traffic] + ([self._walker] if self._walker else [])
        self._parked = [
            (a, a.get_transform(), a.get_velocity(), a.get_angular_velocity()) for a in movers
        ]
        for car in self._traffic:
            car.set_autopilot(False, self._server.tm_port)
        for actor, transform, _, _ in self._parked:
            actor.set_simulate_physics(False)
            actor.set_transform(self._lifted(transform, PARK_LIFT))

    def unpark(self) -> None:
        """Put parked actors back with their velocities; drop what the sensors saw meanwhile."""
        if not self._muted:
            return
        for actor, transform, velocity, spin in self._parked:
            actor.set_transform(transform)
            actor.set_simulate_physics(True)
            actor.set_target_velocity(velocity)
            actor.set_target_angular_velocity(spin)
        for car in self._traffic:
            car.set_autopilot(True, self._server.tm_port)
        if self._walker is not None:
            self._walker.apply_control(self._ghost_control)
        self._parked = []
        for images in [*self._camera_queues, self._view_queue]:
            while images is not None and not images.empty():
                images.get_nowait()
        while not self._collisions.empty():
            self._collisions.get_nowait()
        self._muted = False

    # ---------------------------------------------------------------- ticks

    def _tick(self) -> _Tick:
        """One server tick: progress along the highway, collisions and the end conditions."""
        server = self._server
        tick = _Tick(frame=server.world.tick())
        self.env_steps += 1
        self._episode_env_steps += 1
        location, velocity = self._ego.get_location(), self._ego.get_velocity()
        tick.speed = math.hypot(velocity.x, velocity.y)
        tick.impulse, tick.pedestrian = self._take_collisions()

        tick.off_road = server.map.get_waypoint(location, project_to_road=False) is None
        lane = server.map.get_waypoint(location)  # projected onto the nearest driving lane
        ahead = lane.next(LOOKAHEAD) if lane is not None else []
        if ahead:  # v_ego . u_highway * dt, u_highway the lane's direction 5 m ahead (DBC)
            u = ahead[0].transform.get_forward_vector()
            tick.progress = (velocity.x * u.x + velocity.y * u.y) / math.hypot(u.x, u.y) * self.dt
        tick.road_end = not ahead
        self._slow_ticks = self._slow_ticks + 1 if tick.speed < STUCK_SPEED else 0
        tick.stuck = self._slow_ticks >= self.stuck_env_steps
        tick.horizon = self._episode_env_steps >= self.max_episode_env_steps

        if (
            self.scenario == "ghost_pedestrian"
            and self._walker is None
            and self._episode_env_steps >= self._ghost_at
        ):
            self._spawn_ghost()  # it appears at the next tick
        return tick

    def _end(self, tick: _Tick) -> str:
        """Why the episode ends at ``tick`` ("" if it goes on); terminal reasons first."""
        limit = self.collision_end_impulse
        reasons = {
            "pedestrian": tick.pedestrian,
            "collision": limit is not None and tick.impulse >= limit,
            "off_road": tick.off_road,
            "road_end": tick.road_end,
            "stuck": tick.stuck,
            "horizon": tick.horizon,
        }
        return next((reason for reason, ended in reasons.items() if ended), "")

    def _on_collision(self, event) -> None:
        """Collision sensor callback (client thread): queue the impulse norm and who was hit."""
        if self._muted:
            return
        impulse = event.normal_impulse
        other = getattr(event.other_actor, "type_id", "") or ""
        self._collisions.put((math.sqrt(impulse.x**2 + impulse.y**2 + impulse.z**2), other))

    def _take_collisions(self) -> tuple[float, bool]:
        """Sum of the impulses queued since the last call, and whether one was with a walker."""
        total, pedestrian = 0.0, False
        while not self._collisions.empty():
            impulse, other = self._collisions.get_nowait()
            total += impulse
            pedestrian |= other.startswith("walker.")
        return total, pedestrian

    def _observe(self, frame: int) -> None:
        """Wait for every camera's image of ``frame``; stitch the policy frame, keep the view."""
        images = [_bgra_to_rgb(self._image(q, frame)) for q in self._camera_queues]
        panorama = np.concatenate(images, axis=1) if len(images) > 1 else images[0]
        self._frames.push(np.ascontiguousarray(panorama.transpose(2, 0, 1)))
        if self._view_queue is not None:
            self._view = _bgra_to_rgb(self._image(self._view_queue, frame))
        else:
            self._view = images[len(images) // 2]

    def _image(self, images: queue.SimpleQueue, frame: int):
        """The image of ``frame`` from a camera's queue (older ones are dropped)."""
        while True:
            try:
                image = images.get(timeout=self.timeout)
            except queue.Empty:
                raise RuntimeError(
                    f"no camera image for frame {frame} within {self.timeout:g} s"
                ) from None
            if image.frame >= frame:
                return image

    def _finish(
        self, ticks: list[_Tick], steer: float, end: str
    ) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        """Aggregate the ticks of one agent step into the gymnasium step result."""
        rewards = [
            highway_reward(t.progress, t.impulse, steer, self.collision_weight, self.steer_weight)
            for t in ticks
        ]
        if not rewards:
            reward = 0.0
        else:
            reward = float(np.mean(rewards) if self.reward_aggregation == "mean" else sum(rewards))
        progress = sum(t.progress for t in ticks)
        self._episode_return += reward
        self._distance += progress
        self._dbc_distance += ticks[-1].progress if ticks else 0.0
        terminated = end in _TERMINAL
        truncated = bool(end) and not terminated
        if end == "connection_lost":
            _LOG.warning(
                "CARLA episode ended early after %d ticks: the connection was lost (reconnected)",
                self._episode_env_steps,
            )
        self._needs_reset = terminated or truncated
        info = {
            "env_steps": len(ticks),
            "episode_return": self._episode_return,
            "driving_distance": self._distance,
            "dbc_distance": self._dbc_distance,
            "progress": progress,
            "speed": ticks[-1].speed if ticks else 0.0,
            "collision_impulse": sum(t.impulse for t in ticks),
            "end_reason": end,
        }
        return self._frames.observation(), reward, terminated, truncated, info

    # ---------------------------------------------------------------- helpers

    def _lifted(self, transform, lift: float = SPAWN_LIFT):
        carla = self.carla
        location = transform.location
        raised = carla.Location(x=location.x, y=location.y, z=location.z + lift)
        return carla.Transform(raised, transform.rotation)


def _check_options(
    *,
    scenario: str,
    positive_ints: dict[str, int],
    cameras: int,
    fov: float,
    view_size: int,
    positives: dict[str, float],
    reward_aggregation: str,
    ghost_window: tuple[int, int],
) -> None:
    """Raise a one-line ConfigError for the first bad constructor option."""
    if scenario not in TASK_DESCRIPTIONS:
        raise ConfigError(
            f"unknown CARLA scenario {scenario!r}",
            "set env.scenario to highway or ghost_pedestrian",
        )
    require_positive_ints(positive_ints, prefix="env.")
    for name, value in positives.items():
        if not value > 0:
            raise ConfigError(f"{name}={value} is not positive", f"set env.{name} > 0")
    if cameras not in (1, 3, 5):
        raise ConfigError(
            f"cameras={cameras} is not 1, 3 or 5",
            "set env.cameras to 1 (forward), 3 or 5 (DBC's 300-degree panorama)",
        )
    if not 0 < fov * cameras <= 360:
        raise ConfigError(
            f"{cameras} cameras of fov {fov:g} degrees do not fit in 360 degrees",
            "set env.fov to at most 360 / cameras (DBC: 60)",
        )
    if view_size < 0:
        raise ConfigError(f"view_size={view_size} is negative", "set env.view_size >= 0")
    if reward_aggregation not in ("mean", "sum"):
        raise ConfigError(
            f"unknown reward_aggregation {reward_aggregation!r}",
            "set env.reward_aggregation to mean (DBC) or sum",
        )
    first, last = ghost_window
    if not 1 <= first <= last:
        raise ConfigError(
            f"ghost_window={list(ghost_window)} is not two ticks 1 <= first <= last",
            "set env.ghost_window like [100, 600]",
        )
