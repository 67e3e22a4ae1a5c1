"""CarlaEnv: a CARLA driving scenario (#HW or #GP) as a :class:`PixelEnv`.

One *env step* is one server tick of ``fixed_delta_seconds`` (0.05 s, synchronous mode); one
*agent step* holds the action for ``action_repeat`` ticks. The env spawns the ego car, its
cameras and collision sensor, the traffic and (#GP) the pedestrian (``scenarios.py``), reads the
tick's measurements and computes the reward; the server connection, parking and reconnects are
``server.py``'s. Reset ticks twice without counting env steps (the spawned cars settle onto the
road); ``info["end_reason"]`` names why an episode ended.

Lost connection. A tick, spawn or sensor read that times out (``RuntimeError`` from the client)
makes the env reconnect once: the episode in progress ends as truncated with
``end_reason="connection_lost"`` and a logged warning (the observation stays the last one), and
the next reset spawns everything anew. If the server cannot be reached again the env raises a
one-line :class:`ConfigError`.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import weakref
from typing import Any, Literal, NoReturn

import numpy as np
from jsonargparse.typing import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt
from PIL import Image

from covr_lightning.envs.base import EpisodeLost, PixelEnv
from covr_lightning.envs.carla.scenarios import (
    DEFAULT_ACTION_REPEAT,
    STUCK_SPEED,
    TASK_DESCRIPTIONS,
    TERMINAL,
    Tick,
    end_reason,
    highway_reward,
    measure,
    spawn_ego,
    spawn_ghost,
    spawn_traffic,
    split_action,
)
from covr_lightning.envs.carla.sensors import EgoSensors
from covr_lightning.envs.carla.server import (
    Parked,
    import_carla,
    join_server,
    park_actors,
    unpark_actors,
)
from covr_lightning.errors import ConfigError

_LOG = logging.getLogger(__name__)

_SETTLE_TICKS = 2


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    if image.shape[:2] == (height, width):
        return image.copy()
    resized = Image.fromarray(image).resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(resized)


_OPEN_ENVS: weakref.WeakSet[CarlaEnv] = weakref.WeakSet()


@atexit.register
def _close_open_envs() -> None:
    """Close envs nobody closed: their actors would outlive this process on the server, and a
    synchronous world with nobody ticking freezes the next client."""
    for env in list(_OPEN_ENVS):
        env.close()


class CarlaEnv(PixelEnv):
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
        fov: Horizontal field of view of each camera, degrees (``cameras * fov`` <= 360).
        view_size: Side of the forward camera :meth:`render` reads (the VLM's view); 0 renders
            the centre policy camera, resized.
        frame_stack: Frames per observation, stacked on the channel axis.
        action_repeat: Ticks per agent step; ``None`` takes :data:`DEFAULT_ACTION_REPEAT` (4).
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
            drawn uniformly per episode (first <= last).
        ghost_distance: Metres ahead of the ego car, along its lane, where the pedestrian appears.
        ghost_speed: Walking speed of the pedestrian across the road, m/s.
        seed: Seed of the scenario's random choices (lanes, traffic, pedestrian timing);
            ``reset(seed=...)`` reseeds.

    Attributes:
        observation_space: Box uint8 (3 * frame_stack, image_size, cameras * image_size).
        action_space: Box float32 [-1, 1]^2 = (throttle-brake, steer), see :func:`split_action`.
        frame_shape: One frame, (3, image_size, cameras * image_size).

    Raises:
        ConfigError: Cameras that do not fit in 360 degrees, a ghost window whose first tick is
            after its last, the carla package missing, no server at host:port, or another
            process driving that server. Single values are typed, which a recipe is checked
            against when it is parsed.
    """

    codec_kind = "carla"
    """Action codec family of the VLM: (throttle-brake, steer) as phrases."""
    max_num_envs = 1
    """One synchronous world serves one process: the builder refuses run.num_envs > 1 up front."""
    episode_metrics = ("driving_distance", "dbc_distance")
    """Info keys the loop and ``evaluate`` report per episode (``rl/``, ``eval/`` metrics)."""
    default_action_repeat = DEFAULT_ACTION_REPEAT

    def __init__(
        self,
        scenario: Literal["highway", "ghost_pedestrian"] = "highway",
        host: str = "localhost",
        port: PositiveInt = 2000,
        timeout: PositiveFloat = 10.0,
        traffic_manager_port: PositiveInt = 8000,
        image_size: PositiveInt = 84,
        cameras: Literal[1, 3, 5] = 1,
        fov: PositiveFloat = 60.0,
        view_size: NonNegativeInt = 224,
        frame_stack: PositiveInt = 3,
        action_repeat: PositiveInt | None = None,
        max_episode_env_steps: PositiveInt = 1000,
        fixed_delta_seconds: PositiveFloat = 0.05,
        num_vehicles: NonNegativeInt = 20,
        collision_weight: NonNegativeFloat = 1e-4,
        steer_weight: NonNegativeFloat = 1.0,
        reward_aggregation: Literal["mean", "sum"] = "mean",
        collision_end_impulse: PositiveFloat | None = None,
        stuck_env_steps: PositiveInt = 100,
        ghost_window: tuple[PositiveInt, PositiveInt] = (100, 600),
        ghost_distance: PositiveFloat = 30.0,
        ghost_speed: PositiveFloat = 2.0,
        seed: int = 0,
    ) -> None:
        # What a signature cannot say: relations between options.
        if not fov * cameras <= 360:
            raise ConfigError(
                f"{cameras} cameras of fov {fov:g} degrees do not fit in 360 degrees",
                "set env.fov to at most 360 / cameras (DBC: 60)",
            )
        if not ghost_window[0] <= ghost_window[1]:
            raise ConfigError(
                f"ghost_window={list(ghost_window)} is not two ticks 1 <= first <= last",
                "set env.ghost_window like [100, 600]",
            )
        self.scenario, self.host, self.port = scenario, host, int(port)
        self.timeout = float(timeout)
        self.image_size, self.cameras, self.fov = int(image_size), int(cameras), float(fov)
        self.view_size = int(view_size)
        self.dt = float(fixed_delta_seconds)
        self.num_vehicles = int(num_vehicles)
        self.collision_weight, self.steer_weight = float(collision_weight), float(steer_weight)
        self.reward_aggregation = reward_aggregation
        self.collision_end_impulse = collision_end_impulse
        self.stuck_env_steps = int(stuck_env_steps)
        self.ghost_window = (int(ghost_window[0]), int(ghost_window[1]))
        self.ghost_distance, self.ghost_speed = float(ghost_distance), float(ghost_speed)
        self._set_up(
            frame_shape=(3, self.image_size, self.cameras * self.image_size),
            frame_stack=frame_stack,
            action_repeat=self.resolved_action_repeat({"action_repeat": action_repeat}),
            action_dim=2,
            max_episode_env_steps=max_episode_env_steps,
        )

        self._rng = np.random.default_rng(seed)
        self._actors: list = []  # everything this env spawned, sensors first
        self._traffic: list = []
        self._ego = self._walker = self._ghost_control = None
        self._sensors = EgoSensors(self.timeout)
        self._parked: list[Parked] = []
        self._policy_frame: np.ndarray | None = None
        self._view: np.ndarray | None = None
        self._step_ticks: list[Tick] = []  # the ticks of the agent step in progress
        self._closed = False

        self.carla = import_carla()
        self._server = join_server(
            self, self.carla, self.host, self.port, self.timeout, int(traffic_manager_port), self.dt
        )
        self._generation = self._server.generation
        _OPEN_ENVS.add(self)

    @property
    def control_timestep(self) -> float:
        """Simulated seconds per env step (one synchronous tick)."""
        return self.dt

    @property
    def task_description(self) -> str:
        """The task in words, for the VLM's prompt."""
        return TASK_DESCRIPTIONS[self.scenario]

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

    # ---------------------------------------------------------------- PixelEnv hooks

    def _reset_simulation(self, seed: int | None, options: dict[str, Any] | None) -> None:
        """Destroy the last episode's actors and spawn the scenario anew (reconnecting once).

        Raises:
            ConfigError: The server is gone and does not come back, or the ego car cannot be
                placed on the highway.
        """
        if seed is not None:
            self._rng = np.random.default_rng(seed)
        for attempt in range(2):
            try:
                self._server.activate(self)
                self.destroy_actors()
                self._start_episode()
                return
            except RuntimeError as err:  # the client's time-outs and RPC failures
                if attempt:
                    raise ConfigError(
                        f"the CARLA server at {self.host}:{self.port} failed twice while starting "
                        f"an episode ({err})",
                        "restart the server, then continue with covr-lightning fit --resume last",
                    ) from err
                self._server.reconnect(err)
                self._generation = self._server.generation

    def _begin_step(self, action: np.ndarray) -> float:
        """Apply (throttle, steer, brake) to the ego car; returns the steer (for the reward)."""
        throttle, steer, brake = split_action(action)
        self._step_ticks = []
        if self._generation != self._server.generation:  # another env of this server reconnected
            self._lose_episode(None)
        try:
            self._server.activate(self)
            control = self.carla.VehicleControl(throttle=throttle, steer=steer, brake=brake)
            self._ego.apply_control(control)
        except RuntimeError as err:  # the client's time-outs and RPC failures
            self._lose_episode(err)
        return steer

    def _step_simulation(self, command: float, last: bool) -> tuple[float, bool, bool, dict]:
        """One tick; the agent step's last one also waits for the cameras' images.

        Info has ``driving_distance`` (metres along the highway this episode), ``dbc_distance``
        (DBC's distance measure, see docs/carla.md), ``progress`` (metres in this agent step),
        ``speed`` (m/s), ``collision_impulse`` (N s in this agent step) and ``end_reason``
        (empty while the episode runs).
        """
        try:
            tick = self._tick()
            end = end_reason(tick, self.collision_end_impulse)
            if end or last:
                self._policy_frame, self._view = self._sensors.observe(tick.frame)
                late = self._sensors.take_collisions()  # events that arrived with the images
                tick.impulse += late[0]
                tick.pedestrian |= late[1]
                end = end_reason(tick, self.collision_end_impulse)
        except RuntimeError as err:  # the client's time-outs and RPC failures
            self._lose_episode(err)
        self._step_ticks.append(tick)
        self._distance += tick.progress
        if end or last:  # DBC counts one tick per agent step
            self._dbc_distance += tick.progress
        reward = highway_reward(
            tick.progress, tick.impulse, command, self.collision_weight, self.steer_weight
        )
        return reward, end in TERMINAL, bool(end) and end not in TERMINAL, self._info(end)

    def _frame(self) -> np.ndarray:
        assert self._policy_frame is not None  # observed at reset and at every agent step's end
        return self._policy_frame

    def _agent_step_reward(self, rewards: list[float]) -> float:
        """The ticks' rewards aggregated by ``reward_aggregation`` (DBC: the mean)."""
        if not rewards:
            return 0.0
        return float(np.mean(rewards) if self.reward_aggregation == "mean" else sum(rewards))

    # ---------------------------------------------------------------- episodes

    def _start_episode(self) -> None:
        """Spawn ego, sensors, traffic (and plan the pedestrian); tick until the first frame."""
        server = self._server
        self._generation = server.generation
        self._ego, ego_lane = spawn_ego(server, self._rng)
        self._actors.append(self._ego)
        sensors = self._sensors.spawn(
            server, self._ego, self.image_size, self.cameras, self.fov, self.view_size
        )
        self._actors[:0] = sensors  # sensors first: they go before what they are attached to
        self._traffic = spawn_traffic(server, self._rng, ego_lane, self.num_vehicles)
        self._actors.extend(self._traffic)

        self._distance = self._dbc_distance = 0.0
        self._slow_ticks = 0
        self._ghost_at = int(self._rng.integers(self.ghost_window[0], self.ghost_window[1] + 1))
        for _ in range(_SETTLE_TICKS - 1):
            server.world.tick()
        self._policy_frame, self._view = self._sensors.observe(server.world.tick())
        self._sensors.take_collisions()  # bumps while settling are not the agent's

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

    def _lose_episode(self, err: Exception | None) -> NoReturn:
        """End the episode in progress as lost: reconnect after ``err`` (``None``: another env
        of this server already did), clean up what is left of its actors.

        Raises:
            EpisodeLost: Always (the skeleton ends the agent step as truncated).
            ConfigError: The server cannot be reached again.
        """
        if err is not None:
            self._server.reconnect(err)
            self._generation = self._server.generation
        try:
            self.destroy_actors()
        except RuntimeError as again:
            _LOG.warning("could not destroy the CARLA actors of the lost episode (%s)", again)
            self._forget_actors()
        if self._step_ticks:  # the last tick taken stands for the step in DBC's distance
            self._dbc_distance += self._step_ticks[-1].progress
        _LOG.warning(
            "CARLA episode ended early after %d ticks: the connection was lost (reconnected)",
            self._episode_env_steps,
        )
        raise EpisodeLost(self._info("connection_lost"))

    def _forget_actors(self) -> None:
        self._actors, self._traffic, self._parked = [], [], []
        self._ego = self._walker = self._ghost_control = None
        self._sensors.muted = False
        self._sensors.drain()

    # ---------------------------------------------------------------- sharing the world

    def park(self) -> None:
        """Freeze this env's cars and pedestrian 500 m above their place; mute its sensors."""
        if self._ego is None or self._sensors.muted:
            return
        self._sensors.muted = True
        movers = [self._ego, *self._traffic] + ([self._walker] if self._walker else [])
        self._parked = park_actors(self._server, movers, self._traffic)

    def unpark(self) -> None:
        """Put parked actors back with their velocities; drop what the sensors saw meanwhile."""
        if not self._sensors.muted:
            return
        unpark_actors(self._server, self._parked, self._traffic)
        if self._walker is not None:
            self._walker.apply_control(self._ghost_control)
        self._parked = []
        self._sensors.drain()
        self._sensors.muted = False

    # ---------------------------------------------------------------- ticks

    def _tick(self) -> Tick:
        """One server tick: progress along the highway, collisions and the end conditions."""
        server = self._server
        tick = Tick(frame=server.world.tick())
        number = self._episode_env_steps + 1  # this tick's place in the episode
        tick.impulse, tick.pedestrian = self._sensors.take_collisions()
        measure(server, self._ego, tick, self.dt)
        self._slow_ticks = self._slow_ticks + 1 if tick.speed < STUCK_SPEED else 0
        tick.stuck = self._slow_ticks >= self.stuck_env_steps
        tick.horizon = number >= self.max_episode_env_steps
        if (
            self.scenario == "ghost_pedestrian"
            and self._walker is None
            and number >= self._ghost_at
        ):
            ghost = spawn_ghost(server, self._ego, self._rng, self.ghost_distance, self.ghost_speed)
            if ghost is not None:  # else the spot is taken: try again next tick
                self._walker, self._ghost_control = ghost
                self._actors.append(self._walker)
        return tick

    def _info(self, end: str) -> dict[str, Any]:
        """The agent step's info so far (the skeleton adds env_steps and episode_return)."""
        ticks = self._step_ticks
        return {
            "driving_distance": self._distance,
            "dbc_distance": self._dbc_distance,
            "progress": sum(t.progress for t in ticks),
            "speed": ticks[-1].speed if ticks else 0.0,
            "collision_impulse": sum(t.impulse for t in ticks),
            "end_reason": end,
        }
